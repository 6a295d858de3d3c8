//! Shared harness for the tests of the real `switchboard` binary: a command
//! builder with a clean `SWITCHBOARD_*` environment, and [`Node`], a running
//! `switchboard serve` process whose JSON log is read line by line, with
//! signals (SIGTERM, SIGKILL) and control API helpers; and, for the
//! cluster tests, nodes of one cluster on a NATS server with test timings,
//! membership waits and bounded polling.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use futures_util::StreamExt;
use serde_json::Value;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use switchboard_proto::ConnectionId;
use switchboard_test_util::{ApiResponse, Ws, WsMessage};

/// A command for the binary with no inherited `SWITCHBOARD_*` variables.
pub(crate) fn switchboard(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// A running `switchboard serve` process.
pub(crate) struct Node {
    child: Option<Child>,
    pub(crate) pid: u32,
    /// Log lines (JSON) as they arrive.
    pub(crate) lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every line seen so far.
    pub(crate) seen: Vec<String>,
    pub(crate) listen: SocketAddr,
    pub(crate) control: SocketAddr,
    pub(crate) node: String,
    /// The "switchboard node started" log line.
    pub(crate) started: Value,
    http: reqwest::Client,
}

impl Node {
    /// Starts the binary (logging JSON to stderr) and waits for its
    /// "switchboard node started" line.
    pub(crate) async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec!["serve", "--log-format", "json", "--log-level", "info"];
        all.extend_from_slice(args);
        Self::spawn(switchboard(&all, env)).await
    }

    /// Like [`Node::start`], under an open-file limit: soft `soft`, hard
    /// `hard` (`ulimit -Sn` / `-Hn` in a shell that then runs the binary).
    pub(crate) async fn start_with_nofile(
        args: &[&str],
        env: &[(&str, &str)],
        soft: u64,
        hard: u64,
    ) -> Self {
        let mut all = vec!["serve", "--log-format", "json", "--log-level", "info"];
        all.extend_from_slice(args);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_switchboard"))
            .args(all);
        for (k, _) in std::env::vars() {
            if k.starts_with("SWITCHBOARD_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        Self::spawn(cmd).await
    }

    /// Runs `cmd` (the binary, logging JSON to stderr) and waits for its
    /// "switchboard node started" line.
    async fn spawn(mut cmd: Command) -> Self {
        switchboard_test_util::failure::remember_panics();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchboard");
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = Self {
            child: Some(child),
            pid,
            lines,
            seen: Vec::new(),
            listen: "0.0.0.0:0".parse().unwrap(),
            control: "0.0.0.0:0".parse().unwrap(),
            node: String::new(),
            started: Value::Null,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
        };
        let started = node.wait_log("switchboard node started").await;
        node.listen = started["listen"].as_str().unwrap().parse().unwrap();
        node.control = started["control"].as_str().unwrap().parse().unwrap();
        node.node = started["node"].as_str().unwrap().to_owned();
        node.started = started;
        node
    }

    /// Waits (10 s at most) for a log line with this message; returns it as JSON.
    pub(crate) async fn wait_log(&mut self, message: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => l,
                Ok(None) => panic!(
                    "switchboard exited before logging {message:?}; log:\n{}",
                    self.seen.join("\n")
                ),
                Err(_) => panic!(
                    "no {message:?} log line within 10s; log:\n{}",
                    self.seen.join("\n")
                ),
            };
            self.seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == message {
                    return v;
                }
            }
        }
    }

    /// Moves the log lines that arrived so far into `seen` and returns the
    /// whole log.
    pub(crate) fn log(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// After the process has exited: reads its log to the end (the reader
    /// thread may still be forwarding the last lines when `wait` returns) and
    /// returns the whole log.
    pub(crate) async fn final_log(&mut self) -> String {
        assert!(self.child.is_none(), "final_log before the process exited");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill {sig} failed");
    }

    /// Freezes the process (SIGSTOP) and waits (2 s at most) until every
    /// thread of it is stopped.
    pub(crate) async fn freeze(&self) {
        self.signal("-STOP");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid))
                .expect("read /proc/<pid>/task");
            let all_stopped = tasks.filter_map(Result::ok).all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    // The state follows the command name in parentheses.
                    .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
                    .unwrap_or(true)
            });
            if all_stopped {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} not stopped 2s after SIGSTOP",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resumes a frozen process (SIGCONT).
    pub(crate) fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Sends SIGTERM.
    pub(crate) fn term(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGTERM and waits (10 s at most) for the process to exit.
    pub(crate) async fn sigterm(&mut self) -> ExitStatus {
        self.term();
        self.wait().await
    }

    /// Kills the process with SIGKILL and waits for it to be gone.
    pub(crate) async fn kill9(&mut self) {
        let mut child = self.child.take().expect("still running");
        tokio::task::spawn_blocking(move || {
            let _ = child.kill();
            child.wait().expect("wait for the killed node")
        })
        .await
        .expect("wait task");
    }

    /// Waits (10 s at most) for the process to exit.
    pub(crate) async fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not yet waited for");
        let waiter = tokio::task::spawn_blocking(move || child.wait().expect("wait"));
        match tokio::time::timeout(Duration::from_secs(10), waiter).await {
            Ok(status) => status.expect("wait task"),
            Err(_) => {
                self.signal("-KILL");
                panic!(
                    "switchboard did not exit within 10s; log:\n{}",
                    self.seen.join("\n")
                );
            }
        }
    }

    /// `http://` URL of the control API for `path`.
    pub(crate) fn api(&self, path: &str) -> String {
        format!("http://{}{}", self.control, path)
    }

    /// `ws://` URL of the client listener for `path`.
    pub(crate) fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.listen, path)
    }

    /// Sends a control API request and reads the whole answer (5 s at most).
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> ApiResponse {
        let mut req = self.http.request(method.clone(), self.api(path));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} on node {}: {e}", self.node));
        ApiResponse::read(resp).await
    }

    /// `GET path` on the control API.
    pub(crate) async fn get(&self, path: &str) -> ApiResponse {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body on the control API.
    pub(crate) async fn post(&self, path: &str, body: &serde_json::Value) -> ApiResponse {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// `DELETE path` on the control API.
    pub(crate) async fn delete(&self, path: &str) -> ApiResponse {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// `POST /v1/connections/{id}/messages` with a text message.
    pub(crate) async fn push_text(&self, id: &str, text: &str) -> ApiResponse {
        self.post(
            &format!("/v1/connections/{id}/messages"),
            &serde_json::json!({ "text": text }),
        )
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test: show what this node logged (the tail).
            let log = self.log();
            eprintln!(
                "--- log tail of node {:?} ---\n{}",
                self.node,
                switchboard_test_util::failure::log_tail(&log, 20)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Clusters: nodes on one NATS server, membership, bounded waits
// ---------------------------------------------------------------------------

/// `--cluster-heartbeat` of every node.
pub(crate) const HEARTBEAT: &str = "200ms";
/// `--cluster-heartbeat-timeout` of every node.
pub(crate) const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Allowed on top of the heartbeat timeout for a lost node to be dropped.
pub(crate) const SLACK: Duration = Duration::from_millis(1500);
/// How long forming a cluster may take.
pub(crate) const FORM: Duration = Duration::from_secs(10);
/// Bound of "at once" answers (404 for a lost node's connection, 503
/// while NATS is away).
pub(crate) const QUICK: Duration = Duration::from_secs(2);

/// Starts `switchboard serve` as node `id` of the cluster `prefix` on `bus`
/// (a NATS URL, or a `redis://` URL for the Redis backend), with test
/// timings; a flag given in `extra` replaces its default here.
pub(crate) async fn start_node(id: &str, bus: &str, prefix: &str, extra: &[&str]) -> Node {
    let (bus_flag, prefix_flag) = if bus.starts_with("redis") {
        ("--redis", "--redis-prefix")
    } else {
        ("--nats", "--nats-prefix")
    };
    let defaults = [
        ("--node-id", id),
        ("--listen", "127.0.0.1:0"),
        ("--control-listen", "127.0.0.1:0"),
        (bus_flag, bus),
        (prefix_flag, prefix),
        ("--cluster-heartbeat", HEARTBEAT),
        ("--cluster-heartbeat-timeout", "1500ms"),
        ("--cluster-request-timeout", "1s"),
        ("--drain-spread", "100ms"),
        ("--drain-timeout", "5s"),
        ("--origin-retry-initial", "20ms"),
        ("--origin-retry-max", "200ms"),
    ];
    let mut args = Vec::new();
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    Node::start(&args, &[]).await
}

/// Starts nodes `a`, `b` and `c` of the cluster `prefix`, concurrently.
pub(crate) async fn start_three(nats: &str, prefix: &str, extra: &[&str]) -> (Node, Node, Node) {
    tokio::join!(
        start_node("a", nats, prefix, extra),
        start_node("b", nats, prefix, extra),
        start_node("c", nats, prefix, extra),
    )
}

/// Calls `check` every 50 ms until it returns `Ok`; panics after `timeout`
/// naming `what` and showing the last `Err`.
pub(crate) async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node part of a connection id.
pub(crate) fn node_of(id: &str) -> String {
    ConnectionId::parse(id)
        .unwrap_or_else(|_| panic!("not a connection id: {id:?}"))
        .node()
        .to_owned()
}

/// `GET /v1/nodes` of `node` as (node, connections) pairs in the listed
/// order; `Err` with the answer if it is not a 200 with a node list.
pub(crate) async fn members(node: &Node) -> Result<Vec<(String, u64)>, String> {
    let r = node.get("/v1/nodes").await;
    if r.status != 200 {
        return Err(format!("{} {}", r.status, r.body));
    }
    let v: Value = serde_json::from_str(&r.body).map_err(|e| format!("{e}: {}", r.body))?;
    let list = v["nodes"]
        .as_array()
        .ok_or_else(|| format!("no `nodes` array: {}", r.body))?;
    Ok(list
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or("?").to_owned(),
                n["connections"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect())
}

/// Waits (`timeout` in all) until every node of `nodes` lists exactly the
/// nodes `ids` (in this order), whatever their connection counts.
pub(crate) async fn wait_member_ids(nodes: &[&Node], ids: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for node in nodes {
        poll(
            deadline.saturating_duration_since(Instant::now()),
            &format!("node {} to list exactly {ids:?}", node.node),
            || async {
                let got = members(node).await?;
                if got.iter().map(|(n, _)| n.as_str()).eq(ids.iter().copied()) {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
        .await;
    }
}

/// Waits (`timeout` in all) until every node of `nodes` lists exactly
/// `want` (node, connections), in this order.
pub(crate) async fn wait_members(nodes: &[&Node], want: &[(&str, u64)], timeout: Duration) {
    let want: Vec<(String, u64)> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
    let deadline = Instant::now() + timeout;
    for node in nodes {
        poll(
            deadline.saturating_duration_since(Instant::now()),
            &format!("node {} to list {want:?}", node.node),
            || async {
                let got = members(node).await?;
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
        .await;
    }
}

/// Waits (at most `within`) for the socket to end: a close frame, an
/// error or the end of the stream; panics on a data message.
pub(crate) async fn expect_dead(ws: &mut Ws, within: Duration) {
    let ended = tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                None => return "end of stream".to_owned(),
                Some(Err(e)) => return format!("error: {e}"),
                Some(Ok(WsMessage::Close(f))) => return format!("close frame {f:?}"),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(m)) => panic!("expected the socket to die, got {m:?}"),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the socket is still open after {within:?}");
}

/// A NATS client of `url` (5 s at most to connect).
pub(crate) async fn nats_connect(url: &str) -> async_nats::Client {
    tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
        .await
        .expect("NATS connect within 5s")
        .expect("NATS connects")
}

/// A control command over NATS: the `Switchboard-Status` of the reply and
/// its JSON body.
pub(crate) async fn command(
    client: &async_nats::Client,
    subject: &str,
    body: Value,
) -> (u16, Value) {
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(subject.to_owned(), bytes::Bytes::from(body.to_string())),
    )
    .await
    .unwrap_or_else(|_| panic!("no reply on {subject} within 5s to {body}"))
    .unwrap_or_else(|e| panic!("request on {subject} ({body}) failed: {e}"));
    let status = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Switchboard-Status"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| {
            panic!("reply to {body} on {subject} has no Switchboard-Status: {reply:?}")
        });
    let status = status
        .parse()
        .unwrap_or_else(|_| panic!("Switchboard-Status {status:?} is not a number"));
    let json = serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
        panic!(
            "reply to {body} is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&reply.payload)
        )
    });
    (status, json)
}

/// A TCP proxy in front of NATS that can cut every connection through it
/// (and refuse new ones) and be restored: a node cut off from NATS while
/// everything else runs.
pub(crate) struct CutProxy {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl CutProxy {
    pub(crate) async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let state = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = state.subscribe();
                if *cut.borrow() {
                    continue; // dropped: refused
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub(crate) fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// The server joining a test cluster: NATS (with JetStream or without) or
/// Redis, each a real process on a free port.
#[derive(Debug)]
pub(crate) enum Bus {
    Nats(switchboard_test_util::nats::NatsServer),
    Redis(switchboard_test_util::redis::RedisServer),
}

impl Bus {
    /// A NATS server, with JetStream if `jetstream`.
    pub(crate) fn nats(jetstream: bool) -> Self {
        Self::Nats(switchboard_test_util::nats::NatsServer::start(jetstream))
    }

    /// A Redis server without persistence.
    pub(crate) fn redis() -> Self {
        Self::Redis(switchboard_test_util::redis::RedisServer::start())
    }

    /// The URL [`start_node`] takes.
    pub(crate) fn url(&self) -> String {
        match self {
            Self::Nats(s) => s.url(),
            Self::Redis(s) => s.url(),
        }
    }

    /// SIGKILLs the server.
    pub(crate) fn kill(&mut self) {
        match self {
            Self::Nats(s) => s.kill(),
            Self::Redis(s) => s.kill(),
        }
    }

    /// Starts it again on the same port (NATS with its store; Redis empty).
    pub(crate) fn restart(&mut self) {
        match self {
            Self::Nats(s) => s.restart(),
            Self::Redis(s) => s.restart(),
        }
    }

    /// Whether it is Redis.
    pub(crate) fn is_redis(&self) -> bool {
        matches!(self, Self::Redis(_))
    }
}

/// Connects to `url`, asserts the handshake is refused with `status`
/// (panicking with `if_accepted` when it is not refused), and returns the
/// refusal's body.
pub(crate) async fn refusal(url: &str, status: u16, if_accepted: &str) -> String {
    match switchboard_test_util::connect_with(url, &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert_eq!(resp.status(), status, "{body}");
            body
        }
        Err(e) => panic!("expected a {status} answer, got {e}"),
        Ok(_) => panic!("{if_accepted}"),
    }
}
