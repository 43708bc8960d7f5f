//! Disk records in the epoch stream: the writes a guest's disk completed during an epoch,
//! sent with the epoch's checkpoint (Remus's disk buffering) and staged with it.
//!
//! ```text
//! Disk (6) records until the end of the body:
//!          varint sector | varint sectors (1..=128) | u8 encoding | varint payload length | payload
//! ```
//!
//! The payload is [`ha_codec::codec::disk`]'s: `Zero` (empty), `General` (codec byte and
//! compressed data), `Raw`, or `Delta` (against the block as the replica holds it before
//! the record: the last commit's replica with this epoch's earlier records over it). A record covers `sectors × 512` bytes at byte
//! `sector × 512` of the disk, inside the disk the session announced. Records apply in
//! the order sent (a later write to the same sectors wins). The primary cuts each write
//! into records of at most [`ha_codec::codec::disk::CHUNK`] bytes.

use crate::disksync::ReadAt;
use ha_codec::codec::disk::{
    self as content, CHUNK, DiskCodecError, DiskEncoder, DiskEncoding, MAX_RECORD_SECTORS, SECTOR,
};
use ha_codec::varint;
use ha_guest::domain::DiskWrite;

/// Why disk records cannot be written or staged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskRecordError {
    /// A write that does not start and end on a sector boundary.
    #[error("disk write at {offset} of {len} bytes is not whole sectors")]
    Unaligned {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// Disk records in a session without a disk.
    #[error("disk records in a session without a disk")]
    NoDisk,
    /// A record outside the disk, or of no sectors or too many.
    #[error(
        "disk record of {sectors} sectors at sector {sector} is outside the {disk_size}-byte disk or too long"
    )]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u64,
        /// The session's disk size.
        disk_size: u64,
    },
    /// A record cut short or with bad varints.
    #[error("malformed disk frame")]
    Malformed,
    /// A delta record whose base cannot be read (or there is no replica to read it from).
    #[error("disk record at sector {sector}: cannot read its base: {why}")]
    Base {
        /// First sector.
        sector: u64,
        /// Why.
        why: String,
    },
    /// A payload that does not decode.
    #[error("disk record at sector {sector} does not decode")]
    Content {
        /// First sector.
        sector: u64,
        /// Why.
        #[source]
        source: DiskCodecError,
    },
}

/// One epoch's disk writes, encoded as records.
#[derive(Debug, Default, Clone)]
pub struct DiskRecords {
    /// The records, back to back.
    pub bytes: Vec<u8>,
    /// Where each record ends in `bytes`.
    pub ends: Vec<usize>,
    /// The writes they carry.
    pub writes: u64,
    /// Bytes written (before encoding).
    pub raw_bytes: u64,
    /// Records of each encoding: zero, general, raw, delta.
    pub by_encoding: [u64; 4],
}

impl DiskRecords {
    /// Encode `writes` (in completion order) with `enc`.
    pub fn encode(enc: &mut DiskEncoder, writes: &[DiskWrite]) -> Result<Self, DiskRecordError> {
        let mut r = Self::default();
        let mut payload = Vec::with_capacity(CHUNK + 16);
        for w in writes {
            if !w.offset.is_multiple_of(SECTOR as u64) || !w.data.len().is_multiple_of(SECTOR) {
                return Err(DiskRecordError::Unaligned {
                    offset: w.offset,
                    len: w.data.len(),
                });
            }
            r.writes += 1;
            r.raw_bytes += w.data.len() as u64;
            let mut sector = w.offset / SECTOR as u64;
            for chunk in w.data.chunks(CHUNK) {
                payload.clear();
                let e = enc.encode(sector * SECTOR as u64, chunk, &mut payload);
                let sectors = (chunk.len() / SECTOR) as u64;
                varint::put(&mut r.bytes, sector);
                varint::put(&mut r.bytes, sectors);
                r.bytes.push(e as u8);
                varint::put(&mut r.bytes, payload.len() as u64);
                r.bytes.extend_from_slice(&payload);
                r.ends.push(r.bytes.len());
                r.by_encoding[e as usize] += 1;
                sector += sectors;
            }
        }
        Ok(r)
    }

