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
    disk, status,
};
use crate::{db, files};
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

/// Whether a guest's heap and disk can hold its workload's layout on the disk (always
/// for the workloads without a disk).
pub fn disk_layout_fits(p: &GuestParams) -> bool {
    match p.workload {
        Workload::Db => db::Layout::of(p).is_some(),
        Workload::Files => files::Layout::of(p).is_some(),
        Workload::Idle | Workload::Memwrite | Workload::Web | Workload::Kv | Workload::Npb => true,
    }
}

/// What a disk request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    /// Disk to memory.
    Read,
    /// Memory to disk.
    Write,
    /// Make the writes before it durable.
    Flush,
}

/// One request of a batch the guest's disk driver submits: `len` bytes between guest
/// memory at `gpa` and the disk at `sector` (512-byte units); a flush has neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRequest {
    /// What it does.
    pub op: DiskOp,
    /// First sector on the disk.
    pub sector: u64,
    /// Guest-physical address of the buffer.
    pub gpa: u64,
    /// Bytes (a multiple of 512; 0 for a flush).
    pub len: u64,
}

/// What a workload unit reaches beyond its memory: the output ring's doorbell and the
/// disk. On KVM these are the port write and the virtio-blk device's doorbell; in the
/// model and the sim, calls.
pub trait Ports<M> {
    /// The error a port can fail with (the unit stops with it).
    type Error: std::error::Error + 'static;

    /// Drain the output ring (the memory is flushed first).
    fn doorbell(&mut self, mem: &mut M) -> Result<(), Self::Error>;

    /// Carry out `batch` in order, reads landing in `mem` before it returns; set `ok[i]`
    /// to whether request `i` succeeded (a failed request is the guest's I/O error, not
    /// the port's).
    fn disk(
        &mut self,
        mem: &mut M,
        batch: &[DiskRequest],
        ok: &mut [bool],
    ) -> Result<(), Self::Error>;
}

/// Why a unit stopped.
#[derive(Debug, thiserror::Error)]
pub enum UnitError<E: std::error::Error + 'static> {
    /// The doorbell (the VMM's drain of the output ring) failed.
    #[error("doorbell")]
    Doorbell(#[source] E),
    /// The disk port failed.
    #[error("disk")]
    Disk(#[source] E),
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
    disk_size: u64,
    seed: u64,
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
            disk_size: params.disk_size,
            seed: params.seed,
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

    /// Run one work unit (steps 1–3 of GUESTS.md; pacing is the caller's) over `mem`,
    /// reaching the doorbell and the disk through `ports`.
    pub fn unit<M: Memory, P: Ports<M>>(
        &mut self,
        mem: &mut M,
        ports: &mut P,
    ) -> Result<(), UnitError<P::Error>> {
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
            Workload::Db => self.db_update(mem, ports, n)?,
            Workload::Files => self.files_request(mem, ports, n)?,
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
                ports.doorbell(mem).map_err(UnitError::Doorbell)?;
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
                ports.doorbell(mem).map_err(UnitError::Doorbell)?;
            }
        }
        mem.flush();
        Ok(())
    }

    /// One `db` update `n` (docs/GUESTS.md, "`db`"): the record into the table and the log
    /// buffer, then the unit's disk batch (log page, write-back, read-back, flush) and the
    /// read-back's check.
    fn db_update<M: Memory, P: Ports<M>>(
        &mut self,
        mem: &mut M,
        ports: &mut P,
        n: u64,
    ) -> Result<(), UnitError<P::Error>> {
        let Some(l) = db::Layout::new(self.heap, self.disk_size) else {
            // Never started: the backends refuse such a guest.
            return Ok(());
        };
        let u = n.wrapping_add(1);
        let records = l.records();
        let hot = (records / 10).max(1);
        let i = if self.next() % 100 < 80 {
            self.next() % hot
        } else {
            hot + self.next() % records.saturating_sub(hot).max(1)
        };
        let mut rec = [u, i, 0, 0, 0, 0, 0, 0];
        for w in &mut rec[2..7] {
            *w = self.next();
        }
        rec[7] = db::check_word(&rec);
        let page = |p: u64| self.base + disk::PAGE * p;
        let (table, logbuf, readbuf) = (page(0), page(l.log_buffer()), page(l.read_buffer()));
        for (k, &w) in (0..).zip(&rec) {
            self.write(mem, table + 64 * i + 8 * k, w);
        }
        for (k, &w) in (0..).zip(&rec) {
            self.write(mem, logbuf + 64 * (n % db::RECORDS_PER_PAGE) + 8 * k, w);
        }

        let flush = self.output_every > 0 && u.is_multiple_of(self.output_every);
        let sectors = disk::PAGE / disk::SECTOR;
        let req = |op, disk_page: u64, gpa| DiskRequest {
            op,
            sector: disk_page * sectors,
            gpa,
            len: disk::PAGE,
        };
        let mut batch = Vec::with_capacity(disk::MAX_BATCH as usize);
        if u.is_multiple_of(db::RECORDS_PER_PAGE) || flush {
            batch.push(req(DiskOp::Write, l.log_page(u), logbuf));
        }
        if u.is_multiple_of(db::WRITEBACK_EVERY) {
            let q = (n / db::WRITEBACK_EVERY) % l.table;
            batch.push(req(DiskOp::Write, q, table + disk::PAGE * q));
        }
        let read = u
            .is_multiple_of(db::READBACK_EVERY)
            .then(|| self.next() % l.table);
        if let Some(r) = read {
            batch.push(req(DiskOp::Read, r, readbuf));
        }
        if flush {
            batch.push(DiskRequest {
                op: DiskOp::Flush,
                sector: 0,
                gpa: 0,
                len: 0,
            });
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut ok = [false; disk::MAX_BATCH as usize];
        let ok = &mut ok[..batch.len()];
        mem.flush();
        ports.disk(mem, &batch, ok).map_err(UnitError::Disk)?;
        let mut errors = ok.iter().filter(|&&o| !o).count() as u64;
        if let Some(r) = read
            && batch
                .iter()
                .zip(ok.iter())
                .any(|(q, &o)| q.op == DiskOp::Read && o)
        {
            let words: Vec<u64> = (0..disk::PAGE / 8)
                .map(|k| mem.load(readbuf + 8 * k))
                .collect();
            if !db::table_page_ok(r, &words) {
                errors += 1;
            }
        }
        if errors > 0 {
            let at = STATUS_GPA + status::DISK_ERRORS as u64;
            let e = mem.load(at).wrapping_add(errors);
            mem.store(at, e);
        }
        Ok(())
    }
}

