//! The epoch stream: how a checkpoint crosses the wire (the *send*, *stage* and *commit*
//! stages).
//!
//! An epoch is a sequence of length-delimited frames:
//!
//! ```text
//! frame   = u32 LE length of (type + body) | u8 type | body
//! Header  (1) u16 version | u64 epoch | u8 mode | u16 block size | u32 record count
//! Pages   (2) records until the end of the body:
//!             varint page | u8 encoding | varint payload length | payload
//! State   (3) the vCPU/device state blob, opaque here
//! Trailer (4) u32 record count | u64 byte count | 32-byte blake3 digest
//! Verify  (5) 32-byte blake3 digest of the whole guest memory at this checkpoint,
//!             then (sessions with a disk) 32-byte blake3 digest of the whole disk
//! Disk    (6) disk records (see [`crate::disk`])
//! ```
//!
//! The header's and the trailer's record counts count page records and disk records
//! together.
//!
//! An epoch that carries a State frame is a *checkpoint*: the backup may resume the guest
//! from it. Epochs without one (the initial pre-copy rounds) only bring the image closer.
//!
//! The trailer's byte count and digest cover every byte of the epoch's frames before it,
//! length prefixes included, in order. [`Staging`] decodes an epoch's records into a
//! private overlay as they arrive, checks the trailer, and only then hands out a
//! [`StagedEpoch`] whose [`StagedEpoch::commit`] copies the pages into the image. Any error
//! discards the overlay; the image is never touched by a rejected epoch.

use crate::disk::{self, DiskRecordError, DiskRecords};
use crate::frame::{FrameError, FrameType, put_frame};
use ha_codec::PAGE_SIZE;
use ha_codec::block::{BlockSize, Page};
use ha_codec::codec::{self, CodecError, EncodedBatch, Encoding, Mode};
use ha_codec::share::PageView;
use ha_codec::teleport::DISK_BLOCK;
use ha_codec::varint;
use ha_guest::domain::DiskWrite;
use ha_guest::image::GuestImage;
use std::collections::HashMap;

/// Version of the epoch stream format.
pub const STREAM_VERSION: u16 = 1;
/// Pages frames are cut at about this size.
pub const PAGES_FRAME_TARGET: usize = 256 << 10;
/// Largest state blob accepted.
pub const MAX_STATE: usize = 4 << 20;

