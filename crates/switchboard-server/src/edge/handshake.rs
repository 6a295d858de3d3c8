//! The opening handshake of one client socket: read the request head, check
//! it and the node's limits, ask the origin (`connect`), then answer 101 and
//! hand over to the connection task — or answer with an error status and a
//! JSON body. A native client without a token is answered 101 first and
//! owes an `authenticate` command before the origin is asked (refusals are
//! then close frames). Every refusal is listed in `docs/protocol.md`.

use super::{Edge, SocketGuard};
use crate::channels::Ack;
use crate::clock::now_ms;
use crate::conn::pool;
use crate::conn::stream::ClientStream;
use crate::conn::{CloseRequest, Conn, ConnInit, Outgoing};
use crate::edge::{connection, fallback, graphql};
use crate::origin::ask::{ask, event_id, log_failure, AskError};
use crate::origin::{ConnectDecision, OriginError};
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use switchboard_proto::graphql::{self as graphql_proto, Protocol};
use switchboard_proto::native;
use switchboard_proto::origin::{ClosedBy, ConnectEvent, Event, Transport};
use switchboard_proto::ws::close;
use switchboard_proto::ws::decoder::{Decoder, Message};
use switchboard_proto::ws::deflate::DeflateParams;
use switchboard_proto::ws::handshake::{self as hs, HeadError, Request, UpgradeError};
use switchboard_proto::ConnectionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A refusal: HTTP status, stable code, message, extra header lines.
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) extra: &'static str,
    pub(crate) metric: &'static str,
}

pub(crate) fn refuse(
    status: u16,
    code: &'static str,
    message: impl Into<String>,
    metric: &'static str,
) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
        extra: "",
        metric,
    }
}

/// Longest time an answered refusal stays open, reading what the client
/// still sends, so that closing does not reset the connection before the
/// client has read the answer.
pub(crate) const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The answer to a client that has not sent its whole request head within
/// `handshake-timeout`.
fn timeout_refusal(shared: &Edge) -> Refusal {
    refuse(
        408,
        "handshake_timeout",
        format!(
            "no complete request head within {}",
            humantime::format_duration(shared.config.handshake_timeout)
        ),
        "timeout",
    )
}

/// What was decided about a socket at accept, before reading from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admission {
    /// Sockets the client's address holds, this one included.
    pub(crate) per_ip: u32,
    /// Within `max-handshakes-per-ip`.
    pub(crate) rate_ok: bool,
    /// Sockets the node held when this one was accepted, this one included:
    /// read at accept, so sockets are judged in the order they came.
    pub(crate) sockets: usize,
}

/// Runs the handshake of one accepted socket, then starts the connection task.
pub(crate) async fn handle(
    shared: Arc<Edge>,
    mut stream: ClientStream,
    remote: SocketAddr,
    socket: SocketGuard,
    admission: Admission,
) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    if let Some(refusal) = over_capacity(&shared, admission) {
        // Decided before reading anything, and counted now: whatever the
        // client does next, it was refused.
        shared.metrics.handshake(refusal.metric);
        // From here on the socket holds no slot of the caps (the node's and
        // its address's), only one of the bounded refusing window: refused
        // sockets waiting for their head do not turn away the clients that
        // come once slots free up.
        drop(socket);
        if shared.refusing.fetch_add(1, Relaxed) < shared.capacity.refusing {
            // The client gets its answer once it has sent its head (so that
            // closing does not reset the connection before it reads it), or
            // at the handshake timeout without it.
            let mut buf = BytesMut::new();
            let head =
                tokio::time::timeout_at(deadline, read_head(&mut stream, &mut buf, &shared.config))
                    .await;
            if !matches!(head, Ok(Err(None))) {
                let linger = tokio::time::Instant::now() + REFUSAL_LINGER;
                write_refusal(&mut stream, refusal, linger).await;
            }
        } else {
            // Too many being answered: answered without waiting, if the
            // socket buffer takes it.
            refuse_now(&stream, &refusal);
        }
        shared.refusing.fetch_sub(1, Relaxed);
        return;
    }
    // Empty until the socket is readable: a silent socket holds no buffer.
    let mut buf = BytesMut::new();
    let head =
        tokio::time::timeout_at(deadline, read_head(&mut stream, &mut buf, &shared.config)).await;
    match head {
        Err(_) => {
            // Slow or silent client (slowloris): 408, then closed.
            let linger = tokio::time::Instant::now() + REFUSAL_LINGER;
            answer_refusal(&shared, &mut stream, timeout_refusal(&shared), linger).await
        }
        Ok(Err(None)) => {} // closed or I/O error before a full head
        Ok(Err(Some(refusal))) => answer_refusal(&shared, &mut stream, refusal, deadline).await,
        Ok(Ok((req, head_len))) => {
            let _ = buf.split_to(head_len);
            let head = fallback::Head {
                req,
                remote,
                deadline,
            };
            after_head(shared, stream, buf, head, socket).await;
        }
    }
}

