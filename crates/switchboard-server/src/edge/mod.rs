//! The edge: sockets and bytes. Client streams (plain or TLS), read buffers
//! borrowed while a socket is readable, the opening handshake and its
//! `connect` decision, the task of each open connection, and the control
//! API's HTTP listener.

pub(crate) mod connection;
pub(crate) mod control_listener;
pub(crate) mod handshake;
pub(crate) mod pool;
pub(crate) mod stream;
pub(crate) mod tls;
