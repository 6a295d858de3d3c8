//! The `cross-node` scenario: control API commands sent through one node of a
//! NATS cluster to connections held by the other nodes, beside the same
//! commands on a single node.
//!
//! Setup, all on loopback: the tool starts its own `nats-server` (monitoring
//! on, for `/varz`), an origin inside this process (a small axum server), and
//! `--nodes` switchboard nodes `a`, `b`, `c`, ... joined through NATS, then
//! waits until `GET /v1/nodes` on `a` lists them all.
//!
//! How clients learn their connection id: the origin answers every `connect`
//! with one welcome message whose text is the new connection's id (the
//! `messages` of the connect answer are sent to the client first). A client
//! reads that message before it counts as connected and its worker reports
//! the ids. Nothing has to be matched (no remote ports, no polling of
//! `GET /v1/connections/{id}`), and an id is known only once the gateway
//! holds the connection.
//!
//! Two setups, each with two phases (warmup, then a measured window):
//!
//! 1. cross-node: `--clients` split evenly over the nodes other than `a`;
//!    every command goes through `a`'s control API.
//! 2. single-node: the same number of clients, all on `a`; commands through `a`.
//!
//! * single sends: `--concurrency` callers, each in a loop of
//!   `POST /v1/connections/{id}/messages` to a random client;
//! * batch sends: `--batch-concurrency` callers, each in a loop of
//!   `POST /v1/messages` with one message to every client of the setup.
//!
//! Every message carries its phase, command number and the Unix time in
//! nanoseconds at which the control call started (see
//! [`proto::stamp_text`]); the receiving client subtracts it from its own
//! reading of the same clock. Latency is therefore "control call start to
//! receipt by the client": for a batch, to the last client's receipt.
//!
//! NATS cost: `/varz` `in_msgs` and `out_msgs` are read at both ends of each
//! window; the background rate (heartbeats), measured in a quiet window
//! before the phases, is subtracted, and the rest is divided by the commands.
//!
//! Every child (nats-server, nodes, client workers) is stopped when its owner
//! is dropped, on error paths too.

use crate::fleet::{self, Fleet, Gateway};
use crate::http::HttpConn;
use crate::nats::{self, nats_sample, published_delta, NatsSample, NatsServer};
use crate::proto::{self, Report};
use crate::util::{self, parse_duration, Machine, Percentiles, Table};
use crate::{ClientOpts, GatewayOpts};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `switchboard-bench cross-node`.
#[derive(Debug, Args)]
pub(crate) struct CrossNodeArgs {
    /// Switchboard nodes in the cluster (`a`, `b`, ...); commands go through
    /// `a`, clients connect to the others.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u8).range(2..=26))]
    nodes: u8,

    /// Clients (receive-only WebSocket connections) in each setup.
    #[arg(long, default_value_t = 1_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    clients: u64,

    /// The measured window of each phase.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    duration: Duration,

    /// Unmeasured time before each window.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    warmup: Duration,

    /// Concurrent control API callers of the single-send phases.
    #[arg(long, default_value_t = 16, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=1_000))]
    concurrency: u16,

    /// Concurrent control API callers of the batch phases.
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=100))]
    batch_concurrency: u16,

    /// Pace the single sends at this many commands per second over all
    /// callers (0: each caller sends back to back). Pacing compares latency
    /// at the same load; a caller that falls behind skips the slots it missed.
    #[arg(long, default_value_t = 0, value_name = "PER_S")]
    rate: u32,

    /// Pace the batch sends at this many commands per second (0: back to back).
    #[arg(long, default_value_t = 0, value_name = "PER_S")]
    batch_rate: u32,

    /// Message size in bytes (at least 38, the stamp).
    #[arg(long, default_value_t = 64, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(proto::STAMP_LEN as i64..=65_536))]
    size: u32,

    /// Quiet window measuring the background NATS traffic (heartbeats).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    quiet: Duration,

    /// Wait after each window for deliveries still in flight.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    grace: Duration,

    /// Longest wait for one control call's answer.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    call_timeout: Duration,

    /// Switchboard binary [default: `switchboard` next to this binary, else
    /// target/release/switchboard].
    #[arg(long, value_name = "PATH")]
    switchboard_bin: Option<PathBuf>,

    /// Run nats-server with JetStream (`-js`; its store goes beside --out,
    /// emptied before the run and removed after it): the nodes then use its
    /// key-value bucket for lost-node reports and fencing.
    #[arg(long)]
    jetstream: bool,

    /// NATS server binary.
    #[arg(long, default_value = "nats-server", value_name = "PATH")]
    nats_server_bin: PathBuf,

    /// Extra argument for every spawned `switchboard serve` (repeatable).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    gateway_arg: Vec<String>,

    /// Client processes per setup, split over the nodes the clients connect
    /// to (at least one per node), so that both setups have the same client
    /// capacity.
    #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    client_workers: u16,

    /// Most client connections in one child process.
    #[arg(long, default_value_t = 19_000, value_name = "N")]
    per_process: usize,

    /// Client sockets are bound to 127.0.0.2 .. 127.0.0.(1+N) in turn.
    #[arg(long, default_value_t = 16, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=250))]
    source_addrs: u8,

    /// Opening handshakes in flight at once, over all client processes.
    #[arg(long, default_value_t = 200, value_name = "N")]
    connect_concurrency: usize,

    /// Bound of each connect phase.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    connect_timeout: Duration,

    /// JSON result file (the NATS server's log goes beside it).
    #[arg(
        long,
        default_value = "target/bench/cross-node.json",
        value_name = "FILE"
    )]
    out: PathBuf,
}

