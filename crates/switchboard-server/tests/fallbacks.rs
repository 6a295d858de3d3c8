//! The HTTP fallbacks (docs/fallbacks.md) end to end, with raw HTTP
//! clients: an SSE stream carrying the native protocol with commands
//! `POST`ed, resumed after cuts with every direct message once; long-polls
//! whose lost answers are fetched again; a long-poll session that stops
//! polling is suspended and resumes; a plain EventSource stream that
//! recovers exactly the missed messages by `Last-Event-ID`; and the
//! refusals.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use switchboard_proto::origin::{ClosedBy, Transport};
use switchboard_server::Namespace;
use switchboard_test_util::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn namespaces() -> Vec<Namespace> {
    vec!["seq:history-size=5000,subscribe,publish,presence"
        .parse()
        .unwrap()]
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sse {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

impl Sse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// A raw SSE client: the request, the answer's head, then events.
struct SseClient {
    stream: TcpStream,
    buf: Vec<u8>,
    status: u16,
    head: String,
}

impl SseClient {
    async fn open(addr: SocketAddr, path_and_query: &str, extra: &[(&str, &str)]) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req =
            format!("GET {path_and_query} HTTP/1.1\r\nHost: gw\r\nAccept: text/event-stream\r\n");
        for (n, v) in extra {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed before an answer");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head[9..12].parse().unwrap();
        buf.drain(..end);
        Self {
            stream,
            buf,
            status,
            head,
        }
    }

    /// The next event (comments skipped); `None` when the stream ends.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..i + 2).collect();
                let text = String::from_utf8(block).unwrap();
                let mut ev = Sse::default();
                let mut data: Vec<&str> = Vec::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                if data.is_empty() && ev.event.is_none() && ev.id.is_none() {
                    continue; // a comment (heartbeat) or `retry:`
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("an event in time")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next event's JSON.
    async fn next_json(&mut self) -> Value {
        self.next().await.expect("an event").json()
    }
}

/// An HTTP request on a fresh connection: status and body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, String, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
    if method == "POST" {
        req.push_str(&format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    for (n, v) in extra {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let resp = tokio::time::timeout(WAIT, raw_request(addr, req.as_bytes()))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let head: String = resp
        .headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\n"))
        .collect();
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    (resp.status, head, body)
}

async fn post(addr: SocketAddr, token: &str, commands: &[Value]) -> u16 {
    let body: Vec<String> = commands.iter().map(Value::to_string).collect();
    http(
        addr,
        "POST",
        &format!("/live?session={token}"),
        &body.join("\n"),
        &[],
    )
    .await
    .0
}

#[tokio::test]
async fn sse_carries_the_native_protocol_and_commands_come_as_posts() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.namespace = namespaces()).await;
    let mut sse = SseClient::open(gw.addr, "/live?room=7", &[("X-Forwarded-Proto", "https")]).await;
    assert_eq!(sse.status, 200, "{}", sse.head);
    assert!(
        sse.head.contains("Content-Type: text/event-stream"),
        "{}",
        sse.head
    );
    let first = sse.next().await.unwrap();
    assert_eq!(first.id.as_deref(), Some("1"));
    let connected = first.json();
    assert_eq!(connected["push"], "connected");
    let id = connected["client"].as_str().unwrap().to_owned();
    let token = connected["session"].as_str().unwrap().to_owned();

    let connect = origin.connects().pop().unwrap();
    assert_eq!(connect.transport, Transport::Sse);
    assert_eq!(connect.path, "/live");
    assert_eq!(connect.query, "room=7");
    assert_eq!(connect.subprotocol.as_deref(), Some("switchboard.v1"));
    let info = gw.connection(&id).await.unwrap();
    assert_eq!(info.transport, Transport::Sse);

    // Commands: one request, two lines, replies on the stream in order.
    let status = post(
        gw.addr,
        &token,
        &[
            json!({"id": 1, "cmd": "subscribe", "channel": "seq:a"}),
            json!({"id": 2, "cmd": "send", "text": "to the origin"}),
        ],
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(sse.next_json().await["id"], 1);
    assert_eq!(sse.next_json().await["id"], 2);
    let msgs = origin.wait_messages(&id, 1).await;
    assert_eq!(msgs[0].payload.text(), Some("to the origin"));

    // A channel message and a direct message arrive as events.
    let r = gw
        .post("/v1/channels/seq:a/messages", &json!({"text": "m1"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = sse.next_json().await;
    assert_eq!(
        (m["push"].as_str(), m["text"].as_str()),
        (Some("message"), Some("m1"))
    );
    assert_eq!(gw.push_text(&id, "d1").await, 200);
    let d = sse.next_json().await;
    assert_eq!(
        (d["push"].as_str(), d["seq"].as_u64(), d["text"].as_str()),
        (Some("direct"), Some(1), Some("d1"))
    );

    // A bad line is answered on the stream like a bad frame.
    assert_eq!(
        post(gw.addr, &token, &[json!({"id": 9, "cmd": "nope"})]).await,
        204
    );
    assert!(sse.next_json().await.get("error").is_some());

    // The client ends its session: a close event, one disconnect.
    let (status, _, _) = http(
        gw.addr,
        "DELETE",
        &format!("/live?session={token}"),
        "",
        &[],
    )
    .await;
    assert_eq!(status, 204);
    let close = sse.next().await.unwrap();
    assert_eq!(close.event.as_deref(), Some("close"));
    assert_eq!(close.json()["code"], 1000);
    assert!(
        sse.next().await.is_none(),
        "the stream ends after its close"
    );
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(d.closed_by, ClosedBy::Client);
    assert_eq!(origin.disconnects_of(&id).len(), 1);
    // The session is gone.
    assert_eq!(
        post(gw.addr, &token, &[json!({"id": 3, "cmd": "ping"})]).await,
        404
    );
}

#[tokio::test]
async fn an_sse_session_resumes_after_cuts_with_every_direct_once() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.namespace = namespaces()).await;
    let mut sse = SseClient::open(gw.addr, "/live", &[]).await;
    let connected = sse.next_json().await;
    let id = connected["client"].as_str().unwrap().to_owned();
    let token = connected["session"].as_str().unwrap().to_owned();
    let mut got: Vec<u64> = Vec::new();
    let mut sent = 0u64;
    for round in 0..4 {
        // Some directs while connected.
        for _ in 0..5 {
            sent += 1;
            assert_eq!(gw.push_text(&id, &format!("d{sent}")).await, 200);
        }
        while (got.len() as u64) < sent {
            let d = sse.next_json().await;
            if d["push"] == "direct" {
                got.push(d["seq"].as_u64().unwrap());
            }
        }
        // The cut: the client's socket goes, with no close event.
        drop(sse);
        wait_until(|| async { gw.connection(&id).await.is_some_and(|c| c.suspended) }).await;
        // Directs while away are queued.
        for _ in 0..3 {
            sent += 1;
            let r = gw
                .post(
                    &format!("/v1/connections/{id}/messages"),
                    &json!({"text": format!("d{sent}")}),
                )
                .await;
            assert_eq!(r.json()["status"], "queued", "round {round}: {}", r.body);
        }
        let received = got.last().copied().unwrap_or(0);
        sse = SseClient::open(
            gw.addr,
            &format!("/live?resume={token}&received={received}"),
            &[],
        )
        .await;
        let c = sse.next_json().await;
        assert_eq!(c["resumed"], true, "{c}");
        assert_eq!(c["client"], id.as_str());
    }
    while (got.len() as u64) < sent {
        let d = sse.next_json().await;
        if d["push"] == "direct" {
            got.push(d["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(
        got,
        (1..=sent).collect::<Vec<_>>(),
        "every direct once, in order"
    );
    assert_eq!(
        origin.connects().len(),
        1,
        "one connect for the whole session"
    );
    assert!(origin.disconnects_of(&id).is_empty());
}

/// A long-poll client: its session token and the cursor it acknowledges.
struct Poller {
    addr: SocketAddr,
    token: String,
    cursor: u64,
}

impl Poller {
    /// Opens a session: the poller and the first answer's pushes (the
    /// `connected` push first).
    async fn open(addr: SocketAddr, query: &str) -> (Self, Vec<Value>) {
        let (status, head, body) = http(
            addr,
            "GET",
            &format!("/live?transport=long-poll{query}"),
            "",
            &[],
        )
        .await;
        assert_eq!(status, 200, "{head}{body}");
        let batch: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(batch["cursor"], 1);
        let pushes = batch["pushes"].as_array().unwrap().clone();
        assert_eq!(pushes[0]["push"], "connected");
        let token = pushes[0]["session"].as_str().unwrap().to_owned();
        (
            Self {
                addr,
                token,
                cursor: 1,
            },
            pushes,
        )
    }

    /// One poll acknowledging `cursor`: status and batch.
    async fn poll_with(&self, cursor: u64) -> (u16, Value) {
        let path = format!(
            "/live?transport=long-poll&session={}&cursor={cursor}",
            self.token
        );
        let (status, _, body) = http(self.addr, "GET", &path, "", &[]).await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// Polls, acknowledging the last answer.
    async fn poll(&mut self) -> Vec<Value> {
        let (status, batch) = self.poll_with(self.cursor).await;
        assert_eq!(status, 200, "{batch}");
        assert_eq!(batch["cursor"].as_u64(), Some(self.cursor + 1));
        self.cursor += 1;
        batch["pushes"].as_array().unwrap().clone()
    }
}

#[tokio::test]
async fn long_polls_lose_and_repeat_nothing_between_polls() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = namespaces();
        c.poll_timeout = Duration::from_secs(1);
    })
    .await;
    let (mut p, first) = Poller::open(gw.addr, "").await;
    let id = first[0]["client"].as_str().unwrap().to_owned();
    assert_eq!(origin.connects()[0].transport, Transport::LongPoll);

    // An empty poll comes back after poll-timeout.
    let started = std::time::Instant::now();
    assert!(p.poll().await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Commands go up by POST; their replies come in the next poll.
    assert_eq!(
        post(
            gw.addr,
            &p.token,
            &[json!({"id": 1, "cmd": "subscribe", "channel": "seq:b"})]
        )
        .await,
        204
    );
    let replies = p.poll().await;
    assert_eq!(replies[0]["id"], 1, "{replies:?}");

    let mut got = Vec::new();
    for i in 1..=30u64 {
        assert_eq!(gw.push_text(&id, &format!("d{i}")).await, 200);
        if i % 10 == 0 {
            // This answer is "lost": the client polls again with the old
            // cursor and gets the same batch again.
            let (status, lost) = p.poll_with(p.cursor).await;
            assert_eq!(status, 200);
            let (status, again) = p.poll_with(p.cursor).await;
            assert_eq!(status, 200);
            assert_eq!(lost, again, "a lost answer comes back the same");
            p.cursor += 1;
            for d in again["pushes"].as_array().unwrap() {
                got.push(d["seq"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(
        got,
        (1..=30).collect::<Vec<_>>(),
        "every direct once, in order"
    );
    // A cursor from elsewhere is refused.
    assert_eq!(p.poll_with(p.cursor + 5).await.0, 409);
    // An older cursor is taken when every answer after it was empty (a
    // forwarding node acknowledged them), never when one carried pushes.
    let full = p.cursor;
    assert!(p.poll().await.is_empty());
    let (status, again) = p.poll_with(full).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["cursor"].as_u64(), Some(full + 2));
    p.cursor = full + 2;
    assert_eq!(
        p.poll_with(full - 1).await.0,
        409,
        "the answer at {full} carried pushes"
    );
    // The client ends: the waiting poll... or the next one, says close.
    let (status, _, _) = http(
        gw.addr,
        "DELETE",
        &format!("/live?session={}", p.token),
        "",
        &[],
    )
    .await;
    assert_eq!(status, 204);
    let (status, last) = p.poll_with(p.cursor).await;
    assert_eq!(status, 200, "{last}");
    assert_eq!(last["close"]["code"], 1000, "{last}");
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(d.closed_by, ClosedBy::Client);
}

#[tokio::test]
async fn a_long_poll_session_without_polls_is_suspended_and_resumes() {
    let origin = TestOrigin::start(None).await;
    let gw =
        TestGateway::with_origin(&origin, |c| c.poll_timeout = Duration::from_millis(500)).await;
    let (p, first) = Poller::open(gw.addr, "").await;
    let id = first[0]["client"].as_str().unwrap().to_owned();
    // No poll: after poll-timeout the session is suspended.
    wait_until(|| async { gw.connection(&id).await.is_some_and(|c| c.suspended) }).await;
    let r = gw
        .post(
            &format!("/v1/connections/{id}/messages"),
            &json!({"text": "while away"}),
        )
        .await;
    assert_eq!(r.json()["status"], "queued");
    // Its polls say so; a resume brings the direct.
    assert_eq!(p.poll_with(1).await.0, 409);
    let (mut p2, pushes) = Poller::open(gw.addr, &format!("&resume={}&received=0", p.token)).await;
    assert_eq!(pushes[0]["resumed"], true, "{pushes:?}");
    assert_eq!(pushes[0]["client"], id.as_str());
    // The `connected` push, then what was kept.
    assert_eq!(pushes[1]["text"], "while away");
    assert_eq!(pushes[1]["seq"], 1);
    assert!(p2.poll().await.is_empty());
    assert_eq!(origin.connects().len(), 1);
    assert!(origin.disconnects_of(&id).is_empty());
}

#[tokio::test]
async fn a_plain_eventsource_stream_recovers_by_last_event_id() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.namespace = namespaces()).await;
    let publish = |text: String| {
        let gw = &gw;
        async move {
            let r = gw
                .post("/v1/channels/seq:news/messages", &json!({ "text": text }))
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    };
    publish("before".into()).await;
    let mut es = SseClient::open(gw.addr, "/feed?channel=seq%3Anews", &[]).await;
    assert_eq!(es.status, 200, "{}", es.head);
    let subscribed = es.next().await.unwrap();
    assert_eq!(subscribed.event.as_deref(), Some("subscribed"));
    let start_id = subscribed.id.clone().unwrap();
    assert!(start_id.ends_with(":1"), "{start_id}");
    assert_eq!(origin.connects()[0].transport, Transport::Eventsource);

    publish("one\ntwo lines".into()).await;
    let m = es.next().await.unwrap();
    assert_eq!(
        (m.event.as_deref(), m.data.as_str()),
        (None, "one\ntwo lines")
    );
    let last_id = m.id.clone().unwrap();
    assert!(last_id.ends_with(":2"), "{last_id}");
    drop(es);
    for i in 3..=5 {
        publish(format!("m{i}")).await;
    }
    // The browser comes back with Last-Event-ID: exactly the missed ones.
    let mut es = SseClient::open(
        gw.addr,
        "/feed?channel=seq%3Anews",
        &[("Last-Event-ID", &last_id)],
    )
    .await;
    let mut texts = Vec::new();
    while texts.len() < 3 {
        let e = es.next().await.unwrap();
        if e.event.is_none() {
            texts.push(e.data);
        }
    }
    assert_eq!(texts, ["m3", "m4", "m5"]);
    publish("live".into()).await;
    loop {
        let e = es.next().await.unwrap();
        if e.event.is_none() {
            assert_eq!(e.data, "live");
            assert!(e.id.unwrap().ends_with(":6"));
            break;
        }
    }
    // A position from another epoch cannot be recovered: said so.
    let mut es =
        SseClient::open(gw.addr, "/feed?channel=seq%3Anews&last_event_id=old:3", &[]).await;
    let e = es.next().await.unwrap();
    assert_eq!(e.event.as_deref(), Some("recovery-failed"), "{e:?}");
    assert_eq!(e.json()["channel"], "seq:news");
    assert_eq!(e.json()["offset"], 6);
    // A channel it may not read is an error event; the stream stays.
    let mut es = SseClient::open(gw.addr, "/feed?channel=closed%3Ax&channel=seq%3Anews", &[]).await;
    let e = es.next().await.unwrap();
    assert_eq!(e.event.as_deref(), Some("error"), "{e:?}");
    assert_eq!(e.json()["channel"], "closed:x");
    let e = es.next().await.unwrap();
    assert_eq!(e.event.as_deref(), Some("subscribed"));
    assert!(
        e.id.unwrap().starts_with(','),
        "no position for the refused channel"
    );
}

#[tokio::test]
async fn fallback_requests_are_refused_plainly() {
    let gw = TestGateway::start(|c| c.allowed_origins = vec!["https://app.example".into()]).await;
    // No session.
    let (status, _, body) = http(gw.addr, "POST", "/live?session=abc.def", "{}", &[]).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = http(
        gw.addr,
        "POST",
        &format!("/live?session={}.x.AAAAAAAAAAAAAAAAAAAAAA", gw.node),
        "{}",
        &[],
    )
    .await;
    assert!(status == 400 || status == 404, "{status} {body}");
    // No length.
    let (status, _, body) = http(gw.addr, "DELETE", "/live?session=abc", "", &[]).await;
    assert_eq!(status, 400, "{body}");
    // CORS: an allowed page's preflight, and a page that may not.
    let (status, head, _) = http(
        gw.addr,
        "OPTIONS",
        "/live",
        "",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-methods: GET, POST, DELETE"),
        "{head}"
    );
    let sse = SseClient::open(gw.addr, "/live", &[("Origin", "https://evil.example")]).await;
    assert_eq!(sse.status, 403);
    // Neither WebSocket nor a fallback: 426 as ever.
    let (status, _, body) = http(gw.addr, "GET", "/live", "", &[]).await;
    assert_eq!(status, 426, "{body}");
    assert!(
        gw.metric("switchboard_fallback_requests_total{request=\"preflight\",result=\"ok\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_fallback_needs_a_token_where_websockets_do() {
    let secret = "fallback-test-secret-of-32-bytes!!";
    let gw = TestGateway::start(|c| {
        c.jwt_secret = Some(secret.into());
    })
    .await;
    let sse = SseClient::open(gw.addr, "/live", &[]).await;
    assert_eq!(sse.status, 401, "{}", sse.head);
    let (status, _, body) = http(gw.addr, "GET", "/live?transport=long-poll", "", &[]).await;
    assert_eq!(status, 401, "{body}");
}

async fn wait_until<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads one HTTP answer with a `Content-Length` (or none, for 204) from
/// a kept connection: status and body.
async fn read_one(stream: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return (head[9..12].parse().unwrap(), body);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before answering");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn one_kept_connection_carries_thousands_of_requests_and_pipelined_ones() {
    let origin = TestOrigin::start(None).await;
    // As fast as the loop goes: over the default 100 messages a second.
    let gw = TestGateway::with_origin(&origin, |c| c.client_message_rate = 0).await;
    let mut sse = SseClient::open(gw.addr, "/live", &[]).await;
    let connected = sse.next_json().await;
    let token = connected["session"].as_str().unwrap().to_owned();
    let mut conn = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    let n = 3000u64;
    for i in 1..=n {
        let body = json!({"id": i, "cmd": "ping"}).to_string();
        let req = format!(
            "POST /live?session={token} HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(read_one(&mut conn, &mut buf).await.0, 204, "request {i}");
    }
    // Two requests in one write: both answered, in order.
    let body = json!({"id": n + 1, "cmd": "ping"}).to_string();
    let two = format!(
        "POST /live?session={token} HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{body}OPTIONS /live HTTP/1.1\r\nHost: gw\r\n\r\n",
        body.len()
    );
    conn.write_all(two.as_bytes()).await.unwrap();
    assert_eq!(read_one(&mut conn, &mut buf).await.0, 204);
    assert_eq!(read_one(&mut conn, &mut buf).await.0, 204);
    // Every ping was answered on the stream, in order.
    for i in 1..=n + 1 {
        assert_eq!(sse.next_json().await["id"], i);
    }
    // Chunked bodies are refused.
    let (status, _, body) = http(
        gw.addr,
        "GET",
        "/live?transport=long-poll",
        "",
        &[("Transfer-Encoding", "chunked")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_lost_answer_comes_back_even_after_empty_answers_between() {
    let origin = TestOrigin::start(None).await;
    let gw =
        TestGateway::with_origin(&origin, |c| c.poll_timeout = Duration::from_millis(300)).await;
    let (mut p, first) = Poller::open(gw.addr, "").await;
    let id = first[0]["client"].as_str().unwrap().to_owned();
    // An empty answer (which, say, a forwarding node took for the client).
    let c = p.cursor;
    assert!(p.poll().await.is_empty());
    // Then an answer with a direct that the client never gets.
    assert_eq!(gw.push_text(&id, "once").await, 200);
    let (status, lost) = p.poll_with(c + 1).await;
    assert_eq!(status, 200);
    assert_eq!(lost["pushes"][0]["text"], "once", "{lost}");
    // The client polls again with the cursor it has: the same answer.
    let (status, again) = p.poll_with(c).await;
    assert_eq!(status, 200);
    assert_eq!(again, lost);
}

#[tokio::test]
async fn delete_ends_a_suspended_session_and_websocket_queries_keep_their_parameters() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |_| {}).await;
    let mut sse = SseClient::open(gw.addr, "/live", &[]).await;
    let connected = sse.next_json().await;
    let id = connected["client"].as_str().unwrap().to_owned();
    let token = connected["session"].as_str().unwrap().to_owned();
    drop(sse);
    wait_until(|| async { gw.connection(&id).await.is_some_and(|c| c.suspended) }).await;
    let (status, _, body) = http(
        gw.addr,
        "DELETE",
        &format!("/live?session={token}"),
        "",
        &[],
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (1000, ClosedBy::Client));
    assert!(gw.connection(&id).await.is_none());
    // A WebSocket app's own `session` and `cursor` parameters reach the origin.
    let (_ws, ws_id) = connect_id(&gw, &origin, "/app?session=s1&cursor=9").await;
    let connect = origin
        .connects()
        .into_iter()
        .find(|c| c.connection_id == ws_id)
        .unwrap();
    assert_eq!(connect.query, "session=s1&cursor=9");
}

#[tokio::test]
async fn an_sse_client_that_never_reads_is_bounded_then_closed() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.max_outbound_bytes = 256 << 10;
        c.session_ttl = Duration::ZERO;
    })
    .await;
    let mut sse = SseClient::open(gw.addr, "/live", &[]).await;
    let id = sse.next_json().await["client"].as_str().unwrap().to_owned();
    // From here on the client reads nothing.
    let big = "x".repeat(32 << 10);
    let mut refused = false;
    for _ in 0..2000 {
        let r = gw
            .post(
                &format!("/v1/connections/{id}/messages"),
                &json!({ "text": big }),
            )
            .await;
        if r.status != 200 || r.json()["status"] != "delivered" {
            refused = true;
            break;
        }
    }
    assert!(refused, "the gateway stopped taking messages for it");
    // Its close event cannot be written either: the stream goes at the
    // close timeout (5 s), as a WebSocket's closing handshake would.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let d = loop {
        if let Some(d) = origin.disconnects_of(&id).pop() {
            break d;
        }
        assert!(tokio::time::Instant::now() < deadline, "no disconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(d.code, 4001, "{d:?}");
    assert!(gw.metric("switchboard_slow_consumer_closes_total").await >= 1.0);
    drop(sse);
}

#[tokio::test]
async fn a_newer_poll_replaces_the_waiting_one() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.poll_timeout = Duration::from_secs(5)).await;
    let (p, first) = Poller::open(gw.addr, "").await;
    let id = first[0]["client"].as_str().unwrap().to_owned();
    let older = {
        let path = format!("/live?transport=long-poll&session={}&cursor=1", p.token);
        let addr = gw.addr;
        tokio::spawn(async move { http(addr, "GET", &path, "", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let newer = {
        let path = format!("/live?transport=long-poll&session={}&cursor=1", p.token);
        let addr = gw.addr;
        tokio::spawn(async move { http(addr, "GET", &path, "", &[]).await })
    };
    let (status, _, body) = older.await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("poll_replaced"), "{body}");
    assert_eq!(gw.push_text(&id, "to the newer").await, 200);
    let (status, _, body) = newer.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("to the newer"), "{body}");
}

#[tokio::test]
async fn oversized_bodies_and_expired_sessions_are_refused_plainly() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.max_message_size = 1024;
        c.session_ttl = Duration::from_millis(300);
    })
    .await;
    let mut sse = SseClient::open(gw.addr, "/live", &[]).await;
    let token = sse.next_json().await["session"]
        .as_str()
        .unwrap()
        .to_owned();
    // A body over max-message-size.
    let big = json!({"id": 1, "cmd": "send", "text": "x".repeat(2000)}).to_string();
    let (status, _, body) = http(
        gw.addr,
        "POST",
        &format!("/live?session={token}"),
        &big,
        &[],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
    // The stream goes, the session expires: its requests are refused.
    drop(sse);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ping = json!({"id": 2, "cmd": "ping"}).to_string();
        let (status, _, body) = http(
            gw.addr,
            "POST",
            &format!("/live?session={token}"),
            &ping,
            &[],
        )
        .await;
        if status == 404 {
            assert!(body.contains("session_unknown"), "{body}");
            break;
        }
        assert_eq!(status, 409, "suspended first: {body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, body) = http(
        gw.addr,
        "GET",
        &format!("/live?transport=long-poll&session={token}&cursor=1"),
        "",
        &[],
    )
    .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn a_request_pipelined_behind_a_waiting_poll_is_served_after_it() {
    let origin = TestOrigin::start(None).await;
    let gw =
        TestGateway::with_origin(&origin, |c| c.poll_timeout = Duration::from_millis(500)).await;
    let (p, _) = Poller::open(gw.addr, "").await;
    let mut conn = TcpStream::connect(gw.addr).await.unwrap();
    let body = json!({"id": 1, "cmd": "ping"}).to_string();
    let both = format!(
        "GET /live?transport=long-poll&session={t}&cursor=1 HTTP/1.1\r\nHost: gw\r\n\r\nPOST /live?session={t} HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        t = p.token
    );
    conn.write_all(both.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let (status, batch) = read_one(&mut conn, &mut buf).await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(
        read_one(&mut conn, &mut buf).await.0,
        204,
        "the POST behind it"
    );
    // Its reply comes in the next poll.
    let (status, next) = p.poll_with(2).await;
    assert_eq!(status, 200);
    assert_eq!(next["pushes"][0]["id"], 1, "{next}");
}
