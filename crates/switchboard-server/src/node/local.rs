//! [`LocalNode`]: this node as a cluster backend sees it, the gateway's
//! implementation of [`switchboard_backend::Node`]. The seams themselves
//! ([`switchboard_backend::Cluster`], [`switchboard_backend::ChannelBus`])
//! live in the `switchboard-backend` crate, so backends depend on them and
//! not on the gateway.

use crate::clock::now_ms;
use crate::commands::{control, Commands};
use crate::Config;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use switchboard_backend::{BoxFuture, CommandReply, Lease, Node};
use switchboard_proto::native::Member;
use switchboard_proto::origin::{Event, NodeDownEvent};

/// How long a fence waits for its connections to close.
const FENCE_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// This node, as seen by a cluster backend: its identity and counts, command
/// execution, and lost-node reports.
#[derive(Debug, Clone)]
pub struct LocalNode {
    pub(crate) commands: Arc<Commands>,
}

impl LocalNode {
    /// The node's configuration.
    pub fn config(&self) -> &Config {
        &self.commands.config
    }

    /// Fences the node after the cluster reported it lost: drops every
    /// queued event about its connections, closes them all with 1012
    /// ("reconnect") without `disconnect` events — the origin retired them
    /// with `node_down` — and refuses new ones meanwhile. Returns how many
    /// were closed. Afterwards the lease is unlimited again: the backend
    /// starts a new run (a new instance) and binds it when it announces it.
    async fn fence_now(&self) -> usize {
        let s = &self.commands;
        s.lease.set_fencing(true);
        s.origin.dispatcher.set_fencing(true);
        s.metrics.fences.inc();
        let deadline = tokio::time::Instant::now() + FENCE_CLOSE_TIMEOUT;
        let mut closed = 0;
        // Connections accepted just before the fence began register late:
        // close until none is left.
        loop {
            // Suspended sessions have no socket to close: they end here
            // (sockets lost from now on end theirs: the lease is fencing).
            s.sessions.end_all(true);
            let conns = s.registry.snapshot();
            if conns.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            for c in &conns {
                c.request_close(crate::conn::CloseRequest {
                    code: switchboard_proto::ws::close::SERVICE_RESTART,
                    reason: "node fenced, reconnect".into(),
                    by: switchboard_proto::origin::ClosedBy::Gateway,
                    flush_first: false,
                    takeover: false,
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
        s.origin.dispatcher.set_fencing(false);
        s.metrics
            .fenced_events
            .inc_by(s.origin.dispatcher.take_fenced_drops());
        s.lease.set_fencing(false);
        closed
    }
}

impl Node for LocalNode {
    fn id(&self) -> &str {
        self.commands.node.as_str()
    }

    fn connections(&self) -> u64 {
        self.commands.registry.len() as u64
    }

    fn is_draining(&self) -> bool {
        self.commands.draining.load(Relaxed)
    }

    fn started_at_ms(&self) -> u64 {
        self.commands.started_at_ms
    }

    fn execute<'a>(&'a self, command: &'a [u8], forwarded: bool) -> BoxFuture<'a, CommandReply> {
        Box::pin(control::execute_json(&self.commands, command, forwarded))
    }

    fn channel_members(&self, channel: &str) -> Vec<Member> {
        self.commands.channels.local_members(channel)
    }

    fn lease(&self) -> &Lease {
        &self.commands.lease
    }

    fn fence(&self) -> BoxFuture<'_, usize> {
        Box::pin(self.fence_now())
    }

    fn report_node_down(
        &self,
        down_node: &str,
        instance: &str,
        started_at_ms: u64,
        last_seen_ms: u64,
    ) {
        let s = self.commands.clone();
        let (down_node, instance) = (down_node.to_owned(), instance.to_owned());
        tokio::spawn(async move {
            tracing::warn!(
                node = %down_node,
                "node lost without draining; telling the origin"
            );
            // Its sessions first: the event lists those that live on.
            let sessions_kept = s.sessions.take_over(&down_node, started_at_ms).await;
            let event = Event::NodeDown(NodeDownEvent {
                id: crate::origin::ask::event_id::node_down(&down_node, &instance),
                node: s.node.to_string(),
                timestamp_ms: now_ms(),
                down_node,
                last_seen_ms,
                sessions_kept,
            });
            let json = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
            // Reliable: never refused, like disconnects (at most one per lost
            // node), and kept through a fence of this node.
            s.origin.dispatcher.enqueue_cluster_event(json);
        });
    }
}