/// Why an epoch was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Bytes that are not a frame (see [`crate::frame`]).
    #[error("bad frame")]
    Frame(#[from] FrameError),
    /// A frame type that does not belong here.
    #[error("unexpected frame type {got} ({state})")]
    UnexpectedFrame {
        /// The type received.
        got: u8,
        /// Where the stager was.
        state: &'static str,
    },
    /// A stream version this build does not speak.
    #[error("stream version {got} is not supported (this build speaks {STREAM_VERSION})")]
    Version {
        /// Version received.
        got: u16,
    },
    /// An epoch that is not the next one: a replay, or one out of order.
    #[error("epoch {got} received, expected epoch {expected}")]
    OutOfOrder {
        /// Epoch received.
        got: u64,
        /// Epoch expected.
        expected: u64,
    },
    /// Header values that differ from the session's.
    #[error("epoch header says {what} {got}, the session uses {want}")]
    Mismatch {
        /// "mode" or "block size".
        what: &'static str,
        /// Value received.
        got: u32,
        /// Value the session uses.
        want: u32,
    },
    /// A page index outside guest memory.
    #[error("page {0} is outside guest memory")]
    PageOutOfRange(u64),
    /// The same page twice in one epoch.
    #[error("page {0} appears twice in the epoch")]
    DuplicatePage(u64),
    /// A record that fails to decode.
    #[error("record for page {page} does not decode")]
    Record {
        /// The page.
        page: u64,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// A page record referencing a disk block the backup cannot resolve (past the disk's
    /// end, no disk, an unreadable replica).
    #[error("epoch {epoch}: page {page}'s disk reference does not resolve")]
    DiskRef {
        /// The epoch.
        epoch: u64,
        /// The page.
        page: u64,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// A malformed frame body.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// More records than the header announced.
    #[error("epoch has {got} records, its header announced {announced}")]
    RecordCount {
        /// Records counted.
        got: u64,
        /// Records announced.
        announced: u64,
    },
    /// Trailer counts that do not match what arrived.
    #[error("trailer says {what} {claimed}, received {got}")]
    TrailerMismatch {
        /// "records" or "bytes".
        what: &'static str,
        /// The trailer's value.
        claimed: u64,
        /// What arrived.
        got: u64,
    },
    /// The digest does not match the frames received.
    #[error("epoch digest mismatch: frames were altered, reordered or lost")]
    Digest,
    /// The committed image differs from the primary's memory (verification mode).
    #[error("committed image of epoch {epoch} differs from the primary's memory digest")]
    ImageMismatch {
        /// The epoch whose digest did not match.
        epoch: u64,
    },
    /// Disk records that cannot be staged.
    #[error("bad disk records")]
    Disk(#[from] DiskRecordError),
    /// The replica after the commit differs from the primary's disk digest.
    #[error("disk replica after epoch {epoch} differs from the primary's disk digest")]
    DiskMismatch {
        /// The epoch whose digest did not match.
        epoch: u64,
    },
    /// A second state blob, or one too large.
    #[error("bad state frame: {0}")]
    State(&'static str),
}

/// The header of an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochHeader {
    /// Epoch number (checkpoint n).
    pub epoch: u64,
    /// Encoding mode.
    pub mode: Mode,
    /// Block size.
    pub block_size: BlockSize,
    /// Page records in the epoch.
    pub records: u32,
}

/// Writes one epoch's frames, keeping the running digest.
#[derive(Debug)]
pub struct EpochWriter {
    hasher: blake3::Hasher,
    bytes: u64,
    records: u64,
    announced: u64,
    body: Vec<u8>,
}

impl EpochWriter {
    /// Start an epoch: writes the header frame to `out`.
    pub fn begin(out: &mut Vec<u8>, h: EpochHeader) -> Self {
        let mut w = Self {
            hasher: blake3::Hasher::new(),
            bytes: 0,
            records: 0,
            announced: u64::from(h.records),
            body: Vec::with_capacity(PAGES_FRAME_TARGET + PAGE_SIZE * 2),
        };
        let mut b = Vec::with_capacity(17);
        b.extend_from_slice(&STREAM_VERSION.to_le_bytes());
        b.extend_from_slice(&h.epoch.to_le_bytes());
        b.push(h.mode as u8);
        b.extend_from_slice(&(h.block_size.bytes() as u16).to_le_bytes());
        b.extend_from_slice(&h.records.to_le_bytes());
        w.frame(out, FrameType::Header, &b);
        w
    }

    /// Number of records a batch contributes (its `Unchanged` pages are not sent).
    pub fn records_in(batch: &EncodedBatch) -> u32 {
        batch
            .records
            .iter()
            .filter(|r| r.encoding != Encoding::Unchanged)
            .count() as u32
    }

    /// Append a batch's records (skipping `Unchanged`) as Pages frames.
    pub fn pages(&mut self, out: &mut Vec<u8>, batch: &EncodedBatch) {
        for r in &batch.records {
            if r.encoding == Encoding::Unchanged {
                continue;
            }
            varint::put(&mut self.body, r.page);
            self.body.push(r.encoding as u8);
            varint::put(&mut self.body, r.len as u64);
            self.body.extend_from_slice(batch.payload(r));
            self.records += 1;
            if self.body.len() >= PAGES_FRAME_TARGET {
                self.flush_pages(out);
            }
        }
    }

    /// Append the state blob.
    pub fn state(&mut self, out: &mut Vec<u8>, blob: &[u8]) {
        self.flush_pages(out);
        self.frame(out, FrameType::State, blob);
    }

    /// Append the blake3 digest of the whole guest memory at this checkpoint, for the
    /// backup to check against its image after the commit (verification mode).
    pub fn verify(&mut self, out: &mut Vec<u8>, digest: &[u8; 32]) {
        self.verify_with_disk(out, digest, None);
    }

    /// [`EpochWriter::verify`], with the digest of the whole disk at this checkpoint when
    /// the session has one (the backup checks its replica after applying the epoch).
    pub fn verify_with_disk(
        &mut self,
        out: &mut Vec<u8>,
        memory: &[u8; 32],
        disk: Option<&[u8; 32]>,
    ) {
        self.flush_pages(out);
        let mut b = memory.to_vec();
        if let Some(d) = disk {
            b.extend_from_slice(d);
        }
        self.frame(out, FrameType::Verify, &b);
    }

    /// Append an epoch's disk records as Disk frames (cut at record boundaries near
    /// [`PAGES_FRAME_TARGET`]). Their count belongs in the header's record count. Returns
    /// the bytes of the Disk frames written.
    pub fn disk(&mut self, out: &mut Vec<u8>, recs: &DiskRecords) -> u64 {
        self.flush_pages(out);
        let from = out.len();
        let mut start = 0;
        for (i, &end) in recs.ends.iter().enumerate() {
            if end - start >= PAGES_FRAME_TARGET || i + 1 == recs.ends.len() {
                self.frame(out, FrameType::Disk, &recs.bytes[start..end]);
                start = end;
            }
        }
        self.records += u64::from(recs.records());
        (out.len() - from) as u64
    }

    /// Write the trailer. Fails (writing nothing) if the records written differ from the
    /// header's count.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        self.flush_pages(out);
        if self.records != self.announced {
            return Err(StreamError::RecordCount {
                got: self.records,
                announced: self.announced,
            });
        }
        let mut b = Vec::with_capacity(44);
        b.extend_from_slice(&(self.records as u32).to_le_bytes());
        b.extend_from_slice(&self.bytes.to_le_bytes());
        b.extend_from_slice(self.hasher.finalize().as_bytes());
        put_frame(out, FrameType::Trailer, &b);
        Ok(())
    }

    fn flush_pages(&mut self, out: &mut Vec<u8>) {
        if !self.body.is_empty() {
            let body = std::mem::take(&mut self.body);
            self.frame(out, FrameType::Pages, &body);
            self.body = body;
            self.body.clear();
        }
    }

    fn frame(&mut self, out: &mut Vec<u8>, ty: FrameType, body: &[u8]) {
        let start = out.len();
        put_frame(out, ty, body);
        self.hasher.update(&out[start..]);
        self.bytes += (out.len() - start) as u64;
    }
}

/// A verified epoch, ready to commit.
#[derive(Debug)]
pub struct StagedEpoch {
    /// Epoch number.
    pub epoch: u64,
    /// The new content of every page the epoch changes.
    pub pages: HashMap<u64, Box<Page>>,
    /// The vCPU/device state blob, if the epoch carried one (then it is a checkpoint).
    pub state: Option<Vec<u8>>,
    /// The primary's digest of the whole guest memory, if it sent one.
    pub verify: Option<[u8; 32]>,
    /// The disk writes of the epoch, in the order to apply them (for the replica, at
    /// commit).
    pub disk: Vec<DiskWrite>,
    /// The primary's digest of its whole disk, if it sent one.
    pub verify_disk: Option<[u8; 32]>,
    /// Bytes of frames received for this epoch (trailer excluded).
    pub wire_bytes: u64,
    /// Bytes of Disk frames among them.
    pub disk_wire_bytes: u64,
}

impl StagedEpoch {
    /// Apply the epoch to `image` (guest memory, `pages * 4096` bytes). Cannot fail: every
    /// page index was checked against the image size while staging.
    pub fn commit(&self, image: &mut [u8]) {
        for (&p, content) in &self.pages {
            let at = p as usize * PAGE_SIZE;
            if let Some(dst) = image.get_mut(at..at + PAGE_SIZE) {
                dst.copy_from_slice(&content[..]);
            }
        }
    }

    /// After [`StagedEpoch::commit`]: `Ok` when the epoch carried no digest or the image
    /// matches it; the mismatch otherwise.
    pub fn check_image(&self, image: &[u8]) -> Result<(), StreamError> {
        self.check_digest(|| *blake3::hash(image).as_bytes())
    }

    /// [`StagedEpoch::check_image`] of a memory image, its holes hashed as the zeros they
    /// hold without being read ([`image_digest`]).
    pub fn check_guest_image(&self, image: &GuestImage) -> Result<(), StreamError> {
        self.check_digest(|| image_digest(image))
    }

    fn check_digest(&self, digest: impl FnOnce() -> [u8; 32]) -> Result<(), StreamError> {
        match &self.verify {
            Some(want) if &digest() != want => {
                Err(StreamError::ImageMismatch { epoch: self.epoch })
            }
            _ => Ok(()),
        }
    }

    /// Take the epoch's disk half apart from its memory: the replica commits it on its own
    /// ([`StagedEpoch::commit`] touches memory only).
    pub fn take_disk(&mut self) -> StagedDisk {
        StagedDisk {
            epoch: self.epoch,
            writes: std::mem::take(&mut self.disk),
            verify: self.verify_disk,
            wire_bytes: self.disk_wire_bytes,
        }
    }
}

/// The disk half of a verified epoch, for the backup's replica.
#[derive(Debug, Default)]
pub struct StagedDisk {
    /// Epoch number.
    pub epoch: u64,
    /// The writes, in the order to apply them.
    pub writes: Vec<DiskWrite>,
    /// The primary's digest of its whole disk at this checkpoint, if it sent one.
    pub verify: Option<[u8; 32]>,
    /// Bytes of the epoch's Disk frames.
    pub wire_bytes: u64,
}

impl StagedDisk {
    /// Bytes the writes write.
    pub fn bytes(&self) -> u64 {
        self.writes.iter().map(|w| w.data.len() as u64).sum()
    }

    /// After the writes reached the replica: `Ok` when the epoch carried no disk digest
    /// or `replica` (the digest of the whole replica) matches it.
    pub fn check(&self, replica: &[u8; 32]) -> Result<(), StreamError> {
        match &self.verify {
            Some(want) if want != replica => Err(StreamError::DiskMismatch { epoch: self.epoch }),
            _ => Ok(()),
        }
    }
}

/// The image as the next record sees it: staged pages over the committed image; and the
/// disk as a `DiskRef` sees it: the epoch's disk records staged so far over the replica
/// of the last commit.
struct StagedView<'a> {
    staged: &'a HashMap<u64, Box<Page>>,
    image: &'a [u8],
    disk: &'a [DiskWrite],
    disk_size: u64,
    replica: Option<&'a dyn crate::disksync::ReadAt>,
}

impl PageView for StagedView<'_> {
    fn page(&self, page: u64) -> Option<&Page> {
        if let Some(p) = self.staged.get(&page) {
            return Some(p);
        }
        let at = usize::try_from(page).ok()?.checked_mul(PAGE_SIZE)?;
        self.image.get(at..at + PAGE_SIZE)?.try_into().ok()
    }

    fn disk_block(&self, block: u64, out: &mut Page) -> Result<(), CodecError> {
        if self.disk_size == 0 {
            return Err(CodecError::DiskRefUnresolved {
                block,
                why: "the session has no disk".to_string(),
            });
        }
        let blocks = self.disk_size / DISK_BLOCK;
        if block >= blocks {
            return Err(CodecError::DiskRefPastEnd { block, blocks });
        }
        disk::base(self.replica, self.disk, block * DISK_BLOCK, out)
            .map_err(|why| CodecError::DiskRefUnresolved { block, why })
    }
}

