//! The `idle` scenario: raw TCP accept rate, WebSocket handshake rate, and the
//! gateway's resident memory per idle connection.
//!
//! 1. TCP baseline (unless `--no-tcp-baseline`): the `acceptor` child runs a
//!    plain tokio accept loop; the same client workers open N plain TCP
//!    connections. Rate = N / (time from `go` until the acceptor has accepted N).
//! 2. The gateway is spawned (dev mode) or reached with `--url`; its RSS is
//!    read from `/proc/PID/status`.
//! 3. The workers open N WebSocket connections. Rate = N / (time from `go`
//!    until every worker has its connections open).
//! 4. The connections stay open and idle for `--settle`, each client reading
//!    its stream so the gateway's pings are answered; then the gateway's RSS
//!    is read again and RSS per connection = (after - before) / N.
//! 5. The clients close gracefully; the RSS after the close shows what the
//!    gateway gives back.
//!
//! With `--tls` the spawned gateway gets a certificate (the server crate's
//! test fixture by default), the clients do a full TLS handshake before the
//! WebSocket one (so the handshake rate and latency include it), and the
//! control API is read over HTTPS; the TCP baseline stays plain.

use crate::fleet::{self, Fleet, Gateway};
use crate::proto::{self, Report};
use crate::tls::TlsOpts;
use crate::util::{self, human_bytes, parse_duration, Machine, Percentiles, ProcMem, Table};
use crate::{ClientOpts, GatewayOpts};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The target: gateway RSS per idle connection, in bytes.
const TARGET_RSS_PER_CONN: f64 = 2048.0;

/// Options of `switchboard-bench idle`.
#[derive(Debug, Args)]
pub(crate) struct IdleArgs {
    /// WebSocket connections to open and hold. One gateway process may hold
    /// at most ~19,900 (it is limited to 20,000 open files), or ~6,600 with
    /// --tls (three files per TLS connection).
    #[arg(long, default_value_t = 19_000, value_name = "N")]
    connections: usize,

    /// How long the connections stay idle before the second RSS reading.
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = parse_duration)]
    settle: Duration,

    /// Ping interval of the spawned gateway, so that pings (and the clients'
    /// pongs) happen during the settle period.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    ping_interval: Duration,

    /// Skip the raw TCP accept baseline.
    #[arg(long, conflicts_with = "tcp_baseline_only")]
    no_tcp_baseline: bool,

    /// Run only the raw TCP accept baseline (no gateway).
    #[arg(long)]
    tcp_baseline_only: bool,

    /// Open the WebSocket connections in this many equal steps, reading the
    /// gateway's RSS after each (a second apart), to fit the marginal memory
    /// per connection; the handshake time is then the sum of the steps.
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = clap::value_parser!(u16).range(1..=100))]
    steps: u16,

    /// JSON result file.
    #[arg(long, default_value = "target/bench/idle.json", value_name = "FILE")]
    out: PathBuf,

    #[command(flatten)]
    clients: ClientOpts,

    #[command(flatten)]
    gateway: GatewayOpts,

    #[command(flatten)]
    tls: TlsOpts,
}

/// The raw TCP accept baseline.
#[derive(Debug, Serialize)]
struct TcpBaseline {
    /// Connections attempted.
    connections: usize,
    /// Connections accepted by the accept loop.
    accepted: u64,
    /// Client connects that failed.
    failed: u64,
    /// Seconds from `go` until the acceptor had accepted them all.
    time_s: f64,
    /// `accepted / time_s`.
    accepts_per_s: f64,
    /// Seconds from the first accept to the last, by the acceptor's clock.
    acceptor_span_s: f64,
    /// Client-side connect latency.
    connect_latency: Percentiles,
    /// CPU time of the acceptor per accepted socket, microseconds.
    acceptor_cpu_us_per_accept: Option<f64>,
    /// CPU time of all client workers per connection, microseconds.
    clients_cpu_us_per_conn: Option<f64>,
    /// Share of the CPUs used by other processes meanwhile.
    other_cpu_share: Option<f64>,
}

