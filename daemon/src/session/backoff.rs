//! Reconnect backoff: doubling delays with jitter, reset by the session after a connection
//! that stayed open for `stable_after` (a handshake alone does not prove a server good).

use rand::Rng;
use std::time::Duration;

/// The delay before the next connection attempt.
///
/// Jitter takes up to a quarter off each delay, so many daemons cut off by one server
/// restart do not all come back in the same millisecond, while the cap stays a real cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff that starts at `initial` and doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The delay to wait now; the one after it will be twice as long, up to the cap.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rng.gen_range(0.0..0.25);
        base.mul_f64(1.0 - jitter)
    }

    /// The undithered delay the next failure will wait (for status and tests).
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// Starts over from the initial delay.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn doubles_to_the_cap_with_bounded_jitter_and_resets() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(25_600));
        let mut bases = Vec::new();
        for _ in 0..12 {
            let base = b.peek();
            let d = b.next_delay(&mut rng);
            assert!(d <= base && d >= base.mul_f64(0.75), "{d:?} vs {base:?}");
            bases.push(base.as_millis());
        }
        assert_eq!(
            bases,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 25600, 25600, 25600]
        );
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }
}
