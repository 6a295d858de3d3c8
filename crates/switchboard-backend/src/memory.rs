//! The in-memory backend: several nodes of one cluster in one process.
//!
//! A [`MemoryHub`] is the cluster: nodes [`MemoryHub::join`] it and get a
//! [`Cluster`] and a [`ChannelBus`] each. Commands are forwarded by calling
//! the owner node's [`Node::execute`] directly; channel logs live in the hub
//! under one lock, so offsets are contiguous and every watcher sees a
//! channel's messages in offset order. Faults are method calls, with no
//! timing involved: [`MemoryHub::kill`] (a node dies: one survivor reports
//! it), [`MemoryHub::cut`] (a node is cut off: its lease ends, commands to
//! and from it fail), [`MemoryHub::report_lost`] (the others give up on a
//! cut-off node) and [`MemoryHub::restore`] (it is back: fenced if it was
//! reported, renewed if not).
//!
//! [`MemorySessionStore`] keeps sessions' records and messages for the
//! nodes of one process (the [`SessionStore`] of the conformance suite).
//!
//! It is the reference the other backends are compared with (the
//! conformance suite runs on it first) and makes
//! routing, replica and fencing logic testable without processes or clocks.

use crate::bus::{BusError, BusEvent, ChannelBus, LogEntry, LogRead, Published, Watch};
use crate::cluster::{Cluster, ClusterError, CommandReply, Node};
use crate::namespace::Namespace;
use crate::sessions::{SessionStore, StoreError, StoredRecord};
use crate::BoxFuture;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use switchboard_proto::control::NodeInfo;
use switchboard_proto::native::{Member, StreamPosition};
use switchboard_proto::origin::Payload;
use tokio::sync::mpsc;

/// How long an idempotency key is remembered (as NATS's duplicate window).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(300);

/// How long a node waits on the in-memory bus for a client (the NATS
/// backend's default `cluster-request-timeout`).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a cut-off node's lease is extended at a time while connected:
/// long enough never to run out in a test, renewed at every join.
const HELD: Duration = Duration::from_secs(365 * 24 * 3600);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() >> 16)
}

/// One node of the hub.
#[derive(Debug)]
struct Slot {
    node: Arc<dyn Node>,
    /// Random id of this run.
    instance: String,
    /// Cut off: commands to and from it fail, and it hears nothing.
    cut: bool,
    /// The others reported this run lost (while it was cut off).
    reported: bool,
    /// The node's watches, by channel.
    watches: HashMap<String, Vec<mpsc::UnboundedSender<BusEvent>>>,
}

/// One channel's log.
#[derive(Debug, Default)]
struct Log {
    epoch: String,
    /// The newest offset of the epoch (0: none).
    offset: u64,
    entries: VecDeque<LogEntry>,
    /// Idempotency keys: the offset their publish got, and when.
    keys: HashMap<String, (String, u64, Instant)>,
}

impl Log {
    /// Drops what `ns` no longer keeps: past `history-size` (the newest one
    /// stays, as the channel's position) or older than `history-ttl`.
    fn trim(&mut self, ns: &Namespace) {
        let keep = ns.history_size.max(1);
        while self.entries.len() > keep {
            self.entries.pop_front();
        }
        let oldest = now_ms().saturating_sub(ns.history_ttl.as_millis() as u64);
        while self.entries.front().is_some_and(|e| e.time_ms < oldest) {
            self.entries.pop_front();
        }
        if self.entries.is_empty() {
            // Everything expired: the next publish starts a new epoch.
            self.epoch.clear();
            self.offset = 0;
        }
        self.keys
            .retain(|_, (_, _, at)| at.elapsed() < DUPLICATE_WINDOW);
    }
}

#[derive(Debug, Default)]
struct Hub {
    members: HashMap<String, Slot>,
    logs: HashMap<String, Log>,
}

/// The cluster, in memory. See the module docs.
#[derive(Debug, Default)]
pub struct MemoryHub {
    hub: Mutex<Hub>,
}

impl MemoryHub {
    /// An empty cluster.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds `node` to the cluster and returns its handles. Its lease is
    /// bound and held while it is connected. A node that joins again under
    /// the same id replaces its previous run, which one other node reports
    /// lost, as a restart without draining would be.
    pub fn join(self: &Arc<Self>, node: Arc<dyn Node>) -> (Arc<MemoryCluster>, Arc<MemoryBus>) {
        let id = node.id().to_owned();
        node.lease().renew_until(Instant::now() + HELD);
        let previous = self.hub.lock().members.insert(
            id.clone(),
            Slot {
                node: node.clone(),
                instance: new_id(),
                cut: false,
                reported: false,
                watches: HashMap::new(),
            },
        );
        if let Some(old) = previous {
            if !old.reported {
                self.report(&id, &old.instance, old.node.started_at_ms());
            }
        }
        let handles = Handles {
            hub: self.clone(),
            id,
        };
        (
            Arc::new(MemoryCluster(handles.clone())),
            Arc::new(MemoryBus(handles)),
        )
    }

