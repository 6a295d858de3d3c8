//! The node: binding listeners, the accept loop, background tasks, and the
//! graceful drain.
//!
//! [`Gateway::bind`] opens both listeners (so a bad address fails before
//! anything runs); [`Gateway::run`] serves until its shutdown future resolves,
//! then drains: `/readyz` turns 503, the client listener closes, clients are
//! closed with 1012 spread over `drain-spread`, every pending origin event
//! (disconnects included) is delivered, all within `drain-timeout`.

use crate::channels::Channels;
use crate::cluster::LocalNode;
use crate::config::{Config, ConfigError};
use crate::conn::{CloseRequest, Registry};
use crate::control;
use crate::edge::handshake;
use crate::edge::stream::ClientStream;
use crate::metrics::Metrics;
use crate::origin::dispatcher::{self, Dispatcher};
use crate::origin::http::HttpOrigin;
use crate::origin::{DevOrigin, OriginTransport};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use switchboard_backend::Cluster;
use switchboard_proto::origin::{ClosedBy, Event, KeepaliveEvent};
use switchboard_proto::ws::close;
use switchboard_proto::NodeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// State shared by every task of the node.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// Verifies client tokens, when a key is configured.
    pub(crate) auth: Option<crate::admission::tokens::Authenticator>,
    /// `allowed-origins`, parsed (empty: any).
    pub(crate) allowed_origins: Vec<crate::allowed_origins::OriginPattern>,
    /// TLS on both listeners, when a certificate is configured.
    pub(crate) tls: Option<Arc<crate::edge::tls::Tls>>,
    pub(crate) node: NodeId,
    pub(crate) registry: Registry,
    pub(crate) channels: Channels,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) metrics: Metrics,
    pub(crate) transport: Arc<dyn OriginTransport>,
    /// The other nodes, once a cluster backend has joined.
    pub(crate) cluster: OnceLock<Arc<dyn Cluster>>,
    /// Unix time in milliseconds.
    pub(crate) started_at_ms: u64,
    /// Request headers forwarded in `connect`, lower-case.
    pub(crate) forward_headers: Vec<String>,
    pub(crate) draining: AtomicBool,
    /// Fires when the drain deadline passes: pending work is abandoned.
    pub(crate) give_up: CancellationToken,
    /// Connection and handshake tasks.
    pub(crate) conn_tasks: TaskTracker,
    /// Open client sockets, handshaking ones included (not those refused
    /// at accept: they count in `refusing`).
    pub(crate) sockets: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// `max-handshakes-per-ip`, when set.
    pub(crate) handshake_rate: Option<crate::admission::HandshakeRate>,
    /// `max-connections-per-user`, when set.
    pub(crate) user_counts: Option<Arc<crate::admission::UserCounts>>,
    /// Sockets being answered with a capacity refusal.
    pub(crate) refusing: AtomicUsize,
    /// The right to speak for this node's connections (see [`crate::lease`]).
    pub(crate) lease: Arc<crate::lease::Lease>,
    /// Client sockets the node holds and refuses at once, under the
    /// open-file limit.
    pub(crate) capacity: crate::admission::fds::Capacity,
}

impl Shared {
    /// Counts a new socket from `ip`; the guard uncounts it when dropped.
    /// Also returns how many sockets `ip` holds, this one included.
    pub(crate) fn track_socket(self: &Arc<Self>, ip: IpAddr) -> (SocketGuard, u32) {
        self.sockets.fetch_add(1, Relaxed);
        let per_ip = {
            let mut m = self.per_ip.lock();
            let n = m.entry(ip).or_insert(0);
            *n += 1;
            *n
        };
        (
            SocketGuard {
                shared: self.clone(),
                ip,
            },
            per_ip,
        )
    }
}

/// Counts one open client socket (see [`Shared::track_socket`]).
#[derive(Debug)]
pub(crate) struct SocketGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.shared.sockets.fetch_sub(1, Relaxed);
        let mut m = self.shared.per_ip.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
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
    shared: Arc<Shared>,
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
    socket.bind(&addr.into()).map_err(err)?;
    // The kernel caps this at net.core.somaxconn.
    socket.listen(65_535).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

