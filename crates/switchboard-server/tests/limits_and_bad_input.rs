//! Malformed frames, oversized messages and heads, non-WebSocket requests,
//! connection caps, the handshake timeout and client rate limits. After
//! each, the node still serves other clients.

use futures_util::SinkExt;
use std::time::{Duration, Instant};
use switchboard_proto::origin::{ClosedBy, Payload};
use switchboard_test_util::*;
use tokio::io::AsyncWriteExt;

fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    RawWs::encode(fin, false, opcode, payload, true)
}

/// Sends `bytes` on a fresh connection and expects the gateway to close it
/// with `code`; checks the `disconnect` the origin gets.
async fn expect_protocol_close(
    gw: &TestGateway,
    origin: &TestOrigin,
    what: &str,
    bytes: &[u8],
    code: u16,
) {
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let id = origin.id_for(raw.local_addr).await;
    raw.send_raw(bytes).await;
    let (got, reason, _) = raw.expect_close(WAIT).await;
    assert_eq!(got, code, "{what}: reason {reason:?}");
    // The gateway closes the TCP connection without waiting for our reply.
    let after = raw.expect_eof(WAIT).await;
    assert!(
        after.is_empty(),
        "{what}: frames after the close: {after:?}"
    );
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (code, ClosedBy::Gateway), "{what}");
    assert!(
        origin.messages_of(&id).is_empty(),
        "{what}: {:?}",
        origin.messages_of(&id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_close_with_the_right_code() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked text frame",
            RawWs::encode(true, false, OP_TEXT, b"hello", false),
            1002,
        ),
        (
            "unmasked close frame",
            RawWs::encode(true, false, OP_CLOSE, &1000u16.to_be_bytes(), false),
            1002,
        ),
        (
            "invalid UTF-8 text",
            frame(true, OP_TEXT, &[b'o', b'k', 0xff, 0xfe]),
            1007,
        ),
        (
            "invalid UTF-8 across fragments",
            [
                frame(false, OP_TEXT, b"a\xc3"),
                frame(true, OP_CONT, b"\x28"),
            ]
            .concat(),
            1007,
        ),
        (
            "invalid UTF-8 close reason",
            frame(true, OP_CLOSE, &[0x03, 0xe8, 0xc3, 0x28]),
            1007,
        ),
        ("reserved opcode", frame(true, 0x3, b"x"), 1002),
        ("reserved control opcode", frame(true, 0xB, b""), 1002),
        (
            "RSV1 without permessage-deflate",
            RawWs::encode(true, true, OP_TEXT, b"x", true),
            1002,
        ),
        (
            "RSV2 set",
            {
                let mut f = frame(true, OP_TEXT, b"x");
                f[0] |= 0x20;
                f
            },
            1002,
        ),
        ("fragmented ping", frame(false, OP_PING, b"p"), 1002),
        (
            "control frame over 125 bytes",
            frame(true, OP_PING, &[0; 126]),
            1002,
        ),
        (
            "continuation without a message",
            frame(true, OP_CONT, b"x"),
            1002,
        ),
        (
            "new message inside a fragmented one",
            [frame(false, OP_TEXT, b"a"), frame(true, OP_TEXT, b"b")].concat(),
            1002,
        ),
        (
            "close code 1005",
            frame(true, OP_CLOSE, &1005u16.to_be_bytes()),
            1002,
        ),
        ("one-byte close payload", frame(true, OP_CLOSE, &[3]), 1002),
    ];
    let n = cases.len();
    for (what, bytes, code) in cases {
        expect_protocol_close(&gw, &origin, what, &bytes, code).await;
    }
    assert_eq!(
        gw.metric("switchboard_protocol_errors_total").await,
        n as f64
    );
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_big_messages_close_with_1009() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.max_message_size = 1024).await;
    // At the limit: fine, also when fragmented.
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let id = origin.id_for(raw.local_addr).await;
    raw.send_binary(&[7; 1024]).await;
    raw.send_raw(
        &[
            frame(false, OP_TEXT, &[b'a'; 512]),
            frame(true, OP_CONT, &[b'b'; 512]),
        ]
        .concat(),
    )
    .await;
    let m = origin.wait_messages(&id, 2).await;
    assert_eq!(m[0].payload, Payload::Binary(vec![7; 1024]));
    assert_eq!(
        m[1].payload,
        Payload::Text(format!("{}{}", "a".repeat(512), "b".repeat(512)))
    );
    drop(raw);

    expect_protocol_close(
        &gw,
        &origin,
        "one byte over",
        &frame(true, OP_BINARY, &[0; 1025]),
        1009,
    )
    .await;
    expect_protocol_close(
        &gw,
        &origin,
        "fragments adding up to one byte over",
        &[
            frame(false, OP_TEXT, &[b'a'; 600]),
            frame(true, OP_CONT, &[b'b'; 425]),
        ]
        .concat(),
        1009,
    )
    .await;
    // Refused from the frame header alone, before any payload is buffered.
    let mut header = vec![0x82, 0xFF];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    expect_protocol_close(&gw, &origin, "a 1 GiB frame header", &header, 1009).await;

    // A real client sees the close code too.
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    ws.send(WsMessage::binary(vec![0u8; 4096])).await.unwrap();
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1009);
    assert_eq!(origin.wait_disconnect(&id).await.code, 1009);
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_upgrade_and_bad_handshakes_get_json_answers() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let plain = raw_request(gw.addr, b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("answer");
    assert_eq!(plain.status, 426);
    assert_eq!(plain.header("content-type"), Some("application/json"));
    assert_eq!(plain.header("upgrade"), Some("websocket"));
    assert_eq!(plain.header("connection"), Some("close"));
    assert_eq!(plain.json()["code"], "upgrade_required");
    assert_eq!(
        plain.header("content-length"),
        Some(plain.body.len().to_string().as_str())
    );

    let v8 = upgrade_request("/", &[]).replace("Version: 13", "Version: 8");
    let r = raw_request(gw.addr, v8.as_bytes()).await.expect("answer");
    assert_eq!(
        (r.status, r.header("sec-websocket-version")),
        (426, Some("13"))
    );
    assert_eq!(r.json()["code"], "unsupported_version");

    let bad: Vec<(&str, String)> = vec![
        (
            "POST upgrade",
            upgrade_request("/", &[]).replacen("GET", "POST", 1),
        ),
        (
            "short key",
            upgrade_request("/", &[]).replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
        ),
        (
            "no key",
            upgrade_request("/", &[])
                .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
        ),
        ("garbage", "\x16\x03\x01 not http at all\r\n\r\n".into()),
    ];
    for (what, req) in bad {
        let r = raw_request(gw.addr, req.as_bytes()).await.expect("answer");
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert_eq!(r.json()["code"], "bad_request", "{what}");
    }
    assert_eq!(gw.stats().await.handshakes_rejected_total, 6);
    assert!(
        origin.arrivals().is_empty(),
        "refused before asking the origin"
    );
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.max_header_bytes = 1024).await;
    let big = "b".repeat(2000);
    let cases: Vec<(&str, String)> = vec![
        (
            "a complete head, sent at once",
            upgrade_request("/", &[("X-Big", &big)]),
        ),
        (
            "a head that never ends",
            format!("GET / HTTP/1.1\r\nX-Big: {big}"),
        ),
        ("65 header lines", upgrade_request("/", &[("X-A", "1"); 65])),
    ];
    for (what, req) in cases {
        let r = raw_request(gw.addr, req.as_bytes())
            .await
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(r.status, 431, "{what}: {r:?}");
        assert_eq!(r.json()["code"], "header_too_large", "{what}");
    }
    // Just under the limit is fine.
    let fits = "f".repeat(1024 - upgrade_request("/", &[("X-Fit", "")]).len());
    let raw = RawWs::connect(gw.addr, "/", &[("X-Fit", &fits)]).await;
    assert_eq!(raw.response.status, 101);
    assert_eq!(
        origin.arrivals().len(),
        1,
        "only the last handshake reached the origin"
    );
    drop(raw);
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;

    // The header-line cap is a setting too.
    let gw = TestGateway::with_origin(&origin, |c| c.max_header_count = 10).await;
    let r = raw_request(gw.addr, upgrade_request("/", &[("X-A", "1"); 8]).as_bytes())
        .await
        .expect("an answer");
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (431, Some("header_too_large"))
    );
    let raw = RawWs::connect(gw.addr, "/", &[("X-A", "1"); 2]).await;
    assert_eq!(raw.response.status, 101);
}

