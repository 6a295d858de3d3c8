//! The child roles: `worker` (a shard of clients) and `acceptor` (the plain
//! tokio accept loop of the TCP baseline). Both run a single-threaded tokio
//! runtime, take commands on stdin and report on stdout (see
//! [`crate::proto`]), and exit at once when stdin reaches end-of-file.
//!
//! `fanout` subscribers bypass tungstenite once connected and read raw
//! frames (see [`crate::subscriber`]).
//!
//! With `--tls-ca`, WebSocket clients do a TLS handshake (see [`crate::tls`])
//! before the WebSocket one, and the same code drives the TLS stream.

use crate::proto::{self, Report};
use crate::subscriber::{self, Tally};
use crate::tls::TlsClient;
use crate::util::{self, parse_duration};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, timeout, timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Time allowed for a graceful WebSocket close (our close frame, the echo).
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// What the clients of a worker do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Plain TCP connections, held until `close` (the TCP baseline).
    Tcp,
    /// WebSocket connections held idle (reading, so pings are answered) until `close`.
    Idle,
    /// WebSocket clients in send / wait-for-echo loops after `run`.
    Echo,
    /// Receive-only WebSocket clients (`cross-node`): each reads its
    /// connection id from the origin's welcome message, reports it, then
    /// records the stamped messages pushed to it through the control API
    /// until `close`; `report` sends and resets the records.
    Recv,
    /// Channel subscribers (`fanout`): each offers `--subprotocol` (if
    /// given), sends the native `subscribe` command for `--subscribe` (if
    /// given) and waits for its reply, then reads raw frames and records the
    /// stamped publications until `close`; `report` sends and resets the
    /// records, and a single-phase message that every live subscriber of the
    /// worker has is reported at once.
    Fanout,
}

/// Options of the hidden `worker` subcommand (set by the coordinator).
#[derive(Debug, Clone, Args)]
pub(crate) struct WorkerArgs {
    /// What the clients do.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Target address (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// WebSocket URL (modes `idle` and `echo`).
    #[arg(long, default_value = "")]
    url: String,
    /// Clients of this worker.
    #[arg(long)]
    count: usize,
    /// Global index of this worker's first client (spreads source addresses).
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Connect in this many equal steps, one per `go` command.
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N); 0: unbound.
    #[arg(long, default_value_t = 16)]
    source_addrs: u8,
    /// Connects + handshakes in flight at once.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Bound of the connect phase.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Bound of one connect + handshake.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Longest wait for a command from the coordinator.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    command_timeout: Duration,
    /// Echo: message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Echo: binary instead of text messages.
    #[arg(long)]
    binary: bool,
    /// Echo: unmeasured time before the measured window.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Echo: the measured window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Echo: longest wait for one echo.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    reply_timeout: Duration,
    /// Fanout: WebSocket subprotocol to offer (and require in the answer).
    #[arg(long)]
    subprotocol: Option<String>,
    /// Fanout: channel to subscribe to with the native `subscribe` command
    /// once the `connected` push has arrived; without it the connection is
    /// subscribed by its URL (nchan).
    #[arg(long)]
    subscribe: Option<String>,
    /// Speak TLS (a `wss://` URL), trusting the CA certificate(s) of this PEM
    /// file; modes `idle`, `echo` and `recv` only.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the server's certificate must hold (and SNI).
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
}

/// Options of the hidden `acceptor` subcommand.
#[derive(Debug, Clone, Args)]
pub(crate) struct AcceptorArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Sockets to accept before reporting.
    #[arg(long)]
    expect: u64,
    /// Longest time to accept and hold.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    limit: Duration,
}

/// Writes one report line to stdout.
fn emit(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", r.to_line());
    let _ = out.flush();
}

/// Forwards stdin lines; exits the process at end-of-file (the coordinator
/// is done or gone).
fn stdin_commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    rx
}

/// Waits for the command `want`, skipping blank lines.
async fn wait_command(
    rx: &mut mpsc::UnboundedReceiver<String>,
    want: &str,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        match timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(format!("no {want:?} command within {limit:?}")),
            Ok(None) => return Err("stdin closed".into()),
            Ok(Some(c)) if c == want => return Ok(()),
            Ok(Some(c)) if c.is_empty() => {}
            Ok(Some(c)) => return Err(format!("unexpected command {c:?} (waiting for {want:?})")),
        }
    }
}

/// The next non-blank command.
async fn next_command(
    rx: &mut mpsc::UnboundedReceiver<String>,
    limit: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        match timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(format!("no command within {limit:?}")),
            Ok(None) => return Err("stdin closed".into()),
            Ok(Some(c)) if c.is_empty() => {}
            Ok(Some(c)) => return Ok(c),
        }
    }
}

