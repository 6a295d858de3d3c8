//! The client engine: the one way every scenario opens, holds and drives
//! WebSocket (or plain TCP) client connections.
//!
//! A process may hold at most 20,000 open files on the reference machine, so
//! clients live in child processes: the tool re-executes itself as a hidden
//! `worker` with a [`WorkerConfig`] (at most [`MAX_PER_PROCESS`] clients
//! each), drives it with one JSON [`Cmd`] per line on its stdin and reads one
//! JSON [`Report`] per line from its stdout ([`Fleet`]). A worker exits when
//! its stdin closes, so none outlives the tool.
//!
//! A worker is one thread. Its clients bind to 127.0.0.2, 127.0.0.3, ...
//! before connecting (ephemeral ports are per source address), send a
//! prebuilt upgrade request with the RFC 6455 sample key and check the
//! `101`: the server does its full handshake work, the client as little as
//! possible. After it they read raw frames ([`parse_header`] of the proto
//! crate) into one buffer shared by the worker's thread, answer pings, and:
//!
//! * [`Mode::Tcp`], [`Mode::Idle`]: hold the connection;
//! * [`Mode::Echo`]: on [`Cmd::Echo`], loop over "send a stamped message,
//!   wait for the identical echo", timing round trips in the window;
//! * [`Mode::Receive`]: optionally subscribe (native protocol) or read the
//!   origin's greeting with the connection id first, then find the stamp
//!   ([`stamp`]) in every data frame and tally receipts: latency per phase,
//!   receipts per message (a [`Report::Reached`] once every live client of
//!   the worker has one), receipts per tenth of a second;
//! * [`Mode::Graphql`]: speak `graphql-transport-ws` (`connection_init`,
//!   `connection_ack`, one `subscribe`, its initial `next`), then receive as
//!   in [`Mode::Receive`]: the origin stamps each re-executed result.
//!
//! Latency is the receipt time minus the send time written in the stamp by
//! another process of the same machine, on the same clock.
//!
//! With [`WorkerConfig::tls`] the clients do a full TLS handshake (rustls,
//! no session resumption, as clients arriving for the first time) before the
//! WebSocket one and read through TLS into a buffer of their own.

use crate::measure::{self, unix_nanos, Buckets};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use switchboard_proto::ws::frame::{encode_client_frame, parse_header, OpCode};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::ServerName};

/// Most connections one process holds: the open-file limit is 20,000.
pub(crate) const MAX_PER_PROCESS: usize = 19_000;

/// Bytes read from a socket at once into the worker's shared buffer.
const READ_CHUNK: usize = 64 << 10;

/// Largest frame a client accepts.
const MAX_FRAME: u64 = 16 << 20;

/// How long a client waits for its close handshake to finish.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Receipts are counted per this many nanoseconds of receipt time.
pub(crate) const TICK_NS: u64 = 100_000_000;

/// What the clients of a worker do once connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Mode {
    /// Plain TCP connections, held (the accept baseline).
    Tcp,
    /// WebSocket connections held idle, answering pings.
    Idle,
    /// Echo loops with messages of this many bytes.
    Echo(usize),
    /// Receivers of stamped messages.
    Receive {
        /// Subscribe to this channel (native protocol) after the handshake.
        subscribe: Option<String>,
        /// Read a greeting `{"connection_id": ..}` first and report the ids.
        greeting: bool,
    },
    /// GraphQL subscribers (`graphql-transport-ws`): client `k` (over all
    /// workers) subscribes with input `input-<k mod inputs>` and is ready
    /// once its initial result came; then receivers of stamped results.
    Graphql {
        /// Distinct inputs.
        inputs: usize,
    },
}

/// How the clients reach the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Transport {
    /// A WebSocket upgrade, then frames.
    #[default]
    WebSocket,
    /// A `GET` with `Accept: text/event-stream`, answered `200` and a stream
    /// of server-sent events (the gateway's SSE and plain EventSource,
    /// nchan's EventSource).
    Sse,
    /// The gateway's bidirectional SSE, subscribing with a command: as
    /// [`Transport::Sse`], and in receive mode with a channel, the
    /// `subscribe` command is `POST`ed on the session (`?session=`, a
    /// connection of its own) and its reply read on the stream.
    SseBidirectional,
    /// The gateway's long-polling: an opening `GET ?transport=long-poll`,
    /// then polls (idle mode only).
    LongPoll,
}

/// A worker's clients, passed as its one argument (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerConfig {
    /// The server's address.
    pub(crate) addr: SocketAddr,
    /// `Host` and path of the upgrade request, e.g. `127.0.0.1:8080/sub`.
    pub(crate) target: String,
    /// Subprotocol to offer.
    pub(crate) subprotocol: Option<String>,
    /// Clients.
    pub(crate) count: usize,
    /// Index of the first client over all workers (for source addresses).
    pub(crate) offset: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N); 0: the kernel's choice.
    pub(crate) source_addrs: u8,
    /// Handshakes in flight at once in this worker.
    pub(crate) concurrency: usize,
    /// What the clients do.
    pub(crate) mode: Mode,
    /// TLS: the CA file (PEM) the clients trust and the server name they check.
    pub(crate) tls: Option<(std::path::PathBuf, String)>,
    /// How the clients reach the server.
    #[serde(default)]
    pub(crate) transport: Transport,
    /// Each client holds its connection (reads it, answers pings) as soon
    /// as it is open, instead of once the whole worker is connected: for
    /// connect phases longer than the server's ping interval plus its pong
    /// timeout.
    #[serde(default)]
    pub(crate) hold_while_connecting: bool,
    /// With [`WorkerConfig::hold_while_connecting`]: connections started per
    /// second in this worker (evenly spaced); 0: as fast as the concurrency
    /// allows.
    #[serde(default)]
    pub(crate) connect_rate: f64,
}

/// A command from the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Cmd {
    /// Open every connection, then report [`Report::Connected`].
    Connect,
    /// Echo loops: warm-up from `start_ns` (Unix ns) for `warmup_ms`, then a
    /// measured window of `window_ms`; then [`Report::Echoed`].
    Echo {
        /// When the loops start.
        start_ns: u64,
        /// Warm-up length.
        warmup_ms: u64,
        /// Measured window length.
        window_ms: u64,
    },
    /// Report the receipts of a phase so far ([`Report::Receipts`]).
    Receipts(u8),
    /// Long-poll clients: send the first poll (and poll again whenever one
    /// is answered), then [`Report::Polling`].
    Poll,
    /// Close every connection gracefully, then [`Report::Closed`].
    Close,
}

