//! Channels and the native protocol `switchboard.v1`, end to end with real
//! WebSocket clients: subscribe, publish (clients and control API), history,
//! recovery after reconnect, presence with joins and leaves, server-side
//! subscriptions of native and raw connections, idempotent publish, every
//! protocol error, and a slow subscriber that must not hold back the others.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::Duration;
use switchboard_proto::origin::OriginAnswer;
use switchboard_server::Namespace;
use switchboard_test_util::*;

fn ns(spec: &str) -> Namespace {
    spec.parse().expect("namespace spec")
}

/// A gateway with `chat` (everything on), `feed` (history, clients may
/// subscribe but not publish) and `inbox` (origin-only subscriptions).
async fn gateway(f: impl FnOnce(&mut switchboard_server::Config)) -> TestGateway {
    TestGateway::start(|c| {
        c.namespace = vec![
            ns("chat:history-size=100,presence,join-leave,publish,subscribe"),
            ns("feed:history-size=5,subscribe"),
            ns("inbox"),
            ns("seq:history-size=1000,subscribe"),
            ns("live:subscribe"),
        ];
        f(c);
    })
    .await
}

/// A native protocol client: commands with ids, replies matched by id,
/// pushes queued in arrival order.
struct Native {
    ws: Ws,
    next_id: u64,
    client: String,
    pushes: VecDeque<Value>,
}

