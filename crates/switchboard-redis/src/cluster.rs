//! [`RedisCluster`]: membership by expiring keys, command routing and
//! lost-node reports over Redis.
//!
//! - **Membership.** Every `cluster-heartbeat` a node writes its heartbeat
//!   (the JSON of [`Heartbeat`]) to its key `{<prefix>}:node:<id>` with a
//!   time to live of `cluster-heartbeat-timeout`, and adds its id to the
//!   sorted set `{<prefix>}:nodes`. Every half heartbeat it reads every
//!   node's key. A key that expired belongs to a node that has not written
//!   for a whole timeout *by Redis's clock*: the node is lost. A node that
//!   announced `leaving` (end of a drain) is dropped at once.
//! - **No false losses.** A node is judged lost only when its key is gone
//!   *and* this node has not seen it change for a timeout (a Redis that
//!   restarted empty has lost every key at once, and they come back within
//!   a heartbeat). After its own reads failed, a node waits a timeout plus
//!   a heartbeat before it judges again (the others are reconnecting too).
//!   A node starved of CPU judges nobody wrongly: the keys it reads were
//!   kept alive by their owners meanwhile.
//! - **One report.** Each survivor that finds a node lost tries `SET
//!   {<prefix>}:down:<node>:<instance> <itself> NX`; the one that creates
//!   it sends the origin the `node_down` event. A node that leaves writes
//!   that key itself (`left`), so nobody reports it.
//! - **Commands.** A command for a connection of node N is published on
//!   `<prefix>:node:N:control` with the asker's reply channel and a request
//!   id; N answers on `<prefix>:reply:<asker>:<run>`. Redis says how many
//!   subscribers a publish reached: none means N is gone, at once.
//! - **Lease (fencing).** When Redis accepts a heartbeat, the lease is
//!   renewed until half a timeout after it was *sent*: nobody can find the
//!   key expired before a full timeout after that. When a heartbeat is
//!   accepted again after the lease ran out long enough for a report, the
//!   node waits a heartbeat, then reads its own `down` key: there, it fences
//!   itself ([`Node::fence`]) and starts a new run; not there, the lease is
//!   renewed and held events leave in order. Once per timeout it also reads
//!   that key anyway.
//! - **Data loss.** Each heartbeat also reads `{<prefix>}:generation`, a
//!   random value the first node writes, and Redis's `run_id`: when either
//!   changes, Redis may have lost data (flushed, restarted from an older
//!   snapshot or empty, failed over to a replica), and the session store
//!   asks every node to write its sessions again ([`crate::Redis::losses`]).
//! - **Connections.** Heartbeats and membership reads use their own
//!   connection; the subscribing connection is pinged with each heartbeat,
//!   and the link counts as up only while both answer.
//! - **Thread.** Heartbeats and membership reads run on the node's
//!   [`BeatThread`](switchboard_backend::BeatThread), over the membership
//!   connection (first used there, so its I/O runs there too), where client
//!   work on the node's runtime cannot delay them (a key that expires
//!   because a busy node wrote it late would report a healthy node lost).
//!   Commands, channel traffic and the subscribing connection's checks stay
//!   on the node's runtime.

use crate::connect::{Redis, Subscription};
use crate::keys::{frame, unframe, Keys};
use crate::RedisConfig;
use bytes::Bytes;
use parking_lot::Mutex;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_backend::{
    BoxFuture, Cluster, ClusterError, CommandReply, Confirmed, Node, Renewals,
};
use switchboard_proto::cluster::Heartbeat;
use switchboard_proto::control::NodeInfo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a leaving node keeps answering the commands already sent to it.
const LAST_ANSWERS: Duration = Duration::from_millis(500);

/// How long a dropped node is remembered (commands for it fail at once).
const GONE_MEMORY: Duration = Duration::from_secs(600);

/// How long a lost-node report is kept in Redis.
const REPORT_TTL_SECS: u64 = 24 * 3600;

/// What a command or request carries besides its body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    /// Request id, unique per asking run.
    pub(crate) id: u64,
    /// Where to answer.
    pub(crate) reply: String,
    /// The asking node.
    pub(crate) from: String,
}

/// What an answer carries besides its body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub(crate) id: u64,
    pub(crate) status: u16,
}

