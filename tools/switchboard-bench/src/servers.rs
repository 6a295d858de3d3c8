//! The servers under test: gateway processes (one, or a cluster of nodes
//! joined through the `nats-server` or the `redis-server` of
//! `switchboard-test-util`), the echo origin, and the control API they are
//! driven through (reqwest).
//!
//! Every process started here is killed when its owner is dropped, on error
//! paths too. Only loopback addresses are used.

use crate::Opts;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_test_util::nats::NatsServer;
use switchboard_test_util::redis::RedisServer;

/// How long a started process has to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A free loopback port.
pub(crate) fn free_port() -> Result<u16, String> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// A sibling binary of this one (cargo puts the workspace's binaries in one
/// folder), else `target/release/NAME`.
pub(crate) fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("target/release").join(name))
}

/// A child process, killed on drop.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    /// The command line, for the results.
    pub(crate) command: Vec<String>,
}

impl Proc {
    /// Starts `bin args`, its stdout discarded and its stderr inherited.
    pub(crate) fn spawn(bin: &PathBuf, args: &[String]) -> Result<Self, String> {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut command = vec![bin.display().to_string()];
        command.extend(args.iter().cloned());
        Ok(Self { child, command })
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL without waiting (dropping it waits).
    pub(crate) fn kill_now(&mut self) {
        let _ = self.child.kill();
    }

    /// Fails if it has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited ({status})", self.command[0])),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One gateway: spawned by the tool, or given with `--url`.
#[derive(Debug)]
pub(crate) struct Gateway {
    /// Where clients connect.
    pub(crate) addr: SocketAddr,
    /// `Host` and path for the upgrade request.
    pub(crate) target: String,
    /// Its control listener, if known.
    pub(crate) control: Option<SocketAddr>,
    /// Its process, if spawned.
    pub(crate) proc: Option<Proc>,
}

impl Gateway {
    /// Spawns `switchboard serve` on free loopback ports with client rate
    /// limits off, `args` and the user's `--gateway-arg`s, and waits until
    /// `GET /readyz` answers 200.
    pub(crate) async fn spawn(opts: &Opts, args: &[String]) -> Result<Self, String> {
        Self::spawn_with(opts, args, &Api::new()).await
    }

    /// [`Gateway::spawn`], asking for readiness through `api` (HTTPS when
    /// `args` turn TLS on).
    pub(crate) async fn spawn_with(
        opts: &Opts,
        args: &[String],
        api: &Api,
    ) -> Result<Self, String> {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let control: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let mut all: Vec<String> = [
            "serve",
            "--listen",
            &addr.to_string(),
            "--control-listen",
            &control.to_string(),
            "--log-level",
            "warn",
            "--client-message-rate",
            "0",
            "--client-byte-rate",
            "0",
            "--max-handshakes-per-ip",
            "0",
            "--max-connections-per-ip",
            "0",
        ]
        .map(str::to_owned)
        .to_vec();
        all.extend(args.iter().cloned());
        all.extend(opts.gateway_arg.iter().cloned());
        let bin = opts
            .gateway_bin
            .clone()
            .unwrap_or_else(|| sibling_bin("switchboard"));
        let mut proc = Proc::spawn(&bin, &all)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            proc.check_alive()?;
            if api.get(control, "/readyz").await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the gateway was not ready within {READY_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            addr,
            target: format!("{addr}/"),
            control: Some(control),
            proc: Some(proc),
        })
    }

    /// A server someone else started: `ws://HOST:PORT/PATH` (or `wss://`,
    /// or `http://` for event streams) on loopback.
    pub(crate) fn external(url: &str, control: Option<SocketAddr>) -> Result<Self, String> {
        let target = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://"))
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| format!("--url {url}: a ws://, wss:// or http:// URL"))?;
        let authority = target.split('/').next().unwrap_or_default();
        let addr: SocketAddr = authority
            .parse()
            .map_err(|_| format!("--url {url}: give an IP address and a port"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("--url {url}: loopback addresses only"));
        }
        let target = if target.contains('/') {
            target.to_owned()
        } else {
            format!("{target}/")
        };
        Ok(Self {
            addr,
            target,
            control,
            proc: None,
        })
    }

