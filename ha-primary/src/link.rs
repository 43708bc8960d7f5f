//! The *send* stage: the TCP link to the backup. The handshake, a sender thread that writes
//! epochs (and a heartbeat whenever nothing else went out for a heartbeat interval), and a
//! receiver thread that turns the backup's frames into [`LinkEvent`]s.
//!
//! With a pair key the link first runs the Noise handshake (`ha_common::secure`) and every
//! byte after it, the session opening included, travels encrypted; without one (the
//! operator gave `--insecure`) the frames go in the clear.

use crate::shape::TokenBucket;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use ha_common::secure::{self, Deadline, PairKey, SecureError};
use ha_common::session::{self, Hello, SessionError};
use ha_common::stream::split_frame;
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
}

/// The byte streams of a link: encrypted, or plain TCP.
type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

/// What the link reports to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The backup committed this epoch.
    Ack(u64, Instant),
    /// This epoch's bytes are all written to the socket, taking this long.
    Sent(u64, Duration),
    /// The link is gone (with the reason).
    Closed(String),
}

/// A connected, welcomed link.
#[derive(Debug)]
pub struct Link {
    /// Epochs to send, in order: (epoch number, bytes).
    pub tx: Sender<(u64, Vec<u8>)>,
    /// Acks and closure.
    pub events: Receiver<LinkEvent>,
    /// The first epoch the backup expects.
    pub next_epoch: u64,
    /// Total bytes written to the socket.
    pub sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
    let (mut rd, mut wr): Halves = match key {
        Some(k) => {
            let d = Deadline {
                at: Instant::now() + timeout,
                stop: None,
            };
            let t = secure::initiate(&mut s, k, &d)
                .map_err(|source| LinkError::Secure { addr, source })?;
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
    let (ty, body) = read_frame(&mut rd).map_err(|e| LinkError::opening(addr, key.is_some(), e))?;
    let next_epoch = match ty {
        session::frame_type::WELCOME => session::parse_u64(&body, "welcome")?,
        session::frame_type::REFUSE => {
            return Err(SessionError::Refused(String::from_utf8_lossy(&body).into_owned()).into());
        }
        _ => return Err(SessionError::Malformed("handshake reply").into()),
    };
    s.set_read_timeout(None).map_err(hs)?;
    let (tx, rx) = bounded::<(u64, Vec<u8>)>(4);
    let (etx, events) = unbounded();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let etx = etx.clone();
        let sent = sent.clone();
        std::thread::Builder::new()
            .name("castor-send".into())
            .spawn(move || {
                let shaper = link_rate.map(TokenBucket::new);
                sender(wr, s, rx, heartbeat, etx, sent, shaper);
            })
            .map_err(hs)?;
    }
    std::thread::Builder::new()
        .name("castor-acks".into())
        .spawn(move || receiver(rd, etx))
        .map_err(hs)?;
    Ok(Link {
        tx,
        events,
        next_epoch,
        sent,
    })
}

fn sender(
    mut s: Box<dyn Write + Send>,
    sock: TcpStream,
    rx: Receiver<(u64, Vec<u8>)>,
    heartbeat: Duration,
    events: Sender<LinkEvent>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    mut shaper: Option<TokenBucket>,
) {
    let mut hb = Vec::new();
    session::put_heartbeat(&mut hb);
    loop {
        let (epoch, buf) = match rx.recv_timeout(heartbeat) {
            Ok((e, b)) => (Some(e), b),
            Err(RecvTimeoutError::Timeout) => (None, hb.clone()),
            Err(RecvTimeoutError::Disconnected) => {
                let _ = sock.shutdown(std::net::Shutdown::Write);
                return;
            }
        };
        let t = Instant::now();
        if let Err(e) = write_shaped(&mut *s, &buf, shaper.as_mut()) {
            let what = if epoch.is_some() {
                "epoch"
            } else {
                "heartbeat"
            };
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

fn receiver(mut s: Box<dyn Read + Send>, events: Sender<LinkEvent>) {
    loop {
        match read_frame(&mut s) {
            Ok((session::frame_type::ACK, body)) => match session::parse_u64(&body, "ack") {
                Ok(n) => {
                    if events.send(LinkEvent::Ack(n, Instant::now())).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = events.send(LinkEvent::Closed(e.to_string()));
                    return;
                }
            },
            Ok((ty, _)) => {
                let _ = events.send(LinkEvent::Closed(format!(
                    "unexpected frame type {ty} from the backup"
                )));
                return;
            }
            Err(e) => {
                let _ = events.send(LinkEvent::Closed(format!("connection to the backup: {e}")));
                return;
            }
        }
    }
}

/// Read one whole frame (small: session frames only).
fn read_frame(s: &mut dyn Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_le_bytes(len) as usize;
    if n == 0 || n > 64 << 10 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad frame length {n}"),
        ));
    }
    let mut frame = vec![0u8; 4 + n];
    frame[..4].copy_from_slice(&len);
    s.read_exact(&mut frame[4..])?;
    match split_frame(&frame) {
        Ok(Some((ty, body, _))) => Ok((ty, body.to_vec())),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad frame",
        )),
    }
}
