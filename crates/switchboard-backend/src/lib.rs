//! The seams between a Switchboard node and what joins it to other nodes and
//! to the origin, so that a backend (NATS, Redis, or the in-memory one here)
//! depends on these traits and on the wire types only, never on the gateway.
//!
//! # Layout
//!
//! - [`cluster`]: the [`Cluster`] trait (commands to other nodes,
//!   membership, leaving) a backend implements, and the [`Node`] trait (the
//!   node a backend serves) the gateway implements.
//! - [`bus`]: the [`ChannelBus`] trait: channel logs with offsets and
//!   epochs, interest-based delivery to the nodes with subscribers, presence.
//! - [`origin`]: the [`OriginTransport`] trait that carries event batches to
//!   the application, and its answers.
//! - [`beat`]: [`BeatThread`], the thread a backend runs its membership
//!   on (heartbeats and its bus connection), away from client work.
//! - [`lease`]: the node's right to speak for its connections in a cluster
//!   (fencing of a node reported lost).
//! - [`sessions`]: the [`SessionStore`] trait: sessions' records and direct
//!   messages where every node can read them, so a session outlives its node.
//! - [`namespace`]: channel namespaces, the options backends size logs by.
//! - `conformance` (feature `conformance`): the suite every backend must
//!   pass, over the traits, with stand-in nodes.
//! - [`memory`]: an in-memory backend, several nodes of one cluster in one
//!   process: the reference the other backends are compared with, and fast
//!   deterministic tests of routing and replicas.

pub mod beat;
pub mod bus;
pub mod cluster;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod lease;
pub mod memory;
pub mod namespace;
pub mod origin;
pub mod sessions;

pub use beat::BeatThread;
pub use bus::{BusError, BusEvent, ChannelBus, LogEntry, LogRead, Published, Watch};
pub use cluster::{Cluster, ClusterError, CommandReply, Node};
pub use lease::{Confirmed, Lease, LeaseState, Renewals};
pub use namespace::Namespace;
pub use origin::{ConnectDecision, OriginError, OriginTransport};
pub use sessions::{SessionStore, StoreError, StoredRecord};

/// A boxed future, as the traits' methods return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
