//! `ha-bench reprotect`: what protecting a guest again costs when the new backup holds an
//! image of it that is T seconds stale, against a full copy. A planned switchover with the
//! roles swapped is the experiment: A (`--become-backup`) hands the guest to B after a
//! warm-up and becomes B's backup with the guest's memory at the handover; B
//! (`--reprotect-to` A, through a proxy that refuses connections for T seconds) runs the
//! guest unprotected for T seconds, then resyncs A by fingerprints. The full copy is the
//! same run with a fresh backup (an empty image) in A's place: every non-zero page of the
//! guest at that moment crosses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_backend::BackendKind;
use serde_json::Value;

use crate::pair::{self, BackupSpec, PairError, PrimarySpec};
use crate::proxy::FaultProxy;

/// What to run.
#[derive(Debug, Clone)]
pub struct ReprotectArgs {
    /// The guest backend.
    pub guest: BackendKind,
    /// Guest memory (`--memory`).
    pub memory: String,
    /// The workload (`--workload`).
    pub workload: String,
    /// Seconds the new backup's image is stale (one pair of runs each).
    pub stale: Vec<f64>,
    /// Seconds the guest runs protected before the switchover (its memory fills).
    pub warmup: f64,
    /// Where the logs go.
    pub dir: PathBuf,
}

/// One staleness's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReprotectRow {
    /// Seconds asked for: the guest runs at B at least this long before the second
    /// backup is reachable.
    pub stale_s: f64,
    /// How long the guest actually ran unprotected at B before the comparison began (the
    /// swapped backup loads the image first), ms; the full copy's run waits as long.
    pub unprotected_ms: u64,
    /// Guest pages.
    pub pages: u64,
    /// Full copy (B → a fresh backup, same warm-up and staleness): pre-copy wire bytes.
    pub full_bytes: u64,
    /// Full copy: start of the sync → protected, ms.
    pub full_ms: u64,
    /// Resync (B → A's image): pages that differed.
    pub differ: u64,
    /// Resync: fingerprint bytes both ways.
    pub fingerprint_bytes: u64,
    /// Resync: pre-copy wire bytes.
    pub resync_bytes: u64,
    /// Resync: start of the sync → protected, ms.
    pub resync_ms: u64,
}

impl ReprotectRow {
    /// Bytes the resync moved (fingerprints and pages) per byte of the full copy.
    pub fn ratio(&self) -> f64 {
        (self.fingerprint_bytes + self.resync_bytes) as f64 / self.full_bytes.max(1) as f64
    }
}

/// For each staleness in `a.stale`, a switchover with the roles swapped and one to a fresh
/// backup; `each` sees each row as it ends.
pub fn run(
    a: &ReprotectArgs,
    mut each: impl FnMut(&ReprotectRow),
) -> Result<Vec<ReprotectRow>, PairError> {
    let bins = pair::daemons()?;
    let mut rows = Vec::new();
    for (i, &stale) in a.stale.iter().enumerate() {
        let run = a.dir.join(format!("run{i}"));
        let _ = std::fs::remove_dir_all(&run);
        let bins = (bins.0.as_path(), bins.1.as_path());
        let resync = one(a, &run.join("resync"), bins, Open::After(stale), true)?;
        let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        let unprotected_ms = u(&resync.reprotecting, "unprotected_ms");
        let full = one(
            a,
            &run.join("full"),
            bins,
            Open::AtMs(unprotected_ms),
            false,
        )?;
        let (compared, resync, full) = (resync.compared, resync.protected, full.protected);
        rows.push(ReprotectRow {
            stale_s: stale,
            unprotected_ms,
            pages: u(&compared, "pages"),
            full_bytes: u(&full, "precopy_wire_bytes"),
            full_ms: u(&full, "sync_ms"),
            differ: u(&compared, "differ"),
            fingerprint_bytes: u(&compared, "fingerprint_bytes"),
            resync_bytes: u(&resync, "precopy_wire_bytes"),
            resync_ms: u(&resync, "sync_ms"),
        });
        if let Some(r) = rows.last() {
            each(r);
        }
    }
    Ok(rows)
}

/// A free loopback port.
fn free_port() -> std::io::Result<std::net::SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The first event `name` in `path` within two minutes, or a stall naming `what`.
fn wait(path: &Path, name: &str, what: &str, run: &Path) -> Result<Value, PairError> {
    pair::wait_event(path, name, Duration::from_secs(120))
        .ok_or_else(|| PairError::Stalled(what.to_string(), run.to_path_buf()))
}

/// When the second backup becomes reachable for B.
#[derive(Debug, Clone, Copy)]
enum Open {
    /// This many seconds after it listens.
    After(f64),
    /// This many ms after B took the guest over.
    AtMs(u64),
}

/// B's re-protection events of one run (Null where there was none).
#[derive(Debug)]
struct Reprotection {
    reprotecting: Value,
    compared: Value,
    protected: Value,
}

