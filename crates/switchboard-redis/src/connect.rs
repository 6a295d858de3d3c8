//! The node's Redis connections, reconnecting by themselves: one for
//! commands (multiplexed: every task of the node shares it), one for the
//! membership heartbeats (so a busy command connection cannot delay them;
//! a connection's I/O task runs on the runtime that first uses it, the
//! beat thread for this one),
//! one for blocking reads, and one that only subscribes, whose messages a
//! [`Router`] hands to the subscribers in the node (RESP3 pushes; channels
//! are subscribed again after a reconnect). Every call is bounded by the
//! request timeout ([`Bounded`]): a command that could not be sent in time
//! is dropped, never sent later. TCP keepalives and `TCP_USER_TIMEOUT`
//! close a connection whose peer vanished. [`Link`] says whether Redis
//! answers.

use crate::RedisConfig;
use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{
    Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, PushKind, RedisFuture, Value,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Why the Redis connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL cannot be used (bad scheme, host, database).
    #[error("bad Redis URL: {0}")]
    Url(String),
    /// The client could not be created (TLS set-up).
    #[error("cannot connect to Redis: {0}")]
    Connect(String),
    /// The CA certificate could not be read.
    #[error("cannot read the Redis CA certificate {path:?}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The generation value and `run_id` last read, and how many times they
/// changed.
type Generation = (Option<(String, String)>, u64);

/// Channels per `SUBSCRIBE` when subscribing every routed channel again.
const RESUBSCRIBE_BATCH: usize = 500;

/// Longest wait of one blocking read on the blocking connection.
pub(crate) const BLOCK_FOR: Duration = Duration::from_secs(1);

/// Messages queued for one subscriber; more are dropped (a channel
/// watcher fills the gap from the log at its next message).
const SUBSCRIBER_QUEUE: usize = 65_536;

/// Whether Redis answers: set by the outcome of each
/// heartbeat (every `cluster-heartbeat`) and by the subscribing
/// connection's breaks.
#[derive(Debug)]
pub struct Link {
    up: AtomicBool,
}

impl Link {
    fn new() -> Self {
        Self {
            up: AtomicBool::new(false),
        }
    }

    /// Whether Redis answered the node's last heartbeat.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Records that Redis answered (`true`) or failed.
    pub(crate) fn set(&self, up: bool) {
        let was = self.up.swap(up, Relaxed);
        if up && !was {
            tracing::info!("Redis reachable");
        } else if !up && was {
            tracing::warn!("Redis unreachable; serving local clients and still trying");
        }
    }
}

/// One subscriber's messages (a pub/sub channel's payloads).
pub(crate) type Inbox = mpsc::Receiver<Bytes>;

/// The subscribers of one pub/sub channel: their ids and queues.
type Subscribers = Vec<(u64, mpsc::Sender<Bytes>)>;

/// Hands the subscribing connection's messages to the subscribers of
/// their channel.
#[derive(Debug, Default)]
pub(crate) struct Router {
    routes: Mutex<HashMap<Vec<u8>, Subscribers>>,
    next: AtomicU64,
    /// Messages dropped because their subscriber's queue was full, and
    /// when that was last logged.
    dropped: AtomicU64,
    dropped_logged: Mutex<Option<Instant>>,
}

impl Router {
    fn deliver(&self, channel: &[u8], payload: Bytes) {
        let routes = self.routes.lock();
        for (_, tx) in routes.get(channel).into_iter().flatten() {
            if tx.try_send(payload.clone()).is_err() {
                let dropped = self.dropped.fetch_add(1, Relaxed) + 1;
                let mut logged = self.dropped_logged.lock();
                if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    *logged = Some(Instant::now());
                    // Channel messages are read back from the log; a lost
                    // command or answer times out for its sender.
                    tracing::warn!(
                        channel = %String::from_utf8_lossy(channel),
                        dropped_so_far = dropped,
                        "a Redis subscriber fell behind: message dropped"
                    );
                }
            }
        }
    }

    fn add(&self, channel: &str) -> (u64, Inbox) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let id = self.next.fetch_add(1, Relaxed);
        self.routes
            .lock()
            .entry(channel.as_bytes().to_vec())
            .or_default()
            .push((id, tx));
        (id, rx)
    }

    /// Removes a subscriber; whether it was the channel's last.
    fn remove(&self, channel: &str, id: u64) -> bool {
        let mut routes = self.routes.lock();
        let Some(list) = routes.get_mut(channel.as_bytes()) else {
            return true;
        };
        list.retain(|(i, _)| *i != id);
        if list.is_empty() {
            routes.remove(channel.as_bytes());
            true
        } else {
            false
        }
    }

    fn has(&self, channel: &str) -> bool {
        self.routes.lock().contains_key(channel.as_bytes())
    }
}

