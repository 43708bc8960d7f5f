//! Copy-on-write checkpoints on KVM: guest RAM registered with a userfaultfd in
//! write-protect mode, once, when the VM is built.
//!
//! [`CowRam::arm`] (guest paused) write-protects the checkpoint's dirty pages in runs and
//! returns a [`Pending`] copy; the guest resumes. [`Pending::complete`] then walks the runs
//! in chunks: copy the chunk's pages that are still pending, unprotect the chunk. A guest
//! write to a protected page stops the writing thread in the kernel (KVM's fault on the
//! host page goes through `get_user_pages`, which raises the userfault) and the fault
//! thread copies the page, if it is still pending, before unprotecting it and waking the
//! writer. One lock orders the three (arm, chunk, fault), so a page is always copied
//! before it is unprotected, and never unprotected under a newer arm without being copied.
//!
//! Protecting costs the kernel per page (a PTE change, and KVM zapping its mapping of the
//! page): 300–450 ns a page on this nested host, about what copying it costs. So
//! [`CowRam::prearm`] protects the pages the epoch has dirtied so far while the guest
//! still runs; a fault on such a page before the pause just unprotects it again (the
//! page is then dirty, so the pause's harvest has it), and the arm in the pause protects
//! only the pages that are not still protected from the prearm.
//!
//! Protecting a page that is not mapped yet (never touched) does nothing here (no
//! `UFFD_FEATURE_WP_UNPOPULATED`), so only pages the guest has written count as protected:
//! a checkpoint's dirty pages, never the untouched pages in a merged gap. A guest without
//! a dirty log (every page counted as dirty) gets no copy-on-write memory.
//!
//! Works on anonymous RAM and on a restored guest's shared memfd (shmem needs a kernel
//! with uffd-wp PTE markers); when the kernel refuses either, the domain offers no
//! [`CowMemory`] and every checkpoint copies in the pause.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::cow::{CopiedPages, CowMemory, PendingCopy};
use ha_guest::domain::DomainError;
use libc::c_void;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use crate::uffd::{Scratch, Uffd, WpFault};

/// Protected ranges closer than this many pages are merged into one run (one ioctl); a
/// guest write to a page in the gap costs a fault that only unprotects it.
const MERGE_GAP: u64 = 8;

/// Pages the background copy handles per lock hold: a write fault waits at most this long.
const CHUNK: u64 = 64;

/// Pages a prearm protects per lock hold.
const PREARM_CHUNK: u64 = 512;

/// Write faults timed on a scratch mapping when the RAM is registered.
const CALIBRATE_FAULTS: usize = 16;

