//! The Noise handshake (`-> psk, e`, `<- e, ee`): [`Initiator`] and [`Responder`] as
//! steps without I/O, [`initiate`] and [`respond`] to run them on a socket, each bounded by
//! a [`Deadline`] ([`HANDSHAKE_TIMEOUT`] from the connection by default). A finished
//! handshake yields the session's [`Transport`].

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{NOISE_PATTERN, PROLOGUE, PairKey, SecureError, TAG_LEN, Transport};

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Both NNpsk0 handshake messages are an ephemeral key and an empty payload's tag.
pub const HANDSHAKE_LEN: usize = 32 + TAG_LEN;

fn builder(key: &PairKey) -> Result<snow::Builder<'_>, SecureError> {
    let params = NOISE_PATTERN
        .parse()
        .map_err(|e: snow::Error| SecureError::Noise(e))?;
    snow::Builder::new(params)
        .prologue(PROLOGUE)
        .and_then(|b| b.psk(0, key.bytes()))
        .map_err(SecureError::Noise)
}

/// When a handshake gives up: a deadline, and a stop flag checked while waiting.
#[derive(Debug, Clone, Copy)]
pub struct Deadline<'a> {
    /// Give up at this instant.
    pub at: Instant,
    /// Give up when this is set (SIGTERM).
    pub stop: Option<&'a AtomicBool>,
}

impl Deadline<'_> {
    /// [`HANDSHAKE_TIMEOUT`] from now, no stop flag.
    pub fn handshake() -> Deadline<'static> {
        Deadline {
            at: Instant::now() + HANDSHAKE_TIMEOUT,
            stop: None,
        }
    }

    fn check(&self) -> Result<(), SecureError> {
        if self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(SecureError::Stopped);
        }
        if Instant::now() >= self.at {
            return Err(SecureError::Timeout(HANDSHAKE_TIMEOUT));
        }
        Ok(())
    }
}

/// Read exactly `buf.len()` bytes before the deadline. Socket read timeouts (the caller
/// sets a short one) only make it look at the clock: a peer trickling bytes still runs
/// out of time.
fn read_exact_by<R: Read>(r: &mut R, buf: &mut [u8], d: &Deadline<'_>) -> Result<(), SecureError> {
    let mut at = 0;
    while at < buf.len() {
        d.check()?;
        match r.read(&mut buf[at..]) {
            Ok(0) => return Err(SecureError::Closed),
            Ok(n) => at += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(SecureError::Io(e)),
        }
    }
    Ok(())
}

/// Read one length-prefixed handshake message (which must be [`HANDSHAKE_LEN`] bytes).
fn read_handshake<R: Read>(
    r: &mut R,
    d: &Deadline<'_>,
) -> Result<[u8; HANDSHAKE_LEN], SecureError> {
    let mut len = [0u8; 2];
    read_exact_by(r, &mut len, d)?;
    let n = usize::from(u16::from_le_bytes(len));
    if n != HANDSHAKE_LEN {
        return Err(SecureError::BadLength(n));
    }
    let mut msg = [0u8; HANDSHAKE_LEN];
    read_exact_by(r, &mut msg, d)?;
    Ok(msg)
}

fn write_handshake<W: Write>(w: &mut W, msg: &[u8]) -> Result<(), SecureError> {
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out)
        .and_then(|()| w.flush())
        .map_err(SecureError::Io)
}

/// The initiator's side (the primary) as steps without I/O: [`Initiator::new`] gives the
/// first message to send, [`Initiator::finish`] takes the responder's reply.
#[derive(Debug)]
pub struct Initiator {
    hs: snow::HandshakeState,
}

impl Initiator {
    /// An initiator for `key` and its first message.
    pub fn new(key: &PairKey) -> Result<(Self, Vec<u8>), SecureError> {
        let mut hs = builder(key)?
            .build_initiator()
            .map_err(SecureError::Noise)?;
        let mut msg = vec![0u8; HANDSHAKE_LEN];
        let n = hs
            .write_message(&[], &mut msg)
            .map_err(SecureError::Noise)?;
        msg.truncate(n);
        Ok((Self { hs }, msg))
    }

