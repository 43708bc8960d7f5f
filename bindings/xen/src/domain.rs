//! [`XenDomain`]: an existing Xen domain (PVH or HVM) behind the `Domain` trait.
//!
//! Castor does not build the guest: it attaches to a running domain (`--xen-domain`) and
//! protects it. Memory is read through foreign mappings by gfn; the dirty log is Xen's
//! log-dirty mode (`XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`, then `..._CLEAN` at every
//! harvest); the state is the HVM context, the HVM params and the TSC info.
//!
//! Guest memory, as Castor sees it, is the domain's gfn space `0 ..= max_gpfn` with the
//! empty 2 MiB windows left out: a PVH guest's gfns reach 4 GiB (its special frames —
//! xenstore and console rings, ACPI tables — sit just below 4 GiB), but a 128 MiB guest
//! populates only 67 of its 2040 windows. Castor's linear "memory" is the populated
//! windows at attach, in gfn order (their list is saved with the state, so the backup maps
//! them back); memory_size is their count times 2 MiB. Frames that are not populated inside
//! a kept window read as zeros: they are what a restored domain would have there, and both
//! ends of a Castor pair see the same zeros. A window first populated after the attach is
//! not protected (a warning says when the domain's page count changes).

use std::cell::RefCell;

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::domain::{BoxError, Domain, DomainError};

use crate::state::{SAVED_PARAMS, SavedState, WINDOW, gfn_of, image_len};
use crate::xc::{DomInfo, HypercallBuffer, Mapping, Xc, XcError};
use crate::xs::{Xs, XsError};
use std::time::{Duration, Instant};
use xenctrl_sys as sys;

/// HVM params naming frames that dom0's backends (xenstored, xenconsoled, device models)
/// write through their own mappings: Xen's dirty log never sees those writes, so these
/// frames are reported dirty at every harvest. STORE_PFN, CONSOLE_PFN, IOREQ_PFN,
/// BUFIOREQ_PFN, PAGING/MONITOR/SHARING_RING_PFN.
const BACKEND_FRAME_PARAMS: [u32; 7] = [1, 17, 5, 6, 27, 28, 29];

/// Learning rounds at attach (see [`XenDomain::learn_hidden_writes`]) and the run between.
const LEARN_ROUNDS: usize = 3;
/// How long the guest runs in each learning round.
const LEARN_RUN: std::time::Duration = std::time::Duration::from_millis(400);
/// How long the paused guest is watched in each learning round (events from its timer and
/// from dom0 arrive meanwhile).
const LEARN_PAUSED: std::time::Duration = std::time::Duration::from_millis(1500);

/// At most this many frames of a checkpoint are remembered for the check behind the dirty
/// log (see [`XenDomain::check_behind_log`]); a larger dirty set (the first harvest, a
/// pre-copy round) is not.
const TRACK_SENT: usize = 16_384;

/// Frames mapped by one foreign mapping when copying pages (libxc's save maps batches of
/// 1024 too).
const MAP_BATCH: usize = 1024;

/// `SHUTDOWN_suspend`.
const SHUTDOWN_SUSPEND: u32 = 2;

fn backend(op: &'static str) -> impl FnOnce(XcError) -> DomainError {
    move |e| match e {
        XcError::Privcmd(source) => DomainError::Unavailable {
            what: "Xen".into(),
            hint: format!("cannot open {}", crate::xc::PRIVCMD),
            source: Some(Box::new(source)),
        },
        other => DomainError::Backend {
            op,
            source: Box::new(other) as BoxError,
        },
    }
}

/// The windows (gfn / 512) holding at least one populated frame, in order, and the gfns
/// inside them that are not populated. Mapping a hole costs about as much as mapping a
/// frame: this is the slow part of an attach (~16 s for a PVH guest's 4 GiB of gfns under
/// QEMU's TCG; milliseconds natively).
fn probe_windows(xc: &Xc, domid: u32, p2m_pages: u64) -> Result<(Vec<u64>, Vec<u64>), DomainError> {
    let mut out = Vec::new();
    let mut holes = Vec::new();
    for w in 0..p2m_pages.div_ceil(WINDOW) {
        let first = w * WINDOW;
        let gfns: Vec<u64> = (first..(first + WINDOW).min(p2m_pages)).collect();
        let map = xc
            .map(domid, &gfns)
            .map_err(backend("xenforeignmemory_map"))?;
        if map.errs.contains(&0) {
            out.push(w);
            holes.extend(
                (first..first + WINDOW).filter(|g| map.page((g - first) as usize).is_none()),
            );
        }
    }
    Ok((out, holes))
}

/// How the domain is held still for a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// Running.
    Running,
    /// Paused by Castor (`xc_domain_pause`).
    Paused,
    /// Suspended by its own kernel at Castor's request (`control/shutdown = suspend`).
    Suspended,
}

/// What a cooperative suspend needs: a xenstore connection and how long to wait.
#[derive(Debug)]
struct Cooperative {
    xs: Xs,
    timeout: Duration,
}

