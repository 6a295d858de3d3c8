//! Helpers: durations, `/proc` readings, a tiny HTTP/1.1 GET (plain or TLS), loopback URL
//! checks, histograms and table printing.

use crate::proto::Buckets;
use crate::tls::TlsClient;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Parses `500ms`, `10s`, `2m`, `1h`, `1.5s` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 500ms, 10s, 2m, 1h)"))?;
    if !v.is_finite() || v < 0.0 || v * scale > 86_400.0 {
        return Err(format!("duration {s:?} out of range (0 to 24h)"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Formats a duration the way the gateway's flags accept it (`1500ms`).
pub(crate) fn gateway_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Nanoseconds since the Unix epoch (`CLOCK_REALTIME`: the same clock in
/// every process of the machine, so a time stamped by one process can be
/// compared with a reading in another).
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// A `kB` field of `/proc/PID/status` (or `/proc/meminfo`), in bytes.
fn kb_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Memory of one process, from `/proc/PID/status`, in bytes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ProcMem {
    /// Resident set size (`VmRSS`).
    pub(crate) rss: u64,
    /// Anonymous resident memory (`RssAnon`): the heap, stacks.
    pub(crate) rss_anon: u64,
    /// File-backed resident memory (`RssFile`): the mapped binary and libraries.
    pub(crate) rss_file: u64,
    /// Peak resident set size (`VmHWM`).
    pub(crate) hwm: u64,
    /// Threads.
    pub(crate) threads: u64,
}

/// Reads `/proc/PID/status`.
pub(crate) fn proc_mem(pid: u32) -> Result<ProcMem, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let threads = text
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(ProcMem {
        rss: kb_field(&text, "VmRSS").ok_or("no VmRSS")?,
        rss_anon: kb_field(&text, "RssAnon").unwrap_or(0),
        rss_file: kb_field(&text, "RssFile").unwrap_or(0),
        hwm: kb_field(&text, "VmHWM").unwrap_or(0),
        threads,
    })
}

/// Proportional set size of a process (`Pss` of `/proc/PID/smaps_rollup`),
/// in bytes: shared pages (nginx's shared memory zone, libraries) divided
/// among the processes that map them, so the PSS of a process group adds up.
pub(crate) fn proc_pss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kb_field(&text, "Pss")
}

/// The children of a process (`/proc/PID/task/*/children`).
pub(crate) fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The hard limit of open files of this process (`Max open files` of
/// `/proc/self/limits`), if finite.
pub(crate) fn nofile_hard_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

/// The resident memory of this process, in bytes (0 if unreadable).
pub(crate) fn own_rss() -> u64 {
    proc_mem(std::process::id()).map(|m| m.rss).unwrap_or(0)
}

/// Clock ticks per second of `/proc/PID/stat` times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds used by a process so far.
pub(crate) fn proc_cpu_s(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Context switches (voluntary + involuntary) of all threads of a process so
/// far, from `/proc/PID/task/*/status`.
pub(crate) fn context_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for t in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        for name in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
            total += text
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// CPU seconds used by all of `pids` (`None` if any is unreadable).
pub(crate) fn cpu_of_all(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&p| proc_cpu_s(p)).sum()
}

/// Kernel slab memory (`Slab` of `/proc/meminfo`), in bytes: socket, file and
/// epoll structures live there.
pub(crate) fn kernel_slab() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| kb_field(&t, "Slab"))
        .unwrap_or(0)
}

/// Busy, softirq and total jiffies of all CPUs, from the first line of
/// `/proc/stat` (busy includes softirq).
fn cpu_jiffies() -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, v.get(6).copied().unwrap_or(0), total))
}

/// CPU used by processes other than the benchmark's own over a phase.
///
/// Softirq time counts as the benchmark's: it is mostly the loopback network
/// stack carrying the benchmark's own traffic, and the kernel charges it to
/// no process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interference {
    busy: u64,
    softirq: u64,
    total: u64,
    ours: f64,
}

impl Interference {
    /// Starts a phase; `ours` is the CPU seconds used so far by the
    /// benchmark's processes (gateway, origin, children).
    pub(crate) fn start(ours: Option<f64>) -> Option<Self> {
        let (busy, softirq, total) = cpu_jiffies()?;
        Some(Self {
            busy,
            softirq,
            total,
            ours: ours?,
        })
    }

    /// The share of all CPUs that other processes used since `start`.
    pub(crate) fn finish(self, ours: Option<f64>) -> Option<f64> {
        let (busy, softirq, total) = cpu_jiffies()?;
        let capacity = (total - self.total) as f64 / USER_HZ;
        let not_softirq = (busy - self.busy) - (softirq - self.softirq);
        let others = not_softirq as f64 / USER_HZ - (ours? - self.ours);
        (capacity > 0.0).then(|| (others / capacity).clamp(0.0, 1.0))
    }
}

