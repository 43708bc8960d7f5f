//! Copy-on-write checkpoints on the primary: which path each checkpoint's pages take, and
//! the thread that copies them behind the running guest.
//!
//! Copy-in-pause copies every dirty page while the guest waits, so the pause grows with the
//! dirty set. Copy-on-write ([`ha_guest::cow`]) write-protects the pages in the pause and
//! copies them behind the running guest (on the copier thread, at once); the pause then
//! holds only the arming, but every page the guest writes before the copy reaches it costs
//! the guest a write fault. [`Chooser`] picks per checkpoint from costs it measures as the
//! run goes: the per-page copy time of copy-in-pause checkpoints, the per-page arming time,
//! the share of armed pages the guest wrote before their copy, and the backend's measured
//! cost of one write fault ([`ha_guest::cow::CowMemory::fault_cost`]). The copier starts
//! on a checkpoint's pages once the guest runs again ([`Chooser::release`]).
//!
//! `--copy auto` (the default) copies in the pause while that is expected to stay short
//! (under [`SMALL_PAUSE`]) or while copy-on-write is expected to cost the guest more
//! (arming plus the expected faults, against the copy); `pause` and `cow` force one path
//! (`cow` fails on a guest without copy-on-write memory).

use crossbeam_channel::{Receiver, Sender};
use ha_guest::cow::{CopiedPages, PendingCopy};
use ha_guest::domain::DomainError;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A copy-in-pause expected to be this short is taken as it is: the pause is within target
/// already, and copy-on-write would only add write faults.
pub const SMALL_PAUSE: Duration = Duration::from_micros(500);

/// One write fault's cost to the guest when the backend has not measured it (PVM: ~40 µs
/// a fault under write-protection).
pub const FAULT_COST_GUESS: Duration = Duration::from_micros(40);

/// Copy time per page before any was measured.
const COPY_NS_GUESS: f64 = 2_000.0;

/// Arming time per page before any was measured.
const ARM_NS_GUESS: f64 = 300.0;

/// Under `auto`, after this many checkpoints copied in the pause because copy-on-write
/// looked dearer, one is taken copy-on-write again to measure its costs afresh.
const PROBE_EVERY: u32 = 16;

/// A per-page time sample counts for at most this many times the current estimate: on a
/// shared host one checkpoint descheduled in the middle must not decide the next ones.
const OUTLIER: f64 = 4.0;

/// Weight of a new measurement in the running estimates.
const EWMA: f64 = 0.25;

/// Errors of copy-on-write checkpoints on the primary.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// Not one of auto, pause, cow.
    #[error("{0:?} is not a copy path (auto, pause, cow)")]
    Policy(String),
    /// The copier thread cannot be started.
    #[error("cannot start the copy-on-write copier thread")]
    Spawn(#[source] std::io::Error),
    /// The copier thread ended without completing a copy.
    #[error("the copy-on-write copier thread is gone")]
    CopierGone,
}

/// `--copy`: how checkpoints copy their pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CopyPolicy {
    /// Per checkpoint, from the measured costs.
    #[default]
    Auto,
    /// Always copy in the pause.
    Pause,
    /// Always copy-on-write (the guest must offer it).
    Cow,
}

impl FromStr for CopyPolicy {
    type Err = CowError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "pause" => Ok(Self::Pause),
            "cow" => Ok(Self::Cow),
            _ => Err(CowError::Policy(s.to_string())),
        }
    }
}

impl std::fmt::Display for CopyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Pause => "pause",
            Self::Cow => "cow",
        })
    }
}

/// The path a checkpoint's pages took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CopyPath {
    /// Copied while the guest was paused.
    #[default]
    Pause,
    /// Write-protected in the pause, copied behind the running guest.
    Cow,
}

impl CopyPath {
    /// "pause" or "cow" (the stats file's `copy` column, the events).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Cow => "cow",
        }
    }
}

/// What the copier reports back: pages copied, pages the guest faulted on, copies done.
#[derive(Debug, Default)]
struct Feedback {
    pages: AtomicU64,
    faulted: AtomicU64,
    /// Copies completed (or failed), with a condition to wait on.
    done: Mutex<u64>,
    cv: Condvar,
}

impl Feedback {
    fn finished(&self) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *d += 1;
        self.cv.notify_all();
    }
}

