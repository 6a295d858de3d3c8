//! The outbound side of an origin: [`ControlClient`], one async method per
//! route of the gateway's control API (`docs/control-api.md`), and
//! [`ControlError`], which carries the API's stable error `code`.
//!
//! Request and response bodies are the types of
//! [`switchboard_proto::control`] and [`switchboard_proto::native`],
//! re-exported here.

use std::fmt;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use serde::Serialize;
use switchboard_proto::control::{
    BatchSendRequest, ChannelsResponse, CloseParams, ErrorBody, NodesResponse, SendResponse,
    SubscribeBody,
};

pub use switchboard_proto::control::{
    BatchMessage, BatchSendResponse, ChannelSummary, ConnectionInfo, Delivery, NodeInfo,
    PublishResponse, Stats, SubscribeResponse,
};
pub use switchboard_proto::native::{
    HistoryResult, Member, PresenceResult, Publication, StreamPosition,
};
pub use switchboard_proto::origin::Payload;

pub mod codes {
    //! The stable error `code`s of the control API (`docs/control-api.md`),
    //! to compare with [`ControlError::code`](super::ControlError::code).

    /// 400: the body is not the JSON the route expects.
    pub const INVALID_BODY: &str = "invalid_body";
    /// 400: a query parameter is wrong or unknown.
    pub const INVALID_QUERY: &str = "invalid_query";
    /// 400: the close code is not one that may be sent.
    pub const INVALID_CLOSE_CODE: &str = "invalid_close_code";
    /// 400: the close reason is over 123 bytes.
    pub const INVALID_CLOSE_REASON: &str = "invalid_close_reason";
    /// 400: the channel name is invalid.
    pub const BAD_CHANNEL: &str = "bad_channel";
    /// 400: history of a namespace without `history-size`.
    pub const HISTORY_DISABLED: &str = "history_disabled";
    /// 400: presence of a namespace without `presence`.
    pub const PRESENCE_DISABLED: &str = "presence_disabled";
    /// 401: missing or wrong API key.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 404: no open connection with this id.
    pub const CONNECTION_NOT_FOUND: &str = "connection_not_found";
    /// 404: the channel's namespace is not configured.
    pub const UNKNOWN_NAMESPACE: &str = "unknown_namespace";
    /// 404: no such route.
    pub const ROUTE_NOT_FOUND: &str = "route_not_found";
    /// 405: the route exists with other methods.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 409: the connection holds `--max-subscriptions` channels.
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too_many_subscriptions";
    /// 409: reserved for other refused channel operations.
    pub const CONFLICT: &str = "conflict";
    /// 413: the body or message is too large.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// 503: NATS (or the channel log) cannot be reached; never carried out.
    pub const CLUSTER_UNAVAILABLE: &str = "cluster_unavailable";
    /// 504: the node holding the connection did not answer in time; the
    /// outcome is unknown.
    pub const NODE_TIMEOUT: &str = "node_timeout";
}

/// Why a control API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The base URL given to [`ControlClient::new`] cannot be used.
    #[error("invalid control API URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A connection id is empty, `.` or `..`, which cannot be a path segment.
    #[error("invalid path segment {0:?}")]
    InvalidSegment(String),
    /// The API answered with its JSON error body.
    #[error("control API answered {status} {code}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable error code (see [`codes`]); match on this.
        code: String,
        /// Human-readable detail; its text may change.
        message: String,
    },
    /// A non-2xx answer without the API's JSON error body (a proxy in
    /// between, or not a Switchboard control API at that URL).
    #[error("unexpected answer {status}: {body}")]
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
        /// The body as text (at most 1,024 bytes of it).
        body: String,
    },
    /// A 2xx answer whose body is not what the route documents.
    #[error("cannot read the answer ({status}): {source}")]
    Decode {
        /// The HTTP status.
        status: u16,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The request did not get an answer: connection refused, timeout, TLS…
    #[error("control API request failed: {0}")]
    Transport(#[from] reqwest::Error),
}

impl ControlError {
    /// The HTTP status of an answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. }
            | Self::UnexpectedStatus { status, .. }
            | Self::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's error code (see [`codes`]), for [`ControlError::Api`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the same call may simply be made again: the command was
    /// certainly not carried out (503 `cluster_unavailable`) or the request
    /// never got an answer. A 504 `node_timeout` is not included: its
    /// outcome is unknown (retry publishes with the same idempotency key).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { code, .. } => code == codes::CLUSTER_UNAVAILABLE,
            Self::Transport(e) => e.is_connect(),
            _ => false,
        }
    }
}

