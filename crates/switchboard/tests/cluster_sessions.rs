//! Sessions across a cluster (docs/sessions.md, "In a cluster"), end to end:
//! a test-started `nats-server` with JetStream, three real `switchboard`
//! processes on it, a recording HTTP origin, Rust SDK clients behind a
//! round-robin TCP balancer (no sticky sessions: each reconnect lands on
//! the next node), and the origin's numbered direct messages and a
//! publisher's numbered channel messages running throughout.
//!
//! What it proves:
//! - a session resumes on whichever node its client reaches: the node takes
//!   it from the one holding it (same connection id, its kept direct
//!   messages, its channels), while commands sent to its id on any node
//!   follow it; a node that dies meanwhile (SIGKILL, the session elsewhere,
//!   the connection id naming it) changes nothing;
//! - a rolling restart (SIGTERM each node in turn, started again under the
//!   same id) loses nothing: the draining node closes its clients with 1012
//!   keeping their sessions, and they resume on the other nodes;
//! - a session outlives the death of the node holding it (SIGKILL), or its
//!   stall (SIGSTOP, then fenced on return): the node reporting the loss
//!   adopts it from JetStream, and its client resumes on another node with
//!   the same id;
//! - in all, every client ends with every direct message and every channel
//!   message exactly once and in order, never a new session, and the origin
//!   sees one `connect` and, when the client closes, one `disconnect` per
//!   session (after the death, a message whose send was refused and sent
//!   again may come twice: at least once, as documented).
//!
//! Every wait and load loop is bounded.

mod common;

use common::{start_node, wait_member_ids, Bus, Node, FORM};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard_client::{Client, ClientEvent, SubscriptionEvent};
use switchboard_test_util::TestOrigin;

/// Channels with history kept in JetStream (recovery on any node).
const ROOM: &str = "room:history-size=10000,history-ttl=10m,subscribe,publish";
/// Bound of the whole traffic of a test, and of its last deliveries.
const RUN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A TCP load balancer: each new connection goes to the next backend that
/// accepts it, round robin; [`Balancer::cut`] drops every connection
/// through it at once (no close frame: the sessions are lost sockets).
struct Balancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    cut: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Balancer {
    async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(backends));
        let cut = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let (list, gen) = (backends.clone(), cut.clone());
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (list, next) = (list.clone(), next.clone());
                let mut cut = gen.subscribe();
                tokio::spawn(async move {
                    let targets = list.lock().unwrap().clone();
                    let start = next.fetch_add(1, Ordering::Relaxed);
                    let mut outbound = None;
                    for i in 0..targets.len() {
                        let t = targets[(start + i) % targets.len()];
                        if let Ok(s) = tokio::net::TcpStream::connect(t).await {
                            outbound = Some(s);
                            break;
                        }
                    }
                    let Some(mut outbound) = outbound else {
                        return;
                    };
                    cut.borrow_and_update();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            backends,
            cut,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/app", self.addr)
    }

    fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap() = backends;
    }

    fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

/// Control API addresses the test's senders may use (not a node about to
/// be stopped: a request cut short would leave its outcome unknown).
#[derive(Clone, Default)]
struct Targets(Arc<Mutex<Vec<SocketAddr>>>);

impl Targets {
    fn set(&self, addrs: Vec<SocketAddr>) {
        *self.0.lock().unwrap() = addrs;
    }

    fn pick(&self, i: usize) -> SocketAddr {
        let all = self.0.lock().unwrap();
        all[i % all.len()]
    }
}

/// `POST path` on one of `targets`' control APIs, retried on the next one
/// while it cannot connect; the answer's status and JSON body.
async fn post(
    targets: &Targets,
    i: usize,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let http = reqwest::Client::new();
    for attempt in 0..20 {
        let addr = targets.pick(i + attempt);
        match http
            .post(format!("http://{addr}{path}"))
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status().as_u16();
                return (status, r.json().await.unwrap_or_default());
            }
            Err(e) if e.is_connect() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("POST {path} on {addr}: {e}"),
        }
    }
    panic!("POST {path}: no node to send to");
}

