//! Control commands: each [`Command`] executed on this node, or forwarded
//! through the cluster to the node that holds its connection. The HTTP
//! routes that turn requests into commands are `edge::api`'s; a cluster
//! backend hands forwarded commands to [`execute_json`].
//!
//! Errors carry a status and a stable `code` (listed in
//! `docs/control-api.md`), whichever way the command came.

use super::handoff::Recorded;
use super::Commands;
use crate::bus::BusError;
use crate::channels::{Ack, ChannelError, Subscribed};
use crate::conn::{CloseRequest, Conn, Outgoing, Queued};
use axum::http::StatusCode;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use switchboard_backend::{ClusterError, CommandReply};
use switchboard_proto::control::{
    BatchMessage, BatchSendRequest, BatchSendResponse, ChannelsResponse, CloseCommand, Command,
    ConnectionInfo, ConnectionRef, ConnectionsResponse, Delivery, ErrorBody, FallbackRequest,
    GraphqlTrigger, GraphqlTriggerResponse, NodeInfo, NodesResponse, PublishCommand,
    PublishResponse, SendCommand, SendResponse, Stats, SubscribeCommand, SubscribeResponse,
    UnsubscribeCommand, UserRef,
};
use switchboard_proto::native::SubscribeResult;
use switchboard_proto::origin::{ClosedBy, Payload};
use switchboard_proto::ws::close;
use switchboard_proto::ConnectionId;

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 404 `node_not_found`: no live node is named `node`.
    fn node_not_found(node: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "node_not_found",
            format!("no live node {node:?}"),
        )
    }

    /// 404 [`MOVED`]: the session went on to `node` (between nodes only).
    fn moved(node: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, MOVED, node)
    }

    pub(crate) fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "connection_not_found",
            format!("no open connection {id:?} on this node"),
        )
    }
}

impl From<ApiError> for CommandReply {
    fn from(e: ApiError) -> Self {
        reply(
            e.status,
            &ErrorBody {
                code: e.code.into(),
                message: e.message,
            },
        )
    }
}

/// A reply with `status` and `body` serialized.
fn reply(status: StatusCode, body: &impl serde::Serialize) -> CommandReply {
    CommandReply {
        status: status.as_u16(),
        body: Bytes::from(serde_json::to_vec(body).expect("bodies serialize")),
    }
}

fn ok(body: &impl serde::Serialize) -> CommandReply {
    reply(StatusCode::OK, body)
}

/// Whether a command's JSON carries both `text` and `binary` at its top
/// level or in one of its `messages` (a message is exactly one of them;
/// serde's `flatten` would otherwise take the first and drop the other).
fn two_payloads(v: &serde_json::Value) -> bool {
    let both = |m: &serde_json::Value| {
        m.as_object()
            .is_some_and(|o| o.contains_key("text") && o.contains_key("binary"))
    };
    both(v)
        || v.get("messages")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|ms| ms.iter().any(both))
}

/// Refuses a body that gives a message both as `text` and as `binary`.
pub(crate) fn single_payload(json: &[u8]) -> Result<(), ApiError> {
    let has = |needle: &[u8]| json.windows(needle.len()).any(|w| w == needle);
    // Parsed a second time only when it may hold both keys (a key may
    // also be spelled with `\u` escapes).
    if !(has(b"\\u") || (has(b"binary") && has(b"text"))) {
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Value>(json) {
        Ok(v) if two_payloads(&v) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "a message is exactly one of `text` or `binary`, not both",
        )),
        _ => Ok(()),
    }
}

/// The local connection named `id` (started here, or a session that moved
/// here from another node), or 404.
fn lookup(s: &Commands, id: &str) -> Result<Arc<Conn>, ApiError> {
    ConnectionId::parse(id)
        .ok()
        .and_then(|cid| s.registry.get(&cid.key()).filter(|c| c.has_id(&cid)))
        .ok_or_else(|| ApiError::not_found(id))
}

/// The local connection named `id` that messages can be sent to: 404, or
/// 409 `graphql_connection` for a GraphQL client (which would take them for
/// broken protocol messages).
fn lookup_messaging(s: &Commands, id: &str) -> Result<Arc<Conn>, ApiError> {
    let conn = lookup(s, id)?;
    if conn.graphql.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "graphql_connection",
            "a GraphQL connection takes only GraphQL messages: publish a trigger instead",
        ));
    }
    Ok(conn)
}

