//! The cluster over NATS, end to end: every test runs its own `nats-server`
//! on a free port and real `switchboard` processes on it (three in most
//! tests, one or two in those of NATS's limits; heartbeat 200 ms, heartbeat
//! timeout 1.5 s, request timeout 1 s), with clients spread over all nodes.
//!
//! What it proves:
//! - membership: `GET /v1/nodes` on every node lists every live node, sorted,
//!   with the connections each one holds (and follows changes); heartbeats on
//!   `<prefix>.nodes.heartbeat` carry the same; a single node lists itself;
//!   clusters with different `--nats-prefix` on one NATS server neither see
//!   nor route to each other;
//! - routing: send / info / close / batch on any node act on the owner node
//!   and answer its status and body; unknown ids answer 404 (or `unknown` in
//!   a batch), whether the id's node is alive or not in the cluster; an
//!   owner that is alive but frozen (SIGSTOP) answers 504 `node_timeout`;
//! - the origin over NATS (`--origin nats`): `connect` as a request (accept
//!   with an answer, reject with `Switchboard-Status: 403`, 503 without
//!   responders or without an answer), events published on
//!   `<prefix>.events.<type>` (message, disconnect, keepalive), control
//!   commands on `<prefix>.control` and `<prefix>.node.<id>.control`; with
//!   `--nats-event-stream`, a durable consumer that stops and resumes gets
//!   every event in order, `node_down` included;
//! - losing NATS: local commands keep working, cross-node ones answer 503
//!   `cluster_unavailable` at once (and are not delivered), and everything
//!   recovers by itself when NATS is back, without any node reported dead;
//! - losing a node (SIGKILL): dropped from the membership within the
//!   heartbeat timeout, its connections answer 404 at once, its clients can
//!   reconnect elsewhere, and exactly one `node_down` reaches the origin
//!   (deduplicated in the JetStream KV bucket, and from the lowest live id
//!   without JetStream); a SIGTERM'd node says `leaving` and is not reported;
//!   a node restarted under the same id gets its previous run reported at
//!   once; a node cut off from NATS (alive) is reported once and, back,
//!   closes its clients with 1012 before serving again;
//! - NATS's limits and stray replies: a JetStream stream capturing
//!   `<prefix>.events.>`, `connect` included, answers connect requests with
//!   its PubAck, which never passes for an acceptance (503
//!   `origin_unavailable` without an origin); a client message whose event
//!   is over NATS's `max_payload` (1 MiB; `--max-message-size 2000000`) is
//!   dropped, not retried forever: the next message reaches the origin at
//!   once and a SIGTERM drains and exits 0 within 3 s; a forwarded command
//!   over `max_payload` answers 413 `payload_too_large` and is not
//!   delivered; a batch to 9,000 (and 40,000: over `max_payload` in one
//!   request) ids of one node is split, every id gets its result and the
//!   one real connection gets the message exactly once.
//! - sessions: a suspended native session answers `queued` and its info
//!   through any node; a resume landing on another node takes the session
//!   there with everything kept, and commands through the node its id names
//!   follow it, as do the origin's replies; the holder's refusal (an
//!   expired session) is the resume's refusal, and a session nobody holds
//!   is `session_unknown` (more in `cluster_sessions.rs`).
//! - HTTP fallbacks: a long-poll session's polls, commands and end land on
//!   either node (no sticky sessions) and are forwarded to the node holding
//!   it; every direct message arrives once and in order, and a poll waiting
//!   on the other node spans several forwarded polls.
//!
//! Every wait is bounded; the only fixed waits are the few that prove an
//! absence (no duplicate or spurious `node_down`).

mod common;

use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;
use bytes::Bytes;
use common::{
    command, expect_dead, nats_connect, node_of, poll, refusal, start_node, start_three,
    wait_member_ids, wait_members, Bus, CutProxy, Node, FORM, HEARTBEAT_TIMEOUT, QUICK, SLACK,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use switchboard_proto::origin::{
    ClosedBy, ConnectEvent, Event, EventBatch, MessageEvent, NodeDownEvent, Payload,
};
use switchboard_test_util::nats::NatsServer;
use switchboard_test_util::{
    connect, connect_with, expect_close, local_addr, next_msg, TestOrigin, Ws, WsMessage,
};
use tokio_tungstenite::tungstenite;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Nodes `a` and `b` of cluster `prefix` with the HTTP `origin`, once they
/// see each other.
async fn start_pair(nats: &NatsServer, origin: &TestOrigin, prefix: &str) -> (Node, Node) {
    let url = origin.url();
    let extra = ["--origin", url.as_str()];
    let nats_url = nats.url();
    let (a, b) = tokio::join!(
        start_node("a", &nats_url, prefix, &extra),
        start_node("b", &nats_url, prefix, &extra),
    );
    wait_member_ids(&[&a, &b], &["a", "b"], FORM).await;
    (a, b)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A well-formed id on `node` that no connection has.
fn unknown_on(node: &str) -> String {
    format!("{node}.AAAAAAAAAAAAAAAAAAAAAA")
}

/// Connects a client to `node` and learns its id from the HTTP test origin.
async fn client(node: &Node, origin: &TestOrigin, path: &str) -> (Ws, String) {
    let ws = connect(&node.ws_url(path)).await;
    let id = origin.id_for(local_addr(&ws)).await;
    assert_eq!(
        node_of(&id),
        node.node,
        "id {id} of a client of {}",
        node.node
    );
    (ws, id)
}

/// The `node_down` events the HTTP test origin accepted.
fn node_downs(origin: &TestOrigin) -> Vec<NodeDownEvent> {
    origin
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::NodeDown(n) => Some(n),
            _ => None,
        })
        .collect()
}

/// Sends a text message through `node`'s control API to `id`, asserts the
/// answer is 200 delivered and that `ws` receives it.
async fn push_and_receive(node: &Node, id: &str, ws: &mut Ws, text: &str) {
    let r = node.push_text(id, text).await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"status": "delivered"})),
        "POST /v1/connections/{id}/messages on node {}: {}",
        node.node,
        r.body
    );
    assert_eq!(next_msg(ws).await, WsMessage::text(text), "on {id}");
}

/// Asserts a control API answer is `404 connection_not_found`.
fn assert_not_found(r: &switchboard_test_util::ApiResponse, what: &str) {
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "connection_not_found"),
        "{what}: {}",
        r.body
    );
}

// ---------------------------------------------------------------------------
// The origin over NATS, written with async-nats
// ---------------------------------------------------------------------------

/// A test origin on NATS: it answers `<prefix>.events.connect` requests
/// (path `/reject`: `Switchboard-Status: 403` and `{"reason":"nope"}`;
/// path `/silent`: no answer; otherwise accepted as user `ann` with a
/// `welcome` message) and, if asked,
/// records every event published on `<prefix>.events.>` with its subject.
/// What it could not make sense of is kept in `errors` and reported by
/// the waits (a panic in its tasks would go unseen).
#[derive(Clone, Default)]
struct NatsOrigin {
    connects: Arc<Mutex<Vec<ConnectEvent>>>,
    published: Arc<Mutex<Vec<(String, Event)>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl NatsOrigin {
    async fn start(client: &async_nats::Client, prefix: &str, record_events: bool) -> Self {
        let me = Self::default();
        let connect_subject = format!("{prefix}.events.connect");
        let mut requests = client
            .subscribe(connect_subject.clone())
            .await
            .expect("subscribe to connect requests");
        let (nc, state) = (client.clone(), me.clone());
        tokio::spawn(async move {
            while let Some(msg) = requests.next().await {
                let fail = |e: String| state.errors.lock().unwrap().push(e);
                let Some(reply) = msg.reply.clone() else {
                    fail(format!("connect request without a reply subject: {msg:?}"));
                    continue;
                };
                let ev = match serde_json::from_slice::<EventBatch>(&msg.payload) {
                    Ok(b) => match b.events.as_slice() {
                        [Event::Connect(ev)] => ev.clone(),
                        _ => {
                            fail(format!("connect request with other events: {b:?}"));
                            continue;
                        }
                    },
                    Err(e) => {
                        fail(format!(
                            "connect request is not an event batch ({e}): {:?}",
                            String::from_utf8_lossy(&msg.payload)
                        ));
                        continue;
                    }
                };
                state.connects.lock().unwrap().push(ev.clone());
                let sent = match ev.path.as_str() {
                    "/silent" => continue,
                    "/reject" => {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Switchboard-Status", "403");
                        nc.publish_with_headers(
                            reply,
                            headers,
                            Bytes::from_static(br#"{"reason":"nope"}"#),
                        )
                        .await
                    }
                    _ => {
                        nc.publish(
                            reply,
                            Bytes::from_static(
                                br#"{"user_id":"ann","messages":[{"text":"welcome"}]}"#,
                            ),
                        )
                        .await
                    }
                };
                if let Err(e) = sent {
                    fail(format!("answer to {ev:?} not sent: {e}"));
                }
                let _ = nc.flush().await;
            }
        });
        if record_events {
            let mut events = client
                .subscribe(format!("{prefix}.events.>"))
                .await
                .expect("subscribe to events");
            let state = me.clone();
            tokio::spawn(async move {
                while let Some(msg) = events.next().await {
                    let subject = msg.subject.to_string();
                    if subject == connect_subject {
                        continue;
                    }
                    let sender = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Switchboard-Node"))
                        .map(|v| v.as_str().to_owned());
                    match serde_json::from_slice::<EventBatch>(&msg.payload) {
                        Ok(batch) => {
                            // Each message names the node that sent it.
                            if let Some(e) = batch
                                .events
                                .iter()
                                .find(|e| sender.as_deref() != Some(event_node(e)))
                            {
                                state.errors.lock().unwrap().push(format!(
                                    "{subject}: header Switchboard-Node {sender:?} for {e:?}"
                                ));
                            }
                            state
                                .published
                                .lock()
                                .unwrap()
                                .extend(batch.events.into_iter().map(|e| (subject.clone(), e)));
                        }
                        Err(e) => state.errors.lock().unwrap().push(format!(
                            "{subject}: not an event batch ({e}): {:?}",
                            String::from_utf8_lossy(&msg.payload)
                        )),
                    }
                }
            });
        }
        // A round trip on the same connection: once its message comes
        // back, the server has taken the subscriptions above (it reads a
        // connection's operations in order). A flush only writes them, and
        // on a loaded machine a gateway's request could still find no
        // responders.
        let inbox = client.new_inbox();
        let mut echo = client
            .subscribe(inbox.clone())
            .await
            .expect("subscribe to an inbox");
        client
            .publish(inbox, Bytes::new())
            .await
            .expect("publish to the inbox");
        client.flush().await.expect("flush subscriptions");
        tokio::time::timeout(Duration::from_secs(10), echo.next())
            .await
            .expect("the server echoes within 10 s")
            .expect("the inbox subscription stays open");
        me
    }

    /// Panics with what the origin could not make sense of, if anything.
    fn check_errors(&self) {
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "the NATS test origin saw: {errors:#?}");
    }

    /// The connection id of a client, from its `connect` request.
    async fn id_for(&self, ws: &Ws) -> String {
        let addr = local_addr(ws).to_string();
        poll(
            Duration::from_secs(5),
            &format!("connect request from {addr}"),
            || async {
                self.check_errors();
                let c = self.connects.lock().unwrap();
                c.iter()
                    .find(|c| c.remote_addr == addr)
                    .map(|c| c.connection_id.clone())
                    .ok_or_else(|| format!("{} connect requests", c.len()))
            },
        )
        .await
    }

    /// Waits until `check` finds what it wants in the published events.
    async fn wait_events<T>(
        &self,
        what: &str,
        check: impl Fn(&[(String, Event)]) -> Option<T>,
    ) -> T {
        poll(Duration::from_secs(5), what, || async {
            self.check_errors();
            let p = self.published.lock().unwrap().clone();
            check(&p).ok_or_else(|| format!("{p:#?}"))
        })
        .await
    }
}

/// Connects a client to `node` through the NATS origin: accepted, it gets
/// the origin's `welcome` first; returns it with its id.
async fn nats_client(node: &Node, origin: &NatsOrigin, path: &str) -> (Ws, String) {
    let mut ws = connect(&node.ws_url(path)).await;
    let id = origin.id_for(&ws).await;
    assert_eq!(
        node_of(&id),
        node.node,
        "id {id} of a client of {}",
        node.node
    );
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("welcome"));
    (ws, id)
}

