//! A cluster of three in-process gateways joined by the in-memory backend
//! (`switchboard_backend::memory`): routing, channels across nodes, a lost
//! node and fencing, end to end with real clients and a real origin, but no
//! processes and no heartbeat timing — faults are method calls on the hub.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use switchboard_backend::memory::MemoryHub;
use switchboard_proto::origin::Event;
use switchboard_test_util::*;

/// Starts node `id` on `hub`, sending events to `origin`.
async fn node(hub: &Arc<MemoryHub>, origin: &TestOrigin, id: &str) -> TestGateway {
    let url = origin.url();
    TestGateway::start_joined(
        |c| {
            c.origin = Some(url);
            c.node_id = Some(id.into());
            c.namespace = vec!["chat:history-size=100,subscribe,publish"
                .parse()
                .expect("namespace")];
        },
        |gw| {
            let (cluster, bus) = hub.join(Arc::new(gw.local_node()));
            assert!(gw.join_cluster(cluster));
            assert!(gw.join_channel_bus(bus));
        },
    )
    .await
}

async fn three(origin: &TestOrigin) -> (Arc<MemoryHub>, TestGateway, TestGateway, TestGateway) {
    let hub = MemoryHub::new();
    let a = node(&hub, origin, "a").await;
    let b = node(&hub, origin, "b").await;
    let c = node(&hub, origin, "c").await;
    (hub, a, b, c)
}

/// A native-protocol client subscribed to `channel`.
async fn subscriber(gw: &TestGateway, channel: &str) -> Ws {
    let (mut ws, _) = connect_with(
        &gw.ws_url("/native"),
        &[("Sec-WebSocket-Protocol", "switchboard.v1")],
    )
    .await
    .expect("native handshake");
    let connected = json_frame(&mut ws).await;
    assert_eq!(connected["push"], "connected", "{connected}");
    let cmd = json!({"id": 1, "cmd": "subscribe", "channel": channel});
    ws.send(WsMessage::text(cmd.to_string())).await.unwrap();
    let reply = json_frame(&mut ws).await;
    assert_eq!(reply["id"], 1, "{reply}");
    assert!(reply.get("error").is_none(), "{reply}");
    ws
}

/// Asserts a push to `id` through `gw`'s control API is refused with
/// `status` and `code`.
async fn expect_refused_push(gw: &TestGateway, id: &str, status: u16, code: &str) {
    let r = gw
        .post(
            &format!("/v1/connections/{id}/messages"),
            &json!({"text": "x"}),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (status, code), "{}", r.body);
}

