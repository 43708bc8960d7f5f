//! `ha-bench compare`: the modes side by side. For each workload, one unprotected run
//! (`none`: the same guest with no dirty log and no backup) and one protected run per mode
//! (remus, xbzrle, fgbi: `ha-primary` and a real `ha-backup` as separate processes on
//! loopback), at each epoch interval and link rate asked for, plus an fgbi block-size
//! sweep. Each run reports guest progress relative to `none` (overhead), pause time, wire
//! bytes, epochs per second and the encoder's CPU time per epoch.
//!
//! Figures of a protected run come from the primary's `--stats` CSV over a window that
//! starts `warmup` seconds after the pair is protected (pre-copy excluded); the `none`
//! run samples the guest's progress counter over a window of the same length.
//!
//! The disk workloads (`db`, `files`) run on a fresh disk each run, `none` included (made
//! by [`crate::disk::Images`], the backup's replica a copy), and their bytes per
//! checkpoint are split into memory and disk.

use crate::disk::Images;
use crate::pair::{
    BackupSpec, PairError, backup_addr, daemons, guest_params, keygen, percentile, spawn, unix_ms,
    wait_event,
};
use ha_backend::{BackendKind, FactoryOptions};
use ha_guest::domain::{Devices, GuestSpec};
use ha_workloads::guest_abi::Workload;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of a comparison run.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// Starting or watching the pair failed.
    #[error(transparent)]
    Pair(#[from] PairError),
    /// The unprotected guest failed.
    #[error("unprotected {workload} guest: {source}")]
    Guest {
        /// The workload.
        workload: String,
        /// Why.
        #[source]
        source: ha_guest::domain::DomainError,
    },
    /// A protected run produced too few checkpoints to measure.
    #[error("{0}: too few checkpoints in the measured window (see {1})")]
    TooFew(String, PathBuf),
    /// A setting that cannot work.
    #[error("{0}")]
    Setting(String),
    /// Local I/O.
    #[error("compare I/O")]
    Io(#[from] std::io::Error),
}

/// How fast the guest's workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// As fast as it can (rate 0): protection overhead shows as lost throughput.
    Max,
    /// The workload's calibrated default (web 2500/s, others 20000/s).
    Default,
    /// This many units per second.
    Units(u64),
}

impl Rate {
    /// Parse `max`, `default` or a number.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "max" => Ok(Self::Max),
            "default" => Ok(Self::Default),
            n => n
                .parse()
                .map(Self::Units)
                .map_err(|_| format!("{s:?} is not a rate: max, default or units per second")),
        }
    }

    /// Units per second for `w` (0: as fast as it can).
    pub fn units(self, w: Workload) -> u64 {
        match self {
            Self::Max => 0,
            Self::Default => w.default_rate(),
            Self::Units(n) => n,
        }
    }
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareArgs {
    /// The guest backend (kvm or sim).
    pub guest: BackendKind,
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Modes: none, remus, xbzrle, fgbi.
    pub modes: Vec<String>,
    /// Epoch intervals.
    pub intervals: Vec<Duration>,
    /// Link rates in bits/s (None: unlimited).
    pub links: Vec<Option<u64>>,
    /// fgbi block sizes to sweep (besides the default 64), at the first interval and link.
    pub block_sizes: Vec<u32>,
    /// Measured seconds per run.
    pub seconds: f64,
    /// Seconds skipped after protection starts (or after the unprotected guest starts).
    pub warmup: f64,
    /// Guest memory ("256M").
    pub memory: String,
    /// Workload rate.
    pub rate: Rate,
    /// Workload seed.
    pub seed: u64,
    /// Print a line per run as it ends (to stderr).
    pub live: bool,
    /// Keep each protected run's directory (logs, CSV, events).
    pub keep: bool,
    /// Passes over the whole list; each figure is the median over the passes.
    pub repeat: usize,
    /// Run a fresh `none` right before each protected run and take that run's overhead
    /// against it (instead of against the pass's one `none`): load drift between the
    /// baseline and the run cancels out, at twice the time.
    pub paired: bool,
    /// The primary's `--copy` (auto, pause, cow); None: its default.
    pub copy: Option<String>,
    /// The disk's size in bytes for the workloads that need one (`db`, `files`).
    pub disk_size: u64,
    /// Where the disk images go (None: each run's own directory under the system's
    /// temporary directory), e.g. a tmpfs to take the host disk's flush latency out.
    pub disk_dir: Option<PathBuf>,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Workload name.
    pub workload: String,
    /// none, remus, xbzrle or fgbi.
    pub mode: String,
    /// Epoch interval, ms (0 for `none`).
    pub interval_ms: f64,
    /// Link: "unlimited" or the rate as given ("1gbit").
    pub link: String,
    /// fgbi block size (64 unless swept; 0 for none/remus/xbzrle).
    pub block_size: u32,
    /// Workload units per second asked of the guest (0: as fast as it can).
    pub rate: u64,
    /// Measured window, s.
    pub seconds: f64,
    /// Guest progress (work units) per second in the window.
    pub progress_per_s: f64,
    /// Progress lost against `none` of the same workload, % (None: no `none` run); the
    /// median over the passes.
    pub overhead_pct: Option<f64>,
    /// The smallest overhead of the passes.
    pub overhead_pct_min: Option<f64>,
    /// The largest.
    pub overhead_pct_max: Option<f64>,
    /// Passes this result is the median of.
    pub repeats: usize,
    /// Pause per checkpoint, p50, ms.
    pub pause_ms_p50: f64,
    /// p99, ms.
    pub pause_ms_p99: f64,
    /// Longest, ms.
    pub pause_ms_max: f64,
    /// Mean bytes on the wire per checkpoint (memory and disk).
    pub wire_bytes_per_epoch: f64,
    /// Of them, the disk's: mean bytes of disk records per checkpoint (0 without a disk).
    pub disk_wire_bytes_per_epoch: f64,
    /// Mean bytes the guest wrote to its disk per checkpoint.
    pub disk_raw_bytes_per_epoch: f64,
    /// Wire bytes per second.
    pub wire_bytes_per_s: f64,
    /// Mean dirty pages × 4096 per checkpoint.
    pub raw_bytes_per_epoch: f64,
    /// Checkpoints per second.
    pub epochs_per_s: f64,
    /// The encoder thread's CPU time per checkpoint, ms.
    pub encode_cpu_ms_per_epoch: f64,
    /// Checkpoints in the windows (all passes).
    pub checkpoints: usize,
    /// The primary's `--copy` as given ("" when not given, and for `none`).
    pub copy: String,
    /// Checkpoints in the windows that were copied on write (all passes).
    pub cow_checkpoints: usize,
    /// Pages per checkpoint the guest wrote before their copy-on-write copy.
    pub cow_faulted_per_epoch: f64,
    /// Where the pause went, p50 in ms: stopping the guest, harvesting the dirty log,
    /// copying the pages (or arming their copy-on-write); zeros when not reported.
    pub pause_parts_ms_p50: [f64; 3],
}

