//! `ha-bench drill --pairs N --hosts H`: many pairs placed across hosts, and one host
//! killed. The hosts are network namespaces ([`crate::hosts`]) on one bridge, with a real
//! etcd member beside the bench. Each pair is independent — its own pair key, ports,
//! lease key and world — and has three hosts: pair `i`'s primary runs on host `i mod H`,
//! its backup on the next host and a spare on the one after (`--reprotect-to`), so the
//! primaries are spread and every host carries each role. Under load, one host is killed
//! (SIGKILL to every process in its namespace); then every guest it ran as primary must
//! run on its backup's host from the last committed checkpoint (the single drill's
//! checks) and be protected again to its spare, and every other pair must go on: a pair
//! whose backup died keeps its primary running (unprotected, as its policy says), a pair
//! that lost only its spare or nothing is not disturbed at all.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ha_wire::output::{Consumer, read_ack_log};
use serde_json::Value;

use crate::drill::{DrillArgs, after_kill_check, takeover_checks};
use crate::hosts::{EtcdMember, Hosts, HostsError};
use crate::pair::{self, BackupSpec, Kill, PairError, PrimarySpec, events, unix_ms};

/// Errors that stop the many-pairs drill before its verdict.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Too few or too many hosts.
    #[error("--hosts {0}: a pair needs three hosts (primary, backup, spare); at most 200")]
    HostCount(usize),
    /// Too few or too many pairs.
    #[error("--pairs {0}: from 1 to 64")]
    PairCount(usize),
    /// No such host to kill.
    #[error("--kill-host {0}: the hosts are numbered 0 to {1}")]
    KillHost(usize, usize),
    /// A workload the drill cannot place (its disk images are not made per host).
    #[error("--workload {0}: the many-pairs drill runs guests without a disk")]
    DiskWorkload(String),
    /// The namespaces or etcd.
    #[error("setting up the hosts")]
    Setup(#[from] HostsError),
    /// A pair's processes.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// SIGINT or SIGTERM.
    #[error("interrupted; the hosts and their processes were torn down")]
    Interrupted,
    /// The signal handlers.
    #[error("cannot watch for SIGINT and SIGTERM")]
    Signal(#[from] ha_daemon::signal::SignalError),
    /// Local I/O.
    #[error("benchmark I/O")]
    Io(#[from] std::io::Error),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ClusterArgs {
    /// Every pair's settings as the single drill takes them: guest, workload, memory,
    /// mode, interval, detection timeout, rate; `seconds` of protection before the kill,
    /// `after` seconds once every failed-over guest is protected again; `lease`'s TTL for
    /// every pair's key (its URLs are ignored: the drill starts its own etcd); `insecure`,
    /// `keep`, `live`.
    pub drill: DrillArgs,
    /// How many pairs.
    pub pairs: usize,
    /// How many hosts.
    pub hosts: usize,
    /// The host that is killed.
    pub kill_host: usize,
    /// Its link goes down before its processes are killed (a host losing power: no
    /// connection closes, the others notice by their timeouts).
    pub power_off: bool,
}

impl ClusterArgs {
    /// The lease TTL of every pair's key (default 5s).
    fn lease_ttl(&self) -> String {
        self.drill
            .lease
            .as_ref()
            .map_or_else(|| "5s".to_string(), |l| l.1.clone())
    }
}

/// Pair `i`'s hosts among `hosts`: (primary, backup, spare), three different hosts for
/// `hosts` ≥ 3, the primaries taken in turn.
pub fn placement(i: usize, hosts: usize) -> (usize, usize, usize) {
    let h = hosts.max(1);
    (i % h, (i + 1) % h, (i + 2) % h)
}

/// One pair's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairRow {
    /// The pair's number.
    pub pair: usize,
    /// Its key in etcd.
    pub key: String,
    /// Host of its primary, backup and spare at the start.
    pub primary_host: usize,
    /// Its backup's host.
    pub backup_host: usize,
    /// Its spare's host.
    pub spare_host: usize,
    /// What the killed host was to this pair: primary, backup, spare or none.
    pub killed_role: String,
    /// The host running the guest at the end (None: nowhere).
    pub runs_on: Option<usize>,
    /// The host protecting it at the end (None: unprotected).
    pub protected_by: Option<usize>,
    /// What happened, in words.
    pub outcome: String,
    /// Kill → its backup declared the primary lost, ms.
    pub detection_ms: Option<u64>,
    /// How long the backup waited for the dead primary's lease, ms.
    pub lease_wait_ms: Option<u64>,
    /// Declared lost → the guest runs on the backup, ms (the lease wait included).
    pub activation_ms: Option<u64>,
    /// Kill → the guest runs on the backup, ms.
    pub failover_ms: Option<u64>,
    /// The guest running on the backup → protected again to the spare, ms.
    pub reprotect_ms: Option<u64>,
    /// The re-protection's sync (pre-copy to the spare), ms.
    pub reprotect_sync_ms: Option<u64>,
    /// The checkpoint the backup resumed from.
    pub resumed_epoch: Option<u64>,
    /// Checkpoints committed after the kill (at the backup, or at the spare once
    /// re-protected).
    pub commits_after_kill: u64,
    /// Output records the world had in sequence at the kill, and at the end.
    pub outputs_at_kill: u64,
    /// At the end.
    pub outputs_at_end: u64,
    /// Records its primary released without a commit after it lost its backup (by
    /// design: it runs unprotected).
    pub unprotected_releases: u64,
    /// Every check passed.
    pub ok: bool,
    /// Each check: name, passed, details.
    pub checks: Vec<(String, bool, String)>,
}

/// The drill's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterReport {
    /// Guest backend.
    pub guest: String,
    /// Workload.
    pub workload: String,
    /// Guest memory.
    pub memory: String,
    /// Mode.
    pub mode: String,
    /// Epoch interval.
    pub interval: String,
    /// Lease TTL.
    pub lease_ttl: String,
    /// Hosts.
    pub hosts: usize,
    /// The host killed.
    pub killed_host: usize,
    /// Processes killed with it.
    pub killed_processes: usize,
    /// Whether its link went down first (`--power-off`).
    pub power_off: bool,
    /// Seconds from the start of the first daemon until every pair was protected.
    pub startup_s: f64,
    /// Seconds of protection before the kill.
    pub protected_s: f64,
    /// Per pair.
    pub pairs: Vec<PairRow>,
    /// Every pair's checks passed.
    pub ok: bool,
    /// Where the logs are (kept with --keep).
    pub dir: Option<String>,
}