/// The acceptor: binds, reports its address, accepts `expect` sockets and
/// holds them until stdin closes.
pub(crate) fn run_acceptor(a: AcceptorArgs) -> Result<ExitCode, String> {
    util::require_loopback(a.listen)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(a.listen),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(|e| e.to_string())?;
        socket.set_reuse_address(true).map_err(|e| e.to_string())?;
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        socket
            .bind(&a.listen.into())
            .map_err(|e| format!("cannot bind {}: {e}", a.listen))?;
        // Same backlog request as the gateway (the kernel caps it at somaxconn).
        socket.listen(65_535).map_err(|e| e.to_string())?;
        let listener =
            tokio::net::TcpListener::from_std(socket.into()).map_err(|e| e.to_string())?;
        let _commands = stdin_commands();
        emit(&Report::Listening {
            addr: listener.local_addr().map_err(|e| e.to_string())?,
        });
        let deadline = Instant::now() + a.limit;
        let mut held = Vec::with_capacity(a.expect as usize);
        let mut first = None;
        while (held.len() as u64) < a.expect {
            match timeout_at(deadline, listener.accept()).await {
                Err(_) => break,
                Ok(Ok((s, _))) => {
                    first.get_or_insert_with(Instant::now);
                    held.push(s);
                }
                // EMFILE and friends: back off instead of spinning.
                Ok(Err(_)) => sleep(Duration::from_millis(10)).await,
            }
        }
        let span_s = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
        emit(&Report::Accepted {
            count: held.len() as u64,
            span_s,
        });
        // Hold until stdin closes (which exits the process) or the limit.
        tokio::time::sleep_until(deadline).await;
        drop(held);
        Ok(ExitCode::SUCCESS)
    })
}

/// State shared by a worker's client tasks.
#[derive(Debug)]
struct Shared {
    args: WorkerArgs,
    ws_config: WebSocketConfig,
    /// The TLS client, with `--tls-ca`.
    tls: Option<TlsClient>,
    /// The handshake request, built once.
    request: Vec<u8>,
    ok: AtomicU64,
    failed: AtomicU64,
    /// Connect attempts launched so far (over all steps).
    target: AtomicU64,
    /// Connections that ended after being established.
    ended: AtomicU64,
    closed: AtomicU64,
    dropped: AtomicU64,
    pings: AtomicU64,
    first_error: Mutex<Option<String>>,
    first_drop: Mutex<Option<String>>,
    connect_us: Mutex<Histogram<u64>>,
    /// Fired when the last connect attempt of a step ends.
    all_attempted: Notify,
    // Echo.
    round_trips: AtomicU64,
    round_trips_total: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    mismatches: AtomicU64,
    rtt_us: Mutex<Histogram<u64>>,
    // Recv.
    /// Connection ids learned from the welcome messages.
    ids: Mutex<Vec<String>>,
    /// Stamped messages received since the last report.
    received: Mutex<Received>,
    // Fanout.
    /// Publications received since the last report.
    tally: Mutex<Tally>,
}

/// What `recv` clients received since the last `report`.
#[derive(Debug)]
struct Received {
    single: u64,
    single_us: Histogram<u64>,
    /// Per batch command: receipts and the latest receipt's latency.
    batch: std::collections::HashMap<u64, (u64, u64)>,
    batch_us: Histogram<u64>,
    warmup: u64,
    unparsed: u64,
}

impl Received {
    fn new() -> Self {
        Self {
            single: 0,
            single_us: util::new_histogram(),
            batch: std::collections::HashMap::new(),
            batch_us: util::new_histogram(),
            warmup: 0,
            unparsed: 0,
        }
    }

    /// Records one data message, received now.
    fn record(&mut self, data: &[u8]) {
        let Some((phase, seq, ts_ns)) = proto::parse_stamp(data) else {
            self.unparsed += 1;
            return;
        };
        let us = (util::unix_nanos().saturating_sub(ts_ns) / 1000).max(1);
        match phase {
            proto::PHASE_SINGLE => {
                self.single += 1;
                self.single_us.saturating_record(us);
            }
            proto::PHASE_BATCH => {
                let e = self.batch.entry(seq).or_insert((0, 0));
                e.0 += 1;
                e.1 = e.1.max(us);
                self.batch_us.saturating_record(us);
            }
            _ => self.warmup += 1,
        }
    }
}

impl Shared {
    fn note(slot: &Mutex<Option<String>>, msg: String) {
        let mut s = slot.lock().expect("not poisoned");
        s.get_or_insert(msg);
    }

    /// Records the end of one connect attempt.
    fn attempted(&self, result: Result<(), &str>, took: Duration) {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Relaxed);
                let us = took.as_micros().max(1) as u64;
                self.connect_us
                    .lock()
                    .expect("not poisoned")
                    .saturating_record(us);
            }
            Err(e) => {
                self.failed.fetch_add(1, Relaxed);
                Self::note(&self.first_error, e.to_owned());
            }
        }
        if self.attempts_done() == self.target.load(Relaxed) {
            self.all_attempted.notify_one();
        }
    }

    /// Connect attempts that have ended.
    fn attempts_done(&self) -> u64 {
        self.ok.load(Relaxed) + self.failed.load(Relaxed)
    }

    /// Connections established and not ended.
    fn live(&self) -> u64 {
        self.ok
            .load(Relaxed)
            .saturating_sub(self.ended.load(Relaxed))
    }

    /// Source address of client `i`: 127.0.0.(2 + (offset + i) mod N).
    fn source_ip(&self, i: usize) -> Option<Ipv4Addr> {
        let n = usize::from(self.args.source_addrs);
        (n > 0 && self.args.addr.is_ipv4())
            .then(|| Ipv4Addr::new(127, 0, 0, 2 + ((self.args.offset + i) % n) as u8))
    }
}

