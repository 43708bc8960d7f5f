//! `ha-backup`: the backup side of Castor — receive, stage, commit, detect, activate.
//!
//! The data path, one module per stage:
//!
//! | module | stage |
//! |---|---|
//! | [`receive`] | socket → frames (heartbeats dropped), the Hello/Welcome/Refuse opening |
//! | [`stage`] | epoch frames → a verified [`ha_wire::stream::StagedEpoch`] |
//! | [`commit`] | the committed image, the latest checkpoint's state, the epoch numbers |
//! | [`detect`] | deciding the primary is lost, and how long that took |
//! | [`activate`] | restore, re-release the ring, resume, drain and release output |
//! | [`stats`] | per-epoch CSV |
//! | [`config`] | the options: command line and `--config` file |
//! | [`metrics`] | Prometheus metrics and the `GET /metrics` server |
//!
//! [`run`] strings them together: listen → receiving (stage → commit → ack log → ack) →
//! primary lost → activating → active, following `docs/PROTOCOL.md`.

#![warn(missing_docs)]

pub mod activate;
pub mod commit;
pub mod config;
pub mod detect;
pub mod metrics;
pub mod receive;
pub mod stage;
pub mod stats;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ha_guest::domain::DomainFactory;
use ha_wire::output::append_ack_log;
use ha_wire::secure::PairKey;
use serde_json::json;
use tracing::{debug, error, info, warn};

use crate::activate::ActivateError;
use crate::commit::{CommitError, Committed};
use crate::config::Config;
use crate::detect::{Loss, LossReason, classify};
use crate::metrics::Metrics;
use crate::receive::{HandshakeError, Receiver, handshake};
use crate::stage::{Stager, micros};
use crate::stats::{EpochStats, StatsError, StatsLog};
use ha_daemon::events::{EventError, EventLog};
use ha_wire::session::Hello;
use ha_workloads::guest_abi::GuestStatus;

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
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Stopped => 0,
            Exit::NoCheckpoint => 2,
            Exit::VerifyFailed => 3,
        }
    }
}

/// An error and its sources, joined with ": ".
pub use ha_daemon::error_chain as chain;

/// The files the receive loop writes besides the socket.
#[derive(Debug)]
struct Sinks<'a> {
    events: &'a mut EventLog,
    metrics: &'a Metrics,
    stats: StatsLog,
    ack_log: Option<(PathBuf, File)>,
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
    // Whatever can refuse this instance comes before its files are opened, so a refused
    // second instance (port in use, no key) touches nothing of a running one's.
    let key = cfg.pair_key()?;
    let listener = listen(cfg)?;
    let mut events = EventLog::open(cfg.events.as_deref())?;
    let res = run_with(cfg, factory, stop, &mut events, metrics, (listener, key));
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
    events: &mut EventLog,
    metrics: &Metrics,
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
    let mut sinks = Sinks {
        events,
        metrics,
        stats,
        ack_log,
    };
    serve(cfg, factory, stop, &mut sinks, listening)
}

