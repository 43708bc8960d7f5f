//! The `Domain` trait: the one seam between the epoch engine and a hypervisor.
//!
//! A backend (KVM, Xen, simulated) implements [`Domain`] for a running guest and
//! [`DomainFactory`] to create guests: fresh ones on the primary, restored ones on the
//! backup (from a committed memory image plus the saved vCPU/device state). The engine
//! never names a backend type.
//!
//! [`Domain`] carries what every guest has. What only some guests have is a capability
//! that a domain hands out or not: an [`OutputChannel`] (output that output commit holds
//! back: the built-in guests' output ring), a [`StatusProbe`] (the built-in guests'
//! progress, checksum and output counters), a [`Disk`] (a disk whose writes commit with
//! the checkpoint) and [`crate::cow::CowMemory`] (copy-on-write checkpoints). A Xen Linux
//! guest has none of them, and says so by returning `None`, so nothing is drained from or
//! read at a built-in guest's address in its memory.

use crate::image::GuestImage;
use ha_codec::bitmap::PageBitmap;
use ha_workloads::guest_abi::{
    GuestParams, GuestStatus, HEAP_GPA, OutputRecord, STATUS_GPA, Workload,
};

/// A boxed error from a backend, kept as the source of a [`DomainError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors crossing the `Domain` seam.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The hypervisor cannot be used on this machine (device missing, no permission, …).
    #[error("{what} is not available: {hint}")]
    Unavailable {
        /// What is missing, e.g. "KVM (/dev/kvm)".
        what: String,
        /// What the operator can do instead.
        hint: String,
        /// The OS error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// A hypervisor operation failed.
    #[error("{op} failed")]
    Backend {
        /// The operation, e.g. "KVM_GET_DIRTY_LOG".
        op: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// A guest-physical range outside guest memory.
    #[error("guest memory range {gpa:#x}+{len:#x} is outside the guest's memory")]
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// A saved state blob that cannot be restored.
    #[error("saved guest state is invalid: {0}")]
    BadState(String),
    /// A memory image of the wrong size for the restore.
    #[error("memory image is {got} bytes, expected {expected}")]
    ImageSize {
        /// Bytes given.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// The guest stopped on its own (a fault, an unexpected exit).
    #[error("guest stopped unexpectedly: {0}")]
    GuestFault(String),
    /// The guest does not have this capability (a Xen Linux guest has no output ring).
    #[error("the guest has no {0}")]
    NoCapability(&'static str),
    /// The operation needs the guest paused (or running) and it is not.
    #[error("{op} needs the guest {needs}")]
    WrongState {
        /// The operation.
        op: &'static str,
        /// "paused" or "running".
        needs: &'static str,
    },
}

/// The `--net-buffer` value that stands for the guest's own network interfaces, whatever
/// they are named on this host ([`Domain::net_interfaces`]; a restored Xen domain's are
/// known only once it is built).
pub const AUTO_VIFS: &str = "auto";

/// A running (or paused) guest, as the epoch engine sees it.
///
/// Dirty tracking is on from creation: the first [`Domain::harvest_dirty`] reports every
/// page written since the domain was created (for a restored domain: since the restore).
pub trait Domain: Send {
    /// Guest memory size in bytes (a multiple of the page size).
    fn memory_size(&self) -> u64;

    /// Copy guest memory at `gpa` into `buf`. Safe to call while the guest runs (the
    /// content may then be torn, and the page will be reported dirty later).
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError>;

    /// Copy whole pages: page `pages[i]` (a page index, not an address) into
    /// `out[i * PAGE_SIZE..]`; `out` holds exactly `pages.len()` pages. The default reads
    /// them one at a time through [`Domain::read_memory`]; a backend that pays per read
    /// call (a Xen foreign mapping) reads them in batches.
    fn read_pages(&self, pages: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        let size = ha_codec::PAGE_SIZE;
        if out.len() != pages.len() * size {
            return Err(DomainError::OutOfRange {
                gpa: pages.first().map_or(0, |p| p * size as u64),
                len: out.len() as u64,
            });
        }
        for (p, buf) in pages.iter().zip(out.chunks_exact_mut(size)) {
            self.read_memory(p * size as u64, buf)?;
        }
        Ok(())
    }

    /// Stop every vCPU. Returns only when no vCPU can write guest memory.
    fn pause(&mut self) -> Result<(), DomainError>;

    /// Let the vCPUs run (also the first start of a new or restored domain).
    fn resume(&mut self) -> Result<(), DomainError>;

    /// Whether the guest is paused.
    fn is_paused(&self) -> bool;

    /// OR the pages dirtied since the previous harvest into `dirty` (one bit per page,
    /// `dirty.len()` = memory pages) and restart tracking. Includes the VMM's own writes
    /// into guest memory. Exact when called while paused.
    fn harvest_dirty(&mut self, dirty: &mut PageBitmap) -> Result<(), DomainError>;

    /// Pages written since the last [`Domain::harvest_dirty`] although the guest is held:
    /// on Xen, by dom0's backends (a packet netback copies in, a disk read blkback
    /// completes), which go on while the guest is suspended. Such a write is in the next
    /// harvest, but a digest of memory read after this harvest covers it while this
    /// checkpoint's copy does not. 0 where nothing but the guest writes its memory.
    fn written_since_harvest(&mut self) -> Result<u64, DomainError> {
        Ok(0)
    }

    /// Save vCPU and device state as versioned bytes. Needs the guest paused.
    fn save_state(&mut self) -> Result<Vec<u8>, DomainError>;

    /// The guest's output channel, if output commit can hold its output back (the
    /// built-in guests' output ring); `None` for a guest whose output Castor does not see.
    fn output_channel(&mut self) -> Option<&mut dyn OutputChannel> {
        None
    }

    /// The guest's status probe, if it reports its progress (the built-in guests' status
    /// page); `None` for a guest that reports nothing.
    fn status_probe(&self) -> Option<&dyn StatusProbe> {
        None
    }

    /// The guest's disk, if it has one whose writes commit with the checkpoint (a
    /// virtio-blk disk of Castor's own VMM); `None` for a guest without one.
    fn disk(&mut self) -> Option<&mut dyn Disk> {
        None
    }

    /// The guest's memory as copy-on-write checkpoints see it, if the backend can
    /// write-protect it and copy pages behind the running guest ([`crate::cow`]); `None`:
    /// every checkpoint copies its pages while the guest is paused.
    fn cow_memory(&mut self) -> Option<&mut dyn crate::cow::CowMemory> {
        None
    }

    /// [`OutputChannel::drain`] of the guest's output channel; an error naming the
    /// missing capability for a guest without one.
    fn drain_output(&mut self, out: &mut Vec<OutputRecord>) -> Result<(), DomainError> {
        self.output_channel()
            .ok_or(DomainError::NoCapability("an output channel"))?
            .drain(out)
    }

    /// [`StatusProbe::read_status`] of the guest's status probe; an error naming the
    /// missing capability for a guest without one.
    fn status(&self) -> Result<GuestStatus, DomainError> {
        self.status_probe()
            .ok_or(DomainError::NoCapability("a status probe"))?
            .read_status()
    }

    /// The host's network interfaces of the guest's network devices (a Xen domain's vifs
    /// in dom0: `vifDOMID.N`, or the `vifname=` of its config), where a network buffer
    /// holds its packets; empty for a guest whose network the host does not see.
    fn net_interfaces(&self) -> Result<Vec<String>, DomainError> {
        Ok(Vec::new())
    }

    /// `Ok` while the guest is healthy; the error that stopped it otherwise.
    fn check_health(&self) -> Result<(), DomainError>;

    /// Whether the guest goes on running when the process protecting it ends (a Xen
    /// domain does; a KVM guest lives in the VMM's process and ends with it). Such a
    /// primary tells its backup to stand down when it stops, or the backup would start a
    /// second copy of a guest that still runs.
    fn outlives_vmm(&self) -> bool {
        false
    }
}

/// A guest's output that output commit holds back: records in sequence, drained at each
/// checkpoint and released once the checkpoint is acknowledged.
pub trait OutputChannel {
    /// Move the output records the guest produced since the last drain into `out`, in
    /// sequence order (for the built-in guests: advancing the ring's tail in memory).
    fn drain(&mut self, out: &mut Vec<OutputRecord>) -> Result<(), DomainError>;
}

/// One write a guest's disk completed: `data` at byte `offset` of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    /// Byte offset on the disk (a multiple of the 512-byte sector).
    pub offset: u64,
    /// The bytes written (a whole number of sectors).
    pub data: Vec<u8>,
}

/// A guest read that filled guest page `page` with the 4 KiB disk block `block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRead {
    /// Guest page index (guest physical address / 4096).
    pub page: u64,
    /// Disk block index (byte offset / 4096).
    pub block: u64,
}

/// A guest's disk whose writes commit with the checkpoint (Remus's disk buffering): a write
/// completes on the primary's disk at once, travels in the checkpoint of the epoch it
/// completed in, and reaches the backup's replica when that checkpoint commits.
pub trait Disk {
    /// The disk's size in bytes.
    fn disk_size(&self) -> u64;

    /// Read `buf.len()` bytes of the disk at byte `offset` (for digests and the initial
    /// synchronisation; the guest's own reads go through its device).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DomainError>;

    /// Move the writes completed since the last drain into `out`, in completion order.
    /// Called while the guest is paused, so the set is exactly the epoch's.
    fn drain_writes(&mut self, out: &mut Vec<DiskWrite>) -> Result<(), DomainError>;

    /// Move the guest's reads completed since the last drain that filled whole guest pages
    /// with whole 4 KiB disk blocks into `out` (the exact page ← block map of page-cache
    /// teleportation); a backend that does not see its guest's reads reports none.
    fn drain_reads(&mut self, out: &mut Vec<DiskRead>) -> Result<(), DomainError> {
        let _ = out;
        Ok(())
    }

    /// A second handle on the disk's image, to read it from another thread (the encoder
    /// confirming disk references, page-cache teleportation); `None` for a backend
    /// without an image file.
    fn image_reader(&self) -> Result<Option<std::fs::File>, DomainError> {
        Ok(None)
    }
}

/// What a guest reports of its own work.
pub trait StatusProbe {
    /// The guest's status: progress counter, checksum, output counters.
    fn read_status(&self) -> Result<GuestStatus, DomainError>;
}

/// The built-in guests' status probe over any domain's memory: their status page.
pub fn read_status_page(d: &dyn Domain) -> Result<GuestStatus, DomainError> {
    let mut page = vec![0u8; ha_codec::PAGE_SIZE];
    d.read_memory(STATUS_GPA, &mut page)?;
    Ok(GuestStatus::read_page(&page))
}

/// What to create: memory size and the workload guest's parameters.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestSpec {
    /// Guest memory size in bytes (a multiple of 2 MiB).
    pub memory_size: u64,
    /// Workload parameters written into the params page.
    pub params: GuestParams,
    /// The host's resources the guest is attached to.
    #[serde(default)]
    pub devices: Devices,
}

