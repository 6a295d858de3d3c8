//! Close codes: the standard ones (RFC 6455 §7.4) and Switchboard's own (4000–4099).
//!
//! Every code the gateway can send is listed here and in `docs/protocol.md`.

/// A WebSocket close code.
pub type CloseCode = u16;

/// Normal closure.
pub const NORMAL: CloseCode = 1000;
/// The endpoint is going away.
pub const GOING_AWAY: CloseCode = 1001;
/// The peer broke the protocol (bad framing, unmasked client frame, bad opcode…).
pub const PROTOCOL_ERROR: CloseCode = 1002;
/// No close code was present in the close frame (never sent on the wire).
pub const NO_STATUS: CloseCode = 1005;
/// The connection dropped without a close frame (never sent on the wire).
pub const ABNORMAL: CloseCode = 1006;
/// A text message was not valid UTF-8.
pub const INVALID_PAYLOAD: CloseCode = 1007;
/// A policy was violated.
pub const POLICY_VIOLATION: CloseCode = 1008;
/// A message was larger than `max-message-size`.
pub const MESSAGE_TOO_BIG: CloseCode = 1009;
/// The gateway hit an unexpected condition.
pub const INTERNAL_ERROR: CloseCode = 1011;
/// The gateway is restarting (drain): reconnect, possibly elsewhere.
pub const SERVICE_RESTART: CloseCode = 1012;
/// Temporary condition: try again later.
pub const TRY_AGAIN_LATER: CloseCode = 1013;

/// The client did not read its messages fast enough: its outbound queue
/// passed `max-outbound-bytes`.
pub const SLOW_CONSUMER: CloseCode = 4001;
/// Events from this client were produced faster than the origin accepted them:
/// the connection's pending-event queue (or the node's) was full.
pub const ORIGIN_BACKLOG: CloseCode = 4002;
/// Nothing was received from the client within `idle-timeout`.
pub const IDLE_TIMEOUT: CloseCode = 4003;
/// The connection's client token expired and was not refreshed.
pub const TOKEN_EXPIRED: CloseCode = 4004;
/// A native connection opened without a token did not authenticate with its
/// first command (none in time, not `authenticate`, or a refused token; the
/// reason starts with the refusal code, e.g. `token_expired`).
pub const AUTHENTICATION_FAILED: CloseCode = 4005;
/// A native connection authenticated by its first command was then refused
/// (by the origin, or a limit); the reason starts with the code an HTTP
/// refusal would carry, e.g. `rejected_by_origin`.
pub const REFUSED: CloseCode = 4006;

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4.1 and the
/// IANA registry): 1000–1003, 1007–1011, and the application range 3000–4999.
pub fn is_valid_received(code: CloseCode) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Whether the origin may ask the gateway to close with `code`.
pub fn is_valid_sent(code: CloseCode) -> bool {
    matches!(code, 1000 | 1001 | 1008 | 1011 | 1012 | 1013 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_codes() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert!(is_valid_received(ok), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_received(bad), "{bad}");
        }
    }
}
