//! Sessions kept in the cluster's session store
//! ([`switchboard_backend::SessionStore`]), so that a session outlives the
//! node holding it (`docs/sessions.md`, "When a node dies").
//!
//! The holder writes each session's *record* (what adopting it takes,
//! without its messages) when it starts, changes its channels, is suspended
//! or resumed, and again before its counters drift far; and each *direct
//! message* once it is numbered. A control-API send is answered once its
//! message is written ([`Sessions::stored`]). When a node is lost, the node
//! that reports it adopts the sessions that node held
//! ([`Sessions::take_over`]). One task per node ([`Sessions::replicate`])
//! does the writing, one batch of sessions at a time, so one session's
//! writes never overtake each other.

use super::Sessions;
use crate::clock::now_ms;
use crate::conn::Conn;
use crate::metrics::ResultLabel;
use crate::origin::ask::event_id;
use bytes::Bytes;
use futures_util::StreamExt as _;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use switchboard_backend::{SessionStore, StoreError};
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::control::{KeptMessage, SessionState};
use switchboard_proto::origin::{Event, SuspendEvent};
use switchboard_proto::ConnectionId;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// Added to the last direct message `seq` of a session adopted from a lost
/// node: messages its node numbered but had not written yet may have
/// reached the client, and their numbers are not given out again.
const SEQ_SKIP: u64 = 1 << 20;

/// Added to the last `message` event `seq` (and the client's frames
/// counted) of a session adopted from a lost node, so that event ids are
/// never given out twice. A record is written again before the client's
/// frames counted drift by half of it.
const ORIGIN_SKIP: u64 = 1 << 20;

/// Added to a lost node's session's suspensions, likewise (a record is
/// written at every suspension and resume).
const SUSPENSION_SKIP: u32 = 64;

/// A record is written again at least this often (the store forgets
/// records not written for two days).
const REFRESH: Duration = Duration::from_secs(12 * 3600);

/// How long a control-API send waits for its message to be written.
const STORE_WAIT: Duration = Duration::from_secs(2);

/// Sessions written at once.
const CONCURRENCY: usize = 64;

/// A session's record in the store.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The node holding it.
    holder: String,
    /// When that node started (Unix ms): which of its runs holds it.
    run: u64,
    /// Its state, without messages (they are stored one by one).
    state: SessionState,
}

/// What the writer has to do for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Write its new messages, and its record if `record`.
    Write { record: bool },
    /// It ended here: remove it from the store.
    Remove,
    /// It left this node (moved, or fenced): forget it without writing.
    Forget,
}

impl Work {
    fn and(self, other: Work) -> Work {
        match (self, other) {
            (Work::Write { record: a }, Work::Write { record: b }) => {
                Work::Write { record: a || b }
            }
            (_, later) => later,
        }
    }
}

/// What was written of a session held here.
#[derive(Debug, Clone, Copy)]
struct Written {
    /// Its record's revision (`None`: none written by this node yet).
    revision: Option<u64>,
    /// Its messages are written up to this `seq`.
    through: u64,
    /// The client's frames counted when the record was written.
    messages_in: u64,
    at: Instant,
    /// Another node wrote its record since: it is not this node's any more.
    disowned: bool,
}

impl Default for Written {
    fn default() -> Self {
        Self {
            revision: None,
            through: 0,
            messages_in: 0,
            at: Instant::now(),
            disowned: false,
        }
    }
}

/// A control-API send waiting for its message to be written: every
/// message up to `target` (`None`: up to the last one, once none is held
/// back unnumbered).
#[derive(Debug)]
struct Waiter {
    target: Option<u64>,
    done: oneshot::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    work: HashMap<ConnKey, (ConnectionId, Work)>,
    written: HashMap<ConnKey, Written>,
    waiters: HashMap<ConnKey, Vec<Waiter>>,
    /// Sessions of a lost node being adopted here now.
    adopting: std::collections::HashSet<ConnKey>,
}

/// The node's side of the session store.
#[derive(Debug, Default)]
pub(super) struct Replica {
    store: OnceLock<Arc<dyn SessionStore>>,
    state: Mutex<State>,
    wake: Notify,
}