/// The node holding `id` when it is another node of the cluster and the
/// command should go there: where its session moved to from here (or was
/// last found), or the node that started it. None when the command was
/// `forwarded` here: it runs here only.
pub(super) fn remote_owner(s: &Commands, id: &str, forwarded: bool) -> Option<String> {
    if forwarded {
        return None;
    }
    s.cluster.get()?;
    let cid = ConnectionId::parse(id).ok()?;
    if s.registry.get(&cid.key()).is_some() {
        return None;
    }
    if let Some(node) = s.sessions.moved_to(&cid.key()) {
        return Some(node);
    }
    (cid.node() != s.node.as_str()).then(|| cid.node().to_owned())
}

/// Whether a reply says that no such connection (or fallback session) is
/// where it was looked for.
pub(super) fn is_not_found(reply: &CommandReply) -> bool {
    reply.status == StatusCode::NOT_FOUND.as_u16()
        && serde_json::from_slice::<serde_json::Value>(&reply.body).is_ok_and(|v| {
            v["code"] == "connection_not_found"
                || v["code"] == MOVED
                || v["code"] == "session_unknown"
        })
}

/// Sends `cmd` to `node`: its answer, or why there is none (counted).
pub(super) async fn forward_result(
    s: &Commands,
    node: &str,
    cmd: &Command,
) -> Result<CommandReply, ClusterError> {
    let cluster = s
        .cluster
        .get()
        .ok_or_else(|| ClusterError::NodeGone(node.to_owned()))?;
    let body = Bytes::from(serde_json::to_vec(cmd).expect("commands serialize"));
    s.metrics.forwarded.inc();
    cluster.forward(node, body).await.inspect_err(|_| {
        s.metrics.forward_failures.inc();
    })
}

/// Sends `cmd` to `node` and returns its answer, or the error standing for it.
pub(super) async fn forward(s: &Commands, node: &str, cmd: &Command) -> CommandReply {
    if s.cluster.get().is_none() {
        return ApiError::not_found(node).into();
    }
    match forward_result(s, node, cmd).await {
        Ok(reply) => reply,
        Err(e) => {
            let (status, code) = match e {
                ClusterError::NodeGone(_) => (StatusCode::NOT_FOUND, "connection_not_found"),
                ClusterError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable")
                }
                ClusterError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "node_timeout"),
                ClusterError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            };
            ApiError::new(status, code, e.to_string()).into()
        }
    }
}

/// Executes a command given as JSON (from the cluster backend).
pub(crate) async fn execute_json(s: &Arc<Commands>, json: &[u8], forwarded: bool) -> CommandReply {
    if let Err(e) = single_payload(json) {
        return e.into();
    }
    match serde_json::from_slice::<Command>(json) {
        Ok(cmd) => execute(s, cmd, forwarded).await,
        Err(e) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()).into(),
    }
}

