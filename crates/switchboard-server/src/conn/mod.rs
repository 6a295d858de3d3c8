//! The node's live connections: a sharded map from connection key to the
//! connection's shared half ([`Conn`]), which owns its outbound queue.
//!
//! Anything that sends to a client (control API, origin replies, channel
//! fan-out) pushes an already-encoded frame (`Bytes`, shared between all
//! recipients) onto the connection's queue and wakes its task; only that task
//! touches the socket (a [`stream::ClientStream`]). What a connection is
//! attached to (its channels) is kept by those parts, not here.

pub(crate) mod outbox;
pub(crate) mod pool;
pub(crate) mod signal;
pub(crate) mod stream;
pub(crate) mod tls;

use crate::admission::tokens::TokenState;
use crate::metrics::Metrics;
use bytes::{Buf, Bytes};
use parking_lot::{Mutex, MutexGuard, RwLock};
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, IoSlice};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;
use stream::ClientStream;
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::native::Push;
use switchboard_proto::origin::{ClosedBy, Payload, Transport};
use switchboard_proto::ws::frame::{encode_frame_with, OpCode};
use switchboard_proto::{ConnectionId, NodeId};
use tokio::sync::Notify;

/// Most frames handed to one `writev` call.
const MAX_IOVECS: usize = 64;

/// One WebSocket message encoded once: its frame, and its compressed frame
/// made on first use.
#[derive(Debug)]
struct Encoded {
    opcode: OpCode,
    payload: Bytes,
    /// The uncompressed frame, shared by every recipient.
    frame: Bytes,
    /// The compressed frame, shared by every recipient with
    /// permessage-deflate (`server_no_context_takeover` makes it the same
    /// bytes for all of them).
    deflated: OnceLock<Bytes>,
}

impl Encoded {
    fn new(opcode: OpCode, payload: Bytes) -> Self {
        Self {
            frame: encode_frame_with(opcode, false, &payload),
            opcode,
            payload,
            deflated: OnceLock::new(),
        }
    }

    fn frame_for(&self, deflate: bool) -> Bytes {
        if deflate && self.payload.len() >= outbox::DEFLATE_MIN_BYTES {
            self.deflated
                .get_or_init(|| outbox::frame(self.opcode, &self.payload, true))
                .clone()
        } else {
            self.frame.clone()
        }
    }
}

/// A message to be queued on any number of connections, encoded at most once
/// per form and shared: raw connections get the data as a plain frame,
/// native (`switchboard.v1`) ones a JSON push.
#[derive(Debug)]
pub(crate) struct Outgoing {
    data: Payload,
    /// The push for native connections; for a direct message it is made
    /// from `data` on first use.
    push_json: Option<Bytes>,
    raw: OnceLock<Encoded>,
    native: OnceLock<Encoded>,
    /// A direct message's data fields as JSON, for sessions (each adds its
    /// own `seq`): made on first use.
    tail: OnceLock<Bytes>,
}

impl Outgoing {
    /// A direct message (control API send, origin reply).
    pub(crate) fn new(data: Payload) -> Self {
        Self {
            data,
            push_json: None,
            raw: OnceLock::new(),
            native: OnceLock::new(),
            tail: OnceLock::new(),
        }
    }

    /// A channel message: `push_json` is its `message` push.
    pub(crate) fn publication(data: Payload, push_json: Bytes) -> Self {
        Self {
            data,
            push_json: Some(push_json),
            raw: OnceLock::new(),
            native: OnceLock::new(),
            tail: OnceLock::new(),
        }
    }

    /// A native protocol frame (a reply or a push) and nothing else.
    pub(crate) fn native_only(json: Bytes) -> Self {
        Self::publication(Payload::Text(String::new()), json)
    }

    /// The message's data, as published.
    pub(crate) fn data(&self) -> &Payload {
        &self.data
    }

    /// A direct message (not a channel message or a protocol frame).
    fn is_direct(&self) -> bool {
        self.push_json.is_none()
    }

    /// A direct message's data fields as JSON (see [`outbox::direct_tail`]).
    fn tail(&self) -> &Bytes {
        self.tail.get_or_init(|| outbox::direct_tail(&self.data))
    }

    /// The frame for a connection of the given kind.
    fn frame_for(&self, native: bool, deflate: bool) -> Bytes {
        let encoded = if native {
            self.native.get_or_init(|| {
                let json = self.push_json.clone().unwrap_or_else(|| {
                    let push = Push::Direct {
                        seq: None,
                        data: self.data.clone(),
                    };
                    Bytes::from(serde_json::to_vec(&push).expect("pushes serialize"))
                });
                Encoded::new(OpCode::Text, json)
            })
        } else {
            self.raw.get_or_init(|| match &self.data {
                Payload::Text(t) => {
                    Encoded::new(OpCode::Text, Bytes::copy_from_slice(t.as_bytes()))
                }
                Payload::Binary(b) => Encoded::new(OpCode::Binary, Bytes::copy_from_slice(b)),
            })
        };
        encoded.frame_for(deflate)
    }
}

/// A request to close a connection, set by whoever wants it closed and acted on
/// by the connection's task.
#[derive(Debug, Clone)]
pub(crate) struct CloseRequest {
    pub(crate) code: u16,
    pub(crate) reason: String,
    pub(crate) by: ClosedBy,
    /// Send what is already queued before the close frame (false for slow consumers).
    pub(crate) flush_first: bool,
    /// The session resumes on a newer socket: this one goes at once, and
    /// the session lives on.
    pub(crate) takeover: bool,
}

/// A session's suspension, as [`Conn::suspend`] reports it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Suspension {
    /// Direct messages kept.
    pub(crate) kept: usize,
    /// This is the session's `n`-th suspension.
    pub(crate) n: u32,
}

/// A resumed session, as [`Conn::attach`] reports it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attached {
    /// The `seq` of the last `message` event sent to the origin.
    pub(crate) origin_seq: u64,
    /// The suspension it ends (the session's `n`-th).
    pub(crate) n: u32,
    /// How long it was suspended.
    pub(crate) suspended_for: std::time::Duration,
}

/// What few connections need, boxed so the others pay a pointer.
#[derive(Debug, Default)]
struct Rare {
    /// Set at most once in a connection's life.
    close: Option<CloseRequest>,
    /// The session has lost its socket: frames are dropped, direct
    /// messages kept in the outbox.
    suspended: bool,
    /// Suspended, and its channels parked and its suspension recorded: a
    /// resume may attach it (see [`Conn::mark_resumable`]).
    resumable: bool,
    /// The client's address since it last resumed.
    remote: Option<SocketAddr>,
    outbox: Outbox,
}

/// A session's numbering, as [`Conn::numbering`] reports it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Numbering {
    pub(crate) last_seq: u64,
    /// Direct messages up to this `seq` are no longer kept (acknowledged by
    /// the client, or dropped).
    pub(crate) released: u64,
    pub(crate) suspensions: u32,
    pub(crate) origin_seq: u64,
    /// Direct messages wait behind an origin request's replies, not
    /// numbered yet.
    pub(crate) held: bool,
}

/// A session's outbox as it moves to another node (see
/// [`Conn::take_for_handoff`]).
#[derive(Debug)]
pub(crate) struct Moving {
    pub(crate) last_seq: u64,
    pub(crate) trimmed_through: u64,
    /// Kept direct messages: (sequence, the `direct` push's JSON).
    pub(crate) kept: Vec<(u64, Bytes)>,
    pub(crate) origin_seq: u64,
    pub(crate) suspensions: u32,
    pub(crate) suspended_for: std::time::Duration,
    pub(crate) remote: SocketAddr,
    pub(crate) overflowed: bool,
}