/// Characters left as they are in a path segment: letters, digits and
/// `-._~:`. Everything else (`/`, `?`, `#`, `%`, spaces, non-ASCII, …) is
/// percent-encoded as UTF-8; the gateway decodes each segment once.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':');

/// `s` as one percent-encoded path segment.
fn segment(s: &str) -> Result<String, ControlError> {
    if s.is_empty() || s == "." || s == ".." {
        return Err(ControlError::InvalidSegment(s.to_owned()));
    }
    Ok(utf8_percent_encode(s, SEGMENT).to_string())
}

/// The default bound of a whole request (connect, send, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one gateway's control API (`--control-listen`).
///
/// Cheap to clone (the connection pool is shared); make one and keep it.
/// In a cluster any node takes any command, so one client per origin is
/// enough.
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_origin::control::ControlError> {
/// use switchboard_origin::control::ControlClient;
/// let api = ControlClient::new("http://127.0.0.1:8081", Some("key".into()))?;
/// let published = api.publish_text("chat:room-42", "hello", Some("msg-1")).await?;
/// println!("offset {} in epoch {}", published.offset, published.epoch);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ControlClient {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlClient")
            .field("base", &self.base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ControlClient {
    /// A client for the control API at `base_url` (for example
    /// `http://127.0.0.1:8081`; a path prefix is kept), sending
    /// `Authorization: Bearer <api_key>` when a key is given. Requests time
    /// out after [`DEFAULT_TIMEOUT`].
    pub fn new(base_url: impl Into<String>, api_key: Option<String>) -> Result<Self, ControlError> {
        let http = reqwest::Client::builder()
            .timeout(DEFAULT_TIMEOUT)
            .build()?;
        Self::with_http_client(base_url, api_key, http)
    }

    /// Like [`ControlClient::new`], with a `reqwest::Client` of your own
    /// (timeouts, proxies, TLS roots).
    pub fn with_http_client(
        base_url: impl Into<String>,
        api_key: Option<String>,
        http: reqwest::Client,
    ) -> Result<Self, ControlError> {
        let url = base_url.into();
        let parsed = reqwest::Url::parse(&url).map_err(|e| ControlError::InvalidUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ControlError::InvalidUrl {
                url,
                reason: "the scheme must be http or https".into(),
            });
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(ControlError::InvalidUrl {
                url,
                reason: "a base URL has no query or fragment".into(),
            });
        }
        let base = parsed.as_str().trim_end_matches('/').to_owned();
        Ok(Self {
            http,
            base,
            api_key,
        })
    }

    /// The base URL requests go to, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    // --- connections ---

    /// `POST /v1/connections/{id}/messages`: queues a message for one
    /// connection. A raw client gets it as a plain frame, a native client as
    /// a `direct` push. 404 `connection_not_found` when it is gone.
    pub async fn send(&self, connection_id: &str, payload: &Payload) -> Result<(), ControlError> {
        let path = format!("/v1/connections/{}/messages", segment(connection_id)?);
        let _: SendResponse = self
            .json(self.request(reqwest::Method::POST, &path).json(payload))
            .await?;
        Ok(())
    }

    /// [`ControlClient::send`] of a text message.
    pub async fn send_text(&self, connection_id: &str, text: &str) -> Result<(), ControlError> {
        self.send(connection_id, &Payload::Text(text.to_owned()))
            .await
    }

    /// [`ControlClient::send`] of a binary message.
    pub async fn send_binary(&self, connection_id: &str, data: &[u8]) -> Result<(), ControlError> {
        self.send(connection_id, &Payload::Binary(data.to_vec()))
            .await
    }

    /// `POST /v1/messages`: many messages, each to many connections. The
    /// answer has one map per message, each id `delivered` or `unknown`
    /// (unknown ids are not an error).
    pub async fn send_batch(
        &self,
        messages: Vec<BatchMessage>,
    ) -> Result<BatchSendResponse, ControlError> {
        let body = BatchSendRequest { messages };
        self.json(
            self.request(reqwest::Method::POST, "/v1/messages")
                .json(&body),
        )
        .await
    }

    /// `DELETE /v1/connections/{id}?code=…&reason=…`: closes a connection
    /// with this close code (1000, 1001, 1008, 1011–1013 or 3000–4999) and
    /// reason (at most 123 bytes). The origin then gets its `disconnect`
    /// with `closed_by: origin`.
    pub async fn close(
        &self,
        connection_id: &str,
        code: u16,
        reason: &str,
    ) -> Result<(), ControlError> {
        let params = CloseParams {
            code: Some(code),
            reason: Some(reason.to_owned()),
        };
        let path = format!("/v1/connections/{}", segment(connection_id)?);
        let _: serde_json::Value = self
            .json(self.request(reqwest::Method::DELETE, &path).query(&params))
            .await?;
        Ok(())
    }

    /// `GET /v1/connections/{id}`: what the gateway knows of a connection.
    pub async fn connection(&self, connection_id: &str) -> Result<ConnectionInfo, ControlError> {
        let path = format!("/v1/connections/{}", segment(connection_id)?);
        self.json(self.request(reqwest::Method::GET, &path)).await
    }

    // --- channels ---

    /// `PUT /v1/connections/{id}/channels/{channel}`: subscribes a
    /// connection to a channel; with `since`, the messages after that
    /// position are sent to it first (see `recovered` in the answer).
    /// Repeating it is harmless (`already: true`).
    pub async fn subscribe(
        &self,
        connection_id: &str,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Result<SubscribeResponse, ControlError> {
        let path = format!(
            "/v1/connections/{}/channels/{}",
            segment(connection_id)?,
            segment(channel)?
        );
        let mut req = self.request(reqwest::Method::PUT, &path);
        if since.is_some() {
            req = req.json(&SubscribeBody { since });
        }
        self.json(req).await
    }

    /// `DELETE /v1/connections/{id}/channels/{channel}`: ends a
    /// subscription (also fine when there was none).
    pub async fn unsubscribe(
        &self,
        connection_id: &str,
        channel: &str,
    ) -> Result<(), ControlError> {
        let path = format!(
            "/v1/connections/{}/channels/{}",
            segment(connection_id)?,
            segment(channel)?
        );
        self.empty(self.request(reqwest::Method::DELETE, &path))
            .await
    }

    /// `POST /v1/channels/{channel}/messages`: publishes to every subscriber
    /// of the channel. With an `idempotency_key` (1–256 bytes), a retry
    /// within five minutes publishes nothing and answers the first
    /// publish's position with `duplicate: true`.
    pub async fn publish(
        &self,
        channel: &str,
        payload: &Payload,
        idempotency_key: Option<&str>,
    ) -> Result<PublishResponse, ControlError> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(flatten)]
            payload: &'a Payload,
            #[serde(skip_serializing_if = "Option::is_none")]
            idempotency_key: Option<&'a str>,
        }
        let path = format!("/v1/channels/{}/messages", segment(channel)?);
        let body = Body {
            payload,
            idempotency_key,
        };
        self.json(self.request(reqwest::Method::POST, &path).json(&body))
            .await
    }

    /// [`ControlClient::publish`] of a text message.
    pub async fn publish_text(
        &self,
        channel: &str,
        text: &str,
        idempotency_key: Option<&str>,
    ) -> Result<PublishResponse, ControlError> {
        self.publish(channel, &Payload::Text(text.to_owned()), idempotency_key)
            .await
    }

    /// `GET /v1/channels/{channel}/messages`: the messages the channel
    /// keeps, oldest first. `since`: only those after that position (the
    /// answer's `recovered` says whether none is missing); `limit`: the
    /// newest `limit`, or with `since` the oldest `limit` after it.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
    ) -> Result<HistoryResult, ControlError> {
        let path = format!("/v1/channels/{}/messages", segment(channel)?);
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(p) = since {
            query.push(("since", p.offset.to_string()));
            query.push(("epoch", p.epoch.clone()));
        }
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        self.json(self.request(reqwest::Method::GET, &path).query(&query))
            .await
    }

    /// `GET /v1/channels/{channel}/presence`: the connections subscribed to
    /// the channel, with the user id and metadata the origin attached.
    pub async fn presence(&self, channel: &str) -> Result<PresenceResult, ControlError> {
        let path = format!("/v1/channels/{}/presence", segment(channel)?);
        self.json(self.request(reqwest::Method::GET, &path)).await
    }

    /// `GET /v1/channels`: the channels the answering node holds, by name.
    pub async fn channels(&self) -> Result<Vec<ChannelSummary>, ControlError> {
        let r: ChannelsResponse = self
            .json(self.request(reqwest::Method::GET, "/v1/channels"))
            .await?;
        Ok(r.channels)
    }

    // --- nodes ---

    /// `GET /v1/stats`: the answering node's counters.
    pub async fn stats(&self) -> Result<Stats, ControlError> {
        self.json(self.request(reqwest::Method::GET, "/v1/stats"))
            .await
    }

    /// `GET /v1/nodes`: the live nodes of the cluster, by id (a single node
    /// lists itself).
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ControlError> {
        let r: NodesResponse = self
            .json(self.request(reqwest::Method::GET, "/v1/nodes"))
            .await?;
        Ok(r.nodes)
    }

    // --- plumbing ---

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{}", self.base, path));
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }

    /// Sends `req`; the body of a 2xx answer, or the error.
    async fn send_raw(&self, req: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), ControlError> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?.to_vec();
        if (200..300).contains(&status) {
            return Ok((status, body));
        }
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ControlError::Api {
                status,
                code: e.code,
                message: e.message,
            },
            Err(_) => {
                let mut text = String::from_utf8_lossy(&body).into_owned();
                if text.len() > 1024 {
                    let mut cut = 1024;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                ControlError::UnexpectedStatus { status, body: text }
            }
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ControlError> {
        let (status, body) = self.send_raw(req).await?;
        serde_json::from_slice(&body).map_err(|source| ControlError::Decode { status, source })
    }

    async fn empty(&self, req: reqwest::RequestBuilder) -> Result<(), ControlError> {
        self.send_raw(req).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded_once() {
        assert_eq!(segment("chat:room-1").unwrap(), "chat:room-1");
        assert_eq!(segment("chat:a/b").unwrap(), "chat:a%2Fb");
        assert_eq!(
            segment("chat:?#% +é").unwrap(),
            "chat:%3F%23%25%20%2B%C3%A9"
        );
        assert_eq!(segment("n1.AbC_-x").unwrap(), "n1.AbC_-x");
        for bad in ["", ".", ".."] {
            assert!(matches!(segment(bad), Err(ControlError::InvalidSegment(_))));
        }
    }

    #[test]
    fn base_urls_are_checked() {
        let c = ControlClient::new("http://127.0.0.1:8081/", None).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:8081");
        let c = ControlClient::new("https://gw.example/api/", Some("k".into())).unwrap();
        assert_eq!(c.base_url(), "https://gw.example/api");
        assert!(!format!("{c:?}").contains("\"k\""));
        for bad in ["127.0.0.1:8081", "ftp://x", "http://x/?a=1", "not a url"] {
            assert!(
                matches!(
                    ControlClient::new(bad, None),
                    Err(ControlError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
    }
}
