//! `ControlClient` against a real in-process gateway: every method, seen
//! from a real WebSocket client where it sends something, and the typed
//! errors of the documented error answers.

use futures_util::SinkExt;
use switchboard_origin::control::{
    codes, BatchMessage, ControlClient, ControlError, Delivery, Payload, StreamPosition,
};
use switchboard_proto::origin::ClosedBy;
use switchboard_proto::{ConnectionId, NodeId};
use switchboard_test_util::*;

const KEY: &str = "origin-test-api-key-0123";

/// A channel name that needs every kind of percent-encoding: `/`, `?`, `#`,
/// `%`, `+`, `&`, `=` and non-ASCII.
const ODD_CHANNEL: &str = "chat:room/42?x=1#top%25é+ü&y";

async fn setup() -> (TestOrigin, TestGateway, ControlClient) {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = vec![
            "chat:history-size=100,presence".parse().unwrap(),
            "plain".parse().unwrap(),
        ];
        c.api_key = vec![KEY.into()];
    })
    .await;
    let api = ControlClient::new(format!("http://{}", gw.control), Some(KEY.into()))
        .expect("valid base URL");
    (origin, gw, api)
}

/// A well-formed id of this node that no connection has.
fn unknown_id(gw: &TestGateway) -> String {
    ConnectionId::from_parts(&NodeId::new(&gw.node).unwrap(), &[7; 16]).to_string()
}