    /// The node `id` dies without draining: it is dropped at once, and the
    /// live node with the smallest id sends the origin its `node_down`.
    pub fn kill(&self, id: &str) {
        let gone = self.hub.lock().members.remove(id);
        if let Some(m) = gone {
            if !m.reported {
                self.report(id, &m.instance, m.node.started_at_ms());
            }
        }
    }

    /// The node `id` is cut off from the cluster: its lease ends at once,
    /// commands to and from it fail as unavailable, and its watches hear
    /// nothing until it is [restored](MemoryHub::restore).
    pub fn cut(&self, id: &str) {
        let mut hub = self.hub.lock();
        if let Some(m) = hub.members.get_mut(id) {
            m.cut = true;
            m.node.lease().revoke();
        }
    }

    /// The other nodes give up on the cut-off node `id`: one of them
    /// reports it lost (as a heartbeat timeout would).
    pub fn report_lost(&self, id: &str) {
        let (instance, started_at_ms) = {
            let mut hub = self.hub.lock();
            match hub.members.get_mut(id) {
                Some(m) if m.cut && !m.reported => {
                    m.reported = true;
                    (m.instance.clone(), m.node.started_at_ms())
                }
                _ => return,
            }
        };
        self.report(id, &instance, started_at_ms);
    }

    /// The cut-off node `id` is back. Reported lost meanwhile: it fences
    /// itself and starts a new run. Not reported: its lease is renewed.
    pub async fn restore(&self, id: &str) {
        let (node, reported) = {
            let mut hub = self.hub.lock();
            let Some(m) = hub.members.get_mut(id) else {
                return;
            };
            m.cut = false;
            let reported = std::mem::take(&mut m.reported);
            if reported {
                m.instance = new_id();
            }
            (m.node.clone(), reported)
        };
        if reported {
            node.fence().await;
        }
        node.lease().renew_until(Instant::now() + HELD);
    }

    /// Has the live, connected node with the smallest id report the run
    /// `instance` of `id` (started at `started_at_ms`) lost.
    fn report(&self, id: &str, instance: &str, started_at_ms: u64) {
        let reporter = {
            let hub = self.hub.lock();
            hub.members
                .iter()
                .filter(|(other, m)| other.as_str() != id && !m.cut)
                .min_by(|a, b| a.0.cmp(b.0))
                .map(|(_, m)| m.node.clone())
        };
        if let Some(node) = reporter {
            node.report_node_down(id, instance, started_at_ms, now_ms());
        }
    }
}

/// What both handles of one node share.
#[derive(Debug, Clone)]
struct Handles {
    hub: Arc<MemoryHub>,
    id: String,
}

impl Handles {
    /// Whether this node is in the hub and not cut off.
    fn connected(&self) -> bool {
        self.hub
            .hub
            .lock()
            .members
            .get(&self.id)
            .is_some_and(|m| !m.cut)
    }

    fn check(&self) -> Result<(), BusError> {
        if self.connected() {
            Ok(())
        } else {
            Err(BusError::Unavailable("cut off from the hub".into()))
        }
    }
}

/// A node's [`Cluster`] in a [`MemoryHub`].
#[derive(Debug)]
pub struct MemoryCluster(Handles);

impl Cluster for MemoryCluster {
    fn forward(
        &self,
        node: &str,
        command: Bytes,
    ) -> BoxFuture<'_, Result<CommandReply, ClusterError>> {
        let node = node.to_owned();
        Box::pin(async move {
            if !self.0.connected() {
                return Err(ClusterError::Unavailable("cut off from the hub".into()));
            }
            let target = {
                let hub = self.0.hub.hub.lock();
                match hub.members.get(&node) {
                    None => return Err(ClusterError::NodeGone(node)),
                    // Still a member, not answering: as a stuck node would.
                    Some(m) if m.cut => return Err(ClusterError::Timeout(node)),
                    Some(m) => m.node.clone(),
                }
            };
            Ok(target.execute(&command, true).await)
        })
    }

    fn peers(&self) -> Vec<NodeInfo> {
        let hub = self.0.hub.hub.lock();
        hub.members
            .iter()
            .filter(|(id, m)| id.as_str() != self.0.id && !m.reported)
            .map(|(id, m)| NodeInfo {
                node: id.clone(),
                connections: m.node.connections(),
                draining: m.node.is_draining(),
                started_at_ms: m.node.started_at_ms(),
                last_seen_ms: now_ms(),
                is_self: false,
            })
            .collect()
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.0.hub.hub.lock().members.remove(&self.0.id);
        })
    }
}

