//! The *send* stage: the TCP link to the backup. The handshake, a sender thread that writes
//! epochs (and a heartbeat whenever nothing else went out for a heartbeat interval), and a
//! receiver thread that turns the backup's frames into [`LinkEvent`]s.
//!
//! The engine ends a session through [`Control`]: a stand-down (the guest goes on without
//! this backup) or a plain close. Either is written after the frame in progress, ahead of
//! any epoch still queued, and then the sender half-closes the connection (FIN) and stops
//! heartbeating, so the backup sees the end of the session at once. The receiver keeps
//! reading until the backup closes its side, so the socket is never closed with unread
//! acks (which would reset the connection and could discard the stand-down).
//!
//! With a pair key the link first runs the Noise handshake (`ha_wire::secure`) and every
//! byte after it, the session opening included, travels encrypted; without one (the
//! operator gave `--insecure`) the frames go in the clear.

use crate::shape::TokenBucket;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use ha_wire::frame::{FrameReader, FrameType};
use ha_wire::secure::{self, Deadline, PairKey, SecureError};
use ha_wire::session::{self, Hello, SessionError, Welcome};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Errors setting up the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The backup cannot be reached.
    #[error("cannot connect to the backup at {addr}")]
    Connect {
        /// The backup's address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed on the wire.
    #[error("handshake with the backup at {addr} failed")]
    Handshake {
        /// The backup's address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The backup refused or answered nonsense.
    #[error("handshake with the backup")]
    Session(#[from] SessionError),
    /// A plaintext Hello got no answer: the backup closed the connection.
    #[error(
        "the backup at {addr} closed the connection without answering (it runs with a pair \
         key: give this primary the same --key instead of --insecure)"
    )]
    NoAnswer {
        /// The backup's address.
        addr: SocketAddr,
    },
    /// The backup did not answer the Noise handshake in time.
    #[error(
        "the backup at {addr} did not answer the secure handshake within {waited:?} (it \
         accepted the connection but is busy, overloaded, or not a Castor backup; see its log)"
    )]
    NoHandshakeAnswer {
        /// The backup's address.
        addr: SocketAddr,
        /// How long the primary waited.
        waited: Duration,
    },
    /// The backup closed the connection during the Noise handshake.
    #[error(
        "the backup at {addr} closed the connection during the secure handshake (it holds \
         another pair key or runs with --insecure, or it refused the connection: see its log)"
    )]
    HandshakeClosed {
        /// The backup's address.
        addr: SocketAddr,
    },
    /// The Noise handshake failed.
    #[error(
        "secure handshake with the backup at {addr} failed (do both sides hold the same \
         pair key? a backup run with --insecure cannot talk to a primary with --key)"
    )]
    Secure {
        /// The backup's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: SecureError,
    },
}

impl LinkError {
    /// The error for a session opening that failed on the wire: a close without an answer
    /// to a plaintext Hello is what a backup that requires a pair key does.
    fn opening(addr: SocketAddr, secure: bool, source: std::io::Error) -> Self {
        if !secure && source.kind() == std::io::ErrorKind::UnexpectedEof {
            LinkError::NoAnswer { addr }
        } else {
            LinkError::Handshake { addr, source }
        }
    }

    /// The error for a Noise handshake that failed: silence and a close are named as
    /// such; only a reply that fails to authenticate is a key problem.
    fn secure(addr: SocketAddr, waited: Duration, source: SecureError) -> Self {
        match source {
            SecureError::Timeout(_) => LinkError::NoHandshakeAnswer { addr, waited },
            SecureError::Closed => LinkError::HandshakeClosed { addr },
            source => LinkError::Secure { addr, source },
        }
    }
}

/// The byte streams of a link: encrypted, or plain TCP.
type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

/// Largest frame the backup sends: its answers are small (Welcome, Refuse, Ack, Abort)
/// but for the disk sync's Sums (at most `ha_wire::disksync::MAX_PARENTS` × 16
/// fingerprints, or a 16 GiB disk's 1 MiB chunks).
const MAX_ANSWER: usize = 1 << 20;

/// What the link reports to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The backup committed this epoch.
    Ack(u64, Instant),
    /// This epoch's bytes are all written to the socket, taking this long.
    Sent(u64, Duration),
    /// The stand-down frame is written to the socket (the session then ends).
    StoodDown,
    /// The handover frame is written to the socket (the session then ends).
    HandedOver,
    /// The backup's answer to a disk sync or memory resync request (the Sums or MemSums
    /// frame's body).
    Sums(Vec<u8>),
    /// The link is gone (with the reason).
    Closed(String),
}

