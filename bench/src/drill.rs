//! `ha-bench drill`: the failover drill. Starts `ha-backup` and `ha-primary` as separate
//! processes on loopback, protects a built-in guest, shows live progress, kills the primary
//! with SIGKILL at a random moment, and shows the failover and a continuity verdict.
//!
//! The pair shares a fresh key made with `ha-primary keygen` in the run's directory (the
//! link is encrypted), unless `--insecure` asks for plain TCP. A `db` or `files` guest
//! runs on a disk the drill makes (the backup's replica a copy of it, [`crate::disk`]);
//! after the failover the drill also checks the replica against the reference model:
//! every `db` update the world saw acknowledged reads back as written, and the replica is
//! the committed disk plus the writes of the guest resumed from it. The report carries the CPU
//! time each daemon spent per checkpoint while protected (from `/proc/<pid>/stat`), so
//! the two can be compared.

use crate::disk::{DiskCheck, Failover, Images};
pub use crate::pair::PairError as DrillError;
use crate::pair::{
    BackupSpec, backup_addr, cpu_ms, cpu_ms_split, daemons, events, guest_params, keygen,
    percentile, spawn, unix_ms, wait_event,
};
use ha_backend::BackendKind;
use ha_wire::output::{Consumer, WorldView};
use ha_workloads::guest_abi::{GuestParams, Workload};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Drill settings.
#[derive(Debug, Clone)]
pub struct DrillArgs {
    /// The guest backend (kvm or sim).
    pub guest: BackendKind,
    /// Workload name.
    pub workload: String,
    /// Guest memory ("256M").
    pub memory: String,
    /// Encoding mode.
    pub mode: String,
    /// Epoch interval ("25ms").
    pub interval: String,
    /// The backup's detection timeout for a silent primary ("500ms").
    pub detect_timeout: String,
    /// Workload units per second (None: the workload's default).
    pub rate: Option<u64>,
    /// Protected run before the kill.
    pub seconds: f64,
    /// How long the backup runs the guest after taking over.
    pub after: f64,
    /// Seed for the kill moment.
    pub seed: u64,
    /// Print progress lines.
    pub live: bool,
    /// Keep the run's directory.
    pub keep: bool,
    /// Plain TCP (`--insecure` on both daemons) instead of a pair key.
    pub insecure: bool,
    /// The disk's size in bytes for a workload that needs one (`db`, `files`).
    pub disk_size: u64,
    /// Both daemons hold the guest's key in etcd: (client URLs, lease TTL) — the backup
    /// activates only once the killed primary's lease expired.
    pub lease: Option<(String, String)>,
}

/// The workload's seed the drill gives the primary (`--seed`).
const WORKLOAD_SEED: u64 = 1;
/// An output record every this many units (`--output-every`): for `db`, a flush and an
/// acknowledgement of the updates up to it.
const OUTPUT_EVERY: u64 = 64;

/// The drill's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillReport {
    /// Guest backend.
    pub guest: String,
    /// Workload.
    pub workload: String,
    /// Mode.
    pub mode: String,
    /// Checkpoints acknowledged to the primary.
    pub epochs_committed: u64,
    /// Pause time p50, ms.
    pub pause_ms_p50: f64,
    /// Pause time p99, ms.
    pub pause_ms_p99: f64,
    /// Mean wire bytes per checkpoint.
    pub wire_bytes_per_epoch: f64,
    /// Mean raw (dirty pages × 4096) bytes per checkpoint.
    pub raw_bytes_per_epoch: f64,
    /// Checkpoints per second of protection.
    pub epochs_per_s: f64,
    /// Time from a checkpoint's pause to its ack, p50, ms.
    pub ack_ms_p50: f64,
    /// The same, p99, ms.
    pub ack_ms_p99: f64,
    /// Kill → the backup declares the primary dead.
    pub detection_ms: u64,
    /// Declared dead → the guest runs on the backup.
    pub activation_ms: u64,
    /// Kill → the guest runs on the backup.
    pub failover_ms: u64,
    /// With leases: how long the backup waited for the killed primary's lease to expire
    /// (part of the activation), ms.
    pub lease_wait_ms: Option<u64>,
    /// The checkpoint the backup resumed from.
    pub resumed_epoch: u64,
    /// Progress counter at that checkpoint, and after the backup ran the guest.
    pub progress_at_resume: u64,
    /// Progress when the backup stopped.
    pub progress_at_end: u64,
    /// Output records the world received in sequence.
    pub outputs_released: u64,
    /// Every continuity check passed.
    pub continuity_ok: bool,
    /// Each check: name → passed, with details.
    pub checks: Vec<(String, bool, String)>,
    /// Where the logs are (when kept).
    pub dir: Option<String>,
    /// Whether the link was encrypted (a pair key) or plain TCP (`--insecure`).
    pub encrypted: bool,
    /// The primary's checkpointing threads' CPU time (user + system) per checkpoint while
    /// protected, ms: every thread but the guest's vCPU.
    pub primary_cpu_ms_per_epoch: f64,
    /// The backup's CPU time per checkpoint while receiving, ms.
    pub backup_cpu_ms_per_epoch: f64,
    /// The guest's vCPU thread's CPU time per checkpoint while protected, ms (the guest's
    /// own work and its pacing, not the cost of protection).
    pub guest_vcpu_cpu_ms_per_epoch: f64,
    /// A disk guest's replica after the failover (None: no disk). Its checks are among
    /// `checks` too.
    pub disk: Option<DiskCheck>,
}

