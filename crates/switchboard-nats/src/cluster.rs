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
//! - Leases (fencing): each heartbeat carries a sequence number; when a
//!   node hears one of its own back, it renews its lease
//!   ([`switchboard_backend::Lease`]) until half a timeout after that
//!   heartbeat was sent. Nobody declares it lost before a full timeout after
//!   that send, so once the lease has run out the node holds its origin
//!   events, refuses new clients and answers commands for its connections
//!   503 — before anyone may have reported it.
//! - When its heartbeats come back after the lease ran out and a report
//!   was possible (a timeout, less one heartbeat, since the newest heartbeat
//!   it had heard back), the node waits one heartbeat, then looks up whether
//!   its run was reported: the key `down.<node>.<instance>` in the bucket,
//!   or without the bucket a request on `<prefix>.nodes.reported` that only
//!   the reporting node answers. Reported: it fences itself
//!   ([`Node::fence`]: events about its connections dropped, clients
//!   closed with 1012 without `disconnect`s) and starts a new run (new
//!   `instance`). Not reported: the lease is renewed and the held events
//!   leave in order.
//! - Once per timeout while connected, a node also looks its own run up in
//!   the bucket, for the case where it heard itself but the others did not.
//! - Membership (sending heartbeats, hearing everyone's, judging silence,
//!   reports and fence checks) runs on the [`BeatThread`] given to
//!   [`NatsCluster::start`] ([`BeatConnection`]), over a NATS connection of its
//!   own made from that thread, so neither client work on the node's
//!   runtime nor channel traffic on the node's main connection can delay a
//!   heartbeat. Commands, lost-node reports in the bucket, and what the node
//!   does when told of a lost node or of its own fence, run on the runtime
//!   that called `start`, over the main connection.
//!
//! [`BeatThread`]: switchboard_backend::BeatThread

use crate::connect::Link;
use crate::NatsConfig;
use async_nats::jetstream::kv;
use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_backend::{BoxFuture, Cluster, ClusterError, CommandReply, Node};
use switchboard_proto::cluster::{Heartbeat, Subjects, FORWARDED_HEADER};
use switchboard_proto::control::{NodeInfo, STATUS_HEADER};
use tokio_util::sync::CancellationToken;

/// How long a leaving node keeps answering the commands already delivered
/// to it.
const LAST_ANSWERS: Duration = Duration::from_millis(500);

/// Pause before trying again to open the key-value bucket.
const BUCKET_RETRY: Duration = Duration::from_secs(60);

/// How many heartbeats sent are remembered to match them when they come back.
const SENT_MEMORY: usize = 64;

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

/// Where a node's membership runs: a NATS connection made from the beat
/// thread (so its I/O runs there too) and that thread's runtime.
#[derive(Debug, Clone)]
pub struct BeatConnection {
    /// The connection heartbeats go out and come in on.
    pub client: Client,
    /// Its state.
    pub link: Arc<Link>,
    /// The beat thread's runtime (a test may pass the current one).
    pub runtime: tokio::runtime::Handle,
}

