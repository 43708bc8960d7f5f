//! The primary's options: the command line ([`Cli`]), the `--config` TOML file
//! ([`FileConfig`]) and how they merge. A flag given on the command line beats the file; the
//! file beats the built-in defaults.

use crate::cow::CopyPolicy;
use clap::Parser;
use ha_backend::BackendKind;
use ha_codec::block::BlockSize;
use ha_codec::codec::{GeneralCodec, Mode};
use ha_daemon::config::{
    LoadError, Options, Overlay, Size, duration, parsed, rate, rule as bounded, same, size, some,
};
use ha_daemon::limits::{
    LimitError, check_block_size, check_cache_size, check_disk_size, check_heartbeat,
    check_interval, check_memory, check_net_buffer_limit, check_pipeline, check_precopy_rounds,
    check_timeout,
};
use ha_daemon::overlay;
use ha_daemon::units::{parse_duration, parse_rate, parse_size};
use ha_workloads::guest_abi::Workload;
use serde::Deserialize;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Errors reading the options.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line does not parse (this includes `--help` and `--version`), or the
    /// config file cannot be read or has a refused value.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A value out of its option's bounds (see [`ha_daemon::limits`]).
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// Run a built-in guest and checkpoint it to a Castor backup every epoch.
///
/// The primary connects to the backup, synchronizes the guest's memory while it runs
/// (pre-copy), then every interval pauses the guest, takes the pages it dirtied, and sends
/// them (encoded by the chosen mode) while the next epoch runs. Output the guest produces
/// is held until the backup acknowledges the checkpoint that produced it.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ha-primary",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A maintenance command instead of running a guest.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Read options from this TOML file (keys: option names with underscores); flags on the
    /// command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The backup's address (host:port).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub backup: SocketAddr,
    /// Guest backend: kvm (a real VM on /dev/kvm), sim (simulated, in this process) or xen
    /// (protect the existing Xen domain named by --xen-domain; needs a build with the `xen`
    /// feature, run in dom0).
    #[arg(long, default_value = "kvm", value_parser = ha_backend::value_parser())]
    pub guest: BackendKind,
    /// With --guest xen: the running domain to protect, by name or domain id (the
    /// built-in workload options do not apply to it).
    #[arg(long, value_name = "NAME_OR_DOMID")]
    pub xen_domain: Option<String>,
    /// With --guest xen: how each checkpoint holds the domain still. suspend: the guest's
    /// kernel suspends itself at Castor's request (xenstore control/shutdown, as `xl save`
    /// does) and goes on with the suspend cancelled; only such checkpoints can be restored
    /// on the backup. pause: xc_domain_pause, unseen by the guest; cheaper, but a domain
    /// restored from it cannot run, so the backup refuses to fail over.
    #[arg(long, default_value = "suspend", value_parser = XEN_HOLDS)]
    pub xen_hold: String,
    /// With --xen-hold suspend: how long a checkpoint waits for the guest to suspend (at
    /// least 1ms).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub xen_suspend_timeout: Duration,
    /// With --guest xen: how long to wait for --xen-domain to start (0s: it must run
    /// already). With --nbd-device the domain can only start once the device is attached:
    /// start ha-primary, then `xl create` the domU.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub xen_wait: Duration,
    /// With --guest xen and --disk: serve the --disk image over NBD to this kernel device
    /// (/dev/nbdN, attached with nbd-client), which the domU's xl config names as its disk
    /// (`phy:/dev/nbdN`); its writes travel with each checkpoint.
    #[arg(long, value_name = "DEVICE", requires = "disk")]
    pub nbd_device: Option<PathBuf>,
    /// With --guest xen: protect the domain even though disks of it are not served by
    /// Castor (--nbd-device): their writes are NOT replicated, and a failover loses or
    /// tears them. Logged as an error at start.
    #[arg(long)]
    pub xen_unreplicated_disks: bool,
    /// Built-in workload the guest runs: idle, memwrite, web, kv, npb.
    #[arg(long, default_value = "web")]
    pub workload: Workload,
    /// Guest memory size (a positive multiple of 2M).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// The guest's disk: a raw image file (its size is the disk's, a multiple of 4K).
    /// Before protection the backup's replica (its --disk) is brought level with it (only
    /// the blocks that differ cross); then its writes travel with each checkpoint. Needed
    /// by the db and files workloads.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// Create the --disk image at this size (empty and sparse; the files workload's
    /// document tree written into it) when the file does not exist yet. An existing image
    /// must be this size. A positive multiple of 4K, at most 16G.
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<u64>,
    /// Working set of the workload (default: all memory above 1 MiB, less 1 MiB).
    #[arg(long, value_parser = parse_size)]
    pub heap: Option<u64>,
    /// Workload units per second (0: as fast as it can). Default: the workload's own
    /// (web 2500, calibrated to a real web server; the others 20000).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Workload PRNG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The guest emits an output record every this many units.
    #[arg(long, default_value_t = 64)]
    pub output_every: u64,
    /// Epoch interval: how long the guest runs between checkpoints (the checkpoint period is
    /// this plus the pause), e.g. 25ms; from 1ms to 60s.
    #[arg(long, default_value = "25ms", value_parser = parse_duration)]
    pub interval: Duration,
    /// Encoding: remus (whole pages), xbzrle (page deltas), fgbi (blocks, sharing, hybrid).
    #[arg(long, default_value = "fgbi")]
    pub mode: Mode,
    /// Block size for fgbi, a power of two from 32 to 1024.
    #[arg(long, default_value = "64", value_parser = parse_block_size)]
    pub block_size: BlockSize,
    /// Page cache (last-sent content) for xbzrle and fgbi; at least one page (4k) in those
    /// modes. Its memory is taken when the session starts (at most the guest's size).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub cache_size: u64,
    /// General compressor for pages with no usable delta: zlib, lz4, none.
    #[arg(long, default_value = "zlib")]
    pub codec: GeneralCodec,
    /// Checkpoints in flight (taken, not yet acknowledged) before the epoch stretches (at
    /// least 1; default 2, and 1 with --guest xen: a Xen guest's hold is its own suspend,
    /// which an encoder still busy with the last checkpoint slows down).
    #[arg(long)]
    pub pipeline: Option<usize>,
    /// Heartbeat interval when nothing else is sent (default: the epoch interval); at least
    /// 1ms and shorter than --ack-timeout.
    #[arg(long, value_parser = parse_duration)]
    pub heartbeat: Option<Duration>,
    /// The backup is lost when a checkpoint waits this long for its ack (at least 1ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// When the backup is lost, pause the guest instead of continuing unprotected.
    #[arg(long)]
    pub fence: bool,
    /// When the backup is lost and the guest goes on unprotected, keep trying to reach
    /// the backup's address (every 200 ms, in the background) and protect the guest
    /// again once a backup there welcomes it: a fresh pre-copy, then checkpoints.
    #[arg(long, conflicts_with = "fence")]
    pub reprotect: bool,
    /// Hold the guest's packets on this host interface (a Xen guest's vif in dom0, e.g.
    /// vif5.0) until their checkpoint is acknowledged: an IFB device with a plug qdisc,
    /// set up before protection starts, one mark per checkpoint, released at its ack
    /// (docs/XEN.md). Repeat for a guest with several vifs; `auto`: the Xen guest's own
    /// vifs, as xenstore lists them. Works with any --guest: the hold is on the host
    /// interface. A Xen guest with a vif needs this or --no-net-buffer.
    #[arg(long, value_name = "IFACE")]
    pub net_buffer: Vec<String>,
    /// Protect a Xen guest that has a vif without holding its network output: clients may
    /// see replies a failover loses (as xl remus -n). Said loudly at start.
    #[arg(long, conflicts_with = "net_buffer")]
    pub no_net_buffer: bool,
    /// Bytes each --net-buffer holds at most; packets beyond are dropped (TCP sends them
    /// again). From 64K to 1G.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub net_buffer_limit: u64,
    /// How each checkpoint copies its dirty pages: pause (while the guest is paused), cow
    /// (write-protect them in the pause and copy them behind the running guest; needs a
    /// guest with copy-on-write memory: KVM with userfaultfd write-protection), or auto
    /// (per checkpoint, from the copy, arming and write-fault costs measured in this run).
    #[arg(long, default_value = "auto")]
    pub copy: CopyPolicy,
    /// Send a digest of the whole memory (and disk) every N checkpoints; the backup checks
    /// it (0: off).
    #[arg(long, default_value_t = 0)]
    pub verify_every: u64,
    /// Turn page-cache teleportation off (fgbi, a guest with a disk): send pages equal to a
    /// block of the backup's disk replica by content, not as disk references.
    #[arg(long)]
    pub no_teleport: bool,
    /// Pre-copy rounds at most before the first checkpoint (at least 1: the first round
    /// sends every page).
    #[arg(long, default_value_t = 5)]
    pub precopy_rounds: usize,
    /// Pre-copy stops once a round finds at most this many dirty pages.
    #[arg(long, default_value_t = 1024)]
    pub precopy_threshold: usize,
    /// Stop after this long (default: run until SIGTERM or SIGINT).
    #[arg(long, value_parser = parse_duration)]
    pub run_for: Option<Duration>,
    /// Run a new guest unprotected this long before connecting to the backup (benchmarks:
    /// a guest whose page cache is warm when the pre-copy starts).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warm_up: Duration,
    /// Send released guest output to this address (host:port).
    #[arg(long)]
    pub output: Option<SocketAddr>,
    /// Write per-epoch statistics as CSV to this file.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Write state changes as JSON lines to this file.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100; port 0 picks
    /// a free port). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Write the metrics server's bound address (ip:port) to this file once it listens.
    #[arg(long, value_name = "FILE")]
    pub metrics_port_file: Option<PathBuf>,
    /// The pair key file (64 hex digits, mode 0600) shared with the backup: the link is
    /// encrypted and both sides prove they hold it. Create one with `ha-primary keygen`.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Replicate over plain TCP, neither encrypted nor authenticated (tests, trusted
    /// links only).
    #[arg(long)]
    pub insecure: bool,
    /// Shape the replication stream to this link rate, e.g. 100mbit or 1gbit (a token
    /// bucket at the sender, for comparing with slower links). Default: unlimited.
    #[arg(long, value_parser = parse_rate)]
    pub link_rate: Option<u64>,
    /// etcd client URLs, comma-separated (http://host:2379; https with --etcd-ca,
    /// --etcd-cert, --etcd-key). This primary runs the guest only while it holds the
    /// guest's key (--lease-key) under a lease there: it claims the key before the guest
    /// starts, and pauses the guest and holds its output when it cannot keep the lease
    /// alive. Without --etcd a cut link can run the guest on both hosts (see
    /// OPERATIONS.md, Leases).
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    /// The guest's key in etcd, the same on both daemons (e.g. /castor/guests/web1).
    #[arg(long, value_name = "KEY")]
    pub lease_key: Option<String>,
    /// The lease's time to live (whole seconds, at least 2s): a dead holder's key passes
    /// on after this long; a holder stops its guest a fifth of it (at least 1s) earlier.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// etcd's CA certificate (PEM), for https endpoints.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// This daemon's client certificate for etcd (PEM).
    #[arg(long, value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// This daemon's client key for etcd (PEM).
    #[arg(long, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// After a planned switchover (SIGUSR1), become the new primary's backup: exec the
    /// ha-backup beside this program with this config file, starting from the guest's
    /// memory at the handover (the new primary, given --reprotect-to this host, sends only
    /// what changed since).
    #[arg(long, value_name = "FILE")]
    pub become_backup: Option<PathBuf>,
}

