//! The origin over Redis Streams (`--origin redis`), end to end: a Redis
//! started by the test, two real `switchboard` nodes on it with two event
//! partitions, and an origin written here the way docs/origin.md tells
//! one to be written (consumer groups, `XACK`, `XAUTOCLAIM`, answers
//! published on the decision's `reply` channel).
//!
//! What it proves:
//! - `connect` decisions: accepted with the origin's answer applied (the
//!   user id), refused with its status and reason, and 503 when nobody
//!   answers within `--origin-timeout`;
//! - events: every client message of every connection reaches the origin,
//!   in order per connection, in the partition its connection id hashes to,
//!   also when the worker crashes with entries read and not acknowledged
//!   and a new worker claims them: nothing lost;
//! - control commands appended to `<prefix>:control` are run by one node
//!   (forwarded to the connection's node) and answered on their `reply`
//!   channel.
//!
//! Every wait is bounded.

mod common;

use common::{refusal, start_three, wait_member_ids, Bus, FORM};
use futures_util::{SinkExt, StreamExt};
use redis::AsyncCommands;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard_test_util::{next_msg, WsMessage};

const PREFIX: &str = "orr";
const GROUP: &str = "origin";

type Entry = (String, Vec<(String, redis::Value)>);

fn field(entry: &Entry, name: &str) -> String {
    entry
        .1
        .iter()
        .find_map(|(n, v)| match v {
            redis::Value::BulkString(b) if n == name => {
                Some(String::from_utf8_lossy(b).into_owned())
            }
            _ => None,
        })
        .unwrap_or_default()
}

async fn read_group(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    consumer: &str,
) -> Vec<Entry> {
    let found: Option<Vec<(String, Vec<Entry>)>> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(100)
        .arg("BLOCK")
        .arg(100)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await
        .expect("XREADGROUP");
    found.into_iter().flatten().flat_map(|(_, e)| e).collect()
}

/// Answers `connect` decisions: paths ending in `/deny` are refused with
/// 403, `/silent` get no answer, the others are accepted as user `u1`.
async fn decide(client: redis::Client, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stream = format!("{PREFIX}:decisions");
    let _: redis::RedisResult<()> = conn.xgroup_create_mkstream(&stream, GROUP, "0").await;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        for entry in read_group(&mut conn, &stream, "decider").await {
            let batch: Value = serde_json::from_str(&field(&entry, "batch")).unwrap();
            let event = &batch["events"][0];
            let path = event["path"].as_str().unwrap_or_default();
            let answer = if path.ends_with("/deny") {
                Some(json!({"id": event["id"], "status": 403, "reason": "not you"}))
            } else if path.ends_with("/silent") {
                None
            } else {
                Some(json!({"id": event["id"], "answer": {"user_id": "u1"}}))
            };
            if let Some(answer) = answer {
                let _: i64 = conn
                    .publish(field(&entry, "reply"), answer.to_string())
                    .await
                    .unwrap();
            }
            let _: i64 = conn.xack(&stream, GROUP, &[&entry.0]).await.unwrap();
        }
    }
}

/// What the event workers processed: per connection, the message texts in
/// the order processed, and per partition the connections seen.
#[derive(Debug, Default)]
struct Processed {
    texts: BTreeMap<String, Vec<String>>,
    partition_of: BTreeMap<String, usize>,
}

