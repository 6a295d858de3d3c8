//! [`RedisOrigin`]: the origin reached over Redis Streams instead of an HTTP
//! webhook (`--origin redis`).
//!
//! - **Events** (`message`, `disconnect`, `keepalive`, `node_down`, …) are
//!   appended to the stream `<prefix>:events:<k>`, one entry per batch with
//!   the fields `node` and `batch` (the webhook's body, `{"events":[…]}`).
//!   `k` is a hash of the connection id modulo `--redis-event-partitions`
//!   (`node_down` goes to 0), so each connection's events are in one stream,
//!   in order. The origin reads with a consumer group, acknowledges with
//!   `XACK`, and claims what a crashed worker left pending
//!   (`XAUTOCLAIM`): at least once, each connection's events in order for a
//!   worker that owns its stream. An event counts as delivered once Redis
//!   has it; each stream keeps about `--redis-event-stream-max-len`
//!   entries.
//! - **Decisions** (`connect`, `publish`, `subscribe`) are appended to
//!   `<prefix>:decisions` with the fields `node`, `type`, `reply`,
//!   `deadline_ms` and `batch`. The origin answers by publishing
//!   `{"id": <event id>, "status": 200, "answer": {…}}` (or a 4xx/5xx
//!   `status` with a `reason`) on the entry's `reply` channel. No answer
//!   within `--origin-timeout` refuses the client with 503, as an
//!   unreachable webhook would; a decision read after its `deadline_ms` is
//!   to be skipped (the client was refused already).

