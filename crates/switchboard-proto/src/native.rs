//! The native client protocol, `switchboard.v1`: JSON commands from the client
//! (each with an `id`, answered by exactly one reply carrying the same `id`)
//! and pushes from the gateway (channel messages, joins, leaves, server-side
//! subscriptions, direct messages). One JSON object per WebSocket text frame.
//! `docs/protocol.md` is the specification; these are its types, shared by
//! the gateway and the Rust client SDK.

use crate::origin::Payload;
use serde::{Deserialize, Serialize};

/// The subprotocol name a client offers to speak the native protocol.
pub const SUBPROTOCOL: &str = "switchboard.v1";

/// Prefix of every native protocol version's subprotocol name. A client that
/// offers only versions this gateway does not speak is refused at the
/// handshake (400 `unsupported_protocol`) rather than served in raw mode.
pub const SUBPROTOCOL_PREFIX: &str = "switchboard.";

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// A position in a channel's stream: the offset of the last message seen, in
/// the channel's epoch. Offsets start at 1; offset 0 means "nothing yet".
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamPosition {
    /// Offset of the last message seen.
    pub offset: u64,
    /// The epoch those offsets belong to; a new epoch restarts the stream.
    pub epoch: String,
}

/// A command from the client: `{"id": 1, "cmd": "subscribe", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Chosen by the client and echoed in the reply; unique among the
    /// client's commands in flight.
    pub id: u64,
    /// What to do.
    #[serde(flatten)]
    pub body: CommandBody,
}

/// The commands of `switchboard.v1`, tagged by `cmd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum CommandBody {
    /// Subscribe to a channel, optionally recovering what was missed since a
    /// position. Missed messages are pushed before the reply; live ones after.
    Subscribe {
        /// The channel, `namespace:name`.
        channel: String,
        /// Recover from here: every message after this position is pushed
        /// before the reply, or the reply says `recovered: false`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<StreamPosition>,
    },
    /// Leave a channel (succeeds if not subscribed).
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// Publish to a channel (if its namespace lets clients publish).
    Publish {
        /// The channel.
        channel: String,
        /// The message.
        #[serde(flatten)]
        data: Payload,
    },
    /// Who is in a channel (if its namespace keeps presence).
    Presence {
        /// The channel.
        channel: String,
    },
    /// A channel's kept messages (if its namespace keeps history).
    History {
        /// The channel.
        channel: String,
        /// Only messages after this position.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<StreamPosition>,
        /// At most this many: with `since` the oldest ones after it (pages
        /// follow on), without it the newest ones; all kept ones when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// A round trip; the reply is empty.
    Ping {},
    /// A message for the origin, delivered as a `message` event.
    Send {
        /// The message.
        #[serde(flatten)]
        data: Payload,
    },
    /// A fresh token for the same user, before the current one expires;
    /// the reply carries its `expires_at_ms`.
    Refresh {
        /// The new JWT.
        token: String,
    },
    /// The token of a connection opened without one (a browser cannot set
    /// an `Authorization` header): only as its very first frame; the reply
    /// follows the `connected` push and carries `expires_at_ms`.
    Authenticate {
        /// The JWT.
        token: String,
    },
    /// Acknowledges every direct message up to `seq` (see `docs/sessions.md`):
    /// the gateway stops keeping them for a resume. Never answered, except
    /// with an error when malformed.
    Ack {
        /// The highest direct message sequence received.
        seq: u64,
    },
}

impl CommandBody {
    /// The `cmd` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Subscribe { .. } => "subscribe",
            Self::Unsubscribe { .. } => "unsubscribe",
            Self::Publish { .. } => "publish",
            Self::Presence { .. } => "presence",
            Self::History { .. } => "history",
            Self::Ping {} => "ping",
            Self::Send { .. } => "send",
            Self::Refresh { .. } => "refresh",
            Self::Authenticate { .. } => "authenticate",
            Self::Ack { .. } => "ack",
        }
    }
}

/// Every `cmd` this version knows.
pub const COMMANDS: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "history",
    "ping",
    "send",
    "refresh",
    "authenticate",
    "ack",
];

/// Why a frame from the client is not a command this version can run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a JSON object with a numeric `id` and a string `cmd`.
    #[error("not a command: {0}")]
    Malformed(String),
    /// A `cmd` this version does not know; `id` is known, so it is answered.
    #[error("unknown command `{cmd}`")]
    Unknown {
        /// The command's id.
        id: u64,
        /// The unknown name.
        cmd: String,
    },
    /// A known `cmd` with missing or wrong fields; answered under `id`.
    #[error("bad `{cmd}` command: {message}")]
    BadFields {
        /// The command's id.
        id: u64,
        /// The command's name.
        cmd: String,
        /// What is wrong.
        message: String,
    },
}

