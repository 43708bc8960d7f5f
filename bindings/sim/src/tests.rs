//! Tests of the sim backend against an independent reference model of `docs/GUESTS.md`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::domain::{Devices, Domain, DomainError, DomainFactory, GuestSpec};
use ha_workloads::guest_abi::{
    GuestParams, GuestStatus, HEAP_GPA, OutputRecord, PARAMS_GPA, STATUS_GPA, Workload,
};

use crate::{SimDomain, SimFactory};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// Reference model: GUESTS.md as a plain function over a byte image.
// ---------------------------------------------------------------------------------------

/// The reference guest: the workloads' one model (`ha_workloads::model`) over a memory image.
use ha_workloads::model::ImageModel as Model;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn spec(
    workload: Workload,
    seed: u64,
    rate: u64,
    output_every: u64,
    doorbell_every: u64,
) -> GuestSpec {
    GuestSpec {
        memory_size: 4 * MIB,
        params: GuestParams {
            workload,
            seed,
            heap_gpa: HEAP_GPA,
            heap_size: 2 * MIB,
            rate,
            tsc_khz: 0,
            output_every,
            doorbell_every,
            disk_size: 0,
        },
        devices: Default::default(),
    }
}

fn read_all(d: &dyn Domain) -> Vec<u8> {
    let mut m = vec![0u8; d.memory_size() as usize];
    d.read_memory(0, &mut m).unwrap();
    m
}

fn harvest(d: &mut dyn Domain) -> PageBitmap {
    let mut b = PageBitmap::new((d.memory_size() / 4096) as usize);
    d.harvest_dirty(&mut b).unwrap();
    b
}

fn set_of(b: &PageBitmap) -> BTreeSet<usize> {
    b.iter_set().collect()
}

/// Run until progress reaches at least `min` (and at least `dur` has passed), then pause.
fn run_a_while(d: &mut dyn Domain, dur: Duration, min: u64) {
    d.resume().unwrap();
    let t = Instant::now();
    loop {
        std::thread::sleep(Duration::from_micros(200));
        if t.elapsed() >= dur && d.status().unwrap().progress >= min {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "guest makes no progress"
        );
    }
    d.pause().unwrap();
}

fn heap_pages(set: &BTreeSet<usize>) -> usize {
    set.iter().filter(|&&p| p as u64 * 4096 >= HEAP_GPA).count()
}

fn assert_contiguous(recs: &[OutputRecord], from: u64) {
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq, from + i as u64, "gap or repeat in output seqs");
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn every_workload_progresses_and_idle_writes_no_heap() {
    for w in Workload::MEMORY {
        let mut d = SimFactory::new().create(&spec(w, 11, 0, 0, 0)).unwrap();
        assert!(d.is_paused());
        assert_eq!(d.status().unwrap().progress, 0);
        run_a_while(d.as_mut(), Duration::from_millis(5), 200);
        d.check_health().unwrap();
        let st = d.status().unwrap();
        let dirty = set_of(&harvest(d.as_mut()));
        assert!(st.progress >= 200, "{w:?}");
        assert!(dirty.contains(&((STATUS_GPA / 4096) as usize)));
        assert!(
            dirty.contains(&((PARAMS_GPA / 4096) as usize)),
            "params page is a VMM write"
        );
        if w == Workload::Idle {
            assert_eq!(heap_pages(&dirty), 0, "idle dirtied heap pages");
        } else {
            assert!(heap_pages(&dirty) > 0, "{w:?} wrote no heap page");
            let mem = read_all(d.as_ref());
            assert!(mem[HEAP_GPA as usize..].iter().any(|&b| b != 0), "{w:?}");
        }
    }
}