impl Gateway {
    /// Validates `config`, sets up the origin transport it names, and binds
    /// both listeners.
    pub async fn bind(config: Config) -> Result<Self, GatewayError> {
        config.validate()?;
        let node = node_id(&config);
        let lease = Arc::new(crate::lease::Lease::unlimited());
        let transport: Arc<dyn OriginTransport> = match &config.origin {
            Some(_) if config.origin_is_nats() => {
                return Err(GatewayError::Config(ConfigError {
                    field: "origin",
                    problem: "the NATS origin needs a NATS backend: use bind_with_transport".into(),
                }))
            }
            Some(url) => Arc::new(
                HttpOrigin::new(
                    url,
                    config.origin_secret.as_deref(),
                    config.origin_timeout,
                    node.as_str(),
                )?
                .gated_by(lease.clone()),
            ),
            None => Arc::new(DevOrigin),
        };
        // The node id the transport sends in `x-switchboard-node` (random when unset).
        Self::bind_node(config, node, transport, lease).await
    }

    /// Like [`Gateway::bind`], with a given origin transport.
    pub async fn bind_with_transport(
        config: Config,
        transport: Arc<dyn OriginTransport>,
    ) -> Result<Self, GatewayError> {
        config.validate()?;
        let node = node_id(&config);
        let lease = Arc::new(crate::lease::Lease::unlimited());
        Self::bind_node(config, node, transport, lease).await
    }

