//! Commands: what the control API, other nodes and native clients ask this
//! node to do. `control` executes control commands here or forwards them to
//! the node holding their connection; `native` runs the commands of the
//! native protocol `switchboard.v1`. Both act through [`Commands`], built
//! with the handles they use: connections, channels, the origin and the
//! cluster, and sessions. Nothing here knows about sockets or HTTP.

pub(crate) mod control;
pub(crate) mod handoff;
pub(crate) mod native;

use crate::admission::tokens::Authenticator;
use crate::channels::Channels;
use crate::config::Config;
use crate::conn::Registry;
use crate::graphql::Graphql;
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::origin::dispatcher::Dispatcher;
use crate::origin::{Origin, OriginTransport};
use crate::sessions::Sessions;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use switchboard_backend::Cluster;
use switchboard_proto::NodeId;
use tokio_util::sync::CancellationToken;

/// What commands act on.
#[derive(Debug)]
pub(crate) struct Commands {
    pub(crate) config: Arc<Config>,
    pub(crate) node: NodeId,
    /// Verifies client tokens (in-band refresh), when a key is configured.
    pub(crate) auth: Option<Authenticator>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) channels: Arc<Channels>,
    pub(crate) origin: Arc<Origin>,
    /// Native connections' sessions (suspended, resumed, ended).
    pub(crate) sessions: Arc<Sessions>,
    /// GraphQL connections' operations and subscriptions.
    pub(crate) graphql: Arc<Graphql>,
    pub(crate) metrics: Arc<Metrics>,
    /// The other nodes, once a cluster backend has joined.
    pub(crate) cluster: OnceLock<Arc<dyn Cluster>>,
    /// The right to speak for this node's connections.
    pub(crate) lease: Arc<Lease>,
    /// The node is draining (it reports so, and `/readyz` answers 503).
    pub(crate) draining: AtomicBool,
    /// Unix time in milliseconds.
    pub(crate) started_at_ms: u64,
    /// The build (label, value), set by whoever embeds the node.
    pub(crate) build: OnceLock<Vec<(&'static str, &'static str)>>,
    /// Runs HTTP fallback requests forwarded from other nodes: set by the
    /// edge, which holds the fallback connections.
    pub(crate) fallbacks: OnceLock<Arc<dyn FallbackRunner>>,
}

/// Runs the request of an HTTP fallback session held by this node
/// ([`switchboard_proto::control::Command::Fallback`]).
pub(crate) trait FallbackRunner: Send + Sync + std::fmt::Debug {
    /// Hands `req` to its session's task; the reply is what the client's
    /// request is answered with.
    fn run(
        &self,
        req: switchboard_proto::control::FallbackRequest,
    ) -> futures_util::future::BoxFuture<'static, switchboard_backend::CommandReply>;
}

impl Commands {
    /// The parts of a node below the edge, built from its configuration:
    /// connections, channels, and the origin behind `transport`. Fails
    /// when the GraphQL endpoint's client cannot be made.
    pub(crate) fn new(
        config: Config,
        node: NodeId,
        transport: Arc<dyn OriginTransport>,
        lease: Arc<Lease>,
        auth: Option<Authenticator>,
    ) -> Result<Self, String> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::new());
        let origin = Arc::new(Origin {
            config: config.clone(),
            transport,
            dispatcher: Dispatcher::new(
                config.origin_concurrency,
                config.origin_queue_size,
                config.origin_queue_bytes,
                config.max_pending_events,
            ),
            lease: lease.clone(),
            metrics: metrics.clone(),
            registry: registry.clone(),
            give_up: CancellationToken::new(),
        });
        let channels = Arc::new(Channels::new(&config));
        let started_at_ms = crate::clock::now_ms();
        let sessions = Arc::new(Sessions::new(
            config.clone(),
            node.clone(),
            registry.clone(),
            channels.clone(),
            origin.clone(),
            metrics.clone(),
            started_at_ms,
        ));
        let graphql = Arc::new(Graphql::new(
            config.clone(),
            node.clone(),
            metrics.clone(),
            registry.clone(),
        )?);
        Ok(Self {
            channels,
            sessions,
            graphql,
            config,
            node,
            auth,
            registry,
            origin,
            metrics,
            cluster: OnceLock::new(),
            lease,
            draining: AtomicBool::new(false),
            started_at_ms,
            build: OnceLock::new(),
            fallbacks: OnceLock::new(),
        })
    }

    /// The build's labels: as set, or this library's version.
    pub(crate) fn build_info(&self) -> &[(&'static str, &'static str)] {
        self.build
            .get_or_init(|| vec![("version", env!("CARGO_PKG_VERSION"))])
    }
}
