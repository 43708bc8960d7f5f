//! What both daemons' Prometheus metrics share: the `castor_state{state}` gauge, the
//! registry, its OpenMetrics exposition, and serving it on `GET /metrics` (through
//! [`crate::serve`]). Each daemon defines only its own metric families ([`Families`]) and
//! uses them as [`Metrics`]`<its families>`.

use crate::serve::{ServeError, serve_metrics};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

/// The content type of the exposition `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A one-label label set.
pub type Label = [(&'static str, &'static str); 1];

/// Errors starting the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The endpoint could not start.
    #[error("metrics endpoint")]
    Serve(#[from] ServeError),
}

/// A daemon's own metric families, registered beside the state gauge.
pub trait Families {
    /// The daemon's states (`castor_state{state}`).
    const STATES: &'static [&'static str];

    /// Register every family in `r`.
    fn register(r: &mut Registry) -> Self;
}

/// A daemon's metrics: its families `F` (reached through `Deref`; the handles are cheap,
/// clones share their values), the state gauge, and the registry they are all in.
#[derive(Debug)]
pub struct Metrics<F> {
    registry: Arc<Registry>,
    state: StateGauge,
    families: F,
}

impl<F: Families> Default for Metrics<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Families> Metrics<F> {
    /// Register the daemon's families, then the state gauge with every state at 0.
    pub fn new() -> Self {
        Self::for_pair(None)
    }

    /// [`Metrics::new`] with every series labelled `pair="<name>"` (the guest's key), so
    /// that one Prometheus scraping many daemons tells the pairs apart.
    pub fn for_pair(pair: Option<&str>) -> Self {
        let mut r = pair_registry(pair);
        let families = F::register(&mut r);
        let state = StateGauge::register(&mut r, F::STATES);
        Self {
            registry: Arc::new(r),
            state,
            families,
        }
    }

    /// [`Metrics::for_pair`] for a daemon that may also do another daemon's work `G`
    /// (ha-backup re-protecting a guest as its primary): `G`'s families go in the same
    /// registry, so the one `GET /metrics` serves both, and `G`'s states are the gauge
    /// `g_state{state}` (`castor_state` stays this daemon's). Both render the whole
    /// registry.
    pub fn for_pair_with<G: Families>(
        pair: Option<&str>,
        g_state: &'static str,
    ) -> (Self, Metrics<G>) {
        let mut r = pair_registry(pair);
        let families = F::register(&mut r);
        let state = StateGauge::register(&mut r, F::STATES);
        let g_families = G::register(&mut r);
        let g_state = StateGauge::register_as(&mut r, g_state, G::STATES);
        let registry = Arc::new(r);
        let g = Metrics {
            registry: Arc::clone(&registry),
            state: g_state,
            families: g_families,
        };
        let own = Self {
            registry,
            state,
            families,
        };
        (own, g)
    }
}

/// An empty registry, every series in it labelled `pair="<name>"` when `pair` is given.
fn pair_registry(pair: Option<&str>) -> Registry {
    let labels = pair.map(|p| {
        (
            std::borrow::Cow::Borrowed("pair"),
            std::borrow::Cow::Owned(p.to_owned()),
        )
    });
    Registry::with_labels(labels.into_iter())
}

impl<F> Metrics<F> {
    /// Make `current` (one of the daemon's states) the state.
    pub fn set_state(&self, current: &'static str) {
        self.state.set(current);
    }

    /// The whole exposition, as `GET /metrics` returns it.
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// Serve `GET /metrics` on `addr` from background threads and log its URL; returns the
    /// bound address (and writes it to `port_file`, if given).
    pub fn serve(
        &self,
        addr: SocketAddr,
        port_file: Option<&Path>,
    ) -> Result<SocketAddr, MetricsError> {
        let bound = serve(Arc::clone(&self.registry), addr, port_file)?;
        tracing::info!(url = %format!("http://{bound}/metrics"), "serving metrics");
        Ok(bound)
    }
}

