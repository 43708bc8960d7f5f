//! The *activate* stage: the guest restored from the last committed checkpoint, the output
//! still in its ring re-released, the guest resumed, and from then on its output drained
//! and released by the backup.
//!
//! A guest with a network on this host (`--net-buffer`, `--announce-*`): between the
//! restore (the domain exists, paused, its vif on the bridge) and the resume, a closed
//! network buffer is put on its vifs and a gratuitous ARP for it is broadcast on the
//! bridge; once it runs, the buffers are released for good, because the backup runs the
//! guest unprotected (it checkpoints to nobody). Failing either is logged loudly and
//! does not stop the failover: with the buffers released at once, they hold nothing the
//! guest would not send anyway.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ha_guest::domain::{Devices, Domain, DomainError, DomainFactory};
use ha_wire::output::{OutputError, OutputSink, Source};
use ha_workloads::guest_abi::{GuestStatus, OutputRecord};
use serde_json::json;

use crate::commit::{Resumable, ring_records};
use crate::config::GuestNet;
use ha_daemon::events::EventLog;
use ha_netbuf::NetBuffer;

pub use ha_guest::domain::AUTO_VIFS;

/// How often output is drained and released while active.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// How often progress is logged and written as an event while active.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Errors taking over or running the guest.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The backend cannot build the guest from the checkpoint.
    #[error("cannot restore the guest from checkpoint {epoch} with the {backend} backend")]
    Restore {
        /// The checkpoint.
        epoch: u64,
        /// The backend's name.
        backend: &'static str,
        /// Why.
        #[source]
        source: DomainError,
    },
    /// The output sink cannot be reached or written.
    #[error("cannot release guest output")]
    Output(#[source] OutputError),
    /// A guest operation failed.
    #[error("guest {op} failed")]
    Guest {
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: DomainError,
    },
    /// The guest's lease was lost while the guest was paused for it: another host may run
    /// it now, so this one must not resume it.
    #[error("the guest's lease in etcd was lost ({0}); the guest stays paused here")]
    LeaseLost(String),
}

/// A guest the backup has taken over.
pub struct Active {
    domain: Box<dyn Domain>,
    sink: Option<OutputSink>,
    /// The network buffers on the guest's vifs (removed when dropped).
    plugs: Vec<NetBuffer>,
    /// The checkpoint resumed from.
    pub epoch: u64,
    /// The restored guest's status before it ran (None: it has no status probe).
    pub resumed_from: Option<GuestStatus>,
    /// Records re-released from the committed ring.
    pub rereleased: u64,
    /// Records released since (drained from the running guest).
    pub released: u64,
    /// Declared dead → guest resumed.
    pub activation: Duration,
}

impl std::fmt::Debug for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Active")
            .field("epoch", &self.epoch)
            .field("resumed_from", &self.resumed_from)
            .field("rereleased", &self.rereleased)
            .field("released", &self.released)
            .field("activation", &self.activation)
            .field("net_buffers", &self.plugs.len())
            .finish_non_exhaustive()
    }
}

/// Take the guest over: restore it from `cp` (on the committed image itself, where the
/// backend can take it over without a copy, attached to `devices`: the disk replica of the
/// same checkpoint), connect to the output sink (if any),
/// re-release the records still in the committed ring up to the checkpoint's `out_head`,
/// put the network buffers on its vifs and announce it (`net`), and resume it. `declared`
/// is when the primary was declared dead.
///
/// What the backup learns of the guest comes from the restored domain's capabilities: a
/// guest without an output channel gets no re-release, one without a status probe no
/// status (`resumed_from` is None), rather than whatever its memory holds at the built-in
/// guests' addresses.
pub fn activate(
    factory: &dyn DomainFactory,
    cp: Resumable,
    devices: &Devices,
    output: Option<SocketAddr>,
    net: &GuestNet,
    declared: Instant,
) -> Result<Active, ActivateError> {
    // The committed ring, read before the image becomes the running guest's memory.
    let ring = ring_records(cp.image.as_slice());
    let epoch = cp.epoch;
    let mut domain = factory
        .restore_image(cp.image, &cp.state, devices)
        .map_err(|source| ActivateError::Restore {
            epoch,
            backend: factory.name(),
            source,
        })?;
    let mut sink = output
        .map(|addr| OutputSink::connect(addr, Source::Backup))
        .transpose()
        .map_err(ActivateError::Output)?;
    // What the restored guest itself says, before it runs: the continuity check compares it
    // with the committed checkpoint.
    let resumed_from = status_of(domain.as_ref())?;
    // A guest with an output channel is a built-in one: its committed ring holds the
    // records to re-release.
    let records = if domain.output_channel().is_some() {
        ring
    } else {
        Vec::new()
    };
    if let Some(s) = &mut sink {
        s.release(&records).map_err(ActivateError::Output)?;
    }
    let mut plugs = hold_network(net, domain.as_ref());
    domain.resume().map_err(|source| ActivateError::Guest {
        op: "resume",
        source,
    })?;
    // Unprotected from here on: nothing to hold the guest's packets for.
    for p in &mut plugs {
        if let Err(e) = p.release_indefinite() {
            tracing::error!(vif = p.vif(), error = %ha_daemon::error_chain(&e), "cannot release the network buffer");
        }
    }
    Ok(Active {
        domain,
        sink,
        plugs,
        epoch,
        resumed_from,
        rereleased: records.len() as u64,
        released: 0,
        activation: declared.elapsed(),
    })
}

