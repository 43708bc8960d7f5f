//! The built-in workloads of `docs/GUESTS.md`, written once: what a workload guest does in
//! one unit of work, over any guest memory. The simulated backend runs its guests with it,
//! and the tests of every backend hold their guests to it ([`ImageModel`]); the KVM guests'
//! CPL3 program is checked against it word for word.
//!
//! [`Vcpu`] holds what a guest keeps in registers between instructions; at every unit
//! boundary all of it is in the status page, so a guest paused there is fully described by
//! its memory.

use crate::guest_abi::{
    GuestParams, OUTPUT_RING_SLOTS, OutputRecord, PARAMS_GPA, STATUS_GPA, Workload, checksum_step,
    status,
};
use ha_codec::PAGE_SIZE;
use std::collections::BTreeSet;

const PAGE: u64 = PAGE_SIZE as u64;

/// Guest memory as a workload sees it: aligned 64-bit words at guest-physical addresses
/// inside memory.
pub trait Memory {
    /// The word at `gpa`.
    fn load(&self, gpa: u64) -> u64;
    /// Store `v` at `gpa`.
    fn store(&mut self, gpa: u64, v: u64);
    /// The word at `gpa`, ordered after the VMM's stores to it (the ring's tail).
    fn load_acquire(&self, gpa: u64) -> u64 {
        self.load(gpa)
    }
    /// Store `v` at `gpa`, ordered after every store before it (the ring's head).
    fn store_release(&mut self, gpa: u64, v: u64) {
        self.store(gpa, v);
    }
    /// Make the stores so far complete (dirty bits included) before the VMM looks: called
    /// before a doorbell and at the end of a unit.
    fn flush(&mut self) {}
}

/// Why a unit stopped.
#[derive(Debug, thiserror::Error)]
pub enum UnitError<E: std::error::Error + 'static> {
    /// The doorbell (the VMM's drain of the output ring) failed.
    #[error("doorbell")]
    Doorbell(#[source] E),
    /// The ring was still full after a doorbell.
    #[error("output ring still full after the doorbell")]
    RingStuck,
}

/// The workload's registers: loaded from the status page at start, stored back after
/// every unit.
#[derive(Debug, Clone)]
pub struct Vcpu {
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
    pub fn load(params: &GuestParams, mem: &impl Memory) -> Self {
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
    pub fn progress(&self) -> u64 {
        self.progress
    }

    /// The running checksum of every value written.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }

    /// The next output sequence number.
    pub fn out_head(&self) -> u64 {
        self.out_head
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
    fn write<M: Memory>(&mut self, mem: &mut M, a: u64, v: u64) {
        mem.store(a, v);
        self.checksum = checksum_step(self.checksum, v);
    }

    /// Run one work unit (steps 1–3 of GUESTS.md; pacing is the caller's). `doorbell`
    /// drains the output ring (it gets the memory, flushed).
    pub fn unit<M: Memory, E: std::error::Error + 'static>(
        &mut self,
        mem: &mut M,
        doorbell: &mut dyn FnMut(&mut M) -> Result<(), E>,
    ) -> Result<(), UnitError<E>> {
        let n = self.progress;
        let (base, h, p) = (self.base, self.heap, self.pages);

        // 1. The writes.
        match self.workload {
            Workload::Idle => self.checksum = checksum_step(self.checksum, n.wrapping_add(1)),
            Workload::Memwrite => {
                let a = base + n.wrapping_mul(64) % h;
                let r = self.next();
                for k in 0..8 {
                    self.write(mem, a + 8 * k, r.wrapping_add(k));
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
                    self.write(mem, base + 128 * i + 8 * k, v);
                }
            }
            Workload::Npb => {
                let page = base + PAGE * (n % p);
                for k in 0..512 {
                    let a = page + 8 * k;
                    let v = mem.load(a).wrapping_add(n).wrapping_add(1);
                    self.write(mem, a, v);
                }
            }
            Workload::Web => {
                let mut g = WebGuest { cpu: self, mem };
                crate::web::request(&mut g, n, p);
            }
        }

        // 2. Progress and the guest-owned status words.
        self.progress = n.wrapping_add(1);
        mem.store(STATUS_GPA + status::PROGRESS as u64, self.progress);
        mem.store(STATUS_GPA + status::CHECKSUM as u64, self.checksum);
        mem.store(STATUS_GPA + status::RNG as u64, self.rng);

        // 3. Output.
        if self.output_every > 0 && self.progress.is_multiple_of(self.output_every) {
            let tail_gpa = STATUS_GPA + status::OUT_TAIL as u64;
            if self.out_head.wrapping_sub(mem.load_acquire(tail_gpa)) >= OUTPUT_RING_SLOTS {
                mem.flush();
                doorbell(mem).map_err(UnitError::Doorbell)?;
                if self.out_head.wrapping_sub(mem.load_acquire(tail_gpa)) >= OUTPUT_RING_SLOTS {
                    return Err(UnitError::RingStuck);
                }
            }
            let seq = self.out_head;
            let slot = OutputRecord::slot_gpa(seq);
            mem.store(slot, seq);
            mem.store(slot + 8, 16); // u32 len = 16, u32 reserved = 0
            mem.store(slot + 16, self.progress);
            mem.store(slot + 24, self.checksum);
            mem.flush();
            self.out_head = seq.wrapping_add(1);
            mem.store_release(STATUS_GPA + status::OUT_HEAD as u64, self.out_head);
            let pending = self.out_head.wrapping_sub(mem.load_acquire(tail_gpa));
            if (self.doorbell_every > 0 && pending >= self.doorbell_every)
                || pending >= OUTPUT_RING_SLOTS
            {
                doorbell(mem).map_err(UnitError::Doorbell)?;
            }
        }
        mem.flush();
        Ok(())
    }
}

/// The vCPU as the `web` reference semantics see it (heap offsets).
struct WebGuest<'a, M> {
    cpu: &'a mut Vcpu,
    mem: &'a mut M,
}

