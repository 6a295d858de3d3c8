//! The conformance suite every backend must pass: routing a command to the
//! node that holds a connection, membership and node loss, channel publish
//! with contiguous offsets and idempotency, live delivery (each node's messages in order),
//! history and recovery reads, presence, joins and leaves.
//!
//! It talks to a backend through the traits only, with [`StandInNode`]s in
//! place of gateways, so it checks exactly what the gateway relies on. A
//! backend's tests implement [`Backend`] and call [`run`]; the in-memory
//! backend runs it in this crate's tests, the NATS backend against a real
//! `nats-server` in its own.

use crate::bus::{BusEvent, ChannelBus};
use crate::cluster::{Cluster, ClusterError, CommandReply, Node};
use crate::lease::Lease;
use crate::memory::MemoryHub;
use crate::namespace::Namespace;
use crate::sessions::SessionStore;
use crate::BoxFuture;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use switchboard_proto::native::{Member, StreamPosition};
use switchboard_proto::origin::Payload;

/// A node of a test cluster: records what the backend asks of it.
#[derive(Debug)]
pub struct StandInNode {
    id: String,
    lease: Lease,
    /// Commands executed: body and `forwarded`.
    pub executed: Mutex<Vec<(Bytes, bool)>>,
    /// Members it answers presence with, by channel.
    pub members: Mutex<HashMap<String, Vec<Member>>>,
    /// `node_down` reports it was asked to send: node and instance.
    pub reports: Mutex<Vec<(String, String)>>,
    /// Times it was fenced.
    pub fences: Mutex<usize>,
}

impl StandInNode {
    /// A node called `id`.
    pub fn new(id: &str) -> Arc<Self> {
        Arc::new(Self {
            id: id.to_owned(),
            lease: Lease::unlimited(),
            executed: Mutex::default(),
            members: Mutex::default(),
            reports: Mutex::default(),
            fences: Mutex::default(),
        })
    }
}

impl Node for StandInNode {
    fn id(&self) -> &str {
        &self.id
    }

    fn connections(&self) -> u64 {
        0
    }

    fn is_draining(&self) -> bool {
        false
    }

    fn started_at_ms(&self) -> u64 {
        0
    }

    fn execute<'a>(&'a self, command: &'a [u8], forwarded: bool) -> BoxFuture<'a, CommandReply> {
        Box::pin(async move {
            self.executed
                .lock()
                .push((Bytes::copy_from_slice(command), forwarded));
            let body = serde_json::json!({ "ran_on": self.id });
            CommandReply {
                status: 200,
                body: Bytes::from(body.to_string()),
            }
        })
    }

    fn channel_members(&self, channel: &str) -> Vec<Member> {
        self.members
            .lock()
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    fn report_node_down(
        &self,
        down_node: &str,
        instance: &str,
        _started_at_ms: u64,
        _last_seen_ms: u64,
    ) {
        self.reports
            .lock()
            .push((down_node.to_owned(), instance.to_owned()));
    }

    fn lease(&self) -> &Lease {
        &self.lease
    }

    fn fence(&self) -> BoxFuture<'_, usize> {
        Box::pin(async move {
            *self.fences.lock() += 1;
            self.lease.unbind();
            0
        })
    }
}

/// A node joined to a backend's cluster.
pub struct Joined {
    /// The stand-in gateway.
    pub node: Arc<StandInNode>,
    /// Its cluster handle.
    pub cluster: Arc<dyn Cluster>,
    /// Its channel bus.
    pub bus: Arc<dyn ChannelBus>,
    /// Whatever the backend needs to kill it.
    pub handle: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("node", &self.node.id)
            .finish()
    }
}

