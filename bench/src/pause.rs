//! `ha-bench pause`: how a checkpoint's pause grows with the pages dirtied in its epoch
//! (issue 17's first step: measure before taking the copy out of the pause).
//!
//! The `npb` guest dirties one whole page per unit, sweeping its heap, so the dirty pages
//! per epoch are `rate × interval` (capped by the heap). For each guest memory size and
//! each rate, one `compare` run per mode at each interval; every row says the dirty pages
//! per checkpoint it measured beside the pause. Writes pause.csv, pause.md and
//! pause-dirty.png (pause p50 and p99 against dirty pages, log-log).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_guest::backend::BackendKind;
use ha_workloads::guest_abi::Workload;

use crate::compare::{self, CompareArgs, CompareError, Rate, RunResult};
use crate::plot::{self, PlotError};

/// What to sweep.
#[derive(Debug, Clone)]
pub struct PauseArgs {
    /// The guest backend.
    pub guest: BackendKind,
    /// Guest memory sizes ("1G").
    pub memories: Vec<String>,
    /// npb units (dirty pages) per second.
    pub rates: Vec<u64>,
    /// Epoch intervals.
    pub intervals: Vec<Duration>,
    /// Modes (remus copies every dirty page in the pause; the others too, then encode).
    pub modes: Vec<String>,
    /// Measured seconds per run.
    pub seconds: f64,
    /// Seconds skipped once protected.
    pub warmup: f64,
}

/// One run: its memory size and what `compare` measured.
#[derive(Debug, Clone)]
pub struct PauseRow {
    /// Guest memory.
    pub memory: String,
    /// The run's figures.
    pub run: RunResult,
}

impl PauseRow {
    /// Dirty pages per checkpoint, as measured.
    pub fn dirty_pages(&self) -> f64 {
        self.run.raw_bytes_per_epoch / 4096.0
    }
}

/// Run the sweep; `each` sees every row as it ends.
pub fn run(a: &PauseArgs, mut each: impl FnMut(&PauseRow)) -> Result<Vec<PauseRow>, CompareError> {
    let mut rows = Vec::new();
    for memory in &a.memories {
        for &rate in &a.rates {
            let args = CompareArgs {
                guest: a.guest,
                workloads: vec![Workload::Npb],
                modes: a.modes.clone(),
                intervals: a.intervals.clone(),
                links: vec![None],
                block_sizes: Vec::new(),
                seconds: a.seconds,
                warmup: a.warmup,
                memory: memory.clone(),
                rate: Rate::Units(rate),
                seed: 1,
                live: false,
                keep: false,
                repeat: 1,
                paired: false,
                disk_size: 0,
                disk_dir: None,
            };
            for run in compare::run(&args, |_| {})? {
                let row = PauseRow {
                    memory: memory.clone(),
                    run,
                };
                each(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// The rows as CSV.
pub fn csv(rows: &[PauseRow]) -> String {
    let mut s = String::from(
        "memory,mode,interval_ms,rate,dirty_pages_per_epoch,pause_ms_p50,pause_ms_p99,pause_ms_max,progress_per_s,checkpoints\n",
    );
    for r in rows {
        let x = &r.run;
        s.push_str(&format!(
            "{},{},{},{},{:.0},{:.3},{:.3},{:.3},{:.0},{}\n",
            r.memory,
            x.mode,
            x.interval_ms,
            x.rate,
            r.dirty_pages(),
            x.pause_ms_p50,
            x.pause_ms_p99,
            x.pause_ms_max,
            x.progress_per_s,
            x.checkpoints
        ));
    }
    s
}

/// The rows as a markdown table.
pub fn markdown(rows: &[PauseRow]) -> String {
    let mut s = String::from(
        "| memory | mode | interval | npb rate | dirty pages / checkpoint | pause p50 | pause p99 | pause max |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows.iter().filter(|r| r.run.mode != "none") {
        let x = &r.run;
        s.push_str(&format!(
            "| {} | {} | {} ms | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |\n",
            r.memory,
            x.mode,
            x.interval_ms,
            x.rate,
            r.dirty_pages(),
            x.pause_ms_p50,
            x.pause_ms_p99,
            x.pause_ms_max
        ));
    }
    s
}

/// Pause p50 and p99 against dirty pages per checkpoint, one series per mode and memory.
pub fn plot(rows: &[PauseRow], dir: &Path) -> Result<PathBuf, PlotError> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in rows.iter().filter(|r| r.run.mode != "none") {
        let k = (r.run.mode.clone(), r.memory.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (mode, memory) in &keys {
        for (what, f) in [
            (
                "p50",
                (|x: &RunResult| x.pause_ms_p50) as fn(&RunResult) -> f64,
            ),
            ("p99", |x: &RunResult| x.pause_ms_p99),
        ] {
            let mut v: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| &r.run.mode == mode && &r.memory == memory && r.dirty_pages() > 0.0)
                .map(|r| (r.dirty_pages(), f(&r.run)))
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            if !v.is_empty() {
                series.push((format!("{mode} {memory} {what}"), v));
            }
        }
    }
    let file = dir.join("pause-dirty.png");
    plot::lines(
        &file,
        "Pause per checkpoint against dirty pages per checkpoint (npb)",
        ("dirty pages per checkpoint", "pause (ms)"),
        &series,
        true,
    )?;
    Ok(file)
}
