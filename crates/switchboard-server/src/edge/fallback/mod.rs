//! The HTTP fallbacks of the client listener (`docs/fallbacks.md`): a
//! request that is not a WebSocket upgrade opens an SSE stream, a
//! long-poll session or a plain EventSource stream, or carries the
//! commands, polls and end of such a session to its task
//! ([`task`]), found by its session token in [`Links`]. Requests that are
//! not streams keep their HTTP/1.1 connection for the next one.

mod events;
mod polls;
mod task;

use super::handshake::{self, query_param, Decision, Opening, Refusal};
use super::{connection::DisconnectGuard, Edge, SocketGuard};
use crate::commands::FallbackRunner;
use crate::conn::stream::ClientStream;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use switchboard_backend::CommandReply;
use switchboard_proto::conn_id::ConnKey;
use switchboard_proto::control::{Command, FallbackAction, FallbackRequest};
use switchboard_proto::origin::Transport;
use switchboard_proto::ws::handshake::{self as hs, Request};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Requests queued for one connection's task before senders wait.
const UP_QUEUE: usize = 16;

/// A request head read from a client socket.
pub(crate) struct Head {
    pub(crate) req: Request,
    pub(crate) remote: SocketAddr,
    /// The end of the handshake's (or this request's) time.
    pub(crate) deadline: Instant,
}

/// What a request brings to a fallback connection's task.
pub(crate) enum Up {
    /// A `POST`'s commands, one per line.
    Commands {
        body: Bytes,
        done: oneshot::Sender<Result<(), UpError>>,
    },
    /// A poll, whose socket the task answers on.
    Poll(Poll),
}

/// Why a task did not take a request.
#[derive(Debug)]
pub(crate) enum UpError {
    /// The connection is closing or has ended.
    Ended,
    /// The connection was lost: the session waits for a resume.
    Suspended,
}

/// A waiting poll: what it acknowledges, and how to answer it.
pub(crate) struct Poll {
    /// The cursor of the last answer the client received.
    cursor: u64,
    /// When it is answered even without pushes (`poll-timeout`).
    expires: Instant,
    reply: PollReply,
}

/// Where a poll's answer goes.
enum PollReply {
    /// The client's own request.
    Client(Box<Client>),
    /// Another node, which forwarded the client's poll here.
    Forwarded(oneshot::Sender<CommandReply>),
}

/// A client's request waiting for its answer.
struct Client {
    stream: ClientStream,
    remote: SocketAddr,
    socket: SocketGuard,
    /// What the client sent after its request (its next one).
    leftover: BytesMut,
    /// `Access-Control-Allow-Origin` of the answer.
    cors: Option<String>,
    /// The client keeps its connection for more requests.
    keep: bool,
}

impl Poll {
    fn timed_out(&self) -> bool {
        Instant::now() >= self.expires
    }

    /// The socket of a client's own poll (to see it go).
    fn stream(&self) -> Option<&ClientStream> {
        match &self.reply {
            PollReply::Client(c) => Some(&c.stream),
            PollReply::Forwarded(_) => None,
        }
    }

    /// The client of a client's own poll.
    fn client_mut(&mut self) -> Option<&mut Client> {
        match &mut self.reply {
            PollReply::Client(c) => Some(c),
            PollReply::Forwarded(_) => None,
        }
    }
}

impl Client {
    /// Reads what the client sends while its request waits (its next
    /// request, when it pipelines) into `leftover`: `true` when the client
    /// is gone (closed, failed, or sent more than `max` bytes ahead).
    fn read_ahead(&mut self, max: usize) -> bool {
        loop {
            if self.leftover.len() > max {
                return true;
            }
            self.leftover.reserve(1024);
            match self.stream.try_read_buf(&mut self.leftover) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }
}

/// The running fallback connections' tasks, by connection.
#[derive(Debug, Default)]
pub(crate) struct Links {
    map: Mutex<HashMap<ConnKey, (u64, mpsc::Sender<Up>)>>,
    next: AtomicU64,
}

impl Links {
    /// Registers a task; the returned number unregisters it.
    fn insert(&self, key: ConnKey, tx: mpsc::Sender<Up>) -> u64 {
        let n = self.next.fetch_add(1, Relaxed);
        self.map.lock().insert(key, (n, tx));
        n
    }

    /// Unregisters task `n`, unless a newer task (a resume) took its place.
    fn remove(&self, key: &ConnKey, n: u64) {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|(m, _)| *m == n) {
            map.remove(key);
        }
    }

    fn get(&self, key: &ConnKey) -> Option<mpsc::Sender<Up>> {
        self.map.lock().get(key).map(|(_, tx)| tx.clone())
    }
}