impl Cli {
    /// The lease options as given (see [`ha_lease::LeaseOptions`]).
    pub fn lease_options(&self) -> ha_lease::LeaseOptions<'_> {
        ha_lease::LeaseOptions {
            etcd: self.etcd.as_deref(),
            key: self.lease_key.as_deref(),
            ttl: self.lease_ttl,
            ca: self.etcd_ca.as_deref(),
            cert: self.etcd_cert.as_deref(),
            tls_key: self.etcd_key.as_deref(),
        }
    }
}

/// `ha-primary` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Write a new random pair key to FILE (mode 0600; an existing file is not
    /// overwritten), then copy it to the backup host over a trusted channel.
    Keygen {
        /// The key file to create.
        file: PathBuf,
    },
    /// List every protected guest recorded in etcd: which host runs it, its backup, state,
    /// last committed checkpoint, lag and bytes/s (as the runner last published them, once
    /// a second), as a table or JSON.
    Cluster {
        /// etcd client URLs, comma-separated.
        #[arg(long, value_name = "URLS")]
        etcd: String,
        /// Where the guests' keys are (the common prefix of their --lease-key).
        #[arg(long, default_value = "/castor/")]
        prefix: String,
        /// One JSON object per guest, one per line, instead of the table.
        #[arg(long)]
        json: bool,
        /// etcd's CA certificate (PEM), for https endpoints.
        #[arg(long, value_name = "FILE")]
        etcd_ca: Option<PathBuf>,
        /// This client's certificate for etcd (PEM).
        #[arg(long, value_name = "FILE")]
        etcd_cert: Option<PathBuf>,
        /// This client's key for etcd (PEM).
        #[arg(long, value_name = "FILE")]
        etcd_key: Option<PathBuf>,
    },
}