/// The restored, still paused guest's network: a closed buffer on each vif, then the
/// gratuitous ARP. What fails is logged and skipped (see the module's notes).
fn hold_network(net: &GuestNet, domain: &dyn Domain) -> Vec<NetBuffer> {
    let mut plugs = Vec::new();
    for vif in guest_vifs(net, domain) {
        match NetBuffer::setup(&ha_netbuf::Config::new(&vif)) {
            Ok(p) => {
                tracing::info!(vif, "network buffer on the restored guest's vif (closed)");
                plugs.push(p)
            }
            Err(e) => tracing::error!(
                vif,
                error = %ha_daemon::error_chain(&e),
                "cannot put the network buffer on the restored guest's vif: the guest runs \
                 without it"
            ),
        }
    }
    if let Some(a) = &net.announce {
        // Three copies, as a switch may miss one.
        if let Err(e) = ha_netbuf::announce::gratuitous_arp(&a.bridge, a.mac, a.ip, 3) {
            tracing::error!(
                bridge = a.bridge,
                error = %ha_daemon::error_chain(&e),
                "cannot announce the guest on the bridge; it is found when it sends"
            );
        }
    }
    plugs
}

/// The interfaces `--net-buffer` names, with [`AUTO_VIFS`] replaced by the restored
/// domain's own (a Xen domain's vifs get its new domain id: `vifDOMID.N`).
fn guest_vifs(net: &GuestNet, domain: &dyn Domain) -> Vec<String> {
    let mut out = Vec::new();
    for vif in &net.vifs {
        if vif != AUTO_VIFS {
            out.push(vif.clone());
            continue;
        }
        match domain.net_interfaces() {
            Ok(v) if v.is_empty() => tracing::error!(
                "--net-buffer auto: the restored guest has no network interface on this \
                 host: nothing is held"
            ),
            Ok(v) => out.extend(v),
            Err(e) => tracing::error!(
                error = %ha_daemon::error_chain(&e),
                "--net-buffer auto: cannot list the restored guest's vifs: the guest runs \
                 without a network buffer"
            ),
        }
    }
    out
}

/// What `domain`'s status probe reads, if it has one.
fn status_of(domain: &dyn Domain) -> Result<Option<GuestStatus>, ActivateError> {
    domain
        .status_probe()
        .map(|p| p.read_status())
        .transpose()
        .map_err(|source| ActivateError::Guest {
            op: "status",
            source,
        })
}

impl Active {
    /// The guest, for the primary's engine when this host protects it again.
    pub fn domain_mut(&mut self) -> &mut dyn Domain {
        self.domain.as_mut()
    }

    /// Resume the guest after [`Active::run`] paused it.
    pub fn resume_guest(&mut self) -> Result<(), ActivateError> {
        self.domain.resume().map_err(|source| ActivateError::Guest {
            op: "resume",
            source,
        })
    }

    /// Pause the guest for good (the process is ending).
    pub fn stop_guest(&mut self) -> Result<(), ActivateError> {
        if self.domain.is_paused() {
            return Ok(());
        }
        self.domain.pause().map_err(|source| ActivateError::Guest {
            op: "pause",
            source,
        })
    }

    /// The running guest's status (None: it has no status probe).
    pub fn status(&self) -> Result<Option<GuestStatus>, ActivateError> {
        status_of(self.domain.as_ref())
    }