/// Executes a command here, or forwards it to the node that holds its
/// connection. `forwarded`: it came from another node, so run it here only.
pub(crate) async fn execute(s: &Arc<Commands>, cmd: Command, forwarded: bool) -> CommandReply {
    let connection = match &cmd {
        Command::Send(SendCommand { connection_id, .. })
        | Command::Close(CloseCommand { connection_id, .. })
        | Command::Info(ConnectionRef { connection_id })
        | Command::Subscribe(SubscribeCommand { connection_id, .. })
        | Command::Unsubscribe(UnsubscribeCommand { connection_id, .. }) => {
            Some(connection_id.clone())
        }
        // A session token is its connection id and a MAC.
        Command::Fallback(FallbackRequest { session, .. }) => {
            session.rsplit_once('.').map(|(id, _)| id.to_owned())
        }
        _ => None,
    };
    let Some(id) = connection else {
        return execute_here(s, cmd, forwarded).await;
    };
    let key = ConnectionId::parse(&id).ok().map(|c| c.key());
    let mut target = remote_owner(s, &id, forwarded);
    let mut asked: Vec<String> = Vec::new();
    let mut hops = 0;
    // Looked for on every node once: then followed from where it was found.
    let mut located = false;
    let reply = loop {
        let reply = match &target {
            Some(node) => {
                asked.push(node.clone());
                forward(s, node, &cmd).await
            }
            None => {
                arrived(s, &id).await;
                execute_here(s, cmd.clone(), forwarded).await
            }
        };
        if !is_not_found(&reply) {
            if let (true, Some(k), Some(node)) = (located, key, &target) {
                s.sessions.remember_location(k, node);
            }
            return reply;
        }
        if forwarded {
            // Gone on from here: the asking node is told where.
            return match key.and_then(|k| s.sessions.moved_to(&k)) {
                Some(node) => ApiError::moved(&node).into(),
                None => reply,
            };
        }
        hops += 1;
        // Where the node asked says it went, or where it went from here
        // (it left while the command waited for it).
        let went = moved_hint(&reply).or_else(|| {
            target
                .is_none()
                .then(|| key.and_then(|k| s.sessions.moved_to(&k)))
                .flatten()
        });
        let here = key.is_some_and(|k| s.registry.get(&k).is_some() || s.sessions.is_arriving(&k));
        let next = match went {
            _ if hops > MAX_HOPS => None,
            // Here now, or on its way here.
            _ if target.is_some() && here => Some(None),
            Some(n) if n == s.node.as_str() && target.is_some() => Some(None),
            Some(n) if !asked.contains(&n) && n != s.node.as_str() => Some(Some(n)),
            _ => None,
        };
        if let Some(next) = next {
            target = next;
            continue;
        }
        if located {
            break reply;
        }
        // Not where its id says, nor where it was followed to: a session
        // that moved (maybe more than once meanwhile). Every node is asked.
        located = true;
        match super::handoff::locate(s, &id).await {
            Some(node) => {
                target = Some(node);
                hops = 0;
                asked.clear();
            }
            None => break reply,
        }
    };
    tracing::debug!(connection = %id, ?asked, hops, "connection not found on any node");
    // A session whose node was lost lives on where the session store says.
    match super::handoff::recorded(s, &id).await {
        Recorded::Nowhere => {}
        Recorded::At(None) => return execute_here(s, cmd, forwarded).await,
        Recorded::At(Some(node)) => {
            if let Some(k) = key {
                s.sessions.remember_location(k, &node);
            }
            return forward(s, &node, &cmd).await;
        }
        Recorded::Adopting => return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "session_unavailable",
            "the session's node was lost and another node is adopting it: retry in a few seconds",
        )
        .into(),
    }
    if moved_hint(&reply).is_some() {
        ApiError::not_found(&id).into()
    } else {
        reply
    }
}

/// How many nodes a command follows a session through before it looks for
/// it on every node.
const MAX_HOPS: usize = 3;

/// The node a forwarded command's answer says the session moved to.
fn moved_hint(reply: &CommandReply) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
    (v["code"] == MOVED)
        .then(|| v["message"].as_str().map(str::to_owned))
        .flatten()
}

/// Code of the answer of a node that a session left, to a command
/// forwarded to it: its message is the node the session went to. Only
/// between nodes; never answered to a client of the control API.
const MOVED: &str = "connection_moved";

/// Waits while the session `id` is on its way here from another node.
async fn arrived(s: &Commands, id: &str) {
    let Some(cluster) = s.cluster.get() else {
        return;
    };
    // Nothing to parse for while nothing is on its way (a batch asks this
    // for every id).
    if !s.sessions.anything_arriving() {
        return;
    }
    if let Ok(cid) = ConnectionId::parse(id) {
        s.sessions
            .arrived(&cid.key(), cluster.forward_timeout() / 2)
            .await;
    }
}

