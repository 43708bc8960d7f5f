//! Failure detection: deciding the primary is lost, why, and how long it took to notice.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::link::ReceiveError;

/// Why the primary is considered lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossReason {
    /// No frame for the detection timeout.
    Timeout(Duration),
    /// The connection was closed.
    Closed,
    /// The connection failed (read or ack write).
    Io(String),
    /// The stream was corrupt or violated the protocol: the primary cannot be trusted.
    Corrupt(String),
    /// A planned switchover: the primary handed the guest over (its reason).
    Handover(String),
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossReason::Timeout(d) => write!(f, "no frame for {} ms", d.as_millis()),
            LossReason::Closed => f.write_str("connection closed"),
            LossReason::Io(e) => write!(f, "connection failed: {e}"),
            LossReason::Corrupt(e) => write!(f, "corrupt stream: {e}"),
            LossReason::Handover(r) => write!(f, "handed over: {r}"),
        }
    }
}

/// The primary's loss: why, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// Why.
    pub reason: LossReason,
    /// When the last frame arrived.
    pub last_frame: Instant,
    /// When the primary was declared dead.
    pub declared: Instant,
    /// The same moment on the wall clock, for the event log (an operator or a drill lines
    /// it up with what it did, e.g. when it killed the primary).
    pub declared_at: SystemTime,
}

impl Loss {
    /// Declare the primary dead now.
    pub fn now(reason: LossReason, last_frame: Instant) -> Self {
        Self {
            reason,
            last_frame,
            declared: Instant::now(),
            declared_at: SystemTime::now(),
        }
    }

    /// When the primary was declared dead, in milliseconds since the Unix epoch.
    pub fn declared_unix_ms(&self) -> u64 {
        self.declared_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Detection time: last frame received → declared dead.
    pub fn detection(&self) -> Duration {
        self.declared.saturating_duration_since(self.last_frame)
    }
}

/// The loss a receive error means; `None` for a stop request (not a loss).
pub fn classify(e: &ReceiveError) -> Option<LossReason> {
    match e {
        ReceiveError::Silent(d) => Some(LossReason::Timeout(*d)),
        ReceiveError::Closed => Some(LossReason::Closed),
        ReceiveError::Io(e) => Some(LossReason::Io(e.to_string())),
        ReceiveError::Framing(e) => Some(LossReason::Corrupt(e.to_string())),
        ReceiveError::Tampered(e) => Some(LossReason::Corrupt(format!("encrypted channel: {e}"))),
        ReceiveError::Stopped => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_well() {
        assert_eq!(
            LossReason::Timeout(Duration::from_millis(75)).to_string(),
            "no frame for 75 ms"
        );
        assert_eq!(classify(&ReceiveError::Stopped), None);
        assert_eq!(classify(&ReceiveError::Closed), Some(LossReason::Closed));
        let l = Loss::now(LossReason::Closed, Instant::now());
        assert!(l.detection() < Duration::from_secs(1));
    }
}