impl Cooperative {
    /// Ask the guest to suspend itself (`control/shutdown = suspend`) and wait until Xen
    /// reports it shut down for suspend. Returns how long that took.
    fn suspend(&self, xc: &Xc, domid: u32) -> Result<Duration, DomainError> {
        let node = format!("/local/domain/{domid}/control/shutdown");
        let xs_err = |e: XsError| DomainError::Backend {
            op: "xenstore write",
            source: Box::new(e),
        };
        let t0 = Instant::now();
        self.xs.write(&node, "suspend").map_err(xs_err)?;
        let mut nap = Duration::from_micros(100);
        loop {
            let i = xc.info(domid).map_err(backend("xc_domain_getinfo"))?;
            if i.shutdown && i.shutdown_reason == SHUTDOWN_SUSPEND {
                return Ok(t0.elapsed());
            }
            if i.shutdown || i.crashed || i.dying {
                return Err(DomainError::GuestFault(format!(
                    "domain {domid} shut down (reason {}) instead of suspending",
                    i.shutdown_reason
                )));
            }
            if t0.elapsed() > self.timeout {
                // The guest acknowledges by clearing the node: look before withdrawing
                // the request (so that a late suspend does not strand the guest).
                let acked = self.xs.read(&node).is_none_or(|v| v != "suspend");
                self.xs.write(&node, "").map_err(xs_err)?;
                return Err(DomainError::GuestFault(format!(
                    "domain {domid} did not suspend within {:?} of control/shutdown=suspend \
                     ({}; does its kernel support Xen suspend?)",
                    self.timeout,
                    if acked {
                        "it acknowledged the request but did not suspend"
                    } else {
                        "the request was never acknowledged"
                    }
                )));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(2));
        }
    }
}

/// A window of mapped frames.
#[derive(Debug)]
struct Window {
    first: u64,
    map: Mapping,
}

/// The frames the last harvest reported dirty, mapped once while the guest is held: their
/// fingerprints for the check behind the log and the checkpoint's copy both read them.
#[derive(Debug)]
struct DirtyMap {
    /// gfn → its frame's index in `map`.
    at: std::collections::HashMap<u64, usize>,
    map: Mapping,
}

/// An attached Xen domain.
#[derive(Debug)]
pub struct XenDomain {
    // Field order is drop order: the mappings and the buffer go before the handle.
    window: RefCell<Option<Window>>,
    /// Dropped when the guest goes on (see [`DirtyMap`]).
    dirty_map: Option<DirtyMap>,
    bitmap: HypercallBuffer,
    xc: Xc,
    domid: u32,
    /// gfns the dirty log covers (max_gpfn + 1 at attach).
    p2m_pages: u64,
    /// The windows (gfn / 512) making up Castor's linear memory, in order.
    windows: Vec<u64>,
    /// Window → its slot in `windows`.
    slot_of: std::collections::HashMap<u64, usize>,
    /// Gfns inside the windows that were not populated at attach.
    holes: Vec<u64>,
    /// Memory size reported to the engine (windows × 2 MiB).
    size: u64,
    held: Held,
    /// Checkpoint a suspended guest (see [`XenDomain::set_cooperative`]).
    cooperative: Option<Cooperative>,
    logdirty: bool,
    /// `nr_pages` at attach: a change means frames were populated or released, maybe
    /// outside the kept windows.
    nr_pages: u64,
    /// Frames written behind the dirty log (the special frames of [`BACKEND_FRAME_PARAMS`]
    /// and what [`XenDomain::learn_hidden_writes`] found), reported dirty at every harvest.
    backend_frames: Vec<u64>,
    /// Their content as of the last harvest: reads are served from here, so that a
    /// checkpoint's copy and its digest agree even when Xen writes them while paused.
    snapshot: std::collections::HashMap<u64, Box<[u8]>>,
    /// (gfn, hash as of the harvest) of the frames the last harvest reported dirty.
    sent: Vec<(u64, u64)>,
    /// Gfns of the windows whose frame is Xen's own, not guest memory (the guest's grant
    /// table frames, mapped into its physmap; see [`XenDomain::check_special`]): read as
    /// zeros, as libxc's save leaves them out.
    special: std::collections::HashSet<u64>,
    /// The grant table's size when `special` was last found (it grows as the guest
    /// grants); None before the first look.
    grant_frames: Option<u32>,
}