/// A node's [`ChannelBus`] in a [`MemoryHub`].
#[derive(Debug)]
pub struct MemoryBus(Handles);

impl MemoryBus {
    /// Sends `event` to the watchers of `channel` on every connected node
    /// (`others_only`: not this one), dropping watches that ended.
    fn broadcast(hub: &mut Hub, me: &str, channel: &str, event: &BusEvent, others_only: bool) {
        for (id, m) in hub.members.iter_mut() {
            if m.cut || (others_only && id == me) {
                continue;
            }
            if let Some(watchers) = m.watches.get_mut(channel) {
                watchers.retain(|tx| tx.send(event.clone()).is_ok());
                if watchers.is_empty() {
                    m.watches.remove(channel);
                }
            }
        }
    }
}

impl ChannelBus for MemoryBus {
    fn request_timeout(&self) -> Duration {
        REQUEST_TIMEOUT
    }

    fn publish<'a>(
        &'a self,
        ns: &'a Namespace,
        channel: &'a str,
        data: &'a Payload,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Published, BusError>> {
        Box::pin(async move {
            self.0.check()?;
            let mut hub = self.0.hub.hub.lock();
            let log = hub.logs.entry(channel.to_owned()).or_default();
            log.trim(ns);
            if let Some((epoch, offset, _)) = key.and_then(|k| log.keys.get(k)) {
                return Ok(Published {
                    epoch: epoch.clone(),
                    offset: *offset,
                    duplicate: true,
                });
            }
            if log.epoch.is_empty() {
                log.epoch = new_id();
                log.offset = 0;
            }
            log.offset += 1;
            let entry = LogEntry {
                offset: log.offset,
                time_ms: now_ms(),
                data: data.clone(),
            };
            log.entries.push_back(entry.clone());
            let epoch = log.epoch.clone();
            if let Some(k) = key {
                log.keys
                    .insert(k.to_owned(), (epoch.clone(), entry.offset, Instant::now()));
            }
            log.trim(ns);
            let published = Published {
                epoch: epoch.clone(),
                offset: entry.offset,
                duplicate: false,
            };
            let event = BusEvent::Message { epoch, entry };
            Self::broadcast(&mut hub, &self.0.id, channel, &event, false);
            Ok(published)
        })
    }

    fn read<'a>(
        &'a self,
        ns: &'a Namespace,
        channel: &'a str,
        since: Option<&'a StreamPosition>,
        limit: Option<usize>,
    ) -> BoxFuture<'a, Result<LogRead, BusError>> {
        Box::pin(async move {
            self.0.check()?;
            let mut hub = self.0.hub.hub.lock();
            let Some(log) = hub.logs.get_mut(channel).filter(|l| {
                // Emptied by age: as if never published.
                !l.epoch.is_empty()
            }) else {
                return Ok(LogRead {
                    complete: since.is_none_or(|s| s.offset == 0),
                    ..LogRead::default()
                });
            };
            log.trim(ns);
            if log.epoch.is_empty() {
                return Ok(LogRead {
                    complete: since.is_none_or(|s| s.offset == 0),
                    ..LogRead::default()
                });
            }
            let mut read = LogRead {
                epoch: log.epoch.clone(),
                offset: log.offset,
                entries: Vec::new(),
                complete: true,
            };
            let after = match since {
                None => {
                    let n = limit.unwrap_or(usize::MAX).min(log.entries.len());
                    let newest = log.entries.len() - n..;
                    read.entries = log.entries.range(newest).cloned().collect();
                    return Ok(read);
                }
                Some(s) if s.epoch.is_empty() && s.offset == 0 => 0,
                Some(s) if s.epoch != log.epoch || s.offset > log.offset => {
                    read.complete = false;
                    return Ok(read);
                }
                Some(s) => s.offset,
            };
            // Every message after `after` must still be there.
            let oldest = log.entries.front().map_or(log.offset + 1, |e| e.offset);
            if after + 1 < oldest {
                read.complete = false;
                return Ok(read);
            }
            read.entries = log
                .entries
                .iter()
                .filter(|e| e.offset > after)
                .take(limit.unwrap_or(usize::MAX))
                .cloned()
                .collect();
            Ok(read)
        })
    }

    fn watch<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Watch, BusError>> {
        Box::pin(async move {
            self.0.check()?;
            let (tx, rx) = mpsc::unbounded_channel();
            {
                let mut hub = self.0.hub.hub.lock();
                let Some(me) = hub.members.get_mut(&self.0.id) else {
                    return Err(BusError::Unavailable("not in the hub".into()));
                };
                me.watches.entry(channel.to_owned()).or_default().push(tx);
            }
            let events = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|e| (e, rx))
            });
            Ok(Box::pin(events) as Watch)
        })
    }

    fn announce(&self, channel: &str, member: &Member, joined: bool) {
        if !self.0.connected() {
            return;
        }
        let event = if joined {
            BusEvent::Join(member.clone())
        } else {
            BusEvent::Leave(member.clone())
        };
        let mut hub = self.0.hub.hub.lock();
        Self::broadcast(&mut hub, &self.0.id, channel, &event, true);
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>, BusError>> {
        Box::pin(async move {
            self.0.check()?;
            let others: Vec<Arc<dyn Node>> = {
                let hub = self.0.hub.hub.lock();
                hub.members
                    .iter()
                    .filter(|(id, m)| id.as_str() != self.0.id && !m.cut)
                    .map(|(_, m)| m.node.clone())
                    .collect()
            };
            Ok(others
                .iter()
                .flat_map(|n| n.channel_members(channel))
                .collect())
        })
    }
}