/// The WebSocket connect phase.
#[derive(Debug, Serialize)]
struct Handshakes {
    /// Connections attempted.
    connections: usize,
    /// Connections open (101 received).
    connected: u64,
    /// Attempts that failed or did not finish in time.
    failed: u64,
    /// The first failure.
    first_error: Option<String>,
    /// Steps the connections were opened in.
    steps: usize,
    /// Seconds from `go` until every worker had its connections open ("time
    /// to N"); with several steps, the sum of the steps' times.
    time_s: f64,
    /// `connected / time_s`.
    handshakes_per_s: f64,
    /// Client-side connect + handshake latency.
    handshake_latency: Percentiles,
    /// Gateway CPU time (user + system) per handshake, microseconds.
    gateway_cpu_us_per_handshake: Option<f64>,
    /// CPU time of all client workers per handshake, microseconds.
    clients_cpu_us_per_handshake: Option<f64>,
    /// Context switches of the gateway's threads per handshake.
    gateway_context_switches_per_handshake: Option<f64>,
    /// Share of the CPUs used by other processes while connecting.
    other_cpu_share: Option<f64>,
    /// Open connections according to the gateway's `/v1/stats`, right after.
    gateway_connections: Option<u64>,
}

/// The hold.
#[derive(Debug, Serialize)]
struct Hold {
    /// Seconds held idle.
    settle_s: f64,
    /// Open connections according to the gateway after the settle period.
    gateway_connections: Option<u64>,
    /// Pings received by the clients (each answered with a pong).
    pings: u64,
    /// Connections that ended before the close (must be 0).
    dropped: u64,
    /// The first unexpected end.
    first_drop: Option<String>,
    /// Connections closed gracefully at the end.
    closed: u64,
    /// Open connections according to the gateway after the close.
    gateway_connections_after_close: Option<u64>,
    /// Resident memory of all client workers together, bytes.
    client_rss: u64,
}

/// One reading of the gateway's RSS while connections were being opened.
#[derive(Debug, Clone, Copy, Serialize)]
struct Checkpoint {
    /// Connections open.
    connections: u64,
    /// Gateway VmRSS, bytes.
    rss: u64,
}

/// The gateway's memory.
#[derive(Debug, Serialize)]
struct Memory {
    /// Before any connection.
    before: ProcMem,
    /// Right after the last connection opened.
    after_connect: Option<ProcMem>,
    /// After the settle period, all connections open.
    after: ProcMem,
    /// After the clients closed.
    after_close: Option<ProcMem>,
    /// (after.rss - before.rss) / connected, bytes.
    rss_per_conn: f64,
    /// (after.rss_anon - before.rss_anon) / connected, bytes.
    anon_per_conn: f64,
    /// (after.rss - after_connect.rss) / connected, bytes: growth while idle
    /// (pings, pongs, timers firing for the first time).
    idle_growth_per_conn: Option<f64>,
    /// RSS readings: before, then after each step (the last one right after
    /// connecting, before the settle period).
    checkpoints: Vec<Checkpoint>,
    /// Least-squares slope of RSS over connections across the checkpoints
    /// after the first step (with one step: (after_connect - before) / N),
    /// bytes: the cost of one more connection, without the one-time costs of
    /// the first connections (buffer pools, runtime and allocator warm-up).
    /// Add `idle_growth_per_conn` for the steady state.
    marginal_rss_per_conn: Option<f64>,
    /// Kernel slab growth per connection (both ends of each socket, whole
    /// machine, so approximate), bytes.
    kernel_slab_per_conn: f64,
    /// The slab caches that grew most, bytes per connection (both ends;
    /// root only).
    kernel_slab_caches: Vec<(String, f64)>,
    /// The target, bytes per connection.
    target_rss_per_conn: f64,
    /// Whether `rss_per_conn` is within the target.
    target_met: bool,
}

/// The result file of `idle`.
#[derive(Debug, Serialize)]
struct IdleResult {
    scenario: &'static str,
    unix_time: u64,
    machine: Machine,
    /// Share of all CPUs busy (other processes) in the second before the run.
    background_cpu_busy: f64,
    connections: usize,
    workers: usize,
    source_addrs: u8,
    concurrency: usize,
    gateway_url: String,
    /// Whether the clients and the control API spoke TLS to the gateway.
    tls: bool,
    gateway_command: Option<Vec<String>>,
    tcp_baseline: Option<TcpBaseline>,
    handshakes: Handshakes,
    hold: Hold,
    memory: Option<Memory>,
    /// Handshake rate / TCP accept rate.
    handshake_to_accept_ratio: Option<f64>,
    /// Anything that makes the figures doubtful (empty when all went well).
    problems: Vec<String>,
    /// Conditions that may have lowered the figures.
    warnings: Vec<String>,
}

