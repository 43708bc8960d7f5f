//! The backup's end of the link (the *receive* stage): the primary's TCP connection
//! turned into whole frames (by the wire crate's [`FrameReader`]).
//!
//! [`Receiver::next_frame`] reads with a short socket timeout and returns the next frame
//! that is not a heartbeat; heartbeats only prove the primary alive. When no frame at all
//! (heartbeats included) arrived for the detection timeout it gives up with
//! [`ReceiveError::Silent`]. [`handshake`] runs the session opening: with a pair key the
//! Noise handshake first ([`Receiver::secure`]: nothing the peer sends is read as a frame
//! before it authenticated), then Hello, then Welcome or Refuse — all of it within
//! [`HANDSHAKE_TIMEOUT`] of the connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ha_wire::frame::Frame;
use ha_wire::frame::{FrameError, FrameReader, FrameType, MAX_FRAME};
use ha_wire::secure::{self, Deadline, PairKey, SecureError, SecureStream};
use ha_wire::session::{self, Hello, SessionError};

/// How long a new connection may take to finish the Noise handshake and send its Hello
/// (the secure channel's handshake deadline).
pub use ha_wire::secure::HANDSHAKE_TIMEOUT;
/// How long an Ack or a session answer may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no frame came.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// No frame for the whole timeout.
    #[error("no frame from the primary for {0:?}")]
    Silent(Duration),
    /// The primary closed the connection.
    #[error("the primary closed the connection")]
    Closed,
    /// The socket failed.
    #[error("connection to the primary failed")]
    Io(#[source] std::io::Error),
    /// The byte stream is not made of valid frames.
    #[error("bad frame from the primary")]
    Framing(#[source] FrameError),
    /// An encrypted message failed to authenticate (altered, replayed, reordered).
    #[error("encrypted channel")]
    Tampered(#[source] std::io::Error),
    /// The stop flag (SIGTERM/SIGINT) was raised.
    #[error("stopped by a signal")]
    Stopped,
}

/// Why a handshake did not produce a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's Hello does not match this backup (it was sent a Refuse).
    #[error("refused the primary")]
    Refused(#[source] SessionError),
    /// The first frame was not a Hello (the peer was sent a Refuse).
    #[error("first frame from the peer has type {0}, not Hello")]
    NotHello(u8),
    /// The connection failed or went silent before a Hello.
    #[error("no Hello from the peer")]
    Receive(#[source] ReceiveError),
    /// The answer could not be written.
    #[error("cannot answer the peer")]
    Write(#[source] std::io::Error),
    /// The Noise handshake failed: no key, another key, not a Castor primary, too slow.
    #[error("secure handshake failed")]
    Secure(#[source] SecureError),
    /// Another primary took the session first (the peer was refused).
    #[error("another primary is already connected")]
    Taken,
    /// The Hello announces more guest memory than `--max-memory` (the peer was refused).
    #[error("guest memory {memory} exceeds this backup's --max-memory {max}")]
    TooLarge {
        /// Bytes announced.
        memory: u64,
        /// The limit.
        max: u64,
    },
}

/// The connection: plain TCP, or the Noise channel over it.
#[derive(Debug)]
enum Wire {
    Plain(TcpStream),
    Secure(SecureStream<TcpStream>),
}

impl Wire {
    fn sock(&self) -> &TcpStream {
        match self {
            Wire::Plain(s) => s,
            Wire::Secure(s) => s.get_ref(),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Wire::Plain(s) => s.write_all(buf).and_then(|()| s.flush()),
            Wire::Secure(s) => s.write_all(buf).and_then(|()| s.flush()),
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(buf),
            Wire::Secure(s) => s.read(buf),
        }
    }
}

/// Reads frames from one primary connection.
#[derive(Debug)]
pub struct Receiver {
    frames: FrameReader<Wire>,
    opened: Instant,
    peer: SocketAddr,
    timeout: Duration,
    last_frame: Instant,
    heartbeats: u64,
}

impl Receiver {
    /// Wrap an accepted connection; `timeout` is the failure detection timeout.
    pub fn new(stream: TcpStream, timeout: Duration) -> Result<Self, std::io::Error> {
        let peer = stream.peer_addr()?;
        stream.set_nonblocking(false)?;
        let _ = stream.set_nodelay(true);
        // Poll a few times per timeout so silence is seen close to the deadline.
        let poll = (timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(10));
        stream.set_read_timeout(Some(poll))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Self {
            frames: FrameReader::new(Wire::Plain(stream), MAX_FRAME),
            opened: Instant::now(),
            peer,
            timeout,
            last_frame: Instant::now(),
            heartbeats: 0,
        })
    }

    /// The primary's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// When the last frame (heartbeats included) was received.
    pub fn last_frame(&self) -> Instant {
        self.last_frame
    }

    /// Heartbeats received (and dropped) so far.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats
    }

    /// Change the detection timeout (the handshake uses a longer one).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether the Noise channel is up.
    pub fn is_secure(&self) -> bool {
        matches!(self.frames.get_ref(), Wire::Secure(_))
    }

    /// Run the responder's side of the Noise handshake with `key`; from then on every
    /// byte is decrypted (and authenticated) before it is read as a frame. It must finish
    /// within [`HANDSHAKE_TIMEOUT`] of the connection; `stop` abandons it.
    pub fn secure(&mut self, key: &PairKey, stop: &AtomicBool) -> Result<(), SecureError> {
        let Wire::Plain(s) = self.frames.get_mut() else {
            return Ok(());
        };
        let d = Deadline {
            at: self.opened + HANDSHAKE_TIMEOUT,
            stop: Some(stop),
        };
        let t = secure::respond(s, key, &d)?;
        let sock = s.try_clone().map_err(SecureError::Io)?;
        *self.frames.get_mut() = Wire::Secure(t.stream(sock));
        Ok(())
    }

    /// The next frame that is not a heartbeat.
    pub fn next_frame(&mut self, stop: &AtomicBool) -> Result<Frame, ReceiveError> {
        loop {
            if let Some(frame) = self.frames.next_buffered().map_err(ReceiveError::Framing)? {
                self.last_frame = Instant::now();
                if frame.is(FrameType::Heartbeat) {
                    self.heartbeats += 1;
                    continue;
                }
                return Ok(frame);
            }
            self.fill(stop)?;
        }
    }

    /// Read more bytes (at least one) or fail.
    fn fill(&mut self, stop: &AtomicBool) -> Result<(), ReceiveError> {
        // Silence is declared only after a read that found nothing: a process stopped for a
        // while (SIGSTOP, a long stall) looks once more before believing its clock, so
        // frames that arrived meanwhile are read rather than taken for silence.
        let mut looked_again = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(ReceiveError::Stopped);
            }
            match self.frames.fill() {
                Ok(0) => return Err(ReceiveError::Closed),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    let silent = self.last_frame.elapsed();
                    if silent >= self.timeout {
                        if looked_again {
                            return Err(ReceiveError::Silent(silent));
                        }
                        looked_again = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData && self.is_secure() => {
                    return Err(ReceiveError::Tampered(e));
                }
                Err(e) => return Err(ReceiveError::Io(e)),
            }
        }
    }

    /// Send bytes (an Ack, a Welcome, a Refuse) to the primary.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), std::io::Error> {
        self.frames.get_mut().write_all(bytes)
    }

    /// Acknowledge a committed epoch.
    pub fn ack(&mut self, epoch: u64) -> Result<(), std::io::Error> {
        let mut out = Vec::with_capacity(13);
        session::put_ack(&mut out, epoch);
        self.send(&out)
    }

    /// Close the connection both ways.
    pub fn close(&self) {
        let _ = self
            .frames
            .get_ref()
            .sock()
            .shutdown(std::net::Shutdown::Both);
    }
}

/// What the backup's Welcome offers a primary that passes the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The first epoch the backup expects.
    pub next_epoch: u64,
    /// The backup already holds an image of the guest's memory (`--base-image`).
    pub holds_image: bool,
}

