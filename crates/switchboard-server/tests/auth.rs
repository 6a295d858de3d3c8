//! Who may connect, end to end: client tokens and `Origin` checks at the
//! handshake, with a real gateway, a test origin and raw upgrade requests
//! carrying JWTs signed with the test keys in `tests/fixtures/jwt` (made for
//! these tests only).
//!
//! What it proves:
//! - `allowed-origins`: pages of listed origins (exact, or any subdomain of
//!   a `*.` pattern) connect, a page of another site gets 403
//!   `origin_not_allowed` before the origin hears of it, and clients that
//!   send no `Origin` (not browsers) are not affected;
//! - a valid HS256 token is taken from `Authorization: Bearer`, the `token`
//!   query parameter or the configured cookie; its `sub` and every claim
//!   reach the origin in `connect`, and `sub` becomes the connection's user;
//! - RS256, ES256 and EdDSA tokens verify against PEM public keys;
//! - every bad token is refused with 401, `WWW-Authenticate: Bearer` and
//!   its own code, and the origin never hears of it: missing, expired, not
//!   yet valid, wrong audience, wrong issuer, wrong key, tampered,
//!   `alg: none`, algorithm confusion (an HS256 token whose secret is the
//!   RSA public key), no `exp`, garbage;
//! - `allow-anonymous` lets clients without a token in, never a bad token;
//! - channel grants: a token's `channels` (subscribe, history, presence)
//!   and `publish` claims, exact or `*` patterns, open channels of an
//!   origin-only namespace to that client and no other; a client never
//!   receives, reads or publishes on a channel it was not granted;
//! - JWKS: a token whose `kid` the cached set lacks makes the gateway fetch
//!   the set again (key rotation without restart), at most once per
//!   `jwks-refetch-interval`, and tokens of keys the set no longer has are
//!   refused.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard_test_util::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims valid for an hour, with `extra` merged in.
fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "alice", "exp": now() + 3600, "plan": "pro"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn hs(claims: &Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn signed(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    encode(&h, claims, key).unwrap()
}

fn b64(v: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Sends an upgrade for `path` with `headers`; the status, the JSON body's
/// `code` (if any) and the `WWW-Authenticate` header.
async fn handshake(
    gw: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(upgrade_request(path, headers).as_bytes())
        .await
        .unwrap();
    // The head; a refusal's body follows until the server closes, an
    // accepted upgrade stays open.
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if n == 0 || (text.contains("\r\n\r\n") && text.starts_with("HTTP/1.1 101")) {
                return;
            }
        }
    })
    .await
    .expect("an answer within 5 s");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head[9..12].parse().expect("a status");
    let code = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let www = head
        .lines()
        .find_map(|l| l.strip_prefix("WWW-Authenticate: "))
        .unwrap_or_default()
        .to_owned();
    (status, code, www)
}

/// A test origin and a gateway that asks it, configured by `tweak`.
async fn with_origin(
    tweak: impl FnOnce(&mut switchboard_server::Config),
) -> (TestOrigin, TestGateway) {
    init_tracing();
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let gw = TestGateway::start(|c| {
        c.origin = Some(url);
        tweak(c);
    })
    .await;
    (origin, gw)
}

async fn bearer(gw: &TestGateway, token: &str) -> (u16, String, String) {
    handshake(gw, "/", &[("Authorization", &format!("Bearer {token}"))]).await
}