/// Folds `Connected` reports.
#[derive(Debug, Default)]
struct ConnectTotals {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    latency: Option<hdrhistogram::Histogram<u64>>,
    /// Latest RSS reported by each worker.
    rss: std::collections::HashMap<usize, u64>,
}

impl ConnectTotals {
    fn add(&mut self, idx: usize, r: Report) -> Result<bool, String> {
        let Report::Connected {
            ok,
            failed,
            first_error,
            latency_us,
            rss_bytes,
            ..
        } = r
        else {
            return Err(format!("unexpected report {r:?}"));
        };
        self.ok += ok;
        self.failed += failed;
        if self.first_error.is_none() {
            self.first_error = first_error;
        }
        util::add_buckets(
            self.latency.get_or_insert_with(util::new_histogram),
            &latency_us,
        );
        self.rss.insert(idx, rss_bytes);
        Ok(true)
    }

    fn percentiles(&self) -> Percentiles {
        self.latency
            .as_ref()
            .map(util::percentiles)
            .unwrap_or_default()
    }
}

/// Folds `Closed` reports.
#[derive(Debug, Default)]
struct CloseTotals {
    closed: u64,
    dropped: u64,
    pings: u64,
    first_drop: Option<String>,
}

impl CloseTotals {
    fn add(&mut self, r: Report) -> Result<bool, String> {
        let Report::Closed {
            closed,
            dropped,
            pings,
            first_drop,
        } = r
        else {
            return Err(format!("unexpected report {r:?}"));
        };
        self.closed += closed;
        self.dropped += dropped;
        self.pings += pings;
        if self.first_drop.is_none() {
            self.first_drop = first_drop;
        }
        Ok(true)
    }
}

