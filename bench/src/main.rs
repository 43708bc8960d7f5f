//! `ha-bench`: Castor's benchmarks.
//!
//! `ha-bench drill` runs the failover drill; `ha-bench compare` runs the modes side by
//! side on real guests; `ha-bench codec` measures the page codecs on generated and captured
//! page pairs.

use clap::{Parser, Subcommand};
use ha_backend::BackendKind;
use ha_bench::codec::{self, Input, Knowledge, Row, Settings, Subject};
use ha_bench::compare::{self, CompareArgs, Rate};
use ha_bench::{cases, pgpairs, plot};
use ha_codec::block::BlockSize;
use ha_codec::codec::GeneralCodec;
use ha_daemon::error_chain;
use ha_daemon::units::{parse_duration, parse_rate, parse_size};
use ha_workloads::guest_abi::Workload;
use std::path::PathBuf;
use std::process::ExitCode;

/// The backends the benchmarks run: they create built-in workload guests, which Xen has
/// not (it protects an existing domain).
const GUESTS: [BackendKind; 2] = [BackendKind::Kvm, BackendKind::Sim];

/// Castor benchmarks. Figures are ratios measured in one run on this machine.
#[derive(Parser, Debug)]
#[command(name = "ha-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The failover drill: protect a guest with a backup, kill the primary, watch the
    /// backup take over, and check continuity.
    ///
    /// Starts ha-backup and ha-primary as separate processes on loopback (built first when
    /// run through cargo), protects a built-in guest, shows live progress, kills the primary
    /// with SIGKILL at a random moment after --seconds, and reports detection and activation
    /// times and a continuity verdict (resumed checkpoint, progress counter, memory checksum,
    /// output sequence). Exits non-zero when continuity fails. With --pairs or --hosts,
    /// many independent pairs placed across network-namespace hosts and one host killed
    /// (see --pairs); a table per pair, or --json.
    Drill(DrillCli),
    /// The drill across guest memory sizes: detection, activation and failover time
    /// against memory.
    ///
    /// Runs the drill at every size of --memory, --repeat passes (the sizes taken in turn
    /// within each pass), prints the medians per size, and with --out writes every drill
    /// to failover.csv and the medians against memory to failover.png. Exits non-zero when
    /// any drill fails its continuity checks.
    Failover(FailoverCli),
    /// Pause per checkpoint against the pages dirtied in the epoch.
    ///
    /// Runs the npb guest (one whole page dirtied per unit) at each --memory, --rates and
    /// --intervals under each mode and --copy path, with a real backup, and reports the
    /// dirty pages per checkpoint it measured beside the pause p50/p99 and the guest's
    /// progress. Writes pause.md, pause.csv and pause-dirty.png into --out.
    Pause(PauseCli),
    /// The initial sync of a disk replica: bytes and time against the disk's size.
    ///
    /// Fills a --disk-size image with incompressible bytes, copies it as the backup's
    /// replica with --differ percent of its 4 KiB blocks changed at random, runs a real
    /// pair (the db guest on that disk) until the primary reports the disk in sync, and
    /// prints blocks found, fingerprint and block bytes against the disk, and times.
    Disksync(DiskSyncCli),
    /// Re-protection to a backup holding a stale image of the guest, against a full copy.
    ///
    /// A planned switchover with the roles swapped: the old primary becomes the backup
    /// with the guest's memory at the handover, and the new primary, having run the guest
    /// unprotected for --stale seconds, resyncs it by fingerprints. Prints pages that
    /// differed, fingerprint and page bytes and times, beside the same guest's full copy
    /// (its initial sync); writes reprotect.md into --out.
    Reprotect(ReprotectCli),
    /// A planned switchover against a failover and a cold restart: downtime and bytes,
    /// over each link rate.
    ///
    /// For each --link, three fresh pairs (processes on loopback, the primary's sender
    /// shaped to the rate) protect the guest for --warmup seconds; then the first is moved
    /// by a planned switchover (SIGUSR1), the second by a failover (SIGKILL of the
    /// primary), the third by a cold restart (the pair killed and the guest started anew
    /// with a fresh backup). Prints downtime, the output gap the world saw, the bytes that
    /// crossed to move the guest and whether it kept its state; writes switchover.md into
    /// --out.
    Switchover(SwitchoverCli),
    /// The encode stage's CPU per checkpoint, mode against mode, on the same epochs.
    ///
    /// Runs one guest per workload; every --interval pauses it, harvests its dirty pages
    /// and state as the primary does, and hands the same epoch to the primary's encoder
    /// thread of every mode (each warmed by a pre-copy of the guest's memory). Reports the
    /// encoder thread's CPU per epoch and the bytes per epoch of each mode, with the CPU
    /// ratio to the first mode: no backup, no link, no run-to-run drift between modes.
    Encoder(EncoderCli),
    /// Encode and decode page pairs in each mode; compare with memcpy of the same pages.
    ///
    /// Inputs: the eight generated cases of shared/bench/PAGE-CASES.md (16384 pairs each),
    /// and PGPAIRS files of real guest pages (plain or zstd-compressed). Without --pairs,
    /// the files in shared/data/pagepairs beside the repository are used when present.
    Codec(CodecArgs),
    /// Compare protection modes on real guests: overhead, pause, wire bytes, CPU.
    ///
    /// For each workload: one unprotected run (mode none: no dirty log, no backup), then
    /// one run per mode with ha-primary and a real ha-backup as separate processes on
    /// loopback (built first when run through cargo), at each interval and link rate; then
    /// an fgbi block-size sweep. Prints a markdown table (or JSON lines), and writes
    /// compare.md, compare.csv and PNG plots into --out.
    Compare(CompareCli),
    /// The fault campaign: seeded runs of a real pair with one fault each, checked
    /// against the output-commit invariants.
    ///
    /// Each run starts ha-backup and ha-primary as separate processes (the link through a
    /// fault proxy, a world that checks every released output record), waits until the
    /// guest is protected, and at a random moment kills or stops (SIGSTOP, then SIGCONT) a
    /// daemon, cuts or stalls the link, delays the acks, fills the backup's disk, or
    /// restarts the backup. Once the fault has passed it checks that some side runs the
    /// guest, then kills the primary and checks the output the world saw, that at most one
    /// copy released output at a time, and that a takeover resumed from the last commit.
    /// Scenarios are taken in turn, each under the default policy and then --fence. Prints
    /// a table (runs, then a tally per scenario and policy); exits non-zero on any defect. Runs
    /// that the default policy gives up by design (split brain when the link fails) or
    /// that --fence stops by design are reported as such.
    Chaos(ChaosCli),
}

