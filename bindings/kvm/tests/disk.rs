//! Real-KVM tests of the KVM backend's disk: the virtio-blk device attached at create and
//! re-attached at restore, its state in the saved state, the register window in the vCPU
//! loop, and the clear errors for a missing, absent or wrong-sized disk. Each test skips
//! without /dev/kvm (fails instead with `CASTOR_REQUIRE_KVM=1`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::domain::{Devices, DiskWrite, Domain, DomainError, DomainFactory, GuestSpec};
use ha_guest::image::GuestImage;
use ha_kvm::KvmFactory;
use ha_workloads::guest_abi::{
    GuestParams, GuestStatus, PARAMS_GPA, STATUS_GPA, Workload, disk, page_count, status,
};
use ha_workloads::model::{DiskOp, DiskRequest, Image, ImageModel as Model, Memory, Ports};
use ha_workloads::{db, files};
use iced_x86::code_asm::*;

/// A disk image of `pages` 4 KiB pages holding a pattern, in a fresh temporary directory.
fn disk_file(pages: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let bytes: Vec<u8> = (0..pages * 4096)
        .map(|i| (i * 13 + i / 4096) as u8)
        .collect();
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn with_disk(mut s: GuestSpec, path: &Path) -> GuestSpec {
    s.devices.disk = Some(path.to_owned());
    s
}

fn devices(path: Option<&Path>) -> Devices {
    Devices {
        disk: path.map(Path::to_owned),
    }
}

/// The error and its sources, one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s = format!("{s}: {c}");
        cur = c.source();
    }
    s
}

fn restore_err(image: &[u8], state: &[u8], devices: &Devices) -> String {
    match KvmFactory::new().restore(image, state, devices) {
        Ok(_) => panic!("restored with {devices:?}"),
        Err(e) => chain(&e),
    }
}

#[test]
fn a_disk_is_attached_saved_and_reattached_only_as_it_was() {
    if !kvm_available() {
        return;
    }
    let (dir, path) = disk_file(24);
    let mut d = KvmFactory::new()
        .create(&with_disk(spec(Workload::Idle, 4, 0), &path))
        .unwrap();
    // The params page tells the guest its disk's size.
    let mut page = vec![0u8; 4096];
    d.read_memory(PARAMS_GPA, &mut page).unwrap();
    assert_eq!(GuestParams::read_page(&page).unwrap().disk_size, 24 * 4096);
    let file = std::fs::read(&path).unwrap();
    let dk = d.disk().expect("a disk capability");
    assert_eq!(dk.disk_size(), 24 * 4096);
    let mut buf = vec![0u8; 8192];
    dk.read_at(4096, &mut buf).unwrap();
    assert_eq!(buf, file[4096..3 * 4096]);
    assert!(dk.read_at(23 * 4096, &mut buf).is_err(), "past the end");
    let mut writes = Vec::new();
    dk.drain_writes(&mut writes).unwrap();
    assert!(writes.is_empty());

    let state = d.save_state().unwrap();
    let image = snapshot(d.as_ref());
    drop(d);
    // The same disk (or a copy of it): restored, with the disk capability.
    let copy = dir.path().join("copy.img");
    std::fs::copy(&path, &copy).unwrap();
    let mut r = KvmFactory::new()
        .restore(&image, &state, &devices(Some(&copy)))
        .unwrap();
    assert_eq!(r.disk().unwrap().disk_size(), 24 * 4096);
    let mut committed = GuestImage::new(image.len()).unwrap();
    committed.as_mut_slice().copy_from_slice(&image);
    let mut r2 = KvmFactory::new()
        .restore_image(committed, &state, &devices(Some(&path)))
        .unwrap();
    assert_eq!(r2.disk().unwrap().disk_size(), 24 * 4096);
    run_until(r2.as_mut(), 100, 5);
    r2.check_health().unwrap();

    // No disk given for a guest that had one: the size it needs is named.
    let e = restore_err(&image, &state, &Devices::default());
    assert!(
        e.contains("98304-byte disk") && e.contains("no disk"),
        "{e}"
    );
    // A disk of the wrong size: both sizes named, and the path.
    let short = dir.path().join("short.img");
    std::fs::File::create(&short)
        .unwrap()
        .set_len(8 * 4096)
        .unwrap();
    let e = restore_err(&image, &state, &devices(Some(&short)));
    assert!(
        e.contains("98304") && e.contains("32768") && e.contains("short.img"),
        "{e}"
    );
    // A missing disk: its path named.
    let missing = dir.path().join("missing.img");
    let e = restore_err(&image, &state, &devices(Some(&missing)));
    assert!(e.contains("missing.img"), "{e}");
    // A disk given for a guest that had none.
    let mut plain = KvmFactory::new()
        .create_kvm(&spec(Workload::Idle, 4, 0))
        .unwrap();
    assert!(plain.disk().is_none());
    let (plain_state, plain_image) = (plain.save_state().unwrap(), snapshot(&plain));
    let e = restore_err(&plain_image, &plain_state, &devices(Some(&path)));
    assert!(e.contains("disk.img") && e.contains("has none"), "{e}");
    // A saved device state the transport refuses.
    let mut st = ha_kvm::state::decode(&state).unwrap();
    st.disk.as_mut().unwrap().mmio.driver_features |= 1 << 3;
    let bad = ha_kvm::state::encode(&st).unwrap();
    let e = restore_err(&image, &bad, &devices(Some(&path)));
    assert!(e.contains("virtio-mmio state is invalid"), "{e}");
}

