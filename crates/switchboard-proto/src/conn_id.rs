//! Connection ids: `<node>.<22 url-safe base64 chars>`.
//!
//! The node part tells any node of a cluster which node holds the connection,
//! so commands route without a shared lookup table; the rest is 128 bits from
//! the operating system's CSPRNG-seeded generator, so ids cannot be guessed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::fmt;
use std::sync::Arc;

/// Longest node id accepted.
pub const MAX_NODE_ID_LEN: usize = 32;

/// The id of a gateway node: 1–32 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeId(Arc<str>);

/// A node id with a forbidden character or length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id must be 1-{MAX_NODE_ID_LEN} characters of [A-Za-z0-9_-], got {0:?}")]
pub struct InvalidNodeId(pub String);

impl NodeId {
    /// Validates a node id.
    pub fn new(s: &str) -> Result<Self, InvalidNodeId> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NODE_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(Arc::from(s)))
        } else {
            Err(InvalidNodeId(s.to_owned()))
        }
    }

    /// A fresh random node id (10 lower-case hex characters).
    pub fn random() -> Self {
        let b: [u8; 5] = rand::random();
        Self(Arc::from(
            b.iter().map(|x| format!("{x:02x}")).collect::<String>(),
        ))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The 128 random bits of a connection id: the key of the node's registry.
pub type ConnKey = [u8; 16];

/// A connection id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionId(Box<str>);

/// Text that is not a connection id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a connection id")]
pub struct InvalidConnectionId;

impl ConnectionId {
    /// A new id for a connection held by `node`.
    pub fn generate(node: &NodeId) -> Self {
        Self::from_parts(node, &rand::random())
    }

    /// The id made of a node and a key.
    pub fn from_parts(node: &NodeId, key: &ConnKey) -> Self {
        let mut s = String::with_capacity(node.0.len() + 23);
        s.push_str(&node.0);
        s.push('.');
        URL_SAFE_NO_PAD.encode_string(key, &mut s);
        Self(s.into_boxed_str())
    }

    /// Parses and checks an id.
    pub fn parse(s: &str) -> Result<Self, InvalidConnectionId> {
        let (node, rand) = s.split_once('.').ok_or(InvalidConnectionId)?;
        NodeId::new(node).map_err(|_| InvalidConnectionId)?;
        decode_key(rand)?;
        Ok(Self(s.into()))
    }

    /// The id of the node that holds the connection.
    pub fn node(&self) -> &str {
        self.0.split_once('.').map_or("", |(n, _)| n)
    }

    /// The random part, as registry key.
    pub fn key(&self) -> ConnKey {
        // A ConnectionId is only built from valid parts.
        self.0
            .split_once('.')
            .and_then(|(_, r)| decode_key(r).ok())
            .unwrap_or_default()
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn decode_key(s: &str) -> Result<ConnKey, InvalidConnectionId> {
    if s.len() != 22 {
        return Err(InvalidConnectionId);
    }
    let mut key = [0u8; 16];
    let n = URL_SAFE_NO_PAD
        .decode_slice(s, &mut key)
        .map_err(|_| InvalidConnectionId)?;
    if n != 16 {
        return Err(InvalidConnectionId);
    }
    Ok(key)
}

impl From<ConnectionId> for String {
    fn from(id: ConnectionId) -> Self {
        id.0.into()
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let node = NodeId::new("node-1").unwrap();
        let id = ConnectionId::generate(&node);
        assert_eq!(id.node(), "node-1");
        assert!(id
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        let parsed = ConnectionId::parse(id.as_str()).unwrap();
        assert_eq!(parsed, id);
        assert_eq!(ConnectionId::from_parts(&node, &id.key()), id);
        assert_ne!(ConnectionId::generate(&node), id);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "nodot",
            ".AAAAAAAAAAAAAAAAAAAAAA",
            "n.short",
            "n!.AAAAAAAAAAAAAAAAAAAAAA",
            "n.AAAAAAAAAAAAAAAAAAAAA$",
        ] {
            assert!(ConnectionId::parse(bad).is_err(), "{bad}");
        }
        assert!(NodeId::new(&"x".repeat(33)).is_err());
        assert_eq!(NodeId::random().as_str().len(), 10);
    }
}
