//! Copy-on-write checkpoints on real KVM guests: the pages a pending copy yields are the
//! guest's memory at the pause that armed it, with the guest writing them meanwhile (write
//! faults counted), with and without a prearm before the pause (the guest writing prearmed
//! pages before it), on anonymous RAM and on a restored guest's memfd.

mod common;

use std::time::Duration;

use common::*;
use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::cow::CopiedPages;
use ha_guest::domain::{Devices, Domain, DomainFactory};
use ha_guest::image::GuestImage;
use ha_kvm::KvmFactory;
use ha_workloads::guest_abi::{Workload, page_count};

/// Check every copied page against `reference` (memory read while paused at the arm).
fn check(copied: &CopiedPages, dirty: &PageBitmap, reference: &[u8], what: &str) {
    let want: Vec<u64> = dirty.iter_set().map(|p| p as u64).collect();
    assert_eq!(
        copied.index, want,
        "{what}: the copy's pages are the armed ones"
    );
    assert_eq!(copied.data.len(), want.len() * PAGE_SIZE);
    for (slot, &p) in copied.index.iter().enumerate() {
        let at = p as usize * PAGE_SIZE;
        assert!(
            copied.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE] == reference[at..at + PAGE_SIZE],
            "{what}: page {p:#x} is not its content at the checkpoint"
        );
    }
}

/// Pause, harvest, read all memory, arm.
fn arm(
    d: &mut dyn Domain,
    pages: usize,
) -> (PageBitmap, Vec<u8>, Box<dyn ha_guest::cow::PendingCopy>) {
    arm_after(d, PageBitmap::new(pages))
}

/// Harvest and prearm with the guest running, let it write (some prearmed pages among
/// what it writes), then [`arm`] on the pages harvested both times.
fn prearm_and_arm(
    d: &mut dyn Domain,
    pages: usize,
) -> (PageBitmap, Vec<u8>, Box<dyn ha_guest::cow::PendingCopy>) {
    let mut dirty = PageBitmap::new(pages);
    d.harvest_dirty(&mut dirty).unwrap();
    d.cow_memory()
        .expect("copy-on-write memory")
        .prearm(&dirty)
        .unwrap();
    std::thread::sleep(Duration::from_millis(2));
    arm_after(d, dirty)
}

/// Pause, harvest into `dirty`, read all memory, arm.
fn arm_after(
    d: &mut dyn Domain,
    mut dirty: PageBitmap,
) -> (PageBitmap, Vec<u8>, Box<dyn ha_guest::cow::PendingCopy>) {
    d.pause().unwrap();
    let mut out = Vec::new();
    d.drain_output(&mut out).unwrap();
    d.harvest_dirty(&mut dirty).unwrap();
    let reference = snapshot(d);
    let pending = d
        .cow_memory()
        .expect("copy-on-write memory")
        .arm(&dirty)
        .unwrap();
    assert_eq!(pending.pages(), dirty.count());
    (dirty, reference, pending)
}

/// `cycles` copy-on-write checkpoints with the guest writing during each copy; returns the
/// pages copied in the fault path and the pages copied in all.
fn cycles(d: &mut dyn Domain, cycles: u64, what: &str) -> (usize, usize) {
    let pages = page_count(d.memory_size());
    let (mut faulted, mut total) = (0, 0);
    d.resume().unwrap();
    for cycle in 0..cycles {
        std::thread::sleep(Duration::from_millis(2 + cycle % 3));
        // Three checkpoints in four protect what the epoch dirtied so far before the pause.
        let (dirty, reference, pending) = if cycle % 4 != 3 {
            prearm_and_arm(d, pages)
        } else {
            arm(d, pages)
        };
        d.resume().unwrap();
        // Let the guest write protected pages before the copy starts; every third copy
        // runs on another thread, as the encoder's does.
        std::thread::sleep(Duration::from_millis(1 + cycle % 4));
        let copied = if cycle % 3 == 0 {
            std::thread::spawn(move || pending.complete().unwrap())
                .join()
                .unwrap()
        } else {
            pending.complete().unwrap()
        };
        check(
            &copied,
            &dirty,
            &reference,
            &format!("{what} cycle {cycle}"),
        );
        faulted += copied.faulted;
        total += copied.index.len();
    }
    d.pause().unwrap();
    d.check_health().unwrap();
    (faulted, total)
}

