//! The per-epoch statistics CSV (`--stats`): one row per committed epoch with what the
//! backup can measure itself.

use ha_daemon::logfile::{LogFileError, create_locked};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The CSV header.
pub const HEADER: &str = "epoch,checkpoint,records,wire_bytes,stage_us,commit_us,ack_us,out_head";

/// Errors writing the stats file.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The file cannot be opened, or another running process holds it.
    #[error("stats file")]
    Open(#[from] LogFileError),
    /// The file cannot be written.
    #[error("stats file {path}")]
    Io {
        /// The file's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// One committed epoch, as the backup saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochStats {
    /// Epoch number.
    pub epoch: u64,
    /// Whether it was a checkpoint (carried a state blob).
    pub checkpoint: bool,
    /// Page records.
    pub records: u64,
    /// Bytes of frames received (trailer excluded).
    pub wire_bytes: u64,
    /// Header received → trailer verified, in microseconds.
    pub stage_us: u64,
    /// Commit into the image (and the Verify check), in microseconds.
    pub commit_us: u64,
    /// Trailer verified → Ack written to the socket (commit and ack log included).
    pub ack_us: u64,
    /// The guest's out_head in the committed image (checkpoints of a built-in guest;
    /// written empty otherwise).
    pub out_head: Option<u64>,
}

/// Where rows go: a file, or nowhere.
#[derive(Debug)]
pub struct StatsLog {
    out: Option<(PathBuf, BufWriter<File>)>,
}

impl StatsLog {
    /// A stats file at `path` (created, locked, then truncated; header written), or a
    /// silent one. Fails, the file untouched, while another running process holds it.
    pub fn open(path: Option<&Path>) -> Result<Self, StatsError> {
        let Some(p) = path else {
            return Ok(Self { out: None });
        };
        let mut w = BufWriter::new(create_locked(p)?);
        writeln!(w, "{HEADER}")
            .and_then(|()| w.flush())
            .map_err(|source| StatsError::Io {
                path: p.to_path_buf(),
                source,
            })?;
        Ok(Self {
            out: Some((p.to_path_buf(), w)),
        })
    }

    /// Append one row and flush it.
    pub fn row(&mut self, s: &EpochStats) -> Result<(), StatsError> {
        let Some((path, w)) = &mut self.out else {
            return Ok(());
        };
        writeln!(
            w,
            "{},{},{},{},{},{},{},{}",
            s.epoch,
            u8::from(s.checkpoint),
            s.records,
            s.wire_bytes,
            s.stage_us,
            s.commit_us,
            s.ack_us,
            s.out_head.map_or(String::new(), |h| h.to_string())
        )
        .and_then(|()| w.flush())
        .map_err(|source| StatsError::Io {
            path: path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_then_rows() {
        let path = std::env::temp_dir().join(format!("ha-backup-stats-{}", std::process::id()));
        let mut s = StatsLog::open(Some(&path)).expect("create");
        s.row(&EpochStats {
            epoch: 3,
            checkpoint: true,
            records: 10,
            wire_bytes: 999,
            stage_us: 1,
            commit_us: 2,
            ack_us: 3,
            out_head: Some(7),
        })
        .expect("row");
        let text = std::fs::read_to_string(&path).expect("read back");
        assert_eq!(text, format!("{HEADER}\n3,1,10,999,1,2,3,7\n"));
        let e = StatsLog::open(Some(&path)).expect_err("the file is in use");
        assert!(
            matches!(e, StatsError::Open(LogFileError::Locked { .. })),
            "{e:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).expect("read back"),
            text,
            "a refused second log touches nothing"
        );
        drop(s);
        StatsLog::open(Some(&path)).expect("free again");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read back"),
            format!("{HEADER}\n")
        );
        let _ = std::fs::remove_file(&path);
    }
}