/// Connects a TCP socket to `addr`, bound to `src` first if given.
async fn connect_tcp(addr: SocketAddr, src: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    if let Some(ip) = src {
        sock.bind(&SocketAddr::from((ip, 0)).into())?;
    }
    let stream = TcpSocket::from_std_stream(sock.into())
        .connect(addr)
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An established client connection.
enum Conn {
    Tcp(TcpStream),
    Ws(Box<WebSocketStream<TcpStream>>),
    /// A WebSocket over TLS (`--tls-ca`).
    Wss(Box<WebSocketStream<TlsStream<TcpStream>>>),
    /// A `fanout` subscriber: the socket after the handshake (and the
    /// subscribe reply), and the bytes already read past them.
    Raw(TcpStream, Vec<u8>),
}

/// Connects client `i` (and does the WebSocket handshake unless in TCP mode).
async fn open(sh: &Shared, i: usize) -> Result<Conn, String> {
    let stream = connect_tcp(sh.args.addr, sh.source_ip(i))
        .await
        .map_err(|e| format!("connect to {}: {e}", sh.args.addr))?;
    if sh.args.mode == Mode::Tcp {
        return Ok(Conn::Tcp(stream));
    }
    if sh.args.mode == Mode::Fanout {
        let (mut stream, rest) =
            raw_handshake(stream, &sh.request, sh.args.subprotocol.as_deref()).await?;
        let rest = match &sh.args.subscribe {
            Some(channel) => native_subscribe(&mut stream, rest, channel).await?,
            None => rest,
        };
        return Ok(Conn::Raw(stream, rest));
    }
    match &sh.tls {
        None => Ok(Conn::Ws(Box::new(open_ws(sh, stream).await?))),
        Some(tls) => {
            let stream = tls
                .connect(stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok(Conn::Wss(Box::new(open_ws(sh, stream).await?)))
        }
    }
}

/// The WebSocket handshake over a connected stream (and, in `recv` mode,
/// the origin's welcome message).
async fn open_ws<S>(sh: &Shared, stream: S) -> Result<WebSocketStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ws = client_handshake(stream, &sh.request, sh.ws_config)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    if sh.args.mode == Mode::Recv {
        // The coordinator's origin answers `connect` with one welcome
        // message: the connection's id.
        let id = next_data(&mut ws)
            .await
            .map_err(|e| format!("welcome message: {e}"))?;
        let id = String::from_utf8(id.to_vec())
            .map_err(|_| "welcome message is not UTF-8".to_owned())?;
        sh.ids.lock().expect("not poisoned").push(id);
    }
    Ok(ws)
}

/// The RFC 6455 sample key and its accept value. One fixed key keeps the
/// client's handshake cost (and so its share of the CPU) minimal; the gateway
/// still does its full work (SHA-1 included) for every connection.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Largest handshake response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// The opening handshake request for `url` (`ws://authority/path` or
/// `wss://...`), offering `subprotocol` if given.
fn handshake_request(url: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let offer = subprotocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    )
    .into_bytes()
}

/// Checks a response head: status 101, the expected `Sec-WebSocket-Accept`
/// and, if one was offered, the subprotocol.
fn check_response(head: &str, subprotocol: Option<&str>) -> Result<(), String> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(format!("expected 101, got {status:?}"));
    }
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim(), v.trim()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    match header("sec-websocket-accept") {
        Some(WS_ACCEPT) => {}
        other => return Err(format!("bad Sec-WebSocket-Accept {other:?}")),
    }
    match (subprotocol, header("sec-websocket-protocol")) {
        (Some(want), got) if got != Some(want) => Err(format!(
            "subprotocol {want:?} offered, the answer has {got:?}"
        )),
        _ => Ok(()),
    }
}

/// A minimal client handshake: writes the prebuilt request, reads the
/// response head, checks it, and hands the socket (with any bytes read past
/// the head) to tungstenite.
async fn client_handshake<S>(
    stream: S,
    request: &[u8],
    config: WebSocketConfig,
) -> Result<WebSocketStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (stream, rest) = raw_handshake(stream, request, None).await?;
    Ok(WebSocketStream::from_partially_read(stream, rest, Role::Client, Some(config)).await)
}

/// The handshake itself: writes the prebuilt request, reads and checks the
/// response head; returns the socket and the bytes read past the head.
async fn raw_handshake<S>(
    mut stream: S,
    request: &[u8],
    subprotocol: Option<&str>,
) -> Result<(S, Vec<u8>), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    // A no-op on a socket; over TLS, sends the records still buffered.
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(512);
    // Bounded by MAX_RESPONSE_HEAD (and the caller's timeout).
    let head_len = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err("response head too large".into());
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    check_response(&String::from_utf8_lossy(&buf[..head_len]), subprotocol)?;
    let rest = buf.split_off(head_len);
    Ok((stream, rest))
}