/// A connection whose every call is bounded in time: past `timeout` the
/// call fails (as an I/O error), and a command still waiting for a
/// reconnect is dropped rather than sent later.
#[derive(Clone)]
pub(crate) struct Bounded {
    inner: ConnectionManager,
    timeout: Duration,
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

impl ConnectionLike for Bounded {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let timeout = self.timeout;
        let call = self.inner.req_packed_command(cmd);
        Box::pin(async move {
            tokio::time::timeout(timeout, call)
                .await
                .unwrap_or_else(|_| Err(timed_out()))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let timeout = self.timeout;
        let call = self.inner.req_packed_commands(pipeline, offset, count);
        Box::pin(async move {
            tokio::time::timeout(timeout, call)
                .await
                .unwrap_or_else(|_| Err(timed_out()))
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// The node's Redis: connections for commands, membership, blocking reads
/// and subscriptions.
#[derive(Clone)]
pub struct Redis {
    commands: ConnectionManager,
    membership: ConnectionManager,
    subscriber: ConnectionManager,
    /// For blocking reads (`XREADGROUP … BLOCK`), which would hold up
    /// every other command on the shared connection.
    blocking: ConnectionManager,
    router: Arc<Router>,
    /// The generation value and `run_id` last read, and how many times
    /// they changed.
    generation: Arc<Mutex<Generation>>,
    /// Bound of every call.
    timeout: Duration,
    /// The subscribing connection broke: subscribe every routed channel
    /// again once it answers (on top of the client's own resubscription,
    /// whose errors it ignores).
    resubscribe: Arc<AtomicBool>,
    /// One subscribe or unsubscribe at a time, so the last subscriber of a
    /// channel leaving never unsubscribes a new one's interest.
    subscribing: Arc<tokio::sync::Mutex<()>>,
    link: Arc<Link>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("up", &self.link.is_up())
            .finish()
    }
}

/// Connects to Redis (in the background: a node starts while Redis is
/// away, and keeps trying).
pub fn connect(config: &RedisConfig) -> Result<Redis, RedisError> {
    let info = config
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| RedisError::Url(e.to_string()))?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    // A peer that vanished (power, a silent load balancer) is found by
    // keepalive probes on idle connections, and by unacknowledged data
    // (every heartbeat writes on each connection) within the timeout.
    let tcp = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(
            socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(10))
                .with_interval(Duration::from_secs(5))
                .with_retries(3),
        );
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let tcp = tcp.set_user_timeout(config.heartbeat_timeout);
    let info = info.set_redis_settings(settings).set_tcp_settings(tcp);
    let client = match &config.tls_ca {
        None => redis::Client::open(info),
        Some(path) => {
            let root_cert = std::fs::read(path).map_err(|e| RedisError::File {
                path: path.clone(),
                source: e,
            })?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(info, certificates)
        }
    }
    .map_err(|e| RedisError::Connect(e.to_string()))?;
    let link = Arc::new(Link::new());
    let router = Arc::new(Router::default());
    let resubscribe = Arc::new(AtomicBool::new(false));
    // Reconnects are tried until they succeed (whatever the error: a
    // refused password may be fixed on the server); no call waits for
    // them longer than its bound ([`Bounded`]).
    let base = ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(config.heartbeat.max(Duration::from_millis(100)))
        .set_number_of_retries(usize::MAX)
        .set_connection_timeout(Some(config.request_timeout))
        .set_response_timeout(Some(config.request_timeout));
    let manager = |config: ConnectionManagerConfig| {
        ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| RedisError::Connect(e.to_string()))
    };
    let commands = manager(base.clone())?;
    let membership = manager(base.clone())?;
    let blocking = manager(
        base.clone()
            .set_response_timeout(Some(BLOCK_FOR + config.request_timeout)),
    )?;
    let pushes = {
        let router = router.clone();
        let link = link.clone();
        let resubscribe = resubscribe.clone();
        move |info: PushInfo| {
            match info.kind {
                PushKind::Message => {
                    let mut data = info.data.into_iter();
                    if let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                        (data.next(), data.next())
                    {
                        router.deliver(&channel, Bytes::from(payload));
                    }
                }
                PushKind::Disconnection => {
                    link.set(false);
                    resubscribe.store(true, Relaxed);
                }
                _ => {}
            }
            Ok::<(), redis::aio::SendError>(())
        }
    };
    let subscriber = manager(base.set_push_sender(pushes).set_automatic_resubscription())?;
    Ok(Redis {
        commands,
        membership,
        subscriber,
        blocking,
        router,
        timeout: config.request_timeout,
        resubscribe,
        generation: Arc::default(),
        subscribing: Arc::new(tokio::sync::Mutex::new(())),
        link,
    })
}

/// A subscription to a pub/sub channel; dropping it unsubscribes (when it
/// was the node's last on that channel).
#[derive(Debug)]
pub(crate) struct Subscription {
    redis: Redis,
    channel: String,
    id: u64,
    /// The channel's messages.
    pub(crate) inbox: Inbox,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.redis.router.remove(&self.channel, self.id) {
            let redis = self.redis.clone();
            let channel = std::mem::take(&mut self.channel);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    // Tried until Redis takes it: a channel left subscribed
                    // would be resubscribed on every reconnect, its traffic
                    // received for nothing.
                    for attempt in 0..10u32 {
                        let _guard = redis.subscribing.lock().await;
                        if redis.router.has(&channel) {
                            return;
                        }
                        let mut conn = redis.subscriber.clone();
                        let done =
                            tokio::time::timeout(redis.timeout, conn.unsubscribe(&channel)).await;
                        if matches!(done, Ok(Ok(()))) {
                            return;
                        }
                        drop(_guard);
                        tokio::time::sleep(Duration::from_millis(200) * (attempt + 1)).await;
                    }
                    tracing::warn!(channel, "could not unsubscribe from a Redis channel; its messages are received and dropped");
                });
            }
        }
    }
}

