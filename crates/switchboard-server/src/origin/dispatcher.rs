//! Event delivery to the origin: bounded queues, ordered lanes, batching and
//! retries.
//!
//! Each connection is pinned to one of `origin-concurrency` lanes; a lane sends
//! one request at a time and retries it (exponential backoff with jitter) until
//! the origin takes it, so a connection's events arrive in order and at least
//! once. While a request is in flight, new events pile up in the lane and leave
//! together in the next request: an idle node sends one event per request with
//! no added latency, a busy one sends up to `origin-batch-size`.
//!
//! Bounds: `max-pending-events` per connection, and `origin-queue-size`
//! events and `origin-queue-bytes` bytes per node. `disconnect` events bypass
//! them all — there is at most one per connection, so they are bounded by the
//! connection count — because the origin is promised exactly one `disconnect`
//! per accepted connection.

use super::Origin;
use crate::conn::{Conn, Outgoing};
use crate::lease::LeaseState;
use crate::metrics::KindLabel;
use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use rand::Rng;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::origin::Reply;
use switchboard_proto::ConnectionId;
use tokio::sync::Notify;

/// The queue (per connection or node-wide) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backlog;

#[derive(Debug)]
struct QueuedEvent {
    json: Bytes,
    conn: Option<Arc<Conn>>,
    /// About the cluster (`node_down`), not about this node's connections:
    /// kept through a fence.
    about_cluster: bool,
}

#[derive(Debug, Default)]
struct Lane {
    queue: Mutex<VecDeque<QueuedEvent>>,
    notify: Notify,
}

/// Per-node event queues, one lane per concurrent origin request.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    lanes: Box<[Lane]>,
    pending: AtomicUsize,
    pending_bytes: AtomicUsize,
    max_pending: usize,
    max_pending_bytes: usize,
    max_per_conn: usize,
    closing: AtomicBool,
    /// The node is fencing itself: events about its connections are dropped.
    fencing: AtomicBool,
    /// Events dropped by fences, not yet added to the metric.
    fenced_drops: AtomicU64,
}

impl Dispatcher {
    pub(crate) fn new(
        lanes: usize,
        max_pending: usize,
        max_pending_bytes: usize,
        max_per_conn: usize,
    ) -> Self {
        Self {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            pending: AtomicUsize::new(0),
            pending_bytes: AtomicUsize::new(0),
            max_pending,
            max_pending_bytes,
            max_per_conn,
            closing: AtomicBool::new(false),
            fencing: AtomicBool::new(false),
            fenced_drops: AtomicU64::new(0),
        }
    }

