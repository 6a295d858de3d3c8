//! TLS on both listeners (rustls): the certificate and key, reloaded when
//! their files change; the client listener's handshake; and the control
//! listener's acceptor.
//!
//! A TLS client's connection task is the same as a plain one's: once the
//! handshake is done, its [`ClientStream`] holds the client's socket and the
//! session's record layer ([`TlsStream`]: rustls ran the handshake and
//! handed the traffic keys over), which the task drives itself, with the
//! same readiness-based calls and the same borrowed buffers. The keys and
//! sequence numbers are what TLS adds to an idle connection
//! (docs/security.md, "TLS").

use super::Edge;
use crate::config::{Config, TlsVersion};
use crate::conn::stream::ClientStream;
use crate::conn::tls::TlsStream as ClientTls;
use crate::edge::control_listener::{Slot, Slots};
use crate::metrics::Metrics;
use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Control connections whose TLS handshake is done, waiting for `accept`.
const CONTROL_BACKLOG: usize = 64;

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The key cannot sign, or is not the certificate's.
    #[error("tls-key: {0}")]
    Key(String),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS side of a node: the acceptor both listeners use, and the
/// certificate store it reads from.
pub(crate) struct Tls {
    /// For client connections (driven in their own task).
    config: Arc<ServerConfig>,
    /// For control connections (tokio-rustls streams served by hyper).
    acceptor: TlsAcceptor,
    store: Arc<CertStore>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("store", &self.store).finish()
    }
}

impl Tls {
    /// Loads the certificate and key when `tls-cert` is set (validation has
    /// checked `tls-key` is too); `None` without TLS.
    pub(crate) fn from_config(config: &Config) -> Result<Option<Arc<Self>>, TlsSetupError> {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Ok(None);
        };
        let store = Arc::new(CertStore::load(cert.clone(), key.clone())?);
        let versions: &[&rustls::SupportedProtocolVersion] = match config.tls_min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let mut server =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)?
                .with_no_client_auth()
                .with_cert_resolver(store.clone());
        // Both listeners speak HTTP/1.1 only (a WebSocket upgrade needs it).
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        // A client connection's task takes the traffic keys over once the
        // handshake is done and protects its records itself
        // (conn/tls/record.rs); the control listener's tokio-rustls
        // sessions ignore this.
        server.enable_secret_extraction = true;
        let config = Arc::new(server);
        Ok(Some(Arc::new(Self {
            acceptor: TlsAcceptor::from(config.clone()),
            config,
            store,
        })))
    }

    /// Checks the files every `interval` and swaps in a changed pair once it
    /// loads; a pair that does not load (half written, or wrong) leaves the
    /// current one in place and is retried when the files change again.
    pub(crate) async fn reload_loop(
        self: Arc<Self>,
        interval: Duration,
        shared: Arc<Edge>,
        stop: CancellationToken,
    ) {
        if interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let store = self.store.clone();
            let outcome = tokio::task::spawn_blocking(move || store.reload_if_changed())
                .await
                .ok()
                .flatten();
            match outcome {
                None => {}
                Some(Ok(())) => {
                    tracing::info!("TLS certificate reloaded");
                    shared.metrics.tls_reload("reloaded");
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "TLS certificate files changed but do not load; keeping the current certificate");
                    shared.metrics.tls_reload("failed");
                }
            }
        }
    }
}

/// When the two files were last seen changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    cert: Option<(SystemTime, u64)>,
    key: Option<(SystemTime, u64)>,
}

impl Stamp {
    fn of(cert: &Path, key: &Path) -> Self {
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        Self {
            cert: stamp(cert),
            key: stamp(key),
        }
    }
}

/// The current certificate and key, what new handshakes are given.
struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files as last loaded or tried.
    seen: Mutex<Stamp>,
}

