//! The control API (`/v1/...`, API-key protected) and the operations
//! endpoints (`/healthz`, `/readyz`, `/metrics`), on the control listener.
//!
//! Errors are JSON `{"code", "message"}` with a stable `code`, listed in
//! `docs/control-api.md`. The OpenAPI document is `docs/openapi.json`, served
//! at `GET /v1/openapi.json`; a test keeps it and [`ROUTES`] equal.

use crate::gateway::Shared;
use crate::registry::{CloseRequest, Conn, Outgoing, Queued};
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
use switchboard_proto::control::{
    BatchSendRequest, BatchSendResponse, CloseParams, ConnectionInfo, Delivery, ErrorBody,
    SendResponse, Stats,
};
use switchboard_proto::origin::{ClosedBy, Payload};
use switchboard_proto::ws::close;
use switchboard_proto::ConnectionId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The OpenAPI 3 document of the control API.
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// Every route (method, path) of the control listener, as in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/stats"),
    ("post", "/v1/messages"),
    ("post", "/v1/connections/{id}/messages"),
    ("get", "/v1/connections/{id}"),
    ("delete", "/v1/connections/{id}"),
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
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body over {MAX_BODY} bytes"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text())
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    let app = router(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "control listener failed");
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/v1/stats", get(stats))
        .route("/v1/messages", axum::routing::post(send_batch))
        .route(
            "/v1/connections/{id}/messages",
            axum::routing::post(send_one),
        )
        .route(
            "/v1/connections/{id}",
            get(connection_info).delete(close_connection),
        )
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

async fn send_one(
    State(s): State<Arc<Shared>>,
    ConnPath(id): ConnPath,
    body: Body,
) -> Result<Json<SendResponse>, ApiError> {
    let payload: Payload = parse_json(body)?;
    let conn = lookup(&s, &id)?;
    match conn.send(&Outgoing::new(payload), &s.metrics) {
        Queued::Yes => Ok(Json(SendResponse {
            status: Delivery::Delivered,
        })),
        Queued::Closed => Err(ApiError::not_found(&id)),
    }
}

async fn send_batch(
    State(s): State<Arc<Shared>>,
    body: Body,
) -> Result<Json<BatchSendResponse>, ApiError> {
    let req: BatchSendRequest = parse_json(body)?;
    let results = req
        .messages
        .into_iter()
        .map(|m| {
            // Encoded once, shared by every recipient.
            let out = Outgoing::new(m.payload);
            m.connection_ids
                .into_iter()
                .map(|id| {
                    let status = match lookup(&s, &id).map(|c| c.send(&out, &s.metrics)) {
                        Ok(Queued::Yes) => Delivery::Delivered,
                        _ => Delivery::Unknown,
                    };
                    (id, status)
                })
                .collect::<BTreeMap<_, _>>()
        })
        .collect();
    Ok(Json(BatchSendResponse { results }))
}

async fn connection_info(
    State(s): State<Arc<Shared>>,
    ConnPath(id): ConnPath,
) -> Result<Json<ConnectionInfo>, ApiError> {
    let c = lookup(&s, &id)?;
    Ok(Json(ConnectionInfo {
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
    }))
}

async fn close_connection(
    State(s): State<Arc<Shared>>,
    ConnPath(id): ConnPath,
    params: Result<Query<CloseParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let code = params.code.unwrap_or(close::NORMAL);
    if !close::is_valid_sent(code) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_close_code",
            "code must be 1000, 1001, 1008, 1011, 1012, 1013 or 3000-4999",
        ));
    }
    let reason = params.reason.unwrap_or_default();
    if reason.len() > 123 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_close_reason",
            "reason is limited to 123 bytes",
        ));
    }
    let conn = lookup(&s, &id)?;
    match conn.request_close(CloseRequest {
        code,
        reason,
        by: ClosedBy::Origin,
        flush_first: true,
    }) {
        Queued::Yes => Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"status": "closing"})),
        )
            .into_response()),
        Queued::Closed => Err(ApiError::not_found(&id)),
    }
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<Stats> {
    let m = &s.metrics;
    Json(Stats {
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
    })
}