/// Adds a warning when other processes used more than 15 % of the CPUs
/// during `phase`.
pub(crate) fn warn_interference(share: Option<f64>, phase: &str, warnings: &mut Vec<String>) {
    if let Some(s) = share.filter(|s| *s > 0.15) {
        let msg = format!(
            "other processes used {:.0} % of the CPUs during {phase}; its figures are low",
            s * 100.0
        );
        eprintln!("switchboard-bench: warning: {msg}");
        warnings.push(msg);
    }
}

/// Share of all CPUs busy over one second, before the benchmark starts
/// anything; above 15 % a warning is added: other work is competing.
pub(crate) fn background_busy(warnings: &mut Vec<String>) -> f64 {
    let Some((b0, _, t0)) = cpu_jiffies() else {
        return 0.0;
    };
    std::thread::sleep(Duration::from_secs(1));
    let Some((b1, _, t1)) = cpu_jiffies() else {
        return 0.0;
    };
    let busy = (b1 - b0) as f64 / ((t1 - t0) as f64).max(1.0);
    if busy > 0.15 {
        let msg = format!(
            "the machine was {:.0} % busy before the run (other processes); rates and latencies are lower than on an idle machine",
            busy * 100.0
        );
        eprintln!("switchboard-bench: warning: {msg}");
        warnings.push(msg);
    }
    busy
}

/// Bytes held by each kernel slab cache (`active_objs * objsize` from
/// `/proc/slabinfo`, readable by root only; empty if unreadable).
pub(crate) fn slab_caches() -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let active: u64 = f.get(1)?.parse().ok()?;
            let size: u64 = f.get(3)?.parse().ok()?;
            Some((f.first()?.to_string(), active * size))
        })
        .collect()
}

/// The slab caches that grew the most between two readings, as
/// `(name, bytes per connection)`, largest first.
pub(crate) fn slab_growth(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    connections: u64,
    top: usize,
) -> Vec<(String, f64)> {
    let mut g: Vec<(String, f64)> = after
        .iter()
        .map(|(k, &a)| {
            let b = before.get(k).copied().unwrap_or(0);
            (k.clone(), (a as f64 - b as f64) / connections.max(1) as f64)
        })
        .filter(|(_, d)| *d >= 1.0)
        .collect();
    g.sort_by(|x, y| y.1.total_cmp(&x.1));
    g.truncate(top);
    g
}

/// A description of this machine, for the result files.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    /// CPU model (first `model name` of /proc/cpuinfo).
    pub(crate) cpu: String,
    /// Logical CPUs available to this process.
    pub(crate) cpus: usize,
    /// Total memory, bytes.
    pub(crate) mem_total: u64,
    /// Kernel release.
    pub(crate) kernel: String,
    /// Soft limit of open files of this process.
    pub(crate) nofile: String,
    /// `net.ipv4.ip_local_port_range`.
    pub(crate) ip_local_port_range: String,
    /// `net.core.somaxconn`.
    pub(crate) somaxconn: String,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Collects [`Machine`].
pub(crate) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nofile = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("/")
                })
        })
        .unwrap_or_default();
    Machine {
        cpu,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        mem_total: std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| kb_field(&t, "MemTotal"))
            .unwrap_or(0),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        nofile,
        ip_local_port_range: read_trim("/proc/sys/net/ipv4/ip_local_port_range"),
        somaxconn: read_trim("/proc/sys/net/core/somaxconn"),
    }
}

/// Whether `ip` is a loopback address.
fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

/// Splits `ws://HOST:PORT/path` (or `wss://...`) into a loopback socket
/// address; refuses anything that does not resolve to loopback only.
pub(crate) fn loopback_ws_addr(url: &str) -> Result<SocketAddr, String> {
    let (rest, default_port) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(rest), _) => (rest, 80),
        (_, Some(rest)) => (rest, 443),
        _ => return Err(format!("{url:?}: only ws:// and wss:// URLs are supported")),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: cannot resolve {authority:?}: {e}"))?
        .collect();
    let addr = addrs
        .iter()
        .copied()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first().copied());
    match addr {
        Some(a) if addrs.iter().all(|a| is_loopback(a.ip())) => Ok(a),
        _ => Err(format!("{url:?}: only loopback targets are allowed")),
    }
}

/// Refuses a non-loopback address.
pub(crate) fn require_loopback(addr: SocketAddr) -> Result<SocketAddr, String> {
    if is_loopback(addr.ip()) {
        Ok(addr)
    } else {
        Err(format!("{addr}: only loopback targets are allowed"))
    }
}

