//! The GraphQL half of a handshake (`docs/graphql.md`): the client is
//! answered 101 with its GraphQL subprotocol, then owes `connection_init`
//! within `graphql-init-timeout`. A token in the request is checked before
//! the 101 (a bad one is an HTTP refusal, as for any client); without one,
//! the init payload's is. Then the origin's `connect` is asked with the
//! payload; the client gets `connection_ack`, or a close code of the
//! protocol (4403, 4406, 4408, 4500 …). The connection's task takes over
//! after the ack, with whatever the client sent after `connection_init`.

use super::handshake::{
    admit, answer_refusal, close_unopened, parse_cookies, read_message, refuse as refuse_http,
    start, Accepted, FirstFrame, Opening, Pending, Refusal,
};
use super::{connection, Edge};
use crate::admission::tokens::{AuthError, Identity};
use crate::conn::stream::ClientStream;
use crate::graphql::{truncated, Context};
use serde_json::Value;
use std::sync::Arc;
use switchboard_proto::graphql::{self as gql, close, ClientMessage, Protocol};
use switchboard_proto::ws::close::TRY_AGAIN_LATER;
use switchboard_proto::ws::decoder::{Decoder, Message};
use switchboard_proto::ws::frame::{encode_frame, OpCode};
use tokio::io::AsyncWriteExt;

/// A refusal of the GraphQL handshake: a close code and its reason.
struct Refused {
    code: u16,
    reason: String,
    /// `switchboard_handshakes_total`'s result.
    metric: &'static str,
}

fn refused(code: u16, reason: impl Into<String>, metric: &'static str) -> Refused {
    Refused {
        code,
        reason: reason.into(),
        metric,
    }
}

/// Runs the GraphQL handshake of a client answered with `opening` (whose
/// `graphql` is set), then starts its connection.
pub(super) async fn handshake(shared: Arc<Edge>, p: Pending, mut opening: Opening) {
    let protocol = opening.graphql.expect("a GraphQL opening");
    let Pending {
        mut stream,
        mut buf,
        req,
        remote,
        deadline,
        socket,
    } = p;
    let graphql = &shared.commands.graphql;
    let cookies = parse_cookies(&req);
    // A token in the request is checked before the 101, as for any client.
    let from_request = if graphql.enabled() {
        match request_identity(&shared, &req, &cookies, deadline).await {
            Ok(found) => found,
            Err(r) => return answer_refusal(&shared, &mut stream, r, deadline).await,
        }
    } else {
        FromRequest::Anonymous
    };
    match tokio::time::timeout_at(deadline, stream.write_all(&opening.response())).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return,
        Err(_) => {
            shared.metrics.handshake("timeout");
            return;
        }
    }
    let mut decoder = Decoder::new(shared.config.max_message_size, opening.deflate);
    let refusal = if !graphql.enabled() {
        Err(Some(refused(
            close::SUBPROTOCOL_NOT_ACCEPTABLE,
            "Subprotocol not acceptable",
            "bad_request",
        )))
    } else {
        init(&shared, &mut stream, &mut buf, &mut decoder, protocol).await
    };
    let payload = match refusal {
        Ok(payload) => payload,
        Err(None) => return, // the client went away
        Err(Some(r)) => return refuse(&shared, &mut stream, protocol, r).await,
    };
    let identity = match payload_identity(&shared, from_request, payload.as_ref()).await {
        Ok(identity) => identity,
        Err(r) => return refuse(&shared, &mut stream, protocol, r).await,
    };
    let claims = identity.as_ref().map(|i| i.claims.clone());
    opening.init_payload = payload;
    // The origin has its whole decision time from `connection_init` on.
    let decide_by = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let admitted = admit(&shared, &req, remote, decide_by, opening, cookies, identity).await;
    let Accepted {
        conn, ack_payload, ..
    } = match admitted {
        Ok(accepted) => accepted,
        Err(r) => {
            let code = match r.code {
                "rejected_by_origin" | "too_many_connections_for_user" => close::FORBIDDEN,
                // Passing: a code graphql-ws clients retry (they never
                // retry 4500).
                _ => TRY_AGAIN_LATER,
            };
            let why = match r.code {
                _ if code == close::FORBIDDEN => format!("Forbidden: {}", r.message),
                "origin_unavailable" => "origin unavailable".to_owned(),
                other => other.replace('_', " "),
            };
            return refuse(&shared, &mut stream, protocol, refused(code, why, r.metric)).await;
        }
    };
    shared.metrics.handshake("accepted");
    let disconnect = connection::DisconnectGuard::new(shared.clone(), conn.clone());
    let push = |json: Vec<u8>| conn.push(encode_frame(OpCode::Text, &json), &shared.metrics);
    push(gql::ack(ack_payload.as_ref()));
    if protocol == Protocol::Legacy {
        push(gql::keep_alive());
    }
    graphql.open(
        &conn,
        Context {
            connection_id: conn.id().to_string(),
            user_id: conn.user_id().map(str::to_owned),
            claims,
            metadata: conn.metadata().cloned(),
            headers: req
                .headers
                .iter()
                .filter(|(n, _)| shared.forward_headers.iter().any(|f| f == n))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect(),
        },
    );
    start(&shared, stream, disconnect, buf, decoder, socket, 0);
}