impl<M: Memory> crate::web::Guest for WebGuest<'_, M> {
    fn next(&mut self) -> u64 {
        self.cpu.next()
    }
    fn read(&self, off: u64) -> u64 {
        self.mem.load(self.cpu.base + off)
    }
    fn write(&mut self, off: u64, v: u64) {
        let a = self.cpu.base + off;
        self.cpu.write(self.mem, a, v);
    }
}

/// Guest memory as plain bytes that remember which pages were written.
#[derive(Debug, Clone)]
pub struct Image {
    /// The bytes.
    pub bytes: Vec<u8>,
    written: Vec<bool>,
}

impl Image {
    /// Memory holding `bytes`, no page written yet.
    pub fn new(bytes: Vec<u8>) -> Self {
        let pages = bytes.len().div_ceil(PAGE_SIZE);
        Self {
            bytes,
            written: vec![false; pages],
        }
    }

    /// Copy `b` to `gpa`, marking the pages written.
    pub fn write_bytes(&mut self, gpa: u64, b: &[u8]) {
        let at = usize::try_from(gpa).unwrap_or(usize::MAX);
        self.bytes[at..at + b.len()].copy_from_slice(b);
        for page in at / PAGE_SIZE..(at + b.len()).div_ceil(PAGE_SIZE) {
            self.written[page] = true;
        }
    }

    /// The pages written since the last call.
    pub fn take_written(&mut self) -> BTreeSet<usize> {
        let set = (0..self.written.len())
            .filter(|&p| self.written[p])
            .collect();
        self.written.fill(false);
        set
    }
}

impl Memory for Image {
    fn load(&self, gpa: u64) -> u64 {
        let at = usize::try_from(gpa).unwrap_or(usize::MAX);
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.bytes[at..at + 8]);
        u64::from_le_bytes(w)
    }

    fn store(&mut self, gpa: u64, v: u64) {
        self.write_bytes(gpa, &v.to_le_bytes());
    }
}

/// A whole guest run by the model: its memory image, its vCPU and the records its
/// doorbells drained. Tests run it beside a backend's guest and compare.
#[derive(Debug, Clone)]
pub struct ImageModel {
    /// The guest's memory.
    pub mem: Image,
    /// Its vCPU.
    pub cpu: Vcpu,
    /// The guest's parameters.
    pub params: GuestParams,
    /// Records drained at doorbells, in order.
    pub drained: Vec<OutputRecord>,
}