/// One checkpoint row of the primary's stats CSV.
#[derive(Debug, Clone, Copy)]
struct Row {
    pause_us: u64,
    raw: u64,
    wire: u64,
    held: Option<u64>,
    ack_us: Option<u64>,
}

/// Checkpoint rows of the primary's stats CSV.
fn checkpoints(csv: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(csv).unwrap_or_default();
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let cols: Vec<&str> = header.split(',').collect();
    let at = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(cp), Some(pause), Some(raw), Some(wire)) = (
        at("checkpoint"),
        at("pause_us"),
        at("raw_bytes"),
        at("wire_bytes"),
    ) else {
        return Vec::new();
    };
    let (held, ack) = (at("held"), at("ack_latency_us"));
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            if num(cp)? != 1 {
                return None;
            }
            Some(Row {
                pause_us: num(pause)?,
                raw: num(raw)?,
                wire: num(wire)?,
                held: held.and_then(num),
                ack_us: ack.and_then(num),
            })
        })
        .collect()
}

/// Run the drill.
pub fn run(a: &DrillArgs) -> Result<DrillReport, DrillError> {
    let (primary_bin, backup_bin) = daemons()?;
    let dir =
        std::env::temp_dir().join(format!("castor-drill-{}-{}", std::process::id(), unix_ms()));
    std::fs::create_dir_all(&dir)?;
    let f = |n: &str| dir.join(n);
    let disk = disk_guest(a, &dir)?;
    let world = Consumer::start(f("ack.log"))?;
    let s = |v: &str| v.to_string();
    let key_args = if a.insecure {
        vec![s("--insecure")]
    } else {
        let key = f("pair.key");
        keygen(&primary_bin, &key, &dir)?;
        vec![s("--key"), key.display().to_string()]
    };
    let mut backup_args = BackupSpec {
        dir: &dir,
        memory: &a.memory,
        mode: &a.mode,
        guest: a.guest,
        interval: &a.interval,
        detect_timeout: &a.detect_timeout,
        key_args: &key_args,
    }
    .args(&[
        s("--output"),
        world.addr.to_string(),
        s("--ack-log"),
        f("ack.log").display().to_string(),
        s("--events"),
        f("backup.events").display().to_string(),
        s("--stats"),
        f("backup.csv").display().to_string(),
        s("--exit-after"),
        format!(
            "{}ms",
            Duration::from_secs_f64(a.after.max(0.0)).as_millis()
        ),
    ]);
    if let Some((_, im, _)) = &disk {
        backup_args.extend([s("--disk"), im.replica.display().to_string()]);
    }
    let lease_args = a.lease.as_ref().map_or_else(Vec::new, |(etcd, ttl)| {
        vec![
            s("--etcd"),
            etcd.clone(),
            s("--lease-key"),
            format!("/castor/drill/{}-{}", std::process::id(), unix_ms()),
            s("--lease-ttl"),
            ttl.clone(),
        ]
    });
    backup_args.extend(lease_args.iter().cloned());
    let mut backup = spawn(&backup_bin, &backup_args, &f("backup.log"), "ha-backup")?;
    let stalled = |what: &str| DrillError::Stalled(what.to_string(), dir.clone());
    let t = Instant::now();
    let baddr = backup_addr(&f("port"), &dir)?;
    let mut primary_args = vec![
        s("--backup"),
        baddr,
        s("--guest"),
        a.guest.to_string(),
        s("--workload"),
        a.workload.clone(),
        s("--memory"),
        a.memory.clone(),
        s("--mode"),
        a.mode.clone(),
        s("--interval"),
        a.interval.clone(),
        s("--output"),
        world.addr.to_string(),
        s("--events"),
        f("primary.events").display().to_string(),
        s("--stats"),
        f("primary.csv").display().to_string(),
        s("--seed"),
        WORKLOAD_SEED.to_string(),
        s("--output-every"),
        OUTPUT_EVERY.to_string(),
    ];
    if let Some((_, im, _)) = &disk {
        primary_args.extend([s("--disk"), im.primary.display().to_string()]);
    }
    primary_args.extend(key_args);
    primary_args.extend(lease_args);
    if let Some(r) = a.rate {
        primary_args.extend([s("--rate"), r.to_string()]);
    }
    let mut primary = spawn(&primary_bin, &primary_args, &f("primary.log"), "ha-primary")?;
    if wait_event(&f("primary.events"), "protected", Duration::from_secs(60)).is_none() {
        return Err(stalled("the primary never reached the protected state"));
    }
    // CPU per checkpoint is measured over the protected phase only (pre-copy excluded).
    let (ppid, bpid) = (primary.0.id(), backup.0.id());
    let cpu0 = (
        cpu_ms_split(ppid),
        cpu_ms(bpid),
        checkpoints(&f("primary.csv")).len(),
    );
    if a.live {
        println!(
            "protected: {} guest, {} workload, {} memory, mode {}, interval {}",
            a.guest, a.workload, a.memory, a.mode, a.interval
        );
    }
    // Live progress until the kill, which comes at a random moment after `seconds`.
    let mut rng = a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    rng ^= rng >> 29;
    let extra_ms = rng % 1000;
    let kill_at =
        t.elapsed() + Duration::from_secs_f64(a.seconds) + Duration::from_millis(extra_ms);
    let start = Instant::now();
    let mut last_rows = 0usize;
    while t.elapsed() < kill_at {
        std::thread::sleep(Duration::from_secs(1).min(kill_at.saturating_sub(t.elapsed())));
        if !a.live {
            continue;
        }
        let rows = checkpoints(&f("primary.csv"));
        let new = &rows[last_rows.min(rows.len())..];
        last_rows = rows.len();
        let w = world.view();
        let pauses: Vec<u64> = new.iter().map(|r| r.pause_us).collect();
        let (raw, wire): (u64, u64) = new
            .iter()
            .fold((0, 0), |acc, r| (acc.0 + r.raw, acc.1 + r.wire));
        println!(
            "t={:>5.1}s  epochs/s {:>5.1}  pause p50 {:>6.2} ms  bytes/epoch {:>8.1} KiB  compression {:>5.1}x  output released {:>6}  held {}",
            start.elapsed().as_secs_f64(),
            new.len() as f64,
            percentile(&pauses, 50),
            wire as f64 / new.len().max(1) as f64 / 1024.0,
            raw as f64 / wire.max(1) as f64,
            w.next_seq,
            new.last()
                .and_then(|r| r.held)
                .map_or("-".to_string(), |h| h.to_string()),
        );
        let _ = std::io::stdout().flush();
    }
    let cpu1 = (
        cpu_ms_split(ppid),
        cpu_ms(bpid),
        checkpoints(&f("primary.csv")).len(),
    );
    let per_epoch = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if cpu1.2 > cpu0.2 => {
            b.saturating_sub(a) as f64 / (cpu1.2 - cpu0.2) as f64
        }
        _ => 0.0,
    };
    // The primary's checkpointing threads apart from the guest's vCPU, which spins for
    // its pacing and would otherwise count as the primary's cost.
    let cpu = (
        per_epoch(cpu0.0.map(|c| c.0), cpu1.0.map(|c| c.0)),
        per_epoch(cpu0.1, cpu1.1),
        per_epoch(cpu0.0.map(|c| c.1), cpu1.0.map(|c| c.1)),
    );
    // Checkpoints per second count over the protected span only, up to the kill.
    let protected_s = start.elapsed().as_secs_f64();
    let t_kill = unix_ms();
    let _ = primary.0.kill(); // SIGKILL
    let _ = primary.0.wait();
    if a.live {
        println!(
            "primary killed (SIGKILL) after {:.1} s of protection",
            start.elapsed().as_secs_f64()
        );
    }
    let lost = wait_event(&f("backup.events"), "primary_lost", Duration::from_secs(20))
        .ok_or_else(|| stalled("the backup never noticed"))?;
    let active = wait_event(&f("backup.events"), "active", Duration::from_secs(30))
        .ok_or_else(|| stalled("the backup never took over"))?;
    let backup_exit = {
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = backup.0.try_wait() {
                break st.code();
            }
            if t.elapsed() > Duration::from_secs_f64(a.after + 20.0) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    std::thread::sleep(Duration::from_millis(50));
    let view = world.view();
    let lease_wait_ms = events(&f("backup.events"))
        .into_iter()
        .find(|e| e["event"] == "lease_claimed")
        .and_then(|e| e["waited_ms"].as_u64());
    let mut report = DrillReport {
        lease_wait_ms,
        encrypted: !a.insecure,
        primary_cpu_ms_per_epoch: cpu.0,
        backup_cpu_ms_per_epoch: cpu.1,
        guest_vcpu_cpu_ms_per_epoch: cpu.2,
        ..verdict(
            a,
            &f,
            &lost,
            &active,
            t_kill,
            backup_exit,
            &view,
            protected_s,
        )
    };
    if let Some((params, im, memory_size)) = &disk {
        let check = crate::disk::check_replica(
            &im.replica,
            &Failover {
                primary_disk: Some(&im.primary),
                memory_size: *memory_size,
                params,
                acked: ha_workloads::db::acknowledged(&view.primary_last_payload).unwrap_or(0),
                resumed: report.progress_at_resume,
                end: report.progress_at_end,
            },
        );
        report.checks.extend(check.checks.iter().cloned());
        report.continuity_ok &= check.checks.iter().all(|c| c.1);
        report.disk = Some(check);
    }
    if a.keep {
        Ok(DrillReport {
            dir: Some(dir.display().to_string()),
            ..report
        })
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        Ok(report)
    }
}