#[track_caller]
fn assert_api_error<T: std::fmt::Debug>(r: Result<T, ControlError>, status: u16, code: &str) {
    match r {
        Err(ControlError::Api {
            status: s,
            code: c,
            message,
        }) => {
            assert_eq!((s, c.as_str()), (status, code), "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_text_binary_and_batch_reach_a_websocket_client() {
    let (origin, gw, api) = setup().await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let unknown = unknown_id(&gw);

    api.send_text(&id, "héllo").await.unwrap();
    api.send_binary(&id, &[0, 1, 255]).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("héllo"));
    assert_eq!(next_msg(&mut ws).await, WsMessage::binary(vec![0, 1, 255]));

    let r = api
        .send_batch(vec![
            BatchMessage {
                connection_ids: vec![id.clone(), unknown.clone()],
                payload: Payload::Text("to many".into()),
            },
            BatchMessage {
                connection_ids: vec![id.clone()],
                payload: Payload::Binary(vec![9, 8]),
            },
        ])
        .await
        .unwrap();
    assert_eq!(r.results.len(), 2);
    assert_eq!(r.results[0][&id], Delivery::Delivered);
    assert_eq!(r.results[0][&unknown], Delivery::Unknown);
    assert_eq!(r.results[1][&id], Delivery::Delivered);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("to many"));
    assert_eq!(next_msg(&mut ws).await, WsMessage::binary(vec![9, 8]));

    assert_eq!(api.connection(&id).await.unwrap().messages_out, 4);
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_info_then_close_with_code_and_reason() {
    let (origin, gw, api) = setup().await;
    let (mut ws, id) = connect_id(&gw, &origin, "/info-path").await;
    ws.send(WsMessage::text("one")).await.unwrap();
    origin.wait_messages(&id, 1).await;

    let info = api.connection(&id).await.unwrap();
    assert_eq!(info.id, id);
    assert_eq!(info.node, gw.node);
    assert_eq!(info.path, "/info-path");
    assert_eq!(info.remote_addr, local_addr(&ws).to_string());
    assert_eq!(info.messages_in, 1);

    assert_api_error(
        api.close(&id, 999, "no").await,
        400,
        codes::INVALID_CLOSE_CODE,
    );
    assert_api_error(
        api.close(&id, 4000, &"r".repeat(124)).await,
        400,
        codes::INVALID_CLOSE_REASON,
    );
    api.close(&id, 4000, "logged out & gone").await.unwrap();
    let (code, reason, _) = expect_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4000, "logged out & gone"));
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(d.closed_by, ClosedBy::Origin);
    assert_eq!((d.code, d.reason.as_str()), (4000, "logged out & gone"));
    // Gone now: the documented 404.
    eventually(WAIT, "connection removed", || async {
        matches!(api.connection(&id).await, Err(e) if e.code() == Some(codes::CONNECTION_NOT_FOUND))
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_publish_history_presence_and_channels() {
    let (origin, gw, api) = setup().await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let ch = ODD_CHANNEL;

    let s = api.subscribe(&id, ch, None).await.unwrap();
    assert_eq!((s.offset, s.already, s.recovered), (0, false, None));
    let again = api.subscribe(&id, ch, None).await.unwrap();
    assert!(again.already);

    let p1 = api.publish_text(ch, "one", None).await.unwrap();
    assert_eq!((p1.offset, p1.duplicate), (1, false));
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("one"));
    let p2 = api
        .publish(ch, &Payload::Binary(vec![1, 2, 3]), Some("key-1"))
        .await
        .unwrap();
    assert_eq!((p2.offset, p2.duplicate, &p2.epoch), (2, false, &p1.epoch));
    assert_eq!(next_msg(&mut ws).await, WsMessage::binary(vec![1, 2, 3]));
    // The idempotent retry: nothing published, the first position returned.
    let dup = api
        .publish(ch, &Payload::Binary(vec![1, 2, 3]), Some("key-1"))
        .await
        .unwrap();
    assert_eq!(
        (dup.offset, dup.duplicate, &dup.epoch),
        (2, true, &p1.epoch)
    );
    let p3 = api.publish_text(ch, "three", None).await.unwrap();
    assert_eq!(p3.offset, 3);
    // Next on the socket is "three": the duplicate was not delivered.
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("three"));

    let h = api.history(ch, None, None).await.unwrap();
    assert_eq!((h.offset, &h.epoch, h.recovered), (3, &p1.epoch, None));
    let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [1, 2, 3]);
    assert_eq!(h.publications[1].data, Payload::Binary(vec![1, 2, 3]));
    let newest = api.history(ch, None, Some(2)).await.unwrap();
    let offsets: Vec<u64> = newest.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [2, 3]);
    let since = StreamPosition {
        offset: 1,
        epoch: p1.epoch.clone(),
    };
    let page = api.history(ch, Some(&since), Some(1)).await.unwrap();
    assert_eq!(page.recovered, Some(true));
    assert_eq!(page.publications.len(), 1);
    assert_eq!(page.publications[0].offset, 2);
    let lost = StreamPosition {
        offset: 1,
        epoch: "another-epoch".into(),
    };
    let gap = api.history(ch, Some(&lost), None).await.unwrap();
    assert_eq!(gap.recovered, Some(false));
    assert!(gap.publications.is_empty());

    let pr = api.presence(ch).await.unwrap();
    assert_eq!((pr.clients, pr.users), (1, 0));
    assert_eq!(pr.members[0].client, id);

    // The gateway decoded the name to exactly what was sent.
    let listed = api.channels().await.unwrap();
    let entry = listed
        .iter()
        .find(|c| c.channel == ch)
        .unwrap_or_else(|| panic!("{ch} not in {listed:?}"));
    assert_eq!((entry.offset, entry.subscribers, entry.kept), (3, 1, 3));

    api.unsubscribe(&id, ch).await.unwrap();
    api.unsubscribe(&id, ch).await.unwrap(); // not subscribed: still fine
    assert_eq!(api.presence(ch).await.unwrap().clients, 0);
    api.publish_text(ch, "four", None).await.unwrap();
    api.send_text(&id, "marker").await.unwrap();
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("marker"));

    // Subscribing again from offset 2 recovers 3 and 4 first.
    let from = StreamPosition {
        offset: 2,
        epoch: p1.epoch.clone(),
    };
    let s = api.subscribe(&id, ch, Some(from)).await.unwrap();
    assert_eq!((s.recovered, s.already, s.offset), (Some(true), false, 4));
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("three"));
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("four"));
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_nodes_describe_the_node() {
    let (origin, gw, api) = setup().await;
    let (ws, _id) = connect_id(&gw, &origin, "/").await;
    let stats = api.stats().await.unwrap();
    assert_eq!(stats.node, gw.node);
    assert_eq!((stats.connections, stats.connections_total), (1, 1));
    assert!(!stats.draining);
    let nodes = api.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].node, gw.node);
    assert!(nodes[0].is_self);
    assert_eq!(nodes[0].connections, 1);
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_carry_status_and_code() {
    let (origin, gw, api) = setup().await;
    let (ws, id) = connect_id(&gw, &origin, "/").await;
    let base = format!("http://{}", gw.control);

    // API keys: wrong, and missing.
    for key in [Some("wrong-key".to_string()), None] {
        let bad = ControlClient::new(base.clone(), key).unwrap();
        assert_api_error(bad.stats().await, 401, codes::UNAUTHORIZED);
        assert_api_error(
            bad.publish_text("chat:x", "x", None).await,
            401,
            codes::UNAUTHORIZED,
        );
        assert_api_error(bad.send_text(&id, "x").await, 401, codes::UNAUTHORIZED);
    }

    // Unknown connections: well-formed, malformed.
    for bad_id in [unknown_id(&gw), "not-an-id".to_string()] {
        let nf = codes::CONNECTION_NOT_FOUND;
        assert_api_error(api.send_text(&bad_id, "x").await, 404, nf);
        assert_api_error(api.connection(&bad_id).await, 404, nf);
        assert_api_error(api.close(&bad_id, 1000, "").await, 404, nf);
        assert_api_error(api.subscribe(&bad_id, "chat:a", None).await, 404, nf);
        assert_api_error(api.unsubscribe(&bad_id, "chat:a").await, 404, nf);
    }
    let e = api.send_text(&unknown_id(&gw), "x").await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    assert_eq!(e.code(), Some(codes::CONNECTION_NOT_FOUND));
    assert!(!e.is_retryable());

    // Channels.
    assert_api_error(
        api.publish_text("nope:x", "x", None).await,
        404,
        codes::UNKNOWN_NAMESPACE,
    );
    assert_api_error(
        api.publish_text("no-colon", "x", None).await,
        400,
        codes::BAD_CHANNEL,
    );
    assert_api_error(
        api.history("plain:x", None, None).await,
        400,
        codes::HISTORY_DISABLED,
    );
    assert_api_error(api.presence("plain:x").await, 400, codes::PRESENCE_DISABLED);
    assert_api_error(
        api.publish_text("chat:x", "x", Some(&"k".repeat(257)))
            .await,
        400,
        codes::INVALID_BODY,
    );
    // Path segments that cannot be sent.
    assert!(matches!(
        api.send_text("..", "x").await,
        Err(ControlError::InvalidSegment(_))
    ));

    // No gateway there at all: a transport error, without status.
    let nowhere = ControlClient::new(format!("http://{}", closed_addr()), None).unwrap();
    let e = nowhere.stats().await.unwrap_err();
    assert!(matches!(e, ControlError::Transport(_)), "{e:?}");
    assert_eq!((e.status(), e.code()), (None, None));
    assert!(e.is_retryable());
    drop(ws);
    gw.shutdown().await;
}
