//! Released guest output: how a protected guest's "network output" reaches the world, and
//! how the world checks that output commit held.
//!
//! Output records are held by the primary until the checkpoint that produced them is
//! committed at the backup (output commit), then *released*: sent to an output sink over
//! TCP as frames of type [`FrameType::Output`](crate::frame::FrameType::Output). After a failover the backup releases the
//! guest's output itself. The backup appends a line `epoch out_head` to its *ack log*
//! before it acknowledges each checkpoint, so a consumer can check that every record it
//! receives from the primary belongs to a committed checkpoint ([`OutputChecker`]).
//!
//! | module | what |
//! |---|---|
//! | `record` | the output frame, [`OutputSink`], [`encode_record`] / [`decode_record`] / [`read_records`] |
//! | `acklog` | [`append_ack_log`], [`committed_out_head`] |
//! | `checker` | [`OutputChecker`], [`Violation`], [`WorldView`], [`Consumer`] |
//!
//! Everything is re-exported here: callers name it `ha_wire::output::X`.

use std::net::SocketAddr;

mod acklog;
mod checker;
mod record;

pub use acklog::{append_ack_log, committed_out_head, read_ack_log};
pub use checker::{Consumer, OutputChecker, Violation, WorldView, unix_ms};
pub use record::{OutputSink, decode_record, encode_record, read_records};

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

/// What the tests of the output modules share.
#[cfg(test)]
mod testutil {
    use ha_workloads::guest_abi::OutputRecord;

    /// A record of 16 bytes `b`.
    pub(super) fn rec(seq: u64, b: u8) -> OutputRecord {
        OutputRecord {
            seq,
            payload: vec![b; 16],
        }
    }
}