#[test]
fn missing_disks_and_db_without_room_are_refused_at_create() {
    let (dir, path) = disk_file(24);
    let missing = dir.path().join("nope.img");
    let e = match KvmFactory::new().create(&with_disk(spec(Workload::Idle, 4, 0), &missing)) {
        Ok(_) => panic!("created on a missing disk"),
        Err(e) => chain(&e),
    };
    assert!(e.contains("nope.img"), "{e}");
    if !kvm_available() {
        return;
    }
    let e = match KvmFactory::new().create(&spec(Workload::Db, 4, 0)) {
        Ok(_) => panic!("created db without a disk"),
        Err(e) => chain(&e),
    };
    assert!(
        e.contains("needs a disk") && e.contains("disk 0 bytes"),
        "{e}"
    );
    // One disk page: no room for a table and a log.
    let one = dir.path().join("one.img");
    std::fs::File::create(&one).unwrap().set_len(4096).unwrap();
    let e = match KvmFactory::new().create(&with_disk(spec(Workload::Db, 4, 0), &one)) {
        Ok(_) => panic!("created db on a one-page disk"),
        Err(e) => chain(&e),
    };
    assert!(e.contains("disk 4096 bytes"), "{e}");
    assert!(
        KvmFactory::new()
            .create(&with_disk(spec(Workload::Db, 4, 0), &path))
            .is_ok()
    );
}

/// Where the hand-written programs below are put (below the heap, clear of the disk queue).
const CODE: u64 = 0x7_0000;
/// Where they leave what they read.
const OUT: u64 = 0x7_F000;

