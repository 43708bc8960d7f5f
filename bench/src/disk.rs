//! The disks of a bench pair's guest, and the drill's checks of the backup's replica.
//!
//! A `db` or `files` guest runs on a disk (`--disk` on both daemons). [`Images::create`]
//! makes the primary's disk as an operator would before protection — zeros (a sparse
//! file) for `db`, the document tree of `ha_workloads::files::format_disk` for `files` —
//! and the backup's replica as a copy of it. After a failover, [`check_replica`] holds
//! the replica to the reference model: every `db` update the world saw acknowledged reads
//! back as the model wrote it (`ha_workloads::db::check_acknowledged`), and the replica is
//! the model's disk at some progress from the checkpoint the backup resumed from on
//! (the committed disk plus the writes of the guest resumed from it:
//! `ImageModel::run_until_disk_equals`).

use ha_workloads::db;
use ha_workloads::guest_abi::{GuestParams, Workload};
use ha_workloads::model::ImageModel;
use serde::Serialize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a guest's disks could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The workload's layout does not fit the heap and disk.
    #[error(
        "a {workload} guest with a {heap}-byte heap does not fit a {size}-byte disk \
         (see docs/GUESTS.md); give another --disk-size"
    )]
    Layout {
        /// The workload.
        workload: &'static str,
        /// Heap bytes.
        heap: u64,
        /// Disk bytes.
        size: u64,
    },
    /// Writing an image failed.
    #[error("disk image {path}")]
    Io {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The primary's disk and the backup's replica, equal when made.
#[derive(Debug, Clone)]
pub struct Images {
    /// The primary's `--disk`.
    pub primary: PathBuf,
    /// The backup's `--disk`.
    pub replica: PathBuf,
}

impl Images {
    /// `disk.img` and `replica.img` in `dir`, of `p.disk_size` bytes, for the workload
    /// and seed of `p`: zeros, or for `files` the document tree.
    pub fn create(dir: &Path, p: &GuestParams) -> Result<Self, DiskError> {
        let layout = DiskError::Layout {
            workload: p.workload.name(),
            heap: p.heap_size,
            size: p.disk_size,
        };
        if !ha_workloads::model::disk_layout_fits(p) {
            return Err(layout);
        }
        let (primary, replica) = (dir.join("disk.img"), dir.join("replica.img"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DiskError::Io { path, source }
        };
        let zeros = |path: &Path| {
            std::fs::File::create(path)
                .and_then(|f| f.set_len(p.disk_size))
                .map_err(io(path))
        };
        zeros(&primary)?;
        if p.workload == Workload::Files {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&primary)
                .map_err(io(&primary))?;
            ha_workloads::files::format_disk(p.seed, p.heap_size, p.disk_size, |at, b| {
                f.write_all_at(b, at)
            })
            .ok_or(layout)?
            .map_err(io(&primary))?;
            std::fs::copy(&primary, &replica).map_err(io(&replica))?;
        } else {
            zeros(&replica)?;
        }
        // On the disk before the guest runs: a tree still being written back would slow
        // the first seconds of its run (and its flushes) on this host.
        for path in [&primary, &replica] {
            std::fs::File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(io(path))?;
        }
        Ok(Self { primary, replica })
    }
}

/// What the drill knows of a failed-over disk guest, to check its replica with.
#[derive(Debug, Clone)]
pub struct Failover<'a> {
    /// The primary's disk as the killed primary left it: when the replica fails its
    /// check, this one is held to the model too, to tell a guest that wrote wrong from
    /// writes lost on the way.
    pub primary_disk: Option<&'a Path>,
    /// Guest memory, bytes.
    pub memory_size: u64,
    /// The guest's parameters as the primary built them (disk size included).
    pub params: &'a GuestParams,
    /// The progress word of the last output record the primary released.
    pub acked: u64,
    /// The progress of the checkpoint the backup resumed from.
    pub resumed: u64,
    /// The last progress the backup reported before it stopped.
    pub end: u64,
}

/// The drill's findings on the backup's replica.
#[derive(Debug, Clone, Serialize)]
pub struct DiskCheck {
    /// The disk's size, bytes.
    pub disk_bytes: u64,
    /// `db`: the last update the world saw acknowledged.
    pub acked_updates: Option<u64>,
    /// `db`: how many of them were read back from the replica's log (all unless the log
    /// wrapped).
    pub acked_checked: Option<u64>,
    /// The progress at which the replica equalled the model's disk (None: at none).
    pub replica_progress: Option<u64>,
    /// Each check: name, passed, details.
    pub checks: Vec<(String, bool, String)>,
}

