//! Command-line arguments and configuration loading.
//!
//! Every `serve` option exists three ways: `--flag`, `SWITCHBOARD_FLAG`, and the
//! `flag` key of the TOML file given with `--config`; a flag beats the
//! environment, which beats the file, which beats the default.

use crate::backend::ClusterSettings;
use clap::{Parser, Subcommand};
use serde::Serialize;
use switchboard_server::Config;

/// Switchboard, a WebSocket gateway: it holds your clients' WebSocket
/// connections and talks to your application (the origin) through HTTP
/// webhooks and a control API.
#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version = env!("CARGO_PKG_VERSION"),
    long_version = crate::build_info::LONG_VERSION
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a gateway node.
    Serve(Box<ServeArgs>),
    /// Ask a node's health endpoint; exit 0 on a 2xx answer, 1 otherwise
    /// (a container HEALTHCHECK that needs neither a shell nor curl).
    Healthcheck(HealthcheckArgs),
}

/// Options of `switchboard healthcheck`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HealthcheckArgs {
    /// URL to ask; `/readyz` instead of `/healthz` checks readiness.
    #[arg(
        long,
        env = "SWITCHBOARD_HEALTHCHECK_URL",
        value_name = "URL",
        default_value = "http://127.0.0.1:8081/healthz"
    )]
    pub(crate) url: String,

    /// Seconds to wait for the whole answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 3)]
    pub(crate) timeout: u64,

    /// With an https URL, accept any certificate (the node's own name is
    /// rarely the loopback address the check uses).
    #[arg(long)]
    pub(crate) insecure: bool,
}

