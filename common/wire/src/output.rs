//! Released guest output: how a protected guest's "network output" reaches the world, and
//! how the world checks that output commit held.
//!
//! Output records are held by the primary until the checkpoint that produced them is
//! committed at the backup (output commit), then *released*: sent to an output sink over
//! TCP as frames of type [`FrameType::Output`]. After a failover the backup releases the
//! guest's output itself. The backup appends a line `epoch out_head` to its *ack log*
//! before it acknowledges each checkpoint, so a consumer can check that every record it
//! receives from the primary belongs to a committed checkpoint ([`OutputChecker`]).

use crate::frame::{FrameReader, FrameType, MAX_FRAME, put_frame};
use ha_workloads::guest_abi::{OUTPUT_PAYLOAD, OutputRecord};
use std::collections::BTreeMap;
use std::io::{BufRead, Read, Seek, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;

/// Errors of the output path.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The sink cannot be reached or written.
    #[error("output sink {addr}")]
    Sink {
        /// The sink's address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed output frame.
    #[error("malformed output frame: {0}")]
    Malformed(&'static str),
    /// Reading the ack log failed.
    #[error("ack log {path}")]
    AckLog {
        /// The log's path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Who released a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The primary, after the checkpoint's ack.
    Primary = 0,
    /// The backup, after it took over.
    Backup = 1,
}

/// A TCP connection to the output sink.
#[derive(Debug)]
pub struct OutputSink {
    addr: SocketAddr,
    stream: std::io::BufWriter<TcpStream>,
    source: Source,
    buf: Vec<u8>,
}

impl OutputSink {
    /// Connect to the sink at `addr`, releasing as `source`.
    pub fn connect(addr: SocketAddr, source: Source) -> Result<Self, OutputError> {
        let s = TcpStream::connect(addr).map_err(|source| OutputError::Sink { addr, source })?;
        let _ = s.set_nodelay(true);
        Ok(Self {
            addr,
            stream: std::io::BufWriter::new(s),
            source,
            buf: Vec::new(),
        })
    }

    /// Send records to the world, in order, and flush.
    pub fn release(&mut self, records: &[OutputRecord]) -> Result<(), OutputError> {
        for r in records {
            self.buf.clear();
            encode_record(&mut self.buf, self.source, r);
            self.stream
                .write_all(&self.buf)
                .map_err(|source| OutputError::Sink {
                    addr: self.addr,
                    source,
                })?;
        }
        self.stream.flush().map_err(|source| OutputError::Sink {
            addr: self.addr,
            source,
        })
    }
}

/// Append one output frame: `u8 source | u64 seq | payload`.
pub fn encode_record(out: &mut Vec<u8>, source: Source, r: &OutputRecord) {
    let mut body = Vec::with_capacity(9 + r.payload.len());
    body.push(source as u8);
    body.extend_from_slice(&r.seq.to_le_bytes());
    body.extend_from_slice(&r.payload[..r.payload.len().min(OUTPUT_PAYLOAD)]);
    put_frame(out, FrameType::Output, &body);
}

/// Parse an output frame body.
pub fn decode_record(body: &[u8]) -> Result<(Source, OutputRecord), OutputError> {
    if body.len() < 9 || body.len() > 9 + OUTPUT_PAYLOAD {
        return Err(OutputError::Malformed("length"));
    }
    let source = match body[0] {
        0 => Source::Primary,
        1 => Source::Backup,
        _ => return Err(OutputError::Malformed("source")),
    };
    let seq = u64::from_le_bytes(
        body[1..9]
            .try_into()
            .map_err(|_| OutputError::Malformed("seq"))?,
    );
    Ok((
        source,
        OutputRecord {
            seq,
            payload: body[9..].to_vec(),
        },
    ))
}

/// Read output frames from `r` until EOF, calling `f` for each record.
pub fn read_records(
    r: impl Read,
    mut f: impl FnMut(Source, OutputRecord),
) -> Result<(), OutputError> {
    let mut frames = FrameReader::new(r, MAX_FRAME);
    loop {
        while let Some(frame) = frames
            .next_buffered()
            .map_err(|_| OutputError::Malformed("frame"))?
        {
            if !frame.is(FrameType::Output) {
                return Err(OutputError::Malformed("frame type"));
            }
            let (s, rec) = decode_record(frame.body())?;
            f(s, rec);
        }
        match frames.fill() {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(()), // the releasing side died: that is a normal end here
        }
    }
}

/// Append the line `epoch out_head` to the ack log and flush it to the OS before returning;
/// `epoch -` for a guest that reports no output head (not a built-in guest), which a
/// reader skips.
///
/// The line goes in one write; if that fails part-way (a full disk), the file is cut back
/// to its length before it and the error returned, so no torn line is left behind.
pub fn append_ack_log(
    log: &mut std::fs::File,
    epoch: u64,
    out_head: Option<u64>,
) -> std::io::Result<()> {
    let line = match out_head {
        Some(h) => format!("{epoch} {h}\n"),
        None => format!("{epoch} -\n"),
    };
    append_whole(log, line.as_bytes())
}

/// Something that grows at its end and can be cut back: the ack log, or a test's fake.
trait Append {
    /// Its length in bytes now.
    fn size(&mut self) -> std::io::Result<u64>;
    /// Write all of `bytes` at the end; a failure may leave part of them written.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Cut it back to `len` bytes; the next append goes right after them.
    fn cut(&mut self, len: u64) -> std::io::Result<()>;
}

impl Append for std::fs::File {
    fn size(&mut self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)?;
        self.flush()
    }

    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        // Opened without O_APPEND, the file would go on writing at the old offset.
        self.seek(std::io::SeekFrom::Start(len))?;
        Ok(())
    }
}

/// Append `bytes` whole or not at all: on a failed append, cut `to` back to its length
/// before it and return the append's error.
fn append_whole(to: &mut impl Append, bytes: &[u8]) -> std::io::Result<()> {
    let before = to.size()?;
    let Err(e) = to.append(bytes) else {
        return Ok(());
    };
    if let Err(cut) = to.cut(before) {
        tracing::error!(
            error = %cut,
            len = before,
            "cannot cut the ack log back after a failed write; its last line may be torn"
        );
    }
    Err(e)
}

/// One ack-log line (without its newline) as `(epoch, out_head)`: exactly two numbers.
fn parse_ack_line(line: &[u8]) -> Option<(u64, u64)> {
    let mut it = std::str::from_utf8(line).ok()?.split_ascii_whitespace();
    let epoch = it.next()?.parse().ok()?;
    let out_head = it.next()?.parse().ok()?;
    it.next().is_none().then_some((epoch, out_head))
}

/// The highest `out_head` committed so far according to the ack log (0 if none).
///
/// Only whole lines of two numbers are records: a last line without its newline (a write
/// cut short) and any line that is not `epoch out_head` are ignored.
pub fn committed_out_head(path: &Path) -> Result<u64, OutputError> {
    let io = |source| OutputError::AckLog {
        path: path.display().to_string(),
        source,
    };
    let mut r = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let mut best = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        r.read_until(b'\n', &mut line).map_err(io)?;
        let Some(whole) = line.strip_suffix(b"\n") else {
            return Ok(best); // the end, or a last line never finished
        };
        if let Some((_, out_head)) = parse_ack_line(whole) {
            best = best.max(out_head);
        }
    }
}

