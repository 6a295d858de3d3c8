//! Quick end-to-end smoke: connect, echo through the origin, push, disconnect.

use futures_util::SinkExt;
use std::time::Duration;
use switchboard_proto::origin::Event;
use switchboard_test_util::*;

#[tokio::test]
async fn connect_echo_push_disconnect() {
    init_tracing();
    let origin = TestOrigin::start(Some("s3cret")).await;
    origin.behavior(|b| b.echo = true);
    let url = origin.url();
    let gw = TestGateway::start(|c| {
        c.origin = Some(url);
        c.origin_secret = Some("s3cret".into());
    })
    .await;
    let mut ws = connect(&gw.ws_url("/chat?room=1")).await;
    ws.send(WsMessage::text("hello")).await.unwrap();
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("hello"));
    let events = origin
        .wait_events(Duration::from_secs(5), |e| e.len() >= 2)
        .await;
    let Event::Connect(c) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(c.path, "/chat");
    let id = c.connection_id.clone();
    let r = reqwest::Client::new()
        .post(gw.api(&format!("/v1/connections/{id}/messages")))
        .json(&serde_json::json!({"text": "pushed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("pushed"));
    ws.close(None).await.unwrap();
    let events = origin
        .wait_events(Duration::from_secs(5), |e| {
            e.iter().any(|e| matches!(e, Event::Disconnect(_)))
        })
        .await;
    assert!(origin
        .received()
        .iter()
        .all(|r| r.signature_ok == Some(true)));
    drop(events);
    gw.shutdown().await;
}
