//! GraphQL over WebSocket: the two subprotocols' messages (the modern
//! `graphql-transport-ws` of npm `graphql-ws`, and the legacy `graphql-ws`
//! of `subscriptions-transport-ws`), the GraphQL-over-HTTP request the
//! gateway sends the origin, and the extension by which the origin's answer
//! makes an operation a subscription. `docs/graphql.md` is the specification.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The modern subprotocol (npm `graphql-ws`).
pub const MODERN: &str = "graphql-transport-ws";
/// The legacy subprotocol (npm `subscriptions-transport-ws`).
pub const LEGACY: &str = "graphql-ws";

/// Close codes of the modern protocol, which the gateway uses for both.
pub mod close {
    /// A message that is not valid.
    pub const BAD_REQUEST: u16 = 4400;
    /// An operation before `connection_ack`.
    pub const UNAUTHORIZED: u16 = 4401;
    /// The token or the origin refused the connection.
    pub const FORBIDDEN: u16 = 4403;
    /// No GraphQL subprotocol is served here.
    pub const SUBPROTOCOL_NOT_ACCEPTABLE: u16 = 4406;
    /// No `connection_init` in time.
    pub const INIT_TIMEOUT: u16 = 4408;
    /// A second operation with the id of a running one.
    pub const SUBSCRIBER_EXISTS: u16 = 4409;
    /// A second `connection_init`.
    pub const TOO_MANY_INITS: u16 = 4429;
    /// Internal server error. The gateway does not send it: `graphql-ws`
    /// clients never retry it, so passing failures close with 1013.
    pub const INTERNAL_ERROR: u16 = 4500;
}

/// Which of the two protocols a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `graphql-transport-ws`.
    Modern,
    /// `graphql-ws` (Apollo's `subscriptions-transport-ws`).
    Legacy,
}

impl Protocol {
    /// The protocol a subprotocol name stands for.
    pub fn of(subprotocol: &str) -> Option<Self> {
        match subprotocol {
            MODERN => Some(Self::Modern),
            LEGACY => Some(Self::Legacy),
            _ => None,
        }
    }

    /// Its subprotocol name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Modern => MODERN,
            Self::Legacy => LEGACY,
        }
    }

    /// The message type of a result.
    fn result_type(self) -> &'static str {
        match self {
            Self::Modern => "next",
            Self::Legacy => "data",
        }
    }
}

/// An operation as a client sends it (`payload` of `subscribe`/`start`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// The GraphQL document (empty for a persisted query named in
    /// `extensions`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query: String,
    /// Its variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variables: Option<Value>,
    /// The operation to run, when the document has several.
    #[serde(
        default,
        rename = "operationName",
        skip_serializing_if = "Option::is_none"
    )]
    pub operation_name: Option<String>,
    /// The client's extensions (the gateway sets `switchboard` itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// A message from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// `connection_init`, with its payload.
    Init(Option<Value>),
    /// `ping` (modern), with its payload.
    Ping(Option<Value>),
    /// `pong` (modern).
    Pong,
    /// `subscribe` (modern) or `start` (legacy).
    Start {
        /// The client's operation id.
        id: String,
        /// The operation.
        operation: Operation,
    },
    /// `complete` (modern) or `stop` (legacy).
    Stop {
        /// The operation id.
        id: String,
    },
    /// `connection_terminate` (legacy).
    Terminate,
}

/// Why a client's message is not valid (close 4400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    payload: Option<Value>,
}