impl<F> Deref for Metrics<F> {
    type Target = F;

    fn deref(&self) -> &F {
        &self.families
    }
}

/// `castor_state{state}`: 1 for the daemon's current state, 0 for its other states.
#[derive(Debug, Clone)]
pub struct StateGauge {
    family: Family<Label, Gauge>,
    states: &'static [&'static str],
}

impl StateGauge {
    /// Register the gauge (`castor_state`) in `r` with every one of `states` at 0.
    pub fn register(r: &mut Registry, states: &'static [&'static str]) -> Self {
        Self::register_as(r, "castor_state", states)
    }

    /// [`StateGauge::register`] under the name `name`.
    pub fn register_as(r: &mut Registry, name: &str, states: &'static [&'static str]) -> Self {
        let family = Family::<Label, Gauge>::default();
        for s in states {
            family.get_or_create(&[("state", s)]).set(0);
        }
        r.register(
            name,
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

    use crate::testing::http_get_raw as get;
    use prometheus_client::metrics::counter::Counter;

    /// A daemon's families in small.
    #[derive(Debug)]
    struct Mine {
        done: Counter,
    }

    impl Families for Mine {
        const STATES: &'static [&'static str] = &["idle", "busy"];
        fn register(r: &mut Registry) -> Self {
            let done = Counter::default();
            r.register("castor_test_done", "Things done", done.clone());
            Self { done }
        }
    }

    #[test]
    fn serves_metrics_and_404() {
        let m = Metrics::<Mine>::new();
        m.done.inc_by(3);
        m.set_state("busy");
        let addr = m
            .serve("127.0.0.1:0".parse().expect("addr"), None)
            .expect("serve");
        let r = get(addr, "/metrics");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains(CONTENT_TYPE), "{r}");
        assert!(r.contains("castor_test_done_total 3"), "{r}");
        assert!(r.contains("castor_state{state=\"busy\"} 1"), "{r}");
        assert!(r.contains("castor_state{state=\"idle\"} 0"), "{r}");
        let r = get(addr, "/other");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    }

    #[test]
    fn a_pair_label_goes_on_every_series() {
        let m = Metrics::<Mine>::for_pair(Some("/castor/guests/web1"));
        m.done.inc();
        m.set_state("idle");
        let text = m.render();
        assert!(
            text.contains("castor_test_done_total{pair=\"/castor/guests/web1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("castor_state{pair=\"/castor/guests/web1\",state=\"idle\"} 1"),
            "{text}"
        );
    }

    /// A second daemon's families in small.
    #[derive(Debug)]
    struct Theirs {
        sent: Counter,
    }

    impl Families for Theirs {
        const STATES: &'static [&'static str] = &["off", "on"];
        fn register(r: &mut Registry) -> Self {
            let sent = Counter::default();
            r.register("castor_other_sent", "Things sent", sent.clone());
            Self { sent }
        }
    }

    #[test]
    fn a_second_daemons_families_share_the_registry_and_keep_their_own_state() {
        let (mine, theirs) =
            Metrics::<Mine>::for_pair_with::<Theirs>(Some("g"), "castor_other_state");
        mine.done.inc();
        mine.set_state("busy");
        theirs.sent.inc_by(2);
        theirs.set_state("on");
        let text = mine.render();
        assert_eq!(text, theirs.render());
        for want in [
            "castor_test_done_total{pair=\"g\"} 1",
            "castor_other_sent_total{pair=\"g\"} 2",
            "castor_state{pair=\"g\",state=\"busy\"} 1",
            "castor_other_state{pair=\"g\",state=\"on\"} 1",
            "castor_other_state{pair=\"g\",state=\"off\"} 0",
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        // One family per name: the second daemon's states are not in castor_state.
        assert_eq!(text.matches("# TYPE castor_state ").count(), 1, "{text}");
        assert!(
            !text.contains("castor_state{pair=\"g\",state=\"on\"}"),
            "{text}"
        );
    }

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
