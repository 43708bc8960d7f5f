//! `ha-bench chaos`: the fault campaign. Seeded runs of a real pair — `ha-primary` and
//! `ha-backup` as separate processes, the link through a fault proxy, the world checking
//! every released output record against the backup's ack log — in which one fault strikes
//! at a random moment for a random length. After each run the checker holds the run to the
//! invariants of the design brief and says, for each, whether it held, was given up by the
//! configured policy (by design), or broke (a defect):
//!
//! - output: the world never saw output that no committed checkpoint can reproduce: no
//!   gap, no changed repeat, no primary release ahead of the commits — except the releases
//!   of a primary that lost its backup and continues unprotected under the default policy;
//! - one copy: at most one copy of the guest released output at a time (two at once is the
//!   default policy's documented split brain when the link fails while both sides live);
//! - running: some side runs the guest once the fault has passed, unless both are dead
//!   (under `--fence` a primary that lost its backup stops the guest by design);
//! - committed: a backup that takes over resumes from its last committed checkpoint.
//!
//! The scenarios: SIGKILL or SIGSTOP (then SIGCONT) of either daemon, the link cut or
//! stalled, acks delayed, the backup's disk filled (its ack log on a small tmpfs), and the
//! backup killed and restarted.

use crate::pair::{BackupSpec, Kill, PairError, backup_addr, daemons, events, keygen, spawn};
use crate::proxy::FaultProxy;
use ha_backend::BackendKind;
use ha_wire::output::{Consumer, WorldView, unix_ms};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The backup's detection timeout in the campaign.
const DETECT_MS: u64 = 400;
/// The primary's ack timeout in the campaign.
const ACK_TIMEOUT_MS: u64 = 1000;
/// How long after a fault ends the pair is left to settle before the running check.
const SETTLE: Duration = Duration::from_millis(2500);

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// SIGKILL the primary.
    KillPrimary,
    /// SIGKILL the backup.
    KillBackup,
    /// SIGSTOP the primary for the fault's length, then SIGCONT.
    StopPrimary,
    /// SIGSTOP the backup for the fault's length, then SIGCONT.
    StopBackup,
    /// Close the link both ways (a reset both sides see).
    CutLink,
    /// Forward nothing on the link for the fault's length (a partition that heals).
    StallLink,
    /// Delay everything the backup sends (its acks) by the fault's length.
    DelayAcks,
    /// Fill the disk that holds the backup's ack log.
    FullDisk,
    /// SIGKILL the backup and start a new, empty one on the same address.
    RestartBackup,
}

impl Scenario {
    /// Every scenario, in the campaign's order.
    pub const ALL: [Scenario; 9] = [
        Scenario::KillPrimary,
        Scenario::KillBackup,
        Scenario::StopPrimary,
        Scenario::StopBackup,
        Scenario::CutLink,
        Scenario::StallLink,
        Scenario::DelayAcks,
        Scenario::FullDisk,
        Scenario::RestartBackup,
    ];

    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillPrimary => "kill-primary",
            Scenario::KillBackup => "kill-backup",
            Scenario::StopPrimary => "stop-primary",
            Scenario::StopBackup => "stop-backup",
            Scenario::CutLink => "cut-link",
            Scenario::StallLink => "stall-link",
            Scenario::DelayAcks => "delay-acks",
            Scenario::FullDisk => "full-disk",
            Scenario::RestartBackup => "restart-backup",
        }
    }

    /// The scenario called `s`.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|x| x.name()).collect();
                format!("unknown scenario {s:?} (one of {})", names.join(", "))
            })
    }

    /// Whether the fault lasts a while (the others strike at once).
    fn has_length(self) -> bool {
        matches!(
            self,
            Scenario::StopPrimary
                | Scenario::StopBackup
                | Scenario::StallLink
                | Scenario::DelayAcks
        )
    }
}

/// Campaign settings.
#[derive(Debug, Clone)]
pub struct ChaosArgs {
    /// Runs in all.
    pub runs: usize,
    /// The first run's seed; run i uses `seed + i`.
    pub seed: u64,
    /// The scenarios, taken in turn.
    pub scenarios: Vec<Scenario>,
    /// The guest backend (kvm or sim).
    pub guest: BackendKind,
    /// Guest memory ("32M").
    pub memory: String,
    /// Keep every run's directory (logs, events, ack log).
    pub keep: bool,
}

/// How one invariant fared in a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "why")]
pub enum Verdict {
    /// It held.
    Ok,
    /// The configured policy gave it up, as documented.
    ByDesign(String),
    /// It broke.
    Defect(String),
}

