//! `ha-bench codec`: encoder and decoder throughput and output size per mode, on the
//! generated page-pair cases and on page pairs captured from real guests.
//!
//! Every figure is measured in the same run as a `memcpy` of the same new pages, and
//! reported as a ratio to it. What the primary knows of each old page is set by `--cache`:
//! its content (`warm`), only its block hashes (`hashes`), or nothing (`cold`).

use crate::cases::PagePairs;
use ha_codec::PAGE_SIZE;
use ha_codec::block::{BlockSize, DiffMask, Page, SimdPath};
use ha_codec::cache::PageCache;
use ha_codec::codec::{
    self, Batch, CodecConfig, EncodedBatch, Encoding, GeneralCodec, Mode, PageEncoder,
};
use ha_codec::hashes::BlockHashes;
use ha_codec::share::PageView;
use ha_codec::xbzrle;
use ha_wire::stream::{EpochHeader, EpochWriter};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What the primary knows of the old pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Knowledge {
    /// The old content (a warm page cache).
    Warm,
    /// Only the old pages' block hashes.
    Hashes,
    /// Nothing.
    Cold,
}

/// What is measured: the bare XBZRLE encoder, or a full mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `xbzrle::encode` alone, budget one page (QEMU's encoder's job), with its page
    /// comparison on one SIMD path.
    Delta(SimdPath),
    /// A `PageEncoder` in this mode (its page comparisons on the best path).
    Mode(Mode),
}

impl Subject {
    /// Name in reports: the mode, or `delta/<path>`.
    pub fn name(self) -> &'static str {
        match self {
            Subject::Delta(SimdPath::Avx512) => "delta/avx512",
            Subject::Delta(SimdPath::Avx2) => "delta/avx2",
            Subject::Delta(SimdPath::Sse2) => "delta/sse2",
            Subject::Delta(SimdPath::Portable) => "delta/portable",
            Subject::Mode(m) => m.name(),
        }
    }

    /// The subject a `--mode` word names: a mode, `delta` (the best SIMD path this CPU
    /// has) or `delta/<path>`; a path this CPU cannot run is an error.
    pub fn parse(word: &str) -> Result<Self, String> {
        match word.split_once('/') {
            None if word == "delta" => Ok(Subject::Delta(SimdPath::best())),
            Some(("delta", path)) => {
                let p: SimdPath = path.parse()?;
                if !p.available() {
                    return Err(format!("this CPU cannot run the {} path", p.name()));
                }
                Ok(Subject::Delta(p))
            }
            _ => word
                .parse::<Mode>()
                .map(Subject::Mode)
                .map_err(|e| e.to_string()),
        }
    }
}

/// One benchmark row.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// Case or file name.
    pub case: String,
    /// Mode (or "delta" for the bare encoder).
    pub mode: &'static str,
    /// What the primary knew.
    pub cache: Knowledge,
    /// Block size.
    pub block_size: usize,
    /// Pages encoded.
    pub pages: usize,
    /// Input bytes (new pages).
    pub bytes_in: u64,
    /// Encoded payload bytes.
    pub bytes_out: u64,
    /// Bytes of the epoch stream carrying them (record headers and frames included).
    pub wire_bytes: u64,
    /// Encode throughput, GB/s of input.
    pub encode_gbps: f64,
    /// Decode throughput, GB/s of output pages.
    pub decode_gbps: f64,
    /// memcpy of the same new pages, GB/s, same run.
    pub memcpy_gbps: f64,
    /// encode_gbps / memcpy_gbps.
    pub encode_ratio: f64,
    /// True only if every decoded page was compared equal to its new page.
    pub roundtrip_ok: bool,
    /// Pages per encoding kind.
    pub kinds: HashMap<&'static str, u64>,
}

/// Benchmark settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// What the primary knows.
    pub knowledge: Knowledge,
    /// Block size for fgbi.
    pub block_size: BlockSize,
    /// General codec for fgbi.
    pub general: GeneralCodec,
    /// Timed repetitions (best is kept).
    pub reps: usize,
}

/// Page pairs plus the guest page index of each pair.
#[derive(Debug)]
pub struct Input {
    /// The pairs.
    pub pairs: PagePairs,
    /// Page index of each pair (distinct).
    pub index: Vec<u64>,
}

