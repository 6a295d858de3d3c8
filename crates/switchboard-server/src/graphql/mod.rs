//! GraphQL over WebSocket (`docs/graphql.md`): the operations of the
//! node's GraphQL connections, run against the origin's GraphQL-over-HTTP
//! endpoint, and the subscriptions they became, grouped by digest (their
//! inputs). A trigger publication re-executes each digest that depends on
//! it once, on the node that owns the digest in the cluster, and the result
//! goes to every subscriber of the digest. The handshake (`connection_init`)
//! is the edge's; the messages after it come here ([`Graphql::on_message`]).

mod endpoint;
mod flights;

use crate::config::Config;
use crate::conn::{Conn, Registry};
use crate::metrics::{CodeLabel, Metrics, ResultLabel};
use bytes::Bytes;
use endpoint::{Endpoint, Outcome};
use flights::{Flights, Update};
use futures_util::FutureExt;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use switchboard_backend::{Cluster, CommandReply};
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::control::{Command, GraphqlExecute};
use switchboard_proto::graphql::{self as gql, ClientMessage, Operation, Protocol, RequestContext};
use switchboard_proto::ws::frame::{encode_frame, OpCode};
use switchboard_proto::NodeId;

/// A close the connection's task is to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    pub(crate) code: u16,
    pub(crate) reason: String,
}

/// What a GraphQL connection's operations run with: the context the
/// endpoint is told (the protocol is the connection's, [`Conn::graphql`]).
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) connection_id: String,
    pub(crate) user_id: Option<String>,
    pub(crate) claims: Option<Map<String, Value>>,
    pub(crate) metadata: Option<Value>,
    /// The `forward-header` headers of the upgrade request.
    pub(crate) headers: Vec<(String, String)>,
}

impl Context {
    /// The request context and headers, for the connection's own operation
    /// (`trigger` absent) or for a re-execution.
    fn request(&self, trigger: Option<&str>) -> (RequestContext, Vec<(String, String)>) {
        let own = trigger.is_none();
        let mut headers = self.headers.clone();
        if own {
            headers.push((
                "switchboard-connection-id".into(),
                self.connection_id.clone(),
            ));
        }
        if let Some(user) = &self.user_id {
            headers.push(("switchboard-user-id".into(), user.clone()));
        }
        let ctx = RequestContext {
            connection_id: own.then(|| self.connection_id.clone()),
            user_id: self.user_id.clone(),
            claims: self.claims.clone(),
            metadata: self.metadata.clone(),
            trigger: trigger.map(str::to_owned),
        };
        (ctx, headers)
    }
}

/// The node's GraphQL connections and subscriptions.
#[derive(Debug)]
pub(crate) struct Graphql {
    config: Arc<Config>,
    node: NodeId,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    /// `None` without `graphql-endpoint`.
    endpoint: Option<Arc<Endpoint>>,
    /// Authenticates [`Command::GraphqlExecute`] between nodes: derived from
    /// `origin-secret`, which every node of a cluster shares.
    peer_key: Option<[u8; 32]>,
    /// The other nodes, once a cluster backend has joined.
    pub(crate) cluster: OnceLock<Arc<dyn Cluster>>,
    state: Mutex<State>,
    flights: Flights,
}

#[derive(Debug, Default)]
struct State {
    conns: HashMap<ConnKey, ConnOps>,
    digests: HashMap<Arc<str>, Digest>,
    by_trigger: HashMap<Box<str>, HashSet<Arc<str>>>,
    /// Each trigger key's latest publication on this node, for the first
    /// executions that were running when it came.
    published: HashMap<Box<str>, Published>,
    /// `published` is pruned when it grows past this.
    prune_at: usize,
    /// Orders everything here: operation and digest generations, when a
    /// subscriber joined, when an execution started, publications.
    seq: u64,
}

#[derive(Debug)]
struct Published {
    seq: u64,
    publication: String,
    at: Instant,
}

#[derive(Debug)]
struct ConnOps {
    ctx: Arc<Context>,
    ops: HashMap<Arc<str>, Op>,
}

#[derive(Debug)]
struct Op {
    gen: u64,
    /// The subscription it became; `None` while its first execution runs.
    digest: Option<Arc<str>>,
}

/// A subscriber: its connection and operation id.
type Sub = (ConnKey, Arc<str>);