#[test]
fn copies_are_the_memory_at_the_checkpoint_with_the_guest_writing() {
    if !kvm_available() {
        return;
    }
    for w in [Workload::Kv, Workload::Npb, Workload::Memwrite] {
        let mut s = spec(w, 32, 0);
        s.params.output_every = 64;
        s.params.doorbell_every = 16;
        let mut d = KvmFactory::new().create_kvm(&s).unwrap();
        let before = d.status().unwrap().progress;
        let (faulted, total) = cycles(&mut d, 40, &format!("{w:?}"));
        let (faults, fault_copies) = d.cow_faults();
        let cost = d.cow_memory().and_then(|c| c.fault_cost());
        eprintln!(
            "{w:?}: {total} pages copied over 40 checkpoints, {faulted} in the fault path \
             ({faults} write faults served; a fault costs {cost:?})"
        );
        assert!(
            cost.is_some_and(|c| !c.is_zero()),
            "the fault cost is measured"
        );
        assert!(faulted > 0, "{w:?}: no write fault copied a page");
        assert_eq!(fault_copies, faulted as u64);
        assert!(faults >= fault_copies);
        assert!(
            d.status().unwrap().progress > before,
            "{w:?} made no progress"
        );
    }
}

#[test]
fn a_restored_guest_on_a_memfd_is_copied_on_write_too() {
    if !kvm_available() {
        return;
    }
    let factory = KvmFactory::new();
    let mut s = spec(Workload::Kv, 32, 0);
    s.params.output_every = 64;
    s.params.doorbell_every = 16;
    let mut d1 = factory.create_kvm(&s).unwrap();
    run_until(&mut d1, 2000, 5);
    let state = d1.save_state().unwrap();
    let image = snapshot(&d1);
    drop(d1);
    let mut committed = GuestImage::new(image.len()).unwrap();
    committed.as_mut_slice().copy_from_slice(&image);
    let mut d = factory
        .restore_image(committed, &state, &Devices::default())
        .unwrap();
    let (faulted, total) = cycles(d.as_mut(), 30, "restored Kv");
    eprintln!("restored Kv: {total} pages copied, {faulted} in the fault path");
    assert!(faulted > 0, "no write fault copied a page");
}

#[test]
fn an_arm_completes_the_copy_before_it_and_a_dropped_copy_unprotects() {
    if !kvm_available() {
        return;
    }
    let mut s = spec(Workload::Kv, 32, 0);
    s.params.output_every = 64;
    s.params.doorbell_every = 16;
    let mut d = KvmFactory::new().create_kvm(&s).unwrap();
    let pages = page_count(s.memory_size);
    d.resume().unwrap();
    std::thread::sleep(Duration::from_millis(3));
    let (dirty1, ref1, first) = arm(&mut d, pages);
    d.resume().unwrap();
    std::thread::sleep(Duration::from_millis(3));
    // The next checkpoint comes before the first copy was completed.
    let (dirty2, ref2, second) = arm(&mut d, pages);
    d.resume().unwrap();
    check(&first.complete().unwrap(), &dirty1, &ref1, "first");
    check(&second.complete().unwrap(), &dirty2, &ref2, "second");
    // A copy dropped unfinished leaves no page protected: the guest goes on writing.
    std::thread::sleep(Duration::from_millis(3));
    let (_, _, third) = arm(&mut d, pages);
    drop(third);
    let p0 = d.status().unwrap().progress;
    run_until(&mut d, p0 + 5000, 5);
    d.check_health().unwrap();
    assert!(d.status().unwrap().progress >= p0 + 5000);
}

/// What arming costs: pages, protected runs, time (a measurement, not a check; run with
/// `--ignored --nocapture`).
#[test]
#[ignore]
fn measure_arming() {
    if !kvm_available() {
        return;
    }
    let s = spec(Workload::Npb, 256, 20_000);
    let mut d = KvmFactory::new().create_kvm(&s).unwrap();
    let pages = page_count(s.memory_size);
    d.resume().unwrap();
    for ms in [50u64, 100, 200, 400] {
        std::thread::sleep(Duration::from_millis(ms));
        d.pause().unwrap();
        let mut dirty = PageBitmap::new(pages);
        let t = std::time::Instant::now();
        d.harvest_dirty(&mut dirty).unwrap();
        let harvest = t.elapsed();
        let mut runs = 0;
        let mut last = None;
        for p in dirty.iter_set() {
            if last.is_none_or(|l| p > l + 9) {
                runs += 1;
            }
            last = Some(p);
        }
        let t = std::time::Instant::now();
        let pending = d.cow_memory().unwrap().arm(&dirty).unwrap();
        let arm = t.elapsed();
        d.resume().unwrap();
        let t = std::time::Instant::now();
        let c = pending.complete().unwrap();
        eprintln!(
            "{} pages in {runs} runs: harvest {harvest:?}, arm {arm:?} ({:.0} ns/page), copy behind {:?}, {} faulted",
            dirty.count(),
            arm.as_nanos() as f64 / dirty.count().max(1) as f64,
            t.elapsed(),
            c.faulted
        );
    }
}