impl Sessions {
    /// Keeps sessions in `store` from now on (a cluster backend's). `false`
    /// if a store was set already.
    pub(crate) fn join_store(&self, store: Arc<dyn SessionStore>) -> bool {
        let joined = self.replica.store.set(store).is_ok();
        if joined && self.enabled() {
            self.registry.numbered.enable();
        }
        joined
    }

    fn store(&self) -> Option<&Arc<dyn SessionStore>> {
        self.replica.store.get().filter(|_| self.enabled())
    }

    /// Asks for `conn`'s new direct messages to be written, and its record
    /// too if `record` (its channels, suspension, token changed).
    pub(crate) fn touch(&self, conn: &Conn, record: bool) {
        self.queue(conn, Work::Write { record });
    }

    fn queue(&self, conn: &Conn, work: Work) {
        if conn.session.is_none() || self.store().is_none() {
            return;
        }
        let mut st = self.replica.state.lock();
        st.work
            .entry(conn.key)
            .and_modify(|(_, w)| *w = w.and(work))
            .or_insert_with(|| (conn.id.clone(), work));
        drop(st);
        self.replica.wake.notify_one();
    }

    /// The session ended here: it leaves the store (`fenced`: another node
    /// may have adopted it, and it is only forgotten).
    pub(super) fn unstore(&self, conn: &Conn, fenced: bool) {
        self.queue(conn, if fenced { Work::Forget } else { Work::Remove });
    }

    /// The session moved to another node, which writes it from now on.
    pub(super) fn moved_out(&self, conn: &Conn) {
        self.queue(conn, Work::Forget);
    }

    /// The session was adopted here: its record is written as this node's,
    /// whatever is there, and its kept messages again.
    pub(super) fn moved_in(&self, conn: &Conn) {
        if self.store().is_none() {
            return;
        }
        self.replica
            .state
            .lock()
            .written
            .insert(conn.key, Written::default());
        self.touch(conn, true);
    }

    /// Waits until `conn`'s direct messages numbered so far (and those held
    /// back behind an origin request, once numbered) are in the store, at
    /// most [`STORE_WAIT`]. `true` at once without a store. `false` when
    /// they could not be written (counted).
    pub(crate) async fn stored(&self, conn: &Conn) -> bool {
        if conn.session.is_none() || self.store().is_none() {
            return true;
        }
        let n = conn.numbering();
        let (done, wait) = oneshot::channel();
        let target = (!n.held).then_some(n.last_seq);
        self.replica
            .state
            .lock()
            .waiters
            .entry(conn.key)
            .or_default()
            .push(Waiter { target, done });
        self.touch(conn, false);
        match tokio::time::timeout(STORE_WAIT, wait).await {
            Ok(Ok(written)) => written,
            _ => {
                self.count_store("timeout");
                false
            }
        }
    }