/// Waits for `connection_init` (answering modern pings meanwhile) and
/// returns its payload. `Err(None)`: the client went away.
async fn init(
    shared: &Edge,
    stream: &mut ClientStream,
    buf: &mut bytes::BytesMut,
    decoder: &mut Decoder,
    protocol: Protocol,
) -> Result<Option<Value>, Option<Refused>> {
    let until = tokio::time::Instant::now() + shared.config.graphql_init_timeout;
    let bad = |why: String| Some(refused(close::BAD_REQUEST, why, "bad_request"));
    loop {
        let text = match tokio::time::timeout_at(until, read_message(stream, buf, decoder)).await {
            Err(_) => {
                return Err(Some(refused(
                    close::INIT_TIMEOUT,
                    "Connection initialisation timeout",
                    "timeout",
                )))
            }
            Ok(Err(FirstFrame::Closed)) | Ok(Ok(Message::Close(..))) => return Err(None),
            Ok(Err(FirstFrame::TooLarge)) => {
                return Err(bad(
                    "connection_init must be one text frame under 16 KiB".into()
                ))
            }
            Ok(Ok(Message::Text(text))) => text,
            Ok(Ok(_)) => {
                return Err(bad(
                    "GraphQL over WebSocket messages are JSON text frames".into()
                ))
            }
        };
        match gql::parse(protocol, &text) {
            Ok(ClientMessage::Init(payload)) => return Ok(payload),
            Ok(ClientMessage::Ping(payload)) => {
                let pong = encode_frame(OpCode::Text, &gql::pong(payload.as_ref()));
                if stream.write_all(&pong).await.is_err() {
                    return Err(None);
                }
            }
            Ok(ClientMessage::Pong) => {}
            Ok(ClientMessage::Terminate) => {
                // The client leaves: a normal close, no refusal.
                close_unopened(stream, switchboard_proto::ws::close::NORMAL, "").await;
                return Err(None);
            }
            Ok(ClientMessage::Start { .. } | ClientMessage::Stop { .. }) => {
                return Err(Some(refused(
                    close::UNAUTHORIZED,
                    "Unauthorized",
                    "unauthorized",
                )))
            }
            Err(e) => return Err(bad(e.0)),
        }
    }
}

/// What the upgrade request says of the client's identity.
enum FromRequest {
    /// A valid token.
    Token(Identity),
    /// No token, and none needed (or no tokens checked).
    Anonymous,
    /// No token where one is needed: the init payload may bring it.
    Missing(AuthError),
}