/// One switchover in `run`: with `swap`, A becomes B's backup (its image at the
/// handover); without, a fresh backup listens in its place.
fn one(
    a: &ReprotectArgs,
    run: &Path,
    (primary_bin, backup_bin): (&Path, &Path),
    open: Open,
    swap: bool,
) -> Result<Reprotection, PairError> {
    std::fs::create_dir_all(run)?;
    let key = run.join("pair.key");
    pair::keygen(primary_bin, &key, run)?;
    let key_args = vec!["--key".to_string(), key.display().to_string()];
    // The second backup (A after the swap, or a fresh one): B reaches it through a proxy
    // that refuses connections until the staleness has passed.
    let second = free_port()?;
    let proxy = FaultProxy::start(second)?;
    proxy.refuse(true);
    let second_events = run.join("second-events.jsonl");
    let cfg = run.join("second.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{second}\"\nmemory = \"{}\"\nmode = \"fgbi\"\nguest = \"{}\"\n\
             interval = \"25ms\"\ndetect_timeout = \"2s\"\nevents = \"{}\"\nkey = \"{}\"\n",
            a.memory,
            a.guest.name(),
            second_events.display(),
            key.display(),
        ),
    )?;
    let _fresh = if swap {
        None
    } else {
        let args = vec!["--config".to_string(), cfg.display().to_string()];
        Some(pair::spawn(
            backup_bin,
            &args,
            &run.join("second.log"),
            "ha-backup",
        )?)
    };
    let spec = BackupSpec {
        dir: run,
        memory: &a.memory,
        mode: "fgbi",
        guest: a.guest,
        interval: "25ms",
        detect_timeout: "2s",
        key_args: &key_args,
    };
    let b_events = run.join("b-events.jsonl");
    let backup_args = spec.args(&[
        "--reprotect-to".into(),
        proxy.addr.to_string(),
        "--events".into(),
        b_events.display().to_string(),
    ]);
    let _b = pair::spawn(backup_bin, &backup_args, &run.join("b.log"), "ha-backup")?;
    let addr = pair::backup_addr(&run.join("port"), run)?;
    let a_events = run.join("a-events.jsonl");
    let become_backup = ["--become-backup".to_string(), cfg.display().to_string()];
    let primary_args = PrimarySpec {
        backup: &addr,
        guest: a.guest,
        memory: &a.memory,
        workload: &a.workload,
        mode: "fgbi",
        interval: "25ms",
        events: &a_events,
        key_args: &key_args,
    }
    .args(if swap { &become_backup } else { &[] });
    let a_proc = pair::spawn(primary_bin, &primary_args, &run.join("a.log"), "ha-primary")?;
    wait(&a_events, "protected", "A never protected the guest", run)?;
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    let pid = libc::pid_t::try_from(a_proc.0.id()).unwrap_or(libc::pid_t::MAX);
    // SAFETY: kill(2) sends SIGUSR1 to the child A; no memory is involved.
    unsafe {
        libc::kill(pid, libc::SIGUSR1);
    }
    let active = wait(&b_events, "active", "B never took over", run)?;
    wait(
        &second_events,
        "listening",
        "the second backup never listened",
        run,
    )?;
    match open {
        Open::After(s) => std::thread::sleep(Duration::from_secs_f64(s)),
        Open::AtMs(ms) => {
            let at = active["t_ms"].as_u64().unwrap_or(0) + ms;
            std::thread::sleep(Duration::from_millis(at.saturating_sub(pair::unix_ms())));
        }
    }
    proxy.refuse(false);
    let b_primary = run.join("b-events.jsonl.reprotect");
    let protected = wait(
        &b_primary,
        "protected",
        "B never protected the guest again",
        run,
    )?;
    let compared = if swap {
        wait(
            &b_primary,
            "memory_compared",
            "B never compared A's image",
            run,
        )?
    } else {
        Value::Null
    };
    let reprotecting = wait(&b_events, "reprotecting", "B never re-protected", run)?;
    Ok(Reprotection {
        reprotecting,
        compared,
        protected,
    })
}

/// The rows as a markdown table.
pub fn markdown(rows: &[ReprotectRow]) -> String {
    let head = [
        "stale (asked / ran unprotected)",
        "pages differing",
        "fingerprints",
        "resync bytes",
        "resync ms",
        "full copy bytes",
        "full copy ms",
        "resync ÷ full (bytes)",
    ];
    crate::markdown_table(
        &head,
        rows.iter().map(|r| {
            vec![
                format!(
                    "{:.0} s / {:.1} s",
                    r.stale_s,
                    r.unprotected_ms as f64 / 1e3
                ),
                format!(
                    "{} of {} ({:.1} %)",
                    r.differ,
                    r.pages,
                    100.0 * r.differ as f64 / r.pages.max(1) as f64
                ),
                format!("{:.1} KB", r.fingerprint_bytes as f64 / 1e3),
                format!("{:.1} MB", r.resync_bytes as f64 / 1e6),
                r.resync_ms.to_string(),
                format!("{:.1} MB", r.full_bytes as f64 / 1e6),
                r.full_ms.to_string(),
                format!("{:.3}", r.ratio()),
            ]
        }),
    )
}