/// Retries a handshake refused with 503 until it succeeds: a socket's slot is
/// freed just after its `disconnect` is queued, so the two race by a hair.
async fn connect_once_freed(gw: &TestGateway, origin: &TestOrigin) -> (Ws, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        match connect_with(&gw.ws_url("/"), &[]).await {
            Ok((ws, _)) => {
                let id = origin.id_for(local_addr(&ws)).await;
                return (ws, id);
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(r))
                if r.status() == 503 && Instant::now() < deadline =>
            {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("no slot freed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_gives_503() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.max_connections_per_ip = 2).await;
    let (a, a_id) = connect_id(&gw, &origin, "/").await;
    let (b, _) = connect_id(&gw, &origin, "/").await;
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("answer");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["code"], "too_many_connections_from_ip");
    assert_eq!(
        gw.metric("switchboard_handshakes_total{result=\"too_many_connections_from_ip\"}")
            .await,
        1.0
    );
    assert_eq!(
        origin.arrivals().len(),
        2,
        "refused before asking the origin"
    );
    // Closing one frees a slot for a new client.
    drop(a);
    origin.wait_disconnect(&a_id).await;
    let (c, c_id) = connect_once_freed(&gw, &origin).await;
    assert_eq!(gw.push_text(&c_id, "hi").await, 200);
    let mut c = c;
    assert_eq!(next_msg(&mut c).await, WsMessage::text("hi"));
    drop((b, c));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_gives_503() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.max_connections = 2).await;
    let (a, a_id) = connect_id(&gw, &origin, "/").await;
    let (b, _) = connect_id(&gw, &origin, "/").await;
    for _ in 0..3 {
        let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
            .await
            .expect("answer");
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["code"], "over_capacity");
    }
    // A half-open handshake holds a slot too: it takes the one `a` frees
    // (the refused sockets above hold none).
    drop(a);
    origin.wait_disconnect(&a_id).await;
    let mut pending = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    pending.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let r = raw_request(gw.addr, upgrade_request("/", &[]).as_bytes())
        .await
        .expect("answer");
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (503, Some("over_capacity"))
    );
    // Once it leaves, a client fits again.
    drop(pending);
    let (mut c, c_id) = connect_once_freed(&gw, &origin).await;
    assert_eq!(gw.push_text(&c_id, "room for me").await, 200);
    assert_eq!(next_msg(&mut c).await, WsMessage::text("room for me"));
    let s = gw.stats().await;
    assert_eq!((s.connections, s.connections_total), (2, 3));
    assert!(
        gw.metric("switchboard_handshakes_total{result=\"over_capacity\"}")
            .await
            >= 4.0
    );
    drop((b, c));
    gw.shutdown().await;
}

