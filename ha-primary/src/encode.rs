//! The *identify*, *share* and *encode* stages on the primary: an encoder thread that turns
//! each epoch's dirty pages into epoch-stream bytes with the session's `PageEncoder`, while
//! the guest runs the next epoch.

use crate::harvest::Pages;
use crossbeam_channel::{Receiver, Sender};
use ha_codec::cache::CacheStats;
use ha_codec::codec::{Batch, EncodeStats, EncodedBatch, PageEncoder};
use ha_wire::stream::{EpochHeader, EpochWriter};
use std::time::{Duration, Instant};

/// Work for the encoder: one epoch.
#[derive(Debug)]
pub struct Job {
    /// Epoch number.
    pub epoch: u64,
    /// Dirty pages.
    pub pages: Pages,
    /// State blob: present for checkpoints, absent for pre-copy rounds.
    pub state: Option<Vec<u8>>,
    /// Whole-memory digest (verification mode).
    pub verify: Option<[u8; 32]>,
}

/// What the encoder reports for each epoch.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Epoch number.
    pub epoch: u64,
    /// Dirty pages in the epoch.
    pub pages: usize,
    /// Encoder counters for this epoch alone.
    pub stats: EncodeStats,
    /// Bytes of the epoch on the wire.
    pub wire_bytes: u64,
    /// Time spent encoding (wall clock).
    pub encode: Duration,
    /// CPU time the encoder thread spent on it.
    pub encode_cpu: Duration,
    /// The encoder's page-cache counters since the session started (xbzrle, fgbi).
    pub cache: Option<CacheStats>,
    /// A copy-on-write checkpoint: pages the guest wrote before their copy (copied in the
    /// write-fault path).
    pub cow_faulted: usize,
    /// A copy-on-write checkpoint: how long the encoder waited for the copy to finish.
    pub cow_wait: Duration,
}

/// Run the encoder until `jobs` closes: encode each epoch, hand the bytes to the link, and
/// report to the engine. Stops early if the link is gone.
pub fn run(
    mut enc: PageEncoder,
    jobs: Receiver<Job>,
    link: Sender<(u64, Vec<u8>)>,
    done: Sender<Encoded>,
) {
    let mut batch = EncodedBatch::default();
    for mut job in jobs {
        // A copy-on-write checkpoint's pages are being copied behind the running guest.
        let waited = Instant::now();
        let cow_faulted = match job.pages.complete() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(epoch = job.epoch, error = %e, "the copy-on-write copy failed");
                return;
            }
        };
        let cow_wait = waited.elapsed();
        let t = Instant::now();
        let cpu0 = thread_cpu();
        let before = enc.stats().clone();
        batch.clear();
        enc.encode_batch(
            Batch {
                pages: &job.pages.index,
                data: &job.pages.data,
            },
            &mut batch,
        );
        let cfg = *enc.config();
        let mut out = Vec::with_capacity(batch.bytes.len() + batch.records.len() * 8 + 256);
        let h = EpochHeader {
            epoch: job.epoch,
            mode: cfg.mode,
            block_size: cfg.block_size,
            records: EpochWriter::records_in(&batch),
        };
        let mut w = EpochWriter::begin(&mut out, h);
        w.pages(&mut out, &batch);
        if let Some(s) = &job.state {
            w.state(&mut out, s);
        }
        if let Some(d) = &job.verify {
            w.verify(&mut out, d);
        }
        if let Err(e) = w.finish(&mut out) {
            tracing::error!(epoch = job.epoch, error = %e, "epoch writer refused the epoch");
            return;
        }
        let mut stats = enc.stats().clone();
        subtract(&mut stats, &before);
        let report = Encoded {
            epoch: job.epoch,
            pages: job.pages.len(),
            stats,
            wire_bytes: out.len() as u64,
            encode: t.elapsed(),
            encode_cpu: thread_cpu().saturating_sub(cpu0),
            cache: enc.cache().map(|c| c.stats()),
            cow_faulted,
            cow_wait,
        };
        // Report before sending: the engine must know an epoch's figures before its ack
        // can arrive.
        if done.send(report).is_err() || link.send((job.epoch, out)).is_err() {
            return;
        }
    }
}

/// CPU time of the calling thread (zero if the clock cannot be read).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`
    // and reads nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn subtract(a: &mut EncodeStats, b: &EncodeStats) {
    for (x, y) in a.kinds.iter_mut().zip(&b.kinds) {
        x.pages -= y.pages;
        x.bytes -= y.bytes;
    }
    a.changed_blocks -= b.changed_blocks;
    a.shared_blocks -= b.shared_blocks;
    a.zero_blocks -= b.zero_blocks;
    a.literal_blocks -= b.literal_blocks;
}