/// The values of `--xen-hold`.
const XEN_HOLDS: [&str; 2] = ["suspend", "pause"];

fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    check_block_size(n).map_err(|e| e.to_string())
}

/// The `--config` file: every option of [`Cli`] (but `config`), all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--backup`.
    pub backup: Option<SocketAddr>,
    /// `--guest`.
    pub guest: Option<String>,
    /// `--xen-domain`.
    pub xen_domain: Option<String>,
    /// `--xen-hold`.
    pub xen_hold: Option<String>,
    /// `--xen-suspend-timeout`.
    pub xen_suspend_timeout: Option<String>,
    /// `--xen-wait`.
    pub xen_wait: Option<String>,
    /// `--nbd-device`.
    pub nbd_device: Option<PathBuf>,
    /// `--xen-unreplicated-disks`.
    pub xen_unreplicated_disks: Option<bool>,
    /// `--workload`.
    pub workload: Option<String>,
    /// `--memory`.
    pub memory: Option<Size>,
    /// `--disk`.
    pub disk: Option<PathBuf>,
    /// `--disk-size`.
    pub disk_size: Option<Size>,
    /// `--heap`.
    pub heap: Option<Size>,
    /// `--rate`.
    pub rate: Option<u64>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--output-every`.
    pub output_every: Option<u64>,
    /// `--interval`.
    pub interval: Option<String>,
    /// `--mode`.
    pub mode: Option<String>,
    /// `--block-size`.
    pub block_size: Option<u32>,
    /// `--cache-size`.
    pub cache_size: Option<Size>,
    /// `--codec`.
    pub codec: Option<String>,
    /// `--pipeline`.
    pub pipeline: Option<usize>,
    /// `--heartbeat`.
    pub heartbeat: Option<String>,
    /// `--ack-timeout`.
    pub ack_timeout: Option<String>,
    /// `--fence`.
    pub fence: Option<bool>,
    /// `--reprotect`.
    pub reprotect: Option<bool>,
    /// `--net-buffer` (a list).
    pub net_buffer: Option<Vec<String>>,
    /// `--no-net-buffer`.
    pub no_net_buffer: Option<bool>,
    /// `--net-buffer-limit`.
    pub net_buffer_limit: Option<Size>,
    /// `--copy`.
    pub copy: Option<String>,
    /// `--verify-every`.
    pub verify_every: Option<u64>,
    /// `--no-teleport`.
    pub no_teleport: Option<bool>,
    /// `--precopy-rounds`.
    pub precopy_rounds: Option<usize>,
    /// `--precopy-threshold`.
    pub precopy_threshold: Option<usize>,
    /// `--run-for`.
    pub run_for: Option<String>,
    /// `--warm-up`.
    pub warm_up: Option<String>,
    /// `--output`.
    pub output: Option<SocketAddr>,
    /// `--stats`.
    pub stats: Option<PathBuf>,
    /// `--events`.
    pub events: Option<PathBuf>,
    /// `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// `--metrics-port-file`.
    pub metrics_port_file: Option<PathBuf>,
    /// `--key`.
    pub key: Option<PathBuf>,
    /// `--insecure`.
    pub insecure: Option<bool>,
    /// `--link-rate`.
    pub link_rate: Option<String>,
    /// `--etcd`.
    pub etcd: Option<String>,
    /// `--lease-key`.
    pub lease_key: Option<String>,
    /// `--lease-ttl`.
    pub lease_ttl: Option<String>,
    /// `--etcd-ca`.
    pub etcd_ca: Option<PathBuf>,
    /// `--etcd-cert`.
    pub etcd_cert: Option<PathBuf>,
    /// `--etcd-key`.
    pub etcd_key: Option<PathBuf>,
    /// `--become-backup`.
    pub become_backup: Option<PathBuf>,
}

