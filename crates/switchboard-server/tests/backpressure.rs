//! Bounded memory under pressure: a client that does not read is closed as a
//! slow consumer (4001) with its outbound queue bounded; a client producing
//! events faster than the origin takes them is closed with 4002; a full node
//! queue refuses new handshakes.

use futures_util::SinkExt;
use switchboard_proto::origin::{ClosedBy, Event};
use switchboard_test_util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_with_4001_and_its_queue_stays_bounded() {
    const MAX_OUT: usize = 256 << 10;
    const MSG: usize = 64 << 10;
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.max_outbound_bytes = MAX_OUT).await;
    // A client with a small receive window that reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gw.addr).await.unwrap();
    let mut raw = RawWs::handshake(stream, "/slow", &[]).await;
    let id = origin.id_for(raw.local_addr).await;
    let rss_before = rss_bytes().expect("/proc/self/status");

    let payload = "x".repeat(MSG);
    let mut max_queued = 0;
    let mut accepted = 0usize;
    let mut refused = false;
    // Enough to overflow any socket buffers many times over if nothing bounded it.
    for _ in 0..1500 {
        let status = gw.push_text(&id, &payload).await;
        if status == 404 {
            refused = true;
            break;
        }
        assert_eq!(status, 200);
        accepted += 1;
        let info = gw.connection(&id).await.expect("still registered");
        assert!(
            info.outbound_queued_bytes <= MAX_OUT as u64,
            "queue over the bound: {} > {MAX_OUT}",
            info.outbound_queued_bytes
        );
        max_queued = max_queued.max(info.outbound_queued_bytes);
    }
    assert!(
        refused,
        "still accepting after {accepted} pushes of {MSG} bytes"
    );
    assert!(
        max_queued > 0,
        "the queue never filled: the test did not exercise the bound"
    );
    let rss_after = rss_bytes().expect("/proc/self/status");
    let grown = rss_after.saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {} MiB after {accepted} pushes",
        grown >> 20
    );
    assert_eq!(
        gw.metric("switchboard_slow_consumer_closes_total").await,
        1.0
    );
    // While closing, it holds at most the rest of one partly written frame
    // and its close frame: the queued messages were dropped.
    if let Some(info) = gw.connection(&id).await {
        assert!(
            info.outbound_queued_bytes <= (MSG + 128) as u64,
            "{}",
            info.outbound_queued_bytes
        );
        assert!(info.outbound_queued_bytes <= MAX_OUT as u64);
    }

    // Reading now: whatever the socket buffers held, then an intact close frame.
    let (code, reason, before) = raw.expect_close(WAIT).await;
    assert_eq!((code, reason.as_str()), (4001, "slow consumer"));
    assert!(
        before.len() < accepted,
        "queued messages were dropped, not sent"
    );
    for f in &before {
        assert_eq!(
            (f.opcode, f.payload.len()),
            (OP_TEXT, MSG),
            "a corrupt frame before the close"
        );
    }
    raw.send_close(4001, "").await;
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(
        (d.code, d.reason.as_str(), d.closed_by),
        (4001, "slow consumer", ClosedBy::Gateway)
    );
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_backlog_closes_the_flooding_client_with_4002() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.max_pending_events = 4;
        c.origin_concurrency = 1;
    })
    .await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    origin.pause();
    for i in 1..=20 {
        ws.feed(WsMessage::text(format!("flood {i}")))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    let (code, reason, _) = expect_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4002, "origin backlog"));
    assert_eq!(
        gw.metric("switchboard_origin_backlog_closes_total").await,
        1.0
    );
    origin.resume();
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (4002, ClosedBy::Gateway));
    // The 4 events that fit were delivered, in order; nothing after.
    let seqs: Vec<u64> = origin.messages_of(&id).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_node_queue_refuses_handshakes_with_503() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.origin_queue_size = 3;
        c.origin_concurrency = 1;
    })
    .await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    origin.pause();
    for i in 1..=3 {
        ws.send(WsMessage::text(format!("m{i}"))).await.unwrap();
    }
    eventually(WAIT, "3 events queued", || async {
        gw.stats().await.origin_queue_depth == 3
    })
    .await;
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("answer");
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (503, Some("origin_backlog"))
    );
    // One more event from the client does not fit either.
    ws.send(WsMessage::text("m4")).await.unwrap();
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 4002);
    origin.resume();
    assert_eq!(origin.wait_disconnect(&id).await.code, 4002);
    // The origin records events before the gateway counts its answer.
    eventually(WAIT, "an empty queue", || async {
        gw.stats().await.origin_queue_depth == 0
    })
    .await;
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;
}

/// One message larger than `max-outbound-bytes` is not a slow consumer: an
/// empty queue always takes one frame, and a reading client gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_large_message_is_delivered_not_treated_as_slow() {
    const MAX_OUT: usize = 16 << 10;
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.max_outbound_bytes = MAX_OUT).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let big = "y".repeat(100 << 10);
    assert_eq!(gw.push_text(&id, &big).await, 200);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text(big));
    assert!(gw.connection(&id).await.is_some(), "the client was closed");
    drop(ws);
    gw.shutdown().await;
}

/// After `--origin-queue-bytes` closed clients with 4002 the queue can sit
/// just under its cap: a new client let in then would be closed on its first
/// message. Handshakes get 503 until one max-size message event fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_get_503_while_the_queue_cannot_take_a_first_message() {
    const CAP: usize = 16 << 10;
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.origin_queue_bytes = CAP;
        // A handshake needs a quarter of the queue free (4 KiB).
        c.max_message_size = 4 << 10;
        c.origin_concurrency = 1;
    })
    .await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    origin.pause();
    let filler = "z".repeat(1000);
    ws.send(WsMessage::text(format!("10 {filler}")))
        .await
        .unwrap();
    let first = origin
        .wait_arrivals(WAIT, |a| {
            a.iter()
                .flatten()
                .any(|e| matches!(e, Event::Message(m) if m.seq == 1))
        })
        .await;
    let event = first.into_iter().flatten().last().unwrap();
    let size = serde_json::to_vec(&event).unwrap().len();
    // Fill the queue to about 2 KiB under its cap: every event fits, and
    // no client is closed.
    let n = (CAP - 2048) / size;
    for i in 11..10 + n {
        ws.send(WsMessage::text(format!("{i} {filler}")))
            .await
            .unwrap();
    }
    eventually(WAIT, "the events queued", || async {
        gw.stats().await.origin_queue_depth == n as u64
    })
    .await;
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("answer");
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (503, Some("origin_backlog")),
        "a handshake while the queue ({n} events of {size} bytes, cap {CAP}) \
         cannot take one more max-size message"
    );
    origin.resume();
    assert_eq!(origin.wait_messages(&id, n).await.len(), n);
    eventually(WAIT, "an empty queue", || async {
        gw.stats().await.origin_queue_depth == 0
    })
    .await;
    assert_serves(&gw, &origin).await;
    drop(ws);
    gw.shutdown().await;
}