#[derive(clap::Args, Debug)]
struct PauseCli {
    /// Guest backend: kvm (real VMs; what the figures mean) or sim (simulated).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// Guest memory sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1G")]
    memory: Vec<String>,
    /// npb units per second (each dirties one page), comma-separated; 0: as fast as the
    /// guest can (its progress then shows what each copy path costs it).
    #[arg(long, value_delimiter = ',', default_value = "4000,16000,64000")]
    rates: Vec<u64>,
    /// Epoch intervals, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "25ms,250ms,1s", value_parser = parse_duration)]
    intervals: Vec<std::time::Duration>,
    /// Modes, comma-separated (remus copies every dirty page during the pause).
    #[arg(long, value_delimiter = ',', default_value = "remus,fgbi")]
    modes: Vec<String>,
    /// The primary's copy paths to compare, comma-separated: pause (copy in the pause),
    /// cow (copy-on-write behind the running guest), auto (chosen per checkpoint); each
    /// run of one setting is taken with every path back to back.
    #[arg(long, value_delimiter = ',', default_value = "pause,cow")]
    copy: Vec<String>,
    /// Measured seconds per run (at least a few checkpoints at the longest interval).
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Seconds skipped once a run is protected.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Where pause.md, pause.csv and pause-dirty.png go.
    #[arg(long, default_value = "target/pause")]
    out: PathBuf,
    /// Keep each run's directory (logs, events, the primary's per-checkpoint stats).
    #[arg(long)]
    keep: bool,
}