#[test]
fn matches_reference_model() {
    for (w, oe, de) in [
        (Workload::Idle, 3, 4),
        (Workload::Memwrite, 1, 0), // ring fills: doorbell on full
        (Workload::Web, 2, 5),
        (Workload::Kv, 7, 1),
        (Workload::Npb, 5, 3),
    ] {
        let sp = spec(w, 0xC0FFEE + w as u64, 0, oe, de);
        let mut d = SimFactory::new().create(&sp).unwrap();
        // Several pause points from the same guest.
        let mut model = Model::fresh(sp.memory_size, &sp.params);
        let mut got = Vec::new();
        for round in 0..3 {
            run_a_while(d.as_mut(), Duration::from_millis(3), 1500 * (round + 1));
            let st = d.status().unwrap();
            model.run_to(st.progress);
            // Memory equal before any engine drain (doorbells are deterministic) ...
            assert_eq!(
                read_all(d.as_ref()),
                model.mem.bytes,
                "{w:?} at progress {}",
                st.progress
            );
            assert_eq!(st.checksum, model.cpu.checksum());
            // ... and after the engine's drain at the pause.
            d.drain_output(&mut got).unwrap();
            let rest = model.drain();
            model.drained.extend(rest);
            assert_eq!(read_all(d.as_ref()), model.mem.bytes);
            assert_eq!(got, model.drained, "{w:?} output");
        }
        assert_contiguous(&got, 0);
        if w != Workload::Idle {
            let n = model.cpu.progress();
            assert_eq!(got.len() as u64, n / oe);
        }
    }
}

#[test]
fn record_payload_is_progress_and_checksum() {
    let sp = spec(Workload::Kv, 5, 0, 4, 2);
    let mut d = SimDomain::create(&sp).unwrap();
    run_a_while(&mut d, Duration::from_millis(2), 100);
    let mut out = Vec::new();
    d.drain_output(&mut out).unwrap();
    let st = d.status().unwrap();
    assert_eq!(st.out_head, st.out_tail);
    assert_eq!(st.out_head, out.len() as u64);
    let last = out.last().unwrap();
    assert_eq!(last.payload.len(), 16);
    let progress = u64::from_le_bytes(last.payload[..8].try_into().unwrap());
    assert_eq!(progress, (last.seq + 1) * 4);
    assert_eq!(progress, st.progress - st.progress % 4);
}

/// Remus-style copying: a replica built only from harvested dirty pages always equals the
/// guest at a pause, and the paused harvest is exactly the set of pages the reference
/// model wrote. A page that is dirty but unchanged was written with the value it already
/// held (a write is a write for dirty tracking; the backend does not compare values).
/// With these workloads that essentially never happens: progress, rng, seqs and the
/// splitmix values all move; the test counts and reports such pages rather than assuming.
#[test]
fn no_lost_dirty_pages() {
    for (w, oe, de) in [
        (Workload::Memwrite, 1, 16),
        (Workload::Web, 3, 0),
        (Workload::Kv, 2, 7),
        (Workload::Npb, 1, 2),
        (Workload::Idle, 1, 1),
    ] {
        let sp = spec(w, 99, 0, oe, de);
        let mut d = SimFactory::new().create(&sp).unwrap();
        let mut model = Model::fresh(sp.memory_size, &sp.params);
        let pages = (sp.memory_size / 4096) as usize;
        let mut replica = vec![0u8; sp.memory_size as usize];
        let mut prev = replica.clone();
        let mut identical = 0usize;
        let mut out = Vec::new();
        for cycle in 0..25 {
            d.resume().unwrap();
            // Copy while running: the content may be torn, the page will come back dirty.
            let mut cycle_dirty = PageBitmap::new(pages);
            for _ in 0..2 {
                std::thread::sleep(Duration::from_micros(300));
                let b = harvest(d.as_mut());
                for p in b.iter_set() {
                    d.read_memory(p as u64 * 4096, &mut replica[p * 4096..][..4096])
                        .unwrap();
                }
                cycle_dirty.or_assign(&b);
            }
            d.pause().unwrap();
            if cycle % 3 == 1 {
                // An engine drain at the pause: a VMM write into the status page.
                d.drain_output(&mut out).unwrap();
            }
            let b = harvest(d.as_mut());
            for p in b.iter_set() {
                d.read_memory(p as u64 * 4096, &mut replica[p * 4096..][..4096])
                    .unwrap();
            }
            cycle_dirty.or_assign(&b);
            let now = read_all(d.as_ref());
            assert!(
                replica == now,
                "{w:?} cycle {cycle}: replica misses a write"
            );

            let st = d.status().unwrap();
            model.run_to(st.progress);
            if cycle % 3 == 1 {
                let recs = model.drain();
                model.drained.extend(recs);
            }
            assert!(
                model.mem.bytes == now,
                "{w:?} cycle {cycle}: model diverged"
            );
            let dirty = set_of(&cycle_dirty);
            assert_eq!(
                dirty,
                model.mem.take_written(),
                "{w:?} cycle {cycle}: dirty != written"
            );
            for p in 0..pages {
                let changed = prev[p * 4096..][..4096] != now[p * 4096..][..4096];
                if changed {
                    assert!(dirty.contains(&p), "{w:?}: changed page {p} not dirty");
                } else if dirty.contains(&p) {
                    identical += 1;
                }
            }
            prev = now;
        }
        assert_eq!(out, model.drained[..out.len()]);
        // The replica is a checkpoint: a guest restored from it continues from the pause.
        let state = d.save_state().unwrap();
        let mut r = SimFactory::new()
            .restore(&replica, &state, &Devices::default())
            .unwrap();
        assert_eq!(r.status().unwrap(), d.status().unwrap());
        run_a_while(r.as_mut(), Duration::ZERO, model.cpu.progress() + 50);
        model.run_to(r.status().unwrap().progress);
        assert_eq!(
            r.status().unwrap().checksum,
            model.cpu.checksum(),
            "{w:?}: after restore"
        );
        // Written-with-identical-value pages: none expected with these workloads.
        assert_eq!(
            identical, 0,
            "{w:?}: {identical} dirty pages were rewritten unchanged"
        );
    }
}

