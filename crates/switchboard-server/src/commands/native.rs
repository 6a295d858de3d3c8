//! The gateway side of the native protocol `switchboard.v1`: running a
//! client's commands and building reply and push frames. The wire types are
//! in [`switchboard_proto::native`]; the protocol is specified in
//! `docs/protocol.md`.

use super::Commands;
use crate::channels::{Ack, ChannelError};
use crate::clock::now_ms;
use crate::conn::Conn;
use crate::frames::{error_frame, push_frame, result_frame, Empty};
use crate::metrics::KindLabel;
use crate::origin::ask::{ask, event_id, log_failure, AskError};
use crate::origin::ConnectDecision;
use bytes::Bytes;
use serde::Serialize;
use std::sync::Arc;
use switchboard_proto::native::{
    decode_command, CommandBody, ErrorCode, Push, ResumeError, SessionChannel, StreamPosition,
};
use switchboard_proto::origin::{Event, OriginAnswer, Payload, PublishEvent, SubscribeEvent};

/// How a native connection came to be, as its `connected` push says.
#[derive(Debug)]
pub(crate) enum Opened {
    /// A new session; `refused` says why the resume asked for was not possible.
    New { refused: Option<ResumeError> },
    /// A resumed session, with its parked channels.
    Resumed { channels: Vec<SessionChannel> },
}

