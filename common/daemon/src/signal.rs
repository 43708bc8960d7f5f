//! SIGTERM and SIGINT as a stop flag: either signal raises it, and the daemon stops
//! cleanly at its next look (exit 0). The handlers are `signal-hook`'s, which only store
//! to the flag (async-signal-safe); system calls they interrupt are restarted.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use signal_hook::consts::{SIGINT, SIGTERM};

/// Errors installing the handlers.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// `sigaction` failed.
    #[error("cannot install signal handlers")]
    Install(#[source] std::io::Error),
}

/// Install handlers for SIGTERM and SIGINT that raise the returned flag.
pub fn stop_flag() -> Result<Arc<AtomicBool>, SignalError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(SignalError::Install)?;
    }
    Ok(stop)
}

/// Install a handler for SIGUSR1 that raises the returned flag: `ha-primary` takes it as
/// the operator's request for a planned switchover.
pub fn switchover_flag() -> Result<Arc<AtomicBool>, SignalError> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&flag))
        .map_err(SignalError::Install)?;
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn sigterm_raises_the_flag() {
        let stop = stop_flag().expect("handlers");
        assert!(!stop.load(Ordering::Relaxed));
        signal_hook::low_level::raise(SIGTERM).expect("raise");
        assert!(stop.load(Ordering::Relaxed));
    }
}
