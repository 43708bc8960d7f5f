//! Noticing that this process stood still: a SIGSTOP, a host that froze the VM it runs in,
//! a long page-in. While the primary stands still it sends nothing, and a backup that hears
//! nothing for its detection timeout takes the guest over; a primary that resumes after
//! that must not release output or run on as if nothing happened.
//!
//! A watch thread wakes every [`TICK`] and records the longest gap between two of its
//! wake-ups. The gap counts whatever stopped the whole process (the engine and the sender
//! alike), and not the time the engine or the sender spent blocked on the backup, which
//! the backup sees as data arriving, not as silence.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the watch thread wakes.
pub const TICK: Duration = Duration::from_millis(2);

#[derive(Debug)]
struct Inner {
    born: Instant,
    /// Microseconds since `born` at the last wake-up.
    last_us: AtomicU64,
    /// The longest gap between wake-ups since [`StallWatch::take`], in microseconds.
    worst_us: AtomicU64,
    stop: AtomicBool,
}

impl Inner {
    fn now_us(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// The watch; the thread ends when it is dropped.
#[derive(Debug)]
pub struct StallWatch {
    inner: Arc<Inner>,
}

impl StallWatch {
    /// Start the watch thread.
    pub fn start() -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            born: Instant::now(),
            last_us: AtomicU64::new(0),
            worst_us: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let w = inner.clone();
        std::thread::Builder::new()
            .name("castor-watch".into())
            .spawn(move || {
                while !w.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    let now = w.now_us();
                    let last = w.last_us.swap(now, Ordering::SeqCst);
                    w.worst_us
                        .fetch_max(now.saturating_sub(last), Ordering::SeqCst);
                }
            })?;
        Ok(Self { inner })
    }

    /// The longest time the process stood still since the last call: the longest gap
    /// between two wake-ups, or the time since the last one if that is longer (the
    /// process may have just resumed, before the watch thread ran again).
    pub fn take(&self) -> Duration {
        let now = self.inner.now_us();
        let since_last = now.saturating_sub(self.inner.last_us.load(Ordering::SeqCst));
        let worst = self.inner.worst_us.swap(0, Ordering::SeqCst);
        Duration::from_micros(worst.max(since_last))
    }
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_process_is_seen_as_a_gap() {
        let w = StallWatch::start().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let _ = w.take();
        // Stop the watch thread's clock the way a SIGSTOP would: it cannot run while the
        // process is stopped. Here the whole test process stops for at least 300 ms; the
        // child keeps sending SIGCONT for a while, so a late SIGSTOP cannot hang the test.
        let pid = std::process::id();
        let waker = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for i in 1 2 3 4 5; do sleep 0.3; kill -CONT {pid}; done"
            ))
            .spawn()
            .unwrap();
        // SAFETY: kill(2) with SIGSTOP on our own pid; the child above continues us.
        unsafe {
            libc::kill(pid.cast_signed(), libc::SIGSTOP);
        }
        // The stop reaches this thread asynchronously: sleep through it.
        std::thread::sleep(Duration::from_millis(100));
        let mut waker = waker;
        let _ = waker.wait();
        let gap = w.take();
        assert!(gap >= Duration::from_millis(250), "{gap:?}");
    }
}
