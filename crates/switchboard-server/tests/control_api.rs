//! The control API and operations endpoints, end to end: every route, error
//! bodies, API keys, close-code validation, and the OpenAPI document against
//! `switchboard_server::ROUTES`.

use futures_util::SinkExt;
use reqwest::Method;
use std::collections::{BTreeMap, BTreeSet};
use switchboard_proto::origin::ClosedBy;
use switchboard_proto::{ConnectionId, NodeId};
use switchboard_test_util::*;

async fn setup() -> (TestOrigin, TestGateway) {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = vec!["room:history-size=10,presence".parse().unwrap()];
    })
    .await;
    (origin, gw)
}

/// A well-formed id of this node that no connection has.
fn unknown_id(gw: &TestGateway) -> String {
    ConnectionId::from_parts(&NodeId::new(&gw.node).unwrap(), &[7; 16]).to_string()
}

fn assert_error(r: &ApiResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json"),
        "{r:?}"
    );
    let v = r.json();
    assert_eq!(v["code"], code, "{}", r.body);
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_text_and_binary_to_one_connection() {
    let (origin, gw) = setup().await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let r = gw
        .post(
            &format!("/v1/connections/{id}/messages"),
            &serde_json::json!({"text": "héllo"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), serde_json::json!({"status": "delivered"}));
    let r = gw
        .post(
            &format!("/v1/connections/{id}/messages"),
            &serde_json::json!({"binary": "AAH/"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("héllo"));
    assert_eq!(next_msg(&mut ws).await, WsMessage::binary(vec![0, 1, 255]));
    // As `curl -d` sends it: no JSON content type.
    let r = gw
        .call(
            gw.request(Method::POST, &format!("/v1/connections/{id}/messages"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(r#"{"text":"curl"}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("curl"));
    assert_eq!(gw.connection(&id).await.unwrap().messages_out, 3);
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_errors_are_json() {
    let (origin, gw) = setup().await;
    let (ws, id) = connect_id(&gw, &origin, "/").await;
    let other_node =
        ConnectionId::from_parts(&NodeId::new("elsewhere").unwrap(), &[7; 16]).to_string();
    for bad_id in [unknown_id(&gw), "not-an-id".to_string(), other_node] {
        let r = gw
            .post(
                &format!("/v1/connections/{bad_id}/messages"),
                &serde_json::json!({"text": "x"}),
            )
            .await;
        assert_error(&r, 404, "connection_not_found");
        assert_error(
            &gw.get(&format!("/v1/connections/{bad_id}")).await,
            404,
            "connection_not_found",
        );
        assert_error(
            &gw.delete(&format!("/v1/connections/{bad_id}")).await,
            404,
            "connection_not_found",
        );
    }
    let path = format!("/v1/connections/{id}/messages");
    for body in [
        serde_json::json!({}),
        serde_json::json!({"text": 5}),
        serde_json::json!({"binary": "not base64!"}),
        serde_json::json!({"html": "<b>"}),
        serde_json::json!(["text", "x"]),
    ] {
        assert_error(&gw.post(&path, &body).await, 400, "invalid_body");
    }
    let r = gw
        .call(
            gw.request(Method::POST, &path)
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_error(&r, 400, "invalid_body");
    // Over 16 MiB.
    let huge = format!("{{\"text\": \"{}\"}}", "x".repeat((16 << 20) + 1));
    let r = gw
        .call(
            gw.request(Method::POST, &path)
                .header("content-type", "application/json")
                .body(huge),
        )
        .await;
    assert_error(&r, 413, "payload_too_large");
    // Nothing reached the client, and it is still connected.
    let info = gw.connection(&id).await.expect("still connected");
    assert_eq!(info.messages_out, 0);
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_send_reports_per_id_results() {
    let (origin, gw) = setup().await;
    let (mut a, a_id) = connect_id(&gw, &origin, "/a").await;
    let (mut b, b_id) = connect_id(&gw, &origin, "/b").await;
    let unknown = unknown_id(&gw);
    let r = gw
        .post(
            "/v1/messages",
            &serde_json::json!({"messages": [
                {"connection_ids": [a_id, b_id, unknown, "garbage"], "text": "to all"},
                {"connection_ids": [b_id], "binary": "AQI="},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let want = serde_json::json!({"results": [
        {a_id.clone(): "delivered", b_id.clone(): "delivered", unknown: "unknown", "garbage": "unknown"},
        {b_id.clone(): "delivered"},
    ]});
    assert_eq!(r.json(), want);
    assert_eq!(next_msg(&mut a).await, WsMessage::text("to all"));
    assert_eq!(next_msg(&mut b).await, WsMessage::text("to all"));
    assert_eq!(next_msg(&mut b).await, WsMessage::binary(vec![1, 2]));

    // A connection that has closed is unknown.
    drop(a);
    origin.wait_disconnect(&a_id).await;
    let r = gw
        .post(
            "/v1/messages",
            &serde_json::json!({"messages": [{"connection_ids": [a_id], "text": "late"}]}),
        )
        .await;
    assert_eq!(r.json()["results"][0][&a_id], "unknown");
    // An empty batch is fine.
    let r = gw
        .post("/v1/messages", &serde_json::json!({"messages": []}))
        .await;
    assert_eq!(
        (r.status, r.json()),
        (200, serde_json::json!({"results": []}))
    );
    for body in [
        serde_json::json!({}),
        serde_json::json!({"messages": [{"text": "no ids"}]}),
    ] {
        assert_error(&gw.post("/v1/messages", &body).await, 400, "invalid_body");
    }
    drop(b);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_closes_with_code_and_reason() {
    let (origin, gw) = setup().await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let r = gw
        .delete(&format!(
            "/v1/connections/{id}?code=4321&reason=kicked%20out"
        ))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json(), serde_json::json!({"status": "closing"}));
    assert_eq!(expect_close(&mut ws).await.0, 4321);
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(
        (d.code, d.reason.as_str(), d.closed_by),
        (4321, "kicked out", ClosedBy::Origin)
    );
    assert_error(
        &gw.get(&format!("/v1/connections/{id}")).await,
        404,
        "connection_not_found",
    );
    assert_error(
        &gw.delete(&format!("/v1/connections/{id}")).await,
        404,
        "connection_not_found",
    );

    // Without a code: 1000. Messages pushed before are delivered first.
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    assert_eq!(gw.push_text(&id, "last words").await, 200);
    assert_eq!(
        gw.delete(&format!("/v1/connections/{id}")).await.status,
        202
    );
    let (code, reason, before) = expect_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1000, ""));
    assert_eq!(before, [WsMessage::text("last words")]);
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (1000, ClosedBy::Origin));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_code_validation() {
    let (origin, gw) = setup().await;
    let (ws, id) = connect_id(&gw, &origin, "/").await;
    for code in [
        0, 999, 1002, 1003, 1004, 1005, 1006, 1007, 1009, 1010, 1014, 1015, 2999, 5000,
    ] {
        let r = gw
            .delete(&format!("/v1/connections/{id}?code={code}"))
            .await;
        assert_error(&r, 400, "invalid_close_code");
    }
    for q in ["code=abc", "code=70000", "code=-1"] {
        assert_error(
            &gw.delete(&format!("/v1/connections/{id}?{q}")).await,
            400,
            "invalid_query",
        );
    }
    let long = "r".repeat(124);
    assert_error(
        &gw.delete(&format!("/v1/connections/{id}?reason={long}"))
            .await,
        400,
        "invalid_close_reason",
    );
    assert!(
        gw.connection(&id).await.is_some(),
        "refused requests leave the connection open"
    );
    drop(ws);

    // Every code the origin may send reaches the client.
    let valid = [1000u16, 1001, 1008, 1011, 1012, 1013, 3000, 4000, 4999];
    let mut clients = Vec::new();
    for _ in valid {
        clients.push(connect_id(&gw, &origin, "/").await);
    }
    let reason = "r".repeat(123);
    let mut tasks = Vec::new();
    for (code, (mut ws, id)) in valid.into_iter().zip(clients) {
        let r = gw
            .delete(&format!("/v1/connections/{id}?code={code}&reason={reason}"))
            .await;
        assert_eq!(r.status, 202, "{code}: {}", r.body);
        tasks.push(tokio::spawn(async move {
            (code, id, expect_close(&mut ws).await)
        }));
    }
    for t in tasks {
        let (code, id, (got, got_reason, _)) = t.await.unwrap();
        assert_eq!(got, code);
        assert_eq!(got_reason, reason);
        let d = origin.wait_disconnect(&id).await;
        assert_eq!((d.code, d.closed_by), (code, ClosedBy::Origin));
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_info_stats_and_operations_endpoints() {
    let (origin, gw) = setup().await;
    let (mut ws, id) = connect_id(&gw, &origin, "/info?x=1").await;
    ws.send(WsMessage::text("12345")).await.unwrap();
    origin.wait_messages(&id, 1).await;
    assert_eq!(gw.push_text(&id, "abc").await, 200);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("abc"));
    // The client can read the frame a moment before the gateway's writing
    // thread has counted it.
    eventually(WAIT, "bytes_out counted", || async {
        gw.connection(&id).await.is_some_and(|i| i.bytes_out >= 5)
    })
    .await;
    let info = gw.connection(&id).await.unwrap();
    assert_eq!(info.id, id);
    assert_eq!(info.path, "/info");
    assert_eq!(info.remote_addr, local_addr(&ws).to_string());
    assert_eq!(
        (info.user_id, info.metadata, info.subprotocol),
        (None, None, None)
    );
    assert_eq!((info.messages_in, info.messages_out), (1, 1));
    assert!(info.bytes_in >= 5 + 6, "{}", info.bytes_in);
    assert!(info.bytes_out >= 5, "{}", info.bytes_out);
    assert_eq!(info.outbound_queued_bytes, 0);
    assert!(
        info.connected_at.ends_with('Z') && info.connected_at.contains('T'),
        "{}",
        info.connected_at
    );
    let raw = gw.get(&format!("/v1/connections/{id}")).await.json();
    for key in [
        "compression",
        "connected_at",
        "bytes_in",
        "bytes_out",
        "outbound_queued_bytes",
        "node",
    ] {
        assert!(raw.get(key).is_some(), "{key} missing in {raw}");
    }

    let _refused = raw_request(gw.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let s = gw.stats().await;
    assert_eq!(s.node, gw.node);
    assert_eq!(
        (
            s.connections,
            s.connections_total,
            s.handshakes_rejected_total
        ),
        (1, 1, 1)
    );
    assert_eq!((s.messages_in_total, s.messages_out_total), (1, 1));
    assert!(s.bytes_in_total >= info.bytes_in && s.bytes_out_total >= info.bytes_out);
    assert_eq!(s.origin_queue_depth, 0);
    assert!(!s.draining);

    let h = gw.get("/healthz").await;
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));
    let r = gw.get("/readyz").await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("ready"))
    );
    let m = gw.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{m:?}"
    );
    assert!(m.body.trim_end().ends_with("# EOF"));
    assert_eq!(metric_value(&m.body, "switchboard_connections"), 1.0);
    assert_eq!(
        metric_value(&m.body, "switchboard_connections_accepted_total"),
        1.0
    );
    assert_eq!(metric_value(&m.body, "switchboard_messages_in_total"), 1.0);
    assert_eq!(
        metric_value(&m.body, "switchboard_handshakes_total{result=\"accepted\"}"),
        1.0
    );
    assert_eq!(
        metric_value(
            &m.body,
            "switchboard_handshakes_total{result=\"upgrade_required\"}"
        ),
        1.0
    );
    drop(ws);
    origin.wait_disconnect(&id).await;
    assert_eq!(
        gw.metric("switchboard_disconnects_total{closed_by=\"network\"}")
            .await,
        1.0
    );
    assert_eq!(gw.stats().await.connections, 0);
    gw.shutdown().await;
}

/// What operators (and the admin page) read: a user's connections with
/// their channels, more figures in `/v1/stats` (of this node or, by id,
/// another), the build in `/healthz`, and the admin page's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_of_a_user_stats_build_and_the_admin_page() {
    let (origin, gw) = setup().await;
    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(switchboard_proto::origin::OriginAnswer {
            user_id: Some("alice".into()),
            ..Default::default()
        })
    });
    let (_a1, id1) = connect_id(&gw, &origin, "/").await;
    let (_a2, id2) = connect_id(&gw, &origin, "/").await;
    origin.behavior(|b| b.connect = ConnectBehavior::Accept(Default::default()));
    let (_other, _) = connect_id(&gw, &origin, "/").await;
    let r = gw
        .call(gw.request(
            Method::PUT,
            &format!("/v1/connections/{id1}/channels/room:b"),
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = gw
        .call(gw.request(
            Method::PUT,
            &format!("/v1/connections/{id1}/channels/room:a"),
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let found = gw.get("/v1/connections?user_id=alice").await;
    assert_eq!(found.status, 200, "{}", found.body);
    let found = found.json();
    let list = found["connections"].as_array().unwrap();
    let mut want = vec![id1.clone(), id2.clone()];
    want.sort();
    let ids: Vec<&str> = list.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, want, "sorted by id, only alice's");
    let first = list.iter().find(|c| c["id"] == id1.as_str()).unwrap();
    assert_eq!(first["channels"], serde_json::json!(["room:a", "room:b"]));
    assert_eq!(first["user_id"], "alice");
    let none = gw.get("/v1/connections?user_id=bob").await.json();
    assert_eq!(none["connections"], serde_json::json!([]));
    assert_error(&gw.get("/v1/connections").await, 400, "invalid_query");
    let info = gw.get(&format!("/v1/connections/{id2}")).await.json();
    assert_eq!(info["channels"], serde_json::json!([]));

    let s = gw.get("/v1/stats").await.json();
    assert_eq!(
        (s["channels"].as_u64(), s["subscriptions"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(s["slow_consumer_closes_total"], 0);
    // Three connects were asked of the origin.
    assert!(s["origin_requests_total"].as_u64().unwrap() >= 3, "{s}");
    assert!(
        s["origin_request_microseconds_total"].as_u64().unwrap() > 0,
        "{s}"
    );
    let mine = gw.get(&format!("/v1/stats?node={}", gw.node)).await;
    assert_eq!(mine.status, 200, "{}", mine.body);
    assert_eq!(mine.json()["node"], gw.node.as_str());
    assert_error(
        &gw.get("/v1/stats?node=elsewhere").await,
        404,
        "node_not_found",
    );
    assert_error(&gw.get("/v1/stats?nod=x").await, 400, "invalid_query");

    let h = gw.get("/healthz").await.json();
    assert_eq!(h["build"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        gw.metric(&format!(
            "switchboard_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ))
        .await,
        1.0
    );

    // The admin page's files: no key needed (they hold no data), a strict
    // content security policy, and the page names its script and styles.
    let client = reqwest::Client::new();
    for (path, kind) in [
        ("/admin", "text/html"),
        ("/admin/admin.js", "text/javascript"),
        ("/admin/admin.css", "text/css"),
    ] {
        let r = client
            .get(format!("http://{}{path}", gw.control))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        let csp = r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        let body = r.text().await.unwrap();
        if path == "/admin" {
            assert!(body.contains("/admin/admin.js") && body.contains("/admin/admin.css"));
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_api() {
    const K1: &str = "key-one-0123456789";
    const K2: &str = "key-two-0123456789";
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.api_key = vec![K1.into(), K2.into()]).await;
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let http = reqwest::Client::new();
    let protected: Vec<(Method, String, Option<serde_json::Value>)> = vec![
        (Method::GET, "/v1/stats".into(), None),
        (Method::GET, format!("/v1/connections/{id}"), None),
        (
            Method::POST,
            format!("/v1/connections/{id}/messages"),
            Some(serde_json::json!({"text": "k"})),
        ),
        (
            Method::POST,
            "/v1/messages".into(),
            Some(serde_json::json!({"messages": []})),
        ),
        (
            Method::DELETE,
            format!("/v1/connections/{}", unknown_id(&gw)),
            None,
        ),
    ];
    for (method, path, body) in &protected {
        let build = |auth: Option<&str>| {
            let mut r = http.request(method.clone(), gw.api(path));
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            if let Some(b) = body {
                r = r.json(b);
            }
            r
        };
        for auth in [
            None,
            Some("Bearer wrong-key-0123456789".to_string()),
            Some(format!("Bearer {K1}x")),
            Some(format!("Basic {K1}")),
            Some(K1.to_string()),
            Some("Bearer ".to_string()),
        ] {
            let r = gw.call(build(auth.as_deref())).await;
            assert_error(&r, 401, "unauthorized");
            assert_eq!(
                r.header("www-authenticate").as_deref(),
                Some("Bearer"),
                "{method} {path}"
            );
        }
        for key in [K1, K2] {
            let r = gw.call(build(Some(&format!("Bearer {key}")))).await;
            assert_ne!(r.status, 401, "{method} {path} with {key}: {}", r.body);
            assert!(r.status < 500, "{method} {path}: {}", r.body);
        }
    }
    // Both keyed pushes arrived.
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("k"));
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("k"));
    // Probes, scrapers and the API description work without a key.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        assert_eq!(
            http.get(gw.api(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_are_json_errors() {
    let (_origin, gw) = setup().await;
    assert_error(&gw.get("/v1/nope").await, 404, "route_not_found");
    assert_error(&gw.get("/").await, 404, "route_not_found");
    assert_error(
        &gw.call(gw.request(Method::PUT, "/v1/stats")).await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &gw.call(gw.request(Method::POST, "/healthz")).await,
        405,
        "method_not_allowed",
    );
    gw.shutdown().await;
}

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// `docs/openapi.json` (served at `/v1/openapi.json`) documents exactly the
/// routes of `ROUTES`, each operation with its responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_lists_exactly_the_routes() {
    let doc: serde_json::Value =
        serde_json::from_str(switchboard_server::OPENAPI_JSON).expect("docs/openapi.json is JSON");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "openapi version: {}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths object");
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        for (key, op) in item.as_object().expect("path item object") {
            if HTTP_METHODS.contains(&key.as_str()) {
                documented.insert((key.clone(), path.clone()));
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{key} {path} has no responses"
                );
            }
        }
    }
    let routes: BTreeSet<(String, String)> = switchboard_server::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = routes.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routes).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "undocumented routes: {missing:?}; documented but not routed: {extra:?}"
    );

    // The served document is the same file.
    let (_origin, gw) = setup().await;
    let r = gw.get("/v1/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.json(), doc);
    gw.shutdown().await;
}

/// Every route of `ROUTES` is served (none answers `route_not_found` or 405).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers() {
    let (origin, gw) = setup().await;
    let (ws, id) = connect_id(&gw, &origin, "/").await;
    let mut answers = BTreeMap::new();
    let mut routes = switchboard_server::ROUTES.to_vec();
    // Close the connection last.
    routes.sort_by_key(|(m, _)| *m == "delete");
    for (method, path) in routes {
        let mut url = path.replace("{id}", &id).replace("{channel}", "room:1");
        if path == "/v1/connections" {
            // Its one parameter is required.
            url.push_str("?user_id=nobody");
        }
        let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
        let mut req = gw.request(m, &url);
        if method == "post" {
            req = req.json(&match path {
                "/v1/messages" => {
                    serde_json::json!({"messages": [{"connection_ids": [id], "text": "x"}]})
                }
                "/v1/graphql/triggers" => serde_json::json!({"triggers": ["x"]}),
                _ => serde_json::json!({"text": "x"}),
            });
        }
        let r = gw.call(req).await;
        let code = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        assert!(
            r.status < 400 && code != "route_not_found",
            "{method} {path}: {} {}",
            r.status,
            r.body
        );
        answers.insert(format!("{method} {path}"), r.status);
    }
    assert_eq!(answers.len(), switchboard_server::ROUTES.len());
    drop(ws);
    gw.shutdown().await;
}

/// Issue 11 (6): a path with an invalid percent-escape is 400 `bad_channel`
/// (axum alone decodes `%ZZ` as itself), and a message carrying both `text`
/// and `binary` is 400 `invalid_body` on every route that takes messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_escapes_and_two_payloads_are_refused() {
    let (origin, gw) = setup().await;
    let (ws, id) = connect_id(&gw, &origin, "/").await;
    let text = serde_json::json!({"text": "x"});
    for path in [
        "/v1/channels/room:%ZZ/messages",
        "/v1/channels/room:a%2/messages",
        "/v1/channels/room:a%/messages",
    ] {
        assert_error(&gw.post(path, &text).await, 400, "bad_channel");
        assert_error(&gw.get(path).await, 400, "bad_channel");
    }
    assert_error(
        &gw.get("/v1/channels/room:%ZZ/presence").await,
        400,
        "bad_channel",
    );
    assert_error(
        &gw.call(gw.request(
            Method::PUT,
            &format!("/v1/connections/{id}/channels/room:%G1"),
        ))
        .await,
        400,
        "bad_channel",
    );
    // A valid escape still works.
    let r = gw.post("/v1/channels/room:a%20b/messages", &text).await;
    assert_error(&r, 400, "bad_channel"); // whitespace is not allowed in a name
    let r = gw.post("/v1/channels/room:%41/messages", &text).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let both = serde_json::json!({"text": "x", "binary": "AAH/"});
    assert_error(
        &gw.post("/v1/channels/room:1/messages", &both).await,
        400,
        "invalid_body",
    );
    assert_error(
        &gw.post(&format!("/v1/connections/{id}/messages"), &both)
            .await,
        400,
        "invalid_body",
    );
    // The same with a key spelled with an escape.
    assert_error(
        &gw.call(
            gw.request(Method::POST, "/v1/channels/room:1/messages")
                .header("content-type", "application/json")
                .body(r#"{"\u0074ext": "x", "binary": "AAH/"}"#),
        )
        .await,
        400,
        "invalid_body",
    );
    let batch = serde_json::json!({"messages": [
        {"connection_ids": [id], "text": "x"},
        {"connection_ids": [id], "text": "x", "binary": "AAH/"},
    ]});
    assert_error(&gw.post("/v1/messages", &batch).await, 400, "invalid_body");
    let history = gw.get("/v1/channels/room:1/messages").await;
    assert_eq!(
        history.json()["offset"],
        0,
        "nothing was published: {}",
        history.body
    );
    drop(ws);
    gw.shutdown().await;
}

/// Raw bytes to the control listener; the answer, read until it closes.
async fn raw(gw: &TestGateway, request: &[u8]) -> RawResponse {
    raw_request(gw.control, request)
        .await
        .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(request)))
}

fn assert_raw_error(r: &RawResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let v = r.json();
    assert_eq!(v["code"], code, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

/// Issue 11 (6): the errors hyper finds before any route (a URI over its
/// limit, a malformed head, too many or too large headers) are JSON errors
/// with documented codes too, not empty bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_found_before_routing_are_json() {
    let (_origin, gw) = setup().await;
    let long = format!(
        "GET /v1/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    assert_raw_error(&raw(&gw, long.as_bytes()).await, 414, "uri_too_long");
    assert_raw_error(
        &raw(&gw, b"BLAH\x01 / HTTP/1.1\r\nHost: x\r\n\r\n").await,
        400,
        "bad_request",
    );
    assert_raw_error(
        &raw(&gw, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await,
        400,
        "bad_request",
    );
    // Not HTTP at all (a TLS ClientHello).
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];
    hello.extend_from_slice(&[0; 64]);
    assert_raw_error(&raw(&gw, &hello).await, 400, "bad_request");
    // An HTTP/2 preface: closed without an answer, but counted.
    assert!(raw_request(gw.control, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .is_none());
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_raw_error(&raw(&gw, many.as_bytes()).await, 431, "headers_too_large");
    // The listener still serves.
    let ok = raw(
        &gw,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(ok.status, 200);
    // Counted when each connection ends, which may be just after the
    // client saw it close.
    eventually(WAIT, "4 bad_request refusals counted", || async {
        gw.metric("switchboard_control_refusals_total{reason=\"bad_request\"}")
            .await
            == 4.0
    })
    .await;
    for (reason, n) in [("uri_too_long", 1.0), ("headers_too_large", 1.0)] {
        let got = gw
            .metric(&format!(
                "switchboard_control_refusals_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(got, n, "{reason}");
    }
    gw.shutdown().await;
}

/// Issue 11 (6): every status the control listener can answer outside a
/// route's own ones (400, 408, 414, 431, 503) is in `docs/openapi.json`
/// for every operation, with the codes in the `Error` schema.
#[test]
fn openapi_documents_the_listener_errors_on_every_operation() {
    let doc: serde_json::Value = serde_json::from_str(switchboard_server::OPENAPI_JSON).unwrap();
    let codes: Vec<&str> = doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for code in [
        "bad_request",
        "uri_too_long",
        "headers_too_large",
        "request_timeout",
        "too_many_connections",
    ] {
        assert!(codes.contains(&code), "{code} is not in the Error schema");
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !HTTP_METHODS.contains(&method.as_str()) {
                continue;
            }
            for status in ["400", "408", "414", "431", "503"] {
                assert!(
                    op["responses"].get(status).is_some(),
                    "{method} {path} does not list {status}"
                );
            }
        }
    }
}
