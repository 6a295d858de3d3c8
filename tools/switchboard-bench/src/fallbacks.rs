//! The `fallbacks` scenario: gateway memory per idle connection of each
//! transport (docs/fallbacks.md), in one run, each on a gateway of its own.
//!
//! For each transport (`--transports`, by default all three, in this
//! order) a gateway is spawned (dev mode, the same flags for all:
//! `--ping-interval`, `--poll-timeout`; sessions on, as by default) and its
//! RSS read after a second; then N clients (sharded over worker processes as
//! in `idle`) open and stay idle:
//!
//! * `websocket`: native WebSocket connections (`switchboard.v1`, so each
//!   has a session like the fallbacks' connections), answering pings;
//! * `sse`: bidirectional SSE streams: a raw `GET /` with `Accept:
//!   text/event-stream`, the head and the first event (the `connected`
//!   push) read, then idle (heartbeat comments read, nothing answered);
//! * `long-poll`: sessions opened with `GET /?transport=long-poll`; the
//!   opening answer's connection is closed, and the gateway's RSS read
//!   once it counts N connections (**between polls**: a session with no
//!   socket and no poll waiting); then each client sends one poll that
//!   waits (on a new connection; polling again at once on the same one if a
//!   poll is answered), and the hold begins (**poll waiting**).
//!
//! After `--hold` the gateway's RSS is read again and it must still count
//! N connections; RSS per connection = (after the hold − empty) / N. The
//! hold must end well before `--poll-timeout`, so no idle poll is answered
//! during it (the answered polls are counted and reported as a problem).
//! Every wait is bounded: the connect phase (`--connect-timeout`), the
//! first polls (60 s), the hold, each client's polls (at most 1,000).

use crate::engine::{Cmd, Fleet, Mode, Report, Transport};
use crate::measure::{self, human_bytes, Table};
use crate::servers::{Api, Gateway};
use crate::Opts;
use serde_json::json;
use std::time::{Duration, Instant};

/// A transport measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// Native WebSocket connections.
    Websocket,
    /// Bidirectional SSE streams.
    Sse,
    /// Long-poll sessions.
    LongPoll,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Websocket => "websocket",
            Kind::Sse => "sse",
            Kind::LongPoll => "long-poll",
        }
    }
}

/// Options of `fallbacks`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Connections (or long-poll sessions) per transport.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Transports to measure, comma-separated, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "websocket,sse,long-poll"
    )]
    transports: Vec<Kind>,
    /// How long the connections stay idle before the memory reading.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Ping interval of the spawned gateways (WebSocket pings, SSE
    /// heartbeats).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// Poll timeout of the spawned gateways: more than the hold plus the
    /// time to open and poll, so that idle polls are not answered.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    poll_timeout: Duration,
}

/// What one transport gave.
#[derive(Debug, Default, serde::Serialize)]
struct Measured {
    transport: &'static str,
    open: usize,
    failed: usize,
    first_error: Option<String>,
    connect_seconds: f64,
    rss_empty: f64,
    rss_connected: f64,
    /// Long-poll: sessions open, no poll waiting.
    rss_between_polls: Option<f64>,
    rss_held: f64,
    bytes_per_connection: f64,
    bytes_per_session_between_polls: Option<f64>,
    counted: u64,
    heartbeats_or_pings: u64,
    polls_answered: u64,
    dropped: u64,
}

/// Runs the scenario; `Ok(false)` if the measurement is invalid.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    if a.hold + Duration::from_secs(20) > a.poll_timeout {
        return Err(format!(
            "--poll-timeout {:?} must exceed --hold {:?} by 20 s (opening and the first polls)",
            a.poll_timeout, a.hold
        ));
    }
    let api = Api::new();
    let mut problems = Vec::new();
    let mut results = Vec::new();
    let mut commands = Vec::new();
    for &kind in &a.transports {
        let (m, command) = measure_one(opts, &a, &api, kind, &mut problems).await?;
        commands.push(command);
        results.push(m);
    }

    let mut t = Table::default();
    for m in &results {
        let name = m.transport;
        t.row(
            format!("{name}: opened"),
            format!(
                "{} of {} in {:.2} s",
                m.open, a.connections, m.connect_seconds
            ),
        );
        t.row(
            format!("{name}: gateway RSS empty → after {:?} idle", a.hold),
            format!("{} → {}", human_bytes(m.rss_empty), human_bytes(m.rss_held)),
        );
        if let Some(b) = m.bytes_per_session_between_polls {
            t.row(
                format!("{name}: RSS per session between polls"),
                format!("{b:.0} B"),
            );
        }
        let what = if m.transport == "long-poll" {
            "session with a poll waiting"
        } else {
            "connection"
        };
        t.row(
            format!("{name}: RSS per {what}"),
            format!("{:.0} B", m.bytes_per_connection),
        );
        if m.transport == "long-poll" {
            t.row(
                format!("{name}: polls answered during the hold"),
                m.polls_answered.to_string(),
            );
        } else {
            t.row(
                format!("{name}: pings / heartbeats read"),
                m.heartbeats_or_pings.to_string(),
            );
        }
    }
    if let Some(ws) = results.iter().find(|m| m.transport == "websocket") {
        for m in results.iter().filter(|m| m.transport != "websocket") {
            t.row(
                format!("{} / websocket, per connection", m.transport),
                format!("{:.2}", m.bytes_per_connection / ws.bytes_per_connection),
            );
        }
    }
    t.print(&format!(
        "fallbacks: {} idle connections per transport, one gateway each",
        a.connections
    ));

    measure::write_json(
        opts.json.as_deref(),
        &json!({
            "scenario": "fallbacks",
            "machine": measure::machine(),
            "gateway_commands": commands,
            "connections": a.connections,
            "hold_seconds": a.hold.as_secs_f64(),
            "ping_interval_seconds": a.ping_interval.as_secs_f64(),
            "poll_timeout_seconds": a.poll_timeout.as_secs_f64(),
            "transports": results,
            "problems": problems,
        }),
    )?;
    Ok(crate::report_problems(&problems))
}

