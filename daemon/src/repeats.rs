//! Summarising repeated log lines, so a server that flaps cannot flood the journal.
//!
//! The driver logs every change of the upstream connection. Against a server that greets
//! and drops, that is the same few lines over and over; the backoff already slows the
//! attempts, and this keeps the log to about one line per kind of line per window, the
//! next one saying how many were held back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Distinct lines remembered at once; beyond, the stalest are forgotten (at worst a line
/// is logged again a little early).
const MAX_KEYS: usize = 64;

/// Decides which of a stream of repeated lines to log.
#[derive(Debug)]
pub struct Repeats {
    window: Duration,
    seen: HashMap<String, Seen>,
}

#[derive(Debug)]
struct Seen {
    logged_at: Instant,
    held_back: u64,
}

impl Repeats {
    /// At most one line per key per `window`.
    pub fn new(window: Duration) -> Self {
        Repeats {
            window,
            seen: HashMap::new(),
        }
    }

    /// Whether a line with this key is logged now: `Some(n)` with the number of identical
    /// lines held back since the last one logged, `None` to hold this one back.
    pub fn check(&mut self, key: &str, now: Instant) -> Option<u64> {
        if let Some(seen) = self.seen.get_mut(key) {
            if now.saturating_duration_since(seen.logged_at) < self.window {
                seen.held_back += 1;
                return None;
            }
            let held = std::mem::take(&mut seen.held_back);
            seen.logged_at = now;
            return Some(held);
        }
        if self.seen.len() >= MAX_KEYS {
            let window = self.window;
            self.seen
                .retain(|_, s| now.saturating_duration_since(s.logged_at) < window);
            if self.seen.len() >= MAX_KEYS {
                self.seen.clear();
            }
        }
        self.seen.insert(
            key.to_owned(),
            Seen {
                logged_at: now,
                held_back: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_repeated_every_second_is_logged_once_a_minute_with_a_count() {
        let mut r = Repeats::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let mut logged = Vec::new();
        for s in 0..600 {
            let now = t0 + Duration::from_secs(s);
            if let Some(held) = r.check("closed: reset", now) {
                logged.push((s, held));
            }
            // Another line in between does not disturb the count.
            r.check("reconnecting", now);
        }
        let expect: Vec<(u64, u64)> = (0..10)
            .map(|m| (m * 60, if m == 0 { 0 } else { 59 }))
            .collect();
        assert_eq!(logged, expect);
    }

    #[test]
    fn different_lines_are_each_logged_and_the_table_is_bounded() {
        let mut r = Repeats::new(Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..1000 {
            assert_eq!(r.check(&format!("line {i}"), now), Some(0), "{i}");
        }
        assert!(r.seen.len() <= MAX_KEYS);
    }
}