/// Which control route a phase exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `POST /v1/connections/{id}/messages` to a random client.
    Single,
    /// `POST /v1/messages`, one message to every client.
    Batch,
}

/// NATS traffic over a window, background subtracted.
#[derive(Debug, Clone, Serialize)]
struct NatsCost {
    /// `in_msgs` growth over the window, as read.
    in_msgs_raw: u64,
    /// Background (heartbeat) `in_msgs` expected over the window, subtracted.
    in_msgs_background: f64,
    /// Messages published into NATS per command (requests and replies).
    in_msgs_per_command: f64,
    /// Messages NATS delivered to subscribers per command.
    out_msgs_per_command: f64,
    /// Payload bytes published per command.
    in_bytes_per_command: f64,
    /// Messages each NATS client connection published per command, by
    /// connection name (`GET /connz`; the nodes call theirs `switchboard <id>`):
    /// the commands node's requests, the other nodes' replies.
    published_per_command: BTreeMap<String, f64>,
    /// Nodes other than the one taking the commands that a command reaches
    /// (single send: 1; batch: every node holding recipients).
    destination_nodes: usize,
    /// `in_msgs_per_command / destination_nodes`: 2 is one request and one
    /// reply per destination node.
    in_msgs_per_destination_node: Option<f64>,
    /// Messages the commands node (`switchboard a`) published per command
    /// and destination node: 1 is one request per destination node.
    requests_per_destination_node: Option<f64>,
    /// `in_msgs` per message delivered to a client.
    in_msgs_per_delivery: f64,
}

/// One measured phase.
#[derive(Debug, Serialize)]
struct Phase {
    /// `single` or `batch`.
    kind: &'static str,
    /// The route.
    route: &'static str,
    /// Concurrent callers.
    callers: u16,
    /// Requested commands per second (0: unpaced, back to back).
    rate: u32,
    /// Measured window, seconds.
    window_s: f64,
    /// Commands started in the window and answered 200.
    commands: u64,
    /// Commands started in the window that failed (status, timeout, I/O).
    failed: u64,
    /// The first failure (warmup included).
    first_failure: Option<String>,
    /// Commands per second.
    commands_per_s: f64,
    /// Messages the API reported as delivered (queued for a client).
    deliveries: u64,
    /// Batch: recipients the API reported as `unknown`.
    unknown: u64,
    /// Deliveries per second.
    deliveries_per_s: f64,
    /// Measured messages the clients received.
    received: u64,
    /// Deliveries the clients did not receive within the grace period.
    missing: u64,
    /// Batch: measured commands not received by every recipient.
    incomplete_commands: u64,
    /// Single: control call start to receipt. Batch: control call start to
    /// the last recipient's receipt.
    latency: Percentiles,
    /// Batch: control call start to each recipient's receipt.
    delivery_latency: Option<Percentiles>,
    /// Control call start to its HTTP answer.
    call_latency: Percentiles,
    /// NATS traffic per command.
    nats: Option<NatsCost>,
    /// CPU over the window per process group (1.0 = one core busy).
    cpu_cores: BTreeMap<String, f64>,
    /// CPU of all switchboard nodes and nats-server per command, microseconds.
    server_cpu_us_per_command: Option<f64>,
    /// Share of the CPUs used by other processes during the window.
    other_cpu_share: Option<f64>,
}

/// One setup: where the clients are.
#[derive(Debug, Serialize)]
struct Setup {
    /// `cross-node` or `single-node`.
    name: &'static str,
    /// Nodes holding the clients.
    client_nodes: Vec<String>,
    /// The node whose control API takes the commands.
    control_node: String,
    /// Clients asked for.
    clients: u64,
    /// Clients connected (id learned).
    connected: u64,
    /// Client worker processes.
    workers: usize,
    /// Connections that ended unexpectedly during the setup.
    dropped: u64,
    /// Single sends.
    single: Phase,
    /// Batch sends.
    batch: Phase,
}

/// Background NATS traffic (heartbeats), per second.
#[derive(Debug, Clone, Default, Serialize)]
struct Background {
    /// Quiet window, seconds.
    window_s: f64,
    /// `in_msgs` per second.
    in_msgs_per_s: f64,
    /// `out_msgs` per second.
    out_msgs_per_s: f64,
    /// `in_bytes` per second.
    in_bytes_per_s: f64,
    /// Messages each NATS client connection published per second, by name.
    published_per_s: BTreeMap<String, f64>,
}

/// The result file of `cross-node`.
#[derive(Debug, Serialize)]
struct CrossNodeResult {
    scenario: &'static str,
    unix_time: u64,
    machine: Machine,
    /// Share of all CPUs busy (other processes) in the second before the run.
    background_cpu_busy: f64,
    nodes: Vec<String>,
    clients: u64,
    size: u32,
    concurrency: u16,
    batch_concurrency: u16,
    warmup_s: f64,
    duration_s: f64,
    nats_server_command: Vec<String>,
    nats_server_version: Option<String>,
    node_commands: Vec<Vec<String>>,
    /// Background NATS traffic, measured before the phases.
    nats_background: Background,
    setups: Vec<Setup>,
    /// Connect events the tool's origin answered.
    origin_connects: u64,
    /// Anything that makes the figures doubtful (empty when all went well).
    problems: Vec<String>,
    /// Conditions that may have lowered the figures.
    warnings: Vec<String>,
}