/// A queued frame.
#[derive(Debug)]
enum Frame {
    /// Encoded, ready to write.
    Ready(Bytes),
    /// A session's direct message waiting behind an origin request's
    /// replies (its data fields, see [`outbox::direct_tail`]): numbered
    /// when released, so that sequences follow the order of writing.
    Held(Box<Bytes>),
}

impl Frame {
    /// Bytes it counts for in `max-outbound-bytes`.
    fn len(&self) -> usize {
        match self {
            Self::Ready(b) => b.len(),
            Self::Held(tail) => tail.len() + 32,
        }
    }
}

#[derive(Debug, Default)]
struct Outbound {
    frames: VecDeque<Frame>,
    queued_bytes: usize,
    rare: Option<Box<Rare>>,
    /// A close frame is queued or the task has ended: nothing more is accepted.
    sealed: bool,
    /// The front frame is partly written to the socket.
    front_partial: bool,
    /// Origin requests carrying this connection's events now in flight:
    /// control-API messages queued meanwhile wait for their replies.
    holds: u16,
    /// How many frames at the back of `frames` wait for those replies
    /// (not written yet). Fits the padding: idle connections do not grow.
    held: u32,
}

impl Outbound {
    fn closing(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.close.is_some())
    }

    /// A resume is taking the session over: its socket is asked to go
    /// (a takeover close request not yet acted on), the session lives on.
    fn taken_over(&self) -> bool {
        self.rare
            .as_ref()
            .and_then(|r| r.close.as_ref())
            .is_some_and(|c| c.takeover)
    }

    fn suspended(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.suspended)
    }

    /// Nothing but direct messages of a suspended session is taken.
    fn refuses(&self) -> bool {
        self.sealed
            || self
                .rare
                .as_ref()
                .is_some_and(|r| r.close.is_some() || r.suspended)
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    /// Whether a frame queued at `place` now waits behind held frames or
    /// for an origin request's replies.
    fn holds_back(&self, place: Place) -> bool {
        match place {
            Place::Back => self.held > 0,
            Place::AfterReplies => self.held > 0 || self.holds > 0,
            Place::BeforeHeld => false,
        }
    }

    /// Drops the queued frames, except the rest of a partly written one:
    /// cutting a frame short would corrupt the stream (and hide the close
    /// frame that follows).
    fn discard(&mut self) {
        let keep = if self.front_partial {
            self.frames.pop_front()
        } else {
            None
        };
        self.frames.clear();
        self.queued_bytes = 0;
        self.held = 0;
        if let Some(rest) = keep {
            self.queued_bytes = rest.len();
            self.frames.push_back(rest);
        }
    }
}

/// Result of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    Yes,
    /// A direct message for a suspended session: kept in its outbox, sent
    /// when the client resumes.
    Kept,
    /// The connection is closing or gone (or suspended, for anything but
    /// a direct message).
    Closed,
}

use outbox::Outbox;
pub(crate) use outbox::{AttachError, OutboxLimits};

/// Where a frame joins the outbound queue, relative to frames held back
/// until the origin's replies are delivered (see [`Conn::hold_for_replies`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// At the back, so it waits behind held frames while there are any.
    Back,
    /// A control-API message: held too while an origin request carrying
    /// this connection's events is in flight.
    AfterReplies,
    /// Before the held frames: the origin's replies, pings and pongs.
    BeforeHeld,
}

/// What the connections of a node share, so that none stores it: the id of
/// the node (the first half of every connection id) and the
/// configuration's per-connection bounds.
#[derive(Debug)]
pub(crate) struct Home {
    pub(crate) node: NodeId,
    /// `max-outbound-bytes`.
    max_outbound: usize,
    /// The outbox bounds of a connection with a session (none when the
    /// node keeps no sessions).
    session: Option<OutboxLimits>,
}

impl Home {
    pub(crate) fn new(
        node: NodeId,
        max_outbound: usize,
        session: Option<OutboxLimits>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            max_outbound,
            session,
        })
    }
}

/// What many connections do without (a token's user, the origin's
/// metadata, a path other than `/` …), boxed so that they pay a pointer.
#[derive(Debug, Default)]
struct Ident {
    /// None: `/`.
    path: Option<Box<str>>,
    user_id: Option<Box<str>>,
    metadata: Option<serde_json::Value>,
    /// Its place in `max-connections-per-user`, freed with the connection.
    _user_slot: Option<Box<crate::admission::UserSlot>>,
    /// A subprotocol other than the native one (see `Conn::subprotocol`).
    subprotocol: Option<Box<str>>,
}

/// A client's address in 16 bytes, where a `SocketAddr` takes 32: an IPv4
/// address inline, an IPv6 one boxed.
#[derive(Debug, Clone)]
enum Remote {
    V4(SocketAddrV4),
    V6(Box<SocketAddrV6>),
}

impl From<SocketAddr> for Remote {
    fn from(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(a) => Self::V4(a),
            SocketAddr::V6(a) => Self::V6(Box::new(a)),
        }
    }
}

impl Remote {
    fn get(&self) -> SocketAddr {
        match self {
            Self::V4(a) => SocketAddr::V4(*a),
            Self::V6(a) => SocketAddr::V6(**a),
        }
    }
}

/// The shared half of a connection: identity, counters and outbound queue.
/// Small enough (see the test below) that an `Arc` of it fits jemalloc's
/// 224-byte class: every idle connection keeps one (docs/benchmarks.md).
#[derive(Debug)]
pub(crate) struct Conn {
    /// The random half of its id (the other is its home node's id).
    pub(crate) key: ConnKey,
    home: Arc<Home>,
    /// The address of the session's first socket (see [`Conn::remote`]).
    remote: Remote,
    ident: Option<Box<Ident>>,
    /// The client's current token (none without one): read on a
    /// subscribe or publish, replaced whole by a `refresh` or a resume.
    token: arc_swap::ArcSwapOption<TokenState>,
    /// When the current token expires, Unix seconds, as JWT's `exp` counts
    /// (0: never, or not enforced); see [`Conn::token_expires_ms`].
    token_expires_s: AtomicU32,
    /// Speaks the native protocol (`switchboard.v1`).
    pub(crate) native: bool,
    /// Its subprotocol is the native one.
    native_subprotocol: bool,
    /// Speaks a GraphQL over WebSocket protocol (`docs/graphql.md`).
    pub(crate) graphql: Option<switchboard_proto::graphql::Protocol>,
    /// What carries it (a resume may change it): a [`Transport`] as `u8`.
    transport: std::sync::atomic::AtomicU8,
    /// Its socket compresses (permessage-deflate); a resume may change it.
    deflate: AtomicBool,
    /// Outlives a lost socket (native, `session-ttl` above zero): see
    /// [`Conn::session`].
    has_session: bool,
    /// When it connected, Unix ms.
    connected_at_ms: u64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// Events of this connection waiting for the origin: at most
    /// `max-pending-events` `message` events, plus its few reliable ones
    /// (`connect`, `disconnect`), so 32 bits are plenty.
    pub(crate) pending_events: AtomicU32,
    out: Mutex<Outbound>,
    /// Wakes the connection's task: a frame was queued, a close requested,
    /// or one of its deadlines passed (`edge::timers`).
    pub(crate) notify: signal::Signal,
    /// The connection has ended: nothing may attach to it any more. Set
    /// and read by the parts that attach things (channels) under their own
    /// locks.
    pub(crate) ended: AtomicBool,
}

