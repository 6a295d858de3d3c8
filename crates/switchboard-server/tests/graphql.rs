//! GraphQL over WebSocket on one node (`docs/graphql.md`), with a
//! tungstenite client speaking each subprotocol by hand, the scripted
//! GraphQL origin of `switchboard_test_util::graphql` and the webhook test
//! origin for `connect`.
//!
//! What it proves:
//! - negotiation: the modern protocol over the legacy one whatever the
//!   offer's order; 4406 without an endpoint;
//! - `connection_init`: the origin's `connect` gets the payload and the
//!   subprotocol, its `ack_payload` is the ack's; a token in the payload is
//!   verified; refusals close with 4403, a dead origin with 4500, no init
//!   with 4408; an operation before it with 4401;
//! - operations: a query is answered `next` + `complete` with the
//!   connection's context sent to the endpoint; GraphQL errors are `error`;
//!   an endpoint that is down is `error` with `origin_unavailable`; 4400,
//!   4409 and 4429; `too_many_operations`;
//! - subscriptions: the initial result, then one result per trigger
//!   publication, one origin request per digest for all its subscribers;
//!   a publication during the first execution is not lost;
//!   `complete` stops them; suppressed unchanged results; the legacy
//!   protocol's `data`, `stop` → `complete`, and `ka`;
//! - the control API refuses direct messages to a GraphQL connection (409).

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use switchboard_proto::origin::{ConnectEvent, OriginAnswer};
use switchboard_test_util::graphql::GraphqlOrigin;
use switchboard_test_util::{
    connect_with, expect_close, next_json, ConnectBehavior, TestGateway, TestOrigin, Ws, WsMessage,
    WAIT,
};

async fn gateway(
    gql: &GraphqlOrigin,
    origin: &TestOrigin,
    f: impl FnOnce(&mut switchboard_server::Config),
) -> TestGateway {
    let url = gql.url();
    TestGateway::with_origin(origin, move |c| {
        c.graphql_endpoint = Some(url);
        c.client_message_rate = 0;
        f(c);
    })
    .await
}

/// Opens a socket offering `protocols`; returns it and the chosen one.
async fn open(gw: &TestGateway, protocols: &str) -> (Ws, String) {
    let (ws, resp) = connect_with(
        &gw.ws_url("/graphql"),
        &[("sec-websocket-protocol", protocols)],
    )
    .await
    .expect("upgrade");
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (ws, chosen)
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(WsMessage::Text(v.to_string().into()))
        .await
        .unwrap();
}

/// The next message that is not a legacy `ka`.
async fn recv_data(ws: &mut Ws) -> Value {
    loop {
        let m = next_json(ws).await;
        if m["type"] != "ka" {
            return m;
        }
    }
}

