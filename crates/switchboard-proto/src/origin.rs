//! The origin contract on the wire: events the gateway sends, the answers the
//! origin gives, and the webhook signature.
//!
//! Every request to the origin carries a JSON body `{"events": [...]}`; each
//! event has a `type` and an `id` that stays the same on every retry, so the
//! origin can drop duplicates. See `docs/origin.md`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message body: `{"text": "..."}` or `{"binary": "<base64>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// A text message.
    Text(String),
    /// A binary message, base64 (standard alphabet, padded) in JSON.
    Binary(#[serde(with = "base64_bytes")] Vec<u8>),
}

impl Payload {
    /// The body, if it is text.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Text(t) => Some(t),
            Self::Binary(_) => None,
        }
    }

    /// The body as bytes (text as UTF-8).
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Text(t) => t.as_bytes(),
            Self::Binary(b) => b,
        }
    }
}

mod base64_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// One event for the origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A client asks to connect; answered synchronously.
    Connect(ConnectEvent),
    /// A client sent a message.
    Message(MessageEvent),
    /// A connection whose `connect` was accepted has ended. Sent exactly once per
    /// such connection (at least once on the wire, same `id` on retries).
    Disconnect(DisconnectEvent),
    /// The connections this node holds, sent every `keepalive-interval` in
    /// batches of at most 10,000 ids.
    Keepalive(KeepaliveEvent),
    /// A session lost its connection and waits for its client to resume
    /// (`session-events` only); no `disconnect` yet.
    Suspend(SuspendEvent),
    /// A suspended session's client is back (`session-events` only).
    Resume(ResumeEvent),
    /// Cluster mode: a node stopped being heard from without draining; every
    /// connection whose id carries `down_node` is gone. Sent by exactly one
    /// surviving node.
    NodeDown(NodeDownEvent),
    /// A native client publishes to a channel of a namespace with
    /// `publish-to-origin`; answered synchronously like `connect`: 2xx
    /// publishes, 4xx/5xx refuses with the answer's `reason`.
    Publish(PublishEvent),
    /// A native client subscribes to a channel of a namespace with
    /// `subscribe-to-origin` (and its token does not grant the channel);
    /// answered synchronously like `connect`: 2xx subscribes, 4xx/5xx
    /// refuses with the answer's `reason`.
    Subscribe(SubscribeEvent),
}

impl Event {
    /// The `type` tag of the event in JSON (`connect`, `message`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Message(_) => "message",
            Self::Disconnect(_) => "disconnect",
            Self::Keepalive(_) => "keepalive",
            Self::Suspend(_) => "suspend",
            Self::Resume(_) => "resume",
            Self::NodeDown(_) => "node_down",
            Self::Publish(_) => "publish",
            Self::Subscribe(_) => "subscribe",
        }
    }
}

/// A batch of events: the body of every request to the origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// Events in order; events of one connection are in the order they happened.
    pub events: Vec<Event>,
}

/// `connect`: a client asks to connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectEvent {
    /// Idempotency key.
    pub id: String,
    /// The id the connection will have.
    pub connection_id: String,
    /// The node handling the handshake.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// The client's address, `ip:port`.
    pub remote_addr: String,
    /// Request path.
    pub path: String,
    /// Raw query string, without `?`.
    pub query: String,
    /// Allow-listed request headers (`forward-headers`), names lower-case.
    pub headers: BTreeMap<String, String>,
    /// Cookies from the `Cookie` header.
    pub cookies: BTreeMap<String, String>,
    /// Subprotocols the client requested, in its order.
    pub subprotocols: Vec<String>,
    /// The subprotocol the gateway chose, if any.
    pub subprotocol: Option<String>,
    /// What carries the connection: WebSocket or an HTTP fallback
    /// (`docs/fallbacks.md`).
    #[serde(default)]
    pub transport: Transport,
    /// The verified client token's `sub`, when the gateway checks tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Every claim of the verified client token, when the gateway checks
    /// tokens (absent for anonymous clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
    /// A GraphQL connection's `connection_init` payload (`docs/graphql.md`):
    /// its `connect` is asked when that message comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_payload: Option<serde_json::Value>,
}

/// What carries a connection (`docs/fallbacks.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum Transport {
    /// A WebSocket.
    #[default]
    Websocket = 0,
    /// Server-Sent Events down, HTTP `POST`s up.
    Sse = 1,
    /// HTTP long-polling down, HTTP `POST`s up.
    LongPoll = 2,
    /// A subscribe-only Server-Sent Events stream (`EventSource`).
    Eventsource = 3,
}

