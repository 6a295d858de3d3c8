//! The `idle` scenario: N WebSocket connections held idle on one gateway.
//!
//! 1. TCP baseline (unless `--no-tcp-baseline`): the hidden `acceptor` child
//!    runs a plain tokio accept loop; the same workers open N plain TCP
//!    connections to it. Rate = N / time from the command until the
//!    acceptor has accepted N; the acceptor's and the clients' CPU per
//!    accept are read over the same time.
//! 2. Floor (with `--floor`): the hidden `floor` child ([`crate::floor`]:
//!    blocking `accept`, `read`, `write` on as many threads as CPUs) takes
//!    the same N WebSocket connections from the same workers: the least a
//!    WebSocket handshake costs on this machine with these clients. Its
//!    rate is measured as the gateway's (step 3); the floor is then ended
//!    and its clients let go.
//! 3. The gateway is spawned (dev mode, pinging every `--ping-interval`) and
//!    its RSS read from `/proc/PID/status` after a second.
//! 4. The workers open N WebSocket connections. Rate = N / time until the
//!    last worker has all its connections open.
//! 5. The connections stay idle for `--hold`, answering the pings; the
//!    gateway must still count all of them. RSS per connection =
//!    (after the hold − before) / N.
//! 6. The clients close gracefully; the RSS after shows what is given back.
//!
//! With `--tls` the spawned gateway gets a certificate (the server crate's
//! test fixture by default; run from the workspace root), the clients do a
//! full TLS handshake before the WebSocket one, and the control API is read
//! over HTTPS; the TCP baseline stays plain (and `--floor` is refused).

