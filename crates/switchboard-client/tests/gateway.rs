//! The SDK against a real in-process gateway (`switchboard_test_util`):
//! exactly-once delivery across forced reconnects, recovery and gaps, the
//! command round trips, typed errors, reconnect policy, heartbeats, and
//! token refresh.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard_client::{
    Client, ClientEvent, ConnectionState, DirectMessage, DisconnectReason, Error, ErrorCode,
    Events, Payload, ResumeCode, StreamPosition, Subscription, SubscriptionEvent,
};
use switchboard_proto::origin::{ClosedBy, Event, OriginAnswer};
use switchboard_test_util::{ConnectBehavior, TestGateway, TestOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NAMESPACE: &str =
    "chat:history-size=1000,history-ttl=10m,presence,join-leave,publish,subscribe";
const WAIT: Duration = Duration::from_secs(10);

async fn gateway() -> TestGateway {
    TestGateway::start(configure).await
}

fn configure(c: &mut switchboard_server::Config) {
    c.namespace = vec![
        NAMESPACE.parse().unwrap(),
        // Short history: recovery fails after 3 missed messages.
        "tiny:history-size=2,subscribe".parse().unwrap(),
        // Clients may subscribe but not publish, and nothing is kept.
        "news:subscribe".parse().unwrap(),
    ];
}

/// A client with short reconnect delays, connected.
async fn client(gw: &TestGateway) -> Client {
    let client = Client::builder(gw.ws_url("/"))
        .backoff_initial(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(200))
        .connect()
        .unwrap();
    tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .expect("connected in time")
        .expect("connects");
    client
}

/// `POST /v1/channels/{channel}/messages` with a text message; its offset.
async fn publish_api(gw: &TestGateway, channel: &str, text: &str) -> u64 {
    let r = gw
        .post(
            &format!("/v1/channels/{channel}/messages"),
            &serde_json::json!({ "text": text }),
        )
        .await;
    assert_eq!(r.status, 200, "publish {text}: {}", r.body);
    r.json()["offset"].as_u64().expect("offset")
}

/// Closes the client's current connection through the control API.
async fn kill(gw: &TestGateway, id: &str) {
    let r = gw.delete(&format!("/v1/connections/{id}")).await;
    assert!(
        (200..300).contains(&r.status),
        "DELETE {id}: {} {}",
        r.status,
        r.body
    );
}

/// The next subscription event, within [`WAIT`].
async fn next(sub: &mut Subscription) -> SubscriptionEvent {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a subscription event in time")
        .expect("the subscription is open")
}

/// The next client event matching `pred`, within [`WAIT`].
async fn wait_event(events: &mut Events, pred: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = events.recv().await.expect("events open");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
    .expect("the awaited client event")
}

/// Waits until the client is connected with an id other than `old`.
async fn reconnected(client: &Client, old: &str) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            match client.client_id() {
                Some(id) if id != old => return id,
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await
    .expect("reconnected in time")
}

fn text_of(e: &SubscriptionEvent) -> Option<String> {
    match e {
        SubscriptionEvent::Message(m) => m.text().map(str::to_owned),
        _ => None,
    }
}

#[tokio::test]
async fn every_message_exactly_once_in_order_across_three_forced_reconnects() {
    const TOTAL: u32 = 300;
    let gw = gateway().await;
    let client = client(&gw).await;
    let mut events = client.events();
    let mut sub = client.subscribe("chat:relay").await.unwrap();
    assert!(matches!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            recovered: None,
            ..
        }
    ));

    // The subscriber records everything it is given.
    let seen = Arc::new(Mutex::new(Vec::<SubscriptionEvent>::new()));
    let delivered = Arc::new(AtomicU32::new(0));
    let reader = {
        let (seen, delivered) = (seen.clone(), delivered.clone());
        tokio::spawn(async move {
            while let Some(e) = sub.recv().await {
                if matches!(e, SubscriptionEvent::Message(_)) {
                    delivered.fetch_add(1, SeqCst);
                }
                seen.lock().unwrap().push(e);
            }
        })
    };

    // The publisher sends numbered messages at a steady pace; the
    // subscriber's connection is killed three times meanwhile.
    let gw = Arc::new(gw);
    let published = Arc::new(AtomicU32::new(0));
    let publisher = {
        let (gw, published) = (gw.clone(), published.clone());
        tokio::spawn(async move {
            for i in 1..=TOTAL {
                publish_api(&gw, "chat:relay", &i.to_string()).await;
                published.store(i, SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut id = client.client_id().expect("connected");
    for at in [60, 140, 220] {
        tokio::time::timeout(WAIT, async {
            while published.load(SeqCst) < at {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("publisher progresses");
        kill(&gw, &id).await;
        id = reconnected(&client, &id).await;
    }
    publisher.await.unwrap();
    tokio::time::timeout(WAIT, async {
        while delivered.load(SeqCst) < TOTAL {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "only {} of {TOTAL} messages delivered",
            delivered.load(SeqCst)
        )
    });
    // Anything extra (a duplicate) would show up shortly after.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let seen = seen.lock().unwrap().clone();
    let texts: Vec<String> = seen.iter().filter_map(text_of).collect();
    let expected: Vec<String> = (1..=TOTAL).map(|i| i.to_string()).collect();
    assert_eq!(texts, expected, "every message exactly once, in order");
    let offsets: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            SubscriptionEvent::Message(m) => Some(m.offset),
            _ => None,
        })
        .collect();
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "{offsets:?}");
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, SubscriptionEvent::Gap { .. })),
        "no gap: everything was recoverable"
    );
    let resubscribes: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            SubscriptionEvent::Subscribed { recovered, .. } => Some(*recovered),
            _ => None,
        })
        .collect();
    assert_eq!(
        resubscribes,
        [Some(true); 3],
        "one recovered resubscribe per reconnect"
    );

    let mut disconnects = 0;
    while disconnects < 3 {
        if let ClientEvent::Disconnected { reason, .. } = wait_event(&mut events, |e| {
            matches!(e, ClientEvent::Disconnected { .. })
        })
        .await
        {
            assert!(
                matches!(reason, DisconnectReason::Closed { code: 1000, .. }),
                "{reason:?}"
            );
            disconnects += 1;
        }
    }
    client.close().await;
    tokio::time::timeout(WAIT, reader)
        .await
        .expect("the subscription stream ends on close")
        .unwrap();
}

