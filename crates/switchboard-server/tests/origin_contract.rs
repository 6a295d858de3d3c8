//! The origin contract end to end: what `connect` carries, how the origin's
//! answer is honoured (accept, reject, unavailable, too slow), `message`
//! events (order, seq, base64, idempotent ids across retries, batching),
//! replies, keepalives and webhook signatures.

use futures_util::SinkExt;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use switchboard_proto::origin::{ClosedBy, Event, OriginAnswer, Payload};
use switchboard_test_util::*;
use tokio_tungstenite::tungstenite;

fn seqs(id: &str, origin: &TestOrigin) -> Vec<u64> {
    origin.messages_of(id).iter().map(|m| m.seq).collect()
}

/// Message event ids of one origin request.
fn message_ids(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.id.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_event_carries_request_details() {
    init_tracing();
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.subprotocol = vec!["v2.chat".into(), "v1.chat".into()];
        c.forward_header = vec!["User-Agent".into(), "x-tenant".into()];
    })
    .await;
    let (ws, resp) = connect_with(
        &gw.ws_url("/rooms/42?token=abc&x=1%202"),
        &[
            ("User-Agent", "e2e-test/1.0"),
            ("X-Tenant", "acme"),
            ("X-Secret", "do-not-forward"),
            ("Accept-Language", "fr"),
            ("Cookie", "session=s3cr3t; theme=\"dark\""),
            ("Sec-WebSocket-Protocol", "v0.chat, v1.chat, v2.chat"),
        ],
    )
    .await
    .expect("accepted");
    // The first protocol of the client's list that the gateway accepts.
    assert_eq!(resp.headers()["sec-websocket-protocol"], "v1.chat");
    let addr = local_addr(&ws);
    let c = origin.connect_event_for(addr).await;
    assert_eq!(c.id, format!("{}:connect", c.connection_id));
    assert!(
        c.connection_id.starts_with(&format!("{}.", gw.node)),
        "{}",
        c.connection_id
    );
    assert_eq!(c.node, gw.node);
    assert_eq!(c.remote_addr, addr.to_string());
    assert_eq!(c.path, "/rooms/42");
    assert_eq!(c.query, "token=abc&x=1%202");
    let want_headers: BTreeMap<String, String> =
        [("user-agent", "e2e-test/1.0"), ("x-tenant", "acme")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
    assert_eq!(
        c.headers, want_headers,
        "only allow-listed headers, names lower-case"
    );
    let want_cookies: BTreeMap<String, String> = [("session", "s3cr3t"), ("theme", "dark")]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    assert_eq!(c.cookies, want_cookies);
    assert_eq!(c.subprotocols, ["v0.chat", "v1.chat", "v2.chat"]);
    assert_eq!(c.subprotocol.as_deref(), Some("v1.chat"));

    // The control API reports the same connection.
    let info = gw
        .connection(&c.connection_id)
        .await
        .expect("connection is live");
    assert_eq!(info.id, c.connection_id);
    assert_eq!(info.node, gw.node);
    assert_eq!(info.path, "/rooms/42");
    assert_eq!(info.remote_addr, addr.to_string());
    assert_eq!(info.subprotocol.as_deref(), Some("v1.chat"));
    assert!(!info.compression);

    // Nothing the gateway accepts: no protocol chosen, none in the answer.
    let raw = RawWs::connect(gw.addr, "/plain", &[("Sec-WebSocket-Protocol", "v9")]).await;
    assert_eq!(raw.response.header("sec-websocket-protocol"), None);
    let c2 = origin.connect_event_for(raw.local_addr).await;
    assert_eq!((c2.path.as_str(), c2.query.as_str()), ("/plain", ""));
    assert_eq!(c2.subprotocols, ["v9"]);
    assert_eq!(c2.subprotocol, None);
    assert!(c2.headers.is_empty(), "{:?}", c2.headers);
    assert!(c2.cookies.is_empty());
    assert_ne!(c2.connection_id, c.connection_id);
    drop((ws, raw));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_attaches_user_id_metadata_and_first_messages() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(OriginAnswer {
            user_id: Some("u-42".into()),
            metadata: Some(serde_json::json!({"plan": "pro", "seats": 3})),
            messages: vec![
                Payload::Text("welcome".into()),
                Payload::Binary(vec![1, 2, 3]),
            ],
            ..OriginAnswer::default()
        })
    });
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    // The first messages arrive first, in order.
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("welcome"));
    assert_eq!(next_msg(&mut ws).await, WsMessage::binary(vec![1, 2, 3]));
    ws.send(WsMessage::text("hi")).await.unwrap();
    let m = origin.wait_messages(&id, 1).await;
    assert_eq!(m[0].user_id.as_deref(), Some("u-42"));
    let info = gw.connection(&id).await.expect("live");
    assert_eq!(info.user_id.as_deref(), Some("u-42"));
    assert_eq!(
        info.metadata,
        Some(serde_json::json!({"plan": "pro", "seats": 3}))
    );
    assert_eq!((info.messages_in, info.messages_out), (1, 2));
    ws.close(None).await.unwrap();
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(d.user_id.as_deref(), Some("u-42"));
    assert_eq!((d.closed_by, d.code), (ClosedBy::Client, 1005));
    assert_eq!((d.messages_in, d.messages_out), (1, 2));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_rejection_passes_status_and_reason_through() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    for (status, reason) in [
        (401, "bad token"),
        (403, "banned"),
        (429, "slow down"),
        (500, "database down"),
    ] {
        origin.behavior(|b| b.connect = ConnectBehavior::Reject(status, reason.into()));
        let r = raw_request(gw.addr, upgrade_request("/x", &[]).as_bytes())
            .await
            .expect("an answer");
        assert_eq!(r.status, status, "{r:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.json(),
            serde_json::json!({"code": "rejected_by_origin", "message": reason})
        );
    }
    // A real client sees the HTTP status as its handshake error.
    match connect_with(&gw.ws_url("/"), &[]).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 500),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("handshake should be refused"),
    }
    let stats = gw.stats().await;
    assert_eq!(
        (
            stats.connections,
            stats.connections_total,
            stats.handshakes_rejected_total
        ),
        (0, 0, 5)
    );

    // Accepted again: a connection that ends gets the only disconnect.
    origin.behavior(|b| b.connect = ConnectBehavior::Accept(OriginAnswer::default()));
    let (ws, id) = connect_id(&gw, &origin, "/").await;
    drop(ws);
    origin.wait_disconnect(&id).await;
    let rejected: Vec<String> = origin
        .received()
        .into_iter()
        .filter(|r| r.status >= 400)
        .flat_map(|r| r.events)
        .filter_map(|e| match e {
            Event::Connect(c) => Some(c.connection_id),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 5);
    // After the drain every event has been delivered: still no disconnect
    // for a rejected handshake.
    gw.shutdown().await;
    let ds = origin.disconnects();
    assert_eq!(ds.len(), 1, "{ds:?}");
    assert_eq!(ds[0].connection_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_origin_gives_503() {
    let gw =
        TestGateway::start(|c| c.origin = Some(format!("http://{}/events", closed_addr()))).await;
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("an answer");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["code"], "origin_unavailable");
    assert_eq!(
        gw.metric("switchboard_origin_request_failures_total{kind=\"connect\"}")
            .await,
        1.0
    );
    assert_eq!(gw.stats().await.connections, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_slower_than_handshake_timeout_is_refused() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| b.delay = Duration::from_millis(1500));
    let gw = TestGateway::with_origin(&origin, |c| {
        c.handshake_timeout = Duration::from_millis(300)
    })
    .await;
    let started = Instant::now();
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes()).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1200),
        "the client waited for the origin: {took:?}"
    );
    if let Some(r) = r {
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.json()["code"], "origin_unavailable");
    }
    // The origin was asked.
    let arrivals = origin.wait_arrivals(WAIT, |a| !a.is_empty()).await;
    let Event::Connect(late) = &arrivals[0][0] else {
        panic!("{arrivals:?}")
    };
    let late_id = late.connection_id.clone();
    assert!(gw.connection(&late_id).await.is_none());
    // A prompt origin again: the node serves. The timed-out handshake gets
    // one disconnect (1011), because the origin may have taken its late
    // `connect` as accepted.
    origin.behavior(|b| b.delay = Duration::ZERO);
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;
    let void = origin.disconnects_of(&late_id);
    assert_eq!(void.len(), 1, "{void:?}");
    assert_eq!((void[0].code, void[0].closed_by), (1011, ClosedBy::Gateway));
    assert!(
        void[0].reason.starts_with("connect not completed"),
        "{:?}",
        void[0].reason
    );
    assert_eq!(origin.disconnects().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_events_in_order_with_seq_and_base64() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let sent: Vec<Payload> = (1..=30u8)
        .map(|i| {
            if i % 3 == 0 {
                Payload::Binary(vec![0, 1, 2, 255, i])
            } else {
                Payload::Text(format!("m{i}"))
            }
        })
        .collect();
    for p in &sent {
        let m = match p {
            Payload::Text(t) => WsMessage::text(t.clone()),
            Payload::Binary(b) => WsMessage::binary(b.clone()),
        };
        ws.feed(m).await.unwrap();
    }
    ws.flush().await.unwrap();
    let got = origin.wait_messages(&id, 30).await;
    assert_eq!(got.len(), 30);
    for (i, (m, p)) in got.iter().zip(&sent).enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(m.seq, seq);
        assert_eq!(m.id, format!("{id}:{seq}"));
        assert_eq!(m.connection_id, id);
        assert_eq!(m.node, gw.node);
        assert_eq!(m.user_id, None);
        assert_eq!(&m.payload, p);
    }
    // On the wire, binary payloads are standard padded base64.
    let bodies: String = origin.received().iter().map(|r| r.body.clone()).collect();
    assert!(bodies.contains(r#""binary":"AAEC/wM=""#), "{bodies}");
    assert!(bodies.contains(r#""text":"m1""#));
    assert!(bodies.contains(r#""type":"message""#));
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_order_across_concurrent_clients_and_retries() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.origin_concurrency = 2;
        c.origin_batch_size = 7;
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect_id(&gw, &origin, "/").await);
    }
    origin.behavior(|b| b.fail_next = Some((3, 503)));
    let sends = clients.into_iter().map(|(mut ws, id)| {
        tokio::spawn(async move {
            for i in 0..40 {
                ws.send(WsMessage::text(format!("{id}/{i}"))).await.unwrap();
            }
            (ws, id)
        })
    });
    let mut clients = Vec::new();
    for s in sends {
        clients.push(s.await.unwrap());
    }
    for (_, id) in &clients {
        origin.wait_messages(id, 40).await;
        assert_eq!(seqs(id, &origin), (1..=40).collect::<Vec<_>>(), "{id}");
        let texts: Vec<Payload> = origin
            .messages_of(id)
            .into_iter()
            .map(|m| m.payload)
            .collect();
        let want: Vec<Payload> = (0..40)
            .map(|i| Payload::Text(format!("{id}/{i}")))
            .collect();
        assert_eq!(texts, want);
    }
    assert!(origin.received().iter().all(|r| r.events.len() <= 7));
    assert_eq!(
        origin.received().iter().filter(|r| r.status == 503).count(),
        3
    );
    drop(clients);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_reach_the_sender_before_a_later_push() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| b.echo = true);
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    for i in 0..5 {
        ws.send(WsMessage::text(format!("r{i}"))).await.unwrap();
    }
    ws.send(WsMessage::binary(vec![9, 8, 7])).await.unwrap();
    // Once the gateway has taken the origin's answers, anything pushed later
    // must be queued behind their replies.
    eventually(WAIT, "6 events acknowledged", || async {
        gw.metric("switchboard_origin_events_delivered_total").await >= 6.0
    })
    .await;
    assert_eq!(gw.push_text(&id, "pushed-later").await, 200);
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(next_msg(&mut ws).await);
    }
    let mut want: Vec<WsMessage> = (0..5).map(|i| WsMessage::text(format!("r{i}"))).collect();
    want.push(WsMessage::binary(vec![9, 8, 7]));
    want.push(WsMessage::text("pushed-later"));
    assert_eq!(got, want);
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_after_500_keep_event_ids_lose_nothing_and_keep_order() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    origin.behavior(|b| b.fail_next = Some((3, 500)));
    for i in 1..=10 {
        ws.feed(WsMessage::text(format!("e{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    origin.wait_messages(&id, 10).await;
    // Exactly once among accepted requests, in order.
    assert_eq!(seqs(&id, &origin), (1..=10).collect::<Vec<_>>());
    let event_requests: Vec<Received> = origin
        .received()
        .into_iter()
        .filter(|r| !message_ids(&r.events).is_empty())
        .collect();
    let failed: Vec<&Received> = event_requests.iter().filter(|r| r.status == 500).collect();
    assert_eq!(failed.len(), 3);
    // The same batch, with the same event ids, is retried until taken.
    let first_ok = event_requests
        .iter()
        .find(|r| r.status == 200)
        .expect("a successful request");
    for f in &failed {
        assert_eq!(message_ids(&f.events), message_ids(&first_ok.events));
    }
    assert_eq!(message_ids(&failed[0].events)[0], format!("{id}:1"));
    assert!(gw.metric("switchboard_origin_retries_total").await >= 3.0);
    assert_eq!(
        gw.metric("switchboard_origin_events_dropped_total").await,
        0.0
    );
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_and_permanent_statuses() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    for (n, status) in [(1, 429), (2, 408), (3, 502)] {
        origin.behavior(|b| b.fail_next = Some((1, status)));
        ws.send(WsMessage::text(format!("s{status}")))
            .await
            .unwrap();
        origin.wait_messages(&id, n).await;
        assert_eq!(
            origin
                .received()
                .iter()
                .filter(|r| r.status == status)
                .count(),
            1
        );
    }
    // Other 4xx: not retried; the event is dropped and counted.
    origin.behavior(|b| b.fail_next = Some((1, 400)));
    ws.send(WsMessage::text("refused")).await.unwrap();
    eventually(WAIT, "one dropped event", || async {
        gw.metric("switchboard_origin_events_dropped_total").await == 1.0
    })
    .await;
    ws.send(WsMessage::text("after")).await.unwrap();
    origin.wait_messages(&id, 4).await;
    assert_eq!(seqs(&id, &origin), [1, 2, 3, 5]);
    let with_400: Vec<Received> = origin
        .received()
        .into_iter()
        .filter(|r| r.status == 400)
        .collect();
    assert_eq!(with_400.len(), 1, "a 400 is not retried");
    assert_eq!(message_ids(&with_400[0].events), [format!("{id}:4")]);
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_after_network_errors() {
    let origin = TestOrigin::start(None).await;
    // Every answer closes its TCP connection, so each request needs a new one.
    origin.behavior(|b| b.close_connections = true);
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    origin.behavior(|b| b.refuse_next_connections = 3);
    ws.send(WsMessage::text("through the storm")).await.unwrap();
    let m = origin.wait_messages(&id, 1).await;
    assert_eq!(m[0].payload, Payload::Text("through the storm".into()));
    assert_eq!(origin.refused_connections(), 3);
    // Each refused connection is one failed attempt, retried by the gateway.
    assert_eq!(gw.metric("switchboard_origin_retries_total").await, 3.0);
    assert_eq!(
        gw.metric("switchboard_origin_request_failures_total{kind=\"events\"}")
            .await,
        3.0
    );
    assert_eq!(origin.messages_of(&id).len(), 1);
    drop(ws);
    gw.shutdown().await;
}

/// Holds the origin on the first message event while `total - 1` more pile
/// up in one lane, then returns the sizes of the event requests that follow.
async fn batch_sizes_after_a_stall(batch_size: Option<usize>, total: u64) -> Vec<usize> {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.origin_concurrency = 1;
        if let Some(n) = batch_size {
            c.origin_batch_size = n;
        }
    })
    .await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    origin.pause();
    ws.send(WsMessage::text("first")).await.unwrap();
    // The first event is in flight, held by the origin.
    origin
        .wait_arrivals(WAIT, |a| a.iter().any(|r| !message_ids(r).is_empty()))
        .await;
    for i in 2..=total {
        ws.feed(WsMessage::text(format!("m{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    eventually(WAIT, "events queued", || async {
        gw.stats().await.origin_queue_depth == total
    })
    .await;
    origin.resume();
    origin.wait_messages(&id, total as usize).await;
    assert_eq!(seqs(&id, &origin), (1..=total).collect::<Vec<_>>());
    let sizes = origin
        .received()
        .iter()
        .map(|r| message_ids(&r.events).len())
        .filter(|n| *n > 0)
        .collect();
    drop(ws);
    gw.shutdown().await;
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_batched_while_the_origin_is_busy() {
    let sizes = batch_sizes_after_a_stall(None, 51).await;
    assert_eq!(
        sizes,
        [1, 50],
        "the 50 events that piled up leave in one request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_respect_origin_batch_size() {
    assert_eq!(
        batch_sizes_after_a_stall(Some(8), 31).await,
        [1, 8, 8, 8, 6]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_signature_verifies_with_the_secret() {
    let origin = TestOrigin::start(Some("topsecret-topsecret")).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.origin_secret = Some("topsecret-topsecret".into())
    })
    .await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    ws.send(WsMessage::text("signed")).await.unwrap();
    ws.close(None).await.unwrap();
    origin.wait_disconnect(&id).await;
    let received = origin.received();
    assert!(received.len() >= 3, "{received:?}");
    for r in &received {
        assert_eq!(r.signature_ok, Some(true), "{r:?}");
        assert_eq!(r.headers.get("x-switchboard-node"), Some(&gw.node));
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert!(r.headers["x-switchboard-signature"].starts_with("v1="));
    }
    gw.shutdown().await;

    // A gateway with another secret: the origin's check fails.
    let origin = TestOrigin::start(Some("topsecret-topsecret")).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.origin_secret = Some("not-the-same-secret".into())
    })
    .await;
    let (ws, _id) = connect_id(&gw, &origin, "/").await;
    assert_eq!(origin.received()[0].signature_ok, Some(false));
    drop(ws);
    gw.shutdown().await;

    // No secret: no signature headers at all.
    let origin = TestOrigin::start(Some("topsecret-topsecret")).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let (ws, _id) = connect_id(&gw, &origin, "/").await;
    let r = &origin.received()[0];
    assert_eq!(r.signature_ok, Some(false));
    assert!(!r.headers.contains_key("x-switchboard-signature"));
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_list_live_connections() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.keepalive_interval = Duration::from_millis(100)
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect_id(&gw, &origin, "/").await);
    }
    let all: BTreeSet<String> = clients.iter().map(|(_, id)| id.clone()).collect();
    let ka = origin
        .wait_for(WAIT, "a keepalive listing all 3", || {
            origin
                .keepalives()
                .into_iter()
                .find(|k| k.connection_ids.iter().cloned().collect::<BTreeSet<_>>() == all)
        })
        .await;
    assert_eq!(ka.node, gw.node);
    assert!(
        ka.id.starts_with(&format!("{}:keepalive:", gw.node)),
        "{}",
        ka.id
    );
    assert_eq!(ka.connection_ids.len(), 3, "no duplicates");

    let (mut gone, gone_id) = clients.remove(0);
    gone.close(None).await.unwrap();
    origin.wait_disconnect(&gone_id).await;
    let rest: BTreeSet<String> = clients.iter().map(|(_, id)| id.clone()).collect();
    let seen = origin.keepalives().len();
    origin
        .wait_for(WAIT, "a later keepalive listing the 2 left", || {
            origin.keepalives()[seen..]
                .iter()
                .find(|k| k.connection_ids.iter().cloned().collect::<BTreeSet<_>>() == rest)
                .cloned()
        })
        .await;
    for (mut ws, id) in clients {
        ws.close(None).await.unwrap();
        origin.wait_disconnect(&id).await;
    }
    // With none left, the node says so: an empty list.
    let seen = origin.keepalives().len();
    origin
        .wait_for(WAIT, "a keepalive with an empty list", || {
            origin.keepalives()[seen..]
                .iter()
                .find(|k| k.connection_ids.is_empty())
                .cloned()
        })
        .await;
    gw.shutdown().await;
}

/// A 2xx whose body is not a valid answer refuses the client (503), and the
/// origin, which may believe it accepted, gets one `disconnect` (1011).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_connect_answer_is_refused_and_voided() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| b.connect = ConnectBehavior::Raw(200, "{not json".into()));
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("an answer");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["code"], "origin_unavailable");
    let events = origin
        .wait_events(WAIT, |e| {
            e.iter().any(|e| matches!(e, Event::Disconnect(_)))
        })
        .await;
    let Event::Connect(c) = &events[0] else {
        panic!("{events:?}")
    };
    let void = origin.disconnects_of(&c.connection_id);
    assert_eq!(void.len(), 1);
    assert_eq!((void[0].code, void[0].closed_by), (1011, ClosedBy::Gateway));
    gw.shutdown().await;
}

/// Redirects are not followed: a 3xx to `connect` is no decision (503),
/// even though following it would lead to an accepting origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_redirects_are_not_followed() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| b.connect = ConnectBehavior::Raw(307, String::new()));
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("an answer");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(origin.received().len(), 1, "the redirect was followed");
    gw.shutdown().await;
}
