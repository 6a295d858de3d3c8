//! The SDK's error type.
//!
//! Errors are `Clone` because one error can reach several places at once: a
//! terminal handshake refusal is the answer to every waiting command, the
//! final [`ClientEvent::Failed`](crate::ClientEvent::Failed) event, and the
//! [`ConnectionState::Failed`](crate::ConnectionState::Failed) state.

use std::time::Duration;
use switchboard_proto::native::ErrorCode;

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the SDK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The gateway answered the command with an error.
    #[error("{} ({})", message, code.as_str())]
    Server {
        /// The stable error code.
        code: ErrorCode,
        /// Human-readable detail from the gateway.
        message: String,
    },
    /// No reply within the command timeout. The time counts from the call, so
    /// it includes waiting for a connection.
    #[error("`{command}` timed out after {after:?}")]
    Timeout {
        /// The command's name (`publish`, `subscribe`, …).
        command: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection dropped after the command was sent and before its
    /// reply; it may or may not have taken effect. Only commands that are not
    /// safe to repeat (`publish`, `send`) fail this way: the others are sent
    /// again on the next connection.
    #[error(
        "connection lost before the reply to `{command}`; it may or may not have been applied"
    )]
    ConnectionLost {
        /// The command's name.
        command: &'static str,
    },
    /// Too many commands are already waiting for a connection.
    #[error("{0} commands are already waiting for a connection")]
    QueueFull(usize),
    /// The channel name is not `namespace:name` (non-empty parts, at most 255
    /// bytes, no whitespace or control characters).
    #[error("invalid channel name {0:?}")]
    InvalidChannel(String),
    /// This client already has a [`Subscription`](crate::Subscription) to
    /// the channel.
    #[error("already subscribed to {0:?}")]
    AlreadySubscribed(String),
    /// The gateway refused the WebSocket handshake with an HTTP status.
    ///
    /// Terminal (the client stops reconnecting) when retrying cannot help:
    /// 401, 403 and every other 4xx except 408 and 429. 5xx, 408 and 429 are
    /// retried with backoff and only show up in
    /// [`ClientEvent::ConnectFailed`](crate::ClientEvent::ConnectFailed).
    #[error("handshake refused with HTTP {status}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The `code` of the gateway's JSON refusal body, when there is one.
        code: Option<String>,
        /// The refusal's `message` (or the raw body).
        message: String,
    },
    /// The gateway did not select the `switchboard.v1` subprotocol at the
    /// handshake (a gateway without the native protocol, or a proxy that
    /// drops the header). Terminal.
    #[error("the gateway does not speak switchboard.v1: {0}")]
    UnsupportedProtocol(String),
    /// The gateway sent something this SDK cannot read (a malformed reply, no
    /// `connected` push first).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A network or WebSocket-level failure (retried for connections).
    #[error("transport error: {0}")]
    Transport(String),
    /// The builder was given something unusable (URL, header, no runtime).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The client was closed with [`Client::close`](crate::Client::close)
    /// (or every handle was dropped).
    #[error("client closed")]
    Closed,
}

impl Error {
    /// The gateway's error code, for [`Error::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether this error ends the client for good (no more reconnects).
    pub fn is_terminal(&self) -> bool {
        match self {
            Self::Refused { status, .. } => refusal_is_terminal(*status),
            Self::UnsupportedProtocol(_) | Self::Config(_) | Self::Closed => true,
            _ => false,
        }
    }

    /// Whether retrying the same command later may succeed: timeouts, lost
    /// connections, a full queue, and the gateway's `unavailable` and
    /// `internal` codes.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Server { code, .. } => {
                matches!(code, ErrorCode::Unavailable | ErrorCode::Internal)
            }
            Self::Timeout { .. } | Self::ConnectionLost { .. } | Self::QueueFull(_) => true,
            _ => false,
        }
    }
}

/// Whether a handshake refused with `status` should stop reconnecting.
pub(crate) fn refusal_is_terminal(status: u16) -> bool {
    (400..500).contains(&status) && status != 408 && status != 429
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_well() {
        let e = Error::Server {
            code: ErrorCode::UnknownNamespace,
            message: "no namespace `nope`".into(),
        };
        assert_eq!(e.to_string(), "no namespace `nope` (unknown_namespace)");
        assert_eq!(e.code(), Some(ErrorCode::UnknownNamespace));
        let r = Error::Refused {
            status: 403,
            code: Some("rejected_by_origin".into()),
            message: "banned".into(),
        };
        assert_eq!(
            r.to_string(),
            "handshake refused with HTTP 403 (rejected_by_origin): banned"
        );
        assert!(r.is_terminal());
        assert!(!Error::Transport("reset".into()).is_terminal());
        assert!(Error::UnsupportedProtocol("none selected".into()).is_terminal());
        assert!(!Error::Protocol("bad frame".into()).is_terminal());
    }
}