/// One run's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    /// Its index.
    pub run: usize,
    /// Its seed.
    pub seed: u64,
    /// The fault.
    pub scenario: Scenario,
    /// `--fence` or the default (continue unprotected).
    pub policy: &'static str,
    /// When the fault struck, ms after the pair was protected.
    pub fault_at_ms: u64,
    /// The fault's length, ms (0 for one that strikes at once).
    pub fault_ms: u64,
    /// What happened, in words.
    pub outcome: String,
    /// The output invariant.
    pub output: Verdict,
    /// At most one copy releasing at a time.
    pub one_copy: Verdict,
    /// The guest runs somewhere.
    pub running: Verdict,
    /// A takeover resumes from the last commit.
    pub committed: Verdict,
    /// Records the world saw, from the primary and from the backup.
    pub records: (u64, u64),
    /// The run's directory, when kept.
    pub dir: Option<String>,
}

impl RunResult {
    /// The run's overall verdict: the worst of its four.
    pub fn verdict(&self) -> &Verdict {
        let all = [&self.output, &self.one_copy, &self.running, &self.committed];
        all.iter()
            .find(|v| matches!(v, Verdict::Defect(_)))
            .or_else(|| all.iter().find(|v| matches!(v, Verdict::ByDesign(_))))
            .copied()
            .unwrap_or(&Verdict::Ok)
    }
}

/// A small deterministic generator (splitmix64) for the fault schedule.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// Run the campaign, calling `each` with every run's result as it ends.
pub fn run(a: &ChaosArgs, mut each: impl FnMut(&RunResult)) -> Result<Vec<RunResult>, PairError> {
    let bins = daemons()?;
    let mut out = Vec::with_capacity(a.runs);
    for i in 0..a.runs {
        let scenario = a.scenarios[i % a.scenarios.len().max(1)];
        // Each scenario under both policies in turn.
        let fence = (i / a.scenarios.len().max(1)) % 2 == 1;
        let r = run_one(a, &bins, i, scenario, fence)?;
        each(&r);
        out.push(r);
    }
    Ok(out)
}

/// The files and processes of one run.
struct Run<'a> {
    dir: PathBuf,
    a: &'a ChaosArgs,
    bins: &'a (PathBuf, PathBuf),
    key: Vec<String>,
    world: Consumer,
    ack_log: PathBuf,
    /// Where the backup's ack log and stats go (a small tmpfs for the full-disk scenario).
    disk: PathBuf,
}

impl Run<'_> {
    fn f(&self, n: &str) -> PathBuf {
        self.dir.join(n)
    }

    fn stalled(&self, what: &str) -> PairError {
        PairError::Stalled(what.to_string(), self.dir.clone())
    }

    /// Start a backup listening on `listen`, its files named after `name`.
    fn backup(&self, name: &str, listen: Option<&str>) -> Result<Kill, PairError> {
        let s = |v: &str| v.to_string();
        let mut args = BackupSpec {
            dir: &self.dir,
            memory: &self.a.memory,
            mode: "fgbi",
            guest: self.a.guest,
            interval: "25ms",
            detect_timeout: &format!("{DETECT_MS}ms"),
            key_args: &self.key,
        }
        .args(&[
            s("--output"),
            self.world.addr.to_string(),
            s("--ack-log"),
            self.ack_log.display().to_string(),
            s("--events"),
            self.f(&format!("{name}.events")).display().to_string(),
            s("--stats"),
            self.disk.join(format!("{name}.csv")).display().to_string(),
        ]);
        if let Some(l) = listen {
            // Replace the ephemeral port with the address given.
            if let Some(i) = args.iter().position(|x| x == "--listen") {
                args[i + 1] = l.to_string();
            }
        }
        spawn(
            &self.bins.1,
            &args,
            &self.f(&format!("{name}.log")),
            "ha-backup",
        )
    }

    fn primary(&self, target: &str, fence: bool) -> Result<Kill, PairError> {
        let s = |v: &str| v.to_string();
        let mut args = vec![
            s("--backup"),
            s(target),
            s("--guest"),
            self.a.guest.to_string(),
            s("--workload"),
            s("web"),
            s("--memory"),
            self.a.memory.clone(),
            s("--mode"),
            s("fgbi"),
            s("--interval"),
            s("25ms"),
            s("--rate"),
            s("20000"),
            s("--output-every"),
            s("32"),
            s("--output"),
            self.world.addr.to_string(),
            s("--events"),
            self.f("primary.events").display().to_string(),
            s("--ack-timeout"),
            format!("{ACK_TIMEOUT_MS}ms"),
        ];
        args.extend(self.key.iter().cloned());
        if fence {
            args.push(s("--fence"));
        }
        spawn(&self.bins.0, &args, &self.f("primary.log"), "ha-primary")
    }
}

