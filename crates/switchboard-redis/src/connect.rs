//! The node's two Redis connections, with endless reconnects: one for
//! commands (multiplexed: every task of the node shares it) and one that
//! only subscribes, whose messages a [`Router`] hands to the subscribers in
//! the node (RESP3 pushes; channels are subscribed again after a
//! reconnect). [`Link`] says whether Redis answers, and since when.

use crate::RedisConfig;
use bytes::Bytes;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
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
}

/// Longest wait of one blocking read on the blocking connection.
pub(crate) const BLOCK_FOR: Duration = Duration::from_secs(1);

/// Messages queued for one subscriber; more are dropped (a channel
/// watcher fills the gap from the log at its next message).
const SUBSCRIBER_QUEUE: usize = 65_536;

/// Whether Redis answers, and since when: set by the outcome of each
/// heartbeat (every `cluster-heartbeat`) and by the subscribing
/// connection's breaks.
#[derive(Debug)]
pub struct Link {
    up: AtomicBool,
    since: Mutex<Instant>,
}

impl Link {
    fn new() -> Self {
        Self {
            up: AtomicBool::new(false),
            since: Mutex::new(Instant::now()),
        }
    }

    /// Whether Redis answered the node's last heartbeat.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// How long Redis has answered without a break (zero when down).
    pub fn up_for(&self) -> Duration {
        if self.is_up() {
            self.since.lock().elapsed()
        } else {
            Duration::ZERO
        }
    }

    /// Records that Redis answered (`true`) or failed.
    pub(crate) fn set(&self, up: bool) {
        let was = self.up.swap(up, Relaxed);
        if up && !was {
            *self.since.lock() = Instant::now();
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
}

impl Router {
    fn deliver(&self, channel: &[u8], payload: Bytes) {
        let routes = self.routes.lock();
        for (_, tx) in routes.get(channel).into_iter().flatten() {
            if tx.try_send(payload.clone()).is_err() {
                tracing::debug!(channel = %String::from_utf8_lossy(channel), "subscriber queue full: message dropped");
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

/// The node's Redis: a connection for commands, one for subscriptions.
#[derive(Clone)]
pub struct Redis {
    commands: ConnectionManager,
    subscriber: ConnectionManager,
    /// For blocking reads (`XREADGROUP … BLOCK`), which would hold up
    /// every other command on the shared connection.
    blocking: ConnectionManager,
    router: Arc<Router>,
    /// The generation value last read, and how many times it changed.
    generation: Arc<Mutex<(Option<String>, u64)>>,
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
    let info = info.set_redis_settings(settings);
    let client = redis::Client::open(info).map_err(|e| RedisError::Connect(e.to_string()))?;
    let link = Arc::new(Link::new());
    let router = Arc::new(Router::default());
    let base = ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(config.heartbeat.max(Duration::from_millis(100)))
        .set_number_of_retries(usize::MAX)
        .set_connection_timeout(Some(config.request_timeout))
        .set_response_timeout(Some(config.request_timeout));
    let commands = ConnectionManager::new_lazy_with_config(client.clone(), base.clone())
        .map_err(|e| RedisError::Connect(e.to_string()))?;
    let blocking = ConnectionManager::new_lazy_with_config(
        client.clone(),
        base.clone()
            .set_response_timeout(Some(BLOCK_FOR + config.request_timeout)),
    )
    .map_err(|e| RedisError::Connect(e.to_string()))?;
    let pushes = {
        let router = router.clone();
        let link = link.clone();
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
                PushKind::Disconnection => link.set(false),
                _ => {}
            }
            Ok::<(), redis::aio::SendError>(())
        }
    };
    let subscriber = ConnectionManager::new_lazy_with_config(
        client,
        base.set_push_sender(pushes).set_automatic_resubscription(),
    )
    .map_err(|e| RedisError::Connect(e.to_string()))?;
    Ok(Redis {
        commands,
        subscriber,
        blocking,
        router,
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
                    let _guard = redis.subscribing.lock().await;
                    if !redis.router.has(&channel) {
                        let mut conn = redis.subscriber.clone();
                        let _ = conn.unsubscribe(&channel).await;
                    }
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
            let mut conn = self.conn();
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

    /// Whether Redis answers, and since when.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Records the generation value just read (see
    /// [`crate::keys::Keys::generation`]); a change counts as a loss.
    pub(crate) fn saw_generation(&self, value: String) {
        let mut g = self.generation.lock();
        if g.0.as_ref().is_some_and(|seen| *seen != value) {
            g.1 += 1;
            tracing::warn!(
                "Redis lost its data (it restarted without persistence, or was flushed)"
            );
        }
        g.0 = Some(value);
    }

    /// How many times Redis was seen to lose its data.
    pub fn losses(&self) -> u64 {
        self.generation.lock().1
    }

    /// The connection for commands (cheap to clone).
    pub(crate) fn conn(&self) -> ConnectionManager {
        self.commands.clone()
    }

    /// The connection for blocking reads of at most [`BLOCK_FOR`].
    pub(crate) fn blocking_conn(&self) -> ConnectionManager {
        self.blocking.clone()
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
        conn.subscribe(channel).await?;
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
