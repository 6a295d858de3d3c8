//! [`NatsChannels`]: the [`ChannelBus`] over NATS and JetStream.
//!
//! - **Log.** Each namespace has a JetStream stream (`<prefix>_ch_<ns>`,
//!   subjects `<prefix>.log.<ns>.>`) keeping at most `history-size` messages
//!   per channel (at least the newest one, which carries the channel's
//!   position) for `history-ttl`. A message carries its offset, epoch, time
//!   and the stream sequence of the channel's previous message in headers,
//!   so the log of one channel can be walked back from its newest message.
//! - **Offsets.** A publish is appended with JetStream's
//!   `Nats-Expected-Last-Subject-Sequence` set to the sequence of the
//!   message it follows, so two nodes can never give out the same offset:
//!   the loser re-reads the channel's newest message and tries again. The
//!   position each node last appended is cached, so a node publishing alone
//!   reads nothing first. An empty log starts a new epoch at offset 1.
//! - **Idempotency.** A key becomes the `Nats-Msg-Id`, so the stream's
//!   duplicate window (5 minutes, or `history-ttl` if shorter) drops a
//!   retried publish and answers where the first one landed.
//! - **Delivery.** Once appended, the message is published once on the
//!   channel's live subject `<prefix>.chan.<ns>.<name>`, which only nodes
//!   with subscribers of the channel subscribe to: one copy per interested
//!   node. A node that misses one (it was cut off, or the publishing node
//!   died between the two steps) notices the gap at the next message and
//!   reads the missing ones from the log.
//! - **Presence.** A request on `<prefix>.channels.presence` (the channel
//!   name as payload) is answered by every node with its own subscribers;
//!   the asker waits for every live peer (or the request timeout), so a dead
//!   node's members vanish with it. Joins and leaves travel on the live
//!   subject.

