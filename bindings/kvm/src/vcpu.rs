//! The vCPU thread: runs `KVM_RUN` in a loop, serves the guest's doorbell by draining the
//! output ring and its disk's register window by calling the virtio-blk device (a
//! `QueueNotify` serves the queue before the exit returns), records unexpected exits as
//! faults, and parks when asked to pause.
//!
//! Pausing: the controller sets `want = Pause` and a kick flag, then signals the thread
//! (a real-time signal whose handler sets `kvm_run.immediate_exit`, so a kick that lands just
//! before `KVM_RUN` is not lost) until the thread reports itself parked. A parked thread does
//! not hold the `VcpuFd` lock, so the controller can then read or write vCPU state.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use ha_virtio::blk::Blk;
use ha_workloads::guest_abi::{DOORBELL_PORT, disk};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::guest::PANIC_PORT;
use crate::memory::GuestRam;
use crate::output::OutputQueue;

/// Errors from controlling the vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(String),
    /// The thread could not be started.
    #[error("cannot spawn the vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The thread could not be signalled.
    #[error("cannot signal the vCPU thread")]
    Kick(#[source] vmm_sys_util::errno::Error),
}

/// Most records the vCPU thread queues on doorbells before the engine collects them
/// (64 MiB or so); past that the guest's ring stays full and it waits, ringing.
pub const QUEUE_CAP: usize = 1 << 20;

thread_local! {
    /// This thread's `kvm_run.immediate_exit` byte (null outside vCPU threads).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: a non-null pointer is only stored by the vCPU thread, pointing into
            // its `VcpuFd`'s kvm_run mapping, which it keeps alive (through an Arc) until it
            // resets the pointer to null; the handler runs on that same thread.
            unsafe { p.write_volatile(1) };
        }
    });
}

/// The kick signal (SIGRTMIN), with its handler installed once per process.
fn kick_signal() -> Result<libc::c_int, VcpuError> {
    static SIG: OnceLock<Result<libc::c_int, String>> = OnceLock::new();
    SIG.get_or_init(|| {
        let sig = SIGRTMIN();
        register_signal_handler(sig, on_kick)
            .map(|()| sig)
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(VcpuError::Signal)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Pause,
    Run,
    Exit,
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    parked: bool,
    dead: bool,
}

#[derive(Debug)]
struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    kick: AtomicBool,
    fault: Mutex<Option<String>>,
    doorbells: AtomicU64,
    disk_notifies: AtomicU64,
    ram: Arc<GuestRam>,
    output: Arc<OutputQueue>,
    disk: Option<Arc<Mutex<Blk>>>,
}

impl Shared {
    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disk, when `addr` is in its register window: the device and the offset.
    fn disk_at(&self, addr: u64) -> Option<(MutexGuard<'_, Blk>, u64)> {
        let off = addr.checked_sub(disk::MMIO_GPA)?;
        let blk = self.disk.as_ref().filter(|_| off < disk::MMIO_SIZE)?;
        Some((blk.lock().unwrap_or_else(|e| e.into_inner()), off))
    }
}

/// A vCPU and the thread that runs it. Starts parked.
#[derive(Debug)]
pub struct Vcpu {
    shared: Arc<Shared>,
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<JoinHandle<()>>,
    signal: libc::c_int,
}

enum Step {
    Go,
    Doorbell,
    /// An MMIO access the disk served (KVM completes it on the next `KVM_RUN`).
    Mmio,
    Fault(String),
}

impl Vcpu {
    /// Start the thread for `fd`, parked; MMIO in the disk's window goes to `disk`.
    pub fn spawn(
        fd: VcpuFd,
        ram: Arc<GuestRam>,
        output: Arc<OutputQueue>,
        disk: Option<Arc<Mutex<Blk>>>,
    ) -> Result<Self, VcpuError> {
        let signal = kick_signal()?;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                parked: false,
                dead: false,
            }),
            cv: Condvar::new(),
            kick: AtomicBool::new(false),
            fault: Mutex::new(None),
            doorbells: AtomicU64::new(0),
            disk_notifies: AtomicU64::new(0),
            ram,
            output,
            disk,
        });
        let fd = Arc::new(Mutex::new(fd));
        let (s, f) = (Arc::clone(&shared), Arc::clone(&fd));
        let thread = std::thread::Builder::new()
            .name("castor-vcpu0".into())
            .spawn(move || thread_main(&s, &f))
            .map_err(VcpuError::Spawn)?;
        let v = Self {
            shared,
            fd,
            thread: Some(thread),
            signal,
        };
        v.wait_parked()?;
        Ok(v)
    }

    fn wait_parked(&self) -> Result<(), VcpuError> {
        let mut ctl = self.shared.ctl();
        while !ctl.parked {
            if self.shared.kick.load(Ordering::SeqCst)
                && let Some(t) = &self.thread
            {
                t.kill(self.signal).map_err(VcpuError::Kick)?;
            }
            ctl = self
                .shared
                .cv
                .wait_timeout(ctl, Duration::from_micros(500))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Stop the guest; returns once the thread is out of `KVM_RUN` and parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        {
            let mut ctl = self.shared.ctl();
            ctl.want = Want::Pause;
            if ctl.parked {
                return Ok(());
            }
        }
        self.shared.kick.store(true, Ordering::SeqCst);
        let res = self.wait_parked();
        self.shared.kick.store(false, Ordering::SeqCst);
        res
    }

    /// Let the thread run the guest.
    pub fn resume(&self) {
        self.shared.ctl().want = Want::Run;
        self.shared.cv.notify_all();
    }

    /// The fault that stopped the guest, if any.
    pub fn fault(&self) -> Option<String> {
        self.shared
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Doorbell exits served so far.
    pub fn doorbells(&self) -> u64 {
        self.shared.doorbells.load(Ordering::Relaxed)
    }

    /// Writes to the disk's registers that completed requests (batches served) so far.
    pub fn disk_notifies(&self) -> u64 {
        self.shared.disk_notifies.load(Ordering::Relaxed)
    }

    /// Lock the vCPU fd. Only call while paused (otherwise this waits for a pause).
    pub fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        self.shared.ctl().want = Want::Exit;
        self.shared.cv.notify_all();
        self.shared.kick.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                let _ = t.kill(self.signal);
                std::thread::sleep(Duration::from_micros(200));
            }
            let _ = t.join();
        }
    }
}

