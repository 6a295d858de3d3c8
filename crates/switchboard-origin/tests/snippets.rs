//! The Node and Python snippets of `docs/snippets/`, run with the real
//! interpreters against a real gateway:
//!
//! - `check` mode: `verify` on signatures made by
//!   `switchboard_proto::origin::signature::sign` (valid, tampered, wrong
//!   secret, stale, future, malformed, binary body), and the control helper
//!   publishing (idempotent retry included) and sending to a live WebSocket
//!   client, plus its error answers;
//! - `serve` mode: the snippet as the gateway's origin, verifying every
//!   request and echoing messages; a gateway with the wrong secret is refused.
//!
//! When `node` or `python3` is missing the test prints why and passes,
//! unless `CI` is set.

use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};
use switchboard_origin::ControlClient;
use switchboard_proto::origin::signature::sign;
use switchboard_test_util::*;

const SECRET: &str = "snippet-secret-7c1e";
const KEY: &str = "snippet-api-key-4567";

fn snippet(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/snippets")
        .join(name)
}

/// Whether `program` runs; if not, says why, and panics when `CI` is set.
fn available(program: &str) -> bool {
    match Command::new(program).arg("--version").output() {
        Ok(o) if o.status.success() => true,
        outcome => {
            let why = match outcome {
                Ok(o) => format!("`{program} --version` exited with {}", o.status),
                Err(e) => format!("`{program}` cannot be run: {e}"),
            };
            assert!(
                std::env::var_os("CI").is_none(),
                "{why}; CI is set, so the snippet test must run"
            );
            // Straight to stderr, past the test harness's capture, so the
            // skip shows in a passing run.
            let _ = writeln!(
                std::io::stderr(),
                "skipping the {program} snippet test: {why} (set CI to make this fail)"
            );
            false
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One `verify` case for the snippet, and whether it must pass.
fn case(timestamp: String, signature: String, body: &[u8]) -> Value {
    json!({
        "timestamp": timestamp,
        "signature": signature,
        "body_b64": base64::engine::general_purpose::STANDARD.encode(body),
    })
}

/// The verify cases and the expected answers.
fn verify_cases() -> (Value, Vec<bool>) {
    let s = SECRET.as_bytes();
    let body = r#"{"events":[{"type":"message","text":"héllo"}]}"#.as_bytes();
    let binary: &[u8] = &[0xff, 0x00, 0xfe, b'{', 0x80];
    let t = now();
    let cases = vec![
        (case(t.to_string(), sign(s, t, body), body), true),
        (
            case(t.to_string(), sign(s, t, body), b"{\"events\":[]}"),
            false,
        ),
        (case(t.to_string(), sign(b"other", t, body), body), false),
        (
            case((t - 400).to_string(), sign(s, t - 400, body), body),
            false,
        ),
        (
            case((t + 400).to_string(), sign(s, t + 400, body), body),
            false,
        ),
        (
            case((t - 200).to_string(), sign(s, t - 200, body), body),
            true,
        ),
        (case((t - 1).to_string(), sign(s, t, body), body), false),
        (case(t.to_string(), "v1=zz".into(), body), false),
        (case("soon".into(), sign(s, t, body), body), false),
        (case(t.to_string(), sign(s, t, binary), binary), true),
        (
            case(
                t.to_string(),
                sign(s, t, body).to_uppercase().replace("V1=", "v1="),
                body,
            ),
            true,
        ),
    ];
    let (values, expected) = cases.into_iter().unzip();
    (Value::Array(values), expected)
}

/// Runs `program file check` against a fresh gateway and checks everything
/// it reports, and what the WebSocket client received.
async fn check_mode(program: &str, file: &str) {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = vec!["chat:history-size=10".parse().unwrap()];
        c.api_key = vec![KEY.into()];
    })
    .await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let channel = format!("chat:{program}/snippet?#%é");
    let api = ControlClient::new(format!("http://{}", gw.control), Some(KEY.into())).unwrap();
    api.subscribe(&id, &channel, None).await.unwrap();

    let (cases, expected) = verify_cases();
    let text = format!("from {program}: ünïcode");
    let mut cmd = Command::new(program);
    cmd.arg(snippet(file))
        .arg("check")
        .env("SWITCHBOARD_ORIGIN_SECRET", SECRET)
        .env("SWITCHBOARD_CONTROL_URL", format!("http://{}/", gw.control))
        .env("SWITCHBOARD_API_KEY", KEY)
        .env("CHECK_CASES", cases.to_string())
        .env("CHECK_CHANNEL", &channel)
        .env("CHECK_CONNECTION", &id)
        .env("CHECK_TEXT", &text)
        .env("CHECK_KEY", format!("{program}-key-1"));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{program} {file} check failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{program} printed no JSON ({e}): {stdout}"));

    let verified: Vec<bool> = serde_json::from_value(got["verify"].clone()).unwrap();
    assert_eq!(verified, expected, "{program} verify() answers");
    assert_eq!(got["publish"]["offset"], 1, "{got}");
    assert_eq!(got["publish"]["duplicate"], false, "{got}");
    assert_eq!(got["publish_again"]["offset"], 1, "{got}");
    assert_eq!(got["publish_again"]["duplicate"], true, "{got}");
    assert_eq!(got["publish_again"]["epoch"], got["publish"]["epoch"]);
    assert_eq!(got["send"], json!({"status": "delivered"}));
    assert_eq!(got["send_binary"], json!({"status": "delivered"}));
    assert_eq!(
        got["wrong_key"],
        json!({"status": 401, "code": "unauthorized"})
    );
    assert_eq!(
        got["unknown_connection"],
        json!({"status": 404, "code": "connection_not_found"})
    );

    // What the client saw: the publication once, then the two sends.
    assert_eq!(next_msg(&mut ws).await, WsMessage::text(text.clone()));
    assert_eq!(next_msg(&mut ws).await, WsMessage::text(text.clone()));
    assert_eq!(next_msg(&mut ws).await, WsMessage::binary(vec![0, 1, 255]));
    let history = api.history(&channel, None, None).await.unwrap();
    assert_eq!(history.publications.len(), 1);
    drop(ws);
    gw.shutdown().await;
}

/// Kills the child when dropped (also when the test panics).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `program file serve 0` as the origin of a gateway.
async fn serve_mode(program: &str, file: &str) {
    let mut child = Command::new(program)
        .arg(snippet(file))
        .args(["serve", "0"])
        .env("SWITCHBOARD_ORIGIN_SECRET", SECRET)
        .env("SWITCHBOARD_EXIT_ON_STDIN_EOF", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} starts: {e}"));
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let line = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} serve printed nothing within {WAIT:?}"))
    .unwrap()
    .unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{program} serve printed {line:?}"));
    let url = format!("http://127.0.0.1:{port}/");

    // The right secret: connections are accepted and messages echoed.
    let gw = TestGateway::start(|c| {
        c.origin = Some(url.clone());
        c.origin_secret = Some(SECRET.into());
    })
    .await;
    let mut ws = connect(&gw.ws_url("/")).await;
    futures_util::SinkExt::send(&mut ws, WsMessage::text("ping ü"))
        .await
        .unwrap();
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("echo: ping ü"));
    drop(ws);
    gw.shutdown().await;

    // The wrong secret: the snippet refuses the connect with 401.
    let gw = TestGateway::start(|c| {
        c.origin = Some(url.clone());
        c.origin_secret = Some("not-the-secret".into());
    })
    .await;
    match connect_with(&gw.ws_url("/"), &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401, "{resp:?}")
        }
        Ok(_) => panic!("{program} accepted a request signed with the wrong secret"),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
    gw.shutdown().await;
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_snippet_verifies_publishes_and_serves() {
    if available("node") {
        check_mode("node", "origin.mjs").await;
        serve_mode("node", "origin.mjs").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_snippet_verifies_publishes_and_serves() {
    if available("python3") {
        check_mode("python3", "origin.py").await;
        serve_mode("python3", "origin.py").await;
    }
}

/// The `verify` functions quoted in docs/origin.md are the tested ones:
/// every paragraph of each quoted block (the first line, its imports, aside)
/// appears word for word in the snippet file.
#[test]
fn docs_quote_the_tested_verify() {
    let docs = std::fs::read_to_string(snippet("../origin.md")).expect("read docs/origin.md");
    for (fence, file) in [("```js\n", "origin.mjs"), ("```python\n", "origin.py")] {
        let source = std::fs::read_to_string(snippet(file)).expect("read snippet");
        let start = docs
            .find(&format!("{fence}import"))
            .unwrap_or_else(|| panic!("no {fence} block with imports in docs/origin.md"))
            + fence.len();
        let block = &docs[start..start + docs[start..].find("```").expect("closed block")];
        assert!(block.contains("verify("), "{file}: {block}");
        // The first paragraph is the block's imports; the rest is code.
        let (_imports, code) = block
            .split_once("\n\n")
            .unwrap_or_else(|| panic!("{file}: no code after the imports: {block}"));
        let paragraphs: Vec<&str> = code.split("\n\n").collect();
        assert!(!paragraphs.is_empty(), "{file}: {block}");
        for paragraph in paragraphs {
            let paragraph = paragraph.trim_matches('\n');
            assert!(
                source.contains(paragraph),
                "docs/origin.md quotes a {file} passage that is not in the snippet:\n{paragraph}"
            );
        }
    }
}
