//! The gateway's configuration: one typed struct, its defaults, and `validate()`.
//!
//! Field names are the kebab-case TOML keys, the `--flag` names and (upper-case,
//! with `_`) the `SWITCHBOARD_*` variable names; `docs/configuration.md`
//! documents each one, and a test keeps the two in step.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Longest duration any setting accepts.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Every setting of a gateway node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Client (WebSocket) listener address.
    pub listen: SocketAddr,
    /// Control API and operations listener address.
    pub control_listen: SocketAddr,
    /// This node's id (1–32 of `[A-Za-z0-9_-]`); random when absent.
    pub node_id: Option<String>,
    /// Origin webhook URL, or `nats` for the origin over NATS (needs `nats`).
    /// Absent: dev mode, every connection accepted and events discarded.
    pub origin: Option<String>,
    /// Secret for the HMAC-SHA256 signature of origin requests.
    pub origin_secret: Option<String>,
    /// Timeout of one origin request.
    #[serde(with = "humantime_serde")]
    pub origin_timeout: Duration,
    /// Origin requests in flight at once (event lanes); events of one
    /// connection always use the same lane, so they stay in order.
    pub origin_concurrency: usize,
    /// Most events in one origin request.
    pub origin_batch_size: usize,
    /// How long a lane waits for more events before sending a partial batch.
    #[serde(with = "humantime_serde")]
    pub origin_batch_linger: Duration,
    /// First retry delay of a failed origin request (doubles, with jitter).
    #[serde(with = "humantime_serde")]
    pub origin_retry_initial: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub origin_retry_max: Duration,
    /// Events waiting for the origin, node-wide. When full, new handshakes get
    /// 503 and connections producing events are closed with 4002.
    pub origin_queue_size: usize,
    /// Bytes of event JSON waiting for the origin, node-wide; the same
    /// refusals as `origin-queue-size` apply when it is reached.
    pub origin_queue_bytes: usize,
    /// Events waiting for the origin, per connection; past it the connection is
    /// closed with 4002.
    pub max_pending_events: usize,
    /// Interval of `keepalive` events (0s disables them).
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Control API keys (`Authorization: Bearer <key>`); several allow rotation.
    /// Required when `control-listen` is not a loopback address.
    pub api_key: Vec<String>,
    /// Subprotocols the gateway accepts, in preference order of the client.
    pub subprotocol: Vec<String>,
    /// Offer permessage-deflate to clients that ask for it.
    pub permessage_deflate: bool,
    /// Request headers passed to the origin in `connect` (case-insensitive).
    pub forward_header: Vec<String>,
    /// Interval of WebSocket pings to each client.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Time allowed for a pong before the connection is dropped.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Time allowed to send the whole request head and be answered by the origin.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Close (4003) a connection that sent no message for this long; absent: never.
    #[serde(with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    /// Largest message accepted from a client, in bytes (1009 beyond).
    pub max_message_size: usize,
    /// Largest request head accepted, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Most client sockets open at once (503 beyond).
    pub max_connections: usize,
    /// Most client sockets open at once from one IP address (503 beyond; 0: no cap).
    pub max_connections_per_ip: usize,
    /// Bytes queued for one client before it is closed as a slow consumer (4001).
    pub max_outbound_bytes: usize,
    /// Upper bound of a graceful drain.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Window over which draining closes clients (1012), so they do not all
    /// reconnect at once.
    #[serde(with = "humantime_serde")]
    pub drain_spread: Duration,
    /// NATS server URL(s), comma-separated: join a cluster. Absent: single node.
    pub nats: Option<String>,
    /// Subject prefix of every NATS subject, so clusters can share one NATS.
    pub nats_prefix: String,
    /// NATS credentials file (JWT and nkey seed, `.creds`).
    pub nats_creds: Option<PathBuf>,
    /// File holding an nkey seed to authenticate to NATS with.
    pub nats_nkey: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server with.
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS.
    pub nats_tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for NATS mutual TLS.
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS.
    pub nats_tls_required: bool,
    /// With `origin = "nats"`: publish events through this JetStream stream
    /// (created if missing) and wait for its acks, so they are durable.
    pub nats_event_stream: Option<String>,
    /// How often a node announces itself to the cluster.
    #[serde(with = "humantime_serde")]
    pub cluster_heartbeat: Duration,
    /// A node not heard from for this long is considered dead.
    #[serde(with = "humantime_serde")]
    pub cluster_heartbeat_timeout: Duration,
    /// Time allowed for another node to answer a forwarded control command.
    #[serde(with = "humantime_serde")]
    pub cluster_request_timeout: Duration,
}