#[tokio::test]
async fn publish_presence_history_and_ping_round_trips() {
    let gw = gateway().await;
    let alice = client(&gw).await;
    let mut sub = alice.subscribe("chat:room").await.unwrap();
    let SubscriptionEvent::Subscribed {
        epoch,
        offset,
        recovered,
        ..
    } = next(&mut sub).await
    else {
        panic!("Subscribed first");
    };
    assert_eq!((offset, recovered), (0, None));

    let published = alice.publish("chat:room", "hello").await.unwrap();
    assert_eq!((published.offset, &published.epoch), (1, &epoch));
    let SubscriptionEvent::Message(m) = next(&mut sub).await else {
        panic!("the message");
    };
    assert_eq!(
        (m.channel.as_str(), m.offset, m.text()),
        ("chat:room", 1, Some("hello"))
    );
    alice.publish("chat:room", vec![0u8, 1, 2]).await.unwrap();
    let SubscriptionEvent::Message(m) = next(&mut sub).await else {
        panic!("the binary message");
    };
    assert_eq!(m.data, Payload::Binary(vec![0, 1, 2]));

    let presence = alice.presence("chat:room").await.unwrap();
    assert_eq!(presence.clients, 1);
    assert_eq!(Some(presence.members[0].client.clone()), alice.client_id());

    // Someone else joins: alice sees it (join-leave).
    let bob = client(&gw).await;
    let bob_sub = bob.subscribe("chat:room").await.unwrap();
    let SubscriptionEvent::Join(member) = next(&mut sub).await else {
        panic!("bob's join");
    };
    assert_eq!(Some(member.client), bob.client_id());
    assert_eq!(alice.presence("chat:room").await.unwrap().clients, 2);
    bob_sub.unsubscribe().await.unwrap();
    let SubscriptionEvent::Leave(member) = next(&mut sub).await else {
        panic!("bob's leave");
    };
    assert_eq!(Some(member.client), bob.client_id());

    let history = alice.history("chat:room", None, None).await.unwrap();
    assert_eq!(
        (history.epoch.as_str(), history.offset),
        (epoch.as_str(), 2)
    );
    assert_eq!(history.publications.len(), 2);
    assert_eq!(history.publications[0].data, Payload::Text("hello".into()));
    let since = StreamPosition {
        offset: 1,
        epoch: epoch.clone(),
    };
    let history = alice
        .history("chat:room", Some(since), Some(10))
        .await
        .unwrap();
    assert_eq!(history.recovered, Some(true));
    assert_eq!(history.publications.len(), 1);
    assert_eq!(history.publications[0].offset, 2);

    let rtt = alice.ping().await.unwrap();
    assert!(rtt < WAIT);
}

#[tokio::test]
async fn gateway_errors_are_typed() {
    let gw = gateway().await;
    let client = client(&gw).await;
    let err = client.subscribe("nope:x").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownNamespace), "{err:?}");
    let err = client.publish("news:today", "x").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err:?}");
    let err = client.history("news:today", None, None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::HistoryDisabled), "{err:?}");
    let err = client.presence("news:today").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PresenceDisabled), "{err:?}");
    // Checked by the SDK before anything is sent.
    assert_eq!(
        client.subscribe("no-namespace").await.unwrap_err(),
        Error::InvalidChannel("no-namespace".into())
    );
    let _sub = client.subscribe("chat:a").await.unwrap();
    assert_eq!(
        client.subscribe("chat:a").await.unwrap_err(),
        Error::AlreadySubscribed("chat:a".into())
    );
    // A failed subscribe leaves nothing behind: the client still works.
    client.ping().await.unwrap();
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_allows_a_new_subscription() {
    let gw = gateway().await;
    let client = client(&gw).await;
    let mut events = client.events();
    let sub = client.subscribe("chat:u").await.unwrap();
    sub.unsubscribe().await.unwrap();
    assert_eq!(client.presence("chat:u").await.unwrap().clients, 0);
    publish_api(&gw, "chat:u", "after").await;
    // Dropping a subscription unsubscribes too.
    let dropped = client.subscribe("chat:u").await.unwrap();
    drop(dropped);
    let mut sub = client.subscribe("chat:u").await.unwrap();
    assert!(matches!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed { offset: 1, .. }
    ));
    publish_api(&gw, "chat:u", "again").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("again"));
    // None of it leaked to the client-wide events.
    client.ping().await.unwrap();
    let stray = tokio::time::timeout(Duration::from_millis(100), async {
        loop {
            match events.recv().await {
                Some(ClientEvent::Message(m)) => return m,
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
        }
    })
    .await;
    assert!(stray.is_err(), "stray message: {stray:?}");
}

/// A gateway whose origin can hold a reconnecting client's handshake, so the
/// test decides exactly what is published while it is away.
async fn gateway_with_origin() -> (TestGateway, TestOrigin) {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, configure).await;
    (gw, origin)
}

