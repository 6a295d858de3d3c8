//! The control listener's connections: hyper's HTTP/1 server, with bounds.
//!
//! hyper parses and answers each connection; around it this module adds
//! what hyper does not do by itself (documented in
//! `docs/control-api.md#limits-and-timeouts`):
//!
//! - **Header timeout** (`control-header-timeout`): a request head must be
//!   complete within this time of its first byte (or of the accept, for a
//!   connection's first request). A head that was begun gets a 408
//!   `request_timeout` JSON answer; a connection that sent nothing is closed
//!   without one.
//! - **Idle timeout** (`control-idle-timeout`): a keep-alive connection
//!   with no request in progress is closed after this time, without an
//!   answer (as HTTP/1.1 allows; clients retry on a new connection).
//! - **Body timeout** (`control-body-timeout`): the request body must have
//!   arrived within this time of the end of its head ([`TimedBody`]); the
//!   route then answers 408 `request_timeout` and the connection is closed.
//! - **Connection cap** (`control-max-connections`): one connection more
//!   gets a 503 `too_many_connections` JSON answer and is closed (a TLS
//!   connection is closed before its handshake, without an answer).
//! - **JSON for hyper's own answers.** hyper answers by itself, with an
//!   empty body, a head it cannot parse (400), a request target over 65,534
//!   bytes (414) and a head over its buffer (about 400 KiB) or with more
//!   than 100 header fields (431). Nothing has reached the service then, so
//!   bytes hyper writes while no request is in progress can only be such an
//!   answer: [`Guarded`] replaces them with the same status and a JSON
//!   error body (`bad_request`, `uri_too_long`, `headers_too_large`).
//!
//! hyper's own `header_read_timeout` is not used: it also runs while a
//! keep-alive connection waits for its next request, so an idle connection
//! could never be kept longer than the header timeout.
//!
//! Every refusal and timeout is counted in
//! `switchboard_control_refusals_total{reason}`.

use super::Edge;
use crate::config::Config;
use axum::body::Bytes;
use axum::Router;
use bytes::Buf;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use switchboard_proto::control::ErrorBody;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// Most over-capacity connections answered (503) at once; beyond, they are
/// closed without an answer.
const MAX_REFUSING: usize = 64;

/// Longest time spent answering an over-capacity connection, or finishing
/// a connection's answers once the listener stops.
const GRACE: Duration = Duration::from_secs(1);

/// The bounds of the control listener, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    header: Duration,
    body: Duration,
    idle: Duration,
}

impl Limits {
    /// The `control-*` settings of `config`.
    pub(crate) fn of(config: &Config) -> Self {
        Self {
            header: config.control_header_timeout,
            body: config.control_body_timeout,
            idle: config.control_idle_timeout,
        }
    }
}

/// The JSON error answer `status`/`code`, as bytes on the wire, closing
/// the connection.
fn canned(status: u16, code: &str, message: &str) -> Bytes {
    let body = serde_json::to_vec(&ErrorBody {
        code: code.into(),
        message: message.into(),
    })
    .expect("error bodies serialize");
    let reason = hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// The JSON answer standing for the one hyper wrote by itself with
/// `status`, and the reason it is counted under.
fn instead_of_hyper(status: u16) -> (Bytes, &'static str) {
    let (code, message) = match status {
        414 => (
            "uri_too_long",
            "the request target is over 65534 bytes".to_owned(),
        ),
        431 => (
            "headers_too_large",
            "the request head has more than 100 header fields or is over the size limit".to_owned(),
        ),
        400 => (
            "bad_request",
            "the request is not a valid HTTP/1.1 request".to_owned(),
        ),
        other => (
            "bad_request",
            format!("the request cannot be read as HTTP/1.1 ({other})"),
        ),
    };
    (canned(status, code, &message), code)
}

// --- The connection cap -------------------------------------------------

/// Counts the control listener's open connections against
/// `control-max-connections`.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    open: Arc<AtomicUsize>,
    refusing: Arc<AtomicUsize>,
    max: usize,
    shared: Arc<Edge>,
}

/// One open connection of the control listener; freed on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    open: Arc<AtomicUsize>,
    shared: Arc<Edge>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Relaxed);
        self.shared.metrics.control_connections.dec();
    }
}

impl Slots {
    /// The cap of `shared`'s configuration.
    pub(crate) fn new(shared: Arc<Edge>) -> Self {
        Self {
            open: Arc::default(),
            refusing: Arc::default(),
            max: shared.config.control_max_connections,
            shared,
        }
    }