/// Receives frames for a session and stages one epoch at a time.
#[derive(Debug)]
pub struct Staging {
    mode: Mode,
    bs: BlockSize,
    pages: u64,
    disk_size: u64,
    next_epoch: u64,
    cur: Option<Current>,
}

#[derive(Debug)]
struct Current {
    header: EpochHeader,
    hasher: blake3::Hasher,
    bytes: u64,
    records: u64,
    staged: HashMap<u64, Box<Page>>,
    state: Option<Vec<u8>>,
    verify: Option<[u8; 32]>,
    disk: Vec<DiskWrite>,
    verify_disk: Option<[u8; 32]>,
    disk_bytes: u64,
}

impl Staging {
    /// A stager for a session: its mode, block size, guest pages, and the first epoch it
    /// will accept.
    pub fn new(mode: Mode, bs: BlockSize, pages: u64, next_epoch: u64) -> Self {
        Self {
            mode,
            bs,
            pages,
            disk_size: 0,
            next_epoch,
            cur: None,
        }
    }

    /// The same stager for a session with a disk of `disk_size` bytes (0: none; Disk
    /// frames are then refused).
    pub fn with_disk(mut self, disk_size: u64) -> Self {
        self.disk_size = disk_size;
        self
    }

    /// The epoch the stager expects next.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// Whether an epoch is partly received.
    pub fn in_progress(&self) -> bool {
        self.cur.is_some()
    }

    /// Drop a partly received epoch (the connection died mid-epoch).
    pub fn discard(&mut self) {
        self.cur = None;
    }

    /// Take one whole frame (`ty`, `body`, and its bytes on the wire `raw`). Returns the
    /// staged epoch when `raw` was a trailer that verified. On error the partial epoch is
    /// discarded and `image` was not touched.
    pub fn push(
        &mut self,
        ty: u8,
        body: &[u8],
        raw: &[u8],
        image: &[u8],
    ) -> Result<Option<StagedEpoch>, StreamError> {
        self.push_with_replica(ty, body, raw, image, None)
    }

