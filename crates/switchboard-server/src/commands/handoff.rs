//! Sessions across a cluster: a resume that reaches another node than the
//! one holding its session pulls the session over ([`pull`]); a draining
//! node hands the sessions nobody resumed to the other nodes
//! ([`hand_over_all`]); and commands for a connection that is not where its
//! id says are sent where it moved ([`locate`]). `sessions::handoff` does
//! the local half (giving up, adopting); `docs/sessions.md` is the
//! specification.

use super::control::{forward, forward_result, ApiError};
use super::Commands;
use futures_util::StreamExt as _;
use hyper::StatusCode;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use switchboard_backend::{ClusterError, CommandReply};
use switchboard_proto::control::{
    Command, ConnectionRef, Delivery, SendCommand, SendResponse, SessionState, SessionTake,
};
use switchboard_proto::native::{ResumeCode, ResumeError};
use switchboard_proto::origin::Payload;
use switchboard_proto::ConnectionId;

use crate::sessions::{connection_of, Holder};

/// Most ids of one batch looked for on every node when their node did not
/// know them: each costs a request to every node.
const MAX_RELOCATED: usize = 64;

/// Most bytes of a session's state a node answers with: under NATS's
/// default `max_payload` (1 MiB), which a reply over it would not get
/// through (a request over it is refused before it is sent: 413).
const MAX_STATE_BYTES: usize = 768 * 1024;

/// Sessions a draining node hands over at once.
const HANDOVER_CONCURRENCY: usize = 64;

/// Runs [`Command::SessionTake`] here: gives up the session to the asking
/// node, within half the time that node waits for the answer.
pub(super) async fn take(s: &Commands, t: SessionTake) -> CommandReply {
    let wait = s
        .cluster
        .get()
        .map_or(Duration::from_secs(2), |c| c.forward_timeout() / 2);
    let deadline = tokio::time::Instant::now() + wait;
    let key = connection_of(&t.token).map(|id| id.key());
    if let Some(key) = &key {
        // On its way here, or out of here: asked once it has settled.
        s.sessions.arrived(key, wait).await;
    }
    // Gone on from here: asked where it went (once: that node does not
    // forward it further).
    let moved = key
        .and_then(|k| s.sessions.moved_to(&k))
        .filter(|n| *n != t.node && !t.forwarded);
    if let Some(node) = moved {
        let again = Command::SessionTake(SessionTake {
            forwarded: true,
            ..t
        });
        return forward(s, &node, &again).await;
    }
    match s
        .sessions
        .give_up(&t.token, t.received, &t.node, deadline)
        .await
    {
        Ok(state) => match movable(s, state) {
            Ok(body) => CommandReply {
                status: 200,
                body: body.into(),
            },
            Err(e) => refusal_reply(&e),
        },
        Err(e) => refusal_reply(&e),
    }
}

/// The JSON of a session given up here, if it fits in one message of the
/// bus; otherwise the session is kept here again (suspended: it ends with
/// its ttl) and the refusal says so.
fn movable(s: &Commands, state: SessionState) -> Result<Vec<u8>, ResumeError> {
    let body = serde_json::to_vec(&state).expect("states serialize");
    if body.len() <= MAX_STATE_BYTES {
        return Ok(body);
    }
    Err(keep_here(s, state))
}

/// Keeps a session given up here that cannot move (too large for the bus):
/// suspended here again, it ends with its ttl or the drain.
fn keep_here(s: &Commands, state: SessionState) -> ResumeError {
    s.sessions.count_handoff("too_large");
    tracing::warn!(connection = %state.connection_id, "a session too large to move between nodes stays here");
    if let Err(e) = keep(s, state) {
        return e;
    }
    ResumeError {
        code: ResumeCode::SessionClosed,
        message: format!(
            "the session keeps more direct messages than can move between nodes; it stays on node {}",
            s.node
        ),
    }
}