/// Waits until the node holds `n` digests.
async fn wait_digests(gw: &TestGateway, n: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while gw.metric("switchboard_graphql_digests").await != n {
        assert!(tokio::time::Instant::now() < deadline, "no {n} digests");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Nothing but pings for `d`.
async fn quiet(ws: &mut Ws, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while let Ok(m) = tokio::time::timeout_at(until, ws.next()).await {
        match m {
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// A modern client, initialised.
async fn modern(gw: &TestGateway) -> Ws {
    let (mut ws, chosen) = open(gw, "graphql-transport-ws").await;
    assert_eq!(chosen, "graphql-transport-ws");
    send(&mut ws, json!({"type": "connection_init"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    ws
}

fn subscription(key: &str) -> Value {
    json!({"query": "subscription { value }", "variables": {"key": key}})
}

async fn trigger(gw: &TestGateway, keys: &[&str]) {
    let r = gw
        .post("/v1/graphql/triggers", &json!({"triggers": keys}))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["nodes"], 1);
}

#[tokio::test]
async fn init_goes_to_the_origin_and_its_ack_payload_comes_back() {
    let gql = GraphqlOrigin::start().await;
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(OriginAnswer {
            user_id: Some("alice".into()),
            ack_payload: Some(json!({"hello": "alice"})),
            ..Default::default()
        })
    });
    let gw = gateway(&gql, &origin, |_| {}).await;
    // The modern protocol, whatever the order of the offer.
    let (mut ws, chosen) = open(&gw, "graphql-ws, graphql-transport-ws").await;
    assert_eq!(chosen, "graphql-transport-ws");
    send(&mut ws, json!({"type": "ping", "payload": {"p": 1}})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "pong", "payload": {"p": 1}})
    );
    assert!(
        origin.connects().is_empty(),
        "asked at connection_init, not before"
    );
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"room": "r1"}}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "connection_ack", "payload": {"hello": "alice"}})
    );
    let connect: ConnectEvent = origin.connects().pop().unwrap();
    assert_eq!(connect.subprotocol.as_deref(), Some("graphql-transport-ws"));
    assert_eq!(connect.init_payload, Some(json!({"room": "r1"})));

    // A query carries the connection's context.
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "q", "payload": {"query": "{ value }"}}),
    )
    .await;
    let next = next_json(&mut ws).await;
    assert_eq!(next["type"], "next");
    assert_eq!(next["id"], "q");
    let ctx = &next["payload"]["data"]["context"];
    assert_eq!(ctx["connection_id"], json!(connect.connection_id));
    assert_eq!(ctx["user_id"], "alice");
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "complete", "id": "q"})
    );
    let req = gql.requests().pop().unwrap();
    assert_eq!(
        req.headers["switchboard-connection-id"],
        connect.connection_id
    );
    assert_eq!(req.headers["switchboard-user-id"], "alice");

    // The control API does not send it direct messages.
    let r = gw
        .post(
            &format!("/v1/connections/{}/messages", connect.connection_id),
            &json!({"text": "hi"}),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "graphql_connection".into()));

    // The origin's disconnect comes when it closes.
    ws.close(None).await.unwrap();
    origin.wait_disconnect(&connect.connection_id).await;
}

#[tokio::test]
async fn subscribers_of_one_digest_share_one_execution_per_trigger() {
    let gql = GraphqlOrigin::start().await;
    let origin = TestOrigin::start(None).await;
    let gw = gateway(&gql, &origin, |_| {}).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut ws = modern(&gw).await;
        let key = if i % 2 == 0 { "even" } else { "odd" };
        send(
            &mut ws,
            json!({"type": "subscribe", "id": "s", "payload": subscription(key)}),
        )
        .await;
        assert_eq!(
            next_json(&mut ws).await["payload"],
            json!({"data": {"value": 0}})
        );
        clients.push((ws, key));
    }
    gql.set("even", 5);
    gql.set("odd", 7);
    trigger(&gw, &["even", "odd", "nobody"]).await;
    for (ws, key) in &mut clients {
        let m = next_json(ws).await;
        assert_eq!(m["type"], "next");
        let want = if *key == "even" { 5 } else { 7 };
        assert_eq!(m["payload"], json!({"data": {"value": want}}));
    }
    assert_eq!(gql.wait_re_executions(2, WAIT).await, 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gql.re_executions(), 2, "one request per digest");
    let re = gql.requests().pop().unwrap();
    assert!(re.body["extensions"]["switchboard"]["connection_id"].is_null());

    // `complete` stops one subscriber (the pong says it was read); the
    // others still get results.
    let (ws0, _) = &mut clients[0];
    send(ws0, json!({"type": "complete", "id": "s"})).await;
    send(ws0, json!({"type": "ping"})).await;
    assert_eq!(next_json(ws0).await["type"], "pong");
    trigger(&gw, &["even"]).await;
    quiet(&mut clients[0].0, Duration::from_millis(300)).await;
    assert_eq!(next_json(&mut clients[2].0).await["type"], "next");
    assert_eq!(gw.metric("switchboard_graphql_digests").await, 2.0);
    for (ws, _) in &mut clients {
        let _ = ws.close(None).await;
    }
}

