//! [`RetryPolicy`]: how often and how long to retry a failing handler.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Retries with exponential backoff, jitter and a cap.
///
/// Attempt `n` (1-based) that fails waits
/// `min(initial_backoff_ms * multiplier^(n-1), max_backoff_ms)`, then plus or
/// minus `jitter` of that, before attempt `n + 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Handler attempts before the message is dead-lettered, counting the
    /// first (1 = no retry). Default 3.
    pub max_attempts: u32,
    /// Wait after the first failed attempt, in ms. Default 100.
    pub initial_backoff_ms: u64,
    /// Upper bound of any wait, in ms. Default 10,000.
    pub max_backoff_ms: u64,
    /// Growth factor between waits. Default 2.0.
    pub multiplier: f64,
    /// Random spread as a fraction of the wait, 0.0..=1.0. Default 0.2.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff_ms: 100,
            max_backoff_ms: 10_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy of `max_attempts` with fixed `backoff_ms` waits and no jitter.
    pub fn fixed(max_attempts: u32, backoff_ms: u64) -> Self {
        Self {
            max_attempts,
            initial_backoff_ms: backoff_ms,
            max_backoff_ms: backoff_ms,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let base = (self.initial_backoff_ms as f64 * exp).min(self.max_backoff_ms as f64);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = if jitter > 0.0 {
            rand::rng().random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        Duration::from_micros((base * factor * 1000.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(400));
        assert_eq!(p.backoff(50), Duration::from_millis(10_000));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p = RetryPolicy::default();
        for _ in 0..100 {
            let d = p.backoff(2).as_millis();
            assert!((160..=240).contains(&d), "{d}");
        }
    }
}