/// A backend under test.
pub trait Backend: Sync {
    /// Joins `node` to the cluster named `cluster` (each test uses its own,
    /// so tests do not see each other's nodes), with `namespaces`.
    fn join<'a>(
        &'a self,
        cluster: &'a str,
        node: Arc<StandInNode>,
        namespaces: &'a [Namespace],
    ) -> BoxFuture<'a, Joined>;

    /// Kills the node: it stops without leaving, as a crashed process.
    fn kill(&self, cluster: &str, joined: Joined) -> BoxFuture<'_, ()>;

    /// How long the backend may take to notice a joined or lost node.
    fn settle(&self) -> Duration;
}

/// Runs every check against `backend`; panics on the first failure.
pub async fn run(backend: &dyn Backend) {
    commands_reach_the_node_that_holds_the_connection(backend).await;
    a_lost_node_is_reported_once(backend).await;
    publishes_get_contiguous_offsets_and_keys_publish_once(backend).await;
    watchers_get_every_message_each_node_s_in_order(backend).await;
    reads_serve_history_and_exact_recovery(backend).await;
    presence_and_joins_span_the_nodes(backend).await;
}

fn namespace() -> Namespace {
    "conf:history-size=5,presence,join-leave,publish,subscribe"
        .parse()
        .expect("a valid namespace")
}

/// Polls `check` every 20 ms until it holds, for at most `within`.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn join_all(backend: &dyn Backend, cluster: &str, ids: &[&str]) -> Vec<Joined> {
    let ns = [namespace()];
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(backend.join(cluster, StandInNode::new(id), &ns).await);
    }
    let want = ids.len() - 1;
    for n in &nodes {
        let cluster = n.cluster.clone();
        eventually(backend.settle(), "every node sees the others", || {
            cluster.peers().len() == want
        })
        .await;
    }
    nodes
}

async fn commands_reach_the_node_that_holds_the_connection(backend: &dyn Backend) {
    let nodes = join_all(backend, "route", &["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let command = Bytes::from_static(br#"{"op":"info","connection_id":"b.x"}"#);
    let reply = a
        .cluster
        .forward("b", command.clone())
        .await
        .expect("forwarded");
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], br#"{"ran_on":"b"}"#);
    assert_eq!(b.node.executed.lock().as_slice(), [(command, true)]);
    assert!(a.node.executed.lock().is_empty());
    match a.cluster.forward("nobody", Bytes::from_static(b"{}")).await {
        Err(ClusterError::NodeGone(_) | ClusterError::Timeout(_)) => {}
        other => panic!("a command for an unknown node: {other:?}"),
    }
    let peers = a.cluster.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].node, "b");
    assert!(!peers[0].is_self);
}

async fn a_lost_node_is_reported_once(backend: &dyn Backend) {
    let mut nodes = join_all(backend, "loss", &["a", "b", "c"]).await;
    let c = nodes.pop().expect("three nodes");
    backend.kill("loss", c).await;
    let reports = || {
        nodes
            .iter()
            .flat_map(|n| n.node.reports.lock().clone())
            .collect::<Vec<_>>()
    };
    eventually(backend.settle() * 3, "the lost node reported", || {
        !reports().is_empty()
    })
    .await;
    // Give a second report time to show up: there must be none.
    tokio::time::sleep(backend.settle()).await;
    let all = reports();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].0, "c");
    for n in &nodes {
        let cluster = n.cluster.clone();
        eventually(backend.settle(), "the lost node dropped", || {
            cluster.peers().iter().all(|p| p.node != "c")
        })
        .await;
    }
}