/// Sends `n` numbered direct messages (`d1` …) to each of `ids` in turn,
/// through the `targets`, each answered `delivered` or `queued`.
async fn send_directs(targets: Targets, ids: Vec<String>, n: usize, pace: Duration) {
    for i in 1..=n {
        for (k, id) in ids.iter().enumerate() {
            let body = json!({ "text": format!("d{i}") });
            let (status, r) = post(
                &targets,
                i + k,
                &format!("/v1/connections/{id}/messages"),
                &body,
            )
            .await;
            assert!(
                status == 200 && (r["status"] == "delivered" || r["status"] == "queued"),
                "direct d{i} to {id}: {status} {r} at {:?}",
                std::time::SystemTime::now()
            );
        }
        tokio::time::sleep(pace).await;
    }
}

/// Publishes `n` numbered messages (`c1` …) on `channel` through the
/// `targets` (idempotent: a retried publish is not published twice).
async fn publish(targets: Targets, channel: String, n: usize, pace: Duration) {
    for i in 1..=n {
        let body = json!({ "text": format!("c{i}"), "idempotency_key": format!("c{i}") });
        let (status, r) = post(
            &targets,
            i,
            &format!("/v1/channels/{channel}/messages"),
            &body,
        )
        .await;
        assert_eq!(status, 200, "publish c{i}: {r}");
        tokio::time::sleep(pace).await;
    }
}

/// What one SDK client received: direct messages (seq, text) and channel
/// messages, in order, and every new session it had to start.
#[derive(Default)]
struct Received {
    directs: Vec<(u64, String)>,
    channel: Vec<String>,
    restarted: Vec<String>,
    resumed_on: Vec<String>,
}

/// An SDK client through `balancer`, subscribed to `channel`; collects
/// what it receives until `stop`.
async fn sdk_client(
    url: &str,
    channel: &str,
    stop: Arc<AtomicBool>,
) -> (Client, String, Arc<Mutex<Received>>) {
    let client = Client::builder(url)
        .backoff_initial(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(200))
        .connect()
        .unwrap();
    let mut events = client.events();
    tokio::time::timeout(Duration::from_secs(10), client.wait_connected())
        .await
        .expect("connected in time")
        .expect("connects");
    let id = client.client_id().unwrap();
    let mut sub = client.subscribe(channel).await.unwrap();
    let got = Arc::new(Mutex::new(Received::default()));
    let g = got.clone();
    let stop2 = stop.clone();
    tokio::spawn(async move {
        while !stop2.load(Ordering::Relaxed) {
            let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await
            else {
                continue;
            };
            let mut g = g.lock().unwrap();
            match e {
                ClientEvent::Direct(m) => g
                    .directs
                    .push((m.seq.unwrap_or(0), m.text().unwrap_or_default().to_owned())),
                ClientEvent::Restarted {
                    client_id, error, ..
                } => g.restarted.push(format!("{client_id}: {error:?}")),
                ClientEvent::Resumed { node, .. } => g.resumed_on.push(node),
                _ => {}
            }
        }
    });
    let g = got.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await
            else {
                continue;
            };
            match e {
                SubscriptionEvent::Message(m) => g
                    .lock()
                    .unwrap()
                    .channel
                    .push(m.text().unwrap_or_default().to_owned()),
                SubscriptionEvent::Gap { .. } => g.lock().unwrap().channel.push("GAP".into()),
                _ => {}
            }
        }
    });
    (client, id, got)
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

/// Waits (within [`RUN`]) until `got` holds `n` direct and `n` channel
/// messages, then checks they are exactly the numbered ones, in order, with
/// consecutive sequences, and that no new session was started.
async fn expect_everything(who: &str, got: &Mutex<Received>, n: usize) {
    let deadline = tokio::time::Instant::now() + RUN;
    loop {
        let (d, c, restarted, resumed_on) = {
            let g = got.lock().unwrap();
            (
                g.directs.len(),
                g.channel.len(),
                g.restarted.clone(),
                g.resumed_on.clone(),
            )
        };
        if d >= n && c >= n {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{who}: {d} direct and {c} channel messages of {n} after {RUN:?}; \
             new sessions {restarted:?}, resumed on {resumed_on:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing more (no duplicate) comes after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let g = got.lock().unwrap();
    assert!(
        g.restarted.is_empty(),
        "{who} started new sessions: {:?}",
        g.restarted
    );
    let texts: Vec<String> = g.directs.iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(texts, numbered("d", n), "{who}: direct messages");
    let seqs: Vec<u64> = g.directs.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>(), "{who}: sequences");
    assert_eq!(g.channel, numbered("c", n), "{who}: channel messages");
}

/// Fails the test with `error` after the gateway's log lines of every
/// node (what the nodes did with the session is the diagnosis).
fn fail_with_logs<'a>(nodes: impl Iterator<Item = &'a mut Node>, error: &dyn std::fmt::Debug) -> ! {
    for n in nodes {
        let log = n.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("switchboard_server") && !l.contains("heartbeat"))
            .collect();
        eprintln!("=== node {}\n{}", n.node, lines.join("\n"));
    }
    panic!("{error:?}");
}

