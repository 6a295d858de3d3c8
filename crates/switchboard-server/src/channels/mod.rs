//! Channels held by this node: namespace rules, subscribers, history (every
//! message gets the next offset within the channel's epoch), presence, and
//! fan-out.
//!
//! One lock per channel orders everything that happens to it: a publish takes
//! the next offset, keeps the message and queues it on every subscriber under
//! that lock, and a subscribe queues the missed messages, its answer and
//! registers the subscriber under the same lock. So a subscriber sees the
//! messages it recovered, then live ones, with no gap and no duplicate at the
//! seam, and every subscriber sees one channel's messages in offset order.
//!
//! A message is encoded once into an [`Outgoing`] whose frames are shared
//! (`Bytes`) by every recipient; queueing never waits on a socket, so a slow
//! subscriber delays nobody (it is closed when its own queue overflows).
//!
//! Channel state lives while the channel has subscribers, kept messages or
//! recent idempotency keys; [`Channels::sweep`] expires old messages and
//! drops idle channels. A dropped channel starts over in a new epoch, which
//! tells a recovering client plainly that its position is gone.
//!
//! In a cluster (a [`ChannelBus`] joined), the channel's log is the bus's:
//! publishes go to the bus, and this node's state of a channel is a replica
//! kept while it has local subscribers (see `replica`). Subscribers the
//! replica cannot answer at once (it is still reading its position, or a
//! recovery reaches back further than its cache) wait as `pending`, with the
//! messages that arrive meanwhile, until the log has been read.

mod replica;

use crate::bus::{BusError, ChannelBus};
use crate::config::{Config, Namespace};
use crate::conn::{Conn, KeyHasher, Outgoing};
use crate::frames;
use crate::metrics::Metrics;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::control::ChannelSummary;
use switchboard_proto::native::{
    channel_namespace, ErrorCode, HistoryResult, Member, PresenceResult, Publication,
    PublishResult, Push, SessionChannel, StreamPosition, SubscribeResult,
};
use switchboard_proto::origin::Payload;
use tokio::sync::oneshot;

/// How long a publish's idempotency key is remembered.
pub(crate) const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

/// Most idempotency keys remembered per channel (the oldest go first).
pub(crate) const MAX_IDEMPOTENCY_KEYS: usize = 10_000;

const SHARDS: usize = 64;

/// Why a channel operation was refused. Each maps to a native protocol
/// [`ErrorCode`] and a control API status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChannelError {
    #[error("channel names are `namespace:name`, at most 255 bytes, without spaces")]
    BadChannel,
    #[error("namespace `{0}` is not configured")]
    UnknownNamespace(String),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("already subscribed")]
    AlreadySubscribed,
    #[error("at most {0} subscriptions per connection")]
    TooManySubscriptions(usize),
    #[error("this namespace keeps no history")]
    HistoryDisabled,
    #[error("this namespace keeps no presence")]
    PresenceDisabled,
    #[error("the connection has ended")]
    ConnectionGone,
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl ChannelError {
    /// The native protocol code.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::BadChannel => ErrorCode::BadChannel,
            Self::UnknownNamespace(_) => ErrorCode::UnknownNamespace,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::AlreadySubscribed => ErrorCode::AlreadySubscribed,
            Self::TooManySubscriptions(_) => ErrorCode::TooManySubscriptions,
            Self::HistoryDisabled => ErrorCode::HistoryDisabled,
            Self::PresenceDisabled => ErrorCode::PresenceDisabled,
            Self::ConnectionGone => ErrorCode::Internal,
            Self::Bus(BusError::Unavailable(_)) => ErrorCode::Unavailable,
            Self::Bus(BusError::TooLarge(_)) => ErrorCode::TooLarge,
        }
    }
}

/// How a new subscription is acknowledged to the connection, in order with
/// the channel's messages.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ack {
    /// The native reply to command `id`.
    Reply(u64),
    /// A `subscribed` push: a server-side subscription (raw connections
    /// get nothing).
    Push,
}

/// How a subscribe was answered.
#[derive(Debug)]
pub(crate) enum Subscribed {
    /// At once.
    Now(SubscribeResult),
    /// Once the channel's log has been read (cluster); the acknowledgement
    /// goes to the connection then, and the result here.
    Later(oneshot::Receiver<SubscribeResult>),
}

/// A kept message.
#[derive(Debug, Clone)]
struct Kept {
    offset: u64,
    time_ms: u64,
    at: Instant,
    msg: Arc<Outgoing>,
}

/// A subscriber waiting for the channel's log to be read (cluster).
#[derive(Debug)]
struct Pending {
    ticket: u64,
    conn: Arc<Conn>,
    since: Option<StreamPosition>,
    ack: Ack,
    /// It was parked (a resumed session's): a member already, so not
    /// announced or counted again.
    rejoin: bool,
    /// Messages fanned out while it waited.
    buffer: Vec<Kept>,
    done: Option<oneshot::Sender<SubscribeResult>>,
}

/// A subscriber of a suspended (or just resumed) session: a member of the
/// channel that is sent nothing until its client subscribes again.
#[derive(Debug)]
struct Parked {
    conn: Arc<Conn>,
    /// The channel's position when it stopped being sent messages.
    epoch: Arc<str>,
    offset: u64,
}

