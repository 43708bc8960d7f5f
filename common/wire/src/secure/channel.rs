//! The transport: an ordinary byte stream over Noise transport messages. A write is cut
//! into messages of at most [`MAX_PAYLOAD`] bytes, each `u16 LE length | ciphertext`; a
//! read hands out the decrypted bytes in order. Each direction counts its messages and
//! uses the count as the nonce, so a message that was altered, replayed, reordered or
//! dropped fails to decrypt, and the reader fails for good.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;

use snow::StatelessTransportState;

use super::{MAX_PAYLOAD, TAG_LEN};

/// Bytes read from the socket at a time (ciphertext here; the frame reader uses
/// the same size).
pub const READ_CHUNK: usize = 256 << 10;

/// The keys of a finished handshake; [`Transport::stream`] or [`Transport::split`] put
/// them to work.
#[derive(Debug, Clone)]
pub struct Transport {
    state: Arc<StatelessTransportState>,
}

impl Transport {
    /// The keys of a finished handshake.
    pub(super) fn new(state: StatelessTransportState) -> Self {
        Self {
            state: Arc::new(state),
        }
    }

    /// A stream over one object that reads and writes.
    pub fn stream<S>(self, inner: S) -> SecureStream<S> {
        SecureStream {
            inner,
            open: Opener::new(self.state.clone()),
            seal: Sealer::new(self.state),
        }
    }

    /// A reader and a writer, for two threads (e.g. two clones of one socket).
    pub fn split<R, W>(self, reader: R, writer: W) -> (SecureReader<R>, SecureWriter<W>) {
        (
            SecureReader {
                inner: reader,
                open: Opener::new(self.state.clone()),
            },
            SecureWriter {
                inner: writer,
                seal: Sealer::new(self.state),
            },
        )
    }
}

/// The receiving half's state: ciphertext not yet whole, plaintext not yet handed out.
struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    /// Ciphertext buffer; `raw[raw_at..raw_end]` is received and not decrypted yet.
    raw: Vec<u8>,
    raw_at: usize,
    raw_end: usize,
    plain: Vec<u8>,
    plain_at: usize,
    failed: Option<String>,
}

/// The error a reader returns once a message failed to authenticate.
fn tampered(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

impl Opener {
    fn new(state: Arc<StatelessTransportState>) -> Self {
        Self {
            state,
            nonce: 0,
            raw: Vec::new(),
            raw_at: 0,
            raw_end: 0,
            plain: Vec::with_capacity(MAX_PAYLOAD),
            plain_at: 0,
            failed: None,
        }
    }

    /// Decrypt the first whole message of `raw`, if there is one: into `direct` when it
    /// fits, else into `plain`. Returns the bytes put into `direct`, or `None` when there
    /// is no whole message.
    fn open_one(&mut self, direct: &mut [u8]) -> io::Result<Option<usize>> {
        let pending = &self.raw[self.raw_at..self.raw_end];
        let Some(len) = pending.get(..2) else {
            return Ok(None);
        };
        let n = usize::from(u16::from_le_bytes([len[0], len[1]]));
        if n < TAG_LEN {
            return Err(self.fail(format!("encrypted message of {n} bytes is too short")));
        }
        let Some(msg) = pending.get(2..2 + n) else {
            return Ok(None);
        };
        let res = if direct.len() >= n - TAG_LEN {
            self.state.read_message(self.nonce, msg, direct).map(Some)
        } else {
            self.plain.resize(n - TAG_LEN, 0);
            self.plain_at = 0;
            self.state
                .read_message(self.nonce, msg, &mut self.plain)
                .map(|got| {
                    self.plain.truncate(got);
                    None
                })
        };
        match res {
            Ok(into_direct) => {
                self.nonce += 1;
                self.raw_at += 2 + n;
                Ok(Some(into_direct.unwrap_or(0)))
            }
            Err(_) => {
                self.plain.clear();
                Err(self.fail(format!(
                    "encrypted message {} fails to authenticate: altered, replayed, \
                     reordered or dropped on the way",
                    self.nonce
                )))
            }
        }
    }

    fn fail(&mut self, why: String) -> io::Error {
        let e = tampered(&why);
        self.failed = Some(why);
        e
    }

    fn read<R: Read>(&mut self, r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = &self.failed {
            return Err(tampered(why));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.plain_at < self.plain.len() {
                let n = (self.plain.len() - self.plain_at).min(buf.len());
                buf[..n].copy_from_slice(&self.plain[self.plain_at..self.plain_at + n]);
                self.plain_at += n;
                return Ok(n);
            }
            match self.open_one(buf)? {
                Some(0) => continue, // into `plain`, or an empty message
                Some(n) => return Ok(n),
                None => {}
            }
            // No whole message buffered: move the rest (less than one message) to the
            // front and read more after it.
            self.raw.copy_within(self.raw_at..self.raw_end, 0);
            self.raw_end -= self.raw_at;
            self.raw_at = 0;
            if self.raw.len() < READ_CHUNK {
                self.raw.resize(READ_CHUNK, 0);
            }
            let got = r.read(&mut self.raw[self.raw_end..])?;
            self.raw_end += got;
            match got {
                0 if self.raw_end == 0 => return Ok(0),
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of an encrypted message",
                    ));
                }
                _ => {}
            }
        }
    }
}

/// The sending half's state.
struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    out: Vec<u8>,
}

impl Sealer {
    fn new(state: Arc<StatelessTransportState>) -> Self {
        Self {
            state,
            nonce: 0,
            out: Vec::new(),
        }
    }