/// Run `code` at [`CODE`] in a copy of `image` with `state` (edited by `edit`), on `disk`,
/// until the guest faults or 1 s passes; the guest and its fault.
fn run_program(
    image: &[u8],
    state: &[u8],
    disk: &Path,
    code: &[u8],
    edit: impl FnOnce(&mut ha_kvm::state::SavedState),
) -> (Box<dyn Domain>, Option<DomainError>) {
    let mut img = image.to_vec();
    img[CODE as usize..CODE as usize + code.len()].copy_from_slice(code);
    let mut st = ha_kvm::state::decode(state).unwrap();
    st.regs.rip = CODE;
    edit(&mut st);
    let mut g = KvmFactory::new()
        .restore(
            &img,
            &ha_kvm::state::encode(&st).unwrap(),
            &devices(Some(disk)),
        )
        .unwrap();
    g.resume().unwrap();
    let mut fault = None;
    for _ in 0..200 {
        if let Err(e) = g.check_health() {
            fault = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    g.pause().unwrap();
    (g, fault)
}

#[test]
fn malformed_mmio_never_crashes_the_vmm() {
    if !kvm_available() {
        return;
    }
    let (_dir, path) = disk_file(24);
    let mut d = KvmFactory::new()
        .create(&with_disk(spec(Workload::Idle, 4, 0), &path))
        .unwrap();
    let state = d.save_state().unwrap();
    let image = snapshot(d.as_ref());
    drop(d);
    let before = std::fs::read(&path).unwrap();

    // Registers read back; odd widths, unknown offsets and a notify of a queue whose
    // rings are outside guest memory (a hand-built device state) are ignored; a write
    // just past the window is the guest's fault.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut hang = a.create_label();
    a.mov(rdi, disk::MMIO_GPA).unwrap();
    a.mov(eax, dword_ptr(rdi)).unwrap();
    a.mov(qword_ptr(OUT), rax).unwrap();
    a.mov(rax, qword_ptr(rdi + 0x100)).unwrap();
    a.mov(qword_ptr(OUT + 8), rax).unwrap();
    a.mov(qword_ptr(rdi + 0x800), rax).unwrap();
    a.mov(byte_ptr(rdi + 0x70), 1).unwrap();
    a.mov(dword_ptr(rdi + 0x50), 0).unwrap();
    a.mov(dword_ptr(rdi + 0x50), 7).unwrap();
    a.mov(dword_ptr(rdi + 0xFFC), 0).unwrap();
    a.mov(qword_ptr(OUT + 16), 1).unwrap();
    a.mov(dword_ptr(rdi + 0x1000), 0).unwrap();
    a.set_label(&mut hang).unwrap();
    a.jmp(hang).unwrap();
    let code = a.assemble(CODE).unwrap();
    let (g, fault) = run_program(&image, &state, &path, &code, |st| {
        let q = &mut st.disk.as_mut().unwrap().mmio;
        q.status = 0xF;
        q.driver_features = 1 << 32;
        q.queue.size = 16;
        q.queue.ready = true;
        q.queue.desc_table = 0x3_0000_0000;
        q.queue.avail_ring = 0x3_0000_1000;
        q.queue.used_ring = 0x3_0000_2000;
    });
    let e = fault.expect("the write past the window is a fault");
    let msg = e.to_string();
    assert!(msg.contains("MMIO write at 0x400001000"), "{msg}");
    let mut out = [0u8; 24];
    g.read_memory(OUT, &mut out).unwrap();
    let word = |i: usize| u64::from_le_bytes(out[8 * i..8 * i + 8].try_into().unwrap());
    assert_eq!(word(0), u64::from(u32::from_le_bytes(*b"virt")));
    assert_eq!(word(1), 24 * 4096 / 512, "capacity in sectors");
    assert_eq!(word(2), 1, "the program went on after the bad accesses");
    assert!(std::fs::read(&path).unwrap() == before, "the disk changed");
}

// ---------------------------------------------------------------------------------------
// The `db` guest
// ---------------------------------------------------------------------------------------

/// Disk pages of the `db` tests' disk: a 12-page table and a 12-page log.
const DB_PAGES: u64 = 24;

/// A zero disk image of `pages` 4 KiB pages in a fresh temporary directory.
fn zero_disk(pages: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(pages * 4096)
        .unwrap();
    (dir, path)
}

/// An 8 MiB `db` guest on `path`, flushing (and reporting) every 48 updates.
fn db_spec(path: &Path) -> GuestSpec {
    let mut s = with_disk(spec(Workload::Db, 8, 0), path);
    s.params.output_every = 48;
    s.params.doorbell_every = 8;
    s
}

/// The params the guest runs with: the spec's, with the disk's size the VMM fills in.
fn db_params(s: &GuestSpec) -> GuestParams {
    GuestParams {
        disk_size: DB_PAGES * 4096,
        ..s.params.clone()
    }
}

/// The whole disk as the domain's `Disk` capability reads it.
fn read_disk(d: &mut dyn Domain) -> Vec<u8> {
    let dk = d.disk().expect("a disk");
    let mut buf = vec![0u8; dk.disk_size() as usize];
    dk.read_at(0, &mut buf).unwrap();
    buf
}

/// Batches (doorbells of the disk) in updates `1..=n`: the units with a request due.
fn batches(n: u64, flush_every: u64) -> u64 {
    (1..=n)
        .filter(|u| {
            u % db::RECORDS_PER_PAGE == 0
                || u % flush_every == 0
                || u % db::WRITEBACK_EVERY == 0
                || u % db::READBACK_EVERY == 0
        })
        .count() as u64
}

/// Check a paused disk guest against the model from its very start: no disk errors, and
/// [`check_against`] a fresh model.
fn check_against_model(d: &mut dyn Domain, params: &GuestParams) -> (GuestStatus, Model) {
    let st = d.status().unwrap();
    assert_eq!(st.disk_errors, 0, "{st:?}");
    let fresh = Model::fresh(d.memory_size(), params);
    check_against(d, &fresh)
}

/// Check a paused disk guest against the model from `start`: the checksum, the disk
/// errors, every heap word and every 4 KiB disk page are the model's after `n = progress`
/// units or, for the unit in flight, after `n + 1`. Returns the status and the model at
/// `n`.
fn check_against(d: &mut dyn Domain, start: &Model) -> (GuestStatus, Model) {
    let st = d.status().unwrap();
    let params = &start.params;
    let mut m = start.clone();
    m.run_to(st.progress);
    let mut next = m.clone();
    next.unit();
    assert!(
        st.checksum == m.cpu.checksum() || st.checksum == next.cpu.checksum(),
        "checksum at progress {} matches neither n nor n+1",
        st.progress
    );
    let errors = |m: &Model| m.mem.load(STATUS_GPA + status::DISK_ERRORS as u64);
    assert!(
        st.disk_errors == errors(&m) || st.disk_errors == errors(&next),
        "{} disk errors at progress {}, the model's {}",
        st.disk_errors,
        st.progress,
        errors(&m)
    );
    let mut heap = vec![0u8; params.heap_size as usize];
    d.read_memory(params.heap_gpa, &mut heap).unwrap();
    for (i, (g, (a, b))) in heap
        .chunks(8)
        .zip(m.heap().chunks(8).zip(next.heap().chunks(8)))
        .enumerate()
    {
        assert!(
            g == a || g == b,
            "heap word {i} differs from the model at progress {}",
            st.progress
        );
    }
    let disk = read_disk(d);
    for (p, (g, (a, b))) in disk
        .chunks(PAGE_SIZE)
        .zip(m.disk.chunks(PAGE_SIZE).zip(next.disk.chunks(PAGE_SIZE)))
        .enumerate()
    {
        assert!(
            g == a || g == b,
            "disk page {p} differs from the model at progress {}",
            st.progress
        );
    }
    (st, m)
}

fn apply(replica: &mut [u8], writes: &[DiskWrite]) {
    for w in writes {
        let at = w.offset as usize;
        replica[at..at + w.data.len()].copy_from_slice(&w.data);
    }
}

/// Run a new guest of `s` (on the disk `s.devices` names, which holds `replica`) for
/// three rounds of at least `min * round` units: each round the epoch's drained writes,
/// applied to `replica`, give the disk (and `read_at` the file), the guest is the model's
/// (heap and disk, [`check_against_model`]) and `notifies(round, status, notifies)` checks
/// the disk's doorbells; then every output record's checksum is the model's at its
/// progress. The last round's status and model, and the records.
fn rounds_match_the_model(
    s: &GuestSpec,
    params: &GuestParams,
    replica: &mut [u8],
    min: u64,
    mut notifies: impl FnMut(u64, &GuestStatus, u64),
) -> (
    GuestStatus,
    Model,
    Vec<ha_workloads::guest_abi::OutputRecord>,
) {
    let path = s.devices.disk.as_deref().unwrap();
    let mut d = KvmFactory::new().create_kvm(s).unwrap();
    let mut records = Vec::new();
    let mut last = None;
    for round in 1..=3u64 {
        let st = run_until(&mut d, 1500 * round, 5);
        d.check_health().unwrap();
        assert!(st.progress > min * round, "round {round}: {st:?}");
        let mut writes = Vec::new();
        d.disk().unwrap().drain_writes(&mut writes).unwrap();
        assert!(!writes.is_empty(), "round {round}: no disk writes");
        apply(replica, &writes);
        let disk = read_disk(&mut d);
        assert!(disk == std::fs::read(path).unwrap(), "read_at is the file");
        assert!(disk == replica, "round {round}: drained writes miss some");
        let (st, m) = check_against_model(&mut d, params);
        let n = d.disk_notifies();
        notifies(round, &st, n);
        d.drain_output(&mut records).unwrap();
        eprintln!(
            "{} round {round}: model matches at progress {} ({} writes, {n} batches)",
            params.workload.name(),
            st.progress,
            writes.len()
        );
        last = Some((st, m));
    }
    assert!(!records.is_empty());
    let mut m = Model::fresh(s.memory_size, params);
    for r in &records {
        let (p, c) = payload(r);
        assert_eq!(p % params.output_every, 0);
        m.run_to(p);
        assert_eq!(c, m.cpu.checksum(), "record at progress {p}");
    }
    let (st, m) = last.unwrap();
    (st, m, records)
}

#[test]
fn db_matches_the_model_and_its_drained_writes_rebuild_the_disk() {
    if !kvm_available() {
        return;
    }
    let (_dir, path) = zero_disk(DB_PAGES);
    let s = db_spec(&path);
    let params = db_params(&s);
    let mut replica = vec![0u8; (DB_PAGES * 4096) as usize];
    let flush = s.params.output_every;
    // One doorbell per batch: the batches of n updates, or of n + 1.
    let (st, m, records) = rounds_match_the_model(&s, &params, &mut replica, 200, |_, st, n| {
        assert!(
            n == batches(st.progress, flush) || n == batches(st.progress + 1, flush),
            "{n} disk notifies at progress {}",
            st.progress
        );
    });
    // ... and the disk holds the log of every update up to its last flush: the one of the
    // last record, or of the unit in flight at the pause (which may have overwritten the
    // oldest page of the circle).
    let l = db::Layout::of(&params).unwrap();
    let disk = std::fs::read(&path).unwrap();
    let at = if disk == m.disk {
        st.progress
    } else {
        st.progress + 1
    };
    let flushed = at - at % 48;
    assert!(flushed >= payload(records.last().unwrap()).0);
    let window = db::log_window(&l, flushed);
    assert_eq!(
        window.clone().count(),
        11 * 64 + (flushed as usize - 1) % 64 + 1
    );
    for seq in window {
        let rec = db::log_record(&l, &disk, seq).unwrap();
        assert_eq!(rec[0], seq);
        assert_eq!(rec[7], db::check_word(&rec), "update {seq}");
    }
}

#[test]
fn db_device_writes_are_harvested_as_dirty() {
    if !kvm_available() {
        return;
    }
    let (_dir, path) = zero_disk(DB_PAGES);
    let s = db_spec(&path);
    let l = db::Layout::of(&db_params(&s)).unwrap();
    let mut d = KvmFactory::new().create_kvm(&s).unwrap();
    let pages = page_count(s.memory_size);
    d.harvest_dirty(&mut PageBitmap::new(pages)).unwrap();
    let mut prev = snapshot(&d);
    // Pages only the device writes: the used ring and the read buffer.
    let used = (disk::USED_GPA as usize) / PAGE_SIZE;
    let readbuf = (s.params.heap_gpa as usize) / PAGE_SIZE + l.read_buffer() as usize;
    let (mut used_seen, mut readbuf_seen) = (0, 0);
    for cycle in 0..20u64 {
        d.resume().unwrap();
        std::thread::sleep(Duration::from_micros(500 + 300 * cycle));
        d.pause().unwrap();
        let mut dirty = PageBitmap::new(pages);
        d.harvest_dirty(&mut dirty).unwrap();
        let now = snapshot(&d);
        for (i, (a, b)) in prev
            .chunks(PAGE_SIZE)
            .zip(now.chunks(PAGE_SIZE))
            .enumerate()
        {
            if a != b {
                assert!(
                    dirty.get(i),
                    "cycle {cycle}: page {i:#x} changed but was not harvested"
                );
                used_seen += usize::from(i == used);
                readbuf_seen += usize::from(i == readbuf);
            }
        }
        prev = now;
    }
    d.check_health().unwrap();
    let st = d.status().unwrap();
    assert!(st.progress > 64, "{st:?}");
    assert!(used_seen > 0, "the used ring never changed");
    assert!(readbuf_seen > 0, "the read buffer never changed");
}

/// Run the guest of `s` (its disk at `path`, in `dir`) to `units` updates, save it and
/// restore it on a copy of its disk while the original goes on; the restored guest runs
/// `units` more and is the model's (heap and disk), and so is the guest restored from it
/// the backup's way (on the committed image itself).
fn restored_on_a_copy_continues_as_the_model(
    s: &GuestSpec,
    params: &GuestParams,
    dir: &Path,
    path: &Path,
    units: u64,
) {
    let factory = KvmFactory::new();
    let mut d = factory.create_kvm(s).unwrap();
    let st = run_until(&mut d, units, 5);
    let state = d.save_state().unwrap();
    let image = snapshot(&d);
    let replica = dir.join("replica.img");
    std::fs::copy(path, &replica).unwrap();
    // The original goes on, on its own disk.
    d.resume().unwrap();

    let mut r = factory
        .restore(&image, &state, &devices(Some(&replica)))
        .unwrap();
    assert_eq!(r.status().unwrap(), st);
    let after = run_until(r.as_mut(), st.progress + units, 5);
    r.check_health().unwrap();
    assert!(after.progress >= st.progress + units / 2, "{after:?}");
    let mut writes = Vec::new();
    r.disk().unwrap().drain_writes(&mut writes).unwrap();
    assert!(!writes.is_empty(), "the restored driver wrote nothing");
    check_against_model(r.as_mut(), params);
    d.pause().unwrap();
    d.check_health().unwrap();
    drop(d);

    // Again the backup's way, on the committed image itself.
    let state2 = r.save_state().unwrap();
    let image2 = snapshot(r.as_ref());
    let saved2 = r.status().unwrap();
    drop(r);
    let mut committed = GuestImage::new(image2.len()).unwrap();
    committed.as_mut_slice().copy_from_slice(&image2);
    let mut r2 = factory
        .restore_image(committed, &state2, &devices(Some(&replica)))
        .unwrap();
    let after2 = run_until(r2.as_mut(), saved2.progress + units, 5);
    r2.check_health().unwrap();
    assert!(after2.progress > saved2.progress, "{after2:?}");
    check_against_model(r2.as_mut(), params);
}

#[test]
fn db_restored_on_a_copy_of_its_disk_continues_as_the_model() {
    if !kvm_available() {
        return;
    }
    let (dir, path) = zero_disk(DB_PAGES);
    let s = db_spec(&path);
    restored_on_a_copy_continues_as_the_model(&s, &db_params(&s), dir.path(), &path, 2000);
}

#[test]
fn db_counts_torn_pages_and_failed_requests_as_disk_errors() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let (_dir, path) = zero_disk(DB_PAGES);
    let s = db_spec(&path);
    let l = db::Layout::of(&db_params(&s)).unwrap();
    let mut d = KvmFactory::new().create_kvm(&s).unwrap();
    let st = run_until(&mut d, 400, 1);
    assert_eq!(st.disk_errors, 0, "{st:?}");
    // Tear one word of record 8 of every table page behind the guest's back: a read-back
    // of such a page (before its next write-back heals it) fails the record check.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for p in 0..l.table {
        file.write_all_at(&[0xA5], p * 4096 + 8 * 64 + 16).unwrap();
    }
    let torn = run_until(&mut d, st.progress + 4 * db::READBACK_EVERY, 1);
    d.check_health().unwrap();
    assert!(torn.disk_errors > 0, "no torn page seen: {torn:?}");
    // A guest whose params page claims a disk twice the size: its log pages are past the
    // disk's end, so every log write completes with an I/O error status; the guest counts
    // them and goes on, and the VMM with it.
    let state = d.save_state().unwrap();
    let mut image = snapshot(&d);
    let at = PARAMS_GPA as usize + ha_workloads::guest_abi::params::DISK_SIZE;
    image[at..at + 8].copy_from_slice(&(2 * DB_PAGES * 4096).to_le_bytes());
    drop(d);
    let mut r = KvmFactory::new()
        .restore(&image, &state, &devices(Some(&path)))
        .unwrap();
    let bad = run_until(r.as_mut(), torn.progress + 8 * db::RECORDS_PER_PAGE, 1);
    r.check_health().unwrap();
    let log_writes = (torn.progress + 2..=bad.progress)
        .filter(|u| u % db::RECORDS_PER_PAGE == 0 || u % 48 == 0)
        .count() as u64;
    assert!(log_writes >= 8, "{torn:?} {bad:?}");
    assert!(
        bad.disk_errors >= torn.disk_errors + log_writes,
        "{log_writes} failed log writes, errors {torn:?} -> {bad:?}"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        DB_PAGES * 4096,
        "nothing written past the disk's end"
    );
}

