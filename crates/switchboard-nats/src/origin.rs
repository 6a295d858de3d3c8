//! [`NatsOrigin`]: the origin reached over NATS instead of an HTTP webhook.
//!
//! - `connect` is a request on `<prefix>.events.connect` with the webhook's
//!   body; the reply is the webhook's answer: a 2xx-equivalent body (an
//!   [`OriginAnswer`], possibly empty) or, with header
//!   `Switchboard-Status: 4xx|5xx`, a rejection `{"reason"}` the client sees.
//!   No responder or no reply within `origin-timeout` fails like an
//!   unreachable webhook (the client gets 503).
//! - Other events are published on `<prefix>.events.<kind>` as
//!   `{"events":[...]}`, consecutive events of one kind together, in order.
//!   Plain NATS delivers them to whoever subscribes at that moment. With
//!   `nats-event-stream`, they go through that JetStream stream (created if
//!   missing) and count as delivered only once it acknowledges them, so an
//!   origin's durable consumer gets every event even if it was down; the
//!   first event's id is the `Nats-Msg-Id`, so a retried batch is stored once.
//! - Answers to published events carry no replies: the origin sends through
//!   the control subjects instead.
//! - NATS refuses messages over its `max_payload` (1 MiB by default): runs
//!   are split to fit, and a single event too large to fit (a client message
//!   near `max-message-size`) is dropped with an error in the log rather than
//!   retried forever. Keep `max-message-size` under `max_payload` with `--origin nats`.

use crate::connect::Link;
use crate::NatsConfig;
use async_nats::jetstream;
use async_nats::{Client, HeaderMap};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;
use switchboard_backend::{BoxFuture, ConnectDecision, OriginError, OriginTransport};
use switchboard_proto::cluster::{Subjects, NODE_HEADER};
use switchboard_proto::origin::{OriginAnswer, Rejection};

/// Sends events to an origin listening on NATS.
#[derive(Debug)]
pub struct NatsOrigin {
    client: Client,
    link: Arc<Link>,
    subjects: Subjects,
    node: String,
    timeout: Duration,
    stream: Option<Stream>,
}

#[derive(Debug)]
struct Stream {
    name: String,
    js: jetstream::Context,
    ready: tokio::sync::OnceCell<()>,
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
}

/// A JetStream publish acknowledgement, which must never pass for the
/// origin's acceptance (a stream capturing the `connect` subject answers
/// requests with one).
#[derive(Deserialize)]
struct PubAck {
    stream: Option<serde_json::Value>,
    seq: Option<serde_json::Value>,
}

impl PubAck {
    fn is_ack(&self) -> bool {
        self.stream.is_some() && self.seq.is_some()
    }
}

