//! Talking to the origin: the [`OriginTransport`] trait, its HTTP webhook
//! implementation, the dev-mode stand-in, and the [`dispatcher`] that queues,
//! batches and retries events.
//!
//! The transport only moves bodies; ordering, batching, retries and bounds live
//! in the dispatcher, so a NATS or Redis transport plugs in without repeating them.

pub(crate) mod ask;
pub mod dispatcher;
pub mod http;

use bytes::Bytes;
use switchboard_proto::origin::OriginAnswer;

pub use switchboard_backend::origin::{ConnectDecision, OriginError, OriginTransport};
pub use switchboard_backend::BoxFuture;

/// Dev mode (no origin configured): accepts every connection and discards events.
#[derive(Debug, Default)]
pub struct DevOrigin;

impl OriginTransport for DevOrigin {
    fn connect(&self, _body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        Box::pin(async { Ok(ConnectDecision::Accept(OriginAnswer::default())) })
    }

    fn deliver(&self, _body: Bytes) -> BoxFuture<'_, Result<OriginAnswer, OriginError>> {
        Box::pin(async { Ok(OriginAnswer::default()) })
    }

    fn publish(&self, _body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        Box::pin(async { Ok(ConnectDecision::Accept(OriginAnswer::default())) })
    }

    fn subscribe(&self, _body: Bytes) -> BoxFuture<'_, Result<ConnectDecision, OriginError>> {
        Box::pin(async { Ok(ConnectDecision::Accept(OriginAnswer::default())) })
    }
}
