//! The gateway's configuration: one typed struct, its defaults, and `validate()`.
//!
//! Field names are the kebab-case TOML keys, the `--flag` names and (upper-case,
//! with `_`) the `SWITCHBOARD_*` variable names; `docs/configuration.md`
//! documents each one, and a test keeps the two in step.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
pub use switchboard_backend::namespace::{Namespace, MAX_HISTORY_SIZE};

/// Longest duration any setting accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

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
    /// HMAC secret of client tokens (HS256/384/512), at least 32 bytes.
    pub jwt_secret: Option<String>,
    /// PEM files of public keys of client tokens (RSA, EC or Ed25519).
    pub jwt_public_key: Vec<PathBuf>,
    /// JWKS URL whose keys verify client tokens (fetched, cached, fetched
    /// again for an unknown `kid`).
    pub jwks_url: Option<String>,
    /// Least time between two JWKS fetches for unknown key ids.
    #[serde(with = "humantime_serde")]
    pub jwks_refetch_interval: Duration,
    /// Accepted `aud` values of client tokens (any when empty).
    pub jwt_audience: Vec<String>,
    /// Accepted `iss` values of client tokens (any when empty).
    pub jwt_issuer: Vec<String>,
    /// Clock skew allowed when checking `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// Cookie that may carry the client token.
    pub jwt_cookie: Option<String>,
    /// With a key configured, still accept clients without a token.
    pub allow_anonymous: bool,
    /// Messages per second a client may send (0: unlimited); bursts of two
    /// seconds' worth pass.
    pub client_message_rate: u32,
    /// Bytes per second a client may send (0: unlimited).
    pub client_byte_rate: u64,
    /// How long before its token expires a native client is asked to
    /// `refresh` it.
    #[serde(with = "humantime_serde")]
    pub token_refresh_notice: Duration,
    /// Web origins whose pages may open connections (`Origin` header):
    /// `scheme://host[:port]`, the host may start with `*.` for any
    /// subdomain. Empty: any. Requests without `Origin` (not from a
    /// browser) are not affected.
    pub allowed_origins: Vec<String>,
    /// PEM certificate chain: both listeners speak TLS (needs `tls-key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls-cert` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// How often the two files are checked for changes; a changed pair is
    /// loaded for new handshakes without a restart (0s: never).
    #[serde(with = "humantime_serde")]
    pub tls_reload_interval: Duration,
    /// Oldest TLS version accepted: `1.2` or `1.3`.
    pub tls_min_version: TlsVersion,
    /// Accept API keys on a control listener that is neither loopback nor
    /// TLS (keys would cross the network in clear text).
    pub control_allow_plaintext: bool,
    /// Control listener: time allowed for a request head, from its first
    /// byte (or from the accept, for a new connection) to its end. A head
    /// begun and not finished gets a 408 `request_timeout`; a connection
    /// that sent nothing is closed without an answer.
    #[serde(with = "humantime_serde")]
    pub control_header_timeout: Duration,
    /// Control listener: time allowed to receive a request's whole body,
    /// from the end of its head (408 `request_timeout`, then closed).
    #[serde(with = "humantime_serde")]
    pub control_body_timeout: Duration,
    /// Control listener: a keep-alive connection with no request in
    /// progress for this long is closed (without an answer).
    #[serde(with = "humantime_serde")]
    pub control_idle_timeout: Duration,
    /// Control listener: most connections open at once; one more gets a 503
    /// `too_many_connections` (plain HTTP) or is closed before its TLS
    /// handshake.
    pub control_max_connections: usize,
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
    /// Longest a long-poll waits for pushes; also how long a long-poll
    /// session may go without a waiting poll (`docs/fallbacks.md`).
    #[serde(with = "humantime_serde")]
    pub poll_timeout: Duration,
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
    /// Handshakes per second one IP address may start, in bursts of two
    /// seconds' worth (429 beyond, or the socket closed before TLS; 0: no limit).
    pub max_handshakes_per_ip: u32,
    /// Open connections per user, by the token's `sub` (429 beyond; 0: no cap).
    pub max_connections_per_user: u32,
    /// Bytes queued for one client before it is closed as a slow consumer (4001).
    pub max_outbound_bytes: usize,
    /// Upper bound of a graceful drain.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Window over which draining closes clients (1012), so they do not all
    /// reconnect at once.
    #[serde(with = "humantime_serde")]
    pub drain_spread: Duration,
    /// How long a native client's session outlives a lost connection,
    /// waiting for a resume (0s: no sessions).
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Most direct messages a session keeps unacknowledged (for a resume).
    pub session_outbox_messages: u32,
    /// Most bytes of direct messages a session keeps unacknowledged.
    pub session_outbox_bytes: u32,
    /// Send the origin `suspend` and `resume` events.
    pub session_events: bool,
    /// The origin's GraphQL-over-HTTP endpoint: clients may speak the
    /// GraphQL over WebSocket subprotocols (`docs/graphql.md`).
    pub graphql_endpoint: Option<String>,
    /// Time from the 101 to a GraphQL client's `connection_init`.
    #[serde(with = "humantime_serde")]
    pub graphql_init_timeout: Duration,
    /// GraphQL operations one connection may run at once.
    pub graphql_max_operations: usize,
    /// Requests this node has in flight to the GraphQL endpoint at once.
    pub graphql_concurrency: usize,
    /// Timeout of one request to the GraphQL endpoint.
    #[serde(with = "humantime_serde")]
    pub graphql_timeout: Duration,
    /// Do not send a re-executed subscription result equal to the last one.
    pub graphql_suppress_unchanged: bool,
    /// Channel namespaces, each `NAME[:OPTION,...]` (see [`Namespace`]). A
    /// channel `ns:room` exists only if namespace `ns` is configured.
    pub namespace: Vec<Namespace>,
    /// Most channels one connection may be subscribed to.
    pub max_subscriptions: usize,
    /// Longest channel name accepted, in bytes (at most 255).
    pub max_channel_length: usize,
    /// Most header lines in a request head (431 beyond; at most 256).
    pub max_header_count: usize,
}