/// Runs [`Command::SessionGive`] here: keeps the session for its client.
pub(super) fn give(s: &Commands, state: Box<SessionState>) -> CommandReply {
    match s.sessions.adopt(*state) {
        Ok(_) => CommandReply {
            status: 200,
            body: b"{}".to_vec().into(),
        },
        Err(e) => refusal_reply(&e),
    }
}

fn refusal_reply(e: &ResumeError) -> CommandReply {
    let status = match e.code {
        ResumeCode::SessionUnknown => StatusCode::NOT_FOUND,
        _ => StatusCode::CONFLICT,
    };
    ApiError::new(status, e.code.as_str(), e.message.clone()).into()
}

/// What a node answered a [`Command::SessionTake`].
enum Taken {
    Got(Box<SessionState>),
    Refused(ResumeError),
    /// It does not hold the session (or could not be asked).
    NotThere(String),
}

async fn ask(s: &Commands, node: &str, take: &Command) -> Taken {
    let reply = forward(s, node, take).await;
    if reply.status == 200 {
        return match serde_json::from_slice::<SessionState>(&reply.body) {
            Ok(state) => Taken::Got(Box::new(state)),
            Err(e) => Taken::NotThere(format!("node {node} answered an unreadable session: {e}")),
        };
    }
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    match serde_json::from_value::<ResumeCode>(body["code"].clone()) {
        Ok(ResumeCode::SessionUnknown) | Err(_) => Taken::NotThere(message),
        Ok(code) => Taken::Refused(ResumeError { code, message }),
    }
}

/// Brings the session named by `token` here from the node holding it, for
/// a resume on this node: `Ok` when it is here now, or when there is
/// nothing to bring (no cluster, held here already, a token the local
/// resume refuses anyway, or no node holds it: the local resume answers
/// `session_unknown`). A refusal of the holder (expired, closed, outbox
/// overflow, `received` ahead) is the resume's refusal.
pub(crate) async fn pull(
    s: &Arc<Commands>,
    token: &str,
    received: Option<&str>,
    deadline: tokio::time::Instant,
) -> Result<(), ResumeError> {
    let Some(cluster) = s.cluster.get() else {
        return Ok(());
    };
    if !s.sessions.enabled() || s.sessions.holds(token) {
        return Ok(());
    }
    let Some(id) = connection_of(token) else {
        return Ok(());
    };
    let Ok(received) = received.map_or(Ok(0), str::parse::<u64>) else {
        return Ok(());
    };
    // Commands for it wait for it here from now on.
    let Some(_arrival) = s.sessions.arrival(id.key()) else {
        // Another resume is bringing it: this one takes it over here.
        s.sessions
            .arrived(&id.key(), cluster.forward_timeout())
            .await;
        return Ok(());
    };
    let take = Command::SessionTake(SessionTake {
        token: token.to_owned(),
        received,
        node: s.node.to_string(),
        forwarded: false,
    });
    // Where it was last seen, else the node that started it; then every
    // other node.
    let first = s
        .sessions
        .moved_to(&id.key())
        .or_else(|| (id.node() != s.node.as_str()).then(|| id.node().to_owned()));
    if let Some(node) = &first {
        match ask(s, node, &take).await {
            Taken::Got(state) => return keep(s, *state),
            Taken::Refused(e) => return Err(e),
            Taken::NotThere(why) => {
                tracing::debug!(connection = %id, %node, %why, "session not on its last node");
            }
        }
    }
    // Where the session store says, next: one request instead of one per
    // node.
    let stored = stored_peer(s, id.as_str())
        .await
        .filter(|n| Some(n) != first.as_ref());
    if let Some(node) = &stored {
        match ask(s, node, &take).await {
            Taken::Got(state) => return keep(s, *state),
            Taken::Refused(e) => return Err(e),
            Taken::NotThere(why) => {
                tracing::debug!(connection = %id, %node, %why, "session not where the session store says");
            }
        }
    }
    let mut asked = peers_except(
        s,
        &[
            first.as_deref().unwrap_or_default(),
            stored.as_deref().unwrap_or_default(),
        ],
    );
    let answers = futures_util::future::join_all(asked.iter().map(|n| ask(s, n, &take))).await;
    let mut refused = None;
    for answer in answers {
        match answer {
            Taken::Got(state) => return keep(s, *state),
            Taken::Refused(e) => refused = refused.or(Some(e)),
            Taken::NotThere(why) => {
                tracing::debug!(connection = %id, %why, "session not on this node");
            }
        }
    }
    if let Some(e) = refused {
        return Err(e);
    }
    // Held by a node that was lost: the node that reports it adopts it.
    asked.extend(first);
    asked.extend(stored);
    let until = deadline - Duration::from_millis(500);
    let Some(node) = adopter(s, &id, &asked, until).await else {
        tracing::debug!(connection = %id, ?asked, "session held by no node, by the session store");
        return Ok(());
    };
    tracing::debug!(connection = %id, %node, "session adopted after its node was lost");
    if node == s.node.as_str() {
        // Adopted here (or about to be).
        while s.sessions.adopting(&id.key()) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        return Ok(());
    }
    match ask(s, &node, &take).await {
        Taken::Got(state) => keep(s, *state),
        Taken::Refused(e) => Err(e),
        Taken::NotThere(_) => Ok(()),
    }
}

