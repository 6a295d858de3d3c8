//! The cluster backend: its settings (the `nats*`, `cluster-*` and
//! `channel-log-replicas` keys, which the gateway library does not know),
//! their checks, and joining a bound node to NATS. Only the binary knows
//! both the gateway and a backend.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use switchboard_proto::NodeId;
use switchboard_server::config::MAX_DURATION;
use switchboard_server::{BeatThread, BindOptions, Config, ConfigError, Gateway, GatewayError};

/// The settings of the cluster backend. Keys as in the TOML file and the
/// flags; `docs/configuration.md` documents each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct ClusterSettings {
    /// NATS server URL(s), comma-separated: join a cluster. Absent: single node.
    pub(crate) nats: Option<String>,
    /// Subject prefix of every NATS subject, so clusters can share one NATS.
    pub(crate) nats_prefix: String,
    /// NATS credentials file (JWT and nkey seed, `.creds`).
    pub(crate) nats_creds: Option<PathBuf>,
    /// File holding an nkey seed to authenticate to NATS with.
    pub(crate) nats_nkey: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server with.
    pub(crate) nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS.
    pub(crate) nats_tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for NATS mutual TLS.
    pub(crate) nats_tls_key: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS.
    pub(crate) nats_tls_required: bool,
    /// With `origin = "nats"`: publish events through this JetStream stream
    /// (created if missing) and wait for its acks, so they are durable.
    pub(crate) nats_event_stream: Option<String>,
    /// Redis URL: join a cluster over Redis instead of NATS.
    pub(crate) redis: Option<String>,
    /// Prefix of every Redis key and pub/sub channel.
    pub(crate) redis_prefix: String,
    /// CA certificate (PEM) to verify a `rediss://` Redis with.
    pub(crate) redis_tls_ca: Option<PathBuf>,
    /// With `origin = "redis"`: event streams, by connection id.
    pub(crate) redis_event_partitions: u32,
    /// With `origin = "redis"`: entries each event stream keeps, about.
    pub(crate) redis_event_stream_max_len: u64,
    /// How often a node announces itself to the cluster.
    #[serde(with = "humantime_serde")]
    pub(crate) cluster_heartbeat: Duration,
    /// A node not heard from for this long is considered dead.
    #[serde(with = "humantime_serde")]
    pub(crate) cluster_heartbeat_timeout: Duration,
    /// Time allowed for another node (or the channel log) to answer.
    #[serde(with = "humantime_serde")]
    pub(crate) cluster_request_timeout: Duration,
    /// Replicas of the JetStream streams keeping channel logs.
    pub(crate) channel_log_replicas: usize,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            nats: None,
            nats_prefix: "switchboard".into(),
            nats_creds: None,
            nats_nkey: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_required: false,
            nats_event_stream: None,
            redis: None,
            redis_prefix: "switchboard".into(),
            redis_tls_ca: None,
            redis_event_partitions: 1,
            redis_event_stream_max_len: 1_000_000,
            cluster_heartbeat: Duration::from_secs(1),
            cluster_heartbeat_timeout: Duration::from_secs(5),
            cluster_request_timeout: Duration::from_millis(1500),
            channel_log_replicas: 1,
        }
    }
}

impl ClusterSettings {
    /// Whether a configuration key is one of these settings.
    pub(crate) fn owns(key: &str) -> bool {
        key == "nats"
            || key.starts_with("nats-")
            || key == "redis"
            || key.starts_with("redis-")
            || key.starts_with("cluster-")
            || key == "channel-log-replicas"
    }