/// A free loopback TCP port (bound then released; the race is harmless here).
pub(crate) fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// `GET path` over HTTP/1.1 with a 5 s bound; returns the status and body.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_get_over(addr, None, path)
}

/// [`http_get`], over TLS (`https://`) when `tls` is given.
pub(crate) fn http_get_over(
    addr: SocketAddr,
    tls: Option<&TlsClient>,
    path: &str,
) -> Result<(u16, String), String> {
    const LIMIT: Duration = Duration::from_secs(5);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let s = TcpStream::connect_timeout(&addr, LIMIT)
        .map_err(|e| format!("GET {scheme}://{addr}{path}: {e}"))?;
    s.set_read_timeout(Some(LIMIT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(LIMIT))
        .map_err(|e| e.to_string())?;
    let raw = match tls {
        None => get_raw(s, addr, path),
        Some(tls) => get_raw(tls.connect_blocking(s)?, addr, path),
    }
    .map_err(|e| format!("GET {scheme}://{addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("malformed HTTP status line")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// Sends `GET path` with `Connection: close` and reads the whole answer
/// (at most 16 MiB).
fn get_raw(mut s: impl Read + Write, addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    s.flush()?;
    let mut raw = Vec::new();
    match s.take(16 << 20).read_to_end(&mut raw) {
        // A TLS peer that closes without close_notify: the answer is what came.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        r => r.map(|_| raw),
    }
}

/// Decodes a chunked body (enough for small JSON answers).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    for _ in 0..10_000 {
        let Some((size, rest)) = body.split_once("\r\n") else {
            break;
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET /v1/stats` of a gateway's control listener (over TLS with `tls`).
pub(crate) fn gateway_stats(
    control: SocketAddr,
    tls: Option<&TlsClient>,
) -> Result<switchboard_proto::control::Stats, String> {
    let (status, body) = http_get_over(control, tls, "/v1/stats")?;
    if status != 200 {
        return Err(format!("GET /v1/stats: HTTP {status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /v1/stats: {e}"))
}

/// A sample's value in Prometheus/OpenMetrics text: the line that starts with
/// `series` (name and labels exactly as exposed) followed by a space.
fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The gateway's origin delivery counters, from `GET /metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OriginCounters {
    /// `events` requests made.
    pub(crate) requests: f64,
    /// Seconds spent in them.
    pub(crate) seconds: f64,
    /// Events the origin acknowledged.
    pub(crate) events: f64,
}

impl OriginCounters {
    /// Reads the counters (absent series count as 0).
    pub(crate) fn read(control: SocketAddr) -> Result<Self, String> {
        let (status, text) = http_get(control, "/metrics")?;
        if status != 200 {
            return Err(format!("GET /metrics: HTTP {status}"));
        }
        Ok(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        let v = |series: &str| metric_value(text, series).unwrap_or(0.0);
        Self {
            requests: v("switchboard_origin_request_duration_seconds_count{kind=\"events\"}"),
            seconds: v("switchboard_origin_request_duration_seconds_sum{kind=\"events\"}"),
            events: v("switchboard_origin_events_delivered_total"),
        }
    }
}

/// Polls `GET /readyz` (over TLS with `tls`) until it answers 200, the
/// process exits, or `limit` passes.
pub(crate) fn wait_ready(
    control: SocketAddr,
    tls: Option<&TlsClient>,
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the gateway exited during startup ({status})"));
        }
        if matches!(http_get_over(control, tls, "/readyz"), Ok((200, _))) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("the gateway was not ready within {limit:?}"))
}

/// Polls a TCP connect to `addr` until it succeeds, the process exits, or `limit` passes.
pub(crate) fn wait_listening(
    addr: SocketAddr,
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("process exited during startup ({status})"));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listening on {addr} within {limit:?}"))
}

/// The default path of a sibling binary: next to this executable if there,
/// else `target/release/NAME`.
pub(crate) fn sibling_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("target/release").join(name)
}

/// A histogram of microseconds, 1 µs to 1 h at 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// A histogram's recorded buckets.
pub(crate) fn to_buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds buckets into a histogram (values clamped to its range).
pub(crate) fn add_buckets(h: &mut Histogram<u64>, b: &Buckets) {
    for &(v, n) in b {
        h.saturating_record_n(v, n);
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Percentiles {
    /// Samples.
    pub(crate) count: u64,
    /// Mean.
    pub(crate) mean_ms: f64,
    /// Median.
    pub(crate) p50_ms: f64,
    /// 90th percentile.
    pub(crate) p90_ms: f64,
    /// 99th percentile.
    pub(crate) p99_ms: f64,
    /// 99.9th percentile.
    pub(crate) p999_ms: f64,
    /// Largest sample.
    pub(crate) max_ms: f64,
}

/// Summarises a histogram of microseconds.
pub(crate) fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        mean_ms: h.mean() / 1000.0,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// Bytes as `1.23 MiB`.
pub(crate) fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v.abs() >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A two-column table printed to stdout, with section headings.
#[derive(Debug, Default)]
pub(crate) struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    /// Adds a section heading.
    pub(crate) fn section(&mut self, title: &str) {
        self.rows.push((format!("== {title}"), String::new()));
    }

    /// Adds a row.
    pub(crate) fn row(&mut self, name: &str, value: impl Into<String>) {
        self.rows.push((name.to_owned(), value.into()));
    }

    /// Adds the problems and warnings sections, if any.
    pub(crate) fn problems(&mut self, problems: &[String], warnings: &[String]) {
        if !problems.is_empty() {
            self.section("PROBLEMS");
            for p in problems {
                self.row("-", p.clone());
            }
        }
        if !warnings.is_empty() {
            self.section("warnings");
            for w in warnings {
                self.row("-", w.clone());
            }
        }
    }

    /// Prints the table.
    pub(crate) fn print(&self) {
        let w = self
            .rows
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (n, v) in &self.rows {
            if v.is_empty() {
                out.push('\n');
                out.push_str(n);
            } else {
                out.push_str(&format!("  {n:<w$}  {v}"));
            }
            out.push('\n');
        }
        print!("{out}");
    }
}

/// Writes a run's JSON result, says where, and turns its validity into the
/// exit status.
pub(crate) fn finish(
    path: &Path,
    result: &impl Serialize,
    valid: bool,
) -> Result<std::process::ExitCode, String> {
    write_json(path, result)?;
    println!("\nresults written to {}", path.display());
    Ok(if valid {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Writes `value` as pretty JSON to `path`, creating its folder.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).expect("results serialize");
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(gateway_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn loopback_only() {
        assert_eq!(
            loopback_ws_addr("ws://127.0.0.1:8080/").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(loopback_ws_addr("ws://127.0.0.1:9").unwrap().port(), 9);
        assert!(loopback_ws_addr("ws://10.0.0.1:8080/").is_err());
        assert_eq!(loopback_ws_addr("wss://127.0.0.1/").unwrap().port(), 443);
        assert!(loopback_ws_addr("wss://10.0.0.1:8080/").is_err());
        assert!(loopback_ws_addr("http://127.0.0.1:8080/").is_err());
        assert!(require_loopback("192.168.1.1:80".parse().unwrap()).is_err());
    }

    #[test]
    fn status_fields() {
        let text =
            "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 512 kB\nThreads:\t3\n";
        assert_eq!(kb_field(text, "VmRSS"), Some(1024 * 1024));
        assert_eq!(kb_field(text, "RssAnon"), Some(512 * 1024));
        assert_eq!(kb_field(text, "Nope"), None);
        assert!(proc_mem(std::process::id()).unwrap().rss > 0);
        assert!(proc_cpu_s(std::process::id()).is_some());
        assert!(context_switches(std::process::id()).is_some());
        assert!(proc_pss(std::process::id()).is_some_and(|p| p > 0));
        assert!(nofile_hard_limit().is_some_and(|n| n > 0));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let kids = child_pids(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(kids.contains(&child.id()), "{kids:?}");
    }

    #[test]
    fn histogram_buckets_round_trip() {
        let mut h = new_histogram();
        for v in [10, 20, 20, 5_000, 1_000_000] {
            h.record(v).unwrap();
        }
        let mut g = new_histogram();
        add_buckets(&mut g, &to_buckets(&h));
        assert_eq!(g.len(), 5);
        assert_eq!(g.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert!(g.equivalent(g.max(), h.max()));
    }

    #[test]
    fn origin_counters() {
        let text = "# TYPE x counter\nswitchboard_origin_events_delivered_total 42\n\
                    switchboard_origin_request_duration_seconds_sum{kind=\"events\"} 0.5\n\
                    switchboard_origin_request_duration_seconds_count{kind=\"events\"} 10\n\
                    switchboard_origin_request_duration_seconds_count{kind=\"connect\"} 3\n";
        let c = OriginCounters::parse(text);
        assert_eq!((c.requests, c.seconds, c.events), (10.0, 0.5, 42.0));
        assert_eq!(OriginCounters::parse("").requests, 0.0);
    }

    #[test]
    fn chunked() {
        assert_eq!(dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), "Wikipedia");
    }
}