/// Finds the task of a session held here and hands it requests: for the
/// client listener, and for requests other nodes forward
/// ([`FallbackRunner`]).
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    links: Arc<Links>,
    sessions: Arc<crate::sessions::Sessions>,
    registry: Arc<crate::conn::Registry>,
    config: Arc<crate::Config>,
}

impl Runner {
    /// The runner of an edge's fallback connections.
    pub(crate) fn new(links: Arc<Links>, commands: &crate::commands::Commands) -> Self {
        Self {
            links,
            sessions: commands.sessions.clone(),
            registry: commands.registry.clone(),
            config: commands.config.clone(),
        }
    }

    /// The task of the session named by `token`, or why there is none.
    fn link(&self, token: &str) -> Result<mpsc::Sender<Up>, Refusal> {
        let key = self.session_id(token)?.key();
        if let Some(tx) = self.links.get(&key) {
            return Ok(tx);
        }
        match self.registry.get(&key) {
            // Suspended, or a fallback connection whose task is ending
            // (about to be suspended, or ended).
            Some(conn) if conn.is_suspended() || conn.transport() != Transport::Websocket => {
                Err(suspended())
            }
            Some(_) => Err(handshake::refuse(
                409,
                "wrong_transport",
                "this session is carried by a WebSocket",
                "bad_request",
            )),
            None => Err(handshake::refuse(
                404,
                "session_unknown",
                "no such session on this node",
                "bad_request",
            )),
        }
    }

    /// Ends the session named by `token` as its client's close (1000),
    /// whether it is connected (its task closes it) or suspended.
    async fn end(&self, token: &str) -> Result<(), Refusal> {
        let unknown = || {
            handshake::refuse(
                404,
                "session_unknown",
                "no such session on this node",
                "bad_request",
            )
        };
        let id = self.session_id(token)?;
        let conn = self.registry.get(&id.key()).ok_or_else(unknown)?;
        let req = crate::conn::CloseRequest {
            code: switchboard_proto::ws::close::NORMAL,
            reason: String::new(),
            by: switchboard_proto::origin::ClosedBy::Client,
            flush_first: true,
            takeover: false,
        };
        if self.sessions.close(&conn, req) {
            Ok(())
        } else {
            Err(unknown())
        }
    }

    /// The connection a session token names, if this node issued it.
    fn session_id(&self, token: &str) -> Result<switchboard_proto::ConnectionId, Refusal> {
        self.sessions.session_of(token).map_err(|e| {
            if e.code == switchboard_proto::native::ResumeCode::SessionInvalid {
                handshake::refuse(400, "session_invalid", e.message, "bad_request")
            } else {
                handshake::refuse(404, "session_unknown", e.message, "bad_request")
            }
        })
    }

    /// Hands a request to the session's task and waits for it to be taken.
    async fn up(
        &self,
        token: &str,
        make: impl FnOnce(oneshot::Sender<Result<(), UpError>>) -> Up,
    ) -> Result<(), Refusal> {
        let tx = self.link(token)?;
        let (done, taken) = oneshot::channel();
        let ended = || self.gone(token);
        let sent = tokio::time::timeout(self.config.handshake_timeout, tx.send(make(done))).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(ended()),
            Err(_) => {
                return Err(handshake::refuse(
                    503,
                    "busy",
                    "the session's task is not keeping up; retry",
                    "bad_request",
                ))
            }
        }
        match taken.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(UpError::Suspended)) => Err(suspended()),
            _ => Err(ended()),
        }
    }

    /// Why a session whose task was found has none now (it ended just
    /// then): suspended, or gone.
    fn gone(&self, token: &str) -> Refusal {
        self.link(token).err().unwrap_or_else(|| {
            handshake::refuse(
                404,
                "session_unknown",
                "the session has ended",
                "bad_request",
            )
        })
    }

    /// Runs a session's request (the client's own, or one another node
    /// forwarded): its answer.
    async fn handle(self, req: FallbackRequest) -> CommandReply {
        let token = req.session.as_str();
        let done = match req.action {
            FallbackAction::Commands { body } => {
                let body = Bytes::from(body);
                self.up(token, |done| Up::Commands { body, done }).await
            }
            FallbackAction::End => self.end(token).await,
            FallbackAction::Poll { cursor, wait_ms } => {
                let tx = match self.link(token) {
                    Ok(tx) => tx,
                    Err(r) => return refusal_reply(&r),
                };
                let (reply, answer) = oneshot::channel();
                let wait = Duration::from_millis(wait_ms).min(self.config.poll_timeout);
                let poll = Poll {
                    cursor,
                    expires: Instant::now() + wait,
                    reply: PollReply::Forwarded(reply),
                };
                if tx.send(Up::Poll(poll)).await.is_err() {
                    return refusal_reply(&self.gone(token));
                }
                return answer
                    .await
                    .unwrap_or_else(|_| refusal_reply(&self.gone(token)));
            }
        };
        match done {
            Ok(()) => CommandReply {
                status: 204,
                body: Bytes::new(),
            },
            Err(r) => refusal_reply(&r),
        }
    }
}