/// A violation of what the world may see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A sequence number was skipped.
    #[error("output skipped from seq {expected} to {got}")]
    Skip {
        /// The next sequence number expected.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// A sequence number seen before, with other content.
    #[error("output seq {0} repeated with different content")]
    Changed(u64),
    /// The primary released a record before its checkpoint was committed.
    #[error(
        "primary released seq {seq} before a checkpoint holding it was acknowledged (committed out_head {committed})"
    )]
    Uncommitted {
        /// The record.
        seq: u64,
        /// The highest committed out_head at the time.
        committed: u64,
    },
}

/// The world's check of released output: no skip, no repeat with other content, and no
/// primary record ahead of the committed checkpoints.
#[derive(Debug, Default)]
pub struct OutputChecker {
    seen: BTreeMap<u64, Vec<u8>>,
    next: u64,
    /// Records accepted (repeats included).
    pub received: u64,
    /// Repeats with identical content (allowed: the backup re-releases after failover).
    pub repeats: u64,
}

impl OutputChecker {
    /// Check one record. `committed` is the highest committed out_head (from the ack
    /// log), consulted only for records the primary released.
    pub fn check(
        &mut self,
        source: Source,
        r: &OutputRecord,
        committed: impl FnOnce() -> u64,
    ) -> Result<(), Violation> {
        self.received += 1;
        // An early release is reported, but the record still counts in the sequence, so
        // one violation does not cascade into others.
        let early = match source {
            Source::Primary => {
                let c = committed();
                (r.seq >= c).then_some(Violation::Uncommitted {
                    seq: r.seq,
                    committed: c,
                })
            }
            Source::Backup => None,
        };
        let order = if r.seq < self.next {
            match self.seen.get(&r.seq) {
                Some(p) if *p == r.payload => {
                    self.repeats += 1;
                    Ok(())
                }
                _ => Err(Violation::Changed(r.seq)),
            }
        } else if r.seq > self.next {
            Err(Violation::Skip {
                expected: self.next,
                got: r.seq,
            })
        } else {
            self.seen.insert(r.seq, r.payload.clone());
            self.next += 1;
            Ok(())
        };
        match early {
            Some(v) => Err(v),
            None => order,
        }
    }