type Done = Result<CopiedPages, DomainError>;

/// An armed copy for the copier, and where its result goes.
type Work = (Box<dyn PendingCopy>, Sender<Done>);

/// The thread that completes armed copies in order, as soon as they are armed.
#[derive(Debug)]
struct Copier {
    work: Option<Sender<Work>>,
    thread: Option<JoinHandle<()>>,
}

impl Copier {
    fn start(feedback: Arc<Feedback>) -> Result<Self, CowError> {
        let (tx, rx) = crossbeam_channel::unbounded::<Work>();
        let thread = std::thread::Builder::new()
            .name("castor-cow-copy".into())
            .spawn(move || {
                for (p, out) in rx {
                    let r = p.complete();
                    if let Ok(c) = &r {
                        feedback
                            .pages
                            .fetch_add(c.index.len() as u64, Ordering::Relaxed);
                        feedback
                            .faulted
                            .fetch_add(c.faulted as u64, Ordering::Relaxed);
                    }
                    feedback.finished();
                    // The encoder may be gone (the session ended): nothing to hand over.
                    let _ = out.send(r);
                }
            })
            .map_err(CowError::Spawn)?;
        Ok(Self {
            work: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.work = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A checkpoint's pages being copied behind the running guest; the encoder waits for them.
#[derive(Debug)]
pub struct Pending {
    pages: usize,
    result: Receiver<Done>,
}

impl Pending {
    /// Pages in the copy.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Wait for the copy: every page as it was at the checkpoint.
    pub fn complete(self) -> Result<CopiedPages, DomainError> {
        self.result.recv().map_err(|_| DomainError::Backend {
            op: "copy-on-write checkpoint",
            source: CowError::CopierGone.into(),
        })?
    }
}

/// One checkpoint's measured costs, for the stats.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimate {
    /// Expected copy-in-pause time per page, ns.
    pub copy_ns: f64,
    /// Expected arming time per page, ns.
    pub arm_ns: f64,
    /// Expected share of armed pages the guest writes before their copy.
    pub fault_share: f64,
    /// One write fault's cost to the guest, ns (measured by the backend, or the guess).
    pub fault_ns: f64,
}

/// Picks each checkpoint's path from the costs measured so far, and hands copy-on-write
/// copies to the copier thread.
#[derive(Debug)]
pub struct Chooser {
    policy: CopyPolicy,
    est: Estimate,
    feedback: Arc<Feedback>,
    /// Completed-copy totals already folded into `fault_share`.
    seen: (u64, u64),
    /// Copies handed to the copier.
    armed: u64,
    /// Auto checkpoints copied in the pause for cost since copy-on-write was last tried.
    declined: u32,
    /// Checkpoints per path: copied in the pause, copy-on-write.
    pub taken: [u64; 2],
    /// A copy armed in the pause, handed to the copier once the guest runs again.
    queued: Option<Work>,
    // Last: dropped after everything else, joining the copier.
    copier: Option<Copier>,
}

fn ewma(old: f64, new: f64) -> f64 {
    old + EWMA * (new - old)
}

/// [`ewma`] of a time sample, capped at [`OUTLIER`] times the estimate.
fn ewma_time(old: f64, new: f64) -> f64 {
    ewma(old, new.min(old * OUTLIER))
}

impl Chooser {
    /// A chooser under `policy`, with first guesses for the costs.
    pub fn new(policy: CopyPolicy) -> Self {
        Self {
            policy,
            est: Estimate {
                copy_ns: COPY_NS_GUESS,
                arm_ns: ARM_NS_GUESS,
                fault_share: 0.0,
                fault_ns: FAULT_COST_GUESS.as_nanos() as f64,
            },
            feedback: Arc::default(),
            seen: (0, 0),
            armed: 0,
            declined: 0,
            taken: [0; 2],
            queued: None,
            copier: None,
        }
    }

    /// The policy.
    pub fn policy(&self) -> CopyPolicy {
        self.policy
    }

    /// The current estimates.
    pub fn estimate(&self) -> Estimate {
        self.est
    }

    /// Wait until every copy handed to the copier is done (outside the pause, so the next
    /// arm never has to finish one while the guest waits).
    pub fn settle(&self) {
        let mut d = self.feedback.done.lock().unwrap_or_else(|e| e.into_inner());
        while *d < self.armed {
            d = self.feedback.cv.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Fold in what copies completed since the last call.
    fn absorb(&mut self) {
        let pages = self.feedback.pages.load(Ordering::Relaxed);
        let faulted = self.feedback.faulted.load(Ordering::Relaxed);
        let (dp, df) = (pages - self.seen.0, faulted - self.seen.1);
        if dp > 0 {
            self.est.fault_share = ewma(self.est.fault_share, df as f64 / dp as f64);
        }
        self.seen = (pages, faulted);
    }

    /// The path for a checkpoint of `pages` dirty pages; `fault_cost`: the guest offers
    /// copy-on-write memory (`Some`), with the backend's measured cost of a write fault if
    /// it has one (`Some(Some(_))`).
    pub fn choose(&mut self, pages: usize, fault_cost: Option<Option<Duration>>) -> CopyPath {
        self.absorb();
        if let Some(Some(c)) = fault_cost {
            self.est.fault_ns = c.as_nanos() as f64;
        }
        let path = match self.policy {
            CopyPolicy::Pause => CopyPath::Pause,
            CopyPolicy::Cow => CopyPath::Cow,
            CopyPolicy::Auto if fault_cost.is_none() || pages == 0 => CopyPath::Pause,
            CopyPolicy::Auto => {
                let n = pages as f64;
                let e = self.est;
                let copy = n * e.copy_ns;
                let cow = n * (e.arm_ns + e.fault_share * e.fault_ns);
                if copy <= SMALL_PAUSE.as_nanos() as f64 {
                    CopyPath::Pause
                } else if cow <= copy || self.declined >= PROBE_EVERY {
                    CopyPath::Cow
                } else {
                    self.declined += 1;
                    CopyPath::Pause
                }
            }
        };
        if path == CopyPath::Cow {
            self.declined = 0;
        }
        path
    }

    /// A checkpoint copied `pages` pages in the pause in `took`.
    pub fn copied(&mut self, pages: usize, took: Duration) {
        self.taken[0] += 1;
        if pages > 0 {
            self.est.copy_ns = ewma_time(self.est.copy_ns, took.as_nanos() as f64 / pages as f64);
        }
    }

    /// A checkpoint armed `pending` in `took`: queue its copy for the copier thread (see
    /// [`Chooser::release`]) and return it for the encoder to wait on.
    pub fn armed(
        &mut self,
        pending: Box<dyn PendingCopy>,
        took: Duration,
    ) -> Result<Pending, CowError> {
        let pages = pending.pages();
        if pages > 0 {
            self.est.arm_ns = ewma_time(self.est.arm_ns, took.as_nanos() as f64 / pages as f64);
        }
        if self.copier.is_none() {
            self.copier = Some(Copier::start(Arc::clone(&self.feedback))?);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.release();
        self.queued = Some((pending, tx));
        self.armed += 1;
        self.taken[1] += 1;
        Ok(Pending { pages, result: rx })
    }

    /// Start the copy armed in the pause, now that the guest runs again (started in the
    /// pause, it would take the CPU the rest of the pause needs).
    pub fn release(&mut self) {
        if let Some(work) = self.queued.take() {
            let sent = self
                .copier
                .as_ref()
                .and_then(|c| c.work.as_ref())
                .and_then(|w| w.send(work).err());
            if let Some(crossbeam_channel::SendError((pending, _))) = sent {
                // No copier: the copy unprotects its pages as it drops, and its encoder
                // sees the copier gone.
                drop(pending);
                self.feedback.finished();
            }
        }
    }

    /// Pages the guest faulted on before their copy, over all completed copies.
    pub fn faulted(&self) -> u64 {
        self.feedback.faulted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake(usize, usize);

    impl PendingCopy for Fake {
        fn pages(&self) -> usize {
            self.0
        }
        fn complete(self: Box<Self>) -> Result<CopiedPages, DomainError> {
            Ok(CopiedPages {
                index: (0..self.0 as u64).collect(),
                data: vec![0; self.0 * 4096],
                faulted: self.1,
            })
        }
    }

    const CAN: Option<Option<Duration>> = Some(None);

    #[test]
    fn policies_parse_and_force_their_path() {
        for p in ["auto", "pause", "cow"] {
            assert_eq!(p.parse::<CopyPolicy>().unwrap().to_string(), p);
        }
        assert!("on".parse::<CopyPolicy>().is_err());
        assert_eq!(
            Chooser::new(CopyPolicy::Cow).choose(1, None),
            CopyPath::Cow,
            "cow is cow (the guest's refusal is an error elsewhere)"
        );
        assert_eq!(
            Chooser::new(CopyPolicy::Pause).choose(1 << 20, CAN),
            CopyPath::Pause
        );
    }

    #[test]
    fn auto_copies_small_sets_in_the_pause_and_large_ones_on_write() {
        let mut c = Chooser::new(CopyPolicy::Auto);
        c.copied(1000, Duration::from_millis(2)); // 2 µs per page
        assert_eq!(c.choose(100, CAN), CopyPath::Pause, "0.2 ms pause");
        assert_eq!(c.choose(100_000, None), CopyPath::Pause, "no capability");
        assert_eq!(c.choose(10_000, CAN), CopyPath::Cow, "20 ms pause");
    }

    #[test]
    fn the_copier_completes_copies_and_reports_their_faults() {
        let mut c = Chooser::new(CopyPolicy::Cow);
        let p = c
            .armed(Box::new(Fake(3, 2)), Duration::from_micros(3))
            .unwrap();
        assert_eq!(p.pages(), 3);
        c.release();
        c.settle();
        let got = p.complete().unwrap();
        assert_eq!(got.index, vec![0, 1, 2]);
        assert_eq!((c.faulted(), c.taken), (2, [0, 1]));
    }

    #[test]
    fn auto_turns_away_from_copy_on_write_when_faults_cost_more_and_probes_again() {
        let mut c = Chooser::new(CopyPolicy::Auto);
        c.copied(1000, Duration::from_millis(2));
        let fault = Some(Some(Duration::from_micros(40)));
        assert_eq!(c.choose(10_000, fault), CopyPath::Cow, "no fault seen yet");
        for _ in 0..20 {
            let p = c
                .armed(Box::new(Fake(10_000, 5_000)), Duration::from_millis(1))
                .unwrap();
            c.release();
            p.complete().unwrap();
            c.settle();
        }
        assert_eq!(c.faulted(), 100_000);
        // Half the pages fault: 20 µs a page against 2 µs copying.
        let paths: Vec<CopyPath> = (0..=PROBE_EVERY).map(|_| c.choose(10_000, fault)).collect();
        assert!(
            paths[..PROBE_EVERY as usize]
                .iter()
                .all(|&p| p == CopyPath::Pause)
        );
        assert_eq!(paths[PROBE_EVERY as usize], CopyPath::Cow, "a probe");
        assert_eq!(c.taken, [1, 20]);
    }

    #[test]
    fn one_slow_sample_does_not_decide() {
        let mut c = Chooser::new(CopyPolicy::Auto);
        c.copied(1000, Duration::from_millis(1)); // 1 µs a page
        let before = c.estimate().copy_ns;
        c.copied(1000, Duration::from_millis(500)); // descheduled in the middle
        assert!(c.estimate().copy_ns <= before * (1.0 + EWMA * (OUTLIER - 1.0)) + 1e-6);
    }

    #[test]
    fn a_measured_fault_cost_moves_the_choice() {
        let mut c = Chooser::new(CopyPolicy::Auto);
        c.copied(1000, Duration::from_millis(2));
        for _ in 0..8 {
            c.choose(10_000, CAN);
            let p = c
                .armed(Box::new(Fake(10_000, 1_000)), Duration::from_millis(1))
                .unwrap();
            c.release();
            p.complete().unwrap();
            c.settle();
        }
        // A tenth of the pages fault: at 5 µs a fault copy-on-write is cheaper than the
        // 2 µs copy, at 40 µs it is dearer.
        assert_eq!(
            c.choose(10_000, Some(Some(Duration::from_micros(5)))),
            CopyPath::Cow
        );
        assert_eq!(
            c.choose(10_000, Some(Some(Duration::from_micros(40)))),
            CopyPath::Pause
        );
        assert_eq!(c.estimate().fault_ns, 40_000.0);
    }
}
