//! The `echo` scenario: M clients, each in a loop of sending one message and
//! waiting for its echo. A message goes client → gateway → origin webhook
//! (batched) → answer → gateway → client, so the figures include the origin
//! round trip.
//!
//! All clients connect first; then `run` starts the warmup and the measured
//! window in every worker at once. A round trip counts when it starts after
//! the warmup and ends inside the window. The gateway's and origin's CPU time
//! over the window is read from `/proc/PID/stat`.

use crate::fleet::{self, Fleet, Gateway, Service};
use crate::proto::{self, Report};
use crate::util::{self, human_bytes, parse_duration, Machine, Percentiles, Table};
use crate::{ClientOpts, GatewayOpts};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Options of `switchboard-bench echo`.
#[derive(Debug, Args)]
pub(crate) struct EchoArgs {
    /// Clients, each with one message in flight at a time.
    #[arg(long, default_value_t = 100, value_name = "M")]
    clients: usize,

    /// Message size in bytes.
    #[arg(long, default_value_t = 64, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(0..=1_048_000))]
    size: u32,

    /// Send binary messages (base64 in the origin's JSON) instead of text.
    #[arg(long)]
    binary: bool,

    /// The measured window.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    duration: Duration,

    /// Unmeasured time before the window (connections, caches, pools warm up).
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    warmup: Duration,

    /// Longest wait for one echo; a client that waits longer stops with an error.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    reply_timeout: Duration,

    /// Echo origin binary to spawn [default: `echo-origin` next to this
    /// binary, else target/release/echo-origin]. Not used with --url.
    #[arg(long, value_name = "PATH")]
    origin_bin: Option<PathBuf>,

    /// Process id of the origin behind the gateway given with --url, for its CPU time.
    #[arg(long, value_name = "PID", requires = "url")]
    origin_pid: Option<u32>,

    /// JSON result file.
    #[arg(long, default_value = "target/bench/echo.json", value_name = "FILE")]
    out: PathBuf,

    #[command(flatten)]
    clients_opts: ClientOpts,

    #[command(flatten)]
    gateway: GatewayOpts,
}

/// CPU use of one process over the measured window.
#[derive(Debug, Clone, Copy, Serialize)]
struct Cpu {
    /// CPU seconds (user + system) used in the window.
    seconds: f64,
    /// `seconds / window`: 1.0 is one core busy all the time.
    cores: f64,
}

/// The gateway's `events` requests to the origin over the window.
#[derive(Debug, Clone, Copy, Serialize)]
struct OriginRequests {
    /// Requests per second.
    per_s: f64,
    /// Events delivered per request (the batching the lanes achieved).
    events_per_request: f64,
    /// Mean request latency as the gateway saw it, milliseconds.
    mean_ms: f64,
}

/// The result file of `echo`.
#[derive(Debug, Serialize)]
struct EchoResult {
    scenario: &'static str,
    unix_time: u64,
    machine: Machine,
    /// Share of all CPUs busy (other processes) in the second before the run.
    background_cpu_busy: f64,
    clients: usize,
    connected: u64,
    workers: usize,
    size: u32,
    binary: bool,
    warmup_s: f64,
    duration_s: f64,
    gateway_url: String,
    gateway_command: Option<Vec<String>>,
    origin_command: Option<Vec<String>>,
    /// Round trips completed inside the window.
    round_trips: u64,
    /// Round trips per second (each is one message in and one out of the gateway).
    round_trips_per_s: f64,
    /// Payload bytes per second, both directions.
    payload_bytes_per_s: f64,
    /// Round-trip latency over the window.
    latency: Percentiles,
    /// Messages the gateway received in the window, per second (`/v1/stats`).
    gateway_messages_in_per_s: Option<f64>,
    /// The gateway's webhook requests to the origin over the window (`/metrics`).
    origin_requests: Option<OriginRequests>,
    gateway_cpu: Option<Cpu>,
    /// Gateway CPU time per round trip, microseconds.
    gateway_cpu_us_per_round_trip: Option<f64>,
    /// Context switches of the gateway's threads per round trip.
    gateway_context_switches_per_round_trip: Option<f64>,
    origin_cpu: Option<Cpu>,
    clients_cpu: Option<Cpu>,
    /// Share of the CPUs used by other processes during the window.
    other_cpu_share: Option<f64>,
    /// Gateway RSS at the end of the window, bytes.
    gateway_rss: Option<u64>,
    errors: u64,
    timeouts: u64,
    mismatches: u64,
    first_error: Option<String>,
    /// Anything that makes the figures doubtful (empty when all went well).
    problems: Vec<String>,
    /// Conditions that may have lowered the figures.
    warnings: Vec<String>,
}

