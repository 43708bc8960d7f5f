//! Prometheus metrics of the backup: its metric families, the handles the run loop
//! updates, and the primary's families it serves too (for when it re-protects a guest as
//! its primary). The registry, the state gauge and the `GET /metrics` server are
//! [`ha_daemon::metrics`]'s.

use ha_daemon::metrics::Families;
pub use ha_daemon::metrics::{CONTENT_TYPE, Label, MetricsError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Commit-time buckets, seconds: 10 µs to 100 ms.
const COMMIT_BUCKETS: [f64; 13] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,
];

/// Disk bytes per epoch buckets: 512 B to 64 MiB.
const DISK_BUCKETS: [f64; 9] = [
    512.0, 4096.0, 32768.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 33554432.0, 67108864.0,
];

/// The states of `castor_state`.
pub const STATES: [&str; 4] = ["listening", "receiving", "active", "reprotected"];

/// The state gauge of the primary this backup becomes when it re-protects a guest (its
/// states are [`ha_primary::metrics::STATES`]).
pub const PRIMARY_STATE: &str = "castor_primary_state";

/// The backup's metrics: its families (below) and state gauge ([`STATES`]), reached
/// through `Deref`; and in the same registry, so on the same `GET /metrics`, the
/// `castor_primary_*` families and the [`PRIMARY_STATE`] gauge of the primary it becomes
/// when it re-protects a guest ([`Metrics::primary`]), zero until then.
#[derive(Debug)]
pub struct Metrics {
    own: ha_daemon::metrics::Metrics<BackupFamilies>,
    primary: ha_primary::metrics::Metrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The families, every state at 0.
    pub fn new() -> Self {
        Self::for_pair(None)
    }

    /// [`Metrics::new`] with every series labelled `pair="<name>"` (the guest's key), as
    /// ha-primary labels its own.
    pub fn for_pair(pair: Option<&str>) -> Self {
        let (own, primary) = ha_daemon::metrics::Metrics::for_pair_with(pair, PRIMARY_STATE);
        Self { own, primary }
    }

    /// The metrics of the primary this backup becomes when it re-protects a guest.
    pub fn primary(&self) -> &ha_primary::metrics::Metrics {
        &self.primary
    }
}

impl std::ops::Deref for Metrics {
    type Target = ha_daemon::metrics::Metrics<BackupFamilies>;

    fn deref(&self) -> &Self::Target {
        &self.own
    }
}

/// The backup's own metric families: cheap handles (clones share their values).
#[derive(Debug)]
pub struct BackupFamilies {
    /// Epochs committed (pre-copy rounds and checkpoints).
    pub epochs_committed: Counter,
    /// Checkpoints committed (what a failover can resume from).
    pub checkpoints: Counter,
    /// Time to apply one staged epoch to the committed image, seconds.
    pub commit_seconds: Histogram,
    /// Bytes of committed epochs as received.
    pub wire_bytes: Counter,
    /// Last frame from the primary → declared lost, seconds (set at failover).
    pub detection_seconds: Gauge<f64, AtomicU64>,
    /// Declared lost → guest resumed, seconds (set at failover).
    pub activation_seconds: Gauge<f64, AtomicU64>,
    /// Bytes of disk records received in committed epochs (part of `wire_bytes`).
    pub disk_wire_bytes: Counter,
    /// Disk writes applied to the replica.
    pub disk_writes: Counter,
    /// Bytes written to the replica per checkpoint that carried disk writes.
    pub disk_epoch_bytes: Histogram,
    /// Bytes of the disk journal as last written (0 once an apply cleared it).
    pub journal_bytes: Gauge,
    /// The replica or its journal could not be written (the backup then takes no epoch).
    pub disk_errors: Counter,
}

