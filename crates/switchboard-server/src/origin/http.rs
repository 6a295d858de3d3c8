//! The HTTP webhook transport: one signed POST per batch.

use super::{BoxFuture, ConnectDecision, OriginError, OriginTransport};
use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard_proto::origin::{signature, OriginAnswer, Rejection};

/// Largest origin answer read, in bytes, unless the request was larger (see
/// `HttpOrigin::post`).
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Posts events to the origin URL.
#[derive(Debug)]
pub struct HttpOrigin {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Option<Vec<u8>>,
    node: String,
    /// When set, a request's body is written only while this lease is held.
    lease: Option<std::sync::Arc<crate::lease::Lease>>,
}

impl HttpOrigin {
    /// Posts a synchronous event (`connect`, `publish`): 2xx accepts,
    /// 4xx/5xx refuses with the status and the answer's reason.
    fn decide(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        Box::pin(async move {
            let (status, body) = self.post(body).await?;
            match status {
                200..=299 => parse_answer(&body).map(ConnectDecision::Accept),
                400..=599 => {
                    let reason = serde_json::from_slice::<Rejection>(&body)
                        .ok()
                        .and_then(|r| r.reason);
                    Ok(ConnectDecision::Reject { status, reason })
                }
                other => Err(OriginError::Permanent(other)),
            }
        })
    }

    /// A transport for `url`, signing with `secret` when given.
    pub fn new(
        url: &str,
        secret: Option<&str>,
        timeout: Duration,
        node: &str,
    ) -> Result<Self, OriginError> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| OriginError::Unreachable(format!("bad origin URL: {e}")))?;
        let client = client(timeout).map_err(|e| OriginError::Unreachable(e.to_string()))?;
        Ok(Self {
            client,
            url,
            secret: secret.map(|s| s.as_bytes().to_vec()),
            node: node.to_owned(),
            lease: None,
        })
    }

    /// Writes each request's body only if `lease` is held at that moment:
    /// the check runs in the connection's writer as it takes the body, so a
    /// node frozen between deciding to send and sending (SIGSTOP, a long
    /// pause) does not send a stale request when it resumes after the
    /// cluster reported it lost. Such a request fails with
    /// [`OriginError::LeaseLost`].
    pub fn gated_by(mut self, lease: std::sync::Arc<crate::lease::Lease>) -> Self {
        self.lease = Some(lease);
        self
    }

    async fn post(&self, body: Bytes) -> Result<(u16, Bytes), OriginError> {
        let mut req = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("x-switchboard-node", &self.node);
        if let Some(secret) = &self.secret {
            req = signed(req, secret, &body);
        }
        // An answer may echo its request (a reply to a message near
        // `max-message-size`), so the cap grows with the request.
        let max_answer = MAX_ANSWER_BYTES.max(body.len().saturating_mul(2));
        let resp = match &self.lease {
            None => req.body(body).send().await,
            Some(lease) => {
                let gate = lease.clone();
                let len = body.len();
                let chunk = futures_util::stream::once(async move {
                    if gate.is_held() {
                        Ok(body)
                    } else {
                        Err(LeaseRanOut)
                    }
                });
                req.header("content-length", len)
                    .body(reqwest::Body::wrap_stream(chunk))
                    .send()
                    .await
            }
        };
        let resp = match resp {
            Err(_) if self.lease.as_ref().is_some_and(|l| !l.is_held()) => {
                return Err(OriginError::LeaseLost)
            }
            other => other.map_err(classify)?,
        };
        let status = resp.status().as_u16();
        if resp.content_length().is_some_and(|l| l > max_answer as u64) {
            return Err(OriginError::BadAnswer("answer too large".into()));
        }
        // Read chunk by chunk so an answer without Content-Length is cut off
        // at the cap rather than buffered whole.
        let mut resp = resp;
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > max_answer {
                return Err(OriginError::BadAnswer("answer too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body.freeze()))
    }
}

/// The body stream's error when the lease ran out before it was written.
#[derive(Debug, thiserror::Error)]
#[error("the node's cluster lease ran out")]
struct LeaseRanOut;

fn classify(e: reqwest::Error) -> OriginError {
    if e.is_timeout() {
        OriginError::Timeout
    } else {
        OriginError::Unreachable(e.to_string())
    }
}

fn parse_answer(body: &[u8]) -> Result<OriginAnswer, OriginError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(OriginAnswer::default());
    }
    serde_json::from_slice(body).map_err(|e| OriginError::BadAnswer(e.to_string()))
}

impl OriginTransport for HttpOrigin {
    fn connect(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide(body)
    }

    fn publish(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide(body)
    }

    fn subscribe(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        self.decide(body)
    }

    fn deliver(&self, body: Bytes) -> BoxFuture<'_, Result<OriginAnswer, OriginError>> {
        Box::pin(async move {
            let (status, body) = self.post(body).await?;
            match status {
                200..=299 => parse_answer(&body),
                408 | 429 | 500..=599 => Err(OriginError::Retryable(status)),
                other => Err(OriginError::Permanent(other)),
            }
        })
    }
}

/// `req` with the webhook signature headers of `body` signed with `secret`
/// now (also the GraphQL endpoint's requests).
pub(crate) fn signed(
    req: reqwest::RequestBuilder,
    secret: &[u8],
    body: &[u8],
) -> reqwest::RequestBuilder {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    req.header(signature::TIMESTAMP_HEADER, ts.to_string())
        .header(
            signature::SIGNATURE_HEADER,
            signature::sign(secret, ts, body),
        )
}

/// The HTTP client of the origin's requests (webhooks, the GraphQL
/// endpoint): `timeout` per request, pooled connections, no redirects (a
/// redirect would turn the POST into a bodiless GET and forward the
/// signature: a 3xx is the origin's answer instead).
pub(crate) fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
        .build()
}
