//! What a connection's client sends, whatever carries it (a WebSocket
//! frame, or the body of an HTTP fallback request): native commands run
//! with their rate limits, data messages become `message` events for the
//! origin, and the token's expiry is watched. Kept by the connection's
//! task ([`super::connection`], [`super::fallback`]).

use super::Edge;
use crate::admission::ratelimit::{RateLimit, Verdict};
use crate::clock::now_ms;
use crate::commands::native;
use crate::conn::Conn;
use crate::frames;
use crate::origin::ask::event_id;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use switchboard_proto::native::{decode_command, ErrorCode, Push};
use switchboard_proto::origin::{Event, MessageEvent, Payload};
use tokio::time::Instant;

/// The inbound state of one connection: the last `message` event's `seq`,
/// and what only a connection that has sent something needs.
#[derive(Default)]
pub(crate) struct Inbound {
    /// The `seq` of the last `message` event sent to the origin.
    pub(crate) seq: u64,
    /// Boxed, so an idle connection pays a pointer.
    busy: Option<Box<Busy>>,
}

/// The state of a connection that comes with its first messages.
#[derive(Default)]
struct Busy {
    /// Rate limits, from the first message on.
    limit: Option<RateLimit>,
    /// Commands waiting on the origin or the cluster bus, run in order by a
    /// task that runs while some wait.
    jobs: Option<Arc<native::Jobs>>,
    /// The token expiry (Unix ms) a `refresh` push was sent for.
    refresh_pushed_for: u64,
    /// A raw client over its rate: nothing is read from its socket until
    /// then, so TCP slows the sender and nothing is dropped. Bytes already
    /// read wait in the parked read buffer (at most one read's worth).
    paused_until: Option<Instant>,
}

/// The origin's queue is full: the connection is to be closed (1013,
/// `origin backlog`).
#[derive(Debug)]
pub(crate) struct Backlog;

/// What the token's expiry asks of the connection's task now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TokenCheck {
    Fine,
    /// Expired: close with 4004.
    Expired,
}