/// Kills the client's connection with the origin paused, runs `away` while
/// the client cannot reconnect, then lets it back in.
async fn while_away<F: std::future::Future<Output = ()>>(
    gw: &TestGateway,
    origin: &TestOrigin,
    client: &Client,
    away: F,
) {
    let id = client.client_id().expect("connected");
    origin.pause();
    kill(gw, &id).await;
    tokio::time::timeout(WAIT, async {
        while client.state() != ConnectionState::Connecting {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the client notices");
    away.await;
    origin.resume();
    reconnected(client, &id).await;
}

#[tokio::test]
async fn missed_messages_are_replayed_after_a_reconnect() {
    let (gw, origin) = gateway_with_origin().await;
    let client = client(&gw).await;
    let mut sub = client.subscribe("chat:replay").await.unwrap();
    let SubscriptionEvent::Subscribed { epoch, .. } = next(&mut sub).await else {
        panic!("Subscribed first");
    };
    publish_api(&gw, "chat:replay", "1").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("1"));
    while_away(&gw, &origin, &client, async {
        for i in 2..=4 {
            publish_api(&gw, "chat:replay", &i.to_string()).await;
        }
    })
    .await;
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            epoch,
            offset: 4,
            recovered: Some(true),
            missed: Some(3),
        }
    );
    for i in 2..=4 {
        assert_eq!(text_of(&next(&mut sub).await), Some(i.to_string()));
    }
    publish_api(&gw, "chat:replay", "5").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("5"));
}

#[tokio::test]
async fn an_unrecoverable_reconnect_is_reported_as_a_gap() {
    let (gw, origin) = gateway_with_origin().await;
    let client = client(&gw).await;
    let mut sub = client.subscribe("tiny:t").await.unwrap();
    let SubscriptionEvent::Subscribed { epoch, .. } = next(&mut sub).await else {
        panic!("Subscribed first");
    };
    publish_api(&gw, "tiny:t", "1").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("1"));
    // Five messages while away; the namespace keeps only two.
    while_away(&gw, &origin, &client, async {
        for i in 2..=6 {
            publish_api(&gw, "tiny:t", &i.to_string()).await;
        }
    })
    .await;
    assert!(matches!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            recovered: Some(false),
            offset: 6,
            ..
        }
    ));
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Gap {
            last: StreamPosition {
                offset: 1,
                epoch: epoch.clone()
            },
            resumed: StreamPosition { offset: 6, epoch },
        }
    );
    publish_api(&gw, "tiny:t", "7").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("7"));
}

#[tokio::test]
async fn server_side_subscriptions_and_direct_messages_reach_the_client_events() {
    let (gw, origin) = gateway_with_origin().await;
    let client = client(&gw).await;
    let mut events = client.events();
    let id = client.client_id().unwrap();

    let r = gw
        .call(gw.request(
            reqwest::Method::PUT,
            &format!("/v1/connections/{id}/channels/chat:srv"),
        ))
        .await;
    assert!((200..300).contains(&r.status), "{} {}", r.status, r.body);
    let e = wait_event(&mut events, |e| {
        matches!(e, ClientEvent::ServerSubscribed { .. })
    })
    .await;
    assert!(
        matches!(&e, ClientEvent::ServerSubscribed { channel, .. } if channel == "chat:srv"),
        "{e:?}"
    );
    publish_api(&gw, "chat:srv", "from the server").await;
    let e = wait_event(&mut events, |e| matches!(e, ClientEvent::Message(_))).await;
    let ClientEvent::Message(m) = e else {
        unreachable!()
    };
    assert_eq!(
        (m.channel.as_str(), m.text()),
        ("chat:srv", Some("from the server"))
    );

    assert_eq!(gw.push_text(&id, "direct hi").await, 200);
    let e = wait_event(&mut events, |e| matches!(e, ClientEvent::Direct(_))).await;
    assert_eq!(
        e,
        ClientEvent::Direct(DirectMessage {
            seq: Some(1),
            data: Payload::Text("direct hi".into())
        })
    );

    // And `send` reaches the origin.
    client.send("to the origin").await.unwrap();
    let got = origin.wait_messages(&id, 1).await;
    assert_eq!(got[0].payload, Payload::Text("to the origin".into()));

    // `close` completes a closing handshake with 1000.
    client.close().await;
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (1000, ClosedBy::Client));
    assert_eq!(events.recv().await, Some(ClientEvent::Closed));
    assert_eq!(events.recv().await, None);
}

#[tokio::test]
async fn the_token_reaches_the_origin_in_the_query_and_the_header() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        configure(c);
        c.forward_header.push("authorization".into());
    })
    .await;
    let client = Client::builder(gw.ws_url("/app?room=1"))
        .token("s3cret token")
        .header("X-Extra", "yes")
        .connect()
        .unwrap();
    client.wait_connected().await.unwrap();
    let connect = origin.connects().pop().expect("a connect event");
    assert_eq!(connect.path, "/app");
    assert_eq!(connect.query, "room=1&token=s3cret%20token");
    assert_eq!(
        connect.headers.get("authorization").map(String::as_str),
        Some("Bearer s3cret token")
    );
    assert_eq!(connect.subprotocol.as_deref(), Some("switchboard.v1"));
}

