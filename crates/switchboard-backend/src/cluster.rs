//! The cluster seam: what a node needs from the other nodes, as the
//! [`Cluster`] trait a backend implements, and what a backend may do with
//! the node it serves, as the [`Node`] trait the gateway implements.
//!
//! A backend carries commands between nodes and keeps the membership; the
//! gateway decides what to forward (the owner node is read from the
//! connection id) and executes what it receives. Without a backend the node
//! is alone and nothing here is on any path.

use crate::lease::Lease;
use crate::BoxFuture;
use bytes::Bytes;
use switchboard_proto::control::NodeInfo;
use switchboard_proto::native::Member;

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

    /// Like [`Cluster::forward`], waiting up to `timeout` for the reply: a
    /// command whose work on the other node takes longer than a forward's
    /// (a GraphQL execution there). Backends without a timeout of their own
    /// forward as usual.
    fn forward_within(
        &self,
        node: &str,
        command: Bytes,
        timeout: std::time::Duration,
    ) -> BoxFuture<'_, Result<CommandReply, ClusterError>> {
        let _ = timeout;
        self.forward(node, command)
    }

    /// How long [`Cluster::forward`] waits for an answer before
    /// [`ClusterError::Timeout`]: a command that waits on the other node
    /// (an HTTP fallback's forwarded poll) waits well under it.
    fn forward_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }

    /// The other live nodes, as last heard from.
    fn peers(&self) -> Vec<NodeInfo>;

    /// Announces that this node leaves (after a drain) and stops.
    fn leave(&self) -> BoxFuture<'_, ()>;
}

/// The node a backend serves: its identity and counts, command execution,
/// its channel members, lost-node reports, and its lease. Implemented by the
/// gateway (`switchboard_server::LocalNode`); a backend holds it as
/// `Arc<dyn Node>`.
pub trait Node: Send + Sync + std::fmt::Debug + 'static {
    /// This node's id.
    fn id(&self) -> &str;

    /// Open connections.
    fn connections(&self) -> u64;

    /// Whether the node is draining.
    fn is_draining(&self) -> bool;

    /// When the node started, Unix time in milliseconds.
    fn started_at_ms(&self) -> u64;

    /// Executes a control command (JSON of
    /// [`switchboard_proto::control::Command`]). A command `forwarded` by
    /// another node is executed here only; otherwise commands for
    /// connections of other nodes are forwarded to them.
    fn execute<'a>(&'a self, command: &'a [u8], forwarded: bool) -> BoxFuture<'a, CommandReply>;

    /// The subscribers of `channel` on this node (for a cluster-wide
    /// presence answer).
    fn channel_members(&self, channel: &str) -> Vec<Member>;

    /// Tells the origin that `down_node` (its run `instance`, which
    /// started at `started_at_ms` and was last heard at `last_seen_ms`)
    /// died without draining: one `node_down` event, retried until
    /// delivered, after this node has adopted the sessions that run held
    /// (with a session store). The backend makes sure one node of the
    /// cluster calls this per lost run.
    fn report_node_down(
        &self,
        down_node: &str,
        instance: &str,
        started_at_ms: u64,
        last_seen_ms: u64,
    );

    /// The node's lease (see [`crate::lease`]): the backend binds it when it
    /// first announces this node, renews it as its heartbeats come back, and
    /// lets it run out while cut off.
    fn lease(&self) -> &Lease;

    /// Fences the node after the cluster reported it lost: events about its
    /// connections dropped, its connections closed with 1012 without
    /// `disconnect` events, new ones refused meanwhile. Returns how many
    /// were closed; afterwards the lease is unlimited again (a new run).
    fn fence(&self) -> BoxFuture<'_, usize>;
}
