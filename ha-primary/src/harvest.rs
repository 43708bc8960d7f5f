//! The *harvest* stage: stop the guest, take what changed, let it run again.
//!
//! A checkpoint is taken with the guest paused: mark the network buffers (`--net-buffer`),
//! drain its output (the ring's tail store is a VMM write, so it is harvested with the
//! rest), drain the writes its disk completed during the epoch, harvest the dirty-page
//! log, copy the dirty pages, save the vCPU/device state, optionally hash the whole memory
//! and disk (verification), and resume. Everything after that (encoding, sending) happens
//! while the next epoch runs.
//!
//! A checkpoint may instead take its pages copy-on-write ([`crate::cow`]): armed in the
//! pause, copied behind the running guest by the copier thread, waited for by the encoder.

use crate::cow::{Chooser, CopyPath, CopyPolicy};
use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_codec::block::is_zero;
use ha_guest::domain::{Disk, DiskWrite, Domain, DomainError};
use ha_workloads::guest_abi::{GuestStatus, OutputRecord};
use std::time::{Duration, Instant};

/// Dirty pages and their content: what an epoch carries.
#[derive(Debug, Default)]
pub struct Pages {
    /// Page indices, increasing.
    pub index: Vec<u64>,
    /// Their content, back to back.
    pub data: Vec<u8>,
    /// Pages still being copied behind the running guest (a copy-on-write checkpoint):
    /// `index` and `data` hold them once [`Pages::complete`] has run.
    pub pending: Option<crate::cow::Pending>,
}

impl Pages {
    /// Number of pages (a pending copy's included).
    pub fn len(&self) -> usize {
        self.index.len() + self.pending.as_ref().map_or(0, |p| p.pages())
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait for a pending copy and take it into `index` and `data` (a no-op without one).
    /// Returns the pages the guest wrote before the copy reached them.
    pub fn complete(&mut self) -> Result<usize, DomainError> {
        let Some(p) = self.pending.take() else {
            return Ok(0);
        };
        let c = p.complete()?;
        self.index = c.index;
        self.data = c.data;
        Ok(c.faulted)
    }
}

/// One checkpoint, taken with the guest paused.
#[derive(Debug)]
pub struct Checkpoint {
    /// Epoch number.
    pub epoch: u64,
    /// Dirty pages.
    pub pages: Pages,
    /// Saved vCPU/device state.
    pub state: Vec<u8>,
    /// Output produced during the epoch, held until the ack.
    pub outputs: Vec<OutputRecord>,
    /// The writes the guest's disk completed during the epoch, in completion order.
    pub disk: Vec<DiskWrite>,
    /// The guest pages the disk filled with whole blocks during the epoch (teleportation's
    /// exact map; empty where the backend does not see its guest's reads).
    pub reads: Vec<ha_guest::domain::DiskRead>,
    /// Digest of the whole guest memory (verification mode).
    pub verify: Option<[u8; 32]>,
    /// Digest of the whole disk (verification mode, a guest with a disk).
    pub verify_disk: Option<[u8; 32]>,
    /// Verification was asked for but left out: this many pages were written while the
    /// guest was held, after the harvest (see [`Domain::written_since_harvest`]), so a
    /// digest read now would not be of this checkpoint's memory.
    pub verify_skipped: u64,
    /// The guest's status at the checkpoint (None: the guest has no status probe).
    pub status: Option<GuestStatus>,
    /// How its pages were copied.
    pub path: CopyPath,
    /// Where the pause went.
    pub parts: PauseParts,
    /// How long the guest was paused.
    pub pause: Duration,
    /// When the guest was paused.
    pub taken: Instant,
}

/// Where a checkpoint's pause went (the rest: draining, saving state, digests, resuming).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PauseParts {
    /// Stopping the guest (`Domain::pause`).
    pub stop: Duration,
    /// Draining its output.
    pub drain: Duration,
    /// Harvesting the dirty log.
    pub harvest: Duration,
    /// Copying the dirty pages, or arming their copy-on-write copy.
    pub copy: Duration,
    /// Saving the vCPU and device state.
    pub save: Duration,
    /// Resuming the guest.
    pub resume: Duration,
}

