//! [`RedisControl`]: control commands from the origin over a Redis stream.
//!
//! The origin appends a command (the JSON of a control command, as for the
//! NATS control subject) to the stream `<prefix>:control` in the field
//! `command`, optionally with a pub/sub channel in `reply`. Every node
//! reads the stream in the consumer group `switchboard` (created by the
//! first node, starting a minute before then by Redis's clock), so each
//! command is taken by one node, which runs it (in order, forwarding each
//! to the node holding its connection),
//! publishes `{"id": <entry id>, "status": <HTTP status>, "body": <JSON>}`
//! on `reply` if given, and acknowledges it. Entries a node took and did not
//! acknowledge (it died) are claimed by another after 30 s: a command runs
//! at least once.

use crate::connect::{Redis, BLOCK_FOR};
use crate::keys::Keys;
use crate::RedisConfig;
use redis::{AsyncCommands, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_backend::Node;
use tokio_util::sync::CancellationToken;

/// The consumer group of the nodes.
pub const GROUP: &str = "switchboard";

/// How long an entry may stay unacknowledged before another node claims it.
const CLAIM_AFTER: Duration = Duration::from_secs(30);

/// Entries read at once: run one after the other, each bounded by the
/// request timeout, so a read is done well within [`CLAIM_AFTER`].
const BATCH: usize = 16;

/// How far back a new consumer group starts, in ms.
const STALE_MS: u64 = 60_000;

type Entries = Vec<(String, Vec<(String, Value)>)>;

/// Reads the control stream for one node; see the module docs.
#[derive(Debug)]
pub struct RedisControl {
    redis: Redis,
    keys: Keys,
    node: Arc<dyn Node>,
    stop: CancellationToken,
}

impl RedisControl {
    /// Starts reading `<prefix>:control` for `node`.
    pub fn start(redis: Redis, node: Arc<dyn Node>, config: &RedisConfig) -> Arc<Self> {
        let control = Arc::new(Self {
            redis,
            keys: Keys::new(&config.prefix),
            node,
            stop: CancellationToken::new(),
        });
        tokio::spawn(control.clone().read());
        control
    }

    /// Stops reading.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    async fn read(self: Arc<Self>) {
        let stream = self.keys.control();
        let mut group_made = false;
        let mut last_claim = Instant::now();
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            if !group_made {
                match self.make_group(&stream).await {
                    Ok(()) => group_made = true,
                    Err(e) => {
                        tracing::debug!(error = %e, "control stream group not made yet");
                        self.pause().await;
                        continue;
                    }
                }
            }
            let mut entries = Entries::new();
            if last_claim.elapsed() >= CLAIM_AFTER / 3 {
                last_claim = Instant::now();
                entries.extend(self.claim(&stream).await);
            }
            let mut conn = self.redis.blocking_conn();
            let read: redis::RedisResult<Option<Vec<(String, Entries)>>> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(self.node.id())
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(BLOCK_FOR.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
                .query_async(&mut conn)
                .await;
            match read {
                Ok(found) => entries.extend(found.into_iter().flatten().flat_map(|(_, e)| e)),
                Err(e) => {
                    if e.to_string().contains("NOGROUP") {
                        // Redis restarted empty: make the group again.
                        group_made = false;
                    } else {
                        tracing::debug!(error = %e, "cannot read the control stream");
                    }
                    self.pause().await;
                }
            }
            // In order (a `send` then a `close` stay so); a read is small
            // enough to be done long before another node may claim its
            // entries as abandoned.
            for (id, fields) in entries {
                self.run(&stream, id, fields).await;
            }
        }
    }

    /// Makes the consumer group (if no node did), starting a minute before
    /// now by Redis's clock: entries appended while no group existed (after
    /// Redis restarted empty) are run, a stream's old history is not.
    async fn make_group(&self, stream: &str) -> redis::RedisResult<()> {
        let mut conn = self.redis.conn();
        let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let start = format!("{}-0", (secs * 1000).saturating_sub(STALE_MS));
        let made: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(GROUP)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match made {
            Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    async fn pause(&self) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    /// Entries another node took and left unacknowledged for too long.
    async fn claim(&self, stream: &str) -> Entries {
        let mut conn = self.redis.conn();
        // Redis 6.2 answers two elements, 7.0 three (the deleted ids).
        let claimed: redis::RedisResult<Vec<Value>> = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg(self.node.id())
            .arg(CLAIM_AFTER.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(&mut conn)
            .await;
        let entries = claimed.and_then(|parts| match parts.into_iter().nth(1) {
            Some(entries) => redis::from_redis_value::<Vec<Value>>(entries).map_err(Into::into),
            None => Ok(Vec::new()),
        });
        match entries {
            // A deleted entry comes back as nil: skipped.
            Ok(entries) => entries
                .into_iter()
                .filter_map(|e| redis::from_redis_value(e).ok())
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot claim the control stream's stale entries");
                Vec::new()
            }
        }
    }

    async fn run(&self, stream: &str, id: String, fields: Vec<(String, Value)>) {
        let field = |name: &str| {
            fields.iter().find_map(|(n, v)| match v {
                Value::BulkString(b) if n == name => Some(b.clone()),
                _ => None,
            })
        };
        let reply = match field("command") {
            Some(command) => Some(self.node.execute(&command, false).await),
            None => {
                tracing::warn!(entry = %id, "control stream entry without a `command` field skipped");
                None
            }
        };
        if let (Some(reply), Some(channel)) = (reply, field("reply")) {
            let body: serde_json::Value =
                serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null);
            let answer = serde_json::json!({"id": id, "status": reply.status, "body": body});
            let mut conn = self.redis.conn();
            let _: redis::RedisResult<i64> = conn.publish(channel, answer.to_string()).await;
        }
        let mut conn = self.redis.conn();
        let acked: redis::RedisResult<i64> = conn.xack(stream, GROUP, &[&id]).await;
        if let Err(e) = acked {
            tracing::warn!(entry = %id, error = %e, "control command ran but was not acknowledged: it may run again");
        }
    }
}
