//! Real-KVM tests of the KVM backend's disk: the virtio-blk device attached at create and
//! re-attached at restore, its state in the saved state, the register window in the vCPU
//! loop, and the clear errors for a missing, absent or wrong-sized disk. Each test skips
//! without /dev/kvm (fails instead with `CASTOR_REQUIRE_KVM=1`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ha_guest::domain::{Devices, Domain, DomainError, DomainFactory, GuestSpec};
use ha_guest::image::GuestImage;
use ha_kvm::KvmFactory;
use ha_workloads::guest_abi::{GuestParams, PARAMS_GPA, Workload, disk};
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