/// Human name of a link rate.
pub fn link_name(bits: Option<u64>) -> String {
    match bits {
        None => "unlimited".into(),
        Some(b) if b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        Some(b) if b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        Some(b) => format!("{b}bit"),
    }
}

/// The guest of workload `w`, as `ha-primary` builds it from the comparison's settings;
/// for a disk workload its disk images made in `dir`.
fn spec(
    a: &CompareArgs,
    w: Workload,
    dir: &Path,
) -> Result<(GuestSpec, Option<Images>), CompareError> {
    let memory = ha_daemon::units::parse_size(&a.memory)
        .map_err(|e| CompareError::Setting(e.to_string()))?;
    let disk_size = if w.needs_disk() { a.disk_size } else { 0 };
    let params = guest_params(w, memory, a.seed, a.rate.units(w), OUTPUT_EVERY, disk_size);
    let images = if w.needs_disk() {
        Some(Images::create(dir, &params).map_err(PairError::from)?)
    } else {
        None
    };
    let spec = GuestSpec {
        memory_size: memory,
        params,
        devices: Devices {
            disk: images.as_ref().map(|im| im.primary.clone()),
        },
    };
    Ok((spec, images))
}

/// An output record every this many units (the primary's default `--output-every`).
const OUTPUT_EVERY: u64 = 64;

/// Where a run's disk images go: the run's directory, or with `--disk-dir` a directory of
/// their own there, removed with this (however the run ends).
struct ImagesDir {
    path: PathBuf,
    own: bool,
}

impl ImagesDir {
    fn new(a: &CompareArgs, run_dir: &Path) -> std::io::Result<Self> {
        let Some(base) = &a.disk_dir else {
            return Ok(Self {
                path: run_dir.to_path_buf(),
                own: false,
            });
        };
        let name = run_dir.file_name().unwrap_or_default();
        let path = base.join(name);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path, own: true })
    }
}