    async fn bind_node(
        config: Config,
        node: NodeId,
        transport: Arc<dyn OriginTransport>,
        lease: Arc<crate::lease::Lease>,
    ) -> Result<Self, GatewayError> {
        let auth = crate::admission::tokens::Authenticator::new(&config)?;
        if let Some(a) = &auth {
            a.prefetch().await;
        }
        let tls = crate::edge::tls::Tls::from_config(&config)?;
        let client = bind_listener(config.listen)?;
        let control = bind_listener(config.control_listen)?;
        let shared = Arc::new(Shared {
            auth,
            tls,
            allowed_origins: config
                .allowed_origins
                .iter()
                .filter_map(|p| crate::allowed_origins::OriginPattern::parse(p))
                .collect(),
            node,
            registry: Registry::new(),
            channels: Channels::new(&config),
            dispatcher: Dispatcher::new(
                config.origin_concurrency,
                config.origin_queue_size,
                config.origin_queue_bytes,
                config.max_pending_events,
            ),
            metrics: Metrics::new(),
            transport,
            cluster: OnceLock::new(),
            started_at_ms: now_ms(),
            forward_headers: config
                .forward_header
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            draining: AtomicBool::new(false),
            give_up: CancellationToken::new(),
            conn_tasks: TaskTracker::new(),
            sockets: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            handshake_rate: crate::admission::HandshakeRate::new(config.max_handshakes_per_ip),
            user_counts: crate::admission::UserCounts::new(config.max_connections_per_user),
            refusing: AtomicUsize::new(0),
            lease,
            capacity: crate::admission::fds::Capacity::new(
                &config,
                crate::admission::fds::nofile_limit(),
            ),
            config,
        });
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

    #[cfg(test)]
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// This node, for a cluster backend.
    pub fn local_node(&self) -> LocalNode {
        LocalNode {
            shared: self.shared.clone(),
        }
    }

    /// Joins a cluster: commands for other nodes' connections go through
    /// `cluster` from now on, and it is told to leave at the end of the drain.
    /// A node joins at most once; a second call returns `false`.
    pub fn join_cluster(&self, cluster: Arc<dyn Cluster>) -> bool {
        self.shared.cluster.set(cluster).is_ok()
    }

    /// Makes `bus` the home of every channel's log, so channels, history,
    /// recovery and presence span the cluster. Call before serving; a
    /// second call returns `false`.
    pub fn join_channel_bus(&self, bus: Arc<dyn crate::bus::ChannelBus>) -> bool {
        self.shared
            .channels
            .join_bus(bus, Arc::downgrade(&self.shared))
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
        tracing::info!(
            node = %shared.node,
            listen = %client.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            control = %control.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            max_connections = cap.max_connections,
            fd_limit = cap.fd_limit,
            fd_reserve = cap.reserve,
            "switchboard node started"
        );
        let workers = TaskTracker::new();
        for idx in 0..shared.dispatcher.lane_count() {
            workers.spawn(dispatcher::run_lane(shared.clone(), idx));
        }
        let stop_background = CancellationToken::new();
        workers.spawn(keepalive_loop(shared.clone(), stop_background.clone()));
        workers.spawn(sweep_loop(shared.clone(), stop_background.clone()));
        if let Some(tls) = &shared.tls {
            workers.spawn(tls.clone().reload_loop(
                shared.config.tls_reload_interval,
                shared.clone(),
                stop_background.clone(),
            ));
        }
        let control_stop = CancellationToken::new();
        let control_task = tokio::spawn(control::serve(
            shared.clone(),
            control,
            control_stop.clone(),
        ));

        accept_loop(&shared, &client, shutdown).await;

        // --- drain ---
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
        shared.draining.store(true, Relaxed);
        drop(client);
        tracing::info!(connections = shared.registry.len(), "draining");
        let closed = close_spread(&shared, deadline).await;
        shared.conn_tasks.close();
        let conns_done = tokio::time::timeout_at(deadline, shared.conn_tasks.wait())
            .await
            .is_ok();
        stop_background.cancel();
        shared.dispatcher.close();
        workers.close();
        let events_done = tokio::time::timeout_at(deadline, workers.wait())
            .await
            .is_ok();
        let dropped_before = shared.metrics.origin_events_dropped.get();
        if !(conns_done && events_done) {
            shared.give_up.cancel();
            // Lanes observe `give_up` at once and account for what they drop.
            let _ = tokio::time::timeout(Duration::from_secs(1), workers.wait()).await;
        }
        let events_dropped = shared.metrics.origin_events_dropped.get() - dropped_before
            + shared.dispatcher.pending() as u64;
        if let Some(cluster) = shared.cluster.get() {
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

async fn accept_loop(
    shared: &Arc<Shared>,
    listener: &TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let shed = if shared.tls.is_some() {
        Shed::CloseClient
    } else {
        Shed::Answer503
    };
    let mut acceptor = Acceptor::new("client", shed);
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => return,
            pair = acceptor.accept(listener, &shared.metrics) => pair,
        };
        accept_one(shared, stream, remote);
    }
}

/// Longest pause of an accept loop after failed `accept()` calls.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What an accept loop does with a socket it takes only to answer it
/// (see [`Acceptor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    /// Answer 503 `over_capacity` (plain HTTP) and close; counted as a
    /// handshake refusal.
    Answer503,
    /// Close at once (TLS listeners: nothing can be said before TLS is up);
    /// counted as a handshake refusal.
    CloseClient,
    /// Close at once (control listener with TLS).
    Close,
}

/// Accepts the sockets of one listener. When `accept()` fails for want of
/// descriptors (EMFILE, ENFILE), the pending client would wait in the
/// backlog, unanswered, until some descriptor frees up: instead, a spare
/// descriptor held for this is closed, the client is accepted, answered
/// (see [`Shed`]) and closed, and the spare is taken again. Every failure
/// counts in `switchboard_accept_errors_total{listener}` and is followed by
/// a pause that doubles while failures go on (up to
/// [`ACCEPT_BACKOFF_MAX`]), so the loop never spins; the log says so at
/// most once a second.
#[derive(Debug)]
pub(crate) struct Acceptor {
    listener: &'static str,
    shed: Shed,
    spare: Option<std::fs::File>,
    backoff: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Acceptor {
    /// An acceptor for the listener named `listener` in logs and metrics.
    pub(crate) fn new(listener: &'static str, shed: Shed) -> Self {
        Self {
            listener,
            shed,
            spare: open_spare(),
            backoff: Duration::ZERO,
            last_log: None,
            unlogged: 0,
        }
    }

    /// The next socket of `listener`.
    pub(crate) async fn accept(
        &mut self,
        listener: &TcpListener,
        metrics: &Metrics,
    ) -> (TcpStream, SocketAddr) {
        loop {
            let e = match listener.accept().await {
                Ok(pair) => {
                    self.backoff = Duration::ZERO;
                    return pair;
                }
                Err(e) => e,
            };
            metrics
                .accept_errors
                .get_or_create(&crate::metrics::ListenerLabel {
                    listener: self.listener,
                })
                .inc();
            let out_of_fds = is_out_of_descriptors(&e);
            let shed = out_of_fds && self.shed_one(listener, metrics);
            self.unlogged += 1;
            if self
                .last_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                tracing::warn!(
                    error = %e,
                    listener = self.listener,
                    failures = self.unlogged,
                    out_of_descriptors = out_of_fds,
                    "accept failed; pausing (waiting clients are refused meanwhile while a spare descriptor allows)"
                );
                self.last_log = Some(Instant::now());
                self.unlogged = 0;
            }
            self.backoff = if shed {
                // A client was answered: the backlog moves; keep going.
                Duration::from_millis(5)
            } else {
                (self.backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX)
            };
            tokio::time::sleep(self.backoff).await;
        }
    }

    /// Frees the spare descriptor to accept one waiting client, refuses it
    /// and closes it; `true` if a client was refused.
    fn shed_one(&mut self, listener: &TcpListener, metrics: &Metrics) -> bool {
        use futures_util::FutureExt;
        if self.spare.take().is_none() {
            self.spare = open_spare();
            return false;
        }
        let refused = match listener.accept().now_or_never() {
            Some(Ok((stream, _))) => {
                match self.shed {
                    Shed::Answer503 => {
                        metrics.handshake("over_capacity");
                        handshake::over_capacity_now(stream);
                    }
                    Shed::CloseClient => metrics.handshake("over_capacity"),
                    Shed::Close => {}
                }
                true
            }
            _ => false,
        };
        self.spare = open_spare();
        refused
    }
}

/// A descriptor held in reserve by an accept loop.
fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// EMFILE (the process's limit) or ENFILE (the system's).
fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    // The same numbers on Linux and the BSDs.
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
}

