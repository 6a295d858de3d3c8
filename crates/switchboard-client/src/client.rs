//! The [`Client`] handle and its [`ClientBuilder`].
//!
//! A `Client` is a cheap, cloneable handle to a background task that owns
//! the WebSocket. Every method sends the task a request and waits for its
//! answer, at most the command timeout — which includes waiting for a
//! connection when there is none.

use crate::backoff::BackoffConfig;
use crate::connection::{self, Call, Request, Settings, Shared};
use crate::error::{Error, Result};
use crate::event::{ClientEvent, ConnectionState};
use crate::subscription::{Subscription, SubscriptionGuard, SubscriptionHandle};
use crate::SubscriptionEvent;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use switchboard_proto::native::{
    channel_namespace, CommandBody, HistoryResult, PresenceResult, PublishResult, StreamPosition,
};
use switchboard_proto::origin::Payload;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

/// Default [`ClientBuilder::command_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ClientBuilder::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ClientBuilder::max_queued_commands`].
pub const DEFAULT_MAX_QUEUED: usize = 1024;
/// Default [`ClientBuilder::event_capacity`].
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;
/// Default [`ClientBuilder::backoff_reset_after`].
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(5);

/// Something that can be sent as a message body: text (`&str`, `String`) or
/// binary (`Vec<u8>`, `&[u8]`), or a [`Payload`].
pub trait IntoPayload {
    /// The payload.
    fn into_payload(self) -> Payload;
}

impl IntoPayload for Payload {
    fn into_payload(self) -> Payload {
        self
    }
}

impl IntoPayload for String {
    fn into_payload(self) -> Payload {
        Payload::Text(self)
    }
}

impl IntoPayload for &str {
    fn into_payload(self) -> Payload {
        Payload::Text(self.to_owned())
    }
}

impl IntoPayload for &String {
    fn into_payload(self) -> Payload {
        Payload::Text(self.clone())
    }
}

impl IntoPayload for Vec<u8> {
    fn into_payload(self) -> Payload {
        Payload::Binary(self)
    }
}

impl IntoPayload for &[u8] {
    fn into_payload(self) -> Payload {
        Payload::Binary(self.to_vec())
    }
}

impl<const N: usize> IntoPayload for &[u8; N] {
    fn into_payload(self) -> Payload {
        Payload::Binary(self.to_vec())
    }
}

/// Configures and starts a [`Client`]; from [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    token: Option<String>,
    headers: Vec<(String, String)>,
    backoff: BackoffConfig,
    stable_after: Duration,
    connect_timeout: Duration,
    command_timeout: Duration,
    max_queued: usize,
    event_capacity: usize,
    /// PEM CA certificates to trust instead of the web PKI roots.
    #[cfg(feature = "rustls-tls")]
    tls_roots_pem: Option<Vec<u8>>,
}

impl ClientBuilder {
    fn new(url: String) -> Self {
        Self {
            url,
            token: None,
            headers: Vec::new(),
            backoff: BackoffConfig::default(),
            stable_after: DEFAULT_STABLE_AFTER,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_queued: DEFAULT_MAX_QUEUED,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            #[cfg(feature = "rustls-tls")]
            tls_roots_pem: None,
        }
    }

