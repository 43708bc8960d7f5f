//! The backup's options: the command line ([`Cli`]) and the checked configuration
//! ([`Config`]) the rest of the crate reads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ha_common::PAGE_SIZE;
use ha_common::block::BlockSize;
use ha_common::codec::Mode;
use ha_common::session::{Hello, SESSION_VERSION};
use ha_common::units::{UnitError, parse_duration, parse_size};

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
    /// A guest memory size that is not a positive multiple of the page size.
    #[error("--memory {0} is not a positive multiple of {PAGE_SIZE} bytes")]
    Memory(u64),
    /// A block size the codec does not support.
    #[error("--block-size {0} is not supported (a power of two from 32 to 1024)")]
    BlockSize(u32),
    /// A mode name that is unknown.
    #[error("--mode {0:?} is unknown (remus, xbzrle, fgbi)")]
    Mode(String),
    /// A zero detection timeout.
    #[error("--detect-timeout must be above zero")]
    DetectTimeout,
}

/// Which hypervisor backend restores the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// KVM (/dev/kvm).
    Kvm,
    /// The simulated backend (in-process workload thread).
    Sim,
}

/// Castor backup: receives a primary's checkpoints, commits them atomically, and takes the
/// guest over from the last committed checkpoint when the primary is lost.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "ha-backup", version, about, long_about = None)]
pub struct Cli {
    /// Address to listen on for the primary (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Write the bound address (ip:port) to this file once listening (atomically: temp
    /// file + rename).
    #[arg(long, value_name = "FILE")]
    pub port_file: Option<PathBuf>,
    /// Guest memory size; must equal the primary's (e.g. 256M, 1G).
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// Encoding mode; must equal the primary's: remus, xbzrle or fgbi.
    #[arg(long, default_value = "fgbi")]
    pub mode: String,
    /// Block size in bytes for fine-grained blocks; must equal the primary's.
    #[arg(long, default_value_t = 64)]
    pub block_size: u32,
    /// The primary's epoch interval; sets the default detection timeout.
    #[arg(long, default_value = "25ms")]
    pub interval: String,
    /// Declare the primary dead after this long without a frame
    /// [default: max(3 x --interval, 50ms)].
    #[arg(long)]
    pub detect_timeout: Option<String>,
    /// Hypervisor backend used to restore the guest on failover.
    #[arg(long, value_enum, default_value_t = GuestKind::Kvm)]
    pub guest: GuestKind,
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
    #[arg(long, value_name = "DURATION")]
    pub exit_after: Option<String>,
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
    pub guest: GuestKind,
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
}

impl Config {
    /// Check the command line.
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let unit = |option| move |source| ConfigError::Unit { option, source };
        let memory_size = parse_size(&cli.memory).map_err(unit("memory"))?;
        if memory_size == 0 || !memory_size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(ConfigError::Memory(memory_size));
        }
        let mode: Mode = cli
            .mode
            .parse()
            .map_err(|_| ConfigError::Mode(cli.mode.clone()))?;
        let block_size =
            BlockSize::new(cli.block_size).map_err(|_| ConfigError::BlockSize(cli.block_size))?;
        let interval = parse_duration(&cli.interval).map_err(unit("interval"))?;
        let detect_timeout = match &cli.detect_timeout {
            Some(s) => parse_duration(s).map_err(unit("detect-timeout"))?,
            None => (interval * 3).max(MIN_DETECT),
        };
        if detect_timeout.is_zero() {
            return Err(ConfigError::DetectTimeout);
        }
        let exit_after = cli
            .exit_after
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(unit("exit-after"))?;
        Ok(Self {
            listen: cli.listen,
            port_file: cli.port_file.clone(),
            memory_size,
            mode,
            block_size,
            detect_timeout,
            guest: cli.guest,
            output: cli.output,
            ack_log: cli.ack_log.clone(),
            events: cli.events.clone(),
            stats: cli.stats.clone(),
            exit_after,
        })
    }

    /// The session parameters a primary must match.
    pub fn hello(&self) -> Hello {
        Hello {
            version: SESSION_VERSION,
            memory_size: self.memory_size,
            page_size: PAGE_SIZE as u32,
            block_size: self.block_size,
            mode: self.mode,
        }
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.memory_size / PAGE_SIZE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
        assert_eq!(c.guest, GuestKind::Kvm);
        assert_eq!(c.listen.port(), 7700);
    }

    #[test]
    fn detect_timeout_has_a_floor_and_an_override() {
        let c = Config::from_cli(&cli(&["--interval", "5ms"])).expect("valid");
        assert_eq!(c.detect_timeout, MIN_DETECT);
        let c = Config::from_cli(&cli(&["--detect-timeout", "20ms"])).expect("valid");
        assert_eq!(c.detect_timeout, Duration::from_millis(20));
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