#[derive(Debug)]
struct Member {
    beat: Heartbeat,
    /// When its heartbeat was last seen to change.
    changed: Instant,
    last_seen_ms: u64,
}

#[derive(Debug, Default)]
struct Membership {
    members: HashMap<String, Member>,
    /// Recently dropped nodes.
    gone: HashMap<String, Instant>,
}

/// The [`Cluster`] over Redis. Built by [`RedisCluster::start`].
#[derive(Debug)]
pub struct RedisCluster {
    redis: Redis,
    keys: Keys,
    node: Arc<dyn Node>,
    config: RedisConfig,
    /// Random id of this run; renewed when the node fences itself.
    instance: Mutex<String>,
    /// Runs of this node ended by a fence.
    retired: Mutex<HashSet<String>>,
    /// Where answers to this process's requests arrive.
    reply_channel: String,
    /// Lost node runs this node has reported (`node.instance`).
    reported: Mutex<HashSet<String>>,
    membership: Mutex<Membership>,
    /// No judging before this (after this node's reads failed).
    judge_after: Mutex<Instant>,
    /// Sequence number of the last heartbeat sent.
    seq: AtomicU64,
    /// Heartbeats confirmed for the lease (accepted by Redis).
    renewals: Renewals,
    /// A fence check is in flight.
    checking: AtomicBool,
    /// The subscribing connection answered its last check.
    subscriber_ok: AtomicBool,
    /// Requests waiting for answers, by id.
    pending: Mutex<HashMap<u64, mpsc::Sender<(u16, Bytes)>>>,
    next_request: AtomicU64,
    stop: CancellationToken,
    stop_announcing: CancellationToken,
    announcer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Stopped as by a crash ([`RedisCluster::halt`]).
    halted: AtomicBool,
    /// The node's runtime (the caller of `start`): commands and calls into
    /// the node that start work run there, not on the beat thread.
    work: tokio::runtime::Handle,
}

