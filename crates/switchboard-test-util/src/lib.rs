//! Test helpers for Switchboard: an in-process gateway on port 0, a scriptable
//! origin that records every event it receives, and WebSocket client helpers
//! (tungstenite clients, and a raw byte-level client for malformed input).
//! Only ever a dev-dependency.
//!
//! Everything binds 127.0.0.1 only, and every wait is bounded: helpers panic
//! with what they were waiting for instead of hanging.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard_proto::control::{ConnectionInfo, Stats};
use switchboard_proto::origin::{
    signature, ClosedBy, ConnectEvent, DisconnectEvent, Event, EventBatch, KeepaliveEvent,
    MessageEvent, OriginAnswer, Payload, Reply,
};
use switchboard_server::{Config, DrainReport, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

pub use tokio_tungstenite::tungstenite::Message as WsMessage;

pub mod failure;
pub mod graphql;
pub mod nats;
pub mod redis;

/// A client WebSocket stream.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The default bound of the waits in this crate.
pub const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// The test origin
// ---------------------------------------------------------------------------

/// How the test origin answers `connect`.
#[derive(Debug, Clone)]
pub enum ConnectBehavior {
    /// 200 with this answer.
    Accept(OriginAnswer),
    /// This status with `{"reason": ..}`.
    Reject(u16, String),
    /// This status with this body as is. A 3xx also carries
    /// `Location: /events`, so that an origin client following redirects
    /// would come straight back and be accepted.
    Raw(u16, String),
}

/// The test origin's script; change it at any time through [`TestOrigin::behavior`].
#[derive(Debug, Clone)]
pub struct Behavior {
    /// Answer to `connect`.
    pub connect: ConnectBehavior,
    /// Answer every `message` event with a reply carrying the same payload.
    pub echo: bool,
    /// Answer the next N event requests (not `connect`) with this status.
    pub fail_next: Option<(u32, u16)>,
    /// Sleep this long before answering any request.
    pub delay: Duration,
    /// Answer with `Connection: close`, so every request needs a new TCP
    /// connection (and [`Behavior::refuse_next_connections`] applies to it).
    pub close_connections: bool,
    /// Close the next N TCP connections as soon as they are accepted, before
    /// reading anything: the gateway sees a network error.
    pub refuse_next_connections: u32,
    /// Refuse (403, reason `"refused: <text>"`) every `publish` event whose
    /// text contains this; accept the others.
    pub reject_publish_containing: Option<String>,
    /// Refuse (403, reason `"no access to <channel>"`) every `subscribe`
    /// event whose channel contains this; accept the others.
    pub reject_subscribe_containing: Option<String>,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            connect: ConnectBehavior::Accept(OriginAnswer::default()),
            echo: false,
            fail_next: None,
            delay: Duration::ZERO,
            close_connections: false,
            refuse_next_connections: 0,
            reject_publish_containing: None,
            reject_subscribe_containing: None,
        }
    }
}

/// One request the origin answered.
#[derive(Debug, Clone)]
pub struct Received {
    /// The events in the body.
    pub events: Vec<Event>,
    /// Whether the signature verified (None: no secret configured).
    pub signature_ok: Option<bool>,
    /// The status the origin answered.
    pub status: u16,
    /// The raw request body.
    pub body: String,
    /// The request headers (names lower-case; the last value of repeated ones).
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug)]
struct OriginState {
    behavior: Mutex<Behavior>,
    received: Mutex<Vec<Received>>,
    arrived: Mutex<Vec<Vec<Event>>>,
    refused: AtomicU32,
    paused: watch::Sender<bool>,
    secret: Option<Vec<u8>>,
    notify: Notify,
}

/// A scriptable origin on 127.0.0.1 that records every request.
///
/// Requests are recorded twice: when they arrive ([`TestOrigin::arrivals`])
/// and when they are answered ([`TestOrigin::received`]). [`TestOrigin::events`]
/// holds the events of 2xx answers only: what the origin "took".
#[derive(Debug, Clone)]
pub struct TestOrigin {
    state: Arc<OriginState>,
    /// Its address.
    pub addr: SocketAddr,
}

/// A listener that can close accepted connections at once (a network error
/// for the client), as scripted by [`Behavior::refuse_next_connections`].
struct RefusingListener {
    inner: TcpListener,
    state: Arc<OriginState>,
}