/// Best-of-`reps` time of `f`, which gets a fresh setup each time.
fn best_of<S>(
    reps: usize,
    mut setup: impl FnMut() -> S,
    mut f: impl FnMut(&mut S),
) -> (Duration, S) {
    let mut s = setup();
    let t = Instant::now();
    f(&mut s);
    let mut best = t.elapsed();
    for _ in 1..reps {
        s = setup();
        let t = Instant::now();
        f(&mut s);
        best = best.min(t.elapsed());
    }
    (best, s)
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

/// memcpy throughput of the new pages into a separate array.
pub fn memcpy_gbps(input: &Input, reps: usize) -> f64 {
    let src = &input.pairs.new;
    let mut dst = vec![0u8; src.len()];
    dst.copy_from_slice(src); // fault the pages in
    let (t, _) = best_of(
        reps,
        || (),
        |_| {
            for (d, s) in dst
                .chunks_exact_mut(PAGE_SIZE)
                .zip(src.chunks_exact(PAGE_SIZE))
            {
                d.copy_from_slice(std::hint::black_box(s));
            }
            std::hint::black_box(&mut dst);
        },
    );
    gbps(src.len() as u64, t)
}

/// Run one subject over one input.
pub fn run(input: &Input, subject: Subject, s: &Settings, memcpy: f64) -> Row {
    let pages = input.pairs.len();
    let bytes_in = (pages * PAGE_SIZE) as u64;
    let (encode_t, decode_t, bytes_out, wire_bytes, ok, kinds) = match subject {
        Subject::Delta(path) => run_delta(input, path, s.reps),
        Subject::Mode(mode) => run_mode(input, mode, s),
    };
    let encode_gbps = gbps(bytes_in, encode_t);
    Row {
        case: input.pairs.name.clone(),
        mode: subject.name(),
        cache: s.knowledge,
        block_size: s.block_size.bytes(),
        pages,
        bytes_in,
        bytes_out,
        wire_bytes,
        encode_gbps,
        decode_gbps: gbps(bytes_in, decode_t),
        memcpy_gbps: memcpy,
        encode_ratio: encode_gbps / memcpy,
        roundtrip_ok: ok,
        kinds,
    }
}

type Outcome = (
    Duration,
    Duration,
    u64,
    u64,
    bool,
    HashMap<&'static str, u64>,
);

fn page_of(bytes: &[u8], i: usize) -> &Page {
    bytes[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
        .try_into()
        .unwrap_or(&ha_codec::block::ZERO_PAGE)
}

/// The bare delta encoder: what QEMU's `xbzrle_encode_buffer` does for each pair.
fn run_delta(input: &Input, path: SimdPath, reps: usize) -> Outcome {
    let p = &input.pairs;
    let n = p.len();
    let mut lens = vec![0usize; n];
    let mut out = vec![0u8; n * (PAGE_SIZE + xbzrle::ENCODE_SLACK)];
    let stride = PAGE_SIZE + xbzrle::ENCODE_SLACK;
    let (enc_t, _) = best_of(
        reps,
        || (),
        |_| {
            for i in 0..n {
                let o = &mut out[i * stride..(i + 1) * stride];
                let (old, new) = (page_of(&p.old, i), page_of(&p.new, i));
                let mask = DiffMask::with_path(path, old, new);
                lens[i] =
                    xbzrle::encode_with_mask(&mask, new, o, PAGE_SIZE).map_or(usize::MAX, |l| l);
            }
        },
    );
    let mut kinds = HashMap::new();
    let mut bytes = 0u64;
    for &l in &lens {
        let k = match l {
            usize::MAX => "raw",
            0 => "unchanged",
            _ => "delta",
        };
        *kinds.entry(k).or_insert(0) += 1;
        bytes += if l == usize::MAX {
            PAGE_SIZE as u64
        } else {
            l as u64
        };
    }
    let (dec_t, pages) = best_of(
        reps,
        || p.old.clone(),
        |pages| {
            for i in 0..n {
                if lens[i] != usize::MAX {
                    let d = &out[i * stride..i * stride + lens[i]];
                    let _ = xbzrle::decode(d, &mut pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                }
            }
        },
    );
    let ok = (0..n).all(|i| lens[i] == usize::MAX || page_of(&pages, i) == page_of(&p.new, i));
    (enc_t, dec_t, bytes, bytes, ok, kinds)
}

/// A full mode: the encoder of the primary with the chosen knowledge, and the decoder of
/// the backup resolving references against its image.
fn run_mode(input: &Input, mode: Mode, s: &Settings) -> Outcome {
    let p = &input.pairs;
    let n = p.len();
    let max_page = input
        .index
        .iter()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1);
    let cfg = CodecConfig {
        mode,
        block_size: s.block_size,
        general: s.general,
        zlib_level: 1,
    };
    let setup = || {
        let cache = (s.knowledge == Knowledge::Warm && mode != Mode::Remus)
            .then(|| PageCache::lru((n * PAGE_SIZE).max(ha_codec::cache::DEFAULT_CACHE_BYTES)))
            .and_then(Result::ok);
        let hashes = (mode == Mode::Fgbi && s.knowledge != Knowledge::Cold)
            .then(|| BlockHashes::new(max_page, s.block_size));
        let mut enc = match PageEncoder::new(cfg, cache, hashes) {
            Ok(e) => e,
            Err(e) => panic!("codec config: {e}"),
        };
        for i in 0..n {
            match s.knowledge {
                Knowledge::Warm => enc.learn(input.index[i], page_of(&p.old, i)),
                Knowledge::Hashes => enc.learn_hashes(input.index[i], page_of(&p.old, i)),
                Knowledge::Cold => {}
            }
        }
        enc
    };
    // One output buffer, faulted in before timing and reused, like memcpy's destination.
    let mut out = EncodedBatch {
        records: Vec::with_capacity(n),
        bytes: vec![0u8; n * (PAGE_SIZE + 16)],
    };
    out.clear();
    let (enc_t, enc) = best_of(s.reps, setup, |enc| {
        out.clear();
        enc.encode_batch(
            Batch {
                pages: &input.index,
                data: &p.new,
            },
            &mut out,
        );
    });
    let mut kinds = HashMap::new();
    for e in Encoding::ALL {
        let k = enc.stats().kind(e);
        if k.pages > 0 {
            kinds.insert(e.name(), k.pages);
        }
    }
    // The stream the batch would travel in.
    let mut wire = Vec::with_capacity(out.bytes.len() + n * 8);
    let h = EpochHeader {
        epoch: 1,
        mode,
        block_size: s.block_size,
        records: EpochWriter::records_in(&out),
    };
    let mut w = EpochWriter::begin(&mut wire, h);
    w.pages(&mut wire, &out);
    let wire_ok = w.finish(&mut wire).is_ok();

    let pos: HashMap<u64, usize> = input
        .index
        .iter()
        .enumerate()
        .map(|(i, &pg)| (pg, i))
        .collect();
    let (dec_t, (img, errors)) = best_of(
        s.reps,
        || {
            (
                Image {
                    pos: &pos,
                    pages: p.old.clone(),
                },
                0usize,
            )
        },
        |(img, errors)| {
            let mut tmp: Page = [0u8; PAGE_SIZE];
            for r in &out.records {
                if r.encoding == Encoding::Unchanged {
                    continue;
                }
                let Some(&i) = pos.get(&r.page) else {
                    *errors += 1;
                    continue;
                };
                tmp.copy_from_slice(page_of(&img.pages, i));
                if codec::decode_page(
                    r.encoding,
                    out.payload(r),
                    r.page,
                    s.block_size,
                    &*img,
                    &mut tmp,
                )
                .is_err()
                {
                    *errors += 1;
                }
                img.pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&tmp);
            }
        },
    );
    let ok = wire_ok && errors == 0 && img.pages == p.new;
    (
        enc_t,
        dec_t,
        out.bytes.len() as u64,
        wire.len() as u64,
        ok,
        kinds,
    )
}

/// The backup's image during decoding, restricted to the pages of the input.
struct Image<'a> {
    pos: &'a HashMap<u64, usize>,
    pages: Vec<u8>,
}

impl PageView for Image<'_> {
    fn page(&self, page: u64) -> Option<&Page> {
        self.pos.get(&page).map(|&i| page_of(&self.pages, i))
    }
}