/// How the engine ends a session; see the module's doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Write a stand-down with this reason, report [`LinkEvent::StoodDown`], then
    /// half-close.
    StandDown(String),
    /// Write a handover (planned switchover) with this reason, report
    /// [`LinkEvent::HandedOver`], then half-close.
    Handover(String),
    /// Half-close now: no further epoch or heartbeat.
    Close,
    /// Write this session frame (a disk sync request) ahead of queued epochs; the session
    /// goes on.
    Frame(Vec<u8>),
}

/// A connected, welcomed link.
#[derive(Debug)]
pub struct Link {
    /// Epochs to send, in order: (epoch number, bytes).
    pub tx: Sender<(u64, Vec<u8>)>,
    /// Ends the session ahead of queued epochs.
    pub ctl: Sender<Control>,
    /// Acks and closure.
    pub events: Receiver<LinkEvent>,
    /// The backup's answer: the first epoch it expects and its detection timeout.
    pub welcome: Welcome,
    /// Total bytes written to the socket.
    pub sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The backup's address (with `--reprotect`, not necessarily `--backup`).
    pub peer: SocketAddr,
}

/// Connect, run the Noise handshake when there is a `key`, say Hello, wait for Welcome,
/// and start the sender and receiver threads.
pub fn connect(
    addr: SocketAddr,
    hello: &Hello,
    heartbeat: Duration,
    timeout: Duration,
    key: Option<&PairKey>,
    link_rate: Option<u64>,
) -> Result<Link, LinkError> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| LinkError::Connect { addr, source })?;
    let hs = |source| LinkError::Handshake { addr, source };
    s.set_nodelay(true).map_err(hs)?;
    s.set_read_timeout(Some(timeout)).map_err(hs)?;
    let (rd, mut wr): Halves = match key {
        Some(k) => {
            let d = Deadline {
                at: Instant::now() + timeout,
                stop: None,
            };
            let t = secure::initiate(&mut s, k, &d)
                .map_err(|source| LinkError::secure(addr, timeout, source))?;
            let (r, w) = t.split(s.try_clone().map_err(hs)?, s.try_clone().map_err(hs)?);
            (Box::new(r), Box::new(w))
        }
        None => (
            Box::new(s.try_clone().map_err(hs)?),
            Box::new(s.try_clone().map_err(hs)?),
        ),
    };
    let mut buf = Vec::new();
    hello.put(&mut buf);
    wr.write_all(&buf).map_err(hs)?;
    let mut frames = FrameReader::new(rd, MAX_ANSWER);
    let answer = frames
        .read_frame()
        .map_err(|e| LinkError::opening(addr, key.is_some(), e))?;
    let welcome = match answer.kind() {
        Ok(FrameType::Welcome) => Welcome::parse(answer.body())?,
        Ok(FrameType::Refuse) => {
            return Err(
                SessionError::Refused(String::from_utf8_lossy(answer.body()).into_owned()).into(),
            );
        }
        _ => return Err(SessionError::Malformed("handshake reply").into()),
    };
    s.set_read_timeout(None).map_err(hs)?;
    let (tx, rx) = bounded::<(u64, Vec<u8>)>(4);
    let (ctl, ctl_rx) = unbounded();
    let (etx, events) = unbounded();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let etx = etx.clone();
        let sent = sent.clone();
        std::thread::Builder::new()
            .name("castor-send".into())
            .spawn(move || {
                let shaper = link_rate.map(TokenBucket::new);
                sender(wr, s, (rx, ctl_rx), heartbeat, etx, sent, shaper);
            })
            .map_err(hs)?;
    }
    std::thread::Builder::new()
        .name("castor-acks".into())
        .spawn(move || receiver(frames, etx))
        .map_err(hs)?;
    Ok(Link {
        tx,
        ctl,
        events,
        welcome,
        sent,
        peer: addr,
    })
}

/// What the sender writes next.
enum Next {
    Epoch(u64, Vec<u8>),
    Heartbeat,
    Control(Control),
    /// The engine dropped both channels.
    Gone,
}

/// The next thing to write: a control message first, then a queued epoch, else a
/// heartbeat once `heartbeat` passed with nothing to send.
fn next(rx: &Receiver<(u64, Vec<u8>)>, ctl: &Receiver<Control>, heartbeat: Duration) -> Next {
    if let Ok(c) = ctl.try_recv() {
        return Next::Control(c);
    }
    crossbeam_channel::select! {
        recv(ctl) -> c => c.map_or_else(|_| next_epoch(rx, heartbeat), Next::Control),
        recv(rx) -> m => match m {
            Ok((e, b)) => Next::Epoch(e, b),
            // The encoder is gone; the engine may still end the session.
            Err(_) => ctl.recv().map_or(Next::Gone, Next::Control),
        },
        default(heartbeat) => Next::Heartbeat,
    }
}

