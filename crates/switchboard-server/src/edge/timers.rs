//! One timer for all of a node's WebSocket connection tasks.
//!
//! A connection's task has one deadline at a time (next ping, pong
//! deadline, idle deadline, token moment, end of a pause, closing deadline).
//! Rather than each task keeping a `tokio::time::Sleep` inside its future
//! (112 bytes of every idle connection), it arms this node-wide wheel, which
//! wakes it through its [`Conn::notify`] once the deadline's tick has
//! passed; the task then looks at the clock itself. Deadlines are rounded up
//! to [`TICK`], so nothing fires early, and at most a tick late.
//!
//! An entry is a `Weak<Conn>` in its tick's list (8 bytes); a deadline that
//! moves later leaves its entry to wake the task once for nothing, and the
//! task then arms the new one.

use crate::conn::Conn;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The wheel's resolution.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// Longest the driver sleeps without looking whether the node is gone.
const IDLE_TICKS: u64 = 1000;

/// A tick that is never due (nothing armed).
pub(crate) const NEVER: u64 = u64::MAX;

/// The node's wheel (see the module's documentation).
#[derive(Debug)]
pub(crate) struct Timers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Tick 0.
    origin: Instant,
    wheel: Mutex<Wheel>,
    /// Wakes the driver when a tick before the one it sleeps until is armed.
    wake: Notify,
}

#[derive(Debug, Default)]
struct Wheel {
    /// Tasks to wake, by tick.
    slots: BTreeMap<u64, Vec<Weak<Conn>>>,
    /// The tick the driver sleeps until.
    driver_at: u64,
    /// The driver task is started (on the first entry).
    running: bool,
}

impl Default for Timers {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn moment(&self, tick: u64) -> Instant {
        let since = Duration::from_nanos(tick.saturating_mul(TICK.as_nanos() as u64));
        // Beyond any clock (NEVER): a year on, as good as never.
        self.origin
            .checked_add(since)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86_400))
    }
}

impl Timers {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                wheel: Mutex::new(Wheel::default()),
                wake: Notify::new(),
            }),
        }
    }

    /// The first tick at or after `at`.
    pub(crate) fn tick_of(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.inner.origin);
        since.as_nanos().div_ceil(TICK.as_nanos()) as u64
    }

    /// The moment of `tick`.
    pub(crate) fn moment(&self, tick: u64) -> Instant {
        self.inner.moment(tick)
    }

    /// Wakes `conn`'s task once `tick` has passed.
    pub(crate) fn arm(&self, tick: u64, conn: &Arc<Conn>) {
        let mut w = self.inner.wheel.lock();
        w.slots.entry(tick).or_default().push(Arc::downgrade(conn));
        if !w.running {
            w.running = true;
            w.driver_at = tick;
            drop(w);
            tokio::spawn(drive(Arc::downgrade(&self.inner)));
        } else if tick < w.driver_at {
            w.driver_at = tick;
            drop(w);
            self.inner.wake.notify_one();
        }
    }
}

/// Wakes the tasks of every passed tick, then sleeps until the next one;
/// ends once the node's [`Timers`] is dropped.
async fn drive(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        // Ticks whose moment has come.
        let passed =
            (now.saturating_duration_since(inner.origin).as_nanos() / TICK.as_nanos()) as u64;
        let (fired, next) = {
            let mut w = inner.wheel.lock();
            let later = w.slots.split_off(&(passed + 1));
            let fired = std::mem::replace(&mut w.slots, later);
            let next = w
                .slots
                .keys()
                .next()
                .copied()
                .unwrap_or(NEVER)
                .min(passed + IDLE_TICKS);
            w.driver_at = next;
            (fired, next)
        };
        for conn in fired.into_values().flatten() {
            if let Some(conn) = conn.upgrade() {
                conn.notify.notify_one();
            }
        }
        let at = inner.moment(next);
        tokio::select! {
            () = tokio::time::sleep_until(at) => {}
            () = inner.wake.notified() => {}
        }
    }
}
