//! A scriptable GraphQL-over-HTTP origin for the GraphQL tests: it records
//! every request and answers by a convention on the query text, with one
//! counter per trigger key:
//!
//! - a query containing `error` → 400 `{"errors": [...]}`;
//! - `mutation` → the counter of `variables.key` goes up by one, answered
//!   `{"data": {"value": n}}`;
//! - `subscription` → `{"data": {"value": n}}` (or `"data": null` for the
//!   first execution when `variables.initial` is `false`) with the subscription extension:
//!   triggers `[variables.key]`, digest `variables.digest` when given;
//! - anything else → `{"data": {"value": n, "context": <extensions.switchboard>}}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// One request the GraphQL origin answered.
#[derive(Debug, Clone)]
pub struct GraphqlRequest {
    /// The body.
    pub body: Value,
    /// The headers, names lower-case.
    pub headers: HashMap<String, String>,
}

impl GraphqlRequest {
    /// `extensions.switchboard.trigger`: set on re-executions.
    pub fn trigger(&self) -> Option<&str> {
        self.body["extensions"]["switchboard"]["trigger"].as_str()
    }
}

#[derive(Debug, Default)]
struct GqlState {
    requests: Mutex<Vec<GraphqlRequest>>,
    counters: Mutex<HashMap<String, i64>>,
    delay: Mutex<Duration>,
    down: Mutex<bool>,
}

/// The GraphQL origin.
#[derive(Debug)]
pub struct GraphqlOrigin {
    state: Arc<GqlState>,
    /// Its address.
    pub addr: SocketAddr,
}

impl GraphqlOrigin {
    /// Starts one on a free loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(GqlState::default());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind GraphQL origin");
        let addr = listener.local_addr().expect("bound");
        let app = Router::new()
            .route("/graphql", post(handle))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { state, addr }
    }

    /// The endpoint URL to give the gateway.
    pub fn url(&self) -> String {
        format!("http://{}/graphql", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<GraphqlRequest> {
        self.state.requests.lock().clone()
    }

    /// Re-executions so far (requests carrying a trigger).
    pub fn re_executions(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.trigger().is_some())
            .count()
    }

    /// Waits up to `within` for `n` re-executions; returns how many came.
    pub async fn wait_re_executions(&self, n: usize, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.re_executions();
            if got >= n || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets a counter (what subscriptions on `key` read next).
    pub fn set(&self, key: &str, value: i64) {
        self.state.counters.lock().insert(key.to_owned(), value);
    }

    /// Delays every answer (the state is read when the request arrives).
    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock() = d;
    }

    /// Answers 502 without a GraphQL body while `down`.
    pub fn set_down(&self, down: bool) {
        *self.state.down.lock() = down;
    }
}

async fn handle(State(state): State<Arc<GqlState>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let headers = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    state.requests.lock().push(GraphqlRequest {
        body: body.clone(),
        headers,
    });
    let query = body["query"].as_str().unwrap_or("");
    let vars = &body["variables"];
    let key = vars["key"].as_str().unwrap_or("t").to_owned();
    if query.contains("error") {
        let errors = json!({"errors": [{"message": "Cannot query field \"error\""}]});
        return (StatusCode::BAD_REQUEST, axum::Json(errors)).into_response();
    }
    let value = {
        let mut counters = state.counters.lock();
        let n = counters.entry(key.clone()).or_insert(0);
        if query.contains("mutation") {
            *n += 1;
        }
        *n
    };
    let answer = if query.contains("subscription") {
        let mut sub = json!({"triggers": [key]});
        if let Some(d) = vars["digest"].as_str() {
            sub["digest"] = json!(d);
        }
        let first = body["extensions"]["switchboard"]["trigger"].is_null();
        let data = if first && vars["initial"] == json!(false) {
            Value::Null
        } else {
            json!({"value": value})
        };
        json!({"data": data, "extensions": {"switchboard": {"subscription": sub}}})
    } else if query.contains("mutation") {
        json!({"data": {"value": value}})
    } else {
        json!({"data": {"value": value, "context": body["extensions"]["switchboard"]}})
    };
    // The state was read at arrival; the answer comes after the delay.
    let delay = *state.delay.lock();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if *state.down.lock() {
        return (StatusCode::BAD_GATEWAY, "origin down").into_response();
    }
    axum::Json(answer).into_response()
}