impl FallbackRunner for Runner {
    fn run(&self, req: FallbackRequest) -> BoxFuture<'static, CommandReply> {
        Box::pin(self.clone().handle(req))
    }
}

/// 409 `session_suspended`.
fn suspended() -> Refusal {
    handshake::refuse(
        409,
        "session_suspended",
        "the session has no open stream or poll; resume it first",
        "bad_request",
    )
}

/// A refusal as a forwarded command's reply.
fn refusal_reply(r: &Refusal) -> CommandReply {
    CommandReply {
        status: r.status,
        body: Bytes::from(serde_json::json!({ "code": r.code, "message": r.message }).to_string()),
    }
}

/// Whether the session named by `token` is not held here, in a cluster:
/// its requests then go through the cluster's routing, which finds the
/// node holding it (the one its id names, or where it moved).
fn held_elsewhere(shared: &Edge, token: &str) -> bool {
    shared.commands.cluster.get().is_some()
        && crate::sessions::connection_of(token)
            .is_some_and(|id| shared.commands.registry.get(&id.key()).is_none())
}

/// Runs a request of a session held by another node there, through the
/// cluster.
async fn forward(shared: &Arc<Edge>, token: &str, action: FallbackAction) -> CommandReply {
    shared.metrics.fallback_forwarded.inc();
    let cmd = Command::Fallback(FallbackRequest {
        session: token.to_owned(),
        action,
    });
    crate::commands::control::execute(&shared.commands, cmd, false).await
}

/// What a non-upgrade request is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Preflight,
    Commands,
    End,
    Poll,
    Open(Transport),
    Other,
}

impl Kind {
    /// The `request` label of its metrics.
    fn label(&self) -> &'static str {
        match self {
            Self::Preflight => "preflight",
            Self::Commands => "commands",
            Self::End => "end",
            Self::Poll => "poll",
            Self::Open(Transport::LongPoll) => "long-poll-open",
            Self::Open(Transport::Eventsource) => "eventsource",
            Self::Open(_) => "sse",
            Self::Other => "other",
        }
    }
}

fn classify(req: &Request) -> Kind {
    let q = &req.query;
    let session = query_param(q, "session").is_some();
    let transport = query_param(q, "transport");
    match req.method.as_str() {
        "OPTIONS" => Kind::Preflight,
        "POST" if session => Kind::Commands,
        "DELETE" if session => Kind::End,
        "GET" if transport == Some("long-poll") && session => Kind::Poll,
        "GET" if transport == Some("long-poll") => Kind::Open(Transport::LongPoll),
        "GET" if query_param(q, "channel").is_some() => Kind::Open(Transport::Eventsource),
        "GET"
            if transport == Some("sse") || req.header_has_token("accept", "text/event-stream") =>
        {
            Kind::Open(Transport::Sse)
        }
        _ => Kind::Other,
    }
}

/// Whether a request opens a fallback connection (a handshake).
pub(crate) fn opens(req: &Request) -> bool {
    matches!(classify(req), Kind::Open(_))
}

