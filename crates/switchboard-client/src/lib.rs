//! Async Rust client for Switchboard's native protocol, `switchboard.v1`.
//!
//! A [`Client`] owns one WebSocket connection to a Switchboard gateway, run by
//! a background tokio task that reconnects forever (exponential backoff with
//! full jitter) until [`Client::close`] or a terminal handshake refusal
//! (HTTP 401, 403, other 4xx except 408/429).
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use switchboard_client::{Client, SubscriptionEvent};
//!
//! # async fn demo() -> Result<(), switchboard_client::Error> {
//! let client = Client::builder("ws://127.0.0.1:8080/")
//!     .token("user-token")
//!     .connect()?;
//!
//! let mut sub = client.subscribe("chat:lobby").await?;
//! client.publish("chat:lobby", "hello").await?;
//!
//! while let Some(event) = sub.next().await {
//!     match event {
//!         SubscriptionEvent::Message(m) => println!("#{}: {:?}", m.offset, m.text()),
//!         SubscriptionEvent::Gap { .. } => println!("missed messages: reload the room"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Exactly once, in order, across reconnects.** For each
//!   [`Subscription`] the SDK remembers the last `(offset, epoch)` it
//!   delivered. After a reconnect it resubscribes with `since` = that
//!   position; the gateway replays what was missed before confirming, and the
//!   SDK drops anything at or below the position. When the gateway cannot
//!   replay (history too short or expired, new epoch) the stream says so with
//!   [`SubscriptionEvent::Gap`] instead of silently skipping.
//! - **Commands wait for a connection.** A command issued while disconnected
//!   is queued (bounded) and sent on the next connection; it fails with
//!   [`Error::Timeout`] if no reply comes within the command timeout
//!   (default 10 s) counted from the call. Commands in flight when a
//!   connection drops are sent again, except `publish` and `send`, which
//!   fail with [`Error::ConnectionLost`] (they may have been applied).
//! - **Errors are typed.** Gateway errors are [`Error::Server`] with the
//!   protocol's [`ErrorCode`].
//! - **Direct messages exactly once, in order, across lost connections —
//!   while the session lives.** The gateway gives each connection a
//!   *session* that outlives a lost socket for its `session-ttl` (default
//!   2 minutes). The SDK reconnects asking to resume it (with the highest
//!   direct message sequence it received); the gateway then re-sends every
//!   [`ClientEvent::Direct`] sent after that, in order, and the SDK drops
//!   any it already delivered. A resumed connection keeps its client id and
//!   is announced by [`ClientEvent::Resumed`]. The SDK acknowledges what it
//!   received in batches (an `ack` per 32 messages or 500 ms, whichever
//!   comes first), so the gateway keeps only what may still be needed.
//! - **When the session cannot be resumed** (it outlived `session-ttl`, the
//!   gateway restarted, the reconnect reached another node, the session was
//!   closed by the control API or the origin, or more direct messages were
//!   waiting than the gateway keeps) the reconnect starts a new session,
//!   announced by [`ClientEvent::Restarted`] with the gateway's reason: a
//!   new client id, and direct messages sent to the old session after it
//!   was lost may be lost (the gateway answered `unknown` to their senders
//!   only once the session had ended). Subscriptions go on as after any
//!   reconnect: recovered from history, or a
//!   [`Gap`](SubscriptionEvent::Gap).
//! - **Only [`Client::close`] ends a session.** It sends a close frame; a
//!   link the SDK finds dead, or a socket error, is just dropped (no close
//!   frame), so that the session survives for the reconnect.
//! - **Dead links are noticed.** If nothing at all (not even a WebSocket
//!   ping) arrives for twice the gateway's ping interval plus 5 s, the
//!   connection is dropped and re-established (and its session resumed).
//!
//! # Layout
//!
//! - [`client`]: the [`Client`] handle and its [`ClientBuilder`].
//! - [`subscription`]: [`Subscription`] streams and callback
//!   [`SubscriptionHandle`]s.
//! - [`event`]: [`SubscriptionEvent`], [`ClientEvent`], [`ConnectionState`].
//! - [`error`]: the [`Error`] type.
//! - [`backoff`]: the reconnect schedule.
//! - `connection` (private): the background task.
//! - `tracker` (private): per-channel position, recovery and deduplication.
//!
//! # TLS
//!
//! `wss://` URLs need the default `rustls-tls` feature (rustls with the
//! webpki root certificates).

pub mod backoff;
pub mod client;
mod connection;
pub mod error;
pub mod event;
pub mod subscription;
mod tracker;

pub use backoff::BackoffConfig;
pub use client::{Client, ClientBuilder, Events, IntoPayload};
pub use error::{Error, Result};
pub use event::{
    ChannelMessage, ClientEvent, ConnectionState, DirectMessage, DisconnectReason,
    SubscriptionEvent,
};
pub use subscription::{Subscription, SubscriptionHandle};

/// The wire types this SDK speaks, re-exported.
pub use switchboard_proto::native::{
    ErrorCode, HistoryResult, Member, PresenceResult, Publication, PublishResult, ResumeCode,
    ResumeError, StreamPosition, SUBPROTOCOL,
};
/// A message body: `Payload::Text` or `Payload::Binary`.
pub use switchboard_proto::origin::Payload;