use crate::connect::Redis;
use crate::keys::Keys;
use crate::RedisConfig;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use switchboard_backend::{BoxFuture, ConnectDecision, OriginError, OriginTransport};
use switchboard_proto::origin::OriginAnswer;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Entries kept in the decisions stream (they are useless after their
/// deadline).
const DECISIONS_MAX_LEN: u64 = 100_000;

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Peek {
    id: String,
    #[serde(default)]
    connection_id: Option<String>,
}

/// The origin's answer to a decision, as published on the reply channel.
#[derive(Debug, Deserialize)]
struct Answer {
    id: String,
    #[serde(default = "ok")]
    status: u16,
    #[serde(default)]
    answer: Option<OriginAnswer>,
    #[serde(default)]
    reason: Option<String>,
}

fn ok() -> u16 {
    200
}

/// Sends events to an origin reading Redis Streams; see the module docs.
#[derive(Debug)]
pub struct RedisOrigin {
    redis: Redis,
    keys: Keys,
    node: String,
    reply: String,
    timeout: Duration,
    partitions: u32,
    max_len: u64,
    /// Decisions waiting for their answer, by event id.
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    /// Subscribed to the reply channel: answers can arrive.
    listening: std::sync::atomic::AtomicBool,
    stop: CancellationToken,
}

/// The stream partition of a connection: FNV-1a of its id.
pub fn partition_of(connection_id: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in connection_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

fn unreachable(e: impl std::fmt::Display) -> OriginError {
    OriginError::Unreachable(e.to_string())
}

impl RedisOrigin {
    /// The transport of node `node`; listens for answers (waiting up to
    /// `within` for that before returning; decisions are refused as
    /// unreachable until it listens).
    pub async fn start(
        redis: Redis,
        config: &RedisConfig,
        node: &str,
        within: Duration,
    ) -> Arc<Self> {
        let keys = Keys::new(&config.prefix);
        let origin = Arc::new(Self {
            reply: keys.origin_replies(node),
            keys,
            redis,
            node: node.to_owned(),
            timeout: config.origin_timeout,
            partitions: config.event_partitions.max(1),
            max_len: config.event_stream_max_len.max(1),
            waiting: Mutex::default(),
            listening: std::sync::atomic::AtomicBool::new(false),
            stop: CancellationToken::new(),
        });
        tokio::spawn(origin.clone().collect_answers());
        let deadline = tokio::time::Instant::now() + within;
        while !origin.listening.load(std::sync::atomic::Ordering::Acquire)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        origin
    }

    async fn collect_answers(self: Arc<Self>) {
        let Some(mut sub) = self
            .redis
            .subscribe_until(&self.reply, Duration::from_secs(1), &self.stop)
            .await
        else {
            return;
        };
        self.listening
            .store(true, std::sync::atomic::Ordering::Release);
        loop {
            let msg = tokio::select! {
                m = sub.inbox.recv() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            match serde_json::from_slice::<Answer>(&msg) {
                Ok(answer) => {
                    let waiting = self.waiting.lock().remove(&answer.id);
                    match waiting {
                        Some(tx) => {
                            let _ = tx.send(answer);
                        }
                        None => {
                            tracing::debug!(id = %answer.id, "origin answer for no waiting event (late?)")
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable origin answer on {}", self.reply),
            }
        }
    }

    fn decide(
        &self,
        kind: &'static str,
        body: Bytes,
    ) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        Box::pin(async move {
            if !self.redis.link().is_up() {
                return Err(unreachable("Redis is unreachable"));
            }
            if !self.listening.load(std::sync::atomic::Ordering::Acquire) {
                return Err(unreachable("not yet listening for the origin's answers"));
            }
            let batch: Batch<'_> = serde_json::from_slice(&body)
                .map_err(|e| OriginError::BadAnswer(format!("unreadable event batch: {e}")))?;
            let id = batch
                .events
                .first()
                .and_then(|e| serde_json::from_str::<Peek>(e.get()).ok())
                .map(|p| p.id)
                .ok_or_else(|| OriginError::BadAnswer("a decision without an event".into()))?;
            let (tx, rx) = oneshot::channel();
            self.waiting.lock().insert(id.clone(), tx);
            let forget = Forget(&self.waiting, &id);
            let deadline = crate::cluster::now_ms() + self.timeout.as_millis() as u64;
            let mut conn = self.redis.conn();
            let added: redis::RedisResult<String> = redis::cmd("XADD")
                .arg(self.keys.decisions())
                .arg("MAXLEN")
                .arg("~")
                .arg(DECISIONS_MAX_LEN)
                .arg("*")
                .arg("node")
                .arg(&self.node)
                .arg("type")
                .arg(kind)
                .arg("reply")
                .arg(&self.reply)
                .arg("deadline_ms")
                .arg(deadline)
                .arg("batch")
                .arg(body.as_ref())
                .query_async(&mut conn)
                .await;
            added.map_err(unreachable)?;
            let answer = tokio::time::timeout(self.timeout, rx)
                .await
                .map_err(|_| OriginError::Timeout)?
                .map_err(|_| OriginError::Timeout)?;
            drop(forget);
            match answer.status {
                200..=299 => Ok(ConnectDecision::Accept(answer.answer.unwrap_or_default())),
                400..=599 => Ok(ConnectDecision::Reject {
                    status: answer.status,
                    reason: answer.reason,
                }),
                other => Err(OriginError::Permanent(other)),
            }
        })
    }
}

/// Forgets a waiting decision however its wait ends.
struct Forget<'a>(&'a Mutex<HashMap<String, oneshot::Sender<Answer>>>, &'a str);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(self.1);
    }
}

impl OriginTransport for RedisOrigin {
    fn connect(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide("connect", body)
    }

    fn publish(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide("publish", body)
    }

    fn subscribe(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide("subscribe", body)
    }

    fn deliver(&self, body: Bytes) -> BoxFuture<'_, Result<OriginAnswer, OriginError>> {
        Box::pin(async move {
            if !self.redis.link().is_up() {
                return Err(unreachable("Redis is unreachable"));
            }
            let batch: Batch<'_> = serde_json::from_slice(&body)
                .map_err(|e| OriginError::BadAnswer(format!("unreadable event batch: {e}")))?;
            // Each partition's events, in order.
            let mut parts: Vec<Vec<&RawValue>> = vec![Vec::new(); self.partitions as usize];
            for e in &batch.events {
                let peek: Peek = serde_json::from_str(e.get())
                    .map_err(|e| OriginError::BadAnswer(format!("unreadable event: {e}")))?;
                let k = peek
                    .connection_id
                    .as_deref()
                    .map_or(0, |c| partition_of(c, self.partitions));
                parts[k as usize].push(*e);
            }
            let mut pipe = redis::pipe();
            for (k, events) in parts.iter().enumerate() {
                if events.is_empty() {
                    continue;
                }
                let mut body = String::from("{\"events\":[");
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(e.get());
                }
                body.push_str("]}");
                pipe.cmd("XADD")
                    .arg(self.keys.events(k as u32))
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.max_len)
                    .arg("*")
                    .arg("node")
                    .arg(&self.node)
                    .arg("batch")
                    .arg(body)
                    .ignore();
            }
            let mut conn = self.redis.conn();
            let added: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
            added.map_err(unreachable)?;
            Ok(OriginAnswer::default())
        })
    }
}