/// Checks a token the request carries (header, query, cookie): one that is
/// not valid is refused with an HTTP status before the 101.
async fn request_identity(
    shared: &Edge,
    req: &switchboard_proto::ws::handshake::Request,
    cookies: &std::collections::BTreeMap<String, String>,
    deadline: tokio::time::Instant,
) -> Result<FromRequest, Refusal> {
    let Some(auth) = &shared.commands.auth else {
        return Ok(FromRequest::Anonymous);
    };
    match tokio::time::timeout_at(deadline, auth.authenticate(req, cookies)).await {
        Ok(Ok(Some(identity))) => Ok(FromRequest::Token(identity)),
        Ok(Ok(None)) => Ok(FromRequest::Anonymous),
        Ok(Err(e @ AuthError::Missing(_))) => Ok(FromRequest::Missing(e)),
        Ok(Err(e)) => Err(Refusal {
            status: e.status(),
            code: e.code(),
            message: e.to_string(),
            extra: "WWW-Authenticate: Bearer\r\n",
            metric: "unauthorized",
        }),
        Err(_) => Err(refuse_http(
            503,
            "auth_unavailable",
            "the signing keys could not be fetched in time; retry later",
            "unauthorized",
        )),
    }
}

/// The client's identity once `connection_init` came: the request's token,
/// else the payload's (which may also name an anonymous client's user).
async fn payload_identity(
    shared: &Edge,
    from_request: FromRequest,
    payload: Option<&Value>,
) -> Result<Option<Identity>, Refused> {
    let missing = match from_request {
        FromRequest::Token(identity) => return Ok(Some(identity)),
        FromRequest::Anonymous => None,
        FromRequest::Missing(e) => Some(e),
    };
    let forbidden = |e: AuthError| {
        tracing::debug!(code = e.code(), error = %e, "GraphQL client token refused");
        refused(
            close::FORBIDDEN,
            format!("Forbidden: {}", e.code()),
            "unauthorized",
        )
    };
    let (Some(auth), Some(token)) = (&shared.commands.auth, payload.and_then(token_in)) else {
        return match missing {
            Some(e) => Err(forbidden(e)),
            None => Ok(None),
        };
    };
    match tokio::time::timeout(shared.config.handshake_timeout, auth.verify(token)).await {
        Ok(Ok(identity)) => Ok(Some(identity)),
        // The signing keys could not be fetched: passing, so 1013.
        Ok(Err(AuthError::KeysUnavailable)) | Err(_) => {
            Err(refused(TRY_AGAIN_LATER, "auth unavailable", "unauthorized"))
        }
        Ok(Err(e)) => Err(forbidden(e)),
    }
}

/// The token in a `connection_init` payload: `token`, `authToken`,
/// `authorization` or `Authorization`, with or without `Bearer `.
fn token_in(payload: &Value) -> Option<&str> {
    ["token", "authToken", "authorization", "Authorization"]
        .iter()
        .find_map(|k| payload.get(k).and_then(Value::as_str))
        .map(|t| t.strip_prefix("Bearer ").unwrap_or(t).trim())
        .filter(|t| !t.is_empty())
}

/// Closes a GraphQL handshake with its code (legacy clients get
/// `connection_error` first), and counts it.
async fn refuse(shared: &Edge, stream: &mut ClientStream, protocol: Protocol, r: Refused) {
    shared.metrics.handshake(r.metric);
    shared.commands.graphql.count_close(r.code);
    let reason = truncated(&r.reason, 123);
    if protocol == Protocol::Legacy && matches!(r.code, close::FORBIDDEN | TRY_AGAIN_LATER) {
        let frame = encode_frame(OpCode::Text, &gql::connection_error(reason));
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(&frame)).await;
    }
    close_unopened(stream, r.code, reason).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_in_init_payloads() {
        let t = |v: Value| token_in(&v).map(str::to_owned);
        assert_eq!(t(serde_json::json!({"token": "a"})), Some("a".into()));
        assert_eq!(
            t(serde_json::json!({"Authorization": "Bearer b"})),
            Some("b".into())
        );
        assert_eq!(t(serde_json::json!({"authToken": "c"})), Some("c".into()));
        assert_eq!(t(serde_json::json!({"token": ""})), None);
        assert_eq!(t(serde_json::json!({})), None);
        assert_eq!(truncated("héllo", 2), "h");
    }
}
