//! The client side of `fanout`: cheap WebSocket subscribers.
//!
//! A `fanout` worker holds up to 19,000 subscribers in one thread and each of
//! them may receive tens of messages per second, so the per-message cost of
//! the client must stay far below the server's. These subscribers therefore
//! do not use tungstenite for receiving: after the opening handshake (and,
//! for Switchboard's native protocol, the `subscribe` command, the only JSON
//! a subscriber ever parses) a subscriber reads its socket into one buffer
//! shared by the worker's thread, walks the frame headers in place
//! ([`next_frame`]), and finds the publication's stamp in a data frame by
//! scanning its bytes for the marker ([`proto::find_fanout_stamp`]). Nothing
//! is allocated, copied or validated per message; only the bytes of a frame
//! cut by the end of a read are kept until the next read. Pings are answered
//! with a masked pong ([`client_frame`]).
//!
//! Receipts go into the worker's [`Tally`]: per message, the number of
//! receipts and the latest one's latency; per phase, an HDR histogram of all
//! receipts' latencies; and receipts per tenth of a second of receipt time.
//! Latency is the receipt time (`CLOCK_REALTIME`, read once per socket read)
//! minus the publish time in the stamp, written by the coordinating process
//! on the same machine with the same clock.

use crate::proto::{self, Buckets, Receipts};
use crate::util;
use hdrhistogram::Histogram;
use std::collections::HashMap;

/// Frame opcodes (RFC 6455, section 5.2).
pub(crate) const OP_CONTINUATION: u8 = 0x0;
/// Text frame.
pub(crate) const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub(crate) const OP_BINARY: u8 = 0x2;
/// Close frame.
pub(crate) const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub(crate) const OP_PING: u8 = 0x9;
/// Pong frame.
pub(crate) const OP_PONG: u8 = 0xA;

/// Largest frame a subscriber accepts (the bench publishes small messages).
pub(crate) const MAX_FRAME: usize = 16 << 20;

/// One frame found in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The opcode.
    pub(crate) opcode: u8,
    /// Start of the payload in the buffer.
    pub(crate) start: usize,
    /// End of the payload (and of the frame) in the buffer.
    pub(crate) end: usize,
}

/// The frame at the start of `buf`: `Ok(None)` if it is not complete yet.
/// Server frames are unmasked; a masked one, reserved bits or an oversized
/// length are errors.
pub(crate) fn next_frame(buf: &[u8]) -> Result<Option<Frame>, String> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(format!(
            "frame with reserved bits set (0x{b0:02x}); compression is not negotiated"
        ));
    }
    if b1 & 0x80 != 0 {
        return Err("masked frame from the server".into());
    }
    let (len, header) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("eight bytes")), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME as u64 {
        return Err(format!("frame of {len} bytes (limit {MAX_FRAME})"));
    }
    let end = header + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(Frame {
        opcode: b0 & 0x0f,
        start: header,
        end,
    }))
}

/// A masked client frame (FIN set) with `payload`.
pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    // A fresh key per frame; the bench needs no cryptographic strength here.
    let key = (util::unix_nanos() as u32 ^ 0x5bd1_e995).to_be_bytes();
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// The close code and reason of a close frame's payload, for messages.
pub(crate) fn close_reason(payload: &[u8]) -> String {
    match payload {
        [a, b, reason @ ..] => format!(
            "code {} {:?}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no code".into(),
    }
}

/// Tenths of a second: the granularity of [`Tally`]'s receipt-time counts.
pub(crate) const TICK_NS: u64 = 100_000_000;

/// What a worker's subscribers received since the last report.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Per message: receipts and the latest receipt's latency (µs).
    messages: HashMap<u64, (u64, u64)>,
    single_us: Histogram<u64>,
    sustained_us: Histogram<u64>,
    /// Receipts per tick of receipt time.
    ticks: HashMap<u64, u64>,
    unparsed: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            messages: HashMap::new(),
            single_us: util::new_histogram(),
            sustained_us: util::new_histogram(),
            ticks: HashMap::new(),
            unparsed: 0,
        }
    }
}

/// What [`Tally::take`] hands over.
#[derive(Debug)]
pub(crate) struct Taken {
    /// Per message, sorted by sequence number.
    pub(crate) messages: Vec<Receipts>,
    pub(crate) single_latency_us: Buckets,
    pub(crate) sustained_latency_us: Buckets,
    /// `(tick, receipts)`, sorted.
    pub(crate) ticks: Vec<(u64, u64)>,
    pub(crate) unparsed: u64,
}

impl Tally {
    /// Records one data frame's payload received at `now_ns` (Unix
    /// nanoseconds). For a single-phase message, returns its receipts so far
    /// and the latest latency, so the caller can tell when every subscriber
    /// has it.
    pub(crate) fn record(&mut self, payload: &[u8], now_ns: u64) -> Option<Receipts> {
        let Some((phase, seq, ts_ns)) = proto::find_fanout_stamp(payload) else {
            self.unparsed += 1;
            return None;
        };
        let us = (now_ns.saturating_sub(ts_ns) / 1000).max(1);
        *self.ticks.entry(now_ns / TICK_NS).or_insert(0) += 1;
        let e = self.messages.entry(seq).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(us);
        let receipts = (seq, e.0, e.1);
        match phase {
            proto::FANOUT_SINGLE => {
                self.single_us.saturating_record(us);
                Some(receipts)
            }
            proto::FANOUT_SUSTAINED => {
                self.sustained_us.saturating_record(us);
                None
            }
            _ => None,
        }
    }