    /// Number of records.
    pub fn records(&self) -> u32 {
        self.ends.len() as u32
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// Decode a Disk frame's records onto `staged` (in order); returns how many there were.
/// `limit` is the most records still allowed; over it, the count is returned early (the
/// caller reports the excess). `replica` is the disk as of the last commit, which `Delta`
/// records are resolved against (with `staged` over it); without one they are refused.
pub fn stage(
    mut body: &[u8],
    disk_size: u64,
    staged: &mut Vec<DiskWrite>,
    limit: u64,
    replica: Option<&dyn ReadAt>,
) -> Result<u64, DiskRecordError> {
    if disk_size == 0 {
        return Err(DiskRecordError::NoDisk);
    }
    let mut n = 0u64;
    while !body.is_empty() {
        let (sector, k) = varint::get(body).ok_or(DiskRecordError::Malformed)?;
        body = &body[k..];
        let (sectors, k) = varint::get(body).ok_or(DiskRecordError::Malformed)?;
        body = &body[k..];
        let (&e, rest) = body.split_first().ok_or(DiskRecordError::Malformed)?;
        let (len, k) = varint::get(rest).ok_or(DiskRecordError::Malformed)?;
        let rest = &rest[k..];
        let len = usize::try_from(len).map_err(|_| DiskRecordError::Malformed)?;
        let payload = rest.get(..len).ok_or(DiskRecordError::Malformed)?;
        body = &rest[len..];
        n += 1;
        if n > limit {
            return Ok(n);
        }
        let inside = sector
            .checked_add(sectors)
            .and_then(|end| end.checked_mul(SECTOR as u64))
            .is_some_and(|end| end <= disk_size);
        if sectors == 0 || sectors > MAX_RECORD_SECTORS || !inside {
            return Err(DiskRecordError::OutOfRange {
                sector,
                sectors,
                disk_size,
            });
        }
        let content_err = |source| DiskRecordError::Content { sector, source };
        let enc = DiskEncoding::from_u8(e).map_err(content_err)?;
        // `sectors` is at most 128: the length fits.
        let mut data = vec![0u8; sectors as usize * SECTOR];
        let offset = sector * SECTOR as u64;
        if enc == DiskEncoding::Delta {
            if data.len() != CHUNK || !offset.is_multiple_of(CHUNK as u64) {
                return Err(content_err(DiskCodecError::DeltaLength(data.len())));
            }
            base(replica, staged, offset, &mut data)
                .map_err(|why| DiskRecordError::Base { sector, why })?;
        }
        content::decode(enc, payload, &mut data).map_err(content_err)?;
        staged.push(DiskWrite {
            offset: sector * SECTOR as u64,
            data,
        });
    }
    Ok(n)
}

/// The content at `offset` before the next record: `replica`, then the epoch's earlier
/// records over it in order (a delta record's base, a `DiskRef`'s block).
pub(crate) fn base(
    replica: Option<&dyn ReadAt>,
    staged: &[DiskWrite],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let r = replica.ok_or("no replica to resolve the record against")?;
    r.read_at(offset, buf).map_err(|e| e.to_string())?;
    let end = offset + buf.len() as u64;
    for w in staged {
        let w_end = w.offset + w.data.len() as u64;
        let (from, to) = (offset.max(w.offset), end.min(w_end));
        if from < to {
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&w.data[(from - w.offset) as usize..(to - w.offset) as usize]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_codec::codec::GeneralCodec;

    fn writes() -> Vec<DiskWrite> {
        let text: Vec<u8> = b"log record; ".iter().cycle().take(4096).copied().collect();
        let mut mixed = vec![0u8; 3 * 4096];
        mixed[4096..8192].copy_from_slice(&text);
        for (i, b) in mixed[8192..].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8 ^ (i >> 5) as u8;
        }
        vec![
            DiskWrite {
                offset: 512,
                data: vec![9u8; 1024],
            },
            DiskWrite {
                offset: 8192,
                data: mixed,
            },
            DiskWrite {
                offset: 0,
                data: vec![1u8; 2048],
            },
        ]
    }

    fn apply(disk: &mut [u8], ws: &[DiskWrite]) {
        for w in ws {
            let at = w.offset as usize;
            disk[at..at + w.data.len()].copy_from_slice(&w.data);
        }
    }

    #[test]
    fn writes_roundtrip_in_order_through_zero_general_and_raw() {
        let ws = writes();
        let mut enc = DiskEncoder::new(GeneralCodec::Zlib, 1);
        let r = DiskRecords::encode(&mut enc, &ws).unwrap();
        assert_eq!(r.writes, 3);
        assert_eq!(r.records(), 5, "the 12 KiB write is three records");
        assert_eq!(r.by_encoding[DiskEncoding::Zero as usize], 1);
        assert!(r.by_encoding[DiskEncoding::General as usize] >= 2);
        let mut staged = Vec::new();
        assert_eq!(stage(&r.bytes, 1 << 20, &mut staged, 100, None), Ok(5));
        let (mut want, mut got) = (vec![0xEEu8; 1 << 20], vec![0xEEu8; 1 << 20]);
        apply(&mut want, &ws);
        apply(&mut got, &staged);
        assert!(got == want);
    }

    #[test]
    fn bad_records_are_refused() {
        let mut enc = DiskEncoder::new(GeneralCodec::Zlib, 1);
        let odd = [DiskWrite {
            offset: 100,
            data: vec![1; 512],
        }];
        assert!(matches!(
            DiskRecords::encode(&mut enc, &odd),
            Err(DiskRecordError::Unaligned { offset: 100, .. })
        ));
        let r = DiskRecords::encode(&mut enc, &writes()).unwrap();
        let mut v = Vec::new();
        assert_eq!(
            stage(&r.bytes, 0, &mut v, 100, None),
            Err(DiskRecordError::NoDisk)
        );
        // The writes reach byte 20480: a smaller disk refuses them.
        assert!(matches!(
            stage(&r.bytes, 16384, &mut v, 100, None),
            Err(DiskRecordError::OutOfRange { .. })
        ));
        let mut rec = Vec::new();
        for (sector, sectors) in [(0, 0), (0, 129), (u64::MAX, 2)] {
            rec.clear();
            varint::put(&mut rec, sector);
            varint::put(&mut rec, sectors);
            rec.extend_from_slice(&[0, 0]);
            assert!(matches!(
                stage(&rec, 1 << 30, &mut v, 100, None),
                Err(DiskRecordError::OutOfRange { .. })
            ));
        }
        assert_eq!(
            stage(&r.bytes[..r.bytes.len() - 1], 1 << 20, &mut v, 100, None),
            Err(DiskRecordError::Malformed)
        );
        rec.clear();
        rec.extend_from_slice(&[0, 1, 7, 0]);
        assert!(matches!(
            stage(&rec, 1 << 20, &mut v, 100, None),
            Err(DiskRecordError::Content { sector: 0, .. })
        ));
    }

    #[test]
    fn deltas_resolve_against_the_replica_and_the_epochs_earlier_records() {
        let size = 8 * 4096usize;
        let mut enc = DiskEncoder::new(GeneralCodec::Lz4, 1).with_cache(16);
        let mut primary = vec![0u8; size];
        let mut replica = primary.clone();
        let mut x = 99u64;
        let mut epochs = 0;
        for epoch in 0..30u64 {
            let mut ws = Vec::new();
            for i in 0..4u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = (x % 8) as usize * 4096;
                // Mostly small edits of a block (deltas), now and then a partial write.
                let w = if i == 3 && epoch % 3 == 0 {
                    DiskWrite {
                        offset: (block + 512) as u64,
                        data: vec![x as u8; 1024],
                    }
                } else {
                    let mut d = primary[block..block + 4096].to_vec();
                    d[(x >> 20) as usize % 4096] ^= 0x5A;
                    d[(x >> 40) as usize % 4096] = epoch as u8;
                    DiskWrite {
                        offset: block as u64,
                        data: d,
                    }
                };
                primary[w.offset as usize..w.offset as usize + w.data.len()]
                    .copy_from_slice(&w.data);
                ws.push(w);
            }
            let r = DiskRecords::encode(&mut enc, &ws).unwrap();
            if r.by_encoding[DiskEncoding::Delta as usize] > 0 {
                epochs += 1;
            }
            let mut staged = Vec::new();
            stage(&r.bytes, size as u64, &mut staged, 100, Some(&replica)).unwrap();
            for w in &staged {
                replica[w.offset as usize..w.offset as usize + w.data.len()]
                    .copy_from_slice(&w.data);
            }
            assert!(replica == primary, "epoch {epoch}");
        }
        assert!(epochs > 20, "deltas in {epochs} of 30 epochs");
        // Without a replica a delta cannot be resolved; a delta that is not one block is
        // refused.
        let mut d = primary[..4096].to_vec();
        d[0] ^= 1;
        let r = DiskRecords::encode(&mut enc, &[DiskWrite { offset: 0, data: d }]).unwrap();
        assert_eq!(r.by_encoding[DiskEncoding::Delta as usize], 1);
        assert!(matches!(
            stage(&r.bytes, size as u64, &mut Vec::new(), 100, None),
            Err(DiskRecordError::Base { sector: 0, .. })
        ));
        let rec = [0u8, 4, DiskEncoding::Delta as u8, 0];
        assert!(matches!(
            stage(&rec, size as u64, &mut Vec::new(), 100, Some(&replica)),
            Err(DiskRecordError::Content { sector: 0, .. })
        ));
    }
}
