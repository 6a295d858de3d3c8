//! Shared harness for the tests of the real `switchboard` binary: a command
//! builder with a clean `SWITCHBOARD_*` environment, and [`Node`], a running
//! `switchboard serve` process whose JSON log is read line by line, with
//! signals (SIGTERM, SIGKILL) and control API helpers.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use switchboard_test_util::ApiResponse;

/// A command for the binary with no inherited `SWITCHBOARD_*` variables.
pub(crate) fn switchboard(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// A running `switchboard serve` process.
pub(crate) struct Node {
    child: Option<Child>,
    pub(crate) pid: u32,
    /// Log lines (JSON) as they arrive.
    pub(crate) lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every line seen so far.
    pub(crate) seen: Vec<String>,
    pub(crate) listen: SocketAddr,
    pub(crate) control: SocketAddr,
    pub(crate) node: String,
    http: reqwest::Client,
}

impl Node {
    /// Starts the binary (logging JSON to stderr) and waits for its
    /// "switchboard node started" line.
    pub(crate) async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec!["serve", "--log-format", "json", "--log-level", "info"];
        all.extend_from_slice(args);
        let mut child = switchboard(&all, env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchboard");
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = Self {
            child: Some(child),
            pid,
            lines,
            seen: Vec::new(),
            listen: "0.0.0.0:0".parse().unwrap(),
            control: "0.0.0.0:0".parse().unwrap(),
            node: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("http client"),
        };
        let started = node.wait_log("switchboard node started").await;
        node.listen = started["listen"].as_str().unwrap().parse().unwrap();
        node.control = started["control"].as_str().unwrap().parse().unwrap();
        node.node = started["node"].as_str().unwrap().to_owned();
        node
    }

    /// Waits (10 s at most) for a log line with this message; returns it as JSON.
    pub(crate) async fn wait_log(&mut self, message: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let line = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => l,
                Ok(None) => panic!(
                    "switchboard exited before logging {message:?}; log:\n{}",
                    self.seen.join("\n")
                ),
                Err(_) => panic!(
                    "no {message:?} log line within 10s; log:\n{}",
                    self.seen.join("\n")
                ),
            };
            self.seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == message {
                    return v;
                }
            }
        }
    }

    /// Moves the log lines that arrived so far into `seen` and returns the
    /// whole log.
    pub(crate) fn log(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// After the process has exited: reads its log to the end (the reader
    /// thread may still be forwarding the last lines when `wait` returns) and
    /// returns the whole log.
    pub(crate) async fn final_log(&mut self) -> String {
        assert!(self.child.is_none(), "final_log before the process exited");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill {sig} failed");
    }

    /// Freezes the process (SIGSTOP) and waits (2 s at most) until every
    /// thread of it is stopped.
    pub(crate) async fn freeze(&self) {
        self.signal("-STOP");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid))
                .expect("read /proc/<pid>/task");
            let all_stopped = tasks.filter_map(Result::ok).all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    // The state follows the command name in parentheses.
                    .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
                    .unwrap_or(true)
            });
            if all_stopped {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} not stopped 2s after SIGSTOP",
                self.node
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resumes a frozen process (SIGCONT).
    pub(crate) fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Sends SIGTERM.
    pub(crate) fn term(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGTERM and waits (10 s at most) for the process to exit.
    pub(crate) async fn sigterm(&mut self) -> ExitStatus {
        self.term();
        self.wait().await
    }

    /// Kills the process with SIGKILL and waits for it to be gone.
    pub(crate) async fn kill9(&mut self) {
        let mut child = self.child.take().expect("still running");
        tokio::task::spawn_blocking(move || {
            let _ = child.kill();
            child.wait().expect("wait for the killed node")
        })
        .await
        .expect("wait task");
    }

    /// Waits (10 s at most) for the process to exit.
    pub(crate) async fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not yet waited for");
        let waiter = tokio::task::spawn_blocking(move || child.wait().expect("wait"));
        match tokio::time::timeout(Duration::from_secs(10), waiter).await {
            Ok(status) => status.expect("wait task"),
            Err(_) => {
                self.signal("-KILL");
                panic!(
                    "switchboard did not exit within 10s; log:\n{}",
                    self.seen.join("\n")
                );
            }
        }
    }

    /// `http://` URL of the control API for `path`.
    pub(crate) fn api(&self, path: &str) -> String {
        format!("http://{}{}", self.control, path)
    }

    /// `ws://` URL of the client listener for `path`.
    pub(crate) fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.listen, path)
    }

    /// Sends a control API request and reads the whole answer (5 s at most).
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> ApiResponse {
        let mut req = self.http.request(method.clone(), self.api(path));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} on node {}: {e}", self.node));
        ApiResponse::read(resp).await
    }

    /// `GET path` on the control API.
    pub(crate) async fn get(&self, path: &str) -> ApiResponse {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body on the control API.
    pub(crate) async fn post(&self, path: &str, body: &serde_json::Value) -> ApiResponse {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// `DELETE path` on the control API.
    pub(crate) async fn delete(&self, path: &str) -> ApiResponse {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// `POST /v1/connections/{id}/messages` with a text message.
    pub(crate) async fn push_text(&self, id: &str, text: &str) -> ApiResponse {
        self.post(
            &format!("/v1/connections/{id}/messages"),
            &serde_json::json!({ "text": text }),
        )
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test: show what this node logged (the tail).
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- last {} log lines of node {:?} ---\n{}",
                tail.len(),
                self.node,
                tail.join("\n")
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
