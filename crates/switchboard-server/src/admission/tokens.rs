//! Client authentication at the handshake: a JWT, verified against the
//! configured keys, before the origin hears of the connection.
//!
//! - **Keys.** An HMAC secret (`jwt-secret`), public keys in PEM files
//!   (`jwt-public-key`: RSA, EC or Ed25519, told apart by their contents),
//!   and a JWKS URL (`jwks-url`) whose keys are fetched at start, cached,
//!   and fetched again when a token names a `kid` the cache does not have —
//!   at most once per `jwks-refetch-interval`, so rotation needs no restart and
//!   unknown `kid`s cannot make the gateway hammer the key server.
//! - **Algorithms.** A token is only checked against keys of its header's
//!   algorithm family, so an HS256 token is never checked against an RSA
//!   public key used as an HMAC secret (algorithm confusion), and `none` is
//!   never accepted.
//! - **Claims.** `exp` is required; `exp` and `nbf` are checked with
//!   `jwt-leeway`. When `jwt-audience` (`jwt-issuer`) is configured, `aud`
//!   (`iss`) is required too: a token without it, or with `null` or a value
//!   that is not a string (or, for `aud`, a list of strings), is refused
//!   exactly like one with a wrong value. The verified
//!   claims go to the origin in the `connect` event; `sub` becomes the
//!   connection's user id unless the origin names another.
//! - **Where the token is.** `Authorization: Bearer <token>`, the `token`
//!   query parameter, or the cookie named by `jwt-cookie`, in that order.
//!
//! Once a key is configured a token is required, unless `allow-anonymous`
//! lets connections without one through (a token that is there must still
//! be valid). Every refusal is a 401 with a stable code ([`AuthError`]).

use crate::config::Config;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{errors::ErrorKind, Algorithm, AlgorithmFamily, DecodingKey, Validation};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchboard_proto::ws::handshake::Request;

/// How long fetched JWKS keys are used before they are fetched again.
const JWKS_TTL: Duration = Duration::from_secs(300);

/// Longest wait for the JWKS endpoint.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a client's token was refused (a 401 with [`AuthError::code`], or 503
/// when the keys cannot be had).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    #[error(
        "a token is required: `Authorization: Bearer <token>`, the `token` query parameter{0}"
    )]
    Missing(String),
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is not meant for this gateway (aud)")]
    WrongAudience,
    #[error("the token comes from an issuer this gateway does not trust (iss)")]
    WrongIssuer,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("{0}")]
    AlgorithmRefused(String),
    #[error("no configured key has the token's key id `{0}`")]
    UnknownKey(String),
    #[error("the signing keys cannot be fetched right now; retry later")]
    KeysUnavailable,
}

impl AuthError {
    /// The stable code in the refusal's JSON body.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::Missing(_) => "token_missing",
            Self::Malformed(_) => "token_malformed",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::WrongAudience => "token_wrong_audience",
            Self::WrongIssuer => "token_wrong_issuer",
            Self::BadSignature => "token_bad_signature",
            Self::AlgorithmRefused(_) => "token_algorithm_refused",
            Self::UnknownKey(_) => "token_unknown_key",
            Self::KeysUnavailable => "auth_unavailable",
        }
    }

    /// The HTTP status of the refusal.
    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::KeysUnavailable => 503,
            _ => 401,
        }
    }
}

/// Why the authentication settings cannot be used (at start).
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A public key file cannot be read.
    #[error("jwt-public-key {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A public key file holds no RSA, EC or Ed25519 public key.
    #[error("jwt-public-key {0}: not an RSA, EC or Ed25519 public key in PEM")]
    NotAKey(PathBuf),
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Identity {
    /// `sub`, if it is a string.
    pub(crate) user: Option<String>,
    /// Every claim of the token.
    pub(crate) claims: Map<String, Value>,
}

impl Identity {
    /// When the token expires (`exp`), Unix time in milliseconds.
    pub(crate) fn expires_at_ms(&self) -> Option<u64> {
        self.claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|s| s.saturating_mul(1000))
    }

    /// What a connection keeps of its token.
    pub(crate) fn state(&self) -> TokenState {
        TokenState {
            user: self.user.clone(),
            grants: self.grants(),
        }
    }

    /// The channel grants of the token's `channels` and `publish` claims.
    pub(crate) fn grants(&self) -> Grants {
        let list = |claim: &str| -> Vec<Box<str>> {
            match self.claims.get(claim) {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(Into::into)
                    .collect(),
                Some(Value::String(one)) => vec![one.as_str().into()],
                _ => Vec::new(),
            }
        };
        Grants {
            subscribe: list("channels"),
            publish: list("publish"),
        }
    }
}

