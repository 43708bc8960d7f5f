//! *Activating → active*: the guest resumed from the last committed checkpoint (through
//! [`crate::activate`]), and run until the backup is told to stop.

use std::sync::atomic::AtomicBool;

use ha_guest::domain::{Devices, DomainFactory};
use ha_workloads::guest_abi::GuestStatus;
use serde_json::json;
use tracing::{error, info};

use crate::commit::Committed;
use crate::config::Config;
use crate::detect::Loss;
use crate::{BackupError, Exit, Sinks, activate};

/// Activating → active: resume the guest from the last checkpoint and run it.
pub(crate) fn fail_over(
    cfg: &Config,
    factory: &dyn DomainFactory,
    stop: &AtomicBool,
    sinks: &mut Sinks<'_>,
    committed: Committed,
    loss: &Loss,
) -> Result<Exit, BackupError> {
    let Some(cp) = committed.into_checkpoint() else {
        error!("primary lost before the first checkpoint: nothing to resume");
        return Ok(Exit::NoCheckpoint);
    };
    // With etcd, the guest's key first: a primary that still holds it still runs the guest
    // (only the link between the two broke), and the backup must not run it too.
    let lease = match &cfg.lease {
        None => None,
        Some(lc) => match claim_key(lc, sinks) {
            Some(l) => Some(l),
            None => return Ok(Exit::NotTakingOver),
        },
    };
    info!(
        checkpoint = cp.epoch,
        backend = factory.name(),
        "failing over: activating the guest from the last checkpoint"
    );
    // The replica holds the disk of the same checkpoint: every committed epoch's writes
    // were applied before the next frame was read.
    drop(sinks.replica.take());
    let devices = Devices {
        disk: cfg.disk.clone(),
    };
    let mut active =
        activate::activate(factory, cp, &devices, cfg.output, &cfg.net, loss.declared)?;
    let activation_ms = active.activation.as_millis() as u64;
    sinks
        .metrics
        .activation_seconds
        .set(active.activation.as_secs_f64());
    sinks.metrics.set_state("active");
    let detect_ms = loss.detection().as_millis() as u64;
    let st = active.resumed_from;
    info!(
        checkpoint = active.epoch,
        progress = st.map(|s| s.progress),
        out_head = st.map(|s| s.out_head),
        rereleased = active.rereleased,
        detect_ms,
        activation_ms,
        "active: the guest runs on the backup"
    );
    let mut ev = json!({
        "epoch": active.epoch,
        "activation_ms": activation_ms,
        "rereleased": active.rereleased,
    });
    status_fields(&mut ev, st);
    sinks.events.note("active", ev);
    if let Some(l) = &lease {
        let status = json!({
            "role": "backup",
            "host": ha_lease::hostname(),
            "state": "active (failed over, unprotected)",
            "last_epoch": active.epoch,
        });
        l.publish(
            &ha_lease::status_key(l.key()),
            status.to_string().into_bytes(),
        );
    }
    active.run(sinks.events, stop, cfg.exit_after, lease.as_ref())?;
    info!(released = active.released, "stopping the guest and exiting");
    Ok(Exit::Stopped)
}

/// Claim the guest's key, waiting up to twice the TTL for the primary's lease to expire;
/// None (logged, event `not_taking_over`) when it stays held.
fn claim_key(lc: &ha_lease::LeaseConfig, sinks: &mut Sinks<'_>) -> Option<ha_lease::Lease> {
    let t = std::time::Instant::now();
    info!(
        key = lc.key,
        ttl_s = lc.ttl.as_secs(),
        "failing over: claiming the guest's key in etcd (once the primary's lease has expired)"
    );
    match ha_lease::wait_claim(lc, lc.ttl * 2) {
        Ok(l) => {
            let ms = t.elapsed().as_millis() as u64;
            info!(key = lc.key, waited_ms = ms, "the guest's key is ours");
            sinks
                .events
                .note("lease_claimed", json!({ "key": lc.key, "waited_ms": ms }));
            Some(l)
        }
        Err(e) => {
            let why = crate::chain(&e);
            error!(
                key = lc.key,
                reason = %why,
                "not taking over: the guest's key cannot be claimed (the primary still runs \
                 the guest, or etcd is out of reach); exiting without activating"
            );
            sinks
                .events
                .note("not_taking_over", json!({ "key": lc.key, "reason": why }));
            None
        }
    }
}

/// Add a guest's status to an event: `progress`, `checksum`, `out_head`; or `status: "not
/// reported"` for a guest without a status page (nothing is invented).
pub(crate) fn status_fields(ev: &mut serde_json::Value, st: Option<GuestStatus>) {
    let Some(obj) = ev.as_object_mut() else {
        return;
    };
    match st {
        Some(s) => {
            obj.insert("progress".into(), s.progress.into());
            obj.insert("checksum".into(), s.checksum.into());
            obj.insert("out_head".into(), s.out_head.into());
        }
        None => {
            obj.insert("status".into(), "not reported".into());
        }
    }
}
