//! The client listener's accept loop, and the [`Acceptor`] every listener
//! uses to keep answering when the process runs out of file descriptors.

use super::{handshake, Edge};
use crate::conn::stream::ClientStream;
use crate::metrics::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// Accepts clients until `shutdown` resolves.
pub(crate) async fn accept_loop(
    shared: &Arc<Edge>,
    listener: &TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let shed = if shared.tls.is_some() {
        Shed::CloseClient
    } else {
        Shed::Answer503
    };
    let mut acceptor = Acceptor::new("client", shed);
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => return,
            pair = acceptor.accept(listener, &shared.metrics) => pair,
        };
        accept_one(shared, stream, remote);
    }
}

/// Longest pause of an accept loop after failed `accept()` calls.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What an accept loop does with a socket it takes only to answer it
/// (see [`Acceptor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    /// Answer 503 `over_capacity` (plain HTTP) and close; counted as a
    /// handshake refusal.
    Answer503,
    /// Close at once (TLS listeners: nothing can be said before TLS is up);
    /// counted as a handshake refusal.
    CloseClient,
    /// Close at once (control listener with TLS).
    Close,
}

/// Accepts the sockets of one listener. When `accept()` fails for want of
/// descriptors (EMFILE, ENFILE), the pending client would wait in the
/// backlog, unanswered, until some descriptor frees up: instead, a spare
/// descriptor held for this is closed, the client is accepted, answered
/// (see [`Shed`]) and closed, and the spare is taken again. Every failure
/// counts in `switchboard_accept_errors_total{listener}` and is followed by
/// a pause that doubles while failures go on (up to
/// [`ACCEPT_BACKOFF_MAX`]), so the loop never spins; the log says so at
/// most once a second.
#[derive(Debug)]
pub(crate) struct Acceptor {
    listener: &'static str,
    shed: Shed,
    spare: Option<std::fs::File>,
    backoff: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Acceptor {
    /// An acceptor for the listener named `listener` in logs and metrics.
    pub(crate) fn new(listener: &'static str, shed: Shed) -> Self {
        Self {
            listener,
            shed,
            spare: open_spare(),
            backoff: Duration::ZERO,
            last_log: None,
            unlogged: 0,
        }
    }

    /// The next socket of `listener`.
    pub(crate) async fn accept(
        &mut self,
        listener: &TcpListener,
        metrics: &Metrics,
    ) -> (TcpStream, SocketAddr) {
        loop {
            let e = match listener.accept().await {
                Ok(pair) => {
                    self.backoff = Duration::ZERO;
                    return pair;
                }
                Err(e) => e,
            };
            metrics
                .accept_errors
                .get_or_create(&crate::metrics::ListenerLabel {
                    listener: self.listener,
                })
                .inc();
            let out_of_fds = is_out_of_descriptors(&e);
            let shed = out_of_fds && self.shed_one(listener, metrics);
            self.unlogged += 1;
            if self
                .last_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                tracing::warn!(
                    error = %e,
                    listener = self.listener,
                    failures = self.unlogged,
                    out_of_descriptors = out_of_fds,
                    "accept failed; pausing (waiting clients are refused meanwhile while a spare descriptor allows)"
                );
                self.last_log = Some(Instant::now());
                self.unlogged = 0;
            }
            self.backoff = if shed {
                // A client was answered: the backlog moves; keep going.
                Duration::from_millis(5)
            } else {
                (self.backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX)
            };
            tokio::time::sleep(self.backoff).await;
        }
    }

    /// Frees the spare descriptor to accept one waiting client, refuses it
    /// and closes it; `true` if a client was refused.
    fn shed_one(&mut self, listener: &TcpListener, metrics: &Metrics) -> bool {
        use futures_util::FutureExt;
        if self.spare.take().is_none() {
            self.spare = open_spare();
            return false;
        }
        let refused = match listener.accept().now_or_never() {
            Some(Ok((stream, _))) => {
                match self.shed {
                    Shed::Answer503 => {
                        metrics.handshake("over_capacity");
                        handshake::over_capacity_now(stream);
                    }
                    Shed::CloseClient => metrics.handshake("over_capacity"),
                    Shed::Close => {}
                }
                true
            }
            _ => false,
        };
        self.spare = open_spare();
        refused
    }
}

/// A descriptor held in reserve by an accept loop.
fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// EMFILE (the process's limit) or ENFILE (the system's).
fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    // The same numbers on Linux and the BSDs.
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
}

fn accept_one(shared: &Arc<Edge>, stream: TcpStream, remote: SocketAddr) {
    // Far over capacity: not even a task to answer it (handshake.rs answers
    // at most `capacity.refusing` refusals at once, which no longer count
    // in `sockets`).
    let cap = &shared.capacity;
    let held = shared.sockets.load(Relaxed) + shared.refusing.load(Relaxed);
    if held >= cap.max_connections + cap.refusing {
        shared.metrics.handshake("over_capacity");
        if shared.tls.is_none() {
            handshake::over_capacity_now(stream);
        }
        return; // dropped: closes the socket
    }
    let (guard, per_ip) = shared.track_socket(remote.ip());
    let admission = handshake::Admission {
        per_ip,
        sockets: shared.sockets.load(Relaxed),
        rate_ok: shared
            .handshake_rate
            .as_ref()
            .is_none_or(|r| r.admit(remote.ip(), std::time::Instant::now())),
    };
    match &shared.tls {
        None => {
            shared.conn_tasks.spawn(handshake::handle(
                shared.clone(),
                ClientStream::Tcp(stream),
                remote,
                guard,
                admission,
            ));
        }
        Some(_) if !admission.rate_ok => {
            // Not worth a TLS handshake, which costs the server more than
            // the client: closed at once, without an answer.
            shared.metrics.handshake("too_many_handshakes");
        }
        Some(tls) => {
            let (shared, tls) = (shared.clone(), tls.clone());
            shared.clone().conn_tasks.spawn(async move {
                // The socket counts (and is capped) from accept on; its
                // guard is dropped with it if TLS fails.
                if let Some(stream) = super::tls::accept_client(&shared, &tls, stream).await {
                    handshake::handle(shared, stream, remote, guard, admission).await;
                }
            });
        }
    }
}