fn process(entry: &Entry, partition: usize, into: &Mutex<Processed>) {
    let batch: Value = serde_json::from_str(&field(entry, "batch")).unwrap();
    let mut p = into.lock().unwrap();
    for e in batch["events"].as_array().unwrap() {
        let Some(id) = e["connection_id"].as_str() else {
            continue;
        };
        let seen = *p.partition_of.entry(id.to_owned()).or_insert(partition);
        assert_eq!(seen, partition, "one connection, one partition: {e}");
        if e["type"] == "message" {
            let text = e["text"].as_str().unwrap_or_default().to_owned();
            p.texts.entry(id.to_owned()).or_default().push(text);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_over_redis_streams_with_a_worker_that_crashes() {
    let bus = Bus::redis();
    let url = bus.url();
    let (a, b, _c) = start_three(
        &url,
        PREFIX,
        &[
            "--origin",
            "redis",
            "--origin-timeout",
            "1s",
            "--redis-event-partitions",
            "2",
        ],
    )
    .await;
    wait_member_ids(&[&a, &b, &_c], &["a", "b", "c"], FORM).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let decider = tokio::spawn(decide(client.clone(), stop.clone()));

    // Decisions: refused with the origin's status and reason; 503 without
    // an answer within --origin-timeout.
    let body = refusal(&a.ws_url("/deny"), 403, "a refused client was accepted").await;
    assert!(body.contains("not you"), "{body}");
    let t = Instant::now();
    let body = refusal(&b.ws_url("/silent"), 503, "accepted without an answer").await;
    assert!(body.contains("origin_unavailable"), "{body}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );

    // Eight clients over the two nodes, each sending 200 numbered messages.
    const M: usize = 200;
    let mut clients = Vec::new();
    for k in 0..8 {
        let node = if k % 2 == 0 { &a } else { &b };
        let ws = switchboard_test_util::connect(&node.ws_url("/in")).await;
        clients.push(ws);
    }
    let mut events = client.get_multiplexed_async_connection().await.unwrap();
    for k in 0..2 {
        let _: redis::RedisResult<()> = events
            .xgroup_create_mkstream(format!("{PREFIX}:events:{k}"), GROUP, "0")
            .await;
    }
    let processed = Arc::new(Mutex::new(Processed::default()));
    let senders: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, mut ws)| {
            tokio::spawn(async move {
                for i in 1..=M {
                    ws.send(WsMessage::text(format!("{k}-{i}"))).await.unwrap();
                    if i % 50 == 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                ws
            })
        })
        .collect();

    // Worker 1 processes some, then crashes with a read batch unacknowledged.
    let mut crashed_with = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rounds = 0;
    while Instant::now() < deadline && crashed_with == 0 {
        rounds += 1;
        for k in 0..2 {
            let stream = format!("{PREFIX}:events:{k}");
            let entries = read_group(&mut events, &stream, "w1").await;
            if rounds >= 3 && !entries.is_empty() {
                crashed_with += entries.len(); // read, never processed nor acked
                continue;
            }
            for entry in &entries {
                process(entry, k, &processed);
                let _: i64 = events.xack(&stream, GROUP, &[&entry.0]).await.unwrap();
            }
        }
    }
    assert!(crashed_with > 0, "worker 1 crashed holding entries");

    // Worker 2 claims what worker 1 left pending, then reads on.
    let mut clients = Vec::new();
    for s in senders {
        clients.push(s.await.unwrap());
    }
    let want = |p: &Processed| p.texts.values().map(Vec::len).sum::<usize>() >= 8 * M;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut claimed = 0;
    while !want(&processed.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "all messages processed within 20 s: {:?}",
            processed
                .lock()
                .unwrap()
                .texts
                .values()
                .map(Vec::len)
                .collect::<Vec<_>>()
        );
        for k in 0..2 {
            let stream = format!("{PREFIX}:events:{k}");
            let (_, pending, _): (String, Vec<Entry>, redis::Value) = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg("w2")
                .arg(0)
                .arg("0-0")
                .arg("COUNT")
                .arg(100)
                .query_async(&mut events)
                .await
                .unwrap();
            claimed += pending.len();
            let mut entries = pending;
            entries.extend(read_group(&mut events, &stream, "w2").await);
            for entry in &entries {
                process(entry, k, &processed);
                let _: i64 = events.xack(&stream, GROUP, &[&entry.0]).await.unwrap();
            }
        }
    }
    assert!(
        claimed >= crashed_with,
        "claimed {claimed} of {crashed_with}"
    );
    let owner_of = {
        let p = processed.lock().unwrap();
        assert_eq!(p.texts.len(), 8, "eight connections");
        for texts in p.texts.values() {
            let k = texts[0].split('-').next().unwrap().to_owned();
            let want: Vec<String> = (1..=M).map(|i| format!("{k}-{i}")).collect();
            assert_eq!(texts, &want, "every message once, in order");
        }
        let partitions: std::collections::BTreeSet<usize> =
            p.partition_of.values().copied().collect();
        assert_eq!(
            partitions.len(),
            2,
            "both partitions used: {:?}",
            p.partition_of
        );
        let owner_of: BTreeMap<String, usize> = p
            .texts
            .iter()
            .map(|(id, texts)| {
                (
                    id.clone(),
                    texts[0].split('-').next().unwrap().parse().unwrap(),
                )
            })
            .collect();
        owner_of
    };

    // A control command on the stream: run by some node, answered.
    let (target, owner) = owner_of
        .iter()
        .find(|(id, _)| id.starts_with("b."))
        .map(|(id, k)| (id.clone(), *k))
        .unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe("orr-test-reply").await.unwrap();
    let command = json!({"op": "send", "connection_id": target, "text": "from the stream"});
    let entry: String = events
        .xadd(
            format!("{PREFIX}:control"),
            "*",
            &[
                ("command", command.to_string()),
                ("reply", "orr-test-reply".into()),
            ],
        )
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.on_message().next())
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let answer: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(
        (answer["id"].as_str(), answer["status"].as_u64()),
        (Some(entry.as_str()), Some(200)),
        "{answer}"
    );
    let mut ws = clients.remove(owner);
    let got = tokio::time::timeout(Duration::from_secs(5), next_msg(&mut ws)).await;
    assert_eq!(got.ok(), Some(WsMessage::text("from the stream")));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    decider.await.unwrap();
}
