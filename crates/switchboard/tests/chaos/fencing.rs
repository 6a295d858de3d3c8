//! Fencing (docs/cluster.md#fencing): a node that the cluster reported lost
//! — stalled by SIGSTOP, or cut off from NATS — says nothing more to the
//! origin about its connections once `node_down` is out, and closes them
//! with 1012 when it finds out; a short cut-off only delays its events.

use crate::common::{poll, start_node, wait_member_ids, CutProxy, Node, FORM, HEARTBEAT_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use switchboard_proto::origin::Event;
use switchboard_test_util::nats::NatsServer;
use switchboard_test_util::{connect, local_addr, metric_value, TestOrigin, WsMessage};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A client that sends a numbered text message every 20 ms until told to
/// stop or closed; its task returns the close code it got (`None`: still
/// open when stopped).
struct Chatter {
    id: String,
    task: JoinHandle<Option<u16>>,
}

async fn chatter(
    node: &Node,
    origin: &TestOrigin,
    path: &str,
    stop: &watch::Receiver<bool>,
) -> Chatter {
    let mut ws = connect(&node.ws_url(path)).await;
    let id = origin.id_for(local_addr(&ws)).await;
    let mut stop = stop.clone();
    let tag = path.trim_start_matches('/').to_owned();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut n = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    n += 1;
                    // A frozen node's socket buffers fill slowly; a failed
                    // send means the connection is going away.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        ws.send(WsMessage::text(format!("{tag}-{n}"))),
                    )
                    .await;
                }
                msg = ws.next() => match msg {
                    Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => {}
                    _ => return Some(1006),
                },
                _ = stop.changed() => return None,
            }
        }
    });
    Chatter { id, task }
}

/// The position of the `node_down` of `node` among the origin's events.
fn node_down_at(events: &[Event], node: &str) -> Option<usize> {
    events
        .iter()
        .position(|e| matches!(e, Event::NodeDown(d) if d.down_node == node))
}

/// Events about `ids` that the origin received after position `after`.
fn events_after(events: &[Event], after: usize, ids: &HashSet<String>) -> Vec<String> {
    events[after + 1..]
        .iter()
        .filter_map(|e| {
            let about = match e {
                Event::Message(m) => ids.contains(&m.connection_id),
                Event::Disconnect(d) => ids.contains(&d.connection_id),
                Event::Keepalive(k) => k.connection_ids.iter().any(|c| ids.contains(c)),
                _ => false,
            };
            about.then(|| format!("{e:?}"))
        })
        .collect()
}

/// How long after the heartbeat timeout the survivor may take to report.
const REPORT_SLACK: Duration = Duration::from_secs(3);

/// Waits until every chatter has ended with 1012, within `within`.
async fn expect_fenced(chatters: Vec<Chatter>, within: Duration) {
    for c in chatters {
        let code = tokio::time::timeout(within, c.task)
            .await
            .unwrap_or_else(|_| panic!("{} not closed within {within:?}", c.id))
            .expect("chatter task");
        assert_eq!(code, Some(1012), "{}", c.id);
    }
}

/// Checks the origin's record: `node_down` for `node` came, and after it no
/// event about `ids`; and no `disconnect` for them at all.
fn assert_silent_after_node_down(origin: &TestOrigin, node: &str, ids: &HashSet<String>) {
    let events = origin.events();
    let at = node_down_at(&events, node).expect("node_down sent");
    let late = events_after(&events, at, ids);
    assert!(
        late.is_empty(),
        "{} events after node_down: {late:#?}",
        late.len()
    );
    for id in ids {
        assert!(origin.disconnects_of(id).is_empty(), "disconnect for {id}");
        assert!(
            !origin.messages_of(id).is_empty(),
            "no message of {id} reached the origin"
        );
    }
    let downs = events
        .iter()
        .filter(|e| matches!(e, Event::NodeDown(_)))
        .count();
    assert_eq!(downs, 1, "node_down events");
}

/// SIGSTOP a node holding busy connections for longer than the heartbeat
/// timeout: the other node reports it; thawed, it sends not one event about
/// its connections, closes them with 1012, and serves anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_says_nothing_after_node_down_and_closes_its_clients() {
    let nats = NatsServer::start(true);
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let extra = ["--origin", url.as_str()];
    let nats_url = nats.url();
    let (a, b) = tokio::join!(
        start_node("a", &nats_url, "stall", &extra),
        start_node("b", &nats_url, "stall", &extra),
    );
    wait_member_ids(&[&a, &b], &["a", "b"], FORM).await;
    let (_stop_tx, stop) = watch::channel(false);
    let mut chatters = Vec::new();
    for i in 0..4 {
        chatters.push(chatter(&b, &origin, &format!("/s{i}"), &stop).await);
    }
    let ids: HashSet<String> = chatters.iter().map(|c| c.id.clone()).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    b.freeze().await;
    origin
        .wait_events(HEARTBEAT_TIMEOUT + REPORT_SLACK, |evs| {
            node_down_at(evs, "b").is_some()
        })
        .await;
    // Stalled well past the report, as a long pause would be.
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.thaw();

    expect_fenced(chatters, Duration::from_secs(10)).await;
    // Anything late would have arrived by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_silent_after_node_down(&origin, "b", &ids);
    let metrics = b.get("/metrics").await.body;
    assert_eq!(metric_value(&metrics, "switchboard_fences_total"), 1.0);

    // A member again, taking new clients whose events flow.
    wait_member_ids(&[&a, &b], &["a", "b"], FORM).await;
    let mut ws = connect(&b.ws_url("/after")).await;
    let id = origin.id_for(local_addr(&ws)).await;
    ws.send(WsMessage::text("after the fence")).await.unwrap();
    origin.wait_messages(&id, 1).await;
}

