//! The real `switchboard` binary: graceful drain on SIGTERM, and configuration
//! precedence (flags > `SWITCHBOARD_*` environment > TOML file > defaults),
//! observed through `serve --check` and through a running node's behaviour.

mod common;

use common::{switchboard, Node};
use futures_util::SinkExt;
use std::path::PathBuf;
use switchboard_test_util::*;

/// A TOML file in a fresh temporary directory, removed on drop.
struct TempToml(PathBuf);

impl TempToml {
    fn new(name: &str, text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-bin-test-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("switchboard.toml");
        std::fs::write(&path, text).expect("write config");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_with_1012_and_exits_zero() {
    let origin = TestOrigin::start(Some("binary-test-secret")).await;
    let url = origin.url();
    let mut node = Node::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
            "--origin",
            &url,
            "--drain-spread",
            "100ms",
            "--drain-timeout",
            "5s",
        ],
        &[("SWITCHBOARD_ORIGIN_SECRET", "binary-test-secret")],
    )
    .await;
    let mut ws = connect(&format!("ws://{}/bin", node.listen)).await;
    let id = origin.id_for(local_addr(&ws)).await;
    assert!(id.starts_with(&format!("{}.", node.node)), "{id}");
    ws.send(WsMessage::text("before the signal")).await.unwrap();
    origin.wait_messages(&id, 1).await;

    node.term();
    let (code, reason, _) = expect_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1012, "server restart, reconnect"));
    let status = node.wait().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", node.seen.join("\n"));
    // The disconnect reached the origin before the process exited.
    let ds = origin.disconnects_of(&id);
    assert_eq!(ds.len(), 1, "{ds:?}");
    assert_eq!(ds[0].code, 1012);
    assert!(origin
        .received()
        .iter()
        .all(|r| r.signature_ok == Some(true)));
    // What the operator sees.
    let log = node.final_log().await;
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("\"completed\":true"), "{log}");
}

/// `serve --check` prints the effective configuration as TOML.
fn check(args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let mut all = vec!["serve", "--check"];
    all.extend_from_slice(args);
    let out = switchboard(&all, env).output().expect("run switchboard");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("--check output is not TOML ({e}): {stdout}"))
}

#[test]
fn config_precedence_in_check_output() {
    let file = TempToml::new(
        "check",
        "node-id = \"from-file\"\nping-interval = \"7s\"\nmax-message-size = 1000\npong-timeout = \"3s\"\nsubprotocol = [\"file.v1\"]\n",
    );
    let env = [
        ("SWITCHBOARD_NODE_ID", "from-env"),
        ("SWITCHBOARD_MAX_MESSAGE_SIZE", "2000"),
    ];
    let all = check(&["--config", file.path(), "--node-id", "from-flag"], &env);
    assert_eq!(
        all["node-id"].as_str(),
        Some("from-flag"),
        "flag beats env and file"
    );
    assert_eq!(
        all["max-message-size"].as_integer(),
        Some(2000),
        "env beats file"
    );
    assert_eq!(
        all["ping-interval"].as_str(),
        Some("7s"),
        "file beats default"
    );
    assert_eq!(all["pong-timeout"].as_str(), Some("3s"));
    assert_eq!(all["handshake-timeout"].as_str(), Some("10s"), "default");
    assert_eq!(all["subprotocol"].as_array().map(Vec::len), Some(1));

    let no_flag = check(&["--config", file.path()], &env);
    assert_eq!(no_flag["node-id"].as_str(), Some("from-env"));
    let file_only = check(&["--config", file.path()], &[]);
    assert_eq!(file_only["node-id"].as_str(), Some("from-file"));
    assert_eq!(file_only["max-message-size"].as_integer(), Some(1000));
    // The file named by the environment instead of a flag.
    let via_env = check(&[], &[("SWITCHBOARD_CONFIG", file.path())]);
    assert_eq!(via_env["node-id"].as_str(), Some("from-file"));
    // A repeatable flag replaces the file's list; the env form is comma-separated.
    let lists = check(
        &[
            "--config",
            file.path(),
            "--subprotocol",
            "a",
            "--subprotocol",
            "b",
        ],
        &[],
    );
    assert_eq!(lists["subprotocol"].as_array().unwrap().len(), 2);
    let env_list = check(
        &["--config", file.path()],
        &[("SWITCHBOARD_SUBPROTOCOL", "x,y,z")],
    );
    assert_eq!(env_list["subprotocol"].as_array().unwrap().len(), 3);
    // Defaults alone.
    let defaults = check(&[], &[]);
    assert_eq!(defaults["ping-interval"].as_str(), Some("25s"));
    assert!(defaults.get("node-id").is_none());
}