#[test]
fn pause_stops_writes() {
    let mut d = SimFactory::new()
        .create(&spec(Workload::Web, 3, 0, 1, 1))
        .unwrap();
    run_a_while(d.as_mut(), Duration::from_millis(3), 100);
    assert!(d.is_paused());
    let _ = harvest(d.as_mut());
    let before = read_all(d.as_ref());
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(harvest(d.as_mut()).count(), 0);
    assert!(read_all(d.as_ref()) == before);
    // Pause twice and resume/pause quickly: still parked at a boundary each time.
    d.pause().unwrap();
    for _ in 0..50 {
        d.resume().unwrap();
        d.pause().unwrap();
        let st = d.status().unwrap();
        let m = read_all(d.as_ref());
        std::thread::sleep(Duration::from_micros(100));
        assert_eq!(d.status().unwrap(), st);
        assert!(read_all(d.as_ref()) == m);
    }
    d.check_health().unwrap();
}

#[test]
fn save_state_needs_pause() {
    let mut d = SimFactory::new()
        .create(&spec(Workload::Idle, 3, 0, 0, 0))
        .unwrap();
    d.resume().unwrap();
    assert!(!d.is_paused());
    assert!(matches!(
        d.save_state(),
        Err(DomainError::WrongState {
            op: "save_state",
            needs: "paused"
        })
    ));
    d.pause().unwrap();
    let blob = d.save_state().unwrap();
    assert!(crate::state::SavedState::decode(&blob).is_ok(), "{blob:?}");
}