#[derive(clap::Args, Debug)]
struct EncoderCli {
    /// Guest backend: kvm (real VMs; what the figures mean) or sim (simulated).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// Workloads, comma-separated, each run at its default rate.
    #[arg(long, value_delimiter = ',', default_value = "web,kv")]
    workloads: Vec<Workload>,
    /// Modes, comma-separated; ratios are to the first.
    #[arg(long, value_delimiter = ',', default_value = "remus,xbzrle,fgbi")]
    modes: Vec<ha_codec::codec::Mode>,
    /// Guest memory.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Epoch interval.
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    interval: std::time::Duration,
    /// Epochs measured per workload.
    #[arg(long, default_value_t = 400)]
    epochs: usize,
    /// Seconds the guest runs before its memory is pre-copied.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// fgbi's block size (32..=1024, a power of two).
    #[arg(long, default_value_t = 64)]
    block_size: u32,
    /// The page cache of xbzrle and fgbi (the primary's --cache-size).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    cache_size: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Passes of every mode over each workload's epochs (the median pass is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Write each workload's epochs to DIR/<workload>.trace.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// Encode the epochs of DIR/<workload>.trace instead of running a guest (to compare
    /// encoder builds on the same pages).
    #[arg(long, value_name = "DIR", conflicts_with = "save")]
    load: Option<PathBuf>,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct DiskSyncCli {
    /// Guest backend: kvm (real VMs; what the figures mean) or sim (simulated).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// The disk's size.
    #[arg(long, default_value = "1G", value_parser = ha_daemon::units::parse_size)]
    disk_size: u64,
    /// Percent of the replica's blocks that differ, comma-separated (one run each).
    #[arg(long, value_delimiter = ',', default_value = "0,1,10")]
    differ: Vec<f64>,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Where the images, logs and disksync.md go (the images are deleted at the end).
    #[arg(long, default_value = "target/disksync")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ReprotectCli {
    /// Guest backend: kvm (real VMs; what the figures mean) or sim (simulated).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    memory: String,
    /// The workload.
    #[arg(long, default_value = "web")]
    workload: String,
    /// Seconds the guest runs at the new primary before the old one's image is compared,
    /// comma-separated (one run each).
    #[arg(long, value_delimiter = ',', default_value = "0,1,5,10")]
    stale: Vec<f64>,
    /// Seconds the guest runs protected before the switchover (its memory fills).
    #[arg(long, default_value_t = 10.0)]
    warmup: f64,
    /// Where the logs and reprotect.md go.
    #[arg(long, default_value = "target/reprotect")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct SwitchoverCli {
    /// Guest backend: kvm (real VMs; what the figures mean) or sim (simulated).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// The workload.
    #[arg(long, default_value = "web")]
    workload: String,
    /// Link rates, comma-separated: unlimited, or a rate such as 100mbit (a token bucket
    /// at the primary's sender, `--link-rate`).
    #[arg(long, value_delimiter = ',', default_value = "unlimited,100mbit", value_parser = parse_link)]
    link: Vec<Option<u64>>,
    /// Seconds the guest runs protected before it is moved.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Where the runs' logs and switchover.md go.
    #[arg(long, default_value = "target/switchover")]
    out: PathBuf,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct ChaosCli {
    /// Runs in all (scenarios taken in turn, each under both policies).
    #[arg(long, default_value_t = 18)]
    runs: usize,
    /// Seed of the first run (run i uses seed + i); default: from the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Scenarios, comma-separated: kill-primary, kill-backup, stop-primary, stop-backup,
    /// cut-link, stall-link, delay-acks, full-disk (needs root), restart-backup.
    #[arg(long, value_delimiter = ',', value_parser = ha_bench::chaos::Scenario::parse)]
    scenarios: Vec<ha_bench::chaos::Scenario>,
    /// Guest backend: kvm (real VMs) or sim (simulated).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// Guest memory.
    #[arg(long, default_value = "32M")]
    memory: String,
    /// Keep every run's directory (logs, events, ack log) and print it.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the table here (markdown).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct CompareCli {
    /// Guest backend: kvm (real VMs; what the figures mean) or sim (simulated).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// Workloads, comma-separated: memwrite, web, kv, npb (also idle), and with a disk db,
    /// files (each run on a fresh disk of --disk-size, the backup's replica a copy).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "memwrite,web,kv,npb,db,files"
    )]
    workloads: Vec<Workload>,
    /// The disk's size for db and files (a multiple of 4K).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    disk_size: u64,
    /// Where db's and files's disk images go (default: each run's directory under the
    /// temporary directory); a tmpfs such as /dev/shm takes the host disk's flush latency
    /// out of the figures.
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// Modes, comma-separated: none (unprotected baseline), remus, xbzrle, fgbi.
    #[arg(long, value_delimiter = ',', default_value = "none,remus,xbzrle,fgbi")]
    modes: Vec<String>,
    /// Epoch intervals to run, comma-separated (e.g. 10ms,25ms,50ms,100ms,200ms).
    #[arg(long, value_delimiter = ',', default_value = "25ms", value_parser = parse_duration)]
    intervals: Vec<std::time::Duration>,
    /// Link rates, comma-separated: unlimited, or a rate such as 100mbit or 1gbit (a token
    /// bucket at the primary's sender).
    #[arg(long, value_delimiter = ',', default_value = "unlimited", value_parser = parse_link)]
    link: Vec<Option<u64>>,
    /// fgbi block sizes to sweep besides 64, comma-separated (e.g. 32,128,256,512,1024);
    /// run at the first interval and link. Default: no sweep.
    #[arg(long, value_delimiter = ',')]
    block_sizes: Vec<u32>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds skipped once a run is protected (or, for none, once the guest runs).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Workload rate: default (each workload's calibrated rate: overhead is the progress
    /// the pauses and dirty tracking cost a paced guest), max (as fast as the guest can:
    /// overhead is lost throughput, dominated on PVM by write-fault costs), or units per
    /// second.
    #[arg(long, default_value = "default", value_parser = Rate::parse)]
    rate: Rate,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where compare.md, compare.csv and the PNG plots go.
    #[arg(long, default_value = "target/compare")]
    out: PathBuf,
    /// No PNG plots (they need a TrueType font: fonts-dejavu-core).
    #[arg(long)]
    no_plots: bool,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep each protected run's logs, events and stats.
    #[arg(long)]
    keep: bool,
    /// Passes over the whole list (interleaving the modes); each figure reported is the
    /// median over the passes, and the overhead's range is shown. The guest's progress
    /// rate on a shared host varies by several percent from run to run.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Run a fresh unprotected `none` right before each protected run and take the run's
    /// overhead against it, not against the pass's one `none` (needs `none` in --modes;
    /// twice the time): load drift on a shared host then cancels out of the overhead.
    #[arg(long)]
    paired: bool,
    /// Run nothing: read the compare.csv a run wrote and write its table and plots into
    /// --out again.
    #[arg(long, value_name = "CSV")]
    replot: Option<PathBuf>,
}

fn parse_link(s: &str) -> Result<Option<u64>, String> {
    if s == "unlimited" {
        return Ok(None);
    }
    parse_rate(s).map(Some).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug)]
