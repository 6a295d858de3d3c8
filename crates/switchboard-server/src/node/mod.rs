//! The node: the only part that holds every other. It builds them
//! (`Commands`, then the `Edge` over them), binds the listeners, runs the
//! accept loop and the background tasks (origin lanes, keepalives, sweeps,
//! certificate reload), and drains; [`LocalNode`] is the node as a cluster
//! backend sees it.
//!
//! [`Gateway::bind`] opens both listeners (so a bad address fails before
//! anything runs); [`Gateway::run`] serves until its shutdown future resolves,
//! then drains: `/readyz` turns 503, the client listener closes, clients are
//! closed with 1012 spread over `drain-spread`, every pending origin event
//! (disconnects included) is delivered, all within `drain-timeout`.

use crate::clock::now_ms;
use crate::commands::Commands;
use crate::config::{Config, ConfigError};
use crate::conn::CloseRequest;
use crate::edge::{self, Edge};
use crate::origin::dispatcher;
use crate::origin::http::HttpOrigin;
use crate::origin::{DevOrigin, OriginTransport};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_backend::Cluster;
use switchboard_proto::origin::{ClosedBy, Event, KeepaliveEvent};
use switchboard_proto::ws::close;
use switchboard_proto::NodeId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod local;

pub use local::LocalNode;

/// Most `keepalive` ids in one event.
pub const KEEPALIVE_CHUNK: usize = 10_000;

/// Errors starting a gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The origin transport could not be set up.
    #[error("origin: {0}")]
    Origin(#[from] crate::origin::OriginError),
    /// The client token settings cannot be used.
    #[error(transparent)]
    Auth(#[from] crate::admission::tokens::AuthSetupError),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::edge::tls::TlsSetupError),
}

/// What a drain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections closed by the drain.
    pub closed: usize,
    /// Whether everything (connections and origin events) finished in time.
    pub completed: bool,
    /// Origin events abandoned at the deadline.
    pub events_dropped: u64,
}

/// A bound, not yet running, gateway node.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Edge>,
    client: TcpListener,
    control: TcpListener,
}

