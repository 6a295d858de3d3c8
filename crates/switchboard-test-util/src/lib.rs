//! Test helpers for Switchboard: an in-process gateway on port 0, a scriptable
//! origin that records every event it receives, and WebSocket client helpers.
//! Only ever a dev-dependency.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard_proto::origin::{signature, Event, EventBatch, OriginAnswer, Reply};
use switchboard_server::{Config, DrainReport, Gateway};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

pub use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A client WebSocket stream.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How the test origin answers `connect`.
#[derive(Debug, Clone)]
pub enum ConnectBehavior {
    /// 200 with this answer.
    Accept(OriginAnswer),
    /// This status with `{"reason": ..}`.
    Reject(u16, String),
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
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            connect: ConnectBehavior::Accept(OriginAnswer::default()),
            echo: false,
            fail_next: None,
            delay: Duration::ZERO,
        }
    }
}

/// One request the origin received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The events in the body.
    pub events: Vec<Event>,
    /// Whether the signature verified (None: no secret configured).
    pub signature_ok: Option<bool>,
    /// The status the origin answered.
    pub status: u16,
}

#[derive(Debug)]
struct OriginState {
    behavior: Mutex<Behavior>,
    received: Mutex<Vec<Received>>,
    secret: Option<Vec<u8>>,
    notify: Notify,
}

/// A scriptable origin on 127.0.0.1 that records every request.
#[derive(Debug, Clone)]
pub struct TestOrigin {
    state: Arc<OriginState>,
    /// Its address.
    pub addr: SocketAddr,
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
            secret: secret.map(|s| s.as_bytes().to_vec()),
            notify: Notify::new(),
        });
        let listener = TcpListener::bind(addr).await.expect("bind test origin");
        let addr = listener.local_addr().expect("bound");
        let app = Router::new().route("/events", post(handle)).with_state(state.clone());
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

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().clone()
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
    pub async fn wait_events(&self, timeout: Duration, pred: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.notify.notified();
            let events = self.events();
            if pred(&events) {
                return events;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for origin events; got {:#?}", self.events());
            }
        }
    }
}

async fn handle(State(s): State<Arc<OriginState>>, headers: HeaderMap, body: Bytes) -> Response {
    let signature_ok = s.secret.as_ref().map(|secret| {
        let ts = headers.get(signature::TIMESTAMP_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        let sig = headers.get(signature::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
        signature::verify(secret, ts, sig, &body, now, 300).is_ok()
    });
    let batch: EventBatch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let behavior = s.behavior.lock().clone();
    if !behavior.delay.is_zero() {
        tokio::time::sleep(behavior.delay).await;
    }
    let is_connect = matches!(batch.events.first(), Some(Event::Connect(_)));
    let (status, answer) = if is_connect {
        match behavior.connect {
            ConnectBehavior::Accept(a) => (200, serde_json::to_string(&a).expect("serializes")),
            ConnectBehavior::Reject(st, reason) => (st, serde_json::json!({ "reason": reason }).to_string()),
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
                            answer.replies.push(Reply { connection_id: m.connection_id.clone(), payload: m.payload.clone() });
                        }
                    }
                }
                (200, serde_json::to_string(&answer).expect("serializes"))
            }
        }
    };
    s.received.lock().push(Received { events: batch.events, signature_ok, status });
    s.notify.notify_waiters();
    (StatusCode::from_u16(status).expect("valid status"), [("content-type", "application/json")], answer).into_response()
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
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<DrainReport>>,
}

impl TestGateway {
    /// Starts a gateway with test-friendly defaults, adjusted by `f`.
    pub async fn start(f: impl FnOnce(&mut Config)) -> Self {
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
        let gw = Gateway::bind(config).await.expect("gateway binds");
        let (addr, control, node) = (gw.client_addr(), gw.control_addr(), gw.node_id().to_string());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gw.run(async move {
            let _ = rx.await;
        }));
        Self { addr, control, node, stop: Some(tx), task: Some(task) }
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
        self.task.take().expect("running").await.expect("gateway task")
    }

    /// Starts the drain without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<DrainReport> {
        self.stop.take().map(|s| s.send(()));
        self.task.take().expect("running")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Connects a WebSocket client.
pub async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.expect("websocket connects").0
}

/// The next data or close message, skipping pings and pongs; panics after 5 s.
pub async fn next_msg(ws: &mut Ws) -> WsMessage {
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("message within 5s")
            .expect("stream open")
            .expect("no protocol error");
        if !matches!(m, WsMessage::Ping(_) | WsMessage::Pong(_)) {
            return m;
        }
    }
}

/// Installs a test log subscriber (once), honouring `RUST_LOG`.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
