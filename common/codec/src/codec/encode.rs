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
use crate::{varint, xbzrle};
use std::collections::HashMap;

/// The pages of the batch encoded so far: the first `upto`. A batch in increasing page
/// order (what the harvest produces) is searched in place; any other is indexed.
#[derive(Debug, Default)]
struct Done {
    upto: usize,
    sorted: bool,
    map: HashMap<u64, usize>,
}

impl Done {
    fn start(&mut self, pages: &[u64]) {
        self.upto = 0;
        self.sorted = pages.is_sorted();
        self.map.clear();
    }

    /// Page `pages[i]` is encoded.
    fn push(&mut self, pages: &[u64], i: usize) {
        self.upto = i + 1;
        if !self.sorted {
            self.map.insert(pages[i], i);
        }
    }

    /// Where in the batch `page` was encoded, if it was.
    fn find(&self, pages: &[u64], page: u64) -> Option<usize> {
        if self.sorted {
            pages[..self.upto].binary_search(&page).ok()
        } else {
            self.map.get(&page).copied()
        }
    }
}

/// The backup's view while a batch is being encoded: pages encoded earlier in the batch
/// have their new content; others what the cache remembers.
struct BatchView<'a> {
    done: &'a Done,
    batch: Batch<'a>,
    cache: Option<&'a PageCache>,
}