async fn publishes_get_contiguous_offsets_and_keys_publish_once(backend: &dyn Backend) {
    let nodes = join_all(backend, "offsets", &["a", "b"]).await;
    let ns = namespace();
    let mut epoch = None;
    for i in 1..=8u64 {
        let bus = &nodes[(i % 2) as usize].bus;
        let p = bus
            .publish(&ns, "conf:o", &Payload::Text(format!("m{i}")), None)
            .await
            .expect("published");
        assert_eq!(p.offset, i, "offsets contiguous across nodes");
        assert!(!p.duplicate);
        assert_eq!(epoch.get_or_insert(p.epoch.clone()), &p.epoch, "one epoch");
    }
    let text = Payload::Text("once".into());
    let first = nodes[0]
        .bus
        .publish(&ns, "conf:o", &text, Some("k1"))
        .await
        .expect("published");
    let again = nodes[1]
        .bus
        .publish(&ns, "conf:o", &text, Some("k1"))
        .await
        .expect("answered");
    assert!(!first.duplicate);
    assert!(again.duplicate, "{again:?}");
    assert_eq!((again.epoch, again.offset), (first.epoch, first.offset));
    let next = nodes[1]
        .bus
        .publish(&ns, "conf:o", &text, None)
        .await
        .expect("published");
    assert_eq!(next.offset, first.offset + 1, "a duplicate takes no offset");
}

async fn watchers_get_every_message_each_node_s_in_order(backend: &dyn Backend) {
    let nodes = join_all(backend, "watch", &["a", "b"]).await;
    let ns = namespace();
    let mut on_a = nodes[0].bus.watch("conf:w").await.expect("watch");
    let mut on_b = nodes[1].bus.watch("conf:w").await.expect("watch");
    for i in 1..=6 {
        nodes[(i % 2) as usize]
            .bus
            .publish(&ns, "conf:w", &Payload::Text(format!("w{i}")), None)
            .await
            .expect("published");
    }
    for watch in [&mut on_a, &mut on_b] {
        let mut offsets = Vec::new();
        while offsets.len() < 6 {
            let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("a message within 5 s")
                .expect("the watch goes on");
            if let BusEvent::Message { entry, .. } = event {
                assert_eq!(entry.data, Payload::Text(format!("w{}", entry.offset)));
                offsets.push(entry.offset);
            }
        }
        // Each node's messages in order; two nodes' may interleave out of
        // offset order (their live messages travel on two connections), as
        // the watch contract allows: consumers fill gaps from the log.
        for publisher in 0..2 {
            let mine: Vec<u64> = offsets
                .iter()
                .copied()
                .filter(|o| o % 2 == publisher)
                .collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "one node's messages in order: {offsets:?}"
            );
        }
        let mut all = offsets.clone();
        all.sort_unstable();
        assert_eq!(
            all,
            (1..=6).collect::<Vec<_>>(),
            "every message once, own node's included: {offsets:?}"
        );
    }
}

async fn reads_serve_history_and_exact_recovery(backend: &dyn Backend) {
    let nodes = join_all(backend, "history", &["a", "b"]).await;
    let ns = namespace();
    let (a, b) = (&nodes[0].bus, &nodes[1].bus);
    let empty = a.read(&ns, "conf:h", None, None).await.expect("read");
    assert_eq!(
        (empty.offset, empty.entries.len(), empty.complete),
        (0, 0, true)
    );
    let mut epoch = String::new();
    for i in 1..=7 {
        epoch = a
            .publish(&ns, "conf:h", &Payload::Text(format!("h{i}")), None)
            .await
            .expect("published")
            .epoch;
    }
    let offsets = |r: &crate::bus::LogRead| r.entries.iter().map(|e| e.offset).collect::<Vec<_>>();
    // The newest, within history-size (5).
    let all = b.read(&ns, "conf:h", None, None).await.expect("read");
    assert_eq!((all.epoch.as_str(), all.offset), (epoch.as_str(), 7));
    assert_eq!(offsets(&all), [3, 4, 5, 6, 7]);
    let last = b.read(&ns, "conf:h", None, Some(2)).await.expect("read");
    assert_eq!(offsets(&last), [6, 7]);
    let position = b.read(&ns, "conf:h", None, Some(0)).await.expect("read");
    assert_eq!((position.offset, position.entries.len()), (7, 0));
    // Recovery from a position: exactly what follows, or plainly incomplete.
    let since = |offset, epoch: &str| StreamPosition {
        offset,
        epoch: epoch.to_owned(),
    };
    let missed = b
        .read(&ns, "conf:h", Some(&since(4, &epoch)), None)
        .await
        .expect("read");
    assert!(missed.complete);
    assert_eq!(offsets(&missed), [5, 6, 7]);
    let limited = b
        .read(&ns, "conf:h", Some(&since(2, &epoch)), Some(2))
        .await
        .expect("read");
    assert!(limited.complete);
    assert_eq!(offsets(&limited), [3, 4]);
    let current = b
        .read(&ns, "conf:h", Some(&since(7, &epoch)), None)
        .await
        .expect("read");
    assert!(current.complete && current.entries.is_empty());
    for (gone, why) in [
        (since(1, &epoch), "older than the history"),
        (since(3, "another-epoch"), "another epoch"),
        (since(9, &epoch), "a position from the future"),
        (since(0, ""), "from the start, which is gone"),
    ] {
        let r = b
            .read(&ns, "conf:h", Some(&gone), None)
            .await
            .expect("read");
        assert!(!r.complete, "{why}: {r:?}");
        assert!(r.entries.is_empty(), "{why}");
    }
    let fresh = b
        .read(&ns, "conf:none", Some(&since(0, "")), None)
        .await
        .expect("read");
    assert!(fresh.complete, "nothing published: nothing missed");
    let lost = b
        .read(&ns, "conf:none", Some(&since(3, "e")), None)
        .await
        .expect("read");
    assert!(!lost.complete, "a position in a channel with no log");
}