use crate::engine::{Fleet, Mode};
use crate::floor::Floor;
use crate::measure::{self, human_bytes, Table};
use crate::servers::{Gateway, TlsArgs};
use crate::Opts;
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Options of `idle`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 19_000)]
    connections: usize,
    /// How long the connections stay idle before the memory reading.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Ping interval of the spawned gateway.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// Skip the raw TCP accept baseline.
    #[arg(long)]
    no_tcp_baseline: bool,
    /// Open the same connections to the floor server too (a minimal
    /// blocking WebSocket server, the `floor` module) and report the
    /// gateway's handshake rate as a share of its rate.
    #[arg(long)]
    floor: bool,
    /// Measure a running gateway at this URL (ws://127.0.0.1:PORT/) instead
    /// of spawning one.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Control listener of the --url gateway (for its connection count).
    #[arg(long, requires = "url")]
    control: Option<SocketAddr>,
    /// Process id of the --url gateway (for its memory and CPU).
    #[arg(long, requires = "url")]
    gateway_pid: Option<u32>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Runs the scenario; `Ok(false)` if the measurement is invalid.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    let n = a.connections;
    if a.floor && (a.tls.tls || a.url.is_some()) {
        // The floor speaks plain TCP; a share of its rate says something
        // only about a plain gateway this tool spawns in the same run.
        return Err("--floor: with a spawned plain gateway only (not --tls, not --url)".into());
    }
    let mut problems = Vec::new();
    let mut t = Table::default();
    let baseline = if a.no_tcp_baseline {
        None
    } else {
        let b = tcp_baseline(opts, n).await?;
        t.row(
            "raw TCP accepts (plain tokio loop)",
            format!("{:.0}/s ({n} in {:.2} s)", b.rate, b.seconds),
        );
        t.row(
            "CPU per raw accept: acceptor / clients",
            format!("{:.1} / {:.1} µs", b.server_us, b.clients_us),
        );
        Some(b)
    };
    let floor = if a.floor {
        let f = floor_handshakes(opts, n).await?;
        rate_rows(
            &mut t,
            [
                "WebSocket handshakes, floor (minimal server)",
                "floor handshakes / TCP accepts",
            ],
            (f.rate, f.open, f.seconds),
            baseline.as_ref(),
        );
        t.row(
            "floor CPU per handshake: server / clients",
            format!("{:.1} / {:.1} µs", f.server_us, f.clients_us),
        );
        Some(f)
    } else {
        None
    };

    let api = a.tls.api()?;
    let gw = match &a.url {
        Some(url) => Gateway::external(url, a.control)?,
        None => {
            let ping = humantime::format_duration(a.ping_interval).to_string();
            let args = a.tls.gateway_args(vec!["--ping-interval".into(), ping]);
            Gateway::spawn_with(opts, &args, &api).await?
        }
    };
    let pid = gw.pid().or(a.gateway_pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = |pid: Option<u32>| pid.and_then(measure::rss).unwrap_or(0) as f64;
    let before = rss(pid);

    let mut configs = opts.workers_for(&gw, n, 2, None, Mode::Idle);
    a.tls.apply(&mut configs);
    let mut fleet = Fleet::spawn(&configs)?;
    let cpu = measure::CpuMeter::start(vec![
        ("server", pid.into_iter().collect()),
        ("clients", fleet.pids()),
    ]);
    let c = fleet.connect(opts.connect_timeout).await?;
    let cpu = cpu.cores();
    let connected = rss(pid);
    if c.open < n {
        problems.push(format!(
            "{} of {n} connections failed; first: {}",
            c.failed,
            c.first_error.clone().unwrap_or_default()
        ));
    }
    let per_handshake_us = |cores: f64| us_per_connection(cores, c.seconds, c.open);
    rate_rows(
        &mut t,
        ["WebSocket handshakes", "handshakes / TCP accepts"],
        (c.rate, c.open, c.seconds),
        baseline.as_ref(),
    );
    if let Some(f) = &floor {
        t.row(
            "handshakes / floor handshakes",
            format!("{:.0} %", 100.0 * c.rate / f.rate),
        );
    }
    t.row(
        "handshake latency p50 / p99 / p99.9 / max",
        c.latency.brief(),
    );
    t.row(
        "CPU per handshake: server / clients",
        format!(
            "{:.1} / {:.1} µs",
            per_handshake_us(measure::cores_of(&cpu, "server")),
            per_handshake_us(measure::cores_of(&cpu, "clients"))
        ),
    );

    t.row(
        "CPU while connecting: server / clients / others",
        format!(
            "{:.2} / {:.2} / {:.2} cores",
            measure::cores_of(&cpu, "server"),
            measure::cores_of(&cpu, "clients"),
            measure::cores_of(&cpu, "others")
        ),
    );
    eprintln!(
        "switchboard-bench: holding {} connections for {:?}",
        c.open, a.hold
    );
    tokio::time::sleep(a.hold).await;
    let held = rss(pid);
    let counted = match gw.control {
        Some(control) => Some(api.connections(control).await?),
        None => None,
    };
    if counted.is_some_and(|k| k != c.open as u64) {
        problems.push(format!(
            "the gateway counts {counted:?} connections, {} open",
            c.open
        ));
    }
    let r = fleet.receipts(0).await?;
    let pings: u64 = r.iter().map(|r| r.pings).sum();
    let dropped: u64 = r.iter().map(|r| r.dropped).sum();
    if dropped > 0 {
        problems.push(format!(
            "{dropped} connections ended during the hold; first: {}",
            r.iter()
                .find_map(|r| r.first_drop.clone())
                .unwrap_or_default()
        ));
    }
    let clean = fleet.close().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let closed = rss(pid);

    let per_conn = (held - before) / c.open.max(1) as f64;
    t.row("server RSS empty", human_bytes(before));
    t.row("server RSS right after connecting", human_bytes(connected));
    t.row(
        format!("server RSS after {:?} idle", a.hold),
        human_bytes(held),
    );
    t.row("server RSS per connection", format!("{per_conn:.0} B"));
    t.row("server RSS after the close", human_bytes(closed));
    t.row("pings answered during the hold", pings.to_string());
    t.row("clean closes", format!("{clean} of {}", c.open));
    let tls = if a.tls.tls { " over TLS" } else { "" };
    t.print(&format!("idle: {n} connections{tls}, one server"));

    measure::write_json(
        opts.json.as_deref(),
        &json!({
            "scenario": "idle",
            "machine": measure::machine(),
            "gateway_command": gw.command(),
            "connections": n,
            "concurrency": opts.concurrency,
            "tls": a.tls.tls,
            "tcp_baseline": baseline.map(|b| json!({
                "rate": b.rate,
                "seconds": b.seconds,
                "cpu_us_per_accept": {"acceptor": b.server_us, "clients": b.clients_us},
            })),
            "floor": floor.map(|f| json!({
                "rate": f.rate,
                "seconds": f.seconds,
                "open": f.open,
                "cpu_us_per_handshake": {"server": f.server_us, "clients": f.clients_us},
            })),
            "handshakes": c,
            "cpu_cores_while_connecting": cpu,
            "rss": {"before": before, "connected": connected, "held": held, "closed": closed},
            "rss_per_connection": per_conn,
            "hold_seconds": a.hold.as_secs_f64(),
            "pings": pings,
            "clean_closes": clean,
            "problems": problems,
        }),
    )?;
    Ok(crate::report_problems(&problems))
}

