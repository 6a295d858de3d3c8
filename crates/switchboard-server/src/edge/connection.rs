//! The task of one open WebSocket connection.
//!
//! It owns the socket and waits on three things only: socket readiness, its
//! [`Conn`] being woken (a frame queued or a close requested), and one timer
//! (next ping, pong deadline, idle deadline or closing deadline, whichever is
//! first). While idle it holds no read buffer, no write buffer and no
//! fragment buffer; see [`crate::conn::pool`].

use super::inbound::{Inbound, TokenCheck};
use super::{Edge, SocketGuard};
use crate::admission::ratelimit::Verdict;
use crate::conn::pool;
use crate::conn::stream::ClientStream;
use crate::conn::Conn;
use crate::edge::timers;
use crate::frames;
use crate::sessions::Ending;
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use switchboard_proto::graphql::{self as graphql_proto, Protocol};
use switchboard_proto::native::ErrorCode;
use switchboard_proto::origin::{ClosedBy, Payload};
use switchboard_proto::ws::frame::{encode_close, encode_frame, OpCode};
use switchboard_proto::ws::{close, Decoder, Message};
use tokio::time::Instant;

/// Time allowed for the closing handshake (our close frame written and the
/// client's close received) before the socket is dropped.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes read in one wake-up before yielding to other connections.
const READ_BUDGET: usize = 256 << 10;

/// A ping with an empty payload.
static PING: Bytes = Bytes::from_static(&[0x89, 0x00]);

/// Reports the connection's end to its session when dropped, whatever
/// ended the task (a normal close, an error, a panic, the runtime shutting
/// down): a lost socket suspends a session, anything else ends it with its
/// one `disconnect` event.
#[derive(Debug)]
pub(crate) struct DisconnectGuard {
    shared: Arc<Edge>,
    conn: Arc<Conn>,
    /// How the connection ended, and the `seq` of the last `message`
    /// event (for a resumed session's next socket); boxed, as it is set
    /// only at the very end.
    ending: Option<Box<(Ending, u64)>>,
}

impl DisconnectGuard {
    pub(crate) fn new(shared: Arc<Edge>, conn: Arc<Conn>) -> Self {
        Self {
            shared,
            conn,
            ending: None,
        }
    }

    /// The connection it reports on.
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// The edge the connection belongs to.
    pub(crate) fn shared(&self) -> &Arc<Edge> {
        &self.shared
    }

    /// Records how the connection ended and reports it.
    pub(crate) fn finish(mut self, ending: Ending, origin_seq: u64) {
        self.record(ending, origin_seq);
    }

    /// Records how the connection ended, reported when the guard is dropped.
    fn record(&mut self, ending: Ending, origin_seq: u64) {
        self.ending = Some(Box::new((ending, origin_seq)));
    }
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        let (ending, origin_seq) = self.ending.take().map(|e| *e).unwrap_or_else(|| {
            let why = "connection task ended unexpectedly";
            (Ending::closed(close::ABNORMAL, why, ClosedBy::Gateway), 0)
        });
        // Read before leaving the registry, which a fence waits to see empty:
        // a connection closed by a fence sends no `disconnect` (the origin
        // has retired it with `node_down`).
        let fenced = self.shared.origin.lease.is_fencing();
        if self.conn.graphql.is_some() {
            self.shared.commands.graphql.forget(&self.conn.key);
        }
        self.shared
            .metrics
            .by_transport(self.conn.transport().as_str())
            .dec();
        self.shared
            .commands
            .sessions
            .lost(&self.conn, ending, origin_seq, fenced);
    }
}

enum Phase {
    /// `heartbeat` is when to ping, or, once a ping is out, by when some
    /// frame must have come back.
    Open { awaiting_pong: bool },
    /// Our close frame is queued (or sent); waiting for the client's
    /// until `heartbeat`, then the closing deadline.
    Closing { peer_closed: bool },
}

/// What reading keeps between wake-ups, when it keeps anything: a decoder
/// with state (a fragmented message, an inflater) and the bytes of an
/// incomplete frame. Boxed: a pointer is what idle connections pay.
struct Parked {
    decoder: Decoder,
    /// Empty (and unallocated) when only the decoder is kept.
    buf: BytesMut,
}

