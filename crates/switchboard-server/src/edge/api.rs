//! The control listener's HTTP routes: the control API (`/v1/...`, API-key
//! protected) and the operations endpoints (`/healthz`, `/readyz`,
//! `/metrics`). Each API route parses its request into a [`Command`] and
//! runs it with [`execute`]; errors are JSON `{"code", "message"}`.
//!
//! The OpenAPI document is `docs/openapi.json`, served at
//! `GET /v1/openapi.json`; a test keeps it and [`ROUTES`] equal.

use super::control_listener::{serve_connection, Slots};
use super::Edge;
use crate::commands::control::{execute, nodes_local, single_payload, stats_of, ApiError};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use switchboard_backend::CommandReply;
use switchboard_proto::control::{
    BatchSendRequest, ChannelRef, CloseCommand, CloseParams, Command, ConnectionRef, ErrorBody,
    GraphqlTrigger, GraphqlTriggerBody, HistoryCommand, NodesResponse, PublishCommand, SendCommand,
    SubscribeBody, SubscribeCommand, UnsubscribeCommand, UserRef,
};
use switchboard_proto::native::StreamPosition;
use switchboard_proto::origin::Payload;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The OpenAPI 3 document of the control API.
pub const OPENAPI_JSON: &str = include_str!("../../../../docs/openapi.json");

/// Every route (method, path) of the control listener, as in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/admin"),
    ("get", "/admin/admin.js"),
    ("get", "/admin/admin.css"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/stats"),
    ("get", "/v1/nodes"),
    ("post", "/v1/messages"),
    ("post", "/v1/connections/{id}/messages"),
    ("get", "/v1/connections"),
    ("get", "/v1/connections/{id}"),
    ("delete", "/v1/connections/{id}"),
    ("put", "/v1/connections/{id}/channels/{channel}"),
    ("delete", "/v1/connections/{id}/channels/{channel}"),
    ("get", "/v1/channels"),
    ("post", "/v1/channels/{channel}/messages"),
    ("get", "/v1/channels/{channel}/messages"),
    ("get", "/v1/channels/{channel}/presence"),
    ("post", "/v1/graphql/triggers"),
];

/// Largest control API request body.
const MAX_BODY: usize = 16 << 20;

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