    /// [`Staging::push`] in a session with a disk: `replica` is the disk replica as of the
    /// last commit, which disk delta records are resolved against.
    pub fn push_with_replica(
        &mut self,
        ty: u8,
        body: &[u8],
        raw: &[u8],
        image: &[u8],
        replica: Option<&dyn crate::disksync::ReadAt>,
    ) -> Result<Option<StagedEpoch>, StreamError> {
        let r = self.push_inner(ty, body, raw, image, replica);
        if r.is_err() {
            self.cur = None;
        }
        r
    }

    fn push_inner(
        &mut self,
        ty: u8,
        body: &[u8],
        raw: &[u8],
        image: &[u8],
        replica: Option<&dyn crate::disksync::ReadAt>,
    ) -> Result<Option<StagedEpoch>, StreamError> {
        let Some(cur) = &mut self.cur else {
            if ty != FrameType::Header as u8 {
                return Err(StreamError::UnexpectedFrame {
                    got: ty,
                    state: "expected an epoch header",
                });
            }
            let header = self.parse_header(body)?;
            let mut hasher = blake3::Hasher::new();
            hasher.update(raw);
            self.cur = Some(Current {
                header,
                hasher,
                bytes: raw.len() as u64,
                records: 0,
                staged: HashMap::new(),
                state: None,
                verify: None,
                disk: Vec::new(),
                verify_disk: None,
                disk_bytes: 0,
            });
            return Ok(None);
        };
        match FrameType::try_from(ty) {
            Ok(FrameType::Pages) => {
                cur.hasher.update(raw);
                cur.bytes += raw.len() as u64;
                let disk = (self.disk_size, replica);
                stage_pages(cur, body, self.bs, self.pages, image, disk)?;
                Ok(None)
            }
            Ok(FrameType::State) => {
                cur.hasher.update(raw);
                cur.bytes += raw.len() as u64;
                if cur.state.is_some() {
                    return Err(StreamError::State("second state frame in one epoch"));
                }
                if body.len() > MAX_STATE {
                    return Err(StreamError::State("state blob too large"));
                }
                cur.state = Some(body.to_vec());
                Ok(None)
            }
            Ok(FrameType::Verify) => {
                cur.hasher.update(raw);
                cur.bytes += raw.len() as u64;
                let (d, disk) = match body.len() {
                    32 => (body, None),
                    64 if self.disk_size > 0 => (&body[..32], Some(&body[32..])),
                    _ => return Err(StreamError::Malformed("verify")),
                };
                let d: [u8; 32] = d.try_into().map_err(|_| StreamError::Malformed("verify"))?;
                cur.verify_disk = disk
                    .map(<[u8; 32]>::try_from)
                    .transpose()
                    .map_err(|_| StreamError::Malformed("verify"))?;
                if cur.verify.replace(d).is_some() {
                    return Err(StreamError::Malformed(
                        "verify (second digest in one epoch)",
                    ));
                }
                Ok(None)
            }
            Ok(FrameType::Disk) => {
                cur.hasher.update(raw);
                cur.bytes += raw.len() as u64;
                cur.disk_bytes += raw.len() as u64;
                let left = u64::from(cur.header.records).saturating_sub(cur.records);
                let n = disk::stage(body, self.disk_size, &mut cur.disk, left, replica)?;
                cur.records += n;
                if n > left {
                    return Err(StreamError::RecordCount {
                        got: cur.records,
                        announced: u64::from(cur.header.records),
                    });
                }
                Ok(None)
            }
            Ok(FrameType::Trailer) => {
                if body.len() != 44 {
                    return Err(StreamError::Malformed("trailer"));
                }
                let count = u64::from(u32::from_le_bytes([body[0], body[1], body[2], body[3]]));
                let bytes = u64::from_le_bytes(
                    body[4..12]
                        .try_into()
                        .map_err(|_| StreamError::Malformed("trailer"))?,
                );
                if count != cur.records {
                    return Err(StreamError::TrailerMismatch {
                        what: "records",
                        claimed: count,
                        got: cur.records,
                    });
                }
                if cur.records != u64::from(cur.header.records) {
                    return Err(StreamError::RecordCount {
                        got: cur.records,
                        announced: u64::from(cur.header.records),
                    });
                }
                if bytes != cur.bytes {
                    return Err(StreamError::TrailerMismatch {
                        what: "bytes",
                        claimed: bytes,
                        got: cur.bytes,
                    });
                }
                if cur.hasher.finalize().as_bytes() != &body[12..44] {
                    return Err(StreamError::Digest);
                }
                let Some(cur) = self.cur.take() else {
                    return Err(StreamError::Malformed("trailer"));
                };
                self.next_epoch = cur.header.epoch + 1;
                Ok(Some(StagedEpoch {
                    epoch: cur.header.epoch,
                    pages: cur.staged,
                    state: cur.state,
                    verify: cur.verify,
                    disk: cur.disk,
                    verify_disk: cur.verify_disk,
                    wire_bytes: cur.bytes,
                    disk_wire_bytes: cur.disk_bytes,
                }))
            }
            _ => Err(StreamError::UnexpectedFrame {
                got: ty,
                state: "inside an epoch",
            }),
        }
    }

    fn parse_header(&self, b: &[u8]) -> Result<EpochHeader, StreamError> {
        if b.len() != 17 {
            return Err(StreamError::Malformed("header"));
        }
        let version = u16::from_le_bytes([b[0], b[1]]);
        if version != STREAM_VERSION {
            return Err(StreamError::Version { got: version });
        }
        let epoch = u64::from_le_bytes(
            b[2..10]
                .try_into()
                .map_err(|_| StreamError::Malformed("header"))?,
        );
        if epoch != self.next_epoch {
            return Err(StreamError::OutOfOrder {
                got: epoch,
                expected: self.next_epoch,
            });
        }
        let mode = b[10];
        if mode != self.mode as u8 {
            return Err(StreamError::Mismatch {
                what: "mode",
                got: u32::from(mode),
                want: self.mode as u32,
            });
        }
        let bs = u16::from_le_bytes([b[11], b[12]]);
        if usize::from(bs) != self.bs.bytes() {
            return Err(StreamError::Mismatch {
                what: "block size",
                got: u32::from(bs),
                want: self.bs.bytes() as u32,
            });
        }
        let records = u32::from_le_bytes([b[13], b[14], b[15], b[16]]);
        Ok(EpochHeader {
            epoch,
            mode: self.mode,
            block_size: self.bs,
            records,
        })
    }
}

