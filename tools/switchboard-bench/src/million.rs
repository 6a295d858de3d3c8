//! The `cluster-idle` scenario (alias `million`): C idle WebSocket
//! connections held by a cluster of gateway processes joined over one
//! nats-server, on one machine.
//!
//! A process here may hold 20,000 open files, so a million connections
//! take about 58 gateway processes (a node caps itself at 17,792 clients
//! under that limit: docs/operations.md, "Open files") and as many client
//! workers.
//!
//! 0. **Sysctls** (as root, unless `--no-sysctl`): `net.core.somaxconn`,
//!    `net.ipv4.tcp_max_syn_backlog` and `net.core.netdev_max_backlog`
//!    raised to 65,535 (loopback packets wait in the per-CPU backlog), and
//!    `net.ipv4.ip_local_port_range` if `--port-range` asks; every change
//!    is printed and undone at the end (`--keep-sysctls` keeps them). The
//!    clients bind to enough source addresses 127.0.0.2 … that no address
//!    uses more than half the ephemeral ports.
//! 1. **Cluster**: nats-server with JetStream (channels need it) and its
//!    monitoring port, on free ports; `--nodes` gateways `n000`, `n001`, …
//!    in dev mode (no origin), sessions off (`--session-ttl 0s`), pings
//!    every `--ping-interval`, the channel's namespace open to subscribers;
//!    the tool waits until every node lists all of them (`GET /v1/nodes`).
//! 2. **Connect**: C clients spread evenly, one worker per node, each
//!    client subscribing to `--channel` with the native protocol
//!    (`connected` push, `subscribe`, its reply) and answering pings as soon
//!    as it is open. Each node must then count its share of connections
//!    and subscribers.
//! 3. **Hold** for `--hold`: every node's count is checked every 10 s;
//!    the workers count the pings they answered and any connection that
//!    ended. Memory after the hold: the gateways' RSS and PSS, the
//!    workers' RSS, the kernel's slab (`/proc/meminfo`) and sockets
//!    (`/proc/net/sockstat`) against before the connections; nats-server's
//!    CPU and traffic (`/varz`) during the hold: the cluster's heartbeats.
//! 4. **Publish** one message on the channel through the first node's
//!    control API: time until the last subscriber had it (the workers
//!    timestamp each receipt; one clock).
//! 5. **Drain** the last node (SIGTERM): its clients must all be closed with
//!    1012, every other client untouched (no close, still counted by its
//!    node).
//! 6. Everything is killed (also on an error, SIGINT or SIGTERM, or when
//!    the machine's available memory falls below `--min-available-mib`).

use crate::engine::{share_concurrency, stamp, Fleet, Mode, Receipts, Report};
use crate::measure::{self, bytes_change, human_bytes, unix_nanos, CpuMeter, Percentiles, Table};
use crate::servers::{free_port, Api, Gateway};
use crate::Opts;
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use switchboard_test_util::nats::NatsServer;
use tokio::signal::unix::{signal, SignalKind};

/// Options of `cluster-idle`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Connections to open and hold, spread evenly over the nodes.
    #[arg(long, default_value_t = 1_000_000)]
    connections: usize,
    /// Gateway nodes; 0: as few as `--per-node` allows (at least 2).
    #[arg(long, default_value_t = 0)]
    nodes: usize,
    /// Most connections per node when `--nodes` is 0 (a node takes at most
    /// 17,792 under a 20,000-file limit).
    #[arg(long, default_value_t = 17_500)]
    per_node: usize,
    /// How long the connections stay idle.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// The gateways' ping interval.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// The channel every client subscribes to (its namespace is opened to
    /// subscribers on every node).
    #[arg(long, default_value = "bench:all")]
    channel: String,
    /// Longest wait for the published message to reach everyone.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    delivery_timeout: Duration,
    /// Skip the drain of the last node.
    #[arg(long)]
    no_drain: bool,
    /// Set no sysctl.
    #[arg(long)]
    no_sysctl: bool,
    /// `net.ipv4.ip_local_port_range` to set (`keep`: leave it). The
    /// clients bind to source addresses before connecting, and a bind to
    /// port 0 scans for a free port of its address (odd ports first): kept
    /// well below half full, binds stay cheap.
    #[arg(long, value_name = "LOW-HIGH", default_value = "1024-65535")]
    port_range: String,
    /// Leave the sysctls as set instead of restoring them at the end.
    #[arg(long)]
    keep_sysctls: bool,
    /// Connections opened per second over all workers (evenly spaced); 0:
    /// as fast as `--concurrency` allows (a million connect in about 90 s
    /// here, the cluster's heartbeats unaffected: they have a thread of
    /// their own in every node).
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Stop everything when the machine's `MemAvailable` falls below this.
    #[arg(long, default_value_t = 1536, value_name = "MiB")]
    min_available_mib: u64,
}

/// Phase of the published message, as stamped.
const PUBLISH: u8 = b'p';

/// How long the nodes have to see each other.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Gateways started at once.
const START_BATCH: usize = 8;