/// Save at a pause, copy memory there, let the original keep running, restore a second
/// guest from the copy: both continue the same sequence (progress, checksum, records) with
/// no gap and no repeat, and the restored one matches the model continued from the copy
/// and the model run from scratch.
#[test]
fn save_restore_continues() {
    for w in [Workload::Kv, Workload::Web, Workload::Npb] {
        let sp = spec(w, 77, 0, 3, 4);
        let f = SimFactory::new();
        let mut a = f.create(&sp).unwrap();
        run_a_while(a.as_mut(), Duration::from_millis(3), 1000);
        let mut before = Vec::new();
        a.drain_output(&mut before).unwrap();
        let state = a.save_state().unwrap();
        let image = read_all(a.as_ref());
        let at = a.status().unwrap();
        // The original keeps running while the backup restores from the copy.
        a.resume().unwrap();
        let mut b = f.restore(&image, &state, &Devices::default()).unwrap();
        assert!(b.is_paused());
        assert_eq!(b.status().unwrap(), at);
        assert_eq!(
            harvest(b.as_mut()).count(),
            0,
            "restore itself dirties nothing"
        );
        run_a_while(b.as_mut(), Duration::from_millis(3), at.progress + 1000);
        a.pause().unwrap();

        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        a.drain_output(&mut out_a).unwrap();
        b.drain_output(&mut out_b).unwrap();
        assert_contiguous(&before, 0);
        assert_contiguous(&out_a, at.out_head);
        assert_contiguous(&out_b, at.out_head);
        let common = out_a.len().min(out_b.len());
        assert_eq!(
            out_a[..common],
            out_b[..common],
            "re-produced records differ"
        );

        let sb = b.status().unwrap();
        assert!(sb.progress > at.progress);
        let mut cont = Model::from_image(image.clone()).expect("a guest image");
        cont.run_to(sb.progress);
        let recs = cont.drain();
        cont.drained.extend(recs);
        assert!(
            read_all(b.as_ref()) == cont.mem.bytes,
            "{w:?}: restored guest diverged"
        );
        assert_eq!(out_b, cont.drained);
        let mut scratch = Model::fresh(sp.memory_size, &sp.params);
        scratch.run_to(sb.progress);
        assert_eq!(scratch.cpu.checksum(), sb.checksum);
        let all: Vec<_> = scratch.drain();
        let all: Vec<_> = scratch.drained.iter().cloned().chain(all).collect();
        let joined: Vec<_> = before.iter().chain(&out_b).cloned().collect();
        assert_eq!(joined, all);

        // Restoring again from the restored guest's own save point works the same way.
        let st2 = b.save_state().unwrap();
        let img2 = read_all(b.as_ref());
        let mut c = SimDomain::restore(&img2, &st2, &Devices::default()).unwrap();
        run_a_while(&mut c, Duration::from_millis(1), sb.progress + 10);
        let mut out_c = Vec::new();
        c.drain_output(&mut out_c).unwrap();
        assert_contiguous(&out_c, sb.out_head);
    }
}

/// Run a paced guest for about `ms` and check it did not outrun `rate` (strict: one unit
/// per interval plus the immediate first one) and was not far below it (loose, a fifth: the
/// machine may be loaded).
fn paced_run(d: &mut SimDomain, rate: u64, ms: u64) -> u64 {
    let before = d.status().unwrap().progress;
    let t = Instant::now();
    d.resume().unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    d.pause().unwrap();
    let elapsed = t.elapsed();
    let units = d.status().unwrap().progress - before;
    let max = (elapsed.as_nanos() * u128::from(rate) / 1_000_000_000) as u64 + 2;
    let min = ms * rate / 5000;
    assert!(
        (min..=max).contains(&units),
        "{rate}/s for {elapsed:?} gave {units} units (expected {min}..={max})"
    );
    units
}

#[test]
fn pacing_holds_the_rate_and_survives_restore() {
    let sp = spec(Workload::Memwrite, 1, 2000, 0, 0);
    let mut d = SimDomain::create(&sp).unwrap();
    paced_run(&mut d, 2000, 100);
    let state = d.save_state().unwrap();
    let saved = crate::state::SavedState::decode(&state).unwrap();
    assert!(saved.pacing_age.is_some(), "pacing timestamp saved");
    let image = read_all(&d);
    let mut r = SimDomain::restore(&image, &state, &Devices::default()).unwrap();
    paced_run(&mut r, 2000, 50);
    // A pause during the pacing wait returns promptly.
    let mut slow = SimDomain::create(&spec(Workload::Kv, 1, 2, 0, 0)).unwrap();
    slow.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    slow.pause().unwrap();
    assert!(t.elapsed() < Duration::from_millis(100));
    assert_eq!(slow.status().unwrap().progress, 1);
}