// ---------------------------------------------------------------------------------------
// The `files` guest
// ---------------------------------------------------------------------------------------

/// Disk pages of the `files` tests' disk: a tree of 224 pages and a 32-page log.
const FILES_PAGES: u64 = 256;

/// A 4 MiB `files` guest on `path` whose 200-page heap caches fewer files than the tree
/// holds (as the model's `files_params`), reporting every 16 requests.
fn files_spec(path: &Path) -> GuestSpec {
    let mut s = with_disk(spec(Workload::Files, 4, 0), path);
    s.params.heap_size = 200 * 4096;
    s.params.output_every = 16;
    s.params.doorbell_every = 8;
    s
}

/// The params a guest of `s` runs with (the disk's size filled in), and its layout: the cache
/// is smaller than the tree, so requests miss.
fn files_params(s: &GuestSpec) -> (GuestParams, files::Layout) {
    let p = GuestParams {
        disk_size: FILES_PAGES * 4096,
        ..s.params.clone()
    };
    let l = files::Layout::of(&p).unwrap();
    assert!(
        l.slots < l.files,
        "the cache is smaller than the tree: {l:?}"
    );
    (p, l)
}

/// A disk of [`FILES_PAGES`] formatted for `p` (`files::format_disk`) in a fresh
/// temporary directory, and its bytes.
fn files_disk(p: &GuestParams) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let mut bytes = vec![0u8; (FILES_PAGES * 4096) as usize];
    files::format_disk(p.seed, p.heap_size, FILES_PAGES * 4096, |at, b| {
        bytes[at as usize..at as usize + b.len()].copy_from_slice(b);
        Ok::<(), ()>(())
    })
    .unwrap()
    .unwrap();
    let (dir, path) = zero_disk(FILES_PAGES);
    std::fs::write(&path, &bytes).unwrap();
    (dir, path, bytes)
}

