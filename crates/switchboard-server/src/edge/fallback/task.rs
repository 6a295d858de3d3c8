//! The task of one fallback connection (SSE, long-poll or plain
//! EventSource): it takes the frames queued on its [`Conn`], writes them as
//! SSE events on its stream or as the batches of its polls, runs the
//! commands that `POST`s bring ([`Up`]), and watches heartbeats, the token
//! and, for long-polling, the gap between polls.

use super::events::{self, Plain, PlainEvent, Unframed};
use super::polls::{PollVerdict, Polls};
use super::{Links, Poll, Up, UpError};
use crate::admission::ratelimit::Verdict;
use crate::conn::stream::ClientStream;
use crate::conn::Conn;
use crate::edge::connection::DisconnectGuard;
use crate::edge::inbound::{Inbound, TokenCheck};
use crate::edge::{Edge, SocketGuard};
use crate::sessions::Ending;
use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::sync::Arc;
use switchboard_proto::origin::ClosedBy;
use switchboard_proto::ws::close;
use switchboard_proto::ws::frame::encode_close;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Where a fallback connection's pushes go.
pub(crate) enum Down {
    /// An SSE response (bidirectional, or a plain EventSource stream when
    /// `plain` is set).
    Stream {
        stream: ClientStream,
        _socket: SocketGuard,
        /// Bytes not written yet (the response head first).
        pending: Bytes,
        /// The last event's `id` (bidirectional streams).
        last_id: u64,
        plain: Option<Box<Plain>>,
    },
    /// Long-polling.
    Polls(Polls),
}

impl Down {
    /// Whether everything written has reached the socket (see
    /// [`ClientStream::flushed`]).
    fn flushed(&self) -> bool {
        match self {
            Down::Stream { stream, .. } => stream.flushed(),
            Down::Polls(_) => true,
        }
    }
}

/// How a fallback connection's close goes out.
struct Closing {
    ending: Ending,
    deadline: Instant,
}

struct Task {
    guard: DisconnectGuard,
    down: Down,
    up: mpsc::Receiver<Up>,
    inbound: Inbound,
    /// When the next heartbeat comment is due (streams).
    heartbeat: Instant,
    last_message: Instant,
    closing: Option<Closing>,
    links: Arc<Links>,
}

/// Starts the task of an accepted fallback connection.
pub(crate) fn start(
    shared: &Arc<Edge>,
    guard: DisconnectGuard,
    down: Down,
    origin_seq: u64,
    first_commands: Vec<Vec<u8>>,
) {
    let (tx, rx) = mpsc::channel(super::UP_QUEUE);
    let links = shared.fallbacks.clone();
    let link = links.insert(guard.conn().key, tx);
    let now = Instant::now();
    let mut task = Task {
        heartbeat: now + shared.config.ping_interval,
        last_message: now,
        guard,
        down,
        up: rx,
        inbound: Inbound::new(origin_seq),
        closing: None,
        links,
    };
    if shared
        .commands
        .draining
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        task.close(
            close::SERVICE_RESTART,
            "server restart, reconnect",
            ClosedBy::Gateway,
        );
    }
    for cmd in first_commands {
        // The stream's own subscribes: not the client's messages.
        if task
            .inbound
            .command(shared, task.guard.conn(), &cmd)
            .is_err()
        {
            task.close(close::ORIGIN_BACKLOG, "origin backlog", ClosedBy::Gateway);
        }
    }
    shared.conn_tasks.spawn(async move {
        let ending = task.drive().await;
        tracing::debug!(
            connection = %task.guard.conn().id(),
            code = ending.code,
            reason = %ending.reason,
            "fallback connection ended"
        );
        task.links.remove(&task.guard.conn().key, link);
        let seq = task.inbound.seq;
        // Requests that came too late are answered for what happened: a
        // lost connection's session waits for a resume.
        let suspended = ending.resumable
            && ending.code != crate::sessions::TAKEN_OVER
            && task.guard.conn().session().is_some();
        let shared = task.guard.shared().clone();
        let answer = |poll: Poll| {
            if suspended {
                super::refuse_poll(
                    &shared,
                    poll,
                    409,
                    "session_suspended",
                    "the session lost its connection; resume it",
                );
            } else {
                super::refuse_poll(
                    &shared,
                    poll,
                    409,
                    "session_ended",
                    "the session moved or ended",
                );
            }
        };
        if let Down::Polls(polls) = &mut task.down {
            if let Some(poll) = polls.waiting.take() {
                answer(poll);
            }
        }
        task.up.close();
        while let Ok(up) = task.up.try_recv() {
            match up {
                Up::Commands { done, .. } => {
                    let e = if suspended {
                        UpError::Suspended
                    } else {
                        UpError::Ended
                    };
                    let _ = done.send(Err(e));
                }
                Up::Poll(poll) => answer(poll),
            }
        }
        drop(task.down);
        task.guard.finish(ending, seq);
    });
}

