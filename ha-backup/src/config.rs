//! The backup's options: the command line ([`Cli`]), the `--config` TOML file
//! ([`FileConfig`]) merged under it, and the checked configuration ([`Config`]) the rest of
//! the crate reads. A flag on the command line beats the file; the file beats the defaults.
//!
//! Each value is parsed once: the command line's sizes, durations and mode stay text in
//! [`Cli`] until [`Config::from_cli`] parses and checks them (so a refusal names the
//! option), the file's are parsed and checked as the file is merged (so a refusal names the
//! file and the key) and kept parsed ([`Given`]).

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use ha_backend::BackendKind;
use ha_codec::PAGE_SIZE;
use ha_codec::block::BlockSize;
use ha_codec::codec::Mode;
use ha_daemon::config::{
    Given, LoadError, Options, Overlay, Size, duration, parsed, rate, rule, same, size, some,
};
use ha_daemon::keys::{self, KeyError};
use ha_daemon::limits::{
    LimitError, check_block_size, check_disk_size, check_interval, check_max_memory, check_memory,
    check_timeout,
};
use ha_daemon::overlay;
use ha_daemon::units::{UnitError, parse_duration, parse_rate, parse_size};
use ha_wire::secure::PairKey;
use ha_wire::session::{Hello, SESSION_VERSION};

/// Smallest detection timeout the backup uses by default.
pub const MIN_DETECT: Duration = Duration::from_millis(50);