/// Runs the scenario.
pub(crate) fn run(a: EchoArgs) -> Result<ExitCode, String> {
    if a.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if a.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    a.gateway.validate()?;
    let machine = util::machine();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let background_cpu_busy = util::background_busy(&mut warnings);

    // The origin and the gateway.
    let mut origin: Option<Service> = None;
    let mut origin_command = None;
    let mut serve_args = Vec::new();
    if a.gateway.url.is_none() {
        let bin = a
            .origin_bin
            .clone()
            .unwrap_or_else(|| util::sibling_bin("echo-origin"));
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], util::free_port()?).into();
        let args = vec!["--listen".to_owned(), addr.to_string()];
        let mut svc = Service::spawn("echo-origin", &bin, &args)?;
        util::wait_listening(addr, &mut svc.child, Duration::from_secs(15))?;
        let mut cmd = vec![bin.display().to_string()];
        cmd.extend(args);
        origin_command = Some(cmd);
        origin = Some(svc);
        serve_args.extend(["--origin".to_owned(), format!("http://{addr}/events")]);
    }
    let origin_pid = origin.as_ref().map(Service::pid).or(a.origin_pid);
    let mut gw = Gateway::start(&a.gateway, &serve_args)?;

    // Clients.
    let shards = fleet::shards(
        a.clients,
        a.clients_opts.per_process,
        a.clients_opts.workers,
        1,
    );
    let extra = {
        let mut e = vec![
            "--size".to_owned(),
            a.size.to_string(),
            "--warmup".into(),
            util::gateway_duration(a.warmup),
            "--duration".into(),
            util::gateway_duration(a.duration),
            "--reply-timeout".into(),
            util::gateway_duration(a.reply_timeout),
            "--command-timeout".into(),
            util::gateway_duration(a.clients_opts.connect_timeout + Duration::from_secs(600)),
        ];
        if a.binary {
            e.push("--binary".into());
        }
        e
    };
    let mut workers = Fleet::new();
    let idxs = fleet::spawn_workers(
        &mut workers,
        "echo",
        gw.addr,
        &gw.url,
        &shards,
        &a.clients_opts,
        &extra,
    )?;
    let worker_pids: Vec<u32> = idxs.iter().map(|&i| workers.pid(i)).collect();
    let go = Instant::now();
    workers.send_each(&idxs, proto::GO)?;
    let (mut connected, mut failed, mut first_connect_error) = (0, 0, None);
    workers.collect(
        &idxs,
        go + a.clients_opts.connect_timeout + Duration::from_secs(15),
        "connected",
        |_, r| {
            let Report::Connected {
                ok,
                failed: f,
                first_error,
                ..
            } = r
            else {
                return Err(format!("unexpected report {r:?}"));
            };
            connected += ok;
            failed += f;
            if first_connect_error.is_none() {
                first_connect_error = first_error;
            }
            Ok(true)
        },
    )?;
    if failed > 0 {
        problems.push(format!(
            "{failed} of {} clients could not connect; first error: {}",
            a.clients,
            first_connect_error.as_deref().unwrap_or("?")
        ));
    }
    eprintln!(
        "switchboard-bench: {connected} echo clients connected to {}; warmup {:?}, measuring {:?}",
        gw.url, a.warmup, a.duration
    );

    // Run: warmup, then the window, sampled from here.
    let cpu_of = |pid: Option<u32>| pid.and_then(util::proc_cpu_s);
    let clients_cpu = || util::cpu_of_all(&worker_pids);
    let run_at = Instant::now();
    workers.send_each(&idxs, proto::RUN)?;
    std::thread::sleep(a.warmup);
    let mut ours_pids = worker_pids.clone();
    ours_pids.extend(gw.pid);
    ours_pids.extend(origin_pid);
    let interference = util::Interference::start(util::cpu_of_all(&ours_pids));
    // CPU, gateway stats and origin counters, read at both ends of the window.
    let snapshot = || {
        (
            cpu_of(gw.pid),
            cpu_of(origin_pid),
            clients_cpu(),
            gw.stats().and_then(Result::ok),
            gw.control.and_then(|c| util::OriginCounters::read(c).ok()),
            gw.pid.and_then(util::context_switches),
        )
    };
    let start = snapshot();
    let window_start = Instant::now();
    std::thread::sleep((run_at + a.warmup + a.duration).saturating_duration_since(Instant::now()));
    let end = snapshot();
    let window = window_start.elapsed().as_secs_f64();
    let other_cpu_share = interference.and_then(|i| i.finish(util::cpu_of_all(&ours_pids)));
    util::warn_interference(other_cpu_share, "the measured window", &mut warnings);
    let gateway_rss = gw.pid.and_then(|p| util::proc_mem(p).ok()).map(|m| m.rss);
    gw.check_alive()?;

    let mut hist = util::new_histogram();
    let (mut round_trips, mut errors, mut timeouts, mut mismatches, mut first_error) =
        (0, 0, 0, 0, None);
    let mut measured_s: f64 = 0.0;
    let deadline = Instant::now() + a.reply_timeout + Duration::from_secs(30);
    workers.collect(&idxs, deadline, "results", |_, r| {
        let Report::EchoDone {
            round_trips: rt,
            errors: e,
            timeouts: t,
            mismatches: m,
            first_error: fe,
            latency_us,
            measured_s: ms,
            ..
        } = r
        else {
            return Err(format!("unexpected report {r:?}"));
        };
        round_trips += rt;
        errors += e;
        timeouts += t;
        mismatches += m;
        if first_error.is_none() {
            first_error = fe;
        }
        measured_s = measured_s.max(ms);
        util::add_buckets(&mut hist, &latency_us);
        Ok(true)
    })?;
    drop(workers);
    gw.stop();
    if let Some(o) = &mut origin {
        o.stop(Duration::from_secs(5));
    }

    if errors > 0 {
        problems.push(format!(
            "{errors} clients stopped on an error ({timeouts} timeouts, {mismatches} mismatches); first: {}",
            first_error.as_deref().unwrap_or("?")
        ));
    }
    let cpu = |s: Option<f64>, e: Option<f64>| match (s, e) {
        (Some(s), Some(e)) => Some(Cpu {
            seconds: e - s,
            cores: (e - s) / window,
        }),
        _ => None,
    };
    let rate = round_trips as f64 / measured_s.max(1e-9);
    let gateway_messages_in_per_s = match (&start.3, &end.3) {
        (Some(s), Some(e)) => Some((e.messages_in_total - s.messages_in_total) as f64 / window),
        _ => None,
    };
    let origin_requests = match (&start.4, &end.4) {
        (Some(s), Some(e)) if e.requests > s.requests => {
            let requests = e.requests - s.requests;
            Some(OriginRequests {
                per_s: requests / window,
                events_per_request: (e.events - s.events) / requests,
                mean_ms: (e.seconds - s.seconds) / requests * 1000.0,
            })
        }
        _ => None,
    };
    let per_round_trip =
        |v: f64| (round_trips > 0).then(|| v / round_trips as f64 * (measured_s / window));
    let gateway_cpu_us_per_round_trip =
        cpu(start.0, end.0).and_then(|c| per_round_trip(c.seconds * 1e6));
    let gateway_context_switches_per_round_trip = match (start.5, end.5) {
        (Some(s), Some(e)) => per_round_trip((e - s) as f64),
        _ => None,
    };
    let result = EchoResult {
        scenario: "echo",
        unix_time: util::unix_now(),
        machine,
        background_cpu_busy,
        clients: a.clients,
        connected,
        workers: shards.len(),
        size: a.size,
        binary: a.binary,
        warmup_s: a.warmup.as_secs_f64(),
        duration_s: a.duration.as_secs_f64(),
        gateway_url: gw.url.clone(),
        gateway_command: gw.command.clone(),
        origin_command,
        round_trips,
        round_trips_per_s: rate,
        payload_bytes_per_s: rate * 2.0 * f64::from(a.size),
        latency: util::percentiles(&hist),
        gateway_messages_in_per_s,
        origin_requests,
        gateway_cpu: cpu(start.0, end.0),
        gateway_cpu_us_per_round_trip,
        gateway_context_switches_per_round_trip,
        origin_cpu: cpu(start.1, end.1),
        clients_cpu: cpu(start.2, end.2),
        other_cpu_share,
        gateway_rss,
        errors,
        timeouts,
        mismatches,
        first_error,
        problems,
        warnings,
    };
    print_table(&result);
    util::finish(&a.out, &result, result.problems.is_empty())
}

