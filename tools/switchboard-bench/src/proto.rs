//! The line protocol between the coordinating process and its children.
//!
//! The coordinator writes one command word per line to a child's stdin
//! ([`GO`], [`RUN`], [`REPORT`], [`CLOSE`]); the child answers with one JSON
//! [`Report`] per line on its stdout. A child whose stdin reaches end-of-file
//! exits at once, so children never outlive their coordinator.
//!
//! The `cross-node` scenario also stamps the messages it pushes through the
//! control API ([`stamp_text`], [`parse_stamp`]) so that receive-only clients
//! can tell the phase, the command and its start time. The `fanout` scenario
//! stamps its publications too ([`fanout_text`]), with a marker that its
//! subscribers find by scanning the frame's bytes ([`find_fanout_stamp`]),
//! whatever envelope the server wraps the data in.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Start connecting.
pub(crate) const GO: &str = "go";
/// `echo`: start the warmup, then the measured window.
pub(crate) const RUN: &str = "run";
/// `idle`, `cross-node`: close every connection and report.
pub(crate) const CLOSE: &str = "close";
/// `cross-node`: report what was received since the last report, and reset.
pub(crate) const REPORT: &str = "report";

/// Phase tag of a stamped message: warmup (counted, not measured). Also
/// `fanout`'s sustained warmup.
pub(crate) const PHASE_WARMUP: u8 = b'w';
/// Phase tag of a stamped message: single sends (`POST /v1/connections/{id}/messages`).
pub(crate) const PHASE_SINGLE: u8 = b's';
/// Phase tag of a stamped message: batch sends (`POST /v1/messages`).
pub(crate) const PHASE_BATCH: u8 = b'b';

/// `fanout` phase tag: the messages published one at a time.
pub(crate) const FANOUT_SINGLE: u8 = b's';
/// `fanout` phase tag: the messages of the sustained phase's measured window.
pub(crate) const FANOUT_SUSTAINED: u8 = b'm';

/// First byte of a `fanout` stamp. Neither Switchboard's native envelope
/// (`{"push":"message","channel":"bench:fanout","offset":N,"epoch":"<hex>",
/// "text":"..."}`) nor a plain frame has it before the data.
pub(crate) const FANOUT_MARK: u8 = b'~';

/// A `fanout` publication of `size` bytes (at least its stamp, about 25
/// bytes): `~`, the phase, 19 digits of the publish time in Unix
/// nanoseconds, `:`, the decimal sequence number, `~`, then `x` padding.
/// Plain ASCII: valid in a JSON string and in a text frame as it is.
pub(crate) fn fanout_text(phase: u8, seq: u64, ts_ns: u64, size: usize) -> String {
    let mut s = format!("~{}{ts_ns:019}:{seq}~", phase as char);
    let pad = size.saturating_sub(s.len());
    s.extend(std::iter::repeat_n('x', pad));
    s
}

/// Finds a [`fanout_text`] stamp anywhere in a frame's payload: `(phase,
/// seq, ts_ns)`. One scan for the marker and a few digits; no JSON parsing.
pub(crate) fn find_fanout_stamp(frame: &[u8]) -> Option<(u8, u64, u64)> {
    let at = frame.iter().position(|&b| b == FANOUT_MARK)?;
    let rest = frame.get(at + 1..)?;
    let (&phase, rest) = rest.split_first()?;
    let digits = rest.get(..19)?;
    let mut ts: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        ts = ts.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    let rest = rest.get(19..)?.strip_prefix(b":")?;
    let mut seq: u64 = 0;
    for (i, &d) in rest.iter().enumerate() {
        match d {
            b'0'..=b'9' if i < 20 => seq = seq.checked_mul(10)?.checked_add(u64::from(d - b'0'))?,
            FANOUT_MARK if i > 0 => return Some((phase, seq, ts)),
            _ => return None,
        }
    }
    None
}

/// Length of a stamp: phase, 16 hex digits of sequence, `.`, 19 digits of
/// Unix nanoseconds, `.`.
pub(crate) const STAMP_LEN: usize = 38;

/// A stamped message text of `size` bytes (at least [`STAMP_LEN`]): phase,
/// command sequence number and the command's start time (Unix nanoseconds,
/// `CLOCK_REALTIME`, the same clock in every process of the machine), padded
/// with `x`.
pub(crate) fn stamp_text(phase: u8, seq: u64, ts_ns: u64, size: usize) -> String {
    let mut s = format!("{}{seq:016x}.{ts_ns:019}.", phase as char);
    let pad = size.saturating_sub(s.len());
    s.extend(std::iter::repeat_n('x', pad));
    s
}

