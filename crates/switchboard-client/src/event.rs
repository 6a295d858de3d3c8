//! What the SDK tells the application: per-subscription events, client-wide
//! (connection-level) events, and the connection state.

use crate::error::Error;
use std::fmt;
use std::time::Duration;
use switchboard_proto::native::{Member, ResumeError, StreamPosition};
use switchboard_proto::origin::Payload;

/// One message of a channel, as delivered to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMessage {
    /// The channel, `namespace:name`.
    pub channel: String,
    /// The message's offset in `epoch`; consecutive messages differ by 1.
    pub offset: u64,
    /// The channel's epoch; a new epoch restarts the offsets.
    pub epoch: String,
    /// The message body.
    pub data: Payload,
}

impl ChannelMessage {
    /// The message's position in the channel's stream.
    pub fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    /// The body, if it is text.
    pub fn text(&self) -> Option<&str> {
        self.data.text()
    }

    /// The body as bytes (text as UTF-8).
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }
}

/// A direct message for this connection (from the origin or the control
/// API's `POST /v1/connections/{id}/messages`), as delivered in
/// [`ClientEvent::Direct`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectMessage {
    /// Its sequence number in the session: 1, 2, 3… with no holes, going on
    /// across resumed connections and starting over with a new session.
    /// `None` when the gateway keeps no sessions (`session-ttl = 0`).
    pub seq: Option<u64>,
    /// The message body.
    pub data: Payload,
}

impl DirectMessage {
    /// The body, if it is text.
    pub fn text(&self) -> Option<&str> {
        self.data.text()
    }

    /// The body as bytes (text as UTF-8).
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }
}

/// An event of one [`Subscription`](crate::Subscription).
///
/// A subscription's stream starts with [`Subscribed`](Self::Subscribed) and
/// has one more after each reconnect. Across all of them it delivers every
/// channel message exactly once and in offset order, except where a
/// [`Gap`](Self::Gap) says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionEvent {
    /// The gateway confirmed the subscription: the first time, and again
    /// after every reconnect. Recovered messages, if any, follow this event.
    Subscribed {
        /// The channel's epoch.
        epoch: String,
        /// The channel's newest offset when the gateway answered.
        offset: u64,
        /// `None` for the first subscribe; after a reconnect, whether every
        /// message missed while disconnected was recovered (`false` is
        /// followed by a [`Gap`](Self::Gap)).
        recovered: Option<bool>,
        /// With `recovered: Some(true)`: how many missed messages the gateway
        /// sent (they follow this event).
        missed: Option<u64>,
    },
    /// A channel message.
    Message(ChannelMessage),
    /// Messages were lost: the gateway could not replay what was published
    /// after `last` (history too short or expired, or the channel's epoch
    /// changed). The stream goes on after `resumed`; an application that
    /// needs every message should resynchronise its state (for example
    /// from its own database) before applying the messages that follow.
    Gap {
        /// The last position delivered before the gap.
        last: StreamPosition,
        /// The stream resumes with the messages after this position.
        resumed: StreamPosition,
    },
    /// Someone subscribed to the channel (namespaces with `join-leave`).
    Join(Member),
    /// Someone left the channel (namespaces with `join-leave`).
    Leave(Member),
    /// The server ended this subscription (control API or origin) — also
    /// while the client was away, noticed when its session is resumed; the
    /// stream ends after this event and the SDK does not resubscribe.
    Unsubscribed,
    /// The subscription cannot go on: a resubscribe after a reconnect was
    /// refused, or the client failed for good. The stream ends after this.
    Failed(Error),
}

/// Why an established connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The gateway sent a close frame (for example 1012 when a node drains,
    /// or the code given to `DELETE /v1/connections/{id}`).
    Closed {
        /// The close code (1005 when the frame had none).
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The connection failed or ended without a close frame.
    Network(String),
    /// Nothing at all (not even a ping) arrived for this long, so the link was
    /// considered dead.
    HeartbeatTimeout(Duration),
    /// The gateway broke the protocol (e.g. no `connected` push first).
    Protocol(String),
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed { code, reason } if reason.is_empty() => {
                write!(f, "closed by the gateway ({code})")
            }
            Self::Closed { code, reason } => write!(f, "closed by the gateway ({code} {reason})"),
            Self::Network(e) => write!(f, "network: {e}"),
            Self::HeartbeatTimeout(d) => write!(f, "nothing heard for {d:?}"),
            Self::Protocol(e) => write!(f, "protocol: {e}"),
        }
    }
}