impl Inbound {
    /// An inbound state whose last `message` event was `seq`.
    pub(crate) fn new(seq: u64) -> Self {
        Self { seq, busy: None }
    }

    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Default::default)
    }

    /// When reading resumes, if a raw client over its rate is paused.
    pub(crate) fn paused_until(&self) -> Option<Instant> {
        self.busy.as_ref().and_then(|b| b.paused_until)
    }

    /// Ends a pause.
    pub(crate) fn unpause(&mut self) {
        if let Some(b) = &mut self.busy {
            b.paused_until = None;
        }
    }

    /// The rate limits' verdict on a native command of `len` bytes (the
    /// limits are set up on the first message).
    pub(crate) fn admit(&mut self, shared: &Edge, len: usize) -> Verdict {
        let cfg = &shared.config;
        if cfg.client_message_rate == 0 && cfg.client_byte_rate == 0 {
            return Verdict::Pass;
        }
        let now = std::time::Instant::now();
        let (messages, bytes, max) = (
            cfg.client_message_rate,
            cfg.client_byte_rate,
            cfg.max_message_size,
        );
        self.busy()
            .limit
            .get_or_insert_with(|| RateLimit::new(messages, bytes, max, now))
            .check(len, now)
    }

    /// Answers a native command refused by the rate limits
    /// ([`Verdict::Refuse`]) with a `rate_limited` error.
    pub(crate) fn refuse_rate(shared: &Edge, conn: &Conn, text: Option<&[u8]>) {
        shared.metrics.rate_limited.inc();
        let id = text.and_then(|t| decode_command(t).ok()).map(|c| c.id);
        shared.metrics.native_error(ErrorCode::RateLimited);
        let why = "over client-message-rate or client-byte-rate; slow down";
        conn.push(
            frames::error_frame(id, ErrorCode::RateLimited, why),
            &shared.metrics,
        );
    }

    /// Charges a raw client's message of `len` bytes to its rate limits
    /// and, when it is over them, pauses reading for as long as it takes
    /// the buckets to refill ([`RateLimit::throttle`]).
    pub(crate) fn throttle(&mut self, shared: &Edge, len: usize) {
        let cfg = &shared.config;
        if cfg.client_message_rate == 0 && cfg.client_byte_rate == 0 {
            return;
        }
        let now = std::time::Instant::now();
        let (messages, bytes, max) = (
            cfg.client_message_rate,
            cfg.client_byte_rate,
            cfg.max_message_size,
        );
        let busy = self.busy();
        let wait = busy
            .limit
            .get_or_insert_with(|| RateLimit::new(messages, bytes, max, now))
            .throttle(len, now);
        if !wait.is_zero() {
            busy.paused_until = Some(Instant::now() + wait);
            shared.metrics.rate_limited.inc();
        }
    }

    /// Counts a message from the client.
    pub(crate) fn count_in(shared: &Edge, conn: &Conn) {
        conn.messages_in.fetch_add(1, Relaxed);
        shared.metrics.messages_in.inc();
    }

    /// Runs a native protocol command (already counted and admitted).
    pub(crate) fn command(
        &mut self,
        shared: &Arc<Edge>,
        conn: &Arc<Conn>,
        text: &[u8],
    ) -> Result<(), Backlog> {
        match native::handle(&shared.commands, conn, text) {
            native::Outcome::Done => {}
            native::Outcome::ToOrigin { id, data } => {
                self.data(shared, conn, data)?;
                conn.push(frames::sent_frame(id), &shared.metrics);
            }
            native::Outcome::Wait(job) => {
                let jobs = self.busy().jobs.get_or_insert_with(Default::default);
                match jobs.push(job, shared.config.max_pending_events) {
                    Ok(true) => {
                        shared.conn_tasks.spawn(native::command_worker(
                            shared.commands.clone(),
                            conn.clone(),
                            jobs.clone(),
                        ));
                    }
                    Ok(false) => {}
                    // At most `max-pending-events` wait for the origin.
                    Err(job) => {
                        shared.metrics.native_error(ErrorCode::Unavailable);
                        conn.push(
                            frames::error_frame(
                                Some(job.id),
                                ErrorCode::Unavailable,
                                "too many commands waiting for the application or the cluster",
                            ),
                            &shared.metrics,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// A message for the origin; `Err` when the origin's queue is full and
    /// the connection is to be closed.
    pub(crate) fn data(
        &mut self,
        shared: &Edge,
        conn: &Arc<Conn>,
        payload: Payload,
    ) -> Result<(), Backlog> {
        self.seq += 1;
        let data_len = match &payload {
            Payload::Text(t) => t.len(),
            // Base64 in the JSON.
            Payload::Binary(b) => b.len() / 3 * 4 + 4,
        };
        let conn_id = conn.id();
        let event = Event::Message(MessageEvent {
            id: event_id::message(&conn_id, self.seq),
            connection_id: conn_id.into(),
            node: shared.node.to_string(),
            timestamp_ms: now_ms(),
            seq: self.seq,
            user_id: conn.user_id().map(str::to_owned),
            payload,
        });
        let json = queued_json(&event, data_len);
        shared
            .origin
            .dispatcher
            .enqueue(&conn.key, json, Some(conn), false)
            .map_err(|_| Backlog)
    }

    fn refresh_pushed_for(&self) -> u64 {
        self.busy.as_ref().map_or(0, |b| b.refresh_pushed_for)
    }

    /// The next moment the token's expiry matters: the `refresh` push
    /// (native, not sent yet), else the expiry itself.
    pub(crate) fn token_moment(&self, shared: &Edge, conn: &Conn) -> Option<Instant> {
        let exp = conn.token_expires_ms();
        if exp == 0 {
            return None;
        }
        let notice = shared.config.token_refresh_notice.as_millis() as u64;
        let at = if conn.native && self.refresh_pushed_for() != exp {
            exp.saturating_sub(notice)
        } else {
            exp
        };
        let ms = at.saturating_sub(now_ms());
        Some(Instant::now() + Duration::from_millis(ms))
    }

    /// Says whether the token expired (the caller closes with 4004), and
    /// asks a native client to `refresh` it shortly before.
    pub(crate) fn check_token(&mut self, shared: &Edge, conn: &Conn) -> TokenCheck {
        let exp = conn.token_expires_ms();
        if exp == 0 {
            return TokenCheck::Fine;
        }
        let now = now_ms();
        if now >= exp {
            return TokenCheck::Expired;
        }
        let notice = shared.config.token_refresh_notice.as_millis() as u64;
        if conn.native && self.refresh_pushed_for() != exp && now + notice >= exp {
            self.busy().refresh_pushed_for = exp;
            let push = Push::Refresh { expires_at_ms: exp };
            conn.push(frames::push_frame(&push), &shared.metrics);
        }
        TokenCheck::Fine
    }
}

/// Serializes an event that will wait in the origin queue, in a buffer of
/// about its size: a queued event keeps its allocation for as long as the
/// origin is away, and the doubling growth of a plain `to_vec` would make
/// that up to twice the JSON (`--origin-queue-bytes` counts the JSON).
fn queued_json(event: &Event, data_len: usize) -> Bytes {
    // The envelope (ids, node, timestamp, seq) is under 256 bytes; text
    // may grow a little by escaping.
    let mut json = Vec::with_capacity(data_len + data_len / 16 + 256);
    serde_json::to_writer(&mut json, event).expect("events serialize");
    if json.capacity() > json.len() + json.len() / 2 {
        json.shrink_to_fit();
    }
    Bytes::from(json)
}