/// Reads a client message of `protocol`.
pub fn parse(protocol: Protocol, text: &[u8]) -> Result<ClientMessage, Invalid> {
    let env: Envelope = serde_json::from_slice(text)
        .map_err(|e| Invalid(format!("not a GraphQL over WebSocket message: {e}")))?;
    let id = |env: &Envelope| match &env.id {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(Invalid(format!("`{}` needs an `id`", env.kind))),
    };
    let payload = |p: Option<Value>| p.filter(|v| !v.is_null());
    match (protocol, env.kind.as_str()) {
        (_, "connection_init") => Ok(ClientMessage::Init(payload(env.payload))),
        (Protocol::Modern, "ping") => Ok(ClientMessage::Ping(payload(env.payload))),
        (Protocol::Modern, "pong") => Ok(ClientMessage::Pong),
        (Protocol::Modern, "subscribe") | (Protocol::Legacy, "start") => {
            let id = id(&env)?;
            let operation = env
                .payload
                .filter(Value::is_object)
                .ok_or_else(|| Invalid(format!("`{}` needs a `payload` object", env.kind)))
                .and_then(|p| {
                    serde_json::from_value::<Operation>(p)
                        .map_err(|e| Invalid(format!("`{}` payload: {e}", env.kind)))
                })?;
            Ok(ClientMessage::Start { id, operation })
        }
        (Protocol::Modern, "complete") | (Protocol::Legacy, "stop") => {
            Ok(ClientMessage::Stop { id: id(&env)? })
        }
        (Protocol::Legacy, "connection_terminate") => Ok(ClientMessage::Terminate),
        (_, other) => Err(Invalid(format!(
            "`{other}` is not a message of {}",
            protocol.name()
        ))),
    }
}

#[derive(Serialize)]
struct Out<'a, P: Serialize + ?Sized> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a P>,
}

fn out<P: Serialize + ?Sized>(
    kind: &'static str,
    id: Option<&str>,
    payload: Option<&P>,
) -> Vec<u8> {
    serde_json::to_vec(&Out { kind, id, payload }).expect("messages serialize")
}

/// `connection_ack`, with the origin's payload.
pub fn ack(payload: Option<&Value>) -> Vec<u8> {
    out("connection_ack", None, payload)
}

/// `pong` (modern), echoing the ping's payload.
pub fn pong(payload: Option<&Value>) -> Vec<u8> {
    out("pong", None, payload)
}

/// `ka` (legacy keep-alive).
pub fn keep_alive() -> Vec<u8> {
    out::<Value>("ka", None, None)
}

/// `connection_error` (legacy), before a close.
pub fn connection_error(message: &str) -> Vec<u8> {
    out(
        "connection_error",
        None,
        Some(&serde_json::json!({ "message": message })),
    )
}

/// A result (`next` or `data`) of operation `id`; `payload` is its JSON.
pub fn result(protocol: Protocol, id: &str, payload: &RawValue) -> Vec<u8> {
    out(protocol.result_type(), Some(id), Some(payload))
}

/// A result message cut around its id: what goes before the id's JSON
/// string and what goes after it, so that one payload serves many
/// subscribers (`result` = head + id + tail).
pub fn result_parts(protocol: Protocol, payload: &RawValue) -> (Vec<u8>, Vec<u8>) {
    let head = format!(r#"{{"type":"{}","id":"#, protocol.result_type()).into_bytes();
    let tail = format!(r#","payload":{}}}"#, payload.get()).into_bytes();
    (head, tail)
}

/// `error` of operation `id`; `errors` is a JSON array of GraphQL errors.
pub fn error(id: &str, errors: &RawValue) -> Vec<u8> {
    out("error", Some(id), Some(errors))
}

/// `complete` of operation `id`.
pub fn complete(id: &str) -> Vec<u8> {
    out::<Value>("complete", Some(id), None)
}

/// A JSON array holding one GraphQL error with `extensions.code`.
pub fn errors_of(message: &str, code: &str) -> Box<RawValue> {
    let v = serde_json::json!([{ "message": message, "extensions": { "code": code } }]);
    RawValue::from_string(v.to_string()).expect("valid JSON")
}

/// The key of the gateway's extension, in requests and in answers.
pub const EXTENSION: &str = "switchboard";

/// What the gateway tells the origin with each request
/// (`extensions.switchboard`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestContext {
    /// The connection (absent on a re-execution for a trigger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    /// The connection's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The client token's claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<Map<String, Value>>,
    /// The `metadata` of the origin's `connect` answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// The trigger key of a re-execution.
    #[serde(default)]
    pub trigger: Option<String>,
}

/// The subscription extension of an origin's answer
/// (`extensions.switchboard.subscription`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionExt {
    /// Keys whose publication makes the result change (1 to 32).
    pub triggers: Vec<String>,
    /// Identifies the subscription's inputs; computed when absent.
    #[serde(default)]
    pub digest: Option<String>,
}

