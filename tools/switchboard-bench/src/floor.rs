//! The floor: a minimal WebSocket server, run as the hidden `floor` child
//! role, to measure the least a handshake and one message's fan-out can
//! cost on this machine with the same clients.
//!
//! It answers WebSocket upgrades on one port: as many accept threads as
//! CPUs (as the gateway's runtime has worker threads, 2 on the reference
//! machine) share the listener, and each takes a socket, reads its request
//! head with a blocking `read`, answers `101` with the `Sec-WebSocket-Accept`
//! of its key in one `write` (no subprotocol, no extension, no pings,
//! nothing read afterwards) and keeps the socket. No poller, no tasks, no
//! per-socket options (`TCP_NODELAY` and the I/O timeouts are set once on
//! the listener, and accepted sockets inherit them on Linux; the read
//! timeout bounds `accept` as well): `accept`, `read`, `write`. The
//! sockets are dealt in turn to one shard per writer thread, as many as
//! there are accept threads. A `POST` on its second port is a publish:
//! its body is encoded once as one unmasked text frame, and every writer
//! thread writes that same frame to each socket of its shard, one blocking
//! `write` each; the publish is answered `204` once all are written (`500`
//! if a write failed or was short). No queues, no tasks, no registry, no
//! JSON envelope: what is left is the kernel's cost of each `write` and of
//! the clients reading it.
//!
//! `fanout --floor` ([`crate::fanout`]) runs the single-message phase
//! against it, through the path of `fanout --url … --publish-url …`, in the
//! same run as the server it compares; `idle --floor` ([`crate::idle`])
//! opens the same WebSocket connections to it as to the gateway.
//!
//! Every loop is bounded: the accept loops by the connections expected (an
//! `accept` waits at most [`IO_TIMEOUT`] before its thread looks again), a
//! publish connection by [`MAX_REQUESTS`] and its idle timeout, every read
//! and write by [`IO_TIMEOUT`], the writers by the publishes, the child by
//! its stdin (it exits when the tool closes it, and is killed on drop).

