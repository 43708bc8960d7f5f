//! The `ha-backup` binary: parse the options, set up logging and signals, pick the
//! backend, and run the backup. Exit codes: 0 stopped, 1 error, 2 primary lost before the
//! first checkpoint, 3 Verify mismatch.

use std::process::ExitCode;

use ha_backend::FactoryOptions;
use ha_backup::config::{Cli, Config, ConfigError};
use ha_backup::metrics::Metrics;
use ha_backup::{chain, run_with_switchover};
use ha_daemon::config::LoadError;

fn main() -> ExitCode {
    let cli = match Cli::load(std::env::args_os()) {
        Ok(c) => c,
        Err(ConfigError::Load(LoadError::Clap(e))) => e.exit(),
        Err(e) => {
            eprintln!("ha-backup: error: {}", chain(&e));
            return ExitCode::from(1);
        }
    };
    ha_daemon::logging::init("info");

    let cfg = match Config::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ha-backup: error: {}", chain(&e));
            return ExitCode::from(1);
        }
    };
    let stop = match ha_daemon::signal::stop_flag() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ha-backup: error: {}", chain(&e));
            return ExitCode::from(1);
        }
    };
    if let Err(e) = ha_backend::probe(cfg.guest) {
        tracing::warn!("{}: failover will fail unless this is fixed", chain(&e));
    }
    let factory = ha_backend::factory(
        cfg.guest,
        &FactoryOptions {
            xl_config: cfg.xen_config.clone(),
            nbd_device: cfg.nbd_device.clone(),
            ..FactoryOptions::default()
        },
    );
    let metrics = Metrics::for_pair(cfg.lease.as_ref().map(|l| l.key.as_str()));
    let metrics_addr = match cfg.metrics {
        Some(a) => match metrics.serve(a, cfg.metrics_port_file.as_deref()) {
            Ok(bound) => Some(bound),
            Err(e) => {
                eprintln!("ha-backup: error: {}", chain(&e));
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = ?cfg.config,
        listen = %cfg.listen,
        memory = cfg.memory_size,
        mode = %cfg.mode,
        block_size = %cfg.block_size,
        detect_timeout_ms = cfg.detect_timeout.as_millis() as u64,
        guest = factory.name(),
        output = ?cfg.output,
        ack_log = ?cfg.ack_log,
        exit_after = ?cfg.exit_after,
        metrics = ?metrics_addr,
        "ha-backup starting"
    );
    // SIGUSR1: a planned switchover, once this host protects a guest it took over.
    let switchover = match ha_daemon::signal::switchover_flag() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ha-backup: error: {}", chain(&e));
            return ExitCode::FAILURE;
        }
    };
    match run_with_switchover(&cfg, factory.as_ref(), &stop, &metrics, Some(&switchover)) {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(e) => {
            eprintln!("ha-backup: error: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}