impl XenDomain {
    /// Attach to a running (or paused) domain by id. The domain must be HVM or PVH (PV
    /// guests need their p2m to be mapped, which is not done).
    pub fn attach(domid: u32) -> Result<Self, DomainError> {
        let xc = Xc::open().map_err(backend("xc_interface_open"))?;
        let info = xc.info(domid).map_err(backend("xc_domain_getinfo"))?;
        if !info.hvm {
            return Err(DomainError::BadState(format!(
                "domain {domid} is a PV guest; Castor protects PVH and HVM domains (type = \"pvh\")"
            )));
        }
        if info.dying || info.crashed {
            return Err(DomainError::GuestFault(format!(
                "domain {domid} is dying or crashed"
            )));
        }
        let max_gpfn = xc
            .max_gpfn(domid)
            .map_err(backend("xc_domain_maximum_gpfn"))?;
        let p2m_pages = max_gpfn + 1;
        let (windows, holes) = probe_windows(&xc, domid, p2m_pages)?;
        let slot_of = windows.iter().enumerate().map(|(i, w)| (*w, i)).collect();
        let size = image_len(&windows);
        let bitmap_pages = usize::try_from(p2m_pages.div_ceil(8 * PAGE_SIZE as u64))
            .unwrap_or(usize::MAX)
            .max(1);
        let bitmap = xc
            .hypercall_buffer(bitmap_pages)
            .map_err(backend("xc_hypercall_buffer_alloc_pages"))?;
        let mut backend_frames = Vec::new();
        for p in BACKEND_FRAME_PARAMS {
            let gfn = xc
                .hvm_param(domid, p)
                .map_err(backend("xc_hvm_param_get"))?;
            if gfn != 0 && gfn <= max_gpfn {
                backend_frames.push(gfn);
            }
        }
        tracing::info!(
            domid,
            max_gpfn = format!("{max_gpfn:#x}"),
            backend_frames = format!("{backend_frames:x?}"),
            memory_size = size,
            windows = windows.len(),
            nr_pages = info.nr_pages,
            vcpus = info.max_vcpu_id + 1,
            "attached to the Xen domain"
        );
        Self {
            window: RefCell::new(None),
            dirty_map: None,
            bitmap,
            xc,
            domid,
            p2m_pages,
            windows,
            slot_of,
            holes,
            size,
            // Castor's pause is a reference: a domain paused by someone else stays so.
            held: Held::Running,
            cooperative: None,
            logdirty: false,
            nr_pages: info.nr_pages,
            backend_frames,
            snapshot: std::collections::HashMap::new(),
            sent: Vec::new(),
            special: std::collections::HashSet::new(),
            grant_frames: None,
        }
        .with_special()
    }

    /// Take checkpoints of a suspended guest from now on: [`Domain::pause`] asks the
    /// guest's kernel to suspend itself (`control/shutdown = suspend` in xenstore, as libxl
    /// does) and waits up to `timeout`; [`Domain::resume`] lets it go on with the suspend
    /// cancelled. A domain restored from such a checkpoint sees its suspend succeed and
    /// sets up its event channels, grant tables and shared info again, as after a
    /// migration; one restored from a plain pause cannot (docs/XEN.md).
    pub fn set_cooperative(&mut self, timeout: Duration) -> Result<(), DomainError> {
        let xs = Xs::open().map_err(|e| DomainError::Unavailable {
            what: "xenstore".into(),
            hint: "a cooperative checkpoint asks the guest to suspend through xenstore".into(),
            source: Some(Box::new(e)),
        })?;
        self.cooperative = Some(Cooperative { xs, timeout });
        Ok(())
    }

    /// A domain that `xl restore -p` just built from a Castor checkpoint (`state`): paused,
    /// with the windows and holes of the checkpoint (no probe, no learning, no dirty log).
    pub fn adopt(domid: u32, state: &SavedState) -> Result<Self, DomainError> {
        let xc = Xc::open().map_err(backend("xc_interface_open"))?;
        let info = xc.info(domid).map_err(backend("xc_domain_getinfo"))?;
        let max_gpfn = xc
            .max_gpfn(domid)
            .map_err(backend("xc_domain_maximum_gpfn"))?;
        let bitmap = xc
            .hypercall_buffer(1)
            .map_err(backend("xc_hypercall_buffer_alloc_pages"))?;
        Ok(Self {
            window: RefCell::new(None),
            dirty_map: None,
            bitmap,
            xc,
            domid,
            p2m_pages: max_gpfn + 1,
            windows: state.windows.clone(),
            slot_of: state
                .windows
                .iter()
                .enumerate()
                .map(|(i, w)| (*w, i))
                .collect(),
            holes: state.holes.clone(),
            size: image_len(&state.windows),
            held: if info.paused {
                Held::Paused
            } else {
                Held::Running
            },
            cooperative: None,
            logdirty: false,
            nr_pages: info.nr_pages,
            backend_frames: Vec::new(),
            snapshot: std::collections::HashMap::new(),
            sent: Vec::new(),
            special: std::collections::HashSet::new(),
            grant_frames: None,
        })
    }

    /// The domain id.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// The gfn of Castor's linear page `page`.
    pub fn gfn_of(&self, page: u64) -> u64 {
        gfn_of(&self.windows, page)
    }

    /// Castor's linear page of `gfn`, if its window is kept.
    pub fn page_of(&self, gfn: u64) -> Option<u64> {
        self.slot_of
            .get(&(gfn / WINDOW))
            .map(|s| *s as u64 * WINDOW + gfn % WINDOW)
    }

    /// The windows (gfn / 512) making up Castor's linear memory.
    pub fn windows(&self) -> &[u64] {
        &self.windows
    }

    /// Highest gfn + 1 at attach: the frames the dirty log covers.
    pub fn p2m_pages(&self) -> u64 {
        self.p2m_pages
    }

    /// What Xen says of the domain now.
    pub fn info(&self) -> Result<DomInfo, DomainError> {
        self.xc
            .info(self.domid)
            .map_err(backend("xc_domain_getinfo"))
    }

    /// Turn log-dirty mode off (also done on drop).
    pub fn stop_dirty_log(&mut self) -> Result<(), DomainError> {
        if self.logdirty {
            self.logdirty = false;
            self.xc
                .logdirty_op(self.domid, sys::XEN_DOMCTL_SHADOW_OP_OFF)
                .map_err(backend("log-dirty off"))?;
        }
        Ok(())
    }