/// The subscribe race: a change published while a subscription's first
/// execution runs (which read the state before it) is not lost.
#[tokio::test]
async fn a_trigger_during_the_first_execution_is_not_lost() {
    let gql = GraphqlOrigin::start().await;
    let origin = TestOrigin::start(None).await;
    let gw = gateway(&gql, &origin, |_| {}).await;
    let mut ws = modern(&gw).await;
    gql.set_delay(Duration::from_millis(400));
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "1", "payload": subscription("r")}),
    )
    .await;
    tokio::time::timeout(WAIT, async {
        while gql.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the first execution reaches the origin");
    gql.set("r", 1);
    trigger(&gw, &["r"]).await;
    gql.set_delay(Duration::ZERO);
    // The execution that read the state before the change runs again: its
    // result is the first the client gets.
    assert_eq!(
        next_json(&mut ws).await["payload"],
        json!({"data": {"value": 1}})
    );
    assert_eq!(gql.requests().len(), 2);
    assert_eq!(gql.re_executions(), 0);
    quiet(&mut ws, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn unchanged_results_are_suppressed_when_asked() {
    let gql = GraphqlOrigin::start().await;
    let origin = TestOrigin::start(None).await;
    let gw = gateway(&gql, &origin, |c| c.graphql_suppress_unchanged = true).await;
    let mut ws = modern(&gw).await;
    let mut op = subscription("k");
    op["variables"]["initial"] = json!(false);
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "1", "payload": op}),
    )
    .await;
    // No initial result: the first trigger's result is the first.
    wait_digests(&gw, 1.0).await;
    trigger(&gw, &["k"]).await;
    assert_eq!(
        next_json(&mut ws).await["payload"],
        json!({"data": {"value": 0}})
    );
    trigger(&gw, &["k"]).await;
    gql.wait_re_executions(2, WAIT).await;
    quiet(&mut ws, Duration::from_millis(300)).await;
    gql.set("k", 1);
    trigger(&gw, &["k"]).await;
    assert_eq!(
        next_json(&mut ws).await["payload"],
        json!({"data": {"value": 1}})
    );
    assert_eq!(gw.metric("switchboard_graphql_suppressed_total").await, 1.0);
}

#[tokio::test]
async fn the_legacy_protocol_speaks_data_stop_and_ka() {
    let gql = GraphqlOrigin::start().await;
    let origin = TestOrigin::start(None).await;
    let gw = gateway(&gql, &origin, |c| {
        c.ping_interval = Duration::from_millis(300)
    })
    .await;
    let (mut ws, chosen) = open(&gw, "graphql-ws").await;
    assert_eq!(chosen, "graphql-ws");
    // Legacy clients send their operations right after connection_init.
    send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
    send(
        &mut ws,
        json!({"type": "start", "id": "1", "payload": subscription("l")}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    assert_eq!(next_json(&mut ws).await, json!({"type": "ka"}));
    assert_eq!(
        recv_data(&mut ws).await,
        json!({"type": "data", "id": "1", "payload": {"data": {"value": 0}}})
    );
    // A start with the same id replaces the running one.
    send(
        &mut ws,
        json!({"type": "start", "id": "1", "payload": subscription("m")}),
    )
    .await;
    assert_eq!(
        recv_data(&mut ws).await["payload"],
        json!({"data": {"value": 0}})
    );
    wait_digests(&gw, 1.0).await;
    trigger(&gw, &["l"]).await;
    gql.set("m", 3);
    trigger(&gw, &["m"]).await;
    // Only the replacing operation's subscription is left.
    assert_eq!(
        recv_data(&mut ws).await,
        json!({"type": "data", "id": "1", "payload": {"data": {"value": 3}}})
    );
    send(&mut ws, json!({"type": "stop", "id": "1"})).await;
    assert_eq!(
        recv_data(&mut ws).await,
        json!({"type": "complete", "id": "1"})
    );
    // `ka` every ping interval.
    assert_eq!(next_json(&mut ws).await, json!({"type": "ka"}));
    send(&mut ws, json!({"type": "connection_terminate"})).await;
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1000);
}

#[tokio::test]
async fn errors_and_an_endpoint_that_is_down_end_the_operation() {
    let gql = GraphqlOrigin::start().await;
    let origin = TestOrigin::start(None).await;
    let gw = gateway(&gql, &origin, |c| c.graphql_max_operations = 1).await;
    let mut ws = modern(&gw).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "e", "payload": {"query": "{ error }"}}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["payload"][0]["message"], "Cannot query field \"error\"");
    gql.set_down(true);
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "d", "payload": {"query": "{ value }"}}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["id"].as_str()),
        (Some("error"), Some("d"))
    );
    assert_eq!(e["payload"][0]["extensions"]["code"], "origin_unavailable");
    gql.set_down(false);
    // One operation at a time here.
    gql.set_delay(Duration::from_millis(500));
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "a", "payload": {"query": "{ value }"}}),
    )
    .await;
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "b", "payload": {"query": "{ value }"}}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["id"].as_str()),
        (Some("error"), Some("b"))
    );
    assert_eq!(e["payload"][0]["extensions"]["code"], "too_many_operations");
    assert_eq!(next_json(&mut ws).await["id"], "a");
}

