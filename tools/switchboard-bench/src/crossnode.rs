//! The `cross-node` scenario: control API commands sent through node `a` of
//! a cluster (over NATS, or Redis with `--bus redis`) to connections held by
//! the other nodes, beside the same commands with every connection on `a`.
//!
//! The tool starts nats-server (monitoring on), the echo origin with
//! `--greet` (every client's first message is its connection id) and
//! `--nodes` gateways joined through NATS. Two setups: *cross-node*
//! (`--clients` spread over the nodes other than `a`) and *single-node* (all
//! on `a`); in each, two phases of warm-up then a measured window:
//!
//! * single sends: `--callers` callers, each in a loop of
//!   `POST /v1/connections/{id}/messages` to a random client;
//! * batch sends: `--batch-callers` callers, each in a loop of
//!   `POST /v1/messages` with one message to every client.
//!
//! Latency is from the call's start (stamped in the message) to the
//! client's receipt; for a batch, to the last client's. Each phase also
//! reports the HTTP answer time, the CPU of the nodes and nats-server per
//! command, and the NATS messages per command (`/varz`, less the background
//! counted in a quiet window first). Every delivery the API accepted must
//! arrive.

use crate::engine::{share_concurrency, stamp, Fleet, Mode};
use crate::measure::{self, unix_nanos, CpuMeter, Percentiles, Table};
use crate::servers::{echo_origin, Api, Bus, Callers, Cluster};
use crate::Opts;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `cross-node`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Receive-only clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Gateway nodes (at least 2).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=26))]
    nodes: u8,
    /// Callers of single sends.
    #[arg(long, default_value_t = 16)]
    callers: u64,
    /// Callers of batch sends.
    #[arg(long, default_value_t = 1)]
    batch_callers: u64,
    /// Single sends per second over all callers (default: back to back).
    #[arg(long)]
    rate: Option<f64>,
    /// Batch sends per second (default: back to back).
    #[arg(long)]
    batch_rate: Option<f64>,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Warm-up of each phase.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Measured window of each phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Quiet window counting NATS background traffic.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    quiet: Duration,
    /// Run nats-server with JetStream.
    #[arg(long)]
    jetstream: bool,
    /// What joins the nodes.
    #[arg(long, value_enum, default_value = "nats")]
    bus: Bus,
}

/// Phases, as stamped.
const WARMUP: u8 = b'w';
const SINGLE: u8 = b's';
const BATCH: u8 = b'b';

/// One control call: phase, when it started (ns), answer time (µs), accepted.
type Call = (u8, u64, bool);

/// The row naming what the broker counts per command.
fn bus_label(cluster: &Cluster) -> &'static str {
    match cluster.broker_name() {
        "redis-server" => "— Redis commands per command (in; out not counted)",
        _ => "— NATS messages per command in / out",
    }
}

