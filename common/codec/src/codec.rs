//! Hybrid per-page encoding (the *encode* stage) and its decoder.
//!
//! Every dirty page is sent in one of these encodings, chosen per page:
//!
//! | encoding | payload | needs at the primary |
//! |---|---|---|
//! | `Zero` | nothing | — |
//! | `Unchanged` | not sent at all | old content or block hashes |
//! | `PageRef` | zigzag varint: source page − this page | an identical page the backup holds |
//! | `Delta` | XBZRLE delta against the backup's copy | old content (cache) |
//! | `Blocks` | changed-block mask, a 2-bit tag per changed block (literal / zero / ref), refs, literals (optionally compressed) | old content or block hashes (or nothing: all blocks) |
//! | `General` | codec byte + the page compressed by zlib (raw deflate) or lz4 | — |
//! | `Raw` | the 4096 bytes | — |
//!
//! Modes: `remus` sends every dirty page `Raw` (the baseline); `xbzrle` is QEMU's
//! behaviour (`Zero`, `Unchanged`, `Delta` against an LRU cache, else `Raw`); `fgbi` uses
//! all of them and keeps the smallest, without spending CPU on hopeless attempts.
//!
//! References resolve at the backup against the image as it stands *before* the record
//! is applied, with the epoch's earlier records already applied; the encoder confirms each
//! one against exactly that view ([`PageView`]).

use crate::PAGE_SIZE;
use crate::block::{BlockMask, BlockSize, DiffMask, Page, is_zero};
use crate::cache::PageCache;
use crate::hashes::{self, BlockHashes};
use crate::share::{BlockRef, PageView, ShareIndex};
use crate::{varint, xbzrle};
use std::collections::HashMap;

/// Errors decoding a page record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// An encoding byte that names no encoding.
    #[error("unknown page encoding {0}")]
    UnknownEncoding(u8),
    /// An encoding that never appears on the wire.
    #[error("encoding {0:?} cannot be sent")]
    NotSendable(Encoding),
    /// A payload of the wrong length or shape for its encoding.
    #[error("malformed {encoding:?} payload: {why}")]
    Malformed {
        /// The record's encoding.
        encoding: Encoding,
        /// What is wrong.
        why: &'static str,
    },
    /// An XBZRLE delta the decoder rejected.
    #[error("bad delta")]
    Delta(#[from] xbzrle::XbzrleError),
    /// A reference to a page the backup does not have.
    #[error("reference to page {0}, which is outside guest memory or the page itself")]
    BadRef(u64),
    /// A compressed payload that does not decompress to what it must.
    #[error("{codec} payload does not decompress to {expected} bytes")]
    Decompress {
        /// The general codec.
        codec: &'static str,
        /// Bytes it had to produce.
        expected: usize,
    },
}

/// Errors building an encoder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A mode or codec name that does not exist.
    #[error("unknown {what} {name:?} (expected one of: {expected})")]
    UnknownName {
        /// "mode" or "codec".
        what: &'static str,
        /// The name given.
        name: String,
        /// The names allowed.
        expected: &'static str,
    },
    /// A zlib level out of 0..=9.
    #[error("zlib level {0} is out of range 0..=9")]
    ZlibLevel(u32),
}

/// How pages are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Whole dirty pages, uncompressed: Remus's baseline.
    Remus = 0,
    /// XBZRLE delta against an LRU page cache, else raw: QEMU's behaviour.
    Xbzrle = 1,
    /// Fine-grained blocks, sharing and hybrid compression.
    Fgbi = 2,
}

impl Mode {
    /// All modes.
    pub const ALL: [Mode; 3] = [Mode::Remus, Mode::Xbzrle, Mode::Fgbi];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Remus => "remus",
            Mode::Xbzrle => "xbzrle",
            Mode::Fgbi => "fgbi",
        }
    }

    /// The mode with wire number `n`.
    pub fn from_u8(n: u8) -> Option<Self> {
        Self::ALL.get(usize::from(n)).copied()
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| ConfigError::UnknownName {
                what: "mode",
                name: s.to_string(),
                expected: "remus, xbzrle, fgbi",
            })
    }
}