/// Runs the scenario.
pub(crate) fn run(a: CrossNodeArgs) -> Result<ExitCode, String> {
    if a.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    let sb_bin = a
        .switchboard_bin
        .clone()
        .unwrap_or_else(|| util::sibling_bin("switchboard"));
    if !sb_bin.is_file() {
        return Err(format!(
            "no switchboard binary at {} (build it with `cargo build --release -p switchboard`, or give --switchboard-bin)",
            sb_bin.display()
        ));
    }
    let machine = util::machine();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let background_cpu_busy = util::background_busy(&mut warnings);

    // Dropped last (declared first): the origin serves until the end.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let origin = Arc::new(OriginCounts::default());
    let origin_addr = rt.block_on(start_origin(origin.clone()))?;

    // NATS.
    let mut nats = NatsServer::start(&a.nats_server_bin, &a.out, a.jetstream)?;
    let nats_server_version = nats.version.clone();
    let nats_server_command = nats.command.clone();
    let mon = nats.mon;

    // The nodes.
    let node_ids = nats::node_ids(usize::from(a.nodes));
    let opts = GatewayOpts {
        url: None,
        control: None,
        gateway_pid: None,
        gateway_bin: Some(sb_bin),
        gateway_arg: a.gateway_arg.clone(),
    };
    let mut nodes: Vec<Gateway> = Vec::new();
    for id in &node_ids {
        let serve = [
            "--nats",
            &nats.url,
            "--node-id",
            id,
            "--origin",
            &format!("http://{origin_addr}/events"),
            "--max-connections-per-ip",
            "0",
        ]
        .map(str::to_owned);
        let gw = Gateway::start(&opts, &serve).map_err(|e| format!("node {id}: {e}"))?;
        nodes.push(gw);
    }
    let control_a = nodes[0]
        .control
        .expect("spawned nodes have a control address");
    nats::wait_nodes(
        "a",
        control_a,
        &node_ids,
        Instant::now() + Duration::from_secs(30),
    )?;
    eprintln!(
        "switchboard-bench: nats-server and {} nodes up ({}); GET /v1/nodes on a lists them all",
        node_ids.len(),
        node_ids.join(", ")
    );

    let mut ctx = Ctx {
        a: &a,
        rt: &rt,
        mon,
        nats_pid: nats.pid(),
        node_pids: nodes
            .iter()
            .zip(&node_ids)
            .filter_map(|(g, id)| Some((id.clone(), g.pid?)))
            .collect(),
        control: control_a,
        background: Background::default(),
        problems: &mut problems,
        warnings: &mut warnings,
    };
    let mut setups = Vec::new();
    let cross_targets: Vec<(&Gateway, &String)> = nodes.iter().zip(&node_ids).skip(1).collect();
    setups.push(run_setup(&mut ctx, "cross-node", &cross_targets, true)?);
    check_alive(&mut nodes, &mut nats)?;
    let single_targets: Vec<(&Gateway, &String)> = nodes.iter().zip(&node_ids).take(1).collect();
    setups.push(run_setup(&mut ctx, "single-node", &single_targets, false)?);
    check_alive(&mut nodes, &mut nats)?;
    let nats_background = ctx.background.clone();

    // Stop: every node at once, then NATS.
    for n in &mut nodes {
        n.terminate();
    }
    for n in &mut nodes {
        n.stop();
    }
    nats.stop();

    let node_commands = nodes.iter().filter_map(|n| n.command.clone()).collect();
    let result = CrossNodeResult {
        scenario: "cross-node",
        unix_time: util::unix_now(),
        machine,
        background_cpu_busy,
        nodes: node_ids,
        clients: a.clients,
        size: a.size,
        concurrency: a.concurrency,
        batch_concurrency: a.batch_concurrency,
        warmup_s: a.warmup.as_secs_f64(),
        duration_s: a.duration.as_secs_f64(),
        nats_server_command,
        nats_server_version,
        node_commands,
        nats_background,
        setups,
        origin_connects: origin.connects.load(Relaxed),
        problems,
        warnings,
    };
    print_table(&result);
    util::finish(&a.out, &result, result.problems.is_empty())
}

/// Fails if a node or the NATS server has exited.
fn check_alive(nodes: &mut [Gateway], nats: &mut NatsServer) -> Result<(), String> {
    for n in nodes.iter_mut() {
        n.check_alive()?;
    }
    nats.check_alive()
}

/// What the phases share.
struct Ctx<'a> {
    a: &'a CrossNodeArgs,
    rt: &'a tokio::runtime::Runtime,
    /// NATS monitoring address.
    mon: SocketAddr,
    nats_pid: u32,
    /// `(node id, pid)` of every node.
    node_pids: Vec<(String, u32)>,
    /// Control API of node `a`.
    control: SocketAddr,
    background: Background,
    problems: &'a mut Vec<String>,
    warnings: &'a mut Vec<String>,
}

/// Connected clients of one setup.
struct Clients {
    fleet: Fleet,
    idxs: Vec<usize>,
    pids: Vec<u32>,
    ids: Arc<Vec<String>>,
    connected: u64,
}

