//! The edge: sockets and bytes. The listeners' accept loops, client streams
//! behind TLS, read buffers borrowed while a socket is readable, the
//! opening handshake and its `connect` decision, the task of each open
//! connection, and the control listener with its HTTP routes. It runs
//! commands and asks the origin through the handles in [`Edge`]; nothing
//! below it knows about it.

pub(crate) mod api;
pub(crate) mod connection;
pub(crate) mod control_listener;
pub(crate) mod fallback;
mod graphql;
pub(crate) mod handshake;
pub(crate) mod inbound;
pub(crate) mod listener;
pub(crate) mod timers;
pub(crate) mod tls;

use crate::admission::fds::Capacity;
use crate::admission::{HandshakeRate, UserCounts};
use crate::allowed_origins::OriginPattern;
use crate::channels::Channels;
use crate::commands::Commands;
use crate::config::Config;
use crate::conn::Registry;
use crate::metrics::Metrics;
use crate::origin::Origin;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use switchboard_proto::NodeId;
use tokio_util::task::TaskTracker;

/// What the edge uses: the node's configuration and admission state, and
/// handles to the parts below it (connections, channels, the origin,
/// commands).
#[derive(Debug)]
pub(crate) struct Edge {
    pub(crate) config: Arc<Config>,
    pub(crate) node: NodeId,
    /// `allowed-origins`, parsed (empty: any).
    pub(crate) allowed_origins: Vec<OriginPattern>,
    /// TLS on both listeners, when a certificate is configured.
    pub(crate) tls: Option<Arc<tls::Tls>>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) channels: Arc<Channels>,
    pub(crate) origin: Arc<Origin>,
    pub(crate) commands: Arc<Commands>,
    pub(crate) metrics: Arc<Metrics>,
    /// Request headers forwarded in `connect`, lower-case.
    pub(crate) forward_headers: Vec<String>,
    /// Connection and handshake tasks.
    pub(crate) conn_tasks: TaskTracker,
    /// The deadlines of the WebSocket connection tasks.
    pub(crate) timers: timers::Timers,
    /// The tasks of HTTP fallback connections, for their requests.
    pub(crate) fallbacks: Arc<fallback::Links>,
    /// Hands requests to those tasks.
    pub(crate) runner: fallback::Runner,
    /// Open client sockets, handshaking ones included (not those refused
    /// at accept: they count in `refusing`).
    pub(crate) sockets: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// `max-handshakes-per-ip`, when set.
    pub(crate) handshake_rate: Option<HandshakeRate>,
    /// `max-connections-per-user`, when set.
    pub(crate) user_counts: Option<Arc<UserCounts>>,
    /// Sockets being answered with a capacity refusal.
    pub(crate) refusing: AtomicUsize,
    /// Client sockets the node holds and refuses at once, under the
    /// open-file limit.
    pub(crate) capacity: Capacity,
}

impl Edge {
    /// The edge of a node whose parts below are `commands`'s, with
    /// `backend_fds` descriptors kept for a cluster backend.
    pub(crate) fn new(
        commands: Arc<Commands>,
        tls: Option<Arc<tls::Tls>>,
        backend_fds: u64,
    ) -> Self {
        let config = commands.config.clone();
        let links: Arc<fallback::Links> = Arc::default();
        let runner = fallback::Runner::new(links.clone(), &commands);
        // Requests other nodes forward to this node's fallback sessions.
        let _ = commands.fallbacks.set(Arc::new(runner.clone()));
        Self {
            node: commands.node.clone(),
            allowed_origins: config
                .allowed_origins
                .iter()
                .filter_map(|p| OriginPattern::parse(p))
                .collect(),
            tls,
            registry: commands.registry.clone(),
            channels: commands.channels.clone(),
            origin: commands.origin.clone(),
            metrics: commands.metrics.clone(),
            forward_headers: config
                .forward_header
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            conn_tasks: TaskTracker::new(),
            timers: timers::Timers::new(),
            fallbacks: links.clone(),
            runner,
            sockets: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            handshake_rate: HandshakeRate::new(config.max_handshakes_per_ip),
            user_counts: UserCounts::new(config.max_connections_per_user),
            refusing: AtomicUsize::new(0),
            capacity: Capacity::new(&config, crate::admission::fds::nofile_limit(), backend_fds),
            commands,
            config,
        }
    }

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
                edge: Some(self.clone()),
                ip,
            },
            per_ip,
        )
    }

    /// Frees the count of one client socket from `ip` (see
    /// [`Edge::track_socket`]).
    pub(crate) fn release_socket(&self, ip: IpAddr) {
        self.sockets.fetch_sub(1, Relaxed);
        let mut m = self.per_ip.lock();
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// Counts one open client socket (see [`Edge::track_socket`]) until dropped.
#[derive(Debug)]
pub(crate) struct SocketGuard {
    /// None once handed over ([`SocketGuard::into_ip`]).
    edge: Option<Arc<Edge>>,
    ip: IpAddr,
}

impl SocketGuard {
    /// Hands the count over to a holder of the edge, which frees it with
    /// [`Edge::release_socket`]: a connection's task keeps the address
    /// alone, not a second pointer to the edge.
    pub(crate) fn into_ip(mut self) -> IpAddr {
        self.edge = None;
        self.ip
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(edge) = self.edge.take() {
            edge.release_socket(self.ip);
        }
    }
}
