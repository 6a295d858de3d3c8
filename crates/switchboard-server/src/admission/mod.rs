//! Who gets in, and how fast: client tokens (JWT), per-IP handshake rates
//! and per-user connection caps, per-connection message and byte rates, and
//! the open-file budget that caps client sockets. They use the leaves
//! (configuration, the `Origin` patterns) and nothing above.

pub mod fds;
pub(crate) mod ratelimit;
mod rates;
pub(crate) mod tokens;

pub(crate) use rates::{HandshakeRate, UserCounts, UserSlot};
