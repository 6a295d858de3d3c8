//! The node's NATS connection: options from the configuration, endless
//! reconnects with a short capped delay, and the [`Link`] state the cluster
//! and the origin transport consult before relying on the bus.

use crate::NatsConfig;
use async_nats::{Client, ConnectOptions, Event};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the NATS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// A credentials, nkey or TLS file could not be read.
    #[error("cannot read {what} {path:?}: {source}")]
    File {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The client could not be created (bad URL, TLS set-up).
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
}

/// Whether the connection is up, and since when.
#[derive(Debug)]
pub struct Link {
    /// The client's own state is the truth once it exists (connection
    /// events can be dropped when async-nats's event queue is full).
    client: std::sync::OnceLock<Client>,
    up: AtomicBool,
    since: Mutex<Instant>,
}

impl Link {
    fn new() -> Self {
        Self {
            client: std::sync::OnceLock::new(),
            up: AtomicBool::new(false),
            since: Mutex::new(Instant::now()),
        }
    }

    /// Whether the connection to NATS is up.
    pub fn is_up(&self) -> bool {
        match self.client.get() {
            Some(c) => c.connection_state() == async_nats::connection::State::Connected,
            None => self.up.load(Relaxed),
        }
    }

    /// How long the connection has been up without a break (zero when down).
    pub fn up_for(&self) -> Duration {
        if self.is_up() {
            self.since.lock().elapsed()
        } else {
            Duration::ZERO
        }
    }

    fn set(&self, up: bool) {
        let mut since = self.since.lock();
        if up != self.up.load(Relaxed) {
            *since = Instant::now();
            self.up.store(up, Relaxed);
        }
    }
}

/// Connects to the NATS server(s) of `config.urls` as node `node`.
///
/// The node starts even while NATS is unreachable (it keeps trying, and
/// serves its own connections meanwhile) and reconnects forever, waiting at
/// most `min(cluster-heartbeat, 1 s)` between attempts so all nodes are back
/// within about one heartbeat of NATS.
pub async fn connect(config: &NatsConfig, node: &str) -> Result<(Client, Arc<Link>), NatsError> {
    let url = config.urls.as_str();
    if url.trim().is_empty() {
        return Err(NatsError::Connect("no NATS URL configured".into()));
    }
    let mut opts = match &config.creds {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| NatsError::File {
                what: "nats-creds",
                path: path.clone(),
                source,
            })?,
        None => ConnectOptions::new(),
    };
    if let Some(path) = &config.nkey {
        let seed = std::fs::read_to_string(path).map_err(|source| NatsError::File {
            what: "nats-nkey",
            path: path.clone(),
            source,
        })?;
        opts = opts.nkey(seed.trim().to_owned());
    }
    if let Some(ca) = &config.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        opts = opts.require_tls(true);
    }
    let link = Arc::new(Link::new());
    let events = link.clone();
    let max_delay = config.heartbeat.min(Duration::from_secs(1));
    let opts = opts
        .name(format!("switchboard {node}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(10))
        // Requests are bounded by the callers' own timeouts.
        .request_timeout(None)
        .reconnect_delay_callback(move |attempts| {
            let step = Duration::from_millis(50).saturating_mul(attempts.min(1000) as u32);
            step.min(max_delay)
        })
        .event_callback(move |event| {
            let link = events.clone();
            async move {
                match event {
                    Event::Connected => {
                        link.set(true);
                        tracing::info!("connected to NATS");
                    }
                    Event::Disconnected => {
                        link.set(false);
                        tracing::warn!("lost the NATS connection; reconnecting");
                    }
                    Event::Closed => link.set(false),
                    Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "NATS subscription fell behind (slow consumer)")
                    }
                    other => tracing::warn!(event = %other, "NATS"),
                }
            }
        });
    let client = opts
        .connect(url.split(',').map(str::trim).collect::<Vec<_>>())
        .await
        .map_err(|e| NatsError::Connect(e.to_string()))?;
    if client.connection_state() == async_nats::connection::State::Connected {
        link.set(true);
    }
    let _ = link.client.set(client.clone());
    Ok((client, link))
}
