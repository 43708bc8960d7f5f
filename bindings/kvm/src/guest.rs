//! The built-in workload guest: its backend-owned memory layout (GDT, page tables, code,
//! stack), the boot-time register set-up for a 64-bit CPL3 guest (see PVM-NOTES), and the
//! guest program itself, generated with iced-x86's `CodeAssembler` from `docs/GUESTS.md`.
//!
//! Register use of the generated program (all saved with the vCPU, so a restored guest
//! continues exactly where it was):
//!
//! | reg | meaning |
//! |---|---|
//! | r15 | progress `n` |
//! | r14 | checksum |
//! | r13 | splitmix64 state `rng` |
//! | r12 | `out_head` (`files`: the request's file during a unit, reloaded from `OUT_HEAD` before its end) |
//! | r11 | `last` rdtsc value (pacing) |
//! | r10 | TSC ticks per unit (0: no pacing) |
//! | r9, r8 | heap base, heap size `H` (`db`: scratch during a read-back's check, reloaded at every unit; `files`: the address of cache slot 0) |
//! | rbx, rbp | per-workload constants (kv: cold span, hot; npb: `P`; web: `Ph`, `Pl`; db: `T`, `L`; files: `N`, `K`) |
//! | rax, rcx, rdx, rsi, rdi | scratch |
//!
//! `db` and `files` drive the virtio-blk disk (docs/GUESTS.md, "The disk as the guest drives
//! it") with one driver: set up once (`DISK_READY`), then per batch up to four requests in
//! descriptors `3k, 3k+1, 3k+2` (a flush: `3k, 3k+2`; `files` reads or writes a whole file
//! of up to 64 KiB with its one data descriptor), one `QueueNotify` write, a poll of the
//! used index, and the status bytes (pre-set to 0xFF, so a request the device never
//! completed counts as failed) into `DISK_ERRORS`. The driver's own state is the rings in
//! memory and the device's registers; nothing in vCPU registers outlives a unit.
//!
//! The status page is stored at the end of every unit in the order `CHECKSUM`, `RNG`,
//! `PROGRESS`, and every output record carries the (progress, checksum) pair of its unit.

use ha_workloads::guest_abi::{
    DOORBELL_PORT, GuestParams, HEAP_GPA, OUTPUT_RING_GPA, OUTPUT_RING_SLOTS, PARAMS_GPA,
    STATUS_GPA, Workload, disk, params, status,
};
use iced_x86::IcedError;
use iced_x86::code_asm::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use crate::memory::{GuestRam, MemoryError};

/// Global descriptor table (null, 64-bit code DPL 3, data DPL 3).
pub const GDT_GPA: u64 = 0x14000;
/// Level-4 page table.
pub const PML4_GPA: u64 = 0x15000;
/// Page-directory-pointer table.
pub const PDPT_GPA: u64 = 0x16000;
/// First page directory (one per GiB of guest memory, 2 MiB pages).
pub const PD_GPA: u64 = 0x17000;
/// Most GiB of guest memory the page tables can map.
pub const MAX_GIB: u64 = 16;
/// The page directory of the GiB holding the disk's register window
/// (`guest_abi::disk::MMIO_GPA`, 16 GiB: just above the largest guest memory). Its one
/// 2 MiB page has no memory slot behind it, so every access exits as MMIO.
pub const MMIO_PD_GPA: u64 = PD_GPA + MAX_GIB * 0x1000;
/// Where the guest program is loaded (and where it starts).
pub const CODE_GPA: u64 = 0x30000;
/// Most bytes of guest program.
pub const CODE_MAX: usize = 0x10000;
/// Initial stack pointer (the program does not use the stack, but it is valid).
pub const STACK_TOP: u64 = 0x50000;
/// I/O port the guest program writes a code to when it cannot run (never a doorbell).
pub const PANIC_PORT: u16 = DOORBELL_PORT + 1;
/// Panic code: the params page names no known workload.
pub const PANIC_BAD_WORKLOAD: u32 = 1;
/// How many times the disk driver reads the used index after a notify before it counts
/// the batch's unfinished requests as failed (the device serves the queue before the
/// notify's exit returns, so the first read normally finds it caught up).
pub const DISK_POLLS: u32 = 1 << 16;

/// `files::file_pages`' key: `doc_word(seed ^ FILE_PAGES_KEY, f)`.
const FILE_PAGES_KEY: u64 = 0xF11E_5EED_0000_0000;
/// What `web::doc_word` xors its seed with.
const DOC_WORD_KEY: u64 = 0x5851_F42D_4C95_7F2D;
/// `files::content_word`'s key multipliers of the file (`f + 1`) and the version.
const CONTENT_FILE: u64 = 0xA24B_AED4_963E_E407;
const CONTENT_VERSION: u64 = 0x9FB2_1C65_1E98_DF25;

/// Selector of the code segment (GDT entry 1, RPL 3).
const CS_SEL: u16 = 0x8 | 3;
/// Selector of the data segments (GDT entry 2, RPL 3).
const DS_SEL: u16 = 0x10 | 3;
/// The multiplier of `checksum_step` and the splitmix64 increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Errors from building the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The code assembler rejected the program.
    #[error("cannot assemble the guest program")]
    Assemble(#[source] IcedError),
    /// The program does not fit its space.
    #[error("guest program is {0} bytes, more than its {CODE_MAX} byte space")]
    TooBig(usize),
    /// Guest memory size not supported.
    #[error("guest memory size {0:#x} must be a non-zero multiple of 2 MiB, at most {MAX_GIB} GiB")]
    MemorySize(u64),
    /// The workload parameters do not fit the memory.
    #[error("invalid guest parameters: {0}")]
    Params(String),
    /// Writing the boot pages failed.
    #[error("cannot write the boot pages")]
    Memory(#[source] MemoryError),
}

impl From<IcedError> for GuestError {
    fn from(e: IcedError) -> Self {
        Self::Assemble(e)
    }
}

/// Check a spec's memory size and params against what the guest program needs.
pub fn validate(memory_size: u64, p: &GuestParams) -> Result<(), GuestError> {
    const TWO_MIB: u64 = 2 << 20;
    if memory_size == 0 || !memory_size.is_multiple_of(TWO_MIB) || memory_size > MAX_GIB << 30 {
        return Err(GuestError::MemorySize(memory_size));
    }
    let bad = |m: String| Err(GuestError::Params(m));
    if p.heap_gpa < HEAP_GPA || !p.heap_gpa.is_multiple_of(4096) {
        return bad(format!(
            "heap_gpa {:#x} must be page aligned and >= {HEAP_GPA:#x}",
            p.heap_gpa
        ));
    }
    if p.heap_size == 0 || !p.heap_size.is_multiple_of(4096) {
        return bad(format!(
            "heap_size {:#x} must be a non-zero multiple of 4096",
            p.heap_size
        ));
    }
    match p.heap_gpa.checked_add(p.heap_size) {
        Some(end) if end <= memory_size => {}
        _ => {
            return bad(format!(
                "heap {:#x}+{:#x} does not fit in {memory_size:#x} bytes of memory",
                p.heap_gpa, p.heap_size
            ));
        }
    }
    if p.workload == Workload::Web && p.heap_size / 4096 < 16 {
        return bad("web needs a heap of at least 16 pages".into());
    }
    if !ha_workloads::model::disk_layout_fits(p) {
        return bad(format!(
            "workload {} needs a disk and room for its layout (heap {} bytes, disk {} bytes)",
            p.workload.name(),
            p.heap_size,
            p.disk_size
        ));
    }
    Ok(())
}

/// Write the GDT, the identity page tables and the guest program into fresh memory.
pub fn write_boot_pages(ram: &GuestRam) -> Result<(), GuestError> {
    let size = ram.size() as u64;
    let gdt: [u64; 3] = [0, 0x00AF_FB00_0000_FFFF, 0x00CF_F300_0000_FFFF];
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(GDT_GPA, &bytes).map_err(GuestError::Memory)?;

    // Present | writable | user on every level; PD entries are 2 MiB pages (PS).
    const PRW_USER: u64 = 0x7;
    ram.write_u64(PML4_GPA, PDPT_GPA | PRW_USER)
        .map_err(GuestError::Memory)?;
    let gib = size.div_ceil(1 << 30);
    for g in 0..gib {
        let pd = PD_GPA + g * 0x1000;
        ram.write_u64(PDPT_GPA + g * 8, pd | PRW_USER)
            .map_err(GuestError::Memory)?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((g << 30) + (i << 21)) | 0x83 | 0x4).to_le_bytes())
            .collect();
        ram.write(pd, &entries).map_err(GuestError::Memory)?;
    }
    // The disk's register window: one 2 MiB page at 16 GiB, no memory behind it.
    let window = disk::MMIO_GPA;
    ram.write_u64(PDPT_GPA + (window >> 30) * 8, MMIO_PD_GPA | PRW_USER)
        .map_err(GuestError::Memory)?;
    ram.write_u64(
        MMIO_PD_GPA + ((window >> 21) & 511) * 8,
        window | 0x83 | 0x4,
    )
    .map_err(GuestError::Memory)?;
    let code = assemble()?;
    ram.write(CODE_GPA, &code).map_err(GuestError::Memory)?;
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Turn the vCPU's reset `sregs` into 64-bit long mode at CPL3 on our page tables.
pub fn boot_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = segment(CS_SEL, 11, true);
    let data = segment(DS_SEL, 3, false);
    s.ss = data;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.gdt.base = GDT_GPA;
    s.gdt.limit = 3 * 8 - 1;
    s.cr3 = PML4_GPA;
    s.cr4 = 1 << 5; // PAE
    s.cr0 = 0x8001_0001; // PE | WP | PG
    s.efer = 0x500; // LME | LMA
    s
}

