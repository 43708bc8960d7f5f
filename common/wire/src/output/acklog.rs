//! The backup's ack log: a line `epoch out_head` appended (whole or not at all) before each
//! checkpoint's ack, and the highest committed `out_head` read back from it.

use super::OutputError;
use std::io::{BufRead, Seek, Write};
use std::path::Path;

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
/// Every whole `epoch out_head` line of the ack log at `path`, in order (a missing or
/// unreadable file: none; a line cut short or malformed is skipped). For tests and
/// drills that read what a backup committed.
pub fn read_ack_log(path: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read(path).unwrap_or_default();
    text.split_inclusive(|&b| b == b'\n')
        .filter_map(|l| parse_ack_line(l.strip_suffix(b"\n")?))
        .collect()
}

/// The highest out_head committed in the ack log at `path`.
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

#[cfg(test)]
mod tests {
    use super::*;

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