/// Waits for the next request on a connection kept alive after an HTTP
/// fallback's answer: closed quietly when none comes within
/// `handshake-timeout`.
pub(crate) async fn next_request(
    shared: Arc<Edge>,
    mut stream: ClientStream,
    remote: SocketAddr,
    socket: SocketGuard,
    mut buf: BytesMut,
) {
    let waiting = tokio::time::Instant::now() + shared.config.handshake_timeout;
    // A whole head may have come with the last request.
    let head = match hs::parse_request_with(&buf, shared.config.max_header_count) {
        Ok(Some(done)) => Ok(Ok(done)),
        Err(_) => Ok(Err(Some(refuse(
            400,
            "bad_request",
            "malformed HTTP request",
            "bad_request",
        )))),
        Ok(None) => {
            tokio::time::timeout_at(waiting, read_head(&mut stream, &mut buf, &shared.config)).await
        }
    };
    // The request has its whole `handshake-timeout`, however long the
    // connection waited for it.
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    match head {
        Err(_) | Ok(Err(None)) => {}
        Ok(Err(Some(refusal))) => answer_refusal(&shared, &mut stream, refusal, deadline).await,
        Ok(Ok((req, head_len))) => {
            let _ = buf.split_to(head_len);
            // A new connection on a kept socket is a handshake like any:
            // within `max-handshakes-per-ip` (other requests are not).
            let opening = req.header_has_token("upgrade", "websocket") || fallback::opens(&req);
            let over_rate = opening
                && shared
                    .handshake_rate
                    .as_ref()
                    .is_some_and(|r| !r.admit(remote.ip(), std::time::Instant::now()));
            if over_rate {
                let r = Refusal {
                    status: 429,
                    code: "too_many_handshakes",
                    message: "too many handshakes from this address; retry in a second".into(),
                    extra: "Retry-After: 1\r\n",
                    metric: "too_many_handshakes",
                };
                return answer_refusal(&shared, &mut stream, r, deadline).await;
            }
            let head = fallback::Head {
                req,
                remote,
                deadline,
            };
            after_head(shared, stream, buf, head, socket).await;
        }
    }
}

/// Goes on with a request whose head is read (`buf` holds what followed
/// it): a WebSocket handshake, or an HTTP fallback's request.
async fn after_head(
    shared: Arc<Edge>,
    mut stream: ClientStream,
    buf: BytesMut,
    head: fallback::Head,
    socket: SocketGuard,
) {
    if !head.req.header_has_token("upgrade", "websocket") {
        // Not a WebSocket: an HTTP fallback's request, or a 426.
        return Box::pin(fallback::serve(shared, stream, buf, head, socket)).await;
    }
    let fallback::Head {
        req,
        remote,
        deadline,
    } = head;
    let decided = match open(&shared, &req) {
        Ok(opening) if opening.graphql.is_some() => {
            let pending = Pending {
                stream,
                buf,
                req,
                remote,
                deadline,
                socket,
            };
            return Box::pin(graphql::handshake(shared, pending, opening)).await;
        }
        Ok(opening) => Box::pin(decide(&shared, &req, remote, deadline, opening)).await,
        Err(r) => Err(r),
    };
    let result = match decided {
        Ok(Decision::Accepted(accepted)) => Ok(accepted),
        Ok(Decision::FirstCommand(opening)) => {
            let pending = Pending {
                stream,
                buf,
                req,
                remote,
                deadline,
                socket,
            };
            return Box::pin(first_command(shared, pending, opening)).await;
        }
        Err(r) => Err(r),
    };
    let Accepted {
        conn,
        response,
        deflate,
        origin_seq,
        resumed,
        ..
    } = match result {
        Ok(accepted) => accepted,
        Err(r) => return answer_refusal(&shared, &mut stream, r, deadline).await,
    };
    shared.metrics.handshake("accepted");
    // From here on the origin has accepted: the guard sends the connection's
    // one `disconnect` however it ends, even if this task is dropped.
    let disconnect = connection::DisconnectGuard::new(shared.clone(), conn.clone());
    // The 101 and what is queued behind it (the `connected` push) leave
    // in one write; what the socket did not take goes as before.
    let mut rest = &response[..];
    let sent = match conn.flush_behind(&mut rest, &stream, &shared.metrics) {
        Ok(_) if rest.is_empty() => Ok(Ok(())),
        Ok(_) => tokio::time::timeout_at(deadline, stream.write_all(rest)).await,
        Err(e) => Ok(Err(e)),
    };
    match sent {
        Ok(Ok(())) => {}
        _ => {
            let why = "connection lost during handshake";
            // A new session's client never got its resume token: it ends.
            let ending = if resumed {
                crate::sessions::Ending::lost(why)
            } else {
                crate::sessions::Ending::closed(close::ABNORMAL, why, ClosedBy::Network)
            };
            disconnect.finish(ending, origin_seq);
            return;
        }
    }
    let decoder = Decoder::new(shared.config.max_message_size, deflate);
    start(
        &shared, stream, disconnect, buf, decoder, socket, origin_seq,
    );
}

