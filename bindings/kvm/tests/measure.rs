//! Measurements of the KVM backend on this machine (not a pass/fail test):
//! `cargo test -p ha-kvm --release --test measure -- --ignored --nocapture`

mod common;

use std::time::{Duration, Instant};

use common::*;
use ha_common::bitmap::PageBitmap;
use ha_common::domain::Domain;
use ha_common::guest_abi::{Workload, page_count};
use ha_kvm::KvmFactory;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let n = v.len();
    let mean = v.iter().sum::<Duration>() / n as u32;
    format!(
        "mean {:.1} us, p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        us(mean),
        us(v[n / 2]),
        us(v[n * 99 / 100]),
        us(v[n - 1])
    )
}

#[test]
#[ignore]
fn measure() {
    if !kvm_available() {
        return;
    }
    // Pause latency: kick -> parked, guest running memwrite unthrottled.
    {
        let mut d = start(&spec(Workload::Memwrite, 64, 0));
        let mut lat = Vec::new();
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            d.pause().unwrap();
            lat.push(t.elapsed());
            d.resume().unwrap();
        }
        println!("pause latency (kick -> parked), 200 pauses: {}", stats(lat));
    }

    // KVM_GET_DIRTY_LOG (+ VMM bitmap) on 256 MiB and 1 GiB guests.
    for mib in [256u64, 1024] {
        for w in [Workload::Idle, Workload::Memwrite] {
            let s = spec(w, mib, 0);
            let mut d = start(&s);
            std::thread::sleep(Duration::from_millis(100));
            d.pause().unwrap();
            let pages = page_count(s.memory_size);
            let mut times = Vec::new();
            let mut counts = Vec::new();
            for _ in 0..10 {
                d.resume().unwrap();
                std::thread::sleep(Duration::from_millis(20));
                d.pause().unwrap();
                let mut b = PageBitmap::new(pages);
                let t = Instant::now();
                d.harvest_dirty(&mut b).unwrap();
                times.push(t.elapsed());
                counts.push(b.count());
            }
            println!(
                "harvest_dirty {mib} MiB {w:?} (20 ms runs, dirty pages {counts:?}): {}",
                stats(times)
            );
        }
    }

    // save_state / restore time and size.
    {
        let s = spec(Workload::Kv, 256, 0);
        let mut d = start(&s);
        std::thread::sleep(Duration::from_millis(100));
        d.pause().unwrap();
        let mut save = Vec::new();
        let mut state = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            state = d.save_state().unwrap();
            save.push(t.elapsed());
        }
        println!("save_state: {} bytes; {}", state.len(), stats(save));
        let image = snapshot(&d);
        let f = KvmFactory::new();
        let mut restore = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let r = f.restore_kvm(&image, &state).unwrap();
            restore.push(t.elapsed());
            drop(r);
        }
        println!(
            "restore (256 MiB image, kv heap touched, incl. VM creation + image copy): {}",
            stats(restore)
        );
        let zero = vec![0u8; image.len()];
        let t = Instant::now();
        let r = f.restore_kvm(&zero, &state).unwrap();
        println!(
            "restore with an all-zero 256 MiB image (VM + vCPU state only): {:.2} ms",
            ms(t.elapsed())
        );
        drop(r);
    }

    // Progress rate with dirty logging on (harvest every 100 ms) vs off, rate 0; npb also
    // on a 32 MiB guest whose first sweep ends within the warm-up.
    let cases = Workload::ALL
        .iter()
        .map(|w| (*w, 256))
        .chain([(Workload::Npb, 32)]);
    for (w, mib) in cases {
        let mut rates = Vec::new();
        for log in [true, false] {
            let s = spec(w, mib, 0);
            let mut d = KvmFactory::new()
                .with_dirty_log(log)
                .create_kvm(&s)
                .unwrap();
            let pages = page_count(s.memory_size);
            d.resume().unwrap();
            std::thread::sleep(Duration::from_millis(300)); // warm up: first touches
            d.pause().unwrap();
            let mut b = PageBitmap::new(pages);
            d.harvest_dirty(&mut b).unwrap();
            let p0 = d.status().unwrap().progress;
            let t = Instant::now();
            let mut dirty = Vec::new();
            for _ in 0..10 {
                d.resume().unwrap();
                std::thread::sleep(Duration::from_millis(100));
                d.pause().unwrap();
                let mut b = PageBitmap::new(pages);
                d.harvest_dirty(&mut b).unwrap();
                dirty.push(b.count());
            }
            let units = d.status().unwrap().progress - p0;
            rates.push(units as f64 / t.elapsed().as_secs_f64());
            if log {
                dirty.sort();
                println!(
                    "{w:?} {mib} MiB rate 0: dirty pages per 100 ms: median {} (min {}, max {})",
                    dirty[5], dirty[0], dirty[9]
                );
            }
        }
        println!(
            "{w:?} {mib} MiB rate 0: {:.0} units/s with dirty log, {:.0} without ({:.1}x)",
            rates[0],
            rates[1],
            rates[1] / rates[0]
        );
    }

    // Dirty pages per 100 ms at a paced rate of 100 000 units/s (256 MiB guest).
    for w in Workload::ALL {
        let s = spec(w, 256, 100_000);
        let mut d = start(&s);
        std::thread::sleep(Duration::from_millis(200));
        let pages = page_count(s.memory_size);
        d.pause().unwrap();
        d.harvest_dirty(&mut PageBitmap::new(pages)).unwrap();
        let mut dirty = Vec::new();
        for _ in 0..10 {
            d.resume().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            d.pause().unwrap();
            let mut b = PageBitmap::new(pages);
            d.harvest_dirty(&mut b).unwrap();
            dirty.push(b.count());
        }
        dirty.sort();
        println!(
            "{w:?} 256 MiB rate 100k/s: dirty pages per 100 ms: median {} (min {}, max {})",
            dirty[5], dirty[0], dirty[9]
        );
    }
}