/// The node holding session `id` by the session store, when no node had
/// it. One that was not `asked`, or this node, is returned at once.
/// Otherwise it is waited for (within `until`): the node (or run) the
/// record names is lost and not reported yet, and the node that reports
/// it adopts its sessions; the adopter is returned once the record names it.
async fn adopter(
    s: &Commands,
    id: &ConnectionId,
    asked: &[String],
    until: tokio::time::Instant,
) -> Option<String> {
    let peers = live_peers(s);
    let first = s.sessions.recorded_holder(id).await?;
    match s.sessions.classify(&first, &peers) {
        Holder::Here => return Some(s.node.to_string()),
        Holder::Peer(node) if !asked.contains(&node) => return Some(node),
        _ => {}
    }
    loop {
        if tokio::time::Instant::now() + ADOPTER_POLL >= until {
            return None;
        }
        tokio::time::sleep(ADOPTER_POLL).await;
        let now = s.sessions.recorded_holder(id).await?;
        if now == first {
            continue;
        }
        match s.sessions.classify(&now, &live_peers(s)) {
            Holder::Here => return Some(s.node.to_string()),
            Holder::Peer(node) => return Some(node),
            Holder::Lost(..) => {}
        }
    }
}

/// The live node (not this one) that holds session `id` by the session
/// store, if there is a store and it says so.
async fn stored_peer(s: &Commands, id: &str) -> Option<String> {
    if !s.sessions.storing() {
        return None;
    }
    let cid = ConnectionId::parse(id).ok()?;
    let found = s.sessions.recorded_holder(&cid).await?;
    match s.sessions.classify(&found, &live_peers(s)) {
        Holder::Peer(node) => Some(node),
        Holder::Here | Holder::Lost(..) => None,
    }
}

/// How often a resume waiting for a lost node's session reads its record.
const ADOPTER_POLL: Duration = Duration::from_millis(200);

/// The live nodes but this one, each with when it started (its run).
fn live_peers(s: &Commands) -> Vec<(String, u64)> {
    s.cluster.get().map_or_else(Vec::new, |c| {
        c.peers()
            .into_iter()
            .filter(|p| p.node != s.node.as_str())
            .map(|p| (p.node, p.started_at_ms))
            .collect()
    })
}

/// Where session `id`, found on no node, is by the session store.
pub(super) enum Recorded {
    /// Nowhere: it ended (or was never a session).
    Nowhere,
    /// On this node or `node` now (it was adopted or moved meanwhile).
    At(Option<String>),
    /// Its node was lost and another is about to adopt it: try again.
    Adopting,
}

