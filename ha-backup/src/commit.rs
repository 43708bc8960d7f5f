//! The *commit* stage: the committed image, the state blob of the latest checkpoint, and
//! the epoch numbers. [`Committed::apply`] is the only way the image changes.

use std::time::Instant;

use ha_codec::PAGE_SIZE;
use ha_guest::image::{GuestImage, ImageError};
use ha_wire::stream::StagedEpoch;
use ha_workloads::guest_abi::{
    GuestStatus, OUTPUT_RECORD_SIZE, OUTPUT_RING_SLOTS, OutputRecord, STATUS_GPA,
};

use crate::stage::micros;

/// Why a verified epoch was not (or wrongly) committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The image after the commit differs from the primary's memory digest (fatal).
    #[error("committed image of epoch {epoch} differs from the primary's memory digest")]
    ImageMismatch {
        /// The epoch.
        epoch: u64,
    },
    /// A pre-copy epoch (no state) after a checkpoint: committing it would leave an image
    /// that no saved state belongs to. Refused before the image is touched.
    #[error("epoch {epoch} carries no state but follows checkpoint {checkpoint}")]
    PrecopyAfterCheckpoint {
        /// The epoch.
        epoch: u64,
        /// The last checkpoint.
        checkpoint: u64,
    },
}

/// Why a base image cannot be the committed image's start.
#[derive(Debug, thiserror::Error)]
pub enum BaseImageError {
    /// No memory for the image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The file cannot be read whole.
    #[error("cannot read the base image")]
    Read(#[source] std::io::Error),
    /// The image is not of the guest's memory size.
    #[error("the base image has {len} bytes, the guest's memory {memory_size}")]
    Size {
        /// The image's length.
        len: usize,
        /// The guest's memory size.
        memory_size: usize,
    },
}

/// What a commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Epoch committed.
    pub epoch: u64,
    /// Whether it was a checkpoint.
    pub checkpoint: bool,
    /// Pages written.
    pub records: u64,
    /// The guest's output head in the committed image (None: the guest is not a built-in
    /// one and reports none).
    pub out_head: Option<u64>,
    /// Commit (and Verify check) time in microseconds.
    pub commit_us: u64,
}

/// The backup's committed copy of the guest. The image is a memfd ([`GuestImage`]), which
/// a backend that can takes over as the restored guest's memory at failover.
#[derive(Debug)]
pub struct Committed {
    image: GuestImage,
    /// Whether the image is a built-in guest's (its status page and output ring are at
    /// the guest ABI's addresses); otherwise nothing is read at those addresses.
    builtin: bool,
    state: Option<Vec<u8>>,
    epoch: u64,
    checkpoint: u64,
}

/// The latest checkpoint, given away to be resumed: the image itself, not a copy.
#[derive(Debug)]
pub struct Resumable {
    /// Guest memory at the checkpoint.
    pub image: GuestImage,
    /// The vCPU/device state saved at the checkpoint.
    pub state: Vec<u8>,
    /// The checkpoint's epoch.
    pub epoch: u64,
}

impl Committed {
    /// An all-zero image of `memory_size` bytes; nothing committed. `builtin`: the guest
    /// is a built-in workload guest, whose status page can be read from the image.
    pub fn new(memory_size: usize, builtin: bool) -> Result<Self, ImageError> {
        Ok(Self::over(GuestImage::new(memory_size)?, builtin))
    }

    /// `image` as the committed image; nothing committed yet.
    fn over(image: GuestImage, builtin: bool) -> Self {
        Self {
            image,
            builtin,
            state: None,
            epoch: 0,
            checkpoint: 0,
        }
    }

    /// An image starting as `base` (an older image of the guest: `--base-image`, of
    /// `memory_size` bytes); nothing committed. The primary compares it by fingerprints
    /// and sends only what differs; the first checkpoint's digest checks the result.
    ///
    /// A memfd (the role swap hands this process the guest's memory at the handover as
    /// one) becomes the image itself, without a copy; a file is copied, never changed.
    pub fn from_base(
        memory_size: usize,
        builtin: bool,
        base: &std::path::Path,
    ) -> Result<Self, BaseImageError> {
        let f = std::fs::File::open(base).map_err(BaseImageError::Read)?;
        if GuestImage::is_memfd(&f) {
            let rw = std::fs::File::options()
                .read(true)
                .write(true)
                .open(base)
                .map_err(BaseImageError::Read)?;
            let image = GuestImage::adopt(rw)?;
            if image.len() != memory_size {
                return Err(BaseImageError::Size {
                    len: image.len(),
                    memory_size,
                });
            }
            return Ok(Self::over(image, builtin));
        }
        let mut c = Self::new(memory_size, builtin)?;
        std::os::unix::fs::FileExt::read_exact_at(&f, c.image.as_mut_slice(), 0)
            .map_err(BaseImageError::Read)?;
        Ok(c)
    }

