//! The `sessions` scenario: what a suspended session costs, and how fast one
//! resumes (docs/sessions.md).
//!
//! 1. A gateway is spawned (dev mode, `--session-ttl 10m`) and its RSS read.
//! 2. N native clients connect (in this process: N sockets, so N stays
//!    under the open-file limit) and keep their resume tokens.
//! 3. Every client drops its TCP connection without a close frame; once the
//!    gateway counts N suspended sessions, its RSS gives the bytes per
//!    suspended session with an empty outbox.
//! 4. `--messages` small direct messages go to every session
//!    (`POST /v1/messages`, all ids in each); RSS again: bytes per session
//!    with that outbox.
//! 5. `--resumes` of the sessions resume one after the other with
//!    `received=0`: the time from starting the TCP connection to the first
//!    recovered direct message, as percentiles.
//! 6. Across nodes (`--cross-node-resumes`, 0 to skip): nats-server and two
//!    nodes `a` and `b`; sessions opened on `a`, suspended, given one direct
//!    message each, then resumed one after the other on `b` (which takes
//!    each from `a`), timed the same way, and the batch that gives them
//!    their message too (without a session store: no JetStream).
//! 7. When a node dies (`--adopted-sessions`, 0 to skip): the same with
//!    JetStream, so sessions are kept in the session store: the batch is
//!    timed again (each message is stored before the answer); then node `a`
//!    is SIGKILLed, and the time until `b` has adopted every session (the
//!    heartbeat timeout, 1 s here, included) and the resumes on `b` are
//!    timed.

use crate::measure::{self, human_bytes, Percentiles, Table};
use crate::servers::{Api, Gateway};
use crate::Opts;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Options of `sessions`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Sessions to open and suspend (one socket each in this process).
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Direct messages (16 bytes of text) queued on every suspended session.
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// Sessions resumed for the latency figures.
    #[arg(long, default_value_t = 1_000)]
    resumes: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    parallel: usize,
    /// Sessions opened on one node of a two-node cluster and resumed on the
    /// other (0: skip).
    #[arg(long, default_value_t = 1_000)]
    cross_node_resumes: usize,
    /// Sessions on a node of a two-node cluster with JetStream that is
    /// then SIGKILLed, adopted by the other (0: skip).
    #[arg(long, default_value_t = 1_000)]
    adopted_sessions: usize,
}

/// What the node-death step measured.
#[derive(Debug, serde::Serialize)]
struct Adoption {
    sessions: usize,
    /// The batch giving each session one message, with the session store.
    batch_ms: f64,
    /// From the SIGKILL to the last session adopted (heartbeat timeout included).
    adopted_after_ms: f64,
    /// Resumes of the adopted sessions on the adopting node.
    resume_ms: Percentiles,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> Result<(Ws, Value), String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "switchboard.v1".parse().expect("a header value"),
    );
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let first = next_json(&mut ws).await?;
    Ok((ws, first))
}

async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| "no frame within 10 s".to_owned())?
            .ok_or("stream ended")?
            .map_err(|e| e.to_string())?;
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).map_err(|e| e.to_string());
        }
    }
}

/// Opens `--cross-node-resumes` sessions on node `a` of a two-node
/// cluster, suspends them with one direct message each, and resumes each on
/// node `b`: percentiles of the time to the first recovered message.
async fn cross_node(
    opts: &Opts,
    a: &Args,
    problems: &mut Vec<String>,
) -> Result<(Percentiles, f64), String> {
    let api = Api::new();
    let cluster = crate::servers::Cluster::start(opts, 2, false, &cluster_args()).await?;
    let (na, nb) = (&cluster.nodes[0], &cluster.nodes[1]);
    let url_b = format!("ws://{}/", nb.addr);
    let (clients, batch_ms) =
        suspended_with_a_message(&api, na, a.cross_node_resumes, a.parallel).await?;
    let resumes = time_resumes(&url_b, &clients, Some("b"), true, problems).await?;
    Ok((resumes, batch_ms))
}