/// Most messages a pending subscriber buffers before it is closed as slow.
const MAX_PENDING_BUFFER: usize = 100_000;

/// One channel's state; see the module docs for what its lock orders.
#[derive(Debug)]
struct State {
    epoch: Arc<str>,
    /// Offset of the newest message (0: none yet).
    offset: u64,
    history: VecDeque<Kept>,
    subscribers: HashMap<ConnKey, Arc<Conn>, BuildHasherDefault<KeyHasher>>,
    /// Subscribers of suspended sessions (see [`Parked`]).
    parked: HashMap<ConnKey, Parked, BuildHasherDefault<KeyHasher>>,
    /// Recent idempotency keys and the offsets they were published at.
    keys: HashMap<String, u64>,
    key_order: VecDeque<(Instant, String)>,
    /// Dropped from the node's map: whoever holds it must look up again.
    removed: bool,
    /// The position is known. Always on a single node; in a cluster, once
    /// the replica has read it from the log.
    synced: bool,
    /// Subscribers waiting for a read of the log (cluster).
    pending: Vec<Pending>,
    /// The task watching the channel on the bus (cluster).
    watcher: Option<tokio::task::AbortHandle>,
    /// When the position last moved, or was read from the log (cluster).
    moved_at: Option<Instant>,
}

impl State {
    fn expire(&mut self, ttl: Duration, now: Instant) {
        while self
            .history
            .front()
            .is_some_and(|k| now.duration_since(k.at) >= ttl)
        {
            self.history.pop_front();
        }
        while self
            .key_order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= IDEMPOTENCY_WINDOW)
        {
            let (_, key) = self.key_order.pop_front().expect("front exists");
            self.keys.remove(&key);
        }
    }

    /// Nothing to keep: no subscribers and, on a single node, no kept
    /// messages or keys either (in a cluster they are the log's).
    fn is_idle(&self, clustered: bool) -> bool {
        self.subscribers.is_empty()
            && self.parked.is_empty()
            && self.pending.is_empty()
            && (clustered || (self.history.is_empty() && self.keys.is_empty()))
    }

    fn new(epoch: Arc<str>, synced: bool) -> Self {
        Self {
            epoch,
            offset: 0,
            history: VecDeque::new(),
            subscribers: HashMap::default(),
            parked: HashMap::default(),
            keys: HashMap::new(),
            key_order: VecDeque::new(),
            removed: false,
            synced,
            pending: Vec::new(),
            watcher: None,
            moved_at: None,
        }
    }

    /// Whether the replica held a position in its epoch within `ttl`: the
    /// log cannot have expired since, so a new epoch means it was lost.
    fn held_within(&self, ttl: Duration) -> bool {
        self.offset > 0 && self.moved_at.is_some_and(|t| t.elapsed() < ttl)
    }

    fn position(&self) -> (String, u64) {
        (self.epoch.to_string(), self.offset)
    }

    /// The kept messages after `since`, or `None` when some of them are
    /// gone (too old, or another epoch).
    fn after(&self, since: &StreamPosition) -> Option<impl Iterator<Item = &Kept> + Clone> {
        if *since.epoch != *self.epoch || since.offset > self.offset {
            return None;
        }
        let first_needed = since.offset + 1;
        let complete = first_needed > self.offset
            || self
                .history
                .front()
                .is_some_and(|k| k.offset <= first_needed);
        let since = since.offset;
        complete.then(|| self.history.iter().filter(move |k| k.offset > since))
    }

    fn members(&self) -> impl Iterator<Item = Member> + '_ {
        self.subscribers
            .values()
            .chain(self.parked.values().map(|p| &p.conn))
            .map(|c| member(c))
    }

    /// Parks a subscriber of a suspended session at the current position.
    fn park(&mut self, conn: Arc<Conn>) {
        let (epoch, offset) = (self.epoch.clone(), self.offset);
        self.park_at(conn, epoch, offset);
    }

    /// Parks a subscriber of a suspended session at a position.
    fn park_at(&mut self, conn: Arc<Conn>, epoch: Arc<str>, offset: u64) {
        let parked = Parked {
            conn,
            epoch,
            offset,
        };
        self.parked.insert(parked.conn.key, parked);
    }
}

fn member(c: &Conn) -> Member {
    Member {
        client: c.id().to_string(),
        user: c.user_id().map(str::to_owned),
        info: c.metadata().cloned(),
    }
}

/// The `join` or `leave` push of a member.
fn member_push(channel: &str, member: Member, joined: bool) -> Push {
    let channel = channel.to_owned();
    if joined {
        Push::Join { channel, member }
    } else {
        Push::Leave { channel, member }
    }
}

/// Queues a push on the channel's native subscribers.
fn tell_natives(st: &State, push: &Push, m: &Metrics) {
    let mut natives = st.subscribers.values().filter(|c| c.native).peekable();
    if natives.peek().is_none() {
        return;
    }
    let out = Outgoing::native_only(frames::json(push));
    for c in natives {
        c.send(&out, m);
    }
}

