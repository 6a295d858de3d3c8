//! Sessions: a native client's connection outliving its socket.
//!
//! A native (`switchboard.v1`) connection is a session: when its socket is
//! lost (no close frame: the network dropped, the client vanished, pongs
//! stopped), the session is *suspended* instead of ended. Its [`Conn`]
//! stays registered under the same connection id, its channel
//! subscriptions stay (parked: members, sent nothing), and direct messages
//! keep arriving in its outbox. A client that opens a new socket with the
//! resume token within `session-ttl` gets it all back ([`Sessions::resume`]);
//! otherwise the session ends then, and the origin gets its one
//! `disconnect`. Everything that ends a connection or a session goes
//! through [`Sessions::lost`] or [`Sessions::end`], so the origin sees one
//! `connect` and one `disconnect` per session. `docs/sessions.md` is the
//! specification.

use crate::admission::tokens::Identity;
use crate::channels::Channels;
use crate::clock::now_ms;
use crate::config::Config;
use crate::conn::{AttachError, Attached, CloseRequest, Conn, Queued, Registry};
use crate::metrics::{ClosedByLabel, Metrics, ReasonLabel, ResultLabel};
use crate::origin::ask::event_id;
use crate::origin::Origin;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::native::{ResumeCode, ResumeError, SessionChannel};
use switchboard_proto::origin::{ClosedBy, DisconnectEvent, Event, ResumeEvent, SuspendEvent};
use switchboard_proto::ws::close;
use switchboard_proto::{ConnectionId, NodeId};

mod handoff;
mod replica;

pub(crate) use replica::Holder;

/// Close code of a socket whose session was resumed on a newer one.
pub(crate) const TAKEN_OVER: u16 = 4009;

/// Longest ttl the origin may give a session (`session_ttl_ms`).
pub(crate) const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Bytes of a resume token's MAC (before base64).
const MAC_BYTES: usize = 16;

/// Most ended sessions remembered, so that a late resume is told why.
const MAX_ENDED: usize = 65_536;

/// How a connection's socket ended, as reported in `disconnect`.
#[derive(Debug, Clone)]
pub(crate) struct Ending {
    pub(crate) code: u16,
    pub(crate) reason: String,
    pub(crate) by: ClosedBy,
    /// The socket was lost rather than closed: a session survives it.
    pub(crate) resumable: bool,
}

impl Ending {
    /// A socket that was lost (no closing handshake): resumable.
    pub(crate) fn lost(reason: &str) -> Self {
        Self {
            code: close::ABNORMAL,
            reason: reason.to_owned(),
            by: ClosedBy::Network,
            resumable: true,
        }
    }

    /// A socket closed for good (by either side).
    pub(crate) fn closed(code: u16, reason: &str, by: ClosedBy) -> Self {
        Self {
            code,
            reason: reason.to_owned(),
            by,
            resumable: false,
        }
    }

    /// A socket closed by a request that keeps its session: a takeover (its
    /// session resumed on a newer socket), or a drain handing it over.
    pub(crate) fn kept(req: &CloseRequest) -> Self {
        Self {
            code: req.code,
            reason: req.reason.clone(),
            by: req.by,
            resumable: true,
        }
    }

    /// How a session suspended for longer than `session-ttl` ends.
    fn expired() -> Self {
        Self {
            code: close::ABNORMAL,
            reason: EXPIRED.into(),
            by: ClosedBy::Network,
            resumable: false,
        }
    }
}

/// Recently ended sessions and why, oldest first.
#[derive(Debug, Default)]
struct Ended {
    why: HashMap<ConnKey, ResumeCode>,
    order: VecDeque<(Instant, ConnKey)>,
}

/// The outbox bounds of a session, none when the node keeps no sessions
/// (`session-ttl` 0).
fn limits(c: &Config) -> Option<crate::conn::OutboxLimits> {
    // A resume queues the whole outbox at once: it leaves room for what
    // follows, or the client would be closed as slow (4001).
    let bytes = (c.max_outbound_bytes / 2).min(c.session_outbox_bytes as usize);
    crate::conn::OutboxLimits::new(c.session_outbox_messages, bytes.max(1) as u32)
        .filter(|_| !c.session_ttl.is_zero())
}