/// Runs the scenario; `Ok(false)` if the measurement is invalid.
pub(crate) async fn run(opts: &Opts, a: Args) -> Result<bool, String> {
    if a.connections == 0 {
        return Err("--connections: at least 1".into());
    }
    let mut sysctls = Sysctls::new(!a.keep_sysctls);
    if !a.no_sysctl {
        for name in [
            "net.core.somaxconn",
            "net.ipv4.tcp_max_syn_backlog",
            "net.core.netdev_max_backlog",
        ] {
            sysctls.raise(name, 65_535);
        }
        if a.port_range != "keep" {
            let r = &a.port_range;
            let (lo, hi) = r
                .split_once('-')
                .and_then(|(l, h)| Some((l.parse::<u16>().ok()?, h.parse::<u16>().ok()?)))
                .filter(|(l, h)| l < h)
                .ok_or_else(|| format!("--port-range {r}: LOW-HIGH"))?;
            sysctls.set("net.ipv4.ip_local_port_range", &format!("{lo}\t{hi}"));
        }
    }
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // Dropping `measure_cluster` kills every process it started.
    let r = tokio::select! {
        r = measure_cluster(opts, &a, &sysctls) => r,
        _ = sigint.recv() => Err("interrupted (SIGINT); everything is stopped".into()),
        _ = sigterm.recv() => Err("terminated (SIGTERM); everything is stopped".into()),
        e = memory_guard(a.min_available_mib) => Err(e),
    };
    eprintln!(
        "switchboard-bench: cluster-idle ended after {:.0} s; every process it started was killed",
        started.elapsed().as_secs_f64()
    );
    drop(sysctls);
    let (json, problems) = r?;
    measure::write_json(opts.json.as_deref(), &json)?;
    Ok(crate::report_problems(&problems))
}

/// Fails once `MemAvailable` is below `min_mib` (checked twice a second, for
/// at most a day).
async fn memory_guard(min_mib: u64) -> String {
    for _ in 0..2 * 86_400 {
        let avail = meminfo("MemAvailable:");
        if avail > 0 && avail < min_mib << 20 {
            return format!(
                "the machine has {} available, below --min-available-mib {min_mib}: stopped",
                human_bytes(avail as f64)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    "ran for a day".into()
}

/// Sysctls set by the tool, restored on drop unless told to keep them.
#[derive(Debug)]
struct Sysctls {
    /// (name, value before, value set).
    changed: Vec<(String, String, String)>,
    /// Why a sysctl could not be set.
    failed: Vec<String>,
    restore: bool,
}

impl Sysctls {
    fn new(restore: bool) -> Self {
        Self {
            changed: Vec::new(),
            failed: Vec::new(),
            restore,
        }
    }

    fn path(name: &str) -> String {
        format!("/proc/sys/{}", name.replace('.', "/"))
    }

    /// Sets `name` to `value` (whitespace-separated numbers) if it differs.
    fn set(&mut self, name: &str, value: &str) {
        let path = Self::path(name);
        let old = match std::fs::read_to_string(&path) {
            Ok(v) => v.trim().to_owned(),
            Err(e) => return self.failed.push(format!("{name}: {e}")),
        };
        let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        if words(&old) == words(value) {
            return;
        }
        match std::fs::write(&path, value) {
            Ok(()) => {
                eprintln!(
                    "switchboard-bench: sysctl {name}: {} -> {}{}",
                    words(&old).join(" "),
                    words(value).join(" "),
                    if self.restore {
                        " (restored at the end)"
                    } else {
                        ""
                    }
                );
                self.changed.push((name.into(), old, value.into()));
            }
            Err(e) => {
                eprintln!("switchboard-bench: cannot set sysctl {name} (root?): {e}");
                self.failed.push(format!("{name}: {e}"));
            }
        }
    }

    /// Raises the number `name` to at least `min`.
    fn raise(&mut self, name: &str, min: u64) {
        let now: Option<u64> = std::fs::read_to_string(Self::path(name))
            .ok()
            .and_then(|v| v.trim().parse().ok());
        if now.is_some_and(|v| v < min) {
            self.set(name, &min.to_string());
        }
    }

    /// `name: before -> set` of each change.
    fn describe(&self) -> Vec<String> {
        let one = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        self.changed
            .iter()
            .map(|(n, old, new)| format!("{n}: {} -> {}", one(old), one(new)))
            .collect()
    }
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        if !self.restore {
            return;
        }
        for (name, old, _) in self.changed.iter().rev() {
            match std::fs::write(Self::path(name), old) {
                Ok(()) => eprintln!("switchboard-bench: sysctl {name} restored to {old}"),
                Err(e) => eprintln!("switchboard-bench: cannot restore sysctl {name}: {e}"),
            }
        }
    }
}

/// A field of `/proc/meminfo`, bytes (0 if missing).
fn meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// What the kernel holds, machine-wide.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Kernel {
    /// `Slab`, bytes.
    slab: u64,
    /// `SUnreclaim`, bytes.
    sunreclaim: u64,
    /// `MemAvailable`, bytes.
    available: u64,
    /// `/proc/net/sockstat` TCP `inuse`.
    tcp_inuse: u64,
    /// TCP `tw`.
    tcp_tw: u64,
    /// TCP `mem` (pages of socket buffers) in bytes.
    tcp_mem: u64,
    /// `sockets: used`.
    sockets: u64,
    /// Open files, machine-wide (`/proc/sys/fs/file-nr`).
    files: u64,
    /// Packets dropped by the per-CPU backlogs (`/proc/net/softnet_stat`).
    softnet_dropped: u64,
}

impl Kernel {
    fn now() -> Self {
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
        let field = |line: &str, name: &str| -> u64 {
            sockstat
                .lines()
                .find(|l| l.starts_with(line))
                .and_then(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let at = w.iter().position(|x| *x == name)?;
                    w.get(at + 1)?.parse().ok()
                })
                .unwrap_or(0)
        };
        let softnet_dropped = std::fs::read_to_string("/proc/net/softnet_stat")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
            .sum();
        Self {
            slab: meminfo("Slab:"),
            sunreclaim: meminfo("SUnreclaim:"),
            available: meminfo("MemAvailable:"),
            tcp_inuse: field("TCP:", "inuse"),
            tcp_tw: field("TCP:", "tw"),
            tcp_mem: field("TCP:", "mem") * 4096,
            sockets: field("sockets:", "used"),
            files: std::fs::read_to_string("/proc/sys/fs/file-nr")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0),
            softnet_dropped,
        }
    }
}

