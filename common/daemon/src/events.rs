//! The daemons' JSON-lines event log (`--events`): one object per line, each with
//! `"event"` and `"t_ms"` (milliseconds since the Unix epoch), flushed line by line so a
//! reader sees every event as soon as it happens. The file is opened under its lock
//! ([`crate::logfile`]): a second daemon given it is refused and leaves it alone.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ha_wire::output::unix_ms;
use serde_json::{Map, Value};

use crate::logfile::{LogFileError, create_locked};

/// Errors writing the event log.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The file cannot be opened, or another running process holds it.
    #[error("event log")]
    Open(#[from] LogFileError),
    /// The file cannot be written.
    #[error("event log {path}")]
    Io {
        /// The log's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Where events go: a file, or nowhere.
#[derive(Debug)]
pub struct EventLog {
    out: Option<(PathBuf, BufWriter<File>)>,
}

impl EventLog {
    /// An event log writing to `path` (created, locked, then truncated), or a silent one.
    /// Fails, the file untouched, while another running process holds it.
    pub fn open(path: Option<&Path>) -> Result<Self, EventError> {
        let out = match path {
            None => None,
            Some(p) => Some((p.to_path_buf(), BufWriter::new(create_locked(p)?))),
        };
        Ok(Self { out })
    }

    /// Write one event with its fields (an object; anything else is ignored) and flush.
    pub fn emit(&mut self, event: &str, fields: Value) -> Result<(), EventError> {
        let Some((path, w)) = &mut self.out else {
            return Ok(());
        };
        let mut obj = Map::new();
        obj.insert("event".into(), Value::from(event));
        obj.insert("t_ms".into(), Value::from(unix_ms()));
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        let line = Value::Object(obj).to_string();
        writeln!(w, "{line}")
            .and_then(|()| w.flush())
            .map_err(|source| EventError::Io {
                path: path.clone(),
                source,
            })
    }

    /// Like [`EventLog::emit`], but a failure is only logged: an event log that cannot be
    /// written must not stop a failover, nor the guest's protection.
    pub fn note(&mut self, event: &str, fields: Value) {
        if let Err(e) = self.emit(event, fields) {
            tracing::warn!(error = %crate::error_chain(&e), "cannot write event {event}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_carry_event_time_and_fields() {
        let path = std::env::temp_dir().join(format!("ha-backup-events-{}", std::process::id()));
        let mut log = EventLog::open(Some(&path)).expect("create");
        log.emit("listening", json!({"addr": "127.0.0.1:1"}))
            .expect("write");
        log.emit("exit", json!({"code": 0})).expect("write");
        let text = std::fs::read_to_string(&path).expect("read back");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "listening");
        assert_eq!(lines[0]["addr"], "127.0.0.1:1");
        assert!(lines[0]["t_ms"].as_u64().unwrap_or(0) > 0);
        assert_eq!(lines[1]["code"], 0);
        let _ = std::fs::remove_file(&path);
        EventLog::open(None)
            .expect("silent")
            .emit("x", json!({}))
            .expect("no-op");
    }

    #[test]
    fn a_second_log_on_the_same_file_is_refused_and_touches_nothing() {
        let path = std::env::temp_dir().join(format!("ha-backup-events2-{}", std::process::id()));
        let mut first = EventLog::open(Some(&path)).expect("create");
        first.emit("listening", json!({})).expect("write");
        let e = EventLog::open(Some(&path)).expect_err("the file is in use");
        assert!(
            matches!(e, EventError::Open(LogFileError::Locked { .. })),
            "{e:?}"
        );
        assert!(
            crate::error_chain(&e).contains("another running process"),
            "{e}"
        );
        first.emit("exit", json!({})).expect("write");
        let text = std::fs::read_to_string(&path).expect("read back");
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(events.len(), 2, "{text}");
        assert_eq!(events[0]["event"], "listening");
        assert_eq!(events[1]["event"], "exit");
        drop(first);
        EventLog::open(Some(&path)).expect("free once the first is closed");
        assert_eq!(std::fs::read_to_string(&path).expect("read back"), "");
        let _ = std::fs::remove_file(&path);
    }
}