/// Connects `--clients` receive-only clients, split evenly over `targets`,
/// and learns their ids.
fn connect_clients(ctx: &mut Ctx, targets: &[(&Gateway, &String)]) -> Result<Clients, String> {
    let a = ctx.a;
    let copts = ClientOpts {
        per_process: a.per_process,
        workers: 0,
        source_addrs: a.source_addrs,
        concurrency: a.connect_concurrency,
        connect_timeout: a.connect_timeout,
    };
    let extra = [
        "--command-timeout".to_owned(),
        // Silence from the coordinator for longer than a whole run ends a worker.
        util::gateway_duration(
            a.connect_timeout + (a.warmup + a.duration) * 4 + Duration::from_secs(600),
        ),
    ];
    let mut fleet = Fleet::new();
    let mut idxs = Vec::new();
    let total = a.clients as usize;
    let mut offset = 0;
    let n = targets.len();
    let workers = usize::from(a.client_workers);
    for (i, (gw, _)) in targets.iter().enumerate() {
        let count = total / n + usize::from(i < total % n);
        if count == 0 {
            continue;
        }
        let node_workers = (workers / n + usize::from(i < workers % n)).max(1);
        let shards: Vec<(usize, usize)> = fleet::shards(count, a.per_process, node_workers, 1)
            .into_iter()
            .map(|(o, c)| (o + offset, c))
            .collect();
        offset += count;
        idxs.extend(fleet::spawn_workers(
            &mut fleet, "recv", gw.addr, &gw.url, &shards, &copts, &extra,
        )?);
    }
    let pids = idxs.iter().map(|&i| fleet.pid(i)).collect();
    let go = Instant::now();
    fleet.send_each(&idxs, proto::GO)?;
    let (mut connected, mut failed, mut first_error) = (0, 0, None);
    let mut ids = Vec::new();
    // Each worker reports `Connected`, then `Ids`.
    fleet.collect(
        &idxs,
        go + a.connect_timeout + Duration::from_secs(15),
        "connected and connection ids",
        |_, r| match r {
            Report::Connected {
                ok,
                failed: f,
                first_error: fe,
                ..
            } => {
                connected += ok;
                failed += f;
                if first_error.is_none() {
                    first_error = fe;
                }
                Ok(false)
            }
            Report::Ids { ids: got } => {
                ids.extend(got);
                Ok(true)
            }
            other => Err(format!("unexpected report {other:?}")),
        },
    )?;
    if failed > 0 {
        ctx.problems.push(format!(
            "{failed} of {} clients could not connect; first error: {}",
            a.clients,
            first_error.as_deref().unwrap_or("?")
        ));
    }
    // Connection ids are `<node>.<22 chars>`: each must be on a target node.
    let nodes: Vec<&str> = targets.iter().map(|(_, id)| id.as_str()).collect();
    if let Some(bad) = ids
        .iter()
        .find(|id| !id.split_once('.').is_some_and(|(n, _)| nodes.contains(&n)))
    {
        return Err(format!(
            "connection id {bad:?} is not on one of the nodes {nodes:?}"
        ));
    }
    if ids.is_empty() {
        return Err(format!(
            "no client connected; first error: {}",
            first_error.as_deref().unwrap_or("?")
        ));
    }
    Ok(Clients {
        fleet,
        idxs,
        pids,
        ids: Arc::new(ids),
        connected,
    })
}

/// Runs one setup: connect, (quiet window), single sends, batch sends, close.
fn run_setup(
    ctx: &mut Ctx,
    name: &'static str,
    targets: &[(&Gateway, &String)],
    measure_background: bool,
) -> Result<Setup, String> {
    let a = ctx.a;
    let client_nodes: Vec<String> = targets.iter().map(|(_, id)| (*id).clone()).collect();
    eprintln!(
        "switchboard-bench: {name}: connecting {} clients to node(s) {}",
        a.clients,
        client_nodes.join(", ")
    );
    let mut clients = connect_clients(ctx, targets)?;
    eprintln!(
        "switchboard-bench: {name}: {} clients connected, ids learned",
        clients.ids.len()
    );
    if measure_background {
        let v0 = nats_sample(ctx.mon)?;
        let t0 = Instant::now();
        std::thread::sleep(a.quiet);
        let v1 = nats_sample(ctx.mon)?;
        let s = t0.elapsed().as_secs_f64();
        ctx.background = Background {
            window_s: s,
            in_msgs_per_s: (v1.in_msgs - v0.in_msgs) as f64 / s,
            out_msgs_per_s: (v1.out_msgs - v0.out_msgs) as f64 / s,
            in_bytes_per_s: (v1.in_bytes - v0.in_bytes) as f64 / s,
            published_per_s: published_delta(&v0, &v1)
                .into_iter()
                .map(|(k, d)| (k, d / s))
                .collect(),
        };
        eprintln!(
            "switchboard-bench: quiet NATS traffic: {:.1} in_msgs/s, {:.1} out_msgs/s",
            ctx.background.in_msgs_per_s, ctx.background.out_msgs_per_s
        );
    }
    let remote_nodes = client_nodes.iter().filter(|n| n.as_str() != "a").count();
    let single = run_phase(ctx, &mut clients, Kind::Single, remote_nodes.min(1), name)?;
    let batch = run_phase(ctx, &mut clients, Kind::Batch, remote_nodes, name)?;

    clients.fleet.send_each(&clients.idxs, proto::CLOSE)?;
    let mut dropped = 0;
    let mut first_drop = None;
    clients.fleet.collect(
        &clients.idxs,
        Instant::now() + Duration::from_secs(60),
        "closed",
        |_, r| {
            let Report::Closed {
                dropped: d,
                first_drop: fd,
                ..
            } = r
            else {
                return Err(format!("unexpected report {r:?}"));
            };
            dropped += d;
            if first_drop.is_none() {
                first_drop = fd;
            }
            Ok(true)
        },
    )?;
    if dropped > 0 {
        ctx.problems.push(format!(
            "{name}: {dropped} client connections ended unexpectedly; first: {}",
            first_drop.as_deref().unwrap_or("?")
        ));
    }
    Ok(Setup {
        name,
        client_nodes,
        control_node: "a".into(),
        clients: a.clients,
        connected: clients.connected,
        workers: clients.idxs.len(),
        dropped,
        single,
        batch,
    })
}