/// The bound listening socket and its address.
#[derive(Debug)]
struct Listening {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Bind `--listen`.
fn listen(cfg: &Config) -> Result<Listening, BackupError> {
    let listener = TcpListener::bind(cfg.listen).map_err(|source| BackupError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let addr = listener
        .local_addr()
        .map_err(|source| BackupError::Listen {
            addr: cfg.listen,
            source,
        })?;
    Ok(Listening { listener, addr })
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

    let mut committed = Committed::new(
        usize::try_from(cfg.memory_size).unwrap_or(usize::MAX),
        cfg.guest.runs_builtin_guests(),
    )?;
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
        json!({"reason": loss.reason.to_string(), "last_epoch": last_epoch, "detect_ms": detect_ms}),
    );

    fail_over(cfg, factory, stop, sinks, committed, &loss)
}

/// Activating → active: resume the guest from the last checkpoint and run it.
fn fail_over(
    cfg: &Config,
    factory: &dyn DomainFactory,
    stop: &AtomicBool,
    sinks: &mut Sinks<'_>,
    committed: Committed,
    loss: &Loss,
) -> Result<Exit, BackupError> {
    let Some(cp) = committed.into_checkpoint() else {
        error!("primary lost before the first checkpoint: nothing to resume");
        return Ok(Exit::NoCheckpoint);
    };
    info!(
        checkpoint = cp.epoch,
        backend = factory.name(),
        "failing over: activating the guest from the last checkpoint"
    );
    let mut active = activate::activate(factory, cp, cfg.output, loss.declared)?;
    let activation_ms = active.activation.as_millis() as u64;
    sinks
        .metrics
        .activation_seconds
        .set(active.activation.as_secs_f64());
    sinks.metrics.set_state("active");
    let detect_ms = loss.detection().as_millis() as u64;
    let st = active.resumed_from;
    info!(
        checkpoint = active.epoch,
        progress = st.map(|s| s.progress),
        out_head = st.map(|s| s.out_head),
        rereleased = active.rereleased,
        detect_ms,
        activation_ms,
        "active: the guest runs on the backup"
    );
    let mut ev = json!({
        "epoch": active.epoch,
        "activation_ms": activation_ms,
        "rereleased": active.rereleased,
    });
    status_fields(&mut ev, st);
    sinks.events.note("active", ev);
    active.run(sinks.events, stop, cfg.exit_after)?;
    info!(released = active.released, "stopping the guest and exiting");
    Ok(Exit::Stopped)
}

/// Add a guest's status to an event: `progress`, `checksum`, `out_head`; or `status: "not
/// reported"` for a guest without a status page (nothing is invented).
fn status_fields(ev: &mut serde_json::Value, st: Option<GuestStatus>) {
    let Some(obj) = ev.as_object_mut() else {
        return;
    };
    match st {
        Some(s) => {
            obj.insert("progress".into(), s.progress.into());
            obj.insert("checksum".into(), s.checksum.into());
            obj.insert("out_head".into(), s.out_head.into());
        }
        None => {
            obj.insert("status".into(), "not reported".into());
        }
    }
}

/// Handshakes in progress at most; a connection beyond them is closed at once.
pub const MAX_HANDSHAKES: usize = 32;

/// What a handshake thread reports: the peer, and its receiver or why it was refused.
type Handshaken = (SocketAddr, Result<(Receiver, Hello), HandshakeError>);

/// Accept connections until one primary passes the handshake (`None`: stop requested).
///
/// Each connection's handshake runs on its own thread, at most [`MAX_HANDSHAKES`] at a
/// time, so idle or slow connections cannot hold a legitimate primary back: each costs a
/// thread for at most the handshake deadline, and the first Hello that passes takes the
/// session. Misconfigured peers are refused and the backup keeps listening.
fn accept_primary(
    listener: &TcpListener,
    cfg: &Config,
    key: Option<&PairKey>,
    stop: &AtomicBool,
    events: &mut EventLog,
) -> Result<Option<Receiver>, BackupError> {
    listener
        .set_nonblocking(true)
        .map_err(BackupError::Accept)?;
    let ours = cfg.hello();
    // Raised when this function returns: the handshakes still in progress give up.
    let quit = AtomicBool::new(false);
    let slot = AtomicBool::new(false);
    let (done_tx, done) = std::sync::mpsc::channel::<Handshaken>();
    std::thread::scope(|scope| {
        let mut pending = 0usize;
        let res = loop {
            if stop.load(Ordering::Relaxed) {
                info!("stop requested while listening");
                break Ok(None);
            }
            while let Ok((peer, res)) = done.try_recv() {
                pending -= 1;
                match res {
                    Ok((rx, h)) => {
                        info!(%peer, mode = %h.mode, memory = h.memory_size, block_size = %h.block_size, secure = rx.is_secure(), "primary welcomed");
                        quit.store(true, Ordering::Relaxed);
                        return Ok(Some(rx));
                    }
                    Err(HandshakeError::Receive(receive::ReceiveError::Stopped)) => {}
                    Err(e) => note_refusal(peer, &e, events),
                }
            }
            let (stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "accept failed; still listening");
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            if pending >= MAX_HANDSHAKES {
                warn!(%peer, pending, "too many handshakes in progress; closed the connection at once");
                events.note(
                    "refused",
                    json!({ "peer": peer.to_string(), "stage": "accept", "reason": "too many handshakes in progress" }),
                );
                let _ = stream.shutdown(std::net::Shutdown::Both);
                continue;
            }
            info!(%peer, "connection");
            events.note("connected", json!({ "peer": peer.to_string() }));
            let mut rx = match Receiver::new(stream, cfg.detect_timeout) {
                Ok(rx) => rx,
                Err(e) => {
                    warn!(%peer, error = %e, "cannot set up the connection; still listening");
                    continue;
                }
            };
            pending += 1;
            let (tx, ours, slot, quit) = (done_tx.clone(), &ours, &slot, &quit);
            scope.spawn(move || {
                let res =
                    handshake(&mut rx, key, ours, cfg.max_memory, 1, slot, quit).map(|h| (rx, h));
                let _ = tx.send((peer, res));
            });
        };
        quit.store(true, Ordering::Relaxed);
        res
    })
}
/// Log and record a peer whose handshake failed (it was closed or sent a Refuse).
fn note_refusal(peer: SocketAddr, e: &HandshakeError, events: &mut EventLog) {
    let (reason, stage) = match e {
        HandshakeError::Refused(s) => (s.to_string(), "session"),
        HandshakeError::TooLarge { .. } | HandshakeError::Taken => (e.to_string(), "session"),
        other @ HandshakeError::Secure(_) => (chain(other), "noise"),
        other => (chain(other), "session"),
    };
    if stage == "noise" {
        warn!(%peer, %reason, "refused the peer: it failed the secure handshake (no pair key or another one); nothing it sent was read; still listening");
    } else {
        warn!(%peer, %reason, "refused the peer; still listening");
    }
    events.note(
        "refused",
        json!({ "peer": peer.to_string(), "stage": stage, "reason": reason }),
    );
}

/// Refuses every connection that arrives while a session runs: the peer is answered (over
/// the Noise channel when it holds the key) with a Refuse naming the session in progress.
#[derive(Debug)]
struct Refuser {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Refuser {
    fn start(listener: TcpListener, key: Option<PairKey>, serving: SocketAddr) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new()
            .name("castor-refuse".into())
            .spawn(move || refuse_others(&listener, key.as_ref(), serving, &flag))
            .map_err(|e| warn!(error = %e, "cannot start the refusing thread; later connections will wait"))
            .ok();
        Self { done, thread }
    }

