//! The background task behind a [`Client`](crate::Client): it owns the
//! WebSocket, (re)connects with backoff, sends commands and routes replies and
//! pushes.
//!
//! Handles talk to the task through one unbounded channel of [`Request`]s and
//! get their answers on oneshot channels; subscriptions get their events on
//! their own unbounded channels. The task keeps, across connections:
//!
//! - the client-side subscriptions, each with its [`StreamTracker`], so that
//!   every new connection resubscribes from the last delivered position;
//! - the commands waiting for a connection (at most `max_queued`);
//! - the commands in flight on the current connection, by id. When the
//!   connection drops, those safe to repeat go back to the front of the queue
//!   and `publish`/`send` fail with [`Error::ConnectionLost`];
//! - the gateway's session: its resume token, the highest direct message
//!   sequence received (reconnects ask to resume with both), what was
//!   acknowledged, the server-side subscriptions and the channels left
//!   while the session may still hold them.
//!
//! A connection the SDK gives up on (silent link, socket error) is dropped
//! without a close frame, so that the gateway keeps its session for a
//! resume; only [`Client::close`](crate::Client::close) sends one, which
//! ends the session.
//!
//! Timeouts are enforced by the callers (the handle stops waiting); the task
//! skips requests whose caller is gone when it gets to them.

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::event::{
    ChannelMessage, ClientEvent, ConnectionState, DirectMessage, DisconnectReason,
    SubscriptionEvent,
};
use crate::tracker::StreamTracker;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard_proto::native::{
    CommandBody, Push, Reply, ResumeError, ServerFrame, SessionChannel, StreamPosition,
    SubscribeResult, SUBPROTOCOL,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The client's WebSocket.
type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long the task waits for the gateway's half of a closing handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Added to twice the ping interval to decide that a silent link is dead.
const HEARTBEAT_SLACK: Duration = Duration::from_secs(5);
/// Direct messages acknowledged at once: an `ack` goes out as soon as this
/// many are received and not acknowledged yet.
pub(crate) const ACK_BATCH: u64 = 32;
/// Longest wait before acknowledging: an `ack` goes out at the latest this
/// long after the first direct message not acknowledged yet, so the gateway
/// stops keeping (for a resume) what the client has. With [`ACK_BATCH`],
/// one `ack` per 32 messages or per 500 ms, whichever comes first.
pub(crate) const ACK_DELAY: Duration = Duration::from_millis(500);

/// Everything the task needs to know, fixed at [`ClientBuilder::connect`](crate::ClientBuilder::connect).
#[derive(Debug)]
pub(crate) struct Settings {
    /// The URL to connect to (the token is added to it per handshake).
    pub(crate) url: String,
    /// Extra handshake headers.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// The token sent at each handshake; [`crate::Client::refresh`]
    /// replaces it.
    pub(crate) token: std::sync::RwLock<Option<String>>,
    /// Reconnect schedule.
    pub(crate) backoff: crate::backoff::BackoffConfig,
    /// A connection that stayed up this long resets the backoff.
    pub(crate) stable_after: Duration,
    /// Bound of the TCP + WebSocket handshake and the `connected` push.
    pub(crate) connect_timeout: Duration,
    /// Most commands waiting for a connection.
    pub(crate) max_queued: usize,
    /// The TLS settings of `wss://` when not the default (web PKI roots).
    #[cfg(feature = "rustls-tls")]
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

/// A TLS client configuration trusting only the CA certificates of `pem`.
#[cfg(feature = "rustls-tls")]
pub(crate) fn tls_config(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| Error::Config(format!("tls_roots_pem: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("tls_roots_pem: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "tls_roots_pem: no CERTIFICATE in the PEM text".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// State shared by the task and the handles.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The connection state, as the handles see it.
    pub(crate) state: watch::Sender<ConnectionState>,
    /// Client-wide events; taken (closing every receiver) when the task ends.
    pub(crate) events: Mutex<Option<broadcast::Sender<ClientEvent>>>,
}

impl Shared {
    /// The error for a command that can no longer be served.
    pub(crate) fn final_error(&self) -> Error {
        match &*self.state.borrow() {
            ConnectionState::Failed(e) => e.clone(),
            _ => Error::Closed,
        }
    }

    fn emit(&self, event: ClientEvent) {
        if let Some(tx) = &*self.events.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(event);
        }
    }
}

/// What a handle asks of the task.
#[derive(Debug)]
pub(crate) enum Request {
    /// Run a command and answer with its `result`.
    Call(Call),
    /// Start a client-side subscription.
    Subscribe {
        /// The channel.
        channel: String,
        /// Tells this subscription apart from earlier ones to the same channel.
        sub_id: u64,
        /// Where its events go.
        events: mpsc::UnboundedSender<SubscriptionEvent>,
        /// Answered with the first subscribe's outcome.
        confirm: oneshot::Sender<Result<()>>,
    },
    /// End a client-side subscription.
    Unsubscribe {
        /// The channel.
        channel: String,
        /// Which subscription (ignored if it is no longer the current one).
        sub_id: u64,
        /// Answered once the gateway confirmed (or no connection needs it).
        reply: Option<oneshot::Sender<Result<()>>>,
    },
    /// Close the connection and stop.
    Close {
        /// Answered when the task has stopped.
        done: oneshot::Sender<()>,
    },
}

/// A command waiting for its reply.
#[derive(Debug)]
pub(crate) struct Call {
    /// The command.
    pub(crate) body: CommandBody,
    /// Whether it may be sent again after a connection dropped with it in
    /// flight (everything but `publish` and `send`).
    pub(crate) retry_safe: bool,
    /// Where the result goes.
    pub(crate) reply: oneshot::Sender<Result<serde_json::Value>>,
}

/// What the reply to a command in flight is for.
#[derive(Debug)]
enum Inflight {
    Call(Call),
    Subscribe {
        channel: String,
        sub_id: u64,
    },
    Unsubscribe {
        channel: String,
        reply: Option<oneshot::Sender<Result<()>>>,
    },
    /// A server-side subscription of a resumed session, subscribed again to
    /// get its messages flowing.
    ServerResubscribe {
        channel: String,
    },
}

/// One client-side subscription.
#[derive(Debug)]
struct SubEntry {
    sub_id: u64,
    events: mpsc::UnboundedSender<SubscriptionEvent>,
    tracker: StreamTracker,
    /// The `subscribe()` call, until the first reply.
    confirm: Option<oneshot::Sender<Result<()>>>,
    /// Id of the subscribe command in flight.
    cmd: Option<u64>,
    /// Subscribed (or subscribing) on the current connection.
    on_connection: bool,
    /// The gateway confirmed it in the current session: a resumed session
    /// that does not list it lost it while the client was away.
    in_session: bool,
}

/// The gateway's session, as the client knows it.
#[derive(Debug, Default)]
struct Session {
    /// The resume token (none before the first connection, or from a
    /// gateway that keeps no sessions).
    token: Option<String>,
    /// The highest direct message sequence received.
    received: u64,
    /// The highest one acknowledged (or known to the gateway from a resume).
    acked: u64,
    /// When the next `ack` is due (some direct message is not acknowledged).
    ack_due: Option<Instant>,
}

impl Session {
    /// A direct message numbered `seq` arrived: whether it is new (not a
    /// duplicate), and whether an `ack` is to be sent at once.
    fn on_direct(&mut self, seq: u64, now: Instant) -> (bool, bool) {
        if seq <= self.received {
            return (false, false);
        }
        if seq != self.received + 1 {
            tracing::debug!(
                seq,
                received = self.received,
                "switchboard: direct messages skipped"
            );
        }
        self.received = seq;
        if self.received - self.acked >= ACK_BATCH {
            return (true, true);
        }
        self.ack_due.get_or_insert(now + ACK_DELAY);
        (true, false)
    }

    /// The `ack` to send now, if anything is unacknowledged.
    fn take_ack(&mut self) -> Option<u64> {
        self.ack_due = None;
        (self.received > self.acked).then(|| {
            self.acked = self.received;
            self.received
        })
    }
}

/// How a request or a frame leaves the session.
enum Flow {
    Continue,
    Close,
    Lost(DisconnectReason),
}

/// How a connection attempt ended.
enum Attempt {
    Connected(Box<Ws>, Welcome),
    Retry(Error),
    Failed(Error),
    Closed,
}

/// The gateway's `connected` push.
#[derive(Debug)]
struct Welcome {
    client: String,
    node: String,
    ping_interval: Duration,
    /// The session's resume token.
    session: Option<String>,
    /// The session named by `?resume=` was resumed.
    resumed: bool,
    /// Why it could not be.
    resume_error: Option<ResumeError>,
    /// A resumed session's (parked) channels.
    channels: Vec<SessionChannel>,
}

/// A command on the wire.
#[derive(Serialize)]
struct Outgoing<'a> {
    id: u64,
    #[serde(flatten)]
    body: &'a CommandBody,
}

/// Starts the task.
pub(crate) fn spawn(
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    requests: mpsc::UnboundedReceiver<Request>,
) {
    let task = Task {
        backoff: Backoff::new(settings.backoff),
        settings,
        shared,
        requests,
        next_id: 0,
        subs: HashMap::new(),
        unsubscribing: HashMap::new(),
        queue: VecDeque::new(),
        inflight: HashMap::new(),
        close_waiters: Vec::new(),
        session: Session::default(),
        server_subs: HashMap::new(),
        leave: HashSet::new(),
        connected_before: false,
    };
    tokio::spawn(task.run());
}

struct Task {
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    requests: mpsc::UnboundedReceiver<Request>,
    backoff: Backoff,
    next_id: u64,
    subs: HashMap<String, SubEntry>,
    /// Unsubscribes in flight per channel: their messages are dropped.
    unsubscribing: HashMap<String, u32>,
    queue: VecDeque<Call>,
    inflight: HashMap<u64, Inflight>,
    close_waiters: Vec<oneshot::Sender<()>>,
    session: Session,
    /// Server-side subscriptions of the session (channels without a
    /// client-side subscription), each with the last position delivered.
    server_subs: HashMap<String, StreamPosition>,
    /// Channels the client left without the session having confirmed it
    /// (unsubscribed while disconnected, or the reply was lost): a resumed
    /// session that still lists one is told to leave it.
    leave: HashSet<String>,
    /// A connection was established before: the next is a reconnect.
    connected_before: bool,
}

impl Task {
    async fn run(mut self) {
        let end = loop {
            self.shared.state.send_replace(ConnectionState::Connecting);
            let retry_in = match self.connect().await {
                Attempt::Closed => break None,
                Attempt::Failed(e) => break Some(e),
                Attempt::Retry(error) => {
                    let retry_in = self.backoff.next_delay();
                    tracing::debug!(%error, ?retry_in, "switchboard connect failed");
                    self.shared
                        .emit(ClientEvent::ConnectFailed { error, retry_in });
                    retry_in
                }
                Attempt::Connected(mut ws, welcome) => {
                    let since = Instant::now();
                    let flow = self.session(&mut ws, welcome).await;
                    self.connection_lost();
                    match flow {
                        Flow::Lost(reason) => {
                            // Dropped, without a close frame: a close frame
                            // would end the session, a lost socket leaves it
                            // to be resumed.
                            drop(ws);
                            if since.elapsed() >= self.settings.stable_after {
                                self.backoff.reset();
                            }
                            let retry_in = self.backoff.next_delay();
                            tracing::debug!(%reason, ?retry_in, "switchboard connection lost");
                            self.shared.state.send_replace(ConnectionState::Connecting);
                            self.shared
                                .emit(ClientEvent::Disconnected { reason, retry_in });
                            retry_in
                        }
                        Flow::Close | Flow::Continue => {
                            close_politely(&mut ws, true).await;
                            break None;
                        }
                    }
                }
            };
            if !self.pause(retry_in).await {
                break None;
            }
        };
        self.shutdown(end);
    }

    /// One connection attempt, serving requests meanwhile.
    async fn connect(&mut self) -> Attempt {
        let resume = self
            .session
            .token
            .clone()
            .map(|token| (token, self.session.received));
        let handshake = handshake(self.settings.clone(), resume);
        tokio::pin!(handshake);
        loop {
            tokio::select! {
                result = &mut handshake => return match result {
                    Ok((ws, welcome)) => Attempt::Connected(ws, welcome),
                    Err(e) if e.is_terminal() => Attempt::Failed(e),
                    Err(e) => Attempt::Retry(e),
                },
                request = self.requests.recv() => match request {
                    None => return Attempt::Closed,
                    Some(r) => if let Flow::Close = self.on_request(r, None).await {
                        return Attempt::Closed;
                    },
                },
            }
        }
    }

    /// Waits `delay` before the next attempt, serving requests; false if the
    /// client was closed meanwhile.
    async fn pause(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                request = self.requests.recv() => match request {
                    None => return false,
                    Some(r) => if let Flow::Close = self.on_request(r, None).await {
                        return false;
                    },
                },
            }
        }
    }

    /// Serves one established connection until it ends or the client closes.
    async fn session(&mut self, ws: &mut Ws, welcome: Welcome) -> Flow {
        let Welcome {
            client,
            node,
            ping_interval,
            session,
            resumed,
            resume_error,
            channels,
        } = welcome;
        tracing::debug!(%client, %node, resumed, ?resume_error, "switchboard connected");
        self.shared.state.send_replace(ConnectionState::Connected {
            client_id: client.clone(),
            node: node.clone(),
        });
        let event = if resumed {
            ClientEvent::Resumed {
                client_id: client,
                node,
            }
        } else if self.connected_before {
            ClientEvent::Restarted {
                client_id: client,
                node,
                error: resume_error,
            }
        } else {
            ClientEvent::Connected {
                client_id: client,
                node,
            }
        };
        self.connected_before = true;
        if resumed {
            // The gateway forgot what it re-sends after `received`.
            self.session.acked = self.session.received;
        } else {
            self.new_session();
        }
        self.session.token = session;
        self.shared.emit(event);
        // First subscribes whose caller gave up are dropped (a resumed
        // session may hold them: they are left).
        let abandoned: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, e)| e.confirm.as_ref().is_some_and(|c| c.is_closed()))
            .map(|(c, _)| c.clone())
            .collect();
        for channel in abandoned {
            self.subs.remove(&channel);
            if resumed {
                self.leave.insert(channel);
            }
        }
        // Resubscribe first, so that queued publishes to those channels come
        // back to us; then flush the queue.
        let subscribed = if resumed {
            self.resume_channels(ws, channels).await
        } else {
            self.subscribe_all(ws).await
        };
        if let Err(e) = subscribed {
            return lost(e);
        }
        while let Some(call) = self.queue.pop_front() {
            if let Err(e) = self.send_call(ws, call).await {
                return lost(e);
            }
        }

        // Anything at all (a ping included) proves the link alive.
        let dead_after = (!ping_interval.is_zero()).then(|| ping_interval * 2 + HEARTBEAT_SLACK);
        let heartbeat = tokio::time::sleep(dead_after.unwrap_or_default());
        tokio::pin!(heartbeat);
        // Fires when the batched `ack` is due (armed while one is).
        let mut ack_armed: Option<Instant> = None;
        let ack_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(ack_timer);
        loop {
            if self.session.ack_due != ack_armed {
                ack_armed = self.session.ack_due;
                if let Some(at) = ack_armed {
                    ack_timer.as_mut().reset(at);
                }
            }
            tokio::select! {
                () = &mut ack_timer, if ack_armed.is_some() => {
                    ack_armed = None;
                    if let Err(e) = self.send_ack(ws).await {
                        return lost(e);
                    }
                }
                frame = ws.next() => {
                    if let Some(d) = dead_after {
                        heartbeat.as_mut().reset(Instant::now() + d);
                    }
                    let flow = match frame {
                        Some(Ok(Message::Text(text))) => self.on_text(ws, text.as_bytes()).await,
                        Some(Ok(Message::Close(frame))) => {
                            let (code, reason) = frame
                                .map(|f| (u16::from(f.code), f.reason.to_string()))
                                .unwrap_or((1005, String::new()));
                            // Let tungstenite send its close reply.
                            close_politely(ws, false).await;
                            Flow::Lost(DisconnectReason::Closed { code, reason })
                        }
                        Some(Ok(_)) => Flow::Continue, // pings are answered by tungstenite
                        Some(Err(e)) => Flow::Lost(DisconnectReason::Network(e.to_string())),
                        None => Flow::Lost(DisconnectReason::Network("connection closed".into())),
                    };
                    if !matches!(flow, Flow::Continue) {
                        return flow;
                    }
                }
                request = self.requests.recv() => {
                    let flow = match request {
                        None => Flow::Close,
                        Some(r) => self.on_request(r, Some(ws)).await,
                    };
                    if !matches!(flow, Flow::Continue) {
                        return flow;
                    }
                }
                () = &mut heartbeat, if dead_after.is_some() => {
                    return Flow::Lost(DisconnectReason::HeartbeatTimeout(
                        dead_after.unwrap_or_default(),
                    ));
                }
            }
        }
    }

    /// A new session (the first, or after a resume was refused or not
    /// possible): nothing of the old one holds any more.
    fn new_session(&mut self) {
        self.session = Session::default();
        self.server_subs.clear();
        self.leave.clear();
        for entry in self.subs.values_mut() {
            entry.in_session = false;
        }
    }

    /// Subscribes every client-side subscription on a new session, each
    /// from its last delivered position.
    async fn subscribe_all(&mut self, ws: &mut Ws) -> Result<(), tungstenite::Error> {
        let channels: Vec<String> = self.subs.keys().cloned().collect();
        for channel in channels {
            self.send_subscribe(ws, &channel).await?;
        }
        Ok(())
    }

    /// Gets the channels of a resumed session flowing again: each parked
    /// one is subscribed again with `since` (the client's own position, or
    /// where the session stopped receiving it); client-side subscriptions
    /// it no longer holds were removed by the server while the client was
    /// away; channels it holds that the client does not know are
    /// server-side subscriptions made meanwhile; channels the client left
    /// meanwhile are left.
    async fn resume_channels(
        &mut self,
        ws: &mut Ws,
        channels: Vec<SessionChannel>,
    ) -> Result<(), tungstenite::Error> {
        let listed: HashSet<&str> = channels.iter().map(|c| c.channel.as_str()).collect();
        let mut mine: Vec<String> = self.subs.keys().cloned().collect();
        mine.sort();
        for channel in mine {
            let removed = self
                .subs
                .get(&channel)
                .is_some_and(|e| e.in_session && !listed.contains(channel.as_str()));
            if removed {
                self.server_unsubscribed(channel);
            } else {
                self.send_subscribe(ws, &channel).await?;
            }
        }
        let mut gone: Vec<String> = self
            .server_subs
            .keys()
            .filter(|c| !listed.contains(c.as_str()))
            .cloned()
            .collect();
        gone.sort();
        for channel in gone {
            self.server_subs.remove(&channel);
            self.shared
                .emit(ClientEvent::ServerUnsubscribed { channel });
        }
        let left = std::mem::take(&mut self.leave);
        for SessionChannel {
            channel,
            epoch,
            offset,
        } in channels
        {
            if self.subs.contains_key(&channel) {
                continue;
            }
            if left.contains(&channel) {
                self.send_unsubscribe(ws, channel, None).await?;
                continue;
            }
            let since = match self.server_subs.get(&channel) {
                Some(own) => own.clone(),
                None => {
                    let at = StreamPosition { offset, epoch };
                    self.server_subs.insert(channel.clone(), at.clone());
                    self.shared.emit(ClientEvent::ServerSubscribed {
                        channel: channel.clone(),
                        epoch: at.epoch.clone(),
                        offset: at.offset,
                    });
                    at
                }
            };
            let id = self.next_id();
            let body = CommandBody::Subscribe {
                channel: channel.clone(),
                since: Some(since),
            };
            self.inflight
                .insert(id, Inflight::ServerResubscribe { channel });
            ws.send(Message::text(encode(id, &body))).await?;
        }
        Ok(())
    }

    /// Sends the `ack` of the direct messages received, if any is not
    /// acknowledged yet. It has an id like any command but no reply.
    async fn send_ack(&mut self, ws: &mut Ws) -> Result<(), tungstenite::Error> {
        match self.session.take_ack() {
            Some(seq) => {
                let id = self.next_id();
                ws.send(Message::text(encode(id, &CommandBody::Ack { seq })))
                    .await
            }
            None => Ok(()),
        }
    }

    /// The server ended the client-side subscription to `channel`.
    fn server_unsubscribed(&mut self, channel: String) {
        if let Some(entry) = self.subs.remove(&channel) {
            let _ = entry.events.send(SubscriptionEvent::Unsubscribed);
            if let Some(confirm) = entry.confirm {
                let _ = confirm.send(Err(Error::Protocol(
                    "the server unsubscribed the channel before confirming it".into(),
                )));
            }
        }
    }

    /// Serves a request; `ws` is the connection, if there is one.
    async fn on_request(&mut self, request: Request, ws: Option<&mut Ws>) -> Flow {
        let sent = match request {
            Request::Call(call) => match ws {
                Some(ws) => self.send_call(ws, call).await,
                None => {
                    self.enqueue(call);
                    Ok(())
                }
            },
            Request::Subscribe {
                channel,
                sub_id,
                events,
                confirm,
            } => {
                if self.subs.contains_key(&channel) {
                    let _ = confirm.send(Err(Error::AlreadySubscribed(channel)));
                    return Flow::Continue;
                }
                self.leave.remove(&channel);
                self.subs.insert(
                    channel.clone(),
                    SubEntry {
                        sub_id,
                        events,
                        tracker: StreamTracker::default(),
                        confirm: Some(confirm),
                        cmd: None,
                        on_connection: false,
                        in_session: false,
                    },
                );
                match ws {
                    Some(ws) => self.send_subscribe(ws, &channel).await,
                    None => Ok(()),
                }
            }
            Request::Unsubscribe {
                channel,
                sub_id,
                reply,
            } => {
                let entry = match self.subs.get(&channel) {
                    Some(e) if e.sub_id == sub_id => self.subs.remove(&channel),
                    _ => None,
                };
                match (entry, ws) {
                    (Some(entry), Some(ws)) if entry.on_connection => {
                        self.send_unsubscribe(ws, channel, reply).await
                    }
                    (entry, _) => {
                        if entry.is_some() {
                            // A session resumed later may hold it still.
                            self.leave.insert(channel);
                        }
                        if let Some(r) = reply {
                            let _ = r.send(Ok(()));
                        }
                        Ok(())
                    }
                }
            }
            Request::Close { done } => {
                self.close_waiters.push(done);
                return Flow::Close;
            }
        };
        match sent {
            Ok(()) => Flow::Continue,
            Err(e) => lost(e),
        }
    }

    /// Queues a call until the next connection, within `max_queued`.
    fn enqueue(&mut self, call: Call) {
        if self.queue.len() >= self.settings.max_queued {
            self.queue.retain(|c| !c.reply.is_closed());
        }
        if self.queue.len() >= self.settings.max_queued {
            let _ = call.reply.send(Err(Error::QueueFull(self.queue.len())));
        } else {
            self.queue.push_back(call);
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    async fn send_call(&mut self, ws: &mut Ws, call: Call) -> Result<(), tungstenite::Error> {
        if call.reply.is_closed() {
            return Ok(()); // the caller gave up
        }
        let id = self.next_id();
        let text = encode(id, &call.body);
        self.inflight.insert(id, Inflight::Call(call));
        ws.send(Message::text(text)).await
    }

    async fn send_subscribe(
        &mut self,
        ws: &mut Ws,
        channel: &str,
    ) -> Result<(), tungstenite::Error> {
        let id = self.next_id();
        let Some(entry) = self.subs.get_mut(channel) else {
            return Ok(());
        };
        let since = entry.tracker.begin_subscribe();
        entry.cmd = Some(id);
        entry.on_connection = true;
        self.inflight.insert(
            id,
            Inflight::Subscribe {
                channel: channel.to_owned(),
                sub_id: entry.sub_id,
            },
        );
        let body = CommandBody::Subscribe {
            channel: channel.to_owned(),
            since,
        };
        ws.send(Message::text(encode(id, &body))).await
    }

    async fn send_unsubscribe(
        &mut self,
        ws: &mut Ws,
        channel: String,
        reply: Option<oneshot::Sender<Result<()>>>,
    ) -> Result<(), tungstenite::Error> {
        let id = self.next_id();
        *self.unsubscribing.entry(channel.clone()).or_default() += 1;
        let body = CommandBody::Unsubscribe {
            channel: channel.clone(),
        };
        self.inflight
            .insert(id, Inflight::Unsubscribe { channel, reply });
        ws.send(Message::text(encode(id, &body))).await
    }

    /// Handles a text frame from the gateway.
    async fn on_text(&mut self, ws: &mut Ws, text: &[u8]) -> Flow {
        let frame = match ServerFrame::decode(text) {
            Ok(f) => f,
            Err(e) => {
                // Most likely a push or field from a newer protocol version.
                tracing::debug!(error = %e, frame = %String::from_utf8_lossy(text), "switchboard: skipped an unreadable frame");
                return Flow::Continue;
            }
        };
        let sent = match frame {
            ServerFrame::Reply(reply) => self.on_reply(ws, reply).await,
            ServerFrame::Push(push) => {
                if self.on_push(push) {
                    self.send_ack(ws).await
                } else {
                    Ok(())
                }
            }
        };
        match sent {
            Ok(()) => Flow::Continue,
            Err(e) => lost(e),
        }
    }

    async fn on_reply(&mut self, ws: &mut Ws, reply: Reply) -> Result<(), tungstenite::Error> {
        let Some(inflight) = reply.id.and_then(|id| self.inflight.remove(&id)) else {
            if let Some(e) = reply.error {
                tracing::warn!(code = e.code.as_str(), message = %e.message, "switchboard: error reply to no command");
            }
            return Ok(());
        };
        let outcome = match reply.error {
            Some(e) => Err(Error::Server {
                code: e.code,
                message: e.message,
            }),
            None => Ok(reply.result.unwrap_or(serde_json::Value::Null)),
        };
        match inflight {
            Inflight::Call(call) => {
                let _ = call.reply.send(outcome);
                Ok(())
            }
            Inflight::Unsubscribe { channel, reply } => {
                self.done_unsubscribing(&channel);
                if let Some(r) = reply {
                    let _ = r.send(outcome.map(|_| ()));
                }
                Ok(())
            }
            Inflight::Subscribe { channel, sub_id } => {
                let id = reply.id.unwrap_or_default();
                self.on_subscribe_reply(ws, channel, sub_id, id, outcome)
                    .await
            }
            Inflight::ServerResubscribe { channel } => {
                if let Err(error) = outcome {
                    // Then the session does not hold it any more.
                    tracing::warn!(%channel, %error, "switchboard: resubscribing a server-side subscription failed");
                    if self.server_subs.remove(&channel).is_some() {
                        self.shared
                            .emit(ClientEvent::ServerUnsubscribed { channel });
                    }
                }
                Ok(())
            }
        }
    }

    fn done_unsubscribing(&mut self, channel: &str) {
        if let Some(n) = self.unsubscribing.get_mut(channel) {
            *n -= 1;
            if *n == 0 {
                self.unsubscribing.remove(channel);
            }
        }
    }

    async fn on_subscribe_reply(
        &mut self,
        ws: &mut Ws,
        channel: String,
        sub_id: u64,
        id: u64,
        outcome: Result<serde_json::Value>,
    ) -> Result<(), tungstenite::Error> {
        let Some(entry) = self.subs.get_mut(&channel) else {
            return Ok(());
        };
        if entry.sub_id != sub_id || entry.cmd != Some(id) {
            return Ok(()); // a reply for an earlier subscription to it
        }
        entry.cmd = None;
        let result = outcome.and_then(|v| {
            serde_json::from_value::<SubscribeResult>(v)
                .map_err(|e| Error::Protocol(format!("bad `subscribe` result: {e}")))
        });
        let result = match result {
            Ok(r) => r,
            Err(error) => {
                let Some(entry) = self.subs.remove(&channel) else {
                    return Ok(());
                };
                match entry.confirm {
                    Some(confirm) => {
                        let _ = confirm.send(Err(error));
                    }
                    None => {
                        tracing::warn!(%channel, %error, "switchboard: resubscribe refused");
                        let _ = entry.events.send(SubscriptionEvent::Failed(error));
                    }
                }
                return Ok(());
            }
        };
        if entry.confirm.as_ref().is_some_and(|c| c.is_closed()) || entry.events.is_closed() {
            // Nobody is listening any more (the caller gave up).
            self.subs.remove(&channel);
            return self.send_unsubscribe(ws, channel, None).await;
        }
        let SubEntry {
            tracker,
            events,
            confirm,
            in_session,
            ..
        } = entry;
        *in_session = true;
        tracker.on_subscribed(&result, &mut |ev| {
            let _ = events.send(ev);
        });
        if let Some(confirm) = confirm.take() {
            let _ = confirm.send(Ok(()));
        }
        Ok(())
    }

    /// Handles a push; returns whether an `ack` is to be sent at once.
    fn on_push(&mut self, push: Push) -> bool {
        match push {
            Push::Message {
                channel,
                offset,
                epoch,
                data,
            } => {
                let message = ChannelMessage {
                    channel,
                    offset,
                    epoch,
                    data,
                };
                if let Some(entry) = self.subs.get_mut(&message.channel) {
                    let SubEntry {
                        tracker, events, ..
                    } = entry;
                    tracker.on_message(message, &mut |ev| {
                        let _ = events.send(ev);
                    });
                } else if !self.unsubscribing.contains_key(&message.channel) {
                    // A server-side subscription: its position is kept for
                    // a resume, and what a resume replays twice is dropped.
                    let position = message.position();
                    match self.server_subs.get_mut(&message.channel) {
                        Some(last)
                            if last.epoch == position.epoch && position.offset <= last.offset =>
                        {
                            return false;
                        }
                        Some(last) => *last = position,
                        None => {
                            self.server_subs.insert(message.channel.clone(), position);
                        }
                    }
                    self.shared.emit(ClientEvent::Message(message));
                }
            }
            Push::Join { channel, member } => {
                if let Some(entry) = self.subs.get(&channel) {
                    let _ = entry.events.send(SubscriptionEvent::Join(member));
                } else if !self.unsubscribing.contains_key(&channel) {
                    self.shared.emit(ClientEvent::Join { channel, member });
                }
            }
            Push::Leave { channel, member } => {
                if let Some(entry) = self.subs.get(&channel) {
                    let _ = entry.events.send(SubscriptionEvent::Leave(member));
                } else if !self.unsubscribing.contains_key(&channel) {
                    self.shared.emit(ClientEvent::Leave { channel, member });
                }
            }
            Push::Subscribed {
                channel,
                epoch,
                offset,
            } => {
                if !self.subs.contains_key(&channel) {
                    let at = StreamPosition {
                        offset,
                        epoch: epoch.clone(),
                    };
                    // Held on purpose now, whatever the client left before.
                    self.leave.remove(&channel);
                    self.server_subs.insert(channel.clone(), at);
                }
                self.shared.emit(ClientEvent::ServerSubscribed {
                    channel,
                    epoch,
                    offset,
                });
            }
            Push::Unsubscribed { channel } => {
                if self.subs.contains_key(&channel) {
                    self.server_unsubscribed(channel);
                } else if !self.unsubscribing.contains_key(&channel) {
                    self.server_subs.remove(&channel);
                    self.shared
                        .emit(ClientEvent::ServerUnsubscribed { channel });
                }
            }
            Push::Direct { seq, data } => {
                let ack_now = match seq {
                    Some(seq) => {
                        let (new, ack_now) = self.session.on_direct(seq, Instant::now());
                        if !new {
                            tracing::debug!(
                                seq,
                                "switchboard: a direct message received twice, dropped"
                            );
                            return false;
                        }
                        ack_now
                    }
                    None => false,
                };
                self.shared
                    .emit(ClientEvent::Direct(DirectMessage { seq, data }));
                return ack_now;
            }
            Push::Refresh { expires_at_ms } => {
                self.shared
                    .emit(ClientEvent::TokenExpiring { expires_at_ms });
            }
            Push::Connected { .. } => {
                tracing::debug!("switchboard: a second `connected` push, ignored");
            }
        }
        false
    }

    /// Settles what was in flight on a connection that is gone.
    fn connection_lost(&mut self) {
        let mut again: Vec<(u64, Call)> = Vec::new();
        for (id, inflight) in self.inflight.drain() {
            match inflight {
                Inflight::Call(call) if call.retry_safe => again.push((id, call)),
                Inflight::Call(call) => {
                    let command = call.body.name();
                    let _ = call.reply.send(Err(Error::ConnectionLost { command }));
                }
                Inflight::Subscribe { .. } | Inflight::ServerResubscribe { .. } => {}
                // A new session does not have the subscription; a resumed
                // one is told to leave it.
                Inflight::Unsubscribe { channel, reply } => {
                    self.leave.insert(channel);
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                }
            }
        }
        again.sort_by_key(|(id, _)| *id);
        for (_, call) in again.into_iter().rev() {
            self.queue.push_front(call);
        }
        self.unsubscribing.clear();
        self.session.ack_due = None;
        for entry in self.subs.values_mut() {
            entry.tracker.connection_lost();
            entry.cmd = None;
            entry.on_connection = false;
        }
    }

    /// Stops for good: `error` is `None` after a close by the application.
    fn shutdown(mut self, error: Option<Error>) {
        let (state, event, err) = match error {
            None => (ConnectionState::Closed, ClientEvent::Closed, Error::Closed),
            Some(e) => {
                tracing::warn!(error = %e, "switchboard client stopped");
                (
                    ConnectionState::Failed(e.clone()),
                    ClientEvent::Failed(e.clone()),
                    e,
                )
            }
        };
        // State first: a handle whose request bounces reads it.
        self.shared.state.send_replace(state);
        self.shared.emit(event);
        drop(
            self.shared
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        self.requests.close();
        while let Ok(request) = self.requests.try_recv() {
            match request {
                Request::Call(call) => self.queue.push_back(call),
                Request::Subscribe { confirm, .. } => {
                    let _ = confirm.send(Err(err.clone()));
                }
                Request::Unsubscribe { reply, .. } => {
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                }
                Request::Close { done } => self.close_waiters.push(done),
            }
        }
        self.connection_lost();
        for call in self.queue.drain(..) {
            let _ = call.reply.send(Err(err.clone()));
        }
        for (_, entry) in self.subs.drain() {
            match entry.confirm {
                Some(confirm) => {
                    let _ = confirm.send(Err(err.clone()));
                }
                None if err != Error::Closed => {
                    let _ = entry.events.send(SubscriptionEvent::Failed(err.clone()));
                }
                None => {}
            }
        }
        for done in self.close_waiters.drain(..) {
            let _ = done.send(());
        }
    }
}

/// The session ends because writing failed.
fn lost(e: tungstenite::Error) -> Flow {
    Flow::Lost(DisconnectReason::Network(e.to_string()))
}

fn encode(id: u64, body: &CommandBody) -> String {
    serde_json::to_string(&Outgoing { id, body }).expect("commands serialize")
}

/// Completes a closing handshake, for at most [`CLOSE_GRACE`]: sends a 1000
/// close frame if `initiate` (else flushes tungstenite's reply to the
/// gateway's), then reads until the gateway ends the connection.
async fn close_politely(ws: &mut Ws, initiate: bool) {
    let frame = initiate.then(|| CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    });
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = ws.close(frame).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Connects, completes the handshake and reads the `connected` push, within
/// the connect timeout; `resume` is the session to resume and the highest
/// direct message sequence received.
async fn handshake(
    settings: Arc<Settings>,
    resume: Option<(String, u64)>,
) -> Result<(Box<Ws>, Welcome)> {
    let timeout = settings.connect_timeout;
    match tokio::time::timeout(timeout, open(&settings, resume)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Transport(format!(
            "no connection within the connect timeout ({timeout:?})"
        ))),
    }
}

async fn open(settings: &Settings, resume: Option<(String, u64)>) -> Result<(Box<Ws>, Welcome)> {
    let request = build_request(settings, resume.as_ref().map(|(t, r)| (t.as_str(), *r)))?;
    #[cfg(feature = "rustls-tls")]
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        true,
        settings
            .tls
            .clone()
            .map(tokio_tungstenite::Connector::Rustls),
    );
    #[cfg(not(feature = "rustls-tls"))]
    let connecting = tokio_tungstenite::connect_async_with_config(request, None, true);
    let (ws, _response) = connecting.await.map_err(classify)?;
    let mut ws = Box::new(ws);
    loop {
        let frame = match ws.next().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(Error::Transport(e.to_string())),
            None => {
                return Err(Error::Transport(
                    "closed before the `connected` push".into(),
                ))
            }
        };
        let text = match frame {
            Message::Text(t) => t,
            Message::Close(f) => {
                return Err(Error::Transport(format!(
                    "closed before the `connected` push: {}",
                    f.map(|f| format!("{} {}", u16::from(f.code), f.reason))
                        .unwrap_or_default()
                )))
            }
            _ => continue,
        };
        return match ServerFrame::decode(text.as_bytes()) {
            Ok(ServerFrame::Push(Push::Connected {
                client,
                node,
                ping_interval_ms,
                session,
                resumed,
                resume_error,
                channels,
                ..
            })) => Ok((
                ws,
                Welcome {
                    client,
                    node,
                    ping_interval: Duration::from_millis(ping_interval_ms),
                    session,
                    resumed,
                    resume_error,
                    channels,
                },
            )),
            _ => Err(Error::Protocol(format!(
                "expected the `connected` push first, got {:.200}",
                text.as_str()
            ))),
        };
    }
}

