//! The built-in workloads of `docs/GUESTS.md`, run by the simulated vCPU over guest memory:
//! the checks of a guest's parameters, and the workload model of `ha_workloads::model` over
//! the sim's memory. At every unit boundary the vCPU's registers are all in the status
//! page, so a guest paused there is fully described by its memory (plus the pacing clock,
//! which the domain saves).

use ha_codec::PAGE_SIZE;
use ha_workloads::guest_abi::{GuestParams, HEAP_GPA, PARAMS_GPA, Workload};
pub(crate) use ha_workloads::model::Vcpu;
use ha_workloads::model::{DiskRequest, Memory, Ports, UnitError};

use crate::disk::SimDisk;
use crate::memory::{GuestMemory, PageWriter};
use crate::ring::RingError;

const PAGE: u64 = PAGE_SIZE as u64;

/// Why a guest cannot run (bad parameters) or stopped (a broken output ring).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Memory size is not a positive multiple of the page size.
    #[error("memory size {0:#x} is not a positive multiple of 4096")]
    MemorySize(u64),
    /// The params page has a bad magic, ABI version or workload number.
    #[error("params page is invalid (magic, ABI version or workload number)")]
    Params,
    /// The heap starts below `HEAP_GPA` or not on a page boundary.
    #[error("heap_gpa {0:#x} is below {HEAP_GPA:#x} or not page-aligned")]
    HeapBase(u64),
    /// The heap size is zero or not a multiple of the page size.
    #[error("heap_size {0:#x} is not a positive multiple of 4096")]
    HeapSize(u64),
    /// The heap does not fit in guest memory.
    #[error("heap {gpa:#x}+{size:#x} does not fit in {memory:#x} bytes of guest memory")]
    HeapOutside {
        /// First heap address.
        gpa: u64,
        /// Heap size.
        size: u64,
        /// Guest memory size.
        memory: u64,
    },
    /// `web` needs at least 16 heap pages.
    #[error("workload web needs at least 16 heap pages, the heap has {0}")]
    WebTooSmall(u64),
    /// A disk workload without a disk, or a disk or heap too small for its layout.
    #[error(
        "workload {workload} needs a disk and room for its layout (heap {heap} bytes, disk {disk} bytes)"
    )]
    DiskLayout {
        /// The workload's name.
        workload: &'static str,
        /// Heap size.
        heap: u64,
        /// Disk size (0: none).
        disk: u64,
    },
    /// The doorbell drain failed.
    #[error("doorbell: {0}")]
    Doorbell(#[from] RingError),
    /// The ring was still full after a doorbell.
    #[error("output ring still full after the doorbell")]
    RingStuck,
}

/// Check that `params` describe a workload that can run in `memory_size` bytes.
pub(crate) fn validate(params: &GuestParams, memory_size: u64) -> Result<(), GuestError> {
    if memory_size == 0 || !memory_size.is_multiple_of(PAGE) {
        return Err(GuestError::MemorySize(memory_size));
    }
    let (gpa, size) = (params.heap_gpa, params.heap_size);
    if gpa < HEAP_GPA || !gpa.is_multiple_of(PAGE) {
        return Err(GuestError::HeapBase(gpa));
    }
    if size == 0 || !size.is_multiple_of(PAGE) {
        return Err(GuestError::HeapSize(size));
    }
    if gpa.checked_add(size).is_none_or(|end| end > memory_size) {
        return Err(GuestError::HeapOutside {
            gpa,
            size,
            memory: memory_size,
        });
    }
    if params.workload == Workload::Web && size / PAGE < 16 {
        return Err(GuestError::WebTooSmall(size / PAGE));
    }
    if !ha_workloads::model::disk_layout_fits(params) {
        return Err(GuestError::DiskLayout {
            workload: params.workload.name(),
            heap: size,
            disk: params.disk_size,
        });
    }
    Ok(())
}

/// Read and validate the params page of `mem`.
pub(crate) fn read_params(mem: &GuestMemory) -> Result<GuestParams, GuestError> {
    let mut page = vec![0u8; PAGE_SIZE];
    mem.read(PARAMS_GPA, &mut page)
        .map_err(|_| GuestError::Params)?;
    let params = GuestParams::read_page(&page).ok_or(GuestError::Params)?;
    validate(&params, mem.size())?;
    Ok(params)
}

/// The sim's guest memory as the workload model sees it: stores go through a page writer
/// (dirty bits batched per page), loads straight to memory.
struct SimMemory<'a> {
    mem: &'a GuestMemory,
    w: PageWriter<'a>,
}

impl Memory for SimMemory<'_> {
    fn load(&self, gpa: u64) -> u64 {
        self.mem.load(gpa)
    }
    fn store(&mut self, gpa: u64, v: u64) {
        self.w.store(gpa, v);
    }
    fn load_acquire(&self, gpa: u64) -> u64 {
        self.mem.load_acquire(gpa)
    }
    fn store_release(&mut self, gpa: u64, v: u64) {
        self.mem.store_release(gpa, v);
    }
    fn flush(&mut self) {
        self.w.flush();
    }
}

/// Start (or continue) the guest described by `params` from the status page of `mem`.
pub(crate) fn load(params: &GuestParams, mem: &GuestMemory) -> Vcpu {
    Vcpu::load(
        params,
        &SimMemory {
            mem,
            w: PageWriter::new(mem),
        },
    )
}

/// The sim vCPU's ports: the doorbell is a call, the disk requests run at once.
struct SimPorts<'a, D: ?Sized> {
    doorbell: &'a mut D,
    disk: Option<&'a std::sync::Mutex<SimDisk>>,
}

impl<'a, D: FnMut() -> Result<(), GuestError> + ?Sized> Ports<SimMemory<'a>> for SimPorts<'_, D> {
    type Error = GuestError;

    fn doorbell(&mut self, _: &mut SimMemory<'a>) -> Result<(), GuestError> {
        (self.doorbell)()
    }

    fn disk(
        &mut self,
        mem: &mut SimMemory<'a>,
        batch: &[DiskRequest],
        ok: &mut [bool],
    ) -> Result<(), GuestError> {
        // A guest without a disk sees every request fail, as with a missing device.
        let Some(disk) = self.disk else {
            ok.fill(false);
            return Ok(());
        };
        let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
        for (r, ok) in batch.iter().zip(ok.iter_mut()) {
            *ok = d.io(mem.mem, r);
        }
        Ok(())
    }
}

/// Run one work unit of `cpu` over `mem` (the workload model's, `ha_workloads::model`);
/// `doorbell` drains the output ring, `disk` is the guest's disk if it has one.
pub(crate) fn unit(
    cpu: &mut Vcpu,
    mem: &GuestMemory,
    doorbell: &mut dyn FnMut() -> Result<(), GuestError>,
    disk: Option<&std::sync::Mutex<SimDisk>>,
) -> Result<(), GuestError> {
    let mut m = SimMemory {
        mem,
        w: PageWriter::new(mem),
    };
    let mut ports = SimPorts { doorbell, disk };
    cpu.unit(&mut m, &mut ports).map_err(|e| match e {
        UnitError::Doorbell(e) | UnitError::Disk(e) => e,
        UnitError::RingStuck => GuestError::RingStuck,
    })
}
