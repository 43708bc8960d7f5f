//! *Activating → active*: the guest resumed from the last committed checkpoint (through
//! [`crate::activate`]), and run until the backup is told to stop.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use ha_guest::domain::{Devices, DomainFactory};
use ha_workloads::guest_abi::GuestStatus;
use serde_json::json;
use tracing::{error, info, warn};

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
    if !cfg.reprotect_to.is_empty() {
        return reprotect(cfg, stop, sinks, active, lease);
    }
    active.run(sinks.events, stop, cfg.exit_after, lease.as_ref())?;
    info!(released = active.released, "stopping the guest and exiting");
    Ok(Exit::Stopped)
}

/// How long the guest runs unprotected between two rounds of attempts to reach a backup.
pub const REPROTECT_RETRY: Duration = Duration::from_millis(200);

/// Re-protection: the guest this backup took over gets a backup again. Run it
/// unprotected, trying each of `--reprotect-to` in turn every [`REPROTECT_RETRY`]; the
/// first that welcomes this host gets it, and from then on this process is the guest's
/// primary ([`ha_primary::engine`]): the new backup's image is compared by fingerprints
/// (only what differs crosses), then checkpoints as usual. The primary's events go to
/// `EVENTS.reprotect` beside the backup's `--events`, its metrics to the backup's
/// registry ([`crate::metrics::Metrics::primary`], served on `--metrics`).
fn reprotect(
    cfg: &Config,
    stop: &AtomicBool,
    sinks: &mut Sinks<'_>,
    mut active: activate::Active,
    lease: Option<ha_lease::Lease>,
) -> Result<Exit, BackupError> {
    let started = Instant::now();
    let mut pcfg = primary_config(cfg)?;
    let left = || cfg.exit_after.map(|d| d.saturating_sub(started.elapsed()));
    let mut tries = 0u64;
    loop {
        for &addr in &cfg.reprotect_to {
            pcfg.backup = addr;
            // Should this backup die too, the others are tried again as well.
            pcfg.reprotect_also = cfg.reprotect_to.clone();
            tries += 1;
            let conn = match ha_primary::engine::connect(&pcfg, active.domain_mut()) {
                Ok(c) => c,
                Err(e) => {
                    if tries <= cfg.reprotect_to.len() as u64 {
                        warn!(backup = %addr, error = %crate::chain(&e), "re-protection: no backup there yet; the guest runs unprotected; retrying every {REPROTECT_RETRY:?}");
                    }
                    continue;
                }
            };
            let unprotected_ms = started.elapsed().as_millis() as u64;
            info!(backup = %addr, unprotected_ms, "re-protection: a backup welcomed this host; this host is the guest's primary now");
            sinks.events.note(
                "reprotecting",
                json!({ "backup": addr.to_string(), "unprotected_ms": unprotected_ms }),
            );
            sinks.metrics.set_state("reprotected");
            pcfg.run_for = left();
            // The primary's families are in the backup's registry: its `--metrics` serves them.
            let summary = ha_primary::engine::run_connected(
                conn,
                &pcfg,
                active.domain_mut(),
                stop,
                sinks.metrics.primary(),
                lease,
                sinks.switchover,
            )
            .map_err(BackupError::Reprotect)?;
            info!(
                epochs = summary.epochs_committed,
                sync_ms = summary.sync_ms,
                precopy_wire_bytes = summary.precopy_wire_bytes,
                backup_lost = summary.backup_lost,
                "re-protection ended; stopping the guest and exiting"
            );
            sinks.events.note("reprotection_ended", json!(summary));
            if summary.switched_over {
                info!("switched over: the guest runs on at this host's backup");
            }
            active.stop_guest()?;
            return Ok(Exit::Stopped);
        }
        let slice = left().map_or(REPROTECT_RETRY, |l| l.min(REPROTECT_RETRY));
        active.run(sinks.events, stop, Some(slice), lease.as_ref())?;
        if stop.load(std::sync::atomic::Ordering::Relaxed) || left().is_some_and(|l| l.is_zero()) {
            info!(released = active.released, "stopping the guest and exiting");
            return Ok(Exit::Stopped);
        }
        active.resume_guest()?;
    }
}

/// The primary's settings for re-protection: the pair's mode, block size and interval,
/// the pair key, this host's output sink, `--reprotect-link-rate`; the rest ha-primary's
/// defaults.
fn primary_config(cfg: &Config) -> Result<ha_primary::engine::Config, BackupError> {
    use ha_codec::codec::{CodecConfig, GeneralCodec};
    Ok(ha_primary::engine::Config {
        backup: cfg.listen,
        codec: CodecConfig {
            mode: cfg.mode,
            block_size: cfg.block_size,
            general: GeneralCodec::Zlib,
            zlib_level: 1,
        },
        cache_bytes: 64 << 20,
        interval: cfg.interval,
        pipeline: ha_primary::engine::default_pipeline(cfg.guest),
        heartbeat: cfg.interval,
        ack_timeout: Duration::from_secs(2),
        fence: false,
        // Losing the backup it re-protected to, it tries that address again, then the
        // other --reprotect-to addresses (set per attempt in `reprotect`).
        reprotect: true,
        reprotect_also: Vec::new(),
        verify_every: 0,
        teleport: true,
        precopy_rounds: 5,
        precopy_threshold: 1024,
        run_for: None,
        output: cfg.output,
        stats: None,
        events: cfg.events.as_ref().map(|p| {
            let mut s = p.clone().into_os_string();
            s.push(".reprotect");
            s.into()
        }),
        key: cfg.pair_key()?,
        link_rate: cfg.reprotect_link_rate,
        backend: cfg.guest,
        copy: ha_primary::cow::CopyPolicy::Auto,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(args: &[&str]) -> Config {
        let cli = crate::config::Cli::try_parse_from(
            [
                "ha-backup",
                "--insecure",
                "--reprotect-to",
                "127.0.0.1:7701",
            ]
            .iter()
            .chain(args),
        )
        .expect("test arguments parse");
        Config::from_cli(&cli).expect("valid options")
    }

    #[test]
    fn the_reprotect_link_rate_reaches_the_primary() {
        let p = primary_config(&config(&["--reprotect-link-rate", "1gbit"])).expect("config");
        assert_eq!(p.link_rate, Some(1_000_000_000));
        let p = primary_config(&config(&[])).expect("config");
        assert_eq!(p.link_rate, None);
    }
}
