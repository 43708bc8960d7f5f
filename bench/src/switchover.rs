//! `ha-bench switchover`: what moving a protected guest to its backup host costs. Three
//! ways, each over every link rate asked for (`--link-rate` at the primary's sender):
//! a planned switchover (SIGUSR1: last checkpoint, handover, the backup activates from
//! it), a failover (SIGKILL of the primary: the backup detects and activates from its last
//! commit), and a cold restart (the pair killed and the guest started anew on the other
//! host with a fresh backup: its state is lost, and its output waits for the new pair's
//! initial sync and first commit). Each run is a fresh pair of processes on loopback.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ha_backend::BackendKind;
use ha_wire::output::Consumer;
use serde_json::Value;

use crate::pair::{self, BackupSpec, Kill, PairError, PrimarySpec, unix_ms};

/// What to run.
#[derive(Debug, Clone)]
pub struct SwitchoverArgs {
    /// The guest backend.
    pub guest: BackendKind,
    /// Guest memory.
    pub memory: String,
    /// The workload.
    pub workload: String,
    /// Link rates in bits per second (None: unlimited), one set of runs each.
    pub links: Vec<Option<u64>>,
    /// Seconds the guest runs protected before it is moved.
    pub warmup: f64,
    /// Where the runs' logs go.
    pub dir: PathBuf,
}

/// How the guest was moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// SIGUSR1 to the primary.
    Switchover,
    /// SIGKILL of the primary.
    Failover,
    /// The pair killed, the guest started anew with a fresh backup.
    ColdRestart,
}

impl Method {
    /// All three, in the report's order.
    pub const ALL: [Self; 3] = [Self::Switchover, Self::Failover, Self::ColdRestart];

