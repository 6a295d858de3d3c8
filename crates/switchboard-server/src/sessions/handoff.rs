//! Sessions moving between the nodes of a cluster: a node gives up a
//! suspended session (to a resume that reached another node, or as it
//! drains), and another adopts it under the same connection id, with its
//! outbox, its channels' positions and its origin event numbering. The node
//! that gave it up remembers where it went, so commands still reach it.
//! The cluster side (who asks whom) is `commands::handoff`.

use super::{refusal, Sessions};
use crate::admission::tokens::TokenState;
use crate::conn::{AttachError, Conn, ConnInit, Moving};
use crate::metrics::ResultLabel;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::control::{KeptMessage, SessionState};
use switchboard_proto::native::{ResumeCode, ResumeError};
use switchboard_proto::origin::Transport;
use tokio::sync::Notify;

/// Where the sessions this node gave up went, and until when that matters.
#[derive(Debug, Default)]
pub(super) struct Moved {
    to: HashMap<ConnKey, (Box<str>, Instant)>,
    /// Length after the last sweep of expired entries.
    swept_at: usize,
}

impl Moved {
    fn insert(&mut self, key: ConnKey, node: &str, until: Instant) {
        self.to.insert(key, (node.into(), until));
        // Swept when it has doubled since the last sweep: amortised O(1).
        if self.to.len() >= 2 * self.swept_at.max(512) {
            let now = Instant::now();
            self.to.retain(|_, (_, until)| *until > now);
            self.swept_at = self.to.len();
        }
    }
}

/// Sessions on their way here from another node.
#[derive(Debug, Default)]
pub(super) struct Arriving {
    /// How many: commands look no further while there are none.
    count: AtomicUsize,
    wakers: Mutex<HashMap<ConnKey, Arc<Notify>>>,
}

/// A session on its way here: commands for it wait until this is dropped
/// (it has arrived, or could not be brought).
#[derive(Debug)]
pub(crate) struct Arrival<'a> {
    arriving: &'a Arriving,
    key: ConnKey,
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.arriving.wakers.lock().remove(&self.key) {
            self.arriving.count.fetch_sub(1, Relaxed);
            n.notify_waiters();
        }
    }
}