#[tokio::test]
async fn a_valid_token_is_found_in_header_query_or_cookie_and_its_claims_reach_the_origin() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_cookie = Some("sb_token".into());
    })
    .await;
    let token = hs(&claims(json!({"rooms": ["a", "b"]})), SECRET.as_bytes());

    assert_eq!(bearer(&gw, &token).await.0, 101);
    let q = format!("/live?token={token}");
    assert_eq!(handshake(&gw, &q, &[]).await.0, 101);
    let cookie = format!("theme=dark; sb_token={token}");
    assert_eq!(handshake(&gw, "/", &[("Cookie", &cookie)]).await.0, 101);

    let connects = origin.connects();
    assert_eq!(connects.len(), 3, "{connects:?}");
    for c in &connects {
        assert_eq!(c.user_id.as_deref(), Some("alice"));
        let claims = c.claims.as_ref().expect("verified claims");
        assert_eq!(claims["plan"], "pro");
        assert_eq!(claims["rooms"], json!(["a", "b"]));
        assert_eq!(claims["sub"], "alice");
    }

    // The token's `sub` is the connection's user.
    let (_ws, id) = {
        let (ws, resp) = connect_with(
            &gw.ws_url("/"),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await
        .expect("connects");
        drop(resp);
        let c = origin.connects();
        (ws, c.last().unwrap().connection_id.clone())
    };
    let info = gw.connection(&id).await.expect("connection info");
    assert_eq!(info.user_id.as_deref(), Some("alice"));
    gw.shutdown().await;
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_its_code_before_the_origin_hears_of_it() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_audience = vec!["switchboard".into()];
        c.jwt_issuer = vec!["https://auth.example".into()];
        c.jwt_leeway = Duration::from_secs(5);
    })
    .await;
    let good = json!({"aud": "switchboard", "iss": "https://auth.example"});
    let ok = hs(&claims(good.clone()), SECRET.as_bytes());
    assert_eq!(bearer(&gw, &ok).await.0, 101, "the good token connects");

    let with = |extra: Value| {
        let mut c = claims(good.clone());
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    // Another payload under the original signature.
    let tampered = {
        let parts: Vec<&str> = ok.split('.').collect();
        let payload = b64(&with(json!({"sub": "mallory"})));
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&with(json!({})))
    );
    let mut no_exp = with(json!({}));
    no_exp.as_object_mut().unwrap().remove("exp");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired beyond the leeway",
            hs(&with(json!({"exp": now() - 60})), SECRET.as_bytes()),
            "token_expired",
        ),
        (
            "not valid before a minute from now",
            hs(&with(json!({"nbf": now() + 60})), SECRET.as_bytes()),
            "token_not_yet_valid",
        ),
        (
            "another audience",
            hs(&with(json!({"aud": "someone-else"})), SECRET.as_bytes()),
            "token_wrong_audience",
        ),
        (
            "another issuer",
            hs(
                &with(json!({"iss": "https://evil.example"})),
                SECRET.as_bytes(),
            ),
            "token_wrong_issuer",
        ),
        (
            "signed with another secret",
            hs(&with(json!({})), b"another-secret-of-32-bytes-or-more!!"),
            "token_bad_signature",
        ),
        ("tampered payload", tampered, "token_bad_signature"),
        ("alg none", none, "token_algorithm_refused"),
        (
            "an RS256 token where only a secret is configured",
            signed(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).unwrap(),
                None,
                &with(json!({})),
            ),
            "token_algorithm_refused",
        ),
        ("no exp", hs(&no_exp, SECRET.as_bytes()), "token_malformed"),
        ("garbage", "not-a-jwt".into(), "token_malformed"),
    ];
    for (what, token, code) in &cases {
        let (status, got, www) = bearer(&gw, token).await;
        assert_eq!((status, got.as_str()), (401, *code), "{what}");
        assert_eq!(www, "Bearer", "{what}");
    }
    let (status, code, _) = handshake(&gw, "/", &[]).await;
    assert_eq!((status, code.as_str()), (401, "token_missing"));
    // Within the leeway still counts as valid.
    let late = hs(&with(json!({"exp": now() - 2})), SECRET.as_bytes());
    assert_eq!(bearer(&gw, &late).await.0, 101, "2 s past exp, 5 s leeway");
    assert_eq!(
        origin.connects().len(),
        2,
        "only the two good tokens reached the origin"
    );
    gw.shutdown().await;
}

