//! `ha-bench encoder`: the encode stage's CPU per checkpoint, mode against mode, on the
//! very same epochs of one real guest.
//!
//! One guest runs its workload; every `interval` it is paused, its dirty pages and state
//! are harvested exactly as the primary harvests them, and it runs on. Each epoch is then
//! handed to one encoder thread per mode — `ha_primary::encode::run`, the daemon's own
//! stage, each with the encoder state a session of that mode would have after a pre-copy
//! of the guest's memory — and the thread CPU time each reports is collected. Because
//! every mode encodes identical pages, the ratio between modes is free of the run-to-run
//! drift that a comparison of separate protected runs carries.

use crate::pair::{guest_params, percentile};
use crossbeam_channel::{bounded, unbounded};
use ha_backend::{BackendKind, FactoryOptions};
use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_codec::block::BlockSize;
use ha_codec::cache::PageCache;
use ha_codec::codec::{CodecConfig, Encoding, Mode, PageEncoder};
use ha_codec::hashes::BlockHashes;
use ha_guest::domain::{Devices, DomainError, GuestSpec};
use ha_primary::encode::{Encoded, Job};
use ha_primary::harvest::{Pages, copy_pages};
use ha_workloads::guest_abi::Workload;
use std::time::{Duration, Instant};

pub mod trace;

/// Errors of the encoder benchmark.
#[derive(Debug, thiserror::Error)]
pub enum EncoderBenchError {
    /// The guest failed.
    #[error("{workload} guest: {source}")]
    Guest {
        /// The workload.
        workload: &'static str,
        /// What failed.
        #[source]
        source: DomainError,
    },
    /// An encoder could not be built.
    #[error("{mode} encoder: {why}")]
    Encoder {
        /// The mode.
        mode: Mode,
        /// Why.
        why: String,
    },
    /// An encoder thread stopped before its epochs were done.
    #[error("the {0} encoder thread stopped")]
    EncoderGone(Mode),
    /// A trace file could not be written or read.
    #[error("trace {path}: {source}")]
    Trace {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: trace::TraceError,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct EncoderArgs {
    /// The guest backend.
    pub guest: BackendKind,
    /// Workloads, each its own guest.
    pub workloads: Vec<Workload>,
    /// Modes to encode every epoch with.
    pub modes: Vec<Mode>,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Epoch interval.
    pub interval: Duration,
    /// Epochs measured per workload.
    pub epochs: usize,
    /// Seconds the guest runs before the pre-copy.
    pub warmup: f64,
    /// fgbi's block size.
    pub block_size: BlockSize,
    /// The page cache of xbzrle and fgbi, bytes (the primary's `--cache-size`).
    pub cache_bytes: u64,
    /// Workload seed.
    pub seed: u64,
    /// Passes over each trace (each mode's median pass is reported).
    pub repeat: usize,
    /// Write each workload's trace into this directory.
    pub save: Option<std::path::PathBuf>,
    /// Read each workload's trace from this directory instead of running its guest.
    pub load: Option<std::path::PathBuf>,
}

/// One mode's figures on one workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EncoderRow {
    /// The workload.
    pub workload: &'static str,
    /// The mode.
    pub mode: &'static str,
    /// Epochs encoded.
    pub epochs: usize,
    /// Dirty pages per epoch (mean).
    pub pages_per_epoch: f64,
    /// Bytes of the epoch stream per epoch (mean), KB.
    pub wire_kb_per_epoch: f64,
    /// Encoder thread CPU per epoch, ms: mean.
    pub cpu_ms_mean: f64,
    /// Encoder thread CPU per epoch, ms: median.
    pub cpu_ms_p50: f64,
    /// Encoder thread CPU per epoch, ms: 90th percentile.
    pub cpu_ms_p90: f64,
    /// Mean CPU ÷ the first mode's mean CPU on the same epochs.
    pub cpu_ratio: f64,
    /// Pages sent by each encoding (name, pages), over all epochs.
    pub kinds: Vec<(&'static str, u64)>,
    /// Changed blocks per epoch (fgbi's `Blocks` records): all, shared, zero, literal.
    pub blocks_per_epoch: [f64; 4],
    /// General compression per epoch: attempts, attempts kept, attempts skipped.
    pub compress_per_epoch: [f64; 3],
}

/// One encoder thread, fed epochs in turn.
struct Lane {
    mode: Mode,
    jobs: crossbeam_channel::Sender<Job>,
    done: crossbeam_channel::Receiver<Encoded>,
    reports: Vec<Encoded>,
}

impl Lane {
    fn start(a: &EncoderArgs, mode: Mode, pages: usize) -> Result<Self, EncoderBenchError> {
        let err = |why: String| EncoderBenchError::Encoder { mode, why };
        let cfg = CodecConfig {
            mode,
            block_size: a.block_size,
            ..CodecConfig::default()
        };
        let cache = match mode {
            Mode::Remus => None,
            _ => Some(
                PageCache::lru(
                    usize::try_from(a.cache_bytes)
                        .unwrap_or(usize::MAX)
                        .min(pages * PAGE_SIZE),
                )
                .map_err(|e| err(e.to_string()))?,
            ),
        };
        let hashes = (mode == Mode::Fgbi).then(|| BlockHashes::new(pages, a.block_size));
        let enc = PageEncoder::new(cfg, cache, hashes).map_err(|e| err(e.to_string()))?;
        let (jobs, job_rx) = bounded::<Job>(1);
        let (done_tx, done) = unbounded();
        let (link_tx, link_rx) = unbounded::<(u64, Vec<u8>)>();
        std::thread::Builder::new()
            .name(format!("enc-{}", mode.name()))
            .spawn(move || ha_primary::encode::run(enc, job_rx, link_tx, done_tx))
            .map_err(|e| err(e.to_string()))?;
        // The link's bytes are dropped as they come (their count is in each report).
        std::thread::Builder::new()
            .name(format!("sink-{}", mode.name()))
            .spawn(move || for _ in link_rx {})
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            mode,
            jobs,
            done,
            reports: Vec::new(),
        })
    }