/// The `connected` push every native connection gets first.
pub(crate) fn connected_frame(s: &Commands, conn: &Conn, opened: Opened) -> Bytes {
    let (resumed, resume_error, channels) = match opened {
        Opened::New { refused } => (false, refused, Vec::new()),
        Opened::Resumed { channels } => (true, None, channels),
    };
    let session = conn.session().is_some();
    // An HTTP fallback's requests name their session by its token, even
    // with sessions off (then it cannot resume: `session_ttl_ms` 0).
    let token = session
        || matches!(
            conn.transport(),
            switchboard_proto::origin::Transport::Sse
                | switchboard_proto::origin::Transport::LongPoll
        );
    let ttl_ms = if session {
        s.sessions.ttl_of(conn).as_millis() as u64
    } else {
        0
    };
    push_frame(&Push::Connected {
        client: conn.id().to_string(),
        node: s.node.to_string(),
        version: 1,
        ping_interval_ms: s.config.ping_interval.as_millis() as u64,
        session: token.then(|| s.sessions.token(&conn.id())),
        session_ttl_ms: token.then_some(ttl_ms),
        resumed,
        resume_error,
        channels,
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
    /// A command that waits on the origin or the cluster bus: hand it to
    /// the connection's [`command_worker`].
    Wait(Job),
}

/// A command that waits on the origin (a publish or subscribe it must
/// approve) or on the cluster bus (a publish, history or presence in a
/// cluster).
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: u64,
    channel: String,
    kind: JobKind,
}

#[derive(Debug)]
enum JobKind {
    Publish {
        data: Payload,
        /// `publish-to-origin`: the origin approves it first.
        approve: bool,
    },
    History {
        since: Option<StreamPosition>,
        limit: Option<usize>,
    },
    Presence,
    Refresh {
        token: String,
    },
    /// `subscribe-to-origin`: the origin approves it first.
    Subscribe {
        since: Option<StreamPosition>,
    },
}

/// Whether the client may subscribe to `channel` itself without asking the
/// origin: its token grants it, or its namespace lets every client (and
/// does not leave the decision to the origin).
fn may_subscribe(
    conn: &Conn,
    channel: &str,
    ch: &crate::channels::Channels,
) -> Result<bool, ChannelError> {
    let ns = ch.namespace(channel)?;
    Ok(conn.token_grants_subscribe(channel) || (ns.client_subscribe && !ns.subscribe_to_origin))
}

/// A client may read a channel's history and presence only if it may
/// subscribe to it itself or is subscribed to it (by the origin).
fn may_read(
    conn: &Conn,
    channel: &str,
    ch: &crate::channels::Channels,
) -> Result<(), ChannelError> {
    if may_subscribe(conn, channel, ch)? || ch.is_subscribed(conn, channel) {
        Ok(())
    } else {
        Err(ChannelError::PermissionDenied(
            "only subscribers may read this channel's history and presence",
        ))
    }
}

/// A subscribe the client may make itself; the reply is queued with the
/// channel's messages, in order.
fn subscribe_now(
    conn: &Arc<Conn>,
    channel: &str,
    since: Option<&StreamPosition>,
    id: u64,
    ch: &crate::channels::Channels,
    m: &crate::metrics::Metrics,
) -> Result<Option<Bytes>, ChannelError> {
    if !may_subscribe(conn, channel, ch)? {
        return Err(ChannelError::PermissionDenied(
            "neither this namespace nor the client's token lets it subscribe here",
        ));
    }
    ch.subscribe(conn, channel, since, Ack::Reply(id), m)
        .map(|_| None)
}

/// Runs one command frame of a native connection and queues its reply.
pub(crate) fn handle(s: &Commands, conn: &Arc<Conn>, text: &[u8]) -> Outcome {
    let m = &s.metrics;
    let cmd = match decode_command(text) {
        Ok(cmd) => cmd,
        Err(e) => {
            m.native_error(e.code());
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
    let clustered = ch.is_clustered();
    let wait = |channel: String, kind: JobKind| Outcome::Wait(Job { id, channel, kind });
    // A session's channels are part of its record in the session store.
    let channels_change = matches!(
        cmd.body,
        CommandBody::Subscribe { .. } | CommandBody::Unsubscribe { .. }
    );
    let answer: Result<Option<Bytes>, ChannelError> = match cmd.body {
        CommandBody::Subscribe { channel, since } => match ch.namespace(&channel) {
            Ok(ns) if ns.subscribe_to_origin && !conn.token_grants_subscribe(&channel) => {
                return wait(channel, JobKind::Subscribe { since });
            }
            Ok(_) => subscribe_now(conn, &channel, since.as_ref(), id, ch, m),
            Err(e) => Err(e),
        },
        CommandBody::Unsubscribe { channel } => ch
            .unsubscribe(conn, &channel, false, m)
            .map(|_| Some(result_frame(id, &Empty {}))),
        CommandBody::Publish { channel, data } => match ch.namespace(&channel) {
            Ok(ns) if !ns.client_publish && !conn.token_grants_publish(&channel) => {
                Err(ChannelError::PermissionDenied(
                    "neither this namespace nor the client's token lets it publish here",
                ))
            }
            Ok(ns) if ns.publish_to_origin || clustered => {
                let approve = ns.publish_to_origin;
                return wait(channel, JobKind::Publish { data, approve });
            }
            Ok(_) => ch
                .publish(&channel, data, None, m)
                .map(|(r, _)| Some(result_frame(id, &r))),
            Err(e) => Err(e),
        },
        CommandBody::Presence { channel } => match may_read(conn, &channel, ch) {
            Ok(()) if clustered => return wait(channel, JobKind::Presence),
            Ok(()) => ch.presence(&channel).map(|r| Some(result_frame(id, &r))),
            Err(e) => Err(e),
        },
        CommandBody::History {
            channel,
            since,
            limit,
        } => match may_read(conn, &channel, ch) {
            Ok(()) if clustered => return wait(channel, JobKind::History { since, limit }),
            Ok(()) => ch
                .history(&channel, since.as_ref(), limit, m)
                .map(|r| Some(result_frame(id, &r))),
            Err(e) => Err(e),
        },
        CommandBody::Ping {} => Ok(Some(result_frame(id, &Empty {}))),
        CommandBody::Ack { seq } => {
            conn.ack(seq, m);
            return Outcome::Done;
        }
        CommandBody::Send { data } => return Outcome::ToOrigin { id, data },
        CommandBody::Authenticate { .. } => {
            m.native_error(ErrorCode::BadCommand);
            let msg = "authenticate is only the first command of a connection opened without a token; send refresh to replace a token";
            conn.push(error_frame(Some(id), ErrorCode::BadCommand, msg), m);
            return Outcome::Done;
        }
        CommandBody::Refresh { token } => match s.auth {
            Some(_) => return wait(String::new(), JobKind::Refresh { token }),
            None => {
                m.native_error(ErrorCode::TokenInvalid);
                let msg = "this gateway checks no tokens";
                conn.push(error_frame(Some(id), ErrorCode::TokenInvalid, msg), m);
                return Outcome::Done;
            }
        },
    };
    if channels_change && answer.is_ok() {
        s.sessions.touch(conn, true);
    }
    match answer {
        Ok(Some(frame)) => {
            conn.push(frame, m);
        }
        Ok(None) => {}
        Err(e) => {
            m.native_error(e.code());
            conn.push(error_frame(Some(id), e.code(), &e.to_string()), m);
        }
    }
    Outcome::Done
}

/// One connection's commands that wait on the origin or the cluster bus,
/// run one at a time and in order (so a channel gets a client's publishes
/// in the order it sent them) by a [`command_worker`] that runs only while
/// some wait: a connection that once waited on the cluster keeps this
/// empty queue, not a task and a channel.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    queue: parking_lot::Mutex<JobQueue>,
}

#[derive(Debug, Default)]
struct JobQueue {
    waiting: std::collections::VecDeque<Job>,
    /// A worker is running (it takes the waiting jobs until none is left).
    running: bool,
}

impl Jobs {
    /// Queues `job` behind the others: `Ok(true)` when no worker runs and
    /// the caller must start one, `Err(job)` when `most` wait already.
    pub(crate) fn push(&self, job: Job, most: usize) -> Result<bool, Job> {
        let mut q = self.queue.lock();
        if q.waiting.len() >= most {
            return Err(job);
        }
        q.waiting.push_back(job);
        Ok(!std::mem::replace(&mut q.running, true))
    }

    /// The next job; `None` when none waits, which ends the worker (the
    /// next job starts another) and gives the queue's storage back.
    fn next(&self) -> Option<Job> {
        let mut q = self.queue.lock();
        let job = q.waiting.pop_front();
        if job.is_none() {
            q.running = false;
            q.waiting = std::collections::VecDeque::new();
        }
        job
    }
}

/// Runs a connection's waiting commands until none is left, without
/// holding up the connection's own task. A job queued while it runs is
/// its to run; one queued after it ended starts another worker.
pub(crate) async fn command_worker(s: Arc<Commands>, conn: Arc<Conn>, jobs: Arc<Jobs>) {
    /// A worker that panics lets the next job start another.
    struct Unwinding<'a>(&'a Jobs);
    impl Drop for Unwinding<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.queue.lock().running = false;
            }
        }
    }
    let _unwinding = Unwinding(&jobs);
    while let Some(job) = jobs.next() {
        if let Some(frame) = run_job(&s, &conn, job).await {
            conn.push(frame, &s.metrics);
        }
    }
}

