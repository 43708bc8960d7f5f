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

use ha_codec::hashes::{Hasher, hash};
use ha_codec::varint;
use ha_guest::image::{GuestImage, HOLE_READ};

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

/// Bytes a chunk is read in at a time to be fingerprinted: small enough to stay in the
/// CPU's cache between the read and the hash (a 1 MiB chunk read whole and then hashed
/// goes through memory twice).
pub const PIECE: usize = 64 << 10;

/// A disk, as the synchronisation reads it.
pub trait ReadAt {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Read `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// The fingerprint of the `len` bytes at `offset` (`hash` of them), read through
    /// `buf` in pieces of at most [`PIECE`] bytes.
    fn fingerprint(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> std::io::Result<u64> {
        buf.resize(PIECE.min(len), 0);
        let mut h = Hasher::default();
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            self.read_at(offset + done as u64, &mut buf[..n])?;
            h.update(&buf[..n]);
            done += n;
        }
        Ok(h.finish())
    }
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
    /// Hashed where it lies, without a copy.
    fn fingerprint(&self, offset: u64, len: usize, _: &mut Vec<u8>) -> std::io::Result<u64> {
        let start = in_range(self.len(), offset, len)?;
        Ok(hash(&self[start..start + len]))
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.as_slice().read_at(offset, buf)
    }
    fn fingerprint(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> std::io::Result<u64> {
        self.as_slice().fingerprint(offset, len, buf)
    }
}

/// A memory image (the backup's, re-protection's base): what is a hole in its memfd is
/// hashed as the zeros it holds without being read, which would allocate it.
impl ReadAt for GuestImage {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let len = buf.len();
        let start = in_range(self.len(), offset, len)?;
        if len < HOLE_READ {
            return self.as_slice().read_at(offset, buf);
        }
        let mut at = 0;
        feed_image(self, start..start + len, |piece| {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        });
        Ok(())
    }
    fn fingerprint(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> std::io::Result<u64> {
        let image = self.as_slice();
        let start = in_range(image.len(), offset, len)?;
        if len < HOLE_READ {
            return image.fingerprint(offset, len, buf);
        }
        let mut h = Hasher::default();
        feed_image(self, start..start + len, |piece| h.update(piece));
        Ok(h.finish())
    }
}

/// `offset` as an index into `size` bytes, with `len` bytes from there inside them.
fn in_range(size: usize, offset: u64, len: usize) -> std::io::Result<usize> {
    usize::try_from(offset)
        .ok()
        .filter(|o| o.checked_add(len).is_some_and(|end| end <= size))
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
}

/// Feed `range` of `image` (inside it) to `f` in order: its data as it lies, its holes
/// as zeros from a static buffer, never read (which would allocate them).
pub(crate) fn feed_image(
    image: &GuestImage,
    range: std::ops::Range<usize>,
    mut f: impl FnMut(&[u8]),
) {
    static ZEROS: [u8; PIECE] = [0; PIECE];
    let bytes = image.as_slice();
    for e in image.extents(range) {
        if e.data {
            f(&bytes[e.range]);
        } else {
            let mut left = e.range.len();
            while left > 0 {
                let n = left.min(PIECE);
                f(&ZEROS[..n]);
                left -= n;
            }
        }
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
    let mut buf = Vec::new();
    let mut out = Vec::with_capacity(chunks.len());
    // Chunks smaller than a piece are read a run of consecutive ones at a time (one read
    // of up to PIECE bytes: a 4 KiB page of memory read alone could not skip a hole).
    let per_read = (PIECE as u64 / len).max(1) as usize;
    let mut rest = chunks;
    while let Some(&first) = rest.first() {
        let run = rest
            .iter()
            .take(per_read)
            .enumerate()
            .take_while(|&(i, &c)| c == first + i as u64)
            .count();
        let offset = first * len;
        if offset >= size {
            return Err(DiskSyncError::OutOfRange {
                level,
                index: first,
            });
        }
        let n = (len * run as u64).min(size - offset) as usize;
        let read = |source| DiskSyncError::Read { offset, source };
        if run == 1 {
            out.push(disk.fingerprint(offset, n, &mut buf).map_err(read)?);
        } else {
            buf.resize(n, 0);
            disk.read_at(offset, &mut buf[..n]).map_err(read)?;
            out.extend(buf[..n].chunks(len as usize).map(hash));
        }
        // A short read (the disk's end) covers fewer chunks: the next one is past the end.
        let covered = n.div_ceil(len as usize);
        rest = &rest[covered.min(run)..];
    }
    Ok(out)
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
    /// This side's fingerprints of `asked`, when taken before its answer came.
    mine: Option<Vec<u64>>,
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
                mine: None,
            },
            asked,
        )
    }

    /// The next batch of `queue` at `level`.
    fn ask(&mut self, level: u8) -> Step {
        let n = self.queue.len().min(self.batch);
        self.mine = None;
        self.asked = SumRequest {
            level,
            parents: self.queue.drain(..n).collect(),
        };
        Step::Ask(self.asked.clone())
    }

    /// This side's fingerprints of the chunks the last request asked for, taken now (while
    /// the backup computes its own: a round trip then costs one side's reading, not both
    /// sides' one after the other) and used by the next [`Comparer::on_sums`].
    pub fn prepare<D: ReadAt + ?Sized>(&mut self, disk: &D) -> Result<(), DiskSyncError> {
        let chunks = self.asked.chunks(self.size)?;
        self.mine = Some(fingerprints(disk, self.asked.level, &chunks)?);
        Ok(())
    }

    /// Take the backup's answer to the last request, compare it with `disk` (the
    /// primary's; its fingerprints from [`Comparer::prepare`] if that ran) and say what
    /// comes next.
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
        let mine = match self.mine.take() {
            Some(mine) => mine,
            None => fingerprints(disk, self.asked.level, &chunks)?,
        };
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
        c.prepare(primary)?;
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
    fn an_image_fingerprints_as_its_bytes_without_allocating_its_holes() {
        use std::os::unix::fs::MetadataExt;
        let size = 4 << 20;
        let mut img = GuestImage::new(size).expect("image");
        let mut copy = vec![0u8; size];
        for at in [5usize, 70_000, 1 << 20, size - 1] {
            img.as_mut_slice()[at] = at as u8 | 1;
            copy[at] = at as u8 | 1;
        }
        let mut buf = Vec::new();
        for (offset, len) in [
            (0, 1 << 20),
            (1 << 20, 1 << 20),
            (65536, 65536),
            (0, 4096),
            (3 << 20, 1 << 20),
        ] {
            let want = copy
                .as_slice()
                .fingerprint(offset, len, &mut buf)
                .expect("slice");
            assert_eq!(want, hash(&copy[offset as usize..][..len]));
            assert_eq!(img.fingerprint(offset, len, &mut buf).expect("image"), want);
        }
        assert!(img.fingerprint(size as u64 - 10, 11, &mut buf).is_err());
        let file = img.into_file();
        // Four pages hold data (the 4 KiB read allocated none: page 0 has data).
        assert_eq!(file.metadata().expect("stat").blocks(), 4 * 4096 / 512);
    }

    #[test]
    fn an_image_with_holes_compares_exactly_either_side() {
        use std::os::unix::fs::MetadataExt;
        let size = 8 << 20;
        let pages = size / BLOCK as usize;
        // Memory: every seventh page random, the rest zero (holes in the image).
        let noise = disk(size, 11);
        let mut memory = vec![0u8; size];
        for p in (0..pages).step_by(7) {
            let r = p * BLOCK as usize..(p + 1) * BLOCK as usize;
            memory[r.clone()].copy_from_slice(&noise[r]);
        }
        let mut img = GuestImage::new(size).expect("image");
        for p in (0..pages).step_by(7) {
            let r = p * BLOCK as usize..(p + 1) * BLOCK as usize;
            img.as_mut_slice()[r.clone()].copy_from_slice(&memory[r]);
        }
        // Differences: a data page changed, a hole written, a data page zeroed.
        for (p, at) in [(14usize, 9usize), (15, 0), (700, 4095)] {
            memory[p * BLOCK as usize + at] ^= 0xff;
        }
        memory[21 * BLOCK as usize..22 * BLOCK as usize].fill(0);
        let want = vec![14, 15, 21, 700];
        for skip in [false, true] {
            let (got, _) = compare_batched(memory.as_slice(), &img, (MAX_PARENTS, skip)).unwrap();
            assert_eq!(got, want);
            let (got, _) = compare_batched(&img, memory.as_slice(), (MAX_PARENTS, skip)).unwrap();
            assert_eq!(got, want);
        }
        // The comparisons allocated none of the image's holes.
        let data_pages = pages.div_ceil(7) as u64;
        assert_eq!(
            img.into_file().metadata().unwrap().blocks(),
            data_pages * BLOCK / 512
        );
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
            short in 0usize..8,
        ) {
            // A last block short by a multiple of 512 bytes, sometimes.
            let size = (pages * BLOCK) as usize - short * 512;
            let primary = disk(size, pages);
            let mut replica = primary.clone();
            let mut want = std::collections::BTreeSet::new();
            for (b, at) in flips {
                let b = b % pages;
                let i = ((b * BLOCK) as usize + at).min(size - 1);
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