/// The model's ports, counting its disk batches and the reads (misses) among them; the
/// doorbell drops the records.
struct Counting<'a> {
    disk: &'a mut [u8],
    batches: u64,
    reads: u64,
}

impl Ports<Image> for Counting<'_> {
    type Error = std::convert::Infallible;

    fn doorbell(&mut self, mem: &mut Image) -> Result<(), Self::Error> {
        let head = mem.load(STATUS_GPA + status::OUT_HEAD as u64);
        mem.store(STATUS_GPA + status::OUT_TAIL as u64, head);
        Ok(())
    }

    fn disk(
        &mut self,
        mem: &mut Image,
        batch: &[DiskRequest],
        ok: &mut [bool],
    ) -> Result<(), Self::Error> {
        self.batches += 1;
        self.reads += u64::from(batch.iter().any(|r| r.op == DiskOp::Read));
        for (r, ok) in batch.iter().zip(ok.iter_mut()) {
            *ok = ha_workloads::model::disk_io(mem, self.disk, r);
        }
        Ok(())
    }
}

/// The model's (batches, reads) after each of units `0..=n` of a fresh guest.
fn model_batches(memory_size: u64, p: &GuestParams, n: u64) -> Vec<(u64, u64)> {
    let mut m = Model::fresh(memory_size, p);
    let mut ports = Counting {
        disk: &mut m.disk,
        batches: 0,
        reads: 0,
    };
    let mut out = vec![(0, 0)];
    for _ in 0..n {
        m.cpu.unit(&mut m.mem, &mut ports).unwrap();
        out.push((ports.batches, ports.reads));
    }
    out
}