impl Vcpu {
    /// One `files` request `n` (docs/GUESTS.md, "`files`"): pick a file, read it into its
    /// cache slot on a miss (and check it), hash it into the response and the access log,
    /// then the unit's disk batch (a full log page, a file rewritten every 256 requests).
    fn files_request<M: Memory, P: Ports<M>>(
        &mut self,
        mem: &mut M,
        ports: &mut P,
        n: u64,
    ) -> Result<(), UnitError<P::Error>> {
        let Some(l) = files::Layout::new(self.seed, self.heap, self.disk_size) else {
            return Ok(());
        };
        let u = n.wrapping_add(1);
        let base = self.base;
        let page = |p: u64| base + disk::PAGE * p;
        let (table, resp, logbuf, tags) = (
            page(0),
            page(l.response()),
            page(l.log_buffer()),
            page(l.tags_first()),
        );
        let sectors = disk::PAGE / disk::SECTOR;
        let mut errors = 0u64;
        let hot = (l.files / 10).max(1);
        let f = if self.next() % 100 < 80 {
            self.next() % hot
        } else {
            hot + self.next() % l.files.saturating_sub(hot).max(1)
        };
        let (start, pages) = files::entry(mem.load(table + files::ENTRY_BYTES * f));
        let v = mem.load(table + files::ENTRY_BYTES * f + 8);
        let slot = f % l.slots;
        let (tag, cache) = (tags + 16 * slot, page(l.slot_first(slot)));
        let words = pages * disk::PAGE / 8;
        if mem.load(tag) != f + 1 || mem.load(tag + 8) != v {
            let read = [DiskRequest {
                op: DiskOp::Read,
                sector: start * sectors,
                gpa: cache,
                len: pages * disk::PAGE,
            }];
            let mut ok = [false];
            mem.flush();
            ports.disk(mem, &read, &mut ok).map_err(UnitError::Disk)?;
            if ok[0] {
                if (0..words)
                    .any(|j| mem.load(cache + 8 * j) != files::content_word(self.seed, f, v, j))
                {
                    errors += 1;
                }
                self.write(mem, tag, f + 1);
                self.write(mem, tag + 8, v);
            } else {
                errors += 1;
            }
        }
        let hash = (0..words).fold(0, |h, j| checksum_step(h, mem.load(cache + 8 * j)));
        for (k, w) in (0..).zip([f, v, hash, u]) {
            self.write(mem, resp + 8 * k, w);
        }
        let rec = logbuf + 64 * (n % files::LOG_RECORDS_PER_PAGE);
        for (k, w) in (0..).zip([u, f, v, hash]) {
            self.write(mem, rec + 8 * k, w);
        }

        let mut batch = Vec::with_capacity(2);
        if u.is_multiple_of(files::LOG_RECORDS_PER_PAGE) {
            let lp = l.log_first + (n / files::LOG_RECORDS_PER_PAGE) % l.log;
            batch.push(DiskRequest {
                op: DiskOp::Write,
                sector: lp * sectors,
                gpa: logbuf,
                len: disk::PAGE,
            });
        }
        if u.is_multiple_of(files::REWRITE_EVERY) {
            let g = self.next() % l.files;
            let (gstart, gpages) = files::entry(mem.load(table + files::ENTRY_BYTES * g));
            let gv = mem.load(table + files::ENTRY_BYTES * g + 8).wrapping_add(1);
            self.write(mem, table + files::ENTRY_BYTES * g + 8, gv);
            let gslot = g % l.slots;
            let (gtag, gcache) = (tags + 16 * gslot, page(l.slot_first(gslot)));
            for j in 0..gpages * disk::PAGE / 8 {
                self.write(
                    mem,
                    gcache + 8 * j,
                    files::content_word(self.seed, g, gv, j),
                );
            }
            self.write(mem, gtag, g + 1);
            self.write(mem, gtag + 8, gv);
            batch.push(DiskRequest {
                op: DiskOp::Write,
                sector: gstart * sectors,
                gpa: gcache,
                len: gpages * disk::PAGE,
            });
        }
        if !batch.is_empty() {
            let mut ok = [false; 2];
            let ok = &mut ok[..batch.len()];
            mem.flush();
            ports.disk(mem, &batch, ok).map_err(UnitError::Disk)?;
            errors += ok.iter().filter(|&&o| !o).count() as u64;
        }
        if errors > 0 {
            let at = STATUS_GPA + status::DISK_ERRORS as u64;
            let e = mem.load(at).wrapping_add(errors);
            mem.store(at, e);
        }
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
    /// The guest's disk (`params.disk_size` bytes; empty without one).
    pub disk: Vec<u8>,
    /// Disk pages (4 KiB) written since the last [`ImageModel::take_disk_written`].
    disk_written: BTreeSet<u64>,
}

/// The model's ports: the doorbell drains the ring into `drained`, the disk is `disk`
/// (the pages written noted in `written`).
struct ModelPorts<'a> {
    drained: &'a mut Vec<OutputRecord>,
    disk: &'a mut [u8],
    written: &'a mut BTreeSet<u64>,
}