/// Measures one transport on a gateway of its own.
async fn measure_one(
    opts: &Opts,
    a: &Args,
    api: &Api,
    kind: Kind,
    problems: &mut Vec<String>,
) -> Result<(Measured, Option<Vec<String>>), String> {
    let n = a.connections;
    let name = kind.name();
    let args = vec![
        "--ping-interval".to_owned(),
        humantime::format_duration(a.ping_interval).to_string(),
        "--poll-timeout".to_owned(),
        humantime::format_duration(a.poll_timeout).to_string(),
    ];
    let gw = Gateway::spawn(opts, &args).await?;
    let pid = gw.pid();
    let control = gw.control.ok_or("no control listener")?;
    let rss = || pid.and_then(measure::rss).unwrap_or(0) as f64;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut m = Measured {
        transport: name,
        rss_empty: rss(),
        ..Measured::default()
    };

    let (transport, sub) = match kind {
        Kind::Websocket => (Transport::WebSocket, Some("switchboard.v1")),
        Kind::Sse => (Transport::Sse, None),
        Kind::LongPoll => (Transport::LongPoll, None),
    };
    let mut configs = opts.workers_for(&gw, n, 2, sub, Mode::Idle);
    for c in &mut configs {
        c.transport = transport;
    }
    let mut fleet = Fleet::spawn(&configs)?;
    eprintln!("switchboard-bench: {name}: opening {n}");
    let c = fleet.connect(opts.connect_timeout).await?;
    m.open = c.open;
    m.failed = c.failed;
    m.first_error = c.first_error.clone();
    m.connect_seconds = c.seconds;
    m.rss_connected = rss();
    if c.open < n {
        problems.push(format!(
            "{name}: {} of {n} failed; first: {}",
            c.failed,
            c.first_error.clone().unwrap_or_default()
        ));
    }

    if kind == Kind::LongPoll {
        // Between polls: the openings' connections are closed.
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let counted = api.connections(control).await?;
        if counted != c.open as u64 {
            problems.push(format!(
                "{name}: between polls, the gateway counts {counted} connections, {} open",
                c.open
            ));
        }
        let between = rss();
        m.rss_between_polls = Some(between);
        m.bytes_per_session_between_polls = Some((between - m.rss_empty) / c.open.max(1) as f64);
        fleet.send(&Cmd::Poll).await?;
        let polling = fleet
            .collect(Duration::from_secs(90), "the first polls", |r| match r {
                Report::Polling { sent, failed } => Some((sent, failed)),
                _ => None,
            })
            .await?;
        let sent: usize = polling.iter().map(|p| p.0).sum();
        if sent < c.open {
            problems.push(format!("{name}: {sent} of {} first polls sent", c.open));
        }
        eprintln!(
            "switchboard-bench: {name}: {sent} polls waiting, {:.1} s after the openings",
            started.elapsed().as_secs_f64() + c.seconds
        );
    }

    eprintln!("switchboard-bench: {name}: holding for {:?}", a.hold);
    tokio::time::sleep(a.hold).await;
    m.rss_held = rss();
    m.counted = api.connections(control).await?;
    if m.counted != c.open as u64 {
        problems.push(format!(
            "{name}: the gateway counts {} connections, {} open",
            m.counted, c.open
        ));
    }
    let r = fleet.receipts(0).await?;
    m.heartbeats_or_pings = r.iter().map(|r| r.pings).sum();
    m.polls_answered = r.iter().map(|r| r.polls_answered).sum();
    m.dropped = r.iter().map(|r| r.dropped).sum();
    if m.dropped > 0 {
        problems.push(format!(
            "{name}: {} connections ended during the hold; first: {}",
            m.dropped,
            r.iter()
                .find_map(|r| r.first_drop.clone())
                .unwrap_or_default()
        ));
    }
    if m.polls_answered > 0 {
        problems.push(format!(
            "{name}: {} idle polls were answered during the hold",
            m.polls_answered
        ));
    }
    m.bytes_per_connection = (m.rss_held - m.rss_empty) / c.open.max(1) as f64;
    fleet.close().await?;
    let command = gw.command().map(<[String]>::to_vec);
    drop(fleet);
    drop(gw);
    Ok((m, command))
}