/// A report to the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Report {
    /// The connect phase is over.
    Connected {
        /// Connections open.
        open: usize,
        /// Connections that failed.
        failed: usize,
        /// The first failure.
        first_error: Option<String>,
        /// From [`Cmd::Connect`] to the last connection open, seconds.
        seconds: f64,
        /// Handshake latency (connect to `101`, or subscribed), µs.
        latency: Buckets,
        /// Connection ids from the greetings.
        ids: Vec<String>,
    },
    /// Every live client of this worker has message `seq` of `phase`.
    Reached(u8, u64),
    /// The echo window is over.
    Echoed {
        /// Round trips that started after the warm-up and ended in the window.
        round_trips: u64,
        /// Round trip latency, µs.
        latency: Buckets,
        /// The first failure, if a client failed.
        error: Option<String>,
    },
    /// Receipts of a phase.
    Receipts(Box<Receipts>),
    /// The long-poll clients have sent their first poll.
    Polling {
        /// Clients whose first poll is sent.
        sent: usize,
        /// Clients that failed before or while sending it.
        failed: usize,
    },
    /// Every connection is closed.
    Closed {
        /// Closes the server answered with a close frame.
        clean: usize,
    },
}

/// Receipts of one phase in one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Receipts {
    /// Receipt latency, µs.
    pub(crate) latency: Buckets,
    /// Per message number: receipts and the latest one's latency (µs).
    pub(crate) per_message: Vec<(u64, u64, u64)>,
    /// Receipts per tick of receipt time ([`TICK_NS`]).
    pub(crate) ticks: Vec<(u64, u64)>,
    /// Pings answered since the connections opened.
    pub(crate) pings: u64,
    /// Connections that ended without being asked to.
    pub(crate) dropped: u64,
    /// Why the first of them ended.
    pub(crate) first_drop: Option<String>,
    /// Connections that ended without being asked to, by why (a close
    /// frame's `closed by the server: code N reason`, else the error).
    #[serde(default)]
    pub(crate) drop_reasons: Vec<(String, u64)>,
    /// Long-polls answered (any answer: pushes, empty or refused).
    #[serde(default)]
    pub(crate) polls_answered: u64,
}

// === Stamps ===

/// The marker around a stamp.
const MARK: u8 = b'~';

/// A stamped message body: `~<phase><send time ns>:<seq>~` padded with `x`
/// to `size` bytes (longer if the stamp does not fit).
pub(crate) fn stamp(phase: u8, seq: u64, sent_ns: u64, size: usize) -> String {
    let mut s = format!("~{}{sent_ns}:{seq}~", phase as char);
    if s.len() < size {
        s.extend(std::iter::repeat_n('x', size - s.len()));
    }
    s
}

/// Finds a stamp anywhere in a frame (whatever envelope the server wraps
/// the data in): `(phase, seq, sent_ns)`.
pub(crate) fn find_stamp(frame: &[u8]) -> Option<(u8, u64, u64)> {
    let mut rest = frame;
    while let Some(at) = rest.iter().position(|&b| b == MARK) {
        rest = &rest[at + 1..];
        if let Some(found) = parse_stamp(rest) {
            return Some(found);
        }
    }
    None
}

/// Parses `<phase><ns>:<seq>~` at the start of `b`.
fn parse_stamp(b: &[u8]) -> Option<(u8, u64, u64)> {
    let (&phase, rest) = b.split_first()?;
    let number = |b: &[u8], end: u8| -> Option<(u64, usize)> {
        let len = b.iter().position(|&c| c == end)?;
        let digits = &b[..len];
        if digits.is_empty() || len > 20 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some((std::str::from_utf8(digits).ok()?.parse().ok()?, len))
    };
    let (ns, len) = number(rest, b':')?;
    let (seq, _) = number(&rest[len + 1..], MARK)?;
    Some((phase, seq, ns))
}

// === Client frames ===

/// Opcodes the clients handle.
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A masked client frame (fixed key: the server must unmask either way).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let op = OpCode::from_u8(opcode).expect("one of the opcodes above");
    encode_client_frame(true, op, payload, [0x37, 0xfa, 0x21, 0x3d])
}

/// A frame received: opcode and payload range in the buffer.
struct Frame {
    opcode: u8,
    payload: std::ops::Range<usize>,
}

/// The next complete server frame at `buf[at..]`, `Ok(None)` if incomplete.
fn next_frame(buf: &[u8], at: usize) -> Result<Option<Frame>, String> {
    let Some(h) = parse_header(&buf[at..]).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if h.payload_len > MAX_FRAME || h.mask.is_some() {
        return Err("bad server frame (too large or masked)".into());
    }
    let start = at + h.header_len;
    let end = start + h.payload_len as usize;
    Ok((end <= buf.len()).then(|| Frame {
        opcode: buf[at] & 0x0F,
        payload: start..end,
    }))
}

// === Streams ===

/// A client's connection: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Writes all of `bytes` and flushes (over TLS, the records still buffered).
async fn send(s: &mut Stream, bytes: &[u8]) -> Result<(), String> {
    s.write_all(bytes).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())
}