    /// Check the responder's reply; on success, the session's keys.
    pub fn finish(mut self, reply: &[u8]) -> Result<Transport, SecureError> {
        if reply.len() != HANDSHAKE_LEN {
            return Err(SecureError::BadLength(reply.len()));
        }
        let mut payload = [0u8; HANDSHAKE_LEN];
        self.hs
            .read_message(reply, &mut payload)
            .map_err(|_| SecureError::BadPeer)?;
        let state = self
            .hs
            .into_stateless_transport_mode()
            .map_err(SecureError::Noise)?;
        Ok(Transport::new(state))
    }
}

/// Run the initiator's side (the primary) of the handshake on `s`.
pub fn initiate<S: Read + Write>(
    s: &mut S,
    key: &PairKey,
    d: &Deadline<'_>,
) -> Result<Transport, SecureError> {
    let (i, msg) = Initiator::new(key)?;
    write_handshake(s, &msg)?;
    let reply = read_handshake(s, d)?;
    i.finish(&reply)
}

/// The responder's side (the backup) as steps without I/O: [`Responder::accept`] takes
/// the initiator's first message and returns the reply to send.
#[derive(Debug)]
pub struct Responder {
    hs: snow::HandshakeState,
}

impl Responder {
    /// A responder for `key`.
    pub fn new(key: &PairKey) -> Result<Self, SecureError> {
        let hs = builder(key)?
            .build_responder()
            .map_err(SecureError::Noise)?;
        Ok(Self { hs })
    }

    /// Check the initiator's message; on success, the reply and the session's keys.
    pub fn accept(mut self, msg: &[u8]) -> Result<(Vec<u8>, Transport), SecureError> {
        if msg.len() != HANDSHAKE_LEN {
            return Err(SecureError::BadLength(msg.len()));
        }
        let mut payload = [0u8; HANDSHAKE_LEN];
        self.hs
            .read_message(msg, &mut payload)
            .map_err(|_| SecureError::BadPeer)?;
        let mut reply = vec![0u8; HANDSHAKE_LEN];
        let n = self
            .hs
            .write_message(&[], &mut reply)
            .map_err(SecureError::Noise)?;
        reply.truncate(n);
        let state = self
            .hs
            .into_stateless_transport_mode()
            .map_err(SecureError::Noise)?;
        Ok((reply, Transport::new(state)))
    }
}

/// Run the responder's side (the backup) of the handshake on `s`. Nothing the peer sends
/// is handed on until its first message authenticated.
pub fn respond<S: Read + Write>(
    s: &mut S,
    key: &PairKey,
    d: &Deadline<'_>,
) -> Result<Transport, SecureError> {
    let r = Responder::new(key)?;
    let msg = read_handshake(s, d)?;
    let (reply, t) = r.accept(&msg)?;
    write_handshake(s, &reply)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{key, pair};
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_wrong_key_fails_the_handshake_at_the_responder() {
        let (i, r, _c, _s) = pair(key(1), key(2));
        assert!(matches!(r, Err(SecureError::BadPeer)), "{r:?}");
        // The responder wrote nothing and closed.
        assert!(
            matches!(i, Err(SecureError::Closed | SecureError::Io(_))),
            "{i:?}"
        );
    }

    #[test]
    fn an_idle_or_trickling_peer_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_millis(5)))
            .expect("timeout");
        let t = std::thread::spawn(move || {
            let _ = c.write_all(&(HANDSHAKE_LEN as u16).to_le_bytes());
            for _ in 0..20 {
                if c.write_all(&[0x30]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let d = Deadline {
            at: Instant::now() + Duration::from_millis(150),
            stop: None,
        };
        let start = Instant::now();
        let r = respond(&mut s, &key(1), &d);
        assert!(matches!(r, Err(SecureError::Timeout(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(1));
        drop(s);
        let _ = t.join();
    }
}