/// The settings of the two-node clusters: long sessions, a quick
/// heartbeat timeout.
fn cluster_args() -> Vec<String> {
    [
        "--session-ttl",
        "10m",
        "--cluster-heartbeat",
        "250ms",
        "--cluster-heartbeat-timeout",
        "1s",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Opens `n` sessions on `node`, suspends them, and gives each one direct
/// message in one batch: the sessions, and the batch's time in ms.
async fn suspended_with_a_message(
    api: &Api,
    node: &Gateway,
    n: usize,
    parallel: usize,
) -> Result<(Vec<(String, String)>, f64), String> {
    let control = node.control.ok_or("no control listener")?;
    let (clients, sockets) = open_all(&format!("ws://{}/", node.addr), n, parallel).await?;
    drop(sockets);
    wait_stat(api, node, "sessions_suspended", clients.len() as u64).await?;
    let started = Instant::now();
    send_to_all(api, control, &clients, "message-00000000").await?;
    Ok((clients, started.elapsed().as_secs_f64() * 1e3))
}

/// Opens `--adopted-sessions` sessions on node `a` of a two-node cluster
/// with JetStream, suspends them with one direct message each, SIGKILLs
/// `a`, and times `b`'s adoption of them and their resumes there.
async fn node_death(opts: &Opts, a: &Args, problems: &mut Vec<String>) -> Result<Adoption, String> {
    let api = Api::new();
    let cluster = crate::servers::Cluster::start(opts, 2, true, &cluster_args()).await?;
    let (na, nb) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (clients, batch_ms) =
        suspended_with_a_message(&api, na, a.adopted_sessions, a.parallel).await?;
    // The store's writes are answered by then; let the records settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = na.pid().ok_or("no process for node a")?;
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .map_err(|e| format!("kill: {e}"))?;
    if !status.success() {
        return Err(format!("kill -9 {pid}: {status}"));
    }
    wait_stat(&api, nb, "sessions_suspended", clients.len() as u64).await?;
    let adopted_after_ms = killed.elapsed().as_secs_f64() * 1e3;
    let url_b = format!("ws://{}/", nb.addr);
    let take = &clients[..a.resumes.min(clients.len())];
    let resume_ms = time_resumes(&url_b, take, Some("b"), true, problems).await?;
    Ok(Adoption {
        sessions: clients.len(),
        batch_ms,
        adopted_after_ms,
        resume_ms,
    })
}

/// Opens `n` native connections to `url`, `parallel` handshakes at a time:
/// each one's (connection id, resume token), and the sockets.
async fn open_all(
    url: &str,
    n: usize,
    parallel: usize,
) -> Result<(Vec<(String, String)>, Vec<Ws>), String> {
    let mut clients = Vec::with_capacity(n);
    let mut sockets = Vec::with_capacity(n);
    let mut pending =
        futures_util::stream::iter((0..n).map(|_| open(url))).buffer_unordered(parallel);
    while let Some(r) = pending.next().await {
        let (ws, first) = r?;
        let id = first["client"].as_str().ok_or("no client id")?.to_owned();
        let session = first["session"]
            .as_str()
            .ok_or("no session: sessions off?")?
            .to_owned();
        clients.push((id, session));
        sockets.push(ws);
    }
    Ok((clients, sockets))
}

/// One direct message with `text` to every session of `clients`
/// (`POST /v1/messages`, all ids in one message).
async fn send_to_all(
    api: &Api,
    control: std::net::SocketAddr,
    clients: &[(String, String)],
    text: &str,
) -> Result<(), String> {
    let ids: Vec<&str> = clients.iter().map(|(id, _)| id.as_str()).collect();
    let body = json!({"messages": [{"connection_ids": ids, "text": text}]});
    let status = api
        .post(
            &format!("http://{control}/v1/messages"),
            body.to_string(),
            true,
        )
        .await?;
    if status != 200 {
        return Err(format!("POST /v1/messages: {status}"));
    }
    Ok(())
}

/// Resumes `clients` on `url` one after the other with `received=0`, each
/// timed from the start of its TCP connection to its first recovered
/// direct message (to its `connected` without `first_direct`), and checked
/// to land on `node` if given: the percentiles.
async fn time_resumes(
    url: &str,
    clients: &[(String, String)],
    node: Option<&str>,
    first_direct: bool,
    problems: &mut Vec<String>,
) -> Result<Percentiles, String> {
    let mut h = measure::histogram();
    for (id, session) in clients {
        let started = Instant::now();
        let (mut ws, first) = open(&format!("{url}?resume={session}&received=0")).await?;
        let elsewhere = node.is_some_and(|n| first["node"] != n);
        if first["resumed"] != true || first["client"] != id.as_str() || elsewhere {
            problems.push(format!("resume of {id} refused: {first}"));
            break;
        }
        if first_direct {
            let direct = next_json(&mut ws).await?;
            if direct["seq"] != 1 {
                problems.push(format!("first recovered message of {id}: {direct}"));
                break;
            }
        }
        h.record(started.elapsed().as_micros() as u64)
            .map_err(|e| e.to_string())?;
        let _ = ws.close(None).await;
    }
    Ok(Percentiles::of(&h))
}

/// Polls `/v1/stats` until `field` reaches `want` (within 60 s).
async fn wait_stat(api: &Api, gw: &Gateway, field: &str, want: u64) -> Result<(), String> {
    let control = gw.control.ok_or("no control listener")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = api.get_json(control, "/v1/stats").await?;
        if v[field].as_u64() == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{field} is {} after 60 s, not {want}", v[field]));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the scenario; `Ok(false)` if the measurement is invalid.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    let n = a.sessions;
    let api = Api::new();
    let gw = Gateway::spawn(opts, &["--session-ttl".into(), "10m".into()]).await?;
    let pid = gw.pid().ok_or("no gateway process")?;
    let control = gw.control.ok_or("no control listener")?;
    let url = format!("ws://{}/", gw.addr);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start = measure::rss(pid).ok_or("no RSS")?;

    // Connect.
    let (clients, sockets) = open_all(&url, n, a.parallel).await?;
    wait_stat(&api, &gw, "connections", n as u64).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_open = measure::rss(pid).ok_or("no RSS")?;

    // Lose every connection: dropped sockets, no close frames.
    drop(sockets);
    wait_stat(&api, &gw, "sessions_suspended", n as u64).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_suspended = measure::rss(pid).ok_or("no RSS")?;

    // Fill every outbox.
    for i in 0..a.messages {
        send_to_all(&api, control, &clients, &format!("message-{i:08}")).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_outbox = measure::rss(pid).ok_or("no RSS")?;

    // Resume some, one at a time.
    let mut problems = Vec::new();
    let take = &clients[..a.resumes.min(n)];
    let resume = time_resumes(&url, take, None, a.messages > 0, &mut problems).await?;
    drop(gw);
    let across = if a.cross_node_resumes > 0 {
        Some(cross_node(opts, &a, &mut problems).await?)
    } else {
        None
    };
    let death = if a.adopted_sessions > 0 {
        Some(node_death(opts, &a, &mut problems).await?)
    } else {
        None
    };

    let per = |after: u64, before: u64| after.saturating_sub(before) as f64 / n as f64;
    let mut t = Table::default();
    t.row("sessions", n.to_string());
    t.row("gateway RSS at start", human_bytes(rss_start as f64));
    t.row(
        "per open native connection",
        format!("{:.0} B", per(rss_open, rss_start)),
    );
    t.row(
        "per suspended session, empty outbox",
        format!("{:.0} B", per(rss_suspended, rss_start)),
    );
    t.row(
        format!("per suspended session, {} messages", a.messages),
        format!("{:.0} B", per(rss_outbox, rss_start)),
    );
    t.row(
        "resume to first recovered message",
        format!(
            "p50 {:.2} ms, p99 {:.2} ms ({} resumes)",
            resume.p50, resume.p99, resume.count
        ),
    );
    if let Some((across, batch_ms)) = &across {
        t.row(
            "resume on another node to first recovered message",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms ({} resumes)",
                across.p50, across.p99, across.count
            ),
        );
        t.row(
            format!("batch to {} sessions, no session store", across.count),
            format!("{batch_ms:.1} ms"),
        );
    }
    if let Some(d) = &death {
        t.row(
            format!("batch to {} sessions, session store", d.sessions),
            format!("{:.1} ms", d.batch_ms),
        );
        t.row(
            "node SIGKILLed: all its sessions adopted after",
            format!("{:.0} ms (heartbeat timeout 1 s)", d.adopted_after_ms),
        );
        t.row(
            "resume of an adopted session to first recovered message",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms ({} resumes)",
                d.resume_ms.p50, d.resume_ms.p99, d.resume_ms.count
            ),
        );
    }
    t.print("sessions");
    measure::write_json(
        opts.json.as_deref(),
        &json!({
            "scenario": "sessions",
            "machine": measure::machine(),
            "sessions": n,
            "messages_per_session": a.messages,
            "rss_start_bytes": rss_start,
            "bytes_per_open_connection": per(rss_open, rss_start),
            "bytes_per_suspended_session": per(rss_suspended, rss_start),
            "bytes_per_suspended_session_with_messages": per(rss_outbox, rss_start),
            "resume_ms": resume,
            "cross_node_resume_ms": across.as_ref().map(|(p, _)| p),
            "cross_node_batch_ms": across.as_ref().map(|(_, b)| b),
            "node_death": death,
        }),
    )?;
    Ok(crate::report_problems(&problems))
}
