//! The inbound side of an origin: checking that a webhook request really
//! comes from the gateway ([`Verifier`]), reading its body into typed events
//! ([`parse_batch`]), and building the answer ([`Answer`]).
//!
//! The signature covers the **raw body bytes**: verify before parsing, and
//! never re-serialize the JSON to verify it. The HMAC itself is
//! [`switchboard_proto::origin::signature`], the same code the gateway signs
//! with.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchboard_proto::origin::signature::{self, VerifyError};
pub use switchboard_proto::origin::signature::{SIGNATURE_HEADER, TIMESTAMP_HEADER};
pub use switchboard_proto::origin::{
    ClosedBy, ConnectEvent, DisconnectEvent, Event, EventBatch, KeepaliveEvent, MessageEvent,
    NodeDownEvent, OriginAnswer, Payload, PublishEvent, Rejection, Reply, SubscribeEvent,
};

/// How far the signing time may be from the origin's clock, either way,
/// unless [`Verifier::with_tolerance`] says otherwise: five minutes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Why a webhook request was refused or could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// A signature header is absent (the gateway runs without
    /// `--origin-secret`, or the request is not from the gateway).
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A signature header is not visible ASCII.
    #[error("header {0} is not visible ASCII")]
    InvalidHeader(&'static str),
    /// The timestamp is not a number of seconds, or the signature is not
    /// `v1=<64 hex digits>`.
    #[error("malformed timestamp or signature")]
    Malformed,
    /// The timestamp is further than the tolerance from the origin's clock,
    /// in the past (a replay, or a request that waited too long) or in the
    /// future.
    #[error("timestamp {timestamp} is more than {tolerance_secs} s away from now ({now})")]
    Stale {
        /// The request's timestamp, Unix seconds.
        timestamp: u64,
        /// The origin's clock, Unix seconds.
        now: u64,
        /// The tolerance in force, seconds.
        tolerance_secs: u64,
    },
    /// The signature does not match the body and timestamp under this
    /// secret: a wrong secret, or a body or timestamp that was changed.
    #[error("signature mismatch")]
    Mismatch,
    /// The (verified) body is not a JSON `{"events": [...]}`.
    #[error("body is not an event batch: {0}")]
    Body(#[source] serde_json::Error),
    /// One event of a known `type` does not have that type's fields.
    #[error("event {index} (type {kind:?}) is malformed: {source}")]
    Event {
        /// Its position in `events`.
        index: usize,
        /// Its `type`.
        kind: String,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
}

impl WebhookError {
    /// Whether the request failed authentication (anything but a body that
    /// could not be read). Such a request is not from the gateway: answer
    /// 401 and do not act on it.
    pub fn is_auth_failure(&self) -> bool {
        !matches!(self, Self::Body(_) | Self::Event { .. })
    }

    /// The status an origin should answer with: 401 for an authentication
    /// failure, 400 for an unreadable body. Both are permanent for the
    /// gateway (it does not retry a 4xx).
    pub fn status(&self) -> u16 {
        if self.is_auth_failure() {
            401
        } else {
            400
        }
    }
}

/// Checks the `X-Switchboard-Timestamp` and `X-Switchboard-Signature`
/// headers of webhook requests against the gateway's `--origin-secret`.
///
/// The timestamp must be within the tolerance of the origin's clock (either
/// way) and the signature is compared in constant time.
///
/// ```
/// use switchboard_origin::webhook::{Verifier, WebhookError};
/// use switchboard_proto::origin::signature::sign;
///
/// let verifier = Verifier::new("s3cret");
/// let body = br#"{"events":[]}"#;
/// let sig = sign(b"s3cret", 1_800_000_000, body);
/// assert!(verifier.verify_at("1800000000", &sig, body, 1_800_000_010).is_ok());
/// assert!(matches!(
///     verifier.verify_at("1800000000", &sig, b"{}", 1_800_000_010),
///     Err(WebhookError::Mismatch)
/// ));
/// ```
#[derive(Clone)]
pub struct Verifier {
    secret: Vec<u8>,
    tolerance: Duration,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secret", &"<redacted>")
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl Verifier {
    /// A verifier for the gateway's `--origin-secret`, with the default
    /// tolerance of [`DEFAULT_TOLERANCE`].
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self {
            secret: secret.as_ref().to_vec(),
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    /// The same verifier with another timestamp tolerance (whole seconds
    /// count; the fraction is dropped).
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The timestamp tolerance in force.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
    }

    /// Verifies a request given its two header values and its raw body,
    /// against the system clock.
    pub fn verify(
        &self,
        timestamp: &str,
        signature: &str,
        body: &[u8],
    ) -> Result<(), WebhookError> {
        self.verify_at(timestamp, signature, body, unix_now())
    }

    /// Verifies against a given time (`now`, Unix seconds) rather than the
    /// system clock; for tests and replays of recorded requests.
    pub fn verify_at(
        &self,
        timestamp: &str,
        signature: &str,
        body: &[u8],
        now: u64,
    ) -> Result<(), WebhookError> {
        let tolerance_secs = self.tolerance.as_secs();
        signature::verify(
            &self.secret,
            timestamp,
            signature,
            body,
            now,
            tolerance_secs,
        )
        .map_err(|e| match e {
            VerifyError::Malformed => WebhookError::Malformed,
            VerifyError::Mismatch => WebhookError::Mismatch,
            VerifyError::Stale => WebhookError::Stale {
                timestamp: timestamp.trim().parse().unwrap_or_default(),
                now,
                tolerance_secs,
            },
        })
    }

    /// Verifies a request given its headers (names are matched without
    /// regard to case) and raw body, against the system clock.
    pub fn verify_headers(
        &self,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Result<(), WebhookError> {
        self.verify_headers_at(headers, body, unix_now())
    }

    /// [`Verifier::verify_headers`] against a given time (Unix seconds).
    pub fn verify_headers_at(
        &self,
        headers: &http::HeaderMap,
        body: &[u8],
        now: u64,
    ) -> Result<(), WebhookError> {
        let timestamp = header(headers, TIMESTAMP_HEADER)?;
        let signature = header(headers, SIGNATURE_HEADER)?;
        self.verify_at(timestamp, signature, body, now)
    }

    /// Verifies a request by its headers, then parses its body: the usual
    /// first step of a webhook handler.
    pub fn events(&self, headers: &http::HeaderMap, body: &[u8]) -> Result<Batch, WebhookError> {
        self.verify_headers(headers, body)?;
        parse_batch(body)
    }
}

fn header<'a>(headers: &'a http::HeaderMap, name: &'static str) -> Result<&'a str, WebhookError> {
    headers
        .get(name)
        .ok_or(WebhookError::MissingHeader(name))?
        .to_str()
        .map_err(|_| WebhookError::InvalidHeader(name))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The events of one webhook request, read with forward compatibility:
/// events of a `type` this version does not know are set aside in
/// [`Batch::unknown`] instead of failing the request, as `docs/origin.md`
/// asks of origins.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// The events this version knows, in request order.
    pub events: Vec<Event>,
    /// Events of an unknown `type`, raw, in request order. Skip them (and
    /// answer 2xx for the request as usual).
    pub unknown: Vec<serde_json::Value>,
}

impl Batch {
    /// Whether this request is a `connect` (always alone in its request),
    /// answered synchronously: its answer decides the handshake.
    pub fn connect(&self) -> Option<&ConnectEvent> {
        match self.events.as_slice() {
            [Event::Connect(c)] => Some(c),
            _ => None,
        }
    }

    /// Whether this request is a `publish` (always alone in its request),
    /// answered synchronously: 2xx publishes, 4xx/5xx refuses.
    pub fn publish(&self) -> Option<&PublishEvent> {
        match self.events.as_slice() {
            [Event::Publish(p)] => Some(p),
            _ => None,
        }
    }

    /// Whether this request is a `subscribe` (always alone in its request),
    /// answered synchronously: 2xx subscribes, 4xx/5xx refuses.
    pub fn subscribe(&self) -> Option<&SubscribeEvent> {
        match self.events.as_slice() {
            [Event::Subscribe(e)] => Some(e),
            _ => None,
        }
    }

    /// The known events as an [`EventBatch`].
    pub fn into_event_batch(self) -> EventBatch {
        EventBatch {
            events: self.events,
        }
    }
}

/// The event types this version reads; an event that fails to parse with
/// one of these types is malformed rather than unknown.
const KNOWN_TYPES: &[&str] = &[
    "connect",
    "message",
    "disconnect",
    "keepalive",
    "node_down",
    "publish",
    "subscribe",
];

/// Parses a (verified) request body `{"events": [...]}`.
///
/// Events of a type this version does not know go to [`Batch::unknown`];
/// an event of a known type with wrong fields is an error.
pub fn parse_batch(body: &[u8]) -> Result<Batch, WebhookError> {
    #[derive(serde::Deserialize)]
    struct RawBatch {
        events: Vec<serde_json::Value>,
    }
    let raw: RawBatch = serde_json::from_slice(body).map_err(WebhookError::Body)?;
    let mut batch = Batch::default();
    for (index, value) in raw.events.into_iter().enumerate() {
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or_default()
            .to_owned();
        match serde_json::from_value::<Event>(value.clone()) {
            Ok(event) => batch.events.push(event),
            Err(source) if KNOWN_TYPES.contains(&kind.as_str()) => {
                return Err(WebhookError::Event {
                    index,
                    kind,
                    source,
                })
            }
            Err(_) => batch.unknown.push(value),
        }
    }
    Ok(batch)
}

/// An origin's answer to a webhook request: status and JSON body.
///
/// - [`Answer::Accept`] (200): accepts a `connect` (with its user id,
///   metadata, first messages and channels), lets a `publish` through, or
///   acknowledges other events; its `replies` are delivered right away.
/// - [`Answer::Reject`] (a 4xx or 5xx): refuses a `connect` or a `publish`;
///   the client sees `reason`. For other events a 4xx drops them and a 5xx
///   has them retried.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A 200 with this body.
    Accept(OriginAnswer),
    /// A refusal.
    Reject {
        /// The status, 400–599.
        status: u16,
        /// What the client is told.
        reason: Option<String>,
    },
}

impl Answer {
    /// A 200 with an empty answer: accept, nothing else to say.
    pub fn ok() -> Self {
        Self::Accept(OriginAnswer::default())
    }

    /// A 200 carrying `replies`, delivered before anything sent later.
    pub fn replies(replies: impl IntoIterator<Item = Reply>) -> Self {
        Self::Accept(OriginAnswer {
            replies: replies.into_iter().collect(),
            ..OriginAnswer::default()
        })
    }

    /// A refusal with this status (clamped to 400–599) and reason.
    pub fn reject(status: u16, reason: impl Into<String>) -> Self {
        Self::Reject {
            status: status.clamp(400, 599),
            reason: Some(reason.into()),
        }
    }

    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Accept(_) => 200,
            Self::Reject { status, .. } => *status,
        }
    }

    /// The JSON body to answer with (`Content-Type: application/json`).
    pub fn body(&self) -> String {
        let json = match self {
            Self::Accept(a) => serde_json::to_string(a),
            Self::Reject { reason, .. } => serde_json::to_string(&Rejection {
                reason: reason.clone(),
            }),
        };
        json.expect("answers serialize")
    }
}

impl From<OriginAnswer> for Answer {
    fn from(a: OriginAnswer) -> Self {
        Self::Accept(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::origin::signature::sign;

    #[test]
    fn verify_maps_every_refusal() {
        let v = Verifier::new("k");
        let sig = sign(b"k", 1000, b"{}");
        assert!(v.verify_at("1000", &sig, b"{}", 1300).is_ok());
        assert!(v.verify_at(" 1000 ", &sig, b"{}", 700).is_ok());
        assert!(matches!(
            v.verify_at("1000", &sig, b"{}", 1301),
            Err(WebhookError::Stale {
                timestamp: 1000,
                now: 1301,
                tolerance_secs: 300
            })
        ));
        assert!(matches!(
            v.verify_at("1000", &sig, b"{}", 699),
            Err(WebhookError::Stale { .. })
        ));
        assert!(matches!(
            v.verify_at("1000", &sig, b"{ }", 1000),
            Err(WebhookError::Mismatch)
        ));
        assert!(matches!(
            Verifier::new("x").verify_at("1000", &sig, b"{}", 1000),
            Err(WebhookError::Mismatch)
        ));
        assert!(matches!(
            v.verify_at("soon", &sig, b"{}", 1000),
            Err(WebhookError::Malformed)
        ));
        assert!(matches!(
            v.verify_at("1000", "v1=xyz", b"{}", 1000),
            Err(WebhookError::Malformed)
        ));
        let short = v.clone().with_tolerance(Duration::from_secs(10));
        assert_eq!(short.tolerance(), Duration::from_secs(10));
        assert!(short.verify_at("1000", &sig, b"{}", 1010).is_ok());
        assert!(matches!(
            short.verify_at("1000", &sig, b"{}", 1011),
            Err(WebhookError::Stale { .. })
        ));
        let shown = format!("{:?}", Verifier::new("topsecret"));
        assert!(shown.contains("redacted") && !shown.contains("topsecret"));
    }

    #[test]
    fn headers_are_found_in_any_case() {
        let v = Verifier::new("k");
        let sig = sign(b"k", 1000, b"{}");
        let mut h = http::HeaderMap::new();
        assert!(matches!(
            v.verify_headers_at(&h, b"{}", 1000),
            Err(WebhookError::MissingHeader(TIMESTAMP_HEADER))
        ));
        h.insert("X-Switchboard-Timestamp", "1000".parse().unwrap());
        assert!(matches!(
            v.verify_headers_at(&h, b"{}", 1000),
            Err(WebhookError::MissingHeader(SIGNATURE_HEADER))
        ));
        h.insert(
            "X-Switchboard-Signature",
            http::HeaderValue::from_bytes(b"v1=\xff").unwrap(),
        );
        assert!(matches!(
            v.verify_headers_at(&h, b"{}", 1000),
            Err(WebhookError::InvalidHeader(SIGNATURE_HEADER))
        ));
        h.insert("X-Switchboard-Signature", sig.parse().unwrap());
        assert!(v.verify_headers_at(&h, b"{}", 1000).is_ok());
    }

    #[test]
    fn batches_keep_unknown_types_aside() {
        let body = br#"{"events":[
            {"type":"keepalive","id":"k1","node":"n","timestamp_ms":1,"connection_ids":["n.a"]},
            {"type":"future_thing","id":"f1","node":"n"},
            {"type":"node_down","id":"d1","node":"n","timestamp_ms":2,"down_node":"m","last_seen_ms":1}
        ]}"#;
        let b = parse_batch(body).unwrap();
        assert_eq!(b.events.len(), 2);
        assert_eq!(b.events[0].kind(), "keepalive");
        assert_eq!(b.events[1].kind(), "node_down");
        assert_eq!(b.unknown.len(), 1);
        assert_eq!(b.unknown[0]["type"], "future_thing");
        assert!(b.connect().is_none());

        let bad = br#"{"events":[{"type":"message","id":"m","node":"n"}]}"#;
        let e = parse_batch(bad).unwrap_err();
        assert!(matches!(&e, WebhookError::Event { index: 0, kind, .. } if kind == "message"));
        assert_eq!(e.status(), 400);
        assert!(matches!(parse_batch(b"[1,2]"), Err(WebhookError::Body(_))));
        assert_eq!(WebhookError::Mismatch.status(), 401);
    }

    #[test]
    fn answers_serialize_as_the_contract_says() {
        assert_eq!(Answer::ok().status(), 200);
        assert_eq!(Answer::ok().body(), "{}");
        let r = Answer::replies([Reply {
            connection_id: "n.a".into(),
            payload: Payload::Text("hi".into()),
        }]);
        assert_eq!(
            r.body(),
            r#"{"replies":[{"connection_id":"n.a","text":"hi"}]}"#
        );
        let no = Answer::reject(403, "banned");
        assert_eq!(no.status(), 403);
        assert_eq!(no.body(), r#"{"reason":"banned"}"#);
        assert_eq!(Answer::reject(200, "x").status(), 400);
        let accept = Answer::from(OriginAnswer {
            user_id: Some("ann".into()),
            channels: vec!["chat:1".into()],
            ..Default::default()
        });
        assert_eq!(accept.body(), r#"{"user_id":"ann","channels":["chat:1"]}"#);
    }
}