/// Issue 11 (2): with `--jwt-audience` and `--jwt-issuer` configured, a
/// token must carry them; a missing, `null` or ill-typed `aud` / `iss` is
/// refused like a wrong one (jsonwebtoken alone only checks the claims
/// that are there).
#[tokio::test]
async fn a_configured_audience_and_issuer_are_required_not_only_checked_when_present() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_audience = vec!["switchboard".into()];
        c.jwt_issuer = vec!["https://auth.example".into()];
    })
    .await;
    let token = |aud: Option<Value>, iss: Option<Value>| {
        let mut c = claims(json!({}));
        let o = c.as_object_mut().unwrap();
        if let Some(a) = aud {
            o.insert("aud".into(), a);
        }
        if let Some(i) = iss {
            o.insert("iss".into(), i);
        }
        hs(&c, SECRET.as_bytes())
    };
    let aud = || Some(json!("switchboard"));
    let iss = || Some(json!("https://auth.example"));
    assert_eq!(bearer(&gw, &token(aud(), iss())).await.0, 101);
    assert_eq!(
        bearer(&gw, &token(Some(json!(["other", "switchboard"])), iss()))
            .await
            .0,
        101,
        "an aud list naming this gateway is fine"
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("no aud", token(None, iss()), "token_wrong_audience"),
        ("no iss", token(aud(), None), "token_wrong_issuer"),
        ("neither", token(None, None), "token_wrong_audience"),
        (
            "aud null",
            token(Some(Value::Null), iss()),
            "token_wrong_audience",
        ),
        (
            "iss null",
            token(aud(), Some(Value::Null)),
            "token_wrong_issuer",
        ),
        (
            "aud a number",
            token(Some(json!(7)), iss()),
            "token_wrong_audience",
        ),
        (
            "aud an empty list",
            token(Some(json!([])), iss()),
            "token_wrong_audience",
        ),
        (
            "aud a list with a non-string",
            token(Some(json!(["switchboard", 1])), iss()),
            "token_wrong_audience",
        ),
        (
            "iss an object",
            token(aud(), Some(json!({}))),
            "token_wrong_issuer",
        ),
    ];
    for (what, token, code) in &cases {
        let (status, got, _) = bearer(&gw, token).await;
        assert_eq!((status, got.as_str()), (401, *code), "{what}");
    }
    assert_eq!(
        origin.connects().len(),
        2,
        "only the good tokens reached the origin"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn public_keys_verify_rs256_es256_and_eddsa_and_refuse_algorithm_confusion() {
    let (_origin, gw) = with_origin(|c| {
        c.jwt_public_key = vec![
            fixture("rsa-public.pem"),
            fixture("ec-public.pem"),
            fixture("ed-public.pem"),
        ];
    })
    .await;
    let c = claims(json!({}));
    let rsa = EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&pem("ec-private.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&pem("ed-private.pem")).unwrap();
    for (alg, key) in [
        (Algorithm::RS256, &rsa),
        (Algorithm::PS256, &rsa),
        (Algorithm::ES256, &ec),
        (Algorithm::EdDSA, &ed),
    ] {
        assert_eq!(
            bearer(&gw, &signed(alg, key, None, &c)).await.0,
            101,
            "{alg:?}"
        );
    }
    // A key that is not configured.
    let other = EncodingKey::from_rsa_pem(&pem("rsa2-private.pem")).unwrap();
    let (status, code, _) = bearer(&gw, &signed(Algorithm::RS256, &other, None, &c)).await;
    assert_eq!((status, code.as_str()), (401, "token_bad_signature"));
    // Algorithm confusion: HS256 with the RSA public key as the secret.
    let confused = hs(&c, &pem("rsa-public.pem"));
    let (status, code, _) = bearer(&gw, &confused).await;
    assert_eq!((status, code.as_str()), (401, "token_algorithm_refused"));
    gw.shutdown().await;
}

#[tokio::test]
async fn anonymous_clients_may_connect_when_allowed_but_bad_tokens_never() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.allow_anonymous = true;
    })
    .await;
    assert_eq!(handshake(&gw, "/", &[]).await.0, 101);
    let c = &origin.connects()[0];
    assert_eq!((c.user_id.as_ref(), c.claims.as_ref()), (None, None));
    let bad = hs(&claims(json!({})), b"another-secret-of-32-bytes-or-more!!");
    assert_eq!(bearer(&gw, &bad).await.1, "token_bad_signature");
    gw.shutdown().await;
}