    /// The committed image.
    pub fn image(&self) -> &[u8] {
        self.image.as_slice()
    }

    /// The committed image, with its memfd (whose holes a reader can skip).
    pub fn guest_image(&self) -> &GuestImage {
        &self.image
    }

    /// The last committed epoch (0: none).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The latest checkpoint, if one was committed, with the image itself: what failover
    /// resumes. Whatever was committed after it (pre-copy cannot follow a checkpoint) is
    /// in the image too, so image and state are of the same instant.
    pub fn into_checkpoint(self) -> Option<Resumable> {
        let state = self.state?;
        Some(Resumable {
            image: self.image,
            state,
            epoch: self.checkpoint,
        })
    }

    /// Commit a verified epoch; then check the image against the epoch's Verify digest.
    /// On `ImageMismatch` the image is already changed (the caller must stop).
    pub fn apply(&mut self, staged: StagedEpoch) -> Result<Applied, CommitError> {
        let t = Instant::now();
        if staged.state.is_none() && self.state.is_some() {
            return Err(CommitError::PrecopyAfterCheckpoint {
                epoch: staged.epoch,
                checkpoint: self.checkpoint,
            });
        }
        staged.commit(self.image.as_mut_slice());
        if staged.check_guest_image(&self.image).is_err() {
            return Err(CommitError::ImageMismatch {
                epoch: staged.epoch,
            });
        }
        self.epoch = staged.epoch;
        let checkpoint = staged.state.is_some();
        if let Some(state) = staged.state {
            self.state = Some(state);
            self.checkpoint = staged.epoch;
        }
        Ok(Applied {
            epoch: staged.epoch,
            checkpoint,
            records: staged.pages.len() as u64,
            out_head: self.status().map(|s| s.out_head),
            commit_us: micros(t.elapsed()),
        })
    }

    /// The guest's status page in the committed image (None: not a built-in guest).
    pub fn status(&self) -> Option<GuestStatus> {
        self.builtin.then(|| status_of(self.image.as_slice()))
    }
}

/// The status page of a memory image (all zero if the image is too small).
pub fn status_of(image: &[u8]) -> GuestStatus {
    let at = STATUS_GPA as usize;
    match image.get(at..at + PAGE_SIZE) {
        Some(page) => GuestStatus::read_page(page),
        None => GuestStatus::default(),
    }
}

