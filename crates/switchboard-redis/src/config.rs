//! [`RedisConfig`]: what the Redis backend needs to know, and nothing of the
//! gateway's own settings. The binary fills it from its configuration
//! (flags, environment, TOML file); an embedder fills it directly.

use std::path::PathBuf;
use std::time::Duration;
use switchboard_backend::Namespace;

/// The Redis backend's settings. Defaults match the binary's.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS.
    pub url: String,
    /// Prefix of every key and pub/sub channel, so clusters can share one
    /// Redis.
    pub prefix: String,
    /// With `rediss://`: the CA certificate (PEM) to verify Redis with,
    /// instead of the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// How often a node refreshes its membership key.
    pub heartbeat: Duration,
    /// A node whose membership key was not refreshed for this long is
    /// reported lost (the key's time to live).
    pub heartbeat_timeout: Duration,
    /// Time allowed for another node to answer a forwarded command, for
    /// presence answers, and for each Redis command.
    pub request_timeout: Duration,
    /// Channel namespaces (history size and age of their logs).
    pub namespaces: Vec<Namespace>,
    /// Most direct messages kept per session in the session store (the
    /// gateway's `session-outbox-messages`).
    pub session_messages: u32,
    /// With the origin over Redis: how long a `connect` (or other
    /// synchronous) event waits for the origin's answer.
    pub origin_timeout: Duration,
    /// With the origin over Redis: how many event streams a connection's
    /// events are spread over (by connection id), so that several workers
    /// can each own some and still see every connection's events in order.
    pub event_partitions: u32,
    /// With the origin over Redis: the newest entries each event stream
    /// keeps (approximately; older ones are trimmed, read or not).
    pub event_stream_max_len: u64,
}

impl RedisConfig {
    /// Settings for `url` with every other value at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "switchboard".into(),
            tls_ca: None,
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_millis(1500),
            namespaces: Vec::new(),
            session_messages: 1_000,
            origin_timeout: Duration::from_secs(10),
            event_partitions: 1,
            event_stream_max_len: 1_000_000,
        }
    }
}