/// Serves a request that is not a WebSocket upgrade; `buf` holds the bytes
/// after its head.
pub(crate) async fn serve(
    shared: Arc<Edge>,
    mut stream: ClientStream,
    buf: BytesMut,
    head: Head,
    socket: SocketGuard,
) {
    let kind = classify(&head.req);
    if kind == Kind::Other {
        // Neither WebSocket nor a fallback: 426, as ever.
        let refusal = Refusal {
            status: 426,
            code: "upgrade_required",
            message: "this endpoint only accepts WebSocket connections and the HTTP fallbacks of docs/fallbacks.md".into(),
            extra: "Upgrade: websocket\r\n",
            metric: "upgrade_required",
        };
        return handshake::answer_refusal(&shared, &mut stream, refusal, head.deadline).await;
    }
    let label = kind.label();
    let cors = match cors_origin(&shared, &head.req) {
        Ok(cors) => cors,
        Err(r) => return refuse(&shared, stream, label, r, None).await,
    };
    if let Err(r) = check_framing(&head.req) {
        return refuse(&shared, stream, label, r, cors).await;
    }
    let keep = keeps_alive(&shared, &head.req);
    // A kept connection waiting for its next request holds no buffer.
    let mut leftover = unless_empty(buf);
    let answered = match kind {
        Kind::Preflight => {
            shared.metrics.fallback(label, "ok");
            let mut h = answer::head(204, "", None, cors.as_deref(), keep);
            answer::preflight(&mut h);
            write(&mut stream, &h, &[]).await
        }
        Kind::Commands => {
            let taken = std::mem::take(&mut leftover);
            let body = match read_body(&shared, &mut stream, taken, &head).await {
                Ok((body, rest)) => {
                    leftover = unless_empty(rest);
                    body
                }
                Err(r) => return refuse(&shared, stream, label, r, cors).await,
            };
            let Ok(body) = String::from_utf8(Vec::from(body)) else {
                let r = handshake::refuse(
                    400,
                    "bad_request",
                    "commands are UTF-8 JSON, one per line",
                    "bad_request",
                );
                return refuse(&shared, stream, label, r, cors).await;
            };
            let reply = session_request(&shared, &head, FallbackAction::Commands { body }).await;
            relay(&shared, &mut stream, label, reply, cors.as_deref(), keep).await
        }
        Kind::End => {
            let reply = session_request(&shared, &head, FallbackAction::End).await;
            relay(&shared, &mut stream, label, reply, cors.as_deref(), keep).await
        }
        Kind::Poll => return poll(shared, stream, leftover, head, socket, cors, keep).await,
        Kind::Open(transport) => {
            return open(shared, stream, leftover, head, socket, cors, transport).await
        }
        Kind::Other => unreachable!("answered above"),
    };
    if answered && keep {
        keep_alive(&shared, stream, head.remote, socket, leftover);
    }
}

/// Serves the client's next request on a kept connection, in a task of its
/// own (so that a long run of requests on one connection does not nest):
/// closed quietly when none comes within `handshake-timeout`. `leftover`
/// holds what the client sent after the last request.
pub(crate) fn keep_alive(
    shared: &Arc<Edge>,
    stream: ClientStream,
    remote: SocketAddr,
    socket: SocketGuard,
    leftover: BytesMut,
) {
    // Boxed: the task's future contains the next request's handling,
    // which may lead here again.
    let next = Box::pin(handshake::next_request(
        shared.clone(),
        stream,
        remote,
        socket,
        leftover,
    ));
    shared.conn_tasks.spawn(next);
}

/// The CORS header lines of answers to the request's page: `Ok(None)`
/// without an `Origin` header, the refusal for a page that may not connect.
fn cors_origin(shared: &Edge, req: &Request) -> Result<Option<String>, Refusal> {
    handshake::check_origin(shared, req)?;
    Ok(req.header("origin").map(|origin| cors_for(shared, origin)))
}

/// The CORS lines of answers to a page of `origin`: credentials (cookies)
/// only when `allowed-origins` names the pages that may send them.
fn cors_for(shared: &Edge, origin: &str) -> String {
    let mut h = String::new();
    answer::cors_lines(&mut h, origin, !shared.allowed_origins.is_empty());
    h
}

/// Whether the client keeps the connection after this request.
fn keeps_alive(shared: &Edge, req: &Request) -> bool {
    // A draining node lets its kept connections go.
    if req.header_has_token("connection", "close") || shared.commands.draining.load(Relaxed) {
        return false;
    }
    req.version >= 1 || req.header_has_token("connection", "keep-alive")
}

/// Reads the request's body (`Content-Length` bytes, at most
/// `max-message-size`): the body, and the bytes that came after it (the
/// client's next request).
async fn read_body(
    shared: &Edge,
    stream: &mut ClientStream,
    mut buf: BytesMut,
    head: &Head,
) -> Result<(Bytes, BytesMut), Refusal> {
    let len: usize = match head.req.header("content-length").map(|v| v.trim().parse()) {
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return Err(handshake::refuse(
                400,
                "bad_request",
                "invalid Content-Length",
                "bad_request",
            ))
        }
        None => {
            return Err(handshake::refuse(
                411,
                "length_required",
                "commands need a Content-Length",
                "bad_request",
            ))
        }
    };
    let max = shared.config.max_message_size;
    if len > max {
        return Err(handshake::refuse(
            413,
            "payload_too_large",
            format!("a request body is at most {max} bytes (max-message-size)"),
            "bad_request",
        ));
    }
    let deadline = Instant::now() + shared.config.handshake_timeout;
    while buf.len() < len {
        buf.reserve(len - buf.len());
        let read = tokio::time::timeout_at(deadline, async {
            stream.readable().await?;
            match stream.try_read_buf(&mut buf) {
                Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                Err(e) => Err(e),
            }
        })
        .await;
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                return Err(handshake::refuse(
                    400,
                    "bad_request",
                    "the body ended early",
                    "bad_request",
                ))
            }
            Err(_) => {
                return Err(handshake::refuse(
                    408,
                    "request_timeout",
                    "the body did not arrive in time",
                    "timeout",
                ))
            }
        }
    }
    let body = buf.split_to(len);
    Ok((body.freeze(), buf))
}

