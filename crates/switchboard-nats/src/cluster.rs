//! [`NatsCluster`]: membership by heartbeats, command routing and lost-node
//! reports over NATS.
//!
//! - Every node publishes a [`Heartbeat`] on `<prefix>.nodes.heartbeat` every
//!   `cluster-heartbeat` and listens to everyone's. A node not heard from for
//!   `cluster-heartbeat-timeout` is dropped; one that announced `leaving`
//!   (end of a drain) is dropped at once.
//! - Commands for a connection of node N go to `<prefix>.node.N.control` as
//!   NATS requests, marked forwarded so N runs them itself. NATS answers "no
//!   responders" at once when N is gone, so those commands fail fast.
//! - The origin's commands arrive on `<prefix>.control` (a queue group: one
//!   node takes each) and on the per-node subjects.
//! - When a node is dropped without having left, each survivor tries to
//!   create the key `down.<node>.<instance>` in the JetStream key-value
//!   bucket `<prefix>_cluster`; the one that succeeds sends the origin the
//!   `node_down` event, so exactly one is sent cluster-wide. Without
//!   JetStream the live node with the smallest id sends it.
//! - While this node is cut off from NATS nobody is declared dead by it, and
//!   after it reconnects it waits a full timeout plus one heartbeat (the
//!   others reconnect too) before it judges again. Nor does it judge while
//!   its own heartbeats have not come back to it for half a timeout (it is
//!   starved of CPU or its messages are held up): everyone else's silence
//!   would be its own.
//! - A node that was cut off for longer than the timeout looks its own run
//!   up in the bucket when it is back; if another node reported it lost, it
//!   closes all its connections (1012) so that the origin's view (all gone)
//!   holds, and its clients reconnect and are announced afresh.

use crate::connect::Link;
use async_nats::jetstream::kv;
use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_proto::cluster::{Heartbeat, Subjects, FORWARDED_HEADER};
use switchboard_proto::control::{NodeInfo, STATUS_HEADER};
use switchboard_server::origin::BoxFuture;
use switchboard_server::{Cluster, ClusterError, CommandReply, LocalNode};
use tokio_util::sync::CancellationToken;

/// Pause before trying again to open the key-value bucket.
const BUCKET_RETRY: Duration = Duration::from_secs(60);

/// How long a dropped node is remembered (commands for it fail at once).
const GONE_MEMORY: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Member {
    beat: Heartbeat,
    last_seen: Instant,
    last_seen_ms: u64,
}

#[derive(Debug, Default)]
struct Membership {
    members: HashMap<String, Member>,
    /// Recently dropped nodes.
    gone: HashMap<String, Instant>,
}

/// The [`Cluster`] over NATS. Built by [`NatsCluster::start`].
#[derive(Debug)]
pub struct NatsCluster {
    client: Client,
    link: Arc<Link>,
    node: LocalNode,
    subjects: Subjects,
    /// Random id of this run; renewed when the node fences itself.
    instance: Mutex<String>,
    /// Lost node runs this node has reported (`node.instance`), so a run
    /// seen lost twice (it came back, then restarted) is reported once.
    reported: Mutex<std::collections::HashSet<String>>,
    /// A fence check is in flight.
    checking: std::sync::atomic::AtomicBool,
    membership: Mutex<Membership>,
    /// When this node last heard its own heartbeat back from NATS.
    own_heard: Mutex<Instant>,
    /// Made on first success.
    kv: tokio::sync::OnceCell<kv::Store>,
    /// After a failure to open the bucket: when to try again.
    bucket_retry_at: Mutex<Option<Instant>>,
    stop: CancellationToken,
    /// The heartbeat task, awaited by `leave` so no ordinary heartbeat can
    /// follow the `leaving` one.
    announcer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop_announcing: CancellationToken,
}