/// CPU seconds so far of each process group.
fn cpu_readings(ctx: &Ctx, clients: &Clients) -> Vec<(String, Option<f64>)> {
    let mut v: Vec<(String, Option<f64>)> = ctx
        .node_pids
        .iter()
        .map(|(id, pid)| (format!("node {id}"), util::proc_cpu_s(*pid)))
        .collect();
    v.push(("nats-server".into(), util::proc_cpu_s(ctx.nats_pid)));
    v.push(("clients".into(), util::cpu_of_all(&clients.pids)));
    v.push((
        "bench (callers)".into(),
        util::proc_cpu_s(std::process::id()),
    ));
    v
}

/// Every process of the run, for the interference reading.
fn all_pids(ctx: &Ctx, clients: &Clients) -> Vec<u32> {
    let mut p: Vec<u32> = ctx.node_pids.iter().map(|(_, p)| *p).collect();
    p.push(ctx.nats_pid);
    p.extend(&clients.pids);
    p.push(std::process::id());
    p
}

/// One phase: warmup, measured window, grace, client reports.
fn run_phase(
    ctx: &mut Ctx,
    clients: &mut Clients,
    kind: Kind,
    destination_nodes: usize,
    setup: &str,
) -> Result<Phase, String> {
    let a = ctx.a;
    let callers = match kind {
        Kind::Single => a.concurrency,
        Kind::Batch => a.batch_concurrency,
    };
    let label = match kind {
        Kind::Single => "single sends",
        Kind::Batch => "batch sends",
    };
    let rate = match kind {
        Kind::Single => a.rate,
        Kind::Batch => a.batch_rate,
    };
    // Each caller's share of the rate.
    let interval =
        (rate > 0).then(|| Duration::from_secs_f64(f64::from(callers) / f64::from(rate)));
    eprintln!(
        "switchboard-bench: {setup}: {label}, {callers} callers; warmup {:?}, measuring {:?}",
        a.warmup, a.duration
    );
    let warm_end = Instant::now() + a.warmup;
    let end = warm_end + a.duration;
    let plan = Plan {
        kind,
        control: ctx.control,
        targets: clients.ids.clone(),
        size: a.size as usize,
        warm_end: tokio::time::Instant::from_std(warm_end),
        end: tokio::time::Instant::from_std(end),
        call_timeout: a.call_timeout,
        interval,
    };
    let handle = ctx.rt.spawn(run_callers(plan, callers));
    std::thread::sleep(warm_end.saturating_duration_since(Instant::now()));
    let pids = all_pids(ctx, clients);
    let interference = util::Interference::start(util::cpu_of_all(&pids));
    let v0 = nats_sample(ctx.mon).ok();
    let cpu0 = cpu_readings(ctx, clients);
    let t0 = Instant::now();
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let v1 = nats_sample(ctx.mon).ok();
    let cpu1 = cpu_readings(ctx, clients);
    let window = t0.elapsed().as_secs_f64();
    let other_cpu_share = interference.and_then(|i| i.finish(util::cpu_of_all(&pids)));
    util::warn_interference(other_cpu_share, &format!("{setup} {label}"), ctx.warnings);
    // The callers stop starting commands at `end`; the last answers take at
    // most the call timeout.
    let calls = ctx
        .rt
        .block_on(async {
            tokio::time::timeout(a.call_timeout + Duration::from_secs(5), handle).await
        })
        .map_err(|_| "the control API callers did not stop".to_owned())?
        .map_err(|e| format!("a control API caller failed: {e}"))?;
    std::thread::sleep(a.grace);

    // What the clients received.
    clients.fleet.send_each(&clients.idxs, proto::REPORT)?;
    let mut single_received = 0;
    let mut lat = util::new_histogram();
    let mut delivery_lat = util::new_histogram();
    let mut per_command: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut unparsed = 0;
    clients.fleet.collect(
        &clients.idxs,
        Instant::now() + Duration::from_secs(30),
        "received",
        |_, r| {
            let Report::Received {
                single,
                single_latency_us,
                batch,
                batch_latency_us,
                unparsed: u,
                ..
            } = r
            else {
                return Err(format!("unexpected report {r:?}"));
            };
            single_received += single;
            util::add_buckets(&mut lat, &single_latency_us);
            util::add_buckets(&mut delivery_lat, &batch_latency_us);
            for (seq, n, us) in batch {
                let e = per_command.entry(seq).or_insert((0, 0));
                e.0 += n;
                e.1 = e.1.max(us);
            }
            unparsed += u;
            Ok(true)
        },
    )?;
    if unparsed > 0 {
        ctx.problems.push(format!(
            "{setup} {label}: clients received {unparsed} messages without a stamp"
        ));
    }

    let (received, missing, incomplete_commands) = match kind {
        Kind::Single => (single_received, calls.ok.saturating_sub(single_received), 0),
        Kind::Batch => {
            let (mut received, mut missing, mut incomplete) = (0, 0, 0);
            for &(seq, delivered) in &calls.batch {
                let (got, us) = per_command.get(&seq).copied().unwrap_or((0, 0));
                received += got;
                if got >= delivered {
                    lat.saturating_record(us);
                } else {
                    incomplete += 1;
                    missing += delivered - got;
                }
            }
            (received, missing, incomplete)
        }
    };
    if calls.failed > 0 {
        ctx.problems.push(format!(
            "{setup} {label}: {} of {} commands failed; first: {}",
            calls.failed,
            calls.ok + calls.failed,
            calls.first_failure.as_deref().unwrap_or("?")
        ));
    } else if let Some(f) = &calls.first_failure {
        ctx.warnings.push(format!(
            "{setup} {label}: {} warmup commands failed; first: {f}",
            calls.warmup_failed
        ));
    }
    if missing > 0 {
        ctx.problems.push(format!(
            "{setup} {label}: {missing} deliveries not received by the clients within {:?} after the window",
            a.grace
        ));
    }
    if calls.unknown > 0 {
        ctx.problems.push(format!(
            "{setup} {label}: the API answered `unknown` for {} recipients",
            calls.unknown
        ));
    }
    if calls.ok == 0 {
        ctx.problems.push(format!(
            "{setup} {label}: no command succeeded in the window"
        ));
    }

    let commands_started = calls.ok + calls.failed;
    let nats = match (v0, v1) {
        (Some(v0), Some(v1)) if commands_started > 0 => Some(nats_cost(
            &ctx.background,
            (&v0, &v1),
            window,
            commands_started,
            calls.delivered,
            destination_nodes,
        )),
        _ => None,
    };
    let mut cpu_cores = BTreeMap::new();
    let mut server_cpu = Some(0.0);
    for ((name, c0), (_, c1)) in cpu0.iter().zip(&cpu1) {
        let d = c0.zip(*c1).map(|(x, y)| y - x);
        if let Some(d) = d {
            cpu_cores.insert(name.clone(), d / window);
        }
        if name.starts_with("node ") || name == "nats-server" {
            server_cpu = server_cpu.zip(d).map(|(s, d)| s + d);
        }
    }
    Ok(Phase {
        kind: match kind {
            Kind::Single => "single",
            Kind::Batch => "batch",
        },
        route: match kind {
            Kind::Single => "POST /v1/connections/{id}/messages",
            Kind::Batch => "POST /v1/messages",
        },
        callers,
        rate,
        window_s: window,
        commands: calls.ok,
        failed: calls.failed,
        first_failure: calls.first_failure.clone(),
        commands_per_s: calls.ok as f64 / window,
        deliveries: calls.delivered,
        unknown: calls.unknown,
        deliveries_per_s: calls.delivered as f64 / window,
        received,
        missing,
        incomplete_commands,
        latency: util::percentiles(&lat),
        delivery_latency: (kind == Kind::Batch).then(|| util::percentiles(&delivery_lat)),
        call_latency: util::percentiles(&calls.call_us),
        nats,
        server_cpu_us_per_command: server_cpu
            .filter(|_| calls.ok > 0)
            .map(|s| s * 1e6 / calls.ok as f64),
        cpu_cores,
        other_cpu_share,
    })
}