/// `buf`, or no buffer at all when it is empty (a pooled read buffer goes
/// back to the pool): what a connection keeps while it waits.
fn unless_empty(buf: BytesMut) -> BytesMut {
    if buf.is_empty() {
        crate::conn::pool::give(buf);
        BytesMut::new()
    } else {
        buf
    }
}

/// Refuses framing the fallbacks do not take: chunked bodies (a
/// `Content-Length` is needed; with both, a proxy in front could read
/// another request than this node does), and bodies on requests that have
/// none.
fn check_framing(req: &Request) -> Result<(), Refusal> {
    if req.header("transfer-encoding").is_some() {
        return Err(handshake::refuse(
            400,
            "bad_request",
            "Transfer-Encoding is not accepted; send a Content-Length",
            "bad_request",
        ));
    }
    let has_body = req
        .header("content-length")
        .is_some_and(|v| v.trim() != "0");
    if req.method != "POST" && has_body {
        return Err(handshake::refuse(
            400,
            "bad_request",
            "only POST requests carry a body",
            "bad_request",
        ));
    }
    Ok(())
}

/// Hands a poll (and its socket) to its session's task.
async fn poll(
    shared: Arc<Edge>,
    stream: ClientStream,
    leftover: BytesMut,
    head: Head,
    socket: SocketGuard,
    cors: Option<String>,
    keep: bool,
) {
    let label = Kind::Poll.label();
    let cursor = match query_param(&head.req.query, "cursor").map(str::parse::<u64>) {
        Some(Ok(c)) => c,
        _ => {
            let r = handshake::refuse(400, "bad_request", "a poll needs its cursor", "bad_request");
            return refuse(&shared, stream, label, r, cors).await;
        }
    };
    let token = query_param(&head.req.query, "session").unwrap_or_default();
    if held_elsewhere(&shared, token) {
        let client = Client {
            stream,
            remote: head.remote,
            socket,
            cors,
            keep,
            leftover,
        };
        return forward_poll(shared, client, token.to_owned(), cursor).await;
    }
    let tx = match shared.runner.link(token) {
        Ok(tx) => tx,
        Err(r) => return refuse(&shared, stream, label, r, cors).await,
    };
    let poll = Poll {
        cursor,
        expires: Instant::now() + shared.config.poll_timeout,
        reply: PollReply::Client(Box::new(Client {
            stream,
            remote: head.remote,
            socket,
            cors,
            keep,
            leftover,
        })),
    };
    if let Err(mpsc::error::SendError(Up::Poll(poll))) = tx.send(Up::Poll(poll)).await {
        let r = shared.runner.gone(token);
        refuse_poll(&shared, poll, r.status, r.code, &r.message);
    }
}

/// A poll of a session held by another node: forwarded as polls that
/// wait at most half the cluster's request timeout each (0.75 s with
/// NATS's default), every empty answer acknowledged by the next, until one
/// brings pushes or `poll-timeout` has passed; the client gets that
/// answer (and its cursor).
async fn forward_poll(shared: Arc<Edge>, mut client: Client, token: String, mut cursor: u64) {
    let until = Instant::now() + shared.config.poll_timeout;
    let most = shared
        .commands
        .cluster
        .get()
        .map_or(Duration::from_secs(1), |c| c.forward_timeout())
        / 2;
    let reply = loop {
        let left = until.saturating_duration_since(Instant::now());
        let wait = left.min(most);
        let action = FallbackAction::Poll {
            cursor,
            wait_ms: wait.as_millis() as u64,
        };
        let reply = tokio::select! {
            reply = forward(&shared, &token, action) => reply,
            // The client left: nothing more is asked on its behalf (an
            // answer the holding node made meanwhile is repeated to the
            // client's next poll).
            () = client_gone(&mut client, read_ahead_max(&shared)) => return,
        };
        if reply.status != 200 || Instant::now() + Duration::from_millis(50) >= until {
            break reply;
        }
        match empty_batch_cursor(&reply.body) {
            // Nothing yet: acknowledged by the next poll, as a client would.
            Some(next) => cursor = next,
            None => break reply,
        }
    };
    let label = Kind::Poll.label();
    let Client {
        mut stream,
        remote,
        socket,
        cors,
        keep,
        leftover,
    } = client;
    if relay(&shared, &mut stream, label, reply, cors.as_deref(), keep).await && keep {
        keep_alive(&shared, stream, remote, socket, leftover);
    }
}

