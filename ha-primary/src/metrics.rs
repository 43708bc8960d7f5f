//! Prometheus metrics of the primary: its metric families, the handles the engine
//! updates. The registry, the state gauge and the `GET /metrics` server are
//! [`ha_daemon::metrics`]'s.

use ha_codec::codec::{EncodeStats, Encoding};
use ha_daemon::metrics::Families;
pub use ha_daemon::metrics::{CONTENT_TYPE, Label, MetricsError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Pause-time buckets, seconds: 0.1 ms to 100 ms.
const PAUSE_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];
/// Ack-latency buckets, seconds: 0.5 ms to 5 s.
const ACK_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The states of `castor_state`.
pub const STATES: [&str; 4] = ["syncing", "protected", "unprotected", "fenced"];

/// The primary's metrics: its families (below), the state gauge ([`STATES`]), the registry.
pub type Metrics = ha_daemon::metrics::Metrics<PrimaryFamilies>;

/// The primary's own metric families: cheap handles (clones share their values).
#[derive(Debug)]
pub struct PrimaryFamilies {
    /// Checkpoints acknowledged by the backup.
    pub epochs_committed: Counter,
    /// Guest pause per checkpoint, seconds.
    pub pause_seconds: Histogram,
    /// Bytes sent to the backup, by encoding (`other`: framing, headers, state, digests).
    pub wire_bytes: Family<Label, Counter>,
    /// Raw bytes (dirty pages × 4096) of the epochs sent.
    pub raw_bytes: Counter,
    /// Page-cache hit rate of the encoder (0–1, since start).
    pub cache_hit_rate: Gauge<f64, AtomicU64>,
    /// Checkpoint taken → acknowledged, seconds.
    pub ack_latency_seconds: Histogram,
    /// Output records held now (waiting for their checkpoint's ack).
    pub output_held: Gauge,
    /// Output records released to the world.
    pub output_released: Counter,
    /// Bytes of disk records sent to the backup (apart from `wire_bytes`).
    pub disk_wire_bytes: Counter,
    /// Bytes the guest wrote to its disk in the epochs sent.
    pub disk_raw_bytes: Counter,
    /// Disk writes sent to the backup.
    pub disk_writes: Counter,
}

impl Families for PrimaryFamilies {
    const STATES: &'static [&'static str] = &STATES;

    fn register(r: &mut Registry) -> Self {
        let epochs_committed = Counter::default();
        r.register(
            "castor_primary_epochs_committed",
            "Checkpoints acknowledged by the backup",
            epochs_committed.clone(),
        );
        let pause_seconds = Histogram::new(PAUSE_BUCKETS);
        r.register(
            "castor_primary_pause_seconds",
            "Guest pause per checkpoint (harvest, copy, save), seconds",
            pause_seconds.clone(),
        );
        let wire_bytes = Family::<Label, Counter>::default();
        r.register(
            "castor_primary_wire_bytes",
            "Bytes sent to the backup, by page encoding (other: framing, state, digests)",
            wire_bytes.clone(),
        );
        let raw_bytes = Counter::default();
        r.register(
            "castor_primary_raw_bytes",
            "Dirty pages sent times 4096: what the wire bytes would be without encoding",
            raw_bytes.clone(),
        );
        let cache_hit_rate = Gauge::<f64, AtomicU64>::default();
        r.register(
            "castor_primary_cache_hit_rate",
            "Encoder page-cache hits over lookups since start (xbzrle, fgbi)",
            cache_hit_rate.clone(),
        );
        let ack_latency_seconds = Histogram::new(ACK_BUCKETS);
        r.register(
            "castor_primary_ack_latency_seconds",
            "Checkpoint taken to acknowledged by the backup, seconds",
            ack_latency_seconds.clone(),
        );
        let output_held = Gauge::default();
        r.register(
            "castor_primary_output_held_records",
            "Guest output records held until their checkpoint is acknowledged",
            output_held.clone(),
        );
        let output_released = Counter::default();
        r.register(
            "castor_primary_output_released_records",
            "Guest output records released to the output sink",
            output_released.clone(),
        );
        let disk_wire_bytes = Counter::default();
        r.register(
            "castor_primary_disk_wire_bytes",
            "Bytes of disk records sent to the backup (not in castor_primary_wire_bytes)",
            disk_wire_bytes.clone(),
        );
        let disk_raw_bytes = Counter::default();
        r.register(
            "castor_primary_disk_raw_bytes",
            "Bytes the guest wrote to its disk in the epochs sent",
            disk_raw_bytes.clone(),
        );
        let disk_writes = Counter::default();
        r.register(
            "castor_primary_disk_writes",
            "Disk writes sent to the backup",
            disk_writes.clone(),
        );
        Self {
            epochs_committed,
            pause_seconds,
            wire_bytes,
            raw_bytes,
            cache_hit_rate,
            ack_latency_seconds,
            output_held,
            output_released,
            disk_wire_bytes,
            disk_raw_bytes,
            disk_writes,
        }
    }
}

impl PrimaryFamilies {
    /// Count one encoded epoch's bytes: payload bytes per encoding, the rest as `other`.
    pub fn add_wire(&self, stats: &EncodeStats, wire_bytes: u64) {
        for e in Encoding::ALL {
            let b = stats.kind(e).bytes;
            if b > 0 {
                self.wire_bytes
                    .get_or_create(&[("encoding", e.name())])
                    .inc_by(b);
            }
        }
        let other = wire_bytes.saturating_sub(stats.bytes());
        self.wire_bytes
            .get_or_create(&[("encoding", "other")])
            .inc_by(other);
    }

    /// Count one encoded epoch's disk records.
    pub fn add_disk(&self, d: &crate::encode::DiskStats) {
        self.disk_wire_bytes.inc_by(d.wire_bytes);
        self.disk_raw_bytes.inc_by(d.raw_bytes);
        self.disk_writes.inc_by(d.writes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_the_families_and_the_state() {
        let m = Metrics::new();
        m.epochs_committed.inc_by(3);
        m.set_state("protected");
        m.pause_seconds.observe(0.002);
        // Serving it (200, its content type, 404 elsewhere) is ha_daemon::metrics's test.
        let r = m.render();
        assert!(r.contains("castor_primary_epochs_committed_total 3"), "{r}");
        assert!(r.contains("castor_state{state=\"protected\"} 1"), "{r}");
        assert!(r.contains("castor_state{state=\"syncing\"} 0"), "{r}");
        assert!(
            r.contains("castor_primary_pause_seconds_bucket{le=\"0.0025\"} 1"),
            "{r}"
        );
    }
}
