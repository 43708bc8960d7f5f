//! `xen-selftest`: checks of Castor's Xen backend against a real hypervisor, run in dom0
//! (the rig in tests/xen-rig runs them against its PVH domU). Each check prints verdict
//! lines `CASTOR-TEST <name> PASS|FAIL <detail>` and the exit status is 1 if any failed.
//!
//! ```text
//! xen-selftest size DOMAIN          print the memory size Castor uses (for ha-backup --memory)
//! xen-selftest info DOMAIN          what Castor sees of the domain (memory size, frames)
//! xen-selftest pause DOMAIN         paused, the domain's memory does not change; running, it does
//! xen-selftest dirty DOMAIN [ROUNDS] every frame that changed between two harvests is in
//!                                   the dirty log (compared with copies made through
//!                                   foreign mapping)
//! xen-selftest save DOMAIN          the state blob saves and decodes (HVM context, params, TSC)
//! xen-selftest shadow DOMAIN [ROUNDS] a copy kept only from harvests (as the backup's
//!                                   image is) equals what every 5th checkpoint reads, the
//!                                   guest held as ha-primary holds it (suspended)
//! xen-selftest resume DOMAIN        not a check: a domain that suspended itself and was
//!                                   left so (by a toolstack that gave up) goes on
//! ```

use ha_daemon::error_chain as chain;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::domain::{Domain, DomainError};
use ha_xen::XenDomain;
use ha_xen::state::SavedState;

/// A verdict printer that remembers failures.
#[derive(Debug, Default)]
struct Verdicts {
    failed: bool,
}