/// The origin saw exactly one `connect` for `id` and no `disconnect` yet.
fn one_connect_no_disconnect(origin: &TestOrigin, id: &str) {
    let connects = origin
        .connects()
        .iter()
        .filter(|c| c.connection_id == id)
        .count();
    assert_eq!(connects, 1, "connects of {id}");
    assert_eq!(
        origin.disconnects_of(id).len(),
        0,
        "disconnects of {id}: {:?}",
        origin.disconnects_of(id)
    );
}

async fn node(id: &str, bus: &Bus, origin: &TestOrigin, prefix: &str) -> Node {
    let url = origin.url();
    start_node(
        id,
        &bus.url(),
        prefix,
        &["--origin", url.as_str(), "--namespace", ROOM],
    )
    .await
}

/// `bus` (a JetStream nats-server, or Redis), a recording origin, and nodes
/// `a`, `b` and `c` of the cluster `prefix`, once each lists all three.
async fn three_nodes(bus: Bus, prefix: &str) -> (Bus, TestOrigin, Node, Node, Node) {
    let nats = bus;
    let origin = TestOrigin::start(None).await;
    let (a, b, c) = tokio::join!(
        node("a", &nats, &origin, prefix),
        node("b", &nats, &origin, prefix),
        node("c", &nats, &origin, prefix),
    );
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    (nats, origin, a, b, c)
}