/// Options of `switchboard serve`. Field names match `Config` keys.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) struct ServeArgs {
    /// TOML configuration file (keys are the option names without `--`).
    #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub(crate) config: Option<std::path::PathBuf>,

    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    #[serde(skip)]
    pub(crate) check: bool,

    /// Log filter, e.g. `info` or `switchboard_server=debug` [default: info].
    #[arg(long, env = "SWITCHBOARD_LOG_LEVEL", value_name = "FILTER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) log_level: Option<String>,

    /// Log format: `auto` (text on a terminal, JSON otherwise), `json` or `text` [default: auto].
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) log_format: Option<String>,

    /// Client WebSocket listener [default: 0.0.0.0:8080].
    #[arg(long, env = "SWITCHBOARD_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,

    /// Control API and operations listener [default: 127.0.0.1:8081].
    #[arg(long, env = "SWITCHBOARD_CONTROL_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    control_listen: Option<String>,

    /// This node's id, 1-32 of [A-Za-z0-9_-] [default: random].
    #[arg(long, env = "SWITCHBOARD_NODE_ID", value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,

    /// Origin webhook URL; without it the node runs in dev mode (accept all, discard events).
    #[arg(long, env = "SWITCHBOARD_ORIGIN", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<String>,

    /// Secret for the HMAC-SHA256 signature of origin requests.
    #[arg(
        long,
        env = "SWITCHBOARD_ORIGIN_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_secret: Option<String>,

    /// Timeout of one origin request [default: 10s].
    #[arg(long, env = "SWITCHBOARD_ORIGIN_TIMEOUT", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_timeout: Option<String>,

    /// Origin requests in flight at once (event lanes) [default: 16].
    #[arg(long, env = "SWITCHBOARD_ORIGIN_CONCURRENCY", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_concurrency: Option<usize>,

    /// Most events in one origin request [default: 100].
    #[arg(long, env = "SWITCHBOARD_ORIGIN_BATCH_SIZE", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_batch_size: Option<usize>,

    /// Wait for more events before sending a partial batch [default: 0s].
    #[arg(long, env = "SWITCHBOARD_ORIGIN_BATCH_LINGER", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_batch_linger: Option<String>,

    /// First retry delay for origin requests, doubled each retry with jitter [default: 100ms].
    #[arg(
        long,
        env = "SWITCHBOARD_ORIGIN_RETRY_INITIAL",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_retry_initial: Option<String>,

    /// Longest retry delay for origin requests [default: 10s].
    #[arg(long, env = "SWITCHBOARD_ORIGIN_RETRY_MAX", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_retry_max: Option<String>,

    /// Events waiting for the origin, node-wide [default: 100000].
    #[arg(long, env = "SWITCHBOARD_ORIGIN_QUEUE_SIZE", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_queue_size: Option<usize>,

    /// Bytes of event JSON waiting for the origin, node-wide [default: 268435456].
    #[arg(long, env = "SWITCHBOARD_ORIGIN_QUEUE_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_queue_bytes: Option<usize>,

    /// Events waiting for the origin per connection; past it the connection closes with 4002 [default: 1000].
    #[arg(long, env = "SWITCHBOARD_MAX_PENDING_EVENTS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_pending_events: Option<usize>,

    /// Interval of keepalive events listing live connections; 0s disables [default: 30s].
    #[arg(long, env = "SWITCHBOARD_KEEPALIVE_INTERVAL", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    keepalive_interval: Option<String>,

    /// Control API key (repeatable, for rotation; comma-separated in the environment).
    #[arg(
        long,
        env = "SWITCHBOARD_API_KEY",
        value_name = "KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<Vec<String>>,

    /// HMAC secret (at least 32 bytes) that signs client tokens (HS256/384/512); with any key, clients need a token.
    #[arg(
        long,
        env = "SWITCHBOARD_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_secret: Option<String>,

    /// PEM file of a public key that signs client tokens: RSA (RS*/PS*), EC (ES256/384) or Ed25519 (EdDSA); repeatable.
    #[arg(
        long,
        env = "SWITCHBOARD_JWT_PUBLIC_KEY",
        value_name = "FILE",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_public_key: Option<Vec<std::path::PathBuf>>,

    /// JWKS URL whose keys sign client tokens (cached 5 min; fetched again for an unknown `kid`, at most every jwks-refetch-interval).
    #[arg(long, env = "SWITCHBOARD_JWKS_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    jwks_url: Option<String>,

    /// Least time between two JWKS fetches for tokens with an unknown `kid` [default: 10s].
    #[arg(
        long,
        env = "SWITCHBOARD_JWKS_REFETCH_INTERVAL",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    jwks_refetch_interval: Option<String>,

    /// Accepted `aud` of client tokens (repeatable) [default: any].
    #[arg(
        long,
        env = "SWITCHBOARD_JWT_AUDIENCE",
        value_name = "AUD",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_audience: Option<Vec<String>>,

    /// Accepted `iss` of client tokens (repeatable) [default: any].
    #[arg(
        long,
        env = "SWITCHBOARD_JWT_ISSUER",
        value_name = "ISS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_issuer: Option<Vec<String>>,

    /// Clock skew allowed for `exp` and `nbf` [default: 5s].
    #[arg(long, env = "SWITCHBOARD_JWT_LEEWAY", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_leeway: Option<String>,

    /// Cookie that may carry the client token (besides `Authorization: Bearer` and `?token=`).
    #[arg(long, env = "SWITCHBOARD_JWT_COOKIE", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_cookie: Option<String>,

    /// Web origins whose pages may connect (`Origin` header), e.g. `https://app.example.com,https://*.example.com`; others get 403 [default: any].
    #[arg(
        long,
        env = "SWITCHBOARD_ALLOWED_ORIGINS",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_origins: Option<Vec<String>>,

    /// Messages per second a client may send, bursts of two seconds' worth allowed; 0 = unlimited [default: 100].
    #[arg(long, env = "SWITCHBOARD_CLIENT_MESSAGE_RATE", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    client_message_rate: Option<u32>,

    /// Bytes per second a client may send (bursts of two seconds' worth, at least one max-size message); 0 = unlimited [default: 1048576].
    #[arg(long, env = "SWITCHBOARD_CLIENT_BYTE_RATE", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    client_byte_rate: Option<u64>,

    /// How long before its token expires a native client gets a `refresh` push [default: 30s].
    #[arg(
        long,
        env = "SWITCHBOARD_TOKEN_REFRESH_NOTICE",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    token_refresh_notice: Option<String>,

    /// With a token key configured, still accept clients that send no token [default: false].
    #[arg(long, env = "SWITCHBOARD_ALLOW_ANONYMOUS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_anonymous: Option<bool>,

    /// PEM certificate chain: both listeners speak TLS (with --tls-key) [default: none].
    #[arg(long, env = "SWITCHBOARD_TLS_CERT", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<String>,

    /// PEM private key of --tls-cert [default: none].
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<String>,

    /// How often the certificate and key files are checked for changes; changed files are loaded without a restart, 0s = never [default: 10s].
    #[arg(long, env = "SWITCHBOARD_TLS_RELOAD_INTERVAL", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_reload_interval: Option<String>,

    /// Oldest TLS version accepted: 1.2 or 1.3 [default: 1.2].
    #[arg(long, env = "SWITCHBOARD_TLS_MIN_VERSION", value_name = "VERSION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_min_version: Option<String>,

    /// Allow a control listener that is neither loopback nor TLS (API keys in clear text) [default: false].
    #[arg(long, env = "SWITCHBOARD_CONTROL_ALLOW_PLAINTEXT", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    control_allow_plaintext: Option<bool>,

    /// Control listener: time allowed for a request head; a begun head gets 408 [default: 10s].
    #[arg(
        long,
        env = "SWITCHBOARD_CONTROL_HEADER_TIMEOUT",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    control_header_timeout: Option<String>,

    /// Control listener: time allowed for a request body; then 408 and closed [default: 30s].
    #[arg(
        long,
        env = "SWITCHBOARD_CONTROL_BODY_TIMEOUT",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    control_body_timeout: Option<String>,

    /// Control listener: close keep-alive connections idle for this long [default: 60s].
    #[arg(
        long,
        env = "SWITCHBOARD_CONTROL_IDLE_TIMEOUT",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    control_idle_timeout: Option<String>,

    /// Control listener: most connections at once; more get 503 [default: 1024].
    #[arg(long, env = "SWITCHBOARD_CONTROL_MAX_CONNECTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    control_max_connections: Option<usize>,

    /// Accepted subprotocol (repeatable).
    #[arg(
        long,
        env = "SWITCHBOARD_SUBPROTOCOL",
        value_name = "NAME",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    subprotocol: Option<Vec<String>>,

    /// Negotiate permessage-deflate with clients that offer it [default: false].
    #[arg(long, env = "SWITCHBOARD_PERMESSAGE_DEFLATE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    permessage_deflate: Option<bool>,

    /// Request header passed to the origin in `connect` (repeatable) [default: user-agent, origin, accept-language, x-forwarded-for].
    #[arg(
        long,
        env = "SWITCHBOARD_FORWARD_HEADER",
        value_name = "NAME",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    forward_header: Option<Vec<String>>,

    /// Interval of WebSocket pings [default: 25s].
    #[arg(long, env = "SWITCHBOARD_PING_INTERVAL", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ping_interval: Option<String>,

    /// Time allowed for a pong before the connection is dropped [default: 10s].
    #[arg(long, env = "SWITCHBOARD_PONG_TIMEOUT", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pong_timeout: Option<String>,

    /// Longest a long-poll waits for pushes, and the most a long-poll session may go without a waiting poll [default: 25s].
    #[arg(long, env = "SWITCHBOARD_POLL_TIMEOUT", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    poll_timeout: Option<String>,

    /// Time allowed for the whole opening handshake, origin decision included [default: 10s].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    handshake_timeout: Option<String>,

    /// Close (4003) connections that send nothing for this long [default: never].
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout: Option<String>,

    /// Largest client message in bytes; larger closes with 1009 [default: 1048576].
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_message_size: Option<usize>,

    /// Largest request head in bytes; larger gets 431 [default: 8192].
    #[arg(long, env = "SWITCHBOARD_MAX_HEADER_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_header_bytes: Option<usize>,

    /// Most client sockets at once; more get 503 [default: 1000000].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<usize>,

    /// Most client sockets from one IP; more get 503; 0 means no cap [default: 10000].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections_per_ip: Option<usize>,

    /// Handshakes per second one IP may start, bursts of two seconds' worth; more get 429 (or, with TLS, are closed before the TLS handshake); 0 means no limit [default: 100].
    #[arg(long, env = "SWITCHBOARD_MAX_HANDSHAKES_PER_IP", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_handshakes_per_ip: Option<u32>,

    /// Most open connections per user (the token's `sub`) on this node; more get 429; 0 means no cap [default: 100].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_USER", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections_per_user: Option<u32>,

    /// Bytes queued for one client before it is closed as a slow consumer (4001) [default: 524288].
    #[arg(long, env = "SWITCHBOARD_MAX_OUTBOUND_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_outbound_bytes: Option<usize>,

    /// Upper bound of a graceful drain [default: 30s].
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout: Option<String>,

    /// Window over which a drain closes clients with 1012 [default: 5s].
    #[arg(long, env = "SWITCHBOARD_DRAIN_SPREAD", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_spread: Option<String>,

    /// How long a native client's session outlives a lost connection, waiting for it to resume (docs/sessions.md); 0s turns sessions off [default: 2m].
    #[arg(long, env = "SWITCHBOARD_SESSION_TTL", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    session_ttl: Option<String>,

    /// Most direct messages a session keeps until the client acknowledges them [default: 1000].
    #[arg(long, env = "SWITCHBOARD_SESSION_OUTBOX_MESSAGES", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    session_outbox_messages: Option<u32>,

    /// Most bytes of direct messages a session keeps until the client acknowledges them; only up to half of --max-outbound-bytes is used [default: 262144].
    #[arg(long, env = "SWITCHBOARD_SESSION_OUTBOX_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    session_outbox_bytes: Option<u32>,

    /// Send the origin `suspend` and `resume` events when a session loses its connection and gets one back [default: false].
    #[arg(long, env = "SWITCHBOARD_SESSION_EVENTS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    session_events: Option<bool>,

    /// The origin's GraphQL-over-HTTP endpoint: clients may then speak graphql-transport-ws and graphql-ws (docs/graphql.md) [default: none].
    #[arg(long, env = "SWITCHBOARD_GRAPHQL_ENDPOINT", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_endpoint: Option<String>,

    /// Time from the 101 to a GraphQL client's `connection_init` (else 4408) [default: 10s].
    #[arg(
        long,
        env = "SWITCHBOARD_GRAPHQL_INIT_TIMEOUT",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_init_timeout: Option<String>,

    /// GraphQL operations one connection may run at once [default: 100].
    #[arg(long, env = "SWITCHBOARD_GRAPHQL_MAX_OPERATIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_max_operations: Option<usize>,

    /// Requests this node has in flight to the GraphQL endpoint at once [default: 64].
    #[arg(long, env = "SWITCHBOARD_GRAPHQL_CONCURRENCY", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_concurrency: Option<usize>,

    /// Timeout of one request to the GraphQL endpoint [default: 10s].
    #[arg(long, env = "SWITCHBOARD_GRAPHQL_TIMEOUT", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_timeout: Option<String>,

    /// Do not send a re-executed subscription result equal to the last one sent [default: false].
    #[arg(long, env = "SWITCHBOARD_GRAPHQL_SUPPRESS_UNCHANGED", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_suppress_unchanged: Option<bool>,

    /// NATS server URL(s), comma-separated: join a cluster [default: none, single node].
    #[arg(long, env = "SWITCHBOARD_NATS", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats: Option<String>,

    /// Prefix of every NATS subject, so clusters can share one NATS [default: switchboard].
    #[arg(long, env = "SWITCHBOARD_NATS_PREFIX", value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_prefix: Option<String>,

    /// NATS credentials file (.creds) [default: none].
    #[arg(long, env = "SWITCHBOARD_NATS_CREDS", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_creds: Option<String>,

    /// File with an nkey seed to authenticate to NATS [default: none].
    #[arg(long, env = "SWITCHBOARD_NATS_NKEY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_nkey: Option<String>,

    /// CA certificate (PEM) to verify the NATS server [default: system roots].
    #[arg(long, env = "SWITCHBOARD_NATS_TLS_CA", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_tls_ca: Option<String>,

    /// Client certificate (PEM) for NATS mutual TLS [default: none].
    #[arg(long, env = "SWITCHBOARD_NATS_TLS_CERT", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_tls_cert: Option<String>,

    /// Client private key (PEM) for NATS mutual TLS [default: none].
    #[arg(long, env = "SWITCHBOARD_NATS_TLS_KEY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_tls_key: Option<String>,

    /// Refuse to talk to NATS without TLS [default: false].
    #[arg(long, env = "SWITCHBOARD_NATS_TLS_REQUIRED", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_tls_required: Option<bool>,

    /// With `--origin nats`: publish events through this JetStream stream, with acks [default: none].
    #[arg(long, env = "SWITCHBOARD_NATS_EVENT_STREAM", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_event_stream: Option<String>,

    /// Redis URL `redis://[USER:PASSWORD@]HOST:PORT/DB` (`rediss://` for TLS): join a cluster over Redis instead of NATS [default: none, single node].
    #[arg(long, env = "SWITCHBOARD_REDIS", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<String>,

    /// Prefix of every Redis key and pub/sub channel, so clusters can share one Redis [default: switchboard].
    #[arg(long, env = "SWITCHBOARD_REDIS_PREFIX", value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_prefix: Option<String>,

    /// CA certificate (PEM) to verify a `rediss://` Redis with [default: system roots].
    #[arg(long, env = "SWITCHBOARD_REDIS_TLS_CA", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_tls_ca: Option<String>,

    /// With `--origin redis`: event streams a connection's events are spread over, by connection id [default: 1].
    #[arg(long, env = "SWITCHBOARD_REDIS_EVENT_PARTITIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_event_partitions: Option<u32>,

    /// With `--origin redis`: entries each event stream keeps, about (older ones are trimmed) [default: 1000000].
    #[arg(long, env = "SWITCHBOARD_REDIS_EVENT_STREAM_MAX_LEN", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_event_stream_max_len: Option<u64>,

    /// How often a node announces itself to the cluster [default: 1s].
    #[arg(long, env = "SWITCHBOARD_CLUSTER_HEARTBEAT", value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_heartbeat: Option<String>,

    /// A node not heard from for this long is dropped and reported [default: 5s].
    #[arg(
        long,
        env = "SWITCHBOARD_CLUSTER_HEARTBEAT_TIMEOUT",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_heartbeat_timeout: Option<String>,

    /// Time allowed for another node to answer a forwarded command [default: 1500ms].
    #[arg(
        long,
        env = "SWITCHBOARD_CLUSTER_REQUEST_TIMEOUT",
        value_name = "DURATION"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_request_timeout: Option<String>,

    /// Channel namespace `NAME[:OPTION,...]` (repeatable; `;` separates several in the environment), e.g. `chat:history-size=100,presence,join-leave,publish,subscribe`.
    #[arg(
        long,
        env = "SWITCHBOARD_NAMESPACE",
        value_name = "SPEC",
        value_delimiter = ';'
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<Vec<String>>,

    /// Most channels one connection may be subscribed to [default: 128].
    #[arg(long, env = "SWITCHBOARD_MAX_SUBSCRIPTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_subscriptions: Option<usize>,

    /// Longest channel name in bytes, 3..=255; longer names get `bad_channel` [default: 255].
    #[arg(long, env = "SWITCHBOARD_MAX_CHANNEL_LENGTH", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_channel_length: Option<usize>,

    /// Most header lines in a request head, 8..=256; more get 431 [default: 64].
    #[arg(long, env = "SWITCHBOARD_MAX_HEADER_COUNT", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_header_count: Option<usize>,

    /// Replicas of the JetStream streams that keep channel logs in a cluster (1, 3 or 5; at most the NATS cluster's servers) [default: 1].
    #[arg(long, env = "SWITCHBOARD_CHANNEL_LOG_REPLICAS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    channel_log_replicas: Option<usize>,
}

