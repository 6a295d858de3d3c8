//! The opening handshake (RFC 6455 §4.2): request-head parsing, upgrade
//! validation, and the bytes of the gateway's answers.

use super::deflate::{self, DeflateParams};
use base64::Engine;
use sha1::{Digest, Sha1};

/// Most header lines accepted in a request head by default; more is
/// answered with 431.
pub const MAX_HEADERS: usize = 64;

/// The highest header-line limit [`parse_request_with`] accepts.
pub const MAX_HEADERS_LIMIT: usize = 256;

/// A parsed HTTP/1.1 request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The raw query string without `?` (empty when absent).
    pub query: String,
    /// Minor HTTP version (1 for HTTP/1.1).
    pub version: u8,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lower-case).
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers_named(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// The request head could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// More header lines than allowed (answered with 431).
    #[error("too many headers")]
    TooManyHeaders,
    /// Not a valid HTTP/1.x request head (answered with 400).
    #[error("malformed request head")]
    Malformed,
}

/// Parses a request head from the front of `buf`, with at most
/// [`MAX_HEADERS`] header lines. `Ok(None)`: incomplete. On success returns
/// the request and the length of the head in bytes.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    parse_request_with(buf, MAX_HEADERS)
}

/// Like [`parse_request`], with at most `max_headers` header lines
/// (capped at [`MAX_HEADERS_LIMIT`]).
pub fn parse_request_with(
    buf: &[u8],
    max_headers: usize,
) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS_LIMIT];
    let mut req = httparse::Request::new(&mut headers[..max_headers.min(MAX_HEADERS_LIMIT)]);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed),
    };
    let target = req.path.ok_or(HeadError::Malformed)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    Ok(Some((
        Request {
            method: req.method.ok_or(HeadError::Malformed)?.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            version: req.version.ok_or(HeadError::Malformed)?,
            headers: req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
        },
        len,
    )))
}

/// What a valid upgrade request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// Requested subprotocols, in the client's order.
    pub protocols: Vec<String>,
    /// The permessage-deflate offer the gateway could accept, if any.
    pub deflate: Option<DeflateParams>,
}

/// Why a request is not a valid WebSocket upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// No `Upgrade: websocket` / `Connection: upgrade` (answered with 426).
    #[error("not a websocket upgrade request")]
    NotUpgrade,
    /// An upgrade with a method other than GET, or below HTTP/1.1 (answered with 400).
    #[error("websocket upgrade must be an HTTP/1.1 GET")]
    BadMethod,
    /// `Sec-WebSocket-Version` is not 13 (answered with 426 and the supported version).
    #[error("unsupported websocket version")]
    BadVersion,
    /// `Sec-WebSocket-Key` missing or not 16 bytes of base64 (answered with 400).
    #[error("missing or invalid Sec-WebSocket-Key")]
    BadKey,
}

/// Checks that `req` is a WebSocket upgrade and extracts what it asks for.
pub fn validate_upgrade(req: &Request) -> Result<Upgrade, UpgradeError> {
    if !req.header_has_token("upgrade", "websocket")
        || !req.header_has_token("connection", "upgrade")
    {
        return Err(UpgradeError::NotUpgrade);
    }
    if req.method != "GET" || req.version < 1 {
        return Err(UpgradeError::BadMethod);
    }
    if req.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(UpgradeError::BadVersion);
    }
    let key = req
        .header("sec-websocket-key")
        .map(str::trim)
        .ok_or(UpgradeError::BadKey)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => return Err(UpgradeError::BadKey),
    }
    let protocols = req
        .headers_named("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Upgrade {
        key: key.to_owned(),
        protocols,
        deflate: deflate::negotiate(req.headers_named("sec-websocket-extensions")),
    })
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &str) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The `101 Switching Protocols` answer.
pub fn switching_protocols(key: &str, protocol: Option<&str>, extensions: Option<&str>) -> Vec<u8> {
    let mut s = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = protocol {
        s.push_str("Sec-WebSocket-Protocol: ");
        s.push_str(p);
        s.push_str("\r\n");
    }
    if let Some(e) = extensions {
        s.push_str("Sec-WebSocket-Extensions: ");
        s.push_str(e);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// An error answer with a JSON body `{"code": .., "message": ..}` that closes
/// the connection. `extra` header lines must each end in `\r\n`.
pub fn error_response(status: u16, code: &str, message: &str, extra: &str) -> Vec<u8> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

/// The reason phrase of an HTTP status the gateway answers with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = "GET /chat?room=1&x=y HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: a, b\r\nSec-WebSocket-Protocol: c\r\n\r\n";

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_and_validates() {
        for cut in [0, 10, REQ.len() - 1] {
            assert_eq!(parse_request(&REQ.as_bytes()[..cut]).unwrap(), None);
        }
        let (req, len) = parse_request(REQ.as_bytes()).unwrap().unwrap();
        assert_eq!(len, REQ.len());
        assert_eq!(
            (req.path.as_str(), req.query.as_str()),
            ("/chat", "room=1&x=y")
        );
        let up = validate_upgrade(&req).unwrap();
        assert_eq!(up.protocols, ["a", "b", "c"]);
        assert_eq!(up.deflate, None);
        let small_window = REQ.replace(
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=9\r\nSec-WebSocket-Version",
        );
        let (req, _) = parse_request(small_window.as_bytes()).unwrap().unwrap();
        let up = validate_upgrade(&req).unwrap();
        assert_eq!(up.deflate.unwrap().server_max_window_bits, Some(9));
    }

    #[test]
    fn rejections() {
        let plain = "GET / HTTP/1.1\r\nHost: h\r\n\r\n";
        let (req, _) = parse_request(plain.as_bytes()).unwrap().unwrap();
        assert_eq!(validate_upgrade(&req), Err(UpgradeError::NotUpgrade));
        let v8 = REQ.replace("Version: 13", "Version: 8");
        let (req, _) = parse_request(v8.as_bytes()).unwrap().unwrap();
        assert_eq!(validate_upgrade(&req), Err(UpgradeError::BadVersion));
        let badkey = REQ.replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
        let (req, _) = parse_request(badkey.as_bytes()).unwrap().unwrap();
        assert_eq!(validate_upgrade(&req), Err(UpgradeError::BadKey));
        let post = REQ.replace("GET", "POST");
        let (req, _) = parse_request(post.as_bytes()).unwrap().unwrap();
        assert_eq!(validate_upgrade(&req), Err(UpgradeError::BadMethod));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            parse_request(many.as_bytes()),
            Err(HeadError::TooManyHeaders)
        );
        assert_eq!(
            parse_request(b"\x00\x01garbage\r\n\r\n"),
            Err(HeadError::Malformed)
        );
    }

    #[test]
    fn error_response_is_valid_http() {
        let r = error_response(
            426,
            "upgrade_required",
            "use websocket",
            "Sec-WebSocket-Version: 13\r\n",
        );
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], "upgrade_required");
    }
}
