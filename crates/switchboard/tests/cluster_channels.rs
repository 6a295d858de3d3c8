//! Channels across a cluster, end to end: every test runs its own
//! `nats-server -js` on a free port and three real `switchboard` processes
//! (`a`, `b`, `c`) on it, started with `--nats` and `--namespace` together
//! (heartbeat 200 ms, heartbeat timeout 1.5 s), with native (`switchboard.v1`)
//! and raw clients spread over the nodes.
//!
//! What it proves:
//! - publish / subscribe: a message published on any node — control API
//!   (text and binary) or a client's native `publish` — reaches every
//!   subscriber on every node exactly once, in offset order; one epoch for
//!   the channel cluster-wide, and offsets stay contiguous (1, 2, 3, …) with
//!   publishers on the three nodes at once;
//! - interest-based routing: a node receives a channel's messages from the
//!   bus (`switchboard_channel_bus_received_total`) once per message whatever
//!   its number of local subscribers, not at all without local subscribers
//!   (also while it has subscribers of another channel), and no longer once
//!   its last subscriber left;
//! - history and recovery on any node: a subscriber that moves from one node
//!   to another with `since` gets exactly what it missed, then the live
//!   messages (no gap, no duplicate); a wrong epoch or an offset ahead of the
//!   channel answers `recovered: false` and pushes nothing old; the history
//!   query (control API and native command) reads the same history on every
//!   node, with `since`/`epoch`/`limit`; with every node killed, a new node
//!   reads the same history and recovers from it (it lives in JetStream);
//! - channel names with characters special in NATS subjects (`.`, `*`, `>`,
//!   `%`, non-ASCII) stay distinct channels across nodes; a message larger
//!   than NATS carries answers 413 and takes no offset;
//! - idempotent publish across nodes: the same key on another node (and on
//!   three nodes at once) publishes once, answers `duplicate: true` with the
//!   first offset, and subscribers receive it once;
//! - presence cluster-wide: every node (control API and native command) lists
//!   the subscribers of all nodes with their user and metadata, `join` and
//!   `leave` pushes cross nodes, and a SIGKILLed node's members are gone from
//!   the others' answers within the heartbeat timeout (and do not come back);
//! - continuity (the central promise): six subscribers, two per node, each
//!   dropping its socket several times and resubscribing with `since` on
//!   another node, while 300 numbered messages are published and node `c` is
//!   SIGKILLed midway, all end with exactly 1..=300, in order; with
//!   publishers on the three nodes and the publishing node `c` killed, the
//!   subscribers still see contiguous offsets and every acknowledged publish
//!   once, at its offset;
//! - NATS restarting (same JetStream store): a publish answers 503
//!   `cluster_unavailable` meanwhile; retried with its idempotency key (as
//!   documented) it lands once, and the channel goes on in its epoch with no
//!   gap and no duplicate;
//! - raw connections subscribed through the control API of another node
//!   (forwarded to the owner), also with recovery, get the messages published
//!   on a third node as plain frames, and stop after an unsubscribe; a
//!   native one gets `subscribed` (with the position) and `unsubscribed`
//!   pushes;
//! - the channel commands over NATS (`<prefix>.control` and
//!   `<prefix>.node.<id>.control`): publish (with an idempotency key),
//!   history and presence span the cluster;
//! - the Rust SDK (`switchboard-client`): subscribed on one node, it gets
//!   messages published on another in order, recovers exactly after its
//!   connection is closed through a third node, and history, presence and
//!   publish through an SDK client on another node work.
//!
//! Every wait is bounded. The fixed waits prove an absence (no message, no
//! bus traffic, no ghost member), let a node's documented "within a second"
//! unsubscription from the bus pass, or are a continuity subscriber's time
//! offline between two sockets.

mod common;

use common::{
    command, nats_connect, node_of, poll, start_node, start_three, wait_member_ids, Bus, Node,
    FORM, HEARTBEAT_TIMEOUT, QUICK, SLACK,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard_client::{Client, SubscriptionEvent};
use switchboard_proto::native::StreamPosition;
use switchboard_proto::origin::{OriginAnswer, Payload};
use switchboard_test_util::nats::NatsServer;
use switchboard_test_util::{connect, local_addr, ConnectBehavior, TestOrigin, Ws, WsMessage};
use tokio_tungstenite::tungstenite;

/// Rooms clients join by themselves, with history, presence and joins.
const ROOM: &str = "room:history-size=1000,history-ttl=10m,presence,join-leave,publish,subscribe";
/// Channels only the origin subscribes connections to.
const FEED: &str = "feed:history-size=100,presence";
/// Channel messages a node received from the bus.
const BUS_RECEIVED: &str = "switchboard_channel_bus_received_total";
/// Bound of one expected frame or event.
const FRAME: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `bus` (NATS with JetStream, or Redis) and nodes `a`, `b`, `c` on it with the `room`
/// and `feed` namespaces (plus `extra` flags), once they see each other.
async fn channel_cluster(bus: Bus, prefix: &str, extra: &[&str]) -> (Bus, Node, Node, Node) {
    let mut args = vec!["--namespace", ROOM, "--namespace", FEED];
    args.extend_from_slice(extra);
    let (a, b, c) = start_three(&bus.url(), prefix, &args).await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    (bus, a, b, c)
}

/// A native protocol client: commands with ids, replies matched by id,
/// pushes queued in arrival order. The `try_` methods report a dead socket
/// as `Err` (for clients of a node that gets killed); the others panic.
struct Native {
    ws: Ws,
    next_id: u64,
    client: String,
    node: String,
    pushes: VecDeque<Value>,
}

impl Native {
    /// Connects to a `ws://` URL with `switchboard.v1` and reads the
    /// `connected` push.
    async fn try_connect(url: &str) -> Result<Self, String> {
        use tungstenite::client::IntoClientRequest;
        let mut req = url
            .into_client_request()
            .map_err(|e| format!("bad url {url}: {e}"))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tungstenite::http::HeaderValue::from_static("switchboard.v1"),
        );
        let (ws, resp) = tokio::time::timeout(FRAME, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| format!("no handshake with {url} within {FRAME:?}"))?
            .map_err(|e| format!("handshake with {url}: {e}"))?;
        let proto = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        if proto != Some("switchboard.v1") {
            return Err(format!("{url} selected subprotocol {proto:?}"));
        }
        let mut n = Self {
            ws,
            next_id: 0,
            client: String::new(),
            node: String::new(),
            pushes: VecDeque::new(),
        };
        let first = n.try_frame(FRAME).await?;
        if first["push"] != "connected" {
            return Err(format!(
                "first frame from {url} is not `connected`: {first}"
            ));
        }
        n.client = first["client"].as_str().unwrap_or_default().to_owned();
        n.node = first["node"].as_str().unwrap_or_default().to_owned();
        Ok(n)
    }

    /// A native client of `node`.
    async fn connect(node: &Node) -> Self {
        let n = Self::try_connect(&node.ws_url("/native"))
            .await
            .unwrap_or_else(|e| panic!("native client of node {}: {e}", node.node));
        assert_eq!(n.node, node.node, "`connected` push names the node");
        assert_eq!(node_of(&n.client), node.node, "connection id {}", n.client);
        n
    }

    /// The next JSON frame, within `within`.
    async fn try_frame(&mut self, within: Duration) -> Result<Value, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => {
                    return Err(format!(
                        "no frame within {within:?} on {} (node {})",
                        self.client, self.node
                    ))
                }
                Ok(None) => return Err("end of stream".to_owned()),
                Ok(Some(Err(e))) => return Err(format!("socket error: {e}")),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                WsMessage::Text(t) => {
                    return serde_json::from_str(&t).map_err(|e| format!("not JSON ({e}): {t}"))
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                WsMessage::Close(f) => return Err(format!("close frame {f:?}")),
                other => return Err(format!("unexpected frame {other:?}")),
            }
        }
    }

    /// Sends a command and returns its whole reply, queueing the pushes that
    /// arrive first.
    async fn try_call(&mut self, mut cmd: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = json!(id);
        self.ws
            .send(WsMessage::text(cmd.to_string()))
            .await
            .map_err(|e| format!("send {cmd}: {e}"))?;
        loop {
            let f = self.try_frame(FRAME).await?;
            if f.get("push").is_some() {
                self.pushes.push_back(f);
            } else if f["id"] == id {
                return Ok(f);
            } else {
                return Err(format!("reply to {cmd} expected, got {f}"));
            }
        }
    }

    async fn call(&mut self, cmd: Value) -> Value {
        let (client, node) = (self.client.clone(), self.node.clone());
        self.try_call(cmd.clone())
            .await
            .unwrap_or_else(|e| panic!("{cmd} by {client} on node {node}: {e}"))
    }

    /// `result` of a command that must succeed.
    async fn ok(&mut self, cmd: Value) -> Value {
        let r = self.call(cmd.clone()).await;
        assert!(
            r.get("error").is_none(),
            "{cmd} failed on node {}: {r}",
            self.node
        );
        r["result"].clone()
    }

    /// Subscribes without a position; returns the result.
    async fn subscribe(&mut self, channel: &str) -> Value {
        self.ok(json!({"cmd": "subscribe", "channel": channel}))
            .await
    }

    /// The next push (queued ones first), within `within`.
    async fn try_push(&mut self, within: Duration) -> Result<Value, String> {
        if let Some(p) = self.pushes.pop_front() {
            return Ok(p);
        }
        let f = self.try_frame(within).await?;
        if f.get("push").is_none() {
            return Err(format!("expected a push, got {f}"));
        }
        Ok(f)
    }

    async fn push(&mut self) -> Value {
        let (client, node) = (self.client.clone(), self.node.clone());
        self.try_push(FRAME)
            .await
            .unwrap_or_else(|e| panic!("push for {client} on node {node}: {e}"))
    }

    /// The next `message` push, skipping joins and leaves.
    async fn message(&mut self) -> Value {
        loop {
            let p = self.push().await;
            match p["push"].as_str() {
                Some("message") => return p,
                Some("join" | "leave") => continue,
                _ => panic!("expected a message on node {}, got {p}", self.node),
            }
        }
    }

    /// The next `n` messages.
    async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.message().await);
        }
        out
    }

    /// Asserts that no `message` push arrives within `within` (joins and
    /// leaves are ignored).
    async fn no_message(&mut self, within: Duration) {
        while let Some(p) = self.pushes.pop_front() {
            assert_ne!(
                p["push"], "message",
                "unexpected on node {}: {p}",
                self.node
            );
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.try_frame(left).await {
                Ok(f) => assert_ne!(
                    f["push"], "message",
                    "unexpected on node {}: {f}",
                    self.node
                ),
                Err(_) => return,
            }
        }
    }

    /// Collects `join` (or `leave`) pushes of `channel` until their members'
    /// client ids are exactly `want`; message pushes in between are not
    /// expected. Returns the member objects by client id.
    async fn presence_pushes(
        &mut self,
        kind: &str,
        channel: &str,
        want: &[&str],
    ) -> BTreeMap<String, Value> {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let mut got = BTreeMap::new();
        let deadline = Instant::now() + FRAME;
        while got.keys().cloned().collect::<BTreeSet<_>>() != want {
            let left = deadline.saturating_duration_since(Instant::now());
            let p = self.try_push(left).await.unwrap_or_else(|e| {
                panic!(
                    "{} on node {}: `{kind}` pushes for {want:?} expected, got {:?} then: {e}",
                    self.client,
                    self.node,
                    got.keys()
                )
            });
            assert_eq!(
                p["push"], kind,
                "{} on node {}: {p}",
                self.client, self.node
            );
            assert_eq!(p["channel"], channel, "{p}");
            let who = p["member"]["client"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert_ne!(who, self.client, "no {kind} about oneself: {p}");
            assert!(
                want.contains(&who),
                "unexpected {kind} on node {}: {p}",
                self.node
            );
            assert!(
                got.insert(who, p["member"].clone()).is_none(),
                "a second {kind} push: {p}"
            );
        }
        got
    }
}

