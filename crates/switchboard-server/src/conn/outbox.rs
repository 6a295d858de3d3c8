//! A session's outbox: its direct messages, numbered (`seq`) in the order
//! they are written and kept until the client acknowledges them, so that a
//! resume can send again what the client may not have (docs/sessions.md).
//! The frame encoding shared by every outbound message lives here too.

use crate::metrics::Metrics;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::num::NonZeroU16;
use switchboard_proto::ws::deflate::deflate_message;
use switchboard_proto::ws::frame::{encode_frame_with, OpCode};

/// Messages smaller than this are sent uncompressed even when
/// permessage-deflate is on: compressing them costs more than it saves.
pub(super) const DEFLATE_MIN_BYTES: usize = 256;

/// The frame of a message for a socket with or without permessage-deflate.
pub(super) fn frame(opcode: OpCode, payload: &[u8], deflate: bool) -> Bytes {
    if deflate && payload.len() >= DEFLATE_MIN_BYTES {
        encode_frame_with(opcode, true, &deflate_message(payload))
    } else {
        encode_frame_with(opcode, false, payload)
    }
}

/// The payload of an uncompressed, unmasked frame this module encoded.
pub(super) fn payload(plain: &[u8]) -> &[u8] {
    let header = match plain[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    &plain[header..]
}

/// Bounds of a session's outbox (`session-outbox-messages`,
/// `session-outbox-bytes`), packed into four bytes: every connection holds
/// them, and they fit what its flags leave of a word.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutboxLimits {
    messages: NonZeroU16,
    /// In KiB.
    kib: NonZeroU16,
}

impl OutboxLimits {
    /// Bounds of `messages` and `bytes` (rounded up to KiB); `None` when
    /// either is 0 or too large (the configuration's checks refuse that).
    pub(crate) fn new(messages: u32, bytes: u32) -> Option<Self> {
        Some(Self {
            messages: u16::try_from(messages).ok()?.try_into().ok()?,
            kib: u16::try_from(bytes.div_ceil(1024)).ok()?.try_into().ok()?,
        })
    }

    /// Whether `messages` kept, of `bytes` in all, are over these bounds.
    pub(crate) fn over(self, messages: usize, bytes: usize) -> bool {
        messages > usize::from(self.messages.get()) || bytes > usize::from(self.kib.get()) << 10
    }
}

/// Why a session cannot be attached to a new socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachError {
    /// Its socket is still open, or it is still being suspended: the
    /// resume takes it over, or waits.
    Busy,
    /// It has ended.
    Ended,
    /// `received` is beyond the last direct message sent.
    Ahead,
    /// Messages after `received` were dropped unacknowledged, or one was
    /// refused while it was suspended.
    Trimmed,
}

/// The direct messages of one session.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// The sequence of the last direct message (0: none yet).
    pub(super) last_seq: u64,
    /// Not acknowledged yet, oldest first: (sequence, uncompressed frame).
    pub(super) kept: VecDeque<(u64, Bytes)>,
    kept_bytes: usize,
    /// Messages up to this sequence were dropped unacknowledged, over the
    /// outbox's bounds (0: none): a resume from before it is refused.
    trimmed_through: u64,
    /// A direct message was refused while suspended, over the bounds: the
    /// session is to end, and cannot be resumed.
    pub(super) overflowed: bool,
    /// The `seq` of the last `message` event sent to the origin, carried
    /// from one socket to the next (event ids must not repeat).
    pub(super) origin_seq: u64,
    /// Times the session was suspended.
    pub(super) suspensions: u32,
    /// When it was last suspended.
    pub(super) suspended_at: Option<std::time::Instant>,
    /// Its own `session-ttl`, set by the origin's `connect` answer.
    pub(super) ttl: Option<std::time::Duration>,
}

impl Outbox {
    /// Numbers a direct message (`tail`: its data fields as JSON, see
    /// [`direct_tail`]) and keeps it; its uncompressed frame.
    pub(super) fn number(&mut self, tail: &[u8], metrics: &Metrics) -> Bytes {
        self.last_seq += 1;
        let seq = self.last_seq;
        let mut json = BytesMut::with_capacity(tail.len() + 40);
        json.put_slice(b"{\"push\":\"direct\",\"seq\":");
        json.put_slice(seq.to_string().as_bytes());
        if !tail.is_empty() {
            json.put_u8(b',');
            json.put_slice(tail);
        }
        json.put_u8(b'}');
        let plain = encode_frame_with(OpCode::Text, false, &json);
        self.kept_bytes += plain.len();
        self.kept.push_back((seq, plain.clone()));
        metrics.session_outbox_messages.inc();
        metrics.session_outbox_bytes.inc_by(plain.len() as i64);
        plain
    }

    /// Messages up to this sequence were dropped unacknowledged.
    pub(super) fn trimmed_through(&self) -> u64 {
        self.trimmed_through
    }

    pub(super) fn over(&self, limits: OutboxLimits) -> bool {
        limits.over(self.kept.len(), self.kept_bytes)
    }

    /// Takes back the message just numbered (refused: it does not fit).
    pub(super) fn unnumber(&mut self, metrics: &Metrics) {
        if let Some((_, plain)) = self.kept.pop_back() {
            self.kept_bytes -= plain.len();
            self.last_seq -= 1;
            metrics.session_outbox_messages.dec();
            metrics.session_outbox_bytes.dec_by(plain.len() as i64);
        }
    }