impl Native {
    async fn connect(gw: &TestGateway) -> Self {
        let (ws, resp) = connect_with(
            &gw.ws_url("/native"),
            &[("Sec-WebSocket-Protocol", "switchboard.v1")],
        )
        .await
        .expect("native handshake");
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("switchboard.v1")
        );
        let mut n = Self {
            ws,
            next_id: 0,
            client: String::new(),
            pushes: VecDeque::new(),
        };
        let first = n.frame().await;
        assert_eq!(first["push"], "connected", "{first}");
        assert_eq!(first["version"], 1);
        n.client = first["client"].as_str().expect("client id").to_owned();
        n
    }

    /// The next JSON frame from the socket.
    async fn frame(&mut self) -> Value {
        match next_msg(&mut self.ws).await {
            WsMessage::Text(t) => serde_json::from_str(&t).expect("frames are JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    async fn send_raw(&mut self, text: &str) {
        self.ws
            .send(WsMessage::text(text.to_owned()))
            .await
            .expect("send");
    }

    /// Sends a command and returns its whole reply, queueing pushes that
    /// arrive first.
    async fn call(&mut self, mut cmd: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = json!(id);
        self.send_raw(&cmd.to_string()).await;
        loop {
            let f = self.frame().await;
            if f.get("push").is_some() {
                self.pushes.push_back(f);
            } else {
                assert_eq!(f["id"], id, "replies come in order: {f}");
                return f;
            }
        }
    }

    /// `result` of a command that must succeed.
    async fn ok(&mut self, cmd: Value) -> Value {
        let r = self.call(cmd).await;
        assert!(r.get("error").is_none(), "command failed: {r}");
        r["result"].clone()
    }

    /// `error.code` of a command that must fail.
    async fn err(&mut self, cmd: Value) -> String {
        let r = self.call(cmd).await;
        r["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("expected an error: {r}"))
            .to_owned()
    }

    async fn push(&mut self) -> Value {
        match self.pushes.pop_front() {
            Some(p) => p,
            None => {
                let f = self.frame().await;
                assert!(f.get("push").is_some(), "expected a push: {f}");
                f
            }
        }
    }

    /// The next `message` push, skipping joins and leaves.
    async fn message(&mut self) -> Value {
        loop {
            let p = self.push().await;
            if p["push"] == "message" {
                return p;
            }
        }
    }

    /// Asserts nothing arrives for a short while.
    async fn quiet(&mut self) {
        assert!(self.pushes.is_empty(), "unexpected: {:?}", self.pushes);
        let r = tokio::time::timeout(Duration::from_millis(200), self.ws.next()).await;
        if let Ok(Some(Ok(WsMessage::Text(t)))) = r {
            panic!("unexpected frame: {t}");
        }
    }
}

async fn publish(gw: &TestGateway, channel: &str, body: Value) -> Value {
    let r = gw
        .post(&format!("/v1/channels/{channel}/messages"), &body)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()
}

#[tokio::test]
async fn native_session_with_presence_history_and_client_publish() {
    let gw = gateway(|_| {}).await;
    let mut a = Native::connect(&gw).await;
    let mut b = Native::connect(&gw).await;
    let sa = a
        .ok(json!({"cmd": "subscribe", "channel": "chat:room"}))
        .await;
    assert_eq!(sa["offset"], 0);
    let epoch = sa["epoch"].as_str().unwrap().to_owned();
    b.ok(json!({"cmd": "subscribe", "channel": "chat:room"}))
        .await;
    let join = a.push().await;
    assert_eq!(join["push"], "join");
    assert_eq!(join["member"]["client"], b.client.as_str());

    // From the control API, then from a client (binary), to both.
    let p = publish(&gw, "chat:room", json!({"text": "hello"})).await;
    assert_eq!(
        (p["offset"].as_u64(), p["duplicate"].as_bool()),
        (Some(1), Some(false))
    );
    let r = b
        .ok(json!({"cmd": "publish", "channel": "chat:room", "binary": "AAEC"}))
        .await;
    assert_eq!(r["offset"], 2);
    for c in [&mut a, &mut b] {
        let m1 = c.message().await;
        assert_eq!(
            m1,
            json!({"push": "message", "channel": "chat:room", "offset": 1, "epoch": epoch, "text": "hello"})
        );
        let m2 = c.message().await;
        assert_eq!(
            (m2["offset"].as_u64(), m2["binary"].as_str()),
            (Some(2), Some("AAEC"))
        );
    }

    let presence = a
        .ok(json!({"cmd": "presence", "channel": "chat:room"}))
        .await;
    assert_eq!(presence["clients"], 2);
    let api = gw.get("/v1/channels/chat:room/presence").await.json();
    assert_eq!(api["clients"], 2);
    let mut clients: Vec<&str> = api["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["client"].as_str().unwrap())
        .collect();
    clients.sort();
    let mut want = vec![a.client.as_str(), b.client.as_str()];
    want.sort();
    assert_eq!(clients, want);

    let h = a
        .ok(json!({"cmd": "history", "channel": "chat:room"}))
        .await;
    assert_eq!(h["offset"], 2);
    assert_eq!(h["publications"].as_array().unwrap().len(), 2);
    assert_eq!(h["publications"][0]["text"], "hello");
    let limited = a
        .ok(json!({"cmd": "history", "channel": "chat:room", "limit": 1}))
        .await;
    assert_eq!(limited["publications"][0]["offset"], 2);

    b.ok(json!({"cmd": "unsubscribe", "channel": "chat:room"}))
        .await;
    let leave = a.push().await;
    assert_eq!(
        (leave["push"].as_str(), leave["member"]["client"].as_str()),
        (Some("leave"), Some(b.client.as_str()))
    );
    publish(&gw, "chat:room", json!({"text": "after"})).await;
    assert_eq!(a.message().await["offset"], 3);
    b.quiet().await;
    assert_eq!(b.ok(json!({"cmd": "ping"})).await, json!({}));

    // A client that closes leaves presence (one whose socket is merely
    // lost stays, suspended: tests/sessions.rs).
    b.ok(json!({"cmd": "subscribe", "channel": "chat:room"}))
        .await;
    assert_eq!(a.push().await["push"], "join");
    b.ws.close(None).await.expect("close");
    let leave = a.push().await;
    assert_eq!(leave["push"], "leave");
    let api = gw.get("/v1/channels/chat:room/presence").await.json();
    assert_eq!(api["clients"], 1);
    let listing = gw.get("/v1/channels").await.json();
    assert_eq!(listing["channels"][0]["channel"], "chat:room");
    assert_eq!(listing["channels"][0]["subscribers"], 1);
}

#[tokio::test]
async fn recovery_delivers_exactly_what_was_missed_or_says_it_cannot() {
    let gw = gateway(|_| {}).await;
    let mut a = Native::connect(&gw).await;
    let s = a
        .ok(json!({"cmd": "subscribe", "channel": "feed:news"}))
        .await;
    let epoch = s["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        publish(&gw, "feed:news", json!({"text": format!("m{i}")})).await;
    }
    for i in 1..=3 {
        assert_eq!(a.message().await["text"], format!("m{i}"));
    }
    drop(a);
    for i in 4..=6 {
        publish(&gw, "feed:news", json!({"text": format!("m{i}")})).await;
    }
    // Back with the last position seen: 4..=6 pushed before the reply.
    let mut a = Native::connect(&gw).await;
    let r = a
        .call(json!({"cmd": "subscribe", "channel": "feed:news", "since": {"offset": 3, "epoch": epoch}}))
        .await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    assert_eq!(r["result"]["missed"], 3);
    assert_eq!(r["result"]["offset"], 6);
    let recovered: Vec<Value> = a.pushes.drain(..).map(|p| p["text"].clone()).collect();
    assert_eq!(recovered, vec!["m4", "m5", "m6"]);
    publish(&gw, "feed:news", json!({"text": "m7"})).await;
    assert_eq!(a.message().await["offset"], 7, "live after the seam");

    // Kept: 3..=7 (history-size 5). From offset 1, message 2 is gone.
    let mut b = Native::connect(&gw).await;
    let r = b
        .ok(json!({"cmd": "subscribe", "channel": "feed:news", "since": {"offset": 1, "epoch": epoch}}))
        .await;
    assert_eq!(r["recovered"], false);
    assert!(b.pushes.is_empty(), "nothing old after recovered: false");
    let mut c = Native::connect(&gw).await;
    let r = c
        .ok(json!({"cmd": "subscribe", "channel": "feed:news", "since": {"offset": 2, "epoch": epoch}}))
        .await;
    assert_eq!(
        (r["recovered"].as_bool(), r["missed"].as_u64()),
        (Some(true), Some(5))
    );
    let mut d = Native::connect(&gw).await;
    let r = d
        .ok(json!({"cmd": "subscribe", "channel": "feed:news", "since": {"offset": 2, "epoch": "other"}}))
        .await;
    assert_eq!(r["recovered"], false, "another epoch");
    let mut e = Native::connect(&gw).await;
    let r = e
        .ok(json!({"cmd": "subscribe", "channel": "feed:news", "since": {"offset": 99, "epoch": epoch}}))
        .await;
    assert_eq!(r["recovered"], false, "a position from the future");

    // The same rule through the control API.
    let h = gw
        .get(&format!(
            "/v1/channels/feed:news/messages?since=4&epoch={epoch}"
        ))
        .await
        .json();
    assert_eq!(h["recovered"], true);
    let offsets: Vec<u64> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![5, 6, 7]);
    // Paging forward from a position: the oldest `limit` after it.
    let page = gw
        .get(&format!(
            "/v1/channels/feed:news/messages?since=4&epoch={epoch}&limit=2"
        ))
        .await
        .json();
    assert_eq!(page["publications"][0]["offset"], 5);
    assert_eq!(page["publications"][1]["offset"], 6);
    assert_eq!(page["publications"].as_array().unwrap().len(), 2);
    let h = gw
        .get(&format!(
            "/v1/channels/feed:news/messages?since=1&epoch={epoch}"
        ))
        .await
        .json();
    assert_eq!(h["recovered"], false);
    let bad = gw.get("/v1/channels/feed:news/messages?since=1").await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_query".to_string()));
}

#[tokio::test]
async fn history_expires_and_an_idle_channel_starts_a_new_epoch() {
    let gw = TestGateway::start(|c| {
        c.namespace = vec![ns("t:history-size=10,history-ttl=300ms,subscribe")];
    })
    .await;
    let p = publish(&gw, "t:x", json!({"text": "soon gone"})).await;
    let epoch = p["epoch"].as_str().unwrap().to_owned();
    let h = gw.get("/v1/channels/t:x/messages").await.json();
    assert_eq!(h["publications"].as_array().unwrap().len(), 1);
    // Expired within a sweep (1 s) after the TTL; then the channel is idle
    // and dropped: its next message starts a new epoch.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let listing = gw.get("/v1/channels").await.json();
    assert_eq!(listing["channels"], json!([]), "idle channel dropped");
    let p2 = publish(&gw, "t:x", json!({"text": "new"})).await;
    assert_ne!(p2["epoch"].as_str().unwrap(), epoch);
    assert_eq!(p2["offset"], 1);
    let mut a = Native::connect(&gw).await;
    let r = a
        .ok(json!({"cmd": "subscribe", "channel": "t:x", "since": {"offset": 1, "epoch": epoch}}))
        .await;
    assert_eq!(r["recovered"], false, "the old epoch cannot be recovered");
}

#[tokio::test]
async fn protocol_errors_are_answered_and_the_connection_stays() {
    let gw = gateway(|c| c.max_subscriptions = 2).await;
    let mut a = Native::connect(&gw).await;
    a.send_raw("not json").await;
    let e = a.frame().await;
    assert_eq!(e["error"]["code"], "bad_command", "{e}");
    assert!(e.get("id").is_none());
    a.ws.send(WsMessage::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(a.frame().await["error"]["code"], "unsupported_frame");

    assert_eq!(a.err(json!({"cmd": "teleport"})).await, "unknown_command");
    assert_eq!(a.err(json!({"cmd": "subscribe"})).await, "bad_command");
    for bad in [
        "nocolon",
        "chat:",
        "chat:has space",
        &format!("chat:{}", "x".repeat(300)),
    ] {
        assert_eq!(
            a.err(json!({"cmd": "subscribe", "channel": bad})).await,
            "bad_channel",
            "{bad}"
        );
    }
    assert_eq!(
        a.err(json!({"cmd": "subscribe", "channel": "nope:x"}))
            .await,
        "unknown_namespace"
    );
    assert_eq!(
        a.err(json!({"cmd": "subscribe", "channel": "inbox:me"}))
            .await,
        "permission_denied"
    );
    assert_eq!(
        a.err(json!({"cmd": "publish", "channel": "feed:news", "text": "x"}))
            .await,
        "permission_denied"
    );
    assert_eq!(
        a.err(json!({"cmd": "presence", "channel": "feed:news"}))
            .await,
        "presence_disabled"
    );
    assert_eq!(
        a.err(json!({"cmd": "history", "channel": "live:x"})).await,
        "history_disabled"
    );
    // Not subscribed, and the namespace takes subscriptions from the origin
    // only: its history and presence are not this client's to read.
    assert_eq!(
        a.err(json!({"cmd": "history", "channel": "inbox:me"}))
            .await,
        "permission_denied"
    );
    a.ok(json!({"cmd": "subscribe", "channel": "chat:1"})).await;
    assert_eq!(
        a.err(json!({"cmd": "subscribe", "channel": "chat:1"}))
            .await,
        "already_subscribed"
    );
    a.ok(json!({"cmd": "subscribe", "channel": "chat:2"})).await;
    assert_eq!(
        a.err(json!({"cmd": "subscribe", "channel": "chat:3"}))
            .await,
        "too_many_subscriptions"
    );
    // Still a working session.
    assert_eq!(a.ok(json!({"cmd": "ping"})).await, json!({}));
    let metrics = gw.get("/metrics").await.body;
    assert_eq!(
        metric_sum(&metrics, "switchboard_native_command_errors_total"),
        16.0
    );
    for code in ["already_subscribed", "too_many_subscriptions"] {
        let series = format!("switchboard_native_command_errors_total{{code=\"{code}\"}}");
        assert_eq!(metric_value(&metrics, &series), 1.0, "{series}");
    }
}

#[tokio::test]
async fn protocol_version_is_negotiated() {
    let gw = gateway(|_| {}).await;
    let refused = connect_with(
        &gw.ws_url("/"),
        &[("Sec-WebSocket-Protocol", "switchboard.v9")],
    )
    .await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(resp)) = refused else {
        panic!("an unknown version is refused: {refused:?}");
    };
    assert_eq!(resp.status(), 400);
    let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
    assert_eq!(body["code"], "unsupported_protocol");
    // A newer version offered first, then v1: v1 is chosen.
    let (_ws, resp) = connect_with(
        &gw.ws_url("/"),
        &[("Sec-WebSocket-Protocol", "switchboard.v9, switchboard.v1")],
    )
    .await
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "switchboard.v1");
    // No subprotocol at all: raw mode, as before.
    let mut raw = connect(&gw.ws_url("/")).await;
    raw.send(WsMessage::text("plain")).await.unwrap();
}

#[tokio::test]
async fn server_side_subscriptions_reach_native_and_raw_connections() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(OriginAnswer {
            channels: vec!["inbox:all".into()],
            ..OriginAnswer::default()
        })
    });
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = vec![ns("inbox:history-size=10")];
    })
    .await;
    let mut n = Native::connect(&gw).await;
    let sub = n.push().await;
    assert_eq!(
        (sub["push"].as_str(), sub["channel"].as_str()),
        (Some("subscribed"), Some("inbox:all"))
    );
    let mut raw = connect(&gw.ws_url("/raw")).await;
    let raw_id = origin.id_for(local_addr(&raw)).await;

    publish(&gw, "inbox:all", json!({"text": "to everyone"})).await;
    assert_eq!(n.message().await["text"], "to everyone");
    // Subscribed by the origin: it may read the channel's history, not
    // another channel's of the same origin-only namespace.
    let h = n
        .ok(json!({"cmd": "history", "channel": "inbox:all"}))
        .await;
    assert_eq!(h["publications"][0]["text"], "to everyone");
    assert_eq!(
        n.err(json!({"cmd": "history", "channel": "inbox:other"}))
            .await,
        "permission_denied"
    );
    assert_eq!(next_msg(&mut raw).await, WsMessage::text("to everyone"));

    // The control API subscribes and unsubscribes one connection.
    let put = gw
        .call(gw.request(
            reqwest::Method::PUT,
            &format!("/v1/connections/{raw_id}/channels/inbox:u1"),
        ))
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    assert_eq!(put.json()["already"], false);
    let again = gw
        .call(gw.request(
            reqwest::Method::PUT,
            &format!("/v1/connections/{raw_id}/channels/inbox:u1"),
        ))
        .await;
    assert_eq!(again.json()["already"], true);
    let put_native = gw
        .call(gw.request(
            reqwest::Method::PUT,
            &format!("/v1/connections/{}/channels/inbox:u1", n.client),
        ))
        .await;
    assert_eq!(put_native.status, 200);
    assert_eq!(n.push().await["push"], "subscribed");
    publish(&gw, "inbox:u1", json!({"binary": "AP8="})).await;
    assert_eq!(next_msg(&mut raw).await, WsMessage::binary(vec![0u8, 255]));
    assert_eq!(n.message().await["binary"], "AP8=");

    let del = gw
        .delete(&format!("/v1/connections/{}/channels/inbox:u1", n.client))
        .await;
    assert_eq!(del.status, 204);
    assert_eq!(
        n.push().await,
        json!({"push": "unsubscribed", "channel": "inbox:u1"})
    );
    publish(&gw, "inbox:u1", json!({"text": "raw only"})).await;
    assert_eq!(next_msg(&mut raw).await, WsMessage::text("raw only"));
    n.quiet().await;

    // Direct messages reach a native connection as pushes.
    assert_eq!(gw.push_text(&n.client, "direct!").await, 200);
    assert_eq!(
        n.push().await,
        json!({"push": "direct", "seq": 1, "text": "direct!"})
    );

    let gone = gw
        .call(gw.request(
            reqwest::Method::PUT,
            "/v1/connections/nobody.AAAAAAAAAAAAAAAAAAAAAA/channels/inbox:x",
        ))
        .await;
    assert_eq!(
        (gone.status, gone.code()),
        (404, "connection_not_found".to_string())
    );
    let unknown = gw
        .call(gw.request(
            reqwest::Method::PUT,
            &format!("/v1/connections/{raw_id}/channels/zzz:x"),
        ))
        .await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (404, "unknown_namespace".to_string())
    );
    let bad = publish_status(&gw, "nocolon", json!({"text": "x"})).await;
    assert_eq!(bad, (400, "bad_channel".to_string()));
}

