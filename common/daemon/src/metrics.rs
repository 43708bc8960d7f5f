//! What both daemons' Prometheus metrics share: the `castor_state{state}` gauge, the
//! OpenMetrics exposition of a registry, and serving it on `GET /metrics` (through
//! [`crate::serve`]). Each daemon registers its own metrics beside these.

use crate::serve::{ServeError, serve_metrics};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// The content type of the exposition `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A one-label label set.
pub type Label = [(&'static str, &'static str); 1];

/// `castor_state{state}`: 1 for the daemon's current state, 0 for its other states.
#[derive(Debug, Clone)]
pub struct StateGauge {
    family: Family<Label, Gauge>,
    states: &'static [&'static str],
}

impl StateGauge {
    /// Register the gauge in `r` with every one of `states` at 0.
    pub fn register(r: &mut Registry, states: &'static [&'static str]) -> Self {
        let family = Family::<Label, Gauge>::default();
        for s in states {
            family.get_or_create(&[("state", s)]).set(0);
        }
        r.register(
            "castor_state",
            "The daemon's state: 1 for the current one",
            family.clone(),
        );
        Self { family, states }
    }

    /// Make `current` (one of the states) the state.
    pub fn set(&self, current: &'static str) {
        for s in self.states {
            self.family
                .get_or_create(&[("state", s)])
                .set(i64::from(*s == current));
        }
    }
}

/// The whole exposition of `r`, as `GET /metrics` returns it.
pub fn render(r: &Registry) -> String {
    let mut body = String::new();
    if let Err(e) = encode(&mut body, r) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    body
}

/// Serve `GET /metrics` with the exposition of `r` on `addr` from background threads;
/// returns the bound address (also written to `port_file`, if given).
pub fn serve(
    r: Arc<Registry>,
    addr: SocketAddr,
    port_file: Option<&Path>,
) -> Result<SocketAddr, ServeError> {
    serve_metrics(addr, port_file, CONTENT_TYPE, move || render(&r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_state_at_a_time() {
        let mut r = Registry::default();
        let g = StateGauge::register(&mut r, &["a", "b", "c"]);
        let text = render(&r);
        assert!(text.contains("castor_state{state=\"a\"} 0"), "{text}");
        g.set("b");
        g.set("c");
        let text = render(&r);
        assert!(text.contains("castor_state{state=\"c\"} 1"), "{text}");
        assert!(text.contains("castor_state{state=\"b\"} 0"), "{text}");
        assert!(text.contains("castor_state{state=\"a\"} 0"), "{text}");
    }
}
