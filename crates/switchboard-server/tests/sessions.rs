//! Sessions (docs/sessions.md) end to end: a native client whose TCP
//! connection is cut again and again, with no close frame, resumes its
//! session each time and ends with every direct message and every channel
//! message exactly once, in order; the origin sees one `connect` and one
//! `disconnect`. And every way a resume is refused, told plainly.

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use switchboard_proto::origin::{ClosedBy, Event};
use switchboard_server::Namespace;
use switchboard_test_util::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn namespaces() -> Vec<Namespace> {
    vec![
        "seq:history-size=5000,subscribe".parse().unwrap(),
        "room:presence,subscribe".parse().unwrap(),
    ]
}

/// How the proxy cuts its connections.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// Both sides closed: the gateway sees the socket go.
    Both,
    /// Only the client's side: the gateway's socket stays open (and
    /// silent), as when a phone moves to another network.
    ClientSide,
}

/// A TCP proxy in front of the gateway that can cut every connection
/// through it, with no WebSocket close frame.
struct Proxy {
    addr: SocketAddr,
    cuts: watch::Sender<(u32, Cut)>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cuts, _) = watch::channel((0u32, Cut::Both));
        let watcher = cuts.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let mut cut = watcher.subscribe();
                cut.borrow_and_update();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let pipe = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    tokio::select! {
                        _ = pipe => {}
                        _ = cut.changed() => {
                            let how = cut.borrow().1;
                            if how == Cut::ClientSide {
                                // The gateway's side stays open, unread,
                                // until its own heartbeat gives up.
                                drop((cr, cw));
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                drop((sr, sw));
                            }
                        }
                    }
                });
            }
        });
        Self { addr, cuts }
    }

    fn cut(&self, how: Cut) {
        self.cuts.send_modify(|(n, h)| {
            *n += 1;
            *h = how;
        });
    }

    fn url(&self, query: &str) -> String {
        format!("ws://{}/app?{query}", self.addr)
    }
}

/// A native client that keeps its session across cut connections, as an
/// SDK would: it resumes with the last direct message it got, subscribes
/// again to its channels from its own positions, drops duplicates and
/// fails on gaps.
struct Resumer {
    client: String,
    session: String,
    last_seq: u64,
    acked: u64,
    positions: HashMap<String, (String, u64)>,
    directs: Vec<String>,
    messages: Vec<String>,
    resumes: u32,
    next_id: u64,
}

impl Resumer {
    fn new() -> Self {
        Self {
            client: String::new(),
            session: String::new(),
            last_seq: 0,
            acked: 0,
            positions: HashMap::new(),
            directs: Vec::new(),
            messages: Vec::new(),
            resumes: 0,
            next_id: 0,
        }
    }

    async fn open(&mut self, url: &str) -> Option<Ws> {
        let (ws, _) = connect_with(url, &[("Sec-WebSocket-Protocol", "switchboard.v1")])
            .await
            .ok()?;
        Some(ws)
    }

    async fn send(&mut self, ws: &mut Ws, mut cmd: Value) -> bool {
        self.next_id += 1;
        cmd["id"] = json!(self.next_id);
        ws.send(WsMessage::text(cmd.to_string())).await.is_ok()
    }

