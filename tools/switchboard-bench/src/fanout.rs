//! The `fanout` scenario: one channel, S subscribers on one server, and
//! publications that must reach all of them; Switchboard beside nginx with
//! the nchan module, the reference, in the same run with the same clients.
//!
//! For each server (`--servers`, by default Switchboard then nchan):
//!
//! 1. The server is started on loopback ports: `switchboard serve` in dev
//!    mode with the namespace `bench` (clients may subscribe), or nginx with a
//!    generated configuration in a temporary folder (see [`Nchan`]).
//! 2. `--subscribers` clients connect, sharded over `worker` children, and
//!    subscribe: to Switchboard with the native protocol (`switchboard.v1`,
//!    the `connected` push, then `{"id":1,"cmd":"subscribe","channel":
//!    "bench:fanout"}` and its reply), to nchan by the URL of its
//!    `nchan_subscriber websocket` location. A subscriber counts once it is
//!    subscribed; then the server's own count of subscribers is checked.
//! 3. Single: `--messages` publications, one at a time. After each publish
//!    the coordinator waits (at most `--single-timeout`) until every worker
//!    reports that all its live subscribers have the message. Per message,
//!    the time until the last subscriber has it ("all reached"), and the
//!    latency of every delivery.
//! 4. Sustained: `--publishers` keep-alive publishers paced at `--rate`
//!    messages per second over all of them (or back to back with
//!    `--rate max`) for `--warmup` and then the measured `--duration`; after
//!    a `--grace` for deliveries in flight the workers report. Deliveries per
//!    second are the receipts whose receipt time falls in the measured
//!    window (by tenths of a second); latency, lost and late deliveries
//!    concern the messages published in the window.
//!
//! Publishing: Switchboard's `POST /v1/channels/bench:fanout/messages` with
//! `{"text":"<data>"}`, nchan's `POST /pub` with the data as the body. The
//! data is a [`proto::fanout_text`] stamp: the publish time in Unix
//! nanoseconds, taken just before the request is written, and a sequence
//! number. Subscribers find it by scanning the frame (see
//! [`crate::subscriber`]); latency is receipt time minus publish time, both
//! read from `CLOCK_REALTIME` on this machine.
//!
//! The CPU time (user + system, `/proc/PID/stat`) of the server's processes
//! and of the client workers is read at both ends of each phase, the
//! server's memory (RSS and PSS) after connecting and after each phase.
//!
//! Fairness: the gateway's tokio runtime has one worker thread per CPU, so
//! nginx gets as many worker processes (`--nginx-workers`), the same listen
//! backlog, the same loopback clients and source addresses, and no access
//! log. nchan keeps its defaults otherwise (a buffer of 10 messages per
//! channel; Switchboard's `bench` namespace keeps no history).
//!
//! Cluster (`--nodes N`, N > 1; Switchboard only, nchan stays one server, the
//! reference, with `--nchan-subscribers`): the tool starts its own
//! `nats-server -js` (see [`crate::nats`]) and N nodes `a`, `b`, ... with
//! `--nats`, `--node-id` and the same namespace and limits, waits until every
//! node's `GET /v1/nodes` lists them all, and spreads the subscribers evenly
//! over the nodes (client workers per node, none holding more than
//! `--per-process`). Publishes go through `a`'s control API; the server's
//! count is the sum of every node's `GET /v1/channels`. CPU and memory are
//! those of all nodes together, nats-server's apart; NATS messages per
//! publish are `/varz` `in_msgs` and `out_msgs` over the sustained window,
//! less the background rate measured while the subscribers settle, divided
//! by the publishes started in the window.

use crate::fleet::{self, Fleet, Gateway, Service};
use crate::http::HttpConn;
use crate::nats::{self, NatsSample, NatsServer};
use crate::proto::{self, Report};
use crate::subscriber::TICK_NS;
use crate::util::{self, human_bytes, parse_duration, Machine, Percentiles, Table};
use crate::{ClientOpts, GatewayOpts};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The channel every subscriber of Switchboard joins.
const CHANNEL: &str = "bench:fanout";
/// The namespace the spawned gateway is given: clients may subscribe.
const NAMESPACE: &str = "bench:subscribe";
/// nchan's channel id (both locations).
const NCHAN_CHANNEL: &str = "fanout";
/// Extra headroom of `--rate auto` over `--target-deliveries`.
const AUTO_RATE_HEADROOM: f64 = 1.15;
/// nchan's subscribers by default beside a cluster: what one server holds
/// in the single-node run (the per-process file limit).
const NCHAN_CLUSTER_DEFAULT: u64 = 19_000;
/// Open files a node keeps besides its subscribers (listeners, NATS, logs).
const NODE_SPARE_FILES: u64 = 1_000;

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ServerKind {
    /// `switchboard serve`, native protocol subscribers.
    Switchboard,
    /// nginx with the nchan module, websocket subscribers (the reference).
    Nchan,
}

impl ServerKind {
    fn name(self) -> &'static str {
        match self {
            Self::Switchboard => "switchboard",
            Self::Nchan => "nchan",
        }
    }
}

/// `--rate`: messages per second of the sustained phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Rate {
    /// Enough for `--target-deliveries` with the subscribers, plus 15 %.
    Auto,
    /// Back to back, `--publishers` requests in flight.
    Max,
    /// This many messages per second over all publishers.
    PerSecond(f64),
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    match s.trim() {
        "auto" => Ok(Rate::Auto),
        "max" => Ok(Rate::Max),
        n => match n.parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 1_000_000.0 => Ok(Rate::PerSecond(v)),
            _ => Err(format!(
                "invalid rate {s:?}: messages per second (0 < rate <= 1000000), `auto` or `max`"
            )),
        },
    }
}

/// Options of `switchboard-bench fanout`.
#[derive(Debug, Args)]
pub(crate) struct FanoutArgs {
    /// Subscribers, all on one channel of one server, or spread evenly over
    /// the nodes of a cluster (a process may hold at most 20,000 open files
    /// on the reference machine).
    #[arg(long, default_value_t = 19_000, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    subscribers: u64,

    /// Switchboard nodes: with more than one, the tool starts its own
    /// `nats-server -js` and nodes `a`, `b`, ... joined through it, spreads
    /// the subscribers evenly over them (each node may hold the open-file
    /// limit less 1,000) and publishes through `a`. nchan stays one server.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=26))]
    nodes: u8,

    /// nchan's subscribers [default: --subscribers with one node; beside a
    /// cluster, at most 19,000, what one server holds in the single-node run].
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    nchan_subscribers: Option<u64>,

    /// NATS server binary (--nodes above 1).
    #[arg(long, default_value = "nats-server", value_name = "PATH")]
    nats_server_bin: PathBuf,

    /// Cluster: the background NATS traffic (heartbeats) is measured while
    /// the subscribers settle, over at least this long (the settle wait is
    /// lengthened to it).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    quiet: Duration,

    /// Longest wait until every node lists all the nodes (--nodes above 1).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    cluster_timeout: Duration,

    /// Servers to measure, in this order; nchan is skipped with a message if
    /// nginx or its nchan module is not installed.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "switchboard,nchan"
    )]
    servers: Vec<ServerKind>,

    /// Messages of the single phase, each published once the previous one
    /// has reached every subscriber.
    #[arg(long, default_value_t = 20, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    messages: u32,

    /// Longest wait for one single-phase message to reach every subscriber.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    single_timeout: Duration,

    /// Least time between two single-phase publishes.
    #[arg(long, default_value = "100ms", value_name = "DURATION", value_parser = parse_duration)]
    single_interval: Duration,

    /// Messages per second of the sustained phase, over all publishers:
    /// a number, `auto` (enough for --target-deliveries with the subscribers
    /// connected, plus 15 %: 31/s for 19,000) or `max` (back to back).
    #[arg(long, default_value = "auto", value_name = "PER_S|auto|max", value_parser = parse_rate)]
    rate: Rate,

    /// Concurrent publishers of the sustained phase, each with its own
    /// keep-alive connection and at most one request in flight. nchan answers
    /// a publish only after writing it to its subscribers (hundreds of
    /// milliseconds for 19,000), so the default leaves room for that at the
    /// default rate; Switchboard answers once the message is queued.
    #[arg(long, default_value_t = 32, value_name = "P", value_parser = clap::value_parser!(u16).range(1..=256))]
    publishers: u16,

    /// The measured window of the sustained phase.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    duration: Duration,

    /// Publishing before the window (not measured).
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    warmup: Duration,

    /// Wait after the window for deliveries still in flight.
    #[arg(long, default_value = "3s", value_name = "DURATION", value_parser = parse_duration)]
    grace: Duration,

    /// A delivery of the sustained phase later than this counts as late.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    late_after: Duration,

    /// Message data size in bytes (at least the stamp, 24 to 43 bytes).
    #[arg(long, default_value_t = 64, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(0..=65_536))]
    size: u32,

    /// Wait after connecting before the single phase (the server settles;
    /// in a cluster the background NATS traffic is measured meanwhile).
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    settle: Duration,

    /// Longest wait for one publish answer.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    call_timeout: Duration,

    /// Target of the single phase: p99 of the deliveries, milliseconds.
    #[arg(long, default_value_t = 50.0, value_name = "MS")]
    target_p99_ms: f64,

    /// Target of the sustained phase: deliveries per second.
    #[arg(long, default_value_t = 500_000, value_name = "PER_S")]
    target_deliveries: u64,

    /// nginx binary [default: `nginx` on the PATH, else /usr/sbin/nginx].
    #[arg(long, value_name = "PATH")]
    nginx_bin: Option<PathBuf>,

    /// The nchan module [default: ngx_nchan_module.so in /usr/lib/nginx/modules
    /// or where /usr/share/nginx/modules-available/mod-nchan.conf points].
    #[arg(long, value_name = "PATH")]
    nchan_module: Option<PathBuf>,

    /// nginx worker processes; 0: one per CPU available, as many as the
    /// gateway's runtime has worker threads.
    #[arg(long, default_value_t = 0, value_name = "N")]
    nginx_workers: usize,

    /// Diagnostic: pin the server's processes (every thread) to these CPUs
    /// (`taskset` list, e.g. `0`), to see how the CPU split between server
    /// and clients matters.
    #[arg(long, value_name = "LIST")]
    server_cpus: Option<String>,

    /// Diagnostic: pin the client workers to these CPUs (e.g. `1`).
    #[arg(long, value_name = "LIST")]
    client_cpus: Option<String>,

    /// JSON result file (in a cluster, nats-server's log and JetStream store
    /// go beside it; the store is removed after the run).
    #[arg(long, default_value = "target/bench/fanout.json", value_name = "FILE")]
    out: PathBuf,

    #[command(flatten)]
    clients: ClientOpts,

    #[command(flatten)]
    gateway: GatewayOpts,
}

// ---------------------------------------------------------------------------
// Results.

/// CPU of a group of processes over a phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Cpu {
    /// User + system seconds.
    seconds: f64,
    /// `seconds / phase length`: 1.0 is one core busy all the time.
    cores: f64,
}

/// Memory of the server's processes at one moment (summed over them).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Mem {
    /// Resident set size (`VmRSS`, summed: shared pages count once per process).
    rss: u64,
    /// Proportional set size (`Pss`: shared pages divided among the processes).
    pss: Option<u64>,
    /// Peak resident set size of the largest process so far (`VmHWM`).
    hwm: u64,
}

