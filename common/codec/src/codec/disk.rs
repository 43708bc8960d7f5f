//! Disk data through the codec: the content of one disk record (a run of 512-byte sectors
//! a guest wrote), encoded the cheapest way that is exact.
//!
//! | encoding | n | payload |
//! |---|---|---|
//! | `Zero` | 0 | empty: the sectors become zeros |
//! | `General` | 1 | `u8 codec` (1 lz4 block format, 2 raw deflate) + the data compressed, which must decompress to exactly the record's bytes |
//! | `Raw` | 2 | the bytes |
//! | `Delta` | 3 | an XBZRLE delta (`crate::xbzrle`) against the 4 KiB block as the replica holds it just before this record applies; only for a record of exactly one aligned block |
//!
//! The wire (`ha_wire::stream`) frames the records and checks their sectors against the
//! disk; this module only turns bytes into a payload and back. The encoder cuts a write
//! into chunks of at most [`CHUNK`] bytes, so a mostly-zero write sends its zero pages as
//! `Zero` records and compresses the rest page by page. An encoder with a block cache
//! ([`DiskEncoder::with_cache`]) remembers the content it last sent for recently written
//! blocks — what the backup's replica holds once they commit — and sends a rewrite of such
//! a block as a `Delta` when that is at most half its size (a database rewriting a table
//! page, a log page filling up).

use super::general::{codec_byte, compress, decompress, looks_random};
use super::{CodecError, Encoding, GeneralCodec};
use crate::PAGE_SIZE;
use crate::block::{Page, is_zero};
use crate::xbzrle;

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
    /// A `Delta` record that is not one aligned 4 KiB block.
    #[error("delta disk record of {0} bytes (a delta covers one 4 KiB block)")]
    DeltaLength(usize),
    /// A `Delta` payload that does not decode against its base.
    #[error("delta disk record does not decode")]
    Delta(#[source] xbzrle::XbzrleError),
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
    /// An XBZRLE delta against the block's content before the record.
    Delta = 3,
}

impl DiskEncoding {
    /// The encoding of a wire byte.
    pub fn from_u8(n: u8) -> Result<Self, DiskCodecError> {
        match n {
            0 => Ok(Self::Zero),
            1 => Ok(Self::General),
            2 => Ok(Self::Raw),
            3 => Ok(Self::Delta),
            _ => Err(DiskCodecError::UnknownEncoding(n)),
        }
    }
}

/// The primary's disk encoder: zero detection, a delta against the block's last content
/// sent (with a cache), then the general codec when it shrinks the data, else raw.
pub struct DiskEncoder {
    codec: GeneralCodec,
    zlib: flate2::Compress,
    scratch: Vec<u8>,
    /// Block index → the content the replica holds once what was sent commits.
    cache: Option<lru::LruCache<u64, Box<Page>>>,
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
            cache: None,
        }
    }

    /// Keep the last content sent of up to `blocks` 4 KiB blocks (least recently written
    /// evicted), so rewrites go as deltas. Every record this encoder makes must reach the
    /// replica in order (one session's stream).
    #[must_use]
    pub fn with_cache(mut self, blocks: usize) -> Self {
        self.cache = std::num::NonZeroUsize::new(blocks).map(lru::LruCache::new);
        self
    }

    /// Append the payload of `data` (one record's bytes, at byte `offset` of the disk) to
    /// `out`; returns its encoding.
    pub fn encode(&mut self, offset: u64, data: &[u8], out: &mut Vec<u8>) -> DiskEncoding {
        let e = self.choose(offset, data, out);
        self.remember(offset, data);
        e
    }

    fn choose(&mut self, offset: u64, data: &[u8], out: &mut Vec<u8>) -> DiskEncoding {
        if is_zero(data) {
            return DiskEncoding::Zero;
        }
        let block = offset / PAGE_SIZE as u64;
        if let (Ok(new), true, Some(cache)) = (
            <&Page>::try_from(data),
            offset.is_multiple_of(PAGE_SIZE as u64),
            self.cache.as_mut(),
        ) && let Some(old) = cache.peek(&block)
        {
            let budget = PAGE_SIZE / 2;
            let start = out.len();
            out.resize(start + budget + xbzrle::ENCODE_SLACK, 0);
            if let Some(n) = xbzrle::encode(old, new, &mut out[start..], budget) {
                out.truncate(start + n);
                return DiskEncoding::Delta;
            }
            out.truncate(start);
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

    /// The replica will hold `data` at `offset`: a whole block is cached, a part of a
    /// cached block patches it.
    fn remember(&mut self, offset: u64, data: &[u8]) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let page = PAGE_SIZE as u64;
        if let Ok(whole) = <&Page>::try_from(data)
            && offset.is_multiple_of(page)
        {
            cache.put(offset / page, Box::new(*whole));
            return;
        }
        let end = offset + data.len() as u64;
        for block in offset / page..end.div_ceil(page) {
            if let Some(c) = cache.get_mut(&block) {
                let (b0, b1) = (block * page, (block + 1) * page);
                let (from, to) = (offset.max(b0), end.min(b1));
                c[(from - b0) as usize..(to - b0) as usize]
                    .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            }
        }
    }
}