impl Config {
    /// Whether the origin is reached over NATS (`origin = "nats"`).
    pub fn origin_is_nats(&self) -> bool {
        self.origin.as_deref() == Some(NATS_ORIGIN)
    }
}

/// The `origin` value selecting the NATS origin transport.
pub const NATS_ORIGIN: &str = "nats";

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            control_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            node_id: None,
            origin: None,
            origin_secret: None,
            origin_timeout: Duration::from_secs(10),
            origin_concurrency: 16,
            origin_batch_size: 100,
            origin_batch_linger: Duration::ZERO,
            origin_retry_initial: Duration::from_millis(100),
            origin_retry_max: Duration::from_secs(10),
            origin_queue_size: 100_000,
            origin_queue_bytes: 256 << 20,
            max_pending_events: 1_000,
            keepalive_interval: Duration::from_secs(30),
            api_key: Vec::new(),
            subprotocol: Vec::new(),
            permessage_deflate: false,
            forward_header: ["user-agent", "origin", "accept-language", "x-forwarded-for"]
                .map(String::from)
                .to_vec(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_message_size: 1 << 20,
            max_header_bytes: 8 << 10,
            max_connections: 1_000_000,
            max_connections_per_ip: 10_000,
            max_outbound_bytes: 512 << 10,
            drain_timeout: Duration::from_secs(30),
            drain_spread: Duration::from_secs(5),
            nats: None,
            nats_prefix: "switchboard".into(),
            nats_creds: None,
            nats_nkey: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_required: false,
            nats_event_stream: None,
            cluster_heartbeat: Duration::from_secs(1),
            cluster_heartbeat_timeout: Duration::from_secs(5),
            cluster_request_timeout: Duration::from_millis(1500),
        }
    }
}

/// A setting with a value the gateway cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{field}`: {problem}")]
pub struct ConfigError {
    /// The setting's name (kebab-case).
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        problem: problem.into(),
    }
}

impl Config {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.node_id {
            switchboard_proto::NodeId::new(id).map_err(|e| bad("node-id", e.to_string()))?;
        }
        if self.origin_is_nats() {
            if self.nats.is_none() {
                return Err(bad("origin", "`nats` needs the `nats` setting"));
            }
        } else if let Some(origin) = &self.origin {
            match reqwest::Url::parse(origin) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => {
                    return Err(bad(
                        "origin",
                        "must be an http:// or https:// URL with a host",
                    ))
                }
            }
        }
        if !self.control_listen.ip().is_loopback() && self.api_key.is_empty() {
            return Err(bad(
                "api-key",
                "required when control-listen is not a loopback address",
            ));
        }
        if self.api_key.iter().any(|k| k.len() < 16) {
            return Err(bad("api-key", "keys must be at least 16 characters"));
        }
        for (field, v) in [
            ("origin-concurrency", self.origin_concurrency),
            ("origin-batch-size", self.origin_batch_size),
            ("origin-queue-size", self.origin_queue_size),
            ("origin-queue-bytes", self.origin_queue_bytes),
            ("max-pending-events", self.max_pending_events),
            ("max-message-size", self.max_message_size),
            ("max-connections", self.max_connections),
            ("max-outbound-bytes", self.max_outbound_bytes),
        ] {
            if v == 0 {
                return Err(bad(field, "must be greater than 0"));
            }
        }
        if self.max_header_bytes < 256 {
            return Err(bad("max-header-bytes", "must be at least 256"));
        }
        for (field, d) in [
            ("ping-interval", self.ping_interval),
            ("pong-timeout", self.pong_timeout),
            ("handshake-timeout", self.handshake_timeout),
            ("origin-timeout", self.origin_timeout),
            ("origin-retry-initial", self.origin_retry_initial),
        ] {
            if d.is_zero() {
                return Err(bad(field, "must be greater than 0"));
            }
        }
        for (field, d) in [
            ("ping-interval", self.ping_interval),
            ("pong-timeout", self.pong_timeout),
            ("handshake-timeout", self.handshake_timeout),
            ("origin-timeout", self.origin_timeout),
            ("origin-retry-max", self.origin_retry_max),
            ("origin-batch-linger", self.origin_batch_linger),
            ("keepalive-interval", self.keepalive_interval),
            ("drain-timeout", self.drain_timeout),
            ("idle-timeout", self.idle_timeout.unwrap_or_default()),
        ] {
            if d > MAX_DURATION {
                return Err(bad(field, "must not exceed 7 days"));
            }
        }
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err(bad(
                "idle-timeout",
                "must be greater than 0 (leave it unset to disable)",
            ));
        }
        if self.origin_retry_max < self.origin_retry_initial {
            return Err(bad(
                "origin-retry-max",
                "must be at least origin-retry-initial",
            ));
        }
        self.validate_cluster()?;
        if self.drain_spread > self.drain_timeout {
            return Err(bad("drain-spread", "must not exceed drain-timeout"));
        }
        Ok(())
    }
}