fn stage_pages(
    cur: &mut Current,
    mut body: &[u8],
    bs: BlockSize,
    pages: u64,
    image: &[u8],
    (disk_size, replica): (u64, Option<&dyn crate::disksync::ReadAt>),
) -> Result<(), StreamError> {
    while !body.is_empty() {
        let (page, n) = varint::get(body).ok_or(StreamError::Malformed("pages"))?;
        body = &body[n..];
        let (&enc, rest) = body.split_first().ok_or(StreamError::Malformed("pages"))?;
        let (len, n) = varint::get(rest).ok_or(StreamError::Malformed("pages"))?;
        let rest = &rest[n..];
        let len = usize::try_from(len).map_err(|_| StreamError::Malformed("pages"))?;
        let payload = rest.get(..len).ok_or(StreamError::Malformed("pages"))?;
        body = &rest[len..];
        if page >= pages {
            return Err(StreamError::PageOutOfRange(page));
        }
        if cur.staged.contains_key(&page) {
            return Err(StreamError::DuplicatePage(page));
        }
        cur.records += 1;
        if cur.records > u64::from(cur.header.records) {
            return Err(StreamError::RecordCount {
                got: cur.records,
                announced: u64::from(cur.header.records),
            });
        }
        let encoding = Encoding::from_u8(enc).ok_or(StreamError::Record {
            page,
            source: CodecError::UnknownEncoding(enc),
        })?;
        let view = StagedView {
            staged: &cur.staged,
            image,
            disk: &cur.disk,
            disk_size,
            replica,
        };
        let mut out: Box<Page> =
            Box::new(*view.page(page).ok_or(StreamError::PageOutOfRange(page))?);
        codec::decode_page(encoding, payload, page, bs, &view, &mut out).map_err(|source| {
            match source {
                CodecError::DiskRefPastEnd { .. } | CodecError::DiskRefUnresolved { .. } => {
                    StreamError::DiskRef {
                        epoch: cur.header.epoch,
                        page,
                        source,
                    }
                }
                source => StreamError::Record { page, source },
            }
        })?;
        cur.staged.insert(page, out);
    }
    Ok(())
}