impl Transport {
    /// Its name on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Websocket => "websocket",
            Self::Sse => "sse",
            Self::LongPoll => "long-poll",
            Self::Eventsource => "eventsource",
        }
    }
}

/// `message`: a client sent a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageEvent {
    /// Idempotency key.
    pub id: String,
    /// The sender.
    pub connection_id: String,
    /// The node holding the connection.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// Per-connection sequence number, starting at 1.
    pub seq: u64,
    /// The user id the origin attached at `connect`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The message.
    #[serde(flatten)]
    pub payload: Payload,
}

/// `publish`: a client asks to publish to a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishEvent {
    /// Unique id of this request.
    pub id: String,
    /// The publisher.
    pub connection_id: String,
    /// The node holding the connection.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// The user id the origin attached at `connect`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The channel.
    pub channel: String,
    /// The message.
    #[serde(flatten)]
    pub payload: Payload,
}

/// `subscribe`: a client asks to subscribe to a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeEvent {
    /// Unique id of this request.
    pub id: String,
    /// The connection asking.
    pub connection_id: String,
    /// The node holding the connection.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// The user id of the connection, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The channel.
    pub channel: String,
}

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    /// The client sent a close frame.
    Client,
    /// The TCP connection ended without a close frame.
    Network,
    /// The gateway closed it (protocol error, timeout, slow consumer, drain…).
    Gateway,
    /// The origin asked for it through the control API.
    Origin,
}

/// `disconnect`: a connection has ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DisconnectEvent {
    /// Idempotency key.
    pub id: String,
    /// The connection.
    pub connection_id: String,
    /// The node that held it.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// The user id the origin attached at `connect`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Close code (1006 when the connection dropped without a close frame).
    pub code: u16,
    /// Close reason.
    pub reason: String,
    /// Who closed it.
    pub closed_by: ClosedBy,
    /// How long the connection lived, in milliseconds.
    pub duration_ms: u64,
    /// Messages received from the client.
    pub messages_in: u64,
    /// Messages sent to the client.
    pub messages_out: u64,
}

/// `keepalive`: the connections a node holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeepaliveEvent {
    /// Idempotency key.
    pub id: String,
    /// The node.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// Live, accepted connections (at most 10,000 per event), suspended
    /// sessions included.
    pub connection_ids: Vec<String>,
    /// Those of `connection_ids` that are suspended sessions (waiting for
    /// their client to resume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspended: Vec<String>,
}

/// `suspend`: a session lost its connection; it ends with `disconnect`
/// unless its client resumes within `session-ttl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspendEvent {
    /// Idempotency key.
    pub id: String,
    /// The session's connection id.
    pub connection_id: String,
    /// The node holding it.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// The user id the origin attached at `connect`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Why the connection was lost.
    pub reason: String,
    /// When the session ends unless resumed (Unix milliseconds).
    pub expires_at_ms: u64,
}

/// `resume`: a suspended session's client is back, on a new socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeEvent {
    /// Idempotency key.
    pub id: String,
    /// The session's connection id.
    pub connection_id: String,
    /// The node holding it.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// The user id the origin attached at `connect`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The client's address now.
    pub remote_addr: String,
    /// How long the session was without a connection (milliseconds).
    pub suspended_ms: u64,
}

/// `node_down`: a node of the cluster died without draining.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDownEvent {
    /// Idempotency key (the same on every retry).
    pub id: String,
    /// The node reporting it.
    pub node: String,
    /// Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// The node that is gone: the connections it held are closed, but for
    /// `sessions_kept`.
    pub down_node: String,
    /// When `down_node` was last heard from, Unix time in milliseconds.
    pub last_seen_ms: u64,
    /// Sessions `down_node` held that live on: `node` adopted them
    /// (suspended, until their clients resume them or their ttl passes).
    /// Every other connection of `down_node` is gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions_kept: Vec<String>,
}

/// The origin's 2xx answer. Every field is optional; an empty body is fine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OriginAnswer {
    /// `connect` only: the user id to attach to the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// `connect` only: metadata to attach, shown by the control API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// `connect` only: messages to send the client first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Payload>,
    /// `connect` only: channels to subscribe the connection to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// `connect` only: keep the connection open after its client token
    /// expires (by default it is closed with 4004 unless refreshed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outlive_token: bool,
    /// `connect` of a native connection only: how long its session
    /// outlives a lost socket, in milliseconds, instead of `session-ttl`
    /// (at most 24 hours; 0: no session for this connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_ttl_ms: Option<u64>,
    /// Messages to deliver right away, before anything sent later; the usual
    /// answer to `message` events.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replies: Vec<Reply>,
    /// `connect` of a GraphQL connection only: the `connection_ack` payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_payload: Option<serde_json::Value>,
}

