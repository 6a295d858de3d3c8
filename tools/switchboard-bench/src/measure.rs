//! What the scenarios measure with and how they report it: process memory
//! and CPU time from `/proc`, latency histograms and their percentiles, the
//! machine's description, the human table and the JSON result file.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in nanoseconds (`CLOCK_REALTIME`: the same clock in every
/// process of the machine, so a stamp written by one is read by another).
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A field of `/proc/PID/status` or `smaps_rollup` in kB, as bytes.
fn kb_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident set size of a process (`VmRSS`), in bytes.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    kb_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmRSS:",
    )
}

/// Proportional set size (`Pss` of `smaps_rollup`), in bytes: shared pages
/// count once over the processes sharing them (nginx's workers and their
/// shared memory zone).
pub(crate) fn pss(pid: u32) -> Option<u64> {
    kb_field(
        &std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?,
        "Pss:",
    )
}

/// Memory of a set of processes: the sums of their RSS and PSS.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Memory {
    /// Sum of `VmRSS`, bytes.
    pub(crate) rss: u64,
    /// Sum of `Pss`, bytes.
    pub(crate) pss: u64,
}

/// Reads the memory of `pids` now.
pub(crate) fn memory(pids: &[u32]) -> Memory {
    pids.iter().fold(Memory::default(), |m, &p| Memory {
        rss: m.rss + rss(p).unwrap_or(0),
        pss: m.pss + pss(p).unwrap_or(0),
    })
}

/// User + system CPU time of a process and its threads, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: utime is the
    // 14th field of the line, the 12th after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux the tool runs on.
    Some((utime + stime) as f64 / 100.0)
}

/// CPU time of a set of processes, summed.
pub(crate) fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_seconds(p)).sum()
}

/// CPU time the whole machine spent in processes so far (all CPUs,
/// `/proc/stat` user, nice, system and steal), seconds. Interrupt and softirq
/// time is left out: on loopback it is mostly the network stack carrying
/// the benchmark's own traffic.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        // The `cpu` label does not parse: the numbers remain.
        .filter_map(|v| v.parse().ok())
        .collect();
    let field = |i: usize| f.get(i).copied().unwrap_or(0);
    (field(0) + field(1) + field(2) + field(7)) as f64 / 100.0
}

/// CPU used by sets of processes over a phase, in cores; besides them, the
/// tool's own process and every other process on the machine ("others"),
/// so that a run disturbed by other load shows it.
#[derive(Debug)]
pub(crate) struct CpuMeter {
    start: std::time::Instant,
    groups: Vec<(&'static str, Vec<u32>, f64)>,
    machine: f64,
}

impl CpuMeter {
    /// Starts measuring each named group of processes (groups without
    /// processes are left out).
    pub(crate) fn start(groups: Vec<(&'static str, Vec<u32>)>) -> Self {
        let groups = groups
            .into_iter()
            .chain([("tool", vec![std::process::id()])])
            .filter(|(_, pids)| !pids.is_empty())
            .map(|(name, pids)| {
                let c = cpu_of(&pids);
                (name, pids, c)
            })
            .collect();
        Self {
            start: std::time::Instant::now(),
            groups,
            machine: machine_busy(),
        }
    }

    /// Seconds since the start.
    pub(crate) fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Cores used by each group since the start, then by the tool itself
    /// and by the rest of the machine ("others").
    pub(crate) fn cores(&self) -> Vec<(&'static str, f64)> {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let mut cores: Vec<_> = self
            .groups
            .iter()
            .map(|(name, pids, c0)| (*name, (cpu_of(pids) - c0) / wall))
            .collect();
        let ours: f64 = cores.iter().map(|c| c.1).sum();
        let machine = (machine_busy() - self.machine) / wall;
        cores.push(("others", (machine - ours).max(0.0)));
        cores
    }
}

/// Cores of the named group (0 if it was not measured).
pub(crate) fn cores_of(cpu: &[(&'static str, f64)], name: &str) -> f64 {
    cpu.iter().find(|c| c.0 == name).map_or(0.0, |c| c.1)
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    /// `model name` of `/proc/cpuinfo`.
    pub(crate) cpu: String,
    /// CPUs available to this process.
    pub(crate) cpus: usize,
    /// `MemTotal`, bytes.
    pub(crate) memory: u64,
    /// `uname -r`.
    pub(crate) kernel: String,
    /// Hard limit on open files per process.
    pub(crate) nofile_limit: Option<u64>,
}

/// Describes this machine.
pub(crate) fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let nofile_limit = read("/proc/self/limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse().ok());
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory: kb_field(&read("/proc/meminfo"), "MemTotal:").unwrap_or(0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        nofile_limit,
    }
}

/// A histogram of microseconds, 1 µs to 1 h at 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// A histogram as `(value, count)` pairs, to cross process boundaries.
pub(crate) type Buckets = Vec<(u64, u64)>;

/// The recorded values of `h` as [`Buckets`].
pub(crate) fn to_buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds [`Buckets`] to `h`.
pub(crate) fn add_buckets(h: &mut Histogram<u64>, b: &Buckets) {
    for &(v, n) in b {
        h.saturating_record_n(v.max(1), n);
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Percentiles {
    /// Samples.
    pub(crate) count: u64,
    /// Mean.
    pub(crate) mean: f64,
    /// Median.
    pub(crate) p50: f64,
    /// 90th percentile.
    pub(crate) p90: f64,
    /// 99th percentile.
    pub(crate) p99: f64,
    /// 99.9th percentile.
    pub(crate) p999: f64,
    /// Largest sample.
    pub(crate) max: f64,
}

impl Percentiles {
    /// Percentiles of a histogram of microseconds.
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    /// `p50 / p99 / p99.9 / max ms`, for the tables.
    pub(crate) fn brief(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2} ms",
            self.p50, self.p99, self.p999, self.max
        )
    }
}

/// `before → after`, both as [`human_bytes`].
pub(crate) fn bytes_change(before: u64, after: u64) -> String {
    format!(
        "{} → {}",
        human_bytes(before as f64),
        human_bytes(after as f64)
    )
}

/// Bytes as KiB or MiB, for the tables.
pub(crate) fn human_bytes(b: f64) -> String {
    if b.abs() >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b.abs() >= 10240.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// A two-column table printed to stdout.
#[derive(Debug, Default)]
pub(crate) struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    /// Adds a row.
    pub(crate) fn row(&mut self, what: impl Into<String>, value: impl Into<String>) {
        self.rows.push((what.into(), value.into()));
    }

    /// Prints the table under a title.
    pub(crate) fn print(&self, title: &str) {
        let w = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        println!("\n{title}");
        println!("{}", "-".repeat(title.len()));
        for (k, v) in &self.rows {
            println!("{k:<w$}  {v}");
        }
    }
}

/// Writes the result as pretty JSON to `path` (creating its folder), if given.
pub(crate) fn write_json(path: Option<&Path>, value: &serde_json::Value) -> Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
    eprintln!("switchboard-bench: wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_memory_and_cpu() {
        let me = std::process::id();
        assert!(rss(me).unwrap() > 0);
        assert!(cpu_seconds(me).is_some());
    }

    #[test]
    fn buckets_round_trip() {
        let mut h = histogram();
        for v in [1, 10, 100, 1000, 1000] {
            h.record(v).unwrap();
        }
        let mut back = histogram();
        add_buckets(&mut back, &to_buckets(&h));
        assert_eq!(back.len(), 5);
        assert_eq!(back.max(), h.max());
        assert_eq!(Percentiles::of(&back).p50, Percentiles::of(&h).p50);
    }
}