impl axum::serve::Listener for RefusingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let refuse = {
                let mut b = self.state.behavior.lock();
                if b.refuse_next_connections > 0 {
                    b.refuse_next_connections -= 1;
                    true
                } else {
                    false
                }
            };
            if refuse {
                drop(stream);
                self.state.refused.fetch_add(1, SeqCst);
                self.state.notify.notify_waiters();
                continue;
            }
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl TestOrigin {
    /// Starts an origin; with `secret`, it checks each request's signature.
    pub async fn start(secret: Option<&str>) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("valid"), secret).await
    }

    /// Starts an origin on a given address (to restart one on the same port).
    pub async fn start_on(addr: SocketAddr, secret: Option<&str>) -> Self {
        let state = Arc::new(OriginState {
            behavior: Mutex::new(Behavior::default()),
            received: Mutex::new(Vec::new()),
            arrived: Mutex::new(Vec::new()),
            refused: AtomicU32::new(0),
            paused: watch::Sender::new(false),
            secret: secret.map(|s| s.as_bytes().to_vec()),
            notify: Notify::new(),
        });
        let listener = TcpListener::bind(addr).await.expect("bind test origin");
        let addr = listener.local_addr().expect("bound");
        let app = Router::new()
            .route("/events", post(handle))
            .with_state(state.clone());
        let listener = RefusingListener {
            inner: listener,
            state: state.clone(),
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { state, addr }
    }

    /// The webhook URL to give the gateway.
    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Changes the script.
    pub fn behavior(&self, f: impl FnOnce(&mut Behavior)) {
        f(&mut self.state.behavior.lock());
    }

    /// Holds every request (connect included) after it is recorded as arrived
    /// and before it is answered, until [`TestOrigin::resume`].
    pub fn pause(&self) {
        self.state.paused.send_replace(true);
    }

    /// Releases held requests and stops holding new ones.
    pub fn resume(&self) {
        self.state.paused.send_replace(false);
    }

    /// Every request answered so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().clone()
    }

    /// The events of every request that arrived so far, answered or not, in
    /// arrival order (one entry per request).
    pub fn arrivals(&self) -> Vec<Vec<Event>> {
        self.state.arrived.lock().clone()
    }

    /// TCP connections closed because of [`Behavior::refuse_next_connections`].
    pub fn refused_connections(&self) -> u32 {
        self.state.refused.load(SeqCst)
    }

    /// Every event so far, from successful requests only (what the origin "took").
    pub fn events(&self) -> Vec<Event> {
        self.state
            .received
            .lock()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .flat_map(|r| r.events.clone())
            .collect()
    }

    /// Waits until `pred` holds for the accepted events, or panics after `timeout`.
    pub async fn wait_events(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Event]) -> bool,
    ) -> Vec<Event> {
        self.wait_for(timeout, "origin events", || {
            let events = self.events();
            pred(&events).then_some(events)
        })
        .await
    }

    /// Waits until `pred` holds for the arrived requests, or panics after `timeout`.
    pub async fn wait_arrivals(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Vec<Event>]) -> bool,
    ) -> Vec<Vec<Event>> {
        self.wait_for(timeout, "origin arrivals", || {
            let a = self.arrivals();
            pred(&a).then_some(a)
        })
        .await
    }

    /// Waits until `check` returns `Some` (re-checked on every origin
    /// activity), or panics after `timeout` naming `what`.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn() -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.notify.notified();
            if let Some(v) = check() {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if let Some(v) = check() {
                    return v;
                }
                panic!(
                    "timed out after {timeout:?} waiting for {what}; accepted events: {:#?}",
                    self.events()
                );
            }
        }
    }

    /// Accepted `connect` events.
    pub fn connects(&self) -> Vec<ConnectEvent> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Connect(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// Waits for the accepted `connect` event of the client whose local
    /// address is `client` (the gateway's `remote_addr`).
    pub async fn connect_event_for(&self, client: SocketAddr) -> ConnectEvent {
        let want = client.to_string();
        self.wait_for(WAIT, &format!("connect event from {want}"), || {
            self.connects().into_iter().find(|c| c.remote_addr == want)
        })
        .await
    }

    /// The connection id of the client whose local address is `client`.
    pub async fn id_for(&self, client: SocketAddr) -> String {
        self.connect_event_for(client).await.connection_id
    }

    /// Accepted `message` events of connection `id`, in delivery order.
    pub fn messages_of(&self, id: &str) -> Vec<MessageEvent> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Message(m) if m.connection_id == id => Some(m),
                _ => None,
            })
            .collect()
    }

    /// Waits until at least `n` `message` events of `id` were accepted.
    pub async fn wait_messages(&self, id: &str, n: usize) -> Vec<MessageEvent> {
        self.wait_for(WAIT, &format!("{n} messages of {id}"), || {
            let m = self.messages_of(id);
            (m.len() >= n).then_some(m)
        })
        .await
    }

    /// Accepted `disconnect` events (all connections).
    pub fn disconnects(&self) -> Vec<DisconnectEvent> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Disconnect(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    /// Accepted `disconnect` events of connection `id`.
    pub fn disconnects_of(&self, id: &str) -> Vec<DisconnectEvent> {
        self.disconnects()
            .into_iter()
            .filter(|d| d.connection_id == id)
            .collect()
    }

    /// Waits for the `disconnect` event of `id`.
    pub async fn wait_disconnect(&self, id: &str) -> DisconnectEvent {
        self.wait_for(WAIT, &format!("disconnect of {id}"), || {
            self.disconnects_of(id).into_iter().next()
        })
        .await
    }

    /// Accepted `keepalive` events.
    pub fn keepalives(&self) -> Vec<KeepaliveEvent> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Keepalive(k) => Some(k),
                _ => None,
            })
            .collect()
    }
}