/// [`next`] once the control channel is gone: epochs and heartbeats only.
fn next_epoch(rx: &Receiver<(u64, Vec<u8>)>, heartbeat: Duration) -> Next {
    match rx.recv_timeout(heartbeat) {
        Ok((e, b)) => Next::Epoch(e, b),
        Err(RecvTimeoutError::Timeout) => Next::Heartbeat,
        Err(RecvTimeoutError::Disconnected) => Next::Gone,
    }
}

fn sender(
    mut s: Box<dyn Write + Send>,
    sock: TcpStream,
    (rx, ctl): (Receiver<(u64, Vec<u8>)>, Receiver<Control>),
    heartbeat: Duration,
    events: Sender<LinkEvent>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    mut shaper: Option<TokenBucket>,
) {
    let mut hb = Vec::new();
    session::put_heartbeat(&mut hb);
    let end = |sock: &TcpStream| {
        let _ = sock.shutdown(std::net::Shutdown::Write);
    };
    loop {
        let (epoch, buf, what) = match next(&rx, &ctl, heartbeat) {
            Next::Epoch(e, b) => (Some(e), b, "epoch"),
            Next::Heartbeat => (None, hb.clone(), "heartbeat"),
            Next::Control(Control::Close) | Next::Gone => return end(&sock),
            Next::Control(Control::Frame(frame)) => (None, frame, "disk sync request"),
            Next::Control(Control::Handover(reason)) => {
                let mut frame = Vec::new();
                session::put_handover(&mut frame, &reason);
                let ev = match write_shaped(&mut *s, &frame, shaper.as_mut()) {
                    Ok(()) => LinkEvent::HandedOver,
                    Err(e) => LinkEvent::Closed(format!("sending handover: {e}")),
                };
                let _ = events.send(ev);
                return end(&sock);
            }
            Next::Control(Control::StandDown(reason)) => {
                let mut frame = Vec::new();
                session::put_stand_down(&mut frame, &reason);
                match write_shaped(&mut *s, &frame, shaper.as_mut()) {
                    Ok(()) => {
                        let _ = events.send(LinkEvent::StoodDown);
                    }
                    Err(e) => {
                        let _ = events.send(LinkEvent::Closed(format!("sending stand-down: {e}")));
                    }
                }
                return end(&sock);
            }
        };
        let t = Instant::now();
        if let Err(e) = write_shaped(&mut *s, &buf, shaper.as_mut()) {
            let _ = events.send(LinkEvent::Closed(format!("sending {what}: {e}")));
            return;
        }
        sent.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(e) = epoch
            && events.send(LinkEvent::Sent(e, t.elapsed())).is_err()
        {
            return;
        }
    }
}

/// Write `buf`, paced by `shaper` when there is one (a burst-sized piece at a time).
fn write_shaped(
    s: &mut dyn Write,
    buf: &[u8],
    shaper: Option<&mut TokenBucket>,
) -> std::io::Result<()> {
    let Some(b) = shaper else {
        return s.write_all(buf);
    };
    for piece in buf.chunks(b.chunk()) {
        b.take(piece.len());
        s.write_all(piece)?;
    }
    Ok(())
}

fn receiver(mut frames: FrameReader<Box<dyn Read + Send>>, events: Sender<LinkEvent>) {
    loop {
        let frame = match frames.read_frame() {
            Ok(f) => f,
            Err(e) => {
                let _ = events.send(LinkEvent::Closed(format!("connection to the backup: {e}")));
                return;
            }
        };
        let closed = match frame.kind() {
            Ok(FrameType::Ack) => match session::parse_u64(frame.body(), "ack") {
                Ok(n) => {
                    if events.send(LinkEvent::Ack(n, Instant::now())).is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) => e.to_string(),
            },
            // One comparison at a time (disk, then memory): its answer.
            Ok(FrameType::Sums | FrameType::MemSums) => {
                if events.send(LinkEvent::Sums(frame.body().to_vec())).is_err() {
                    return;
                }
                continue;
            }
            Ok(FrameType::Abort) => format!(
                "the backup ended the session: {}",
                String::from_utf8_lossy(frame.body())
            ),
            Ok(other) => format!("unexpected frame type {other} from the backup"),
            Err(unknown) => format!("{unknown} from the backup"),
        };
        let _ = events.send(LinkEvent::Closed(closed));
        return;
    }
}
