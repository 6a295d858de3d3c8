//! A complete demo in one process: a small chat application (the origin) and a
//! Switchboard gateway in front of it.
//!
//! ```text
//! cargo run --release -p switchboard-examples --bin chat
//! # then open http://127.0.0.1:3000 in two browser tabs
//! ```
//!
//! The origin is an ordinary stateless-looking HTTP app: it gets `connect`,
//! `message` and `disconnect` webhooks at `/events`, and pushes to browsers
//! through the gateway's control API (`POST /v1/messages`). It never holds a
//! WebSocket itself. It keeps the member list (from `connect` and
//! `disconnect`) and the last chat lines, which a newcomer gets in its
//! `connect` answer. The page talks through the TypeScript SDK
//! (`clients/typescript`, served at `/sdk/`): it resumes its session after
//! a dropped connection, and falls back to SSE or long-polling where
//! WebSocket is blocked. The gateway here is the same library `switchboard serve`
//! runs, embedded so that one command starts everything.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use switchboard_proto::control::{BatchMessage, BatchSendRequest};
use switchboard_proto::origin::{Event, EventBatch, OriginAnswer, Payload};

/// The chat demo: an origin app and a gateway in one process.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Where the chat app (the origin) serves its page and webhook.
    #[arg(long, default_value = "127.0.0.1:3000")]
    origin_listen: std::net::SocketAddr,
    /// The gateway's WebSocket listener (the page connects here).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// The gateway's control API listener (the app pushes through it).
    #[arg(long, default_value = "127.0.0.1:8081")]
    control_listen: std::net::SocketAddr,
}

/// Chat lines kept for late joiners.
const HISTORY: usize = 50;

/// Longest display name, in characters.
const MAX_NAME: usize = 24;

struct Chat {
    /// connection id -> display name
    members: Mutex<BTreeMap<String, String>>,
    /// The last [`HISTORY`] chat lines (JSON), oldest first.
    history: Mutex<VecDeque<String>>,
    /// Numbers the guests who gave no usable name.
    guests: std::sync::atomic::AtomicU32,
    http: reqwest::Client,
    /// The gateway's control API, `http://host:port`.
    control: String,
}

impl Chat {
    /// The member list as the page shows it: `{"kind":"members","names":[...]}`.
    fn members_line(&self) -> String {
        let mut names: Vec<String> = self.members.lock().values().cloned().collect();
        names.sort_by_key(|n| n.to_lowercase());
        serde_json::json!({ "kind": "members", "names": names }).to_string()
    }

    /// `wanted` if it is a usable name not taken yet; `wanted-2`, `wanted-3`…
    /// if taken; `guest-N` if unusable. Inserts the member.
    fn admit(&self, connection_id: &str, wanted: Option<String>) -> String {
        let mut members = self.members.lock();
        let base = wanted.unwrap_or_else(|| {
            let n = self
                .guests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            format!("guest-{n}")
        });
        let taken = |n: &str| members.values().any(|m| m.eq_ignore_ascii_case(n));
        let mut name = base.clone();
        let mut i = 2;
        while taken(&name) {
            name = format!("{base}-{i}");
            i += 1;
        }
        members.insert(connection_id.to_owned(), name.clone());
        name
    }

    /// Sends `text` to every member through the gateway's batch API: one call,
    /// encoded once by the gateway for all recipients.
    async fn broadcast(&self, text: String) {
        self.broadcast_except("", text).await;
    }

    /// [`Chat::broadcast`] to every member but `skip`.
    async fn broadcast_except(&self, skip: &str, text: String) {
        let ids: Vec<String> = self
            .members
            .lock()
            .keys()
            .filter(|id| id.as_str() != skip)
            .cloned()
            .collect();
        if ids.is_empty() {
            return;
        }
        let body = BatchSendRequest {
            messages: vec![BatchMessage {
                connection_ids: ids,
                payload: Payload::Text(text),
            }],
        };
        if let Err(e) = self
            .http
            .post(format!("{}/v1/messages", self.control))
            .json(&body)
            .send()
            .await
        {
            tracing::warn!(error = %e, "broadcast failed");
        }
    }
}

fn json_line(kind: &str, name: &str, text: &str) -> String {
    serde_json::json!({ "kind": kind, "name": name, "text": text }).to_string()
}