#[tokio::test]
async fn a_refused_handshake_stops_the_client_and_a_503_is_retried() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, configure).await;

    origin.behavior(|b| b.connect = ConnectBehavior::Reject(403, "banned".into()));
    let client = Client::builder(gw.ws_url("/"))
        .backoff_initial(Duration::from_millis(10))
        .connect()
        .unwrap();
    let err = tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Refused { status: 403, message, .. } if message == "banned"),
        "{err:?}"
    );
    assert!(err.is_terminal());
    assert_eq!(client.state(), ConnectionState::Failed(err.clone()));
    assert_eq!(client.publish("chat:a", "x").await.unwrap_err(), err);
    assert_eq!(client.subscribe("chat:a").await.unwrap_err(), err);

    // 503 is worth retrying: the client keeps trying until it gets in.
    origin.behavior(|b| b.connect = ConnectBehavior::Reject(503, "busy".into()));
    let client = Client::builder(gw.ws_url("/"))
        .backoff_initial(Duration::from_millis(10))
        .backoff_max(Duration::from_millis(50))
        .connect()
        .unwrap();
    let mut events = client.events();
    for _ in 0..2 {
        let e = wait_event(&mut events, |e| {
            matches!(e, ClientEvent::ConnectFailed { .. })
        })
        .await;
        assert!(
            matches!(
                e,
                ClientEvent::ConnectFailed {
                    error: Error::Refused { status: 503, .. },
                    ..
                }
            ),
            "{e:?}"
        );
    }
    origin.behavior(|b| b.connect = ConnectBehavior::Accept(OriginAnswer::default()));
    tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .unwrap()
        .unwrap();
    assert!(origin
        .events()
        .iter()
        .any(|e| matches!(e, Event::Connect(_))));
}

/// A TCP proxy between the SDK and a gateway, to break the link from
/// outside: its connections can go silent (stop forwarding, keep the sockets
/// open) like a dead NAT mapping, or be cut (both sockets closed, no
/// WebSocket close frame) like a lost network; it can refuse new connections
/// for a while, and forward new ones to another gateway.
struct Proxy {
    addr: std::net::SocketAddr,
    state: Arc<ProxyState>,
}

struct ProxyState {
    upstream: Mutex<std::net::SocketAddr>,
    /// Connections numbered below this are frozen both ways.
    frozen_below: AtomicU32,
    /// Connections numbered below this are frozen from the gateway to the
    /// client only.
    downstream_frozen_below: AtomicU32,
    next: AtomicU32,
    /// New connections are closed at once.
    down: AtomicBool,
    /// The pipe tasks of the open connections.
    pipes: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState {
            upstream: Mutex::new(upstream),
            frozen_below: AtomicU32::new(0),
            downstream_frozen_below: AtomicU32::new(0),
            next: AtomicU32::new(0),
            down: AtomicBool::new(false),
            pipes: Mutex::new(Vec::new()),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.down.load(SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = *st.upstream.lock().unwrap();
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let number = st.next.fetch_add(1, SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = tokio::spawn(pipe(cr, sw, number, st.clone(), false));
                let down = tokio::spawn(pipe(sr, cw, number, st.clone(), true));
                st.pipes
                    .lock()
                    .unwrap()
                    .extend([up.abort_handle(), down.abort_handle()]);
            }
        });
        Self { addr, state }
    }

    /// `ws://` URL of the proxy.
    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Freezes every connection opened so far, both ways.
    fn freeze(&self) {
        let next = self.state.next.load(SeqCst);
        self.state.frozen_below.store(next, SeqCst);
    }

    /// Freezes every connection opened so far from the gateway to the
    /// client only: what the client sends still gets through.
    fn freeze_downstream(&self) {
        let next = self.state.next.load(SeqCst);
        self.state.downstream_frozen_below.store(next, SeqCst);
    }

    /// Cuts every open connection: both sockets are closed, as a lost
    /// network would (neither side gets a close frame).
    fn cut(&self) {
        for pipe in self.state.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    /// While `down`, new connections are closed as soon as accepted.
    fn set_down(&self, down: bool) {
        self.state.down.store(down, SeqCst);
    }

    /// New connections go to `upstream`.
    fn set_upstream(&self, upstream: std::net::SocketAddr) {
        *self.state.upstream.lock().unwrap() = upstream;
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: u32,
    state: Arc<ProxyState>,
    downstream: bool,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let read = from.read(&mut buf).await;
        let frozen = number < state.frozen_below.load(SeqCst)
            || (downstream && number < state.downstream_frozen_below.load(SeqCst));
        if frozen {
            // Swallow everything, forever, without closing either side.
            std::future::pending::<()>().await;
        }
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A client through `proxy`, with short reconnect delays, connected.
async fn proxied_client(proxy: &Proxy) -> Client {
    let client = Client::builder(proxy.url())
        .backoff_initial(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(200))
        .connect()
        .unwrap();
    tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .expect("connected in time")
        .expect("connects");
    client
}

/// The client events from now on, recorded by a task of their own.
fn record(client: &Client) -> Arc<Mutex<Vec<ClientEvent>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut events = client.events();
    let l = log.clone();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            l.lock().unwrap().push(e);
        }
    });
    log
}

/// How many recorded events match `pred`.
fn count(log: &Mutex<Vec<ClientEvent>>, pred: impl Fn(&ClientEvent) -> bool) -> usize {
    log.lock().unwrap().iter().filter(|e| pred(e)).count()
}

/// Waits until `what` holds, within [`WAIT`].
async fn until(what: &str, check: impl Fn() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The direct messages among `events`.
fn directs(events: &[ClientEvent]) -> Vec<DirectMessage> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Direct(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// The connection as the control API shows it (it must exist).
/// Waits (15 s at most) for the SDK to give up a silent link: its next
/// `Disconnected` says `HeartbeatTimeout`.
async fn heartbeat_timeout(events: &mut Events) {
    let e = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Some(e @ ClientEvent::Disconnected { .. }) = events.recv().await {
                return e;
            }
        }
    })
    .await
    .expect("the dead link is noticed");
    assert!(
        matches!(
            e,
            ClientEvent::Disconnected {
                reason: DisconnectReason::HeartbeatTimeout(_),
                ..
            }
        ),
        "{e:?}"
    );
}