    /// The process id, if spawned.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Sends SIGKILL to the process, if spawned, without waiting.
    pub(crate) fn kill_now(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill_now();
        }
    }

    /// The command line, if spawned.
    pub(crate) fn command(&self) -> Option<&[String]> {
        self.proc.as_ref().map(|p| &p.command[..])
    }
}

/// What joins the nodes of a [`Cluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Bus {
    /// nats-server (`--nats`).
    Nats,
    /// redis-server without persistence (`--redis`).
    Redis,
}

/// The broker process of a [`Cluster`].
#[derive(Debug)]
enum Broker {
    /// nats-server and its monitoring endpoint (`/varz`).
    Nats(NatsServer, SocketAddr),
    Redis(RedisServer),
}

/// Nodes `a`, `b`, ... joined through a `nats-server` (monitoring on) or a
/// `redis-server`.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// The nodes, `a` first. Declared before `broker`: dropped first.
    pub(crate) nodes: Vec<Gateway>,
    broker: Broker,
}

impl Cluster {
    /// Starts nats-server (with JetStream if asked) and `n` nodes with
    /// `args`, and waits until every node lists all of them in `GET /v1/nodes`.
    pub(crate) async fn start(
        opts: &Opts,
        n: usize,
        jetstream: bool,
        args: &[String],
    ) -> Result<Self, String> {
        Self::start_on(opts, Bus::Nats, n, jetstream, args).await
    }

    /// [`Cluster::start`] over `bus` (`jetstream` applies to NATS).
    pub(crate) async fn start_on(
        opts: &Opts,
        bus: Bus,
        n: usize,
        jetstream: bool,
        args: &[String],
    ) -> Result<Self, String> {
        let broker = match bus {
            Bus::Nats => {
                let monitor: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
                let mon_args = ["-m".to_owned(), monitor.port().to_string()];
                let nats = tokio::task::spawn_blocking(move || {
                    NatsServer::start_with(jetstream, &mon_args)
                })
                .await
                .map_err(|e| format!("nats-server did not start: {e}"))?;
                Broker::Nats(nats, monitor)
            }
            Bus::Redis => Broker::Redis(
                tokio::task::spawn_blocking(RedisServer::start)
                    .await
                    .map_err(|e| format!("redis-server did not start: {e}"))?,
            ),
        };
        let mut nodes = Vec::new();
        for k in 0..n {
            let id = ((b'a' + k as u8) as char).to_string();
            let mut a = args.to_vec();
            match &broker {
                Broker::Nats(nats, _) => a.extend(["--nats".into(), nats.url()]),
                Broker::Redis(redis) => a.extend(["--redis".into(), redis.url()]),
            }
            a.extend(["--node-id".into(), id]);
            nodes.push(Gateway::spawn(opts, &a).await?);
        }
        let controls = nodes.iter().map(|g| g.control.expect("spawned"));
        await_joined(controls, n, READY_TIMEOUT).await?;
        Ok(Self { nodes, broker })
    }

    /// Process ids of the nodes.
    pub(crate) fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(Gateway::pid).collect()
    }

    /// The broker's name, for the results.
    pub(crate) fn broker_name(&self) -> &'static str {
        match self.broker {
            Broker::Nats(..) => "nats-server",
            Broker::Redis(_) => "redis-server",
        }
    }

    /// The broker's process id.
    pub(crate) fn broker_pid(&self) -> Option<u32> {
        match &self.broker {
            Broker::Nats(nats, _) => nats.pid(),
            Broker::Redis(redis) => redis.pid(),
        }
    }

    /// What the broker counted so far: NATS `/varz` `in_msgs` and
    /// `out_msgs`; Redis `total_commands_processed` (pub/sub deliveries
    /// are not counted by Redis) and 0.
    pub(crate) async fn bus_msgs(&self, api: &Api) -> Result<(u64, u64), String> {
        match &self.broker {
            Broker::Nats(_, monitor) => {
                let v = api.get_json(*monitor, "/varz").await?;
                Ok((
                    v["in_msgs"].as_u64().unwrap_or(0),
                    v["out_msgs"].as_u64().unwrap_or(0),
                ))
            }
            Broker::Redis(redis) => Ok((redis_info(redis, "total_commands_processed"), 0)),
        }
    }

    /// Redis's `used_memory` (bytes), or `None` over NATS.
    pub(crate) fn redis_used_memory(&self) -> Option<u64> {
        match &self.broker {
            Broker::Redis(redis) => Some(redis_info(redis, "used_memory")),
            Broker::Nats(..) => None,
        }
    }

    /// NATS's `/jsz` stored bytes (JetStream), or `None` over Redis.
    pub(crate) async fn jetstream_bytes(&self, api: &Api) -> Option<u64> {
        match &self.broker {
            Broker::Nats(_, monitor) => {
                api.get_json(*monitor, "/jsz").await.ok()?["bytes"].as_u64()
            }
            Broker::Redis(_) => None,
        }
    }
}