/// The NATS traffic of a window, background subtracted, per command.
fn nats_cost(
    bg: &Background,
    (v0, v1): (&NatsSample, &NatsSample),
    window: f64,
    commands: u64,
    delivered: u64,
    destination_nodes: usize,
) -> NatsCost {
    let in_raw = v1.in_msgs - v0.in_msgs;
    let in_bg = bg.in_msgs_per_s * window;
    let in_msgs = (in_raw as f64 - in_bg).max(0.0);
    let out_msgs = ((v1.out_msgs - v0.out_msgs) as f64 - bg.out_msgs_per_s * window).max(0.0);
    let in_bytes = ((v1.in_bytes - v0.in_bytes) as f64 - bg.in_bytes_per_s * window).max(0.0);
    let n = commands as f64;
    let published_per_command: BTreeMap<String, f64> = published_delta(v0, v1)
        .into_iter()
        .map(|(k, d)| {
            let b = bg.published_per_s.get(&k).copied().unwrap_or(0.0) * window;
            (k, (d - b).max(0.0) / n)
        })
        .collect();
    let per_destination = |v: f64| (destination_nodes > 0).then(|| v / destination_nodes as f64);
    NatsCost {
        in_msgs_raw: in_raw,
        in_msgs_background: in_bg,
        in_msgs_per_command: in_msgs / n,
        out_msgs_per_command: out_msgs / n,
        in_bytes_per_command: in_bytes / n,
        requests_per_destination_node: published_per_command
            .get("switchboard a")
            .and_then(|r| per_destination(*r)),
        published_per_command,
        destination_nodes,
        in_msgs_per_destination_node: per_destination(in_msgs / n),
        in_msgs_per_delivery: in_msgs / delivered.max(1) as f64,
    }
}

// ---------------------------------------------------------------------------
// The control API callers.

/// What the callers of one phase do.
#[derive(Debug, Clone)]
struct Plan {
    kind: Kind,
    control: SocketAddr,
    targets: Arc<Vec<String>>,
    size: usize,
    warm_end: tokio::time::Instant,
    end: tokio::time::Instant,
    call_timeout: Duration,
    /// Pacing: one command per interval per caller.
    interval: Option<Duration>,
}

/// The callers' tally.
#[derive(Debug)]
struct Calls {
    /// Measured commands answered 200.
    ok: u64,
    /// Measured commands that failed.
    failed: u64,
    warmup_failed: u64,
    first_failure: Option<String>,
    delivered: u64,
    unknown: u64,
    /// Control call latency (start to answer), microseconds.
    call_us: Histogram<u64>,
    /// Batch: measured commands answered 200, as `(seq, delivered)`.
    batch: Vec<(u64, u64)>,
}

impl Calls {
    fn new() -> Self {
        Self {
            ok: 0,
            failed: 0,
            warmup_failed: 0,
            first_failure: None,
            delivered: 0,
            unknown: 0,
            call_us: util::new_histogram(),
            batch: Vec::new(),
        }
    }

    fn merge(&mut self, o: Self) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.warmup_failed += o.warmup_failed;
        if self.first_failure.is_none() {
            self.first_failure = o.first_failure;
        }
        self.delivered += o.delivered;
        self.unknown += o.unknown;
        let _ = self.call_us.add(&o.call_us);
        self.batch.extend(o.batch);
    }
}