/// For a workload that needs a disk: the guest's parameters as the primary builds them,
/// its disk images (made in `dir`), and its memory size.
fn disk_guest(a: &DrillArgs, dir: &Path) -> Result<Option<(GuestParams, Images, u64)>, DrillError> {
    let Ok(w) = a.workload.parse::<Workload>() else {
        return Ok(None); // the primary names the unknown workload
    };
    let Ok(memory_size) = ha_daemon::units::parse_size(&a.memory) else {
        return Ok(None); // and the bad size
    };
    if !w.needs_disk() {
        return Ok(None);
    }
    let rate = a.rate.unwrap_or_else(|| w.default_rate());
    let params = guest_params(
        w,
        memory_size,
        WORKLOAD_SEED,
        rate,
        OUTPUT_EVERY,
        a.disk_size,
    );
    let images = Images::create(dir, &params)?;
    Ok(Some((params, images, memory_size)))
}

#[allow(clippy::too_many_arguments)]
fn verdict(
    a: &DrillArgs,
    f: &dyn Fn(&str) -> PathBuf,
    lost: &Value,
    active: &Value,
    t_kill: u64,
    backup_exit: Option<i32>,
    world: &WorldView,
    protected_s: f64,
) -> DrillReport {
    let rows = checkpoints(&f("primary.csv"));
    let pauses: Vec<u64> = rows.iter().map(|r| r.pause_us).collect();
    let acks_us: Vec<u64> = rows.iter().filter_map(|r| r.ack_us).collect();
    let n = rows.len().max(1) as f64;
    let ev = events(&f("backup.events"));
    let acks = ha_wire::output::read_ack_log(&f("ack.log"));
    let last_head = acks.last().map_or(0, |a| a.1);
    let progress: Vec<u64> = ev
        .iter()
        .filter(|e| e["event"] == "progress")
        .filter_map(|e| e["progress"].as_u64())
        .collect();
    let resume = active["progress"].as_u64().unwrap_or(0);
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    // The moment the backup declared the loss (activation is measured from it), else when
    // it wrote the event.
    let t_lost = lost["declared_ms"]
        .as_u64()
        .or_else(|| lost["t_ms"].as_u64())
        .unwrap_or(t_kill);
    checks.push(after_kill_check(t_lost, t_kill, lost));
    checks.extend(takeover_checks(&ev, &acks, active, &progress, world));
    let mut check =
        |name: &str, ok: bool, detail: String| checks.push((name.to_string(), ok, detail));
    check(
        "output continues from the backup",
        world.from_backup > 0 && world.next_seq > last_head,
        format!(
            "{} records from the backup; sequence at {} (committed {last_head})",
            world.from_backup, world.next_seq
        ),
    );
    check(
        "backup exited cleanly",
        backup_exit == Some(0),
        format!("exit {backup_exit:?}"),
    );
    let continuity_ok = checks.iter().all(|c| c.1);
    let t_active = active["t_ms"].as_u64().unwrap_or(t_lost);
    DrillReport {
        guest: a.guest.to_string(),
        workload: a.workload.clone(),
        mode: a.mode.clone(),
        epochs_committed: rows.len() as u64,
        pause_ms_p50: percentile(&pauses, 50),
        pause_ms_p99: percentile(&pauses, 99),
        wire_bytes_per_epoch: rows.iter().map(|r| r.wire).sum::<u64>() as f64 / n,
        raw_bytes_per_epoch: rows.iter().map(|r| r.raw).sum::<u64>() as f64 / n,
        epochs_per_s: rows.len() as f64 / protected_s.max(1e-3),
        ack_ms_p50: percentile(&acks_us, 50),
        ack_ms_p99: percentile(&acks_us, 99),
        detection_ms: t_lost.saturating_sub(t_kill),
        activation_ms: active["activation_ms"].as_u64().unwrap_or(0),
        failover_ms: t_active.saturating_sub(t_kill),
        lease_wait_ms: None,
        resumed_epoch: active["epoch"].as_u64().unwrap_or(0),
        progress_at_resume: resume,
        progress_at_end: progress.last().copied().unwrap_or(resume),
        outputs_released: world.next_seq,
        continuity_ok,
        checks,
        dir: None,
        encrypted: !a.insecure,
        primary_cpu_ms_per_epoch: 0.0,
        backup_cpu_ms_per_epoch: 0.0,
        guest_vcpu_cpu_ms_per_epoch: 0.0,
        disk: None,
    }
}