/// Identity of a new connection.
#[derive(Debug)]
pub(crate) struct ConnInit {
    pub(crate) id: ConnectionId,
    /// The node's [`Home`] (a session that moved here keeps its id, and so
    /// the node it started on: see [`Conn::new`]).
    pub(crate) home: Arc<Home>,
    pub(crate) remote: SocketAddr,
    pub(crate) path: String,
    pub(crate) user_id: Option<String>,
    pub(crate) metadata: Option<serde_json::Value>,
    pub(crate) user_slot: Option<Box<crate::admission::UserSlot>>,
    pub(crate) token: Option<crate::admission::tokens::TokenState>,
    pub(crate) token_expires_ms: u64,
    pub(crate) subprotocol: Option<String>,
    pub(crate) native: bool,
    pub(crate) graphql: Option<switchboard_proto::graphql::Protocol>,
    pub(crate) transport: Transport,
    pub(crate) deflate: bool,
    /// It gets a session (if the node keeps them, and it is native).
    pub(crate) session: bool,
}

/// A token's expiry in Unix ms as whole seconds (0 stays 0: none), rounded
/// up so that it is never earlier; past 2106 it saturates.
fn expiry_seconds(ms: u64) -> u32 {
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
}

/// Now, Unix ms.
fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Conn {
    pub(crate) fn new(init: ConnInit) -> Self {
        let home = if init.id.node() == init.home.node.as_str() {
            init.home
        } else {
            // A session that started on another node (a handoff).
            Home::new(
                NodeId::new(init.id.node()).expect("a connection id's node is valid"),
                init.home.max_outbound,
                init.home.session,
            )
        };
        let native_subprotocol =
            init.subprotocol.as_deref() == Some(switchboard_proto::native::SUBPROTOCOL);
        let ident = Ident {
            path: Some(init.path).filter(|p| p != "/").map(Into::into),
            user_id: init.user_id.map(Into::into),
            metadata: init.metadata,
            _user_slot: init.user_slot,
            subprotocol: init
                .subprotocol
                .filter(|_| !native_subprotocol)
                .map(Into::into),
        };
        let ident = (ident.path.is_some()
            || ident.user_id.is_some()
            || ident.metadata.is_some()
            || ident._user_slot.is_some()
            || ident.subprotocol.is_some())
        .then(|| Box::new(ident));
        Self {
            key: init.id.key(),
            home,
            remote: init.remote.into(),
            ident,
            token: arc_swap::ArcSwapOption::new(init.token.map(Arc::new)),
            token_expires_s: expiry_seconds(init.token_expires_ms).into(),
            native: init.native,
            native_subprotocol,
            graphql: init.graphql,
            transport: (init.transport as u8).into(),
            deflate: AtomicBool::new(init.deflate),
            has_session: init.session && init.native,
            connected_at_ms: unix_ms(SystemTime::now()),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            pending_events: AtomicU32::new(0),
            out: Mutex::new(Outbound::default()),
            notify: signal::Signal::default(),
            ended: AtomicBool::new(false),
        }
    }

    /// Its id: `<node>.<key>`, made anew (it is not stored).
    pub(crate) fn id(&self) -> ConnectionId {
        ConnectionId::from_parts(&self.home.node, &self.key)
    }

    /// Whether `id` is its id.
    pub(crate) fn has_id(&self, id: &ConnectionId) -> bool {
        id.key() == self.key && id.node() == self.home.node.as_str()
    }

    /// The path it connected to.
    pub(crate) fn path(&self) -> &str {
        self.ident
            .as_ref()
            .and_then(|i| i.path.as_deref())
            .unwrap_or("/")
    }

    /// The user it belongs to (the origin's word, or its token's `sub`).
    pub(crate) fn user_id(&self) -> Option<&str> {
        self.ident.as_ref().and_then(|i| i.user_id.as_deref())
    }

    /// What the origin attached to it.
    pub(crate) fn metadata(&self) -> Option<&serde_json::Value> {
        self.ident.as_ref().and_then(|i| i.metadata.as_ref())
    }

    /// The subprotocol it agreed on.
    pub(crate) fn subprotocol(&self) -> Option<&str> {
        if self.native_subprotocol {
            return Some(switchboard_proto::native::SUBPROTOCOL);
        }
        self.ident.as_ref().and_then(|i| i.subprotocol.as_deref())
    }

    /// When it connected, Unix ms.
    pub(crate) fn connected_at_ms(&self) -> u64 {
        self.connected_at_ms
    }

    /// When it connected.
    pub(crate) fn connected_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(self.connected_at_ms)
    }

    /// Its session's outbox bounds: it outlives a lost socket (native,
    /// `session-ttl` above zero).
    pub(crate) fn session(&self) -> Option<OutboxLimits> {
        self.home.session.filter(|_| self.has_session)
    }

    /// `max-outbound-bytes`.
    fn max_outbound(&self) -> usize {
        self.home.max_outbound
    }

    /// Queues a data message. Past `max-outbound-bytes` the connection is
    /// marked for closing as a slow consumer (4001) and its queue is dropped.
    pub(crate) fn send(&self, msg: &Outgoing, metrics: &Metrics) -> Queued {
        self.send_at(msg, Place::Back, metrics)
    }

    /// Queues a message sent through the control API: while an origin
    /// request carrying this connection's events is in flight, it waits
    /// until that request's replies are queued, so replies come first.
    pub(crate) fn send_after_replies(&self, msg: &Outgoing, metrics: &Metrics) -> Queued {
        self.send_at(msg, Place::AfterReplies, metrics)
    }

    /// Queues an origin reply: ahead of the control-API messages held for it.
    pub(crate) fn send_reply(&self, msg: &Outgoing, metrics: &Metrics) -> Queued {
        self.send_at(msg, Place::BeforeHeld, metrics)
    }

    fn send_at(&self, msg: &Outgoing, place: Place, metrics: &Metrics) -> Queued {
        if let (Some(limits), true) = (self.session(), msg.is_direct()) {
            return self.send_direct(msg.tail(), place, limits, metrics);
        }
        let frame = msg.frame_for(self.native, self.deflate());
        let r = self.push_at(frame, place, metrics);
        if r == Queued::Yes {
            self.messages_out.fetch_add(1, Relaxed);
            metrics.messages_out.inc();
        }
        r
    }

    /// Queues a protocol frame (a native reply or push), under the same
    /// byte bound.
    pub(crate) fn push(&self, frame: Bytes, metrics: &Metrics) -> Queued {
        self.push_at(frame, Place::Back, metrics)
    }

    /// What carries it now.
    pub(crate) fn transport(&self) -> Transport {
        match self.transport.load(Relaxed) {
            1 => Transport::Sse,
            2 => Transport::LongPoll,
            3 => Transport::Eventsource,
            _ => Transport::Websocket,
        }
    }

    /// A resumed session's new carrier.
    pub(crate) fn set_transport(&self, transport: Transport) {
        self.transport.store(transport as u8, Relaxed);
    }

    /// Whether the socket compresses.
    pub(crate) fn deflate(&self) -> bool {
        self.deflate.load(Relaxed)
    }

    /// A direct message of a session (`tail`: its data fields, see
    /// [`outbox::direct_tail`]): numbered, kept until acknowledged, and
    /// queued unless the session is suspended. One held behind an origin
    /// request's replies is numbered when released, so that sequences
    /// follow the order of writing.
    fn send_direct(
        &self,
        tail: &Bytes,
        place: Place,
        limits: OutboxLimits,
        metrics: &Metrics,
    ) -> Queued {
        let mut out = self.out.lock();
        // A takeover is no end: the session is moving to a new socket.
        let taken_over = out.taken_over();
        if out.sealed || (out.closing() && !taken_over) {
            return Queued::Closed;
        }
        let counted = |metrics: &Metrics| {
            self.messages_out.fetch_add(1, Relaxed);
            metrics.messages_out.inc();
        };
        if taken_over {
            // Kept for the resume, as by a suspended session (which this
            // one is about to be), after the messages held before it.
            self.number_held(&mut out, metrics);
            out.held = 0;
        }
        if out.suspended() || taken_over {
            let outbox = &mut out.rare().outbox;
            outbox.number(tail, metrics);
            if outbox.over(limits) {
                // Refused, and the session is to end: its client could not
                // get everything back ([`Conn::overflowed`]).
                outbox.unnumber(metrics);
                outbox.overflowed = true;
                return Queued::Closed;
            }
            counted(metrics);
            return Queued::Kept;
        }
        if out.holds_back(place) {
            let frame = Frame::Held(Box::new(tail.clone()));
            let r = self.push_locked(out, frame, place, metrics);
            if r == Queued::Yes {
                counted(metrics);
            }
            return r;
        }
        let plain = out.rare().outbox.number(tail, metrics);
        // A connected client that does not acknowledge: its oldest
        // messages are no longer kept, and a resume from before them is
        // refused (`outbox_overflow`).
        out.rare().outbox.trim(limits, metrics);
        let frame = if self.deflate() {
            outbox::frame(OpCode::Text, outbox::payload(&plain), true)
        } else {
            plain
        };
        let r = self.push_locked(out, Frame::Ready(frame), place, metrics);
        if r == Queued::Yes {
            counted(metrics);
        }
        r
    }

    /// The client has every direct message up to `seq`: they are no longer kept.
    pub(crate) fn ack(&self, seq: u64, metrics: &Metrics) {
        let mut out = self.out.lock();
        if let Some(rare) = out.rare.as_mut() {
            rare.outbox.release_through(seq, metrics);
        }
    }

    fn push_at(&self, frame: Bytes, place: Place, metrics: &Metrics) -> Queued {
        let out = self.out.lock();
        self.push_locked(out, Frame::Ready(frame), place, metrics)
    }

    fn push_locked(
        &self,
        mut out: MutexGuard<'_, Outbound>,
        frame: Frame,
        place: Place,
        metrics: &Metrics,
    ) -> Queued {
        if out.refuses() {
            return Queued::Closed;
        }
        // An empty queue always takes one frame, however large: a single big
        // message is not a slow consumer.
        if out.queued_bytes > 0 && out.queued_bytes + frame.len() > self.max_outbound() {
            return self.close_slow(out, metrics);
        }
        let held = out.held as usize;
        let was_empty = out.frames.len() == held;
        let hold = out.holds_back(place);
        out.queued_bytes += frame.len();
        if hold {
            out.held = out.held.saturating_add(1);
            out.frames.push_back(frame);
        } else {
            let at = out.frames.len() - held;
            out.frames.insert(at, frame);
        }
        drop(out);
        metrics.frames_out.inc();
        if was_empty && !hold {
            self.notify.notify_one();
        }
        Queued::Yes
    }

    /// An origin request carrying this connection's events is about to be
    /// sent: control-API messages queued from now on wait for its replies
    /// (until [`Conn::release_hold`]).
    pub(crate) fn hold_for_replies(&self) {
        let mut out = self.out.lock();
        out.holds = out.holds.saturating_add(1);
    }

    /// The request's replies are queued (or it failed, or took longer than
    /// `origin-timeout`): once no request holds the connection, the held
    /// messages go out (a session's direct messages numbered now).
    pub(crate) fn release_hold(&self, metrics: &Metrics) {
        let mut out = self.out.lock();
        out.holds = out.holds.saturating_sub(1);
        if out.holds == 0 && out.held > 0 {
            self.number_held(&mut out, metrics);
            out.held = 0;
            drop(out);
            self.notify.notify_one();
        }
    }

    /// Numbers the held direct messages of a session in queue order, and
    /// encodes them for the socket.
    fn number_held(&self, out: &mut Outbound, metrics: &Metrics) {
        let (Some(limits), deflate) = (self.session(), self.deflate()) else {
            return;
        };
        let from = out.frames.len() - out.held as usize;
        if !out
            .frames
            .range(from..)
            .any(|f| matches!(f, Frame::Held(_)))
        {
            return;
        }
        let mut rare = out.rare.take().unwrap_or_default();
        for frame in out.frames.range_mut(from..) {
            let Frame::Held(tail) = frame else { continue };
            let plain = rare.outbox.number(tail, metrics);
            let ready = Frame::Ready(if deflate {
                outbox::frame(OpCode::Text, outbox::payload(&plain), true)
            } else {
                plain
            });
            out.queued_bytes = out.queued_bytes - frame.len() + ready.len();
            *frame = ready;
        }
        rare.outbox.trim(limits, metrics);
        out.rare = Some(rare);
    }

    /// Replaces the connection's token with a fresh one (a `refresh`, or a
    /// resume that brings one): `Err(())` when the current token names
    /// another user. Returns the new token's expiry (Unix ms, 0: none); a
    /// connection whose expiry is not enforced (the origin said so) stays so.
    pub(crate) fn replace_token(
        &self,
        identity: &crate::admission::tokens::Identity,
    ) -> Result<u64, ()> {
        let fresh = Some(Arc::new(identity.state()));
        // Two refreshes at once: the first to land sets the user the
        // second is checked against.
        let mut other_user = false;
        self.token.rcu(|current| {
            other_user = current
                .as_ref()
                .is_some_and(|cur| cur.user != identity.user);
            if other_user {
                current.clone()
            } else {
                fresh.clone()
            }
        });
        if other_user {
            return Err(());
        }
        let expires_at_ms = identity.expires_at_ms().unwrap_or(0);
        let _ = self.token_expires_s.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |old| (old != 0).then_some(expiry_seconds(expires_at_ms)),
        );
        Ok(expires_at_ms)
    }

    /// When the current token expires, Unix ms (0: never, or not enforced).
    pub(crate) fn token_expires_ms(&self) -> u64 {
        u64::from(self.token_expires_s.load(Relaxed)) * 1000
    }

    /// What a session moving to another node carries of its token.
    pub(crate) fn token_wire(&self) -> Option<switchboard_proto::control::SessionToken> {
        self.token.load().as_deref().map(TokenState::to_wire)
    }

    /// Whether the client's token grants subscribing to `channel`.
    pub(crate) fn token_grants_subscribe(&self, channel: &str) -> bool {
        self.token
            .load()
            .as_ref()
            .is_some_and(|t| t.grants.may_subscribe(channel))
    }

    /// Whether the client's token grants publishing on `channel`.
    pub(crate) fn token_grants_publish(&self, channel: &str) -> bool {
        self.token
            .load()
            .as_ref()
            .is_some_and(|t| t.grants.may_publish(channel))
    }

    /// Closes the connection as a slow consumer (4001) unless it is closing.
    pub(crate) fn close_slow_now(&self, metrics: &Metrics) {
        let out = self.out.lock();
        if !out.refuses() {
            self.close_slow(out, metrics);
        }
    }

    /// Drops the queue and asks the task to close the connection as a slow
    /// consumer (4001).
    fn close_slow(&self, mut out: MutexGuard<'_, Outbound>, metrics: &Metrics) -> Queued {
        out.discard();
        out.rare().close = Some(CloseRequest {
            code: switchboard_proto::ws::close::SLOW_CONSUMER,
            reason: "slow consumer".into(),
            by: ClosedBy::Gateway,
            flush_first: false,
            takeover: false,
        });
        drop(out);
        metrics.slow_consumer_closes.inc();
        self.notify.notify_one();
        Queued::Closed
    }

    /// Queues several data messages as one unit (a channel recovery): they
    /// are all taken when the queue was empty or they fit under
    /// `max-outbound-bytes`, else the connection is closed as a slow consumer.
    pub(crate) fn send_all<'a>(
        &self,
        msgs: impl Iterator<Item = &'a Outgoing> + Clone,
        metrics: &Metrics,
    ) -> Queued {
        let frames: Vec<Bytes> = msgs
            .map(|m| m.frame_for(self.native, self.deflate()))
            .collect();
        let total: usize = frames.iter().map(Bytes::len).sum();
        let mut out = self.out.lock();
        if out.refuses() {
            return Queued::Closed;
        }
        if out.queued_bytes > 0 && out.queued_bytes + total > self.max_outbound() {
            return self.close_slow(out, metrics);
        }
        let was_empty = out.frames.is_empty();
        let n = frames.len() as u64;
        out.queued_bytes += total;
        if out.held > 0 {
            // Behind held frames, so held as well.
            out.held = out.held.saturating_add(frames.len() as u32);
        }
        out.frames.extend(frames.into_iter().map(Frame::Ready));
        drop(out);
        self.messages_out.fetch_add(n, Relaxed);
        metrics.messages_out.inc_by(n);
        metrics.frames_out.inc_by(n);
        if was_empty && n > 0 {
            self.notify.notify_one();
        }
        Queued::Yes
    }

    /// Sends a small control frame (ping, pong) from the connection's own
    /// task: written straight to the socket when nothing is queued, so an
    /// idle connection answering heartbeats never allocates a queue; queued
    /// like any frame otherwise.
    pub(crate) fn send_control(
        &self,
        stream: &ClientStream,
        frame: Bytes,
        metrics: &Metrics,
    ) -> Queued {
        {
            let mut out = self.out.lock();
            if out.refuses() {
                return Queued::Closed;
            }
            if out.frames.is_empty() {
                // A connection that has had messages keeps its queue's
                // smallest storage while traffic flows (see `flush`); idle
                // until its next ping, it gives it back.
                if out.frames.capacity() > 0 {
                    out.frames = VecDeque::new();
                }
                // Only this task writes to the socket, and the queue is empty:
                // nothing can be half written before these bytes.
                // On WouldBlock (full socket buffer) or an error (which the
                // next flush reports), the frame is queued below instead.
                if let Ok(n) = stream.try_write(&frame) {
                    self.bytes_out.fetch_add(n as u64, Relaxed);
                    metrics.bytes_out.inc_by(n as u64);
                    metrics.frames_out.inc();
                    if n < frame.len() {
                        out.queued_bytes += frame.len() - n;
                        out.frames.push_back(Frame::Ready(frame.slice(n..)));
                        out.front_partial = true;
                    }
                    return Queued::Yes;
                }
            }
        }
        // Heartbeats are never held back behind messages waiting for replies.
        self.push_at(frame, Place::BeforeHeld, metrics)
    }

    /// Asks the connection's task to close; the first request wins, except
    /// over a takeover not yet acted on (the session lives on, so a close
    /// asked meanwhile still ends it). A suspended session has no task:
    /// `Queued::Kept` says so, and the caller ends it
    /// ([`Conn::take_suspended`]).
    pub(crate) fn request_close(&self, req: CloseRequest) -> Queued {
        let mut out = self.out.lock();
        let replaces_takeover = out.taken_over() && !req.takeover;
        if out.sealed || (out.closing() && !replaces_takeover) {
            return Queued::Closed;
        }
        if out.suspended() {
            return Queued::Kept;
        }
        if !req.flush_first {
            out.discard();
        }
        out.rare().close = Some(req);
        drop(out);
        self.notify.notify_one();
        Queued::Yes
    }

    /// Takes a pending close request (the task calls this when woken).
    pub(crate) fn take_close(&self) -> Option<CloseRequest> {
        self.out.lock().rare.as_mut().and_then(|r| r.close.take())
    }

    /// The socket is gone but the session lives on: queued frames are
    /// dropped (direct messages stay in the outbox, the held ones numbered
    /// into it), and until a resume only direct messages are taken.
    /// `origin_seq` is the last `message` event's `seq`, for the next
    /// socket. A resume may attach it once [`Conn::mark_resumable`] says
    /// the rest of the suspension is done.
    pub(crate) fn suspend(&self, origin_seq: u64, metrics: &Metrics) -> Suspension {
        let mut out = self.out.lock();
        self.number_held(&mut out, metrics);
        out.sealed = false;
        out.frames = VecDeque::new();
        out.queued_bytes = 0;
        out.held = 0;
        out.holds = 0;
        out.front_partial = false;
        let rare = out.rare();
        rare.close = None;
        rare.suspended = true;
        rare.resumable = false;
        let outbox = &mut rare.outbox;
        outbox.origin_seq = origin_seq;
        outbox.suspensions += 1;
        outbox.suspended_at = Some(std::time::Instant::now());
        Suspension {
            kept: outbox.kept.len(),
            n: outbox.suspensions,
        }
    }

    /// The suspension is complete (channels parked, the session listed):
    /// a resume may attach it.
    pub(crate) fn mark_resumable(&self) {
        let mut out = self.out.lock();
        if let Some(rare) = out.rare.as_mut().filter(|r| r.suspended) {
            rare.resumable = true;
        }
    }

    /// Whether the session is suspended (no socket).
    pub(crate) fn is_suspended(&self) -> bool {
        self.out.lock().suspended()
    }

    /// Takes a suspended session out of suspension to end it: `false` when
    /// it is not suspended (resumed, or ended by someone else first).
    pub(crate) fn take_suspended(&self) -> bool {
        let mut out = self.out.lock();
        if !out.suspended() || out.sealed {
            return false;
        }
        out.rare().suspended = false;
        out.sealed = true;
        true
    }

    /// Takes a suspended, resumable session out of this node to move it to
    /// another: like [`Conn::take_suspended`], and returns what its new
    /// node needs of its outbox. `Busy` while it has a socket (or is still
    /// being suspended), `Ended` once it has ended.
    pub(crate) fn take_for_handoff(&self) -> Result<Moving, AttachError> {
        let mut out = self.out.lock();
        if out.sealed {
            return Err(AttachError::Ended);
        }
        if !out
            .rare
            .as_ref()
            .is_some_and(|r| r.suspended && r.resumable)
        {
            return Err(AttachError::Busy);
        }
        out.sealed = true;
        let rare = out.rare();
        rare.suspended = false;
        let o = &rare.outbox;
        Ok(Moving {
            last_seq: o.last_seq,
            trimmed_through: o.trimmed_through(),
            kept: o.kept_after(0),
            origin_seq: o.origin_seq,
            suspensions: o.suspensions,
            suspended_for: o.suspended_at.map(|at| at.elapsed()).unwrap_or_default(),
            remote: rare.remote.unwrap_or_else(|| self.remote.get()),
            overflowed: o.overflowed,
        })
    }

    /// Makes a new connection the session that moved here from another
    /// node: its outbox restored, suspended; resumable once the rest of the
    /// adoption is done ([`Conn::mark_resumable`]).
    pub(crate) fn restore(&self, moving: Moving, metrics: &Metrics) {
        let mut out = self.out.lock();
        let rare = out.rare();
        rare.outbox.restore(
            moving.last_seq,
            moving.trimmed_through,
            moving.kept,
            metrics,
        );
        rare.outbox.origin_seq = moving.origin_seq;
        rare.outbox.suspensions = moving.suspensions;
        rare.outbox.suspended_at = std::time::Instant::now().checked_sub(moving.suspended_for);
        rare.outbox.overflowed = moving.overflowed;
        rare.remote = Some(moving.remote);
        rare.suspended = true;
        rare.resumable = false;
    }

    /// Gives the session its own `session-ttl` (the origin's `connect`
    /// answer, or the node it moved from).
    pub(crate) fn set_session_ttl(&self, ttl: std::time::Duration) {
        self.out.lock().rare().outbox.ttl = Some(ttl);
    }

    /// The session's own `session-ttl`, if it has one.
    pub(crate) fn session_ttl(&self) -> Option<std::time::Duration> {
        self.out.lock().rare.as_ref().and_then(|r| r.outbox.ttl)
    }

    /// Sets when the session started (one that moved here from another node).
    pub(crate) fn started_at(mut self, at: SystemTime) -> Self {
        self.connected_at_ms = unix_ms(at);
        self
    }

    /// Whether a client that has every direct message up to `received`
    /// could resume the session (checked again by [`Conn::attach`]).
    pub(crate) fn check_received(&self, received: u64) -> Result<(), AttachError> {
        match self.out.lock().rare.as_ref() {
            Some(rare) => rare.outbox.check_received(received),
            None if received == 0 => Ok(()),
            None => Err(AttachError::Ahead),
        }
    }

    /// Gives a suspended session a new socket: the client has every direct
    /// message up to `received`. `first` (the `connected` push) is queued,
    /// then every direct message after `received`, in order; `deflate` is
    /// the new socket's.
    pub(crate) fn attach(
        &self,
        received: u64,
        remote: SocketAddr,
        deflate: bool,
        first: Bytes,
        metrics: &Metrics,
    ) -> Result<Attached, AttachError> {
        let mut out = self.out.lock();
        if out.sealed {
            return Err(AttachError::Ended);
        }
        if !out
            .rare
            .as_ref()
            .is_some_and(|r| r.suspended && r.resumable)
        {
            return Err(AttachError::Busy);
        }
        let rare = out.rare();
        rare.outbox.check_received(received)?;
        rare.outbox.release_through(received, metrics);
        let mut frames = VecDeque::with_capacity(rare.outbox.kept.len() + 1);
        frames.push_back(Frame::Ready(first));
        frames.extend(rare.outbox.replay(deflate).map(Frame::Ready));
        let outbox = &mut rare.outbox;
        let attached = Attached {
            origin_seq: outbox.origin_seq,
            n: outbox.suspensions,
            suspended_for: outbox
                .suspended_at
                .take()
                .map(|at| at.elapsed())
                .unwrap_or_default(),
        };
        rare.suspended = false;
        rare.resumable = false;
        rare.remote = Some(remote);
        self.deflate.store(deflate, Relaxed);
        out.queued_bytes = frames.iter().map(Frame::len).sum();
        metrics.frames_out.inc_by(frames.len() as u64);
        out.frames = frames;
        Ok(attached)
    }

    /// The client's address: its last socket's.
    pub(crate) fn remote(&self) -> SocketAddr {
        let out = self.out.lock();
        out.rare
            .as_ref()
            .and_then(|r| r.remote)
            .unwrap_or_else(|| self.remote.get())
    }

    /// Whether a direct message was refused while the session was
    /// suspended, over its outbox's bounds (the session is to end).
    pub(crate) fn overflowed(&self) -> bool {
        self.out
            .lock()
            .rare
            .as_ref()
            .is_some_and(|r| r.outbox.overflowed)
    }

    /// Direct messages kept for the session (not acknowledged yet).
    pub(crate) fn outbox_len(&self) -> usize {
        self.out
            .lock()
            .rare
            .as_ref()
            .map_or(0, |r| r.outbox.kept.len())
    }

    /// The session's numbering now: the last direct message's `seq`, its
    /// suspensions, and the last `message` event's `seq` as of its last
    /// suspension (a connected session's task has the current one).
    pub(crate) fn numbering(&self) -> Numbering {
        let out = self.out.lock();
        out.rare
            .as_ref()
            .map_or_else(Numbering::default, |r| Numbering {
                last_seq: r.outbox.last_seq,
                released: r
                    .outbox
                    .kept
                    .front()
                    .map_or(r.outbox.last_seq, |(s, _)| s - 1),
                suspensions: r.outbox.suspensions,
                origin_seq: r.outbox.origin_seq,
                held: out.held > 0,
            })
    }

    /// The kept direct messages numbered after `seq`, each the `direct`
    /// push's JSON, oldest first (to write to the session store), and the
    /// last `seq` given out: those after `seq` that are not listed are no
    /// longer kept (acknowledged, or dropped).
    pub(crate) fn kept_after(&self, seq: u64) -> (Vec<(u64, Bytes)>, u64) {
        let out = self.out.lock();
        out.rare.as_ref().map_or((Vec::new(), 0), |r| {
            (r.outbox.kept_after(seq), r.outbox.last_seq)
        })
    }

    /// Queues the final frame (a close frame) past any bound; nothing is
    /// accepted after it.
    pub(crate) fn seal_with(&self, frame: Bytes, metrics: &Metrics) {
        let mut out = self.out.lock();
        if out.sealed {
            return;
        }
        out.sealed = true;
        // Everything queued goes out before the close frame.
        self.number_held(&mut out, metrics);
        out.held = 0;
        out.queued_bytes += frame.len();
        out.frames.push_back(Frame::Ready(frame));
    }

    /// Marks the connection finished: later sends are refused and the
    /// queue and outbox freed.
    pub(crate) fn finish(&self, metrics: &Metrics) {
        let mut out = self.out.lock();
        out.sealed = true;
        if let Some(mut rare) = out.rare.take() {
            rare.outbox.release_through(u64::MAX, metrics);
        }
        out.frames = VecDeque::new();
        out.queued_bytes = 0;
        out.held = 0;
    }

    /// Bytes queued and not yet written.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.out.lock().queued_bytes
    }

    /// Takes the queued frames that are ready to be written, for a
    /// transport that re-frames them (the HTTP fallbacks): `None` when
    /// there are none. Frames held for an origin answer stay queued.
    pub(crate) fn take_ready(&self) -> Option<Vec<Bytes>> {
        let mut out = self.out.lock();
        let ready = out.frames.len() - out.held as usize;
        if ready == 0 {
            return None;
        }
        let taken: Vec<Bytes> = out
            .frames
            .drain(..ready)
            .map(|f| match f {
                Frame::Ready(bytes) => bytes,
                Frame::Held(_) => unreachable!("held frames are at the back"),
            })
            .collect();
        out.queued_bytes -= taken.iter().map(Bytes::len).sum::<usize>();
        out.front_partial = false;
        if out.frames.is_empty() && out.frames.capacity() > 4 {
            out.frames = VecDeque::new();
        }
        Some(taken)
    }

    /// Writes queued frames until the queue is empty (`Ok(true)`) or the socket
    /// would block (`Ok(false)`). Frames go out with vectored writes straight
    /// from the shared `Bytes`: there is no per-connection write buffer.
    /// Frames held for an origin answer stay queued (and count as empty here).
    pub(crate) fn flush(&self, stream: &ClientStream, metrics: &Metrics) -> io::Result<bool> {
        self.flush_behind(&mut &[][..], stream, metrics)
    }

    /// [`Conn::flush`] behind `head`, bytes that are not the connection's
    /// traffic (the handshake's 101): they go first, in the same vectored
    /// writes as the frames queued so far (the `connected` push), so that
    /// both leave in one segment and the client wakes once. `head` is left
    /// with what the socket did not take (empty unless it would block
    /// before all of it went); the frames stay queued behind it.
    pub(crate) fn flush_behind(
        &self,
        head: &mut &[u8],
        stream: &ClientStream,
        metrics: &Metrics,
    ) -> io::Result<bool> {
        let mut out = self.out.lock();
        loop {
            let writable = out.frames.len() - out.held as usize;
            if writable == 0 && head.is_empty() {
                if out.frames.is_empty() && out.frames.capacity() > 4 {
                    // A burst grew the queue: give the memory back while idle.
                    // The smallest allocation (4 frames, 128 bytes) is kept so
                    // steady traffic does not allocate per message.
                    out.frames = VecDeque::new();
                }
                return Ok(true);
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            if !head.is_empty() {
                slices[0] = IoSlice::new(head);
                n = 1;
            }
            for frame in out.frames.iter().take(writable.min(MAX_IOVECS - n)) {
                // Only held frames are not ready, and they are not writable.
                let Frame::Ready(bytes) = frame else { break };
                slices[n] = IoSlice::new(bytes);
                n += 1;
            }
            // The lock is held across a non-blocking syscall only.
            let written = match stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            let of_head = written.min(head.len());
            *head = &head[of_head..];
            self.consume(&mut out, written - of_head, metrics);
        }
    }

    /// Takes `written` bytes of ready frames off the front of the queue.
    fn consume(&self, out: &mut Outbound, written: usize, metrics: &Metrics) {
        if written == 0 {
            return;
        }
        out.queued_bytes -= written;
        self.bytes_out.fetch_add(written as u64, Relaxed);
        metrics.bytes_out.inc_by(written as u64);
        let mut left = written;
        while left > 0 {
            let Some(Frame::Ready(front)) = out.frames.front_mut() else {
                unreachable!("written bytes came from ready frames");
            };
            if front.len() <= left {
                left -= front.len();
                out.frames.pop_front();
                out.front_partial = false;
            } else {
                front.advance(left);
                left = 0;
                out.front_partial = true;
            }
        }
    }
}

