//! [`NatsConfig`]: what the NATS backend needs to know, and nothing of the
//! gateway's own settings. The binary fills it from its configuration
//! (flags, environment, TOML file); an embedder fills it directly.

use std::path::PathBuf;
use std::time::Duration;
use switchboard_backend::Namespace;

/// The NATS backend's settings. Defaults match the binary's.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// NATS server URL(s), comma-separated.
    pub urls: String,
    /// Prefix of every subject, so clusters can share one NATS.
    pub prefix: String,
    /// NATS credentials file (JWT and nkey seed, `.creds`).
    pub creds: Option<PathBuf>,
    /// File holding an nkey seed to authenticate with.
    pub nkey: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server with.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    pub tls_key: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS.
    pub tls_required: bool,
    /// How often a node announces itself.
    pub heartbeat: Duration,
    /// A node not heard from for this long is reported lost.
    pub heartbeat_timeout: Duration,
    /// Time allowed for another node to answer a forwarded command, and for
    /// presence answers.
    pub request_timeout: Duration,
    /// Channel namespaces (one JetStream stream each).
    pub namespaces: Vec<Namespace>,
    /// Replicas of each channel log stream (1, 3 or 5).
    pub channel_log_replicas: usize,
    /// With the origin over NATS: publish events through this JetStream
    /// stream (created if missing) and wait for its acks.
    pub event_stream: Option<String>,
    /// With the origin over NATS: how long a `connect` (or other
    /// synchronous) request waits for the origin's answer.
    pub origin_timeout: Duration,
    /// Most direct messages kept per session in the session store (the
    /// gateway's `session-outbox-messages`).
    pub session_messages: u32,
}

impl NatsConfig {
    /// Settings for `urls` with every other value at its default.
    pub fn new(urls: impl Into<String>) -> Self {
        Self {
            urls: urls.into(),
            prefix: "switchboard".into(),
            creds: None,
            nkey: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            heartbeat: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_millis(1500),
            namespaces: Vec::new(),
            channel_log_replicas: 1,
            event_stream: None,
            origin_timeout: Duration::from_secs(10),
            session_messages: 1_000,
        }
    }
}