/// The registers the guest program starts with.
pub fn boot_regs() -> kvm_regs {
    kvm_regs {
        rip: CODE_GPA,
        rsp: STACK_TOP,
        rflags: 0x3002,
        ..Default::default()
    }
}

fn p(off: usize) -> AsmMemoryOperand {
    qword_ptr(PARAMS_GPA + off as u64)
}

fn s(off: usize) -> AsmMemoryOperand {
    qword_ptr(STATUS_GPA + off as u64)
}

/// The program builder: the assembler plus the few macros every workload uses.
struct Gen {
    a: CodeAssembler,
}

impl Gen {
    /// `rax = next()` (splitmix64 on r13); clobbers rdx.
    fn next(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rax, GOLDEN)?;
        a.add(r13, rax)?;
        a.mov(rax, r13)?;
        self.mix()
    }

    /// `rax = mix(rax)`, splitmix64's finaliser (as `next()` and `web::doc_word` end);
    /// clobbers rdx.
    fn mix(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rdx, rax)?;
        a.shr(rdx, 30)?;
        a.xor(rax, rdx)?;
        a.mov(rdx, 0xBF58_476D_1CE4_E5B9u64)?;
        a.imul_2(rax, rdx)?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 27)?;
        a.xor(rax, rdx)?;
        a.mov(rdx, 0x94D0_49BB_1331_11EBu64)?;
        a.imul_2(rax, rdx)?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 31)?;
        a.xor(rax, rdx)?;
        Ok(())
    }

    /// `checksum = checksum_step(checksum, v)`; clobbers rdx (`v` must not be rdx).
    fn sum(&mut self, v: AsmRegister64) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.rol(r14, 5)?;
        a.xor(r14, v)?;
        a.mov(rdx, GOLDEN)?;
        a.imul_2(r14, rdx)?;
        Ok(())
    }

    /// `write(dst, v)`: store then checksum; clobbers rdx.
    fn write(&mut self, dst: AsmMemoryOperand, v: AsmRegister64) -> Result<(), IcedError> {
        self.a.mov(dst, v)?;
        self.sum(v)
    }

    /// `write(dst, next())`; clobbers rax, rdx.
    fn write_next(&mut self, dst: AsmMemoryOperand) -> Result<(), IcedError> {
        self.next()?;
        self.write(dst, rax)
    }

    /// Steps 2–4 of a unit (status, output, pacing), then back to `top`.
    fn unit_end(&mut self, top: CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut pace = a.create_label();
        let mut full = a.create_label();
        let mut room = a.create_label();
        let mut ring = a.create_label();
        let mut spin = a.create_label();
        let mut paced = a.create_label();
        let mut done = a.create_label();

        a.inc(r15)?;
        a.mov(s(status::CHECKSUM), r14)?;
        a.mov(s(status::RNG), r13)?;
        a.mov(s(status::PROGRESS), r15)?;

        // Output: one record every `output_every` units.
        a.mov(rcx, p(params::OUTPUT_EVERY))?;
        a.test(rcx, rcx)?;
        a.jz(pace)?;
        a.mov(rax, r15)?;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.test(rdx, rdx)?;
        a.jnz(pace)?;
        // While the ring is full: ring the doorbell, do not produce.
        a.set_label(&mut full)?;
        a.mov(rax, r12)?;
        a.sub(rax, s(status::OUT_TAIL))?;
        a.cmp(rax, OUTPUT_RING_SLOTS as i32)?;
        a.jb(room)?;
        a.mov(dx, DOORBELL_PORT as u32)?;
        a.out(dx, al)?;
        a.jmp(full)?;
        a.set_label(&mut room)?;
        a.mov(rdi, r12)?;
        a.and(edi, (OUTPUT_RING_SLOTS - 1) as u32)?;
        a.shl(edi, 6)?;
        a.add(rdi, OUTPUT_RING_GPA as i32)?;
        a.mov(qword_ptr(rdi), r12)?;
        a.mov(dword_ptr(rdi + 8), 16)?;
        a.mov(dword_ptr(rdi + 12), 0)?;
        a.mov(qword_ptr(rdi + 16), r15)?;
        a.mov(qword_ptr(rdi + 24), r14)?;
        a.inc(r12)?;
        a.mov(s(status::OUT_HEAD), r12)?;
        // Doorbell when enough records wait (or the ring is full).
        a.mov(rax, r12)?;
        a.sub(rax, s(status::OUT_TAIL))?;
        a.cmp(rax, OUTPUT_RING_SLOTS as i32)?;
        a.jae(ring)?;
        a.mov(rcx, p(params::DOORBELL_EVERY))?;
        a.test(rcx, rcx)?;
        a.jz(pace)?;
        a.cmp(rax, rcx)?;
        a.jb(pace)?;
        a.set_label(&mut ring)?;
        a.mov(dx, DOORBELL_PORT as u32)?;
        a.out(dx, al)?;

        // Pacing: spin until `rdtsc - last >= ticks`, then `last = rdtsc`.
        a.set_label(&mut pace)?;
        a.test(r10, r10)?;
        a.jz(done)?;
        a.set_label(&mut spin)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(rcx, rax)?;
        a.sub(rax, r11)?;
        a.cmp(rax, r10)?;
        a.jae(paced)?;
        a.pause()?;
        a.jmp(spin)?;
        a.set_label(&mut paced)?;
        a.mov(r11, rcx)?;
        a.set_label(&mut done)?;
        a.jmp(top)?;
        Ok(())
    }

    /// `web`: `reg = doc = min(16, (P - Ph - Pl) / 2)` pages of document root
    /// (`ha_workloads::web::Layout`); needs rbx = Ph, rbp = Pl; clobbers only `reg`.
    fn doc_pages(&mut self, reg: AsmRegister64) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut ok = a.create_label();
        a.mov(reg, r8)?;
        a.shr(reg, 12)?;
        a.sub(reg, rbx)?;
        a.sub(reg, rbp)?;
        a.shr(reg, 1)?;
        a.cmp(reg, ha_workloads::web::DOC_PAGES_MAX as i32)?;
        a.jbe(ok)?;
        a.mov(reg, ha_workloads::web::DOC_PAGES_MAX)?;
        a.set_label(&mut ok)?;
        Ok(())
    }

    fn idle(&mut self, entry: &mut CodeLabel) -> Result<(), IcedError> {
        self.a.set_label(entry)?;
        let top = *entry;
        self.a.lea(rax, qword_ptr(r15 + 1))?;
        self.sum(rax)?;
        self.unit_end(top)
    }

    fn memwrite(&mut self, entry: &mut CodeLabel) -> Result<(), IcedError> {
        self.a.set_label(entry)?;
        let top = *entry;
        let a = &mut self.a;
        a.mov(rax, r15)?;
        a.shl(rax, 6)?;
        a.xor(edx, edx)?;
        a.div(r8)?;
        a.lea(rdi, qword_ptr(r9 + rdx))?;
        self.next()?;
        self.a.mov(rsi, rax)?;
        for k in 0..8i32 {
            self.a.lea(rax, qword_ptr(rsi + k))?;
            self.write(qword_ptr(rdi + 8 * k), rax)?;
        }
        self.unit_end(top)
    }

    /// The split of `kv` and `db` records: `hot = max(1, R / 10)`, `cold = max(1, R -
    /// hot)` for `R` in `records` (not rax, rdx, `hot` or `cold`); clobbers rax, rdx.
    fn hot_cold(
        &mut self,
        records: AsmRegister64,
        hot: AsmRegister64,
        cold: AsmRegister64,
    ) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut hot_ok = a.create_label();
        let mut cold_ok = a.create_label();
        a.mov(rax, records)?;
        a.xor(edx, edx)?;
        a.mov(hot, 10u64)?;
        a.div(hot)?;
        a.mov(hot, rax)?;
        a.test(hot, hot)?;
        a.jnz(hot_ok)?;
        a.mov(hot, 1u64)?;
        a.set_label(&mut hot_ok)?;
        a.mov(cold, records)?;
        a.sub(cold, hot)?;
        a.jnz(cold_ok)?;
        a.mov(cold, 1u64)?;
        a.set_label(&mut cold_ok)?;
        a.nop()?;
        Ok(())
    }

    /// `rdx = i`, a record picked as `kv` picks one: if `next() % 100 < 80` then
    /// `next() % hot` else `hot + next() % cold`; clobbers rax, rcx.
    fn pick_record(&mut self, hot: AsmRegister64, cold: AsmRegister64) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut cold_pick = a.create_label();
        let mut have = a.create_label();
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.mov(ecx, 100)?;
        a.div(rcx)?;
        a.cmp(rdx, 80)?;
        a.jae(cold_pick)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.div(hot)?;
        a.jmp(have)?;
        a.set_label(&mut cold_pick)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.div(cold)?;
        a.add(rdx, hot)?;
        a.set_label(&mut have)?;
        a.nop()?;
        Ok(())
    }

    fn kv(&mut self, entry: &mut CodeLabel) -> Result<(), IcedError> {
        self.a.set_label(entry)?;
        // R = H / 128; rbp = hot, rbx = cold.
        self.a.mov(rsi, r8)?;
        self.a.shr(rsi, 7)?;
        self.hot_cold(rsi, rbp, rbx)?;
        let mut top = self.a.create_label();
        self.a.set_label(&mut top)?;
        self.pick_record(rbp, rbx)?;
        let a = &mut self.a;
        a.mov(rdi, rdx)?;
        a.shl(rdi, 7)?;
        a.add(rdi, r9)?;
        for k in 0..4i32 {
            self.write_next(qword_ptr(rdi + 8 * k))?;
        }
        self.unit_end(top)
    }

    fn npb(&mut self, entry: &mut CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.set_label(entry)?;
        a.mov(rbx, r8)?;
        a.shr(rbx, 12)?;
        let mut top = a.create_label();
        let mut word = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rax, r15)?;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.shl(rdx, 12)?;
        a.lea(rdi, qword_ptr(r9 + rdx))?;
        a.lea(rsi, qword_ptr(r15 + 1))?;
        a.mov(ecx, 512)?;
        a.set_label(&mut word)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.add(rax, rsi)?;
        self.write(qword_ptr(rdi), rax)?;
        let a = &mut self.a;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(word)?;
        self.unit_end(top)
    }

    /// `web` (docs/GUESTS.md, `ha_workloads::web::request`): per request a session record of
    /// k = 1 + (t³ >> 14) scattered words at a Zipf-hot page, a 64-byte log append, and on
    /// odd requests a response in a buffer page: a fresh header block, then 0–63 blocks
    /// copied from the document root.
    fn web(&mut self, entry: &mut CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.set_label(entry)?;
        // rbx = Ph = P * 3 / 4; rbp = Pl = P / 8.
        a.mov(rax, r8)?;
        a.shr(rax, 12)?;
        a.mov(rbp, rax)?;
        a.shr(rbp, 3)?;
        a.lea(rax, qword_ptr(rax + rax * 2))?;
        a.shr(rax, 2)?;
        a.mov(rbx, rax)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        // 1. the session record: rdi = base + 4096 * page (Zipf-hot), rsi = k.
        self.next()?;
        let a = &mut self.a;
        a.shr(rax, 43)?;
        a.mov(rcx, rax)?;
        a.imul_2(rax, rax)?;
        a.shr(rax, 21)?;
        a.imul_2(rax, rcx)?;
        a.shr(rax, 21)?;
        a.imul_2(rax, rbx)?;
        a.shr(rax, 21)?;
        a.shl(rax, 12)?;
        a.lea(rdi, qword_ptr(r9 + rax))?;
        self.next()?;
        let a = &mut self.a;
        a.shr(rax, 58)?;
        a.mov(rcx, rax)?;
        a.imul_2(rax, rcx)?;
        a.imul_2(rax, rcx)?;
        a.shr(rax, 14)?;
        a.lea(rsi, qword_ptr(rax + 1))?;
        let mut record = a.create_label();
        a.set_label(&mut record)?;
        self.next()?;
        let a = &mut self.a;
        a.and(eax, 511)?;
        a.lea(rcx, qword_ptr(rdi + rax * 8))?;
        self.write_next(qword_ptr(rcx))?;
        let a = &mut self.a;
        a.dec(rsi)?;
        a.jnz(record)?;
        // 2. one log append.
        a.mov(rax, r15)?;
        a.shl(rax, 6)?;
        a.mov(rcx, rbp)?;
        a.shl(rcx, 12)?;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.mov(rdi, rbx)?;
        a.shl(rdi, 12)?;
        a.add(rdi, r9)?;
        a.add(rdi, rdx)?;
        for k in 0..8i32 {
            self.write_next(qword_ptr(rdi + 8 * k))?;
        }
        // 3. on odd requests, a response (ha_workloads::web::request): a fresh header
        // block, then `body` blocks copied from the document root.
        let a = &mut self.a;
        let mut skip = a.create_label();
        let mut word = a.create_label();
        a.test(r15d, 1)?;
        a.jz(skip)?;
        // rsi = buf = Pb - doc; rdi = base + 4096 (Ph + Pl + next() % buf).
        self.doc_pages(rcx)?;
        let a = &mut self.a;
        a.mov(rsi, r8)?;
        a.shr(rsi, 12)?;
        a.sub(rsi, rbx)?;
        a.sub(rsi, rbp)?;
        a.sub(rsi, rcx)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.div(rsi)?;
        a.add(rdx, rbx)?;
        a.add(rdx, rbp)?;
        a.shl(rdx, 12)?;
        a.lea(rdi, qword_ptr(r9 + rdx))?;
        // rsi = body = next() % 64 blocks.
        self.next()?;
        let a = &mut self.a;
        a.and(eax, 63)?;
        a.mov(esi, eax)?;
        // The header block.
        for k in 0..8i32 {
            self.write_next(qword_ptr(rdi + 8 * k))?;
        }
        self.a.add(rdi, 64)?;
        // rcx = src = base + 4096 (P - doc) + 64 (next() % (64 doc - 63)).
        self.doc_pages(rcx)?;
        let a = &mut self.a;
        a.shl(rcx, 6)?;
        a.sub(rcx, 63)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.div(rcx)?;
        a.shl(rdx, 6)?;
        self.doc_pages(rcx)?;
        let a = &mut self.a;
        a.shl(rcx, 12)?;
        a.neg(rcx)?;
        a.add(rcx, rdx)?;
        a.add(rcx, r9)?;
        a.mov(rax, r8)?;
        a.and(rax, -4096i32)?;
        a.add(rcx, rax)?;
        // The body: 8 body words copied, each through write().
        a.shl(esi, 3)?;
        a.jz(skip)?;
        a.set_label(&mut word)?;
        a.mov(rax, qword_ptr(rcx))?;
        self.write(qword_ptr(rdi), rax)?;
        let a = &mut self.a;
        a.add(rdi, 8)?;
        a.add(rcx, 8)?;
        a.dec(esi)?;
        a.jnz(word)?;
        a.set_label(&mut skip)?;
        self.unit_end(top)
    }
}