    fn name(self) -> &'static str {
        match self {
            Self::Switchover => "switchover",
            Self::Failover => "failover",
            Self::ColdRestart => "cold restart",
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MoveRow {
    /// The link ("unlimited" or its rate).
    pub link: String,
    /// How the guest moved.
    pub method: Method,
    /// The guest stopped → running again on the other host, ms: switchover, the primary's
    /// pause → the backup's `active`; failover, the kill → `active`; cold restart, the
    /// kill → the new guest's first output record at the world (its output is held until
    /// the new pair's first commit).
    pub downtime_ms: u64,
    /// The world's view: its last output record before the move → its first after, ms.
    pub output_gap_ms: u64,
    /// Bytes that crossed the link to move the guest: the switchover's last checkpoint,
    /// nothing for a failover (the backup already holds the last commit), the new pair's
    /// initial sync for a cold restart.
    pub move_bytes: u64,
    /// The initial sync the pair paid when it was first protected, bytes (for scale).
    pub sync_bytes: u64,
    /// Whether the guest kept its state (its progress went on from where it was).
    pub state_kept: bool,
    /// The guest's progress counter before the move and right after.
    pub progress_before: u64,
    /// Right after (0 for a cold restart: it starts anew).
    pub progress_after: u64,
}

/// Every method over every link; `each` sees each row as it ends.
pub fn run(a: &SwitchoverArgs, mut each: impl FnMut(&MoveRow)) -> Result<Vec<MoveRow>, PairError> {
    let bins = pair::daemons()?;
    let mut rows = Vec::new();
    for (i, link) in a.links.iter().enumerate() {
        for m in Method::ALL {
            let run = a
                .dir
                .join(format!("link{i}-{}", m.name().replace(' ', "-")));
            let _ = std::fs::remove_dir_all(&run);
            std::fs::create_dir_all(&run)?;
            let row = one(a, &run, (&bins.0, &bins.1), *link, m)?;
            each(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The first event `name` in `path` within a minute, or a stall naming `what`.
fn wait(path: &Path, name: &str, what: &str, run: &Path) -> Result<Value, PairError> {
    pair::wait_event(path, name, Duration::from_secs(60))
        .ok_or_else(|| PairError::Stalled(what.to_string(), run.to_path_buf()))
}

/// A running pair in `dir` (files prefixed by `tag`).
struct Pair {
    world: Consumer,
    primary: Kill,
    /// Held so that it dies with the pair.
    _backup: Kill,
    events: PathBuf,
    backup_events: PathBuf,
    protected: Value,
}

impl Pair {
    /// The backup's `active` event, once it took the guest over.
    fn taken_over(&self, run: &Path) -> Result<Value, PairError> {
        wait(
            &self.backup_events,
            "active",
            "the backup never took over",
            run,
        )
    }
}

/// Start a pair in `run` whose files are named `tag.*`, and wait until it is protected.
fn start(
    a: &SwitchoverArgs,
    run: &Path,
    tag: &str,
    (primary_bin, backup_bin): (&Path, &Path),
    link: Option<u64>,
) -> Result<Pair, PairError> {
    let dir = run.join(tag);
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("pair.key");
    pair::keygen(primary_bin, &key, &dir)?;
    let key_args = vec!["--key".to_string(), key.display().to_string()];
    let f = |n: &str| dir.join(n).display().to_string();
    let world = Consumer::start(dir.join("ack.log"))?;
    let s = |v: &str| v.to_string();
    let backup_args = BackupSpec {
        dir: &dir,
        memory: &a.memory,
        mode: "fgbi",
        guest: a.guest,
        interval: "25ms",
        detect_timeout: "500ms",
        key_args: &key_args,
    }
    .args(&[
        s("--output"),
        world.addr.to_string(),
        s("--ack-log"),
        f("ack.log"),
        s("--events"),
        f("backup.events"),
        s("--exit-after"),
        s("2s"),
    ]);
    // Each daemon's stderr goes to `NAME.log` beside its files.
    let spawn = |bin: &Path, args: &[String], what: &'static str| {
        pair::spawn(bin, args, &dir.join(format!("{}.log", &what[3..])), what)
    };
    let backup = spawn(backup_bin, &backup_args, "ha-backup")?;
    let addr = pair::backup_addr(&dir.join("port"), &dir)?;
    let events = dir.join("primary.events");
    let mut extra = vec![
        s("--output"),
        world.addr.to_string(),
        s("--stats"),
        f("primary.csv"),
        s("--output-every"),
        s("64"),
        s("--seed"),
        s("1"),
    ];
    if let Some(r) = link {
        extra.extend([s("--link-rate"), format!("{r}bit")]);
    }
    let primary_args = PrimarySpec {
        backup: &addr,
        guest: a.guest,
        memory: &a.memory,
        workload: &a.workload,
        mode: "fgbi",
        interval: "25ms",
        events: &events,
        key_args: &key_args,
    }
    .args(&extra);
    let primary = spawn(primary_bin, &primary_args, "ha-primary")?;
    let protected = wait(&events, "protected", "the pair was never protected", &dir)?;
    Ok(Pair {
        world,
        primary,
        _backup: backup,
        backup_events: dir.join("backup.events"),
        events,
        protected,
    })
}

/// The last progress the backup saw committed (its last `checkpoint` event).
fn last_progress(backup_events: &Path) -> u64 {
    pair::events(backup_events)
        .iter()
        .rev()
        .find(|e| e["event"] == "checkpoint")
        .and_then(|e| e["progress"].as_u64())
        .unwrap_or(0)
}

/// The wire bytes of the last checkpoint in a primary's stats CSV.
fn last_checkpoint_bytes(csv: &Path) -> u64 {
    let text = std::fs::read_to_string(csv).unwrap_or_default();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let (Some(cp), Some(wire)) = (
        header.iter().position(|c| *c == "checkpoint"),
        header.iter().position(|c| *c == "wire_bytes"),
    ) else {
        return 0;
    };
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.get(cp) == Some(&"1")).then(|| f.get(wire)?.parse::<u64>().ok())?
        })
        .next_back()
        .unwrap_or(0)
}

/// Wait (at most 20 s) for a child to exit.
fn reap(k: &mut Kill) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if !matches!(k.0.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One move of a guest by `m` over `link`, in `run`.
fn one(
    a: &SwitchoverArgs,
    run: &Path,
    bins: (&Path, &Path),
    link: Option<u64>,
    m: Method,
) -> Result<MoveRow, PairError> {
    let mut p = start(a, run, "pair", bins, link)?;
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    let sync_bytes = p.protected["precopy_wire_bytes"].as_u64().unwrap_or(0);
    let link_name = link.map_or_else(
        || "unlimited".to_string(),
        |r| format!("{} Mbit/s", r as f64 / 1e6),
    );
    let row = |downtime_ms, output_gap_ms, move_bytes, state_kept, before, after| MoveRow {
        link: link_name.clone(),
        method: m,
        downtime_ms,
        output_gap_ms,
        move_bytes,
        sync_bytes,
        state_kept,
        progress_before: before,
        progress_after: after,
    };
    let gap = |w: &Consumer| {
        let v = w.view();
        v.backup_first_ms.saturating_sub(v.primary_last_ms)
    };
    match m {
        Method::Switchover => {
            let pid = libc::pid_t::try_from(p.primary.0.id()).unwrap_or(libc::pid_t::MAX);
            // SAFETY: kill(2) sends SIGUSR1 to our child, the primary; no memory is
            // involved.
            unsafe {
                libc::kill(pid, libc::SIGUSR1);
            }
            let sw = wait(
                &p.events,
                "switched_over",
                "the primary never switched over",
                run,
            )?;
            let active = p.taken_over(run)?;
            reap(&mut p.primary);
            std::thread::sleep(Duration::from_millis(200));
            let down = active["t_ms"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(sw["paused_unix_ms"].as_u64().unwrap_or(0));
            let bytes = last_checkpoint_bytes(&run.join("pair/primary.csv"));
            let after = active["progress"].as_u64().unwrap_or(0);
            Ok(row(down, gap(&p.world), bytes, true, after, after))
        }
        Method::Failover => {
            let before = last_progress(&p.backup_events);
            let t_kill = unix_ms();
            let _ = p.primary.0.kill();
            let _ = p.primary.0.wait();
            let active = p.taken_over(run)?;
            std::thread::sleep(Duration::from_millis(200));
            let down = active["t_ms"].as_u64().unwrap_or(0).saturating_sub(t_kill);
            let after = active["progress"].as_u64().unwrap_or(0);
            Ok(row(down, gap(&p.world), 0, true, before, after))
        }
        Method::ColdRestart => {
            let before = last_progress(&p.backup_events);
            let last_out = p.world.view().primary_last_ms;
            let t_kill = unix_ms();
            drop(p); // SIGKILL to both daemons
            let fresh = start(a, run, "restart", bins, link)?;
            let t = Instant::now();
            while fresh.world.view().next_seq == 0 && t.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let first = unix_ms();
            let bytes = fresh.protected["precopy_wire_bytes"].as_u64().unwrap_or(0);
            Ok(row(
                first.saturating_sub(t_kill),
                first.saturating_sub(last_out),
                bytes,
                false,
                before,
                0,
            ))
        }
    }
}

/// The rows as a markdown table.
pub fn markdown(rows: &[MoveRow]) -> String {
    let head = [
        "link",
        "method",
        "downtime ms",
        "output gap ms",
        "bytes to move",
        "initial sync bytes",
        "state kept",
    ];
    crate::markdown_table(
        &head,
        rows.iter().map(|r| {
            vec![
                r.link.clone(),
                r.method.name().to_string(),
                r.downtime_ms.to_string(),
                r.output_gap_ms.to_string(),
                format!("{:.1} KB", r.move_bytes as f64 / 1e3),
                format!("{:.1} MB", r.sync_bytes as f64 / 1e6),
                if r.state_kept {
                    format!("yes ({} → {})", r.progress_before, r.progress_after)
                } else {
                    "no (starts anew)".to_string()
                },
            ]
        }),
    )
}