/// Check the replica at `replica` after the failover `f`: for `db`, every update the world
/// saw acknowledged reads back as the model wrote it; for every disk workload, the replica
/// is the model's disk at a progress from the resumed checkpoint's on (the guest ran on
/// the replica after taking over; the search goes up to twice as far past `end` as the
/// backup ran, at least 1000 units).
pub fn check_replica(replica: &Path, f: &Failover) -> DiskCheck {
    let mut out = DiskCheck {
        disk_bytes: f.params.disk_size,
        acked_updates: None,
        acked_checked: None,
        replica_progress: None,
        checks: Vec::new(),
    };
    let name_cont = "the replica is the committed disk plus the resumed guest's writes";
    let disk = match std::fs::read(replica) {
        Ok(d) => d,
        Err(e) => {
            out.checks.push((
                name_cont.into(),
                false,
                format!("{}: {e}", replica.display()),
            ));
            return out;
        }
    };
    let mut model = ImageModel::fresh(f.memory_size, f.params);
    if let Some(l) = db::Layout::of(f.params).filter(|_| f.params.workload == Workload::Db) {
        model.run_to(f.acked);
        let (ok, detail) = match db::check_acknowledged(&l, &disk, &model.disk, f.acked) {
            Ok(w) if f.acked > 0 => {
                out.acked_checked = Some(w.end - w.start);
                (
                    true,
                    format!(
                        "updates {}..={} of 1..={} read back as the model wrote them",
                        w.start,
                        w.end - 1,
                        f.acked
                    ),
                )
            }
            Ok(_) => (false, "the world saw no acknowledged update".into()),
            Err(e) => (false, e.to_string()),
        };
        out.acked_updates = Some(f.acked);
        out.checks.push((
            "every update the world saw acknowledged is on the replica".into(),
            ok,
            detail,
        ));
    }
    model.run_to(f.resumed);
    let limit = f.end + f.end.saturating_sub(f.resumed).max(1000);
    let (ok, detail) = match model.run_until_disk_equals(&disk, limit) {
        Ok(p) => {
            out.replica_progress = Some(p);
            (
                true,
                format!(
                    "equal to the model's disk at progress {p} (resumed at {}, ran to {})",
                    f.resumed, f.end
                ),
            )
        }
        Err(e) => (false, format!("{e}{}", primary_disk_said(f, limit))),
    };
    out.checks.push((name_cont.into(), ok, detail));
    out
}

/// For a replica that failed its check: whether the primary's own disk is the model's at
/// some progress from the resumed checkpoint's on (then its writes were right and some
/// were lost on the way to the replica), as a clause for the check's details.
fn primary_disk_said(f: &Failover, limit: u64) -> String {
    let Some(path) = f.primary_disk else {
        return String::new();
    };
    let disk = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) => return format!("; the primary's disk: {}: {e}", path.display()),
    };
    let mut model = ImageModel::fresh(f.memory_size, f.params);
    model.run_to(f.resumed);
    match model.run_until_disk_equals(&disk, limit) {
        Ok(p) => format!("; the primary's disk is the model's at progress {p}"),
        Err(e) => format!("; the primary's disk is not the model's either: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_workloads::guest_abi::HEAP_GPA;

    fn params(workload: Workload) -> GuestParams {
        GuestParams {
            workload,
            seed: 4,
            heap_gpa: HEAP_GPA,
            heap_size: 256 * 4096,
            rate: 0,
            tsc_khz: 0,
            output_every: 32,
            doorbell_every: 256,
            disk_size: 512 * 4096,
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ha-bench-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The images start equal and as the model's fresh disk; a replica written by a
    /// guest resumed at a checkpoint passes every check, and one that lost an
    /// acknowledged update or a write of the resumed guest fails the check it breaks.
    #[test]
    fn replicas_are_held_to_the_model() {
        for w in [Workload::Db, Workload::Files] {
            let p = params(w);
            let dir = scratch(w.name());
            let im = Images::create(&dir, &p).unwrap();
            let (a, b) = (
                std::fs::read(&im.primary).unwrap(),
                std::fs::read(&im.replica).unwrap(),
            );
            let mut model = ImageModel::fresh(2 << 20, &p);
            assert!(a == b && a == model.disk, "{w:?}: fresh images");
            // Acknowledged 640, committed at 700, the backup's guest ran to 1024 (a unit
            // that writes, in both workloads).
            model.run_to(1024);
            let f = Failover {
                primary_disk: Some(&im.primary),
                memory_size: 2 << 20,
                params: &p,
                acked: 640,
                resumed: 700,
                end: 1024,
            };
            std::fs::write(&im.replica, &model.disk).unwrap();
            let c = check_replica(&im.replica, &f);
            assert!(c.checks.iter().all(|c| c.1), "{w:?}: {c:?}");
            assert_eq!(c.checks.len(), if w == Workload::Db { 2 } else { 1 });
            assert_eq!(c.replica_progress, Some(1024), "{w:?}");
            // A written page lost: the continuation check fails.
            let mut lost = model.disk.clone();
            let last = *model.take_disk_written().last().unwrap();
            lost[(last * 4096) as usize] ^= 0xFF;
            std::fs::write(&im.replica, &lost).unwrap();
            let c = check_replica(&im.replica, &f);
            let last = c.checks.last().unwrap();
            assert!(!last.1, "{w:?}: {c:?}");
            // The primary's disk (fresh, never written) is not the model's at 700 on.
            assert!(
                last.2
                    .contains("the primary's disk is not the model's either"),
                "{c:?}"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
        // db: an acknowledged update's record torn fails the acknowledgement check.
        let p = params(Workload::Db);
        let dir = scratch("dbtorn");
        let im = Images::create(&dir, &p).unwrap();
        let mut model = ImageModel::fresh(2 << 20, &p);
        model.run_to(1000);
        let l = db::Layout::of(&p).unwrap();
        let mut torn = model.disk.clone();
        torn[(l.log_page(100) * 4096 + (99 % 64) * 64 + 24) as usize] ^= 1;
        std::fs::write(&im.replica, &torn).unwrap();
        let f = Failover {
            primary_disk: None,
            memory_size: 2 << 20,
            params: &p,
            acked: 640,
            resumed: 700,
            end: 1000,
        };
        let c = check_replica(&im.replica, &f);
        assert!(
            !c.checks[0].1 && c.checks[0].2.contains("update 100 "),
            "{c:?}"
        );
        assert_eq!(c.acked_updates, Some(640));
        let _ = std::fs::remove_dir_all(&dir);
        // A layout that does not fit is refused before any file is made.
        let small = GuestParams {
            disk_size: 4096,
            ..params(Workload::Files)
        };
        assert!(matches!(
            Images::create(&dir, &small),
            Err(DiskError::Layout { size: 4096, .. })
        ));
    }
}