#[test]
fn restore_rejects_bad_input() {
    let sp = spec(Workload::Kv, 8, 0, 1, 1);
    let f = SimFactory::new();
    let mut d = f.create(&sp).unwrap();
    run_a_while(d.as_mut(), Duration::from_millis(1), 10);
    let state = d.save_state().unwrap();
    let image = read_all(d.as_ref());

    match f.restore(&image[..image.len() - 4096], &state, &Devices::default()) {
        Err(DomainError::ImageSize { got, expected }) => {
            assert_eq!((got, expected), (4 * MIB - 4096, 4 * MIB));
        }
        other => panic!("expected ImageSize, got {:?}", other.map(|_| ())),
    }
    let mut bigger = image.clone();
    bigger.extend_from_slice(&[0; 4096]);
    assert!(matches!(
        f.restore(&bigger, &state, &Devices::default()),
        Err(DomainError::ImageSize { .. })
    ));

    let bad = |s: &[u8]| match f.restore(&image, s, &Devices::default()) {
        Err(DomainError::BadState(msg)) => msg,
        other => panic!("expected BadState, got {:?}", other.map(|_| ())),
    };
    let mut s = state.clone();
    s[0] ^= 1;
    assert!(bad(&s).contains("magic"));
    let mut s = state.clone();
    s[8] = 9;
    assert!(bad(&s).contains("version"));
    let mut s = state.clone();
    s[20] ^= 0x10; // memory size bit: caught by the integrity check
    assert!(bad(&s).contains("integrity"));
    assert!(bad(&state[..state.len() - 1]).contains("bytes"));
    let mut long = state.clone();
    long.push(0);
    assert!(bad(&long).contains("bytes"));
    assert!(bad(&[]).contains("bytes"));

    // An image whose params page is not a guest's.
    let mut img = image.clone();
    img[PARAMS_GPA as usize] ^= 0xFF;
    assert!(bad_image(&f, &img, &state).contains("params"));

    // The valid pair still restores.
    let r = f.restore(&image, &state, &Devices::default()).unwrap();
    assert_eq!(r.status().unwrap(), d.status().unwrap());
}