/// A reply carried in an [`OriginAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Destination connection (usually the sender of a `message` event).
    pub connection_id: String,
    /// The message.
    #[serde(flatten)]
    pub payload: Payload,
}

/// The origin's non-2xx answer to `connect`; the client sees `reason`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rejection {
    /// Why the connection was refused.
    pub reason: Option<String>,
}

/// Webhook signing: `X-Switchboard-Timestamp: <unix seconds>` and
/// `X-Switchboard-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub mod signature {
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    use subtle::ConstantTimeEq;

    /// Header carrying the signing time.
    pub const TIMESTAMP_HEADER: &str = "x-switchboard-timestamp";
    /// Header carrying the signature.
    pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";

    /// Signature header value for `body` signed at `timestamp` (unix seconds).
    pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
        format!("v1={}", hex::encode(mac(secret, timestamp, body)))
    }

    fn mac(secret: &[u8], timestamp: u64, body: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256>>::new_from_slice(secret).expect("HMAC takes any key length");
        m.update(timestamp.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        m.finalize().into_bytes().into()
    }

    /// Why a signature was refused.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
    pub enum VerifyError {
        /// Header missing or not of the form `v1=<64 hex>`.
        #[error("malformed signature or timestamp")]
        Malformed,
        /// The timestamp is further than the tolerance from now (replay defence).
        #[error("timestamp outside tolerance")]
        Stale,
        /// The HMAC does not match.
        #[error("signature mismatch")]
        Mismatch,
    }

    /// Verifies a request as an origin should: timestamp within `tolerance_secs`
    /// of `now` (unix seconds), then the HMAC compared in constant time.
    pub fn verify(
        secret: &[u8],
        timestamp: &str,
        signature: &str,
        body: &[u8],
        now: u64,
        tolerance_secs: u64,
    ) -> Result<(), VerifyError> {
        let ts: u64 = timestamp
            .trim()
            .parse()
            .map_err(|_| VerifyError::Malformed)?;
        if ts.abs_diff(now) > tolerance_secs {
            return Err(VerifyError::Stale);
        }
        let hex_sig = signature
            .trim()
            .strip_prefix("v1=")
            .ok_or(VerifyError::Malformed)?;
        let given = hex::decode(hex_sig).map_err(|_| VerifyError::Malformed)?;
        let want = mac(secret, ts, body);
        if given.len() == want.len() && bool::from(given.ct_eq(&want)) {
            Ok(())
        } else {
            Err(VerifyError::Mismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_json_shapes() {
        let t = serde_json::to_value(Payload::Text("hi".into())).unwrap();
        assert_eq!(t, serde_json::json!({"text": "hi"}));
        let b = serde_json::to_value(Payload::Binary(vec![0, 1, 255])).unwrap();
        assert_eq!(b, serde_json::json!({"binary": "AAH/"}));
        let r: Reply = serde_json::from_str(r#"{"connection_id":"a.b","binary":"AAH/"}"#).unwrap();
        assert_eq!(r.payload, Payload::Binary(vec![0, 1, 255]));
    }

    #[test]
    fn event_roundtrip() {
        let e = Event::Message(MessageEvent {
            id: "n.x:1".into(),
            connection_id: "n.x".into(),
            node: "n".into(),
            timestamp_ms: 5,
            seq: 1,
            user_id: None,
            payload: Payload::Text("yo".into()),
        });
        let j = serde_json::to_string(&EventBatch {
            events: vec![e.clone()],
        })
        .unwrap();
        assert!(j.contains(r#""type":"message""#) && j.contains(r#""text":"yo""#));
        let back: EventBatch = serde_json::from_str(&j).unwrap();
        assert_eq!(back.events, vec![e]);
        let a: OriginAnswer = serde_json::from_str("{}").unwrap();
        assert_eq!(a, OriginAnswer::default());
    }

    #[test]
    fn signatures() {
        use signature::*;
        let sig = sign(b"k", 1000, b"{}");
        assert_eq!(verify(b"k", "1000", &sig, b"{}", 1010, 300), Ok(()));
        assert_eq!(
            verify(b"k", "1000", &sig, b"{ }", 1010, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"x", "1000", &sig, b"{}", 1010, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"k", "1000", &sig, b"{}", 2000, 300),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify(b"k", "abc", &sig, b"{}", 1000, 300),
            Err(VerifyError::Malformed)
        );
        assert_eq!(
            verify(b"k", "1000", "v2=00", b"{}", 1000, 300),
            Err(VerifyError::Malformed)
        );
    }
}
