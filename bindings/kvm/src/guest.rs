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
//! | r12 | `out_head` |
//! | r11 | `last` rdtsc value (pacing) |
//! | r10 | TSC ticks per unit (0: no pacing) |
//! | r9, r8 | heap base, heap size `H` |
//! | rbx, rbp | per-workload constants (kv: cold span, hot; npb: `P`; web: `Ph`, `Pl`) |
//! | rax, rcx, rdx, rsi, rdi | scratch |
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
    if p.workload.needs_disk() && ha_workloads::db::Layout::of(p).is_none() {
        return bad(format!(
            "workload {} needs a disk and room for its table (heap {} bytes, disk {} bytes)",
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

    fn kv(&mut self, entry: &mut CodeLabel) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.set_label(entry)?;
        let mut hot_ok = a.create_label();
        let mut cold_ok = a.create_label();
        // R = H / 128; rbp = hot = max(1, R / 10); rbx = max(1, R - hot).
        a.mov(rax, r8)?;
        a.shr(rax, 7)?;
        a.mov(rsi, rax)?;
        a.xor(edx, edx)?;
        a.mov(ecx, 10)?;
        a.div(rcx)?;
        a.mov(rbp, rax)?;
        a.test(rbp, rbp)?;
        a.jnz(hot_ok)?;
        a.mov(ebp, 1)?;
        a.set_label(&mut hot_ok)?;
        a.mov(rbx, rsi)?;
        a.sub(rbx, rbp)?;
        a.test(rbx, rbx)?;
        a.jnz(cold_ok)?;
        a.mov(ebx, 1)?;
        a.set_label(&mut cold_ok)?;
        a.nop()?;

        let mut top = a.create_label();
        let mut cold = a.create_label();
        let mut have = a.create_label();
        a.set_label(&mut top)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.mov(ecx, 100)?;
        a.div(rcx)?;
        a.cmp(rdx, 80)?;
        a.jae(cold)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.div(rbp)?;
        a.jmp(have)?;
        a.set_label(&mut cold)?;
        self.next()?;
        let a = &mut self.a;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.add(rdx, rbp)?;
        a.set_label(&mut have)?;
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

/// Assemble the guest program for [`CODE_GPA`]: start-up, then a dispatch on the params'
/// workload number into that workload's endless loop.
pub fn assemble() -> Result<Vec<u8>, GuestError> {
    let mut g = Gen {
        a: CodeAssembler::new(64)?,
    };
    let mut started = g.a.create_label();
    let mut no_pace = g.a.create_label();
    let mut panic = g.a.create_label();
    let mut entries: Vec<CodeLabel> = (0..5).map(|_| g.a.create_label()).collect();

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
    // The disk workloads have no entry yet (issue 15): they fall through to the panic.
    for (w, label) in Workload::MEMORY.iter().zip(entries.iter()) {
        a.cmp(eax, *w as i32)?;
        a.je(*label)?;
    }
    a.set_label(&mut panic)?;
    a.mov(dx, PANIC_PORT as u32)?;
    a.mov(eax, PANIC_BAD_WORKLOAD)?;
    a.out(dx, eax)?;
    a.jmp(panic)?;

    for (w, label) in Workload::MEMORY.iter().zip(entries.iter_mut()) {
        match w {
            Workload::Idle => g.idle(label)?,
            Workload::Memwrite => g.memwrite(label)?,
            Workload::Web => g.web(label)?,
            Workload::Kv => g.kv(label)?,
            Workload::Npb => g.npb(label)?,
            Workload::Db => {}
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
                    ..p
                }
            )
            .is_err()
        );
    }
}
