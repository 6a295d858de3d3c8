//! A real `nats-server` process for cluster tests: started on a free
//! 127.0.0.1 port (with JetStream and a fresh store directory if asked),
//! killed with SIGKILL, restarted on the same port with the same store, and
//! cleaned up on drop.
//!
//! The binary is `nats-server` from `PATH` (missing, starting panics with one
//! line saying how to install it). Every wait is bounded: starting
//! panics (with the server's log) if the port does not accept within 10 s.
//!
//! Ports are chosen below the kernel's ephemeral range, so that nothing
//! binding port 0 (gateways, origins, proxies of parallel tests) can take a
//! server's port, even while it is down between `kill` and `restart`; and a
//! server counts as started only once its own name comes back in the `INFO`
//! line on that port.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// How long [`NatsServer::start`] and [`NatsServer::restart`] wait for the port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What to tell the user when `nats-server` cannot be run at all: one line
/// saying how to install it (instead of ten failed starts on ten ports).
const NOT_INSTALLED: &str = "nats-server is not installed (not found on PATH); the cluster tests \
     start their own: install it with `apt-get install nats-server` (Debian/Ubuntu), \
     `brew install nats-server` (macOS), or from https://github.com/nats-io/nats-server/releases";

/// `Some(message)` when `nats-server` is not on `PATH` (or cannot be
/// executed); checked once per process.
fn missing_binary() -> Option<&'static str> {
    static MISSING: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *MISSING.get_or_init(|| {
        match Command::new("nats-server")
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                Some(NOT_INSTALLED)
            }
            _ => None,
        }
    })
}

/// A `nats-server` child process on 127.0.0.1.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    jetstream: bool,
    /// Further command-line arguments, given again on restart.
    extra_args: Vec<String>,
    dir: PathBuf,
    /// `--server_name`, unique per harness: how it recognises its server.
    name: String,
}

impl NatsServer {
    /// Starts `nats-server -a 127.0.0.1 -p <free port>`, plus `-js -sd <fresh
    /// dir>` with `jetstream`, and waits until the port accepts connections.
    pub fn start(jetstream: bool) -> Self {
        Self::start_with(jetstream, &[])
    }

    /// [`NatsServer::start`] with further `nats-server` arguments (e.g. `-m
    /// PORT` for the monitoring endpoint the benchmarks read).
    pub fn start_with(jetstream: bool, extra_args: &[String]) -> Self {
        crate::failure::remember_panics();
        if let Some(missing) = missing_binary() {
            panic!("{missing}");
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "switchboard-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, SeqCst)
        );
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("store")).expect("create nats temp dir");
        let mut server = Self {
            child: None,
            port: 0,
            jetstream,
            extra_args: extra_args.to_vec(),
            dir,
            name,
        };
        // Another test may take the port between choosing and binding it:
        // try a few ports.
        let mut last_error = String::new();
        for _ in 0..10 {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("nats-server did not start: {last_error}");
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (used only with JetStream).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// Whether the process is running (started and not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's log so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server with SIGKILL and waits for it; a no-op if it is not
    /// running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, then starts it again on the same port
    /// with the same store directory, and waits until the port accepts.
    pub fn restart(&mut self) {
        self.kill();
        // The port was just released; retry briefly if it is not free yet.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("nats-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    /// Spawns the process on `self.port` and waits until the port accepts;
    /// on failure the process is gone and the error holds its log.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open nats-server log: {e}"))?;
        let port = self.port.to_string();
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &port, "--server_name", &self.name]);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(path_str(&self.store_dir()));
        }
        cmd.args(&self.extra_args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("spawn nats-server (is it on PATH?): {e}"))?;
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "nats-server exited with {status} on port {}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            match server_name_at(addr) {
                Some(name) if name == self.name => {
                    self.child = Some(child);
                    return Ok(());
                }
                Some(other) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "port {} is held by another nats-server ({other})",
                        self.port
                    ));
                }
                None => {}
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "port {} did not accept within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test: was the server still there, and what did it say?
            let state = match self.child.as_mut().map(Child::try_wait) {
                None => "not running (killed by the test)".to_owned(),
                Some(Ok(None)) => "running".to_owned(),
                Some(Ok(Some(status))) => format!("EXITED on its own with {status}"),
                Some(Err(e)) => format!("unknown ({e})"),
            };
            let log = self.log();
            // A Go panic: its message and first frames say more than the
            // end of the goroutine dump.
            let shown = match log.find("panic:") {
                Some(at) => log[at..].lines().take(25).collect::<Vec<_>>().join("\n"),
                None => crate::failure::log_tail(&log, 15),
            };
            eprintln!(
                "--- nats-server {} on port {}: {state}; its log ---\n{shown}",
                self.name, self.port,
            );
            crate::failure::repeat_panic_message();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free 127.0.0.1 port below the kernel's ephemeral port range (so that
/// no port-0 bind can be given it), chosen at random. When that range
/// starts too low to leave room below it (a benchmark may widen it to
/// 1024-65535), a port the kernel hands out.
pub(crate) fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low < 3024 {
        return TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
    }
    let (low, high) = if ephemeral_low > 12000 {
        (10000, ephemeral_low)
    } else {
        (ephemeral_low.saturating_sub(2000).max(1024), ephemeral_low)
    };
    for _ in 0..1000 {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let port = low + (h.finish() % u64::from(high - low)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// The `server_name` of the NATS server answering on `addr`, from its
/// `INFO` line; `None` if nothing answers (yet) or not with an `INFO`.
fn server_name_at(addr: SocketAddr) -> Option<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let info: serde_json::Value = serde_json::from_str(line.strip_prefix("INFO ")?.trim()).ok()?;
    Some(info["server_name"].as_str()?.to_owned())
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
