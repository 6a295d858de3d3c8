//! Sessions kept in the cluster's session store
//! ([`switchboard_backend::SessionStore`]), so that a session outlives the
//! node holding it (`docs/sessions.md`, "When its node dies").
//!
//! The holder writes each session's *record* (what adopting it takes,
//! without its messages) when it starts, changes its channels, is suspended
//! or resumed, and again before its counters or its acknowledged messages
//! drift far; and each *direct message* once it is numbered. A control-API
//! send is answered once its message is written ([`Sessions::stored`]).
//! When a node is lost, the node that reports it adopts the sessions that
//! node's run held ([`Sessions::take_over`]). One task per node
//! ([`Sessions::replicate`]) does the writing, one batch of sessions at a
//! time, so one session's writes never overtake each other. Every record
//! write is conditional (on the revision this node last wrote, or on there
//! being none): a node that lost a session to another cannot write it.

use super::Sessions;
use crate::clock::now_ms;
use crate::conn::Conn;
use crate::metrics::ResultLabel;
use crate::origin::ask::event_id;
use bytes::Bytes;
use futures_util::StreamExt as _;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
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

/// How long a stopping node keeps writing what is left (removals of the
/// sessions its drain ended).
const LAST_WRITES: Duration = Duration::from_secs(5);

/// Sessions written at once.
const CONCURRENCY: usize = 64;

/// How long the writer waits after the store was unavailable before it
/// tries again (sends meanwhile are answered without waiting for it).
const BACKOFF: Duration = Duration::from_secs(2);

/// How long the records of a lost node's sessions that could not be
/// adopted (the store was unreachable) are tried to be removed.
const CLEANUP_FOR: Duration = Duration::from_secs(600);

/// A session's record in the store.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The node holding it.
    holder: String,
    /// When that node started (Unix ms): which of its runs holds it.
    run: u64,
    /// Its state, without messages (they are stored one by one);
    /// `trimmed_through` is where its messages were acknowledged up to.
    state: SessionState,
}

/// What the writer has to do for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Write its new messages, and its record if `record`.
    Write { record: bool },
    /// It arrived here: its record becomes this node's, whatever revision
    /// is there, then as `Write`.
    Arrived,
    /// It ended here: remove it from the store.
    Remove,
    /// It left this node (moved, or fenced): forget it without writing.
    Forget,
}

impl Work {
    /// Work queued after `self` for the same session.
    fn then(self, later: Work) -> Work {
        match (self, later) {
            (Work::Write { record: a }, Work::Write { record: b }) => {
                Work::Write { record: a || b }
            }
            (Work::Arrived, Work::Write { .. }) => Work::Arrived,
            // An end stays an end (a write after it is for a gone session),
            // unless the session arrives here again.
            (Work::Remove | Work::Forget, Work::Write { .. }) => self,
            (_, later) => later,
        }
    }
}

/// Whose a session's record is, as [`Sessions::own_revision`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// This run's, at that revision (0: to be written anew).
    Here(u64),
    /// Another node's (or run's).
    Other,
    /// Not known now: try again.
    Unknown,
}

/// What was written of a session held here.
#[derive(Debug, Clone, Copy)]
struct Written {
    /// Its record's revision (`None`: none written by this node yet).
    revision: Option<u64>,
    /// Its messages are written (or no longer needed) up to this `seq`.
    through: u64,
    /// The client's frames counted when the record was written.
    messages_in: u64,
    /// Where its messages were acknowledged up to, in the record.
    released: u64,
    at: Instant,
    /// The store's [`SessionStore::losses`] when its record was last
    /// written: a record missing since a loss was lost, not removed.
    losses: u64,
    /// Another node wrote its record since: it is not this node's any more.
    disowned: bool,
}