struct DrillCli {
    /// Guest backend: kvm (a real VM on /dev/kvm) or sim (simulated, where there is no KVM).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// Built-in workload: idle, memwrite, web, kv, npb, or with a disk db, files (the
    /// drill makes the disk and the backup's replica, and checks the replica after the
    /// failover).
    #[arg(long, default_value = "web")]
    workload: String,
    /// The disk's size for db and files (a multiple of 4K).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    disk_size: u64,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// Encoding mode: remus, xbzrle, fgbi.
    #[arg(long, default_value = "fgbi")]
    mode: String,
    /// Epoch interval.
    #[arg(long, default_value = "25ms")]
    interval: String,
    /// Workload units per second (default: the workload's own; web 2500, others 20000).
    #[arg(long)]
    rate: Option<u64>,
    /// The backup's timeout for a silent primary. A killed primary is noticed at once (its
    /// connection closes); this guards against scheduling stalls on a loaded host.
    #[arg(long, default_value = "500ms")]
    detect_timeout: String,
    /// Seconds of protection before the primary is killed (plus a random part of a second).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds the backup runs the guest after taking over.
    #[arg(long, default_value_t = 3.0)]
    after: f64,
    /// Seed for the kill moment (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object instead of progress and a table.
    #[arg(long)]
    json: bool,
    /// Keep the run's logs, events and statistics (the directory is printed).
    #[arg(long)]
    keep: bool,
    /// Run both daemons with --insecure (plain TCP) instead of a fresh pair key, e.g. to
    /// measure what encryption costs.
    #[arg(long)]
    insecure: bool,
    /// etcd client URLs: both daemons hold the guest's key there under a lease (the
    /// backup activates once the killed primary's lease expired); the report adds the
    /// lease wait. Start etcd first (Debian's etcd-server).
    #[arg(long, value_name = "URLS")]
    etcd: Option<String>,
    /// The lease's TTL with --etcd (and of every pair's key with --pairs/--hosts).
    #[arg(long, default_value = "5s")]
    lease_ttl: String,
    /// Many pairs: run this many independent pairs (each its own key, ports, lease key
    /// and world) placed across --hosts network namespaces, with an etcd member the drill
    /// starts; pair i's primary on host i mod H, its backup on the next host, a spare for
    /// re-protection on the one after. Kills every process of --kill-host and checks each
    /// pair (needs root, iproute2 and etcd-server). Default with --hosts: one per host.
    #[arg(long, value_name = "N")]
    pairs: Option<usize>,
    /// Hosts (network namespaces) for --pairs; at least 3. Default with --pairs: 3.
    #[arg(long, value_name = "H")]
    hosts: Option<usize>,
    /// The host the many-pairs drill kills (0 to H-1).
    #[arg(long, default_value_t = 0)]
    kill_host: usize,
    /// With --pairs/--hosts: take the killed host's link down before killing its
    /// processes, as a host that loses power (no connection of its closes; the others
    /// notice by --detect-timeout and their ack timeout).
    #[arg(long)]
    power_off: bool,
}