/// The `db` driver's requests.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Req {
    /// Memory to disk.
    Write,
    /// Disk to memory.
    Read,
    /// No data.
    Flush,
}

/// Code checking a read that completed (see [`Gen::disk_batch`]).
type ReadCheck = fn(&mut Gen, CodeLabel) -> Result<(), IcedError>;

/// How long a request's data buffer is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Len {
    /// One 4 KiB page.
    Page,
    /// `eax` bytes.
    Eax,
}

/// A guest address or register offset constant as the assembler's displacement.
fn disp(gpa: u64) -> i32 {
    // Every constant used this way is below the heap (1 MiB) or a register offset.
    i32::try_from(gpa).unwrap_or(i32::MAX)
}

impl Gen {
    /// `db`'s layout (`ha_workloads::db::Layout`): r8 = H (reloaded), rbx = T =
    /// min(P - 2, D / 2), rbp = L = D - T; clobbers rax.
    fn db_layout(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(r8, p(params::HEAP_SIZE))?;
        a.mov(rbx, r8)?;
        a.shr(rbx, 12)?;
        a.sub(rbx, 2)?;
        a.mov(rbp, p(params::DISK_SIZE))?;
        a.shr(rbp, 12)?;
        a.mov(rax, rbp)?;
        a.shr(rax, 1)?;
        a.cmp(rax, rbx)?;
        a.cmovb(rbx, rax)?;
        a.sub(rbp, rbx)?;
        Ok(())
    }