/// nats-server with JetStream and monitoring, and the gateway nodes.
struct Nodes {
    /// Declared before `nats`: dropped (killed) first.
    nodes: Vec<Gateway>,
    nats: NatsServer,
    monitor: SocketAddr,
}

impl Nodes {
    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(Gateway::pid).collect()
    }

    fn controls(&self) -> Vec<SocketAddr> {
        self.nodes.iter().filter_map(|g| g.control).collect()
    }
}

impl Drop for Nodes {
    /// Every node is sent SIGKILL before any is waited for: killed one at
    /// a time, the others would report the first ones lost meanwhile.
    fn drop(&mut self) {
        for g in &mut self.nodes {
            g.kill_now();
        }
    }
}

/// Starts nats-server and `n` nodes with `args`, `START_BATCH` at a time,
/// and waits until every node lists all of them.
async fn start_cluster(opts: &Opts, n: usize, args: &[String]) -> Result<Nodes, String> {
    let monitor: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mon_args = vec!["-m".to_owned(), monitor.port().to_string()];
    let nats = tokio::task::spawn_blocking(move || NatsServer::start_with(true, &mon_args))
        .await
        .map_err(|e| format!("nats-server did not start: {e}"))?;
    let mut nodes = Vec::with_capacity(n);
    let width = if n > 100 { 3 } else { 2 };
    for first in (0..n).step_by(START_BATCH) {
        let batch = (first..n.min(first + START_BATCH)).map(|k| {
            let mut a = args.to_vec();
            a.extend(["--nats".into(), nats.url()]);
            a.extend(["--node-id".into(), format!("n{k:0width$}")]);
            async move { Gateway::spawn(opts, &a).await }
        });
        for g in futures_util::future::join_all(batch).await {
            nodes.push(g?);
        }
    }
    let c = Nodes {
        nodes,
        nats,
        monitor,
    };
    crate::servers::await_joined(c.controls(), n, JOIN_TIMEOUT).await?;
    Ok(c)
}

/// Each node's open connections (`GET /v1/stats`); `None` where it did not
/// answer.
async fn node_counts(api: &Api, controls: &[SocketAddr]) -> Vec<Option<u64>> {
    let calls = controls
        .iter()
        .map(|&c| async move { api.connections(c).await.ok() });
    futures_util::future::join_all(calls).await
}

/// Each node's subscribers of `channel` (`GET /v1/channels`).
async fn node_subscribers(api: &Api, controls: &[SocketAddr], channel: &str) -> Vec<u64> {
    let calls = controls.iter().map(|&c| async move {
        api.get_json(c, "/v1/channels").await.ok().map_or(0, |v| {
            v["channels"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|ch| ch["channel"] == channel)
                .map(|ch| ch["subscribers"].as_u64().unwrap_or(0))
                .sum()
        })
    });
    futures_util::future::join_all(calls).await
}

/// NATS `/varz` counters: (in_msgs, out_msgs, in_bytes, out_bytes).
async fn varz(api: &Api, monitor: SocketAddr) -> Result<[u64; 4], String> {
    let v = api.get_json(monitor, "/varz").await?;
    let f = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok([f("in_msgs"), f("out_msgs"), f("in_bytes"), f("out_bytes")])
}

/// Sum of the RSS of `pids`, bytes.
fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| measure::rss(p)).sum()
}

