//! The control API (`/v1/...`, API-key protected) and the operations
//! endpoints (`/healthz`, `/readyz`, `/metrics`), on the control listener.
//!
//! Errors are JSON `{"code", "message"}` with a stable `code`, listed in
//! `docs/control-api.md`. The OpenAPI document is `docs/openapi.json`, served
//! at `GET /v1/openapi.json`; a test keeps it and [`ROUTES`] equal.

use crate::bus::BusError;
use crate::channels::{Ack, ChannelError, Subscribed};
use crate::conn::{CloseRequest, Conn, Outgoing, Queued};
use crate::edge::control_listener::{serve_connection, Slots};
use crate::gateway::Shared;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use switchboard_backend::{ClusterError, CommandReply};
use switchboard_proto::control::{
    BatchMessage, BatchSendRequest, BatchSendResponse, ChannelRef, ChannelsResponse, CloseCommand,
    CloseParams, Command, ConnectionInfo, ConnectionRef, Delivery, ErrorBody, HistoryCommand,
    NodeInfo, NodesResponse, PublishCommand, PublishResponse, SendCommand, SendResponse, Stats,
    SubscribeBody, SubscribeCommand, SubscribeResponse, UnsubscribeCommand,
};
use switchboard_proto::native::{StreamPosition, SubscribeResult};
use switchboard_proto::origin::{ClosedBy, Payload};
use switchboard_proto::ws::close;
use switchboard_proto::ConnectionId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The OpenAPI 3 document of the control API.
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// Every route (method, path) of the control listener, as in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/stats"),
    ("get", "/v1/nodes"),
    ("post", "/v1/messages"),
    ("post", "/v1/connections/{id}/messages"),
    ("get", "/v1/connections/{id}"),
    ("delete", "/v1/connections/{id}"),
    ("put", "/v1/connections/{id}/channels/{channel}"),
    ("delete", "/v1/connections/{id}/channels/{channel}"),
    ("get", "/v1/channels"),
    ("post", "/v1/channels/{channel}/messages"),
    ("get", "/v1/channels/{channel}/messages"),
    ("get", "/v1/channels/{channel}/presence"),
];

/// Largest control API request body.
const MAX_BODY: usize = 16 << 20;

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(id: &str) -> Self {
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

/// A command's reply as the HTTP response of its route.
#[derive(Debug)]
struct Answer(CommandReply);

impl From<CommandReply> for Answer {
    fn from(reply: CommandReply) -> Self {
        Self(reply)
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let Self(reply) = self;
        let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut r = (status, reply.body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(ErrorBody {
                code: self.code.into(),
                message: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come: the connection ends here.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// The `{id}` path segment; a segment that cannot be decoded answers the
/// route's JSON 404 rather than axum's plain-text rejection.
struct ConnPath(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ConnPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(_) => Err(ApiError::not_found("<undecodable id>")),
        }
    }
}

/// A request body, or the JSON error for one that could not be read.
type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

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
fn single_payload(json: &[u8]) -> Result<(), ApiError> {
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

fn parse_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if crate::edge::control_listener::is_body_timeout(&e) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                e.body_text(),
            )
        } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body over {MAX_BODY} bytes"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text())
        }
    })?;
    single_payload(&body)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))
}

/// Serves the control listener until `stop` fires, then gives requests in
/// progress a moment to finish. Connections are bounded as
/// [`crate::edge::control_listener`] describes.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    let app = router(shared.clone());
    let slots = Slots::new(shared.clone());
    let connections = TaskTracker::new();
    match &shared.tls {
        None => {
            let mut acceptor =
                crate::gateway::Acceptor::new("control", crate::gateway::Shed::Close);
            loop {
                let (tcp, _remote) = tokio::select! {
                    _ = stop.cancelled() => break,
                    pair = acceptor.accept(&listener, &shared.metrics) => pair,
                };
                let Some(slot) = slots.take() else {
                    slots.refuse(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                connections.spawn(serve_connection(
                    tcp,
                    slot,
                    app.clone(),
                    shared.clone(),
                    stop.clone(),
                ));
            }
        }
        Some(tls) => {
            let mut tls_listener = crate::edge::tls::ControlListener::start(
                listener,
                tls,
                shared.config.handshake_timeout,
                shared.clone(),
                slots,
                stop.clone(),
            );
            loop {
                let (stream, slot) = tokio::select! {
                    _ = stop.cancelled() => break,
                    next = tls_listener.accept() => match next {
                        Some(next) => next,
                        None => break,
                    },
                };
                connections.spawn(serve_connection(
                    stream,
                    slot,
                    app.clone(),
                    shared.clone(),
                    stop.clone(),
                ));
            }
        }
    }
    connections.close();
    connections.wait().await;
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/v1/stats", get(stats))
        .route("/v1/nodes", get(nodes))
        .route("/v1/messages", axum::routing::post(send_batch))
        .route(
            "/v1/connections/{id}/messages",
            axum::routing::post(send_one),
        )
        .route(
            "/v1/connections/{id}",
            get(connection_info).delete(close_connection),
        )
        .route(
            "/v1/connections/{id}/channels/{channel}",
            axum::routing::put(subscribe).delete(unsubscribe),
        )
        .route("/v1/channels", get(list_channels))
        .route(
            "/v1/channels/{channel}/messages",
            get(history).post(publish),
        )
        .route("/v1/channels/{channel}/presence", get(presence))
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_key));
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON) }),
        )
        .merge(api)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such route")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// Checks `Authorization: Bearer <key>` against every configured key, in