async fn events(State(chat): State<Arc<Chat>>, body: Bytes) -> impl IntoResponse {
    let Ok(batch) = serde_json::from_slice::<EventBatch>(&body) else {
        return (axum::http::StatusCode::BAD_REQUEST, "bad body").into_response();
    };
    let mut answer = OriginAnswer::default();
    for event in batch.events {
        match event {
            Event::Connect(c) => {
                // The page sends `?name=…` (letters, digits, `-`, `_`; its
                // form enforces the same).
                let wanted = c
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("name="))
                    .filter(|n| {
                        !n.is_empty()
                            && n.len() <= MAX_NAME
                            && n.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    })
                    .map(str::to_owned);
                let name = chat.admit(&c.connection_id, wanted);
                // The others hear of it now; the newcomer, whose socket opens
                // with this answer, gets what follows in `messages`.
                chat.broadcast_except(
                    &c.connection_id,
                    json_line("system", "switchboard", &format!("{name} joined")),
                )
                .await;
                answer.user_id = Some(name.clone());
                // What was said before, then the welcome and who is here.
                for line in chat.history.lock().iter() {
                    answer.messages.push(Payload::Text(line.clone()));
                }
                answer.messages.push(Payload::Text(json_line(
                    "welcome",
                    &name,
                    &format!("welcome, {name}"),
                )));
                let members = chat.members_line();
                answer.messages.push(Payload::Text(members.clone()));
                chat.broadcast_except(&c.connection_id, members).await;
            }
            Event::Message(m) => {
                let name = m.user_id.unwrap_or_default();
                if let Payload::Text(t) = m.payload {
                    let t: String = t.chars().take(500).collect();
                    if t.trim().is_empty() {
                        continue;
                    }
                    let line = json_line("chat", &name, &t);
                    {
                        let mut history = chat.history.lock();
                        if history.len() == HISTORY {
                            history.pop_front();
                        }
                        history.push_back(line.clone());
                    }
                    chat.broadcast(line).await;
                }
            }
            Event::Disconnect(d) => {
                let name = chat.members.lock().remove(&d.connection_id);
                if let Some(name) = name {
                    chat.broadcast(json_line("system", "switchboard", &format!("{name} left")))
                        .await;
                    chat.broadcast(chat.members_line()).await;
                }
            }
            Event::NodeDown(n) => {
                // A cluster node died: all of its connections are gone.
                let prefix = format!("{}.", n.down_node);
                let gone: Vec<String> = {
                    let mut members = chat.members.lock();
                    let ids: Vec<String> = members
                        .keys()
                        .filter(|id| id.starts_with(&prefix))
                        .cloned()
                        .collect();
                    ids.iter().filter_map(|id| members.remove(id)).collect()
                };
                for name in &gone {
                    chat.broadcast(json_line("system", "switchboard", &format!("{name} left")))
                        .await;
                }
                if !gone.is_empty() {
                    chat.broadcast(chat.members_line()).await;
                }
            }
            _ => {}
        }
    }
    Json(answer).into_response()
}

// The TypeScript SDK's modules, built by build.rs.
include!(concat!(env!("OUT_DIR"), "/sdk.rs"));

/// `GET /sdk/{file}`: a module of the TypeScript SDK, for the page.
async fn sdk_module(
    axum::extract::Path(file): axum::extract::Path<String>,
) -> axum::response::Response {
    match SDK.iter().find(|(name, _)| *name == file) {
        Some((_, js)) => {
            ([(axum::http::header::CONTENT_TYPE, "text/javascript")], *js).into_response()
        }
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let chat = Arc::new(Chat {
        members: Mutex::default(),
        history: Mutex::default(),
        guests: Default::default(),
        http: reqwest::Client::new(),
        control: format!("http://{}", args.control_listen),
    });
    let page =
        include_str!("../../static/chat.html").replace("{{GATEWAY}}", &args.listen.to_string());
    let app = Router::new()
        .route("/", get(move || async move { Html(page) }))
        .route("/sdk/{file}", get(sdk_module))
        .route("/events", post(events))
        .with_state(chat);
    let listener = tokio::net::TcpListener::bind(args.origin_listen).await?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let config = switchboard_server::Config {
        listen: args.listen,
        control_listen: args.control_listen,
        origin: Some(format!("http://{}/events", args.origin_listen)),
        keepalive_interval: std::time::Duration::ZERO,
        ..Default::default()
    };
    let gateway = switchboard_server::Gateway::bind(config).await?;
    println!(
        "\n  Switchboard chat demo\n  open http://{} in two browser tabs (Ctrl-C to stop)\n",
        args.origin_listen
    );
    gateway
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