#[test]
fn files_matches_the_model_and_its_drained_writes_rebuild_the_disk() {
    if !kvm_available() {
        return;
    }
    let (params, _) = files_params(&files_spec(Path::new("")));
    let (_dir, path, mut replica) = files_disk(&params);
    let s = files_spec(&path);
    // One doorbell per batch, a miss's read or a request's writes: the model's batches of
    // n requests, or of n + 1.
    rounds_match_the_model(&s, &params, &mut replica, 300, |round, st, n| {
        let counts = model_batches(s.memory_size, &params, st.progress + 1);
        let (at_n, at_next) = (
            counts[st.progress as usize],
            counts[st.progress as usize + 1],
        );
        assert!(
            n == at_n.0 || n == at_next.0,
            "{n} disk notifies at progress {}, the model's (batches, reads) {at_n:?}",
            st.progress
        );
        assert!(at_n.1 > 10 * round, "round {round}: misses {at_n:?}");
        assert!(
            at_n.0 - at_n.1 >= st.progress / files::LOG_RECORDS_PER_PAGE,
            "round {round}: write batches {at_n:?}"
        );
        eprintln!("files round {round}: {} misses", at_n.1);
    });
}

#[test]
fn files_restored_on_a_copy_of_its_disk_continues_as_the_model() {
    if !kvm_available() {
        return;
    }
    let (params, _) = files_params(&files_spec(Path::new("")));
    let (dir, path, _) = files_disk(&params);
    // 1000 requests each side: misses, log pages and rewrites before and after.
    let s = files_spec(&path);
    restored_on_a_copy_continues_as_the_model(&s, &params, dir.path(), &path, 1000);
}