/// blake3 of a memory image (the digest a Verify record carries), without reading its
/// holes: a backup's image is a memfd whose never-written pages are holes, and reading
/// them through its mapping would allocate every one.
pub fn image_digest(image: &GuestImage) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    crate::disksync::feed_image(image, 0..image.len(), |piece| {
        h.update(piece);
    });
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{MAX_FRAME, split_frame};
    use ha_codec::cache::PageCache;
    use ha_codec::codec::{Batch, CodecConfig, PageEncoder};

    const PAGES: usize = 64;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^ (z >> 31)
        }
    }

    /// An image and two epochs of changes to it, encoded as one fgbi stream, with small
    /// Pages frames so an epoch has many frames.
    struct Fixture {
        image: Vec<u8>,
        epochs: Vec<Vec<u8>>,
        after: Vec<Vec<u8>>,
    }

    fn fixture(seed: u64) -> Fixture {
        let mut r = rng(seed);
        let mut mem: Vec<u8> = (0..PAGES * PAGE_SIZE).map(|_| (r() % 7) as u8).collect();
        let image = mem.clone();
        let cfg = CodecConfig::default();
        let mut enc = PageEncoder::new(cfg, Some(PageCache::shadow(PAGES)), None).unwrap();
        for p in 0..PAGES {
            enc.learn(
                p as u64,
                mem[p * PAGE_SIZE..][..PAGE_SIZE].try_into().unwrap(),
            );
        }
        let mut epochs = Vec::new();
        let mut after = Vec::new();
        for e in 1..=2u64 {
            let mut idx = Vec::new();
            let mut data = Vec::new();
            for p in 0..PAGES {
                if r().is_multiple_of(2) {
                    continue;
                }
                let pg = &mut mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
                for _ in 0..(r() % 300) {
                    pg[(r() % PAGE_SIZE as u64) as usize] = r() as u8;
                }
                idx.push(p as u64);
                data.extend_from_slice(pg);
            }
            let mut batch = EncodedBatch::default();
            enc.encode_batch(
                Batch {
                    pages: &idx,
                    data: &data,
                },
                &mut batch,
            );
            let mut out = Vec::new();
            let h = EpochHeader {
                epoch: e,
                mode: cfg.mode,
                block_size: cfg.block_size,
                records: EpochWriter::records_in(&batch),
            };
            let mut w = EpochWriter::begin(&mut out, h);
            // Small frames: one record each.
            for rec in batch
                .records
                .iter()
                .filter(|r| r.encoding != Encoding::Unchanged)
            {
                let one = EncodedBatch {
                    records: vec![Record { start: 0, ..*rec }],
                    bytes: batch.payload(rec).to_vec(),
                };
                w.pages(&mut out, &one);
                w.flush_pages(&mut out);
            }
            w.state(&mut out, format!("vcpu state {e}").as_bytes());
            w.finish(&mut out).unwrap();
            epochs.push(out);
            after.push(mem.clone());
        }
        Fixture {
            image,
            epochs,
            after,
        }
    }

    use ha_codec::codec::Record;

    fn frames(bytes: &[u8]) -> Vec<&[u8]> {
        let mut v = Vec::new();
        let mut at = 0;
        while let Some((_, _, n)) = split_frame(&bytes[at..]).unwrap() {
            v.push(&bytes[at..at + n]);
            at += n;
        }
        assert_eq!(at, bytes.len());
        v
    }

    /// Feed bytes frame by frame; commit each verified epoch. Returns epochs committed or
    /// the first error.
    fn feed(st: &mut Staging, bytes: &[u8], image: &mut [u8]) -> Result<Vec<u64>, StreamError> {
        let mut done = Vec::new();
        let mut at = 0;
        while let Some((ty, body, n)) = split_frame(&bytes[at..])? {
            let raw = &bytes[at..at + n];
            if let Some(staged) = st.push(ty, body, raw, image)? {
                staged.commit(image);
                done.push(staged.epoch);
            }
            at += n;
        }
        Ok(done)
    }

    fn stager() -> Staging {
        let cfg = CodecConfig::default();
        Staging::new(cfg.mode, cfg.block_size, PAGES as u64, 1)
    }

    #[test]
    fn epochs_commit_byte_for_byte() {
        let f = fixture(1);
        let mut st = stager();
        let mut image = f.image.clone();
        assert_eq!(feed(&mut st, &f.epochs[0], &mut image), Ok(vec![1]));
        assert!(image == f.after[0]);
        assert_eq!(feed(&mut st, &f.epochs[1], &mut image), Ok(vec![2]));
        assert!(image == f.after[1]);
        assert_eq!(st.next_epoch(), 3);
    }

    #[test]
    fn truncated_epoch_never_commits() {
        let f = fixture(2);
        let all = frames(&f.epochs[0]);
        for keep in 0..all.len() {
            let mut st = stager();
            let mut image = f.image.clone();
            let cut: Vec<u8> = all[..keep].concat();
            assert_eq!(feed(&mut st, &cut, &mut image), Ok(vec![]));
            assert!(image == f.image);
            // A torn last frame is never even split off.
            let torn = &f.epochs[0][..cut.len() + 3];
            assert_eq!(feed(&mut stager(), torn, &mut image), Ok(vec![]));
            assert!(image == f.image);
        }
    }

    #[test]
    fn every_bit_flip_is_rejected_and_the_image_is_unchanged() {
        let f = fixture(3);
        let bytes = &f.epochs[0];
        let mut r = rng(99);
        for _ in 0..600 {
            let mut bad = bytes.clone();
            let at = (r() % bad.len() as u64) as usize;
            bad[at] ^= 1 << (r() % 8);
            let mut st = stager();
            let mut image = f.image.clone();
            let res = feed(&mut st, &bad, &mut image);
            assert!(
                !matches!(res, Ok(ref v) if !v.is_empty()),
                "flip at {at} committed: {res:?}"
            );
            assert!(image == f.image, "flip at {at} changed the image");
        }
    }

    #[test]
    fn reordered_frames_are_rejected() {
        let f = fixture(4);
        let all = frames(&f.epochs[0]);
        assert!(all.len() > 4);
        let mut v = all.clone();
        v.swap(1, 2);
        let mut image = f.image.clone();
        let err = feed(&mut stager(), &v.concat(), &mut image).unwrap_err();
        assert!(
            matches!(err, StreamError::Digest | StreamError::Record { .. }),
            "{err}"
        );
        assert!(image == f.image);
        // Header moved after a Pages frame.
        let mut v = all.clone();
        v.swap(0, 1);
        let err = feed(&mut stager(), &v.concat(), &mut image).unwrap_err();
        assert_eq!(
            err,
            StreamError::UnexpectedFrame {
                got: FrameType::Pages as u8,
                state: "expected an epoch header"
            }
        );
    }

    #[test]
    fn replayed_and_out_of_order_epochs_are_rejected() {
        let f = fixture(5);
        let mut st = stager();
        let mut image = f.image.clone();
        assert!(matches!(
            feed(&mut st, &f.epochs[1], &mut image),
            Err(StreamError::OutOfOrder {
                got: 2,
                expected: 1
            })
        ));
        assert_eq!(feed(&mut st, &f.epochs[0], &mut image), Ok(vec![1]));
        let committed = image.clone();
        assert_eq!(
            feed(&mut st, &f.epochs[0], &mut image),
            Err(StreamError::OutOfOrder {
                got: 1,
                expected: 2
            })
        );
        assert!(image == committed);
        // A duplicated frame inside an epoch.
        let all = frames(&f.epochs[1]);
        let mut v = all.clone();
        v.insert(2, all[1]);
        let err = feed(&mut st, &v.concat(), &mut image).unwrap_err();
        assert!(matches!(err, StreamError::DuplicatePage(_)), "{err}");
        assert!(image == committed);
        // The same epoch, whole, still commits afterwards.
        assert_eq!(feed(&mut st, &f.epochs[1], &mut image), Ok(vec![2]));
    }

    #[test]
    fn header_checks() {
        let f = fixture(6);
        let mut bytes = f.epochs[0].clone();
        bytes[5] = 9; // version low byte
        let mut image = f.image.clone();
        assert_eq!(
            feed(&mut stager(), &bytes, &mut image),
            Err(StreamError::Version { got: 9 })
        );
        let mut st = Staging::new(Mode::Xbzrle, BlockSize::DEFAULT, PAGES as u64, 1);
        assert!(matches!(
            feed(&mut st, &f.epochs[0], &mut image),
            Err(StreamError::Mismatch { what: "mode", .. })
        ));
        let mut st = Staging::new(Mode::Fgbi, BlockSize::DEFAULT, 8, 1);
        assert!(matches!(
            feed(&mut st, &f.epochs[0], &mut image),
            Err(StreamError::PageOutOfRange(_))
        ));
        assert!(image == f.image);
        let mut huge = Vec::new();
        huge.extend_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        assert_eq!(
            split_frame(&huge),
            Err(FrameError::TooLarge {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            })
        );
    }

    /// The header of an fgbi epoch with the default block size.
    fn fgbi_header(epoch: u64, records: u32) -> EpochHeader {
        EpochHeader {
            epoch,
            mode: Mode::Fgbi,
            block_size: BlockSize::DEFAULT,
            records,
        }
    }

    #[test]
    fn verify_digest_catches_a_divergent_image() {
        let mut out = Vec::new();
        let mut w = EpochWriter::begin(&mut out, fgbi_header(1, 0));
        let image = vec![0u8; PAGES * PAGE_SIZE];
        w.verify(&mut out, blake3::hash(&image).as_bytes());
        w.finish(&mut out).unwrap();
        let mut mine = image.clone();
        let mut st = stager();
        let mut staged = None;
        let mut at = 0;
        while let Some((ty, body, n)) = split_frame(&out[at..]).unwrap() {
            staged = st
                .push(ty, body, &out[at..at + n], &mine)
                .unwrap()
                .or(staged);
            at += n;
        }
        let staged = staged.unwrap();
        staged.commit(&mut mine);
        assert_eq!(staged.check_image(&mine), Ok(()));
        mine[77] = 1;
        assert_eq!(
            staged.check_image(&mine),
            Err(StreamError::ImageMismatch { epoch: 1 })
        );
        // The same checks over a memfd image, whose holes are hashed unread.
        let mut img = GuestImage::new(mine.len()).unwrap();
        assert_eq!(staged.check_guest_image(&img), Ok(()));
        img.as_mut_slice()[77] = 1;
        assert_eq!(
            staged.check_guest_image(&img),
            Err(StreamError::ImageMismatch { epoch: 1 })
        );
    }

    #[test]
    fn an_image_digest_is_its_bytes_blake3_and_leaves_its_holes_unallocated() {
        use std::os::unix::fs::MetadataExt;
        let size = 8 << 20;
        let mut img = GuestImage::new(size).unwrap();
        let mut want = vec![0u8; size];
        for at in [0usize, 12_345, 3 << 20, size - 2] {
            img.as_mut_slice()[at] = 0x5a;
            want[at] = 0x5a;
        }
        assert_eq!(image_digest(&img), *blake3::hash(&want).as_bytes());
        assert_eq!(img.into_file().metadata().unwrap().blocks(), 4 * 4096 / 512);
    }

    /// One epoch of 3 pages and 2 disk writes (5 records), with memory and disk digests.
    fn disk_epoch(epoch: u64) -> (Vec<u8>, Vec<DiskWrite>) {
        let writes = vec![
            DiskWrite {
                offset: 4096,
                data: b"wal ".repeat(1024),
            },
            DiskWrite {
                offset: 0,
                data: vec![0; 512],
            },
        ];
        let mut enc =
            ha_codec::codec::disk::DiskEncoder::new(ha_codec::codec::GeneralCodec::Zlib, 1);
        let recs = DiskRecords::encode(&mut enc, &writes).unwrap();
        let mut batch = EncodedBatch::default();
        for p in 0..3u64 {
            batch.records.push(Record {
                page: p,
                encoding: Encoding::Raw,
                start: batch.bytes.len(),
                len: PAGE_SIZE,
            });
            batch.bytes.extend_from_slice(&[p as u8 + 1; PAGE_SIZE]);
        }
        let mut out = Vec::new();
        let h = EpochHeader {
            epoch,
            mode: Mode::Fgbi,
            block_size: BlockSize::DEFAULT,
            records: EpochWriter::records_in(&batch) + recs.records(),
        };
        let mut w = EpochWriter::begin(&mut out, h);
        w.pages(&mut out, &batch);
        w.disk(&mut out, &recs);
        w.state(&mut out, b"state");
        w.verify_with_disk(&mut out, &[1; 32], Some(&[2; 32]));
        w.finish(&mut out).unwrap();
        (out, writes)
    }

    fn disk_stager() -> Staging {
        stager().with_disk(64 << 10)
    }

    #[test]
    fn disk_records_stage_with_the_epoch_and_only_whole() {
        let (bytes, writes) = disk_epoch(1);
        let image = vec![0u8; PAGES * PAGE_SIZE];
        let mut st = disk_stager();
        let mut staged = None;
        for f in frames(&bytes) {
            let (ty, body, _) = split_frame(f).unwrap().unwrap();
            staged = st.push(ty, body, f, &image).unwrap().or(staged);
        }
        let mut staged = staged.unwrap();
        assert_eq!(staged.pages.len(), 3);
        let disk = staged.take_disk();
        assert!(staged.disk.is_empty());
        assert_eq!(disk.writes, writes);
        assert_eq!(disk.bytes(), 4096 + 512);
        assert_eq!(disk.verify, Some([2; 32]));
        assert!(disk.wire_bytes > 0);
        assert_eq!(disk.check(&[2; 32]), Ok(()));
        assert_eq!(
            disk.check(&[3; 32]),
            Err(StreamError::DiskMismatch { epoch: 1 })
        );
        // A session without a disk refuses the records.
        let mut image2 = image.clone();
        assert!(matches!(
            feed(&mut stager(), &bytes, &mut image2),
            Err(StreamError::Disk(DiskRecordError::NoDisk))
        ));
        // Torn anywhere, nothing is staged.
        for cut in 0..bytes.len() {
            let mut st = disk_stager();
            assert_eq!(feed(&mut st, &bytes[..cut], &mut image2), Ok(vec![]));
        }
        // Every bit flip is rejected; the image stays as it was.
        let mut r = rng(7);
        for _ in 0..400 {
            let mut bad = bytes.clone();
            let at = (r() % bad.len() as u64) as usize;
            bad[at] ^= 1 << (r() % 8);
            let res = feed(&mut disk_stager(), &bad, &mut image2);
            assert!(!matches!(res, Ok(ref v) if !v.is_empty()), "flip at {at}");
            assert!(image2 == image);
        }
        // Replayed: refused as out of order.
        let mut st = disk_stager();
        assert_eq!(feed(&mut st, &bytes, &mut image2), Ok(vec![1]));
        assert_eq!(
            feed(&mut st, &bytes, &mut image2),
            Err(StreamError::OutOfOrder {
                got: 1,
                expected: 2
            })
        );
    }

    #[test]
    fn writer_refuses_a_wrong_record_count() {
        let mut out = Vec::new();
        let h = EpochHeader {
            epoch: 1,
            mode: Mode::Remus,
            block_size: BlockSize::DEFAULT,
            records: 3,
        };
        let w = EpochWriter::begin(&mut out, h);
        assert_eq!(
            w.finish(&mut out),
            Err(StreamError::RecordCount {
                got: 0,
                announced: 3
            })
        );
    }

    /// A batch of one page record: `page` as a DiskRef to `block`.
    fn disk_ref_batch(page: u64, block: u64) -> EncodedBatch {
        let mut payload = Vec::new();
        varint::put(&mut payload, block);
        EncodedBatch {
            records: vec![Record {
                page,
                encoding: Encoding::DiskRef,
                start: 0,
                len: payload.len(),
            }],
            bytes: payload,
        }
    }

    /// One epoch of a Disk frame rewriting block 3 with `rewrite` and a Pages frame whose
    /// page 0 is a DiskRef to `block`, the Disk frame first when `disk_first`.
    fn disk_ref_epoch(epoch: u64, block: u64, rewrite: &[u8], disk_first: bool) -> Vec<u8> {
        let batch = disk_ref_batch(0, block);
        let mut enc = ha_codec::codec::disk::DiskEncoder::new(codec::GeneralCodec::None, 1);
        let recs = disk::DiskRecords::encode(
            &mut enc,
            &[DiskWrite {
                offset: 3 * 4096,
                data: rewrite.to_vec(),
            }],
        )
        .unwrap();
        let mut out = Vec::new();
        let mut w = EpochWriter::begin(&mut out, fgbi_header(epoch, 1 + recs.records()));
        if disk_first {
            w.disk(&mut out, &recs);
            w.pages(&mut out, &batch);
        } else {
            w.pages(&mut out, &batch);
            w.disk(&mut out, &recs);
        }
        w.finish(&mut out).unwrap();
        out
    }

    /// Feed an epoch against `replica`; commit memory and disk when it verifies.
    fn feed_with_disk(
        st: &mut Staging,
        bytes: &[u8],
        image: &mut [u8],
        replica: &mut Vec<u8>,
    ) -> Result<(), StreamError> {
        let mut at = 0;
        while let Some((ty, body, n)) = split_frame(&bytes[at..])? {
            let raw = &bytes[at..at + n];
            if let Some(mut staged) = st.push_with_replica(ty, body, raw, image, Some(&*replica))? {
                staged.commit(image);
                for w in staged.take_disk().writes {
                    let o = w.offset as usize;
                    replica[o..o + w.data.len()].copy_from_slice(&w.data);
                }
            }
            at += n;
        }
        Ok(())
    }

    #[test]
    fn a_disk_ref_reads_the_replica_at_its_place_in_the_epoch() {
        let size = 8 * 4096;
        let (old, new) = ([0xA0u8; 4096], [0xB1u8; 4096]);
        for disk_first in [false, true] {
            let mut replica = vec![0u8; size];
            replica[3 * 4096..4 * 4096].copy_from_slice(&old);
            let mut image = vec![0u8; 4 * PAGE_SIZE];
            let mut st = Staging::new(Mode::Fgbi, BlockSize::DEFAULT, 4, 1).with_disk(size as u64);
            let e = disk_ref_epoch(1, 3, &new, disk_first);
            feed_with_disk(&mut st, &e, &mut image, &mut replica).unwrap();
            // Rewritten before the record: the record reads the new content; after it: the
            // old. The replica has the new content either way.
            let want = if disk_first { new } else { old };
            assert!(image[..PAGE_SIZE] == want[..], "disk first: {disk_first}");
            assert!(replica[3 * 4096..4 * 4096] == new[..]);
        }
    }

    #[test]
    fn a_disk_ref_past_the_disks_end_rejects_its_epoch_and_changes_nothing() {
        let size = 8 * 4096;
        let mut replica = vec![7u8; size];
        let mut image = vec![1u8; 4 * PAGE_SIZE];
        let mut st = Staging::new(Mode::Fgbi, BlockSize::DEFAULT, 4, 1).with_disk(size as u64);
        let e = disk_ref_epoch(1, 8, &[9u8; 4096], true);
        let err = feed_with_disk(&mut st, &e, &mut image, &mut replica).unwrap_err();
        assert!(
            matches!(
                &err,
                StreamError::DiskRef {
                    epoch: 1,
                    page: 0,
                    source: CodecError::DiskRefPastEnd {
                        block: 8,
                        blocks: 8
                    }
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "epoch 1: page 0's disk reference does not resolve"
        );
        assert!(image == vec![1u8; 4 * PAGE_SIZE] && replica == vec![7u8; size]);
        assert!(!st.in_progress());
        // The same epoch with a good reference is taken next.
        let e = disk_ref_epoch(1, 7, &[9u8; 4096], true);
        feed_with_disk(&mut st, &e, &mut image, &mut replica).unwrap();
        assert!(image[..PAGE_SIZE] == [7u8; PAGE_SIZE][..]);
        // A session without a disk refuses a DiskRef (its Pages frame alone).
        let mut st = Staging::new(Mode::Fgbi, BlockSize::DEFAULT, 4, 1);
        let batch = disk_ref_batch(1, 0);
        let mut out = Vec::new();
        let mut w = EpochWriter::begin(&mut out, fgbi_header(1, 1));
        w.pages(&mut out, &batch);
        w.finish(&mut out).unwrap();
        let mut image = vec![1u8; 4 * PAGE_SIZE];
        assert!(matches!(
            feed(&mut st, &out, &mut image),
            Err(StreamError::DiskRef {
                epoch: 1,
                page: 1,
                source: CodecError::DiskRefUnresolved { block: 0, .. }
            })
        ));
        assert!(image == vec![1u8; 4 * PAGE_SIZE]);
    }
}