impl PageView for BatchView<'_> {
    fn page(&self, page: u64) -> Option<&Page> {
        if let Some(i) = self.done.find(self.batch.pages, page) {
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
    done: Done,
    scratch: Scratch,
    /// Whether whole-page compression has been paying lately.
    page_gate: Gate,
    /// Whether compressing `Blocks` literals has been paying lately.
    literal_gate: Gate,
}

/// Reused buffers, so encoding allocates nothing per page.
struct Scratch {
    delta: Vec<u8>,
    blocks: Vec<u8>,
    literals: Vec<u8>,
    /// Literal blocks of the `Blocks` record being built: (fingerprint, block).
    pending: Vec<(u64, u8)>,
    general: Vec<u8>,
    /// Compressed literals.
    packed: Vec<u8>,
    new_hashes: Vec<u64>,
    /// A bit per block fingerprinted for this page that is all zero (exact for every
    /// changed block).
    zero_blocks: u128,
    /// The fingerprint of an all-zero block.
    zero_hash: u64,
    zlib: flate2::Compress,
}

impl Scratch {
    /// Fingerprint every block of `new` into `new_hashes`, noting its zero blocks.
    fn fingerprint_all(&mut self, new: &Page, bs: BlockSize) {
        self.zero_blocks = hashes::blocks_hashes(
            new,
            bs,
            BlockMask::all(bs),
            self.zero_hash,
            &mut self.new_hashes,
        );
    }
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
            done: Done::default(),
            page_gate: Gate::default(),
            literal_gate: Gate::default(),
            scratch: Scratch {
                delta: vec![0; PAGE_SIZE + 64],
                blocks: Vec::with_capacity(PAGE_SIZE * 2),
                literals: Vec::with_capacity(PAGE_SIZE),
                pending: Vec::with_capacity(cfg.block_size.per_page()),
                general: vec![0; PAGE_SIZE + 64],
                packed: Vec::with_capacity(PAGE_SIZE + PAGE_SIZE / 8 + 64),
                new_hashes: vec![0; cfg.block_size.per_page()],
                zero_blocks: 0,
                zero_hash: hashes::zero_hash(cfg.block_size),
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

    /// The block fingerprints kept of what the backup holds (fgbi), if any.
    pub fn fingerprints(&self) -> Option<&BlockHashes> {
        self.hashes.as_ref()
    }

    /// The share index.
    pub fn share_index(&self) -> &ShareIndex {
        &self.index
    }

    /// Record that the backup holds `content` for `page` (initial sync, or a warm start):
    /// cache it, fingerprint it and index it as the mode needs.
    pub fn learn(&mut self, page: u64, content: &Page) {
        self.learn_inner(page, content);
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
        let n = batch.pages.len().min(batch.data.len() / PAGE_SIZE);
        self.done.start(&batch.pages[..n]);
        for i in 0..n {
            let page = batch.pages[i];
            let new = batch.page(i);
            let start = out.bytes.len();
            let encoding = self.encode_page(page, new, batch, &mut out.bytes);
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
            self.done.push(batch.pages, i);
        }
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
                    self.scratch.fingerprint_all(new, bs);
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
            self.scratch.new_hashes.fill(self.scratch.zero_hash);
            self.learn_fingerprinted(page, new, true, 0);
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
                    self.learn_changed(page, new, hashed, blocks);
                    return Encoding::Delta;
                }
                best = (Encoding::Delta, n);
            }
        }

        // Every block's fingerprint: the changed ones hashed, the others as stored.
        if !hashed {
            self.fingerprint(page, new, blocks);
        }
        // A page the backup already holds whole.
        let page_hash = hashes::combine(&self.scratch.new_hashes);
        let view = BatchView {
            done: &self.done,
            batch,
            cache: self.cache.as_ref(),
        };
        if let Some(q) = self.index.find_page(page_hash, new, page, &view) {
            varint::put_delta(out, page, q);
            self.learn_fingerprinted(page, new, false, page_hash);
            return Encoding::PageRef;
        }

        // Changed blocks, shared where possible. A random-looking page with no small
        // delta gains only from sharing: probe a few of its blocks before building all.
        // With a delta in hand, Blocks only wins through zero or shared blocks, or by
        // compressing a large delta's literals: probe before building it.
        // Whether the page looks random, sampled only if a decision needs it.
        let random = std::cell::OnceCell::new();
        let is_random = || *random.get_or_init(|| looks_random(new));
        let fingerprints = &self.scratch.new_hashes;
        let any_zero = self.scratch.zero_blocks & blocks.bits() != 0;
        let worth_blocks = match best.0 {
            Encoding::Delta => {
                best.1 > 2 * bs.bytes() + 16
                    && (best.1 > COMPRESS_MIN * 2
                        || any_zero
                        || probe_shared(
                            page,
                            new,
                            blocks,
                            bs,
                            fingerprints,
                            &mut self.index,
                            &view,
                        ))
            }
            // No delta: a random page gains only from sharing.
            _ => {
                any_zero
                    || !is_random()
                    || probe_shared(page, new, blocks, bs, fingerprints, &mut self.index, &view)
            }
        };
        if worth_blocks {
            let n = build_blocks(
                Target {
                    page,
                    new,
                    mask: blocks,
                    bs,
                    fingerprints,
                    zeros: self.scratch.zero_blocks,
                },
                &mut self.index,
                &view,
                Packer {
                    general: self.cfg.general,
                    gate: &mut self.literal_gate,
                    zlib: &mut self.scratch.zlib,
                    packed: &mut self.scratch.packed,
                },
                &mut self.scratch.literals,
                &mut self.scratch.pending,
                &mut self.stats,
                &mut self.scratch.blocks,
            );
            if n < best.1 {
                best = (Encoding::Blocks, n);
            }
        }

        // Whole-page compression, unless the page looks random or such attempts have
        // not been paying.
        if best.1 > COMPRESS_MIN * 2
            && self.cfg.general != GeneralCodec::None
            && !is_random()
            && self.page_gate.open(&mut self.stats)
        {
            let won = compress(
                self.cfg.general,
                new,
                &mut self.scratch.general,
                best.1.saturating_sub(2),
                &mut self.scratch.zlib,
            );
            self.page_gate.record(won.is_some(), &mut self.stats);
            if let Some(n) = won {
                best = (Encoding::General, n + 1);
            }
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
        self.learn_fingerprinted(page, new, false, page_hash);
        best.0
    }

    /// Fill the scratch fingerprints with those of every block of `new`: the stored ones
    /// of what the backup holds with the `changed` blocks rehashed, when they are stored;
    /// else every block hashed.
    fn fingerprint(&mut self, page: u64, new: &Page, changed: BlockMask) {
        let bs = self.cfg.block_size;
        let s = &mut self.scratch;
        match self.hashes.as_ref().and_then(|h| h.get(page)) {
            Some(old) => {
                s.new_hashes.copy_from_slice(old);
                s.zero_blocks =
                    hashes::blocks_hashes(new, bs, changed, s.zero_hash, &mut s.new_hashes);
            }
            None => s.fingerprint_all(new, bs),
        }
    }

    /// Update the cache (xbzrle: nothing else).
    fn remember(&mut self, page: u64, new: &Page) {
        if let Some(c) = &mut self.cache {
            c.insert(page, new);
        }
    }

    /// Learn a page that was sent with `changed` blocks changed, fingerprinting it first
    /// unless `hashed`.
    fn learn_changed(&mut self, page: u64, new: &Page, hashed: bool, changed: BlockMask) {
        if !hashed {
            self.fingerprint(page, new, changed);
        }
        let h = hashes::combine(&self.scratch.new_hashes);
        self.learn_fingerprinted(page, new, false, h);
    }

    fn learn_inner(&mut self, page: u64, new: &Page) {
        if self.cfg.mode != Mode::Fgbi {
            self.remember(page, new);
            return;
        }
        self.fingerprint(page, new, BlockMask::all(self.cfg.block_size));
        let h = hashes::combine(&self.scratch.new_hashes);
        self.learn_fingerprinted(page, new, is_zero(new), h);
    }

    /// After `page` was sent as `new`, whose block fingerprints are in the scratch: cache
    /// it, store the fingerprints, and index the whole page (`page_hash`) unless `zero`.
    fn learn_fingerprinted(&mut self, page: u64, new: &Page, zero: bool, page_hash: u64) {
        self.remember(page, new);
        if self.cfg.mode != Mode::Fgbi {
            return;
        }
        if let Some(h) = &mut self.hashes {
            h.store(page, &self.scratch.new_hashes);
        }
        if !zero {
            self.index.insert_page(page_hash, page);
        }
    }
}

