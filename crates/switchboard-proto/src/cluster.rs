//! What crosses NATS between the nodes of a cluster and to a NATS origin:
//! the subject names under a prefix, and the heartbeat each node publishes.
//!
//! Control commands and their replies are [`crate::control::Command`] and the
//! HTTP route's body with a [`crate::control::STATUS_HEADER`]; events are the
//! webhook's [`crate::origin::EventBatch`].

use serde::{Deserialize, Serialize};

/// Published by every node on [`Subjects::heartbeat`] every
/// `cluster-heartbeat`, and once with `leaving: true` at the end of a drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node id.
    pub node: String,
    /// Random id of this run of the node: a restart with the same node id is
    /// a new instance.
    pub instance: String,
    /// Open connections.
    pub connections: u64,
    /// Whether the node is draining.
    pub draining: bool,
    /// When the node started, Unix time in milliseconds.
    pub started_at_ms: u64,
    /// The node is leaving the cluster gracefully (no `node_down` follows).
    #[serde(default)]
    pub leaving: bool,
}

/// A node sent a command with this header to another node: execute it there
/// only (never forward it again). The value is the sending node's id.
pub const FORWARDED_HEADER: &str = "Switchboard-Forwarded";

/// The node that published an event batch (as the webhook's `x-switchboard-node`).
pub const NODE_HEADER: &str = "Switchboard-Node";

/// Subject names under a prefix (`switchboard` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (tokens of `[A-Za-z0-9_-]` joined by `.`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// `<prefix>.nodes.heartbeat`: every node's [`Heartbeat`].
    pub fn heartbeat(&self) -> String {
        format!("{}.nodes.heartbeat", self.prefix)
    }

    /// `<prefix>.control`: commands any node answers (queue group
    /// [`Subjects::CONTROL_QUEUE`]), forwarding them where needed.
    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// `<prefix>.node.<node>.control`: commands for one node.
    pub fn node_control(&self, node: &str) -> String {
        format!("{}.node.{node}.control", self.prefix)
    }

    /// `<prefix>.events.<kind>`: events for a NATS origin (`connect` is a
    /// request; the others are published).
    pub fn events(&self, kind: &str) -> String {
        format!("{}.events.{kind}", self.prefix)
    }

    /// The JetStream key-value bucket where nodes agree on who reports a lost
    /// node: the prefix with `.` replaced by `_`, then `_cluster`.
    pub fn kv_bucket(&self) -> String {
        format!("{}_cluster", self.prefix.replace('.', "_"))
    }

    /// Queue group of the `<prefix>.control` subscribers.
    pub const CONTROL_QUEUE: &'static str = "switchboard-control";

    /// Kinds of events that are published (not requested) to a NATS origin.
    pub const PUBLISHED_EVENT_KINDS: [&'static str; 4] =
        ["message", "disconnect", "keepalive", "node_down"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_names() {
        let s = Subjects::new("acme.prod");
        assert_eq!(s.heartbeat(), "acme.prod.nodes.heartbeat");
        assert_eq!(s.control(), "acme.prod.control");
        assert_eq!(s.node_control("n-1"), "acme.prod.node.n-1.control");
        assert_eq!(s.events("connect"), "acme.prod.events.connect");
        assert_eq!(s.kv_bucket(), "acme_prod_cluster");
    }

    #[test]
    fn heartbeat_leaving_defaults_to_false() {
        let h: Heartbeat = serde_json::from_str(
            r#"{"node":"a","instance":"1f","connections":2,"draining":false,"started_at_ms":5}"#,
        )
        .unwrap();
        assert!(!h.leaving);
    }
}