    fn count_store(&self, result: &'static str) {
        self.metrics
            .session_store
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Writes what sessions ask for until `stop`, then once more (bounded).
    pub(crate) async fn replicate(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                () = self.replica.wake.notified() => false,
                () = self.registry.numbered.notify.notified() => false,
                _ = tick.tick() => {
                    self.refresh_records();
                    false
                }
                () = stop.cancelled() => true,
            };
            if stopping {
                // What the drain ended is removed before the node leaves.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.write_pending()).await;
                return;
            }
            self.write_pending().await;
        }
    }

    /// Asks for the records of sessions whose counters drifted, or that
    /// were not written for [`REFRESH`], to be written again.
    fn refresh_records(&self) {
        if self.store().is_none() {
            return;
        }
        let stale: Vec<ConnKey> = {
            let st = self.replica.state.lock();
            st.written
                .iter()
                .filter(|(_, w)| !w.disowned && w.at.elapsed() >= REFRESH)
                .map(|(k, _)| *k)
                .collect()
        };
        let mut again: Vec<Arc<Conn>> = stale.iter().filter_map(|k| self.registry.get(k)).collect();
        {
            let st = self.replica.state.lock();
            for (key, w) in &st.written {
                if w.disowned {
                    continue;
                }
                if let Some(conn) = self.registry.get(key) {
                    let drift = conn.messages_in.load(Relaxed).saturating_sub(w.messages_in);
                    if drift >= ORIGIN_SKIP / 2 {
                        again.push(conn);
                    }
                }
            }
        }
        for conn in again {
            self.touch(&conn, true);
        }
    }

    async fn write_pending(&self) {
        let Some(store) = self.store().cloned() else {
            return;
        };
        // Sessions whose messages were numbered below the sessions
        // (origin replies, released holds).
        for key in self.registry.numbered.take() {
            if let Some(conn) = self.registry.get(&key) {
                self.touch(&conn, false);
            }
        }
        let work: Vec<_> = self.replica.state.lock().work.drain().collect();
        if work.is_empty() {
            return;
        }
        futures_util::stream::iter(work)
            .for_each_concurrent(CONCURRENCY, |(key, (id, w))| {
                let store = store.clone();
                async move { self.write_one(&*store, key, &id, w).await }
            })
            .await;
    }

    async fn write_one(
        &self,
        store: &dyn SessionStore,
        key: ConnKey,
        id: &ConnectionId,
        work: Work,
    ) {
        let record = match work {
            Work::Remove | Work::Forget => {
                let written = self.replica.state.lock().written.remove(&key);
                self.settle_waiters(key, None, true);
                if work == Work::Remove {
                    if let Some(revision) = written.and_then(|w| w.revision.filter(|_| !w.disowned))
                    {
                        match store.remove(id.as_str(), revision).await {
                            Ok(()) => self.count_store("removed"),
                            Err(StoreError::Conflict) => self.count_store("conflict"),
                            Err(e) => {
                                self.count_store("failed");
                                tracing::warn!(connection = %id, error = %e, "an ended session stays in the session store until it expires");
                            }
                        }
                    }
                }
                return;
            }
            Work::Write { record } => record,
        };
        let Some(conn) = self.registry.get(&key).filter(|c| c.id == *id) else {
            self.settle_waiters(key, None, true);
            return;
        };
        let written = self
            .replica
            .state
            .lock()
            .written
            .get(&key)
            .copied()
            .unwrap_or_default();
        if written.disowned {
            self.settle_waiters(key, Some(&conn), false);
            return;
        }
        let mut ok = true;
        let mut record_failed = false;
        let mut now = written;
        if record || written.revision.is_none() {
            let messages_in = conn.messages_in.load(Relaxed);
            match store
                .put(id.as_str(), self.record_of(&conn), written.revision)
                .await
            {
                Ok(revision) => {
                    self.count_store("record");
                    now.revision = Some(revision);
                    now.messages_in = messages_in;
                    now.at = Instant::now();
                }
                Err(StoreError::Conflict) => {
                    self.count_store("conflict");
                    tracing::warn!(connection = %id, "another node wrote this session's record: it is not this node's any more");
                    now.disowned = true;
                    ok = false;
                }
                Err(e) => {
                    self.count_store("failed");
                    tracing::debug!(connection = %id, error = %e, "session record not written; retried");
                    ok = false;
                    record_failed = true;
                }
            }
        }
        let messages = conn.kept_after(now.through);
        if let (Some(&(top, _)), false) = (messages.last(), now.disowned) {
            match store.append(id.as_str(), messages).await {
                Ok(()) => {
                    self.count_store("messages");
                    now.through = now.through.max(top);
                }
                Err(e) => {
                    self.count_store("failed");
                    tracing::debug!(connection = %id, error = %e, "session messages not written; retried");
                    ok = false;
                }
            }
        }
        {
            let mut st = self.replica.state.lock();
            // Still held here (not ended or moved meanwhile: that work is
            // queued and removes the entry).
            if self
                .registry
                .get(&key)
                .is_some_and(|c| Arc::ptr_eq(&c, &conn))
            {
                st.written.insert(key, now);
                if !ok && !now.disowned {
                    // Tried again at the next tick (or wake).
                    let again = Work::Write {
                        record: record_failed,
                    };
                    st.work
                        .entry(key)
                        .and_modify(|(_, w)| *w = w.and(again))
                        .or_insert((id.clone(), again));
                }
            }
        }
        self.settle_waiters(key, Some(&conn), ok);
    }

    /// Answers the sends waiting on session `key`: those whose messages are
    /// written now, or all of them when it failed or left (`ok` says which).
    fn settle_waiters(&self, key: ConnKey, conn: Option<&Conn>, ok: bool) {
        let numbering = conn.map(Conn::numbering);
        let mut st = self.replica.state.lock();
        let through = st.written.get(&key).map_or(0, |w| w.through);
        let Some(waiters) = st.waiters.remove(&key) else {
            return;
        };
        let (Some(n), true) = (numbering, ok) else {
            for w in waiters {
                let _ = w.done.send(ok || conn.is_none());
            }
            return;
        };
        let mut left = Vec::new();
        for mut w in waiters {
            if w.target.is_none() && !n.held {
                w.target = Some(n.last_seq);
            }
            match w.target {
                Some(t) if t <= through => {
                    let _ = w.done.send(true);
                }
                _ => left.push(w),
            }
        }
        if !left.is_empty() {
            st.waiters.insert(key, left);
        }
    }

    /// The record of `conn` as this node writes it.
    fn record_of(&self, conn: &Conn) -> Bytes {
        let n = conn.numbering();
        let mut state = self.state_of(conn, self.token(&conn.id), conn.remote());
        state.last_seq = n.last_seq;
        state.origin_seq = n.origin_seq;
        state.suspensions = n.suspensions;
        state.channels = self.channels.session_channels(conn);
        let record = Record {
            holder: self.node.to_string(),
            run: self.started_at_ms,
            state,
        };
        serde_json::to_vec(&record)
            .expect("records serialize")
            .into()
    }

    /// Whether session `key` of a lost node is being adopted here now.
    pub(crate) fn adopting(&self, key: &ConnKey) -> bool {
        self.replica.state.lock().adopting.contains(key)
    }

    /// The node whose run `holder` (started at `run`, Unix ms) holds
    /// session `id` by the store's record, if it has one.
    pub(crate) async fn recorded_holder(&self, id: &ConnectionId) -> Option<(String, u64)> {
        let store = self.store()?;
        let found = match store.get(id.as_str()).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                tracing::debug!(connection = %id, "no record in the session store");
                return None;
            }
            Err(e) => {
                tracing::debug!(connection = %id, error = %e, "session store not read");
                return None;
            }
        };
        match serde_json::from_slice::<Record>(&found.record) {
            Ok(record) => Some((record.holder, record.run)),
            Err(e) => {
                tracing::warn!(connection = %id, error = %e, "unreadable session record");
                None
            }
        }
    }

    /// Adopts the sessions held by node `down` (its run started at
    /// `run`), lost without draining: each is suspended here with its
    /// messages from the store, for its client to resume (or its ttl to
    /// pass). Returns their connection ids.
    pub(crate) async fn take_over(&self, down: &str, run: u64) -> Vec<String> {
        let Some(store) = self.store().cloned() else {
            return Vec::new();
        };
        let mut tries = 0;
        let records = loop {
            match store.all().await {
                Ok(r) => break r,
                Err(e) if tries < 3 => {
                    tries += 1;
                    tracing::warn!(node = down, error = %e, "cannot read the session store; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    self.count_store("failed");
                    tracing::error!(node = down, error = %e, "cannot read the session store: the lost node's sessions are gone");
                    return Vec::new();
                }
            }
        };
        let theirs: Vec<(Record, u64)> = records
            .into_iter()
            .filter_map(|r| {
                let record: Record = serde_json::from_slice(&r.record).ok()?;
                (record.holder == down && record.run == run).then_some((record, r.revision))
            })
            .collect();
        let keys: Vec<ConnKey> = theirs
            .iter()
            .filter_map(|(r, _)| ConnectionId::parse(&r.state.connection_id).ok())
            .map(|id| id.key())
            .collect();
        self.replica
            .state
            .lock()
            .adopting
            .extend(keys.iter().copied());
        let store = &store;
        let adopted: Vec<Option<String>> = futures_util::stream::iter(theirs)
            .map(|(record, revision)| async move {
                let key = ConnectionId::parse(&record.state.connection_id).map(|id| id.key());
                // Commands for it (and a resume taking it) wait for it here.
                let _arriving = key.as_ref().ok().and_then(|k| self.arrival(*k));
                let r = self.adopt_lost(&**store, record, revision).await;
                if let Ok(key) = key {
                    self.replica.state.lock().adopting.remove(&key);
                }
                r
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let adopted: Vec<String> = adopted.into_iter().flatten().collect();
        tracing::warn!(
            node = down,
            sessions = adopted.len(),
            "took over the lost node's sessions"
        );
        adopted
    }

    /// Adopts one session of a lost node; its id, or `None` when it could
    /// not be (it is gone, as the lost node's other connections).
    async fn adopt_lost(
        &self,
        store: &dyn SessionStore,
        record: Record,
        revision: u64,
    ) -> Option<String> {
        let id = record.state.connection_id.clone();
        // Claimed first: a node racing this one (or the lost node, back)
        // cannot write it after.
        let claim = Record {
            holder: self.node.to_string(),
            run: self.started_at_ms,
            state: record.state,
        };
        let body = serde_json::to_vec(&claim).expect("records serialize");
        let claimed = match store.put(&id, body.into(), Some(revision)).await {
            Ok(claimed) => claimed,
            Err(e) => {
                let result = if e == StoreError::Conflict {
                    "conflict"
                } else {
                    "failed"
                };
                self.count_store(result);
                tracing::warn!(connection = %id, error = %e, "a lost node's session could not be claimed");
                return None;
            }
        };
        // A session that cannot be adopted leaves the store: it is gone,
        // as the lost node's other connections.
        let id = id.as_str();
        let drop_it = |why: String| async move {
            self.count_store("failed");
            tracing::warn!(connection = %id, error = %why, "a lost node's session could not be adopted");
            let _ = store.remove(id, claimed).await;
            None
        };
        let messages = match store.messages(id).await {
            Ok(m) => m,
            Err(e) => return drop_it(e.to_string()).await,
        };
        let mut state = claim.state;
        let stored_top = messages.last().map_or(0, |(seq, _)| *seq);
        // Only the newest unbroken run of messages can be resumed from.
        let mut first = stored_top + 1;
        for (seq, _) in messages.iter().rev() {
            if *seq + 1 != first {
                break;
            }
            first = *seq;
        }
        state.trimmed_through = if messages.is_empty() {
            state.last_seq
        } else {
            first - 1
        };
        state.kept = messages
            .into_iter()
            .filter(|(seq, _)| *seq >= first)
            .map(|(seq, push)| KeptMessage {
                seq,
                push: String::from_utf8_lossy(&push).into_owned(),
            })
            .collect();
        state.last_seq = state.last_seq.max(stored_top) + SEQ_SKIP;
        state.origin_seq = state.origin_seq.max(state.messages_in) + ORIGIN_SKIP;
        state.suspensions = state.suspensions.saturating_add(SUSPENSION_SKIP);
        let ttl = state
            .ttl_ms
            .map_or(self.config.session_ttl, Duration::from_millis);
        state.expires_in_ms = ttl.as_millis() as u64;
        state.suspended_ms = 0;
        let conn = match self.adopt(state) {
            Ok(conn) => conn,
            Err(e) => return drop_it(e.message).await,
        };
        if let Some(w) = self.replica.state.lock().written.get_mut(&conn.key) {
            // Its messages are in the store already, and its record is ours.
            w.through = w.through.max(stored_top);
            w.revision = Some(claimed);
        }
        self.count_store("taken_over");
        if self.config.session_events {
            let n = conn.numbering().suspensions;
            self.enqueue(
                &conn.key,
                &Event::Suspend(SuspendEvent {
                    id: event_id::session(&conn.id, "suspend", n),
                    connection_id: conn.id.to_string(),
                    node: self.node.to_string(),
                    timestamp_ms: now_ms(),
                    user_id: conn.user_id.as_deref().map(str::to_owned),
                    reason: "node lost".into(),
                    expires_at_ms: now_ms() + ttl.as_millis() as u64,
                }),
            );
        }
        Some(id.to_owned())
    }
}
