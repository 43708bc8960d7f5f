//! The world's check of released output: [`OutputChecker`] (no skip, no repeat with other
//! content, no primary record ahead of the committed checkpoints) and [`Consumer`], the
//! loopback sink the drill and the tests run, which reports a [`WorldView`].

use super::{Source, committed_out_head, read_records};
use ha_workloads::guest_abi::OutputRecord;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// A violation of what the world may see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A sequence number was skipped.
    #[error("output skipped from seq {expected} to {got}")]
    Skip {
        /// The next sequence number expected.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// A sequence number seen before, with other content.
    #[error("output seq {0} repeated with different content")]
    Changed(u64),
    /// The primary released a record before its checkpoint was committed.
    #[error(
        "primary released seq {seq} before a checkpoint holding it was acknowledged (committed out_head {committed})"
    )]
    Uncommitted {
        /// The record.
        seq: u64,
        /// The highest committed out_head at the time.
        committed: u64,
    },
}

/// The world's check of released output: no skip, no repeat with other content, and no
/// primary record ahead of the committed checkpoints.
#[derive(Debug, Default)]
pub struct OutputChecker {
    seen: BTreeMap<u64, Vec<u8>>,
    next: u64,
    /// Records accepted (repeats included).
    pub received: u64,
    /// Repeats with identical content (allowed: the backup re-releases after failover).
    pub repeats: u64,
}

impl OutputChecker {
    /// Check one record. `committed` is the highest committed out_head (from the ack
    /// log), consulted only for records the primary released.
    pub fn check(
        &mut self,
        source: Source,
        r: &OutputRecord,
        committed: impl FnOnce() -> u64,
    ) -> Result<(), Violation> {
        self.received += 1;
        // An early release is reported, but the record still counts in the sequence, so
        // one violation does not cascade into others.
        let early = match source {
            Source::Primary => {
                let c = committed();
                (r.seq >= c).then_some(Violation::Uncommitted {
                    seq: r.seq,
                    committed: c,
                })
            }
            Source::Backup => None,
        };
        let order = if r.seq < self.next {
            match self.seen.get(&r.seq) {
                Some(p) if *p == r.payload => {
                    self.repeats += 1;
                    Ok(())
                }
                _ => Err(Violation::Changed(r.seq)),
            }
        } else if r.seq > self.next {
            Err(Violation::Skip {
                expected: self.next,
                got: r.seq,
            })
        } else {
            self.seen.insert(r.seq, r.payload.clone());
            self.next += 1;
            Ok(())
        };
        match early {
            Some(v) => Err(v),
            None => order,
        }
    }

    /// The next sequence number expected (= distinct records seen).
    pub fn next_seq(&self) -> u64 {
        self.next
    }
}

/// What the world saw (see [`Consumer`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorldView {
    /// Distinct records in sequence (the next sequence number expected).
    pub next_seq: u64,
    /// Records received from the primary.
    pub from_primary: u64,
    /// One past the highest sequence number the primary released (0: none).
    pub primary_next: u64,
    /// The payload of that record (a built-in guest's: its progress word first, so what
    /// the world saw acknowledged).
    pub primary_last_payload: Vec<u8>,
    /// Records received from the backup.
    pub from_backup: u64,
    /// Identical repeats (the backup re-releasing after a failover).
    pub repeats: u64,
    /// Violations: skips, changed repeats, primary releases ahead of the commits.
    pub violations: Vec<String>,
    /// When each of `violations` was seen (ms since the Unix epoch), in the same order.
    pub violations_at_ms: Vec<u64>,
    /// When the last record from the primary arrived (ms since the Unix epoch; 0: none).
    pub primary_last_ms: u64,
    /// When the first record from the backup arrived (ms since the Unix epoch; 0: none).
    pub backup_first_ms: u64,
}

