//! Every key and pub/sub channel name of the backend, in one place
//! (`docs/cluster.md` lists them with their lifetimes).
//!
//! Keys that a script reads or writes together share a Redis Cluster hash
//! slot through a hash tag: the membership keys `{<prefix>}`, a channel's
//! log and idempotency keys `{<channel>}`, a session's messages
//! `{<connection id>}`. Pub/sub channel names are not keys.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The names of one cluster (one prefix).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// A node's membership key: its latest heartbeat, expiring after the
    /// heartbeat timeout.
    pub fn node(&self, node: &str) -> String {
        format!("{{{}}}:node:{node}", self.prefix)
    }

    /// A random value written once: when it changes, Redis lost its data
    /// (restarted without persistence, or flushed).
    pub fn generation(&self) -> String {
        format!("{{{}}}:generation", self.prefix)
    }

    /// Sorted set of node ids ever heard (scored by their last heartbeat,
    /// Unix ms), so that the membership keys can be read without a scan.
    pub fn nodes(&self) -> String {
        format!("{{{}}}:nodes", self.prefix)
    }

    /// The report that a node's run was lost (value: the reporting node).
    pub fn down(&self, node: &str, instance: &str) -> String {
        format!("{{{}}}:down:{node}:{instance}", self.prefix)
    }

    /// Pub/sub channel of a node's commands.
    pub fn node_control(&self, node: &str) -> String {
        format!("{}:node:{node}:control", self.prefix)
    }

    /// Pub/sub channel of the answers to one run of a node.
    pub fn replies(&self, node: &str, instance: &str) -> String {
        format!("{}:reply:{node}:{instance}", self.prefix)
    }

    /// Pub/sub channel of presence requests.
    pub fn presence(&self) -> String {
        format!("{}:presence", self.prefix)
    }

    /// Pub/sub channel of a channel's live messages, joins and leaves.
    pub fn channel_live(&self, channel: &str) -> String {
        format!("{}:chan:{channel}", self.prefix)
    }

    /// A channel's log (a stream whose entry ids are the offsets).
    pub fn channel_log(&self, channel: &str) -> String {
        format!("{}:ch:{{{channel}}}:log", self.prefix)
    }

    /// A channel's idempotency key (hex-encoded) within the window.
    pub fn channel_key(&self, channel: &str, key: &str) -> String {
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{}:ch:{{{channel}}}:idem:{hex}", self.prefix)
    }

    /// Hash of every session's record (field: connection id).
    pub fn sessions(&self) -> String {
        format!("{{{}}}:sessions", self.prefix)
    }

    /// Counter giving session records their revisions.
    pub fn session_revisions(&self) -> String {
        format!("{{{}}}:sessions:rev", self.prefix)
    }

    /// A session's direct messages (a stream whose entry ids are the
    /// `seq`s).
    pub fn session_messages(&self, id: &str) -> String {
        format!("{}:smsg:{{{id}}}", self.prefix)
    }

    /// Event stream `partition` for the origin.
    pub fn events(&self, partition: u32) -> String {
        format!("{}:events:{partition}", self.prefix)
    }

    /// Stream of the events the origin decides on (`connect`, `publish`,
    /// `subscribe`).
    pub fn decisions(&self) -> String {
        format!("{}:decisions", self.prefix)
    }

    /// Stream of control commands from the origin.
    pub fn control(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Pub/sub channel on which the origin answers synchronous events.
    pub fn origin_replies(&self, node: &str) -> String {
        format!("{}:origin-reply:{node}", self.prefix)
    }
}

/// A pub/sub message: a one-line JSON header, a newline, then the body's
/// bytes as they are (binary-safe).
pub(crate) fn frame(header: &impl Serialize, body: &[u8]) -> Bytes {
    let mut out = serde_json::to_vec(header).expect("headers serialize");
    out.push(b'\n');
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The header and body of a [`frame`].
pub(crate) fn unframe<H: DeserializeOwned>(message: &Bytes) -> Option<(H, Bytes)> {
    let at = message.iter().position(|b| *b == b'\n')?;
    let header = serde_json::from_slice(&message[..at]).ok()?;
    Some((header, message.slice(at + 1..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn related_keys_share_a_hash_tag() {
        let k = Keys::new("acme");
        assert_eq!(k.node("n1"), "{acme}:node:n1");
        assert_eq!(k.nodes(), "{acme}:nodes");
        assert_eq!(k.channel_log("chat:1"), "acme:ch:{chat:1}:log");
        assert_eq!(k.channel_key("chat:1", "k"), "acme:ch:{chat:1}:idem:6b");
        assert_eq!(k.session_messages("n1.x"), "acme:smsg:{n1.x}");
    }

    #[test]
    fn frames_carry_binary_bodies() {
        let f = frame(&serde_json::json!({"a": 1}), b"x\ny\0");
        let (h, body): (serde_json::Value, Bytes) = unframe(&f).unwrap();
        assert_eq!(h["a"], 1);
        assert_eq!(&body[..], b"x\ny\0");
    }
}
