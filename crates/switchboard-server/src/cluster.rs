//! The cluster seam: what a node needs from the other nodes, as the
//! [`Cluster`] trait, and what a cluster backend may do with this node, as
//! [`LocalNode`].
//!
//! A backend (NATS: the `switchboard-nats` crate) carries commands between
//! nodes and keeps the membership; the gateway decides what to forward (the
//! owner node is read from the connection id) and executes what it receives.
//! Without a backend the node is alone and nothing here is on any path.

use crate::control;
use crate::gateway::{now_ms, Shared};
use crate::origin::BoxFuture;
use crate::Config;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use switchboard_proto::control::NodeInfo;
use switchboard_proto::origin::{Event, NodeDownEvent};
use switchboard_proto::NodeId;

/// How long a fence waits for its connections to close.
const FENCE_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A command's answer: the HTTP status of the equivalent control API route
/// and its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReply {
    /// HTTP status.
    pub status: u16,
    /// JSON body (a success body, or `{"code","message"}`).
    pub body: Bytes,
}

/// Why a forwarded command got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The bus is down or this node is cut off from it (answered 503
    /// `cluster_unavailable`).
    #[error("the cluster bus is unavailable: {0}")]
    Unavailable(String),
    /// No such node is alive (answered 404 `connection_not_found`).
    #[error("node {0} is not in the cluster")]
    NodeGone(String),
    /// The node is there but did not answer in time (answered 504
    /// `node_timeout`; the command may still be carried out).
    #[error("node {0} did not answer in time")]
    Timeout(String),
    /// The command is larger than the bus carries (answered 413
    /// `payload_too_large`).
    #[error("command too large for the cluster bus: {0}")]
    TooLarge(String),
}

/// The other nodes, as a cluster backend provides them.
pub trait Cluster: Send + Sync + std::fmt::Debug + 'static {
    /// Sends `command` (the JSON of a [`switchboard_proto::control::Command`])
    /// to `node` for local execution there, and returns its reply.
    fn forward(
        &self,
        node: &str,
        command: Bytes,
    ) -> BoxFuture<'_, Result<CommandReply, ClusterError>>;

    /// The other live nodes, as last heard from.
    fn peers(&self) -> Vec<NodeInfo>;

    /// Announces that this node leaves (after a drain) and stops.
    fn leave(&self) -> BoxFuture<'_, ()>;
}

/// This node, as seen by a cluster backend: its identity and counts, command
/// execution, and lost-node reports.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub(crate) shared: Arc<Shared>,
}

impl LocalNode {
    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.shared.node
    }

    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Open connections.
    pub fn connections(&self) -> u64 {
        self.shared.registry.len() as u64
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Relaxed)
    }

    /// When the node started, Unix time in milliseconds.
    pub fn started_at_ms(&self) -> u64 {
        self.shared.started_at_ms
    }

    /// Executes a control command (JSON of
    /// [`switchboard_proto::control::Command`]). A command `forwarded` by
    /// another node is executed here only; otherwise commands for connections
    /// of other nodes are forwarded to them.
    pub async fn execute(&self, command: &[u8], forwarded: bool) -> CommandReply {
        control::execute_json(&self.shared, command, forwarded).await
    }

    /// The node's lease (see [`crate::lease`]): the backend binds it when it
    /// first announces this node, renews it as its heartbeats come back, and
    /// lets it run out while cut off.
    pub fn lease(&self) -> &crate::lease::Lease {
        &self.shared.lease
    }

    /// Fences the node after the cluster reported it lost: drops every
    /// queued event about its connections, closes them all with 1012
    /// ("reconnect") without `disconnect` events — the origin retired them
    /// with `node_down` — and refuses new ones meanwhile. Returns how many
    /// were closed. Afterwards the lease is unlimited again: the backend
    /// starts a new run (a new instance) and binds it when it announces it.
    pub async fn fence(&self) -> usize {
        let s = &self.shared;
        s.lease.set_fencing(true);
        s.dispatcher.set_fencing(true);
        s.metrics.fences.inc();
        let deadline = tokio::time::Instant::now() + FENCE_CLOSE_TIMEOUT;
        let mut closed = 0;
        // Connections accepted just before the fence began register late:
        // close until none is left.
        loop {
            let conns = s.registry.snapshot();
            if conns.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            for c in &conns {
                c.request_close(crate::registry::CloseRequest {
                    code: switchboard_proto::ws::close::SERVICE_RESTART,
                    reason: "node fenced, reconnect".into(),
                    by: switchboard_proto::origin::ClosedBy::Gateway,
                    flush_first: false,
                });
            }
            closed = closed.max(conns.len());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let left = s.registry.len();
        if left > 0 {
            tracing::error!(left, "connections still open at the end of the fence");
        }
        s.lease.unbind();
        s.dispatcher.set_fencing(false);
        s.metrics
            .fenced_events
            .inc_by(s.dispatcher.take_fenced_drops());
        s.lease.set_fencing(false);
        closed
    }

    /// The subscribers of `channel` on this node (for a cluster-wide
    /// presence answer).
    pub fn channel_members(&self, channel: &str) -> Vec<switchboard_proto::native::Member> {
        self.shared.channels.local_members(channel)
    }

    /// Tells the origin that `down_node` (its run `instance`, last heard at
    /// `last_seen_ms`) died without draining: one `node_down` event, retried
    /// until delivered. The backend makes sure one node of the cluster calls this.
    pub fn report_node_down(&self, down_node: &str, instance: &str, last_seen_ms: u64) {
        let s = &self.shared;
        let event = Event::NodeDown(NodeDownEvent {
            id: format!("{down_node}:{instance}:node_down"),
            node: s.node.to_string(),
            timestamp_ms: now_ms(),
            down_node: down_node.to_owned(),
            last_seen_ms,
        });
        tracing::warn!(
            node = down_node,
            "node lost without draining; telling the origin"
        );
        let json = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
        // Reliable: never refused, like disconnects (at most one per lost
        // node), and kept through a fence of this node.
        s.dispatcher.enqueue_cluster_event(json);
    }
}