    /// At the very first start (`DISK_READY` 0): reset the device, negotiate VERSION_1 and
    /// FLUSH, set up the queue at `guest_abi::disk`'s addresses, DRIVER_OK, then
    /// `DISK_READY = 1`. Clobbers rdi.
    fn disk_setup(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut ready = a.create_label();
        a.cmp(s(status::DISK_READY), 0)?;
        a.jne(ready)?;
        a.mov(rdi, disk::MMIO_GPA)?;
        let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        let features_ok = ack | VIRTIO_CONFIG_S_FEATURES_OK;
        let regs: [(u32, u32); 17] = [
            (VIRTIO_MMIO_STATUS, 0),
            (VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (VIRTIO_MMIO_STATUS, ack),
            (VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0),
            (VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH),
            (VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
            (VIRTIO_MMIO_DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32)),
            (VIRTIO_MMIO_STATUS, features_ok),
            (VIRTIO_MMIO_QUEUE_SEL, 0),
            (VIRTIO_MMIO_QUEUE_NUM, u32::from(disk::QUEUE_SIZE)),
            (VIRTIO_MMIO_QUEUE_DESC_LOW, disk::DESC_GPA as u32),
            (VIRTIO_MMIO_QUEUE_DESC_HIGH, 0),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, disk::AVAIL_GPA as u32),
            (VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0),
            (VIRTIO_MMIO_QUEUE_USED_LOW, disk::USED_GPA as u32),
            (VIRTIO_MMIO_QUEUE_USED_HIGH, 0),
            (VIRTIO_MMIO_QUEUE_READY, 1),
        ];
        for (reg, v) in regs {
            a.mov(dword_ptr(rdi + disp(u64::from(reg))), v)?;
        }
        a.mov(
            dword_ptr(rdi + disp(u64::from(VIRTIO_MMIO_STATUS))),
            features_ok | VIRTIO_CONFIG_S_DRIVER_OK,
        )?;
        a.mov(s(status::DISK_READY), 1)?;
        a.set_label(&mut ready)?;
        a.nop()?;
        Ok(())
    }