/// The general-purpose compressor for pages (and literal blocks) with no usable delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GeneralCodec {
    /// zlib's deflate (raw, no header), through flate2's zlib-rs backend.
    Zlib,
    /// lz4 block format (lz4_flex): much faster, compresses less.
    Lz4,
    /// No general compression.
    None,
}

impl GeneralCodec {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            GeneralCodec::Zlib => "zlib",
            GeneralCodec::Lz4 => "lz4",
            GeneralCodec::None => "none",
        }
    }
}

impl std::str::FromStr for GeneralCodec {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [GeneralCodec::Zlib, GeneralCodec::Lz4, GeneralCodec::None]
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| ConfigError::UnknownName {
                what: "codec",
                name: s.to_string(),
                expected: "zlib, lz4, none",
            })
    }
}

/// Wire numbers of the general codecs inside `General` and `Blocks` payloads.
const CODEC_RAW: u8 = 0;
const CODEC_LZ4: u8 = 1;
const CODEC_ZLIB: u8 = 2;

/// How one page was encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[repr(u8)]
pub enum Encoding {
    /// All zero.
    Zero = 0,
    /// Equal to another page the backup holds.
    PageRef = 1,
    /// XBZRLE delta.
    Delta = 2,
    /// Changed blocks.
    Blocks = 3,
    /// Compressed whole page.
    General = 4,
    /// Uncompressed whole page.
    Raw = 5,
    /// Dirty but equal to the backup's copy: not sent.
    Unchanged = 6,
}

impl Encoding {
    /// All encodings, in wire order.
    pub const ALL: [Encoding; 7] = [
        Encoding::Zero,
        Encoding::PageRef,
        Encoding::Delta,
        Encoding::Blocks,
        Encoding::General,
        Encoding::Raw,
        Encoding::Unchanged,
    ];

    /// The encoding with wire number `n` (any, including `Unchanged`).
    pub fn from_u8(n: u8) -> Option<Self> {
        Self::ALL.get(usize::from(n)).copied()
    }

    /// Lowercase name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Zero => "zero",
            Encoding::PageRef => "pageref",
            Encoding::Delta => "delta",
            Encoding::Blocks => "blocks",
            Encoding::General => "general",
            Encoding::Raw => "raw",
            Encoding::Unchanged => "unchanged",
        }
    }
}

/// Encoder settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodecConfig {
    /// Encoding mode.
    pub mode: Mode,
    /// Block size for `Blocks` and block hashes.
    pub block_size: BlockSize,
    /// General-purpose compressor.
    pub general: GeneralCodec,
    /// zlib level (1 = fastest).
    pub zlib_level: u32,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Fgbi,
            block_size: BlockSize::DEFAULT,
            general: GeneralCodec::Zlib,
            zlib_level: 1,
        }
    }
}

/// Per-encoding counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KindStats {
    /// Pages.
    pub pages: u64,
    /// Payload bytes.
    pub bytes: u64,
}

/// What the encoder did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EncodeStats {
    /// Per encoding, indexed by `Encoding as usize`.
    pub kinds: [KindStats; 7],
    /// Blocks found changed (in `Blocks` records).
    pub changed_blocks: u64,
    /// Changed blocks sent as references.
    pub shared_blocks: u64,
    /// Changed blocks that were all zero.
    pub zero_blocks: u64,
    /// Changed blocks sent as literals.
    pub literal_blocks: u64,
}

impl EncodeStats {
    /// Pages encoded.
    pub fn pages(&self) -> u64 {
        self.kinds.iter().map(|k| k.pages).sum()
    }

    /// Payload bytes produced.
    pub fn bytes(&self) -> u64 {
        self.kinds.iter().map(|k| k.bytes).sum()
    }

