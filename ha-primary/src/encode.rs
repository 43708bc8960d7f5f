//! The *identify*, *share* and *encode* stages on the primary: an encoder thread that turns
//! each epoch's dirty pages into epoch-stream bytes with the session's `PageEncoder`, and
//! its disk writes into disk records with a `DiskEncoder` (zero, the session's general
//! codec, or raw), while the guest runs the next epoch.

use crate::harvest::Pages;
use crate::teleport::Teleport;
use crossbeam_channel::{Receiver, Sender};
use ha_codec::cache::CacheStats;
use ha_codec::codec::disk::DiskEncoder;
use ha_codec::codec::{Batch, EncodeStats, EncodedBatch, Mode, PageEncoder};
use ha_guest::domain::DiskWrite;
use ha_wire::disk::DiskRecords;
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
    /// The disk writes of the epoch (checkpoints only).
    pub disk: Vec<DiskWrite>,
    /// Whole-memory digest (verification mode).
    pub verify: Option<[u8; 32]>,
    /// Whole-disk digest (verification mode, a guest with a disk).
    pub verify_disk: Option<[u8; 32]>,
    /// The guest pages the disk filled with whole blocks in the epoch (teleportation's
    /// exact map).
    pub reads: Vec<ha_guest::domain::DiskRead>,
    /// The teleportation index to use from this epoch on (handed over once, after the
    /// disk sync).
    pub teleport: Option<Box<Teleport<std::fs::File>>>,
    /// Where the pages' buffers go once encoded, to be filled again by a later
    /// checkpoint: a buffer reused is neither allocated nor faulted in during a pause.
    pub recycle: Option<Sender<Pages>>,
}

/// Buffers larger than this are dropped, not handed back ([`Job::recycle`]).
pub const RECYCLE_MAX_BYTES: usize = 64 << 20;

/// 4 KiB disk blocks whose last content sent the encoder keeps for deltas (64 MiB).
pub const DISK_CACHE_BLOCKS: usize = 16384;

/// What an epoch's disk records cost, apart from its pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Writes the guest's disk completed in the epoch.
    pub writes: u64,
    /// Bytes those writes wrote.
    pub raw_bytes: u64,
    /// Disk records sent.
    pub records: u64,
    /// Bytes of the Disk frames on the wire.
    pub wire_bytes: u64,
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
    /// Bytes of the epoch on the wire (disk frames included).
    pub wire_bytes: u64,
    /// The disk's share of the epoch.
    pub disk: DiskStats,
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
    let mut teleport: Option<Box<Teleport<std::fs::File>>> = None;
    let mut disk_enc = DiskEncoder::new(enc.config().general, enc.config().zlib_level);
    if enc.config().mode != Mode::Remus {
        // Rewrites of recently written blocks go as deltas (remus stays the baseline).
        disk_enc = disk_enc.with_cache(DISK_CACHE_BLOCKS);
    }
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
        if let Some(t) = job.teleport.take() {
            teleport = Some(t);
        }
        let pages = Batch {
            pages: &job.pages.index,
            data: &job.pages.data,
        };
        match teleport.as_deref_mut() {
            Some(t) => {
                t.apply(&job.disk);
                t.note_reads(&job.reads);
                enc.encode_batch_with_disk(pages, &mut batch, Some(t));
            }
            None => enc.encode_batch(pages, &mut batch),
        }
        let recs = match DiskRecords::encode(&mut disk_enc, &job.disk) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(epoch = job.epoch, error = %e, "the disk's writes cannot be sent");
                return;
            }
        };
        let cfg = *enc.config();
        // Room for every frame, the state's included, so that the epoch is written
        // without growing the buffer.
        let mut out = Vec::with_capacity(
            batch.bytes.len()
                + batch.records.len() * 8
                + recs.bytes.len()
                + job.state.as_ref().map_or(0, Vec::len)
                + 256,
        );
        let h = EpochHeader {
            epoch: job.epoch,
            mode: cfg.mode,
            block_size: cfg.block_size,
            records: EpochWriter::records_in(&batch) + recs.records(),
        };
        let mut w = EpochWriter::begin(&mut out, h);
        // With teleportation the Disk frames go first: a page's disk reference may name a
        // block the epoch wrote ([`crate::teleport`]).
        let disk_first = teleport.is_some();
        let mut disk_frames = 0;
        if disk_first && !recs.is_empty() {
            disk_frames = w.disk(&mut out, &recs);
        }
        w.pages(&mut out, &batch);
        if !disk_first && !recs.is_empty() {
            disk_frames = w.disk(&mut out, &recs);
        }
        if let Some(s) = &job.state {
            w.state(&mut out, s);
        }
        if let Some(d) = &job.verify {
            w.verify_with_disk(&mut out, d, job.verify_disk.as_ref());
        }
        if let Err(e) = w.finish(&mut out) {
            tracing::error!(epoch = job.epoch, error = %e, "epoch writer refused the epoch");
            return;
        }
        let stats = enc.stats().since(&before);
        let report = Encoded {
            epoch: job.epoch,
            pages: job.pages.len(),
            stats,
            wire_bytes: out.len() as u64,
            disk: DiskStats {
                writes: recs.writes,
                raw_bytes: recs.raw_bytes,
                records: u64::from(recs.records()),
                wire_bytes: disk_frames,
            },
            encode: t.elapsed(),
            encode_cpu: thread_cpu().saturating_sub(cpu0),
            cache: enc.cache().map(|c| c.stats()),
            cow_faulted,
            cow_wait,
        };
        // Report before sending: the engine must know an epoch's figures before its ack
        // can arrive.
        if done.send(report).is_err() || link.send((job.epoch, out)).is_err() {
            break;
        }
        if let Some(back) = &job.recycle {
            let mut p = std::mem::take(&mut job.pages);
            if p.data.capacity() <= RECYCLE_MAX_BYTES {
                // The data keeps its length: the next copy overwrites it in place
                // (`harvest::copy_pages`) instead of zero-filling it first.
                p.index.clear();
                // The engine keeps a spare or two; more are dropped.
                let _ = back.try_send(p);
            }
        }
    }
    if let Some(t) = &teleport {
        let s = t.stats();
        tracing::info!(
            references = s.hits,
            from_device_reads = s.read_hits,
            refused = s.refused,
            read_errors = s.read_errors,
            "teleportation: disk references sent"
        );
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