use std::io::{BufRead, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use switchboard_proto::ws::frame::{encode_frame, OpCode};
use switchboard_proto::ws::handshake::{parse_request, switching_protocols, validate_upgrade};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Bound of a handshake's or a request's read, and of a socket write.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A publish connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest request head read.
const MAX_HEAD: usize = 16 << 10;

/// Largest publish body.
const MAX_BODY: usize = 1 << 20;

/// Most publish connections served (each on a thread of its own).
const MAX_PUBLISHERS: usize = 64;

/// Most requests on one publish connection.
const MAX_REQUESTS: usize = 1_000_000;

/// How long the tool waits for the child's addresses.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A publish for one writer thread: the frame, and where to say how many
/// writes failed.
type Job = (Arc<[u8]>, mpsc::Sender<usize>);

/// A running floor server (the child process), killed on drop.
#[derive(Debug)]
pub(crate) struct Floor {
    child: tokio::process::Child,
    /// Where subscribers connect (`ws://127.0.0.1:PORT/`).
    pub(crate) url: String,
    /// Where publishes are `POST`ed.
    pub(crate) publish_url: String,
}

impl Floor {
    /// Starts the `floor` child for at most `expect` subscribers and waits
    /// for its addresses.
    pub(crate) async fn spawn(expect: usize) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = tokio::process::Command::new(exe)
            .args(["floor", &expect.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the floor server: {e}"))?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
            .ok_or("the floor server did not give its addresses")?;
        let (ws, publish) = line
            .split_once(' ')
            .ok_or_else(|| format!("the floor server said {line:?}"))?;
        Ok(Self {
            child,
            url: format!("ws://{ws}/"),
            publish_url: format!("http://{publish}/pub"),
        })
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The hidden `floor` role: prints `WS_ADDR PUBLISH_ADDR`, serves until its
/// stdin closes.
pub(crate) fn run_floor(expect: usize) -> Result<(), String> {
    let (ws, publish) = (listen()?, listen()?);
    // Inherited by every accepted socket (Linux): no `setsockopt` per
    // handshake, as the gateway's listener.
    let e = |e: std::io::Error| format!("floor: listener options: {e}");
    let sock = socket2::SockRef::from(&ws);
    sock.set_nodelay(true).map_err(e)?;
    sock.set_read_timeout(Some(IO_TIMEOUT)).map_err(e)?;
    sock.set_write_timeout(Some(IO_TIMEOUT)).map_err(e)?;
    let addr = |l: &TcpListener| l.local_addr().map_err(|e| format!("floor: {e}"));
    let (ws_addr, publish_addr) = (addr(&ws)?, addr(&publish)?);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let shards: Arc<Vec<Mutex<Vec<TcpStream>>>> =
        Arc::new((0..threads).map(|_| Mutex::default()).collect());

    let mut writers = Vec::with_capacity(threads);
    for k in 0..threads {
        let (tx, rx) = mpsc::channel::<Job>();
        let shards = shards.clone();
        spawn(format!("floor-writer-{k}"), move || {
            // One job per publish, until the publishers are gone.
            for (frame, done) in rx {
                let socks = shards[k].lock().unwrap_or_else(|e| e.into_inner());
                let failed = socks
                    .iter()
                    .filter(|s| {
                        let mut w: &TcpStream = s;
                        !matches!(w.write(&frame), Ok(n) if n == frame.len())
                    })
                    .count();
                drop(socks);
                let _ = done.send(failed);
            }
        })?;
        writers.push(tx);
    }

    // Each accept thread takes a number per socket (or failed accept),
    // until `expect` are taken; a socket numbered past that is closed. The
    // listener's read timeout bounds `accept` too: a thread that waited
    // that long looks again whether all are taken.
    let (ws, taken) = (Arc::new(ws), Arc::new(AtomicUsize::new(0)));
    for k in 0..threads {
        let (ws, taken, shards) = (ws.clone(), taken.clone(), shards.clone());
        spawn(format!("floor-accept-{k}"), move || {
            while taken.load(Ordering::Relaxed) < expect {
                let accepted = match ws.accept() {
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        continue
                    }
                    a => a.map_err(|e| e.to_string()),
                };
                let n = taken.fetch_add(1, Ordering::Relaxed);
                if n >= expect {
                    continue; // dropped: closed
                }
                match accepted.and_then(|(s, _)| handshake(&s).map(|()| s)) {
                    Ok(s) => shards[n % threads]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(s),
                    Err(e) => eprintln!("floor: a client failed: {e}"),
                }
            }
        })?;
    }

    spawn("floor-publish".into(), move || {
        for k in 0..MAX_PUBLISHERS {
            let Ok((conn, _)) = publish.accept() else {
                continue;
            };
            let writers = writers.clone();
            let served = spawn(format!("floor-publish-{k}"), move || {
                if let Err(e) = serve_publishes(&conn, &writers) {
                    eprintln!("floor: a publisher failed: {e}");
                }
            });
            if let Err(e) = served {
                eprintln!("{e}");
            }
        }
    })?;

    println!("{ws_addr} {publish_addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Until the tool closes stdin (or is gone).
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    Ok(())
}

/// Serves the publishes of one connection (keep-alive): each body is one
/// frame written to every subscriber.
fn serve_publishes(conn: &TcpStream, writers: &[mpsc::Sender<Job>]) -> Result<(), String> {
    conn.set_read_timeout(Some(IDLE_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| conn.set_nodelay(true))
        .map_err(|e| e.to_string())?;
    let mut io = conn;
    let mut buf = Vec::new();
    for _ in 0..MAX_REQUESTS {
        let Some((req, head)) = read_head(conn, &mut buf)? else {
            return Ok(());
        };
        let len: usize = req
            .header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if len > MAX_BODY {
            return Err(format!("a body of {len} bytes"));
        }
        while buf.len() < head + len {
            let mut chunk = [0u8; 4096];
            match io.read(&mut chunk).map_err(|e| e.to_string())? {
                0 => return Err("the body was cut".into()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head..head + len].to_vec();
        buf.drain(..head + len);
        let status = if req.method == "POST" {
            publish(&body, writers)
        } else {
            "405 Method Not Allowed"
        };
        let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        io.write_all(answer.as_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Encodes `body` once as a text frame and has every writer write it to
/// each of its sockets; the status of the answer.
fn publish(body: &[u8], writers: &[mpsc::Sender<Job>]) -> &'static str {
    let frame: Arc<[u8]> = Arc::from(&encode_frame(OpCode::Text, body)[..]);
    let (done_tx, done) = mpsc::channel();
    for w in writers {
        if w.send((frame.clone(), done_tx.clone())).is_err() {
            return "500 Internal Server Error";
        }
    }
    drop(done_tx);
    // A writer blocks IO_TIMEOUT at most per socket; wait long enough for
    // a few, not forever.
    let mut failed = 0;
    for _ in writers {
        match done.recv_timeout(IO_TIMEOUT * 4) {
            Ok(n) => failed += n,
            Err(_) => failed += 1,
        }
    }
    if failed == 0 {
        "204 No Content"
    } else {
        "500 Internal Server Error"
    }
}

/// A listener on a free loopback port, with the gateway's backlog request
/// (the default of 128 would drop the clients' SYNs).
fn listen() -> Result<TcpListener, String> {
    let e = |e: std::io::Error| format!("floor: listen: {e}");
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(e)?;
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(e)?;
    s.listen(65_535).map_err(e)?;
    Ok(s.into())
}

/// Starts a named thread.
fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("floor: cannot start a thread: {e}"))
}

/// Reads a request head into `buf` (which keeps what follows it):
/// `Ok(None)` if the connection ended before one began.
fn read_head(
    mut s: &TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<(switchboard_proto::ws::handshake::Request, usize)>, String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(found) = parse_request(buf).map_err(|e| e.to_string())? {
            return Ok(Some(found));
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
        match s.read(&mut chunk).map_err(|e| e.to_string())? {
            0 if buf.is_empty() => return Ok(None),
            0 => return Err("the request was cut".into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Answers a client's upgrade request with `101` (the socket's options
/// come from the listener).
fn handshake(s: &TcpStream) -> Result<(), String> {
    let mut buf = Vec::with_capacity(512);
    let (req, _) = read_head(s, &mut buf)?.ok_or("closed before its request")?;
    let up = validate_upgrade(&req).map_err(|e| e.to_string())?;
    let mut w = s;
    w.write_all(&switching_protocols(&up.key, None, None))
        .map_err(|e| e.to_string())
}