async fn handle(State(s): State<Arc<OriginState>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature_ok = s.secret.as_ref().map(|secret| {
        let ts = headers
            .get(signature::TIMESTAMP_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let sig = headers
            .get(signature::SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        signature::verify(secret, ts, sig, &body, now, 300).is_ok()
    });
    let batch: EventBatch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    s.arrived.lock().push(batch.events.clone());
    s.notify.notify_waiters();
    let mut paused = s.paused.subscribe();
    let _ = paused.wait_for(|p| !*p).await;
    let behavior = s.behavior.lock().clone();
    if !behavior.delay.is_zero() {
        tokio::time::sleep(behavior.delay).await;
    }
    let is_connect = matches!(batch.events.first(), Some(Event::Connect(_)));
    let (status, answer) = if let Some(Event::Publish(p)) = batch.events.first() {
        let refused = match (&behavior.reject_publish_containing, &p.payload) {
            (Some(bad), Payload::Text(t)) if t.contains(bad.as_str()) => Some(bad),
            _ => None,
        };
        if let Some(bad) = refused {
            let reason = format!("refused: {bad}");
            (403, serde_json::json!({ "reason": reason }).to_string())
        } else {
            (200, "{}".to_owned())
        }
    } else if let Some(Event::Subscribe(e)) = batch.events.first() {
        match &behavior.reject_subscribe_containing {
            Some(bad) if e.channel.contains(bad.as_str()) => {
                let reason = format!("no access to {}", e.channel);
                (403, serde_json::json!({ "reason": reason }).to_string())
            }
            _ => (200, "{}".to_owned()),
        }
    } else if is_connect {
        match behavior.connect {
            ConnectBehavior::Accept(a) => (200, serde_json::to_string(&a).expect("serializes")),
            ConnectBehavior::Reject(st, reason) => {
                (st, serde_json::json!({ "reason": reason }).to_string())
            }
            ConnectBehavior::Raw(st, body) => (st, body),
        }
    } else {
        let fail = {
            let mut b = s.behavior.lock();
            match &mut b.fail_next {
                Some((n, st)) if *n > 0 => {
                    *n -= 1;
                    Some(*st)
                }
                _ => None,
            }
        };
        match fail {
            Some(st) => (st, String::new()),
            None => {
                let mut answer = OriginAnswer::default();
                if behavior.echo {
                    for e in &batch.events {
                        if let Event::Message(m) = e {
                            answer.replies.push(Reply {
                                connection_id: m.connection_id.clone(),
                                payload: m.payload.clone(),
                            });
                        }
                    }
                }
                (200, serde_json::to_string(&answer).expect("serializes"))
            }
        }
    };
    let header_map = headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    s.received.lock().push(Received {
        events: batch.events,
        signature_ok,
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        headers: header_map,
    });
    s.notify.notify_waiters();
    let connection = if behavior.close_connections {
        "close"
    } else {
        "keep-alive"
    };
    let mut response = (
        StatusCode::from_u16(status).expect("valid status"),
        [
            ("content-type", "application/json"),
            ("connection", connection),
        ],
        answer,
    )
        .into_response();
    if (300..400).contains(&status) {
        response.headers_mut().insert(
            axum::http::header::LOCATION,
            axum::http::HeaderValue::from_static("/events"),
        );
    }
    response
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

/// A control API answer.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body as text.
    pub body: String,
}

impl ApiResponse {
    /// Reads a whole response.
    pub async fn read(resp: reqwest::Response) -> Self {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.expect("control API body");
        Self {
            status,
            headers,
            body,
        }
    }

    /// The body as JSON; panics (showing the body) if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): status {} body {:?}",
                self.status, self.body
            )
        })
    }

    /// The `code` field of a JSON error body (empty if absent).
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// A gateway running in-process on 127.0.0.1 ports chosen by the OS.
#[derive(Debug)]
pub struct TestGateway {
    /// Client listener.
    pub addr: SocketAddr,
    /// Control listener.
    pub control: SocketAddr,
    /// The node id.
    pub node: String,
    /// The configuration it runs with.
    pub config: Config,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<DrainReport>>,
}

