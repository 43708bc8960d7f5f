//! One KVM guest: the VM with its single dirty-logged memory slot, the vCPU thread, and the
//! [`Domain`] implementation the epoch engine drives.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::domain::{
    BoxError, Devices, Disk, DiskRead, DiskWrite, Domain, DomainError, OutputChannel, StatusProbe,
    read_status_page,
};
use ha_guest::image::GuestImage;
use ha_virtio::blk::{Blk, BlkError};
use ha_workloads::guest_abi::{GuestStatus, OutputRecord, PARAMS_GPA, STATUS_GPA};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};

use crate::cow::CowRam;
use crate::guest;
use crate::memory::GuestRam;
use crate::output::OutputQueue;
use crate::state;
use crate::vcpu::Vcpu;

/// Why a guest's disk cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The disk image cannot be opened as a virtio-blk disk, or its device refuses the
    /// saved state (the path or the reason is in the source).
    #[error("the guest's disk")]
    Device(#[source] BlkError),
    /// The saved guest had a disk and the restore was given none.
    #[error("the saved guest has a {size}-byte disk and no disk was given")]
    NoDisk {
        /// The saved guest's disk size.
        size: u64,
    },
    /// The restore was given a disk and the saved guest had none.
    #[error("a disk ({path}) was given and the saved guest has none")]
    UnexpectedDisk {
        /// The disk given.
        path: PathBuf,
    },
    /// The disk given is not the size of the saved guest's.
    #[error("disk {path} is {got} bytes, the saved guest's disk was {expected} bytes")]
    Size {
        /// The disk given.
        path: PathBuf,
        /// Its size.
        got: u64,
        /// The saved guest's disk size.
        expected: u64,
    },
}

fn attach(e: AttachError) -> DomainError {
    match e {
        AttachError::Device(_) => backend("attach the disk", e),
        e => DomainError::BadState(e.to_string()),
    }
}

fn backend(op: &'static str, e: impl Into<BoxError>) -> DomainError {
    DomainError::Backend {
        op,
        source: e.into(),
    }
}

/// A running (or paused) KVM guest.
#[derive(Debug)]
pub struct KvmDomain {
    // Field order is drop order: the vCPU thread is joined before the VM and memory go, and
    // before the write-fault thread (a vCPU may wait on it).
    vcpu: Vcpu,
    cow: Option<CowRam>,
    vm: VmFd,
    kvm: Kvm,
    ram: Arc<GuestRam>,
    output: Arc<OutputQueue>,
    disk: Option<Arc<Mutex<Blk>>>,
    msr_indices: Vec<u32>,
    paused: bool,
    dirty_log: bool,
}

/// How to build a VM (the factory's settings).
#[derive(Clone, Debug)]
pub(crate) struct VmConfig {
    pub device: std::path::PathBuf,
    pub dirty_log: bool,
}

fn unavailable(device: &Path, what_failed: &str, e: kvm_ioctls::Error) -> DomainError {
    let os = std::io::Error::from_raw_os_error(e.errno());
    DomainError::Unavailable {
        what: format!("KVM ({})", device.display()),
        hint: format!(
            "{what_failed} failed ({os}); run with `--guest sim` to use the simulated guest"
        ),
        source: Some(Box::new(os)),
    }
}

/// A VM with memory and one vCPU, before any guest state is loaded.
struct Bare {
    kvm: Kvm,
    vm: VmFd,
    vcpu: kvm_ioctls::VcpuFd,
    ram: Arc<GuestRam>,
    cow: Option<CowRam>,
}

