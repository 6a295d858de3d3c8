//! Frames of the native protocol (`switchboard.v1`) the gateway sends:
//! replies and pushes, each encoded once as a WebSocket text frame. A leaf:
//! the wire types are [`switchboard_proto::native`]'s.

use bytes::Bytes;
use serde::Serialize;
use switchboard_proto::native::{ErrorCode, Push};
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

/// The reply to a `send` once its event is queued for the origin.
pub(crate) fn sent_frame(id: u64) -> Bytes {
    result_frame(id, &Empty {})
}

/// An empty result, `{}`.
#[derive(Serialize)]
pub(crate) struct Empty {}
