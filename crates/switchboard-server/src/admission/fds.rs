//! File descriptors: the process's open-file limit (`RLIMIT_NOFILE`), the
//! reserve kept for everything that is not a client socket, and the
//! client-socket capacity derived from them.
//!
//! A node that runs out of descriptors can neither accept nor refuse: new
//! sockets wait in the listen backlog, unanswered, `/healthz` included. So
//! the node caps its client sockets below the limit ([`Capacity`]), leaving
//! room for its control listener, its origin and cluster links and itself;
//! clients beyond the cap get the documented 503 `over_capacity`. The
//! numbers are documented in `docs/operations.md` ("Open files").

use crate::config::Config;

/// Descriptors kept for the process itself: standard streams, the runtime
/// (epoll, wakers, signals), both listeners, the accept loop's spare
/// descriptor, TLS certificate reloads, JWKS fetches.
pub const PROCESS_RESERVE: u64 = 64;

/// Descriptors kept for the control listener's connections: its own
/// connection cap (about 1024) plus some slack.
pub const CONTROL_RESERVE: u64 = 1_088;

/// Descriptors kept for `connect` requests to an HTTP origin in flight, on
/// top of one per `origin-concurrency` event lane.
pub const ORIGIN_CONNECT_RESERVE: u64 = 256;

/// Descriptors a cluster backend should ask to keep (`backend_fds` of
/// [`Capacity::new`]): its broker connections with room to reconnect.
pub const CLUSTER_RESERVE: u64 = 32;

/// Refused sockets answered at once by default (past this many, more are
/// closed at accept); fewer when the open-file limit is small.
pub const MAX_REFUSING: usize = 1_024;

/// What the node can hold, from `max-connections` and the open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The soft open-file limit; `None` when there is none (or it is unknown).
    pub fd_limit: Option<u64>,
    /// Descriptors kept for anything but client sockets.
    pub reserve: u64,
    /// Client sockets held at once, handshakes included (503 beyond):
    /// `max-connections`, lowered to fit the open-file limit.
    pub max_connections: usize,
    /// Sockets beyond `max_connections` being answered a refusal at once;
    /// past these, new sockets are closed at accept.
    pub refusing: usize,
    /// Whether `max-connections` was lowered to fit the open-file limit.
    pub lowered: bool,
}

impl Capacity {
    /// The capacity for `config` under the open-file limit `fd_limit`
    /// (`None`: unlimited), with `backend_fds` descriptors held by a
    /// cluster backend (its broker connections).
    ///
    /// The reserve is [`PROCESS_RESERVE`] + [`CONTROL_RESERVE`], plus
    /// `origin-concurrency` + [`ORIGIN_CONNECT_RESERVE`] with an HTTP
    /// origin, `graphql-concurrency` with a GraphQL endpoint, plus `backend_fds` (see [`CLUSTER_RESERVE`]), but never more than half
    /// the limit. What is left holds the client sockets (one descriptor
    /// each, TLS or not): an eighth of it (at most [`MAX_REFUSING`]) for
    /// sockets being refused, the rest for `max_connections`.
    pub fn new(config: &Config, fd_limit: Option<u64>, backend_fds: u64) -> Self {
        let Some(limit) = fd_limit else {
            return Self {
                fd_limit,
                reserve: 0,
                max_connections: config.max_connections,
                refusing: MAX_REFUSING,
                lowered: false,
            };
        };
        let mut wanted = PROCESS_RESERVE + CONTROL_RESERVE;
        if config.origin.is_some() && !config.origin_is_bus() {
            wanted += config.origin_concurrency as u64 + ORIGIN_CONNECT_RESERVE;
        }
        if config.graphql_endpoint.is_some() {
            // Its pooled connections: at most one per request in flight.
            wanted += config.graphql_concurrency as u64;
        }
        wanted += backend_fds;
        let reserve = wanted.min(limit / 2);
        let sockets = usize::try_from(limit - reserve).unwrap_or(usize::MAX);
        let refusing = (sockets / 8).clamp(1, MAX_REFUSING);
        let fits = sockets.saturating_sub(refusing).max(1);
        Self {
            fd_limit,
            reserve,
            max_connections: config.max_connections.min(fits),
            refusing,
            lowered: config.max_connections > fits,
        }
    }
}

/// Limits this large are no limit.
const UNLIMITED: u64 = 1 << 40;

/// The soft open-file limit of this process; `None` when unlimited or
/// unknown.
pub fn nofile_limit() -> Option<u64> {
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, _)) if soft < UNLIMITED => Some(soft),
        _ => None,
    }
}

/// Raises the soft open-file limit of this process to its hard limit (the
/// most an unprivileged process may have) and returns the new soft limit.
/// Called by the `switchboard` binary at startup.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(f: impl FnOnce(&mut Config)) -> Config {
        let mut c = Config::default();
        f(&mut c);
        c
    }

    #[test]
    fn a_large_limit_keeps_max_connections_and_the_full_reserve() {
        let c = config(|c| c.max_connections = 100_000);
        let cap = Capacity::new(&c, Some(1 << 20), 0);
        assert_eq!(cap.reserve, PROCESS_RESERVE + CONTROL_RESERVE);
        assert_eq!((cap.max_connections, cap.refusing), (100_000, MAX_REFUSING));
        assert!(!cap.lowered);
        let unlimited = Capacity::new(&c, None, 0);
        assert_eq!(unlimited.max_connections, 100_000);
    }

    #[test]
    fn the_default_cap_leaves_the_reserve_and_the_refusing_window() {
        let c = config(|c| {
            c.origin = Some("http://127.0.0.1:1/events".into());
        });
        let cap = Capacity::new(&c, Some(65_536), CLUSTER_RESERVE);
        let reserve = PROCESS_RESERVE
            + CONTROL_RESERVE
            + c.origin_concurrency as u64
            + ORIGIN_CONNECT_RESERVE
            + CLUSTER_RESERVE;
        assert_eq!(cap.reserve, reserve);
        assert_eq!(cap.refusing, MAX_REFUSING);
        assert_eq!(
            cap.max_connections as u64,
            65_536 - reserve - MAX_REFUSING as u64
        );
        assert!(cap.lowered);
        // TLS is terminated in the connection's task: still one descriptor.
        let tls = config(|c| c.tls_cert = Some("cert.pem".into()));
        assert_eq!(
            Capacity::new(&tls, Some(65_536), 0),
            Capacity::new(&Config::default(), Some(65_536), 0)
        );
    }

    #[test]
    fn a_graphql_endpoint_reserves_its_connections() {
        let plain = Capacity::new(&Config::default(), Some(65_536), 0);
        let graphql = config(|c| {
            c.graphql_endpoint = Some("http://127.0.0.1:4000/graphql".into());
            c.graphql_concurrency = 64;
        });
        let cap = Capacity::new(&graphql, Some(65_536), 0);
        assert_eq!(cap.reserve, plain.reserve + 64);
    }

    #[test]
    fn a_small_limit_keeps_half_for_the_reserve() {
        let cap = Capacity::new(&Config::default(), Some(256), 0);
        assert_eq!(cap.reserve, 128);
        assert_eq!((cap.max_connections, cap.refusing), (112, 16));
        let tiny = Capacity::new(&Config::default(), Some(4), 0);
        assert_eq!((tiny.max_connections, tiny.refusing), (1, 1));
    }
}