fn new_instance() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NatsCluster {
    /// Joins the cluster as `node`: subscribes to heartbeats and commands and
    /// starts announcing this node. Subscriptions are registered with the
    /// client at once and survive reconnects.
    pub async fn start(
        client: Client,
        link: Arc<Link>,
        node: LocalNode,
    ) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let subjects = Subjects::new(&node.config().nats_prefix);
        let beats = client.subscribe(subjects.heartbeat()).await?;
        let own = client
            .subscribe(subjects.node_control(node.id().as_str()))
            .await?;
        let shared = client
            .queue_subscribe(subjects.control(), Subjects::CONTROL_QUEUE.into())
            .await?;
        let cluster = Arc::new(Self {
            client,
            link,
            subjects,
            instance: Mutex::new(new_instance()),
            checking: std::sync::atomic::AtomicBool::new(false),
            reported: Mutex::new(Default::default()),
            membership: Mutex::new(Membership::default()),
            own_heard: Mutex::new(Instant::now()),
            kv: tokio::sync::OnceCell::new(),
            bucket_retry_at: Mutex::new(None),
            stop: CancellationToken::new(),
            announcer: Mutex::new(None),
            stop_announcing: CancellationToken::new(),
            node,
        });
        *cluster.announcer.lock() = Some(tokio::spawn(cluster.clone().announce()));
        tokio::spawn(cluster.clone().listen(beats));
        tokio::spawn(cluster.clone().serve(own));
        tokio::spawn(cluster.clone().serve(shared));
        tokio::spawn(cluster.clone().watch());
        // Make the bucket early so the first report does not wait for it.
        let early = cluster.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                if early.link.is_up() {
                    early.bucket().await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        tracing::info!(
            node = %cluster.node.id(),
            prefix = %cluster.node.config().nats_prefix,
            "joined the cluster over NATS"
        );
        Ok(cluster)
    }

    fn heartbeat(&self, leaving: bool) -> Bytes {
        let beat = Heartbeat {
            node: self.node.id().to_string(),
            instance: self.instance.lock().clone(),
            connections: self.node.connections(),
            draining: self.node.is_draining(),
            started_at_ms: self.node.started_at_ms(),
            leaving,
        };
        Bytes::from(serde_json::to_vec(&beat).expect("heartbeats serialize"))
    }

    /// Publishes this node's heartbeat every `cluster-heartbeat`.
    async fn announce(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.node.config().cluster_heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop_announcing.cancelled() => return,
            }
            if self.link.is_up() {
                let _ = self
                    .client
                    .publish(self.subjects.heartbeat(), self.heartbeat(false))
                    .await;
            }
        }
    }

    /// Records everyone's heartbeats.
    async fn listen(self: Arc<Self>, mut beats: async_nats::Subscriber) {
        loop {
            let msg = tokio::select! {
                m = beats.next() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            let Ok(beat) = serde_json::from_slice::<Heartbeat>(&msg.payload) else {
                tracing::debug!("unreadable heartbeat ignored");
                continue;
            };
            if beat.node == self.node.id().as_str() {
                if beat.instance == *self.instance.lock() {
                    *self.own_heard.lock() = Instant::now();
                } else {
                    tracing::error!(
                        node = %beat.node,
                        "another process announces this node id: node ids must be unique in a cluster"
                    );
                }
                continue;
            }
            self.record(beat);
        }
    }

    fn record(self: &Arc<Self>, beat: Heartbeat) {
        let mut m = self.membership.lock();
        if beat.leaving {
            if m.members.remove(&beat.node).is_some() {
                tracing::info!(node = %beat.node, "node left the cluster");
            }
            m.gone.insert(beat.node, Instant::now());
            return;
        }
        m.gone.remove(&beat.node);
        let member = Member {
            last_seen: Instant::now(),
            last_seen_ms: now_ms(),
            beat,
        };
        let node = member.beat.node.clone();
        match m.members.insert(node.clone(), member) {
            None => tracing::info!(node = %node, "node joined the cluster"),
            Some(old) if old.beat.instance != m.members[&node].beat.instance => {
                // Restarted under the same id without leaving: the previous
                // run's connections are gone.
                tracing::warn!(node = %node, "node restarted without draining");
                let (instance, seen) = (old.beat.instance, old.last_seen_ms);
                tokio::spawn(self.clone().report_down(node, instance, seen));
            }
            Some(_) => {}
        }
    }

    /// Drops nodes not heard from in time, and forgets long-gone ones.
    async fn watch(self: Arc<Self>) {
        let cfg = self.node.config();
        let (beat, timeout) = (cfg.cluster_heartbeat, cfg.cluster_heartbeat_timeout);
        let mut tick = tokio::time::interval(beat / 2);
        let mut last_check = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop.cancelled() => return,
            }
            // Was this node reported lost (cut off, or partitioned without
            // noticing)? Checked once per timeout while connected.
            if self.link.is_up() && last_check.elapsed() >= timeout {
                last_check = Instant::now();
                if !self
                    .checking
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    tokio::spawn(self.clone().fence_if_reported());
                }
            }
            // Judge only after having been connected long enough to hear
            // from every live node, and only while this node hears its own
            // heartbeats: one that does not (starved of CPU, or its
            // messages held up) would take everyone else's silence for
            // their death and fence them all.
            if self.link.up_for() < timeout + beat || self.own_heard.lock().elapsed() > timeout / 2
            {
                continue;
            }
            let mut dead = Vec::new();
            {
                let mut m = self.membership.lock();
                let now = Instant::now();
                m.members.retain(|node, member| {
                    let alive = now.duration_since(member.last_seen) <= timeout;
                    if !alive {
                        dead.push((
                            node.clone(),
                            member.beat.instance.clone(),
                            member.last_seen_ms,
                        ));
                    }
                    alive
                });
                for (node, ..) in &dead {
                    m.gone.insert(node.clone(), now);
                }
                m.gone.retain(|_, at| now.duration_since(*at) < GONE_MEMORY);
            }
            for (node, instance, seen) in dead {
                tracing::warn!(node = %node, "node stopped sending heartbeats; dropped from the cluster");
                tokio::spawn(self.clone().report_down(node, instance, seen));
            }
        }
    }

    /// The key-value bucket used to agree on who reports a lost node, or
    /// `None` without JetStream. After a failure it is not tried again for
    /// [`BUCKET_RETRY`] (a NATS without JetStream stays so), and only the
    /// first failure is a warning.
    async fn bucket(&self) -> Option<&kv::Store> {
        if let Some(store) = self.kv.get() {
            return Some(store);
        }
        if self
            .bucket_retry_at
            .lock()
            .is_some_and(|t| Instant::now() < t)
        {
            return None;
        }
        self.kv
            .get_or_try_init(|| async {
                let js = async_nats::jetstream::new(self.client.clone());
                let bucket = self.subjects.kv_bucket();
                // The bucket's stream is made directly rather than with
                // `create_key_value`, which first reads account limits in a
                // shape NATS servers before 2.10 do not answer with.
                let stream = async_nats::jetstream::stream::Config {
                    name: format!("KV_{bucket}"),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    description: Some("Switchboard cluster: lost-node reports".into()),
                    max_messages_per_subject: 1,
                    max_age: Duration::from_secs(24 * 3600),
                    discard: async_nats::jetstream::stream::DiscardPolicy::New,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    ..Default::default()
                };
                let made = tokio::time::timeout(Duration::from_secs(2), async {
                    if let Ok(store) = js.get_key_value(&bucket).await {
                        return Ok(store);
                    }
                    let created = js.get_or_create_stream(stream).await;
                    js.get_key_value(&bucket).await.map_err(|e| match created {
                        Err(c) => format!("{c}; {e}"),
                        Ok(_) => e.to_string(),
                    })
                })
                .await;
                match made {
                    Ok(Ok(store)) => Ok(store),
                    other => {
                        let why = match other {
                            Ok(Err(e)) => e,
                            _ => "timed out".into(),
                        };
                        let first = self
                            .bucket_retry_at
                            .lock()
                            .replace(Instant::now() + BUCKET_RETRY)
                            .is_none();
                        if first {
                            tracing::warn!(error = %why, "no JetStream key-value store: the live node with the smallest id reports lost nodes (retried every minute)");
                        } else {
                            tracing::debug!(error = %why, "JetStream key-value store still unavailable");
                        }
                        Err(())
                    }
                }
            })
            .await
            .ok()
    }

    /// Reports `node` (run `instance`) lost to the origin if this node wins
    /// the right to.
    async fn report_down(self: Arc<Self>, node: String, instance: String, last_seen_ms: u64) {
        if self.reported.lock().contains(&format!("{node}.{instance}")) {
            return;
        }
        let won = match self.bucket().await {
            Some(store) => {
                let key = format!("down.{node}.{instance}");
                let me = Bytes::from(self.node.id().to_string());
                match store.create(&key, me.clone()).await {
                    Ok(_) => true,
                    // A lost acknowledgement of our own create also ends
                    // here: the key then holds our id (and `reported` does
                    // not have it yet).
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        matches!(store.get(&key).await, Ok(Some(v)) if v == me)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot record the lost node; deciding by smallest node id");
                        self.smallest_live()
                    }
                }
            }
            None => self.smallest_live(),
        };
        if won && self.reported.lock().insert(format!("{node}.{instance}")) {
            self.node.report_node_down(&node, &instance, last_seen_ms);
        }
    }

    /// After a long cut-off: if the cluster reported this run lost, close
    /// every connection (see the module doc).
    async fn fence_if_reported(self: Arc<Self>) {
        let reported = match tokio::time::timeout(Duration::from_secs(2), async {
            let store = self.bucket().await?;
            let key = format!("down.{}.{}", self.node.id(), self.instance.lock().clone());
            store.get(&key).await.ok().flatten()
        })
        .await
        {
            Ok(Some(by)) => Some(by),
            _ => None,
        };
        if let Some(by) = reported {
            // A new run: if this node is lost again, that is a new report.
            *self.instance.lock() = new_instance();
            tracing::warn!(
                reported_by = %String::from_utf8_lossy(&by),
                "this node was reported lost while cut off from NATS; closing its connections so clients reconnect"
            );
            let closed = self.node.close_all().await;
            tracing::info!(closed, "connections closed after the lost-node report");
        }
        self.checking
            .store(false, std::sync::atomic::Ordering::Release);
    }

    fn smallest_live(&self) -> bool {
        let me = self.node.id().as_str();
        self.membership
            .lock()
            .members
            .keys()
            .all(|other| me < other.as_str())
    }

    /// Answers commands arriving on `sub`.
    async fn serve(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            tokio::spawn(self.clone().answer(msg));
        }
    }

    async fn answer(self: Arc<Self>, msg: Message) {
        let Some(reply_to) = msg.reply else {
            tracing::debug!(subject = %msg.subject, "command without a reply subject ignored");
            return;
        };
        let forwarded = msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(FORWARDED_HEADER).is_some());
        let reply = self.node.execute(&msg.payload, forwarded).await;
        let mut headers = HeaderMap::new();
        headers.insert(STATUS_HEADER, reply.status.to_string().as_str());
        if let Err(e) = self
            .client
            .publish_with_headers(reply_to, headers, reply.body)
            .await
        {
            tracing::warn!(error = %e, "command reply not sent");
        }
    }
}

