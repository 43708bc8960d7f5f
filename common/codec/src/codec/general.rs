//! General-purpose compression of whole pages and literal blocks: zlib (raw deflate,
//! flate2's zlib-rs backend) or lz4 (block format), and the codec byte that names the
//! choice inside `General` and `Blocks` payloads.

use super::{CodecError, ConfigError, Encoding};

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
pub(super) const CODEC_RAW: u8 = 0;
pub(super) const CODEC_LZ4: u8 = 1;
pub(super) const CODEC_ZLIB: u8 = 2;

pub(super) fn codec_byte(c: GeneralCodec) -> u8 {
    match c {
        GeneralCodec::Zlib => CODEC_ZLIB,
        GeneralCodec::Lz4 => CODEC_LZ4,
        GeneralCodec::None => CODEC_RAW,
    }
}

/// A quick test for incompressible data: many distinct byte values in a sample.
pub(super) fn looks_random(data: &[u8]) -> bool {
    // One bit per byte value seen, in four words kept in registers and set without
    // branches: this sample is the hot part of deciding whether a page is worth
    // compressing, and an indexed array would serialise on its stores.
    let mut seen = [0u64; 4];
    let sample = data.iter().step_by((data.len() / 256).max(1)).take(256);
    let mut n = 0usize;
    for &b in sample {
        n += 1;
        let bit = 1u64 << (b & 63);
        let q = b >> 6;
        for (k, w) in seen.iter_mut().enumerate() {
            *w |= bit & u64::from(q == k as u8).wrapping_neg();
        }
    }
    let distinct = seen.iter().map(|w| w.count_ones() as usize).sum::<usize>();
    // 256 random bytes show ~162 distinct values; text shows ~30-60.
    n >= 64 && distinct * 2 > n
}

fn compress_bound(n: usize) -> usize {
    n + n / 8 + 64
}

/// Compress `input` into `out`; `Some(len)` only if the result fits in `limit` bytes.
///
/// The compressor always gets a buffer of [`compress_bound`] bytes and the size is checked
/// afterwards: zlib-rs has had bugs with output buffers that are just too short (a panic
/// in its bit buffer, and a stream that claims success but does not decode), so it is
/// never asked to stop early.
pub(super) fn compress(
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
pub(super) fn decompress(
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

#[cfg(test)]
mod tests {
    use super::super::tests::rng;
    use super::*;

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
}