/// The most a client may send ahead while its request waits: a request
/// head and a body.
fn read_ahead_max(shared: &Edge) -> usize {
    shared.config.max_header_bytes + shared.config.max_message_size
}

/// Resolves when the client is gone (see [`Client::read_ahead`]).
async fn client_gone(client: &mut Client, max: usize) {
    loop {
        if client.stream.readable().await.is_err() || client.read_ahead(max) {
            return;
        }
    }
}

/// The `code` of an error body from another node, as a metric label (one
/// of the codes this gateway answers with, else `other`).
fn known_code(body: &[u8]) -> &'static str {
    const CODES: &[&str] = &[
        "session_unknown",
        "session_invalid",
        "session_suspended",
        "session_ended",
        "wrong_transport",
        "bad_cursor",
        "poll_replaced",
        "busy",
        "connection_not_found",
        "cluster_unavailable",
        "node_timeout",
        "payload_too_large",
        "bad_request",
    ];
    let code = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned));
    code.and_then(|c| CODES.iter().find(|k| **k == c).copied())
        .unwrap_or("other")
}

/// The cursor of a batch without pushes (and without a close).
fn empty_batch_cursor(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Batch {
        cursor: u64,
        pushes: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        close: Option<serde::de::IgnoredAny>,
    }
    let b: Batch = serde_json::from_slice(body).ok()?;
    (b.pushes.is_empty() && b.close.is_none()).then_some(b.cursor)
}

/// Answers a client with a session request's reply (this node's or the
/// holding node's), keeping its connection.
async fn relay(
    shared: &Edge,
    stream: &mut ClientStream,
    label: &'static str,
    reply: CommandReply,
    cors: Option<&str>,
    keep: bool,
) -> bool {
    if (200..300).contains(&reply.status) {
        shared.metrics.fallback(label, "ok");
    } else {
        shared.metrics.fallback(label, known_code(&reply.body));
    }
    let len = (reply.status != 204).then_some(reply.body.len());
    let content_type = if reply.status == 204 {
        ""
    } else {
        "application/json"
    };
    let head = answer::head(reply.status, content_type, len, cors, keep);
    write(stream, &head, &reply.body).await
}

/// Answers a poll with an error (keeping a client's connection).
fn refuse_poll(shared: &Arc<Edge>, poll: Poll, status: u16, code: &'static str, message: &str) {
    shared.metrics.fallback("poll", code);
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    reply_poll(shared, poll, status, Bytes::from(body));
}

/// Answers a poll with `status` and its JSON `body`: a client's
/// connection is kept for its next request.
fn reply_poll(shared: &Arc<Edge>, poll: Poll, status: u16, body: Bytes) {
    let client = match poll.reply {
        PollReply::Forwarded(tx) => {
            let _ = tx.send(CommandReply { status, body });
            return;
        }
        PollReply::Client(client) => client,
    };
    let Client {
        mut stream,
        remote,
        socket,
        cors,
        keep,
        leftover,
    } = *client;
    let head = answer::head(
        status,
        "application/json",
        Some(body.len()),
        cors.as_deref(),
        keep,
    );
    let shared = shared.clone();
    shared.clone().conn_tasks.spawn(async move {
        if write(&mut stream, &head, &body).await && keep {
            keep_alive(&shared, stream, remote, socket, leftover);
        }
    });
}