/// Run the session opening on a new connection: with a `key` the Noise handshake (a peer
/// that fails it is closed without an answer), then read the Hello, check it against
/// `ours` and `max_memory`, take the session `slot` (a Hello that passes when another
/// primary already took it is refused), answer Welcome (the `offer`, and the receiver's
/// detection timeout) or Refuse (with the reason) and return the primary's Hello. After a
/// refusal the connection is closed.
pub fn handshake(
    rx: &mut Receiver,
    key: Option<&PairKey>,
    ours: &Hello,
    max_memory: u64,
    offer: Offer,
    slot: &AtomicBool,
    stop: &AtomicBool,
) -> Result<Hello, HandshakeError> {
    if let Some(k) = key
        && let Err(e) = rx.secure(k, stop)
    {
        rx.close();
        return Err(match e {
            SecureError::Stopped => HandshakeError::Receive(ReceiveError::Stopped),
            e => HandshakeError::Secure(e),
        });
    }
    let detect = rx.timeout;
    // The silence clock starts at the connection: the Hello is due within the same
    // HANDSHAKE_TIMEOUT as the Noise handshake.
    rx.set_timeout(HANDSHAKE_TIMEOUT.max(detect));
    let frame = rx.next_frame(stop);
    rx.set_timeout(detect);
    let frame = frame.map_err(HandshakeError::Receive)?;
    let refuse = |rx: &mut Receiver, reason: &str| {
        let mut out = Vec::new();
        session::put_refuse(&mut out, reason);
        let _ = rx.send(&out);
        rx.close();
    };
    if !frame.is(FrameType::Hello) {
        refuse(rx, &format!("expected Hello, got frame type {}", frame.ty));
        return Err(HandshakeError::NotHello(frame.ty));
    }
    let hello = Hello::parse(frame.body());
    if let Ok(h) = &hello
        && h.memory_size > max_memory
    {
        let e = HandshakeError::TooLarge {
            memory: h.memory_size,
            max: max_memory,
        };
        refuse(rx, &e.to_string());
        return Err(e);
    }
    let hello = hello.and_then(|h| h.check_against(ours).map(|()| h));
    match hello {
        Ok(_) if slot.swap(true, Ordering::SeqCst) => {
            refuse(
                rx,
                "another primary is already connected; this backup serves one session",
            );
            Err(HandshakeError::Taken)
        }
        Ok(h) => {
            let mut out = Vec::new();
            session::Welcome {
                next_epoch: offer.next_epoch,
                detect_timeout: detect,
                holds_image: offer.holds_image,
            }
            .put(&mut out);
            rx.send(&out).map_err(HandshakeError::Write)?;
            Ok(h)
        }
        Err(e) => {
            refuse(rx, &e.to_string());
            Err(HandshakeError::Refused(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_wire::frame::put_frame;
    use std::net::TcpListener;

    fn pair(timeout: Duration) -> (TcpStream, Receiver) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = l.accept().expect("accept");
        (client, Receiver::new(server, timeout).expect("receiver"))
    }

    #[test]
    fn frames_split_across_writes_and_heartbeats_dropped() {
        let stop = AtomicBool::new(false);
        let (mut c, mut rx) = pair(Duration::from_millis(500));
        let mut out = Vec::new();
        session::put_heartbeat(&mut out);
        put_frame(&mut out, FrameType::Pages, &[7; 1000]);
        session::put_heartbeat(&mut out);
        put_frame(&mut out, FrameType::Trailer, &[1, 2, 3]);
        let (a, b) = out.split_at(700);
        c.write_all(a).expect("write");
        let t = std::thread::spawn({
            let b = b.to_vec();
            move || {
                std::thread::sleep(Duration::from_millis(20));
                c.write_all(&b).expect("write");
                c
            }
        });
        let f = rx.next_frame(&stop).expect("frame");
        assert_eq!((f.ty, f.body().len()), (2, 1000));
        let f = rx.next_frame(&stop).expect("frame");
        assert_eq!((f.ty, f.body()), (4, &[1u8, 2, 3][..]));
        assert_eq!(rx.heartbeats(), 2);
        let c = t.join().expect("writer");
        drop(c);
        assert!(matches!(rx.next_frame(&stop), Err(ReceiveError::Closed)));
    }

    #[test]
    fn silence_is_detected_after_the_timeout() {
        let stop = AtomicBool::new(false);
        let (_c, mut rx) = pair(Duration::from_millis(60));
        let t = Instant::now();
        match rx.next_frame(&stop) {
            Err(ReceiveError::Silent(d)) => assert!(d >= Duration::from_millis(60)),
            other => panic!("expected silence, got {other:?}"),
        }
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn bad_framing_is_an_error() {
        let stop = AtomicBool::new(false);
        let (mut c, mut rx) = pair(Duration::from_millis(500));
        c.write_all(&[0, 0, 0, 0, 9]).expect("write");
        assert!(matches!(
            rx.next_frame(&stop),
            Err(ReceiveError::Framing(FrameError::Empty))
        ));
    }
}