impl DecodeError {
    /// The command id to answer under, when it could be read.
    pub fn id(&self) -> Option<u64> {
        match self {
            Self::Malformed(_) => None,
            Self::Unknown { id, .. } | Self::BadFields { id, .. } => Some(*id),
        }
    }

    /// The stable error code sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Malformed(_) | Self::BadFields { .. } => ErrorCode::BadCommand,
            Self::Unknown { .. } => ErrorCode::UnknownCommand,
        }
    }
}

/// Decodes one text frame into a command, telling an unknown `cmd` apart from
/// a malformed frame so each gets its own error.
pub fn decode_command(text: &[u8]) -> Result<Command, DecodeError> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        id: u64,
        #[serde(borrow)]
        cmd: std::borrow::Cow<'a, str>,
    }
    let env: Envelope<'_> =
        serde_json::from_slice(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !COMMANDS.contains(&&*env.cmd) {
        return Err(DecodeError::Unknown {
            id: env.id,
            cmd: env.cmd.chars().take(64).collect(),
        });
    }
    serde_json::from_slice(text).map_err(|e| DecodeError::BadFields {
        id: env.id,
        cmd: env.cmd.into_owned(),
        message: e.to_string(),
    })
}

/// Stable error codes of the native protocol, as sent in `error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a valid command (bad JSON, missing or wrong fields).
    BadCommand,
    /// The `cmd` is not one this protocol version knows.
    UnknownCommand,
    /// The channel name is not `namespace:name` within the length limit.
    BadChannel,
    /// The channel's namespace is not configured on the gateway.
    UnknownNamespace,
    /// The namespace does not let clients do this.
    PermissionDenied,
    /// Already subscribed to that channel.
    AlreadySubscribed,
    /// The connection holds as many subscriptions as it may.
    TooManySubscriptions,
    /// The namespace keeps no history.
    HistoryDisabled,
    /// The namespace keeps no presence.
    PresenceDisabled,
    /// The origin refused the published message.
    Rejected,
    /// The origin or the cluster bus could not be reached; the command may
    /// be retried.
    Unavailable,
    /// The message is larger than the cluster bus carries.
    TooLarge,
    /// The client sends faster than `client-message-rate` or
    /// `client-byte-rate`: the command was not run.
    RateLimited,
    /// A `refresh` token was refused (the message says why), or the gateway
    /// checks no tokens.
    TokenInvalid,
    /// A binary frame: commands are JSON text frames.
    UnsupportedFrame,
    /// Something failed inside the gateway.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadCommand => "bad_command",
            Self::UnknownCommand => "unknown_command",
            Self::BadChannel => "bad_channel",
            Self::UnknownNamespace => "unknown_namespace",
            Self::PermissionDenied => "permission_denied",
            Self::AlreadySubscribed => "already_subscribed",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::HistoryDisabled => "history_disabled",
            Self::PresenceDisabled => "presence_disabled",
            Self::Rejected => "rejected",
            Self::Unavailable => "unavailable",
            Self::TooLarge => "too_large",
            Self::TokenInvalid => "token_invalid",
            Self::RateLimited => "rate_limited",
            Self::UnsupportedFrame => "unsupported_frame",
            Self::Internal => "internal",
        }
    }
}

/// An error in a reply: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// A reply to a command: `{"id": 1, "result": {...}}` or
/// `{"id": 1, "error": {...}}`. An undecodable frame is answered with
/// `{"error": {...}}` and no `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The command's id; absent when the command's id could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The result when the command succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// Result of `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeResult {
    /// The channel's current epoch.
    pub epoch: String,
    /// The channel's newest offset when the subscription started: every
    /// message pushed after this reply has a larger one.
    pub offset: u64,
    /// With `since`: whether every missed message was pushed before this
    /// reply (`false`: too old or another epoch; the client must resync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// With `since` and `recovered`: how many missed messages were pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
}

/// Result of `publish` (also the control API's publish answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResult {
    /// The message's offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
}

/// One kept channel message, as in `history` results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// Its offset in the epoch.
    pub offset: u64,
    /// When it was published (Unix milliseconds).
    pub time_ms: u64,
    /// The message.
    #[serde(flatten)]
    pub data: Payload,
}