    /// Drain the guest's new output (if it has an output channel) and release it; then
    /// check the guest's health.
    pub fn pump(&mut self, buf: &mut Vec<OutputRecord>) -> Result<(), ActivateError> {
        buf.clear();
        if let Some(o) = self.domain.output_channel() {
            o.drain(buf).map_err(|source| ActivateError::Guest {
                op: "drain_output",
                source,
            })?;
        }
        if !buf.is_empty() {
            if let Some(s) = &mut self.sink {
                s.release(buf).map_err(ActivateError::Output)?;
            }
            self.released += buf.len() as u64;
        }
        // Unprotected here, the disk's writes go nowhere: drop the log the device keeps
        // for checkpoints, or it grows for as long as the guest runs.
        if let Some(k) = self.domain.disk() {
            k.drain_writes(&mut Vec::new())
                .map_err(|source| ActivateError::Guest {
                    op: "drain disk writes",
                    source,
                })?;
        }
        self.domain
            .check_health()
            .map_err(|source| ActivateError::Guest {
                op: "health check",
                source,
            })
    }

    /// Run the guest until `stop` is raised or `exit_after` has passed: drain and release
    /// output every [`DRAIN_EVERY`], report progress every [`PROGRESS_EVERY`]. Pauses the
    /// guest and releases what it produced last before returning.
    pub fn run(
        &mut self,
        events: &mut EventLog,
        stop: &AtomicBool,
        exit_after: Option<Duration>,
        lease: Option<&ha_lease::Lease>,
    ) -> Result<(), ActivateError> {
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut buf = Vec::new();
        while !stop.load(Ordering::Relaxed) && exit_after.is_none_or(|d| started.elapsed() < d) {
            std::thread::sleep(DRAIN_EVERY);
            if let Some(l) = lease
                && !l.is_held()
                && !self.fence_for(l, events, stop)?
            {
                break;
            }
            self.pump(&mut buf)?;
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let Some(st) = self.status()? else {
                    continue; // the guest reports no progress
                };
                tracing::info!(
                    progress = st.progress,
                    out_head = st.out_head,
                    released = self.released,
                    "active"
                );
                events.note(
                    "progress",
                    json!({"progress": st.progress, "out_head": st.out_head}),
                );
            }
        }
        self.domain.pause().map_err(|source| ActivateError::Guest {
            op: "pause",
            source,
        })?;
        self.pump(&mut buf)
    }

    /// The lease could not be refreshed in time: pause the guest and release nothing
    /// (self-fenced) until the same lease is refreshed (resumed, true), it is lost (an
    /// error; the guest stays paused) or the backup is asked to stop (false).
    fn fence_for(
        &mut self,
        lease: &ha_lease::Lease,
        events: &mut EventLog,
        stop: &AtomicBool,
    ) -> Result<bool, ActivateError> {
        let why = lease
            .failing()
            .unwrap_or_else(|| "no keep-alive answered in time".into());
        tracing::error!(
            reason = %why,
            "lease: not refreshed in time: pausing the guest and holding its output \
             (self-fenced) before the lease can expire in etcd"
        );
        events.note("self_fenced", json!({ "reason": why }));
        let guest = |op| move |source| ActivateError::Guest { op, source };
        self.domain.pause().map_err(guest("pause"))?;
        let t = Instant::now();
        loop {
            if let Some(lost) = lease.lost() {
                tracing::error!(reason = %lost, "lease: lost; the guest stays paused here");
                events.note("lease_lost", json!({ "reason": lost }));
                return Err(ActivateError::LeaseLost(lost));
            }
            if lease.is_held() {
                let ms = t.elapsed().as_millis() as u64;
                tracing::warn!(fenced_ms = ms, "lease: refreshed again: resuming the guest");
                events.note("lease_recovered", json!({ "fenced_ms": ms }));
                self.domain.resume().map_err(guest("resume"))?;
                return Ok(true);
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_guest::testing::StubDomain;

    fn net(vifs: &[&str]) -> GuestNet {
        GuestNet {
            vifs: vifs.iter().map(|v| v.to_string()).collect(),
            announce: None,
        }
    }

    #[test]
    fn auto_stands_for_the_restored_guests_own_vifs_and_fixed_names_stay() {
        let guest = StubDomain::with_vifs(Some(vec!["vif7.0".into(), "castor-web".into()]));
        assert_eq!(
            guest_vifs(&net(&["auto", "tap3"]), &guest),
            ["vif7.0", "castor-web", "tap3"]
        );
        assert_eq!(guest_vifs(&net(&["vif2.0"]), &guest), ["vif2.0"]);
        // A guest without interfaces, or one that cannot list them: nothing for auto (said
        // in the log), the fixed names still.
        assert_eq!(
            guest_vifs(
                &net(&["auto", "tap3"]),
                &StubDomain::with_vifs(Some(Vec::new()))
            ),
            ["tap3"]
        );
        assert_eq!(
            guest_vifs(&net(&["auto"]), &StubDomain::with_vifs(None)),
            Vec::<String>::new()
        );
    }
}
