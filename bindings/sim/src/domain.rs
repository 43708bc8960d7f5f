//! [`SimDomain`] and [`SimFactory`]: a guest whose one vCPU is a Rust thread running a
//! built-in workload over in-process memory, behind the `Domain` seam.
//!
//! The vCPU thread checks an `attention` flag at every unit boundary (and while it waits
//! for its pacing deadline); `pause` raises it and waits until the thread reports itself
//! parked, so once `pause` returns nothing writes guest memory until `resume`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::domain::{
    Devices, Disk, DiskWrite, Domain, DomainError, DomainFactory, GuestSpec, OutputChannel,
    StatusProbe, read_status_page,
};
use ha_workloads::guest_abi::{GuestParams, OutputRecord, PARAMS_GPA};

use crate::disk::SimDisk;
use crate::memory::GuestMemory;
use crate::ring::OutputQueue;
use crate::state::SavedState;
use crate::workload::{self, GuestError, Vcpu};

/// Pacing waits longer than this sleep on the condition variable (the kernel's timer
/// slack is about 50 µs); shorter ones spin.
const SPIN_BELOW: Duration = Duration::from_micros(60);

/// Errors of the sim backend's own operations (wrapped in `DomainError::Backend`).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The guest's parameters cannot run in its memory.
    #[error("invalid guest: {0}")]
    Guest(#[from] GuestError),
    /// The caller's bitmap does not cover exactly the guest's pages.
    #[error("dirty bitmap covers {got} pages, the guest has {expected}")]
    BitmapLen {
        /// Pages the bitmap covers.
        got: usize,
        /// Pages the guest has.
        expected: usize,
    },
    /// Draining the output ring failed.
    #[error(transparent)]
    Ring(#[from] crate::ring::RingError),
    /// The vCPU thread could not be started.
    #[error("cannot spawn the vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] ha_guest::diskimage::DiskImageError),
    /// Reading the disk for the VMM failed.
    #[error("cannot read the disk at {offset:#x}")]
    DiskRead {
        /// Byte offset.
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn backend(op: &'static str, e: impl Into<SimError>) -> DomainError {
    DomainError::Backend {
        op,
        source: Box::new(e.into()),
    }
}

/// Run control shared by the domain and its vCPU thread (under `Shared::ctl`).
#[derive(Debug)]
struct Control {
    /// The domain wants the vCPU running.
    run: bool,
    /// The domain is being dropped.
    stop: bool,
    /// The vCPU is parked at a unit boundary.
    parked: bool,
    /// The vCPU thread has ended (stop, fault or panic).
    exited: bool,
    /// Why the guest stopped on its own, if it did.
    fault: Option<String>,
    /// The pacing timestamp, handed over while parked (for save/restore).
    last: Option<Instant>,
}

/// What the domain and its vCPU thread share.
#[derive(Debug)]
struct Shared {
    mem: GuestMemory,
    output: OutputQueue,
    /// The guest's disk, if it has one (the vCPU's batches and the domain's drains).
    disk: Option<Mutex<SimDisk>>,
    ctl: Mutex<Control>,
    cv: Condvar,
    /// Raised (under `ctl`) when the vCPU must park or stop; read lock-free per unit.
    attention: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Control>) -> MutexGuard<'a, Control> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }
}

/// A simulated guest: in-process memory with software dirty tracking and one workload
/// thread. Created paused; dropping it stops the thread.
#[derive(Debug)]
pub struct SimDomain {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    paused: bool,
}

impl SimDomain {
    /// Create a fresh guest from `spec`: zeroed memory, the params page (and for `web` the
    /// document root) written and dirty, the vCPU thread started and parked.
    pub fn create(spec: &GuestSpec) -> Result<Self, DomainError> {
        let memory_size = spec.memory_size;
        let disk = open_disk(&spec.devices)?;
        let mut params = spec.params.clone();
        params.disk_size = disk.as_ref().map_or(0, SimDisk::size);
        let spec = &GuestSpec {
            params,
            ..spec.clone()
        };
        workload::validate(&spec.params, memory_size).map_err(|e| match e {
            GuestError::HeapOutside { gpa, size, .. } => DomainError::OutOfRange { gpa, len: size },
            e => backend("sim create", e),
        })?;
        let mem = GuestMemory::zeroed(memory_size);
        let mut page = vec![0u8; PAGE_SIZE];
        spec.params.write_page(&mut page);
        mem.write_bytes(PARAMS_GPA, &page);
        if let Some((gpa, doc)) = ha_workloads::web::docroot(&spec.params) {
            mem.write_bytes(gpa, &doc);
        }
        if let Some((gpa, table)) = ha_workloads::files::file_table(&spec.params) {
            mem.write_bytes(gpa, &table);
        }
        tracing::debug!(memory_size, params = ?spec.params, "sim: creating guest");
        Self::start(mem, disk, None)
    }

    /// Build a guest from a memory image and the blob [`Domain::save_state`] returned at
    /// the same checkpoint, paused. Nothing is dirty until the guest runs.
    ///
    /// Errors: `BadState` for a blob that is not a valid sim state or an image whose
    /// params page cannot run; `ImageSize` when the image is not the saved memory size.
    pub fn restore(image: &[u8], state: &[u8], devices: &Devices) -> Result<Self, DomainError> {
        let saved = SavedState::decode(state).map_err(|e| DomainError::BadState(e.to_string()))?;
        if image.len() as u64 != saved.memory_size {
            return Err(DomainError::ImageSize {
                got: image.len() as u64,
                expected: saved.memory_size,
            });
        }
        let mem = GuestMemory::from_image(image);
        let params = workload::read_params(&mem)
            .map_err(|e| DomainError::BadState(format!("memory image: {e}")))?;
        let disk = open_disk(devices)?;
        let size = disk.as_ref().map_or(0, SimDisk::size);
        if size != params.disk_size {
            return Err(DomainError::BadState(format!(
                "the guest's disk was {} bytes, the disk given is {size} bytes",
                params.disk_size
            )));
        }
        let now = Instant::now();
        let last = saved.pacing_age.and_then(|age| now.checked_sub(age));
        tracing::debug!(
            memory_size = saved.memory_size,
            ?params,
            "sim: restoring guest"
        );
        Self::start(mem, disk, last)
    }

    fn start(
        mem: GuestMemory,
        disk: Option<SimDisk>,
        last: Option<Instant>,
    ) -> Result<Self, DomainError> {
        let shared = Arc::new(Shared {
            mem,
            output: OutputQueue::default(),
            disk: disk.map(Mutex::new),
            ctl: Mutex::new(Control {
                run: false,
                stop: false,
                parked: false,
                exited: false,
                fault: None,
                last,
            }),
            cv: Condvar::new(),
            attention: AtomicBool::new(true),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sim-vcpu".into())
            .spawn(move || vcpu_thread(thread_shared))
            .map_err(|e| backend("sim spawn vCPU", SimError::Spawn(e)))?;
        let mut d = Self {
            shared,
            thread: Some(thread),
            paused: false,
        };
        d.pause()?;
        Ok(d)
    }

    /// The guest's parameters, read from its params page.
    pub fn params(&self) -> Result<GuestParams, DomainError> {
        workload::read_params(&self.shared.mem).map_err(|e| backend("sim params", e))
    }

    #[cfg(test)]
    pub(crate) fn liveness_probe(&self) -> std::sync::Weak<dyn std::any::Any + Send + Sync> {
        let strong: Arc<dyn std::any::Any + Send + Sync> = self.shared.clone();
        Arc::downgrade(&strong)
    }
}

impl Drop for SimDomain {
    fn drop(&mut self) {
        {
            let mut c = self.shared.lock();
            c.stop = true;
            self.shared.attention.store(true, Ordering::Release);
            self.shared.cv.notify_all();
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("sim: vCPU thread panicked");
        }
    }
}

impl OutputChannel for SimDomain {
    fn drain(&mut self, out: &mut Vec<OutputRecord>) -> Result<(), DomainError> {
        // Hand over what doorbells already drained even if the ring itself is broken.
        let res = self.shared.output.drain_ring(&self.shared.mem);
        self.shared.output.take(out);
        res.map(|_| ()).map_err(|e| backend("sim drain_output", e))
    }
}

/// Open the disk `devices` names, if any.
fn open_disk(devices: &Devices) -> Result<Option<SimDisk>, DomainError> {
    devices
        .disk
        .as_deref()
        .map(SimDisk::open)
        .transpose()
        .map_err(|e| backend("sim open disk", e))
}

impl SimDomain {
    fn disk_lock(&self) -> Option<MutexGuard<'_, SimDisk>> {
        self.shared
            .disk
            .as_ref()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Disk for SimDomain {
    fn disk_size(&self) -> u64 {
        self.disk_lock().map_or(0, |d| d.size())
    }

    fn drain_writes(&mut self, out: &mut Vec<DiskWrite>) -> Result<(), DomainError> {
        if let Some(mut d) = self.disk_lock() {
            d.drain(out);
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        let Some(d) = self.disk_lock() else {
            return Err(DomainError::NoCapability("disk"));
        };
        d.read_at(offset, buf)
            .map_err(|source| backend("sim read disk", SimError::DiskRead { offset, source }))
    }

    fn image_reader(&self) -> Result<Option<std::fs::File>, DomainError> {
        self.disk_lock()
            .map(|d| d.image())
            .transpose()
            .map_err(|e| DomainError::Backend {
                op: "sim clone the disk image",
                source: Box::new(e),
            })
    }
}

impl StatusProbe for SimDomain {
    fn read_status(&self) -> Result<ha_workloads::guest_abi::GuestStatus, DomainError> {
        read_status_page(self)
    }
}

impl Domain for SimDomain {
    fn memory_size(&self) -> u64 {
        self.shared.mem.size()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        self.shared.mem.read(gpa, buf)
    }

    fn pause(&mut self) -> Result<(), DomainError> {
        let mut c = self.shared.lock();
        c.run = false;
        self.shared.attention.store(true, Ordering::Release);
        self.shared.cv.notify_all();
        while !c.parked && !c.exited {
            c = self.shared.wait(c);
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DomainError> {
        let mut c = self.shared.lock();
        if let Some(f) = &c.fault {
            return Err(DomainError::GuestFault(f.clone()));
        }
        if c.exited {
            return Err(DomainError::GuestFault("the vCPU thread has ended".into()));
        }
        c.run = true;
        self.shared.attention.store(false, Ordering::Release);
        self.shared.cv.notify_all();
        self.paused = false;
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn harvest_dirty(&mut self, dirty: &mut PageBitmap) -> Result<(), DomainError> {
        let expected = self.shared.mem.pages();
        if dirty.len() != expected {
            return Err(backend(
                "sim harvest_dirty",
                SimError::BitmapLen {
                    got: dirty.len(),
                    expected,
                },
            ));
        }
        self.shared.mem.harvest(dirty);
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, DomainError> {
        if !self.paused {
            return Err(DomainError::WrongState {
                op: "save_state",
                needs: "paused",
            });
        }
        let last = self.shared.lock().last;
        let saved = SavedState {
            memory_size: self.shared.mem.size(),
            pacing_age: last.map(|t| t.elapsed()),
        };
        saved
            .encode()
            .map_err(|e| DomainError::BadState(e.to_string()))
    }

    /// The built-in guest's output ring.
    fn output_channel(&mut self) -> Option<&mut dyn OutputChannel> {
        Some(self)
    }

    /// The built-in guest's status page.
    fn status_probe(&self) -> Option<&dyn StatusProbe> {
        Some(self)
    }

    /// The guest's disk, when it was given one.
    fn disk(&mut self) -> Option<&mut dyn Disk> {
        if self.shared.disk.is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn check_health(&self) -> Result<(), DomainError> {
        let c = self.shared.lock();
        match &c.fault {
            Some(f) => Err(DomainError::GuestFault(f.clone())),
            None if c.exited && !c.stop => {
                Err(DomainError::GuestFault("the vCPU thread has ended".into()))
            }
            None => Ok(()),
        }
    }
}

/// Creates [`SimDomain`]s (backend name `"sim"`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SimFactory;

impl SimFactory {
    /// The sim backend's factory.
    pub fn new() -> Self {
        Self
    }
}

impl DomainFactory for SimFactory {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn create(&self, spec: &GuestSpec) -> Result<Box<dyn Domain>, DomainError> {
        Ok(Box::new(SimDomain::create(spec)?))
    }

    fn restore(
        &self,
        image: &[u8],
        state: &[u8],
        devices: &Devices,
    ) -> Result<Box<dyn Domain>, DomainError> {
        Ok(Box::new(SimDomain::restore(image, state, devices)?))
    }
}

/// Marks the vCPU exited (with a fault if it panicked) however the thread ends.
struct ExitGuard<'a>(&'a Shared);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        let mut c = self.0.lock();
        if std::thread::panicking() && c.fault.is_none() {
            c.fault = Some("the vCPU thread panicked".into());
        }
        c.exited = true;
        c.parked = false;
        self.0.cv.notify_all();
    }
}

/// Body of the vCPU thread.
fn vcpu_thread(shared: Arc<Shared>) {
    let _guard = ExitGuard(&shared);
    if let Err(e) = run_vcpu(&shared) {
        tracing::warn!(error = %e, "sim: guest stopped");
        shared.lock().fault = Some(e.to_string());
    }
}

/// How a wait for the pacing deadline ended.
enum Paced {
    /// The deadline passed.
    Go,
    /// Pause or stop was requested first.
    Interrupted,
}

/// Run units until stopped; `Err` is a guest fault.
fn run_vcpu(shared: &Shared) -> Result<(), GuestError> {
    let mut vcpu: Option<(Vcpu, Option<Duration>)> = None;
    let mut last: Option<Instant> = None;
    let mut doorbell = || -> Result<(), GuestError> {
        shared.output.drain_ring(&shared.mem)?;
        Ok(())
    };
    loop {
        if shared.attention.load(Ordering::Acquire) {
            let mut c = shared.lock();
            c.last = last;
            c.parked = true;
            shared.cv.notify_all();
            while !c.run && !c.stop {
                c = shared.wait(c);
            }
            if c.stop {
                return Ok(());
            }
            c.parked = false;
            last = c.last;
            continue;
        }
        // First run: read the params page, like the guest's first instructions would.
        let (cpu, interval) = match &mut vcpu {
            Some(v) => (&mut v.0, v.1),
            None => {
                let params = workload::read_params(&shared.mem)?;
                let interval =
                    (params.rate > 0).then(|| Duration::from_nanos(1_000_000_000 / params.rate));
                tracing::debug!(?params, "sim: vCPU starting");
                let v = vcpu.insert((workload::load(&params, &shared.mem), interval));
                (&mut v.0, v.1)
            }
        };
        if let Some(interval) = interval {
            if let Some(l) = last {
                match pace(shared, l + interval) {
                    Paced::Go => {}
                    Paced::Interrupted => continue,
                }
            }
            last = Some(Instant::now());
        }
        workload::unit(cpu, &shared.mem, &mut doorbell, shared.disk.as_ref())?;
        tracing::trace!(progress = cpu.progress(), "sim: unit done");
    }
}

/// Wait until `deadline`, returning early if the domain wants the vCPU parked.
fn pace(shared: &Shared, deadline: Instant) -> Paced {
    loop {
        if shared.attention.load(Ordering::Acquire) {
            return Paced::Interrupted;
        }
        let now = Instant::now();
        if now >= deadline {
            return Paced::Go;
        }
        let left = deadline - now;
        if left > SPIN_BELOW {
            let c = shared.lock();
            if !shared.attention.load(Ordering::Acquire) {
                let _unused = shared.cv.wait_timeout(c, left);
            }
        } else {
            std::hint::spin_loop();
        }
    }
}
