//! Shared helpers for the real-KVM tests: skip (or fail) without /dev/kvm, small specs, and
//! a plain-Rust model of docs/GUESTS.md.
#![allow(dead_code)]

use ha_guest::domain::{Domain, GuestSpec};
use ha_kvm::{KVM_DEVICE, KvmDomain, KvmFactory};
use ha_workloads::guest_abi::{GuestParams, HEAP_GPA, OutputRecord, Workload};

/// Whether KVM can be used; `false` means "skip". Panics with the reason when
/// `CASTOR_REQUIRE_KVM=1`.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
    {
        Ok(_) => true,
        Err(e) => {
            let reason = format!("cannot open {KVM_DEVICE}: {e}");
            if std::env::var("CASTOR_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("CASTOR_REQUIRE_KVM=1 but {reason}");
            }
            eprintln!("skipping KVM test: {reason}");
            false
        }
    }
}

/// A spec with a heap filling `memory_mib` minus the first MiB.
pub fn spec(workload: Workload, memory_mib: u64, rate: u64) -> GuestSpec {
    let memory_size = memory_mib << 20;
    GuestSpec {
        memory_size,
        params: GuestParams {
            workload,
            seed: 0x5EED_0000 + workload as u64,
            heap_gpa: HEAP_GPA,
            heap_size: memory_size - HEAP_GPA,
            rate,
            tsc_khz: 0,
            output_every: 0,
            doorbell_every: 0,
            disk_size: 0,
        },
        devices: Default::default(),
    }
}

/// Create and start a guest.
pub fn start(spec: &GuestSpec) -> KvmDomain {
    let mut d = KvmFactory::new()
        .create_kvm(spec)
        .expect("create KVM guest");
    d.resume().expect("resume");
    d
}

/// Read all of guest memory.
pub fn snapshot(d: &dyn Domain) -> Vec<u8> {
    let mut buf = vec![0u8; d.memory_size() as usize];
    d.read_memory(0, &mut buf).expect("read memory");
    buf
}

/// Resume, poll until progress reaches `target` (at least `min_ms` after the resume, at
/// most 5 s), pause, and return the status. Polling makes the tests robust on a loaded
/// machine where a fixed sleep may let the vCPU run too little.
pub fn run_until(
    d: &mut dyn Domain,
    target: u64,
    min_ms: u64,
) -> ha_workloads::guest_abi::GuestStatus {
    let t = std::time::Instant::now();
    d.resume().expect("resume");
    std::thread::sleep(std::time::Duration::from_millis(min_ms));
    while d.status().expect("status").progress < target && t.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    d.pause().expect("pause");
    d.status().expect("status")
}

/// An output record's payload: (progress, checksum).
pub fn payload(r: &OutputRecord) -> (u64, u64) {
    assert_eq!(r.payload.len(), 16, "record {} payload length", r.seq);
    let p = u64::from_le_bytes(r.payload[..8].try_into().unwrap());
    let c = u64::from_le_bytes(r.payload[8..].try_into().unwrap());
    (p, c)
}