impl Parked {
    /// Gives an emptied buffer back to the pool; whether anything is left
    /// worth keeping (bytes, or a decoder with state).
    fn settle(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        pool::give(std::mem::take(&mut self.buf));
        !self.decoder.is_stateless()
    }
}

/// The task of one connection: a future written by hand, so that its state
/// is these fields alone (no copy of them beside an `async` block's own
/// state). It ends by recording how the connection ended in its guard;
/// dropping it then frees the socket's slot, closes the socket and, last,
/// reports the end (the field order below).
pub(crate) struct Task {
    stream: ClientStream,
    /// Owns the node and connection handles, and how the connection ended;
    /// sends the `disconnect` when the task is dropped.
    guard: DisconnectGuard,
    /// The address the socket's slot is counted under (see
    /// [`Edge::track_socket`]); freed when the task is dropped.
    ip: IpAddr,
    /// `None` when idle: a fresh decoder (the node's `max-message-size`,
    /// no deflate) would do, and no bytes wait.
    parked: Option<Box<Parked>>,
    /// Commands, data messages, rate limits and the token's expiry.
    inbound: Inbound,
    phase: Phase,
    /// Bytes in `parked` are still to be decoded: those that came with the
    /// handshake, or those read before a pause (decoded when it ends, or
    /// when the connection starts closing: its close frame may be there).
    undecoded: bool,
    /// The next ping, or the pong deadline (see [`Phase::Open`]); once
    /// closing, the closing deadline (see [`Phase::Closing`]); a tick of
    /// the node's timer (rounded up: never early).
    heartbeat: u64,
    /// When the client last sent a message, as a tick of the node's timer
    /// (rounded up: an idle timeout is never early).
    last_message: u64,
    /// The tick the node's timer wakes the task at ([`timers::NEVER`]: none).
    armed: u64,
}

impl Drop for Task {
    fn drop(&mut self) {
        // Its slot is free before the guard (dropped after the socket)
        // queues the `disconnect`: an origin that hears of it can count on
        // the room.
        self.guard.shared.release_socket(self.ip);
    }
}

/// Runs an accepted connection to its end; the guard then sends its
/// `disconnect` event. This future is what every idle connection costs.
pub(crate) fn run(
    stream: ClientStream,
    guard: DisconnectGuard,
    leftover: Option<BytesMut>,
    decoder: Decoder,
    socket: SocketGuard,
    origin_seq: u64,
) -> Task {
    let timers = &guard.shared.timers;
    let now = Instant::now();
    let undecoded = leftover.is_some();
    let parked = (undecoded || !decoder.is_stateless()).then(|| {
        Box::new(Parked {
            decoder,
            buf: leftover.unwrap_or_default(),
        })
    });
    Task {
        heartbeat: timers.tick_of(now + guard.shared.config.ping_interval),
        last_message: timers.tick_of(now),
        armed: timers::NEVER,
        stream,
        ip: socket.into_ip(),
        guard,
        parked,
        inbound: Inbound::new(origin_seq),
        phase: Phase::Open {
            awaiting_pong: false,
        },
        undecoded,
    }
}

impl Future for Task {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let task = self.get_mut();
        let ending = ready!(task.drive(cx));
        let seq = task.inbound.seq;
        task.guard.record(ending, seq);
        Poll::Ready(())
    }
}

