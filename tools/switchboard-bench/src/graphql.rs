//! The `graphql` scenario: S GraphQL subscribers (`graphql-transport-ws`) on
//! one gateway, their memory, and the time a trigger takes to reach them
//! (docs/graphql.md).
//!
//! The tool runs the GraphQL-over-HTTP origin itself, in-process on a
//! thread of its own ([`Origin`]): it answers every subscription operation
//! with `{"data": {"value": N}, "extensions": {"switchboard": {"subscription":
//! {"triggers": ["bench"], "digest": "<variables.input>"}}}}`; a
//! re-execution (`extensions.switchboard.trigger` set) also gets a stamp in
//! its data (`"stamp": "~g<trigger time ns>:<N>~"`, see
//! [`crate::engine::stamp`]), so that each subscriber finds which trigger
//! a result answers and when it was sent. N is a counter the tool bumps
//! before each trigger. The origin counts initial requests, and
//! re-executions per N (with their digests and arrival times).
//!
//! 1. **Baseline** (unless `--no-baseline`): a gateway with the same flags
//!    and S plain idle WebSocket connections: RSS per connection as in
//!    `idle` ((after `--hold` − empty) / S).
//! 2. **Subscribe**: a fresh gateway with `--graphql-endpoint` at the
//!    origin; S clients (sharded over worker processes) do the WebSocket
//!    handshake offering `graphql-transport-ws`, `connection_init`, wait
//!    for `connection_ack`, `subscribe` with input `input-<k mod I>`, and
//!    are ready once their initial `next` came (the handshake latency is
//!    connect → initial result). After `--hold`: RSS per subscription, the
//!    same way; the gateway must count S connections, S operations and I
//!    digests (`/metrics`), the origin S initial requests.
//! 3. **Triggers**: K times, N is bumped and `POST /v1/graphql/triggers
//!    {"triggers": ["bench"]}` sent on the control API; the tool waits until
//!    every subscriber has the `next` of that N (at most
//!    `--trigger-timeout`), and at least `--trigger-interval` between
//!    triggers. Latency of a delivery: its receipt time − the time written
//!    just before the POST. Per trigger: the last delivery, and the origin's
//!    re-execution requests (exactly I expected, one per digest).
//!
//! Every phase is bounded; the gateways, workers and origin end with the run.

use crate::engine::{Fleet, Mode};
use crate::fanout::merge;
use crate::measure::{self, human_bytes, unix_nanos, CpuMeter, Percentiles, Table};
use crate::servers::{Api, Gateway};
use crate::Opts;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The trigger key every subscription depends on.
const TRIGGER: &str = "bench";

/// The phase of re-executed results, as stamped.
const PHASE: u8 = b'g';

/// The subprotocol the subscribers offer.
const SUBPROTOCOL: &str = "graphql-transport-ws";

/// Options of `graphql`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Subscribers (one connection and one subscription each). A gateway
    /// takes at most 17,824 clients under a 20,000 open-file limit
    /// (docs/operations.md, "Open files").
    #[arg(long, default_value_t = 17_500)]
    subscribers: usize,
    /// Distinct subscription inputs (digests); subscriber k has input k mod I.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    inputs: u64,
    /// Triggers published.
    #[arg(long, default_value_t = 20)]
    triggers: u64,
    /// Least time between triggers.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    trigger_interval: Duration,
    /// Longest wait for a trigger's result to reach every subscriber.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    trigger_timeout: Duration,
    /// How long the connections stay idle before the memory reading.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Ping interval of the spawned gateways.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// Skip the baseline of plain idle WebSocket connections.
    #[arg(long)]
    no_baseline: bool,
}

// === The origin ===

/// Re-executions the origin answered for one N.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct ReExecutions {
    requests: u64,
    digests: BTreeSet<String>,
    /// Arrival of the first and the last, Unix ns.
    first_ns: u64,
    last_ns: u64,
}