#[derive(clap::Args, Debug)]
struct FailoverCli {
    /// Guest memory sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256M,1G,4G")]
    memory: Vec<String>,
    /// Passes over the sizes.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Write failover.csv and failover.png into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Guest backend: kvm (a real VM on /dev/kvm) or sim (simulated, where there is no KVM).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser_of(&GUESTS))]
    guest: BackendKind,
    /// Built-in workload: idle, memwrite, web, kv, npb.
    #[arg(long, default_value = "memwrite")]
    workload: String,
    /// Encoding mode: remus, xbzrle, fgbi.
    #[arg(long, default_value = "fgbi")]
    mode: String,
    /// Epoch interval.
    #[arg(long, default_value = "25ms")]
    interval: String,
    /// The backup's timeout for a silent primary.
    #[arg(long, default_value = "500ms")]
    detect_timeout: String,
    /// Seconds of protection before each kill (plus a random part of a second).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Seconds the backup runs the guest after taking over.
    #[arg(long, default_value_t = 1.0)]
    after: f64,
    /// Seed of the first kill moment (drill i uses seed + i; default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(clap::Args, Debug)]
struct CodecArgs {
    /// Generated cases to run (letters a..h); default all eight.
    #[arg(long = "case", value_name = "LETTER")]
    cases: Vec<char>,
    /// Pairs per generated case.
    #[arg(long, default_value_t = 16384)]
    pages: usize,
    /// A PGPAIRS file to run (repeatable).
    #[arg(long = "pairs", value_name = "FILE")]
    pairs: Vec<PathBuf>,
    /// Run no PGPAIRS files (not even the default ones).
    #[arg(long)]
    no_pairs: bool,
    /// Modes to run: delta (the bare XBZRLE encoder on the best SIMD path; delta/avx512,
    /// delta/avx2, delta/sse2, delta/portable name a path), remus, xbzrle, fgbi.
    #[arg(long = "mode", value_name = "MODE", value_delimiter = ',', default_values_t = ["delta".to_string(), "remus".to_string(), "xbzrle".to_string(), "fgbi".to_string()])]
    modes: Vec<String>,
    /// What the primary knows of each old page: its content, its block hashes, nothing.
    #[arg(long, value_enum, default_value_t = Knowledge::Warm)]
    cache: Knowledge,
    /// Block size for fgbi (32..=1024, a power of two).
    #[arg(long, default_value_t = 64)]
    block_size: u32,
    /// General codec for fgbi: zlib, lz4 or none.
    #[arg(long, default_value = "zlib")]
    codec: String,
    /// Timed repetitions per measurement (the best is kept).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    ha_daemon::logging::init("error");
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Codec(a) => run_codec(a),
        Cmd::Drill(a) => run_drill(a),
        Cmd::Failover(a) => run_failover(a),
        Cmd::Compare(a) => run_compare(a),
        Cmd::Chaos(a) => run_chaos(a),
        Cmd::Pause(a) => run_pause(a),
        Cmd::Disksync(a) => run_disksync(a),
        Cmd::Reprotect(a) => run_reprotect(a),
        Cmd::Switchover(a) => run_switchover(a),
        Cmd::Encoder(a) => run_encoder(a),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("ha-bench: some pages did not decode to their new content");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ha-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_drill(a: DrillCli) -> Result<bool, String> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let many = a.pairs.is_some() || a.hosts.is_some();
    if many && a.etcd.is_some() {
        return Err("--etcd: the many-pairs drill starts its own etcd on the hosts' bridge".into());
    }
    let args = ha_bench::drill::DrillArgs {
        guest: a.guest,
        workload: a.workload,
        memory: a.memory,
        mode: a.mode,
        interval: a.interval,
        detect_timeout: a.detect_timeout,
        rate: a.rate,
        seconds: a.seconds,
        after: a.after,
        seed,
        live: !a.json,
        keep: a.keep,
        insecure: a.insecure,
        disk_size: a.disk_size,
        lease: (many || a.etcd.is_some())
            .then(|| (a.etcd.clone().unwrap_or_default(), a.lease_ttl.clone())),
    };
    if many {
        let hosts = a.hosts.unwrap_or(3);
        let cluster = ha_bench::cluster::ClusterArgs {
            drill: args,
            pairs: a.pairs.unwrap_or(hosts),
            hosts,
            kill_host: a.kill_host,
            power_off: a.power_off,
        };
        return run_cluster(&cluster, a.json);
    }
    let report = ha_bench::drill::run(&args).map_err(|e| error_chain(&e))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        ha_bench::drill::print_summary(&report);
    }
    if report.continuity_ok {
        Ok(true)
    } else {
        Err("continuity failed".into())
    }
}

fn run_cluster(args: &ha_bench::cluster::ClusterArgs, json: bool) -> Result<bool, String> {
    use ha_bench::cluster;
    let d = &args.drill;
    if !(0.0..=3600.0).contains(&d.seconds) || !(0.0..=3600.0).contains(&d.after) {
        return Err("--seconds and --after: from 0 to 3600".into());
    }
    let report = cluster::run(args).map_err(|e| error_chain(&e))?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        cluster::print_summary(&report);
    }
    if report.ok {
        Ok(true)
    } else {
        Err("some pair failed its checks".into())
    }
}

fn run_failover(a: FailoverCli) -> Result<bool, String> {
    use ha_bench::failover;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let sweep = failover::SweepArgs {
        drill: ha_bench::drill::DrillArgs {
            guest: a.guest,
            workload: a.workload,
            memory: String::new(),
            mode: a.mode,
            interval: a.interval,
            detect_timeout: a.detect_timeout,
            rate: None,
            seconds: a.seconds,
            after: a.after,
            seed,
            live: false,
            keep: false,
            insecure: false,
            disk_size: 64 << 20,
            lease: None,
        },
        sizes: a.memory,
        repeat: a.repeat,
    };
    let points = failover::run(&sweep, |p| {
        eprintln!(
            "pass {} at {}: detection {} ms, activation {} ms, failover {} ms{}",
            p.pass,
            p.memory,
            p.detection_ms,
            p.activation_ms,
            p.failover_ms,
            if p.continuity_ok {
                ""
            } else {
                ", CONTINUITY FAILED"
            }
        );
    })
    .map_err(|e| error_chain(&e))?;
    print!("{}", failover::table(&points));
    if let Some(dir) = &a.out {
        for f in failover::write(&points, dir).map_err(|e| error_chain(&e))? {
            println!("wrote {}", f.display());
        }
    }
    Ok(points.iter().all(|p| p.continuity_ok))
}

