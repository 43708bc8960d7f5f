//! Frames: the unit of every Castor byte stream — the link between primary and backup
//! (session messages and epochs, in both directions) and the output sink.
//!
//! ```text
//! frame = u32 LE length of (type + body) | u8 type | body
//! ```
//!
//! [`FrameType`] names every type byte that exists; [`put_frame`] is the one place a
//! frame is written, [`split_frame`] the one place one is cut off a buffer, and
//! [`FrameReader`] the one incremental reader that buffers bytes from a socket (or the
//! secure channel) and hands out whole frames, each at most a bounded length.
//!
//! The reader keeps the type byte as received ([`Frame::ty`]): what an unknown type means
//! (an epoch rejected, a session refused) is the receiver's to decide, through
//! [`Frame::kind`].

use crate::secure::READ_CHUNK;
use std::fmt;
use std::io::{self, Read};

/// Bytes before a frame's body: the `u32` length and the type byte.
pub const FRAME_HEADER: usize = 5;
/// Largest frame accepted on the link (type + body): an epoch's Pages or State frame.
pub const MAX_FRAME: usize = 8 << 20;

/// Every frame type on a Castor stream, with its byte on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Epoch: header (version, epoch, mode, block size, record count).
    Header = 1,
    /// Epoch: page records.
    Pages = 2,
    /// Epoch: the vCPU/device state blob (makes the epoch a checkpoint).
    State = 3,
    /// Epoch: the commit trailer (record count, byte count, digest).
    Trailer = 4,
    /// Epoch: digest of the whole guest memory, and of the disk when the session has one
    /// (verification mode).
    Verify = 5,
    /// Epoch: disk records (the sectors the guest wrote during the epoch).
    Disk = 6,
    /// Primary → backup: session parameters.
    Hello = 16,
    /// Backup → primary: accepted; the first epoch it expects and its detection timeout.
    Welcome = 17,
    /// Backup → primary: refused, with a reason.
    Refuse = 18,
    /// Backup → primary: epoch committed.
    Ack = 19,
    /// Primary → backup: still alive.
    Heartbeat = 20,
    /// Primary → backup: protection ends on purpose and the guest goes on without this
    /// backup; do not take over (UTF-8 reason).
    StandDown = 21,
    /// Backup → primary: the backup failed and ends the session (UTF-8 reason).
    Abort = 22,
    /// Primary → backup: initial disk sync, the fingerprints of the replica's chunks it
    /// asks for (`ha_wire::disksync::SumRequest`).
    SumRequest = 23,
    /// Backup → primary: initial disk sync, the fingerprints asked for
    /// (`ha_wire::disksync::Sums`).
    Sums = 24,
    /// Primary → backup: planned switchover. Every checkpoint sent is acknowledged and the
    /// guest is stopped here: take over from the last one now (UTF-8 reason).
    Handover = 25,
    /// Primary → backup: memory resync, the fingerprints of the chunks of the image the
    /// backup already holds that it asks for (`ha_wire::disksync::SumRequest`).
    MemSumRequest = 26,
    /// Backup → primary: memory resync, the fingerprints asked for
    /// (`ha_wire::disksync::Sums`).
    MemSums = 27,
    /// Daemon → output sink: a released output record.
    Output = 32,
}

impl FrameType {
    /// Every frame type, in byte order.
    pub const ALL: [FrameType; 19] = [
        FrameType::Header,
        FrameType::Pages,
        FrameType::State,
        FrameType::Trailer,
        FrameType::Verify,
        FrameType::Disk,
        FrameType::Hello,
        FrameType::Welcome,
        FrameType::Refuse,
        FrameType::Ack,
        FrameType::Heartbeat,
        FrameType::StandDown,
        FrameType::Abort,
        FrameType::SumRequest,
        FrameType::Sums,
        FrameType::Handover,
        FrameType::MemSumRequest,
        FrameType::MemSums,
        FrameType::Output,
    ];