impl Config {
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !self.nats_prefix.split('.').all(token_ok) || self.nats_prefix.len() > 64 {
            return Err(bad(
                "nats-prefix",
                "must be up to 64 characters: tokens of [A-Za-z0-9_-] joined by '.'",
            ));
        }
        if let Some(stream) = &self.nats_event_stream {
            if !token_ok(stream) || stream.len() > 64 {
                return Err(bad(
                    "nats-event-stream",
                    "must be 1-64 characters of [A-Za-z0-9_-]",
                ));
            }
            if !self.origin_is_nats() {
                return Err(bad(
                    "nats-event-stream",
                    "only applies with origin = \"nats\"",
                ));
            }
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            return Err(bad(
                "nats-tls-cert",
                "nats-tls-cert and nats-tls-key go together",
            ));
        }
        for (field, d) in [
            ("cluster-heartbeat", self.cluster_heartbeat),
            ("cluster-heartbeat-timeout", self.cluster_heartbeat_timeout),
            ("cluster-request-timeout", self.cluster_request_timeout),
        ] {
            if d < Duration::from_millis(10) || d > MAX_DURATION {
                return Err(bad(field, "must be between 10ms and 7 days"));
            }
        }
        if self.nats.is_none() {
            for (field, set) in [
                ("nats-creds", self.nats_creds.is_some()),
                ("nats-nkey", self.nats_nkey.is_some()),
                ("nats-tls-ca", self.nats_tls_ca.is_some()),
                ("nats-tls-cert", self.nats_tls_cert.is_some()),
                ("nats-tls-required", self.nats_tls_required),
            ] {
                if set {
                    return Err(bad(field, "only applies with `nats`"));
                }
            }
        }
        if self.cluster_heartbeat_timeout < self.cluster_heartbeat * 2 {
            return Err(bad(
                "cluster-heartbeat-timeout",
                "must be at least twice cluster-heartbeat",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_roundtrip_through_toml_keys() {
        let c = Config::default();
        c.validate().unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["ping-interval"], "25s");
        let back: Config = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn validation() {
        let mut c = Config {
            control_listen: "0.0.0.0:8081".parse().unwrap(),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "api-key");
        c.api_key = vec!["0123456789abcdef".into()];
        c.validate().unwrap();
        c.origin = Some("ftp://x".into());
        assert_eq!(c.validate().unwrap_err().field, "origin");
        let c = Config {
            node_id: Some("a b".into()),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "node-id");
        let c = Config {
            origin: Some("nats".into()),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "origin");
        let c = Config {
            nats: Some("nats://127.0.0.1:4222".into()),
            nats_prefix: "a..b".into(),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "nats-prefix");
        let c = Config {
            nats: Some("nats://127.0.0.1:4222".into()),
            cluster_heartbeat_timeout: Duration::from_millis(1500),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "cluster-heartbeat-timeout");
        let bad: Result<Config, _> = serde_json::from_str(r#"{"no-such-key": 1}"#);
        assert!(bad.is_err());
    }
}