async fn publish_status(gw: &TestGateway, channel: &str, body: Value) -> (u16, String) {
    let r = gw
        .post(&format!("/v1/channels/{channel}/messages"), &body)
        .await;
    (r.status, r.code())
}

#[tokio::test]
async fn a_retried_publish_with_its_idempotency_key_is_delivered_once() {
    let gw = gateway(|_| {}).await;
    let mut a = Native::connect(&gw).await;
    a.ok(json!({"cmd": "subscribe", "channel": "chat:pay"}))
        .await;
    let first = publish(
        &gw,
        "chat:pay",
        json!({"text": "charge", "idempotency_key": "k-1"}),
    )
    .await;
    let retry = publish(
        &gw,
        "chat:pay",
        json!({"text": "charge", "idempotency_key": "k-1"}),
    )
    .await;
    assert_eq!(retry["duplicate"], true);
    assert_eq!(retry["offset"], first["offset"]);
    let other = publish(
        &gw,
        "chat:pay",
        json!({"text": "other", "idempotency_key": "k-2"}),
    )
    .await;
    assert_eq!(other["offset"], 2);
    assert_eq!(a.message().await["text"], "charge");
    assert_eq!(a.message().await["text"], "other");
    a.quiet().await;
    let empty_key =
        publish_status(&gw, "chat:pay", json!({"text": "x", "idempotency_key": ""})).await;
    assert_eq!(empty_key.0, 400);
}