/// Runs the scenario.
pub(crate) fn run(a: IdleArgs) -> Result<ExitCode, String> {
    if a.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    // The gateway holds one file per plain connection, three per TLS one
    // (the client's socket and a local socket pair to the connection task).
    let files_per_conn = if a.tls.tls { 3 } else { 1 };
    if a.gateway.url.is_none() && a.connections * files_per_conn > 19_900 {
        eprintln!(
            "switchboard-bench: warning: {} {}connections exceed what one gateway process can hold with 20,000 open files",
            a.connections,
            if a.tls.tls { "TLS " } else { "" }
        );
    }
    let shards = fleet::shards(a.connections, a.clients.per_process, a.clients.workers, 2);
    a.gateway.validate()?;
    let machine = util::machine();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let background_cpu_busy = util::background_busy(&mut warnings);

    // 1. TCP baseline.
    let tcp_baseline = if a.no_tcp_baseline {
        None
    } else {
        eprintln!(
            "switchboard-bench: TCP baseline: {} plain connections to a tokio accept loop",
            a.connections
        );
        let b = tcp_baseline(&a, &shards, &mut problems)?;
        util::warn_interference(b.other_cpu_share, "the TCP baseline", &mut warnings);
        Some(b)
    };

    if a.tcp_baseline_only {
        let b = tcp_baseline.expect("ran");
        let mut t = Table::default();
        t.section(&format!(
            "raw TCP accept: {} connections, {} client processes",
            a.connections,
            shards.len()
        ));
        tcp_baseline_rows(&mut t, &b);
        t.problems(&problems, &warnings);
        t.print();
        let ok = problems.is_empty();
        return util::finish(
            &a.out,
            &serde_json::json!({
                "scenario": "tcp-baseline",
                "unix_time": util::unix_now(),
                "machine": machine,
                "background_cpu_busy": background_cpu_busy,
                "workers": shards.len(),
                "tcp_baseline": b,
                "problems": problems,
                "warnings": warnings,
            }),
            ok,
        );
    }

    // 2. The gateway.
    let mut serve_args = vec![
        "--max-connections-per-ip".into(),
        "0".into(),
        "--ping-interval".into(),
        util::gateway_duration(a.ping_interval),
    ];
    if a.gateway.url.is_none() {
        serve_args.extend(a.tls.serve_args()?);
    }
    let mut gw = Gateway::start_with_tls(&a.gateway, &serve_args, a.tls.client()?)?;
    if gw.pid.is_none() {
        eprintln!(
            "switchboard-bench: warning: no --gateway-pid; the gateway's memory is not measured"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let mem_before = gw.pid.map(util::proc_mem).transpose()?;
    let slab_before = util::kernel_slab();
    let caches_before = util::slab_caches();

    // 3. Handshakes.
    let steps = usize::from(a.steps)
        .min(shards.iter().map(|s| s.1).min().unwrap_or(1))
        .max(1);
    eprintln!(
        "switchboard-bench: opening {} WebSocket connections to {} in {steps} step(s)",
        a.connections, gw.url
    );
    let mut workers = Fleet::new();
    // Workers give up on a silent coordinator after this long.
    let command_timeout = a.settle + a.clients.connect_timeout + Duration::from_secs(600);
    let mut extra = vec![
        "--steps".to_owned(),
        steps.to_string(),
        "--command-timeout".to_owned(),
        util::gateway_duration(command_timeout),
    ];
    extra.extend(a.tls.worker_args()?);
    let idxs = fleet::spawn_workers(
        &mut workers,
        "idle",
        gw.addr,
        &gw.url,
        &shards,
        &a.clients,
        &extra,
    )?;
    let mut totals = ConnectTotals::default();
    let mut time_s = 0.0;
    let mut checkpoints: Vec<Checkpoint> = mem_before
        .iter()
        .map(|m| Checkpoint {
            connections: 0,
            rss: m.rss,
        })
        .collect();
    let worker_pids: Vec<u32> = idxs.iter().map(|&i| workers.pid(i)).collect();
    let (mut gw_cpu, mut clients_cpu, mut gw_switches) = (Some(0.0), Some(0.0), Some(0.0));
    let mut ours_pids = worker_pids.clone();
    ours_pids.extend(gw.pid);
    let (mut other_busy, mut capacity) = (0.0, 0.0);
    for step in 0..steps {
        let switches0 = gw.pid.and_then(util::context_switches);
        let interference = util::Interference::start(util::cpu_of_all(&ours_pids));
        let cpu0 = (
            gw.pid.and_then(util::proc_cpu_s),
            util::cpu_of_all(&worker_pids),
        );
        let go = Instant::now();
        workers.send_each(&idxs, proto::GO)?;
        workers.collect(
            &idxs,
            go + a.clients.connect_timeout + Duration::from_secs(15),
            "connected",
            |i, r| totals.add(i, r),
        )?;
        time_s += go.elapsed().as_secs_f64();
        let cpu1 = (
            gw.pid.and_then(util::proc_cpu_s),
            util::cpu_of_all(&worker_pids),
        );
        let switches1 = gw.pid.and_then(util::context_switches);
        if let Some(share) = interference.and_then(|i| i.finish(util::cpu_of_all(&ours_pids))) {
            let phase = go.elapsed().as_secs_f64();
            other_busy += share * phase;
            capacity += phase;
        }
        gw_switches = gw_switches
            .zip(switches0.zip(switches1))
            .map(|(acc, (a, b))| acc + (b - a) as f64);
        gw_cpu = gw_cpu
            .zip(cpu0.0.zip(cpu1.0))
            .map(|(acc, (a, b))| acc + b - a);
        clients_cpu = clients_cpu
            .zip(cpu0.1.zip(cpu1.1))
            .map(|(acc, (a, b))| acc + b - a);
        gw.check_alive()?;
        if step + 1 < steps {
            std::thread::sleep(Duration::from_secs(1));
            if let Some(m) = gw.pid.map(util::proc_mem).transpose()? {
                checkpoints.push(Checkpoint {
                    connections: totals.ok,
                    rss: m.rss,
                });
            }
        }
    }
    let mem_connected = gw.pid.map(util::proc_mem).transpose()?;
    util::warn_interference(
        (capacity > 0.0).then(|| other_busy / capacity),
        "the handshakes",
        &mut warnings,
    );
    if let Some(m) = &mem_connected {
        checkpoints.push(Checkpoint {
            connections: totals.ok,
            rss: m.rss,
        });
    }
    let stats_open = gw.stats().transpose()?;
    if totals.failed > 0 {
        problems.push(format!(
            "{} of {} WebSocket connections failed; first error: {}",
            totals.failed,
            a.connections,
            totals.first_error.as_deref().unwrap_or("?")
        ));
    }
    let handshakes = Handshakes {
        connections: a.connections,
        connected: totals.ok,
        failed: totals.failed,
        first_error: totals.first_error.clone(),
        steps,
        time_s,
        handshakes_per_s: totals.ok as f64 / time_s,
        handshake_latency: totals.percentiles(),
        gateway_cpu_us_per_handshake: gw_cpu
            .filter(|_| totals.ok > 0)
            .map(|c| c * 1e6 / totals.ok as f64),
        clients_cpu_us_per_handshake: clients_cpu
            .filter(|_| totals.ok > 0)
            .map(|c| c * 1e6 / totals.ok as f64),
        other_cpu_share: (capacity > 0.0).then(|| other_busy / capacity),
        gateway_context_switches_per_handshake: gw_switches
            .filter(|_| totals.ok > 0)
            .map(|c| c / totals.ok as f64),
        gateway_connections: stats_open.as_ref().map(|s| s.connections),
    };

    // 4. Hold.
    eprintln!(
        "switchboard-bench: {} connections open; holding them idle for {:?}",
        totals.ok, a.settle
    );
    std::thread::sleep(a.settle);
    gw.check_alive()?;
    let mem_after = gw.pid.map(util::proc_mem).transpose()?;
    let slab_after = util::kernel_slab();
    let caches_after = util::slab_caches();
    let stats_held = gw.stats().transpose()?;
    if let Some(s) = &stats_held {
        if s.connections != totals.ok {
            problems.push(format!(
                "the gateway holds {} connections after the settle period, expected {}",
                s.connections, totals.ok
            ));
        }
    }

    // 5. Close.
    workers.send_each(&idxs, proto::CLOSE)?;
    let mut closes = CloseTotals::default();
    workers.collect(
        &idxs,
        Instant::now() + Duration::from_secs(60),
        "closed",
        |_, r| closes.add(r),
    )?;
    drop(workers);
    if closes.dropped > 0 {
        problems.push(format!(
            "{} connections ended during the hold; first: {}",
            closes.dropped,
            closes.first_drop.as_deref().unwrap_or("?")
        ));
    }
    if gw.service.is_some() && a.settle > a.ping_interval * 2 && closes.pings < totals.ok {
        problems.push(format!(
            "only {} pings seen by {} clients during the hold",
            closes.pings, totals.ok
        ));
    }
    // Let the gateway finish its connection tasks before the last readings.
    let mut stats_closed = None;
    if let Some(control) = gw.control {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = util::gateway_stats(control, gw.tls.as_ref())?;
            let done = s.connections == 0;
            stats_closed = Some(s);
            if done || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        std::thread::sleep(Duration::from_secs(2));
    }
    let mem_after_close = gw.pid.and_then(|p| util::proc_mem(p).ok());
    gw.stop();

    let memory = match (mem_before, mem_after) {
        (Some(before), Some(after)) if totals.ok > 0 => {
            let n = totals.ok as f64;
            let rss_per_conn = (after.rss as f64 - before.rss as f64) / n;
            Some(Memory {
                before,
                after,
                after_close: mem_after_close,
                idle_growth_per_conn: mem_connected.map(|c| (after.rss as f64 - c.rss as f64) / n),
                after_connect: mem_connected,
                rss_per_conn,
                anon_per_conn: (after.rss_anon as f64 - before.rss_anon as f64) / n,
                marginal_rss_per_conn: slope(&checkpoints),
                checkpoints,
                kernel_slab_per_conn: (slab_after as f64 - slab_before as f64) / n,
                kernel_slab_caches: util::slab_growth(&caches_before, &caches_after, totals.ok, 8),
                target_rss_per_conn: TARGET_RSS_PER_CONN,
                target_met: rss_per_conn <= TARGET_RSS_PER_CONN,
            })
        }
        _ => None,
    };
    let result = IdleResult {
        scenario: "idle",
        unix_time: util::unix_now(),
        machine,
        background_cpu_busy,
        connections: a.connections,
        workers: shards.len(),
        source_addrs: a.clients.source_addrs,
        concurrency: a.clients.concurrency,
        gateway_url: gw.url.clone(),
        tls: gw.tls.is_some(),
        gateway_command: gw.command.clone(),
        handshake_to_accept_ratio: tcp_baseline
            .as_ref()
            .filter(|t| t.accepts_per_s > 0.0)
            .map(|t| handshakes.handshakes_per_s / t.accepts_per_s),
        tcp_baseline,
        handshakes,
        hold: Hold {
            settle_s: a.settle.as_secs_f64(),
            gateway_connections: stats_held.map(|s| s.connections),
            pings: closes.pings,
            dropped: closes.dropped,
            first_drop: closes.first_drop,
            closed: closes.closed,
            gateway_connections_after_close: stats_closed.map(|s| s.connections),
            client_rss: totals.rss.values().sum(),
        },
        memory,
        problems,
        warnings,
    };
    print_table(&result);
    util::finish(&a.out, &result, result.problems.is_empty())
}

/// Runs the TCP baseline: the acceptor child and tcp-mode workers.
fn tcp_baseline(
    a: &IdleArgs,
    shards: &[(usize, usize)],
    problems: &mut Vec<String>,
) -> Result<TcpBaseline, String> {
    let mut fleet = Fleet::new();
    let acceptor = fleet.spawn(
        "acceptor",
        &[
            "acceptor".into(),
            "--expect".into(),
            a.connections.to_string(),
        ],
    )?;
    let mut addr = None;
    fleet.collect(
        &[acceptor],
        Instant::now() + Duration::from_secs(10),
        "listening",
        |_, r| match r {
            Report::Listening { addr: got } => {
                addr = Some(got);
                Ok(true)
            }
            other => Err(format!("unexpected report {other:?}")),
        },
    )?;
    let addr = addr.expect("collected");
    let workers = fleet::spawn_workers(&mut fleet, "tcp", addr, "", shards, &a.clients, &[])?;
    let worker_pids: Vec<u32> = workers.iter().map(|&i| fleet.pid(i)).collect();
    let acceptor_pid = fleet.pid(acceptor);
    let mut all_pids = worker_pids.clone();
    all_pids.push(acceptor_pid);
    let interference = util::Interference::start(util::cpu_of_all(&all_pids));
    let cpu0 = (
        util::proc_cpu_s(acceptor_pid),
        util::cpu_of_all(&worker_pids),
    );
    let go = Instant::now();
    fleet.send_each(&workers, proto::GO)?;
    let mut totals = ConnectTotals::default();
    let (mut accepted, mut span, mut accepted_at) = (0, 0.0, 0.0);
    let mut all = workers.clone();
    all.push(acceptor);
    fleet.collect(
        &all,
        go + a.clients.connect_timeout + Duration::from_secs(15),
        "connected",
        |idx, r| {
            if idx == acceptor {
                let Report::Accepted { count, span_s } = r else {
                    return Err(format!("unexpected report {r:?}"));
                };
                accepted_at = go.elapsed().as_secs_f64();
                accepted = count;
                span = span_s;
                Ok(true)
            } else {
                totals.add(idx, r)
            }
        },
    )?;
    let cpu1 = (
        util::proc_cpu_s(acceptor_pid),
        util::cpu_of_all(&worker_pids),
    );
    let other_cpu_share = interference.and_then(|i| i.finish(util::cpu_of_all(&all_pids)));
    fleet.send_each(&workers, proto::CLOSE)?;
    let mut closes = CloseTotals::default();
    fleet.collect(
        &workers,
        Instant::now() + Duration::from_secs(30),
        "closed",
        |_, r| closes.add(r),
    )?;
    if totals.failed > 0 || accepted < a.connections as u64 {
        problems.push(format!(
            "TCP baseline: {accepted} of {} accepted, {} client connects failed; first error: {}",
            a.connections,
            totals.failed,
            totals.first_error.as_deref().unwrap_or("-")
        ));
    }
    Ok(TcpBaseline {
        connections: a.connections,
        accepted,
        failed: totals.failed,
        time_s: accepted_at,
        accepts_per_s: if accepted_at > 0.0 {
            accepted as f64 / accepted_at
        } else {
            0.0
        },
        acceptor_span_s: span,
        connect_latency: totals.percentiles(),
        other_cpu_share,
        acceptor_cpu_us_per_accept: cpu0
            .0
            .zip(cpu1.0)
            .filter(|_| accepted > 0)
            .map(|(a, b)| (b - a) * 1e6 / accepted as f64),
        clients_cpu_us_per_conn: cpu0
            .1
            .zip(cpu1.1)
            .filter(|_| totals.ok > 0)
            .map(|(a, b)| (b - a) * 1e6 / totals.ok as f64),
    })
}

/// Least-squares slope of RSS over connections, leaving out the reading at
/// zero connections when at least two others exist (`None` with fewer than
/// two distinct connection counts).
fn slope(points: &[Checkpoint]) -> Option<f64> {
    let open: Vec<Checkpoint> = points
        .iter()
        .copied()
        .filter(|p| p.connections > 0)
        .collect();
    let points = if open.len() >= 2 { &open[..] } else { points };
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.connections as f64).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.rss as f64).sum::<f64>() / n;
    let sxx: f64 = points
        .iter()
        .map(|p| (p.connections as f64 - mean_x).powi(2))
        .sum();
    let sxy: f64 = points
        .iter()
        .map(|p| (p.connections as f64 - mean_x) * (p.rss as f64 - mean_y))
        .sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn cpu_pair(a: Option<f64>, b: Option<f64>) -> String {
    let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into());
    format!("{} / {} µs", f(a), f(b))
}