async fn presence_and_joins_span_the_nodes(backend: &dyn Backend) {
    let nodes = join_all(backend, "presence", &["a", "b", "c"]).await;
    let member = |client: &str| Member {
        client: client.to_owned(),
        user: Some(format!("u-{client}")),
        info: None,
    };
    nodes[1]
        .node
        .members
        .lock()
        .insert("conf:p".into(), vec![member("b.1"), member("b.2")]);
    nodes[2]
        .node
        .members
        .lock()
        .insert("conf:p".into(), vec![member("c.1")]);
    let mut seen = nodes[0].bus.presence("conf:p").await.expect("presence");
    seen.sort_by(|x, y| x.client.cmp(&y.client));
    assert_eq!(seen, [member("b.1"), member("b.2"), member("c.1")]);

    let mut on_a = nodes[0].bus.watch("conf:p").await.expect("watch");
    let mut on_b = nodes[1].bus.watch("conf:p").await.expect("watch");
    nodes[1].bus.announce("conf:p", &member("b.3"), true);
    nodes[1].bus.announce("conf:p", &member("b.3"), false);
    let first = tokio::time::timeout(Duration::from_secs(5), on_a.next()).await;
    assert_eq!(
        first.expect("a join within 5 s"),
        Some(BusEvent::Join(member("b.3")))
    );
    let second = tokio::time::timeout(Duration::from_secs(5), on_a.next()).await;
    assert_eq!(
        second.expect("a leave within 5 s"),
        Some(BusEvent::Leave(member("b.3")))
    );
    // The announcing node does not hear itself.
    let own = tokio::time::timeout(Duration::from_millis(300), on_b.next()).await;
    assert!(own.is_err(), "the announcing node got {own:?}");
}

/// Starts a node of a backend's cluster for [`run_stall`]: joins `node` to
/// the cluster named by the first argument, its membership on the handle
/// given (connecting from there where the backend's I/O should run there
/// too); called on the node's own runtime. Returns what keeps it joined.
pub type StartOn = Arc<
    dyn Fn(
            String,
            Arc<StandInNode>,
            tokio::runtime::Handle,
        ) -> BoxFuture<'static, Box<dyn std::any::Any + Send>>
        + Send
        + Sync,
>;

