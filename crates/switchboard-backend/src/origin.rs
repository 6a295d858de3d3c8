//! The origin seam: the [`OriginTransport`] trait that carries event
//! batches to the application (HTTP webhook in the server crate, NATS or
//! another bus in a backend crate), and what it answers.

use crate::BoxFuture;
use bytes::Bytes;
use switchboard_proto::origin::OriginAnswer;

/// The origin's decision on a `connect` or `publish` event.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectDecision {
    /// Accepted, with what the origin attached.
    Accept(OriginAnswer),
    /// Refused with an HTTP status (4xx/5xx) the client sees, and a reason.
    Reject {
        /// Status for the client's handshake.
        status: u16,
        /// The origin's reason, shown to the client.
        reason: Option<String>,
    },
}

/// Why an origin request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    /// Could not connect or the connection broke.
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    /// No answer within `origin-timeout`.
    #[error("origin timed out")]
    Timeout,
    /// An error status worth retrying (5xx, 408, 429).
    #[error("origin answered {0}")]
    Retryable(u16),
    /// An error status that retrying cannot fix (other 4xx, 3xx).
    #[error("origin refused the events with {0}")]
    Permanent(u16),
    /// A 2xx whose body is not a valid answer.
    #[error("invalid origin answer: {0}")]
    BadAnswer(String),
    /// Not sent: the node's cluster lease ran out before the request was
    /// written (see [`crate::lease`]). Sent again once the lease is renewed.
    #[error("not sent: this node's cluster lease ran out")]
    LeaseLost,
}

impl OriginError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_) | Self::Timeout | Self::Retryable(_) | Self::LeaseLost
        )
    }
}

/// Carries event batches to the origin. Bodies are the JSON of
/// [`switchboard_proto::origin::EventBatch`], already serialized.
pub trait OriginTransport: Send + Sync + std::fmt::Debug + 'static {
    /// Sends a batch holding one `connect` event and returns the decision.
    fn connect(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>>;

    /// Sends a batch of events; the answer may carry replies.
    fn deliver(&self, body: Bytes) -> BoxFuture<'_, Result<OriginAnswer, OriginError>>;

    /// Sends a batch holding one `publish` event and returns the decision
    /// (accepted: publish; rejected: the client is told the reason).
    fn publish(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>>;

    /// Sends a batch holding one `subscribe` event and returns the decision
    /// (accepted: subscribe; rejected: the client is told the reason).
    fn subscribe(&self, body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>>;
}
