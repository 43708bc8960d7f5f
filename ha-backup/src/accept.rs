//! *Listening*: the backup's one session at a time. Every connection's handshake runs on
//! its own thread (at most [`MAX_HANDSHAKES`]), the first Hello that passes takes the
//! session, misconfigured peers are refused by name, and while a session runs later
//! connections are answered with a Refuse naming it ([`Refuser`]).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ha_daemon::events::EventLog;
use ha_wire::secure::PairKey;
use ha_wire::session::Hello;
use serde_json::json;
use tracing::{info, warn};

use crate::config::Config;
use crate::link::{self, HandshakeError, Offer, Receiver, handshake};
use crate::{BackupError, chain};

/// The bound listening socket and its address.
#[derive(Debug)]
pub(crate) struct Listening {
    pub(crate) listener: TcpListener,
    pub(crate) addr: SocketAddr,
}

/// Bind `--listen`.
pub(crate) fn listen(cfg: &Config) -> Result<Listening, BackupError> {
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
pub(crate) fn accept_primary(
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
                    Err(HandshakeError::Receive(link::ReceiveError::Stopped)) => {}
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
                let offer = Offer {
                    next_epoch: 1,
                    holds_image: cfg.base_image.is_some(),
                };
                let res = handshake(&mut rx, key, ours, cfg.max_memory, offer, slot, quit)
                    .map(|h| (rx, h));
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
pub(crate) struct Refuser {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Refuser {
    pub(crate) fn start(listener: TcpListener, key: Option<PairKey>, serving: SocketAddr) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new()
            .name("castor-refuse".into())
            .spawn(move || refuse_others(&listener, key.as_ref(), serving, &flag))
            .map_err(|e| warn!(error = %e, "cannot start the refusing thread; later connections will wait"))
            .ok();
        Self { done, thread }
    }

    pub(crate) fn stop(mut self) {
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
        let Ok(mut rx) = Receiver::new(stream, link::HANDSHAKE_TIMEOUT) else {
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