/// Reads from `stream` into `buf` (more bytes of a frame), failing at
/// end-of-file.
async fn read_into(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) => Err("connection ended".into()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(format!("read failed: {e}")),
    }
}

/// The native protocol's setup: waits for the `connected` push, sends
/// `{"id":1,"cmd":"subscribe","channel":...}` and waits for its reply (the
/// only JSON a subscriber parses). Returns the bytes read past the reply.
/// Bounded by the caller's handshake timeout.
async fn native_subscribe(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    channel: &str,
) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncWriteExt;
    let mut subscribed = false;
    loop {
        let Some(f) = subscriber::next_frame(&buf)? else {
            read_into(stream, &mut buf).await?;
            continue;
        };
        let payload = &buf[f.start..f.end];
        match f.opcode {
            subscriber::OP_TEXT if !subscribed => {
                let v: serde_json::Value = serde_json::from_slice(payload)
                    .map_err(|e| format!("first frame is not JSON: {e}"))?;
                if v.get("push").and_then(|p| p.as_str()) != Some("connected") {
                    return Err(format!("expected the `connected` push, got {v}"));
                }
                let cmd = serde_json::json!({"id": 1, "cmd": "subscribe", "channel": channel});
                let frame =
                    subscriber::client_frame(subscriber::OP_TEXT, cmd.to_string().as_bytes());
                stream
                    .write_all(&frame)
                    .await
                    .map_err(|e| format!("cannot send subscribe: {e}"))?;
                subscribed = true;
            }
            subscriber::OP_TEXT => {
                let v: serde_json::Value = serde_json::from_slice(payload)
                    .map_err(|e| format!("frame is not JSON: {e}"))?;
                if v.get("id").and_then(|i| i.as_u64()) == Some(1) {
                    if v.get("result").is_some() {
                        buf.drain(..f.end);
                        return Ok(buf);
                    }
                    return Err(format!("subscribe to {channel:?} failed: {v}"));
                }
                // Another push before the reply (none is expected): skipped.
            }
            subscriber::OP_PING => {
                let pong = subscriber::client_frame(subscriber::OP_PONG, payload);
                stream.write_all(&pong).await.map_err(|e| e.to_string())?;
            }
            subscriber::OP_CLOSE => {
                return Err(format!(
                    "closed by the server before subscribing: {}",
                    subscriber::close_reason(payload)
                ))
            }
            _ => {}
        }
        buf.drain(..f.end);
    }
}

/// One client: connect, then hold (TCP, idle) or run echo loops.
async fn client(
    sh: Arc<Shared>,
    i: usize,
    permit: OwnedSemaphorePermit,
    close: watch::Receiver<bool>,
    run: watch::Receiver<Option<Instant>>,
) {
    let started = Instant::now();
    let result = match timeout(sh.args.handshake_timeout, open(&sh, i)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "connect + handshake took over {:?}",
            sh.args.handshake_timeout
        )),
    };
    drop(permit);
    let conn = match result {
        Ok(c) => {
            sh.attempted(Ok(()), started.elapsed());
            c
        }
        Err(e) => {
            sh.attempted(Err(&e), started.elapsed());
            return;
        }
    };
    match conn {
        Conn::Tcp(s) => hold_tcp(&sh, s, close).await,
        Conn::Raw(s, rest) => hold_subscriber(&sh, s, rest, close).await,
        Conn::Ws(ws) => use_ws(&sh, i, *ws, close, run).await,
        Conn::Wss(ws) => use_ws(&sh, i, *ws, close, run).await,
    }
    sh.ended.fetch_add(1, Relaxed);
}

/// Holds a WebSocket connection (`idle`, `recv`) or runs its echo loop.
async fn use_ws<S>(
    sh: &Shared,
    i: usize,
    ws: WebSocketStream<S>,
    close: watch::Receiver<bool>,
    run: watch::Receiver<Option<Instant>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if matches!(sh.args.mode, Mode::Idle | Mode::Recv) {
        hold_ws(sh, ws, close).await
    } else {
        echo_loop(sh, i, ws, run).await
    }
}

/// Holds a plain TCP connection until `close` (or the peer ends it).
async fn hold_tcp(sh: &Shared, mut s: TcpStream, mut close: watch::Receiver<bool>) {
    let mut byte = [0u8; 1];
    tokio::select! {
        _ = close.wait_for(|c| *c) => {
            sh.closed.fetch_add(1, Relaxed);
        }
        r = s.read(&mut byte) => {
            sh.dropped.fetch_add(1, Relaxed);
            Shared::note(&sh.first_drop, format!("TCP connection ended by the peer: {r:?}"));
        }
    }
}

