//! The gateway side of the native protocol `switchboard.v1`: running a
//! client's commands and building reply and push frames. The wire types are
//! in [`switchboard_proto::native`]; the protocol is specified in
//! `docs/protocol.md`.

use crate::channels::{Ack, ChannelError};
use crate::gateway::{now_ms, Shared};
use crate::metrics::KindLabel;
use crate::origin::dispatcher::batch_body;
use crate::origin::ConnectDecision;
use crate::registry::Conn;
use bytes::Bytes;
use serde::Serialize;
use std::sync::Arc;
use switchboard_proto::native::{decode_command, CommandBody, ErrorCode, Push};
use switchboard_proto::origin::{Event, Payload, PublishEvent};
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
    /// A publish the origin must approve first (`publish-to-origin`): hand
    /// it to the connection's [`publish_worker`].
    Approve(PublishJob),
}

/// A client publish waiting for the origin's approval.
#[derive(Debug)]
pub(crate) struct PublishJob {
    pub(crate) id: u64,
    channel: String,
    data: Payload,
}

/// An empty result, `{}`.
#[derive(Serialize)]
struct Empty {}

/// A client may read a channel's history and presence only if it may
/// subscribe to it itself or is subscribed to it (by the origin).
fn may_read(
    conn: &Conn,
    channel: &str,
    ch: &crate::channels::Channels,
) -> Result<(), ChannelError> {
    if ch.namespace(channel)?.client_subscribe || conn.is_subscribed(channel) {
        Ok(())
    } else {
        Err(ChannelError::PermissionDenied(
            "only subscribers may read this channel's history and presence",
        ))
    }
}

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
        CommandBody::Publish { channel, data } => match ch.namespace(&channel) {
            Ok(ns) if !ns.client_publish => Err(ChannelError::PermissionDenied(
                "this namespace does not let clients publish",
            )),
            Ok(ns) if ns.publish_to_origin => {
                return Outcome::Approve(PublishJob { id, channel, data })
            }
            Ok(_) => ch
                .publish(&channel, data, None, m)
                .map(|(r, _)| Some(result_frame(id, &r))),
            Err(e) => Err(e),
        },
        CommandBody::Presence { channel } => may_read(conn, &channel, ch)
            .and_then(|()| ch.presence(&channel))
            .map(|r| Some(result_frame(id, &r))),
        CommandBody::History {
            channel,
            since,
            limit,
        } => may_read(conn, &channel, ch)
            .and_then(|()| ch.history(&channel, since.as_ref(), limit, m))
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

/// Runs one connection's publishes that need the origin's approval, one at a
/// time and in order (so the channel gets them in the order the client sent
/// them), without holding up the connection's own task. Ends when the
/// connection does (its sender is dropped).
pub(crate) async fn publish_worker(
    s: Arc<Shared>,
    conn: Arc<Conn>,
    mut jobs: tokio::sync::mpsc::Receiver<PublishJob>,
) {
    while let Some(job) = jobs.recv().await {
        let frame = approve_and_publish(&s, &conn, job).await;
        conn.push(frame, &s.metrics);
    }
}

async fn approve_and_publish(s: &Arc<Shared>, conn: &Conn, job: PublishJob) -> Bytes {
    let PublishJob { id, channel, data } = job;
    let event = Event::Publish(PublishEvent {
        id: format!("{}:publish:{:016x}", conn.id, rand::random::<u64>()),
        connection_id: conn.id.to_string(),
        node: s.node.to_string(),
        timestamp_ms: now_ms(),
        user_id: conn.user_id.as_deref().map(str::to_owned),
        channel: channel.clone(),
        payload: data,
    });
    let json = serde_json::to_vec(&event).expect("events serialize");
    let body = batch_body([&json[..]]);
    let Event::Publish(PublishEvent { payload: data, .. }) = event else {
        unreachable!("built above as a publish event");
    };
    let kind = KindLabel { kind: "publish" };
    let started = std::time::Instant::now();
    let decision = tokio::time::timeout(s.config.origin_timeout, s.transport.publish(body)).await;
    s.metrics
        .origin_duration
        .get_or_create(&kind)
        .observe(started.elapsed().as_secs_f64());
    let failed = |why: String| {
        s.metrics.origin_failures.get_or_create(&kind).inc();
        s.metrics.native_errors.inc();
        tracing::warn!(connection = %conn.id, error = %why, "publish event failed");
        error_frame(
            Some(id),
            ErrorCode::Unavailable,
            "the application is unavailable; retry later",
        )
    };
    match decision {
        Ok(Ok(ConnectDecision::Accept(answer))) => {
            crate::origin::dispatcher::deliver_replies(s, answer.replies);
            match s.channels.publish(&channel, data, None, &s.metrics) {
                Ok((r, _)) => result_frame(id, &r),
                Err(e) => {
                    s.metrics.native_errors.inc();
                    error_frame(Some(id), e.code(), &e.to_string())
                }
            }
        }
        Ok(Ok(ConnectDecision::Reject { reason, .. })) => {
            s.metrics.native_errors.inc();
            let reason = reason.unwrap_or_else(|| "refused by the application".into());
            error_frame(Some(id), ErrorCode::Rejected, &reason)
        }
        Ok(Err(e)) => failed(e.to_string()),
        Err(_) => failed("no answer within origin-timeout".into()),
    }
}