/// A JWKS endpoint whose document can be swapped, counting fetches.
struct Jwks {
    url: String,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

async fn jwks_server(file: &str) -> Jwks {
    let body = Arc::new(Mutex::new(
        String::from_utf8(pem(file)).expect("utf-8 jwks"),
    ));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (b, f) = (body.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (b, f) = (b.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                let body = b.lock().unwrap().clone();
                ([("content-type", "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Jwks {
        url: format!("http://{addr}/jwks.json"),
        body,
        fetches,
    }
}

#[tokio::test]
async fn jwks_keys_rotate_without_restart_and_unknown_kids_are_rate_limited() {
    init_tracing();
    let jwks = jwks_server("jwks-k1.json").await;
    let origin = TestOrigin::start(None).await;
    let url = origin.url();
    let jwks_url = jwks.url.clone();
    let gw = TestGateway::start(|c| {
        c.origin = Some(url);
        c.jwks_url = Some(jwks_url);
        c.jwks_refetch_interval = Duration::from_millis(500);
    })
    .await;
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1, "fetched at start");
    let c = claims(json!({}));
    let k1 = EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).unwrap();
    let k2 = EncodingKey::from_rsa_pem(&pem("rsa2-private.pem")).unwrap();
    let t1 = signed(Algorithm::RS256, &k1, Some("k1"), &c);
    let t2 = signed(Algorithm::RS256, &k2, Some("k2"), &c);
    assert_eq!(bearer(&gw, &t1).await.0, 101);
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1, "k1 was cached");

    // k2 is not published yet: refused; a burst of unknown kids fetches
    // at most once per interval.
    for _ in 0..5 {
        let (status, code, _) = bearer(&gw, &t2).await;
        assert_eq!((status, code.as_str()), (401, "token_unknown_key"));
    }
    let after_burst = jwks.fetches.load(Ordering::SeqCst);
    assert!(after_burst <= 2, "{after_burst} fetches for one burst");

    // The issuer publishes k2: once the interval has passed, k2 works.
    *jwks.body.lock().unwrap() = String::from_utf8(pem("jwks-k1-k2.json")).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(bearer(&gw, &t2).await.0, 101, "rotated in without restart");
    assert_eq!(bearer(&gw, &t1).await.0, 101, "k1 still valid");

    // A token for k2 signed with k1's key names the wrong key.
    let forged = signed(Algorithm::RS256, &k1, Some("k2"), &c);
    assert_eq!(bearer(&gw, &forged).await.1, "token_bad_signature");
    gw.shutdown().await;
}

#[tokio::test]
async fn only_pages_of_allowed_origins_connect() {
    let (origin, gw) = with_origin(|c| {
        c.allowed_origins = vec![
            "https://app.example.com".into(),
            "https://*.example.org".into(),
        ];
    })
    .await;
    for (page, status, code) in [
        ("https://app.example.com", 101, ""),
        ("https://chat.example.org", 101, ""),
        ("https://a.b.example.org", 101, ""),
        ("https://evil.io", 403, "origin_not_allowed"),
        ("http://app.example.com", 403, "origin_not_allowed"),
        ("https://example.org", 403, "origin_not_allowed"),
        ("https://app.example.com.evil.io", 403, "origin_not_allowed"),
        ("null", 403, "origin_not_allowed"),
    ] {
        let (s, c, _) = handshake(&gw, "/", &[("Origin", page)]).await;
        assert_eq!((s, c.as_str()), (status, code), "{page}");
    }
    // No Origin header: not a browser page.
    assert_eq!(handshake(&gw, "/", &[]).await.0, 101);
    assert_eq!(
        origin.connects().len(),
        4,
        "refused pages never reach the origin"
    );
    gw.shutdown().await;
}

/// A native (`switchboard.v1`) client presenting `token`.
async fn native_client(gw: &TestGateway, token: &str) -> Ws {
    let (ws, _) = connect_with(
        &gw.ws_url("/"),
        &[
            ("Sec-WebSocket-Protocol", "switchboard.v1"),
            ("Authorization", &format!("Bearer {token}")),
        ],
    )
    .await
    .expect("connects");
    ws
}

/// Sends a command and returns its reply; pushes seen meanwhile are added
/// to `pushes`.
async fn command(ws: &mut Ws, id: u64, mut cmd: Value, pushes: &mut Vec<Value>) -> Value {
    use futures_util::SinkExt;
    cmd["id"] = json!(id);
    ws.send(WsMessage::text(cmd.to_string())).await.unwrap();
    loop {
        let WsMessage::Text(t) = next_msg(ws).await else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["id"] == json!(id) {
            return v;
        }
        pushes.push(v);
    }
}

fn denied(reply: &Value) -> bool {
    reply["error"]["code"] == "permission_denied"
}

#[tokio::test]
async fn token_grants_open_channels_and_nothing_else_leaks() {
    init_tracing();
    let gw = TestGateway::start(|c| {
        c.jwt_secret = Some(SECRET.into());
        // Origin-only namespace: without a grant clients may do nothing.
        c.namespace = vec!["room:history-size=100,presence".parse().unwrap()];
    })
    .await;
    let granted = hs(
        &claims(json!({"channels": ["room:a-*"], "publish": ["room:a-1"]})),
        SECRET.as_bytes(),
    );
    let plain = hs(&claims(json!({"sub": "bob"})), SECRET.as_bytes());
    let mut alice = native_client(&gw, &granted).await;
    let mut bob = native_client(&gw, &plain).await;
    let mut pushes = Vec::new();

    // Alice's grants: subscribe to room:a-*, publish on room:a-1.
    let r = command(
        &mut alice,
        1,
        json!({"cmd": "subscribe", "channel": "room:a-1"}),
        &mut pushes,
    )
    .await;
    assert!(r["result"].is_object(), "{r}");
    for (id, cmd) in [
        (2, json!({"cmd": "subscribe", "channel": "room:b"})),
        (3, json!({"cmd": "history", "channel": "room:b"})),
        (4, json!({"cmd": "presence", "channel": "room:b"})),
        (
            5,
            json!({"cmd": "publish", "channel": "room:a-2", "text": "x"}),
        ),
        (
            6,
            json!({"cmd": "publish", "channel": "room:b", "text": "x"}),
        ),
    ] {
        let r = command(&mut alice, id, cmd.clone(), &mut pushes).await;
        assert!(denied(&r), "{cmd} -> {r}");
    }
    let r = command(
        &mut alice,
        7,
        json!({"cmd": "publish", "channel": "room:a-1", "text": "hi"}),
        &mut pushes,
    )
    .await;
    assert_eq!(r["result"]["offset"], 1, "{r}");
    let r = command(
        &mut alice,
        8,
        json!({"cmd": "history", "channel": "room:a-1"}),
        &mut pushes,
    )
    .await;
    assert_eq!(r["result"]["publications"][0]["text"], "hi", "{r}");

    // Bob's token grants nothing: every channel command is refused.
    let mut bob_pushes = Vec::new();
    for (id, cmd) in [
        (1, json!({"cmd": "subscribe", "channel": "room:a-1"})),
        (2, json!({"cmd": "history", "channel": "room:a-1"})),
        (3, json!({"cmd": "presence", "channel": "room:a-1"})),
        (
            4,
            json!({"cmd": "publish", "channel": "room:a-1", "text": "x"}),
        ),
    ] {
        let r = command(&mut bob, id, cmd.clone(), &mut bob_pushes).await;
        assert!(denied(&r), "bob: {cmd} -> {r}");
    }

    // The origin publishes on room:b and room:a-1: Alice gets only room:a-1.
    for (ch, text) in [("room:b", "secret"), ("room:a-1", "public")] {
        let r = gw
            .call(
                gw.request(
                    reqwest::Method::POST,
                    &format!("/v1/channels/{ch}/messages"),
                )
                .json(&json!({"text": text})),
            )
            .await;
        assert_eq!(r.status, 200, "{ch}");
    }
    let r = command(&mut alice, 9, json!({"cmd": "ping"}), &mut pushes).await;
    assert!(r["result"].is_object());
    let texts: Vec<(&str, &str)> = pushes
        .iter()
        .filter(|p| p["push"] == "message")
        .map(|p| (p["channel"].as_str().unwrap(), p["text"].as_str().unwrap()))
        .collect();
    assert_eq!(texts, [("room:a-1", "hi"), ("room:a-1", "public")]);
    gw.shutdown().await;
}

/// A token of `sub` expiring `secs` seconds from now.
fn short(sub: &str, secs: u64) -> String {
    hs(&json!({"sub": sub, "exp": now() + secs}), SECRET.as_bytes())
}

#[tokio::test]
async fn a_native_client_refreshes_its_token_in_band_or_is_closed_at_expiry() {
    init_tracing();
    let gw = TestGateway::start(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_leeway = Duration::ZERO;
        c.token_refresh_notice = Duration::from_secs(2);
    })
    .await;
    // Told before expiry; refreshes; outlives the first token.
    let mut ws = native_client(&gw, &short("ann", 3)).await;
    let mut pushes = Vec::new();
    let refresh = loop {
        let WsMessage::Text(t) = next_msg(&mut ws).await else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["push"] == "refresh" {
            break v;
        }
    };
    let first_exp = refresh["expires_at_ms"].as_u64().unwrap();
    assert!(
        first_exp > now() * 1000,
        "told before it expires: {refresh}"
    );
    // Another user's token, or an expired one, is refused.
    let r = command(
        &mut ws,
        1,
        json!({"cmd": "refresh", "token": short("bob", 60)}),
        &mut pushes,
    )
    .await;
    assert_eq!(r["error"]["code"], "token_invalid", "{r}");
    let stale = hs(&json!({"sub": "ann", "exp": now() - 10}), SECRET.as_bytes());
    let r = command(
        &mut ws,
        2,
        json!({"cmd": "refresh", "token": stale}),
        &mut pushes,
    )
    .await;
    assert_eq!(r["error"]["code"], "token_invalid", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("token_expired"),
        "{r}"
    );
    let r = command(
        &mut ws,
        3,
        json!({"cmd": "refresh", "token": short("ann", 3600)}),
        &mut pushes,
    )
    .await;
    let new_exp = r["result"]["expires_at_ms"].as_u64().unwrap();
    assert!(new_exp > first_exp + 3_000_000, "{r}");
    // Past the first token's expiry the connection still answers.
    let wait = first_exp.saturating_sub(now() * 1000) + 1500;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let r = command(&mut ws, 4, json!({"cmd": "ping"}), &mut pushes).await;
    assert!(r["result"].is_object(), "{r}");

    // Not refreshed: closed with 4004 at expiry.
    let mut lazy = native_client(&gw, &short("cy", 2)).await;
    let (code, reason, _) = expect_close(&mut lazy).await;
    assert_eq!((code, reason.as_str()), (4004, "token expired"));
    gw.shutdown().await;
}

#[tokio::test]
async fn raw_connections_close_at_token_expiry_unless_the_origin_lets_them_outlive_it() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_leeway = Duration::ZERO;
    })
    .await;
    let bearer_header = |t: &str| format!("Bearer {t}");
    let t = short("ann", 2);
    let (mut ws, _) = connect_with(&gw.ws_url("/"), &[("Authorization", &bearer_header(&t))])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, 4004);
    assert!(started.elapsed() < Duration::from_secs(4));

    origin.behavior(|b| {
        b.connect = ConnectBehavior::Accept(switchboard_proto::origin::OriginAnswer {
            outlive_token: true,
            ..Default::default()
        })
    });
    let t = short("ann", 1);
    let (mut ws, _) = connect_with(&gw.ws_url("/"), &[("Authorization", &bearer_header(&t))])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Still open: a control API push arrives.
    let id = origin.connects().last().unwrap().connection_id.clone();
    let r = gw
        .call(
            gw.request(
                reqwest::Method::POST,
                &format!("/v1/connections/{id}/messages"),
            )
            .json(&json!({"text": "still here"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("still here"));
    gw.shutdown().await;
}

/// `max-connections-per-user`: counted by the token's `sub` on this node,
/// refused with 429 before the origin hears of it, freed when a connection
/// ends; other users and anonymous clients are not affected.
#[tokio::test]
async fn a_user_over_max_connections_per_user_gets_429_until_one_closes() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.allow_anonymous = true;
        c.max_connections_per_user = 2;
    })
    .await;
    let ann = hs(&claims(json!({"sub": "ann"})), SECRET.as_bytes());
    let auth = format!("Bearer {ann}");
    let first = RawWs::connect(gw.addr, "/", &[("Authorization", &auth)]).await;
    let _second = RawWs::connect(gw.addr, "/", &[("Authorization", &auth)]).await;
    let arrivals = origin.arrivals().len();
    let (status, code, _) = bearer(&gw, &ann).await;
    assert_eq!(
        (status, code.as_str()),
        (429, "too_many_connections_for_user")
    );
    assert_eq!(
        origin.arrivals().len(),
        arrivals,
        "refused before the origin is asked"
    );
    assert_eq!(
        gw.metric("switchboard_handshakes_total{result=\"too_many_connections_for_user\"}")
            .await,
        1.0
    );

    // Another user, and clients without a token, are not counted with ann.
    let bob = hs(&claims(json!({"sub": "bob"})), SECRET.as_bytes());
    assert_eq!(bearer(&gw, &bob).await.0, 101);
    assert_eq!(handshake(&gw, "/", &[]).await.0, 101);

    // One of ann's connections ends: her next one is let in.
    let id = origin.id_for(first.local_addr).await;
    drop(first);
    origin.wait_disconnect(&id).await;
    eventually(WAIT, "ann's slot freed", || async {
        bearer(&gw, &ann).await.0 == 101
    })
    .await;
}

