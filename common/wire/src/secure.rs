//! The secure replication channel: a Noise session keyed by a pre-shared *pair key*.
//!
//! Pattern `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` (see `docs/SECURITY.md` for why NNpsk0):
//! two handshake messages (`-> psk, e` and `<- e, ee`), after which each direction has its
//! own ChaCha20-Poly1305 key and a nonce that counts messages. Only a peer holding the
//! pair key can produce a first message the responder accepts, or a second message the
//! initiator accepts, so a finished handshake proves to both sides that the other holds
//! the key. The ephemeral Diffie-Hellman gives each session fresh keys.
//!
//! On the wire every Noise message, handshake and transport alike, is
//! `u16 LE length | message` with the message at most [`MAX_MESSAGE`] bytes (a 16-byte
//! tag included). [`SecureStream`], [`SecureReader`] and [`SecureWriter`] carry an ordinary
//! byte stream over those messages: a write is cut into messages of at most
//! [`MAX_PAYLOAD`] bytes, a read hands out the decrypted bytes in order. A message that
//! was altered, replayed, reordered, dropped or made with another key fails to decrypt
//! (the receiver's nonce is the count of messages it has accepted), and the reader fails
//! for good: the caller closes the connection.
//!
//! [`PairKey`] is the 32-byte key, kept in a file of 64 hex digits that only its owner may
//! read ([`PairKey::read`] refuses anything else); [`PairKey::write_new`] creates one.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use snow::StatelessTransportState;

/// The Noise protocol name.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash: both sides must speak this channel version.
pub const PROLOGUE: &[u8] = b"castor replication channel v1";
/// Largest Noise message (tag included).
pub const MAX_MESSAGE: usize = 65535;
/// ChaCha20-Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Most plaintext bytes per transport message.
pub const MAX_PAYLOAD: usize = MAX_MESSAGE - TAG_LEN;
/// Bytes in a pair key.
pub const KEY_LEN: usize = 32;
/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the socket at a time (ciphertext here; the frame reader uses
/// the same size).
pub const READ_CHUNK: usize = 256 << 10;

/// Errors of the key file and of the Noise handshake.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The key file cannot be read.
    #[error("cannot read the pair key {path}")]
    KeyRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The key file can be read by its group or by others.
    #[error(
        "pair key {path} has mode {mode:04o}: group and others must have no access \
         (chmod 600 {path})"
    )]
    KeyMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold exactly 64 hex digits (and an optional newline).
    #[error("pair key {path} is not a key: {problem} (expected 64 hex digits)")]
    KeyFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
    /// `keygen` refuses to overwrite a key.
    #[error("{path} already exists; not overwriting a pair key")]
    KeyExists {
        /// The file.
        path: PathBuf,
    },
    /// The key file cannot be written.
    #[error("cannot write the pair key {path}")]
    KeyWrite {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No randomness for a new key.
    #[error("cannot read random bytes from /dev/urandom")]
    Random(#[source] io::Error),
    /// The Noise library refused a step (bad state, bad parameters).
    #[error("noise: {0}")]
    Noise(snow::Error),
    /// The peer's handshake message did not authenticate: it does not hold the pair key
    /// (or it is not a Castor peer, or it runs without encryption).
    #[error("the peer does not hold the pair key (its handshake message fails to authenticate)")]
    BadPeer,
    /// A handshake message of an impossible length.
    #[error("handshake message of {0} bytes (expected {expected})", expected = HANDSHAKE_LEN)]
    BadLength(usize),
    /// The handshake did not complete in time.
    #[error("the handshake did not complete within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection mid-handshake.
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// The socket failed during the handshake.
    #[error("the connection failed during the handshake")]
    Io(#[source] io::Error),
    /// The handshake was abandoned because the process is stopping.
    #[error("stopped during the handshake")]
    Stopped,
}

/// Both NNpsk0 handshake messages are an ephemeral key and an empty payload's tag.
pub const HANDSHAKE_LEN: usize = 32 + TAG_LEN;

/// The secret both daemons of a pair hold.
#[derive(Clone, PartialEq, Eq)]
pub struct PairKey([u8; KEY_LEN]);

impl fmt::Debug for PairKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairKey(..)")
    }
}