/// Opens an SSE stream, a long-poll session or a plain EventSource
/// stream: the handshake of a WebSocket, answered the fallback's way.
async fn open(
    shared: Arc<Edge>,
    mut stream: ClientStream,
    leftover: BytesMut,
    head: Head,
    socket: SocketGuard,
    cors: Option<String>,
    transport: Transport,
) {
    let label = Kind::Open(transport).label();
    let Head {
        req,
        remote,
        deadline,
    } = head;
    let plain = if transport == Transport::Eventsource {
        match plain_channels(&req) {
            Ok(p) => Some(Box::new(p)),
            Err(r) => return refuse(&shared, stream, label, r, cors).await,
        }
    } else {
        None
    };
    let decided = match Opening::fallback(&shared, &req, transport) {
        Ok(opening) => handshake::decide(&shared, &req, remote, deadline, opening).await,
        Err(r) => Err(r),
    };
    let accepted = match decided {
        Ok(Decision::Accepted(a)) => a,
        Ok(Decision::FirstCommand(_)) => {
            let r = handshake::refuse(401, "token_missing", "a token is required", "unauthorized");
            return refuse(&shared, stream, label, r, cors).await;
        }
        Err(r) => return refuse(&shared, stream, label, r, cors).await,
    };
    shared.metrics.handshake("accepted");
    shared.metrics.fallback(label, "ok");
    let first_commands = plain
        .as_ref()
        .map(|p| p.subscribe_commands())
        .unwrap_or_default();
    let guard = DisconnectGuard::new(shared.clone(), accepted.conn.clone());
    let down = match transport {
        Transport::LongPoll => task::Down::Polls(polls::Polls::new(Poll {
            cursor: 0,
            // Answered at once: the `connected` push is queued.
            expires: Instant::now(),
            reply: PollReply::Client(Box::new(Client {
                stream,
                remote,
                socket,
                cors,
                keep: keeps_alive(&shared, &req),
                leftover,
            })),
        })),
        _ => {
            // A vanished client's unacknowledged heartbeat ends the stream.
            let _ = socket2::SockRef::from(stream.tcp())
                .set_tcp_user_timeout(Some(shared.config.pong_timeout));
            let mut h = answer::head(200, "text/event-stream", None, cors.as_deref(), false);
            if plain.is_some() {
                h.extend_from_slice(b"retry: 1000\n\n");
            }
            let _ = stream.flush().await;
            task::Down::Stream {
                stream,
                _socket: socket,
                pending: Bytes::from(h),
                last_id: 0,
                plain,
            }
        }
    };
    task::start(&shared, guard, down, accepted.origin_seq, first_commands);
}

/// The channels of a plain EventSource stream, and the client's positions.
fn plain_channels(req: &Request) -> Result<events::Plain, Refusal> {
    let mut channels = Vec::new();
    let mut last = req.header("last-event-id").map(str::to_owned);
    for (k, v) in form_urlencoded::parse(req.query.as_bytes()) {
        match &*k {
            "channel" => channels.push(v.into_owned()),
            "last_event_id" if last.is_none() => last = Some(v.into_owned()),
            _ => {}
        }
    }
    if channels.len() > events::MAX_PLAIN_CHANNELS || channels.iter().any(String::is_empty) {
        return Err(handshake::refuse(
            400,
            "bad_request",
            format!(
                "1 to {} non-empty channel parameters",
                events::MAX_PLAIN_CHANNELS
            ),
            "bad_request",
        ));
    }
    Ok(events::Plain::new(
        channels,
        last.as_deref().filter(|s| !s.is_empty()),
    ))
}

/// Answers a refusal (with CORS, so a page can read it) and closes.
async fn refuse(
    shared: &Edge,
    mut stream: ClientStream,
    label: &'static str,
    r: Refusal,
    cors: Option<String>,
) {
    shared.metrics.fallback(label, r.code);
    if matches!(label, "sse" | "long-poll-open" | "eventsource") {
        shared.metrics.handshake(r.metric);
    }
    let mut extra = r.extra.to_owned();
    if let Some(lines) = &cors {
        extra.push_str(lines);
    }
    let bytes = hs::error_response(r.status, r.code, &r.message, &extra);
    let linger = Instant::now() + handshake::REFUSAL_LINGER;
    handshake::write_and_close(&mut stream, &bytes, linger).await;
}

/// Runs a session's `POST` or `DELETE` here, or on the node holding the
/// session: the answer for the client.
async fn session_request(shared: &Arc<Edge>, head: &Head, action: FallbackAction) -> CommandReply {
    let token = query_param(&head.req.query, "session").unwrap_or_default();
    if held_elsewhere(shared, token) {
        forward(shared, token, action).await
    } else {
        shared
            .runner
            .clone()
            .handle(FallbackRequest {
                session: token.to_owned(),
                action,
            })
            .await
    }
}

/// Writes an answer: `false` if the client is gone.
async fn write(stream: &mut ClientStream, head: &[u8], body: &[u8]) -> bool {
    let io = async {
        stream.write_all(head).await?;
        stream.write_all(body).await?;
        // Behind TLS, ciphertext the socket has not taken yet.
        stream.flush().await
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(10), io).await,
        Ok(Ok(()))
    )
}

