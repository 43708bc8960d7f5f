//! The NBD protocol, server side: the fixed newstyle handshake and the transmission phase
//! with simple replies, over any byte stream (a Unix socket in use, a socketpair in tests).
//!
//! What is spoken (the protocol is `doc/proto.md` of the NBD project):
//!
//! - handshake: `NBDMAGIC`, `IHAVEOPT`, flags `FIXED_NEWSTYLE | NO_ZEROES`; options
//!   `EXPORT_NAME`, `GO` and `INFO` (with `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`),
//!   `LIST`, `ABORT`; any other option is answered `NBD_REP_ERR_UNSUP` and the client may
//!   go on. One export, whose name is given; the empty name selects it too.
//! - transmission: `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM` and `WRITE_ZEROES` (both
//!   write zeros, so the range reads as zeros afterwards and the zeros replicate like any
//!   write), `DISC`. A request the server cannot carry out — a range past the export's
//!   end, a length over [`MAX_REQUEST`], an unknown command — gets an error reply
//!   (`EINVAL`, `ENOSPC`, `EOVERFLOW`; a range that is not whole 512-byte sectors counts
//!   as out of range) and the connection goes on; a request with a bad
//!   magic or a stream that ends inside a request or option ends the connection with an
//!   error naming it.
//!
//! The crate `nbd` (0.3) was the candidate library: it answers `NBD_OPT_GO` with
//! `ERR_UNSUP`, closes the connection on an unknown command, does not check ranges and
//! hands writes to its storage in 64 KiB pieces, so a write could not be kept whole for
//! its checkpoint. This module is the part of the protocol Castor needs, checked.

use std::io::{self, Read, Write};

/// `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the handshake's second magic and every option's.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// An option reply's magic.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// A transmission request's magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// A simple reply's magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after `EXPORT_NAME`'s answer.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Option: select an export by name and go to transmission (no reply on success).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and go to transmission.
pub const OPT_GO: u32 = 7;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: the option is not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// Option reply: the option's data is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// Option reply: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

/// Information type: the export's size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: flags are present.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: `FLUSH` may be sent.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `FUA` may be set.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `TRIM` may be sent.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `WRITE_ZEROES` may be sent.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The transmission flags Castor's export has.
pub const TFLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;

/// Command flag: force unit access (the write is durable before its reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (done as a write of zeros).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeros.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Error reply: invalid argument (a read past the end, an unknown command).
pub const EINVAL: u32 = 22;
/// Error reply: I/O error.
pub const EIO: u32 = 5;
/// Error reply: no space (a write past the end).
pub const ENOSPC: u32 = 28;
/// Error reply: the request is too large.
pub const EOVERFLOW: u32 = 75;

/// Requests must be whole sectors: Castor's disk records are (a request that is not gets
/// `EINVAL` or `ENOSPC`, as one out of range).
pub const SECTOR: u64 = 512;
/// The largest read or write one request may carry (32 MiB, as the NBD reference server).
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest option data accepted during the handshake.
pub const MAX_OPTION: u32 = 64 << 10;
/// The block size advertised: minimum, preferred, maximum.
pub const BLOCK_SIZES: (u32, u32, u32) = (512, 4096, MAX_REQUEST);

/// Errors of one connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream ended inside a handshake message or a request.
    #[error("the client's stream ended inside {0}")]
    Truncated(&'static str),
    /// Reading or writing the stream failed.
    #[error("NBD connection {0}")]
    Io(&'static str, #[source] io::Error),
    /// The client does not speak fixed newstyle.
    #[error("the client's handshake flags {0:#x} lack FIXED_NEWSTYLE or carry unknown bits")]
    ClientFlags(u32),
    /// An option without `IHAVEOPT`.
    #[error("an option with magic {0:#018x}, not IHAVEOPT")]
    OptionMagic(u64),
    /// An option's data is over [`MAX_OPTION`].
    #[error("option {option} carries {len} bytes (at most {MAX_OPTION})")]
    OptionTooLong {
        /// The option.
        option: u32,
        /// Its length.
        len: u32,
    },
    /// `EXPORT_NAME` named an export this server does not have (the protocol has no error
    /// reply for it: the connection is closed).
    #[error("the client asked for export {0:?}, which is not served here")]
    UnknownExport(String),
    /// A request without the request magic.
    #[error("a request with magic {0:#010x}, not the NBD request magic")]
    RequestMagic(u32),
}

/// How a connection ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client aborted the handshake (`NBD_OPT_ABORT`), or closed it after a `LIST`.
    Aborted,
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The stream ended between requests without `NBD_CMD_DISC`.
    Closed,
}