/// The handshake request: URL, subprotocol, token and extra headers. The
/// token goes both as `Authorization: Bearer` and as the `token` query
/// parameter. `resume` (a session's resume token and the highest direct
/// message sequence received) adds the `resume` and `received` query
/// parameters.
pub(crate) fn build_request(
    settings: &Settings,
    resume: Option<(&str, u64)>,
) -> Result<tungstenite::handshake::client::Request> {
    let token = settings
        .token
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut url = match &token {
        Some(t) => crate::client::with_query_param(&settings.url, "token", t),
        None => settings.url.clone(),
    };
    if let Some((session, received)) = resume {
        // Resume tokens are URL-safe: nothing in them is escaped.
        url = crate::client::with_query_param(&url, "resume", session);
        url = crate::client::with_query_param(&url, "received", &received.to_string());
    }
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| Error::Config(format!("bad URL {:?}: {e}", settings.url)))?;
    let headers = request.headers_mut();
    for (name, value) in &settings.headers {
        headers.append(name.clone(), value.clone());
    }
    if let Some(t) = &token {
        let value = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| Error::Config("the token is not a valid header value".into()))?;
        headers.insert(header::AUTHORIZATION, value);
    }
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(request)
}

/// Sorts a failed handshake into terminal and retryable errors.
pub(crate) fn classify(error: tungstenite::Error) -> Error {
    use tungstenite::error::ProtocolError;
    match error {
        tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let body = response.body().as_deref().unwrap_or_default();
            #[derive(serde::Deserialize)]
            struct Refusal {
                code: Option<String>,
                message: Option<String>,
            }
            let (code, message) = match serde_json::from_slice::<Refusal>(body) {
                Ok(r) => (r.code, r.message),
                Err(_) => (None, None),
            };
            let message = message.unwrap_or_else(|| {
                let text = String::from_utf8_lossy(body);
                if text.trim().is_empty() {
                    response
                        .status()
                        .canonical_reason()
                        .unwrap_or("refused")
                        .to_owned()
                } else {
                    text.chars().take(200).collect()
                }
            });
            Error::Refused {
                status,
                code,
                message,
            }
        }
        tungstenite::Error::Protocol(ProtocolError::SecWebSocketSubProtocolError(e)) => {
            Error::UnsupportedProtocol(e.to_string())
        }
        tungstenite::Error::Url(e) => Error::Config(e.to_string()),
        other => Error::Transport(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::http::Response;

    fn refused(status: u16, body: &str) -> Error {
        let response = Response::builder()
            .status(status)
            .body(Some(body.as_bytes().to_vec()))
            .unwrap();
        classify(tungstenite::Error::Http(response))
    }

    #[test]
    fn handshake_refusals_are_sorted_into_terminal_and_retryable() {
        for status in [400, 401, 403, 404, 426] {
            assert!(refused(status, "").is_terminal(), "{status}");
        }
        for status in [408, 429, 500, 502, 503] {
            assert!(!refused(status, "").is_terminal(), "{status}");
        }
        assert_eq!(
            refused(503, r#"{"code":"draining","message":"node is draining"}"#),
            Error::Refused {
                status: 503,
                code: Some("draining".into()),
                message: "node is draining".into()
            }
        );
        assert_eq!(
            refused(401, ""),
            Error::Refused {
                status: 401,
                code: None,
                message: "Unauthorized".into()
            }
        );
        let io =
            tungstenite::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!classify(io).is_terminal());
        let sub = tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(
                tungstenite::error::SubProtocolError::NoSubProtocol,
            ),
        );
        assert!(matches!(classify(sub), Error::UnsupportedProtocol(_)));
    }

    fn settings(url: &str, token: Option<&str>) -> Settings {
        Settings {
            url: url.into(),
            headers: Vec::new(),
            token: std::sync::RwLock::new(token.map(str::to_owned)),
            backoff: crate::backoff::BackoffConfig::default(),
            stable_after: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            max_queued: 10,
            #[cfg(feature = "rustls-tls")]
            tls: None,
        }
    }

    #[test]
    fn a_resume_adds_the_session_and_what_was_received_to_the_query() {
        let uri = |s: &Settings, resume| build_request(s, resume).unwrap().uri().to_string();
        let plain = settings("ws://h/app?room=1", Some("t k"));
        assert_eq!(uri(&plain, None), "ws://h/app?room=1&token=t%20k");
        assert_eq!(
            uri(&plain, Some(("n1.AbC-_x.Mac_-9", 17))),
            "ws://h/app?room=1&token=t%20k&resume=n1.AbC-_x.Mac_-9&received=17"
        );
        let bare = settings("ws://h/", None);
        assert_eq!(
            uri(&bare, Some(("s.t", 0))),
            "ws://h/?resume=s.t&received=0"
        );
    }

    #[test]
    fn direct_messages_are_deduplicated_and_acknowledged_in_batches() {
        let t0 = Instant::now();
        let mut s = Session::default();
        assert_eq!(s.take_ack(), None, "nothing to acknowledge");
        // The first one arms the timer; later ones do not move it.
        assert_eq!(s.on_direct(1, t0), (true, false));
        assert_eq!(s.ack_due, Some(t0 + ACK_DELAY));
        assert_eq!(
            s.on_direct(2, t0 + Duration::from_millis(100)),
            (true, false)
        );
        assert_eq!(s.ack_due, Some(t0 + ACK_DELAY));
        // Duplicates are dropped.
        assert_eq!(s.on_direct(2, t0), (false, false));
        assert_eq!(s.on_direct(1, t0), (false, false));
        // The timer's ack covers both.
        assert_eq!(s.take_ack(), Some(2));
        assert_eq!((s.acked, s.ack_due), (2, None));
        assert_eq!(s.take_ack(), None);
        // 32 unacknowledged: at once.
        for seq in 3..ACK_BATCH + 2 {
            assert_eq!(s.on_direct(seq, t0), (true, false), "{seq}");
        }
        assert_eq!(s.on_direct(ACK_BATCH + 2, t0), (true, true));
        assert_eq!(s.take_ack(), Some(ACK_BATCH + 2));
        // A hole (never expected within a session) is accepted.
        assert_eq!(s.on_direct(ACK_BATCH + 5, t0), (true, false));
        assert_eq!(s.received, ACK_BATCH + 5);
    }

    #[test]
    fn commands_are_encoded_flat() {
        let body = CommandBody::Publish {
            channel: "chat:a".into(),
            data: switchboard_proto::origin::Payload::Text("hi".into()),
        };
        assert_eq!(
            encode(3, &body),
            r#"{"id":3,"cmd":"publish","channel":"chat:a","text":"hi"}"#
        );
        assert_eq!(encode(4, &CommandBody::Ping {}), r#"{"id":4,"cmd":"ping"}"#);
        assert_eq!(
            encode(5, &CommandBody::Ack { seq: 32 }),
            r#"{"id":5,"cmd":"ack","seq":32}"#
        );
    }
}
