//! A terminal chat on the Rust client SDK (`switchboard-client`): it joins a
//! channel, shows the last messages and every new one, and publishes the
//! lines you type. Kill the gateway or the network and watch it come back
//! without losing or repeating a message.
//!
//! ```text
//! # a gateway with a chat namespace (dev mode: no origin, everyone accepted)
//! cargo run -p switchboard -- serve --namespace 'chat:history-size=100,presence,join-leave,publish,subscribe'
//! # two chatters, in two terminals
//! cargo run -p switchboard-examples --bin sdk-chat -- --name alice
//! cargo run -p switchboard-examples --bin sdk-chat -- --name bob --channel chat:lobby
//! ```
//!
//! Type a line to send it; `/who` lists who is in the channel, `/quit` (or
//! end of input) leaves.

use std::time::Duration;
use switchboard_client::{ChannelMessage, Client, ClientEvent, Payload, SubscriptionEvent};

/// A terminal chat client for a Switchboard gateway.
#[derive(Debug, clap::Parser)]
struct Args {
    /// The gateway's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/")]
    url: String,
    /// The channel to chat in (its namespace must allow `subscribe` and
    /// `publish`).
    #[arg(long, default_value = "chat:lobby")]
    channel: String,
    /// Your name, shown before your messages.
    #[arg(long, default_value = "anonymous")]
    name: String,
    /// A token for the origin (sent as `?token=` and `Authorization: Bearer`).
    #[arg(long)]
    token: Option<String>,
    /// How many earlier messages to show on start (needs history).
    #[arg(long, default_value_t = 20)]
    history: usize,
}

fn show(m: &ChannelMessage) {
    match &m.data {
        Payload::Text(t) => println!("[{}] {t}", m.offset),
        Payload::Binary(b) => println!("[{}] <{} bytes>", m.offset, b.len()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Args = clap::Parser::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();

    let mut builder = Client::builder(&args.url).backoff_max(Duration::from_secs(10));
    if let Some(token) = &args.token {
        builder = builder.token(token);
    }
    let client = builder.connect()?;

    // Connection-level news: connects, drops, resumes, direct messages,
    // giving up.
    let mut events = client.events();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                ClientEvent::Connected { client_id, node } => {
                    eprintln!("* connected as {client_id} (node {node})")
                }
                ClientEvent::Resumed { client_id, .. } => {
                    eprintln!("* back as {client_id}: nothing lost")
                }
                ClientEvent::Restarted {
                    client_id, error, ..
                } => match error {
                    Some(e) => eprintln!(
                        "* reconnected as {client_id}, a new session ({}: {}); direct messages may have been lost",
                        e.code.as_str(),
                        e.message
                    ),
                    None => eprintln!("* reconnected as {client_id}"),
                },
                ClientEvent::Disconnected { reason, retry_in } => {
                    eprintln!("* disconnected ({reason}); reconnecting in {retry_in:.1?}")
                }
                ClientEvent::ConnectFailed { error, retry_in } => {
                    eprintln!("* cannot connect ({error}); retrying in {retry_in:.1?}")
                }
                ClientEvent::Direct(m) => match m.text() {
                    Some(t) => eprintln!("* direct: {t}"),
                    None => eprintln!("* direct: <{} bytes>", m.bytes().len()),
                },
                ClientEvent::Failed(error) => {
                    eprintln!("* giving up: {error}");
                    std::process::exit(1);
                }
                _ => {}
            }
        }
    });

    let mut sub = client.subscribe(&args.channel).await?;
    eprintln!("* joined {} — type to chat, /who, /quit", args.channel);

    // The subscription's events, printed as they come. The first one says
    // where the live stream starts: show the history up to there.
    let history_client = client.clone();
    let (channel, history) = (args.channel.clone(), args.history);
    tokio::spawn(async move {
        while let Some(event) = sub.recv().await {
            match event {
                SubscriptionEvent::Subscribed {
                    offset,
                    recovered: None,
                    ..
                } if history > 0 => {
                    match history_client.history(&channel, None, Some(history)).await {
                        Ok(h) => h
                            .publications
                            .iter()
                            .filter(|p| p.offset <= offset)
                            .for_each(|p| {
                                show(&ChannelMessage {
                                    channel: channel.clone(),
                                    offset: p.offset,
                                    epoch: h.epoch.clone(),
                                    data: p.data.clone(),
                                })
                            }),
                        Err(e) => eprintln!("* no history: {e}"),
                    }
                }
                SubscriptionEvent::Subscribed {
                    recovered: Some(true),
                    missed,
                    ..
                } => eprintln!(
                    "* back; {} missed message(s) recovered",
                    missed.unwrap_or(0)
                ),
                SubscriptionEvent::Message(m) => show(&m),
                SubscriptionEvent::Gap { last, resumed } if last.epoch != resumed.epoch => {
                    eprintln!("* the channel was reset (new epoch): earlier messages are gone")
                }
                SubscriptionEvent::Gap { last, resumed } => eprintln!(
                    "* messages #{}..=#{} were lost while away",
                    last.offset + 1,
                    resumed.offset
                ),
                SubscriptionEvent::Join(m) => eprintln!("* {} joined", m.client),
                SubscriptionEvent::Leave(m) => eprintln!("* {} left", m.client),
                SubscriptionEvent::Unsubscribed => eprintln!("* removed from the channel"),
                SubscriptionEvent::Failed(e) => eprintln!("* subscription ended: {e}"),
                _ => {}
            }
        }
    });

    // Stdin is read on a thread of its own (blocking reads).
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let line = line.trim();
        match line {
            "" => {}
            "/quit" => break,
            "/who" => match client.presence(&args.channel).await {
                Ok(p) => {
                    let ids: Vec<&str> = p.members.iter().map(|m| m.client.as_str()).collect();
                    eprintln!("* {} here: {}", p.clients, ids.join(", "));
                }
                Err(e) => eprintln!("* /who failed: {e}"),
            },
            text => {
                let message = format!("{}: {text}", args.name);
                if let Err(e) = client.publish(&args.channel, message).await {
                    eprintln!("* not sent: {e}");
                }
            }
        }
    }
    client.close().await;
    Ok(())
}