/// Hashes a connection key by its own random bits: keys come from the CSPRNG,
/// so they are already uniformly spread and cannot be chosen by a client.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
}

/// A registry entry: the connection, found by its key. The key is not
/// stored beside it (the connection has it), so an entry is a pointer.
#[derive(Debug)]
struct Entry(Arc<Conn>);

impl std::borrow::Borrow<ConnKey> for Entry {
    fn borrow(&self) -> &ConnKey {
        &self.0.key
    }
}

impl std::hash::Hash for Entry {
    // As the key hashes: lookups by key find the entry.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.key.hash(state);
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for Entry {}

type Shard = RwLock<HashSet<Entry, BuildHasherDefault<KeyHasher>>>;

const SHARDS: usize = 64;

/// The node's live connections.
#[derive(Debug)]
pub(crate) struct Registry {
    shards: Box<[Shard]>,
    len: AtomicUsize,
    /// Sessions whose direct messages were numbered by parts that do not
    /// know about the session store (origin replies, released holds).
    pub(crate) numbered: Numbered,
}

/// Sessions with newly numbered direct messages, for the session store's
/// writer (`sessions::replica`), once it is on ([`Numbered::enable`]).
#[derive(Debug, Default)]
pub(crate) struct Numbered {
    on: AtomicBool,
    keys: Mutex<Vec<ConnKey>>,
    /// Wakes the writer.
    pub(crate) notify: Notify,
}

impl Numbered {
    /// Sessions are kept in a store from now on.
    pub(crate) fn enable(&self) {
        self.on.store(true, Relaxed);
    }

