//! [`RedisChannels`]: the [`ChannelBus`] over Redis.
//!
//! - **Log.** Each channel's log is a stream, `<prefix>:ch:{<channel>}:log`,
//!   whose entry ids are the offsets (`<offset>-0`), each entry holding the
//!   epoch, the time and the message. It keeps the namespace's
//!   `history-size` newest messages (`MAXLEN`); messages older than
//!   `history-ttl` are removed at the next publish, and the whole key
//!   expires `history-ttl` after the last publish. Each entry names the
//!   Redis run that wrote it: a publish that finds its channel's newest
//!   entry written by another run (Redis restarted from a snapshot, or
//!   failed over) starts a new epoch, since messages after it may be lost. A stream
//!   rather than a list or a sorted set: a read from a position is one
//!   `XRANGE` from the next offset (a seek), and the ids themselves say
//!   whether anything is missing.
//! - **Publish** is one Lua script (`publish.lua`): read the newest entry,
//!   append the next offset (a new epoch at offset 1 when the log is
//!   empty), trim, remember the idempotency key, and `PUBLISH` the message
//!   on the channel's live channel `<prefix>:chan:<channel>`. Redis runs
//!   scripts one at a time, so offsets are contiguous across nodes without
//!   retries, and every node receives a channel's messages in offset order.
//! - **Idempotency.** A key is kept as `<prefix>:ch:{<channel>}:idem:<hex>`
//!   for 5 minutes (or `history-ttl` if shorter), holding where the first
//!   publish landed.
//! - **Delivery.** Only nodes with subscribers of a channel subscribe to
//!   its live channel: one copy per interested node. A node that misses one
//!   (Redis restarted, its connection broke) notices the gap at the next
//!   message and reads the missing ones from the log.
//! - **Presence.** A request on `<prefix>:presence` is answered by every
//!   node with its own subscribers; the asker waits for as many answers as
//!   the publish reached (or the request timeout).

use crate::cluster::RedisCluster;
use crate::connect::Redis;
use crate::keys::{frame, unframe, Keys};
use crate::RedisConfig;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::{AsyncCommands, Value};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use switchboard_backend::{
    BoxFuture, BusError, BusEvent, ChannelBus, LogEntry, LogRead, Namespace, Node, Published, Watch,
};
use switchboard_proto::native::{Member, StreamPosition};
use switchboard_proto::origin::Payload;
use tokio_util::sync::CancellationToken;

/// Longest idempotency window.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

/// Joins and leaves waiting to be published; more are dropped (best effort).
const ANNOUNCE_QUEUE: usize = 10_000;

/// The header of a message on a channel's live channel.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Live {
    /// A message: its offset, epoch, time and whether it is binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    o: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<u64>,
    #[serde(default)]
    b: bool,
    /// A join (`true`) or a leave of a member of node `n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    join: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<String>,
}

/// The channel bus over Redis; see the module docs. Built by
/// [`RedisChannels::start`].
#[derive(Debug)]
pub struct RedisChannels {
    redis: Redis,
    keys: Keys,
    node: Arc<dyn Node>,
    config: RedisConfig,
    cluster: Arc<RedisCluster>,
    script: redis::Script,
    announce: tokio::sync::mpsc::Sender<(String, Bytes)>,
    stop: CancellationToken,
}