    /// Checks values that parse but cannot work, with the node's `config`.
    pub(crate) fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        if config.origin_is_nats() && self.nats.is_none() {
            return Err(ConfigError::new(
                "origin",
                "`nats` needs the `nats` setting",
            ));
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !self.nats_prefix.split('.').all(token_ok) || self.nats_prefix.len() > 64 {
            return Err(ConfigError::new(
                "nats-prefix",
                "must be up to 64 characters: tokens of [A-Za-z0-9_-] joined by '.'",
            ));
        }
        if let Some(stream) = &self.nats_event_stream {
            if !token_ok(stream) || stream.len() > 64 {
                return Err(ConfigError::new(
                    "nats-event-stream",
                    "must be 1-64 characters of [A-Za-z0-9_-]",
                ));
            }
            if !config.origin_is_nats() {
                return Err(ConfigError::new(
                    "nats-event-stream",
                    "only applies with origin = \"nats\"",
                ));
            }
        }
        if config.origin_is_redis() && self.redis.is_none() {
            return Err(ConfigError::new(
                "origin",
                "`redis` needs the `redis` setting",
            ));
        }
        if !(1..=1024).contains(&self.redis_event_partitions) {
            return Err(ConfigError::new(
                "redis-event-partitions",
                "must be between 1 and 1024",
            ));
        }
        if self.redis_event_stream_max_len == 0 {
            return Err(ConfigError::new(
                "redis-event-stream-max-len",
                "must be at least 1",
            ));
        }
        if self.nats.is_some() && self.redis.is_some() {
            return Err(ConfigError::new(
                "redis",
                "join one cluster: `nats` or `redis`, not both",
            ));
        }
        if let Some(url) = &self.redis {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    "redis",
                    "must be a redis:// or rediss:// URL",
                ));
            }
        }
        if self.redis_tls_ca.is_some()
            && !self
                .redis
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
        {
            return Err(ConfigError::new(
                "redis-tls-ca",
                "only applies with a rediss:// `redis` URL",
            ));
        }
        let prefix_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        };
        if !prefix_ok(&self.redis_prefix) {
            return Err(ConfigError::new(
                "redis-prefix",
                "must be 1-64 characters of [A-Za-z0-9_.:-]",
            ));
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            return Err(ConfigError::new(
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
                return Err(ConfigError::new(field, "must be between 10ms and 7 days"));
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
                    return Err(ConfigError::new(field, "only applies with `nats`"));
                }
            }
        }
        if self.cluster_heartbeat_timeout < self.cluster_heartbeat * 2 {
            return Err(ConfigError::new(
                "cluster-heartbeat-timeout",
                "must be at least twice cluster-heartbeat",
            ));
        }
        if ![1, 3, 5].contains(&self.channel_log_replicas) {
            return Err(ConfigError::new(
                "channel-log-replicas",
                "must be 1, 3 or 5",
            ));
        }
        Ok(())
    }

    /// The NATS backend's settings, for a node with `config`.
    fn nats_config(&self, config: &Config) -> switchboard_nats::NatsConfig {
        switchboard_nats::NatsConfig {
            prefix: self.nats_prefix.clone(),
            creds: self.nats_creds.clone(),
            nkey: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_required: self.nats_tls_required,
            heartbeat: self.cluster_heartbeat,
            heartbeat_timeout: self.cluster_heartbeat_timeout,
            request_timeout: self.cluster_request_timeout,
            namespaces: config.namespace.clone(),
            channel_log_replicas: self.channel_log_replicas,
            event_stream: self.nats_event_stream.clone(),
            origin_timeout: config.origin_timeout,
            session_messages: config.session_outbox_messages,
            ..switchboard_nats::NatsConfig::new(self.nats.clone().unwrap_or_default())
        }
    }
}

impl ClusterSettings {
    /// The Redis backend's settings, for a node with `config`.
    fn redis_config(&self, config: &Config) -> switchboard_redis::RedisConfig {
        switchboard_redis::RedisConfig {
            prefix: self.redis_prefix.clone(),
            tls_ca: self.redis_tls_ca.clone(),
            heartbeat: self.cluster_heartbeat,
            heartbeat_timeout: self.cluster_heartbeat_timeout,
            request_timeout: self.cluster_request_timeout,
            namespaces: config.namespace.clone(),
            session_messages: config.session_outbox_messages,
            origin_timeout: config.origin_timeout,
            event_partitions: self.redis_event_partitions,
            event_stream_max_len: self.redis_event_stream_max_len,
            ..switchboard_redis::RedisConfig::new(self.redis.clone().unwrap_or_default())
        }
    }
}

/// Why the node could not start.
pub(crate) enum Startup {
    /// The configuration cannot work (exit 64).
    Config(String),
    /// Anything else (exit 1).
    Other(String),
}

/// A bound node, and the thread its cluster membership runs on (kept for
/// as long as the node runs).
pub(crate) struct Bound {
    /// The node.
    pub(crate) gateway: Gateway,
    /// The cluster backend's heartbeats and their connection, away from
    /// client work (`None` on a single node).
    _beats: Option<BeatThread>,
}

/// Starts the thread the cluster backend's membership runs on.
fn beat_thread() -> Result<BeatThread, Startup> {
    BeatThread::start("sb-heartbeats")
        .map_err(|e| Startup::Other(format!("cannot start the heartbeat thread: {e}")))
}