/// Pulls from `consumer` (acknowledging each message) until `done` holds
/// for everything pulled so far, or panics after 10 s.
async fn consume_until(
    consumer: &PullConsumer,
    got: &mut Vec<(String, Event)>,
    done: impl Fn(&[(String, Event)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(got) {
        assert!(
            Instant::now() < deadline,
            "the durable consumer did not deliver what was expected within 10s; got {got:#?}"
        );
        let mut batch = consumer
            .batch()
            .max_messages(100)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .expect("pull request");
        while let Some(msg) = batch.next().await {
            let msg = msg.expect("pulled message");
            let events: EventBatch = serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
                panic!(
                    "{}: not an event batch ({e}): {:?}",
                    msg.subject,
                    String::from_utf8_lossy(&msg.payload)
                )
            });
            // Deduplicated by JetStream on the first event's id.
            let msg_id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned());
            let first_id = match events.events.first() {
                Some(Event::Message(m)) => Some(m.id.clone()),
                Some(Event::Disconnect(d)) => Some(d.id.clone()),
                Some(Event::Keepalive(k)) => Some(k.id.clone()),
                Some(Event::NodeDown(n)) => Some(n.id.clone()),
                Some(other) => panic!("unexpected event in the stream: {other:?}"),
                None => None,
            };
            assert_eq!(msg_id, first_id, "Nats-Msg-Id of {}", msg.subject);
            got.extend(
                events
                    .events
                    .into_iter()
                    .map(|e| (msg.subject.to_string(), e)),
            );
            msg.double_ack().await.expect("ack");
        }
    }
}

/// The `node` of an event: the node that sent it.
fn event_node(e: &Event) -> &str {
    match e {
        Event::Connect(e) => &e.node,
        Event::Message(e) => &e.node,
        Event::Disconnect(e) => &e.node,
        Event::Keepalive(e) => &e.node,
        Event::NodeDown(e) => &e.node,
        _ => "<an event type this test does not know>",
    }
}

/// The message events of `id` among `events`, once each (by event id).
fn messages_of(events: &[(String, Event)], id: &str) -> Vec<MessageEvent> {
    let mut out: Vec<MessageEvent> = Vec::new();
    for (_, e) in events {
        if let Event::Message(m) = e {
            if m.connection_id == id && !out.iter().any(|o| o.id == m.id) {
                out.push(m.clone());
            }
        }
    }
    out
}