impl Default for Written {
    fn default() -> Self {
        Self {
            revision: None,
            through: 0,
            messages_in: 0,
            released: 0,
            at: Instant::now(),
            losses: 0,
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
    adopting: HashSet<ConnKey>,
}

impl State {
    fn queue(&mut self, id: &ConnectionId, work: Work) {
        self.work
            .entry(id.key())
            .and_modify(|(_, w)| *w = w.then(work))
            .or_insert_with(|| (id.clone(), work));
    }

    /// Queues `work` again, before what was queued meanwhile (an end
    /// queued meanwhile stays the last word).
    fn retry(&mut self, id: &ConnectionId, work: Work) {
        self.work
            .entry(id.key())
            .and_modify(|(_, w)| *w = work.then(*w))
            .or_insert_with(|| (id.clone(), work));
    }
}

/// The node's side of the session store.
#[derive(Debug, Default)]
pub(super) struct Replica {
    store: OnceLock<Arc<dyn SessionStore>>,
    state: Mutex<State>,
    wake: Notify,
    /// The writer has stopped (the node is leaving): nothing waits for it.
    stopped: AtomicBool,
    /// The store was unavailable: nothing is tried before then.
    backoff: Mutex<Option<Instant>>,
    /// The store's [`SessionStore::losses`] when last looked at.
    losses_seen: std::sync::atomic::AtomicU64,
}

impl Replica {
    /// Whether the store was unavailable a moment ago.
    fn backing_off(&self) -> bool {
        let mut b = self.backoff.lock();
        match *b {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *b = None;
                false
            }
            None => false,
        }
    }
}

/// Where the session store says a session is, as [`Sessions::holder`]
/// tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Holder {
    /// This node (this run).
    Here,
    /// Live node `0` (the run that holds it).
    Peer(String),
    /// A node (or a run of one) that is gone: `0` and its run.
    Lost(String, u64),
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

    /// Whether sessions are kept in a session store.
    pub(crate) fn storing(&self) -> bool {
        self.store().is_some()
    }

    /// Asks for `conn`'s new direct messages to be written, and its record
    /// too if `record` (its channels, suspension, token changed).
    pub(crate) fn touch(&self, conn: &Conn, record: bool) {
        self.queue(conn, Work::Write { record });
    }