    /// Encode one epoch and wait for its report (kept when `keep`).
    fn encode(&mut self, job: Job, keep: bool) -> Result<(), EncoderBenchError> {
        let gone = || EncoderBenchError::EncoderGone(self.mode);
        self.jobs.send(job).map_err(|_| gone())?;
        let r = self.done.recv().map_err(|_| gone())?;
        if keep {
            self.reports.push(r);
        }
        Ok(())
    }
}

/// One harvested epoch (epoch 0: the pre-copy of every non-zero page, with no state).
#[derive(Debug)]
pub struct Epoch {
    /// Epoch number.
    pub epoch: u64,
    /// Page indices, increasing.
    pub index: Vec<u64>,
    /// Their content, back to back.
    pub data: Vec<u8>,
    /// The guest's saved state (none for the pre-copy).
    pub state: Option<Vec<u8>>,
}

/// A workload's harvested epochs, pre-copy first: what every mode is fed.
#[derive(Debug)]
pub struct Trace {
    /// The workload.
    pub workload: Workload,
    /// Guest memory, bytes.
    pub memory: u64,
    /// The epochs.
    pub epochs: Vec<Epoch>,
}

/// Run every workload (or load its trace) and return one row per (workload, mode), each
/// mode's figures the median-CPU pass of `repeat`.
pub fn run(a: &EncoderArgs) -> Result<Vec<EncoderRow>, EncoderBenchError> {
    let mut rows = Vec::new();
    for &w in &a.workloads {
        let failed =
            |path: std::path::PathBuf| move |source| EncoderBenchError::Trace { path, source };
        let trace = match &a.load {
            Some(dir) => {
                let p = trace::path(dir, w);
                trace::load(&p, w).map_err(failed(p))?
            }
            None => capture(a, w)?,
        };
        if let Some(dir) = &a.save {
            let p = trace::path(dir, w);
            trace::save(&p, &trace).map_err(failed(p))?;
        }
        rows.extend(encode(a, &trace)?);
    }
    Ok(rows)
}

