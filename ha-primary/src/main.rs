//! `ha-primary`: run a guest and protect it with a backup.

use clap::Parser;
use ha_common::block::BlockSize;
use ha_common::codec::{CodecConfig, GeneralCodec, Mode};
use ha_common::domain::{DomainFactory, GuestSpec};
use ha_common::guest_abi::{GuestParams, HEAP_GPA, Workload};
use ha_common::units::{parse_duration, parse_size};
use ha_primary::engine::{self, Config};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Run a built-in guest and checkpoint it to a Castor backup every epoch.
///
/// The primary connects to the backup, synchronizes the guest's memory while it runs
/// (pre-copy), then every interval pauses the guest, takes the pages it dirtied, and sends
/// them (encoded by the chosen mode) while the next epoch runs. Output the guest produces
/// is held until the backup acknowledges the checkpoint that produced it.
#[derive(Parser, Debug)]
#[command(name = "ha-primary", version, about, long_about)]
struct Cli {
    /// The backup's address (host:port).
    #[arg(long, default_value = "127.0.0.1:7700")]
    backup: SocketAddr,
    /// Guest backend: kvm (a real VM on /dev/kvm) or sim (simulated, in this process).
    #[arg(long, default_value = "kvm", value_parser = ["kvm", "sim"])]
    guest: String,
    /// Built-in workload the guest runs: idle, memwrite, web, kv, npb.
    #[arg(long, default_value = "web")]
    workload: Workload,
    /// Guest memory size (a multiple of 2M).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Working set of the workload (default: all memory above 1 MiB, less 1 MiB).
    #[arg(long, value_parser = parse_size)]
    heap: Option<u64>,
    /// Workload units per second (0: as fast as it can).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Workload PRNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The guest emits an output record every this many units.
    #[arg(long, default_value_t = 64)]
    output_every: u64,
    /// Epoch interval (checkpoint period), e.g. 25ms.
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    interval: Duration,
    /// Encoding: remus (whole pages), xbzrle (page deltas), fgbi (blocks, sharing, hybrid).
    #[arg(long, default_value = "fgbi")]
    mode: Mode,
    /// Block size for fgbi, a power of two from 32 to 1024.
    #[arg(long, default_value = "64", value_parser = parse_block_size)]
    block_size: BlockSize,
    /// Page cache (last-sent content) for xbzrle and fgbi.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    cache_size: u64,
    /// General compressor for pages with no usable delta: zlib, lz4, none.
    #[arg(long, default_value = "zlib")]
    codec: GeneralCodec,
    /// Checkpoints in flight (taken, not yet acknowledged) before the epoch stretches.
    #[arg(long, default_value_t = 2)]
    pipeline: usize,
    /// Heartbeat interval when nothing else is sent (default: the epoch interval).
    #[arg(long, value_parser = parse_duration)]
    heartbeat: Option<Duration>,
    /// The backup is lost when a checkpoint waits this long for its ack.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    ack_timeout: Duration,
    /// When the backup is lost, pause the guest instead of continuing unprotected.
    #[arg(long)]
    fence: bool,
    /// Send a digest of the whole memory every N checkpoints; the backup checks it (0: off).
    #[arg(long, default_value_t = 0)]
    verify_every: u64,
    /// Pre-copy rounds at most before the first checkpoint.
    #[arg(long, default_value_t = 5)]
    precopy_rounds: usize,
    /// Pre-copy stops once a round finds at most this many dirty pages.
    #[arg(long, default_value_t = 1024)]
    precopy_threshold: usize,
    /// Stop after this long (default: run until SIGTERM or SIGINT).
    #[arg(long, value_parser = parse_duration)]
    run_for: Option<Duration>,
    /// Send released guest output to this address (host:port).
    #[arg(long)]
    output: Option<SocketAddr>,
    /// Write per-epoch statistics as CSV to this file.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Write state changes as JSON lines to this file.
    #[arg(long)]
    events: Option<PathBuf>,
}

fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    BlockSize::new(n).map_err(|e| e.to_string())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` only stores to an atomic, which is async-signal-safe, and
        // has the signature `signal` expects.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("ha-primary: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

use std::error::Error;

fn run(cli: Cli) -> Result<(), Box<dyn Error>> {
    let heap = cli
        .heap
        .unwrap_or(cli.memory.saturating_sub(HEAP_GPA + (1 << 20)));
    let spec = GuestSpec {
        memory_size: cli.memory,
        params: GuestParams {
            workload: cli.workload,
            seed: cli.seed,
            heap_gpa: HEAP_GPA,
            heap_size: heap,
            rate: cli.rate,
            tsc_khz: 0,
            output_every: cli.output_every,
            doorbell_every: 256,
        },
    };
    let factory: Box<dyn DomainFactory> = match cli.guest.as_str() {
        "sim" => Box::new(ha_sim::SimFactory::new()),
        _ => Box::new(ha_kvm::KvmFactory::new()),
    };
    let cfg = Config {
        backup: cli.backup,
        codec: CodecConfig {
            mode: cli.mode,
            block_size: cli.block_size,
            general: cli.codec,
            zlib_level: 1,
        },
        cache_bytes: usize::try_from(cli.cache_size)?,
        interval: cli.interval,
        pipeline: cli.pipeline,
        heartbeat: cli.heartbeat.unwrap_or(cli.interval),
        ack_timeout: cli.ack_timeout,
        fence: cli.fence,
        verify_every: cli.verify_every,
        precopy_rounds: cli.precopy_rounds,
        precopy_threshold: cli.precopy_threshold,
        run_for: cli.run_for,
        output: cli.output,
        stats: cli.stats,
        events: cli.events,
    };
    tracing::info!(
        guest = factory.name(),
        workload = cli.workload.name(),
        memory_mib = cli.memory >> 20,
        mode = %cli.mode,
        block = %cli.block_size,
        interval_ms = cli.interval.as_secs_f64() * 1e3,
        backup = %cli.backup,
        "ha-primary starting"
    );
    let mut domain = factory.create(&spec)?;
    domain.resume()?;
    let summary = engine::run(&cfg, domain.as_mut(), &STOP)?;
    tracing::info!(
        epochs = summary.epochs_committed,
        pause_p50_ms = summary.pause_ms_p50,
        pause_p99_ms = summary.pause_ms_p99,
        released = summary.outputs_released,
        backup_lost = summary.backup_lost,
        "ha-primary stopped"
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
