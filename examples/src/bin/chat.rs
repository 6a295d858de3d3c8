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
//! WebSocket itself. The gateway here is the same library `switchboard serve`
//! runs, embedded so that one command starts everything.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use std::collections::BTreeMap;
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

struct Chat {
    /// connection id -> display name
    members: Mutex<BTreeMap<String, String>>,
    http: reqwest::Client,
    /// The gateway's control API, `http://host:port`.
    control: String,
}

impl Chat {
    /// Sends `text` to every member through the gateway's batch API: one call,
    /// encoded once by the gateway for all recipients.
    async fn broadcast(&self, text: String) {
        let ids: Vec<String> = self.members.lock().keys().cloned().collect();
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
                let name = c
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("name="))
                    .filter(|n| {
                        !n.is_empty()
                            && n.len() <= 24
                            && n.bytes().all(|b| b.is_ascii_alphanumeric())
                    })
                    .map(str::to_owned)
                    .unwrap_or_else(|| {
                        format!("guest-{}", &c.connection_id[c.connection_id.len() - 4..])
                    });
                chat.members
                    .lock()
                    .insert(c.connection_id.clone(), name.clone());
                answer.user_id = Some(name.clone());
                answer.messages.push(Payload::Text(json_line(
                    "system",
                    "switchboard",
                    &format!("welcome, {name}"),
                )));
                chat.broadcast(json_line(
                    "system",
                    "switchboard",
                    &format!("{name} joined"),
                ))
                .await;
            }
            Event::Message(m) => {
                let name = m.user_id.unwrap_or_default();
                if let Payload::Text(t) = m.payload {
                    let t: String = t.chars().take(500).collect();
                    chat.broadcast(json_line("chat", &name, &t)).await;
                }
            }
            Event::Disconnect(d) => {
                let name = chat.members.lock().remove(&d.connection_id);
                if let Some(name) = name {
                    chat.broadcast(json_line("system", "switchboard", &format!("{name} left")))
                        .await;
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
                for name in gone {
                    chat.broadcast(json_line("system", "switchboard", &format!("{name} left")))
                        .await;
                }
            }
            _ => {}
        }
    }
    Json(answer).into_response()
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
        http: reqwest::Client::new(),
        control: format!("http://{}", args.control_listen),
    });
    let page =
        include_str!("../../static/chat.html").replace("{{GATEWAY}}", &args.listen.to_string());
    let app = Router::new()
        .route("/", get(move || async move { Html(page) }))
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