    /// Counters of one encoding.
    pub fn kind(&self, e: Encoding) -> KindStats {
        self.kinds[e as usize]
    }

    /// Add another set of counters.
    pub fn add(&mut self, o: &EncodeStats) {
        for (a, b) in self.kinds.iter_mut().zip(&o.kinds) {
            a.pages += b.pages;
            a.bytes += b.bytes;
        }
        self.changed_blocks += o.changed_blocks;
        self.shared_blocks += o.shared_blocks;
        self.zero_blocks += o.zero_blocks;
        self.literal_blocks += o.literal_blocks;
    }
}

/// A batch of dirty pages to encode: page indices and their new content, contiguous.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// Page index of each page.
    pub pages: &'a [u64],
    /// `pages.len() * PAGE_SIZE` bytes of new content.
    pub data: &'a [u8],
}

impl<'a> Batch<'a> {
    /// The new content of the `i`-th page.
    pub fn page(&self, i: usize) -> &'a Page {
        // Length checked by `PageEncoder::encode_batch`.
        self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
            .try_into()
            .unwrap_or(&crate::block::ZERO_PAGE)
    }
}

/// One encoded page in an [`EncodedBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Page index.
    pub page: u64,
    /// Encoding chosen.
    pub encoding: Encoding,
    /// Payload offset in [`EncodedBatch::bytes`].
    pub start: usize,
    /// Payload length.
    pub len: usize,
}

/// The encoder's output for a batch: records and their payloads.
#[derive(Clone, Debug, Default)]
pub struct EncodedBatch {
    /// One record per page of the batch, in order (`Unchanged` ones included).
    pub records: Vec<Record>,
    /// Payload bytes, back to back.
    pub bytes: Vec<u8>,
}

impl EncodedBatch {
    /// The payload of a record.
    pub fn payload(&self, r: &Record) -> &[u8] {
        &self.bytes[r.start..r.start + r.len]
    }

    /// Empty, keeping allocations.
    pub fn clear(&mut self) {
        self.records.clear();
        self.bytes.clear();
    }
}

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
        let n = batch.pages.len().min(batch.data.len() / PAGE_SIZE);
        self.done.clear();
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

/// Tags of the blocks in a `Blocks` payload.
const TAG_LITERAL: u8 = 0;
const TAG_ZERO: u8 = 1;
const TAG_REF: u8 = 2;

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

fn codec_byte(c: GeneralCodec) -> u8 {
    match c {
        GeneralCodec::Zlib => CODEC_ZLIB,
        GeneralCodec::Lz4 => CODEC_LZ4,
        GeneralCodec::None => CODEC_RAW,
    }
}

/// A quick test for incompressible data: many distinct byte values in a sample.
fn looks_random(data: &[u8]) -> bool {
    let mut seen = [false; 256];
    let sample = data.iter().step_by((data.len() / 256).max(1)).take(256);
    let mut n = 0usize;
    let mut distinct = 0usize;
    for &b in sample {
        n += 1;
        if !seen[usize::from(b)] {
            seen[usize::from(b)] = true;
            distinct += 1;
        }
    }
    // 256 random bytes show ~162 distinct values; text shows ~30-60.
    n >= 64 && distinct * 2 > n
}

/// Room for any compressor's output on `n` input bytes (deflate and lz4 worst cases).
fn compress_bound(n: usize) -> usize {
    n + n / 8 + 64
}