/// A small tmpfs for the backup's ack log (the full-disk scenario); None where it cannot
/// be mounted (not root).
fn small_disk(dir: &Path) -> Option<PathBuf> {
    let d = dir.join("disk");
    std::fs::create_dir_all(&d).ok()?;
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "castor-chaos"])
        .arg(&d)
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(d)
}

/// Fill the file system holding `dir` until it refuses more.
fn fill(dir: &Path) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::File::create(dir.join("filler")) {
        let block = [0xAAu8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
}

fn signal(k: &Kill, sig: i32) {
    // SAFETY: kill(2) on our own child's pid, which is not reaped until the `Kill` drops;
    // no memory is involved.
    unsafe {
        libc::kill(k.0.id().cast_signed(), sig);
    }
}

fn alive(k: &mut Kill) -> bool {
    matches!(k.0.try_wait(), Ok(None))
}

fn first<'a>(evs: &'a [Value], name: &str) -> Option<&'a Value> {
    evs.iter().find(|e| e["event"] == name)
}

fn run_one(
    a: &ChaosArgs,
    bins: &(PathBuf, PathBuf),
    i: usize,
    scenario: Scenario,
    fence: bool,
) -> Result<RunResult, PairError> {
    let seed = a.seed.wrapping_add(i as u64);
    let mut rng = Rng(seed);
    let dir = std::env::temp_dir().join(format!(
        "castor-chaos-{}-{}-{i}",
        std::process::id(),
        unix_ms()
    ));
    std::fs::create_dir_all(&dir)?;
    let disk = (scenario == Scenario::FullDisk)
        .then(|| small_disk(&dir))
        .flatten();
    if scenario == Scenario::FullDisk && disk.is_none() {
        return Err(PairError::Stalled(
            "the full-disk scenario mounts a small tmpfs and needs root".into(),
            dir,
        ));
    }
    let disk_dir = disk.clone().unwrap_or_else(|| dir.clone());
    let ack_log = disk_dir.join("ack.log");
    keygen(&bins.0, &dir.join("pair.key"), &dir)?;
    let run = Run {
        key: vec!["--key".into(), dir.join("pair.key").display().to_string()],
        world: Consumer::start(ack_log.clone())?,
        ack_log,
        disk: disk_dir,
        dir,
        a,
        bins,
    };
    let res = drive(&run, &mut rng, i, seed, scenario, fence);
    if let Some(d) = &disk {
        let _ = Command::new("umount").arg("-l").arg(d).status();
    }
    let res = res?;
    if a.keep {
        Ok(RunResult {
            dir: Some(run.dir.display().to_string()),
            ..res
        })
    } else {
        let _ = std::fs::remove_dir_all(&run.dir);
        Ok(res)
    }
}