fn texts(messages: &[MessageEvent]) -> Vec<String> {
    messages
        .iter()
        .map(|m| match &m.payload {
            Payload::Text(t) => t.clone(),
            Payload::Binary(b) => format!("<binary {b:?}>"),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Membership
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_lists_live_nodes_with_their_connections_and_prefixes_isolate_clusters() {
    let nats = NatsServer::start(false);
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let extra = ["--origin", url.as_str()];
    let nats_url = nats.url();
    let ((a, b, c), x, y) = tokio::join!(
        start_three(&nats_url, "sbt.one", &extra),
        start_node("x", &nats_url, "sbt.two", &extra),
        start_node("y", &nats_url, "sbt.two", &extra),
    );

    // 1 client on a, 2 on b, 3 on c; 1 on x of the other cluster.
    let mut clients = Vec::new();
    for (node, n) in [(&a, 1), (&b, 2), (&c, 3), (&x, 1)] {
        for _ in 0..n {
            clients.push(client(node, &origin, "/members").await);
        }
    }
    wait_members(&[&a, &b, &c], &[("a", 1), ("b", 2), ("c", 3)], FORM).await;
    wait_members(&[&x, &y], &[("x", 1), ("y", 0)], FORM).await;

    // The shape of the answer.
    for node in [&a, &b, &c] {
        let r = node.get("/v1/nodes").await;
        let now = now_ms();
        for n in r.json()["nodes"].as_array().unwrap() {
            let name = n["node"].as_str().unwrap();
            assert_eq!(n["self"], json!(name == node.node), "on {}: {n}", node.node);
            assert_eq!(n["draining"], json!(false), "{n}");
            let started = n["started_at_ms"].as_u64().expect("started_at_ms");
            let seen = n["last_seen_ms"].as_u64().expect("last_seen_ms");
            assert!(started > 0 && started <= now, "{n}");
            assert!(
                seen <= now + 100 && now - seen.min(now) < 3000,
                "last_seen_ms of a live node is recent: {n} (now {now})"
            );
        }
    }

    // The heartbeats on `sbt.one.nodes.heartbeat`: only this cluster's
    // nodes, with what /v1/nodes shows.
    let listed = a.get("/v1/nodes").await.json();
    let nc = nats_connect(&nats_url).await;
    let mut beats = nc
        .subscribe("sbt.one.nodes.heartbeat")
        .await
        .expect("subscribe to heartbeats");
    let mut last = std::collections::BTreeMap::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while last.len() < 3 {
            let m = beats.next().await.expect("subscription open");
            let hb: Value = serde_json::from_slice(&m.payload)
                .unwrap_or_else(|e| panic!("heartbeat is not JSON ({e}): {:?}", m.payload));
            let name = hb["node"].as_str().unwrap_or_default().to_owned();
            assert!(["a", "b", "c"].contains(&name.as_str()), "{hb}");
            last.insert(name, hb);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no heartbeat from every node within 5s: {last:?}"));
    for (name, hb) in &last {
        let want = [("a", 1), ("b", 2), ("c", 3)]
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1;
        assert_eq!(hb["connections"], json!(want), "{hb}");
        assert_eq!(
            (&hb["draining"], &hb["leaving"]),
            (&json!(false), &json!(false)),
            "{hb}"
        );
        let instance = hb["instance"].as_str().unwrap_or_default();
        assert!(
            !instance.is_empty() && instance.bytes().all(|b| b.is_ascii_hexdigit()),
            "{hb}"
        );
        let in_list = listed["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == json!(name))
            .unwrap();
        assert_eq!(
            hb["started_at_ms"], in_list["started_at_ms"],
            "{hb} vs {in_list}"
        );
    }

    // Counts follow the connections: one of c's clients leaves.
    let (mut ws, id) = clients.remove(3);
    assert_eq!(node_of(&id), "c");
    ws.close(None).await.unwrap();
    origin.wait_disconnect(&id).await;
    wait_members(&[&a, &b, &c], &[("a", 1), ("b", 2), ("c", 2)], FORM).await;

    // No routing across prefixes either: x's cluster has no node `a`, and
    // a's cluster no node `x`.
    let id_on_a = clients[0].1.clone();
    let id_on_x = clients.last().unwrap().1.clone();
    assert_eq!(
        (node_of(&id_on_a), node_of(&id_on_x)),
        ("a".into(), "x".into())
    );
    for (node, id) in [(&x, &id_on_a), (&y, &id_on_a), (&b, &id_on_x)] {
        let t = Instant::now();
        let r = node.push_text(id, "across clusters").await;
        assert_not_found(&r, &format!("send from {} to {id}", node.node));
        assert!(t.elapsed() < QUICK, "took {:?}", t.elapsed());
    }
    // What a's client receives next is a's own message, not the above.
    push_and_receive(&a, &id_on_a, &mut clients[0].0, "same cluster").await;

    // A single node (no --nats) lists itself only.
    let solo = Node::start(
        &[
            "--node-id",
            "solo",
            "--listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    let r = solo.get("/v1/nodes").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let nodes = r.json()["nodes"].clone();
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    assert_eq!(
        (
            &nodes[0]["node"],
            &nodes[0]["self"],
            &nodes[0]["connections"]
        ),
        (&json!("solo"), &json!(true), &json!(0)),
        "{nodes}"
    );
}

// ---------------------------------------------------------------------------
// 2. Routing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_any_node_act_on_the_owner_node() {
    commands_act_on_the_owner_node(Bus::nats(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_any_node_act_on_the_owner_node_over_redis() {
    commands_act_on_the_owner_node(Bus::redis()).await;
}

async fn commands_act_on_the_owner_node(bus: Bus) {
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    // A long heartbeat timeout: a node paused for a few seconds stays a member.
    let (a, b, c) = start_three(
        &bus.url(),
        "route",
        &["--origin", &url, "--cluster-heartbeat-timeout", "5s"],
    )
    .await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    let (mut wa, ida) = client(&a, &origin, "/on-a").await;
    let (mut wb, idb) = client(&b, &origin, "/on-b").await;
    let (mut wc, idc) = client(&c, &origin, "/on-c").await;

    // Send from a to b's and c's clients, and from c to a's.
    push_and_receive(&a, &idb, &mut wb, "a to b").await;
    push_and_receive(&a, &idc, &mut wc, "a to c").await;
    push_and_receive(&c, &ida, &mut wa, "c to a").await;

    // Info from a is the owner's answer.
    for (id, owner, path) in [(&idb, &b, "/on-b"), (&idc, &c, "/on-c")] {
        let r = a.get(&format!("/v1/connections/{id}")).await;
        assert_eq!(r.status, 200, "GET {id} on a: {}", r.body);
        let info = r.json();
        assert_eq!(info["id"], json!(id), "{info}");
        assert_eq!(info["node"], json!(owner.node), "{info}");
        assert_eq!(info["path"], json!(path), "{info}");
        assert_eq!(info["messages_out"], json!(1), "{info}");
        let direct = owner.get(&format!("/v1/connections/{id}")).await.json();
        for field in ["remote_addr", "connected_at", "user_id", "metadata"] {
            assert_eq!(info[field], direct[field], "{field}: {info} vs {direct}");
        }
    }

    // Unknown ids: on a live other node, and on a node not in the cluster.
    for id in [unknown_on("b"), unknown_on("zz")] {
        let t = Instant::now();
        assert_not_found(&a.push_text(&id, "x").await, &format!("send to {id}"));
        assert_not_found(
            &a.get(&format!("/v1/connections/{id}")).await,
            &format!("info of {id}"),
        );
        assert_not_found(
            &a.delete(&format!("/v1/connections/{id}")).await,
            &format!("close of {id}"),
        );
        assert!(t.elapsed() < 3 * QUICK, "3 commands took {:?}", t.elapsed());
    }

    // A batch from a over all three nodes, with unknown ids: merged results.
    let (unknown_b, ghost) = (unknown_on("b"), unknown_on("zz"));
    let r = a
        .post(
            "/v1/messages",
            &json!({"messages": [
                {"connection_ids": [ida, idb, idc, unknown_b, ghost], "text": "to all"},
                {"connection_ids": [idc, idb], "binary": "AAEC"},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut first = serde_json::Map::new();
    for id in [&ida, &idb, &idc] {
        first.insert(id.clone(), json!("delivered"));
    }
    first.insert(unknown_b.clone(), json!("unknown"));
    first.insert(ghost.clone(), json!("unknown"));
    let mut second = serde_json::Map::new();
    second.insert(idc.clone(), json!("delivered"));
    second.insert(idb.clone(), json!("delivered"));
    assert_eq!(
        r.json(),
        json!({"results": [first, second]}),
        "batch results"
    );
    assert_eq!(next_msg(&mut wa).await, WsMessage::text("to all"));
    for ws in [&mut wb, &mut wc] {
        assert_eq!(next_msg(ws).await, WsMessage::text("to all"));
        assert_eq!(next_msg(ws).await, WsMessage::binary(vec![0u8, 1, 2]));
    }

    // An owner that is alive but does not answer: 504 node_timeout after
    // the request timeout (1 s).
    c.freeze().await;
    let t = Instant::now();
    let r = a.push_text(&idc, "while c is paused").await;
    let took = t.elapsed();
    c.thaw();
    assert_eq!(
        (r.status, r.code().as_str()),
        (504, "node_timeout"),
        "send to a paused node's connection: {}",
        r.body
    );
    assert!(
        took >= Duration::from_millis(900) && took < QUICK,
        "answered after {took:?}"
    );
    // Once resumed it serves again (the late message may or may not have
    // been delivered: the client may see it first).
    let r = a.push_text(&idc, "c resumed").await;
    assert_eq!(r.status, 200, "{}", r.body);
    match next_msg(&mut wc).await {
        m if m == WsMessage::text("c resumed") => {}
        m if m == WsMessage::text("while c is paused") => {
            assert_eq!(next_msg(&mut wc).await, WsMessage::text("c resumed"));
        }
        m => panic!("unexpected message on c's client: {m:?}"),
    }

    // Close from another node: a closes b's client, b closes c's.
    for (node, id, ws, code) in [(&a, &idb, &mut wb, 4000), (&b, &idc, &mut wc, 4001)] {
        let r = node
            .delete(&format!("/v1/connections/{id}?code={code}&reason=bye"))
            .await;
        assert_eq!(
            (r.status, r.json()),
            (202, json!({"status": "closing"})),
            "DELETE {id} on {}: {}",
            node.node,
            r.body
        );
        let (got, reason, _) = expect_close(ws).await;
        assert_eq!((got, reason.as_str()), (code, "bye"));
        let d = origin.wait_disconnect(id).await;
        assert_eq!((d.closed_by, d.code), (ClosedBy::Origin, code), "{d:?}");
        // Gone: now a 404 from any node.
        assert_not_found(&c.push_text(id, "late").await, "send to a closed id");
    }
    push_and_receive(&b, &ida, &mut wa, "still routed").await;
}

// ---------------------------------------------------------------------------
// 3. The origin over NATS
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_over_nats_connects_events_and_control_commands() {
    let nats = NatsServer::start(false);
    let (a, b, c) = start_three(
        &nats.url(),
        "sbnats",
        &[
            "--origin",
            "nats",
            "--origin-timeout",
            "1s",
            "--keepalive-interval",
            "1s",
        ],
    )
    .await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;

    // No origin listening yet: no responders, the handshake gets 503.
    let t = Instant::now();
    let body = refusal(&a.ws_url("/early"), 503, "accepted without an origin").await;
    assert!(body.contains("origin_unavailable"), "{body}");
    assert!(t.elapsed() < QUICK, "refused after {:?}", t.elapsed());

    let nc = nats_connect(&nats.url()).await;
    let origin = NatsOrigin::start(&nc, "sbnats", true).await;

    // Rejected: the status and reason of the origin's reply.
    let body = refusal(&b.ws_url("/reject"), 403, "a rejected client was accepted").await;
    assert!(
        body.contains("rejected_by_origin") && body.contains("nope"),
        "{body}"
    );

    // No answer within --origin-timeout (1 s): 503 as well.
    let t = Instant::now();
    let body = refusal(&c.ws_url("/silent"), 503, "accepted without an answer").await;
    assert!(body.contains("origin_unavailable"), "{body}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "refused after {took:?} with --origin-timeout 1s"
    );

    // Accepted on every node, with the origin's answer applied.
    let (mut wa, ida) = nats_client(&a, &origin, "/n").await;
    let (mut wb, idb) = nats_client(&b, &origin, "/n").await;
    let (mut wc, idc) = nats_client(&c, &origin, "/n").await;

    // Client messages are published as `message` events.
    for (ws, name) in [(&mut wa, "a"), (&mut wb, "b"), (&mut wc, "c")] {
        ws.send(WsMessage::text(format!("hello from {name}")))
            .await
            .unwrap();
    }
    origin
        .wait_events("a message event from each client", |evs| {
            [&ida, &idb, &idc]
                .iter()
                .all(|id| !messages_of(evs, id).is_empty())
                .then_some(())
        })
        .await;
    for (id, name) in [(&ida, "a"), (&idb, "b"), (&idc, "c")] {
        let p = origin.published.lock().unwrap().clone();
        let m = messages_of(&p, id);
        assert_eq!(texts(&m), [format!("hello from {name}")]);
        assert_eq!(
            (m[0].seq, m[0].user_id.as_deref(), m[0].node.as_str()),
            (1, Some("ann"), name)
        );
    }

    // Control commands on `sbnats.control`: whichever node answers, the
    // owner acts (two rounds over three nodes: some are forwarded).
    for round in 0..2 {
        for (ws, id) in [(&mut wa, &ida), (&mut wb, &idb), (&mut wc, &idc)] {
            let text = format!("control {round}");
            let (status, body) = command(
                &nc,
                "sbnats.control",
                json!({"op": "send", "connection_id": id, "text": text}),
            )
            .await;
            assert_eq!((status, body), (200, json!({"status": "delivered"})));
            assert_eq!(next_msg(ws).await, WsMessage::text(text));
        }
    }
    let (status, info) = command(
        &nc,
        "sbnats.control",
        json!({"op": "info", "connection_id": idc}),
    )
    .await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        (&info["id"], &info["node"], &info["user_id"]),
        (&json!(idc), &json!("c"), &json!("ann")),
        "{info}"
    );
    for node in [&a, &b, &c] {
        let subject = format!("sbnats.node.{}.control", node.node);
        let (status, stats) = command(&nc, &subject, json!({"op": "stats"})).await;
        assert_eq!(status, 200, "{stats}");
        assert_eq!(
            stats["node"],
            json!(node.node),
            "stats on {subject}: {stats}"
        );
        assert_eq!(stats["connections"], json!(1), "{stats}");
    }
    let (status, nodes) = command(&nc, "sbnats.control", json!({"op": "nodes"})).await;
    assert_eq!(status, 200, "{nodes}");
    let names: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("{nodes}"))
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(names, ["a", "b", "c"], "{nodes}");
    let (status, err) = command(
        &nc,
        "sbnats.control",
        json!({"op": "send", "connection_id": unknown_on("b"), "text": "x"}),
    )
    .await;
    assert_eq!(
        (status, &err["code"]),
        (404, &json!("connection_not_found")),
        "{err}"
    );

    // An unreadable command.
    let (status, err) = command(&nc, "sbnats.control", json!({"op": "explode"})).await;
    assert_eq!(
        (status, &err["code"]),
        (400, &json!("invalid_body")),
        "{err}"
    );

    let unknown_b = unknown_on("b");
    let (status, results) = command(
        &nc,
        "sbnats.control",
        json!({"op": "send_batch", "messages": [
            {"connection_ids": [ida, idb, idc, unknown_b], "text": "batch"}
        ]}),
    )
    .await;
    let mut want = serde_json::Map::new();
    for id in [&ida, &idb, &idc] {
        want.insert(id.clone(), json!("delivered"));
    }
    want.insert(unknown_b, json!("unknown"));
    assert_eq!((status, results), (200, json!({"results": [want]})));
    for ws in [&mut wa, &mut wb, &mut wc] {
        assert_eq!(next_msg(ws).await, WsMessage::text("batch"));
    }

    // Close through NATS; the disconnect is published.
    let (status, body) = command(
        &nc,
        "sbnats.control",
        json!({"op": "close", "connection_id": idb, "code": 4000, "reason": "bye"}),
    )
    .await;
    assert_eq!((status, body), (202, json!({"status": "closing"})));
    let (code, reason, _) = expect_close(&mut wb).await;
    assert_eq!((code, reason.as_str()), (4000, "bye"));
    // And a client close.
    wa.close(None).await.unwrap();
    let ds = origin
        .wait_events("the disconnects of a and b", |evs| {
            let ds: Vec<_> = evs
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::Disconnect(d) if d.connection_id == ida || d.connection_id == idb => {
                        Some(d.clone())
                    }
                    _ => None,
                })
                .collect();
            (ds.len() >= 2).then_some(ds)
        })
        .await;
    assert_eq!(ds.len(), 2, "one disconnect each: {ds:#?}");
    for d in ds {
        let want = if d.connection_id == idb {
            (ClosedBy::Origin, 4000)
        } else {
            (ClosedBy::Client, 1005)
        };
        assert_eq!((d.closed_by, d.code), want, "{d:?}");
        assert_eq!(d.user_id.as_deref(), Some("ann"));
    }

    // Keepalives list each node's live connections (c's client is the
    // only one left, on c).
    origin
        .wait_events("a keepalive of c listing its client", |evs| {
            evs.iter()
                .any(|(_, e)| {
                    matches!(e, Event::Keepalive(k) if k.node == "c" && k.connection_ids == [idc.clone()])
                })
                .then_some(())
        })
        .await;

    // Every event came on the subject of its type.
    origin.check_errors();
    for (subject, event) in origin.published.lock().unwrap().iter() {
        assert_eq!(
            subject,
            &format!("sbnats.events.{}", event.kind()),
            "{event:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_over_nats_with_a_stream_delivers_to_a_durable_consumer() {
    let nats = NatsServer::start(true);
    let nc = nats_connect(&nats.url()).await;
    let origin = NatsOrigin::start(&nc, "dur", false).await;
    let (a, b, c) = start_three(
        &nats.url(),
        "dur",
        &["--origin", "nats", "--nats-event-stream", "EVENTS"],
    )
    .await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    let mut clients = vec![
        nats_client(&a, &origin, "/d").await,
        nats_client(&b, &origin, "/d").await,
        nats_client(&c, &origin, "/d").await,
    ];
    for (ws, _) in &mut clients {
        ws.send(WsMessage::text("m1")).await.unwrap();
    }
    let ids: Vec<String> = clients.iter().map(|(_, id)| id.clone()).collect();

    // The stream exists, over the event subjects but not `connect`.
    let js = jetstream::new(nc.clone());
    let mut stream = poll(FORM, "stream EVENTS", || async {
        js.get_stream("EVENTS").await.map_err(|e| e.to_string())
    })
    .await;
    let subjects = stream
        .info()
        .await
        .expect("stream info")
        .config
        .subjects
        .clone();
    for kind in ["message", "disconnect", "keepalive", "node_down"] {
        let s = format!("dur.events.{kind}");
        assert!(subjects.contains(&s), "{s} not in {subjects:?}");
    }
    for s in ["dur.events.connect", "dur.events.>", "dur.events.*", ">"] {
        assert!(!subjects.iter().any(|x| x == s), "{s} in {subjects:?}");
    }

    // A durable consumer reads the first messages, on its own connection.
    let reader = nats_connect(&nats.url()).await;
    let consumer: PullConsumer = jetstream::new(reader.clone())
        .create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                durable_name: Some("origin".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
            "EVENTS",
        )
        .await
        .expect("create the durable consumer");
    let mut before = Vec::new();
    consume_until(&consumer, &mut before, |got| {
        ids.iter().all(|id| texts(&messages_of(got, id)) == ["m1"])
    })
    .await;
    // Stop consuming: the reader goes away.
    drop(consumer);
    reader.flush().await.unwrap();
    drop(reader);

    // Meanwhile clients go on, and a's client leaves.
    for (ws, _) in &mut clients {
        for n in 2..=6 {
            ws.send(WsMessage::text(format!("m{n}"))).await.unwrap();
        }
    }
    clients[0].0.close(None).await.unwrap();
    // Stored while nobody consumes.
    poll(
        Duration::from_secs(5),
        "events pending for the durable",
        || async {
            let info = stream
                .consumer_info("origin")
                .await
                .map_err(|e| e.to_string())?;
            (info.num_pending > 0)
                .then_some(())
                .ok_or_else(|| format!("{info:?}"))
        },
    )
    .await;

    // Resumed on a new connection: everything, in order, nothing twice.
    let reader = nats_connect(&nats.url()).await;
    let consumer: PullConsumer = jetstream::new(reader.clone())
        .get_stream("EVENTS")
        .await
        .expect("stream")
        .get_consumer("origin")
        .await
        .expect("resume the durable consumer");
    let mut after = Vec::new();
    let want: Vec<String> = (2..=6).map(|n| format!("m{n}")).collect();
    consume_until(&consumer, &mut after, |got| {
        ids.iter()
            .all(|id| messages_of(got, id).len() >= want.len())
            && got
                .iter()
                .any(|(_, e)| matches!(e, Event::Disconnect(d) if d.connection_id == ids[0]))
    })
    .await;
    for id in &ids {
        let m = messages_of(&after, id);
        let raw = after
            .iter()
            .filter(|(_, e)| matches!(e, Event::Message(m) if m.connection_id == *id))
            .count();
        assert_eq!(raw, m.len(), "{id}: some events came twice: {after:#?}");
        assert_eq!(texts(&m), want, "{id} after resuming");
        let seqs: Vec<u64> = m.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [2, 3, 4, 5, 6], "{id}");
    }
    for (subject, event) in &after {
        assert_eq!(
            subject,
            &format!("dur.events.{}", event.kind()),
            "{event:?}"
        );
    }
    // a's disconnect comes after all its messages.
    let pos_disconnect = after
        .iter()
        .position(|(_, e)| matches!(e, Event::Disconnect(d) if d.connection_id == ids[0]))
        .unwrap();
    let last_message = after
        .iter()
        .rposition(|(_, e)| matches!(e, Event::Message(m) if m.connection_id == ids[0]))
        .unwrap();
    assert!(last_message < pos_disconnect, "{after:#?}");

    // A node lost: its node_down goes through the stream too, once.
    let mut c = c;
    c.kill9().await;
    let mut downs = Vec::new();
    consume_until(&consumer, &mut downs, |got| {
        got.iter().any(|(_, e)| matches!(e, Event::NodeDown(_)))
    })
    .await;
    // Any duplicate would come within the same heartbeat timeout.
    let first = Instant::now();
    consume_until(&consumer, &mut downs, |_| {
        first.elapsed() >= HEARTBEAT_TIMEOUT
    })
    .await;
    let downs: Vec<(&String, &NodeDownEvent)> = downs
        .iter()
        .filter_map(|(s, e)| match e {
            Event::NodeDown(d) => Some((s, d)),
            _ => None,
        })
        .collect();
    assert_eq!(downs.len(), 1, "{downs:#?}");
    assert_eq!(downs[0].0, "dur.events.node_down");
    assert_eq!(downs[0].1.down_node, "c", "{downs:#?}");
    assert!(["a", "b"].contains(&downs[0].1.node.as_str()), "{downs:#?}");
    drop((a, b));
}

// ---------------------------------------------------------------------------
// 4. NATS restart
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_local_commands_keep_working_and_the_cluster_recovers() {
    restart_local_commands_keep_working_and_the_cluster_recovers(Bus::nats(false)).await;
}

/// The same with Redis killed and started again (empty: nothing a node
/// needs is lost with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_local_commands_keep_working_and_the_cluster_recovers() {
    restart_local_commands_keep_working_and_the_cluster_recovers(Bus::redis()).await;
}

async fn restart_local_commands_keep_working_and_the_cluster_recovers(mut nats: Bus) {
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let (mut a, mut b, mut c) = start_three(&nats.url(), "restart", &["--origin", &url]).await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    let (mut wa1, ida1) = client(&a, &origin, "/a1").await;
    let (mut wa2, ida2) = client(&a, &origin, "/a2").await;
    let (mut wb, idb) = client(&b, &origin, "/b").await;
    let (mut wc, idc) = client(&c, &origin, "/c").await;
    push_and_receive(&a, &idb, &mut wb, "before").await;

    nats.kill();
    let killed = Instant::now();

    // Cross-node: 503 cluster_unavailable, quickly. (Every attempt is
    // recorded: one answered 503 must never be delivered.)
    let attempts = Mutex::new(Vec::<(String, u16, Duration)>::new());
    poll(
        QUICK,
        "503 cluster_unavailable for a cross-node send",
        || async {
            let text = format!("outage {}", attempts.lock().unwrap().len() + 1);
            let t = Instant::now();
            let r = a.push_text(&idb, &text).await;
            let took = t.elapsed();
            attempts.lock().unwrap().push((text, r.status, took));
            assert!(
                took < QUICK,
                "a cross-node send without NATS took {took:?}: {} {}",
                r.status,
                r.body
            );
            if r.status == 503 && r.code() == "cluster_unavailable" {
                Ok(())
            } else {
                Err(format!("{} {}", r.status, r.body))
            }
        },
    )
    .await;
    let attempts = attempts.into_inner().unwrap();
    // Every node has noticed by now (or does within its NATS ping): its
    // commands for the others are refused at once, never left to time out.
    for node in [&mut a, &mut b, &mut c] {
        if nats.is_redis() {
            wait_said(
                node,
                "Redis unreachable; serving local clients and still trying",
            )
            .await;
        } else {
            wait_nats_lost(node).await;
        }
    }
    for (node, method, path) in [
        (&a, reqwest::Method::GET, format!("/v1/connections/{idc}")),
        (
            &c,
            reqwest::Method::DELETE,
            format!("/v1/connections/{ida1}"),
        ),
        (
            &b,
            reqwest::Method::POST,
            format!("/v1/connections/{idc}/messages"),
        ),
    ] {
        let t = Instant::now();
        let body = json!({"text": "during the outage"});
        let r = node
            .call(
                method.clone(),
                &path,
                (method == reqwest::Method::POST).then_some(&body),
            )
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (503, "cluster_unavailable"),
            "{method} {path} on {}: {}",
            node.node,
            r.body
        );
        assert!(t.elapsed() < QUICK, "took {:?}", t.elapsed());
    }
    // A batch: local ids delivered, the others unknown.
    let r = a
        .post(
            "/v1/messages",
            &json!({"messages": [{"connection_ids": [ida1, idb], "text": "batch"}]}),
        )
        .await;
    // (Or, once a's lease has run out, 503 node_cut_off: see below.)
    if r.code() != "node_cut_off" {
        let mut want = serde_json::Map::new();
        want.insert(ida1.clone(), json!("delivered"));
        want.insert(idb.clone(), json!("unknown"));
        assert_eq!(
            (r.status, r.json()),
            (200, json!({"results": [want]})),
            "{}",
            r.body
        );
        assert_eq!(next_msg(&mut wa1).await, WsMessage::text("batch"));
    }

    // Local sends work while a node's lease runs (half a heartbeat timeout
    // after its last heartbeat came back), then answer 503 node_cut_off:
    // a node cannot tell an outage of NATS from being cut off alone, when
    // the others may report it lost (docs/cluster.md#fencing).
    let mut n = 0;
    let mut cut_off = [false, false];
    while killed.elapsed() < HEARTBEAT_TIMEOUT + Duration::from_secs(1) {
        n += 1;
        for (i, (node, id, ws)) in [(&a, &ida2, &mut wa2), (&c, &idc, &mut wc)]
            .into_iter()
            .enumerate()
        {
            let text = format!("local {n}");
            let r = node.push_text(id, &text).await;
            if r.status == 200 {
                assert!(!cut_off[i], "delivered after node_cut_off on {}", node.node);
                assert_eq!(next_msg(ws).await, WsMessage::text(&text), "on {id}");
            } else {
                assert_eq!(
                    (r.status, r.code().as_str()),
                    (503, "node_cut_off"),
                    "{}",
                    r.body
                );
                cut_off[i] = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        cut_off,
        [true, true],
        "leases still held a timeout into the outage"
    );

    // NATS comes back on the same port; the nodes reconnect by themselves
    // and every cross-node route works again (15 s at most).
    nats.restart();
    let restarted = Instant::now();
    let recover = Duration::from_secs(15);
    // b's client may get late sends that were not refused (504: the
    // outcome is unknown), never one refused with 503.
    let late: Vec<String> = attempts
        .iter()
        .filter(|(_, status, _)| *status != 503)
        .map(|(text, _, _)| text.clone())
        .collect();
    send_until_delivered(&a, &idb, &mut wb, restarted + recover, &late, &attempts).await;
    send_until_delivered(&c, &ida1, &mut wa1, restarted + recover, &[], &attempts).await;
    send_until_delivered(&b, &idc, &mut wc, restarted + recover, &[], &attempts).await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    // Not reported (nobody judges while NATS is away): the leases are
    // renewed, local sends work again, and no client was closed.
    push_and_receive(&a, &ida2, &mut wa2, "local again").await;
    push_and_receive(&c, &idc, &mut wc, "local again").await;

    // Nobody was declared dead because NATS was away: give a false report
    // a heartbeat timeout (and some) to show up.
    tokio::time::sleep(HEARTBEAT_TIMEOUT + Duration::from_millis(500)).await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], Duration::ZERO).await;
    assert_eq!(node_downs(&origin), [], "no node_down after a NATS outage");
}

/// Sends from `node` to `id` (texts `back 1`, `back 2`, ...) until one is
/// accepted, or panics at `deadline`; then checks `ws` receives it, with
/// nothing before it but earlier attempts and the `late` texts.
async fn send_until_delivered(
    node: &Node,
    id: &str,
    ws: &mut Ws,
    deadline: Instant,
    late: &[String],
    outage: &[(String, u16, Duration)],
) {
    let mut attempt = 0;
    let text = loop {
        attempt += 1;
        let text = format!("back {attempt}");
        let r = node.push_text(id, &text).await;
        if r.status == 200 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "a send from {} to {id} still fails after NATS restarted: {} {}",
            node.node,
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        match next_msg(ws).await {
            m if m == WsMessage::text(text.as_str()) => break,
            WsMessage::Text(t) if t.starts_with("back ") => continue,
            WsMessage::Text(t) if late.iter().any(|l| *l == t.as_str()) => continue,
            m => panic!(
                "unexpected message on the client of {id}: {m:?}; \
                 sends during the outage (text, status, time): {outage:?}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Lost nodes
// ---------------------------------------------------------------------------

/// Kills node `victim` of a three-node cluster with SIGKILL, checks what the
/// others and the clients see and the one `node_down`, then stops another
/// node with SIGTERM and checks it is not reported.
async fn killed_node_is_reported_once(bus: Bus, prefix: &str, victim: &str) {
    let jetstream = matches!(&bus, Bus::Nats(_)) && prefix.ends_with(".js");
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let (a, b, c) = start_three(&bus.url(), prefix, &["--origin", &url]).await;
    let mut nodes = vec![a, b, c];
    {
        let all: Vec<&Node> = nodes.iter().collect();
        wait_member_ids(&all, &["a", "b", "c"], FORM).await;
    }
    // One client per node, two on the victim.
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(client(node, &origin, "/k").await);
        if node.node == victim {
            clients.push(client(node, &origin, "/k2").await);
        }
    }
    let counts: Vec<(&str, u64)> = ["a", "b", "c"]
        .into_iter()
        .map(|n| (n, if n == victim { 2 } else { 1 }))
        .collect();
    {
        let all: Vec<&Node> = nodes.iter().collect();
        wait_members(&all, &counts, FORM).await;
    }

    let vi = nodes.iter().position(|n| n.node == victim).unwrap();
    let mut dead = nodes.remove(vi);
    let victim_ids: Vec<String> = clients
        .iter()
        .map(|(_, id)| id.clone())
        .filter(|id| node_of(id) == victim)
        .collect();
    let mut victim_clients: Vec<Ws> = Vec::new();
    let mut live_clients: Vec<(Ws, String)> = Vec::new();
    for (ws, id) in clients {
        if node_of(&id) == victim {
            victim_clients.push(ws);
        } else {
            live_clients.push((ws, id));
        }
    }
    let survivors: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    let kill_ms = now_ms();
    dead.kill9().await;
    let killed = Instant::now();

    // Its connections answer 404 at once, on every survivor.
    for node in &nodes {
        let id = &victim_ids[0];
        let t = Instant::now();
        assert_not_found(
            &node.push_text(id, "to the dead").await,
            &format!("send on {} to {id} of the killed node", node.node),
        );
        assert_not_found(
            &node.get(&format!("/v1/connections/{id}")).await,
            "info of a connection of the killed node",
        );
        assert_not_found(
            &node.delete(&format!("/v1/connections/{id}")).await,
            "close of a connection of the killed node",
        );
        assert!(
            t.elapsed() < QUICK,
            "three commands for the killed node's connection took {:?} on {}",
            t.elapsed(),
            node.node
        );
        let r = node
            .post(
                "/v1/messages",
                &json!({"messages": [{"connection_ids": victim_ids, "text": "x"}]}),
            )
            .await;
        let want: serde_json::Map<String, Value> = victim_ids
            .iter()
            .map(|id| (id.clone(), json!("unknown")))
            .collect();
        assert_eq!((r.status, r.json()), (200, json!({"results": [want]})));
    }

    // Its clients see their socket die, and reconnect to a live node.
    for ws in &mut victim_clients {
        expect_dead(ws, QUICK).await;
    }
    let (mut again, again_id) = client(&nodes[0], &origin, "/again").await;
    push_and_receive(&nodes[1], &again_id, &mut again, "welcome back").await;

    // The survivors drop it within the heartbeat timeout.
    let survivor_refs: Vec<&Node> = nodes.iter().collect();
    wait_member_ids(
        &survivor_refs,
        &survivors,
        (HEARTBEAT_TIMEOUT + SLACK).saturating_sub(killed.elapsed()),
    )
    .await;

    // Exactly one node_down, from a survivor.
    origin
        .wait_events(HEARTBEAT_TIMEOUT + SLACK + QUICK, |evs| {
            evs.iter().any(|e| matches!(e, Event::NodeDown(_)))
        })
        .await;
    tokio::time::sleep(2 * HEARTBEAT_TIMEOUT).await;
    let downs = node_downs(&origin);
    assert_eq!(downs.len(), 1, "exactly one node_down: {downs:#?}");
    let down = &downs[0];
    assert_eq!(down.down_node, victim, "{down:?}");
    assert!(survivors.contains(&down.node.as_str()), "{down:?}");
    assert!(!down.id.is_empty(), "{down:?}");
    if !jetstream && !bus.is_redis() {
        assert_eq!(
            down.node, survivors[0],
            "without JetStream the lowest live node id reports: {down:?}"
        );
    }
    assert!(
        down.last_seen_ms <= kill_ms + 100 && down.last_seen_ms + 1500 >= kill_ms,
        "last_seen_ms {} vs killed at {kill_ms}",
        down.last_seen_ms
    );
    assert!(
        down.timestamp_ms + 100 >= down.last_seen_ms + HEARTBEAT_TIMEOUT.as_millis() as u64,
        "reported before the heartbeat timeout: {down:?}"
    );
    if jetstream {
        // Deduplicated through the KV bucket `<prefix, . as _>_cluster`.
        let bucket = format!("{}_cluster", prefix.replace('.', "_"));
        let nc = nats_connect(&bus.url()).await;
        let kv = jetstream::new(nc)
            .get_key_value(&bucket)
            .await
            .unwrap_or_else(|e| panic!("KV bucket {bucket}: {e}"));
        let keys: Vec<String> = kv
            .keys()
            .await
            .expect("list keys")
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        let marker = format!("down.{victim}.");
        assert_eq!(
            keys.iter().filter(|k| k.starts_with(&marker)).count(),
            1,
            "keys of {bucket}: {keys:?}"
        );
    }

    // A graceful stop: removed, and never reported.
    let mut leaving = nodes.pop().unwrap();
    let (mut leaving_ws, _) = live_clients
        .iter()
        .position(|(_, id)| node_of(id) == leaving.node)
        .map(|i| live_clients.remove(i))
        .unwrap();
    if let Bus::Redis(redis) = &bus {
        // The report key `{<prefix>}:down:<node>:<instance>` of the victim,
        // and nobody else's.
        let keys = redis.command(&["KEYS", &format!("{{{prefix}}}:down:*")]);
        assert_eq!(
            keys.matches(":down:").count(),
            1,
            "one report key, the victim's: {keys}"
        );
        assert!(keys.contains(&format!(":down:{victim}:")), "{keys}");
        leaving.term();
        let (code, _, _) = expect_close(&mut leaving_ws).await;
        assert_eq!(code, 1012);
        let status = leaving.wait().await;
        assert_eq!(status.code(), Some(0), "log:\n{}", leaving.log());
        // Its key's last heartbeat says it is leaving.
        let beat = redis.command(&["GET", &format!("{{{prefix}}}:node:{}", leaving.node)]);
        assert!(beat.contains(r#""leaving":true"#), "{beat}");
        let last = &nodes[0];
        wait_member_ids(&[last], &[last.node.as_str()], HEARTBEAT_TIMEOUT + SLACK).await;
        tokio::time::sleep(2 * HEARTBEAT_TIMEOUT).await;
        let downs = node_downs(&origin);
        assert_eq!(
            downs.len(),
            1,
            "a SIGTERM'd node is not reported: {downs:#?}"
        );
        return;
    }
    let nc = nats_connect(&bus.url()).await;
    let mut beats = nc
        .subscribe(format!("{prefix}.nodes.heartbeat"))
        .await
        .expect("subscribe to heartbeats");
    nc.flush().await.unwrap();
    leaving.term();
    let (code, _, _) = expect_close(&mut leaving_ws).await;
    assert_eq!(code, 1012);
    let status = leaving.wait().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", leaving.log());
    let stopped = Instant::now();
    // Its last heartbeat says it is leaving.
    // (Read until it is seen, then 200 ms more for any later one.)
    let mut its_beats: Vec<Value> = Vec::new();
    let mut until = Instant::now() + QUICK;
    while let Ok(Some(m)) = tokio::time::timeout(
        until.saturating_duration_since(Instant::now()),
        beats.next(),
    )
    .await
    {
        let hb: Value = serde_json::from_slice(&m.payload).expect("heartbeat JSON");
        if hb["node"] == json!(leaving.node) {
            if hb["leaving"] == json!(true) && its_beats.iter().all(|b| b["leaving"] != json!(true))
            {
                until = Instant::now() + Duration::from_millis(200);
            }
            its_beats.push(hb);
        }
    }
    assert_eq!(
        its_beats.last().map(|hb| &hb["leaving"]),
        Some(&json!(true)),
        "heartbeats of {} from the SIGTERM on: {its_beats:?}",
        leaving.node
    );
    let last = &nodes[0];
    wait_member_ids(&[last], &[last.node.as_str()], HEARTBEAT_TIMEOUT + SLACK).await;
    let left_after = stopped.elapsed();
    tokio::time::sleep((2 * HEARTBEAT_TIMEOUT).saturating_sub(left_after)).await;
    let downs = node_downs(&origin);
    assert_eq!(
        downs.len(),
        1,
        "a SIGTERM'd node ({}) must not be reported: {downs:#?}",
        leaving.node
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_dropped_and_reported_once_with_jetstream() {
    killed_node_is_reported_once(Bus::nats(true), "lost.js", "c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_dropped_and_reported_once_by_the_lowest_node_without_jetstream() {
    killed_node_is_reported_once(Bus::nats(false), "lost", "a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_dropped_and_reported_once_over_redis() {
    killed_node_is_reported_once(Bus::redis(), "lost-redis", "b").await;
}

/// A node killed and started again under the same id at once: its new
/// heartbeat carries a new `instance`, and the previous run is reported
/// right away (before the heartbeat timeout), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_under_the_same_id_gets_its_previous_run_reported_at_once() {
    let nats = NatsServer::start(true);
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let (a, b, mut c) = start_three(&nats.url(), "rerun", &["--origin", &url]).await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    let (mut wc, idc) = client(&c, &origin, "/old-run").await;
    wait_members(&[&a, &b], &[("a", 0), ("b", 0), ("c", 1)], FORM).await;

    c.kill9().await;
    let c = start_node("c", &nats.url(), "rerun", &["--origin", &url]).await;
    origin
        .wait_events(HEARTBEAT_TIMEOUT + SLACK, |evs| {
            evs.iter().any(|e| matches!(e, Event::NodeDown(_)))
        })
        .await;
    let downs = node_downs(&origin);
    assert_eq!(downs[0].down_node, "c", "{downs:#?}");
    assert!(
        downs[0].timestamp_ms < downs[0].last_seen_ms + HEARTBEAT_TIMEOUT.as_millis() as u64,
        "reported only after the heartbeat timeout, not at the new run's first heartbeat: {downs:#?}"
    );
    expect_dead(&mut wc, QUICK).await;

    // The new run is a member and serves; the old run's ids are gone.
    wait_members(&[&a, &b, &c], &[("a", 0), ("b", 0), ("c", 0)], FORM).await;
    let (mut wn, idn) = client(&c, &origin, "/new-run").await;
    push_and_receive(&a, &idn, &mut wn, "to the new run").await;
    assert_not_found(&b.push_text(&idc, "to the old run").await, "old run's id");

    // Once.
    tokio::time::sleep(HEARTBEAT_TIMEOUT + Duration::from_millis(500)).await;
    let downs = node_downs(&origin);
    assert_eq!(downs.len(), 1, "{downs:#?}");
}

/// A node cut off from NATS (alive, serving its own clients) for longer
/// than the heartbeat timeout is reported lost once; when it reconnects it
/// finds the report and fences itself: it closes its clients with 1012
/// without `disconnect` events (the origin retired them with `node_down`),
/// then serves again as a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_is_reported_once_and_fences_itself_on_return() {
    let nats = NatsServer::start(true);
    let proxy = CutProxy::start(([127, 0, 0, 1], nats.port()).into()).await;
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let extra = ["--origin", url.as_str()];
    let nats_url = nats.url();
    let proxy_url = proxy.url();
    let (a, b, c) = tokio::join!(
        start_node("a", &nats_url, "fence", &extra),
        start_node("b", &nats_url, "fence", &extra),
        start_node("c", &proxy_url, "fence", &extra),
    );
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    let (mut wa, ida) = client(&a, &origin, "/a").await;
    let (mut wc1, idc1) = client(&c, &origin, "/c1").await;
    let (mut wc2, idc2) = client(&c, &origin, "/c2").await;
    push_and_receive(&a, &idc1, &mut wc1, "before the cut").await;

    proxy.set_cut(true);
    let cut = Instant::now();
    // c still serves its own clients, and (once it noticed) answers 503 at
    // once for the others'.
    push_and_receive(&c, &idc2, &mut wc2, "local while cut off").await;
    let attempts = Mutex::new(Vec::<(String, u16, Duration)>::new());
    poll(
        QUICK,
        "503 cluster_unavailable from the cut-off node",
        || async {
            let text = format!("cut {}", attempts.lock().unwrap().len() + 1);
            let t = Instant::now();
            let r = c.push_text(&ida, &text).await;
            let took = t.elapsed();
            attempts.lock().unwrap().push((text, r.status, took));
            assert!(took < QUICK, "took {took:?}: {}", r.body);
            if (r.status, r.code().as_str()) == (503, "cluster_unavailable") {
                Ok(())
            } else {
                Err(format!("{} {}", r.status, r.body))
            }
        },
    )
    .await;
    let attempts = attempts.into_inner().unwrap();
    // Sends not refused (a 504 before c noticed) may arrive late.
    let late: Vec<String> = attempts
        .iter()
        .filter(|(_, status, _)| *status != 503)
        .map(|(text, _, _)| text.clone())
        .collect();
    // The others drop it and report it, once.
    wait_member_ids(&[&a, &b], &["a", "b"], HEARTBEAT_TIMEOUT + SLACK).await;
    origin
        .wait_events(QUICK, |evs| {
            evs.iter().any(|e| matches!(e, Event::NodeDown(_)))
        })
        .await;
    assert_not_found(&a.push_text(&idc1, "x").await, "send to a dropped node");
    // Keep it cut a little longer than the timeout in all.
    tokio::time::sleep(
        (HEARTBEAT_TIMEOUT + Duration::from_millis(500)).saturating_sub(cut.elapsed()),
    )
    .await;

    proxy.set_cut(false);
    // Back: it closes the clients it was reported with.
    for (ws, id) in [(&mut wc1, &idc1), (&mut wc2, &idc2)] {
        let (code, _, _) = tokio::time::timeout(Duration::from_secs(8), expect_close(ws))
            .await
            .unwrap_or_else(|_| panic!("{id} not closed within 8s of NATS coming back"));
        assert_eq!(code, 1012, "{id}");
    }
    // And is a member serving again, once the fence is over (until then it
    // refuses clients with 503 node_cut_off).
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    let fence_over = Instant::now() + Duration::from_secs(8);
    let mut wn = loop {
        match connect_with(&c.ws_url("/c-again"), &[]).await {
            Ok((ws, _)) => break ws,
            Err(tungstenite::Error::Http(resp)) if Instant::now() < fence_over => {
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                    .into_owned();
                assert_eq!(resp.status(), 503, "{body}");
                assert!(body.contains("node_cut_off"), "{body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("client of c after the fence: {e}"),
        }
    };
    let idn = origin.id_for(local_addr(&wn)).await;
    push_and_receive(&a, &idn, &mut wn, "welcome back").await;
    send_until_delivered(&c, &ida, &mut wa, Instant::now() + QUICK, &late, &attempts).await;

    tokio::time::sleep(HEARTBEAT_TIMEOUT + Duration::from_millis(500)).await;
    let downs = node_downs(&origin);
    assert_eq!(downs.len(), 1, "{downs:#?}");
    assert_eq!(downs[0].down_node, "c", "{downs:#?}");
    for id in [&idc1, &idc2] {
        assert!(
            origin.disconnects_of(id).is_empty(),
            "a disconnect followed node_down for {id}: {:?}; events: {:#?}",
            origin.disconnects_of(id),
            origin.events()
        );
    }
}

// ---------------------------------------------------------------------------
// 6. NATS limits and stray replies
// ---------------------------------------------------------------------------

/// Waits (10 s at most) until `node` has logged `message` (or had).
async fn wait_said(node: &mut Node, message: &str) {
    let said = |l: &String| serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"] == message);
    if !node.seen.iter().any(said) {
        node.wait_log(message).await;
    }
}

/// Waits (10 s at most) until `node` has logged that it lost NATS.
async fn wait_nats_lost(node: &mut Node) {
    let said = |l: &String| {
        serde_json::from_str::<Value>(l)
            .is_ok_and(|v| v["message"] == "lost the NATS connection; reconnecting")
    };
    if !node.seen.iter().any(said) {
        node.wait_log("lost the NATS connection; reconnecting")
            .await;
    }
}

/// Waits (10 s at most) until `node` has logged its connection to NATS
/// (a node serves before that; a lone node has no membership to wait for).
async fn wait_nats_connected(node: &mut Node) {
    let said = |l: &String| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"] == "connected to NATS")
    };
    if !node.seen.iter().any(said) {
        node.wait_log("connected to NATS").await;
    }
}

/// Connects a client to `node` at `path` and asserts its handshake is
/// refused with 503 `origin_unavailable`, within [`QUICK`].
async fn expect_origin_unavailable(node: &Node, path: &str) {
    let t = Instant::now();
    let accepted = format!("client of {} at {path} accepted", node.node);
    let body = refusal(&node.ws_url(path), 503, &accepted).await;
    assert!(body.contains("origin_unavailable"), "{body}");
    assert!(t.elapsed() < QUICK, "refused after {:?}", t.elapsed());
}

/// A JetStream stream capturing `<prefix>.events.>`, `connect` included,
/// answers each connect request with its PubAck; with no origin listening,
/// that reply must not pass for an acceptance: the client gets 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_capturing_connect_requests_does_not_accept_clients() {
    let nats = NatsServer::start(true);
    let nc = nats_connect(&nats.url()).await;
    let stream = jetstream::new(nc)
        .create_stream(jetstream::stream::Config {
            name: "CATCHALL".into(),
            subjects: vec!["cap.events.>".into()],
            ..Default::default()
        })
        .await
        .expect("create the stream");
    let mut a = start_node("a", &nats.url(), "cap", &["--origin", "nats"]).await;
    wait_nats_connected(&mut a).await;

    expect_origin_unavailable(&a, "/captured").await;
    // It was the stream that answered (it holds the request), and the node
    // saw its PubAck for what it is.
    let stored = stream
        .get_last_raw_message_by_subject("cap.events.connect")
        .await
        .expect("the connect request is in the stream");
    let batch: EventBatch = serde_json::from_slice(&stored.payload).expect("an event batch");
    assert!(
        matches!(batch.events.as_slice(), [Event::Connect(c)] if c.path == "/captured"),
        "{batch:?}"
    );
    let failed = a.wait_log("connect event failed").await;
    assert!(
        failed.to_string().contains("JetStream stream answered"),
        "{failed}"
    );
}

/// With `--max-message-size` over NATS's `max_payload` (1 MiB), a client
/// message too large to publish is dropped, not retried forever: the next
/// message still reaches the origin at once, and a SIGTERM drains quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_nats_max_payload_is_dropped_and_later_events_flow() {
    let nats = NatsServer::start(false);
    let nc = nats_connect(&nats.url()).await;
    let origin = NatsOrigin::start(&nc, "big", true).await;
    let mut a = start_node(
        "a",
        &nats.url(),
        "big",
        &["--origin", "nats", "--max-message-size", "2000000"],
    )
    .await;
    wait_nats_connected(&mut a).await;
    let (mut ws, id) = nats_client(&a, &origin, "/big").await;

    ws.send(WsMessage::text("x".repeat(1_200_000)))
        .await
        .unwrap();
    ws.send(WsMessage::text("after")).await.unwrap();
    let sent = Instant::now();
    let got = origin
        .wait_events("the message after the oversize one", |evs| {
            let m = messages_of(evs, &id);
            m.iter()
                .any(|m| matches!(&m.payload, Payload::Text(t) if t == "after"))
                .then_some(m)
        })
        .await;
    assert!(sent.elapsed() < QUICK, "arrived after {:?}", sent.elapsed());
    assert_eq!(texts(&got), ["after"]);
    assert_eq!(got[0].seq, 2, "{:?}", got[0]);
    a.wait_log("event larger than NATS max_payload; dropped")
        .await;

    // Nothing left stuck: the drain ends at once, with a clean exit and the
    // client's disconnect published.
    let t = Instant::now();
    a.term();
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1012);
    let status = a.wait().await;
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", a.log());
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM"
    );
    origin
        .wait_events("the disconnect of the client", |evs| {
            evs.iter()
                .any(|(_, e)| matches!(e, Event::Disconnect(d) if d.connection_id == id))
                .then_some(())
        })
        .await;
}

/// A forwarded command larger than NATS's `max_payload` answers 413
/// `payload_too_large` (not 503), and is not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_command_over_nats_max_payload_answers_413() {
    let nats = NatsServer::start(false);
    let origin = TestOrigin::start(None).await;
    let (a, b) = start_pair(&nats, &origin, "huge").await;
    let (mut wb, idb) = client(&b, &origin, "/b").await;
    let big = "x".repeat(1_200_000);

    // The control API takes the body: a local unknown id is a plain 404.
    assert_not_found(&a.push_text(&unknown_on("a"), &big).await, "local");
    let t = Instant::now();
    let r = a.push_text(&idb, &big).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (413, "payload_too_large"),
        "{}",
        r.body
    );
    assert!(t.elapsed() < QUICK, "answered after {:?}", t.elapsed());
    // Not delivered; the route still works.
    push_and_receive(&a, &idb, &mut wb, "small").await;
}

/// A batch to 9,000 ids of one other node goes in several requests (at
/// most 8,192 ids each): every id gets its result, the real one is
/// delivered once. So does one to 40,000 ids, whose ids alone are over
/// NATS's `max_payload` (1 MiB) for a single request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_to_one_node_is_split_and_delivered_once() {
    let nats = NatsServer::start(false);
    let origin = TestOrigin::start(None).await;
    let (a, b) = start_pair(&nats, &origin, "split").await;
    let (mut wb, idb) = client(&b, &origin, "/b").await;

    for total in [9_000, 40_000] {
        // Well-formed unknown ids of b (22 base64url characters), the real
        // id last: in the last request.
        let mut ids: Vec<String> = (0..total - 1).map(|k| format!("b.{k:021}A")).collect();
        assert_eq!(node_of(&ids[total - 2]), "b");
        ids.push(idb.clone());
        let text = format!("to {total}");
        let t = Instant::now();
        let r = a
            .post(
                "/v1/messages",
                &json!({"messages": [{"connection_ids": ids, "text": text}]}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        // (40,000 ids take about 1 s in a debug build on 2 busy cores.)
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "{total} ids answered after {:?}",
            t.elapsed()
        );
        let got = r.json();
        let results = got["results"][0].as_object().cloned().unwrap_or_default();
        let (mut unknown, mut other) = (0, Vec::new());
        for (id, status) in &results {
            match status.as_str() {
                Some("delivered") if *id == idb => {}
                Some("unknown") if *id != idb => unknown += 1,
                _ => other.push((id.clone(), status.clone())),
            }
        }
        assert!(
            got["results"].as_array().map(Vec::len) == Some(1)
                && results.len() == total
                && unknown == total - 1
                && other.is_empty(),
            "{total} ids: {} results, {unknown} unknown, unexpected: {other:?}",
            results.len()
        );
        // Exactly once: the next message is the one sent after it.
        assert_eq!(next_msg(&mut wb).await, WsMessage::text(text));
        push_and_receive(&a, &idb, &mut wb, &format!("after {total}")).await;
    }
}

/// `subscribe-to-origin` over NATS: a native client's subscribe is a request
/// on `<prefix>.events.subscribe`; the origin's `Switchboard-Status: 403`
/// reaches the client as `rejected` with its reason, a 2xx subscribes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_is_decided_by_the_origin_over_nats() {
    let nats = NatsServer::start(true); // channels in a cluster need JetStream
    let nc = nats_connect(&nats.url()).await;
    let _origin = NatsOrigin::start(&nc, "sub", false).await;
    let mut requests = nc
        .subscribe("sub.events.subscribe")
        .await
        .expect("subscribe to subscribe requests");
    let responder = nc.clone();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let batch: EventBatch = serde_json::from_slice(&msg.payload).expect("a batch");
            let [Event::Subscribe(ev)] = batch.events.as_slice() else {
                panic!("a subscribe request holds one subscribe event: {batch:?}");
            };
            seen.lock().unwrap().push(ev.channel.clone());
            let mut headers = async_nats::HeaderMap::new();
            let body = if ev.channel.contains("secret") {
                headers.insert("Switchboard-Status", "403");
                Bytes::from(format!(r#"{{"reason":"no access to {}"}}"#, ev.channel))
            } else {
                Bytes::new()
            };
            let _ = responder.publish_with_headers(reply, headers, body).await;
            let _ = responder.flush().await;
        }
    });
    let mut a = start_node(
        "a",
        &nats.url(),
        "sub",
        &[
            "--origin",
            "nats",
            "--namespace",
            "team:subscribe-to-origin",
        ],
    )
    .await;
    wait_nats_connected(&mut a).await;
    let (mut ws, _) = connect_with(
        &a.ws_url("/native"),
        &[("Sec-WebSocket-Protocol", "switchboard.v1")],
    )
    .await
    .expect("a native client connects");

    let ok = subscribe_reply(&mut ws, 1, "team:open").await;
    assert!(ok["result"].is_object(), "{ok}");
    let refused = subscribe_reply(&mut ws, 2, "team:secret").await;
    assert_eq!(refused["error"]["code"], "rejected", "{refused}");
    assert_eq!(refused["error"]["message"], "no access to team:secret");
    assert_eq!(*asked.lock().unwrap(), ["team:open", "team:secret"]);
}

/// Sends a native `subscribe` and returns its reply (pushes are skipped).
async fn subscribe_reply(ws: &mut Ws, id: u64, channel: &str) -> Value {
    let cmd = json!({"id": id, "cmd": "subscribe", "channel": channel}).to_string();
    ws.send(WsMessage::text(cmd)).await.expect("send");
    loop {
        let WsMessage::Text(t) = next_msg(ws).await else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).expect("JSON");
        if v["id"] == json!(id) {
            return v;
        }
    }
}

/// A native client's first frame, as JSON.
async fn native_first(url: &str) -> (Ws, Value) {
    let (mut ws, _) = connect_with(url, &[("Sec-WebSocket-Protocol", "switchboard.v1")])
        .await
        .expect("native handshake");
    let first = match next_msg(&mut ws).await {
        WsMessage::Text(t) => serde_json::from_str::<Value>(&t).expect("JSON"),
        other => panic!("expected connected, got {other:?}"),
    };
    assert_eq!(first["push"], "connected", "{first}");
    (ws, first)
}

/// Sessions in a cluster (docs/sessions.md): a suspended session is
/// reachable through any node (`queued`, and its info); a resume that lands
/// on another node takes it over there, with its kept messages, and
/// commands through the node its id names follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_session_is_reached_through_any_node_and_resumes_on_another() {
    let nats = NatsServer::start(false);
    let origin = TestOrigin::start(None).await;
    let (a, b) = start_pair(&nats, &origin, "sessions").await;
    let (ws, first) = native_first(&a.ws_url("/app")).await;
    let id = first["client"].as_str().unwrap().to_owned();
    let token = first["session"].as_str().unwrap().to_owned();
    drop(ws);
    poll(QUICK, "the session suspended on a", || async {
        let r = b.get(&format!("/v1/connections/{id}")).await;
        if r.status == 200 && r.json()["suspended"] == true {
            Ok(())
        } else {
            Err(r.body)
        }
    })
    .await;

    let r = b.push_text(&id, "kept").await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"status": "queued"})),
        "{}",
        r.body
    );
    let r = b
        .post(
            "/v1/messages",
            &json!({"messages": [{"connection_ids": [id], "text": "kept too"}]}),
        )
        .await;
    assert_eq!(r.json()["results"][0][&id], "queued", "{}", r.body);
    assert_eq!(
        b.get(&format!("/v1/connections/{id}")).await.json()["outbox_messages"],
        2
    );

    // The resume lands on b: b takes the session from a.
    let (mut ws, r) = native_first(&b.ws_url(&format!("/app?resume={token}&received=0"))).await;
    assert_eq!(
        (r["resumed"].clone(), r["client"].clone(), r["node"].clone()),
        (json!(true), json!(id), json!("b")),
        "{r}"
    );
    for (seq, text) in [(1, "kept"), (2, "kept too")] {
        let f: Value = match next_msg(&mut ws).await {
            WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(f, json!({"push": "direct", "seq": seq, "text": text}));
    }
    // Commands through a (the node its id names) follow it to b.
    let info = a.get(&format!("/v1/connections/{id}")).await;
    assert_eq!(
        (
            info.status,
            info.json()["node"].clone(),
            info.json()["suspended"].clone()
        ),
        (200, json!("b"), json!(false)),
        "{}",
        info.body
    );
    let r = a.push_text(&id, "after the move").await;
    assert_eq!(r.json(), json!({"status": "delivered"}), "{}", r.body);
    let f: Value = match next_msg(&mut ws).await {
        WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        f,
        json!({"push": "direct", "seq": 3, "text": "after the move"})
    );
    // The origin's replies to its messages reach it on b.
    origin.behavior(|b| b.echo = true);
    ws.send(WsMessage::Text(
        json!({"id": 1, "cmd": "send", "text": "echo me"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let echoed = loop {
        let f: Value = match next_msg(&mut ws).await {
            WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
            other => panic!("{other:?}"),
        };
        if f["push"] == "direct" {
            break f;
        }
    };
    assert_eq!(
        echoed,
        json!({"push": "direct", "seq": 4, "text": "echo me"})
    );
    // A resume with a's token on a again is told plainly.
    let (_again, r) = native_first(&a.ws_url(&format!("/app?resume={token}&received=9"))).await;
    assert_eq!(r["resume_error"]["code"], "session_invalid", "{r}");
    let connects = origin
        .connects()
        .iter()
        .filter(|c| c.connection_id == id)
        .count();
    assert_eq!(connects, 1);
    assert!(origin.disconnects_of(&id).is_empty());
    drop(ws);
}

/// A refusal by the node that held a session is the refusal of a resume
/// on another node: a session that expired on `a` (its own ttl, from the
/// origin's `connect` answer) is `session_expired` on `b`, not unknown; and
/// a session nobody holds is `session_unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_another_node_is_refused_as_the_holder_refuses_it() {
    let nats = NatsServer::start(false);
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| {
        b.connect = switchboard_test_util::ConnectBehavior::Accept(
            switchboard_proto::origin::OriginAnswer {
                session_ttl_ms: Some(300),
                ..Default::default()
            },
        )
    });
    let (a, b) = start_pair(&nats, &origin, "refusals").await;
    let (ws, first) = native_first(&a.ws_url("/app")).await;
    assert_eq!(first["session_ttl_ms"], 300, "{first}");
    let id = first["client"].as_str().unwrap().to_owned();
    let token = first["session"].as_str().unwrap().to_owned();
    drop(ws);
    let gone = origin.wait_disconnect(&id).await;
    assert_eq!(gone.reason, "session expired");

    let (_ws, r) = native_first(&b.ws_url(&format!("/app?resume={token}&received=0"))).await;
    assert_eq!(r["resume_error"]["code"], "session_expired", "{r}");
    assert_eq!(
        node_of(r["client"].as_str().unwrap()),
        "b",
        "a new session on b"
    );

    let unknown = token.replacen(&id[2..6], "AAAA", 1);
    let (_ws, r) = native_first(&b.ws_url(&format!("/app?resume={unknown}"))).await;
    assert_eq!(r["resume_error"]["code"], "session_unknown", "{r}");
    assert_eq!(origin.disconnects_of(&id).len(), 1);
}

/// An HTTP request (`Connection: close`) on a node's client listener:
/// status and body.
async fn fallback_request(node: &Node, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
    if method == "POST" {
        req.push_str(&format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        switchboard_test_util::raw_request(node.listen, req.as_bytes()),
    )
    .await
    .expect("an answer in time")
    .expect("an answer");
    let body = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status, body)
}

/// HTTP fallbacks in a cluster (docs/fallbacks.md): a long-poll session
/// held by `a` whose polls, commands and end land on either node, as
/// behind a round-robin load balancer with no sticky sessions: requests
/// that reach `b` are forwarded to `a`, a poll waiting on `b` spans
/// several forwarded polls, and every direct message arrives once, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_requests_reach_the_node_holding_their_session() {
    // JetStream: channels in a cluster live in it.
    let nats = NatsServer::start(true);
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let extra = [
        "--origin",
        url.as_str(),
        "--poll-timeout",
        "3s",
        "--namespace",
        "news:history-size=100,subscribe",
    ];
    let nats_url = nats.url();
    let (a, b) = tokio::join!(
        start_node("a", &nats_url, "fallbacks", &extra),
        start_node("b", &nats_url, "fallbacks", &extra),
    );
    wait_member_ids(&[&a, &b], &["a", "b"], FORM).await;

    let (status, open) = fallback_request(&a, "GET", "/app?transport=long-poll", "").await;
    assert_eq!(status, 200, "{open}");
    let connected = &open["pushes"][0];
    let id = connected["client"].as_str().unwrap().to_owned();
    let token = connected["session"].as_str().unwrap().to_owned();
    let mut cursor = open["cursor"].as_u64().unwrap();
    let nodes = [&a, &b];

    // A command through b: its reply comes in a poll through b.
    let cmd = json!({"id": 1, "cmd": "subscribe", "channel": "news:x"}).to_string();
    let (status, body) = fallback_request(&b, "POST", &format!("/app?session={token}"), &cmd).await;
    assert_eq!(status, 204, "{body}");

    let mut got = Vec::new();
    let mut replies = 0;
    let mut sent = 0u64;
    for round in 0..12 {
        if round % 3 == 0 {
            for _ in 0..4 {
                sent += 1;
                let r = nodes[round % 2].push_text(&id, &format!("d{sent}")).await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        }
        let node = nodes[(round + 1) % 2];
        let path = format!("/app?transport=long-poll&session={token}&cursor={cursor}");
        let (status, batch) = fallback_request(node, "GET", &path, "").await;
        assert_eq!(status, 200, "round {round} on {}: {batch}", node.node);
        assert!(batch["cursor"].as_u64().unwrap() > cursor, "{batch}");
        cursor = batch["cursor"].as_u64().unwrap();
        for p in batch["pushes"].as_array().unwrap() {
            if p["push"] == "direct" {
                got.push(p["seq"].as_u64().unwrap());
            } else if p["id"] == 1 {
                replies += 1;
            }
        }
    }
    assert_eq!(replies, 1, "the subscribe's reply, once");
    assert_eq!(
        got,
        (1..=sent).collect::<Vec<_>>(),
        "every direct once, in order"
    );

    // A poll waiting on b with nothing to say answers after poll-timeout,
    // having acknowledged its forwarded polls' empty answers as it went.
    let started = Instant::now();
    let path = format!("/app?transport=long-poll&session={token}&cursor={cursor}");
    let (status, batch) = fallback_request(&b, "GET", &path, "").await;
    assert_eq!(status, 200, "{batch}");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(batch["pushes"], json!([]));
    cursor = batch["cursor"].as_u64().unwrap();
    // ... and a direct sent meanwhile ends a poll on b at once.
    let waiting = tokio::spawn({
        let path = format!("/app?transport=long-poll&session={token}&cursor={cursor}");
        let addr = b.listen;
        async move {
            let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
            let resp = switchboard_test_util::raw_request(addr, req.as_bytes())
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&resp.body).unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(a.push_text(&id, "late").await.status, 200);
    let batch = waiting.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(batch["pushes"][0]["text"], "late", "{batch}");
    let cursor = batch["cursor"].as_u64().unwrap();

    // The end, through b: the next poll (through a) says close; one
    // disconnect.
    let (status, body) = fallback_request(&b, "DELETE", &format!("/app?session={token}"), "").await;
    assert_eq!(status, 204, "{body}");
    let path = format!("/app?transport=long-poll&session={token}&cursor={cursor}");
    let (status, last) = fallback_request(&a, "GET", &path, "").await;
    assert_eq!(status, 200, "{last}");
    assert_eq!(last["close"]["code"], 1000, "{last}");
    poll(QUICK, "one disconnect", || async {
        let n = origin.disconnects_of(&id).len();
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} disconnects"))
        }
    })
    .await;
    // Gone everywhere.
    let (status, _) = fallback_request(&b, "POST", &format!("/app?session={token}"), &cmd).await;
    assert_eq!(status, 404);
}

/// A node whose Redis is down when it starts: it starts anyway (after
/// trying for five seconds) and serves its own clients and commands, and
/// joins the cluster once Redis comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_without_redis_and_joins_once_redis_is_up() {
    let mut bus = Bus::redis();
    bus.kill();
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let t = Instant::now();
    let mut a = start_node("a", &bus.url(), "late", &["--origin", &url]).await;
    wait_said(
        &mut a,
        "Redis not reachable yet; serving local clients and still trying",
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "started after {:?}",
        t.elapsed()
    );
    let (mut ws, id) = client(&a, &origin, "/alone").await;
    push_and_receive(&a, &id, &mut ws, "served without Redis").await;
    bus.restart();
    let b = start_node("b", &bus.url(), "late", &["--origin", &url]).await;
    wait_member_ids(&[&a, &b], &["a", "b"], FORM).await;
    push_and_receive(&b, &id, &mut ws, "through b").await;
}