impl Ports<Image> for ModelPorts<'_> {
    type Error = std::convert::Infallible;

    fn doorbell(&mut self, mem: &mut Image) -> Result<(), Self::Error> {
        self.drained.extend(drain(mem));
        Ok(())
    }

    fn disk(
        &mut self,
        mem: &mut Image,
        batch: &[DiskRequest],
        ok: &mut [bool],
    ) -> Result<(), Self::Error> {
        for (r, ok) in batch.iter().zip(ok.iter_mut()) {
            *ok = disk_io(mem, self.disk, r);
            if *ok && r.op == DiskOp::Write {
                let first = r.sector * disk::SECTOR / disk::PAGE;
                let end = (r.sector * disk::SECTOR + r.len).div_ceil(disk::PAGE);
                self.written.extend(first..end);
            }
        }
        Ok(())
    }
}

/// Carry out one request between `mem` and `disk` as a device does; false for a request
/// outside either (the guest's I/O error).
pub fn disk_io(mem: &mut Image, disk: &mut [u8], r: &DiskRequest) -> bool {
    let Ok(len) = usize::try_from(r.len) else {
        return false;
    };
    let (Some(at), Ok(gpa)) = (
        r.sector
            .checked_mul(disk::SECTOR)
            .and_then(|b| usize::try_from(b).ok()),
        usize::try_from(r.gpa),
    ) else {
        return false;
    };
    let (Some(d), Some(m)) = (
        at.checked_add(len).filter(|&e| e <= disk.len()),
        gpa.checked_add(len).filter(|&e| e <= mem.bytes.len()),
    ) else {
        return r.op == DiskOp::Flush;
    };
    match r.op {
        DiskOp::Flush => {}
        DiskOp::Write => disk[at..d].copy_from_slice(&mem.bytes[gpa..m]),
        DiskOp::Read => {
            let data = disk[at..d].to_vec();
            mem.write_bytes(r.gpa, &data);
        }
    }
    true
}

