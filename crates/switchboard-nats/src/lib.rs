//! The NATS backend of Switchboard: a cluster of nodes joined by NATS, and
//! the origin reached over NATS.
//!
//! - [`config`]: [`NatsConfig`], the backend's own settings.
//! - [`connect`]: the NATS connection, with credentials, TLS, endless
//!   reconnects, and a [`Link`] that knows whether it is up and since when.
//! - [`cluster`]: [`NatsCluster`], the [`switchboard_backend::Cluster`] over
//!   NATS: heartbeats and membership, commands routed to the node that holds
//!   a connection, control commands from the origin, and the one `node_down`
//!   report per lost node.
//! - [`channels`]: [`NatsChannels`], the [`switchboard_backend::ChannelBus`]
//!   over NATS: channel logs in JetStream streams, interest-based delivery
//!   to the nodes with subscribers, cluster-wide presence.
//! - [`origin`]: [`NatsOrigin`], the [`switchboard_backend::OriginTransport`]
//!   over NATS: `connect` as a request, other events published (optionally
//!   through a JetStream stream, with acks).
//! - [`sessions`]: [`NatsSessions`], the [`switchboard_backend::SessionStore`]
//!   over JetStream: sessions' records in a key-value bucket, their direct
//!   messages in a stream, so a session outlives its node.
//!
//! Subjects and payloads are in [`switchboard_proto::cluster`] and
//! `docs/cluster.md`. Nothing here runs on a single node's hot path: the
//! gateway only calls in for connections of other nodes.

pub mod channels;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod origin;
pub mod sessions;

pub use channels::NatsChannels;
pub use cluster::{BeatConnection, NatsCluster};
pub use config::NatsConfig;
pub use connect::{connect, Link, NatsError};
pub use origin::NatsOrigin;
pub use sessions::NatsSessions;

/// Parses the `Switchboard-Status` header of a reply (200 when absent).
pub(crate) fn reply_status(headers: Option<&async_nats::HeaderMap>) -> Result<u16, String> {
    match headers.and_then(|h| h.get(switchboard_proto::control::STATUS_HEADER)) {
        None => Ok(200),
        Some(v) => v.as_str().trim().parse().map_err(|_| {
            format!(
                "bad {} header {:?}",
                switchboard_proto::control::STATUS_HEADER,
                v.as_str()
            )
        }),
    }
}