/// The paths only: nothing of the key is ever printed.
impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Self, TlsSetupError> {
        let seen = Stamp::of(&cert_path, &key_path);
        let pair = load_pair(&cert_path, &key_path)?;
        Ok(Self {
            cert_path,
            key_path,
            current: RwLock::new(Arc::new(pair)),
            seen: Mutex::new(seen),
        })
    }

    /// `None` if the files are as last seen; otherwise the outcome of
    /// loading them.
    fn reload_if_changed(&self) -> Option<Result<(), TlsSetupError>> {
        let now = Stamp::of(&self.cert_path, &self.key_path);
        {
            let mut seen = self.seen.lock();
            if *seen == now {
                return None;
            }
            *seen = now;
        }
        Some(load_pair(&self.cert_path, &self.key_path).map(|pair| {
            *self.current.write() = Arc::new(pair);
        }))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Reads a PEM certificate chain and its PEM private key (PKCS#8, PKCS#1
/// or SEC1), and checks that they belong together.
fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsSetupError> {
    let file_error = |path: &Path, problem: String| TlsSetupError::File {
        path: path.to_owned(),
        problem,
    };
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|items| items.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error(
            cert_path,
            "no CERTIFICATE in this PEM file".into(),
        ));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_error(key_path, e.to_string()))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsSetupError::Key(e.to_string()))?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match().map_err(|e| {
        TlsSetupError::Key(format!("does not match the certificate in tls-cert: {e}"))
    })?;
    Ok(pair)
}

/// The TLS handshake of a client socket (bounded by `handshake-timeout`);
/// the connection's task drives the session from then on.
pub(crate) async fn accept_client(
    shared: &Arc<Edge>,
    tls: &Tls,
    tcp: TcpStream,
) -> Option<ClientStream> {
    let accepted = tokio::time::timeout(
        shared.config.handshake_timeout,
        ClientTls::accept(tcp, tls.config.clone()),
    )
    .await;
    match accepted {
        Ok(Ok(s)) => Some(ClientStream::Tls(Box::new(s))),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            shared.metrics.handshake("tls_failed");
            None
        }
        Err(_) => {
            shared.metrics.handshake("tls_timeout");
            None
        }
    }
}

/// The control listener behind TLS: a task accepts TCP connections, takes
/// each a slot of `control-max-connections` (one over the cap is closed at
/// once, before any handshake) and runs its TLS handshake in a task of its
/// own (so a slow handshake delays nobody); finished ones wait here for
/// [`ControlListener::accept`].
#[derive(Debug)]
pub(crate) struct ControlListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, Slot)>,
}

impl ControlListener {
    /// Starts accepting on `listener` until `stop` fires.
    pub(crate) fn start(
        listener: TcpListener,
        tls: &Tls,
        handshake_timeout: Duration,
        shared: Arc<Edge>,
        slots: Slots,
        stop: CancellationToken,
    ) -> Self {
        let (tx, ready) = tokio::sync::mpsc::channel(CONTROL_BACKLOG);
        let acceptor = tls.acceptor.clone();
        tokio::spawn(async move {
            let mut accepting =
                super::listener::Acceptor::new("control", super::listener::Shed::Close);
            loop {
                let (tcp, _remote) = tokio::select! {
                    _ = stop.cancelled() => return,
                    pair = accepting.accept(&listener, &shared.metrics) => pair,
                };
                let Some(slot) = slots.take() else {
                    continue; // dropped: closed without a handshake
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, slot)).await;
                        }
                        _ => {
                            shared.metrics.control_tls_failures.inc();
                        }
                    }
                });
            }
        });
        Self { ready }
    }

    /// The next connection whose handshake is done; `None` once stopped.
    pub(crate) async fn accept(&mut self) -> Option<(TlsStream<TcpStream>, Slot)> {
        self.ready.recv().await
    }
}

impl Metrics {
    /// Counts a certificate reload attempt by its outcome.
    pub(crate) fn tls_reload(&self, result: &'static str) {
        self.tls_reloads
            .get_or_create(&crate::metrics::ResultLabel { result })
            .inc();
    }
}
