//! Per-connection rate limits: token buckets for messages and bytes a
//! client sends, and the verdict for each message (pass, refuse, or close
//! when the excess persists) — or, for raw clients, how long to stop
//! reading ([`RateLimit::throttle`]).
//!
//! Each bucket holds two seconds' worth of its rate (at least one message
//! of `max-message-size`, so any allowed message can pass) and refills
//! continuously. A message takes one token of each bucket; when either is
//! short the message is refused, and when refusals go on for longer than
//! [`PERSIST`] — an episode of refusals ends only after [`PERSIST`] without
//! one, so a client that keeps sending faster than its rate is closed even
//! though some of its messages pass — the connection is closed (1008). A bucket is made on a
//! connection's first message, so idle connections hold none.

use std::time::{Duration, Instant};

/// How long a client may keep exceeding its limits before it is closed.
pub(crate) const PERSIST: Duration = Duration::from_secs(1);

/// A token bucket: `capacity` tokens, refilled at `rate` per second.
#[derive(Debug)]
pub(crate) struct Bucket {
    /// Tokens per second.
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub(crate) fn new(rate: f64, capacity: f64, now: Instant) -> Self {
        Self {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Takes `n` tokens if there are that many.
    pub(crate) fn take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens even if that leaves the bucket in debt, and returns
    /// how long until the debt is repaid (zero when there was none).
    fn take_or_owe(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Whether it would be full at `now`.
    pub(crate) fn is_full(&self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + dt * self.rate >= self.capacity
    }
}

/// What to do with a client's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the limits.
    Pass,
    /// Over a limit: refuse this message.
    Refuse,
    /// Over a limit for longer than [`PERSIST`]: close the connection.
    Close,
}

/// One connection's limits; `None` rates are off.
#[derive(Debug)]
pub(crate) struct RateLimit {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    /// Start of the current episode of refusals.
    over_since: Option<Instant>,
    last_refused: Option<Instant>,
}

impl RateLimit {
    /// Limits of `messages` and `bytes` per second (0: off); a byte bucket
    /// holds at least `max_message` bytes.
    pub(crate) fn new(messages: u32, bytes: u64, max_message: usize, now: Instant) -> Self {
        let bucket = |rate: f64, floor: f64| {
            (rate > 0.0).then(|| Bucket::new(rate, (rate * 2.0).max(floor), now))
        };
        Self {
            messages: bucket(f64::from(messages), 1.0),
            bytes: bucket(bytes as f64, max_message as f64),
            over_since: None,
            last_refused: None,
        }
    }

    /// Admits a message of `len` bytes arriving at `now` whatever the
    /// buckets hold, and returns how long the client must wait before its
    /// next message: zero within the limits, else until both buckets are out
    /// of debt. For raw clients, whose reader stops for that long so TCP
    /// slows the sender down and nothing is dropped. The wait is at most one
    /// message's worth: under `1 / rate` for the message bucket, `len /
    /// rate` for the byte bucket.
    pub(crate) fn throttle(&mut self, len: usize, now: Instant) -> Duration {
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut self.messages {
            wait = wait.max(b.take_or_owe(1.0, now));
        }
        if let Some(b) = &mut self.bytes {
            wait = wait.max(b.take_or_owe(len as f64, now));
        }
        wait
    }

    /// The verdict on a message of `len` bytes arriving at `now`.
    pub(crate) fn check(&mut self, len: usize, now: Instant) -> Verdict {
        for b in [&mut self.messages, &mut self.bytes].into_iter().flatten() {
            b.refill(now);
        }
        let fits = self.messages.as_ref().is_none_or(|b| b.tokens >= 1.0)
            && self.bytes.as_ref().is_none_or(|b| b.tokens >= len as f64);
        if fits {
            if let Some(b) = &mut self.messages {
                b.tokens -= 1.0;
            }
            if let Some(b) = &mut self.bytes {
                b.tokens -= len as f64;
            }
            return Verdict::Pass;
        }
        let new_episode = self
            .last_refused
            .is_none_or(|t| now.saturating_duration_since(t) > PERSIST);
        if new_episode {
            self.over_since = Some(now);
        }
        self.last_refused = Some(now);
        let since = self.over_since.unwrap_or(now);
        if now.saturating_duration_since(since) > PERSIST {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_persistence_closes() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 0, 1024, t0);
        // Two seconds' worth at once.
        for i in 0..20 {
            assert_eq!(r.check(10, t0), Verdict::Pass, "message {i}");
        }
        assert_eq!(r.check(10, t0), Verdict::Refuse);
        // 100 ms later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(r.check(10, t1), Verdict::Pass);
        assert_eq!(r.check(10, t1), Verdict::Refuse);
        // Refused without pause for over a second: close.
        let mut t = t1;
        let mut last = Verdict::Refuse;
        for _ in 0..40 {
            t += Duration::from_millis(1);
            last = r.check(10, t);
            if last == Verdict::Pass {
                break;
            }
        }
        assert_eq!(last, Verdict::Refuse, "40 ms refills less than a token");
        let mut flood = RateLimit::new(10, 0, 1024, t0);
        for _ in 0..20 {
            flood.check(1, t0);
        }
        assert_eq!(flood.check(1, t0), Verdict::Refuse);
        // Keep it empty: each refill is taken at once.
        let mut t = t0;
        let mut verdicts = Vec::new();
        for _ in 0..30 {
            t += Duration::from_millis(50);
            while flood.check(1, t) == Verdict::Pass {}
            verdicts.push(flood.check(1, t));
        }
        assert_eq!(verdicts.last(), Some(&Verdict::Close), "{verdicts:?}");
    }

    #[test]
    fn throttling_admits_everything_at_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 0, 1024, t0);
        for i in 0..20 {
            assert_eq!(r.throttle(10, t0), Duration::ZERO, "burst message {i}");
        }
        // The 21st is admitted, and the next must wait a tenth of a second.
        let wait = r.throttle(10, t0);
        assert!(
            (wait.as_secs_f64() - 0.1).abs() < 1e-6,
            "{wait:?} after the burst"
        );
        // A client that waits as told keeps a steady 10/s.
        let mut t = t0 + wait;
        for _ in 0..50 {
            let w = r.throttle(10, t);
            assert!(w <= Duration::from_millis(101), "{w:?}");
            t += w;
        }
        assert!(
            (t - t0).as_secs_f64() > 4.9,
            "50 messages past the burst took {:?}",
            t - t0
        );
        // Bytes: the wait is what the byte bucket lacks.
        let mut b = RateLimit::new(0, 1000, 1000, t0);
        assert_eq!(b.throttle(2000, t0), Duration::ZERO, "two seconds' worth");
        assert_eq!(b.throttle(500, t0), Duration::from_millis(500));
    }

    #[test]
    fn a_pause_ends_an_episode_of_refusals() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(1, 0, 1, t0);
        assert_eq!(r.check(1, t0), Verdict::Pass);
        assert_eq!(r.check(1, t0), Verdict::Pass);
        assert_eq!(r.check(1, t0), Verdict::Refuse);
        // Quiet for longer than PERSIST, then over again: a new episode.
        let t1 = t0 + PERSIST + Duration::from_millis(200);
        while r.check(1, t1) == Verdict::Pass {}
        assert_eq!(r.check(1, t1), Verdict::Refuse);
    }

    #[test]
    fn bytes_are_limited_too_and_a_max_size_message_always_fits() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(0, 1000, 64 * 1024, t0);
        assert_eq!(
            r.check(64 * 1024, t0),
            Verdict::Pass,
            "one max-size message"
        );
        assert_eq!(r.check(1, t0), Verdict::Refuse);
        let off = &mut RateLimit::new(0, 0, 1, t0);
        for _ in 0..10_000 {
            assert_eq!(off.check(1 << 20, t0), Verdict::Pass);
        }
    }
}
