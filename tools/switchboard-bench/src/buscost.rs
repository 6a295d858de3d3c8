//! The `bus-channels` scenario: what channels cost the broker that joins a
//! cluster (`--bus nats` or `--bus redis`): its memory and CPU per 1,000
//! channels with history.
//!
//! The tool starts the broker and `--nodes` gateways with the namespace
//! `room:history-size=<history>,history-ttl=1h`, measures the broker
//! (Redis: `used_memory`; NATS: the process's resident memory and
//! JetStream's stored bytes, `/jsz`) and its CPU time, then publishes
//! `--messages` messages of `--size` bytes to each of `--channels` channels
//! through node `a`'s control API (`--publishers` at once, each waiting for
//! its answer), and measures again. Every publish must answer 200.

use crate::measure::{self, Table};
use crate::servers::{Api, Bus, Cluster};
use crate::Opts;
use serde_json::json;
use std::time::{Duration, Instant};

/// Options of `bus-channels`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// What joins the nodes.
    #[arg(long, value_enum, default_value = "redis")]
    bus: Bus,
    /// Gateway nodes.
    #[arg(long, default_value_t = 2)]
    nodes: u8,
    /// Channels published to.
    #[arg(long, default_value_t = 10_000)]
    channels: u64,
    /// Messages published to each channel.
    #[arg(long, default_value_t = 10)]
    messages: u64,
    /// The namespace's history-size (messages kept per channel).
    #[arg(long, default_value_t = 10)]
    history: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Publishers at once.
    #[arg(long, default_value_t = 16)]
    publishers: u64,
}

/// The broker's memory now: (bytes counted, how).
async fn broker_memory(cluster: &Cluster, api: &Api) -> (f64, &'static str) {
    if let Some(used) = cluster.redis_used_memory() {
        return (used as f64, "used_memory");
    }
    let rss = cluster
        .broker_pid()
        .and_then(measure::rss)
        .unwrap_or_default();
    let stored = cluster.jetstream_bytes(api).await.unwrap_or_default();
    ((rss + stored) as f64, "resident + JetStream stored bytes")
}

/// Runs the scenario; `Ok(false)` if a publish failed.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    let api = Api::new();
    let serve = vec![
        "--namespace".to_owned(),
        format!("room:history-size={},history-ttl=1h", a.history),
    ];
    let cluster = Cluster::start_on(opts, a.bus, usize::from(a.nodes), true, &serve).await?;
    let broker = cluster.broker_pid().ok_or("the broker is not running")?;
    // One publish first: streams and scripts made, connections warm.
    let control = cluster.nodes[0].control.expect("spawned");
    let data = "x".repeat(a.size);
    let url = move |ch: u64| format!("http://{control}/v1/channels/room:c{ch}/messages");
    let first = api
        .post(&url(u64::MAX), json!({ "text": data }).to_string(), true)
        .await?;
    if first != 200 {
        return Err(format!("a first publish answered {first}"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mem0, how) = broker_memory(&cluster, &api).await;
    let cpu0 = measure::cpu_seconds(broker).unwrap_or_default();
    let nodes_cpu0 = measure::cpu_of(&cluster.node_pids());
    let total = a.channels * a.messages;
    let started = Instant::now();
    // Publishers, each taking the next publish until all are done.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..a.publishers)
        .map(|_| {
            let (api, data, url, next) = (api.clone(), data.clone(), url, next.clone());
            let channels = a.channels;
            tokio::spawn(async move {
                let mut failed = Vec::new();
                loop {
                    let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seq >= total {
                        return failed;
                    }
                    let body = json!({ "text": data }).to_string();
                    match api.post(&url(seq % channels), body, true).await {
                        Ok(200) => {}
                        other => failed.push(format!("{other:?}")),
                    }
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.map_err(|e| e.to_string())?);
    }
    let took = started.elapsed();
    let failed = failures.len();
    if let Some(first) = failures.first() {
        eprintln!("{failed} publishes failed; first: {first}");
    }
    let cpu1 = measure::cpu_seconds(broker).unwrap_or_default();
    let nodes_cpu1 = measure::cpu_of(&cluster.node_pids());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mem1, _) = broker_memory(&cluster, &api).await;
    let per_thousand = (mem1 - mem0) / (a.channels as f64 / 1000.0);
    let broker_us = (cpu1 - cpu0) * 1e6 / total as f64;
    let nodes_us = (nodes_cpu1 - nodes_cpu0) * 1e6 / total as f64;
    let name = cluster.broker_name();

    let mut t = Table::default();
    t.row("bus", name);
    t.row(
        "channels × messages (history kept)",
        format!("{} × {} ({} each)", a.channels, a.messages, a.history),
    );
    t.row(
        "publishes/s (publishers)",
        format!(
            "{:.0} ({})",
            total as f64 / took.as_secs_f64(),
            a.publishers
        ),
    );
    t.row(
        format!("broker memory per 1,000 channels ({how})"),
        measure::human_bytes(per_thousand),
    );
    t.row("broker CPU per publish", format!("{broker_us:.1} µs"));
    t.row("nodes' CPU per publish", format!("{nodes_us:.1} µs"));
    t.row("publishes not answered 200", failed.to_string());
    t.print(&format!("bus-channels over {name}"));
    measure::write_json(
        opts.json.as_deref(),
        &json!({
            "scenario": "bus-channels",
            "bus": name,
            "machine": measure::machine(),
            "channels": a.channels,
            "messages_per_channel": a.messages,
            "history_size": a.history,
            "size": a.size,
            "publishes_per_second": total as f64 / took.as_secs_f64(),
            "broker_memory_per_1000_channels": per_thousand,
            "broker_memory_counted": how,
            "broker_cpu_us_per_publish": broker_us,
            "nodes_cpu_us_per_publish": nodes_us,
            "failed": failed,
        }),
    )?;
    Ok(failed == 0)
}