impl ImageModel {
    /// A new guest of `memory_size` bytes running `params`: zero memory with the params
    /// page and (for `web`) the document root written, as a VMM writes them.
    pub fn fresh(memory_size: u64, params: &GuestParams) -> Self {
        let size = usize::try_from(memory_size).unwrap_or(usize::MAX);
        let mut mem = Image::new(vec![0u8; size]);
        let mut page = vec![0u8; PAGE_SIZE];
        params.write_page(&mut page);
        mem.write_bytes(PARAMS_GPA, &page);
        if let Some((gpa, bytes)) = crate::web::docroot(params) {
            mem.write_bytes(gpa, &bytes);
        }
        let cpu = Vcpu::load(params, &mem);
        Self {
            mem,
            cpu,
            params: params.clone(),
            drained: Vec::new(),
        }
    }

    /// A guest continuing from a memory image (None: its params page is not a guest's).
    pub fn from_image(bytes: Vec<u8>) -> Option<Self> {
        let params = GuestParams::read_page(bytes.get(PARAMS_GPA as usize..)?.get(..PAGE_SIZE)?)?;
        let mem = Image::new(bytes);
        let cpu = Vcpu::load(&params, &mem);
        Some(Self {
            mem,
            cpu,
            params,
            drained: Vec::new(),
        })
    }

    /// One unit; doorbells drain into [`ImageModel::drained`].
    pub fn unit(&mut self) {
        let mut drained = std::mem::take(&mut self.drained);
        let res = self.cpu.unit(&mut self.mem, &mut |m: &mut Image| -> Result<
            (),
            std::convert::Infallible,
        > {
            drained.extend(drain(m));
            Ok(())
        });
        self.drained = drained;
        debug_assert!(res.is_ok(), "a model's doorbell always drains the ring");
    }

    /// Run units until progress reaches `progress`.
    pub fn run_to(&mut self, progress: u64) {
        while self.cpu.progress() < progress {
            self.unit();
        }
    }

    /// The heap's bytes.
    pub fn heap(&self) -> &[u8] {
        let at = usize::try_from(self.params.heap_gpa).unwrap_or(usize::MAX);
        let len = usize::try_from(self.params.heap_size).unwrap_or(usize::MAX);
        &self.mem.bytes[at..at + len]
    }

    /// The VMM's drain (doorbell or engine): records tail..head, then the tail stored.
    pub fn drain(&mut self) -> Vec<OutputRecord> {
        drain(&mut self.mem)
    }
}

/// The VMM's drain of the output ring in `m`: records tail..head, then the tail stored.
fn drain(m: &mut Image) -> Vec<OutputRecord> {
    let tail_gpa = STATUS_GPA + status::OUT_TAIL as u64;
    let (tail, head) = (
        m.load(tail_gpa),
        m.load(STATUS_GPA + status::OUT_HEAD as u64),
    );
    let recs = (tail..head)
        .filter_map(|seq| {
            let s = usize::try_from(OutputRecord::slot_gpa(seq)).ok()?;
            OutputRecord::read_slot(m.bytes.get(s..s + 64)?)
        })
        .collect();
    if head != tail {
        m.store(tail_gpa, head);
    }
    recs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_abi::HEAP_GPA;

    fn params(w: Workload) -> GuestParams {
        GuestParams {
            workload: w,
            seed: 5,
            heap_gpa: HEAP_GPA,
            heap_size: 64 * PAGE,
            rate: 0,
            tsc_khz: 0,
            output_every: 3,
            doorbell_every: 4,
        }
    }

    #[test]
    fn units_are_deterministic_and_continue_from_an_image() {
        for w in [
            Workload::Idle,
            Workload::Memwrite,
            Workload::Kv,
            Workload::Npb,
            Workload::Web,
        ] {
            let mut a = ImageModel::fresh(4 << 20, &params(w));
            a.run_to(50);
            // Continue from a copy of memory: the same as running on.
            let mut b = ImageModel::from_image(a.mem.bytes.clone()).unwrap();
            a.run_to(120);
            b.run_to(120);
            assert_eq!(a.mem.bytes, b.mem.bytes, "{w:?}");
            assert_eq!(a.cpu.checksum(), b.cpu.checksum(), "{w:?}");
            // Output: a record every 3 units, drained in sequence.
            let mut recs = a.drained.clone();
            recs.extend(a.drain());
            assert_eq!(recs.len(), 40, "{w:?}");
            assert!(recs.iter().enumerate().all(|(i, r)| r.seq == i as u64));
            if w != Workload::Idle {
                assert!(a.heap().iter().any(|&b| b != 0), "{w:?} wrote no heap");
            }
        }
    }
}
