//! The opening handshake of one client socket: read the request head, check
//! it and the node's limits, ask the origin (`connect`), then answer 101 and
//! hand over to the connection task — or answer with an error status and a
//! JSON body. Every refusal is listed in `docs/protocol.md`.

use crate::connection;
use crate::gateway::{now_ms, Shared, SocketGuard};
use crate::metrics::KindLabel;
use crate::origin::dispatcher::batch_body;
use crate::origin::ConnectDecision;
use crate::pool;
use crate::registry::{CloseRequest, Conn, ConnInit, Outgoing};
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use switchboard_proto::origin::{ClosedBy, ConnectEvent, Event};
use switchboard_proto::ws::close;
use switchboard_proto::ws::handshake::{self as hs, HeadError, Request, UpgradeError};
use switchboard_proto::ConnectionId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A refusal: HTTP status, stable code, message, extra header lines.
struct Refusal {
    status: u16,
    code: &'static str,
    message: String,
    extra: &'static str,
    metric: &'static str,
}

fn refuse(
    status: u16,
    code: &'static str,
    message: impl Into<String>,
    metric: &'static str,
) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
        extra: "",
        metric,
    }
}

/// Runs the handshake of one accepted socket, then the connection itself.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    remote: SocketAddr,
    guard: SocketGuard,
) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let mut buf = pool::take();
    let head = tokio::time::timeout_at(
        deadline,
        read_head(&mut stream, &mut buf, shared.config.max_header_bytes),
    )
    .await;
    let result = match head {
        Err(_) => {
            // Slow or silent client: drop without an answer.
            shared.metrics.handshake("timeout");
            shared.handshakes_rejected.fetch_add(1, Relaxed);
            return;
        }
        Ok(Err(None)) => return, // closed or I/O error before a full head
        Ok(Err(Some(refusal))) => Err(refusal),
        Ok(Ok((req, head_len))) => {
            let _ = buf.split_to(head_len);
            decide(&shared, &req, remote, &guard, deadline)
                .await
                .map(|ok| (req, ok))
        }
    };
    match result {
        Err(r) => {
            shared.metrics.handshake(r.metric);
            shared.handshakes_rejected.fetch_add(1, Relaxed);
            let resp = hs::error_response(r.status, r.code, &r.message, r.extra);
            let _ = tokio::time::timeout_at(deadline, async {
                stream.write_all(&resp).await?;
                stream.shutdown().await
            })
            .await;
        }
        Ok((_req, accepted)) => {
            let Accepted {
                conn,
                response,
                deflate,
            } = accepted;
            shared.metrics.handshake("accepted");
            if stream.write_all(&response).await.is_err() {
                // The client left before the 101: it still gets its disconnect.
                let guard = connection::DisconnectGuard::new(shared.clone(), conn);
                guard.finish(
                    close::ABNORMAL,
                    "connection lost during handshake",
                    ClosedBy::Network,
                );
                return;
            }
            if shared.draining.load(Relaxed) {
                conn.request_close(CloseRequest {
                    code: close::SERVICE_RESTART,
                    reason: "server restart, reconnect".into(),
                    by: ClosedBy::Gateway,
                    flush_first: true,
                });
            }
            let leftover = if buf.is_empty() {
                pool::give(buf);
                None
            } else {
                Some(buf)
            };
            // A task of its own, so the connection holds none of the
            // handshake's state while it lives.
            let tasks = shared.conn_tasks.clone();
            tasks.spawn(connection::run(
                shared, stream, conn, leftover, deflate, guard,
            ));
        }
    }
}

/// Reads until a whole request head is in `buf`. `Err(None)`: the socket closed.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(Request, usize), Option<Refusal>> {
    loop {
        match hs::parse_request(buf) {
            // A whole head can arrive in one read: check its size here too.
            Ok(Some((_, len))) if len > max => {
                return Err(Some(refuse(
                    431,
                    "header_too_large",
                    format!("request head over {max} bytes"),
                    "header_too_large",
                )))
            }
            Ok(Some(done)) => return Ok(done),
            Ok(None) if buf.len() >= max => {
                return Err(Some(refuse(
                    431,
                    "header_too_large",
                    format!("request head over {max} bytes"),
                    "header_too_large",
                )))
            }
            Ok(None) => {}
            Err(HeadError::TooManyHeaders) => {
                return Err(Some(refuse(
                    431,
                    "header_too_large",
                    "too many header lines",
                    "header_too_large",
                )))
            }
            Err(HeadError::Malformed) => {
                return Err(Some(refuse(
                    400,
                    "bad_request",
                    "malformed HTTP request",
                    "bad_request",
                )))
            }
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024);
        }
        stream.readable().await.map_err(|_| None)?;
        match stream.try_read_buf(buf) {
            Ok(0) => return Err(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(None),
        }
    }
}

struct Accepted {
    conn: Arc<Conn>,
    response: Vec<u8>,
    deflate: Option<switchboard_proto::ws::deflate::DeflateParams>,
}

