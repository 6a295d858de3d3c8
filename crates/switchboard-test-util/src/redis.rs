//! A real `redis-server` process for cluster tests: started on a free
//! 127.0.0.1 port without persistence (`--save '' --appendonly no`), killed
//! with SIGKILL, restarted empty on the same port, and cleaned up on drop.
//!
//! The binary is `redis-server` from `PATH`. Every wait is bounded: starting
//! panics (with the server's log) if the port does not answer within 10 s.
//! A server counts as started only once `INFO server` on that port names
//! its own process id.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// How long starting and restarting wait for the port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

const NOT_INSTALLED: &str = "redis-server is not installed (not found on PATH); the Redis \
     tests start their own: install it with `apt-get install redis-server` (Debian/Ubuntu) \
     or `brew install redis` (macOS)";

/// A `redis-server` child process on 127.0.0.1.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Further `redis-server` arguments, given again on restart.
    extra_args: Vec<String>,
    /// Serving TLS only (on `port`), with these certificate, key and CA
    /// files.
    tls: Option<[PathBuf; 3]>,
}

impl RedisServer {
    /// Starts `redis-server --port <free port> --save '' --appendonly no`
    /// and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`RedisServer::start`] with further arguments, after the defaults
    /// (e.g. `--appendonly yes` for a server whose restarts keep its data:
    /// its files stay in its directory across restarts).
    pub fn start_with(extra_args: &[&str]) -> Self {
        let mut server = Self::unstarted();
        server.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        server.start_on_a_free_port();
        server
    }

    /// A server that speaks TLS only, with the certificate `cert` and key
    /// `key` (PEM), not asking clients for certificates; `ca` is the CA
    /// that signed `cert`. Its URL is `rediss://`.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Self {
        let mut server = Self::unstarted();
        server.tls = Some([cert.to_owned(), key.to_owned(), ca.to_owned()]);
        server.start_on_a_free_port();
        server
    }

    fn unstarted() -> Self {
        crate::failure::remember_panics();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "switchboard-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, SeqCst)
        );
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create redis temp dir");
        Self {
            child: None,
            port: 0,
            dir,
            extra_args: Vec::new(),
            tls: None,
        }
    }

    fn start_on_a_free_port(&mut self) {
        let mut last_error = String::new();
        for _ in 0..10 {
            self.port = crate::nats::free_port();
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL (everything it held is lost) and waits
    /// for it; a no-op if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, then starts it again on the same port
    /// (empty, unless started with persistence), and waits until it
    /// answers.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs one command (its words, without quoting) and returns the raw
    /// reply; for tests that look inside.
    pub fn command(&self, words: &[&str]) -> String {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        ask(addr, words).unwrap_or_default()
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = self.dir.join("redis.log");
        let port = self.port.to_string();
        let mut listen = vec!["--port".to_owned(), port.clone()];
        if let Some([cert, key, ca]) = &self.tls {
            listen = [
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-auth-clients",
                "no",
            ]
            .map(str::to_owned)
            .to_vec();
            for (flag, file) in [
                ("--tls-cert-file", cert),
                ("--tls-key-file", key),
                ("--tls-ca-cert-file", ca),
            ] {
                listen.push(flag.to_owned());
                listen.push(file.display().to_string());
            }
        }
        let spawned = Command::new("redis-server")
            .args(&listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{NOT_INSTALLED}"),
            Err(e) => return Err(format!("spawn redis-server: {e}")),
        };
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + START_TIMEOUT;
        let own = format!("process_id:{}", child.id());
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server exited with {status} on port {}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if self.tls.is_some() {
                // Not readable without TLS: the port accepting is enough
                // (it was free when the server started).
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    self.child = Some(child);
                    return Ok(());
                }
            } else if let Some(info) = ask(addr, &["INFO", "server"]) {
                // A server that wants a password says so to everyone: ours
                // if it still runs (the port was free when it started).
                let locked = info.starts_with("-NOAUTH") || info.starts_with("-NOPERM");
                if info.lines().any(|l| l.trim() == own) || locked {
                    self.child = Some(child);
                    return Ok(());
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("port {} is held by another Redis", self.port));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "port {} did not answer within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends one command in RESP and reads whatever comes back within a
/// moment (enough for the short replies tests look at).
fn ask(addr: SocketAddr, words: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut command = format!("*{}\r\n", words.len());
    for w in words {
        command.push_str(&format!("${}\r\n{w}\r\n", w.len()));
    }
    stream.write_all(command.as_bytes()).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // A reply is complete once it ends a line and nothing more
                // comes at once.
                stream
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .ok()?;
            }
            Err(_) => break,
        }
    }
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server on port {}: its log ---\n{}",
                self.port,
                crate::failure::log_tail(&self.log(), 15)
            );
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