async fn info(gw: &TestGateway, id: &str) -> switchboard_proto::control::ConnectionInfo {
    gw.connection(id)
        .await
        .unwrap_or_else(|| panic!("connection {id} is gone"))
}

/// The link goes silent both ways (a dead NAT mapping): the SDK notices
/// after 2 × ping interval + 5 s, drops it and resumes its session on a new
/// connection, before the gateway noticed anything (its pong timeout is
/// longer): the gateway hands the session over from the old socket.
#[tokio::test]
async fn a_silent_link_is_detected_and_the_session_resumed() {
    let gw = TestGateway::start(|c| {
        configure(c);
        c.ping_interval = Duration::from_millis(200);
        c.pong_timeout = Duration::from_secs(30);
    })
    .await;
    let proxy = Proxy::start(gw.addr).await;
    let client = proxied_client(&proxy).await;
    let mut events = client.events();
    let first = client.client_id().unwrap();
    assert_eq!(gw.push_text(&first, "before").await, 200);
    let e = wait_event(&mut events, |e| matches!(e, ClientEvent::Direct(_))).await;
    assert!(
        matches!(&e, ClientEvent::Direct(m) if m.seq == Some(1) && m.text() == Some("before")),
        "{e:?}"
    );
    proxy.freeze();
    // 2 × 200 ms + 5 s of silence, then a reconnect through the proxy (only
    // the old connection is frozen).
    let started = tokio::time::Instant::now();
    heartbeat_timeout(&mut events).await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let e = wait_event(&mut events, |e| {
        matches!(
            e,
            ClientEvent::Resumed { .. } | ClientEvent::Restarted { .. }
        )
    })
    .await;
    assert_eq!(
        e,
        ClientEvent::Resumed {
            client_id: first.clone(),
            node: gw.node.clone()
        }
    );
    assert_eq!(client.client_id(), Some(first.clone()));
    assert_eq!(gw.push_text(&first, "after").await, 200);
    let e = wait_event(&mut events, |e| matches!(e, ClientEvent::Direct(_))).await;
    assert!(
        matches!(&e, ClientEvent::Direct(m) if m.seq == Some(2) && m.text() == Some("after")),
        "{e:?}"
    );
}

/// When the SDK gives up on a link, it drops it without a close frame
/// (which would end the session): here only the gateway's half of the link
/// is silent, so a close frame from the SDK would reach the gateway, and the
/// reconnect would be a new session.
#[tokio::test]
async fn a_link_given_up_by_the_sdk_ends_without_a_close_frame() {
    let gw = TestGateway::start(|c| {
        configure(c);
        c.ping_interval = Duration::from_millis(200);
        c.pong_timeout = Duration::from_secs(60);
    })
    .await;
    let proxy = Proxy::start(gw.addr).await;
    let client = proxied_client(&proxy).await;
    let mut events = client.events();
    let first = client.client_id().unwrap();
    proxy.freeze_downstream();
    heartbeat_timeout(&mut events).await;
    let e = wait_event(&mut events, |e| {
        matches!(
            e,
            ClientEvent::Resumed { .. } | ClientEvent::Restarted { .. }
        )
    })
    .await;
    assert!(
        matches!(&e, ClientEvent::Resumed { client_id, .. } if *client_id == first),
        "the session survived: {e:?}"
    );
}

/// Direct messages sent while the socket is cut again and again all arrive,
/// once each and in order, on the same connection id.
#[tokio::test]
async fn a_resumed_session_delivers_every_direct_message_exactly_once_in_order() {
    const TOTAL: u32 = 300;
    const CUTS: [u32; 5] = [40, 100, 160, 220, 280];
    let gw = Arc::new(gateway().await);
    let proxy = Proxy::start(gw.addr).await;
    let client = proxied_client(&proxy).await;
    let id = client.client_id().unwrap();
    let log = record(&client);

    let sent = Arc::new(AtomicU32::new(0));
    let sender = {
        let (gw, sent, id) = (gw.clone(), sent.clone(), id.clone());
        tokio::spawn(async move {
            let mut queued = 0;
            for i in 1..=TOTAL {
                let r = gw
                    .post(
                        &format!("/v1/connections/{id}/messages"),
                        &serde_json::json!({ "text": i.to_string() }),
                    )
                    .await;
                assert_eq!(r.status, 200, "direct {i}: {}", r.body);
                match r.json()["status"].as_str() {
                    Some("delivered") => {}
                    Some("queued") => queued += 1,
                    other => panic!("direct {i}: {other:?}"),
                }
                sent.store(i, SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            queued
        })
    };
    for (n, at) in CUTS.into_iter().enumerate() {
        until("the sender to progress", || sent.load(SeqCst) >= at).await;
        proxy.cut();
        until("the resume", || {
            count(&log, |e| matches!(e, ClientEvent::Resumed { .. })) > n
        })
        .await;
    }
    let queued = sender.await.unwrap();
    until("every direct message", || {
        directs(&log.lock().unwrap()).len() >= TOTAL as usize
    })
    .await;
    // A duplicate would show up shortly after.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let events = log.lock().unwrap().clone();
    let got = directs(&events);
    let texts: Vec<String> = got
        .iter()
        .filter_map(|m| m.text().map(str::to_owned))
        .collect();
    let expected: Vec<String> = (1..=TOTAL).map(|i| i.to_string()).collect();
    assert_eq!(
        texts, expected,
        "every direct message exactly once, in order"
    );
    let seqs: Vec<Option<u64>> = got.iter().map(|m| m.seq).collect();
    let expected: Vec<Option<u64>> = (1..=u64::from(TOTAL)).map(Some).collect();
    assert_eq!(seqs, expected);
    let resumed: Vec<&ClientEvent> = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                ClientEvent::Resumed { .. }
                    | ClientEvent::Restarted { .. }
                    | ClientEvent::Connected { .. }
            )
        })
        .collect();
    assert_eq!(resumed.len(), CUTS.len(), "{resumed:?}");
    assert!(
        resumed
            .iter()
            .all(|e| matches!(e, ClientEvent::Resumed { client_id, .. } if *client_id == id)),
        "{resumed:?}"
    );
    let lost = count(&log, |e| {
        matches!(
            e,
            ClientEvent::Disconnected {
                reason: DisconnectReason::Network(_),
                ..
            }
        )
    });
    assert_eq!(lost, CUTS.len(), "{events:?}");
    assert_eq!(client.client_id(), Some(id.clone()));
    let now = info(&gw, &id).await;
    assert!(!now.suspended);
    // Some were sent while the session had no socket (else the test proves
    // less than it claims); how many depends on timing.
    eprintln!("{queued} of {TOTAL} direct messages were kept for a suspended session");
    client.close().await;
}