impl Verdicts {
    fn report(&mut self, name: &str, ok: bool, detail: &str) {
        println!(
            "CASTOR-TEST {name} {} {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        self.failed |= !ok;
    }
}

/// A frame's fingerprint, None for a hole.
type Print = Option<[u8; 16]>;

/// A fingerprint of every frame (None: a hole) and the number of populated frames.
fn fingerprints(d: &XenDomain) -> Result<(Vec<Print>, usize), DomainError> {
    let mut out = Vec::with_capacity(usize::try_from(d.p2m_pages()).unwrap_or(0));
    let mut populated = 0;
    d.for_each_frame(0..d.p2m_pages(), |_, f| {
        out.push(f.map(|page| {
            populated += 1;
            let h = blake3::hash(page);
            let mut x = [0u8; 16];
            x.copy_from_slice(&h.as_bytes()[..16]);
            x
        }));
    })?;
    Ok((out, populated))
}

fn changed(a: &[Print], b: &[Print]) -> Vec<usize> {
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect()
}

fn info(d: &XenDomain, v: &mut Verdicts) -> Result<(), DomainError> {
    let i = d.info()?;
    let t = Instant::now();
    let (fp, populated) = fingerprints(d)?;
    let first_hole = fp.iter().position(Option::is_none).unwrap_or(fp.len());
    let high: Vec<String> = fp
        .iter()
        .enumerate()
        .skip(first_hole)
        .filter(|(_, f)| f.is_some())
        .map(|(g, _)| format!("{g:#x}"))
        .take(24)
        .collect();
    println!(
        "xen-selftest: domain {} hvm={} nr_pages={} p2m_pages={:#x} windows={} ({:x?}) \
         memory_size={} ({} MiB) populated={} ram_below={:#x} frames_above_ram={} scan_ms={}",
        d.domid(),
        i.hvm,
        i.nr_pages,
        d.p2m_pages(),
        d.windows().len(),
        &d.windows()[d.windows().len().saturating_sub(4)..],
        d.memory_size(),
        d.memory_size() >> 20,
        populated,
        first_hole,
        high.join(","),
        t.elapsed().as_millis()
    );
    // Every populated frame lies in a kept window.
    let outside = fp
        .iter()
        .enumerate()
        .filter(|(g, f)| f.is_some() && d.page_of(*g as u64).is_none())
        .count();
    v.report(
        "xen-info",
        populated > 0 && outside == 0 && d.memory_size().is_multiple_of(2 << 20),
        &format!(
            "memory_size {} ({} windows of 2 MiB), populated {populated} frames, {outside} \
             outside the windows, scan {} ms",
            d.memory_size(),
            d.windows().len(),
            t.elapsed().as_millis()
        ),
    );
    Ok(())
}

fn pause(d: &mut XenDomain, v: &mut Verdicts) -> Result<(), DomainError> {
    // Running, the memory changes (otherwise the paused check below proves nothing).
    let (a, _) = fingerprints(d)?;
    std::thread::sleep(Duration::from_secs(2));
    let (b, _) = fingerprints(d)?;
    let running = changed(&a, &b).len();
    v.report(
        "xen-running-changes",
        running > 0,
        &format!("{running} frames changed in 2 s while running"),
    );
    let t = Instant::now();
    d.pause()?;
    let pause_us = t.elapsed().as_micros();
    let paused_flag = d.info()?.paused;
    let (p1, _) = fingerprints(d)?;
    std::thread::sleep(Duration::from_secs(2));
    let (p2, _) = fingerprints(d)?;
    let diff = changed(&p1, &p2);
    d.resume()?;
    v.report(
        "xen-pause-stops",
        diff.is_empty() && paused_flag && running > 0,
        &format!(
            "{} frames changed in 2 s while paused (xc_domain_pause took {pause_us} us, \
             Xen says paused={paused_flag}); first: {:x?}",
            diff.len(),
            &diff[..diff.len().min(8)]
        ),
    );
    std::thread::sleep(Duration::from_secs(1));
    let (r, _) = fingerprints(d)?;
    let after = changed(&p2, &r).len();
    v.report(
        "xen-resume-runs",
        after > 0 && !d.info()?.paused,
        &format!("{after} frames changed in 1 s after resume"),
    );
    Ok(())
}

fn dirty(d: &mut XenDomain, v: &mut Verdicts, rounds: usize) -> Result<(), DomainError> {
    let pages = usize::try_from(d.memory_size() / PAGE_SIZE as u64).unwrap_or(0);
    let mut bitmap = PageBitmap::new(pages);
    // attach() left log-dirty on (it learned the frames Xen writes behind the log): start
    // over, so the first harvest is a fresh enable.
    d.stop_dirty_log()?;
    d.pause()?;
    d.harvest_dirty(&mut bitmap)?; // log-dirty on; the first harvest reports everything
    let all = bitmap.count();
    let (mut before, _) = fingerprints(d)?;
    d.resume()?;
    v.report(
        "xen-logdirty-enable",
        all == pages,
        &format!("first harvest reported {all} pages of {pages}"),
    );
    for round in 1..=rounds {
        std::thread::sleep(Duration::from_millis(700));
        d.pause()?;
        bitmap.clear();
        let t = Instant::now();
        d.harvest_dirty(&mut bitmap)?;
        let harvest_us = t.elapsed().as_micros();
        let (after, _) = fingerprints(d)?;
        d.resume()?;
        let diff = changed(&before, &after);
        let missed: Vec<usize> = diff
            .iter()
            .copied()
            .filter(|&g| {
                !d.page_of(g as u64)
                    .is_some_and(|p| bitmap.get(usize::try_from(p).unwrap_or(usize::MAX)))
            })
            .collect();
        v.report(
            &format!("xen-dirty-log-round{round}"),
            missed.is_empty() && !diff.is_empty(),
            &format!(
                "{} frames changed, {} reported dirty ({} of them written by Xen behind \
                 its log, learned at attach), {} changed but not reported (harvest \
                 {harvest_us} us); missed: {:x?}",
                diff.len(),
                bitmap.count(),
                d.hidden_frames().len(),
                missed.len(),
                &missed[..missed.len().min(8)]
            ),
        );
        before = after;
    }
    d.stop_dirty_log()?;
    Ok(())
}

/// The engine's view, emulated: a shadow copy kept up to date from the dirty log only
/// (like the backup's image), compared with the domain's memory every few rounds while
/// paused. Names the frames that changed behind the dirty log.
fn shadow(d: &mut XenDomain, v: &mut Verdicts, rounds: usize) -> Result<(), DomainError> {
    use std::collections::BTreeMap;
    let pages = usize::try_from(d.memory_size() / PAGE_SIZE as u64).unwrap_or(0);
    let mut bitmap = PageBitmap::new(pages);
    let mut shadow: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut page = vec![0u8; PAGE_SIZE];
    // Like the engine's pre-copy: tracking on, then every frame read while the guest runs.
    d.harvest_dirty(&mut bitmap)?;
    for p in 0..d.memory_size() / PAGE_SIZE as u64 {
        d.read_memory(p * PAGE_SIZE as u64, &mut page)?;
        if page.iter().any(|&b| b != 0) {
            shadow.insert(d.gfn_of(p), page.clone());
        }
    }
    let mut behind = std::collections::BTreeSet::new();
    for round in 1..=rounds {
        std::thread::sleep(Duration::from_millis(100));
        d.pause()?;
        bitmap.clear();
        d.harvest_dirty(&mut bitmap)?;
        for p in bitmap.iter_set() {
            d.read_memory(p as u64 * PAGE_SIZE as u64, &mut page)?;
            shadow.insert(d.gfn_of(p as u64), page.clone());
        }
        if round % 5 == 0 || round == rounds {
            // What the engine's digest would read (frames written behind the log come from
            // the harvest's snapshot) must equal the shadow; the raw frames may differ only
            // in those.
            let hidden = d.hidden_frames().to_vec();
            let mut bad = Vec::new();
            let mut raw_only = 0usize;
            let mut truth = Vec::new();
            d.for_each_frame(0..d.p2m_pages(), |g, f| {
                truth.push((g, f.map(<[u8]>::to_vec)));
            })?;
            for (g, f) in truth {
                let old = shadow.get(&g).map_or(&[0u8; PAGE_SIZE][..], |p| &p[..]);
                match d.page_of(g) {
                    Some(p) => d.read_memory(p * PAGE_SIZE as u64, &mut page)?,
                    None => page.fill(0),
                }
                if page != old {
                    let first = page.iter().zip(old).position(|(a, b)| a != b).unwrap_or(0);
                    let n = page.iter().zip(old).filter(|(a, b)| a != b).count();
                    bad.push(format!("{g:#x}@{first:#x}({n}B)"));
                    shadow.insert(g, page.clone());
                } else if f.as_deref().unwrap_or(&[0u8; PAGE_SIZE][..]) != old {
                    if hidden.contains(&g) {
                        raw_only += 1;
                    } else {
                        bad.push(format!("{g:#x}(raw)"));
                    }
                }
            }
            println!(
                "xen-selftest: shadow round {round}: {} frames differ: {}; {raw_only} hidden \
                 frames changed since the harvest",
                bad.len(),
                bad.join(" ")
            );
            behind.extend(bad);
        }
        d.resume()?;
    }
    v.report(
        "xen-shadow",
        behind.is_empty(),
        &format!("{rounds} rounds; frames changed behind the dirty log: {behind:?}"),
    );
    Ok(())
}

fn save(d: &mut XenDomain, v: &mut Verdicts) -> Result<(), DomainError> {
    d.pause()?;
    let t = Instant::now();
    let blob = d.save_state();
    let us = t.elapsed().as_micros();
    d.resume()?;
    let blob = blob?;
    match SavedState::decode(&blob) {
        Ok(s) => {
            let params: Vec<String> = s
                .params
                .iter()
                .map(|(p, v)| format!("{p}={v:#x}"))
                .collect();
            v.report(
                "xen-save-state",
                !s.hvm_context.is_empty() && s.param(1).is_some(),
                &format!(
                    "{} bytes ({} of HVM context) in {us} us; params {}; tsc mode {} khz {}",
                    blob.len(),
                    s.hvm_context.len(),
                    params.join(" "),
                    s.tsc.mode,
                    s.tsc.khz
                ),
            );
        }
        Err(e) => v.report("xen-save-state", false, &chain(&e)),
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(target)) = (args.first(), args.get(1)) else {
        eprintln!("usage: xen-selftest size|info|pause|dirty|save|shadow|resume DOMAIN [ROUNDS]");
        return ExitCode::from(2);
    };
    let mut v = Verdicts::default();
    // Only the checks that harvest the dirty log need the frames Xen writes behind it
    // (learned at attach, ~15 s under the rig's TCG): `dirty` with a plain pause, and
    // `shadow` holding the guest as ha-primary does by default (suspended).
    let attached = match cmd.as_str() {
        "size" | "info" | "save" | "pause" | "resume" => {
            ha_xen::resolve_domain(target).and_then(XenDomain::attach)
        }
        "shadow" => ha_xen::attach_holding(target, ha_xen::Hold::default()),
        _ => ha_xen::attach(target),
    };
    let mut d = match attached {
        Ok(d) => d,
        Err(e) => {
            v.report(
                &format!("xen-{cmd}"),
                false,
                &format!("attach: {}", chain(&e)),
            );
            return ExitCode::FAILURE;
        }
    };
    let r = match cmd.as_str() {
        "size" => {
            println!("{}", d.memory_size());
            return ExitCode::SUCCESS;
        }
        "resume" => {
            let r = d
                .set_cooperative(Duration::from_secs(30))
                .and_then(|()| d.resume_if_suspended());
            return match r {
                Ok(true) => {
                    println!("resumed: the domain was suspended");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    println!("running: the domain was not suspended");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("xen-selftest: resume: {}", chain(&e));
                    ExitCode::FAILURE
                }
            };
        }
        "info" => info(&d, &mut v),
        "pause" => pause(&mut d, &mut v),
        "dirty" => {
            let rounds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
            dirty(&mut d, &mut v, rounds)
        }
        "save" => save(&mut d, &mut v),
        "shadow" => {
            let rounds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
            shadow(&mut d, &mut v, rounds)
        }
        other => {
            eprintln!("xen-selftest: unknown check {other:?}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = r {
        v.report(&format!("xen-{cmd}"), false, &chain(&e));
    }
    if v.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Logs to stderr at `RUST_LOG` (default info).
fn tracing_subscriber_init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