/// A distinct subscription input and its subscribers on this node.
#[derive(Debug)]
struct Digest {
    /// Tells it from a digest of the same name made after it was dropped
    /// (a re-execution of the old one must not touch the new one).
    gen: u64,
    /// The operation and context it is re-executed with: those of one of
    /// its subscribers (`ctx_of`).
    operation: Arc<Operation>,
    ctx: Arc<Context>,
    ctx_of: Sub,
    triggers: Vec<Box<str>>,
    /// Subscribers, and when each joined (a result executed before that is
    /// older than its initial one, and is not sent to it).
    subscribers: HashMap<Sub, u64>,
    /// A re-execution is running; `again` is the publication (and trigger)
    /// to run once more after it.
    running: bool,
    again: Option<(String, String)>,
    /// SHA-256 of the last re-executed result sent (`graphql-suppress-unchanged`).
    last: Option<[u8; 32]>,
}

/// A re-execution to start: digest, its generation, publication, trigger.
type Rerun = (Arc<str>, u64, String, String);

/// First executions of one subscription in a row that may run again
/// because one of its triggers was published meanwhile.
const MAX_FIRST_ATTEMPTS: u32 = 3;

/// Largest result one node sends another (NATS's `max_payload` is 1 MiB by
/// default); a larger one is executed by the asking node itself.
const MAX_FORWARDED_RESULT: usize = 512 << 10;

impl Graphql {
    pub(crate) fn new(
        config: Arc<Config>,
        node: NodeId,
        metrics: Arc<Metrics>,
        registry: Arc<Registry>,
    ) -> Result<Self, String> {
        let endpoint = match &config.graphql_endpoint {
            Some(url) => Some(Arc::new(Endpoint::new(
                url,
                config.origin_secret.as_deref(),
                config.graphql_timeout,
                config.graphql_concurrency,
                node.as_str(),
            )?)),
            None => None,
        };
        let peer_key = config.origin_secret.as_ref().map(|secret| {
            Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .expect("any key length")
                .chain_update(b"switchboard graphql-execute")
                .finalize()
                .into_bytes()
                .into()
        });
        Ok(Self {
            config,
            node,
            metrics,
            registry,
            endpoint,
            peer_key,
            cluster: OnceLock::new(),
            state: Mutex::new(State::default()),
            flights: Flights::default(),
        })
    }

    /// Whether clients may speak GraphQL here (`graphql-endpoint` is set).
    pub(crate) fn enabled(&self) -> bool {
        self.endpoint.is_some()
    }

