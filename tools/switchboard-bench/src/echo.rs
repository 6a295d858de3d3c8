//! The `echo` scenario: M clients, each in a loop of sending one message and
//! waiting for its echo: client → gateway → origin webhook (batched) → its
//! answer's replies → gateway → client, so the figures include the origin
//! round trip.
//!
//! All clients connect first; then every worker runs a warm-up and a
//! measured window from the same instant. A round trip counts when it
//! starts after the warm-up and ends inside the window; echoes are compared
//! byte for byte. CPU of the gateway and the origin over the whole run.

use crate::engine::{Cmd, Fleet, Mode, Report};
use crate::measure::{self, unix_nanos, Percentiles, Table};
use crate::servers::{echo_origin, Gateway};
use crate::Opts;
use serde_json::json;
use std::time::Duration;

/// Options of `echo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Clients, each with one message in flight.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Message size in bytes (text).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Warm-up before the window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

/// Runs the scenario; `Ok(false)` if the measurement is invalid.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    let (origin, origin_addr) = echo_origin(false).await?;
    let gw = Gateway::spawn(
        opts,
        &["--origin".into(), format!("http://{origin_addr}/events")],
    )
    .await?;
    let mut fleet = Fleet::spawn(&opts.workers_for(&gw, a.clients, 1, None, Mode::Echo(a.size)))?;
    let c = fleet.connect(opts.connect_timeout).await?;
    let mut problems = Vec::new();
    if c.open < a.clients {
        problems.push(format!("{} clients failed: {:?}", c.failed, c.first_error));
    }
    let start_ns = unix_nanos() + 100_000_000;
    let cpu_start = tokio::time::Instant::now() + Duration::from_millis(100) + a.warmup;
    fleet
        .send(&Cmd::Echo {
            start_ns,
            warmup_ms: a.warmup.as_millis() as u64,
            window_ms: a.duration.as_millis() as u64,
        })
        .await?;
    tokio::time::sleep_until(cpu_start).await;
    let cpu = measure::CpuMeter::start(vec![
        ("gateway", gw.pid().into_iter().collect()),
        ("origin", vec![origin.pid()]),
        ("clients", fleet.pids()),
    ]);
    tokio::time::sleep(a.duration).await;
    let cpu = cpu.cores();
    let limit = Duration::from_secs(10);
    let results = fleet
        .collect(limit, "the echo results", |r| match r {
            Report::Echoed {
                round_trips,
                latency,
                error,
            } => Some((round_trips, latency, error)),
            _ => None,
        })
        .await?;
    let mut h = measure::histogram();
    let mut round_trips = 0;
    for (n, lat, err) in results {
        round_trips += n;
        measure::add_buckets(&mut h, &lat);
        if let Some(e) = err {
            problems.push(format!("a client failed: {e}"));
        }
    }
    fleet.close().await?;
    let rate = round_trips as f64 / a.duration.as_secs_f64();
    let lat = Percentiles::of(&h);

    let mut t = Table::default();
    t.row("round trips", format!("{rate:.0}/s"));
    t.row("latency p50 / p99 / p99.9 / max", lat.brief());
    for (name, cores) in &cpu {
        t.row(format!("CPU: {name}"), format!("{cores:.2} cores"));
    }
    t.row(
        "gateway CPU per round trip",
        format!(
            "{:.1} µs",
            measure::cores_of(&cpu, "gateway") / rate.max(1e-9) * 1e6
        ),
    );
    t.print(&format!("echo: {} clients × {} B", a.clients, a.size));
    measure::write_json(
        opts.json.as_deref(),
        &json!({
            "scenario": "echo",
            "machine": measure::machine(),
            "gateway_command": gw.command(),
            "clients": a.clients,
            "size": a.size,
            "warmup_seconds": a.warmup.as_secs_f64(),
            "window_seconds": a.duration.as_secs_f64(),
            "round_trips_per_second": rate,
            "latency_ms": lat,
            "cpu_cores": cpu.iter().map(|(n, c)| (n.to_string(), *c)).collect::<std::collections::BTreeMap<_, _>>(),
            "problems": problems,
        }),
    )?;
    Ok(crate::report_problems(&problems))
}