/// A balancer sending to node `c` only, and an SDK client through it
/// subscribed to `channel`, so that its session is held by `c` and its id
/// names `c`; the flag that stops its collectors.
async fn client_on_c(
    c: &Node,
    channel: &str,
) -> (
    Balancer,
    Arc<AtomicBool>,
    Client,
    String,
    Arc<Mutex<Received>>,
) {
    let balancer = Balancer::start(vec![c.listen]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (client, id, got) = sdk_client(&balancer.url(), channel, stop.clone()).await;
    assert!(id.starts_with("c."), "{id}");
    (balancer, stop, client, id, got)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// One client's socket is cut 15 times while the origin sends it 1,000
/// numbered direct messages and a publisher publishes 1,000 numbered
/// channel messages; each reconnect lands on the next node, so the session
/// moves from node to node. Its connection id names node `c`, which is
/// SIGKILLed midway (the session elsewhere): commands still reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_from_node_to_node_with_nothing_lost_or_repeated() {
    a_session_moves_from_node_to_node_with_nothing_lost_or_repeated_on(Bus::nats(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_from_node_to_node_with_nothing_lost_or_repeated_over_redis() {
    a_session_moves_from_node_to_node_with_nothing_lost_or_repeated_on(Bus::redis()).await;
}

async fn a_session_moves_from_node_to_node_with_nothing_lost_or_repeated_on(bus: Bus) {
    const N: usize = 1000;
    let (_nats, origin, a, b, mut c) = three_nodes(bus, "moves").await;
    // Started on c, so that its id names c.
    let (balancer, stop, client, id, got) = client_on_c(&c, "room:moves").await;
    balancer.set_backends(vec![a.listen, b.listen, c.listen]);

    let targets = Targets::default();
    targets.set(vec![a.control, b.control]);
    let pace = Duration::from_millis(4);
    let directs = tokio::spawn(send_directs(targets.clone(), vec![id.clone()], N, pace));
    let channel = tokio::spawn(publish(targets.clone(), "room:moves".into(), N, pace));

    for cut in 0..15 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if cut == 7 {
            // c leaves the balancer; once the session is elsewhere, it dies.
            balancer.set_backends(vec![a.listen, b.listen]);
            balancer.cut();
            common::poll(
                Duration::from_secs(10),
                "the session off node c",
                || async {
                    let r = a.get(&format!("/v1/connections/{id}")).await;
                    let node = r.json()["node"].as_str().unwrap_or_default().to_owned();
                    if r.status == 200 && node != "c" && r.json()["suspended"] == false {
                        Ok(())
                    } else {
                        Err(r.body)
                    }
                },
            )
            .await;
            c.kill9().await;
            continue;
        }
        balancer.cut();
    }
    let r = tokio::time::timeout(RUN, directs)
        .await
        .expect("directs sent in time");
    if let Err(e) = r {
        let mut nodes = [a, b, c];
        fail_with_logs(nodes.iter_mut(), &e);
    }
    tokio::time::timeout(RUN, channel)
        .await
        .expect("published in time")
        .unwrap();
    expect_everything("the client", &got, N).await;
    let resumed_on = got.lock().unwrap().resumed_on.clone();
    assert!(
        resumed_on.iter().any(|n| n == "a") && resumed_on.iter().any(|n| n == "b"),
        "resumed on both a and b: {resumed_on:?}"
    );
    one_connect_no_disconnect(&origin, &id);

    client.close().await;
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(
        d.closed_by,
        switchboard_proto::origin::ClosedBy::Client,
        "{d:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(origin.disconnects_of(&id).len(), 1);
    stop.store(true, Ordering::Relaxed);
}

/// A rolling restart: each node in turn is taken out of the balancer,
/// SIGTERMed, started again under the same id and put back, while four
/// clients get numbered direct messages and channel messages. Nothing is
/// lost or repeated, no client starts a new session, and the origin sees
/// one `connect` per session and no `disconnect` until the clients close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing() {
    a_rolling_restart_loses_nothing_on(Bus::nats(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_over_redis() {
    a_rolling_restart_loses_nothing_on(Bus::redis()).await;
}

async fn a_rolling_restart_loses_nothing_on(bus: Bus) {
    const N: usize = 300;
    const CLIENTS: usize = 4;
    let (nats, origin, a, b, c) = three_nodes(bus, "rolling").await;
    let mut nodes = vec![a, b, c];
    let mut old: Vec<Node> = Vec::new();
    let balancer = Balancer::start(nodes.iter().map(|n| n.listen).collect()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(sdk_client(&balancer.url(), "room:rolling", stop.clone()).await);
    }
    let ids: Vec<String> = clients.iter().map(|(_, id, _)| id.clone()).collect();
    let targets = Targets::default();
    targets.set(nodes.iter().map(|n| n.control).collect());
    let pace = Duration::from_millis(25);
    let directs = tokio::spawn(send_directs(targets.clone(), ids.clone(), N, pace));
    let channel = tokio::spawn(publish(targets.clone(), "room:rolling".into(), N, pace));

    for k in 0..nodes.len() {
        let name = nodes[k].node.clone();
        let others = |nodes: &[Node], f: fn(&Node) -> SocketAddr| -> Vec<SocketAddr> {
            nodes.iter().filter(|n| n.node != name).map(f).collect()
        };
        balancer.set_backends(others(&nodes, |n| n.listen));
        targets.set(others(&nodes, |n| n.control));
        let status = nodes[k].sigterm().await;
        assert!(
            status.success(),
            "node {name} drained and exited: {status:?}"
        );
        let log = nodes[k].final_log().await;
        assert!(log.contains("sessions handed over"), "{log}");
        let again = node(&name, &nats, &origin, "rolling").await;
        old.push(std::mem::replace(&mut nodes[k], again));
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_member_ids(&refs, &["a", "b", "c"], FORM).await;
        balancer.set_backends(nodes.iter().map(|n| n.listen).collect());
        targets.set(nodes.iter().map(|n| n.control).collect());
    }
    let r = tokio::time::timeout(RUN, directs)
        .await
        .expect("directs sent in time");
    if let Err(e) = r {
        fail_with_logs(old.iter_mut().chain(nodes.iter_mut()), &e);
    }
    tokio::time::timeout(RUN, channel)
        .await
        .expect("published in time")
        .unwrap();
    for (i, (_, id, got)) in clients.iter().enumerate() {
        expect_everything(&format!("client {i} ({id})"), got, N).await;
        one_connect_no_disconnect(&origin, id);
    }
    for (client, id, _) in &clients {
        client.close().await;
        origin.wait_disconnect(id).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &ids {
        assert_eq!(origin.disconnects_of(id).len(), 1, "one disconnect of {id}");
    }
    stop.store(true, Ordering::Relaxed);
}

/// Sends `n` numbered direct messages (`d1` …) to `id` through the
/// `targets`, each retried while it is refused for the moment (503: the
/// session's node was lost and it is being adopted; 504: that node did not
/// answer). Returns the numbers with a refused or failed attempt: one that
/// may have reached the client before it was refused is sent twice.
async fn send_directs_retrying(
    targets: Targets,
    id: String,
    n: usize,
    pace: Duration,
) -> Vec<usize> {
    let mut retried = Vec::new();
    for i in 1..=n {
        let body = json!({ "text": format!("d{i}") });
        let deadline = tokio::time::Instant::now() + RUN;
        for attempt in 0.. {
            let (status, r) = post(
                &targets,
                i + attempt,
                &format!("/v1/connections/{id}/messages"),
                &body,
            )
            .await;
            if status == 200 && (r["status"] == "delivered" || r["status"] == "queued") {
                break;
            }
            assert!(
                (status == 503 || status == 504) && tokio::time::Instant::now() < deadline,
                "direct d{i} to {id}: {status} {r}"
            );
            if retried.last() != Some(&i) {
                retried.push(i);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(pace).await;
    }
    retried
}

/// The node holding a session is SIGKILLed while the origin sends it
/// numbered direct messages and a publisher publishes numbered channel
/// messages. The node that reports it lost adopts the session from the
/// session store; the client resumes on the node it reaches, which takes it
/// from there. Nothing is lost; only a message whose send was refused while
/// the node was lost (and sent again) may come twice; the session is the
/// same (no new session, one `connect` and no `disconnect`), and the
/// origin's `node_down` lists it as kept, and only it: a session that ended
/// on that node before is not brought back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_the_death_of_its_node() {
    a_session_outlives_the_death_of_its_node_on(Bus::nats(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_the_death_of_its_node_over_redis() {
    a_session_outlives_the_death_of_its_node_on(Bus::redis()).await;
}

async fn a_session_outlives_the_death_of_its_node_on(bus: Bus) {
    const N: usize = 600;
    let (_nats, origin, a, b, mut c) = three_nodes(bus, "dies").await;
    // Held by c from the start.
    let (balancer, stop, client, id, got) = client_on_c(&c, "room:dies").await;
    // Another session on c ends (its client closes it) before c dies: it
    // leaves the session store, and is not adopted.
    let (closer, closed_id, _) = sdk_client(&balancer.url(), "room:dies", stop.clone()).await;
    closer.close().await;
    origin.wait_disconnect(&closed_id).await;

    let targets = Targets::default();
    targets.set(vec![a.control, b.control]);
    let pace = Duration::from_millis(4);
    let directs = tokio::spawn(send_directs_retrying(targets.clone(), id.clone(), N, pace));
    let channel = tokio::spawn(publish(targets.clone(), "room:dies".into(), N, pace));

    // Midway, c dies with the session on it; the client comes back through
    // a or b.
    wait_directs(&got, N / 3).await;
    balancer.set_backends(vec![a.listen, b.listen]);
    c.kill9().await;
    balancer.cut();

    let r = tokio::time::timeout(RUN, directs)
        .await
        .expect("directs sent in time");
    let retried = match r {
        Ok(retried) => retried,
        Err(e) => {
            let mut nodes = [a, b, c];
            fail_with_logs(nodes.iter_mut(), &e);
        }
    };
    tokio::time::timeout(RUN, channel)
        .await
        .expect("published in time")
        .unwrap();

    // Every direct message, in order; twice only if sent twice.
    if let Err(why) = wait_all_kept(&got, N).await {
        let mut nodes = [a, b, c];
        fail_with_logs(nodes.iter_mut(), &why);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    check_kept_session(&got.lock().unwrap(), &retried, N);
    one_connect_no_disconnect(&origin, &id);
    let events = origin
        .wait_events(Duration::from_secs(10), |events| {
            events
                .iter()
                .any(|e| matches!(e, switchboard_proto::origin::Event::NodeDown(_)))
        })
        .await;
    let down: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            switchboard_proto::origin::Event::NodeDown(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0].down_node, "c");
    assert_eq!(down[0].sessions_kept, vec![id.clone()], "{down:?}");
    assert_eq!(
        origin.disconnects_of(&closed_id).len(),
        1,
        "one disconnect of the ended session"
    );

    client.close().await;
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(
        d.closed_by,
        switchboard_proto::origin::ClosedBy::Client,
        "{d:?}"
    );
    stop.store(true, Ordering::Relaxed);
}

/// The node holding a session is frozen (SIGSTOP) long enough to be
/// reported lost: another node adopts the session, and the client resumes
/// there. When the frozen node is thawed it finds the report and fences
/// itself: it sends no `disconnect` for the session and cannot write its
/// record back, so the session lives on where it was adopted, and messages
/// sent afterwards reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_s_session_is_adopted_and_the_node_fenced_on_return() {
    a_stalled_node_s_session_is_adopted_and_the_node_fenced_on_return_on(Bus::nats(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_s_session_is_adopted_and_the_node_fenced_on_return_over_redis() {
    a_stalled_node_s_session_is_adopted_and_the_node_fenced_on_return_on(Bus::redis()).await;
}

async fn a_stalled_node_s_session_is_adopted_and_the_node_fenced_on_return_on(bus: Bus) {
    const N: usize = 300;
    let (_nats, origin, a, b, c) = three_nodes(bus, "stalls").await;
    let (balancer, stop, client, id, got) = client_on_c(&c, "room:stalls").await;
    let targets = Targets::default();
    targets.set(vec![a.control, b.control]);
    let pace = Duration::from_millis(8);
    let directs = tokio::spawn(send_directs_retrying(targets.clone(), id.clone(), N, pace));
    let channel = tokio::spawn(publish(targets.clone(), "room:stalls".into(), N, pace));
    wait_directs(&got, N / 3).await;
    // c stalls; its client's network changes: it comes back through a or b.
    c.freeze().await;
    balancer.set_backends(vec![a.listen, b.listen]);
    balancer.cut();
    // Reported lost, its session adopted, the client resumed elsewhere.
    common::poll(Duration::from_secs(20), "the client resumed", || async {
        let g = got.lock().unwrap();
        if g.resumed_on.iter().any(|n| n == "a" || n == "b") {
            Ok(())
        } else {
            Err(format!("{:?} {:?}", g.resumed_on, g.restarted))
        }
    })
    .await;
    c.thaw();
    let retried = tokio::time::timeout(RUN, directs)
        .await
        .expect("directs sent in time")
        .expect("directs sent");
    tokio::time::timeout(RUN, channel)
        .await
        .expect("published in time")
        .unwrap();
    wait_all_kept(&got, N).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    check_kept_session(&got.lock().unwrap(), &retried, N);
    // c fenced itself, and told the origin nothing of the session.
    let mut c = c;
    c.wait_log("this node was reported lost").await;
    one_connect_no_disconnect(&origin, &id);
    let r = a.get(&format!("/v1/connections/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_ne!(r.json()["node"], "c", "{}", r.body);
    let r = a
        .post(
            &format!("/v1/connections/{id}/messages"),
            &json!({"text": "after"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    common::poll(
        Duration::from_secs(10),
        "the message after the thaw",
        || async {
            let g = got.lock().unwrap();
            if g.directs.last().is_some_and(|(_, t)| t == "after") {
                Ok(())
            } else {
                Err(format!("{:?}", g.directs.last()))
            }
        },
    )
    .await;
    client.close().await;
    origin.wait_disconnect(&id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(origin.disconnects_of(&id).len(), 1);
    stop.store(true, Ordering::Relaxed);
}

/// Waits (within 20 s) until `got` holds `n` direct messages.
async fn wait_directs(got: &Mutex<Received>, n: usize) {
    common::poll(Duration::from_secs(20), "direct messages", || async {
        let have = got.lock().unwrap().directs.len();
        if have >= n {
            Ok(())
        } else {
            Err(format!("{have} of {n}"))
        }
    })
    .await;
}

/// Waits (within [`RUN`]) until `got` holds `n` different direct messages
/// and `n` channel messages; what it holds if not.
async fn wait_all_kept(got: &Mutex<Received>, n: usize) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + RUN;
    loop {
        {
            let g = got.lock().unwrap();
            let mut seen: Vec<&String> = g.directs.iter().map(|(_, t)| t).collect();
            seen.dedup();
            if seen.len() >= n && g.channel.len() >= n {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{} directs, {} channel messages of {n}; new sessions {:?}; resumed on {:?}",
                    g.directs.len(),
                    g.channel.len(),
                    g.restarted,
                    g.resumed_on
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a client whose session outlived its node received: no new session,
/// resumed on a or b, direct sequences increasing, every direct message in
/// order (twice only those sent twice: `retried`), every channel message
/// once and in order.
fn check_kept_session(g: &Received, retried: &[usize], n: usize) {
    assert!(g.restarted.is_empty(), "new sessions: {:?}", g.restarted);
    assert!(
        g.resumed_on.iter().any(|n| n == "a" || n == "b"),
        "resumed on a or b: {:?}",
        g.resumed_on
    );
    let seqs: Vec<u64> = g.directs.iter().map(|(s, _)| *s).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "direct sequences increase: {seqs:?}"
    );
    let mut first: Vec<String> = Vec::new();
    for (_, text) in &g.directs {
        let k: usize = text[1..].parse().unwrap();
        if first.contains(text) {
            assert!(
                retried.contains(&k),
                "{text} twice, never refused: retried {retried:?}"
            );
            continue;
        }
        first.push(text.clone());
    }
    assert_eq!(first, numbered("d", n), "direct messages");
    assert_eq!(g.channel, numbered("c", n), "channel messages");
}

/// Redis restarts without its data while a session is suspended on node
/// `c` with 50 unacknowledged direct messages: the nodes notice (the
/// generation key changed) and write their sessions again, records and
/// messages, so that when `c` is SIGKILLed afterwards the session is still
/// adopted, and resumed elsewhere with every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_a_redis_restart_then_the_death_of_its_node() {
    const N: usize = 50;
    let (mut bus, origin, a, b, mut c) = three_nodes(Bus::redis(), "wiped").await;
    let (balancer, stop, client, id, got) = client_on_c(&c, "room:wiped").await;
    // The client goes away: its session waits on c.
    balancer.set_backends(Vec::new());
    balancer.cut();
    let targets = Targets::default();
    targets.set(vec![a.control]);
    for i in 1..=N {
        let (status, r) = post(
            &targets,
            i,
            &format!("/v1/connections/{id}/messages"),
            &json!({ "text": format!("d{i}") }),
        )
        .await;
        assert_eq!((status, r["status"].as_str()), (200, Some("queued")), "{r}");
    }
    let Bus::Redis(redis) = &mut bus else {
        unreachable!("a Redis test")
    };
    let stored = |redis: &switchboard_test_util::redis::RedisServer| {
        let messages = redis.command(&["XLEN", &format!("wiped:smsg:{{{id}}}")]);
        let record = redis.command(&["HEXISTS", "{wiped}:sessions", &id]);
        (messages.trim().to_owned(), record.trim().to_owned())
    };
    assert_eq!(stored(redis), (format!(":{N}"), ":1".to_owned()));
    redis.restart();
    common::poll(Duration::from_secs(10), "the session written again", || {
        let now = stored(redis);
        async move {
            if now == (format!(":{N}"), ":1".to_owned()) {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        }
    })
    .await;

    c.kill9().await;
    balancer.set_backends(vec![a.listen, b.listen]);
    wait_directs(&got, N).await;
    {
        let g = got.lock().unwrap();
        let texts: Vec<&str> = g.directs.iter().map(|(_, t)| t.as_str()).collect();
        let want: Vec<String> = (1..=N).map(|i| format!("d{i}")).collect();
        assert_eq!(texts, want, "every message once, in order");
        assert!(g.restarted.is_empty(), "no new session: {:?}", g.restarted);
    }
    one_connect_no_disconnect(&origin, &id);
    client.close().await;
    stop.store(true, Ordering::Relaxed);
}