    /// Counts a protocol close of a GraphQL connection.
    pub(crate) fn count_close(&self, code: u16) {
        let code: &'static str = match code {
            gql::close::BAD_REQUEST => "4400",
            gql::close::UNAUTHORIZED => "4401",
            gql::close::FORBIDDEN => "4403",
            gql::close::SUBPROTOCOL_NOT_ACCEPTABLE => "4406",
            gql::close::INIT_TIMEOUT => "4408",
            gql::close::SUBSCRIBER_EXISTS => "4409",
            gql::close::TOO_MANY_INITS => "4429",
            gql::close::INTERNAL_ERROR => "4500",
            switchboard_proto::ws::close::TRY_AGAIN_LATER => "1013",
            _ => return,
        };
        self.metrics
            .graphql_closes
            .get_or_create(&CodeLabel { code })
            .inc();
    }

    /// A GraphQL connection was accepted (`connection_ack` sent).
    pub(crate) fn open(&self, conn: &Conn, ctx: Context) {
        self.state.lock().conns.insert(
            conn.key,
            ConnOps {
                ctx: Arc::new(ctx),
                ops: HashMap::new(),
            },
        );
    }

    /// A GraphQL connection ended: its operations stop.
    pub(crate) fn forget(&self, key: &ConnKey) {
        let mut st = self.state.lock();
        let Some(ops) = st.conns.remove(key) else {
            return;
        };
        for (id, op) in ops.ops {
            self.metrics.graphql_operations.dec();
            if let Some(digest) = op.digest {
                st.unsubscribe(&digest, &(*key, id), &self.metrics);
            }
        }
    }

    /// A text message from a GraphQL connection, after `connection_ack`.
    pub(crate) fn on_message(self: &Arc<Self>, conn: &Arc<Conn>, text: &[u8]) -> Result<(), Close> {
        let Some(protocol) = conn.graphql else {
            return Ok(());
        };
        let msg = gql::parse(protocol, text).map_err(|e| Close {
            code: gql::close::BAD_REQUEST,
            reason: e.0,
        })?;
        match msg {
            ClientMessage::Init(_) => Err(Close {
                code: gql::close::TOO_MANY_INITS,
                reason: "Too many initialisation requests".into(),
            }),
            ClientMessage::Ping(payload) => {
                self.push(conn, &gql::pong(payload.as_ref()));
                Ok(())
            }
            ClientMessage::Pong => Ok(()),
            ClientMessage::Terminate => Err(Close {
                code: switchboard_proto::ws::close::NORMAL,
                reason: String::new(),
            }),
            ClientMessage::Stop { id } => {
                let mut st = self.state.lock();
                // Under the lock: no result for it is queued after this.
                if st.stop(&conn.key, &id, &self.metrics) && protocol == Protocol::Legacy {
                    self.push(conn, &gql::complete(&id));
                }
                Ok(())
            }
            ClientMessage::Start { id, operation } => {
                self.start(conn, protocol, id.into(), operation)
            }
        }
    }

    /// A binary frame or another message that is not the protocol's.
    pub(crate) fn bad_frame() -> Close {
        Close {
            code: gql::close::BAD_REQUEST,
            reason: "GraphQL over WebSocket messages are JSON text frames".into(),
        }
    }

    fn push(&self, conn: &Conn, json: &[u8]) {
        conn.push(encode_frame(OpCode::Text, json), &self.metrics);
    }

    fn start(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        protocol: Protocol,
        id: Arc<str>,
        operation: Operation,
    ) -> Result<(), Close> {
        let (ctx, gen, started) = {
            let mut st = self.state.lock();
            let running = st
                .conns
                .get(&conn.key)
                .is_some_and(|c| c.ops.contains_key(&id));
            if running {
                if protocol == Protocol::Modern {
                    return Err(Close {
                        code: gql::close::SUBSCRIBER_EXISTS,
                        reason: format!("Subscriber for {} already exists", truncated(&id, 64)),
                    });
                }
                // Legacy: the new operation replaces the running one.
                st.stop(&conn.key, &id, &self.metrics);
            }
            st.seq += 1;
            let gen = st.seq;
            let Some(ops) = st.conns.get_mut(&conn.key) else {
                return Ok(()); // ended meanwhile
            };
            if ops.ops.len() >= self.config.graphql_max_operations {
                drop(st);
                self.metrics
                    .graphql_refused
                    .get_or_create(&CodeLabel {
                        code: "too_many_operations",
                    })
                    .inc();
                let errors = gql::errors_of(
                    &format!(
                        "this connection runs {} operations already (graphql-max-operations)",
                        self.config.graphql_max_operations
                    ),
                    "too_many_operations",
                );
                self.push(conn, &gql::error(&id, &errors));
                return Ok(());
            }
            ops.ops.insert(id.clone(), Op { gen, digest: None });
            self.metrics.graphql_operations.inc();
            (ops.ctx.clone(), gen, gen)
        };
        let this = self.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            this.first_execution(conn, ctx, id, operation, gen, started)
                .await
        });
        Ok(())
    }

    /// Runs an operation's first execution and acts on what it turned out
    /// to be. `started` orders it against trigger publications.
    async fn first_execution(
        self: Arc<Self>,
        conn: Arc<Conn>,
        ctx: Arc<Context>,
        id: Arc<str>,
        operation: Operation,
        gen: u64,
        started: u64,
    ) {
        let (Some(endpoint), Some(protocol)) = (&self.endpoint, conn.graphql) else {
            return;
        };
        let (rctx, headers) = ctx.request(None);
        let body = request_body(&operation, rctx);
        let mut started = started;
        let mut attempt = 0;
        let (mut st, outcome) = loop {
            let outcome = endpoint
                .execute(body.clone(), &headers, "operation", &self.metrics)
                .await;
            attempt += 1;
            let mut st = self.state.lock();
            // A subscription whose triggers were published while it ran may
            // have read the state before that change: it runs again (its
            // own request, so nobody else gets a result twice).
            let raced = match &outcome {
                Outcome::Subscription { ext, .. } => st.published_since(&ext.triggers, started),
                _ => false,
            };
            if !raced || attempt >= MAX_FIRST_ATTEMPTS {
                break (st, outcome);
            }
            st.seq += 1;
            started = st.seq;
        };
        let current = st
            .conns
            .get(&conn.key)
            .and_then(|c| c.ops.get(&id))
            .is_some_and(|op| op.gen == gen && op.digest.is_none());
        if !current {
            return; // stopped, or the connection ended
        }
        let done = |st: &mut State| {
            if let Some(c) = st.conns.get_mut(&conn.key) {
                c.ops.remove(&id);
            }
            self.metrics.graphql_operations.dec();
        };
        // Every frame is queued under the lock: none before a re-execution's
        // result that is older, none after a `complete` or `stop`.
        let rerun = match outcome {
            Outcome::Subscription { initial, ext } => {
                let digest: Arc<str> = ext
                    .digest
                    .unwrap_or_else(|| default_digest(&operation, &ctx))
                    .into();
                let sub = (conn.key, id.clone());
                let rerun = st.subscribe(
                    &digest,
                    sub,
                    ext.triggers,
                    started,
                    || (Arc::new(operation.clone()), ctx.clone()),
                    &self.metrics,
                );
                if let Some(op) = st.conns.get_mut(&conn.key).and_then(|c| c.ops.get_mut(&id)) {
                    op.digest = Some(digest);
                }
                if let Some(initial) = initial {
                    self.push(&conn, &gql::result(protocol, &id, &initial));
                    self.metrics.graphql_deliveries.inc();
                }
                rerun
            }
            Outcome::Result(payload) => {
                done(&mut st);
                self.push(&conn, &gql::result(protocol, &id, &payload));
                self.push(&conn, &gql::complete(&id));
                None
            }
            Outcome::Errors(errors) => {
                done(&mut st);
                self.push(&conn, &gql::error(&id, &errors));
                None
            }
            Outcome::Unavailable(why) => {
                done(&mut st);
                let errors = gql::errors_of(&why, "origin_unavailable");
                self.push(&conn, &gql::error(&id, &errors));
                None
            }
        };
        drop(st);
        if let Some(rerun) = rerun {
            self.spawn_rerun(rerun);
        }
    }

    /// Re-executes every digest of this node that depends on one of
    /// `triggers`, for `publication`. Returns how many.
    pub(crate) fn trigger(self: &Arc<Self>, triggers: &[String], publication: &str) -> usize {
        let start = {
            let mut st = self.state.lock();
            st.seq += 1;
            let (seq, now) = (st.seq, Instant::now());
            // A first execution runs within graphql-timeout: older
            // publications no longer matter to any.
            let keep = self.config.graphql_timeout * 2;
            if st.published.len() > st.prune_at {
                st.published.retain(|_, p| now.duration_since(p.at) < keep);
                // Scanned again only once it has doubled.
                st.prune_at = (2 * st.published.len()).max(1024);
            }
            let mut hit: HashMap<Arc<str>, &str> = HashMap::new();
            for t in triggers {
                st.published.insert(
                    t.as_str().into(),
                    Published {
                        seq,
                        publication: publication.to_owned(),
                        at: now,
                    },
                );
                for d in st.by_trigger.get(t.as_str()).into_iter().flatten() {
                    hit.entry(d.clone()).or_insert(t);
                }
            }
            let hit: Vec<(Arc<str>, String)> =
                hit.into_iter().map(|(d, t)| (d, t.to_owned())).collect();
            hit.into_iter()
                .filter_map(|(d, t)| st.schedule(&d, publication, &t))
                .collect::<Vec<_>>()
        };
        let n = start.len();
        for rerun in start {
            self.spawn_rerun(rerun);
        }
        n
    }

    fn spawn_rerun(self: &Arc<Self>, (digest, gen, publication, trigger): Rerun) {
        let this = self.clone();
        tokio::spawn(async move { this.rerun(digest, gen, publication, trigger).await });
    }

    /// Re-executes `digest` and sends the result to its subscribers, then
    /// once more for each publication that came meanwhile.
    async fn rerun(
        self: Arc<Self>,
        digest: Arc<str>,
        gen: u64,
        mut publication: String,
        mut trigger: String,
    ) {
        loop {
            let started = {
                let mut st = self.state.lock();
                st.seq += 1;
                let seq = st.seq;
                let Some(d) = st.digests.get(&digest).filter(|d| d.gen == gen) else {
                    return;
                };
                (seq, d.operation.clone(), d.ctx.clone())
            };
            let (started, operation, ctx) = started;
            let (rctx, headers) = ctx.request(Some(&trigger));
            let body = request_body(&operation, rctx);
            let update = self.result_for(&digest, &publication, body, headers).await;
            let mut st = self.state.lock();
            self.deliver(&mut st, &digest, gen, started, update);
            let Some(d) = st.digests.get_mut(&digest).filter(|d| d.gen == gen) else {
                return;
            };
            match d.again.take() {
                Some((p, t)) => (publication, trigger) = (p, t),
                None => {
                    d.running = false;
                    return;
                }
            }
        }
    }

    /// The node that executes `digest`, when it is another one: rendezvous
    /// hashing of the digest over the live nodes that are not draining.
    fn owner(&self, digest: &str) -> Option<String> {
        let cluster = self.cluster.get()?;
        let score = |node: &str| {
            let h = Sha256::new()
                .chain_update(node.as_bytes())
                .chain_update([0])
                .chain_update(digest.as_bytes())
                .finalize();
            u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
        };
        let me = self.node.as_str();
        let mut best = (score(me), me.to_owned());
        for peer in cluster.peers() {
            if peer.node != me && !peer.draining {
                let s = (score(&peer.node), peer.node);
                if s > best {
                    best = s;
                }
            }
        }
        (best.1 != me).then_some(best.1)
    }

    /// The MAC of a [`GraphqlExecute`] (`None` without `origin-secret`).
    fn peer_mac(&self, e: &GraphqlExecute) -> Option<String> {
        let key = self.peer_key?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
        for part in [
            e.digest.as_bytes(),
            e.publication.as_bytes(),
            e.request.as_bytes(),
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        for (name, value) in &e.headers {
            for part in [name.as_bytes(), value.as_bytes()] {
                mac.update(&(part.len() as u64).to_be_bytes());
                mac.update(part);
            }
        }
        Some(hex::encode(mac.finalize().into_bytes()))
    }

    /// A re-execution's result: asked of the digest's owner node, or made
    /// here (once per publication, whoever asks).
    async fn result_for(
        &self,
        digest: &Arc<str>,
        publication: &str,
        body: Bytes,
        headers: Vec<(String, String)>,
    ) -> Update {
        if let (Some(owner), Some(cluster)) = (self.owner(digest), self.cluster.get()) {
            let mut cmd = GraphqlExecute {
                digest: digest.to_string(),
                publication: publication.to_owned(),
                request: String::from_utf8_lossy(&body).into_owned(),
                headers: headers.clone(),
                mac: None,
            };
            cmd.mac = self.peer_mac(&cmd);
            let json =
                serde_json::to_vec(&Command::GraphqlExecute(cmd)).expect("commands serialize");
            // The owner may take its whole request to the endpoint.
            let within = self.config.graphql_timeout + cluster.forward_timeout();
            let result = match cluster.forward_within(&owner, json.into(), within).await {
                Ok(reply) if reply.status == 200 => {
                    RawValue::from_string(String::from_utf8_lossy(&reply.body).into_owned())
                        .ok()
                        .map(|p| Some(Arc::from(p)))
                }
                Ok(reply) if reply.status == 204 => Some(None),
                Ok(_) | Err(_) => None,
            };
            let label = if result.is_some() { "ok" } else { "failed" };
            self.metrics
                .graphql_owner_requests
                .get_or_create(&ResultLabel { result: label })
                .inc();
            if let Some(update) = result {
                return update;
            }
            tracing::warn!(%owner, digest = %digest, "the digest's owner could not give its result; executing here");
        }
        self.execute_once(digest, publication, body, headers).await
    }

    /// Executes `digest` for `publication` unless it was already.
    async fn execute_once(
        &self,
        digest: &Arc<str>,
        publication: &str,
        body: Bytes,
        headers: Vec<(String, String)>,
    ) -> Update {
        let Some(endpoint) = &self.endpoint else {
            return None;
        };
        let (endpoint, metrics) = (endpoint.clone(), self.metrics.clone());
        // Long enough for every node that asks about this publication.
        let keep = 2 * (self.config.graphql_timeout + self.forward_timeout());
        self.flights
            .once(digest, publication, keep, move || {
                async move {
                    endpoint
                        .execute(body, &headers, "trigger", &metrics)
                        .await
                        .as_update()
                        .map(Arc::from)
                }
                .boxed()
            })
            .await
    }

    fn forward_timeout(&self) -> Duration {
        self.cluster
            .get()
            .map_or(Duration::ZERO, |c| c.forward_timeout())
    }

    /// Another node asks for a digest's result ([`Command::GraphqlExecute`]):
    /// 200 with the payload for subscribers, 204 when there is none. Any
    /// other answer makes the asking node execute the digest itself.
    pub(crate) async fn execute_for_peer(&self, mut e: GraphqlExecute) -> CommandReply {
        let refuse = |status: u16, code: &str, message: &str| CommandReply {
            status,
            body: Bytes::from(serde_json::json!({ "code": code, "message": message }).to_string()),
        };
        if !self.enabled() {
            return refuse(409, "graphql_disabled", "this node has no graphql-endpoint");
        }
        let given = e.mac.take();
        if let Some(expected) = self.peer_mac(&e) {
            let ok = given.is_some_and(|g| {
                bool::from(subtle::ConstantTimeEq::ct_eq(
                    g.as_bytes(),
                    expected.as_bytes(),
                ))
            });
            if !ok {
                return refuse(
                    403,
                    "forbidden",
                    "not a GraphQL execution from a node of this cluster",
                );
            }
        }
        // Only the headers a node sends: the forwarded ones and the context.
        let allowed = |name: &str| {
            name == "switchboard-user-id"
                || self
                    .config
                    .forward_header
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(name))
        };
        e.headers.retain(|(name, _)| allowed(name));
        let digest: Arc<str> = e.digest.into();
        let update = self
            .execute_once(&digest, &e.publication, Bytes::from(e.request), e.headers)
            .await;
        match update {
            Some(payload) if payload.get().len() > MAX_FORWARDED_RESULT => refuse(
                413,
                "payload_too_large",
                "the result is larger than a node sends another",
            ),
            Some(payload) => CommandReply {
                status: 200,
                body: Bytes::from(payload.get().to_owned()),
            },
            None => CommandReply {
                status: 204,
                body: Bytes::new(),
            },
        }
    }

    /// Sends a re-execution's result to the digest's subscribers that
    /// joined before it `started` (the others have a newer initial one),
    /// under the state lock: no result is queued after a `complete`.
    fn deliver(&self, st: &mut State, digest: &Arc<str>, gen: u64, started: u64, update: Update) {
        let Some(payload) = update else {
            return;
        };
        let Some(d) = st.digests.get_mut(digest).filter(|d| d.gen == gen) else {
            return;
        };
        if self.config.graphql_suppress_unchanged {
            let hash: [u8; 32] = Sha256::digest(payload.get().as_bytes()).into();
            if d.last == Some(hash) {
                self.metrics.graphql_suppressed.inc();
                return;
            }
            d.last = Some(hash);
        }
        // One frame per subscriber (the id differs), from two shared parts.
        let tails = [Protocol::Modern, Protocol::Legacy].map(|p| gql::result_parts(p, &payload));
        for ((key, id), joined) in &d.subscribers {
            if *joined > started {
                continue;
            }
            let Some(conn) = self.registry.get(key) else {
                continue;
            };
            let Some(protocol) = conn.graphql else {
                continue;
            };
            let (head, tail) = &tails[protocol as usize];
            let mut json = Vec::with_capacity(head.len() + id.len() + 2 + tail.len());
            json.extend_from_slice(head);
            serde_json::to_writer(&mut json, &**id).expect("strings serialize");
            json.extend_from_slice(tail);
            self.push(&conn, &json);
            self.metrics.graphql_deliveries.inc();
        }
    }
}

