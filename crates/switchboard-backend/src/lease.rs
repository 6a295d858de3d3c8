//! The node's lease: its right to speak for its connections.
//!
//! In a cluster, the other nodes declare a node lost (and tell the origin
//! with `node_down`) when they have not heard from it for the heartbeat
//! timeout. From that moment the origin has retired every connection of the
//! node, so the node must no longer send events about them nor act on
//! commands for them. A node cannot learn that it was declared lost while it
//! is stalled or cut off, so it stops on its own, before anyone may declare
//! it: it holds a [`Lease`] that the cluster backend renews each time the
//! node's own heartbeat comes back through the bus, valid for half the
//! heartbeat timeout after that heartbeat was *sent*. The others received
//! that heartbeat no earlier than it was sent, so they cannot declare the
//! node lost before a full timeout after the send: the lease runs out at
//! least half a timeout before (the margin; see docs/cluster.md#fencing).
//!
//! While the lease has run out, origin events are held (not sent), new
//! connections are refused and commands for the node's connections are
//! answered 503. When the backend finds out that the node was in fact
//! reported lost, it *fences* the node: every event about its connections is
//! dropped, the connections are closed without `disconnect` events, and a new
//! run begins. If the node was not reported (the whole bus was away, say),
//! the lease is renewed and held events leave in order.
//!
//! A single node, or one that has not yet told the bus it exists, holds an
//! unlimited lease: nobody can declare lost a node they never heard of.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Release};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// `expires` value of a lease that never runs out.
const UNLIMITED: u64 = u64::MAX;

/// The node's right to send origin events and run commands for its own
/// connections. Cheap to check: one atomic load and a clock read.
#[derive(Debug)]
pub struct Lease {
    /// Reference point of `expires`.
    base: Instant,
    /// Expiry, in milliseconds after `base` ([`UNLIMITED`]: none).
    expires: AtomicU64,
    /// The node is fencing itself: events about its connections are dropped.
    fencing: AtomicBool,
    /// Woken on every renewal and at the end of a fence.
    changed: Notify,
}

/// What [`Lease::wait`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The node may speak.
    Held,
    /// The node is fencing itself: drop what is about its connections.
    Fencing,
}

impl Default for Lease {
    fn default() -> Self {
        Self::unlimited()
    }
}

