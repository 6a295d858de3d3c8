//! [`Signal`]: how a connection's task is woken (a frame queued, a close
//! requested, one of its deadlines passed).
//!
//! Like `tokio::sync::Notify` with a single waiter, but waited on by
//! polling: the task keeps no waiter node inside its future, so every idle
//! connection's task is that much smaller (docs/benchmarks.md).

use futures_util::task::AtomicWaker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// One pending wake-up (a permit, as `Notify::notify_one` stores) and the
/// task to wake.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Wakes the task, or lets its next wait return at once.
    pub(crate) fn notify_one(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Drops the pending wake-up, if any: for a task about to look at
    /// everything it could have been woken for.
    pub(crate) fn clear(&self) {
        self.set.store(false, Ordering::Release);
    }

    /// Takes the pending wake-up, if any; otherwise the task of `cx` is
    /// woken by the next [`Signal::notify_one`].
    pub(crate) fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.set.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A wake-up between the check and the registration.
        if self.set.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits for a wake-up (the one pending, if any).
    pub(crate) async fn notified(&self) {
        std::future::poll_fn(|cx| self.poll_notified(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_wake_up_before_the_wait_is_kept_once() {
        let s = Signal::default();
        s.notify_one();
        s.notify_one();
        s.notified().await;
        let second = tokio::time::timeout(Duration::from_millis(20), s.notified()).await;
        assert!(second.is_err(), "two wake-ups before a wait make one");
    }

    #[tokio::test]
    async fn wakes_a_waiting_task() {
        let s = Arc::new(Signal::default());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.notified().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        s.notify_one();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
