//! Link shaping for the *send* stage: a token bucket that holds the sender to a link rate
//! (`--link-rate 1gbit`), so a loopback pair behaves like a pair on a slower link — the
//! FGBI paper's 1 Gbit/s, or 100 Mbit/s — when the backup is next door.

use std::time::{Duration, Instant};

/// Bytes the bucket holds when full: a burst of at most this much leaves at once.
const BURST: u64 = 64 << 10;

/// A token bucket in bytes: `rate` bytes per second refill it, up to [`BURST`].
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for a link of `bits_per_s`.
    pub fn new(bits_per_s: u64) -> Self {
        Self {
            rate: (bits_per_s as f64 / 8.0).max(1.0),
            tokens: BURST as f64,
            last: Instant::now(),
        }
    }

    /// The largest piece to take at once (the burst).
    pub fn chunk(&self) -> usize {
        BURST as usize
    }

    /// Take `n` bytes' worth of tokens (`n` at most the burst), first waiting until the
    /// bucket holds them. Returns how long it waited.
    pub fn take(&mut self, n: usize) -> Duration {
        let n = n.min(BURST as usize) as f64;
        self.refill();
        let mut waited = Duration::ZERO;
        if self.tokens < n {
            let wait = Duration::from_secs_f64((n - self.tokens) / self.rate);
            std::thread::sleep(wait);
            waited = wait;
            self.refill();
        }
        // A sleep that ends early (it never should) still pays: tokens may go negative
        // and the next take waits for them.
        self.tokens -= n;
        waited
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(BURST as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The long-run rate is the configured one: 8 MiB through a 100 Mbit/s bucket takes
    /// at least (8 MiB − burst) / 12.5 MB/s of waiting. Only a lower bound is asserted (a
    /// busy machine makes sleeps longer, never shorter).
    #[test]
    fn holds_the_rate() {
        let mut b = TokenBucket::new(100_000_000);
        let total = 8usize << 20;
        let t = Instant::now();
        let mut sent = 0;
        while sent < total {
            let n = b.chunk().min(total - sent);
            b.take(n);
            sent += n;
        }
        let min = (total as f64 - BURST as f64) / 12.5e6;
        assert!(
            t.elapsed().as_secs_f64() >= min * 0.999,
            "{:?} < {min} s",
            t.elapsed()
        );
    }

    /// A full bucket lets a burst through without waiting, then makes the next wait.
    #[test]
    fn burst_then_wait() {
        let mut b = TokenBucket::new(8_000); // 1000 bytes/s
        assert_eq!(b.take(BURST as usize), Duration::ZERO);
        let w = b.take(10);
        assert!(w >= Duration::from_millis(9), "{w:?}");
    }
}