fn parse_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if super::control_listener::is_body_timeout(&e) {
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
pub(crate) async fn serve(shared: Arc<Edge>, listener: TcpListener, stop: CancellationToken) {
    let app = router(shared.clone());
    let slots = Slots::new(shared.clone());
    let connections = TaskTracker::new();
    match &shared.tls {
        None => {
            let mut acceptor =
                super::listener::Acceptor::new("control", super::listener::Shed::Close);
            loop {
                let (tcp, _remote) = tokio::select! {
                    _ = stop.cancelled() => break,
                    pair = acceptor.accept(&listener, &shared.metrics) => pair,
                };
                let Some(slot) = slots.take() else {
                    slots.refuse(tcp);
                    continue;
                };
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
            let mut tls_listener = super::tls::ControlListener::start(
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

pub(crate) fn router(shared: Arc<Edge>) -> Router {
    let api = Router::new()
        .route("/v1/stats", get(stats))
        .route("/v1/connections", get(connections))
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
        .route("/v1/graphql/triggers", axum::routing::post(graphql_trigger))
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_key));
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/admin",
            get(|| admin_asset(ADMIN_HTML, "text/html; charset=utf-8")),
        )
        .route(
            "/admin/admin.js",
            get(|| admin_asset(ADMIN_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/admin/admin.css",
            get(|| admin_asset(ADMIN_CSS, "text/css; charset=utf-8")),
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
async fn require_key(State(s): State<Arc<Edge>>, req: Request, next: Next) -> Response {
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

async fn readyz(State(s): State<Arc<Edge>>) -> Response {
    if s.commands.draining.load(Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(serde_json::json!({"status": "ready"})).into_response()
    }
}

async fn metrics(State(s): State<Arc<Edge>>) -> Response {
    s.metrics
        .origin_queue_depth
        .set(s.origin.dispatcher.pending() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

// --- HTTP handlers: parse the request, then `execute`. ---

async fn send_one(
    State(s): State<Arc<Edge>>,
    ConnPath(id): ConnPath,
    body: Body,
) -> Result<Answer, ApiError> {
    let payload: Payload = parse_json(body)?;
    let cmd = Command::Send(SendCommand {
        connection_id: id,
        payload,
    });
    Ok(execute(&s.commands, cmd, false).await.into())
}

async fn send_batch(State(s): State<Arc<Edge>>, body: Body) -> Result<Answer, ApiError> {
    let req: BatchSendRequest = parse_json(body)?;
    Ok(execute(&s.commands, Command::SendBatch(req), false)
        .await
        .into())
}

async fn connection_info(State(s): State<Arc<Edge>>, ConnPath(id): ConnPath) -> Answer {
    execute(
        &s.commands,
        Command::Info(ConnectionRef { connection_id: id }),
        false,
    )
    .await
    .into()
}

async fn close_connection(
    State(s): State<Arc<Edge>>,
    ConnPath(id): ConnPath,
    Params(params): Params<CloseParams>,
) -> Result<Answer, ApiError> {
    let cmd = Command::Close(CloseCommand {
        connection_id: id,
        params,
    });
    Ok(execute(&s.commands, cmd, false).await.into())
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

/// The query string of a route; one that does not fit answers 400
/// `invalid_query`.
struct Params<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for Params<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                e.body_text(),
            )),
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
    State(s): State<Arc<Edge>>,
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
    Ok(execute(&s.commands, cmd, false).await.into())
}

async fn unsubscribe(
    State(s): State<Arc<Edge>>,
    path: ConnChannelPath,
) -> Result<Answer, ApiError> {
    let Segments((connection_id, channel)) = path;
    let cmd = Command::Unsubscribe(UnsubscribeCommand {
        connection_id,
        channel,
    });
    Ok(execute(&s.commands, cmd, false).await.into())
}

async fn list_channels(State(s): State<Arc<Edge>>) -> Answer {
    execute(&s.commands, Command::Channels, false).await.into()
}

async fn publish(
    State(s): State<Arc<Edge>>,
    path: ChannelPath,
    body: Body,
) -> Result<Answer, ApiError> {
    let Segments(channel) = path;
    let mut cmd: PublishCommand = parse_json(body)?;
    cmd.channel = channel;
    Ok(execute(&s.commands, Command::Publish(cmd), false)
        .await
        .into())
}

/// `POST /v1/graphql/triggers`: re-executes the GraphQL subscriptions that
/// depend on the keys, on every node (`docs/graphql.md`).
async fn graphql_trigger(State(s): State<Arc<Edge>>, body: Body) -> Result<Answer, ApiError> {
    let GraphqlTriggerBody { triggers } = parse_json(body)?;
    let cmd = GraphqlTrigger {
        triggers,
        publication: None,
    };
    Ok(execute(&s.commands, Command::GraphqlTrigger(cmd), false)
        .await
        .into())
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
    State(s): State<Arc<Edge>>,
    path: ChannelPath,
    Params(q): Params<HistoryQuery>,
) -> Result<Answer, ApiError> {
    let Segments(channel) = path;
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
    Ok(execute(&s.commands, cmd, false).await.into())
}

async fn presence(State(s): State<Arc<Edge>>, path: ChannelPath) -> Result<Answer, ApiError> {
    let Segments(channel) = path;
    Ok(execute(
        &s.commands,
        Command::Presence(ChannelRef { channel }),
        false,
    )
    .await
    .into())
}

/// Query of `GET /v1/stats`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    node: Option<String>,
}

async fn stats(
    State(s): State<Arc<Edge>>,
    Params(q): Params<StatsQuery>,
) -> Result<Answer, ApiError> {
    Ok(stats_of(&s.commands, q.node.as_deref()).await.into())
}

/// Query of `GET /v1/connections`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsQuery {
    user_id: String,
}

async fn connections(
    State(s): State<Arc<Edge>>,
    Params(q): Params<ConnectionsQuery>,
) -> Result<Answer, ApiError> {
    let cmd = Command::Connections(UserRef { user_id: q.user_id });
    Ok(execute(&s.commands, cmd, false).await.into())
}

/// `GET /healthz`: alive, and which build.
async fn healthz(State(s): State<Arc<Edge>>) -> Json<serde_json::Value> {
    let build: serde_json::Map<String, serde_json::Value> = s
        .commands
        .build_info()
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    Json(serde_json::json!({"status": "ok", "build": build}))
}

/// The admin page (`/admin`): a login form, then live figures and
/// inspectors that read the control API with the key the operator gave.
/// The files hold no data, so they are served without the key; the page's
/// scripts come only from here.
const ADMIN_HTML: &str = include_str!("../../assets/admin/index.html");
const ADMIN_JS: &str = include_str!("../../assets/admin/admin.js");
const ADMIN_CSS: &str = include_str!("../../assets/admin/admin.css");

async fn admin_asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                 img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn nodes(State(s): State<Arc<Edge>>) -> Json<NodesResponse> {
    Json(nodes_local(&s.commands))
}