impl Families for BackupFamilies {
    const STATES: &'static [&'static str] = &STATES;

    fn register(r: &mut Registry) -> Self {
        let epochs_committed = Counter::default();
        r.register(
            "castor_backup_epochs_committed",
            "Epochs committed to the image (pre-copy rounds and checkpoints)",
            epochs_committed.clone(),
        );
        let checkpoints = Counter::default();
        r.register(
            "castor_backup_checkpoints",
            "Checkpoints committed and acknowledged",
            checkpoints.clone(),
        );
        let commit_seconds = Histogram::new(COMMIT_BUCKETS);
        r.register(
            "castor_backup_commit_seconds",
            "Time to apply one verified epoch to the committed image, seconds",
            commit_seconds.clone(),
        );
        let wire_bytes = Counter::default();
        r.register(
            "castor_backup_wire_bytes",
            "Bytes of committed epochs as received from the primary",
            wire_bytes.clone(),
        );
        let detection_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            "castor_backup_detection_seconds",
            "Failover: last frame from the primary to declaring it lost, seconds",
            detection_seconds.clone(),
        );
        let activation_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            "castor_backup_activation_seconds",
            "Failover: declaring the primary lost to the guest running here, seconds",
            activation_seconds.clone(),
        );
        let disk_wire_bytes = Counter::default();
        r.register(
            "castor_backup_disk_wire_bytes",
            "Bytes of disk records in committed epochs (part of castor_backup_wire_bytes)",
            disk_wire_bytes.clone(),
        );
        let disk_writes = Counter::default();
        r.register(
            "castor_backup_disk_writes",
            "Disk writes applied to the replica",
            disk_writes.clone(),
        );
        let disk_epoch_bytes = Histogram::new(DISK_BUCKETS);
        r.register(
            "castor_backup_disk_epoch_bytes",
            "Bytes written to the replica per checkpoint that carried disk writes",
            disk_epoch_bytes.clone(),
        );
        let journal_bytes = Gauge::default();
        r.register(
            "castor_backup_journal_bytes",
            "Bytes of the disk journal as last written (0 once the apply cleared it)",
            journal_bytes.clone(),
        );
        let disk_errors = Counter::default();
        r.register(
            "castor_backup_disk_errors",
            "Failures writing the disk replica or its journal (no epoch is taken after one)",
            disk_errors.clone(),
        );
        Self {
            epochs_committed,
            checkpoints,
            commit_seconds,
            wire_bytes,
            detection_seconds,
            activation_seconds,
            disk_wire_bytes,
            disk_writes,
            disk_epoch_bytes,
            journal_bytes,
            disk_errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_the_families_and_the_state() {
        let m = Metrics::new();
        m.epochs_committed.inc_by(3);
        m.set_state("receiving");
        m.commit_seconds.observe(0.002);
        // Serving it (200, its content type, 404 elsewhere) is ha_daemon::metrics's test.
        let r = m.render();
        assert!(r.contains("castor_backup_epochs_committed_total 3"), "{r}");
        assert!(r.contains("castor_state{state=\"receiving\"} 1"), "{r}");
        assert!(r.contains("castor_state{state=\"listening\"} 0"), "{r}");
        assert!(
            r.contains("castor_backup_commit_seconds_bucket{le=\"0.0025\"} 1"),
            "{r}"
        );
    }

    #[test]
    fn the_primarys_families_are_served_beside_the_backups() {
        let m = Metrics::for_pair(Some("/castor/guests/web1"));
        m.set_state("reprotected");
        m.primary().epochs_committed.inc_by(4);
        m.primary().set_state("protected");
        let r = m.render();
        for want in [
            "castor_primary_epochs_committed_total{pair=\"/castor/guests/web1\"} 4",
            "castor_primary_state{pair=\"/castor/guests/web1\",state=\"protected\"} 1",
            "castor_state{pair=\"/castor/guests/web1\",state=\"reprotected\"} 1",
            "castor_backup_epochs_committed_total{pair=\"/castor/guests/web1\"} 0",
        ] {
            assert!(r.contains(want), "{want} not in {r}");
        }
    }
}