impl TestGateway {
    /// Starts a gateway with test-friendly defaults, adjusted by `f`.
    ///
    /// Defaults differing from [`Config::default`]: both listeners on
    /// 127.0.0.1 port 0, `drain-spread` 100 ms, `drain-timeout` 10 s,
    /// `origin-retry-initial` 20 ms, `origin-retry-max` 200 ms.
    pub async fn start(f: impl FnOnce(&mut Config)) -> Self {
        Self::start_joined(f, |_| {}).await
    }

    /// Like [`TestGateway::start`], with `join` called on the bound gateway
    /// before it runs (to join it to a cluster backend).
    pub async fn start_joined(f: impl FnOnce(&mut Config), join: impl FnOnce(&Gateway)) -> Self {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("valid"),
            control_listen: "127.0.0.1:0".parse().expect("valid"),
            drain_spread: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(10),
            origin_retry_initial: Duration::from_millis(20),
            origin_retry_max: Duration::from_millis(200),
            ..Config::default()
        };
        f(&mut config);
        let gw = Gateway::bind(config.clone()).await.expect("gateway binds");
        join(&gw);
        let (addr, control, node) = (
            gw.client_addr(),
            gw.control_addr(),
            gw.node_id().to_string(),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gw.run(async move {
            let _ = rx.await;
        }));
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("http client");
        Self {
            addr,
            control,
            node,
            config,
            http,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Starts a gateway sending its events to `origin`, adjusted by `f`.
    pub async fn with_origin(origin: &TestOrigin, f: impl FnOnce(&mut Config)) -> Self {
        let url = origin.url();
        Self::start(move |c| {
            c.origin = Some(url);
            f(c);
        })
        .await
    }

    /// `ws://` URL for `path`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// `http://` URL of the control API for `path`.
    pub fn api(&self, path: &str) -> String {
        format!("http://{}{}", self.control, path)
    }

    /// Starts the drain and waits for it to finish.
    pub async fn shutdown(mut self) -> DrainReport {
        self.stop.take().map(|s| s.send(()));
        let task = self.task.take().expect("running");
        tokio::time::timeout(self.config.drain_timeout + WAIT, task)
            .await
            .expect("drain finishes within drain-timeout")
            .expect("gateway task")
    }

    /// Starts the drain without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<DrainReport> {
        self.stop.take().map(|s| s.send(()));
        self.task.take().expect("running")
    }