/// Errors of copy-on-write memory.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// The userfaultfd cannot be created (no `/dev/userfaultfd` access, old kernel).
    #[error("cannot create a userfaultfd")]
    Create(#[source] std::io::Error),
    /// Guest RAM cannot be registered for write-protection faults.
    #[error("cannot register {len:#x} bytes of guest RAM for write-protect faults")]
    Register {
        /// Bytes of RAM.
        len: usize,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
    /// The registration succeeded but the kernel offers no `UFFDIO_WRITEPROTECT` on this
    /// kind of memory.
    #[error("the kernel cannot write-protect this guest RAM")]
    NoWriteProtect,
    /// (Un)protecting a range failed.
    #[error("cannot {op} guest pages {first:#x}+{pages}")]
    Protect {
        /// "write-protect" or "unprotect".
        op: &'static str,
        /// First page.
        first: u64,
        /// Pages.
        pages: u64,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
    /// A page could not be copied out of guest RAM.
    #[error("cannot copy guest page {0:#x}")]
    Copy(u64),
    /// The fault thread or its stop signal cannot be set up.
    #[error("cannot start the write-fault thread")]
    Thread(#[source] std::io::Error),
    /// The pending copy was taken over and lost (a bug).
    #[error("pending copy {0} is gone")]
    Lost(u64),
}

fn domain(e: CowError) -> DomainError {
    DomainError::Backend {
        op: "copy-on-write checkpoint",
        source: e.into(),
    }
}

/// One armed copy: the pages, their content as copied so far, and how far the background
/// copy has got through the protected runs.
#[derive(Debug)]
struct Gen {
    id: u64,
    index: Vec<u64>,
    /// The pages' content by slot; allocated behind the guest, not in the pause (zeroing
    /// a reused heap block of this size costs about what copying the pages does),
    /// normally by the background copy before its first chunk.
    data: Vec<u8>,
    /// Pages the fault path copied before `data` was there: (slot, content).
    early: Vec<(usize, Vec<u8>)>,
    done: Vec<bool>,
    /// Protected runs `[start, end)` in pages, increasing.
    runs: Vec<(u64, u64)>,
    /// The run the background copy is in, and the page it continues from.
    run: usize,
    at: u64,
    faulted: usize,
}

impl Gen {
    fn finished(&self) -> bool {
        self.run >= self.runs.len()
    }

    /// Give the copy its buffer (`buffer`, or a new one), with the early pages in it.
    fn install(&mut self, buffer: Option<Vec<u8>>) {
        if self.data.is_empty() {
            self.data = buffer.unwrap_or_else(|| vec![0u8; self.index.len() * PAGE_SIZE]);
        }
        for (slot, page) in self.early.drain(..) {
            self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(&page);
        }
    }

    fn into_copied(mut self) -> CopiedPages {
        self.install(None);
        CopiedPages {
            index: self.index,
            data: self.data,
            faulted: self.faulted,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// The copy armed last, while it is incomplete.
    current: Option<Gen>,
    /// A copy the next arm completed (in its pause) before its owner did.
    finished: Option<Gen>,
    /// Pages protected ahead of the next arm (`prearm`) and not written since, one bit a
    /// page (empty until the first prearm).
    prearmed: Vec<u64>,
}

fn bit(v: &[u64], p: u64) -> bool {
    v.get((p / 64) as usize)
        .is_some_and(|w| w & (1 << (p % 64)) != 0)
}

/// Protected runs `[start, end)` over increasing pages, ranges closer than
/// [`MERGE_GAP`] merged.
fn runs_of(pages: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match runs.last_mut() {
            Some(r) if p <= r.1 + MERGE_GAP => r.1 = p + 1,
            _ => runs.push((p, p + 1)),
        }
    }
    runs
}

#[derive(Debug)]
struct Shared {
    uffd: Uffd,
    ram: Arc<GuestRam>,
    state: Mutex<State>,
    /// Write-protect faults served.
    faults: AtomicU64,
    /// Pages copied in the fault path.
    fault_copies: AtomicU64,
    /// A writer's round trip through a write-protect fault on this host, measured once on
    /// a scratch mapping (kernel fault path, the two wake-ups, a minimal service), ns.
    roundtrip_ns: u64,
    /// Mean time the fault thread spends serving a fault here (the copy, the unprotect),
    /// ns; a running average.
    service_ns: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn addr(&self, page: u64) -> u64 {
        self.ram.host_addr() + page * PAGE_SIZE as u64
    }

    fn protect(&self, first: u64, pages: u64) -> Result<(), CowError> {
        let len = (pages as usize) * PAGE_SIZE;
        self.uffd
            .protect(self.addr(first), len)
            .map_err(|source| CowError::Protect {
                op: "write-protect",
                first,
                pages,
                source,
            })
    }

    /// Unprotect pages and wake any thread waiting on them.
    fn unprotect(&self, first: u64, pages: u64) -> Result<(), CowError> {
        let len = (pages as usize) * PAGE_SIZE;
        self.uffd
            .unprotect(self.addr(first), len)
            .map_err(|source| CowError::Protect {
                op: "unprotect",
                first,
                pages,
                source,
            })
    }

    fn copy(&self, g: &mut Gen, slot: usize) -> Result<(), CowError> {
        let page = g.index[slot];
        let at = page * PAGE_SIZE as u64;
        if g.data.is_empty() {
            let mut one = vec![0u8; PAGE_SIZE];
            self.ram
                .read(at, &mut one)
                .map_err(|_| CowError::Copy(page))?;
            g.early.push((slot, one));
        } else {
            let dst = &mut g.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE];
            self.ram.read(at, dst).map_err(|_| CowError::Copy(page))?;
        }
        g.done[slot] = true;
        Ok(())
    }

    /// The background copy's next chunk of `g`: copy its pending pages, unprotect it.
    fn step(&self, g: &mut Gen) -> Result<(), CowError> {
        let Some(&(_, end)) = g.runs.get(g.run) else {
            return Ok(());
        };
        g.install(None);
        let from = g.at;
        let to = end.min(from + CHUNK);
        let mut slot = g.index.partition_point(|&p| p < from);
        while slot < g.index.len() && g.index[slot] < to {
            if !g.done[slot] {
                self.copy(g, slot)?;
            }
            slot += 1;
        }
        self.unprotect(from, to - from)?;
        if to >= end {
            g.run += 1;
            g.at = g.runs.get(g.run).map_or(0, |r| r.0);
        } else {
            g.at = to;
        }
        Ok(())
    }

    fn finish(&self, g: &mut Gen) -> Result<(), CowError> {
        while !g.finished() {
            self.step(g)?;
        }
        Ok(())
    }

    /// A write fault on `page`: copy it if it is pending, then unprotect it (waking the
    /// writer). Under the lock, so no arm can protect it again in between.
    fn fault(&self, page: u64) -> Result<(), CowError> {
        let t = Instant::now();
        let r = self.fault_locked(page);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // A running average (weight 1/8): one thread writes it.
        let old = self.service_ns.load(Ordering::Relaxed);
        let new = if old == 0 { ns } else { old - old / 8 + ns / 8 };
        self.service_ns.store(new, Ordering::Relaxed);
        r
    }

    fn fault_locked(&self, page: u64) -> Result<(), CowError> {
        self.faults.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if let Some(g) = st.current.as_mut()
            && let Ok(slot) = g.index.binary_search(&page)
            && !g.done[slot]
        {
            self.copy(g, slot)?;
            g.faulted += 1;
            self.fault_copies.fetch_add(1, Ordering::Relaxed);
        }
        // A prearmed page written before its checkpoint: unprotected now, the next arm
        // protects it again (it is dirty).
        if let Some(w) = st.prearmed.get_mut((page / 64) as usize) {
            *w &= !(1 << (page % 64));
        }
        self.unprotect(page, 1)
    }
}

/// Guest RAM registered for write-protect faults, with the thread that serves them.
#[derive(Debug)]
pub struct CowRam {
    shared: Arc<Shared>,
    /// Pages this VMM writes itself while the guest is paused for a checkpoint (the output
    /// drain's tail store): never prearmed, or the drain would wait on the fault thread.
    vmm_pages: Vec<u64>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl CowRam {
    /// Register all of `ram` with a new userfaultfd in write-protect mode and start the
    /// fault thread; `vmm_pages`: pages the VMM writes itself in a checkpoint's pause
    /// (never prearmed). An error means this RAM cannot be checkpointed copy-on-write.
    pub fn new(ram: Arc<GuestRam>, vmm_pages: &[u64]) -> Result<Self, CowError> {
        let uffd = Uffd::new().map_err(CowError::Create)?;
        let len = ram.size();
        let wp = uffd
            .register_wp(ram.host_addr(), len)
            .map_err(|source| CowError::Register { len, source })?;
        if !wp {
            return Err(CowError::NoWriteProtect);
        }
        let roundtrip = calibrate().map_or_else(
            |e| {
                tracing::info!(target: "ha_kvm", error = %e, "cannot time a write fault; the engine estimates it");
                0
            },
            |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
        );
        let shared = Arc::new(Shared {
            uffd,
            ram,
            state: Mutex::new(State::default()),
            faults: AtomicU64::new(0),
            fault_copies: AtomicU64::new(0),
            roundtrip_ns: roundtrip,
            service_ns: AtomicU64::new(0),
        });
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(CowError::Thread)?;
        let stop2 = stop.try_clone().map_err(CowError::Thread)?;
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("castor-cow-fault".into())
            .spawn(move || serve(&s, &stop2))
            .map_err(CowError::Thread)?;
        Ok(Self {
            shared,
            vmm_pages: vmm_pages.to_vec(),
            stop,
            thread: Some(thread),
        })
    }

    /// Write-protect faults served so far (a fault on a page already copied or not in the
    /// copy counts too).
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }

    /// Pages copied in the fault path so far.
    pub fn fault_copies(&self) -> u64 {
        self.shared.fault_copies.load(Ordering::Relaxed)
    }

    /// Complete the copy armed last, if it is not yet (a page it has still to unprotect
    /// must not be protected anew before).
    fn finish_current(&self, st: &mut State) -> Result<(), CowError> {
        if let Some(mut prev) = st.current.take() {
            self.shared.finish(&mut prev)?;
            st.finished = Some(prev);
        }
        Ok(())
    }

    /// Protect `pages` with the guest running, a chunk per lock hold (a write fault on a
    /// page protected here waits at most one chunk), and remember them as prearmed.
    fn prearm_pages(&self, pages: &PageBitmap) -> Result<(), CowError> {
        let mut runs = runs_of(pages.iter_set().map(|p| p as u64));
        // Cut the VMM's own pages out (a merged gap may hold one).
        for &v in &self.vmm_pages {
            runs = runs
                .into_iter()
                .flat_map(|(a, b)| {
                    if (a..b).contains(&v) {
                        vec![(a, v), (v + 1, b)]
                    } else {
                        vec![(a, b)]
                    }
                })
                .filter(|(a, b)| a < b)
                .collect();
        }
        let words = self.shared.ram.size().div_ceil(PAGE_SIZE * 64);
        {
            let mut st = self.shared.lock();
            self.finish_current(&mut st)?;
            if st.prearmed.len() != words {
                st.prearmed = vec![0; words];
            }
        }
        for (a, b) in runs {
            let mut from = a;
            while from < b {
                let to = b.min(from + PREARM_CHUNK);
                let mut st = self.shared.lock();
                // Marked before protecting: a fault on the page (served after this lock
                // hold) then finds it prearmed and clears it. Only the dirty pages: a
                // page in a merged gap may never have been touched, and protecting a page
                // that is not there yet does nothing, so the arm must protect it itself
                // if the guest writes it meanwhile (it is then among the arm's pages).
                let dirty = (from..to).filter(|&p| pages.get(p as usize));
                for p in dirty.clone() {
                    st.prearmed[(p / 64) as usize] |= 1 << (p % 64);
                }
                if let Err(e) = self.shared.protect(from, to - from) {
                    for p in dirty {
                        st.prearmed[(p / 64) as usize] &= !(1 << (p % 64));
                    }
                    return Err(e);
                }
                from = to;
            }
        }
        Ok(())
    }

    fn arm_pages(&self, pages: &PageBitmap) -> Result<Pending, CowError> {
        let index: Vec<u64> = pages.iter_set().map(|p| p as u64).collect();
        let runs = runs_of(index.iter().copied());
        let mut st = self.shared.lock();
        self.finish_current(&mut st)?;
        st.next_id += 1;
        let id = st.next_id;
        // Pages prearmed and not written since are protected already.
        let need = runs_of(index.iter().copied().filter(|&p| !bit(&st.prearmed, p)));
        for &(a, b) in &need {
            if let Err(e) = self.shared.protect(a, b - a) {
                // Leave nothing protected that no copy covers.
                for &(a, b) in &runs {
                    let _ = self.shared.unprotect(a, b - a);
                }
                st.prearmed.fill(0);
                return Err(e);
            }
        }
        // Every prearmed page still protected lies inside `runs` (the prearm's pages are
        // among `pages`, its gaps between two of them): the copy unprotects them all.
        st.prearmed.fill(0);
        let n = index.len();
        st.current = Some(Gen {
            id,
            data: Vec::new(),
            early: Vec::new(),
            done: vec![false; n],
            at: runs.first().map_or(0, |r| r.0),
            index,
            runs,
            run: 0,
            faulted: 0,
        });
        tracing::trace!(target: "ha_kvm", id, pages = n, "armed a copy-on-write checkpoint");
        Ok(Pending {
            shared: Arc::clone(&self.shared),
            id,
            pages: n,
            completed: false,
        })
    }
}

impl CowMemory for CowRam {
    fn arm(&mut self, pages: &PageBitmap) -> Result<Box<dyn PendingCopy>, DomainError> {
        Ok(Box::new(self.arm_pages(pages).map_err(domain)?))
    }

    fn prearm(&mut self, pages: &PageBitmap) -> Result<(), DomainError> {
        self.prearm_pages(pages).map_err(domain)
    }

    /// The round trip timed at registration plus the mean service time of the faults
    /// served since (`None` when the round trip could not be timed).
    fn fault_cost(&self) -> Option<Duration> {
        let rt = self.shared.roundtrip_ns;
        (rt > 0).then(|| {
            Duration::from_nanos(rt.saturating_add(self.shared.service_ns.load(Ordering::Relaxed)))
        })
    }
}

/// Time a writer's round trip through a write-protect fault on this host: write-protect
/// scratch pages, write each from this thread while a helper thread serves the faults as
/// the fault thread does (unprotect and wake). Returns the median.
fn calibrate() -> Result<Duration, CowError> {
    let len = CALIBRATE_FAULTS * PAGE_SIZE;
    let scratch = Scratch::new(len).map_err(CowError::Thread)?;
    let base = scratch.addr.cast::<u8>();
    for i in 0..CALIBRATE_FAULTS {
        // SAFETY: inside the mapping made above, which is readable and writable.
        unsafe { base.add(i * PAGE_SIZE).write_volatile(1) };
    }
    let uffd = Uffd::new().map_err(CowError::Create)?;
    let at = scratch.addr as u64;
    let wp = uffd
        .register_wp(at, len)
        .map_err(|source| CowError::Register { len, source })?;
    if !wp {
        return Err(CowError::NoWriteProtect);
    }
    uffd.protect(at, len).map_err(|source| CowError::Protect {
        op: "write-protect",
        first: 0,
        pages: CALIBRATE_FAULTS as u64,
        source,
    })?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut times = Vec::with_capacity(CALIBRATE_FAULTS);
    std::thread::scope(|sc| {
        let (uffd, done) = (&uffd, &done);
        sc.spawn(move || {
            let mut faults = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one live pollfd over the userfaultfd, open for this scope.
                if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
                    continue;
                }
                faults.clear();
                if uffd.read_faults(&mut faults).is_err() {
                    return;
                }
                for f in &faults {
                    let _ = uffd.unprotect(f.addr & !(PAGE_SIZE as u64 - 1), PAGE_SIZE);
                }
            }
        });
        for i in 0..CALIBRATE_FAULTS {
            let t = Instant::now();
            // SAFETY: inside the scratch mapping; the write blocks until the helper thread
            // unprotects the page.
            unsafe { base.add(i * PAGE_SIZE).write_volatile(2) };
            times.push(t.elapsed());
        }
        done.store(true, Ordering::Relaxed);
    });
    drop(uffd);
    times.sort();
    Ok(times[times.len() / 2])
}

impl Drop for CowRam {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The fault thread: wait for write-protect faults (or the stop signal) and serve them.
fn serve(s: &Shared, stop: &EventFd) {
    let mut faults: Vec<WpFault> = Vec::new();
    let fds: [RawFd; 2] = [s.uffd.as_raw_fd(), stop.as_raw_fd()];
    loop {
        let mut pfd = fds.map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `pfd` is a live array of two pollfd structs over fds this thread's owners
        // keep open until it is joined; poll writes only their `revents`.
        let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(target: "ha_kvm", error = %e, "poll on the userfaultfd failed; write faults are no longer served");
            return;
        }
        if pfd[1].revents != 0 {
            return;
        }
        faults.clear();
        let other = match s.uffd.read_faults(&mut faults) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(target: "ha_kvm", error = %e, "reading the userfaultfd failed; write faults are no longer served");
                return;
            }
        };
        if other > 0 {
            tracing::warn!(target: "ha_kvm", other, "unexpected userfaultfd messages");
        }
        for f in &faults {
            let page = f.addr.saturating_sub(s.ram.host_addr()) / PAGE_SIZE as u64;
            if let Err(e) = s.fault(page) {
                tracing::error!(target: "ha_kvm", page, error = %e, "serving a write fault failed");
            }
        }
    }
}