impl Task {
    fn shared(&self) -> &Arc<Edge> {
        self.guard.shared()
    }

    fn conn(&self) -> &Arc<Conn> {
        self.guard.conn()
    }

    async fn drive(&mut self) -> Ending {
        let sleep = tokio::time::sleep_until(self.next_deadline());
        tokio::pin!(sleep);
        loop {
            if let Some(end) = self.take_close() {
                return end;
            }
            match self.flush() {
                Ok(true) if !self.down.flushed() => {}
                Ok(true) => {
                    if let Some(c) = self.closing.take() {
                        return c.ending;
                    }
                }
                Ok(false) => {}
                Err(_) => return self.end_or(Ending::lost("write failed")),
            }
            let deadline = self.next_deadline();
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            let down = &self.down;
            let ready = async {
                match down {
                    Down::Stream {
                        stream, pending, ..
                    } => {
                        let interest = if pending.is_empty() {
                            Interest::READABLE
                        } else {
                            Interest::READABLE | Interest::WRITABLE
                        };
                        stream.ready(interest).await.map(Some)
                    }
                    Down::Polls(polls) => match polls.waiting.as_ref().and_then(Poll::stream) {
                        Some(stream) => stream.ready(Interest::READABLE).await.map(Some),
                        None => std::future::pending().await,
                    },
                }
            };
            tokio::select! {
                biased;
                ready = ready => {
                    if let Err(end) = self.on_ready(ready) {
                        return end;
                    }
                }
                _ = self.guard.conn().notify.notified() => {}
                up = self.up.recv() => {
                    if let Some(up) = up {
                        self.on_up(up);
                    }
                }
                _ = &mut sleep => {
                    if let Some(end) = self.on_timer() {
                        return end;
                    }
                }
            }
        }
    }

    /// A close requested by another part (the control API, a drain, a
    /// slow consumer, a takeover): queued as a close frame, written as the
    /// stream's last event or the last poll's `close`.
    fn take_close(&mut self) -> Option<Ending> {
        if self.closing.is_some() {
            return None;
        }
        let req = self.conn().take_close()?;
        if req.takeover {
            // The session resumes elsewhere: this carrier goes now, with a
            // close event unless an event is half written.
            if let Down::Stream {
                stream, pending, ..
            } = &self.down
            {
                if !pending.is_empty() {
                    return Some(Ending::kept(&req));
                }
                let mut out = BytesMut::new();
                events::put_event(
                    &mut out,
                    None,
                    Some("close"),
                    &events::close_json(req.code, &req.reason),
                );
                let _ = stream.try_write(&out);
            }
            return Some(Ending::kept(&req));
        }
        self.close(req.code, &req.reason, req.by);
        None
    }

    /// Queues the close frame after what is queued; the task ends once it
    /// is out (or at the close timeout).
    fn close(&mut self, code: u16, reason: &str, by: ClosedBy) {
        if self.closing.is_some() {
            return;
        }
        if code == close::ORIGIN_BACKLOG {
            self.shared().metrics.backlog_closes.inc();
        }
        let metrics = self.shared().metrics.clone();
        self.conn().seal_with(encode_close(code, reason), &metrics);
        self.closing = Some(Closing {
            ending: Ending::closed(code, reason, by),
            deadline: Instant::now() + crate::edge::connection::CLOSE_TIMEOUT,
        });
    }

    fn end_or(&mut self, ending: Ending) -> Ending {
        self.closing.take().map_or(ending, |c| c.ending)
    }

