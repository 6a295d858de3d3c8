//! The `fanout` scenario: S subscribers on one channel and publications
//! that must reach all of them.
//!
//! The server is one gateway (dev mode, namespace `bench` open to
//! subscribers), a NATS cluster of `--nodes` gateways (nats-server with
//! JetStream; subscribers spread evenly, publishes through `a`), or any
//! server given with `--url`: a Switchboard with `--control`, or one whose
//! clients get the published data as plain frames with `--publish-url`
//! taking `POST` bodies (nginx + nchan: `compare/nchan.sh`).
//!
//! 1. **single**: `--messages` publishes one at a time, each once the
//!    previous one reached every subscriber (and at least
//!    `--single-interval` apart): latency of every delivery, and per
//!    message until the last subscriber had it ("all reached").
//! 2. **sustained**: `--publishers` paced publishers at `--rate` messages/s
//!    (a publisher still waiting for its answer skips the slots it missed),
//!    a warm-up, a measured window and a grace period: deliveries/s
//!    received in the window, latency, lost and late deliveries of the
//!    window's messages.
//!
//! With `--transport sse` the subscribers are event streams instead of
//! WebSockets: on a spawned gateway, plain EventSource streams
//! (`GET /?channel=bench:fanout` with `Accept: text/event-stream`, each ready
//! once its `event: subscribed` came; docs/fallbacks.md); with `--url
//! http://…` any server's event stream (nchan's EventSource:
//! `compare/nchan.sh --transport sse`). A delivery is counted when the
//! subscriber has read the whole event (to its blank line) and found the
//! stamp in it.
//!
//! With `--transport sse-bidirectional` the subscribers are the gateway's
//! bidirectional SSE streams (`GET /` with `Accept: text/event-stream`),
//! each subscribing with a `subscribe` command `POST`ed on its session and
//! ready once the reply came on the stream.
//!
//! With `--floor`, the same subscribers and single messages then measure
//! the floor server ([`crate::floor`]: sockets, one frame encoded once, one
//! `write` per socket on as many threads as the gateway's runtime) through
//! the `--url` / `--publish-url` path; the results add the floor's
//! (`floor`) and the server's figures as ratios of it (`against_floor`).
//! `--single-only` skips the sustained phase (the floor never runs it).
//!
//! Every message carries its phase, number and publish time ([`stamp`]),
//! found by the subscribers whatever the envelope. Server memory is read
//! empty and subscribed (RSS and PSS over the server's processes), CPU per
//! phase; for a cluster also the NATS messages per publish (`/varz`, less
//! the background counted in a quiet window).

use crate::engine::{share_concurrency, stamp, Fleet, Mode, Receipts, Report, Transport, TICK_NS};
use crate::floor::Floor;
use crate::measure::{self, human_bytes, unix_nanos, CpuMeter, Percentiles, Table};
use crate::servers::{Api, Callers, Cluster, Gateway, TlsArgs};
use crate::Opts;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The channel, in a namespace the spawned gateways open to subscribers.
const CHANNEL: &str = "bench:fanout";

/// Deliveries per second the sustained rate aims at by default.
const TARGET_DELIVERIES: f64 = 500_000.0;

/// Phases, as stamped.
const SINGLE: u8 = b's';
const WARMUP: u8 = b'w';
const SUSTAINED: u8 = b'm';

/// How the subscribers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Subscribers {
    /// WebSocket (the native protocol on a Switchboard).
    Websocket,
    /// Event streams: the gateway's plain EventSource, or any server's
    /// (`--url http://…`).
    Sse,
    /// The gateway's bidirectional SSE streams, subscribed with a `POST`ed
    /// `subscribe` command.
    SseBidirectional,
}

