//! The control listener against slow and silent clients (issue 11, 3): a
//! half-sent head, a body shorter than its `Content-Length`, an idle
//! keep-alive connection, a connection that sends nothing, and more
//! connections than `--control-max-connections`. Each is answered or
//! closed within its configured timeout (short ones here) and counted in
//! `switchboard_control_refusals_total{reason}`.

use crate::common::Node;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use switchboard_test_util::metric_value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any test waits for the node to act.
const BOUND: Duration = Duration::from_secs(3);

/// A node with the control listener's settings `extra`.
async fn node(extra: &[&str]) -> Node {
    let mut args = vec!["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Node::start(&args, &[]).await
}

/// Reads until the server closes the connection (at most [`BOUND`]);
/// returns what it sent and when it closed.
async fn read_until_closed(s: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(BOUND, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the control listener kept the connection open over {BOUND:?}; got {:?}",
            String::from_utf8_lossy(&got)
        )
    });
    (got, closed)
}

/// The status and JSON body of one answer in `bytes`.
fn answer(bytes: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, body)
}

/// Reads one whole answer of a keep-alive connection (head and
/// `Content-Length` body).
async fn read_answer(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(BOUND, async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                    return (status, got[end + 4..end + 4 + len].to_vec());
                }
            }
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before a whole answer: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer in time")
}

async fn refusals(control: SocketAddr, reason: &str) -> f64 {
    let text = reqwest::get(format!("http://{control}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    metric_value(
        &text,
        &format!("switchboard_control_refusals_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_gets_408_json_and_is_closed_even_when_trickled() {
    let node = node(&["--control-header-timeout", "400ms"]).await;
    // Half a head, then nothing.
    let mut s = TcpStream::connect(node.control).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut s).await;
    let (status, body) = answer(&got);
    assert_eq!(
        (status, body["code"].as_str()),
        (408, Some("request_timeout"))
    );
    let took = closed - start;
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // A head trickled a byte at a time never completes in time either: the
    // timeout runs from its first byte, not from the last one.
    let mut s = TcpStream::connect(node.control).await.unwrap();
    let start = Instant::now();
    let trickle = async {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
        {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), trickle).await;
    let (got, closed) = read_until_closed(&mut s).await;
    let (status, body) = answer(&got);
    assert_eq!(
        (status, body["code"].as_str()),
        (408, Some("request_timeout"))
    );
    assert!(
        closed - start < Duration::from_secs(2),
        "{:?}",
        closed - start
    );
    assert_eq!(refusals(node.control, "header_timeout").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let node = node(&["--control-header-timeout", "400ms"]).await;
    let mut s = TcpStream::connect(node.control).await.unwrap();
    let start = Instant::now();
    let (got, closed) = read_until_closed(&mut s).await;
    assert!(
        got.is_empty(),
        "nothing to answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    let took = closed - start;
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(refusals(node.control, "header_timeout").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shorter_than_its_content_length_gets_408_json_and_is_closed() {
    let node = node(&["--control-body-timeout", "400ms"]).await;
    let mut s = TcpStream::connect(node.control).await.unwrap();
    let start = Instant::now();
    s.write_all(
        b"POST /v1/channels/chat:1/messages HTTP/1.1\r\nHost: x\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"text\":",
    )
    .await
    .unwrap();
    let (got, closed) = read_until_closed(&mut s).await;
    let (status, body) = answer(&got);
    assert_eq!(
        (status, body["code"].as_str()),
        (408, Some("request_timeout")),
        "{body}"
    );
    let took = closed - start;
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(refusals(node.control, "body_timeout").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_the_header_one() {
    let node = node(&[
        "--control-header-timeout",
        "200ms",
        "--control-idle-timeout",
        "800ms",
    ])
    .await;
    let mut s = TcpStream::connect(node.control).await.unwrap();
    let get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(get).await.unwrap();
    assert_eq!(read_answer(&mut s).await.0, 200);
    // Idle longer than the header timeout: still open.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(get).await.unwrap();
    assert_eq!(
        read_answer(&mut s).await.0,
        200,
        "kept alive past the header timeout"
    );
    // Then idle past the idle timeout: closed, without an answer.
    let idle_from = Instant::now();
    let (got, closed) = read_until_closed(&mut s).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    let took = closed - idle_from;
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(refusals(node.control, "idle_timeout").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_json_until_one_closes() {
    let node = node(&[
        "--control-max-connections",
        "2",
        "--control-header-timeout",
        "10s",
    ])
    .await;
    let held1 = TcpStream::connect(node.control).await.unwrap();
    let held2 = TcpStream::connect(node.control).await.unwrap();
    // Let the node accept both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(node.control).await.unwrap();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_until_closed(&mut extra).await;
    let (status, body) = answer(&got);
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("too_many_connections"))
    );
    // A slot frees when a connection closes.
    drop(held1);
    let deadline = Instant::now() + BOUND;
    let metrics = loop {
        let mut s = TcpStream::connect(node.control).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (status, body) = read_answer(&mut s).await;
        if status == 200 {
            break String::from_utf8(body).unwrap();
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        metric_value(
            &metrics,
            "switchboard_control_refusals_total{reason=\"over_capacity\"}"
        ) >= 1.0,
        "{metrics}"
    );
    drop(held2);
}
