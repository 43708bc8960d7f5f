//! Shared helpers for the real-KVM tests: skip (or fail) without /dev/kvm, small specs, and
//! a plain-Rust model of docs/GUESTS.md.
#![allow(dead_code)]

use ha_common::domain::{Domain, GuestSpec};
use ha_common::guest_abi::{GuestParams, HEAP_GPA, Workload, checksum_step};
use ha_kvm::{KVM_DEVICE, KvmDomain, KvmFactory};

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
        },
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

/// The docs/GUESTS.md algorithms on a plain heap.
#[derive(Clone, Debug)]
pub struct Model {
    pub p: GuestParams,
    pub heap: Vec<u8>,
    pub rng: u64,
    pub checksum: u64,
    pub progress: u64,
}

/// The model as the `web` reference semantics see it (heap offsets).
struct ModelWeb<'a>(&'a mut Model);

impl ha_common::web::Guest for ModelWeb<'_> {
    fn next(&mut self) -> u64 {
        self.0.next()
    }
    fn read(&self, off: u64) -> u64 {
        self.0.read(self.0.p.heap_gpa + off)
    }
    fn write(&mut self, off: u64, v: u64) {
        let a = self.0.p.heap_gpa + off;
        self.0.write(a, v);
    }
}

impl Model {
    pub fn new(p: &GuestParams) -> Self {
        let mut heap = vec![0; p.heap_size as usize];
        // The document root the VMM writes into a new web guest.
        if let Some((gpa, bytes)) = ha_common::web::docroot(p) {
            heap[(gpa - p.heap_gpa) as usize..][..bytes.len()].copy_from_slice(&bytes);
        }
        Self {
            p: p.clone(),
            heap,
            rng: p.seed | 1,
            checksum: 0,
            progress: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn write(&mut self, gpa: u64, v: u64) {
        let off = (gpa - self.p.heap_gpa) as usize;
        self.heap[off..off + 8].copy_from_slice(&v.to_le_bytes());
        self.checksum = checksum_step(self.checksum, v);
    }

    fn read(&self, gpa: u64) -> u64 {
        let off = (gpa - self.p.heap_gpa) as usize;
        u64::from_le_bytes(self.heap[off..off + 8].try_into().unwrap())
    }

    /// One work unit.
    pub fn step(&mut self) {
        let h = self.p.heap_size;
        let pages = h / 4096;
        let base = self.p.heap_gpa;
        let n = self.progress;
        match self.p.workload {
            Workload::Idle => self.checksum = checksum_step(self.checksum, n + 1),
            Workload::Memwrite => {
                let a = base + (n * 64) % h;
                let r = self.next();
                for k in 0..8 {
                    self.write(a + 8 * k, r.wrapping_add(k));
                }
            }
            Workload::Kv => {
                let r = h / 128;
                let hot = (r / 10).max(1);
                let i = if self.next() % 100 < 80 {
                    self.next() % hot
                } else {
                    hot + self.next() % (r - hot).max(1)
                };
                for k in 0..4 {
                    let v = self.next();
                    self.write(base + 128 * i + 8 * k, v);
                }
            }
            Workload::Npb => {
                let p = n % pages;
                for k in 0..512 {
                    let a = base + 4096 * p + 8 * k;
                    let v = self.read(a).wrapping_add(n + 1);
                    self.write(a, v);
                }
            }
            Workload::Web => {
                let mut g = ModelWeb(self);
                ha_common::web::request(&mut g, n, pages);
            }
        }
        self.progress = n + 1;
    }
}

/// Resume, poll until progress reaches `target` (at least `min_ms` after the resume, at
/// most 5 s), pause, and return the status. Polling makes the tests robust on a loaded
/// machine where a fixed sleep may let the vCPU run too little.
pub fn run_until(
    d: &mut dyn Domain,
    target: u64,
    min_ms: u64,
) -> ha_common::guest_abi::GuestStatus {
    let t = std::time::Instant::now();
    d.resume().expect("resume");
    std::thread::sleep(std::time::Duration::from_millis(min_ms));
    while d.status().expect("status").progress < target && t.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    d.pause().expect("pause");
    d.status().expect("status")
}