/// Runs the scenario; `Ok(false)` if the measurement is invalid.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    let api = Api::new();
    let (_origin, origin) = echo_origin(true).await?;
    let serve = ["--origin".to_owned(), format!("http://{origin}/events")];
    let cluster = Cluster::start_on(opts, a.bus, usize::from(a.nodes), a.jetstream, &serve).await?;
    let nats_pid = cluster.broker_pid();
    let m0 = cluster.bus_msgs(&api).await?;
    tokio::time::sleep(a.quiet).await;
    let m1 = cluster.bus_msgs(&api).await?;
    let q = a.quiet.as_secs_f64();
    let background = ((m1.0 - m0.0) as f64 / q, (m1.1 - m0.1) as f64 / q);

    let mut problems = Vec::new();
    let mut results = Vec::new();
    let mut t = Table::default();
    for setup in ["cross-node", "single-node"] {
        let targets: Vec<_> = if setup == "cross-node" {
            cluster.nodes[1..].iter().collect()
        } else {
            vec![&cluster.nodes[0]; 2]
        };
        // Two client processes in either setup: equal client capacity.
        let mut configs = Vec::new();
        for (k, node) in targets.iter().enumerate() {
            let n = targets.len();
            let share = a.clients * (k + 1) / n - a.clients * k / n;
            let mode = Mode::Receive {
                subscribe: None,
                greeting: true,
            };
            configs.extend(opts.workers_for(node, share, 1, None, mode));
        }
        share_concurrency(&mut configs, opts.concurrency);
        let mut fleet = Fleet::spawn(&configs)?;
        let c = fleet.connect(opts.connect_timeout).await?;
        if c.open < a.clients {
            problems.push(format!(
                "{setup}: {} clients failed: {:?}",
                c.failed, c.first_error
            ));
        }
        let ids: Arc<Vec<String>> = Arc::new(c.ids.concat());
        if ids.is_empty() {
            return Err(format!("{setup}: no client connected: {:?}", c.first_error));
        }
        let control = cluster.nodes[0].control.expect("spawned");
        let mut pids = cluster.node_pids();
        pids.extend(nats_pid);
        let mut phases = Vec::new();
        for (phase, callers, rate) in [
            (SINGLE, a.callers, a.rate),
            (BATCH, a.batch_callers, a.batch_rate),
        ] {
            let t0 = Instant::now() + Duration::from_millis(100);
            let window = t0 + a.warmup;
            let end = window + a.duration;
            let from_ns = unix_nanos() + 100_000_000 + a.warmup.as_nanos() as u64;
            let (api2, ids2, size) = (api.clone(), ids.clone(), a.size);
            let calls = Callers::start(callers, rate, t0, end, move |seq| {
                let (api, ids) = (api2.clone(), ids2.clone());
                async move { call(&api, control, &ids, phase, from_ns, seq, size).await }
            });
            tokio::time::sleep_until(window.into()).await;
            let n0 = cluster.bus_msgs(&api).await?;
            let cpu = CpuMeter::start(vec![("nodes + broker", pids.clone())]);
            tokio::time::sleep_until(end.into()).await;
            let all_cores = cpu.cores();
            let cores = measure::cores_of(&all_cores, "nodes + broker");
            let n1 = cluster.bus_msgs(&api).await?;
            let (calls, skipped) = calls.join().await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let receipts = fleet.receipts(phase).await?;
            let measured: Vec<&Call> = calls.iter().filter(|c| c.0 == phase).collect();
            let ok = measured.iter().filter(|c| c.2).count() as u64;
            let mut answers = measure::histogram();
            measured.iter().for_each(|c| answers.saturating_record(c.1));
            let mut all = measure::histogram();
            let mut last = std::collections::BTreeMap::<u64, u64>::new();
            let mut received = 0;
            for r in &receipts {
                measure::add_buckets(&mut all, &r.latency);
                for &(seq, n, us) in &r.per_message {
                    received += n;
                    let l = last.entry(seq).or_default();
                    *l = (*l).max(us);
                }
            }
            let mut last_h = measure::histogram();
            last.values()
                .for_each(|&us| last_h.saturating_record(us.max(1)));
            let expected = if phase == SINGLE {
                ok
            } else {
                ok * c.open as u64
            };
            if received < expected {
                problems.push(format!(
                    "{setup} {}: {} of {expected} deliveries missing",
                    phase as char,
                    expected - received
                ));
            }
            if measured.len() as u64 > ok {
                problems.push(format!(
                    "{setup}: {} commands failed",
                    measured.len() as u64 - ok
                ));
            }
            let secs = a.duration.as_secs_f64();
            let per_cmd = |d: u64, bg: f64| (d as f64 - bg * secs) / ok.max(1) as f64;
            let latency = if phase == SINGLE {
                Percentiles::of(&all)
            } else {
                Percentiles::of(&last_h)
            };
            let name = if phase == SINGLE {
                "single sends"
            } else {
                "batch sends"
            };
            let rate_done = ok as f64 / secs;
            t.row(
                format!("{setup}: {name}/s ({callers} callers)"),
                format!("{rate_done:.0} ({skipped} slots skipped)"),
            );
            t.row(
                "— call start → receipt p50 / p99 / p99.9 / max",
                latency.brief(),
            );
            t.row("— HTTP answer p50 / p99", {
                let p = Percentiles::of(&answers);
                format!("{:.2} / {:.2} ms", p.p50, p.p99)
            });
            t.row(
                "— CPU of nodes + broker per command",
                format!("{:.1} µs", cores * secs / ok.max(1) as f64 * 1e6),
            );
            t.row(
                "— CPU: nodes + broker / tool / others",
                format!(
                    "{cores:.2} / {:.2} / {:.2} cores",
                    measure::cores_of(&all_cores, "tool"),
                    measure::cores_of(&all_cores, "others")
                ),
            );
            t.row(
                bus_label(&cluster),
                format!(
                    "{:.2} / {:.2}",
                    per_cmd(n1.0 - n0.0, background.0),
                    per_cmd(n1.1 - n0.1, background.1)
                ),
            );
            phases.push(json!({
                "phase": name,
                "callers": callers,
                "rate_asked": rate,
                "commands_per_second": rate_done,
                "skipped_slots": skipped,
                "failed": measured.len() as u64 - ok,
                "latency_ms": latency,
                "every_receipt_ms": Percentiles::of(&all),
                "answer_ms": Percentiles::of(&answers),
                "cpu_cores": all_cores,
                "nats_in_per_command": per_cmd(n1.0 - n0.0, background.0),
                "nats_out_per_command": per_cmd(n1.1 - n0.1, background.1),
            }));
        }
        fleet.close().await?;
        results.push(json!({ "setup": setup, "clients": c.open, "phases": phases }));
    }
    t.print(&format!(
        "cross-node: {} clients, {} nodes",
        a.clients, a.nodes
    ));
    measure::write_json(
        opts.json.as_deref(),
        &json!({
            "scenario": "cross-node",
            "machine": measure::machine(),
            "node_commands": cluster.nodes.iter().map(|n| n.command()).collect::<Vec<_>>(),
            "nats_background_per_second": background,
            "bus": cluster.broker_name(),
            "setups": results,
            "problems": problems,
        }),
    )?;
    Ok(crate::report_problems(&problems))
}

/// One control call: a single send to a pseudo-random client, or a batch
/// to all of them. Never fails (a failure is not accepted).
async fn call(
    api: &Api,
    control: std::net::SocketAddr,
    ids: &[String],
    kind: u8,
    from_ns: u64,
    seq: u64,
    size: usize,
) -> Call {
    let sent_ns = unix_nanos();
    let phase = if sent_ns < from_ns { WARMUP } else { kind };
    let text = stamp(phase, seq, sent_ns, size);
    let (url, body) = if kind == BATCH {
        let body = json!({"messages": [{"connection_ids": ids, "text": text}]});
        (format!("http://{control}/v1/messages"), body)
    } else {
        // A multiplicative hash spreads the numbers over the clients.
        let id = &ids[(seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % ids.len()];
        (
            format!("http://{control}/v1/connections/{id}/messages"),
            json!({"text": text}),
        )
    };
    let r = api.post(&url, body.to_string(), true).await;
    (
        phase,
        (unix_nanos() - sent_ns) / 1000,
        matches!(r, Ok(200..=299)),
    )
}