    /// `wss://` only: trust the CA certificates in this PEM text instead of
    /// the web PKI roots — for a gateway whose certificate comes from a
    /// private CA (or is self-signed, during development).
    #[cfg(feature = "rustls-tls")]
    pub fn tls_roots_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_roots_pem = Some(pem.into());
        self
    }

    /// A credential for the origin: sent both as the `token` query parameter
    /// and as an `Authorization: Bearer` header on every handshake.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// An extra handshake header (repeatable). The gateway passes the
    /// allow-listed ones (`--forward-header`) to the origin.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Upper bound of the first reconnect delay (default 500 ms); each
    /// further attempt doubles it, up to [`backoff_max`](Self::backoff_max).
    /// The actual delay is uniformly random below the bound (full jitter).
    pub fn backoff_initial(mut self, initial: Duration) -> Self {
        self.backoff.initial = initial;
        self
    }

    /// Largest reconnect delay bound (default 30 s).
    pub fn backoff_max(mut self, max: Duration) -> Self {
        self.backoff.max = max;
        self
    }

    /// A connection that stayed up this long starts the backoff over
    /// (default 5 s); one that drops sooner continues the sequence, so a
    /// gateway that accepts and then drops at once is not hammered.
    pub fn backoff_reset_after(mut self, stable: Duration) -> Self {
        self.stable_after = stable;
        self
    }

    /// Bound of one connection attempt: TCP, TLS, the WebSocket handshake and
    /// the gateway's `connected` push (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a command (`subscribe`, `publish`, …) may take, waiting for a
    /// connection included, before failing with [`Error::Timeout`]
    /// (default 10 s).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Most commands waiting for a connection; more fail at once with
    /// [`Error::QueueFull`] (default 1024).
    pub fn max_queued_commands(mut self, max: usize) -> Self {
        self.max_queued = max.max(1);
        self
    }

    /// How many [`ClientEvent`]s a slow [`Client::events`] receiver may fall
    /// behind before it misses some (it then gets [`ClientEvent::Lagged`];
    /// default 1024).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Validates the settings and starts the client: the background task
    /// begins connecting at once, and keeps reconnecting until
    /// [`Client::close`] or a terminal error. Does not wait for the
    /// connection (see [`Client::wait_connected`]); commands issued before it
    /// is up wait for it.
    ///
    /// Must be called within a tokio runtime. Fails with [`Error::Config`] on
    /// a URL that is not `ws://` or `wss://`, an invalid header, or no
    /// runtime.
    pub fn connect(self) -> Result<Client> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("Client::connect needs a tokio runtime".into()))?;
        let scheme_ok = ["ws://", "wss://"]
            .iter()
            .any(|s| self.url.len() > s.len() && self.url[..s.len()].eq_ignore_ascii_case(s));
        if !scheme_ok {
            return Err(Error::Config(format!(
                "the URL must start with ws:// or wss://: {:?}",
                self.url
            )));
        }
        let mut headers = Vec::with_capacity(self.headers.len() + 1);
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| Error::Config(format!("header name {name:?}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| Error::Config(format!("header {name} value: {e}")))?;
            headers.push((name, value));
        }
        #[cfg(feature = "rustls-tls")]
        let tls = self
            .tls_roots_pem
            .as_deref()
            .map(connection::tls_config)
            .transpose()?;
        let settings = Arc::new(Settings {
            #[cfg(feature = "rustls-tls")]
            tls,
            url: self.url.clone(),
            headers,
            token: std::sync::RwLock::new(self.token.clone()),
            backoff: self.backoff,
            stable_after: self.stable_after,
            connect_timeout: self.connect_timeout,
            max_queued: self.max_queued,
        });
        connection::build_request(&settings, None)?;
        let (events, _) = broadcast::channel(self.event_capacity);
        let shared = Arc::new(Shared {
            state: watch::Sender::new(ConnectionState::Connecting),
            events: Mutex::new(Some(events)),
        });
        let (requests, rx) = mpsc::unbounded_channel();
        let _guard = runtime.enter();
        connection::spawn(settings.clone(), shared.clone(), rx);
        Ok(Client {
            inner: Arc::new(Inner {
                requests,
                shared,
                settings,
                command_timeout: self.command_timeout,
                next_sub_id: AtomicU64::new(1),
            }),
        })
    }
}

/// A handle to a Switchboard connection that reconnects by itself.
///
/// Cheap to clone; every clone drives the same connection. The connection
/// stops on [`close`](Self::close), on a terminal error, or when every
/// `Client` and [`Subscription`] is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_client::Error> {
/// use futures_util::StreamExt;
/// use switchboard_client::{Client, SubscriptionEvent};
///
/// let client = Client::builder("ws://127.0.0.1:8080/").token("secret").connect()?;
/// let mut sub = client.subscribe("chat:lobby").await?;
/// client.publish("chat:lobby", "hello").await?;
/// while let Some(event) = sub.next().await {
///     if let SubscriptionEvent::Message(m) = event {
///         println!("#{} {:?}", m.offset, m.text());
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    requests: mpsc::UnboundedSender<Request>,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    command_timeout: Duration,
    next_sub_id: AtomicU64,
}

