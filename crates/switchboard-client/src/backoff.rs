//! Reconnect delays: capped exponential backoff with full jitter.
//!
//! Attempt `n` (counting from 0) waits a uniformly random delay in
//! `[0, min(max, initial × 2ⁿ)]` ("full jitter"), so that many clients cut off
//! at the same moment — a gateway restart, a load balancer failover — spread
//! their reconnects over the whole window instead of arriving in waves.

use std::time::Duration;

/// Default first reconnect window.
pub const DEFAULT_INITIAL: Duration = Duration::from_millis(500);
/// Default largest reconnect window.
pub const DEFAULT_MAX: Duration = Duration::from_secs(30);

/// Backoff settings: the window of the first retry and the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Upper bound of the first delay; each further attempt doubles it.
    pub initial: Duration,
    /// Largest upper bound.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: DEFAULT_INITIAL,
            max: DEFAULT_MAX,
        }
    }
}

impl BackoffConfig {
    /// The upper bound of the delay of attempt `attempt` (from 0):
    /// `min(max, initial × 2^attempt)`, without overflowing.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max)
    }
}

/// The reconnect schedule of one client: counts attempts since the last
/// reset and draws each delay.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at attempt 0.
    pub(crate) fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// The next delay, drawn with `rand`'s thread RNG.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_delay_with(rand::random::<f64>())
    }

    /// The next delay given a uniform sample `unit` in `[0, 1)`; advances the
    /// attempt counter.
    pub(crate) fn next_delay_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.config.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * unit.clamp(0.0, 1.0))
            .map_or(ceiling, |d| d.min(ceiling))
    }

    /// Starts over from attempt 0 (after a connection proved stable).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    #[cfg(test)]
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(initial_ms: u64, max_ms: u64) -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let c = cfg(100, 1_000);
        let ceilings: Vec<u64> = (0..6).map(|n| c.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn ceiling_never_overflows() {
        let c = cfg(500, 30_000);
        for n in [31, 32, 63, 64, 1_000, u32::MAX] {
            assert_eq!(c.ceiling(n), Duration::from_secs(30), "attempt {n}");
        }
        let huge = BackoffConfig {
            initial: Duration::from_secs(u64::MAX / 2),
            max: Duration::MAX,
        };
        assert_eq!(huge.ceiling(10), Duration::MAX);
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let mut b = Backoff::new(cfg(100, 1_000));
        assert_eq!(b.next_delay_with(0.0), Duration::ZERO);
        assert_eq!(b.next_delay_with(0.5), Duration::from_millis(100));
        assert_eq!(b.next_delay_with(1.0), Duration::from_millis(400));
        // Out-of-range samples are clamped rather than exceeding the cap.
        assert_eq!(b.next_delay_with(7.0), Duration::from_millis(800));
        assert_eq!(b.next_delay_with(-1.0), Duration::ZERO);
        assert_eq!(b.attempt(), 5);
    }

    #[test]
    fn random_delays_stay_within_their_window() {
        let c = cfg(50, 400);
        let mut b = Backoff::new(c);
        for n in 0..20 {
            let d = b.next_delay();
            assert!(d <= c.ceiling(n), "attempt {n}: {d:?} > {:?}", c.ceiling(n));
        }
        // And they are not all the same (jitter is applied).
        let mut b = Backoff::new(cfg(1_000, 1_000));
        let draws: std::collections::HashSet<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(draws.len() > 1, "{draws:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(cfg(100, 10_000));
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.attempt(), 5);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay_with(1.0), Duration::from_millis(100));
    }
}