/// The [`BeatThread`](crate::BeatThread)'s promise, on a backend: node `a`,
/// whose runtime is one thread, is stalled for five heartbeat timeouts by a
/// task that blocks that thread (as a long burst of client work would).
/// With its membership on a beat thread of its own, node `b` does not
/// report it lost and it does not fence itself; with its membership on its
/// stalled runtime, `b` reports it (so the stall is long enough to
/// matter). `timeout`: the heartbeat timeout `start` configures.
pub async fn run_stall(start: StartOn, timeout: Duration) {
    for own_beat_thread in [true, false] {
        let cluster = format!("stall-{own_beat_thread}-{:08x}", rand::random::<u32>());
        let runtime = crate::BeatThread::start("a-runtime").expect("a thread");
        let beats = own_beat_thread.then(|| crate::BeatThread::start("a-beats").expect("a thread"));
        let membership = beats.as_ref().unwrap_or(&runtime).handle().clone();
        let a = StandInNode::new("a");
        let _a = runtime
            .run((start)(cluster.clone(), a.clone(), membership))
            .await;
        let b = StandInNode::new("b");
        let _b = (start)(cluster, b.clone(), tokio::runtime::Handle::current()).await;
        // `b` judges once it has been connected for a timeout and a beat.
        tokio::time::sleep(timeout * 2).await;
        assert!(b.reports.lock().is_empty(), "nobody lost before the stall");
        let stall = timeout * 5;
        runtime
            .handle()
            .spawn(async move { std::thread::sleep(stall) });
        tokio::time::sleep(stall + timeout * 3).await;
        let reports = b.reports.lock().clone();
        if own_beat_thread {
            assert!(reports.is_empty(), "a was reported lost: {reports:?}");
            assert_eq!(*a.fences.lock(), 0, "a fenced itself");
        } else {
            assert!(
                reports.iter().any(|(node, _)| node == "a"),
                "with heartbeats on its stalled runtime, a was not reported: {reports:?}"
            );
        }
    }
}

/// Runs every check of a [`SessionStore`] (one that keeps at most
/// `max_messages` per session) against `store`; panics on the first
/// failure. Session ids are random, so a store may be used again.
pub async fn run_session_store(store: &dyn SessionStore, max_messages: usize) {
    use crate::sessions::StoreError;
    let id = format!("n1.{:016x}", rand::random::<u64>());
    let other = format!("n2.{:016x}", rand::random::<u64>());
    assert_eq!(store.get(&id).await, Ok(None));

    // Records: conditional writes by revision (0: none yet).
    let again = store.put(&id, Bytes::from_static(b"one"), Some(0)).await;
    assert!(again.is_ok(), "a first put expecting none: {again:?}");
    let again = store.put(&id, Bytes::from_static(b"one"), Some(0)).await;
    assert_eq!(again, Err(StoreError::Conflict));
    let r1 = store
        .put(&id, Bytes::from_static(b"one"), None)
        .await
        .expect("put");
    let r2 = store
        .put(&id, Bytes::from_static(b"two"), Some(r1))
        .await
        .expect("put at the revision");
    assert_ne!(r1, r2);
    let stale = store.put(&id, Bytes::from_static(b"old"), Some(r1)).await;
    assert_eq!(stale, Err(StoreError::Conflict));
    let got = store.get(&id).await.expect("get").expect("a record");
    assert_eq!((&got.record[..], got.revision), (&b"two"[..], r2));
    let r3 = store
        .put(&id, Bytes::from_static(b"three"), None)
        .await
        .expect("put");
    let ro = store
        .put(&other, Bytes::from_static(b"x"), None)
        .await
        .expect("put");
    let all = store.all().await.expect("all");
    let mine: Vec<_> = all.iter().filter(|r| r.id == id || r.id == other).collect();
    assert_eq!(mine.len(), 2, "{all:?}");
    assert!(mine
        .iter()
        .any(|r| r.id == id && &r.record[..] == b"three" && r.revision == r3));

    // Messages: in seq order, a seq kept once, the newest `max_messages`.
    let m = |seq: u64| {
        (
            seq,
            Bytes::from(format!("{{\"push\":\"direct\",\"seq\":{seq}}}")),
        )
    };
    store.append(&id, vec![m(1), m(2)]).await.expect("append");
    store
        .append(&id, vec![(2, Bytes::from_static(b"again")), m(3)])
        .await
        .expect("append");
    assert_eq!(
        store.messages(&id).await.expect("messages"),
        [m(1), m(2), m(3)]
    );
    assert_eq!(store.messages(&other).await.expect("messages"), []);
    let more: Vec<_> = (4..=max_messages as u64 + 5).map(m).collect();
    store.append(&id, more).await.expect("append");
    let kept = store.messages(&id).await.expect("messages");
    let newest: Vec<_> = (6..=max_messages as u64 + 5).map(m).collect();
    assert_eq!(kept, newest);

    // Removal, by the writer of the current revision only.
    assert_eq!(store.remove(&id, r1).await, Err(StoreError::Conflict));
    store.remove(&id, r3).await.expect("remove");
    assert_eq!(store.get(&id).await, Ok(None));
    assert_eq!(store.messages(&id).await.expect("messages"), []);
    store.remove(&other, ro).await.expect("remove");

    // A session removed can be written again as new.
    store
        .put(&id, Bytes::from_static(b"again"), Some(0))
        .await
        .expect("a record again after removal");
    let again = store.get(&id).await.expect("get").expect("a record");
    store.remove(&id, again.revision).await.expect("remove");
}