/// A pair's running processes and its world.
struct Running {
    dir: PathBuf,
    key: String,
    hosts: (usize, usize, usize),
    world: Consumer,
    primary: Kill,
    backup: Kill,
    spare: Kill,
}

impl Running {
    fn file(&self, role: &str, name: &str) -> PathBuf {
        self.dir.join(role).join(name)
    }
}

/// A pair's state at the kill.
#[derive(Debug, Clone, Copy)]
struct AtKill {
    outputs: u64,
    backup_acks: usize,
}

/// Run the drill. The run's directory is removed at the end unless `keep`, or a stall
/// (whose error names it) ended the drill.
pub fn run(a: &ClusterArgs) -> Result<ClusterReport, ClusterError> {
    if !(3..=200).contains(&a.hosts) {
        return Err(ClusterError::HostCount(a.hosts));
    }
    if !(1..=64).contains(&a.pairs) {
        return Err(ClusterError::PairCount(a.pairs));
    }
    if a.kill_host >= a.hosts {
        return Err(ClusterError::KillHost(a.kill_host, a.hosts - 1));
    }
    if ["db", "files"].contains(&a.drill.workload.as_str()) {
        return Err(ClusterError::DiskWorkload(a.drill.workload.clone()));
    }
    let stop = ha_daemon::signal::stop_flag()?;
    let bins = pair::daemons()?;
    let dir =
        std::env::temp_dir().join(format!("castor-pairs-{}-{}", std::process::id(), unix_ms()));
    std::fs::create_dir_all(&dir)?;
    let result = drill(a, &dir, &stop, (&bins.0, &bins.1));
    // Logs stay with --keep, and after a stall, whose error names the directory.
    let stalled = matches!(&result, Err(ClusterError::Pair(PairError::Stalled(..))));
    if !a.drill.keep && !stalled {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let mut report = result?;
    if a.drill.keep {
        report.dir = Some(dir.display().to_string());
    }
    Ok(report)
}

/// Sleep `d`, or less when a stop is asked for.
fn sleep(d: Duration, stop: &AtomicBool) -> Result<(), ClusterError> {
    let t = Instant::now();
    while t.elapsed() < d {
        if stop.load(Ordering::Relaxed) {
            return Err(ClusterError::Interrupted);
        }
        std::thread::sleep((d - t.elapsed()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// The first event `name` in `path`, waiting up to `limit` (None after it).
fn wait_event(
    path: &Path,
    name: &str,
    limit: Duration,
    stop: &AtomicBool,
) -> Result<Option<Value>, ClusterError> {
    let t = Instant::now();
    loop {
        if let Some(e) = events(path).into_iter().find(|e| e["event"] == name) {
            return Ok(Some(e));
        }
        if t.elapsed() > limit {
            return Ok(None);
        }
        sleep(Duration::from_millis(20), stop)?;
    }
}

/// The whole drill in `dir`; everything it starts ends when it returns.
fn drill(
    a: &ClusterArgs,
    dir: &Path,
    stop: &AtomicBool,
    bins: (&Path, &Path),
) -> Result<ClusterReport, ClusterError> {
    // Dropped last: the processes below are killed before the namespaces go.
    let hosts = Hosts::create(a.hosts)?;
    let etcd = EtcdMember::start(dir, hosts.bench_ip)?;
    let lease_ttl = a.lease_ttl();
    let ttl = ha_daemon::units::parse_duration(&lease_ttl).unwrap_or(Duration::from_secs(5));
    let d = &a.drill;
    let t_start = Instant::now();
    let mut pairs = Vec::with_capacity(a.pairs);
    for i in 0..a.pairs {
        pairs.push(start_pair(
            a,
            i,
            dir,
            &hosts,
            (&etcd.url, &lease_ttl),
            bins,
        )?);
        if stop.load(Ordering::Relaxed) {
            return Err(ClusterError::Interrupted);
        }
    }
    for p in &pairs {
        let events = p.file("primary", "events");
        if wait_event(&events, "protected", Duration::from_secs(120), stop)?.is_none() {
            return Err(PairError::Stalled(
                format!("pair {} was never protected", p.key),
                p.dir.clone(),
            )
            .into());
        }
    }
    let startup_s = t_start.elapsed().as_secs_f64();
    if d.live {
        println!(
            "{} pairs protected on {} hosts in {startup_s:.1} s ({} guests, {} memory, {} workload, lease TTL {})",
            a.pairs, a.hosts, d.guest, d.memory, d.workload, lease_ttl
        );
    }
    let t_protected = Instant::now();
    while t_protected.elapsed() < Duration::from_secs_f64(d.seconds) {
        sleep(Duration::from_secs(1), stop)?;
        if d.live {
            live_line(t_protected.elapsed(), &pairs);
        }
    }
    let protected_s = t_protected.elapsed().as_secs_f64();
    let at_kill: Vec<AtKill> = pairs
        .iter()
        .map(|p| AtKill {
            outputs: p.world.view().next_seq,
            backup_acks: read_ack_log(&p.file("backup", "ack.log")).len(),
        })
        .collect();
    let t_kill = unix_ms();
    let killed_processes = hosts.kill(a.kill_host, a.power_off)?;
    if d.live {
        println!(
            "host {} killed: {}SIGKILL to its {killed_processes} processes",
            a.kill_host,
            if a.power_off { "link down, then " } else { "" }
        );
    }
    // Every guest the host ran as primary: taken over, then protected again.
    for p in pairs.iter().filter(|p| p.hosts.0 == a.kill_host) {
        let limit = 2 * ttl + Duration::from_secs(30);
        if wait_event(&p.file("backup", "events"), "active", limit, stop)?.is_some() {
            let reprotect = p.file("backup", "events.reprotect");
            wait_event(&reprotect, "protected", Duration::from_secs(60), stop)?;
        }
    }
    let t_after = Instant::now();
    while t_after.elapsed() < Duration::from_secs_f64(d.after) {
        sleep(Duration::from_secs(1), stop)?;
        if d.live {
            live_line(t_protected.elapsed(), &pairs);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let rows: Vec<PairRow> = pairs
        .iter_mut()
        .zip(&at_kill)
        .enumerate()
        .map(|(i, (p, k))| verdict(i, p, *k, a.kill_host, t_kill))
        .collect();
    drop(pairs);
    drop(etcd);
    drop(hosts);
    Ok(ClusterReport {
        guest: d.guest.to_string(),
        workload: d.workload.clone(),
        memory: d.memory.clone(),
        mode: d.mode.clone(),
        interval: d.interval.clone(),
        lease_ttl: lease_ttl.clone(),
        hosts: a.hosts,
        killed_host: a.kill_host,
        killed_processes,
        power_off: a.power_off,
        startup_s,
        protected_s,
        ok: rows.iter().all(|r| r.ok),
        pairs: rows,
        dir: None,
    })
}

/// One progress line: checkpoints committed and output records per pair.
fn live_line(t: Duration, pairs: &[Running]) {
    let per: Vec<String> = pairs
        .iter()
        .map(|p| {
            let acks = read_ack_log(&p.file("backup", "ack.log")).len()
                + read_ack_log(&p.file("spare", "ack.log")).len();
            format!("{acks}/{}", p.world.view().next_seq)
        })
        .collect();
    println!(
        "t={:>5.1}s  commits/outputs per pair: {}",
        t.as_secs_f64(),
        per.join(" ")
    );
}

/// Start pair `i`: its spare, its backup (`--reprotect-to` the spare), its primary, each
/// on its host, each holding the pair's lease key in `etcd` when it runs the guest.
fn start_pair(
    a: &ClusterArgs,
    i: usize,
    dir: &Path,
    hosts: &Hosts,
    (etcd, ttl): (&str, &str),
    (primary_bin, backup_bin): (&Path, &Path),
) -> Result<Running, ClusterError> {
    let (ph, bh, sh) = placement(i, a.hosts);
    let pdir = dir.join(format!("pair{i}"));
    for role in ["primary", "backup", "spare"] {
        std::fs::create_dir_all(pdir.join(role))?;
    }
    let s = |v: &str| v.to_string();
    let key_args = if a.drill.insecure {
        vec![s("--insecure")]
    } else {
        let key = pdir.join("pair.key");
        pair::keygen(primary_bin, &key, &pdir)?;
        vec![s("--key"), key.display().to_string()]
    };
    let world = Consumer::start_chain(
        SocketAddr::new(IpAddr::V4(hosts.bench_ip), 0),
        vec![pdir.join("backup/ack.log"), pdir.join("spare/ack.log")],
    )?;
    let lease_key = format!("/castor/pairs/{}/{i}", std::process::id());
    let lease = [
        s("--etcd"),
        s(etcd),
        s("--lease-key"),
        lease_key.clone(),
        s("--lease-ttl"),
        s(ttl),
    ];
    let path = |role: &str, name: &str| pdir.join(role).join(name).display().to_string();
    // A backup (the pair's, or its spare) on host `h`, its files in `role/`.
    let spawn_backup =
        |role: &str, h: usize, extra: &[String]| -> Result<(Kill, String), PairError> {
            let rdir = pdir.join(role);
            let spec = BackupSpec {
                dir: &rdir,
                memory: &a.drill.memory,
                mode: &a.drill.mode,
                guest: a.drill.guest,
                interval: &a.drill.interval,
                detect_timeout: &a.drill.detect_timeout,
                key_args: &key_args,
            };
            let mut args = vec![
                s("--output"),
                world.addr.to_string(),
                s("--ack-log"),
                path(role, "ack.log"),
                s("--events"),
                path(role, "events"),
            ];
            args.extend(lease.iter().cloned());
            args.extend_from_slice(extra);
            let listen = format!("{}:0", hosts.ips[h]);
            let ns = Some(hosts.names[h].as_str());
            let log = rdir.join("log");
            let child = pair::spawn_in(
                ns,
                backup_bin,
                &spec.args_listening(&listen, &args),
                &log,
                "ha-backup",
            )?;
            let addr = pair::backup_addr(&rdir.join("port"), &rdir)?;
            Ok((child, addr))
        };
    let (spare, spare_addr) = spawn_backup("spare", sh, &[])?;
    let (backup, backup_addr) = spawn_backup("backup", bh, &[s("--reprotect-to"), spare_addr])?;
    let events = pdir.join("primary/events");
    let mut extra = vec![
        s("--output"),
        world.addr.to_string(),
        s("--stats"),
        path("primary", "stats.csv"),
        s("--seed"),
        s("1"),
        s("--output-every"),
        s("64"),
    ];
    if let Some(r) = a.drill.rate {
        extra.extend([s("--rate"), r.to_string()]);
    }
    extra.extend(lease);
    let primary_args = PrimarySpec {
        backup: &backup_addr,
        guest: a.drill.guest,
        memory: &a.drill.memory,
        workload: &a.drill.workload,
        mode: &a.drill.mode,
        interval: &a.drill.interval,
        events: &events,
        key_args: &key_args,
    }
    .args(&extra);
    let primary = pair::spawn_in(
        Some(&hosts.names[ph]),
        primary_bin,
        &primary_args,
        &pdir.join("primary/log"),
        "ha-primary",
    )?;
    Ok(Running {
        dir: pdir,
        key: lease_key,
        hosts: (ph, bh, sh),
        world,
        primary,
        backup,
        spare,
    })
}

/// Whether a child still runs.
fn alive(k: &mut Kill) -> bool {
    matches!(k.0.try_wait(), Ok(None))
}

/// The checks of pair `i` once the drill has run.
fn verdict(i: usize, p: &mut Running, at_kill: AtKill, killed: usize, t_kill: u64) -> PairRow {
    let (ph, bh, sh) = p.hosts;
    let view = p.world.view();
    let backup_ev = events(&p.file("backup", "events"));
    let primary_ev = events(&p.file("primary", "events"));
    let spare_ev = events(&p.file("spare", "events"));
    let backup_acks = read_ack_log(&p.file("backup", "ack.log"));
    let spare_acks = read_ack_log(&p.file("spare", "ack.log"));
    let find = |ev: &[Value], name: &str| ev.iter().find(|e| e["event"] == name).cloned();
    let mut row = PairRow {
        pair: i,
        key: p.key.clone(),
        primary_host: ph,
        backup_host: bh,
        spare_host: sh,
        killed_role: "none".into(),
        runs_on: None,
        protected_by: None,
        outcome: String::new(),
        detection_ms: None,
        lease_wait_ms: None,
        activation_ms: None,
        failover_ms: None,
        reprotect_ms: None,
        reprotect_sync_ms: None,
        resumed_epoch: None,
        commits_after_kill: 0,
        outputs_at_kill: at_kill.outputs,
        outputs_at_end: view.next_seq,
        unprotected_releases: 0,
        ok: false,
        checks: Vec::new(),
    };
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    if ph == killed {
        row.killed_role = "primary".into();
        let lost = find(&backup_ev, "primary_lost").unwrap_or(Value::Null);
        let active = find(&backup_ev, "active").unwrap_or(Value::Null);
        let reprotect_ev = events(&p.file("backup", "events.reprotect"));
        let protected = find(&reprotect_ev, "protected");
        let t_lost = lost["declared_ms"]
            .as_u64()
            .or_else(|| lost["t_ms"].as_u64())
            .unwrap_or(0);
        let t_active = active["t_ms"].as_u64();
        checks.push((
            "the backup took the guest over".into(),
            t_active.is_some(),
            format!(
                "primary_lost {}, active {}",
                lost["reason"], active["epoch"]
            ),
        ));
        checks.push(after_kill_check(t_lost, t_kill, &lost));
        let claimed = find(&backup_ev, "lease_claimed");
        checks.push((
            "the backup held the guest's key before it ran the guest".into(),
            claimed.is_some(),
            claimed.as_ref().map_or_else(
                || "no lease_claimed event".into(),
                |c| format!("waited {} ms", c["waited_ms"]),
            ),
        ));
        // What the guest reported after the takeover: on the backup while unprotected,
        // then in the checkpoints the spare committed.
        let progress: Vec<u64> = backup_ev
            .iter()
            .filter(|e| e["event"] == "progress")
            .chain(spare_ev.iter().filter(|e| e["event"] == "checkpoint"))
            .filter_map(|e| e["progress"].as_u64())
            .collect();
        checks.extend(takeover_checks(
            &backup_ev,
            &backup_acks,
            &active,
            &progress,
            &view,
        ));
        let last_head = backup_acks.last().map_or(0, |a| a.1);
        checks.push((
            "output continues past the last commit".into(),
            view.next_seq > last_head,
            format!("sequence at {} (committed {last_head})", view.next_seq),
        ));
        checks.push((
            "protected again to the spare".into(),
            protected.is_some(),
            protected.as_ref().map_or_else(
                || "no protected event in the re-protecting engine's events".into(),
                |e| format!("pre-copy {} bytes", e["precopy_wire_bytes"]),
            ),
        ));
        let lost_again = find(&reprotect_ev, "backup_lost");
        let spare_runs = alive(&mut p.spare);
        checks.push((
            "stays protected: the spare commits its checkpoints".into(),
            spare_acks.len() >= 10 && lost_again.is_none() && spare_runs,
            format!(
                "{} checkpoints committed at the spare{}",
                spare_acks.len(),
                lost_again
                    .as_ref()
                    .map_or_else(String::new, |e| format!("; lost it: {}", e["reason"]))
            ),
        ));
        let running = alive(&mut p.backup);
        checks.push((
            "the guest still runs on the backup's host".into(),
            running,
            format!(
                "ha-backup on host {bh} {}",
                if running { "runs" } else { "ended" }
            ),
        ));
        row.runs_on = running.then_some(bh);
        row.protected_by = (protected.is_some() && lost_again.is_none()).then_some(sh);
        row.detection_ms = t_active.map(|_| t_lost.saturating_sub(t_kill));
        row.lease_wait_ms = claimed.and_then(|c| c["waited_ms"].as_u64());
        row.activation_ms = active["activation_ms"].as_u64();
        row.failover_ms = t_active.map(|t| t.saturating_sub(t_kill));
        row.reprotect_ms = match (&protected, t_active) {
            (Some(e), Some(t)) => e["t_ms"].as_u64().map(|p| p.saturating_sub(t)),
            _ => None,
        };
        row.reprotect_sync_ms = protected.as_ref().and_then(|e| e["sync_ms"].as_u64());
        row.resumed_epoch = active["epoch"].as_u64();
        row.commits_after_kill = spare_acks.len() as u64;
        row.outcome = format!(
            "failed over to host {bh} (primary lost: {}), protected again to host {sh}",
            lost["reason"].as_str().unwrap_or("never")
        );
    } else {
        let backup_dead = bh == killed;
        row.killed_role = if backup_dead {
            "backup"
        } else if sh == killed {
            "spare"
        } else {
            "none"
        }
        .into();
        let running = alive(&mut p.primary);
        checks.push((
            "the primary runs on".into(),
            running && view.next_seq > at_kill.outputs,
            format!(
                "ha-primary {}; output records {} at the kill, {} at the end",
                if running { "runs" } else { "ended" },
                at_kill.outputs,
                view.next_seq
            ),
        ));
        let took = find(&backup_ev, "active").or_else(|| find(&spare_ev, "active"));
        checks.push((
            "no other host took the guest".into(),
            took.is_none(),
            took.map_or_else(|| "none did".into(), |e| format!("active: {e}")),
        ));
        // Violations other than releases without a commit after the kill (by design once
        // a primary runs unprotected).
        let by_design = |v: &str, at: u64| {
            backup_dead && at >= t_kill && v.contains("before a checkpoint holding it")
        };
        let noted = || view.violations.iter().zip(&view.violations_at_ms);
        let unprotected = noted().filter(|(v, at)| by_design(v, **at)).count();
        let other: Vec<&String> = noted()
            .filter(|(v, at)| !by_design(v, **at))
            .map(|(v, _)| v)
            .collect();
        checks.push((
            if backup_dead {
                "output: no gap, no changed repeat, nothing released before its commit while protected"
            } else {
                "output: no gap, no changed repeat, nothing released before its commit"
            }
            .into(),
            other.is_empty(),
            other.first().map_or_else(
                || format!("{} records in sequence, {} repeats", view.next_seq, view.repeats),
                |v| (*v).clone(),
            ),
        ));
        row.unprotected_releases = unprotected as u64;
        let commits = backup_acks.len().saturating_sub(at_kill.backup_acks) as u64;
        row.commits_after_kill = commits;
        row.runs_on = running.then_some(ph);
        if backup_dead {
            let lost = find(&primary_ev, "backup_lost");
            checks.push((
                "the primary noticed its backup is gone".into(),
                lost.is_some(),
                lost.as_ref()
                    .map_or_else(|| "no backup_lost event".into(), |e| e.to_string()),
            ));
            row.outcome = format!(
                "backup lost; the primary runs on unprotected (policy {}), {} records released without a commit",
                lost.as_ref().map_or(Value::Null, |e| e["policy"].clone()),
                unprotected
            );
        } else {
            let lost = find(&primary_ev, "backup_lost");
            let declared = find(&backup_ev, "primary_lost");
            checks.push((
                "undisturbed: still protected, checkpoints commit at the backup".into(),
                lost.is_none() && declared.is_none() && commits >= 10,
                format!(
                    "{commits} checkpoints committed since the kill{}{}",
                    lost.map_or_else(String::new, |e| format!("; backup_lost {e}")),
                    declared.map_or_else(String::new, |e| format!("; primary_lost {e}"))
                ),
            ));
            row.protected_by = Some(bh);
            row.outcome = if sh == killed {
                "undisturbed (its spare died)".into()
            } else {
                "undisturbed".into()
            };
        }
    }
    row.ok = checks.iter().all(|c| c.1);
    row.checks = checks;
    row
}

/// The pairs as a markdown table.
pub fn markdown(r: &ClusterReport) -> String {
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let host = |v: Option<usize>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let head = [
        "pair",
        "hosts P / B / S",
        "killed host was",
        "runs on",
        "protected by",
        "detection ms",
        "lease wait ms",
        "activation ms",
        "failover ms",
        "re-protected ms",
        "commits since kill",
        "outputs kill → end",
        "checks",
    ];
    crate::markdown_table(
        &head,
        r.pairs.iter().map(|p| {
            vec![
                p.pair.to_string(),
                format!("{} / {} / {}", p.primary_host, p.backup_host, p.spare_host),
                p.killed_role.clone(),
                host(p.runs_on),
                host(p.protected_by),
                ms(p.detection_ms),
                ms(p.lease_wait_ms),
                ms(p.activation_ms),
                ms(p.failover_ms),
                ms(p.reprotect_ms),
                p.commits_after_kill.to_string(),
                format!("{} → {}", p.outputs_at_kill, p.outputs_at_end),
                if p.ok { "ok" } else { "FAILED" }.to_string(),
            ]
        }),
    )
}

/// Print the report: the table, each pair's outcome and any failed check.
pub fn print_summary(r: &ClusterReport) {
    println!();
    println!(
        "{} pairs on {} hosts ({} guests, {} memory, {} workload, mode {}, lease TTL {}); host {} killed ({} processes{})",
        r.pairs.len(),
        r.hosts,
        r.guest,
        r.memory,
        r.workload,
        r.mode,
        r.lease_ttl,
        r.killed_host,
        r.killed_processes,
        if r.power_off {
            ", its link down first"
        } else {
            ""
        }
    );
    println!();
    print!("{}", markdown(r));
    println!();
    for p in &r.pairs {
        println!("pair {}: {}", p.pair, p.outcome);
        for (name, ok, detail) in &p.checks {
            if !ok {
                println!("  [FAIL] {name} ({detail})");
            }
        }
    }
    println!(
        "verdict: {}",
        if r.ok {
            "EVERY PAIR OK"
        } else {
            "SOME PAIR FAILED"
        }
    );
    if let Some(d) = &r.dir {
        println!("logs: {d}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pair_uses_three_hosts_and_primaries_are_spread() {
        for hosts in 3..8 {
            let mut primaries = vec![0; hosts];
            for i in 0..2 * hosts {
                let (p, b, s) = placement(i, hosts);
                assert!(p != b && b != s && p != s, "pair {i} on {hosts} hosts");
                primaries[p] += 1;
            }
            assert!(primaries.iter().all(|&n| n == 2), "{primaries:?}");
        }
    }
}
