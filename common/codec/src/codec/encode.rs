//! The primary's page encoder: for each dirty page, the smallest encoding for the CPU
//! spent, predicted against exactly what the backup holds (the *encode* stage).

use super::general::{CODEC_RAW, codec_byte, compress, looks_random};
use super::{
    Batch, CodecConfig, ConfigError, EncodeStats, EncodedBatch, Encoding, GeneralCodec, Mode,
    Record, TAG_LITERAL, TAG_REF, TAG_ZERO,
};
use crate::PAGE_SIZE;
use crate::block::{BlockMask, BlockSize, DiffMask, Page, is_zero};
use crate::cache::PageCache;
use crate::hashes::{self, BlockHashes};
use crate::share::{BlockRef, PageView, ShareIndex};
use crate::teleport::DiskLookup;
use crate::{varint, xbzrle};
use std::collections::HashMap;

mod diskref;

/// The backup's view while a batch is being encoded: pages encoded earlier in the batch
/// have their new content; others what the cache remembers.
struct BatchView<'a> {
    done: &'a HashMap<u64, usize>,
    batch: Batch<'a>,
    cache: Option<&'a PageCache>,
}

impl PageView for BatchView<'_> {
    fn page(&self, page: u64) -> Option<&Page> {
        if let Some(&i) = self.done.get(&page) {
            return Some(self.batch.page(i));
        }
        self.cache.and_then(|c| c.peek(page))
    }
}

/// A delta at most this long is taken without trying anything else.
const TINY: usize = 128;
/// Whole-page and literal compression is tried only above this many bytes.
const COMPRESS_MIN: usize = 512;

/// The primary's page encoder: its configuration, what it knows of the backup's pages,
/// scratch buffers and counters.
#[derive(Debug)]
pub struct PageEncoder {
    cfg: CodecConfig,
    cache: Option<PageCache>,
    hashes: Option<BlockHashes>,
    index: ShareIndex,
    stats: EncodeStats,
    done: HashMap<u64, usize>,
    scratch: Scratch,
}

