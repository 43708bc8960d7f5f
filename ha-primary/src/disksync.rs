//! The initial sync of the guest's disk, before protection: find which 4 KiB blocks of
//! the backup's replica differ from this disk (fingerprints coarse to fine, one level per
//! round trip: `ha_wire::disksync`), then send only those blocks, as disk records of
//! pre-copy epochs, while the guest runs.
//!
//! The same comparison, over memory frames, finds the pages of an image the backup
//! already holds (re-protection: the old primary's memory, a stale copy) that differ from
//! the guest's memory; the engine's first pre-copy round sends only those.
//!
//! The guest may write meanwhile. Its write log is emptied just before the comparison,
//! and every write completed after that goes with the first checkpoint, after the blocks:
//! a block read before a write is overwritten by the write's record, a block read after
//! it already holds it. So the replica equals the disk at the first checkpoint, which
//! carries both digests (protection starts when they agree at the backup).

use crate::link::{Control, LinkEvent};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ha_guest::domain::{Disk, DiskWrite, Domain, DomainError};
use ha_wire::disksync::{self, Comparer, DiskSyncError, ReadAt, Step, SumRequest, Sums, Target};
use std::time::{Duration, Instant};

/// The block the comparison and the records work in.
pub const BLOCK: u64 = 4096;
/// Disk bytes one pre-copy epoch carries at most.
pub const EPOCH_BYTES: u64 = 4 << 20;
/// Bytes one disk record run covers at most (consecutive differing blocks merged).
const RUN_BYTES: u64 = 1 << 20;

/// Errors of the initial disk sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The comparison failed: a malformed answer, or a disk that cannot be read.
    #[error("initial disk sync")]
    Compare(#[from] DiskSyncError),
    /// The backup did not answer a request in time.
    #[error("the backup did not answer the disk sync request (level {level}) within {waited:?}")]
    NoAnswer {
        /// The level asked for.
        level: u8,
        /// How long the primary waited.
        waited: Duration,
    },
    /// Reading this disk for the blocks to send failed.
    #[error("cannot read the disk for the initial sync")]
    Read(#[source] DomainError),
}

/// What the comparison found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compared {
    /// The 4 KiB blocks that differ, ascending.
    pub blocks: Vec<u64>,
    /// Fingerprint bytes both ways (request and answer bodies).
    pub fingerprint_bytes: u64,
    /// Round trips taken.
    pub round_trips: u32,
    /// How long the comparison took.
    pub took: Duration,
}

/// How a comparison ended.
#[derive(Debug)]
pub enum Outcome {
    /// The replica was compared.
    Compared(Compared),
    /// The link closed meanwhile (the reason): the backup is lost.
    Closed(String),
}

/// The guest's disk as the comparison reads it.
pub struct DiskReader<'a>(pub &'a dyn Disk);

impl std::fmt::Debug for DiskReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskReader")
            .field("size", &self.0.disk_size())
            .finish()
    }
}

impl ReadAt for DiskReader<'_> {
    fn size(&self) -> u64 {
        self.0.disk_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf).map_err(std::io::Error::other)
    }
}

/// The guest's memory as the comparison reads it (while the guest runs: a page written
/// meanwhile is in the dirty log and sent again).
pub struct MemoryReader<'a>(pub &'a dyn Domain);

impl std::fmt::Debug for MemoryReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryReader")
            .field("size", &self.0.memory_size())
            .finish()
    }
}

impl ReadAt for MemoryReader<'_> {
    fn size(&self) -> u64 {
        self.0.memory_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0
            .read_memory(offset, buf)
            .map_err(std::io::Error::other)
    }
}

/// How long to wait for an answer: the ack timeout, plus a second per 128 MiB of disk
/// (the backup reads its replica for the fingerprints).
pub fn answer_wait(ack_timeout: Duration, disk_size: u64) -> Duration {
    ack_timeout + Duration::from_secs(disk_size.div_ceil(128 << 20))
}