    pub(crate) fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Events waiting, node-wide.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Relaxed)
    }

    /// Whether the node-wide queue has room for a new connection's events:
    /// one more event, and one `message` event of `max_message` bytes (see
    /// [`connect_headroom`]), so that a client let in is not closed with
    /// 4002 on its first message because the queue sat just under its cap.
    pub(crate) fn has_room(&self, max_message: usize) -> bool {
        let headroom = connect_headroom(max_message, self.max_pending_bytes);
        self.pending() < self.max_pending
            && self.pending_bytes.load(Relaxed) + headroom <= self.max_pending_bytes
    }

    /// Queues an event of `key`'s connection. `reliable` events (disconnects)
    /// are never refused. While the node fences itself (see
    /// [`crate::lease`]) the event is dropped, counted, and reported queued:
    /// the origin has retired the connection already.
    pub(crate) fn enqueue(
        &self,
        key: &ConnKey,
        json: Bytes,
        conn: Option<&Arc<Conn>>,
        reliable: bool,
    ) -> Result<(), Backlog> {
        self.push(key, json, conn, reliable, false)
    }

    /// Queues an event about the cluster (`node_down`): never refused, and
    /// kept through a fence.
    pub(crate) fn enqueue_cluster_event(&self, json: Bytes) {
        let _ = self.push(&[0; 16], json, None, true, true);
    }

    fn push(
        &self,
        key: &ConnKey,
        json: Bytes,
        conn: Option<&Arc<Conn>>,
        reliable: bool,
        about_cluster: bool,
    ) -> Result<(), Backlog> {
        if !reliable {
            if self.pending() >= self.max_pending
                || self.pending_bytes.load(Relaxed) + json.len() > self.max_pending_bytes
            {
                return Err(Backlog);
            }
            if let Some(c) = conn {
                if c.pending_events.load(Relaxed) as usize >= self.max_per_conn {
                    return Err(Backlog);
                }
            }
        }
        let lane = &self.lanes[usize::from(key[0]) % self.lanes.len()];
        let mut queue = lane.queue.lock();
        // Checked under the lane's lock, which `purge_for_fence` takes after
        // the fence began: an event is either purged or never queued.
        if !about_cluster && self.fencing.load(Relaxed) {
            self.fenced_drops.fetch_add(1, Relaxed);
            return Ok(());
        }
        if let Some(c) = conn {
            c.pending_events.fetch_add(1, Relaxed);
        }
        self.pending.fetch_add(1, Relaxed);
        self.pending_bytes.fetch_add(json.len(), Relaxed);
        queue.push_back(QueuedEvent {
            json,
            conn: conn.cloned(),
            about_cluster,
        });
        drop(queue);
        lane.notify.notify_one();
        Ok(())
    }

    /// Starts or ends a fence. Starting one drops every queued event about
    /// this node's connections; while it lasts, new ones are dropped as they
    /// come. Both are counted (see [`Dispatcher::take_fenced_drops`]).
    pub(crate) fn set_fencing(&self, on: bool) {
        self.fencing.store(on, Relaxed);
        if !on {
            return;
        }
        let (mut n, mut bytes) = (0, 0);
        for lane in self.lanes.iter() {
            lane.queue.lock().retain(|e| {
                if e.about_cluster {
                    return true;
                }
                if let Some(c) = &e.conn {
                    c.pending_events.fetch_sub(1, Relaxed);
                }
                n += 1;
                bytes += e.json.len();
                false
            });
        }
        self.pending.fetch_sub(n, Relaxed);
        self.pending_bytes.fetch_sub(bytes, Relaxed);
        self.fenced_drops.fetch_add(n as u64, Relaxed);
    }

    /// Events dropped by fences since the last call.
    pub(crate) fn take_fenced_drops(&self) -> u64 {
        self.fenced_drops.swap(0, Relaxed)
    }

    /// No more events will be queued: lanes exit once empty.
    pub(crate) fn close(&self) {
        self.closing.store(true, Relaxed);
        for lane in self.lanes.iter() {
            lane.notify.notify_one();
        }
    }
}

/// Bytes of event JSON a handshake needs free in the node-wide queue: a
/// `message` event of `max_message` bytes (binary data grows by a third in
/// base64, plus 1 KiB of envelope), but at most a quarter of the queue, so
/// a small queue still lets clients in.
pub(crate) fn connect_headroom(max_message: usize, max_pending_bytes: usize) -> usize {
    let event = max_message
        .saturating_add(max_message / 3)
        .saturating_add(1024);
    event.min(max_pending_bytes / 4)
}

/// Wraps serialized events into the request body `{"events":[...]}`.
pub(crate) fn batch_body<'a>(events: impl IntoIterator<Item = &'a [u8]>) -> Bytes {
    let mut body = BytesMut::with_capacity(256);
    body.put_slice(b"{\"events\":[");
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(e);
    }
    body.put_slice(b"]}");
    body.freeze()
}

/// Retry delay before attempt `attempt + 1`: exponential, capped, with "equal
/// jitter" (half fixed, half random) so retries of many nodes spread out.
pub(crate) fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.min(20)).min(max);
    let half = exp / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