fn bind_listener(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    let err = |source| GatewayError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    // Accepted sockets inherit it from the listener (Linux, BSDs): no
    // `setsockopt` per connection.
    socket.set_nodelay(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    // The kernel caps this at net.core.somaxconn.
    socket.listen(65_535).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// What a cluster backend brings to a node before it binds (see
/// [`Gateway::bind_with`]).
#[derive(Debug, Clone, Default)]
pub struct BindOptions {
    /// The origin transport, when the backend carries the origin
    /// (`origin = "nats"` or `"redis"`). Without it the node uses the webhook `origin`
    /// names, or dev mode.
    pub transport: Option<Arc<dyn OriginTransport>>,
    /// Descriptors the backend holds (its broker connections), kept out of
    /// the client sockets' budget (see [`crate::fds::CLUSTER_RESERVE`]).
    pub backend_fds: u64,
}

impl Gateway {
    /// Validates `config`, sets up the origin transport it names, and binds
    /// both listeners.
    pub async fn bind(config: Config) -> Result<Self, GatewayError> {
        Self::bind_with(config, BindOptions::default()).await
    }

    /// Like [`Gateway::bind`], for a node a backend is about to join.
    pub async fn bind_with(config: Config, options: BindOptions) -> Result<Self, GatewayError> {
        config.validate()?;
        // The node id the transport sends in `x-switchboard-node` (random when unset).
        let node = node_id(&config);
        let lease = Arc::new(crate::lease::Lease::unlimited());
        let transport: Arc<dyn OriginTransport> = match (options.transport, &config.origin) {
            (Some(transport), _) => transport,
            (None, Some(_)) if config.origin_is_nats() => {
                return Err(GatewayError::Config(ConfigError {
                    field: "origin",
                    problem: "the NATS origin needs a NATS backend (the `nats` setting)".into(),
                }))
            }
            (None, Some(_)) if config.origin_is_redis() => {
                return Err(GatewayError::Config(ConfigError {
                    field: "origin",
                    problem: "the Redis origin needs a Redis backend (the `redis` setting)".into(),
                }))
            }
            (None, Some(url)) => Arc::new(
                HttpOrigin::new(
                    url,
                    config.origin_secret.as_deref(),
                    config.origin_timeout,
                    node.as_str(),
                )?
                .gated_by(lease.clone()),
            ),
            (None, None) => Arc::new(DevOrigin),
        };
        let auth = crate::admission::tokens::Authenticator::new(&config)?;
        if let Some(a) = &auth {
            a.prefetch().await;
        }
        let tls = crate::edge::tls::Tls::from_config(&config)?;
        let client = bind_listener(config.listen)?;
        let control = bind_listener(config.control_listen)?;
        let commands = Commands::new(config, node, transport, lease, auth).map_err(|problem| {
            GatewayError::Config(ConfigError {
                field: "graphql-endpoint",
                problem,
            })
        })?;
        let commands = Arc::new(commands);
        let shared = Arc::new(Edge::new(commands, tls, options.backend_fds));
        Ok(Self {
            shared,
            client,
            control,
        })
    }

    /// The client listener's address (useful with port 0).
    pub fn client_addr(&self) -> SocketAddr {
        self.client
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The control listener's address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The client sockets this node holds and refuses at once: its
    /// `max-connections` under the open-file limit it was bound with.
    pub fn capacity(&self) -> crate::admission::fds::Capacity {
        self.shared.capacity
    }

    /// This node, for a cluster backend.
    pub fn local_node(&self) -> LocalNode {
        LocalNode {
            commands: self.shared.commands.clone(),
        }
    }

    /// Joins a cluster: commands for other nodes' connections go through
    /// `cluster` from now on, and it is told to leave at the end of the drain.
    /// A node joins at most once; a second call returns `false`.
    pub fn join_cluster(&self, cluster: Arc<dyn Cluster>) -> bool {
        let _ = self.shared.commands.graphql.cluster.set(cluster.clone());
        self.shared.commands.cluster.set(cluster).is_ok()
    }

    /// Keeps sessions in `store` (the cluster's), so that a session
    /// outlives this node: another node adopts it when this one is lost.
    /// Call before serving; a second call returns `false`.
    pub fn join_session_store(&self, store: Arc<dyn switchboard_backend::SessionStore>) -> bool {
        self.shared.commands.sessions.join_store(store)
    }

    /// Makes `bus` the home of every channel's log, so channels, history,
    /// recovery and presence span the cluster. Call before serving; a
    /// second call returns `false`.
    pub fn join_channel_bus(&self, bus: Arc<dyn crate::bus::ChannelBus>) -> bool {
        self.shared
            .channels
            .join_bus(bus, self.shared.metrics.clone())
    }

    /// Describes the build (label, value: version, commit, build date,
    /// features…) for `/healthz`, the startup log line and the
    /// `switchboard_build_info` metric. Before [`Gateway::run`]; a second
    /// call returns `false`. Unset, the library's version is used.
    pub fn set_build_info(&self, labels: &[(&'static str, &'static str)]) -> bool {
        self.shared.commands.build.set(labels.to_vec()).is_ok()
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.shared.node
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> DrainReport {
        let Self {
            shared,
            client,
            control,
        } = self;
        if shared.config.origin.is_none() {
            tracing::warn!(
                "DEV MODE: no origin configured; every connection is accepted and events are discarded"
            );
        }
        let cap = shared.capacity;
        if cap.lowered {
            tracing::warn!(
                max_connections = shared.config.max_connections,
                lowered_to = cap.max_connections,
                fd_limit = cap.fd_limit,
                "max-connections lowered to fit the open-file limit (RLIMIT_NOFILE)"
            );
        }
        let build = shared.commands.build_info();
        shared
            .metrics
            .build_info
            .get_or_create(&build.to_vec())
            .set(1);
        let label = |k: &str| {
            build
                .iter()
                .find(|(l, _)| *l == k)
                .map_or("unknown", |(_, v)| *v)
        };
        tracing::info!(
            node = %shared.node,
            version = label("version"),
            commit = label("commit"),
            listen = %client.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            control = %control.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            max_connections = cap.max_connections,
            fd_limit = cap.fd_limit,
            fd_reserve = cap.reserve,
            "switchboard node started"
        );
        let workers = TaskTracker::new();
        for idx in 0..shared.origin.dispatcher.lane_count() {
            workers.spawn(dispatcher::run_lane(shared.origin.clone(), idx));
        }
        let stop_background = CancellationToken::new();
        workers.spawn(keepalive_loop(shared.clone(), stop_background.clone()));
        workers.spawn(sweep_loop(shared.clone(), stop_background.clone()));
        workers.spawn(
            shared
                .commands
                .sessions
                .clone()
                .replicate(stop_background.clone()),
        );
        if let Some(tls) = &shared.tls {
            workers.spawn(tls.clone().reload_loop(
                shared.config.tls_reload_interval,
                shared.clone(),
                stop_background.clone(),
            ));
        }
        let control_stop = CancellationToken::new();
        let control_task = tokio::spawn(edge::api::serve(
            shared.clone(),
            control,
            control_stop.clone(),
        ));

        // The accept loop runs as a task of the runtime, not on the thread
        // that awaits `run` (the binary's main thread): each handshake it
        // spawns then starts on the accepting worker's own queue, instead of
        // waking another thread (a futex call on each side) per connection.
        let stop_accepting = CancellationToken::new();
        // Also when `run` itself is dropped (an aborted task): the loop
        // would otherwise go on accepting without a node to drain it.
        let _stop_on_drop = stop_accepting.clone().drop_guard();
        let mut accepting = tokio::spawn({
            let (shared, stop) = (shared.clone(), stop_accepting.clone());
            async move {
                edge::listener::accept_loop(&shared, &client, stop.cancelled()).await;
                // Dropped here: the listener closes as the drain begins.
                drop(client);
            }
        });
        // The loop ends early only by a panic, which goes on up from here
        // as it did when the loop ran inline.
        let ended = tokio::select! {
            () = shutdown => None,
            r = &mut accepting => Some(r),
        };
        // Draining from here, before the listener closes (`/readyz` turns
        // 503 first, and a handshake accepted meanwhile sees the drain).
        shared.commands.draining.store(true, Relaxed);
        stop_accepting.cancel();
        let ended = match ended {
            Some(r) => r,
            None => accepting.await,
        };
        if let Err(e) = ended {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }

        // --- drain ---
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
        // In a cluster with other live nodes, sessions move to them: their
        // clients are closed with 1012 and the session kept, and resume on
        // another node, which takes the session from here. Otherwise
        // sessions die with the node: lost sockets end theirs from now on,
        // and the suspended ones end now (each with its `disconnect`).
        let hand_over = shared.commands.sessions.enabled()
            && !crate::commands::handoff::heirs(&shared.commands).is_empty();
        if !hand_over {
            shared.commands.sessions.shut_down();
            shared.commands.sessions.end_all(false);
        }
        tracing::info!(connections = shared.registry.len(), hand_over, "draining");
        let closed = close_spread(&shared, deadline, hand_over).await;
        shared.conn_tasks.close();
        let conns_done = tokio::time::timeout_at(deadline, shared.conn_tasks.wait())
            .await
            .is_ok();
        if hand_over {
            hand_over_sessions(&shared, deadline).await;
        }
        // Sessions suspended by a task that ended just as the drain began,
        // and those no other node took.
        shared.commands.sessions.end_all(false);
        stop_background.cancel();
        shared.origin.dispatcher.close();
        workers.close();
        let events_done = tokio::time::timeout_at(deadline, workers.wait())
            .await
            .is_ok();
        let dropped_before = shared.metrics.origin_events_dropped.get();
        if !(conns_done && events_done) {
            shared.origin.give_up.cancel();
            // Lanes observe `give_up` at once and account for what they drop.
            let _ = tokio::time::timeout(Duration::from_secs(1), workers.wait()).await;
        }
        let events_dropped = shared.metrics.origin_events_dropped.get() - dropped_before
            + shared.origin.dispatcher.pending() as u64;
        if let Some(cluster) = shared.commands.cluster.get() {
            // Last: commands for connections closing in the drain still
            // routed. Only a complete drain leaves quietly; otherwise the
            // cluster reports this node lost, so the origin learns that the
            // connections whose `disconnect` was dropped are gone.
            if conns_done && events_done && events_dropped == 0 {
                let _ = tokio::time::timeout(Duration::from_secs(2), cluster.leave()).await;
            } else {
                tracing::warn!(
                    "drain incomplete: not leaving the cluster quietly; a node_down will follow"
                );
            }
        }
        control_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), control_task).await;
        let completed = conns_done && events_done;
        tracing::info!(closed, completed, events_dropped, elapsed = ?started.elapsed(), "drain finished");
        DrainReport {
            closed,
            completed,
            events_dropped,
        }
    }
}

fn node_id(config: &Config) -> NodeId {
    match &config.node_id {
        // validate() has checked it.
        Some(id) => NodeId::new(id).unwrap_or_else(|_| NodeId::random()),
        None => NodeId::random(),
    }
}

/// How long a draining node that hands its sessions over waits, after its
/// last client is closed, for the clients to resume elsewhere (each resume
/// takes its session from here) before it hands the rest over itself.
const RESUME_WAIT: Duration = Duration::from_secs(3);

/// Hands the draining node's sessions to the other nodes: those whose
/// clients resume meanwhile go as they resume, the rest are given to the
/// other nodes (`commands::handoff::hand_over_all`).
async fn hand_over_sessions(shared: &Arc<Edge>, deadline: tokio::time::Instant) {
    let sessions = &shared.commands.sessions;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let until = tokio::time::Instant::now() + RESUME_WAIT.min(left / 3);
    while sessions.suspended_count() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A hand-over under way is not cut short (each request is bounded by
    // the cluster's forward timeout).
    // No new hand-over starts past half of what is left of the drain, so
    // that the `disconnect`s of the rest still go out in time.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let until = tokio::time::Instant::now() + left / 2;
    let handed = crate::commands::handoff::hand_over_all(&shared.commands, until).await;
    // From now on, sessions die with the node.
    sessions.shut_down();
    tracing::info!(
        handed,
        left = sessions.suspended_count(),
        "sessions handed over"
    );
}

/// Closes every connection with 1012, spread evenly over `drain-spread`:
/// connection `i` of `n` is closed at `start + spread * i / n` (to a 10 ms
/// granularity), so a few clients are spread as much as a million.
/// `keep_sessions`: sessions are kept (suspended) for their clients to
/// resume on another node.
pub(crate) async fn close_spread(
    shared: &Arc<Edge>,
    deadline: tokio::time::Instant,
    keep_sessions: bool,
) -> usize {
    const GRANULARITY: Duration = Duration::from_millis(10);
    let conns = shared.registry.snapshot();
    let total = conns.len();
    let start = tokio::time::Instant::now();
    let spread = shared.config.drain_spread;
    for (i, c) in conns.iter().enumerate() {
        let at = (start + spread.mul_f64(i as f64 / total as f64)).min(deadline);
        if at > tokio::time::Instant::now() + GRANULARITY {
            tokio::time::sleep_until(at).await;
        }
        let keep = keep_sessions && c.session().is_some();
        c.request_close(CloseRequest {
            code: close::SERVICE_RESTART,
            reason: if keep {
                "server restart, resume on another node".into()
            } else {
                "server restart, reconnect".into()
            },
            by: ClosedBy::Gateway,
            flush_first: true,
            takeover: keep,
        });
    }
    total
}

/// How often expired channel messages and idle channels are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Expires channel history, drops idle channels and forgets refilled
/// handshake buckets, every [`SWEEP_INTERVAL`].
async fn sweep_loop(shared: Arc<Edge>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                shared.channels.sweep(&shared.metrics);
                shared.commands.sessions.expire(std::time::Instant::now());
                if let Some(rate) = &shared.handshake_rate {
                    rate.sweep(std::time::Instant::now());
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Sends `keepalive` events listing live connections, in chunks.
async fn keepalive_loop(shared: Arc<Edge>, stop: CancellationToken) {
    let every = shared.config.keepalive_interval;
    if every.is_zero() || shared.config.origin.is_none() {
        return;
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        round += 1;
        let mut ids = Vec::with_capacity(shared.registry.len());
        shared.registry.for_each_id(|id| ids.push(id.to_string()));
        let suspended = shared.commands.sessions.suspended_ids();
        // A node with no connections says so too (one empty list), so an
        // origin repairing drift from keepalives learns "none here".
        let chunks: Vec<&[String]> = if ids.is_empty() {
            vec![&[]]
        } else {
            ids.chunks(KEEPALIVE_CHUNK).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let event = Event::Keepalive(KeepaliveEvent {
                // Unique across runs of a node id (JetStream deduplicates on it).
                id: crate::origin::ask::event_id::keepalive(
                    &shared.node,
                    shared.commands.started_at_ms,
                    round,
                    i,
                ),
                node: shared.node.to_string(),
                timestamp_ms: now_ms(),
                connection_ids: chunk.to_vec(),
                suspended: chunk
                    .iter()
                    .filter(|id| suspended.contains(id.as_str()))
                    .cloned()
                    .collect(),
            });
            let json = serde_json::to_vec(&event).expect("events serialize");
            let body = dispatcher::batch_body([&json[..]]);
            if !shared.origin.lease.is_held() {
                // Cut off from the cluster (or fenced): the next round
                // follows the renewal.
                shared
                    .metrics
                    .lease_refusals
                    .get_or_create(&crate::metrics::KindLabel { kind: "keepalive" })
                    .inc();
                break;
            }
            let started = Instant::now();
            // A drain does not wait for keepalives.
            let r = tokio::select! {
                r = shared.origin.transport.deliver(body) => r,
                _ = stop.cancelled() => return,
            };
            let kind = crate::metrics::KindLabel { kind: "keepalive" };
            shared.metrics.origin_request(kind.kind, started.elapsed());
            match r {
                Ok(answer) => dispatcher::deliver_replies(&shared.origin, answer.replies),
                Err(e) => {
                    shared.metrics.origin_failures.get_or_create(&kind).inc();
                    tracing::warn!(error = %e, "keepalive not delivered (the next one will follow)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Small frames go out at once: every accepted socket has `TCP_NODELAY`,
    /// inherited from the listener.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = super::bind_listener(([127, 0, 0, 1], 0).into()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
    }
}