/// What a connection keeps of its current token: whose it is (a `refresh`
/// must be for the same user) and what it grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenState {
    pub(crate) user: Option<String>,
    pub(crate) grants: Grants,
}

/// Channels a token grants, as exact names or `*` patterns
/// (`chat:room-*`): `channels` to subscribe (and read history and
/// presence), `publish` to publish. Granted on top of the namespace rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Grants {
    subscribe: Vec<Box<str>>,
    publish: Vec<Box<str>>,
}

impl TokenState {
    /// What a session moving to another node carries of its token.
    pub(crate) fn to_wire(&self) -> switchboard_proto::control::SessionToken {
        let list = |v: &[Box<str>]| v.iter().map(|s| s.to_string()).collect();
        switchboard_proto::control::SessionToken {
            user: self.user.clone(),
            subscribe: list(&self.grants.subscribe),
            publish: list(&self.grants.publish),
        }
    }

    /// The token of a session that moved here (see [`TokenState::to_wire`]).
    pub(crate) fn from_wire(t: switchboard_proto::control::SessionToken) -> Self {
        let list = |v: Vec<String>| v.into_iter().map(Into::into).collect();
        Self {
            user: t.user,
            grants: Grants {
                subscribe: list(t.subscribe),
                publish: list(t.publish),
            },
        }
    }
}

impl Grants {
    /// Whether the token lets the client subscribe to `channel`.
    pub(crate) fn may_subscribe(&self, channel: &str) -> bool {
        self.subscribe.iter().any(|p| glob(p, channel))
    }

