//! The line protocol between the coordinating process and its children.
//!
//! The coordinator writes one command word per line to a child's stdin
//! ([`GO`], [`RUN`], [`CLOSE`]); the child answers with one JSON [`Report`] per
//! line on its stdout. A child whose stdin reaches end-of-file exits at once,
//! so children never outlive their coordinator.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Start connecting.
pub(crate) const GO: &str = "go";
/// `echo`: start the warmup, then the measured window.
pub(crate) const RUN: &str = "run";
/// `idle`: close every connection and report.
pub(crate) const CLOSE: &str = "close";

/// A histogram as `(value, count)` pairs of its recorded buckets.
pub(crate) type Buckets = Vec<(u64, u64)>;

/// What a child reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Report {
    /// Started and waiting for [`GO`].
    Ready,
    /// Acceptor: listening on this address.
    Listening {
        /// The bound address.
        addr: SocketAddr,
    },
    /// Acceptor: accepted its expected number of sockets.
    Accepted {
        /// Sockets accepted.
        count: u64,
        /// Seconds from the first accept to the last.
        span_s: f64,
    },
    /// Worker: the connect phase ended (all connected, or the phase timed out).
    Connected {
        /// Connections established (TCP connected, or WebSocket open).
        ok: u64,
        /// Attempts that failed.
        failed: u64,
        /// Seconds from [`GO`] to the last attempt's end, by the worker's clock.
        elapsed_s: f64,
        /// The first failure, if any.
        first_error: Option<String>,
        /// Connect (+ handshake) latency in microseconds.
        latency_us: Buckets,
        /// The worker's own resident memory, in bytes.
        rss_bytes: u64,
    },
    /// Worker (`idle`): every connection is closed.
    Closed {
        /// Connections closed on request.
        closed: u64,
        /// Connections that ended before [`CLOSE`] (closed by the peer, or errors).
        dropped: u64,
        /// Pings received from the gateway over the whole hold.
        pings: u64,
        /// The first unexpected end, if any.
        first_drop: Option<String>,
    },
    /// Worker (`echo`): the measured window is over and the clients closed.
    EchoDone {
        /// Round trips that started and completed inside the measured window.
        round_trips: u64,
        /// Round trips over the whole run, warmup included.
        round_trips_total: u64,
        /// Clients that stopped on an error (send, receive, closed by the peer).
        errors: u64,
        /// Echoes that did not arrive in time.
        timeouts: u64,
        /// Echoes whose payload differed from what was sent.
        mismatches: u64,
        /// The first error, if any.
        first_error: Option<String>,
        /// Round-trip latency in microseconds (measured window only).
        latency_us: Buckets,
        /// Length of the measured window, by the worker's clock.
        measured_s: f64,
    },
}

impl Report {
    /// One line of JSON (no newline).
    pub(crate) fn to_line(&self) -> String {
        serde_json::to_string(self).expect("reports serialize")
    }
}
