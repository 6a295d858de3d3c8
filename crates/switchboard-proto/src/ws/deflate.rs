//! permessage-deflate (RFC 7692): offer negotiation and the per-message codec.
//!
//! The gateway always answers with `server_no_context_takeover`, so it compresses
//! each message from a fresh state and keeps no compressor per connection: one
//! compressor per thread is reset between messages. It accepts
//! `client_no_context_takeover` when offered; only a client that keeps its
//! context makes the gateway keep an inflater (about 40 KiB) for the connection.
//!
//! The compressor has a fixed 32 KiB window. A client that limits the server
//! window (`server_max_window_bits` below 15) is still accepted, and the
//! gateway then sends it every message uncompressed, which RFC 7692 allows
//! ([`DeflateParams::compresses_outbound`]).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;

/// Parameters agreed for a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeflateParams {
    /// The client resets its compressor after every message, so the gateway can
    /// inflate each message from a fresh state.
    pub client_no_context_takeover: bool,
    /// The `server_max_window_bits` (8–15) the client asked for, if any. The
    /// answer echoes it (RFC 7692 §7.1.2.1: that is how a server accepts it).
    pub server_max_window_bits: Option<u8>,
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` response value for these parameters.
    pub fn response_header(&self) -> String {
        let mut s = String::from("permessage-deflate; server_no_context_takeover");
        if let Some(bits) = self.server_max_window_bits {
            s.push_str(&format!("; server_max_window_bits={bits}"));
        }
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        s
    }

    /// Whether the gateway compresses what it sends: the compressor's window
    /// is 15 bits, so under a smaller limit messages go out uncompressed.
    pub fn compresses_outbound(&self) -> bool {
        self.server_max_window_bits.is_none_or(|bits| bits >= 15)
    }
}

/// Chooses the first acceptable permessage-deflate offer among the
/// `Sec-WebSocket-Extensions` header values, or `None`.
///
/// An offer is declined when a parameter is unknown, repeated or malformed.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Option<DeflateParams> {
    for value in header_values {
        for offer in value.split(',') {
            let mut parts = offer.split(';').map(str::trim);
            if parts.next() != Some("permessage-deflate") {
                continue;
            }
            if let Some(p) = parse_offer(parts) {
                return Some(p);
            }
        }
    }
    None
}

fn parse_offer<'a>(params: impl Iterator<Item = &'a str>) -> Option<DeflateParams> {
    let mut seen = [false; 4];
    let mut client_nct = false;
    let mut server_window = None;
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let idx = match name {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[idx], true) {
            return None;
        }
        match idx {
            0 | 1 if value.is_some() => return None,
            1 => client_nct = true,
            2 => {
                let bits: u8 = value?.parse().ok()?;
                if !(8..=15).contains(&bits) {
                    return None;
                }
                server_window = Some(bits);
            }
            3 => {
                if let Some(v) = value {
                    let bits: u8 = v.parse().ok()?;
                    if !(8..=15).contains(&bits) {
                        return None;
                    }
                }
            }
            _ => {}
        }
    }
    Some(DeflateParams {
        client_no_context_takeover: client_nct,
        server_max_window_bits: server_window,
    })
}

/// Inflation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// The compressed data was not valid deflate.
    #[error("invalid compressed data")]
    Corrupt,
    /// The message inflated past the size limit.
    #[error("inflated message too large")]
    TooLarge,
}

/// Inflates client messages for one connection.
#[derive(Debug)]
pub struct Inflater {
    /// Present only when the client keeps its compression context.
    own: Option<Box<Decompress>>,
}

thread_local! {
    static SHARED_INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    static SHARED_DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
}

impl Inflater {
    /// An inflater for the agreed parameters.
    pub fn new(params: DeflateParams) -> Self {
        Self {
            own: (!params.client_no_context_takeover).then(|| Box::new(Decompress::new(false))),
        }
    }

    /// Inflates one whole message (the concatenated frame payloads).
    pub fn inflate(&mut self, compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
        match self.own.as_deref_mut() {
            Some(d) => inflate_with(d, compressed, max),
            None => SHARED_INFLATE.with(|d| {
                let mut d = d.borrow_mut();
                d.reset(false);
                inflate_with(&mut d, compressed, max)
            }),
        }
    }
}

fn inflate_with(
    d: &mut Decompress,
    compressed: &[u8],
    max: usize,
) -> Result<Vec<u8>, InflateError> {
    const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
    let mut out = Vec::with_capacity((compressed.len() * 3).clamp(64, max.max(64)));
    for input in [compressed, &TAIL[..]] {
        let mut pos = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                if out.len() >= max {
                    return Err(InflateError::TooLarge);
                }
                out.reserve(out.capacity().max(256));
            }
            let (before_in, before_out) = (d.total_in(), d.total_out());
            let status = d
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let consumed = (d.total_in() - before_in) as usize;
            let produced = d.total_out() - before_out;
            pos += consumed;
            if out.len() > max {
                return Err(InflateError::TooLarge);
            }
            if status == Status::StreamEnd {
                // A final block (BFINAL) is allowed; the next message starts fresh.
                d.reset(false);
                break;
            }
            let room_left = out.len() < out.capacity();
            if pos >= input.len() && room_left {
                break;
            }
            if consumed == 0 && produced == 0 && room_left {
                return Err(InflateError::Corrupt);
            }
        }
    }
    Ok(out)
}

/// Compresses one message from a fresh state (server_no_context_takeover),
/// returning the payload to send with RSV1 set.
pub fn deflate_message(payload: &[u8]) -> Vec<u8> {
    SHARED_DEFLATE.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let mut pos = 0;
        // A call after one that filled `out` may only hand over output the
        // compressor had pending (miniz_oxide returns early then, before
        // compressing the rest and flushing), even though it leaves room.
        let mut prev_full = false;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            let before = c.total_in();
            c.compress_vec(&payload[pos..], &mut out, FlushCompress::Sync)
                .expect("deflate of in-memory data cannot fail");
            pos += (c.total_in() - before) as usize;
            let full = out.len() == out.capacity();
            if pos >= payload.len() && !full && !prev_full {
                break;
            }
            prev_full = full;
        }
        // A sync flush ends with 00 00 ff ff, which the receiver re-appends.
        if out.ends_with(&[0, 0, 0xff, 0xff]) {
            out.truncate(out.len() - 4);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(["x-webkit-deflate-frame"]), None);
        let p = negotiate(["permessage-deflate; client_max_window_bits"]).unwrap();
        assert!(!p.client_no_context_takeover);
        let p = negotiate(["permessage-deflate; client_no_context_takeover"]).unwrap();
        assert!(p.client_no_context_takeover);
        assert_eq!(
            p.response_header(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        // A server window below 15 bits is accepted and echoed (Autobahn 13.3.*
        // and 13.5.*); the gateway then sends uncompressed.
        let offer = |s: &str| negotiate([s]).unwrap();
        let p = offer("permessage-deflate; server_max_window_bits=10, permessage-deflate");
        assert_eq!(p.server_max_window_bits, Some(10));
        assert!(!p.compresses_outbound());
        let header = "permessage-deflate; server_no_context_takeover; server_max_window_bits=10";
        assert_eq!(p.response_header(), header);
        assert!(offer("permessage-deflate; server_max_window_bits=15").compresses_outbound());
        assert!(offer("permessage-deflate").compresses_outbound());
        // Out-of-range windows are declined; the fallback offer is taken.
        let p = offer("permessage-deflate; server_max_window_bits=7; client_no_context_takeover, permessage-deflate");
        assert_eq!(p, DeflateParams::default());
        for bad in ["server_max_window_bits=16", "server_max_window_bits"] {
            let header = format!("permessage-deflate; {bad}");
            assert_eq!(negotiate([header.as_str()]), None);
        }
        assert_eq!(negotiate(["permessage-deflate; foo"]), None);
        assert_eq!(
            negotiate([
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
            ]),
            None
        );
    }

    #[test]
    fn roundtrip_fresh_and_with_context() {
        let msg = b"hello hello hello hello hello world".repeat(50);
        let z = deflate_message(&msg);
        assert!(z.len() < msg.len());
        for nct in [true, false] {
            let mut inf = Inflater::new(DeflateParams {
                client_no_context_takeover: nct,
                ..Default::default()
            });
            for _ in 0..3 {
                assert_eq!(inf.inflate(&z, 1 << 20).unwrap(), msg);
            }
        }
    }

    /// Poorly compressible data whose output outgrows the first buffer made
    /// miniz_oxide return with output still pending; the message was cut short
    /// (Autobahn 12.2.9, 12.5.10: echoes of 65536 bytes came back shorter).
    #[test]
    fn roundtrip_when_output_outgrows_the_buffer() {
        let mut x: u64 = 1;
        let mut data = |len: usize, noisy: bool| -> Vec<u8> {
            (0..len)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // An image-like gradient with noise, or plain noise.
                    if noisy {
                        x as u8
                    } else {
                        ((i / 7) as u8).wrapping_add((x % 4) as u8)
                    }
                })
                .collect()
        };
        let nct = DeflateParams {
            client_no_context_takeover: true,
            ..Default::default()
        };
        let mut inf = Inflater::new(nct);
        for len in [1000, 4096, 30_000, 65_536, 100_000, 131_072, 1 << 20] {
            for noisy in [false, true] {
                let msg = data(len, noisy);
                let z = deflate_message(&msg);
                let back = inf.inflate(&z, 2 << 20).unwrap();
                let got = back.len();
                assert!(back == msg, "len {len} noisy {noisy}: got {got} bytes");
            }
        }
    }

    #[test]
    fn limits_and_corruption() {
        let msg = vec![b'a'; 100_000];
        let z = deflate_message(&msg);
        let mut inf = Inflater::new(DeflateParams {
            client_no_context_takeover: true,
            ..Default::default()
        });
        assert_eq!(inf.inflate(&z, 1000), Err(InflateError::TooLarge));
        assert_eq!(
            inf.inflate(&[0xff, 0xff, 0xff], 1000),
            Err(InflateError::Corrupt)
        );
        assert_eq!(inf.inflate(&z, 200_000).unwrap().len(), 100_000);
        assert!(inf.inflate(&deflate_message(b""), 10).unwrap().is_empty());
    }
}