/// Starts the task of an accepted connection, whose 101 is sent: `buf`
/// holds the bytes that came after the handshake.
pub(super) fn start(
    shared: &Arc<Edge>,
    stream: ClientStream,
    disconnect: connection::DisconnectGuard,
    buf: BytesMut,
    decoder: Decoder,
    socket: SocketGuard,
    origin_seq: u64,
) {
    if shared.commands.draining.load(Relaxed) {
        disconnect.conn().request_close(CloseRequest {
            code: close::SERVICE_RESTART,
            reason: "server restart, reconnect".into(),
            by: ClosedBy::Gateway,
            flush_first: true,
            takeover: false,
        });
    }
    let leftover = if buf.is_empty() {
        pool::give(buf);
        None
    } else {
        Some(buf)
    };
    // A task of its own, so the connection holds none of the handshake's
    // state while it lives.
    shared.conn_tasks.spawn(connection::run(
        stream, disconnect, leftover, decoder, socket, origin_seq,
    ));
}

/// A native client that has been answered 101 without a token, and owes
/// its `authenticate` command.
pub(super) struct Pending {
    pub(super) stream: ClientStream,
    /// Bytes after the request head.
    pub(super) buf: BytesMut,
    pub(super) req: Request,
    pub(super) remote: SocketAddr,
    /// The handshake's deadline, which the first command must also meet.
    pub(super) deadline: tokio::time::Instant,
    pub(super) socket: SocketGuard,
}

/// The in-band half of a handshake: answers 101, reads the first frame
/// (which must be `authenticate` with a valid token, within the handshake's
/// deadline), then asks the origin as a handshake with a token would. Any
/// failure is a close frame: 4005 for the token, 4006 for a refusal after it.
async fn first_command(shared: Arc<Edge>, p: Pending, opening: Opening) {
    let Pending {
        mut stream,
        mut buf,
        req,
        remote,
        deadline,
        socket,
    } = p;
    let sent = tokio::time::timeout_at(deadline, stream.write_all(&opening.response())).await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return, // the client is gone
        Err(_) => {
            // A client that does not read: no room for a close frame either.
            shared.metrics.handshake("timeout");
            return;
        }
    }
    let mut decoder = Decoder::new(shared.config.max_message_size, opening.deflate);
    let first =
        tokio::time::timeout_at(deadline, read_message(&mut stream, &mut buf, &mut decoder)).await;
    let command = match first {
        Err(_) => {
            shared.metrics.handshake("timeout");
            let why = "token_missing: no authenticate command within handshake-timeout";
            return close_unopened(&mut stream, close::AUTHENTICATION_FAILED, why).await;
        }
        Ok(Err(FirstFrame::Closed)) => return,
        Ok(Err(FirstFrame::TooLarge)) => {
            shared.metrics.handshake("unauthorized");
            let why = "token_malformed: the first message must be one text frame under 16 KiB";
            return close_unopened(&mut stream, close::AUTHENTICATION_FAILED, why).await;
        }
        Ok(Ok(Message::Text(text))) => native::decode_command(&text).ok(),
        Ok(Ok(_)) => None,
    };
    let Some(native::Command {
        id,
        body: native::CommandBody::Authenticate { token },
    }) = command
    else {
        shared.metrics.handshake("unauthorized");
        let why = "token_missing: the first command must be authenticate";
        return close_unopened(&mut stream, close::AUTHENTICATION_FAILED, why).await;
    };
    let Some(auth) = &shared.commands.auth else {
        return; // decide() defers only when tokens are checked
    };
    let identity = match tokio::time::timeout_at(deadline, auth.verify(&token)).await {
        Ok(Ok(identity)) => identity,
        Ok(Err(e)) => {
            tracing::debug!(%remote, code = e.code(), "client token refused");
            shared.metrics.handshake("unauthorized");
            let why = format!("{}: {e}", e.code());
            return close_unopened(&mut stream, close::AUTHENTICATION_FAILED, &why).await;
        }
        Err(_) => {
            shared.metrics.handshake("unauthorized");
            let why = "auth_unavailable: the signing keys could not be fetched in time";
            return close_unopened(&mut stream, close::TRY_AGAIN_LATER, why).await;
        }
    };
    let expires_at_ms = identity.expires_at_ms().unwrap_or(0);
    let cookies = parse_cookies(&req);
    let conn = match admit(
        &shared,
        &req,
        remote,
        deadline,
        opening,
        cookies,
        Some(identity),
    )
    .await
    {
        Ok(Accepted { conn, .. }) => conn,
        Err(r) => {
            shared.metrics.handshake(r.metric);
            let why = format!("{}: {}", r.code, r.message);
            return close_unopened(&mut stream, close::REFUSED, &why).await;
        }
    };
    shared.metrics.handshake("accepted");
    let disconnect = connection::DisconnectGuard::new(shared.clone(), conn.clone());
    #[derive(serde::Serialize)]
    struct Authenticated {
        expires_at_ms: u64,
    }
    // After the `connected` push, which `admit` queued first.
    conn.push(
        crate::frames::result_frame(id, &Authenticated { expires_at_ms }),
        &shared.metrics,
    );
    start(&shared, stream, disconnect, buf, decoder, socket, 0);
}