/// CPU and memory of one phase.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Usage {
    /// Length of the phase, seconds.
    seconds: f64,
    /// The server's processes (in a cluster: all nodes together).
    server_cpu: Option<Cpu>,
    /// nats-server (cluster only).
    nats_cpu: Option<Cpu>,
    /// The client workers.
    clients_cpu: Option<Cpu>,
    /// This process (the publishers).
    publisher_cpu: Option<Cpu>,
    /// The server's memory at the end of the phase.
    server_mem: Option<Mem>,
    /// nats-server's memory at the end of the phase (cluster only).
    nats_mem: Option<Mem>,
    /// Share of the CPUs used by other processes during the phase.
    other_cpu_share: Option<f64>,
}

/// The single phase.
#[derive(Debug, Default, Serialize)]
struct Single {
    /// Messages published (answered 2xx).
    published: u32,
    /// Publishes that failed.
    failed: u32,
    /// The first failure.
    first_failure: Option<String>,
    /// Messages that reached every subscriber within `--single-timeout`.
    complete: u32,
    /// Deliveries expected (published × subscribers).
    expected: u64,
    /// Deliveries received.
    received: u64,
    /// Deliveries missing after the phase.
    missing: u64,
    /// Publish to receipt, every delivery.
    latency: Percentiles,
    /// Publish to the last subscriber's receipt, per complete message.
    all_reached: Percentiles,
    /// The same per message, in publish order, milliseconds (None: incomplete).
    all_reached_ms: Vec<Option<f64>>,
    /// Publish request to its answer.
    publish_call: Percentiles,
    /// Server CPU per delivery, microseconds.
    server_cpu_us_per_delivery: Option<f64>,
    /// Cluster: CPU of the nodes and nats-server per delivery, microseconds.
    cluster_cpu_us_per_delivery: Option<f64>,
    usage: Usage,
    /// The target: p99 of the deliveries below `--target-p99-ms`, nothing missing.
    target_p99_ms: f64,
    target_met: bool,
}

/// The sustained phase.
#[derive(Debug, Default, Serialize)]
struct Sustained {
    /// Messages per second asked for (None: `max`, back to back).
    rate: Option<f64>,
    /// Concurrent publishers.
    publishers: u16,
    /// The measured window, seconds.
    window_s: f64,
    /// Messages published in the window (answered 2xx).
    published: u64,
    /// Publishes started in the window that failed.
    failed: u64,
    /// The first failure (warmup included).
    first_failure: Option<String>,
    /// Pacing slots skipped because the publisher was still waiting for an answer.
    skipped_slots: u64,
    /// Messages published per second in the window.
    published_per_s: f64,
    /// Deliveries of the window's messages expected (published × subscribers).
    expected: u64,
    /// Deliveries of the window's messages received (by the end of the grace).
    received: u64,
    /// Deliveries of the window's messages not received.
    lost: u64,
    /// If some were lost: those that arrived by a second look, `--grace`
    /// × 3 (at most 30 s) later (their latencies are in `latency`).
    arrived_after_grace: Option<u64>,
    /// If some were lost: those still missing at the second look.
    never_arrived: Option<u64>,
    /// Receipts beyond one per subscriber and message.
    duplicates: u64,
    /// Receipts of the window's messages (acknowledged or not) later than
    /// `late_after_ms`.
    late: u64,
    late_after_ms: f64,
    /// Deliveries per second received by the clients: receipts of any
    /// message with a receipt time in the window.
    deliveries_per_s: f64,
    /// The same per whole second of the window.
    deliveries_per_second: Vec<u64>,
    /// Publish to receipt, the window's messages.
    latency: Percentiles,
    /// Publish request to its answer.
    publish_call: Percentiles,
    /// Server CPU per delivery, microseconds.
    server_cpu_us_per_delivery: Option<f64>,
    /// Cluster: CPU of the nodes and nats-server per delivery, microseconds.
    cluster_cpu_us_per_delivery: Option<f64>,
    /// Client CPU per delivery, microseconds.
    clients_cpu_us_per_delivery: Option<f64>,
    /// Cluster: NATS messages per publish over the window.
    nats: Option<NatsPerPublish>,
    usage: Usage,
    /// The target: at least `--target-deliveries` per second, nothing lost.
    target_deliveries_per_s: u64,
    target_met: bool,
}

/// NATS traffic per publish over the sustained window (cluster).
#[derive(Debug, Clone, Serialize)]
struct NatsPerPublish {
    /// Between the two `/varz` readings, seconds.
    window_s: f64,
    /// Publishes started in the window (answered or not).
    publishes: u64,
    /// `in_msgs` and `out_msgs` growth over the window, as read.
    in_msgs_raw: u64,
    out_msgs_raw: u64,
    /// Background (heartbeats) expected over the window, subtracted.
    in_msgs_background: f64,
    out_msgs_background: f64,
    /// Messages published into NATS per publish.
    in_msgs_per_publish: f64,
    /// Messages NATS delivered to its clients per publish.
    out_msgs_per_publish: f64,
    /// `in + out` per publish.
    msgs_per_publish: f64,
    /// Messages each NATS connection published per publish, by connection
    /// name (the nodes call theirs `switchboard <id>`).
    published_per_publish: BTreeMap<String, f64>,
    /// Nodes holding subscribers: each should receive one copy of a publish.
    nodes_with_subscribers: usize,
}

/// Background NATS traffic, measured while the subscribers settle (nothing
/// published).
#[derive(Debug, Clone, Default, Serialize)]
struct NatsBackground {
    window_s: f64,
    in_msgs_per_s: f64,
    out_msgs_per_s: f64,
    /// Messages each connection published per second, by name.
    published_per_s: BTreeMap<String, f64>,
}

/// The cluster's nats-server.
#[derive(Debug, Serialize)]
struct NatsRun {
    version: Option<String>,
    command: Vec<String>,
    background: Option<NatsBackground>,
    /// Its memory with every subscriber connected and settled.
    mem_subscribed: Option<Mem>,
}

/// One node of a cluster (or the single gateway).
#[derive(Debug, Serialize)]
struct NodeRun {
    /// `a`, `b`, ... (empty for a single server).
    node: String,
    url: String,
    /// Command line, when spawned.
    command: Option<Vec<String>>,
    /// Subscribers sent to this node.
    subscribers: u64,
    /// Subscribers the clients count as subscribed on this node.
    connected: u64,
    /// Subscribers the node counts (`GET /v1/channels`).
    server_subscribers: Option<u64>,
    client_workers: usize,
    /// The node's memory with every subscriber connected and settled.
    mem_subscribed: Option<Mem>,
}

/// One server's run.
#[derive(Debug, Serialize)]
struct ServerRun {
    server: ServerKind,
    /// Version, as the binary reports it.
    version: Option<String>,
    /// Command line.
    command: Vec<String>,
    /// nginx: the generated configuration.
    config: Option<String>,
    /// Server processes (nginx master + workers) or 1.
    processes: usize,
    /// Threads of the server's processes (summed), after connecting.
    threads: u64,
    /// WebSocket URL of the subscribers.
    url: String,
    /// Subscribers asked for.
    subscribers: u64,
    /// Subscribers connected and subscribed.
    connected: u64,
    /// Subscribers as the server counts them (Switchboard: `GET
    /// /v1/channels`; nchan: the publisher location's `active subscribers`).
    server_subscribers: Option<u64>,
    /// Seconds from `go` to the last subscriber subscribed.
    connect_s: f64,
    /// Client worker processes.
    client_workers: usize,
    /// Client workers' resident memory after the phases, bytes (summed).
    clients_rss: u64,
    /// The server's memory before connecting.
    mem_empty: Option<Mem>,
    /// The server's memory with every subscriber connected and settled.
    mem_subscribed: Option<Mem>,
    /// `(subscribed − empty) / connected`, PSS (RSS if unreadable), bytes.
    mem_per_subscriber: Option<f64>,
    /// The nodes (one for a single server).
    nodes: Vec<NodeRun>,
    /// The cluster's nats-server (None for a single server).
    nats: Option<NatsRun>,
    single: Single,
    sustained: Sustained,
    /// Subscriber connections that ended unexpectedly.
    dropped: u64,
    first_drop: Option<String>,
}

/// The result file of `fanout`.
#[derive(Debug, Serialize)]
struct FanoutResult {
    scenario: &'static str,
    unix_time: u64,
    machine: Machine,
    /// Share of all CPUs busy (other processes) in the second before the run.
    background_cpu_busy: f64,
    subscribers: u64,
    /// Switchboard nodes.
    nodes: u8,
    /// nchan's subscribers.
    nchan_subscribers: u64,
    size: u32,
    messages: u32,
    warmup_s: f64,
    duration_s: f64,
    /// nginx worker processes given to nchan.
    nginx_workers: usize,
    /// CPUs the servers were pinned to (`--server-cpus`), if any.
    server_cpus: Option<String>,
    /// CPUs the client workers were pinned to (`--client-cpus`), if any.
    client_cpus: Option<String>,
    runs: Vec<ServerRun>,
    /// Servers asked for but not measured, and why.
    skipped: Vec<String>,
    /// Anything that makes the figures doubtful (empty when all went well).
    problems: Vec<String>,
    /// Conditions that may have lowered the figures.
    warnings: Vec<String>,
}

// ---------------------------------------------------------------------------
// The servers.

/// nginx with nchan, in its own temporary folder (removed when dropped).
#[derive(Debug)]
struct Nchan {
    service: Service,
    dir: PathBuf,
    config: String,
}