impl PairKey {
    /// A key from its bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        Self(b)
    }

    /// A new random key (from the kernel's CSPRNG).
    pub fn generate() -> Result<Self, SecureError> {
        let mut b = [0u8; KEY_LEN];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(SecureError::Random)?;
        Ok(Self(b))
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse 64 hex digits (surrounding whitespace ignored); `path` names the source in
    /// the error.
    pub fn parse(text: &str, path: &Path) -> Result<Self, SecureError> {
        let bad = |problem| SecureError::KeyFormat {
            path: path.to_path_buf(),
            problem,
        };
        let t = text.trim();
        if t.len() != 2 * KEY_LEN {
            return Err(bad(if t.is_empty() {
                "it is empty"
            } else {
                "wrong length"
            }));
        }
        let mut b = [0u8; KEY_LEN];
        for (i, pair) in t.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or_else(|| bad("a character is not a hex digit"))?;
            let lo = hex_digit(pair[1]).ok_or_else(|| bad("a character is not a hex digit"))?;
            b[i] = hi << 4 | lo;
        }
        Ok(Self(b))
    }

    /// Read a key file. Refused: a file its group or others may access (mode & 0o077), a
    /// file that is not 64 hex digits.
    pub fn read(path: &Path) -> Result<Self, SecureError> {
        let read_err = |source| SecureError::KeyRead {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(read_err)?;
        let mode = f.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecureError::KeyMode {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        // A key file is 65 bytes; read a little more so a longer file is seen as one.
        (&mut f)
            .take(4096)
            .read_to_string(&mut text)
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => SecureError::KeyFormat {
                    path: path.to_path_buf(),
                    problem: "it is not text",
                },
                _ => read_err(e),
            })?;
        Self::parse(&text, path)
    }

    /// Write this key to a new file with mode 0600; an existing file is never overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), SecureError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => SecureError::KeyExists {
                    path: path.to_path_buf(),
                },
                _ => SecureError::KeyWrite {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let write_err = |source| SecureError::KeyWrite {
            path: path.to_path_buf(),
            source,
        };
        // The umask cannot widen 0600, but a narrower one could drop the owner's bits.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write_err)?;
        writeln!(f, "{}", self.to_hex()).map_err(write_err)?;
        f.sync_all().map_err(write_err)
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn builder(key: &PairKey) -> Result<snow::Builder<'_>, SecureError> {
    let params = NOISE_PATTERN
        .parse()
        .map_err(|e: snow::Error| SecureError::Noise(e))?;
    snow::Builder::new(params)
        .prologue(PROLOGUE)
        .and_then(|b| b.psk(0, &key.0))
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

/// The keys of a finished handshake; [`Transport::stream`] or [`Transport::split`] put
/// them to work.
#[derive(Debug, Clone)]
pub struct Transport {
    state: Arc<StatelessTransportState>,
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
        Ok(Transport {
            state: Arc::new(state),
        })
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
        Ok((
            reply,
            Transport {
                state: Arc::new(state),
            },
        ))
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

impl Transport {
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
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn key(b: u8) -> PairKey {
        PairKey::from_bytes([b; KEY_LEN])
    }

    /// A connected pair of sockets with the handshake run (responder in a thread).
    fn pair(
        ik: PairKey,
        rk: PairKey,
    ) -> (
        Result<Transport, SecureError>,
        Result<Transport, SecureError>,
        TcpStream,
        TcpStream,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let r = respond(&mut s, &rk, &Deadline::handshake());
            // A refused peer sees the connection close at once.
            if r.is_err() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            (r, s)
        });
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        let i = initiate(&mut c, &ik, &Deadline::handshake());
        let (r, s) = t.join().expect("responder");
        (i, r, c, s)
    }

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

    #[test]
    fn key_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("castor-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("pair.key");
        let k = PairKey::generate().expect("random");
        k.write_new(&p).expect("write");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(PairKey::read(&p).expect("read"), k);
        let e = k.write_new(&p).expect_err("no overwrite");
        assert!(matches!(e, SecureError::KeyExists { .. }), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = PairKey::read(&p).expect_err("0644");
        assert_eq!(
            e.to_string(),
            format!(
                "pair key {0} has mode 0644: group and others must have no access (chmod 600 {0})",
                p.display()
            )
        );
        let short = dir.join("short.key");
        std::fs::write(&short, "abcd\n").expect("write");
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = PairKey::read(&short).expect_err("short");
        assert!(e.to_string().contains("wrong length"), "{e}");
        std::fs::write(&short, "zz".repeat(32)).expect("write");
        let e = PairKey::read(&short).expect_err("not hex");
        assert!(e.to_string().contains("not a hex digit"), "{e}");
        assert_eq!(format!("{k:?}"), "PairKey(..)");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
