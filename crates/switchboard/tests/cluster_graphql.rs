//! GraphQL subscriptions in a cluster (`docs/graphql.md`): three real
//! `switchboard` processes on one `nats-server`, a scripted GraphQL origin
//! counting its requests, and 1,000 `graphql-transport-ws` clients spread
//! over the nodes on 10 distinct inputs.
//!
//! What it proves: one trigger publication, taken by one node, reaches
//! every node, costs exactly one origin request per distinct input across
//! the whole cluster (the digest's owner executes it; the others ask the
//! owner), and every subscriber gets the result once; the same with the
//! trigger published over NATS (`<prefix>.control`).

mod common;

use common::{command, nats_connect, start_three, wait_member_ids, Node, FORM};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use switchboard_test_util::graphql::GraphqlOrigin;
use switchboard_test_util::nats::NatsServer;
use switchboard_test_util::{connect_with, metric_value, next_json, Ws, WsMessage, WAIT};

const CLIENTS: usize = 1000;
const INPUTS: usize = 10;

/// A client of `node` subscribed to input `i`, its initial result read.
async fn subscriber(node: &Node, i: usize) -> Ws {
    let (mut ws, _) = connect_with(
        &node.ws_url("/graphql"),
        &[("sec-websocket-protocol", "graphql-transport-ws")],
    )
    .await
    .expect("upgrade");
    let send = |v: Value| WsMessage::Text(v.to_string().into());
    ws.send(send(json!({"type": "connection_init"})))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    let op = json!({"query": "subscription { value }",
                    "variables": {"key": "all", "digest": format!("input-{i}")}});
    ws.send(send(json!({"type": "subscribe", "id": "s", "payload": op})))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut ws).await["payload"],
        json!({"data": {"value": 0}})
    );
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trigger_costs_one_origin_request_per_distinct_input_cluster_wide() {
    let nats = NatsServer::start(false);
    let gql = GraphqlOrigin::start().await;
    let endpoint = gql.url();
    let extra = [
        "--graphql-endpoint",
        endpoint.as_str(),
        "--graphql-timeout",
        "500ms",
        "--cluster-request-timeout",
        "3s",
        "--client-message-rate",
        "0",
        // 333 clients per node from one address, faster than its burst.
        "--max-handshakes-per-ip",
        "0",
    ];
    let (a, b, c) = start_three(&nats.url(), "graphql", &extra).await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    let nodes = [&a, &b, &c];

    let mut clients = Vec::with_capacity(CLIENTS);
    for batch in (0..CLIENTS).collect::<Vec<_>>().chunks(100) {
        let opened = futures_util::future::join_all(
            batch.iter().map(|&n| subscriber(nodes[n % 3], n % INPUTS)),
        )
        .await;
        clients.extend(opened);
    }
    let initial = gql.requests().len();
    assert_eq!(initial, CLIENTS, "one first execution per subscription");

    gql.set("all", 42);
    let r = a
        .post("/v1/graphql/triggers", &json!({"triggers": ["all"]}))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json(), json!({"nodes": 3, "failed_nodes": []}));

    let delivered = futures_util::future::join_all(clients.iter_mut().map(|ws| async move {
        let m = next_json(ws).await;
        assert_eq!(m["type"], "next", "{m}");
        m["payload"].clone()
    }))
    .await;
    assert!(delivered
        .iter()
        .all(|p| *p == json!({"data": {"value": 42}})));
    assert_eq!(delivered.len(), CLIENTS);

    // Nothing more comes: one request per input, whichever node asked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let re = gql.re_executions();
    assert_eq!(re, INPUTS, "one origin request per distinct input");
    let mut digests: Vec<String> = gql
        .requests()
        .iter()
        .filter(|r| r.trigger().is_some())
        .map(|r| r.body["variables"]["digest"].as_str().unwrap().to_owned())
        .collect();
    digests.sort();
    digests.dedup();
    assert_eq!(digests.len(), INPUTS);
    for ws in &mut clients {
        let quiet = tokio::time::timeout(Duration::from_millis(5), ws.next()).await;
        assert!(
            matches!(quiet, Err(_) | Ok(Some(Ok(WsMessage::Ping(_))))),
            "a second result: {quiet:?}"
        );
    }

    // The same over NATS (`<prefix>.control`), as an origin may publish.
    gql.set("all", 43);
    let client = nats_connect(&nats.url()).await;
    let (status, body) = command(
        &client,
        "graphql.control",
        json!({"op": "graphql_trigger", "triggers": ["all"]}),
    )
    .await;
    assert_eq!((status, body["nodes"].clone()), (202, json!(3)), "{body}");
    for ws in &mut clients {
        assert_eq!(
            next_json(ws).await["payload"],
            json!({"data": {"value": 43}})
        );
    }
    assert_eq!(gql.wait_re_executions(2 * INPUTS, WAIT).await, 2 * INPUTS);
}

/// A digest's owner that does not answer (frozen) costs time, never a
/// result: the asking nodes execute the digest themselves, and the trigger
/// names the node that missed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_does_not_answer_costs_a_second_request_not_a_result() {
    let nats = NatsServer::start(false);
    let gql = GraphqlOrigin::start().await;
    let endpoint = gql.url();
    // c stays a member while frozen (heartbeat timeout 5 s); an owner is
    // waited for graphql-timeout + cluster-request-timeout (2 s).
    let extra = [
        "--graphql-endpoint",
        endpoint.as_str(),
        "--graphql-timeout",
        "1s",
        "--cluster-heartbeat-timeout",
        "5s",
    ];
    let (a, b, c) = start_three(&nats.url(), "graphql-owner", &extra).await;
    wait_member_ids(&[&a, &b, &c], &["a", "b", "c"], FORM).await;
    // 30 distinct inputs on a and b: some are owned by c (all but surely:
    // each is with probability 1/3).
    const N: usize = 30;
    let mut clients = Vec::new();
    for i in 0..N {
        clients.push(subscriber([&a, &b][i % 2], i).await);
    }
    c.freeze().await;
    gql.set("all", 7);
    let r = a
        .post("/v1/graphql/triggers", &json!({"triggers": ["all"]}))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json(), json!({"nodes": 2, "failed_nodes": ["c"]}));
    for ws in &mut clients {
        assert_eq!(
            next_json(ws).await["payload"],
            json!({"data": {"value": 7}})
        );
    }
    let mut failed = 0.0;
    for node in [&a, &b] {
        let text = node.get("/metrics").await.body;
        failed += metric_value(
            &text,
            "switchboard_graphql_owner_requests_total{result=\"failed\"}",
        );
    }
    assert!(failed >= 1.0, "no digest was owned by the frozen node");
    c.thaw();
}