    /// A slot for a new connection, or `None` (counted as `over_capacity`)
    /// when `control-max-connections` are open.
    pub(crate) fn take(&self) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .is_ok();
        if !taken {
            self.shared.metrics.control_refusal("over_capacity");
            return None;
        }
        self.shared.metrics.control_connections.inc();
        Some(Slot {
            open: self.open.clone(),
            shared: self.shared.clone(),
        })
    }

    /// Answers a plain connection over the cap with a 503
    /// `too_many_connections` and closes it, in at most [`GRACE`]; beyond
    /// [`MAX_REFUSING`] such answers at once, closes it at once.
    pub(crate) fn refuse(&self, mut tcp: TcpStream) {
        if self.refusing.fetch_add(1, Relaxed) >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Relaxed);
            return;
        }
        let refusing = self.refusing.clone();
        let max = self.max;
        tokio::spawn(async move {
            let answer = canned(
                503,
                "too_many_connections",
                &format!("the control listener has its {max} connections open (control-max-connections); retry later"),
            );
            let _ = tokio::time::timeout(GRACE, async {
                tcp.write_all(&answer).await?;
                tcp.shutdown().await?;
                // Read what the client sent until it closes, so that
                // closing does not reset the connection under the answer.
                let mut sink = [0u8; 1024];
                while tcp.read(&mut sink).await? > 0 {}
                io::Result::Ok(())
            })
            .await;
            refusing.fetch_sub(1, Relaxed);
        });
    }
}

// --- Where a connection is ----------------------------------------------

/// Where a connection is between and within requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request head; `fresh`: no request
    /// came on this connection yet.
    Idle { since: Instant, fresh: bool },
    /// Part of a head arrived at `since`, not all of it.
    Head { since: Instant },
    /// The service has request `generation`, or its answer is being written.
    Request { generation: u64 },
    /// The answer's body is complete; it is being flushed.
    Finishing,
}

/// What a connection's deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// Nothing was sent on a new connection.
    Silent,
    /// A head was begun and not finished.
    Head,
    /// A keep-alive connection waited for its next request.
    Idle,
}

#[derive(Debug)]
struct ConnState {
    phase: Mutex<(Phase, u64)>,
    /// A refusal or timeout of this connection was counted.
    counted: std::sync::atomic::AtomicBool,
}

impl ConnState {
    fn new() -> Self {
        Self {
            phase: Mutex::new((
                Phase::Idle {
                    since: Instant::now(),
                    fresh: true,
                },
                0,
            )),
            counted: Default::default(),
        }
    }

    /// Bytes arrived.
    fn on_bytes(&self) {
        let mut p = self.phase.lock();
        if let Phase::Idle { .. } = p.0 {
            p.0 = Phase::Head {
                since: Instant::now(),
            };
        }
    }

    /// hyper hands a request to the service; returns its generation.
    fn begin_request(&self) -> u64 {
        let mut p = self.phase.lock();
        p.1 += 1;
        p.0 = Phase::Request { generation: p.1 };
        p.1
    }

    /// The answer to request `generation` has all its body.
    fn end_response(&self, generation: u64) {
        let mut p = self.phase.lock();
        if p.0 == (Phase::Request { generation }) {
            p.0 = Phase::Finishing;
        }
    }

    /// hyper flushed what it wrote; whether the connection went idle.
    fn flushed(&self) -> bool {
        let mut p = self.phase.lock();
        if p.0 != Phase::Finishing {
            return false;
        }
        p.0 = Phase::Idle {
            since: Instant::now(),
            fresh: false,
        };
        true
    }

    /// Whether a request is in progress (so hyper writes its answer).
    fn answering(&self) -> bool {
        matches!(
            self.phase.lock().0,
            Phase::Request { .. } | Phase::Finishing
        )
    }

    /// When the connection expires, if it can now, and why.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        match self.phase.lock().0 {
            Phase::Idle { since, fresh: true } => Some((since + limits.header, Expiry::Silent)),
            Phase::Idle {
                since,
                fresh: false,
            } => Some((since + limits.idle, Expiry::Idle)),
            Phase::Head { since } => Some((since + limits.header, Expiry::Head)),
            Phase::Request { .. } | Phase::Finishing => None,
        }
    }
}

// --- The connection's I/O -------------------------------------------------

/// A control connection's socket as hyper sees it: expires it on the header
/// and idle timeouts, and puts JSON bodies on the answers hyper writes by
/// itself (see the module docs).
struct Guarded<S> {
    inner: S,
    state: Arc<ConnState>,
    limits: Limits,
    shared: Arc<Edge>,
    timer: Pin<Box<Sleep>>,
    /// An answer of ours, written before anything else.
    out: Option<Bytes>,
    /// The first bytes of an answer hyper wrote by itself (its status line).
    auto: Vec<u8>,
    /// hyper answers by itself: its bytes are dropped.
    swallowing: bool,
    /// Timed out: reads end (EOF) once `out` is written.
    expired: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    fn new(inner: S, state: Arc<ConnState>, limits: Limits, shared: Arc<Edge>) -> Self {
        Self {
            inner,
            state,
            limits,
            shared,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            out: None,
            auto: Vec::new(),
            swallowing: false,
            expired: false,
        }
    }