    /// Handles one frame; `Err` on a broken guarantee.
    async fn on_frame(&mut self, ws: &mut Ws, f: Value) -> Result<(), String> {
        match f["push"].as_str() {
            Some("connected") => {
                if self.session.is_empty() {
                    self.client = f["client"].as_str().unwrap().to_owned();
                    self.session = f["session"].as_str().unwrap().to_owned();
                    self.send(ws, json!({"cmd": "subscribe", "channel": "seq:n"}))
                        .await;
                    return Ok(());
                }
                if f["resumed"] != true || f["client"] != self.client.as_str() {
                    return Err(format!("resume refused: {f}"));
                }
                self.resumes += 1;
                for ch in f["channels"].as_array().cloned().unwrap_or_default() {
                    let name = ch["channel"].as_str().unwrap().to_owned();
                    let (epoch, offset) = self.positions.get(&name).cloned().unwrap_or((
                        ch["epoch"].as_str().unwrap().to_owned(),
                        ch["offset"].as_u64().unwrap(),
                    ));
                    let since = json!({"epoch": epoch, "offset": offset});
                    self.send(
                        ws,
                        json!({"cmd": "subscribe", "channel": name, "since": since}),
                    )
                    .await;
                }
            }
            Some("direct") => {
                let seq = f["seq"].as_u64().ok_or("direct without seq")?;
                if seq <= self.last_seq {
                    return Err(format!("direct {seq} again after {}", self.last_seq));
                }
                if seq != self.last_seq + 1 {
                    return Err(format!("direct {seq} after {}: a gap", self.last_seq));
                }
                self.last_seq = seq;
                self.directs.push(f["text"].as_str().unwrap().to_owned());
                if self.last_seq - self.acked >= 32 {
                    self.acked = self.last_seq;
                    let seq = self.last_seq;
                    self.send(ws, json!({"cmd": "ack", "seq": seq})).await;
                }
            }
            Some("message") => {
                let ch = f["channel"].as_str().unwrap().to_owned();
                let epoch = f["epoch"].as_str().unwrap().to_owned();
                let offset = f["offset"].as_u64().unwrap();
                let pos = self.positions.entry(ch).or_insert((epoch.clone(), 0));
                if pos.0 != epoch || offset != pos.1 + 1 {
                    return Err(format!("message {offset} after {pos:?}: {f}"));
                }
                pos.1 = offset;
                self.messages.push(f["text"].as_str().unwrap().to_owned());
            }
            Some(_) => {}
            None => {
                if f.get("error").is_some() {
                    return Err(format!("command failed: {f}"));
                }
                let r = &f["result"];
                if r.get("recovered").is_some() && r["recovered"] != true {
                    return Err(format!("recovery failed: {f}"));
                }
                if let (Some(epoch), Some(offset)) = (r["epoch"].as_str(), r["offset"].as_u64()) {
                    // A first subscribe: live from here.
                    if r.get("recovered").is_none() {
                        self.positions
                            .insert("seq:n".into(), (epoch.to_owned(), offset));
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs until `done` says so, reconnecting (and resuming) whenever the
    /// connection is cut.
    async fn run(
        &mut self,
        proxy: &Proxy,
        done: impl Fn(&Self) -> bool,
        ready: &watch::Sender<String>,
    ) -> Result<Ws, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let url = if self.session.is_empty() {
                proxy.url("")
            } else {
                proxy.url(&format!(
                    "resume={}&received={}",
                    self.session, self.last_seq
                ))
            };
            let Some(mut ws) = self.open(&url).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            loop {
                if done(self) {
                    return Ok(ws);
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(format!(
                        "not done in 60s: {} directs, {} messages",
                        self.directs.len(),
                        self.messages.len()
                    ));
                }
                let next = tokio::time::timeout(Duration::from_secs(1), ws.next()).await;
                match next {
                    Ok(Some(Ok(WsMessage::Text(t)))) => {
                        let f: Value = serde_json::from_str(&t).unwrap();
                        self.on_frame(&mut ws, f).await?;
                        if !self.client.is_empty() {
                            let _ = ready.send(self.client.clone());
                        }
                    }
                    Ok(Some(Ok(_))) | Err(_) => {}
                    Ok(Some(Err(_)) | None) => break,
                }
            }
        }
    }
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

/// The acceptance test on one node: 1,000 direct messages and
/// 1,000 channel messages while the client's TCP connection is cut a dozen
/// times, half of them only on the client's side (the gateway's socket
/// looks alive: the resume takes the session over from it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_a_dozen_cuts_with_nothing_lost_or_repeated() {
    let origin = TestOrigin::start(None).await;
    let gw = Arc::new(
        TestGateway::with_origin(&origin, |c| {
            c.namespace = namespaces();
            c.ping_interval = Duration::from_millis(500);
            c.pong_timeout = Duration::from_millis(500);
        })
        .await,
    );
    let proxy = Arc::new(Proxy::start(gw.addr).await);
    let (ready_tx, mut ready) = watch::channel(String::new());
    const N: usize = 1000;

    let client = tokio::spawn({
        let proxy = proxy.clone();
        async move {
            let mut r = Resumer::new();
            let ws = r
                .run(
                    &proxy,
                    |r| r.directs.len() == N && r.messages.len() == N,
                    &ready_tx,
                )
                .await;
            (r, ws)
        }
    });
    ready.wait_for(|id| !id.is_empty()).await.unwrap();
    let id = ready.borrow().clone();
    // Subscribed before the first publish.
    tokio::time::timeout(Duration::from_secs(5), async {
        while gw
            .connection(&id)
            .await
            .is_none_or(|c| c.channels.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("subscribed");

    let directs = tokio::spawn({
        let gw = gw.clone();
        let id = id.clone();
        async move {
            let mut statuses = HashMap::<String, usize>::new();
            for i in 0..N {
                let r = gw
                    .post(
                        &format!("/v1/connections/{id}/messages"),
                        &json!({"text": i.to_string()}),
                    )
                    .await;
                assert_eq!(r.status, 200, "direct {i}: {}", r.body);
                *statuses
                    .entry(r.json()["status"].as_str().unwrap().to_owned())
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            statuses
        }
    });
    let publishes = tokio::spawn({
        let gw = gw.clone();
        async move {
            for i in 0..N {
                let r = gw
                    .post(
                        "/v1/channels/seq:n/messages",
                        &json!({"text": i.to_string()}),
                    )
                    .await;
                assert_eq!(r.status, 200, "publish {i}: {}", r.body);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    });
    for i in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        proxy.cut(if i % 2 == 0 {
            Cut::Both
        } else {
            Cut::ClientSide
        });
    }
    let statuses = directs.await.unwrap();
    publishes.await.unwrap();
    let (r, ws) = client.await.unwrap();
    let mut ws = ws.unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(
        r.directs,
        numbered(N),
        "every direct message once, in order"
    );
    assert_eq!(
        r.messages,
        numbered(N),
        "every channel message once, in order"
    );
    assert!(r.resumes >= 10, "resumed {} times", r.resumes);
    assert!(
        statuses.keys().all(|s| s == "delivered" || s == "queued"),
        "{statuses:?}"
    );

    // One lifetime for the origin: one connect, and the disconnect only
    // when the client closes.
    ws.close(None).await.unwrap();
    let gone = origin.wait_disconnect(&r.client).await;
    assert_eq!(gone.closed_by, ClosedBy::Client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connects = origin
        .connects()
        .iter()
        .filter(|c| c.connection_id == r.client)
        .count();
    assert_eq!(connects, 1);
    assert_eq!(origin.disconnects_of(&r.client).len(), 1);
    assert!(
        gw.metric("switchboard_session_resumes_total{result=\"resumed\"}")
            .await
            >= 10.0
    );
}

/// Opens a native connection directly (no proxy); returns it and its
/// `connected` push.
async fn native(gw: &TestGateway, query: &str, headers: &[(&str, &str)]) -> (Ws, Value) {
    let mut all = vec![("Sec-WebSocket-Protocol", "switchboard.v1")];
    all.extend_from_slice(headers);
    let (mut ws, _) = connect_with(&gw.ws_url(&format!("/app?{query}")), &all)
        .await
        .expect("handshake");
    let first = frame(&mut ws).await;
    assert_eq!(first["push"], "connected", "{first}");
    (ws, first)
}

async fn frame(ws: &mut Ws) -> Value {
    match next_msg(ws).await {
        WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Drops a client's TCP connection without a close frame and waits until
/// the gateway holds its session suspended.
async fn lose(gw: &TestGateway, ws: Ws, id: &str) {
    drop(ws);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !gw.connection(id).await.is_some_and(|c| c.suspended) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("suspended");
}

async fn resume(gw: &TestGateway, session: &Value, received: u64) -> (Ws, Value) {
    let token = session["session"].as_str().unwrap();
    native(gw, &format!("resume={token}&received={received}"), &[]).await
}

#[tokio::test]
async fn a_suspended_session_queues_direct_messages_and_keeps_its_channels() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = namespaces();
        c.keepalive_interval = Duration::from_millis(200);
    })
    .await;
    let (mut ws, first) = native(&gw, "", &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    assert_eq!(first["session_ttl_ms"], 120_000);
    ws.send(WsMessage::text(
        json!({"id": 1, "cmd": "subscribe", "channel": "room:a"}).to_string(),
    ))
    .await
    .unwrap();
    let sub = frame(&mut ws).await;
    assert_eq!(sub["id"], 1, "{sub}");
    let (mut watcher, _) = native(&gw, "", &[]).await;
    lose(&gw, ws, &id).await;

    // Direct messages are kept: `queued`, counted in the outbox.
    for text in ["one", "two"] {
        let r = gw
            .post(
                &format!("/v1/connections/{id}/messages"),
                &json!({"text": text}),
            )
            .await;
        assert_eq!(r.json(), json!({"status": "queued"}));
    }
    let batch = gw
        .post(
            "/v1/messages",
            &json!({"messages": [{"connection_ids": [id], "text": "three"}]}),
        )
        .await;
    assert_eq!(batch.json()["results"][0][&id], "queued", "{}", batch.body);
    let info = gw.connection(&id).await.expect("still known");
    assert!(info.suspended);
    assert_eq!(info.outbox_messages, 3);
    assert_eq!(info.channels, ["room:a"]);
    // Still a member of its channel; keepalives list it as suspended.
    let presence = gw.get("/v1/channels/room:a/presence").await.json();
    assert_eq!(presence["clients"], 1);
    origin
        .wait_for(
            Duration::from_secs(5),
            "a keepalive marking it suspended",
            || {
                origin
                    .keepalives()
                    .iter()
                    .any(|k| k.suspended.contains(&id) && k.connection_ids.contains(&id))
                    .then_some(())
            },
        )
        .await;
    assert_eq!(gw.metric("switchboard_sessions_suspended").await, 1.0);
    assert!(origin.disconnects_of(&id).is_empty());
    watcher.close(None).await.unwrap();

    // Resumed after the first: the rest, in order, then the channel again.
    let (mut ws, again) = resume(&gw, &first, 1).await;
    assert_eq!(again["resumed"], true);
    assert_eq!(again["client"], id.as_str());
    let listed = &again["channels"][0];
    assert_eq!(listed["channel"], "room:a");
    assert_eq!(
        frame(&mut ws).await,
        json!({"push": "direct", "seq": 2, "text": "two"})
    );
    assert_eq!(
        frame(&mut ws).await,
        json!({"push": "direct", "seq": 3, "text": "three"})
    );
    // Parked until subscribed again: a publish now is recovered, not lost.
    assert_eq!(
        gw.post(
            "/v1/channels/room:a/messages",
            &json!({"text": "while parked"})
        )
        .await
        .status,
        200
    );
    let since = json!({"epoch": listed["epoch"], "offset": listed["offset"]});
    ws.send(WsMessage::text(
        json!({"id": 2, "cmd": "subscribe", "channel": "room:a", "since": since}).to_string(),
    ))
    .await
    .unwrap();
    // room: keeps no history: recovery says so plainly.
    let reply = frame(&mut ws).await;
    assert_eq!(reply["id"], 2, "{reply}");
    assert_eq!(reply["result"]["recovered"], false, "{reply}");
    assert_eq!(
        gw.post("/v1/channels/room:a/messages", &json!({"text": "live"}))
            .await
            .status,
        200
    );
    assert_eq!(frame(&mut ws).await["text"], "live");
    let info = gw.connection(&id).await.unwrap();
    assert!(!info.suspended);
    assert_eq!(
        info.remote_addr,
        local_addr(&ws).to_string(),
        "the new socket's"
    );
    assert_eq!(gw.metric("switchboard_sessions_suspended").await, 0.0);
    // Acknowledged: nothing kept.
    ws.send(WsMessage::text(
        json!({"id": 3, "cmd": "ack", "seq": 3}).to_string(),
    ))
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while gw.connection(&id).await.unwrap().outbox_messages != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("acknowledged messages are dropped");
    assert_eq!(
        origin.connects().len(),
        2,
        "the resume asked the origin nothing"
    );
}

#[tokio::test]
async fn the_origin_closing_a_suspended_session_ends_it_and_a_resume_is_told() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.namespace = namespaces()).await;
    let (ws, first) = native(&gw, "", &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    lose(&gw, ws, &id).await;
    let r = gw
        .delete(&format!("/v1/connections/{id}?code=4000&reason=bye"))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let gone = origin.wait_disconnect(&id).await;
    assert_eq!((gone.code, gone.closed_by), (4000, ClosedBy::Origin));
    assert!(gw.connection(&id).await.is_none());
    assert_eq!(gw.push_text(&id, "late").await, 404);

    let (_ws, again) = resume(&gw, &first, 0).await;
    assert_eq!(again["resumed"], Value::Null);
    assert_eq!(again["resume_error"]["code"], "session_closed", "{again}");
    assert_ne!(again["client"], id.as_str(), "a new session");
}

#[tokio::test]
async fn an_expired_session_ends_with_one_disconnect_and_refuses_its_resume() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = namespaces();
        c.session_ttl = Duration::from_secs(1);
    })
    .await;
    let (ws, first) = native(&gw, "", &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    lose(&gw, ws, &id).await;
    let gone = origin.wait_disconnect(&id).await;
    assert_eq!(gone.reason, "session expired");
    assert_eq!(gone.closed_by, ClosedBy::Network);
    assert_eq!(
        gw.metric("switchboard_sessions_lost_total{reason=\"expired\"}")
            .await,
        1.0
    );
    let (_ws, again) = resume(&gw, &first, 0).await;
    assert_eq!(again["resume_error"]["code"], "session_expired", "{again}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(origin.disconnects_of(&id).len(), 1);
}

#[tokio::test]
async fn forged_unknown_and_future_resumes_are_refused() {
    let gw = TestGateway::start(|c| c.namespace = namespaces()).await;
    let (ws, first) = native(&gw, "", &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    let token = first["session"].as_str().unwrap().to_owned();
    assert!(token.starts_with(&format!("{id}.")), "{token}");
    lose(&gw, ws, &id).await;

    // Another MAC: not issued here.
    let (mac_at, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{mac_at}.AAAAAAAAAAAAAAAAAAAAAA");
    let (_a, r) = native(&gw, &format!("resume={forged}"), &[]).await;
    assert_eq!(r["resume_error"]["code"], "session_invalid", "{r}");
    let (_b, r) = native(&gw, "resume=nonsense", &[]).await;
    assert_eq!(r["resume_error"]["code"], "session_invalid", "{r}");
    // A session this node never held (another node's id).
    let other = token.replacen(id.split('.').next().unwrap(), "elsewhere", 1);
    let (_c, r) = native(&gw, &format!("resume={other}"), &[]).await;
    assert_eq!(r["resume_error"]["code"], "session_unknown", "{r}");
    // More than was ever sent.
    let (_d, r) = native(&gw, &format!("resume={token}&received=5"), &[]).await;
    assert_eq!(r["resume_error"]["code"], "session_invalid", "{r}");
    // None of that touched the session.
    assert!(gw.connection(&id).await.unwrap().suspended);
    let (_e, r) = native(&gw, &format!("resume={token}&received=0"), &[]).await;
    assert_eq!(r["resumed"], true, "{r}");
    assert_eq!(
        gw.metric("switchboard_session_resumes_total{result=\"session_invalid\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn an_outbox_over_its_bounds_ends_the_session_or_refuses_the_resume() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = namespaces();
        c.session_outbox_messages = 5;
    })
    .await;

    // Suspended: the sixth message does not fit; the session ends.
    let (ws, first) = native(&gw, "", &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    lose(&gw, ws, &id).await;
    for i in 0..5 {
        assert_eq!(gw.push_text(&id, &i.to_string()).await, 200);
    }
    assert_eq!(gw.push_text(&id, "sixth").await, 404);
    let gone = origin.wait_disconnect(&id).await;
    assert_eq!(gone.reason, "session outbox overflow");
    let (_ws, r) = resume(&gw, &first, 0).await;
    assert_eq!(r["resume_error"]["code"], "outbox_overflow", "{r}");
    assert_eq!(
        gw.metric("switchboard_sessions_lost_total{reason=\"outbox_overflow\"}")
            .await,
        1.0
    );

    // Connected but never acknowledging: the oldest are let go (the client
    // has them), and a resume from before them is refused.
    let (mut ws, first) = native(&gw, "", &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    for i in 0..8 {
        assert_eq!(gw.push_text(&id, &i.to_string()).await, 200);
        assert_eq!(frame(&mut ws).await["seq"], i + 1);
    }
    assert_eq!(gw.connection(&id).await.unwrap().outbox_messages, 5);
    assert_eq!(
        gw.metric("switchboard_session_outbox_trimmed_total").await,
        3.0
    );
    lose(&gw, ws, &id).await;
    let (_ws, r) = resume(&gw, &first, 2).await;
    assert_eq!(r["resume_error"]["code"], "outbox_overflow", "{r}");
    origin.wait_disconnect(&id).await;
}

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn token_for(user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn another_users_token_cannot_resume_a_session() {
    let gw = TestGateway::start(|c| {
        c.namespace = namespaces();
        c.jwt_secret = Some(SECRET.into());
    })
    .await;
    let alice = token_for("alice");
    let (ws, first) = native(&gw, &format!("token={alice}"), &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    lose(&gw, ws, &id).await;
    let session = first["session"].as_str().unwrap();

    let mallory = token_for("mallory");
    let (_m, r) = native(&gw, &format!("resume={session}&token={mallory}"), &[]).await;
    assert_eq!(r["resume_error"]["code"], "session_forbidden", "{r}");
    assert_ne!(r["client"], id.as_str());
    // The session's own user, or the resume token alone, may.
    let (_a, r) = native(&gw, &format!("resume={session}&token={alice}"), &[]).await;
    assert_eq!(r["resumed"], true, "{r}");

    // A refused resume without a token is a new connection that owes its
    // `authenticate`; its `connected` then says why the resume failed.
    let url = gw.ws_url("/app?resume=nonsense");
    let (mut ws, _) = connect_with(&url, &[("Sec-WebSocket-Protocol", "switchboard.v1")])
        .await
        .expect("answered 101");
    let auth = json!({"id": 1, "cmd": "authenticate", "token": token_for("bob")});
    ws.send(WsMessage::text(auth.to_string())).await.unwrap();
    let connected = frame(&mut ws).await;
    assert_eq!(connected["push"], "connected", "{connected}");
    assert_eq!(connected["resume_error"]["code"], "session_invalid");
    assert_eq!(frame(&mut ws).await["id"], 1);
}

#[tokio::test]
async fn sessions_can_be_turned_off() {
    let gw = TestGateway::start(|c| {
        c.namespace = namespaces();
        c.session_ttl = Duration::ZERO;
    })
    .await;
    let (mut ws, first) = native(&gw, "", &[]).await;
    assert_eq!(first["session"], Value::Null);
    let id = first["client"].as_str().unwrap().to_owned();
    assert_eq!(gw.push_text(&id, "plain").await, 200);
    assert_eq!(
        frame(&mut ws).await,
        json!({"push": "direct", "text": "plain"})
    );
    drop(ws);
    tokio::time::timeout(Duration::from_secs(5), async {
        while gw.connection(&id).await.is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a lost connection ends at once");
    let (_ws, r) = native(&gw, "resume=x.y&received=0", &[]).await;
    assert_eq!(r["resume_error"]["code"], "sessions_disabled", "{r}");
}

#[tokio::test]
async fn session_events_tell_the_origin_of_suspensions_and_resumes() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = namespaces();
        c.session_events = true;
    })
    .await;
    let (ws, first) = native(&gw, "", &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    lose(&gw, ws, &id).await;
    let (ws, _) = resume(&gw, &first, 0).await;
    let kinds = origin
        .wait_for(Duration::from_secs(5), "suspend and resume events", || {
            let kinds: Vec<&'static str> = origin
                .events()
                .iter()
                .filter_map(|e| match e {
                    Event::Suspend(s) if s.connection_id == id => Some("suspend"),
                    Event::Resume(r) if r.connection_id == id => Some("resume"),
                    _ => None,
                })
                .collect();
            (kinds.len() == 2).then_some(kinds)
        })
        .await;
    assert_eq!(kinds, ["suspend", "resume"]);
    drop(ws);
}

/// A control-API message held behind an origin request's replies is
/// numbered when it goes out, after the replies: sequences follow the
/// order of the wire, so a client that keeps the last one loses nothing.
#[tokio::test]
async fn messages_held_for_replies_are_numbered_in_the_order_they_are_sent() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.namespace = namespaces()).await;
    let (mut ws, first) = native(&gw, "", &[]).await;
    let id = first["client"].as_str().unwrap().to_owned();
    origin.behavior(|b| {
        b.echo = true;
        b.delay = Duration::from_millis(400);
    });
    assert_eq!(gw.push_text(&id, "before").await, 200);
    ws.send(WsMessage::text(
        json!({"id": 1, "cmd": "send", "text": "echo me"}).to_string(),
    ))
    .await
    .unwrap();
    // The `send` is answered at once; its event is now with the origin.
    let mut frames = Vec::new();
    while frames.len() < 2 {
        frames.push(frame(&mut ws).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.push_text(&id, "after").await, 200);
    while frames.len() < 4 {
        frames.push(frame(&mut ws).await);
    }
    let directs: Vec<(u64, String)> = frames
        .iter()
        .filter(|f| f["push"] == "direct")
        .map(|f| {
            (
                f["seq"].as_u64().unwrap(),
                f["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        directs,
        [
            (1, "before".into()),
            (2, "echo me".into()),
            (3, "after".into())
        ],
        "{frames:?}"
    );
}

/// The origin's `connect` answer sets a connection's own ttl
/// (`session_ttl_ms`): shown in `connected`, it is how long the session
/// outlives a lost socket, whatever `--session-ttl` says; 0 gives the
/// connection no session at all.
#[tokio::test]
async fn the_origin_sets_a_sessions_own_ttl() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        c.namespace = namespaces();
        c.session_ttl = Duration::from_secs(600);
    })
    .await;
    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(switchboard_proto::origin::OriginAnswer {
            session_ttl_ms: Some(500),
            ..Default::default()
        })
    });
    let (ws, first) = native(&gw, "", &[]).await;
    assert_eq!(first["session_ttl_ms"], 500, "{first}");
    let id = first["client"].as_str().unwrap().to_owned();
    let lost_at = std::time::Instant::now();
    lose(&gw, ws, &id).await;
    let gone = origin.wait_disconnect(&id).await;
    assert_eq!(gone.reason, "session expired");
    assert!(
        lost_at.elapsed() < Duration::from_secs(10),
        "ended by its own ttl"
    );
    let (_ws, again) = resume(&gw, &first, 0).await;
    assert_eq!(again["resume_error"]["code"], "session_expired", "{again}");

    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(switchboard_proto::origin::OriginAnswer {
            session_ttl_ms: Some(0),
            ..Default::default()
        })
    });
    let (ws, first) = native(&gw, "", &[]).await;
    assert!(first.get("session").is_none(), "no session: {first}");
    let id = first["client"].as_str().unwrap().to_owned();
    drop(ws);
    let gone = origin.wait_disconnect(&id).await;
    assert_eq!(gone.closed_by, ClosedBy::Network, "ended with its socket");
}