fn new_instance() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RedisCluster {
    /// Joins the cluster as `node`: starts announcing it, reading the
    /// others' keys and answering commands. Works while Redis is away (it
    /// keeps trying).
    /// Membership (heartbeats, reading the others' keys) runs on `beats`,
    /// the node's [`switchboard_backend::BeatThread`] (a test may pass the
    /// current runtime's handle); commands and the subscribing connection's
    /// checks on the runtime this is called from.
    pub fn start(
        redis: Redis,
        node: Arc<dyn Node>,
        config: RedisConfig,
        beats: &tokio::runtime::Handle,
    ) -> Arc<Self> {
        let keys = Keys::new(&config.prefix);
        let cluster = Arc::new(Self {
            reply_channel: keys.replies(node.id(), &new_instance()),
            redis,
            keys,
            instance: Mutex::new(new_instance()),
            retired: Mutex::default(),
            reported: Mutex::default(),
            membership: Mutex::default(),
            judge_after: Mutex::new(Instant::now() + config.heartbeat_timeout + config.heartbeat),
            seq: AtomicU64::new(0),
            renewals: Renewals::default(),
            checking: AtomicBool::new(false),
            pending: Mutex::default(),
            subscriber_ok: AtomicBool::new(true),
            next_request: AtomicU64::new(1),
            stop: CancellationToken::new(),
            stop_announcing: CancellationToken::new(),
            announcer: Mutex::new(None),
            server: Mutex::new(None),
            halted: AtomicBool::new(false),
            work: tokio::runtime::Handle::current(),
            node,
            config,
        });
        *cluster.announcer.lock() = Some(beats.spawn(cluster.clone().announce()));
        *cluster.server.lock() = Some(tokio::spawn(cluster.clone().serve()));
        tokio::spawn(cluster.clone().collect_answers());
        // On the node's runtime: the subscribing connection's I/O runs
        // where it is first used, and channel traffic is not the beat
        // thread's.
        tokio::spawn(cluster.clone().check_subscriber());
        beats.spawn(cluster.clone().watch());
        tracing::info!(
            node = %cluster.node.id(),
            prefix = %cluster.config.prefix,
            "joined the cluster over Redis"
        );
        cluster
    }

    /// The node's Redis.
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn heartbeat(&self, leaving: bool, seq: u64) -> String {
        let beat = Heartbeat {
            seq,
            node: self.node.id().to_string(),
            instance: self.instance.lock().clone(),
            connections: self.node.connections(),
            draining: self.node.is_draining(),
            started_at_ms: self.node.started_at_ms(),
            leaving,
        };
        serde_json::to_string(&beat).expect("heartbeats serialize")
    }

    /// Writes this node's key; whether Redis took it.
    async fn write_beat(&self, beat: String, ttl: Duration) -> bool {
        let mut conn = self.redis.membership_conn();
        let generation = self.keys.generation();
        let written: redis::RedisResult<(String, String)> = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.keys.node(self.node.id()))
            .arg(beat)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.nodes())
            .arg(now_ms())
            .arg(self.node.id())
            .ignore()
            .cmd("SET")
            .arg(&generation)
            .arg(new_instance())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&generation)
            .cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await;
        match written {
            Ok((value, info)) => {
                let run = info
                    .lines()
                    .find_map(|l| l.strip_prefix("run_id:"))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                self.redis.saw_generation(value, run);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat not written");
                false
            }
        }
    }

    /// Refreshes this node's key every `cluster-heartbeat`.
    async fn announce(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop_announcing.cancelled() => return,
            }
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let sent_at = Instant::now();
            // From the first heartbeat of a run on, the others may declare
            // it lost: the lease binds (see the module doc).
            let lease = self.node.lease();
            if lease.remaining().is_none() && !lease.is_fencing() {
                lease.renew_until(sent_at + self.lease_span());
            }
            let beat = self.heartbeat(false, seq);
            self.renewals.sending(sent_at);
            let ok = self.write_beat(beat, self.config.heartbeat_timeout).await;
            if ok {
                self.beat_accepted(sent_at);
            }
            // Up only while the subscribing connection answers too: without
            // it this node would hear no command, reply or channel message.
            self.redis
                .link()
                .set(ok && self.subscriber_ok.load(Ordering::Acquire));
        }
    }

    /// Checks the subscribing connection every heartbeat (apart from the
    /// heartbeats, which never wait for it), and subscribes again after it
    /// broke.
    async fn check_subscriber(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop.cancelled() => return,
            }
            let ok = self.redis.check_subscriber().await;
            if !ok && !warned {
                tracing::warn!("the Redis subscribing connection does not answer");
            }
            warned = !ok;
            self.subscriber_ok.store(ok, Ordering::Release);
        }
    }

    /// Half the heartbeat timeout: the lease runs out at least half a
    /// timeout before anyone may find this node's key expired.
    fn lease_span(&self) -> Duration {
        self.config.heartbeat_timeout / 2
    }

    /// Redis took a heartbeat sent at `sent_at`: renew the lease, unless it
    /// ran out so long ago that the cluster may have reported this node
    /// lost; then look that up first.
    fn beat_accepted(self: &Arc<Self>, sent_at: Instant) {
        let cfg = &self.config;
        let lease = self.node.lease();
        let span = self.lease_span();
        if self
            .renewals
            .confirmed(lease, sent_at, span, cfg.heartbeat, cfg.heartbeat_timeout)
            == Confirmed::LookUp
        {
            tracing::warn!(
                "this node's lease ran out while it was cut off from Redis; holding origin events until it knows whether it was reported lost"
            );
            tokio::spawn(self.clone().resolve_suspicion());
        }
    }

    /// After a cut-off long enough to have been reported lost: looks the
    /// report up, then fences the node or renews its lease.
    async fn resolve_suspicion(self: Arc<Self>) {
        let beat = self.config.heartbeat;
        // Reports decided just before this node's key came back land
        // within a heartbeat.
        tokio::time::sleep(beat).await;
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
                None => tokio::time::sleep(beat).await,
            }
        }
        self.renewals.looked_up();
    }

    /// Whether the run `instance` of this node was reported lost (`None`:
    /// cannot tell now).
    async fn was_reported(&self, instance: &str) -> Option<bool> {
        let mut conn = self.redis.conn();
        let by: redis::RedisResult<Option<String>> =
            conn.get(self.keys.down(self.node.id(), instance)).await;
        match by {
            Ok(Some(by)) if by != "left" => {
                tracing::warn!(reported_by = %by, "this node was reported lost");
                Some(true)
            }
            Ok(_) => Some(false),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the lost-node reports");
                None
            }
        }
    }

    /// The cluster reported the run `instance` lost: a new run, and the node
    /// fences itself, unless that run is over already.
    async fn fence(&self, instance: &str) {
        {
            let mut current = self.instance.lock();
            if *current != instance {
                return;
            }
            let old = std::mem::replace(&mut *current, new_instance());
            self.retired.lock().insert(old);
        }
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

    async fn fence_if_reported(self: Arc<Self>) {
        let instance = self.instance.lock().clone();
        if self.was_reported(&instance).await == Some(true) {
            self.fence(&instance).await;
        }
        self.checking.store(false, Ordering::Release);
    }

    /// Every node's heartbeat, as Redis holds them now.
    async fn read_members(&self) -> redis::RedisResult<Vec<Heartbeat>> {
        let mut conn = self.redis.membership_conn();
        let forget_before = now_ms().saturating_sub(GONE_MEMORY.as_millis() as u64);
        let _: () = conn
            .zrembyscore(self.keys.nodes(), "-inf", forget_before)
            .await?;
        let ids: Vec<String> = conn.zrange(self.keys.nodes(), 0, -1).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.node(id)).collect();
        let beats: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(beats
            .into_iter()
            .flatten()
            .filter_map(|b| serde_json::from_str(&b).ok())
            .collect())
    }

    /// Reads the membership every half heartbeat and drops the nodes whose
    /// key expired.
    async fn watch(self: Arc<Self>) {
        let (beat, timeout) = (self.config.heartbeat, self.config.heartbeat_timeout);
        let mut tick = tokio::time::interval(beat / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_check = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop.cancelled() => return,
            }
            let read = tokio::time::timeout(self.config.request_timeout, self.read_members()).await;
            let beats = match read {
                Ok(Ok(beats)) => beats,
                other => {
                    if let Ok(Err(e)) = other {
                        tracing::debug!(error = %e, "cannot read the membership");
                    }
                    *self.judge_after.lock() = Instant::now() + timeout + beat;
                    continue;
                }
            };
            if last_check.elapsed() >= timeout && !self.checking.swap(true, Ordering::AcqRel) {
                last_check = Instant::now();
                tokio::spawn(self.clone().fence_if_reported());
            }
            let judging = Instant::now() >= *self.judge_after.lock();
            let mut lost = Vec::new();
            {
                let mut m = self.membership.lock();
                let mut present = HashSet::new();
                for beat in beats {
                    if beat.node == self.node.id() {
                        let mine = *self.instance.lock() == beat.instance
                            || self.retired.lock().contains(&beat.instance);
                        if !mine {
                            tracing::error!(
                                node = %beat.node,
                                "another process announces this node id: node ids must be unique in a cluster"
                            );
                        }
                        continue;
                    }
                    present.insert(beat.node.clone());
                    self.record(&mut m, beat, &mut lost);
                }
                let now = Instant::now();
                if judging {
                    m.members.retain(|node, member| {
                        let alive =
                            present.contains(node) || now.duration_since(member.changed) < timeout;
                        if !alive {
                            tracing::warn!(node = %node, "node stopped refreshing its key; dropped from the cluster");
                            lost.push((
                                node.clone(),
                                member.beat.instance.clone(),
                                member.beat.started_at_ms,
                                member.last_seen_ms,
                            ));
                        }
                        alive
                    });
                }
                for (node, ..) in &lost {
                    if !m.members.contains_key(node) {
                        m.gone.insert(node.clone(), now);
                    }
                }
                m.gone.retain(|_, at| now.duration_since(*at) < GONE_MEMORY);
            }
            for run in lost {
                tokio::spawn(self.clone().report_down(run));
            }
        }
    }

    /// Records a heartbeat read from another node's key.
    fn record(
        &self,
        m: &mut Membership,
        beat: Heartbeat,
        lost: &mut Vec<(String, String, u64, u64)>,
    ) {
        if beat.leaving {
            if m.members.remove(&beat.node).is_some() {
                tracing::info!(node = %beat.node, "node left the cluster");
            }
            m.gone.insert(beat.node, Instant::now());
            return;
        }
        match m.members.get_mut(&beat.node) {
            Some(member) if member.beat.instance == beat.instance => {
                if member.beat.seq != beat.seq {
                    member.changed = Instant::now();
                    member.last_seen_ms = now_ms();
                }
                member.beat = beat;
            }
            other => {
                if let Some(old) = other {
                    // Restarted under the same id without leaving: the
                    // previous run's connections are gone.
                    tracing::warn!(node = %beat.node, "node restarted without draining");
                    lost.push((
                        beat.node.clone(),
                        old.beat.instance.clone(),
                        old.beat.started_at_ms,
                        old.last_seen_ms,
                    ));
                } else if m.gone.remove(&beat.node).is_none() {
                    tracing::info!(node = %beat.node, "node joined the cluster");
                }
                let node = beat.node.clone();
                m.gone.remove(&node);
                m.members.insert(
                    node,
                    Member {
                        beat,
                        changed: Instant::now(),
                        last_seen_ms: now_ms(),
                    },
                );
            }
        }
    }

    /// Reports a lost run to the origin if this node wins the right to.
    async fn report_down(self: Arc<Self>, run: (String, String, u64, u64)) {
        let (node, instance, started_at_ms, last_seen_ms) = run;
        let name = format!("{node}.{instance}");
        if self.reported.lock().contains(&name) {
            return;
        }
        let key = self.keys.down(&node, &instance);
        let me = self.node.id().to_string();
        let mut conn = self.redis.conn();
        // Tried until Redis answers (the lost node is not judged again).
        let mut warned = false;
        let won = loop {
            let created: redis::RedisResult<Option<String>> = redis::cmd("SET")
                .arg(&key)
                .arg(&me)
                .arg("NX")
                .arg("EX")
                .arg(REPORT_TTL_SECS)
                .query_async(&mut conn)
                .await;
            let outcome = match created {
                Ok(Some(_)) => Ok(true),
                // A lost answer to our own create also ends here: the key
                // then holds our id.
                Ok(None) => conn
                    .get::<_, Option<String>>(&key)
                    .await
                    .map(|by| by.as_deref() == Some(me.as_str())),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(won) => break won,
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, node = %node, "cannot record the lost node yet; trying again");
                        warned = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(self.config.heartbeat) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
            }
        };
        if won && self.reported.lock().insert(name) {
            // What the node starts for the report runs on its own runtime.
            let _work = self.work.enter();
            self.node
                .report_node_down(&node, &instance, started_at_ms, last_seen_ms);
        }
    }

    /// Answers the commands sent to this node.
    async fn serve(self: Arc<Self>) {
        let channel = self.keys.node_control(self.node.id());
        let Some(mut sub) = self
            .redis
            .subscribe_until(&channel, self.config.heartbeat, &self.stop)
            .await
        else {
            return;
        };
        loop {
            let msg = tokio::select! {
                m = sub.inbox.recv() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => break,
            };
            tokio::spawn(self.clone().answer(msg));
        }
        if self.halted.load(Ordering::Relaxed) {
            return;
        }
        // Leaving: answer what is already on its way.
        let _ = tokio::time::timeout(LAST_ANSWERS, async {
            while let Some(msg) = sub.inbox.recv().await {
                self.clone().answer(msg).await;
            }
        })
        .await;
    }

    async fn answer(self: Arc<Self>, msg: Bytes) {
        let Some((request, command)) = unframe::<Request>(&msg) else {
            tracing::debug!("unreadable command ignored");
            return;
        };
        let reply = self.node.execute(&command, true).await;
        let answer = Answer {
            id: request.id,
            status: reply.status,
        };
        let mut conn = self.redis.conn();
        let sent: redis::RedisResult<i64> = conn
            .publish(&request.reply, frame(&answer, &reply.body).as_ref())
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "command reply not sent");
        }
    }

    /// Hands answers to the requests waiting for them.
    async fn collect_answers(self: Arc<Self>) {
        let Some(mut sub) = self
            .redis
            .subscribe_until(&self.reply_channel, self.config.heartbeat, &self.stop)
            .await
        else {
            return;
        };
        self.forward_answers(&mut sub).await;
    }

    async fn forward_answers(&self, sub: &mut Subscription) {
        loop {
            let msg = tokio::select! {
                m = sub.inbox.recv() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            let Some((answer, body)) = unframe::<Answer>(&msg) else {
                continue;
            };
            let waiting = self.pending.lock().get(&answer.id).cloned();
            if let Some(tx) = waiting {
                let _ = tx.try_send((answer.status, body));
            }
        }
    }

    /// Publishes `body` as a request on `channel` and returns where the
    /// answers arrive and how many subscribers it reached. The request is
    /// forgotten when the returned [`Waiting`] is dropped.
    pub(crate) async fn request(
        &self,
        channel: &str,
        body: &[u8],
        most: usize,
    ) -> Result<(Waiting<'_>, usize), redis::RedisError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(most.max(1));
        self.pending.lock().insert(id, tx);
        let waiting = Waiting {
            cluster: self,
            id,
            answers: rx,
        };
        let request = Request {
            id,
            reply: self.reply_channel.clone(),
            from: self.node.id().to_string(),
        };
        let mut conn = self.redis.conn();
        let reached: i64 = conn
            .publish(channel, frame(&request, body).as_ref())
            .await?;
        Ok((waiting, reached.max(0) as usize))
    }

    /// Stops every task at once without leaving, as a crash would: the
    /// others report this node lost once its key expires. For tests and
    /// embedders that tear a node down.
    pub fn halt(&self) {
        self.halted.store(true, Ordering::Relaxed);
        self.stop_announcing.cancel();
        self.stop.cancel();
    }

    /// The other live nodes' ids.
    pub(crate) fn peer_count(&self) -> usize {
        self.membership.lock().members.len()
    }
}