/// Holds a WebSocket connection, reading so that pings are answered (and
/// recording data messages, which only `recv` clients get), until `close`;
/// then closes it gracefully.
async fn hold_ws<S>(sh: &Shared, mut ws: WebSocketStream<S>, mut close: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let dropped = loop {
        tokio::select! {
            biased;
            _ = close.wait_for(|c| *c) => break None,
            m = ws.next() => match m {
                Some(Ok(Message::Ping(_))) => {
                    // tungstenite has queued the pong; it is flushed by the next read.
                    sh.pings.fetch_add(1, Relaxed);
                }
                Some(Ok(Message::Close(f))) => break Some(format!("closed by the gateway: {f:?}")),
                Some(Ok(Message::Text(t))) => sh.received.lock().expect("not poisoned").record(t.as_bytes()),
                Some(Ok(Message::Binary(b))) => sh.received.lock().expect("not poisoned").record(&b),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(format!("read failed: {e}")),
                None => break Some("connection ended".to_owned()),
            },
        }
    };
    match dropped {
        None => {
            graceful_close(&mut ws).await;
            sh.closed.fetch_add(1, Relaxed);
        }
        Some(why) => {
            sh.dropped.fetch_add(1, Relaxed);
            Shared::note(&sh.first_drop, why);
        }
    }
}

thread_local! {
    /// The read buffer all `fanout` subscribers of the worker's thread share:
    /// a subscriber keeps only the bytes of a frame cut by a read's end.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 << 10]);
}