    /// Moves queued frames to the client: `Ok(true)` once everything up to
    /// the close frame is out (only meaningful while closing).
    fn flush(&mut self) -> io::Result<bool> {
        let shared = self.shared().clone();
        let conn = self.conn().clone();
        match &mut self.down {
            Down::Stream {
                stream,
                pending,
                last_id,
                plain,
                ..
            } => loop {
                if pending.is_empty() {
                    let Some(frames) = conn.take_ready() else {
                        return Ok(self.closing.is_some() && conn.queued_bytes() == 0);
                    };
                    let mut out = BytesMut::new();
                    let mut closed = false;
                    for frame in &frames {
                        closed |=
                            write_stream_event(&mut out, frame, last_id, plain.as_deref_mut());
                    }
                    *pending = out.freeze();
                    if closed && self.closing.is_none() {
                        // Sealed by someone else's close frame.
                        self.closing = Some(Closing {
                            ending: Ending::closed(close::NORMAL, "", ClosedBy::Gateway),
                            deadline: Instant::now() + crate::edge::connection::CLOSE_TIMEOUT,
                        });
                    }
                }
                if pending.is_empty() {
                    // Frames that mean nothing here (a plain stream's
                    // pushes other than messages).
                    continue;
                }
                match stream.try_write(pending) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        shared.metrics.bytes_out.inc_by(n as u64);
                        conn.bytes_out
                            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                        pending.advance(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            },
            Down::Polls(polls) => {
                let Some(poll) = polls.waiting.take() else {
                    return Ok(false);
                };
                let frames = conn.take_ready();
                if frames.is_none() && !poll.timed_out() {
                    polls.waiting = Some(poll);
                    return Ok(false);
                }
                let mut pushes = Vec::new();
                let mut close = None;
                for frame in frames.iter().flatten() {
                    match events::unframe(frame) {
                        Unframed::Text(json) => pushes.push(json),
                        Unframed::Close { code, reason } => {
                            close = Some(events::close_json(code, &reason));
                        }
                        Unframed::Other => {}
                    }
                }
                let body = polls.answer(&pushes, close.as_deref());
                shared.metrics.bytes_out.inc_by(body.len() as u64);
                answer_poll(&shared, poll, body);
                Ok(close.is_some())
            }
        }
    }

    fn on_ready(&mut self, ready: io::Result<Option<tokio::io::Ready>>) -> Result<(), Ending> {
        let ready = match ready {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(_) => return Err(self.end_or(Ending::lost("socket error"))),
        };
        if !(ready.is_readable() || ready.is_read_closed()) {
            return Ok(());
        }
        match &mut self.down {
            Down::Stream { stream, .. } => {
                // A stream's client sends nothing more: anything read is
                // discarded; the end of the request is the end of the stream.
                match drain(stream) {
                    Ok(false) => Ok(()),
                    _ => Err(self.end_or(Ending::lost("the client closed the stream"))),
                }
            }
            Down::Polls(polls) => {
                let max = super::read_ahead_max(self.guard.shared());
                let gone = polls
                    .waiting
                    .as_mut()
                    .and_then(Poll::client_mut)
                    .is_some_and(|c| c.read_ahead(max));
                if gone {
                    // The client gave up this poll: it polls again (or not,
                    // and the gap ends the session).
                    polls.waiting = None;
                    polls.idle_since = Instant::now();
                }
                Ok(())
            }
        }
    }

    fn on_up(&mut self, up: Up) {
        match up {
            Up::Commands { body, done } => {
                if self.closing.is_some() {
                    let _ = done.send(Err(UpError::Ended));
                    return;
                }
                self.last_message = Instant::now();
                for line in body.split(|b| *b == b'\n') {
                    let line = line.trim_ascii();
                    if !line.is_empty() {
                        self.command(line);
                    }
                }
                let _ = done.send(Ok(()));
            }
            Up::Poll(poll) => self.on_poll(poll),
        }
    }

    fn command(&mut self, text: &[u8]) {
        let shared = self.shared().clone();
        let conn = self.conn().clone();
        Inbound::count_in(&shared, &conn);
        match self.inbound.admit(&shared, text.len()) {
            Verdict::Pass => {}
            Verdict::Refuse => return Inbound::refuse_rate(&shared, &conn, Some(text)),
            Verdict::Close => {
                shared.metrics.rate_limited.inc();
                return self.close(
                    close::POLICY_VIOLATION,
                    "rate limit exceeded",
                    ClosedBy::Gateway,
                );
            }
        }
        if self.inbound.command(&shared, &conn, text).is_err() {
            self.close(close::ORIGIN_BACKLOG, "origin backlog", ClosedBy::Gateway);
        }
    }

    fn on_poll(&mut self, poll: Poll) {
        let shared = self.shared().clone();
        let Down::Polls(polls) = &mut self.down else {
            return super::refuse_poll(
                &shared,
                poll,
                409,
                "wrong_transport",
                "this session is carried by an SSE stream",
            );
        };
        self.last_message = Instant::now();
        if let Some(old) = polls.waiting.take() {
            super::refuse_poll(
                &shared,
                old,
                409,
                "poll_replaced",
                "a newer poll took its place",
            );
        }
        match polls.verdict(poll.cursor) {
            PollVerdict::Wait => polls.waiting = Some(poll),
            PollVerdict::Repeat(body) => answer_poll(&shared, poll, body),
            PollVerdict::BadCursor(msg) => {
                super::refuse_poll(&shared, poll, 409, "bad_cursor", &msg)
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let cfg = &self.shared().config;
        if let Some(c) = &self.closing {
            return c.deadline;
        }
        let mut d = match &self.down {
            Down::Stream { .. } => self.heartbeat,
            Down::Polls(polls) => match &polls.waiting {
                Some(poll) => poll.expires,
                None => polls.idle_since + cfg.poll_timeout,
            },
        };
        if let Some(idle) = cfg.idle_timeout {
            d = d.min(self.last_message + idle);
        }
        if let Some(at) = self.inbound.token_moment(self.shared(), self.conn()) {
            d = d.min(at);
        }
        d
    }

    fn on_timer(&mut self) -> Option<Ending> {
        let now = Instant::now();
        if let Some(c) = &self.closing {
            if now >= c.deadline {
                let ending = self.closing.take().expect("checked").ending;
                return Some(ending);
            }
            return None;
        }
        let shared = self.shared().clone();
        let conn = self.conn().clone();
        if self.inbound.check_token(&shared, &conn) == TokenCheck::Expired {
            self.close(close::TOKEN_EXPIRED, "token expired", ClosedBy::Gateway);
            return None;
        }
        if let Some(idle) = shared.config.idle_timeout {
            if now >= self.last_message + idle {
                self.close(close::IDLE_TIMEOUT, "idle timeout", ClosedBy::Gateway);
                return None;
            }
        }
        match &mut self.down {
            Down::Stream { pending, .. } => {
                if now >= self.heartbeat {
                    self.heartbeat = now + shared.config.ping_interval;
                    if pending.is_empty() {
                        *pending = Bytes::from_static(events::HEARTBEAT);
                    }
                }
            }
            // A poll that waited `poll-timeout` is answered by the next
            // flush; no poll for that long is a lost connection.
            Down::Polls(polls) => {
                if polls.waiting.is_none() && now >= polls.idle_since + shared.config.poll_timeout {
                    return Some(Ending {
                        code: close::ABNORMAL,
                        reason: "no poll within poll-timeout".into(),
                        by: ClosedBy::Network,
                        resumable: true,
                    });
                }
            }
        }
        None
    }
}

/// Writes a frame as SSE: `true` for a close frame (the stream's last).
fn write_stream_event(
    out: &mut BytesMut,
    frame: &Bytes,
    last_id: &mut u64,
    plain: Option<&mut Plain>,
) -> bool {
    match events::unframe(frame) {
        Unframed::Text(json) => match plain {
            None => {
                *last_id += 1;
                let text = std::str::from_utf8(&json).unwrap_or_default();
                events::put_event(out, Some(&last_id.to_string()), None, text);
            }
            Some(plain) => {
                for ev in plain.on_frame(&json) {
                    match ev {
                        PlainEvent::Message { data, id } => {
                            events::put_event(out, Some(&id), None, &data);
                        }
                        PlainEvent::Named { event, data, id } => {
                            events::put_event(out, id.as_deref(), Some(event), &data);
                        }
                    }
                }
            }
        },
        Unframed::Close { code, reason } => {
            events::put_event(out, None, Some("close"), &events::close_json(code, &reason));
            return true;
        }
        Unframed::Other => {}
    }
    false
}

/// Reads and discards what a socket has: `Ok(true)` when the client has
/// closed it.
fn drain(stream: &ClientStream) -> io::Result<bool> {
    let mut buf = [0u8; 512];
    loop {
        match stream.try_read_buf(&mut &mut buf[..]) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Answers a poll with its batch.
fn answer_poll(shared: &Arc<Edge>, poll: Poll, body: Bytes) {
    shared.metrics.fallback("poll", "ok");
    super::reply_poll(shared, poll, 200, body);
}