/// One lane's worker: runs until the dispatcher is closed and the lane is
/// empty, or until `origin.give_up` fires (drain deadline).
pub(crate) async fn run_lane(origin: Arc<Origin>, idx: usize) {
    let d = &origin.dispatcher;
    let lane = &d.lanes[idx];
    let cfg = &origin.config;
    loop {
        let mut batch = take(lane, cfg.origin_batch_size);
        if batch.is_empty() {
            if d.closing.load(Relaxed) {
                return;
            }
            tokio::select! {
                _ = lane.notify.notified() => continue,
                _ = origin.give_up.cancelled() => return,
            }
        }
        if !cfg.origin_batch_linger.is_zero() && batch.len() < cfg.origin_batch_size {
            tokio::time::sleep(cfg.origin_batch_linger).await;
            batch.extend(take(lane, cfg.origin_batch_size - batch.len()));
        }
        let mut body = batch_body(batch.iter().map(|e| &e.json[..]));
        let mut attempt = 0u32;
        let answer = loop {
            // Speak only while the lease is held (see `crate::lease`).
            if !origin.lease.is_held() {
                let state = tokio::select! {
                    s = origin.lease.wait(LEASE_POLL) => s,
                    _ = origin.give_up.cancelled() => {
                        settle(&origin, &batch, false);
                        drop_rest(&origin, lane);
                        return;
                    }
                };
                if state == LeaseState::Fencing {
                    // The origin has retired these connections: only
                    // events about the cluster still go.
                    let (keep, fenced): (Vec<_>, Vec<_>) =
                        batch.into_iter().partition(|e| e.about_cluster);
                    settle(&origin, &fenced, false);
                    origin.metrics.fenced_events.inc_by(fenced.len() as u64);
                    batch = keep;
                    if batch.is_empty() {
                        break None;
                    }
                    body = batch_body(batch.iter().map(|e| &e.json[..]));
                    // Fenced connections' events stay out until the fence ends.
                    tokio::time::sleep(LEASE_POLL).await;
                    continue;
                }
            }
            let started = Instant::now();
            // Control-API messages to these connections wait for this
            // attempt's replies, for `origin-timeout` at most.
            let mut holds = Holds::new(&batch, origin.clone());
            let deliver = guarded_deliver(&origin, body.clone());
            tokio::pin!(deliver);
            let hold_limit = tokio::time::sleep(cfg.origin_timeout);
            tokio::pin!(hold_limit);
            let result = loop {
                tokio::select! {
                    r = &mut deliver => break r,
                    _ = &mut hold_limit, if !holds.is_empty() => holds.release(),
                    _ = origin.give_up.cancelled() => {
                        drop(holds);
                        settle(&origin, &batch, false);
                        drop_rest(&origin, lane);
                        return;
                    }
                }
            };
            let result = match result {
                // The lease ran out just now: wait for it above.
                None | Some(Err(super::OriginError::LeaseLost)) => {
                    holds.release();
                    continue;
                }
                Some(r) => r,
            };
            if result.is_err() {
                holds.release();
            }
            origin.metrics.origin_request("events", started.elapsed());
            match result {
                Ok(answer) => break Some((answer, holds)),
                Err(e) => {
                    origin
                        .metrics
                        .origin_failures
                        .get_or_create(&KindLabel { kind: "events" })
                        .inc();
                    if !e.is_retryable() {
                        tracing::error!(error = %e, events = batch.len(), "origin refused events; dropping them");
                        break None;
                    }
                    let delay = backoff(cfg.origin_retry_initial, cfg.origin_retry_max, attempt);
                    tracing::warn!(error = %e, attempt, retry_in = ?delay, events = batch.len(), "origin request failed; retrying");
                    origin.metrics.origin_retries.inc();
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = origin.give_up.cancelled() => {
                            settle(&origin, &batch, false);
                            drop_rest(&origin, lane);
                            return;
                        }
                    }
                }
            }
        };
        let delivered = answer.is_some();
        if let Some((answer, holds)) = answer {
            deliver_replies(&origin, answer.replies);
            // Then what the control API sent meanwhile.
            drop(holds);
        }
        settle(&origin, &batch, delivered);
    }
}

/// How often a lane waiting for the lease looks at it again (the lease runs
/// out by the clock, so no wake-up says so).
const LEASE_POLL: Duration = Duration::from_millis(50);

/// Sends `body` if the lease is held at the moment the request starts: the
/// check and the start of the send happen in one poll, so a node stalled in
/// between sends nothing stale when it resumes (`None`: not sent).
async fn guarded_deliver(
    origin: &Origin,
    body: Bytes,
) -> Option<Result<switchboard_proto::origin::OriginAnswer, super::OriginError>> {
    if !origin.lease.is_held() {
        return None;
    }
    Some(origin.transport.deliver(body).await)
}

/// The connections of a batch in flight, each held once
/// ([`Conn::hold_for_replies`]) until released or dropped.
struct Holds(Vec<Arc<Conn>>, Arc<Origin>);