/// Waits until none of `pids` runs (a zombie counts as gone), at most
/// `bound`; how many still run.
async fn wait_gone(pids: &[u32], bound: Duration) -> usize {
    let running = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| s[s.rfind(')')? + 2..].chars().next())
            .is_some_and(|state| state != 'Z')
    };
    let deadline = Instant::now() + bound;
    loop {
        let left = pids.iter().filter(|p| running(p)).count();
        if left == 0 || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per connection, bytes.
fn per(total: f64, n: usize) -> f64 {
    total / n.max(1) as f64
}

/// Drop reasons summed over receipts.
fn reasons(rs: &[&Receipts]) -> Vec<(String, u64)> {
    let mut m = std::collections::BTreeMap::<String, u64>::new();
    for r in rs {
        for (k, n) in &r.drop_reasons {
            *m.entry(k.clone()).or_default() += n;
        }
    }
    m.into_iter().collect()
}

/// Runs the phases; the JSON and the problems. Every process it starts is
/// owned here and killed when this returns or is dropped.
async fn measure_cluster(
    opts: &Opts,
    a: &Args,
    sysctls: &Sysctls,
) -> Result<(serde_json::Value, Vec<String>), String> {
    let total = a.connections;
    let n = if a.nodes == 0 {
        total.div_ceil(a.per_node.max(1)).max(2)
    } else {
        a.nodes
    }
    .min(total);
    let shares: Vec<usize> = (0..n)
        .map(|k| total * (k + 1) / n - total * k / n)
        .collect();
    let max_share = shares.iter().copied().max().unwrap_or(0);
    // Source addresses: each uses at most a sixteenth of the ephemeral ports
    // (an eighth of the odd ones a bind to port 0 tries first). Binds slow
    // down as an address fills up: with 71 addresses half full (a million
    // clients, the default range) the connect rate fell from 10,000/s to
    // 1,000/s, most of both cores in the kernel.
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut w = s.split_whitespace().map(|v| v.parse::<usize>().ok());
            Some(w.next()??.abs_diff(w.next()??) + 1)
        })
        .unwrap_or(28_232);
    let source_addrs = (16 * total)
        .div_ceil(range)
        .max(usize::from(opts.source_addrs))
        .min(250) as u8;
    if usize::from(source_addrs) * range < total {
        return Err(format!(
            "{total} connections need more than 250 source addresses with {range} ephemeral \
             ports each: widen them with --port-range"
        ));
    }
    let mut problems: Vec<String> = sysctls
        .failed
        .iter()
        .map(|f| format!("sysctl not set: {f}"))
        .collect();
    let ping = humantime::format_duration(a.ping_interval).to_string();
    let namespace = a
        .channel
        .split_once(':')
        .map(|(ns, _)| ns)
        .ok_or_else(|| format!("--channel {}: namespace:name", a.channel))?;
    let serve: Vec<String> = vec![
        "--namespace".into(),
        format!("{namespace}:subscribe"),
        "--session-ttl".into(),
        "0s".into(),
        "--ping-interval".into(),
        ping.clone(),
        "--max-connections".into(),
        max_share.to_string(),
    ];
    let k0 = Kernel::now();
    eprintln!(
        "switchboard-bench: starting nats-server and {n} nodes ({max_share} connections at most \
         each, {source_addrs} source addresses, pings every {ping}); {} available",
        human_bytes(k0.available as f64)
    );
    let t_start = Instant::now();
    let cluster = start_cluster(opts, n, &serve).await?;
    let join_secs = t_start.elapsed().as_secs_f64();
    let api = Api::new();
    let controls = cluster.controls();
    let node_pids = cluster.pids();
    let nats_pid: Vec<u32> = cluster.nats.pid().into_iter().collect();
    let node_command = cluster.nodes[0].command().map(<[String]>::to_vec);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let empty = measure::memory(&node_pids);
    let nats_rss0 = rss_of(&nats_pid);
    let k_empty = Kernel::now();

    // Workers: one per node (more if --per-process is lower), clients
    // subscribing and holding as they open.
    let mode = Mode::Receive {
        subscribe: Some(a.channel.clone()),
        greeting: false,
    };
    let mut configs = Vec::new();
    let mut node_of = Vec::new();
    for (k, node) in cluster.nodes.iter().enumerate() {
        let offset: usize = shares[..k].iter().sum();
        for mut c in opts.workers_for(node, shares[k], 1, Some("switchboard.v1"), mode.clone()) {
            c.offset += offset;
            c.source_addrs = source_addrs;
            c.hold_while_connecting = true;
            configs.push(c);
            node_of.push(k);
        }
    }
    share_concurrency(&mut configs, opts.concurrency);
    for c in &mut configs {
        c.connect_rate = a.connect_rate * c.count as f64 / total as f64;
    }
    let counts: Vec<usize> = configs.iter().map(|c| c.count).collect();
    let mut fleet = Fleet::spawn(&configs)?;
    let worker_pids = fleet.pids();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let workers_rss0 = rss_of(&worker_pids);
    let groups = vec![
        ("gateways", node_pids.clone()),
        ("clients", worker_pids.clone()),
        ("nats", nats_pid.clone()),
    ];

    // 2. Connect.
    let paced = if a.connect_rate > 0.0 {
        total as f64 / a.connect_rate * 1.5
    } else {
        0.0
    };
    let limit = opts
        .connect_timeout
        .max(Duration::from_secs((total / 4000) as u64))
        .max(Duration::from_secs_f64(paced));
    eprintln!(
        "switchboard-bench: connecting {total} clients ({} workers, {} handshakes in flight, \
         at most {limit:?})",
        configs.len(),
        opts.concurrency
    );
    let v0 = varz(&api, cluster.monitor).await?;
    let cpu = CpuMeter::start(groups.clone());
    let progress = async {
        let t = Instant::now();
        for _ in 0..limit.as_secs() / 10 + 1 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let open: u64 = node_counts(&api, &controls).await.iter().flatten().sum();
            let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
            eprintln!(
                "switchboard-bench: {open} of {total} open after {:.0} s; {} available, \
                 load {}",
                t.elapsed().as_secs_f64(),
                human_bytes(meminfo("MemAvailable:") as f64),
                load.split_whitespace().next().unwrap_or("?")
            );
        }
        std::future::pending::<()>().await;
    };
    let c = tokio::select! {
        c = fleet.connect(limit) => c?,
        () = progress => unreachable!("pending"),
    };
    let connect_cpu = cpu.cores();
    let v1 = varz(&api, cluster.monitor).await?;
    let k_connected = Kernel::now();
    if c.open < total {
        problems.push(format!(
            "{} of {total} connections failed; first: {}",
            c.failed,
            c.first_error.clone().unwrap_or_default()
        ));
    }
    let counted = node_counts(&api, &controls).await;
    let subscribers = node_subscribers(&api, &controls, &a.channel).await;
    for (k, (got, subs)) in counted.iter().zip(&subscribers).enumerate() {
        if *got != Some(shares[k] as u64) || *subs != shares[k] as u64 {
            problems.push(format!(
                "node {k} counts {got:?} connections and {subs} subscribers, {} expected",
                shares[k]
            ));
        }
    }
    eprintln!(
        "switchboard-bench: {} open in {:.1} s ({:.0}/s); holding for {:?}",
        c.open, c.seconds, c.rate, a.hold
    );

    // 3. Hold.
    let before_hold = fleet.receipts(0).await?;
    let vh0 = varz(&api, cluster.monitor).await?;
    let hold_cpu_meter = CpuMeter::start(groups.clone());
    let hold_end = Instant::now() + a.hold;
    let mut checks = 0;
    let mut lowest: Option<u64> = None;
    while Instant::now() < hold_end {
        let step = Duration::from_secs(10).min(hold_end - Instant::now());
        tokio::time::sleep(step).await;
        let counts_now = node_counts(&api, &controls).await;
        checks += 1;
        for (k, got) in counts_now.iter().enumerate() {
            if *got != Some(shares[k] as u64) {
                problems.push(format!(
                    "during the hold node {k} counted {got:?} connections, {} expected",
                    shares[k]
                ));
            }
        }
        let sum: u64 = counts_now.iter().flatten().sum();
        lowest = Some(lowest.map_or(sum, |l| l.min(sum)));
    }
    let hold_cpu = hold_cpu_meter.cores();
    let hold_secs = hold_cpu_meter.seconds();
    let vh1 = varz(&api, cluster.monitor).await?;
    let after_hold = fleet.receipts(0).await?;
    let held = measure::memory(&node_pids);
    let workers_rss = rss_of(&worker_pids);
    let nats_rss = rss_of(&nats_pid);
    let k_held = Kernel::now();
    let pings_total: u64 = after_hold.iter().map(|r| r.pings).sum();
    let pings_hold = pings_total - before_hold.iter().map(|r| r.pings).sum::<u64>();
    let dropped: u64 = after_hold.iter().map(|r| r.dropped).sum();
    if dropped > 0 {
        problems.push(format!(
            "{dropped} connections ended before the drain: {:?}",
            reasons(&after_hold.iter().collect::<Vec<_>>())
        ));
    }
    // Each connection is pinged every interval from its opening: about
    // hold / interval pings each, and at least one fewer.
    let rounds = hold_secs / a.ping_interval.as_secs_f64();
    let expected_pings = c.open as f64 * rounds;
    let least = c.open as f64 * (rounds.floor() - 1.0);
    if (pings_hold as f64) < least {
        problems.push(format!(
            "{pings_hold} pings answered during the hold, at least {least:.0} expected"
        ));
    }

    // What the hold showed, printed at once (a later phase may fail).
    let hs0 = hold_secs.max(1e-9);
    eprintln!(
        "switchboard-bench: after the hold: {} open ({dropped} ended, lowest node total {:?}), \
         {pings_hold} pings answered; gateways RSS {} → {} ({:.0} B/conn), PSS {:.0} B/conn; \
         slab {} → {} ({:.0} B/conn), SUnreclaim {:.0} B/conn, TCP inuse {}; workers RSS {} \
         ({:.0} B/conn); NATS {:.0} in / {:.0} out msgs/s, {:.3} cores; gateways {:.2} cores, \
         clients {:.2}, others {:.2}",
        c.open as u64 - dropped,
        lowest,
        human_bytes(empty.rss as f64),
        human_bytes(held.rss as f64),
        per(held.rss as f64 - empty.rss as f64, c.open),
        per(held.pss as f64 - empty.pss as f64, c.open),
        human_bytes(k_empty.slab as f64),
        human_bytes(k_held.slab as f64),
        per(k_held.slab as f64 - k_empty.slab as f64, c.open),
        per(k_held.sunreclaim as f64 - k_empty.sunreclaim as f64, c.open),
        k_held.tcp_inuse,
        human_bytes(workers_rss as f64),
        per(workers_rss as f64 - workers_rss0 as f64, c.open),
        vh1[0].saturating_sub(vh0[0]) as f64 / hs0,
        vh1[1].saturating_sub(vh0[1]) as f64 / hs0,
        measure::cores_of(&hold_cpu, "nats"),
        measure::cores_of(&hold_cpu, "gateways"),
        measure::cores_of(&hold_cpu, "clients"),
        measure::cores_of(&hold_cpu, "others"),
    );
    if !problems.is_empty() {
        eprintln!("switchboard-bench: problems so far: {problems:?}");
    }

    // 4. One message to every subscriber.
    eprintln!("switchboard-bench: publishing one message on {}", a.channel);
    let url = format!("http://{}/v1/channels/{}/messages", controls[0], a.channel);
    let sent_ns = unix_nanos();
    let body = json!({ "text": stamp(PUBLISH, 1, sent_ns, 64) }).to_string();
    let status = api.post(&url, body, true).await;
    let answer_ms = (unix_nanos() - sent_ns) as f64 / 1e6;
    if !matches!(status, Ok(200..=299)) {
        problems.push(format!("the publish was refused: {status:?}"));
    }
    let deadline = Instant::now() + a.delivery_timeout;
    let mut reached = 0;
    while reached < fleet.len() {
        match fleet.next(deadline).await? {
            Some((_, Report::Reached(PUBLISH, 1))) => reached += 1,
            Some(_) => {}
            None => break,
        }
    }
    let got = fleet.receipts(PUBLISH).await?;
    let mut lat = measure::histogram();
    let (mut delivered, mut last_us) = (0, 0);
    for r in &got {
        measure::add_buckets(&mut lat, &r.latency);
        for &(_, k, us) in &r.per_message {
            delivered += k;
            last_us = last_us.max(us);
        }
    }
    let delivery = Percentiles::of(&lat);
    if delivered < c.open as u64 {
        problems.push(format!(
            "the message reached {delivered} of {} subscribers within {:?}",
            c.open, a.delivery_timeout
        ));
    }
    let after_publish = fleet.receipts(0).await?;
    let dropped_publish = after_publish.iter().map(|r| r.dropped).sum::<u64>() - dropped;
    if dropped_publish > 0 {
        problems.push(format!(
            "{dropped_publish} connections ended around the publish: {:?}",
            reasons(&after_publish.iter().collect::<Vec<_>>())
        ));
    }

    // 5. Drain the last node.
    let drain = if a.no_drain {
        None
    } else {
        let k = n - 1;
        let pid = cluster.nodes[k].pid().ok_or("a spawned node")?;
        let mine: Vec<usize> = (0..node_of.len()).filter(|&w| node_of[w] == k).collect();
        let expected: usize = mine.iter().map(|&w| counts[w]).sum();
        let before = fleet.receipts(0).await?;
        let dropped_before: Vec<u64> = before.iter().map(|r| r.dropped).collect();
        let counts_before = node_counts(&api, &controls).await;
        eprintln!("switchboard-bench: draining node {k} (SIGTERM to {pid}, {expected} clients)");
        let t0 = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .map_err(|e| format!("kill: {e}"))?;
        if !status.success() {
            return Err(format!("kill -TERM {pid}: {status}"));
        }
        // Until its clients are all closed and it has exited (bounded).
        let bound = Duration::from_secs(60);
        let mut closed_secs = None;
        let mut exited_secs = None;
        while t0.elapsed() < bound && (closed_secs.is_none() || exited_secs.is_none()) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if exited_secs.is_none() && wait_gone(&[pid], Duration::ZERO).await == 0 {
                exited_secs = Some(t0.elapsed().as_secs_f64());
            }
            if closed_secs.is_none() {
                let now_r = fleet.receipts(0).await?;
                let closed: u64 = mine
                    .iter()
                    .map(|&w| now_r[w].dropped - dropped_before[w])
                    .sum();
                if closed >= expected as u64 {
                    closed_secs = Some(t0.elapsed().as_secs_f64());
                }
            }
        }
        // Let anything else that would follow show, then look.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = fleet.receipts(0).await?;
        let drained: Vec<&Receipts> = mine.iter().map(|&w| &after[w]).collect();
        let others: Vec<usize> = (0..after.len()).filter(|w| !mine.contains(w)).collect();
        let drained_reasons = reasons(&drained);
        let closed_1012: u64 = drained_reasons
            .iter()
            .filter(|(k, _)| k.starts_with("closed by the server: code 1012"))
            .map(|(_, n)| n)
            .sum();
        let closed_other: u64 = drained_reasons
            .iter()
            .filter(|(k, _)| !k.starts_with("closed by the server: code 1012"))
            .map(|(_, n)| n)
            .sum();
        // Against the moment of the SIGTERM.
        let others_dropped: u64 = others
            .iter()
            .map(|&w| after[w].dropped - dropped_before[w])
            .sum();
        let remaining = controls[..k].to_vec();
        let counts_after = node_counts(&api, &remaining).await;
        let untouched = counts_after
            .iter()
            .zip(&counts_before)
            .filter(|(got, was)| got.is_some() && got == was)
            .count();
        let listed = api
            .get_json(controls[0], "/v1/nodes")
            .await
            .map(|v| v["nodes"].as_array().map_or(0, Vec::len))
            .unwrap_or(0);
        if closed_1012 != expected as u64 || closed_other > 0 {
            problems.push(format!(
                "drain: {closed_1012} of node {k}'s {expected} clients closed with 1012; \
                 others: {drained_reasons:?}"
            ));
        }
        if others_dropped > 0 {
            problems.push(format!(
                "drain: {others_dropped} clients of other nodes ended: {:?}",
                reasons(&others.iter().map(|&w| &after[w]).collect::<Vec<_>>())
            ));
        }
        if untouched != remaining.len() {
            problems.push(format!(
                "drain: {untouched} of the other {} nodes count the clients they had: \
                 {counts_after:?}",
                remaining.len()
            ));
        }
        Some(json!({
            "node": k,
            "pid": pid,
            "clients": expected,
            "closed_1012": closed_1012,
            "closed_otherwise": closed_other,
            "reasons": drained_reasons,
            "all_closed_seconds": closed_secs,
            "exited_seconds": exited_secs,
            "other_clients_ended": others_dropped,
            "other_nodes_with_all_their_clients": untouched,
            "other_nodes": remaining.len(),
            "nodes_listed_after": listed,
        }))
    };

    // 6. Clean up: workers, nodes, nats-server (owned here).
    let t_clean = Instant::now();
    drop(fleet);
    drop(cluster);
    let mut all_pids = worker_pids.clone();
    all_pids.extend(&node_pids);
    all_pids.extend(&nats_pid);
    let left = wait_gone(&all_pids, Duration::from_secs(60)).await;
    let clean_secs = t_clean.elapsed().as_secs_f64();
    if left > 0 {
        problems.push(format!("{left} processes still there 60 s after the kill"));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let k_clean = Kernel::now();

    // The table.
    let gw_rss = held.rss as f64 - empty.rss as f64;
    let gw_pss = held.pss as f64 - empty.pss as f64;
    let slab = k_held.slab as f64 - k_empty.slab as f64;
    let sunreclaim = k_held.sunreclaim as f64 - k_empty.sunreclaim as f64;
    let cores = |cpu: &[(&'static str, f64)], g: &str| measure::cores_of(cpu, g);
    let d = |x: [u64; 4], y: [u64; 4], i: usize| y[i].saturating_sub(x[i]);
    let hs = hold_secs.max(1e-9);
    let mut t = Table::default();
    t.row(
        "nodes (gateway processes) / client workers",
        format!(
            "{n} ({max_share} clients at most each) / {} ({source_addrs} source addresses)",
            configs.len()
        ),
    );
    t.row(
        "sysctls set by the tool",
        if sysctls.changed.is_empty() {
            "none".to_owned()
        } else {
            sysctls.describe().join("; ")
        },
    );
    t.row(
        "gateways: dev mode, sessions off",
        format!(
            "pings every {ping}; further flags: {}",
            if opts.gateway_arg.is_empty() {
                "none".to_owned()
            } else {
                opts.gateway_arg.join(" ")
            }
        ),
    );
    t.row(
        "nats-server + nodes started, all joined",
        format!("{join_secs:.1} s"),
    );
    t.row(
        "connected and subscribed",
        format!("{} of {total} in {:.1} s", c.open, c.seconds),
    );
    t.row(
        "— handshakes + subscribes per second",
        format!("{:.0}/s", c.rate),
    );
    t.row("— latency p50 / p99 / p99.9 / max", c.latency.brief());
    t.row(
        "— CPU: gateways / clients / nats / others",
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} cores",
            cores(&connect_cpu, "gateways"),
            cores(&connect_cpu, "clients"),
            cores(&connect_cpu, "nats"),
            cores(&connect_cpu, "others")
        ),
    );
    t.row(
        "— NATS messages in / out while connecting",
        format!("{} / {}", d(v0, v1, 0), d(v0, v1, 1)),
    );
    t.row(
        format!("held idle for {hold_secs:.0} s"),
        format!(
            "{} still open, {dropped} ended; lowest count of the nodes {}",
            c.open as u64 - dropped,
            lowest.map_or("-".into(), |l| l.to_string())
        ),
    );
    t.row(
        "— pings answered during the hold",
        format!("{pings_hold} (≈ {expected_pings:.0} expected)"),
    );
    t.row(
        "— CPU: gateways / clients / nats / others",
        format!(
            "{:.2} / {:.2} / {:.3} / {:.2} cores",
            cores(&hold_cpu, "gateways"),
            cores(&hold_cpu, "clients"),
            cores(&hold_cpu, "nats"),
            cores(&hold_cpu, "others")
        ),
    );
    t.row(
        "— NATS in / out per second (heartbeats)",
        format!(
            "{:.0} / {:.0} msgs, {} / {} per second",
            d(vh0, vh1, 0) as f64 / hs,
            d(vh0, vh1, 1) as f64 / hs,
            human_bytes(d(vh0, vh1, 2) as f64 / hs),
            human_bytes(d(vh0, vh1, 3) as f64 / hs)
        ),
    );
    t.row(
        "gateways' memory: empty → held (RSS)",
        format!(
            "{} → {} (PSS {} → {})",
            human_bytes(empty.rss as f64),
            human_bytes(held.rss as f64),
            human_bytes(empty.pss as f64),
            human_bytes(held.pss as f64)
        ),
    );
    t.row(
        "— per connection, RSS / PSS",
        format!("{:.0} / {:.0} B", per(gw_rss, c.open), per(gw_pss, c.open)),
    );
    t.row(
        "kernel slab: before → held (Δ per connection)",
        format!(
            "{} ({:.0} B; both socket ends)",
            bytes_change(k_empty.slab, k_held.slab),
            per(slab, c.open)
        ),
    );
    t.row(
        "— SUnreclaim (Δ per connection)",
        format!(
            "{} ({:.0} B)",
            bytes_change(k_empty.sunreclaim, k_held.sunreclaim),
            per(sunreclaim, c.open)
        ),
    );
    t.row(
        "— sockstat TCP inuse / socket buffers",
        format!(
            "{} → {} / {}",
            k_empty.tcp_inuse,
            k_held.tcp_inuse,
            human_bytes(k_held.tcp_mem as f64)
        ),
    );
    t.row(
        "client workers' memory (RSS)",
        format!(
            "{} ({:.0} B per connection)",
            bytes_change(workers_rss0, workers_rss),
            per(workers_rss as f64 - workers_rss0 as f64, c.open)
        ),
    );
    t.row(
        "nats-server memory (RSS)",
        bytes_change(nats_rss0, nats_rss),
    );
    t.row(
        "machine: available memory before → held",
        bytes_change(k0.available, k_held.available),
    );
    t.row(
        "one message to every subscriber: last delivery",
        format!(
            "{:.0} ms ({delivered} of {} delivered; publish answered in {answer_ms:.1} ms)",
            last_us as f64 / 1000.0,
            c.open
        ),
    );
    t.row(
        "— delivery latency p50 / p99 / p99.9 / max",
        delivery.brief(),
    );
    t.row(
        "— connections that ended around the publish",
        dropped_publish.to_string(),
    );
    if let Some(dr) = &drain {
        t.row(
            "drain of one node (SIGTERM)",
            format!(
                "{} of its {} clients closed with 1012 ({} otherwise) in {}; exited after {}",
                dr["closed_1012"],
                dr["clients"],
                dr["closed_otherwise"],
                dr["all_closed_seconds"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("{s:.1} s")),
                dr["exited_seconds"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("{s:.1} s"))
            ),
        );
        t.row(
            "— the other nodes' clients",
            format!(
                "{} ended; {} of {} nodes count the clients they had",
                dr["other_clients_ended"],
                dr["other_nodes_with_all_their_clients"],
                dr["other_nodes"]
            ),
        );
    }
    t.row(
        "everything killed",
        format!(
            "in {clean_secs:.1} s; then slab {}, {} available",
            human_bytes(k_clean.slab as f64),
            human_bytes(k_clean.available as f64)
        ),
    );
    t.print(&format!(
        "cluster-idle: {total} idle WebSocket connections, {n} gateway nodes over one nats-server"
    ));

    let cpu_json = |cpu: &[(&'static str, f64)]| {
        cpu.iter()
            .map(|(g, c)| ((*g).to_owned(), json!(c)))
            .collect::<serde_json::Map<_, _>>()
    };
    let json = json!({
        "scenario": "cluster-idle",
        "command": std::env::args().collect::<Vec<_>>(),
        "machine": measure::machine(),
        "connections": total,
        "nodes": n,
        "shares": shares,
        "workers": configs.len(),
        "source_addrs": source_addrs,
        "concurrency": opts.concurrency,
        "connect_rate_asked": a.connect_rate,
        "ping_interval_seconds": a.ping_interval.as_secs_f64(),
        "sysctls_set": sysctls.describe(),
        "gateway_command_first": node_command,
        "join_seconds": join_secs,
        "connect": c,
        "connect_cpu_cores": cpu_json(&connect_cpu),
        "nats_while_connecting": {"in_msgs": d(v0, v1, 0), "out_msgs": d(v0, v1, 1),
                                  "in_bytes": d(v0, v1, 2), "out_bytes": d(v0, v1, 3)},
        "hold": {
            "seconds": hold_secs,
            "checks": checks,
            "lowest_total_count": lowest,
            "dropped": dropped,
            "pings_answered": pings_hold,
            "pings_expected": expected_pings,
            "cpu_cores": cpu_json(&hold_cpu),
            "nats_per_second": {
                "in_msgs": d(vh0, vh1, 0) as f64 / hs, "out_msgs": d(vh0, vh1, 1) as f64 / hs,
                "in_bytes": d(vh0, vh1, 2) as f64 / hs, "out_bytes": d(vh0, vh1, 3) as f64 / hs,
            },
        },
        "memory": {
            "gateways_empty": empty,
            "gateways_held": held,
            "gateways_rss_per_connection": per(gw_rss, c.open),
            "gateways_pss_per_connection": per(gw_pss, c.open),
            "workers_rss_before": workers_rss0,
            "workers_rss_held": workers_rss,
            "workers_rss_per_connection": per(workers_rss as f64 - workers_rss0 as f64, c.open),
            "nats_rss_before": nats_rss0,
            "nats_rss_held": nats_rss,
        },
        "kernel": {"before": k0, "empty_cluster": k_empty, "connected": k_connected, "held": k_held, "after_cleanup": k_clean,
                   "slab_per_connection": per(slab, c.open),
                   "sunreclaim_per_connection": per(sunreclaim, c.open)},
        "publish": {
            "answer_ms": answer_ms,
            "delivered": delivered,
            "last_delivery_ms": last_us as f64 / 1000.0,
            "delivery_latency_ms": delivery,
            "connections_ended": dropped_publish,
        },
        "drain": drain,
        "cleanup_seconds": clean_secs,
        "problems": problems,
    });
    Ok((json, problems))
}
