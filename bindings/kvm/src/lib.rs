//! `ha-kvm`: Castor's KVM backend behind the `Domain` trait.
//!
//! A minimal VMM on the rust-vmm crates: one memory slot with KVM's dirty log, one vCPU
//! thread, an optional virtio-blk disk (`ha-virtio`, its registers at
//! `guest_abi::disk::MMIO_GPA`), and a built-in workload guest (docs/GUESTS.md) generated
//! at start-up with iced-x86. The guest runs in 64-bit long mode at CPL3 with no kernel, which is what runs
//! at native speed on PVM (nested) KVM.
//!
//! | module | concern |
//! |---|---|
//! | [`memory`] | guest RAM and the bitmap of the VMM's own writes |
//! | [`cow`] | copy-on-write checkpoints: userfaultfd write-protection of guest RAM |
//! | `uffd` | the userfaultfd calls `cow` needs, on the kernel ABI (no bindgen) |
//! | [`guest`] | memory layout, boot registers, the generated guest program |
//! | [`vcpu`] | the vCPU thread, pause/resume, exits, doorbell |
//! | [`output`] | draining the guest's output ring |
//! | [`state`] | saving and restoring vCPU and VM state |
//! | [`vm`] | one guest: [`KvmDomain`], the `Domain` implementation |
//!
//! Tests in `tests/kvm.rs` and `tests/disk.rs` (the disk and the `db` guest) run real
//! guests (skipped without `/dev/kvm` unless `CASTOR_REQUIRE_KVM=1`), checked against the
//! workloads' reference model of docs/GUESTS.md, heap and disk alike. Measurements (pause latency, dirty-log cost, save/restore,
//! dirty rates): `cargo test -p ha-kvm --release --test measure -- --ignored --nocapture`.

#![warn(missing_docs)]

pub mod cow;
pub mod guest;
pub mod memory;
pub mod output;
pub mod state;
mod uffd;
pub mod vcpu;
pub mod vm;

use std::path::PathBuf;

use ha_guest::domain::{Devices, Domain, DomainError, DomainFactory, GuestSpec};
use ha_guest::image::GuestImage;

pub use vm::KvmDomain;

/// The default KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Creates KVM guests (`--guest kvm`).
#[derive(Clone, Debug)]
pub struct KvmFactory {
    cfg: vm::VmConfig,
}

impl Default for KvmFactory {
    fn default() -> Self {
        Self::new()
    }
}

impl KvmFactory {
    /// A factory using [`KVM_DEVICE`] with dirty logging on.
    pub fn new() -> Self {
        Self {
            cfg: vm::VmConfig {
                device: PathBuf::from(KVM_DEVICE),
                dirty_log: true,
            },
        }
    }

    /// Use another KVM device node.
    pub fn with_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.device = path.into();
        self
    }

    /// Turn KVM's dirty log off (for measuring its cost only: every harvest then reports
    /// every page).
    pub fn with_dirty_log(mut self, on: bool) -> Self {
        self.cfg.dirty_log = on;
        self
    }

    /// Create a guest and return the concrete type (for tests and benchmarks).
    pub fn create_kvm(&self, spec: &GuestSpec) -> Result<KvmDomain, DomainError> {
        KvmDomain::create(&self.cfg, spec)
    }

    /// Restore a guest attached to `devices` and return the concrete type.
    pub fn restore_kvm(
        &self,
        image: &[u8],
        state: &[u8],
        devices: &Devices,
    ) -> Result<KvmDomain, DomainError> {
        KvmDomain::restore(&self.cfg, image, state, devices)
    }
}

impl DomainFactory for KvmFactory {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create(&self, spec: &GuestSpec) -> Result<Box<dyn Domain>, DomainError> {
        Ok(Box::new(self.create_kvm(spec)?))
    }

    fn restore(
        &self,
        image: &[u8],
        state: &[u8],
        devices: &Devices,
    ) -> Result<Box<dyn Domain>, DomainError> {
        Ok(Box::new(self.restore_kvm(image, state, devices)?))
    }

    fn restore_image(
        &self,
        image: GuestImage,
        state: &[u8],
        devices: &Devices,
    ) -> Result<Box<dyn Domain>, DomainError> {
        Ok(Box::new(KvmDomain::restore_in_place(
            &self.cfg, image, state, devices,
        )?))
    }
}