/// While the client is away, messages are published to its channels, the
/// server subscribes it to a new channel and unsubscribes it from another,
/// and the client leaves one: once resumed, the client gets the missed
/// messages of each channel (its own subscriptions and the server-side
/// ones, old and new), learns of the server's changes, and the session
/// leaves the channel the client left.
#[tokio::test]
async fn channel_messages_published_while_away_are_recovered_after_a_resume() {
    let gw = gateway().await;
    let proxy = Proxy::start(gw.addr).await;
    let client = proxied_client(&proxy).await;
    let id = client.client_id().unwrap();
    let mut events = client.events();
    let mut sub = client.subscribe("chat:away").await.unwrap();
    let SubscriptionEvent::Subscribed { epoch, .. } = next(&mut sub).await else {
        panic!("Subscribed first");
    };
    let mut gone = client.subscribe("chat:gone").await.unwrap();
    assert!(matches!(
        next(&mut gone).await,
        SubscriptionEvent::Subscribed { .. }
    ));
    let left = client.subscribe("chat:left").await.unwrap();
    let put = |channel: &'static str| {
        gw.call(gw.request(
            reqwest::Method::PUT,
            &format!("/v1/connections/{id}/channels/{channel}"),
        ))
    };
    let r = put("chat:srv").await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_event(
        &mut events,
        |e| matches!(e, ClientEvent::ServerSubscribed { channel, .. } if channel == "chat:srv"),
    )
    .await;
    publish_api(&gw, "chat:away", "1").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("1"));
    publish_api(&gw, "chat:srv", "s1").await;
    wait_event(&mut events, |e| matches!(e, ClientEvent::Message(_))).await;

    // Away: the socket is cut and the client cannot come back yet.
    proxy.set_down(true);
    proxy.cut();
    switchboard_test_util::eventually(WAIT, "the session suspended", || async {
        info(&gw, &id).await.suspended
    })
    .await;
    until("the client to notice", || {
        client.state() == ConnectionState::Connecting
    })
    .await;
    // Left while away: the session still holds it, the client must not take
    // it for a server-side subscription.
    left.unsubscribe().await.unwrap();
    for i in 2..=4 {
        publish_api(&gw, "chat:away", &i.to_string()).await;
    }
    publish_api(&gw, "chat:srv", "s2").await;
    publish_api(&gw, "chat:srv", "s3").await;
    let r = put("chat:new").await;
    assert_eq!(r.status, 200, "{}", r.body);
    publish_api(&gw, "chat:new", "n1").await;
    let r = gw
        .delete(&format!("/v1/connections/{id}/channels/chat:gone"))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(gw.push_text(&id, "while away").await, 200);
    proxy.set_down(false);

    let e = wait_event(&mut events, |e| {
        matches!(
            e,
            ClientEvent::Resumed { .. } | ClientEvent::Restarted { .. }
        )
    })
    .await;
    assert!(
        matches!(&e, ClientEvent::Resumed { client_id, .. } if *client_id == id),
        "{e:?}"
    );
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            epoch,
            offset: 4,
            recovered: Some(true),
            missed: Some(3),
        }
    );
    for i in 2..=4 {
        assert_eq!(text_of(&next(&mut sub).await), Some(i.to_string()));
    }
    assert_eq!(next(&mut gone).await, SubscriptionEvent::Unsubscribed);
    assert_eq!(
        tokio::time::timeout(WAIT, gone.recv()).await.unwrap(),
        None,
        "the stream ends"
    );

    // The client-wide side: the new server-side subscription, what both
    // server-side channels missed (each once, in order), the direct message.
    let mut srv = Vec::new();
    let mut new = Vec::new();
    let mut announced = false;
    let mut direct = None;
    tokio::time::timeout(WAIT, async {
        while srv.len() < 2 || new.is_empty() || direct.is_none() {
            match events.recv().await.expect("events open") {
                ClientEvent::ServerSubscribed { channel, .. } if channel == "chat:new" => {
                    assert!(new.is_empty(), "announced before its messages");
                    announced = true;
                }
                ClientEvent::Message(m) if m.channel == "chat:srv" => {
                    srv.push(m.text().unwrap().to_owned())
                }
                ClientEvent::Message(m) if m.channel == "chat:new" => {
                    new.push(m.text().unwrap().to_owned())
                }
                ClientEvent::Direct(m) => direct = Some(m),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("recovered: chat:srv {srv:?}, chat:new {new:?}, {direct:?}"));
    assert!(announced);
    assert_eq!(srv, ["s2", "s3"]);
    assert_eq!(new, ["n1"]);
    assert_eq!(
        direct,
        Some(DirectMessage {
            seq: Some(1),
            data: Payload::Text("while away".into())
        })
    );

    // And everything flows live again, once.
    publish_api(&gw, "chat:away", "5").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("5"));
    publish_api(&gw, "chat:srv", "s4").await;
    let e = wait_event(&mut events, |e| matches!(e, ClientEvent::Message(_))).await;
    assert!(
        matches!(&e, ClientEvent::Message(m) if m.text() == Some("s4")),
        "{e:?}"
    );
    assert_eq!(client.presence("chat:away").await.unwrap().clients, 1);
    switchboard_test_util::eventually(WAIT, "chat:left left", || async {
        info(&gw, &id).await.channels == ["chat:away", "chat:new", "chat:srv"]
    })
    .await;
    assert_eq!(client.presence("chat:left").await.unwrap().clients, 0);
}

/// A resume the gateway refuses starts a new session, reported with the
/// gateway's reason: after the session was closed through the control API
/// (`session_closed`), and after the gateway was replaced by another one
/// (`session_unknown`). Subscriptions go on, and direct messages are
/// numbered anew.
#[tokio::test]
async fn a_refused_resume_starts_a_new_session() {
    let gw = gateway().await;
    let proxy = Proxy::start(gw.addr).await;
    let client = proxied_client(&proxy).await;
    let first = client.client_id().unwrap();
    let mut events = client.events();
    let mut sub = client.subscribe("chat:fresh").await.unwrap();
    let SubscriptionEvent::Subscribed { epoch, .. } = next(&mut sub).await else {
        panic!("Subscribed first");
    };
    publish_api(&gw, "chat:fresh", "1").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("1"));
    for text in ["d1", "d2"] {
        assert_eq!(gw.push_text(&first, text).await, 200);
    }
    let e = wait_event(
        &mut events,
        |e| matches!(e, ClientEvent::Direct(m) if m.seq == Some(2)),
    )
    .await;
    assert!(matches!(&e, ClientEvent::Direct(m) if m.text() == Some("d2")));

    // 1. The session is closed by the control API.
    kill(&gw, &first).await;
    let e = wait_event(&mut events, |e| {
        matches!(
            e,
            ClientEvent::Resumed { .. } | ClientEvent::Restarted { .. }
        )
    })
    .await;
    let ClientEvent::Restarted {
        client_id: second,
        node,
        error: Some(error),
    } = e
    else {
        panic!("a new session, with the reason: {e:?}");
    };
    assert_eq!(error.code, ResumeCode::SessionClosed, "{error:?}");
    assert_ne!(second, first);
    assert_eq!(node, gw.node);
    assert_eq!(client.client_id(), Some(second.clone()));
    assert_eq!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            epoch: epoch.clone(),
            offset: 1,
            recovered: Some(true),
            missed: Some(0),
        }
    );
    publish_api(&gw, "chat:fresh", "2").await;
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("2"));
    // Numbered from 1 again: not taken for a duplicate of the old d1.
    assert_eq!(gw.push_text(&second, "e1").await, 200);
    let e = wait_event(&mut events, |e| matches!(e, ClientEvent::Direct(_))).await;
    assert_eq!(
        e,
        ClientEvent::Direct(DirectMessage {
            seq: Some(1),
            data: Payload::Text("e1".into())
        })
    );

    // 2. The gateway is replaced: the new one never heard of the session.
    let gw2 = gateway().await;
    proxy.set_upstream(gw2.addr);
    proxy.cut();
    let e = wait_event(&mut events, |e| {
        matches!(
            e,
            ClientEvent::Resumed { .. } | ClientEvent::Restarted { .. }
        )
    })
    .await;
    let ClientEvent::Restarted {
        client_id: third,
        node,
        error: Some(error),
    } = e
    else {
        panic!("a new session, with the reason: {e:?}");
    };
    assert_eq!(error.code, ResumeCode::SessionUnknown, "{error:?}");
    assert_eq!(node, gw2.node);
    assert_ne!(third, second);
    // The channel's stream on the new gateway is another one: a gap.
    assert!(matches!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            recovered: Some(false),
            ..
        }
    ));
    assert!(matches!(
        next(&mut sub).await,
        SubscriptionEvent::Gap { .. }
    ));
    client.publish("chat:fresh", "3").await.unwrap();
    assert_eq!(text_of(&next(&mut sub).await).as_deref(), Some("3"));
    assert_eq!(gw2.push_text(&third, "f1").await, 200);
    let e = wait_event(&mut events, |e| matches!(e, ClientEvent::Direct(_))).await;
    assert!(
        matches!(&e, ClientEvent::Direct(m) if m.seq == Some(1) && m.text() == Some("f1")),
        "{e:?}"
    );
}

