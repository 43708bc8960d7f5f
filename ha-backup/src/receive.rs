//! *Receiving*: epochs from the primary's link staged, committed, written to the ack log
//! and acknowledged, one after another, until the primary is lost, stands down, or the
//! backup is stopped.
//!
//! With a disk, an epoch's writes are journaled (staged) before its memory commits, the
//! journal marked committed before the ack, and the writes applied to the replica after
//! it, before the next frame is read ([`crate::replica`] has the rule).

use std::sync::atomic::AtomicBool;

use ha_wire::disksync;
use ha_wire::output::append_ack_log;
use serde_json::json;
use tracing::{debug, error, info};

use crate::commit::{CommitError, Committed};
use crate::detect::{Loss, LossReason, classify};
use crate::failover::status_fields;
use crate::link::Receiver;
use crate::replica::ReplicaError;
use crate::stage::{Stager, micros};
use crate::stats::EpochStats;
use crate::{BackupError, Sinks, chain};
use ha_wire::stream::StagedDisk;

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
        if frame.is(ha_wire::frame::FrameType::Handover) {
            let why = String::from_utf8_lossy(frame.body()).into_owned();
            info!(reason = %why, "the primary hands the guest over (planned switchover)");
            return Ok(Received::Lost(Loss::now(
                LossReason::Handover(why),
                rx.last_frame(),
            )));
        }
        if frame.is(ha_wire::frame::FrameType::StandDown) {
            return Ok(Received::StoodDown(
                String::from_utf8_lossy(frame.body()).into_owned(),
            ));
        }
        if frame.is(ha_wire::frame::FrameType::SumRequest) {
            match answer_sums(rx, frame.body(), sinks)? {
                None => continue,
                Some(reason) => return Ok(Received::Lost(Loss::now(reason, rx.last_frame()))),
            }
        }
        if frame.is(ha_wire::frame::FrameType::MemSumRequest) {
            match answer_memory_sums(rx, frame.body(), committed.guest_image()) {
                None => continue,
                Some(reason) => return Ok(Received::Lost(Loss::now(reason, rx.last_frame()))),
            }
        }
        let replica = sinks
            .replica
            .as_ref()
            .map(|r| r as &dyn ha_wire::disksync::ReadAt);
        let mut verified = match stager.push(&frame, committed.image(), replica) {
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
        let disk = verified.staged.take_disk();
        // Journaled before memory commits: a full disk refuses the epoch with the image
        // untouched.
        let journaled = match &mut sinks.replica {
            Some(r) if !disk.writes.is_empty() => {
                disk_step(r.stage(disk.epoch, &disk.writes), sinks.metrics)?;
                sinks.metrics.journal_bytes.set(gauge(r.journal_bytes()));
                true
            }
            _ => false,
        };
        let applied = committed.apply(verified.staged);
        if applied.is_err()
            && journaled
            && let Some(r) = &mut sinks.replica
        {
            disk_step(r.abandon(), sinks.metrics)?;
        }
        let applied = match applied {
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
        if journaled && let Some(r) = &mut sinks.replica {
            // The durable mark that the checkpoint committed, before its ack.
            disk_step(r.mark_committed(), sinks.metrics)?;
        }
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
            // Committed whether or not its ack got through: a failover runs the guest on
            // the replica, which must hold this checkpoint's writes too.
            if !apply_disk(&disk, sinks)? {
                return Ok(Received::VerifyFailed);
            }
            return Ok(Received::Lost(Loss::now(
                LossReason::Io(format!("ack: {e}")),
                rx.last_frame(),
            )));
        }
        let ack_us = micros(verified.at.elapsed());
        if !apply_disk(&disk, sinks)? {
            return Ok(Received::VerifyFailed);
        }
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

/// The initial disk sync: answer the primary's request for fingerprints of the replica's
/// chunks. A request that does not parse or names chunks past the replica's end drops
/// the primary (Some); a replica that cannot be read ends the session (Err).
fn answer_sums(
    rx: &mut Receiver,
    body: &[u8],
    sinks: &mut Sinks<'_>,
) -> Result<Option<LossReason>, BackupError> {
    let Some(r) = &sinks.replica else {
        return Ok(Some(LossReason::Corrupt(
            "a disk sync request, but this backup has no disk".into(),
        )));
    };
    let req = match disksync::SumRequest::decode(body) {
        Ok(req) => req,
        Err(e) => return Ok(Some(LossReason::Corrupt(e.to_string()))),
    };
    let sums = match disksync::answer(r, &req) {
        Ok(s) => s,
        Err(e @ disksync::DiskSyncError::Read { .. }) => {
            sinks.metrics.disk_errors.inc();
            error!(error = %chain(&e), "the disk replica cannot be read for the initial sync");
            return Err(BackupError::DiskSync(e));
        }
        Err(e) => return Ok(Some(LossReason::Corrupt(e.to_string()))),
    };
    debug!(
        level = req.level,
        parents = req.parents.len(),
        sums = sums.sums.len(),
        "disk sync: fingerprints sent"
    );
    let mut out = Vec::new();
    disksync::put_sums(&mut out, disksync::Target::Disk, &sums);
    if let Err(e) = rx.send(&out) {
        return Ok(Some(LossReason::Io(format!("disk sync answer: {e}"))));
    }
    Ok(None)
}

/// Re-protection: answer the primary's request for fingerprints of the image this backup
/// holds (`--base-image`, or all zero). A request that does not parse or names chunks
/// past the image's end drops the primary (Some).
fn answer_memory_sums(
    rx: &mut Receiver,
    body: &[u8],
    image: &ha_guest::image::GuestImage,
) -> Option<LossReason> {
    let sums = disksync::SumRequest::decode(body)
        .and_then(|req| disksync::answer(image, &req))
        .map_err(|e| LossReason::Corrupt(format!("memory resync: {e}")));
    let sums = match sums {
        Ok(s) => s,
        Err(reason) => return Some(reason),
    };
    debug!(
        level = sums.level,
        sums = sums.sums.len(),
        "resync: memory fingerprints sent"
    );
    let mut out = Vec::new();
    disksync::put_sums(&mut out, disksync::Target::Memory, &sums);
    rx.send(&out)
        .err()
        .map(|e| LossReason::Io(format!("memory resync answer: {e}")))
}

/// Apply a committed epoch's disk writes to the replica (clearing the journal), then check
/// the replica against the epoch's disk digest. False: the replica differs (fatal).
fn apply_disk(disk: &StagedDisk, sinks: &mut Sinks<'_>) -> Result<bool, BackupError> {
    let m = sinks.metrics;
    let Some(r) = &mut sinks.replica else {
        return Ok(true);
    };
    if !disk.writes.is_empty() {
        disk_step(r.apply(&disk.writes), m)?;
        m.journal_bytes.set(gauge(r.journal_bytes()));
        m.disk_writes.inc_by(disk.writes.len() as u64);
        m.disk_epoch_bytes.observe(disk.bytes() as f64);
        m.disk_wire_bytes.inc_by(disk.wire_bytes);
    }
    if disk.verify.is_some() {
        let digest = disk_step(r.digest(), m)?;
        if let Err(e) = disk.check(&digest) {
            error!(
                epoch = disk.epoch,
                error = %e,
                "VERIFY FAILED: the disk replica differs from the primary's disk; this backup \
                 cannot be trusted"
            );
            sinks.events.note(
                "verify_failed",
                json!({ "epoch": disk.epoch, "what": "disk" }),
            );
            return Ok(false);
        }
    }
    Ok(true)
}

/// A replica or journal step: on failure, counted and logged; the backup takes no further
/// epoch (the error ends the session with an Abort), and what it committed stays as the
/// journal rule leaves it.
fn disk_step<T>(r: Result<T, ReplicaError>, m: &crate::metrics::Metrics) -> Result<T, BackupError> {
    r.map_err(|e| {
        m.disk_errors.inc();
        error!(
            error = %chain(&e),
            "the disk replica cannot be written: refusing further epochs; the committed \
             checkpoint stays as it was"
        );
        BackupError::Replica(e)
    })
}

/// A byte count as a gauge value.
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