    /// Whether the token lets the client publish on `channel`.
    pub(crate) fn may_publish(&self, channel: &str) -> bool {
        self.publish.iter().any(|p| glob(p, channel))
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters (none included) and everything else for itself.
fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[derive(Debug)]
struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, (AlgorithmFamily, DecodingKey)>>,
    fetched: Mutex<Option<Instant>>,
    /// Least time between two fetches for unknown key ids.
    min_refetch: Duration,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

/// Verifies client tokens; see the module docs.
#[derive(Debug)]
pub(crate) struct Authenticator {
    keys: Vec<(AlgorithmFamily, DecodingKey)>,
    jwks: Option<Jwks>,
    audience: Vec<String>,
    issuer: Vec<String>,
    leeway: Duration,
    cookie: Option<String>,
    anonymous: bool,
}

fn read_public_key(path: &Path) -> Result<(AlgorithmFamily, DecodingKey), AuthSetupError> {
    let pem = std::fs::read(path).map_err(|source| AuthSetupError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((AlgorithmFamily::Rsa, k));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        return Ok((AlgorithmFamily::Ec, k));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        return Ok((AlgorithmFamily::Ed, k));
    }
    Err(AuthSetupError::NotAKey(path.to_owned()))
}

/// The family of a JWK's key type.
fn jwk_family(jwk: &jsonwebtoken::jwk::Jwk) -> Option<AlgorithmFamily> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    match &jwk.algorithm {
        P::RSA(_) => Some(AlgorithmFamily::Rsa),
        P::EllipticCurve(_) => Some(AlgorithmFamily::Ec),
        P::OctetKeyPair(_) => Some(AlgorithmFamily::Ed),
        P::OctetKey(_) => Some(AlgorithmFamily::Hmac),
    }
}

impl Authenticator {
    /// The authenticator of `config`, or `None` when no key is configured
    /// (clients are then not authenticated by the gateway).
    pub(crate) fn new(config: &Config) -> Result<Option<Self>, AuthSetupError> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            keys.push((
                AlgorithmFamily::Hmac,
                DecodingKey::from_secret(secret.as_bytes()),
            ));
        }
        for path in &config.jwt_public_key {
            keys.push(read_public_key(path)?);
        }
        let jwks = config.jwks_url.as_ref().map(|url| Jwks {
            url: url.clone(),
            client: reqwest::Client::builder()
                .timeout(JWKS_TIMEOUT)
                .build()
                .expect("a plain HTTP client builds"),
            keys: RwLock::new(HashMap::new()),
            fetched: Mutex::new(None),
            min_refetch: config.jwks_refetch_interval,
            fetching: tokio::sync::Mutex::new(()),
        });
        if keys.is_empty() && jwks.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            keys,
            jwks,
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            leeway: config.jwt_leeway,
            cookie: config.jwt_cookie.clone(),
            anonymous: config.allow_anonymous,
        }))
    }

    /// Fetches the JWKS now (at start), so the first clients do not wait.
    pub(crate) async fn prefetch(&self) {
        if let Some(j) = &self.jwks {
            if let Err(e) = self.refetch(j, true).await {
                tracing::warn!(url = %j.url, error = %e, "cannot fetch the JWKS yet; will retry when a token needs it");
            }
        }
    }

    /// The client's token, if it sent one.
    fn token_of<'a>(
        &self,
        req: &'a Request,
        cookies: &'a BTreeMap<String, String>,
    ) -> Option<&'a str> {
        if let Some(t) = req
            .headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .and_then(|(_, v)| v.strip_prefix("Bearer "))
        {
            return Some(t.trim());
        }
        if let Some(t) = req
            .query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
        {
            return Some(t);
        }
        self.cookie
            .as_ref()
            .and_then(|name| cookies.get(name))
            .map(String::as_str)
    }

    /// Verifies the request's token: `Ok(None)` for an anonymous client
    /// that may connect without one.
    pub(crate) async fn authenticate(
        &self,
        req: &Request,
        cookies: &BTreeMap<String, String>,
    ) -> Result<Option<Identity>, AuthError> {
        let Some(token) = self.token_of(req, cookies).filter(|t| !t.is_empty()) else {
            if self.anonymous {
                return Ok(None);
            }
            let cookie = self
                .cookie
                .as_ref()
                .map(|c| format!(" or the `{c}` cookie"))
                .unwrap_or_default();
            return Err(AuthError::Missing(cookie));
        };
        self.verify(token).await.map(Some)
    }

    /// Verifies one token.
    pub(crate) async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let alg = header_algorithm(token)?;
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Malformed(e.to_string()))?
            .kid;
        let family = alg.family();
        let mut candidates: Vec<DecodingKey> = Vec::new();
        if let (Some(kid), Some(j)) = (&kid, &self.jwks) {
            match self.jwks_key(j, kid).await? {
                Some((f, k)) if f == family => candidates.push(k),
                Some(_) => {
                    return Err(AuthError::AlgorithmRefused(format!(
                        "key `{kid}` is not a key for {alg:?}"
                    )))
                }
                None if self.keys.is_empty() => return Err(AuthError::UnknownKey(kid.clone())),
                None => {}
            }
        } else if let Some(j) = &self.jwks {
            // No kid: every cached key of the family may have signed it.
            candidates.extend(
                j.keys
                    .read()
                    .values()
                    .filter(|(f, _)| *f == family)
                    .map(|(_, k)| k.clone()),
            );
        }
        candidates.extend(
            self.keys
                .iter()
                .filter(|(f, _)| *f == family)
                .map(|(_, k)| k.clone()),
        );
        if candidates.is_empty() {
            return Err(AuthError::AlgorithmRefused(format!(
                "no key for {alg:?} is configured"
            )));
        }
        let mut v = Validation::new(alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
        }
        if !self.issuer.is_empty() {
            v.set_issuer(&self.issuer);
        }
        let mut last = AuthError::BadSignature;
        for key in &candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &v) {
                Ok(data) => {
                    self.require_audience_and_issuer(&data.claims)?;
                    let user = data
                        .claims
                        .get("sub")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    return Ok(Identity {
                        user,
                        claims: data.claims,
                    });
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                        ErrorKind::InvalidAudience => AuthError::WrongAudience,
                        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                        ErrorKind::InvalidSignature => AuthError::BadSignature,
                        ErrorKind::InvalidAlgorithm => {
                            AuthError::AlgorithmRefused(format!("{alg:?} does not fit the key"))
                        }
                        ErrorKind::MissingRequiredClaim(c) => {
                            AuthError::Malformed(format!("the `{c}` claim is required"))
                        }
                        _ => AuthError::Malformed(e.to_string()),
                    };
                    // Only a signature mismatch may be another key's token.
                    if last != AuthError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    /// Refuses a verified token that lacks a configured `aud` or `iss`.
    ///
    /// jsonwebtoken only checks these claims when they are there (and
    /// skips values it cannot parse, such as `null` or a number), so a
    /// token without them would pass: when an audience (issuer) is
    /// configured, `aud` (`iss`) must be a string or a list of strings, or
    /// the token is refused like one with a wrong value. Checked in this
    /// order, so a token lacking both is refused for its audience.
    fn require_audience_and_issuer(&self, claims: &Map<String, Value>) -> Result<(), AuthError> {
        fn strings(v: Option<&Value>) -> bool {
            match v {
                Some(Value::String(_)) => true,
                Some(Value::Array(items)) => {
                    !items.is_empty() && items.iter().all(Value::is_string)
                }
                _ => false,
            }
        }
        if !self.audience.is_empty() && !strings(claims.get("aud")) {
            return Err(AuthError::WrongAudience);
        }
        if !self.issuer.is_empty() && !strings(claims.get("iss")) {
            return Err(AuthError::WrongIssuer);
        }
        Ok(())
    }

    /// The JWKS key `kid`, fetching the set again when it is unknown (at
    /// most every `jwks-refetch-interval`) or old.
    async fn jwks_key(
        &self,
        j: &Jwks,
        kid: &str,
    ) -> Result<Option<(AlgorithmFamily, DecodingKey)>, AuthError> {
        let fresh = j.fetched.lock().is_some_and(|t| t.elapsed() < JWKS_TTL);
        if fresh {
            if let Some(k) = j.keys.read().get(kid) {
                return Ok(Some(k.clone()));
            }
        }
        match self.refetch(j, !fresh).await {
            Ok(()) => {}
            // Keep using what was fetched before, if anything.
            Err(e) if j.fetched.lock().is_some() => {
                tracing::warn!(url = %j.url, error = %e, "JWKS refetch failed; using the keys fetched before");
            }
            Err(e) => {
                tracing::warn!(url = %j.url, error = %e, "cannot fetch the JWKS");
                return Err(AuthError::KeysUnavailable);
            }
        }
        Ok(j.keys.read().get(kid).cloned())
    }

    /// Fetches the JWKS unless it was fetched within the refetch interval
    /// (`force`: even so, for an expired set).
    async fn refetch(&self, j: &Jwks, force: bool) -> Result<(), String> {
        let _one = j.fetching.lock().await;
        let recent = j
            .fetched
            .lock()
            .is_some_and(|t| t.elapsed() < j.min_refetch);
        if recent && !force {
            return Ok(());
        }
        let set: JwkSet = j
            .client
            .get(&j.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Some(family)) = (&jwk.common.key_id, jwk_family(jwk)) else {
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(k) => {
                    keys.insert(kid.clone(), (family, k));
                }
                Err(e) => tracing::warn!(kid, error = %e, "JWKS key ignored"),
            }
        }
        tracing::debug!(url = %j.url, keys = keys.len(), "JWKS fetched");
        *j.keys.write() = keys;
        *j.fetched.lock() = Some(Instant::now());
        Ok(())
    }
}