/// "No false failover": the backup declared its primary lost (at `t_lost`, event `lost`)
/// only after the kill at `t_kill`.
pub(crate) fn after_kill_check(t_lost: u64, t_kill: u64, lost: &Value) -> (String, bool, String) {
    (
        "no false failover: the backup took over only after the kill".to_string(),
        t_lost >= t_kill,
        format!(
            "primary declared lost {} ms after the kill ({})",
            t_lost.cast_signed() - t_kill.cast_signed(),
            lost["reason"]
        ),
    )
}

/// The continuity checks of a takeover, as (name, passed, details): the backup (its
/// `events`) activated (`active`) from the last checkpoint in its ack log (`acks`), its
/// restored guest is that checkpoint's (progress, checksum, output head), the guest went
/// on from there (`progress`: what it reported afterwards, in order), and the world saw
/// no gap, no changed repeat and no release ahead of a commit.
pub(crate) fn takeover_checks(
    events: &[Value],
    acks: &[(u64, u64)],
    active: &Value,
    progress: &[u64],
    world: &WorldView,
) -> Vec<(String, bool, String)> {
    let last_epoch = acks.last().map_or(0, |a| a.0);
    let cp = events
        .iter()
        .rfind(|e| e["event"] == "checkpoint" && e["epoch"] == last_epoch)
        .cloned()
        .unwrap_or(Value::Null);
    let resume = active["progress"].as_u64().unwrap_or(0);
    let mut checks = vec![(
        "resumed from the last committed checkpoint".to_string(),
        active["epoch"] == last_epoch && last_epoch > 0,
        format!(
            "resumed epoch {}, last commit {last_epoch}",
            active["epoch"]
        ),
    )];
    for key in ["progress", "checksum", "out_head"] {
        checks.push((
            format!("restored {key} equals the checkpoint's"),
            active[key] == cp[key] && !cp[key].is_null(),
            format!("{} vs {}", active[key], cp[key]),
        ));
    }
    checks.push((
        "the guest goes on at the backup".to_string(),
        progress.last().is_some_and(|&p| p > resume)
            && progress.windows(2).all(|w| w[0] <= w[1])
            && progress.iter().all(|&p| p >= resume),
        format!(
            "progress {resume} -> {}",
            progress.last().copied().unwrap_or(resume)
        ),
    ));
    checks.push((
        "output: no gap, no changed repeat, nothing released before its commit".to_string(),
        world.violations.is_empty(),
        world.violations.first().cloned().unwrap_or_else(|| {
            format!(
                "{} records in sequence, {} repeats",
                world.next_seq, world.repeats
            )
        }),
    ));
    checks
}