impl Redis {
    /// Sends `PING` until Redis answers or `within` has passed; whether it
    /// answered (and the link is up).
    pub async fn ping(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut conn = Bounded {
                inner: self.commands.clone(),
                timeout: Duration::from_secs(1),
            };
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
            if pong.is_ok() {
                self.link.set(true);
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether Redis answers.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Records the generation value and the server's `run_id` just read
    /// (see [`crate::keys::Keys::generation`]); a change of either counts
    /// as a loss.
    pub(crate) fn saw_generation(&self, value: String, run: String) {
        let seen = (value, run);
        let mut g = self.generation.lock();
        if g.0.as_ref().is_some_and(|before| *before != seen) {
            g.1 += 1;
            tracing::warn!(
                "Redis restarted, failed over or was flushed: it may have lost data; sessions are written again"
            );
        }
        g.0 = Some(seen);
    }

    /// How many times Redis was seen to lose its data.
    pub fn losses(&self) -> u64 {
        self.generation.lock().1
    }

    /// The connection for commands (cheap to clone).
    pub(crate) fn conn(&self) -> Bounded {
        Bounded {
            inner: self.commands.clone(),
            timeout: self.timeout,
        }
    }

    /// The connection for the membership heartbeats and reads.
    pub(crate) fn membership_conn(&self) -> Bounded {
        Bounded {
            inner: self.membership.clone(),
            timeout: self.timeout,
        }
    }

    /// The connection for blocking reads of at most [`BLOCK_FOR`].
    pub(crate) fn blocking_conn(&self) -> Bounded {
        Bounded {
            inner: self.blocking.clone(),
            timeout: BLOCK_FOR + self.timeout,
        }
    }

    /// Checks the subscribing connection (a `PING` on it, so that a vanished
    /// peer is found by `TCP_USER_TIMEOUT`), and after it broke subscribes
    /// every routed channel again. Whether it answered.
    pub(crate) async fn check_subscriber(&self) -> bool {
        let mut conn = Bounded {
            inner: self.subscriber.clone(),
            timeout: self.timeout,
        };
        let pong: redis::RedisResult<Value> = redis::cmd("PING").query_async(&mut conn).await;
        if pong.is_err() {
            return false;
        }
        if self.resubscribe.swap(false, Relaxed) {
            // Many channels per SUBSCRIBE (idempotent for those the client
            // subscribed again already).
            let _guard = self.subscribing.lock().await;
            let channels: Vec<Vec<u8>> = self.router.routes.lock().keys().cloned().collect();
            for batch in channels.chunks(RESUBSCRIBE_BATCH) {
                let mut conn = self.subscriber.clone();
                let again = tokio::time::timeout(self.timeout, conn.subscribe(batch)).await;
                if !matches!(again, Ok(Ok(()))) {
                    self.resubscribe.store(true, Relaxed);
                    return false;
                }
            }
        }
        true
    }

    /// Subscribes to `channel`; returns once Redis has the interest.
    pub(crate) async fn subscribe(&self, channel: &str) -> redis::RedisResult<Subscription> {
        let _guard = self.subscribing.lock().await;
        let (id, inbox) = self.router.add(channel);
        let subscription = Subscription {
            redis: self.clone(),
            channel: channel.to_owned(),
            id,
            inbox,
        };
        let mut conn = self.subscriber.clone();
        tokio::time::timeout(self.timeout, conn.subscribe(channel))
            .await
            .map_err(|_| timed_out())??;
        Ok(subscription)
    }
}

impl Redis {
    /// Subscribes to `channel`, trying again every `pause` while Redis is
    /// away, until it succeeds or `stop` is cancelled.
    pub(crate) async fn subscribe_until(
        &self,
        channel: &str,
        pause: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Option<Subscription> {
        let mut warned = false;
        loop {
            match self.subscribe(channel).await {
                Ok(s) => return Some(s),
                Err(e) => {
                    if !warned {
                        tracing::warn!(channel, error = %e, "cannot subscribe on Redis yet; still trying");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return None,
            }
        }
    }
}