/// Whether general compression at one site (whole pages, or `Blocks` literals) is worth
/// its CPU. While fewer than one in eight recent attempts there produced something small
/// enough to keep, only every eighth candidate is tried (which keeps measuring); the
/// record halves every 64 attempts, so a change in the guest's data is noticed.
#[derive(Debug, Default, Clone, Copy)]
struct Gate {
    tries: u32,
    wins: u32,
    skips: u32,
}

impl Gate {
    const WINDOW: u32 = 64;
    const MIN_TRIES: u32 = 16;
    const EVERY: u32 = 8;

    /// Whether to try this candidate (a skip is counted in `stats`).
    fn open(&mut self, stats: &mut EncodeStats) -> bool {
        if self.tries >= Self::MIN_TRIES && self.wins * Self::EVERY < self.tries {
            self.skips = self.skips.wrapping_add(1);
            if !self.skips.is_multiple_of(Self::EVERY) {
                stats.compress_skipped += 1;
                return false;
            }
        }
        true
    }

    /// The outcome of an attempt.
    fn record(&mut self, won: bool, stats: &mut EncodeStats) {
        stats.compress_tries += 1;
        stats.compress_wins += u64::from(won);
        self.tries += 1;
        self.wins += u32::from(won);
        if self.tries >= Self::WINDOW {
            self.tries /= 2;
            self.wins /= 2;
        }
    }
}

/// Whether one of the first few changed blocks (none of them zero) is shared.
fn probe_shared(
    page: u64,
    new: &Page,
    mask: BlockMask,
    bs: BlockSize,
    fingerprints: &[u64],
    index: &mut ShareIndex,
    view: &impl PageView,
) -> bool {
    const PROBES: usize = 4;
    mask.iter()
        .map(|b| (b, &new[bs.range(b)]))
        .take(PROBES)
        .any(|(b, blk)| {
            let me = BlockRef {
                page,
                block: b as u8,
            };
            index.find_block(fingerprints[b], blk, me, view).is_some()
        })
}

/// The page a `Blocks` record is built for.
struct Target<'a> {
    page: u64,
    new: &'a Page,
    mask: BlockMask,
    bs: BlockSize,
    /// Every block's fingerprint.
    fingerprints: &'a [u64],
    /// A bit per all-zero block (exact for the blocks of `mask`).
    zeros: u128,
}

/// How literals are compressed.
struct Packer<'a> {
    general: GeneralCodec,
    gate: &'a mut Gate,
    zlib: &'a mut flate2::Compress,
    packed: &'a mut Vec<u8>,
}

/// Build a `Blocks` payload into `out` and return its length.
#[allow(clippy::too_many_arguments)]
fn build_blocks(
    t: Target<'_>,
    index: &mut ShareIndex,
    view: &impl PageView,
    packer: Packer<'_>,
    literals: &mut Vec<u8>,
    pending: &mut Vec<(u64, u8)>,
    stats: &mut EncodeStats,
    out: &mut Vec<u8>,
) -> usize {
    let Target {
        page,
        new,
        mask,
        bs,
        fingerprints,
        zeros,
    } = t;
    out.clear();
    literals.clear();
    pending.clear();
    let mask_bytes = bs.per_page().div_ceil(8);
    out.extend_from_slice(&mask.bits().to_le_bytes()[..mask_bytes]);
    let tags_at = out.len();
    let changed = mask.changed();
    out.resize(tags_at + (changed * 2).div_ceil(8), 0);
    for (k, b) in mask.iter().enumerate() {
        let blk = &new[bs.range(b)];
        let tag = if zeros >> b & 1 == 1 {
            stats.zero_blocks += 1;
            TAG_ZERO
        } else {
            let h = fingerprints[b];
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
    for &(h, b) in pending.iter() {
        index.insert_block(h, page, b);
    }
    // Literals: raw, or compressed if that pays.
    if literals.len() >= COMPRESS_MIN
        && packer.general != GeneralCodec::None
        && !looks_random(literals)
        && packer.gate.open(stats)
    {
        let won = compress(
            packer.general,
            literals,
            packer.packed,
            literals.len() - 8,
            packer.zlib,
        );
        packer.gate.record(won.is_some(), stats);
        if let Some(n) = won {
            out.push(codec_byte(packer.general));
            out.extend_from_slice(&packer.packed[..n]);
            return out.len();
        }
    }
    out.push(CODEC_RAW);
    out.extend_from_slice(literals);
    out.len()
}