    /// Writes and flushes `out`.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(out) = &mut self.out else {
            return Poll::Ready(Ok(()));
        };
        while out.has_remaining() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, out.chunk()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            out.advance(n);
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.out = None;
        Poll::Ready(Ok(()))
    }

    /// Sets the timer to the connection's deadline and registers `cx` to be
    /// woken by it; the deadline and why, if there is one.
    fn arm_timer(&mut self, cx: &mut Context<'_>) -> Option<(Poll<()>, Expiry)> {
        let (deadline, expiry) = self.state.deadline(&self.limits)?;
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        Some((self.timer.as_mut().poll(cx), expiry))
    }

    /// The deadline of `expiry` passed.
    fn expire(&mut self, expiry: Expiry) {
        self.expired = true;
        self.state.counted.store(true, Relaxed);
        // Whatever hyper writes from now on is dropped: our answer, if
        // any, is the last thing the client gets.
        let answered_by_hyper = std::mem::replace(&mut self.swallowing, true);
        let m = &self.shared.metrics;
        match expiry {
            Expiry::Silent => m.control_refusal("header_timeout"),
            Expiry::Idle => m.control_refusal("idle_timeout"),
            Expiry::Head => {
                m.control_refusal("header_timeout");
                if !answered_by_hyper {
                    self.out = Some(canned(
                        408,
                        "request_timeout",
                        &format!(
                            "the request head did not arrive within control-header-timeout ({})",
                            humantime::format_duration(self.limits.header)
                        ),
                    ));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            // Our answer first, then the end of the stream.
            ready!(this.poll_out(cx))?;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.state.on_bytes();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some((Poll::Ready(()), expiry)) = this.arm_timer(cx) else {
                    return Poll::Pending;
                };
                this.expire(expiry);
                ready!(this.poll_out(cx))?;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.swallowing || !this.state.answering() {
            // No request in progress: hyper answers one it could not
            // parse. Its status goes into our JSON answer instead.
            if !this.swallowing {
                this.swallowing = true;
            }
            if this.auto.len() < 12 {
                let take = (12 - this.auto.len()).min(buf.len());
                this.auto.extend_from_slice(&buf[..take]);
                if this.auto.len() == 12 && this.out.is_none() && !this.expired {
                    let status = std::str::from_utf8(&this.auto[9..12])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(400);
                    let (answer, reason) = instead_of_hyper(status);
                    this.shared.metrics.control_refusal(reason);
                    this.state.counted.store(true, Relaxed);
                    this.out = Some(answer);
                }
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        if this.state.flushed() {
            // hyper may already be waiting on a read it started while the
            // request was served, so no `poll_read` comes until the client
            // sends something: the idle deadline wakes the connection.
            this.arm_timer(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

// --- Bodies ---------------------------------------------------------------

/// The error of a request body that did not arrive within
/// `control-body-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within control-body-timeout ({})", humantime::format_duration(*.0))]
pub(crate) struct BodyTimeout(Duration);

/// Whether `e`, or an error it was caused by, is a [`BodyTimeout`].
pub(crate) fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<BodyTimeout>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A request body that fails with [`BodyTimeout`] when it has not all
/// arrived within `control-body-timeout` of the end of the head.
struct TimedBody {
    inner: Incoming,
    timer: Pin<Box<Sleep>>,
    limit: Duration,
    shared: Arc<Edge>,
    fired: bool,
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.fired {
            return Poll::Ready(Some(Err(BodyTimeout(this.limit).into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                this.fired = true;
                this.shared.metrics.control_refusal("body_timeout");
                Poll::Ready(Some(Err(BodyTimeout(this.limit).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body that tells the connection when it is complete (or
/// dropped), so that the wait for the next request starts.
struct Tracked {
    inner: axum::body::Body,
    state: Arc<ConnState>,
    generation: u64,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() {
            this.state.end_response(this.generation);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.state.end_response(self.generation);
    }
}

// --- Serving ----------------------------------------------------------------

/// Serves one control connection with `app` until it closes, expires, or
/// `stop` fires (then its request in progress has [`GRACE`] to finish).
pub(crate) async fn serve_connection<S>(
    io: S,
    slot: Slot,
    app: Router,
    shared: Arc<Edge>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = Limits::of(&shared.config);
    let state = Arc::new(ConnState::new());
    let io = Guarded::new(io, state.clone(), limits, shared.clone());
    let conn_state = state.clone();
    let metrics_of = shared.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let generation = state.begin_request();
        let mut app = app.clone();
        let state = state.clone();
        let shared = shared.clone();
        async move {
            let req = req.map(|inner| {
                axum::body::Body::new(TimedBody {
                    inner,
                    timer: Box::pin(tokio::time::sleep(limits.body)),
                    limit: limits.body,
                    shared,
                    fired: false,
                })
            });
            let answer = match tower_service::Service::call(&mut app, req).await {
                Ok(answer) => answer,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(answer.map(|inner| Tracked {
                inner,
                state,
                generation,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Header and idle timeouts are `Guarded`'s (see the module docs).
    builder.header_read_timeout(None::<Duration>);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let served = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(GRACE, conn).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = served {
        // A parse error hyper closed on without an answer (an HTTP/2
        // preface) is counted as `bad_request` too.
        if e.is_parse() && !conn_state.counted.load(Relaxed) {
            metrics_of.metrics.control_refusal("bad_request");
        }
        tracing::debug!(error = %e, "control connection ended with an error");
    }
    drop(slot);
}