    /// A control API request, with the first configured API key (if any).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.api(path));
        match self.config.api_key.first() {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// Sends a request built by [`TestGateway::request`] and reads the answer.
    pub async fn call(&self, req: reqwest::RequestBuilder) -> ApiResponse {
        ApiResponse::read(req.send().await.expect("control API answers")).await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> ApiResponse {
        self.call(self.request(reqwest::Method::GET, path)).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> ApiResponse {
        self.call(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> ApiResponse {
        self.call(self.request(reqwest::Method::DELETE, path)).await
    }

    /// `POST /v1/connections/{id}/messages` with a text message; the status.
    pub async fn push_text(&self, id: &str, text: &str) -> u16 {
        self.post(
            &format!("/v1/connections/{id}/messages"),
            &serde_json::json!({ "text": text }),
        )
        .await
        .status
    }

    /// `GET /v1/stats`.
    pub async fn stats(&self) -> Stats {
        let r = self.get("/v1/stats").await;
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).expect("stats body")
    }

    /// `GET /v1/connections/{id}`, `None` on 404.
    pub async fn connection(&self, id: &str) -> Option<ConnectionInfo> {
        let r = self.get(&format!("/v1/connections/{id}")).await;
        match r.status {
            200 => Some(serde_json::from_str(&r.body).expect("connection info body")),
            404 => None,
            s => panic!("GET /v1/connections/{id}: {s} {}", r.body),
        }
    }

    /// The value of one series of `/metrics`, e.g.
    /// `switchboard_slow_consumer_closes_total` or
    /// `switchboard_handshakes_total{result="timeout"}`; 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let r = self.get("/metrics").await;
        assert_eq!(r.status, 200, "{}", r.body);
        metric_value(&r.body, series)
    }
}

/// The sum of every series of metric `name` (whatever its labels) in a
/// Prometheus/OpenMetrics text exposition; 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        .filter_map(|rest| rest.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

/// The value of `series` in a Prometheus/OpenMetrics text exposition; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.split_whitespace().next())
        .filter_map(|v| v.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// tungstenite clients
// ---------------------------------------------------------------------------

/// Connects a WebSocket client.
pub async fn connect(url: &str) -> Ws {
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("websocket handshake within 5s")
        .expect("websocket connects")
        .0
}

/// Connects a WebSocket client sending extra request headers; returns the
/// stream and the handshake response, or the handshake error.
pub async fn connect_with(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    let mut req = url.into_client_request()?;
    for (n, v) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(n.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("websocket handshake within 5s")
}

/// The local address of a client's socket (the gateway's `remote_addr`).
pub fn local_addr(ws: &Ws) -> SocketAddr {
    match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s.local_addr().expect("local addr"),
        _ => panic!("test clients are plain TCP"),
    }
}

/// The next data or close message, skipping pings and pongs; panics after 5 s.
pub async fn next_msg(ws: &mut Ws) -> WsMessage {
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("message within 5s")
            .expect("stream open")
            .expect("no protocol error");
        if !matches!(m, WsMessage::Ping(_) | WsMessage::Pong(_)) {
            return m;
        }
    }
}

/// The next data message as JSON (pings and pongs skipped); panics after
/// 5 s, or on a message that is not a JSON text frame.
pub async fn next_json(ws: &mut Ws) -> serde_json::Value {
    match next_msg(ws).await {
        WsMessage::Text(t) => serde_json::from_str(&t).expect("a JSON text frame"),
        other => panic!("expected a JSON text frame, got {other:?}"),
    }
}

/// Reads until the gateway's close frame and returns its code and reason,
/// with the data messages received before it; then keeps reading until the
/// stream ends, so tungstenite sends its close reply and the closing
/// handshake completes. Panics after 5 s, or if the stream ends without a
/// close frame.
pub async fn expect_close(ws: &mut Ws) -> (u16, String, Vec<WsMessage>) {
    use futures_util::StreamExt;
    let mut before = Vec::new();
    let (code, reason) = loop {
        match next_msg(ws).await {
            WsMessage::Close(Some(f)) => break (u16::from(f.code), f.reason.to_string()),
            WsMessage::Close(None) => break (1005, String::new()),
            m => before.push(m),
        }
    };
    let drained =
        tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
    assert!(
        drained.is_ok(),
        "the gateway did not end the connection after the closing handshake"
    );
    (code, reason, before)
}

/// Proves the node still serves: a new client connects, its message reaches
/// the origin, a control API push reaches the client, and a client close is
/// reported as one `disconnect`.
pub async fn assert_serves(gw: &TestGateway, origin: &TestOrigin) {
    use futures_util::SinkExt;
    let (mut ws, id) = connect_id(gw, origin, "/still-serving").await;
    ws.send(WsMessage::text("are you there?"))
        .await
        .expect("send");
    let m = origin.wait_messages(&id, 1).await;
    assert_eq!(m[0].payload, Payload::Text("are you there?".into()));
    assert_eq!(gw.push_text(&id, "yes").await, 200);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("yes"));
    ws.close(None).await.expect("close");
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(d.closed_by, ClosedBy::Client);
}

/// A client's connection id: connects to `gw` with `path` and waits for
/// the origin's record of it.
pub async fn connect_id(gw: &TestGateway, origin: &TestOrigin, path: &str) -> (Ws, String) {
    let ws = connect(&gw.ws_url(path)).await;
    let id = origin.id_for(local_addr(&ws)).await;
    (ws, id)
}

// ---------------------------------------------------------------------------
// Raw clients: exact bytes, for malformed input
// ---------------------------------------------------------------------------

/// An HTTP response read from a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body (bytes after the head, up to end of stream).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Splits a response head off `buf` (`None` if incomplete).
fn parse_response_head(buf: &[u8]) -> Option<(RawResponse, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((
        RawResponse {
            status,
            headers,
            body: Vec::new(),
        },
        end,
    ))
}

/// A valid upgrade request head for `path` with extra header lines.
pub fn upgrade_request(path: &str, extra: &[(&str, &str)]) -> String {
    let mut s = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (n, v) in extra {
        s.push_str(&format!("{n}: {v}\r\n"));
    }
    s.push_str("\r\n");
    s
}

/// Writes `request` to a new connection to `addr` and reads the answer until
/// the server closes the connection (or 5 s pass). Returns `None` if the
/// server closed without answering.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let mut s = TcpStream::connect(addr).await.expect("tcp connect");
    // The server may answer and close before reading everything (e.g. 431).
    let _ = s.write_all(request).await;
    read_response(&mut s).await
}

/// Reads the answer on `s` until the server closes the connection (5 s at
/// most, else panics). Returns `None` if it closed without answering.
pub async fn read_response(s: &mut TcpStream) -> Option<RawResponse> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "server neither answered nor closed within 5s; got {:?}",
        String::from_utf8_lossy(&buf)
    );
    let (mut resp, head_len) = parse_response_head(&buf)?;
    resp.body = buf[head_len..].to_vec();
    Some(resp)
}

