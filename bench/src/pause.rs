//! `ha-bench pause`: how a checkpoint's pause grows with the pages dirtied in its epoch
//! (issue 17's first step: measure before taking the copy out of the pause).
//!
//! The `npb` guest dirties one whole page per unit, sweeping its heap, so the dirty pages
//! per epoch are `rate × interval` (capped by the heap; rate 0: as fast as the guest can,
//! so its progress shows what protection costs it). For each guest memory size, rate and
//! interval, one `compare` run per copy path (the primary's `--copy`: pause, cow, auto)
//! and mode, the paths back to back so they see the same host; every row says the dirty
//! pages per checkpoint it measured beside the pause, the guest's progress, and how many
//! checkpoints went copy-on-write. Writes pause.csv, pause.md and pause-dirty.png (pause
//! p50 and p99 against dirty pages, log-log).

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
    /// The primary's copy paths (`--copy`: pause, cow, auto); empty: its default only.
    pub copies: Vec<String>,
    /// Measured seconds per run.
    pub seconds: f64,
    /// Seconds skipped once protected.
    pub warmup: f64,
    /// Keep each run's directory (the primary's per-checkpoint stats among them).
    pub keep: bool,
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
    let copies: Vec<Option<String>> = if a.copies.is_empty() {
        vec![None]
    } else {
        a.copies.iter().cloned().map(Some).collect()
    };
    for memory in &a.memories {
        for &rate in &a.rates {
            for &interval in &a.intervals {
                for copy in &copies {
                    let args = CompareArgs {
                        guest: a.guest,
                        workloads: vec![Workload::Npb],
                        modes: a.modes.clone(),
                        intervals: vec![interval],
                        links: vec![None],
                        block_sizes: Vec::new(),
                        seconds: a.seconds,
                        warmup: a.warmup,
                        memory: memory.clone(),
                        rate: if rate == 0 {
                            Rate::Max
                        } else {
                            Rate::Units(rate)
                        },
                        seed: 1,
                        // Live, compare names each kept run's directory.
                        live: a.keep,
                        keep: a.keep,
                        repeat: 1,
                        paired: false,
                        copy: copy.clone(),
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
        }
    }
    Ok(rows)
}

/// The rows as CSV.
pub fn csv(rows: &[PauseRow]) -> String {
    let mut s = String::from(
        "memory,mode,copy,interval_ms,rate,dirty_pages_per_epoch,pause_ms_p50,pause_ms_p99,pause_ms_max,progress_per_s,checkpoints,cow_checkpoints,cow_faulted_per_epoch,stop_ms_p50,harvest_ms_p50,copy_ms_p50\n",
    );
    for r in rows {
        let x = &r.run;
        s.push_str(&format!(
            "{},{},{},{},{},{:.0},{:.3},{:.3},{:.3},{:.0},{},{},{:.1},{:.3},{:.3},{:.3}\n",
            r.memory,
            x.mode,
            x.copy,
            x.interval_ms,
            x.rate,
            r.dirty_pages(),
            x.pause_ms_p50,
            x.pause_ms_p99,
            x.pause_ms_max,
            x.progress_per_s,
            x.checkpoints,
            x.cow_checkpoints,
            x.cow_faulted_per_epoch,
            x.pause_parts_ms_p50[0],
            x.pause_parts_ms_p50[1],
            x.pause_parts_ms_p50[2]
        ));
    }
    s
}

/// The rows as a markdown table.
pub fn markdown(rows: &[PauseRow]) -> String {
    let mut s = String::from(
        "| memory | mode | copy | interval | npb rate | dirty pages / checkpoint | pause p50 | pause p99 | pause max | stop / harvest / copy p50 | progress / s | copy-on-write checkpoints | pages faulted / checkpoint |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows.iter().filter(|r| r.run.mode != "none") {
        let x = &r.run;
        s.push_str(&format!(
            "| {} | {} | {} | {} ms | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} / {:.2} / {:.2} ms | {:.0} | {}/{} | {:.1} |\n",
            r.memory,
            x.mode,
            if x.copy.is_empty() { "-" } else { &x.copy },
            x.interval_ms,
            if x.rate == 0 { "max".to_string() } else { x.rate.to_string() },
            r.dirty_pages(),
            x.pause_ms_p50,
            x.pause_ms_p99,
            x.pause_ms_max,
            x.pause_parts_ms_p50[0],
            x.pause_parts_ms_p50[1],
            x.pause_parts_ms_p50[2],
            x.progress_per_s,
            x.cow_checkpoints,
            x.checkpoints,
            x.cow_faulted_per_epoch
        ));
    }
    s
}

/// Pause p50 and p99 against dirty pages per checkpoint, one series per mode and memory.
pub fn plot(rows: &[PauseRow], dir: &Path) -> Result<PathBuf, PlotError> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in rows.iter().filter(|r| r.run.mode != "none") {
        let k = (r.run.mode.clone(), r.memory.clone(), r.run.copy.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (mode, memory, copy) in &keys {
        for (what, f) in [
            (
                "p50",
                (|x: &RunResult| x.pause_ms_p50) as fn(&RunResult) -> f64,
            ),
            ("p99", |x: &RunResult| x.pause_ms_p99),
        ] {
            let mut v: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| {
                    &r.run.mode == mode
                        && &r.memory == memory
                        && &r.run.copy == copy
                        && r.dirty_pages() > 0.0
                })
                .map(|r| (r.dirty_pages(), f(&r.run)))
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            if !v.is_empty() {
                series.push((
                    format!("{mode} {copy} {memory} {what}").replace("  ", " "),
                    v,
                ));
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