    fn queue(&self, conn: &Conn, work: Work) {
        if conn.session().is_none() || self.store().is_none() {
            return;
        }
        self.replica.state.lock().queue(&conn.id(), work);
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

    /// The session arrived here (moved, or adopted from a lost node): its
    /// record is made this node's, and its kept messages written again
    /// (a message stored before is not stored twice).
    pub(super) fn moved_in(&self, conn: &Conn) {
        self.queue(conn, Work::Arrived);
    }

    /// Waits until `conn`'s direct messages numbered so far (and those held
    /// back behind an origin request, once numbered) are in the store, at
    /// most [`STORE_WAIT`]. `true` at once without a store. `false` when
    /// they could not be written (counted).
    pub(crate) async fn stored(&self, conn: &Conn) -> bool {
        if conn.session().is_none() || self.store().is_none() || self.replica.stopped.load(Relaxed)
        {
            return true;
        }
        if self.replica.backing_off() {
            // Written once the store is back; not waited for meanwhile.
            self.touch(conn, false);
            return false;
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

    /// Counts a store error: `conflict`, `too_large`, or `failed` (and the
    /// writer backs off for [`BACKOFF`]: the store is unreachable).
    fn count_error(&self, e: &StoreError) {
        self.count_store(match e {
            StoreError::Conflict => "conflict",
            StoreError::TooLarge(_) => "too_large",
            StoreError::Unavailable(_) => {
                self.replica
                    .backoff
                    .lock()
                    .get_or_insert_with(|| Instant::now() + BACKOFF);
                "failed"
            }
        });
    }

    /// Writes what sessions ask for until `stop`, then what is left
    /// (bounded), and answers whatever still waits.
    pub(crate) async fn replicate(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.replica.wake.notified() => {}
                () = self.registry.numbered.notify.notified() => {}
                _ = tick.tick() => self.refresh_records(),
                () = stop.cancelled() => break,
            }
            self.write_pending().await;
        }
        // What the drain ended is removed before the node leaves.
        let until = tokio::time::Instant::now() + LAST_WRITES;
        while !self.replica.state.lock().work.is_empty() && tokio::time::Instant::now() < until {
            if self.replica.backing_off() || !self.origin.lease.is_held() {
                break; // Nothing can be written now.
            }
            let _ = tokio::time::timeout_at(until, self.write_pending()).await;
        }
        self.replica.stopped.store(true, Relaxed);
        let waiters: Vec<Waiter> = {
            let mut st = self.replica.state.lock();
            st.waiters.drain().flat_map(|(_, w)| w).collect()
        };
        for w in waiters {
            let _ = w.done.send(true);
        }
    }

    /// Asks for the records of sessions whose counters or acknowledged
    /// messages drifted, or that were not written for [`REFRESH`], to be
    /// written again.
    /// After the store lost its data, every session is written again,
    /// messages included.
    fn refresh_records(&self) {
        let Some(store) = self.store() else {
            return;
        };
        let losses = store.losses();
        let lost = self.replica.losses_seen.swap(losses, Relaxed) != losses;
        let written: Vec<(ConnKey, Written)> = {
            let mut st = self.replica.state.lock();
            if lost {
                tracing::warn!(
                    "the session store lost its data: writing every session held here again"
                );
                for w in st.written.values_mut() {
                    w.through = 0;
                }
            }
            st.written
                .iter()
                .filter(|(_, w)| !w.disowned)
                .map(|(k, w)| (*k, *w))
                .collect()
        };
        for (key, w) in written {
            let Some(conn) = self.registry.get(&key) else {
                continue;
            };
            let drift = conn.messages_in.load(Relaxed).saturating_sub(w.messages_in);
            let acked = conn.numbering().released.saturating_sub(w.released);
            if lost
                || w.at.elapsed() >= REFRESH
                || drift >= ORIGIN_SKIP / 2
                || acked >= self.ack_drift()
            {
                self.touch(&conn, true);
            }
        }
    }

    async fn write_pending(&self) {
        let Some(store) = self.store().cloned() else {
            return;
        };
        if self.replica.backing_off() {
            return;
        }
        if !self.origin.lease.is_held() {
            // Cut off: the cluster may report this node lost and adopt its
            // sessions at any moment. Written again once the lease is back.
            return;
        }
        // Sessions whose messages were numbered below the sessions
        // (origin replies, released holds).
        for key in self.registry.numbered.take() {
            if let Some(conn) = self.registry.get(&key) {
                self.touch(&conn, false);
            }
        }
        let work: Vec<_> = self.replica.state.lock().work.drain().collect();
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
        let (record, take) = match work {
            Work::Remove | Work::Forget => {
                let written = self.replica.state.lock().written.remove(&key);
                self.settle_waiters(key, None, true);
                if work == Work::Remove {
                    self.remove_stored(store, id, written).await;
                }
                return;
            }
            Work::Write { record } => (record, false),
            Work::Arrived => (true, true),
        };
        let Some(conn) = self.registry.get(&key).filter(|c| c.has_id(id)) else {
            self.settle_waiters(key, None, true);
            return;
        };
        let mut now = {
            let mut st = self.replica.state.lock();
            if take {
                // Its messages are written again from the first kept one.
                st.written.insert(key, Written::default());
            }
            st.written.get(&key).copied().unwrap_or_default()
        };
        if now.disowned {
            self.settle_waiters(key, Some(&conn), false);
            return;
        }
        let n = conn.numbering();
        let acked_far = n.released.saturating_sub(now.released) >= self.ack_drift();
        let mut retry = None;
        if record || now.revision.is_none() || acked_far {
            let expected = match (take, now.revision) {
                (true, _) => self.current_revision(store, id).await,
                (false, Some(r)) => Ok(r),
                // A new session: no record yet.
                (false, None) => Ok(0),
            };
            let messages_in = conn.messages_in.load(Relaxed);
            let losses = store.losses();
            let put = match expected {
                Ok(expected) => {
                    store
                        .put(id.as_str(), self.record_of(&conn, &n), Some(expected))
                        .await
                }
                Err(e) => Err(e),
            };
            match put {
                Ok(revision) => {
                    self.count_store("record");
                    now.revision = Some(revision);
                    now.messages_in = messages_in;
                    now.released = n.released;
                    now.at = Instant::now();
                    now.losses = losses;
                }
                Err(e) => {
                    self.count_error(&e);
                    // Arrived: a write of the node it left landed between
                    // reading the revision and this one: taken again. A
                    // write of this run's whose answer was lost: written
                    // again on that revision.
                    let ours = match (&e, take) {
                        (StoreError::Conflict, false) => {
                            self.own_revision(store, id, now.losses != losses).await
                        }
                        _ => Owner::Unknown,
                    };
                    if let Owner::Here(revision) = ours {
                        now.revision = Some(revision);
                        retry = Some(Work::Write { record: true });
                    } else if ours == Owner::Other {
                        tracing::warn!(connection = %id, "another node wrote this session's record: it is not this node's any more");
                        now.disowned = true;
                    } else {
                        tracing::debug!(connection = %id, error = %e, "session record not written; retried");
                        retry = Some(if take {
                            Work::Arrived
                        } else {
                            Work::Write { record: true }
                        });
                    }
                }
            }
        }
        let (messages, last_seq) = conn.kept_after(now.through);
        if !now.disowned {
            let written = match messages.is_empty() {
                true => Ok(()),
                false => self.append(store, id, messages).await,
            };
            match written {
                Ok(()) => {
                    // Those not listed were acknowledged or dropped meanwhile.
                    now.through = now.through.max(last_seq);
                    self.count_store("messages");
                }
                Err(e) => {
                    self.count_error(&e);
                    tracing::debug!(connection = %id, error = %e, "session messages not written; retried");
                    retry = retry.or(Some(Work::Write { record: false }));
                }
            }
        }
        {
            let mut st = self.replica.state.lock();
            // Kept even if the session ended or left meanwhile: the queued
            // removal needs the revision.
            st.written.insert(key, now);
            if let (Some(again), false) = (retry, now.disowned) {
                // Tried again at the next tick (or wake).
                st.retry(id, again);
            }
        }
        self.settle_waiters(key, Some(&conn), retry.is_none() && !now.disowned);
    }

    /// Appends `messages` of session `id`; one too large for the store is
    /// left out (counted `too_large`: a resume after the death of this node
    /// cannot replay it, as the docs say).
    async fn append(
        &self,
        store: &dyn SessionStore,
        id: &ConnectionId,
        messages: Vec<(u64, Bytes)>,
    ) -> Result<(), StoreError> {
        match store.append(id.as_str(), messages.clone()).await {
            Err(StoreError::TooLarge(_)) => {
                for m in messages {
                    match store.append(id.as_str(), vec![m]).await {
                        Err(e @ StoreError::TooLarge(_)) => self.count_error(&e),
                        other => other?,
                    }
                }
                Ok(())
            }
            other => other,
        }
    }

    /// How far (in messages) the acknowledged position in a record may lag
    /// the session's before the record is written again.
    fn ack_drift(&self) -> u64 {
        u64::from(self.config.session_outbox_messages / 4).max(1)
    }

    /// Whose session `id`'s record is: this run's (its revision), another's,
    /// or unknown. A missing record is this node's, lost, when `store_lost`
    /// (the store lost data since the record was last written): written
    /// anew; otherwise unknown (a loss is counted up to a heartbeat after
    /// it happened): tried again.
    async fn own_revision(
        &self,
        store: &dyn SessionStore,
        id: &ConnectionId,
        store_lost: bool,
    ) -> Owner {
        let found = match store.get(id.as_str()).await {
            Ok(found) => found,
            // Cannot tell now: tried again.
            Err(_) => return Owner::Unknown,
        };
        let Some(found) = found else {
            // Missing before the store's loss is known (it is counted a
            // heartbeat later): tried again until it is, or written anew.
            return if store_lost {
                Owner::Here(0)
            } else {
                Owner::Unknown
            };
        };
        match serde_json::from_slice::<Record>(&found.record) {
            Ok(r) if r.holder == self.node.as_str() && r.run == self.started_at_ms => {
                Owner::Here(found.revision)
            }
            _ => Owner::Other,
        }
    }

    /// The revision of session `id`'s record now (0: none).
    async fn current_revision(
        &self,
        store: &dyn SessionStore,
        id: &ConnectionId,
    ) -> Result<u64, StoreError> {
        Ok(store.get(id.as_str()).await?.map_or(0, |r| r.revision))
    }

    /// Removes an ended session from the store: at the revision this node
    /// wrote, or, when it does not know one (it arrived and ended before
    /// its record was written), whatever record is there. Tried again when
    /// the store is unavailable.
    async fn remove_stored(
        &self,
        store: &dyn SessionStore,
        id: &ConnectionId,
        written: Option<Written>,
    ) {
        let revision = match written {
            Some(w) if w.disowned => return,
            Some(Written {
                revision: Some(r), ..
            }) => Ok(r),
            _ => match store.get(id.as_str()).await {
                Ok(Some(found)) => Ok(found.revision),
                Ok(None) => return,
                Err(e) => Err(e),
            },
        };
        let removed = match revision {
            Ok(revision) => store.remove(id.as_str(), revision).await,
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => self.count_store("removed"),
            // Another node holds it now.
            Err(StoreError::Conflict) => self.count_store("conflict"),
            Err(e) => {
                self.count_error(&e);
                tracing::debug!(connection = %id, error = %e, "an ended session not removed from the session store yet; tried again");
                let mut st = self.replica.state.lock();
                if let Some(w) = written {
                    st.written.insert(id.key(), w);
                }
                st.retry(id, Work::Remove);
            }
        }
    }

    /// A session lost on its way between two nodes: its record (whoever
    /// wrote it last) leaves the store, so that no node adopts it later.
    pub(crate) fn drop_stored(self: &Arc<Self>, id: &ConnectionId) {
        let Some(store) = self.store().cloned() else {
            return;
        };
        let (me, id) = (self.clone(), id.clone());
        tokio::spawn(async move {
            let found = match store.get(id.as_str()).await {
                Ok(Some(found)) => found,
                Ok(None) => return,
                Err(e) => return me.count_error(&e),
            };
            match store.remove(id.as_str(), found.revision).await {
                Ok(()) => me.count_store("removed"),
                Err(e) => me.count_error(&e),
            }
        });
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

    /// The record of `conn` as this node writes it (`n`: its numbering).
    fn record_of(&self, conn: &Conn, n: &crate::conn::Numbering) -> Bytes {
        let mut state = self.state_of(conn, self.token(&conn.id()), conn.remote());
        state.last_seq = n.last_seq;
        state.trimmed_through = n.released;
        state.origin_seq = n.origin_seq;
        state.suspensions = n.suspensions;
        state.channels = self.channels.session_channels(conn);
        self.record_bytes(state)
    }

    /// A record naming this node's run as the holder of `state`.
    fn record_bytes(&self, state: SessionState) -> Bytes {
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

    /// The node and run that hold session `id` by the store's record, if it
    /// has one.
    pub(crate) async fn recorded_holder(&self, id: &ConnectionId) -> Option<(String, u64)> {
        let store = self.store()?;
        let found = match store.get(id.as_str()).await {
            Ok(Some(found)) => found,
            Ok(None) => return None,
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

    /// Where a session is by its record's holder and run (`found`): here,
    /// on a live node (the run that wrote it), or on a node or run that is
    /// gone. `peers`: the live nodes and when each started.
    pub(crate) fn classify(&self, found: &(String, u64), peers: &[(String, u64)]) -> Holder {
        let (node, run) = found;
        if node == self.node.as_str() && *run == self.started_at_ms {
            Holder::Here
        } else if peers.iter().any(|(p, started)| p == node && started == run) {
            Holder::Peer(node.clone())
        } else {
            Holder::Lost(node.clone(), *run)
        }
    }

    /// Adopts the sessions held by node `down` (its run started at
    /// `run`), lost without draining: each is suspended here with its
    /// messages from the store, for its client to resume (or its ttl to
    /// pass). Returns their connection ids.
    pub(crate) async fn take_over(self: &Arc<Self>, down: &str, run: u64) -> Vec<String> {
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
                    self.count_error(&e);
                    tracing::error!(node = down, error = %e, "cannot read the session store: the lost node's sessions are gone");
                    self.clean_up_after(down.to_owned(), run);
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
        let key_of = |r: &Record| ConnectionId::parse(&r.state.connection_id).map(|id| id.key());
        self.replica
            .state
            .lock()
            .adopting
            .extend(theirs.iter().filter_map(|(r, _)| key_of(r).ok()));
        let store = &store;
        let adopted: Vec<Option<String>> = futures_util::stream::iter(theirs)
            .map(|(record, revision)| async move {
                let key = key_of(&record);
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
        let tried = adopted.len();
        let adopted: Vec<String> = adopted.into_iter().flatten().collect();
        if adopted.len() < tried {
            // Those not adopted are gone: their records must not say they
            // are being adopted.
            self.clean_up_after(down.to_owned(), run);
        }
        tracing::warn!(
            node = down,
            sessions = adopted.len(),
            "took over the lost node's sessions"
        );
        adopted
    }

    /// The lost node's sessions could not be adopted: they are gone (the
    /// origin is told so by `node_down`). Their records are removed once
    /// the store can be read (tried for [`CLEANUP_FOR`]), so that commands
    /// for them are answered `connection_not_found`, not
    /// `session_unavailable`.
    fn clean_up_after(self: &Arc<Self>, down: String, run: u64) {
        let Some(store) = self.store().cloned() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let until = Instant::now() + CLEANUP_FOR;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Ok(records) = store.all().await else {
                    continue;
                };
                for r in records {
                    let theirs = serde_json::from_slice::<Record>(&r.record)
                        .is_ok_and(|rec| rec.holder == down && rec.run == run);
                    if theirs && store.remove(&r.id, r.revision).await.is_ok() {
                        me.count_store("removed");
                    }
                }
                return;
            }
        });
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
        let id = id.as_str();
        // Claimed first: a node racing this one (or the lost node, back)
        // cannot write it after.
        let claimed = match store
            .put(id, self.record_bytes(record.state.clone()), Some(revision))
            .await
        {
            Ok(claimed) => claimed,
            Err(e) => {
                self.count_error(&e);
                tracing::warn!(connection = %id, error = %e, "a lost node's session could not be claimed");
                return None;
            }
        };
        // A session that cannot be adopted leaves the store: it is gone,
        // as the lost node's other connections.
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
        let state = restored(
            record.state,
            messages,
            self.limits(),
            self.config.session_ttl,
        );
        let ttl = state
            .ttl_ms
            .map_or(self.config.session_ttl, Duration::from_millis);
        let key = ConnectionId::parse(id).ok().map(|c| c.key());
        let conn = match self.adopt(state) {
            Ok(conn) => conn,
            // Here already (it moved here just before its node died): kept.
            Err(_) if key.is_some_and(|k| self.registry.get(&k).is_some()) => return None,
            Err(e) => return drop_it(e.message).await,
        };
        self.count_store("taken_over");
        if self.config.session_events {
            let n = conn.numbering().suspensions;
            self.enqueue(
                &conn.key,
                &Event::Suspend(SuspendEvent {
                    id: event_id::session(&conn.id(), "suspend", n),
                    connection_id: conn.id().to_string(),
                    node: self.node.to_string(),
                    timestamp_ms: now_ms(),
                    user_id: conn.user_id().map(str::to_owned),
                    reason: "node lost".into(),
                    expires_at_ms: now_ms() + ttl.as_millis() as u64,
                }),
            );
        }
        Some(id.to_owned())
    }
}

/// The state a lost node's session is adopted with, from its record
/// and its stored `messages` (by ascending `seq`): the newest unbroken
/// run of messages not acknowledged, within the outbox's bounds; its
/// numbering moved past anything the lost node may have given out;
/// suspended from now, for its whole ttl.
fn restored(
    mut state: SessionState,
    messages: Vec<(u64, Bytes)>,
    limits: Option<crate::conn::OutboxLimits>,
    default_ttl: Duration,
) -> SessionState {
    let acked = state.trimmed_through;
    let mut kept: Vec<(u64, Bytes)> = messages
        .into_iter()
        .filter(|(seq, _)| *seq > acked)
        .collect();
    let top = kept.last().map_or(0, |(seq, _)| *seq);
    // Only the newest unbroken run can be resumed from.
    let mut first = top + 1;
    for (seq, _) in kept.iter().rev() {
        if *seq + 1 != first {
            break;
        }
        first = *seq;
    }
    kept.retain(|(seq, _)| *seq >= first);
    // Within the outbox's bounds, as the lost node kept them.
    if let Some(limits) = limits {
        let mut bytes: usize = kept.iter().map(|(_, p)| p.len()).sum();
        let mut drop = 0;
        while kept.len() - drop > 0 && limits.over(kept.len() - drop, bytes) {
            bytes -= kept[drop].1.len();
            drop += 1;
        }
        kept.drain(..drop);
    }
    state.trimmed_through = match kept.first() {
        Some((seq, _)) => seq - 1,
        None => acked.max(state.last_seq).max(top),
    };
    state.kept = kept
        .into_iter()
        .map(|(seq, push)| KeptMessage {
            seq,
            push: String::from_utf8_lossy(&push).into_owned(),
        })
        .collect();
    state.last_seq = state.last_seq.max(top) + SEQ_SKIP;
    state.origin_seq = state.origin_seq.max(state.messages_in) + ORIGIN_SKIP;
    state.suspensions = state.suspensions.saturating_add(SUSPENSION_SKIP);
    let ttl = state.ttl_ms.map_or(default_ttl, Duration::from_millis);
    state.expires_in_ms = ttl.as_millis() as u64;
    state.suspended_ms = 0;
    state.overflowed = false;
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(last_seq: u64, acked: u64) -> SessionState {
        SessionState {
            connection_id: "n1.AAAAAAAAAAAAAAAAAAAAAA".into(),
            token: String::new(),
            path: "/".into(),
            user_id: None,
            metadata: None,
            client_token: None,
            token_expires_ms: 0,
            remote_addr: "127.0.0.1:1".into(),
            connected_at_ms: 0,
            messages_in: 40,
            messages_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            last_seq,
            trimmed_through: acked,
            kept: Vec::new(),
            origin_seq: 30,
            suspensions: 2,
            suspended_ms: 5,
            expires_in_ms: 0,
            ttl_ms: None,
            overflowed: false,
            channels: Vec::new(),
        }
    }

    fn messages(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, Bytes)> {
        seqs.into_iter()
            .map(|s| {
                (
                    s,
                    Bytes::from(format!("{{\"push\":\"direct\",\"seq\":{s}}}")),
                )
            })
            .collect()
    }

    fn kept(s: &SessionState) -> Vec<u64> {
        s.kept.iter().map(|k| k.seq).collect()
    }

    const TTL: Duration = Duration::from_secs(120);

    #[test]
    fn an_adopted_session_keeps_what_was_not_acknowledged_and_numbers_past_the_lost_node() {
        // Acknowledged up to 4 (by the record), messages 1..=9 stored, the
        // record written when the last was 6.
        let s = restored(state(6, 4), messages(1..=9), None, TTL);
        assert_eq!(kept(&s), [5, 6, 7, 8, 9]);
        assert_eq!(s.trimmed_through, 4);
        assert_eq!(s.last_seq, 9 + SEQ_SKIP);
        assert_eq!(s.origin_seq, 40 + ORIGIN_SKIP, "past the frames counted");
        assert_eq!(s.suspensions, 2 + SUSPENSION_SKIP);
        assert_eq!((s.expires_in_ms, s.suspended_ms), (120_000, 0));
    }

    #[test]
    fn only_the_newest_unbroken_run_of_messages_is_kept() {
        // 7 is missing: a client that has less than 7 cannot resume.
        let s = restored(state(9, 2), messages([3, 4, 5, 6, 8, 9]), None, TTL);
        assert_eq!(kept(&s), [8, 9]);
        assert_eq!(s.trimmed_through, 7);
    }

    #[test]
    fn the_outbox_bounds_keep_the_newest() {
        let limits = crate::conn::OutboxLimits::new(3, 1 << 20);
        let s = restored(state(10, 0), messages(1..=10), limits, TTL);
        assert_eq!(kept(&s), [8, 9, 10]);
        assert_eq!(s.trimmed_through, 7);
    }

    #[test]
    fn without_messages_nothing_before_the_record_can_be_replayed() {
        let s = restored(state(6, 4), Vec::new(), None, TTL);
        assert!(s.kept.is_empty());
        assert_eq!(s.trimmed_through, 6, "5 and 6 are gone");
        assert_eq!(s.last_seq, 6 + SEQ_SKIP);
    }

    #[test]
    fn a_retry_does_not_undo_an_end_queued_meanwhile() {
        let id = ConnectionId::parse("n1.AAAAAAAAAAAAAAAAAAAAAA").unwrap();
        let mut st = State::default();
        st.queue(&id, Work::Remove);
        st.retry(&id, Work::Arrived);
        assert_eq!(st.work[&id.key()].1, Work::Remove);
        let mut st = State::default();
        st.queue(&id, Work::Write { record: false });
        st.retry(&id, Work::Arrived);
        assert_eq!(st.work[&id.key()].1, Work::Arrived);
        let mut st = State::default();
        st.retry(&id, Work::Remove);
        st.queue(&id, Work::Write { record: true });
        assert_eq!(st.work[&id.key()].1, Work::Remove);
    }

    #[test]
    fn an_end_is_not_undone_by_a_later_write_but_an_arrival_is_kept() {
        let w = Work::Write { record: false };
        assert_eq!(Work::Remove.then(w), Work::Remove);
        assert_eq!(Work::Forget.then(w), Work::Forget);
        assert_eq!(Work::Forget.then(Work::Arrived), Work::Arrived);
        assert_eq!(Work::Arrived.then(w), Work::Arrived);
        assert_eq!(Work::Arrived.then(Work::Remove), Work::Remove);
        assert_eq!(
            w.then(Work::Write { record: true }),
            Work::Write { record: true }
        );
    }
}