impl Cluster for NatsCluster {
    fn forward(
        &self,
        node: &str,
        command: Bytes,
    ) -> BoxFuture<'_, Result<CommandReply, ClusterError>> {
        let node = node.to_owned();
        Box::pin(async move {
            if !self.link.is_up() {
                return Err(ClusterError::Unavailable("not connected to NATS".into()));
            }
            if self.membership.lock().gone.contains_key(&node) {
                return Err(ClusterError::NodeGone(node));
            }
            let mut headers = HeaderMap::new();
            headers.insert(FORWARDED_HEADER, self.node.id().as_str());
            let subject = self.subjects.node_control(&node);
            let timeout = self.node.config().cluster_request_timeout;
            let request = self.client.request_with_headers(subject, headers, command);
            let msg = match tokio::time::timeout(timeout, request).await {
                Err(_) => return Err(ClusterError::Timeout(node)),
                Ok(Err(e)) => {
                    return Err(match e.kind() {
                        async_nats::RequestErrorKind::NoResponders => ClusterError::NodeGone(node),
                        async_nats::RequestErrorKind::TimedOut => ClusterError::Timeout(node),
                        async_nats::RequestErrorKind::MaxPayloadExceeded => {
                            ClusterError::TooLarge(e.to_string())
                        }
                        _ => ClusterError::Unavailable(e.to_string()),
                    })
                }
                Ok(Ok(msg)) => msg,
            };
            let status =
                crate::reply_status(msg.headers.as_ref()).map_err(ClusterError::Unavailable)?;
            Ok(CommandReply {
                status,
                body: msg.payload,
            })
        })
    }

    fn peers(&self) -> Vec<NodeInfo> {
        self.membership
            .lock()
            .members
            .values()
            .map(|m| NodeInfo {
                node: m.beat.node.clone(),
                connections: m.beat.connections,
                draining: m.beat.draining,
                started_at_ms: m.beat.started_at_ms,
                last_seen_ms: m.last_seen_ms,
                is_self: false,
            })
            .collect()
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stop_announcing.cancel();
            let announcer = self.announcer.lock().take();
            if let Some(task) = announcer {
                let _ = task.await;
            }
            if self.link.is_up() {
                let _ = self
                    .client
                    .publish(self.subjects.heartbeat(), self.heartbeat(true))
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
            }
            self.stop.cancel();
            tracing::info!("left the cluster");
        })
    }
}
