//! Talking to the origin: the [`OriginTransport`] trait, its HTTP webhook
//! implementation, the dev-mode stand-in, the [`dispatcher`] that queues,
//! batches and retries events, and `ask`, the one place that asks the
//! origin for a decision and makes event ids. [`Origin`] is the handle the
//! rest of the node holds; it uses connections (for replies) and nothing
//! above them.
//!
//! The transport only moves bodies; ordering, batching, retries and bounds live
//! in the dispatcher, so a NATS or Redis transport plugs in without repeating them.

pub(crate) mod ask;
pub mod dispatcher;
pub mod http;

use crate::config::Config;
use crate::conn::Registry;
use crate::lease::Lease;
use crate::metrics::Metrics;
use bytes::Bytes;
use dispatcher::Dispatcher;
use std::sync::Arc;
use switchboard_proto::origin::OriginAnswer;
use tokio_util::sync::CancellationToken;

pub use switchboard_backend::origin::{ConnectDecision, OriginError, OriginTransport};
pub use switchboard_backend::BoxFuture;

/// The node's link to the origin: the transport, the dispatcher's lanes,
/// and what both answer to (the lease, the drain deadline).
#[derive(Debug)]
pub(crate) struct Origin {
    pub(crate) config: Arc<Config>,
    pub(crate) transport: Arc<dyn OriginTransport>,
    pub(crate) dispatcher: Dispatcher,
    /// The right to speak for this node's connections.
    pub(crate) lease: Arc<Lease>,
    pub(crate) metrics: Arc<Metrics>,
    /// Where the origin's replies go.
    pub(crate) registry: Arc<Registry>,
    /// Fires when the drain deadline passes: pending work is abandoned.
    pub(crate) give_up: CancellationToken,
}

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