/// Most trigger keys of one subscription.
pub const MAX_TRIGGERS: usize = 32;
/// Longest trigger key, in bytes.
pub const MAX_TRIGGER_LEN: usize = 256;
/// Longest digest, in bytes.
pub const MAX_DIGEST_LEN: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modern_messages() {
        let m = parse(
            Protocol::Modern,
            br#"{"type":"subscribe","id":"1","payload":{"query":"{ a }","variables":{"x":1}}}"#,
        )
        .unwrap();
        let ClientMessage::Start { id, operation } = m else {
            panic!("{m:?}")
        };
        assert_eq!(id, "1");
        assert_eq!(operation.query, "{ a }");
        assert_eq!(
            parse(Protocol::Modern, br#"{"type":"complete","id":"1"}"#).unwrap(),
            ClientMessage::Stop { id: "1".into() }
        );
        assert_eq!(
            parse(Protocol::Modern, br#"{"type":"connection_init"}"#).unwrap(),
            ClientMessage::Init(None)
        );
        assert!(parse(Protocol::Modern, br#"{"type":"start","id":"1"}"#).is_err());
        assert!(parse(
            Protocol::Modern,
            br#"{"type":"subscribe","payload":{"query":""}}"#
        )
        .is_err());
        assert!(parse(Protocol::Modern, br#"{"type":"subscribe","id":"1"}"#).is_err());
        assert!(parse(
            Protocol::Modern,
            br#"{"type":"subscribe","id":"1","payload":[]}"#
        )
        .is_err());
        // A persisted query has no document.
        assert!(parse(
            Protocol::Modern,
            br#"{"type":"subscribe","id":"1","payload":{}}"#
        )
        .is_ok());
        assert!(parse(Protocol::Modern, b"[]").is_err());
    }

    #[test]
    fn legacy_messages() {
        assert!(matches!(
            parse(
                Protocol::Legacy,
                br#"{"type":"start","id":"7","payload":{"query":"q"}}"#
            ),
            Ok(ClientMessage::Start { .. })
        ));
        assert_eq!(
            parse(Protocol::Legacy, br#"{"type":"stop","id":"7"}"#).unwrap(),
            ClientMessage::Stop { id: "7".into() }
        );
        assert_eq!(
            parse(Protocol::Legacy, br#"{"type":"connection_terminate"}"#).unwrap(),
            ClientMessage::Terminate
        );
        assert!(parse(Protocol::Legacy, br#"{"type":"ping"}"#).is_err());
    }

    #[test]
    fn server_messages() {
        let payload = RawValue::from_string(r#"{"data":{"a":1}}"#.into()).unwrap();
        assert_eq!(
            result(Protocol::Modern, "x\"y", &payload),
            br#"{"type":"next","id":"x\"y","payload":{"data":{"a":1}}}"#
        );
        assert_eq!(
            result(Protocol::Legacy, "1", &payload),
            br#"{"type":"data","id":"1","payload":{"data":{"a":1}}}"#
        );
        let (head, tail) = result_parts(Protocol::Modern, &payload);
        assert_eq!(
            [&head[..], br#""x\"y""#, &tail[..]].concat(),
            result(Protocol::Modern, "x\"y", &payload)
        );
        assert_eq!(complete("1"), br#"{"type":"complete","id":"1"}"#);
        assert_eq!(ack(None), br#"{"type":"connection_ack"}"#);
        assert_eq!(keep_alive(), br#"{"type":"ka"}"#);
    }
}