/// The raw TCP accept rate: the acceptor child and the same workers in TCP
/// mode (`server_us`: the acceptor's CPU per accept).
async fn tcp_baseline(opts: &Opts, n: usize) -> Result<Phase, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut acceptor = tokio::process::Command::new(exe)
        .args(["acceptor", &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the acceptor: {e}"))?;
    let mut lines = BufReader::new(acceptor.stdout.take().expect("piped")).lines();
    let next = async |lines: &mut tokio::io::Lines<_>| {
        tokio::time::timeout(opts.connect_timeout, lines.next_line())
            .await
            .ok()
            .and_then(|l| l.ok().flatten())
            .ok_or_else(|| "the acceptor did not answer".to_owned())
    };
    let addr: SocketAddr = next(&mut lines)
        .await?
        .parse()
        .map_err(|_| "acceptor address")?;
    let gw = Gateway {
        addr,
        target: format!("{addr}/"),
        control: None,
        proc: None,
    };
    let mut fleet = Fleet::spawn(&opts.workers_for(&gw, n, 2, None, Mode::Tcp))?;
    let cpu = measure::CpuMeter::start(vec![
        ("server", acceptor.id().into_iter().collect()),
        ("clients", fleet.pids()),
    ]);
    let start = Instant::now();
    let c = fleet.connect(opts.connect_timeout).await?;
    if c.open < n {
        return Err(format!(
            "TCP baseline: {} connections failed: {:?}",
            c.failed, c.first_error
        ));
    }
    next(&mut lines).await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu.cores();
    fleet.close().await?;
    let per_accept_us = |group| us_per_connection(measure::cores_of(&cpu, group), secs, n);
    Ok(Phase {
        rate: n as f64 / secs,
        seconds: secs,
        open: n,
        server_us: per_accept_us("server"),
        clients_us: per_accept_us("clients"),
    })
}

/// The rows of a connect phase: its rate (per second, connections,
/// seconds), then its share of the raw TCP accept rate if measured.
fn rate_rows(t: &mut Table, labels: [&str; 2], phase: (f64, usize, f64), baseline: Option<&Phase>) {
    let (rate, open, seconds) = phase;
    t.row(labels[0], format!("{rate:.0}/s ({open} in {seconds:.2} s)"));
    if let Some(b) = baseline {
        t.row(labels[1], format!("{:.0} %", 100.0 * rate / b.rate));
    }
}

/// CPU time per connection of a connect phase, µs: the cores a group used
/// during its `seconds`, over its `n` connections.
fn us_per_connection(cores: f64, seconds: f64, n: usize) -> f64 {
    cores * seconds / n.max(1) as f64 * 1e6
}

/// A connect phase against a reference server: the raw TCP baseline
/// ([`tcp_baseline`]) or the floor ([`floor_handshakes`]).
#[derive(Debug)]
struct Phase {
    /// Connections per second.
    rate: f64,
    seconds: f64,
    open: usize,
    /// CPU of the server per connection, µs.
    server_us: f64,
    /// CPU of the clients per connection, µs.
    clients_us: f64,
}

/// The floor's handshake rate: the `floor` child and the same workers, in
/// the same mode as against the gateway. The floor is ended before its
/// clients close (it answers no close frame), so their closes are not
/// clean and not counted.
async fn floor_handshakes(opts: &Opts, n: usize) -> Result<Phase, String> {
    let floor = Floor::spawn(n).await?;
    let gw = Gateway::external(&floor.url, None)?;
    let mut fleet = Fleet::spawn(&opts.workers_for(&gw, n, 2, None, Mode::Idle))?;
    let cpu = measure::CpuMeter::start(vec![
        ("server", floor.pid().into_iter().collect()),
        ("clients", fleet.pids()),
    ]);
    let c = fleet.connect(opts.connect_timeout).await?;
    let cpu = cpu.cores();
    drop(floor);
    fleet.close().await?;
    if c.open < n {
        return Err(format!(
            "floor: {} of {n} connections failed; first: {:?}",
            c.failed, c.first_error
        ));
    }
    Ok(Phase {
        rate: c.rate,
        seconds: c.seconds,
        open: c.open,
        server_us: us_per_connection(measure::cores_of(&cpu, "server"), c.seconds, c.open),
        clients_us: us_per_connection(measure::cores_of(&cpu, "clients"), c.seconds, c.open),
    })
}

/// The hidden `acceptor` role: prints its address, accepts `expect`
/// connections and holds them, prints a line when it has them all, and
/// exits when its stdin closes.
pub(crate) fn run_acceptor(expect: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        // The same backlog request as the gateway's listener.
        let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        sock.bind(([127, 0, 0, 1], 0).into())
            .map_err(|e| e.to_string())?;
        let listener = sock.listen(65_535).map_err(|e| e.to_string())?;
        println!("{}", listener.local_addr().map_err(|e| e.to_string())?);
        let mut held = Vec::with_capacity(expect);
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        loop {
            tokio::select! {
                a = listener.accept() => {
                    if let Ok((s, _)) = a {
                        held.push(s);
                        if held.len() == expect {
                            println!("accepted");
                        }
                    }
                }
                l = stdin.next_line() => if !matches!(l, Ok(Some(_))) { return Ok(()) },
            }
        }
    })
}