/// Start the pair, strike, settle, end the primary, and judge.
fn drive(
    run: &Run<'_>,
    rng: &mut Rng,
    i: usize,
    seed: u64,
    scenario: Scenario,
    fence: bool,
) -> Result<RunResult, PairError> {
    let mut backup = run.backup("backup", None)?;
    let baddr = backup_addr(&run.f("port"), &run.dir)?;
    let proxy = FaultProxy::start(baddr.parse().map_err(|_| run.stalled("bad port file"))?)?;
    let mut primary = run.primary(&proxy.addr.to_string(), fence)?;
    let t = Instant::now();
    while first(&events(&run.f("primary.events")), "protected").is_none() {
        if t.elapsed() > Duration::from_secs(60) || !alive(&mut primary) {
            return Err(run.stalled("the primary never reached the protected state"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let fault_at = rng.range(200, 1500);
    let len = if scenario.has_length() {
        rng.range(100, 3000)
    } else {
        0
    };
    std::thread::sleep(Duration::from_millis(fault_at));
    let mut second = None;
    match scenario {
        Scenario::KillPrimary => signal(&primary, libc::SIGKILL),
        Scenario::KillBackup => signal(&backup, libc::SIGKILL),
        Scenario::StopPrimary | Scenario::StopBackup => {
            let who = if scenario == Scenario::StopPrimary {
                &primary
            } else {
                &backup
            };
            signal(who, libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(len));
            signal(who, libc::SIGCONT);
        }
        Scenario::CutLink => proxy.cut(),
        Scenario::StallLink => {
            proxy.stall(true);
            std::thread::sleep(Duration::from_millis(len));
            proxy.stall(false);
        }
        Scenario::DelayAcks => {
            proxy.delay_acks(Duration::from_millis(len));
            std::thread::sleep(Duration::from_millis(len));
        }
        Scenario::FullDisk => {
            fill(&run.disk);
            // The backup fails at its next write that needs a new page of the tmpfs
            // (its stats grow a page in a few seconds): wait for that, at most 20 s.
            let t = Instant::now();
            while alive(&mut backup) && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Scenario::RestartBackup => {
            signal(&backup, libc::SIGKILL);
            let _ = backup.0.wait();
            second = Some(run.backup("backup2", Some(&baddr))?);
        }
    }
    std::thread::sleep(SETTLE);
    // The running check, once the fault has passed.
    let p_ev = events(&run.f("primary.events"));
    let b_ev = events(&run.f("backup.events"));
    let primary_alive = alive(&mut primary);
    let primary_fenced = first(&p_ev, "backup_lost").is_some_and(|e| e["policy"] == "fence");
    let backup_active = alive(&mut backup) && first(&b_ev, "active").is_some();
    let running_here = primary_alive && !primary_fenced;
    // End: the primary dies, so a backup still following must take over; an active
    // backup runs the guest a second longer, then is stopped.
    signal(&primary, libc::SIGKILL);
    let _ = primary.0.wait();
    let t = Instant::now();
    while alive(&mut backup) && t.elapsed() < Duration::from_secs(15) {
        if first(&events(&run.f("backup.events")), "active").is_some() {
            std::thread::sleep(Duration::from_secs(1));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for b in std::iter::once(&backup).chain(second.as_ref()) {
        signal(b, libc::SIGTERM);
    }
    let t = Instant::now();
    while alive(&mut backup) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(second);
    drop(backup);
    std::thread::sleep(Duration::from_millis(100));
    let world = run.world.view();
    let p_ev = events(&run.f("primary.events"));
    let b_ev = events(&run.f("backup.events"));
    let acks = ack_log(&run.ack_log);
    Ok(judge(
        Judged {
            run: i,
            seed,
            scenario,
            fence,
            fault_at_ms: fault_at,
            fault_ms: len,
        },
        &p_ev,
        &b_ev,
        &acks,
        &world,
        (running_here, backup_active, primary_alive),
    ))
}

/// The ack log's complete lines.
fn ack_log(p: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |n| &text[..n]);
    complete
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(str::parse::<u64>);
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .collect()
}

/// What identifies a run.
struct Judged {
    run: usize,
    seed: u64,
    scenario: Scenario,
    fence: bool,
    fault_at_ms: u64,
    fault_ms: u64,
}

/// Hold a run to the invariants. `state` is what the running check saw once the fault
/// had passed: (the primary runs the guest, the backup runs it, the primary process lives).
fn judge(
    id: Judged,
    p_ev: &[Value],
    b_ev: &[Value],
    acks: &[(u64, u64)],
    world: &WorldView,
    (running_here, backup_active, primary_alive): (bool, bool, bool),
) -> RunResult {
    let t = |e: Option<&Value>| e.and_then(|e| e["t_ms"].as_u64());
    let lost = first(p_ev, "backup_lost");
    let continued_at = lost
        .filter(|e| e["policy"] == "continue")
        .and_then(|e| t(Some(e)));
    let active = first(b_ev, "active");
    let stood_down = first(b_ev, "primary_stood_down").is_some();
    // Two copies speaking: the backup resumed from the checkpoint whose output head is H,
    // and the primary released a record at or past H (before or after the takeover). A
    // primary that flushes acknowledged output after the takeover releases records below
    // H: the same records the backup re-releases, with the same content.
    let resumed_head = active.and_then(|a| a["out_head"].as_u64());
    let overlap = resumed_head.is_some_and(|h| world.primary_next > h);
    let split = overlap && continued_at.is_some();

    let one_copy = match (overlap, split) {
        (false, _) => Verdict::Ok,
        (true, true) => Verdict::ByDesign(
            "split brain: the link failed while both lived and the default policy continues \
             unprotected (use --fence, or leases)"
                .into(),
        ),
        (true, false) => Verdict::Defect(format!(
            "the primary released records up to {} past the checkpoint the backup resumed \
             from (out_head {}); its last release came {} ms after the backup's first",
            world.primary_next.saturating_sub(1),
            resumed_head.unwrap_or(0),
            world.primary_last_ms.saturating_sub(world.backup_first_ms)
        )),
    };

    // Releases ahead of the commits are the default policy's once the primary continues
    // unprotected; any other violation is a defect, unless it comes of a split brain.
    let mut defects = Vec::new();
    let mut by_design = 0;
    for (v, at) in world.violations.iter().zip(&world.violations_at_ms) {
        let early = v.contains("before a checkpoint");
        let unprotected = continued_at.is_some_and(|c| *at + 50 >= c);
        if (early && unprotected) || split {
            by_design += 1;
        } else {
            defects.push(v.clone());
        }
    }
    let output = if let Some(d) = defects.first() {
        Verdict::Defect(format!("{} violations, first: {d}", defects.len()))
    } else if by_design > 0 {
        Verdict::ByDesign(format!(
            "{by_design} releases by a primary running unprotected (default policy)"
        ))
    } else {
        Verdict::Ok
    };

    let running = if running_here || backup_active {
        Verdict::Ok
    } else if !primary_alive {
        Verdict::Defect(
            "the guest runs nowhere: the primary died and the backup did not take over".into(),
        )
    } else if id.fence && lost.is_some() {
        Verdict::ByDesign(
            "fenced: the primary lost its backup, and with no backup to take over the guest \
             stays paused (--fence)"
                .into(),
        )
    } else {
        Verdict::Defect("the guest runs nowhere once the fault has passed".into())
    };

    let last_commit = acks.last().map(|x| x.0);
    let committed = match active {
        None => Verdict::Ok,
        Some(a) if a["epoch"].as_u64() == last_commit => Verdict::Ok,
        Some(a) => Verdict::Defect(format!(
            "the backup resumed from epoch {} but its last commit is {last_commit:?}",
            a["epoch"]
        )),
    };

    let outcome = match (active.is_some(), stood_down, lost) {
        (true, _, Some(l)) if l["assumed"].is_string() => {
            "primary stood still, fenced itself; backup took over".to_string()
        }
        (true, _, Some(l)) => format!(
            "backup lost ({}); backup took over",
            l["policy"].as_str().unwrap_or("?")
        ),
        (true, _, None) => "backup took over".into(),
        (false, true, _) => "backup stood down; primary ran on unprotected".into(),
        (false, false, Some(l)) => format!(
            "backup gone; primary {}",
            if l["policy"] == "fence" {
                "fenced"
            } else {
                "ran on unprotected"
            }
        ),
        (false, false, None) => "no failover".into(),
    };
    RunResult {
        run: id.run,
        seed: id.seed,
        scenario: id.scenario,
        policy: if id.fence { "fence" } else { "continue" },
        fault_at_ms: id.fault_at_ms,
        fault_ms: id.fault_ms,
        outcome,
        output,
        one_copy,
        running,
        committed,
        records: (world.from_primary, world.from_backup),
        dir: None,
    }
}

/// The head of the campaign's table of runs.
pub const TABLE_HEAD: &str = "| run | seed | scenario | policy | at ms | length ms | outcome | verdict |\n\
                              |---|---|---|---|---|---|---|---|";

/// A run's row in the table of runs.
pub fn table_row(r: &RunResult) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} |{}",
        r.run,
        r.seed,
        r.scenario.name(),
        r.policy,
        r.fault_at_ms,
        r.fault_ms,
        r.outcome,
        verdict_text(r.verdict()),
        r.dir.as_deref().map_or(String::new(), |d| format!(" {d}"))
    )
}

/// The campaign's table: one row a run, then the tally by scenario and policy.
pub fn table(results: &[RunResult]) -> String {
    let mut s = String::from(TABLE_HEAD);
    s.push('\n');
    for r in results {
        s.push_str(&table_row(r));
        s.push('\n');
    }
    s.push('\n');
    s.push_str(&tally(results));
    s
}

/// Runs, ok, by-design and defect verdicts per scenario and policy.
pub fn tally(results: &[RunResult]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "| scenario | policy | runs | ok | by design | defects |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for sc in Scenario::ALL {
        for pol in ["continue", "fence"] {
            let rs: Vec<_> = results
                .iter()
                .filter(|r| r.scenario == sc && r.policy == pol)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let count = |f: fn(&Verdict) -> bool| rs.iter().filter(|r| f(r.verdict())).count();
            let _ = writeln!(
                s,
                "| {} | {pol} | {} | {} | {} | {} |",
                sc.name(),
                rs.len(),
                count(|v| matches!(v, Verdict::Ok)),
                count(|v| matches!(v, Verdict::ByDesign(_))),
                count(|v| matches!(v, Verdict::Defect(_))),
            );
        }
    }
    s
}

/// A verdict in a table cell.
pub fn verdict_text(v: &Verdict) -> String {
    match v {
        Verdict::Ok => "ok".into(),
        Verdict::ByDesign(w) => format!("by design: {w}"),
        Verdict::Defect(w) => format!("DEFECT: {w}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(fence: bool) -> Judged {
        Judged {
            run: 0,
            seed: 1,
            scenario: Scenario::StopPrimary,
            fence,
            fault_at_ms: 10,
            fault_ms: 100,
        }
    }

    #[test]
    fn two_copies_releasing_is_a_defect_unless_the_default_policy_continued() {
        let world = WorldView {
            backup_first_ms: 1000,
            primary_last_ms: 1500,
            primary_next: 12,
            violations: vec!["Primary: output seq 7 repeated with different content".into()],
            violations_at_ms: vec![1400],
            ..WorldView::default()
        };
        let b_ev = [json!({"event": "active", "epoch": 9, "out_head": 5, "t_ms": 990})];
        let acks = [(9, 5)];
        // The primary never said it continued unprotected: a defect on two counts.
        let r = judge(id(false), &[], &b_ev, &acks, &world, (true, true, true));
        assert!(matches!(r.one_copy, Verdict::Defect(_)), "{r:?}");
        assert!(matches!(r.output, Verdict::Defect(_)), "{r:?}");
        // It continued under the default policy: the documented split brain.
        let p_ev = [json!({"event": "backup_lost", "policy": "continue", "t_ms": 900})];
        let r = judge(id(false), &p_ev, &b_ev, &acks, &world, (true, true, true));
        assert!(matches!(r.one_copy, Verdict::ByDesign(_)), "{r:?}");
        assert!(matches!(r.output, Verdict::ByDesign(_)), "{r:?}");
        assert!(matches!(r.verdict(), Verdict::ByDesign(_)));
        // Records below the resumed head, flushed late by the primary: one copy speaking.
        let late = WorldView {
            backup_first_ms: 1000,
            primary_last_ms: 1500,
            primary_next: 5,
            ..WorldView::default()
        };
        let r = judge(id(true), &[], &b_ev, &acks, &late, (true, true, true));
        assert_eq!(r.one_copy, Verdict::Ok, "{r:?}");
    }

    #[test]
    fn early_releases_count_only_after_the_primary_continued() {
        let world = WorldView {
            violations: vec![
                "Primary: primary released seq 3 before a checkpoint holding it was acknowledged"
                    .into(),
            ],
            violations_at_ms: vec![800],
            ..WorldView::default()
        };
        let p_ev = [json!({"event": "backup_lost", "policy": "continue", "t_ms": 900})];
        let r = judge(id(false), &p_ev, &[], &[], &world, (true, false, true));
        assert!(matches!(r.output, Verdict::Defect(_)), "{r:?}");
        let p_ev = [json!({"event": "backup_lost", "policy": "continue", "t_ms": 700})];
        let r = judge(id(false), &p_ev, &[], &[], &world, (true, false, true));
        assert!(matches!(r.output, Verdict::ByDesign(_)), "{r:?}");
    }

    #[test]
    fn a_stale_takeover_and_a_guest_run_nowhere_are_defects() {
        let b_ev = [json!({"event": "active", "epoch": 7})];
        let r = judge(
            id(false),
            &[],
            &b_ev,
            &[(7, 1), (8, 2)],
            &WorldView::default(),
            (false, false, true),
        );
        assert!(matches!(r.committed, Verdict::Defect(_)), "{r:?}");
        assert!(matches!(r.running, Verdict::Defect(_)), "{r:?}");
        // Fenced with its backup gone: the guest stops by design.
        let p_ev = [json!({"event": "backup_lost", "policy": "fence"})];
        let r = judge(
            id(true),
            &p_ev,
            &[],
            &[],
            &WorldView::default(),
            (false, false, true),
        );
        assert!(matches!(r.running, Verdict::ByDesign(_)), "{r:?}");
        assert_eq!(r.verdict(), &r.running);
    }
}
