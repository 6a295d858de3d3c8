//! The channel bus: what a node needs from a cluster backend so that its
//! channels are the cluster's channels, as the [`ChannelBus`] trait.
//!
//! A channel's messages live in a log the backend keeps (NATS: a JetStream
//! stream per namespace). A publish on any node appends to that log, which
//! gives the message the channel's next offset, and broadcasts it to the
//! nodes that watch the channel — those with local subscribers, so a message
//! crosses the bus once per interested node, never once per subscriber.
//! Each watching node keeps a replica of the channel's position, fans
//! messages out to its own subscribers in offset order, fills gaps from the
//! log, and serves recovery from the log when its own cache does not reach
//! back far enough. Presence is each node's own subscribers, gathered from
//! every live node when asked.
//!
//! The gateway side of this (replicas, recovery, fan-out) is in the server
//! crate's `channels`; a backend implements the trait and hands it to
//! `Gateway::join_channel_bus`.

use crate::namespace::Namespace;
use crate::BoxFuture;
use futures_util::Stream;
use std::pin::Pin;
use switchboard_proto::native::{Member, StreamPosition};
use switchboard_proto::origin::Payload;

/// Why the bus could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The bus or its log is unreachable (native `unavailable`, control API
    /// 503 `cluster_unavailable`).
    #[error("the cluster bus is unavailable: {0}")]
    Unavailable(String),
    /// The message is larger than the bus carries (native `too_large`,
    /// control API 413 `payload_too_large`).
    #[error("message too large for the cluster bus: {0}")]
    TooLarge(String),
}

/// Where a publish landed in the channel's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel's epoch.
    pub epoch: String,
    /// The message's offset.
    pub offset: u64,
    /// The idempotency key was seen before: nothing was published, and
    /// `offset` is where the first publish landed.
    pub duplicate: bool,
}

/// One message of a channel's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Its offset within the epoch.
    pub offset: u64,
    /// When it was published, Unix time in milliseconds.
    pub time_ms: u64,
    /// The message.
    pub data: Payload,
}

/// A read of a channel's log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogRead {
    /// The channel's epoch (empty: nothing was ever published, or all of it
    /// has expired).
    pub epoch: String,
    /// The newest offset (0: none).
    pub offset: u64,
    /// The messages read, oldest first, offsets contiguous.
    pub entries: Vec<LogEntry>,
    /// With `since`: whether every message after it is still in the log
    /// (then `entries` holds them all, up to the limit). Without: `true`.
    pub complete: bool,
}

/// What a watched channel brings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A message appended to the channel's log (own node's included).
    Message {
        /// The epoch it belongs to.
        epoch: String,
        /// The message.
        entry: LogEntry,
    },
    /// A subscriber of another node joined.
    Join(Member),
    /// A subscriber of another node left.
    Leave(Member),
}

/// The events of one watched channel; dropping it stops the watch.
pub type Watch = Pin<Box<dyn Stream<Item = BusEvent> + Send>>;

/// The members in up to `expected` presence answers (each the JSON of a
/// `Vec<Member>`) from `answers`, waiting at most `within` in all: a peer
/// that does not answer in time (dead, not yet dropped) has no members to
/// show. For backends gathering [`ChannelBus::presence`].
pub async fn gather_members<S>(
    mut answers: S,
    expected: usize,
    within: std::time::Duration,
) -> Vec<Member>
where
    S: Stream<Item = bytes::Bytes> + Unpin,
{
    use futures_util::StreamExt;
    let mut members = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    for _ in 0..expected {
        match tokio::time::timeout_at(deadline, answers.next()).await {
            Ok(Some(body)) => {
                if let Ok(more) = serde_json::from_slice::<Vec<Member>>(&body) {
                    members.extend(more);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    members
}

/// A cluster backend's channel services; see the module docs.
pub trait ChannelBus: Send + Sync + std::fmt::Debug + 'static {
    /// Appends a message to `channel`'s log: the next offset of its epoch (a
    /// new epoch when the log is empty), kept within `ns`'s limits, then
    /// broadcast to the nodes that watch the channel. With `key`, a key
    /// already used on the channel within the idempotency window publishes
    /// nothing and answers the first publish's position.
    fn publish<'a>(
        &'a self,
        ns: &'a Namespace,
        channel: &'a str,
        data: &'a Payload,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Published, BusError>>;

    /// Reads `channel`'s log. With `since`: the messages after it (the
    /// oldest `limit` of them), or `complete: false` when some are gone (too
    /// old, another epoch, a position from the future). A `since` with an
    /// empty epoch and offset 0 means "from the first message of whatever
    /// epoch". Without `since`: the newest `limit` messages (`Some(0)`: only
    /// the position).
    fn read<'a>(
        &'a self,
        ns: &'a Namespace,
        channel: &'a str,
        since: Option<&'a StreamPosition>,
        limit: Option<usize>,
    ) -> BoxFuture<'a, Result<LogRead, BusError>>;

    /// Starts receiving `channel`'s messages and other nodes' joins and
    /// leaves. The interest is registered with the bus before this returns,
    /// so every message appended afterwards arrives: each node's in the
    /// order it appended them, while messages of two nodes may come out of
    /// offset order (a consumer fills a gap from [`ChannelBus::read`] and
    /// drops what it has).
    fn watch<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Watch, BusError>>;

    /// Tells the nodes watching `channel` that a local subscriber joined
    /// (`true`) or left. Best effort.
    fn announce(&self, channel: &str, member: &Member, joined: bool);

    /// The subscribers of `channel` on every other live node.
    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>, BusError>>;

    /// How long a caller waits on the bus for a client (a read of the log
    /// before a subscriber is answered) before answering that the cluster
    /// did not answer in time.
    fn request_timeout(&self) -> std::time::Duration;
}
