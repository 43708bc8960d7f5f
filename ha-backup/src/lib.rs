//! `ha-backup`: the backup side of Castor — receive, stage, commit, detect, activate.
//!
//! The backup's states, one module each, in the order a session goes through them:
//!
//! | module | state |
//! |---|---|
//! | [`accept`] | listening: one primary at a time, handshakes, refusals |
//! | [`receive`] | receiving: stage → commit → ack log → ack, until the primary is lost |
//! | [`failover`] | activating → active: resume the last checkpoint and run the guest |
//!
//! and the stages of the data path they use:
//!
//! | module | stage |
//! |---|---|
//! | [`link`] | socket → frames (heartbeats dropped), the Hello/Welcome/Refuse opening |
//! | [`stage`] | epoch frames → a verified [`ha_wire::stream::StagedEpoch`] |
//! | [`commit`] | the committed image, the latest checkpoint's state, the epoch numbers |
//! | [`replica`] | the disk replica and its journal: checkpoints' disk writes, crash-safe |
//! | [`detect`] | deciding the primary is lost, and how long that took |
//! | [`activate`] | restore, re-release the ring, resume, drain and release output |
//! | [`stats`] | per-epoch CSV |
//! | [`config`] | the options: command line and `--config` file |
//! | [`metrics`] | the backup's Prometheus metrics and states, and the re-protecting primary's |
//!
//! [`run`] strings them together following `docs/PROTOCOL.md`.

#![warn(missing_docs)]

pub mod accept;
pub mod activate;
pub mod commit;
pub mod config;
pub mod detect;
pub mod failover;
pub mod link;
pub mod metrics;
pub mod receive;
pub mod replica;
pub mod stage;
pub mod stats;

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use ha_guest::domain::DomainFactory;
use ha_wire::secure::PairKey;
use serde_json::json;
use tracing::{error, info, warn};

use crate::accept::{Listening, Refuser, accept_primary, listen};
use crate::activate::ActivateError;
use crate::commit::Committed;
use crate::config::Config;
use crate::failover::fail_over;
use crate::metrics::Metrics;
use crate::receive::{Received, receive};
use crate::stage::Stager;
use crate::stats::{StatsError, StatsLog};
use ha_daemon::events::{EventError, EventLog};