    /// Encrypt all of `buf` (as many messages as it takes) and write them in one go.
    fn write_all<W: Write>(&mut self, w: &mut W, buf: &[u8]) -> io::Result<()> {
        self.out.clear();
        for chunk in buf.chunks(MAX_PAYLOAD) {
            let at = self.out.len();
            let n = chunk.len() + TAG_LEN;
            self.out.resize(at + 2 + n, 0);
            self.out[at..at + 2].copy_from_slice(&(n as u16).to_le_bytes());
            self.state
                .write_message(self.nonce, chunk, &mut self.out[at + 2..])
                .map_err(|e| io::Error::other(format!("noise encrypt: {e}")))?;
            self.nonce += 1;
        }
        let res = w.write_all(&self.out);
        if self.out.capacity() > 16 << 20 {
            self.out = Vec::new();
        }
        res
    }
}

/// Both directions of a secure channel over one `S` (used from one thread).
pub struct SecureStream<S> {
    inner: S,
    open: Opener,
    seal: Sealer,
}

impl<S> fmt::Debug for SecureStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureStream")
            .field("sent", &self.seal.nonce)
            .field("received", &self.open.nonce)
            .finish_non_exhaustive()
    }
}

impl<S> SecureStream<S> {
    /// The underlying stream (for timeouts and shutdown; never read or write it).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Read> Read for SecureStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.open.read(&mut self.inner, buf)
    }
}

impl<S: Write> Write for SecureStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MAX_PAYLOAD);
        self.seal.write_all(&mut self.inner, &buf[..n])?;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.seal.write_all(&mut self.inner, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The receiving half of a split channel.
pub struct SecureReader<R> {
    inner: R,
    open: Opener,
}

impl<R> fmt::Debug for SecureReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureReader")
            .field("received", &self.open.nonce)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Read for SecureReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.open.read(&mut self.inner, buf)
    }
}

/// The sending half of a split channel.
pub struct SecureWriter<W> {
    inner: W,
    seal: Sealer,
}

impl<W> fmt::Debug for SecureWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureWriter")
            .field("sent", &self.seal.nonce)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Write for SecureWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MAX_PAYLOAD);
        self.seal.write_all(&mut self.inner, &buf[..n])?;
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.seal.write_all(&mut self.inner, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{key, pair};
    use super::*;

    #[test]
    fn bytes_cross_in_order_in_both_directions() {
        let (i, r, c, s) = pair(key(1), key(1));
        let (i, r) = (i.expect("initiator"), r.expect("responder"));
        let (mut rd, mut wr) = i.split(c.try_clone().expect("clone"), c);
        let mut back = r.stream(s);
        let big: Vec<u8> = (0..(3 * MAX_PAYLOAD + 77))
            .map(|i| (i % 251) as u8)
            .collect();
        wr.write_all(&big).expect("write");
        wr.write_all(b"tail").expect("write");
        let mut got = vec![0u8; big.len() + 4];
        back.read_exact(&mut got).expect("read");
        assert_eq!(&got[..big.len()], &big[..]);
        assert_eq!(&got[big.len()..], b"tail");
        back.write_all(b"ack").expect("write back");
        let mut a = [0u8; 3];
        rd.read_exact(&mut a).expect("read back");
        assert_eq!(&a, b"ack");
        drop(wr);
        drop(rd);
        let mut rest = Vec::new();
        assert_eq!(back.read_to_end(&mut rest).expect("eof"), 0);
    }

    /// The ciphertext of `msgs` as sent, and a fresh reader of it.
    fn sealed(msgs: &[&[u8]]) -> (Vec<u8>, Transport) {
        let (i, r, _c, _s) = pair(key(3), key(3));
        let (i, r) = (i.expect("initiator"), r.expect("responder"));
        let mut out = Vec::new();
        {
            let mut w = i.stream(&mut out);
            for m in msgs {
                w.write_all(m).expect("seal");
            }
        }
        (out, r)
    }

    #[test]
    fn altered_replayed_reordered_ciphertext_is_refused_for_good() {
        let (wire, r) = sealed(&[b"first", b"second"]);
        let one = 2 + 5 + TAG_LEN;
        let read_all = |bytes: Vec<u8>| {
            let mut s = r.clone().stream(io::Cursor::new(bytes));
            let mut got = Vec::new();
            let res = s.read_to_end(&mut got);
            let again = s.read(&mut [0u8; 4]);
            (got, res, again)
        };
        let (got, res, _) = read_all(wire.clone());
        assert_eq!(res.expect("clean stream"), 11);
        assert_eq!(got, b"firstsecond");
        let mut flipped = wire.clone();
        flipped[one + 5] ^= 1;
        let (got, res, again) = read_all(flipped);
        assert_eq!(got, b"first");
        let e = res.expect_err("flipped bit");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("message 1 fails"), "{e}");
        assert!(again.is_err(), "a failed reader stays failed");
        let mut replayed = wire[..one].to_vec();
        replayed.extend_from_slice(&wire[..one]);
        assert!(read_all(replayed).1.is_err());
        let mut reordered = wire[one..].to_vec();
        reordered.extend_from_slice(&wire[..one]);
        let (got, res, _) = read_all(reordered);
        assert!(got.is_empty() && res.is_err());
        let (_, res, _) = read_all(wire[..one + 3].to_vec());
        assert_eq!(res.expect_err("cut").kind(), io::ErrorKind::UnexpectedEof);
    }
}
