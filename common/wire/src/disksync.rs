//! The initial synchronisation of a disk replica: which 4 KiB blocks of the backup's
//! replica differ from the primary's disk, found by comparing fingerprints coarse to fine,
//! so that only those blocks cross the link (the way pre-copy brings memory level).
//!
//! The primary asks, the backup answers. The first [`SumRequest`] asks for the
//! fingerprint of every 1 MiB chunk of the replica; the primary compares them with its own
//! and asks for the 64 KiB chunks inside the chunks that differ, then for the 4 KiB blocks
//! inside those. What still differs at 4 KiB is the answer ([`Step::Differ`]). A replica
//! with 1 % of its blocks different, scattered, costs about 8 bytes of fingerprint per
//! 4 KiB block of the differing 64 KiB chunks — a few percent of the data that must cross
//! anyway (see the tests).
//!
//! A fingerprint is 64 bits of xxh3 (`ha_codec::hashes::hash`): two different chunks look
//! equal with probability 2^-64, and the digest of the whole disk at the first verified
//! checkpoint catches even that. The guest may write while the comparison runs; the
//! primary sends every write completed after it started anyway, so a block compared equal
//! and written later still arrives.
//!
//! Message bodies (little-endian, inside the frames the session gives them):
//! - `SumRequest`: u8 level, varint count, then `count` parent chunk indices (level > 0),
//!   each a varint delta from the one before (they ascend);
//! - `Sums`: u8 level, varint count, then `count` u64 fingerprints.

use ha_codec::hashes::hash;
use ha_codec::varint;

/// Chunk sizes of the levels, coarse to fine; each divides the one before by [`FANOUT`].
pub const LEVELS: [u64; 3] = [1 << 20, 64 << 10, 4 << 10];
/// Chunks of one level inside a chunk of the level before.
pub const FANOUT: u64 = 16;
/// The finest level: its chunks are the blocks that are sent.
pub const BLOCK_LEVEL: u8 = 2;
/// Most chunks one request may name or one answer carry (a 16 GiB disk's blocks).
pub const MAX_CHUNKS: u64 = 1 << 22;

