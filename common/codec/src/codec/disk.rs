//! Disk data through the codec: the content of one disk record (a run of 512-byte sectors
//! a guest wrote), encoded the cheapest way that is exact.
//!
//! | encoding | n | payload |
//! |---|---|---|
//! | `Zero` | 0 | empty: the sectors become zeros |
//! | `General` | 1 | `u8 codec` (1 lz4 block format, 2 raw deflate) + the data compressed, which must decompress to exactly the record's bytes |
//! | `Raw` | 2 | the bytes |
//!
//! The wire (`ha_wire::stream`) frames the records and checks their sectors against the
//! disk; this module only turns bytes into a payload and back. The encoder cuts a write
//! into chunks of at most [`CHUNK`] bytes, so a mostly-zero write sends its zero pages as
//! `Zero` records and compresses the rest page by page.

use super::general::{codec_byte, compress, decompress, looks_random};
use super::{CodecError, Encoding, GeneralCodec};
use crate::block::is_zero;

/// Bytes in a sector: disk records cover whole sectors.
pub const SECTOR: usize = 512;
/// The encoder's chunk: a write is sent as records of at most this many bytes.
pub const CHUNK: usize = 4096;
/// The largest record a decoder accepts, in sectors (64 KiB).
pub const MAX_RECORD_SECTORS: u64 = 128;

/// Why a disk record's payload does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskCodecError {
    /// An encoding byte that names no disk encoding.
    #[error("unknown disk encoding {0}")]
    UnknownEncoding(u8),
    /// A `Zero` record with a payload.
    #[error("zero disk record carries {0} payload bytes")]
    ZeroPayload(usize),
    /// A `Raw` record whose payload is not the record's length.
    #[error("raw disk record of {got} bytes, expected {expected}")]
    RawLength {
        /// Payload bytes.
        got: usize,
        /// The record's bytes.
        expected: usize,
    },
    /// A `General` payload that does not decompress to the record's length.
    #[error("compressed disk record does not decode")]
    General(#[source] CodecError),
}

/// How one disk record's content is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DiskEncoding {
    /// All zero: no payload.
    Zero = 0,
    /// Compressed by the session's general codec.
    General = 1,
    /// As is.
    Raw = 2,
}

impl DiskEncoding {
    /// The encoding of a wire byte.
    pub fn from_u8(n: u8) -> Result<Self, DiskCodecError> {
        match n {
            0 => Ok(Self::Zero),
            1 => Ok(Self::General),
            2 => Ok(Self::Raw),
            _ => Err(DiskCodecError::UnknownEncoding(n)),
        }
    }
}

/// The primary's disk encoder: zero detection, then the general codec when it shrinks the
/// data, else raw.
pub struct DiskEncoder {
    codec: GeneralCodec,
    zlib: flate2::Compress,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for DiskEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskEncoder")
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl DiskEncoder {
    /// An encoder compressing with `codec` (zlib at `zlib_level`, clamped to 0..=9).
    pub fn new(codec: GeneralCodec, zlib_level: u32) -> Self {
        Self {
            codec,
            zlib: flate2::Compress::new(flate2::Compression::new(zlib_level.min(9)), false),
            scratch: Vec::new(),
        }
    }

    /// Append the payload of `data` (one record's bytes) to `out`; returns its encoding.
    pub fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> DiskEncoding {
        if is_zero(data) {
            return DiskEncoding::Zero;
        }
        if self.codec != GeneralCodec::None && !looks_random(data) {
            // Worth it only when the codec byte and the compressed data are smaller.
            let limit = data.len().saturating_sub(2);
            if let Some(n) = compress(self.codec, data, &mut self.scratch, limit, &mut self.zlib) {
                out.push(codec_byte(self.codec));
                out.extend_from_slice(&self.scratch[..n]);
                return DiskEncoding::General;
            }
        }
        out.extend_from_slice(data);
        DiskEncoding::Raw
    }
}

/// Decode a record's payload into `out` (exactly the record's bytes).
pub fn decode(enc: DiskEncoding, payload: &[u8], out: &mut [u8]) -> Result<(), DiskCodecError> {
    match enc {
        DiskEncoding::Zero => {
            if !payload.is_empty() {
                return Err(DiskCodecError::ZeroPayload(payload.len()));
            }
            out.fill(0);
            Ok(())
        }
        DiskEncoding::Raw => {
            if payload.len() != out.len() {
                return Err(DiskCodecError::RawLength {
                    got: payload.len(),
                    expected: out.len(),
                });
            }
            out.copy_from_slice(payload);
            Ok(())
        }
        DiskEncoding::General => {
            let (&codec, data) =
                payload
                    .split_first()
                    .ok_or(DiskCodecError::General(CodecError::Malformed {
                        encoding: Encoding::General,
                        why: "no codec byte",
                    }))?;
            if codec == super::general::CODEC_RAW {
                // Raw inside General is what the Raw encoding is for.
                return Err(DiskCodecError::General(CodecError::Malformed {
                    encoding: Encoding::General,
                    why: "raw codec byte",
                }));
            }
            decompress(codec, data, out, Encoding::General).map_err(DiskCodecError::General)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(codec: GeneralCodec, data: &[u8]) -> DiskEncoding {
        let mut e = DiskEncoder::new(codec, 1);
        let mut payload = Vec::new();
        let enc = e.encode(data, &mut payload);
        let mut back = vec![0xAAu8; data.len()];
        decode(enc, &payload, &mut back).unwrap();
        assert_eq!(back, data);
        enc
    }

    #[test]
    fn zero_compressible_and_random_data_roundtrip_in_their_encoding() {
        assert_eq!(
            roundtrip(GeneralCodec::Zlib, &[0u8; 4096]),
            DiskEncoding::Zero
        );
        let text: Vec<u8> = b"key=value; ".iter().cycle().take(4096).copied().collect();
        assert_eq!(roundtrip(GeneralCodec::Zlib, &text), DiskEncoding::General);
        assert_eq!(roundtrip(GeneralCodec::Lz4, &text), DiskEncoding::General);
        assert_eq!(roundtrip(GeneralCodec::None, &text), DiskEncoding::Raw);
        let mut s = 0x1234_5678_9abc_def0u64;
        let random: Vec<u8> = (0..512)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        assert_eq!(roundtrip(GeneralCodec::Zlib, &random), DiskEncoding::Raw);
    }

    #[test]
    fn bad_payloads_are_refused() {
        let mut out = [0u8; 512];
        assert_eq!(
            DiskEncoding::from_u8(3),
            Err(DiskCodecError::UnknownEncoding(3))
        );
        assert_eq!(
            decode(DiskEncoding::Zero, &[1], &mut out),
            Err(DiskCodecError::ZeroPayload(1))
        );
        assert_eq!(
            decode(DiskEncoding::Raw, &[1; 511], &mut out),
            Err(DiskCodecError::RawLength {
                got: 511,
                expected: 512
            })
        );
        assert!(decode(DiskEncoding::General, &[], &mut out).is_err());
        assert!(decode(DiskEncoding::General, &[0; 513], &mut out).is_err());
        assert!(decode(DiskEncoding::General, &[2, 1, 2, 3], &mut out).is_err());
        // A compressed payload that decodes to another length.
        let mut e = DiskEncoder::new(GeneralCodec::Lz4, 1);
        let mut p = Vec::new();
        assert_eq!(e.encode(&[7u8; 1024], &mut p), DiskEncoding::General);
        assert!(decode(DiskEncoding::General, &p, &mut out).is_err());
    }
}
