//! Admission of new connections beyond the node-wide caps: the per-IP
//! handshake rate (a token bucket per client address) and the per-user
//! connection count (by the token's `sub`).
//!
//! The per-IP connection count lives with the socket count in `gateway`
//! (`Shared::track_socket`), as it is taken at accept.

use crate::admission::ratelimit::Bucket;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Handshakes per second each client address may start
/// (`max-handshakes-per-ip`), in bursts of two seconds' worth.
#[derive(Debug)]
pub(crate) struct HandshakeRate {
    rate: f64,
    capacity: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl HandshakeRate {
    /// `None` when `per_second` is 0 (no limit).
    pub(crate) fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            rate: f64::from(per_second),
            capacity: f64::from(per_second) * 2.0,
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a token of `ip`'s bucket; `false` when it has none left.
    pub(crate) fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock();
        let bucket = buckets
            .entry(ip)
            .or_insert_with(|| Bucket::new(self.rate, self.capacity, now));
        bucket.take(1.0, now)
    }

    /// Forgets addresses whose bucket has refilled: they would start full
    /// anyway, so the map only holds addresses that handshook recently.
    pub(crate) fn sweep(&self, now: Instant) {
        self.buckets.lock().retain(|_, b| !b.is_full(now));
    }

    /// Addresses tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().len()
    }
}

/// Open connections per user (`max-connections-per-user`), counted from
/// the handshake that verified the user's token to the connection's end.
#[derive(Debug)]
pub(crate) struct UserCounts {
    cap: u32,
    counts: Mutex<HashMap<Box<str>, u32>>,
}

impl UserCounts {
    /// `None` when `cap` is 0 (no limit).
    pub(crate) fn new(cap: u32) -> Option<Arc<Self>> {
        (cap > 0).then(|| {
            Arc::new(Self {
                cap,
                counts: Mutex::new(HashMap::new()),
            })
        })
    }

    /// A slot for one more connection of `user`, released when dropped;
    /// `None` when the user already holds `cap`.
    pub(crate) fn acquire(self: &Arc<Self>, user: &str) -> Option<UserSlot> {
        let mut counts = self.counts.lock();
        let n = counts.entry(user.into()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            counts: self.clone(),
            user: user.into(),
        })
    }

    /// Connections `user` holds.
    #[cfg(test)]
    fn held(&self, user: &str) -> u32 {
        self.counts.lock().get(user).copied().unwrap_or(0)
    }
}

/// One connection of a user, counted until dropped (with its connection).
#[derive(Debug)]
pub(crate) struct UserSlot {
    counts: Arc<UserCounts>,
    user: Box<str>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock();
        if let Some(n) = counts.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_address_gets_a_burst_then_its_rate_and_others_are_unaffected() {
        let limit = HandshakeRate::new(10).unwrap();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let admitted = (0..30).filter(|_| limit.admit(a, t0)).count();
        assert_eq!(admitted, 20, "a burst of two seconds' worth");
        assert!(limit.admit(b, t0), "another address has its own bucket");
        let later = t0 + Duration::from_millis(500);
        let admitted = (0..30).filter(|_| limit.admit(a, later)).count();
        assert_eq!(admitted, 5, "then 10 per second");
        limit.sweep(later);
        assert_eq!(
            limit.tracked(),
            1,
            "a's bucket (empty) is kept; b's (one token short, refilled by now) is not"
        );
        limit.sweep(later + Duration::from_secs(3));
        assert_eq!(limit.tracked(), 0, "refilled buckets are forgotten");
        assert!(HandshakeRate::new(0).is_none());
    }

    #[test]
    fn a_user_holds_at_most_cap_connections_and_slots_free_on_drop() {
        let counts = UserCounts::new(2).unwrap();
        let one = counts.acquire("ann").unwrap();
        let two = counts.acquire("ann").unwrap();
        assert!(counts.acquire("ann").is_none());
        let bob = counts.acquire("bob").expect("users are counted apart");
        drop(one);
        let three = counts.acquire("ann").expect("a freed slot is reusable");
        assert_eq!(counts.held("ann"), 2);
        drop((two, three, bob));
        assert_eq!(counts.counts.lock().len(), 0, "no entry is left behind");
        assert!(UserCounts::new(0).is_none());
    }
}