/// The in-memory backend, for [`run`]: one [`MemoryHub`] per cluster name.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    hubs: Mutex<HashMap<String, Arc<MemoryHub>>>,
}

impl MemoryBackend {
    fn hub(&self, cluster: &str) -> Arc<MemoryHub> {
        self.hubs
            .lock()
            .entry(cluster.to_owned())
            .or_default()
            .clone()
    }
}

impl Backend for MemoryBackend {
    fn join<'a>(
        &'a self,
        cluster: &'a str,
        node: Arc<StandInNode>,
        _namespaces: &'a [Namespace],
    ) -> BoxFuture<'a, Joined> {
        Box::pin(async move {
            let (c, bus) = self.hub(cluster).join(node.clone());
            Joined {
                node,
                cluster: c,
                bus,
                handle: Box::new(()),
            }
        })
    }

    fn kill(&self, cluster: &str, joined: Joined) -> BoxFuture<'_, ()> {
        let hub = self.hub(cluster);
        Box::pin(async move { hub.kill(joined.node.id()) })
    }

    fn settle(&self) -> Duration {
        Duration::from_millis(200)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterError;

    #[tokio::test]
    async fn a_cut_off_node_loses_its_lease_and_is_fenced_only_if_reported() {
        let hub = MemoryHub::new();
        let (a, b) = (StandInNode::new("a"), StandInNode::new("b"));
        let _ha = hub.join(a.clone());
        let (cb, _) = hub.join(b.clone());
        assert!(b.lease().is_held());

        // Cut off, back before anyone gave up: renewed, not fenced.
        hub.cut("b");
        assert!(!b.lease().is_held());
        let refused = cb.forward("a", Bytes::from_static(b"{}")).await;
        assert!(
            matches!(refused, Err(ClusterError::Unavailable(_))),
            "{refused:?}"
        );
        hub.restore("b").await;
        assert!(b.lease().is_held());
        assert_eq!((*b.fences.lock(), a.reports.lock().len()), (0, 0));

        // Cut off and reported: one report, and a fence on return.
        hub.cut("b");
        hub.report_lost("b");
        hub.report_lost("b");
        assert_eq!(a.reports.lock().len(), 1);
        assert_eq!(a.reports.lock()[0].0, "b");
        hub.restore("b").await;
        assert_eq!(*b.fences.lock(), 1);
        assert!(b.lease().is_held());
        assert!(cb.forward("a", Bytes::from_static(b"{}")).await.is_ok());
    }

    #[tokio::test]
    async fn the_conformance_suite_passes_in_memory() {
        run(&MemoryBackend::default()).await;
        run_session_store(&*crate::memory::MemorySessionStore::new(8), 8).await;
    }
}