    /// `rcx = step(rcx, v)`: the record's check word, as `checksum_step`; clobbers rdx.
    fn check_step(&mut self, acc: AsmRegister64, v: AsmRegister64) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.rol(acc, 5)?;
        a.xor(acc, v)?;
        a.mov(rdx, GOLDEN)?;
        a.imul_2(acc, rdx)?;
        Ok(())
    }

    /// Jump to `skip` unless a flush is due (`F > 0` and `(n + 1) % F == 0`); clobbers
    /// rax, rdx, rsi.
    fn unless_flush(&mut self, skip: CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rsi, p(params::OUTPUT_EVERY))?;
        a.test(rsi, rsi)?;
        a.jz(skip)?;
        a.lea(rax, qword_ptr(r15 + 1))?;
        a.xor(edx, edx)?;
        a.div(rsi)?;
        a.test(rdx, rdx)?;
        a.jnz(skip)?;
        Ok(())
    }

    /// Put request `k = rcx` of the batch in its slot: header (type, sector = rsi), a
    /// buffer at rdi of `len` bytes (not for a flush), the status byte pre-set to 0xFF,
    /// descriptors `3k, 3k+1, 3k+2` and the head in the available ring after the published
    /// index; then `rcx += 1`. Clobbers rax, rdx.
    fn disk_request(&mut self, req: Req, len: Len) -> Result<(), IcedError> {
        let kind = match req {
            Req::Write => VIRTIO_BLK_T_OUT,
            Req::Read => VIRTIO_BLK_T_IN,
            Req::Flush => VIRTIO_BLK_T_FLUSH,
        };
        let (desc, headers, st) = (
            disp(disk::DESC_GPA),
            disp(disk::HEADERS_GPA),
            disp(disk::STATUS_GPA),
        );
        let (next, write) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE);
        let a = &mut self.a;
        // rdx = 48 k: descriptor 3k's offset in the table.
        a.lea(rdx, qword_ptr(rcx + rcx * 2))?;
        a.shl(rdx, 4)?;
        // Descriptor 3k + 1: the data (its length first, while eax holds it).
        if req != Req::Flush {
            match len {
                Len::Page => a.mov(dword_ptr(rdx + desc + 24), disk::PAGE as u32)?,
                Len::Eax => a.mov(dword_ptr(rdx + desc + 24), eax)?,
            }
            let flags = if req == Req::Read { next | write } else { next };
            a.mov(qword_ptr(rdx + desc + 16), rdi)?;
            a.mov(word_ptr(rdx + desc + 28), flags)?;
            a.lea(eax, qword_ptr(rcx + rcx * 2 + 2))?;
            a.mov(word_ptr(rdx + desc + 30), ax)?;
        }
        // The header and the status byte of slot k.
        a.mov(rax, rcx)?;
        a.shl(rax, 4)?;
        a.mov(dword_ptr(rax + headers), kind)?;
        a.mov(dword_ptr(rax + headers + 4), 0)?;
        a.mov(qword_ptr(rax + headers + 8), rsi)?;
        a.mov(byte_ptr(rax + st), 0xFF)?;
        // Descriptor 3k: the header.
        a.add(rax, headers)?;
        a.mov(qword_ptr(rdx + desc), rax)?;
        a.mov(dword_ptr(rdx + desc + 8), 16)?;
        a.mov(word_ptr(rdx + desc + 12), next)?;
        let status_desc = if req == Req::Flush { 2 } else { 1 };
        a.lea(eax, qword_ptr(rcx + rcx * 2 + status_desc))?;
        a.mov(word_ptr(rdx + desc + 14), ax)?;
        // Descriptor 3k + 2: the status byte.
        a.mov(rax, rcx)?;
        a.shl(rax, 4)?;
        a.add(rax, st)?;
        a.mov(qword_ptr(rdx + desc + 32), rax)?;
        a.mov(dword_ptr(rdx + desc + 40), 1)?;
        a.mov(word_ptr(rdx + desc + 44), write)?;
        a.mov(word_ptr(rdx + desc + 46), 0)?;
        // The head into the available ring, after the published index.
        a.movzx(eax, word_ptr(disk::AVAIL_GPA + 2))?;
        a.add(eax, ecx)?;
        a.and(eax, u32::from(disk::QUEUE_SIZE) - 1)?;
        a.lea(edx, qword_ptr(rcx + rcx * 2))?;
        a.mov(word_ptr(rax * 2 + disp(disk::AVAIL_GPA + 4)), dx)?;
        a.inc(ecx)?;
        Ok(())
    }

    /// Submit the `rcx` requests put in their slots: publish the heads, ring the doorbell
    /// once (one `QueueNotify` exit), poll the used index until it is the published one
    /// (at most [`DISK_POLLS`] reads). Clobbers rax, rdx, rsi.
    fn disk_submit(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        let (mut poll, mut caught) = (a.create_label(), a.create_label());
        a.movzx(eax, word_ptr(disk::AVAIL_GPA + 2))?;
        a.add(eax, ecx)?;
        a.mov(word_ptr(disk::AVAIL_GPA + 2), ax)?;
        a.mov(rdx, disk::MMIO_GPA)?;
        a.mov(
            dword_ptr(rdx + disp(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY))),
            0,
        )?;
        a.mov(esi, DISK_POLLS)?;
        a.set_label(&mut poll)?;
        a.movzx(edx, word_ptr(disk::USED_GPA + 2))?;
        a.cmp(dx, ax)?;
        a.je(caught)?;
        a.pause()?;
        a.dec(esi)?;
        a.jnz(poll)?;
        a.set_label(&mut caught)?;
        a.nop()?;
        Ok(())
    }

    /// The batch of `rcx` requests put in their slots, if any: submitted
    /// ([`Gen::disk_submit`]), then its status bytes, last request first, into
    /// `DISK_ERRORS` (a request not completed OK counts one). A read that completed is
    /// handed to `read_check` with rdx = 16 k (its slot's offset), which may clobber rax,
    /// rdx, rdi and r8 but must keep rcx and rsi, and jumps to the label it gets for a bad
    /// read (one more error). Clobbers rax, rcx, rdx, rsi, plus what `read_check` does.
    fn disk_batch(&mut self, read_check: Option<ReadCheck>) -> Result<(), IcedError> {
        let mut end = self.a.create_label();
        self.a.test(ecx, ecx)?;
        self.a.jz(end)?;
        self.disk_submit()?;
        let a = &mut self.a;
        let (mut check, mut bad, mut counted) =
            (a.create_label(), a.create_label(), a.create_label());
        let mut status_ok = a.create_label();
        a.xor(esi, esi)?;
        a.set_label(&mut check)?;
        a.dec(ecx)?;
        a.js(counted)?;
        a.mov(rdx, rcx)?;
        a.shl(rdx, 4)?;
        a.cmp(byte_ptr(rdx + disp(disk::STATUS_GPA)), 0)?;
        a.je(status_ok)?;
        a.set_label(&mut bad)?;
        a.inc(rsi)?;
        a.jmp(check)?;
        a.set_label(&mut status_ok)?;
        if let Some(read_check) = read_check {
            a.cmp(dword_ptr(rdx + disp(disk::HEADERS_GPA)), VIRTIO_BLK_T_IN)?;
            a.jne(check)?;
            read_check(self, bad)?;
        }
        let a = &mut self.a;
        a.jmp(check)?;
        a.set_label(&mut counted)?;
        a.add(s(status::DISK_ERRORS), rsi)?;
        a.set_label(&mut end)?;
        a.nop()?;
        Ok(())
    }

    /// Whether the 64 records of the table page at rdi hold keys from r8 up with good
    /// check words, or are all zero (`db::table_page_ok`); jumps to `bad` if not. Clobbers
    /// rax, rdx, rdi, r8.
    fn table_page_check(&mut self, bad: CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut rec = a.create_label();
        let mut written = a.create_label();
        let mut next_rec = a.create_label();
        a.set_label(&mut rec)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.test(rax, rax)?;
        a.jnz(written)?;
        for k in 1..8i32 {
            a.or(rax, qword_ptr(rdi + 8 * k))?;
        }
        a.jnz(bad)?;
        a.jmp(next_rec)?;
        a.set_label(&mut written)?;
        a.cmp(qword_ptr(rdi + 8), r8)?;
        a.jne(bad)?;
        a.xor(eax, eax)?;
        for k in 0..7i32 {
            let a = &mut self.a;
            a.rol(rax, 5)?;
            a.xor(rax, qword_ptr(rdi + 8 * k))?;
            a.mov(rdx, GOLDEN)?;
            a.imul_2(rax, rdx)?;
        }
        let a = &mut self.a;
        a.cmp(rax, qword_ptr(rdi + 56))?;
        a.jne(bad)?;
        a.set_label(&mut next_rec)?;
        a.add(rdi, 64)?;
        a.inc(r8)?;
        a.test(r8b, 63)?;
        a.jnz(rec)?;
        Ok(())
    }

    /// `db` (docs/GUESTS.md, the `Workload::Db` arm of `ha_workloads::model`): one update
    /// into the table and the log buffer, then the unit's disk batch through the virtio-blk
    /// driver and the read-back's check.
    fn db(&mut self, entry: &mut CodeLabel) -> Result<(), IcedError> {
        self.a.set_label(entry)?;
        self.disk_setup()?;
        let mut top = self.a.create_label();
        self.a.set_label(&mut top)?;
        self.db_layout()?;
        // 1. The key: rsi = hot, rdi = cold for R = 64 T; rdx = i.
        self.a.mov(rcx, rbx)?;
        self.a.shl(rcx, 6)?;
        self.hot_cold(rcx, rsi, rdi)?;
        self.pick_record(rsi, rdi)?;
        let a = &mut self.a;
        // 2. The record u, i, next() x5, check at rdi = base + 64 i (rcx: the check word).
        a.mov(rdi, rdx)?;
        a.shl(rdi, 6)?;
        a.add(rdi, r9)?;
        a.xor(ecx, ecx)?;
        a.lea(rax, qword_ptr(r15 + 1))?;
        self.write(qword_ptr(rdi), rax)?;
        self.check_step(rcx, rax)?;
        let a = &mut self.a;
        a.mov(rax, rdi)?;
        a.sub(rax, r9)?;
        a.shr(rax, 6)?;
        self.write(qword_ptr(rdi + 8), rax)?;
        self.check_step(rcx, rax)?;
        for k in 2..7i32 {
            self.write_next(qword_ptr(rdi + 8 * k))?;
            self.check_step(rcx, rax)?;
        }
        self.write(qword_ptr(rdi + 56), rcx)?;
        // ... then into the log buffer at base + 4096 T + 64 (n % 64).
        let a = &mut self.a;
        a.mov(rsi, rbx)?;
        a.shl(rsi, 12)?;
        a.add(rsi, r9)?;
        a.mov(rax, r15)?;
        a.and(eax, 63)?;
        a.shl(eax, 6)?;
        a.add(rsi, rax)?;
        for k in 0..8i32 {
            self.a.mov(rax, qword_ptr(rdi + 8 * k))?;
            self.write(qword_ptr(rsi + 8 * k), rax)?;
        }

        // 3. The batch (rcx requests; rsi = sector, rdi = buffer of the next one).
        let a = &mut self.a;
        let (mut do_log, mut skip_log) = (a.create_label(), a.create_label());
        let (mut skip_wb, mut skip_rb) = (a.create_label(), a.create_label());
        let mut skip_flush = a.create_label();
        a.xor(ecx, ecx)?;
        // The log page: if u % 64 == 0 or a flush is due; disk page T + (n / 64) % L.
        a.lea(rax, qword_ptr(r15 + 1))?;
        a.test(al, 63)?;
        a.jz(do_log)?;
        self.unless_flush(skip_log)?;
        let a = &mut self.a;
        a.set_label(&mut do_log)?;
        a.mov(rax, r15)?;
        a.shr(rax, 6)?;
        a.xor(edx, edx)?;
        a.div(rbp)?;
        a.add(rdx, rbx)?;
        a.lea(rsi, qword_ptr(rdx * 8))?;
        a.mov(rdi, rbx)?;
        a.shl(rdi, 12)?;
        a.add(rdi, r9)?;
        self.disk_request(Req::Write, Len::Page)?;
        // The write-back: if u % 16 == 0, table page q = (n / 16) % T to disk page q.
        let a = &mut self.a;
        a.set_label(&mut skip_log)?;
        a.lea(rax, qword_ptr(r15 + 1))?;
        a.test(al, 15)?;
        a.jnz(skip_wb)?;
        a.mov(rax, r15)?;
        a.shr(rax, 4)?;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.lea(rsi, qword_ptr(rdx * 8))?;
        a.mov(rdi, rdx)?;
        a.shl(rdi, 12)?;
        a.add(rdi, r9)?;
        self.disk_request(Req::Write, Len::Page)?;
        // The read-back: if u % 32 == 0, disk page r = next() % T into the read buffer.
        let a = &mut self.a;
        a.set_label(&mut skip_wb)?;
        a.lea(rax, qword_ptr(r15 + 1))?;
        a.test(al, 31)?;
        a.jnz(skip_rb)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.lea(rsi, qword_ptr(rdx * 8))?;
        a.lea(rdi, qword_ptr(rbx + 1))?;
        a.shl(rdi, 12)?;
        a.add(rdi, r9)?;
        self.disk_request(Req::Read, Len::Page)?;
        // The flush.
        self.a.set_label(&mut skip_rb)?;
        self.unless_flush(skip_flush)?;
        self.a.xor(esi, esi)?;
        self.disk_request(Req::Flush, Len::Page)?;
        self.a.set_label(&mut skip_flush)?;
        // ... submitted, each read that completed checked as a table page of keys 64 r.
        self.disk_batch(Some(|g: &mut Self, bad| {
            let a = &mut g.a;
            a.mov(r8, qword_ptr(rdx + disp(disk::HEADERS_GPA) + 8))?;
            a.shl(r8, 3)?;
            a.lea(rdi, qword_ptr(rbx + 1))?;
            a.shl(rdi, 12)?;
            a.add(rdi, r9)?;
            g.table_page_check(bad)
        }))?;
        self.unit_end(top)
    }
}