/// The TLS client of a worker: trusts the CA file, checks `name`, offers
/// ALPN `http/1.1`, never resumes a session.
fn tls_client(
    ca: &std::path::Path,
    name: &str,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("{}: {e}", ca.display()))?
    {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

// === The worker ===

/// The tallies of one worker's thread.
#[derive(Debug, Default)]
struct Tally {
    phases: HashMap<u8, PhaseTally>,
    ticks: BTreeMap<u64, u64>,
    pings: u64,
    polls_answered: u64,
    live: usize,
    dropped: u64,
    first_drop: Option<String>,
    drop_reasons: BTreeMap<String, u64>,
}

/// Receipts of one phase.
#[derive(Debug)]
struct PhaseTally {
    latency: Histogram<u64>,
    per_message: HashMap<u64, (u64, u64)>,
}

impl Tally {
    /// Records one receipt; returns whether every live client now has it.
    fn receipt(&mut self, phase: u8, seq: u64, sent_ns: u64, now_ns: u64) -> bool {
        let us = now_ns.saturating_sub(sent_ns) / 1000;
        *self.ticks.entry(now_ns / TICK_NS).or_default() += 1;
        let p = self.phases.entry(phase).or_insert_with(|| PhaseTally {
            latency: measure::histogram(),
            per_message: HashMap::new(),
        });
        p.latency.saturating_record(us.max(1));
        let m = p.per_message.entry(seq).or_default();
        m.0 += 1;
        m.1 = m.1.max(us);
        m.0 == self.live as u64
    }

    fn dropped(&mut self, why: String) {
        self.live = self.live.saturating_sub(1);
        self.dropped += 1;
        let key: String = why.chars().take(80).collect();
        *self.drop_reasons.entry(key).or_default() += 1;
        self.first_drop.get_or_insert(why);
    }

    fn take(&mut self, phase: u8) -> Receipts {
        let p = self.phases.get(&phase);
        let mut per_message: Vec<_> = p
            .map(|p| {
                p.per_message
                    .iter()
                    .map(|(&s, &(n, l))| (s, n, l))
                    .collect()
            })
            .unwrap_or_default();
        per_message.sort_unstable();
        Receipts {
            latency: p
                .map(|p| measure::to_buckets(&p.latency))
                .unwrap_or_default(),
            per_message,
            ticks: self.ticks.iter().map(|(&t, &n)| (t, n)).collect(),
            pings: self.pings,
            dropped: self.dropped,
            first_drop: self.first_drop.clone(),
            drop_reasons: self
                .drop_reasons
                .iter()
                .map(|(k, &n)| (k.clone(), n))
                .collect(),
            polls_answered: self.polls_answered,
        }
    }
}

/// Round trips the echo clients of a worker timed in the window.
#[derive(Debug, Default)]
struct Echoed {
    round_trips: u64,
    latency: Option<Histogram<u64>>,
    error: Option<String>,
}

/// The echo window: start (Unix ns), warm-up and window (ms).
type EchoWindow = (u64, u64, u64);

/// State shared by the clients of a worker (one thread).
struct Shared {
    cfg: WorkerConfig,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    echo_window: watch::Receiver<Option<EchoWindow>>,
    echoed: RefCell<Echoed>,
    request: Vec<u8>,
    tally: RefCell<Tally>,
    buf: RefCell<Vec<u8>>,
    out: mpsc::UnboundedSender<Report>,
    close: watch::Receiver<bool>,
    /// Long-poll clients: set by [`Cmd::Poll`].
    polling: watch::Receiver<bool>,
    /// Long-poll clients whose first poll is sent.
    first_polls: std::cell::Cell<usize>,
    /// First polls in flight at once (`concurrency`, as handshakes).
    first_poll_permits: Semaphore,
}

/// Runs the hidden `worker` role: a current-thread runtime and its clients.
pub(crate) fn run_worker(config: &str) -> Result<(), String> {
    let cfg: WorkerConfig =
        serde_json::from_str(config).map_err(|e| format!("worker config: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    tokio::task::LocalSet::new().block_on(&rt, worker(cfg))
}

async fn worker(cfg: WorkerConfig) -> Result<(), String> {
    let (out, mut out_rx) = mpsc::unbounded_channel::<Report>();
    // Reports go out in order through one writer task.
    tokio::task::spawn_local(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(r) = out_rx.recv().await {
            let mut line = serde_json::to_vec(&r).expect("reports serialize");
            line.push(b'\n');
            if stdout.write_all(&line).await.is_err() || stdout.flush().await.is_err() {
                std::process::exit(0);
            }
        }
    });
    let (close_tx, close) = watch::channel(false);
    let (window_tx, echo_window) = watch::channel(None);
    let (polling_tx, polling) = watch::channel(false);
    let host = cfg.target.split('/').next().unwrap_or_default();
    let path = cfg.target.split_once('/').map_or("", |(_, p)| p);
    let request = match cfg.transport {
        Transport::WebSocket => format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
            offer = cfg
                .subprotocol
                .as_ref()
                .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
                .unwrap_or_default(),
        ),
        Transport::Sse | Transport::SseBidirectional => format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\n\r\n"
        ),
        Transport::LongPoll => format!(
            "GET /{path}{sep}transport=long-poll HTTP/1.1\r\nHost: {host}\r\n\r\n",
            sep = query_sep(path)
        ),
    }
    .into_bytes();
    let tls = match &cfg.tls {
        Some((ca, name)) => Some(tls_client(ca, name)?),
        None => None,
    };
    let concurrency = cfg.concurrency.max(1);
    let sh = Rc::new(Shared {
        cfg,
        tls,
        echo_window,
        echoed: RefCell::default(),
        request,
        tally: RefCell::default(),
        buf: RefCell::new(Vec::with_capacity(READ_CHUNK)),
        out,
        close,
        polling,
        first_polls: std::cell::Cell::new(0),
        first_poll_permits: Semaphore::new(concurrency),
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // End of stdin: the coordinator is gone.
    while let Ok(Some(line)) = lines.next_line().await {
        let cmd: Cmd = serde_json::from_str(&line).map_err(|e| format!("command {line:?}: {e}"))?;
        match cmd {
            Cmd::Connect => {
                let started = Instant::now();
                let (handles, mut report) = if sh.cfg.hold_while_connecting {
                    connect_holding(&sh).await
                } else {
                    let (conns, report) = connect_all(&sh).await;
                    sh.tally.borrow_mut().live = conns.len();
                    let handles: Vec<_> = conns
                        .into_iter()
                        .map(|(i, o)| tokio::task::spawn_local(hold(sh.clone(), i, o)))
                        .collect();
                    (handles, report)
                };
                if let Report::Connected { seconds, .. } = &mut report {
                    *seconds = started.elapsed().as_secs_f64();
                }
                let _ = sh.out.send(report);
                let sh = sh.clone();
                tokio::task::spawn_local(async move {
                    let mut close = sh.close.clone();
                    let _ = close.wait_for(|c| *c).await;
                    let mut clean = 0;
                    for h in handles {
                        clean += usize::from(h.await.unwrap_or(false));
                    }
                    let _ = sh.out.send(Report::Closed { clean });
                });
            }
            Cmd::Echo {
                start_ns,
                warmup_ms,
                window_ms,
            } => {
                let _ = window_tx.send(Some((start_ns, warmup_ms, window_ms)));
                let _ = sh
                    .out
                    .send(echo_report(&sh, start_ns, warmup_ms, window_ms).await);
            }
            Cmd::Receipts(phase) => {
                let r = sh.tally.borrow_mut().take(phase);
                let _ = sh.out.send(Report::Receipts(Box::new(r)));
            }
            Cmd::Poll => {
                let _ = polling_tx.send(true);
                let sh = sh.clone();
                tokio::task::spawn_local(async move {
                    // Until every live client has sent its first poll (or
                    // failed), 60 s at most.
                    let open = sh.tally.borrow().live;
                    let dropped = sh.tally.borrow().dropped;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let failed = (sh.tally.borrow().dropped - dropped) as usize;
                        let sent = sh.first_polls.get();
                        if sent + failed >= open || Instant::now() > deadline {
                            let _ = sh.out.send(Report::Polling { sent, failed });
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
            Cmd::Close => {
                let _ = close_tx.send(true);
            }
        }
    }
    Ok(())
}

/// Waits until the echo window (and one round trip's grace) is over and
/// reports what the clients timed.
async fn echo_report(sh: &Shared, start_ns: u64, warmup_ms: u64, window_ms: u64) -> Report {
    let end_ns = start_ns + (warmup_ms + window_ms) * 1_000_000;
    let wait = end_ns.saturating_sub(unix_nanos()) + 200_000_000;
    tokio::time::sleep(Duration::from_nanos(wait)).await;
    let mut e = sh.echoed.borrow_mut();
    Report::Echoed {
        round_trips: e.round_trips,
        latency: e
            .latency
            .as_ref()
            .map(measure::to_buckets)
            .unwrap_or_default(),
        error: e.error.take(),
    }
}

/// A client once open.
struct Opened {
    /// Its connection (none for a long-poll client: it closes the opening
    /// answer's connection at once).
    stream: Option<Stream>,
    /// Bytes read past its setup.
    rest: Vec<u8>,
    /// The greeting's connection id.
    id: Option<String>,
    /// A long-poll client's session token and cursor.
    poll: Option<(String, u64)>,
}

/// Opens every connection of the worker, `concurrency` at a time: each
/// client's index and what it opened.
async fn connect_all(sh: &Rc<Shared>) -> (Vec<(usize, Opened)>, Report) {
    let permits = Rc::new(Semaphore::new(sh.cfg.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(sh.cfg.count);
    for i in 0..sh.cfg.count {
        let (sh, permits) = (sh.clone(), permits.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let _permit = permits.acquire().await.expect("never closed");
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(30), open(&sh, i)).await;
            let r = r.unwrap_or_else(|_| Err("timed out after 30 s".into()));
            r.map(|c| (c, t.elapsed()))
        }));
    }
    let mut conns = Vec::with_capacity(tasks.len());
    let mut ids = Vec::new();
    let (mut failed, mut first_error) = (0, None);
    let mut latency = measure::histogram();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((mut opened, took)) => {
                latency.saturating_record(took.as_micros() as u64);
                ids.extend(opened.id.take());
                conns.push((i, opened));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let report = Report::Connected {
        open: conns.len(),
        failed,
        first_error,
        seconds: 0.0,
        latency: measure::to_buckets(&latency),
        ids,
    };
    (conns, report)
}

/// Opens every connection of the worker as [`connect_all`] does, but each
/// client then holds its connection at once ([`hold`]: reads it, answers
/// pings) while the others still connect: the hold tasks (each ending with
/// whether its close was clean) and the report.
async fn connect_holding(sh: &Rc<Shared>) -> (Vec<tokio::task::JoinHandle<bool>>, Report) {
    type Opening = Result<(Duration, Option<String>), String>;
    let permits = Rc::new(Semaphore::new(sh.cfg.concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Opening>();
    let mut handles = Vec::with_capacity(sh.cfg.count);
    let start = Instant::now();
    let rate = sh.cfg.connect_rate;
    for i in 0..sh.cfg.count {
        let (sh, permits, tx) = (sh.clone(), permits.clone(), tx.clone());
        handles.push(tokio::task::spawn_local(async move {
            if rate > 0.0 {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
            }
            let permit = permits.acquire().await.expect("never closed");
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(30), open(&sh, i)).await;
            drop(permit);
            match r.unwrap_or_else(|_| Err("timed out after 30 s".into())) {
                Ok(mut opened) => {
                    sh.tally.borrow_mut().live += 1;
                    let _ = tx.send(Ok((t.elapsed(), opened.id.take())));
                    drop(tx);
                    hold(sh, i, opened).await
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    false
                }
            }
        }));
    }
    drop(tx);
    let (mut open, mut failed, mut first_error) = (0, 0, None);
    let mut ids = Vec::new();
    let mut latency = measure::histogram();
    // One message per client; none left once every client sent its own (a
    // task that panicked sends none).
    while let Some(r) = rx.recv().await {
        match r {
            Ok((took, id)) => {
                open += 1;
                latency.saturating_record(took.as_micros() as u64);
                ids.extend(id);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let report = Report::Connected {
        open,
        failed,
        first_error,
        seconds: 0.0,
        latency: measure::to_buckets(&latency),
        ids,
    };
    (handles, report)
}

/// A TCP connection of client `i` to the server, from its source address.
async fn connect_tcp(cfg: &WorkerConfig, i: usize) -> Result<TcpStream, String> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(cfg.addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    let n = usize::from(cfg.source_addrs);
    if n > 0 && cfg.addr.is_ipv4() {
        let ip = Ipv4Addr::new(127, 0, 0, 2 + ((cfg.offset + i) % n) as u8);
        sock.bind(&SocketAddr::from((ip, 0)).into())
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let tcp = TcpSocket::from_std_stream(sock.into())
        .connect(cfg.addr)
        .await
        .map_err(|e| format!("connect to {}: {e}", cfg.addr))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(tcp)
}

/// Reads an HTTP response head: the head in lower case; `buf` keeps the
/// bytes after it.
async fn read_head(s: &mut Stream, buf: &mut Vec<u8>) -> Result<String, String> {
    let head = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > 16 << 10 || s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("no response".into());
        }
    };
    let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
    buf.drain(..head);
    Ok(text)
}

/// Reads the body of a response with a `Content-Length` (at most 1 MiB).
async fn read_body(s: &mut Stream, head: &str, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("an answer without a Content-Length")?;
    if len > 1 << 20 {
        return Err(format!("an answer of {len} bytes"));
    }
    while buf.len() < len {
        if s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the answer's body was cut".into());
        }
    }
    Ok(buf.drain(..len).collect())
}

/// The first line of a response head.
fn status_line(head: &str) -> &str {
    head.lines().next().unwrap_or_default()
}

/// `?` or `&`: how a parameter joins a path that may have a query.
fn query_sep(path: &str) -> char {
    if path.contains('?') {
        '&'
    } else {
        '?'
    }
}

/// Connects client `i`: TCP from its source address, then (unless in TCP
/// mode) the opening request of its transport and the mode's setup.
async fn open(sh: &Shared, i: usize) -> Result<Opened, String> {
    let cfg = &sh.cfg;
    let tcp = connect_tcp(cfg, i).await?;
    let mut s = match &sh.tls {
        Some((connector, name)) if cfg.mode != Mode::Tcp => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Stream::Tls(Box::new(tls))
        }
        _ => Stream::Plain(tcp),
    };
    let opened = |stream, rest| Opened {
        stream: Some(stream),
        rest,
        id: None,
        poll: None,
    };
    if cfg.mode == Mode::Tcp {
        return Ok(opened(s, Vec::new()));
    }
    send(&mut s, &sh.request).await?;
    let mut buf = Vec::with_capacity(1024);
    let text = read_head(&mut s, &mut buf).await?;
    match cfg.transport {
        Transport::WebSocket => {}
        Transport::Sse | Transport::SseBidirectional => {
            return open_sse(sh, i, s, &text, buf).await
        }
        Transport::LongPoll => {
            if !text.starts_with("http/1.1 200") {
                return Err(format!("long-poll refused: {}", status_line(&text)));
            }
            let body = read_body(&mut s, &text, &mut buf).await?;
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
            let cursor = v["cursor"].as_u64().ok_or("no cursor")?;
            let session = v["pushes"][0]["session"]
                .as_str()
                .ok_or_else(|| format!("no session in the opening answer: {v}"))?;
            // Between polls: no socket. (Kept, the gateway would hold it
            // until `handshake-timeout` waiting for a next request.)
            drop(s);
            return Ok(Opened {
                stream: None,
                rest: Vec::new(),
                id: None,
                poll: Some((session.to_owned(), cursor)),
            });
        }
    }
    if !text.starts_with("http/1.1 101")
        || !text.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=")
    {
        return Err(format!("handshake refused: {}", status_line(&text)));
    }
    if let Mode::Graphql { inputs } = cfg.mode {
        if !text.contains("sec-websocket-protocol: graphql-transport-ws") {
            return Err("graphql-transport-ws was not chosen".into());
        }
        let k = cfg.offset + i;
        graphql_subscribe(&mut s, &mut buf, k, k % inputs.max(1)).await?;
        return Ok(opened(s, buf));
    }
    let Mode::Receive {
        subscribe,
        greeting,
    } = &cfg.mode
    else {
        return Ok(opened(s, buf));
    };
    let mut id = None;
    if let Some(channel) = subscribe {
        // `connected` push, then the subscribe command and its reply.
        let cmd = format!(r#"{{"id":1,"cmd":"subscribe","channel":{channel:?}}}"#);
        let mut sent = false;
        loop {
            let v = next_json(&mut s, &mut buf).await?;
            if !sent && v["push"] == "connected" {
                send(&mut s, &client_frame(OP_TEXT, cmd.as_bytes())).await?;
                sent = true;
            } else if v["id"] == 1 {
                if v.get("result").is_none() {
                    return Err(format!("subscribe failed: {v}"));
                }
                break;
            }
        }
    } else if *greeting {
        let v = next_json(&mut s, &mut buf).await?;
        id = Some(
            v["connection_id"]
                .as_str()
                .ok_or_else(|| format!("greeting without an id: {v}"))?
                .to_owned(),
        );
    }
    let mut o = opened(s, buf);
    o.id = id;
    Ok(o)
}

/// The GraphQL query every subscriber runs (the origin answers any
/// subscription the same way).
pub(crate) const GRAPHQL_QUERY: &str = "subscription($input: String!) { value(input: $input) }";

/// The setup of a `graphql-transport-ws` subscriber `k` after its 101:
/// `connection_init`, `connection_ack`, `subscribe` (id `s<k>`, variables
/// `{"input": "input-<input>"}`) and its initial `next`.
async fn graphql_subscribe(
    s: &mut Stream,
    buf: &mut Vec<u8>,
    k: usize,
    input: usize,
) -> Result<(), String> {
    send(s, &client_frame(OP_TEXT, br#"{"type":"connection_init"}"#)).await?;
    let v = next_json(s, buf).await?;
    if v["type"] != "connection_ack" {
        return Err(format!("no connection_ack: {v}"));
    }
    let id = format!("s{k}");
    let subscribe = serde_json::json!({
        "id": id,
        "type": "subscribe",
        "payload": {"query": GRAPHQL_QUERY, "variables": {"input": format!("input-{input}")}},
    });
    send(s, &client_frame(OP_TEXT, subscribe.to_string().as_bytes())).await?;
    loop {
        let v = next_json(s, buf).await?;
        match v["type"].as_str() {
            Some("next") if v["id"] == id.as_str() => return Ok(()),
            Some("ping") => {
                let pong = br#"{"type":"pong"}"#;
                send(s, &client_frame(OP_TEXT, pong)).await?;
            }
            _ => return Err(format!("subscribe: {v}")),
        }
    }
}

/// The setup of an event stream, after its head: in idle mode, read the
/// first event with data (the gateway's `connected` push); in receive mode
/// with a channel, read events until `event: subscribed` (the gateway's
/// plain EventSource: every channel of the URL subscribed), or for
/// [`Transport::SseBidirectional`] subscribe with a `POST`ed command.
async fn open_sse(
    sh: &Shared,
    i: usize,
    mut s: Stream,
    head: &str,
    mut buf: Vec<u8>,
) -> Result<Opened, String> {
    if !head.starts_with("http/1.1 200") || !head.contains("content-type: text/event-stream") {
        return Err(format!("event stream refused: {}", status_line(head)));
    }
    if head.contains("transfer-encoding: chunked") {
        return Err("chunked event streams are not read by this tool".into());
    }
    match &sh.cfg.mode {
        Mode::Idle => loop {
            let ev = next_event(&mut s, &mut buf).await?;
            if event_lines(&ev).any(|l| l.starts_with(b"data:")) {
                break;
            }
        },
        Mode::Receive {
            subscribe: Some(channel),
            ..
        } if sh.cfg.transport == Transport::SseBidirectional => {
            subscribe_by_post(sh, i, &mut s, &mut buf, channel).await?;
        }
        Mode::Receive {
            subscribe: Some(_), ..
        } => loop {
            let ev = next_event(&mut s, &mut buf).await?;
            if event_lines(&ev).any(|l| l == b"event: subscribed") {
                break;
            }
            if event_lines(&ev).any(|l| l == b"event: error" || l == b"event: close") {
                return Err(format!(
                    "subscribe failed: {}",
                    String::from_utf8_lossy(&ev)
                ));
            }
        },
        _ => {}
    }
    Ok(Opened {
        stream: Some(s),
        rest: buf,
        id: None,
        poll: None,
    })
}

/// The JSON of an event's `data:` lines (joined), if any.
fn event_json(ev: &[u8]) -> Option<serde_json::Value> {
    let mut data = Vec::new();
    for l in event_lines(ev) {
        if let Some(d) = l.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
    serde_json::from_slice(&data).ok()
}

/// Subscribes a bidirectional SSE stream to `channel`: the session token
/// from the `connected` push, the `subscribe` command `POST`ed on a
/// connection of its own (`204` expected), then its reply on the stream.
async fn subscribe_by_post(
    sh: &Shared,
    i: usize,
    s: &mut Stream,
    buf: &mut Vec<u8>,
    channel: &str,
) -> Result<(), String> {
    let session = loop {
        let ev = next_event(s, buf).await?;
        if let Some(v) = event_json(&ev) {
            if v["push"] == "connected" {
                break v["session"]
                    .as_str()
                    .ok_or_else(|| format!("no session in {v}"))?
                    .to_owned();
            }
        }
    };
    let cfg = &sh.cfg;
    let host = cfg.target.split('/').next().unwrap_or_default();
    let path = cfg.target.split_once('/').map_or("", |(_, p)| p);
    let body = format!(r#"{{"id":1,"cmd":"subscribe","channel":{channel:?}}}"#);
    let req = format!(
        "POST /{path}{sep}session={session} HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: text/plain\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}",
        sep = query_sep(path),
        len = body.len()
    );
    let mut post = Stream::Plain(connect_tcp(cfg, i).await?);
    send(&mut post, req.as_bytes()).await?;
    let mut answer = Vec::new();
    let head = read_head(&mut post, &mut answer).await?;
    if !head.starts_with("http/1.1 204") {
        return Err(format!("subscribe POST refused: {}", status_line(&head)));
    }
    drop(post);
    loop {
        let ev = next_event(s, buf).await?;
        if let Some(v) = event_json(&ev) {
            if v["id"] == 1 {
                if v.get("result").is_none() {
                    return Err(format!("subscribe failed: {v}"));
                }
                return Ok(());
            }
        }
    }
}

/// The lines of an event.
fn event_lines(ev: &[u8]) -> impl Iterator<Item = &[u8]> {
    ev.split(|&b| b == b'\n')
}

/// Where the event at the start of `buf` ends (its blank line), if complete:
/// the event's length, without the `\n\n`.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(k) = buf[from..].iter().position(|&b| b == b'\n') {
        let at = from + k;
        if buf.get(at + 1) == Some(&b'\n') {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Reads the next complete event (comments included), during setup.
async fn next_event(s: &mut Stream, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    loop {
        if let Some(end) = event_end(buf) {
            let ev = buf[..end].to_vec();
            buf.drain(..end + 2);
            return Ok(ev);
        }
        if buf.len() > 1 << 20 || s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the event stream ended".into());
        }
    }
}

/// Reads the next data frame as JSON (answering pings), during setup.
async fn next_json(s: &mut Stream, buf: &mut Vec<u8>) -> Result<serde_json::Value, String> {
    let data = next_data(s, buf).await?;
    serde_json::from_slice(&data).map_err(|e| format!("not JSON: {e}"))
}

/// Most polls a long-poll client sends (the hold is bounded in time too).
const MAX_POLLS: usize = 1000;

/// Holds a long-poll session: between polls (no socket: the opening
/// answer's connection was closed) until [`Cmd::Poll`], then always one
/// poll waiting (polling again as soon as one is answered, on the same
/// connection while the gateway keeps it), until the worker is told to
/// close. Returns whether it held until then.
async fn hold_polls(sh: Rc<Shared>, i: usize, session: String, cursor: u64) -> bool {
    let mut close = sh.close.clone();
    let mut polling = sh.polling.clone();
    tokio::select! {
        r = polling.wait_for(|p| *p) => if r.is_err() { return false },
        _ = close.wait_for(|c| *c) => return true,
    }
    let r = tokio::select! {
        r = poll_loop(&sh, i, &session, cursor) => r,
        _ = close.wait_for(|c| *c) => Ok(()),
    };
    match r {
        Ok(()) => true,
        Err(e) => {
            sh.tally.borrow_mut().dropped(e);
            false
        }
    }
}

/// Polls, at most [`MAX_POLLS`] times.
async fn poll_loop(sh: &Shared, i: usize, session: &str, mut cursor: u64) -> Result<(), String> {
    let cfg = &sh.cfg;
    let host = cfg.target.split('/').next().unwrap_or_default();
    let path = cfg.target.split_once('/').map_or("", |(_, p)| p);
    let mut kept: Option<Stream> = None;
    let mut buf = Vec::new();
    // The first poll opens its connection with the others' handshakes in
    // flight bounded, as the openings were.
    let mut permit = Some(
        sh.first_poll_permits
            .acquire()
            .await
            .map_err(|e| e.to_string())?,
    );
    for k in 0..MAX_POLLS {
        let mut s = match kept.take() {
            Some(s) => s,
            None => {
                buf.clear();
                Stream::Plain(connect_tcp(cfg, i).await?)
            }
        };
        let req = format!(
            "GET /{path}{sep}transport=long-poll&session={session}&cursor={cursor} HTTP/1.1\r\n\
             Host: {host}\r\n\r\n",
            sep = query_sep(path)
        );
        send(&mut s, req.as_bytes()).await?;
        if k == 0 {
            sh.first_polls.set(sh.first_polls.get() + 1);
            permit.take();
        }
        let head = read_head(&mut s, &mut buf).await?;
        let body = read_body(&mut s, &head, &mut buf).await?;
        sh.tally.borrow_mut().polls_answered += 1;
        if !head.starts_with("http/1.1 200") {
            return Err(format!(
                "poll refused: {} {}",
                status_line(&head),
                String::from_utf8_lossy(&body)
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
        if let Some(c) = v.get("close") {
            return Err(format!("closed by the server: {c}"));
        }
        cursor = v["cursor"].as_u64().ok_or("no cursor")?;
        if !head.contains("connection: close") {
            kept = Some(s);
        }
    }
    Err(format!("{MAX_POLLS} polls answered during the hold"))
}

/// Holds a connection until the worker is told to close: reads and handles
/// frames or events (or, in echo mode, runs the echo loop when told; a
/// long-poll client polls, [`hold_polls`]). Returns whether the close was
/// clean (an event stream's is the client dropping it).
async fn hold(sh: Rc<Shared>, i: usize, o: Opened) -> bool {
    let Opened {
        stream,
        mut rest,
        poll,
        ..
    } = o;
    let mut s = match (stream, poll) {
        (_, Some((session, cursor))) => return hold_polls(sh, i, session, cursor).await,
        (Some(s), None) => s,
        (None, None) => return false,
    };
    let mut close = sh.close.clone();
    if let Mode::Echo(size) = sh.cfg.mode {
        let r = tokio::select! {
            r = echo_loop(&sh, &mut s, &mut rest, size) => r,
            _ = close.wait_for(|c| *c) => Ok(()),
        };
        if let Err(e) = r {
            sh.echoed.borrow_mut().error.get_or_insert(e);
            return false;
        }
        return close_ws(&mut s, &mut rest).await;
    }
    let tcp = sh.cfg.mode == Mode::Tcp;
    if matches!(s, Stream::Plain(_)) && rest.is_empty() {
        // A plain connection reads into the worker's buffer: give back the
        // setup's (about 1 KiB per idle client).
        rest = Vec::new();
    }
    let ended = loop {
        let mut pongs = Vec::new();
        let outcome = match &mut s {
            // TLS: read into the connection's own buffer.
            Stream::Tls(tls) => tokio::select! {
                r = tls.read_buf(&mut rest) => match r {
                    Ok(0) => Err("ended by the server".to_owned()),
                    Ok(_) => {
                        let data = std::mem::take(&mut rest);
                        handle(&sh, &data, &mut rest, &mut pongs)
                    }
                    Err(e) => Err(e.to_string()),
                },
                _ = close.wait_for(|c| *c) => break None,
            },
            // Plain: read when readable into the worker's shared buffer.
            Stream::Plain(stream) => {
                tokio::select! {
                    r = stream.readable() => if let Err(e) = r { break Some(e.to_string()) },
                    _ = close.wait_for(|c| *c) => break None,
                }
                let mut buf = sh.buf.borrow_mut();
                buf.clear();
                buf.extend_from_slice(&rest);
                rest.clear();
                buf.reserve(READ_CHUNK);
                match stream.try_read_buf(&mut *buf) {
                    Ok(0) => Err("ended by the server".to_owned()),
                    Ok(_) if tcp => Ok(()),
                    Ok(_) => handle(&sh, &buf, &mut rest, &mut pongs),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        if let Err(e) = outcome {
            break Some(e);
        }
        if !pongs.is_empty() && send(&mut s, &pongs).await.is_err() {
            break Some("cannot answer a ping".into());
        }
    };
    match ended {
        Some(why) => {
            sh.tally.borrow_mut().dropped(why);
            false
        }
        None if tcp
            || matches!(
                sh.cfg.transport,
                Transport::Sse | Transport::SseBidirectional
            ) =>
        {
            true
        }
        None => close_ws(&mut s, &mut rest).await,
    }
}

/// Handles what a connection read: frames, or events of an event stream.
fn handle(sh: &Shared, buf: &[u8], rest: &mut Vec<u8>, pongs: &mut Vec<u8>) -> Result<(), String> {
    match sh.cfg.transport {
        Transport::Sse | Transport::SseBidirectional => handle_events(sh, buf, rest),
        _ => handle_frames(sh, buf, rest, pongs),
    }
}

/// Handles the complete events of `buf`; keeps an incomplete one in
/// `rest`. A delivery is an event (ended by its blank line) with a stamp; a
/// comment-only event is a heartbeat (counted as a ping); `event: close`
/// ends the stream.
fn handle_events(sh: &Shared, buf: &[u8], rest: &mut Vec<u8>) -> Result<(), String> {
    let now = unix_nanos();
    let mut at = 0;
    while let Some(len) = event_end(&buf[at..]) {
        let ev = &buf[at..at + len];
        at += len + 2;
        if event_lines(ev).all(|l| l.starts_with(b":")) {
            sh.tally.borrow_mut().pings += 1;
        } else if event_lines(ev).any(|l| l == b"event: close") {
            return Err(format!(
                "closed by the server: {}",
                String::from_utf8_lossy(ev)
            ));
        } else if let Some((phase, seq, sent)) = find_stamp(ev) {
            let mut t = sh.tally.borrow_mut();
            if t.receipt(phase, seq, sent, now) {
                let _ = sh.out.send(Report::Reached(phase, seq));
            }
        }
    }
    rest.extend_from_slice(&buf[at..]);
    Ok(())
}

/// Handles the complete frames of `buf`; keeps an incomplete one in `rest`.
fn handle_frames(
    sh: &Shared,
    buf: &[u8],
    rest: &mut Vec<u8>,
    pongs: &mut Vec<u8>,
) -> Result<(), String> {
    let now = unix_nanos();
    let mut at = 0;
    while let Some(f) = next_frame(buf, at)? {
        let payload = &buf[f.payload.clone()];
        match f.opcode {
            OP_TEXT | OP_BINARY => {
                if let Some((phase, seq, sent)) = find_stamp(payload) {
                    let mut t = sh.tally.borrow_mut();
                    if t.receipt(phase, seq, sent, now) {
                        let _ = sh.out.send(Report::Reached(phase, seq));
                    }
                }
            }
            OP_PING => {
                sh.tally.borrow_mut().pings += 1;
                pongs.extend_from_slice(&client_frame(OP_PONG, payload));
            }
            OP_CLOSE => return Err(format!("closed by the server: {}", close_reason(payload))),
            _ => {}
        }
        at = f.payload.end;
    }
    rest.extend_from_slice(&buf[at..]);
    Ok(())
}

/// `code reason` of a close frame's payload.
fn close_reason(p: &[u8]) -> String {
    match p {
        [a, b, reason @ ..] => format!(
            "code {} {}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no code".into(),
    }
}

/// One client's echo loop, in the window of [`Cmd::Echo`]: sends a stamped
/// message, waits for the identical echo (5 s at most), and repeats.
async fn echo_loop(
    sh: &Shared,
    s: &mut Stream,
    rest: &mut Vec<u8>,
    size: usize,
) -> Result<(), String> {
    // The clients connect first; then the window is set.
    let mut window = sh.echo_window.clone();
    let (start_ns, warmup_ms, window_ms) = window
        .wait_for(Option::is_some)
        .await
        .map_err(|_| "the worker ended")?
        .expect("set");
    let measured_from = start_ns + warmup_ms * 1_000_000;
    let end = measured_from + window_ms * 1_000_000;
    tokio::time::sleep(Duration::from_nanos(start_ns.saturating_sub(unix_nanos()))).await;
    let mut seq = 0;
    loop {
        let t0 = unix_nanos();
        if t0 >= end {
            return Ok(());
        }
        seq += 1;
        let text = stamp(b'e', seq, t0, size);
        send(s, &client_frame(OP_TEXT, text.as_bytes())).await?;
        match tokio::time::timeout(Duration::from_secs(5), next_data(s, rest)).await {
            Ok(Ok(p)) if p == text.as_bytes() => {}
            Ok(Ok(_)) => return Err("the echo differs from the message".into()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("no echo within 5 s".into()),
        }
        let t1 = unix_nanos();
        if t0 >= measured_from && t1 <= end {
            let mut e = sh.echoed.borrow_mut();
            e.round_trips += 1;
            e.latency
                .get_or_insert_with(measure::histogram)
                .saturating_record((t1 - t0) / 1000);
        }
    }
}

/// The next data frame's payload (answering pings).
async fn next_data(s: &mut Stream, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    loop {
        if let Some(f) = next_frame(buf, 0)? {
            let payload = buf[f.payload.clone()].to_vec();
            buf.drain(..f.payload.end);
            match f.opcode {
                OP_TEXT | OP_BINARY => return Ok(payload),
                OP_PING => {
                    send(s, &client_frame(OP_PONG, &payload)).await?;
                }
                OP_CLOSE => {
                    return Err(format!("closed by the server: {}", close_reason(&payload)))
                }
                _ => {}
            }
            continue;
        }
        if s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection ended".into());
        }
    }
}

/// Sends a close frame (1000) and waits for the server's, bounded.
async fn close_ws(s: &mut Stream, rest: &mut Vec<u8>) -> bool {
    if send(s, &client_frame(OP_CLOSE, &1000u16.to_be_bytes()))
        .await
        .is_err()
    {
        return false;
    }
    let wait = async {
        loop {
            match next_data(s, rest).await {
                Ok(_) => {}
                Err(e) => return e.starts_with("closed by the server"),
            }
        }
    };
    tokio::time::timeout(CLOSE_TIMEOUT, wait)
        .await
        .unwrap_or(false)
}

// === The coordinator's side ===

/// Splits `total` clients over processes of at most `per_process`, at least
/// `min` of them: `(offset, count)` each.
pub(crate) fn shards(total: usize, per_process: usize, min: usize) -> Vec<(usize, usize)> {
    let per_process = per_process.clamp(1, MAX_PER_PROCESS);
    let n = total.div_ceil(per_process).max(min).min(total).max(1);
    (0..n)
        .map(|k| {
            let (a, b) = (total * k / n, total * (k + 1) / n);
            (a, b - a)
        })
        .collect()
}

/// The worker processes of a scenario, driven over their stdin/stdout.
#[derive(Debug)]
pub(crate) struct Fleet {
    children: Vec<tokio::process::Child>,
    stdins: Vec<tokio::process::ChildStdin>,
    reports: mpsc::UnboundedReceiver<(usize, Option<Report>)>,
}

impl Fleet {
    /// Starts one worker per config.
    pub(crate) fn spawn(configs: &[WorkerConfig]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let (tx, reports) = mpsc::unbounded_channel();
        let mut fleet = Self {
            children: Vec::new(),
            stdins: Vec::new(),
            reports,
        };
        for (i, cfg) in configs.iter().enumerate() {
            let mut child = tokio::process::Command::new(&exe)
                .arg("worker")
                .arg(serde_json::to_string(cfg).expect("configs serialize"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start a worker: {e}"))?;
            let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str(&line) {
                        Ok(r) => drop(tx.send((i, Some(r)))),
                        Err(_) => eprintln!("worker {i}: {line}"),
                    }
                }
                let _ = tx.send((i, None));
            });
            fleet.stdins.push(child.stdin.take().expect("piped"));
            fleet.children.push(child);
        }
        Ok(fleet)
    }

    /// Process ids of the workers.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(|c| c.id()).collect()
    }

    /// Number of workers.
    pub(crate) fn len(&self) -> usize {
        self.children.len()
    }

    /// Sends a command to every worker.
    pub(crate) async fn send(&mut self, cmd: &Cmd) -> Result<(), String> {
        let mut line = serde_json::to_vec(cmd).expect("commands serialize");
        line.push(b'\n');
        for s in &mut self.stdins {
            s.write_all(&line)
                .await
                .map_err(|e| format!("a worker is gone: {e}"))?;
        }
        Ok(())
    }

    /// The next report of any worker, until `deadline`; `Ok(None)` at the
    /// deadline; an error if a worker exited.
    pub(crate) async fn next(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(usize, Report)>, String> {
        match tokio::time::timeout_at(deadline.into(), self.reports.recv()).await {
            Err(_) => Ok(None),
            Ok(Some((i, Some(r)))) => Ok(Some((i, r))),
            Ok(_) => Err("a worker exited".into()),
        }
    }

    /// Collects one report per worker that `pick` takes, until `limit`.
    pub(crate) async fn collect<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut pick: impl FnMut(Report) -> Option<T>,
    ) -> Result<Vec<T>, String> {
        let deadline = Instant::now() + limit;
        let mut got: Vec<Option<T>> = (0..self.len()).map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            let Some((i, r)) = self.next(deadline).await? else {
                return Err(format!("timed out after {limit:?} waiting for {what}"));
            };
            if let Some(t) = pick(r) {
                got[i] = Some(t);
            }
        }
        Ok(got.into_iter().flatten().collect())
    }
}

/// What connecting a fleet gave: totals over the workers.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Connected {
    /// Connections open.
    pub(crate) open: usize,
    /// Connections that failed.
    pub(crate) failed: usize,
    /// The first failure.
    pub(crate) first_error: Option<String>,
    /// Until the last worker had all its connections, seconds.
    pub(crate) seconds: f64,
    /// Connections per second.
    pub(crate) rate: f64,
    /// Handshake latency.
    pub(crate) latency: measure::Percentiles,
    /// Connection ids from greetings, per worker.
    #[serde(skip)]
    pub(crate) ids: Vec<Vec<String>>,
}

/// Shares `total` handshakes in flight among the workers of `configs` (of
/// every node they target).
pub(crate) fn share_concurrency(configs: &mut [WorkerConfig], total: usize) {
    let k = configs.len().max(1);
    for c in configs {
        c.concurrency = total.div_ceil(k);
    }
}

impl Fleet {
    /// Sends [`Cmd::Connect`] and sums the workers' [`Report::Connected`].
    pub(crate) async fn connect(&mut self, limit: Duration) -> Result<Connected, String> {
        self.send(&Cmd::Connect).await?;
        let mut h = measure::histogram();
        let all = self
            .collect(limit, "the connections", |r| match r {
                Report::Connected {
                    open,
                    failed,
                    first_error,
                    seconds,
                    latency,
                    ids,
                } => Some((open, failed, first_error, seconds, latency, ids)),
                _ => None,
            })
            .await?;
        let mut c = Connected {
            open: 0,
            failed: 0,
            first_error: None,
            seconds: 0.0,
            rate: 0.0,
            latency: Default::default(),
            ids: Vec::new(),
        };
        for (open, failed, err, secs, lat, ids) in all {
            c.open += open;
            c.failed += failed;
            c.first_error = c.first_error.or(err);
            c.seconds = c.seconds.max(secs);
            measure::add_buckets(&mut h, &lat);
            c.ids.push(ids);
        }
        c.rate = c.open as f64 / c.seconds.max(1e-9);
        c.latency = measure::Percentiles::of(&h);
        Ok(c)
    }

    /// Collects every worker's receipts of `phase`.
    pub(crate) async fn receipts(&mut self, phase: u8) -> Result<Vec<Receipts>, String> {
        self.send(&Cmd::Receipts(phase)).await?;
        self.collect(Duration::from_secs(30), "receipts", |r| match r {
            Report::Receipts(r) => Some(*r),
            _ => None,
        })
        .await
    }

    /// Closes every connection gracefully; returns the clean closes.
    pub(crate) async fn close(&mut self) -> Result<usize, String> {
        self.send(&Cmd::Close).await?;
        let clean = self
            .collect(CLOSE_TIMEOUT * 3, "the closes", |r| match r {
                Report::Closed { clean } => Some(clean),
                _ => None,
            })
            .await?;
        Ok(clean.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::ws::frame::apply_mask;

    #[test]
    fn stamps_are_found_in_any_envelope() {
        let text = stamp(b's', 42, 1_700_000_000_123_456_789, 64);
        assert_eq!(text.len(), 64);
        let json = format!(r#"{{"push":"message","offset":7,"text":"{text}"}}"#);
        assert_eq!(
            find_stamp(json.as_bytes()),
            Some((b's', 42, 1_700_000_000_123_456_789))
        );
        assert_eq!(find_stamp(b"~~x~s12:~"), None);
    }

    #[test]
    fn client_frames_parse_back() {
        for len in [0, 125, 126, 70_000] {
            let payload = vec![7u8; len];
            let f = client_frame(OP_BINARY, &payload);
            let h = parse_header(&f).unwrap().unwrap();
            assert_eq!(h.payload_len, len as u64);
            let mut p = f[h.header_len..].to_vec();
            apply_mask(&mut p, h.mask.unwrap(), 0);
            assert_eq!(p, payload);
        }
    }

    #[test]
    fn events_end_at_their_blank_line() {
        let text = stamp(b'm', 7, 1_700_000_000_000_000_001, 64);
        let stream = format!("retry: 1000\n\n:\n\nid: e1:6,\ndata: {text}\n\nid: 2\ndata: {{\"pu");
        let b = stream.as_bytes();
        let first = event_end(b).unwrap();
        assert_eq!(&b[..first], b"retry: 1000");
        let mut at = first + 2;
        let second = event_end(&b[at..]).unwrap();
        assert!(event_lines(&b[at..at + second]).all(|l| l.starts_with(b":")));
        at += second + 2;
        let third = event_end(&b[at..]).unwrap();
        let ev = &b[at..at + third];
        assert_eq!(find_stamp(ev), Some((b'm', 7, 1_700_000_000_000_000_001)));
        at += third + 2;
        // Incomplete: kept for the next read.
        assert_eq!(event_end(&b[at..]), None);
        assert_eq!(query_sep("x?channel=a:b"), '&');
        assert_eq!(query_sep(""), '?');
    }

    #[test]
    fn shards_respect_the_limit() {
        let s = shards(100_000, 19_000, 1);
        assert_eq!(s.len(), 6);
        assert!(s.iter().all(|&(_, n)| n <= 19_000));
        assert_eq!(s.iter().map(|s| s.1).sum::<usize>(), 100_000);
        assert_eq!(shards(10, 19_000, 2), vec![(0, 5), (5, 5)]);
    }
}