fn presence_of(members: Vec<Member>) -> PresenceResult {
    let users = members
        .iter()
        .filter_map(|m| m.user.as_deref())
        .collect::<HashSet<_>>()
        .len();
    PresenceResult {
        clients: members.len(),
        users,
        members,
    }
}

/// The native push of a channel message.
fn message_json(channel: &str, epoch: &str, offset: u64, data: &Payload) -> bytes::Bytes {
    frames::json(&MessagePush {
        push: "message",
        channel,
        offset,
        epoch,
        data,
    })
}

/// Puts the message at `offset` (the next one) out: queued on every
/// subscriber and in every pending subscriber's buffer, and kept if the
/// namespace keeps history.
fn fanout(ch: &Channel, st: &mut State, offset: u64, time_ms: u64, data: Payload, m: &Metrics) {
    debug_assert_eq!(offset, st.offset + 1);
    let json = message_json(&ch.name, &st.epoch, offset, &data);
    let msg = Arc::new(Outgoing::publication(data, json));
    for conn in st.subscribers.values() {
        conn.send(&msg, m);
    }
    m.deliveries.inc_by(st.subscribers.len() as u64);
    let kept = Kept {
        offset,
        time_ms,
        at: Instant::now(),
        msg,
    };
    for p in &mut st.pending {
        if p.buffer.len() < MAX_PENDING_BUFFER {
            p.buffer.push(kept.clone());
        } else if p.buffer.len() == MAX_PENDING_BUFFER {
            p.buffer.push(kept.clone());
            p.conn.close_slow_now(m);
        }
    }
    st.offset = offset;
    st.moved_at = Some(kept.at);
    if ch.ns.history_size > 0 {
        if st.history.len() == ch.ns.history_size {
            st.history.pop_front();
        }
        st.history.push_back(kept);
    }
}

/// A channel: its name, its namespace's rules, and its state.
#[derive(Debug)]
pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    ns: Arc<Namespace>,
    state: Mutex<State>,
}

/// The `message` push of a publication, serialized without copying the data.
#[derive(Serialize)]
struct MessagePush<'a> {
    push: &'static str,
    channel: &'a str,
    offset: u64,
    epoch: &'a str,
    #[serde(flatten)]
    data: &'a Payload,
}

type Shard = RwLock<HashMap<Arc<str>, Arc<Channel>>>;

/// The channels of some connections, by connection key. Lock order: a
/// channel's state, then this.
type SubsShard = Mutex<HashMap<ConnKey, Vec<Arc<Channel>>, BuildHasherDefault<KeyHasher>>>;

/// The cluster's channel bus, and what the replicas' tasks use.
#[derive(Debug)]
struct BusLink {
    bus: Arc<dyn ChannelBus>,
    /// These channels (weak: the tasks end with the node).
    channels: Weak<Channels>,
    metrics: Arc<Metrics>,
}

/// Every channel this node holds state for.
#[derive(Debug)]
pub(crate) struct Channels {
    namespaces: HashMap<String, Arc<Namespace>>,
    shards: Box<[Shard]>,
    /// Each connection's channels (connections with none have no entry).
    subs: Box<[SubsShard]>,
    hasher: std::collections::hash_map::RandomState,
    max_subscriptions: usize,
    /// `max-channel-length`.
    max_channel_length: usize,
    /// Set when the node joins a cluster's channel bus.
    link: OnceLock<BusLink>,
    /// Numbers pending subscribers.
    tickets: AtomicU64,
}

fn new_epoch() -> Arc<str> {
    let b: [u8; 6] = rand::random();
    hex::encode(b).into()
}