/// The token header's algorithm; `none` (any case) and unknown ones are
/// refused before anything else is looked at.
fn header_algorithm(token: &str) -> Result<Algorithm, AuthError> {
    use base64::Engine as _;
    let head = token
        .split('.')
        .next()
        .filter(|_| token.matches('.').count() == 2)
        .ok_or_else(|| AuthError::Malformed("expected three dot-separated parts".into()))?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .map_err(|e| AuthError::Malformed(format!("header: {e}")))?;
    let header: Value =
        serde_json::from_slice(&json).map_err(|e| AuthError::Malformed(format!("header: {e}")))?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::Malformed("the header has no `alg`".into()))?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(AuthError::AlgorithmRefused(
            "unsigned tokens (`alg: none`) are never accepted".into(),
        ));
    }
    alg.parse::<Algorithm>()
        .map_err(|_| AuthError::AlgorithmRefused(format!("unknown algorithm `{alg}`")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn grants_match_exact_names_and_star_patterns() {
        assert!(glob("chat:room-1", "chat:room-1"));
        assert!(!glob("chat:room-1", "chat:room-10"));
        assert!(glob("chat:room-*", "chat:room-1"));
        assert!(glob("chat:room-*", "chat:room-"));
        assert!(!glob("chat:room-*", "chat:lobby"));
        assert!(glob("*:news", "eu:news"));
        assert!(!glob("*:news", "eu:newsy"));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c"));
        assert!(glob("*", "anything:at-all"));
        let id = Identity {
            user: None,
            claims: serde_json::json!({"channels": ["chat:room-*"], "publish": "chat:room-1"})
                .as_object()
                .unwrap()
                .clone(),
        };
        let g = id.grants();
        assert!(g.may_subscribe("chat:room-9") && !g.may_subscribe("chat:lobby"));
        assert!(g.may_publish("chat:room-1") && !g.may_publish("chat:room-2"));
    }

    #[test]
    fn none_and_unknown_algorithms_are_refused_before_any_key() {
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
            b64(&serde_json::json!({"sub": "u"}))
        );
        assert!(matches!(
            header_algorithm(&none),
            Err(AuthError::AlgorithmRefused(_))
        ));
        let odd = format!("{}.e30.sig", b64(&serde_json::json!({"alg": "NoNe"})));
        assert!(matches!(
            header_algorithm(&odd),
            Err(AuthError::AlgorithmRefused(_))
        ));
        let unknown = format!("{}.e30.sig", b64(&serde_json::json!({"alg": "HS1"})));
        assert!(matches!(
            header_algorithm(&unknown),
            Err(AuthError::AlgorithmRefused(_))
        ));
        assert!(matches!(
            header_algorithm("a.b"),
            Err(AuthError::Malformed(_))
        ));
        let hs = format!("{}.e30.sig", b64(&serde_json::json!({"alg": "HS256"})));
        assert_eq!(header_algorithm(&hs), Ok(Algorithm::HS256));
    }
}