impl Gen {
    /// `files`' layout (`ha_workloads::files::Layout`), once at the start: rbx = N files
    /// (as many as fit, each `file_pages` long, in the disk less its log), rbp = K cache
    /// slots, r8 = the address of slot 0. Clobbers rax, rcx, rdx, rsi, rdi.
    fn files_layout(&mut self) -> Result<(), IcedError> {
        use ha_workloads::files::MAX_FILES;
        let a = &mut self.a;
        let (mut count, mut counted, mut avail_ok) =
            (a.create_label(), a.create_label(), a.create_label());
        // rdi = room = D - L.
        self.files_log(rdi, rax)?;
        let a = &mut self.a;
        // rsi = doc_word's z for file 0 of `file_pages`; rcx = pages used; rbx = files.
        a.mov(rsi, p(params::SEED))?;
        a.mov(rax, FILE_PAGES_KEY ^ DOC_WORD_KEY)?;
        a.xor(rsi, rax)?;
        a.xor(ecx, ecx)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut count)?;
        a.cmp(rbx, MAX_FILES as i32)?;
        a.jae(counted)?;
        a.mov(rax, rsi)?;
        self.mix()?;
        let a = &mut self.a;
        a.and(eax, (ha_workloads::files::FILE_PAGES_MAX - 1) as u32)?;
        a.inc(eax)?;
        a.add(rax, rcx)?;
        a.cmp(rax, rdi)?;
        a.ja(counted)?;
        a.mov(rcx, rax)?;
        a.inc(rbx)?;
        a.mov(rdx, GOLDEN)?;
        a.add(rsi, rdx)?;
        a.jmp(count)?;
        a.set_label(&mut counted)?;
        // rcx = Tt = (N + 255) / 256; avail = P - Tt - 2; K = (avail - 1 - avail / 4096) / 16
        // (0 if negative: validate refused such a guest).
        a.lea(rcx, qword_ptr(rbx + 255))?;
        a.shr(rcx, 8)?;
        a.mov(rdx, r8)?;
        a.shr(rdx, 12)?;
        a.sub(rdx, rcx)?;
        a.sub(rdx, 2)?;
        a.mov(rax, rdx)?;
        a.shr(rax, 12)?;
        a.inc(rax)?;
        a.sub(rdx, rax)?;
        a.jae(avail_ok)?;
        a.xor(edx, edx)?;
        a.set_label(&mut avail_ok)?;
        a.shr(rdx, 4)?;
        a.mov(rbp, rdx)?;
        // r8 = base + 4096 (Tt + 2 + (K + 255) / 256).
        a.lea(rax, qword_ptr(rbp + 255))?;
        a.shr(rax, 8)?;
        a.lea(rax, qword_ptr(rax + rcx + 2))?;
        a.shl(rax, 12)?;
        a.lea(r8, qword_ptr(r9 + rax))?;
        Ok(())
    }

    /// The access log on the disk: `first` = its first page `D - L`, `len` = its pages
    /// `L = max(1, D / 8)`; clobbers only those.
    fn files_log(&mut self, first: AsmRegister64, len: AsmRegister64) -> Result<(), IcedError> {
        let a = &mut self.a;
        let mut log_ok = a.create_label();
        a.mov(first, p(params::DISK_SIZE))?;
        a.shr(first, 12)?;
        a.mov(len, first)?;
        a.shr(len, 3)?;
        a.jnz(log_ok)?;
        a.mov(len, 1u64)?;
        a.set_label(&mut log_ok)?;
        a.sub(first, len)?;
        Ok(())
    }

    /// `reg` = the response page's address, `base + 4096 Tt` (the log buffer follows it,
    /// then the cache tags); clobbers only `reg`.
    fn files_response(&mut self, reg: AsmRegister64) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.lea(reg, qword_ptr(rbx + 255))?;
        a.shr(reg, 8)?;
        a.shl(reg, 12)?;
        a.add(reg, r9)?;
        Ok(())
    }

    /// `dst` = word `off` (0: `start | pages << 48`, 8: version) of file r12's table
    /// entry; clobbers rax.
    fn files_entry(&mut self, dst: AsmRegister64, off: i32) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rax, r12)?;
        a.shl(rax, 4)?;
        a.mov(dst, qword_ptr(r9 + rax + off))?;
        Ok(())
    }

    /// File r12's cache slot: rdi = its address, rsi = its tag's; clobbers rax, rdx.
    fn files_slot(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rax, r12)?;
        a.xor(edx, edx)?;
        a.div(rbp)?;
        a.mov(rdi, rdx)?;
        a.shl(rdi, 16)?;
        a.add(rdi, r8)?;
        a.shl(rdx, 4)?;
        self.files_response(rsi)?;
        self.a
            .lea(rsi, qword_ptr(rsi + rdx + 2 * disk::PAGE as i32))?;
        Ok(())
    }

    /// rcx = the words of file r12 (`pages * 512`); clobbers rax.
    fn files_words(&mut self) -> Result<(), IcedError> {
        self.files_entry(rcx, 0)?;
        self.a.shr(rcx, 48)?;
        self.a.shl(rcx, 9)?;
        Ok(())
    }

    /// Request `rcx` of the batch: the whole of file r12 between the disk and its cache
    /// slot at rdi (one data descriptor of up to 64 KiB); clobbers rax, rdx, rsi.
    fn files_request(&mut self, req: Req) -> Result<(), IcedError> {
        self.files_entry(rax, 0)?;
        let a = &mut self.a;
        a.mov(rsi, rax)?;
        a.shl(rsi, 16)?;
        a.shr(rsi, 13)?;
        a.shr(rax, 48)?;
        a.shl(eax, 12)?;
        self.disk_request(req, Len::Eax)
    }

    /// File r12's tag: `write(tag, f + 1)`, `write(tag + 8, version)`; clobbers rax, rdx,
    /// rsi, rdi.
    fn files_tag(&mut self) -> Result<(), IcedError> {
        self.files_slot()?;
        self.a.lea(rax, qword_ptr(r12 + 1))?;
        self.write(qword_ptr(rsi), rax)?;
        self.files_entry(rax, 8)?;
        self.write(qword_ptr(rsi + 8), rax)
    }

    /// The content of version rax of file r12 (`files::content_word`), word by word over
    /// the rcx words at rdi (none if rcx is 0): compared (to `bad` at the first word that
    /// differs) or written (`write`). Clobbers rax, rcx, rdx, rsi, rdi.
    fn files_content(&mut self, compare: Option<CodeLabel>) -> Result<(), IcedError> {
        let a = &mut self.a;
        // rsi = doc_word's z for word 0 of the key seed + (f + 1) A + v B.
        a.mov(rdx, CONTENT_VERSION)?;
        a.imul_2(rax, rdx)?;
        a.mov(rsi, rax)?;
        a.add(rsi, p(params::SEED))?;
        a.lea(rax, qword_ptr(r12 + 1))?;
        a.mov(rdx, CONTENT_FILE)?;
        a.imul_2(rax, rdx)?;
        a.add(rsi, rax)?;
        a.mov(rax, DOC_WORD_KEY)?;
        a.xor(rsi, rax)?;
        let (mut word, mut done) = (a.create_label(), a.create_label());
        a.test(rcx, rcx)?;
        a.jz(done)?;
        a.set_label(&mut word)?;
        a.mov(rax, rsi)?;
        self.mix()?;
        match compare {
            Some(bad) => {
                self.a.cmp(qword_ptr(rdi), rax)?;
                self.a.jne(bad)?;
            }
            None => self.write(qword_ptr(rdi), rax)?,
        }
        let a = &mut self.a;
        a.mov(rdx, GOLDEN)?;
        a.add(rsi, rdx)?;
        a.add(rdi, 8)?;
        a.dec(rcx)?;
        a.jnz(word)?;
        a.set_label(&mut done)?;
        a.nop()?;
        Ok(())
    }

    /// `files` (docs/GUESTS.md, the `Workload::Files` arm of `ha_workloads::model`): one
    /// request for a file, read into its cache slot on a miss (one batch of one read) and
    /// checked, its hash into the response and the access log, then the unit's batch of
    /// writes (a full log page; every 256th request a file rewritten). r12 holds the file
    /// during a unit and is reloaded from `OUT_HEAD` before its end.
    fn files(&mut self, entry: &mut CodeLabel) -> Result<(), IcedError> {
        self.a.set_label(entry)?;
        self.disk_setup()?;
        self.files_layout()?;
        let mut top = self.a.create_label();
        self.a.set_label(&mut top)?;
        // 1. The file: r12 = f, picked as kv picks a record over the N files.
        self.hot_cold(rbx, rsi, rdi)?;
        self.pick_record(rsi, rdi)?;
        self.a.mov(r12, rdx)?;
        // 2. A hit if its slot's tag is (f + 1, version).
        let a = &mut self.a;
        let (mut miss, mut wrong, mut failed, mut serve) = (
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
        );
        self.files_slot()?;
        self.a.lea(rax, qword_ptr(r12 + 1))?;
        self.a.cmp(qword_ptr(rsi), rax)?;
        self.a.jne(miss)?;
        self.files_entry(rax, 8)?;
        self.a.cmp(qword_ptr(rsi + 8), rax)?;
        self.a.je(serve)?;
        // A miss: one batch of one read, the whole file into its slot (rdi) ...
        self.a.set_label(&mut miss)?;
        self.a.xor(ecx, ecx)?;
        self.files_request(Req::Read)?;
        self.disk_submit()?;
        self.a.cmp(byte_ptr(disk::STATUS_GPA), 0)?;
        self.a.jne(failed)?;
        // ... each word checked against its content (one error for a file read wrong) ...
        self.files_slot()?;
        self.files_words()?;
        self.files_entry(rax, 8)?;
        self.files_content(Some(wrong))?;
        let mut tag = self.a.create_label();
        self.a.jmp(tag)?;
        self.a.set_label(&mut wrong)?;
        self.a.add(s(status::DISK_ERRORS), 1)?;
        // ... and the tag written; a failed read is one error, and no tag.
        self.a.set_label(&mut tag)?;
        self.files_tag()?;
        self.a.jmp(serve)?;
        self.a.set_label(&mut failed)?;
        self.a.add(s(status::DISK_ERRORS), 1)?;

        // 3. The hash of the file's words in its slot (rsi), into the response (f,
        // version, hash, u) and the log buffer's record n % 64 (u, f, version, hash).
        self.a.set_label(&mut serve)?;
        self.files_slot()?;
        self.files_words()?;
        let a = &mut self.a;
        let (mut word, mut hashed) = (a.create_label(), a.create_label());
        a.xor(eax, eax)?;
        a.test(rcx, rcx)?;
        a.jz(hashed)?;
        a.set_label(&mut word)?;
        a.rol(rax, 5)?;
        a.xor(rax, qword_ptr(rdi))?;
        a.mov(rdx, GOLDEN)?;
        a.imul_2(rax, rdx)?;
        a.add(rdi, 8)?;
        a.dec(rcx)?;
        a.jnz(word)?;
        a.set_label(&mut hashed)?;
        a.mov(rsi, rax)?;
        self.files_response(rdi)?;
        self.files_entry(rcx, 8)?;
        self.write(qword_ptr(rdi), r12)?;
        self.write(qword_ptr(rdi + 8), rcx)?;
        self.write(qword_ptr(rdi + 16), rsi)?;
        self.a.lea(rax, qword_ptr(r15 + 1))?;
        self.write(qword_ptr(rdi + 24), rax)?;
        let a = &mut self.a;
        a.mov(eax, r15d)?;
        a.and(eax, 63)?;
        a.shl(eax, 6)?;
        a.lea(rdi, qword_ptr(rdi + rax + disk::PAGE as i32))?;
        a.lea(rax, qword_ptr(r15 + 1))?;
        self.write(qword_ptr(rdi), rax)?;
        self.write(qword_ptr(rdi + 8), r12)?;
        self.write(qword_ptr(rdi + 16), rcx)?;
        self.write(qword_ptr(rdi + 24), rsi)?;

        // 4. Every 256th request a rewrite: r12 = g = next() % N gets version v + 1, its
        // slot the new content and its tag.
        let a = &mut self.a;
        let (mut no_rewrite, mut skip_log, mut skip_rewrite) =
            (a.create_label(), a.create_label(), a.create_label());
        a.lea(rax, qword_ptr(r15 + 1))?;
        a.test(al, al)?;
        a.jnz(no_rewrite)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.mov(r12, rdx)?;
        a.shl(rdx, 4)?;
        a.lea(rdi, qword_ptr(r9 + rdx + 8))?;
        a.mov(rcx, qword_ptr(rdi))?;
        a.inc(rcx)?;
        self.write(qword_ptr(rdi), rcx)?;
        self.files_slot()?;
        self.files_words()?;
        self.files_entry(rax, 8)?;
        self.files_content(None)?;
        self.files_tag()?;
        self.a.set_label(&mut no_rewrite)?;
        // The batch of writes: the log buffer to log page D - L + (n / 64) % L when
        // u % 64 == 0, then the rewritten file from its slot.
        let a = &mut self.a;
        a.xor(ecx, ecx)?;
        a.lea(rax, qword_ptr(r15 + 1))?;
        a.test(al, 63)?;
        a.jnz(skip_log)?;
        self.files_log(rsi, rdi)?;
        let a = &mut self.a;
        a.mov(rax, r15)?;
        a.shr(rax, 6)?;
        a.xor(edx, edx)?;
        a.div(rdi)?;
        a.add(rsi, rdx)?;
        a.shl(rsi, 3)?;
        self.files_response(rdi)?;
        self.a.add(rdi, disk::PAGE as i32)?;
        self.disk_request(Req::Write, Len::Page)?;
        let a = &mut self.a;
        a.set_label(&mut skip_log)?;
        a.lea(rax, qword_ptr(r15 + 1))?;
        a.test(al, al)?;
        a.jnz(skip_rewrite)?;
        self.files_slot()?;
        self.files_request(Req::Write)?;
        self.a.set_label(&mut skip_rewrite)?;
        self.disk_batch(None)?;
        self.a.mov(r12, s(status::OUT_HEAD))?;
        self.unit_end(top)
    }
}