/// Executes a command on this node (a batch or a listing may still ask
/// the others).
async fn execute_here(s: &Arc<Commands>, cmd: Command, forwarded: bool) -> CommandReply {
    let acts_on_connections = matches!(
        cmd,
        Command::Send(_)
            | Command::SendBatch(_)
            | Command::Close(_)
            | Command::Subscribe(_)
            | Command::Unsubscribe(_)
    );
    if acts_on_connections && !s.lease.is_held() {
        // The cluster may have reported this node lost: its connections are
        // retired (see `crate::lease`).
        s.metrics
            .lease_refusals
            .get_or_create(&crate::metrics::KindLabel { kind: "command" })
            .inc();
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_cut_off",
            "this node is cut off from its cluster and may have been reported lost",
        )
        .into();
    }
    match cmd {
        Command::Send(c) => send_local(s, c).await,
        Command::SendBatch(b) => send_batch_routed(s, b, forwarded).await,
        Command::Close(c) => close_local(s, c),
        Command::Info(c) => info_local(s, &c.connection_id),
        Command::Stats => ok(&stats_local(s)),
        Command::Connections(u) => connections_of(s, &u.user_id, forwarded).await,
        Command::Nodes => ok(&nodes_local(s)),
        Command::Subscribe(c) => subscribe_local(s, c).await,
        Command::Unsubscribe(c) => unsubscribe_local(s, c),
        Command::Publish(c) => publish_command(s, c).await,
        Command::History(c) => answer(
            s.channels
                .history_async(&c.channel, c.since.as_ref(), c.limit, &s.metrics)
                .await,
        ),
        Command::Presence(c) => answer(s.channels.presence_async(&c.channel).await),
        Command::Channels => ok(&ChannelsResponse {
            channels: s.channels.list(),
        }),
        Command::GraphqlTrigger(t) => graphql_trigger(s, t, forwarded).await,
        Command::GraphqlExecute(e) => s.graphql.execute_for_peer(e).await,
        Command::SessionTake(t) => super::handoff::take(s, t).await,
        Command::SessionGive(g) => super::handoff::give(s, g),
        Command::Fallback(r) => match s.fallbacks.get() {
            Some(runner) => runner.run(r).await,
            None => ApiError::new(
                StatusCode::NOT_FOUND,
                "session_unknown",
                "this node holds no HTTP fallback sessions",
            )
            .into(),
        },
    }
}