fn run_encoder(a: EncoderCli) -> Result<bool, String> {
    use ha_bench::encoder;
    let args = encoder::EncoderArgs {
        guest: a.guest,
        workloads: a.workloads,
        modes: a.modes,
        memory: a.memory,
        interval: a.interval,
        epochs: a.epochs,
        warmup: a.warmup,
        block_size: BlockSize::new(a.block_size).map_err(|e| e.to_string())?,
        cache_bytes: a.cache_size,
        seed: a.seed,
        repeat: a.repeat,
        save: a.save,
        load: a.load,
    };
    let rows = encoder::run(&args).map_err(|e| error_chain(&e))?;
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
        }
    } else {
        print!("{}", encoder::markdown(&rows));
    }
    Ok(true)
}

fn run_pause(a: PauseCli) -> Result<bool, String> {
    use ha_bench::pause;
    let args = pause::PauseArgs {
        guest: a.guest,
        memories: a.memory,
        rates: a.rates,
        intervals: a.intervals,
        modes: a.modes,
        copies: a.copy,
        seconds: a.seconds,
        warmup: a.warmup,
        keep: a.keep,
    };
    let rows = pause::run(&args, |r| {
        eprintln!(
            "{} {} copy {} {} ms npb {}/s: {:.0} dirty pages per checkpoint, pause p50 {:.2} ms p99 {:.2} ms, progress {:.0}/s, {}/{} copy-on-write, {:.1} pages faulted per checkpoint",
            r.memory,
            r.run.mode,
            r.run.copy,
            r.run.interval_ms,
            r.run.rate,
            r.dirty_pages(),
            r.run.pause_ms_p50,
            r.run.pause_ms_p99,
            r.run.progress_per_s,
            r.run.cow_checkpoints,
            r.run.checkpoints,
            r.run.cow_faulted_per_epoch
        );
    })
    .map_err(|e| error_chain(&e))?;
    let table = pause::markdown(&rows);
    print!("{table}");
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let write = |name: &str, text: &str| {
        let f = a.out.join(name);
        std::fs::write(&f, text).map_err(|e| format!("{}: {e}", f.display()))?;
        println!("wrote {}", f.display());
        Ok::<(), String>(())
    };
    write("pause.md", &table)?;
    write("pause.csv", &pause::csv(&rows))?;
    match pause::plot(&rows, &a.out) {
        Ok(f) => println!("wrote {}", f.display()),
        Err(e) => eprintln!("ha-bench: no plot: {e}"),
    }
    Ok(true)
}

fn run_reprotect(a: ReprotectCli) -> Result<bool, String> {
    use ha_bench::reprotect;
    if a.stale.iter().any(|s| !(0.0..=600.0).contains(s)) || !(0.0..=600.0).contains(&a.warmup) {
        return Err("--stale and --warmup: seconds from 0 to 600".into());
    }
    let args = reprotect::ReprotectArgs {
        guest: a.guest,
        memory: a.memory.clone(),
        workload: a.workload.clone(),
        stale: a.stale.clone(),
        warmup: a.warmup,
        dir: a.out.clone(),
    };
    let rows = reprotect::run(&args, |r| {
        println!(
            "stale {:.0} s: {} of {} pages differ; resync {:.1} MB in {} ms, full copy {:.1} MB in {} ms",
            r.stale_s,
            r.differ,
            r.pages,
            (r.fingerprint_bytes + r.resync_bytes) as f64 / 1e6,
            r.resync_ms,
            r.full_bytes as f64 / 1e6,
            r.full_ms
        );
    })
    .map_err(|e| ha_daemon::error_chain(&e))?;
    let table = reprotect::markdown(&rows);
    print!("{table}");
    let f = a.out.join("reprotect.md");
    std::fs::write(&f, &table).map_err(|e| format!("{}: {e}", f.display()))?;
    Ok(true)
}

fn run_switchover(a: SwitchoverCli) -> Result<bool, String> {
    use ha_bench::switchover;
    if !(0.0..=600.0).contains(&a.warmup) {
        return Err("--warmup: seconds from 0 to 600".into());
    }
    let args = switchover::SwitchoverArgs {
        guest: a.guest,
        memory: a.memory,
        workload: a.workload,
        links: a.link,
        warmup: a.warmup,
        dir: a.out.clone(),
    };
    let json = a.json;
    let rows = switchover::run(&args, |r| {
        if json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            eprintln!(
                "{} {:?}: downtime {} ms, output gap {} ms, {} bytes moved",
                r.link, r.method, r.downtime_ms, r.output_gap_ms, r.move_bytes
            );
        }
    })
    .map_err(|e| error_chain(&e))?;
    let table = switchover::markdown(&rows);
    if !json {
        print!("{table}");
    }
    let f = a.out.join("switchover.md");
    std::fs::write(&f, &table).map_err(|e| format!("{}: {e}", f.display()))?;
    Ok(true)
}