/// Assemble the guest program for [`CODE_GPA`]: start-up, then a dispatch on the params'
/// workload number into that workload's endless loop.
pub fn assemble() -> Result<Vec<u8>, GuestError> {
    let mut g = Gen {
        a: CodeAssembler::new(64)?,
    };
    let mut started = g.a.create_label();
    let mut no_pace = g.a.create_label();
    let mut panic = g.a.create_label();
    let mut entries: Vec<CodeLabel> = Workload::ALL.iter().map(|_| g.a.create_label()).collect();

    let a = &mut g.a;
    a.mov(r9, p(params::HEAP_GPA))?;
    a.mov(r8, p(params::HEAP_SIZE))?;
    a.mov(r15, s(status::PROGRESS))?;
    a.mov(r14, s(status::CHECKSUM))?;
    a.mov(r12, s(status::OUT_HEAD))?;
    a.mov(r13, s(status::RNG))?;
    a.mov(rax, r15)?;
    a.or(rax, r13)?;
    a.jnz(started)?;
    a.mov(r13, p(params::SEED))?;
    a.or(r13, 1)?;
    a.set_label(&mut started)?;
    // ticks = tsc_khz * 1000 / rate when both are non-zero.
    a.xor(r10d, r10d)?;
    a.mov(rcx, p(params::RATE))?;
    a.test(rcx, rcx)?;
    a.jz(no_pace)?;
    a.mov(rax, p(params::TSC_KHZ))?;
    a.test(rax, rax)?;
    a.jz(no_pace)?;
    a.imul_3(rax, rax, 1000)?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.mov(r10, rax)?;
    a.set_label(&mut no_pace)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r11, rax)?;
    a.mov(eax, dword_ptr(PARAMS_GPA + params::WORKLOAD as u64))?;
    for (w, label) in Workload::ALL.iter().zip(entries.iter()) {
        a.cmp(eax, *w as i32)?;
        a.je(*label)?;
    }
    a.set_label(&mut panic)?;
    a.mov(dx, PANIC_PORT as u32)?;
    a.mov(eax, PANIC_BAD_WORKLOAD)?;
    a.out(dx, eax)?;
    a.jmp(panic)?;

    for (w, label) in Workload::ALL.iter().zip(entries.iter_mut()) {
        match w {
            Workload::Idle => g.idle(label)?,
            Workload::Memwrite => g.memwrite(label)?,
            Workload::Web => g.web(label)?,
            Workload::Kv => g.kv(label)?,
            Workload::Npb => g.npb(label)?,
            Workload::Db => g.db(label)?,
            Workload::Files => g.files(label)?,
        }
    }
    let code = g.a.assemble(CODE_GPA)?;
    if code.len() > CODE_MAX {
        return Err(GuestError::TooBig(code.len()));
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_and_uses_absolute_addresses() {
        let code = assemble().expect("assemble");
        assert!(code.len() < CODE_MAX);
        // The first instruction is `mov r9, [0x1018]` with an absolute (SIB, no base)
        // address, not a RIP-relative one.
        let addr = (PARAMS_GPA + params::HEAP_GPA as u64) as u32;
        let mut want = vec![0x4C, 0x8B, 0x0C, 0x25];
        want.extend_from_slice(&addr.to_le_bytes());
        assert_eq!(&code[..8], &want[..]);
    }

    #[test]
    fn validate_rejects_bad_specs() {
        let p = GuestParams {
            workload: Workload::Web,
            seed: 1,
            heap_gpa: HEAP_GPA,
            heap_size: 16 * 4096,
            rate: 0,
            tsc_khz: 0,
            output_every: 0,
            doorbell_every: 0,
            disk_size: 0,
        };
        assert!(validate(4 << 20, &p).is_ok());
        assert!(validate(3 << 20, &p).is_err());
        assert!(
            validate(
                2 << 20,
                &GuestParams {
                    heap_size: 2 << 20,
                    ..p.clone()
                }
            )
            .is_err()
        );
        assert!(
            validate(
                4 << 20,
                &GuestParams {
                    heap_size: 15 * 4096,
                    ..p.clone()
                }
            )
            .is_err()
        );
        // `files` needs a disk with room for a file and a heap with room for a slot.
        let files = GuestParams {
            workload: Workload::Files,
            heap_size: 64 * 4096,
            disk_size: 64 * 4096,
            ..p
        };
        assert!(validate(4 << 20, &files).is_ok());
        let no_disk = GuestParams {
            disk_size: 0,
            ..files.clone()
        };
        assert!(validate(4 << 20, &no_disk).is_err());
        let no_slot = GuestParams {
            heap_size: 16 * 4096,
            ..files
        };
        assert!(validate(4 << 20, &no_slot).is_err());
    }
}