async fn json_frame(ws: &mut Ws) -> Value {
    match next_msg(ws).await {
        WsMessage::Text(t) => serde_json::from_str(&t).expect("JSON"),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_on_any_node_reaches_the_connection_on_its_node() {
    let origin = TestOrigin::start(None).await;
    let (_hub, a, b, c) = three(&origin).await;
    let (mut ws, id) = connect_id(&b, &origin, "/on-b").await;
    assert!(id.starts_with("b."), "{id}");
    for (gw, text) in [(&a, "via a"), (&c, "via c"), (&b, "via b")] {
        assert_eq!(gw.push_text(&id, text).await, 200);
        assert_eq!(next_msg(&mut ws).await, WsMessage::text(text));
    }
    let nodes = a.get("/v1/nodes").await.json();
    let mut ids: Vec<String> = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_any_node_reaches_every_subscriber_once_in_order() {
    let origin = TestOrigin::start(None).await;
    let (_hub, a, b, c) = three(&origin).await;
    let mut on_b = subscriber(&b, "chat:room").await;
    let mut on_c = subscriber(&c, "chat:room").await;
    for i in 1..=20 {
        let gw = [&a, &b, &c][i % 3];
        let r = gw
            .post(
                "/v1/channels/chat:room/messages",
                &json!({"text": format!("m{i}")}),
            )
            .await;
        assert_eq!(
            (r.status, r.json()["offset"].as_u64()),
            (200, Some(i as u64)),
            "{}",
            r.body
        );
    }
    for ws in [&mut on_b, &mut on_c] {
        for i in 1..=20u64 {
            let m = json_frame(ws).await;
            assert_eq!(
                (m["push"].as_str(), m["offset"].as_u64(), m["text"].as_str()),
                (Some("message"), Some(i), Some(format!("m{i}").as_str())),
                "{m}"
            );
        }
        let more = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
        assert!(more.is_err(), "a message came twice: {more:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_reported_once_and_its_connections_are_gone() {
    let origin = TestOrigin::start(None).await;
    let (hub, a, _b, c) = three(&origin).await;
    let (_ws, id) = connect_id(&c, &origin, "/on-c").await;
    hub.kill("c");
    origin
        .wait_events(Duration::from_secs(5), |evs| {
            evs.iter().any(|e| matches!(e, Event::NodeDown(_)))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let downs: Vec<_> = origin
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::NodeDown(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(downs.len(), 1, "{downs:?}");
    assert_eq!(
        (downs[0].down_node.as_str(), downs[0].node.as_str()),
        ("c", "a")
    );
    expect_refused_push(&a, &id, 404, "connection_not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_holds_its_events_and_delivers_them_if_not_reported() {
    let origin = TestOrigin::start(None).await;
    let (hub, _a, b, _c) = three(&origin).await;
    let (mut ws, id) = connect_id(&b, &origin, "/on-b").await;
    hub.cut("b");
    ws.send(WsMessage::text("held")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(origin.messages_of(&id).is_empty(), "sent while cut off");
    // Commands for its connections and new clients are refused meanwhile.
    expect_refused_push(&b, &id, 503, "node_cut_off").await;
    let refused = connect_with(&b.ws_url("/new"), &[]).await;
    assert!(refused.is_err(), "a cut-off node took a client");

    hub.restore("b").await;
    let got = origin.wait_messages(&id, 1).await;
    assert_eq!(
        got[0].payload,
        switchboard_proto::origin::Payload::Text("held".into())
    );
    assert_eq!(b.push_text(&id, "back").await, 200);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_reported_lost_is_fenced_without_a_word_to_the_origin() {
    let origin = TestOrigin::start(None).await;
    let (hub, _a, b, _c) = three(&origin).await;
    let (mut ws, id) = connect_id(&b, &origin, "/on-b").await;
    ws.send(WsMessage::text("before")).await.unwrap();
    origin.wait_messages(&id, 1).await;
    hub.cut("b");
    ws.send(WsMessage::text("while cut off")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    hub.report_lost("b");
    origin
        .wait_events(Duration::from_secs(5), |evs| {
            evs.iter().any(|e| matches!(e, Event::NodeDown(_)))
        })
        .await;
    hub.restore("b").await;
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1012);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        origin.messages_of(&id).len(),
        1,
        "only the message from before the cut"
    );
    assert!(
        origin.disconnects_of(&id).is_empty(),
        "a disconnect after node_down"
    );
    assert_eq!(b.metric("switchboard_fences_total").await, 1.0);
    // A new run: it takes clients again.
    let (_ws2, id2) = connect_id(&b, &origin, "/after").await;
    assert!(id2.starts_with("b."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_messages_fills_the_gap_from_the_log() {
    let origin = TestOrigin::start(None).await;
    let (hub, a, b, _c) = three(&origin).await;
    let mut on_b = subscriber(&b, "chat:gap").await;
    let publish = |i: u64| {
        let a = &a;
        async move {
            let r = a
                .post(
                    "/v1/channels/chat:gap/messages",
                    &json!({"text": format!("g{i}")}),
                )
                .await;
            assert_eq!(
                (r.status, r.json()["offset"].as_u64()),
                (200, Some(i)),
                "{}",
                r.body
            );
        }
    };
    publish(1).await;
    // b hears nothing of 2..=5 (cut off), then is back unreported; the next
    // message shows the gap, which b's replica fills from the log.
    hub.cut("b");
    for i in 2..=5 {
        publish(i).await;
    }
    hub.restore("b").await;
    publish(6).await;
    for i in 1..=6u64 {
        let m = json_frame(&mut on_b).await;
        assert_eq!(
            (m["push"].as_str(), m["offset"].as_u64(), m["text"].as_str()),
            (Some("message"), Some(i), Some(format!("g{i}").as_str())),
            "{m}"
        );
    }
    let more = tokio::time::timeout(Duration::from_millis(200), on_b.next()).await;
    assert!(more.is_err(), "a message came twice: {more:?}");
}

/// Operators' reads span the cluster: a user's connections from every node,
/// and any node's statistics through any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_connections_and_any_nodes_stats_are_read_through_any_node() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(switchboard_proto::origin::OriginAnswer {
            user_id: Some("alice".into()),
            ..Default::default()
        })
    });
    let (hub, a, b, c) = three(&origin).await;
    let (_on_b, id_b) = connect_id(&b, &origin, "/").await;
    let (_on_c, id_c) = connect_id(&c, &origin, "/").await;

    let found = a.get("/v1/connections?user_id=alice").await;
    assert_eq!(found.status, 200, "{}", found.body);
    let found = found.json();
    let mut want = vec![id_b.clone(), id_c.clone()];
    want.sort();
    let got: Vec<&str> = found["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, want);
    assert_eq!(found["unanswered"], json!([]));

    let of_b = a.get("/v1/stats?node=b").await;
    assert_eq!(of_b.status, 200, "{}", of_b.body);
    let of_b = of_b.json();
    assert_eq!(
        (of_b["node"].as_str(), of_b["connections"].as_u64()),
        (Some("b"), Some(1))
    );
    let r = a.get("/v1/stats?node=z").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "node_not_found"),
        "{}",
        r.body
    );

    // A node that cannot answer is named, not silently left out.
    hub.cut("c");
    let partial = a.get("/v1/connections?user_id=alice").await.json();
    let got: Vec<&str> = partial["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![id_b.as_str()]);
    assert_eq!(partial["unanswered"], json!(["c"]));
    for gw in [a, b, c] {
        gw.shutdown().await;
    }
}
