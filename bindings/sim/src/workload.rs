//! The built-in workloads of `docs/GUESTS.md`, run by the simulated vCPU over guest memory.
//!
//! [`Vcpu`] holds what a KVM guest keeps in registers between instructions; at every unit
//! boundary all of it is in the status page, so a guest paused there is fully described by
//! its memory (plus the pacing clock, which the domain saves).

use ha_common::PAGE_SIZE;
use ha_common::guest_abi::{
    GuestParams, HEAP_GPA, OUTPUT_RING_SLOTS, OutputRecord, PARAMS_GPA, STATUS_GPA, Workload,
    checksum_step, status,
};

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

/// The workload's registers: loaded from the status page at start, stored back after
/// every unit.
#[derive(Debug)]
pub(crate) struct Vcpu {
    workload: Workload,
    base: u64,
    heap: u64,
    pages: u64,
    output_every: u64,
    doorbell_every: u64,
    progress: u64,
    checksum: u64,
    rng: u64,
    out_head: u64,
}

impl Vcpu {
    /// Start (or continue) the guest described by `params` from the status page of `mem`.
    pub(crate) fn load(params: &GuestParams, mem: &GuestMemory) -> Self {
        let st = |off: usize| mem.load(STATUS_GPA + off as u64);
        let progress = st(status::PROGRESS);
        let mut rng = st(status::RNG);
        if progress == 0 && rng == 0 {
            rng = params.seed | 1;
        }
        Self {
            workload: params.workload,
            base: params.heap_gpa,
            heap: params.heap_size,
            pages: params.heap_size / PAGE,
            output_every: params.output_every,
            doorbell_every: params.doorbell_every,
            progress,
            checksum: st(status::CHECKSUM),
            rng,
            out_head: st(status::OUT_HEAD),
        }
    }

    /// Work units completed.
    pub(crate) fn progress(&self) -> u64 {
        self.progress
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The workload's `write(a, v)`: store and fold into the checksum.
    fn write(&mut self, w: &mut PageWriter<'_>, a: u64, v: u64) {
        w.store(a, v);
        self.checksum = checksum_step(self.checksum, v);
    }

    /// Run one work unit (steps 1–3 of GUESTS.md; pacing is the caller's).
    /// `doorbell` drains the output ring.
    pub(crate) fn unit(
        &mut self,
        mem: &GuestMemory,
        doorbell: &mut dyn FnMut() -> Result<(), GuestError>,
    ) -> Result<(), GuestError> {
        let n = self.progress;
        let (base, h, p) = (self.base, self.heap, self.pages);
        let mut w = PageWriter::new(mem);

        // 1. The writes.
        match self.workload {
            Workload::Idle => self.checksum = checksum_step(self.checksum, n.wrapping_add(1)),
            Workload::Memwrite => {
                let a = base + n.wrapping_mul(64) % h;
                let r = self.next();
                for k in 0..8 {
                    self.write(&mut w, a + 8 * k, r.wrapping_add(k));
                }
            }
            Workload::Kv => {
                let records = h / 128;
                let hot = (records / 10).max(1);
                let i = if self.next() % 100 < 80 {
                    self.next() % hot
                } else {
                    hot + self.next() % records.saturating_sub(hot).max(1)
                };
                for k in 0..4 {
                    let v = self.next();
                    self.write(&mut w, base + 128 * i + 8 * k, v);
                }
            }
            Workload::Npb => {
                let page = base + PAGE * (n % p);
                for k in 0..512 {
                    let a = page + 8 * k;
                    let v = mem.load(a).wrapping_add(n).wrapping_add(1);
                    self.write(&mut w, a, v);
                }
            }
            Workload::Web => self.web(&mut w, mem, n),
        }

        // 2. Progress and the guest-owned status words.
        self.progress = n.wrapping_add(1);
        w.store(STATUS_GPA + status::PROGRESS as u64, self.progress);
        w.store(STATUS_GPA + status::CHECKSUM as u64, self.checksum);
        w.store(STATUS_GPA + status::RNG as u64, self.rng);

        // 3. Output.
        if self.output_every > 0 && self.progress.is_multiple_of(self.output_every) {
            let tail_gpa = STATUS_GPA + status::OUT_TAIL as u64;
            if self.out_head.wrapping_sub(mem.load_acquire(tail_gpa)) >= OUTPUT_RING_SLOTS {
                w.flush();
                doorbell()?;
                if self.out_head.wrapping_sub(mem.load_acquire(tail_gpa)) >= OUTPUT_RING_SLOTS {
                    return Err(GuestError::RingStuck);
                }
            }
            let seq = self.out_head;
            let slot = OutputRecord::slot_gpa(seq);
            w.store(slot, seq);
            w.store(slot + 8, 16); // u32 len = 16, u32 reserved = 0
            w.store(slot + 16, self.progress);
            w.store(slot + 24, self.checksum);
            w.flush();
            self.out_head = seq.wrapping_add(1);
            mem.store_release(STATUS_GPA + status::OUT_HEAD as u64, self.out_head);
            let pending = self.out_head.wrapping_sub(mem.load_acquire(tail_gpa));
            if (self.doorbell_every > 0 && pending >= self.doorbell_every)
                || pending >= OUTPUT_RING_SLOTS
            {
                doorbell()?;
            }
        }
        Ok(())
    }

    /// One `web` request, by the reference semantics in `ha_common::web`.
    fn web(&mut self, w: &mut PageWriter<'_>, mem: &GuestMemory, n: u64) {
        let pages = self.pages;
        let mut g = WebGuest { cpu: self, w, mem };
        ha_common::web::request(&mut g, n, pages);
    }
}

/// The sim vCPU as the `web` reference model sees it.
struct WebGuest<'a, 'b> {
    cpu: &'a mut Vcpu,
    w: &'a mut PageWriter<'b>,
    mem: &'a GuestMemory,
}

impl ha_common::web::Guest for WebGuest<'_, '_> {
    fn next(&mut self) -> u64 {
        self.cpu.next()
    }
    fn read(&self, off: u64) -> u64 {
        // Stores reach memory at once (the writer only defers the dirty bit).
        self.mem.load(self.cpu.base + off)
    }
    fn write(&mut self, off: u64, v: u64) {
        let a = self.cpu.base + off;
        self.cpu.write(self.w, a, v);
    }
}