fn run_disksync(a: DiskSyncCli) -> Result<bool, String> {
    use ha_bench::disksync;
    if a.disk_size == 0 || !a.disk_size.is_multiple_of(1 << 20) {
        return Err(format!(
            "--disk-size {} is not a positive multiple of 1M",
            a.disk_size
        ));
    }
    if a.differ.iter().any(|d| !(0.0..=100.0).contains(d)) {
        return Err("--differ takes percentages from 0 to 100".into());
    }
    let args = disksync::DiskSyncArgs {
        guest: a.guest,
        disk: a.disk_size,
        differ: a.differ,
        memory: a.memory,
        dir: a.out.clone(),
    };
    let rows = disksync::run(&args, |r| {
        eprintln!(
            "{} MiB, {} blocks changed: {} sent, {:.2} % of the disk crossed, compare {} ms, sync {} ms",
            r.disk_bytes >> 20,
            r.changed,
            r.blocks,
            100.0 * r.sent_ratio(),
            r.compare_ms,
            r.sync_ms
        );
    })
    .map_err(|e| error_chain(&e))?;
    let table = disksync::markdown(&rows);
    print!("{table}");
    let _ = std::fs::remove_file(a.out.join("primary.img"));
    for i in 0..rows.len() {
        let _ = std::fs::remove_file(a.out.join(format!("run{i}/replica.img")));
    }
    let f = a.out.join("disksync.md");
    std::fs::write(&f, &table).map_err(|e| format!("{}: {e}", f.display()))?;
    println!("wrote {}", f.display());
    Ok(true)
}

fn run_chaos(a: ChaosCli) -> Result<bool, String> {
    use ha_bench::chaos::{self, Scenario, Verdict};
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let args = chaos::ChaosArgs {
        runs: a.runs,
        seed,
        scenarios: if a.scenarios.is_empty() {
            Scenario::ALL.to_vec()
        } else {
            a.scenarios
        },
        guest: a.guest,
        memory: a.memory,
        keep: a.keep,
    };
    if !a.json {
        println!(
            "fault campaign: {} runs from seed {seed}, {} guest\n\n{}",
            args.runs,
            args.guest,
            chaos::TABLE_HEAD
        );
    }
    let results = chaos::run(&args, |r| {
        if a.json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            println!("{}", chaos::table_row(r));
        }
        let _ = std::io::Write::flush(&mut std::io::stdout());
    })
    .map_err(|e| error_chain(&e))?;
    if !a.json {
        println!("\n{}", chaos::tally(&results));
    }
    if let Some(p) = &a.out {
        std::fs::write(p, chaos::table(&results)).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let defects = results
        .iter()
        .filter(|r| matches!(r.verdict(), Verdict::Defect(_)))
        .count();
    if defects > 0 {
        return Err(format!(
            "{defects} of {} runs broke an invariant",
            results.len()
        ));
    }
    Ok(true)
}

fn run_compare(a: CompareCli) -> Result<bool, String> {
    if let Some(path) = &a.replot {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let results = compare::read_csv(&text).map_err(|e| e.to_string())?;
        return write_outputs(&results, &a.out, a.no_plots).map(|()| true);
    }
    let args = CompareArgs {
        guest: a.guest,
        workloads: a.workloads,
        modes: a.modes,
        intervals: a.intervals,
        links: a.link,
        block_sizes: a.block_sizes,
        seconds: a.seconds,
        warmup: a.warmup,
        memory: a.memory,
        rate: a.rate,
        seed: a.seed,
        live: !a.json,
        keep: a.keep,
        repeat: a.repeat,
        paired: a.paired,
        copy: None,
        disk_size: a.disk_size,
        disk_dir: a.disk_dir,
    };
    let json = a.json;
    // Every single run goes to runs.csv as it ends (a pass's figures, before the medians),
    // so an interrupted comparison keeps what it measured.
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let runs_path = a.out.join("runs.csv");
    std::fs::write(&runs_path, compare::CSV_HEADER)
        .map_err(|e| format!("{}: {e}", runs_path.display()))?;
    let results = compare::run(&args, |r| {
        use std::io::Write;
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(&runs_path)
            .and_then(|mut f| f.write_all(compare::csv_row(r).as_bytes()));
        if let Err(e) = appended {
            eprintln!("ha-bench: {}: {e}", runs_path.display());
        }
        if !json {
            eprintln!(
                "{:<8} {:<6} {:>5.0} ms {:<9} block {:>4}: {:>10.0} units/s  overhead {:>6}  pause p50 {:>6.2} ms  {:>9.1} KB/epoch  {:>5.1} epochs/s",
                r.workload,
                r.mode,
                r.interval_ms,
                r.link,
                r.block_size,
                r.progress_per_s,
                r.overhead_pct.map_or("-".into(), |o| format!("{o:.1}%")),
                r.pause_ms_p50,
                r.wire_bytes_per_epoch / 1e3,
                r.epochs_per_s,
            );
        }
    })
    .map_err(|e| error_chain(&e))?;
    if json {
        for r in &results {
            match serde_json::to_string(r) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("ha-bench: cannot serialize a run: {e}"),
            }
        }
    } else {
        println!("{}", compare::markdown(&results));
    }
    write_outputs(&results, &a.out, a.no_plots)?;
    Ok(true)
}