/// Run workload `w`'s guest and harvest its epochs as the primary would.
pub fn capture(a: &EncoderArgs, w: Workload) -> Result<Trace, EncoderBenchError> {
    let guest = |source| EncoderBenchError::Guest {
        workload: w.name(),
        source,
    };
    let spec = GuestSpec {
        memory_size: a.memory,
        params: guest_params(w, a.memory, a.seed, w.default_rate(), 64, 0),
        devices: Devices::default(),
    };
    let f = ha_backend::factory(a.guest, &FactoryOptions::default());
    let mut d = f.create(&spec).map_err(guest)?;
    let pages = usize::try_from(a.memory / PAGE_SIZE as u64).unwrap_or(usize::MAX);
    d.resume().map_err(guest)?;
    std::thread::sleep(Duration::from_secs_f64(a.warmup));

    // The pre-copy: every non-zero page, as a session's first round sends it.
    let mut dirty = PageBitmap::new(pages);
    let mut all = PageBitmap::new(pages);
    for p in 0..pages {
        all.set(p);
    }
    let mut epochs = Vec::with_capacity(a.epochs + 1);
    let mut take = |d: &mut Box<dyn ha_guest::domain::Domain>,
                    epoch: u64,
                    dirty: &PageBitmap,
                    skip_zero: bool|
     -> Result<(), DomainError> {
        let mut p = Pages::default();
        copy_pages(d.as_ref(), dirty, skip_zero, &mut p)?;
        let state = if epoch == 0 {
            None
        } else {
            Some(d.save_state()?)
        };
        epochs.push(Epoch {
            epoch,
            index: p.index,
            data: p.data,
            state,
        });
        Ok(())
    };
    d.pause().map_err(guest)?;
    d.harvest_dirty(&mut dirty).map_err(guest)?;
    take(&mut d, 0, &all, true).map_err(guest)?;
    d.resume().map_err(guest)?;

    let mut out = Vec::new();
    let mut next = Instant::now();
    for epoch in 1..=a.epochs as u64 {
        next += a.interval;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        d.pause().map_err(guest)?;
        dirty.clear();
        d.harvest_dirty(&mut dirty).map_err(guest)?;
        take(&mut d, epoch, &dirty, false).map_err(guest)?;
        out.clear();
        d.drain_output(&mut out).map_err(guest)?;
        d.resume().map_err(guest)?;
    }
    let _ = d.pause();
    Ok(Trace {
        workload: w,
        memory: a.memory,
        epochs,
    })
}

/// Feed the trace to every mode's encoder, `repeat` passes (the modes' order reversed
/// every other pass), and keep each mode's median pass by mean CPU.
pub fn encode(a: &EncoderArgs, t: &Trace) -> Result<Vec<EncoderRow>, EncoderBenchError> {
    let pages = usize::try_from(t.memory / PAGE_SIZE as u64).unwrap_or(usize::MAX);
    let mut passes: Vec<Vec<Vec<Encoded>>> = vec![Vec::new(); a.modes.len()];
    for pass in 0..a.repeat.max(1) {
        let mut order: Vec<usize> = (0..a.modes.len()).collect();
        if pass % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let mut lane = Lane::start(a, a.modes[i], pages)?;
            for e in &t.epochs {
                let job = job(
                    e.epoch,
                    Pages {
                        index: e.index.clone(),
                        data: e.data.clone(),
                        pending: None,
                    },
                    e.state.clone(),
                );
                lane.encode(job, e.epoch > 0)?;
            }
            passes[i].push(lane.reports);
        }
    }
    let medians: Vec<(Mode, Vec<Encoded>)> = passes
        .into_iter()
        .zip(&a.modes)
        .map(|(mut p, &m)| {
            p.sort_by(|x, y| mean_cpu(x).total_cmp(&mean_cpu(y)));
            let mid = p.len() / 2;
            (m, p.swap_remove(mid))
        })
        .collect();
    let base = medians.first().map_or(0.0, |(_, r)| mean_cpu(r));
    Ok(medians
        .iter()
        .map(|(m, r)| row(t.workload, *m, r, base))
        .collect())
}