/// Copy the pages set in `dirty` out of the guest (skipping all-zero pages when
/// `skip_zero`, for the first pre-copy round, since the backup's image starts zeroed).
pub fn copy_pages(
    d: &dyn Domain,
    dirty: &PageBitmap,
    skip_zero: bool,
    out: &mut Pages,
) -> Result<(), DomainError> {
    out.index.clear();
    out.index.extend(dirty.iter_set().map(|p| p as u64));
    // A buffer handed back by the encoder ([`crate::encode::Job::recycle`]) is faulted in
    // already and keeps its length, so only what it grows by is zero-filled before the
    // read overwrites it; a new or grown one is faulted in here in one call.
    let need = out.index.len() * PAGE_SIZE;
    if out.data.capacity() < need {
        out.data.clear();
        out.data.reserve(need);
        populate(&mut out.data);
    }
    out.data.resize(need, 0);
    d.read_pages(&out.index, &mut out.data)?;
    if skip_zero {
        // Keep the pages that are not all zeros, in order, packed to the front.
        let mut kept = 0;
        for i in 0..out.index.len() {
            let at = i * PAGE_SIZE;
            if is_zero(&out.data[at..at + PAGE_SIZE]) {
                continue;
            }
            if kept != i {
                out.index[kept] = out.index[i];
                out.data.copy_within(at..at + PAGE_SIZE, kept * PAGE_SIZE);
            }
            kept += 1;
        }
        out.index.truncate(kept);
        out.data.truncate(kept * PAGE_SIZE);
    }
    Ok(())
}

/// Fault in the pages of `v`'s spare capacity in one call (`MADV_POPULATE_WRITE`, Linux
/// 5.14): filled page by page, a fresh buffer costs a page fault per page, about 2.7 µs
/// each on this nested host against 0.6 µs for copying the page. Best effort: an older
/// kernel leaves the faults to the copy.
fn populate(v: &mut Vec<u8>) {
    let spare = v.spare_capacity_mut();
    let start = spare.as_mut_ptr() as usize;
    let first = start.next_multiple_of(PAGE_SIZE);
    let end = (start + spare.len()) & !(PAGE_SIZE - 1);
    if end > first {
        // SAFETY: `[first, end)` is whole pages inside `v`'s allocation, which this
        // function holds mutably; populating faults them in writable and writes nothing.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                end - first,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }
}

/// blake3 of the whole guest memory.
pub fn memory_digest(d: &dyn Domain) -> Result<[u8; 32], DomainError> {
    digest(d.memory_size(), |at, buf| d.read_memory(at, buf))
}

/// blake3 of the whole disk, read through [`Disk::read_at`] (the guest paused).
pub fn disk_digest(disk: &dyn Disk) -> Result<[u8; 32], DomainError> {
    digest(disk.disk_size(), |at, buf| disk.read_at(at, buf))
}

/// blake3 of `size` bytes read in 1 MiB pieces by `read(offset, buf)`.
fn digest(
    size: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), DomainError>,
) -> Result<[u8; 32], DomainError> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        read(at, &mut buf[..n])?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