impl Sessions {
    /// Marks the session `key` as on its way here, until the guard is
    /// dropped. `None` if it is on its way already.
    pub(crate) fn arrival(&self, key: ConnKey) -> Option<Arrival<'_>> {
        let mut wakers = self.arriving.wakers.lock();
        if wakers.contains_key(&key) {
            return None;
        }
        wakers.insert(key, Arc::new(Notify::new()));
        self.arriving.count.fetch_add(1, Relaxed);
        Some(Arrival {
            arriving: &self.arriving,
            key,
        })
    }

    /// Waits (at most `max`) while the session `key` is on its way here, so
    /// that a command for it finds it.
    pub(crate) async fn arrived(&self, key: &ConnKey, max: Duration) {
        if self.arriving.count.load(Relaxed) == 0 {
            return;
        }
        let until = tokio::time::Instant::now() + max;
        // Again while it is on its way: one move may follow another.
        loop {
            let Some(notify) = self.arriving.wakers.lock().get(key).cloned() else {
                return;
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.arriving.wakers.lock().contains_key(key) {
                return;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return;
            }
        }
    }

    /// Whether any session is on its way here (or out).
    pub(crate) fn anything_arriving(&self) -> bool {
        self.arriving.count.load(Relaxed) > 0
    }

    /// Whether the session `key` is on its way here (or, on a draining
    /// node, on its way out: commands wait for the move to finish).
    pub(crate) fn is_arriving(&self, key: &ConnKey) -> bool {
        self.arriving.count.load(Relaxed) > 0 && self.arriving.wakers.lock().contains_key(key)
    }

    /// Remembers that the session `key` was found on `node` (not here):
    /// commands for it go there first from now on.
    pub(crate) fn remember_location(&self, key: ConnKey, node: &str) {
        if self.registry.get(&key).is_none() {
            let until = Instant::now() + self.config.session_ttl;
            self.moved.lock().insert(key, node, until);
        }
    }

    /// Whether the session named by `token` is held here (connected or
    /// suspended). `false` for a malformed token.
    pub(crate) fn holds(&self, token: &str) -> bool {
        super::connection_of(token).is_some_and(|id| self.registry.get(&id.key()).is_some())
    }

    /// The node a session that was here moved to, while it may still live.
    pub(crate) fn moved_to(&self, key: &ConnKey) -> Option<String> {
        let moved = self.moved.lock();
        let (node, until) = moved.to.get(key)?;
        (*until > Instant::now()).then(|| node.to_string())
    }

    /// Gives up the session named by `token` to `node`, where its client
    /// is resuming with every direct message up to `received`: an open
    /// socket still holding it is closed first (4009), within `deadline`.
    /// The session leaves this node without a `disconnect`, and its state is
    /// returned for the new node to adopt.
    pub(crate) async fn give_up(
        &self,
        token: &str,
        received: u64,
        node: &str,
        deadline: tokio::time::Instant,
    ) -> Result<SessionState, ResumeError> {
        let r = self.try_give_up(token, received, node, deadline).await;
        // Not counted: a node asked for a session it never had.
        if r.as_ref()
            .is_err_and(|e| e.code != ResumeCode::SessionUnknown)
        {
            self.count_handoff("failed");
        }
        r
    }

    async fn try_give_up(
        &self,
        token: &str,
        received: u64,
        node: &str,
        deadline: tokio::time::Instant,
    ) -> Result<SessionState, ResumeError> {
        if !self.enabled() {
            return Err(refusal(
                ResumeCode::SessionsDisabled,
                "this node keeps no sessions (session-ttl is 0s)",
            ));
        }
        let id = super::connection_of(token)
            .ok_or_else(|| refusal(ResumeCode::SessionInvalid, "not a resume token"))?;
        let Some(conn) = self.registry.get(&id.key()) else {
            // Not here: a token of this node's previous run, or of a
            // session that is elsewhere, is not this node's to judge.
            return Err(match self.verify(token) {
                Ok(_) => self.gone(&id.key()),
                Err(_) => refusal(ResumeCode::SessionUnknown, "no such session here"),
            });
        };
        self.verify(token)?;
        if conn.overflowed() {
            return Err(self.cannot_replay(&conn));
        }
        match conn.check_received(received) {
            Ok(()) => {}
            Err(AttachError::Trimmed) => return Err(self.cannot_replay(&conn)),
            Err(_) => return Err(super::ahead()),
        }
        let mut asked_takeover = false;
        let moving = loop {
            match conn.take_for_handoff() {
                Ok(moving) => break moving,
                Err(AttachError::Busy) => {
                    self.let_go(&conn, &mut asked_takeover, deadline).await?;
                }
                Err(_) => return Err(self.gone(&conn.key)),
            }
        };
        // Its events still queued for the origin go first (within the
        // deadline): the origin gets a connection's events in order.
        while conn.pending_events.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(self.export(&conn, moving, Some(node)))
    }

    /// Gives up a suspended session (a draining node handing its sessions
    /// over): `None` when it is not suspended any more. Where it went is
    /// remembered once it has arrived ([`Sessions::remember_location`]).
    pub(crate) fn give_up_suspended(&self, conn: &Arc<Conn>) -> Option<SessionState> {
        if conn.overflowed() {
            self.overflowed(conn);
            return None;
        }
        let moving = conn.take_for_handoff().ok()?;
        Some(self.export(conn, moving, None))
    }

    /// The suspended sessions now (a draining node hands them over).
    pub(crate) fn suspended_sessions(&self) -> Vec<Arc<Conn>> {
        self.suspended
            .lock()
            .values()
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Takes a session given up (`moving`) out of this node, quietly, and
    /// remembers that it went to `node` (if known); its state.
    fn export(&self, conn: &Arc<Conn>, moving: Moving, node: Option<&str>) -> SessionState {
        let expires_at = self.suspended.lock().remove(&conn.key).map(|(_, at)| at);
        if expires_at.is_some() {
            self.metrics.sessions_suspended.dec();
        }
        let now = Instant::now();
        let ttl = self.ttl_of(conn);
        let expires_in = expires_at.map_or(ttl, |at| at.saturating_duration_since(now));
        // Where it goes, before it leaves: a command for it follows it.
        if let Some(node) = node {
            self.moved.lock().insert(conn.key, node, now + ttl);
        }
        let channels = self.channels.hand_off(conn, &self.metrics);
        self.registry.remove(&conn.key);
        let adopted = self.adopted.lock().remove(&conn.key);
        let token = adopted.map_or_else(|| self.token(&conn.id()), String::from);
        let state = SessionState {
            last_seq: moving.last_seq,
            trimmed_through: moving.trimmed_through,
            kept: moving
                .kept
                .iter()
                .map(|(seq, push)| KeptMessage {
                    seq: *seq,
                    push: String::from_utf8_lossy(push).into_owned(),
                })
                .collect(),
            origin_seq: moving.origin_seq,
            suspensions: moving.suspensions,
            suspended_ms: moving.suspended_for.as_millis() as u64,
            expires_in_ms: expires_in.as_millis() as u64,
            overflowed: moving.overflowed,
            channels,
            ..self.state_of(conn, token, moving.remote)
        };
        conn.finish(&self.metrics);
        self.moved_out(conn);
        self.count_handoff("sent");
        tracing::debug!(connection = %conn.id(), to = ?node, kept = state.kept.len(), "session handed over");
        state
    }

    /// What moves with a session but its outbox, numbering and channels:
    /// its identity, token, counters and ttl (`remote`: the client's last
    /// address).
    pub(super) fn state_of(
        &self,
        conn: &Conn,
        token: String,
        remote: std::net::SocketAddr,
    ) -> SessionState {
        SessionState {
            connection_id: conn.id().to_string(),
            token,
            path: conn.path().to_string(),
            user_id: conn.user_id().map(str::to_owned),
            metadata: conn.metadata().cloned(),
            client_token: conn.token_wire(),
            token_expires_ms: conn.token_expires_ms(),
            remote_addr: remote.to_string(),
            connected_at_ms: conn.connected_at_ms(),
            messages_in: conn.messages_in.load(Relaxed),
            messages_out: conn.messages_out.load(Relaxed),
            bytes_in: conn.bytes_in.load(Relaxed),
            bytes_out: conn.bytes_out.load(Relaxed),
            last_seq: 0,
            trimmed_through: 0,
            kept: Vec::new(),
            origin_seq: 0,
            suspensions: 0,
            suspended_ms: 0,
            expires_in_ms: 0,
            ttl_ms: conn.session_ttl().map(|t| t.as_millis() as u64),
            overflowed: false,
            channels: Vec::new(),
        }
    }

    /// Makes a session that another node gave up one of this node's,
    /// suspended, until its client resumes it here (or its ttl passes).
    pub(crate) fn adopt(&self, state: SessionState) -> Result<Arc<Conn>, ResumeError> {
        let invalid = |what: &str| {
            refusal(
                ResumeCode::SessionInvalid,
                format!("bad session state: {what}"),
            )
        };
        if !self.enabled() {
            return Err(refusal(
                ResumeCode::SessionsDisabled,
                "this node keeps no sessions (session-ttl is 0s)",
            ));
        }
        if self.closing.load(Relaxed) {
            return Err(refusal(
                ResumeCode::SessionClosed,
                "this node is shutting down",
            ));
        }
        let id = super::connection_of(&state.token)
            .filter(|id| id.as_str() == state.connection_id)
            .ok_or_else(|| invalid("token"))?;
        if self.registry.get(&id.key()).is_some() {
            return Err(refusal(
                ResumeCode::SessionClosed,
                "a connection with this id is here already",
            ));
        }
        let remote = state
            .remote_addr
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let conn = Conn::new(ConnInit {
            id: id.clone(),
            home: self.home().clone(),
            remote,
            path: state.path,
            user_id: state.user_id,
            metadata: state.metadata,
            user_slot: None,
            token: state.client_token.map(TokenState::from_wire),
            token_expires_ms: state.token_expires_ms,
            subprotocol: Some(switchboard_proto::native::SUBPROTOCOL.to_owned()),
            native: true,
            graphql: None,
            transport: Transport::Websocket,
            deflate: false,
            session: true,
        })
        .started_at(SystemTime::UNIX_EPOCH + Duration::from_millis(state.connected_at_ms));
        conn.messages_in.store(state.messages_in, Relaxed);
        conn.messages_out.store(state.messages_out, Relaxed);
        conn.bytes_in.store(state.bytes_in, Relaxed);
        conn.bytes_out.store(state.bytes_out, Relaxed);
        conn.restore(
            Moving {
                last_seq: state.last_seq,
                trimmed_through: state.trimmed_through,
                kept: state
                    .kept
                    .into_iter()
                    .map(|k| (k.seq, Bytes::from(k.push)))
                    .collect(),
                origin_seq: state.origin_seq,
                suspensions: state.suspensions,
                suspended_for: Duration::from_millis(state.suspended_ms),
                remote,
                overflowed: state.overflowed,
            },
            &self.metrics,
        );
        if let Some(ms) = state.ttl_ms {
            conn.set_session_ttl(Duration::from_millis(ms).min(super::MAX_TTL));
        }
        let conn = Arc::new(conn);
        let key = conn.key;
        self.adopted.lock().insert(key, state.token.into());
        self.moved.lock().to.remove(&key);
        self.registry.insert(conn.clone());
        self.channels.adopt(&conn, &state.channels, &self.metrics);
        let expires = Instant::now() + Duration::from_millis(state.expires_in_ms);
        self.suspended.lock().insert(key, (conn.clone(), expires));
        self.metrics.sessions_suspended.inc();
        // Last: a resume (or another move) waits for all of the above.
        conn.mark_resumable();
        self.moved_in(&conn);
        self.count_handoff("received");
        tracing::debug!(connection = %conn.id(), "session taken over from another node");
        Ok(conn)
    }

    /// Counts a move in `switchboard_session_handoffs_total{result}`.
    pub(crate) fn count_handoff(&self, result: &'static str) {
        self.metrics
            .session_handoffs
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}