/// Print the summary table.
pub fn print_summary(r: &DrillReport) {
    println!();
    println!(
        "failover: detected in {} ms, guest running on the backup {} ms later ({} ms after the kill)",
        r.detection_ms, r.activation_ms, r.failover_ms
    );
    if let Some(w) = r.lease_wait_ms {
        println!("  of the activation, {w} ms waiting for the primary's lease to expire");
    }
    println!(
        "          resumed from checkpoint {} at progress {}; progress {} when the drill ended",
        r.resumed_epoch, r.progress_at_resume, r.progress_at_end
    );
    println!();
    println!("| {:<28} | {:>14} |", "figure", "value");
    println!("|{:-<30}|{:->16}|", "", "");
    let rows = [
        ("checkpoints committed", r.epochs_committed.to_string()),
        (
            "pause p50 / p99 (ms)",
            format!("{:.2} / {:.2}", r.pause_ms_p50, r.pause_ms_p99),
        ),
        (
            "wire bytes per epoch",
            format!("{:.0}", r.wire_bytes_per_epoch),
        ),
        (
            "raw bytes per epoch",
            format!("{:.0}", r.raw_bytes_per_epoch),
        ),
        (
            "compression",
            format!(
                "{:.1}x",
                r.raw_bytes_per_epoch / r.wire_bytes_per_epoch.max(1.0)
            ),
        ),
        ("detection (ms)", r.detection_ms.to_string()),
        ("activation (ms)", r.activation_ms.to_string()),
        ("failover (ms)", r.failover_ms.to_string()),
        ("output records released", r.outputs_released.to_string()),
        (
            "link",
            if r.encrypted { "noise" } else { "INSECURE" }.to_string(),
        ),
        (
            "CPU/epoch primary, backup (ms)",
            format!(
                "{:.2} / {:.2}",
                r.primary_cpu_ms_per_epoch, r.backup_cpu_ms_per_epoch
            ),
        ),
        (
            "CPU/epoch guest vCPU (ms)",
            format!("{:.2}", r.guest_vcpu_cpu_ms_per_epoch),
        ),
    ];
    for (k, v) in rows {
        println!("| {k:<28} | {v:>14} |");
    }
    if let Some(d) = &r.disk {
        println!(
            "| {:<28} | {:>14} |",
            "disk (MiB)",
            format!("{:.0}", d.disk_bytes as f64 / f64::from(1 << 20))
        );
        if let Some(acked) = d.acked_updates {
            println!("| {:<28} | {acked:>14} |", "updates acknowledged");
        }
        if let Some(p) = d.replica_progress {
            println!("| {:<28} | {p:>14} |", "replica = model at progress");
        }
    }
    println!();
    println!("continuity:");
    for (name, ok, detail) in &r.checks {
        println!("  [{}] {name} ({detail})", if *ok { "ok" } else { "FAIL" });
    }
    println!(
        "verdict: {}",
        if r.continuity_ok {
            "CONTINUITY OK"
        } else {
            "CONTINUITY FAILED"
        }
    );
    if let Some(d) = &r.dir {
        println!("logs: {d}");
    }
}
