//! Saving and restoring the vCPU and VM state of a paused guest as versioned bytes: the
//! [`SavedState`] in the saved-state envelope (`ha_guest::envelope`) of format
//! [`FORMAT`] (`b"CASTKVM1"`). A guest with a disk also carries its device's state
//! ([`DiskState`]: the virtio-mmio registers and the disk's size); the disk's content is
//! not in it, it is the image the restore is given.
//!
//! Save order: mp_state first, vcpu events last. Restore order: sregs, regs, xsave (or
//! fpu) and xcrs, MSRs (the TSC among them), mp_state, debug registers, vcpu events last
//! (setting registers clears pending exceptions), then the VM clock. MSRs the kernel
//! refuses (PVM rejects some) are skipped with a debug log instead of failing the restore.

use ha_guest::envelope::{self, EnvelopeError, Format};
use ha_virtio::mmio::MmioState;
use kvm_bindings::{
    KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// The envelope format of a KVM state blob (version 2: the common envelope with its
/// length and checksum; version 3: the disk device's state).
pub const FORMAT: Format = Format {
    magic: *b"CASTKVM1",
    version: 3,
};

/// Errors from saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MSR buffer could not be built.
    #[error("cannot build the MSR buffer")]
    MsrBuffer,
    /// The blob is refused by its envelope, or the state cannot be encoded.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

fn io(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl { op, source }
}

/// The x87/SSE state as `KVM_GET_FPU` gives it (for kernels without `KVM_GET_XSAVE`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The disk device of a saved guest: what its driver programmed, and the size of the disk
/// it was driving (a restore must be given a disk of that size).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// The disk's size in bytes.
    pub size: u64,
    /// The virtio-mmio transport's registers and queue.
    pub mmio: MmioState,
}

/// Everything needed to continue a paused guest elsewhere, besides its memory (and its
/// disk's content).
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedState {
    /// Guest memory size the state belongs to.
    pub memory_size: u64,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// XSAVE area (`KVM_GET_XSAVE`), when the kernel gives one.
    pub xsave: Option<kvm_xsave>,
    /// FPU state, when there is no XSAVE area.
    pub fpu: Option<FpuState>,
    /// Extended control registers, when supported.
    pub xcrs: Option<kvm_xcrs>,
    /// MSRs (index, value) the kernel let us read.
    pub msrs: Vec<(u32, u64)>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// The VM's kvmclock (`KVM_GET_CLOCK`), when supported.
    pub clock: Option<kvm_clock_data>,
    /// The disk device, when the guest has one.
    pub disk: Option<DiskState>,
}