/// Reads what the gateway sends on `s` until it closes (`WAIT` at most) and
/// returns the answer's status and JSON body; `None` if it closed without
/// an answer.
async fn read_answer(s: &mut tokio::net::TcpStream) -> Option<(u16, serde_json::Value)> {
    let r = read_response(s).await?;
    Some((r.status, r.json()))
}

/// A client that has not sent its whole head within `handshake-timeout`
/// is answered 408 `handshake_timeout`, then closed, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_answers_408_and_counts_it() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.handshake_timeout = Duration::from_millis(300)
    })
    .await;
    for partial in [&b""[..], b"GET / HTTP/1.1\r\nHost: x\r\n"] {
        let started = Instant::now();
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(partial).await.unwrap();
        let answer = read_answer(&mut s).await;
        let took = started.elapsed();
        let (status, body) = answer.expect("an answer");
        assert_eq!(
            (status, body["code"].as_str()),
            (408, Some("handshake_timeout"))
        );
        assert!(
            took >= Duration::from_millis(250),
            "answered before the timeout: {took:?}"
        );
    }
    assert_eq!(
        gw.metric("switchboard_handshakes_total{result=\"timeout\"}")
            .await,
        2.0
    );
    assert!(origin.arrivals().is_empty());
    assert_serves(&gw, &origin).await;
    gw.shutdown().await;
}