/// A VM whose memory is fresh zeroed memory (`image` None) or the image's memfd, taken
/// over in place.
fn build(
    cfg: &VmConfig,
    memory_size: u64,
    image: Option<std::fs::File>,
) -> Result<Bare, DomainError> {
    let path =
        CString::new(cfg.device.as_os_str().as_bytes()).map_err(|e| backend("open KVM", e))?;
    let kvm = Kvm::new_with_path(&path).map_err(|e| unavailable(&cfg.device, "opening it", e))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| unavailable(&cfg.device, "KVM_CREATE_VM", e))?;
    let size = usize::try_from(memory_size).map_err(|e| backend("guest memory size", e))?;
    let ram = match image {
        None => GuestRam::new(size),
        Some(file) => GuestRam::from_file(file, size),
    };
    let ram = Arc::new(ram.map_err(|e| backend("map guest memory", e))?);
    // Without a dirty log every page counts as dirty, untouched ones too, and protecting
    // a page that is not there yet does nothing: no copy-on-write then. The output drain
    // stores the ring's tail in the status page while paused.
    let cow = if cfg.dirty_log {
        match CowRam::new(Arc::clone(&ram), &[STATUS_GPA / PAGE_SIZE as u64]) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::info!(target: "ha_kvm", error = ?e, "no copy-on-write checkpoints for this guest");
                None
            }
        }
    } else {
        None
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if cfg.dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size,
        userspace_addr: ram.host_addr(),
    };
    // SAFETY: `ram` is a live mapping of exactly `memory_size` bytes; it is the
    // only slot of this VM, and the domain keeps `ram` alive (Arc) until after the VM fd is
    // closed (field order of `KvmDomain`).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| backend("KVM_SET_USER_MEMORY_REGION", e))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| backend("KVM_CREATE_VCPU", e))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| backend("KVM_GET_SUPPORTED_CPUID", e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| backend("KVM_SET_CPUID2", e))?;
    Ok(Bare {
        kvm,
        vm,
        vcpu,
        ram,
        cow,
    })
}

/// The saved state in `blob`, checked against an image of `image_len` bytes.
fn restorable(blob: &[u8], image_len: usize) -> Result<state::SavedState, DomainError> {
    let saved = state::decode(blob).map_err(|e| DomainError::BadState(e.to_string()))?;
    if image_len as u64 != saved.memory_size {
        return Err(DomainError::ImageSize {
            got: image_len as u64,
            expected: saved.memory_size,
        });
    }
    if saved.memory_size == 0 || saved.memory_size % (2 << 20) != 0 {
        return Err(DomainError::BadState(format!(
            "memory size {:#x}",
            saved.memory_size
        )));
    }
    Ok(saved)
}

/// The host TSC frequency in kHz: KVM's view of the vCPU, else /proc/cpuinfo, else 0.
fn tsc_khz(vcpu: &kvm_ioctls::VcpuFd) -> u64 {
    if let Ok(khz) = vcpu.get_tsc_khz()
        && khz > 0
    {
        return u64::from(khz);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| mhz_to_khz(v.trim()))
        .unwrap_or(0)
}

/// "2596.098" (MHz) -> 2596098 (kHz), without going through floats.
fn mhz_to_khz(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac: String = frac.chars().chain("000".chars()).take(3).collect();
    int.parse::<u64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(frac.parse().ok()?)
}

/// The disk a restore is given, opened with the device state `saved` has; either both or
/// neither, and of the saved size.
fn reattach(saved: &state::SavedState, devices: &Devices) -> Result<Option<Blk>, AttachError> {
    match (&saved.disk, &devices.disk) {
        (None, None) => Ok(None),
        (Some(d), None) => Err(AttachError::NoDisk { size: d.size }),
        (None, Some(path)) => Err(AttachError::UnexpectedDisk { path: path.clone() }),
        (Some(d), Some(path)) => {
            let blk = Blk::restore(path, &d.mmio).map_err(AttachError::Device)?;
            if blk.size() != d.size {
                return Err(AttachError::Size {
                    path: path.clone(),
                    got: blk.size(),
                    expected: d.size,
                });
            }
            Ok(Some(blk))
        }
    }
}

impl KvmDomain {
    fn finish(bare: Bare, dirty_log: bool, disk: Option<Blk>) -> Result<Self, DomainError> {
        let msr_indices = state::msr_list(&bare.kvm).map_err(|e| backend("list MSRs", e))?;
        let output = Arc::new(OutputQueue::default());
        let disk = disk.map(|b| Arc::new(Mutex::new(b)));
        let vcpu = Vcpu::spawn(
            bare.vcpu,
            Arc::clone(&bare.ram),
            Arc::clone(&output),
            disk.clone(),
        )
        .map_err(|e| backend("start vCPU", e))?;
        Ok(Self {
            vcpu,
            cow: bare.cow,
            vm: bare.vm,
            kvm: bare.kvm,
            ram: bare.ram,
            output,
            disk,
            msr_indices,
            paused: true,
            dirty_log,
        })
    }

