//! Switchboard's wire types, with no I/O.
//!
//! This crate holds everything that crosses a wire, as plain data and pure
//! functions: no sockets, no clocks, no tokio. That keeps it fuzzable and lets
//! the SDKs share its test vectors.
//!
//! # Layout
//!
//! - [`ws`]: the RFC 6455 codec in the server role — frame headers, the message
//!   decoder with its limits, frame encoding, close codes, the opening handshake
//!   and permessage-deflate.
//! - [`cluster`]: NATS subject names and the node heartbeat of a cluster.
//! - [`conn_id`]: connection ids, which carry the node that holds the connection.
//! - [`origin`]: the events the gateway sends to the origin and the origin's answers.
//! - [`control`]: request and response bodies of the control API.
//! - [`native`]: the native client protocol `switchboard.v1` (commands,
//!   replies, pushes, error codes) and channel names.

pub mod cluster;
pub mod conn_id;
pub mod control;
pub mod graphql;
pub mod native;
pub mod origin;
pub mod ws;

pub use conn_id::{ConnectionId, NodeId};