impl Task {
    /// Runs the connection until it ends, or until it waits.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        // Everything below is looked at anew: a wake-up pending from before
        // would only make one more round.
        self.guard.conn.notify.clear();
        // Whether the deadline was handled since the last wait.
        let mut timed = false;
        loop {
            if self.undecoded && self.paused().is_none() {
                if let Err(end) = self.decode_parked() {
                    return Poll::Ready(end);
                }
            }
            if let Phase::Open { .. } = self.phase {
                if let Some(req) = self.guard.conn.take_close() {
                    if req.takeover {
                        // The session is resuming on a new socket: this one
                        // goes now, with a close frame if it takes one.
                        let _ = self.stream.try_write(&encode_close(req.code, &req.reason));
                        return Poll::Ready(Ending::kept(&req));
                    }
                    self.start_close(req.code, &req.reason, req.by);
                    // Closing ends a pause: the client's close frame may
                    // be among the bytes it left parked.
                    if self.undecoded {
                        if let Err(end) = self.decode_parked() {
                            return Poll::Ready(end);
                        }
                    }
                }
            }
            let drained = match self
                .guard
                .conn
                .flush(&self.stream, &self.guard.shared.metrics)
            {
                // Behind TLS, ciphertext may still wait for the socket.
                Ok(d) => d && self.stream.flushed(),
                Err(e) => return Poll::Ready(self.failed(&e, "write failed")),
            };
            if let Phase::Closing {
                peer_closed: true, ..
            } = self.phase
            {
                if drained {
                    return Poll::Ready(self.end_or(Ending::closed(
                        close::NORMAL,
                        "",
                        ClosedBy::Client,
                    )));
                }
            }
            let deadline = self.next_deadline();
            if !timed && Instant::now() >= deadline {
                // What it asks may queue frames: flushed on the next round.
                timed = true;
                if let Some(end) = self.on_timer() {
                    return Poll::Ready(end);
                }
                continue;
            }
            timed = false;
            self.arm(deadline);
            let reading = self.paused().is_none();
            match self.poll_wait(cx, reading, !drained) {
                Poll::Pending => return Poll::Pending,
                // Woken: a frame queued, a close requested or a deadline.
                Poll::Ready(None) => continue,
                Poll::Ready(Some(Err(_))) => {
                    return Poll::Ready(self.end_or(Ending::lost("socket error")))
                }
                Poll::Ready(Some(Ok(readable))) => {
                    if readable {
                        if let Err(end) = self.read_ready() {
                            return Poll::Ready(end);
                        }
                    }
                }
            }
        }
    }

    /// Polls the socket for reading (unless `reading` is off: a paused
    /// reader) and writing (if `writing`), and the connection's
    /// [`Conn::notify`]: `Some(Ok(readable))` when the socket is ready,
    /// `None` when woken (a frame queued, a close requested, a deadline
    /// passed). Only the socket's waker slots and `notify` keep the task's
    /// waker: no waiter node sits in the task.
    ///
    /// A paused reader with nothing to write polls the socket for nothing:
    /// the end of the pause (a timer) wakes it, and a socket that failed
    /// meanwhile is found then, or by the next ping written.
    fn poll_wait(
        &self,
        cx: &mut Context<'_>,
        reading: bool,
        writing: bool,
    ) -> Poll<Option<io::Result<bool>>> {
        let mut readable = false;
        let mut ready = false;
        if reading {
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => (readable, ready) = (true, true),
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => {}
            }
        }
        if writing {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => ready = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => {}
            }
        }
        if ready {
            return Poll::Ready(Some(Ok(readable)));
        }
        self.guard.conn.notify.poll_notified(cx).map(|()| None)
    }

    /// Has the node's timer wake the task at `deadline` (or before): a
    /// deadline that moved later is armed when the earlier one wakes it.
    fn arm(&mut self, deadline: Instant) {
        let timers = &self.guard.shared.timers;
        let tick = timers.tick_of(deadline);
        let stale = self.armed == timers::NEVER || timers.moment(self.armed) <= Instant::now();
        if tick < self.armed || stale {
            timers.arm(tick, &self.guard.conn);
            self.armed = tick;
        }
    }

    /// When `heartbeat` falls (see [`Task::heartbeat`]).
    fn heartbeat_at(&self) -> Instant {
        self.guard.shared.timers.moment(self.heartbeat)
    }

    /// Sets `heartbeat` to `at` (rounded up to the timer's tick).
    fn set_heartbeat(&mut self, at: Instant) {
        self.heartbeat = self.guard.shared.timers.tick_of(at);
    }

    fn next_deadline(&self) -> Instant {
        match self.phase {
            Phase::Closing { .. } => self.heartbeat_at(),
            Phase::Open { .. } => {
                let mut d = self.heartbeat_at();
                // The idle timeout does not run during a pause (see
                // `on_timer`): its end is the deadline then.
                if let (Some(idle), None) = (self.guard.shared.config.idle_timeout, self.paused()) {
                    d = d.min(self.idle_deadline(idle));
                }
                if let Some(at) = self.token_moment() {
                    d = d.min(at);
                }
                if let Some(at) = self.paused() {
                    d = d.min(at);
                }
                d
            }
        }
    }

    /// When the connection times out if the client sends nothing more.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.guard.shared.timers.moment(self.last_message) + idle
    }

    fn token_moment(&self) -> Option<Instant> {
        self.inbound
            .token_moment(&self.guard.shared, &self.guard.conn)
    }

    /// Closes a connection whose token expired (4004; a GraphQL one 4403,
    /// which its clients retry with a fresh token), and asks a native one
    /// to `refresh` it shortly before.
    fn check_token(&mut self) {
        if self
            .inbound
            .check_token(&self.guard.shared, &self.guard.conn)
            == TokenCheck::Expired
        {
            if self.guard.conn.graphql.is_some() {
                let c = crate::graphql::Close {
                    code: graphql_proto::close::FORBIDDEN,
                    reason: "Forbidden: token_expired".into(),
                };
                return self.graphql_close(c);
            }
            self.start_close(close::TOKEN_EXPIRED, "token expired", ClosedBy::Gateway);
        }
    }

    fn on_timer(&mut self) -> Option<Ending> {
        let now = Instant::now();
        if self.paused().is_some_and(|at| now >= at) {
            if let Err(end) = self.resume(now) {
                return Some(end);
            }
        }
        if let Phase::Open { .. } = self.phase {
            self.check_token();
        }
        if let Phase::Closing { .. } = self.phase {
            return (now >= self.heartbeat_at()).then(|| {
                self.end_or(Ending::closed(
                    close::ABNORMAL,
                    "closing handshake timed out",
                    ClosedBy::Gateway,
                ))
            });
        }
        let awaiting_pong = matches!(
            self.phase,
            Phase::Open {
                awaiting_pong: true
            }
        );
        // A paused reader cannot see the pong; the wait restarts on resuming.
        let paused = self.paused().is_some();
        if awaiting_pong && now >= self.heartbeat_at() && !paused {
            return Some(Ending {
                code: close::ABNORMAL,
                reason: "pong timeout".into(),
                by: ClosedBy::Gateway,
                resumable: true,
            });
        }
        if let Some(idle) = self.guard.shared.config.idle_timeout {
            if now >= self.idle_deadline(idle) && !paused {
                self.start_close(close::IDLE_TIMEOUT, "idle timeout", ClosedBy::Gateway);
                return None;
            }
        }
        if now >= self.heartbeat_at() {
            // Once a ping interval: what the stream keeps only while busy
            // goes back if it was not (before the ping uses it).
            self.stream.rest();
            self.set_heartbeat(now + self.guard.shared.config.pong_timeout);
            self.phase = Phase::Open {
                awaiting_pong: true,
            };
            self.guard
                .conn
                .send_control(&self.stream, PING.clone(), &self.guard.shared.metrics);
            if self.guard.conn.graphql == Some(Protocol::Legacy) {
                // The legacy protocol's own keep-alive, which its clients watch.
                self.guard.conn.push(
                    encode_frame(OpCode::Text, &graphql_proto::keep_alive()),
                    &self.guard.shared.metrics,
                );
            }
        }
        None
    }

    /// When reading resumes, if it is paused (a raw client over its rate).
    fn paused(&self) -> Option<Instant> {
        match self.phase {
            Phase::Open { .. } => self.inbound.paused_until(),
            // The client's close frame must be read.
            Phase::Closing { .. } => None,
        }
    }

    /// Ends a pause: the client gets a fresh pong window (its pong may
    /// have waited behind its messages), and the bytes already read are
    /// handled (which may pause it again).
    fn resume(&mut self, now: Instant) -> Result<(), Ending> {
        self.inbound.unpause();
        if let Phase::Open {
            awaiting_pong: true,
        } = self.phase
        {
            let later = self
                .guard
                .shared
                .timers
                .tick_of(now + self.guard.shared.config.pong_timeout);
            self.heartbeat = self.heartbeat.max(later);
        }
        self.decode_parked()
    }

    /// Queues our close frame and waits for the client's.
    fn start_close(&mut self, code: u16, reason: &str, by: ClosedBy) {
        if let Phase::Closing { .. } = self.phase {
            return;
        }
        if code == close::ORIGIN_BACKLOG {
            self.guard.shared.metrics.backlog_closes.inc();
        }
        self.guard
            .conn
            .seal_with(encode_close(code, reason), &self.guard.shared.metrics);
        self.guard
            .ending
            .get_or_insert_with(|| Box::new((Ending::closed(code, reason, by), 0)));
        self.closing(false);
    }

    /// Enters the closing phase, which lasts at most [`CLOSE_TIMEOUT`].
    fn closing(&mut self, peer_closed: bool) {
        self.phase = Phase::Closing { peer_closed };
        self.set_heartbeat(Instant::now() + CLOSE_TIMEOUT);
    }

    /// The ending already recorded (a closing handshake under way), or
    /// else `ending`.
    fn end_or(&mut self, ending: Ending) -> Ending {
        self.guard.ending.take().map_or(ending, |e| e.0)
    }

    /// Reads what the socket has (up to a budget) and handles every complete message.
    fn read_ready(&mut self) -> Result<(), Ending> {
        // Most reads keep nothing: a fresh decoder on the stack, boxed only
        // if it is to be kept.
        let mut kept = self.parked.take();
        let mut fresh = None;
        let parked = match kept.as_deref_mut() {
            Some(p) => p,
            None => fresh.insert(Parked {
                decoder: Decoder::new(self.guard.shared.config.max_message_size, None),
                buf: BytesMut::new(),
            }),
        };
        let Parked { decoder, buf } = parked;
        if buf.capacity() == 0 {
            *buf = pool::take();
        }
        let mut total = 0;
        let result = loop {
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(pool::READ_BUF);
            }
            match self.stream.try_read_some(buf) {
                Ok(0) => {
                    break Err(self.end_or(Ending::lost("connection closed without a close frame")))
                }
                Ok(n) => {
                    total += n;
                    self.guard.conn.bytes_in.fetch_add(n as u64, Relaxed);
                    self.guard.shared.metrics.bytes_in.inc_by(n as u64);
                    if let Err(end) = self.decode_buffered(decoder, buf) {
                        break Err(end);
                    }
                    if total >= READ_BUDGET || self.paused().is_some() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => break Err(self.failed(&e, "read failed")),
            }
        };
        if parked.settle() {
            self.parked = kept.or_else(|| fresh.map(Box::new));
        }
        result
    }

    /// How a read or write that failed ends the connection: lost, with
    /// `why`, or the reason a failed TLS session gives (docs/security.md,
    /// "TLS").
    fn failed(&mut self, e: &io::Error, why: &str) -> Ending {
        if e.kind() == io::ErrorKind::InvalidData {
            self.end_or(Ending::lost(&format!("TLS: {e}")))
        } else {
            self.end_or(Ending::lost(why))
        }
    }

    /// Decodes and handles the bytes parked (those that came with the
    /// handshake, or were read before a pause).
    fn decode_parked(&mut self) -> Result<(), Ending> {
        self.undecoded = false;
        let Some(mut parked) = self.parked.take() else {
            return Ok(());
        };
        let Parked { decoder, buf } = &mut *parked;
        let decoded = self.decode_buffered(decoder, buf);
        if parked.settle() {
            self.parked = Some(parked);
        }
        decoded
    }

    /// Decodes and handles every complete message in `buf`.
    fn decode_buffered(&mut self, decoder: &mut Decoder, buf: &mut BytesMut) -> Result<(), Ending> {
        loop {
            match decoder.decode(buf) {
                Ok(Some(msg)) => {
                    self.on_message(msg)?;
                    if self.paused().is_some() {
                        // The rest waits, undecoded, until reading resumes.
                        self.undecoded = true;
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    buf.clear();
                    match &mut self.phase {
                        Phase::Open { .. } => {
                            self.guard.shared.metrics.protocol_errors.inc();
                            self.start_close(e.close_code(), &e.to_string(), ClosedBy::Gateway);
                            // Nothing more will be read that we can trust.
                            self.closing(true);
                        }
                        // Our close is already out; the peer's reply may echo a
                        // code it may not send (e.g. 1012 after a drain). Either
                        // way nothing more will come: stop waiting for it.
                        Phase::Closing { peer_closed, .. } => *peer_closed = true,
                    }
                    return Ok(());
                }
            }
        }
    }

    fn on_message(&mut self, msg: Message) -> Result<(), Ending> {
        self.guard.shared.metrics.frames_in.inc();
        // Any frame proves the peer alive: the next ping an interval on.
        if let Phase::Open {
            awaiting_pong: true,
        } = self.phase
        {
            self.phase = Phase::Open {
                awaiting_pong: false,
            };
            self.set_heartbeat(Instant::now() + self.guard.shared.config.ping_interval);
        }
        let closing = matches!(self.phase, Phase::Closing { .. });
        if let (Message::Text(data) | Message::Binary(data), false) = (&msg, closing) {
            if !self.guard.conn.native {
                // Raw: taken, and the reader slows down instead.
                self.inbound.throttle(&self.guard.shared, data.len());
            } else {
                match self.inbound.admit(&self.guard.shared, data.len()) {
                    Verdict::Pass => {}
                    Verdict::Refuse => {
                        // Native: answered, not run.
                        let text = match &msg {
                            Message::Text(t) => Some(&t[..]),
                            _ => None,
                        };
                        Inbound::refuse_rate(&self.guard.shared, &self.guard.conn, text);
                        return Ok(());
                    }
                    Verdict::Close => {
                        self.guard.shared.metrics.rate_limited.inc();
                        self.start_close(
                            close::POLICY_VIOLATION,
                            "rate limit exceeded",
                            ClosedBy::Gateway,
                        );
                        return Ok(());
                    }
                }
            }
        }
        let graphql = self.guard.conn.graphql.is_some();
        match msg {
            Message::Text(_) | Message::Binary(_) if closing => {}
            Message::Text(data) if self.guard.conn.native => self.on_command(&data),
            Message::Text(data) if graphql => {
                self.count_in();
                let s = &self.guard.shared;
                if let Err(c) = s.commands.graphql.on_message(&self.guard.conn, &data) {
                    self.graphql_close(c);
                }
            }
            Message::Binary(_) if graphql => {
                self.count_in();
                self.graphql_close(crate::graphql::Graphql::bad_frame());
            }
            Message::Binary(_) if self.guard.conn.native => {
                let s = &self.guard.shared;
                s.metrics.native_error(ErrorCode::UnsupportedFrame);
                self.guard.conn.push(
                    frames::error_frame(
                        None,
                        ErrorCode::UnsupportedFrame,
                        "commands are JSON text frames",
                    ),
                    &s.metrics,
                );
            }
            Message::Text(data) => {
                self.count_in();
                self.on_data(Payload::Text(bytes_to_string(data)));
            }
            Message::Binary(data) => {
                self.count_in();
                self.on_data(Payload::Binary(data.to_vec()));
            }
            Message::Ping(p) => {
                if !closing {
                    self.guard.conn.send_control(
                        &self.stream,
                        encode_frame(OpCode::Pong, &p),
                        &self.guard.shared.metrics,
                    );
                }
            }
            Message::Pong(_) => {}
            Message::Close(code, reason) => match &mut self.phase {
                Phase::Open { .. } => {
                    let reason = String::from_utf8_lossy(&reason).into_owned();
                    let echo = match code {
                        Some(c) => encode_close(c, ""),
                        None => encode_frame(OpCode::Close, &[]),
                    };
                    self.guard.conn.seal_with(echo, &self.guard.shared.metrics);
                    let ending =
                        Ending::closed(code.unwrap_or(close::NO_STATUS), &reason, ClosedBy::Client);
                    self.guard.ending = Some(Box::new((ending, 0)));
                    self.closing(true);
                }
                Phase::Closing { peer_closed, .. } => *peer_closed = true,
            },
        }
        Ok(())
    }

    /// Closes a GraphQL connection as its protocol says (4400 …), or as its
    /// client asked (`connection_terminate`, 1000).
    fn graphql_close(&mut self, c: crate::graphql::Close) {
        let by = if c.code == close::NORMAL {
            ClosedBy::Client
        } else {
            self.guard.shared.commands.graphql.count_close(c.code);
            ClosedBy::Gateway
        };
        // The reason may quote the client (an id, a type): the close frame
        // and the origin's `disconnect` get at most 123 bytes of it.
        self.start_close(c.code, crate::graphql::truncated(&c.reason, 123), by);
    }

    /// Counts a message from the client (which also proves it active).
    fn count_in(&mut self) {
        self.last_message = self.guard.shared.timers.tick_of(Instant::now());
        Inbound::count_in(&self.guard.shared, &self.guard.conn);
    }

    /// A native protocol command.
    fn on_command(&mut self, text: &[u8]) {
        self.count_in();
        if self
            .inbound
            .command(&self.guard.shared, &self.guard.conn, text)
            .is_err()
        {
            self.start_close(close::ORIGIN_BACKLOG, "origin backlog", ClosedBy::Gateway);
        }
    }

    /// A message for the origin (the connection is closed when the
    /// origin's queue is full).
    fn on_data(&mut self, payload: Payload) {
        if self
            .inbound
            .data(&self.guard.shared, &self.guard.conn, payload)
            .is_err()
        {
            self.start_close(close::ORIGIN_BACKLOG, "origin backlog", ClosedBy::Gateway);
        }
    }
}