#[test]
fn files_counts_failed_and_wrong_reads_as_disk_errors() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    // No disk, or one too small for a file and a log: refused.
    let e = match KvmFactory::new().create(&spec(Workload::Files, 4, 0)) {
        Ok(_) => panic!("created files without a disk"),
        Err(e) => chain(&e),
    };
    assert!(e.contains("needs a disk"), "{e}");
    // A zero disk, never formatted: every file read is wrong, and the guest goes on.
    let (_zdir, zero) = zero_disk(FILES_PAGES);
    let mut z = KvmFactory::new().create_kvm(&files_spec(&zero)).unwrap();
    let st = run_until(&mut z, 300, 1);
    z.check_health().unwrap();
    assert!(st.progress >= 300, "{st:?}");
    assert!(st.disk_errors >= 12, "files read wrong not counted: {st:?}");
    drop(z);

    // A new guest whose table puts hot file 1 past the disk's end: each request for it
    // misses (no tag is written) and its read fails, one error each, as in the model.
    let (params, l) = files_params(&files_spec(Path::new("")));
    let (_dir, path, formatted) = files_disk(&params);
    let mut d = KvmFactory::new().create_kvm(&files_spec(&path)).unwrap();
    let (state, mut image) = (d.save_state().unwrap(), snapshot(&d));
    drop(d);
    let entry = params.heap_gpa as usize + files::ENTRY_BYTES as usize;
    let word = u64::from_le_bytes(image[entry..entry + 8].try_into().unwrap());
    let (_, pages) = files::entry(word);
    image[entry..entry + 8].copy_from_slice(&(FILES_PAGES | pages << 48).to_le_bytes());
    let model = Model::from_image(image.clone())
        .unwrap()
        .with_disk(formatted);
    let mut d = KvmFactory::new()
        .restore(&image, &state, &devices(Some(&path)))
        .unwrap();
    let st = run_until(d.as_mut(), 1000, 1);
    d.check_health().unwrap();
    assert!(st.disk_errors > 50, "failed reads not counted: {st:?}");
    check_against(d.as_mut(), &model);

    // The tree corrupted behind the guest's back: files read wrong from then on.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for p in 0..l.file_pages {
        file.write_all_at(&[0xEE; 8], p * 4096 + 8).unwrap();
    }
    let bad = run_until(d.as_mut(), st.progress + 300, 1);
    d.check_health().unwrap();
    assert!(
        bad.disk_errors > st.disk_errors + 10,
        "no corrupted file seen: {st:?} -> {bad:?}"
    );
}