/// Runs `callers` concurrent callers until the plan's end.
async fn run_callers(plan: Plan, callers: u16) -> Calls {
    let seq = Arc::new(AtomicU64::new(1));
    // The batch body up to the text; built once.
    let batch_prefix = Arc::new(match plan.kind {
        Kind::Single => String::new(),
        Kind::Batch => {
            let ids: Vec<String> = plan.targets.iter().map(|i| format!("\"{i}\"")).collect();
            format!(
                "{{\"messages\":[{{\"connection_ids\":[{}],\"text\":\"",
                ids.join(",")
            )
        }
    });
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            tokio::spawn(caller(
                plan.clone(),
                batch_prefix.clone(),
                seq.clone(),
                u64::from(i),
            ))
        })
        .collect();
    let mut all = Calls::new();
    for t in tasks {
        match t.await {
            Ok(c) => all.merge(c),
            Err(e) => {
                all.failed += 1;
                all.first_failure.get_or_insert(format!("caller task: {e}"));
            }
        }
    }
    all
}

/// One caller: commands back to back until the end of the window.
async fn caller(plan: Plan, batch_prefix: Arc<String>, seq: Arc<AtomicU64>, task: u64) -> Calls {
    let mut conn = HttpConn::new(plan.control);
    let mut rng =
        XorShift::new(util::unix_nanos() ^ (task + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut c = Calls::new();
    let ids = &plan.targets;
    // Paced callers start spread over one interval.
    let mut next = plan
        .interval
        .map(|i| tokio::time::Instant::now() + i.mul_f64(rng.below(1000) as f64 / 1000.0));
    // Bounded: every iteration takes at most the call timeout (pacing
    // sleeps end at `end` too), and no new command starts after `end`.
    while tokio::time::Instant::now() < plan.end {
        if let (Some(at), Some(interval)) = (next.as_mut(), plan.interval) {
            tokio::time::sleep_until((*at).min(plan.end)).await;
            // Skip the slots missed while behind rather than bursting.
            *at = (*at + interval).max(tokio::time::Instant::now());
            if tokio::time::Instant::now() >= plan.end {
                break;
            }
        }
        let measured = tokio::time::Instant::now() >= plan.warm_end;
        let phase = match (measured, plan.kind) {
            (false, _) => proto::PHASE_WARMUP,
            (true, Kind::Single) => proto::PHASE_SINGLE,
            (true, Kind::Batch) => proto::PHASE_BATCH,
        };
        let n = seq.fetch_add(1, Relaxed);
        let t0 = std::time::Instant::now();
        let text = proto::stamp_text(phase, n, util::unix_nanos(), plan.size);
        let (path, body) = match plan.kind {
            Kind::Single => {
                let id = &ids[rng.below(ids.len())];
                (
                    format!("/v1/connections/{id}/messages"),
                    format!("{{\"text\":\"{text}\"}}"),
                )
            }
            Kind::Batch => (
                "/v1/messages".to_owned(),
                format!("{batch_prefix}{text}\"}}]}}"),
            ),
        };
        let answer =
            tokio::time::timeout(plan.call_timeout, conn.post(&path, body.as_bytes())).await;
        let us = t0.elapsed().as_micros().max(1) as u64;
        let outcome = match answer {
            Err(_) => {
                conn.reset();
                Err(format!("no answer within {:?}", plan.call_timeout))
            }
            Ok(Err(e)) => Err(e),
            Ok(Ok((200, body))) => Ok(body),
            Ok(Ok((status, body))) => Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )),
        };
        match outcome {
            Ok(_) if !measured => {}
            Ok(body) => {
                c.ok += 1;
                c.call_us.saturating_record(us);
                match plan.kind {
                    Kind::Single => c.delivered += 1,
                    Kind::Batch => {
                        let text = String::from_utf8_lossy(&body);
                        let delivered = text.matches("\"delivered\"").count() as u64;
                        c.unknown += text.matches("\"unknown\"").count() as u64;
                        c.delivered += delivered;
                        c.batch.push((n, delivered));
                    }
                }
            }
            Err(e) => {
                if measured {
                    c.failed += 1;
                } else {
                    c.warmup_failed += 1;
                }
                c.first_failure.get_or_insert(format!("{path}: {e}"));
                // No hot loop against a failing node.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    c
}

/// A small PRNG (xorshift64*), enough to pick random recipients.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------
// The origin.

/// What the origin has seen.
#[derive(Debug, Default)]
struct OriginCounts {
    connects: AtomicU64,
    other_events: AtomicU64,
}

/// Starts the origin on a free loopback port of the current runtime.
async fn start_origin(counts: Arc<OriginCounts>) -> Result<SocketAddr, String> {
    let app = axum::Router::new()
        .route("/events", axum::routing::post(origin_events))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(counts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("origin: cannot bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("switchboard-bench: origin stopped: {e}");
        }
    });
    Ok(addr)
}

/// The webhook: accepts every connection with a welcome message carrying
/// its id; acknowledges every other event.
async fn origin_events(
    State(counts): State<Arc<OriginCounts>>,
    body: Bytes,
) -> axum::response::Response {
    let Ok(batch) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let events = batch
        .get("events")
        .and_then(|e| e.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    match events.first() {
        Some(e) if e.get("type").and_then(|t| t.as_str()) == Some("connect") => {
            counts.connects.fetch_add(1, Relaxed);
            let id = e
                .get("connection_id")
                .and_then(|i| i.as_str())
                .unwrap_or_default();
            axum::Json(serde_json::json!({ "messages": [{ "text": id }] })).into_response()
        }
        _ => {
            counts.other_events.fetch_add(events.len() as u64, Relaxed);
            StatusCode::OK.into_response()
        }
    }
}

// ---------------------------------------------------------------------------
// The table.

fn print_table(r: &CrossNodeResult) {
    let mut t = Table::default();
    t.section(&format!(
        "cross-node: {} nodes ({}) over nats-server {}, {} clients, {}-byte text messages",
        r.nodes.len(),
        r.nodes.join(", "),
        r.nats_server_version.as_deref().unwrap_or("?"),
        r.clients,
        r.size
    ));
    t.row(
        "warmup / window per phase",
        format!("{:.1} s / {:.1} s", r.warmup_s, r.duration_s),
    );
    t.row(
        "background NATS traffic (heartbeats)",
        format!(
            "{:.1} in_msgs/s, {:.1} out_msgs/s (measured over {:.1} s, subtracted below)",
            r.nats_background.in_msgs_per_s,
            r.nats_background.out_msgs_per_s,
            r.nats_background.window_s
        ),
    );
    for s in &r.setups {
        t.section(&format!(
            "{}: {} of {} clients on {}, commands through {} ({} client processes)",
            s.name,
            s.connected,
            s.clients,
            s.client_nodes.join(", "),
            s.control_node,
            s.workers
        ));
        for p in [&s.single, &s.batch] {
            phase_rows(&mut t, s.name, p);
        }
    }
    if let [cross, single] = &r.setups[..] {
        t.section("cross-node vs single-node");
        for (what, c, s) in [
            ("single sends", &cross.single, &single.single),
            ("batch sends", &cross.batch, &single.batch),
        ] {
            t.row(
                &format!("{what}: commands/s"),
                format!(
                    "{:.0} vs {:.0} ({:.0} %)",
                    c.commands_per_s,
                    s.commands_per_s,
                    ratio(c.commands_per_s, s.commands_per_s)
                ),
            );
            t.row(
                &format!("{what}: p50 / p99"),
                format!(
                    "{:.2} / {:.2} ms vs {:.2} / {:.2} ms",
                    c.latency.p50_ms, c.latency.p99_ms, s.latency.p50_ms, s.latency.p99_ms
                ),
            );
        }
    }
    t.problems(&r.problems, &r.warnings);
    t.print();
}

/// `a / b` in percent (0 when `b` is 0).
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b * 100.0
    } else {
        0.0
    }
}

fn lat_row(l: &Percentiles) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2} ms",
        l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
    )
}