/// compare.md, compare.csv and the plots of `results` into `out`.
fn write_outputs(
    results: &[compare::RunResult],
    out: &std::path::Path,
    no_plots: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for (name, text) in [
        ("compare.md", compare::markdown(results)),
        ("compare.csv", compare::csv(results)),
    ] {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if !no_plots {
        let files = plot::all(results, out).map_err(|e| e.to_string())?;
        for f in files {
            eprintln!("wrote {}", f.display());
        }
    }
    eprintln!("wrote {}/compare.md and compare.csv", out.display());
    Ok(())
}

fn default_pairs_dir() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/pagepairs"
        )),
        PathBuf::from("../shared/data/pagepairs"),
    ];
    candidates.into_iter().find(|p| p.is_dir())
}

fn run_codec(a: CodecArgs) -> Result<bool, String> {
    let block_size = BlockSize::new(a.block_size).map_err(|e| e.to_string())?;
    let general: GeneralCodec = a
        .codec
        .parse()
        .map_err(|e: ha_codec::codec::ConfigError| e.to_string())?;
    let subjects = a
        .modes
        .iter()
        .map(|m| Subject::parse(m))
        .collect::<Result<Vec<_>, _>>()?;
    let letters: Vec<char> = if a.cases.is_empty() {
        cases::CASES.iter().map(|c| c.0).collect()
    } else {
        a.cases.clone()
    };
    let mut pair_files = a.pairs.clone();
    if pair_files.is_empty()
        && !a.no_pairs
        && let Some(dir) = default_pairs_dir()
    {
        {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().contains(".pgpairs"))
                .collect();
            v.sort();
            pair_files = v;
        }
    }

    let settings = Settings {
        knowledge: a.cache,
        block_size,
        general,
        reps: a.reps,
    };
    let mut all_ok = true;
    if !a.json {
        println!(
            "{:<16} {:<14} {:<6} {:>6} {:>9} {:>9} {:>8} {:>8} {:>6} {:>9}  kinds",
            "case",
            "mode",
            "cache",
            "pages",
            "enc GB/s",
            "dec GB/s",
            "cpy GB/s",
            "enc/cpy",
            "ok",
            "B/page"
        );
    }
    let mut inputs: Vec<Box<dyn FnOnce() -> Result<Input, String>>> = Vec::new();
    for c in letters {
        let pages = a.pages;
        inputs.push(Box::new(move || {
            let pairs =
                cases::generate(c, pages).ok_or_else(|| format!("unknown case {c:?} (a..h)"))?;
            let index = (0..pairs.len() as u64).collect();
            Ok(Input { pairs, index })
        }));
    }
    for f in pair_files {
        inputs.push(Box::new(move || {
            let file = pgpairs::read_pgpairs(&f).map_err(|e| e.to_string())?;
            Ok(Input {
                pairs: file.pairs,
                index: file.page_index,
            })
        }));
    }
    for make in inputs {
        let input = make()?;
        let memcpy = codec::memcpy_gbps(&input, a.reps.max(3));
        for &s in &subjects {
            let row = codec::run(&input, s, &settings, memcpy);
            all_ok &= row.roundtrip_ok;
            print_row(&row, a.json);
        }
    }
    Ok(all_ok)
}

fn print_row(r: &Row, json: bool) {
    if json {
        match serde_json::to_string(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("ha-bench: cannot serialize a row: {e}"),
        }
        return;
    }
    let mut kinds: Vec<_> = r.kinds.iter().collect();
    kinds.sort();
    let kinds: Vec<String> = kinds.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "{:<16} {:<14} {:<6} {:>6} {:>9.2} {:>9.2} {:>8.2} {:>8.2} {:>6} {:>9.1}  {}",
        r.case,
        r.mode,
        format!("{:?}", r.cache).to_lowercase(),
        r.pages,
        r.encode_gbps,
        r.decode_gbps,
        r.memcpy_gbps,
        r.encode_ratio,
        r.roundtrip_ok,
        r.wire_bytes as f64 / r.pages.max(1) as f64,
        kinds.join(" ")
    );
}