impl Client {
    /// Starts configuring a client for the gateway at `url` (`ws://` or
    /// `wss://`, any path; the path and query go to the origin).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(url.into())
    }

    /// The connection state right now.
    pub fn state(&self) -> ConnectionState {
        self.inner.shared.state.borrow().clone()
    }

    /// The current connection's id, when connected (what the control API
    /// and the origin call this connection). A resumed session keeps it; a
    /// new session ([`ClientEvent::Restarted`]) has a new one.
    pub fn client_id(&self) -> Option<String> {
        match &*self.inner.shared.state.borrow() {
            ConnectionState::Connected { client_id, .. } => Some(client_id.clone()),
            _ => None,
        }
    }

    /// Waits until the client is connected (at once if it is); fails if it
    /// stopped for good or was closed.
    pub async fn wait_connected(&self) -> Result<()> {
        let mut state = self.inner.shared.state.subscribe();
        let state = state
            .wait_for(|s| !matches!(s, ConnectionState::Connecting))
            .await
            .map_err(|_| self.inner.shared.final_error())?;
        match &*state {
            ConnectionState::Connected { .. } => Ok(()),
            ConnectionState::Failed(e) => Err(e.clone()),
            _ => Err(Error::Closed),
        }
    }

    /// A stream of client-wide events from now on: connects (and whether a
    /// reconnect resumed the session), disconnects, direct messages,
    /// server-side subscriptions and their messages, and
    /// the final [`ClientEvent::Failed`] / [`ClientEvent::Closed`], after
    /// which it ends. Each call returns an independent receiver.
    pub fn events(&self) -> Events {
        let rx = match &*self
            .inner
            .shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1, // stopped: an ended stream
        };
        Events::new(rx)
    }

    /// Subscribes to `channel` and returns its event stream once the gateway
    /// confirmed it (its first event is [`SubscriptionEvent::Subscribed`]).
    ///
    /// The subscription outlives reconnects: after each one the SDK
    /// resubscribes from the last message it delivered, replays what was
    /// missed, and drops duplicates, so the stream carries every message
    /// exactly once and in order — or a [`SubscriptionEvent::Gap`] where the
    /// gateway could not replay. Dropping the [`Subscription`] unsubscribes.
    ///
    /// Errors: [`Error::Server`] (e.g. `unknown_namespace`,
    /// `permission_denied`), [`Error::AlreadySubscribed`],
    /// [`Error::InvalidChannel`], [`Error::Timeout`].
    pub async fn subscribe(&self, channel: impl Into<String>) -> Result<Subscription> {
        let channel = channel.into();
        if channel_namespace(&channel).is_none() {
            return Err(Error::InvalidChannel(channel));
        }
        let sub_id = self.inner.next_sub_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = mpsc::unbounded_channel();
        let (confirm, confirmed) = oneshot::channel();
        // From here on, giving up (timeout, error, or this future being
        // dropped) unsubscribes through the guard.
        let guard = SubscriptionGuard::new(
            self.inner.requests.clone(),
            self.inner.shared.clone(),
            channel.clone(),
            sub_id,
            self.inner.command_timeout,
        );
        self.request(Request::Subscribe {
            channel,
            sub_id,
            events,
            confirm,
        })?;
        self.wait("subscribe", Instant::now(), confirmed).await?;
        Ok(Subscription::new(guard, rx))
    }

    /// Like [`subscribe`](Self::subscribe), but calls `callback` with each
    /// event from a task of its own, until the returned handle is dropped or
    /// unsubscribed (or the subscription ends).
    pub async fn subscribe_with<F>(
        &self,
        channel: impl Into<String>,
        callback: F,
    ) -> Result<SubscriptionHandle>
    where
        F: FnMut(SubscriptionEvent) + Send + 'static,
    {
        Ok(self.subscribe(channel).await?.spawn_callback(callback))
    }

    /// Publishes `data` to `channel` (the namespace must allow clients to
    /// publish). Not repeated after a lost connection: if the connection
    /// drops before the reply, this fails with [`Error::ConnectionLost`].
    pub async fn publish(
        &self,
        channel: impl Into<String>,
        data: impl IntoPayload,
    ) -> Result<PublishResult> {
        let body = CommandBody::Publish {
            channel: channel.into(),
            data: data.into_payload(),
        };
        self.call(body, false).await
    }

    /// Who is subscribed to `channel` (namespaces with `presence`).
    pub async fn presence(&self, channel: impl Into<String>) -> Result<PresenceResult> {
        let body = CommandBody::Presence {
            channel: channel.into(),
        };
        self.call(body, true).await
    }

    /// The messages kept for `channel` (namespaces with history): those after
    /// `since` if given, at most the newest `limit` if given.
    pub async fn history(
        &self,
        channel: impl Into<String>,
        since: Option<StreamPosition>,
        limit: Option<usize>,
    ) -> Result<HistoryResult> {
        let body = CommandBody::History {
            channel: channel.into(),
            since,
            limit,
        };
        self.call(body, true).await
    }

    /// Sends `data` to the origin (it gets a `message` event). Like
    /// [`publish`](Self::publish), not repeated after a lost connection.
    pub async fn send(&self, data: impl IntoPayload) -> Result<()> {
        let body = CommandBody::Send {
            data: data.into_payload(),
        };
        self.call::<serde_json::Value>(body, false).await.map(drop)
    }

    /// A command round trip; returns the time from this call to the reply
    /// (which includes waiting for a connection, if there was none).
    pub async fn ping(&self) -> Result<Duration> {
        let started = Instant::now();
        self.call::<serde_json::Value>(CommandBody::Ping {}, true)
            .await?;
        Ok(started.elapsed())
    }

    /// Hands the gateway a fresh token for the same user (the answer to a
    /// [`ClientEvent::TokenExpiring`]), so the connection outlives the old
    /// one; later reconnects use it too. Returns when it expires (Unix ms, 0
    /// if never). Errors: [`Error::Server`] with code `token_invalid` when
    /// the gateway refuses it.
    pub async fn refresh(&self, token: impl Into<String>) -> Result<u64> {
        #[derive(serde::Deserialize)]
        struct Refreshed {
            expires_at_ms: u64,
        }
        let token = token.into();
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Error::Config("the token is not a valid header value".into()))?;
        let r: Refreshed = self
            .call(
                CommandBody::Refresh {
                    token: token.clone(),
                },
                true,
            )
            .await?;
        *self
            .inner
            .settings
            .token
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token);
        Ok(r.expires_at_ms)
    }

    /// Closes the connection (with a closing handshake, which ends the
    /// gateway's session for good) and stops reconnecting. Waiting commands
    /// fail with [`Error::Closed`] and every subscription stream ends.
    /// Idempotent; affects every clone.
    pub async fn close(&self) {
        let (done, stopped) = oneshot::channel();
        if self.inner.requests.send(Request::Close { done }).is_ok() {
            let _ = stopped.await;
        }
    }

    fn request(&self, request: Request) -> Result<()> {
        self.inner
            .requests
            .send(request)
            .map_err(|_| self.inner.shared.final_error())
    }

    async fn call<T: DeserializeOwned>(&self, body: CommandBody, retry_safe: bool) -> Result<T> {
        let started = Instant::now();
        let command = body.name();
        let (reply, result) = oneshot::channel();
        self.request(Request::Call(Call {
            body,
            retry_safe,
            reply,
        }))?;
        let value = self.wait(command, started, result).await?;
        serde_json::from_value(value)
            .map_err(|e| Error::Protocol(format!("bad `{command}` result: {e}")))
    }

    /// Waits for the task's answer within the command timeout.
    async fn wait<T>(
        &self,
        command: &'static str,
        started: Instant,
        answer: oneshot::Receiver<Result<T>>,
    ) -> Result<T> {
        let after = self.inner.command_timeout;
        match tokio::time::timeout_at(started + after, answer).await {
            Err(_) => Err(Error::Timeout { command, after }),
            Ok(Err(_)) => Err(self.inner.shared.final_error()),
            Ok(Ok(result)) => result,
        }
    }
}

