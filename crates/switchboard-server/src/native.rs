//! The gateway side of the native protocol `switchboard.v1`: running a
//! client's commands and building reply and push frames. The wire types are
//! in [`switchboard_proto::native`]; the protocol is specified in
//! `docs/protocol.md`.

use crate::channels::{Ack, ChannelError};
use crate::gateway::Shared;
use crate::metrics::KindLabel;
use crate::registry::Conn;
use bytes::Bytes;
use serde::Serialize;
use std::sync::Arc;
use switchboard_proto::native::{decode_command, CommandBody, ErrorCode, Push};
use switchboard_proto::origin::Payload;
use switchboard_proto::ws::frame::{encode_frame, OpCode};

/// JSON bytes of a value that always serializes.
pub(crate) fn json(v: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("protocol values serialize"))
}

/// The text frame of a successful reply.
pub(crate) fn result_frame(id: u64, result: &impl Serialize) -> Bytes {
    #[derive(Serialize)]
    struct Ok<'a, T> {
        id: u64,
        result: &'a T,
    }
    encode_frame(OpCode::Text, &json(&Ok { id, result }))
}

/// The text frame of an error reply (`id` absent when it could not be read).
pub(crate) fn error_frame(id: Option<u64>, code: ErrorCode, message: &str) -> Bytes {
    #[derive(Serialize)]
    struct Err<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        error: Body<'a>,
    }
    #[derive(Serialize)]
    struct Body<'a> {
        code: ErrorCode,
        message: &'a str,
    }
    encode_frame(
        OpCode::Text,
        &json(&Err {
            id,
            error: Body { code, message },
        }),
    )
}

/// The text frame of a push.
pub(crate) fn push_frame(push: &Push) -> Bytes {
    encode_frame(OpCode::Text, &json(push))
}

/// The `connected` push every native connection gets first.
pub(crate) fn connected_frame(s: &Shared, conn: &Conn) -> Bytes {
    push_frame(&Push::Connected {
        client: conn.id.to_string(),
        node: s.node.to_string(),
        version: 1,
        ping_interval_ms: s.config.ping_interval.as_millis() as u64,
    })
}

/// What the connection task still has to do after a command.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Answered.
    Done,
    /// A `send`: deliver `data` to the origin as a `message` event, then
    /// answer `id`.
    ToOrigin {
        /// The command to answer.
        id: u64,
        /// The message.
        data: Payload,
    },
}

/// An empty result, `{}`.
#[derive(Serialize)]
struct Empty {}

/// Runs one command frame of a native connection and queues its reply.
pub(crate) fn handle(s: &Shared, conn: &Arc<Conn>, text: &[u8]) -> Outcome {
    let m = &s.metrics;
    let cmd = match decode_command(text) {
        Ok(cmd) => cmd,
        Err(e) => {
            m.native_errors.inc();
            conn.push(error_frame(e.id(), e.code(), &e.to_string()), m);
            return Outcome::Done;
        }
    };
    m.native_commands
        .get_or_create(&KindLabel {
            kind: cmd.body.name(),
        })
        .inc();
    let id = cmd.id;
    let ch = &s.channels;
    let answer: Result<Option<Bytes>, ChannelError> = match cmd.body {
        CommandBody::Subscribe { channel, since } => ch
            .namespace(&channel)
            .and_then(|ns| {
                ns.client_subscribe
                    .then_some(())
                    .ok_or(ChannelError::PermissionDenied(
                        "this namespace takes subscriptions from the origin only",
                    ))
            })
            // The reply is queued with the channel's messages, in order.
            .and_then(|()| ch.subscribe(conn, &channel, since.as_ref(), Ack::Reply(id), m))
            .map(|_| None),
        CommandBody::Unsubscribe { channel } => ch
            .unsubscribe(conn, &channel, false, m)
            .map(|_| Some(result_frame(id, &Empty {}))),
        CommandBody::Publish { channel, data } => ch
            .namespace(&channel)
            .and_then(|ns| {
                ns.client_publish
                    .then_some(())
                    .ok_or(ChannelError::PermissionDenied(
                        "this namespace does not let clients publish",
                    ))
            })
            .and_then(|()| ch.publish(&channel, data, None, m))
            .map(|(r, _)| Some(result_frame(id, &r))),
        CommandBody::Presence { channel } => {
            ch.presence(&channel).map(|r| Some(result_frame(id, &r)))
        }
        CommandBody::History {
            channel,
            since,
            limit,
        } => ch
            .history(&channel, since.as_ref(), limit, m)
            .map(|r| Some(result_frame(id, &r))),
        CommandBody::Ping {} => Ok(Some(result_frame(id, &Empty {}))),
        CommandBody::Send { data } => return Outcome::ToOrigin { id, data },
    };
    match answer {
        Ok(Some(frame)) => {
            conn.push(frame, m);
        }
        Ok(None) => {}
        Err(e) => {
            m.native_errors.inc();
            conn.push(error_frame(Some(id), e.code(), &e.to_string()), m);
        }
    }
    Outcome::Done
}

/// The reply to a `send` once its event is queued for the origin.
pub(crate) fn sent_frame(id: u64) -> Bytes {
    result_frame(id, &Empty {})
}