/// A node cut off from NATS past the heartbeat timeout holds its events
/// from the moment its lease runs out; back, it finds the report and fences
/// itself: nothing about its connections after `node_down`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_holds_its_events_then_fences_itself() {
    let nats = NatsServer::start(true);
    let proxy = CutProxy::start(([127, 0, 0, 1], nats.port()).into()).await;
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let extra = ["--origin", url.as_str()];
    let (nats_url, proxy_url) = (nats.url(), proxy.url());
    let (a, b) = tokio::join!(
        start_node("a", &nats_url, "cutoff", &extra),
        start_node("b", &proxy_url, "cutoff", &extra),
    );
    wait_member_ids(&[&a, &b], &["a", "b"], FORM).await;
    let (_stop_tx, stop) = watch::channel(false);
    let mut chatters = Vec::new();
    for i in 0..4 {
        chatters.push(chatter(&b, &origin, &format!("/c{i}"), &stop).await);
    }
    let ids: HashSet<String> = chatters.iter().map(|c| c.id.clone()).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    proxy.set_cut(true);
    origin
        .wait_events(HEARTBEAT_TIMEOUT + REPORT_SLACK, |evs| {
            node_down_at(evs, "b").is_some()
        })
        .await;
    // While cut off, b refuses new clients (it may be retired any moment).
    let refused = switchboard_test_util::connect_with(&b.ws_url("/new"), &[]).await;
    assert!(refused.is_err(), "a cut-off node accepted a client");
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set_cut(false);

    expect_fenced(chatters, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_silent_after_node_down(&origin, "b", &ids);
}

/// A cut-off shorter than the heartbeat timeout but longer than the lease:
/// events are held while the lease has run out and delivered once it is
/// renewed, every message once and in order; no report, no fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_cut_off_only_delays_events() {
    let nats = NatsServer::start(true);
    let proxy = CutProxy::start(([127, 0, 0, 1], nats.port()).into()).await;
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    // A 6 s timeout: the lease runs 3 s after each heartbeat.
    let extra = [
        "--origin",
        url.as_str(),
        "--cluster-heartbeat-timeout",
        "6s",
    ];
    let (nats_url, proxy_url) = (nats.url(), proxy.url());
    let (a, b) = tokio::join!(
        start_node("a", &nats_url, "short", &extra),
        start_node("b", &proxy_url, "short", &extra),
    );
    wait_member_ids(&[&a, &b], &["a", "b"], FORM).await;
    let (stop_tx, stop) = watch::channel(false);
    let c = chatter(&b, &origin, "/short", &stop).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    proxy.set_cut(true);
    let cut = Instant::now();
    // Past the lease (3 s): b's events are held.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let held_from = origin.messages_of(&c.id).len();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        origin.messages_of(&c.id).len(),
        held_from,
        "events sent while the lease had run out"
    );
    proxy.set_cut(false);
    // Held events leave once the lease is renewed.
    poll(
        Duration::from_secs(5),
        "held messages delivered",
        || async {
            let n = origin.messages_of(&c.id).len();
            if n > held_from + 20 {
                Ok(())
            } else {
                Err(format!("{n} messages, {held_from} before"))
            }
        },
    )
    .await;
    assert!(
        cut.elapsed() < Duration::from_secs(6),
        "the cut lasted a timeout"
    );
    stop_tx.send(true).unwrap();
    assert_eq!(c.task.await.unwrap(), None, "the client was closed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let texts: Vec<String> = origin
        .messages_of(&c.id)
        .into_iter()
        .map(|m| match m.payload {
            switchboard_proto::origin::Payload::Text(t) => t,
            other => panic!("{other:?}"),
        })
        .collect();
    let want: Vec<String> = (1..=texts.len()).map(|n| format!("short-{n}")).collect();
    assert_eq!(texts, want, "messages lost, repeated or reordered");
    assert!(
        node_down_at(&origin.events(), "b").is_none(),
        "b was reported"
    );
    let metrics = b.get("/metrics").await.body;
    assert_eq!(metric_value(&metrics, "switchboard_fences_total"), 0.0);
    drop(a);
}