fn phase_rows(t: &mut Table, setup: &str, p: &Phase) {
    let pace = if p.rate > 0 {
        format!(", paced at {}/s", p.rate)
    } else {
        String::new()
    };
    t.section(&format!(
        "{setup} {} sends: {}, {} caller(s){pace}",
        p.kind, p.route, p.callers
    ));
    t.row(
        "commands (failed)",
        format!("{} ({})", p.commands, p.failed),
    );
    t.row("commands/s", format!("{:.0}", p.commands_per_s));
    if p.kind == "batch" {
        t.row("deliveries/s", format!("{:.0}", p.deliveries_per_s));
    }
    t.row(
        "received by clients (missing)",
        format!("{} ({})", p.received, p.missing),
    );
    let what = if p.kind == "batch" {
        "start → last receipt p50/p99/p99.9/max"
    } else {
        "start → receipt p50/p99/p99.9/max"
    };
    t.row(what, lat_row(&p.latency));
    if let Some(d) = &p.delivery_latency {
        t.row("start → each receipt p50/p99/p99.9/max", lat_row(d));
    }
    t.row(
        "start → HTTP answer p50/p99",
        format!(
            "{:.2} / {:.2} ms",
            p.call_latency.p50_ms, p.call_latency.p99_ms
        ),
    );
    if let Some(n) = &p.nats {
        t.row(
            "NATS msgs per command in / out",
            format!(
                "{:.2} / {:.2} ({:.0} B in)",
                n.in_msgs_per_command, n.out_msgs_per_command, n.in_bytes_per_command
            ),
        );
        let published: Vec<String> = n
            .published_per_command
            .iter()
            .map(|(k, v)| format!("{} {v:.2}", k.strip_prefix("switchboard ").unwrap_or(k)))
            .collect();
        t.row(
            "NATS msgs published per command, by node",
            published.join(", "),
        );
        if let Some(d) = n.in_msgs_per_destination_node {
            t.row(
                "NATS in_msgs per destination node",
                format!("{d:.2} ({} destination node(s))", n.destination_nodes),
            );
        }
        if let Some(r) = n.requests_per_destination_node {
            t.row("requests from a per destination node", format!("{r:.2}"));
        }
        if p.kind == "batch" {
            t.row(
                "NATS in_msgs per delivery",
                format!("{:.4}", n.in_msgs_per_delivery),
            );
        }
    }
    let cpu: Vec<String> = p
        .cpu_cores
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect();
    t.row("CPU (cores)", cpu.join(", "));
    if let Some(us) = p.server_cpu_us_per_command {
        t.row("nodes + NATS CPU per command", format!("{us:.0} µs"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_picks_stay_in_range() {
        let mut r = XorShift::new(42);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            seen[r.below(7)] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn origin_welcomes_with_the_connection_id() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let counts = Arc::new(OriginCounts::default());
            let addr = start_origin(counts.clone()).await.unwrap();
            let mut c = HttpConn::new(addr);
            let (status, body) = c
                .post(
                    "/events",
                    br#"{"events":[{"type":"connect","connection_id":"b.x"}]}"#,
                )
                .await
                .unwrap();
            assert_eq!(status, 200);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v, serde_json::json!({"messages": [{"text": "b.x"}]}));
            let (status, _) = c
                .post("/events", br#"{"events":[{"type":"disconnect"}]}"#)
                .await
                .unwrap();
            assert_eq!(status, 200);
            assert_eq!(counts.connects.load(Relaxed), 1);
            assert_eq!(counts.other_events.load(Relaxed), 1);
        });
    }
}