impl Drop for Nchan {
    fn drop(&mut self) {
        self.service.stop(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where one share of the subscribers connects: a node, or the one server.
#[derive(Debug, Clone)]
struct Endpoint {
    /// Node id (`a`, `b`, ...) in a cluster, else empty.
    node: String,
    ws_addr: SocketAddr,
    ws_url: String,
    /// Switchboard: the node's control API (its subscriber count).
    control: Option<SocketAddr>,
}

/// A started server and how to reach it.
#[derive(Debug)]
struct Server {
    kind: ServerKind,
    /// Subscribers to connect, spread evenly over `endpoints`.
    subscribers: u64,
    /// Subscribers connect here (one per node).
    endpoints: Vec<Endpoint>,
    /// Publishes go here (node `a` in a cluster).
    publish_addr: SocketAddr,
    publish_path: String,
    /// Worker arguments (subprotocol, subscribe command).
    worker_args: Vec<String>,
    /// nchan: nginx's master process.
    master_pid: Option<u32>,
    version: Option<String>,
    /// The command line (node `a`'s in a cluster).
    command: Vec<String>,
    /// Switchboard: the gateway, or the nodes in order (dropped before
    /// `nats`: fields drop in declaration order).
    gateways: Vec<Gateway>,
    /// Cluster: its nats-server.
    nats: Option<NatsServer>,
    nchan: Option<Nchan>,
}

impl Server {
    /// The server's processes: the gateway or every node, or nginx's master
    /// and workers (never nats-server: see [`Server::nats_pid`]).
    fn pids(&self) -> Vec<u32> {
        match self.kind {
            ServerKind::Switchboard => self.gateways.iter().filter_map(|g| g.pid).collect(),
            ServerKind::Nchan => {
                let Some(pid) = self.master_pid else {
                    return Vec::new();
                };
                let mut v = vec![pid];
                v.extend(util::child_pids(pid));
                v
            }
        }
    }

    /// The cluster's nats-server.
    fn nats_pid(&self) -> Option<u32> {
        self.nats.as_ref().map(NatsServer::pid)
    }

    /// The request body publishing `data`.
    fn body(&self, data: &str) -> Vec<u8> {
        match self.kind {
            // The stamp is plain ASCII: no escaping needed.
            ServerKind::Switchboard => format!("{{\"text\":\"{data}\"}}").into_bytes(),
            ServerKind::Nchan => data.as_bytes().to_vec(),
        }
    }

    fn content_type(&self) -> &'static str {
        match self.kind {
            ServerKind::Switchboard => "application/json",
            ServerKind::Nchan => "text/plain",
        }
    }

    /// Subscribers as the server counts them, per endpoint.
    fn subscriber_counts(&self) -> Result<Vec<u64>, String> {
        match self.kind {
            ServerKind::Switchboard => self
                .endpoints
                .iter()
                .map(|e| {
                    let control = e.control.ok_or("no control address")?;
                    let (status, body) = util::http_get(control, "/v1/channels")?;
                    if status != 200 {
                        return Err(format!("GET /v1/channels: HTTP {status}"));
                    }
                    channel_subscribers(&body, CHANNEL)
                        .map_err(|e| format!("GET /v1/channels: {e}"))
                })
                .collect(),
            ServerKind::Nchan => {
                let (status, body) = util::http_get(self.publish_addr, &self.publish_path)?;
                match status {
                    404 => Ok(vec![0]), // no channel yet
                    200 => body
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("active subscribers:"))
                        .and_then(|n| n.trim().parse().ok())
                        .map(|n| vec![n])
                        .ok_or_else(|| format!("no subscriber count in {body:?}")),
                    _ => Err(format!("GET {}: HTTP {status}", self.publish_path)),
                }
            }
        }
    }

    /// Fails if the server (a node, nats-server) has exited.
    fn check_alive(&mut self) -> Result<(), String> {
        let cluster = self.gateways.len() > 1;
        for (g, e) in self.gateways.iter_mut().zip(&self.endpoints) {
            g.check_alive().map_err(|err| {
                if cluster {
                    format!("node {}: {err}", e.node)
                } else {
                    err
                }
            })?;
        }
        if let Some(n) = &mut self.nats {
            n.check_alive()?;
        }
        if let Some(n) = &mut self.nchan {
            if let Ok(Some(status)) = n.service.child.try_wait() {
                return Err(format!(
                    "nginx exited ({status}); see {}",
                    n.dir.join("error.log").display()
                ));
            }
        }
        Ok(())
    }

    /// Stops the server: every node at once, then NATS.
    fn stop(&mut self) {
        for g in &mut self.gateways {
            g.terminate();
        }
        for g in &mut self.gateways {
            g.stop();
        }
        if let Some(n) = &mut self.nats {
            n.stop();
        }
        self.nchan = None;
    }
}

/// The subscribers of `channel` in a `GET /v1/channels` answer (0 if the
/// channel is not listed).
fn channel_subscribers(body: &str, channel: &str) -> Result<u64, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let channels = v
        .get("channels")
        .and_then(|c| c.as_array())
        .ok_or("no channels list")?;
    Ok(channels
        .iter()
        .find(|c| c.get("channel").and_then(|n| n.as_str()) == Some(channel))
        .and_then(|c| c.get("subscribers")?.as_u64())
        .unwrap_or(0))
}

/// `total` split into `parts` shares differing by at most one, the larger
/// first.
fn split_even(total: u64, parts: usize) -> Vec<u64> {
    let n = parts.max(1) as u64;
    (0..n)
        .map(|i| total / n + u64::from(i < total % n))
        .collect()
}

/// The first line a binary prints for `flag` (stdout or stderr), if it runs.
fn version_of(bin: &Path, flag: &str) -> Option<String> {
    let out = std::process::Command::new(bin).arg(flag).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
}

/// Starts the gateway, or with `--nodes` above 1 nats-server and the nodes.
fn start_switchboard(a: &FanoutArgs) -> Result<Server, String> {
    let opts = &a.gateway;
    let nodes = usize::from(a.nodes);
    let serve = [
        "--namespace",
        NAMESPACE,
        "--max-connections",
        "1000000",
        "--max-connections-per-ip",
        "0",
    ]
    .map(str::to_owned);
    let bin = opts
        .gateway_bin
        .clone()
        .unwrap_or_else(|| util::sibling_bin("switchboard"));
    // Cluster: nats-server first (dropped last: declared before the nodes).
    let nats = if nodes > 1 {
        if opts.url.is_some() {
            return Err(
                "--nodes above 1 starts its own cluster; --url measures one running gateway".into(),
            );
        }
        let per_node = a.subscribers.div_ceil(nodes as u64);
        if let Some(limit) = util::nofile_hard_limit() {
            let most = limit.saturating_sub(NODE_SPARE_FILES);
            if per_node > most {
                return Err(format!(
                    "{per_node} subscribers per node, more than the {most} a process may hold here (open-file limit {limit} less {NODE_SPARE_FILES}); raise --nodes"
                ));
            }
        }
        let n = NatsServer::start(&a.nats_server_bin, &a.out, true)?;
        eprintln!(
            "switchboard-bench: nats-server {} up with JetStream ({})",
            n.version.as_deref().unwrap_or("?"),
            n.url
        );
        Some(n)
    } else {
        None
    };
    let ids = if nodes > 1 {
        nats::node_ids(nodes)
    } else {
        vec![String::new()]
    };
    let mut gateways = Vec::new();
    for id in &ids {
        let mut args = serve.to_vec();
        if let Some(n) = &nats {
            args.extend([
                "--nats".into(),
                n.url.clone(),
                "--node-id".into(),
                id.clone(),
            ]);
        }
        let gw = Gateway::start(opts, &args).map_err(|e| {
            if id.is_empty() {
                e
            } else {
                format!("node {id}: {e}")
            }
        })?;
        gateways.push(gw);
    }
    let mut endpoints = Vec::new();
    for (g, id) in gateways.iter().zip(&ids) {
        let control = g.control.ok_or(
            "--control is needed with --url: publishing goes through the control API".to_owned(),
        )?;
        endpoints.push(Endpoint {
            node: id.clone(),
            ws_addr: g.addr,
            ws_url: g.url.clone(),
            control: Some(control),
        });
    }
    if nats.is_some() {
        let deadline = Instant::now() + a.cluster_timeout;
        for e in &endpoints {
            let control = e.control.expect("checked above");
            nats::wait_nodes(&e.node, control, &ids, deadline)?;
        }
        eprintln!(
            "switchboard-bench: {} nodes up ({}); GET /v1/nodes on each lists them all",
            ids.len(),
            ids.join(", ")
        );
    }
    let first = &gateways[0];
    Ok(Server {
        kind: ServerKind::Switchboard,
        subscribers: a.subscribers,
        publish_addr: endpoints[0].control.expect("checked above"),
        publish_path: format!("/v1/channels/{CHANNEL}/messages"),
        worker_args: vec![
            "--subprotocol".into(),
            switchboard_proto::native::SUBPROTOCOL.into(),
            "--subscribe".into(),
            CHANNEL.into(),
        ],
        master_pid: None,
        version: first
            .command
            .as_ref()
            .and_then(|_| version_of(&bin, "--version")),
        command: first.command.clone().unwrap_or_default(),
        endpoints,
        gateways,
        nats,
        nchan: None,
    })
}

/// `name` on the PATH, else in the usual sbin folders.
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The nchan module: the usual module folders, or the file the Debian
/// `modules-available` snippet loads.
fn find_nchan_module() -> Option<PathBuf> {
    const NAME: &str = "ngx_nchan_module.so";
    let mut candidates: Vec<PathBuf> = [
        "/usr/lib/nginx/modules",
        "/usr/lib64/nginx/modules",
        "/usr/local/nginx/modules",
        "/usr/share/nginx/modules",
        "/etc/nginx/modules",
    ]
    .iter()
    .map(|d| Path::new(d).join(NAME))
    .collect();
    if let Ok(text) = std::fs::read_to_string("/usr/share/nginx/modules-available/mod-nchan.conf") {
        for line in text.lines() {
            if let Some(p) = line
                .trim()
                .strip_prefix("load_module")
                .map(|r| r.trim().trim_end_matches(';').trim())
            {
                let p = Path::new(p);
                // Relative paths are relative to nginx's prefix (/usr/share/nginx).
                candidates.push(if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    Path::new("/usr/share/nginx").join(p)
                });
            }
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// nginx's configuration: nchan's subscriber location on one port, its
/// publisher location on another, everything else in `dir`.
fn nginx_config(
    dir: &Path,
    module: &Path,
    workers: usize,
    nofile: u64,
    ws_addr: SocketAddr,
    pub_addr: SocketAddr,
) -> String {
    let d = dir.display();
    format!(
        "# Generated by switchboard-bench fanout.
load_module {module};
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections {nofile};
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    server {{
        listen {ws_addr} backlog=65535;
        location = /sub {{
            nchan_subscriber websocket;
            nchan_channel_id {NCHAN_CHANNEL};
        }}
    }}

    server {{
        listen {pub_addr};
        location = /pub {{
            nchan_publisher;
            nchan_channel_id {NCHAN_CHANNEL};
        }}
    }}
}}
",
        module = module.display(),
    )
}

/// Starts nginx with nchan, or says why it cannot.
fn start_nchan(a: &FanoutArgs, workers: usize, subscribers: u64) -> Result<Server, String> {
    let bin = match &a.nginx_bin {
        Some(b) if b.is_file() => b.clone(),
        Some(b) => return Err(format!("no nginx binary at {}", b.display())),
        None => find_binary("nginx").ok_or(
            "nginx is not installed (Debian: apt-get install -y nginx libnginx-mod-nchan)",
        )?,
    };
    let module = match &a.nchan_module {
        Some(m) if m.is_file() => m.clone(),
        Some(m) => return Err(format!("no nchan module at {}", m.display())),
        None => find_nchan_module().ok_or(
            "the nchan module is not installed (Debian: apt-get install -y libnginx-mod-nchan)",
        )?,
    };
    let dir = std::env::temp_dir().join(format!("switchboard-bench-nchan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // The workers may run as another user (nobody) when started by root.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
    }
    let ws_addr: SocketAddr = ([127, 0, 0, 1], util::free_port()?).into();
    let pub_addr: SocketAddr = ([127, 0, 0, 1], util::free_port()?).into();
    // Each worker may hold every subscriber; never above this process's hard limit.
    let nofile = util::nofile_hard_limit()
        .unwrap_or(20_000)
        .min(subscribers + 1_000);
    let config = nginx_config(&dir, &module, workers, nofile, ws_addr, pub_addr);
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, &config)
        .map_err(|e| format!("cannot write {}: {e}", conf_path.display()))?;
    let args: Vec<String> = vec![
        "-p".into(),
        dir.display().to_string(),
        "-c".into(),
        conf_path.display().to_string(),
        "-e".into(),
        dir.join("error.log").display().to_string(),
    ];
    let service = Service::spawn("nginx", &bin, &args)?;
    let mut nchan = Nchan {
        service,
        dir,
        config: config.clone(),
    };
    for addr in [ws_addr, pub_addr] {
        util::wait_listening(addr, &mut nchan.service.child, Duration::from_secs(15)).map_err(
            |e| {
                let log = std::fs::read_to_string(nchan.dir.join("error.log")).unwrap_or_default();
                format!("nginx: {e}; error log: {}", log.trim())
            },
        )?;
    }
    // The workers are forked after the listeners exist; wait until all are there.
    let pid = nchan.service.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while util::child_pids(pid).len() < workers && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let nchan_version = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "libnginx-mod-nchan"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let version = version_of(&bin, "-v").map(|v| match &nchan_version {
        Some(n) => format!("{v}, libnginx-mod-nchan {n}"),
        None => v,
    });
    let mut command = vec![bin.display().to_string()];
    command.extend(args);
    Ok(Server {
        kind: ServerKind::Nchan,
        subscribers,
        endpoints: vec![Endpoint {
            node: String::new(),
            ws_addr,
            ws_url: format!("ws://{ws_addr}/sub"),
            control: None,
        }],
        publish_addr: pub_addr,
        publish_path: "/pub".into(),
        worker_args: Vec::new(),
        master_pid: Some(pid),
        version,
        command,
        gateways: Vec::new(),
        nats: None,
        nchan: Some(nchan),
    })
}