fn opt_count(v: Option<u64>) -> String {
    v.map(|c| c.to_string())
        .unwrap_or_else(|| "n/a (no --control)".into())
}

fn print_table(r: &IdleResult) {
    let mut t = Table::default();
    t.section(&format!(
        "idle: {} {}connections, {} client processes, {} source addresses",
        r.connections,
        if r.tls { "TLS " } else { "" },
        r.workers,
        r.source_addrs
    ));
    if let Some(b) = &r.tcp_baseline {
        t.section("raw TCP accept (plain tokio accept loop)");
        tcp_baseline_rows(&mut t, b);
    }
    let h = &r.handshakes;
    t.section(if r.tls {
        "TLS + WebSocket handshakes (gateway)"
    } else {
        "WebSocket handshakes (gateway)"
    });
    t.row(
        "connected",
        format!("{} of {} ({} failed)", h.connected, h.connections, h.failed),
    );
    t.row("time to N", format!("{:.3} s", h.time_s));
    t.row("handshake rate", format!("{:.0} /s", h.handshakes_per_s));
    if let Some(ratio) = r.handshake_to_accept_ratio {
        t.row("handshake / accept rate", format!("{:.1} %", ratio * 100.0));
    }
    t.row(
        "handshake latency p50 / p99 / max",
        format!(
            "{:.2} / {:.2} / {:.2} ms",
            h.handshake_latency.p50_ms, h.handshake_latency.p99_ms, h.handshake_latency.max_ms
        ),
    );
    t.row("gateway connections", opt_count(h.gateway_connections));
    t.row(
        "CPU per handshake: gateway / clients",
        cpu_pair(
            h.gateway_cpu_us_per_handshake,
            h.clients_cpu_us_per_handshake,
        ),
    );
    if let Some(o) = h.other_cpu_share {
        t.row("other processes' CPU share", format!("{:.0} %", o * 100.0));
    }
    if let Some(c) = h.gateway_context_switches_per_handshake {
        t.row("gateway context switches per handshake", format!("{c:.2}"));
    }
    t.section("hold");
    t.row("settle", format!("{:.1} s", r.hold.settle_s));
    t.row(
        "gateway connections after settle",
        opt_count(r.hold.gateway_connections),
    );
    t.row("pings answered by clients", r.hold.pings.to_string());
    t.row("dropped during hold", r.hold.dropped.to_string());
    t.row("closed gracefully", r.hold.closed.to_string());
    t.row(
        "gateway connections after close",
        opt_count(r.hold.gateway_connections_after_close),
    );
    t.row("client workers RSS", human_bytes(r.hold.client_rss as f64));
    if let Some(m) = &r.memory {
        t.section("gateway memory (VmRSS)");
        t.row("before", human_bytes(m.before.rss as f64));
        if let Some(c) = &m.after_connect {
            t.row("after connecting", human_bytes(c.rss as f64));
        }
        t.row(
            "after settle",
            format!(
                "{} (peak {})",
                human_bytes(m.after.rss as f64),
                human_bytes(m.after.hwm as f64)
            ),
        );
        if let Some(c) = &m.after_close {
            t.row("after close", human_bytes(c.rss as f64));
        }
        t.row("RSS per connection", format!("{:.0} B", m.rss_per_conn));
        if let Some(g) = m.idle_growth_per_conn {
            t.row("  of which grown while idle", format!("{g:.0} B"));
        }
        t.row("  of which anonymous", format!("{:.0} B", m.anon_per_conn));
        if m.checkpoints.len() > 2 {
            let cps: Vec<String> = m
                .checkpoints
                .iter()
                .map(|c| format!("{}: {}", c.connections, human_bytes(c.rss as f64)))
                .collect();
            t.row("checkpoints", cps.join(", "));
            if let Some(s) = m.marginal_rss_per_conn {
                t.row(
                    "marginal RSS per connection",
                    format!("{s:.0} B (slope after the first step)"),
                );
                if let Some(g) = m.idle_growth_per_conn {
                    t.row("marginal + grown while idle", format!("{:.0} B", s + g));
                }
            }
        }
        t.row(
            "target",
            format!(
                "<= {:.0} B: {}",
                m.target_rss_per_conn,
                if m.target_met { "met" } else { "NOT met" }
            ),
        );
        t.row(
            "kernel slab per connection",
            format!(
                "{:.0} B (both socket ends, machine-wide)",
                m.kernel_slab_per_conn
            ),
        );
        if !m.kernel_slab_caches.is_empty() {
            let caches: Vec<String> = m
                .kernel_slab_caches
                .iter()
                .map(|(name, b)| format!("{name} {b:.0}"))
                .collect();
            t.row("  largest slab caches (B/conn)", caches.join(", "));
        }
    }
    t.problems(&r.problems, &r.warnings);
    t.print();
}