fn bad_image(f: &SimFactory, img: &[u8], state: &[u8]) -> String {
    match f.restore(img, state, &Devices::default()) {
        Err(DomainError::BadState(msg)) => msg,
        other => panic!("expected BadState, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn create_rejects_bad_specs() {
    let f = SimFactory::new();
    let mut sp = spec(Workload::Kv, 1, 0, 0, 0);
    sp.params.heap_size = 4 * MIB;
    assert!(matches!(f.create(&sp), Err(DomainError::OutOfRange { .. })));
    let mut sp = spec(Workload::Web, 1, 0, 0, 0);
    sp.params.heap_size = 15 * 4096;
    assert!(matches!(f.create(&sp), Err(DomainError::Backend { .. })));
    let mut sp = spec(Workload::Kv, 1, 0, 0, 0);
    sp.params.heap_gpa = 0x8000;
    assert!(matches!(f.create(&sp), Err(DomainError::Backend { .. })));
    let mut d = f.create(&spec(Workload::Idle, 1, 0, 0, 0)).unwrap();
    let mut small = PageBitmap::new(3);
    assert!(matches!(
        d.harvest_dirty(&mut small),
        Err(DomainError::Backend { .. })
    ));
    let mut buf = [0u8; 16];
    assert!(matches!(
        d.read_memory(4 * MIB - 8, &mut buf),
        Err(DomainError::OutOfRange { .. })
    ));
    d.read_memory(PARAMS_GPA + 3, &mut buf[..5]).unwrap();
    assert_eq!(&buf[..5], &b"CASTORG1"[3..8]);
    assert_eq!(f.name(), "sim");
}

#[test]
fn drop_stops_the_thread() {
    let d = SimDomain::create(&spec(Workload::Npb, 1, 0, 0, 0)).unwrap();
    let probe = d.liveness_probe();
    let mut b: Box<dyn Domain> = Box::new(d);
    b.resume().unwrap();
    std::thread::sleep(Duration::from_millis(2));
    drop(b);
    assert!(
        probe.upgrade().is_none(),
        "vCPU thread still holds the guest"
    );
    // Dropping a never-started guest too.
    let d = SimDomain::create(&spec(Workload::Idle, 1, 0, 0, 0)).unwrap();
    let probe = d.liveness_probe();
    drop(d);
    assert!(probe.upgrade().is_none());
}

#[test]
fn status_reads_the_status_page() {
    let d = SimDomain::create(&spec(Workload::Idle, 1, 0, 0, 0)).unwrap();
    assert_eq!(d.status().unwrap(), GuestStatus::default());
    assert_eq!(d.params().unwrap(), spec(Workload::Idle, 1, 0, 0, 0).params);
}

/// The `web` calibration of docs/GUESTS.md, recomputed from the reference model: at the
/// default rate and heap of a 256 MiB guest, 20 windows of 100 ms (`rate / 10` units each)
/// dirty 200–500 heap pages per window with a median of 4–8 changed 64-byte blocks per
/// dirty page and a heavy tail (at least a fifth of the pages with 16 or more). Blocks are
/// counted the way a VMM would: by comparing each dirty page with its copy at the window
/// before.
#[test]
fn web_calibration_matches_the_httpd_targets() {
    let memory_size = 256 * MIB;
    let w = Workload::Web;
    let sp = GuestSpec {
        memory_size,
        params: GuestParams {
            workload: w,
            seed: 1,
            heap_gpa: HEAP_GPA,
            heap_size: w.default_heap(memory_size),
            rate: w.default_rate(),
            tsc_khz: 0,
            output_every: 0,
            doorbell_every: 0,
            disk_size: 0,
        },
        devices: Default::default(),
    };
    let mut model = Model::fresh(sp.memory_size, &sp.params);
    model.mem.take_written();
    let mut prev = model.mem.bytes.clone();
    let units = sp.params.rate / 10;
    let heap =
        (HEAP_GPA as usize / PAGE_SIZE)..((HEAP_GPA + sp.params.heap_size) as usize / PAGE_SIZE);
    let (mut dirty, mut blocks) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        model.run_to(model.cpu.progress() + units);
        let pages: Vec<usize> = model
            .mem
            .take_written()
            .into_iter()
            .filter(|p| heap.contains(p))
            .collect();
        dirty.push(pages.len());
        for p in pages {
            let range = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
            let changed = prev[range.clone()]
                .chunks(64)
                .zip(model.mem.bytes[range.clone()].chunks(64))
                .filter(|(a, b)| a != b)
                .count();
            blocks.push(changed);
            prev[range.clone()].copy_from_slice(&model.mem.bytes[range]);
        }
    }
    dirty.sort_unstable();
    blocks.sort_unstable();
    let median_dirty = dirty[dirty.len() / 2];
    let median_blocks = blocks[blocks.len() / 2];
    let mean = blocks.iter().sum::<usize>() as f64 / blocks.len() as f64;
    let tail = blocks.iter().filter(|&&b| b >= 16).count() as f64 / blocks.len() as f64;
    eprintln!(
        "web model, 256 MiB at {} units/s: dirty pages per 100 ms median {median_dirty} \
         ({}..{}), changed blocks per dirty page median {median_blocks}, mean {mean:.1}, \
         16+ {:.0} %",
        sp.params.rate,
        dirty[0],
        dirty[dirty.len() - 1],
        tail * 100.0
    );
    assert!((200..=500).contains(&median_dirty), "{dirty:?}");
    assert!((4..=8).contains(&median_blocks), "median {median_blocks}");
    assert!(
        tail >= 0.2,
        "only {:.0} % of the pages have 16+ blocks",
        tail * 100.0
    );
    assert!(
        blocks.iter().all(|&b| b > 0),
        "a written heap page did not change"
    );
}

// ---------------------------------------------------------------------------------------
// The disk
// ---------------------------------------------------------------------------------------

/// A zero disk image of `pages` 4 KiB pages in a fresh temporary directory.
fn disk_file(pages: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(pages * 4096)
        .unwrap();
    (dir, path)
}

fn db_spec(disk: &std::path::Path) -> GuestSpec {
    let mut s = spec(Workload::Db, 0xD15C, 0, 48, 8);
    s.devices.disk = Some(disk.to_owned());
    s
}

/// A disk workload's guest against the model, over three pause points: memory, disk and
/// the drained writes replayed on the disk as it was created.
fn disk_guest_matches_the_model(sp: &GuestSpec, path: &std::path::Path) {
    let created = std::fs::read(path).unwrap();
    let mut replica = created.clone();
    let mut d = SimFactory::new().create(sp).unwrap();
    assert_eq!(d.disk().unwrap().disk_size(), created.len() as u64);
    let mut params = sp.params.clone();
    params.disk_size = created.len() as u64;
    let mut model = Model::fresh(sp.memory_size, &params);
    assert!(model.disk == created, "the disk is the model's fresh disk");
    for round in 1..=3 {
        run_a_while(d.as_mut(), Duration::from_millis(3), 700 * round);
        let st = d.status().unwrap();
        // The epoch's writes, applied to a replica, give the disk the guest has.
        let mut writes = Vec::new();
        d.disk().unwrap().drain_writes(&mut writes).unwrap();
        assert!(!writes.is_empty(), "round {round}: no disk writes");
        for w in &writes {
            let at = w.offset as usize;
            replica[at..at + w.data.len()].copy_from_slice(&w.data);
        }
        let mut disk = vec![0u8; replica.len()];
        d.disk().unwrap().read_at(0, &mut disk).unwrap();
        assert!(disk == std::fs::read(path).unwrap());
        assert!(disk == replica, "round {round}: drained writes miss some");
        // Paused at a unit boundary: memory and disk are the model's after as many units.
        model.run_to(st.progress);
        assert!(
            disk == model.disk,
            "round {round}: disk differs from the model"
        );
        let mem = read_all(d.as_ref());
        let heap = HEAP_GPA as usize..(HEAP_GPA + sp.params.heap_size) as usize;
        assert!(
            mem[heap.clone()] == model.mem.bytes[heap],
            "round {round}: heap"
        );
        assert_eq!(st.disk_errors, 0);
    }
}

#[test]
fn db_disk_matches_the_model_and_its_drained_writes() {
    let (_dir, path) = disk_file(24);
    disk_guest_matches_the_model(&db_spec(&path), &path);
}

#[test]
fn files_serves_its_tree_like_the_model() {
    let (_dir, path) = disk_file(256);
    let mut sp = spec(Workload::Files, 0xF1E5, 0, 16, 8);
    sp.devices.disk = Some(path.clone());
    let mut img = std::fs::read(&path).unwrap();
    ha_workloads::files::format_disk(
        sp.params.seed,
        sp.params.heap_size,
        img.len() as u64,
        |at, b| {
            img[at as usize..at as usize + b.len()].copy_from_slice(b);
            Ok::<(), ()>(())
        },
    )
    .unwrap()
    .unwrap();
    std::fs::write(&path, &img).unwrap();
    disk_guest_matches_the_model(&sp, &path);
}

#[test]
fn db_restores_on_a_replica_and_refuses_a_wrong_one() {
    let (dir, path) = disk_file(24);
    let mut d = SimFactory::new().create(&db_spec(&path)).unwrap();
    run_a_while(d.as_mut(), Duration::from_millis(3), 1000);
    let (image, state) = (read_all(d.as_ref()), d.save_state().unwrap());
    let progress = d.status().unwrap().progress;
    let replica = dir.path().join("replica.img");
    std::fs::copy(&path, &replica).unwrap();
    drop(d);

    let devices = Devices {
        disk: Some(replica.clone()),
    };
    let mut r = SimFactory::new().restore(&image, &state, &devices).unwrap();
    run_a_while(r.as_mut(), Duration::from_millis(3), progress + 1000);
    let st = r.status().unwrap();
    assert_eq!(st.disk_errors, 0);
    let mut model = Model::from_image(image.clone())
        .unwrap()
        .with_disk(std::fs::read(&path).unwrap());
    model.run_to(st.progress);
    assert!(std::fs::read(&replica).unwrap() == model.disk);

    let err = |devices: &Devices| match SimFactory::new().restore(&image, &state, devices) {
        Ok(_) => panic!("restored"),
        Err(e) => chain(&e),
    };
    let short = dir.path().join("short.img");
    std::fs::File::create(&short)
        .unwrap()
        .set_len(8 * 4096)
        .unwrap();
    let e = err(&Devices { disk: Some(short) });
    assert!(e.contains("98304") && e.contains("32768"), "{e}");
    let e = err(&Devices::default());
    assert!(e.contains("98304 bytes"), "{e}");
    let e = err(&Devices {
        disk: Some(dir.path().join("missing.img")),
    });
    assert!(e.contains("missing.img"), "{e}");
}

#[test]
fn db_without_a_disk_is_refused() {
    let e = SimFactory::new()
        .create(&spec(Workload::Db, 1, 0, 48, 8))
        .err()
        .expect("created");
    let e = chain(&e);
    assert!(e.contains("needs a disk"), "{e}");
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s = format!("{s}: {c}");
        cur = c.source();
    }
    s
}