/// Errors in the options.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size or duration that does not parse.
    #[error("--{option}")]
    Unit {
        /// The option.
        option: &'static str,
        /// Why.
        #[source]
        source: UnitError,
    },
    /// A value out of its option's bounds (the primary's rules, [`ha_daemon::limits`]).
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// A mode name that is unknown.
    #[error("--mode {0:?} is unknown (remus, xbzrle, fgbi)")]
    Mode(String),
    /// `--memory` above `--max-memory`.
    #[error("--memory {memory} is above --max-memory {max}")]
    AboveMax {
        /// `--memory` in bytes.
        memory: u64,
        /// `--max-memory` in bytes.
        max: u64,
    },
    /// Neither a key nor `--insecure`, both, or a refused key file.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The disk replica cannot be used.
    #[error("--disk")]
    Disk(#[from] crate::replica::ReplicaError),
    /// The replica file is not of `--disk-size`.
    #[error("--disk")]
    DiskFile(#[from] ha_daemon::diskfile::DiskFileError),
    /// The lease options are refused.
    #[error(transparent)]
    Lease(#[from] ha_lease::config::ConfigError),
    /// `--base-image` cannot be read or is not of `--memory` bytes.
    #[error("--base-image {path}: {why}")]
    BaseImage {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// `--disk-size` without `--disk`.
    #[error("--disk-size needs --disk (the replica to create)")]
    DiskSizeWithoutDisk,
    /// `--nbd-device` refused: missing, busy, or without a Xen guest with a disk.
    #[error("--nbd-device")]
    NbdDevice(#[source] ha_backend::xendisk::XenDiskError),
    /// Some of the announcement's options without the others.
    #[error("--announce-bridge, --announce-ip and --announce-mac go together (missing: {0})")]
    AnnouncePartial(&'static str),
    /// A MAC address that does not parse.
    #[error("--announce-mac")]
    AnnounceMac(#[source] ha_netbuf::announce::AnnounceError),
    /// The bridge to announce on is missing.
    #[error("--announce-bridge")]
    AnnounceBridge(#[source] ha_netbuf::announce::AnnounceError),
    /// This host's kernel cannot hold a guest's packets.
    #[error("--net-buffer: this host cannot buffer the restored guest's vif")]
    NetBuffer(#[source] ha_netbuf::NetbufError),
    /// The command line does not parse (this includes `--help` and `--version`), or the
    /// config file cannot be read or has a refused value.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Castor backup: receives a primary's checkpoints, commits them atomically, and takes the
/// guest over from the last committed checkpoint when the primary is lost.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "ha-backup", version, about, long_about = None)]
pub struct Cli {
    /// Read options from this TOML file (keys: option names with underscores); flags on the
    /// command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on for the primary (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Write the bound address (ip:port) to this file once listening (atomically: temp
    /// file + rename).
    #[arg(long, value_name = "FILE")]
    pub port_file: Option<PathBuf>,
    /// Guest memory size, a positive multiple of 2M; must equal the primary's (e.g. 256M,
    /// 1G).
    #[arg(long, default_value = "256M", value_parser = Given::<u64>::text)]
    pub memory: Given<u64>,
    /// Encoding mode; must equal the primary's: remus, xbzrle or fgbi.
    #[arg(long, default_value = "fgbi", value_parser = Given::<Mode>::text)]
    pub mode: Given<Mode>,
    /// Block size in bytes for fine-grained blocks; must equal the primary's.
    #[arg(long, default_value_t = 64)]
    pub block_size: u32,
    /// The primary's epoch interval (1ms to 60s); sets the default detection timeout.
    #[arg(long, default_value = "25ms", value_parser = Given::<Duration>::text)]
    pub interval: Given<Duration>,
    /// Declare the primary dead after this long without a frame (at least 1ms)
    /// [default: max(3 x --interval, 50ms)].
    #[arg(long, value_parser = Given::<Duration>::text)]
    pub detect_timeout: Option<Given<Duration>>,
    /// Hypervisor backend used to restore the guest on failover; the primary's must be the
    /// same. kvm: a VM on /dev/kvm; sim: the simulated guest, in this process; xen: a new
    /// domain built with `xl restore` (needs --xen-config and a build with the `xen`
    /// feature, run in dom0).
    #[arg(long, default_value_t = BackendKind::Kvm, value_parser = ha_backend::value_parser())]
    pub guest: BackendKind,
    /// With --guest xen: the protected domU's xl config file; the restored domain takes
    /// its name, kernel and devices from it.
    #[arg(long, value_name = "FILE")]
    pub xen_config: Option<PathBuf>,
    /// With --guest xen and --disk: at failover, serve the --disk replica over NBD to this
    /// kernel device (/dev/nbdN, attached with nbd-client) before the domain is restored;
    /// the xl config names it as the domU's disk (`phy:/dev/nbdN`). Checked at start: it
    /// must exist and be free.
    #[arg(long, value_name = "DEVICE")]
    pub nbd_device: Option<PathBuf>,
    /// Output sink (ip:port) the backup releases guest output to after failover.
    #[arg(long, value_name = "ADDR")]
    pub output: Option<SocketAddr>,
    /// Append "epoch out_head" for each committed checkpoint to this file, before its ack.
    #[arg(long, value_name = "FILE")]
    pub ack_log: Option<PathBuf>,
    /// Write JSON-lines events (listening, connected, checkpoint, primary_lost, active,
    /// progress, exit, ...) to this file.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Write a CSV row per committed epoch (sizes and stage/commit/ack timings) to this file.
    #[arg(long, value_name = "FILE")]
    pub stats: Option<PathBuf>,
    /// After failover, stop the guest and exit 0 once this long has passed (e.g. 2s);
    /// without it the backup runs until SIGTERM or SIGINT.
    #[arg(long, value_name = "DURATION", value_parser = Given::<Duration>::text)]
    pub exit_after: Option<Given<Duration>>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9101; port 0 picks
    /// a free port). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Write the metrics server's bound address (ip:port) to this file once it listens.
    #[arg(long, value_name = "FILE")]
    pub metrics_port_file: Option<PathBuf>,
    /// The pair key file (64 hex digits, mode 0600) shared with the primary: only a peer
    /// holding it is accepted, and the link is encrypted.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Accept a primary over plain TCP, neither encrypted nor authenticated (tests,
    /// trusted links only).
    #[arg(long)]
    pub insecure: bool,
    /// The disk replica: a raw image file of the primary's disk size. It need not start
    /// equal to the primary's disk: before protection the pair brings it level (only the
    /// blocks that differ cross). Checkpoints' disk writes reach it at commit, through a
    /// journal beside it (PATH.journal); the failed-over guest runs on it.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// Create the --disk replica empty (sparse, all zero) at this size when the file does
    /// not exist yet; an existing one must be this size. A positive multiple of 4K, at
    /// most 16G.
    #[arg(long, value_parser = Given::<u64>::text)]
    pub disk_size: Option<Given<u64>>,
    /// etcd client URLs, comma-separated (http://host:2379; https with --etcd-ca,
    /// --etcd-cert, --etcd-key). On losing the primary this backup activates the guest
    /// only once it holds the guest's key (--lease-key) there — after the primary's lease
    /// expired or was given up — and keeps it while the guest runs. Without --etcd a cut
    /// link can run the guest on both hosts (see OPERATIONS.md, Leases).
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,
    /// The guest's key in etcd, the same on both daemons (e.g. /castor/guests/web1).
    #[arg(long, value_name = "KEY")]
    pub lease_key: Option<String>,
    /// The lease's time to live (whole seconds, at least 2s); the same on both daemons.
    /// A failing-over backup waits up to twice this for the primary's lease to expire.
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
    /// Refuse a primary announcing more guest memory than this (also caps --memory; at
    /// least 2M).
    #[arg(long, default_value = "64G", value_parser = Given::<u64>::text)]
    pub max_memory: Given<u64>,
    /// An older image of the guest's memory (a raw file of --memory bytes: the memory of a
    /// primary that failed or switched over, a stale copy). The backup starts from it and
    /// the primary sends only the pages that differ (compared by fingerprints), not the
    /// whole memory; the first checkpoint's digest checks the result.
    #[arg(long, value_name = "FILE")]
    pub base_image: Option<PathBuf>,
    /// After a failover, protect the guest again: act as its primary towards the first of
    /// these backups (ip:port, comma-separated: a spare, the old primary's host) that
    /// accepts, retrying every 200ms until one does; the guest runs unprotected meanwhile. Mode, block
    /// size and interval stay the pair's (--mode, --block-size, --interval).
    #[arg(long, value_name = "ADDRS", value_delimiter = ',')]
    pub reprotect_to: Vec<SocketAddr>,
    /// Shape the re-protecting primary's replication stream to this link rate, as
    /// ha-primary's --link-rate (e.g. 100mbit, 1gbit). Default: unlimited.
    #[arg(long, value_name = "RATE", value_parser = Given::<u64>::text)]
    pub reprotect_link_rate: Option<Given<u64>>,
    /// On failover, hold the restored guest's packets on this host interface (its vif in
    /// this dom0: a fixed name from vifname= in the domain's config, or "auto" for the
    /// restored domain's own vifs, vifDOMID.N with its new domain id) from the restore on,
    /// then release them for good once the guest runs (the backup runs it unprotected);
    /// repeatable. The kernel's support (ifb, sch_plug) is checked at start.
    #[arg(long, value_name = "IFACE")]
    pub net_buffer: Vec<String>,
    /// On failover, before the guest runs, broadcast a gratuitous ARP for --announce-ip
    /// from --announce-mac on this bridge (the one the guest's vif is on; checked at start).
    #[arg(long, value_name = "BRIDGE")]
    pub announce_bridge: Option<String>,
    /// The guest's IPv4 address, for the gratuitous ARP.
    #[arg(long, value_name = "IP")]
    pub announce_ip: Option<Ipv4Addr>,
    /// The guest's MAC address (aa:bb:cc:dd:ee:ff, as in its vif's mac=), for the
    /// gratuitous ARP.
    #[arg(long, value_name = "MAC")]
    pub announce_mac: Option<String>,
}

/// The `--config` file: every option of [`Cli`] (but `config`), all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--port-file`.
    pub port_file: Option<PathBuf>,
    /// `--memory`.
    pub memory: Option<Size>,
    /// `--mode`.
    pub mode: Option<String>,
    /// `--block-size`.
    pub block_size: Option<u32>,
    /// `--interval`.
    pub interval: Option<String>,
    /// `--detect-timeout`.
    pub detect_timeout: Option<String>,
    /// `--guest`.
    pub guest: Option<String>,
    /// `--xen-config`.
    pub xen_config: Option<PathBuf>,
    /// `--nbd-device`.
    pub nbd_device: Option<PathBuf>,
    /// `--output`.
    pub output: Option<SocketAddr>,
    /// `--ack-log`.
    pub ack_log: Option<PathBuf>,
    /// `--events`.
    pub events: Option<PathBuf>,
    /// `--stats`.
    pub stats: Option<PathBuf>,
    /// `--exit-after`.
    pub exit_after: Option<String>,
    /// `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// `--metrics-port-file`.
    pub metrics_port_file: Option<PathBuf>,
    /// `--key`.
    pub key: Option<PathBuf>,
    /// `--insecure`.
    pub insecure: Option<bool>,
    /// `--disk`.
    pub disk: Option<PathBuf>,
    /// `--disk-size`.
    pub disk_size: Option<Size>,
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
    /// `--max-memory`.
    pub max_memory: Option<Size>,
    /// `--base-image`.
    pub base_image: Option<PathBuf>,
    /// `--reprotect-to`.
    pub reprotect_to: Option<Vec<SocketAddr>>,
    /// `--reprotect-link-rate`.
    pub reprotect_link_rate: Option<String>,
    /// `--net-buffer` (a list).
    pub net_buffer: Option<Vec<String>>,
    /// `--announce-bridge`.
    pub announce_bridge: Option<String>,
    /// `--announce-ip`.
    pub announce_ip: Option<Ipv4Addr>,
    /// `--announce-mac`.
    pub announce_mac: Option<String>,
}

fn mode(v: String) -> Result<Given<Mode>, String> {
    v.parse()
        .map(Given::Parsed)
        .map_err(|_| format!("{v:?} is unknown (remus, xbzrle, fgbi)"))
}

impl Cli {
    /// Parse the command line, then merge the `--config` file under it.
    pub fn load<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Ok(ha_daemon::config::load(args)?)
    }
}

impl Options for Cli {
    type File = FileConfig;

    /// Take every value of `file` whose option the command line did not give.
    fn merge(&mut self, file: FileConfig, o: &Overlay<'_>) -> Result<(), LoadError> {
        overlay!(o, self, file;
            listen: same,
            port_file: some,
            memory: |v| rule(check_memory(size(v)?)).map(Given::Parsed),
            mode: mode,
            block_size: |n| rule(check_block_size(n)).map(|_| n),
            interval: |v| rule(check_interval(duration(v)?)).map(Given::Parsed),
            detect_timeout: |v| {
                rule(check_timeout("detect-timeout", duration(v)?)).map(|d| Some(Given::Parsed(d)))
            },
            guest: parsed::<BackendKind>,
            xen_config: some,
            nbd_device: some,
            output: some,
            ack_log: some,
            events: some,
            stats: some,
            exit_after: |v| duration(v).map(|d| Some(Given::Parsed(d))),
            metrics: some,
            metrics_port_file: some,
            key: some,
            insecure: same,
            disk: some,
            disk_size: |v| rule(check_disk_size(size(v)?)).map(|d| Some(Given::Parsed(d))),
            etcd: some,
            lease_key: some,
            lease_ttl: duration,
            etcd_ca: some,
            etcd_cert: some,
            etcd_key: some,
            max_memory: |v| rule(check_max_memory(size(v)?)).map(Given::Parsed),
            base_image: some,
            reprotect_to: same,
            reprotect_link_rate: |v| rate(v).map(|r| Some(Given::Parsed(r))),
            net_buffer: same,
            announce_bridge: some,
            announce_ip: some,
            announce_mac: some,
        );
        Ok(())
    }
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Where to write the bound address.
    pub port_file: Option<PathBuf>,
    /// Guest memory in bytes.
    pub memory_size: u64,
    /// Encoding mode.
    pub mode: Mode,
    /// Block size.
    pub block_size: BlockSize,
    /// Failure detection timeout.
    pub detect_timeout: Duration,
    /// Backend for the restore.
    pub guest: BackendKind,
    /// The domU's xl config (Xen).
    pub xen_config: Option<PathBuf>,
    /// The device the replica is served to at failover (Xen).
    pub nbd_device: Option<PathBuf>,
    /// Output sink after failover.
    pub output: Option<SocketAddr>,
    /// Ack log path.
    pub ack_log: Option<PathBuf>,
    /// Event log path.
    pub events: Option<PathBuf>,
    /// Stats CSV path.
    pub stats: Option<PathBuf>,
    /// Run this long after activation, then exit 0.
    pub exit_after: Option<Duration>,
    /// Where to serve metrics.
    pub metrics: Option<SocketAddr>,
    /// Where to write the metrics server's bound address.
    pub metrics_port_file: Option<PathBuf>,
    /// The config file the options came from, if any.
    pub config: Option<PathBuf>,
    /// The pair key file (read by [`Config::pair_key`]).
    pub key: Option<PathBuf>,
    /// Plain TCP was asked for.
    pub insecure: bool,
    /// The largest guest memory a primary may announce.
    pub max_memory: u64,
    /// The disk replica.
    pub disk: Option<PathBuf>,
    /// Its size in bytes when the options were checked (0: no disk).
    pub disk_size: u64,
    /// `--disk-size`: create a missing replica empty at this size.
    pub create_disk: Option<u64>,
    /// The guest's lease in etcd (`--etcd`): claimed before activating.
    pub lease: Option<ha_lease::LeaseConfig>,
    /// The image to start from (`--base-image`), checked to be of `memory_size` bytes.
    pub base_image: Option<PathBuf>,
    /// Backups to protect the guest with after a failover, in order of preference.
    pub reprotect_to: Vec<SocketAddr>,
    /// The re-protecting primary's link rate, bits per second (`--reprotect-link-rate`;
    /// None: unlimited).
    pub reprotect_link_rate: Option<u64>,
    /// The primary's epoch interval (for re-protection).
    pub interval: Duration,
    /// The restored guest's network on this host (`--net-buffer`, `--announce-*`).
    pub net: GuestNet,
}

/// The restored guest's network on this host: what is done to it between the restore and
/// the first instruction it runs.
#[derive(Clone, Debug, Default)]
pub struct GuestNet {
    /// Interfaces whose packets are held (`--net-buffer`).
    pub vifs: Vec<String>,
    /// The gratuitous ARP (`--announce-*`).
    pub announce: Option<Announce>,
}

/// A gratuitous ARP to send on failover.
#[derive(Clone, Debug)]
pub struct Announce {
    /// The bridge to send it on.
    pub bridge: String,
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// The guest's MAC.
    pub mac: [u8; 6],
}

impl GuestNet {
    /// From the options: the announcement's three go together.
    fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let announce = match (&cli.announce_bridge, cli.announce_ip, &cli.announce_mac) {
            (None, None, None) => None,
            (Some(bridge), Some(ip), Some(mac)) => Some(Announce {
                bridge: bridge.clone(),
                ip,
                mac: ha_netbuf::announce::parse_mac(mac).map_err(ConfigError::AnnounceMac)?,
            }),
            (b, i, _) => {
                let missing = if b.is_none() {
                    "--announce-bridge"
                } else if i.is_none() {
                    "--announce-ip"
                } else {
                    "--announce-mac"
                };
                return Err(ConfigError::AnnouncePartial(missing));
            }
        };
        Ok(Self {
            vifs: cli.net_buffer.clone(),
            announce,
        })
    }

    /// Check at start what failover will need of this host, long before it is needed:
    /// the bridge exists, and the kernel can make an IFB with a plug qdisc and redirect to
    /// it (a scratch device, removed again; the error names the missing module). The vifs
    /// themselves exist only once the guest is restored.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.announce {
            ha_netbuf::announce::check_interface(&a.bridge).map_err(ConfigError::AnnounceBridge)?;
        }
        if !self.vifs.is_empty() {
            let scratch = format!("ifbprobe{}", std::process::id() % 10_000_000);
            ha_netbuf::buffer::probe(&scratch).map_err(ConfigError::NetBuffer)?;
        }
        Ok(())
    }
}

impl Config {
    /// Check the options: each value parses and is within the bounds the primary applies
    /// too ([`ha_daemon::limits`]: memory a positive multiple of 2 MiB, an interval from
    /// 1 ms to 60 s, a detection timeout of at least 1 ms, a supported block size, a memory
    /// cap of at least 2 MiB), and `--memory` is not above `--max-memory`. A detection
    /// timeout not above the interval is allowed but warned about.
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let unit = |option| move |source| ConfigError::Unit { option, source };
        let memory_size = cli.memory.resolve(|s| {
            Ok::<_, ConfigError>(check_memory(parse_size(s).map_err(unit("memory"))?)?)
        })?;
        let mode = cli
            .mode
            .resolve(|s| s.parse().map_err(|_| ConfigError::Mode(s.to_owned())))?;
        let block_size = check_block_size(cli.block_size)?;
        let interval = cli.interval.resolve(|s| {
            Ok::<_, ConfigError>(check_interval(
                parse_duration(s).map_err(unit("interval"))?,
            )?)
        })?;
        let detect_timeout = match &cli.detect_timeout {
            Some(given) => {
                let d = given.resolve(|s| {
                    let d = parse_duration(s).map_err(unit("detect-timeout"))?;
                    Ok::<_, ConfigError>(check_timeout("detect-timeout", d)?)
                })?;
                if d <= interval {
                    tracing::warn!(
                        detect_timeout = ?d,
                        interval = ?interval,
                        "--detect-timeout is not above --interval: unless the primary's \
                         --heartbeat is shorter than the detection timeout, the primary will \
                         be declared lost between its checkpoints"
                    );
                }
                d
            }
            None => (interval * 3).max(MIN_DETECT),
        };
        let max_memory = cli.max_memory.resolve(|s| {
            Ok::<_, ConfigError>(check_max_memory(
                parse_size(s).map_err(unit("max-memory"))?,
            )?)
        })?;
        if memory_size > max_memory {
            return Err(ConfigError::AboveMax {
                memory: memory_size,
                max: max_memory,
            });
        }
        if cli.guest == BackendKind::Xen && cli.xen_config.is_none() {
            tracing::warn!("--guest xen without --xen-config: failover cannot restore the domain");
        }
        let exit_after = cli
            .exit_after
            .as_ref()
            .map(|g| g.resolve(parse_duration))
            .transpose()
            .map_err(unit("exit-after"))?;
        let lease = ha_lease::LeaseOptions {
            etcd: cli.etcd.as_deref(),
            key: cli.lease_key.as_deref(),
            ttl: cli.lease_ttl,
            ca: cli.etcd_ca.as_deref(),
            cert: cli.etcd_cert.as_deref(),
            tls_key: cli.etcd_key.as_deref(),
        }
        .config(&ha_lease::holder("ha-backup"))?;
        let create_disk = cli
            .disk_size
            .as_ref()
            .map(|g| {
                g.resolve(|s| {
                    Ok::<_, ConfigError>(check_disk_size(
                        parse_size(s).map_err(unit("disk-size"))?,
                    )?)
                })
            })
            .transpose()?;
        let disk_size = match (&cli.disk, create_disk) {
            (None, None) => 0,
            (None, Some(_)) => return Err(ConfigError::DiskSizeWithoutDisk),
            (Some(p), Some(want)) if !p.exists() => want,
            (Some(p), want) => {
                let have = crate::replica::replica_size(p)?;
                if let Some(want) = want.filter(|&w| w != have) {
                    return Err(ConfigError::DiskFile(
                        ha_daemon::diskfile::DiskFileError::Size {
                            path: p.clone(),
                            have,
                            want,
                        },
                    ));
                }
                have
            }
        };
        check_nbd_device(cli)?;
        let reprotect_link_rate = cli
            .reprotect_link_rate
            .as_ref()
            .map(|g| g.resolve(parse_rate))
            .transpose()
            .map_err(unit("reprotect-link-rate"))?;
        if reprotect_link_rate.is_some() && cli.reprotect_to.is_empty() {
            tracing::warn!("--reprotect-link-rate without --reprotect-to: it is never used");
        }
        if let Some(p) = &cli.base_image {
            let bad = |why: String| ConfigError::BaseImage {
                path: p.clone(),
                why,
            };
            let len = std::fs::metadata(p).map_err(|e| bad(e.to_string()))?.len();
            if len != memory_size {
                return Err(bad(format!(
                    "{len} bytes, but --memory is {memory_size} (an image of this guest \
                     is exactly its memory size)"
                )));
            }
        }
        Ok(Self {
            listen: cli.listen,
            port_file: cli.port_file.clone(),
            memory_size,
            mode,
            block_size,
            detect_timeout,
            guest: cli.guest,
            xen_config: cli.xen_config.clone(),
            nbd_device: cli.nbd_device.clone(),
            output: cli.output,
            ack_log: cli.ack_log.clone(),
            events: cli.events.clone(),
            stats: cli.stats.clone(),
            exit_after,
            metrics: cli.metrics,
            metrics_port_file: cli.metrics_port_file.clone(),
            config: cli.config.clone(),
            key: cli.key.clone(),
            insecure: cli.insecure,
            max_memory,
            disk: cli.disk.clone(),
            disk_size,
            create_disk,
            lease,
            base_image: cli.base_image.clone(),
            reprotect_to: cli.reprotect_to.clone(),
            reprotect_link_rate,
            interval,
            net: GuestNet::from_cli(cli)?,
        })
    }

    /// The pair key to require of the primary, or None when `--insecure` (announced with a
    /// warning). Refused: neither or both, and a key file that is not private or not a key.
    pub fn pair_key(&self) -> Result<Option<PairKey>, ConfigError> {
        Ok(keys::pair_key(
            self.key.as_deref(),
            self.insecure,
            "any host that reaches the listen address can feed this backup",
        )?)
    }

    /// The session parameters a primary must match.
    pub fn hello(&self) -> Hello {
        Hello {
            version: SESSION_VERSION,
            memory_size: self.memory_size,
            page_size: PAGE_SIZE as u32,
            block_size: self.block_size,
            mode: self.mode,
            backend: self.guest,
            layout: self.guest.guest_layout(),
            disk_size: self.disk_size,
        }
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.memory_size / PAGE_SIZE as u64
    }
}

/// A Xen guest with a disk needs the device its replica is served to at failover, and
/// the device must be there and free now; the device needs a Xen guest with a disk.
fn check_nbd_device(cli: &Cli) -> Result<(), ConfigError> {
    use ha_backend::xendisk::{XenDiskError, check_device};
    let xen = cli.guest == BackendKind::Xen;
    match (&cli.nbd_device, &cli.disk) {
        (Some(_), _) if !xen => Err(ConfigError::NbdDevice(XenDiskError::NotXen)),
        (Some(_), None) => Err(ConfigError::NbdDevice(XenDiskError::NoImage)),
        (Some(dev), Some(_)) => check_device(dev).map_err(ConfigError::NbdDevice),
        (None, Some(_)) if xen => Err(ConfigError::NbdDevice(XenDiskError::NoDevice)),
        (None, _) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ha-backup").chain(args.iter().copied()))
            .expect("test arguments parse")
    }

    #[test]
    fn defaults() {
        let c = Config::from_cli(&cli(&[])).expect("defaults are valid");
        assert_eq!(c.memory_size, 256 << 20);
        assert_eq!(c.mode, Mode::Fgbi);
        assert_eq!(c.block_size, BlockSize::DEFAULT);
        assert_eq!(c.detect_timeout, Duration::from_millis(75));
        assert_eq!(c.guest, BackendKind::Kvm);
        assert_eq!(c.listen.port(), 7700);
    }

    #[test]
    fn the_announcements_options_go_together() {
        let all = [
            "--announce-bridge",
            "xenbr0",
            "--announce-ip",
            "10.0.0.5",
            "--announce-mac",
            "00:16:3e:00:00:05",
        ];
        let c = Config::from_cli(&cli(&all)).expect("all three");
        let a = c.net.announce.expect("an announcement");
        assert_eq!((a.bridge.as_str(), a.mac[5]), ("xenbr0", 5));
        let e = Config::from_cli(&cli(&all[..4])).expect_err("no MAC");
        assert_eq!(
            e.to_string(),
            "--announce-bridge, --announce-ip and --announce-mac go together (missing: --announce-mac)"
        );
        let e = Config::from_cli(&cli(&all[2..])).expect_err("no bridge");
        assert!(e.to_string().contains("missing: --announce-bridge"), "{e}");
        let mut bad = all;
        bad[5] = "00:16:3e:00:05";
        let e = Config::from_cli(&cli(&bad)).expect_err("a short MAC");
        assert!(
            crate::chain(&e).contains("00:16:3e:00:05"),
            "{}",
            crate::chain(&e)
        );
    }

    #[test]
    fn a_xen_disk_needs_a_free_nbd_device() {
        let dir = tempfile::tempdir().expect("temp dir");
        let replica = dir.path().join("replica.img");
        std::fs::write(&replica, vec![0u8; 8192]).expect("replica");
        let r = replica.to_str().expect("utf-8 path");
        let refused = |args: &[&str]| {
            ha_daemon::error_chain(&Config::from_cli(&cli(args)).expect_err("refused"))
        };
        assert_eq!(
            refused(&["--guest", "xen", "--disk", r]),
            "--nbd-device: --disk with --guest xen needs --nbd-device (the /dev/nbdN the \
             domU's xl config names)"
        );
        assert_eq!(
            refused(&[
                "--guest",
                "xen",
                "--disk",
                r,
                "--nbd-device",
                "/nonexistent/nbd9"
            ]),
            "--nbd-device: cannot attach the disk's NBD device: /nonexistent/nbd9 is not a \
             block device: load the kernel's nbd module (modprobe nbd)"
        );
        assert!(
            refused(&["--nbd-device", "/dev/nbd0", "--disk", r]).ends_with(
                "--nbd-device is for --guest xen (a KVM guest's disk is its virtio-blk device)"
            )
        );
        assert!(
            refused(&["--guest", "xen", "--nbd-device", "/dev/nbd0"])
                .ends_with("--nbd-device needs --disk (the image to serve)")
        );
    }

    #[test]
    fn detect_timeout_has_a_floor_and_an_override() {
        let c = Config::from_cli(&cli(&["--interval", "5ms"])).expect("valid");
        assert_eq!(c.detect_timeout, MIN_DETECT);
        let c = Config::from_cli(&cli(&["--detect-timeout", "20ms"])).expect("valid");
        assert_eq!(c.detect_timeout, Duration::from_millis(20));
    }

    fn with_file(name: &str, text: &str, args: &[&str]) -> Result<Cli, ConfigError> {
        let dir = std::env::temp_dir().join(format!("castor-backup-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write the config file");
        let p = path.to_string_lossy().to_string();
        let mut argv = vec!["ha-backup", "--config", &p];
        argv.extend_from_slice(args);
        Cli::load(argv)
    }

    #[test]
    fn the_file_sets_values() {
        let c = with_file(
            "sets.toml",
            "interval = \"10ms\"\nblock_size = 128\nmemory = \"64M\"\nmode = \"xbzrle\"\n\
             guest = \"sim\"\nlisten = \"0.0.0.0:7800\"\nmetrics = \"127.0.0.1:9101\"\n",
            &[],
        )
        .expect("valid file");
        let c = Config::from_cli(&c).expect("valid config");
        assert_eq!(c.detect_timeout, Duration::from_millis(50));
        assert_eq!(c.block_size.bytes(), 128);
        assert_eq!(c.memory_size, 64 << 20);
        assert_eq!(c.mode, Mode::Xbzrle);
        assert_eq!(c.guest, BackendKind::Sim);
        assert_eq!(c.listen.port(), 7800);
        assert_eq!(c.metrics.map(|a| a.port()), Some(9101));
        assert!(c.config.is_some());
    }

    #[test]
    fn the_command_line_beats_the_file() {
        let c = with_file(
            "override.toml",
            "interval = \"10ms\"\nguest = \"sim\"\nmemory = 8388608\n",
            &["--interval", "40ms", "--guest", "kvm"],
        )
        .expect("valid");
        let c = Config::from_cli(&c).expect("valid config");
        assert_eq!(c.detect_timeout, Duration::from_millis(120));
        assert_eq!(c.guest, BackendKind::Kvm);
        assert_eq!(c.memory_size, 8 << 20);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = with_file(
            "unknown.toml",
            "listen = \"127.0.0.1:1\"\nlisten_on = 3\n",
            &[],
        )
        .expect_err("unknown key");
        let msg = crate::chain(&e);
        assert!(msg.contains("listen_on"), "{msg}");
        assert!(msg.contains("unknown.toml"), "{msg}");
    }

    #[test]
    fn bad_file_values_are_refused_with_the_key() {
        let e = with_file("bad.toml", "detect_timeout = \"soon\"\n", &[]).expect_err("bad");
        let msg = crate::chain(&e);
        assert!(
            msg.contains("detect_timeout") && msg.contains("soon"),
            "{msg}"
        );
        assert!(msg.contains("bad.toml"), "{msg}");
        let e = with_file("bad2.toml", "block_size = 48\n", &[]).expect_err("bad block");
        assert!(
            crate::chain(&e).contains("block_size: 48"),
            "{}",
            crate::chain(&e)
        );
        let e = with_file("bad3.toml", "mode = \"zip\"\n", &[]).expect_err("bad mode");
        assert!(
            crate::chain(&e).contains("mode: \"zip\""),
            "{}",
            crate::chain(&e)
        );
        let e = with_file("bad4.toml", "listen = 7700\n", &[]).expect_err("bad type");
        assert!(crate::chain(&e).contains("listen"), "{}", crate::chain(&e));
    }

    #[test]
    fn the_reprotect_link_rate_parses_as_the_primarys_link_rate() {
        let c = Config::from_cli(&cli(&["--reprotect-link-rate", "100mbit"])).expect("valid");
        assert_eq!(c.reprotect_link_rate, Some(100_000_000));
        let c = Config::from_cli(&cli(&[])).expect("defaults");
        assert_eq!(c.reprotect_link_rate, None);
        let file =
            with_file("rate.toml", "reprotect_link_rate = \"2.5gbit\"\n", &[]).expect("valid file");
        let c = Config::from_cli(&file).expect("valid config");
        assert_eq!(c.reprotect_link_rate, Some(2_500_000_000));
        let e = Config::from_cli(&cli(&["--reprotect-link-rate", "100mbps"])).expect_err("bad");
        assert_eq!(
            crate::chain(&e),
            "--reprotect-link-rate: \"100mbps\" is not a link rate (examples: 100mbit, 1gbit, \
             2.5gbit)"
        );
        let e = with_file("badrate.toml", "reprotect_link_rate = \"0mbit\"\n", &[])
            .expect_err("bad file value");
        let msg = crate::chain(&e);
        assert!(
            msg.contains("badrate.toml") && msg.contains("reprotect_link_rate"),
            "{msg}"
        );
        assert!(msg.contains("is not a link rate"), "{msg}");
    }

    #[test]
    fn every_option_has_a_file_key() {
        let file_keys = [
            "listen",
            "port_file",
            "memory",
            "mode",
            "block_size",
            "interval",
            "detect_timeout",
            "guest",
            "xen_config",
            "nbd_device",
            "output",
            "ack_log",
            "events",
            "stats",
            "exit_after",
            "metrics",
            "metrics_port_file",
            "key",
            "insecure",
            "disk",
            "disk_size",
            "etcd",
            "lease_key",
            "lease_ttl",
            "etcd_ca",
            "etcd_cert",
            "etcd_key",
            "max_memory",
            "base_image",
            "reprotect_to",
            "reprotect_link_rate",
            "net_buffer",
            "announce_bridge",
            "announce_ip",
            "announce_mac",
        ];
        let mut keys = file_keys.to_vec();
        keys.sort_unstable();
        assert_eq!(ha_daemon::config::file_keys(&Cli::command()), keys);
    }

    #[test]
    fn max_memory_and_the_key_choice_are_checked() {
        let c = Config::from_cli(&cli(&[])).expect("defaults");
        assert_eq!(c.max_memory, 64 << 30);
        let e = Config::from_cli(&cli(&["--memory", "128M", "--max-memory", "64M"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--memory 134217728 is above --max-memory 67108864"
        );
        assert_eq!(
            c.pair_key().unwrap_err().to_string(),
            "no pair key: give --key FILE (create one with `ha-primary keygen FILE`) or --insecure"
        );
        let both = Config::from_cli(&cli(&["--key", "/nonexistent", "--insecure"])).expect("ok");
        assert!(matches!(
            both.pair_key(),
            Err(ConfigError::Key(KeyError::Both))
        ));
        let missing = Config::from_cli(&cli(&["--key", "/nonexistent/pair.key"])).expect("ok");
        let e = missing.pair_key().unwrap_err();
        assert!(
            crate::chain(&e).starts_with("cannot read the pair key /nonexistent/pair.key"),
            "{}",
            crate::chain(&e)
        );
        let insecure = Config::from_cli(&cli(&["--insecure"])).expect("ok");
        assert!(matches!(insecure.pair_key(), Ok(None)));
    }

    #[test]
    fn nonsense_values_are_refused_as_the_primary_refuses_them() {
        let cases: [(&[&str], &str); 9] = [
            (
                &["--memory", "3M"],
                "--memory 3M is not a positive multiple of 2M",
            ),
            (
                &["--memory", "0"],
                "--memory 0 is not a positive multiple of 2M",
            ),
            (
                &["--memory", "4k"],
                "--memory 4k is not a positive multiple of 2M",
            ),
            (
                &["--interval", "0"],
                "--interval 0ns is below the minimum of 1ms",
            ),
            (
                &["--interval", "61s"],
                "--interval 61s is above the maximum of 60s",
            ),
            (
                &["--detect-timeout", "0s"],
                "--detect-timeout 0ns is below the minimum of 1ms",
            ),
            (
                &["--max-memory", "0"],
                "--max-memory 0 is below the smallest guest, 2M",
            ),
            (
                &["--block-size", "48"],
                "--block-size 48 is not supported (a power of two from 32 to 1024)",
            ),
            (
                &["--block-size", "0"],
                "--block-size 0 is not supported (a power of two from 32 to 1024)",
            ),
        ];
        for (args, says) in cases {
            let e = Config::from_cli(&cli(args)).expect_err("refused");
            assert_eq!(crate::chain(&e), says, "{args:?}");
        }
        // The bounds themselves are accepted.
        let c = Config::from_cli(&cli(&[
            "--memory",
            "2M",
            "--interval",
            "1ms",
            "--detect-timeout",
            "1ms",
            "--max-memory",
            "2M",
        ]))
        .expect("the least values are valid");
        assert_eq!(c.memory_size, 2 << 20);
        assert_eq!(c.detect_timeout, Duration::from_millis(1));
        let c = Config::from_cli(&cli(&["--interval", "60s"])).expect("the longest interval");
        assert_eq!(c.detect_timeout, Duration::from_secs(180));
    }

    #[test]
    fn nonsense_in_the_file_is_refused_naming_file_and_key() {
        for (name, text, says) in [
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
                "i0.toml",
                "interval = \"0\"\n",
                "interval: 0ns is below the minimum of 1ms",
            ),
            (
                "d0.toml",
                "detect_timeout = \"0ms\"\n",
                "detect_timeout: 0ns is below the minimum of 1ms",
            ),
            (
                "x0.toml",
                "max_memory = 0\n",
                "max_memory: 0 is below the smallest guest, 2M",
            ),
        ] {
            let e = with_file(name, text, &[]).expect_err(text);
            let msg = crate::chain(&e);
            assert!(msg.starts_with("config file "), "{msg}");
            assert!(msg.ends_with(&format!("{name}: {says}")), "{msg}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_cli(&cli(&["--memory", "12q"])).unwrap_err();
        assert_eq!(e.to_string(), "--memory");
        let e = Config::from_cli(&cli(&["--mode", "zip"])).unwrap_err();
        assert!(e.to_string().contains("zip"), "{e}");
        let e = Config::from_cli(&cli(&["--block-size", "48"])).unwrap_err();
        assert!(e.to_string().contains("48"), "{e}");
        let e = Config::from_cli(&cli(&["--memory", "1000"])).unwrap_err();
        assert!(e.to_string().contains("1000"), "{e}");
    }
}