    fn start_dirty_log(&mut self) -> Result<(), DomainError> {
        let op = sys::XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY;
        if let Err(e) = self.xc.logdirty_op(self.domid, op) {
            // Left on by a previous run (or another tool): turn it off and on again.
            tracing::warn!(domid = self.domid, error = %e, "log-dirty enable failed; retrying after turning it off");
            self.xc
                .logdirty_op(self.domid, sys::XEN_DOMCTL_SHADOW_OP_OFF)
                .map_err(backend("log-dirty off"))?;
            self.xc
                .logdirty_op(self.domid, op)
                .map_err(backend("log-dirty enable"))?;
        }
        self.logdirty = true;
        Ok(())
    }

    /// Frames written behind the dirty log, reported dirty at every harvest.
    pub fn hidden_frames(&self) -> &[u64] {
        &self.backend_frames
    }

    /// A fingerprint of every populated frame of the kept windows.
    fn fingerprint_frames(&self) -> Result<std::collections::HashMap<u64, u128>, DomainError> {
        let mut out = std::collections::HashMap::new();
        for w in &self.windows {
            self.for_each_frame(w * WINDOW..(w + 1) * WINDOW, |g, frame| {
                if let Some(p) = frame {
                    out.insert(g, xxhash_rust::xxh3::xxh3_128(p));
                }
            })?;
        }
        Ok(out)
    }

    /// Find the frames that change while the domain is held (paused, or suspended in
    /// cooperative mode) and add them to the frames reported dirty and snapshotted at
    /// every harvest.
    ///
    /// Xen writes some guest frames through its own mappings, which log-dirty does not
    /// see: the vCPU info areas and the FIFO event-channel control blocks and event arrays
    /// the guest registered (an event, such as the guest's timer firing, sets pending bits
    /// there even while the domain is paused). Their gfns are not exposed to dom0, so they
    /// are learned: a frame that changes while the guest cannot run was written by Xen (or a
    /// dom0 backend), and so is one that changed while it ran without being logged.
    /// `LEARN_ROUNDS` times: hold, snapshot, fire xenstore events, wait, snapshot, compare;
    /// run, hold, harvest, snapshot, compare with the log.
    ///
    /// Held by a plain pause, the guest's own timer keeps firing, and its first event
    /// usually sets the vCPU info's `evtchn_upcall_pending` before the first snapshot, so
    /// that frame is seldom seen to change (the rig's runs never learned it). A suspended
    /// guest has stopped its timers: the poke's event is the one that sets it.
    /// Called by [`crate::attach_holding`]; leaves the guest as it found it.
    pub fn learn_hidden_writes(&mut self) -> Result<usize, DomainError> {
        let was_paused = self.held != Held::Running;
        let mut found = std::collections::BTreeSet::new();
        let pages = usize::try_from(self.size / PAGE_SIZE as u64).unwrap_or(0);
        let mut bitmap = PageBitmap::new(pages);
        if !self.logdirty {
            self.harvest_dirty(&mut bitmap)?;
        }
        for _ in 0..LEARN_ROUNDS {
            self.pause()?;
            bitmap.clear();
            self.harvest_dirty(&mut bitmap)?;
            let before = self.fingerprint_frames()?;
            // Deliver an event to the paused guest (a xenstore watch it always has fires),
            // so that the frames Xen writes on delivery change now.
            self.poke_xenstore();
            std::thread::sleep(LEARN_PAUSED / 2);
            self.poke_xenstore();
            std::thread::sleep(LEARN_PAUSED / 2);
            let after = self.fingerprint_frames()?;
            // 1. Changed while the guest could not run.
            for (g, h) in &after {
                if before.get(g) != Some(h) {
                    found.insert(*g);
                }
            }
            self.resume()?;
            std::thread::sleep(LEARN_RUN);
            self.pause()?;
            bitmap.clear();
            self.harvest_dirty(&mut bitmap)?;
            let later = self.fingerprint_frames()?;
            self.resume()?;
            // 2. Changed while it ran, but not in the dirty log.
            for (g, h) in &later {
                let idx = self
                    .page_of(*g)
                    .and_then(|p| usize::try_from(p).ok())
                    .unwrap_or(usize::MAX);
                if after.get(g) != Some(h) && !bitmap.get(idx) {
                    found.insert(*g);
                }
            }
        }
        if was_paused {
            self.pause()?;
        }
        let new: Vec<u64> = found
            .into_iter()
            .filter(|g| !self.backend_frames.contains(g))
            .collect();
        tracing::info!(
            domid = self.domid,
            frames = format!("{new:x?}"),
            "frames that change while the domain is held (written by Xen behind the dirty \
             log): sent at every checkpoint, as of the harvest"
        );
        let n = new.len();
        self.backend_frames.extend(new);
        Ok(n)
    }