    /// Build a fresh guest for `spec`, paused, attached to the disk its devices name (whose
    /// size goes into the params page).
    pub(crate) fn create(
        cfg: &VmConfig,
        spec: &ha_guest::domain::GuestSpec,
    ) -> Result<Self, DomainError> {
        let disk = spec
            .devices
            .disk
            .as_deref()
            .map(|p| Blk::open(p).map_err(|e| attach(AttachError::Device(e))))
            .transpose()?;
        let mut params = spec.params.clone();
        params.disk_size = disk.as_ref().map_or(0, Blk::size);
        guest::validate(spec.memory_size, &params).map_err(|e| backend("check guest spec", e))?;
        let bare = build(cfg, spec.memory_size, None)?;
        guest::write_boot_pages(&bare.ram).map_err(|e| backend("write boot pages", e))?;
        if params.tsc_khz == 0 && params.rate > 0 {
            params.tsc_khz = tsc_khz(&bare.vcpu);
        }
        let mut page = vec![0u8; PAGE_SIZE];
        params.write_page(&mut page);
        bare.ram
            .write(PARAMS_GPA, &page)
            .map_err(|e| backend("write params page", e))?;
        if let Some((gpa, doc)) = ha_workloads::web::docroot(&params) {
            bare.ram
                .write(gpa, &doc)
                .map_err(|e| backend("write the web document root", e))?;
        }
        if let Some((gpa, table)) = ha_workloads::files::file_table(&params) {
            bare.ram
                .write(gpa, &table)
                .map_err(|e| backend("write the files file table", e))?;
        }
        let sregs = bare
            .vcpu
            .get_sregs()
            .map_err(|e| backend("KVM_GET_SREGS", e))?;
        bare.vcpu
            .set_sregs(&guest::boot_sregs(sregs))
            .map_err(|e| backend("KVM_SET_SREGS", e))?;
        bare.vcpu
            .set_regs(&guest::boot_regs())
            .map_err(|e| backend("KVM_SET_REGS", e))?;
        tracing::debug!(target: "ha_kvm", workload = params.workload.name(), memory = spec.memory_size, tsc_khz = params.tsc_khz, disk_size = params.disk_size, "created KVM guest");
        Self::finish(bare, cfg.dirty_log, disk)
    }

    /// Build a guest from a memory image and saved state, paused, attached to the disk
    /// `devices` names (which must hold the disk of the same checkpoint).
    pub(crate) fn restore(
        cfg: &VmConfig,
        image: &[u8],
        blob: &[u8],
        devices: &Devices,
    ) -> Result<Self, DomainError> {
        let saved = restorable(blob, image.len())?;
        let disk = reattach(&saved, devices).map_err(attach)?;
        let bare = build(cfg, saved.memory_size, None)?;
        bare.ram
            .load_image(image)
            .map_err(|e| backend("copy memory image", e))?;
        Self::finish_restore(bare, &saved, cfg.dirty_log, disk)
    }

    /// [`KvmDomain::restore`] on the image's own memory: the memfd becomes the guest's RAM,
    /// so nothing is copied whatever the memory size.
    pub(crate) fn restore_in_place(
        cfg: &VmConfig,
        image: GuestImage,
        blob: &[u8],
        devices: &Devices,
    ) -> Result<Self, DomainError> {
        let saved = restorable(blob, image.len())?;
        let disk = reattach(&saved, devices).map_err(attach)?;
        let bare = build(cfg, saved.memory_size, Some(image.into_file()))?;
        Self::finish_restore(bare, &saved, cfg.dirty_log, disk)
    }

    fn finish_restore(
        bare: Bare,
        saved: &state::SavedState,
        dirty_log: bool,
        disk: Option<Blk>,
    ) -> Result<Self, DomainError> {
        state::restore(&bare.kvm, &bare.vm, &bare.vcpu, saved)
            .map_err(|e| backend("restore vCPU state", e))?;
        Self::finish(bare, dirty_log, disk)
    }

    /// Doorbell exits the vCPU thread has served.
    pub fn doorbells(&self) -> u64 {
        self.vcpu.doorbells()
    }

    /// Disk notifications (`QueueNotify` writes) that completed requests.
    pub fn disk_notifies(&self) -> u64 {
        self.vcpu.disk_notifies()
    }

    fn blk(&self) -> Option<MutexGuard<'_, Blk>> {
        self.disk
            .as_ref()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Write-protect faults the copy-on-write fault thread served, and pages it copied
    /// (both zero for a guest without copy-on-write memory).
    pub fn cow_faults(&self) -> (u64, u64) {
        self.cow
            .as_ref()
            .map_or((0, 0), |c| (c.faults(), c.fault_copies()))
    }

    /// The guest's status page, read directly.
    pub fn guest_status(&self) -> Result<GuestStatus, DomainError> {
        self.status()
    }
}