/// Errors of the synchronisation.
#[derive(Debug, thiserror::Error)]
pub enum DiskSyncError {
    /// A message that does not parse.
    #[error("malformed disk sync {0}")]
    Malformed(&'static str),
    /// A level that does not exist.
    #[error("disk sync level {0} does not exist (0 to {BLOCK_LEVEL})")]
    Level(u8),
    /// A chunk past the disk's end.
    #[error("disk sync chunk {index} of level {level} is past the disk's end")]
    OutOfRange {
        /// The level.
        level: u8,
        /// The chunk's index.
        index: u64,
    },
    /// An answer that is not the answer to the request.
    #[error("disk sync answer has {got} sums of level {level}, the request asked for {expected}")]
    Answer {
        /// Level answered.
        level: u8,
        /// Sums given.
        got: usize,
        /// Sums asked for.
        expected: usize,
    },
    /// Reading a disk failed.
    #[error("cannot read the disk at {offset:#x}")]
    Read {
        /// Byte offset.
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A disk, as the synchronisation reads it.
pub trait ReadAt {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Read `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map_or(0, |m| m.len())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.as_slice().read_at(offset, buf)
    }
}

/// Chunks of `level` on a disk of `size` bytes (the last may be short).
fn chunks_of(level: u8, size: u64) -> u64 {
    size.div_ceil(LEVELS[usize::from(level)])
}

/// The primary's question: the fingerprints of every chunk of level 0, or of the chunks
/// of `level` inside each of `parents` (chunks of `level - 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumRequest {
    /// The level asked for.
    pub level: u8,
    /// Chunks of the level before whose children are asked for, ascending (empty for 0).
    pub parents: Vec<u64>,
}

impl SumRequest {
    /// The chunk indices of `self.level` the request names, on a disk of `size` bytes.
    pub fn chunks(&self, size: u64) -> Result<Vec<u64>, DiskSyncError> {
        if self.level > BLOCK_LEVEL {
            return Err(DiskSyncError::Level(self.level));
        }
        let n = chunks_of(self.level, size);
        if self.level == 0 {
            return Ok((0..n).collect());
        }
        let parents = chunks_of(self.level - 1, size);
        let mut out = Vec::with_capacity(self.parents.len() * FANOUT as usize);
        for &p in &self.parents {
            if p >= parents {
                return Err(DiskSyncError::OutOfRange {
                    level: self.level - 1,
                    index: p,
                });
            }
            out.extend((p * FANOUT..(p + 1) * FANOUT).filter(|&c| c < n));
        }
        Ok(out)
    }

    /// The message body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.level];
        varint::put(&mut out, self.parents.len() as u64);
        let mut last = 0;
        for &p in &self.parents {
            varint::put(&mut out, p.wrapping_sub(last));
            last = p;
        }
        out
    }

    /// Parse a message body: parents must ascend, at most [`MAX_CHUNKS`] of them.
    pub fn decode(body: &[u8]) -> Result<Self, DiskSyncError> {
        let bad = || DiskSyncError::Malformed("request");
        let (&level, mut rest) = body.split_first().ok_or_else(bad)?;
        let (count, n) = varint::get(rest).ok_or_else(bad)?;
        rest = &rest[n..];
        if count > MAX_CHUNKS {
            return Err(bad());
        }
        let mut parents = Vec::with_capacity(count as usize);
        let mut last = 0u64;
        for i in 0..count {
            let (d, n) = varint::get(rest).ok_or_else(bad)?;
            rest = &rest[n..];
            if i > 0 && d == 0 {
                return Err(bad());
            }
            last = last.checked_add(d).ok_or_else(bad)?;
            parents.push(last);
        }
        if !rest.is_empty() || (level == 0 && count > 0) {
            return Err(bad());
        }
        Ok(Self { level, parents })
    }
}

/// The backup's answer: one fingerprint per chunk the request named, in its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sums {
    /// The level answered.
    pub level: u8,
    /// The fingerprints.
    pub sums: Vec<u64>,
}

impl Sums {
    /// The message body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.level];
        varint::put(&mut out, self.sums.len() as u64);
        for s in &self.sums {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// Parse a message body.
    pub fn decode(body: &[u8]) -> Result<Self, DiskSyncError> {
        let bad = || DiskSyncError::Malformed("answer");
        let (&level, rest) = body.split_first().ok_or_else(bad)?;
        let (count, n) = varint::get(rest).ok_or_else(bad)?;
        let rest = &rest[n..];
        if count > MAX_CHUNKS || rest.len() as u64 != count * 8 {
            return Err(bad());
        }
        let sums = rest
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(Self { level, sums })
    }
}

/// The fingerprints of `chunks` of `level` on `disk`.
fn fingerprints<D: ReadAt + ?Sized>(
    disk: &D,
    level: u8,
    chunks: &[u64],
) -> Result<Vec<u64>, DiskSyncError> {
    let len = LEVELS[usize::from(level)];
    let size = disk.size();
    let mut buf = vec![0u8; len as usize];
    chunks
        .iter()
        .map(|&c| {
            let offset = c * len;
            let n = len.min(size.saturating_sub(offset)) as usize;
            if n == 0 {
                return Err(DiskSyncError::OutOfRange { level, index: c });
            }
            disk.read_at(offset, &mut buf[..n])
                .map_err(|source| DiskSyncError::Read { offset, source })?;
            Ok(hash(&buf[..n]))
        })
        .collect()
}

/// The backup's side: answer `req` from its replica.
pub fn answer<D: ReadAt + ?Sized>(replica: &D, req: &SumRequest) -> Result<Sums, DiskSyncError> {
    let chunks = req.chunks(replica.size())?;
    Ok(Sums {
        level: req.level,
        sums: fingerprints(replica, req.level, &chunks)?,
    })
}

/// What the primary does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask the backup this.
    Ask(SumRequest),
    /// Done: these 4 KiB blocks differ (ascending); send them.
    Differ(Vec<u64>),
}

/// Most parent chunks one request names: its answer is at most 64 Ki fingerprints
/// (512 KiB), so a level with more mismatches goes in several round trips.
pub const MAX_PARENTS: usize = 4096;

/// The primary's side: the comparison, one level per round trip (or a few, when a level
/// has more than [`MAX_PARENTS`] chunks to look inside).
#[derive(Debug)]
pub struct Comparer {
    size: u64,
    asked: SumRequest,
    /// Parents of `asked.level` not asked for yet.
    queue: Vec<u64>,
    /// Chunks of `asked.level` found to differ so far.
    differ: Vec<u64>,
    /// Chunks of `asked.level` compared so far.
    compared: usize,
    batch: usize,
    /// Skip the middle level when every chunk of the first differs.
    skip: bool,
}

impl Comparer {
    /// Start comparing a disk of `size` bytes: the first request to send.
    pub fn new(size: u64) -> (Self, SumRequest) {
        Self::with_batch(size, MAX_PARENTS)
    }

    /// [`Comparer::new`], but when every one of many chunks of a level differs the next
    /// level is skipped (its children's fingerprints asked for at once): a few more bytes
    /// of fingerprints, one pass less of reading and hashing on both sides. For memory,
    /// where changes scatter and reading costs more than the link.
    pub fn skipping(size: u64) -> (Self, SumRequest) {
        let (mut c, req) = Self::new(size);
        c.skip = true;
        (c, req)
    }

    fn with_batch(size: u64, batch: usize) -> (Self, SumRequest) {
        let asked = SumRequest {
            level: 0,
            parents: Vec::new(),
        };
        (
            Self {
                size,
                asked: asked.clone(),
                queue: Vec::new(),
                differ: Vec::new(),
                compared: 0,
                batch: batch.max(1),
                skip: false,
            },
            asked,
        )
    }

    /// The next batch of `queue` at `level`.
    fn ask(&mut self, level: u8) -> Step {
        let n = self.queue.len().min(self.batch);
        self.asked = SumRequest {
            level,
            parents: self.queue.drain(..n).collect(),
        };
        Step::Ask(self.asked.clone())
    }

    /// Take the backup's answer to the last request, compare it with `disk` (the
    /// primary's) and say what comes next.
    pub fn on_sums<D: ReadAt + ?Sized>(
        &mut self,
        disk: &D,
        sums: &Sums,
    ) -> Result<Step, DiskSyncError> {
        let chunks = self.asked.chunks(self.size)?;
        if sums.level != self.asked.level || sums.sums.len() != chunks.len() {
            return Err(DiskSyncError::Answer {
                level: sums.level,
                got: sums.sums.len(),
                expected: chunks.len(),
            });
        }
        let mine = fingerprints(disk, self.asked.level, &chunks)?;
        self.compared += chunks.len();
        self.differ.extend(
            chunks
                .iter()
                .zip(mine.iter().zip(&sums.sums))
                .filter(|(_, (a, b))| a != b)
                .map(|(&c, _)| c),
        );
        let level = self.asked.level;
        if !self.queue.is_empty() {
            return Ok(self.ask(level));
        }
        if level == BLOCK_LEVEL || self.differ.is_empty() {
            return Ok(Step::Differ(std::mem::take(&mut self.differ)));
        }
        let compared = std::mem::take(&mut self.compared);
        let all = self.skip && compared >= FANOUT as usize && self.differ.len() == compared;
        self.queue = std::mem::take(&mut self.differ);
        if all && level + 1 < BLOCK_LEVEL {
            // Every one of many chunks differs: the changes are scattered so densely that
            // most chunks of the next level would differ too, so it is skipped — asking
            // for its children's fingerprints directly costs a few more bytes but saves
            // reading and hashing everything once more on both sides. (With 1 % of the
            // blocks changed some chunks are still equal, and the middle level pays.)
            let below = chunks_of(level + 1, self.size);
            self.queue = self
                .queue
                .iter()
                .flat_map(|&p| p * FANOUT..(p + 1) * FANOUT)
                .filter(|&c| c < below)
                .collect();
            return Ok(self.ask(level + 2));
        }
        Ok(self.ask(level + 1))
    }
}

/// What a comparison brings level: the disk replica, or the memory image a backup
/// already holds (re-protection). The messages are the same; the frame types differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The backup's disk replica (SumRequest/Sums).
    Disk,
    /// The backup's memory image (MemSumRequest/MemSums).
    Memory,
}

/// Put a request as a SumRequest (disk) or MemSumRequest (memory) frame.
pub fn put_request(out: &mut Vec<u8>, target: Target, req: &SumRequest) {
    let ty = match target {
        Target::Disk => crate::frame::FrameType::SumRequest,
        Target::Memory => crate::frame::FrameType::MemSumRequest,
    };
    crate::frame::put_frame(out, ty, &req.encode());
}

/// Put an answer as a Sums (disk) or MemSums (memory) frame.
pub fn put_sums(out: &mut Vec<u8>, target: Target, sums: &Sums) {
    let ty = match target {
        Target::Disk => crate::frame::FrameType::Sums,
        Target::Memory => crate::frame::FrameType::MemSums,
    };
    crate::frame::put_frame(out, ty, &sums.encode());
}

/// Run the whole comparison in one process (both sides' messages encoded and decoded as
/// on the link): the differing blocks and the fingerprint bytes both ways.
pub fn compare_local<P: ReadAt + ?Sized, B: ReadAt + ?Sized>(
    primary: &P,
    replica: &B,
) -> Result<(Vec<u64>, u64), DiskSyncError> {
    compare_batched(primary, replica, (MAX_PARENTS, false))
}

fn compare_batched<P: ReadAt + ?Sized, B: ReadAt + ?Sized>(
    primary: &P,
    replica: &B,
    (batch, skip): (usize, bool),
) -> Result<(Vec<u64>, u64), DiskSyncError> {
    let (mut c, mut req) = Comparer::with_batch(primary.size(), batch);
    c.skip = skip;
    let mut bytes = 0u64;
    loop {
        let body = req.encode();
        bytes += body.len() as u64;
        let answer = answer(replica, &SumRequest::decode(&body)?)?.encode();
        bytes += answer.len() as u64;
        match c.on_sums(primary, &Sums::decode(&answer)?)? {
            Step::Ask(next) => req = next,
            Step::Differ(blocks) => return Ok((blocks, bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BLOCK: u64 = 4096;

    /// A disk of `size` bytes of pseudo-random content from `seed`.
    fn disk(size: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..size / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn equal_disks_cost_one_round_trip() {
        let a = disk(8 << 20, 1);
        let (differ, bytes) = compare_local(a.as_slice(), a.as_slice()).unwrap();
        assert!(differ.is_empty());
        assert!(bytes < 8 * 8 + 16, "{bytes} bytes for 8 chunk sums");
    }

    #[test]
    fn scattered_differences_are_found_exactly_and_cheaply() {
        // 64 MiB, 1 % of the blocks different, scattered.
        let size = 64 << 20;
        let primary = disk(size, 7);
        let mut replica = primary.clone();
        let blocks = size as u64 / BLOCK;
        let mut want: Vec<u64> = (0..blocks / 100)
            .map(|i| (i * 0x9E37_79B9) % blocks)
            .collect();
        want.sort_unstable();
        want.dedup();
        for &b in &want {
            replica[(b * BLOCK) as usize + 100] ^= 0x5A;
        }
        let (differ, bytes) = compare_local(primary.as_slice(), replica.as_slice()).unwrap();
        assert_eq!(differ, want);
        let data = want.len() as u64 * BLOCK;
        // Fingerprints of the differing 64 KiB chunks' blocks, 8 bytes per 4 KiB block,
        // plus the coarser levels: a few percent of the data.
        assert!(
            bytes * 20 < data,
            "{bytes} bytes of fingerprints for {data} bytes of blocks"
        );
    }

    #[test]
    fn when_most_chunks_differ_the_middle_level_is_skipped() {
        // A change in every 1 MiB chunk: level 1 would differ as much, so after level 0
        // the blocks of every differing chunk are asked for at once.
        let size = 16 << 20;
        let primary = disk(size, 5);
        let mut replica = primary.clone();
        for mib in 0..16 {
            replica[mib << 20] ^= 1;
        }
        let (mut c, req) = Comparer::skipping(size as u64);
        let sums = answer(replica.as_slice(), &req).unwrap();
        let Step::Ask(next) = c.on_sums(primary.as_slice(), &sums).unwrap() else {
            panic!("every chunk differs: more to ask");
        };
        assert_eq!(next.level, BLOCK_LEVEL);
        assert_eq!(next.parents, (0..256).collect::<Vec<_>>());
        let sums = answer(replica.as_slice(), &next).unwrap();
        let Step::Differ(blocks) = c.on_sums(primary.as_slice(), &sums).unwrap() else {
            panic!("the blocks are the last level");
        };
        assert_eq!(blocks, (0..16).map(|m| m * 256).collect::<Vec<_>>());
        // One changed chunk of sixteen: the middle level is asked as before.
        let mut one = primary.clone();
        one[3 << 20] ^= 1;
        let (mut c, req) = Comparer::skipping(size as u64);
        let sums = answer(one.as_slice(), &req).unwrap();
        let Step::Ask(next) = c.on_sums(primary.as_slice(), &sums).unwrap() else {
            panic!("one chunk differs: more to ask");
        };
        assert_eq!((next.level, next.parents), (1, vec![3]));
    }

    #[test]
    fn a_short_last_chunk_and_a_short_block_count() {
        // 1 MiB + 12 KiB: the last 1 MiB chunk and 64 KiB chunk are short.
        let size = (1 << 20) + 3 * 4096;
        let primary = disk(size, 3);
        let mut replica = primary.clone();
        replica[size - 1] ^= 1;
        let (differ, _) = compare_local(primary.as_slice(), replica.as_slice()).unwrap();
        assert_eq!(differ, vec![258]);
    }

    #[test]
    fn bad_messages_are_refused() {
        assert!(SumRequest::decode(&[]).is_err());
        assert!(
            SumRequest::decode(&[0, 1, 5]).is_err(),
            "level 0 has no parents"
        );
        assert!(SumRequest::decode(&[1, 2, 5, 0]).is_err(), "parents repeat");
        assert!(SumRequest::decode(&[1, 1, 5, 9]).is_err(), "trailing bytes");
        let req = SumRequest {
            level: 1,
            parents: vec![100],
        };
        assert!(matches!(
            answer(disk(1 << 20, 1).as_slice(), &req),
            Err(DiskSyncError::OutOfRange {
                level: 0,
                index: 100
            })
        ));
        let req = SumRequest {
            level: 3,
            parents: vec![0],
        };
        assert!(matches!(req.chunks(1 << 20), Err(DiskSyncError::Level(3))));
        assert!(Sums::decode(&[0, 2, 1, 2, 3]).is_err(), "short sums");
        let (mut c, _) = Comparer::new(2 << 20);
        let wrong = Sums {
            level: 0,
            sums: vec![1],
        };
        assert!(matches!(
            c.on_sums(disk(2 << 20, 1).as_slice(), &wrong),
            Err(DiskSyncError::Answer {
                got: 1,
                expected: 2,
                ..
            })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn any_differences_are_found_exactly(
            pages in 1u64..600,
            flips in proptest::collection::vec((0u64..600, 0usize..4096), 0..40),
            batch in 1usize..5,
            skip in any::<bool>(),
        ) {
            let size = (pages * BLOCK) as usize;
            let primary = disk(size, pages);
            let mut replica = primary.clone();
            let mut want = std::collections::BTreeSet::new();
            for (b, at) in flips {
                let b = b % pages;
                let i = (b * BLOCK) as usize + at;
                replica[i] = !primary[i];
                want.insert(b);
            }
            // Small batches: a level's parents go in several requests.
            let (differ, _) =
                compare_batched(primary.as_slice(), replica.as_slice(), (batch, skip)).unwrap();
            prop_assert_eq!(differ, want.into_iter().collect::<Vec<_>>());
        }
    }
}