impl NatsOrigin {
    /// A synchronous event (`connect`, `publish`) as a request on its
    /// subject: a `Switchboard-Status` of 4xx/5xx refuses.
    fn decide(
        &self,
        kind: &'static str,
        body: Bytes,
    ) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        Box::pin(async move {
            self.check_link()?;
            let request =
                self.client
                    .request_with_headers(self.subjects.events(kind), self.headers(), body);
            let msg = match tokio::time::timeout(self.timeout, request).await {
                Err(_) => return Err(OriginError::Timeout),
                Ok(Err(e)) => {
                    return Err(match e.kind() {
                        async_nats::RequestErrorKind::TimedOut => OriginError::Timeout,
                        async_nats::RequestErrorKind::NoResponders => OriginError::Unreachable(
                            format!("nobody answers on {}", self.subjects.events(kind)),
                        ),
                        _ => OriginError::Unreachable(e.to_string()),
                    })
                }
                Ok(Ok(msg)) => msg,
            };
            let status =
                crate::reply_status(msg.headers.as_ref()).map_err(OriginError::BadAnswer)?;
            match status {
                200..=299 => {
                    if msg.payload.iter().all(u8::is_ascii_whitespace) {
                        return Ok(ConnectDecision::Accept(OriginAnswer::default()));
                    }
                    if serde_json::from_slice::<PubAck>(&msg.payload).is_ok_and(|a| a.is_ack()) {
                        return Err(OriginError::BadAnswer(format!(
                            "a JetStream stream answered {}: keep that subject out of streams",
                            self.subjects.events(kind)
                        )));
                    }
                    serde_json::from_slice(&msg.payload)
                        .map(ConnectDecision::Accept)
                        .map_err(|e| OriginError::BadAnswer(e.to_string()))
                }
                400..=599 => Ok(ConnectDecision::Reject {
                    status,
                    reason: serde_json::from_slice::<Rejection>(&msg.payload)
                        .ok()
                        .and_then(|r| r.reason),
                }),
                other => Err(OriginError::Permanent(other)),
            }
        })
    }

    /// A transport for node `node` using `client`, per `config`
    /// (`nats-prefix`, `origin-timeout`, `nats-event-stream`).
    pub fn new(client: Client, link: Arc<Link>, config: &NatsConfig, node: &str) -> Self {
        let stream = config.event_stream.as_ref().map(|name| Stream {
            name: name.clone(),
            js: jetstream::new(client.clone()),
            ready: tokio::sync::OnceCell::new(),
        });
        Self {
            client,
            link,
            subjects: Subjects::new(&config.prefix),
            node: node.to_owned(),
            timeout: config.origin_timeout,
            stream,
        }
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(NODE_HEADER, self.node.as_str());
        h
    }

    fn check_link(&self) -> Result<(), OriginError> {
        if self.link.is_up() {
            Ok(())
        } else {
            Err(OriginError::Unreachable("not connected to NATS".into()))
        }
    }

    /// Makes sure the event stream exists (once).
    async fn ensure_stream(&self, s: &Stream) -> Result<(), OriginError> {
        s.ready
            .get_or_try_init(|| async {
                let config = jetstream::stream::Config {
                    name: s.name.clone(),
                    description: Some("Switchboard events for the origin".into()),
                    subjects: Subjects::PUBLISHED_EVENT_KINDS
                        .iter()
                        .map(|k| self.subjects.events(k))
                        .collect(),
                    max_age: Duration::from_secs(24 * 3600),
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                };
                let made = tokio::time::timeout(self.timeout, s.js.get_or_create_stream(config))
                    .await
                    .map_err(|_| OriginError::Timeout)?;
                made.map(|_| ())
                    .map_err(|e| OriginError::Unreachable(format!("event stream {}: {e}", s.name)))
            })
            .await
            .map(|_| ())
    }

    async fn publish(&self, kind: &str, first_id: &str, body: Bytes) -> Result<(), OriginError> {
        let subject = self.subjects.events(kind);
        let mut headers = self.headers();
        match &self.stream {
            None => self
                .client
                .publish_with_headers(subject, headers, body)
                .await
                .map_err(|e| OriginError::Unreachable(e.to_string())),
            Some(s) => {
                self.ensure_stream(s).await?;
                headers.insert("Nats-Msg-Id", first_id);
                let acked = tokio::time::timeout(self.timeout, async {
                    s.js.publish_with_headers(subject, headers, body)
                        .await
                        .map_err(|e| OriginError::Unreachable(e.to_string()))?
                        .await
                        .map_err(|e| OriginError::Unreachable(e.to_string()))
                })
                .await
                .map_err(|_| OriginError::Timeout)?;
                acked.map(|_| ())
            }
        }
    }
}

fn body_of(events: &[&RawValue]) -> Bytes {
    let mut body =
        BytesMut::with_capacity(64 + events.iter().map(|e| e.get().len()).sum::<usize>());
    body.put_slice(b"{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(e.get().as_bytes());
    }
    body.put_slice(b"]}");
    body.freeze()
}

impl OriginTransport for NatsOrigin {
    fn connect(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide("connect", body)
    }

    fn publish(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide("publish", body)
    }

    fn subscribe(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide("subscribe", body)
    }

    fn deliver(&self, body: Bytes) -> BoxFuture<'_, Result<OriginAnswer, OriginError>> {
        Box::pin(async move {
            self.check_link()?;
            let batch: Batch<'_> = serde_json::from_slice(&body)
                .map_err(|e| OriginError::BadAnswer(format!("unreadable event batch: {e}")))?;
            let mut peeks = Vec::with_capacity(batch.events.len());
            for e in &batch.events {
                let peek: Peek<'_> = serde_json::from_str(e.get())
                    .map_err(|e| OriginError::BadAnswer(format!("unreadable event: {e}")))?;
                peeks.push(peek);
            }
            // Room for the body: max_payload less headers and framing.
            let limit = match self.client.max_payload() {
                0 => 1 << 20,
                n => n,
            }
            .saturating_sub(1024);
            // Runs of consecutive events of one kind, in order, each cut to fit.
            let mut start = 0;
            while start < peeks.len() {
                let kind = &peeks[start].kind;
                let event_size = |i: usize| batch.events[i].get().len() + 1;
                if event_size(start) + 12 > limit {
                    tracing::error!(
                        id = %peeks[start].id,
                        kind = %kind,
                        bytes = event_size(start),
                        limit,
                        "event larger than NATS max_payload; dropped"
                    );
                    start += 1;
                    continue;
                }
                let mut end = start;
                let mut size = 12; // {"events":[]}
                while end < peeks.len()
                    && peeks[end].kind == *kind
                    && size + event_size(end) <= limit
                {
                    size += event_size(end);
                    end += 1;
                }
                self.publish(kind, &peeks[start].id, body_of(&batch.events[start..end]))
                    .await?;
                start = end;
            }
            Ok(OriginAnswer::default())
        })
    }
}