/// Errors that stop the backup (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The options do not say how to secure the link, or the key file is refused.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Cannot listen.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Accepting a connection failed.
    #[error("accepting a connection failed")]
    Accept(#[source] std::io::Error),
    /// The port file cannot be written.
    #[error(transparent)]
    PortFile(#[from] ha_daemon::port_file::PortFileError),
    /// The ack log cannot be opened or written (no ack is sent without it).
    #[error("ack log {path}")]
    AckLog {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The ack log cannot be opened (or another running process holds it).
    #[error("ack log")]
    AckLogOpen(#[source] ha_daemon::logfile::LogFileError),
    /// The event log failed.
    #[error(transparent)]
    Events(#[from] EventError),
    /// The stats file failed.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// Taking the guest over failed.
    #[error("failover failed")]
    Activate(#[from] ActivateError),
    /// The committed image cannot be held.
    #[error("no memory for the committed image")]
    Image(#[from] ha_guest::image::ImageError),
    /// The disk replica or its journal cannot be written (a full disk, an I/O error): no
    /// further epoch is taken; the committed state is kept (see [`replica`]).
    #[error("disk replica")]
    Replica(#[from] replica::ReplicaError),
    /// The replica file cannot be created, or is not of `--disk-size`.
    #[error("disk replica")]
    DiskFile(#[from] ha_daemon::diskfile::DiskFileError),
    /// Re-protection failed: the guest cannot be protected (or run) as a primary.
    #[error("re-protection")]
    Reprotect(#[source] ha_primary::engine::EngineError),
    /// The `--base-image` cannot be loaded.
    #[error("--base-image {path}")]
    BaseImage {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: commit::BaseImageError,
    },
    /// The replica cannot be read for the initial disk sync.
    #[error("initial disk sync")]
    DiskSync(#[source] ha_wire::disksync::DiskSyncError),
}

/// How the backup ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by a signal or `--exit-after` (code 0).
    Stopped,
    /// The primary was lost before the first checkpoint (code 2).
    NoCheckpoint,
    /// The committed image did not match the primary's Verify digest (code 3).
    VerifyFailed,
    /// The primary was lost, but the guest's key in etcd could not be claimed: the primary
    /// (or another host) still holds it, so the guest runs there (code 4).
    NotTakingOver,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Stopped => 0,
            Exit::NoCheckpoint => 2,
            Exit::VerifyFailed => 3,
            Exit::NotTakingOver => 4,
        }
    }
}

/// An error and its sources, joined with ": ".
pub use ha_daemon::error_chain as chain;

/// The files the receive loop writes besides the socket, and the operator's switchover
/// signal (used once this host protects the guest again as its primary).
#[derive(Debug)]
struct Sinks<'a> {
    events: &'a mut EventLog,
    metrics: &'a Metrics,
    stats: StatsLog,
    ack_log: Option<(PathBuf, File)>,
    replica: Option<replica::Replica>,
    switchover: Option<&'a AtomicBool>,
}

/// Run the backup to the end: listen, receive, and on the primary's loss fail over with
/// `factory`. `stop` ends it (exit 0) at any stage.
pub fn run(
    cfg: &Config,
    factory: &dyn DomainFactory,
    stop: &AtomicBool,
) -> Result<Exit, BackupError> {
    run_with_metrics(cfg, factory, stop, &Metrics::new())
}

/// [`run`], updating `metrics` as it goes.
pub fn run_with_metrics(
    cfg: &Config,
    factory: &dyn DomainFactory,
    stop: &AtomicBool,
    metrics: &Metrics,
) -> Result<Exit, BackupError> {
    run_with_switchover(cfg, factory, stop, metrics, None)
}

/// [`run_with_metrics`]; `switchover` raised (SIGUSR1) while this host protects a guest
/// it took over (`--reprotect-to`) hands the guest over to its backup (planned
/// switchover), as ha-primary does.
pub fn run_with_switchover(
    cfg: &Config,
    factory: &dyn DomainFactory,
    stop: &AtomicBool,
    metrics: &Metrics,
    switchover: Option<&AtomicBool>,
) -> Result<Exit, BackupError> {
    // Whatever can refuse this instance comes before its files are opened, so a refused
    // second instance (port in use, no key) touches nothing of a running one's.
    let key = cfg.pair_key()?;
    cfg.net.check_host()?;
    let listener = listen(cfg)?;
    let mut events = EventLog::open(cfg.events.as_deref())?;
    let res = run_with(
        cfg,
        factory,
        stop,
        (&mut events, metrics, switchover),
        (listener, key),
    );
    let code = match &res {
        Ok(x) => x.code(),
        Err(_) => 1,
    };
    events.note("exit", json!({ "code": code }));
    res
}

fn run_with(
    cfg: &Config,
    factory: &dyn DomainFactory,
    stop: &AtomicBool,
    (events, metrics, switchover): (&mut EventLog, &Metrics, Option<&AtomicBool>),
    listening: (Listening, Option<PairKey>),
) -> Result<Exit, BackupError> {
    let stats = StatsLog::open(cfg.stats.as_deref())?;
    let ack_log = match &cfg.ack_log {
        None => None,
        Some(p) => {
            let f = ha_daemon::logfile::append_locked(p).map_err(BackupError::AckLogOpen)?;
            Some((p.clone(), f))
        }
    };
    let replica = match &cfg.disk {
        None => None,
        Some(p) => Some(open_replica(p, cfg.create_disk, events)?),
    };
    let mut sinks = Sinks {
        events,
        metrics,
        stats,
        ack_log,
        replica,
        switchover,
    };
    serve(cfg, factory, stop, &mut sinks, listening)
}

/// Open the disk replica, replaying or discarding the journal a killed backup left.
fn open_replica(
    path: &std::path::Path,
    create: Option<u64>,
    events: &mut EventLog,
) -> Result<replica::Replica, BackupError> {
    if ha_daemon::diskfile::prepare(path, create)? == ha_daemon::diskfile::Prepared::Created {
        info!(
            replica = %path.display(),
            bytes = create.unwrap_or(0),
            "created an empty disk replica; the initial sync fills it"
        );
        events.note("disk_created", json!({ "bytes": create.unwrap_or(0) }));
    }
    let (r, recovery) = replica::Replica::open(path)?;
    match recovery {
        replica::Recovery::Clean => {}
        replica::Recovery::Replayed { epoch, writes } => {
            warn!(
                epoch,
                writes,
                replica = %path.display(),
                "replayed the disk journal of checkpoint {epoch} (its apply was cut): the \
                 replica is at checkpoint {epoch}"
            );
            events.note(
                "disk_journal",
                json!({ "action": "replayed", "epoch": epoch, "writes": writes }),
            );
        }
        replica::Recovery::Discarded { epoch, why } => {
            warn!(
                epoch,
                why,
                replica = %path.display(),
                "discarded the disk journal: the replica stays at the checkpoint before it"
            );
            events.note(
                "disk_journal",
                json!({ "action": "discarded", "epoch": epoch, "why": why }),
            );
        }
    }
    info!(replica = %path.display(), bytes = r.size(), "disk replica ready");
    Ok(r)
}

fn serve(
    cfg: &Config,
    factory: &dyn DomainFactory,
    stop: &AtomicBool,
    sinks: &mut Sinks<'_>,
    (Listening { listener, addr }, key): (Listening, Option<PairKey>),
) -> Result<Exit, BackupError> {
    if let Some(p) = &cfg.port_file {
        ha_daemon::port_file::write(p, addr)?;
    }
    info!(
        %addr,
        link = if key.is_some() { "noise (pair key)" } else { "INSECURE (plain TCP)" },
        "listening for the primary"
    );
    sinks.metrics.set_state("listening");
    sinks
        .events
        .note("listening", json!({ "addr": addr.to_string() }));

    let Some(mut rx) = accept_primary(&listener, cfg, key.as_ref(), stop, sinks.events)? else {
        return Ok(Exit::Stopped);
    };
    info!(peer = %rx.peer(), "receiving epochs");
    sinks.metrics.set_state("receiving");
    // One session at a time: later connections get a clear refusal, not a hang.
    let refuser = Refuser::start(listener, key, rx.peer());

    let memory = usize::try_from(cfg.memory_size).unwrap_or(usize::MAX);
    let builtin = cfg.guest.runs_builtin_guests();
    let mut committed = match &cfg.base_image {
        None => Committed::new(memory, builtin)?,
        Some(p) => {
            let c = Committed::from_base(memory, builtin, p).map_err(|source| {
                BackupError::BaseImage {
                    path: p.clone(),
                    source,
                }
            })?;
            info!(base = %p.display(), "starting from the base image: the primary sends only the pages that differ");
            c
        }
    };
    let mut stager = Stager::new(cfg, 1);
    let received = receive(&mut rx, &mut stager, &mut committed, sinks, stop);
    refuser.stop();
    if let Err(e) = &received {
        // The backup cannot go on (its ack log or stats cannot be written): say so to the
        // primary, so it does not take this for a network fault.
        let why = format!("the backup cannot go on: {}", chain(e));
        error!(reason = %why, "ending the session");
        let mut out = Vec::new();
        ha_wire::session::put_abort(&mut out, &why);
        let _ = rx.send(&out);
        rx.close();
    }
    let loss = match received? {
        Received::Lost(loss) => loss,
        Received::Stopped => {
            info!("stop requested while receiving");
            return Ok(Exit::Stopped);
        }
        Received::VerifyFailed => return Ok(Exit::VerifyFailed),
        Received::StoodDown(reason) => {
            warn!(
                reason = %reason,
                last_epoch = committed.epoch(),
                "the primary stood down: its guest goes on without protection there; not \
                 taking over"
            );
            sinks.events.note(
                "primary_stood_down",
                json!({ "reason": reason, "last_epoch": committed.epoch() }),
            );
            return Ok(Exit::Stopped);
        }
    };
    rx.close();
    if stager.discard() {
        info!(
            epoch = stager.next_epoch(),
            "discarded the partly received epoch"
        );
    }
    let detect_ms = loss.detection().as_millis() as u64;
    sinks
        .metrics
        .detection_seconds
        .set(loss.detection().as_secs_f64());
    let last_epoch = committed.epoch();
    warn!(
        reason = %loss.reason,
        last_epoch,
        detect_ms,
        "primary lost"
    );
    sinks.events.note(
        "primary_lost",
        json!({
            "reason": loss.reason.to_string(),
            "last_epoch": last_epoch,
            "detect_ms": detect_ms,
            "declared_ms": loss.declared_unix_ms(),
        }),
    );

    fail_over(cfg, factory, stop, sinks, committed, &loss)
}