/// Binds the node; with `nats` set, connects to NATS first (for the NATS
/// origin) and joins the cluster.
pub(crate) async fn bind(config: Config, cluster: &ClusterSettings) -> Result<Bound, Startup> {
    let failed = |e: GatewayError| match e {
        GatewayError::Config(e) => Startup::Config(e.to_string()),
        other => Startup::Other(other.to_string()),
    };
    if cluster.nats.is_none() && cluster.redis.is_none() {
        let gateway = Gateway::bind(config).await.map_err(failed)?;
        return Ok(Bound {
            gateway,
            _beats: None,
        });
    }
    // The node id is needed before binding: NATS connection name, origin header.
    let config = Config {
        node_id: Some(
            config
                .node_id
                .clone()
                .unwrap_or_else(|| NodeId::random().to_string()),
        ),
        ..config
    };
    if cluster.redis.is_some() {
        return bind_redis(config, cluster).await;
    }
    let node = config.node_id.clone().unwrap_or_default();
    let nats = cluster.nats_config(&config);
    let (client, link) = switchboard_nats::connect(&nats, &node)
        .await
        .map_err(|e| Startup::Other(e.to_string()))?;
    // Heartbeats have a connection of their own, made from the beat thread
    // so that its I/O runs there.
    let beats = beat_thread()?;
    let (beat_client, beat_link) = {
        let (nats, name) = (nats.clone(), format!("{node}-membership"));
        beats
            .run(async move { switchboard_nats::connect(&nats, &name).await })
            .await
            .map_err(|e| Startup::Other(e.to_string()))?
    };
    // Give the first connection a moment, so a node that can reach NATS
    // does not turn clients away (origin over NATS) in its first instant;
    // one that cannot starts anyway and keeps trying.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !link.is_up() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !link.is_up() {
        tracing::warn!("NATS not reachable yet; serving local clients and still trying");
    }
    let transport: Option<Arc<dyn switchboard_server::origin::OriginTransport>> =
        if config.origin_is_nats() {
            Some(Arc::new(switchboard_nats::NatsOrigin::new(
                client.clone(),
                link.clone(),
                &nats,
                &node,
            )))
        } else {
            None
        };
    let config_session_ttl = config.session_ttl;
    let options = BindOptions {
        transport,
        backend_fds: switchboard_server::fds::CLUSTER_RESERVE,
    };
    let gateway = Gateway::bind_with(config, options).await.map_err(failed)?;
    let local: Arc<dyn switchboard_server::Node> = Arc::new(gateway.local_node());
    let cluster = switchboard_nats::NatsCluster::start(
        client.clone(),
        link,
        local.clone(),
        nats.clone(),
        switchboard_nats::BeatConnection {
            client: beat_client,
            link: beat_link,
            runtime: beats.handle().clone(),
        },
    )
    .await
    .map_err(|e| Startup::Other(format!("cannot subscribe on NATS: {e}")))?;
    gateway.join_cluster(cluster.clone());
    if !config_session_ttl.is_zero() {
        // Sessions outlive their node: their state lives in JetStream.
        let store = switchboard_nats::NatsSessions::new(client.clone(), nats.clone());
        gateway.join_session_store(Arc::new(store));
    }
    if !nats.namespaces.is_empty() {
        // Channels span the cluster: their logs live in JetStream.
        let channels = switchboard_nats::NatsChannels::start(client, local, nats, cluster)
            .await
            .map_err(|e| Startup::Other(format!("cannot subscribe on NATS: {e}")))?;
        gateway.join_channel_bus(channels);
    }
    Ok(Bound {
        gateway,
        _beats: Some(beats),
    })
}