impl Channels {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            namespaces: config
                .namespace
                .iter()
                .map(|ns| (ns.name.clone(), Arc::new(ns.clone())))
                .collect(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            subs: (0..SHARDS).map(|_| SubsShard::default()).collect(),
            hasher: Default::default(),
            max_subscriptions: config.max_subscriptions,
            max_channel_length: config.max_channel_length,
            link: OnceLock::new(),
            tickets: AtomicU64::new(0),
        }
    }

    /// Makes the cluster's bus the home of every channel's log. Only before
    /// the node serves (no channel exists yet); `false` if already joined.
    pub(crate) fn join_bus(
        self: &Arc<Self>,
        bus: Arc<dyn ChannelBus>,
        metrics: Arc<Metrics>,
    ) -> bool {
        let link = BusLink {
            bus,
            channels: Arc::downgrade(self),
            metrics,
        };
        self.link.set(link).is_ok()
    }

    /// How long a command waits for a subscription that waits on the bus
    /// (without a bus, nothing waits).
    pub(crate) fn request_timeout(&self) -> Duration {
        self.link
            .get()
            .map_or(Duration::ZERO, |l| l.bus.request_timeout())
    }

    /// Whether channels live on a cluster's bus.
    pub(crate) fn is_clustered(&self) -> bool {
        self.link.get().is_some()
    }

    /// The namespace of a channel name, checking the name.
    pub(crate) fn namespace(&self, channel: &str) -> Result<&Arc<Namespace>, ChannelError> {
        if channel.len() > self.max_channel_length {
            return Err(ChannelError::BadChannel);
        }
        let ns = channel_namespace(channel).ok_or(ChannelError::BadChannel)?;
        self.namespaces
            .get(ns)
            .ok_or_else(|| ChannelError::UnknownNamespace(ns.to_owned()))
    }

    fn shard(&self, name: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(name) as usize) % SHARDS]
    }

    /// The subscriptions shard of a connection.
    fn subs_of(&self, key: &ConnKey) -> &SubsShard {
        &self.subs[usize::from(key[15]) % SHARDS]
    }

    /// The channels `conn` is subscribed to, sorted.
    pub(crate) fn channels_of(&self, conn: &Conn) -> Vec<String> {
        let mut names: Vec<String> = self
            .subs_of(&conn.key)
            .lock()
            .get(&conn.key)
            .map(|chs| chs.iter().map(|c| c.name.to_string()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Whether `conn` is subscribed to `channel`.
    pub(crate) fn is_subscribed(&self, conn: &Conn, channel: &str) -> bool {
        self.subs_of(&conn.key)
            .lock()
            .get(&conn.key)
            .is_some_and(|chs| chs.iter().any(|c| &*c.name == channel))
    }

    fn get_or_create(&self, name: &str, metrics: &Metrics) -> Result<Arc<Channel>, ChannelError> {
        let ns = self.namespace(name)?;
        let shard = self.shard(name);
        if let Some(c) = shard.read().get(name) {
            return Ok(c.clone());
        }
        let clustered = self.is_clustered();
        let mut map = shard.write();
        let c = map.entry(name.into()).or_insert_with_key(|name| {
            metrics.channels.inc();
            // A replica learns its epoch from the log.
            let epoch = if clustered { "".into() } else { new_epoch() };
            Arc::new(Channel {
                name: name.clone(),
                ns: ns.clone(),
                state: Mutex::new(State::new(epoch, !clustered)),
            })
        });
        Ok(c.clone())
    }

    /// Runs `f` on the channel's live state (creating the channel if needed).
    fn with_state<T>(
        &self,
        name: &str,
        metrics: &Metrics,
        mut f: impl FnMut(&Arc<Channel>, &mut State) -> T,
    ) -> Result<T, ChannelError> {
        loop {
            let ch = self.get_or_create(name, metrics)?;
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            st.expire(ch.ns.history_ttl, Instant::now());
            return Ok(f(&ch, &mut st));
        }
    }

    /// Subscribes a connection. With `since`, the missed messages are queued
    /// first (or `recovered: false` is answered); then the acknowledgement;
    /// then, as they come, live messages. In a cluster, when the replica
    /// cannot answer from what it holds, the subscriber waits for a read of
    /// the log and is answered [`Subscribed::Later`].
    pub(crate) fn subscribe(
        &self,
        conn: &Arc<Conn>,
        channel: &str,
        since: Option<&StreamPosition>,
        ack: Ack,
        metrics: &Metrics,
    ) -> Result<Subscribed, ChannelError> {
        self.with_state(channel, metrics, |ch, st| {
            // The connection's list is settled under its shard lock, held
            // only here: the channel's state lock, held throughout, orders
            // the rest against an `unsubscribe_all` that takes the list
            // meanwhile (it then waits on this state to remove the
            // subscriber).
            // A parked subscriber (a resumed session's) subscribing again
            // is sent what it missed and then live messages, as a new
            // one would, but it is a member already.
            let rejoin = {
                let mut all_subs = self.subs_of(&conn.key).lock();
                if conn.ended.load(Relaxed) {
                    return Err(ChannelError::ConnectionGone);
                }
                if st.parked.contains_key(&conn.key) {
                    if conn.is_suspended() {
                        return Err(ChannelError::AlreadySubscribed);
                    }
                    st.parked.remove(&conn.key);
                    true
                } else {
                    if st.subscribers.contains_key(&conn.key)
                        || st.pending.iter().any(|p| p.conn.key == conn.key)
                    {
                        return Err(ChannelError::AlreadySubscribed);
                    }
                    if all_subs.get(&conn.key).map_or(0, Vec::len) >= self.max_subscriptions {
                        return Err(ChannelError::TooManySubscriptions(self.max_subscriptions));
                    }
                    all_subs.entry(conn.key).or_default().push(Arc::clone(ch));
                    false
                }
            };
            if conn.is_suspended() {
                // The origin subscribed a session while its client is
                // away: a member from now on, sent messages once the
                // client is back and subscribes again (listed in its
                // `connected`).
                st.park(conn.clone());
                self.announce_member(ch, st, conn, true, metrics);
                metrics.subscriptions.inc();
                let (epoch, offset) = st.position();
                return Ok(Subscribed::Now(SubscribeResult {
                    epoch,
                    offset,
                    recovered: None,
                    missed: None,
                }));
            }
            let recoverable = since.is_some_and(|since| st.after(since).is_some());
            let now = st.synced && (since.is_none() || recoverable || !self.is_clustered());
            if !now {
                let link = self.link.get().expect("only replicas are ever unsynced");
                let (tx, rx) = oneshot::channel();
                let ticket = self.tickets.fetch_add(1, Relaxed);
                st.pending.push(Pending {
                    ticket,
                    conn: conn.clone(),
                    since: since.cloned(),
                    ack,
                    rejoin,
                    buffer: Vec::new(),
                    done: Some(tx),
                });
                if st.watcher.is_none() {
                    st.watcher = replica::watch(link, ch);
                } else if st.synced {
                    replica::complete_later(link, ch, ticket);
                }
                return Ok(Subscribed::Later(rx));
            }
            let (epoch, offset) = st.position();
            let mut result = SubscribeResult {
                epoch,
                offset,
                recovered: None,
                missed: None,
            };
            if let Some(since) = since {
                match st.after(since) {
                    Some(missed) => {
                        let n = missed.clone().count() as u64;
                        conn.send_all(missed.map(|k| &*k.msg), metrics);
                        metrics.deliveries.inc_by(n);
                        result.recovered = Some(true);
                        result.missed = Some(n);
                    }
                    None => result.recovered = Some(false),
                }
            }
            self.acknowledge(ch, st, conn, ack, &result, !rejoin, metrics);
            st.subscribers.insert(conn.key, conn.clone());
            if !rejoin {
                metrics.subscriptions.inc();
            }
            Ok(Subscribed::Now(result))
        })?
    }

    /// Queues a new subscriber's acknowledgement and, if it `joined`
    /// (was not a member already), tells the channel's other subscribers
    /// (of every node).
    #[allow(clippy::too_many_arguments)]
    fn acknowledge(
        &self,
        ch: &Channel,
        st: &State,
        conn: &Conn,
        ack: Ack,
        result: &SubscribeResult,
        joined: bool,
        metrics: &Metrics,
    ) {
        match ack {
            Ack::Reply(id) => {
                conn.push(frames::result_frame(id, result), metrics);
            }
            Ack::Push if conn.native => {
                let push = Push::Subscribed {
                    channel: ch.name.to_string(),
                    epoch: result.epoch.clone(),
                    offset: result.offset,
                };
                conn.push(frames::push_frame(&push), metrics);
            }
            Ack::Push => {}
        }
        if joined {
            self.announce_member(ch, st, conn, true, metrics);
        }
    }

    /// Tells a channel's other subscribers, on every node, that `conn`
    /// joined or left (if the namespace pushes joins and leaves).
    fn announce_member(&self, ch: &Channel, st: &State, conn: &Conn, joined: bool, m: &Metrics) {
        if !ch.ns.join_leave {
            return;
        }
        let who = member(conn);
        if let Some(link) = self.link.get() {
            link.bus.announce(&ch.name, &who, joined);
        }
        tell_natives(st, &member_push(&ch.name, who, joined), m);
    }

    /// Unsubscribes a connection; `notify` sends a native connection an
    /// `unsubscribed` push. Returns whether it was subscribed.
    pub(crate) fn unsubscribe(
        &self,
        conn: &Conn,
        channel: &str,
        notify: bool,
        metrics: &Metrics,
    ) -> Result<bool, ChannelError> {
        self.namespace(channel)?;
        let Some(ch) = self.forget(conn, |c| &*c.name == channel) else {
            return Ok(false);
        };
        self.remove_subscriber(&ch, conn, metrics);
        if notify && conn.native {
            let push = Push::Unsubscribed {
                channel: channel.to_owned(),
            };
            conn.push(frames::push_frame(&push), metrics);
        }
        Ok(true)
    }

    /// The channels of `conn`'s list (a copy: no lock is held).
    fn subscriptions_of(&self, conn: &Conn) -> Vec<Arc<Channel>> {
        self.subs_of(&conn.key)
            .lock()
            .get(&conn.key)
            .cloned()
            .unwrap_or_default()
    }

    /// Parks every subscription of a session that lost its socket: it
    /// stays a member of its channels, and is sent nothing until its client
    /// is back and subscribes again. A subscription still waiting for the
    /// log (cluster) is parked where it asked to start.
    pub(crate) fn suspend(&self, conn: &Arc<Conn>, metrics: &Metrics) {
        let channels = self.subscriptions_of(conn);
        for ch in channels {
            let mut st = ch.state.lock();
            if st.subscribers.remove(&conn.key).is_some() {
                st.park(conn.clone());
            } else if let Some(i) = st.pending.iter().position(|p| p.conn.key == conn.key) {
                let p = st.pending.swap_remove(i);
                if !p.rejoin {
                    // Never announced: it joins now, as a parked member.
                    self.announce_member(&ch, &st, conn, true, metrics);
                    metrics.subscriptions.inc();
                }
                match p.since {
                    Some(since) => st.park_at(conn.clone(), since.epoch.into(), since.offset),
                    None => st.park(conn.clone()),
                }
            }
        }
    }

    /// The channels of a session, each with where it stopped being sent
    /// messages (a parked one), or where the channel is now (one it is
    /// subscribed to, or waiting for), sorted by name: what its client is
    /// to subscribe to again (`connected.channels`), and its record in the
    /// session store.
    pub(crate) fn session_channels(&self, conn: &Conn) -> Vec<SessionChannel> {
        let channels = self.subscriptions_of(conn);
        let mut out: Vec<SessionChannel> = channels
            .iter()
            .filter_map(|ch| {
                let st = ch.state.lock();
                let (epoch, offset) = match st.parked.get(&conn.key) {
                    Some(p) => (p.epoch.to_string(), p.offset),
                    None if st.subscribers.contains_key(&conn.key)
                        || st.pending.iter().any(|p| p.conn.key == conn.key) =>
                    {
                        st.position()
                    }
                    None => return None,
                };
                Some(SessionChannel {
                    channel: ch.name.to_string(),
                    epoch,
                    offset,
                })
            })
            .collect();
        out.sort_by(|a, b| a.channel.cmp(&b.channel));
        out
    }

    /// Makes a session that moved here from another node a parked member
    /// of its channels, each at the position its old node listed. Nobody
    /// is told: it never left.
    pub(crate) fn adopt(&self, conn: &Arc<Conn>, channels: &[SessionChannel], metrics: &Metrics) {
        for c in channels {
            let parked = self.with_state(&c.channel, metrics, |ch, st| {
                let mut all_subs = self.subs_of(&conn.key).lock();
                if conn.ended.load(Relaxed) || st.parked.contains_key(&conn.key) {
                    return false;
                }
                all_subs.entry(conn.key).or_default().push(Arc::clone(ch));
                st.park_at(conn.clone(), c.epoch.as_str().into(), c.offset);
                true
            });
            match parked {
                Ok(true) => {
                    metrics.subscriptions.inc();
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(connection = %conn.id(), channel = %c.channel, error = %e, "a moved session's channel was not kept")
                }
            }
        }
    }

    /// Takes a session that moves to another node out of its channels,
    /// quietly (for the other members it never left), and returns them,
    /// each with where it stopped being sent messages, sorted by name. No
    /// subscription can be added or removed meanwhile.
    pub(crate) fn hand_off(&self, conn: &Conn, metrics: &Metrics) -> Vec<SessionChannel> {
        let channels = {
            let mut all_subs = self.subs_of(&conn.key).lock();
            conn.ended.store(true, Relaxed);
            all_subs.remove(&conn.key).unwrap_or_default()
        };
        let mut out = Vec::with_capacity(channels.len());
        for ch in channels {
            let mut st = ch.state.lock();
            let at = match st.parked.remove(&conn.key) {
                Some(p) => Some((p.epoch.to_string(), p.offset)),
                None => st.subscribers.remove(&conn.key).map(|_| st.position()),
            };
            if let Some((epoch, offset)) = at {
                metrics.subscriptions.dec();
                out.push(SessionChannel {
                    channel: ch.name.to_string(),
                    epoch,
                    offset,
                });
            }
        }
        out.sort_by(|a, b| a.channel.cmp(&b.channel));
        out
    }

    /// Ends every subscription of a connection that has ended; none can be
    /// added afterwards.
    pub(crate) fn unsubscribe_all(&self, conn: &Conn, metrics: &Metrics) {
        let channels = {
            let mut all_subs = self.subs_of(&conn.key).lock();
            conn.ended.store(true, Relaxed);
            all_subs.remove(&conn.key).unwrap_or_default()
        };
        for ch in channels {
            self.remove_subscriber(&ch, conn, metrics);
        }
    }

    /// Takes the first of `conn`'s channels that `which` picks out of its
    /// list (the channel's subscriber set is the caller's to update).
    fn forget(&self, conn: &Conn, which: impl Fn(&Channel) -> bool) -> Option<Arc<Channel>> {
        let mut all_subs = self.subs_of(&conn.key).lock();
        let subs = all_subs.get_mut(&conn.key)?;
        let i = subs.iter().position(|c| which(c))?;
        let ch = subs.swap_remove(i);
        if subs.is_empty() {
            all_subs.remove(&conn.key);
        }
        Some(ch)
    }

    fn remove_subscriber(&self, ch: &Channel, conn: &Conn, metrics: &Metrics) {
        let mut st = ch.state.lock();
        if let Some(i) = st.pending.iter().position(|p| p.conn.key == conn.key) {
            // Never announced: it goes quietly, but a native subscribe
            // command still gets its answer (where it would have started).
            let p = st.pending.swap_remove(i);
            if p.rejoin {
                // A member already (parked before): it leaves.
                metrics.subscriptions.dec();
                self.announce_member(ch, &st, conn, false, metrics);
            }
            if let Ack::Reply(id) = p.ack {
                let (epoch, offset) = st.position();
                let result = SubscribeResult {
                    epoch,
                    offset,
                    recovered: p.since.as_ref().map(|_| false),
                    missed: None,
                };
                conn.push(frames::result_frame(id, &result), metrics);
            }
            return;
        }
        self.drop_subscriber(ch, &mut st, conn, metrics);
    }

    /// Removes a subscriber from the channel's state and tells the others
    /// (of every node) that it left.
    fn drop_subscriber(&self, ch: &Channel, st: &mut State, conn: &Conn, metrics: &Metrics) {
        if st.subscribers.remove(&conn.key).is_none() && st.parked.remove(&conn.key).is_none() {
            return;
        }
        metrics.subscriptions.dec();
        self.announce_member(ch, st, conn, false, metrics);
    }

    /// Publishes a message on a single node: the next offset, kept if the
    /// namespace keeps history, queued on every subscriber. With an
    /// idempotency key already used on this channel within
    /// [`IDEMPOTENCY_WINDOW`], nothing is published and the first publish's
    /// position is returned with `true`. In a cluster, see
    /// [`Channels::publish_async`].
    pub(crate) fn publish(
        &self,
        channel: &str,
        data: Payload,
        key: Option<&str>,
        metrics: &Metrics,
    ) -> Result<(PublishResult, bool), ChannelError> {
        debug_assert!(!self.is_clustered(), "a cluster publishes through its bus");
        let mut data = Some(data);
        self.with_state(channel, metrics, |ch, st| {
            if let Some(offset) = key.and_then(|k| st.keys.get(k)) {
                let result = PublishResult {
                    offset: *offset,
                    epoch: st.epoch.to_string(),
                };
                return (result, true);
            }
            let data = data.take().expect("published once");
            let offset = st.offset + 1;
            fanout(ch, st, offset, crate::clock::now_ms(), data, metrics);
            metrics.publications.inc();
            if let Some(k) = key {
                if st.keys.len() >= MAX_IDEMPOTENCY_KEYS {
                    if let Some((_, old)) = st.key_order.pop_front() {
                        st.keys.remove(&old);
                    }
                }
                st.keys.insert(k.to_owned(), offset);
                st.key_order.push_back((Instant::now(), k.to_owned()));
            }
            let result = PublishResult {
                offset,
                epoch: st.epoch.to_string(),
            };
            (result, false)
        })
    }

    /// Publishes a message, on a single node or through the cluster's bus
    /// (which delivers it to this node's subscribers too, in order).
    pub(crate) async fn publish_async(
        &self,
        channel: &str,
        data: Payload,
        key: Option<&str>,
        metrics: &Metrics,
    ) -> Result<(PublishResult, bool), ChannelError> {
        let Some(link) = self.link.get() else {
            return self.publish(channel, data, key, metrics);
        };
        let ns = self.namespace(channel)?;
        let p = link.bus.publish(ns, channel, &data, key).await?;
        if !p.duplicate {
            metrics.publications.inc();
        }
        let result = PublishResult {
            offset: p.offset,
            epoch: p.epoch,
        };
        Ok((result, p.duplicate))
    }

    /// The kept messages of a channel: after `since`, at most the oldest
    /// `limit` of them (so pages follow on); without `since`, at most the
    /// newest `limit`. On a single node; see [`Channels::history_async`].
    pub(crate) fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
        metrics: &Metrics,
    ) -> Result<HistoryResult, ChannelError> {
        if self.namespace(channel)?.history_size == 0 {
            return Err(ChannelError::HistoryDisabled);
        }
        self.with_state(channel, metrics, |_, st| {
            let (epoch, offset) = st.position();
            let (recovered, kept): (Option<bool>, Vec<&Kept>) = match since {
                None => (None, st.history.iter().collect()),
                Some(since) => match st.after(since) {
                    Some(after) => (Some(true), after.collect()),
                    None => (Some(false), Vec::new()),
                },
            };
            // With `since`: the oldest `limit` after it, so pages follow on
            // from each other; without: the newest `limit`.
            let (skip, take) = match (limit, since) {
                (None, _) => (0, kept.len()),
                (Some(l), Some(_)) => (0, l.min(kept.len())),
                (Some(l), None) => (kept.len().saturating_sub(l), l.min(kept.len())),
            };
            HistoryResult {
                epoch,
                offset,
                recovered,
                publications: kept[skip..skip + take]
                    .iter()
                    .map(|k| Publication {
                        offset: k.offset,
                        time_ms: k.time_ms,
                        data: k.msg.data().clone(),
                    })
                    .collect(),
            }
        })
    }

    /// [`Channels::history`], read from the cluster's log when there is one.
    pub(crate) async fn history_async(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
        metrics: &Metrics,
    ) -> Result<HistoryResult, ChannelError> {
        let Some(link) = self.link.get() else {
            return self.history(channel, since, limit, metrics);
        };
        let ns = self.namespace(channel)?;
        if ns.history_size == 0 {
            return Err(ChannelError::HistoryDisabled);
        }
        let read = link.bus.read(ns, channel, since, limit).await?;
        Ok(HistoryResult {
            epoch: read.epoch,
            offset: read.offset,
            recovered: since.map(|_| read.complete),
            publications: read
                .entries
                .into_iter()
                .map(|e| Publication {
                    offset: e.offset,
                    time_ms: e.time_ms,
                    data: e.data,
                })
                .collect(),
        })
    }

    /// A channel's epoch and newest offset.
    pub(crate) fn position(
        &self,
        channel: &str,
        metrics: &Metrics,
    ) -> Result<(String, u64), ChannelError> {
        self.with_state(channel, metrics, |_, st| st.position())
    }

    /// Who is subscribed to a channel on this node.
    pub(crate) fn presence(&self, channel: &str) -> Result<PresenceResult, ChannelError> {
        if !self.namespace(channel)?.presence {
            return Err(ChannelError::PresenceDisabled);
        }
        Ok(presence_of(self.local_members(channel)))
    }

    /// Who is subscribed to a channel, on every node of the cluster.
    pub(crate) async fn presence_async(
        &self,
        channel: &str,
    ) -> Result<PresenceResult, ChannelError> {
        let Some(link) = self.link.get() else {
            return self.presence(channel);
        };
        if !self.namespace(channel)?.presence {
            return Err(ChannelError::PresenceDisabled);
        }
        let mut members = link.bus.presence(channel).await?;
        members.extend(self.local_members(channel));
        members.sort_by(|a, b| a.client.cmp(&b.client));
        members.dedup_by(|a, b| a.client == b.client);
        Ok(presence_of(members))
    }

    /// The members of a channel on this node (none for an unknown or
    /// absent channel).
    pub(crate) fn local_members(&self, channel: &str) -> Vec<Member> {
        // Nobody there: answer without creating the channel.
        let Some(ch) = self.shard(channel).read().get(channel).cloned() else {
            return Vec::new();
        };
        let st = ch.state.lock();
        st.members().collect()
    }

    /// Every channel of the node, sorted by name.
    pub(crate) fn list(&self) -> Vec<ChannelSummary> {
        let mut all: Vec<Arc<Channel>> = Vec::new();
        for s in self.shards.iter() {
            all.extend(s.read().values().cloned());
        }
        let mut out: Vec<ChannelSummary> = all
            .iter()
            .map(|ch| {
                let st = ch.state.lock();
                ChannelSummary {
                    channel: ch.name.to_string(),
                    epoch: st.epoch.to_string(),
                    offset: st.offset,
                    subscribers: st.subscribers.len(),
                    kept: st.history.len(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.channel.cmp(&b.channel));
        out
    }

    /// Expires old messages and idempotency keys and drops idle channels
    /// (a replica stops watching its channel).
    pub(crate) fn sweep(&self, metrics: &Metrics) {
        // Subscription lists outlive a spike of subscribed connections
        // only by a sweep.
        for shard in self.subs.iter() {
            let mut map = shard.lock();
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
        }
        let now = Instant::now();
        let clustered = self.is_clustered();
        for shard in self.shards.iter() {
            // Idle channels are found under the read lock, removed under the
            // write lock after a second look.
            let idle: Vec<Arc<Channel>> = shard
                .read()
                .values()
                .filter(|ch| {
                    let mut st = ch.state.lock();
                    st.expire(ch.ns.history_ttl, now);
                    st.is_idle(clustered)
                })
                .cloned()
                .collect();
            if idle.is_empty() {
                continue;
            }
            let mut map = shard.write();
            for ch in idle {
                let mut st = ch.state.lock();
                if st.is_idle(clustered) && !st.removed {
                    st.removed = true;
                    if let Some(w) = st.watcher.take() {
                        w.abort();
                    }
                    map.remove(&ch.name);
                    metrics.channels.dec();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(epoch: &str, offsets: std::ops::RangeInclusive<u64>, top: u64) -> State {
        let mut st = State::new(epoch.into(), true);
        st.offset = top;
        st.history = offsets
            .map(|offset| Kept {
                offset,
                time_ms: 0,
                at: Instant::now(),
                msg: Arc::new(Outgoing::new(Payload::Text(offset.to_string()))),
            })
            .collect();
        st
    }

    fn pos(offset: u64, epoch: &str) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: epoch.into(),
        }
    }

    fn offsets(st: &State, since: StreamPosition) -> Option<Vec<u64>> {
        st.after(&since).map(|it| it.map(|k| k.offset).collect())
    }

    #[test]
    fn recovery_is_exact_or_refused() {
        // Messages 4..=9 kept, 9 is the newest.
        let st = state("e", 4..=9, 9);
        assert_eq!(offsets(&st, pos(9, "e")), Some(vec![]), "nothing missed");
        assert_eq!(offsets(&st, pos(6, "e")), Some(vec![7, 8, 9]));
        assert_eq!(offsets(&st, pos(3, "e")), Some(vec![4, 5, 6, 7, 8, 9]));
        assert_eq!(offsets(&st, pos(2, "e")), None, "message 3 is gone");
        assert_eq!(offsets(&st, pos(6, "other")), None, "another epoch");
        assert_eq!(offsets(&st, pos(10, "e")), None, "from the future");
        // No history at all: only an up-to-date position recovers.
        let mut bare = state("e", 1..=1, 5);
        bare.history.clear();
        assert_eq!(offsets(&bare, pos(5, "e")), Some(vec![]));
        assert_eq!(offsets(&bare, pos(4, "e")), None);
    }

    #[test]
    fn expiry_drops_old_messages_and_keys() {
        let mut st = state("e", 1..=3, 3);
        st.keys.insert("k".into(), 2);
        st.key_order
            .push_back((Instant::now() - IDEMPOTENCY_WINDOW, "k".into()));
        st.expire(
            Duration::from_secs(60),
            Instant::now() + Duration::from_secs(61),
        );
        assert!(st.history.is_empty() && st.keys.is_empty());
        assert!(st.is_idle(false));
    }
}