/// Reads everything available on `s` now and walks its frames: data goes to
/// the worker's tally, pings are answered. Returns `Ok(Some(reason))` at the
/// server's close frame or end-of-file, `Ok(None)` when the socket is drained.
///
/// A read shorter than the buffer took everything queued, so it ends the pass
/// and clears the socket's readiness at once, without the extra read that
/// would only say `WouldBlock` (one system call less per wake-up). That is
/// safe: the runtime clears readiness only if no event came since it was
/// observed, and more data raises a new edge-triggered event.
fn drain_subscriber(
    sh: &Shared,
    s: &TcpStream,
    pending: &mut Vec<u8>,
) -> Result<Option<String>, String> {
    use std::io::{ErrorKind, Read};
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        // Bounded: each pass reads new bytes; the socket drains or ends.
        loop {
            let step = s.try_io(tokio::io::Interest::READABLE, || {
                let n = (&*socket2::SockRef::from(s)).read(&mut scratch[..])?;
                if n == 0 {
                    return Ok(Some("connection ended".to_owned()));
                }
                if let Some(reason) = subscriber_bytes(sh, s, pending, &scratch[..n])
                    .map_err(std::io::Error::other)?
                {
                    return Ok(Some(reason));
                }
                if n < scratch.len() {
                    return Err(ErrorKind::WouldBlock.into());
                }
                Ok(None)
            });
            match step {
                Ok(None) => {}
                Ok(Some(reason)) => return Ok(Some(reason)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    })
}

/// Walks the frames of `data`, just read (after the `pending` bytes of a
/// frame cut by the previous read): records the publications, emits a
/// single-phase message's completion, answers pings. Returns the server's
/// close reason if it closed.
fn subscriber_bytes(
    sh: &Shared,
    s: &TcpStream,
    pending: &mut Vec<u8>,
    data: &[u8],
) -> Result<Option<String>, String> {
    let now = util::unix_nanos();
    let mut control = subscriber::Control::default();
    let mut complete = None;
    let live = sh.live();
    {
        let mut tally = sh.tally.lock().expect("not poisoned");
        let mut on_single = |(seq, count, last_us): proto::Receipts| {
            if count == live {
                complete = Some(Report::FanoutComplete {
                    seq,
                    count,
                    last_us,
                });
            }
        };
        if pending.is_empty() {
            let used = subscriber::process(data, now, &mut tally, &mut control, &mut on_single)?;
            pending.extend_from_slice(&data[used..]);
        } else {
            pending.extend_from_slice(data);
            let used = subscriber::process(pending, now, &mut tally, &mut control, &mut on_single)?;
            pending.drain(..used);
        }
    }
    if let Some(r) = complete {
        emit(&r);
    }
    for pong in &control.pongs {
        // Best effort: a full socket buffer only delays the pong past the
        // gateway's timeout if it stays full that long.
        let _ = s.try_write(pong);
    }
    if let Some(reason) = control.closed {
        return Ok(Some(format!("closed by the server: {reason}")));
    }
    if pending.len() > subscriber::MAX_FRAME + 16 {
        return Err("frame larger than the limit".into());
    }
    Ok(None)
}

/// Holds a `fanout` subscriber: reads raw frames (see [`drain_subscriber`])
/// until `close`, then closes gracefully.
async fn hold_subscriber(
    sh: &Shared,
    mut s: TcpStream,
    mut pending: Vec<u8>,
    mut close: watch::Receiver<bool>,
) {
    // Frames that arrived with the handshake or the subscribe reply.
    let mut ended = if pending.is_empty() {
        Ok(None)
    } else {
        let now = util::unix_nanos();
        let mut control = subscriber::Control::default();
        let r = {
            let mut tally = sh.tally.lock().expect("not poisoned");
            subscriber::process(&pending, now, &mut tally, &mut control, |_| {})
        };
        r.map(|used| {
            pending.drain(..used);
            control.closed
        })
    };
    // The setup's read buffer is not needed any more: an idle subscriber
    // holds no buffer (reads go to the thread's shared one).
    pending.shrink_to_fit();
    // Made once: a fresh `wait_for` per wake-up would register and drop a
    // waiter every time.
    let closing = close.wait_for(|c| *c);
    tokio::pin!(closing);
    // Bounded by `close` (or the connection's end).
    while matches!(ended, Ok(None)) {
        tokio::select! {
            biased;
            _ = &mut closing => break,
            r = s.readable() => {
                ended = match r {
                    Ok(()) => drain_subscriber(sh, &s, &mut pending),
                    Err(e) => Err(format!("read failed: {e}")),
                };
            }
        }
    }
    let why = match ended {
        Ok(None) => None,
        Ok(Some(why)) | Err(why) => Some(why),
    };
    match why {
        None => {
            let _ = timeout(CLOSE_WAIT, async {
                use tokio::io::AsyncWriteExt;
                let frame = subscriber::client_frame(subscriber::OP_CLOSE, &1000u16.to_be_bytes());
                if s.write_all(&frame).await.is_err() {
                    return;
                }
                // Until the server's close frame and end-of-file.
                let mut sink = [0u8; 4096];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            sh.closed.fetch_add(1, Relaxed);
        }
        Some(why) => {
            sh.dropped.fetch_add(1, Relaxed);
            Shared::note(&sh.first_drop, why);
        }
    }
}

/// Sends a close frame and reads until the peer's close (bounded).
async fn graceful_close<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = timeout(CLOSE_WAIT, async {
        if ws.close(None).await.is_err() {
            return;
        }
        // Bounded by the timeout; ends at the peer's close frame or EOF.
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// The next data message's payload, skipping control frames.
async fn next_data<S>(ws: &mut WebSocketStream<S>) -> Result<Bytes, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Bounded by the caller's timeout.
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(Bytes::from(t)),
            Some(Ok(Message::Binary(b))) => return Ok(b),
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the gateway: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read failed: {e}")),
            None => return Err("connection ended".into()),
        }
    }
}

/// Writes `seq` as 16 hex digits over the start of `payload` (as much as fits).
fn stamp(payload: &mut [u8], seq: u64) {
    let hex = format!("{seq:016x}");
    let n = payload.len().min(16);
    payload[..n].copy_from_slice(&hex.as_bytes()[16 - n..]);
}

/// One echo client: after `run`, send / wait for the echo / repeat until the
/// end of the measured window; round trips that start after the warmup and
/// end inside the window are recorded.
async fn echo_loop<S>(
    sh: &Shared,
    i: usize,
    mut ws: WebSocketStream<S>,
    mut run: watch::Receiver<Option<Instant>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let a = &sh.args;
    let start = match timeout(a.command_timeout, run.wait_for(Option::is_some)).await {
        Ok(Ok(v)) => v.expect("waited for Some"),
        _ => return,
    };
    let measure_from = start + a.warmup;
    let end = measure_from + a.duration;
    // ASCII filler (valid UTF-8 for text messages), different per client.
    let mut payload: Vec<u8> = (0..a.size).map(|k| b'a' + ((i + k) % 26) as u8).collect();
    let mut seq = 0u64;
    let outcome: Result<(), String> = loop {
        if Instant::now() >= end {
            break Ok(());
        }
        seq += 1;
        stamp(&mut payload, seq);
        let msg = if a.binary {
            Message::binary(payload.clone())
        } else {
            Message::text(String::from_utf8(payload.clone()).expect("ASCII payload"))
        };
        let t0 = Instant::now();
        if let Err(e) = ws.send(msg).await {
            break Err(format!("send failed: {e}"));
        }
        let reply = timeout(a.reply_timeout, next_data(&mut ws)).await;
        let t1 = Instant::now();
        match reply {
            Err(_) => {
                sh.timeouts.fetch_add(1, Relaxed);
                break Err(format!("no echo within {:?}", a.reply_timeout));
            }
            Ok(Err(e)) => break Err(e),
            Ok(Ok(data)) if data[..] != payload[..] => {
                sh.mismatches.fetch_add(1, Relaxed);
                break Err(format!(
                    "echo differs from the message sent (seq {seq}, {} bytes back)",
                    data.len()
                ));
            }
            Ok(Ok(_)) => {
                sh.round_trips_total.fetch_add(1, Relaxed);
                if t0 >= measure_from && t1 <= end {
                    sh.round_trips.fetch_add(1, Relaxed);
                    let us = (t1 - t0).as_micros().max(1) as u64;
                    sh.rtt_us
                        .lock()
                        .expect("not poisoned")
                        .saturating_record(us);
                }
            }
        }
    };
    if let Err(e) = outcome {
        sh.errors.fetch_add(1, Relaxed);
        Shared::note(&sh.first_error, e);
    }
    graceful_close(&mut ws).await;
}

/// The worker: waits for `go`, connects its clients, reports, then holds
/// (until `close`) or runs echo loops (after `run`), and reports again.
pub(crate) fn run_worker(args: WorkerArgs) -> Result<ExitCode, String> {
    util::require_loopback(args.addr)?;
    if args.mode != Mode::Tcp {
        let url_addr = util::loopback_ws_addr(&args.url)?;
        if url_addr.port() != args.addr.port() {
            return Err(format!(
                "--url {} does not match --addr {}",
                args.url, args.addr
            ));
        }
        if args.url.starts_with("wss://") != args.tls_ca.is_some() {
            return Err(format!(
                "--url {}: a wss:// URL goes with --tls-ca, a ws:// one without",
                args.url
            ));
        }
    }
    let tls = match &args.tls_ca {
        Some(_) if matches!(args.mode, Mode::Tcp | Mode::Fanout) => {
            return Err(format!("--tls-ca does not apply to mode {:?}", args.mode));
        }
        Some(ca) => Some(TlsClient::load(ca, &args.tls_server_name)?),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(worker_main(args, tls))
}

async fn worker_main(args: WorkerArgs, tls: Option<TlsClient>) -> Result<ExitCode, String> {
    let mut commands = stdin_commands();
    // Small client buffers: the tool holds tens of thousands of these.
    let read_buf = if args.mode == Mode::Echo {
        (args.size + 64).clamp(4096, 1 << 20)
    } else {
        4096
    };
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(read_buf)
        .write_buffer_size(0);
    let sh = Arc::new(Shared {
        request: handshake_request(&args.url, args.subprotocol.as_deref()),
        args: args.clone(),
        ws_config,
        tls,
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        target: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        pings: AtomicU64::new(0),
        first_error: Mutex::new(None),
        first_drop: Mutex::new(None),
        connect_us: Mutex::new(util::new_histogram()),
        all_attempted: Notify::new(),
        round_trips: AtomicU64::new(0),
        round_trips_total: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        rtt_us: Mutex::new(util::new_histogram()),
        ids: Mutex::new(Vec::new()),
        received: Mutex::new(Received::new()),
        tally: Mutex::new(Tally::default()),
    });
    emit(&Report::Ready);

    // --- connect phase, in steps ---
    let (close_tx, close_rx) = watch::channel(false);
    let (run_tx, run_rx) = watch::channel(None);
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let steps = args.steps.clamp(1, args.count.max(1));
    let mut next = 0;
    for step in 0..steps {
        wait_command(&mut commands, proto::GO, args.command_timeout).await?;
        let go = Instant::now();
        let deadline = go + args.connect_timeout;
        let (ok0, failed0) = (sh.ok.load(Relaxed), sh.failed.load(Relaxed));
        *sh.connect_us.lock().expect("not poisoned") = util::new_histogram();
        let end = args.count * (step + 1) / steps;
        sh.target.store(end as u64, Relaxed);
        while next < end {
            let Ok(Ok(permit)) = timeout_at(deadline, permits.clone().acquire_owned()).await else {
                break;
            };
            tokio::spawn(client(
                sh.clone(),
                next,
                permit,
                close_rx.clone(),
                run_rx.clone(),
            ));
            next += 1;
        }
        // Bounded: each wake-up either ends the wait or comes from an attempt ending.
        while sh.attempts_done() < end as u64 {
            if timeout_at(deadline, sh.all_attempted.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        let elapsed_s = go.elapsed().as_secs_f64();
        let ok = sh.ok.load(Relaxed) - ok0;
        let failed = sh.failed.load(Relaxed) - failed0;
        let unfinished = (end as u64).saturating_sub(sh.attempts_done());
        let mut first_error = sh.first_error.lock().expect("not poisoned").clone();
        if unfinished > 0 {
            first_error.get_or_insert_with(|| {
                format!("{unfinished} connects still pending at the connect timeout")
            });
        }
        emit(&Report::Connected {
            ok,
            failed: failed + unfinished,
            elapsed_s,
            first_error,
            latency_us: util::to_buckets(&sh.connect_us.lock().expect("not poisoned")),
            rss_bytes: util::own_rss(),
        });
    }
    if args.mode == Mode::Recv {
        emit(&Report::Ids {
            ids: std::mem::take(&mut *sh.ids.lock().expect("not poisoned")),
        });
    }

    // --- hold or run ---
    let wait_ended = |limit: Duration| {
        let sh = sh.clone();
        async move {
            let deadline = Instant::now() + limit;
            while sh.ended.load(Relaxed) < sh.ok.load(Relaxed) && Instant::now() < deadline {
                sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let closed_report = || Report::Closed {
        closed: sh.closed.load(Relaxed),
        dropped: sh.dropped.load(Relaxed),
        pings: sh.pings.load(Relaxed),
        first_drop: sh.first_drop.lock().expect("not poisoned").clone(),
    };
    // Closes every client, waits (bounded) for them to end, reports.
    let close_all = || {
        let _ = close_tx.send(true);
        let ended = wait_ended(CLOSE_WAIT + Duration::from_secs(5));
        let report = &closed_report;
        async move {
            ended.await;
            emit(&report());
        }
    };
    match args.mode {
        Mode::Fanout => loop {
            // Bounded: each command either reports or ends the loop; silence
            // ends it at the command timeout.
            let cmd = next_command(&mut commands, args.command_timeout).await?;
            if cmd == proto::REPORT {
                let t = sh.tally.lock().expect("not poisoned").take();
                emit(&Report::FanoutReceived {
                    messages: t.messages,
                    single_latency_us: t.single_latency_us,
                    sustained_latency_us: t.sustained_latency_us,
                    ticks: t.ticks,
                    unparsed: t.unparsed,
                    live: sh.live(),
                    dropped: sh.dropped.load(Relaxed),
                    first_drop: sh.first_drop.lock().expect("not poisoned").clone(),
                    rss_bytes: util::own_rss(),
                });
            } else if cmd == proto::CLOSE {
                close_all().await;
                break;
            } else {
                return Err(format!("unexpected command {cmd:?}"));
            }
        },
        Mode::Tcp | Mode::Idle => {
            wait_command(&mut commands, proto::CLOSE, args.command_timeout).await?;
            close_all().await;
        }
        Mode::Recv => loop {
            // Bounded: each command either reports or ends the loop; silence
            // ends it at the command timeout.
            let cmd = next_command(&mut commands, args.command_timeout).await?;
            if cmd == proto::REPORT {
                let r = std::mem::replace(
                    &mut *sh.received.lock().expect("not poisoned"),
                    Received::new(),
                );
                let mut batch: Vec<(u64, u64, u64)> =
                    r.batch.into_iter().map(|(s, (n, us))| (s, n, us)).collect();
                batch.sort_unstable();
                emit(&Report::Received {
                    single: r.single,
                    single_latency_us: util::to_buckets(&r.single_us),
                    batch,
                    batch_latency_us: util::to_buckets(&r.batch_us),
                    warmup: r.warmup,
                    unparsed: r.unparsed,
                    dropped: sh.dropped.load(Relaxed),
                    first_drop: sh.first_drop.lock().expect("not poisoned").clone(),
                });
            } else if cmd == proto::CLOSE {
                close_all().await;
                break;
            } else {
                return Err(format!("unexpected command {cmd:?}"));
            }
        },
        Mode::Echo => {
            wait_command(&mut commands, proto::RUN, args.command_timeout).await?;
            let start = Instant::now();
            let _ = run_tx.send(Some(start));
            sleep(args.warmup + args.duration).await;
            wait_ended(args.reply_timeout + CLOSE_WAIT + Duration::from_secs(5)).await;
            emit(&Report::EchoDone {
                round_trips: sh.round_trips.load(Relaxed),
                round_trips_total: sh.round_trips_total.load(Relaxed),
                errors: sh.errors.load(Relaxed),
                timeouts: sh.timeouts.load(Relaxed),
                mismatches: sh.mismatches.load(Relaxed),
                first_error: sh.first_error.lock().expect("not poisoned").clone(),
                latency_us: util::to_buckets(&sh.rtt_us.lock().expect("not poisoned")),
                measured_s: args.duration.as_secs_f64(),
            });
        }
    }
    drop(close_tx);
    drop(run_tx);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_request_and_response() {
        let req =
            String::from_utf8(handshake_request("ws://127.0.0.1:8080/chat?x=1", None)).unwrap();
        assert!(req.starts_with("GET /chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(req.ends_with("Sec-WebSocket-Version: 13\r\n\r\n"));
        assert!(
            String::from_utf8(handshake_request("ws://127.0.0.1:9", None))
                .unwrap()
                .starts_with("GET / HTTP/1.1")
        );
        assert!(
            String::from_utf8(handshake_request("wss://127.0.0.1:9/tls", None))
                .unwrap()
                .starts_with("GET /tls HTTP/1.1\r\nHost: 127.0.0.1:9\r\n")
        );
        let native = String::from_utf8(handshake_request(
            "ws://127.0.0.1:9/",
            Some("switchboard.v1"),
        ))
        .unwrap();
        assert!(native.ends_with("Sec-WebSocket-Protocol: switchboard.v1\r\n\r\n"));
        let ok = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nsec-websocket-accept: {WS_ACCEPT}\r\n\r\n");
        assert_eq!(check_response(&ok, None), Ok(()));
        assert!(check_response(&ok, Some("switchboard.v1")).is_err());
        let with_protocol = ok.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Protocol: switchboard.v1\r\n\r\n",
        );
        assert_eq!(
            check_response(&with_protocol, Some("switchboard.v1")),
            Ok(())
        );
        assert!(check_response("HTTP/1.1 503 Service Unavailable\r\n\r\n", None).is_err());
        assert!(check_response(
            "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n",
            None
        )
        .is_err());
    }

    #[test]
    fn stamps_fit_any_size() {
        let mut p = vec![b'a'; 20];
        stamp(&mut p, 0xabc);
        assert_eq!(&p[..16], b"0000000000000abc");
        assert_eq!(&p[16..], b"aaaa");
        let mut small = vec![b'a'; 3];
        stamp(&mut small, 0xabc);
        assert_eq!(&small, b"abc");
        stamp(&mut [], 1);
    }
}