    /// The frame type's name, as the protocol page writes it.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Header => "Header",
            FrameType::Pages => "Pages",
            FrameType::State => "State",
            FrameType::Trailer => "Trailer",
            FrameType::Verify => "Verify",
            FrameType::Disk => "Disk",
            FrameType::Hello => "Hello",
            FrameType::Welcome => "Welcome",
            FrameType::Refuse => "Refuse",
            FrameType::Ack => "Ack",
            FrameType::Heartbeat => "Heartbeat",
            FrameType::StandDown => "Stand-down",
            FrameType::Abort => "Abort",
            FrameType::SumRequest => "SumRequest",
            FrameType::Sums => "Sums",
            FrameType::Handover => "Handover",
            FrameType::MemSumRequest => "MemSumRequest",
            FrameType::MemSums => "MemSums",
            FrameType::Output => "Output",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u8)
    }
}

impl From<FrameType> for u8 {
    fn from(t: FrameType) -> u8 {
        t as u8
    }
}

impl TryFrom<u8> for FrameType {
    type Error = FrameError;

    fn try_from(b: u8) -> Result<Self, FrameError> {
        FrameType::ALL
            .into_iter()
            .find(|t| *t as u8 == b)
            .ok_or(FrameError::UnknownType(b))
    }
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length prefix of zero: a frame has at least its type byte.
    #[error("zero-length frame")]
    Empty,
    /// A length prefix over the reader's bound.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The length announced.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A type byte that names no frame.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Append one frame (length, type, body).
pub fn put_frame(out: &mut Vec<u8>, ty: FrameType, body: &[u8]) {
    out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    out.push(ty as u8);
    out.extend_from_slice(body);
}

/// One frame split off a buffer: its type byte, its body, and its whole length on the
/// wire.
pub type SplitFrame<'a> = (u8, &'a [u8], usize);

/// Split one frame of at most [`MAX_FRAME`] bytes off the front of `buf`. `Ok(None)`
/// when `buf` does not yet hold a whole frame.
pub fn split_frame(buf: &[u8]) -> Result<Option<SplitFrame<'_>>, FrameError> {
    split_frame_within(buf, MAX_FRAME)
}

/// [`split_frame`] with another bound on the frame's length (type + body).
pub fn split_frame_within(buf: &[u8], max: usize) -> Result<Option<SplitFrame<'_>>, FrameError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let Some(frame) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((frame[0], &frame[1..], 4 + len)))
}

/// One whole frame as received: its type byte and its bytes on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The type byte, as received.
    pub ty: u8,
    /// The frame as received: `u32 length | u8 type | body`.
    pub raw: Vec<u8>,
}

impl Frame {
    /// The frame's body.
    pub fn body(&self) -> &[u8] {
        self.raw.get(FRAME_HEADER..).unwrap_or(&[])
    }

    /// The frame's type; an error naming the byte when it is no known type.
    pub fn kind(&self) -> Result<FrameType, FrameError> {
        FrameType::try_from(self.ty)
    }

    /// Whether the frame is of type `t`.
    pub fn is(&self, t: FrameType) -> bool {
        self.ty == t as u8
    }
}

/// Buffers bytes from a source and hands out whole frames of at most `max` bytes.
///
/// [`FrameReader::next_buffered`] and [`FrameReader::fill`] are the two halves for a
/// caller with its own policy on timeouts (the backup's silence detection);
/// [`FrameReader::read_frame`] blocks until a frame is whole.
#[derive(Debug)]
pub struct FrameReader<R> {
    src: R,
    max: usize,
    /// `buf[start..end]` is received and not handed out yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R> FrameReader<R> {
    /// A reader of frames of at most `max` bytes (type + body) from `src`.
    pub fn new(src: R, max: usize) -> Self {
        Self {
            src,
            max,
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// The source.
    pub fn get_ref(&self) -> &R {
        &self.src
    }

    /// The source, mutably (to write to it, or to replace it before anything was read).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.src
    }

    /// Bytes received and not yet handed out as a frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Split the next whole frame off the bytes already received (no I/O); `Ok(None)`
    /// when they do not hold one yet.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some((ty, _, len)) = split_frame_within(&self.buf[self.start..self.end], self.max)?
        else {
            return Ok(None);
        };
        let raw = self.buf[self.start..self.start + len].to_vec();
        self.start += len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(Frame { ty, raw }))
    }
}