/// Most bytes a client may send before its `authenticate` command is
/// complete (a token is a few hundred bytes to a few KiB).
const FIRST_FRAME_MAX: usize = 16 << 10;

/// Why no first message could be read.
pub(super) enum FirstFrame {
    /// The stream ended, failed or broke the protocol.
    Closed,
    /// Over [`FIRST_FRAME_MAX`] bytes without a whole message.
    TooLarge,
}

/// Reads until `decoder` yields a data or close message (pings and pongs
/// are skipped), buffering at most [`FIRST_FRAME_MAX`] bytes.
pub(super) async fn read_message(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    decoder: &mut Decoder,
) -> Result<Message, FirstFrame> {
    loop {
        match decoder.decode(buf) {
            Ok(Some(Message::Ping(_) | Message::Pong(_))) => continue,
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(_) => return Err(FirstFrame::Closed),
        }
        if buf.len() >= FIRST_FRAME_MAX || decoder.in_message() {
            // A fragmented first message, or one frame larger than a
            // command with a token needs.
            return Err(FirstFrame::TooLarge);
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(FirstFrame::Closed),
            Ok(_) => {}
        }
    }
}

/// Closes a WebSocket that never became a connection: a close frame with
/// `code` and `reason`, then (briefly) whatever the client still sends.
pub(super) async fn close_unopened(stream: &mut ClientStream, code: u16, reason: &str) {
    let frame = switchboard_proto::ws::frame::encode_close(code, reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&frame).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

/// The refusal for a socket over `max-connections`, the per-IP cap or the
/// per-IP handshake rate.
fn over_capacity(shared: &Edge, admission: Admission) -> Option<Refusal> {
    let per_ip = admission.per_ip;
    let cfg = &shared.config;
    if admission.sockets > shared.capacity.max_connections {
        return Some(capacity_refusal());
    }
    if cfg.max_connections_per_ip > 0 && per_ip as usize > cfg.max_connections_per_ip {
        return Some(refuse(
            503,
            "too_many_connections_from_ip",
            "per-address connection limit reached",
            "too_many_connections_from_ip",
        ));
    }
    if !admission.rate_ok {
        return Some(Refusal {
            status: 429,
            code: "too_many_handshakes",
            message: "too many connection attempts from this address; retry later".into(),
            extra: "Retry-After: 1\r\n",
            metric: "too_many_handshakes",
        });
    }
    None
}

/// Counts a refusal and answers it (see [`write_refusal`]).
pub(crate) async fn answer_refusal(
    shared: &Edge,
    stream: &mut ClientStream,
    r: Refusal,
    deadline: tokio::time::Instant,
) {
    shared.metrics.handshake(r.metric);
    let linger = deadline.min(tokio::time::Instant::now() + REFUSAL_LINGER);
    write_refusal(stream, r, linger).await;
}

/// Answers a refusal without waiting: what the client sent so far is read
/// and dropped, then the answer is written if the socket buffer takes it
/// at once. For sockets the node cannot spend a task on.
fn refuse_now(stream: &ClientStream, r: &Refusal) {
    let resp = hs::error_response(r.status, r.code, &r.message, r.extra);
    let mut sink = [0u8; 4096];
    while matches!(stream.try_read_buf(&mut &mut sink[..]), Ok(n) if n > 0) {}
    let _ = stream.try_write(&resp);
}

/// Answers 503 `over_capacity` on a plain TCP socket without waiting (see
/// [`refuse_now`]); the accept loop's answer when it cannot take a socket.
pub(crate) fn over_capacity_now(tcp: tokio::net::TcpStream) {
    refuse_now(&ClientStream::Tcp(tcp), &capacity_refusal());
}

/// 503 `over_capacity`.
fn capacity_refusal() -> Refusal {
    refuse(
        503,
        "over_capacity",
        "connection limit reached",
        "over_capacity",
    )
}

/// Writes a refusal, then reads (and discards) what the client still sends
/// until `linger`, so that closing does not reset the connection before the
/// client has read the answer.
async fn write_refusal(stream: &mut ClientStream, r: Refusal, linger: tokio::time::Instant) {
    let resp = hs::error_response(r.status, r.code, &r.message, r.extra);
    Box::pin(write_and_close(stream, &resp, linger)).await;
}

/// Writes a last answer, then reads (and discards) what the client still
/// sends until `linger` (see [`write_refusal`]).
pub(crate) async fn write_and_close(
    stream: &mut ClientStream,
    resp: &[u8],
    linger: tokio::time::Instant,
) {
    let _ = tokio::time::timeout_at(linger, async {
        stream.write_all(resp).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut left = 64 << 10;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

/// Reads until a whole request head is in `buf`, which is borrowed from the
/// pool only once the socket is readable. `Err(None)`: the socket closed.
async fn read_head(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    config: &crate::Config,
) -> Result<(Request, usize), Option<Refusal>> {
    let (max, max_headers) = (config.max_header_bytes, config.max_header_count);
    let too_large = || {
        Some(refuse(
            431,
            "header_too_large",
            format!("request head over {max} bytes"),
            "header_too_large",
        ))
    };
    // The first read is tried at once: a client's request usually follows
    // its connection so closely that the poller has already seen it by the
    // time the task runs, and it is read without waiting for another turn
    // (when the poller has not, the try costs no system call).
    let mut wait = false;
    loop {
        if wait {
            stream.readable().await.map_err(|_| None)?;
        }
        wait = true;
        if buf.capacity() == 0 {
            *buf = pool::take();
        } else if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024);
        }
        match stream.try_read_some(buf) {
            Ok(0) => return Err(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Nothing yet: a silent socket holds no buffer.
                if buf.is_empty() {
                    pool::give(std::mem::take(buf));
                }
                continue;
            }
            Err(_) => return Err(None),
        }
        match hs::parse_request_with(buf, max_headers) {
            // A whole head can arrive in one read: check its size here too.
            Ok(Some((_, len))) if len > max => return Err(too_large()),
            Ok(Some(done)) => return Ok(done),
            Ok(None) if buf.len() >= max => return Err(too_large()),
            Ok(None) => {}
            Err(HeadError::TooManyHeaders) => {
                return Err(Some(refuse(
                    431,
                    "header_too_large",
                    "too many header lines",
                    "header_too_large",
                )))
            }
            Err(HeadError::Malformed) => {
                return Err(Some(refuse(
                    400,
                    "bad_request",
                    "malformed HTTP request",
                    "bad_request",
                )))
            }
        }
    }
}

/// An accepted connection, registered, its origin's `connect` answered.
pub(crate) struct Accepted {
    pub(crate) conn: Arc<Conn>,
    /// The 101 answer (empty for a fallback, which answers itself).
    response: Vec<u8>,
    deflate: Option<DeflateParams>,
    /// The last `message` event's `seq` (a resumed session's).
    pub(crate) origin_seq: u64,
    /// A resumed session (whose client has its resume token already).
    pub(crate) resumed: bool,
    /// The origin's `connection_ack` payload (GraphQL).
    pub(super) ack_payload: Option<serde_json::Value>,
}

/// A valid opening the node can take, before the client's identity is known.
pub(crate) struct Opening {
    /// The WebSocket upgrade; `None` for an HTTP fallback.
    upgrade: Option<hs::Upgrade>,
    transport: Transport,
    /// The subprotocol chosen (the native one or a configured raw one).
    subprotocol: Option<String>,
    is_native: bool,
    /// permessage-deflate, if offered and enabled.
    pub(super) deflate: Option<DeflateParams>,
    /// Why the session the client asked to resume could not be: its
    /// `connected` push says so.
    refused: Option<native::ResumeError>,
    /// A GraphQL subprotocol was chosen: the origin is asked at
    /// `connection_init` (`docs/graphql.md`).
    pub(super) graphql: Option<Protocol>,
    /// The `connection_init` payload, for the `connect` event.
    pub(super) init_payload: Option<serde_json::Value>,
}

impl Opening {
    /// The opening of an HTTP fallback: SSE and long-polling speak the
    /// native protocol; a plain EventSource stream gets its pushes too
    /// (and turns them into events), but has no session.
    pub(crate) fn fallback(
        shared: &Edge,
        req: &Request,
        transport: Transport,
    ) -> Result<Self, Refusal> {
        check_node(shared, req)?;
        let plain = transport == Transport::Eventsource;
        Ok(Self {
            upgrade: None,
            transport,
            subprotocol: (!plain).then(|| native::SUBPROTOCOL.to_owned()),
            is_native: true,
            deflate: None,
            refused: None,
            graphql: None,
            init_payload: None,
        })
    }

    /// The 101 answer (empty for a fallback).
    pub(super) fn response(&self) -> Vec<u8> {
        let Some(upgrade) = &self.upgrade else {
            return Vec::new();
        };
        let ext = self.deflate.map(|d| d.response_header());
        hs::switching_protocols(&upgrade.key, self.subprotocol.as_deref(), ext.as_deref())
    }

    /// A session may resume on it (native, and not a subscribe-only stream).
    fn resumable(&self) -> bool {
        self.is_native && self.transport != Transport::Eventsource
    }

    /// A client without a token may authenticate in-band (native WebSocket).
    fn first_command(&self) -> bool {
        self.is_native && self.upgrade.is_some()
    }
}

/// What the handshake decided.
pub(crate) enum Decision {
    Accepted(Accepted),
    /// A native client without a token: it is to send `authenticate` first.
    FirstCommand(Opening),
}

/// Authenticates the client, resumes its session or asks the origin, and
/// registers the connection.
pub(crate) async fn decide(
    shared: &Arc<Edge>,
    req: &Request,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
    mut opening: Opening,
) -> Result<Decision, Refusal> {
    let cookies = parse_cookies(req);
    // A resume without the token a new connection would need.
    let mut token_missing = false;
    let identity = match &shared.commands.auth {
        None => None,
        Some(auth) => {
            let authenticate = Box::pin(auth.authenticate(req, &cookies));
            match tokio::time::timeout_at(deadline, authenticate).await {
                Ok(Ok(identity)) => identity,
                Ok(Err(crate::admission::tokens::AuthError::Missing(_)))
                    if opening.resumable() && query_param(&req.query, "resume").is_some() =>
                {
                    // The resume token stands for the session's identity.
                    token_missing = true;
                    None
                }
                Ok(Err(crate::admission::tokens::AuthError::Missing(_)))
                    if opening.first_command() =>
                {
                    return Ok(Decision::FirstCommand(opening));
                }
                Ok(Err(e)) => {
                    tracing::debug!(%remote, code = e.code(), "client token refused");
                    return Err(Refusal {
                        status: e.status(),
                        code: e.code(),
                        message: e.to_string(),
                        extra: "WWW-Authenticate: Bearer\r\n",
                        metric: "unauthorized",
                    });
                }
                Err(_) => {
                    return Err(refuse(
                        503,
                        "auth_unavailable",
                        "the signing keys could not be fetched in time; retry later",
                        "unauthorized",
                    ))
                }
            }
        }
    };
    if let (true, Some(token)) = (opening.resumable(), query_param(&req.query, "resume")) {
        match Box::pin(resume(
            shared,
            req,
            remote,
            deadline,
            &opening,
            token,
            identity.as_ref(),
        ))
        .await
        {
            Ok(accepted) => return Ok(Decision::Accepted(accepted)),
            Err(refused) => {
                if token_missing && !opening.first_command() {
                    return Err(Refusal {
                        status: 401,
                        code: "token_missing",
                        message: format!(
                            "the session cannot resume ({}), and a new one needs a token",
                            refused.message
                        ),
                        extra: "WWW-Authenticate: Bearer\r\n",
                        metric: "unauthorized",
                    });
                }
                if token_missing {
                    // A new session needs a token like any connection.
                    return Ok(Decision::FirstCommand(Opening {
                        refused: Some(refused),
                        ..opening
                    }));
                }
                opening.refused = Some(refused);
            }
        }
    }
    admit(shared, req, remote, deadline, opening, cookies, identity)
        .await
        .map(Decision::Accepted)
}

/// Query parameters that are the client's alone, not passed to the origin:
/// the first two for every transport, the others for the HTTP fallbacks.
const PRIVATE_PARAMS: &[&str] = &["resume", "received", "session", "cursor"];

/// The value of a query parameter (as sent: resume tokens and numbers
/// need no decoding).
pub(crate) fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        pair.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

/// `query` without the parameters `names`.
fn without_params(query: &str, names: &[&str]) -> String {
    query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            !names.contains(&name)
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Resumes the session named by `token` (`?resume=`) on this socket: no
/// `connect` is asked; the client gets its session back with the direct
/// messages after `?received=`.
async fn resume(
    shared: &Arc<Edge>,
    req: &Request,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
    opening: &Opening,
    token: &str,
    identity: Option<&crate::admission::tokens::Identity>,
) -> Result<Accepted, native::ResumeError> {
    let commands = &shared.commands;
    let deflate = opening.deflate.is_some_and(|d| d.compresses_outbound());
    // A session held by another node of the cluster comes here first.
    let received = query_param(&req.query, "received");
    crate::commands::handoff::pull(commands, token, received, deadline)
        .await
        .map_err(|e| commands.sessions.refused(e))?;
    let (conn, attached) = commands
        .sessions
        .resume(
            token,
            query_param(&req.query, "received"),
            identity,
            (remote, deflate),
            deadline,
            |conn, channels| {
                crate::commands::native::connected_frame(
                    commands,
                    conn,
                    crate::commands::native::Opened::Resumed { channels },
                )
            },
        )
        .await?;
    conn.set_transport(opening.transport);
    shared
        .metrics
        .by_transport(opening.transport.as_str())
        .inc();
    commands
        .sessions
        .resumed(&conn, &attached, &remote.to_string());
    tracing::debug!(connection = %conn.id(), %remote, "session resumed");
    Ok(Accepted {
        response: opening.response(),
        conn,
        deflate: opening.deflate,
        origin_seq: attached.origin_seq,
        resumed: true,
        ack_payload: None,
    })
}

/// Checks the upgrade request and the node's state, and picks the
/// subprotocol and compression.
fn open(shared: &Edge, req: &Request) -> Result<Opening, Refusal> {
    let cfg = &shared.config;
    let upgrade = hs::validate_upgrade(req).map_err(|e| match e {
        UpgradeError::NotUpgrade => Refusal {
            status: 426,
            code: "upgrade_required",
            message: "this endpoint only accepts WebSocket connections".into(),
            extra: "Upgrade: websocket\r\n",
            metric: "upgrade_required",
        },
        UpgradeError::BadVersion => Refusal {
            status: 426,
            code: "unsupported_version",
            message: "only WebSocket version 13 is supported".into(),
            extra: "Sec-WebSocket-Version: 13\r\n",
            metric: "bad_request",
        },
        UpgradeError::BadMethod | UpgradeError::BadKey => {
            refuse(400, "bad_request", e.to_string(), "bad_request")
        }
    })?;
    check_node(shared, req)?;
    // The client's first offer the gateway speaks: the native protocol or
    // one of the configured raw subprotocols; GraphQL before a raw one.
    let mut subprotocol = upgrade
        .protocols
        .iter()
        .find(|p| *p == native::SUBPROTOCOL || cfg.subprotocol.iter().any(|s| s == *p))
        .cloned();
    let offered = |name: &str| upgrade.protocols.iter().any(|p| p == name);
    let graphql = [graphql_proto::MODERN, graphql_proto::LEGACY]
        .into_iter()
        .find(|p| offered(p))
        .and_then(Protocol::of)
        .filter(|_| !offered(native::SUBPROTOCOL))
        // Without an endpoint, only for a client that offers nothing
        // else it could use: it is closed with 4406.
        .filter(|_| shared.commands.graphql.enabled() || subprotocol.is_none());
    if let Some(p) = graphql {
        subprotocol = Some(p.name().to_owned());
    }
    if subprotocol.is_none() {
        if let Some(v) = upgrade
            .protocols
            .iter()
            .find(|p| p.starts_with(native::SUBPROTOCOL_PREFIX))
        {
            return Err(refuse(
                400,
                "unsupported_protocol",
                format!(
                    "`{v}` is not a protocol version this gateway speaks; it speaks `{}`",
                    native::SUBPROTOCOL
                ),
                "bad_request",
            ));
        }
    }
    let is_native = subprotocol.as_deref() == Some(native::SUBPROTOCOL);
    let deflate = if cfg.permessage_deflate {
        upgrade.deflate
    } else {
        None
    };
    Ok(Opening {
        upgrade: Some(upgrade),
        transport: Transport::Websocket,
        subprotocol,
        is_native,
        deflate,
        refused: None,
        graphql,
        init_payload: None,
    })
}

/// Whether the node takes a new connection from this request's page: not
/// draining, the origin keeping up, an allowed `Origin`.
fn check_node(shared: &Edge, req: &Request) -> Result<(), Refusal> {
    if shared.commands.draining.load(Relaxed) {
        return Err(refuse(
            503,
            "draining",
            "this node is shutting down; retry",
            "draining",
        ));
    }
    if !shared
        .origin
        .dispatcher
        .has_room(shared.config.max_message_size)
    {
        return Err(refuse(
            503,
            "origin_backlog",
            "the origin is not keeping up; retry later",
            "origin_backlog",
        ));
    }
    check_origin(shared, req)
}

/// Whether the request's page (its `Origin`) may connect: 403
/// `origin_not_allowed` if `allowed-origins` does not list it.
pub(crate) fn check_origin(shared: &Edge, req: &Request) -> Result<(), Refusal> {
    let origin = req.header("origin");
    if !crate::allowed_origins::allowed(&shared.allowed_origins, origin) {
        return Err(refuse(
            403,
            "origin_not_allowed",
            format!(
                "pages of {} may not connect here",
                origin.unwrap_or_default()
            ),
            "origin_not_allowed",
        ));
    }
    Ok(())
}

/// Asks the origin about a client whose identity is settled, and on
/// acceptance registers its connection.
pub(super) async fn admit(
    shared: &Arc<Edge>,
    req: &Request,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
    opening: Opening,
    cookies: BTreeMap<String, String>,
    identity: Option<crate::admission::tokens::Identity>,
) -> Result<Accepted, Refusal> {
    let cfg = &shared.config;
    let Opening {
        upgrade,
        transport,
        subprotocol,
        is_native,
        deflate,
        ..
    } = &opening;
    let (is_native, deflate, transport) = (*is_native, *deflate, *transport);
    let refused = opening.refused.clone();
    // Counted from here to the connection's end; a refusal below frees it.
    let user_slot = match (
        &shared.user_counts,
        identity.as_ref().and_then(|i| i.user.as_deref()),
    ) {
        (Some(counts), Some(user)) => match counts.acquire(user) {
            Some(slot) => Some(Box::new(slot)),
            None => {
                return Err(Refusal {
                    status: 429,
                    code: "too_many_connections_for_user",
                    message: format!(
                        "this user already holds {} connections on this node",
                        cfg.max_connections_per_user
                    ),
                    extra: "",
                    metric: "too_many_connections_for_user",
                })
            }
        },
        _ => None,
    };

    let id = ConnectionId::generate(&shared.node);
    let event = Event::Connect(ConnectEvent {
        id: event_id::connect(&id),
        connection_id: id.to_string(),
        node: shared.node.to_string(),
        timestamp_ms: now_ms(),
        remote_addr: remote.to_string(),
        path: req.path.clone(),
        // The resume token is the client's alone (and a fallback's
        // session token and cursor).
        query: without_params(
            &req.query,
            if transport == Transport::Websocket {
                &PRIVATE_PARAMS[..2]
            } else {
                PRIVATE_PARAMS
            },
        ),
        headers: req
            .headers
            .iter()
            .filter(|(n, _)| shared.forward_headers.iter().any(|f| f == n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        cookies,
        subprotocols: upgrade
            .as_ref()
            .map(|u| u.protocols.clone())
            .unwrap_or_default(),
        subprotocol: subprotocol.clone(),
        transport,
        user_id: identity.as_ref().and_then(|i| i.user.clone()),
        claims: identity.as_ref().map(|i| i.claims.clone()),
        init_payload: opening.init_payload.clone(),
    });
    let decision = Box::pin(ask(&shared.origin, &event, deadline)).await;
    let answer = match decision {
        Ok(ConnectDecision::Accept(answer)) => answer,
        Ok(ConnectDecision::Reject { status, reason }) => {
            let status = if (400..=599).contains(&status) {
                status
            } else {
                403
            };
            return Err(refuse(
                status,
                "rejected_by_origin",
                reason.unwrap_or_else(|| "connection refused by the application".into()),
                "rejected",
            ));
        }
        Err(AskError::CutOff) => {
            // Cut off from the cluster, which may report this node lost at
            // any moment: its new connections would be retired at once.
            return Err(refuse(
                503,
                "node_cut_off",
                "this node is cut off from its cluster; retry",
                "node_cut_off",
            ));
        }
        Err(e) => {
            log_failure("connect", &id, &e);
            let (message, why) = match &e {
                AskError::TimedOut => (
                    "the application did not answer in time",
                    "connect not completed: answer came after handshake-timeout".to_owned(),
                ),
                AskError::Failed(e) => (
                    "the application is unavailable; retry later",
                    format!("connect not completed: {e}"),
                ),
                AskError::CutOff => unreachable!("answered above"),
            };
            if matches!(
                e,
                AskError::TimedOut
                    | AskError::Failed(OriginError::BadAnswer(_) | OriginError::Timeout)
            ) {
                // The origin may have taken it as accepted.
                shared.commands.sessions.void_disconnect(&id, &why);
            }
            return Err(refuse(
                503,
                "origin_unavailable",
                message,
                "origin_unavailable",
            ));
        }
    };

    let conn = Arc::new(Conn::new(ConnInit {
        id,
        home: shared.commands.sessions.home().clone(),
        remote,
        path: req.path.clone(),
        token: identity
            .as_ref()
            .map(crate::admission::tokens::Identity::state),
        // Enforced unless the origin lets the connection outlive its token.
        token_expires_ms: identity
            .as_ref()
            .and_then(crate::admission::tokens::Identity::expires_at_ms)
            .filter(|_| !answer.outlive_token)
            .unwrap_or(0),
        // The origin's word first, else the token's `sub`.
        user_id: answer.user_id.or(identity.and_then(|i| i.user)),
        metadata: answer.metadata,
        user_slot,
        subprotocol: subprotocol.clone(),
        native: is_native,
        graphql: opening.graphql,
        transport,
        // Outbound compression: off when the client limited the server window.
        deflate: deflate.is_some_and(|d| d.compresses_outbound()),
        // A subscribe-only stream recovers by its event ids instead; the
        // origin may keep a connection from having a session (ttl 0).
        session: opening.resumable() && answer.session_ttl_ms != Some(0),
    }));
    if let (Some(ms), Some(_)) = (answer.session_ttl_ms, conn.session()) {
        conn.set_session_ttl(Duration::from_millis(ms).min(crate::sessions::MAX_TTL));
    }
    if is_native {
        // First, before anything else can be queued.
        conn.push(
            crate::commands::native::connected_frame(
                &shared.commands,
                &conn,
                crate::commands::native::Opened::New { refused },
            ),
            &shared.metrics,
        );
    }
    shared.registry.insert(conn.clone());
    // A new session's record goes to the session store (in a cluster).
    shared.commands.sessions.touch(&conn, true);
    shared.metrics.connections.inc();
    shared.metrics.by_transport(transport.as_str()).inc();
    shared.metrics.connections_total.inc();
    // A GraphQL client understands only GraphQL messages.
    let (messages, channels) = if opening.graphql.is_some() {
        (Vec::new(), Vec::new())
    } else {
        (answer.messages, answer.channels)
    };
    for m in messages {
        conn.send(&Outgoing::new(m), &shared.metrics);
    }
    for channel in &channels {
        if let Err(e) = shared
            .channels
            .subscribe(&conn, channel, None, Ack::Push, &shared.metrics)
        {
            tracing::warn!(connection = %conn.id(), channel, error = %e, "the connect answer named a channel that cannot be subscribed");
        }
    }
    crate::origin::dispatcher::deliver_replies(&shared.origin, answer.replies);
    Ok(Accepted {
        response: opening.response(),
        conn,
        deflate,
        origin_seq: 0,
        resumed: false,
        ack_payload: answer.ack_payload,
    })
}

pub(super) fn parse_cookies(req: &Request) -> BTreeMap<String, String> {
    req.headers_named("cookie")
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_owned(), v.trim().trim_matches('"').to_owned()))
        })
        .collect()
}