impl From<ChannelError> for ApiError {
    fn from(e: ChannelError) -> Self {
        let (status, code) = match &e {
            ChannelError::BadChannel => (StatusCode::BAD_REQUEST, "bad_channel"),
            ChannelError::UnknownNamespace(_) => (StatusCode::NOT_FOUND, "unknown_namespace"),
            ChannelError::HistoryDisabled => (StatusCode::BAD_REQUEST, "history_disabled"),
            ChannelError::PresenceDisabled => (StatusCode::BAD_REQUEST, "presence_disabled"),
            ChannelError::TooManySubscriptions(_) => {
                (StatusCode::CONFLICT, "too_many_subscriptions")
            }
            ChannelError::ConnectionGone => (StatusCode::NOT_FOUND, "connection_not_found"),
            ChannelError::Bus(BusError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable")
            }
            ChannelError::Bus(BusError::TooLarge(_)) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            // Not produced by control commands (the origin may do anything).
            ChannelError::PermissionDenied(_) | ChannelError::AlreadySubscribed => {
                (StatusCode::CONFLICT, "conflict")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// 200 with the result, or the channel error.
fn answer<T: serde::Serialize>(r: Result<T, ChannelError>) -> CommandReply {
    match r {
        Ok(body) => ok(&body),
        Err(e) => ApiError::from(e).into(),
    }
}

async fn subscribe_local(s: &Commands, c: SubscribeCommand) -> CommandReply {
    let conn = match lookup_messaging(s, &c.connection_id) {
        Ok(conn) => conn,
        Err(e) => return e.into(),
    };
    let ch = &s.channels;
    let subscribed = |r: SubscribeResult| {
        ok(&SubscribeResponse {
            epoch: r.epoch,
            offset: r.offset,
            recovered: r.recovered,
            already: false,
        })
    };
    let r = ch.subscribe(&conn, &c.channel, c.since.as_ref(), Ack::Push, &s.metrics);
    if r.is_ok() {
        s.sessions.touch(&conn, true);
    }
    match r {
        Ok(Subscribed::Now(r)) => subscribed(r),
        // A replica reading the channel's log first (cluster).
        Ok(Subscribed::Later(rx)) => match tokio::time::timeout(ch.request_timeout(), rx).await {
            Ok(Ok(r)) => subscribed(r),
            Ok(Err(_)) => ApiError::not_found(&c.connection_id).into(),
            Err(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "node_timeout",
                "the channel's log did not answer in time; the subscription completes when it does",
            )
            .into(),
        },
        Err(ChannelError::AlreadySubscribed) => answer(ch.position(&c.channel, &s.metrics).map(
            |(epoch, offset)| SubscribeResponse {
                epoch,
                offset,
                recovered: None,
                already: true,
            },
        )),
        Err(ChannelError::ConnectionGone) => ApiError::not_found(&c.connection_id).into(),
        Err(e) => ApiError::from(e).into(),
    }
}

fn unsubscribe_local(s: &Commands, c: UnsubscribeCommand) -> CommandReply {
    let conn = match lookup(s, &c.connection_id) {
        Ok(conn) => conn,
        Err(e) => return e.into(),
    };
    match s.channels.unsubscribe(&conn, &c.channel, true, &s.metrics) {
        Ok(_) => {
            s.sessions.touch(&conn, true);
            CommandReply {
                status: StatusCode::NO_CONTENT.as_u16(),
                body: Bytes::new(),
            }
        }
        Err(e) => ApiError::from(e).into(),
    }
}

async fn publish_command(s: &Commands, c: PublishCommand) -> CommandReply {
    if c.idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 256)
    {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "idempotency_key must be 1-256 bytes",
        )
        .into();
    }
    answer(
        s.channels
            .publish_async(
                &c.channel,
                c.payload,
                c.idempotency_key.as_deref(),
                &s.metrics,
            )
            .await
            .map(|(r, duplicate)| PublishResponse {
                offset: r.offset,
                epoch: r.epoch,
                duplicate,
            }),
    )
}

async fn send_local(s: &Commands, c: SendCommand) -> CommandReply {
    let conn = match lookup_messaging(s, &c.connection_id) {
        Ok(conn) => conn,
        Err(e) => return e.into(),
    };
    match delivery(s, &conn, &Outgoing::new(c.payload)) {
        Delivery::Unknown => ApiError::not_found(&c.connection_id).into(),
        status => {
            // In a cluster with a session store: answered once the message
            // is stored too (or that timed out, counted).
            s.sessions.stored(&conn).await;
            ok(&SendResponse { status })
        }
    }
}

/// Queues a control-API message on a connection: `queued` for a suspended
/// session; a suspended session over its outbox's bounds ends, and the
/// message is `unknown` as for any connection that is gone.
fn delivery(s: &Commands, conn: &Conn, out: &Outgoing) -> Delivery {
    match conn.send_after_replies(out, &s.metrics) {
        Queued::Yes => Delivery::Delivered,
        Queued::Kept => Delivery::Queued,
        Queued::Closed => {
            s.sessions.overflowed(conn);
            Delivery::Unknown
        }
    }
}

/// Most ids of one node in one forwarded batch request, so that the request
/// and its reply stay well under the bus's message size limit (NATS's
/// `max_payload`, 1 MiB by default).
const MAX_IDS_PER_FORWARD: usize = 8_192;

/// One node's share of a batch: (message index, that node's ids of it).
type Share = Vec<(usize, Vec<String>)>;

/// Sends a batch: local ids at once, then each other node's share of every
/// message in one request per node (per [`MAX_IDS_PER_FORWARD`] ids, sent one
/// after the other so a connection's messages stay in order), nodes
/// concurrently. Ids of nodes that cannot be reached are `unknown`.
async fn send_batch_routed(
    s: &Arc<Commands>,
    req: BatchSendRequest,
    forwarded: bool,
) -> CommandReply {
    let mut results = vec![BTreeMap::new(); req.messages.len()];
    // Ids found nowhere may be sessions that moved: looked for, if any
    // node may hold them.
    let relocatable = !forwarded && s.cluster.get().is_some() && s.sessions.enabled();
    let payloads: Vec<Payload> = if relocatable {
        req.messages.iter().map(|m| m.payload.clone()).collect()
    } else {
        Vec::new()
    };
    let mut remote: BTreeMap<String, Share> = BTreeMap::new();
    let mut uncertain = std::collections::HashSet::new();
    // Payloads of messages that have ids on other nodes.
    let mut kept: BTreeMap<usize, Payload> = BTreeMap::new();
    // Local sessions sent to, each once per message (with a session store).
    let mut sessions: Vec<Arc<Conn>> = Vec::new();
    let storing = s.sessions.storing();
    for (i, m) in req.messages.into_iter().enumerate() {
        let mut local = Vec::new();
        for id in m.connection_ids {
            let Some(node) = remote_owner(s, &id, forwarded) else {
                local.push(id);
                continue;
            };
            let share = remote.entry(node).or_default();
            match share.last_mut() {
                Some((j, ids)) if *j == i => ids.push(id),
                _ => share.push((i, vec![id])),
            }
        }
        let has_remote = remote
            .values()
            .any(|sh| sh.last().is_some_and(|(j, _)| *j == i));
        if local.is_empty() {
            if has_remote {
                kept.insert(i, m.payload);
            }
            continue;
        }
        let payload = if has_remote {
            kept.insert(i, m.payload.clone());
            m.payload
        } else {
            m.payload
        };
        // Encoded once, shared by every local recipient.
        let out = Outgoing::new(payload);
        for id in local {
            arrived(s, &id).await;
            let status = match lookup_messaging(s, &id) {
                Ok(c) => {
                    let status = delivery(s, &c, &out);
                    if status != Delivery::Unknown && c.session().is_some() && storing {
                        sessions.push(c);
                    }
                    status
                }
                Err(_) => Delivery::Unknown,
            };
            results[i].insert(id, status);
        }
    }
    // With a session store, answered once the sessions' messages are stored.
    sessions.sort_unstable_by_key(Arc::as_ptr);
    sessions.dedup_by(|a, b| Arc::ptr_eq(a, b));
    futures_util::future::join_all(sessions.iter().map(|c| s.sessions.stored(c))).await;
    let kept = &kept;
    let per_node = remote.into_iter().map(|(node, share)| async move {
        let mut done = Vec::new();
        for chunk in chunks(share, MAX_IDS_PER_FORWARD) {
            let cmd = Command::SendBatch(BatchSendRequest {
                messages: chunk
                    .iter()
                    .map(|(i, ids)| BatchMessage {
                        connection_ids: ids.clone(),
                        payload: kept[i].clone(),
                    })
                    .collect(),
            });
            let answer = forward(s, &node, &cmd).await;
            done.push((chunk, answer));
        }
        done
    });
    for (chunk, answer) in futures_util::future::join_all(per_node)
        .await
        .into_iter()
        .flatten()
    {
        let parsed = (answer.status == 200)
            .then(|| serde_json::from_slice::<BatchSendResponse>(&answer.body).ok())
            .flatten()
            .filter(|r| r.results.len() == chunk.len());
        for (k, (i, ids)) in chunk.into_iter().enumerate() {
            for id in ids {
                let status = parsed.as_ref().and_then(|r| r.results[k].get(&id).copied());
                if status.is_none() {
                    // No answer: it may have been delivered, so it is not
                    // sent again elsewhere.
                    uncertain.insert(id.clone());
                }
                results[i].insert(id, status.unwrap_or(Delivery::Unknown));
            }
        }
    }
    if relocatable {
        super::handoff::relocate_unknown(s, &mut results, &payloads, &uncertain).await;
    }
    ok(&BatchSendResponse { results })
}

/// Cuts a share into pieces of at most `max` ids, in order.
fn chunks(share: Share, max: usize) -> Vec<Share> {
    let mut out: Vec<Share> = vec![Vec::new()];
    let mut room = max;
    for (i, mut ids) in share {
        while !ids.is_empty() {
            if room == 0 {
                out.push(Vec::new());
                room = max;
            }
            let rest = ids.split_off(ids.len().min(room));
            room -= ids.len();
            out.last_mut().expect("never empty").push((i, ids));
            ids = rest;
        }
    }
    out
}

fn info_local(s: &Commands, id: &str) -> CommandReply {
    match lookup(s, id) {
        Ok(c) => ok(&connection_info(s, &c)),
        Err(e) => e.into(),
    }
}

fn connection_info(s: &Commands, c: &Conn) -> ConnectionInfo {
    ConnectionInfo {
        id: c.id().to_string(),
        node: s.node.to_string(),
        remote_addr: c.remote().to_string(),
        path: c.path().to_string(),
        user_id: c.user_id().map(str::to_owned),
        metadata: c.metadata().cloned(),
        subprotocol: c.subprotocol().map(str::to_owned),
        compression: c.deflate(),
        transport: c.transport(),
        connected_at: humantime::format_rfc3339_millis(c.connected_at()).to_string(),
        messages_in: c.messages_in.load(Relaxed),
        messages_out: c.messages_out.load(Relaxed),
        bytes_in: c.bytes_in.load(Relaxed),
        bytes_out: c.bytes_out.load(Relaxed),
        outbound_queued_bytes: c.queued_bytes() as u64,
        channels: s.channels.channels_of(c),
        suspended: c.is_suspended(),
        outbox_messages: c.outbox_len() as u64,
    }
}

/// The connections of `user_id`: this node's, and unless `forwarded`,
/// every other live node's (a node that does not answer is left out and
/// logged).
async fn connections_of(s: &Commands, user_id: &str, forwarded: bool) -> CommandReply {
    let mut all: Vec<ConnectionInfo> = s
        .registry
        .snapshot()
        .iter()
        .filter(|c| c.user_id() == Some(user_id))
        .map(|c| connection_info(s, c))
        .collect();
    let mut unanswered = Vec::new();
    if let (false, Some(cluster)) = (forwarded, s.cluster.get()) {
        let cmd = Command::Connections(UserRef {
            user_id: user_id.to_owned(),
        });
        let (peers, answers) = forward_to_all(s, cluster.as_ref(), &cmd).await;
        for (node, answer) in peers.into_iter().zip(answers) {
            match serde_json::from_slice::<ConnectionsResponse>(&answer.body) {
                Ok(r) if answer.status == 200 => all.extend(r.connections),
                _ => {
                    // Said in the answer (and counted in
                    // switchboard_cluster_forward_failures_total when unreachable).
                    tracing::warn!(
                        node,
                        status = answer.status,
                        "a node did not list its connections"
                    );
                    unanswered.push(node.clone());
                }
            }
        }
    }
    all.sort_by(|a, b| a.id.cmp(&b.id));
    ok(&ConnectionsResponse {
        connections: all,
        unanswered,
    })
}

/// Sends `cmd` to every other live node at once: their ids, and their
/// answers in the same order.
async fn forward_to_all(
    s: &Commands,
    cluster: &dyn switchboard_backend::Cluster,
    cmd: &Command,
) -> (Vec<String>, Vec<CommandReply>) {
    let peers: Vec<String> = cluster
        .peers()
        .into_iter()
        .map(|n| n.node)
        .filter(|n| n != s.node.as_str())
        .collect();
    let answers = futures_util::future::join_all(peers.iter().map(|n| forward(s, n, cmd))).await;
    (peers, answers)
}

/// `POST /v1/graphql/triggers`: the GraphQL subscriptions depending on the
/// keys are re-executed, here and (unless `forwarded`) on every other live
/// node, all for one publication (`docs/graphql.md`).
async fn graphql_trigger(s: &Commands, t: GraphqlTrigger, forwarded: bool) -> CommandReply {
    use switchboard_proto::graphql::{MAX_TRIGGERS, MAX_TRIGGER_LEN};
    let bad_key = |k: &String| k.is_empty() || k.len() > MAX_TRIGGER_LEN;
    if t.triggers.is_empty() || t.triggers.len() > MAX_TRIGGERS || t.triggers.iter().any(bad_key) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "`triggers` holds 1 to 32 keys, each 1 to 256 bytes",
        )
        .into();
    }
    // Only a node forwarding a publication names it.
    let publication = t
        .publication
        .filter(|_| forwarded)
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 12]>()));
    s.graphql.trigger(&t.triggers, &publication);
    let (mut nodes, mut failed_nodes) = (1, Vec::new());
    if let (false, Some(cluster)) = (forwarded, s.cluster.get()) {
        let cmd = Command::GraphqlTrigger(GraphqlTrigger {
            triggers: t.triggers,
            publication: Some(publication),
        });
        let (peers, answers) = forward_to_all(s, cluster.as_ref(), &cmd).await;
        for (node, answer) in peers.into_iter().zip(answers) {
            if answer.status == StatusCode::ACCEPTED.as_u16() {
                nodes += 1;
            } else {
                tracing::warn!(
                    node,
                    status = answer.status,
                    "a node missed a GraphQL trigger"
                );
                failed_nodes.push(node);
            }
        }
    }
    reply(
        StatusCode::ACCEPTED,
        &GraphqlTriggerResponse {
            nodes,
            failed_nodes,
        },
    )
}