/// Runs a job; its reply, unless it was queued already (a subscribe's).
async fn run_job(s: &Arc<Commands>, conn: &Arc<Conn>, job: Job) -> Option<Bytes> {
    let Job { id, channel, kind } = job;
    let ch = &s.channels;
    let m = &s.metrics;
    let answer = match kind {
        JobKind::Subscribe { since } => {
            return approve_and_subscribe(s, conn, id, channel, since).await
        }
        JobKind::Publish {
            data,
            approve: true,
        } => return Some(approve_and_publish(s, conn, id, channel, data).await),
        JobKind::Publish { data, .. } => ch
            .publish_async(&channel, data, None, m)
            .await
            .map(|(r, _)| result_frame(id, &r)),
        JobKind::History { since, limit } => ch
            .history_async(&channel, since.as_ref(), limit, m)
            .await
            .map(|r| result_frame(id, &r)),
        JobKind::Presence => ch
            .presence_async(&channel)
            .await
            .map(|r| result_frame(id, &r)),
        JobKind::Refresh { token } => return Some(refresh(s, conn, id, &token).await),
    };
    Some(answer.unwrap_or_else(|e| {
        m.native_error(e.code());
        error_frame(Some(id), e.code(), &e.to_string())
    }))
}

/// A `refresh`: the new token must verify and be the same user's; it then
/// replaces the connection's grants and pushes its expiry back.
async fn refresh(s: &Commands, conn: &Conn, id: u64, token: &str) -> Bytes {
    let m = &s.metrics;
    let refused = |why: String| {
        m.native_error(ErrorCode::TokenInvalid);
        error_frame(Some(id), ErrorCode::TokenInvalid, &why)
    };
    let Some(auth) = &s.auth else {
        return refused("this gateway checks no tokens".into());
    };
    let identity = match auth.verify(token).await {
        Ok(i) => i,
        Err(e) => return refused(format!("{}: {e}", e.code())),
    };
    let Ok(expires_at_ms) = conn.replace_token(&identity) else {
        return refused("the token is for another user".into());
    };
    s.sessions.touch(conn, true);
    #[derive(Serialize)]
    struct Refreshed {
        expires_at_ms: u64,
    }
    result_frame(id, &Refreshed { expires_at_ms })
}