/// Result of `history` (also the control API's history answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryResult {
    /// The channel's current epoch.
    pub epoch: String,
    /// The channel's newest offset.
    pub offset: u64,
    /// With `since`: whether the publications start right after it (no
    /// message between was lost and the epoch is the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// The kept messages, oldest first.
    pub publications: Vec<Publication>,
}

/// A member of a channel's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's connection id.
    pub client: String,
    /// The user id the origin attached, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The metadata the origin attached, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// Result of `presence` (also the control API's presence answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceResult {
    /// Every subscribed connection.
    pub members: Vec<Member>,
    /// Number of members (connections).
    pub clients: usize,
    /// Number of distinct user ids among them.
    pub users: usize,
}

/// A push from the gateway (a frame without `id`), tagged by `push`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "push", rename_all = "snake_case")]
pub enum Push {
    /// The first frame of every native connection.
    Connected {
        /// This connection's id.
        client: String,
        /// The node holding it.
        node: String,
        /// The protocol version (1).
        version: u32,
        /// How often the gateway pings (milliseconds): a client that hears
        /// nothing for longer than twice this may consider the link dead.
        ping_interval_ms: u64,
        /// The session's resume token (absent when sessions are off): open
        /// a new connection with `?resume=` this token within
        /// `session_ttl_ms` of losing this one to resume the session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// How long the session outlives a lost connection (milliseconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_ttl_ms: Option<u64>,
        /// This connection resumed the session named by `?resume=`: same
        /// `client`, direct messages after `?received=` follow.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumed: bool,
        /// The client asked to resume and could not: this is a new session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_error: Option<ResumeError>,
        /// On a resumed connection, the session's channels: each sends
        /// nothing until the client subscribes to it again (with `since`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        channels: Vec<SessionChannel>,
    },
    /// A channel message.
    Message {
        /// The channel.
        channel: String,
        /// The message's offset.
        offset: u64,
        /// The channel's epoch.
        epoch: String,
        /// The message.
        #[serde(flatten)]
        data: Payload,
    },
    /// Someone subscribed to a channel (namespaces with `join-leave`).
    Join {
        /// The channel.
        channel: String,
        /// Who.
        member: Member,
    },
    /// Someone left a channel (namespaces with `join-leave`).
    Leave {
        /// The channel.
        channel: String,
        /// Who.
        member: Member,
    },
    /// The server subscribed this connection (origin's `connect` answer or
    /// the control API).
    Subscribed {
        /// The channel.
        channel: String,
        /// The channel's epoch.
        epoch: String,
        /// Its newest offset: later messages have larger ones.
        offset: u64,
    },
    /// The server unsubscribed this connection.
    Unsubscribed {
        /// The channel.
        channel: String,
    },
    /// A direct message from the origin (control API send or reply).
    Direct {
        /// Its sequence in the session (1, 2, ...; absent when sessions
        /// are off): acknowledge with `ack`, resume with `?received=`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// The message.
        #[serde(flatten)]
        data: Payload,
    },
    /// The connection's token expires soon: send a `refresh` command with a
    /// fresh one before `expires_at_ms`, or the connection is closed (4004).
    Refresh {
        /// When the current token expires, Unix time in milliseconds.
        expires_at_ms: u64,
    },
}

/// Why a resume was refused (`connected.resume_error.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeCode {
    /// The gateway keeps no sessions (`session-ttl = 0`).
    SessionsDisabled,
    /// The resume token or `received` is malformed, or the token is not
    /// one this gateway issued.
    SessionInvalid,
    /// No such session: it ended long ago, or on a node that is gone.
    SessionUnknown,
    /// The session outlived its connection by more than `session-ttl`.
    SessionExpired,
    /// The session ended: its client closed it, or the origin or the
    /// gateway did.
    SessionClosed,
    /// The session's outbox overflowed (`session-outbox-messages` or
    /// `session-outbox-bytes`): direct messages after `received` are gone.
    OutboxOverflow,
    /// The connection's token names another user than the session's.
    SessionForbidden,
}

impl ResumeCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionsDisabled => "sessions_disabled",
            Self::SessionInvalid => "session_invalid",
            Self::SessionUnknown => "session_unknown",
            Self::SessionExpired => "session_expired",
            Self::SessionClosed => "session_closed",
            Self::OutboxOverflow => "outbox_overflow",
            Self::SessionForbidden => "session_forbidden",
        }
    }
}

/// `connected.resume_error`: why this connection is a new session although
/// the client asked to resume one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeError {
    /// Stable code.
    pub code: ResumeCode,
    /// Human-readable detail.
    pub message: String,
}