/// Binds the node and joins it to the cluster over Redis: membership and
/// commands, the session store (with sessions), channels (with namespaces).
async fn bind_redis(config: Config, cluster: &ClusterSettings) -> Result<Bound, Startup> {
    let failed = |e: GatewayError| match e {
        GatewayError::Config(e) => Startup::Config(e.to_string()),
        other => Startup::Other(other.to_string()),
    };
    let settings = cluster.redis_config(&config);
    // The membership connection is first used (and so driven, and
    // reconnected) by the heartbeat task on the beat thread.
    let beats = beat_thread()?;
    let redis = switchboard_redis::connect(&settings).map_err(|e| match e {
        switchboard_redis::RedisError::Url(_) | switchboard_redis::RedisError::File { .. } => {
            Startup::Config(e.to_string())
        }
        other => Startup::Other(other.to_string()),
    })?;
    // Give the first connection a moment, so a node that can reach Redis
    // does not refuse its first publishes; one that cannot starts anyway
    // and keeps trying.
    if !redis.ping(Duration::from_secs(5)).await {
        tracing::warn!("Redis not reachable yet; serving local clients and still trying");
    }
    let session_ttl = config.session_ttl;
    let transport: Option<Arc<dyn switchboard_server::origin::OriginTransport>> =
        if config.origin_is_redis() {
            let node = config.node_id.clone().unwrap_or_default();
            Some(
                switchboard_redis::RedisOrigin::start(
                    redis.clone(),
                    &settings,
                    &node,
                    Duration::from_secs(5),
                )
                .await,
            )
        } else {
            None
        };
    let options = BindOptions {
        transport,
        backend_fds: switchboard_server::fds::CLUSTER_RESERVE,
    };
    let gateway = Gateway::bind_with(config, options).await.map_err(failed)?;
    let local: Arc<dyn switchboard_server::Node> = Arc::new(gateway.local_node());
    let joined = switchboard_redis::RedisCluster::start(
        redis.clone(),
        local.clone(),
        settings.clone(),
        beats.handle(),
    );
    gateway.join_cluster(joined.clone());
    // The origin's commands from the control stream.
    switchboard_redis::RedisControl::start(redis.clone(), local.clone(), &settings);
    if !session_ttl.is_zero() {
        // Sessions outlive their node: their state lives in Redis.
        let store = switchboard_redis::RedisSessions::new(redis.clone(), &settings);
        gateway.join_session_store(Arc::new(store));
    }
    if !settings.namespaces.is_empty() {
        // Channels span the cluster: their logs live in Redis.
        let channels = switchboard_redis::RedisChannels::start(redis, local, settings, joined);
        gateway.join_channel_bus(channels);
    }
    Ok(Bound {
        gateway,
        _beats: Some(beats),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_settings_that_cannot_work_are_refused() {
        let config = Config::default();
        let nats = || ClusterSettings {
            nats: Some("nats://127.0.0.1:4222".into()),
            ..ClusterSettings::default()
        };
        ClusterSettings::default().validate(&config).unwrap();
        nats().validate(&config).unwrap();
        let on_nats = Config {
            origin: Some("nats".into()),
            ..Config::default()
        };
        let err = |s: ClusterSettings, c: &Config| s.validate(c).unwrap_err().field;
        assert_eq!(err(ClusterSettings::default(), &on_nats), "origin");
        nats().validate(&on_nats).unwrap();
        let prefix = ClusterSettings {
            nats_prefix: "a..b".into(),
            ..nats()
        };
        assert_eq!(err(prefix, &config), "nats-prefix");
        let beat = ClusterSettings {
            cluster_heartbeat_timeout: Duration::from_millis(1500),
            ..nats()
        };
        assert_eq!(err(beat, &config), "cluster-heartbeat-timeout");
        let replicas = ClusterSettings {
            channel_log_replicas: 2,
            ..nats()
        };
        assert_eq!(err(replicas, &config), "channel-log-replicas");
        let creds = ClusterSettings {
            nats_creds: Some("x.creds".into()),
            ..ClusterSettings::default()
        };
        assert_eq!(err(creds, &config), "nats-creds");
        let stream = ClusterSettings {
            nats_event_stream: Some("EVENTS".into()),
            ..nats()
        };
        assert_eq!(err(stream, &config), "nats-event-stream");
        let redis = |url: &str| ClusterSettings {
            redis: Some(url.into()),
            ..ClusterSettings::default()
        };
        redis("redis://127.0.0.1:6379/0").validate(&config).unwrap();
        let both = ClusterSettings {
            nats: Some("nats://127.0.0.1:4222".into()),
            ..redis("redis://127.0.0.1:6379/0")
        };
        assert_eq!(err(both, &config), "redis");
        assert_eq!(err(redis("http://x"), &config), "redis");
        let ca = |url: &str| ClusterSettings {
            redis_tls_ca: Some("ca.pem".into()),
            ..redis(url)
        };
        assert_eq!(err(ca("redis://h:6379/0"), &config), "redis-tls-ca");
        ca("rediss://h:6379/0").validate(&config).unwrap();
        let on_redis = Config {
            origin: Some("redis".into()),
            ..Config::default()
        };
        assert_eq!(err(ClusterSettings::default(), &on_redis), "origin");
        redis("redis://h:6379/0").validate(&on_redis).unwrap();
        assert!(ClusterSettings::owns("redis") && ClusterSettings::owns("redis-tls-ca"));
        assert!(ClusterSettings::owns("nats-prefix") && ClusterSettings::owns("nats"));
        assert!(!ClusterSettings::owns("namespace") && !ClusterSettings::owns("origin"));
    }
}