/// Sessions' records and messages in memory, shared by the nodes of one
/// process (see [`crate::sessions`]).
#[derive(Debug)]
pub struct MemorySessionStore {
    /// Most messages kept per session (the newest).
    max_messages: usize,
    sessions: Mutex<HashMap<String, StoredSession>>,
    /// Revisions are unique across the store, as in a NATS stream.
    revision: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct StoredSession {
    record: Option<(Bytes, u64)>,
    messages: std::collections::BTreeMap<u64, Bytes>,
}

impl MemorySessionStore {
    /// An empty store keeping at most `max_messages` per session.
    pub fn new(max_messages: usize) -> Arc<Self> {
        Arc::new(Self {
            max_messages: max_messages.max(1),
            sessions: Mutex::new(HashMap::new()),
            revision: 0.into(),
        })
    }
}

impl SessionStore for MemorySessionStore {
    fn put(
        &self,
        id: &str,
        record: Bytes,
        expected: Option<u64>,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        let mut sessions = self.sessions.lock();
        let s = sessions.entry(id.to_owned()).or_default();
        let now = s.record.as_ref().map_or(0, |(_, r)| *r);
        let r = if expected.is_some_and(|e| e != now) {
            Err(StoreError::Conflict)
        } else {
            let revision = self
                .revision
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            s.record = Some((record, revision));
            Ok(revision)
        };
        Box::pin(std::future::ready(r))
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<StoredRecord>, StoreError>> {
        let found = self.sessions.lock().get(id).and_then(|s| {
            s.record.as_ref().map(|(record, revision)| StoredRecord {
                id: id.to_owned(),
                record: record.clone(),
                revision: *revision,
            })
        });
        Box::pin(std::future::ready(Ok(found)))
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<StoredRecord>, StoreError>> {
        let all = self
            .sessions
            .lock()
            .iter()
            .filter_map(|(id, s)| {
                s.record.as_ref().map(|(record, revision)| StoredRecord {
                    id: id.clone(),
                    record: record.clone(),
                    revision: *revision,
                })
            })
            .collect();
        Box::pin(std::future::ready(Ok(all)))
    }

    fn remove(&self, id: &str, expected: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut sessions = self.sessions.lock();
        let now = sessions
            .get(id)
            .and_then(|s| s.record.as_ref().map(|(_, r)| *r));
        let r = match now {
            Some(r) if r != expected => Err(StoreError::Conflict),
            _ => {
                sessions.remove(id);
                Ok(())
            }
        };
        Box::pin(std::future::ready(r))
    }

    fn append(
        &self,
        id: &str,
        messages: Vec<(u64, Bytes)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut sessions = self.sessions.lock();
        let s = sessions.entry(id.to_owned()).or_default();
        for (seq, push) in messages {
            s.messages.entry(seq).or_insert(push);
        }
        while s.messages.len() > self.max_messages {
            s.messages.pop_first();
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn messages(&self, id: &str) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StoreError>> {
        let all = self.sessions.lock().get(id).map_or_else(Vec::new, |s| {
            s.messages.iter().map(|(k, v)| (*k, v.clone())).collect()
        });
        Box::pin(std::future::ready(Ok(all)))
    }
}