/// A channel of a resumed session (`connected.channels`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionChannel {
    /// The channel.
    pub channel: String,
    /// Its epoch when the session stopped receiving it.
    pub epoch: String,
    /// Its newest offset when the session stopped receiving it (the
    /// connection was lost, or the origin subscribed the session while it
    /// was away): a client with no position of its own recovers from here.
    pub offset: u64,
}

/// Any frame the gateway sends a native client.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerFrame {
    /// An answer to a command.
    Reply(Reply),
    /// A push.
    Push(Push),
}

impl ServerFrame {
    /// Decodes a text frame from the gateway.
    pub fn decode(text: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            push: Option<serde::de::IgnoredAny>,
        }
        let probe: Probe = serde_json::from_slice(text)?;
        if probe.push.is_some() {
            serde_json::from_slice(text).map(Self::Push)
        } else {
            serde_json::from_slice(text).map(Self::Reply)
        }
    }
}

/// Checks a channel name: `namespace:name`, both parts non-empty, at most
/// [`MAX_CHANNEL_LEN`] bytes, no control characters or whitespace. Returns the
/// namespace.
pub fn channel_namespace(channel: &str) -> Option<&str> {
    if channel.is_empty() || channel.len() > MAX_CHANNEL_LEN {
        return None;
    }
    if channel.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return None;
    }
    let (ns, name) = channel.split_once(':')?;
    (!ns.is_empty() && !name.is_empty()).then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_decode_and_unknown_ones_are_told_apart() {
        let c = decode_command(
            br#"{"id":7,"cmd":"subscribe","channel":"chat:a","since":{"offset":3,"epoch":"e"}}"#,
        )
        .unwrap();
        assert_eq!(c.id, 7);
        assert_eq!(
            c.body,
            CommandBody::Subscribe {
                channel: "chat:a".into(),
                since: Some(StreamPosition {
                    offset: 3,
                    epoch: "e".into()
                })
            }
        );
        let p =
            decode_command(br#"{"id":1,"cmd":"publish","channel":"c:x","binary":"AAE="}"#).unwrap();
        assert_eq!(
            p.body,
            CommandBody::Publish {
                channel: "c:x".into(),
                data: Payload::Binary(vec![0, 1])
            }
        );
        assert_eq!(
            decode_command(br#"{"id":2,"cmd":"teleport"}"#),
            Err(DecodeError::Unknown {
                id: 2,
                cmd: "teleport".into()
            })
        );
        let bad = decode_command(br#"{"id":3,"cmd":"subscribe"}"#).unwrap_err();
        assert_eq!((bad.id(), bad.code()), (Some(3), ErrorCode::BadCommand));
        let junk = decode_command(b"hello").unwrap_err();
        assert_eq!((junk.id(), junk.code()), (None, ErrorCode::BadCommand));
        assert!(
            decode_command(br#"{"cmd":"ping"}"#).is_err(),
            "id is required"
        );
    }

    #[test]
    fn pushes_and_replies_round_trip() {
        let push = Push::Message {
            channel: "chat:a".into(),
            offset: 4,
            epoch: "ep".into(),
            data: Payload::Text("hi".into()),
        };
        let json = serde_json::to_string(&push).unwrap();
        assert_eq!(
            json,
            r#"{"push":"message","channel":"chat:a","offset":4,"epoch":"ep","text":"hi"}"#
        );
        assert_eq!(
            ServerFrame::decode(json.as_bytes()).unwrap(),
            ServerFrame::Push(push)
        );
        let reply = r#"{"id":9,"error":{"code":"permission_denied","message":"no"}}"#;
        let ServerFrame::Reply(r) = ServerFrame::decode(reply.as_bytes()).unwrap() else {
            panic!("a reply");
        };
        assert_eq!(r.id, Some(9));
        assert_eq!(r.error.unwrap().code, ErrorCode::PermissionDenied);
        for code in [ErrorCode::BadChannel, ErrorCode::TooManySubscriptions] {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
    }

    #[test]
    fn channel_names() {
        assert_eq!(channel_namespace("chat:room-1"), Some("chat"));
        assert_eq!(channel_namespace("chat:a:b"), Some("chat"));
        for bad in ["", "chat", ":x", "chat:", "chat:a b", "chat:\n"] {
            assert_eq!(channel_namespace(bad), None, "{bad:?}");
        }
        assert_eq!(channel_namespace(&format!("n:{}", "x".repeat(300))), None);
    }
}
