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
//! one against exactly that view ([`PageView`](crate::share::PageView)).
//!
//! | module | what |
//! |---|---|
//! | this one | the session-level types: [`Mode`], [`CodecConfig`], [`Encoding`], [`Batch`], [`Record`], [`EncodedBatch`], the errors |
//! | `encode` | [`PageEncoder`]: the primary's choice of encoding per page |
//! | `decode` | [`decode_page`]: the backup's side |
//! | `general` | [`GeneralCodec`]: zlib / lz4 compression of pages and literal blocks |
//! | `stats` | [`EncodeStats`]: what the encoder did |
//! | [`disk`] | the content of disk records: zero, general codec or raw |
//!
//! Everything is re-exported here: callers name it `ha_codec::codec::X`.

use crate::PAGE_SIZE;
use crate::block::{BlockSize, Page};
use crate::xbzrle;

mod decode;
pub mod disk;
mod encode;
mod general;
mod stats;

pub use decode::decode_page;
pub use encode::PageEncoder;
pub use general::GeneralCodec;
pub use stats::{EncodeStats, KindStats};

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

/// Tags of the blocks in a `Blocks` payload.
const TAG_LITERAL: u8 = 0;
const TAG_ZERO: u8 = 1;
const TAG_REF: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::PageCache;
    use crate::hashes::BlockHashes;
    use crate::share::PageView;
    use proptest::prelude::*;

    /// What the primary knows of the backup's pages before the batch.
    #[derive(Clone, Copy, Debug)]
    enum Knows {
        Warm,
        Hashes,
        Cold,
    }

    pub(super) struct Image(pub(super) Vec<Page>);
    impl PageView for Image {
        fn page(&self, page: u64) -> Option<&Page> {
            self.0.get(usize::try_from(page).ok()?)
        }
    }

    pub(super) fn rng(seed: u64) -> impl FnMut() -> u64 {
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
        let (idx, data) = dirty(&old, &mut r);
        (old, idx, data)
    }

    /// A new version of some of `old`'s pages: their indices and content.
    fn dirty(old: &[Page], r: &mut impl FnMut() -> u64) -> (Vec<u64>, Vec<u8>) {
        let pages = old.len();
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
        (idx, data)
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

    /// Apply an encoded batch at a simulated backup.
    fn apply(image: &mut Image, out: &EncodedBatch, bs: BlockSize) {
        for r in &out.records {
            if r.encoding == Encoding::Unchanged {
                continue;
            }
            let mut pg = image.0[r.page as usize];
            decode_page(r.encoding, out.payload(r), r.page, bs, &*image, &mut pg)
                .unwrap_or_else(|e| panic!("page {} {:?}: {e}", r.page, r.encoding));
            image.0[r.page as usize] = pg;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// fgbi keeps what it knows of the backup across epochs: a content cache small
        /// enough to evict (so evicted pages are diffed through their stored fingerprints)
        /// and fingerprints updated only where blocks changed. After every epoch the
        /// backup's image is the primary's memory, and every stored fingerprint is the
        /// fingerprint of what the backup holds.
        #[test]
        fn fgbi_keeps_the_backup_exact_over_many_epochs(seed in any::<u64>(), shift in 5u32..=8) {
            let pages = 32;
            let bs = BlockSize::new(1 << shift).unwrap();
            let cfg = CodecConfig { mode: Mode::Fgbi, block_size: bs, ..Default::default() };
            let (mut truth, _, _) = scenario(seed, pages);
            let cache = PageCache::lru(8 * PAGE_SIZE).unwrap();
            let mut enc = PageEncoder::new(cfg, Some(cache), Some(BlockHashes::new(pages, bs))).unwrap();
            for (p, c) in truth.iter().enumerate() {
                enc.learn(p as u64, c);
            }
            let mut image = Image(truth.clone());
            let mut r = rng(seed ^ 0x5eed);
            let mut want = vec![0u64; bs.per_page()];
            for epoch in 0..8 {
                let (idx, data) = dirty(&truth, &mut r);
                let mut out = EncodedBatch::default();
                enc.encode_batch(Batch { pages: &idx, data: &data }, &mut out);
                apply(&mut image, &out, bs);
                truth = expected(&truth, &idx, &data);
                prop_assert!(image.0 == truth, "epoch {}", epoch);
                let stored = enc.fingerprints().unwrap();
                for (p, content) in image.0.iter().enumerate() {
                    crate::hashes::page_hashes(content, bs, &mut want);
                    prop_assert_eq!(stored.get(p as u64), Some(&want[..]), "epoch {} page {}", epoch, p);
                }
            }
        }
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