    /// Fire a xenstore watch every Linux guest has (`control/sysrq`; an empty value is
    /// ignored by the guest): xenstored writes the ring and notifies the guest, and Xen
    /// marks the event pending in the guest's event-channel and vCPU info frames.
    fn poke_xenstore(&self) {
        let path = format!("/local/domain/{}/control/sysrq", self.domid);
        match std::process::Command::new("xenstore-write")
            .args([path.as_str(), ""])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                domid = self.domid,
                stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                "xenstore-write failed; learning without an event"
            ),
            Err(e) => tracing::warn!(
                domid = self.domid,
                error = %e,
                "cannot run xenstore-write; learning without an event"
            ),
        }
    }

    /// Copy the frames written behind the dirty log, as they are now.
    fn take_snapshot(&mut self) -> Result<(), DomainError> {
        let mut snapshot = std::collections::HashMap::new();
        self.with_frames(&self.backend_frames, |g, frame| {
            if let Some(p) = frame {
                snapshot.insert(g, p.into());
            }
        })?;
        self.snapshot = snapshot;
        Ok(())
    }

    /// A hash of each of `gfns` as it is now (None: not mappable).
    fn hash_frames(&self, gfns: &[u64]) -> Result<Vec<Option<u64>>, DomainError> {
        let mut out = Vec::with_capacity(gfns.len());
        self.with_frames(gfns, |_, frame| {
            out.push(frame.map(xxhash_rust::xxh3::xxh3_64));
        })?;
        Ok(out)
    }

    /// Map `gfns` (in one foreign mapping) and call `f(gfn, frame)` for each, in order,
    /// with None for a frame that cannot be mapped (a hole).
    fn with_frames(
        &self,
        gfns: &[u64],
        mut f: impl FnMut(u64, Option<&[u8]>),
    ) -> Result<(), DomainError> {
        if gfns.is_empty() {
            return Ok(());
        }
        let map = self.map_frames(gfns)?;
        for (i, g) in gfns.iter().enumerate() {
            f(*g, map.page(i));
        }
        Ok(())
    }

    /// The check behind the dirty log, at every harvest: a frame the last harvest reported
    /// dirty that has changed since, although the log does not report it now, was written
    /// behind the log (by Xen or a dom0 backend) — a frame the learning at attach missed.
    /// It is reported dirty now, so this checkpoint carries it, and at every checkpoint
    /// from now on. Then the frames reported now are hashed for the next check.
    ///
    /// This catches such a frame when the guest also wrote it in the epoch before, as it
    /// does the event and vCPU info frames whenever it handles an event. It costs a
    /// second read of the dirty frames (skipped for dirty sets over [`TRACK_SENT`]).
    fn check_behind_log(&mut self, dirty: &mut PageBitmap) -> Result<(), DomainError> {
        let prev = std::mem::take(&mut self.sent);
        let quiet: Vec<(u64, u64)> = prev
            .into_iter()
            .filter(|(g, _)| {
                self.page_of(*g)
                    .is_some_and(|p| !dirty.get(usize::try_from(p).unwrap_or(usize::MAX)))
            })
            .collect();
        let gfns: Vec<u64> = quiet.iter().map(|(g, _)| *g).collect();
        let now = self.hash_frames(&gfns)?;
        let found: Vec<u64> = quiet
            .iter()
            .zip(now)
            .filter(|((_, was), now)| *now != Some(*was))
            .map(|((g, _), _)| *g)
            .collect();
        if !found.is_empty() {
            tracing::warn!(
                domid = self.domid,
                frames = format!("{found:x?}"),
                "frames changed behind the dirty log since the last checkpoint (missed by the \
                 learning at attach): sent now, and at every checkpoint from now on"
            );
            self.backend_frames.extend(&found);
            self.take_snapshot()?;
            for g in &found {
                if let Some(p) = self.page_of(*g) {
                    dirty.set(usize::try_from(p).unwrap_or(usize::MAX));
                }
            }
        }
        if dirty.count() <= TRACK_SENT {
            let gfns: Vec<u64> = dirty
                .iter_set()
                .map(|p| self.gfn_of(p as u64))
                .filter(|g| *g < self.p2m_pages && !self.backend_frames.contains(g))
                .collect();
            if gfns.is_empty() {
                return Ok(());
            }
            let map = self.map_frames(&gfns)?;
            self.sent = gfns
                .iter()
                .enumerate()
                .filter_map(|(i, g)| map.page(i).map(|f| (*g, xxhash_rust::xxh3::xxh3_64(f))))
                .collect();
            // Held still, the frames the copy reads next are these, as hashed: keep them
            // mapped for it (dropped when the guest goes on).
            if self.held != Held::Running {
                let at = gfns.iter().enumerate().map(|(i, g)| (*g, i)).collect();
                self.dirty_map = Some(DirtyMap { at, map });
            }
        }
        Ok(())
    }

    /// A frame's content without a new mapping, for [`Domain::read_pages`]: `Some(None)`
    /// (zeros) past the p2m, the harvest's snapshot of a frame written behind the log, or
    /// the harvest's own mapping of the dirty frames; None when it must be mapped.
    fn frame_at_hand(&self, g: u64) -> Option<Option<&[u8]>> {
        if g >= self.p2m_pages {
            return Some(None);
        }
        if let Some(s) = self.snapshot.get(&g) {
            return Some(Some(s));
        }
        self.dirty_map
            .as_ref()
            .and_then(|d| d.at.get(&g).map(|&i| d.map.page(i)))
    }

    /// Drop the cached window (the p2m may have changed).
    fn forget_window(&self) {
        self.window.borrow_mut().take();
    }

    /// `self` with its special frames found ([`XenDomain::check_special`]).
    fn with_special(mut self) -> Result<Self, DomainError> {
        let mut none = PageBitmap::new(0);
        self.check_special(&mut none)?;
        Ok(self)
    }

    /// The special frames: gfns of the windows whose frame is not guest memory but Xen's
    /// own — the grant table frames a PVH or HVM guest maps into its physmap at gfns of
    /// its choosing (Xen's page-type query reports them `XTAB`, and libxc's save leaves
    /// them out). Xen writes them (grant status flags) and the guest writes its grants
    /// into them, neither through the dirty log; a restored guest maps its grant table
    /// again over them. So they are read as zeros. Found again whenever the grant table
    /// has grown (one query per harvest); a gfn that became special or stopped being so
    /// is reported dirty in `dirty`, so the backup's image follows.
    fn check_special(&mut self, dirty: &mut PageBitmap) -> Result<(), DomainError> {
        let frames = self
            .xc
            .grant_frames(self.domid)
            .map_err(backend("GNTTABOP_query_size"))?;
        if self.grant_frames == Some(frames) {
            return Ok(());
        }
        let gfns: Vec<u64> = self
            .windows
            .iter()
            .flat_map(|w| w * WINDOW..((w + 1) * WINDOW).min(self.p2m_pages))
            .collect();
        let types = self
            .xc
            .special_frames(self.domid, &gfns)
            .map_err(backend("xc_get_pfn_type_batch"))?;
        let holes: std::collections::HashSet<u64> = self.holes.iter().copied().collect();
        let now: std::collections::HashSet<u64> = gfns
            .iter()
            .zip(types)
            .filter(|(g, special)| *special && !holes.contains(*g))
            .map(|(g, _)| *g)
            .collect();
        for g in now.symmetric_difference(&self.special) {
            if let Some(p) = self.page_of(*g).and_then(|p| usize::try_from(p).ok())
                && p < dirty.len()
            {
                dirty.set(p);
            }
        }
        let mut list: Vec<u64> = now.iter().copied().collect();
        list.sort_unstable();
        tracing::info!(
            domid = self.domid,
            grant_frames = frames,
            frames = format!("{list:x?}"),
            "special frames (Xen's own, such as the grant table's): read as zeros"
        );
        self.special = now;
        self.grant_frames = Some(frames);
        self.backend_frames.retain(|g| !self.special.contains(g));
        Ok(())
    }

    /// Map `gfns` (in one foreign mapping), the special frames left out (reported as not
    /// mapped, so they read as zeros).
    fn map_frames(&self, gfns: &[u64]) -> Result<Mapping, DomainError> {
        let mut map = self
            .xc
            .map(self.domid, gfns)
            .map_err(backend("xenforeignmemory_map"))?;
        if !self.special.is_empty() {
            for (i, g) in gfns.iter().enumerate() {
                if self.special.contains(g) {
                    map.errs[i] = libc::EPERM;
                }
            }
        }
        Ok(map)
    }

    /// Warn (once per change) when the domain's page count changed since the attach:
    /// frames may have been populated outside the kept windows, which are not protected.
    fn check_pages(&mut self) -> Result<(), DomainError> {
        let nr = self.info()?.nr_pages;
        if nr != self.nr_pages {
            tracing::warn!(
                domid = self.domid,
                was = self.nr_pages,
                now = nr,
                "the domain's page count changed: frames populated outside the windows \
                 kept at attach are not protected"
            );
            self.nr_pages = nr;
        }
        Ok(())
    }

    /// Copy frame `gfn` into `out` (zeros for a hole or past the p2m).
    fn read_frame(&self, gfn: u64, offset: usize, out: &mut [u8]) -> Result<(), DomainError> {
        if gfn >= self.p2m_pages {
            out.fill(0);
            return Ok(());
        }
        if let Some(page) = self.snapshot.get(&gfn) {
            out.copy_from_slice(&page[offset..offset + out.len()]);
            return Ok(());
        }
        let mut w = self.window.borrow_mut();
        let first = gfn - gfn % WINDOW;
        if w.as_ref().is_none_or(|w| w.first != first) {
            w.take();
            let last = (first + WINDOW).min(self.p2m_pages);
            let gfns: Vec<u64> = (first..last).collect();
            let map = self.map_frames(&gfns)?;
            *w = Some(Window { first, map });
        }
        let Some(win) = w.as_ref() else {
            unreachable!("the window was just mapped")
        };
        let i = usize::try_from(gfn - first).unwrap_or(usize::MAX);
        match win.map.page(i) {
            Some(page) => out.copy_from_slice(&page[offset..offset + out.len()]),
            // Not populated (a hole in the gfn space) or not mappable: read as zeros.
            None => out.fill(0),
        }
        Ok(())
    }

    /// Call `f(gfn, frame)` for every gfn in `gfns` in increasing order, with the frame's
    /// content, or None for a hole (not populated, reads as zeros). Maps a window at a time;
    /// faster than [`Domain::read_memory`] page by page for scans.
    pub fn for_each_frame(
        &self,
        gfns: std::ops::Range<u64>,
        mut f: impl FnMut(u64, Option<&[u8]>),
    ) -> Result<(), DomainError> {
        self.forget_window();
        let end = gfns.end.min(self.p2m_pages);
        let mut first = gfns.start;
        while first < end {
            let last = (first + WINDOW).min(end);
            let list: Vec<u64> = (first..last).collect();
            self.with_frames(&list, &mut f)?;
            first = last;
        }
        Ok(())
    }

    /// Save the state; `suspended` records whether the guest suspended itself.
    pub fn save(&self, suspended: bool) -> Result<SavedState, DomainError> {
        let hvm_context = self
            .xc
            .hvm_context(self.domid)
            .map_err(backend("xc_domain_hvm_getcontext"))?;
        let mut params = Vec::new();
        for p in SAVED_PARAMS {
            let v = self
                .xc
                .hvm_param(self.domid, p)
                .map_err(backend("xc_hvm_param_get"))?;
            if v != 0 {
                params.push((p, v));
            }
        }
        let tsc = self
            .xc
            .tsc_info(self.domid)
            .map_err(backend("xc_domain_get_tsc_info"))?;
        Ok(SavedState {
            domid: self.domid,
            max_gpfn: self.p2m_pages - 1,
            windows: self.windows.clone(),
            holes: self.holes.clone(),
            suspended,
            hvm_context,
            params,
            tsc,
        })
    }

    /// Whether the guest has suspended itself (`SHUTDOWN_suspend`).
    pub fn is_suspended(&self) -> Result<bool, DomainError> {
        let i = self.info()?;
        Ok(i.shutdown && i.shutdown_reason == SHUTDOWN_SUSPEND)
    }

    /// Let a guest that suspended itself at someone else's request go on, with its
    /// suspend cancelled, as [`Domain::resume`] does after Castor's own holds (a
    /// toolstack that asked for a suspend and gave up before it came can strand a guest
    /// so: `xl remus` whose backup goes away mid-checkpoint). Needs
    /// [`XenDomain::set_cooperative`] first, for xenstored. Returns whether it was
    /// suspended.
    pub fn resume_if_suspended(&mut self) -> Result<bool, DomainError> {
        if !self.is_suspended()? {
            return Ok(false);
        }
        self.held = Held::Suspended;
        self.resume()?;
        Ok(true)
    }
}