/// The node's sessions.
#[derive(Debug)]
pub(crate) struct Sessions {
    config: Arc<Config>,
    node: NodeId,
    registry: Arc<Registry>,
    channels: Arc<Channels>,
    origin: Arc<Origin>,
    metrics: Arc<Metrics>,
    /// Signs resume tokens; made at start, so tokens die with the process.
    key: [u8; 32],
    /// Suspended sessions and when each expires.
    suspended: Mutex<HashMap<ConnKey, (Arc<Conn>, Instant)>>,
    ended: Mutex<Ended>,
    /// Resume tokens of the sessions that moved here from other nodes
    /// (signed with their keys), kept while their ending is remembered.
    adopted: Mutex<HashMap<ConnKey, Box<str>>>,
    /// Where the sessions this node gave up went.
    moved: Mutex<handoff::Moved>,
    /// Sessions being brought here from another node: commands for them
    /// wait for them (see [`Sessions::arrival`]).
    arriving: handoff::Arriving,
    /// The node is shutting down: lost sockets end their sessions.
    closing: AtomicBool,
    /// When the node started (Unix ms): its run, in the session store.
    started_at_ms: u64,
    /// The node's side of the cluster's session store.
    replica: replica::Replica,
    /// What the node's connections share.
    home: Arc<crate::conn::Home>,
}

impl Sessions {
    pub(crate) fn new(
        config: Arc<Config>,
        node: NodeId,
        registry: Arc<Registry>,
        channels: Arc<Channels>,
        origin: Arc<Origin>,
        metrics: Arc<Metrics>,
        started_at_ms: u64,
    ) -> Self {
        let home = crate::conn::Home::new(node.clone(), config.max_outbound_bytes, limits(&config));
        Self {
            home,
            config,
            node,
            registry,
            channels,
            origin,
            metrics,
            key: rand::random(),
            suspended: Mutex::new(HashMap::new()),
            ended: Mutex::new(Ended::default()),
            adopted: Mutex::new(HashMap::new()),
            moved: Mutex::new(handoff::Moved::default()),
            arriving: handoff::Arriving::default(),
            closing: AtomicBool::new(false),
            started_at_ms,
            replica: replica::Replica::default(),
        }
    }

    /// Whether native connections get sessions (`session-ttl` above zero).
    pub(crate) fn enabled(&self) -> bool {
        !self.config.session_ttl.is_zero()
    }

    /// The outbox bounds of a new native connection, if sessions are on.
    pub(crate) fn limits(&self) -> Option<crate::conn::OutboxLimits> {
        limits(&self.config)
    }

    /// What the node's connections share (its id, its per-connection bounds).
    pub(crate) fn home(&self) -> &Arc<crate::conn::Home> {
        &self.home
    }

    /// How long `conn`'s session outlives a lost socket: its own ttl (the
    /// origin's `connect` answer), else `session-ttl`.
    pub(crate) fn ttl_of(&self, conn: &Conn) -> Duration {
        conn.session_ttl().unwrap_or(self.config.session_ttl)
    }

    /// The resume token of a session: `<connection id>.<MAC>`.
    pub(crate) fn token(&self, id: &ConnectionId) -> String {
        if let Some(token) = self.adopted.lock().get(&id.key()) {
            return token.to_string();
        }
        format!("{id}.{}", URL_SAFE_NO_PAD.encode(self.mac(id)))
    }