/// A gateway that keeps no sessions (`session-ttl = 0`): direct messages
/// have no sequence, nothing is resumed, and a reconnect is a new session
/// without a refusal to report.
#[tokio::test]
async fn without_sessions_every_reconnect_is_a_restart() {
    let gw = TestGateway::start(|c| {
        configure(c);
        c.session_ttl = Duration::ZERO;
    })
    .await;
    let proxy = Proxy::start(gw.addr).await;
    let client = proxied_client(&proxy).await;
    let first = client.client_id().unwrap();
    let mut events = client.events();
    for text in ["a", "b"] {
        assert_eq!(gw.push_text(&first, text).await, 200);
        let e = wait_event(&mut events, |e| matches!(e, ClientEvent::Direct(_))).await;
        assert_eq!(
            e,
            ClientEvent::Direct(DirectMessage {
                seq: None,
                data: Payload::Text(text.into())
            })
        );
    }
    proxy.cut();
    let e = wait_event(&mut events, |e| {
        matches!(
            e,
            ClientEvent::Resumed { .. } | ClientEvent::Restarted { .. }
        )
    })
    .await;
    assert!(
        matches!(&e, ClientEvent::Restarted { client_id, error: None, .. } if *client_id != first),
        "{e:?}"
    );
    assert_eq!(gw.connection(&first).await, None, "the old one ended");
}