/// The world: accepts output connections from both daemons on loopback and checks every
/// record, the primary's against the backup's ack log. Used by the drill and the tests.
#[derive(Debug)]
pub struct Consumer {
    /// The sink address to give the daemons.
    pub addr: SocketAddr,
    view: std::sync::Arc<std::sync::Mutex<(OutputChecker, WorldView)>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Consumer {
    /// Listen on a free loopback port; `ack_log` is the backup's ack log.
    pub fn start(ack_log: std::path::PathBuf) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), ack_log)
    }

    /// Listen on `bind` (e.g. `0.0.0.0:0`, for daemons in other network namespaces).
    pub fn start_on(bind: SocketAddr, ack_log: std::path::PathBuf) -> std::io::Result<Self> {
        Self::start_chain(bind, vec![ack_log])
    }

    /// Listen on `bind` for a guest protected by one backup after another (re-protection
    /// after a failover): a record any primary released must be below the highest
    /// out_head committed in any of `ack_logs` (the guest's output sequence is one, so the
    /// backups' logs continue each other; a log not written yet counts as 0).
    pub fn start_chain(
        bind: SocketAddr,
        ack_logs: Vec<std::path::PathBuf>,
    ) -> std::io::Result<Self> {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind(bind)?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let view = std::sync::Arc::new(std::sync::Mutex::new((
            OutputChecker::default(),
            WorldView::default(),
        )));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (v, st) = (view.clone(), stop.clone());
        std::thread::Builder::new()
            .name("castor-world".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let Ok((s, _)) = l.accept() else {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    let (view, logs) = (v.clone(), ack_logs.clone());
                    std::thread::spawn(move || {
                        let _ = read_records(s, |src, r| {
                            let mut g = view
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            let (checker, w) = &mut *g;
                            let res = checker.check(src, &r, || {
                                logs.iter()
                                    .map(|l| committed_out_head(l).unwrap_or(0))
                                    .max()
                                    .unwrap_or(0)
                            });
                            let now = unix_ms();
                            match src {
                                Source::Primary => {
                                    w.from_primary += 1;
                                    if r.seq + 1 > w.primary_next {
                                        w.primary_next = r.seq + 1;
                                        w.primary_last_payload.clone_from(&r.payload);
                                    }
                                    w.primary_last_ms = now;
                                }
                                Source::Backup => {
                                    w.from_backup += 1;
                                    if w.backup_first_ms == 0 {
                                        w.backup_first_ms = now;
                                    }
                                }
                            }
                            if let Err(e) = res {
                                w.violations.push(format!("{src:?}: {e}"));
                                w.violations_at_ms.push(now);
                            }
                            w.next_seq = checker.next_seq();
                            w.repeats = checker.repeats;
                        });
                    });
                }
            })?;
        Ok(Self { addr, view, stop })
    }

    /// What it saw so far.
    pub fn view(&self) -> WorldView {
        self.view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }
}

/// Milliseconds since the Unix epoch (the clock the daemons' events carry).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::rec;
    use super::*;

    #[test]
    fn checker_catches_skips_changes_and_early_release() {
        let mut c = OutputChecker::default();
        assert_eq!(c.check(Source::Primary, &rec(0, 1), || 5), Ok(()));
        let early = c.check(Source::Primary, &rec(1, 1), || 1);
        assert_eq!(
            early,
            Err(Violation::Uncommitted {
                seq: 1,
                committed: 1
            })
        );
        assert_eq!(
            c.next_seq(),
            2,
            "an early record still counts in the sequence"
        );
        let skip = c.check(Source::Backup, &rec(3, 1), || 0);
        assert_eq!(
            skip,
            Err(Violation::Skip {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(c.check(Source::Backup, &rec(1, 1), || 0), Ok(()));
        assert_eq!(c.check(Source::Backup, &rec(0, 1), || 0), Ok(()));
        assert_eq!(
            c.check(Source::Backup, &rec(1, 2), || 0),
            Err(Violation::Changed(1))
        );
        assert_eq!((c.next_seq(), c.repeats), (2, 2));
    }
}
