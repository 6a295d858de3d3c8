//! The Redis backend of Switchboard: a cluster of nodes joined by one Redis,
//! for teams that run Redis and not NATS.
//!
//! - [`config`]: [`RedisConfig`], the backend's own settings.
//! - [`connect`]: the node's Redis connections (commands, subscriptions),
//!   endless reconnects, and a [`Link`] that knows whether Redis answers.
//! - [`keys`]: every key and pub/sub channel name, with their hash tags.
//! - [`cluster`]: [`RedisCluster`], the [`switchboard_backend::Cluster`]
//!   over Redis: membership by expiring keys, commands routed to the node
//!   that holds a connection, the one `node_down` report per lost node, and
//!   the lease.
//! - [`channels`]: [`RedisChannels`], the [`switchboard_backend::ChannelBus`]
//!   over Redis: channel logs in streams, appended and broadcast by one
//!   script, interest-based delivery, cluster-wide presence.
//! - [`origin`]: [`RedisOrigin`], the [`switchboard_backend::OriginTransport`]
//!   over Redis Streams: events appended to streams an origin reads with a
//!   consumer group, decisions answered on a pub/sub channel.
//! - [`control`]: [`RedisControl`], control commands from the origin over a
//!   stream read by the nodes in one consumer group.
//! - [`sessions`]: [`RedisSessions`], the
//!   [`switchboard_backend::SessionStore`] over Redis: records in a hash,
//!   direct messages in a stream per session.
//!
//! Keys and message shapes are documented in `docs/cluster.md`. Nothing
//! here runs on a single node's hot path.

pub mod channels;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod control;
pub mod keys;
pub mod origin;
pub mod sessions;

pub use channels::RedisChannels;
pub use cluster::RedisCluster;
pub use config::RedisConfig;
pub use connect::{connect, Link, Redis, RedisError};
pub use control::RedisControl;
pub use origin::RedisOrigin;
pub use sessions::RedisSessions;