/// Take checkpoint `epoch`: pause, drain output, harvest, copy (or arm a copy-on-write,
/// as `cow` chooses), save, (digest), resume. The harvest is ORed into `dirty`, so pages
/// the caller already knows to be dirty (a pre-copy round's last harvest) are sent too; the
/// caller clears it between checkpoints. `mark` runs first thing with the guest paused:
/// the network buffers' mark for this checkpoint ([`crate::hold::HeldOutput::mark`]).
pub fn take(
    d: &mut dyn Domain,
    epoch: u64,
    dirty: &mut PageBitmap,
    verify: bool,
    cow: &mut Chooser,
    mark: &mut dyn FnMut() -> Result<(), DomainError>,
    spare: Pages,
) -> Result<Checkpoint, DomainError> {
    // The previous copy-on-write copy finishes with the guest running, not in this pause.
    cow.settle();
    let early = prearm(d, dirty, cow)?;
    let taken = Instant::now();
    d.pause()?;
    let stop = taken.elapsed();
    // The guest stands still: the network buffers' mark splits its packets here.
    let r = mark().and_then(|()| take_paused(d, epoch, dirty, verify, cow, early, spare));
    // Resume whatever happened: a failed checkpoint must not leave the guest stopped.
    let t = Instant::now();
    let resumed = d.resume();
    let resume = t.elapsed();
    let pause = taken.elapsed();
    // A copy-on-write copy starts behind the running guest.
    cow.release();
    let mut cp = r?;
    resumed?;
    cp.pause = pause;
    cp.taken = taken;
    cp.parts.stop = stop;
    cp.parts.resume = resume;
    Ok(cp)
}

/// Before the pause of a checkpoint that may go copy-on-write: harvest what the epoch has
/// dirtied so far (into `dirty`) and choose the path on it; for copy-on-write, protect
/// those pages now, with the guest running, so that the pause protects only the pages
/// written from here on. Returns the path chosen (None: chosen in the pause).
fn prearm(
    d: &mut dyn Domain,
    dirty: &mut PageBitmap,
    cow: &mut Chooser,
) -> Result<Option<CopyPath>, DomainError> {
    if cow.policy() == CopyPolicy::Pause || d.cow_memory().is_none() {
        return Ok(None);
    }
    d.harvest_dirty(dirty)?;
    let path = cow.choose(dirty.count(), d.cow_memory().map(|c| c.fault_cost()));
    if path == CopyPath::Cow
        && let Some(c) = d.cow_memory()
    {
        c.prearm(dirty)?;
    }
    Ok(Some(path))
}