impl<R: Read> FrameReader<R> {
    /// One read from the source into the buffer: the bytes read, 0 at its end. Errors
    /// (timeouts included) are the source's, for the caller to judge.
    pub fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 && self.start * 2 >= self.end {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let chunk = READ_CHUNK.min(self.max.saturating_add(4));
        if self.buf.len() < self.end + chunk {
            self.buf.resize(self.end + chunk, 0);
        }
        let n = self.src.read(&mut self.buf[self.end..self.end + chunk])?;
        self.end += n;
        Ok(n)
    }

    /// Read until a whole frame arrived and return it. A frame error is an
    /// [`io::ErrorKind::InvalidData`] error carrying the [`FrameError`]; the source's end
    /// is [`io::ErrorKind::UnexpectedEof`].
    pub fn read_frame(&mut self) -> io::Result<Frame> {
        loop {
            if let Some(f) = self.next_buffered()? {
                return Ok(f);
            }
            match self.fill() {
                Ok(0) => {
                    let why = if self.buffered() == 0 {
                        "the connection closed"
                    } else {
                        "the connection closed in the middle of a frame"
                    };
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, why));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_converts_both_ways_and_unknown_bytes_are_named() {
        for t in FrameType::ALL {
            assert_eq!(FrameType::try_from(u8::from(t)), Ok(t));
        }
        let known: Vec<u8> = FrameType::ALL.iter().map(|t| *t as u8).collect();
        assert_eq!(
            known,
            [
                1, 2, 3, 4, 5, 6, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 32
            ]
        );
        for b in (0..=u8::MAX).filter(|b| !known.contains(b)) {
            assert_eq!(FrameType::try_from(b), Err(FrameError::UnknownType(b)));
        }
        assert_eq!(
            FrameError::UnknownType(99).to_string(),
            "unknown frame type 99"
        );
        assert_eq!(FrameType::StandDown.to_string(), "Stand-down (21)");
    }

    #[test]
    fn split_needs_a_whole_frame_and_bounds_its_length() {
        let mut out = Vec::new();
        put_frame(&mut out, FrameType::Ack, &7u64.to_le_bytes());
        assert_eq!(out.len(), FRAME_HEADER + 8);
        for cut in 0..out.len() {
            assert_eq!(split_frame(&out[..cut]), Ok(None));
        }
        let (ty, body, n) = split_frame(&out).unwrap().unwrap();
        assert_eq!((ty, body, n), (19, &7u64.to_le_bytes()[..], out.len()));
        assert_eq!(split_frame(&[0, 0, 0, 0, 9]), Err(FrameError::Empty));
        assert_eq!(
            split_frame_within(&out, 8),
            Err(FrameError::TooLarge { len: 9, max: 8 })
        );
    }

    /// Hands out its bytes a few at a time.
    struct Trickle(Vec<u8>, usize);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn the_reader_yields_whole_frames_in_order_then_the_end() {
        let mut out = Vec::new();
        put_frame(&mut out, FrameType::Heartbeat, &[]);
        put_frame(&mut out, FrameType::Pages, &[7; 1000]);
        put_frame(&mut out, FrameType::Trailer, &[1, 2, 3]);
        for step in [1, 3, 700, 5000] {
            let mut r = FrameReader::new(Trickle(out.clone(), step), MAX_FRAME);
            let f = r.read_frame().unwrap();
            assert_eq!((f.kind(), f.body()), (Ok(FrameType::Heartbeat), &[][..]));
            let f = r.read_frame().unwrap();
            assert!(f.is(FrameType::Pages) && f.body() == [7; 1000]);
            let f = r.read_frame().unwrap();
            assert_eq!(f.raw, out[out.len() - 8..]);
            let e = r.read_frame().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "step {step}");
        }
        let mut r = FrameReader::new(Trickle(out[..20].to_vec(), 64), MAX_FRAME);
        r.read_frame().unwrap();
        let e = r.read_frame().unwrap_err();
        assert_eq!(
            e.to_string(),
            "the connection closed in the middle of a frame"
        );
    }

    #[test]
    fn the_reader_refuses_a_frame_over_its_bound() {
        let mut out = Vec::new();
        put_frame(&mut out, FrameType::Refuse, &[b'x'; 100]);
        let mut r = FrameReader::new(&out[..], 64);
        let e = r.read_frame().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.get_ref().and_then(|e| e.downcast_ref::<FrameError>()),
            Some(&FrameError::TooLarge { len: 101, max: 64 })
        );
    }
}