impl OutputChannel for KvmDomain {
    fn drain(&mut self, out: &mut Vec<OutputRecord>) -> Result<(), DomainError> {
        self.output
            .take_all(&self.ram, out)
            .map_err(|e| DomainError::GuestFault(format!("bad output ring: {e}")))
    }
}

impl Disk for KvmDomain {
    fn disk_size(&self) -> u64 {
        self.blk().map_or(0, |b| b.size())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        self.blk()
            .ok_or(DomainError::NoCapability("disk"))?
            .read_at(offset, buf)
            .map_err(|e| backend("read the disk", e))
    }

    fn drain_writes(&mut self, out: &mut Vec<DiskWrite>) -> Result<(), DomainError> {
        if let Some(mut b) = self.blk() {
            b.drain_writes(out);
        }
        Ok(())
    }

    fn drain_reads(&mut self, out: &mut Vec<DiskRead>) -> Result<(), DomainError> {
        if let Some(mut b) = self.blk() {
            b.drain_reads(out);
        }
        Ok(())
    }

    fn image_reader(&self) -> Result<Option<std::fs::File>, DomainError> {
        self.blk()
            .map(|b| b.image())
            .transpose()
            .map_err(|e| backend("open a second handle on the disk image", e))
    }
}

impl StatusProbe for KvmDomain {
    fn read_status(&self) -> Result<GuestStatus, DomainError> {
        read_status_page(self)
    }
}

impl Domain for KvmDomain {
    fn memory_size(&self) -> u64 {
        self.ram.size() as u64
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        self.ram
            .read(gpa, buf)
            .map_err(|_| DomainError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }

    fn pause(&mut self) -> Result<(), DomainError> {
        self.vcpu.pause().map_err(|e| backend("pause vCPU", e))?;
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DomainError> {
        if let Some(f) = self.vcpu.fault() {
            return Err(DomainError::GuestFault(f));
        }
        self.vcpu.resume();
        self.paused = false;
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn harvest_dirty(&mut self, dirty: &mut PageBitmap) -> Result<(), DomainError> {
        if self.dirty_log {
            let log = self
                .vm
                .get_dirty_log(0, self.ram.size())
                .map_err(|e| backend("KVM_GET_DIRTY_LOG", e))?;
            dirty.or_words(0, &log);
        } else {
            // Without a dirty log every page may have changed.
            dirty.or_words(0, &vec![u64::MAX; self.ram.size().div_ceil(PAGE_SIZE * 64)]);
        }
        dirty.or_words(0, &self.ram.take_vmm_dirty());
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, DomainError> {
        if !self.paused {
            return Err(DomainError::WrongState {
                op: "save_state",
                needs: "paused",
            });
        }
        let fd = self.vcpu.fd();
        let mut s = state::save(
            &self.kvm,
            &self.vm,
            &fd,
            &self.msr_indices,
            self.ram.size() as u64,
        )
        .map_err(|e| backend("save vCPU state", e))?;
        drop(fd);
        s.disk = self.blk().map(|b| state::DiskState {
            size: b.size(),
            mmio: b.state(),
        });
        state::encode(&s).map_err(|e| backend("encode vCPU state", e))
    }

    /// The built-in guest's output ring.
    fn output_channel(&mut self) -> Option<&mut dyn OutputChannel> {
        Some(self)
    }

    /// The built-in guest's status page.
    fn status_probe(&self) -> Option<&dyn StatusProbe> {
        Some(self)
    }

    /// The virtio-blk disk, when the guest was given one.
    fn disk(&mut self) -> Option<&mut dyn Disk> {
        if self.disk.is_some() {
            Some(self)
        } else {
            None
        }
    }

    /// Userfaultfd write-protection of guest RAM, when the kernel allowed it.
    fn cow_memory(&mut self) -> Option<&mut dyn ha_guest::cow::CowMemory> {
        self.cow
            .as_mut()
            .map(|c| c as &mut dyn ha_guest::cow::CowMemory)
    }

    fn check_health(&self) -> Result<(), DomainError> {
        match self.vcpu.fault() {
            Some(f) => Err(DomainError::GuestFault(f)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mhz_to_khz;

    #[test]
    fn cpuinfo_mhz_parses() {
        assert_eq!(mhz_to_khz("2596.098"), Some(2_596_098));
        assert_eq!(mhz_to_khz("3000"), Some(3_000_000));
        assert_eq!(mhz_to_khz("1.5"), Some(1500));
        assert_eq!(mhz_to_khz("x"), None);
    }
}