/// One frame read by a [`RawWs`].
#[derive(Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// RSV1 bit (compressed).
    pub rsv1: bool,
    /// Opcode (0x1 text, 0x2 binary, 0x8 close, 0x9 ping, 0xA pong).
    pub opcode: u8,
    /// Whether the server masked it (it must not).
    pub masked: bool,
    /// The payload.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for RawFrame {
    /// Shows at most 32 payload bytes, so failing tests print readable frames.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.payload[..self.payload.len().min(32)];
        f.debug_struct("RawFrame")
            .field("fin", &self.fin)
            .field("rsv1", &self.rsv1)
            .field("opcode", &self.opcode)
            .field("masked", &self.masked)
            .field("len", &self.payload.len())
            .field("payload", &String::from_utf8_lossy(shown))
            .finish()
    }
}

impl RawFrame {
    /// Code and reason of a close frame.
    pub fn close(&self) -> Option<(u16, String)> {
        if self.opcode != 0x8 {
            return None;
        }
        if self.payload.len() < 2 {
            return Some((1005, String::new()));
        }
        Some((
            u16::from_be_bytes([self.payload[0], self.payload[1]]),
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }
}

/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a continuation frame.
pub const OP_CONT: u8 = 0x0;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

/// A WebSocket client working on raw bytes: it sends exactly the frames it
/// is told to (masked or not, any opcode or bits) and answers nothing on its
/// own (no pongs, no close replies).
#[derive(Debug)]
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The 101 answer.
    pub response: RawResponse,
    /// The client's local address (the gateway's `remote_addr`).
    pub local_addr: SocketAddr,
}

impl RawWs {
    /// Connects to `addr` and completes an upgrade to `path` with extra
    /// headers; panics unless the answer is 101.
    pub async fn connect(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Self {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Self::handshake(stream, path, extra).await
    }

    /// Completes an upgrade on an already connected stream (e.g. one with a
    /// small receive buffer); panics unless the answer is 101.
    pub async fn handshake(mut stream: TcpStream, path: &str, extra: &[(&str, &str)]) -> Self {
        let local_addr = stream.local_addr().expect("local addr");
        stream
            .write_all(upgrade_request(path, extra).as_bytes())
            .await
            .expect("write request");
        let mut buf = Vec::new();
        let (response, head_len) = tokio::time::timeout(WAIT, async {
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(done) = parse_response_head(&buf) {
                    return done;
                }
                let n = stream
                    .read(&mut chunk)
                    .await
                    .expect("read handshake answer");
                assert!(
                    n > 0,
                    "closed during handshake; got {:?}",
                    String::from_utf8_lossy(&buf)
                );
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("handshake answer within 5s");
        assert_eq!(
            response.status,
            101,
            "handshake refused: {response:?} {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.drain(..head_len);
        Self {
            stream,
            buf,
            response,
            local_addr,
        }
    }

    /// Writes raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Encodes a frame. `masked: false` makes an (illegal) unmasked client frame.
    pub fn encode(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f =
            vec![(if fin { 0x80 } else { 0 }) | (if rsv1 { 0x40 } else { 0 }) | (opcode & 0x0F)];
        let m = if masked { 0x80 } else { 0 };
        let len = payload.len();
        if len < 126 {
            f.push(m | len as u8);
        } else if len <= usize::from(u16::MAX) {
            f.push(m | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            let key: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    /// Sends one frame (see [`RawWs::encode`]).
    pub async fn send_frame(
        &mut self,
        fin: bool,
        rsv1: bool,
        opcode: u8,
        payload: &[u8],
        masked: bool,
    ) {
        let f = Self::encode(fin, rsv1, opcode, payload, masked);
        self.send_raw(&f).await;
    }

    /// Sends a masked text message.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, false, OP_TEXT, text.as_bytes(), true)
            .await;
    }

    /// Sends a masked binary message.
    pub async fn send_binary(&mut self, data: &[u8]) {
        self.send_frame(true, false, OP_BINARY, data, true).await;
    }

    /// Sends a masked close frame.
    pub async fn send_close(&mut self, code: u16, reason: &str) {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        self.send_frame(true, false, OP_CLOSE, &p, true).await;
    }

    fn parse_frame(&mut self) -> Option<RawFrame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let masked = b[1] & 0x80 != 0;
        let (len, mut pos) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            126 => return None,
            127 if b.len() >= 10 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(l) as usize, 10)
            }
            127 => return None,
            n => (usize::from(n), 2),
        };
        let mut key = None;
        if masked {
            if b.len() < pos + 4 {
                return None;
            }
            key = Some([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]);
            pos += 4;
        }
        if b.len() < pos + len {
            return None;
        }
        let mut payload = b[pos..pos + len].to_vec();
        if let Some(k) = key {
            for (i, x) in payload.iter_mut().enumerate() {
                *x ^= k[i % 4];
            }
        }
        let frame = RawFrame {
            fin: b[0] & 0x80 != 0,
            rsv1: b[0] & 0x40 != 0,
            opcode: b[0] & 0x0F,
            masked,
            payload,
        };
        self.buf.drain(..pos + len);
        Some(frame)
    }

    /// The next frame, or `None` once the server closed the TCP connection.
    /// Panics after `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(f) = self.parse_frame() {
                return Some(f);
            }
            let mut chunk = vec![0u8; 64 << 10];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!(
                    "no frame within {timeout:?} ({} bytes buffered)",
                    self.buf.len()
                ),
                Ok(Err(_)) | Ok(Ok(0)) => return None,
                Ok(Ok(n)) => n,
            };
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until a close frame; returns its code and reason and the
    /// frames before it. Panics on end of stream or after `timeout`.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String, Vec<RawFrame>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Some(f) => match f.close() {
                    Some((code, reason)) => return (code, reason, before),
                    None => before.push(f),
                },
                None => panic!(
                    "connection ended without a close frame; {} frames before it, the last: {:?}",
                    before.len(),
                    before.last()
                ),
            }
        }
    }

    /// Reads frames until the server closes the TCP connection and returns
    /// them. Panics after `timeout`.
    pub async fn expect_eof(&mut self, timeout: Duration) -> Vec<RawFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Some(f) => frames.push(f),
                None => return frames,
            }
        }
    }

    /// The underlying stream.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

// ---------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------

/// Polls `check` every 10 ms until it returns true; panics naming `what`
/// after `timeout`. For state only observable by asking (control API, metrics).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A 127.0.0.1 address where nothing listens (bound, then released).
pub fn closed_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// This process's resident set size in bytes (`VmRSS` of `/proc/self/status`).
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Installs a test log subscriber (once), honouring `RUST_LOG`.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