/// What a transmission request asks of the export. The implementor checks nothing: the
/// protocol has checked the range against [`Export::size`] first. A write's reply is sent
/// only after [`Export::write`] returns, so a write the client saw completed is one the
/// export has taken in.
pub trait Export {
    /// The export's size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from byte `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at byte `offset`; durable before returning when `fua`.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()>;
    /// Write `len` zero bytes at `offset` (`TRIM`, `WRITE_ZEROES`).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
}

/// Read exactly `buf.len()` bytes; a stream that ends first is [`ProtoError::Truncated`]
/// naming `what`.
fn read_all(s: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), ProtoError> {
    s.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Truncated(what)
        } else {
            ProtoError::Io("read", e)
        }
    })
}

fn send(s: &mut impl Write, bytes: &[u8]) -> Result<(), ProtoError> {
    s.write_all(bytes).map_err(|e| ProtoError::Io("write", e))
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// An option reply: magic, option, type, length, data.
fn opt_reply(s: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> Result<(), ProtoError> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    // Option data is at most MAX_OPTION plus a few bytes: it fits a u32.
    m.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.extend_from_slice(data);
    send(s, &m)
}

/// Serve one connection: the handshake, then transmission until the client disconnects.
/// `name` is the export's name (the empty name also selects it).
pub fn serve<S: Read + Write>(
    s: &mut S,
    name: &str,
    export: &dyn Export,
) -> Result<End, ProtoError> {
    match handshake(s, name, export)? {
        Some(()) => transmission(s, export),
        None => Ok(End::Aborted),
    }
}

/// The fixed newstyle handshake. `Some` when the client chose the export and transmission
/// begins; `None` when it aborted (or closed the stream between options).
pub fn handshake<S: Read + Write>(
    s: &mut S,
    name: &str,
    export: &dyn Export,
) -> Result<Option<()>, ProtoError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(s, &hello)?;
    s.flush().map_err(|e| ProtoError::Io("write", e))?;
    let mut b = [0u8; 4];
    read_all(s, &mut b, "the client's flags")?;
    let client = u32::from_be_bytes(b);
    if client & FLAG_C_FIXED_NEWSTYLE == 0
        || client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0
    {
        return Err(ProtoError::ClientFlags(client));
    }
    let zeroes = client & FLAG_C_NO_ZEROES == 0;
    loop {
        let mut head = [0u8; 16];
        match s.read(&mut head[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(ProtoError::Io("read", e)),
        }
        read_all(s, &mut head[1..], "an option's header")?;
        let magic = be_u64(&head[0..8]);
        if magic != IHAVEOPT {
            return Err(ProtoError::OptionMagic(magic));
        }
        let option = be_u32(&head[8..12]);
        let len = be_u32(&head[12..16]);
        if len > MAX_OPTION {
            return Err(ProtoError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        read_all(s, &mut data, "an option's data")?;
        match option {
            OPT_EXPORT_NAME => {
                let asked = String::from_utf8_lossy(&data);
                if !asked.is_empty() && asked != name {
                    return Err(ProtoError::UnknownExport(asked.into_owned()));
                }
                let mut m = Vec::with_capacity(10 + 124);
                m.extend_from_slice(&export.size().to_be_bytes());
                m.extend_from_slice(&TFLAGS.to_be_bytes());
                if zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                send(s, &m)?;
                s.flush().map_err(|e| ProtoError::Io("write", e))?;
                return Ok(Some(()));
            }
            OPT_ABORT => {
                // The client may already have closed its end: a failed ack is no error.
                let _ = opt_reply(s, option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(s, option, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
                d.extend_from_slice(name.as_bytes());
                opt_reply(s, option, REP_SERVER, &d)?;
                opt_reply(s, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                if let Err(kind) = info_request(&data, name) {
                    let why: &[u8] = if kind == REP_ERR_UNKNOWN {
                        b"no such export"
                    } else {
                        b"malformed INFO/GO request"
                    };
                    opt_reply(s, option, kind, why)?;
                    continue;
                }
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&export.size().to_be_bytes());
                d.extend_from_slice(&TFLAGS.to_be_bytes());
                opt_reply(s, option, REP_INFO, &d)?;
                let mut d = Vec::with_capacity(14);
                d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                d.extend_from_slice(&BLOCK_SIZES.0.to_be_bytes());
                d.extend_from_slice(&BLOCK_SIZES.1.to_be_bytes());
                d.extend_from_slice(&BLOCK_SIZES.2.to_be_bytes());
                opt_reply(s, option, REP_INFO, &d)?;
                opt_reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    s.flush().map_err(|e| ProtoError::Io("write", e))?;
                    return Ok(Some(()));
                }
            }
            _ => opt_reply(s, option, REP_ERR_UNSUP, b"option not supported")?,
        }
        s.flush().map_err(|e| ProtoError::Io("write", e))?;
    }
}

/// Check an `INFO`/`GO` option's data (`u32 name length`, name, `u16 count`, count ×
/// `u16` information types) against the export `name`: the error reply type otherwise.
fn info_request(data: &[u8], name: &str) -> Result<(), u32> {
    if data.len() < 6 {
        return Err(REP_ERR_INVALID);
    }
    let nlen = be_u32(data) as usize;
    let Some(rest) = data.get(4..).and_then(|r| r.get(nlen..)) else {
        return Err(REP_ERR_INVALID);
    };
    if rest.len() < 2 || rest.len() != 2 + 2 * usize::from(be_u16(rest)) {
        return Err(REP_ERR_INVALID);
    }
    let asked = &data[4..4 + nlen];
    if !asked.is_empty() && asked != name.as_bytes() {
        return Err(REP_ERR_UNKNOWN);
    }
    Ok(())
}

/// A simple reply's header.
fn reply_head(error: u32, handle: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h
}

/// The transmission phase: requests until `DISC` or the end of the stream.
pub fn transmission<S: Read + Write>(s: &mut S, export: &dyn Export) -> Result<End, ProtoError> {
    let size = export.size();
    loop {
        let mut r = [0u8; 28];
        match s.read(&mut r[..1]) {
            Ok(0) => return Ok(End::Closed),
            Ok(_) => {}
            Err(e) => return Err(ProtoError::Io("read", e)),
        }
        read_all(s, &mut r[1..], "a request's header")?;
        let magic = be_u32(&r[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::RequestMagic(magic));
        }
        let flags = be_u16(&r[4..6]);
        let cmd = be_u16(&r[6..8]);
        let handle = be_u64(&r[8..16]);
        let offset = be_u64(&r[16..24]);
        let len = be_u32(&r[24..28]);
        let fua = flags & CMD_FLAG_FUA != 0;
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size)
            && offset.is_multiple_of(SECTOR)
            && u64::from(len).is_multiple_of(SECTOR);
        match cmd {
            CMD_READ => {
                let error = if len > MAX_REQUEST {
                    EOVERFLOW
                } else if !in_range {
                    EINVAL
                } else {
                    0
                };
                if error != 0 {
                    send(s, &reply_head(error, handle))?;
                } else {
                    let mut buf = vec![0u8; 16 + len as usize];
                    match export.read(offset, &mut buf[16..]) {
                        Ok(()) => {
                            buf[..16].copy_from_slice(&reply_head(0, handle));
                            send(s, &buf)?;
                        }
                        Err(e) => {
                            tracing::error!(offset, len, error = %e, "NBD read of the image failed");
                            send(s, &reply_head(EIO, handle))?;
                        }
                    }
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    discard(s, u64::from(len))?;
                    send(s, &reply_head(EOVERFLOW, handle))?;
                } else {
                    let mut data = vec![0u8; len as usize];
                    read_all(s, &mut data, "a write's data")?;
                    if in_range {
                        let error = done(export.write(offset, data, fua), "write", offset);
                        send(s, &reply_head(error, handle))?;
                    } else {
                        send(s, &reply_head(ENOSPC, handle))?;
                    }
                }
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if in_range {
                    let error = done(
                        export.write_zeroes(offset, u64::from(len), fua),
                        "write zeros",
                        offset,
                    );
                    send(s, &reply_head(error, handle))?;
                } else {
                    send(s, &reply_head(ENOSPC, handle))?;
                }
            }
            CMD_FLUSH => {
                let error = done(export.flush(), "flush", offset);
                send(s, &reply_head(error, handle))?;
            }
            CMD_DISC => return Ok(End::Disconnected),
            other => {
                tracing::warn!(command = other, "NBD: unknown command answered EINVAL");
                send(s, &reply_head(EINVAL, handle))?;
            }
        }
        s.flush().map_err(|e| ProtoError::Io("write", e))?;
    }
}

/// The reply's error for an export operation's result (an I/O error is logged: the
/// client sees only EIO).
fn done(r: io::Result<()>, op: &'static str, offset: u64) -> u32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(op, offset, error = %e, "NBD: the image failed");
            EIO
        }
    }
}

/// Read and drop `len` bytes of a request the server refuses (its payload follows it).
fn discard(s: &mut impl Read, len: u64) -> Result<(), ProtoError> {
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        read_all(s, &mut buf[..n], "a refused write's data")?;
        left -= n as u64;
    }
    Ok(())
}