/// Compress `input` into `out`; `Some(len)` only if the result fits in `limit` bytes.
///
/// The compressor always gets a buffer of [`compress_bound`] bytes and the size is checked
/// afterwards: zlib-rs has had bugs with output buffers that are just too short (a panic
/// in its bit buffer, and a stream that claims success but does not decode), so it is
/// never asked to stop early.
fn compress(
    codec: GeneralCodec,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
    zlib: &mut flate2::Compress,
) -> Option<usize> {
    let bound = compress_bound(input.len());
    if out.len() < bound {
        out.resize(bound, 0);
    }
    let n = match codec {
        GeneralCodec::None => return None,
        GeneralCodec::Lz4 => lz4_flex::block::compress_into(input, &mut out[..bound]).ok()?,
        GeneralCodec::Zlib => {
            zlib.reset();
            let status = zlib
                .compress(input, &mut out[..bound], flate2::FlushCompress::Finish)
                .ok()?;
            if status != flate2::Status::StreamEnd {
                return None;
            }
            usize::try_from(zlib.total_out()).ok()?
        }
    };
    (n <= limit).then_some(n)
}

/// Decompress a codec-tagged buffer into exactly `out.len()` bytes.
fn decompress(
    codec: u8,
    input: &[u8],
    out: &mut [u8],
    encoding: Encoding,
) -> Result<(), CodecError> {
    let expected = out.len();
    match codec {
        CODEC_RAW => {
            if input.len() != expected {
                return Err(CodecError::Malformed {
                    encoding,
                    why: "raw data of the wrong length",
                });
            }
            out.copy_from_slice(input);
            Ok(())
        }
        CODEC_LZ4 => match lz4_flex::block::decompress_into(input, out) {
            Ok(n) if n == expected => Ok(()),
            _ => Err(CodecError::Decompress {
                codec: "lz4",
                expected,
            }),
        },
        CODEC_ZLIB => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(flate2::Status::StreamEnd)
                    if d.total_out() as usize == expected
                        && d.total_in() as usize == input.len() =>
                {
                    Ok(())
                }
                _ => Err(CodecError::Decompress {
                    codec: "zlib",
                    expected,
                }),
            }
        }
        _ => Err(CodecError::Malformed {
            encoding,
            why: "unknown codec byte",
        }),
    }
}

/// Decode one page record into `out`, which holds the backup's current content of `page`
/// on entry. References resolve through `view` (the image before this record).
/// On error `out` may be partly written: decode into a copy.
pub fn decode_page(
    encoding: Encoding,
    payload: &[u8],
    page: u64,
    bs: BlockSize,
    view: &impl PageView,
    out: &mut Page,
) -> Result<(), CodecError> {
    let malformed = |why| CodecError::Malformed { encoding, why };
    match encoding {
        Encoding::Zero => {
            if !payload.is_empty() {
                return Err(malformed("zero page with a payload"));
            }
            out.fill(0);
        }
        Encoding::Raw => {
            if payload.len() != PAGE_SIZE {
                return Err(malformed("raw page is not 4096 bytes"));
            }
            out.copy_from_slice(payload);
        }
        Encoding::Delta => {
            xbzrle::decode(payload, out)?;
        }
        Encoding::PageRef => {
            let (q, n) = varint::get_delta(payload, page).ok_or(malformed("bad page reference"))?;
            if n != payload.len() {
                return Err(malformed("trailing bytes after page reference"));
            }
            if q == page {
                return Err(CodecError::BadRef(q));
            }
            out.copy_from_slice(view.page(q).ok_or(CodecError::BadRef(q))?);
        }
        Encoding::General => {
            let (&codec, data) = payload.split_first().ok_or(malformed("empty payload"))?;
            if codec == CODEC_RAW {
                return Err(malformed("general page without a codec"));
            }
            decompress(codec, data, out, encoding)?;
        }
        Encoding::Blocks => decode_blocks(payload, page, bs, view, out)?,
        Encoding::Unchanged => return Err(CodecError::NotSendable(encoding)),
    }
    Ok(())
}

