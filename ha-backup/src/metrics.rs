//! Prometheus metrics of the backup: the registry, the handles the run loop updates, and a
//! tiny HTTP server answering `GET /metrics` (OpenMetrics text) on `--metrics ADDR`.

pub use ha_daemon::metrics::{CONTENT_TYPE, Label};
use ha_daemon::metrics::{StateGauge, render};
use ha_daemon::serve::ServeError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// Commit-time buckets, seconds: 10 µs to 100 ms.
const COMMIT_BUCKETS: [f64; 13] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,
];

/// The states of `castor_state`.
pub const STATES: [&str; 3] = ["listening", "receiving", "active"];

/// Errors starting the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The endpoint could not start.
    #[error("metrics endpoint")]
    Serve(#[from] ServeError),
}

/// The backup's metrics: cheap handles (clones share their values) and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
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
    /// `castor_state`: 1 for the current state, 0 for the others.
    pub state: StateGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let mut r = Registry::default();
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
        let state = StateGauge::register(&mut r, &STATES);
        Self {
            registry: Arc::new(r),
            epochs_committed,
            checkpoints,
            commit_seconds,
            wire_bytes,
            detection_seconds,
            activation_seconds,
            state,
        }
    }

    /// Make `current` (one of [`STATES`]) the state.
    pub fn set_state(&self, current: &'static str) {
        self.state.set(current);
    }

    /// The whole exposition, as `GET /metrics` returns it.
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// Serve `GET /metrics` on `addr` from a background thread; returns the bound address
    /// (and writes it to `port_file`, if given).
    pub fn serve(
        &self,
        addr: SocketAddr,
        port_file: Option<&Path>,
    ) -> Result<SocketAddr, MetricsError> {
        Ok(ha_daemon::metrics::serve(
            Arc::clone(&self.registry),
            addr,
            port_file,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    }

    #[test]
    fn serves_metrics_and_404() {
        let m = Metrics::new();
        m.epochs_committed.inc_by(3);
        m.set_state("receiving");
        m.commit_seconds.observe(0.002);
        let addr = m
            .serve("127.0.0.1:0".parse().expect("addr"), None)
            .expect("serve");
        let r = get(addr, "/metrics");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains(CONTENT_TYPE), "{r}");
        assert!(r.contains("castor_backup_epochs_committed_total 3"), "{r}");
        assert!(r.contains("castor_state{state=\"receiving\"} 1"), "{r}");
        assert!(r.contains("castor_state{state=\"listening\"} 0"), "{r}");
        assert!(
            r.contains("castor_backup_commit_seconds_bucket{le=\"0.0025\"} 1"),
            "{r}"
        );
        let r = get(addr, "/other");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    }
}