fn thread_main(shared: &Shared, fd: &Mutex<VcpuFd>) {
    {
        let mut v = fd.lock().unwrap_or_else(|e| e.into_inner());
        let p: *mut u8 = &mut v.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
    }
    loop {
        {
            let mut ctl = shared.ctl();
            ctl.parked = true;
            shared.cv.notify_all();
            while ctl.want == Want::Pause || (ctl.want == Want::Run && ctl.dead) {
                ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
            }
            if ctl.want == Want::Exit {
                break;
            }
            ctl.parked = false;
        }
        let mut v = fd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fault) = run(shared, &mut v) {
            let rip = v.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
            let msg = format!("{fault} at rip {rip:#x}");
            tracing::warn!(target: "ha_kvm", "vCPU stopped: {msg}");
            *shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
            shared.ctl().dead = true;
        }
        v.set_kvm_immediate_exit(0);
    }
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
}

/// Run until kicked (None) or until the guest faults (Some(reason)).
fn run(shared: &Shared, v: &mut VcpuFd) -> Option<String> {
    let mut io_pending = false;
    loop {
        if shared.kick.load(Ordering::SeqCst) {
            if io_pending {
                // KVM finishes an I/O or MMIO instruction (advances RIP, loads an MMIO read's
                // data) on the next KVM_RUN; do that now, with immediate_exit set, so saved
                // state never holds a half-done `out` or register access.
                v.set_kvm_immediate_exit(1);
                match v.run() {
                    Err(e) if e.errno() == libc::EINTR => {}
                    Ok(VcpuExit::Intr) => {}
                    other => {
                        tracing::debug!(target: "ha_kvm", "completing I/O before park: {other:?}")
                    }
                }
            }
            return None;
        }
        io_pending = false;
        let step = match v.run() {
            Ok(VcpuExit::IoOut(DOORBELL_PORT, _)) => Step::Doorbell,
            Ok(VcpuExit::IoOut(PANIC_PORT, data)) => {
                let mut code = [0u8; 4];
                let n = data.len().min(4);
                code[..n].copy_from_slice(&data[..n]);
                Step::Fault(format!(
                    "guest program panic code {}",
                    u32::from_le_bytes(code)
                ))
            }
            Ok(VcpuExit::IoOut(port, _)) => {
                Step::Fault(format!("write to unknown I/O port {port:#x}"))
            }
            Ok(VcpuExit::IoIn(port, _)) => {
                Step::Fault(format!("read from unknown I/O port {port:#x}"))
            }
            Ok(VcpuExit::MmioRead(addr, data)) => match shared.disk_at(addr) {
                Some((blk, off)) => {
                    blk.mmio_read(off, data);
                    Step::Mmio
                }
                None => Step::Fault(format!("MMIO read at {addr:#x}")),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => match shared.disk_at(addr) {
                Some((mut blk, off)) => {
                    if blk.mmio_write(shared.ram.guest_memory(), off, data) > 0 {
                        shared.disk_notifies.fetch_add(1, Ordering::Relaxed);
                    }
                    Step::Mmio
                }
                None => Step::Fault(format!("MMIO write at {addr:#x}")),
            },
            Ok(VcpuExit::Intr) => Step::Go,
            Ok(VcpuExit::Shutdown) => Step::Fault("shutdown (triple fault)".into()),
            Ok(VcpuExit::InternalError) => Step::Fault("KVM internal error".into()),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Step::Fault(format!("VM entry failed, reason {reason:#x}"))
            }
            Ok(other) => Step::Fault(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Go,
            Err(e) => Step::Fault(format!("KVM_RUN failed: {e}")),
        };
        match step {
            Step::Go => v.set_kvm_immediate_exit(0),
            Step::Mmio => io_pending = true,
            Step::Doorbell => {
                io_pending = true;
                shared.doorbells.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = shared.output.drain_ring_capped(&shared.ram, QUEUE_CAP) {
                    return Some(format!("doorbell: {e}"));
                }
            }
            Step::Fault(f) => return Some(f),
        }
    }
}