fn print_table(r: &EchoResult) {
    let mut t = Table::default();
    t.section(&format!(
        "echo: {} clients ({} connected), {}-byte {} messages, {} client processes",
        r.clients,
        r.connected,
        r.size,
        if r.binary { "binary" } else { "text" },
        r.workers
    ));
    t.row(
        "warmup / window",
        format!("{:.1} s / {:.1} s", r.warmup_s, r.duration_s),
    );
    t.row("round trips", r.round_trips.to_string());
    t.row("round trips/s", format!("{:.0}", r.round_trips_per_s));
    t.row(
        "payload throughput",
        format!("{}/s (both directions)", human_bytes(r.payload_bytes_per_s)),
    );
    if let Some(g) = r.gateway_messages_in_per_s {
        t.row("gateway messages in/s (stats)", format!("{g:.0}"));
    }
    if let Some(o) = &r.origin_requests {
        t.row(
            "origin requests/s (events each, mean)",
            format!(
                "{:.0} ({:.1} events, {:.2} ms)",
                o.per_s, o.events_per_request, o.mean_ms
            ),
        );
    }
    let l = &r.latency;
    t.section("round-trip latency");
    t.row("mean", format!("{:.3} ms", l.mean_ms));
    t.row("p50", format!("{:.3} ms", l.p50_ms));
    t.row("p90", format!("{:.3} ms", l.p90_ms));
    t.row("p99", format!("{:.3} ms", l.p99_ms));
    t.row("p99.9", format!("{:.3} ms", l.p999_ms));
    t.row("max", format!("{:.3} ms", l.max_ms));
    t.section("CPU over the window (1.0 = one core)");
    let cores = |c: Option<Cpu>| {
        c.map(|c| format!("{:.2}", c.cores))
            .unwrap_or_else(|| "n/a".into())
    };
    t.row("gateway", cores(r.gateway_cpu));
    if let (Some(us), Some(cs)) = (
        r.gateway_cpu_us_per_round_trip,
        r.gateway_context_switches_per_round_trip,
    ) {
        t.row(
            "  per round trip",
            format!("{us:.1} µs CPU, {cs:.2} context switches"),
        );
    }
    t.row("echo origin", cores(r.origin_cpu));
    t.row("clients", cores(r.clients_cpu));
    if let Some(o) = r.other_cpu_share {
        t.row(
            "other processes",
            format!("{:.2}", o * r.machine.cpus as f64),
        );
    }
    if let Some(rss) = r.gateway_rss {
        t.row("gateway RSS", human_bytes(rss as f64));
    }
    t.row(
        "errors / timeouts / mismatches",
        format!("{} / {} / {}", r.errors, r.timeouts, r.mismatches),
    );
    t.problems(&r.problems, &r.warnings);
    t.print();
}
