//! Running out of file descriptors: the node started under a small
//! open-file limit (`ulimit -n` in the shell that runs it).
//!
//! - It raises its soft limit to the hard one, derives its connection cap
//!   from it (logged in "switchboard node started") and answers handshakes
//!   beyond the cap 503 `over_capacity` at once, while `/healthz` and the
//!   control API keep answering; refused sockets that send nothing hold no
//!   slot, and past the refusing window are answered at once.
//! - When the descriptors run out anyway (here: idle control connections
//!   take them), a new client is answered 503 rather than left waiting in
//!   the listen backlog, and the failed `accept()` is counted.

use crate::common::Node;
use std::time::Duration;
use switchboard_test_util::metric_value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for any one answer: a hang fails the test instead of
/// stalling it.
const ANSWER: Duration = Duration::from_secs(3);

/// Hard open-file limit of the node.
const HARD: u64 = 256;

async fn start() -> Node {
    Node::start_with_nofile(
        &[
            "--listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
            "--max-handshakes-per-ip",
            "0",
        ],
        &[],
        64,
        HARD,
    )
    .await
}

/// Sends a WebSocket upgrade on a new socket and reads the answer's status
/// line (`ANSWER` at most); keeps the socket open when it is a 101.
async fn handshake(node: &Node) -> (u16, String, TcpStream) {
    let exchange = async {
        let mut s = TcpStream::connect(node.listen).await.expect("connect");
        let req = switchboard_test_util::upgrade_request("/", &[]);
        s.write_all(req.as_bytes()).await.expect("send the head");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let status: u16 = head[9..12].parse().expect("a status");
                if status == 101 || n == 0 || body.ends_with('}') {
                    return (status, body.to_owned(), s);
                }
            }
            assert!(n > 0, "closed without an answer: {text:?}");
        }
    };
    tokio::time::timeout(ANSWER, exchange)
        .await
        .expect("the handshake was neither accepted nor refused within 3s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_open_file_limit_handshakes_get_503_and_the_control_api_answers() {
    let node = start().await;
    assert_eq!(
        node.started["fd_limit"], HARD,
        "the soft limit is raised to the hard one: {}",
        node.started
    );
    let cap = node.started["max_connections"]
        .as_u64()
        .expect("max_connections logged") as usize;
    assert!(
        (16..HARD as usize / 2).contains(&cap),
        "the cap leaves room for the reserve: {}",
        node.started
    );
    // Well past the limit itself: every one is answered.
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..HARD as usize + 44 {
        let (status, body, socket) = handshake(&node).await;
        match status {
            101 => open.push(socket),
            503 => {
                let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
                assert_eq!(v["code"], "over_capacity", "{body}");
                refused += 1;
            }
            other => panic!("handshake {i}: {other} {body}"),
        }
    }
    assert_eq!(open.len(), cap, "exactly the cap is let in");
    assert_eq!(refused, HARD as usize + 44 - cap);

    // At the cap, the control listener still answers.
    let health = tokio::time::timeout(ANSWER, node.get("/healthz"))
        .await
        .expect("/healthz answers at the cap");
    assert_eq!(health.status, 200);
    let stats = tokio::time::timeout(ANSWER, node.get("/v1/stats"))
        .await
        .expect("the control API answers at the cap");
    assert_eq!(stats.status, 200, "{}", stats.body);
    assert_eq!(stats.json()["connections"], cap);
    let metrics = node.get("/metrics").await;
    assert_eq!(
        metric_value(
            &metrics.body,
            "switchboard_handshakes_total{result=\"over_capacity\"}"
        ),
        refused as f64
    );

    // Silent sockets past the cap: the first ones wait for their head in
    // the (small, under this limit) refusing window, the rest are answered
    // at once; either way a handshake is still answered at once...
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(node.listen).await.expect("connect"));
    }
    let (status, body, _) = handshake(&node).await;
    assert_eq!(status, 503, "{body}");
    // ... and they hold no slot: one that frees is taken again at once.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + ANSWER;
    loop {
        let (status, _, socket) = handshake(&node).await;
        if status == 101 {
            open.push(socket);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a close"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_a_new_client_gets_503_not_a_hang() {
    let node = start().await;
    // Idle control connections take every descriptor left.
    let mut hogs = Vec::new();
    for _ in 0..HARD {
        hogs.push(TcpStream::connect(node.control).await.expect("connect"));
    }
    // Until the node has taken them all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", node.pid))
            .map(|d| d.count() as u64)
            .unwrap_or(0)
    };
    while fds() < HARD {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node holds {} descriptors of {HARD} after 5s",
            fds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (status, body, _socket) = handshake(&node).await;
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["code"], "over_capacity");

    // Descriptors back: the node serves again and has counted it all.
    drop(hogs);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(1), reqwest::get(node.api("/metrics"))).await
        {
            break r.text().await.expect("metrics body");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control API did not come back"
        );
    };
    assert!(
        metric_value(
            &metrics,
            "switchboard_accept_errors_total{listener=\"client\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "switchboard_handshakes_total{result=\"over_capacity\"}"
        ) >= 1.0
    );
    let (status, _, _ws) = handshake(&node).await;
    assert_eq!(status, 101, "a client fits again");
}