/// `subscribe-to-origin`: a client subscribe its token does not grant is
/// decided by the origin (a `subscribe` event); a refusal reaches the client
/// as `rejected` with the origin's reason, and the client gets nothing of
/// that channel (messages, history, presence). Granted channels skip the
/// origin.
#[tokio::test]
async fn the_origin_decides_subscriptions_of_subscribe_to_origin_namespaces() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.namespace = vec!["team:history-size=10,presence,subscribe-to-origin"
            .parse()
            .unwrap()];
    })
    .await;
    origin.behavior(|b| b.reject_subscribe_containing = Some("secret".into()));
    let token = hs(
        &claims(json!({"sub": "ann", "channels": ["team:granted"]})),
        SECRET.as_bytes(),
    );
    let mut ws = native_client(&gw, &token).await;
    let mut pushes = Vec::new();

    // Allowed by the origin: subscribed, with the event it was asked.
    let r = command(
        &mut ws,
        1,
        json!({"cmd": "subscribe", "channel": "team:open"}),
        &mut pushes,
    )
    .await;
    assert!(r["result"].is_object(), "{r}");
    let asked: Vec<_> = origin
        .events()
        .into_iter()
        .filter_map(|e| match e {
            switchboard_proto::origin::Event::Subscribe(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].channel, "team:open");
    assert_eq!(asked[0].user_id.as_deref(), Some("ann"));

    // Refused by the origin: the client sees its reason, and nothing of the channel.
    let r = command(
        &mut ws,
        2,
        json!({"cmd": "subscribe", "channel": "team:secret-plans"}),
        &mut pushes,
    )
    .await;
    assert_eq!(r["error"]["code"], "rejected", "{r}");
    assert_eq!(r["error"]["message"], "no access to team:secret-plans");
    gw.post(
        "/v1/channels/team:secret-plans/messages",
        &json!({"text": "classified"}),
    )
    .await;
    for (id, cmd) in [
        (3, json!({"cmd": "history", "channel": "team:secret-plans"})),
        (
            4,
            json!({"cmd": "presence", "channel": "team:secret-plans"}),
        ),
    ] {
        let r = command(&mut ws, id, cmd, &mut pushes).await;
        assert!(denied(&r), "{r}");
    }

    // A channel the token grants is not asked of the origin.
    let r = command(
        &mut ws,
        5,
        json!({"cmd": "subscribe", "channel": "team:granted"}),
        &mut pushes,
    )
    .await;
    assert!(r["result"].is_object(), "{r}");
    let subscribe_events = origin
        .arrivals()
        .iter()
        .flatten()
        .filter(|e| matches!(e, switchboard_proto::origin::Event::Subscribe(_)))
        .count();
    assert_eq!(subscribe_events, 2, "team:open and team:secret-plans only");

    // Live messages: the open channel's arrive, the refused one's never did.
    gw.post("/v1/channels/team:open/messages", &json!({"text": "hello"}))
        .await;
    let r = command(&mut ws, 6, json!({"cmd": "ping"}), &mut pushes).await;
    assert!(r["result"].is_object());
    let texts: Vec<_> = pushes
        .iter()
        .filter(|p| p["push"] == "message")
        .map(|p| (p["channel"].clone(), p["text"].clone()))
        .collect();
    assert_eq!(
        texts,
        vec![(json!("team:open"), json!("hello"))],
        "{pushes:?}"
    );
}