    /// Hands over everything recorded and starts afresh.
    pub(crate) fn take(&mut self) -> Taken {
        let t = std::mem::take(self);
        let mut messages: Vec<Receipts> = t
            .messages
            .into_iter()
            .map(|(seq, (n, us))| (seq, n, us))
            .collect();
        messages.sort_unstable();
        let mut ticks: Vec<(u64, u64)> = t.ticks.into_iter().collect();
        ticks.sort_unstable();
        Taken {
            messages,
            single_latency_us: util::to_buckets(&t.single_us),
            sustained_latency_us: util::to_buckets(&t.sustained_us),
            ticks,
            unparsed: t.unparsed,
        }
    }
}

/// What one pass over received bytes found besides data.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Control {
    /// Pong frames to send (one per ping, echoing its payload).
    pub(crate) pongs: Vec<Vec<u8>>,
    /// The server's close frame, if one came.
    pub(crate) closed: Option<String>,
}

/// Walks the complete frames at the start of `buf`: data frames go to
/// `tally` (and `on_single` for single-phase receipts), pings become pongs,
/// a close frame ends the walk. Returns the bytes consumed; the rest is the
/// start of a frame still arriving.
pub(crate) fn process(
    buf: &[u8],
    now_ns: u64,
    tally: &mut Tally,
    control: &mut Control,
    mut on_single: impl FnMut(Receipts),
) -> Result<usize, String> {
    let mut pos = 0;
    while let Some(f) = next_frame(&buf[pos..])? {
        let payload = &buf[pos + f.start..pos + f.end];
        pos += f.end;
        match f.opcode {
            OP_TEXT | OP_BINARY => {
                if let Some(r) = tally.record(payload, now_ns) {
                    on_single(r);
                }
            }
            // The bench's messages are small; a continuation carries no stamp.
            OP_CONTINUATION | OP_PONG => {}
            OP_PING => control.pongs.push(client_frame(OP_PONG, payload)),
            OP_CLOSE => {
                control.closed = Some(close_reason(payload));
                break;
            }
            op => return Err(format!("unknown opcode 0x{op:x}")),
        }
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked (server) frame.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 65_535 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_of_every_length_form() {
        for len in [0, 5, 125, 126, 300, 65_535, 65_536, 100_000] {
            let f = server_frame(OP_TEXT, &vec![b'a'; len]);
            let got = next_frame(&f).unwrap().unwrap();
            assert_eq!(
                (got.opcode, got.end - got.start, got.end),
                (OP_TEXT, len, f.len())
            );
            // Every strict prefix is incomplete.
            for cut in [0, 1, f.len() / 2, f.len() - 1] {
                if cut < f.len() {
                    assert_eq!(next_frame(&f[..cut]).unwrap(), None, "len {len} cut {cut}");
                }
            }
        }
        assert!(next_frame(&[0xC1, 0x00]).is_err(), "RSV1");
        assert!(next_frame(&[0x81, 0x80, 0, 0, 0, 0]).is_err(), "masked");
        let huge = [0x82, 127, 0, 0, 0, 0, 0x10, 0, 0, 0];
        assert!(next_frame(&huge).is_err(), "too large");
    }

    #[test]
    fn client_frames_are_masked() {
        let f = client_frame(OP_TEXT, b"hello");
        assert_eq!(f[0], 0x81);
        assert_eq!(f[1], 0x80 | 5);
        let key = &f[2..6];
        let unmasked: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(unmasked, b"hello");
        let long = client_frame(OP_BINARY, &[0u8; 200]);
        assert_eq!((long[1], long.len()), (0x80 | 126, 4 + 4 + 200));
    }

    #[test]
    fn process_counts_stamps_answers_pings_and_keeps_partial_frames() {
        let now = 1_700_000_000_500_000_000;
        let single = proto::fanout_text(proto::FANOUT_SINGLE, 3, now - 2_000_000, 40);
        let native = format!(
            r#"{{"push":"message","channel":"bench:fanout","offset":1,"epoch":"abc","text":"{}"}}"#,
            proto::fanout_text(proto::FANOUT_SUSTAINED, 4, now - 5_000_000, 0)
        );
        let mut buf = server_frame(OP_TEXT, single.as_bytes());
        buf.extend(server_frame(OP_PING, b"p"));
        buf.extend(server_frame(OP_TEXT, native.as_bytes()));
        buf.extend(server_frame(OP_TEXT, b"no stamp"));
        let whole = buf.len();
        let tail = server_frame(OP_TEXT, single.as_bytes());
        buf.extend_from_slice(&tail[..10]);

        let mut tally = Tally::default();
        let mut control = Control::default();
        let mut singles = Vec::new();
        let used = process(&buf, now, &mut tally, &mut control, |r| singles.push(r)).unwrap();
        assert_eq!(used, whole);
        assert_eq!(singles, vec![(3, 1, 2_000)]);
        assert_eq!(control.pongs.len(), 1);
        assert_eq!(control.pongs[0][0], 0x80 | OP_PONG);
        assert_eq!(control.closed, None);

        let mut close = server_frame(OP_CLOSE, &[0x03, 0xE8, b'b', b'y', b'e']);
        close.extend(server_frame(OP_TEXT, single.as_bytes()));
        let used = process(&close, now, &mut tally, &mut control, |_| {}).unwrap();
        assert_eq!(used, 7);
        assert_eq!(control.closed.as_deref(), Some("code 1000 \"bye\""));

        let t = tally.take();
        assert_eq!(t.messages, vec![(3, 1, 2_000), (4, 1, 5_000)]);
        assert_eq!(t.unparsed, 1);
        assert_eq!(t.ticks, vec![(now / TICK_NS, 2)]);
        let count = |b: &Buckets| b.iter().map(|x| x.1).sum::<u64>();
        assert_eq!(
            (count(&t.single_latency_us), count(&t.sustained_latency_us)),
            (1, 1)
        );
        assert!(tally.take().messages.is_empty(), "take starts afresh");
    }
}