/// Options of `fanout`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Subscribers.
    #[arg(long, default_value_t = 19_000)]
    subscribers: usize,
    /// How the subscribers connect.
    #[arg(long, value_enum, default_value = "websocket")]
    transport: Subscribers,
    /// Gateways joined through nats-server (JetStream) or redis-server
    /// (`--bus`); 1: no cluster.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=26))]
    nodes: u8,
    /// What joins the nodes of a cluster.
    #[arg(long, value_enum, default_value = "nats")]
    bus: crate::servers::Bus,
    /// Single messages.
    #[arg(long, default_value_t = 20)]
    messages: u64,
    /// Least time between single messages.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    single_interval: Duration,
    /// Longest wait for a single message to reach everyone.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    single_timeout: Duration,
    /// Sustained messages per second: a number, `auto` (500,000
    /// deliveries/s over the subscribers, plus 15 %) or `max` (publishers
    /// back to back).
    #[arg(long, default_value = "auto")]
    rate: String,
    /// Paced publishers, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    publishers: u64,
    /// Sustained warm-up.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Sustained measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Wait for late deliveries after the window.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// A delivery later than this is late.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    late_after: Duration,
    /// Message data size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Quiet window counting NATS background traffic (cluster only).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    quiet: Duration,
    /// Use a running server: subscribers connect to this ws:// URL (an
    /// http:// one with `--transport sse`).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Control listener of the --url Switchboard (native subscribers,
    /// publishes through the control API).
    #[arg(long, requires = "url", conflicts_with = "publish_url")]
    control: Option<SocketAddr>,
    /// Publish by `POST`ing the data to this URL; the --url server sends it
    /// to its subscribers as plain frames (nginx + nchan).
    #[arg(long, requires = "url", value_name = "URL")]
    publish_url: Option<String>,
    /// Process ids of the --url server (repeatable: nginx's master and
    /// workers), for its memory and CPU.
    #[arg(long, requires = "url", value_name = "PID")]
    server_pid: Vec<u32>,
    /// Name of the --url server in the results.
    #[arg(long, default_value = "switchboard")]
    server_name: String,
    /// Skip the sustained phase: single messages only.
    #[arg(long)]
    single_only: bool,
    /// Then run the single messages against the floor server (a minimal
    /// fan-out write loop, the `floor` module) with the same clients, and
    /// report the server's figures as ratios of the floor's.
    #[arg(long)]
    floor: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

/// One publish.
#[derive(Debug)]
struct Sent {
    /// Its phase, as stamped.
    phase: u8,
    /// Its number.
    seq: u64,
    /// How long the answer took, µs.
    answer_us: u64,
    /// Whether it was accepted (2xx).
    ok: bool,
}

/// Name of the floor server in the results.
const FLOOR_NAME: &str = "floor (minimal write loop)";

/// Runs the scenario; `Ok(false)` if the measurement is invalid.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    if a.floor && a.transport != Subscribers::Websocket {
        return Err("--floor: the floor server takes WebSocket subscribers only".into());
    }
    if a.tls.tls && (a.transport != Subscribers::Websocket || a.nodes > 1 || a.url.is_some()) {
        return Err("--tls: one spawned gateway with WebSocket subscribers".into());
    }
    let server = measure_server(opts, &a, None).await?;
    let mut json = server.json;
    let mut problems = server.problems;
    if a.floor {
        // The same clients and single phase against the floor server.
        let floor = Floor::spawn(a.subscribers).await?;
        let fa = Args {
            nodes: 1,
            url: Some(floor.url.clone()),
            control: None,
            publish_url: Some(floor.publish_url.clone()),
            server_pid: floor.pid().into_iter().collect(),
            server_name: FLOOR_NAME.into(),
            single_only: true,
            floor: false,
            ..a.clone()
        };
        let f = measure_server(opts, &fa, Some(floor)).await?;
        let ratio = |s: f64, f: f64| (f > 0.0).then(|| s / f);
        let mut t = Table::default();
        let mut against = serde_json::Map::new();
        for (what, key, s, fl) in [
            (
                "single: delivery latency p50",
                "single_p50_ms",
                server.single.p50,
                f.single.p50,
            ),
            (
                "single: delivery latency p99",
                "single_p99_ms",
                server.single.p99,
                f.single.p99,
            ),
            (
                "— all reached p50",
                "all_reached_p50_ms",
                server.reached.p50,
                f.reached.p50,
            ),
            (
                "— all reached max",
                "all_reached_max_ms",
                server.reached.max,
                f.reached.max,
            ),
            (
                "— server CPU per delivery (µs)",
                "cpu_us_per_delivery",
                server.cpu_per_delivery_us,
                f.cpu_per_delivery_us,
            ),
            (
                "— CPU of other processes (cores)",
                "others_cores",
                server.others,
                f.others,
            ),
        ] {
            let r = ratio(s, fl);
            t.row(
                what,
                format!(
                    "{s:.2} / {fl:.2} = {}",
                    r.map_or("-".into(), |r| format!("{r:.2}×"))
                ),
            );
            against.insert(key.into(), json!({"server": s, "floor": fl, "ratio": r}));
        }
        t.print(&format!(
            "fanout: {} against the floor, {} subscribers (server / floor = ratio)",
            server.name, a.subscribers
        ));
        problems.extend(f.problems.iter().map(|p| format!("floor: {p}")));
        json["floor"] = f.json;
        json["against_floor"] = against.into();
        json["problems"] = json!(problems);
    }
    measure::write_json(opts.json.as_deref(), &json)?;
    Ok(crate::report_problems(&problems))
}