fn bytes_to_string(b: Bytes) -> String {
    // The decoder has validated text messages as UTF-8.
    String::from_utf8(b.to_vec()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Commands;
    use crate::conn::ConnInit;
    use crate::origin::DevOrigin;
    use crate::Config;

    /// A dev-mode edge and a client socket connected to nothing that answers.
    async fn edge_and_socket() -> (Arc<Edge>, tokio::net::TcpStream) {
        let commands = Commands::new(
            Config::default(),
            switchboard_proto::NodeId::random(),
            Arc::new(DevOrigin),
            Arc::new(crate::lease::Lease::unlimited()),
            None,
        )
        .unwrap();
        let shared = Arc::new(Edge::new(Arc::new(commands), None, 0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (shared, client)
    }

    /// Every accepted socket's handshake is a task of its own, whose future
    /// tokio copies as it spawns it: the rare paths (fallbacks, GraphQL, a
    /// first command, a token, a resume, the origin's answer, a refusal's
    /// last words) are boxed, so that it stays small (5.8 KB before).
    #[tokio::test]
    async fn handshake_task_state_is_small() {
        let (shared, client) = edge_and_socket().await;
        let remote = client.local_addr().unwrap();
        let (socket, _) = shared.track_socket(remote.ip());
        let admission = crate::edge::handshake::Admission {
            per_ip: 1,
            rate_ok: true,
            sockets: 1,
        };
        let fut = crate::edge::handshake::handle(
            shared.clone(),
            crate::conn::stream::ClientStream::Tcp(client),
            remote,
            socket,
            admission,
        );
        let size = std::mem::size_of_val(&fut);
        eprintln!("handshake future: {size} bytes");
        assert!(size <= 2560, "handshake future is {size} bytes");
    }

    /// The connection task is what a million idle connections multiply: its
    /// future (the whole task state, inline) must stay small.
    #[tokio::test]
    async fn connection_task_state_is_small() {
        let (shared, client) = edge_and_socket().await;
        let remote = client.local_addr().unwrap();
        let conn = Arc::new(Conn::new(ConnInit {
            id: switchboard_proto::ConnectionId::generate(&shared.node),
            home: shared.commands.sessions.home().clone(),
            remote,
            path: "/".into(),
            user_id: None,
            metadata: None,
            user_slot: None,
            token: None,
            token_expires_ms: 0,
            subprotocol: None,
            native: false,
            graphql: None,
            transport: switchboard_proto::origin::Transport::Websocket,
            deflate: false,
            session: false,
        }));
        let (socket, _) = shared.track_socket(remote.ip());
        let disconnect = DisconnectGuard::new(shared.clone(), conn);
        let fut = run(
            crate::conn::stream::ClientStream::Tcp(client),
            disconnect,
            None,
            Decoder::new(1 << 20, None),
            socket,
            0,
        );
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        // The largest part of an idle connection's memory (docs/benchmarks.md):
        // catch regressions here, measure with the bench tool. tokio
        // allocates a task in 128-byte steps (its cell is cache-line
        // aligned): with its header (32 bytes), scheduler and id (16), the
        // task tracker's token (8), the stage's tag (8) and its trailer (48),
        // a future of up to 144 bytes fits a 256-byte cell; 8 more cost a
        // whole step, 128 bytes per connection.
        assert!(size <= 144, "connection future is {size} bytes");
    }
}