impl State {
    /// Adds subscriber `sub` (whose first execution started at `started`)
    /// to `digest`, made with `new` if it is the first. A publication of
    /// one of its triggers since `started` is returned to run: its first
    /// execution may have read the state before that change.
    fn subscribe(
        &mut self,
        digest: &Arc<str>,
        sub: Sub,
        triggers: Vec<String>,
        started: u64,
        new: impl FnOnce() -> (Arc<Operation>, Arc<Context>),
        metrics: &Metrics,
    ) -> Option<Rerun> {
        self.seq += 1;
        let seq = self.seq;
        let d = self.digests.entry(digest.clone()).or_insert_with(|| {
            metrics.graphql_digests.inc();
            let (operation, ctx) = new();
            Digest {
                gen: seq,
                operation,
                ctx,
                ctx_of: sub.clone(),
                triggers: triggers.into_iter().map(Into::into).collect(),
                subscribers: HashMap::new(),
                running: false,
                again: None,
                last: None,
            }
        });
        d.subscribers.insert(sub, seq);
        let triggers = d.triggers.clone();
        for t in &triggers {
            self.by_trigger
                .entry(t.clone())
                .or_default()
                .insert(digest.clone());
        }
        // Only after MAX_FIRST_ATTEMPTS racing executions: the digest runs
        // again for the publication.
        let missed = triggers
            .iter()
            .filter_map(|t| self.published.get(t).map(|p| (p, t)))
            .filter(|(p, _)| p.seq > started)
            .max_by_key(|(p, _)| p.seq)
            .map(|(p, t)| (p.publication.clone(), t.to_string()));
        let (publication, trigger) = missed?;
        self.schedule(digest, &publication, &trigger)
    }