/// The SDK acknowledges direct messages in batches: not each one, but every
/// 32, and the rest within 500 ms, after which the gateway keeps none.
#[tokio::test]
async fn direct_messages_are_acknowledged_in_batches() {
    let gw = gateway().await;
    let client = client(&gw).await;
    let id = client.client_id().unwrap();
    let log = record(&client);
    let outbox = || async { info(&gw, &id).await.outbox_messages };

    // A few: kept until the timer acknowledges them (checked only if this
    // machine is fast enough to look before it fires).
    let started = tokio::time::Instant::now();
    for i in 1..=5 {
        assert_eq!(gw.push_text(&id, &i.to_string()).await, 200);
    }
    until("5 directs", || directs(&log.lock().unwrap()).len() == 5).await;
    let kept = outbox().await;
    if started.elapsed() < Duration::from_millis(400) {
        assert_eq!(kept, 5, "not acknowledged one by one");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(outbox().await, 0, "acknowledged within 500 ms");

    // 40 in a row: the first 32 are acknowledged at once, before the timer.
    let started = tokio::time::Instant::now();
    for i in 6..=45 {
        assert_eq!(gw.push_text(&id, &i.to_string()).await, 200);
    }
    until("45 directs", || directs(&log.lock().unwrap()).len() == 45).await;
    switchboard_test_util::eventually(WAIT, "the batch of 32 acknowledged", || async {
        outbox().await <= 8
    })
    .await;
    if started.elapsed() < Duration::from_millis(400) {
        assert_eq!(outbox().await, 8, "the last 8 wait for the timer");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(outbox().await, 0);
    let seqs: Vec<Option<u64>> = directs(&log.lock().unwrap())
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, (1..=45).map(Some).collect::<Vec<_>>());
}

/// An HS256 token of `sub` expiring `secs` from now.
fn token(secret: &str, sub: &str, secs: u64) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_is_refreshed_in_band_and_reconnects_use_the_fresh_one() {
    const SECRET: &str = "0123456789abcdef0123456789abcdef-sdk";
    let gw = TestGateway::start(|c| {
        configure(c);
        c.jwt_secret = Some(SECRET.into());
        c.jwt_leeway = Duration::ZERO;
        c.token_refresh_notice = Duration::from_secs(2);
    })
    .await;
    let client = Client::builder(gw.ws_url("/"))
        .token(token(SECRET, "ann", 3))
        .backoff_initial(Duration::from_millis(20))
        .backoff_max(Duration::from_millis(200))
        .connect()
        .unwrap();
    let mut events = client.events();
    tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .unwrap()
        .unwrap();
    let first = client.client_id().expect("connected");
    let ClientEvent::TokenExpiring { expires_at_ms } = wait_event(&mut events, |e| {
        matches!(e, ClientEvent::TokenExpiring { .. })
    })
    .await
    else {
        unreachable!()
    };
    // Another user's token is refused, typed.
    let err = client.refresh(token(SECRET, "bob", 60)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TokenInvalid), "{err}");
    let until = client.refresh(token(SECRET, "ann", 3600)).await.unwrap();
    assert!(until > expires_at_ms + 3_000_000);
    // The first token's expiry passes: same connection, still working.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    client.ping().await.expect("still connected");
    assert_eq!(client.client_id().as_deref(), Some(first.as_str()));
    // A reconnect presents the fresh token (the first one has expired).
    kill(&gw, &first).await;
    reconnected(&client, &first).await;
    client
        .ping()
        .await
        .expect("reconnected with the fresh token");
}

/// `wss://` to a gateway with TLS on, its certificate from a private CA
/// (the test fixtures of switchboard-server): trusted with `tls_roots_pem`,
/// the client subscribes and gets what is published; without it (web PKI
/// roots only) it never connects.
#[tokio::test]
async fn wss_with_a_private_ca_connects_and_the_web_pki_default_does_not() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../switchboard-server/tests/fixtures/tls");
    let gw = TestGateway::start(|c| {
        configure(c);
        c.tls_cert = Some(fixtures.join("server-a.pem"));
        c.tls_key = Some(fixtures.join("server-a-key.pem"));
    })
    .await;
    let url = format!("wss://localhost:{}/", gw.addr.port());
    let ca = std::fs::read(fixtures.join("ca.pem")).unwrap();
    let client = Client::builder(&url).tls_roots_pem(ca).connect().unwrap();
    tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .expect("connected in time")
        .expect("connects over TLS");
    let mut sub = client.subscribe("chat:tls").await.unwrap();
    client.publish("chat:tls", "over tls").await.unwrap();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            let e = futures_util::StreamExt::next(&mut sub).await.expect("open");
            if let Some(t) = text_of(&e) {
                return t;
            }
        }
    })
    .await
    .expect("the message in time");
    assert_eq!(got, "over tls");

    let untrusting = Client::builder(&url).connect().unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), untrusting.wait_connected())
            .await
            .is_err(),
        "a certificate of an unknown CA must not be accepted"
    );
    assert!(Client::builder(&url)
        .tls_roots_pem("not pem")
        .connect()
        .is_err());
}
