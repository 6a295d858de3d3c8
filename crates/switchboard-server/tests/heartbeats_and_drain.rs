//! Liveness and shutdown: pings and pong timeouts, the idle timeout, and the
//! graceful drain (1012 to every client, `/readyz` 503, every `disconnect`
//! delivered before the drain returns, bounded by `drain-timeout`), and a
//! node whose `run` is dropped no longer accepting.

use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use switchboard_proto::origin::ClosedBy;
use switchboard_server::DrainReport;
use switchboard_test_util::*;

const PING: Duration = Duration::from_millis(150);
const PONG: Duration = Duration::from_millis(250);

async fn heartbeat_gateway(origin: &TestOrigin) -> TestGateway {
    TestGateway::with_origin(origin, |c| {
        c.ping_interval = PING;
        c.pong_timeout = PONG;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_pings_is_dropped() {
    let origin = TestOrigin::start(None).await;
    let gw = heartbeat_gateway(&origin).await;
    let started = Instant::now();
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let id = origin.id_for(raw.local_addr).await;
    // Reads, but never sends anything back.
    let frames = raw.expect_eof(Duration::from_secs(3)).await;
    let took = started.elapsed();
    assert!(
        frames.iter().any(|f| f.opcode == OP_PING),
        "no ping seen: {frames:?}"
    );
    assert!(frames.iter().all(|f| f.opcode == OP_PING), "{frames:?}");
    assert!(
        took >= PING + PONG - Duration::from_millis(50),
        "dropped too early: {took:?}"
    );
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(
        (d.code, d.reason.as_str(), d.closed_by),
        (1006, "pong timeout", ClosedBy::Gateway)
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_answer_pings_stay_connected() {
    let origin = TestOrigin::start(None).await;
    let gw = heartbeat_gateway(&origin).await;
    let watch_for = PING * 8;

    // A raw client answering each ping with a pong by hand.
    let mut raw = RawWs::connect(gw.addr, "/", &[]).await;
    let raw_id = origin.id_for(raw.local_addr).await;
    let raw_task = tokio::spawn(async move {
        let until = Instant::now() + watch_for;
        let mut pings = 0;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let Ok(f) = tokio::time::timeout(left, raw.next_frame(WAIT)).await else {
                break;
            };
            let f = f.expect("connection still open");
            assert_eq!(f.opcode, OP_PING, "{f:?}");
            pings += 1;
            raw.send_frame(true, false, OP_PONG, &f.payload, true).await;
        }
        // The gateway answers our pings too.
        raw.send_frame(true, false, OP_PING, b"abc", true).await;
        loop {
            let f = raw.next_frame(WAIT).await.expect("open");
            if f.opcode == OP_PONG {
                assert_eq!(f.payload, b"abc");
                break;
            }
        }
        (pings, raw)
    });

    // A tungstenite client: it answers pings by itself while read.
    let (mut ws, id) = connect_id(&gw, &origin, "/").await;
    let until = tokio::time::Instant::now() + watch_for;
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(WsMessage::Ping(_)))) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    let (raw_pings, raw) = raw_task.await.unwrap();
    assert!(pings >= 4, "{pings} pings");
    assert!(raw_pings >= 4, "{raw_pings} pings");
    for id in [&id, &raw_id] {
        assert!(gw.connection(id).await.is_some(), "{id} was dropped");
        assert!(origin.disconnects_of(id).is_empty());
    }
    assert_eq!(gw.push_text(&id, "still here").await, 200);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("still here"));
    drop((ws, raw));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_with_4003() {
    const IDLE: Duration = Duration::from_millis(300);
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.idle_timeout = Some(IDLE)).await;
    let (mut active, active_id) = connect_id(&gw, &origin, "/").await;
    let (mut idle, idle_id) = connect_id(&gw, &origin, "/").await;
    let started = Instant::now();
    // One client keeps talking for twice the idle timeout.
    let talker = tokio::spawn(async move {
        for i in 0..7 {
            active
                .send(WsMessage::text(format!("tick {i}")))
                .await
                .unwrap();
            tokio::time::sleep(IDLE / 3).await;
        }
        active
    });
    let (code, reason, _) = expect_close(&mut idle).await;
    let took = started.elapsed();
    assert_eq!((code, reason.as_str()), (4003, "idle timeout"));
    assert!(
        took >= IDLE - Duration::from_millis(50),
        "closed too early: {took:?}"
    );
    let d = origin.wait_disconnect(&idle_id).await;
    assert_eq!((d.code, d.closed_by), (4003, ClosedBy::Gateway));
    let mut active = talker.await.unwrap();
    assert!(
        gw.connection(&active_id).await.is_some(),
        "messages reset the idle timer"
    );
    // Then it falls silent too.
    let (code, _, _) = expect_close(&mut active).await;
    assert_eq!(code, 4003);
    assert_eq!(origin.wait_disconnect(&active_id).await.code, 4003);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_clients_with_1012_and_delivers_every_disconnect() {
    let origin = TestOrigin::start(None).await;
    let mut gw = TestGateway::with_origin(&origin, |_| {}).await;
    let mut ids = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (mut ws, id) = connect_id(&gw, &origin, "/").await;
        ids.push(id);
        readers.push(tokio::spawn(async move { expect_close(&mut ws).await }));
    }
    let raw_ready = raw_request(
        gw.control,
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_ready.map(|r| r.status), Some(200));
    // Hold the origin: the drain must wait for the disconnect events.
    origin.pause();
    let drain = gw.begin_shutdown();
    eventually(WAIT, "/readyz 503", || async {
        let r = gw.get("/readyz").await;
        r.status == 503 && r.json()["status"] == "draining"
    })
    .await;
    assert!(gw.stats().await.draining);
    assert_eq!(gw.get("/healthz").await.status, 200, "alive while draining");
    // The client listener is closed.
    eventually(WAIT, "client listener closed", || async {
        tokio::net::TcpStream::connect(gw.addr).await.is_err()
    })
    .await;
    for r in readers {
        let (code, reason, _) = r.await.unwrap();
        assert_eq!((code, reason.as_str()), (1012, "server restart, reconnect"));
    }
    assert!(
        !drain.is_finished(),
        "the drain returned before the origin took the disconnects"
    );
    origin.resume();
    let report = tokio::time::timeout(WAIT, drain)
        .await
        .expect("drain finishes")
        .unwrap();
    assert_eq!(
        report,
        DrainReport {
            closed: 3,
            completed: true,
            events_dropped: 0
        }
    );
    // Already delivered when the drain returned: no waiting here.
    for id in &ids {
        let ds = origin.disconnects_of(id);
        assert_eq!(ds.len(), 1, "{id}: {ds:?}");
        assert_eq!((ds[0].code, ds[0].closed_by), (1012, ClosedBy::Gateway));
        assert_eq!(ds[0].reason, "server restart, reconnect");
    }
}

/// Connects `clients` clients, drains with `spread`, checks every client got
/// 1012 and its disconnect reached the origin, and returns when each close
/// arrived (sorted, from the start of the drain).
async fn drain_close_times(spread: Duration, clients: usize) -> Vec<Duration> {
    let origin = TestOrigin::start(None).await;
    let mut gw = TestGateway::with_origin(&origin, |c| {
        c.drain_spread = spread;
        c.max_connections_per_ip = 100;
    })
    .await;
    let mut readers = Vec::new();
    for _ in 0..clients {
        let mut ws = connect(&gw.ws_url("/")).await;
        readers.push(tokio::spawn(async move {
            let (code, _, _) = expect_close(&mut ws).await;
            (code, Instant::now())
        }));
    }
    let started = Instant::now();
    let report = tokio::time::timeout(WAIT * 2, gw.begin_shutdown())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report,
        DrainReport {
            closed: clients,
            completed: true,
            events_dropped: 0
        }
    );
    let mut times = Vec::new();
    for r in readers {
        let (code, at) = r.await.unwrap();
        assert_eq!(code, 1012);
        times.push(at.duration_since(started));
    }
    times.sort();
    assert_eq!(origin.disconnects().len(), clients);
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_spreads_closes_over_drain_spread() {
    const SPREAD: Duration = Duration::from_millis(400);
    let times = drain_close_times(SPREAD, 40).await;
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(
        last - first >= SPREAD / 2,
        "closes not spread: {first:?}..{last:?}"
    );
    assert!(
        last <= SPREAD + Duration::from_millis(500),
        "closes took too long: {last:?}"
    );
}

/// Three clients over a 600 ms window are not all closed in the first ticks:
/// they close at about 0, 200 and 400 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_spreads_even_a_few_clients() {
    const SPREAD: Duration = Duration::from_millis(600);
    let times = drain_close_times(SPREAD, 3).await;
    assert!(
        times[2] - times[0] >= Duration::from_millis(300),
        "closes not spread: {times:?}"
    );
    assert!(
        times[2] <= SPREAD + Duration::from_millis(500),
        "closes took too long: {times:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_bounded_by_drain_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(600);
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.drain_timeout = TIMEOUT).await;
    let (mut ws, _id) = connect_id(&gw, &origin, "/").await;
    let reader = tokio::spawn(async move { expect_close(&mut ws).await.0 });
    // An origin that never answers again.
    origin.pause();
    let started = Instant::now();
    let report = gw.shutdown().await;
    let took = started.elapsed();
    assert!(!report.completed, "{report:?}");
    assert_eq!(report.closed, 1);
    assert_eq!(
        report.events_dropped, 1,
        "the disconnect could not be delivered"
    );
    assert!(took >= TIMEOUT - Duration::from_millis(50), "{took:?}");
    assert!(took < TIMEOUT + Duration::from_secs(2), "{took:?}");
    assert_eq!(reader.await.unwrap(), 1012);
    origin.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_run_is_dropped_stops_accepting() {
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let addr = gw.addr;
    // Serving: the listener takes connections.
    drop(
        tokio::net::TcpStream::connect(addr)
            .await
            .expect("accepted"),
    );
    // Dropping the test gateway aborts the task running `Gateway::run`: the
    // accept loop (a task of its own) must end with it and close the
    // listener, rather than go on accepting for a node that is gone.
    drop(gw);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                Instant::now() < deadline,
                "still accepting 3 s after run was dropped: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