use crate::cluster::NatsCluster;
use crate::NatsConfig;
use async_nats::header::{HeaderMap, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{CreateStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{
    self, DiscardPolicy, LastRawMessageErrorKind, StorageType, Stream,
};
use async_nats::jetstream::{self as js, context::Context};
use async_nats::{Client, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_backend::{
    BoxFuture, BusError, BusEvent, ChannelBus, Cluster, LogEntry, LogRead, Namespace, Node,
    Published, Watch,
};
use switchboard_proto::cluster::{channel_headers as h, Subjects};
use switchboard_proto::native::{Member, StreamPosition};
use switchboard_proto::origin::Payload;
use tokio_util::sync::CancellationToken;

/// Longest idempotency window (JetStream's duplicate window).
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

/// Most appends tried when other nodes keep winning the race for the next
/// offset of a channel.
const MAX_APPEND_TRIES: usize = 16;

/// Joins and leaves waiting to be published; more are dropped (best effort).
const ANNOUNCE_QUEUE: usize = 10_000;

/// How long an idle channel's cached position is kept.
const TAIL_MEMORY: Duration = Duration::from_secs(60);

/// The newest message of a channel's log: where the next append goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tail {
    seq: u64,
    epoch: String,
    offset: u64,
}

/// What this node knows of a channel it publishes on.
#[derive(Debug, Default)]
struct Appender {
    /// Last known newest message (`None`: read it first).
    tail: Option<Tail>,
    used: Option<Instant>,
}

/// The channel bus over NATS; see the module docs. Built by
/// [`NatsChannels::start`].
#[derive(Debug)]
pub struct NatsChannels {
    client: Client,
    js: Context,
    subjects: Subjects,
    node: Arc<dyn Node>,
    config: NatsConfig,
    cluster: Arc<NatsCluster>,
    /// Streams by namespace, once made.
    streams: Mutex<HashMap<String, Stream<()>>>,
    /// One append at a time per channel on this node.
    appenders: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Appender>>>>,
    announce: tokio::sync::mpsc::Sender<(String, HeaderMap, Bytes)>,
    timeout: Duration,
    stop: CancellationToken,
}

fn bus_down(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn new_epoch() -> String {
    let b: [u8; 6] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    header(headers, name)?.parse().ok()
}

/// A message's payload and kind header.
fn encode(data: &Payload) -> (Bytes, Option<&'static str>) {
    match data {
        Payload::Text(t) => (Bytes::copy_from_slice(t.as_bytes()), None),
        Payload::Binary(b) => (Bytes::copy_from_slice(b), Some("binary")),
    }
}

fn decode(headers: &HeaderMap, payload: &Bytes) -> Option<Payload> {
    if header(headers, h::KIND) == Some("binary") {
        Some(Payload::Binary(payload.to_vec()))
    } else {
        String::from_utf8(payload.to_vec()).ok().map(Payload::Text)
    }
}

/// A message of the log: its entry, epoch and the previous message's
/// sequence.
fn log_entry(headers: &HeaderMap, payload: &Bytes) -> Option<(LogEntry, String, u64)> {
    let entry = LogEntry {
        offset: number(headers, h::OFFSET)?,
        time_ms: number(headers, h::TIME).unwrap_or(0),
        data: decode(headers, payload)?,
    };
    let epoch = header(headers, h::EPOCH)?.to_owned();
    Some((entry, epoch, number(headers, h::PREV).unwrap_or(0)))
}

impl NatsChannels {
    /// Starts the channel bus of `node`: answers presence requests, publishes
    /// joins and leaves, and makes the namespaces' streams (again on first
    /// use if JetStream is not there yet).
    pub async fn start(
        client: Client,
        node: Arc<dyn Node>,
        config: NatsConfig,
        cluster: Arc<NatsCluster>,
    ) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let subjects = Subjects::new(&config.prefix);
        let timeout = config.request_timeout;
        let requests = client.subscribe(subjects.channel_presence()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(ANNOUNCE_QUEUE);
        let mut context = js::new(client.clone());
        context.set_timeout(timeout);
        let bus = Arc::new(Self {
            js: context,
            client,
            subjects,
            node,
            config,
            cluster,
            streams: Mutex::new(HashMap::new()),
            appenders: Mutex::new(HashMap::new()),
            announce: tx,
            timeout,
            stop: CancellationToken::new(),
        });
        tokio::spawn(bus.clone().answer_presence(requests));
        tokio::spawn(bus.clone().announcer(rx));
        tokio::spawn(bus.clone().forget_idle_tails());
        let early = bus.clone();
        tokio::spawn(async move {
            for ns in early.config.namespaces.clone() {
                if let Err(e) = early.stream(&ns).await {
                    tracing::warn!(namespace = %ns.name, error = %e, "channel log stream not ready yet; will retry on first use");
                }
            }
        });
        Ok(bus)
    }

    /// Stops the background tasks.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The stream of a namespace, made (or brought to the namespace's
    /// limits) on first use.
    async fn stream(&self, ns: &Namespace) -> Result<Stream<()>, BusError> {
        if let Some(s) = self.streams.lock().get(&ns.name) {
            return Ok(s.clone());
        }
        let ttl = ns.history_ttl;
        let config = stream::Config {
            name: self.subjects.channel_stream(&ns.name),
            subjects: vec![self.subjects.channel_log_all(&ns.name)],
            max_messages_per_subject: ns.history_size.max(1) as i64,
            max_age: ttl,
            duplicate_window: IDEMPOTENCY_WINDOW.min(ttl),
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            num_replicas: self.config.channel_log_replicas,
            ..Default::default()
        };
        // Create first: creating a stream that exists with the same limits
        // succeeds, so nodes starting together all get here without an
        // update. Only limits changed since the stream was made (another
        // history-size, say) need an update. (`create_or_update_stream`
        // updates first, and nodes starting together then update a stream
        // another node is still creating: nats-server 2.9 crashes on that,
        // a nil dereference in `updateWithAdvisory`.)
        match self.js.create_stream(config.clone()).await {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    CreateStreamErrorKind::JetStream(j)
                        if j.error_code() == js::ErrorCode::STREAM_NAME_EXIST
                ) =>
            {
                self.js
                    .update_stream(config.clone())
                    .await
                    .map_err(bus_down)?;
            }
            Err(e) => return Err(bus_down(e)),
        }
        let s = self
            .js
            .get_stream_no_info(&config.name)
            .await
            .map_err(bus_down)?;
        self.streams.lock().insert(ns.name.clone(), s.clone());
        Ok(s)
    }

    /// The newest message of a channel's log, if any.
    async fn last(&self, stream: &Stream<()>, subject: &str) -> Result<Option<Tail>, BusError> {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => {
                let (entry, epoch, _) = log_entry(&m.headers, &m.payload)
                    .ok_or_else(|| bus_down(format!("unreadable log message {}", m.sequence)))?;
                Ok(Some(Tail {
                    seq: m.sequence,
                    epoch,
                    offset: entry.offset,
                }))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(bus_down(e)),
        }
    }

    /// The log message at `seq` (`None`: gone).
    async fn at(
        &self,
        stream: &Stream<()>,
        seq: u64,
    ) -> Result<Option<(LogEntry, String, u64)>, BusError> {
        match stream.get_raw_message(seq).await {
            Ok(m) => Ok(log_entry(&m.headers, &m.payload)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(bus_down(e)),
        }
    }

    fn appender(&self, channel: &str) -> Arc<tokio::sync::Mutex<Appender>> {
        self.appenders
            .lock()
            .entry(channel.to_owned())
            .or_default()
            .clone()
    }

    async fn append(
        &self,
        ns: &Namespace,
        channel: &str,
        data: &Payload,
        key: Option<&str>,
    ) -> Result<Published, BusError> {
        // The client would hold an append while disconnected and send it
        // after the caller was told it failed: refuse at once instead.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(bus_down("not connected to NATS"));
        }
        let stream = self.stream(ns).await?;
        let subject = self.subjects.channel_log(channel);
        let (payload, kind) = encode(data);
        let slot = self.appender(channel);
        let mut app = slot.lock().await;
        app.used = Some(Instant::now());
        for _ in 0..MAX_APPEND_TRIES {
            let tail = match app.tail.take() {
                Some(t) => Some(t),
                None => self.last(&stream, &subject).await?,
            };
            let (epoch, prev, offset) = match tail {
                Some(t) => (t.epoch, t.seq, t.offset + 1),
                None => (new_epoch(), 0, 1),
            };
            // The live message's headers; the log's have more.
            let mut live = HeaderMap::new();
            live.insert(h::OFFSET, offset.to_string().as_str());
            live.insert(h::EPOCH, epoch.as_str());
            live.insert(h::TIME, now_ms().to_string().as_str());
            if let Some(kind) = kind {
                live.insert(h::KIND, kind);
            }
            let mut headers = live.clone();
            headers.insert(h::PREV, prev.to_string().as_str());
            headers.insert(
                NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                prev.to_string().as_str(),
            );
            if let Some(key) = key {
                headers.insert(NATS_MESSAGE_ID, message_id(channel, key).as_str());
            }
            let sent = self
                .js
                .send_publish(
                    subject.clone(),
                    PublishMessage::build()
                        .payload(payload.clone())
                        .headers(headers),
                )
                .await;
            let ack = match sent {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            match ack {
                Ok(ack) if ack.duplicate => {
                    // Where the first publish with this key landed; if the
                    // log has dropped it since, that position is unknown.
                    let (epoch, offset) = match self.at(&stream, ack.sequence).await? {
                        Some((entry, epoch, _)) => (epoch, entry.offset),
                        None => (String::new(), 0),
                    };
                    return Ok(Published {
                        epoch,
                        offset,
                        duplicate: true,
                    });
                }
                Ok(ack) => {
                    app.tail = Some(Tail {
                        seq: ack.sequence,
                        epoch: epoch.clone(),
                        offset,
                    });
                    // Best effort: a node that misses it reads it from the
                    // log at the next message.
                    if let Err(e) = self
                        .client
                        .publish_with_headers(self.subjects.channel_live(channel), live, payload)
                        .await
                    {
                        tracing::warn!(channel, error = %e, "channel message logged but not broadcast");
                    }
                    return Ok(Published {
                        epoch,
                        offset,
                        duplicate: false,
                    });
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    // Deleted behind our back: made again on the next publish.
                    self.streams.lock().remove(&ns.name);
                    return Err(bus_down(e));
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(BusError::TooLarge(e.to_string()))
                }
                Err(e) => return Err(bus_down(e)),
            }
        }
        Err(bus_down(format!(
            "gave up after {MAX_APPEND_TRIES} tries: other nodes kept publishing on {channel} first"
        )))
    }

    async fn read_log(
        &self,
        ns: &Namespace,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
    ) -> Result<LogRead, BusError> {
        let stream = self.stream(ns).await?;
        let Some(tail) = self
            .last(&stream, &self.subjects.channel_log(channel))
            .await?
        else {
            // Nothing in the log: only a reader that saw nothing lost nothing.
            return Ok(LogRead {
                complete: since.is_none_or(|s| s.offset == 0),
                ..LogRead::default()
            });
        };
        let mut read = LogRead {
            epoch: tail.epoch.clone(),
            offset: tail.offset,
            entries: Vec::new(),
            complete: true,
        };
        // How many of the newest messages to walk back over.
        let want = match since {
            None => limit.unwrap_or(usize::MAX) as u64,
            Some(s) if s.epoch.is_empty() && s.offset == 0 => tail.offset,
            Some(s) if s.epoch != tail.epoch || s.offset > tail.offset => {
                read.complete = false;
                return Ok(read);
            }
            Some(s) => tail.offset - s.offset,
        };
        let want = want.min(tail.offset);
        if since.is_some() && want > ns.history_size.max(1) as u64 {
            // More than the log keeps of a channel.
            read.complete = false;
            return Ok(read);
        }
        let mut next = tail.seq;
        while (read.entries.len() as u64) < want && next != 0 {
            match self.at(&stream, next).await? {
                Some((entry, epoch, prev)) if epoch == tail.epoch => {
                    next = prev;
                    read.entries.push(entry);
                }
                _ => break,
            }
        }
        read.entries.reverse();
        if since.is_some() {
            read.complete = read.entries.len() as u64 == want;
            if !read.complete {
                read.entries.clear();
            } else if let Some(l) = limit {
                read.entries.truncate(l);
            }
        }
        Ok(read)
    }

    /// Answers presence requests with this node's subscribers.
    async fn answer_presence(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        loop {
            let msg = tokio::select! {
                m = requests.next() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            if msg.headers.as_ref().and_then(|hs| header(hs, h::NODE)) == Some(self.node.id()) {
                continue;
            }
            let Ok(channel) = std::str::from_utf8(&msg.payload) else {
                continue;
            };
            let members = self.node.channel_members(channel);
            let body = serde_json::to_vec(&members).expect("members serialize");
            let _ = self.client.publish(reply, body.into()).await;
        }
    }

    /// Publishes queued joins and leaves.
    async fn announcer(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<(String, HeaderMap, Bytes)>,
    ) {
        loop {
            let (subject, headers, body) = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = self.stop.cancelled() => return,
            };
            let _ = self
                .client
                .publish_with_headers(subject, headers, body)
                .await;
        }
    }

    /// Forgets the cached positions of channels not published on lately.
    async fn forget_idle_tails(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TAIL_MEMORY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop.cancelled() => return,
            }
            self.appenders.lock().retain(|_, a| match a.try_lock() {
                Ok(a) => a.used.is_some_and(|t| t.elapsed() < TAIL_MEMORY),
                Err(_) => true,
            });
        }
    }
}

/// The `Nats-Msg-Id` of an idempotency key: the channel and the key, the
/// key hex-encoded so any bytes fit in a header.
fn message_id(channel: &str, key: &str) -> String {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{channel}/{hex}")
}

/// A message of a channel's live subject, as the gateway sees it.
fn live_event(msg: &Message, own_node: &str) -> Option<BusEvent> {
    let headers = msg.headers.as_ref()?;
    match header(headers, h::EVENT) {
        Some(kind @ ("join" | "leave")) => {
            if header(headers, h::NODE) == Some(own_node) {
                return None;
            }
            let member: Member = serde_json::from_slice(&msg.payload).ok()?;
            Some(if kind == "join" {
                BusEvent::Join(member)
            } else {
                BusEvent::Leave(member)
            })
        }
        Some(_) => None,
        None => {
            let (entry, epoch, _) = log_entry(headers, &msg.payload)?;
            Some(BusEvent::Message { epoch, entry })
        }
    }
}

impl ChannelBus for NatsChannels {
    fn request_timeout(&self) -> Duration {
        self.config.request_timeout
    }

    fn publish<'a>(
        &'a self,
        ns: &'a Namespace,
        channel: &'a str,
        data: &'a Payload,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Published, BusError>> {
        Box::pin(self.append(ns, channel, data, key))
    }

    fn read<'a>(
        &'a self,
        ns: &'a Namespace,
        channel: &'a str,
        since: Option<&'a StreamPosition>,
        limit: Option<usize>,
    ) -> BoxFuture<'a, Result<LogRead, BusError>> {
        Box::pin(self.read_log(ns, channel, since, limit))
    }

    fn watch<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Watch, BusError>> {
        Box::pin(async move {
            let sub = self
                .client
                .subscribe(self.subjects.channel_live(channel))
                .await
                .map_err(bus_down)?;
            // The server has the interest once a flush comes back.
            tokio::time::timeout(self.timeout, self.client.flush())
                .await
                .map_err(|_| bus_down("flush timed out"))?
                .map_err(bus_down)?;
            let own = self.node.id().to_string();
            let events = sub.filter_map(move |msg| std::future::ready(live_event(&msg, &own)));
            Ok(Box::pin(events) as Watch)
        })
    }

    fn announce(&self, channel: &str, member: &Member, joined: bool) {
        let mut headers = HeaderMap::new();
        headers.insert(h::EVENT, if joined { "join" } else { "leave" });
        headers.insert(h::NODE, self.node.id());
        let body = Bytes::from(serde_json::to_vec(member).expect("members serialize"));
        if self
            .announce
            .try_send((self.subjects.channel_live(channel), headers, body))
            .is_err()
        {
            tracing::debug!(channel, "join/leave announcement dropped: queue full");
        }
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Vec<Member>, BusError>> {
        Box::pin(async move {
            let peers = self.cluster.peers().len();
            if peers == 0 {
                return Ok(Vec::new());
            }
            let inbox = self.client.new_inbox();
            let replies = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(bus_down)?;
            let mut headers = HeaderMap::new();
            headers.insert(h::NODE, self.node.id());
            self.client
                .publish_with_reply_and_headers(
                    self.subjects.channel_presence(),
                    inbox,
                    headers,
                    Bytes::copy_from_slice(channel.as_bytes()),
                )
                .await
                .map_err(bus_down)?;
            let answers = replies.map(|m| m.payload);
            Ok(switchboard_backend::bus::gather_members(answers, peers, self.timeout).await)
        })
    }
}