/// Fault in `buf`'s pages in one call (`MADV_POPULATE_WRITE`, Linux 5.14), outside any
/// lock: touched one by one as pages are copied into it, a fresh buffer costs a page fault
/// per page, about 2.7 µs each on this nested host against 0.6 µs for the copy itself.
/// Best effort: an older kernel leaves the faults to the copy.
fn populate(buf: &mut [u8]) {
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(PAGE_SIZE);
    let end = (start + buf.len()) & !(PAGE_SIZE - 1);
    if end > first {
        // SAFETY: `[first, end)` is whole pages inside `buf`, which this function holds
        // mutably; populating faults them in writable without changing their content.
        let rc =
            unsafe { libc::madvise(first as *mut c_void, end - first, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            tracing::trace!(target: "ha_kvm", error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE");
        }
    }
}

/// A copy armed by [`CowRam`], completed by [`PendingCopy::complete`] on any thread.
#[derive(Debug)]
pub struct Pending {
    shared: Arc<Shared>,
    id: u64,
    pages: usize,
    completed: bool,
}

impl Pending {
    fn run(&mut self) -> Result<CopiedPages, CowError> {
        // The copy's buffer, allocated here without the lock (a fault that copies first
        // allocates its own).
        let mut buffer = vec![0u8; self.pages * PAGE_SIZE];
        populate(&mut buffer);
        let mut buffer = Some(buffer);
        loop {
            let mut st = self.shared.lock();
            let mine = |g: &Option<Gen>| g.as_ref().is_some_and(|g| g.id == self.id);
            let slot = if mine(&st.finished) {
                &mut st.finished
            } else if mine(&st.current) {
                &mut st.current
            } else {
                return Err(CowError::Lost(self.id));
            };
            if let Some(g) = slot.as_mut() {
                g.install(buffer.take());
                self.shared.step(g)?;
            }
            if slot.as_ref().is_some_and(Gen::finished) {
                self.completed = true;
                return slot
                    .take()
                    .map(Gen::into_copied)
                    .ok_or(CowError::Lost(self.id));
            }
            // Let a waiting fault in between chunks.
            drop(st);
        }
    }
}

impl PendingCopy for Pending {
    fn pages(&self) -> usize {
        self.pages
    }

    fn complete(mut self: Box<Self>) -> Result<CopiedPages, DomainError> {
        self.run().map_err(domain)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        let mut st = self.shared.lock();
        if st.finished.as_ref().is_some_and(|g| g.id == self.id) {
            st.finished = None;
        }
        if st.current.as_ref().is_some_and(|g| g.id == self.id)
            && let Some(g) = st.current.take()
        {
            // Unprotect what the copy has not reached; nothing more is copied.
            let mut at = g.at;
            for &(a, b) in g.runs.iter().skip(g.run) {
                let from = at.max(a);
                if let Err(e) = self.shared.unprotect(from, b - from) {
                    tracing::error!(target: "ha_kvm", error = %e, "cannot unprotect a dropped copy's pages");
                }
                at = b;
            }
        }
    }
}