fn take_paused(
    d: &mut dyn Domain,
    epoch: u64,
    dirty: &mut PageBitmap,
    verify: bool,
    cow: &mut Chooser,
    early: Option<CopyPath>,
    mut pages: Pages,
) -> Result<Checkpoint, DomainError> {
    let t = Instant::now();
    let mut outputs = Vec::new();
    if let Some(o) = d.output_channel() {
        o.drain(&mut outputs)?;
    }
    let drain = t.elapsed();
    let mut disk = Vec::new();
    let mut reads = Vec::new();
    let mut verify_disk = None;
    if let Some(k) = d.disk() {
        k.drain_writes(&mut disk)?;
        k.drain_reads(&mut reads)?;
        if verify {
            verify_disk = Some(disk_digest(k)?);
        }
    }
    let t = Instant::now();
    d.harvest_dirty(dirty)?;
    let harvest = t.elapsed();
    let path = match early {
        Some(p) => p,
        None => cow.choose(dirty.count(), d.cow_memory().map(|c| c.fault_cost())),
    };
    let t = Instant::now();
    match path {
        CopyPath::Pause => {
            copy_pages(d, dirty, false, &mut pages)?;
            cow.copied(pages.len(), t.elapsed());
        }
        CopyPath::Cow => {
            let armed = d
                .cow_memory()
                .ok_or(DomainError::NoCapability("copy-on-write memory"))?
                .arm(dirty)?;
            let pending = cow
                .armed(armed, t.elapsed())
                .map_err(|e| DomainError::Backend {
                    op: "copy-on-write checkpoint",
                    source: e.into(),
                })?;
            pages.pending = Some(pending);
        }
    }
    let copy = t.elapsed();
    let t = Instant::now();
    let state = d.save_state()?;
    let save = t.elapsed();
    // Memory written after the harvest (by someone else: the guest is held) would make a
    // digest read now not this checkpoint's: none is computed then, or it is dropped if
    // such writes came while it was read.
    let mut verify_skipped = if verify {
        d.written_since_harvest()?
    } else {
        0
    };
    let mut verify = if verify && verify_skipped == 0 {
        Some(memory_digest(d)?)
    } else {
        None
    };
    if verify.is_some() {
        verify_skipped = d.written_since_harvest()?;
    }
    if verify_skipped > 0 {
        verify = None;
        verify_disk = None;
    }
    let status = d.status_probe().map(|p| p.read_status()).transpose()?;
    Ok(Checkpoint {
        epoch,
        pages,
        state,
        outputs,
        disk,
        reads,
        verify,
        verify_disk,
        verify_skipped,
        status,
        path,
        parts: PauseParts {
            stop: Duration::ZERO,
            drain,
            harvest,
            copy,
            save,
            resume: Duration::ZERO,
        },
        pause: Duration::ZERO,
        taken: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_guest::testing::StubDomain;

    #[test]
    fn a_digest_over_memory_written_while_held_is_left_out() {
        let take_with = |written: u64| {
            let mut d = StubDomain {
                written,
                ..StubDomain::with_memory(vec![7u8; 4 * PAGE_SIZE])
            };
            let mut dirty = PageBitmap::new(4);
            let mut cow = Chooser::new(crate::cow::CopyPolicy::Pause);
            take_paused(
                &mut d,
                3,
                &mut dirty,
                true,
                &mut cow,
                Some(CopyPath::Pause),
                Pages::default(),
            )
            .unwrap()
        };
        let quiet = take_with(0);
        assert_eq!(quiet.verify_skipped, 0);
        assert_eq!(
            quiet.verify,
            Some(memory_digest(&StubDomain::with_memory(vec![7u8; 4 * PAGE_SIZE])).unwrap())
        );
        let busy = take_with(5);
        assert_eq!(busy.verify_skipped, 5);
        assert_eq!(busy.verify, None);
        assert_eq!(busy.verify_disk, None);
    }

    #[test]
    fn copy_pages_overwrites_a_recycled_buffer_and_packs_out_zero_pages() {
        // Pages 1, 3, 4 and 6 hold their number; the others are zero.
        let mut mem = vec![0u8; 8 * PAGE_SIZE];
        for p in [1usize, 3, 4, 6] {
            mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(p as u8);
        }
        let d = StubDomain::with_memory(mem);
        let mut dirty = PageBitmap::new(8);
        for p in [0usize, 1, 2, 3, 6, 7] {
            dirty.set(p);
        }
        // A recycled buffer: longer than needed and full of stale bytes.
        let mut out = Pages {
            data: vec![0xee; 10 * PAGE_SIZE],
            ..Pages::default()
        };
        copy_pages(&d, &dirty, false, &mut out).unwrap();
        assert_eq!(out.index, [0, 1, 2, 3, 6, 7]);
        assert_eq!(out.data.len(), 6 * PAGE_SIZE);
        for (i, p) in out.index.iter().enumerate() {
            let want = if [1, 3, 6].contains(p) { *p as u8 } else { 0 };
            assert!(
                out.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .iter()
                    .all(|b| *b == want)
            );
        }
        out.data.resize(10 * PAGE_SIZE, 0xee);
        copy_pages(&d, &dirty, true, &mut out).unwrap();
        assert_eq!(out.index, [1, 3, 6]);
        assert_eq!(out.data.len(), 3 * PAGE_SIZE);
        for (i, p) in out.index.iter().enumerate() {
            assert!(
                out.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .iter()
                    .all(|b| *b == *p as u8)
            );
        }
    }

    #[test]
    fn read_pages_refuses_a_buffer_of_the_wrong_size() {
        let d = StubDomain::with_memory(vec![0; 4 * PAGE_SIZE]);
        let mut out = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            d.read_pages(&[0, 1], &mut out),
            Err(DomainError::OutOfRange { .. })
        ));
    }
}