/// What the origin shares with the tool.
#[derive(Debug, Default)]
struct OriginState {
    /// N: the value results carry.
    value: AtomicU64,
    /// When trigger N was sent (Unix ns), for the stamp.
    sent_ns: AtomicU64,
    /// Requests without `extensions.switchboard.trigger`.
    initial: AtomicU64,
    /// Requests that were not a subscription with `variables.input`.
    bad: AtomicU64,
    /// Re-executions per N.
    re: Mutex<BTreeMap<u64, ReExecutions>>,
}

/// The GraphQL-over-HTTP origin: axum on a thread of its own (a
/// current-thread runtime), stopped when dropped.
#[derive(Debug)]
struct Origin {
    state: Arc<OriginState>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Origin {
    fn start() -> Result<Self, String> {
        let state = Arc::new(OriginState::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("GraphQL origin: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new()
            .route("/graphql", axum::routing::post(answer))
            .with_state(state.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let thread = std::thread::Builder::new()
            .name("graphql-origin".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            state,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn url(&self) -> String {
        format!("http://{}/graphql", self.addr)
    }

    fn re_executions(&self) -> BTreeMap<u64, ReExecutions> {
        self.state.re.lock().expect("not poisoned").clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one GraphQL request.
async fn answer(State(st): State<Arc<OriginState>>, body: Bytes) -> Response {
    let now = unix_nanos();
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let Some(input) = v["variables"]["input"].as_str().filter(|_| {
        v["query"]
            .as_str()
            .is_some_and(|q| q.contains("subscription"))
    }) else {
        st.bad.fetch_add(1, Relaxed);
        let errors = json!({"errors": [{"message": "not the bench's subscription"}]});
        return (StatusCode::BAD_REQUEST, axum::Json(errors)).into_response();
    };
    let n = st.value.load(Relaxed);
    let ext = json!({"switchboard": {"subscription": {"triggers": [TRIGGER], "digest": input}}});
    let answer = if v["extensions"]["switchboard"]["trigger"].is_string() {
        {
            let mut re = st.re.lock().expect("not poisoned");
            let r = re.entry(n).or_default();
            r.requests += 1;
            r.digests.insert(input.to_owned());
            r.first_ns = if r.first_ns == 0 {
                now
            } else {
                r.first_ns.min(now)
            };
            r.last_ns = r.last_ns.max(now);
        }
        let stamp = crate::engine::stamp(PHASE, n, st.sent_ns.load(Relaxed), 0);
        json!({"data": {"value": n, "stamp": stamp}, "extensions": ext})
    } else {
        st.initial.fetch_add(1, Relaxed);
        json!({"data": {"value": n}, "extensions": ext})
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        answer.to_string(),
    )
        .into_response()
}

// === The scenario ===

/// A gateway's memory with S idle clients.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Held {
    open: usize,
    rss_empty: f64,
    rss_connected: f64,
    rss_held: f64,
    per_client: f64,
}

/// The gateway flags of both runs.
fn gateway_args(a: &Args, origin: &Origin) -> Vec<String> {
    vec![
        "--ping-interval".into(),
        humantime::format_duration(a.ping_interval).to_string(),
        "--graphql-endpoint".into(),
        origin.url(),
    ]
}

/// Runs the scenario; `Ok(false)` if the measurement is invalid.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    let s = a.subscribers;
    let inputs = a.inputs as usize;
    let api = Api::new();
    let mut problems = Vec::new();
    let origin = Origin::start()?;
    let args = gateway_args(&a, &origin);
    let rss = |pid: Option<u32>| pid.and_then(measure::rss).unwrap_or(0) as f64;

    // 1. Baseline: plain idle WebSocket connections.
    let baseline = if a.no_baseline {
        None
    } else {
        let gw = Gateway::spawn(opts, &args).await?;
        let pid = gw.pid();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut h = Held {
            rss_empty: rss(pid),
            ..Held::default()
        };
        let mut fleet = Fleet::spawn(&opts.workers_for(&gw, s, 2, None, Mode::Idle))?;
        eprintln!("switchboard-bench: baseline: opening {s} plain WebSocket connections");
        let c = fleet.connect(opts.connect_timeout).await?;
        h.open = c.open;
        h.rss_connected = rss(pid);
        if c.open < s {
            problems.push(format!(
                "baseline: {} of {s} connections failed; first: {}",
                c.failed,
                c.first_error.clone().unwrap_or_default()
            ));
        }
        eprintln!("switchboard-bench: baseline: holding for {:?}", a.hold);
        tokio::time::sleep(a.hold).await;
        h.rss_held = rss(pid);
        let counted = api.connections(gw.control.ok_or("no control")?).await?;
        if counted != c.open as u64 {
            problems.push(format!(
                "baseline: the gateway counts {counted} connections, {} open",
                c.open
            ));
        }
        let dropped: u64 = fleet.receipts(0).await?.iter().map(|r| r.dropped).sum();
        if dropped > 0 {
            problems.push(format!(
                "baseline: {dropped} connections ended during the hold"
            ));
        }
        h.per_client = (h.rss_held - h.rss_empty) / c.open.max(1) as f64;
        fleet.close().await?;
        drop(fleet);
        drop(gw);
        Some(h)
    };

    // 2. Subscribers.
    let gw = Gateway::spawn(opts, &args).await?;
    let pid = gw.pid();
    let control = gw.control.ok_or("no control listener")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut held = Held {
        rss_empty: rss(pid),
        ..Held::default()
    };
    let mode = Mode::Graphql { inputs };
    let mut fleet = Fleet::spawn(&opts.workers_for(&gw, s, 2, Some(SUBPROTOCOL), mode))?;
    let groups = |pid: Option<u32>, workers: Vec<u32>| {
        vec![("server", pid.into_iter().collect()), ("clients", workers)]
    };
    eprintln!("switchboard-bench: graphql: opening {s} subscriptions over {inputs} inputs");
    let cpu = CpuMeter::start(groups(pid, fleet.pids()));
    let c = fleet.connect(opts.connect_timeout).await?;
    let subscribe_cpu = cpu.cores();
    held.open = c.open;
    held.rss_connected = rss(pid);
    if c.open < s {
        problems.push(format!(
            "{} of {s} subscriptions failed; first: {}",
            c.failed,
            c.first_error.clone().unwrap_or_default()
        ));
    }
    eprintln!("switchboard-bench: graphql: holding for {:?}", a.hold);
    tokio::time::sleep(a.hold).await;
    held.rss_held = rss(pid);
    held.per_client = (held.rss_held - held.rss_empty) / c.open.max(1) as f64;
    let counted = api.connections(control).await?;
    if counted != c.open as u64 {
        problems.push(format!(
            "the gateway counts {counted} connections, {} subscribed",
            c.open
        ));
    }
    let metrics = api.get(control, "/metrics").await?;
    let gauge = |name: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    let (operations, digests) = (
        gauge("switchboard_graphql_operations"),
        gauge("switchboard_graphql_digests"),
    );
    if operations != Some(c.open as f64) || digests != Some(inputs.min(c.open) as f64) {
        problems.push(format!(
            "the gateway has {operations:?} operations and {digests:?} digests, \
             {} subscriptions over {inputs} inputs expected",
            c.open
        ));
    }
    let initial_requests = origin.state.initial.load(Relaxed);
    if initial_requests != c.open as u64 {
        problems.push(format!(
            "the origin answered {initial_requests} initial requests for {} subscriptions",
            c.open
        ));
    }

    // 3. Triggers.
    let url = format!("http://{control}/v1/graphql/triggers");
    let body = json!({"triggers": [TRIGGER]}).to_string();
    let mut answers = measure::histogram();
    let mut sent_at: BTreeMap<u64, u64> = BTreeMap::new();
    let mut timed_out = 0;
    let cpu = CpuMeter::start(groups(pid, fleet.pids()));
    for n in 1..=a.triggers {
        let started = Instant::now();
        let t0 = unix_nanos();
        origin.state.sent_ns.store(t0, Relaxed);
        origin.state.value.store(n, Relaxed);
        sent_at.insert(n, t0);
        match api.post(&url, body.clone(), true).await {
            Ok(202) => {}
            other => problems.push(format!("trigger {n}: {other:?}")),
        }
        answers.saturating_record((unix_nanos() - t0) / 1000);
        let deadline = started + a.trigger_timeout;
        let mut reached = 0;
        while reached < fleet.len() {
            match fleet.next(deadline).await? {
                Some((_, crate::engine::Report::Reached(PHASE, k))) if k == n => reached += 1,
                Some(_) => {}
                None => {
                    timed_out += 1;
                    break;
                }
            }
        }
        tokio::time::sleep_until((started + a.trigger_interval).into()).await;
    }
    let trigger_cpu = cpu.cores();
    let trigger_secs = cpu.seconds();
    let r = fleet.receipts(PHASE).await?;
    let merged = merge(&r);
    let all = Percentiles::of(&merged.all);
    let last = Percentiles::of(&merged.last);
    let live = c.open as u64;
    let missing = (a.triggers * live).saturating_sub(merged.receipts);
    if missing > 0 {
        problems.push(format!(
            "{missing} deliveries missing ({timed_out} triggers timed out)"
        ));
    }
    let dropped: u64 = r.iter().map(|r| r.dropped).sum();
    if dropped > 0 {
        problems.push(format!(
            "{dropped} subscribers' connections ended; first: {}",
            r.iter()
                .find_map(|r| r.first_drop.clone())
                .unwrap_or_default()
        ));
    }
    let re = origin.re_executions();
    let mut to_first = measure::histogram();
    let mut to_last = measure::histogram();
    let mut per_trigger = Vec::new();
    for n in 1..=a.triggers {
        let e = re.get(&n).cloned().unwrap_or_default();
        let t0 = sent_at[&n];
        if e.requests > 0 {
            to_first.saturating_record(e.first_ns.saturating_sub(t0) / 1000);
            to_last.saturating_record(e.last_ns.saturating_sub(t0) / 1000);
        }
        if e.requests != a.inputs || e.digests.len() != inputs {
            problems.push(format!(
                "trigger {n}: {} origin requests for {} digests, {inputs} expected",
                e.requests,
                e.digests.len()
            ));
        }
        let got = merged.per_message.get(&n).copied().unwrap_or(0);
        if got > live {
            problems.push(format!(
                "trigger {n}: {got} deliveries to {live} subscribers"
            ));
        }
        per_trigger.push(json!({
            "n": n,
            "origin_requests": e.requests,
            "digests": e.digests.len(),
            "deliveries": got,
        }));
    }
    let stray: u64 = re
        .iter()
        .filter(|(n, _)| **n == 0 || **n > a.triggers)
        .map(|(_, e)| e.requests)
        .sum();
    let bad = origin.state.bad.load(Relaxed);
    if stray + bad > 0 {
        problems.push(format!(
            "the origin got {stray} re-executions outside the triggers and {bad} bad requests"
        ));
    }
    let requests_per_trigger: u64 = re.values().map(|e| e.requests).sum::<u64>();
    let requests_per_trigger = requests_per_trigger as f64 / a.triggers.max(1) as f64;
    let deliveries = merged.receipts;
    let server_cores = measure::cores_of(&trigger_cpu, "server");
    let cpu_per_delivery_us = server_cores * trigger_secs / deliveries.max(1) as f64 * 1e6;
    let clean = fleet.close().await?;

    let mut t = Table::default();
    if let Some(b) = &baseline {
        t.row(
            "baseline: plain idle WebSocket connections",
            format!(
                "{} of {s}; RSS {} → {}",
                b.open,
                human_bytes(b.rss_empty),
                human_bytes(b.rss_held)
            ),
        );
        t.row(
            "baseline: RSS per connection",
            format!("{:.0} B", b.per_client),
        );
    }
    t.row(
        "subscriptions opened (connect → initial result)",
        format!("{} of {s} in {:.2} s ({:.0}/s)", c.open, c.seconds, c.rate),
    );
    t.row(
        "subscribe latency p50 / p99 / p99.9 / max",
        c.latency.brief(),
    );
    t.row(
        "CPU while subscribing: server / clients / tool+origin / others",
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} cores",
            measure::cores_of(&subscribe_cpu, "server"),
            measure::cores_of(&subscribe_cpu, "clients"),
            measure::cores_of(&subscribe_cpu, "tool"),
            measure::cores_of(&subscribe_cpu, "others")
        ),
    );
    t.row(
        "origin requests while subscribing",
        initial_requests.to_string(),
    );
    t.row(
        format!("gateway RSS empty → after {:?} idle", a.hold),
        format!(
            "{} → {}",
            human_bytes(held.rss_empty),
            human_bytes(held.rss_held)
        ),
    );
    t.row(
        "gateway RSS per idle subscription (connection included)",
        format!("{:.0} B", held.per_client),
    );
    if let Some(b) = &baseline {
        t.row(
            "  of which GraphQL (minus the baseline)",
            format!("{:.0} B", held.per_client - b.per_client),
        );
    }
    t.row(
        "triggers / deliveries",
        format!("{} / {deliveries} of {}", a.triggers, a.triggers * live),
    );
    t.row(
        "origin requests per trigger",
        format!("{requests_per_trigger:.2} ({inputs} digests)"),
    );
    t.row(
        "trigger POST answered p50 / p99 / p99.9 / max",
        Percentiles::of(&answers).brief(),
    );
    t.row(
        "trigger → first / last origin request, p50",
        format!(
            "{:.2} / {:.2} ms",
            Percentiles::of(&to_first).p50,
            Percentiles::of(&to_last).p50
        ),
    );
    t.row(
        "trigger → delivery, all: p50 / p99 / p99.9 / max",
        all.brief(),
    );
    t.row(
        "trigger → last delivery: p50 / p99 / p99.9 / max",
        last.brief(),
    );
    t.row(
        "CPU during the triggers: server / clients / tool+origin / others",
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} cores over {trigger_secs:.1} s",
            server_cores,
            measure::cores_of(&trigger_cpu, "clients"),
            measure::cores_of(&trigger_cpu, "tool"),
            measure::cores_of(&trigger_cpu, "others")
        ),
    );
    t.row(
        "gateway CPU per delivery",
        format!("{cpu_per_delivery_us:.2} µs"),
    );
    t.row("clean closes", format!("{clean} of {}", c.open));
    t.print(&format!(
        "graphql: {s} subscribers over {inputs} inputs, {} triggers, one gateway",
        a.triggers
    ));

    measure::write_json(
        opts.json.as_deref(),
        &json!({
            "scenario": "graphql",
            "machine": measure::machine(),
            "gateway_command": gw.command(),
            "subscribers": s,
            "inputs": inputs,
            "triggers": a.triggers,
            "trigger_interval_seconds": a.trigger_interval.as_secs_f64(),
            "hold_seconds": a.hold.as_secs_f64(),
            "baseline": baseline,
            "subscribe": c,
            "cpu_cores_while_subscribing": subscribe_cpu,
            "origin_initial_requests": initial_requests,
            "gateway_operations": operations,
            "gateway_digests": digests,
            "memory": held,
            "graphql_bytes_per_subscription": baseline.map(|b| held.per_client - b.per_client),
            "deliveries": deliveries,
            "deliveries_expected": a.triggers * live,
            "origin_requests_per_trigger": requests_per_trigger,
            "per_trigger": per_trigger,
            "trigger_answer": Percentiles::of(&answers),
            "trigger_to_first_origin_request": Percentiles::of(&to_first),
            "trigger_to_last_origin_request": Percentiles::of(&to_last),
            "latency_all": all,
            "latency_last": last,
            "cpu_cores_during_triggers": trigger_cpu,
            "gateway_cpu_per_delivery_us": cpu_per_delivery_us,
            "clean_closes": clean,
            "problems": problems,
        }),
    )?;
    drop(fleet);
    drop(gw);
    drop(origin);
    Ok(crate::report_problems(&problems))
}
