//! What the primary tells its operator and its tests: per-epoch statistics (CSV). Its
//! state-change events go to [`ha_daemon::events`].

use crate::encode::Encoded;
use ha_codec::codec::Encoding;
use ha_daemon::logfile::{LogFileError, create_locked};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Duration;

/// One epoch's figures.
#[derive(Debug, Clone, Default)]
pub struct EpochRow {
    /// Epoch number.
    pub epoch: u64,
    /// Checkpoint (true) or pre-copy round.
    pub checkpoint: bool,
    /// Pause time.
    pub pause: Duration,
    /// How a checkpoint's pages were copied: in the pause or copy-on-write (None: a
    /// pre-copy round).
    pub copy: Option<crate::cow::CopyPath>,
    /// Where a checkpoint's pause went.
    pub pause_parts: crate::harvest::PauseParts,
    /// Dirty pages.
    pub dirty_pages: usize,
    /// Encoder output.
    pub encoded: Option<Encoded>,
    /// Time to write the epoch to the socket.
    pub send: Option<Duration>,
    /// Time from the pause to the ack.
    pub ack_latency: Option<Duration>,
    /// Output records still held (awaiting a later ack) once this epoch was acked.
    pub held: usize,
    /// When the checkpoint was taken (its pause began), since the engine started.
    pub at: Option<Duration>,
    /// The guest's progress counter at the checkpoint.
    pub progress: Option<u64>,
}

/// A [`LogFileError`] as the I/O error the engine reports for its files (the error's
/// message stays, its kind says what happened).
fn io_error(e: LogFileError) -> std::io::Error {
    let kind = match &e {
        LogFileError::Open { source, .. } | LogFileError::Lock { source, .. } => source.kind(),
        LogFileError::Locked { .. } => std::io::ErrorKind::ResourceBusy,
    };
    std::io::Error::new(kind, e)
}

/// The `--stats` CSV file.
#[derive(Debug)]
pub struct StatsCsv {
    w: BufWriter<File>,
}

impl StatsCsv {
    /// Create the file (locked, then truncated) and write the header. Fails, the file
    /// untouched, while another running process holds it.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let mut w = BufWriter::new(create_locked(path).map_err(io_error)?);
        writeln!(
            w,
            "epoch,checkpoint,pause_us,dirty_pages,changed_blocks,shared_blocks,raw_bytes,wire_bytes,\
             zero,unchanged,pageref,delta,blocks,general,raw,\
             pageref_bytes,delta_bytes,blocks_bytes,general_bytes,raw_bytes_sent,\
             encode_us,send_us,ack_latency_us,held,t_us,progress,encode_cpu_us,\
             disk_writes,disk_raw_bytes,disk_wire_bytes,copy,cow_faulted,cow_wait_us,stop_us,drain_us,harvest_us,copy_us,save_us,resume_us,diskref,diskref_bytes"
        )?;
        Ok(Self { w })
    }

    /// Append one epoch.
    pub fn row(&mut self, r: &EpochRow) -> std::io::Result<()> {
        let e = r.encoded.as_ref();
        let pages = |enc: Encoding| e.map_or(0, |e| e.stats.kind(enc).pages);
        let bytes = |enc: Encoding| e.map_or(0, |e| e.stats.kind(enc).bytes);
        let us = |d: Option<Duration>| d.map_or(String::new(), |d| d.as_micros().to_string());
        let mut cols: Vec<String> = vec![
            r.epoch.to_string(),
            u8::from(r.checkpoint).to_string(),
            r.pause.as_micros().to_string(),
            r.dirty_pages.to_string(),
            e.map_or(0, |e| e.stats.changed_blocks).to_string(),
            e.map_or(0, |e| e.stats.shared_blocks).to_string(),
            (r.dirty_pages * ha_codec::PAGE_SIZE).to_string(),
            e.map_or(0, |e| e.wire_bytes).to_string(),
        ];
        let kinds = [
            Encoding::Zero,
            Encoding::Unchanged,
            Encoding::PageRef,
            Encoding::Delta,
            Encoding::Blocks,
            Encoding::General,
            Encoding::Raw,
        ];
        cols.extend(kinds.iter().map(|&k| pages(k).to_string()));
        let sized = [
            Encoding::PageRef,
            Encoding::Delta,
            Encoding::Blocks,
            Encoding::General,
            Encoding::Raw,
        ];
        cols.extend(sized.iter().map(|&k| bytes(k).to_string()));
        cols.push(us(e.map(|e| e.encode)));
        cols.push(us(r.send));
        cols.push(us(r.ack_latency));
        cols.push(r.held.to_string());
        cols.push(us(r.at));
        cols.push(r.progress.map_or(String::new(), |p| p.to_string()));
        cols.push(us(e.map(|e| e.encode_cpu)));
        cols.push(e.map_or(0, |e| e.disk.writes).to_string());
        cols.push(e.map_or(0, |e| e.disk.raw_bytes).to_string());
        cols.push(e.map_or(0, |e| e.disk.wire_bytes).to_string());
        cols.push(r.copy.map_or("", |c| c.name()).to_string());
        cols.push(e.map_or(0, |e| e.cow_faulted).to_string());
        cols.push(us(e.map(|e| e.cow_wait)));
        let part = |d: Duration| {
            if r.checkpoint {
                d.as_micros().to_string()
            } else {
                String::new()
            }
        };
        cols.push(part(r.pause_parts.stop));
        cols.push(part(r.pause_parts.drain));
        cols.push(part(r.pause_parts.harvest));
        cols.push(part(r.pause_parts.copy));
        cols.push(part(r.pause_parts.save));
        cols.push(part(r.pause_parts.resume));
        cols.push(pages(Encoding::DiskRef).to_string());
        cols.push(bytes(Encoding::DiskRef).to_string());
        writeln!(self.w, "{}", cols.join(","))?;
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ha-primary-report-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_second_stats_file_is_refused_and_touches_nothing() {
        let p = scratch("stats");
        let mut first = StatsCsv::create(&p).unwrap();
        first
            .row(&EpochRow {
                epoch: 7,
                ..EpochRow::default()
            })
            .unwrap();
        let before = std::fs::read_to_string(&p).unwrap();
        assert_eq!(before.lines().count(), 2, "{before}");
        let e = StatsCsv::create(&p).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy, "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), before);
        drop(first);
        StatsCsv::create(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 1);
        let _ = std::fs::remove_file(&p);
    }
}