/// The result of loading: the gateway's config plus the binary's own settings.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) config: Config,
    /// The cluster backend's settings.
    pub(crate) cluster: ClusterSettings,
    pub(crate) log_level: String,
    pub(crate) log_format: String,
}

/// Merges defaults, the TOML file, and flags/environment (already merged by clap).
pub(crate) fn load(args: &ServeArgs) -> Result<Loaded, String> {
    let mut table = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            toml::from_str::<toml::Table>(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => toml::Table::new(),
    };
    let overrides = toml::Table::try_from(args).map_err(|e| e.to_string())?;
    table.extend(overrides);
    let take_str = |t: &mut toml::Table, key: &str, default: &str| -> Result<String, String> {
        match t.remove(key) {
            None => Ok(default.to_owned()),
            Some(toml::Value::String(s)) => Ok(s),
            Some(other) => Err(format!("`{key}` must be a string, got {other}")),
        }
    };
    let log_level = take_str(&mut table, "log-level", "info")?;
    let log_format = take_str(&mut table, "log-format", "auto")?;
    let backend_keys: Vec<String> = table
        .keys()
        .filter(|k| ClusterSettings::owns(k))
        .cloned()
        .collect();
    let mut backend_table = toml::Table::new();
    for k in backend_keys {
        if let Some(v) = table.remove(&k) {
            backend_table.insert(k, v);
        }
    }
    let config: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string())?;
    let cluster: ClusterSettings = toml::Value::Table(backend_table)
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    cluster.validate(&config).map_err(|e| e.to_string())?;
    Ok(Loaded {
        config,
        cluster,
        log_level,
        log_format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::time::Duration;

    fn parse(argv: &[&str]) -> ServeArgs {
        let mut full = vec!["switchboard", "serve"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Serve(a) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    /// The first line of `--help` says what Switchboard is, for someone who
    /// has never heard of it; `--version` carries the build.
    #[test]
    fn help_introduces_the_product_and_version_describes_the_build() {
        let mut cmd = Cli::command();
        let help = cmd.render_help().to_string();
        let first = help.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("Switchboard, a WebSocket gateway"),
            "{first}"
        );
        assert!(!help.contains("CLI, configuration loading"), "{help}");
        let version = cmd.render_long_version();
        for field in ["commit:", "built:", "features:", "target:", "rustc:"] {
            assert!(version.contains(field), "{field} missing from {version}");
        }
        let hc = match Cli::try_parse_from(["switchboard", "healthcheck"])
            .unwrap()
            .command
        {
            Command::Healthcheck(a) => a,
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(hc.url, "http://127.0.0.1:8081/healthz");
    }

    #[test]
    fn flags_beat_file_which_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("sb-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "ping-interval = \"7s\"\nmax-message-size = 1000\nsubprotocol = [\"a\"]\nlog-level = \"debug\"\n",
        )
        .unwrap();
        let args = parse(&[
            "--config",
            file.to_str().unwrap(),
            "--max-message-size",
            "2000",
        ]);
        let l = load(&args).unwrap();
        assert_eq!(l.config.ping_interval, Duration::from_secs(7));
        assert_eq!(l.config.max_message_size, 2000);
        assert_eq!(l.config.subprotocol, vec!["a".to_string()]);
        assert_eq!(l.config.pong_timeout, Config::default().pong_timeout);
        assert_eq!(l.log_level, "debug");
        std::fs::write(&file, "no-such-option = 1\n").unwrap();
        assert!(load(&args).unwrap_err().contains("no-such-option"));
    }

    #[test]
    fn repeatable_and_boolean_flags() {
        let a = parse(&[
            "--subprotocol",
            "x",
            "--subprotocol",
            "y",
            "--permessage-deflate",
            "--idle-timeout",
            "1m",
        ]);
        let l = load(&a).unwrap();
        assert_eq!(l.config.subprotocol, ["x", "y"]);
        assert!(l.config.permessage_deflate);
        assert_eq!(l.config.idle_timeout, Some(Duration::from_secs(60)));
        let bad = parse(&["--control-listen", "0.0.0.0:9"]);
        assert!(load(&bad).unwrap_err().contains("api-key"));
    }

    /// Every `serve` option is documented in docs/configuration.md and every
    /// documented option exists; every config key has a flag.
    #[test]
    fn docs_and_help_agree() {
        let docs = include_str!("../../../docs/configuration.md");
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        let flags: Vec<String> = serve
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| *l != "help")
            .map(str::to_owned)
            .collect();
        for f in &flags {
            assert!(
                docs.contains(&format!("`--{f}`")),
                "--{f} is not documented in docs/configuration.md"
            );
            let env = format!("SWITCHBOARD_{}", f.to_uppercase().replace('-', "_"));
            if f != "check" {
                assert!(docs.contains(&env), "{env} is not documented");
            }
        }
        for line in docs.lines().filter(|l| l.starts_with("| `--")) {
            let flag = line.split('`').nth(1).unwrap().trim_start_matches("--");
            assert!(
                flags.iter().any(|f| f == flag),
                "docs list --{flag}, which `serve` does not have"
            );
        }
        let gateway = serde_json::to_value(Config::default()).unwrap();
        let cluster = serde_json::to_value(ClusterSettings::default()).unwrap();
        for obj in [gateway, cluster] {
            for key in obj.as_object().unwrap().keys() {
                assert!(flags.contains(key), "config key {key} has no flag");
            }
        }
    }
}