/// Run the comparison of `local` with the backup's copy of `target` over the link: each
/// request through `ctl`, each answer from `events` (nothing else is in flight yet),
/// waiting up to `wait` per answer.
pub fn compare(
    local: &dyn ReadAt,
    target: Target,
    ctl: &Sender<Control>,
    events: &Receiver<LinkEvent>,
    wait: Duration,
) -> Result<Outcome, SyncError> {
    let t = Instant::now();
    let (mut comparer, mut req) = match target {
        Target::Disk => Comparer::new(local.size()),
        Target::Memory => Comparer::skipping(local.size()),
    };
    let mut out = Compared::default();
    loop {
        let body = req.encode();
        out.fingerprint_bytes += body.len() as u64;
        out.round_trips += 1;
        let mut frame = Vec::with_capacity(body.len() + 8);
        disksync::put_request(&mut frame, target, &req);
        if ctl.send(Control::Frame(frame)).is_err() {
            return Ok(Outcome::Closed("the link to the backup is gone".into()));
        }
        // This side's fingerprints while the backup takes its own.
        comparer.prepare(local)?;
        let answer = match await_sums(events, &req, wait)? {
            Ok(a) => a,
            Err(why) => return Ok(Outcome::Closed(why)),
        };
        out.fingerprint_bytes += answer.len() as u64;
        let sums = Sums::decode(&answer)?;
        tracing::debug!(
            level = req.level,
            chunks = sums.sums.len(),
            "disk sync: fingerprints compared"
        );
        match comparer.on_sums(local, &sums)? {
            Step::Ask(next) => req = next,
            Step::Differ(blocks) => {
                out.blocks = blocks;
                out.took = t.elapsed();
                return Ok(Outcome::Compared(out));
            }
        }
    }
}

/// The next Sums body, or the reason the link closed.
fn await_sums(
    events: &Receiver<LinkEvent>,
    req: &SumRequest,
    wait: Duration,
) -> Result<Result<Vec<u8>, String>, SyncError> {
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(LinkEvent::Sums(body)) => return Ok(Ok(body)),
            Ok(LinkEvent::Closed(why)) => return Ok(Err(why)),
            // Nothing else is in flight; anything else is not the answer.
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                return Err(SyncError::NoAnswer {
                    level: req.level,
                    waited: wait,
                });
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Ok(Err("the link to the backup is gone".into()));
            }
        }
    }
}

/// The differing `blocks` (ascending) cut into pre-copy epochs of at most
/// [`EPOCH_BYTES`]: each epoch a list of runs of consecutive blocks (first block, count),
/// a run at most 1 MiB.
pub fn epochs(blocks: &[u64]) -> Vec<Vec<(u64, u64)>> {
    let per_run = RUN_BYTES / BLOCK;
    let per_epoch = EPOCH_BYTES / BLOCK;
    let mut out: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut in_epoch = per_epoch;
    for &b in blocks {
        if in_epoch == per_epoch {
            out.push(Vec::new());
            in_epoch = 0;
        }
        in_epoch += 1;
        let runs = out.last_mut().expect("an epoch was pushed above");
        match runs.last_mut() {
            Some((first, n)) if *first + *n == b && *n < per_run => *n += 1,
            _ => runs.push((b, 1)),
        }
    }
    out
}

/// Read the runs of one epoch from `disk` as disk writes (the blocks' current content).
pub fn read_runs(disk: &dyn Disk, runs: &[(u64, u64)]) -> Result<Vec<DiskWrite>, SyncError> {
    let size = disk.disk_size();
    runs.iter()
        .map(|&(first, n)| {
            let offset = first * BLOCK;
            let len = (n * BLOCK).min(size.saturating_sub(offset));
            let mut data = vec![0u8; len as usize];
            disk.read_at(offset, &mut data).map_err(SyncError::Read)?;
            Ok(DiskWrite { offset, data })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_neighbours_and_epochs_are_bounded() {
        let blocks: Vec<u64> = (0..300).chain(400..402).chain([500]).collect();
        let e = epochs(&blocks);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0], vec![(0, 256), (256, 44), (400, 2), (500, 1)]);
        let many: Vec<u64> = (0..2500).map(|i| i * 2).collect();
        let e = epochs(&many);
        assert_eq!(e.len(), 3, "1024 blocks (4 MiB) per epoch");
        assert_eq!(e[0].len(), 1024);
        assert_eq!(e.iter().map(Vec::len).sum::<usize>(), 2500);
        assert!(epochs(&[]).is_empty());
    }
}