/// A request's answers; dropping it forgets the request.
#[derive(Debug)]
pub(crate) struct Waiting<'a> {
    cluster: &'a RedisCluster,
    id: u64,
    pub(crate) answers: mpsc::Receiver<(u16, Bytes)>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.cluster.pending.lock().remove(&self.id);
    }
}

impl Cluster for RedisCluster {
    fn forward_timeout(&self) -> Duration {
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
        timeout: Duration,
    ) -> BoxFuture<'_, Result<CommandReply, ClusterError>> {
        let node = node.to_owned();
        Box::pin(async move {
            if !self.redis.link().is_up() {
                return Err(ClusterError::Unavailable("Redis is unreachable".into()));
            }
            if self.membership.lock().gone.contains_key(&node) {
                return Err(ClusterError::NodeGone(node));
            }
            let channel = self.keys.node_control(&node);
            // Nobody listening: the node is gone, or (a member) its
            // subscribing connection is reconnecting; a member is asked
            // again for up to a heartbeat before it counts as gone.
            let started = Instant::now();
            let mut waiting = loop {
                let (waiting, reached) = self
                    .request(&channel, &command, 1)
                    .await
                    .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
                if reached > 0 {
                    break waiting;
                }
                drop(waiting);
                let member = self.membership.lock().members.contains_key(&node);
                if !member || started.elapsed() >= self.config.heartbeat {
                    return Err(ClusterError::NodeGone(node));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            match tokio::time::timeout(timeout, waiting.answers.recv()).await {
                Ok(Some((status, body))) => Ok(CommandReply { status, body }),
                _ => Err(ClusterError::Timeout(node)),
            }
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
            // Nobody reports a run that left: its report key is taken.
            let instance = self.instance.lock().clone();
            let mut conn = self.redis.conn();
            let _: redis::RedisResult<Option<String>> = redis::cmd("SET")
                .arg(self.keys.down(self.node.id(), &instance))
                .arg("left")
                .arg("NX")
                .arg("EX")
                .arg(REPORT_TTL_SECS)
                .query_async(&mut conn)
                .await;
            let seq = self.seq.load(Ordering::Relaxed) + 1;
            let _ = self
                .write_beat(self.heartbeat(true, seq), self.config.heartbeat_timeout * 2)
                .await;
            self.stop.cancel();
            let server = self.server.lock().take();
            if let Some(task) = server {
                let _ = tokio::time::timeout(LAST_ANSWERS * 2, task).await;
            }
            tracing::info!("left the cluster");
        })
    }
}
