//! `ha-bench disksync`: what the initial sync of a disk costs. The primary's disk is
//! filled with incompressible bytes; the backup's replica is a copy of it with a given
//! share of its 4 KiB blocks changed (scattered at random). A real pair (the `db` guest
//! on the disk) then syncs, and the primary's `disk_synced` event says how many blocks
//! differed and what crossed: fingerprints and block records, against the disk's size,
//! and how long the comparison and the whole sync took.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ha_backend::BackendKind;
use serde_json::Value;

use crate::pair::{self, BackupSpec, PairError, PrimarySpec};

/// What to run.
#[derive(Debug, Clone)]
pub struct DiskSyncArgs {
    /// The guest backend.
    pub guest: BackendKind,
    /// Disk size in bytes.
    pub disk: u64,
    /// Shares of the replica's blocks that differ, in percent.
    pub differ: Vec<f64>,
    /// Guest memory (`--memory`).
    pub memory: String,
    /// Where the images and logs go.
    pub dir: PathBuf,
}

/// One run's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncRow {
    /// Disk bytes.
    pub disk_bytes: u64,
    /// Blocks changed in the replica.
    pub changed: u64,
    /// Blocks the sync found different (the changed ones and the guest's early writes).
    pub blocks: u64,
    /// Fingerprint bytes both ways.
    pub fingerprint_bytes: u64,
    /// Wire bytes of the block records.
    pub block_wire_bytes: u64,
    /// Round trips of the comparison.
    pub round_trips: u64,
    /// Comparison time, ms.
    pub compare_ms: u64,
    /// Comparison and queueing of the blocks, ms.
    pub sync_ms: u64,
    /// From the primary's start to protected (memory pre-copy, disk sync, first
    /// checkpoint with both digests), ms.
    pub protected_ms: u64,
}

impl SyncRow {
    /// Bytes that crossed for the disk per byte of disk.
    pub fn sent_ratio(&self) -> f64 {
        (self.fingerprint_bytes + self.block_wire_bytes) as f64 / self.disk_bytes.max(1) as f64
    }
}

/// A xorshift stream (the images' content and the changed blocks' positions).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Write `size` incompressible bytes to `path`, 1 MiB at a time.
fn random_image(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    // On the device before the pair starts: writeback of a fresh image would otherwise
    // slow the backup's journal fsyncs and be counted as the sync's time.
    f.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .sync_all()
}

/// Change `count` distinct blocks of the image at `path`, chosen at random.
fn change_blocks(path: &Path, size: u64, count: u64, seed: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = size / 4096;
    let mut rng = Rng(seed | 1);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count.min(blocks) {
        chosen.insert(rng.next() % blocks);
    }
    let mut block = vec![0u8; 4096];
    for &b in &chosen {
        for w in block.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all_at(&block, b * 4096)?;
    }
    f.sync_all()?;
    Ok(chosen.len() as u64)
}

/// Run one sync per share in `a.differ`; `each` sees each row as it ends.
pub fn run(a: &DiskSyncArgs, mut each: impl FnMut(&SyncRow)) -> Result<Vec<SyncRow>, PairError> {
    let (primary_bin, backup_bin) = pair::daemons()?;
    std::fs::create_dir_all(&a.dir)?;
    let primary_img = a.dir.join("primary.img");
    random_image(&primary_img, a.disk, 0xD15C)?;
    let mut rows = Vec::new();
    for (i, &share) in a.differ.iter().enumerate() {
        let run = a.dir.join(format!("run{i}"));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run)?;
        let replica = run.join("replica.img");
        std::fs::copy(&primary_img, &replica)?;
        std::fs::File::open(&replica)?.sync_all()?;
        #[expect(clippy::cast_sign_loss, reason = "the share is checked to be 0 to 100")]
        let count = ((a.disk / 4096) as f64 * share.clamp(0.0, 100.0) / 100.0).round() as u64;
        let changed = change_blocks(&replica, a.disk, count, 0xC0DE + i as u64)?;
        rows.push(one(
            a,
            &run,
            (&primary_bin, &backup_bin),
            &primary_img,
            changed,
        )?);
        if let Some(r) = rows.last() {
            each(r);
        }
    }
    Ok(rows)
}

fn one(
    a: &DiskSyncArgs,
    run: &Path,
    (primary_bin, backup_bin): (&Path, &Path),
    primary_img: &Path,
    changed: u64,
) -> Result<SyncRow, PairError> {
    let key = run.join("pair.key");
    pair::keygen(primary_bin, &key, run)?;
    let key_args = vec!["--key".to_string(), key.display().to_string()];
    let spec = BackupSpec {
        dir: run,
        memory: &a.memory,
        mode: "fgbi",
        guest: a.guest,
        interval: "25ms",
        detect_timeout: "2s",
        key_args: &key_args,
    };
    let backup_args = spec.args(&[
        "--disk".into(),
        run.join("replica.img").display().to_string(),
        "--events".into(),
        run.join("backup-events.jsonl").display().to_string(),
    ]);
    let _backup = pair::spawn(
        backup_bin,
        &backup_args,
        &run.join("backup.log"),
        "ha-backup",
    )?;
    let addr = pair::backup_addr(&run.join("port"), run)?;
    let events = run.join("primary-events.jsonl");
    let primary_args = PrimarySpec {
        backup: &addr,
        guest: a.guest,
        memory: &a.memory,
        workload: "db",
        mode: "fgbi",
        interval: "25ms",
        events: &events,
        key_args: &key_args,
    }
    .args(&[
        "--disk".into(),
        primary_img.display().to_string(),
        "--run-for".into(),
        "600s".into(),
        // The first checkpoint's digests read the whole disk; on a loaded host its ack
        // may take seconds, which is not what this measures.
        "--ack-timeout".into(),
        "20s".into(),
    ]);
    let started = Instant::now();
    let _primary = pair::spawn(
        primary_bin,
        &primary_args,
        &run.join("primary.log"),
        "ha-primary",
    )?;
    let limit = Duration::from_secs(60 + a.disk / (16 << 20));
    let synced = pair::wait_event(&events, "disk_synced", limit)
        .ok_or_else(|| PairError::Stalled("the disk did not sync".into(), run.to_path_buf()))?;
    let protected_ms = started.elapsed().as_millis() as u64;
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    Ok(SyncRow {
        disk_bytes: n(&synced, "disk_bytes"),
        changed,
        blocks: n(&synced, "blocks"),
        fingerprint_bytes: n(&synced, "fingerprint_bytes"),
        block_wire_bytes: n(&synced, "block_wire_bytes"),
        round_trips: n(&synced, "round_trips"),
        compare_ms: n(&synced, "compare_ms"),
        sync_ms: n(&synced, "ms"),
        protected_ms,
    })
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[SyncRow]) -> String {
    let head = [
        "disk",
        "blocks changed",
        "blocks sent",
        "fingerprints",
        "block records",
        "sent / disk",
        "round trips",
        "compare ms",
        "sync ms",
        "start → protected ms",
    ];
    crate::markdown_table(
        &head,
        rows.iter().map(|r| {
            vec![
                format!("{} MiB", r.disk_bytes >> 20),
                r.changed.to_string(),
                r.blocks.to_string(),
                format!("{:.1} KiB", r.fingerprint_bytes as f64 / 1024.0),
                format!("{:.1} MiB", r.block_wire_bytes as f64 / (1 << 20) as f64),
                format!("{:.2} %", 100.0 * r.sent_ratio()),
                r.round_trips.to_string(),
                r.compare_ms.to_string(),
                r.sync_ms.to_string(),
                r.protected_ms.to_string(),
            ]
        }),
    )
}