impl GuestSpec {
    /// The smallest guest every backend creates: 2 MiB of memory running the idle
    /// workload (one heap page, no output), no disk. For tests that need a guest, not a
    /// workload.
    pub fn idle() -> Self {
        Self {
            memory_size: 2 << 20,
            params: GuestParams {
                workload: Workload::Idle,
                seed: 1,
                heap_gpa: HEAP_GPA,
                heap_size: 4096,
                rate: 0,
                tsc_khz: 0,
                output_every: 0,
                doorbell_every: 256,
                disk_size: 0,
            },
            devices: Devices::default(),
        }
    }
}

/// The host resources a guest's devices are backed by. They belong to a host, not to the
/// guest: a guest restored on the backup is attached to the backup's replica, not to the
/// primary's disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Devices {
    /// A raw disk image (its size is the disk's); `None`: the guest has no disk.
    pub disk: Option<std::path::PathBuf>,
}

/// Creates guests of one backend.
pub trait DomainFactory: Send + Sync {
    /// The backend's name ("kvm", "sim", "xen").
    fn name(&self) -> &'static str;

    /// Create a fresh guest, paused; call [`Domain::resume`] to start it.
    fn create(&self, spec: &GuestSpec) -> Result<Box<dyn Domain>, DomainError>;

    /// Build a guest from a memory image and the state saved by
    /// [`Domain::save_state`] at the same checkpoint, paused, attached to `devices` (a
    /// disk there must hold the disk of the same checkpoint).
    fn restore(
        &self,
        image: &[u8],
        state: &[u8],
        devices: &Devices,
    ) -> Result<Box<dyn Domain>, DomainError>;

    /// [`DomainFactory::restore`] from an image the guest may take over as its memory: a
    /// backend that can map it as the guest's RAM does so instead of copying it, so the
    /// restore costs the same at any memory size. By default, a copy.
    fn restore_image(
        &self,
        image: GuestImage,
        state: &[u8],
        devices: &Devices,
    ) -> Result<Box<dyn Domain>, DomainError> {
        self.restore(image.as_slice(), state, devices)
    }
}
