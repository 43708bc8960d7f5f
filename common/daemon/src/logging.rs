//! The daemons' log lines: `tracing` events written to stderr, filtered by `RUST_LOG`
//! (the daemons default to `info`), coloured only when stderr is a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Send this process's `tracing` events to stderr, at the levels `RUST_LOG` asks for or,
/// when it is unset or does not parse, at `default` (e.g. `info`). Only the first call of
/// a process has an effect.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    if set.is_err() {
        tracing::debug!("logging was set up already");
    }
}