    fn mac(&self, id: &ConnectionId) -> [u8; MAC_BYTES] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(id.to_string().as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    /// The connection a session token names, if this node issued it (the
    /// token of an HTTP fallback's requests).
    pub(crate) fn session_of(&self, token: &str) -> Result<ConnectionId, ResumeError> {
        self.verify(token)
    }

    /// The connection id a resume token names, if this node issued it.
    fn verify(&self, token: &str) -> Result<ConnectionId, ResumeError> {
        let invalid = || refusal(ResumeCode::SessionInvalid, "not a resume token");
        let id = connection_of(token).ok_or_else(invalid)?;
        let (_, mac) = token.rsplit_once('.').ok_or_else(invalid)?;
        if let Some(known) = self.adopted.lock().get(&id.key()) {
            // A session that moved here from another node.
            return if bool::from(subtle::ConstantTimeEq::ct_eq(
                known.as_bytes(),
                token.as_bytes(),
            )) {
                Ok(id)
            } else {
                Err(refusal(
                    ResumeCode::SessionInvalid,
                    "the resume token was not issued by this gateway",
                ))
            };
        }
        if id.node() != self.node.as_str() {
            return Err(refusal(
                ResumeCode::SessionUnknown,
                format!(
                    "no such session here (it was started by node {})",
                    id.node()
                ),
            ));
        }
        let given = URL_SAFE_NO_PAD.decode(mac).map_err(|_| invalid())?;
        let expected = self.mac(&id);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&given[..], &expected[..])) {
            return Err(refusal(
                ResumeCode::SessionInvalid,
                "the resume token was not issued by this gateway",
            ));
        }
        Ok(id)
    }

    /// The node is shutting down: sockets lost from now on end their
    /// sessions, and [`Sessions::end_all`] ends the suspended ones.
    pub(crate) fn shut_down(&self) {
        self.closing.store(true, Relaxed);
    }

    /// A connection's socket has ended: a session whose socket was lost is
    /// suspended, anything else ends. A close asked for meanwhile (by the
    /// origin, a limit, the gateway) still ends it. `fenced`: the node has
    /// lost its cluster lease, and the origin has retired its connections.
    pub(crate) fn lost(&self, conn: &Arc<Conn>, mut ending: Ending, origin_seq: u64, fenced: bool) {
        self.metrics.connections.dec();
        if ending.resumable {
            if let Some(req) = conn.take_close().filter(|r| !r.takeover) {
                ending = Ending::closed(req.code, &req.reason, req.by);
            }
        }
        if conn.session().is_some() && ending.resumable && !fenced && !self.closing.load(Relaxed) {
            self.suspend(conn, &ending, origin_seq);
        } else {
            self.end(conn, ending, fenced, ResumeCode::SessionClosed);
        }
    }

    fn suspend(&self, conn: &Arc<Conn>, ending: &Ending, origin_seq: u64) {
        let suspension = conn.suspend(origin_seq, &self.metrics);
        self.channels.suspend(conn, &self.metrics);
        let ttl = self.ttl_of(conn);
        let expires = Instant::now() + ttl;
        self.suspended
            .lock()
            .insert(conn.key, (conn.clone(), expires));
        self.metrics.sessions_suspended.inc();
        tracing::debug!(connection = %conn.id(), kept = suspension.kept, reason = %ending.reason, "session suspended");
        if self.config.session_events {
            self.enqueue(
                &conn.key,
                &Event::Suspend(SuspendEvent {
                    id: event_id::session(&conn.id(), "suspend", suspension.n),
                    connection_id: conn.id().to_string(),
                    node: self.node.to_string(),
                    timestamp_ms: now_ms(),
                    user_id: conn.user_id().map(str::to_owned),
                    reason: ending.reason.clone(),
                    expires_at_ms: now_ms() + ttl.as_millis() as u64,
                }),
            );
        }
        // Last: a resume waits for all of the above.
        conn.mark_resumable();
        self.touch(conn, true);
    }

    /// Ends a session for good: it leaves the registry and its channels,
    /// its queue and outbox are freed, and the origin gets its `disconnect`
    /// (unless `fenced`). A resume coming later is told `why`.
    fn end(&self, conn: &Conn, ending: Ending, fenced: bool, why: ResumeCode) {
        if conn.session().is_some() {
            // Before the session is gone, so a resume racing this is told why.
            self.remember(conn.key, why);
        }
        self.registry.remove(&conn.key);
        // After: a write asked for later finds it gone.
        self.unstore(conn, fenced);
        conn.finish(&self.metrics);
        self.channels.unsubscribe_all(conn, &self.metrics);
        let by = match ending.by {
            ClosedBy::Client => "client",
            ClosedBy::Network => "network",
            ClosedBy::Gateway => "gateway",
            ClosedBy::Origin => "origin",
        };
        self.metrics
            .disconnects
            .get_or_create(&ClosedByLabel { closed_by: by })
            .inc();
        if fenced {
            self.metrics.fenced_events.inc();
            return;
        }
        self.enqueue(
            &conn.key,
            &Event::Disconnect(DisconnectEvent {
                id: event_id::disconnect(&conn.id()),
                connection_id: conn.id().to_string(),
                node: self.node.to_string(),
                timestamp_ms: now_ms(),
                user_id: conn.user_id().map(str::to_owned),
                code: ending.code,
                reason: ending.reason,
                closed_by: ending.by,
                duration_ms: conn
                    .connected_at()
                    .elapsed()
                    .unwrap_or_default()
                    .as_millis() as u64,
                messages_in: conn.messages_in.load(Relaxed),
                messages_out: conn.messages_out.load(Relaxed),
            }),
        );
    }

    /// Remembers why a session ended, for a resume that comes later.
    fn remember(&self, key: ConnKey, code: ResumeCode) {
        let now = Instant::now();
        let mut ended = self.ended.lock();
        while ended.order.len() >= MAX_ENDED
            || ended
                .order
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.config.session_ttl)
        {
            let (_, old) = ended.order.pop_front().expect("not empty");
            ended.why.remove(&old);
            self.adopted.lock().remove(&old);
        }
        ended.why.insert(key, code);
        ended.order.push_back((now, key));
    }

    /// Ends a suspended session: its ttl passed, its outbox overflowed, the
    /// origin closed it, the node shuts down or is `fenced`. `lost` labels
    /// `sessions_lost_total`; a later resume is told `why`. `false` if it
    /// was not suspended any more.
    fn end_suspended(
        &self,
        conn: &Conn,
        ending: Ending,
        lost: &'static str,
        why: ResumeCode,
        fenced: bool,
    ) -> bool {
        if !conn.take_suspended() {
            return false;
        }
        if self.suspended.lock().remove(&conn.key).is_some() {
            self.metrics.sessions_suspended.dec();
        }
        self.metrics
            .sessions_lost
            .get_or_create(&ReasonLabel { reason: lost })
            .inc();
        self.end(conn, ending, fenced, why);
        true
    }

    /// Closes a session for the origin (`DELETE /v1/connections/{id}`):
    /// asks its socket to close, or ends it now if it is suspended.
    /// `false` when it has ended already.
    pub(crate) fn close(&self, conn: &Conn, req: CloseRequest) -> bool {
        // A resume or a suspension may come between the two steps: try again.
        for _ in 0..8 {
            let ending = Ending::closed(req.code, &req.reason, req.by);
            match conn.request_close(req.clone()) {
                Queued::Yes => return true,
                Queued::Closed => return false,
                Queued::Kept => {
                    let why = ResumeCode::SessionClosed;
                    if self.end_suspended(conn, ending, "closed", why, false) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// A direct message was refused by a suspended session over its
    /// outbox's bounds (`Queued::Closed` from [`Conn::send`]): the session
    /// ends. Returns whether it did.
    pub(crate) fn overflowed(&self, conn: &Conn) -> bool {
        let ending = Ending {
            code: close::ABNORMAL,
            reason: OVERFLOW.into(),
            by: ClosedBy::Gateway,
            resumable: false,
        };
        let why = ResumeCode::OutboxOverflow;
        self.end_suspended(conn, ending, "outbox_overflow", why, false)
    }

    /// Ends the sessions whose ttl has passed, and those whose outbox
    /// overflowed (a direct message from the origin's answers, which
    /// cannot end them itself).
    pub(crate) fn expire(&self, now: Instant) {
        let all: Vec<(Arc<Conn>, Instant)> = self.suspended.lock().values().cloned().collect();
        for (conn, at) in all {
            if conn.overflowed() {
                self.overflowed(&conn);
            } else if at <= now {
                let why = ResumeCode::SessionExpired;
                self.end_suspended(&conn, Ending::expired(), "expired", why, false);
            }
        }
    }

    /// Ends every suspended session: the node is shutting down, or it is
    /// `fenced` (the origin has retired its connections: no `disconnect`).
    pub(crate) fn end_all(&self, fenced: bool) {
        let all: Vec<Arc<Conn>> = self
            .suspended
            .lock()
            .values()
            .map(|(c, _)| c.clone())
            .collect();
        for conn in all {
            let ending = Ending {
                code: close::SERVICE_RESTART,
                reason: "server shutting down".into(),
                by: ClosedBy::Gateway,
                resumable: false,
            };
            let why = ResumeCode::SessionClosed;
            self.end_suspended(&conn, ending, "shutdown", why, fenced);
        }
    }

    /// Suspended sessions now.
    pub(crate) fn suspended_count(&self) -> usize {
        self.suspended.lock().len()
    }

    /// The connection ids of the suspended sessions.
    pub(crate) fn suspended_ids(&self) -> std::collections::HashSet<String> {
        self.suspended
            .lock()
            .values()
            .map(|(c, _)| c.id().to_string())
            .collect()
    }

    /// Resumes the session named by `token` on a new socket: the client has
    /// every direct message up to `received` (`?received=`, 0 when absent),
    /// and `identity` is the token it connected with, if any (it replaces
    /// the session's, as a `refresh` would). `socket` is the new socket's
    /// address and whether it compresses. `first` makes the `connected`
    /// push from the session's parked channels; it is queued before the
    /// direct messages after `received`. An open socket still holding the
    /// session is closed first (4009), within `deadline`.
    pub(crate) async fn resume(
        &self,
        token: &str,
        received: Option<&str>,
        identity: Option<&Identity>,
        socket: (std::net::SocketAddr, bool),
        deadline: tokio::time::Instant,
        first: impl Fn(&Conn, Vec<SessionChannel>) -> Bytes,
    ) -> Result<(Arc<Conn>, Attached), ResumeError> {
        let r = self
            .try_resume(token, received, identity, socket, deadline, first)
            .await;
        let result = match &r {
            Ok(_) => "resumed",
            Err(e) => e.code.as_str(),
        };
        self.metrics
            .session_resumes
            .get_or_create(&ResultLabel { result })
            .inc();
        r
    }

    async fn try_resume(
        &self,
        token: &str,
        received: Option<&str>,
        identity: Option<&Identity>,
        (remote, deflate): (std::net::SocketAddr, bool),
        deadline: tokio::time::Instant,
        first: impl Fn(&Conn, Vec<SessionChannel>) -> Bytes,
    ) -> Result<(Arc<Conn>, Attached), ResumeError> {
        if !self.enabled() {
            return Err(refusal(
                ResumeCode::SessionsDisabled,
                "this gateway keeps no sessions (session-ttl is 0s)",
            ));
        }
        let received = match received.map(str::parse::<u64>) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                return Err(refusal(
                    ResumeCode::SessionInvalid,
                    "received must be a direct message sequence (a whole number)",
                ))
            }
        };
        let id = self.verify(token)?;
        let Some(conn) = self.registry.get(&id.key()) else {
            return Err(self.gone(&id.key()));
        };
        // Checked before anything is done to the session (a takeover).
        match conn.check_received(received) {
            Ok(()) => {}
            Err(AttachError::Trimmed) => return Err(self.cannot_replay(&conn)),
            Err(_) => return Err(ahead()),
        }
        if let Some(identity) = identity {
            if conn.replace_token(identity).is_err() {
                return Err(refusal(
                    ResumeCode::SessionForbidden,
                    "the session belongs to another user than the token's",
                ));
            }
        }
        let mut asked_takeover = false;
        loop {
            let connected = first(&conn, self.channels.session_channels(&conn));
            match conn.attach(received, remote, deflate, connected, &self.metrics) {
                Ok(attached) => {
                    if self.suspended.lock().remove(&conn.key).is_some() {
                        self.metrics.sessions_suspended.dec();
                    }
                    self.metrics.connections.inc();
                    self.touch(&conn, true);
                    return Ok((conn, attached));
                }
                Err(AttachError::Busy) => {
                    // The client is back before its old socket was seen to
                    // be lost: that one goes, the session stays. Or the
                    // session is being suspended: wait for it.
                    self.let_go(&conn, &mut asked_takeover, deadline).await?;
                }
                Err(AttachError::Ended) => return Err(self.gone(&conn.key)),
                Err(AttachError::Ahead) => return Err(ahead()),
                Err(AttachError::Trimmed) => return Err(self.cannot_replay(&conn)),
            }
        }
    }

    /// One wait for a session's open socket to let go of it: asks it to
    /// close (4009, once: `asked`), then waits a little. The refusal once
    /// `deadline` has passed.
    async fn let_go(
        &self,
        conn: &Conn,
        asked: &mut bool,
        deadline: tokio::time::Instant,
    ) -> Result<(), ResumeError> {
        if !*asked {
            let r = conn.request_close(CloseRequest {
                code: TAKEN_OVER,
                reason: "session resumed on another connection".into(),
                by: ClosedBy::Client,
                // Nothing is dropped: the suspension keeps the direct
                // messages, held ones included.
                flush_first: true,
                takeover: true,
            });
            if r == Queued::Yes {
                *asked = true;
                self.metrics.session_takeovers.inc();
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(refusal(
                ResumeCode::SessionClosed,
                "the session's previous connection did not let go in time",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(())
    }

    /// The refusal of a session that cannot give the client everything after
    /// its `received`: the session ends now rather than wait out its ttl.
    fn cannot_replay(&self, conn: &Conn) -> ResumeError {
        self.overflowed(conn);
        refusal(
            ResumeCode::OutboxOverflow,
            "direct messages after `received` were not kept (session-outbox-messages or -bytes)",
        )
    }

    /// The refusal for a session that is not here.
    fn gone(&self, key: &ConnKey) -> ResumeError {
        match self.ended.lock().why.get(key) {
            Some(ResumeCode::SessionExpired) => refusal(
                ResumeCode::SessionExpired,
                "the session outlived its connection by more than session-ttl",
            ),
            Some(ResumeCode::OutboxOverflow) => refusal(
                ResumeCode::OutboxOverflow,
                "the session ended: its outbox overflowed while the client was away",
            ),
            Some(_) => refusal(
                ResumeCode::SessionClosed,
                "the session ended (closed by the client, the origin or the gateway)",
            ),
            None => refusal(ResumeCode::SessionUnknown, "no such session"),
        }
    }

    /// Counts a resume refused before it reached this node's sessions (by
    /// the node that held it), and returns the refusal.
    pub(crate) fn refused(&self, e: ResumeError) -> ResumeError {
        self.metrics
            .session_resumes
            .get_or_create(&ResultLabel {
                result: e.code.as_str(),
            })
            .inc();
        e
    }

    /// Tells the origin a session resumed (`session-events` only).
    pub(crate) fn resumed(&self, conn: &Conn, attached: &Attached, remote: &str) {
        if !self.config.session_events {
            return;
        }
        self.enqueue(
            &conn.key,
            &Event::Resume(ResumeEvent {
                id: event_id::session(&conn.id(), "resume", attached.n),
                connection_id: conn.id().to_string(),
                node: self.node.to_string(),
                timestamp_ms: now_ms(),
                user_id: conn.user_id().map(str::to_owned),
                remote_addr: remote.to_owned(),
                suspended_ms: attached.suspended_for.as_millis() as u64,
            }),
        );
    }

    /// Queues an event of a connection; reliable, so never refused.
    fn enqueue(&self, key: &ConnKey, event: &Event) {
        let json = serde_json::to_vec(event).expect("events serialize");
        let _ = self.origin.dispatcher.enqueue(key, json.into(), None, true);
    }

    /// The `disconnect` of a connection whose `connect` the origin may have
    /// taken as accepted although the client was refused (its answer was
    /// unreadable or came too late), so the origin can forget it.
    pub(crate) fn void_disconnect(&self, id: &ConnectionId, reason: &str) {
        self.enqueue(
            &id.key(),
            &Event::Disconnect(DisconnectEvent {
                id: event_id::disconnect(id),
                connection_id: id.to_string(),
                node: self.node.to_string(),
                timestamp_ms: now_ms(),
                user_id: None,
                code: close::INTERNAL_ERROR,
                reason: reason.to_owned(),
                closed_by: ClosedBy::Gateway,
                duration_ms: 0,
                messages_in: 0,
                messages_out: 0,
            }),
        );
    }
}

/// The connection id a session token (resume token, or an HTTP fallback's
/// `?session=`) starts with: `<connection id>.<MAC>`. Not checked.
pub(crate) fn connection_of(token: &str) -> Option<ConnectionId> {
    let (id, _) = token.rsplit_once('.')?;
    ConnectionId::parse(id).ok()
}

/// `disconnect.reason` of a session that outlived its ttl.
const EXPIRED: &str = "session expired";
/// `disconnect.reason` of a session whose outbox overflowed.
const OVERFLOW: &str = "session outbox overflow";

fn ahead() -> ResumeError {
    refusal(
        ResumeCode::SessionInvalid,
        "received is beyond the last direct message of the session",
    )
}

fn refusal(code: ResumeCode, message: impl Into<String>) -> ResumeError {
    ResumeError {
        code,
        message: message.into(),
    }
}
