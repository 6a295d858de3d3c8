//! The NATS side of the cluster scenarios (`cross-node`, `fanout --nodes N`):
//! the `nats-server` the tool starts for itself, its monitoring counters, and
//! the wait until the nodes see each other.
//!
//! [`NatsServer::start`] runs `nats-server` on free loopback ports with
//! monitoring on (for `/varz` and `/connz`), its log beside the result file,
//! and optionally JetStream with a store folder beside the result file that
//! is emptied before the run and removed when the server is stopped (or
//! dropped, on error paths too).

use crate::fleet::Service;
use crate::util;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long nats-server may take to listen.
const START_LIMIT: Duration = Duration::from_secs(15);

/// A `nats-server` started by the tool; stopped (and its JetStream store
/// removed) when dropped.
#[derive(Debug)]
pub(crate) struct NatsServer {
    service: Service,
    /// Client URL, `nats://127.0.0.1:PORT`.
    pub(crate) url: String,
    /// Monitoring address (`/varz`, `/connz`).
    pub(crate) mon: SocketAddr,
    /// The server's log file.
    pub(crate) log: PathBuf,
    /// The JetStream store, if JetStream is on.
    store: Option<PathBuf>,
    /// The command line.
    pub(crate) command: Vec<String>,
    /// `version` of `/varz`.
    pub(crate) version: Option<String>,
}

/// The log file and JetStream store folder that go beside the result file `out`.
pub(crate) fn files_beside(out: &Path) -> (PathBuf, PathBuf) {
    (
        out.with_extension("nats.log"),
        out.with_extension("jetstream"),
    )
}

/// nats-server's arguments: loopback only, client and monitoring ports, log
/// file, and JetStream with its store folder if `store` is given.
pub(crate) fn server_args(
    port: u16,
    mon_port: u16,
    log: &Path,
    store: Option<&Path>,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-m".into(),
        mon_port.to_string(),
        "-l".into(),
        log.display().to_string(),
    ];
    if let Some(dir) = store {
        args.extend(["-js".into(), "-sd".into(), dir.display().to_string()]);
    }
    args
}

impl NatsServer {
    /// Starts `bin` (see the module docs) with its files beside `out`, waits
    /// until both its ports listen and reads its version.
    pub(crate) fn start(bin: &Path, out: &Path, jetstream: bool) -> Result<Self, String> {
        let (log, store) = files_beside(out);
        if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let store = jetstream.then_some(store);
        if let Some(s) = &store {
            let _ = std::fs::remove_dir_all(s);
        }
        let port = util::free_port()?;
        let mon: SocketAddr = ([127, 0, 0, 1], util::free_port()?).into();
        let args = server_args(port, mon.port(), &log, store.as_deref());
        let service = Service::spawn("nats-server", bin, &args)?;
        let mut command = vec![bin.display().to_string()];
        command.extend(args);
        let mut nats = Self {
            service,
            url: format!("nats://127.0.0.1:{port}"),
            mon,
            log,
            store,
            command,
            version: None,
        };
        for addr in [mon, ([127, 0, 0, 1], port).into()] {
            util::wait_listening(addr, &mut nats.service.child, START_LIMIT)
                .map_err(|e| format!("nats-server: {e} (log: {})", nats.log.display()))?;
        }
        nats.version = monitor_json(mon, "/varz")
            .ok()
            .and_then(|v| v.get("version")?.as_str().map(str::to_owned));
        Ok(nats)
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.service.pid()
    }

