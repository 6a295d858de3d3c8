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