impl Drop for ImagesDir {
    fn drop(&mut self) {
        if self.own {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A new directory for one run of workload `w` in `mode` (its logs, stats, disks).
fn run_dir(w: Workload, mode: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "castor-compare-{}-{}-{mode}-{}",
        std::process::id(),
        w.name(),
        unix_ms()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The unprotected baseline: the guest alone, no dirty log, its output drained as the
/// primary would; progress over the window. A disk workload's disk is made for the run
/// and removed after it.
fn run_none(a: &CompareArgs, w: Workload) -> Result<RunResult, CompareError> {
    let dir = run_dir(w, "none")?;
    let images = ImagesDir::new(a, &dir)?;
    let r = run_none_in(a, w, &images.path);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// [`run_none`] with its disk (if any) in `dir`.
fn run_none_in(a: &CompareArgs, w: Workload, dir: &Path) -> Result<RunResult, CompareError> {
    let guest_err = |source| CompareError::Guest {
        workload: w.name().into(),
        source,
    };
    let f = ha_backend::factory(
        a.guest,
        &FactoryOptions {
            dirty_log: false,
            ..FactoryOptions::default()
        },
    );
    let mut d = f.create(&spec(a, w, dir)?.0).map_err(guest_err)?;
    d.resume().map_err(guest_err)?;
    let mut out = Vec::new();
    let mut writes = Vec::new();
    let mut drain_for = |d: &mut Box<dyn ha_guest::domain::Domain>, secs: f64| {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(25));
            out.clear();
            d.drain_output(&mut out)?;
            // The disk's write log too, as the primary drains it every checkpoint (here
            // while the guest runs: the writes are dropped, only the log's growth counts).
            if let Some(disk) = d.disk() {
                writes.clear();
                disk.drain_writes(&mut writes)?;
            }
            d.check_health()?;
        }
        Ok(())
    };
    drain_for(&mut d, a.warmup).map_err(guest_err)?;
    let (p0, t0) = (d.status().map_err(guest_err)?.progress, Instant::now());
    drain_for(&mut d, a.seconds).map_err(guest_err)?;
    let (p1, t1) = (d.status().map_err(guest_err)?.progress, Instant::now());
    let _ = d.pause();
    let secs = t1.duration_since(t0).as_secs_f64();
    Ok(RunResult {
        workload: w.name().into(),
        mode: "none".into(),
        interval_ms: 0.0,
        link: "-".into(),
        block_size: 0,
        rate: a.rate.units(w),
        seconds: secs,
        progress_per_s: p1.saturating_sub(p0) as f64 / secs.max(1e-9),
        overhead_pct: None,
        overhead_pct_min: None,
        overhead_pct_max: None,
        repeats: 1,
        pause_ms_p50: 0.0,
        pause_ms_p99: 0.0,
        pause_ms_max: 0.0,
        wire_bytes_per_epoch: 0.0,
        disk_wire_bytes_per_epoch: 0.0,
        disk_raw_bytes_per_epoch: 0.0,
        wire_bytes_per_s: 0.0,
        raw_bytes_per_epoch: 0.0,
        epochs_per_s: 0.0,
        encode_cpu_ms_per_epoch: 0.0,
        checkpoints: 0,
        copy: String::new(),
        cow_checkpoints: 0,
        cow_faulted_per_epoch: 0.0,
        pause_parts_ms_p50: [0.0; 3],
    })
}

/// The checkpoint rows of a primary stats CSV, as (column → value) lookups.
struct Csv {
    cols: Vec<String>,
    rows: Vec<Vec<u64>>,
}

impl Csv {
    fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut lines = text.lines();
        let cols: Vec<String> = lines
            .next()
            .unwrap_or_default()
            .split(',')
            .map(str::to_string)
            .collect();
        let rows = lines
            .map(|l| {
                l.split(',')
                    .map(|v| match v {
                        // The `copy` column.
                        "pause" => 0,
                        "cow" => 1,
                        v => v.parse::<u64>().unwrap_or(u64::MAX),
                    })
                    .collect()
            })
            .collect();
        Self { cols, rows }
    }

    fn col(&self, name: &str) -> Option<usize> {
        self.cols.iter().position(|c| c == name)
    }
}

/// The daemons' binaries.
struct Bins {
    primary: PathBuf,
    backup: PathBuf,
}

/// One protected run: a keyed pair on loopback.
fn run_protected(
    bins: &Bins,
    a: &CompareArgs,
    w: Workload,
    mode: &str,
    interval: Duration,
    link: Option<u64>,
    block_size: u32,
) -> Result<RunResult, CompareError> {
    let (primary_bin, backup_bin) = (&bins.primary, &bins.backup);
    let dir = run_dir(
        w,
        &format!(
            "{mode}{}",
            a.copy.as_ref().map_or(String::new(), |c| format!("-{c}"))
        ),
    )?;
    let f = |n: &str| dir.join(n);
    let s = |v: &str| v.to_string();
    let stalled = |what: &str| PairError::Stalled(what.to_string(), dir.clone());
    let key = f("pair.key");
    keygen(primary_bin, &key, &dir)?;
    let interval_s = format!("{}us", interval.as_micros());
    let key_args = [s("--key"), key.display().to_string()];
    // The backup must not take over during a measurement on a busy host: 5 s detection.
    let backup_args = BackupSpec {
        dir: &dir,
        memory: &a.memory,
        mode,
        guest: a.guest,
        interval: &interval_s,
        detect_timeout: "5s",
        key_args: &key_args,
    }
    .args(&[s("--block-size"), block_size.to_string()]);
    let images_dir = ImagesDir::new(a, &dir)?;
    let (_, images) = spec(a, w, &images_dir.path)?;
    let mut backup_args = backup_args;
    if let Some(im) = &images {
        backup_args.extend([s("--disk"), im.replica.display().to_string()]);
    }
    let _backup = spawn(backup_bin, &backup_args, &f("backup.log"), "ha-backup")?;
    let baddr = backup_addr(&f("port"), &dir)?;
    let rate = a.rate.units(w);
    let mut primary_args = vec![
        s("--backup"),
        baddr,
        s("--guest"),
        a.guest.to_string(),
        s("--workload"),
        s(w.name()),
        s("--memory"),
        a.memory.clone(),
        s("--mode"),
        s(mode),
        s("--interval"),
        interval_s,
        s("--rate"),
        rate.to_string(),
        s("--seed"),
        a.seed.to_string(),
        s("--ack-timeout"),
        s("10s"),
        s("--events"),
        f("primary.events").display().to_string(),
        s("--stats"),
        f("primary.csv").display().to_string(),
    ];
    primary_args.extend([s("--block-size"), block_size.to_string()]);
    if let Some(im) = &images {
        primary_args.extend([s("--disk"), im.primary.display().to_string()]);
    }
    if let Some(bits) = link {
        primary_args.extend([s("--link-rate"), format!("{bits}bit")]);
    }
    if let Some(c) = &a.copy {
        primary_args.extend([s("--copy"), c.clone()]);
    }
    primary_args.extend(key_args);
    let mut primary = spawn(primary_bin, &primary_args, &f("primary.log"), "ha-primary")?;
    // Wait for protection; a primary that exits first (refused, misconfigured) ends the
    // wait at once, with the last line of its log.
    let t = Instant::now();
    while wait_event(
        &f("primary.events"),
        "protected",
        Duration::from_millis(100),
    )
    .is_none()
    {
        if let Ok(Some(st)) = primary.0.try_wait() {
            let log = std::fs::read_to_string(f("primary.log")).unwrap_or_default();
            let last = log.lines().last().unwrap_or_default().to_string();
            return Err(stalled(&format!(
                "ha-primary exited ({st}) before protection: {last}"
            ))
            .into());
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(stalled("the primary never reached the protected state").into());
        }
    }
    // The window is placed on the primary's own clock (the CSV's t_us) from the first
    // checkpoint row on, so start-up and pre-copy are excluded whatever they took.
    std::thread::sleep(Duration::from_secs_f64(a.warmup + a.seconds + 0.3));
    let _ = primary.0.kill();
    let _ = primary.0.wait();
    let csv = Csv::read(&f("primary.csv"));
    let label = format!("{} {mode} {}", w.name(), link_name(link));
    let r = summarize(a, &csv, w, mode, interval, link, block_size)
        .ok_or_else(|| CompareError::TooFew(label, dir.clone()))?;
    if !a.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else if a.live {
        eprintln!("  kept {}", dir.display());
    }
    Ok(r)
}

fn summarize(
    a: &CompareArgs,
    csv: &Csv,
    w: Workload,
    mode: &str,
    interval: Duration,
    link: Option<u64>,
    block_size: u32,
) -> Option<RunResult> {
    let at = |n: &str| csv.col(n);
    let (cp, t, pause, wire, raw, prog, cpu) = (
        at("checkpoint")?,
        at("t_us")?,
        at("pause_us")?,
        at("wire_bytes")?,
        at("raw_bytes")?,
        at("progress")?,
        at("encode_cpu_us")?,
    );
    let rows: Vec<&Vec<u64>> = csv
        .rows
        .iter()
        .filter(|r| r.get(cp) == Some(&1) && r.get(t).is_some_and(|&v| v != u64::MAX))
        .collect();
    let first_t = rows.first()?.get(t).copied()?;
    let us = |secs: f64| Duration::from_secs_f64(secs.max(0.0)).as_micros() as u64;
    let from = first_t + us(a.warmup);
    let to = from + us(a.seconds);
    let win: Vec<&Vec<u64>> = rows
        .into_iter()
        .filter(|r| r[t] >= from && r[t] <= to)
        .collect();
    if win.len() < 3 {
        return None;
    }
    let n = win.len() as f64;
    let (first, last) = (win.first()?, win.last()?);
    let span = (last[t] - first[t]) as f64 / 1e6;
    // Mean over the rows that have the column (a missing value reads as u64::MAX).
    let mean = |c: usize| {
        let v: Vec<f64> = win
            .iter()
            .filter_map(|r| r.get(c).filter(|&&x| x != u64::MAX).map(|&x| x as f64))
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let pauses: Vec<u64> = win.iter().map(|r| r[pause]).collect();
    let cow = at("copy").map_or(0, |c| win.iter().filter(|r| r.get(c) == Some(&1)).count());
    let faulted = at("cow_faulted").map_or(0.0, mean);
    let part = |name: &str| {
        at(name).map_or(0.0, |c| {
            percentile(&win.iter().map(|r| r[c]).collect::<Vec<u64>>(), 50)
        })
    };
    let parts = [part("stop_us"), part("harvest_us"), part("copy_us")];
    let epochs_per_s = (n - 1.0) / span.max(1e-9);
    // A primary without the disk columns (or without a disk) sent no disk bytes.
    let disk_mean = |name: &str| at(name).map_or(0.0, mean);
    Some(RunResult {
        workload: w.name().into(),
        mode: mode.into(),
        interval_ms: interval.as_secs_f64() * 1e3,
        link: link_name(link),
        block_size: if mode == "fgbi" { block_size } else { 0 },
        rate: a.rate.units(w),
        seconds: span,
        progress_per_s: last[prog].saturating_sub(first[prog]) as f64 / span.max(1e-9),
        overhead_pct: None,
        overhead_pct_min: None,
        overhead_pct_max: None,
        repeats: 1,
        pause_ms_p50: percentile(&pauses, 50),
        pause_ms_p99: percentile(&pauses, 99),
        pause_ms_max: pauses.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
        wire_bytes_per_epoch: mean(wire),
        disk_wire_bytes_per_epoch: disk_mean("disk_wire_bytes"),
        disk_raw_bytes_per_epoch: disk_mean("disk_raw_bytes"),
        wire_bytes_per_s: mean(wire) * epochs_per_s,
        raw_bytes_per_epoch: mean(raw),
        epochs_per_s,
        encode_cpu_ms_per_epoch: mean(cpu) / 1000.0,
        checkpoints: win.len(),
        copy: a.copy.clone().unwrap_or_default(),
        cow_checkpoints: cow,
        cow_faulted_per_epoch: faulted,
        pause_parts_ms_p50: parts,
    })
}

/// Run the whole comparison; `each` sees every result as it comes (for live output).
pub fn run(
    a: &CompareArgs,
    mut each: impl FnMut(&RunResult),
) -> Result<Vec<RunResult>, CompareError> {
    if let Some(c) = &a.copy
        && !["auto", "pause", "cow"].contains(&c.as_str())
    {
        return Err(CompareError::Setting(format!(
            "unknown copy path {c:?}: auto, pause, cow"
        )));
    }
    for m in &a.modes {
        if !["none", "remus", "xbzrle", "fgbi"].contains(&m.as_str()) {
            return Err(CompareError::Setting(format!(
                "unknown mode {m:?}: none, remus, xbzrle, fgbi"
            )));
        }
    }
    if a.intervals.is_empty() || a.links.is_empty() || a.workloads.is_empty() {
        return Err(CompareError::Setting(
            "nothing to run: give at least one workload, interval and link".into(),
        ));
    }
    let protected = a.modes.iter().any(|m| m != "none");
    let bins = if protected {
        let (primary, backup) = daemons()?;
        Some(Bins { primary, backup })
    } else {
        None
    };
    let mut passes: Vec<Vec<RunResult>> = Vec::new();
    for _ in 0..a.repeat.max(1) {
        passes.push(one_pass(a, bins.as_ref(), &mut each)?);
    }
    Ok(aggregate(&passes))
}

/// Every run once, in order; overhead against this pass's own `none`.
fn one_pass(
    a: &CompareArgs,
    bins: Option<&Bins>,
    each: &mut impl FnMut(&RunResult),
) -> Result<Vec<RunResult>, CompareError> {
    let mut out: Vec<RunResult> = Vec::new();
    // A run's overhead is against its own baseline (`paired`: reported to `each` but not
    // a row of the pass) or else the pass's `none` of the workload.
    let mut push = |(base, mut r): (Option<RunResult>, RunResult), out: &mut Vec<RunResult>| {
        if let Some(b) = &base {
            each(b);
            set_overhead(&mut r, b);
        } else if let Some(b) = out
            .iter()
            .find(|b| b.mode == "none" && b.workload == r.workload)
        {
            set_overhead(&mut r, b);
        }
        each(&r);
        out.push(r);
    };
    let has_none = a.modes.iter().any(|m| m == "none");
    // A protected run, after its own baseline when `paired`.
    type Paired = (Option<RunResult>, RunResult);
    let protected = |b: &Bins, w, m: &str, iv, link, bs| -> Result<Paired, CompareError> {
        let base = if a.paired && has_none {
            Some(run_none(a, w)?)
        } else {
            None
        };
        Ok((base, run_protected(b, a, w, m, iv, link, bs)?))
    };
    for &w in &a.workloads {
        if has_none {
            push((None, run_none(a, w)?), &mut out);
        }
        for &link in &a.links {
            for &iv in &a.intervals {
                for m in a.modes.iter().filter(|m| *m != "none") {
                    if let Some(b) = bins {
                        push(protected(b, w, m, iv, link, 64)?, &mut out);
                    }
                }
            }
        }
        if let Some(b) = bins
            && a.modes.iter().any(|m| m == "fgbi")
        {
            for &bs in a.block_sizes.iter().filter(|&&bs| bs != 64) {
                let r = protected(b, w, "fgbi", a.intervals[0], a.links[0], bs)?;
                push(r, &mut out);
            }
        }
    }
    Ok(out)
}

/// Set `r`'s overhead against the unprotected `base` of the same workload.
fn set_overhead(r: &mut RunResult, base: &RunResult) {
    if r.mode != "none" && base.progress_per_s > 0.0 {
        let o = 100.0 * (1.0 - r.progress_per_s / base.progress_per_s);
        r.overhead_pct = Some(o);
        r.overhead_pct_min = Some(o);
        r.overhead_pct_max = Some(o);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One result per run of the passes (which run the same list in the same order): the
/// median of each figure, and the overhead's range across passes.
fn aggregate(passes: &[Vec<RunResult>]) -> Vec<RunResult> {
    let Some(first) = passes.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            let all: Vec<&RunResult> = passes.iter().filter_map(|p| p.get(i)).collect();
            let m = |f: fn(&RunResult) -> f64| median(all.iter().map(|r| f(r)).collect());
            let over: Vec<f64> = all.iter().filter_map(|r| r.overhead_pct).collect();
            RunResult {
                seconds: m(|r| r.seconds),
                progress_per_s: m(|r| r.progress_per_s),
                overhead_pct: (!over.is_empty()).then(|| median(over.clone())),
                overhead_pct_min: over.iter().copied().reduce(f64::min),
                overhead_pct_max: over.iter().copied().reduce(f64::max),
                pause_ms_p50: m(|r| r.pause_ms_p50),
                pause_ms_p99: m(|r| r.pause_ms_p99),
                pause_ms_max: m(|r| r.pause_ms_max),
                wire_bytes_per_epoch: m(|r| r.wire_bytes_per_epoch),
                disk_wire_bytes_per_epoch: m(|r| r.disk_wire_bytes_per_epoch),
                disk_raw_bytes_per_epoch: m(|r| r.disk_raw_bytes_per_epoch),
                wire_bytes_per_s: m(|r| r.wire_bytes_per_s),
                raw_bytes_per_epoch: m(|r| r.raw_bytes_per_epoch),
                epochs_per_s: m(|r| r.epochs_per_s),
                encode_cpu_ms_per_epoch: m(|r| r.encode_cpu_ms_per_epoch),
                checkpoints: all.iter().map(|r| r.checkpoints).sum(),
                cow_checkpoints: all.iter().map(|r| r.cow_checkpoints).sum(),
                cow_faulted_per_epoch: m(|r| r.cow_faulted_per_epoch),
                pause_parts_ms_p50: [0, 1, 2]
                    .map(|k| median(all.iter().map(|r| r.pause_parts_ms_p50[k]).collect())),
                repeats: all.len(),
                ..first[i].clone()
            }
        })
        .collect()
}

/// The results as a markdown table.
pub fn markdown(rs: &[RunResult]) -> String {
    let mut s = String::from(
        "| workload | mode | interval | link | block | progress/s | overhead (range) | pause p50 / p99 / max (ms) | wire KB/epoch | memory / disk KB/epoch | wire MB/s | raw KB/epoch | epochs/s | encode CPU ms/epoch |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rs {
        let dash = |v: f64, f: &dyn Fn(f64) -> String| {
            if r.mode == "none" { "-".into() } else { f(v) }
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.workload,
            r.mode,
            dash(r.interval_ms, &|v| format!("{v:.0} ms")),
            r.link,
            if r.block_size > 0 {
                r.block_size.to_string()
            } else {
                "-".into()
            },
            r.progress_per_s,
            match (r.overhead_pct, r.overhead_pct_min, r.overhead_pct_max) {
                (Some(o), Some(lo), Some(hi)) if r.repeats > 1 =>
                    format!("{o:.1} % ({lo:.0}..{hi:.0})"),
                (Some(o), ..) => format!("{o:.1} %"),
                _ => "-".into(),
            },
            dash(0.0, &|_| format!(
                "{:.2} / {:.2} / {:.2}",
                r.pause_ms_p50, r.pause_ms_p99, r.pause_ms_max
            )),
            dash(r.wire_bytes_per_epoch, &|v| format!("{:.1}", v / 1e3)),
            dash(r.disk_wire_bytes_per_epoch, &|v| format!(
                "{:.1} / {:.1}",
                (r.wire_bytes_per_epoch - v) / 1e3,
                v / 1e3
            )),
            dash(r.wire_bytes_per_s, &|v| format!("{:.2}", v / 1e6)),
            dash(r.raw_bytes_per_epoch, &|v| format!("{:.1}", v / 1e3)),
            dash(r.epochs_per_s, &|v| format!("{v:.1}")),
            dash(r.encode_cpu_ms_per_epoch, &|v| format!("{v:.2}")),
        ));
    }
    s
}

/// The CSV header line (with its newline).
pub const CSV_HEADER: &str = "workload,mode,interval_ms,link,block_size,rate,seconds,progress_per_s,overhead_pct,\
         pause_ms_p50,pause_ms_p99,pause_ms_max,wire_bytes_per_epoch,wire_bytes_per_s,\
         raw_bytes_per_epoch,epochs_per_s,encode_cpu_ms_per_epoch,checkpoints,repeats,\
         overhead_pct_min,overhead_pct_max,disk_wire_bytes_per_epoch,disk_raw_bytes_per_epoch\n";

/// One result as a CSV line (with its newline).
pub fn csv_row(r: &RunResult) -> String {
    format!(
        "{},{},{},{},{},{},{:.3},{:.1},{},{:.3},{:.3},{:.3},{:.0},{:.0},{:.0},{:.2},{:.3},{},{},{},{},{:.0},{:.0}\n",
        r.workload,
        r.mode,
        r.interval_ms,
        r.link,
        r.block_size,
        r.rate,
        r.seconds,
        r.progress_per_s,
        r.overhead_pct.map_or(String::new(), |o| format!("{o:.2}")),
        r.pause_ms_p50,
        r.pause_ms_p99,
        r.pause_ms_max,
        r.wire_bytes_per_epoch,
        r.wire_bytes_per_s,
        r.raw_bytes_per_epoch,
        r.epochs_per_s,
        r.encode_cpu_ms_per_epoch,
        r.checkpoints,
        r.repeats,
        r.overhead_pct_min
            .map_or(String::new(), |o| format!("{o:.2}")),
        r.overhead_pct_max
            .map_or(String::new(), |o| format!("{o:.2}")),
        r.disk_wire_bytes_per_epoch,
        r.disk_raw_bytes_per_epoch,
    )
}

/// The results as CSV (header first).
pub fn csv(rs: &[RunResult]) -> String {
    let mut s = String::from(CSV_HEADER);
    for r in rs {
        s.push_str(&csv_row(r));
    }
    s
}

/// Read results back from a CSV that [`csv`] wrote (to redraw plots and tables without
/// running again). A CSV from before the disk columns reads as no disk bytes.
pub fn read_csv(text: &str) -> Result<Vec<RunResult>, CompareError> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let bad = |what: String| CompareError::Setting(format!("not a compare.csv: {what}"));
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| bad(format!("no column {name}")))
    };
    let cols: Vec<usize> = [
        "workload",
        "mode",
        "interval_ms",
        "link",
        "block_size",
        "rate",
        "seconds",
        "progress_per_s",
        "overhead_pct",
        "pause_ms_p50",
        "pause_ms_p99",
        "pause_ms_max",
        "wire_bytes_per_epoch",
        "wire_bytes_per_s",
        "raw_bytes_per_epoch",
        "epochs_per_s",
        "encode_cpu_ms_per_epoch",
        "checkpoints",
        "repeats",
        "overhead_pct_min",
        "overhead_pct_max",
    ]
    .iter()
    .map(|n| col(n))
    .collect::<Result<_, _>>()?;
    let disk_cols = ["disk_wire_bytes_per_epoch", "disk_raw_bytes_per_epoch"]
        .map(|n| header.iter().position(|h| *h == n));
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let get = |i: usize| f.get(cols[i]).copied().unwrap_or_default();
            let num = |i: usize| -> Result<f64, CompareError> {
                get(i)
                    .parse()
                    .map_err(|_| bad(format!("{:?} in {l}", get(i))))
            };
            let opt = |i: usize| get(i).parse::<f64>().ok();
            let disk = |c: Option<usize>| {
                c.and_then(|c| f.get(c))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let int = |i: usize| -> Result<u64, CompareError> {
                get(i)
                    .parse()
                    .map_err(|_| bad(format!("{:?} in {l}", get(i))))
            };
            Ok(RunResult {
                workload: get(0).to_string(),
                mode: get(1).to_string(),
                interval_ms: num(2)?,
                link: get(3).to_string(),
                block_size: u32::try_from(int(4)?).map_err(|e| bad(e.to_string()))?,
                rate: int(5)?,
                seconds: num(6)?,
                progress_per_s: num(7)?,
                overhead_pct: opt(8),
                pause_ms_p50: num(9)?,
                pause_ms_p99: num(10)?,
                pause_ms_max: num(11)?,
                wire_bytes_per_epoch: num(12)?,
                disk_wire_bytes_per_epoch: disk(disk_cols[0]),
                disk_raw_bytes_per_epoch: disk(disk_cols[1]),
                wire_bytes_per_s: num(13)?,
                raw_bytes_per_epoch: num(14)?,
                epochs_per_s: num(15)?,
                encode_cpu_ms_per_epoch: num(16)?,
                checkpoints: usize::try_from(int(17)?).map_err(|e| bad(e.to_string()))?,
                repeats: usize::try_from(int(18)?).map_err(|e| bad(e.to_string()))?,
                overhead_pct_min: opt(19),
                overhead_pct_max: opt(20),
                // compare.csv does not carry the copy path (pause.csv does).
                copy: String::new(),
                cow_checkpoints: 0,
                cow_faulted_per_epoch: 0.0,
                pause_parts_ms_p50: [0.0; 3],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(mode: &str, overhead: Option<f64>) -> RunResult {
        RunResult {
            workload: "web".into(),
            mode: mode.into(),
            interval_ms: 25.0,
            link: "1gbit".into(),
            block_size: 64,
            rate: 2500,
            seconds: 4.0,
            progress_per_s: 2400.5,
            overhead_pct: overhead,
            overhead_pct_min: overhead.map(|o| o - 1.0),
            overhead_pct_max: overhead.map(|o| o + 1.0),
            repeats: 3,
            pause_ms_p50: 0.25,
            pause_ms_p99: 1.5,
            pause_ms_max: 2.0,
            wire_bytes_per_epoch: 24_300.0,
            disk_wire_bytes_per_epoch: 1_200.0,
            disk_raw_bytes_per_epoch: 8_192.0,
            wire_bytes_per_s: 900_000.0,
            raw_bytes_per_epoch: 400_000.0,
            epochs_per_s: 36.5,
            encode_cpu_ms_per_epoch: 0.8,
            checkpoints: 420,
            copy: String::new(),
            cow_checkpoints: 0,
            cow_faulted_per_epoch: 0.0,
            pause_parts_ms_p50: [0.0; 3],
        }
    }

    /// What `csv` writes, `read_csv` reads back (to the CSV's precision).
    #[test]
    fn csv_round_trips() {
        let rs = vec![result("none", None), result("fgbi", Some(4.4))];
        let back = read_csv(&csv(&rs)).unwrap_or_default();
        assert_eq!(back.len(), 2);
        assert_eq!(csv(&back), csv(&rs));
        assert_eq!(back[1].overhead_pct, Some(4.4));
        assert_eq!(back[0].overhead_pct, None);
        assert!(read_csv("workload,mode\nweb,fgbi\n").is_err());
        assert_eq!(back[1].disk_wire_bytes_per_epoch, 1_200.0);
        assert_eq!(back[1].disk_raw_bytes_per_epoch, 8_192.0);
        // A CSV written before the disk columns: no disk bytes.
        let old: String = csv(&rs)
            .lines()
            .map(|l| l.rsplitn(3, ',').nth(2).unwrap_or_default().to_string() + "\n")
            .collect();
        let back = read_csv(&old).unwrap_or_default();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].disk_wire_bytes_per_epoch, 0.0);
        assert_eq!(back[1].wire_bytes_per_epoch, 24_300.0);
    }

    /// The table splits a run's bytes per checkpoint into memory and disk.
    #[test]
    fn markdown_splits_memory_and_disk() {
        let md = markdown(&[result("fgbi", Some(1.0))]);
        assert!(md.contains("| 24.3 | 23.1 / 1.2 |"), "{md}");
    }

    /// Medians per figure over passes, and the overhead's range.
    #[test]
    fn aggregate_takes_medians() {
        let passes: Vec<Vec<RunResult>> = [3.0, 9.0, 4.0]
            .iter()
            .map(|&o| {
                let mut r = result("fgbi", Some(o));
                r.pause_ms_p50 = o / 10.0;
                vec![r]
            })
            .collect();
        let a = aggregate(&passes);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].overhead_pct, Some(4.0));
        assert_eq!(a[0].overhead_pct_min, Some(3.0));
        assert_eq!(a[0].overhead_pct_max, Some(9.0));
        assert!((a[0].pause_ms_p50 - 0.4).abs() < 1e-9);
        assert_eq!(a[0].repeats, 3);
        assert_eq!(a[0].checkpoints, 3 * 420);
    }
}