impl Holds {
    fn new(batch: &[QueuedEvent], origin: Arc<Origin>) -> Self {
        let mut conns: Vec<Arc<Conn>> = batch.iter().filter_map(|e| e.conn.clone()).collect();
        if conns.len() > 1 {
            conns.sort_unstable_by_key(Arc::as_ptr);
            conns.dedup_by(|a, b| Arc::ptr_eq(a, b));
        }
        for c in &conns {
            c.hold_for_replies();
        }
        Self(conns, origin)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn release(&mut self) {
        for c in self.0.drain(..) {
            c.release_hold(&self.1.metrics);
            // Held direct messages are numbered now.
            self.1.registry.numbered.touch(&c);
        }
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        self.release();
    }
}

fn take(lane: &Lane, max: usize) -> Vec<QueuedEvent> {
    let mut q = lane.queue.lock();
    let n = q.len().min(max);
    let batch = q.drain(..n).collect();
    if q.is_empty() && q.capacity() > 4096 {
        // A backlog grew the queue: give the memory back once it drained.
        *q = VecDeque::new();
    }
    batch
}

/// Accounts for events that left the queue.
fn settle(origin: &Origin, batch: &[QueuedEvent], delivered: bool) {
    for e in batch {
        if let Some(c) = &e.conn {
            c.pending_events.fetch_sub(1, Relaxed);
        }
    }
    origin.dispatcher.pending.fetch_sub(batch.len(), Relaxed);
    let bytes: usize = batch.iter().map(|e| e.json.len()).sum();
    origin.dispatcher.pending_bytes.fetch_sub(bytes, Relaxed);
    let n = batch.len() as u64;
    if delivered {
        origin.metrics.origin_events_delivered.inc_by(n);
    } else {
        origin.metrics.origin_events_dropped.inc_by(n);
    }
}

fn drop_rest(origin: &Origin, lane: &Lane) {
    let rest: Vec<_> = lane.queue.lock().drain(..).collect();
    if !rest.is_empty() {
        tracing::error!(
            events = rest.len(),
            "drain deadline passed; events not delivered to the origin"
        );
    }
    settle(origin, &rest, false);
}

/// Delivers the replies of an origin answer.
pub(crate) fn deliver_replies(origin: &Origin, replies: Vec<Reply>) {
    for reply in replies {
        // Any connection held here: started here, or a session that moved
        // here from another node (its id names that node).
        let Some(conn) = ConnectionId::parse(&reply.connection_id)
            .ok()
            .and_then(|id| origin.registry.get(&id.key()).filter(|c| c.has_id(&id)))
        else {
            tracing::debug!(connection_id = %reply.connection_id, "reply to an unknown connection dropped");
            continue;
        };
        if conn.graphql.is_some() {
            // A GraphQL client takes only GraphQL messages (docs/graphql.md).
            tracing::warn!(connection_id = %reply.connection_id, "origin reply to a GraphQL connection dropped");
            origin
                .metrics
                .graphql_refused
                .get_or_create(&crate::metrics::CodeLabel {
                    code: "origin_reply",
                })
                .inc();
            continue;
        }
        conn.send_reply(&Outgoing::new(reply.payload), &origin.metrics);
        origin.registry.numbered.touch(&conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..30 {
            let d = backoff(i, m, attempt);
            let exp = (i * 2u32.pow(attempt.min(20))).min(m);
            assert!(d >= exp / 2 && d <= exp, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn handshakes_need_room_for_one_max_size_message() {
        let d = Dispatcher::new(1, 100, 10_000, 10);
        assert_eq!(connect_headroom(3000, 10_000), 2500, "a quarter at most");
        assert_eq!(connect_headroom(600, 10_000), 1824);
        assert!(d.has_room(600));
        let key = [0u8; 16];
        d.enqueue(&key, Bytes::from(vec![b'x'; 8_176]), None, false)
            .unwrap();
        assert!(d.has_room(600), "1,824 bytes free");
        d.enqueue(&key, Bytes::from(vec![b'x'; 1]), None, false)
            .unwrap();
        assert!(!d.has_room(600), "1,823 bytes free: not enough");
        assert!(
            d.enqueue(&key, Bytes::from(vec![b'x'; 600]), None, false)
                .is_ok(),
            "the queue itself still takes events up to its cap"
        );
    }

    #[test]
    fn body_shape() {
        let b = batch_body([&b"{\"a\":1}"[..], b"{\"b\":2}"]);
        assert_eq!(&b[..], br#"{"events":[{"a":1},{"b":2}]}"#);
    }
}