fn bus_down(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn new_epoch() -> String {
    let b: [u8; 6] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One entry of a channel's log: its entry, epoch and time.
fn log_entry(id: &str, fields: &[(String, Value)]) -> Option<(LogEntry, String)> {
    let offset = id.split('-').next()?.parse().ok()?;
    let (mut epoch, mut time, mut binary, mut data) = (None, 0, false, None);
    for (name, value) in fields {
        let Value::BulkString(bytes) = value else {
            continue;
        };
        match name.as_str() {
            "e" => epoch = String::from_utf8(bytes.clone()).ok(),
            "t" => time = std::str::from_utf8(bytes).ok()?.parse().ok()?,
            "k" => binary = bytes == b"b",
            "d" => data = Some(bytes.clone()),
            _ => {}
        }
    }
    let data = if binary {
        Payload::Binary(data?)
    } else {
        Payload::Text(String::from_utf8(data?).ok()?)
    };
    Some((
        LogEntry {
            offset,
            time_ms: time,
            data,
        },
        epoch?,
    ))
}

type RawEntry = (String, Vec<(String, Value)>);

impl RedisChannels {
    /// Starts the channel bus of `node`: answers presence requests and
    /// publishes joins and leaves.
    pub fn start(
        redis: Redis,
        node: Arc<dyn Node>,
        config: RedisConfig,
        cluster: Arc<RedisCluster>,
    ) -> Arc<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(ANNOUNCE_QUEUE);
        let bus = Arc::new(Self {
            keys: Keys::new(&config.prefix),
            script: redis::Script::new(include_str!("publish.lua")),
            redis,
            node,
            config,
            cluster,
            announce: tx,
            stop: CancellationToken::new(),
        });
        tokio::spawn(bus.clone().answer_presence());
        tokio::spawn(bus.clone().announcer(rx));
        bus
    }

    /// Stops the background tasks.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    async fn append(
        &self,
        ns: &Namespace,
        channel: &str,
        data: &Payload,
        key: Option<&str>,
    ) -> Result<Published, BusError> {
        // A publish is refused at once while Redis is known to be away,
        // rather than waiting for a connection.
        if !self.redis.link().is_up() {
            return Err(bus_down("Redis is unreachable"));
        }
        let (bytes, kind): (&[u8], &str) = match data {
            Payload::Text(t) => (t.as_bytes(), "t"),
            Payload::Binary(b) => (b, "b"),
        };
        let ttl = ns.history_ttl.max(Duration::from_millis(1));
        let window = IDEMPOTENCY_WINDOW.min(ttl);
        let mut conn = self.redis.conn();
        let (duplicate, epoch, offset): (u8, String, u64) = self
            .script
            .key(self.keys.channel_log(channel))
            .key(self.keys.channel_key(channel, key.unwrap_or("")))
            .arg(bytes)
            .arg(kind)
            .arg(new_epoch())
            .arg(ns.history_size.max(1))
            .arg(ttl.as_millis() as u64)
            .arg(window.as_millis() as u64)
            .arg(self.keys.channel_live(channel))
            .arg(if key.is_some() { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(|e| {
                if e.to_string().contains("max") && e.to_string().contains("bulk") {
                    BusError::TooLarge(e.to_string())
                } else {
                    bus_down(e)
                }
            })?;
        Ok(Published {
            epoch,
            offset,
            duplicate: duplicate == 1,
        })
    }

    async fn read_log(
        &self,
        ns: &Namespace,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
    ) -> Result<LogRead, BusError> {
        let log = self.keys.channel_log(channel);
        let mut conn = self.redis.conn();
        let newest: Vec<RawEntry> = redis::cmd("XREVRANGE")
            .arg(&log)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(bus_down)?;
        // (Messages older than history-ttl are trimmed by the publish
        // script, and the key expires with the newest; the node's clock is
        // not compared with Redis's.)
        let tail = newest
            .first()
            .and_then(|(id, fields)| log_entry(id, fields));
        let Some((tail, epoch)) = tail else {
            // Nothing in the log: only a reader that saw nothing lost nothing.
            return Ok(LogRead {
                complete: since.is_none_or(|s| s.offset == 0),
                ..LogRead::default()
            });
        };
        let mut read = LogRead {
            epoch: epoch.clone(),
            offset: tail.offset,
            entries: Vec::new(),
            complete: true,
        };
        // The first offset wanted, and how many.
        let (from, want) = match since {
            None => {
                let n = (limit.unwrap_or(usize::MAX) as u64).min(tail.offset);
                (tail.offset + 1 - n, n)
            }
            Some(s) if s.epoch.is_empty() && s.offset == 0 => (1, tail.offset),
            Some(s) if s.epoch != epoch || s.offset > tail.offset => {
                read.complete = false;
                return Ok(read);
            }
            Some(s) => (s.offset + 1, tail.offset - s.offset),
        };
        if since.is_some() && want > ns.history_size.max(1) as u64 {
            read.complete = false;
            return Ok(read);
        }
        if want > 0 {
            let count = match (since, limit) {
                (Some(_), Some(l)) => (l as u64).min(want),
                _ => want,
            };
            let entries: Vec<RawEntry> = redis::cmd("XRANGE")
                .arg(&log)
                .arg(format!("{from}-0"))
                .arg(format!("{}-0", tail.offset))
                .arg("COUNT")
                .arg(count)
                .query_async(&mut conn)
                .await
                .map_err(bus_down)?;
            let mut expected = from;
            for (id, fields) in &entries {
                match log_entry(id, fields) {
                    Some((entry, e))
                        if e == epoch && (since.is_none() || entry.offset == expected) =>
                    {
                        expected = entry.offset + 1;
                        read.entries.push(entry);
                    }
                    // A gap or another epoch: with `since`, what follows
                    // cannot be served exactly.
                    _ if since.is_some() => break,
                    _ => {}
                }
            }
            if since.is_some() && read.entries.len() as u64 != count {
                read.complete = false;
                read.entries.clear();
            }
        }
        Ok(read)
    }

    /// Answers presence requests with this node's subscribers.
    async fn answer_presence(self: Arc<Self>) {
        let Some(mut sub) = self
            .redis
            .subscribe_until(&self.keys.presence(), self.config.heartbeat, &self.stop)
            .await
        else {
            return;
        };
        loop {
            let msg = tokio::select! {
                m = sub.inbox.recv() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            let Some((request, channel)) = unframe::<crate::cluster::Request>(&msg) else {
                continue;
            };
            if request.from == self.node.id() {
                continue;
            }
            let Ok(channel) = std::str::from_utf8(&channel) else {
                continue;
            };
            let members = self.node.channel_members(channel);
            let body = serde_json::to_vec(&members).expect("members serialize");
            let answer = crate::cluster::Answer {
                id: request.id,
                status: 200,
            };
            let mut conn = self.redis.conn();
            let _: redis::RedisResult<i64> = conn
                .publish(&request.reply, frame(&answer, &body).as_ref())
                .await;
        }
    }

    /// Publishes queued joins and leaves.
    async fn announcer(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<(String, Bytes)>) {
        loop {
            let (channel, message) = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            let mut conn = self.redis.conn();
            let _: redis::RedisResult<i64> = conn.publish(channel, message.as_ref()).await;
        }
    }
}

/// A message of a channel's live channel, as the gateway sees it.
fn live_event(msg: &Bytes, own_node: &str) -> Option<BusEvent> {
    let (live, body) = unframe::<Live>(msg)?;
    if let Some(joined) = live.join {
        if live.n.as_deref() == Some(own_node) {
            return None;
        }
        let member: Member = serde_json::from_slice(&body).ok()?;
        return Some(if joined {
            BusEvent::Join(member)
        } else {
            BusEvent::Leave(member)
        });
    }
    let data = if live.b {
        Payload::Binary(body.to_vec())
    } else {
        Payload::Text(String::from_utf8(body.to_vec()).ok()?)
    };
    Some(BusEvent::Message {
        epoch: live.e?,
        entry: LogEntry {
            offset: live.o?,
            time_ms: live.t.unwrap_or(0),
            data,
        },
    })
}

impl ChannelBus for RedisChannels {
    fn request_timeout(&self) -> Duration {
        self.config.request_timeout
    }

    fn publish<'a>(
        &'a self,
        ns: &'a Namespace,
        channel: &'a str,
        data: &'a Payload,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Published, BusError>> {
        Box::pin(self.append(ns, channel, data, key))
    }

    fn read<'a>(
        &'a self,
        ns: &'a Namespace,
        channel: &'a str,
        since: Option<&'a StreamPosition>,
        limit: Option<usize>,
    ) -> BoxFuture<'a, Result<LogRead, BusError>> {
        Box::pin(self.read_log(ns, channel, since, limit))
    }

    fn watch<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Watch, BusError>> {
        Box::pin(async move {
            let sub = tokio::time::timeout(
                self.config.request_timeout,
                self.redis.subscribe(&self.keys.channel_live(channel)),
            )
            .await
            .map_err(|_| bus_down("subscribing timed out"))?
            .map_err(bus_down)?;
            let own = self.node.id().to_string();
            let events = futures_util::stream::unfold(sub, |mut sub| async move {
                let msg = sub.inbox.recv().await?;
                Some((msg, sub))
            })
            .filter_map(move |msg| std::future::ready(live_event(&msg, &own)));
            Ok(Box::pin(events) as Watch)
        })
    }

    fn announce(&self, channel: &str, member: &Member, joined: bool) {
        let live = Live {
            join: Some(joined),
            n: Some(self.node.id().to_string()),
            ..Live::default()
        };
        let body = serde_json::to_vec(member).expect("members serialize");
        if self
            .announce
            .try_send((self.keys.channel_live(channel), frame(&live, &body)))
            .is_err()
        {
            tracing::debug!(channel, "join/leave announcement dropped: queue full");
        }
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>, BusError>> {
        Box::pin(async move {
            let peers = self.cluster.peer_count();
            if peers == 0 {
                return Ok(Vec::new());
            }
            let (mut waiting, reached) = self
                .cluster
                .request(&self.keys.presence(), channel.as_bytes(), peers + 1)
                .await
                .map_err(bus_down)?;
            // Our own node is among those reached, and does not answer.
            let expected = reached.saturating_sub(1).min(peers);
            let answers = futures_util::stream::poll_fn(|cx| waiting.answers.poll_recv(cx))
                .map(|(_, body)| body);
            let within = self.config.request_timeout;
            Ok(switchboard_backend::bus::gather_members(answers, expected, within).await)
        })
    }
}
