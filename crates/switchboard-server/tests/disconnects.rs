//! Exactly one `disconnect` per accepted connection, whoever ends it, and
//! none for refused handshakes. (Drain closes are covered in
//! `heartbeats_and_drain.rs`, limit closes in `limits_and_bad_input.rs` and
//! `backpressure.rs`.)

use futures_util::SinkExt;
use std::collections::BTreeMap;
use switchboard_proto::origin::ClosedBy;
use switchboard_test_util::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_with_code() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    ws.send(WsMessage::text("one")).await.unwrap();
    assert_eq!(gw.push_text(&id, "to you").await, 200);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("to you"));
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4100),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    // The gateway answers the close with the same code.
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 4100);
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(d.id, format!("{id}:disconnect"));
    assert_eq!(
        (d.code, d.reason.as_str(), d.closed_by),
        (4100, "bye", ClosedBy::Client)
    );
    assert_eq!((d.messages_in, d.messages_out), (1, 1));
    assert_eq!(d.node, gw.node);
    assert!(d.duration_ms < 10_000, "{}", d.duration_ms);
    assert!(gw.connection(&id).await.is_none());
    gw.shutdown().await;
    assert_eq!(origin.disconnects_of(&id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_drop_without_close_is_network_1006() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (ws, id) = connect_id(&gw, &origin, "/").await;
    drop(ws);
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (1006, ClosedBy::Network));

    // Dropped in the middle of a frame: the same.
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let raw_id = origin.id_for(raw.local_addr).await;
    let frame = RawWs::encode(true, false, OP_TEXT, b"half of this frame", true);
    raw.send_raw(&frame[..8]).await;
    drop(raw);
    let d = origin.wait_disconnect(&raw_id).await;
    assert_eq!((d.code, d.closed_by), (1006, ClosedBy::Network));
    assert_eq!(d.messages_in, 0);
    gw.shutdown().await;
    assert_eq!(origin.disconnects().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_close_is_closed_by_origin_with_its_code() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let r = gw
        .delete(&format!("/v1/connections/{id}?code=4321&reason=kicked"))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let (code, reason, _) = expect_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4321, "kicked"));
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(
        (d.code, d.reason.as_str(), d.closed_by),
        (4321, "kicked", ClosedBy::Origin)
    );
    gw.shutdown().await;
    assert_eq!(origin.disconnects_of(&id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_is_closed_by_gateway() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let id = origin.id_for(raw.local_addr).await;
    raw.send_frame(true, false, OP_TEXT, b"unmasked", false)
        .await;
    let (code, _, _) = raw.expect_close(WAIT).await;
    assert_eq!(code, 1002);
    raw.send_close(1002, "").await;
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (1002, ClosedBy::Gateway));
    assert_eq!(d.reason, "client frame not masked");
    gw.shutdown().await;
    assert_eq!(origin.disconnects_of(&id).len(), 1);
}

/// Many connections ended every way at once, while the origin fails some
/// requests: after the drain, each accepted connection has exactly one
/// `disconnect`, with the right `closed_by`, and refused handshakes have none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_disconnect_per_accepted_connection() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.origin_concurrency = 2;
        c.max_connections_per_ip = 12;
    })
    .await;
    let mut expected: BTreeMap<String, ClosedBy> = BTreeMap::new();
    let mut clients = Vec::new();
    for _ in 0..11 {
        clients.push(connect_id(&gw, &origin, "/").await);
    }
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let raw_id = origin.id_for(raw.local_addr).await;
    // Two refusals: one over the per-IP cap (12 sockets are open), one by the origin.
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("answer");
    assert_eq!(r.status, 503, "13th socket from one IP");
    let (ws, id) = clients.pop().unwrap();
    drop(ws);
    origin.wait_disconnect(&id).await;
    expected.insert(id, ClosedBy::Network);
    origin.behavior(|b| b.connect = ConnectBehavior::Reject(403, "no".into()));
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("answer");
    assert_eq!(r.status, 403);

    // From now on the origin fails some event requests: retries must not
    // duplicate or lose a disconnect.
    origin.behavior(|b| b.fail_next = Some((4, 503)));
    let mut it = clients.into_iter();
    for _ in 0..2 {
        let (mut ws, id) = it.next().unwrap();
        ws.send(WsMessage::text("bye soon")).await.unwrap();
        ws.close(None).await.unwrap();
        expected.insert(id, ClosedBy::Client);
    }
    for _ in 0..2 {
        let (ws, id) = it.next().unwrap();
        drop(ws);
        expected.insert(id, ClosedBy::Network);
    }
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (mut ws, id) = it.next().unwrap();
        assert_eq!(
            gw.delete(&format!("/v1/connections/{id}?code=4000"))
                .await
                .status,
            202
        );
        // A second request for the same connection changes nothing.
        let again = gw
            .delete(&format!("/v1/connections/{id}?code=4999"))
            .await
            .status;
        assert!(again == 202 || again == 404, "{again}");
        expected.insert(id, ClosedBy::Origin);
        readers.push(tokio::spawn(async move { expect_close(&mut ws).await.0 }));
    }
    raw.send_frame(true, false, 0x3, b"reserved opcode", true)
        .await;
    let (code, _, _) = raw.expect_close(WAIT).await;
    assert_eq!(code, 1002);
    raw.send_close(1002, "").await;
    expected.insert(raw_id, ClosedBy::Gateway);
    // The rest stay open until the drain.
    let open: Vec<_> = it.collect();
    assert_eq!(open.len(), 4);
    for (mut ws, id) in open {
        expected.insert(id, ClosedBy::Gateway);
        readers.push(tokio::spawn(async move { expect_close(&mut ws).await.0 }));
    }

    let report = gw.shutdown().await;
    assert!(report.completed, "{report:?}");
    assert_eq!(report.events_dropped, 0);
    let mut codes: Vec<u16> = Vec::new();
    for r in readers {
        codes.push(r.await.unwrap());
    }
    assert_eq!(codes, [4000, 4000, 1012, 1012, 1012, 1012]);

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for d in origin.disconnects() {
        *counts.entry(d.connection_id.clone()).or_default() += 1;
        let want = expected
            .get(&d.connection_id)
            .unwrap_or_else(|| panic!("disconnect for an unknown id {d:?}"));
        assert_eq!(d.closed_by, *want, "{d:?}");
    }
    let accepted: Vec<String> = origin
        .connects()
        .into_iter()
        .map(|c| c.connection_id)
        .collect();
    assert_eq!(accepted.len(), 12);
    assert_eq!(expected.len(), 12);
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "{id}: {counts:?}");
    }
    assert_eq!(
        counts.len(),
        accepted.len(),
        "no disconnect for refused handshakes"
    );
    assert_eq!(
        origin.received().iter().filter(|r| r.status == 503).count(),
        4,
        "the origin failed some requests"
    );
}