/// A client-wide event, from [`Client::events`](crate::Client::events).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The client's first connection is up (the gateway's `connected` push
    /// arrived). Every later connection is announced by
    /// [`Resumed`](Self::Resumed) or [`Restarted`](Self::Restarted)
    /// instead: each established connection yields exactly one of the three.
    Connected {
        /// This connection's id (what the control API calls it).
        client_id: String,
        /// The gateway node holding it.
        node: String,
    },
    /// A reconnect resumed the session of the lost connection: same
    /// `client_id`, nothing lost. Direct messages sent meanwhile follow
    /// (each exactly once), and every subscription recovers from where it
    /// stopped, as after any reconnect.
    Resumed {
        /// The connection's id, the same as before.
        client_id: String,
        /// The gateway node holding it.
        node: String,
    },
    /// A reconnect started a new session: a new `client_id`, as far as the
    /// gateway and the origin are concerned a new connection (the old one
    /// got its `disconnect`). Direct messages sent to the old session after
    /// it was lost may be lost. Subscriptions are resubscribed and recover
    /// from history as usual (a [`SubscriptionEvent::Gap`] where they
    /// cannot); server-side subscriptions are whatever the origin gives the
    /// new connection.
    Restarted {
        /// The new connection's id.
        client_id: String,
        /// The gateway node holding it.
        node: String,
        /// Why the gateway refused to resume the old session (it ended,
        /// expired, overflowed, is unknown to this node…); `None` when
        /// there was no session to resume (the gateway keeps none).
        error: Option<ResumeError>,
    },
    /// An established connection ended; the next attempt starts in
    /// `retry_in`.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
        /// Delay before the next connection attempt.
        retry_in: Duration,
    },
    /// A connection attempt failed in a way worth retrying (network error,
    /// HTTP 5xx, 408, 429); the next one starts in `retry_in`.
    ConnectFailed {
        /// What went wrong.
        error: Error,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// A direct message for this connection (from the origin or the control
    /// API). While the session lives they arrive exactly once and in order,
    /// lost connections notwithstanding.
    Direct(DirectMessage),
    /// The connection's token expires at `expires_at_ms` (Unix ms): hand a
    /// fresh one to [`Client::refresh`](crate::Client::refresh) before, or
    /// the gateway closes the connection (4004).
    TokenExpiring {
        /// When the current token expires.
        expires_at_ms: u64,
    },
    /// The server subscribed this connection to a channel (origin's `connect`
    /// answer or the control API) — also while the client was away, which
    /// comes out after [`Resumed`](Self::Resumed). Its messages arrive as
    /// [`ClientEvent::Message`].
    ServerSubscribed {
        /// The channel.
        channel: String,
        /// The channel's epoch.
        epoch: String,
        /// The channel's newest offset: later messages have larger ones.
        /// (After a resume: where the session stopped receiving it; what was
        /// published since follows, as far as the channel's history goes.)
        offset: u64,
    },
    /// The server unsubscribed this connection from a channel that has no
    /// client-side [`Subscription`](crate::Subscription) — also while the
    /// client was away, which comes out after [`Resumed`](Self::Resumed).
    ServerUnsubscribed {
        /// The channel.
        channel: String,
    },
    /// A message of a channel with no client-side
    /// [`Subscription`](crate::Subscription) (a server-side subscription).
    /// A resumed session recovers what was published meanwhile (as far as
    /// the channel's history goes, without a gap being reported); after
    /// [`Restarted`](Self::Restarted), nothing is recovered.
    Message(ChannelMessage),
    /// A join on a channel with no client-side subscription.
    Join {
        /// The channel.
        channel: String,
        /// Who.
        member: Member,
    },
    /// A leave on a channel with no client-side subscription.
    Leave {
        /// The channel.
        channel: String,
        /// Who.
        member: Member,
    },
    /// This receiver fell behind and `missed` events were dropped for it
    /// (see [`ClientBuilder::event_capacity`](crate::ClientBuilder::event_capacity)).
    Lagged {
        /// How many.
        missed: u64,
    },
    /// The client stopped for good (e.g. the handshake was refused with 401);
    /// every command fails with this error from now on.
    Failed(Error),
    /// The client was closed by the application.
    Closed,
}

/// Where the client's connection stands, from
/// [`Client::state`](crate::Client::state).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// Connected.
    Connected {
        /// This connection's id.
        client_id: String,
        /// The gateway node holding it.
        node: String,
    },
    /// Stopped for good by a terminal error.
    Failed(Error),
    /// Closed by the application.
    Closed,
}