    /// The next sequence number expected (= distinct records seen).
    pub fn next_seq(&self) -> u64 {
        self.next
    }
}

/// What the world saw (see [`Consumer`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorldView {
    /// Distinct records in sequence (the next sequence number expected).
    pub next_seq: u64,
    /// Records received from the primary.
    pub from_primary: u64,
    /// One past the highest sequence number the primary released (0: none).
    pub primary_next: u64,
    /// Records received from the backup.
    pub from_backup: u64,
    /// Identical repeats (the backup re-releasing after a failover).
    pub repeats: u64,
    /// Violations: skips, changed repeats, primary releases ahead of the commits.
    pub violations: Vec<String>,
    /// When each of `violations` was seen (ms since the Unix epoch), in the same order.
    pub violations_at_ms: Vec<u64>,
    /// When the last record from the primary arrived (ms since the Unix epoch; 0: none).
    pub primary_last_ms: u64,
    /// When the first record from the backup arrived (ms since the Unix epoch; 0: none).
    pub backup_first_ms: u64,
}

/// The world: accepts output connections from both daemons on loopback and checks every
/// record, the primary's against the backup's ack log. Used by the drill and the tests.
#[derive(Debug)]
pub struct Consumer {
    /// The sink address to give the daemons.
    pub addr: SocketAddr,
    view: std::sync::Arc<std::sync::Mutex<(OutputChecker, WorldView)>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Consumer {
    /// Listen on a free loopback port; `ack_log` is the backup's ack log.
    pub fn start(ack_log: std::path::PathBuf) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), ack_log)
    }

    /// Listen on `bind` (e.g. `0.0.0.0:0`, for daemons in other network namespaces).
    pub fn start_on(bind: SocketAddr, ack_log: std::path::PathBuf) -> std::io::Result<Self> {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind(bind)?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let view = std::sync::Arc::new(std::sync::Mutex::new((
            OutputChecker::default(),
            WorldView::default(),
        )));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (v, st) = (view.clone(), stop.clone());
        std::thread::Builder::new()
            .name("castor-world".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let Ok((s, _)) = l.accept() else {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    let (view, log) = (v.clone(), ack_log.clone());
                    std::thread::spawn(move || {
                        let _ = read_records(s, |src, r| {
                            let mut g = view
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            let (checker, w) = &mut *g;
                            let res =
                                checker.check(src, &r, || committed_out_head(&log).unwrap_or(0));
                            let now = unix_ms();
                            match src {
                                Source::Primary => {
                                    w.from_primary += 1;
                                    w.primary_next = w.primary_next.max(r.seq + 1);
                                    w.primary_last_ms = now;
                                }
                                Source::Backup => {
                                    w.from_backup += 1;
                                    if w.backup_first_ms == 0 {
                                        w.backup_first_ms = now;
                                    }
                                }
                            }
                            if let Err(e) = res {
                                w.violations.push(format!("{src:?}: {e}"));
                                w.violations_at_ms.push(now);
                            }
                            w.next_seq = checker.next_seq();
                            w.repeats = checker.repeats;
                        });
                    });
                }
            })?;
        Ok(Self { addr, view, stop })
    }

    /// What it saw so far.
    pub fn view(&self) -> WorldView {
        self.view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }
}

