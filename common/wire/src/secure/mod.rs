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
//!
//! | module | what |
//! |---|---|
//! | `keyfile` | the pair key and its file: [`PairKey`] |
//! | `handshake` | the Noise handshake: [`Initiator`], [`Responder`], [`initiate`], [`respond`], [`HANDSHAKE_TIMEOUT`] |
//! | `channel` | the transport: [`Transport`], [`SecureStream`], [`SecureReader`], [`SecureWriter`], [`READ_CHUNK`] |
//!
//! Everything is re-exported here: callers name it `ha_wire::secure::X`. [`SecureError`] is
//! the one error type of all three.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

mod channel;
mod handshake;
mod keyfile;

pub use channel::{READ_CHUNK, SecureReader, SecureStream, SecureWriter, Transport};
pub use handshake::{
    Deadline, HANDSHAKE_LEN, HANDSHAKE_TIMEOUT, Initiator, Responder, initiate, respond,
};
pub use keyfile::{KEY_LEN, PairKey};

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

/// What the tests of the channel and the handshake share: keys and a handshaken pair of
/// sockets.
#[cfg(test)]
mod testutil {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    pub(super) fn key(b: u8) -> PairKey {
        PairKey::from_bytes([b; KEY_LEN])
    }

    /// A connected pair of sockets with the handshake run (responder in a thread).
    pub(super) fn pair(
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
}
