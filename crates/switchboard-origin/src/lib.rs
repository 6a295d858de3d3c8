//! Helpers for an origin — the application behind Switchboard: verifying the
//! gateway's signed webhook requests and calling its control API.
//!
//! - [`webhook`]: [`Verifier`] checks `X-Switchboard-Timestamp` and
//!   `X-Switchboard-Signature` against the raw body and the gateway's
//!   `--origin-secret` (constant-time, stale and future timestamps refused);
//!   [`parse_batch`] reads the body into the typed events of
//!   [`switchboard_proto::origin`]; [`Answer`] builds the reply.
//! - [`control`]: [`ControlClient`] has one async method per control API
//!   route (send, batch send, close, connection info, subscribe,
//!   unsubscribe, publish, history, presence, channels, stats, nodes), and
//!   [`ControlError`] carries the API's stable error `code`.
//!
//! The contract itself is in `docs/origin.md` and `docs/control-api.md`; this
//! crate is described in `docs/origin-helpers.md`, with the equivalent Node
//! and Python snippets.
//!
//! # Example
//!
//! An origin that echoes every message and announces every new connection
//! on a channel, framework-agnostic: give `handle` the request's headers and
//! raw body, answer with the status and JSON body it returns.
//!
//! ```no_run
//! use switchboard_origin::http::HeaderMap;
//! use switchboard_origin::webhook::{Answer, Event, Reply, Verifier};
//! use switchboard_origin::{ControlClient, ControlError};
//!
//! fn handle(verifier: &Verifier, headers: &HeaderMap, body: &[u8]) -> Answer {
//!     let batch = match verifier.events(headers, body) {
//!         Ok(batch) => batch,
//!         Err(e) => return Answer::reject(e.status(), e.to_string()),
//!     };
//!     let mut replies = Vec::new();
//!     for event in &batch.events {
//!         match event {
//!             Event::Connect(c) if c.path.starts_with("/banned") => {
//!                 return Answer::reject(403, "not here");
//!             }
//!             Event::Message(m) => replies.push(Reply {
//!                 connection_id: m.connection_id.clone(),
//!                 payload: m.payload.clone(),
//!             }),
//!             _ => {} // skip what you do not handle
//!         }
//!     }
//!     Answer::replies(replies)
//! }
//!
//! async fn later(api: &ControlClient, connection_id: &str) -> Result<(), ControlError> {
//!     api.send_text(connection_id, "pushed by the origin").await?;
//!     api.subscribe(connection_id, "chat:lobby", None).await?;
//!     let p = api.publish_text("chat:lobby", "someone joined", Some("join-1")).await?;
//!     assert!(p.offset > 0);
//!     match api.send_text("gone.AAAAAAAAAAAAAAAAAAAAAA", "hi").await {
//!         Err(e) if e.code() == Some("connection_not_found") => {}
//!         other => other?,
//!     }
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), ControlError> {
//! let verifier = Verifier::new("the --origin-secret");
//! let api = ControlClient::new("http://127.0.0.1:8081", Some("the --api-key".into()))?;
//! # let (headers, body) = (HeaderMap::new(), Vec::<u8>::new());
//! let answer = handle(&verifier, &headers, &body);
//! println!("{} {}", answer.status(), answer.body());
//! later(&api, "a1b2c3d4e5.Qx3mZ8c0bS1yV6n2kLwEfA").await
//! # }
//! ```

pub mod control;
pub mod webhook;

pub use control::{ControlClient, ControlError};
pub use webhook::{parse_batch, Answer, Batch, Verifier, WebhookError};

/// The `http` crate this one takes headers from ([`http::HeaderMap`]), for
/// callers that do not depend on it themselves.
pub use http;