impl Lease {
    /// A lease that never runs out (until [`Lease::renew_until`] binds it).
    pub fn unlimited() -> Self {
        Self {
            base: Instant::now(),
            expires: AtomicU64::new(UNLIMITED),
            fencing: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_millis() as u64
    }

    /// Whether the node may send origin events and run commands for its
    /// connections now.
    pub fn is_held(&self) -> bool {
        if self.fencing.load(Acquire) {
            return false;
        }
        let expires = self.expires.load(Acquire);
        expires == UNLIMITED || self.millis(Instant::now()) < expires
    }

    /// Whether the node is fencing itself.
    pub fn is_fencing(&self) -> bool {
        self.fencing.load(Acquire)
    }

    /// How long the lease still runs (`None`: unlimited; zero: run out).
    pub fn remaining(&self) -> Option<Duration> {
        let expires = self.expires.load(Acquire);
        (expires != UNLIMITED)
            .then(|| Duration::from_millis(expires.saturating_sub(self.millis(Instant::now()))))
    }

    /// Binds the lease (if unlimited) or extends it to `until`; never
    /// shortens it. Called by the cluster backend.
    pub fn renew_until(&self, until: Instant) {
        let until = self.millis(until).min(UNLIMITED - 1);
        let mut current = self.expires.load(Acquire);
        loop {
            let next = if current == UNLIMITED {
                until
            } else {
                current.max(until)
            };
            match self
                .expires
                .compare_exchange(current, next, Release, Acquire)
            {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        self.changed.notify_waiters();
    }

    /// Ends the lease at once (if bound): the backend knows the node is cut
    /// off.
    pub fn revoke(&self) {
        if self.expires.load(Acquire) != UNLIMITED {
            self.expires.store(0, Release);
        }
        self.changed.notify_waiters();
    }

    /// Sets the lease to unlimited again: the node starts a new run that the
    /// cluster has not heard of yet.
    pub fn unbind(&self) {
        self.expires.store(UNLIMITED, Release);
        self.changed.notify_waiters();
    }

    /// Starts or ends a fence (see the module doc). Called by the node.
    pub fn set_fencing(&self, on: bool) {
        self.fencing.store(on, Release);
        self.changed.notify_waiters();
    }

    /// Waits until the lease is held or a fence starts. Checks at least
    /// every `poll` (the lease runs out by the clock, with no wake-up).
    pub async fn wait(&self, poll: Duration) -> LeaseState {
        loop {
            let changed = self.changed.notified();
            if self.is_fencing() {
                return LeaseState::Fencing;
            }
            if self.is_held() {
                return LeaseState::Held;
            }
            let _ = tokio::time::timeout(poll, changed).await;
        }
    }
}

/// What to do after one of the node's heartbeats was confirmed (see
/// [`Renewals::confirmed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// The lease was renewed.
    Renewed,
    /// The lease ran out long enough ago that the cluster may have reported
    /// this run lost: look that up (then [`Renewals::renew_latest`] or
    /// fence), and call [`Renewals::looked_up`] when done.
    LookUp,
    /// Nothing to do now (fencing, or a look-up is in progress).
    Wait,
}

/// A backend's bookkeeping of its heartbeats for the lease: when the
/// newest confirmed one (heard back, or accepted by the store) was sent,
/// when the run's first one was sent, and whether a look-up of a possible
/// report is in progress. Shared by the backends, so that they renew the
/// lease by the same rule.
#[derive(Debug, Default)]
pub struct Renewals {
    confirmed: parking_lot::Mutex<Option<Instant>>,
    first: parking_lot::Mutex<Option<Instant>>,
    suspect: AtomicBool,
}

impl Renewals {
    /// A heartbeat of this run is being sent at `at`.
    pub fn sending(&self, at: Instant) {
        self.first.lock().get_or_insert(at);
    }

    /// The heartbeat sent at `sent_at` was confirmed: renews `lease` until
    /// `sent_at + span`, unless the lease ran out long enough ago that the
    /// others (who declare a node lost `timeout` after its last heartbeat,
    /// sent every `heartbeat`) may have reported this run.
    pub fn confirmed(
        &self,
        lease: &Lease,
        sent_at: Instant,
        span: Duration,
        heartbeat: Duration,
        timeout: Duration,
    ) -> Confirmed {
        let previous = {
            let mut confirmed = self.confirmed.lock();
            let previous = *confirmed;
            if previous.is_none_or(|p| p < sent_at) {
                *confirmed = Some(sent_at);
            }
            // Nothing confirmed yet in this run: its first heartbeat may
            // have reached the others all the same.
            previous.or_else(|| (*self.first.lock()).filter(|f| *f < sent_at))
        };
        if lease.is_fencing() || self.suspect.load(Acquire) {
            return Confirmed::Wait;
        }
        // Nobody may declare this node lost earlier than a timeout after
        // the newest confirmed heartbeat; keep one heartbeat of margin for
        // a report on its way.
        let could_be_reported = previous.is_some_and(|p| p.elapsed() + heartbeat >= timeout);
        if lease.is_held() || !could_be_reported {
            lease.renew_until(sent_at + span);
            return Confirmed::Renewed;
        }
        if self.suspect.swap(true, std::sync::atomic::Ordering::AcqRel) {
            Confirmed::Wait
        } else {
            Confirmed::LookUp
        }
    }

    /// The look-up found no report: renews `lease` from the newest
    /// confirmed heartbeat.
    pub fn renew_latest(&self, lease: &Lease, span: Duration) {
        if let Some(sent_at) = *self.confirmed.lock() {
            lease.renew_until(sent_at + span);
        }
    }

    /// The look-up is over.
    pub fn looked_up(&self) {
        self.suspect.store(false, Release);
    }

    /// The run ended (fenced): a new one starts with nothing confirmed.
    pub fn new_run(&self) {
        *self.confirmed.lock() = None;
        *self.first.lock() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_until_bound_then_runs_out_by_the_clock() {
        let lease = Lease::unlimited();
        assert!(lease.is_held());
        assert_eq!(lease.remaining(), None);
        lease.renew_until(Instant::now() + Duration::from_millis(30));
        assert!(lease.is_held());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!lease.is_held());
        assert_eq!(lease.remaining(), Some(Duration::ZERO));
        // A renewal never shortens it.
        lease.renew_until(Instant::now() + Duration::from_secs(60));
        lease.renew_until(Instant::now());
        assert!(lease.is_held());
    }

    #[test]
    fn a_fence_takes_the_lease_away_until_it_ends() {
        let lease = Lease::unlimited();
        lease.set_fencing(true);
        assert!(!lease.is_held());
        assert!(lease.is_fencing());
        lease.set_fencing(false);
        assert!(lease.is_held());
    }

    #[tokio::test]
    async fn wait_returns_on_renewal_or_fence() {
        let lease = std::sync::Arc::new(Lease::unlimited());
        lease.renew_until(Instant::now());
        let waiter = {
            let lease = lease.clone();
            tokio::spawn(async move { lease.wait(Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        lease.renew_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(waiter.await.unwrap(), LeaseState::Held);

        let fresh = Lease::unlimited();
        fresh.renew_until(Instant::now());
        let fresh = std::sync::Arc::new(fresh);
        let waiter = {
            let lease = fresh.clone();
            tokio::spawn(async move { lease.wait(Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        fresh.set_fencing(true);
        assert_eq!(waiter.await.unwrap(), LeaseState::Fencing);
    }
}