// ---------------------------------------------------------------------------
// Measuring.

/// CPU and memory readings at one moment.
#[derive(Debug, Clone)]
struct Snapshot {
    at: Instant,
    server_cpu: Option<f64>,
    nats_cpu: Option<f64>,
    clients_cpu: Option<f64>,
    publisher_cpu: Option<f64>,
    interference: Option<util::Interference>,
}

/// The memory of a group of processes (None if empty or unreadable).
fn mem_of(pids: &[u32]) -> Option<Mem> {
    if pids.is_empty() {
        return None;
    }
    let mut m = Mem {
        pss: Some(0),
        ..Mem::default()
    };
    for &p in pids {
        let pm = util::proc_mem(p).ok()?;
        m.rss += pm.rss;
        m.hwm = m.hwm.max(pm.hwm);
        m.pss = m.pss.zip(util::proc_pss(p)).map(|(a, b)| a + b);
    }
    Some(m)
}

/// Pins every thread of process `pid` to `cpus` (`taskset -a -p -c`).
fn pin(pid: u32, cpus: &str) -> Result<(), String> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .map_err(|e| format!("cannot run taskset: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What the phases of one server share.
struct Run<'a> {
    a: &'a FanoutArgs,
    rt: &'a tokio::runtime::Runtime,
    server: Server,
    fleet: Fleet,
    idxs: Vec<usize>,
    worker_pids: Vec<u32>,
    /// Subscribers connected.
    connected: u64,
    /// Nodes holding subscribers.
    nodes_with_subscribers: usize,
    /// Cluster: background NATS traffic.
    nats_background: Option<NatsBackground>,
    /// Next sequence number to publish.
    seq: Arc<AtomicU64>,
    problems: &'a mut Vec<String>,
    warnings: &'a mut Vec<String>,
}

impl Run<'_> {
    fn label(&self) -> &'static str {
        self.server.kind.name()
    }

    fn mem(&self) -> Option<Mem> {
        mem_of(&self.server.pids())
    }

    fn all_pids(&self) -> Vec<u32> {
        let mut p = self.server.pids();
        p.extend(self.server.nats_pid());
        p.extend(&self.worker_pids);
        p.push(std::process::id());
        p
    }

    fn snapshot(&self) -> Snapshot {
        let server_pids = self.server.pids();
        Snapshot {
            at: Instant::now(),
            server_cpu: (!server_pids.is_empty())
                .then(|| util::cpu_of_all(&server_pids))
                .flatten(),
            nats_cpu: self.server.nats_pid().and_then(util::proc_cpu_s),
            clients_cpu: util::cpu_of_all(&self.worker_pids),
            publisher_cpu: util::proc_cpu_s(std::process::id()),
            interference: util::Interference::start(util::cpu_of_all(&self.all_pids())),
        }
    }

    /// CPU and memory between two snapshots; warns about interference.
    fn usage(&mut self, s0: &Snapshot, s1: &Snapshot, phase: &str) -> Usage {
        let seconds = s1.at.duration_since(s0.at).as_secs_f64().max(1e-9);
        let cpu = |a: Option<f64>, b: Option<f64>| {
            a.zip(b).map(|(a, b)| Cpu {
                seconds: b - a,
                cores: (b - a) / seconds,
            })
        };
        let other_cpu_share = s0
            .interference
            .and_then(|i| i.finish(util::cpu_of_all(&self.all_pids())));
        util::warn_interference(
            other_cpu_share,
            &format!("{} {phase}", self.label()),
            self.warnings,
        );
        Usage {
            seconds,
            server_cpu: cpu(s0.server_cpu, s1.server_cpu),
            nats_cpu: cpu(s0.nats_cpu, s1.nats_cpu),
            clients_cpu: cpu(s0.clients_cpu, s1.clients_cpu),
            publisher_cpu: cpu(s0.publisher_cpu, s1.publisher_cpu),
            server_mem: self.mem(),
            nats_mem: self.server.nats_pid().and_then(|p| mem_of(&[p])),
            other_cpu_share,
        }
    }

    /// Publishes one stamped message over `conn`; returns the time to the
    /// answer, or why it failed.
    fn publish_one(&self, conn: &mut HttpConn, phase: u8, seq: u64) -> Result<Duration, String> {
        let a = self.a;
        let server = &self.server;
        let path = server.publish_path.clone();
        let call_timeout = a.call_timeout;
        let text = proto::fanout_text(phase, seq, util::unix_nanos(), a.size as usize);
        let body = server.body(&text);
        self.rt.block_on(async {
            let t0 = Instant::now();
            match tokio::time::timeout(call_timeout, conn.post(&path, &body)).await {
                Err(_) => {
                    conn.reset();
                    Err(format!("no answer within {call_timeout:?}"))
                }
                Ok(Err(e)) => Err(e),
                Ok(Ok((status, _))) if (200..300).contains(&status) => Ok(t0.elapsed()),
                Ok(Ok((status, body))) => Err(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                )),
            }
        })
    }

    /// Asks every worker for what it received since the last report.
    fn collect_received(&mut self) -> Result<Received, String> {
        self.fleet.send_each(&self.idxs, proto::REPORT)?;
        let mut r = Received::new();
        self.fleet.collect(
            &self.idxs,
            Instant::now() + Duration::from_secs(60),
            "received",
            |_, report| match report {
                Report::FanoutReceived {
                    messages,
                    single_latency_us,
                    sustained_latency_us,
                    ticks,
                    unparsed,
                    live,
                    rss_bytes,
                    ..
                } => {
                    for (seq, n, us) in messages {
                        let e = r.messages.entry(seq).or_insert((0, 0));
                        e.0 += n;
                        e.1 = e.1.max(us);
                    }
                    util::add_buckets(&mut r.single_us, &single_latency_us);
                    util::add_buckets(&mut r.sustained_us, &sustained_latency_us);
                    for (t, n) in ticks {
                        *r.ticks.entry(t).or_insert(0) += n;
                    }
                    r.unparsed += unparsed;
                    r.live += live;
                    r.clients_rss += rss_bytes;
                    Ok(true)
                }
                // A late "complete" of a single-phase message.
                Report::FanoutComplete { .. } => Ok(false),
                other => Err(format!("unexpected report {other:?}")),
            },
        )?;
        if r.unparsed > 0 {
            self.problems.push(format!(
                "{}: {} data frames without a stamp",
                self.label(),
                r.unparsed
            ));
        }
        Ok(r)
    }
}

/// What all workers received since their last report.
#[derive(Debug)]
struct Received {
    /// Per message: receipts and the latest receipt's latency (µs).
    messages: HashMap<u64, (u64, u64)>,
    single_us: Histogram<u64>,
    sustained_us: Histogram<u64>,
    ticks: BTreeMap<u64, u64>,
    unparsed: u64,
    /// Subscribers still connected.
    live: u64,
    /// Client workers' resident memory, bytes.
    clients_rss: u64,
}

impl Received {
    fn new() -> Self {
        Self {
            messages: HashMap::new(),
            single_us: util::new_histogram(),
            sustained_us: util::new_histogram(),
            ticks: BTreeMap::new(),
            unparsed: 0,
            live: 0,
            clients_rss: 0,
        }
    }

    /// Receipts of `seqs`, and the receipts missing from / beyond one per
    /// live subscriber.
    fn tally(&self, seqs: &[u64], live: u64) -> (u64, u64, u64) {
        let (mut received, mut missing, mut extra) = (0, 0, 0);
        for s in seqs {
            let n = self.messages.get(s).map(|e| e.0).unwrap_or(0);
            received += n;
            missing += live.saturating_sub(n);
            extra += n.saturating_sub(live);
        }
        (received, missing, extra)
    }
}