/// A numeric field of Redis's `INFO`.
fn redis_info(redis: &RedisServer, field: &str) -> u64 {
    let info = redis.command(&["INFO"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The echo origin of the examples (`echo-origin`), on a free port.
pub(crate) async fn echo_origin(greet: bool) -> Result<(Proc, SocketAddr), String> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut args = vec!["--listen".to_owned(), addr.to_string()];
    if greet {
        args.push("--greet".into());
    }
    let mut p = Proc::spawn(&sibling_bin("echo-origin"), &args)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        p.check_alive()?;
        if Instant::now() > deadline {
            return Err("echo-origin did not listen".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((p, addr))
}

/// `--tls` and its files: a spawned gateway speaking TLS on both listeners
/// (the server crate's test certificate by default; run from the workspace
/// root), clients doing full TLS handshakes, the control API over HTTPS.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TlsArgs {
    /// Speak TLS: the spawned gateway gets --tls-cert and --tls-key (both of
    /// its listeners then speak TLS) and the clients connect with TLS.
    #[arg(long)]
    pub(crate) tls: bool,
    /// Certificate chain (PEM) of the spawned gateway.
    #[arg(
        long,
        requires = "tls",
        default_value = "crates/switchboard-server/tests/fixtures/tls/server-a.pem"
    )]
    tls_cert: PathBuf,
    /// Private key (PEM) of --tls-cert.
    #[arg(
        long,
        requires = "tls",
        default_value = "crates/switchboard-server/tests/fixtures/tls/server-a-key.pem"
    )]
    tls_key: PathBuf,
    /// CA certificate (PEM) the clients trust.
    #[arg(
        long,
        requires = "tls",
        default_value = "crates/switchboard-server/tests/fixtures/tls/ca.pem"
    )]
    tls_ca: PathBuf,
    /// Name the clients check the certificate against (and send as SNI).
    #[arg(long, requires = "tls", default_value = "localhost")]
    tls_server_name: String,
}

impl TlsArgs {
    /// The control API client: HTTPS trusting --tls-ca with `--tls`.
    pub(crate) fn api(&self) -> Result<Api, String> {
        if self.tls {
            Api::with_ca(&self.tls_ca)
        } else {
            Ok(Api::new())
        }
    }

    /// What a spawned gateway is given besides `args`.
    pub(crate) fn gateway_args(&self, mut args: Vec<String>) -> Vec<String> {
        if self.tls {
            let path = |p: &PathBuf| p.display().to_string();
            args.extend(["--tls-cert".into(), path(&self.tls_cert)]);
            args.extend(["--tls-key".into(), path(&self.tls_key)]);
        }
        args
    }

    /// Makes the workers' clients speak TLS.
    pub(crate) fn apply(&self, configs: &mut [crate::engine::WorkerConfig]) {
        if self.tls {
            for c in configs {
                c.tls = Some((self.tls_ca.clone(), self.tls_server_name.clone()));
            }
        }
    }
}

/// An HTTP client for control APIs (keep-alive connections, 5 s timeout).
#[derive(Debug, Clone)]
pub(crate) struct Api {
    client: reqwest::Client,
    /// `http`, or `https` for a gateway that speaks TLS.
    scheme: &'static str,
}

impl Api {
    /// A client with up to 64 idle connections per host.
    pub(crate) fn new() -> Self {
        Self {
            client: Self::builder().build().expect("a reqwest client"),
            scheme: "http",
        }
    }