async fn decide(
    shared: &Arc<Shared>,
    req: &Request,
    remote: SocketAddr,
    guard: &SocketGuard,
    deadline: tokio::time::Instant,
) -> Result<Accepted, Refusal> {
    let cfg = &shared.config;
    let upgrade = hs::validate_upgrade(req).map_err(|e| match e {
        UpgradeError::NotUpgrade => Refusal {
            status: 426,
            code: "upgrade_required",
            message: "this endpoint only accepts WebSocket connections".into(),
            extra: "Upgrade: websocket\r\n",
            metric: "upgrade_required",
        },
        UpgradeError::BadVersion => Refusal {
            status: 426,
            code: "unsupported_version",
            message: "only WebSocket version 13 is supported".into(),
            extra: "Sec-WebSocket-Version: 13\r\n",
            metric: "bad_request",
        },
        UpgradeError::BadMethod => refuse(400, "bad_request", e.to_string(), "bad_request"),
        UpgradeError::BadKey => refuse(400, "bad_request", e.to_string(), "bad_request"),
    })?;
    if shared.draining.load(Relaxed) {
        return Err(refuse(
            503,
            "draining",
            "this node is shutting down; retry",
            "draining",
        ));
    }
    if shared.sockets.load(Relaxed) > cfg.max_connections {
        return Err(refuse(
            503,
            "over_capacity",
            "connection limit reached",
            "over_capacity",
        ));
    }
    if cfg.max_connections_per_ip > 0 && guard.per_ip as usize > cfg.max_connections_per_ip {
        return Err(refuse(
            503,
            "too_many_connections_from_ip",
            "per-address connection limit reached",
            "over_capacity",
        ));
    }
    if !shared.dispatcher.has_room() {
        return Err(refuse(
            503,
            "origin_backlog",
            "the origin is not keeping up; retry later",
            "origin_backlog",
        ));
    }

    let subprotocol = upgrade
        .protocols
        .iter()
        .find(|p| cfg.subprotocol.iter().any(|s| s == *p))
        .cloned();
    let deflate = if cfg.permessage_deflate {
        upgrade.deflate
    } else {
        None
    };
    let id = ConnectionId::generate(&shared.node);
    let event = Event::Connect(ConnectEvent {
        id: format!("{id}:connect"),
        connection_id: id.to_string(),
        node: shared.node.to_string(),
        timestamp_ms: now_ms(),
        remote_addr: remote.to_string(),
        path: req.path.clone(),
        query: req.query.clone(),
        headers: req
            .headers
            .iter()
            .filter(|(n, _)| shared.forward_headers.iter().any(|f| f == n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        cookies: parse_cookies(req),
        subprotocols: upgrade.protocols.clone(),
        subprotocol: subprotocol.clone(),
    });
    let body = batch_body([&serde_json::to_vec(&event).expect("events serialize")[..]]);
    let started = Instant::now();
    let decision = tokio::time::timeout_at(deadline, shared.transport.connect(body)).await;
    let kind = KindLabel { kind: "connect" };
    shared
        .metrics
        .origin_duration
        .get_or_create(&kind)
        .observe(started.elapsed().as_secs_f64());
    let answer = match decision {
        Ok(Ok(ConnectDecision::Accept(answer))) => answer,
        Ok(Ok(ConnectDecision::Reject { status, reason })) => {
            let status = if (400..=599).contains(&status) {
                status
            } else {
                403
            };
            return Err(refuse(
                status,
                "rejected_by_origin",
                reason.unwrap_or_else(|| "connection refused by the application".into()),
                "rejected",
            ));
        }
        Ok(Err(e)) => {
            shared.metrics.origin_failures.get_or_create(&kind).inc();
            tracing::warn!(error = %e, "connect event failed");
            return Err(refuse(
                503,
                "origin_unavailable",
                "the application is unavailable; retry later",
                "origin_unavailable",
            ));
        }
        Err(_) => {
            shared.metrics.origin_failures.get_or_create(&kind).inc();
            return Err(refuse(
                503,
                "origin_unavailable",
                "the application did not answer in time",
                "origin_unavailable",
            ));
        }
    };

    let conn = Arc::new(Conn::new(ConnInit {
        id,
        remote,
        path: req.path.clone(),
        user_id: answer.user_id,
        metadata: answer.metadata,
        subprotocol: subprotocol.clone(),
        // Outbound compression: off when the client limited the server window.
        deflate: deflate.is_some_and(|d| d.compresses_outbound()),
        max_outbound: cfg.max_outbound_bytes,
    }));
    shared.registry.insert(conn.clone());
    shared.metrics.connections.inc();
    shared.metrics.connections_total.inc();
    for m in answer.messages {
        conn.send(&Outgoing::new(m), &shared.metrics);
    }
    dispatcher_replies(shared, answer.replies);
    let ext = deflate.map(|d| d.response_header());
    Ok(Accepted {
        response: hs::switching_protocols(&upgrade.key, subprotocol.as_deref(), ext.as_deref()),
        conn,
        deflate,
    })
}

fn dispatcher_replies(shared: &Shared, replies: Vec<switchboard_proto::origin::Reply>) {
    if !replies.is_empty() {
        crate::origin::dispatcher::apply_answer(
            shared,
            switchboard_proto::origin::OriginAnswer {
                replies,
                ..Default::default()
            },
        );
    }
}

fn parse_cookies(req: &Request) -> BTreeMap<String, String> {
    req.headers_named("cookie")
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_owned(), v.trim().trim_matches('"').to_owned()))
        })
        .collect()
}