/// Runs the scenario.
pub(crate) fn run(a: FanoutArgs) -> Result<ExitCode, String> {
    if a.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    if a.servers.is_empty() {
        return Err("--servers lists no server".into());
    }
    a.gateway.validate()?;
    let machine = util::machine();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut skipped = Vec::new();
    let background_cpu_busy = util::background_busy(&mut warnings);
    let nginx_workers = if a.nginx_workers == 0 {
        machine.cpus
    } else {
        a.nginx_workers
    };
    let nchan_subscribers = a.nchan_subscribers.unwrap_or(if a.nodes > 1 {
        a.subscribers.min(NCHAN_CLUSTER_DEFAULT)
    } else {
        a.subscribers
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;

    let mut runs = Vec::new();
    let mut seen = HashSet::new();
    for &kind in &a.servers {
        if !seen.insert(kind) {
            continue;
        }
        let server = match kind {
            ServerKind::Switchboard => start_switchboard(&a)?,
            ServerKind::Nchan => match start_nchan(&a, nginx_workers, nchan_subscribers) {
                Ok(s) => s,
                Err(e) => {
                    let msg = format!("nchan skipped: {e}");
                    eprintln!("switchboard-bench: {msg}");
                    skipped.push(msg);
                    continue;
                }
            },
        };
        let targets: Vec<&str> = server.endpoints.iter().map(|e| e.ws_url.as_str()).collect();
        eprintln!(
            "switchboard-bench: {} up ({}); connecting {} subscribers to {}",
            kind.name(),
            server.version.as_deref().unwrap_or("version unknown"),
            server.subscribers,
            targets.join(", ")
        );
        runs.push(run_server(&a, &rt, server, &mut problems, &mut warnings)?);
    }
    let result = FanoutResult {
        scenario: "fanout",
        unix_time: util::unix_now(),
        machine,
        background_cpu_busy,
        subscribers: a.subscribers,
        nodes: a.nodes,
        nchan_subscribers,
        size: a.size,
        messages: a.messages,
        warmup_s: a.warmup.as_secs_f64(),
        duration_s: a.duration.as_secs_f64(),
        nginx_workers,
        server_cpus: a.server_cpus.clone(),
        client_cpus: a.client_cpus.clone(),
        runs,
        skipped,
        problems,
        warnings,
    };
    print_table(&result);
    util::finish(&a.out, &result, result.problems.is_empty())
}

/// Background NATS traffic between two samples `seconds` apart.
fn nats_background(v0: &NatsSample, v1: &NatsSample, seconds: f64) -> NatsBackground {
    let s = seconds.max(1e-9);
    NatsBackground {
        window_s: seconds,
        in_msgs_per_s: v1.in_msgs.saturating_sub(v0.in_msgs) as f64 / s,
        out_msgs_per_s: v1.out_msgs.saturating_sub(v0.out_msgs) as f64 / s,
        published_per_s: nats::published_delta(v0, v1)
            .into_iter()
            .map(|(k, d)| (k, d / s))
            .collect(),
    }
}

/// NATS messages per publish between two samples `window` seconds apart,
/// the background subtracted.
fn nats_per_publish(
    bg: &NatsBackground,
    (v0, v1): (&NatsSample, &NatsSample),
    window: f64,
    publishes: u64,
    nodes_with_subscribers: usize,
) -> NatsPerPublish {
    let in_raw = v1.in_msgs.saturating_sub(v0.in_msgs);
    let out_raw = v1.out_msgs.saturating_sub(v0.out_msgs);
    let (in_bg, out_bg) = (bg.in_msgs_per_s * window, bg.out_msgs_per_s * window);
    let n = publishes.max(1) as f64;
    let in_per = (in_raw as f64 - in_bg).max(0.0) / n;
    let out_per = (out_raw as f64 - out_bg).max(0.0) / n;
    NatsPerPublish {
        window_s: window,
        publishes,
        in_msgs_raw: in_raw,
        out_msgs_raw: out_raw,
        in_msgs_background: in_bg,
        out_msgs_background: out_bg,
        in_msgs_per_publish: in_per,
        out_msgs_per_publish: out_per,
        msgs_per_publish: in_per + out_per,
        published_per_publish: nats::published_delta(v0, v1)
            .into_iter()
            .map(|(k, d)| {
                let b = bg.published_per_s.get(&k).copied().unwrap_or(0.0) * window;
                (k, (d - b).max(0.0) / n)
            })
            .collect(),
        nodes_with_subscribers,
    }
}

/// `(subscribed − empty) / subscribers` of PSS (RSS if PSS is unreadable).
fn per_subscriber(empty: Option<Mem>, subscribed: Option<Mem>, subscribers: u64) -> Option<f64> {
    let (e, s) = empty.zip(subscribed)?;
    let (e, s) = match (e.pss, s.pss) {
        (Some(e), Some(s)) => (e, s),
        _ => (e.rss, s.rss),
    };
    (subscribers > 0).then(|| (s as f64 - e as f64) / subscribers as f64)
}

/// Connect, single phase, sustained phase, close, for one server.
fn run_server(
    a: &FanoutArgs,
    rt: &tokio::runtime::Runtime,
    mut server: Server,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<ServerRun, String> {
    let name = server.kind.name();
    if let Some(cpus) = &a.server_cpus {
        for p in server.pids().into_iter().chain(server.nats_pid()) {
            pin(p, cpus)?;
        }
    }
    let mem_empty = mem_of(&server.pids());

    // Subscribers: spread evenly over the nodes; on each, as few processes
    // as the file limit allows. One process holding all 19,000 costs less
    // per delivery than two (it finds many sockets ready per wake-up, and
    // the server wakes a sleeping reader less often), which leaves more CPU
    // to the server.
    let n_nodes = server.endpoints.len();
    let per_node = split_even(server.subscribers, n_nodes);
    let node_workers = split_even(a.clients.workers as u64, n_nodes);
    let mut extra = server.worker_args.clone();
    extra.extend([
        "--command-timeout".to_owned(),
        // Silence from the coordinator for longer than a whole run ends a worker.
        util::gateway_duration(
            a.clients.connect_timeout
                + a.single_timeout * a.messages
                + (a.warmup + a.duration + a.grace) * 2
                + Duration::from_secs(600),
        ),
    ]);
    // The handshakes in flight are shared by all nodes' workers.
    let copts = ClientOpts {
        concurrency: a.clients.concurrency.div_ceil(n_nodes).max(1),
        ..a.clients.clone()
    };
    let mut fleet = Fleet::new();
    let mut idxs = Vec::new();
    // The node of each worker (by fleet index).
    let mut node_of: HashMap<usize, usize> = HashMap::new();
    let mut offset = 0;
    for (i, e) in server.endpoints.iter().enumerate() {
        let count = per_node[i] as usize;
        if count == 0 {
            continue;
        }
        let shards: Vec<(usize, usize)> =
            fleet::shards(count, a.clients.per_process, node_workers[i] as usize, 1)
                .into_iter()
                .map(|(o, c)| (o + offset, c))
                .collect();
        offset += count;
        let got = fleet::spawn_workers(
            &mut fleet, "fanout", e.ws_addr, &e.ws_url, &shards, &copts, &extra,
        )?;
        node_of.extend(got.iter().map(|&w| (w, i)));
        idxs.extend(got);
    }
    let worker_pids: Vec<u32> = idxs.iter().map(|&i| fleet.pid(i)).collect();
    if let Some(cpus) = &a.client_cpus {
        for &p in &worker_pids {
            pin(p, cpus)?;
        }
    }
    let go = Instant::now();
    fleet.send_each(&idxs, proto::GO)?;
    let (mut connected, mut failed, mut first_error, mut connect_s) = (0, 0, None, 0.0f64);
    let mut node_connected = vec![0u64; n_nodes];
    fleet.collect(
        &idxs,
        go + a.clients.connect_timeout + Duration::from_secs(15),
        "connected",
        |w, r| {
            let Report::Connected {
                ok,
                failed: f,
                first_error: fe,
                elapsed_s,
                ..
            } = r
            else {
                return Err(format!("unexpected report {r:?}"));
            };
            connected += ok;
            node_connected[node_of[&w]] += ok;
            failed += f;
            connect_s = connect_s.max(elapsed_s);
            if first_error.is_none() {
                first_error = fe;
            }
            Ok(true)
        },
    )?;
    if failed > 0 {
        problems.push(format!(
            "{name}: {failed} of {} subscribers could not connect and subscribe; first error: {}",
            server.subscribers,
            first_error.as_deref().unwrap_or("?")
        ));
    }
    if connected == 0 {
        return Err(format!(
            "{name}: no subscriber connected; first error: {}",
            first_error.as_deref().unwrap_or("?")
        ));
    }
    eprintln!(
        "switchboard-bench: {name}: {connected} subscribers subscribed in {connect_s:.1} s ({} client processes)",
        idxs.len()
    );
    // The server's own count (summed over the nodes), once it agrees (or
    // after 15 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let node_counts: Option<Vec<u64>> = loop {
        match server.subscriber_counts() {
            Ok(c) if c.iter().sum::<u64>() == connected || Instant::now() >= deadline => {
                break Some(c)
            }
            Err(e) if Instant::now() >= deadline => {
                warnings.push(format!("{name}: cannot read the subscriber count: {e}"));
                break None;
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let server_subscribers = node_counts.as_ref().map(|c| c.iter().sum::<u64>());
    if let Some(n) = server_subscribers.filter(|n| *n != connected) {
        problems.push(format!(
            "{name}: the server counts {n} subscribers, the clients {connected}"
        ));
    }
    if let Some(c) = node_counts.as_ref().filter(|_| n_nodes > 1) {
        for (i, (&theirs, &ours)) in c.iter().zip(&node_connected).enumerate() {
            if theirs != ours {
                problems.push(format!(
                    "{name}: node {} counts {theirs} subscribers, its clients {ours}",
                    server.endpoints[i].node
                ));
            }
        }
    }
    // Settle; a cluster's background NATS traffic meanwhile.
    let nats_bg = match server.nats.as_ref().map(|n| n.mon) {
        Some(mon) => {
            let v0 = nats::nats_sample(mon);
            let t0 = Instant::now();
            std::thread::sleep(a.settle.max(a.quiet));
            let v1 = nats::nats_sample(mon);
            match (v0, v1) {
                (Ok(v0), Ok(v1)) => Some(nats_background(&v0, &v1, t0.elapsed().as_secs_f64())),
                (Err(e), _) | (_, Err(e)) => {
                    warnings.push(format!("{name}: cannot read nats-server's counters: {e}"));
                    None
                }
            }
        }
        None => {
            std::thread::sleep(a.settle);
            None
        }
    };
    if let Some(bg) = &nats_bg {
        eprintln!(
            "switchboard-bench: quiet NATS traffic: {:.1} in_msgs/s, {:.1} out_msgs/s",
            bg.in_msgs_per_s, bg.out_msgs_per_s
        );
    }
    server.check_alive()?;

    let nodes_with_subscribers = node_connected.iter().filter(|n| **n > 0).count();
    let mut run = Run {
        a,
        rt,
        server,
        fleet,
        idxs,
        worker_pids,
        connected,
        nodes_with_subscribers,
        nats_background: nats_bg.clone(),
        seq: Arc::new(AtomicU64::new(1)),
        problems,
        warnings,
    };
    let mem_subscribed = run.mem();
    let node_mem: Vec<Option<Mem>> = run
        .server
        .gateways
        .iter()
        .map(|g| g.pid.and_then(|p| mem_of(&[p])))
        .collect();
    let nats_mem_subscribed = run.server.nats_pid().and_then(|p| mem_of(&[p]));
    let server_pids = run.server.pids();
    let processes = server_pids.len();
    let threads = server_pids
        .iter()
        .filter_map(|&p| util::proc_mem(p).ok())
        .map(|m| m.threads)
        .sum();
    let single = single_phase(&mut run)?;
    run.server.check_alive()?;
    let sustained = sustained_phase(&mut run)?;
    run.server.check_alive()?;
    // Final state of the subscribers, then close.
    let last = run.collect_received()?;
    run.fleet.send_each(&run.idxs, proto::CLOSE)?;
    let (mut dropped, mut first_drop) = (0, None);
    run.fleet.collect(
        &run.idxs,
        Instant::now() + Duration::from_secs(60),
        "closed",
        |_, r| match r {
            Report::Closed {
                dropped: d,
                first_drop: fd,
                ..
            } => {
                dropped += d;
                if first_drop.is_none() {
                    first_drop = fd;
                }
                Ok(true)
            }
            Report::FanoutComplete { .. } => Ok(false),
            other => Err(format!("unexpected report {other:?}")),
        },
    )?;
    if dropped > 0 {
        run.problems.push(format!(
            "{name}: {dropped} subscriber connections ended unexpectedly; first: {}",
            first_drop.as_deref().unwrap_or("?")
        ));
    }
    let Run {
        server,
        fleet,
        idxs,
        ..
    } = run;
    let workers_per_node = {
        let mut v = vec![0usize; n_nodes];
        for w in &idxs {
            v[node_of[w]] += 1;
        }
        v
    };
    drop(fleet);
    let mut server = server;
    let config = server.nchan.as_ref().map(|n| n.config.clone());
    let nats_run = server.nats.as_ref().map(|n| NatsRun {
        version: n.version.clone(),
        command: n.command.clone(),
        background: nats_bg,
        mem_subscribed: nats_mem_subscribed,
    });
    let nodes: Vec<NodeRun> = server
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| NodeRun {
            node: e.node.clone(),
            url: e.ws_url.clone(),
            command: server.gateways.get(i).and_then(|g| g.command.clone()),
            subscribers: per_node[i],
            connected: node_connected[i],
            server_subscribers: node_counts.as_ref().and_then(|c| c.get(i).copied()),
            client_workers: workers_per_node[i],
            mem_subscribed: node_mem.get(i).copied().flatten(),
        })
        .collect();
    server.stop();
    Ok(ServerRun {
        server: server.kind,
        version: server.version.clone(),
        command: server.command.clone(),
        config,
        processes,
        threads,
        url: server.endpoints[0].ws_url.clone(),
        subscribers: server.subscribers,
        connected,
        server_subscribers,
        connect_s,
        client_workers: idxs.len(),
        clients_rss: last.clients_rss,
        mem_empty,
        mem_subscribed,
        mem_per_subscriber: per_subscriber(mem_empty, mem_subscribed, connected),
        nodes,
        nats: nats_run,
        single,
        sustained,
        dropped,
        first_drop,
    })
}

/// The single phase: one message at a time, each until every subscriber has it.
fn single_phase(run: &mut Run) -> Result<Single, String> {
    let a = run.a;
    let name = run.label();
    eprintln!(
        "switchboard-bench: {name}: single phase, {} messages one at a time",
        a.messages
    );
    let mut conn =
        HttpConn::new(run.server.publish_addr).with_content_type(run.server.content_type());
    let mut out = Single {
        target_p99_ms: a.target_p99_ms,
        ..Single::default()
    };
    let mut call_us = util::new_histogram();
    let mut reached_us = util::new_histogram();
    let mut seqs = Vec::new();
    let s0 = run.snapshot();
    let mut last_publish: Option<Instant> = None;
    for _ in 0..a.messages {
        if let Some(t) = last_publish {
            std::thread::sleep((t + a.single_interval).saturating_duration_since(Instant::now()));
        }
        last_publish = Some(Instant::now());
        let seq = run.seq.fetch_add(1, Relaxed);
        match run.publish_one(&mut conn, proto::FANOUT_SINGLE, seq) {
            Ok(took) => {
                out.published += 1;
                call_us.saturating_record(took.as_micros().max(1) as u64);
            }
            Err(e) => {
                out.failed += 1;
                out.first_failure.get_or_insert(e);
                continue;
            }
        }
        seqs.push(seq);
        let mut last_us = 0;
        let waiting = run.fleet.collect_until(
            &run.idxs,
            Instant::now() + a.single_timeout,
            "a single-phase message",
            |_, r| match r {
                Report::FanoutComplete {
                    seq: s, last_us: l, ..
                } if s == seq => {
                    last_us = last_us.max(l);
                    Ok(true)
                }
                Report::FanoutComplete { .. } => Ok(false),
                other => Err(format!("unexpected report {other:?}")),
            },
        )?;
        if waiting.is_empty() {
            out.complete += 1;
            reached_us.saturating_record(last_us);
            out.all_reached_ms.push(Some(last_us as f64 / 1000.0));
        } else {
            out.all_reached_ms.push(None);
        }
    }
    let s1 = run.snapshot();
    // Stragglers of incomplete messages.
    if out.complete < out.published {
        std::thread::sleep(Duration::from_secs(1));
    }
    let r = run.collect_received()?;
    out.usage = run.usage(&s0, &s1, "single phase");
    let (received, missing, _) = r.tally(&seqs, r.live);
    out.expected = u64::from(out.published) * run.connected;
    out.received = received;
    out.missing = out.expected.saturating_sub(received).max(missing);
    out.latency = util::percentiles(&r.single_us);
    out.all_reached = util::percentiles(&reached_us);
    out.publish_call = util::percentiles(&call_us);
    out.server_cpu_us_per_delivery = out
        .usage
        .server_cpu
        .filter(|_| received > 0)
        .map(|c| c.seconds * 1e6 / received as f64);
    out.cluster_cpu_us_per_delivery = out
        .usage
        .server_cpu
        .zip(out.usage.nats_cpu)
        .filter(|_| received > 0)
        .map(|(c, n)| (c.seconds + n.seconds) * 1e6 / received as f64);
    out.target_met = out.published == a.messages
        && out.missing == 0
        && out.latency.count > 0
        && out.latency.p99_ms < a.target_p99_ms;
    if out.failed > 0 {
        run.problems.push(format!(
            "{name}: {} single-phase publishes failed; first: {}",
            out.failed,
            out.first_failure.as_deref().unwrap_or("?")
        ));
    }
    if out.missing > 0 {
        run.problems.push(format!(
            "{name}: single phase: {} of {} deliveries missing ({} of {} messages reached everyone within {:?})",
            out.missing, out.expected, out.complete, out.published, a.single_timeout
        ));
    }
    Ok(out)
}

/// The publishers' tally.
#[derive(Debug)]
struct Published {
    /// Sequence numbers published (2xx) in the window.
    seqs: Vec<u64>,
    failed: u64,
    warmup_failed: u64,
    /// Failures that were timeouts (warmup included).
    timeouts: u64,
    first_failure: Option<String>,
    skipped_slots: u64,
    call_us: Histogram<u64>,
}

impl Published {
    fn new() -> Self {
        Self {
            seqs: Vec::new(),
            failed: 0,
            warmup_failed: 0,
            timeouts: 0,
            first_failure: None,
            skipped_slots: 0,
            call_us: util::new_histogram(),
        }
    }

    fn merge(&mut self, o: Self) {
        self.seqs.extend(o.seqs);
        self.failed += o.failed;
        self.warmup_failed += o.warmup_failed;
        self.timeouts += o.timeouts;
        if self.first_failure.is_none() {
            self.first_failure = o.first_failure;
        }
        self.skipped_slots += o.skipped_slots;
        let _ = self.call_us.add(&o.call_us);
    }
}

/// What a publisher of the sustained phase does.
#[derive(Debug, Clone)]
struct Plan {
    addr: SocketAddr,
    path: String,
    content_type: &'static str,
    /// `{"text":"` and `"}` around the data, or nothing (nchan).
    wrap: (&'static str, &'static str),
    size: usize,
    /// Pacing: one message per interval per publisher.
    interval: Option<Duration>,
    /// Start of the warmup.
    start: tokio::time::Instant,
    warm_end: tokio::time::Instant,
    end: tokio::time::Instant,
    call_timeout: Duration,
}

/// One publisher: paced (or back to back) until the end of the window.
async fn publisher(plan: Plan, seq: Arc<AtomicU64>, first_slot: tokio::time::Instant) -> Published {
    let mut conn = HttpConn::new(plan.addr).with_content_type(plan.content_type);
    let mut p = Published::new();
    let mut next = first_slot;
    // Bounded: each iteration waits at most the call timeout, sleeps end at
    // `end`, and nothing starts after `end`.
    while tokio::time::Instant::now() < plan.end {
        if let Some(interval) = plan.interval {
            tokio::time::sleep_until(next.min(plan.end)).await;
            let now = tokio::time::Instant::now();
            if now >= plan.end {
                break;
            }
            next += interval;
            // Skip the slots missed while waiting for an answer rather than bursting.
            while next <= now {
                next += interval;
                p.skipped_slots += 1;
            }
        }
        let measured = tokio::time::Instant::now() >= plan.warm_end;
        let phase = if measured {
            proto::FANOUT_SUSTAINED
        } else {
            proto::PHASE_WARMUP
        };
        let n = seq.fetch_add(1, Relaxed);
        let text = proto::fanout_text(phase, n, util::unix_nanos(), plan.size);
        let body = format!("{}{text}{}", plan.wrap.0, plan.wrap.1);
        let t0 = Instant::now();
        let answer =
            tokio::time::timeout(plan.call_timeout, conn.post(&plan.path, body.as_bytes())).await;
        let outcome = match answer {
            Err(_) => {
                conn.reset();
                p.timeouts += 1;
                Err(format!("no answer within {:?}", plan.call_timeout))
            }
            Ok(Err(e)) => Err(e),
            Ok(Ok((status, _))) if (200..300).contains(&status) => Ok(()),
            Ok(Ok((status, body))) => Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )),
        };
        match outcome {
            Ok(()) if measured => {
                p.seqs.push(n);
                p.call_us
                    .saturating_record(t0.elapsed().as_micros().max(1) as u64);
            }
            Ok(()) => {}
            Err(e) => {
                if measured {
                    p.failed += 1;
                } else {
                    p.warmup_failed += 1;
                }
                p.first_failure.get_or_insert(e);
                // No hot loop against a failing server.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    p
}

/// The sustained phase: paced publishers, then what the clients received.
fn sustained_phase(run: &mut Run) -> Result<Sustained, String> {
    let a = run.a;
    let name = run.label();
    let rate = match a.rate {
        Rate::Max => None,
        Rate::PerSecond(r) => Some(r),
        Rate::Auto => Some(
            (a.target_deliveries as f64 * AUTO_RATE_HEADROOM / run.connected.max(1) as f64).ceil(),
        ),
    };
    let publishers = a.publishers;
    eprintln!(
        "switchboard-bench: {name}: sustained phase, {} with {publishers} publishers; warmup {:?}, measuring {:?}",
        rate.map(|r| format!("{r} messages/s ({:.0} deliveries/s asked)", r * run.connected as f64))
            .unwrap_or_else(|| "back to back".into()),
        a.warmup,
        a.duration
    );
    let interval = rate.map(|r| Duration::from_secs_f64(f64::from(publishers) / r));
    let now = tokio::time::Instant::now();
    let warm_end = now + a.warmup;
    let end = warm_end + a.duration;
    let wrap = match run.server.kind {
        ServerKind::Switchboard => ("{\"text\":\"", "\"}"),
        ServerKind::Nchan => ("", ""),
    };
    let plan = Plan {
        addr: run.server.publish_addr,
        path: run.server.publish_path.clone(),
        content_type: run.server.content_type(),
        wrap,
        size: a.size as usize,
        interval,
        start: now,
        warm_end,
        end,
        call_timeout: a.call_timeout,
    };
    let seq = run.seq.clone();
    let handle = run.rt.spawn(async move {
        let tasks: Vec<_> = (0..publishers)
            .map(|i| {
                // Paced publishers start spread evenly over one interval.
                let first = plan.start
                    + plan
                        .interval
                        .map(|iv| iv.mul_f64(f64::from(i) / f64::from(publishers)))
                        .unwrap_or_default();
                tokio::spawn(publisher(plan.clone(), seq.clone(), first))
            })
            .collect();
        let mut all = Published::new();
        for t in tasks {
            match t.await {
                Ok(p) => all.merge(p),
                Err(e) => {
                    all.failed += 1;
                    all.first_failure
                        .get_or_insert(format!("publisher task: {e}"));
                }
            }
        }
        all
    });
    std::thread::sleep(
        warm_end
            .into_std()
            .saturating_duration_since(Instant::now()),
    );
    let mon = run.server.nats.as_ref().map(|n| n.mon);
    let w0_ns = util::unix_nanos();
    let s0 = run.snapshot();
    let n0 = mon.map(|m| (Instant::now(), nats::nats_sample(m)));
    std::thread::sleep(end.into_std().saturating_duration_since(Instant::now()));
    let w1_ns = util::unix_nanos();
    let s1 = run.snapshot();
    let n1 = mon.map(|m| (Instant::now(), nats::nats_sample(m)));
    let published = run
        .rt
        .block_on(async {
            tokio::time::timeout(a.call_timeout + Duration::from_secs(5), handle).await
        })
        .map_err(|_| "the publishers did not stop".to_owned())?
        .map_err(|e| format!("a publisher failed: {e}"))?;
    std::thread::sleep(a.grace);
    let mut r = run.collect_received()?;
    let usage = run.usage(&s0, &s1, "sustained phase");
    let window_s = usage.seconds;

    // Deliveries by receipt time: whole ticks inside the window.
    let (t_first, t_end) = (w0_ns.div_ceil(TICK_NS), w1_ns / TICK_NS);
    let in_window: u64 = r.ticks.range(t_first..t_end).map(|(_, n)| n).sum();
    let ticks_s = (t_end.saturating_sub(t_first)) as f64 * TICK_NS as f64 / 1e9;
    let per_s = 1_000_000_000 / TICK_NS;
    let deliveries_per_second: Vec<u64> = (t_first..t_end)
        .step_by(per_s as usize)
        .filter(|t| t + per_s <= t_end)
        .map(|t| r.ticks.range(t..t + per_s).map(|(_, n)| n).sum())
        .collect();
    let deliveries_per_s = if ticks_s > 0.0 {
        in_window as f64 / ticks_s
    } else {
        0.0
    };
    let (received, lost, duplicates) = r.tally(&published.seqs, r.live);
    let expected = published.seqs.len() as u64 * run.connected;
    let late_us = a.late_after.as_micros() as u64;
    let lost = lost.max(expected.saturating_sub(received));
    // Lost, or only late? A second look, bounded.
    let (arrived_after_grace, never_arrived) = if lost > 0 {
        let wait = (a.grace * 3).min(Duration::from_secs(30));
        eprintln!(
            "switchboard-bench: {name}: {lost} deliveries missing after the grace; looking again in {wait:?}"
        );
        std::thread::sleep(wait);
        let more = run.collect_received()?;
        let (got, _, _) = more.tally(&published.seqs, more.live);
        let _ = r.sustained_us.add(&more.sustained_us);
        (Some(got), Some(lost.saturating_sub(got)))
    } else {
        (None, None)
    };
    let late = if r.sustained_us.is_empty() || r.sustained_us.max() <= late_us {
        0
    } else {
        r.sustained_us
            .count_between(late_us + 1, r.sustained_us.max())
    };
    let per_delivery = |c: Option<Cpu>| {
        c.filter(|_| in_window > 0)
            .map(|c| c.seconds * 1e6 / (deliveries_per_s * window_s))
    };
    let cluster_cpu = usage.server_cpu.zip(usage.nats_cpu).map(|(c, n)| Cpu {
        seconds: c.seconds + n.seconds,
        cores: c.cores + n.cores,
    });
    let nats = match (n0, n1, &run.nats_background) {
        (Some((t0, Ok(v0))), Some((t1, Ok(v1))), Some(bg)) => Some(nats_per_publish(
            bg,
            (&v0, &v1),
            t1.duration_since(t0).as_secs_f64(),
            published.seqs.len() as u64 + published.failed,
            run.nodes_with_subscribers,
        )),
        (Some((_, Err(e))), _, _) | (_, Some((_, Err(e))), _) => {
            run.warnings
                .push(format!("{name}: cannot read nats-server's counters: {e}"));
            None
        }
        _ => None,
    };
    let out = Sustained {
        rate,
        publishers,
        window_s,
        published: published.seqs.len() as u64,
        failed: published.failed,
        first_failure: published.first_failure.clone(),
        skipped_slots: published.skipped_slots,
        published_per_s: published.seqs.len() as f64 / window_s,
        expected,
        received,
        lost,
        arrived_after_grace,
        never_arrived,
        duplicates,
        late,
        late_after_ms: a.late_after.as_secs_f64() * 1000.0,
        deliveries_per_s,
        deliveries_per_second,
        latency: util::percentiles(&r.sustained_us),
        publish_call: util::percentiles(&published.call_us),
        server_cpu_us_per_delivery: per_delivery(usage.server_cpu),
        cluster_cpu_us_per_delivery: per_delivery(cluster_cpu),
        clients_cpu_us_per_delivery: per_delivery(usage.clients_cpu),
        nats,
        usage,
        target_deliveries_per_s: a.target_deliveries,
        target_met: deliveries_per_s >= a.target_deliveries as f64 && lost == 0,
    };
    let failures = published.failed + published.warmup_failed;
    if failures > published.timeouts {
        run.problems.push(format!(
            "{name}: {failures} sustained-phase publishes failed ({} in the warmup, {} timed out); first: {}",
            published.warmup_failed,
            published.timeouts,
            published.first_failure.as_deref().unwrap_or("?")
        ));
    } else if published.timeouts > 0 {
        // Overload, not an error: the figures show it.
        run.warnings.push(format!(
            "{name}: {} sustained-phase publishes ({} in the warmup) got no answer within {:?}: the server fell behind the rate",
            published.timeouts, published.warmup_failed, a.call_timeout
        ));
    }
    if out.lost > 0 {
        run.warnings.push(format!(
            "{name}: sustained phase: {} of {} deliveries lost (not received within {:?} after the window); {} arrived later",
            out.lost,
            out.expected,
            a.grace,
            out.arrived_after_grace.unwrap_or(0)
        ));
    }
    if let Some(n) = out.never_arrived.filter(|n| *n > 0) {
        run.problems.push(format!(
            "{name}: sustained phase: {n} deliveries never arrived (still missing {:?} after the grace)",
            (a.grace * 3).min(Duration::from_secs(30))
        ));
    }
    if out.published == 0 {
        run.problems
            .push(format!("{name}: nothing published in the sustained window"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The table.

/// `p50 / p99 / max` of a distribution, in milliseconds.
fn p50_p99_max(p: &Percentiles) -> String {
    format!("{} / {} / {}", ms(p.p50_ms), ms(p.p99_ms), ms(p.max_ms))
}

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

fn cores(c: Option<Cpu>) -> String {
    c.map(|c| format!("{:.2} ({:.1} s)", c.cores, c.seconds))
        .unwrap_or_else(|| "n/a".into())
}

fn mem(m: Option<Mem>) -> String {
    match m {
        Some(m) => match m.pss {
            Some(p) => format!(
                "{} (PSS {})",
                human_bytes(m.rss as f64),
                human_bytes(p as f64)
            ),
            None => human_bytes(m.rss as f64),
        },
        None => "n/a".into(),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "met"
    } else {
        "NOT met"
    }
}

/// `µs` with two decimals, or n/a.
fn us(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2} µs"))
        .unwrap_or_else(|| "n/a".into())
}

fn run_rows(t: &mut Table, r: &ServerRun) {
    let cluster = r.nodes.len() > 1;
    let nodes = if cluster {
        format!(
            ", {} nodes {} over nats-server {}",
            r.nodes.len(),
            r.nodes
                .iter()
                .map(|n| n.node.as_str())
                .collect::<Vec<_>>()
                .join(","),
            r.nats
                .as_ref()
                .and_then(|n| n.version.as_deref())
                .unwrap_or("?")
        )
    } else {
        String::new()
    };
    t.section(&format!(
        "{}: {}{nodes} ({} of {} subscribers, {} client processes)",
        r.server.name(),
        r.version.as_deref().unwrap_or("version unknown"),
        r.connected,
        r.subscribers,
        r.client_workers
    ));
    t.row(
        "subscribed in (server counts)",
        format!(
            "{:.1} s ({})",
            r.connect_s,
            r.server_subscribers
                .map(|n| n.to_string())
                .unwrap_or_else(|| "n/a".into())
        ),
    );
    if cluster {
        t.row(
            "per node: subscribers (node counts)",
            r.nodes
                .iter()
                .map(|n| {
                    let c = n
                        .server_subscribers
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "?".into());
                    format!("{} {} ({c})", n.node, n.connected)
                })
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let what = if cluster { "nodes" } else { "server" };
    t.row(&format!("{what} memory, empty"), mem(r.mem_empty));
    t.row(&format!("{what} memory, subscribed"), mem(r.mem_subscribed));
    t.row(
        &format!("{what} memory per subscriber"),
        r.mem_per_subscriber
            .map(|b| format!("{} (subscribed − empty)", human_bytes(b)))
            .unwrap_or_else(|| "n/a".into()),
    );
    if let Some(n) = &r.nats {
        t.row("nats-server memory, subscribed", mem(n.mem_subscribed));
        if let Some(bg) = &n.background {
            t.row(
                "NATS background (while settling)",
                format!(
                    "{:.1} in_msgs/s, {:.1} out_msgs/s over {:.1} s",
                    bg.in_msgs_per_s, bg.out_msgs_per_s, bg.window_s
                ),
            );
        }
    }
    let s = &r.single;
    t.row(
        "single: published / complete",
        format!("{} / {} (failed {})", s.published, s.complete, s.failed),
    );
    t.row(
        "single: deliveries (missing)",
        format!("{} ({})", s.received, s.missing),
    );
    t.row("single: latency p50/p99/max", p50_p99_max(&s.latency));
    t.row(
        "single: all reached p50/p99/max",
        p50_p99_max(&s.all_reached),
    );
    t.row("single: publish call p50", ms(s.publish_call.p50_ms));
    t.row(
        &format!("single: {what} CPU per delivery"),
        us(s.server_cpu_us_per_delivery),
    );
    if cluster {
        t.row(
            "single: nodes + NATS CPU per delivery",
            us(s.cluster_cpu_us_per_delivery),
        );
    }
    let u = &r.sustained;
    t.row(
        "sustained: messages/s asked / done",
        format!(
            "{} / {:.1} ({} publishers, {} slots skipped, {} failed)",
            u.rate
                .map(|r| format!("{r:.1}"))
                .unwrap_or_else(|| "max".into()),
            u.published_per_s,
            u.publishers,
            u.skipped_slots,
            u.failed
        ),
    );
    t.row(
        "sustained: deliveries/s received",
        format!("{:.0}", u.deliveries_per_s),
    );
    if let (Some(lo), Some(hi)) = (
        u.deliveries_per_second.iter().min(),
        u.deliveries_per_second.iter().max(),
    ) {
        t.row("sustained: per second min / max", format!("{lo} / {hi}"));
    }
    t.row("sustained: latency p50/p99/max", p50_p99_max(&u.latency));
    t.row(
        "sustained: publish call p50/p99/max",
        p50_p99_max(&u.publish_call),
    );
    t.row(
        "sustained: lost / late / duplicates",
        format!(
            "{} / {} (> {:.0} ms) / {} of {} expected",
            u.lost, u.late, u.late_after_ms, u.duplicates, u.expected
        ),
    );
    if let (Some(later), Some(never)) = (u.arrived_after_grace, u.never_arrived) {
        t.row(
            "sustained: lost: arrived later / never",
            format!("{later} / {never}"),
        );
    }
    for (phase, usage) in [("single", &s.usage), ("sustained", &u.usage)] {
        if cluster {
            t.row(
                &format!("{phase}: CPU nodes / NATS / clients / publisher"),
                format!(
                    "{} / {} / {} / {} cores over {:.1} s",
                    cores(usage.server_cpu),
                    cores(usage.nats_cpu),
                    cores(usage.clients_cpu),
                    cores(usage.publisher_cpu),
                    usage.seconds
                ),
            );
        } else {
            t.row(
                &format!("{phase}: CPU server / clients / publisher"),
                format!(
                    "{} / {} / {} cores over {:.1} s",
                    cores(usage.server_cpu),
                    cores(usage.clients_cpu),
                    cores(usage.publisher_cpu),
                    usage.seconds
                ),
            );
        }
        t.row(
            &format!("{phase}: {what} memory after"),
            mem(usage.server_mem),
        );
        if cluster {
            t.row(
                &format!("{phase}: nats-server memory after"),
                mem(usage.nats_mem),
            );
        }
    }
    t.row(
        &format!("sustained: CPU per delivery {what} / clients"),
        format!(
            "{} / {}",
            us(u.server_cpu_us_per_delivery),
            us(u.clients_cpu_us_per_delivery)
        ),
    );
    if cluster {
        t.row(
            "sustained: nodes + NATS CPU per delivery",
            us(u.cluster_cpu_us_per_delivery),
        );
    }
    if let Some(n) = &u.nats {
        t.row(
            "sustained: NATS msgs per publish in / out",
            format!(
                "{:.2} / {:.2} = {:.2} ({} publishes; {} nodes with subscribers)",
                n.in_msgs_per_publish,
                n.out_msgs_per_publish,
                n.msgs_per_publish,
                n.publishes,
                n.nodes_with_subscribers
            ),
        );
        t.row(
            "sustained: NATS msgs published per publish",
            n.published_per_publish
                .iter()
                .filter(|(_, v)| **v >= 0.005)
                .map(|(k, v)| format!("{} {v:.2}", k.strip_prefix("switchboard ").unwrap_or(k)))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    t.row(
        &format!("target: single p99 < {:.0} ms", s.target_p99_ms),
        format!("{} (p99 {})", yes_no(s.target_met), ms(s.latency.p99_ms)),
    );
    t.row(
        &format!("target: >= {} deliveries/s", u.target_deliveries_per_s),
        format!(
            "{} ({:.0}/s, {} lost)",
            yes_no(u.target_met),
            u.deliveries_per_s,
            u.lost
        ),
    );
}

/// `a / b` as `1.23x` (n/a when `b` is 0).
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "n/a".into()
    }
}

fn comparison_rows(t: &mut Table, sb: &ServerRun, nc: &ServerRun) {
    let title = if sb.nodes.len() > 1 {
        format!(
            "switchboard ({} nodes, {} subscribers) vs nchan (1 server, {}) (ratio = switchboard / nchan)",
            sb.nodes.len(),
            sb.connected,
            nc.connected
        )
    } else {
        "switchboard vs nchan (ratio = switchboard / nchan)".to_owned()
    };
    t.section(&title);
    // `(value, decimals, unit)` of each server, then the ratio.
    let mut row = |name: &str, a: f64, b: f64, decimals: usize, unit: &str| {
        let v = |x: f64| {
            if x.is_finite() {
                format!("{x:.decimals$} {unit}")
            } else {
                "n/a".into()
            }
        };
        t.row(
            name,
            format!("{:>16} vs {:>16}   {}", v(a), v(b), ratio(a, b)),
        );
    };
    let (s1, n1) = (&sb.single, &nc.single);
    row(
        "single: latency p50",
        s1.latency.p50_ms,
        n1.latency.p50_ms,
        2,
        "ms",
    );
    row(
        "single: latency p99",
        s1.latency.p99_ms,
        n1.latency.p99_ms,
        2,
        "ms",
    );
    row(
        "single: all reached p50",
        s1.all_reached.p50_ms,
        n1.all_reached.p50_ms,
        2,
        "ms",
    );
    row(
        "single: all reached max",
        s1.all_reached.max_ms,
        n1.all_reached.max_ms,
        2,
        "ms",
    );
    let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
    row(
        "single: server CPU per delivery",
        nan(s1.server_cpu_us_per_delivery),
        nan(n1.server_cpu_us_per_delivery),
        2,
        "µs",
    );
    let (s2, n2) = (&sb.sustained, &nc.sustained);
    row(
        "sustained: deliveries/s",
        s2.deliveries_per_s,
        n2.deliveries_per_s,
        0,
        "/s",
    );
    row(
        "sustained: latency p50",
        s2.latency.p50_ms,
        n2.latency.p50_ms,
        2,
        "ms",
    );
    row(
        "sustained: latency p99",
        s2.latency.p99_ms,
        n2.latency.p99_ms,
        2,
        "ms",
    );
    row("sustained: lost", s2.lost as f64, n2.lost as f64, 0, "");
    row(
        "sustained: server CPU",
        nan(s2.usage.server_cpu.map(|c| c.cores)),
        nan(n2.usage.server_cpu.map(|c| c.cores)),
        2,
        "cores",
    );
    row(
        "sustained: server CPU per delivery",
        nan(s2.server_cpu_us_per_delivery),
        nan(n2.server_cpu_us_per_delivery),
        2,
        "µs",
    );
    if sb.nodes.len() > 1 {
        row(
            "sustained: + NATS CPU per delivery",
            nan(s2.cluster_cpu_us_per_delivery),
            nan(n2.server_cpu_us_per_delivery),
            2,
            "µs",
        );
    }
    let mib = |m: Option<Mem>| nan(m.map(|m| m.pss.unwrap_or(m.rss) as f64 / (1u64 << 20) as f64));
    row(
        "server memory subscribed (PSS)",
        mib(sb.mem_subscribed),
        mib(nc.mem_subscribed),
        1,
        "MiB",
    );
    row(
        "server memory after sustained (PSS)",
        mib(s2.usage.server_mem),
        mib(n2.usage.server_mem),
        1,
        "MiB",
    );
    row(
        "server memory per subscriber",
        nan(sb.mem_per_subscriber),
        nan(nc.mem_per_subscriber),
        0,
        "B",
    );
}

fn print_table(r: &FanoutResult) {
    let mut t = Table::default();
    let cluster = if r.nodes > 1 {
        let nchan = if r.runs.iter().any(|x| x.server == ServerKind::Nchan) {
            format!(" (nchan: {} on one server)", r.nchan_subscribers)
        } else {
            String::new()
        };
        format!(" over {} switchboard nodes{nchan}", r.nodes)
    } else {
        String::new()
    };
    t.section(&format!(
        "fanout: {} subscribers on one channel{cluster}, {}-byte messages, {} single messages, sustained {:.0} s (+{:.0} s warmup); {} CPUs",
        r.subscribers, r.size, r.messages, r.duration_s, r.warmup_s, r.machine.cpus
    ));
    if r.runs.iter().any(|x| x.server == ServerKind::Nchan) {
        t.row(
            "nchan: nginx worker_processes",
            format!(
                "{} (the gateway's runtime: one thread per CPU)",
                r.nginx_workers
            ),
        );
    }
    if r.server_cpus.is_some() || r.client_cpus.is_some() {
        t.row(
            "pinned: servers / clients to CPUs",
            format!(
                "{} / {}",
                r.server_cpus.as_deref().unwrap_or("any"),
                r.client_cpus.as_deref().unwrap_or("any")
            ),
        );
    }
    for run in &r.runs {
        run_rows(&mut t, run);
    }
    let find = |k: ServerKind| r.runs.iter().find(|x| x.server == k);
    if let (Some(sb), Some(nc)) = (find(ServerKind::Switchboard), find(ServerKind::Nchan)) {
        comparison_rows(&mut t, sb, nc);
    }
    if !r.skipped.is_empty() {
        t.section("skipped");
        for s in &r.skipped {
            t.row("-", s.clone());
        }
    }
    t.problems(&r.problems, &r.warnings);
    t.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("auto"), Ok(Rate::Auto));
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("30"), Ok(Rate::PerSecond(30.0)));
        assert_eq!(parse_rate("2.5"), Ok(Rate::PerSecond(2.5)));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn nginx_config_has_both_locations_and_limits() {
        let c = nginx_config(
            Path::new("/tmp/x"),
            Path::new("/usr/lib/nginx/modules/ngx_nchan_module.so"),
            2,
            20_000,
            "127.0.0.1:9000".parse().unwrap(),
            "127.0.0.1:9001".parse().unwrap(),
        );
        for want in [
            "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;",
            "daemon off;",
            "worker_processes 2;",
            "worker_rlimit_nofile 20000;",
            "worker_connections 20000;",
            "pid /tmp/x/nginx.pid;",
            "access_log off;",
            "listen 127.0.0.1:9000 backlog=65535;",
            "nchan_subscriber websocket;",
            "listen 127.0.0.1:9001;",
            "nchan_publisher;",
            "nchan_channel_id fanout;",
        ] {
            assert!(c.contains(want), "{want:?} missing from\n{c}");
        }
    }

    #[test]
    fn shares_are_even_and_complete() {
        assert_eq!(
            split_even(100_000, 6),
            [16_667, 16_667, 16_667, 16_667, 16_666, 16_666]
        );
        assert_eq!(split_even(19_000, 1), [19_000]);
        assert_eq!(split_even(2, 3), [1, 1, 0]);
        assert_eq!(split_even(0, 2), [0, 0]);
        assert_eq!(split_even(5, 0), [5]);
        for (total, parts) in [(100_000, 6), (7, 3), (3_000, 3), (1, 26)] {
            let v = split_even(total, parts);
            assert_eq!(v.len(), parts);
            assert_eq!(v.iter().sum::<u64>(), total);
            assert!(v.iter().max().unwrap() - v.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn channel_subscribers_from_the_channel_list() {
        let body = r#"{"channels":[{"channel":"bench:other","subscribers":3},
            {"channel":"bench:fanout","epoch":"e","offset":9,"subscribers":16667,"kept":1}]}"#;
        assert_eq!(channel_subscribers(body, CHANNEL), Ok(16_667));
        assert_eq!(channel_subscribers(r#"{"channels":[]}"#, CHANNEL), Ok(0));
        assert!(channel_subscribers("{}", CHANNEL).is_err());
        assert!(channel_subscribers("<html>", CHANNEL).is_err());
    }

    fn sample(in_msgs: u64, out_msgs: u64, published: &[(&str, u64)]) -> NatsSample {
        NatsSample {
            in_msgs,
            out_msgs,
            in_bytes: 0,
            published: published
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        }
    }

    #[test]
    fn nats_messages_per_publish_less_the_background() {
        // Background: 2 in and 10 out per second, 1 of the ins from node b.
        let bg = nats_background(
            &sample(100, 1_000, &[("switchboard a", 50), ("switchboard b", 50)]),
            &sample(104, 1_020, &[("switchboard a", 52), ("switchboard b", 52)]),
            2.0,
        );
        assert_eq!(bg.in_msgs_per_s, 2.0);
        assert_eq!(bg.out_msgs_per_s, 10.0);
        assert_eq!(bg.published_per_s.get("switchboard b"), Some(&1.0));
        // 60 publishes over 10 s: 2 in each (append + live), 6 out each.
        let v0 = sample(0, 0, &[("switchboard a", 0), ("switchboard b", 0)]);
        let v1 = sample(
            60 * 2 + 20,
            60 * 6 + 100,
            &[("switchboard a", 130), ("switchboard b", 10)],
        );
        let n = nats_per_publish(&bg, (&v0, &v1), 10.0, 60, 6);
        assert_eq!((n.in_msgs_raw, n.out_msgs_raw), (140, 460));
        assert_eq!(n.in_msgs_per_publish, 2.0);
        assert_eq!(n.out_msgs_per_publish, 6.0);
        assert_eq!(n.msgs_per_publish, 8.0);
        assert_eq!(n.published_per_publish.get("switchboard a"), Some(&2.0));
        assert_eq!(n.published_per_publish.get("switchboard b"), Some(&0.0));
        assert_eq!(n.nodes_with_subscribers, 6);
        // No publish: no division by zero; never negative.
        let idle = nats_per_publish(&bg, (&v0, &v0), 10.0, 0, 6);
        assert_eq!(idle.msgs_per_publish, 0.0);
    }

    #[test]
    fn memory_per_subscriber_prefers_pss() {
        let m = |rss, pss| Mem { rss, pss, hwm: rss };
        let per = per_subscriber(
            Some(m(10_000, Some(6_000))),
            Some(m(50_000, Some(26_000))),
            10,
        );
        assert_eq!(per, Some(2_000.0));
        let per = per_subscriber(Some(m(10_000, None)), Some(m(50_000, Some(26_000))), 10);
        assert_eq!(per, Some(4_000.0));
        assert_eq!(per_subscriber(None, Some(m(1, None)), 10), None);
        assert_eq!(per_subscriber(Some(m(1, None)), Some(m(1, None)), 0), None);
    }

    #[test]
    fn received_tally_counts_missing_and_extra() {
        let mut r = Received::new();
        r.messages.insert(1, (10, 5));
        r.messages.insert(2, (8, 5));
        r.messages.insert(3, (11, 5));
        assert_eq!(r.tally(&[1, 2, 3, 4], 10), (29, 2 + 10, 1));
    }
}