    fn stop(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn refuse_others(
    listener: &TcpListener,
    key: Option<&PairKey>,
    serving: SocketAddr,
    done: &AtomicBool,
) {
    let reason =
        format!("another primary ({serving}) is already connected; this backup serves one session");
    while !done.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let Ok(mut rx) = Receiver::new(stream, receive::HANDSHAKE_TIMEOUT) else {
            continue;
        };
        if let Some(k) = key
            && let Err(e) = rx.secure(k, done)
        {
            warn!(%peer, error = %e, "refused a second connection: it failed the secure handshake");
            rx.close();
            continue;
        }
        // Read its Hello first (bounded), so the answer is not lost to a reset.
        let _ = rx.next_frame(done);
        let mut out = Vec::new();
        ha_wire::session::put_refuse(&mut out, &reason);
        let _ = rx.send(&out);
        rx.close();
        warn!(%peer, %serving, "refused a second primary: a session is in progress");
    }
}

/// How the receive loop ended.
#[derive(Debug)]
enum Received {
    Lost(Loss),
    Stopped,
    VerifyFailed,
    /// The primary ended protection on purpose; its guest goes on there (the reason).
    StoodDown(String),
}

/// Receive, stage, commit and acknowledge epochs until the primary is lost.
fn receive(
    rx: &mut Receiver,
    stager: &mut Stager,
    committed: &mut Committed,
    sinks: &mut Sinks<'_>,
    stop: &AtomicBool,
) -> Result<Received, BackupError> {
    let mut protected = false;
    loop {
        let frame = match rx.next_frame(stop) {
            Ok(f) => f,
            Err(e) => {
                return Ok(match classify(&e) {
                    Some(reason) => Received::Lost(Loss::now(reason, rx.last_frame())),
                    None => Received::Stopped,
                });
            }
        };
        if frame.is(ha_wire::frame::FrameType::StandDown) {
            return Ok(Received::StoodDown(
                String::from_utf8_lossy(frame.body()).into_owned(),
            ));
        }
        let verified = match stager.push(&frame, committed.image()) {
            Ok(None) => continue,
            Ok(Some(v)) => v,
            Err(e) => {
                error!(
                    epoch = stager.next_epoch(),
                    error = %chain(&e),
                    "epoch rejected; the committed image is unchanged; dropping the primary"
                );
                return Ok(Received::Lost(Loss::now(
                    LossReason::Corrupt(chain(&e)),
                    rx.last_frame(),
                )));
            }
        };
        let wire_bytes = verified.staged.wire_bytes;
        let applied = match committed.apply(verified.staged) {
            Ok(a) => a,
            Err(CommitError::ImageMismatch { epoch }) => {
                error!(
                    epoch,
                    "VERIFY FAILED: the committed image differs from the primary's memory; \
                     this backup cannot be trusted"
                );
                sinks
                    .events
                    .note("verify_failed", json!({ "epoch": epoch }));
                return Ok(Received::VerifyFailed);
            }
            Err(e @ CommitError::PrecopyAfterCheckpoint { .. }) => {
                error!(error = %e, "epoch refused; dropping the primary");
                return Ok(Received::Lost(Loss::now(
                    LossReason::Corrupt(e.to_string()),
                    rx.last_frame(),
                )));
            }
        };
        if applied.checkpoint {
            // No ack without its line in the ack log.
            if let Some((path, f)) = &mut sinks.ack_log {
                append_ack_log(f, applied.epoch, applied.out_head).map_err(|source| {
                    BackupError::AckLog {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            let mut ev = json!({ "epoch": applied.epoch });
            status_fields(&mut ev, committed.status());
            sinks.events.note("checkpoint", ev);
        }
        // Counted before the ack: whoever sees the ack sees the commit in the metrics.
        let m = sinks.metrics;
        m.epochs_committed.inc();
        if applied.checkpoint {
            m.checkpoints.inc();
        }
        m.wire_bytes.inc_by(wire_bytes);
        m.commit_seconds.observe(applied.commit_us as f64 / 1e6);
        if let Err(e) = rx.ack(applied.epoch) {
            return Ok(Received::Lost(Loss::now(
                LossReason::Io(format!("ack: {e}")),
                rx.last_frame(),
            )));
        }
        let ack_us = micros(verified.at.elapsed());
        debug!(
            epoch = applied.epoch,
            checkpoint = applied.checkpoint,
            records = applied.records,
            wire_bytes,
            stage_us = verified.stage_us,
            commit_us = applied.commit_us,
            ack_us,
            "epoch committed"
        );
        if applied.checkpoint && !protected {
            protected = true;
            info!(
                epoch = applied.epoch,
                "first checkpoint committed: the guest is protected"
            );
        }
        sinks.stats.row(&EpochStats {
            epoch: applied.epoch,
            checkpoint: applied.checkpoint,
            records: applied.records,
            wire_bytes,
            stage_us: verified.stage_us,
            commit_us: applied.commit_us,
            ack_us,
            out_head: applied.out_head.filter(|_| applied.checkpoint),
        })?;
    }
}
