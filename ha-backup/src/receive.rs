//! *Receiving*: epochs from the primary's link staged, committed, written to the ack log
//! and acknowledged, one after another, until the primary is lost, stands down, or the
//! backup is stopped.

use std::sync::atomic::AtomicBool;

use ha_wire::output::append_ack_log;
use serde_json::json;
use tracing::{debug, error, info};

use crate::commit::{CommitError, Committed};
use crate::detect::{Loss, LossReason, classify};
use crate::failover::status_fields;
use crate::link::Receiver;
use crate::stage::{Stager, micros};
use crate::stats::EpochStats;
use crate::{BackupError, Sinks, chain};

/// How the receive loop ended.
#[derive(Debug)]
pub(crate) enum Received {
    Lost(Loss),
    Stopped,
    VerifyFailed,
    /// The primary ended protection on purpose; its guest goes on there (the reason).
    StoodDown(String),
}

/// Receive, stage, commit and acknowledge epochs until the primary is lost.
pub(crate) fn receive(
    rx: &mut Receiver,
    stager: &mut Stager,
    committed: &mut Committed,
    sinks: &mut Sinks<'_>,
    stop: &AtomicBool,
) -> Result<Received, BackupError> {
    let mut protected = false;
    loop {
        let frame = match rx.next_frame(stop) {
            Ok(f) => f,
            Err(e) => {
                return Ok(match classify(&e) {
                    Some(reason) => Received::Lost(Loss::now(reason, rx.last_frame())),
                    None => Received::Stopped,
                });
            }
        };
        if frame.is(ha_wire::frame::FrameType::StandDown) {
            return Ok(Received::StoodDown(
                String::from_utf8_lossy(frame.body()).into_owned(),
            ));
        }
        let verified = match stager.push(&frame, committed.image()) {
            Ok(None) => continue,
            Ok(Some(v)) => v,
            Err(e) => {
                error!(
                    epoch = stager.next_epoch(),
                    error = %chain(&e),
                    "epoch rejected; the committed image is unchanged; dropping the primary"
                );
                return Ok(Received::Lost(Loss::now(
                    LossReason::Corrupt(chain(&e)),
                    rx.last_frame(),
                )));
            }
        };
        let wire_bytes = verified.staged.wire_bytes;
        let applied = match committed.apply(verified.staged) {
            Ok(a) => a,
            Err(CommitError::ImageMismatch { epoch }) => {
                error!(
                    epoch,
                    "VERIFY FAILED: the committed image differs from the primary's memory; \
                     this backup cannot be trusted"
                );
                sinks
                    .events
                    .note("verify_failed", json!({ "epoch": epoch }));
                return Ok(Received::VerifyFailed);
            }
            Err(e @ CommitError::PrecopyAfterCheckpoint { .. }) => {
                error!(error = %e, "epoch refused; dropping the primary");
                return Ok(Received::Lost(Loss::now(
                    LossReason::Corrupt(e.to_string()),
                    rx.last_frame(),
                )));
            }
        };
        if applied.checkpoint {
            // No ack without its line in the ack log.
            if let Some((path, f)) = &mut sinks.ack_log {
                append_ack_log(f, applied.epoch, applied.out_head).map_err(|source| {
                    BackupError::AckLog {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            let mut ev = json!({ "epoch": applied.epoch });
            status_fields(&mut ev, committed.status());
            sinks.events.note("checkpoint", ev);
        }
        // Counted before the ack: whoever sees the ack sees the commit in the metrics.
        let m = sinks.metrics;
        m.epochs_committed.inc();
        if applied.checkpoint {
            m.checkpoints.inc();
        }
        m.wire_bytes.inc_by(wire_bytes);
        m.commit_seconds.observe(applied.commit_us as f64 / 1e6);
        if let Err(e) = rx.ack(applied.epoch) {
            return Ok(Received::Lost(Loss::now(
                LossReason::Io(format!("ack: {e}")),
                rx.last_frame(),
            )));
        }
        let ack_us = micros(verified.at.elapsed());
        debug!(
            epoch = applied.epoch,
            checkpoint = applied.checkpoint,
            records = applied.records,
            wire_bytes,
            stage_us = verified.stage_us,
            commit_us = applied.commit_us,
            ack_us,
            "epoch committed"
        );
        if applied.checkpoint && !protected {
            protected = true;
            info!(
                epoch = applied.epoch,
                "first checkpoint committed: the guest is protected"
            );
        }
        sinks.stats.row(&EpochStats {
            epoch: applied.epoch,
            checkpoint: applied.checkpoint,
            records: applied.records,
            wire_bytes,
            stage_us: verified.stage_us,
            commit_us: applied.commit_us,
            ack_us,
            out_head: applied.out_head.filter(|_| applied.checkpoint),
        })?;
    }
}
