//! What the primary tells its operator and its tests: per-epoch statistics (CSV) and
//! state-change events (JSON lines).

use crate::encode::Encoded;
use ha_common::codec::Encoding;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One epoch's figures.
#[derive(Debug, Clone, Default)]
pub struct EpochRow {
    /// Epoch number.
    pub epoch: u64,
    /// Checkpoint (true) or pre-copy round.
    pub checkpoint: bool,
    /// Pause time.
    pub pause: Duration,
    /// Dirty pages.
    pub dirty_pages: usize,
    /// Encoder output.
    pub encoded: Option<Encoded>,
    /// Time from the pause to the ack.
    pub ack_latency: Option<Duration>,
}

/// The `--stats` CSV file.
#[derive(Debug)]
pub struct StatsCsv {
    w: BufWriter<File>,
}

impl StatsCsv {
    /// Create the file and write the header.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let mut w = BufWriter::new(File::create(path)?);
        writeln!(
            w,
            "epoch,checkpoint,pause_us,dirty_pages,changed_blocks,shared_blocks,raw_bytes,wire_bytes,\
             zero,unchanged,pageref,delta,blocks,general,raw,encode_us,ack_latency_us"
        )?;
        Ok(Self { w })
    }

    /// Append one epoch.
    pub fn row(&mut self, r: &EpochRow) -> std::io::Result<()> {
        let e = r.encoded.as_ref();
        let k = |enc: Encoding| e.map_or(0, |e| e.stats.kind(enc).pages);
        writeln!(
            self.w,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.epoch,
            u8::from(r.checkpoint),
            r.pause.as_micros(),
            r.dirty_pages,
            e.map_or(0, |e| e.stats.changed_blocks),
            e.map_or(0, |e| e.stats.shared_blocks),
            r.dirty_pages * ha_common::PAGE_SIZE,
            e.map_or(0, |e| e.wire_bytes),
            k(Encoding::Zero),
            k(Encoding::Unchanged),
            k(Encoding::PageRef),
            k(Encoding::Delta),
            k(Encoding::Blocks),
            k(Encoding::General),
            k(Encoding::Raw),
            e.map_or(0, |e| e.encode.as_micros()),
            r.ack_latency
                .map_or(String::new(), |d| d.as_micros().to_string()),
        )?;
        self.w.flush()
    }
}

/// The `--events` JSON-lines file (absent: events only go to the log).
#[derive(Debug, Default)]
pub struct Events {
    w: Option<File>,
}

impl Events {
    /// Open (create) the events file.
    pub fn create(path: Option<&Path>) -> std::io::Result<Self> {
        Ok(Self {
            w: path.map(File::create).transpose()?,
        })
    }

    /// Write one event: `{"event": name, "t_ms": …, …fields}`.
    pub fn emit(&mut self, name: &str, fields: serde_json::Value) {
        let Some(w) = &mut self.w else { return };
        let mut obj = serde_json::Map::new();
        obj.insert("event".into(), name.into());
        obj.insert("t_ms".into(), unix_ms().into());
        if let serde_json::Value::Object(m) = fields {
            obj.extend(m);
        }
        let line = serde_json::Value::Object(obj).to_string();
        if writeln!(w, "{line}").and_then(|()| w.flush()).is_err() {
            tracing::warn!("cannot write the events file");
        }
    }
}