/// The statistics of `node` (this one when `None` or its own id).
pub(crate) async fn stats_of(s: &Commands, node: Option<&str>) -> CommandReply {
    let Some(node) = node.filter(|n| *n != s.node.as_str()) else {
        return ok(&stats_local(s));
    };
    let live = s
        .cluster
        .get()
        .is_some_and(|c| c.peers().iter().any(|p| p.node == node));
    if !live {
        return ApiError::node_not_found(node).into();
    }
    let reply = forward(s, node, &Command::Stats).await;
    if reply.status == StatusCode::NOT_FOUND.as_u16() {
        // It left between the look-up and the request.
        return ApiError::node_not_found(node).into();
    }
    reply
}

fn close_local(s: &Commands, c: CloseCommand) -> CommandReply {
    let code = c.params.code.unwrap_or(close::NORMAL);
    if !close::is_valid_sent(code) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_close_code",
            "code must be 1000, 1001, 1008, 1011, 1012, 1013 or 3000-4999",
        )
        .into();
    }
    let reason = c.params.reason.unwrap_or_default();
    if reason.len() > 123 {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_close_reason",
            "reason is limited to 123 bytes",
        )
        .into();
    }
    let conn = match lookup(s, &c.connection_id) {
        Ok(conn) => conn,
        Err(e) => return e.into(),
    };
    // A suspended session has no socket to close: it ends now.
    let req = CloseRequest {
        code,
        reason,
        by: ClosedBy::Origin,
        flush_first: true,
        takeover: false,
    };
    if s.sessions.close(&conn, req) {
        reply(
            StatusCode::ACCEPTED,
            &serde_json::json!({"status": "closing"}),
        )
    } else {
        ApiError::not_found(&c.connection_id).into()
    }
}