/// Reused buffers, so encoding allocates nothing per page.
struct Scratch {
    delta: Vec<u8>,
    blocks: Vec<u8>,
    literals: Vec<u8>,
    general: Vec<u8>,
    new_hashes: Vec<u64>,
    zlib: flate2::Compress,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

impl PageEncoder {
    /// An encoder. `cache` holds last-sent content (needed for `Delta`; `xbzrle` mode
    /// without one sends everything raw); `hashes` enables block fingerprints (fgbi).
    pub fn new(
        cfg: CodecConfig,
        cache: Option<PageCache>,
        hashes: Option<BlockHashes>,
    ) -> Result<Self, ConfigError> {
        if cfg.zlib_level > 9 {
            return Err(ConfigError::ZlibLevel(cfg.zlib_level));
        }
        Ok(Self {
            cfg,
            cache,
            hashes,
            index: ShareIndex::new(cfg.block_size.bytes(), crate::share::DEFAULT_BLOCK_ENTRIES),
            stats: EncodeStats::default(),
            done: HashMap::new(),
            scratch: Scratch {
                delta: vec![0; PAGE_SIZE + 64],
                blocks: Vec::with_capacity(PAGE_SIZE * 2),
                literals: Vec::with_capacity(PAGE_SIZE),
                general: vec![0; PAGE_SIZE + 64],
                new_hashes: vec![0; cfg.block_size.per_page()],
                zlib: flate2::Compress::new(flate2::Compression::new(cfg.zlib_level), false),
            },
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CodecConfig {
        &self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> &EncodeStats {
        &self.stats
    }

    /// The page cache, if any.
    pub fn cache(&self) -> Option<&PageCache> {
        self.cache.as_ref()
    }

    /// The share index.
    pub fn share_index(&self) -> &ShareIndex {
        &self.index
    }

    /// Record that the backup holds `content` for `page` (initial sync, or a warm start):
    /// cache it, fingerprint it and index it as the mode needs.
    pub fn learn(&mut self, page: u64, content: &Page) {
        self.learn_inner(page, content, false);
    }

    /// Record only the block fingerprints of `page` (what the primary keeps when it does
    /// not keep content).
    pub fn learn_hashes(&mut self, page: u64, content: &Page) {
        if let Some(h) = &mut self.hashes {
            hashes::page_hashes(content, self.cfg.block_size, &mut self.scratch.new_hashes);
            h.store(page, &self.scratch.new_hashes);
        }
    }

    /// Encode a batch of dirty pages, appending to `out`. Pages are encoded in order;
    /// each may reference the ones before it.
    pub fn encode_batch(&mut self, batch: Batch<'_>, out: &mut EncodedBatch) {
        self.encode_batch_with_disk(batch, out, None);
    }

    /// [`PageEncoder::encode_batch`], sending pages equal to a block of the backup's disk
    /// replica that `disk` finds as `DiskRef` records (fgbi).
    pub fn encode_batch_with_disk(
        &mut self,
        batch: Batch<'_>,
        out: &mut EncodedBatch,
        mut disk: Option<&mut dyn DiskLookup>,
    ) {
        let n = batch.pages.len().min(batch.data.len() / PAGE_SIZE);
        self.done.clear();
        for i in 0..n {
            let page = batch.pages[i];
            let new = batch.page(i);
            let start = out.bytes.len();
            let encoding = match disk.as_deref_mut() {
                Some(d) => self.encode_disk_ref(page, new, d, &mut out.bytes),
                None => None,
            };
            let encoding =
                encoding.unwrap_or_else(|| self.encode_page(page, new, batch, &mut out.bytes));
            let len = out.bytes.len() - start;
            let k = &mut self.stats.kinds[encoding as usize];
            k.pages += 1;
            k.bytes += len as u64;
            out.records.push(Record {
                page,
                encoding,
                start,
                len,
            });
            self.done.insert(page, i);
        }
        self.done.clear();
    }

    fn encode_page(
        &mut self,
        page: u64,
        new: &Page,
        batch: Batch<'_>,
        out: &mut Vec<u8>,
    ) -> Encoding {
        match self.cfg.mode {
            Mode::Remus => {
                out.extend_from_slice(new);
                Encoding::Raw
            }
            Mode::Xbzrle => self.encode_xbzrle(page, new, out),
            Mode::Fgbi => self.encode_fgbi(page, new, batch, out),
        }
    }

    /// QEMU's choice: zero page, else delta against the cache if it fits in a page, else
    /// raw; the cache is updated with what was sent.
    fn encode_xbzrle(&mut self, page: u64, new: &Page, out: &mut Vec<u8>) -> Encoding {
        if is_zero(new) {
            self.remember(page, new);
            return Encoding::Zero;
        }
        let enc = match self.cache.as_mut().and_then(|c| c.get(page)) {
            Some(old) => match xbzrle::encode(old, new, &mut self.scratch.delta, PAGE_SIZE) {
                Some(0) => Encoding::Unchanged,
                Some(n) => {
                    out.extend_from_slice(&self.scratch.delta[..n]);
                    Encoding::Delta
                }
                None => {
                    out.extend_from_slice(new);
                    Encoding::Raw
                }
            },
            None => {
                out.extend_from_slice(new);
                Encoding::Raw
            }
        };
        self.remember(page, new);
        enc
    }

    fn encode_fgbi(
        &mut self,
        page: u64,
        new: &Page,
        batch: Batch<'_>,
        out: &mut Vec<u8>,
    ) -> Encoding {
        let bs = self.cfg.block_size;
        // What the primary knows of the backup's copy: its content, its fingerprints, or
        // nothing.
        let old_mask = self
            .cache
            .as_mut()
            .and_then(|c| c.get(page))
            .map(|old| DiffMask::new(old, new));
        let mut hashed = false;
        let blocks = match &old_mask {
            // The cache already holds this content: nothing to send or learn.
            Some(m) if m.is_clear() => return Encoding::Unchanged,
            Some(m) => m.blocks(bs),
            None => match &self.hashes {
                Some(h) => {
                    hashes::page_hashes(new, bs, &mut self.scratch.new_hashes);
                    hashed = true;
                    match h.changed(page, &self.scratch.new_hashes) {
                        Some(m) if m.changed() == 0 => return Encoding::Unchanged,
                        Some(m) => m,
                        None => BlockMask::all(bs),
                    }
                }
                None => BlockMask::all(bs),
            },
        };
        if is_zero(new) {
            self.learn_inner(page, new, hashed);
            return Encoding::Zero;
        }

        // Cheapest first: a small delta is near optimal, take it.
        let mut best = (Encoding::Raw, PAGE_SIZE);
        if let Some(m) = &old_mask {
            let est = m.changed_bytes() + 2 * m.runs();
            if est < PAGE_SIZE
                && let Some(n) =
                    xbzrle::encode_with_mask(m, new, &mut self.scratch.delta, PAGE_SIZE - 1)
            {
                if n <= TINY {
                    out.extend_from_slice(&self.scratch.delta[..n]);
                    self.learn_inner(page, new, hashed);
                    return Encoding::Delta;
                }
                best = (Encoding::Delta, n);
            }
        }

        // A page the backup already holds whole.
        let page_hash = hashes::hash(new);
        let view = BatchView {
            done: &self.done,
            batch,
            cache: self.cache.as_ref(),
        };
        if let Some(q) = self.index.find_page(page_hash, new, page, &view) {
            varint::put_delta(out, page, q);
            self.learn_with_hash(page, new, hashed, page_hash);
            return Encoding::PageRef;
        }

        // Changed blocks, shared where possible. A random-looking page with no small
        // delta gains only from sharing: probe a few of its blocks before hashing all.
        // With a delta in hand, Blocks only wins through zero or shared blocks, or by
        // compressing a large delta's literals: probe before building it.
        let random = looks_random(new);
        let worth_blocks = match best.0 {
            Encoding::Delta => {
                best.1 > 2 * bs.bytes() + 16
                    && (best.1 > COMPRESS_MIN * 2
                        || probe_shared(page, new, blocks, bs, &mut self.index, &view))
            }
            // No delta: a random page gains only from sharing.
            _ => !random || probe_shared(page, new, blocks, bs, &mut self.index, &view),
        };
        if worth_blocks {
            if !hashed && self.hashes.is_some() {
                hashes::page_hashes(new, bs, &mut self.scratch.new_hashes);
                hashed = true;
            }
            let n = build_blocks(
                page,
                new,
                blocks,
                bs,
                hashed.then_some(&self.scratch.new_hashes[..]),
                &mut self.index,
                &view,
                self.cfg.general,
                &mut self.scratch.literals,
                &mut self.scratch.zlib,
                &mut self.stats,
                &mut self.scratch.blocks,
            );
            if n < best.1 {
                best = (Encoding::Blocks, n);
            }
        }

        // Whole-page compression, unless the page looks random.
        if best.1 > COMPRESS_MIN * 2
            && self.cfg.general != GeneralCodec::None
            && !random
            && let Some(n) = compress(
                self.cfg.general,
                new,
                &mut self.scratch.general,
                best.1.saturating_sub(2),
                &mut self.scratch.zlib,
            )
        {
            best = (Encoding::General, n + 1);
        }

        match best.0 {
            Encoding::Delta => out.extend_from_slice(&self.scratch.delta[..best.1]),
            Encoding::Blocks => out.extend_from_slice(&self.scratch.blocks),
            Encoding::General => {
                out.push(codec_byte(self.cfg.general));
                out.extend_from_slice(&self.scratch.general[..best.1 - 1]);
            }
            _ => out.extend_from_slice(new),
        }
        self.learn_with_hash(page, new, hashed, page_hash);
        best.0
    }

    /// Update the cache (xbzrle: nothing else).
    fn remember(&mut self, page: u64, new: &Page) {
        if let Some(c) = &mut self.cache {
            c.insert(page, new);
        }
    }

    fn learn_inner(&mut self, page: u64, new: &Page, hashed: bool) {
        let h = if self.cfg.mode == Mode::Fgbi {
            hashes::hash(new)
        } else {
            0
        };
        self.learn_with_hash(page, new, hashed, h);
    }

    /// After `page` was sent as `new`: cache it, store its block fingerprints (computed
    /// already when `hashed`), and index the whole page.
    fn learn_with_hash(&mut self, page: u64, new: &Page, hashed: bool, page_hash: u64) {
        self.remember(page, new);
        if self.cfg.mode != Mode::Fgbi {
            return;
        }
        if let Some(h) = &mut self.hashes {
            if !hashed {
                hashes::page_hashes(new, self.cfg.block_size, &mut self.scratch.new_hashes);
            }
            h.store(page, &self.scratch.new_hashes);
        }
        if !is_zero(new) {
            self.index.insert_page(page_hash, page);
        }
    }
}

/// Whether a changed block of the page is all zero, or one of the first few non-zero
/// changed blocks is shared.
fn probe_shared(
    page: u64,
    new: &Page,
    mask: BlockMask,
    bs: BlockSize,
    index: &mut ShareIndex,
    view: &impl PageView,
) -> bool {
    const PROBES: usize = 4;
    let blocks = || mask.iter().map(|b| (b, &new[bs.range(b)]));
    if blocks().any(|(_, blk)| is_zero(blk)) {
        return true;
    }
    blocks().take(PROBES).any(|(b, blk)| {
        let me = BlockRef {
            page,
            block: b as u8,
        };
        index.find_block(hashes::hash(blk), blk, me, view).is_some()
    })
}

/// Build a `Blocks` payload into `out` and return its length.
#[allow(clippy::too_many_arguments)]
fn build_blocks(
    page: u64,
    new: &Page,
    mask: BlockMask,
    bs: BlockSize,
    new_hashes: Option<&[u64]>,
    index: &mut ShareIndex,
    view: &impl PageView,
    general: GeneralCodec,
    literals: &mut Vec<u8>,
    zlib: &mut flate2::Compress,
    stats: &mut EncodeStats,
    out: &mut Vec<u8>,
) -> usize {
    out.clear();
    literals.clear();
    let mask_bytes = bs.per_page().div_ceil(8);
    out.extend_from_slice(&mask.bits().to_le_bytes()[..mask_bytes]);
    let tags_at = out.len();
    let changed = mask.changed();
    out.resize(tags_at + (changed * 2).div_ceil(8), 0);
    let mut pending = Vec::new();
    for (k, b) in mask.iter().enumerate() {
        let blk = &new[bs.range(b)];
        let tag = if is_zero(blk) {
            stats.zero_blocks += 1;
            TAG_ZERO
        } else {
            let h = new_hashes.map_or_else(|| hashes::hash(blk), |hs| hs[b]);
            let me = BlockRef {
                page,
                block: b as u8,
            };
            match index.find_block(h, blk, me, view) {
                Some(r) => {
                    varint::put_delta(out, page, r.page);
                    out.push(r.block);
                    stats.shared_blocks += 1;
                    TAG_REF
                }
                None => {
                    literals.extend_from_slice(blk);
                    pending.push((h, b as u8));
                    stats.literal_blocks += 1;
                    TAG_LITERAL
                }
            }
        };
        out[tags_at + k / 4] |= tag << (2 * (k % 4));
    }
    stats.changed_blocks += changed as u64;
    // Literal blocks become shareable once this record is applied.
    for (h, b) in pending {
        index.insert_block(h, page, b);
    }
    // Literals: raw, or compressed if that pays.
    if literals.len() >= COMPRESS_MIN && general != GeneralCodec::None && !looks_random(literals) {
        let mut buf = Vec::new();
        if let Some(n) = compress(general, literals, &mut buf, literals.len() - 8, zlib) {
            out.push(codec_byte(general));
            out.extend_from_slice(&buf[..n]);
            return out.len();
        }
    }
    out.push(CODEC_RAW);
    out.extend_from_slice(literals);
    out.len()
}