/// The stream of [`ClientEvent`]s from [`Client::events`].
pub struct Events {
    inner: BoxStream<'static, ClientEvent>,
}

impl Events {
    fn new(rx: broadcast::Receiver<ClientEvent>) -> Self {
        let inner = futures_util::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(event) => Some((event, rx)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Some((ClientEvent::Lagged { missed }, rx))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Self {
            inner: inner.boxed(),
        }
    }

    /// The next event; `None` once the client has stopped and every event
    /// was read.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        self.inner.next().await
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Stream for Events {
    type Item = ClientEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientEvent>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// Appends `name=value` (percent-encoded) to a URL's query, before any
/// fragment.
pub(crate) fn with_query_param(url: &str, name: &str, value: &str) -> String {
    let (base, fragment) = match url.find('#') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let separator = match base.find('?') {
        None => "?",
        Some(_) if base.ends_with('?') || base.ends_with('&') => "",
        Some(_) => "&",
    };
    let mut out = String::with_capacity(url.len() + name.len() + value.len() * 3 + 2);
    out.push_str(base);
    out.push_str(separator);
    out.push_str(name);
    out.push('=');
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str(fragment);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_into_the_query() {
        assert_eq!(
            with_query_param("ws://h/", "token", "abc"),
            "ws://h/?token=abc"
        );
        assert_eq!(
            with_query_param("ws://h/p?room=1", "token", "a b/c+d=é"),
            "ws://h/p?room=1&token=a%20b%2Fc%2Bd%3D%C3%A9"
        );
        assert_eq!(
            with_query_param("ws://h/p?", "token", "x"),
            "ws://h/p?token=x"
        );
        assert_eq!(
            with_query_param("ws://h/p#frag", "token", "x"),
            "ws://h/p?token=x#frag"
        );
    }

    #[test]
    fn payloads_from_common_types() {
        assert_eq!("hi".into_payload(), Payload::Text("hi".into()));
        assert_eq!(
            String::from("hi").into_payload(),
            Payload::Text("hi".into())
        );
        assert_eq!(b"\x00\x01".into_payload(), Payload::Binary(vec![0, 1]));
        assert_eq!(vec![2u8].into_payload(), Payload::Binary(vec![2]));
    }

    #[tokio::test]
    async fn bad_settings_are_refused_up_front() {
        for url in ["http://h/", "h:80", "ws://"] {
            let err = Client::builder(url).connect().unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
        }
        let err = Client::builder("ws://127.0.0.1:1/")
            .header("bad header", "x")
            .connect()
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        let err = Client::builder("ws://127.0.0.1:1/")
            .token("line\nbreak")
            .connect()
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
    }

    #[test]
    fn handles_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Client>();
        send_sync::<Error>();
        send::<crate::Subscription>();
        send::<crate::SubscriptionHandle>();
        send::<Events>();
    }

    #[test]
    fn connect_needs_a_runtime() {
        let err = Client::builder("ws://127.0.0.1:1/").connect().unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
    }

    #[tokio::test]
    async fn commands_wait_for_a_connection_then_time_out() {
        // Nothing listens there: every attempt fails and is retried.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = Client::builder(format!("ws://{addr}/"))
            .backoff_initial(Duration::from_millis(10))
            .backoff_max(Duration::from_millis(50))
            .command_timeout(Duration::from_millis(300))
            .connect()
            .unwrap();
        let mut events = client.events();
        let started = Instant::now();
        let err = client.publish("chat:a", "x").await.unwrap_err();
        assert_eq!(
            err,
            Error::Timeout {
                command: "publish",
                after: Duration::from_millis(300)
            }
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        match events.recv().await {
            Some(ClientEvent::ConnectFailed { error, .. }) => {
                assert!(matches!(error, Error::Transport(_)), "{error:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(client.state(), ConnectionState::Connecting);
        client.close().await;
        assert_eq!(client.state(), ConnectionState::Closed);
        assert_eq!(client.ping().await, Err(Error::Closed));
        assert_eq!(client.wait_connected().await, Err(Error::Closed));
        // The events stream ends after `Closed`.
        let mut rest = Vec::new();
        while let Some(e) = events.recv().await {
            rest.push(e);
        }
        assert_eq!(rest.last(), Some(&ClientEvent::Closed), "{rest:?}");
    }

    /// `wss://` goes through TLS (here a server that hangs up: a retryable
    /// failure, not a panic for want of a crypto provider).
    #[cfg(feature = "rustls-tls")]
    #[tokio::test]
    async fn wss_urls_go_through_tls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let client = Client::builder(format!("wss://{addr}/"))
            .backoff_initial(Duration::from_secs(5))
            .connect()
            .unwrap();
        let mut events = client.events();
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event");
        assert!(
            matches!(
                event,
                Some(ClientEvent::ConnectFailed {
                    error: Error::Transport(_),
                    ..
                })
            ),
            "{event:?}"
        );
        client.close().await;
    }

    #[tokio::test]
    async fn a_full_queue_fails_fast() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = Client::builder(format!("ws://{addr}/"))
            .max_queued_commands(2)
            .command_timeout(Duration::from_secs(2))
            .connect()
            .unwrap();
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.ping().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(client.ping().await, Err(Error::QueueFull(2)));
        client.close().await;
        for w in waiting {
            assert_eq!(w.await.unwrap(), Err(Error::Closed));
        }
    }
}