impl Config {
    /// Whether the origin is reached over NATS (`origin = "nats"`).
    pub fn origin_is_nats(&self) -> bool {
        self.origin.as_deref() == Some(NATS_ORIGIN)
    }

    /// Whether the origin is reached over Redis Streams (`origin = "redis"`).
    pub fn origin_is_redis(&self) -> bool {
        self.origin.as_deref() == Some(REDIS_ORIGIN)
    }

    /// Whether the origin is reached over a cluster backend (NATS or Redis)
    /// rather than an HTTP webhook.
    pub fn origin_is_bus(&self) -> bool {
        self.origin_is_nats() || self.origin_is_redis()
    }
}

/// The oldest TLS version a listener accepts (`tls-min-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

/// The `origin` value selecting the NATS origin transport.
pub const NATS_ORIGIN: &str = "nats";

/// The `origin` value selecting the Redis Streams origin transport.
pub const REDIS_ORIGIN: &str = "redis";

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
            jwt_secret: None,
            jwt_public_key: Vec::new(),
            jwks_url: None,
            jwks_refetch_interval: Duration::from_secs(10),
            jwt_audience: Vec::new(),
            jwt_issuer: Vec::new(),
            jwt_leeway: Duration::from_secs(5),
            jwt_cookie: None,
            allow_anonymous: false,
            token_refresh_notice: Duration::from_secs(30),
            client_message_rate: 100,
            client_byte_rate: 1024 * 1024,
            allowed_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_reload_interval: Duration::from_secs(10),
            tls_min_version: TlsVersion::V1_2,
            control_allow_plaintext: false,
            control_header_timeout: Duration::from_secs(10),
            control_body_timeout: Duration::from_secs(30),
            control_idle_timeout: Duration::from_secs(60),
            control_max_connections: 1024,
            subprotocol: Vec::new(),
            permessage_deflate: false,
            forward_header: ["user-agent", "origin", "accept-language", "x-forwarded-for"]
                .map(String::from)
                .to_vec(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            poll_timeout: Duration::from_secs(25),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_message_size: 1 << 20,
            max_header_bytes: 8 << 10,
            max_connections: 1_000_000,
            max_connections_per_ip: 10_000,
            max_handshakes_per_ip: 100,
            max_connections_per_user: 100,
            max_outbound_bytes: 512 << 10,
            drain_timeout: Duration::from_secs(30),
            drain_spread: Duration::from_secs(5),
            session_ttl: Duration::from_secs(120),
            session_outbox_messages: 1_000,
            session_outbox_bytes: 256 << 10,
            session_events: false,
            graphql_endpoint: None,
            graphql_init_timeout: Duration::from_secs(10),
            graphql_max_operations: 100,
            graphql_concurrency: 64,
            graphql_timeout: Duration::from_secs(10),
            graphql_suppress_unchanged: false,
            namespace: Vec::new(),
            max_subscriptions: 128,
            max_channel_length: 255,
            max_header_count: 64,
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

impl ConfigError {
    /// `field` (its kebab-case name) cannot be used, because `problem`.
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

fn bad(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::new(field, problem)
}

impl Config {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.node_id {
            switchboard_proto::NodeId::new(id).map_err(|e| bad("node-id", e.to_string()))?;
        }
        // `nats` is carried by a backend, checked by whoever binds the node
        // with it; anything else is a webhook URL.
        if let Some(origin) = self.origin.as_ref().filter(|_| !self.origin_is_bus()) {
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
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(bad(
                if self.tls_cert.is_some() {
                    "tls-key"
                } else {
                    "tls-cert"
                },
                "tls-cert and tls-key go together",
            ));
        }
        if !self.control_listen.ip().is_loopback()
            && self.tls_cert.is_none()
            && !self.control_allow_plaintext
        {
            return Err(bad(
                "control-listen",
                "API keys on a non-loopback address need TLS (tls-cert, tls-key); \
                 set control-allow-plaintext if the network is private",
            ));
        }
        if self.tls_reload_interval > MAX_DURATION {
            return Err(bad("tls-reload-interval", "must not exceed 7 days"));
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
            (
                "session-outbox-messages",
                self.session_outbox_messages as usize,
            ),
            ("session-outbox-bytes", self.session_outbox_bytes as usize),
            ("control-max-connections", self.control_max_connections),
        ] {
            if v == 0 {
                return Err(bad(field, "must be greater than 0"));
            }
        }
        if self.session_outbox_messages > u32::from(u16::MAX) {
            return Err(bad("session-outbox-messages", "must be at most 65535"));
        }
        if self.session_outbox_bytes > 64 << 20 {
            return Err(bad(
                "session-outbox-bytes",
                "must be at most 67108864 (64 MiB)",
            ));
        }
        if let Some(url) = &self.graphql_endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || reqwest::Url::parse(url).is_err()
            {
                return Err(bad(
                    "graphql-endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if self.graphql_max_operations == 0 || self.graphql_concurrency == 0 {
            return Err(bad(
                "graphql-max-operations",
                "graphql-max-operations and graphql-concurrency must be at least 1",
            ));
        }
        if self.max_header_bytes < 256 {
            return Err(bad("max-header-bytes", "must be at least 256"));
        }
        if !(8..=switchboard_proto::ws::handshake::MAX_HEADERS_LIMIT)
            .contains(&self.max_header_count)
        {
            return Err(bad("max-header-count", "must be 8..=256"));
        }
        if !(3..=switchboard_proto::native::MAX_CHANNEL_LEN).contains(&self.max_channel_length) {
            return Err(bad("max-channel-length", "must be 3..=255"));
        }
        for (field, d) in [
            ("ping-interval", self.ping_interval),
            ("pong-timeout", self.pong_timeout),
            ("poll-timeout", self.poll_timeout),
            ("handshake-timeout", self.handshake_timeout),
            ("graphql-init-timeout", self.graphql_init_timeout),
            ("graphql-timeout", self.graphql_timeout),
            ("origin-timeout", self.origin_timeout),
            ("origin-retry-initial", self.origin_retry_initial),
            ("control-header-timeout", self.control_header_timeout),
            ("control-body-timeout", self.control_body_timeout),
            ("control-idle-timeout", self.control_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(bad(field, "must be greater than 0"));
            }
        }
        for (field, d) in [
            ("ping-interval", self.ping_interval),
            ("pong-timeout", self.pong_timeout),
            ("poll-timeout", self.poll_timeout),
            ("handshake-timeout", self.handshake_timeout),
            ("graphql-init-timeout", self.graphql_init_timeout),
            ("graphql-timeout", self.graphql_timeout),
            ("origin-timeout", self.origin_timeout),
            ("origin-retry-max", self.origin_retry_max),
            ("origin-batch-linger", self.origin_batch_linger),
            ("keepalive-interval", self.keepalive_interval),
            ("drain-timeout", self.drain_timeout),
            ("session-ttl", self.session_ttl),
            ("idle-timeout", self.idle_timeout.unwrap_or_default()),
            ("control-header-timeout", self.control_header_timeout),
            ("control-body-timeout", self.control_body_timeout),
            ("control-idle-timeout", self.control_idle_timeout),
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
        for (i, ns) in self.namespace.iter().enumerate() {
            if self.namespace[..i].iter().any(|o| o.name == ns.name) {
                return Err(bad(
                    "namespace",
                    format!("namespace `{}` is configured twice", ns.name),
                ));
            }
        }
        if let Some(bad_pattern) = self
            .allowed_origins
            .iter()
            .find(|p| crate::allowed_origins::OriginPattern::parse(p).is_none())
        {
            return Err(bad(
                "allowed-origins",
                format!("`{bad_pattern}` is not `scheme://host[:port]` (the host may start with `*.`) or `null`"),
            ));
        }
        if self.jwt_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err(bad("jwt-secret", "must be at least 32 bytes"));
        }
        if self
            .jwks_url
            .as_ref()
            .is_some_and(|u| !(u.starts_with("https://") || u.starts_with("http://")))
        {
            return Err(bad("jwks-url", "must be an http:// or https:// URL"));
        }
        if self.jwt_leeway > Duration::from_secs(300) {
            return Err(bad("jwt-leeway", "must be at most 5m"));
        }
        if self.max_subscriptions == 0 {
            return Err(bad("max-subscriptions", "must be greater than 0"));
        }
        if self.drain_spread > self.drain_timeout {
            return Err(bad("drain-spread", "must not exceed drain-timeout"));
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
        // Keys on a non-loopback listener: TLS, or an explicit opt-out.
        assert_eq!(c.validate().unwrap_err().field, "control-listen");
        c.control_allow_plaintext = true;
        c.validate().unwrap();
        c.control_allow_plaintext = false;
        c.tls_cert = Some("cert.pem".into());
        assert_eq!(c.validate().unwrap_err().field, "tls-key");
        c.tls_key = Some("key.pem".into());
        c.validate().unwrap();
        c.origin = Some("ftp://x".into());
        assert_eq!(c.validate().unwrap_err().field, "origin");
        let c = Config {
            node_id: Some("a b".into()),
            ..Config::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "node-id");
        let bad: Result<Config, _> = serde_json::from_str(r#"{"no-such-key": 1}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn namespaces_parse_print_and_refuse_nonsense() {
        let ns: Namespace =
            "chat:history-size=100,history-ttl=5m,presence,join-leave,publish,publish-to-origin"
                .parse()
                .unwrap();
        assert!(ns.publish_to_origin);
        assert_eq!(ns.history_size, 100);
        assert_eq!(ns.history_ttl, Duration::from_secs(300));
        assert!(ns.presence && ns.join_leave && ns.client_publish && !ns.client_subscribe);
        assert_eq!(ns.to_string().parse::<Namespace>().unwrap(), ns);
        let bare: Namespace = "feed".parse().unwrap();
        assert_eq!(bare, Namespace::new("feed"));
        for bad in [
            "",
            "a b:presence",
            "chat:colour=red",
            "chat:history-size=x",
            "chat:join-leave",
            "chat:history-ttl=0s",
            "chat:presence=maybe",
            "chat:publish-to-origin",
        ] {
            assert!(bad.parse::<Namespace>().is_err(), "{bad:?}");
        }
        let c: Config = serde_json::from_str(r#"{"namespace": ["a:presence", "b"]}"#).unwrap();
        assert_eq!(c.namespace.len(), 2);
        let twice = Config {
            namespace: vec![Namespace::new("a"), Namespace::new("a")],
            ..Config::default()
        };
        assert_eq!(twice.validate().unwrap_err().field, "namespace");
    }
}
