//! Asking the origin for a decision, in one place: the synchronous events
//! (`connect`, and `publish` and `subscribe` for namespaces that ask the
//! origin) go alone in their batch, within a deadline, only while the node
//! holds its lease, with their latency and failures counted under their
//! kind. And the ids of every event, made by one set of functions, so a
//! retried event keeps its id and the origin can recognise it.

use super::dispatcher::batch_body;
use super::Origin;
use super::{ConnectDecision, OriginError};
use crate::metrics::KindLabel;
use std::fmt::Display;
use switchboard_proto::origin::Event;

/// Why asking the origin gave no decision.
#[derive(Debug)]
pub(crate) enum AskError {
    /// The node's cluster lease has run out: nothing was sent (see
    /// `switchboard_backend::lease`).
    CutOff,
    /// The request failed (unreachable, an error status, an unreadable
    /// answer).
    Failed(OriginError),
    /// No answer before the deadline.
    TimedOut,
}

/// Sends `event` alone in its batch and waits for the origin's decision
/// until `deadline`.
pub(crate) async fn ask(
    origin: &Origin,
    event: &Event,
    deadline: tokio::time::Instant,
) -> Result<ConnectDecision, AskError> {
    let kind = KindLabel { kind: event.kind() };
    if !origin.lease.is_held() {
        origin.metrics.lease_refusals.get_or_create(&kind).inc();
        return Err(AskError::CutOff);
    }
    let body = batch_body([&serde_json::to_vec(event).expect("events serialize")[..]]);
    let request = match event {
        Event::Connect(_) => origin.transport.connect(body),
        Event::Subscribe(_) => origin.transport.subscribe(body),
        _ => origin.transport.publish(body),
    };
    let started = std::time::Instant::now();
    let decision = tokio::time::timeout_at(deadline, request).await;
    origin.metrics.origin_request(kind.kind, started.elapsed());
    let failed = |e| {
        origin.metrics.origin_failures.get_or_create(&kind).inc();
        e
    };
    match decision {
        Ok(Ok(decision)) => Ok(decision),
        Ok(Err(OriginError::LeaseLost)) => {
            origin.metrics.lease_refusals.get_or_create(&kind).inc();
            Err(AskError::CutOff)
        }
        Ok(Err(e)) => Err(failed(AskError::Failed(e))),
        Err(_) => Err(failed(AskError::TimedOut)),
    }
}

/// Event ids (documented in docs/origin.md): stable for one event, unique
/// across events.
pub(crate) mod event_id {
    use std::fmt::Display;

    /// `<connection>:connect`.
    pub(crate) fn connect(conn: &impl Display) -> String {
        format!("{conn}:connect")
    }

    /// `<connection>:disconnect`.
    pub(crate) fn disconnect(conn: &impl Display) -> String {
        format!("{conn}:disconnect")
    }

    /// `<connection>:suspend:<n>` and `<connection>:resume:<n>`: the
    /// session's `n`-th suspension and its resume.
    pub(crate) fn session(conn: &impl Display, kind: &str, n: u32) -> String {
        format!("{conn}:{kind}:{n}")
    }

    /// `<connection>:<seq>`: the connection's `seq`-th message.
    pub(crate) fn message(conn: &impl Display, seq: u64) -> String {
        format!("{conn}:{seq}")
    }

    /// `<connection>:<kind>:<random>`: a `publish` or `subscribe` decision.
    pub(crate) fn decision(conn: &impl Display, kind: &str) -> String {
        format!("{conn}:{kind}:{:016x}", rand::random::<u64>())
    }

    /// `<node>:keepalive:<started>:<round>:<chunk>`: unique across runs of
    /// a node id.
    pub(crate) fn keepalive(
        node: &impl Display,
        started_ms: u64,
        round: u64,
        chunk: usize,
    ) -> String {
        format!("{node}:keepalive:{started_ms}:{round}:{chunk}")
    }

    /// `<node>:<instance>:node_down`: one per lost node run.
    pub(crate) fn node_down(node: &str, instance: &str) -> String {
        format!("{node}:{instance}:node_down")
    }
}

/// Logs a failed ask of `kind` for `who` (a connection or a handshake).
pub(crate) fn log_failure(kind: &str, who: &impl Display, e: &AskError) {
    match e {
        AskError::CutOff => tracing::debug!(%who, "{kind} not asked: this node is cut off"),
        AskError::Failed(e) => tracing::warn!(%who, error = %e, "{kind} event failed"),
        AskError::TimedOut => tracing::warn!(%who, "{kind} event: no answer in time"),
    }
}