pub(crate) fn stats_local(s: &Commands) -> Stats {
    let m = &s.metrics;
    let suspended = s.sessions.suspended_count();
    Stats {
        node: s.node.to_string(),
        connections: s.registry.len().saturating_sub(suspended) as u64,
        connections_total: m.connections_total.get(),
        handshakes_rejected_total: m.handshakes_rejected.get(),
        messages_in_total: m.messages_in.get(),
        messages_out_total: m.messages_out.get(),
        bytes_in_total: m.bytes_in.get(),
        bytes_out_total: m.bytes_out.get(),
        origin_queue_depth: s.origin.dispatcher.pending() as u64,
        draining: s.draining.load(Relaxed),
        slow_consumer_closes_total: m.slow_consumer_closes.get(),
        origin_requests_total: m.origin_requests.get(),
        origin_request_microseconds_total: m.origin_request_micros.get(),
        channels: u64::try_from(m.channels.get()).unwrap_or(0),
        subscriptions: u64::try_from(m.subscriptions.get()).unwrap_or(0),
        sessions_suspended: suspended as u64,
    }
}

/// This node and the live peers, sorted by id.
pub(crate) fn nodes_local(s: &Commands) -> NodesResponse {
    let now = crate::clock::now_ms();
    let mut nodes = vec![NodeInfo {
        node: s.node.to_string(),
        connections: s.registry.len() as u64,
        draining: s.draining.load(Relaxed),
        started_at_ms: s.started_at_ms,
        last_seen_ms: now,
        is_self: true,
    }];
    if let Some(cluster) = s.cluster.get() {
        nodes.extend(
            cluster
                .peers()
                .into_iter()
                .filter(|n| n.node != s.node.as_str()),
        );
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    NodesResponse { nodes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_cut_in_order_without_losing_ids() {
        let ids = |n: usize, tag: &str| (0..n).map(|k| format!("{tag}{k}")).collect::<Vec<_>>();
        let share = vec![(0, ids(5, "a")), (2, ids(2, "b")), (3, ids(4, "c"))];
        let cut = chunks(share.clone(), 4);
        assert!(cut
            .iter()
            .all(|c| c.iter().map(|(_, v)| v.len()).sum::<usize>() <= 4));
        assert_eq!(cut.len(), 3);
        let flat: Vec<(usize, String)> = cut
            .into_iter()
            .flatten()
            .flat_map(|(i, v)| v.into_iter().map(move |id| (i, id)))
            .collect();
        let want: Vec<(usize, String)> = share
            .into_iter()
            .flat_map(|(i, v)| v.into_iter().map(move |id| (i, id)))
            .collect();
        assert_eq!(flat, want);
        assert_eq!(chunks(vec![(0, ids(3, "x"))], 8).len(), 1);
    }
}