/// Milliseconds since the Unix epoch (the clock the daemons' events carry).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, b: u8) -> OutputRecord {
        OutputRecord {
            seq,
            payload: vec![b; 16],
        }
    }

    #[test]
    fn frames_roundtrip() {
        let mut buf = Vec::new();
        encode_record(&mut buf, Source::Backup, &rec(9, 3));
        encode_record(&mut buf, Source::Primary, &rec(10, 4));
        let mut got = Vec::new();
        read_records(&buf[..], |s, r| got.push((s, r))).unwrap();
        assert_eq!(
            got,
            vec![(Source::Backup, rec(9, 3)), (Source::Primary, rec(10, 4))]
        );
        assert!(decode_record(&[7; 9]).is_err());
    }

    #[test]
    fn checker_catches_skips_changes_and_early_release() {
        let mut c = OutputChecker::default();
        assert_eq!(c.check(Source::Primary, &rec(0, 1), || 5), Ok(()));
        let early = c.check(Source::Primary, &rec(1, 1), || 1);
        assert_eq!(
            early,
            Err(Violation::Uncommitted {
                seq: 1,
                committed: 1
            })
        );
        assert_eq!(
            c.next_seq(),
            2,
            "an early record still counts in the sequence"
        );
        let skip = c.check(Source::Backup, &rec(3, 1), || 0);
        assert_eq!(
            skip,
            Err(Violation::Skip {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(c.check(Source::Backup, &rec(1, 1), || 0), Ok(()));
        assert_eq!(c.check(Source::Backup, &rec(0, 1), || 0), Ok(()));
        assert_eq!(
            c.check(Source::Backup, &rec(1, 2), || 0),
            Err(Violation::Changed(1))
        );
        assert_eq!((c.next_seq(), c.repeats), (2, 2));
    }

    /// A sink with room for `room` more bytes: it takes what fits, then fails as a full disk.
    struct Cramped {
        data: Vec<u8>,
        room: usize,
    }

    impl Append for Cramped {
        fn size(&mut self) -> std::io::Result<u64> {
            Ok(self.data.len() as u64)
        }

        fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            let n = bytes.len().min(self.room);
            self.data.extend_from_slice(&bytes[..n]);
            self.room -= n;
            if n < bytes.len() {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            Ok(())
        }

        fn cut(&mut self, len: u64) -> std::io::Result<()> {
            self.data.truncate(usize::try_from(len).unwrap());
            Ok(())
        }
    }

    #[test]
    fn a_failed_append_leaves_only_whole_lines() {
        let line = b"541 372\n";
        for room in 0..line.len() {
            let mut sink = Cramped {
                data: b"539 370\n540 371\n".to_vec(),
                room,
            };
            let e = append_whole(&mut sink, line).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "room {room}");
            assert_eq!(sink.data, b"539 370\n540 371\n", "room {room}");
        }
        let mut sink = Cramped {
            data: b"539 370\n".to_vec(),
            room: line.len(),
        };
        append_whole(&mut sink, line).unwrap();
        assert_eq!(sink.data, b"539 370\n541 372\n");
    }

    /// The ack-log file, failing after `room` bytes of an append.
    struct FailingFile {
        f: std::fs::File,
        room: usize,
    }

    impl Append for FailingFile {
        fn size(&mut self) -> std::io::Result<u64> {
            self.f.size()
        }

        fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            let n = bytes.len().min(self.room);
            self.f.append(&bytes[..n])?;
            if n < bytes.len() {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            Ok(())
        }

        fn cut(&mut self, len: u64) -> std::io::Result<()> {
            self.f.cut(len)
        }
    }

    #[test]
    fn a_file_cut_back_after_a_failed_append_takes_the_next_line_right_after() {
        for append in [true, false] {
            let path = std::env::temp_dir().join(format!(
                "castor-acklog-torn-{}-{append}",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&path);
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .open(&path)
                .unwrap();
            let mut log = FailingFile {
                f,
                room: usize::MAX,
            };
            append_whole(&mut log, b"1 10\n").unwrap();
            log.room = 4;
            assert!(append_whole(&mut log, b"540 371\n").is_err());
            assert_eq!(std::fs::read(&path).unwrap(), b"1 10\n", "append {append}");
            log.room = usize::MAX;
            append_ack_log(&mut log.f, 2, Some(25)).unwrap();
            assert_eq!(
                std::fs::read(&path).unwrap(),
                b"1 10\n2 25\n",
                "append {append}"
            );
            assert_eq!(committed_out_head(&path).unwrap(), 25);
            let _ = std::fs::remove_file(&path);
        }
    }

    #[test]
    fn the_reader_ignores_an_unfinished_last_line() {
        let path =
            std::env::temp_dir().join(format!("castor-acklog-unfinished-{}", std::process::id()));
        std::fs::write(&path, "1 10\n2 25\n3 99").unwrap();
        assert_eq!(committed_out_head(&path).unwrap(), 25);
        std::fs::write(&path, "1 10\n2 25\n540 ").unwrap();
        assert_eq!(committed_out_head(&path).unwrap(), 25);
        std::fs::write(&path, "").unwrap();
        assert_eq!(committed_out_head(&path).unwrap(), 0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_reader_ignores_lines_that_are_not_two_numbers() {
        let path =
            std::env::temp_dir().join(format!("castor-acklog-garbage-{}", std::process::id()));
        std::fs::write(
            &path,
            "1 10\n540 \n541 541 372\nx 90\n5 y\n6 -1\n7 1e3\n\n\0\0\0 91\n4 30\n",
        )
        .unwrap();
        assert_eq!(committed_out_head(&path).unwrap(), 30);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn ack_log_gives_highest_out_head() {
        let path = std::env::temp_dir().join(format!("castor-acklog-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        append_ack_log(&mut f, 1, Some(10)).unwrap();
        append_ack_log(&mut f, 2, Some(25)).unwrap();
        // A guest that reports no output head leaves a line the reader skips.
        append_ack_log(&mut f, 3, None).unwrap();
        assert_eq!(committed_out_head(&path).unwrap(), 25);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("3 -\n"));
        let _ = std::fs::remove_file(&path);
    }
}
