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
    /// Sequence number of this heartbeat within the run: the sender matches
    /// its own heartbeats coming back to the time it sent them, to renew its
    /// lease (absent from nodes that predate leases: 0).
    #[serde(default)]
    pub seq: u64,
}

impl Heartbeat {
    /// How another node lists the sender in `GET /v1/nodes`, having last
    /// heard from it at `last_seen_ms`.
    pub fn peer_info(&self, last_seen_ms: u64) -> crate::control::NodeInfo {
        crate::control::NodeInfo {
            node: self.node.clone(),
            connections: self.connections,
            draining: self.draining,
            started_at_ms: self.started_at_ms,
            last_seen_ms,
            is_self: false,
        }
    }
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

    /// `<prefix>.nodes.reported`: a node back from a cut-off asks whether
    /// its run (payload `<node>.<instance>`) was reported lost; only a node
    /// that reported it answers. Used when the key-value bucket is missing.
    pub fn reported(&self) -> String {
        format!("{}.nodes.reported", self.prefix)
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

    /// The JetStream key-value bucket of sessions' records (key: the
    /// connection id): the prefix with `.` replaced by `_`, then `_sessions`.
    pub fn session_bucket(&self) -> String {
        format!("{}_sessions", self.prefix.replace('.', "_"))
    }

    /// The JetStream stream of sessions' direct messages: the prefix with
    /// `.` replaced by `_`, then `_session_messages`.
    pub fn session_stream(&self) -> String {
        format!("{}_session_messages", self.prefix.replace('.', "_"))
    }

    /// `<prefix>.session.<connection id>`: a session's direct messages, in
    /// [`Subjects::session_stream`].
    pub fn session_messages(&self, connection: &str) -> String {
        format!("{}.session.{connection}", self.prefix)
    }

    /// `<prefix>.session.>`: the subjects of [`Subjects::session_stream`].
    pub fn session_messages_all(&self) -> String {
        format!("{}.session.>", self.prefix)
    }

    /// Queue group of the `<prefix>.control` subscribers.
    pub const CONTROL_QUEUE: &'static str = "switchboard-control";

    /// `<prefix>.chan.<namespace>.<name>`: a channel's live messages and its
    /// members' joins and leaves, for the nodes with subscribers of it. The
    /// name is [`channel_token`]-escaped.
    pub fn channel_live(&self, channel: &str) -> String {
        self.channel_subject("chan", channel)
    }

    /// `<prefix>.log.<namespace>.<name>`: a channel's log, in its
    /// namespace's JetStream stream ([`Subjects::channel_stream`]).
    pub fn channel_log(&self, channel: &str) -> String {
        self.channel_subject("log", channel)
    }

    /// `<prefix>.log.<namespace>.>`: the subjects of a namespace's stream.
    pub fn channel_log_all(&self, namespace: &str) -> String {
        format!("{}.log.{namespace}.>", self.prefix)
    }

    /// The JetStream stream of a namespace's channel logs: the prefix with
    /// `.` replaced by `_`, then `_ch_<namespace>`.
    pub fn channel_stream(&self, namespace: &str) -> String {
        format!("{}_ch_{namespace}", self.prefix.replace('.', "_"))
    }

    /// `<prefix>.channels.presence`: presence requests (the channel name is
    /// the payload); every node answers with its own subscribers.
    pub fn channel_presence(&self) -> String {
        format!("{}.channels.presence", self.prefix)
    }

    fn channel_subject(&self, kind: &str, channel: &str) -> String {
        let (ns, name) = channel.split_once(':').unwrap_or(("", channel));
        format!("{}.{kind}.{ns}.{}", self.prefix, channel_token(name))
    }

    /// Kinds of events that are published (not requested) to a NATS origin.
    pub const PUBLISHED_EVENT_KINDS: [&'static str; 4] =
        ["message", "disconnect", "keepalive", "node_down"];
}

/// A channel name (the part after the namespace) as one NATS subject
/// token: ASCII letters, digits and `-_:=+,@!~` stay, every other byte is
/// `%XX` (so `.`, `*`, `>` and `%` itself never appear).
pub fn channel_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_:=+,@!~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Headers of channel messages on [`Subjects::channel_live`] and in the
/// log ([`Subjects::channel_log`]).
pub mod channel_headers {
    /// The message's offset within its epoch.
    pub const OFFSET: &str = "Switchboard-Offset";
    /// The channel's epoch.
    pub const EPOCH: &str = "Switchboard-Epoch";
    /// In the log: the stream sequence of the channel's previous message (0:
    /// the first of its epoch), so the log can be walked back.
    pub const PREV: &str = "Switchboard-Prev";
    /// When it was published, Unix time in milliseconds.
    pub const TIME: &str = "Switchboard-Time";
    /// `binary` for a binary message (text otherwise).
    pub const KIND: &str = "Switchboard-Kind";
    /// On the live subject: `join` or `leave` (the payload is the member's
    /// JSON) instead of a message.
    pub const EVENT: &str = "Switchboard-Event";
    /// The node that sent a join, a leave or a presence request.
    pub const NODE: &str = "Switchboard-Node";
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
        assert_eq!(s.channel_live("chat:room-1"), "acme.prod.chan.chat.room-1");
        assert_eq!(
            s.channel_log("chat:a.b>*"),
            "acme.prod.log.chat.a%2Eb%3E%2A"
        );
        assert_eq!(s.channel_log_all("chat"), "acme.prod.log.chat.>");
        assert_eq!(s.channel_stream("chat"), "acme_prod_ch_chat");
    }

    #[test]
    fn channel_tokens_are_single_safe_tokens() {
        assert_eq!(channel_token("user:42@x"), "user:42@x");
        assert_eq!(channel_token("a b%é"), "a%20b%25%C3%A9");
        for name in ["a.b", "*", ">", "x y", "%41"] {
            let t = channel_token(name);
            assert!(!t.contains(['.', '*', '>', ' ']), "{t}");
        }
        // Distinct names stay distinct.
        assert_ne!(channel_token("%41"), channel_token("A"));
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