/// Sends a synchronous `publish` or `subscribe` event (alone in its batch)
/// and waits, at most `origin-timeout`, for the origin's decision. Replies
/// in an accepting answer are delivered; otherwise the error frame for the
/// command `id` is returned: `rejected` with the origin's reason, or
/// `unavailable`.
async fn ask_origin(s: &Arc<Commands>, conn: &Conn, id: u64, event: &Event) -> Result<(), Bytes> {
    let deadline = tokio::time::Instant::now() + s.config.origin_timeout;
    match ask(&s.origin, event, deadline).await {
        Ok(ConnectDecision::Accept(OriginAnswer { replies, .. })) => {
            crate::origin::dispatcher::deliver_replies(&s.origin, replies);
            Ok(())
        }
        Ok(ConnectDecision::Reject { reason, .. }) => {
            s.metrics.native_error(ErrorCode::Rejected);
            let reason = reason.unwrap_or_else(|| "refused by the application".into());
            Err(error_frame(Some(id), ErrorCode::Rejected, &reason))
        }
        Err(e) => {
            log_failure(event.kind(), &conn.id(), &e);
            s.metrics.native_error(ErrorCode::Unavailable);
            let message = match e {
                AskError::CutOff => "this node is cut off from its cluster; retry",
                _ => "the application is unavailable; retry later",
            };
            Err(error_frame(Some(id), ErrorCode::Unavailable, message))
        }
    }
}

/// `publish-to-origin`: the origin approves the publish, then it is made.
async fn approve_and_publish(
    s: &Arc<Commands>,
    conn: &Conn,
    id: u64,
    channel: String,
    data: Payload,
) -> Bytes {
    let event = Event::Publish(PublishEvent {
        id: event_id::decision(&conn.id(), "publish"),
        connection_id: conn.id().to_string(),
        node: s.node.to_string(),
        timestamp_ms: now_ms(),
        user_id: conn.user_id().map(str::to_owned),
        channel: channel.clone(),
        payload: data,
    });
    if let Err(refused) = ask_origin(s, conn, id, &event).await {
        return refused;
    }
    let Event::Publish(PublishEvent { payload: data, .. }) = event else {
        unreachable!("built above as a publish event");
    };
    match s
        .channels
        .publish_async(&channel, data, None, &s.metrics)
        .await
    {
        Ok((r, _)) => result_frame(id, &r),
        Err(e) => {
            s.metrics.native_error(e.code());
            error_frame(Some(id), e.code(), &e.to_string())
        }
    }
}

/// `subscribe-to-origin`: the origin approves the subscription, then it is
/// made (its reply queued with the channel's messages); `None` once it is.
async fn approve_and_subscribe(
    s: &Arc<Commands>,
    conn: &Arc<Conn>,
    id: u64,
    channel: String,
    since: Option<StreamPosition>,
) -> Option<Bytes> {
    let event = Event::Subscribe(SubscribeEvent {
        id: event_id::decision(&conn.id(), "subscribe"),
        connection_id: conn.id().to_string(),
        node: s.node.to_string(),
        timestamp_ms: now_ms(),
        user_id: conn.user_id().map(str::to_owned),
        channel: channel.clone(),
    });
    if let Err(refused) = ask_origin(s, conn, id, &event).await {
        return Some(refused);
    }
    match s
        .channels
        .subscribe(conn, &channel, since.as_ref(), Ack::Reply(id), &s.metrics)
    {
        Ok(_) => {
            s.sessions.touch(conn, true);
            None
        }
        Err(e) => {
            s.metrics.native_error(e.code());
            Some(error_frame(Some(id), e.code(), &e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Job, JobKind, Jobs};

    fn job(id: u64) -> Job {
        Job {
            id,
            channel: "c".into(),
            kind: JobKind::Presence,
        }
    }

    /// One worker at a time takes the jobs in order; it ends when none is
    /// left (giving the queue's storage back), and the next job starts
    /// another; at most `most` wait.
    #[test]
    fn a_worker_runs_while_jobs_wait_and_one_at_a_time() {
        let jobs = Jobs::default();
        assert!(matches!(jobs.push(job(1), 2), Ok(true)), "start a worker");
        assert!(
            matches!(jobs.push(job(2), 2), Ok(false)),
            "it takes this one too"
        );
        assert!(
            matches!(jobs.push(job(3), 2), Err(j) if j.id == 3),
            "two wait already"
        );
        assert_eq!(jobs.next().map(|j| j.id), Some(1));
        assert!(
            matches!(jobs.push(job(3), 2), Ok(false)),
            "the worker still runs"
        );
        assert_eq!(jobs.next().map(|j| j.id), Some(2));
        assert_eq!(jobs.next().map(|j| j.id), Some(3));
        assert!(jobs.next().is_none(), "none left: the worker ends");
        assert_eq!(
            jobs.queue.lock().waiting.capacity(),
            0,
            "storage given back"
        );
        assert!(
            matches!(jobs.push(job(4), 2), Ok(true)),
            "the next job starts one"
        );
    }
}
