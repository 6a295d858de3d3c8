//! An origin that accepts every connection and echoes each message back to its
//! sender in the webhook answer (no control API round trip). Used by the
//! Autobahn conformance run and the echo benchmark. With `--greet`, it first
//! tells each client its connection id (`{"connection_id": "..."}`), which the
//! cluster example uses to address clients through any node.
//!
//! ```text
//! cargo run --release -p switchboard-examples --bin echo-origin -- --listen 127.0.0.1:3000
//! switchboard serve --origin http://127.0.0.1:3000/events
//! ```

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use clap::Parser;
use switchboard_proto::origin::{Event, EventBatch, OriginAnswer, Payload, Reply};

/// Echo origin for Switchboard.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: std::net::SocketAddr,
    /// Send each client its connection id as its first message.
    #[arg(long)]
    greet: bool,
}

async fn events(greet: bool, body: Bytes) -> axum::response::Response {
    let batch: EventBatch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    if let [Event::Connect(c)] = &batch.events[..] {
        let messages = if greet {
            let hello = serde_json::json!({ "connection_id": c.connection_id });
            vec![Payload::Text(hello.to_string())]
        } else {
            Vec::new()
        };
        return axum::Json(OriginAnswer {
            messages,
            ..Default::default()
        })
        .into_response();
    }
    let replies = batch
        .events
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(Reply {
                connection_id: m.connection_id,
                payload: m.payload,
            }),
            Event::NodeDown(n) => {
                eprintln!(
                    "node_down: node {} is gone (reported by {})",
                    n.down_node, n.node
                );
                None
            }
            _ => None,
        })
        .collect();
    axum::Json(OriginAnswer {
        replies,
        ..Default::default()
    })
    .into_response()
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/events", post(move |body| events(args.greet, body)))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "echo origin listening on http://{}/events",
        listener.local_addr()?
    );
    axum::serve(listener, app).await
}