    /// Drops the oldest kept messages over the bounds (a connected client
    /// that does not acknowledge: it has them, they were written): a resume
    /// from before them is refused.
    pub(super) fn trim(&mut self, limits: OutboxLimits, metrics: &Metrics) {
        while self.over(limits) {
            let Some((seq, plain)) = self.kept.pop_front() else {
                break;
            };
            self.kept_bytes -= plain.len();
            self.trimmed_through = seq;
            metrics.session_outbox_messages.dec();
            metrics.session_outbox_bytes.dec_by(plain.len() as i64);
            metrics.session_outbox_trimmed.inc();
        }
    }

    /// Stops keeping the messages up to `seq`.
    pub(super) fn release_through(&mut self, seq: u64, metrics: &Metrics) {
        while self.kept.front().is_some_and(|(s, _)| *s <= seq) {
            let (_, plain) = self.kept.pop_front().expect("front exists");
            self.kept_bytes -= plain.len();
            metrics.session_outbox_messages.dec();
            metrics.session_outbox_bytes.dec_by(plain.len() as i64);
        }
        if self.kept.is_empty() && self.kept.capacity() > 4 {
            self.kept = VecDeque::new();
        }
    }

    /// Whether a client that has every message up to `received` can resume.
    pub(super) fn check_received(&self, received: u64) -> Result<(), AttachError> {
        if received > self.last_seq {
            return Err(AttachError::Ahead);
        }
        if self.overflowed || received < self.trimmed_through {
            return Err(AttachError::Trimmed);
        }
        Ok(())
    }

    /// The kept messages numbered after `seq`, as the `direct` pushes' JSON,
    /// oldest first (`0`: all of them, for a session moving to another
    /// node).
    pub(super) fn kept_after(&self, seq: u64) -> Vec<(u64, Bytes)> {
        let from = self.kept.partition_point(|(s, _)| *s <= seq);
        self.kept
            .range(from..)
            .map(|(seq, plain)| (*seq, plain.slice(plain.len() - payload(plain).len()..)))
            .collect()
    }

    /// Kept messages and numbering of a session that moved here from
    /// another node (see [`Outbox::kept_pushes`]).
    pub(super) fn restore(
        &mut self,
        last_seq: u64,
        trimmed_through: u64,
        kept: impl IntoIterator<Item = (u64, Bytes)>,
        metrics: &Metrics,
    ) {
        self.last_seq = last_seq;
        self.trimmed_through = trimmed_through;
        for (seq, push) in kept {
            let plain = encode_frame_with(OpCode::Text, false, &push);
            self.kept_bytes += plain.len();
            metrics.session_outbox_messages.inc();
            metrics.session_outbox_bytes.inc_by(plain.len() as i64);
            self.kept.push_back((seq, plain));
        }
    }

    /// The kept messages after what was released, framed for a socket with
    /// or without permessage-deflate.
    pub(super) fn replay(&self, deflate: bool) -> impl Iterator<Item = Bytes> + '_ {
        self.kept.iter().map(move |(_, plain)| {
            if deflate {
                frame(OpCode::Text, payload(plain), true)
            } else {
                plain.clone()
            }
        })
    }
}

/// The data fields of a direct message as JSON, without braces (`"text":
/// "…"`), shared by every session it is sent to: each adds its own `push`
/// and `seq` around them.
pub(super) fn direct_tail(data: &switchboard_proto::origin::Payload) -> Bytes {
    let json = Bytes::from(serde_json::to_vec(data).expect("payloads serialize"));
    debug_assert!(json.starts_with(b"{") && json.ends_with(b"}"));
    json.slice(1..json.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::native::{Push, ServerFrame};
    use switchboard_proto::origin::Payload;

    /// The spliced push is the protocol's `direct` push, for text and binary.
    #[test]
    fn numbered_pushes_are_the_protocols_direct_pushes() {
        let metrics = Metrics::new();
        let mut outbox = Outbox::default();
        for (i, data) in [
            Payload::Text("a \"quoted\" line".into()),
            Payload::Binary(vec![0, 1, 255]),
        ]
        .into_iter()
        .enumerate()
        {
            let plain = outbox.number(&direct_tail(&data), &metrics);
            let json = payload(&plain);
            let seq = Some(i as u64 + 1);
            assert_eq!(
                ServerFrame::decode(json).unwrap(),
                ServerFrame::Push(Push::Direct { seq, data })
            );
        }
        assert_eq!(metrics.session_outbox_messages.get(), 2);
        outbox.release_through(2, &metrics);
        assert_eq!(metrics.session_outbox_messages.get(), 0);
        assert_eq!(metrics.session_outbox_bytes.get(), 0);
    }

    #[test]
    fn limits_pack_and_round_up() {
        let l = OutboxLimits::new(3, 1025).unwrap();
        assert!(!l.over(3, 2048));
        assert!(l.over(4, 0));
        assert!(l.over(0, 2049));
        assert!(OutboxLimits::new(0, 1).is_none());
        assert!(OutboxLimits::new(70_000, 1).is_none());
        assert_eq!(std::mem::size_of::<Option<OutboxLimits>>(), 4);
    }
}