/// Answer heads.
pub(crate) mod answer {
    /// A response head: `content_type` empty for none, no length for a
    /// stream (which then ends with the connection).
    pub(crate) fn head(
        status: u16,
        content_type: &str,
        len: Option<usize>,
        cors: Option<&str>,
        keep: bool,
    ) -> Vec<u8> {
        let mut h = format!(
            "HTTP/1.1 {status} {}\r\n",
            switchboard_proto::ws::handshake::reason_phrase(status)
        );
        if !content_type.is_empty() {
            h.push_str("Content-Type: ");
            h.push_str(content_type);
            h.push_str("\r\n");
        }
        match len {
            Some(n) if status != 204 => h.push_str(&format!("Content-Length: {n}\r\n")),
            Some(_) => {}
            None if status == 204 => {}
            None => {
                h.push_str("Cache-Control: no-cache, no-transform\r\nX-Accel-Buffering: no\r\n");
            }
        }
        if len.is_some() {
            h.push_str("Cache-Control: no-store\r\n");
        }
        h.push_str(if keep && (len.is_some() || status == 204) {
            "Connection: keep-alive\r\n"
        } else {
            "Connection: close\r\n"
        });
        if let Some(lines) = cors {
            h.push_str(lines);
        }
        h.push_str("\r\n");
        h.into_bytes()
    }

    /// The CORS lines of an answer to a page of `origin`, allowing
    /// credentials (cookies) or not.
    pub(crate) fn cors_lines(h: &mut String, origin: &str, credentials: bool) {
        h.push_str("Access-Control-Allow-Origin: ");
        h.push_str(origin);
        h.push_str("\r\n");
        if credentials {
            h.push_str("Access-Control-Allow-Credentials: true\r\n");
        }
        h.push_str("Vary: Origin\r\n");
    }

    /// Adds the preflight answer's lines to a finished head.
    pub(crate) fn preflight(h: &mut Vec<u8>) {
        h.truncate(h.len() - 2);
        h.extend_from_slice(
            b"Access-Control-Allow-Methods: GET, POST, DELETE\r\nAccess-Control-Allow-Headers: authorization, content-type, last-event-id\r\nAccess-Control-Max-Age: 600\r\n\r\n",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, query: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: method.into(),
            path: "/live".into(),
            query: query.into(),
            version: 1,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn requests_are_told_apart() {
        let sse = [("accept", "text/event-stream")];
        assert_eq!(classify(&req("GET", "", &sse)), Kind::Open(Transport::Sse));
        assert_eq!(
            classify(&req("GET", "transport=sse", &[])),
            Kind::Open(Transport::Sse)
        );
        assert_eq!(
            classify(&req("GET", "channel=a:b", &[])),
            Kind::Open(Transport::Eventsource)
        );
        assert_eq!(
            classify(&req("GET", "channel=a:b", &sse)),
            Kind::Open(Transport::Eventsource)
        );
        assert_eq!(
            classify(&req("GET", "transport=long-poll", &[])),
            Kind::Open(Transport::LongPoll)
        );
        assert_eq!(
            classify(&req("GET", "transport=long-poll&session=t&cursor=1", &[])),
            Kind::Poll
        );
        assert_eq!(classify(&req("POST", "session=t", &[])), Kind::Commands);
        assert_eq!(classify(&req("DELETE", "session=t", &[])), Kind::End);
        assert_eq!(classify(&req("OPTIONS", "", &[])), Kind::Preflight);
        assert_eq!(classify(&req("GET", "", &[])), Kind::Other);
        assert_eq!(classify(&req("POST", "", &[])), Kind::Other);
    }

    #[test]
    fn heads_say_what_they_carry() {
        let mut cors = String::new();
        answer::cors_lines(&mut cors, "https://a.example", false);
        assert!(
            !cors.contains("Credentials"),
            "no credentials without allowed-origins"
        );
        let h = String::from_utf8(answer::head(
            200,
            "text/event-stream",
            None,
            Some(&cors),
            true,
        ))
        .unwrap();
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(h.contains("Connection: close\r\n"), "{h}");
        assert!(h.contains("X-Accel-Buffering: no\r\n"));
        assert!(h.contains("Access-Control-Allow-Origin: https://a.example\r\n"));
        assert!(h.ends_with("\r\n\r\n"));
        let h =
            String::from_utf8(answer::head(200, "application/json", Some(5), None, true)).unwrap();
        assert!(
            h.contains(
                "Content-Length: 5\r\nCache-Control: no-store\r\nConnection: keep-alive\r\n"
            ),
            "{h}"
        );
        let mut p = answer::head(204, "", None, None, true);
        answer::preflight(&mut p);
        let p = String::from_utf8(p).unwrap();
        assert!(p.contains("Access-Control-Allow-Methods: GET, POST, DELETE\r\n"));
        assert!(p.ends_with("\r\n\r\n"));
    }
}