/// The table rows of a raw TCP accept measurement.
fn tcp_baseline_rows(t: &mut Table, b: &TcpBaseline) {
    t.row("accepted", format!("{} of {}", b.accepted, b.connections));
    t.row("time to N", format!("{:.3} s", b.time_s));
    t.row("accept rate", format!("{:.0} /s", b.accepts_per_s));
    t.row(
        "CPU per accept / per client connect",
        cpu_pair(b.acceptor_cpu_us_per_accept, b.clients_cpu_us_per_conn),
    );
    t.row(
        "connect latency p50 / p99",
        format!(
            "{:.2} / {:.2} ms",
            b.connect_latency.p50_ms, b.connect_latency.p99_ms
        ),
    );
    if let Some(o) = b.other_cpu_share {
        t.row("other processes' CPU share", format!("{:.0} %", o * 100.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_fits_a_line() {
        let pts: Vec<Checkpoint> = (0..5)
            .map(|i| Checkpoint {
                connections: i * 1000,
                rss: 6_000_000 + i * 1000 * 1500,
            })
            .collect();
        assert!((slope(&pts).unwrap() - 1500.0).abs() < 1e-6);
        assert_eq!(slope(&pts[..1]), None);
        // One-time costs in the first step do not bend the slope.
        let mut fixed = pts.clone();
        fixed[0].rss -= 3_000_000;
        assert!((slope(&fixed).unwrap() - 1500.0).abs() < 1e-6);
        // Two readings: the plain difference.
        assert!((slope(&[fixed[0], fixed[4]]).unwrap() - 2250.0).abs() < 1e-6);
    }
}