/// Closes with `code` after `script` (messages sent after opening).
async fn closed_with(gw: &TestGateway, script: &[Value], code: u16) -> String {
    let (mut ws, _) = open(gw, "graphql-transport-ws").await;
    for m in script {
        send(&mut ws, m.clone()).await;
    }
    let (got, reason, _) = expect_close(&mut ws).await;
    assert_eq!(got, code, "{reason} after {script:?}");
    reason
}

#[tokio::test]
async fn protocol_errors_close_with_the_modern_codes() {
    let gql = GraphqlOrigin::start().await;
    let origin = TestOrigin::start(None).await;
    let gw = gateway(&gql, &origin, |c| {
        c.graphql_init_timeout = Duration::from_millis(300)
    })
    .await;
    let init = json!({"type": "connection_init"});
    let sub = json!({"type": "subscribe", "id": "1", "payload": subscription("x")});
    closed_with(&gw, &[json!({"type": "nope"})], 4400).await;
    closed_with(
        &gw,
        &[init.clone(), json!({"type": "subscribe", "id": "1"})],
        4400,
    )
    .await;
    closed_with(&gw, std::slice::from_ref(&sub), 4401).await;
    closed_with(&gw, &[], 4408).await;
    closed_with(&gw, &[init.clone(), init.clone()], 4429).await;
    let reason = closed_with(&gw, &[init.clone(), sub.clone(), sub.clone()], 4409).await;
    assert_eq!(reason, "Subscriber for 1 already exists");
    origin.behavior(|b| b.connect = ConnectBehavior::Reject(403, "no entry".into()));
    let reason = closed_with(&gw, std::slice::from_ref(&init), 4403).await;
    assert!(reason.contains("no entry"), "{reason}");
    // No answer (a 3xx is none): 1013, which clients retry.
    origin.behavior(|b| b.connect = ConnectBehavior::Raw(302, String::new()));
    let reason = closed_with(&gw, std::slice::from_ref(&init), 1013).await;
    assert_eq!(reason, "origin unavailable");
    assert_eq!(
        gw.metric("switchboard_graphql_closes_total{code=\"4409\"}")
            .await,
        1.0
    );

    // Without an endpoint: 4406.
    let plain = TestGateway::with_origin(&origin, |_| {}).await;
    let (mut ws, chosen) = open(&plain, "graphql-transport-ws").await;
    assert_eq!(chosen, "graphql-transport-ws");
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 4406);
}

#[tokio::test]
async fn a_token_may_come_in_the_init_payload() {
    let secret = "0123456789abcdef0123456789abcdef";
    let gql = GraphqlOrigin::start().await;
    let origin = TestOrigin::start(None).await;
    let gw = gateway(&gql, &origin, |c| c.jwt_secret = Some(secret.into())).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "bob", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let reason = closed_with(&gw, &[json!({"type": "connection_init"})], 4403).await;
    assert!(reason.starts_with("Forbidden: token_missing"), "{reason}");
    closed_with(
        &gw,
        &[json!({"type": "connection_init", "payload": {"token": "x.y.z"}})],
        4403,
    )
    .await;
    let (mut ws, _) = open(&gw, "graphql-transport-ws").await;
    let auth = format!("Bearer {token}");
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"Authorization": auth}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    assert_eq!(
        origin.connects().pop().unwrap().user_id.as_deref(),
        Some("bob")
    );
}
