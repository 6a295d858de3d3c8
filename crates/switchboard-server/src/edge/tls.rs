//! TLS on both listeners (rustls): the certificate and key, reloaded when
//! their files change; the client listener's pump that terminates TLS; and
//! the control listener's acceptor.
//!
//! A TLS client's connection task is the same as a plain one's: it reads and
//! writes plaintext on one end of a local socket pair, and a pump task moves
//! bytes between the other end and the TLS stream. So the connection task
//! keeps its readiness-based design (no buffer while idle); the TLS session
//! and the pump (which, likewise, borrows a buffer only while bytes move)
//! are what TLS adds to a connection (docs/security.md, "TLS").

use super::Edge;
use crate::config::{Config, TlsVersion};
use crate::conn::stream::ClientStream;
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
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long the pump keeps the other direction open once one has ended
/// (the client closed, or the connection task did), so a close frame or
/// `close_notify` still gets through, but a peer cannot hold the socket.
const LINGER: Duration = Duration::from_secs(5);

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
        Ok(Some(Arc::new(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
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
/// on success the pump is started and the plaintext end returned.
pub(crate) async fn accept_client(
    shared: &Arc<Edge>,
    tls: &Tls,
    tcp: TcpStream,
) -> Option<ClientStream> {
    let accepted =
        tokio::time::timeout(shared.config.handshake_timeout, tls.acceptor.accept(tcp)).await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            shared.metrics.handshake("tls_failed");
            return None;
        }
        Err(_) => {
            shared.metrics.handshake("tls_timeout");
            return None;
        }
    };
    let (ours, pumps) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "no socket pair for a TLS connection");
            shared.metrics.handshake("tls_failed");
            return None;
        }
    };
    shared.conn_tasks.spawn(pump(stream, pumps));
    Some(ClientStream::Tls(ours))
}

/// Bytes moved in one direction before the pump turns to the other, so a
/// client streaming in cannot hold up what the gateway sends it (or the
/// other way round).
const TURN_BUDGET: usize = 64 << 10;

/// Moves bytes both ways between a client's TLS stream and the connection
/// task's plaintext socket, holding a (pooled) buffer only while bytes are
/// moving, as the connection task does: an idle TLS connection costs its
/// rustls session and this future, no copy buffers. The directions take
/// turns of at most [`TURN_BUDGET`] bytes; when one ends, the other gets
/// [`LINGER`] to finish.
async fn pump(mut tls: TlsStream<TcpStream>, mut plain: UnixStream) {
    // The client may have sent its first bytes with the end of the TLS
    // handshake: they are already in rustls, and the socket will not turn
    // readable for them. So both sides start by trying.
    let (mut client, mut task) = (Side::Try, Side::Try);
    let mut linger: Option<tokio::time::Instant> = None;
    loop {
        if client == Side::Try {
            let Some(next) = client_to_task(&mut tls, &mut plain).await.next() else {
                return;
            };
            client = next;
        }
        if task == Side::Try {
            let Some(next) = task_to_client(&mut plain, &mut tls).await.next() else {
                return;
            };
            task = next;
        }
        match (client, task) {
            (Side::Closed, Side::Closed) => return,
            (Side::Try, _) | (_, Side::Try) => continue,
            (Side::Closed, _) | (_, Side::Closed) => {
                linger.get_or_insert_with(|| tokio::time::Instant::now() + LINGER);
            }
            _ => {}
        }
        let deadline = linger.unwrap_or_else(|| tokio::time::Instant::now() + LINGER);
        tokio::select! {
            ready = tls.get_ref().0.readable(), if client == Side::Wait => {
                if ready.is_err() {
                    return;
                }
                client = Side::Try;
            }
            ready = plain.readable(), if task == Side::Wait => {
                if ready.is_err() {
                    return;
                }
                task = Side::Try;
            }
            () = tokio::time::sleep_until(deadline), if linger.is_some() => return,
        }
    }
}

/// Where one direction of the pump stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Bytes may be there: move them now.
    Try,
    /// Nothing there: wait for the socket to be readable.
    Wait,
    /// Its sender closed.
    Closed,
}

/// What one turn of a direction did.
enum Flow {
    /// Moved its budget; there may be more.
    More,
    /// Moved all there was.
    Drained,
    /// Its sender closed (the end was passed on).
    Ended,
    /// An error: give up the connection.
    Failed,
}

impl Flow {
    /// Where the direction stands after this turn; `None` after an error.
    fn next(self) -> Option<Side> {
        match self {
            Self::More => Some(Side::Try),
            Self::Drained => Some(Side::Wait),
            Self::Ended => Some(Side::Closed),
            Self::Failed => None,
        }
    }
}

/// Decrypts what the client sent that is there now (a turn's worth) and
/// passes it on.
async fn client_to_task(tls: &mut TlsStream<TcpStream>, plain: &mut UnixStream) -> Flow {
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;
    let mut buf = crate::edge::pool::take();
    let mut moved = 0;
    let flow = loop {
        if moved >= TURN_BUDGET {
            break Flow::More;
        }
        // Without waiting: a partial record stays in rustls until more comes.
        match tls.read_buf(&mut buf).now_or_never() {
            None => break Flow::Drained,
            Some(Ok(0)) => {
                let _ = plain.shutdown().await;
                break Flow::Ended;
            }
            Some(Ok(n)) => {
                if plain.write_all(&buf).await.is_err() {
                    break Flow::Failed;
                }
                moved += n;
                buf.clear();
            }
            Some(Err(_)) => break Flow::Failed,
        }
    };
    crate::edge::pool::give(buf);
    flow
}

/// Encrypts what the connection task wrote that is there now (a turn's
/// worth) and sends it.
async fn task_to_client(plain: &mut UnixStream, tls: &mut TlsStream<TcpStream>) -> Flow {
    let mut buf = crate::edge::pool::take();
    let mut moved = 0;
    let flow = loop {
        if moved >= TURN_BUDGET {
            break match tls.flush().await {
                Ok(()) => Flow::More,
                Err(_) => Flow::Failed,
            };
        }
        match plain.try_read_buf(&mut buf) {
            Ok(0) => {
                // Sends close_notify, then closes the TCP write side.
                let _ = tls.shutdown().await;
                break Flow::Ended;
            }
            Ok(n) => {
                if tls.write_all(&buf).await.is_err() {
                    break Flow::Failed;
                }
                moved += n;
                buf.clear();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                break match tls.flush().await {
                    Ok(()) => Flow::Drained,
                    Err(_) => Flow::Failed,
                };
            }
            Err(_) => break Flow::Failed,
        }
    };
    crate::edge::pool::give(buf);
    flow
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
                let _ = tcp.set_nodelay(true);
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