/// The origin unreachable: a `subscribe-to-origin` subscribe is answered
/// `unavailable`, never let through.
#[tokio::test]
async fn a_subscribe_the_origin_cannot_decide_is_refused_as_unavailable() {
    let (origin, gw) = with_origin(|c| {
        c.namespace = vec!["team:subscribe-to-origin".parse().unwrap()];
        c.origin_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut ws, _) = connect_with(
        &gw.ws_url("/"),
        &[("Sec-WebSocket-Protocol", "switchboard.v1")],
    )
    .await
    .expect("connects");
    // The origin stops answering: no answer within origin-timeout.
    origin.pause();
    let mut pushes = Vec::new();
    let r = command(
        &mut ws,
        1,
        json!({"cmd": "subscribe", "channel": "team:x"}),
        &mut pushes,
    )
    .await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    origin.resume();
    let r = command(
        &mut ws,
        2,
        json!({"cmd": "subscribe", "channel": "team:x"}),
        &mut pushes,
    )
    .await;
    assert!(
        r["result"].is_object(),
        "answered again once the origin is back: {r}"
    );
}

/// A native client opened without a token (`wss://…` from a browser, which
/// cannot set headers).
async fn native_without_token(gw: &TestGateway) -> Ws {
    let (ws, resp) = connect_with(
        &gw.ws_url("/"),
        &[("Sec-WebSocket-Protocol", "switchboard.v1")],
    )
    .await
    .expect("a native client without a token gets 101");
    assert_eq!(resp.status(), 101);
    ws
}

/// The token in the first command: the origin hears of the client only
/// once it is verified, with its claims; the reply follows `connected`.
#[tokio::test]
async fn a_native_client_may_send_its_token_as_the_first_command() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.namespace = vec!["room:history-size=10".parse().unwrap()];
    })
    .await;
    let mut ws = native_without_token(&gw).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        origin.arrivals().is_empty(),
        "no connect before the token is verified"
    );

    let c = claims(json!({"channels": ["room:a"]}));
    let token = hs(&c, SECRET.as_bytes());
    use futures_util::SinkExt;
    ws.send(WsMessage::text(
        json!({"id": 1, "cmd": "authenticate", "token": token}).to_string(),
    ))
    .await
    .unwrap();
    let first: Value = match next_msg(&mut ws).await {
        WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
        m => panic!("{m:?}"),
    };
    assert_eq!(first["push"], "connected", "{first}");
    let reply: Value = match next_msg(&mut ws).await {
        WsMessage::Text(t) => serde_json::from_str(&t).unwrap(),
        m => panic!("{m:?}"),
    };
    assert_eq!(reply["id"], 1, "{reply}");
    // The token's own `exp` (a second may have passed since it was made).
    assert_eq!(
        reply["result"]["expires_at_ms"],
        json!(c["exp"].as_u64().unwrap() * 1000)
    );
    let connects = origin.connects();
    assert_eq!(connects.len(), 1);
    assert_eq!(connects[0].user_id.as_deref(), Some("alice"));
    assert_eq!(connects[0].claims.as_ref().unwrap()["plan"], "pro");

    // A connection like any other: its token's grants apply, and a second
    // `authenticate` is refused (refresh replaces a token).
    let mut pushes = Vec::new();
    let r = command(
        &mut ws,
        2,
        json!({"cmd": "subscribe", "channel": "room:a"}),
        &mut pushes,
    )
    .await;
    assert!(r["result"].is_object(), "{r}");
    let r = command(
        &mut ws,
        3,
        json!({"cmd": "subscribe", "channel": "room:b"}),
        &mut pushes,
    )
    .await;
    assert!(denied(&r), "{r}");
    let r = command(
        &mut ws,
        4,
        json!({"cmd": "authenticate", "token": token}),
        &mut pushes,
    )
    .await;
    assert_eq!(r["error"]["code"], "bad_command", "{r}");
}