/// The [`Cluster`] over NATS. Built by [`NatsCluster::start`].
#[derive(Debug)]
pub struct NatsCluster {
    /// The main connection: commands, reports, look-ups.
    client: Client,
    link: Arc<Link>,
    /// The membership's connection: heartbeats only.
    beat: Client,
    beat_link: Arc<Link>,
    node: Arc<dyn Node>,
    config: NatsConfig,
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
    /// Runs of this node ended by a fence.
    retired: Mutex<std::collections::HashSet<String>>,
    /// Sequence number of the last heartbeat sent.
    seq: std::sync::atomic::AtomicU64,
    /// Recent heartbeats sent: sequence number and when.
    sent: Mutex<std::collections::VecDeque<(u64, Instant)>>,
    /// Heartbeats confirmed for the lease (heard back).
    renewals: switchboard_backend::Renewals,
    /// Made on first success.
    kv: tokio::sync::OnceCell<kv::Store>,
    /// After a failure to open the bucket: when to try again.
    bucket_retry_at: Mutex<Option<Instant>>,
    stop: CancellationToken,
    /// The heartbeat task, awaited by `leave` so no ordinary heartbeat can
    /// follow the `leaving` one.
    announcer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The tasks answering commands: a leaving node waits for them to
    /// answer the requests already on their way.
    servers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Stopped as by a crash ([`NatsCluster::halt`]): nothing more answered.
    halted: std::sync::atomic::AtomicBool,
    stop_announcing: CancellationToken,
    /// The node's runtime (the caller of `start`): commands and calls into
    /// the node that start work run there, not on the beat thread.
    work: tokio::runtime::Handle,
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
    /// client at once and survive reconnects. Membership runs on
    /// `membership` (see the module doc; a test may pass the main
    /// connection and the current runtime), commands on the runtime this is
    /// called from.
    pub async fn start(
        client: Client,
        link: Arc<Link>,
        node: Arc<dyn Node>,
        config: NatsConfig,
        membership: BeatConnection,
    ) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let subjects = Subjects::new(&config.prefix);
        let heard = membership.client.subscribe(subjects.heartbeat()).await?;
        let own = client.subscribe(subjects.node_control(node.id())).await?;
        let shared = client
            .queue_subscribe(subjects.control(), Subjects::CONTROL_QUEUE.into())
            .await?;
        let reported_asks = client.subscribe(subjects.reported()).await?;
        let beats = membership.runtime;
        let cluster = Arc::new(Self {
            client,
            link,
            beat: membership.client,
            beat_link: membership.link,
            subjects,
            instance: Mutex::new(new_instance()),
            checking: std::sync::atomic::AtomicBool::new(false),
            reported: Mutex::new(Default::default()),
            membership: Mutex::new(Membership::default()),
            own_heard: Mutex::new(Instant::now()),
            retired: Mutex::new(Default::default()),
            seq: std::sync::atomic::AtomicU64::new(0),
            sent: Mutex::new(std::collections::VecDeque::new()),
            renewals: Default::default(),
            kv: tokio::sync::OnceCell::new(),
            bucket_retry_at: Mutex::new(None),
            stop: CancellationToken::new(),
            announcer: Mutex::new(None),
            servers: Mutex::new(Vec::new()),
            halted: std::sync::atomic::AtomicBool::new(false),
            stop_announcing: CancellationToken::new(),
            work: tokio::runtime::Handle::current(),
            node,
            config,
        });
        *cluster.announcer.lock() = Some(beats.spawn(cluster.clone().announce()));
        beats.spawn(cluster.clone().listen(heard));
        *cluster.servers.lock() = vec![
            tokio::spawn(cluster.clone().serve(own)),
            tokio::spawn(cluster.clone().serve(shared)),
        ];
        beats.spawn(cluster.clone().watch());
        tokio::spawn(cluster.clone().answer_reported(reported_asks));
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
            prefix = %cluster.config.prefix,
            "joined the cluster over NATS"
        );
        Ok(cluster)
    }

    fn heartbeat(&self, leaving: bool, seq: u64) -> Bytes {
        let beat = Heartbeat {
            seq,
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
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop_announcing.cancelled() => return,
            }
            if self.beat_link.is_up() {
                let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let sent_at = Instant::now();
                self.renewals.sending(sent_at);
                {
                    let mut sent = self.sent.lock();
                    sent.push_back((seq, sent_at));
                    while sent.len() > SENT_MEMORY {
                        sent.pop_front();
                    }
                }
                // From the first announcement of a run on, the others may
                // declare it lost: the lease binds (see the module doc).
                let lease = self.node.lease();
                if lease.remaining().is_none() && !lease.is_fencing() {
                    lease.renew_until(sent_at + self.lease_span());
                }
                let _ = self
                    .beat
                    .publish(self.subjects.heartbeat(), self.heartbeat(false, seq))
                    .await;
            }
        }
    }

    /// How long the lease runs after a heartbeat is sent: half the heartbeat
    /// timeout, so it runs out at least half a timeout before anyone may
    /// declare this node lost.
    fn lease_span(&self) -> Duration {
        self.config.heartbeat_timeout / 2
    }

    /// One of this run's heartbeats, sent at `sent_at`, came back: renew the
    /// lease, unless it ran out so long ago that the cluster may have
    /// reported this node lost; then look that up first.
    fn own_beat_back(self: &Arc<Self>, sent_at: Instant) {
        let cfg = &self.config;
        let confirmed = self.renewals.confirmed(
            self.node.lease(),
            sent_at,
            self.lease_span(),
            cfg.heartbeat,
            cfg.heartbeat_timeout,
        );
        if confirmed == switchboard_backend::Confirmed::LookUp {
            tracing::warn!(
                "this node's lease ran out while it was cut off from NATS; holding origin events until it knows whether it was reported lost"
            );
            tokio::spawn(self.clone().resolve_suspicion());
        }
    }

    /// After a cut-off long enough to have been reported lost: looks the
    /// report up, then fences the node or renews its lease.
    async fn resolve_suspicion(self: Arc<Self>) {
        let cfg = &self.config;
        // Reports decided just before this node's heartbeats came back land
        // within a heartbeat.
        tokio::time::sleep(cfg.heartbeat).await;
        let instance = self.instance.lock().clone();
        loop {
            match self.was_reported(&instance).await {
                Some(true) => {
                    self.fence(&instance).await;
                    break;
                }
                Some(false) => {
                    self.renewals
                        .renew_latest(self.node.lease(), self.lease_span());
                    tracing::info!("this node was not reported lost; lease renewed, held origin events leave now");
                    break;
                }
                None => tokio::time::sleep(cfg.heartbeat).await,
            }
        }
        self.renewals.looked_up();
    }

    /// Whether the cluster reported this run lost: the bucket's key if the
    /// bucket is there, else the answer of the node that reported it (see
    /// [`Subjects::reported`]). `None`: cannot tell now (not connected).
    async fn was_reported(&self, instance: &str) -> Option<bool> {
        if !self.link.is_up() {
            return None;
        }
        let run = format!("{}.{instance}", self.node.id());
        if let Some(store) = self.bucket().await {
            let key = format!("down.{run}");
            match tokio::time::timeout(Duration::from_secs(2), store.get(&key)).await {
                Ok(Ok(found)) => return Some(found.is_some()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the lost-node reports; asking the other nodes")
                }
                Err(_) => tracing::warn!(
                    "reading the lost-node reports timed out; asking the other nodes"
                ),
            }
        }
        let ask = self
            .client
            .request(self.subjects.reported(), Bytes::from(run.into_bytes()));
        match tokio::time::timeout(self.config.request_timeout, ask).await {
            Ok(Ok(_)) => Some(true),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Some(false),
            // Only a node that reported this run answers.
            Err(_) => Some(false),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => Some(false),
            Ok(Err(_)) => None,
        }
    }

    /// Answers "was this run reported?" when this node reported it.
    async fn answer_reported(self: Arc<Self>, mut asks: async_nats::Subscriber) {
        loop {
            let msg = tokio::select! {
                m = asks.next() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            let run = String::from_utf8_lossy(&msg.payload).into_owned();
            let reported = self.reported.lock().contains(&run);
            if let (true, Some(reply)) = (reported, msg.reply) {
                let me = Bytes::from(self.node.id().to_string());
                let _ = self.client.publish(reply, me).await;
            }
        }
    }

    /// The cluster reported the run `instance` lost: a new run, and the node
    /// fences itself (see [`Node::fence`]), unless that run is over
    /// already (a second finding of the same report).
    async fn fence(&self, instance: &str) {
        {
            let mut current = self.instance.lock();
            if *current != instance {
                return;
            }
            // A new run: if this node is lost again, that is a new report,
            // and heartbeats sent meanwhile do not revive the old one.
            let old = std::mem::replace(&mut *current, new_instance());
            self.retired.lock().insert(old);
        }
        self.sent.lock().clear();
        self.renewals.new_run();
        tracing::warn!(
            "this node was reported lost while cut off; fencing: closing its connections without events so clients reconnect"
        );
        let Some(closed) = switchboard_backend::beat::fence_on(&self.work, self.node.clone()).await
        else {
            return;
        };
        tracing::info!(closed, "fence over; serving as a new run");
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
            if beat.node == self.node.id() {
                if beat.instance == *self.instance.lock() {
                    *self.own_heard.lock() = Instant::now();
                    let sent_at = self
                        .sent
                        .lock()
                        .iter()
                        .find(|(seq, _)| *seq == beat.seq)
                        .map(|(_, at)| *at);
                    if let Some(sent_at) = sent_at {
                        self.own_beat_back(sent_at);
                    }
                } else if self.retired.lock().contains(&beat.instance) {
                    // Our own heartbeat from before a fence, late.
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
                let run = (old.beat.instance, old.beat.started_at_ms, old.last_seen_ms);
                tokio::spawn(self.clone().report_down(node, run));
            }
            Some(_) => {}
        }
    }

    /// Drops nodes not heard from in time, and forgets long-gone ones.
    async fn watch(self: Arc<Self>) {
        let cfg = &self.config;
        let (beat, timeout) = (cfg.heartbeat, cfg.heartbeat_timeout);
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
            if self.beat_link.up_for() < timeout + beat
                || self.own_heard.lock().elapsed() > timeout / 2
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
                            (
                                member.beat.instance.clone(),
                                member.beat.started_at_ms,
                                member.last_seen_ms,
                            ),
                        ));
                    }
                    alive
                });
                for (node, ..) in &dead {
                    m.gone.insert(node.clone(), now);
                }
                m.gone.retain(|_, at| now.duration_since(*at) < GONE_MEMORY);
            }
            for (node, run) in dead {
                tracing::warn!(node = %node, "node stopped sending heartbeats; dropped from the cluster");
                tokio::spawn(self.clone().report_down(node, run));
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

    /// Reports `node` lost to the origin if this node wins the right to.
    /// `run`: the lost run's instance, when it started and when it was
    /// last heard from (Unix ms).
    async fn report_down(self: Arc<Self>, node: String, run: (String, u64, u64)) {
        let (instance, started_at_ms, last_seen_ms) = run;
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
            // What the node starts for the report runs on its own runtime.
            let _work = self.work.enter();
            self.node
                .report_node_down(&node, &instance, started_at_ms, last_seen_ms);
        }
    }

    /// After a long cut-off: if the cluster reported this run lost, close
    /// every connection (see the module doc).
    async fn fence_if_reported(self: Arc<Self>) {
        let instance = self.instance.lock().clone();
        let reported = match tokio::time::timeout(Duration::from_secs(2), async {
            let store = self.bucket().await?;
            let key = format!("down.{}.{instance}", self.node.id());
            store.get(&key).await.ok().flatten()
        })
        .await
        {
            Ok(Some(by)) => Some(by),
            _ => None,
        };
        if let Some(by) = reported {
            tracing::warn!(
                reported_by = %String::from_utf8_lossy(&by),
                "this node was reported lost"
            );
            self.fence(&instance).await;
        }
        self.checking
            .store(false, std::sync::atomic::Ordering::Release);
    }

    fn smallest_live(&self) -> bool {
        let me = self.node.id();
        self.membership
            .lock()
            .members
            .keys()
            .all(|other| me < other.as_str())
    }

    /// Answers commands arriving on `sub`. Once stopped, it drains the
    /// subscription (new requests then find no responder at once, and their
    /// senders look elsewhere) and answers the requests already on their
    /// way, rather than leave them to time out.
    async fn serve(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => break,
            };
            tokio::spawn(self.clone().answer(msg));
        }
        let halted = self.halted.load(std::sync::atomic::Ordering::Relaxed);
        // Drained, not just unsubscribed: requests already on their way to
        // this subscription are still delivered, and answered below.
        if halted || !self.link.is_up() || sub.drain().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(LAST_ANSWERS, async {
            while let Some(msg) = sub.next().await {
                self.clone().answer(msg).await;
            }
        })
        .await;
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