/// The MSRs to save: the kernel's index list.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(io("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::MsrBuffer)?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(io("KVM_GET_MSRS"))?
            .min(chunk.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            tracing::debug!(target: "ha_kvm", msr = format_args!("{:#x}", chunk[n]), "MSR not readable, skipped");
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<usize, StateError> {
    let mut skipped = 0;
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let buf = Msrs::from_entries(&entries).map_err(|_| StateError::MsrBuffer)?;
        let n = vcpu
            .set_msrs(&buf)
            .map_err(io("KVM_SET_MSRS"))?
            .min(chunk.len());
        if n < chunk.len() {
            tracing::debug!(target: "ha_kvm", msr = format_args!("{:#x}", chunk[n].0), "MSR not writable, skipped");
            skipped += 1;
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(skipped)
}

/// Read the state of a paused vCPU and its VM (the device state is the caller's to add).
pub fn save(
    kvm: &Kvm,
    vm: &VmFd,
    vcpu: &VcpuFd,
    msr_indices: &[u32],
    memory_size: u64,
) -> Result<SavedState, StateError> {
    let mp_state = vcpu.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(io("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?;
    let (xsave, fpu) = match vcpu.get_xsave() {
        Ok(x) if xsave_fits(kvm) => (Some(x), None),
        _ => (
            None,
            Some(FpuState::from(&vcpu.get_fpu().map_err(io("KVM_GET_FPU"))?)),
        ),
    };
    let xcrs = if kvm.check_extension(Cap::Xcrs) {
        vcpu.get_xcrs().ok()
    } else {
        None
    };
    let msrs = read_msrs(vcpu, msr_indices)?;
    let debugregs = vcpu.get_debug_regs().map_err(io("KVM_GET_DEBUGREGS"))?;
    let events = vcpu.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?;
    let clock = vm.get_clock().ok();
    Ok(SavedState {
        memory_size,
        mp_state,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs,
        msrs,
        debugregs,
        events,
        clock,
        disk: None,
    })
}

/// Whether the kernel's XSAVE area fits `kvm_xsave` (so `KVM_SET_XSAVE` is sound).
fn xsave_fits(kvm: &Kvm) -> bool {
    let size = kvm.check_extension_int(Cap::Xsave2);
    size <= 0 || usize::try_from(size).is_ok_and(|s| s <= std::mem::size_of::<kvm_xsave>())
}

/// Load `s` into a fresh vCPU and its VM (see the module docs for the order).
pub fn restore(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd, s: &SavedState) -> Result<(), StateError> {
    vcpu.set_sregs(&s.sregs).map_err(io("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(io("KVM_SET_REGS"))?;
    if let Some(x) = &s.xsave
        && xsave_fits(kvm)
    {
        // SAFETY: `xsave_fits` checked that the kernel's XSAVE area (KVM_CAP_XSAVE2) is no
        // larger than `kvm_xsave`, so the kernel reads only inside the struct.
        unsafe { vcpu.set_xsave(x) }.map_err(io("KVM_SET_XSAVE"))?;
    } else if let Some(f) = &s.fpu {
        vcpu.set_fpu(&kvm_fpu::from(f)).map_err(io("KVM_SET_FPU"))?;
    }
    if let Some(x) = &s.xcrs
        && let Err(e) = vcpu.set_xcrs(x)
    {
        tracing::debug!(target: "ha_kvm", "KVM_SET_XCRS failed, skipped: {e}");
    }
    let skipped = write_msrs(vcpu, &s.msrs)?;
    if skipped > 0 {
        tracing::debug!(target: "ha_kvm", skipped, "MSRs the kernel refused on restore");
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(io("KVM_SET_MP_STATE"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(io("KVM_SET_DEBUGREGS"))?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(io("KVM_SET_VCPU_EVENTS"))?;
    if let Some(c) = &s.clock {
        let c = kvm_clock_data {
            clock: c.clock,
            ..Default::default()
        };
        if let Err(e) = vm.set_clock(&c) {
            tracing::debug!(target: "ha_kvm", "KVM_SET_CLOCK failed, skipped: {e}");
        }
    }
    Ok(())
}

/// Seal in the envelope of [`FORMAT`].
pub fn encode(s: &SavedState) -> Result<Vec<u8>, StateError> {
    Ok(envelope::seal(FORMAT, s)?)
}

/// Open a blob made by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<SavedState, StateError> {
    Ok(envelope::open(FORMAT, bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedState {
        SavedState {
            memory_size: 1 << 24,
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs {
                rip: 0x1234,
                r15: 99,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr3: 0x15000,
                ..Default::default()
            },
            xsave: None,
            fpu: Some(FpuState {
                mxcsr: 0x1f80,
                ..Default::default()
            }),
            xcrs: None,
            msrs: vec![(0x10, 12345)],
            debugregs: kvm_debugregs::default(),
            events: kvm_vcpu_events::default(),
            clock: Some(kvm_clock_data {
                clock: 77,
                ..Default::default()
            }),
            disk: None,
        }
    }

    #[test]
    fn encode_decode_roundtrip() {
        let bytes = encode(&sample()).expect("encode");
        let s = decode(&bytes).expect("decode");
        assert_eq!(s.regs.rip, 0x1234);
        assert_eq!(s.regs.r15, 99);
        assert_eq!(s.sregs.cr3, 0x15000);
        assert_eq!(s.msrs, vec![(0x10, 12345)]);
        assert_eq!(s.fpu.map(|f| f.mxcsr), Some(0x1f80));
        assert_eq!(s.clock.map(|c| c.clock), Some(77));
        assert_eq!(s.disk, None);
    }

    #[test]
    fn the_disk_device_roundtrips() {
        let mmio = MmioState {
            driver_features: 1 << 32,
            status: 0xF,
            features_sel: (1, 1),
            interrupt_status: 1,
            queue: ha_virtio::mmio::SavedQueue {
                size: 16,
                ready: true,
                desc_table: 0x6_0000,
                avail_ring: 0x6_1000,
                used_ring: 0x6_2000,
                next_avail: 7,
                next_used: 7,
            },
        };
        let mut st = sample();
        st.disk = Some(DiskState {
            size: 1 << 20,
            mmio: mmio.clone(),
        });
        let s = decode(&encode(&st).expect("encode")).expect("decode");
        assert_eq!(
            s.disk,
            Some(DiskState {
                size: 1 << 20,
                mmio
            })
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let bytes = encode(&sample()).expect("encode");
        assert!(matches!(
            decode(b"nope"),
            Err(StateError::Envelope(EnvelopeError::Short { got: 4 }))
        ));
        let mut bad = bytes.clone();
        bad[8] = 9;
        assert!(matches!(
            decode(&bad),
            Err(StateError::Envelope(EnvelopeError::Version { got: 9, .. }))
        ));
        assert!(decode(&bytes[..bytes.len() / 2]).is_err());
        for cut in 0..bytes.len().min(64) {
            let _ = decode(&bytes[..cut]);
        }
    }
}