/// A socket over `max-handshakes-per-ip` is counted at once and answered
/// 429 whenever its head comes within `handshake-timeout` (here after
/// 2.5 s), or at the timeout if it never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_socket_is_counted_and_answered_even_when_its_head_is_late() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.max_handshakes_per_ip = 1;
        c.handshake_timeout = Duration::from_secs(3);
    })
    .await;
    // The burst: two handshakes.
    let (_a, _) = connect_id(&gw, &origin, "/").await;
    let (_b, _) = connect_id(&gw, &origin, "/").await;
    let started = Instant::now();
    let mut late = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Counted before any answer.
    let metric = "switchboard_handshakes_total{result=\"too_many_handshakes\"}";
    let deadline = Instant::now() + Duration::from_secs(1);
    while gw.metric(metric).await < 2.0 {
        assert!(Instant::now() < deadline, "refusals not counted at accept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    late.write_all(upgrade_request("/", &[]).as_bytes())
        .await
        .expect("still open after 2.5s");
    let (status, body) = read_answer(&mut late)
        .await
        .expect("a late head is answered");
    assert_eq!(
        (status, body["code"].as_str()),
        (429, Some("too_many_handshakes"))
    );
    let (status, body) = read_answer(&mut silent)
        .await
        .expect("a silent socket is answered at the timeout");
    assert_eq!(
        (status, body["code"].as_str()),
        (429, Some("too_many_handshakes"))
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900),
        "the silent one answered before the timeout: {took:?}"
    );
    assert_eq!(gw.metric(metric).await, 2.0, "each counted once");
    assert_eq!(origin.connects().len(), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_clients_over_their_rate_get_errors_raw_ones_are_slowed_others_untouched() {
    init_tracing();
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let gw = TestGateway::start(|c| {
        c.origin = Some(url);
        c.client_message_rate = 10;
    })
    .await;

    // Native: a burst of 40 pings; the first 20 (two seconds' worth) run,
    // the rest are answered `rate_limited` with their id.
    let (mut native, _) = connect_with(
        &gw.ws_url("/"),
        &[("Sec-WebSocket-Protocol", "switchboard.v1")],
    )
    .await
    .unwrap();
    for id in 1..=40 {
        native
            .send(WsMessage::text(format!(r#"{{"id":{id},"cmd":"ping"}}"#)))
            .await
            .unwrap();
    }
    let (mut ok, mut limited) = (0, 0);
    while ok + limited < 40 {
        let WsMessage::Text(t) = next_msg(&mut native).await else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        if v["id"].is_u64() {
            if v["error"]["code"] == "rate_limited" {
                limited += 1;
            } else {
                assert!(v["result"].is_object(), "{v}");
                ok += 1;
            }
        }
    }
    assert_eq!((ok, limited), (20, 20));

    // Raw: a flooding client is slowed down, not cut off: the gateway stops
    // reading until its bucket refills, so every message reaches the origin
    // (in order) at the rate, and the connection stays open.
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let id = origin.id_for(raw.local_addr).await;
    let started = Instant::now();
    for i in 0..40 {
        raw.send_raw(&frame(true, 0x1, format!("spam {i}").as_bytes()))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let early = origin.messages_of(&id).len();
    assert!(
        (20..=33).contains(&early),
        "{early} messages reached the origin after 1 s: a burst of 20 plus ~10/s"
    );
    // A ping sent behind the flood is answered once its turn comes.
    raw.send_raw(&frame(true, 0x9, b"still there?")).await;
    let pong = loop {
        let f = raw.next_frame(WAIT).await.expect("open");
        if f.opcode == 0xA {
            break f;
        }
    };
    assert_eq!(pong.payload, b"still there?");
    let all = origin.wait_messages(&id, 40).await;
    let texts: Vec<_> = all.iter().map(|m| m.payload.clone()).collect();
    let want: Vec<_> = (0..40)
        .map(|i| Payload::Text(format!("spam {i}")))
        .collect();
    assert_eq!(texts, want, "every message, in order");
    assert!(
        started.elapsed() >= Duration::from_millis(1800),
        "20 messages past the burst took {:?}, at 10/s",
        started.elapsed()
    );
    assert!(gw.metric("switchboard_rate_limited_messages_total").await >= 20.0);
    assert!(origin.disconnects_of(&id).is_empty(), "not closed");

    // A client within its rate is untouched.
    let mut calm = connect(&gw.ws_url("/")).await;
    for i in 0..5 {
        calm.send(WsMessage::text(format!("m{i}"))).await.unwrap();
    }
    let calm_id = origin.connects().last().unwrap().connection_id.clone();
    origin
        .wait_events(WAIT, |_| origin.messages_of(&calm_id).len() == 5)
        .await;
    gw.shutdown().await;
}

/// A raw client's close frame read before a pause is seen as soon as the
/// gateway starts closing it: the closing handshake completes at once, not
/// after its 5 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_read_during_a_pause_ends_the_closing_handshake_at_once() {
    let origin = TestOrigin::start(None).await;
    // 50 bytes a second, a burst of one largest message (1,000 bytes): the
    // second 600-byte message is taken 200 bytes in debt and pauses reading
    // for about 4 s, with the third and the close frame already read.
    let gw = TestGateway::with_origin(&origin, |c| {
        c.client_byte_rate = 50;
        c.max_message_size = 1000;
    })
    .await;
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let id = origin.id_for(raw.local_addr).await;
    let mut bytes = Vec::new();
    for _ in 0..3 {
        bytes.extend(frame(true, 0x1, &[b'x'; 600]));
    }
    bytes.extend(frame(true, 0x8, &[0x03, 0xe8]));
    raw.send_raw(&bytes).await;
    origin.wait_messages(&id, 2).await;
    let asked = Instant::now();
    let r = gw.delete(&format!("/v1/connections/{id}?code=4321")).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let (code, _, _) = raw.expect_close(WAIT).await;
    assert_eq!(code, 4321);
    raw.expect_eof(Duration::from_secs(15)).await;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "the socket closed {took:?} after the close was asked"
    );
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (4321, ClosedBy::Origin));
    assert_eq!(
        origin.messages_of(&id).len(),
        2,
        "nothing taken once closing"
    );
    gw.shutdown().await;
}

/// A raw client doing request/response faster than `client-message-rate`
/// (each message waits for the origin's reply) gets every answer: past
/// its burst it is slowed down, never dropped and left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_request_response_loop_over_the_rate_gets_every_answer() {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| b.echo = true);
    let gw = TestGateway::with_origin(&origin, |c| c.client_message_rate = 100).await;
    let mut ws = connect(&gw.ws_url("/")).await;
    let started = Instant::now();
    for i in 0..400 {
        let text = format!("request {i}");
        ws.send(WsMessage::text(text.clone())).await.unwrap();
        assert_eq!(next_msg(&mut ws).await, WsMessage::text(text), "answer {i}");
    }
    // A burst of 200, then 100/s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "400 round trips in {took:?}"
    );
    assert!(gw.metric("switchboard_rate_limited_messages_total").await > 0.0);
    gw.shutdown().await;
}

/// `max-handshakes-per-ip`: an address gets a burst of two seconds' worth,
/// then 429 `too_many_handshakes` with `Retry-After`, before the origin is
/// asked; other addresses are not affected, and the address is let in
/// again once its bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_handshake_rate_gets_429_and_others_do_not() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.max_handshakes_per_ip = 5).await;
    // Ten (the burst) are let in; the rest of a quick run is refused.
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    let mut refusal = None;
    for _ in 0..14 {
        match connect_with(&gw.ws_url("/"), &[]).await {
            Ok((ws, _)) => {
                statuses.push(101);
                open.push(ws);
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                statuses.push(r.status().as_u16());
                refusal.get_or_insert(r);
            }
            Err(e) => panic!("handshake: {e}"),
        }
    }
    let admitted = open.len();
    // The run takes some milliseconds: a token may refill meanwhile.
    assert!(
        (10..=11).contains(&admitted) && statuses[..10].iter().all(|s| *s == 101),
        "{statuses:?}"
    );
    let refusal = refusal.expect("a refusal");
    assert_eq!(refusal.status(), 429);
    let body: serde_json::Value =
        serde_json::from_slice(refusal.body().as_deref().unwrap_or_default()).expect("JSON body");
    assert_eq!(body["code"], "too_many_handshakes");
    assert_eq!(
        refusal
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(
        origin.connects().len(),
        admitted,
        "refused before the origin is asked"
    );
    assert_eq!(
        gw.metric("switchboard_handshakes_total{result=\"too_many_handshakes\"}")
            .await,
        (14 - admitted) as f64
    );

    // Another address has its own bucket.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().unwrap())
        .expect("bind 127.0.0.2");
    let other = socket.connect(gw.addr).await.expect("connect");
    let ws = RawWs::handshake(other, "/", &[]).await;
    assert_eq!(ws.local_addr.ip().to_string(), "127.0.0.2");

    // 127.0.0.1 refills at 5 per second.
    tokio::time::sleep(Duration::from_millis(400)).await;
    connect_with(&gw.ws_url("/"), &[])
        .await
        .expect("let in again after a refill");
}