/// The output records still in an image's ring below its `out_head`, oldest first: seq
/// `max(0, out_head − OUTPUT_RING_SLOTS) .. out_head`, each kept only if its slot still
/// holds that sequence number. These are what the backup re-releases on activation.
pub fn ring_records(image: &[u8]) -> Vec<OutputRecord> {
    let head = status_of(image).out_head;
    (head.saturating_sub(OUTPUT_RING_SLOTS)..head)
        .filter_map(|seq| {
            let at = usize::try_from(OutputRecord::slot_gpa(seq)).ok()?;
            let slot = image.get(at..at + OUTPUT_RECORD_SIZE)?;
            OutputRecord::read_slot(slot).filter(|r| r.seq == seq)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_workloads::guest_abi::status;
    use std::collections::HashMap;

    fn put(image: &mut [u8], at: u64, v: u64) {
        image[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn write_slot(image: &mut [u8], seq: u64, byte: u8) {
        let at = OutputRecord::slot_gpa(seq);
        put(image, at, seq);
        image[at as usize + 8..at as usize + 12].copy_from_slice(&16u32.to_le_bytes());
        image[at as usize + 16..at as usize + 32].fill(byte);
    }

    #[test]
    fn ring_records_take_the_valid_slots_below_out_head() {
        let mut image = vec![0u8; 1 << 20];
        for seq in 0..1100u64 {
            write_slot(&mut image, seq, seq as u8);
        }
        put(&mut image, STATUS_GPA + status::OUT_HEAD as u64, 1100);
        let recs = ring_records(&image);
        assert_eq!(recs.len(), OUTPUT_RING_SLOTS as usize);
        assert_eq!(recs[0].seq, 1100 - OUTPUT_RING_SLOTS);
        assert_eq!(recs.last().map(|r| r.seq), Some(1099));
        assert_eq!(recs[5].payload, vec![recs[5].seq as u8; 16]);
        // A slot that does not hold its seq is skipped.
        put(&mut image, OutputRecord::slot_gpa(1090), 7);
        assert_eq!(ring_records(&image).len(), OUTPUT_RING_SLOTS as usize - 1);
        let empty = vec![0u8; 1 << 20];
        assert!(ring_records(&empty).is_empty());
    }

    fn staged(
        epoch: u64,
        page: u64,
        byte: u8,
        state: bool,
        verify: Option<[u8; 32]>,
    ) -> StagedEpoch {
        let mut pages = HashMap::new();
        pages.insert(page, Box::new([byte; PAGE_SIZE]));
        StagedEpoch {
            epoch,
            pages,
            state: state.then(|| b"state".to_vec()),
            verify,
            disk: Vec::new(),
            verify_disk: None,
            wire_bytes: 0,
            disk_wire_bytes: 0,
        }
    }

    #[test]
    fn a_base_file_is_copied_and_a_base_memfd_taken_over() {
        use std::os::unix::fs::FileExt;
        let size = 16 * PAGE_SIZE;
        let mut base = vec![0u8; size];
        base[3 * PAGE_SIZE] = 5;
        // A file: the image starts as it, and committing leaves the file as it was.
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("base.img");
        std::fs::write(&path, &base).expect("write");
        let mut c = Committed::from_base(size, false, &path).expect("file base");
        assert_eq!(c.image(), &base[..]);
        c.apply(staged(1, 3, 9, false, None)).expect("pre-copy");
        assert_eq!(std::fs::read(&path).expect("read"), base);
        assert!(matches!(
            Committed::from_base(size * 2, false, &path),
            Err(BaseImageError::Read(_))
        ));
        // A memfd (the role swap's): the image is the memfd itself.
        let mut img = GuestImage::new(size).expect("image");
        img.as_mut_slice().copy_from_slice(&base);
        let memfd = img.into_file();
        let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&memfd));
        let mut c = Committed::from_base(size, false, fd_path.as_ref()).expect("memfd base");
        assert_eq!(c.image(), &base[..]);
        c.apply(staged(1, 3, 9, false, None)).expect("pre-copy");
        let mut b = [0u8; 1];
        memfd
            .read_exact_at(&mut b, 3 * PAGE_SIZE as u64)
            .expect("read");
        assert_eq!(b, [9]);
        assert!(matches!(
            Committed::from_base(size * 2, false, fd_path.as_ref()),
            Err(BaseImageError::Size { .. })
        ));
    }

    #[test]
    fn apply_commits_checks_and_keeps_state() {
        // Pre-copy alone leaves nothing to resume.
        let mut c = Committed::new(64 * PAGE_SIZE, true).expect("image");
        let a = c.apply(staged(1, 10, 1, false, None)).expect("pre-copy");
        assert!(!a.checkpoint);
        assert!(c.into_checkpoint().is_none());
        let mut c = Committed::new(64 * PAGE_SIZE, true).expect("image");
        c.apply(staged(1, 10, 1, false, None)).expect("pre-copy");
        let mut want = c.image().to_vec();
        want[11 * PAGE_SIZE..12 * PAGE_SIZE].fill(2);
        let d = *blake3::hash(&want).as_bytes();
        let a = c
            .apply(staged(2, 11, 2, true, Some(d)))
            .expect("checkpoint");
        assert!(a.checkpoint && a.records == 1);
        assert!(c.image() == want);
        let e = c.apply(staged(3, 12, 3, false, None)).unwrap_err();
        assert!(matches!(e, CommitError::PrecopyAfterCheckpoint { .. }));
        assert!(c.image() == want, "a refused epoch leaves the image alone");
        // The refused epoch changed nothing: checkpoint 2 is what there is to resume.
        let cp = c.into_checkpoint().expect("a checkpoint");
        assert_eq!((cp.epoch, cp.state.as_slice()), (2, &b"state"[..]));
        assert!(
            cp.image.as_slice() == want,
            "the image itself is handed over"
        );
        let mut c = Committed::new(64 * PAGE_SIZE, true).expect("image");
        let e = c.apply(staged(3, 12, 3, true, Some([0; 32]))).unwrap_err();
        assert!(matches!(e, CommitError::ImageMismatch { epoch: 3 }));
        assert!(c.into_checkpoint().is_none(), "nothing to resume");
    }
}