fn accept_one(shared: &Arc<Shared>, stream: TcpStream, remote: SocketAddr) {
    // Far over capacity: not even a task to answer it (handshake.rs answers
    // at most `capacity.refusing` refusals at once, which no longer count
    // in `sockets`).
    let cap = &shared.capacity;
    let held = shared.sockets.load(Relaxed) + shared.refusing.load(Relaxed);
    if held >= cap.max_connections + cap.refusing {
        shared.metrics.handshake("over_capacity");
        if shared.tls.is_none() {
            handshake::over_capacity_now(stream);
        }
        return; // dropped: closes the socket
    }
    let _ = stream.set_nodelay(true);
    let (guard, per_ip) = shared.track_socket(remote.ip());
    let admission = handshake::Admission {
        per_ip,
        sockets: shared.sockets.load(Relaxed),
        rate_ok: shared
            .handshake_rate
            .as_ref()
            .is_none_or(|r| r.admit(remote.ip(), std::time::Instant::now())),
    };
    match &shared.tls {
        None => {
            shared.conn_tasks.spawn(handshake::handle(
                shared.clone(),
                ClientStream::Tcp(stream),
                remote,
                guard,
                admission,
            ));
        }
        Some(_) if !admission.rate_ok => {
            // Not worth a TLS handshake, which costs the server more than
            // the client: closed at once, without an answer.
            shared.metrics.handshake("too_many_handshakes");
        }
        Some(tls) => {
            let (shared, tls) = (shared.clone(), tls.clone());
            shared.clone().conn_tasks.spawn(async move {
                // The socket counts (and is capped) from accept on; its
                // guard is dropped with it if TLS fails.
                if let Some(stream) = crate::edge::tls::accept_client(&shared, &tls, stream).await {
                    handshake::handle(shared, stream, remote, guard, admission).await;
                }
            });
        }
    }
}

/// Closes every connection with 1012, spread evenly over `drain-spread`:
/// connection `i` of `n` is closed at `start + spread * i / n` (to a 10 ms
/// granularity), so a few clients are spread as much as a million.
pub(crate) async fn close_spread(shared: &Arc<Shared>, deadline: tokio::time::Instant) -> usize {
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
        c.request_close(CloseRequest {
            code: close::SERVICE_RESTART,
            reason: "server restart, reconnect".into(),
            by: ClosedBy::Gateway,
            flush_first: true,
        });
    }
    total
}

/// How often expired channel messages and idle channels are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Expires channel history, drops idle channels and forgets refilled
/// handshake buckets, every [`SWEEP_INTERVAL`].
async fn sweep_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                shared.channels.sweep(&shared.metrics);
                if let Some(rate) = &shared.handshake_rate {
                    rate.sweep(std::time::Instant::now());
                }
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Sends `keepalive` events listing live connections, in chunks.
async fn keepalive_loop(shared: Arc<Shared>, stop: CancellationToken) {
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
        for (i, chunk) in ids.chunks(KEEPALIVE_CHUNK).enumerate() {
            let event = Event::Keepalive(KeepaliveEvent {
                // Unique across runs of a node id (JetStream deduplicates on it).
                id: crate::origin::ask::event_id::keepalive(
                    &shared.node,
                    shared.started_at_ms,
                    round,
                    i,
                ),
                node: shared.node.to_string(),
                timestamp_ms: now_ms(),
                connection_ids: chunk.to_vec(),
            });
            let json = serde_json::to_vec(&event).expect("events serialize");
            let body = dispatcher::batch_body([&json[..]]);
            if !shared.lease.is_held() {
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
                r = shared.transport.deliver(body) => r,
                _ = stop.cancelled() => return,
            };
            let kind = crate::metrics::KindLabel { kind: "keepalive" };
            shared
                .metrics
                .origin_duration
                .get_or_create(&kind)
                .observe(started.elapsed().as_secs_f64());
            match r {
                Ok(answer) => dispatcher::deliver_replies(&shared, answer.replies),
                Err(e) => {
                    shared.metrics.origin_failures.get_or_create(&kind).inc();
                    tracing::warn!(error = %e, "keepalive not delivered (the next one will follow)");
                }
            }
        }
    }
}
