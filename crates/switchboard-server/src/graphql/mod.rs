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
use parking_lot::Mutex;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use switchboard_backend::{Cluster, CommandReply};
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::control::{Command, GraphqlExecute};
use switchboard_proto::graphql::{self as gql, ClientMessage, Operation, Protocol, RequestContext};
use switchboard_proto::ws::frame::{encode_frame, OpCode};
use switchboard_proto::NodeId;

/// The GraphQL protocol a connection speaks, if it speaks one.
pub(crate) fn protocol_of(conn: &Conn) -> Option<Protocol> {
    conn.subprotocol.as_deref().and_then(Protocol::of)
}

/// A close the connection's task is to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    pub(crate) code: u16,
    pub(crate) reason: String,
}

/// What a GraphQL connection's operations run with: its protocol, and the
/// context the endpoint is told.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) protocol: Protocol,
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
    /// Tells a finished operation from a newer one with the same id.
    next_gen: u64,
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

/// A distinct subscription input and its subscribers on this node.
#[derive(Debug)]
struct Digest {
    /// Tells it from a digest of the same name made after it was dropped
    /// (a re-execution of the old one must not touch the new one).
    gen: u64,
    /// The operation and context it is re-executed with: its first
    /// subscriber's.
    operation: Arc<Operation>,
    ctx: Arc<Context>,
    triggers: Vec<Box<str>>,
    subscribers: HashSet<(ConnKey, Arc<str>)>,
    /// A re-execution is running; `again` is the publication (and trigger)
    /// to run once more after it.
    running: bool,
    again: Option<(String, String)>,
    /// SHA-256 of the last result sent (`graphql-suppress-unchanged`).
    last: Option<[u8; 32]>,
}

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
        Ok(Self {
            config,
            node,
            metrics,
            registry,
            endpoint,
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
                st.unsubscribe(&digest, key, &id, &self.metrics);
            }
        }
    }

    /// A text message from a GraphQL connection, after `connection_ack`.
    pub(crate) fn on_message(self: &Arc<Self>, conn: &Arc<Conn>, text: &[u8]) -> Result<(), Close> {
        let Some(ctx) = self
            .state
            .lock()
            .conns
            .get(&conn.key)
            .map(|c| c.ctx.clone())
        else {
            return Ok(()); // ended meanwhile
        };
        let msg = gql::parse(ctx.protocol, text).map_err(|e| Close {
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
                if self.stop(&conn.key, &id) && ctx.protocol == Protocol::Legacy {
                    self.push(conn, &gql::complete(&id));
                }
                Ok(())
            }
            ClientMessage::Start { id, operation } => self.start(conn, ctx, id.into(), operation),
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

    /// Stops operation `id`; whether it was running.
    fn stop(&self, key: &ConnKey, id: &str) -> bool {
        let mut st = self.state.lock();
        let Some(op) = st.conns.get_mut(key).and_then(|c| c.ops.remove(id)) else {
            return false;
        };
        self.metrics.graphql_operations.dec();
        if let Some(digest) = op.digest {
            st.unsubscribe(&digest, key, id, &self.metrics);
        }
        true
    }

    fn start(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        ctx: Arc<Context>,
        id: Arc<str>,
        operation: Operation,
    ) -> Result<(), Close> {
        let gen = {
            let mut st = self.state.lock();
            let running = st
                .conns
                .get(&conn.key)
                .is_some_and(|c| c.ops.contains_key(&id));
            if running {
                if ctx.protocol == Protocol::Modern {
                    return Err(Close {
                        code: gql::close::SUBSCRIBER_EXISTS,
                        reason: format!("Subscriber for {id} already exists"),
                    });
                }
                // Legacy: the new operation replaces the running one.
                drop(st);
                self.stop(&conn.key, &id);
                st = self.state.lock();
            }
            st.next_gen += 1;
            let gen = st.next_gen;
            let Some(ops) = st.conns.get_mut(&conn.key) else {
                return Ok(());
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
            gen
        };
        let this = self.clone();
        let conn = conn.clone();
        tokio::spawn(async move { this.first_execution(conn, ctx, id, operation, gen).await });
        Ok(())
    }

    /// Runs an operation's first execution and acts on what it turned out
    /// to be.
    async fn first_execution(
        self: Arc<Self>,
        conn: Arc<Conn>,
        ctx: Arc<Context>,
        id: Arc<str>,
        operation: Operation,
        gen: u64,
    ) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        let (rctx, headers) = ctx.request(None);
        let body = request_body(&operation, rctx);
        let outcome = endpoint
            .execute(body, &headers, "operation", &self.metrics)
            .await;
        let mut st = self.state.lock();
        let current = st
            .conns
            .get(&conn.key)
            .and_then(|c| c.ops.get(&id))
            .is_some_and(|op| op.gen == gen && op.digest.is_none());
        if !current {
            return; // stopped, or the connection ended
        }
        let protocol = ctx.protocol;
        let done = |st: &mut State| {
            if let Some(c) = st.conns.get_mut(&conn.key) {
                c.ops.remove(&id);
            }
            self.metrics.graphql_operations.dec();
        };
        match outcome {
            Outcome::Subscription { initial, ext } => {
                let digest: Arc<str> = ext
                    .digest
                    .unwrap_or_else(|| default_digest(&operation, ctx.user_id.as_deref()))
                    .into();
                st.next_gen += 1;
                let digest_gen = st.next_gen;
                st.subscribe(
                    &digest,
                    &conn.key,
                    &id,
                    ext.triggers,
                    || Digest {
                        gen: digest_gen,
                        operation: Arc::new(operation.clone()),
                        ctx: ctx.clone(),
                        triggers: Vec::new(),
                        subscribers: HashSet::new(),
                        running: false,
                        again: None,
                        last: None,
                    },
                    &self.metrics,
                );
                if let Some(op) = st.conns.get_mut(&conn.key).and_then(|c| c.ops.get_mut(&id)) {
                    op.digest = Some(digest);
                }
                // Under the lock: no re-execution's result goes before it.
                if let Some(initial) = initial {
                    self.push(&conn, &gql::result(protocol, &id, &initial));
                    self.metrics.graphql_deliveries.inc();
                }
            }
            Outcome::Result(payload) => {
                done(&mut st);
                drop(st);
                self.push(&conn, &gql::result(protocol, &id, &payload));
                self.push(&conn, &gql::complete(&id));
            }
            Outcome::Errors(errors) => {
                done(&mut st);
                drop(st);
                self.push(&conn, &gql::error(&id, &errors));
            }
            Outcome::Unavailable(why) => {
                done(&mut st);
                drop(st);
                self.push(
                    &conn,
                    &gql::error(&id, &gql::errors_of(&why, "origin_unavailable")),
                );
            }
        }
    }

    /// Re-executes every digest of this node that depends on one of
    /// `triggers`, for `publication`. Returns how many.
    pub(crate) fn trigger(self: &Arc<Self>, triggers: &[String], publication: &str) -> usize {
        let mut start = Vec::new();
        {
            let mut st = self.state.lock();
            let mut hit: HashMap<Arc<str>, &str> = HashMap::new();
            for t in triggers {
                for d in st.by_trigger.get(t.as_str()).into_iter().flatten() {
                    hit.entry(d.clone()).or_insert(t);
                }
            }
            let hit: Vec<(Arc<str>, String)> =
                hit.into_iter().map(|(d, t)| (d, t.to_owned())).collect();
            for (d, t) in hit {
                let Some(digest) = st.digests.get_mut(&d) else {
                    continue;
                };
                if digest.running {
                    digest.again = Some((publication.to_owned(), t));
                } else {
                    digest.running = true;
                    start.push((d, digest.gen, t));
                }
            }
        }
        let n = start.len();
        for (digest, gen, trigger) in start {
            let this = self.clone();
            let publication = publication.to_owned();
            tokio::spawn(async move { this.rerun(digest, gen, publication, trigger).await });
        }
        n
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
            let Some((operation, ctx)) = self
                .state
                .lock()
                .digests
                .get(&digest)
                .filter(|d| d.gen == gen)
                .map(|d| (d.operation.clone(), d.ctx.clone()))
            else {
                return;
            };
            let (rctx, headers) = ctx.request(Some(&trigger));
            let body = request_body(&operation, rctx);
            let update = self.result_for(&digest, &publication, body, headers).await;
            self.deliver(&digest, update);
            let mut st = self.state.lock();
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
    /// hashing of the digest over the live nodes.
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
            if peer.node != me {
                let s = (score(&peer.node), peer.node);
                if s > best {
                    best = s;
                }
            }
        }
        (best.1 != me).then_some(best.1)
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
            let cmd = Command::GraphqlExecute(GraphqlExecute {
                digest: digest.to_string(),
                publication: publication.to_owned(),
                request: String::from_utf8_lossy(&body).into_owned(),
                headers: headers.clone(),
            });
            let json = Bytes::from(serde_json::to_vec(&cmd).expect("commands serialize"));
            let result = match cluster.forward(&owner, json).await {
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
            tracing::debug!(%owner, digest = %digest, "the digest's owner could not be asked; executing here");
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
            let why = "this node has no graphql-endpoint";
            let errors = gql::errors_of(why, "origin_unavailable");
            let payload = format!(r#"{{"errors":{}}}"#, errors.get());
            return Some(Arc::from(
                RawValue::from_string(payload).expect("valid JSON"),
            ));
        };
        let (endpoint, metrics) = (endpoint.clone(), self.metrics.clone());
        self.flights
            .once(digest, publication, move || {
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

    /// Another node asks for a digest's result ([`Command::GraphqlExecute`]):
    /// 200 with the payload for subscribers, 204 when there is none.
    pub(crate) async fn execute_for_peer(&self, e: GraphqlExecute) -> CommandReply {
        let digest: Arc<str> = e.digest.into();
        let update = self
            .execute_once(&digest, &e.publication, Bytes::from(e.request), e.headers)
            .await;
        match update {
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

    /// Sends a re-execution's result to the digest's subscribers.
    fn deliver(&self, digest: &Arc<str>, update: Update) {
        let Some(payload) = update else {
            return;
        };
        let targets: Vec<(ConnKey, Arc<str>, Protocol)> = {
            let mut st = self.state.lock();
            let State { digests, conns, .. } = &mut *st;
            let Some(d) = digests.get_mut(digest) else {
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
            d.subscribers
                .iter()
                .filter_map(|(k, id)| conns.get(k).map(|c| (*k, id.clone(), c.ctx.protocol)))
                .collect()
        };
        for (key, id, protocol) in targets {
            if let Some(conn) = self.registry.get(&key) {
                // The id differs per subscriber: one frame each.
                self.push(&conn, &gql::result(protocol, &id, &payload));
                self.metrics.graphql_deliveries.inc();
            }
        }
    }
}

impl State {
    fn subscribe(
        &mut self,
        digest: &Arc<str>,
        key: &ConnKey,
        id: &Arc<str>,
        triggers: Vec<String>,
        new: impl FnOnce() -> Digest,
        metrics: &Metrics,
    ) {
        let d = self.digests.entry(digest.clone()).or_insert_with(|| {
            metrics.graphql_digests.inc();
            let mut d = new();
            d.triggers = triggers.into_iter().map(Into::into).collect();
            d
        });
        d.subscribers.insert((*key, id.clone()));
        for t in &d.triggers {
            self.by_trigger
                .entry(t.clone())
                .or_default()
                .insert(digest.clone());
        }
    }

    fn unsubscribe(&mut self, digest: &Arc<str>, key: &ConnKey, id: &str, metrics: &Metrics) {
        let Some(d) = self.digests.get_mut(digest) else {
            return;
        };
        d.subscribers.remove(&(*key, Arc::from(id)));
        if !d.subscribers.is_empty() {
            return;
        }
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
    }
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

/// The digest of a subscription whose answer named none: its query,
/// variables, operation name and user.
fn default_digest(op: &Operation, user: Option<&str>) -> String {
    let inputs = serde_json::json!([op.query, op.variables, op.operation_name, user]);
    hex::encode(Sha256::digest(inputs.to_string().as_bytes()))
}