impl Domain for XenDomain {
    fn memory_size(&self) -> u64 {
        self.size
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        let len = buf.len() as u64;
        if gpa.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DomainError::OutOfRange { gpa, len });
        }
        let page = PAGE_SIZE as u64;
        let mut at = gpa;
        let mut done = 0usize;
        while done < buf.len() {
            let offset = usize::try_from(at % page).unwrap_or(0);
            let n = (PAGE_SIZE - offset).min(buf.len() - done);
            self.read_frame(self.gfn_of(at / page), offset, &mut buf[done..done + n])?;
            done += n;
            at += n as u64;
        }
        Ok(())
    }

    /// Hold the guest still: suspended by its own kernel in cooperative mode, paused
    /// otherwise.
    fn pause(&mut self) -> Result<(), DomainError> {
        if self.held != Held::Running {
            return Ok(());
        }
        if let Some(c) = &self.cooperative {
            let took = c.suspend(&self.xc, self.domid)?;
            self.held = Held::Suspended;
            tracing::trace!(
                domid = self.domid,
                took_us = took.as_micros() as u64,
                "suspended"
            );
        } else {
            self.xc
                .pause(self.domid)
                .map_err(backend("xc_domain_pause"))?;
            self.held = Held::Paused;
        }
        Ok(())
    }

    /// Let the guest go on: a suspended guest resumes with its suspend cancelled
    /// (`xc_domain_resume(fast)`, then xenstored is told), a paused one is unpaused.
    fn resume(&mut self) -> Result<(), DomainError> {
        match self.held {
            Held::Running => {}
            Held::Paused => {
                self.xc
                    .unpause(self.domid)
                    .map_err(backend("xc_domain_unpause"))?;
            }
            Held::Suspended => {
                self.xc
                    .resume_cooperative(self.domid)
                    .map_err(backend("xc_domain_resume"))?;
                if let Some(c) = &self.cooperative {
                    c.xs.resume_domain(self.domid)
                        .map_err(|e| DomainError::Backend {
                            op: "xs_resume_domain",
                            source: Box::new(e),
                        })?;
                }
            }
        }
        self.held = Held::Running;
        self.dirty_map = None;
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.held != Held::Running
    }

    /// The pages' frames in foreign mappings of up to [`MAP_BATCH`] frames each, only the
    /// frames asked for: mapping a frame costs hypercalls and dom0 page-table updates,
    /// so mapping the whole 2 MiB window around each scattered dirty page (as
    /// [`Domain::read_memory`] does) costs far more than the copy.
    fn read_pages(&self, pages: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        let last = self.size / PAGE_SIZE as u64;
        if out.len() != pages.len() * PAGE_SIZE {
            return Err(DomainError::OutOfRange {
                gpa: pages.first().map_or(0, |p| p * PAGE_SIZE as u64),
                len: out.len() as u64,
            });
        }
        if let Some(&p) = pages.iter().find(|&&p| p >= last) {
            return Err(DomainError::OutOfRange {
                gpa: p * PAGE_SIZE as u64,
                len: PAGE_SIZE as u64,
            });
        }
        self.forget_window();
        let mut gfns = Vec::with_capacity(MAP_BATCH);
        for (chunk, dest) in pages
            .chunks(MAP_BATCH)
            .zip(out.chunks_mut(MAP_BATCH * PAGE_SIZE))
        {
            // Frames at hand (see `frame_at_hand`) are copied from there; the rest are
            // mapped in one call.
            gfns.clear();
            gfns.extend(
                chunk
                    .iter()
                    .map(|&p| self.gfn_of(p))
                    .filter(|&g| self.frame_at_hand(g).is_none()),
            );
            let map = if gfns.is_empty() {
                None
            } else {
                Some(self.map_frames(&gfns)?)
            };
            let mut mapped = 0;
            for (&p, page) in chunk.iter().zip(dest.chunks_exact_mut(PAGE_SIZE)) {
                let frame = match self.frame_at_hand(self.gfn_of(p)) {
                    Some(f) => f,
                    None => {
                        mapped += 1;
                        map.as_ref().and_then(|m| m.page(mapped - 1))
                    }
                };
                match frame {
                    Some(f) => page.copy_from_slice(f),
                    // Past the p2m, a hole in the gfn space, or not mappable: zeros.
                    None => page.fill(0),
                }
            }
        }
        Ok(())
    }

    fn harvest_dirty(&mut self, dirty: &mut PageBitmap) -> Result<(), DomainError> {
        self.forget_window();
        self.dirty_map = None;
        self.check_pages()?;
        self.check_special(dirty)?;
        if !self.logdirty {
            // Tracking starts now: report every frame, as for a guest created just now.
            self.start_dirty_log()?;
            for p in 0..usize::try_from(self.size / PAGE_SIZE as u64).unwrap_or(0) {
                dirty.set(p);
            }
            return self.take_snapshot();
        }
        let n = self
            .xc
            .logdirty_clean(self.domid, &mut self.bitmap, self.p2m_pages)
            .map_err(backend("log-dirty CLEAN"))?;
        // Xen's bitmap is by gfn; Castor's by linear page (window by window, 8 words each).
        let xen = self.bitmap.words();
        let per = usize::try_from(WINDOW / 64).unwrap_or(8);
        for (slot, w) in self.windows.iter().enumerate() {
            let at = usize::try_from(*w)
                .unwrap_or(usize::MAX)
                .saturating_mul(per);
            if let Some(words) = xen.get(at..at + per) {
                dirty.or_words(slot * per * 64, words);
            }
        }
        // Frames written behind the log (the rings dom0's backends write, the event and
        // vCPU info frames Xen writes): always sent, as of now.
        self.take_snapshot()?;
        for &g in &self.backend_frames {
            if let Some(p) = self.page_of(g) {
                dirty.set(usize::try_from(p).unwrap_or(usize::MAX));
            }
        }
        self.check_behind_log(dirty)?;
        tracing::trace!(domid = self.domid, dirty = n, "log-dirty CLEAN");
        Ok(())
    }

    fn written_since_harvest(&mut self) -> Result<u64, DomainError> {
        if !self.logdirty {
            return Ok(0);
        }
        self.xc
            .logdirty_peek(self.domid, &mut self.bitmap, self.p2m_pages)
            .map_err(backend("log-dirty PEEK"))?;
        // The frames written behind the log are read from the harvest's snapshot and the
        // special ones as zeros: their writes do not reach a digest.
        let xen = self.bitmap.words();
        let mut n = 0;
        for w in &self.windows {
            for g in w * WINDOW..(w + 1) * WINDOW {
                let (word, bit) = (usize::try_from(g / 64).unwrap_or(usize::MAX), g % 64);
                if xen.get(word).is_some_and(|x| x & (1 << bit) != 0)
                    && !self.special.contains(&g)
                    && !self.snapshot.contains_key(&g)
                {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, DomainError> {
        if self.held == Held::Running {
            return Err(DomainError::WrongState {
                op: "save_state",
                needs: "paused",
            });
        }
        let suspended = self.is_suspended()?;
        self.save(suspended)?
            .encode()
            .map_err(|e| DomainError::BadState(e.to_string()))
    }

    // A Xen guest has no Castor output ring (its output goes through its own devices)
    // and no Castor status page: no output channel and no status probe (the defaults).

    /// Its vifs in this dom0, as xenstore's backend nodes name them.
    fn net_interfaces(&self) -> Result<Vec<String>, DomainError> {
        let xs = crate::xs::Xs::open().map_err(|e| DomainError::Backend {
            op: "xs_open",
            source: Box::new(e),
        })?;
        Ok(xs.vif_names(self.domid))
    }

    /// A Xen domain runs on when Castor ends.
    fn outlives_vmm(&self) -> bool {
        true
    }

    fn check_health(&self) -> Result<(), DomainError> {
        let i = match self.xc.info(self.domid) {
            Ok(i) => i,
            Err(XcError::NoDomain(d)) => {
                return Err(DomainError::GuestFault(format!("domain {d} is gone")));
            }
            Err(e) => return Err(backend("xc_domain_getinfo")(e)),
        };
        if i.dying || i.crashed || (i.shutdown && i.shutdown_reason != SHUTDOWN_SUSPEND) {
            return Err(DomainError::GuestFault(format!(
                "domain {} is {}",
                self.domid,
                if i.crashed {
                    "crashed".to_string()
                } else if i.dying {
                    "dying".to_string()
                } else {
                    format!("shut down (reason {})", i.shutdown_reason)
                }
            )));
        }
        Ok(())
    }
}

impl Drop for XenDomain {
    fn drop(&mut self) {
        self.forget_window();
        if let Err(e) = self.stop_dirty_log() {
            tracing::warn!(domid = self.domid, error = %e, "cannot turn log-dirty off");
        }
        // The domain outlives Castor: never leave it paused or suspended behind.
        if let Err(e) = self.resume() {
            tracing::warn!(domid = self.domid, error = %e, "cannot let the domain go on");
        }
    }
}