/// `POST /v1/channels/{channel}/messages` on `node`; the answer must be 200.
async fn publish(node: &Node, channel: &str, body: Value) -> Value {
    let r = node
        .post(&format!("/v1/channels/{channel}/messages"), &body)
        .await;
    assert_eq!(
        r.status, 200,
        "publish {body} to {channel} on node {}: {}",
        node.node, r.body
    );
    r.json()
}

/// Publishes "`prefix`-0", "`prefix`-1", … (`count` of them) one after the
/// other through the control API of `node`; returns (offset, text) of each.
async fn burst(node: &Node, channel: &str, prefix: &str, count: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for i in 0..count {
        let text = format!("{prefix}-{i}");
        let r = publish(node, channel, json!({ "text": text })).await;
        out.push((r["offset"].as_u64().expect("offset"), text));
    }
    out
}

/// (offset, text) of message pushes.
fn offsets_and_texts(msgs: &[Value]) -> Vec<(u64, String)> {
    msgs.iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap_or(u64::MAX),
                m["text"].as_str().unwrap_or("<not text>").to_owned(),
            )
        })
        .collect()
}

/// The value of [`BUS_RECEIVED`] on `node` (summed over its label sets);
/// panics if the metric is not exposed at all, showing the channel metrics
/// that are.
async fn bus_received(node: &Node) -> f64 {
    let r = node.get("/metrics").await;
    assert_eq!(
        r.status, 200,
        "GET /metrics on node {}: {}",
        node.node, r.body
    );
    let mut found = false;
    let mut sum = 0.0;
    for line in r.body.lines() {
        let Some(rest) = line.strip_prefix(BUS_RECEIVED) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit_once('}').map_or(rest, |(_, v)| v);
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            found = true;
            sum += v;
        }
    }
    assert!(
        found,
        "node {} exposes no {BUS_RECEIVED}; its channel metrics:\n{}",
        node.node,
        r.body
            .lines()
            .filter(|l| l.contains("channel") || l.contains("bus"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    sum
}

/// [`bus_received`] once it stopped moving (two equal readings 150 ms
/// apart, within 2 s).
async fn bus_received_settled(node: &Node) -> f64 {
    let deadline = Instant::now() + QUICK;
    let mut prev = bus_received(node).await;
    loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = bus_received(node).await;
        if now == prev {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{BUS_RECEIVED} of node {} still moving after {QUICK:?}: {prev} then {now}",
            node.node
        );
        prev = now;
    }
}

/// [`bus_received_settled`] of each node.
async fn bus_received_all(nodes: [&Node; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (o, n) in out.iter_mut().zip(nodes) {
        *o = bus_received_settled(n).await;
    }
    out
}

/// How much each node's count rose.
fn rise(before: [f64; 3], after: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|i| after[i] - before[i])
}

/// `GET /v1/channels/{channel}/presence` on `node`: the member objects by
/// client id, and the `clients` and `users` counts.
async fn presence(node: &Node, channel: &str) -> Result<(BTreeMap<String, Value>, Value), String> {
    let r = node.get(&format!("/v1/channels/{channel}/presence")).await;
    if r.status != 200 {
        return Err(format!("{} {}", r.status, r.body));
    }
    let v = r.json();
    let members = v["members"]
        .as_array()
        .ok_or_else(|| format!("no members: {v}"))?
        .iter()
        .map(|m| {
            (
                m["client"].as_str().unwrap_or_default().to_owned(),
                m.clone(),
            )
        })
        .collect();
    Ok((
        members,
        json!({"clients": v["clients"], "users": v["users"]}),
    ))
}

/// Polls presence of `channel` on every node of `nodes` until it lists
/// exactly the clients `want` with these `clients`/`users` counts; returns
/// the last node's members.
async fn wait_presence(
    nodes: &[&Node],
    channel: &str,
    want: &[&str],
    users: u64,
    within: Duration,
) -> BTreeMap<String, Value> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + within;
    let mut last = BTreeMap::new();
    for node in nodes {
        last = poll(
            deadline.saturating_duration_since(Instant::now()),
            &format!("presence of {channel} on node {} to be {want:?}", node.node),
            || async {
                let (members, counts) = presence(node, channel).await?;
                let ids: BTreeSet<String> = members.keys().cloned().collect();
                let want_counts = json!({"clients": want.len(), "users": users});
                if ids == want && counts == want_counts {
                    Ok(members)
                } else {
                    Err(format!(
                        "{:?} {counts}",
                        members.values().collect::<Vec<_>>()
                    ))
                }
            },
        )
        .await;
    }
    last
}

/// The next data frame of a raw client within `within`, `None` if none.
async fn raw_next(ws: &mut Ws, within: Duration) -> Option<WsMessage> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
            Ok(Some(Ok(m))) => return Some(m),
            Ok(other) => panic!("raw client's socket ended: {other:?}"),
        }
    }
}

/// `PUT /v1/connections/{id}/channels/{channel}` on `node` with `body`.
async fn subscribe_through(node: &Node, id: &str, channel: &str, body: Option<Value>) -> Value {
    let r = node
        .call(
            reqwest::Method::PUT,
            &format!("/v1/connections/{id}/channels/{channel}"),
            body.as_ref(),
        )
        .await;
    assert_eq!(
        r.status, 200,
        "PUT {id} on {channel} through node {}: {}",
        node.node, r.body
    );
    r.json()
}

