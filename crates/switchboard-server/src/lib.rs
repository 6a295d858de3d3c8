//! The Switchboard gateway as a library: everything a node does, with no
//! `main`, CLI or process concerns (those live in the `switchboard` binary).
//!
//! # Layout
//!
//! Leaves first; a module uses its own layer and those below (see
//! ARCHITECTURE.md; `tools/module-deps.py --check` enforces it in CI).
//!
//! - Leaves: [`config`] (typed configuration and its validation), `metrics`
//!   (Prometheus), `allowed_origins` (the `Origin` patterns against
//!   cross-site WebSocket hijacking), `clock`, `frames` (the native
//!   protocol's reply and push frames).
//! - `admission/`: client tokens (JWT), per-IP handshake rates and per-user
//!   caps, per-connection rate limits, the open-file budget ([`fds`]).
//! - `conn/`: a connection's shared half (`Conn`, its outbound queue and
//!   stream) and the sharded registry of live connections.
//! - [`origin`]: the HTTP webhook, the dispatcher that queues, batches and
//!   retries events, and `ask`, the one place that asks the origin for a
//!   decision and makes event ids; `Origin` is its handle.
//! - `channels/`: channels on this node — namespaces, subscribers, history
//!   with offsets and epochs, presence, fan-out; in a cluster, replicas of
//!   channels whose log is the bus's.
//! - `commands/`: control commands (executed here or forwarded) and the
//!   native protocol `switchboard.v1`, through the `Commands` handle.
//! - `edge/`: accept loops, TLS with certificate reload, read buffers
//!   borrowed while readable, the opening handshake and `connect`
//!   decision, the task of each connection, the control HTTP listener and
//!   its routes.
//! - [`node`]: binding, keepalives, the graceful drain, and [`LocalNode`],
//!   the node as a backend sees it.
//! - The seams with other nodes and the origin (`Cluster`, `ChannelBus`,
//!   `OriginTransport`, [`lease`]) live in `switchboard-backend` and are
//!   re-exported here.
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
mod allowed_origins;
mod channels;
mod clock;
mod commands;
pub mod config;
mod conn;
mod edge;
mod frames;
mod graphql;
mod metrics;
pub mod node;
pub mod origin;
mod sessions;

pub use admission::fds;
pub use admission::tokens::AuthSetupError;
pub use config::{Config, ConfigError, Namespace, TlsVersion};
pub use edge::api::{OPENAPI_JSON, ROUTES};
pub use edge::tls::TlsSetupError;
pub use node::{BindOptions, DrainReport, Gateway, GatewayError, LocalNode};
pub use switchboard_backend::{
    bus, lease, BusError, BusEvent, ChannelBus, Cluster, ClusterError, CommandReply, LogEntry,
    LogRead, Node, Published, Watch,
};
pub use switchboard_backend::{BeatThread, Lease, LeaseState};