    /// `conn` may have numbered direct messages.
    pub(crate) fn touch(&self, conn: &Conn) {
        if conn.session().is_some() && self.on.load(Relaxed) {
            self.keys.lock().push(conn.key);
            self.notify.notify_one();
        }
    }

    /// The sessions touched since the last call.
    pub(crate) fn take(&self) -> Vec<ConnKey> {
        std::mem::take(&mut *self.keys.lock())
    }
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            len: AtomicUsize::new(0),
            numbered: Numbered::default(),
        }
    }

    fn shard(&self, key: &ConnKey) -> &Shard {
        &self.shards[usize::from(key[15]) % SHARDS]
    }

    pub(crate) fn insert(&self, conn: Arc<Conn>) {
        if self.shard(&conn.key).write().replace(Entry(conn)).is_none() {
            self.len.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn remove(&self, key: &ConnKey) {
        if self.shard(key).write().remove(key) {
            self.len.fetch_sub(1, Relaxed);
        }
    }

    pub(crate) fn get(&self, key: &ConnKey) -> Option<Arc<Conn>> {
        self.shard(key).read().get(key).map(|e| e.0.clone())
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    /// Every live connection, shard by shard (no lock is held by the caller).
    pub(crate) fn snapshot(&self) -> Vec<Arc<Conn>> {
        let mut all = Vec::with_capacity(self.len());
        for s in self.shards.iter() {
            all.extend(s.read().iter().map(|e| e.0.clone()));
        }
        all
    }

    /// Calls `f` with each live connection id, one shard lock at a time.
    pub(crate) fn for_each_id(&self, mut f: impl FnMut(&ConnectionId)) {
        for s in self.shards.iter() {
            for e in s.read().iter() {
                f(&e.0.id());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stream::tests::pair;
    use super::*;

    /// The queue's storage stays while messages flow, and goes with the
    /// next ping (or pong) written to an empty queue.
    #[tokio::test]
    async fn an_empty_queue_gives_its_storage_back_with_the_next_ping() {
        let (stream, _client) = pair().await;
        let metrics = Metrics::new();
        let conn = session(OutboxLimits::new(10, 1 << 16).unwrap());
        assert_eq!(
            conn.push(Bytes::from_static(b"\x81\x01a"), &metrics),
            Queued::Yes
        );
        assert!(conn.flush(&stream, &metrics).unwrap());
        assert!(
            conn.out.lock().frames.capacity() > 0,
            "kept while traffic flows"
        );
        let ping = Bytes::from_static(&[0x89, 0x00]);
        assert_eq!(conn.send_control(&stream, ping, &metrics), Queued::Yes);
        assert_eq!(conn.out.lock().frames.capacity(), 0, "given back");
    }

    /// The handshake's answer goes first, in the same write as the frames
    /// queued behind it, and is not counted as the connection's traffic.
    #[tokio::test]
    async fn the_handshake_answer_and_the_queued_frames_leave_in_one_write() {
        use tokio::io::AsyncReadExt;
        let (stream, mut client) = pair().await;
        let metrics = Metrics::new();
        let conn = session(OutboxLimits::new(10, 1 << 16).unwrap());
        let frame = Bytes::from_static(b"\x81\x09connected");
        assert_eq!(conn.push(frame.clone(), &metrics), Queued::Yes);
        let answer = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let mut head = &answer[..];
        assert!(conn.flush_behind(&mut head, &stream, &metrics).unwrap());
        assert!(head.is_empty(), "all of the answer went");
        assert_eq!(conn.queued_bytes(), 0);
        assert_eq!(conn.bytes_out.load(Relaxed), frame.len() as u64);
        let mut got = vec![0; answer.len() + frame.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..answer.len()], answer);
        assert_eq!(&got[answer.len()..], &frame[..]);
    }

    /// A socket that takes none of the answer leaves it, and the frames
    /// stay queued behind it: nothing is reordered or counted as sent.
    #[tokio::test]
    async fn an_answer_the_socket_does_not_take_keeps_the_frames_behind_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, mut client) = pair().await;
        let filler = vec![7u8; 64 << 10];
        let mut sent = 0;
        loop {
            match stream.try_write(&filler) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let metrics = Metrics::new();
        let conn = session(OutboxLimits::new(10, 1 << 16).unwrap());
        let frame = Bytes::from_static(b"\x81\x01a");
        assert_eq!(conn.push(frame.clone(), &metrics), Queued::Yes);
        let answer = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let mut head = &answer[..];
        assert!(!conn.flush_behind(&mut head, &stream, &metrics).unwrap());
        assert_eq!(head.len(), answer.len(), "the socket took none of it");
        assert_eq!(conn.queued_bytes(), frame.len(), "still queued");
        assert_eq!(conn.bytes_out.load(Relaxed), 0);
        let reader = tokio::spawn(async move {
            let mut got = vec![0; sent + answer.len() + frame.len()];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        stream.write_all(head).await.unwrap();
        loop {
            stream.ready(tokio::io::Interest::WRITABLE).await.unwrap();
            if conn.flush(&stream, &metrics).unwrap() {
                break;
            }
        }
        let got = reader.await.unwrap();
        assert!(got[..sent].iter().all(|&b| b == 7));
        assert_eq!(&got[sent..sent + answer.len()], answer);
        assert_eq!(&got[sent + answer.len()..], b"\x81\x01a");
    }

    /// A queued frame is what a `Bytes` is: held direct messages cost the
    /// queue nothing.
    #[test]
    fn a_queued_frame_is_the_size_of_its_bytes() {
        assert_eq!(std::mem::size_of::<Frame>(), std::mem::size_of::<Bytes>());
    }

    fn session(limits: OutboxLimits) -> Conn {
        let node = switchboard_proto::NodeId::random();
        Conn::new(ConnInit {
            id: ConnectionId::generate(&node),
            home: Home::new(node, 1 << 20, Some(limits)),
            remote: "127.0.0.1:1".parse().unwrap(),
            path: "/".into(),
            user_id: None,
            metadata: None,
            user_slot: None,
            token: None,
            token_expires_ms: 0,
            subprotocol: None,
            native: true,
            graphql: None,
            transport: Transport::Websocket,
            deflate: false,
            session: true,
        })
    }

    fn close_request(takeover: bool) -> CloseRequest {
        CloseRequest {
            code: 4009,
            reason: String::new(),
            by: ClosedBy::Client,
            flush_first: true,
            takeover,
        }
    }

    /// A session whose socket is being taken over by a resume lives on:
    /// a direct message sent before the old socket lets go is kept for the
    /// resume (`queued`), numbered after the messages held before it, not
    /// refused as if the session had ended.
    #[test]
    fn a_direct_message_during_a_takeover_is_kept_for_the_resume() {
        let metrics = Metrics::new();
        let conn = session(OutboxLimits::new(10, 1 << 16).unwrap());
        let direct = |text: &str| Outgoing::new(Payload::Text(text.into()));
        assert_eq!(conn.send(&direct("a"), &metrics), Queued::Yes);
        conn.hold_for_replies();
        assert_eq!(conn.send_after_replies(&direct("b"), &metrics), Queued::Yes);
        assert_eq!(conn.request_close(close_request(true)), Queued::Yes);
        assert_eq!(
            conn.send_after_replies(&direct("c"), &metrics),
            Queued::Kept
        );
        let kept: Vec<String> = {
            let out = conn.out.lock();
            let outbox = &out.rare.as_ref().unwrap().outbox;
            outbox
                .kept
                .iter()
                .map(|(_, f)| String::from_utf8_lossy(outbox::payload(f)).into_owned())
                .collect()
        };
        assert_eq!(
            kept,
            [
                r#"{"push":"direct","seq":1,"text":"a"}"#,
                r#"{"push":"direct","seq":2,"text":"b"}"#,
                r#"{"push":"direct","seq":3,"text":"c"}"#,
            ]
        );
        // A close asked during the takeover replaces it: the session ends.
        assert_eq!(conn.request_close(close_request(false)), Queued::Yes);
        assert!(conn.take_close().is_some_and(|r| !r.takeover));
        // Any other close does end it.
        let other = session(OutboxLimits::new(10, 1 << 16).unwrap());
        assert_eq!(other.request_close(close_request(false)), Queued::Yes);
        assert_eq!(other.send(&direct("a"), &metrics), Queued::Closed);
    }

    /// Every idle connection keeps an `Arc<Conn>`: with the `Arc`'s two
    /// counts it must fit jemalloc's 224-byte class (docs/benchmarks.md).
    #[test]
    fn a_connection_fits_224_bytes_with_its_counts() {
        assert!(
            std::mem::size_of::<Conn>() <= 208,
            "{} bytes",
            std::mem::size_of::<Conn>()
        );
    }

    /// The compact address gives back the address it was made from.
    #[test]
    fn a_remote_address_keeps_every_part() {
        assert_eq!(std::mem::size_of::<Remote>(), 16);
        for addr in ["203.0.113.7:40000", "[2001:db8::1%3]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(Remote::from(addr).get(), addr);
        }
        let conn = session(OutboxLimits::new(10, 1 << 16).unwrap());
        assert_eq!(conn.remote(), "127.0.0.1:1".parse::<SocketAddr>().unwrap());
    }

    /// A token's expiry is kept in whole seconds (JWT's `exp` unit): never
    /// earlier than given, 0 still meaning none.
    #[test]
    fn a_token_expiry_is_kept_in_seconds_never_earlier() {
        assert_eq!(expiry_seconds(0), 0);
        assert_eq!(expiry_seconds(1_700_000_000_000), 1_700_000_000);
        assert_eq!(expiry_seconds(1_700_000_000_001), 1_700_000_001);
        assert_eq!(expiry_seconds(u64::MAX), u32::MAX);
        let conn = session(OutboxLimits::new(10, 1 << 16).unwrap());
        assert_eq!(conn.token_expires_ms(), 0);
    }

    /// Its id is made of its node's and its key, as it was generated.
    #[test]
    fn the_id_is_made_of_the_node_and_the_key() {
        let conn = session(OutboxLimits::new(10, 1 << 16).unwrap());
        let id = conn.id();
        assert!(conn.has_id(&id));
        assert_eq!(ConnectionId::parse(id.as_str()).unwrap(), id);
        assert_eq!(conn.path(), "/");
        assert_eq!(conn.subprotocol(), None);
        // A session that moved here keeps the id it started with.
        let elsewhere = NodeId::new("elsewhere").unwrap();
        let moved = ConnectionId::generate(&elsewhere);
        let conn = Conn::new(ConnInit {
            id: moved.clone(),
            home: conn.home.clone(),
            remote: "127.0.0.1:1".parse().unwrap(),
            path: "/ws".into(),
            user_id: Some("u".into()),
            metadata: None,
            user_slot: None,
            token: None,
            token_expires_ms: 0,
            subprotocol: Some(switchboard_proto::native::SUBPROTOCOL.into()),
            native: true,
            graphql: None,
            transport: Transport::Websocket,
            deflate: false,
            session: true,
        });
        assert_eq!(conn.id(), moved);
        assert!(conn.has_id(&moved) && !conn.has_id(&id));
        assert_eq!(conn.path(), "/ws");
        assert_eq!(conn.user_id(), Some("u"));
        assert_eq!(
            conn.subprotocol(),
            Some(switchboard_proto::native::SUBPROTOCOL)
        );
        assert!(conn.session().is_some());
    }

    /// Every connection has an outbound state: holding messages for the
    /// origin's replies must fit its padding, not grow idle connections.
    #[test]
    fn outbound_state_stays_small() {
        assert!(
            std::mem::size_of::<Mutex<Outbound>>() <= 64,
            "{} bytes",
            std::mem::size_of::<Mutex<Outbound>>()
        );
    }
}