    /// Fails if the server has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
        match self.service.child.try_wait() {
            Ok(None) => Ok(()),
            _ => Err(format!("nats-server exited (log: {})", self.log.display())),
        }
    }

    /// Stops the server (SIGTERM, SIGKILL after 5 s) and removes its store.
    pub(crate) fn stop(&mut self) {
        self.service.stop(Duration::from_secs(5));
        if let Some(s) = self.store.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The node ids `a`, `b`, `c`, ... of an `n`-node cluster (`n` ≤ 26).
pub(crate) fn node_ids(n: usize) -> Vec<String> {
    (b'a'..=b'z')
        .take(n)
        .map(|c| char::from(c).to_string())
        .collect()
}

/// The NATS server's message counters (`GET /varz`) and the messages each
/// client connection published (`GET /connz`).
#[derive(Debug, Clone)]
pub(crate) struct NatsSample {
    pub(crate) in_msgs: u64,
    pub(crate) out_msgs: u64,
    pub(crate) in_bytes: u64,
    /// `in_msgs` of each client connection, by name (`cid <n>` if unnamed).
    pub(crate) published: BTreeMap<String, u64>,
}

/// `GET path` of the NATS monitoring port, as JSON.
pub(crate) fn monitor_json(mon: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let (status, body) = util::http_get(mon, path)?;
    if status != 200 {
        return Err(format!("GET {path}: HTTP {status}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}"))
}

/// Reads the NATS counters.
pub(crate) fn nats_sample(mon: SocketAddr) -> Result<NatsSample, String> {
    let v = monitor_json(mon, "/varz")?;
    let n = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_u64())
            .ok_or_else(|| format!("GET /varz: no {k}"))
    };
    let c = monitor_json(mon, "/connz")?;
    let mut published = BTreeMap::new();
    for conn in c
        .get("connections")
        .and_then(|x| x.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let name = match conn.get("name").and_then(|x| x.as_str()) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => format!(
                "cid {}",
                conn.get("cid").and_then(|x| x.as_u64()).unwrap_or(0)
            ),
        };
        let msgs = conn.get("in_msgs").and_then(|x| x.as_u64()).unwrap_or(0);
        *published.entry(name).or_insert(0) += msgs;
    }
    Ok(NatsSample {
        in_msgs: n("in_msgs")?,
        out_msgs: n("out_msgs")?,
        in_bytes: n("in_bytes")?,
        published,
    })
}

/// Messages each connection published between two samples (connections
/// present in both).
pub(crate) fn published_delta(v0: &NatsSample, v1: &NatsSample) -> BTreeMap<String, f64> {
    v1.published
        .iter()
        .filter_map(|(k, b)| Some((k.clone(), b.saturating_sub(*v0.published.get(k)?) as f64)))
        .collect()
}

/// The node ids listed by a `GET /v1/nodes` answer.
pub(crate) fn listed_nodes(body: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("nodes")?.as_array().map(|ns| {
                ns.iter()
                    .filter_map(|n| n.get("node")?.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Polls `GET /v1/nodes` on the control API of node `node` (at `control`)
/// until it lists every node of `want`, at most until `deadline`.
pub(crate) fn wait_nodes(
    node: &str,
    control: SocketAddr,
    want: &[String],
    deadline: Instant,
) -> Result<(), String> {
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match util::http_get(control, "/v1/nodes") {
            Ok((200, body)) => {
                let listed = listed_nodes(&body);
                if want.iter().all(|w| listed.contains(w)) {
                    return Ok(());
                }
                last = body;
            }
            Ok((status, body)) => last = format!("HTTP {status}: {body}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "GET /v1/nodes on node {node} did not list {want:?} in time; last answer: {last}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_letters() {
        assert_eq!(node_ids(3), ["a", "b", "c"]);
        assert_eq!(node_ids(26).last().map(String::as_str), Some("z"));
        assert_eq!(node_ids(30).len(), 26);
        assert!(node_ids(0).is_empty());
    }

    #[test]
    fn server_args_with_and_without_jetstream() {
        let plain = server_args(4222, 8222, Path::new("/t/x.nats.log"), None);
        assert_eq!(
            plain,
            [
                "-a",
                "127.0.0.1",
                "-p",
                "4222",
                "-m",
                "8222",
                "-l",
                "/t/x.nats.log"
            ]
        );
        let js = server_args(1, 2, Path::new("l"), Some(Path::new("/t/x.jetstream")));
        assert_eq!(&js[js.len() - 3..], ["-js", "-sd", "/t/x.jetstream"]);
        let (log, store) = files_beside(Path::new("target/bench/fanout.json"));
        assert_eq!(log, Path::new("target/bench/fanout.nats.log"));
        assert_eq!(store, Path::new("target/bench/fanout.jetstream"));
    }

    #[test]
    fn nodes_listed() {
        let body = r#"{"nodes":[{"node":"a","connections":3},{"node":"b"}],"x":1}"#;
        assert_eq!(listed_nodes(body), ["a", "b"]);
        assert!(listed_nodes("not json").is_empty());
        assert!(listed_nodes(r#"{"nodes":7}"#).is_empty());
    }

    #[test]
    fn published_delta_only_for_connections_in_both() {
        let s = |p: &[(&str, u64)]| NatsSample {
            in_msgs: 0,
            out_msgs: 0,
            in_bytes: 0,
            published: p.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        };
        let d = published_delta(
            &s(&[("switchboard a", 10), ("switchboard b", 5)]),
            &s(&[("switchboard a", 30), ("switchboard b", 5), ("cid 9", 4)]),
        );
        assert_eq!(d.get("switchboard a"), Some(&20.0));
        assert_eq!(d.get("switchboard b"), Some(&0.0));
        assert_eq!(d.get("cid 9"), None);
    }
}