/// Every way the first command can fail closes the WebSocket with 4005
/// (the token) or 4006 (a refusal after it), before or without the origin.
#[tokio::test]
async fn a_first_command_that_does_not_authenticate_closes_with_4005_or_4006() {
    let (origin, gw) = with_origin(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    use futures_util::SinkExt;
    let expired = hs(&claims(json!({"exp": now() - 60})), SECRET.as_bytes());
    let cases = [
        (Some(json!({"id": 1, "cmd": "ping"})), 4005, "token_missing"),
        (
            Some(json!({"id": 1, "cmd": "authenticate", "token": expired})),
            4005,
            "token_expired",
        ),
        (
            Some(json!({"id": 1, "cmd": "authenticate", "token": "not.a.jwt"})),
            4005,
            "token_malformed",
        ),
        // Nothing within handshake-timeout.
        (None, 4005, "token_missing"),
        // A first frame far larger than a token needs.
        (
            Some(json!({"id": 1, "cmd": "authenticate", "token": "x".repeat(20_000)})),
            4005,
            "token_malformed",
        ),
    ];
    for (first, code, reason) in cases {
        let mut ws = native_without_token(&gw).await;
        if let Some(cmd) = &first {
            ws.send(WsMessage::text(cmd.to_string())).await.unwrap();
        }
        let (got, why, before) = expect_close(&mut ws).await;
        assert_eq!(got, code, "{first:?}: {why}");
        assert!(why.starts_with(reason), "{first:?}: {why}");
        assert!(before.is_empty(), "nothing but the close: {before:?}");
    }
    assert!(
        origin.arrivals().is_empty(),
        "the origin never heard of them"
    );
    assert_eq!(
        gw.metric("switchboard_handshakes_total{result=\"unauthorized\"}")
            .await,
        4.0
    );

    // A valid token the origin then refuses: 4006 with its reason.
    origin.behavior(|b| b.connect = ConnectBehavior::Reject(403, "banned".into()));
    let mut ws = native_without_token(&gw).await;
    let token = hs(&claims(json!({})), SECRET.as_bytes());
    ws.send(WsMessage::text(
        json!({"id": 1, "cmd": "authenticate", "token": token}).to_string(),
    ))
    .await
    .unwrap();
    let (got, why, _) = expect_close(&mut ws).await;
    assert_eq!((got, why.as_str()), (4006, "rejected_by_origin: banned"));

    // A raw client without a token is still refused at the handshake.
    let (status, code, _) = handshake(&gw, "/", &[]).await;
    assert_eq!((status, code.as_str()), (401, "token_missing"));
}