/// Where session `id`, found on no node, is by the session store: where
/// its record says, unless that node (or run) is gone or does not answer
/// for it: then it is being adopted.
pub(super) async fn recorded(s: &Commands, id: &str) -> Recorded {
    let Ok(cid) = ConnectionId::parse(id) else {
        return Recorded::Nowhere;
    };
    let Some(found) = s.sessions.recorded_holder(&cid).await else {
        return Recorded::Nowhere;
    };
    match s.sessions.classify(&found, &live_peers(s)) {
        Holder::Here if s.registry.get(&cid.key()).is_some() => Recorded::At(None),
        Holder::Here if s.sessions.adopting(&cid.key()) => Recorded::Adopting,
        Holder::Here => Recorded::Nowhere,
        Holder::Lost(..) => Recorded::Adopting,
        Holder::Peer(node) => {
            let info = Command::Info(ConnectionRef {
                connection_id: id.to_owned(),
            });
            match forward_result(s, &node, &info).await {
                Ok(reply) if reply.status == 200 => Recorded::At(Some(node)),
                // Gone, or not answering: lost and not reported yet.
                Ok(reply) if reply.status >= 500 => Recorded::Adopting,
                Ok(_) => Recorded::Nowhere,
                Err(ClusterError::TooLarge(_)) => Recorded::Nowhere,
                Err(_) => Recorded::Adopting,
            }
        }
    }
}

/// Keeps a session given up by another node (or, undone, by this one):
/// one that cannot be kept has ended, and the origin is told so.
fn keep(s: &Commands, state: SessionState) -> Result<(), ResumeError> {
    let id = state.connection_id.clone();
    s.sessions.adopt(state).map(drop).inspect_err(|e| {
        tracing::warn!(connection = %id, error = %e.message, "a session on the move could not be kept");
        if let Ok(id) = ConnectionId::parse(&id) {
            lost(s, &id);
        }
    })
}

/// A session given up here or there and kept nowhere: counted, the
/// origin gets its `disconnect` (`session lost in a handoff`), and it
/// leaves the session store.
fn lost(s: &Commands, id: &ConnectionId) {
    s.sessions.count_handoff("failed");
    s.sessions.void_disconnect(id, "session lost in a handoff");
    s.sessions.drop_stored(id);
}

/// The live nodes but this one and those in `skip`.
fn peers_except(s: &Commands, skip: &[&str]) -> Vec<String> {
    live_peers(s)
        .into_iter()
        .map(|(node, _)| node)
        .filter(|n| !skip.contains(&n.as_str()))
        .collect()
}

/// The live, not draining nodes but this one: those a draining node can
/// hand its sessions to.
pub(crate) fn heirs(s: &Commands) -> Vec<String> {
    s.cluster.get().map_or_else(Vec::new, |c| {
        c.peers()
            .into_iter()
            .filter(|p| !p.draining && p.node != s.node.as_str())
            .map(|p| p.node)
            .collect()
    })
}

/// The node holding connection `id` (not this one): the node of the
/// cluster that answers for it (each runs the lookup locally: only the
/// holder answers 200).
pub(super) async fn locate(s: &Commands, id: &str) -> Option<String> {
    if !s.sessions.enabled() {
        return None;
    }
    let info = Command::Info(ConnectionRef {
        connection_id: id.to_owned(),
    });
    // Where the session store says, first: one request instead of one per
    // node.
    if let Some(node) = stored_peer(s, id).await {
        if forward(s, &node, &info).await.status == 200 {
            return Some(node);
        }
    }
    let others = peers_except(s, &[]);
    let answers = futures_util::future::join_all(others.iter().map(|n| forward(s, n, &info))).await;
    others
        .into_iter()
        .zip(answers)
        .find(|(_, reply)| reply.status == 200)
        .map(|(node, _)| node)
}