fn xen_hold(v: String) -> Result<String, String> {
    if XEN_HOLDS.contains(&v.as_str()) {
        Ok(v)
    } else {
        Err(format!(
            "{v:?} is not a way to hold a Xen guest (suspend, pause)"
        ))
    }
}

impl Cli {
    /// Parse the command line, then merge the `--config` file under it, and check.
    pub fn load<I, T>(args: I) -> Result<Self, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli: Self = ha_daemon::config::load(args)?;
        cli.check()?;
        Ok(cli)
    }

    /// Checkpoints in flight: `--pipeline`, or its default for the guest's backend.
    pub fn pipeline(&self) -> usize {
        self.pipeline
            .unwrap_or_else(|| crate::engine::default_pipeline(self.guest))
    }

    /// Check every value against its bounds ([`ha_daemon::limits`], the rules the backup
    /// applies too) and the options against each other: an interval from 1 ms to 60 s,
    /// guest memory a positive multiple of 2 MiB, a page cache of at least one page in the
    /// modes that keep one, at least one checkpoint in flight and one pre-copy round,
    /// timeouts of at least 1 ms, and a heartbeat shorter than the ack timeout.
    pub fn check(&self) -> Result<(), LimitError> {
        check_interval(self.interval)?;
        check_memory(self.memory)?;
        if let Some(d) = self.disk_size {
            check_disk_size(d)?;
        }
        check_cache_size(self.cache_size, self.mode)?;
        if let Some(n) = self.pipeline {
            check_pipeline(n)?;
        }
        check_timeout("ack-timeout", self.ack_timeout)?;
        if let Some(h) = self.heartbeat {
            check_heartbeat(h, "ack-timeout", self.ack_timeout)?;
        }
        check_precopy_rounds(self.precopy_rounds)?;
        check_timeout("xen-suspend-timeout", self.xen_suspend_timeout)?;
        check_net_buffer_limit(self.net_buffer_limit)?;
        Ok(())
    }
}