/// constant time per key and without stopping at the first match.
async fn require_key(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let keys = &s.config.api_key;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    let mut ok = subtle::Choice::from(0);
    for k in keys {
        ok |= k.as_bytes().ct_eq(given);
    }
    if bool::from(ok) {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key",
        )
        .into_response()
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.draining.load(Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(serde_json::json!({"status": "ready"})).into_response()
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    s.metrics
        .origin_queue_depth
        .set(s.dispatcher.pending() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// The local connection named `id`, or 404.
fn lookup(s: &Shared, id: &str) -> Result<Arc<Conn>, ApiError> {
    ConnectionId::parse(id)
        .ok()
        .filter(|cid| cid.node() == s.node.as_str())
        .and_then(|cid| s.registry.get(&cid.key()))
        .ok_or_else(|| ApiError::not_found(id))
}

/// The node holding `id` when it is another node of the cluster and the
/// command should go there (not when it was `forwarded` here already).
fn remote_owner<'a>(s: &Shared, id: &'a str, forwarded: bool) -> Option<&'a str> {
    if forwarded || s.cluster.get().is_none() {
        return None;
    }
    let node = id.split_once('.')?.0;
    (node != s.node.as_str() && ConnectionId::parse(id).is_ok()).then_some(node)
}

/// Sends `cmd` to `node` and returns its answer, or the error standing for it.
async fn forward(s: &Shared, node: &str, cmd: &Command) -> CommandReply {
    let Some(cluster) = s.cluster.get() else {
        return ApiError::not_found(node).into();
    };
    let body = Bytes::from(serde_json::to_vec(cmd).expect("commands serialize"));
    s.metrics.forwarded.inc();
    match cluster.forward(node, body).await {
        Ok(reply) => reply,
        Err(e) => {
            s.metrics.forward_failures.inc();
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
pub(crate) async fn execute_json(s: &Arc<Shared>, json: &[u8], forwarded: bool) -> CommandReply {
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
pub(crate) async fn execute(s: &Arc<Shared>, cmd: Command, forwarded: bool) -> CommandReply {
    let target = match &cmd {
        Command::Send(SendCommand { connection_id, .. })
        | Command::Close(CloseCommand { connection_id, .. })
        | Command::Info(ConnectionRef { connection_id })
        | Command::Subscribe(SubscribeCommand { connection_id, .. })
        | Command::Unsubscribe(UnsubscribeCommand { connection_id, .. }) => {
            remote_owner(s, connection_id, forwarded)
        }
        _ => None,
    };
    if let Some(node) = target {
        return forward(s, node, &cmd).await;
    }
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
        Command::Send(c) => send_local(s, c),
        Command::SendBatch(b) => send_batch_routed(s, b, forwarded).await,
        Command::Close(c) => close_local(s, c),
        Command::Info(c) => info_local(s, &c.connection_id),
        Command::Stats => ok(&stats_local(s)),
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

async fn subscribe_local(s: &Shared, c: SubscribeCommand) -> CommandReply {
    let conn = match lookup(s, &c.connection_id) {
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
    match ch.subscribe(&conn, &c.channel, c.since.as_ref(), Ack::Push, &s.metrics) {
        Ok(Subscribed::Now(r)) => subscribed(r),
        // A replica reading the channel's log first (cluster).
        Ok(Subscribed::Later(rx)) => {
            match tokio::time::timeout(s.config.cluster_request_timeout, rx).await {
                Ok(Ok(r)) => subscribed(r),
                Ok(Err(_)) => ApiError::not_found(&c.connection_id).into(),
                Err(_) => ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "node_timeout",
                    "the channel's log did not answer in time; the subscription completes when it does",
                )
                .into(),
            }
        }
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

fn unsubscribe_local(s: &Shared, c: UnsubscribeCommand) -> CommandReply {
    let conn = match lookup(s, &c.connection_id) {
        Ok(conn) => conn,
        Err(e) => return e.into(),
    };
    match s.channels.unsubscribe(&conn, &c.channel, true, &s.metrics) {
        Ok(_) => CommandReply {
            status: StatusCode::NO_CONTENT.as_u16(),
            body: Bytes::new(),
        },
        Err(e) => ApiError::from(e).into(),
    }
}

async fn publish_command(s: &Shared, c: PublishCommand) -> CommandReply {
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

fn send_local(s: &Shared, c: SendCommand) -> CommandReply {
    let conn = match lookup(s, &c.connection_id) {
        Ok(conn) => conn,
        Err(e) => return e.into(),
    };
    match conn.send_after_replies(&Outgoing::new(c.payload), &s.metrics) {
        Queued::Yes => ok(&SendResponse {
            status: Delivery::Delivered,
        }),
        Queued::Closed => ApiError::not_found(&c.connection_id).into(),
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
    s: &Arc<Shared>,
    req: BatchSendRequest,
    forwarded: bool,
) -> CommandReply {
    let mut results = vec![BTreeMap::new(); req.messages.len()];
    let mut remote: BTreeMap<String, Share> = BTreeMap::new();
    // Payloads of messages that have ids on other nodes.
    let mut kept: BTreeMap<usize, Payload> = BTreeMap::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let mut local = Vec::new();
        for id in m.connection_ids {
            let Some(node) = remote_owner(s, &id, forwarded).map(str::to_owned) else {
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
            let status = match lookup(s, &id).map(|c| c.send_after_replies(&out, &s.metrics)) {
                Ok(Queued::Yes) => Delivery::Delivered,
                _ => Delivery::Unknown,
            };
            results[i].insert(id, status);
        }
    }
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
                let status = parsed
                    .as_ref()
                    .and_then(|r| r.results[k].get(&id).copied())
                    .unwrap_or(Delivery::Unknown);
                results[i].insert(id, status);
            }
        }
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

fn info_local(s: &Shared, id: &str) -> CommandReply {
    let c = match lookup(s, id) {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    ok(&ConnectionInfo {
        id: c.id.to_string(),
        node: s.node.to_string(),
        remote_addr: c.remote.to_string(),
        path: c.path.to_string(),
        user_id: c.user_id.as_deref().map(str::to_owned),
        metadata: c.metadata.as_deref().cloned(),
        subprotocol: c.subprotocol.as_deref().map(str::to_owned),
        compression: c.deflate,
        connected_at: humantime::format_rfc3339_millis(c.connected_at).to_string(),
        messages_in: c.messages_in.load(Relaxed),
        messages_out: c.messages_out.load(Relaxed),
        bytes_in: c.bytes_in.load(Relaxed),
        bytes_out: c.bytes_out.load(Relaxed),
        outbound_queued_bytes: c.queued_bytes() as u64,
    })
}

fn close_local(s: &Shared, c: CloseCommand) -> CommandReply {
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
    match conn.request_close(CloseRequest {
        code,
        reason,
        by: ClosedBy::Origin,
        flush_first: true,
    }) {
        Queued::Yes => reply(
            StatusCode::ACCEPTED,
            &serde_json::json!({"status": "closing"}),
        ),
        Queued::Closed => ApiError::not_found(&c.connection_id).into(),
    }
}

fn stats_local(s: &Shared) -> Stats {
    let m = &s.metrics;
    Stats {
        node: s.node.to_string(),
        connections: s.registry.len() as u64,
        connections_total: m.connections_total.get(),
        handshakes_rejected_total: m.handshakes_rejected.get(),
        messages_in_total: m.messages_in.get(),
        messages_out_total: m.messages_out.get(),
        bytes_in_total: m.bytes_in.get(),
        bytes_out_total: m.bytes_out.get(),
        origin_queue_depth: s.dispatcher.pending() as u64,
        draining: s.draining.load(Relaxed),
    }
}

/// This node and the live peers, sorted by id.
fn nodes_local(s: &Shared) -> NodesResponse {
    let now = crate::gateway::now_ms();
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

// --- HTTP handlers: parse the request, then `execute`. ---

async fn send_one(
    State(s): State<Arc<Shared>>,
    ConnPath(id): ConnPath,
    body: Body,
) -> Result<Answer, ApiError> {
    let payload: Payload = parse_json(body)?;
    let cmd = Command::Send(SendCommand {
        connection_id: id,
        payload,
    });
    Ok(execute(&s, cmd, false).await.into())
}

async fn send_batch(State(s): State<Arc<Shared>>, body: Body) -> Result<Answer, ApiError> {
    let req: BatchSendRequest = parse_json(body)?;
    Ok(execute(&s, Command::SendBatch(req), false).await.into())
}

async fn connection_info(State(s): State<Arc<Shared>>, ConnPath(id): ConnPath) -> Answer {
    execute(
        &s,
        Command::Info(ConnectionRef { connection_id: id }),
        false,
    )
    .await
    .into()
}

async fn close_connection(
    State(s): State<Arc<Shared>>,
    ConnPath(id): ConnPath,
    params: Result<Query<CloseParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Answer, ApiError> {
    let Query(params) = params
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let cmd = Command::Close(CloseCommand {
        connection_id: id,
        params,
    });
    Ok(execute(&s, cmd, false).await.into())
}

/// Whether every `%` of `path` starts an escape of two hex digits (axum
/// decodes `%ZZ` leniently, as itself).
fn escapes_are_valid(path: &str) -> bool {
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if !(i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// Decoded path segments of a channel route (`{channel}`, or `{id}` and
/// `{channel}`); a path that is not valid percent-encoded UTF-8 answers
/// 400 `bad_channel`.
struct Segments<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for Segments<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        if !escapes_are_valid(parts.uri.path()) {
            return Err(undecodable());
        }
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(_) => Err(undecodable()),
        }
    }
}

/// The `{id}` and `{channel}` path segments.
type ConnChannelPath = Segments<(String, String)>;

/// The `{channel}` path segment.
type ChannelPath = Segments<String>;

fn undecodable() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_channel",
        "the path segment is not valid percent-encoded UTF-8",
    )
}

async fn subscribe(
    State(s): State<Arc<Shared>>,
    path: ConnChannelPath,
    body: Body,
) -> Result<Answer, ApiError> {
    let Segments((connection_id, channel)) = path;
    let since = match &body {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => None,
        _ => parse_json::<SubscribeBody>(body)?.since,
    };
    let cmd = Command::Subscribe(SubscribeCommand {
        connection_id,
        channel,
        since,
    });
    Ok(execute(&s, cmd, false).await.into())
}

async fn unsubscribe(
    State(s): State<Arc<Shared>>,
    path: ConnChannelPath,
) -> Result<Answer, ApiError> {
    let Segments((connection_id, channel)) = path;
    let cmd = Command::Unsubscribe(UnsubscribeCommand {
        connection_id,
        channel,
    });
    Ok(execute(&s, cmd, false).await.into())
}

async fn list_channels(State(s): State<Arc<Shared>>) -> Answer {
    execute(&s, Command::Channels, false).await.into()
}

async fn publish(
    State(s): State<Arc<Shared>>,
    path: ChannelPath,
    body: Body,
) -> Result<Answer, ApiError> {
    let Segments(channel) = path;
    let mut cmd: PublishCommand = parse_json(body)?;
    cmd.channel = channel;
    Ok(execute(&s, Command::Publish(cmd), false).await.into())
}

/// Query of `GET /v1/channels/{channel}/messages`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    since: Option<u64>,
    epoch: Option<String>,
    limit: Option<usize>,
}

async fn history(
    State(s): State<Arc<Shared>>,
    path: ChannelPath,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Answer, ApiError> {
    let Segments(channel) = path;
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let since = match (q.since, q.epoch) {
        (Some(offset), Some(epoch)) => Some(StreamPosition { offset, epoch }),
        (None, None) => None,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "`since` and `epoch` go together",
            ))
        }
    };
    let cmd = Command::History(HistoryCommand {
        channel,
        since,
        limit: q.limit,
    });
    Ok(execute(&s, cmd, false).await.into())
}

async fn presence(State(s): State<Arc<Shared>>, path: ChannelPath) -> Result<Answer, ApiError> {
    let Segments(channel) = path;
    Ok(
        execute(&s, Command::Presence(ChannelRef { channel }), false)
            .await
            .into(),
    )
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<Stats> {
    Json(stats_local(&s))
}

async fn nodes(State(s): State<Arc<Shared>>) -> Json<NodesResponse> {
    Json(nodes_local(&s))
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