fn decode_blocks(
    payload: &[u8],
    page: u64,
    bs: BlockSize,
    view: &impl PageView,
    out: &mut Page,
) -> Result<(), CodecError> {
    let malformed = |why| CodecError::Malformed {
        encoding: Encoding::Blocks,
        why,
    };
    let per = bs.per_page();
    let mask_bytes = per.div_ceil(8);
    let raw_mask = payload
        .get(..mask_bytes)
        .ok_or(malformed("short block mask"))?;
    let mut bits = [0u8; 16];
    bits[..mask_bytes].copy_from_slice(raw_mask);
    let raw_bits = u128::from_le_bytes(bits);
    let mask = BlockMask::from_bits(raw_bits, bs);
    if mask.bits() != raw_bits {
        return Err(malformed("block mask has bits past the last block"));
    }
    let changed = mask.changed();
    let tags_len = (changed * 2).div_ceil(8);
    let tags = payload
        .get(mask_bytes..mask_bytes + tags_len)
        .ok_or(malformed("short tags"))?;
    let mut at = mask_bytes + tags_len;
    // First pass: references and zero blocks, counting literals.
    let mut literal_blocks = Vec::with_capacity(changed);
    let mut refs = Vec::new();
    for (k, b) in mask.iter().enumerate() {
        match tags[k / 4] >> (2 * (k % 4)) & 3 {
            TAG_LITERAL => literal_blocks.push(b),
            TAG_ZERO => out[bs.range(b)].fill(0),
            TAG_REF => {
                let (q, n) = varint::get_delta(&payload[at..], page)
                    .ok_or(malformed("bad block reference"))?;
                at += n;
                let &c = payload.get(at).ok_or(malformed("short block reference"))?;
                at += 1;
                if usize::from(c) >= per {
                    return Err(malformed("block reference past the page"));
                }
                if q == page && usize::from(c) == b {
                    return Err(CodecError::BadRef(q));
                }
                refs.push((b, q, usize::from(c)));
            }
            _ => return Err(malformed("unknown block tag")),
        }
    }
    // References read the view before this record: resolve them before writing literals
    // (a reference may name a block of this same page).
    for &(b, q, c) in &refs {
        let src = view.page(q).ok_or(CodecError::BadRef(q))?;
        let blk: [u8; 1024] = {
            let mut t = [0u8; 1024];
            t[..bs.bytes()].copy_from_slice(&src[bs.range(c)]);
            t
        };
        out[bs.range(b)].copy_from_slice(&blk[..bs.bytes()]);
    }
    let (&codec, data) = payload
        .get(at..)
        .and_then(<[u8]>::split_first)
        .ok_or(malformed("missing literal section"))?;
    let mut lits = vec![0u8; literal_blocks.len() * bs.bytes()];
    if codec == CODEC_RAW && data.len() != lits.len() {
        return Err(malformed("literal bytes do not match the literal blocks"));
    }
    decompress(codec, data, &mut lits, Encoding::Blocks)?;
    for (k, &b) in literal_blocks.iter().enumerate() {
        out[bs.range(b)].copy_from_slice(&lits[k * bs.bytes()..(k + 1) * bs.bytes()]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the primary knows of the backup's pages before the batch.
    #[derive(Clone, Copy, Debug)]
    enum Knows {
        Warm,
        Hashes,
        Cold,
    }

    struct Image(Vec<Page>);
    impl PageView for Image {
        fn page(&self, page: u64) -> Option<&Page> {
            self.0.get(usize::try_from(page).ok()?)
        }
    }

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Old pages and a new version of some of them, exercising every encoding: zero pages,
    /// copies of other pages, copied and zeroed blocks, small edits, text, random data.
    fn scenario(seed: u64, pages: usize) -> (Vec<Page>, Vec<u64>, Vec<u8>) {
        let mut r = rng(seed);
        let mut old = vec![[0u8; PAGE_SIZE]; pages];
        for p in old.iter_mut() {
            match r() % 4 {
                0 => {}
                1 => p
                    .iter_mut()
                    .for_each(|b| *b = b"the quick page "[(r() % 15) as usize]),
                _ => p.iter_mut().for_each(|b| *b = r() as u8),
            }
        }
        let mut idx = Vec::new();
        let mut data = Vec::new();
        for i in 0..pages {
            if r().is_multiple_of(3) {
                continue;
            }
            let mut new = old[i];
            match r() % 8 {
                0 => new = [0; PAGE_SIZE],
                1 => new = old[(r() % pages as u64) as usize],
                2 => {
                    let n = (r() % 16) as usize;
                    for _ in 0..n {
                        let at = (r() % PAGE_SIZE as u64) as usize;
                        new[at] = new[at].wrapping_add(1 + (r() % 255) as u8);
                    }
                }
                3 => {
                    let src = old[(r() % pages as u64) as usize];
                    let (a, b) = ((r() % 4096) as usize & !63, (r() % 4096) as usize & !63);
                    let len = 64 * (1 + (r() % 8) as usize);
                    let len = len.min(PAGE_SIZE - a).min(PAGE_SIZE - b);
                    new[b..b + len].copy_from_slice(&src[a..a + len]);
                }
                4 => new[(r() % 4000) as usize..].fill(0),
                5 => new.iter_mut().for_each(|b| *b = r() as u8),
                6 => new
                    .iter_mut()
                    .for_each(|b| *b = b"abc "[(r() % 4) as usize]),
                _ => {}
            }
            idx.push(i as u64);
            data.extend_from_slice(&new);
        }
        (old, idx, data)
    }

    fn encoder(cfg: CodecConfig, knows: Knows, old: &[Page]) -> PageEncoder {
        let cache = matches!(knows, Knows::Warm).then(|| PageCache::shadow(old.len()));
        let hashes = (cfg.mode == Mode::Fgbi && !matches!(knows, Knows::Cold))
            .then(|| BlockHashes::new(old.len(), cfg.block_size));
        let mut enc = PageEncoder::new(cfg, cache, hashes).unwrap();
        for (p, content) in old.iter().enumerate() {
            match knows {
                Knows::Warm => enc.learn(p as u64, content),
                Knows::Hashes => enc.learn_hashes(p as u64, content),
                Knows::Cold => {}
            }
        }
        enc
    }

    /// Encode a batch and apply it at a simulated backup; return the backup's image.
    fn roundtrip(
        cfg: CodecConfig,
        knows: Knows,
        old: &[Page],
        idx: &[u64],
        data: &[u8],
    ) -> (Vec<Page>, EncodedBatch) {
        let mut enc = encoder(cfg, knows, old);
        let mut out = EncodedBatch::default();
        enc.encode_batch(Batch { pages: idx, data }, &mut out);
        let mut image = Image(old.to_vec());
        for r in &out.records {
            if r.encoding == Encoding::Unchanged {
                continue;
            }
            let mut pg = image.0[r.page as usize];
            decode_page(
                r.encoding,
                out.payload(r),
                r.page,
                cfg.block_size,
                &image,
                &mut pg,
            )
            .unwrap_or_else(|e| panic!("page {} {:?}: {e}", r.page, r.encoding));
            image.0[r.page as usize] = pg;
        }
        assert_eq!(enc.stats().pages(), idx.len() as u64);
        (image.0, out)
    }

    fn expected(old: &[Page], idx: &[u64], data: &[u8]) -> Vec<Page> {
        let mut want = old.to_vec();
        for (k, &p) in idx.iter().enumerate() {
            want[p as usize].copy_from_slice(&data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
        }
        want
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn every_mode_and_block_size_roundtrips(seed in any::<u64>(), shift in 5u32..=10, general in 0usize..3) {
            let (old, idx, data) = scenario(seed, 24);
            let want = expected(&old, &idx, &data);
            for mode in Mode::ALL {
                for knows in [Knows::Warm, Knows::Hashes, Knows::Cold] {
                    let cfg = CodecConfig {
                        mode,
                        block_size: BlockSize::new(1 << shift).unwrap(),
                        general: [GeneralCodec::Zlib, GeneralCodec::Lz4, GeneralCodec::None][general],
                        zlib_level: 1,
                    };
                    let (got, _) = roundtrip(cfg, knows, &old, &idx, &data);
                    prop_assert!(got == want, "{:?} {:?} {:?}", mode, knows, cfg);
                }
            }
        }

        #[test]
        fn decoder_never_panics_on_garbage(
            enc in 0u8..8,
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            shift in 5u32..=10,
            page in 0u64..6,
        ) {
            let image = Image(vec![[3u8; PAGE_SIZE]; 4]);
            let mut out = [1u8; PAGE_SIZE];
            if let Some(e) = Encoding::from_u8(enc) {
                let _ = decode_page(e, &payload, page, BlockSize::new(1 << shift).unwrap(), &image, &mut out);
            }
        }
    }

    #[test]
    fn fgbi_shares_pages_and_blocks_and_never_loses_to_xbzrle() {
        let (old, idx, data) = scenario(42, 64);
        let mut sizes = Vec::new();
        for mode in Mode::ALL {
            let (_, out) = roundtrip(
                CodecConfig {
                    mode,
                    ..Default::default()
                },
                Knows::Warm,
                &old,
                &idx,
                &data,
            );
            sizes.push(out.bytes.len());
            if mode == Mode::Fgbi {
                let kinds: Vec<_> = out.records.iter().map(|r| r.encoding).collect();
                assert!(kinds.contains(&Encoding::PageRef), "{kinds:?}");
                assert!(kinds.contains(&Encoding::Blocks), "{kinds:?}");
            }
        }
        assert!(sizes[2] <= sizes[1] && sizes[1] <= sizes[0], "{sizes:?}");
    }

    #[test]
    fn xbzrle_mode_is_qemu_shaped() {
        let old = vec![[7u8; PAGE_SIZE]; 3];
        let mut data = Vec::new();
        let mut a = old[0];
        a[10] = 1;
        data.extend_from_slice(&a);
        data.extend_from_slice(&old[1]);
        data.extend_from_slice(&[0u8; PAGE_SIZE]);
        let cfg = CodecConfig {
            mode: Mode::Xbzrle,
            ..Default::default()
        };
        let (_, out) = roundtrip(cfg, Knows::Warm, &old, &[0, 1, 2], &data);
        let kinds: Vec<_> = out.records.iter().map(|r| r.encoding).collect();
        assert_eq!(
            kinds,
            vec![Encoding::Delta, Encoding::Unchanged, Encoding::Zero]
        );
        assert_eq!(out.payload(&out.records[0]), &[10, 1, 1]);
        let (_, out) = roundtrip(cfg, Knows::Cold, &old, &[0, 1, 2], &data);
        let kinds: Vec<_> = out.records.iter().map(|r| r.encoding).collect();
        assert_eq!(kinds, vec![Encoding::Raw, Encoding::Raw, Encoding::Zero]);
    }

    #[test]
    fn decode_rejections_are_specific() {
        let image = Image(vec![[3u8; PAGE_SIZE]; 2]);
        let bs = BlockSize::DEFAULT;
        let mut out = [0u8; PAGE_SIZE];
        let dec = |e, p: &[u8], out: &mut Page| decode_page(e, p, 0, bs, &image, out);
        assert!(matches!(
            dec(Encoding::Zero, &[1], &mut out),
            Err(CodecError::Malformed { .. })
        ));
        assert!(matches!(
            dec(Encoding::Raw, &[0; 10], &mut out),
            Err(CodecError::Malformed { .. })
        ));
        // PageRef to itself, and past the image.
        assert_eq!(
            dec(Encoding::PageRef, &[0], &mut out),
            Err(CodecError::BadRef(0))
        );
        assert_eq!(
            dec(Encoding::PageRef, &[4], &mut out),
            Err(CodecError::BadRef(2))
        );
        assert_eq!(dec(Encoding::PageRef, &[2], &mut out), Ok(()));
        assert_eq!(out, [3u8; PAGE_SIZE]);
        assert_eq!(
            dec(Encoding::Unchanged, &[], &mut out),
            Err(CodecError::NotSendable(Encoding::Unchanged))
        );
        assert!(matches!(
            dec(Encoding::General, &[2, 1, 2, 3], &mut out),
            Err(CodecError::Decompress { .. })
        ));
        assert!(matches!(
            dec(Encoding::Delta, &[0, 9, 1], &mut out),
            Err(CodecError::Delta(_))
        ));
        // Blocks: one changed block, literal, but the literal bytes are short.
        let mut p = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, CODEC_RAW];
        p.extend_from_slice(&[5; 63]);
        assert!(matches!(
            dec(Encoding::Blocks, &p, &mut out),
            Err(CodecError::Malformed { .. })
        ));
        p.push(5);
        assert_eq!(dec(Encoding::Blocks, &p, &mut out), Ok(()));
        assert_eq!(&out[..64], &[5; 64]);
        // 1024-byte blocks: 4 blocks, one mask byte; bit 4 names no block.
        let big = BlockSize::new(1024).unwrap();
        let r = decode_page(
            Encoding::Blocks,
            &[0x10, 0, CODEC_RAW],
            0,
            big,
            &image,
            &mut out,
        );
        assert!(
            matches!(
                r,
                Err(CodecError::Malformed {
                    why: "block mask has bits past the last block",
                    ..
                })
            ),
            "{r:?}"
        );
        assert_eq!(Encoding::from_u8(7), None);
    }

    /// Compression under tight budgets never panics, never exceeds the budget, and what it
    /// returns always decompresses to the input. (zlib-rs once panicked when deflate was
    /// handed an output buffer of just the budget's size.)
    #[test]
    fn compression_under_every_budget_is_exact_or_refused() {
        let mut r = rng(5);
        let mut zlib = flate2::Compress::new(flate2::Compression::new(1), false);
        let mut out = Vec::new();
        for case in 0..40 {
            let len = [4096, 3072, 640, 64][case % 4];
            let mut input = vec![0u8; len];
            match case % 3 {
                // Mostly zero blocks with a random word here and there (guest heaps).
                0 => {
                    for _ in 0..(r() % 64) {
                        let at = (r() as usize % (len / 8)) * 8;
                        input[at..at + 8].copy_from_slice(&r().to_le_bytes());
                    }
                }
                1 => input
                    .iter_mut()
                    .for_each(|b| *b = b"memory page kernel "[(r() % 19) as usize]),
                _ => input.iter_mut().for_each(|b| *b = r() as u8),
            }
            for codec in [GeneralCodec::Zlib, GeneralCodec::Lz4] {
                let mut budgets: Vec<usize> = (0..len + 600).step_by(7).collect();
                budgets.extend([1, 2, 3, 8, 16, 31, 32, 33]);
                for limit in budgets {
                    if let Some(n) = compress(codec, &input, &mut out, limit, &mut zlib) {
                        assert!(n <= limit, "{codec:?} {n} > {limit}");
                        let mut back = vec![0u8; len];
                        decompress(codec_byte(codec), &out[..n], &mut back, Encoding::General)
                            .unwrap_or_else(|e| panic!("{codec:?} case {case} limit {limit}: {e}"));
                        assert!(back == input, "{codec:?} case {case} limit {limit}");
                    }
                }
            }
        }
    }

    #[test]
    fn config_names_and_errors() {
        assert_eq!("fgbi".parse::<Mode>(), Ok(Mode::Fgbi));
        let e = "lzma".parse::<GeneralCodec>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown codec \"lzma\" (expected one of: zlib, lz4, none)"
        );
        let cfg = CodecConfig {
            zlib_level: 12,
            ..Default::default()
        };
        assert_eq!(
            PageEncoder::new(cfg, None, None).err(),
            Some(ConfigError::ZlibLevel(12))
        );
    }
}