#[test]
fn invalid_configuration_exits_64() {
    let bad_file = TempToml::new("bad", "no-such-option = 1\n");
    for (args, needle) in [
        (
            vec!["serve", "--check", "--max-message-size", "0"],
            "max-message-size",
        ),
        (
            vec!["serve", "--check", "--config", bad_file.path()],
            "no-such-option",
        ),
        (vec!["serve", "--control-listen", "0.0.0.0:0"], "api-key"),
    ] {
        let out = switchboard(&args, &[]).output().expect("run switchboard");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // A bad environment value is refused the same way.
    let out = switchboard(
        &["serve", "--check"],
        &[("SWITCHBOARD_MAX_CONNECTIONS", "0")],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Precedence seen in a running node: the file names addresses this test
/// holds, so the node can only start if the environment and the flags win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_precedence_in_a_running_node() {
    let held_a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (held_a.local_addr().unwrap(), held_b.local_addr().unwrap());
    let origin = TestOrigin::start(None).await;
    let file = TempToml::new(
        "run",
        &format!(
            "listen = \"{a}\"\ncontrol-listen = \"{b}\"\nnode-id = \"file-node\"\nmax-message-size = 100\nsubprotocol = [\"file.v1\"]\ndrain-spread = \"100ms\"\n"
        ),
    );
    let url = origin.url();
    let env = [
        ("SWITCHBOARD_LISTEN", "127.0.0.1:0"),
        ("SWITCHBOARD_NODE_ID", "env-node"),
        ("SWITCHBOARD_MAX_MESSAGE_SIZE", "200"),
        ("SWITCHBOARD_ORIGIN", url.as_str()),
    ];
    let mut node = Node::start(
        &[
            "--config",
            file.path(),
            "--control-listen",
            "127.0.0.1:0",
            "--node-id",
            "flag-node",
        ],
        &env,
    )
    .await;
    assert_ne!(node.listen, a, "env listen beats the file");
    assert_ne!(node.control, b, "flag control-listen beats the file");
    assert_eq!(node.node, "flag-node");
    let stats: serde_json::Value = reqwest::get(node.api("/v1/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["node"], "flag-node");

    // The file's subprotocol and the environment's message size are in force.
    let (mut ws, resp) = connect_with(
        &format!("ws://{}/", node.listen),
        &[("Sec-WebSocket-Protocol", "file.v1")],
    )
    .await
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "file.v1");
    let id = origin.id_for(local_addr(&ws)).await;
    assert!(id.starts_with("flag-node."), "{id}");
    ws.send(WsMessage::binary(vec![0; 150])).await.unwrap();
    origin.wait_messages(&id, 1).await;
    ws.send(WsMessage::binary(vec![0; 250])).await.unwrap();
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1009, "over the environment's 200 bytes");

    node.term();
    assert_eq!(node.wait().await.code(), Some(0));
    drop((held_a, held_b));
}

/// The repository root (where switchboard.example.toml and deploy/ live).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The example configuration at the root passes `serve --check` as shipped,
/// and with every optional `# key = value` line uncommented too, and each key
/// it sets shows up in the effective configuration.
#[test]
fn example_config_passes_check() {
    let path = repo_root().join("switchboard.example.toml");
    let text = std::fs::read_to_string(&path).expect("read switchboard.example.toml");
    let shipped = check(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(shipped["drain-timeout"].as_str(), Some("20s"), "{shipped}");
    assert_eq!(
        shipped["origin"].as_str(),
        Some("http://127.0.0.1:3000/switchboard/events")
    );

    let mut optional = Vec::new();
    let full: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                }) =>
            {
                optional.push(rest.split_once(" = ").unwrap().0.to_owned());
                format!("{rest}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    assert!(optional.len() >= 15, "optional keys found: {optional:?}");
    let all = TempToml::new("example-full", &full);
    let effective = check(&["--config", all.path()], &[]);
    for key in &optional {
        assert!(
            effective.contains_key(key),
            "{key} missing from:\n{effective}"
        );
    }
    assert_eq!(effective["node-id"].as_str(), Some("gw-1"));
}

/// `--version` names the build; `healthcheck` exits 0 on a 2xx answer and 1
/// otherwise, with one line saying why; the startup log carries the build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_healthcheck() {
    let out = switchboard(&["--version"], &[]).output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        version.starts_with(&format!(
            "switchboard {}\ncommit:",
            env!("CARGO_PKG_VERSION")
        )),
        "{version}"
    );
    for field in ["built:", "features:", "target:", "rustc:"] {
        assert!(version.contains(field), "{version}");
    }

    let node = Node::start(
        &["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"],
        &[],
    )
    .await;
    let startup = node
        .seen
        .iter()
        .find(|l| l.contains("starting"))
        .unwrap_or_else(|| panic!("no startup line in {:?}", node.seen));
    let commit = version
        .lines()
        .find_map(|l| l.strip_prefix("commit:"))
        .unwrap()
        .trim();
    assert!(
        startup.contains(&format!("\\\"commit\\\":\\\"{commit}\\\"")),
        "{startup}"
    );

    let healthcheck = |url: String| async move {
        tokio::task::spawn_blocking(move || {
            switchboard(&["healthcheck", "--url", &url, "--timeout", "5"], &[])
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let ok = healthcheck(node.api("/healthz")).await;
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("200 OK"),
        "{ok:?}"
    );
    let missing = healthcheck(node.api("/no-such-route")).await;
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("answered 404"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // A port nothing listens on: bound by the OS, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = healthcheck(format!("http://127.0.0.1:{closed}/healthz")).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused"),
        "{refused:?}"
    );
}

/// Every metric the dashboard and the alert rules query is one the node
/// exports, and docs/operations.md names every metric the node exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_alerts_and_docs_name_real_metrics() {
    let node = Node::start(
        &["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"],
        &[],
    )
    .await;
    let text = node.get("/metrics").await.body;
    let mut families = Vec::new();
    let mut samples = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            families.push(name.to_owned());
            match kind {
                "counter" => {
                    samples.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_count", "_sum"] {
                        samples.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    samples.insert(name.to_owned());
                }
            }
        }
    }
    assert!(families.len() >= 30, "{text}");
    let names_in = |text: &str| -> std::collections::BTreeSet<String> {
        let mut found = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("switchboard_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            found.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
        found
    };
    let root = repo_root();
    for file in [
        "deploy/grafana/switchboard.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let used = names_in(&std::fs::read_to_string(root.join(file)).unwrap());
        assert!(used.len() >= 10, "{file}: {used:?}");
        for name in used {
            assert!(
                samples.contains(&name) || families.contains(&name),
                "{file} uses {name}, which /metrics does not export"
            );
        }
    }
    let docs = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    for family in &families {
        let sample = if samples.contains(&format!("{family}_total")) {
            format!("{family}_total")
        } else {
            family.clone()
        };
        assert!(
            docs.contains(&format!("`{sample}")),
            "docs/operations.md does not list `{sample}`"
        );
    }
}