    /// Whether one of `triggers` was published here after `started`.
    fn published_since(&self, triggers: &[String], started: u64) -> bool {
        triggers.iter().any(|t| {
            self.published
                .get(t.as_str())
                .is_some_and(|p| p.seq > started)
        })
    }

    /// Runs `digest` for a publication: now (returned, to spawn), or once
    /// more after the re-execution running.
    fn schedule(&mut self, digest: &Arc<str>, publication: &str, trigger: &str) -> Option<Rerun> {
        let d = self.digests.get_mut(digest)?;
        if d.running {
            d.again = Some((publication.to_owned(), trigger.to_owned()));
            return None;
        }
        d.running = true;
        Some((
            digest.clone(),
            d.gen,
            publication.to_owned(),
            trigger.to_owned(),
        ))
    }

    /// Stops operation `id` of a connection; whether it was running.
    fn stop(&mut self, key: &ConnKey, id: &str, metrics: &Metrics) -> bool {
        let Some((id, op)) = self.conns.get_mut(key).and_then(|c| c.ops.remove_entry(id)) else {
            return false;
        };
        metrics.graphql_operations.dec();
        if let Some(digest) = op.digest {
            self.unsubscribe(&digest, &(*key, id), metrics);
        }
        true
    }

    fn unsubscribe(&mut self, digest: &Arc<str>, sub: &Sub, metrics: &Metrics) {
        let Some(d) = self.digests.get_mut(digest) else {
            return;
        };
        d.subscribers.remove(sub);
        if d.subscribers.is_empty() {
            let d = self.digests.remove(digest).expect("present");
            metrics.graphql_digests.dec();
            for t in &d.triggers {
                if let Some(set) = self.by_trigger.get_mut(t) {
                    set.remove(digest);
                    if set.is_empty() {
                        self.by_trigger.remove(t);
                    }
                }
            }
            return;
        }
        if d.ctx_of == *sub {
            // Re-executions go on with a subscriber that is still here.
            let next = d
                .subscribers
                .keys()
                .find_map(|s| self.conns.get(&s.0).map(|c| (s.clone(), c.ctx.clone())));
            if let Some((s, ctx)) = next {
                d.ctx_of = s;
                d.ctx = ctx;
            }
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub(crate) fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The endpoint's request body: the client's operation, with the gateway's
/// context as `extensions.switchboard` (whatever the client put there is
/// replaced).
fn request_body(op: &Operation, ctx: RequestContext) -> Bytes {
    let mut extensions = op.extensions.clone().unwrap_or_default();
    extensions.insert(
        gql::EXTENSION.into(),
        serde_json::to_value(ctx).expect("contexts serialize"),
    );
    let body = Operation {
        query: op.query.clone(),
        variables: op.variables.clone(),
        operation_name: op.operation_name.clone(),
        extensions: Some(extensions),
    };
    Bytes::from(serde_json::to_vec(&body).expect("operations serialize"))
}

/// The digest of a subscription whose answer named none: everything sent
/// to the endpoint that may change its result and is not per connection —
/// the operation (with the client's extensions), the user, the origin's
/// metadata, and the forwarded `cookie` and `authorization` headers.
fn default_digest(op: &Operation, ctx: &Context) -> String {
    let auth: Vec<&(String, String)> = ctx
        .headers
        .iter()
        .filter(|(n, _)| n == "cookie" || n == "authorization")
        .collect();
    let inputs = serde_json::json!([
        op.query,
        op.variables,
        op.operation_name,
        op.extensions,
        ctx.user_id,
        ctx.metadata,
        auth
    ]);
    hex::encode(Sha256::digest(inputs.to_string().as_bytes()))
}