fn job(epoch: u64, pages: Pages, state: Option<Vec<u8>>) -> Job {
    Job {
        epoch,
        pages,
        state,
        disk: Vec::new(),
        verify: None,
        verify_disk: None,
    }
}

fn mean_cpu(r: &[Encoded]) -> f64 {
    if r.is_empty() {
        return 0.0;
    }
    r.iter().map(|e| ms(e.encode_cpu)).sum::<f64>() / r.len() as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row(w: Workload, mode: Mode, reports: &[Encoded], base: f64) -> EncoderRow {
    let n = reports.len().max(1) as f64;
    let cpu_us: Vec<u64> = reports
        .iter()
        .map(|e| u64::try_from(e.encode_cpu.as_micros()).unwrap_or(u64::MAX))
        .collect();
    let mean = mean_cpu(reports);
    let per_epoch = |f: fn(&Encoded) -> u64| reports.iter().map(f).sum::<u64>() as f64 / n;
    let kinds = Encoding::ALL
        .iter()
        .map(|&k| {
            let pages = reports
                .iter()
                .map(|e| e.stats.kinds[k as usize].pages)
                .sum();
            (k.name(), pages)
        })
        .filter(|&(_, p)| p > 0)
        .collect();
    EncoderRow {
        workload: w.name(),
        mode: mode.name(),
        epochs: reports.len(),
        pages_per_epoch: reports.iter().map(|e| e.pages as f64).sum::<f64>() / n,
        wire_kb_per_epoch: reports.iter().map(|e| e.wire_bytes as f64).sum::<f64>() / n / 1e3,
        cpu_ms_mean: mean,
        cpu_ms_p50: percentile(&cpu_us, 50),
        cpu_ms_p90: percentile(&cpu_us, 90),
        cpu_ratio: if base > 0.0 { mean / base } else { 0.0 },
        kinds,
        blocks_per_epoch: [
            per_epoch(|e| e.stats.changed_blocks),
            per_epoch(|e| e.stats.shared_blocks),
            per_epoch(|e| e.stats.zero_blocks),
            per_epoch(|e| e.stats.literal_blocks),
        ],
        compress_per_epoch: [
            per_epoch(|e| e.stats.compress_tries),
            per_epoch(|e| e.stats.compress_wins),
            per_epoch(|e| e.stats.compress_skipped),
        ],
    }
}

/// The rows as a markdown table.
pub fn markdown(rows: &[EncoderRow]) -> String {
    let mut s = String::from(
        "| workload | mode | epochs | pages/epoch | wire KB/epoch | encode CPU ms/epoch mean / p50 / p90 | ÷ first mode | pages by encoding | blocks/epoch changed / shared / zero / literal | compressions/epoch tried / kept / skipped |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let kinds = r
            .kinds
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.3} / {:.3} / {:.3} | {:.2} | {} | {:.0} / {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} |\n",
            r.workload,
            r.mode,
            r.epochs,
            r.pages_per_epoch,
            r.wire_kb_per_epoch,
            r.cpu_ms_mean,
            r.cpu_ms_p50,
            r.cpu_ms_p90,
            r.cpu_ratio,
            kinds,
            r.blocks_per_epoch[0],
            r.blocks_per_epoch[1],
            r.blocks_per_epoch[2],
            r.blocks_per_epoch[3],
            r.compress_per_epoch[0],
            r.compress_per_epoch[1],
            r.compress_per_epoch[2],
        ));
    }
    s
}