#[tokio::test]
async fn native_send_reaches_the_origin_as_a_message_event() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.namespace = vec![ns("chat:subscribe")]).await;
    let mut a = Native::connect(&gw).await;
    assert_eq!(
        a.ok(json!({"cmd": "send", "text": "to the app"})).await,
        json!({})
    );
    let msgs = origin.wait_messages(&a.client, 1).await;
    assert_eq!(
        msgs[0].payload,
        switchboard_proto::origin::Payload::Text("to the app".into())
    );
    assert_eq!(msgs[0].seq, 1);
    // Other commands are the gateway's business, not the origin's.
    a.ok(json!({"cmd": "ping"})).await;
    a.ok(json!({"cmd": "send", "binary": "AQ=="})).await;
    let msgs = origin.wait_messages(&a.client, 2).await;
    assert_eq!(msgs[1].seq, 2);
}

#[tokio::test]
async fn a_slow_subscriber_does_not_hold_back_the_others() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(OriginAnswer {
            channels: vec!["chat:firehose".into()],
            ..OriginAnswer::default()
        })
    });
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = vec![ns("chat:publish,subscribe")];
        c.max_outbound_bytes = 64 << 10;
    })
    .await;
    // Subscribed by the origin's connect answer; never reads a byte.
    let slow = RawWs::connect(gw.addr, "/slow", &[]).await;
    let mut fast = Native::connect(&gw).await;
    assert_eq!(fast.push().await["push"], "subscribed");
    let presence_free = gw.get("/v1/channels").await.json();
    assert_eq!(presence_free["channels"][0]["subscribers"], 2);

    // 16 MB in all: far more than the slow socket's kernel buffers hold.
    const N: u32 = 1000;
    let big = "x".repeat(16 << 10);
    let publisher = {
        let http = reqwest::Client::new();
        let url = gw.api("/v1/channels/chat:firehose/messages");
        tokio::spawn(async move {
            for i in 0..N {
                let r = http
                    .post(&url)
                    .json(&json!({"text": format!("{i}:{big}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    };
    for i in 0..N {
        let m = fast.message().await;
        assert!(m["text"].as_str().unwrap().starts_with(&format!("{i}:")));
    }
    publisher.await.unwrap();
    // The slow one overflowed its own queue and was closed (4001).
    assert!(gw.metric("switchboard_slow_consumer_closes_total").await >= 1.0);
    drop(slow);
}

/// The central promise: subscribers that lose their connection (dropped
/// sockets, connections closed by the origin) while a publisher keeps going
/// end with every message exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_reconnect_see_every_message_once_in_order() {
    const N: u64 = 400;
    let gw = gateway(|_| {}).await;
    // Everyone starts from the channel's beginning: offset 0 of its epoch.
    // A subscriber stays for the whole test, so the channel (and its epoch)
    // is never idle.
    let mut anchor = Native::connect(&gw).await;
    let start = anchor
        .ok(json!({"cmd": "subscribe", "channel": "seq:1"}))
        .await;
    let epoch = start["epoch"].as_str().unwrap().to_owned();
    let publisher = {
        let http = reqwest::Client::new();
        let url = gw.api("/v1/channels/seq:1/messages");
        tokio::spawn(async move {
            for i in 1..=N {
                let r = http
                    .post(&url)
                    .json(&json!({"text": i.to_string()}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                if i.is_multiple_of(20) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let control = gw.api("/v1/connections");
    let subscriber = |k: u64| {
        let gw_addr = gw.ws_url("/native");
        let control = control.clone();
        let epoch = epoch.clone();
        async move {
            let mut seen: Vec<u64> = Vec::new();
            let mut pos = (0u64, epoch);
            let mut reconnects = 0;
            while seen.last() != Some(&N) {
                let (ws, _) =
                    connect_with(&gw_addr, &[("Sec-WebSocket-Protocol", "switchboard.v1")])
                        .await
                        .expect("connects");
                let mut n = Native {
                    ws,
                    next_id: 0,
                    client: String::new(),
                    pushes: VecDeque::new(),
                };
                n.client = n.frame().await["client"].as_str().unwrap().to_owned();
                let cmd = json!({"cmd": "subscribe", "channel": "seq:1",
                    "since": {"offset": pos.0, "epoch": pos.1}});
                let r = n.ok(cmd).await;
                assert_eq!(r["recovered"], true, "history covers the gap: {r}");
                // Each subscriber drops its link after a different number of messages.
                let mut budget = 37 + 23 * k;
                loop {
                    let m = n.message().await;
                    let v: u64 = m["text"].as_str().unwrap().parse().unwrap();
                    assert_eq!(m["offset"], v, "one publisher: offset = number");
                    seen.push(v);
                    pos.0 = v;
                    budget -= 1;
                    if v == N {
                        break;
                    }
                    if budget == 0 {
                        reconnects += 1;
                        if k.is_multiple_of(2) {
                            drop(n); // the network goes away
                        } else {
                            // The origin closes it.
                            let r = reqwest::Client::new()
                                .delete(format!("{control}/{}?code=4000", n.client))
                                .send()
                                .await
                                .unwrap();
                            assert_eq!(r.status(), 202);
                        }
                        break;
                    }
                }
            }
            (seen, reconnects)
        }
    };
    let results = futures_util::future::join_all((0..4).map(subscriber));
    let results = tokio::time::timeout(Duration::from_secs(60), results)
        .await
        .expect("subscribers finish");
    publisher.await.unwrap();
    for i in 1..=N {
        assert_eq!(anchor.message().await["offset"], i);
    }
    for (k, (seen, reconnects)) in results.into_iter().enumerate() {
        assert!(
            reconnects >= 2,
            "subscriber {k} reconnected {reconnects} times"
        );
        assert_eq!(seen, (1..=N).collect::<Vec<_>>(), "subscriber {k}");
    }
}

/// `publish-to-origin`: each client publish is a synchronous `publish` event;
/// the origin's refusal reaches the client with its reason, and accepted
/// publishes reach subscribers in the order the client sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_approves_or_refuses_client_publishes() {
    let origin = TestOrigin::start(Some("publish-secret")).await;
    origin.behavior(|b| b.reject_publish_containing = Some("spam".into()));
    let gw = TestGateway::with_origin(&origin, |c| {
        c.origin_secret = Some("publish-secret".into());
        c.origin_timeout = Duration::from_millis(500);
        c.namespace = vec![ns("mod:publish,publish-to-origin,subscribe")];
    })
    .await;
    let mut reader = Native::connect(&gw).await;
    reader
        .ok(json!({"cmd": "subscribe", "channel": "mod:room"}))
        .await;
    let mut writer = Native::connect(&gw).await;
    // Several in flight at once: answered and published in order.
    for (i, text) in ["one", "spam offer", "two", "three"].iter().enumerate() {
        let cmd = json!({"id": i + 1, "cmd": "publish", "channel": "mod:room", "text": text});
        writer.send_raw(&cmd.to_string()).await;
    }
    let mut replies = Vec::new();
    while replies.len() < 4 {
        let f = writer.frame().await;
        replies.push(f);
    }
    assert_eq!(replies[0]["result"]["offset"], 1, "{replies:?}");
    assert_eq!(replies[1]["error"]["code"], "rejected");
    assert_eq!(replies[1]["error"]["message"], "refused: spam");
    assert_eq!(replies[2]["result"]["offset"], 2);
    assert_eq!(replies[3]["result"]["offset"], 3);
    for want in ["one", "two", "three"] {
        assert_eq!(reader.message().await["text"], want);
    }
    let publishes: Vec<_> = origin
        .events()
        .into_iter()
        .filter(|e| e.kind() == "publish")
        .collect();
    assert_eq!(
        publishes.len(),
        3,
        "accepted ones; the refused one is a 403"
    );
    assert!(origin
        .received()
        .iter()
        .all(|r| r.signature_ok == Some(true)));

    // The origin stops answering: after origin-timeout the client is told
    // to retry, and nothing is published.
    origin.pause();
    let r = writer
        .call(json!({"cmd": "publish", "channel": "mod:room", "text": "lost?"}))
        .await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    origin.resume();
    reader.quiet().await;
    let h = gw.get("/v1/channels").await.json();
    assert_eq!(h["channels"][0]["offset"], 3);
}

/// `max-channel-length`: longer names are `bad_channel` for clients and the
/// control API alike; names at the limit work.
#[tokio::test]
async fn channel_names_over_max_channel_length_are_bad_channels() {
    let gw = gateway(|c| c.max_channel_length = 16).await;
    let mut a = Native::connect(&gw).await;
    let at_limit = "chat:0123456789a"; // 16 bytes
    let over = "chat:0123456789ab"; // 17 bytes
    a.ok(json!({"cmd": "subscribe", "channel": at_limit})).await;
    assert_eq!(
        a.err(json!({"cmd": "subscribe", "channel": over})).await,
        "bad_channel"
    );
    let r = gw
        .post(
            &format!("/v1/channels/{over}/messages"),
            &json!({"text": "x"}),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_channel"));
    let metrics = gw.get("/metrics").await.body;
    assert_eq!(
        metric_value(
            &metrics,
            "switchboard_native_command_errors_total{code=\"bad_channel\"}"
        ),
        1.0
    );
}