impl Options for Cli {
    type File = FileConfig;

    /// Take every value of `file` whose option the command line did not give.
    fn merge(&mut self, file: FileConfig, o: &Overlay<'_>) -> Result<(), LoadError> {
        overlay!(o, self, file;
            backup: same,
            guest: parsed::<BackendKind>,
            xen_domain: some,
            xen_hold: xen_hold,
            xen_suspend_timeout: |v| bounded(check_timeout("xen-suspend-timeout", duration(v)?)),
            xen_wait: duration,
            nbd_device: some,
            xen_unreplicated_disks: same,
            workload: parsed::<Workload>,
            memory: |v| bounded(check_memory(size(v)?)),
            disk: some,
            disk_size: |v| bounded(check_disk_size(size(v)?)).map(Some),
            heap: |v| size(v).map(Some),
            rate: some,
            seed: same,
            output_every: same,
            interval: |v| bounded(check_interval(duration(v)?)),
            mode: parsed::<Mode>,
            block_size: |n: u32| bounded(check_block_size(n)),
            cache_size: size,
            codec: parsed::<GeneralCodec>,
            pipeline: |n| bounded(check_pipeline(n)).map(Some),
            heartbeat: |v| bounded(check_timeout("heartbeat", duration(v)?)).map(Some),
            ack_timeout: |v| bounded(check_timeout("ack-timeout", duration(v)?)),
            fence: same,
            reprotect: same,
            net_buffer: same,
            no_net_buffer: same,
            net_buffer_limit: |v| bounded(check_net_buffer_limit(size(v)?)),
            copy: parsed::<CopyPolicy>,
            verify_every: same,
            no_teleport: same,
            precopy_rounds: |n| bounded(check_precopy_rounds(n)),
            precopy_threshold: same,
            run_for: |v| duration(v).map(Some),
            warm_up: duration,
            output: some,
            stats: some,
            events: some,
            metrics: some,
            metrics_port_file: some,
            key: some,
            insecure: same,
            link_rate: |v| rate(v).map(Some),
            etcd: some,
            lease_key: some,
            lease_ttl: duration,
            etcd_ca: some,
            etcd_cert: some,
            etcd_key: some,
            become_backup: some,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn with_file(name: &str, text: &str, args: &[&str]) -> Result<Cli, CliError> {
        let dir = std::env::temp_dir().join(format!("castor-primary-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write the config file");
        let p = path.to_string_lossy().to_string();
        let mut argv = vec!["ha-primary", "--config", &p];
        argv.extend_from_slice(args);
        Cli::load(argv)
    }

    fn chain(e: &CliError) -> String {
        ha_daemon::error_chain(e)
    }

    #[test]
    fn the_file_sets_values() {
        let c = with_file(
            "sets.toml",
            "interval = \"10ms\"\nblock_size = 128\nfence = true\nmemory = \"64M\"\n\
             mode = \"xbzrle\"\nguest = \"sim\"\nrun_for = \"3s\"\ncache_size = 1048576\n\
             metrics = \"127.0.0.1:9100\"\n",
            &[],
        )
        .expect("valid file");
        assert_eq!(c.interval, Duration::from_millis(10));
        assert_eq!(c.block_size.bytes(), 128);
        assert!(c.fence);
        assert_eq!(c.memory, 64 << 20);
        assert_eq!(c.mode, Mode::Xbzrle);
        assert_eq!(c.guest, BackendKind::Sim);
        assert_eq!(c.run_for, Some(Duration::from_secs(3)));
        assert_eq!(c.cache_size, 1 << 20);
        assert_eq!(c.metrics.map(|a| a.port()), Some(9100));
        // Untouched options keep their defaults.
        assert_eq!(c.pipeline(), 2);
    }

    #[test]
    fn a_xen_guest_keeps_one_checkpoint_in_flight_unless_told() {
        let xen = |extra: &[&str]| {
            let mut args = vec!["ha-primary", "--guest", "xen", "--xen-domain", "d"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).unwrap()
        };
        assert_eq!(xen(&[]).pipeline(), 1);
        assert_eq!(xen(&["--pipeline", "3"]).pipeline(), 3);
        let kvm = Cli::try_parse_from(["ha-primary", "--guest", "kvm"]).unwrap();
        assert_eq!(kvm.pipeline(), 2);
    }

    #[test]
    fn the_command_line_beats_the_file() {
        let c = with_file(
            "override.toml",
            "interval = \"10ms\"\nblock_size = 128\nrate = 5\n",
            &["--interval", "40ms", "--block-size", "64"],
        )
        .expect("valid");
        assert_eq!(c.interval, Duration::from_millis(40));
        assert_eq!(c.block_size.bytes(), 64);
        assert_eq!(c.rate, Some(5));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = with_file("unknown.toml", "interval = \"10ms\"\nintervall = 3\n", &[])
            .expect_err("unknown key");
        let msg = chain(&e);
        assert!(msg.contains("intervall"), "{msg}");
        assert!(msg.contains("unknown.toml"), "{msg}");
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let e = with_file("bad.toml", "interval = \"soon\"\n", &[]).expect_err("bad value");
        let msg = chain(&e);
        assert!(msg.contains("interval") && msg.contains("soon"), "{msg}");
        assert!(msg.contains("bad.toml"), "{msg}");
        let e = with_file("bad2.toml", "block_size = 48\n", &[]).expect_err("bad block");
        assert!(chain(&e).contains("block_size"), "{}", chain(&e));
        let e = with_file("bad3.toml", "guest = \"hyperv\"\n", &[]).expect_err("bad guest");
        assert!(chain(&e).contains("guest: \"hyperv\""), "{}", chain(&e));
        let e = with_file("bad4.toml", "rate = \"fast\"\n", &[]).expect_err("bad type");
        let msg = chain(&e);
        assert!(msg.contains("rate"), "{msg}");
    }

    /// The whole message of the error `ha-primary ARGS` stops with.
    fn refused(args: &[&str]) -> String {
        let argv = std::iter::once("ha-primary").chain(args.iter().copied());
        chain(&Cli::load(argv).expect_err("refused"))
    }

    #[test]
    fn nonsense_values_are_refused_naming_the_option() {
        let cases: [(&[&str], &str); 14] = [
            (
                &["--interval", "0"],
                "--interval 0ns is below the minimum of 1ms",
            ),
            (
                &["--interval", "500us"],
                "--interval 500µs is below the minimum of 1ms",
            ),
            (
                &["--interval", "61s"],
                "--interval 61s is above the maximum of 60s",
            ),
            (
                &["--heartbeat", "0s"],
                "--heartbeat 0ns is below the minimum of 1ms",
            ),
            (
                &["--heartbeat", "2s"],
                "--heartbeat 2s must be shorter than --ack-timeout 2s",
            ),
            (
                &["--heartbeat", "300ms", "--ack-timeout", "200ms"],
                "--heartbeat 300ms must be shorter than --ack-timeout 200ms",
            ),
            (
                &["--ack-timeout", "0s"],
                "--ack-timeout 0ns is below the minimum of 1ms",
            ),
            (
                &["--memory", "3M"],
                "--memory 3M is not a positive multiple of 2M",
            ),
            (
                &["--memory", "0"],
                "--memory 0 is not a positive multiple of 2M",
            ),
            (
                &["--cache-size", "0"],
                "--cache-size 0 cannot hold one 4096-byte page (mode fgbi keeps a page cache)",
            ),
            (
                &["--mode", "xbzrle", "--cache-size", "4000"],
                "--cache-size 4000 cannot hold one 4096-byte page (mode xbzrle keeps a page \
                 cache)",
            ),
            (
                &["--pipeline", "0"],
                "--pipeline 0 is below the minimum of 1",
            ),
            (
                &["--precopy-rounds", "0"],
                "--precopy-rounds 0 is below the minimum of 1",
            ),
            (
                &["--xen-suspend-timeout", "0s"],
                "--xen-suspend-timeout 0ns is below the minimum of 1ms",
            ),
        ];
        for (args, says) in cases {
            assert_eq!(refused(args), says, "{args:?}");
        }
        // The block size goes through clap's value parser, with the backup's words.
        let msg = refused(&["--block-size", "48"]);
        assert!(
            msg.contains("--block-size 48 is not supported (a power of two from 32 to 1024)"),
            "{msg}"
        );
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        let c = Cli::load([
            "ha-primary",
            "--interval",
            "1ms",
            "--heartbeat",
            "1ms",
            "--ack-timeout",
            "2ms",
            "--memory",
            "2M",
            "--cache-size",
            "4k",
            "--pipeline",
            "1",
            "--precopy-rounds",
            "1",
            "--xen-suspend-timeout",
            "1ms",
        ])
        .expect("the least values are valid");
        assert_eq!(c.interval, Duration::from_millis(1));
        assert_eq!(c.heartbeat, Some(Duration::from_millis(1)));
        assert_eq!(c.memory, 2 << 20);
        assert_eq!(c.cache_size, 4096);
        let c = Cli::load(["ha-primary", "--interval", "60s", "--ack-timeout", "1s"])
            .expect("the longest interval is valid, and the default heartbeat is not checked");
        assert_eq!(c.interval, Duration::from_secs(60));
        // remus keeps no page cache: its size does not matter.
        let c = Cli::load(["ha-primary", "--mode", "remus", "--cache-size", "0"]).expect("remus");
        assert_eq!(c.cache_size, 0);
    }

    #[test]
    fn nonsense_in_the_file_is_refused_naming_file_and_key() {
        for (name, text, says) in [
            (
                "i0.toml",
                "interval = \"0\"\n",
                "interval: 0ns is below the minimum of 1ms",
            ),
            (
                "m3.toml",
                "memory = \"3M\"\n",
                "memory: 3M is not a positive multiple of 2M",
            ),
            (
                "m3b.toml",
                "memory = 3145728\n",
                "memory: 3M is not a positive multiple of 2M",
            ),
            (
                "p0.toml",
                "pipeline = 0\n",
                "pipeline: 0 is below the minimum of 1",
            ),
            (
                "r0.toml",
                "precopy_rounds = 0\n",
                "precopy_rounds: 0 is below the minimum of 1",
            ),
            (
                "h0.toml",
                "heartbeat = \"0s\"\n",
                "heartbeat: 0ns is below the minimum of 1ms",
            ),
            (
                "a0.toml",
                "ack_timeout = \"0\"\n",
                "ack_timeout: 0ns is below the minimum of 1ms",
            ),
            (
                "x0.toml",
                "xen_suspend_timeout = \"0s\"\n",
                "xen_suspend_timeout: 0ns is below the minimum of 1ms",
            ),
        ] {
            let e = with_file(name, text, &[]).expect_err(text);
            let msg = chain(&e);
            assert!(msg.starts_with("config file "), "{msg}");
            assert!(msg.ends_with(&format!("{name}: {says}")), "{msg}");
        }
        // Checks across options see the file's values too.
        let e = with_file("c0.toml", "cache_size = 0\n", &[]).expect_err("no cache");
        assert!(
            chain(&e).starts_with("--cache-size 0 cannot hold"),
            "{}",
            chain(&e)
        );
        let e = with_file("hb.toml", "heartbeat = \"3s\"\n", &[]).expect_err("heartbeat");
        assert_eq!(
            chain(&e),
            "--heartbeat 3s must be shorter than --ack-timeout 2s"
        );
        // A command-line value replaces the file's unchecked.
        let c = with_file("i0-cli.toml", "interval = \"0\"\n", &["--interval", "5ms"])
            .expect("the command line wins");
        assert_eq!(c.interval, Duration::from_millis(5));
    }

    #[test]
    fn every_option_has_a_file_key() {
        // `config` is the only flag the file cannot set.
        let file_keys = [
            "backup",
            "guest",
            "xen_domain",
            "xen_hold",
            "xen_suspend_timeout",
            "xen_wait",
            "nbd_device",
            "xen_unreplicated_disks",
            "workload",
            "memory",
            "disk",
            "disk_size",
            "heap",
            "rate",
            "seed",
            "output_every",
            "interval",
            "mode",
            "block_size",
            "cache_size",
            "codec",
            "pipeline",
            "heartbeat",
            "ack_timeout",
            "fence",
            "reprotect",
            "net_buffer",
            "no_net_buffer",
            "net_buffer_limit",
            "copy",
            "verify_every",
            "no_teleport",
            "precopy_rounds",
            "precopy_threshold",
            "run_for",
            "warm_up",
            "output",
            "stats",
            "events",
            "metrics",
            "metrics_port_file",
            "key",
            "insecure",
            "link_rate",
            "etcd",
            "lease_key",
            "lease_ttl",
            "etcd_ca",
            "etcd_cert",
            "etcd_key",
            "become_backup",
        ];
        let mut keys = file_keys.to_vec();
        keys.sort_unstable();
        assert_eq!(ha_daemon::config::file_keys(&Cli::command()), keys);
    }
}
