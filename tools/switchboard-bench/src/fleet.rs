//! Child processes: the client workers and acceptor (this binary re-executed
//! with a hidden subcommand) and the services under test (gateway, origin).
//!
//! Everything spawned here is stopped when its owner is dropped, on error
//! paths too: workers get end-of-file on stdin (and are killed if they do not
//! exit in time), services get SIGTERM and then SIGKILL.

use crate::proto::Report;
use crate::tls::TlsClient;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// A line from a child's stdout, or `None` at end-of-file.
type Line = (usize, Option<String>);

/// One child of this binary.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
}

/// The children of this binary, driven over stdin/stdout (see [`crate::proto`]).
#[derive(Debug)]
pub(crate) struct Fleet {
    procs: Vec<Proc>,
    tx: Sender<Line>,
    rx: Receiver<Line>,
}

impl Fleet {
    /// An empty fleet.
    pub(crate) fn new() -> Self {
        let (tx, rx) = channel();
        Self {
            procs: Vec::new(),
            tx,
            rx,
        }
    }

    /// Re-executes this binary with `args`; returns the child's index.
    pub(crate) fn spawn(&mut self, name: &str, args: &[String]) -> Result<usize, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let idx = self.procs.len();
        let stdout = child.stdout.take().expect("piped stdout");
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((idx, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((idx, None));
        });
        let stdin = child.stdin.take();
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            stdin,
        });
        Ok(idx)
    }

    /// The process id of child `idx`.
    pub(crate) fn pid(&self, idx: usize) -> u32 {
        self.procs[idx].child.id()
    }

    /// Writes a command line to child `idx`.
    pub(crate) fn send(&mut self, idx: usize, cmd: &str) -> Result<(), String> {
        let p = &mut self.procs[idx];
        let stdin = p
            .stdin
            .as_mut()
            .ok_or_else(|| format!("{}: stdin already closed", p.name))?;
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("{}: cannot send {cmd:?}: {e}", p.name))
    }

    /// Writes a command line to each of `idxs`, as close together as possible.
    pub(crate) fn send_each(&mut self, idxs: &[usize], cmd: &str) -> Result<(), String> {
        idxs.iter().try_for_each(|&i| self.send(i, cmd))
    }

    /// Waits until every child of `idxs` has sent a report that `accept`
    /// takes (returns `Ok(true)` for); reports it returns `Ok(false)` for are
    /// skipped. Fails on `accept`'s error, a child's exit, or the deadline.
    pub(crate) fn collect(
        &self,
        idxs: &[usize],
        deadline: Instant,
        what: &str,
        accept: impl FnMut(usize, Report) -> Result<bool, String>,
    ) -> Result<(), String> {
        let waiting = self.collect_until(idxs, deadline, what, accept)?;
        if waiting.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = waiting
            .iter()
            .map(|&i| self.procs[i].name.as_str())
            .collect();
        Err(format!(
            "timed out waiting for {what} from {}",
            names.join(", ")
        ))
    }

    /// Like [`Fleet::collect`], but the deadline is no error: returns the
    /// children still waited for when it passed (empty if none).
    pub(crate) fn collect_until(
        &self,
        idxs: &[usize],
        deadline: Instant,
        what: &str,
        mut accept: impl FnMut(usize, Report) -> Result<bool, String>,
    ) -> Result<Vec<usize>, String> {
        let mut waiting: HashSet<usize> = idxs.iter().copied().collect();
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (idx, line) = match self.rx.recv_timeout(left) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => {
                    let mut left: Vec<usize> = waiting.into_iter().collect();
                    left.sort_unstable();
                    return Ok(left);
                }
                Err(RecvTimeoutError::Disconnected) => return Err("all children are gone".into()),
            };
            let name = &self.procs[idx].name;
            let Some(line) = line else {
                if waiting.contains(&idx) {
                    return Err(format!("{name} exited while waiting for {what}"));
                }
                continue; // a child that has said all it had to say
            };
            let report: Report = match serde_json::from_str(&line) {
                Ok(r) => r,
                Err(_) => {
                    eprintln!("[{name}] {line}");
                    continue;
                }
            };
            if !idxs.contains(&idx) {
                eprintln!(
                    "switchboard-bench: ignoring {report:?} from {name} (waiting for {what})"
                );
                continue;
            }
            if accept(idx, report)? {
                waiting.remove(&idx);
            }
        }
        Ok(Vec::new())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stdin = None; // end-of-file: the child exits
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.procs {
            while Instant::now() < deadline {
                if !matches!(p.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(p.child.try_wait(), Ok(None)) {
                eprintln!("switchboard-bench: {} did not exit; killing it", p.name);
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

/// A service under test (gateway, origin), stopped when dropped.
#[derive(Debug)]
pub(crate) struct Service {
    name: String,
    pub(crate) child: Child,
}

impl Service {
    /// Starts `bin args...` with stdout discarded and stderr inherited.
    pub(crate) fn spawn(
        name: &str,
        bin: &std::path::Path,
        args: &[String],
    ) -> Result<Self, String> {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {name} ({}): {e}", bin.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (if still running) without waiting, so that several
    /// services can stop at once; [`Service::stop`] then waits.
    pub(crate) fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        self.terminate();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "switchboard-bench: {} did not stop within {grace:?}; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The gateway under test: spawned by the tool, or already running.
#[derive(Debug)]
pub(crate) struct Gateway {
    /// WebSocket URL clients connect to.
    pub(crate) url: String,
    /// Its socket address.
    pub(crate) addr: std::net::SocketAddr,
    /// Control listener, if known.
    pub(crate) control: Option<std::net::SocketAddr>,
    /// Process id, if known.
    pub(crate) pid: Option<u32>,
    /// The command line, when spawned.
    pub(crate) command: Option<Vec<String>>,
    /// The process, when spawned.
    pub(crate) service: Option<Service>,
    /// How to reach it when it speaks TLS (`wss://`, `https://` control API).
    pub(crate) tls: Option<TlsClient>,
}

impl Gateway {
    /// Uses `--url` if given, else spawns `switchboard serve` on free
    /// loopback ports with `serve_args` (and the user's `--gateway-arg`s) and
    /// waits until it is ready.
    pub(crate) fn start(opts: &crate::GatewayOpts, serve_args: &[String]) -> Result<Self, String> {
        Self::start_with_tls(opts, serve_args, None)
    }

    /// [`Gateway::start`] for a gateway that speaks TLS when `tls` is given:
    /// `serve_args` must then turn TLS on (see [`crate::tls::TlsOpts`]), and
    /// a `--url` must be `wss://`.
    pub(crate) fn start_with_tls(
        opts: &crate::GatewayOpts,
        serve_args: &[String],
        tls: Option<TlsClient>,
    ) -> Result<Self, String> {
        if let Some(url) = &opts.url {
            let addr = crate::util::loopback_ws_addr(url)?;
            if url.starts_with("wss://") != tls.is_some() {
                return Err(format!(
                    "--url {url}: use a wss:// URL with --tls (idle only), a ws:// one without"
                ));
            }
            if let Some(c) = opts.control {
                crate::util::require_loopback(c)?;
            }
            if let Some(pid) = opts.gateway_pid {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map_err(|e| format!("--gateway-pid {pid}: {e}"))?;
                if !comm.trim().starts_with("switchboard") {
                    eprintln!(
                        "switchboard-bench: warning: --gateway-pid {pid} is {:?}, not a switchboard process",
                        comm.trim()
                    );
                }
            }
            return Ok(Self {
                url: url.clone(),
                addr,
                control: opts.control,
                pid: opts.gateway_pid,
                command: None,
                service: None,
                tls,
            });
        }
        let bin = opts
            .gateway_bin
            .clone()
            .unwrap_or_else(|| crate::util::sibling_bin("switchboard"));
        let port = crate::util::free_port()?;
        let control_port = crate::util::free_port()?;
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let control: std::net::SocketAddr = ([127, 0, 0, 1], control_port).into();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string(),
            "--control-listen".into(),
            control.to_string(),
            "--log-level".into(),
            "warn".into(),
            "--log-format".into(),
            "text".into(),
            // The load is the point: no client rate limits, and thousands
            // of handshakes a second from a few loopback addresses.
            "--client-message-rate".into(),
            "0".into(),
            "--client-byte-rate".into(),
            "0".into(),
            "--max-handshakes-per-ip".into(),
            "0".into(),
        ];
        args.extend(serve_args.iter().cloned());
        args.extend(opts.gateway_arg.iter().cloned());
        let mut service = Service::spawn("gateway", &bin, &args)?;
        crate::util::wait_ready(
            control,
            tls.as_ref(),
            &mut service.child,
            Duration::from_secs(15),
        )?;
        let mut command = vec![bin.display().to_string()];
        command.extend(args);
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        Ok(Self {
            url: format!("{scheme}://{addr}/"),
            addr,
            control: Some(control),
            pid: Some(service.pid()),
            command: Some(command),
            service: Some(service),
            tls,
        })
    }

    /// `GET /v1/stats` of its control listener (over TLS if it speaks it);
    /// `None` when the control listener is unknown.
    pub(crate) fn stats(&self) -> Option<Result<switchboard_proto::control::Stats, String>> {
        self.control
            .map(|c| crate::util::gateway_stats(c, self.tls.as_ref()))
    }

    /// Fails if the spawned gateway has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
        if let Some(s) = &mut self.service {
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(format!("the gateway exited ({status})"));
            }
        }
        Ok(())
    }

    /// Sends the spawned gateway SIGTERM without waiting (see [`Service::terminate`]).
    pub(crate) fn terminate(&mut self) {
        if let Some(s) = &mut self.service {
            s.terminate();
        }
    }

    /// Stops the spawned gateway (SIGTERM, then SIGKILL after 15 s).
    pub(crate) fn stop(&mut self) {
        if let Some(s) = &mut self.service {
            s.stop(Duration::from_secs(15));
        }
    }
}

/// Splits `total` clients over worker processes: `(offset, count)` each.
///
/// Uses `workers` processes if non-zero, else `min_workers`; never fewer than
/// `total / per_process` (rounded up), never more than `total`.
pub(crate) fn shards(
    total: usize,
    per_process: usize,
    workers: usize,
    min_workers: usize,
) -> Vec<(usize, usize)> {
    let needed = total.div_ceil(per_process.max(1));
    let wanted = if workers == 0 { min_workers } else { workers };
    let n = wanted.max(needed).min(total).max(1);
    let (base, extra) = (total / n, total % n);
    let mut offset = 0;
    (0..n)
        .map(|i| {
            let count = base + usize::from(i < extra);
            let shard = (offset, count);
            offset += count;
            shard
        })
        .collect()
}

/// Spawns one `worker` child per shard; waits until each is ready. Returns
/// their indexes in `fleet`.
pub(crate) fn spawn_workers(
    fleet: &mut Fleet,
    mode: &str,
    addr: std::net::SocketAddr,
    url: &str,
    shards: &[(usize, usize)],
    opts: &crate::ClientOpts,
    extra: &[String],
) -> Result<Vec<usize>, String> {
    let per_worker_concurrency = opts.concurrency.div_ceil(shards.len().max(1)).max(1);
    let mut idxs = Vec::new();
    for (i, &(offset, count)) in shards.iter().enumerate() {
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--mode".into(),
            mode.into(),
            "--addr".into(),
            addr.to_string(),
            "--url".into(),
            url.into(),
            "--count".into(),
            count.to_string(),
            "--offset".into(),
            offset.to_string(),
            "--source-addrs".into(),
            opts.source_addrs.to_string(),
            "--concurrency".into(),
            per_worker_concurrency.to_string(),
            "--connect-timeout".into(),
            crate::util::gateway_duration(opts.connect_timeout),
        ];
        args.extend(extra.iter().cloned());
        idxs.push(fleet.spawn(&format!("{mode}-worker-{i}@{}", addr.port()), &args)?);
    }
    fleet.collect(
        &idxs,
        Instant::now() + Duration::from_secs(15),
        "ready",
        |_, r| match r {
            Report::Ready => Ok(true),
            other => Err(format!("unexpected report {other:?}")),
        },
    )?;
    Ok(idxs)
}

#[cfg(test)]
mod tests {
    use super::shards;

    #[test]
    fn shards_cover_everything_within_limits() {
        assert_eq!(
            shards(19_000, 19_000, 0, 2),
            vec![(0, 9_500), (9_500, 9_500)]
        );
        assert_eq!(shards(100, 19_000, 0, 1), vec![(0, 100)]);
        assert_eq!(shards(40_001, 19_000, 0, 2).len(), 3);
        assert_eq!(shards(5, 19_000, 3, 1), vec![(0, 2), (2, 2), (4, 1)]);
        assert_eq!(shards(1, 19_000, 8, 1), vec![(0, 1)]);
        for (total, per) in [(19_000, 19_000), (50_000, 19_000), (7, 2)] {
            let s = shards(total, per, 0, 2);
            assert_eq!(s.iter().map(|x| x.1).sum::<usize>(), total);
            assert!(s.iter().all(|x| x.1 <= per));
        }
    }
}