impl NatsCluster {
    /// Stops every task at once without announcing `leaving`, as a crash
    /// would: the others report this node lost after the heartbeat timeout.
    /// For tests and embedders that tear a node down; a node that drains
    /// calls [`Cluster::leave`] instead.
    pub fn halt(&self) {
        self.halted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.stop_announcing.cancel();
        self.stop.cancel();
    }
}

impl Cluster for NatsCluster {
    fn forward_timeout(&self) -> std::time::Duration {
        self.config.request_timeout
    }

    fn forward(
        &self,
        node: &str,
        command: Bytes,
    ) -> BoxFuture<'_, Result<CommandReply, ClusterError>> {
        self.forward_within(node, command, self.config.request_timeout)
    }

    fn forward_within(
        &self,
        node: &str,
        command: Bytes,
        timeout: std::time::Duration,
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
            headers.insert(FORWARDED_HEADER, self.node.id());
            let subject = self.subjects.node_control(&node);
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
            .map(|m| m.beat.peer_info(m.last_seen_ms))
            .collect()
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stop_announcing.cancel();
            let announcer = self.announcer.lock().take();
            if let Some(task) = announcer {
                let _ = task.await;
            }
            if self.beat_link.is_up() {
                let _ = self
                    .beat
                    .publish(
                        self.subjects.heartbeat(),
                        self.heartbeat(
                            true,
                            self.seq.load(std::sync::atomic::Ordering::Relaxed) + 1,
                        ),
                    )
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(1), self.beat.flush()).await;
            }
            self.stop.cancel();
            let servers = std::mem::take(&mut *self.servers.lock());
            let _ =
                tokio::time::timeout(LAST_ANSWERS, futures_util::future::join_all(servers)).await;
            tracing::info!("left the cluster");
        })
    }
}