/// Reads a stamp: `(phase, seq, ts_ns)`, or `None` if `b` is not stamped.
pub(crate) fn parse_stamp(b: &[u8]) -> Option<(u8, u64, u64)> {
    let head = b.get(..STAMP_LEN)?;
    if head[17] != b'.' || head[37] != b'.' {
        return None;
    }
    let seq = u64::from_str_radix(std::str::from_utf8(&head[1..17]).ok()?, 16).ok()?;
    let ts = std::str::from_utf8(&head[18..37]).ok()?.parse().ok()?;
    Some((head[0], seq, ts))
}

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
    /// Worker (`recv`): the connection ids its clients learned from the
    /// origin's welcome message (sent right after `Connected`).
    Ids {
        /// One per open connection.
        ids: Vec<String>,
    },
    /// Worker (`recv`): what its clients received since the last report.
    Received {
        /// Single-send messages received (phase [`PHASE_SINGLE`]).
        single: u64,
        /// Their latency from the control call's start to receipt, microseconds.
        single_latency_us: Buckets,
        /// Batch messages, per command: `(seq, receipts, latest receipt's
        /// latency in microseconds)`.
        batch: Vec<(u64, u64, u64)>,
        /// Latency of every batch receipt from its command's start, microseconds.
        batch_latency_us: Buckets,
        /// Warmup messages received.
        warmup: u64,
        /// Data messages without a stamp.
        unparsed: u64,
        /// Connections that ended unexpectedly so far (cumulative).
        dropped: u64,
        /// The first unexpected end, if any.
        first_drop: Option<String>,
    },
    /// Worker (`fanout`): every live subscriber of the worker has received
    /// the single-phase message `seq` (sent unasked, as soon as it happens).
    FanoutComplete {
        /// The message.
        seq: u64,
        /// Receipts (the live subscribers).
        count: u64,
        /// Latency of the last receipt, microseconds.
        last_us: u64,
    },
    /// Worker (`fanout`): what its subscribers received since the last report.
    FanoutReceived {
        /// Per stamped message (single and sustained phases, warmup included).
        messages: Vec<Receipts>,
        /// Latency of every single-phase receipt, microseconds.
        single_latency_us: Buckets,
        /// Latency of every receipt of a measured sustained message, microseconds.
        sustained_latency_us: Buckets,
        /// Receipts of any stamped message by receipt time: `(Unix time in
        /// tenths of a second, receipts)`.
        ticks: Vec<(u64, u64)>,
        /// Data frames without a stamp.
        unparsed: u64,
        /// Subscribers still connected.
        live: u64,
        /// Subscribers that ended unexpectedly so far (cumulative).
        dropped: u64,
        /// The first unexpected end, if any.
        first_drop: Option<String>,
        /// The worker's resident memory, bytes.
        rss_bytes: u64,
    },
}

/// One message as a `fanout` worker's subscribers got it: `(seq, receipts,
/// latest receipt's latency in microseconds)`.
pub(crate) type Receipts = (u64, u64, u64);

impl Report {
    /// One line of JSON (no newline).
    pub(crate) fn to_line(&self) -> String {
        serde_json::to_string(self).expect("reports serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let t = stamp_text(PHASE_BATCH, 0x1f, 1_700_000_000_123_456_789, 64);
        assert_eq!(t.len(), 64);
        assert!(t.starts_with("b000000000000001f.1700000000123456789.xx"));
        assert_eq!(
            parse_stamp(t.as_bytes()),
            Some((PHASE_BATCH, 0x1f, 1_700_000_000_123_456_789))
        );
        let short = stamp_text(PHASE_SINGLE, 1, 5, 0);
        assert_eq!(short.len(), STAMP_LEN);
        assert_eq!(parse_stamp(short.as_bytes()), Some((PHASE_SINGLE, 1, 5)));
        assert_eq!(parse_stamp(b"a.b0123456789abcdefghij"), None);
        assert_eq!(parse_stamp(&short.as_bytes()[..STAMP_LEN - 1]), None);
    }

    #[test]
    fn fanout_stamps_are_found_in_any_envelope() {
        let t = fanout_text(FANOUT_SINGLE, 42, 1_700_000_000_123_456_789, 64);
        assert_eq!(t.len(), 64);
        assert!(t.starts_with("~s1700000000123456789:42~xx"));
        let stamp = Some((FANOUT_SINGLE, 42, 1_700_000_000_123_456_789));
        assert_eq!(find_fanout_stamp(t.as_bytes()), stamp);
        let native = format!(
            r#"{{"push":"message","channel":"bench:fanout","offset":7,"epoch":"9f86d081884c","text":"{t}"}}"#
        );
        assert_eq!(find_fanout_stamp(native.as_bytes()), stamp);
        let short = fanout_text(FANOUT_SUSTAINED, 0, 5, 0);
        assert_eq!(short, "~m0000000000000000005:0~");
        assert_eq!(
            find_fanout_stamp(short.as_bytes()),
            Some((FANOUT_SUSTAINED, 0, 5))
        );
        for bad in [
            &b"no stamp"[..],
            b"~s123:4~",
            b"~s1700000000123456789:~",
            b"~s1700000000123456789:42",
            b"~s17000000001234567x9:42~",
        ] {
            assert_eq!(find_fanout_stamp(bad), None, "{bad:?}");
        }
    }
}