impl ImageModel {
    /// A new guest of `memory_size` bytes running `params`: zero memory with the params
    /// page and (for `web`) the document root or (for `files`) the file table written, as
    /// a VMM writes them, on a zero disk or (for `files`) one holding the document tree.
    pub fn fresh(memory_size: u64, params: &GuestParams) -> Self {
        let size = usize::try_from(memory_size).unwrap_or(usize::MAX);
        let mut mem = Image::new(vec![0u8; size]);
        let mut page = vec![0u8; PAGE_SIZE];
        params.write_page(&mut page);
        mem.write_bytes(PARAMS_GPA, &page);
        if let Some((gpa, bytes)) = crate::web::docroot(params) {
            mem.write_bytes(gpa, &bytes);
        }
        if let Some((gpa, bytes)) = files::file_table(params) {
            mem.write_bytes(gpa, &bytes);
        }
        let mut disk = vec![0u8; usize::try_from(params.disk_size).unwrap_or(0)];
        if params.workload == Workload::Files {
            let _ = files::format_disk(params.seed, params.heap_size, params.disk_size, |at, b| {
                let at = usize::try_from(at).map_err(|_| ())?;
                disk.get_mut(at..at + b.len()).ok_or(())?.copy_from_slice(b);
                Ok::<(), ()>(())
            });
        }
        let cpu = Vcpu::load(params, &mem);
        Self {
            mem,
            cpu,
            params: params.clone(),
            drained: Vec::new(),
            disk,
            disk_written: BTreeSet::new(),
        }
    }

    /// A guest continuing from a memory image (None: its params page is not a guest's),
    /// on a zero disk; see [`ImageModel::with_disk`].
    pub fn from_image(bytes: Vec<u8>) -> Option<Self> {
        let params = GuestParams::read_page(bytes.get(PARAMS_GPA as usize..)?.get(..PAGE_SIZE)?)?;
        let mem = Image::new(bytes);
        let cpu = Vcpu::load(&params, &mem);
        let disk = vec![0u8; usize::try_from(params.disk_size).unwrap_or(0)];
        Some(Self {
            mem,
            cpu,
            params,
            drained: Vec::new(),
            disk,
            disk_written: BTreeSet::new(),
        })
    }

    /// The same guest on `disk` (the disk of the instant its memory is from).
    pub fn with_disk(mut self, disk: Vec<u8>) -> Self {
        self.disk = disk;
        self
    }

    /// One unit; doorbells drain into [`ImageModel::drained`], disk requests go to
    /// [`ImageModel::disk`].
    pub fn unit(&mut self) {
        let mut ports = ModelPorts {
            drained: &mut self.drained,
            disk: &mut self.disk,
            written: &mut self.disk_written,
        };
        let res = self.cpu.unit(&mut self.mem, &mut ports);
        debug_assert!(res.is_ok(), "a model's ports never fail");
    }

    /// Run units until progress reaches `progress`.
    pub fn run_to(&mut self, progress: u64) {
        while self.cpu.progress() < progress {
            self.unit();
        }
    }