/// One server's measurement.
struct Outcome {
    /// The server's name in the results.
    name: String,
    /// Everything measured, as written to the JSON file.
    json: serde_json::Value,
    /// What makes the measurement invalid.
    problems: Vec<String>,
    /// Single messages: latency of every delivery.
    single: Percentiles,
    /// Single messages: per message, until the last subscriber had it.
    reached: Percentiles,
    /// Single messages: the server's CPU time per delivery, µs.
    cpu_per_delivery_us: f64,
    /// Single messages: cores used by other processes (disturbance).
    others: f64,
}

/// What the phases of one measurement share.
struct Target<'a> {
    a: &'a Args,
    api: Api,
    publish_url: String,
    /// Publishes go through a Switchboard's control API.
    native: bool,
    cluster: Option<&'a Cluster>,
    /// Process groups whose CPU is measured.
    groups: Vec<(&'static str, Vec<u32>)>,
    /// Subscribers connected.
    live: u64,
    /// NATS background messages per second, in and out (cluster only).
    background: Option<(f64, f64)>,
}

/// Measures one server: subscribers, single messages, then the sustained
/// rate unless `--single-only`; prints its table. A `floor` server is ended
/// before the clients close (it answers no close frame).
async fn measure_server(opts: &Opts, a: &Args, floor: Option<Floor>) -> Result<Outcome, String> {
    // The floor speaks plain TCP.
    let tls = a.tls.tls && floor.is_none();
    let api = if tls { a.tls.api()? } else { Api::new() };
    let mut problems = Vec::new();
    let serve: Vec<String> = [
        "--namespace",
        "bench:subscribe",
        "--max-connections",
        "1000000",
    ]
    .map(str::to_owned)
    .to_vec();
    // The server: (gateways, cluster).
    let (gateways, cluster) = match (&a.url, a.nodes) {
        (Some(url), 1) => (vec![Gateway::external(url, a.control)?], None),
        (Some(_), _) => return Err("--nodes starts its own cluster; not with --url".into()),
        (None, 1) if tls => {
            let args = a.tls.gateway_args(serve);
            (vec![Gateway::spawn_with(opts, &args, &api).await?], None)
        }
        (None, 1) => (vec![Gateway::spawn(opts, &serve).await?], None),
        (None, n) => {
            let c = Cluster::start_on(opts, a.bus, usize::from(n), true, &serve).await?;
            (Vec::new(), Some(c))
        }
    };
    let nodes: &[Gateway] = cluster.as_ref().map_or(&gateways, |c| &c.nodes);
    let native = a.publish_url.is_none();
    let publish_url = match &a.publish_url {
        Some(u) => u.clone(),
        None => {
            let control = nodes[0].control.ok_or("--control is needed with --url")?;
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{control}/v1/channels/{CHANNEL}/messages")
        }
    };
    let mut server_pids: Vec<u32> = nodes.iter().filter_map(Gateway::pid).collect();
    server_pids.extend(&a.server_pid);
    let nats_pid = match &cluster {
        Some(c) => c.broker_pid(),
        None => None,
    };
    let empty = measure::memory(&server_pids);

    // Subscribers, spread evenly over the nodes.
    let mode = Mode::Receive {
        subscribe: native.then(|| CHANNEL.to_owned()),
        greeting: false,
    };
    let sse = a.transport != Subscribers::Websocket;
    let mut configs = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let share = a.subscribers * (k + 1) / nodes.len() - a.subscribers * k / nodes.len();
        let sub = (native && !sse).then_some("switchboard.v1");
        for mut c in opts.workers_for(node, share, 1, sub, mode.clone()) {
            c.offset += a.subscribers * k / nodes.len();
            if a.transport == Subscribers::SseBidirectional {
                c.transport = Transport::SseBidirectional;
            } else if sse {
                c.transport = Transport::Sse;
                if node.proc.is_some() {
                    // A spawned gateway: its plain EventSource stream.
                    c.target = format!("{}/?channel={CHANNEL}", node.addr);
                }
            }
            configs.push(c);
        }
    }
    if tls {
        a.tls.apply(&mut configs);
    }
    share_concurrency(&mut configs, opts.concurrency);
    let mut fleet = Fleet::spawn(&configs)?;
    let c = fleet.connect(opts.connect_timeout).await?;
    if c.open < a.subscribers {
        problems.push(format!(
            "{} subscribers failed; first: {}",
            c.failed,
            c.first_error.clone().unwrap_or_default()
        ));
    }
    if native {
        let mut counted = 0;
        for node in nodes {
            let v = api
                .get_json(node.control.expect("known"), "/v1/channels")
                .await?;
            counted += v["channels"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|ch| ch["channel"] == CHANNEL)
                .map(|ch| ch["subscribers"].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
        if counted != c.open as u64 {
            problems.push(format!(
                "the server counts {counted} subscribers, {} subscribed",
                c.open
            ));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let subscribed = measure::memory(&server_pids);
    let per_subscriber = (subscribed.pss as f64 - empty.pss as f64) / c.open.max(1) as f64;
    let background = match &cluster {
        Some(cl) if !a.single_only => {
            let m0 = cl.bus_msgs(&api).await?;
            tokio::time::sleep(a.quiet).await;
            let m1 = cl.bus_msgs(&api).await?;
            let s = a.quiet.as_secs_f64();
            Some(((m1.0 - m0.0) as f64 / s, (m1.1 - m0.1) as f64 / s))
        }
        _ => None,
    };
    let target = Target {
        a,
        api,
        publish_url,
        native,
        cluster: cluster.as_ref(),
        groups: vec![
            ("server", server_pids.clone()),
            ("clients", fleet.pids()),
            ("broker", nats_pid.into_iter().collect()),
        ],
        live: c.open as u64,
        background,
    };

    // 1. Single messages.
    let live = target.live;
    let cpu = CpuMeter::start(target.groups.clone());
    let mut answers = measure::histogram();
    let mut timed_out = 0;
    for seq in 1..=a.messages {
        let started = Instant::now();
        let sent = publish(
            &target.api,
            &target.publish_url,
            native,
            (SINGLE, SINGLE, 0),
            seq,
            a.size,
        )
        .await;
        if !sent.ok {
            problems.push(format!("single publish {seq} was refused"));
        }
        answers.saturating_record(sent.answer_us);
        let deadline = started + a.single_timeout;
        let mut reached = 0;
        while reached < fleet.len() {
            match fleet.next(deadline).await? {
                Some((_, Report::Reached(SINGLE, s))) if s == seq => reached += 1,
                Some(_) => {}
                None => {
                    timed_out += 1;
                    break;
                }
            }
        }
        tokio::time::sleep_until((started + a.single_interval).into()).await;
    }
    let single_cpu = cpu.cores();
    let single_secs = cpu.seconds();
    let single = merge(&fleet.receipts(SINGLE).await?);
    let reached = Percentiles::of(&single.last);
    let single_missing = (a.messages * live).saturating_sub(single.receipts);
    if single_missing > 0 {
        problems.push(format!(
            "{single_missing} single deliveries missing ({timed_out} messages timed out)"
        ));
    }
    let single_lat = Percentiles::of(&single.all);
    let cpu_per_delivery_us = measure::cores_of(&single_cpu, "server") * single_secs
        / (single.receipts as f64).max(1e-9)
        * 1e6;

    let name = if cluster.is_some() {
        format!("{} switchboard nodes", a.nodes)
    } else {
        a.server_name.clone()
    };
    let transport = match a.transport {
        Subscribers::Websocket => "websocket",
        Subscribers::Sse => "sse",
        Subscribers::SseBidirectional => "sse-bidirectional",
    };
    let mut t = Table::default();
    t.row("subscribed", format!("{} in {:.2} s", c.open, c.seconds));
    t.row(
        "server memory empty / subscribed (PSS)",
        format!(
            "{} / {}",
            human_bytes(empty.pss as f64),
            human_bytes(subscribed.pss as f64)
        ),
    );
    t.row("— per subscriber", format!("{per_subscriber:.0} B"));
    t.row(
        "single: delivery latency p50 / p99 / p99.9 / max",
        single_lat.brief(),
    );
    t.row(
        "— all reached p50 / max",
        format!("{:.1} / {:.1} ms", reached.p50, reached.max),
    );
    t.row(
        "— publish answered p50",
        format!("{:.2} ms", Percentiles::of(&answers).p50),
    );
    t.row(
        "— server CPU per delivery",
        format!("{cpu_per_delivery_us:.2} µs"),
    );

    // 2. Sustained rate.
    let sustained = if a.single_only {
        serde_json::Value::Null
    } else {
        sustained(&target, &mut fleet, &mut t, &mut problems).await?
    };

    let dropped: u64 = fleet.receipts(0).await?.iter().map(|r| r.dropped).sum();
    if dropped > 0 {
        problems.push(format!(
            "{dropped} subscriber connections ended unexpectedly"
        ));
    }
    let after = measure::memory(&server_pids);
    t.row("server memory after (PSS)", human_bytes(after.pss as f64));
    t.print(&format!(
        "fanout: {} {transport} subscribers{}, {name}",
        a.subscribers,
        if tls { " over TLS" } else { "" }
    ));

    let json = json!({
        "scenario": "fanout",
        "server": name,
        "transport": transport,
        "tls": tls,
        "machine": measure::machine(),
        "server_commands": nodes.iter().map(Gateway::command).collect::<Vec<_>>(),
        "subscribers": a.subscribers,
        "subscribe": c,
        "memory": {"empty": empty, "subscribed": subscribed, "after": after,
                   "pss_per_subscriber": per_subscriber},
        "single": {
            "messages": a.messages,
            "delivery_latency_ms": single_lat,
            "all_reached_ms": reached,
            "publish_answer_ms": Percentiles::of(&answers),
            "missing": single_missing,
            "cpu_cores": single_cpu,
            "server_cpu_us_per_delivery": cpu_per_delivery_us,
        },
        "sustained": sustained,
        "problems": problems,
    });
    drop(floor);
    fleet.close().await?;
    Ok(Outcome {
        name,
        json,
        problems,
        single: single_lat,
        reached,
        cpu_per_delivery_us,
        others: measure::cores_of(&single_cpu, "others"),
    })
}

/// The sustained phase: adds its rows to `t` and its problems; its JSON.
async fn sustained(
    tg: &Target<'_>,
    fleet: &mut Fleet,
    t: &mut Table,
    problems: &mut Vec<String>,
) -> Result<serde_json::Value, String> {
    let (a, api, native, live) = (tg.a, &tg.api, tg.native, tg.live);
    // `None`: back to back (`--rate max`).
    let rate: Option<f64> = match a.rate.as_str() {
        "auto" => Some(
            (TARGET_DELIVERIES * 1.15 / a.subscribers.max(1) as f64)
                .ceil()
                .max(1.0),
        ),
        "max" => None,
        r => Some(
            r.parse()
                .map_err(|_| format!("--rate {r}: a number, auto or max"))?,
        ),
    };
    let t0 = Instant::now() + Duration::from_millis(200);
    let window_start = t0 + a.warmup;
    let end = window_start + a.duration;
    let window_ns = (
        unix_nanos() + 200_000_000 + a.warmup.as_nanos() as u64,
        unix_nanos() + 200_000_000 + (a.warmup + a.duration).as_nanos() as u64,
    );
    let callers = {
        let (api, url) = (api.clone(), tg.publish_url.clone());
        let (size, from) = (a.size, window_ns.0);
        Callers::start(a.publishers, rate, t0, end, move |seq| {
            let (api, url) = (api.clone(), url.clone());
            async move { publish(&api, &url, native, (WARMUP, SUSTAINED, from), seq, size).await }
        })
    };
    tokio::time::sleep_until(window_start.into()).await;
    let nats0 = match tg.cluster {
        Some(cl) => Some(cl.bus_msgs(api).await?),
        None => None,
    };
    let meter = CpuMeter::start(tg.groups.clone());
    tokio::time::sleep_until(end.into()).await;
    let cpu = meter.cores();
    let nats = match (tg.cluster, nats0) {
        (Some(cl), Some(m0)) => {
            let m1 = cl.bus_msgs(api).await?;
            Some((m1.0 - m0.0, m1.1 - m0.1))
        }
        _ => None,
    };
    let (sent, skipped) = callers.join().await?;
    tokio::time::sleep(a.grace).await;
    let mut sustained = merge(&fleet.receipts(SUSTAINED).await?);
    let in_window: Vec<&Sent> = sent.iter().filter(|s| s.phase == SUSTAINED).collect();
    let acked: Vec<u64> = in_window.iter().filter(|s| s.ok).map(|s| s.seq).collect();
    let refused = in_window.len() - acked.len();
    let missing = |m: &Merged| -> u64 {
        acked
            .iter()
            .map(|seq| live.saturating_sub(m.per_message.get(seq).copied().unwrap_or(0)))
            .sum()
    };
    // Missing after the grace: look again later (bounded) before calling
    // them lost; those that arrived then are late, and in the latencies.
    let missing_after_grace = missing(&sustained);
    if missing_after_grace > 0 {
        tokio::time::sleep((a.grace * 3).min(Duration::from_secs(30))).await;
        sustained = merge(&fleet.receipts(SUSTAINED).await?);
    }
    let lost = missing(&sustained);
    if lost > 0 {
        problems.push(format!("{lost} sustained deliveries lost"));
    }
    let window_deliveries: u64 = sustained
        .ticks
        .range(window_ns.0 / TICK_NS..window_ns.1 / TICK_NS)
        .map(|(_, n)| n)
        .sum();
    let deliveries_per_s = window_deliveries as f64 / a.duration.as_secs_f64();
    let late = sustained
        .all
        .count_between(a.late_after.as_micros() as u64, u64::MAX);
    let latency = Percentiles::of(&sustained.all);
    let mut publish_answers = measure::histogram();
    in_window
        .iter()
        .for_each(|s| publish_answers.saturating_record(s.answer_us));
    let published_per_s = in_window.len() as f64 / a.duration.as_secs_f64();
    let nats_per_publish = nats.zip(tg.background).map(|((i, o), (bi, bo))| {
        let s = a.duration.as_secs_f64();
        let k = in_window.len().max(1) as f64;
        ((i as f64 - bi * s) / k, (o as f64 - bo * s) / k)
    });

    let per_delivery =
        |cores: f64, deliveries: f64| format!("{:.2} µs", cores / deliveries.max(1e-9) * 1e6);
    t.row(
        "sustained: messages published/s",
        format!(
            "{published_per_s:.1} of {} asked ({} slots skipped, {refused} refused)",
            rate.map_or("max".to_owned(), |r| r.to_string()),
            skipped
        ),
    );
    t.row("— deliveries/s received", format!("{deliveries_per_s:.0}"));
    t.row("— latency p50 / p99 / p99.9 / max", latency.brief());
    t.row(
        "— publish answered p50",
        format!("{:.2} ms", Percentiles::of(&publish_answers).p50),
    );
    t.row(
        "— lost / late / missing after the grace",
        format!(
            "{lost} of {} / {late} / {missing_after_grace}",
            acked.len() as u64 * live
        ),
    );
    for (g, cores) in &cpu {
        t.row(
            format!("— CPU: {g}"),
            format!(
                "{cores:.2} cores ({} per delivery)",
                per_delivery(*cores, deliveries_per_s)
            ),
        );
    }
    if let Some((i, o)) = nats_per_publish {
        t.row(
            match tg.cluster {
                Some(cl) if cl.broker_name() == "redis-server" => {
                    "— Redis commands per publish (in; out not counted)"
                }
                _ => "— NATS messages per publish in / out",
            },
            format!("{i:.1} / {o:.1}"),
        );
    }
    Ok(json!({
        "rate_asked": rate,
        "published_per_second": published_per_s,
        "skipped_slots": skipped,
        "refused": refused,
        "deliveries_per_second": deliveries_per_s,
        "latency_ms": latency,
        "publish_answer_ms": Percentiles::of(&publish_answers),
        "missing_after_grace": missing_after_grace,
        "lost": lost,
        "late": late,
        "cpu_cores": cpu,
        "nats_messages_per_publish": nats_per_publish,
        "nats_background_per_second": tg.background,
        "bus": tg.cluster.map(|c| c.broker_name()),
    }))
}

/// Publishes one stamped message; never fails (a failure is not `ok`).
/// `phases`: the phase before and from a Unix time in ns.
async fn publish(
    api: &Api,
    url: &str,
    native: bool,
    phases: (u8, u8, u64),
    seq: u64,
    size: usize,
) -> Sent {
    let sent_ns = unix_nanos();
    let phase = if sent_ns < phases.2 {
        phases.0
    } else {
        phases.1
    };
    let data = stamp(phase, seq, sent_ns, size);
    let body = if native {
        json!({ "text": data }).to_string()
    } else {
        data
    };
    let r = api.post(url, body, native).await;
    let took = (unix_nanos() - sent_ns) / 1000;
    Sent {
        phase,
        seq,
        answer_us: took,
        ok: matches!(r, Ok(200..=299)),
    }
}

/// Receipts of a phase merged over the workers.
pub(crate) struct Merged {
    /// Every delivery's latency.
    pub(crate) all: hdrhistogram::Histogram<u64>,
    /// Per message, the latest delivery's latency.
    pub(crate) last: hdrhistogram::Histogram<u64>,
    /// Receipts per message.
    pub(crate) per_message: BTreeMap<u64, u64>,
    /// Receipts per tick.
    ticks: BTreeMap<u64, u64>,
    /// All receipts.
    pub(crate) receipts: u64,
}

/// Merges the workers' receipts of a phase.
pub(crate) fn merge(r: &[Receipts]) -> Merged {
    let mut m = Merged {
        all: measure::histogram(),
        last: measure::histogram(),
        per_message: BTreeMap::new(),
        ticks: BTreeMap::new(),
        receipts: 0,
    };
    let mut latest: BTreeMap<u64, u64> = BTreeMap::new();
    for w in r {
        measure::add_buckets(&mut m.all, &w.latency);
        for &(seq, n, us) in &w.per_message {
            *m.per_message.entry(seq).or_default() += n;
            let l = latest.entry(seq).or_default();
            *l = (*l).max(us);
            m.receipts += n;
        }
        for &(t, n) in &w.ticks {
            *m.ticks.entry(t).or_default() += n;
        }
    }
    latest
        .values()
        .for_each(|&us| m.last.saturating_record(us.max(1)));
    m
}