/// Decode a record's payload into `out` (exactly the record's bytes). For `Delta`, `out`
/// must hold the base (the block's content before the record) and be one 4 KiB block.
pub fn decode(enc: DiskEncoding, payload: &[u8], out: &mut [u8]) -> Result<(), DiskCodecError> {
    match enc {
        DiskEncoding::Delta => {
            if out.len() != PAGE_SIZE {
                return Err(DiskCodecError::DeltaLength(out.len()));
            }
            let mut scratch = [0u8; PAGE_SIZE];
            scratch.copy_from_slice(out);
            xbzrle::decode(payload, &mut scratch).map_err(DiskCodecError::Delta)?;
            out.copy_from_slice(&scratch);
            Ok(())
        }
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
        let enc = e.encode(0, data, &mut payload);
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
            DiskEncoding::from_u8(4),
            Err(DiskCodecError::UnknownEncoding(4))
        );
        assert_eq!(
            decode(DiskEncoding::Delta, &[], &mut out),
            Err(DiskCodecError::DeltaLength(512))
        );
        let mut block = [0u8; 4096];
        assert!(matches!(
            decode(DiskEncoding::Delta, &[0, 0x80], &mut block),
            Err(DiskCodecError::Delta(_))
        ));
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
        assert_eq!(e.encode(0, &[7u8; 1024], &mut p), DiskEncoding::General);
        assert!(decode(DiskEncoding::General, &p, &mut out).is_err());
    }

    /// A replica of `n` blocks, applying records as the backup would.
    fn apply(replica: &mut [u8], offset: u64, enc: DiskEncoding, payload: &[u8], len: usize) {
        let at = offset as usize;
        decode(enc, payload, &mut replica[at..at + len]).unwrap();
    }

    #[test]
    fn rewrites_of_cached_blocks_go_as_deltas_that_rebuild_the_replica() {
        let mut e = DiskEncoder::new(GeneralCodec::Lz4, 1).with_cache(2);
        let mut replica = vec![0u8; 4 * 4096];
        let mut primary = replica.clone();
        let mut s = 7u64;
        let mut rnd = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect()
        };
        let write = |e: &mut DiskEncoder,
                     primary: &mut Vec<u8>,
                     replica: &mut Vec<u8>,
                     offset: u64,
                     data: &[u8]| {
            let mut p = Vec::new();
            let enc = e.encode(offset, data, &mut p);
            primary[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            apply(replica, offset, enc, &p, data.len());
            assert!(primary == replica, "after a {enc:?} record at {offset}");
            enc
        };
        let b0 = rnd(4096);
        assert_eq!(
            write(&mut e, &mut primary, &mut replica, 0, &b0),
            DiskEncoding::Raw
        );
        let mut b0b = b0.clone();
        b0b[100..164].copy_from_slice(&rnd(64));
        assert_eq!(
            write(&mut e, &mut primary, &mut replica, 0, &b0b),
            DiskEncoding::Delta
        );
        // A partial write patches the cached block; the next rewrite is still a delta
        // against what the replica holds.
        let part = rnd(512);
        assert_eq!(
            write(&mut e, &mut primary, &mut replica, 1024, &part),
            DiskEncoding::Raw
        );
        let mut b0c = primary[..4096].to_vec();
        b0c[4000] ^= 1;
        assert_eq!(
            write(&mut e, &mut primary, &mut replica, 0, &b0c),
            DiskEncoding::Delta
        );
        // An unaligned write across two blocks, one cached.
        let across = rnd(1024);
        write(&mut e, &mut primary, &mut replica, 4096 - 512, &across);
        let mut b0d = primary[..4096].to_vec();
        b0d[0] ^= 1;
        assert_eq!(
            write(&mut e, &mut primary, &mut replica, 0, &b0d),
            DiskEncoding::Delta
        );
        // Evicted (cache of two blocks): no delta.
        for b in 1..3u64 {
            let d = rnd(4096);
            write(&mut e, &mut primary, &mut replica, b * 4096, &d);
        }
        let mut b0e = primary[..4096].to_vec();
        b0e[9] ^= 1;
        assert_eq!(
            write(&mut e, &mut primary, &mut replica, 0, &b0e),
            DiskEncoding::Raw
        );
        // A rewrite changing most of the block is not worth a delta.
        let mut b1 = primary[4096..8192].to_vec();
        b1[..3000].copy_from_slice(&rnd(3000));
        assert_ne!(
            write(&mut e, &mut primary, &mut replica, 4096, &b1),
            DiskEncoding::Delta
        );
    }
}