    /// An HTTPS client trusting the CA certificate of the PEM file `ca`.
    pub(crate) fn with_ca(ca: &std::path::Path) -> Result<Self, String> {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())?;
        let client = Self::builder()
            .add_root_certificate(cert)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            scheme: "https",
        })
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            .no_proxy()
    }

    /// `GET http://addr/path`, failing unless 200; the body.
    pub(crate) async fn get(&self, addr: SocketAddr, path: &str) -> Result<String, String> {
        let r = self
            .client
            .get(format!("{}://{addr}{path}", self.scheme))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("GET {path}: {}", r.status()));
        }
        r.text().await.map_err(|e| e.to_string())
    }

    /// `GET` as JSON.
    pub(crate) async fn get_json(
        &self,
        addr: SocketAddr,
        path: &str,
    ) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.get(addr, path).await?).map_err(|e| e.to_string())
    }

    /// `POST url` with `body` (JSON if `json`); the status.
    pub(crate) async fn post(&self, url: &str, body: String, json: bool) -> Result<u16, String> {
        let mut req = self.client.post(url).body(body);
        if json {
            req = req.header("content-type", "application/json");
        }
        let r = req.send().await.map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        // Read the body so the connection goes back to the pool.
        let _ = r.bytes().await;
        Ok(status)
    }

    /// `GET /v1/stats`: open connections.
    pub(crate) async fn connections(&self, control: SocketAddr) -> Result<u64, String> {
        let v = self.get_json(control, "/v1/stats").await?;
        v["connections"]
            .as_u64()
            .ok_or_else(|| format!("no connections in {v}"))
    }
}

/// Callers running in loops (publishers, control API callers), each with at
/// most one call in flight.
#[derive(Debug)]
pub(crate) struct Callers<T> {
    tasks: Vec<tokio::task::JoinHandle<Vec<T>>>,
    skipped: Arc<AtomicU64>,
}

impl<T: Send + 'static> Callers<T> {
    /// Starts `n` callers from `t0` until `end`, each calling `call(k)` with
    /// a number `k` unique over all of them. Paced at `rate` calls/s over
    /// all callers (started evenly spread over one interval; a caller still
    /// waiting for its answer skips the slots it missed), or back to back
    /// without a rate.
    pub(crate) fn start<F, Fut>(
        n: u64,
        rate: Option<f64>,
        t0: Instant,
        end: Instant,
        call: F,
    ) -> Self
    where
        F: Fn(u64) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = T> + Send,
    {
        let skipped = Arc::new(AtomicU64::new(0));
        let tasks = (0..n)
            .map(|p| {
                let (call, skipped) = (call.clone(), skipped.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut slot = 0u64;
                    tokio::time::sleep_until(t0.into()).await;
                    loop {
                        if let Some(rate) = rate {
                            let step = Duration::from_secs_f64(n as f64 / rate);
                            let at =
                                t0 + Duration::from_secs_f64(p as f64 / rate) + step * slot as u32;
                            let now = Instant::now();
                            if at >= end {
                                return out;
                            }
                            if now > at + step {
                                let missed = ((now - at).as_secs_f64() / step.as_secs_f64()) as u64;
                                skipped.fetch_add(missed, Relaxed);
                                slot += missed;
                                continue;
                            }
                            tokio::time::sleep_until(at.into()).await;
                        } else if Instant::now() >= end {
                            return out;
                        }
                        out.push(call(slot * n + p).await);
                        slot += 1;
                    }
                })
            })
            .collect();
        Self { tasks, skipped }
    }

    /// Waits for every caller; their results and the slots skipped.
    pub(crate) async fn join(self) -> Result<(Vec<T>, u64), String> {
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.map_err(|e| e.to_string())?);
        }
        Ok((all, self.skipped.load(Relaxed)))
    }
}

/// Waits until every node behind `controls` lists `n` nodes in `GET
/// /v1/nodes` (at most `timeout`).
pub(crate) async fn await_joined(
    controls: impl IntoIterator<Item = SocketAddr>,
    n: usize,
    timeout: Duration,
) -> Result<(), String> {
    let api = Api::new();
    let deadline = Instant::now() + timeout;
    for control in controls {
        loop {
            let listed = api
                .get_json(control, "/v1/nodes")
                .await
                .map(|v| v["nodes"].as_array().map_or(0, Vec::len))
                .unwrap_or(0);
            if listed == n {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the nodes did not see each other within {timeout:?} ({listed} of {n})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
