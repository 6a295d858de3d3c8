//! Client-side subscriptions: [`Subscription`] (a stream of
//! [`SubscriptionEvent`]s) and [`SubscriptionHandle`] (the callback form).
//!
//! Both unsubscribe when dropped. The events themselves are produced by the
//! connection task; the crate documentation describes how recovery and
//! deduplication work.

use crate::connection::{Request, Shared};
use crate::error::{Error, Result};
use crate::event::SubscriptionEvent;
use futures_util::Stream;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Unsubscribes when dropped, unless disarmed.
#[derive(Debug)]
pub(crate) struct SubscriptionGuard {
    requests: mpsc::UnboundedSender<Request>,
    shared: Arc<Shared>,
    channel: String,
    sub_id: u64,
    timeout: Duration,
    armed: bool,
    /// Set when unsubscribing: tells a callback task to stop at once.
    stop: Arc<AtomicBool>,
}

impl SubscriptionGuard {
    pub(crate) fn new(
        requests: mpsc::UnboundedSender<Request>,
        shared: Arc<Shared>,
        channel: String,
        sub_id: u64,
        timeout: Duration,
    ) -> Self {
        Self {
            requests,
            shared,
            channel,
            sub_id,
            timeout,
            armed: true,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Unsubscribes and waits for the gateway's confirmation.
    async fn unsubscribe(mut self) -> Result<()> {
        self.armed = false;
        self.stop.store(true, Ordering::Relaxed);
        let (reply, done) = oneshot::channel();
        let request = Request::Unsubscribe {
            channel: self.channel.clone(),
            sub_id: self.sub_id,
            reply: Some(reply),
        };
        if self.requests.send(request).is_err() {
            // The client has stopped: there is nothing to unsubscribe from.
            return Ok(());
        }
        match tokio::time::timeout(self.timeout, done).await {
            Err(_) => Err(Error::Timeout {
                command: "unsubscribe",
                after: self.timeout,
            }),
            Ok(Err(_)) => match self.shared.final_error() {
                Error::Closed => Ok(()),
                e => Err(e),
            },
            Ok(Ok(result)) => result,
        }
    }
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.armed {
            let _ = self.requests.send(Request::Unsubscribe {
                channel: std::mem::take(&mut self.channel),
                sub_id: self.sub_id,
                reply: None,
            });
        }
    }
}

/// A client-side subscription to one channel: a [`Stream`] of
/// [`SubscriptionEvent`]s, from [`Client::subscribe`](crate::Client::subscribe).
///
/// The stream ends after [`SubscriptionEvent::Unsubscribed`] or
/// [`SubscriptionEvent::Failed`], or when the client is closed. Dropping it
/// unsubscribes.
///
/// Events are buffered without bound until read, so that none is ever lost:
/// keep reading.
#[derive(Debug)]
pub struct Subscription {
    guard: SubscriptionGuard,
    events: mpsc::UnboundedReceiver<SubscriptionEvent>,
}

impl Subscription {
    pub(crate) fn new(
        guard: SubscriptionGuard,
        events: mpsc::UnboundedReceiver<SubscriptionEvent>,
    ) -> Self {
        Self { guard, events }
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.guard.channel
    }

    /// The next event; `None` once the subscription has ended.
    pub async fn recv(&mut self) -> Option<SubscriptionEvent> {
        self.events.recv().await
    }

    /// Leaves the channel and waits for the gateway to confirm (at once if
    /// disconnected: a new connection simply does not resubscribe). Events
    /// not read yet are discarded.
    pub async fn unsubscribe(self) -> Result<()> {
        let Self { guard, events } = self;
        drop(events);
        guard.unsubscribe().await
    }

    /// Hands the events to `callback` on a task of its own.
    pub(crate) fn spawn_callback<F>(self, mut callback: F) -> SubscriptionHandle
    where
        F: FnMut(SubscriptionEvent) + Send + 'static,
    {
        let Self { guard, mut events } = self;
        let stop = guard.stop.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                callback(event);
            }
        });
        SubscriptionHandle { guard }
    }
}

impl Stream for Subscription {
    type Item = SubscriptionEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

/// A subscription whose events go to a callback, from
/// [`Client::subscribe_with`](crate::Client::subscribe_with). Dropping it
/// unsubscribes.
#[derive(Debug)]
pub struct SubscriptionHandle {
    guard: SubscriptionGuard,
}

impl SubscriptionHandle {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.guard.channel
    }

    /// Leaves the channel and waits for the gateway to confirm; the callback
    /// is not called again.
    pub async fn unsubscribe(self) -> Result<()> {
        self.guard.unsubscribe().await
    }
}
