//! The Switchboard gateway as a library: everything a node does, with no
//! `main`, CLI or process concerns (those live in the `switchboard` binary).
//!
//! # Layout
//!
//! - `channels`: channels on this node — namespaces, subscribers, history
//!   with offsets and epochs, presence, fan-out; in a cluster, replicas of
//!   channels whose log is the bus's.
//! - [`bus`]: the seam for channels across a cluster (the [`ChannelBus`]
//!   trait a backend such as NATS implements).
//! - `native`: the native client protocol `switchboard.v1` (commands in,
//!   replies and pushes out).
//! - [`cluster`]: the seam to the other nodes of a cluster (the [`Cluster`]
//!   trait a backend such as NATS implements) and [`LocalNode`], what a
//!   backend may do with this node.
//! - [`config`]: the typed configuration and its validation.
//! - [`gateway`]: binding, the accept loop, keepalives and the graceful drain.
//! - [`lease`]: the node's right to speak for its connections in a
//!   cluster (fencing of a node reported lost).
//! - `handshake`: one socket's opening handshake and the `connect` decision.
//! - `auth`: client tokens (JWT) verified at the handshake.
//! - `origins`: the `Origin` check against cross-site WebSocket hijacking.
//! - `tls`: TLS on both listeners (rustls), with certificate reload.
//! - `stream`: a client connection's byte stream, plain TCP or behind TLS.
//! - `connection`: the task of one open connection (read, write, ping, close).
//! - `registry`: live connections and their outbound queues.
//! - `pool`: read buffers borrowed only while a socket is readable.
//! - `ratelimit`: per-connection message and byte rate limits.
//! - `admission`: the per-IP handshake rate and the per-user connection cap.
//! - [`origin`]: the origin transport trait, the HTTP webhook, and the
//!   dispatcher that queues, batches and retries events.
//! - `control`: the control API and the operations endpoints.
//! - `metrics`: Prometheus metrics.
//!
//! # Embedding
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard_server::GatewayError> {
//! let config = switchboard_server::Config {
//!     origin: Some("http://127.0.0.1:3000/events".into()),
//!     ..Default::default()
//! };
//! let gateway = switchboard_server::Gateway::bind(config).await?;
//! gateway.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```

mod admission;
mod auth;
mod channels;
pub mod cluster;
pub mod config;
mod connection;
mod control;
mod control_listener;
pub mod fds;
pub mod gateway;
mod handshake;
mod metrics;
mod native;
pub mod origin;
mod origins;
mod pool;
mod ratelimit;
mod registry;
mod stream;
mod tls;

pub use auth::AuthSetupError;
pub use cluster::LocalNode;
pub use config::{Config, ConfigError, Namespace, TlsVersion};
pub use control::{OPENAPI_JSON, ROUTES};
pub use gateway::{DrainReport, Gateway, GatewayError};
pub use switchboard_backend::{
    bus, lease, BusError, BusEvent, ChannelBus, Cluster, ClusterError, CommandReply, LogEntry,
    LogRead, Node, Published, Watch,
};
pub use switchboard_backend::{Lease, LeaseState};
pub use tls::TlsSetupError;