/// Sends again, where they are now, the messages of a batch that their
/// connections' nodes answered `unknown` for (at most [`MAX_RELOCATED`]
/// connections; the others stay `unknown`), each connection's in order.
/// Ids whose node did not answer (`uncertain`) are not sent again.
pub(super) async fn relocate_unknown(
    s: &Commands,
    results: &mut [BTreeMap<String, Delivery>],
    payloads: &[Payload],
    uncertain: &std::collections::HashSet<String>,
) {
    let mut unknown: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        for (id, d) in r {
            if *d == Delivery::Unknown
                && !uncertain.contains(id)
                && (unknown.len() < MAX_RELOCATED || unknown.contains_key(id))
            {
                unknown.entry(id.clone()).or_default().push(i);
            }
        }
    }
    let found = unknown.into_iter().map(|(id, messages)| async move {
        let mut out = Vec::new();
        let Some(node) = locate(s, &id).await else {
            return out;
        };
        if let Ok(cid) = ConnectionId::parse(&id) {
            s.sessions.remember_location(cid.key(), &node);
        }
        for i in messages {
            let cmd = Command::Send(SendCommand {
                connection_id: id.clone(),
                payload: payloads[i].clone(),
            });
            let reply = forward(s, &node, &cmd).await;
            let status = (reply.status == 200)
                .then(|| serde_json::from_slice::<SendResponse>(&reply.body).ok())
                .flatten()
                .map_or(Delivery::Unknown, |r| r.status);
            out.push((i, id.clone(), status));
        }
        out
    });
    for (i, id, status) in futures_util::future::join_all(found)
        .await
        .into_iter()
        .flatten()
    {
        results[i].insert(id, status);
    }
}

/// A draining node's sessions that no resume has taken yet: each is given
/// to another live node (in turn), which keeps it, suspended, for its
/// client. Returns how many were handed over; a session no node took stays
/// here, and ends with the drain.
pub(crate) async fn hand_over_all(s: &Commands, until: tokio::time::Instant) -> usize {
    let nodes = heirs(s);
    if nodes.is_empty() {
        return 0;
    }
    let sessions = s.sessions.suspended_sessions();
    let gives = sessions.into_iter().enumerate().map(|(i, conn)| {
        let node = nodes[i % nodes.len()].clone();
        async move {
            if tokio::time::Instant::now() >= until {
                return None; // Ends with the drain.
            }
            // Commands and resumes for it wait here until it has arrived.
            let _departing = s.sessions.arrival(conn.key)?;
            let state = s.sessions.give_up_suspended(&conn)?;
            let give = Command::SessionGive(Box::new(state));
            let reply = forward(s, &node, &give).await;
            let Command::SessionGive(state) = give else {
                return None;
            };
            let arrived = match reply.status {
                200 => true,
                // Not sent (too large for the bus) or refused there: kept
                // here, it ends with the drain.
                400..=499 => false,
                // No answer: there, unless that node does not know it.
                _ => {
                    let info = Command::Info(ConnectionRef {
                        connection_id: state.connection_id.clone(),
                    });
                    match forward(s, &node, &info).await.status {
                        200 => true,
                        404 => false,
                        _ => {
                            // Whether it is there cannot be known: it ends.
                            tracing::warn!(connection = %conn.id(), %node, "a draining node's session was lost on its way");
                            lost(s, &conn.id());
                            return None;
                        }
                    }
                }
            };
            if arrived {
                s.sessions.remember_location(conn.key, &node);
                return Some(());
            }
            if reply.status == 413 {
                keep_here(s, *state);
            } else {
                tracing::warn!(connection = %conn.id(), %node, status = reply.status, "a draining node's session was not taken; it ends here");
                s.sessions.count_handoff("failed");
                let _ = keep(s, *state);
            }
            None
        }
    });
    futures_util::stream::iter(gives)
        .buffer_unordered(HANDOVER_CONCURRENCY)
        .filter_map(std::future::ready)
        .count()
        .await
}