// ---------------------------------------------------------------------------
// Publish and subscribe across nodes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_any_node_reaches_every_subscriber_once_in_offset_order() {
    a_publish_on_any_node_reaches_every_subscriber_once_in_offset_order_on(Bus::nats(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_any_node_reaches_every_subscriber_once_in_offset_order_over_redis() {
    a_publish_on_any_node_reaches_every_subscriber_once_in_offset_order_on(Bus::redis()).await;
}

async fn a_publish_on_any_node_reaches_every_subscriber_once_in_offset_order_on(bus: Bus) {
    let (_nats, a, b, c) = channel_cluster(bus, "pubsub", &[]).await;
    let ch = "room:t1";
    let mut subs = vec![
        Native::connect(&a).await,
        Native::connect(&b).await,
        Native::connect(&c).await,
    ];
    for s in &mut subs {
        // A channel without messages yet: epoch "" and offset 0
        // (channels.md, "How it works").
        let r = s.subscribe(ch).await;
        assert_eq!(
            (r["offset"].as_u64(), r["epoch"].as_str()),
            (Some(0), Some("")),
            "a new channel, on node {}: {r}",
            s.node
        );
    }

    // Text through a's control API, binary through b's, a client's native
    // publish on c. The first message starts the epoch.
    let r1 = publish(&a, ch, json!({"text": "one"})).await;
    assert_eq!(r1["offset"], 1, "{r1}");
    assert_eq!(r1["duplicate"], false);
    let epoch = r1["epoch"].as_str().unwrap_or_default().to_owned();
    assert!(!epoch.is_empty(), "the first publish starts an epoch: {r1}");
    let r2 = publish(&b, ch, json!({"binary": "AAEC"})).await;
    assert_eq!(
        (r2["offset"].as_u64(), r2["epoch"].as_str()),
        (Some(2), Some(epoch.as_str()))
    );
    let r3 = subs[2]
        .ok(json!({"cmd": "publish", "channel": ch, "text": "three"}))
        .await;
    assert_eq!(r3, json!({"offset": 3, "epoch": epoch}));
    for s in &mut subs {
        let m = s.messages(3).await;
        assert_eq!(
            m,
            vec![
                json!({"push": "message", "channel": ch, "offset": 1, "epoch": epoch, "text": "one"}),
                json!({"push": "message", "channel": ch, "offset": 2, "epoch": epoch, "binary": "AAEC"}),
                json!({"push": "message", "channel": ch, "offset": 3, "epoch": epoch, "text": "three"}),
            ],
            "on node {}",
            s.node
        );
    }

    // Four publishers at once: the control APIs of a, b and c, and a native
    // client on b. Offsets stay contiguous cluster-wide.
    const EACH: usize = 20;
    let mut native_pub = Native::connect(&b).await;
    let native_burst = async {
        let mut out = Vec::new();
        for i in 0..EACH {
            let text = format!("n-{i}");
            let r = native_pub
                .ok(json!({"cmd": "publish", "channel": ch, "text": text}))
                .await;
            assert_eq!(r["epoch"], json!(epoch));
            out.push((r["offset"].as_u64().expect("offset"), text));
        }
        out
    };
    let (ra, rb, rc, rn) = tokio::join!(
        burst(&a, ch, "a", EACH),
        burst(&b, ch, "b", EACH),
        burst(&c, ch, "c", EACH),
        native_burst,
    );
    let mut by_offset = BTreeMap::new();
    for (who, list) in [("a", &ra), ("b", &rb), ("c", &rc), ("native", &rn)] {
        assert!(
            list.windows(2).all(|w| w[0].0 < w[1].0),
            "one publisher's offsets increase ({who}): {list:?}"
        );
        for (offset, text) in list {
            if let Some(other) = by_offset.insert(*offset, text.clone()) {
                panic!("offset {offset} given twice: {other:?} and {text:?}");
            }
        }
    }
    let total = 3 + 4 * EACH as u64;
    assert_eq!(
        by_offset.keys().copied().collect::<Vec<_>>(),
        (4..=total).collect::<Vec<_>>(),
        "contiguous offsets with publishers on three nodes"
    );
    let want: Vec<(u64, String)> = by_offset.into_iter().collect();
    for s in &mut subs {
        let got = offsets_and_texts(&s.messages(4 * EACH).await);
        assert_eq!(
            got, want,
            "every message once, in offset order, on node {}",
            s.node
        );
        s.no_message(QUIET).await;
    }
}

// ---------------------------------------------------------------------------
// Interest-based routing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_receives_a_channel_from_the_bus_once_per_message_and_only_with_subscribers() {
    let (_nats, a, b, c) = channel_cluster(Bus::nats(true), "interest", &[]).await;
    let ch = "room:busy";
    let mut on_a = Vec::new();
    for _ in 0..20 {
        let mut n = Native::connect(&a).await;
        n.subscribe(ch).await;
        on_a.push(n);
    }
    let mut on_b = Native::connect(&b).await;
    on_b.subscribe(ch).await;
    // c has bus interest, but in another channel.
    let mut elsewhere = Native::connect(&c).await;
    elsewhere.subscribe("room:elsewhere").await;

    let before = bus_received_all([&a, &b, &c]).await;
    let mut epoch = String::new();
    for i in 1..=50 {
        let r = publish(&c, ch, json!({"text": i.to_string()})).await;
        assert_eq!(r["offset"], i);
        epoch = r["epoch"].as_str().unwrap().to_owned();
    }
    let want: Vec<(u64, String)> = (1..=50).map(|i| (i, i.to_string())).collect();
    for n in on_a.iter_mut().chain(std::iter::once(&mut on_b)) {
        let got = offsets_and_texts(&n.messages(50).await);
        assert_eq!(got, want, "{} on node {}", n.client, n.node);
    }
    elsewhere.no_message(QUIET).await;
    let after = bus_received_all([&a, &b, &c]).await;
    assert_eq!(
        rise(before, after),
        [50.0, 50.0, 0.0],
        "{BUS_RECEIVED} rose by this much on a (20 subscribers), b (1) and c (none \
         of this channel; the publisher) — before {before:?}, after {after:?}"
    );

    // b's last subscriber leaves: b no longer receives the channel.
    on_b.ok(json!({"cmd": "unsubscribe", "channel": ch})).await;
    // A node stops watching a channel within a second of its last local
    // subscriber leaving (channels.md, "How it works"); an absence is proven
    // next.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = bus_received_all([&a, &b, &c]).await;
    for i in 51..=60 {
        publish(&c, ch, json!({"text": i.to_string()})).await;
    }
    let want: Vec<(u64, String)> = (51..=60).map(|i| (i, i.to_string())).collect();
    for n in &mut on_a {
        assert_eq!(offsets_and_texts(&n.messages(10).await), want);
    }
    on_b.no_message(QUIET).await;
    let after = bus_received_all([&a, &b, &c]).await;
    assert_eq!(
        rise(before, after),
        [10.0, 0.0, 0.0],
        "after b's only subscriber left: {BUS_RECEIVED} before {before:?}, after {after:?}"
    );

    // It comes back with its position: recovered from the stored history,
    // and live again.
    let r = on_b
        .ok(json!({"cmd": "subscribe", "channel": ch, "since": {"offset": 50, "epoch": epoch}}))
        .await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(offsets_and_texts(&on_b.messages(10).await), want);
    publish(&c, ch, json!({"text": "61"})).await;
    assert_eq!(on_b.message().await["offset"], 61);
    for n in &mut on_a {
        assert_eq!(n.message().await["offset"], 61);
    }
}

// ---------------------------------------------------------------------------
// History and recovery on any node
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_recovery_work_on_any_node() {
    history_and_recovery_work_on_any_node_on(Bus::nats(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_recovery_work_on_any_node_over_redis() {
    history_and_recovery_work_on_any_node_on(Bus::redis()).await;
}

async fn history_and_recovery_work_on_any_node_on(bus: Bus) {
    let (nats, mut a, mut b, mut c) = channel_cluster(bus, "history", &[]).await;
    let ch = "room:h";
    let mut on_a = Native::connect(&a).await;
    on_a.subscribe(ch).await;
    for i in 1..=5 {
        publish(&b, ch, json!({"text": format!("m{i}")})).await;
    }
    let msgs = on_a.messages(5).await;
    let got = offsets_and_texts(&msgs);
    assert_eq!(got.last(), Some(&(5, "m5".to_owned())), "{got:?}");
    let epoch = msgs[4]["epoch"].as_str().unwrap().to_owned();
    // The subscriber's link goes away; the channel moves on.
    drop(on_a);
    for i in 6..=10 {
        publish(&c, ch, json!({"text": format!("m{i}")})).await;
    }

    // It comes back on b with its position: exactly 6..=10, then live ones.
    let mut on_b = Native::connect(&b).await;
    let r = on_b
        .ok(json!({"cmd": "subscribe", "channel": ch, "since": {"offset": 5, "epoch": epoch}}))
        .await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(r["epoch"], json!(epoch), "{r}");
    publish(&a, ch, json!({"text": "m11"})).await;
    let got = offsets_and_texts(&on_b.messages(6).await);
    let want: Vec<(u64, String)> = (6..=11).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(got, want, "recovered then live, no gap, no duplicate");
    on_b.no_message(QUIET).await;

    // A wrong epoch, or an offset the channel has not reached: not
    // recovered, nothing old pushed, subscribed all the same.
    let mut wrong_epoch = Native::connect(&c).await;
    let r = wrong_epoch
        .ok(json!({"cmd": "subscribe", "channel": ch, "since": {"offset": 3, "epoch": "000000000000"}}))
        .await;
    assert_eq!(r["recovered"], false, "{r}");
    assert_eq!(
        (r["epoch"].as_str(), r["offset"].as_u64()),
        (Some(epoch.as_str()), Some(11))
    );
    let mut ahead = Native::connect(&a).await;
    let r = ahead
        .ok(json!({"cmd": "subscribe", "channel": ch, "since": {"offset": 999, "epoch": epoch}}))
        .await;
    assert_eq!(r["recovered"], false, "{r}");
    publish(&b, ch, json!({"text": "m12"})).await;
    for n in [&mut wrong_epoch, &mut ahead, &mut on_b] {
        assert_eq!(
            offsets_and_texts(&[n.message().await]),
            vec![(12, "m12".to_owned())],
            "only the live message, on node {}",
            n.node
        );
        n.no_message(Duration::from_millis(100)).await;
    }

    // The history query reads the same history on every node.
    let all: Vec<(u64, String)> = (1..=12).map(|i| (i, format!("m{i}"))).collect();
    for node in [&a, &b, &c] {
        let path = format!("/v1/channels/{ch}/messages");
        let r = node.get(&path).await;
        assert_eq!(r.status, 200, "history on {}: {}", node.node, r.body);
        let h = r.json();
        assert_eq!(
            (h["epoch"].as_str(), h["offset"].as_u64()),
            (Some(epoch.as_str()), Some(12))
        );
        assert_eq!(
            offsets_and_texts(h["publications"].as_array().unwrap()),
            all,
            "{h}"
        );
        assert!(h["publications"][0]["time_ms"].as_u64().unwrap() > 0, "{h}");

        let r = node
            .get(&format!("{path}?since=5&epoch={epoch}&limit=3"))
            .await
            .json();
        assert_eq!(r["recovered"], true, "{r}");
        assert_eq!(
            offsets_and_texts(r["publications"].as_array().unwrap()),
            all[5..8]
        );

        let r = node.get(&format!("{path}?limit=2")).await.json();
        assert_eq!(
            offsets_and_texts(r["publications"].as_array().unwrap()),
            all[10..]
        );

        let r = node
            .get(&format!("{path}?since=5&epoch=000000000000"))
            .await
            .json();
        assert_eq!(
            (r["recovered"].as_bool(), r["publications"].clone()),
            (Some(false), json!([]))
        );
    }
    // And the native command, on a node with no subscriber of the channel.
    let mut reader = Native::connect(&c).await;
    let h = reader
        .ok(json!({"cmd": "history", "channel": ch, "since": {"offset": 9, "epoch": epoch}, "limit": 2}))
        .await;
    assert_eq!(h["recovered"], true, "{h}");
    assert_eq!(
        offsets_and_texts(h["publications"].as_array().unwrap()),
        all[9..11]
    );

    // The history is in JetStream, not in the nodes: with every node killed,
    // a node that never saw the channel reads it and recovers from it.
    drop((on_b, wrong_epoch, ahead, reader));
    a.kill9().await;
    b.kill9().await;
    c.kill9().await;
    let d = start_node("d", &nats.url(), "history", &["--namespace", ROOM]).await;
    let h = d.get(&format!("/v1/channels/{ch}/messages")).await;
    assert_eq!(h.status, 200, "history on the new node: {}", h.body);
    let h = h.json();
    assert_eq!(
        (h["epoch"].as_str(), h["offset"].as_u64()),
        (Some(epoch.as_str()), Some(12)),
        "{h}"
    );
    assert_eq!(
        offsets_and_texts(h["publications"].as_array().unwrap()),
        all
    );
    let mut late = Native::connect(&d).await;
    let r = late
        .ok(json!({"cmd": "subscribe", "channel": ch, "since": {"offset": 6, "epoch": epoch}}))
        .await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(offsets_and_texts(&late.messages(6).await), all[6..]);
    let r = publish(&d, ch, json!({"text": "m13"})).await;
    assert_eq!(
        (r["offset"].as_u64(), r["epoch"].as_str()),
        (Some(13), Some(epoch.as_str()))
    );
    assert_eq!(late.message().await["offset"], 13);
}

/// `name` as one URL path segment: everything but unreserved characters
/// and `:` percent-encoded.
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_names_special_in_nats_subjects_stay_distinct_and_oversized_messages_are_refused() {
    let (_nats, a, b, c) = channel_cluster(Bus::nats(true), "names", &[]).await;
    // Characters NATS subjects give a meaning to, and names that would
    // collide under a sloppy escaping.
    let names = [
        "room:a.b",
        "room:a%2Eb",
        "room:a_b",
        "room:a*",
        "room:a>",
        "room:a:b",
        "room:\u{e9}t\u{e9}",
    ];
    let mut on_a = Native::connect(&a).await;
    let mut on_c = Native::connect(&c).await;
    for name in names {
        on_a.subscribe(name).await;
        on_c.subscribe(name).await;
    }
    for name in names {
        let r = publish(
            &b,
            &path_segment(name),
            json!({ "text": format!("to {name}") }),
        )
        .await;
        assert_eq!(r["offset"], 1, "the first message of {name}: {r}");
    }
    for n in [&mut on_a, &mut on_c] {
        let mut got = BTreeMap::new();
        for m in n.messages(names.len()).await {
            let ch = m["channel"].as_str().unwrap().to_owned();
            let prev = got.insert(
                ch,
                (m["offset"].as_u64(), m["text"].as_str().map(str::to_owned)),
            );
            assert!(prev.is_none(), "a second message on node {}: {m}", n.node);
        }
        let want: BTreeMap<String, (Option<u64>, Option<String>)> = names
            .iter()
            .map(|name| (name.to_string(), (Some(1), Some(format!("to {name}")))))
            .collect();
        assert_eq!(
            got, want,
            "each channel its own message, on node {}",
            n.node
        );
        n.no_message(QUIET).await;
    }
    for name in names {
        let h = c
            .get(&format!("/v1/channels/{}/messages", path_segment(name)))
            .await
            .json();
        assert_eq!(
            offsets_and_texts(h["publications"].as_array().unwrap()),
            vec![(1, format!("to {name}"))],
            "history of {name}: {h}"
        );
    }

    // A message larger than NATS carries (1 MiB) is refused and takes no
    // offset: the next one follows without a gap.
    let ch = "room:big";
    on_a.subscribe(ch).await;
    publish(&c, ch, json!({"text": "first"})).await;
    let r = b
        .post(
            &format!("/v1/channels/{ch}/messages"),
            &json!({"text": "x".repeat(1_100_000)}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (413, "payload_too_large".to_owned()),
        "{}",
        r.body
    );
    let r = publish(&c, ch, json!({"text": "second"})).await;
    assert_eq!(r["offset"], 2, "{r}");
    assert_eq!(
        offsets_and_texts(&on_a.messages(2).await),
        vec![(1, "first".to_owned()), (2, "second".to_owned())]
    );
    on_a.no_message(QUIET).await;
}

// ---------------------------------------------------------------------------
// Idempotent publish
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_publishes_once_whichever_nodes_it_is_posted_to() {
    an_idempotency_key_publishes_once_whichever_nodes_it_is_posted_to_on(Bus::nats(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_publishes_once_whichever_nodes_it_is_posted_to_over_redis() {
    an_idempotency_key_publishes_once_whichever_nodes_it_is_posted_to_on(Bus::redis()).await;
}

async fn an_idempotency_key_publishes_once_whichever_nodes_it_is_posted_to_on(bus: Bus) {
    let (_nats, a, b, c) = channel_cluster(bus, "idem", &[]).await;
    let ch = "room:pay";
    let mut subs = vec![
        Native::connect(&a).await,
        Native::connect(&b).await,
        Native::connect(&c).await,
    ];
    for s in &mut subs {
        s.subscribe(ch).await;
    }
    let first = publish(&a, ch, json!({"text": "charge", "idempotency_key": "k-1"})).await;
    assert_eq!(first["duplicate"], false, "{first}");
    for node in [&b, &c, &a] {
        let retry = publish(
            node,
            ch,
            json!({"text": "charge", "idempotency_key": "k-1"}),
        )
        .await;
        assert_eq!(
            (
                retry["duplicate"].as_bool(),
                &retry["offset"],
                &retry["epoch"]
            ),
            (Some(true), &first["offset"], &first["epoch"]),
            "retry on node {}",
            node.node
        );
    }
    let other = publish(&c, ch, json!({"text": "other", "idempotency_key": "k-2"})).await;
    assert_eq!(other["duplicate"], false);
    assert_eq!(
        other["offset"].as_u64(),
        Some(first["offset"].as_u64().unwrap() + 1)
    );

    // The same key on the three nodes at once: one publish.
    let body = json!({"text": "race", "idempotency_key": "k-3"});
    let (ra, rb, rc) = tokio::join!(
        publish(&a, ch, body.clone()),
        publish(&b, ch, body.clone()),
        publish(&c, ch, body.clone()),
    );
    let fresh: Vec<&Value> = [&ra, &rb, &rc]
        .into_iter()
        .filter(|r| r["duplicate"] == false)
        .collect();
    assert_eq!(
        fresh.len(),
        1,
        "exactly one is not a duplicate: {ra} {rb} {rc}"
    );
    assert!(
        ra["offset"] == rb["offset"] && rb["offset"] == rc["offset"],
        "one offset: {ra} {rb} {rc}"
    );
    let o = first["offset"].as_u64().unwrap();
    let want = vec![
        (o, "charge".to_owned()),
        (o + 1, "other".to_owned()),
        (o + 2, "race".to_owned()),
    ];
    assert_eq!(ra["offset"].as_u64(), Some(o + 2));
    for s in &mut subs {
        assert_eq!(
            offsets_and_texts(&s.messages(3).await),
            want,
            "on node {}",
            s.node
        );
        s.no_message(QUIET).await;
    }
    let h = b.get(&format!("/v1/channels/{ch}/messages")).await.json();
    assert_eq!(
        offsets_and_texts(h["publications"].as_array().unwrap()),
        want,
        "{h}"
    );
}

// ---------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_joins_and_leaves_span_the_cluster_and_a_killed_node_leaves_no_ghosts() {
    presence_joins_and_leaves_span_the_cluster_and_a_killed_node_leaves_no_ghosts_on(Bus::nats(
        true,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_joins_and_leaves_span_the_cluster_and_a_killed_node_leaves_no_ghosts_over_redis()
{
    presence_joins_and_leaves_span_the_cluster_and_a_killed_node_leaves_no_ghosts_on(Bus::redis())
        .await;
}

async fn presence_joins_and_leaves_span_the_cluster_and_a_killed_node_leaves_no_ghosts_on(
    bus: Bus,
) {
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    // Without sessions: a lost node's sessions would live on, suspended (and
    // members), on the node that adopts them (docs/sessions.md).
    let args = ["--origin", url.as_str(), "--session-ttl", "0s"];
    let (_nats, a, b, mut c) = channel_cluster(bus, "presence", &args).await;
    let ch = "room:p";
    let as_user = |user: Option<&str>, info: Option<Value>| {
        let answer = OriginAnswer {
            user_id: user.map(str::to_owned),
            metadata: info,
            ..OriginAnswer::default()
        };
        origin.behavior(|b| b.connect = ConnectBehavior::Accept(answer));
    };
    as_user(Some("ann"), Some(json!({"plan": "pro"})));
    let mut a1 = Native::connect(&a).await;
    as_user(Some("ann"), None);
    let mut a2 = Native::connect(&a).await;
    as_user(Some("bob"), None);
    let mut b1 = Native::connect(&b).await;
    as_user(None, None);
    let mut c1 = Native::connect(&c).await;
    let mut c2 = Native::connect(&c).await;
    let ids = |ns: &[&Native]| ns.iter().map(|n| n.client.clone()).collect::<Vec<_>>();
    let all = ids(&[&a1, &a2, &b1, &c1, &c2]);
    // One after the other, each once the earlier ones (on every node) heard
    // of it: joins cross nodes, and nobody hears of itself. (Joins travel
    // asynchronously: a subscriber may hear of one that subscribed on
    // another node just before it, so each join is awaited before the
    // next subscribe.)
    let [ida2, idb1, idc1, idc2] = [1, 2, 3, 4].map(|i| all[i].clone());
    a1.subscribe(ch).await;
    a2.subscribe(ch).await;
    a1.presence_pushes("join", ch, &[&ida2]).await;
    b1.subscribe(ch).await;
    let joins = a1.presence_pushes("join", ch, &[&idb1]).await;
    assert_eq!(joins[&idb1], json!({"client": idb1, "user": "bob"}));
    a2.presence_pushes("join", ch, &[&idb1]).await;
    c1.subscribe(ch).await;
    for n in [&mut a1, &mut a2, &mut b1] {
        let joins = n.presence_pushes("join", ch, &[&idc1]).await;
        assert_eq!(joins[&idc1], json!({"client": idc1}));
    }
    c2.subscribe(ch).await;
    for n in [&mut a1, &mut a2, &mut b1, &mut c1] {
        n.presence_pushes("join", ch, &[&idc2]).await;
    }

    // Every node lists every member, with what the origin attached.
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let members = wait_presence(&[&a, &b, &c], ch, &refs, 2, QUICK).await;
    assert_eq!(
        members[&a1.client],
        json!({"client": a1.client, "user": "ann", "info": {"plan": "pro"}})
    );
    assert_eq!(
        members[&b1.client],
        json!({"client": b1.client, "user": "bob"})
    );
    assert_eq!(members[&c1.client], json!({"client": c1.client}));
    let p = b1.ok(json!({"cmd": "presence", "channel": ch})).await;
    assert_eq!(
        (p["clients"].as_u64(), p["users"].as_u64()),
        (Some(5), Some(2)),
        "{p}"
    );
    let listed: BTreeSet<&str> = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["client"].as_str())
        .collect();
    assert_eq!(
        listed,
        refs.iter().copied().collect(),
        "native presence on b: {p}"
    );

    // b1 unsubscribes, a2 closes: everyone left hears it.
    b1.ok(json!({"cmd": "unsubscribe", "channel": ch})).await;
    for n in [&mut a1, &mut a2, &mut c1, &mut c2] {
        let left = n.presence_pushes("leave", ch, &[&b1.client]).await;
        assert_eq!(
            left[&b1.client],
            json!({"client": b1.client, "user": "bob"})
        );
    }
    let a2_id = a2.client.clone();
    a2.ws.close(None).await.expect("close");
    for n in [&mut a1, &mut c1, &mut c2] {
        n.presence_pushes("leave", ch, &[&a2_id]).await;
    }
    let left = [a1.client.as_str(), c1.client.as_str(), c2.client.as_str()];
    wait_presence(&[&a, &b, &c], ch, &left, 1, QUICK).await;

    // c is killed: its two members are gone from a's and b's answers
    // within the heartbeat timeout, and stay gone.
    c.kill9().await;
    let killed = Instant::now();
    wait_presence(
        &[&a, &b],
        ch,
        &[&a1.client],
        1,
        (HEARTBEAT_TIMEOUT + SLACK).saturating_sub(killed.elapsed()),
    )
    .await;
    tokio::time::sleep(HEARTBEAT_TIMEOUT).await;
    wait_presence(&[&a, &b], ch, &[&a1.client], 1, Duration::ZERO).await;
    let p = a1.ok(json!({"cmd": "presence", "channel": ch})).await;
    assert_eq!(p["clients"], 1, "native presence on a after the kill: {p}");

    // Life goes on: a new subscriber on b is announced on a.
    let mut b2 = Native::connect(&b).await;
    b2.subscribe(ch).await;
    a1.presence_pushes("join", ch, &[&b2.client]).await;
    wait_presence(&[&a, &b], ch, &[&a1.client, &b2.client], 1, QUICK).await;
    drop(c1);
    drop(c2);
}

// ---------------------------------------------------------------------------
// Continuity: moving subscribers, a killed node
// ---------------------------------------------------------------------------

/// Messages of the continuity test.
const N: u64 = 300;

/// What a continuity subscriber ended with.
#[derive(Debug)]
struct Outcome {
    seen: Vec<u64>,
    /// Sockets it dropped on purpose.
    drops: u32,
    /// Sockets it lost with the killed node.
    lost: u32,
    /// Nodes it was subscribed on, in order.
    path: Vec<String>,
    /// The epoch of the messages.
    epoch: String,
    /// Messages recovered by its resubscriptions (`missed` of the answers).
    missed: u64,
}

/// Connects to `url` and subscribes with `since` = (`last`, `epoch`); the
/// answer must say `recovered: true`. Recovered messages stay queued.
/// Returns the client and the answer's `missed`.
async fn resubscribe(
    url: &str,
    channel: &str,
    last: u64,
    epoch: &str,
) -> Result<(Native, u64), String> {
    let mut n = Native::try_connect(url).await?;
    let r = n
        .try_call(json!({"cmd": "subscribe", "channel": channel,
            "since": {"offset": last, "epoch": epoch}}))
        .await?;
    if r["result"]["recovered"] != true {
        return Err(format!(
            "resubscribe on node {} from {last} answered {r}",
            n.node
        ));
    }
    let missed = r["result"]["missed"].as_u64().unwrap_or(0);
    Ok((n, missed))
}

/// One subscriber of the continuity test: reads `channel` from `n`, drops
/// its socket after every `budget` messages and resubscribes on another live
/// node with its last position; a socket lost with the killed node `c` is
/// replaced the same way. Every message must be the next offset.
async fn continuity_subscriber(
    k: usize,
    n: Native,
    nodes: Vec<(String, String)>,
    c_dead: Arc<AtomicBool>,
    channel: String,
    epoch: String,
    progress: Arc<Mutex<Vec<String>>>,
) -> Result<Outcome, String> {
    let budget_each = 20 + 4 * k as u64;
    let mut out = Outcome {
        seen: Vec::new(),
        drops: 0,
        lost: 0,
        path: vec![n.node.clone()],
        epoch,
        missed: 0,
    };
    // Those that start on c stay there until it is killed.
    let mut budget = if n.node == "c" { u64::MAX } else { budget_each };
    let mut last = 0u64;
    let mut conn = n;
    loop {
        let ended: Result<(), String> = loop {
            let p = match conn.try_push(Duration::from_secs(10)).await {
                Ok(p) => p,
                Err(e) => break Err(e),
            };
            match p["push"].as_str() {
                Some("message") => {}
                Some("join" | "leave") => continue,
                _ => return Err(format!("subscriber {k} on {}: unexpected {p}", conn.node)),
            }
            let offset = p["offset"].as_u64().unwrap_or(0);
            let number: u64 = p["text"].as_str().and_then(|t| t.parse().ok()).unwrap_or(0);
            // Subscribed before the first message (epoch ""), it learns the
            // epoch from that message.
            if out.epoch.is_empty() {
                out.epoch = p["epoch"].as_str().unwrap_or_default().to_owned();
            }
            if p["channel"] != json!(channel) || p["epoch"] != json!(out.epoch) || number != offset
            {
                return Err(format!("subscriber {k} on {}: bad message {p}", conn.node));
            }
            out.seen.push(offset);
            if offset != last + 1 {
                return Err(format!(
                    "subscriber {k} on node {} (path {:?}): offset {offset} after {last}",
                    conn.node, out.path
                ));
            }
            last = offset;
            progress.lock().unwrap()[k] = format!(
                "on {} at {last}, {} drops, {} lost",
                conn.node, out.drops, out.lost
            );
            if last == N {
                return Ok(out);
            }
            budget -= 1;
            if budget == 0 {
                break Ok(());
            }
        };
        let from = conn.node.clone();
        match ended {
            Ok(()) => out.drops += 1,
            Err(_) if from == "c" && c_dead.load(Ordering::SeqCst) => out.lost += 1,
            Err(e) => {
                return Err(format!(
                    "subscriber {k}: its socket on node {from} failed at offset {last}: {e}"
                ))
            }
        }
        budget = budget_each;
        drop(conn); // the network goes away, for a while
        tokio::time::sleep(Duration::from_millis(10 + 15 * k as u64)).await;
        let mut attempt = 0;
        conn = loop {
            attempt += 1;
            let dead = c_dead.load(Ordering::SeqCst);
            let candidates: Vec<&(String, String)> = nodes
                .iter()
                .filter(|(name, _)| *name != from && !(dead && name == "c"))
                .collect();
            let (name, url) = candidates[(k + attempt + out.path.len()) % candidates.len()];
            match resubscribe(url, &channel, last, &out.epoch).await {
                Ok((n, missed)) => {
                    out.missed += missed;
                    break n;
                }
                Err(_) if name == "c" && c_dead.load(Ordering::SeqCst) && attempt < 10 => continue,
                Err(e) => {
                    return Err(format!(
                        "subscriber {k}: resubscribe on node {name} from {last} failed: {e}"
                    ))
                }
            }
        };
        out.path.push(conn.node.clone());
    }
}

/// The central promise of channels in a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_subscribers_and_a_killed_node_lose_and_duplicate_nothing() {
    moving_subscribers_and_a_killed_node_lose_and_duplicate_nothing_on(Bus::nats(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_subscribers_and_a_killed_node_lose_and_duplicate_nothing_over_redis() {
    moving_subscribers_and_a_killed_node_lose_and_duplicate_nothing_on(Bus::redis()).await;
}

async fn moving_subscribers_and_a_killed_node_lose_and_duplicate_nothing_on(bus: Bus) {
    let started = Instant::now();
    let (_nats, a, b, mut c) = channel_cluster(bus, "continuity", &[]).await;
    let ch = "room:seq";
    let nodes: Vec<(String, String)> = [&a, &b, &c]
        .iter()
        .map(|n| (n.node.clone(), n.ws_url("/native")))
        .collect();
    // Six subscribers, two per node, from the channel's beginning.
    let mut first = Vec::new();
    for k in 0..6 {
        let mut n = Native::connect([&a, &b, &c][k % 3]).await;
        let r = n.subscribe(ch).await;
        assert_eq!(
            r,
            json!({"epoch": "", "offset": 0}),
            "a channel without messages yet"
        );
        first.push(n);
    }

    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let publisher = {
        let url = a.api(&format!("/v1/channels/{ch}/messages"));
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut half_tx = Some(half_tx);
            let mut epoch = String::new();
            for i in 1..=N {
                let r = http
                    .post(&url)
                    .json(&json!({"text": i.to_string()}))
                    .send()
                    .await
                    .map_err(|e| format!("publish {i}: {e}"))?;
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                if i == 1 {
                    epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
                }
                if status != 200 || v["offset"] != i || v["epoch"] != json!(epoch) {
                    return Err(format!("publish {i}: {status} {body}"));
                }
                if i == N / 2 {
                    let _ = half_tx.take().unwrap().send(());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<String, String>(epoch)
        })
    };

    let c_dead = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Mutex::new(vec![String::new(); 6]));
    let subscribers: Vec<_> = first
        .into_iter()
        .enumerate()
        .map(|(k, n)| {
            tokio::spawn(continuity_subscriber(
                k,
                n,
                nodes.clone(),
                c_dead.clone(),
                ch.to_owned(),
                String::new(),
                progress.clone(),
            ))
        })
        .collect();

    // Node c is killed halfway.
    tokio::time::timeout(Duration::from_secs(30), half_rx)
        .await
        .expect("half of the messages published within 30s")
        .expect("the publisher is running");
    c_dead.store(true, Ordering::SeqCst);
    c.kill9().await;

    let deadline = started + Duration::from_secs(55);
    let results =
        tokio::time::timeout_at(deadline.into(), futures_util::future::join_all(subscribers))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "subscribers not done after {:?}: {:#?}",
                    started.elapsed(),
                    progress.lock().unwrap()
                )
            });
    let epoch = tokio::time::timeout_at(deadline.into(), publisher)
        .await
        .expect("publisher done")
        .expect("publisher task")
        .expect("every publish answered 200 with the next offset, in one epoch");
    let (mut lost, mut missed) = (0, 0);
    for (k, r) in results.into_iter().enumerate() {
        let out = r
            .expect("subscriber task")
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "subscriber {k}: {} drops, {} lost with c, {} recovered, path {:?}",
            out.drops, out.lost, out.missed, out.path
        );
        assert_eq!(
            out.seen,
            (1..=N).collect::<Vec<_>>(),
            "subscriber {k}: {out:?}"
        );
        assert_eq!(out.epoch, epoch, "subscriber {k}");
        assert!(
            out.drops + out.lost >= 2 && out.drops >= 2,
            "subscriber {k} dropped its socket {} times (lost {}), path {:?}",
            out.drops,
            out.lost,
            out.path
        );
        assert!(
            out.path.windows(2).all(|w| w[0] != w[1]),
            "always resubscribed on another node: {:?}",
            out.path
        );
        lost += out.lost;
        missed += out.missed;
    }
    assert!(missed > 0, "the resubscriptions recovered messages");
    assert!(lost >= 2, "both subscribers of c lost their socket with it");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// Publishes "`prefix`-0", "`prefix`-1", … (`count` of them, every 5 ms)
/// to `url` until one fails; returns the acknowledged (offset, text) pairs
/// and the first failure. After `signal_at` publishes, `signal` fires.
async fn publish_until_failure(
    url: String,
    prefix: &'static str,
    count: usize,
    signal_at: usize,
    mut signal: Option<tokio::sync::oneshot::Sender<()>>,
) -> (Vec<(u64, String)>, Option<String>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut acked = Vec::new();
    for i in 0..count {
        if i == signal_at {
            if let Some(s) = signal.take() {
                let _ = s.send(());
            }
        }
        let text = format!("{prefix}-{i}");
        let r = match http.post(&url).json(&json!({ "text": text })).send().await {
            Ok(r) => r,
            Err(e) => return (acked, Some(format!("{text}: {e}"))),
        };
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        match serde_json::from_str::<Value>(&body) {
            Ok(v) if status == 200 && v["offset"].is_u64() => {
                acked.push((v["offset"].as_u64().unwrap(), text))
            }
            _ => return (acked, Some(format!("{text}: {status} {body}"))),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (acked, None)
}

/// Publishers on the three nodes at once, and the node of one of them is
/// killed: the channel's offsets stay contiguous for the subscribers, and
/// every acknowledged publish reaches them once, at its offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_on_every_node_and_a_killed_one_leave_no_gap_and_no_duplicate() {
    let (_nats, a, b, mut c) = channel_cluster(Bus::nats(true), "killpub", &[]).await;
    let ch = "room:kp";
    let mut subs = vec![Native::connect(&a).await, Native::connect(&b).await];
    for s in &mut subs {
        s.subscribe(ch).await;
    }
    let url = |n: &Node| n.api(&format!("/v1/channels/{ch}/messages"));
    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let pa = tokio::spawn(publish_until_failure(url(&a), "a", 100, 50, Some(half_tx)));
    let pb = tokio::spawn(publish_until_failure(url(&b), "b", 100, 0, None));
    let pc = tokio::spawn(publish_until_failure(url(&c), "c", 1000, 0, None));
    tokio::time::timeout(Duration::from_secs(30), half_rx)
        .await
        .expect("50 publishes on a within 30s")
        .expect("publisher a running");
    c.kill9().await;
    let mut acked = Vec::new();
    for (who, p) in [("a", pa), ("b", pb), ("c", pc)] {
        let (list, failure) = tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("publisher done within 30s")
            .expect("publisher task");
        if who != "c" {
            assert_eq!(failure, None, "publisher {who} on a live node");
        } else {
            assert!(failure.is_some(), "publisher c stopped with its node");
        }
        acked.extend(list);
    }
    // A message c appended but did not broadcast comes with the next one.
    let end = publish(&a, ch, json!({"text": "end"})).await;
    let end = end["offset"].as_u64().unwrap();
    let mut by_offset = BTreeMap::new();
    for (offset, text) in &acked {
        if let Some(other) = by_offset.insert(*offset, text.clone()) {
            panic!("offset {offset} acknowledged twice: {other:?} and {text:?}");
        }
    }
    for s in &mut subs {
        let got = offsets_and_texts(&s.messages(end as usize).await);
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (1..=end).collect::<Vec<_>>(),
            "contiguous offsets on node {}",
            s.node
        );
        let texts: BTreeSet<&String> = got.iter().map(|(_, t)| t).collect();
        assert_eq!(
            texts.len(),
            got.len(),
            "no message twice on node {}",
            s.node
        );
        for (offset, text) in &got {
            if let Some(want) = by_offset.get(offset) {
                assert_eq!(text, want, "acknowledged message at offset {offset}");
            } else {
                assert!(
                    text.starts_with("c-") || text == "end",
                    "unacknowledged {text:?} at {offset} on node {}",
                    s.node
                );
            }
        }
        s.no_message(QUIET).await;
    }
}

/// NATS goes away and comes back (same JetStream store): publishes answer
/// 503 meanwhile, then the channel goes on in its epoch with no gap and no
/// duplicate for subscribers on two nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_go_on_without_gap_after_nats_restarts() {
    let (mut nats, a, b, c) = channel_cluster(Bus::nats(true), "natsrestart", &[]).await;
    let ch = "room:nr";
    let mut subs = vec![Native::connect(&a).await, Native::connect(&c).await];
    for s in &mut subs {
        s.subscribe(ch).await;
    }
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = publish(&b, ch, json!({"text": format!("m{i}")})).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    for s in &mut subs {
        assert_eq!(s.messages(5).await.last().unwrap()["offset"], 5);
    }

    // Without NATS a publish answers 503. Its outcome is unknown (the node
    // may have handed the append to the NATS client, which sends it once it
    // reconnects: control-api.md, "Publish"), so, as documented, it is
    // retried with its idempotency key until it is taken.
    nats.kill();
    let path = format!("/v1/channels/{ch}/messages");
    let body = json!({"text": "m6", "idempotency_key": "k-m6"});
    let t = Instant::now();
    let r = b.post(&path, &body).await;
    let took = t.elapsed();
    assert_eq!(
        (r.status, r.code()),
        (503, "cluster_unavailable".to_owned()),
        "publish without NATS: {}",
        r.body
    );
    assert!(took < 2 * QUICK, "answered after {took:?}");

    nats.restart();
    let first = poll(
        Duration::from_secs(20),
        "the publish retried through b after NATS restarted",
        || async {
            let r = b.post(&path, &body).await;
            if r.status == 200 {
                Ok(r.json())
            } else {
                Err(format!("{} {}", r.status, r.body))
            }
        },
    )
    .await;
    let h = a.get(&path).await.body;
    assert_eq!(
        (first["offset"].as_u64(), first["epoch"].as_str()),
        (Some(6), Some(epoch.as_str())),
        "the channel goes on in its epoch: {first}; history {h}"
    );
    for (i, node) in [(7, &a), (8, &c), (9, &b)] {
        let r = publish(node, ch, json!({"text": format!("m{i}")})).await;
        assert_eq!(r["offset"], i, "{r}");
    }
    let want: Vec<(u64, String)> = (6..=9).map(|i| (i, format!("m{i}"))).collect();
    for s in &mut subs {
        let got = offsets_and_texts(&s.messages(4).await);
        assert_eq!(got, want, "on node {}", s.node);
        s.no_message(QUIET).await;
    }
    let h = a.get(&path).await.json();
    assert_eq!(
        offsets_and_texts(&h["publications"].as_array().unwrap()[5..]),
        want,
        "the 503'd publish is in the log once: {h}"
    );
}

/// What one subscriber of the Redis restart test saw.
#[derive(Debug, Default)]
struct Resynced {
    /// The numbers received, in order, each with its epoch.
    seen: Vec<(u64, String)>,
    /// Positions in `seen` at which the subscriber was told that its
    /// position was lost (an `unsubscribed` push, or `recovered: false`).
    losses: Vec<usize>,
    /// The nodes it was subscribed through.
    path: Vec<String>,
}

/// One subscriber of the Redis restart test: like [`continuity_subscriber`],
/// it moves to another node every few messages with its position; a
/// subscription refused or a socket lost (the killed node, a node without
/// Redis) is tried again elsewhere. Told that its position is lost, it
/// subscribes again from the first message of the channel's current epoch.
/// A message out of order or from another epoch without having been told
/// is an error.
async fn resync_subscriber(
    k: usize,
    nodes: Vec<(String, String)>,
    c_dead: Arc<AtomicBool>,
    channel: String,
    progress: Arc<Mutex<Vec<String>>>,
) -> Result<Resynced, String> {
    let budget_each = 20 + 4 * k as u64;
    let mut out = Resynced::default();
    let (mut offset, mut epoch) = (0u64, String::new());
    let mut attempt = k;
    loop {
        // Subscribe somewhere else than last time, with the position.
        let conn = loop {
            attempt += 1;
            let dead = c_dead.load(Ordering::SeqCst);
            let last_node = out.path.last().cloned().unwrap_or_default();
            let candidates: Vec<&(String, String)> = nodes
                .iter()
                .filter(|(name, _)| *name != last_node && !(dead && name == "c"))
                .collect();
            let (_, url) = candidates[attempt % candidates.len()];
            let Ok(mut n) = Native::try_connect(url).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let since = json!({"offset": offset, "epoch": epoch});
            let r = n
                .try_call(json!({"cmd": "subscribe", "channel": channel, "since": since}))
                .await;
            match r {
                Ok(r) if r["result"]["recovered"] == true => break n,
                Ok(r) if r["result"]["recovered"] == false => {
                    // Said plainly: start over from the current epoch.
                    out.losses.push(out.seen.len());
                    (offset, epoch) = (0, String::new());
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        out.path.push(conn.node.clone());
        let mut conn = conn;
        let mut budget = budget_each;
        loop {
            let Ok(p) = conn.try_push(Duration::from_secs(10)).await else {
                break; // its node died or closed it: elsewhere
            };
            match p["push"].as_str() {
                Some("message") => {}
                Some("join" | "leave") => continue,
                Some("unsubscribed") => {
                    out.losses.push(out.seen.len());
                    break;
                }
                _ => return Err(format!("subscriber {k} on {}: unexpected {p}", conn.node)),
            }
            let number: u64 = p["text"].as_str().and_then(|t| t.parse().ok()).unwrap_or(0);
            let (o, e) = (
                p["offset"].as_u64().unwrap_or(0),
                p["epoch"].as_str().unwrap_or(""),
            );
            if (!epoch.is_empty() && e != epoch) || o != offset + 1 {
                return Err(format!(
                    "subscriber {k} on {} (path {:?}): offset {o} of epoch {e} after {offset} of {epoch:?}, untold",
                    conn.node, out.path
                ));
            }
            (offset, epoch) = (o, e.to_owned());
            out.seen.push((number, epoch.clone()));
            progress.lock().unwrap()[k] = format!("on {} at {number}", conn.node);
            if number == N {
                return Ok(out);
            }
            budget -= 1;
            if budget == 0 {
                break;
            }
        }
    }
}

/// Channels over Redis, when Redis itself restarts empty: six subscribers
/// moving between the nodes while 300 numbered messages are published, node
/// `c` SIGKILLed at a third and Redis killed at half (restarted a second
/// later, without its data). Every subscriber ends with every message once
/// and in order, except where it was told plainly (an `unsubscribed` push,
/// `recovered: false`) that its position was lost; a publish refused while
/// Redis is away answers 503 `cluster_unavailable` and is taken when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_channel_messages_only_with_recovered_false() {
    let started = Instant::now();
    let (mut redis, a, b, mut c) = channel_cluster(Bus::redis(), "redisrestart", &[]).await;
    let ch = "room:rr";
    let nodes: Vec<(String, String)> = [&a, &b, &c]
        .iter()
        .map(|n| (n.node.clone(), n.ws_url("/native")))
        .collect();
    let c_dead = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Mutex::new(vec![String::new(); 6]));
    let subscribers: Vec<_> = (0..6)
        .map(|k| {
            tokio::spawn(resync_subscriber(
                k,
                nodes.clone(),
                c_dead.clone(),
                ch.to_owned(),
                progress.clone(),
            ))
        })
        .collect();
    // Every subscriber is subscribed before the first message.
    poll(FORM, "six subscribers", || async {
        let r = a.get(&format!("/v1/channels/{ch}/presence")).await;
        match r.json()["clients"].as_u64() {
            Some(6) => Ok(()),
            other => Err(format!("{other:?}: {}", r.body)),
        }
    })
    .await;

    let url = a.api(&format!("/v1/channels/{ch}/messages"));
    let (third_tx, third_rx) = tokio::sync::oneshot::channel();
    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let publisher = tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (mut third_tx, mut half_tx) = (Some(third_tx), Some(half_tx));
        let mut refused = Vec::new();
        for i in 1..=N {
            let body = json!({"text": i.to_string(), "idempotency_key": format!("k{i}")});
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let r = http.post(&url).json(&body).send().await;
                let (status, text) = match r {
                    Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                    Err(e) => (0, e.to_string()),
                };
                if status == 200 {
                    break;
                }
                refused.push((status, text.clone()));
                if Instant::now() > deadline {
                    return Err(format!("publish {i}: {status} {text}"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if i == N / 3 {
                let _ = third_tx.take().unwrap().send(());
            }
            if i == N / 2 {
                let _ = half_tx.take().unwrap().send(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok::<_, String>(refused)
    });

    tokio::time::timeout(Duration::from_secs(30), third_rx)
        .await
        .expect("a third published within 30 s")
        .expect("the publisher is running");
    c_dead.store(true, Ordering::SeqCst);
    c.kill9().await;
    tokio::time::timeout(Duration::from_secs(30), half_rx)
        .await
        .expect("half published within 30 s")
        .expect("the publisher is running");
    redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart();

    let deadline = started + Duration::from_secs(80);
    let results =
        tokio::time::timeout_at(deadline.into(), futures_util::future::join_all(subscribers))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "subscribers not done after {:?}: {:#?}",
                    started.elapsed(),
                    progress.lock().unwrap()
                )
            });
    let refused = tokio::time::timeout_at(deadline.into(), publisher)
        .await
        .expect("publisher done")
        .expect("publisher task")
        .expect("every publish taken, retried while Redis was away");
    assert!(
        refused
            .iter()
            .all(|(status, body)| *status == 503 && body.contains("cluster_unavailable")),
        "refusals while Redis was away: {refused:?}"
    );
    assert!(!refused.is_empty(), "some publishes found Redis away");
    let mut told = 0;
    for (k, r) in results.into_iter().enumerate() {
        let out = r
            .expect("subscriber task")
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "subscriber {k}: {} messages, losses at {:?}, path {:?}",
            out.seen.len(),
            out.losses,
            out.path
        );
        assert_eq!(out.seen.first().map(|s| s.0), Some(1), "subscriber {k}");
        assert_eq!(out.seen.last().map(|s| s.0), Some(N), "subscriber {k}");
        for (i, w) in out.seen.windows(2).enumerate() {
            let ((n0, e0), (n1, e1)) = (&w[0], &w[1]);
            if out.losses.contains(&(i + 1)) {
                // Told: anything may have been lost here, or come again.
                continue;
            }
            assert!(
                *n1 == n0 + 1 && e0 == e1,
                "subscriber {k}: {n1} of {e1} after {n0} of {e0} without being told: {out:?}"
            );
        }
        told += usize::from(!out.losses.is_empty());
    }
    assert!(told > 0, "Redis lost the channel's log: someone was told");
}

// ---------------------------------------------------------------------------
// Raw connections subscribed by the origin
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_connection_subscribed_through_another_node_gets_plain_frames() {
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let (_nats, a, b, c) = channel_cluster(Bus::nats(true), "raw", &["--origin", &url]).await;
    let ch = "feed:r";
    let mut raw1 = connect(&b.ws_url("/raw1")).await;
    let id1 = origin.id_for(local_addr(&raw1)).await;
    assert_eq!(node_of(&id1), "b");

    // Subscribed through a (b holds the connection).
    let r = subscribe_through(&a, &id1, ch, None).await;
    assert_eq!(
        (r["already"].as_bool(), r["offset"].as_u64()),
        (Some(false), Some(0)),
        "{r}"
    );
    let again = subscribe_through(&c, &id1, ch, None).await;
    assert_eq!(again["already"], true, "{again}");
    // Raw connections are members.
    wait_presence(&[&a, &b, &c], ch, &[&id1], 0, QUICK).await;

    let epoch = publish(&c, ch, json!({"text": "t1"})).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    publish(&a, ch, json!({"binary": "AP8="})).await;
    assert_eq!(
        raw_next(&mut raw1, FRAME).await,
        Some(WsMessage::text("t1"))
    );
    assert_eq!(
        raw_next(&mut raw1, FRAME).await,
        Some(WsMessage::binary(vec![0u8, 255]))
    );

    // A second one, on c, subscribed through b from the channel's start:
    // the kept messages first, as plain frames.
    let mut raw2 = connect(&c.ws_url("/raw2")).await;
    let id2 = origin.id_for(local_addr(&raw2)).await;
    let r = subscribe_through(
        &b,
        &id2,
        ch,
        Some(json!({"since": {"offset": 0, "epoch": epoch}})),
    )
    .await;
    assert_eq!(r["recovered"], true, "{r}");
    publish(&b, ch, json!({"text": "t3"})).await;
    for want in [
        WsMessage::text("t1"),
        WsMessage::binary(vec![0u8, 255]),
        WsMessage::text("t3"),
    ] {
        assert_eq!(raw_next(&mut raw2, FRAME).await, Some(want));
    }
    assert_eq!(
        raw_next(&mut raw1, FRAME).await,
        Some(WsMessage::text("t3"))
    );

    // Unsubscribed through c: raw1 gets nothing more, raw2 goes on.
    let r = c
        .delete(&format!("/v1/connections/{id1}/channels/{ch}"))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    publish(&a, ch, json!({"text": "t4"})).await;
    assert_eq!(
        raw_next(&mut raw2, FRAME).await,
        Some(WsMessage::text("t4"))
    );
    assert_eq!(
        raw_next(&mut raw1, QUIET).await,
        None,
        "raw1 was unsubscribed"
    );
    assert_eq!(raw_next(&mut raw2, QUIET).await, None);

    // A native connection subscribed and unsubscribed by the origin through
    // other nodes: a `subscribed` push with the channel's position, the
    // messages, an `unsubscribed` push.
    let mut native = Native::connect(&a).await;
    let r = subscribe_through(&c, &native.client, ch, None).await;
    assert_eq!(
        (r["offset"].as_u64(), r["already"].as_bool()),
        (Some(4), Some(false)),
        "{r}"
    );
    assert_eq!(
        native.push().await,
        json!({"push": "subscribed", "channel": ch, "epoch": epoch, "offset": 4})
    );
    publish(&b, ch, json!({"text": "t5"})).await;
    assert_eq!(
        offsets_and_texts(&[native.message().await]),
        vec![(5, "t5".to_owned())]
    );
    assert_eq!(
        raw_next(&mut raw2, FRAME).await,
        Some(WsMessage::text("t5"))
    );
    let r = b
        .delete(&format!("/v1/connections/{}/channels/{ch}", native.client))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        native.push().await,
        json!({"push": "unsubscribed", "channel": ch})
    );
    publish(&c, ch, json!({"text": "t6"})).await;
    assert_eq!(
        raw_next(&mut raw2, FRAME).await,
        Some(WsMessage::text("t6"))
    );
    native.no_message(QUIET).await;
}

// ---------------------------------------------------------------------------
// Channel commands over NATS
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_commands_over_nats_span_the_cluster() {
    // b is only reached through its NATS subject.
    let (nats, a, _b, c) = channel_cluster(Bus::nats(true), "natsctl", &[]).await;
    let nc = nats_connect(&nats.url()).await;
    let ch = "room:ctl";
    let mut on_a = Native::connect(&a).await;
    let mut on_c = Native::connect(&c).await;
    on_a.subscribe(ch).await;
    on_c.subscribe(ch).await;
    // Through the queue group (any node) and through node b's own subject.
    let (status, r1) = command(
        &nc,
        "natsctl.control",
        json!({"op": "publish", "channel": ch, "text": "over nats", "idempotency_key": "n-1"}),
    )
    .await;
    assert_eq!((status, r1["offset"].as_u64()), (200, Some(1)), "{r1}");
    let (status, r2) = command(
        &nc,
        "natsctl.node.b.control",
        json!({"op": "publish", "channel": ch, "binary": "AAEC"}),
    )
    .await;
    assert_eq!((status, r2["offset"].as_u64()), (200, Some(2)), "{r2}");
    let (status, again) = command(
        &nc,
        "natsctl.node.c.control",
        json!({"op": "publish", "channel": ch, "text": "over nats", "idempotency_key": "n-1"}),
    )
    .await;
    assert_eq!(
        (
            status,
            again["duplicate"].as_bool(),
            again["offset"].as_u64()
        ),
        (200, Some(true), Some(1)),
        "{again}"
    );
    for n in [&mut on_a, &mut on_c] {
        let m = n.messages(2).await;
        assert_eq!(
            (m[0]["offset"].as_u64(), m[0]["text"].as_str()),
            (Some(1), Some("over nats"))
        );
        assert_eq!(
            (m[1]["offset"].as_u64(), m[1]["binary"].as_str()),
            (Some(2), Some("AAEC"))
        );
        n.no_message(QUIET).await;
    }
    let (status, h) = command(
        &nc,
        "natsctl.node.b.control",
        json!({"op": "history", "channel": ch, "limit": 1}),
    )
    .await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["publications"].as_array().map(Vec::len), Some(1), "{h}");
    assert_eq!(h["publications"][0]["binary"], "AAEC", "{h}");
    let (status, p) = command(
        &nc,
        "natsctl.node.b.control",
        json!({"op": "presence", "channel": ch}),
    )
    .await;
    assert_eq!(status, 200, "{p}");
    let listed: BTreeSet<&str> = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["client"].as_str())
        .collect();
    assert_eq!(
        listed,
        BTreeSet::from([on_a.client.as_str(), on_c.client.as_str()]),
        "presence over NATS on b: {p}"
    );
}

// ---------------------------------------------------------------------------
// The Rust SDK
// ---------------------------------------------------------------------------

/// The next event of an SDK subscription (5 s at most).
async fn next_event(sub: &mut switchboard_client::Subscription) -> SubscriptionEvent {
    tokio::time::timeout(FRAME, sub.recv())
        .await
        .expect("a subscription event within 5s")
        .expect("the subscription goes on")
}

/// The next SDK message, as (offset, text).
async fn next_sdk_message(sub: &mut switchboard_client::Subscription) -> (u64, String) {
    loop {
        match next_event(sub).await {
            SubscriptionEvent::Message(m) => {
                return (m.offset, m.text().unwrap_or("<binary>").to_owned())
            }
            SubscriptionEvent::Join(_) | SubscriptionEvent::Leave(_) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

fn sdk(node: &Node) -> Client {
    Client::builder(node.ws_url("/sdk"))
        .backoff_initial(Duration::from_millis(50))
        .backoff_max(Duration::from_millis(200))
        .command_timeout(FRAME)
        .connect()
        .expect("SDK client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_sdk_gets_messages_from_other_nodes_and_recovers_through_the_cluster() {
    let (_nats, a, b, c) = channel_cluster(Bus::nats(true), "sdk", &[]).await;
    let ch = "room:sdk";
    let on_a = sdk(&a);
    tokio::time::timeout(FRAME, on_a.wait_connected())
        .await
        .expect("connected within 5s")
        .expect("connects");
    let mut sub = on_a.subscribe(ch).await.expect("subscribe");
    match next_event(&mut sub).await {
        SubscriptionEvent::Subscribed {
            offset: 0,
            recovered: None,
            ..
        } => {}
        other => panic!("expected Subscribed at offset 0, got {other:?}"),
    };
    let mut epoch = String::new();
    for i in 1..=10u64 {
        let r = publish(&c, ch, json!({"text": i.to_string()})).await;
        epoch = r["epoch"].as_str().unwrap().to_owned();
    }
    for i in 1..=10u64 {
        assert_eq!(next_sdk_message(&mut sub).await, (i, i.to_string()));
    }

    // Its connection is closed through b (a holds it); messages go on
    // meanwhile; the SDK reconnects and recovers exactly.
    let id = on_a.client_id().expect("connected");
    assert_eq!(node_of(&id), "a");
    let r = b.delete(&format!("/v1/connections/{id}")).await;
    assert_eq!(r.status, 202, "{}", r.body);
    for i in 11..=20u64 {
        publish(&c, ch, json!({"text": i.to_string()})).await;
    }
    let mut got = Vec::new();
    let mut resubscribed = false;
    while got.len() < 10 {
        match next_event(&mut sub).await {
            SubscriptionEvent::Subscribed {
                recovered,
                epoch: e,
                ..
            } => {
                assert_eq!((recovered, &e), (Some(true), &epoch));
                resubscribed = true;
            }
            SubscriptionEvent::Message(m) => {
                got.push((m.offset, m.text().unwrap_or("<binary>").to_owned()))
            }
            SubscriptionEvent::Join(_) | SubscriptionEvent::Leave(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(resubscribed, "the SDK resubscribed");
    assert_eq!(
        got,
        (11..=20u64).map(|i| (i, i.to_string())).collect::<Vec<_>>()
    );

    // History, presence and publish through an SDK client on b.
    let on_b = sdk(&b);
    let h = on_b.history(ch, None, None).await.expect("history");
    assert_eq!((h.epoch.as_str(), h.offset), (epoch.as_str(), 20));
    let texts: Vec<(u64, Payload)> = h
        .publications
        .iter()
        .map(|p| (p.offset, p.data.clone()))
        .collect();
    assert_eq!(
        texts,
        (1..=20u64)
            .map(|i| (i, Payload::Text(i.to_string())))
            .collect::<Vec<_>>()
    );
    let since = StreamPosition {
        offset: 15,
        epoch: epoch.clone(),
    };
    let h = on_b
        .history(ch, Some(since), None)
        .await
        .expect("history since");
    assert_eq!(h.recovered, Some(true));
    assert_eq!(
        h.publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
        vec![16, 17, 18, 19, 20]
    );
    let h = on_b
        .history(ch, None, Some(3))
        .await
        .expect("history limit");
    assert_eq!(
        h.publications.iter().map(|p| p.offset).collect::<Vec<_>>(),
        vec![18, 19, 20]
    );
    let now_a = on_a.client_id().expect("reconnected");
    poll(QUICK, "the SDK client of a in presence on b", || async {
        let p = on_b.presence(ch).await.map_err(|e| e.to_string())?;
        if p.members.iter().any(|m| m.client == now_a) && p.clients == 1 {
            Ok(())
        } else {
            Err(format!("{p:?}"))
        }
    })
    .await;
    let r = on_b.publish(ch, "from b").await.expect("publish");
    assert_eq!(r.offset, 21);
    assert_eq!(next_sdk_message(&mut sub).await, (21, "from b".to_owned()));
    on_a.close().await;
    on_b.close().await;
}

// ---------------------------------------------------------------------------
// Namespace limits changed between runs
// ---------------------------------------------------------------------------

/// A node started with a larger `history-size` than the stream was made
/// with brings the namespace's stream to it (the only case that updates a
/// stream; nodes starting together with the same limits only create it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_new_history_limits_updates_the_namespace_stream() {
    let nats = NatsServer::start(true);
    let ch = "log:x";
    let a = start_node(
        "a",
        &nats.url(),
        "limits",
        &["--namespace", "log:history-size=3"],
    )
    .await;
    for i in 1..=5 {
        publish(&a, ch, json!({"text": i.to_string()})).await;
    }
    let h = a.get(&format!("/v1/channels/{ch}/messages")).await.json();
    assert_eq!(
        h["publications"].as_array().unwrap().len(),
        3,
        "history-size=3 keeps 3: {h}"
    );
    drop(a);

    let b = start_node(
        "b",
        &nats.url(),
        "limits",
        &["--namespace", "log:history-size=10"],
    )
    .await;
    for i in 6..=15 {
        publish(&b, ch, json!({"text": i.to_string()})).await;
    }
    let h = b.get(&format!("/v1/channels/{ch}/messages")).await.json();
    let want: Vec<(u64, String)> = (6..=15).map(|i| (i, i.to_string())).collect();
    assert_eq!(
        offsets_and_texts(h["publications"].as_array().unwrap()),
        want,
        "the stream now keeps 10 per channel: {h}"
    );
}

/// Redis with its data on disk (`appendonly yes`, fsync always) is
/// SIGKILLed and restarted: nothing was lost, but nothing tells the nodes
/// so (a snapshot or a replica could lack the last writes), so the
/// channel's next publish starts a new epoch, and a subscriber whose node
/// held a position is told plainly: `unsubscribed`, then `recovered: false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_with_its_data_still_starts_a_new_epoch_plainly() {
    let redis = Bus::Redis(switchboard_test_util::redis::RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]));
    let (mut redis, a, b, _c) = channel_cluster(redis, "persisted", &[]).await;
    let ch = "room:kept";
    let mut sub = Native::connect(&b).await;
    sub.subscribe(ch).await;
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = publish(&a, ch, json!({"text": format!("m{i}")})).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    assert_eq!(sub.messages(5).await.last().unwrap()["offset"], 5);
    redis.restart();
    let after = poll(
        Duration::from_secs(20),
        "a publish after the restart",
        || async {
            let r = a
                .post(
                    &format!("/v1/channels/{ch}/messages"),
                    &json!({"text": "m6"}),
                )
                .await;
            if r.status == 200 {
                Ok(r.json())
            } else {
                Err(format!("{} {}", r.status, r.body))
            }
        },
    )
    .await;
    assert_ne!(after["epoch"], json!(epoch), "a new epoch: {after}");
    assert_eq!(after["offset"], 1, "{after}");
    let p = sub.push().await;
    assert_eq!(p["push"], "unsubscribed", "told plainly: {p}");
    let mut again = Native::connect(&b).await;
    let r = again
        .call(json!({"cmd": "subscribe", "channel": ch, "since": {"offset": 5, "epoch": epoch}}))
        .await;
    assert_eq!(r["result"]["recovered"], false, "{r}");
}