    /// The disk pages (4 KiB) the guest wrote since the last call.
    pub fn take_disk_written(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.disk_written)
    }

    /// Run the model on from its progress `c` until its disk equals `disk`, at most to
    /// progress `limit`; the progress at which they were equal. `disk` is meant to be a
    /// replica taken over at checkpoint `c` and written by the guest resumed from it,
    /// which runs the model's units (stopped anywhere, its disk is the model's after some
    /// whole unit: a unit's disk batch completes in one exit). Unit by unit, only the
    /// pages that differ and the pages each unit writes are compared.
    pub fn run_until_disk_equals(&mut self, disk: &[u8], limit: u64) -> Result<u64, DiskDiverged> {
        if disk.len() != self.disk.len() {
            return Err(DiskDiverged::Size {
                disk: disk.len() as u64,
                model: self.disk.len() as u64,
            });
        }
        fn page(d: &[u8], p: u64) -> Option<&[u8]> {
            let at = usize::try_from(p * disk::PAGE).ok()?;
            d.get(at..).map(|b| &b[..b.len().min(disk::PAGE as usize)])
        }
        let mut differ: BTreeSet<u64> = (0..(disk.len() as u64).div_ceil(disk::PAGE))
            .filter(|&p| page(disk, p) != page(&self.disk, p))
            .collect();
        let from = self.cpu.progress();
        self.disk_written.clear();
        // The closest the disks came, for the error: (pages, progress, the first pages).
        let mut closest = (u64::MAX, from, Vec::new());
        while !differ.is_empty() {
            if (differ.len() as u64) < closest.0 {
                closest = (
                    differ.len() as u64,
                    self.cpu.progress(),
                    differ.iter().take(8).copied().collect(),
                );
            }
            if self.cpu.progress() >= limit {
                return Err(DiskDiverged::Pages {
                    from,
                    limit,
                    fewest: closest.0,
                    at: closest.1,
                    pages: closest.2,
                });
            }
            self.unit();
            for p in self.take_disk_written() {
                if page(disk, p) == page(&self.disk, p) {
                    differ.remove(&p);
                } else {
                    differ.insert(p);
                }
            }
        }
        Ok(self.cpu.progress())
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

/// Why a disk is not the model's disk at any progress of a run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskDiverged {
    /// The two disks differ in size.
    #[error("the disk has {disk} bytes, the model's {model}")]
    Size {
        /// The disk's size.
        disk: u64,
        /// The model's.
        model: u64,
    },
    /// Pages differed at every progress up to the limit.
    #[error(
        "the disk is not the model's at any progress from {from} to {limit}: \
         at best {fewest} pages differ (at progress {at}: disk pages {pages:?}…)"
    )]
    Pages {
        /// Progress the run started from.
        from: u64,
        /// Progress it gave up at.
        limit: u64,
        /// The fewest pages that differed at any progress.
        fewest: u64,
        /// The progress where they were fewest.
        at: u64,
        /// The first of them there (up to 8).
        pages: Vec<u64>,
    },
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
            disk_size: 0,
        }
    }

    fn db_params() -> GuestParams {
        GuestParams {
            output_every: 48,
            disk_size: 24 * PAGE,
            ..params(Workload::Db)
        }
    }

    #[test]
    fn db_logs_writes_back_and_continues_from_memory_and_disk() {
        let mut a = ImageModel::fresh(4 << 20, &db_params());
        let l = db::Layout::of(&a.params).unwrap();
        assert_eq!((l.table, l.log), (12, 12));
        a.run_to(1000);
        // Continue from copies of memory and disk: the same as running on.
        let mut b = ImageModel::from_image(a.mem.bytes.clone())
            .unwrap()
            .with_disk(a.disk.clone());
        a.run_to(3000);
        b.run_to(3000);
        assert_eq!(a.mem.bytes, b.mem.bytes);
        assert_eq!(a.disk, b.disk);
        let errors = STATUS_GPA + status::DISK_ERRORS as u64;
        assert_eq!(a.mem.load(errors), 0, "read-backs all check");
        // Every update committed by the last flush is in the log, whole.
        let committed = 3000 - 3000 % 48;
        let window = db::log_window(&l, committed);
        assert_eq!(window.clone().count(), 11 * 64 + 32);
        for seq in window {
            let r = db::log_record(&l, &a.disk, seq).unwrap();
            assert_eq!(r[0], seq);
            assert_eq!(r[7], db::check_word(&r), "update {seq}");
            assert!(r[1] < l.records());
        }
        // Written-back table pages hold records that check.
        let page = |p: u64| -> Vec<u64> {
            a.disk[(p * PAGE) as usize..((p + 1) * PAGE) as usize]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert!((0..l.table).all(|p| db::table_page_ok(p, &page(p))));
        assert!(page(0).iter().any(|&w| w != 0), "table page 0 written back");
    }

    fn files_params() -> GuestParams {
        GuestParams {
            output_every: 16,
            disk_size: 256 * PAGE,
            heap_size: 200 * PAGE,
            ..params(Workload::Files)
        }
    }

    #[test]
    fn files_serves_rewrites_and_continues_from_memory_and_disk() {
        let p = files_params();
        let mut a = ImageModel::fresh(4 << 20, &p);
        let l = files::Layout::of(&p).unwrap();
        assert!(
            l.slots < l.files,
            "the cache is smaller than the tree: {l:?}"
        );
        a.run_to(700);
        let mut b = ImageModel::from_image(a.mem.bytes.clone())
            .unwrap()
            .with_disk(a.disk.clone());
        a.run_to(2000);
        b.run_to(2000);
        assert_eq!(a.mem.bytes, b.mem.bytes);
        assert_eq!(a.disk, b.disk);
        assert_eq!(a.mem.load(STATUS_GPA + status::DISK_ERRORS as u64), 0);
        // Seven rewrites: the files rewritten carry their new version on the disk.
        let table = a.params.heap_gpa;
        let mut rewritten = 0;
        for f in 0..l.files {
            let v = a.mem.load(table + 16 * f + 8);
            let (start, pages) = files::entry(a.mem.load(table + 16 * f));
            let at = (start * PAGE) as usize;
            let bytes = &a.disk[at..at + (pages * PAGE) as usize];
            assert!(
                bytes == files::file_bytes(p.seed, f, v, pages),
                "file {f} v{v}"
            );
            rewritten += v;
        }
        assert_eq!(rewritten, 2000 / files::REWRITE_EVERY);
        // The access log's pages are on the disk.
        let log = (l.log_first * PAGE) as usize;
        assert!(a.disk[log..log + 8] == 1u64.to_le_bytes());
    }

    /// A replica taken over at progress 700 and written by the guest resumed there up to
    /// 1280 (a unit that writes, in both workloads) is found equal to the model's disk at
    /// 1280; one with a page the resumed guest wrote changed is equal at no progress.
    #[test]
    fn a_resumed_guests_disk_is_found_at_the_progress_it_reached() {
        for p in [db_params(), files_params()] {
            let mut at_commit = ImageModel::fresh(4 << 20, &p);
            at_commit.run_to(700);
            let mut resumed = at_commit.clone();
            resumed.take_disk_written();
            resumed.run_to(1280);
            let name = p.workload.name();
            let mut m = at_commit.clone();
            assert_eq!(
                m.run_until_disk_equals(&resumed.disk, 5000),
                Ok(1280),
                "{name}"
            );
            // A page the resumed guest wrote, changed: it stays different to the limit.
            let last = *resumed.take_disk_written().last().unwrap();
            let mut torn = resumed.disk.clone();
            torn[(last * PAGE) as usize] ^= 1;
            let mut m = at_commit.clone();
            let e = m.run_until_disk_equals(&torn, 3000);
            assert!(
                matches!(
                    e,
                    Err(DiskDiverged::Pages {
                        from: 700,
                        limit: 3000,
                        ..
                    })
                ),
                "{name}: {e:?}"
            );
            // The committed state itself is found at once; a shorter disk never.
            let mut m = at_commit.clone();
            assert_eq!(m.run_until_disk_equals(&at_commit.disk, 700), Ok(700));
            let e = at_commit.run_until_disk_equals(&resumed.disk[4096..], 5000);
            assert!(matches!(e, Err(DiskDiverged::Size { .. })), "{name}");
        }
    }

    #[test]
    fn files_counts_a_wrong_file_read() {
        let p = files_params();
        let mut a = ImageModel::fresh(4 << 20, &p);
        a.disk[..(PAGE * 64) as usize].fill(0xEE);
        a.run_to(200);
        assert!(a.mem.load(STATUS_GPA + status::DISK_ERRORS as u64) > 0);
    }

    #[test]
    fn db_counts_a_bad_page_read_back() {
        let mut a = ImageModel::fresh(4 << 20, &db_params());
        a.run_to(200);
        let errors = STATUS_GPA + status::DISK_ERRORS as u64;
        assert_eq!(a.mem.load(errors), 0);
        // Tear one record of every written-back table page (it is written back again only
        // every 16 * T updates), then run through a few read-backs.
        let l = db::Layout::of(&a.params).unwrap();
        for p in 0..l.table {
            a.disk[(p * PAGE) as usize + 8 * 8 + 16] ^= 0xFF;
        }
        a.run_to(200 + 4 * db::READBACK_EVERY);
        assert!(
            a.mem.load(errors) > 0,
            "a torn record read back is an error"
        );
    }

    #[test]
    fn units_are_deterministic_and_continue_from_an_image() {
        for w in Workload::MEMORY {
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
