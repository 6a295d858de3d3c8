//! The WebSocket frame decoder, fed the way `switchboard-server`'s
//! connection task feeds it (`Connection::decode_buffered`): bytes arrive in
//! reads of any size into one `BytesMut`, and `Decoder::decode` is called
//! until it returns `Ok(None)` or an error, which ends the connection.
//!
//! Input: byte 0 picks the decoder's configuration, byte 1 seeds the read
//! sizes, the rest is what the client sent (masked frames).
//!
//! Checks: no panic, no unbounded allocation (see `switchboard_fuzz`), every
//! message obeys the RFC and the size limit, and the result does not depend on
//! how the stream was split into reads. Each message also goes back the other
//! way: encoded as the gateway encodes (`encode_frame`, `encode_close`, and
//! `deflate_message` when deflate is on), masked, and decoded again, it must
//! come out the same.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_proto::ws::close;
use switchboard_proto::ws::deflate::{deflate_message, DeflateParams};
use switchboard_proto::ws::frame::{apply_mask, encode_close, encode_frame_with, parse_header};
use switchboard_proto::ws::{Decoder, Message, OpCode, ProtocolError};

/// What a run produced: the messages, then how it stopped.
#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<Message>,
    error: Option<ProtocolError>,
}

fn decoder(config: u8) -> (Decoder, usize) {
    // Small limits, so the size checks are reached with small inputs; the
    // largest lets 16-bit lengths through.
    let max = [1, 125, 1000, 70_000][usize::from(config & 3)];
    let deflate = match (config >> 2) & 3 {
        // Negotiated with client_no_context_takeover: the shared inflater.
        1 => Some(DeflateParams {
            client_no_context_takeover: true,
            server_max_window_bits: None,
        }),
        // The client keeps its context: an inflater per connection.
        2 => Some(DeflateParams {
            client_no_context_takeover: false,
            server_max_window_bits: Some(9),
        }),
        _ => None,
    };
    (Decoder::new(max, deflate), max)
}

fn check(msg: &Message, max: usize) {
    match msg {
        Message::Text(t) => {
            assert!(t.len() <= max, "text of {} bytes over {max}", t.len());
            assert!(std::str::from_utf8(t).is_ok(), "text is not UTF-8");
        }
        Message::Binary(b) => assert!(b.len() <= max, "binary of {} bytes over {max}", b.len()),
        Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
        Message::Close(code, reason) => {
            assert!(reason.len() <= 123);
            assert!(std::str::from_utf8(reason).is_ok());
            match code {
                Some(c) => assert!(close::is_valid_received(*c), "close code {c}"),
                None => assert!(reason.is_empty()),
            }
        }
    }
}

/// Turns a server frame into the client frame with the same content.
fn masked(server_frame: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let h = parse_header(server_frame).unwrap().unwrap();
    assert!(h.mask.is_none());
    let mut out = server_frame[..h.header_len].to_vec();
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    let mut payload = server_frame[h.header_len..].to_vec();
    assert_eq!(payload.len() as u64, h.payload_len);
    apply_mask(&mut payload, mask, 0);
    out.extend_from_slice(&payload);
    out
}

/// Encodes `msg` as the gateway would send it and decodes it again.
fn round_trip(msg: &Message, config: u8) {
    let empty = bytes::Bytes::new();
    let (opcode, payload) = match msg {
        Message::Text(t) => (OpCode::Text, t),
        Message::Binary(b) => (OpCode::Binary, b),
        Message::Ping(p) => (OpCode::Ping, p),
        Message::Pong(p) => (OpCode::Pong, p),
        Message::Close(None, _) => (OpCode::Close, &empty),
        Message::Close(Some(code), reason) => {
            let reason = std::str::from_utf8(reason).unwrap();
            let frame = encode_close(*code, reason);
            let back = run(config & !3, [&masked(&frame, [1, 2, 3, 4])[..]]);
            assert_eq!(
                back.messages,
                std::slice::from_ref(msg),
                "close frame round trip"
            );
            return;
        }
    };
    // Compressed, as the gateway sends when deflate was agreed.
    let compress = matches!((config >> 2) & 3, 1 | 2) && !opcode.is_control();
    let wire = if compress {
        deflate_message(payload)
    } else {
        payload.to_vec()
    };
    let frame = encode_frame_with(opcode, compress, &wire);
    // Any limit: the payload came through the decoder's limit already, the
    // compressed form may be larger.
    let back = run((config & !3) | 3, [&masked(&frame, [0x5a, 0, 0xff, 7])[..]]);
    assert_eq!(back.error, None, "round trip of {msg:?}");
    assert_eq!(
        back.messages,
        std::slice::from_ref(msg),
        "round trip (compressed: {compress})"
    );
}

fn run<'a>(config: u8, reads: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let (mut d, max) = decoder(config);
    let mut buf = BytesMut::new();
    let mut out = Outcome {
        messages: Vec::new(),
        error: None,
    };
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(m)) => {
                    check(&m, max);
                    out.messages.push(m);
                }
                Ok(None) => break,
                Err(e) => {
                    // Every error maps to a close code the gateway may send.
                    assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
                    out.error = Some(e);
                    return out;
                }
            }
        }
        // An incomplete frame is buffered, never more than the decoder lets
        // the buffer grow ahead of the bytes that arrived.
        assert!(buf.capacity() <= 2 * (buf.len() + (64 << 10)) + 4096);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [config, seed, stream @ ..] = data else {
        return;
    };
    let whole = run(*config, [stream]);
    let split = run(*config, switchboard_fuzz::chunks(stream, *seed));
    assert_eq!(
        whole, split,
        "the result depends on how reads split the stream"
    );
    // A few per input: each compression resets a compressor (~200 KiB of
    // tables), which would otherwise dominate inputs of many tiny frames.
    for msg in whole.messages.iter().take(8) {
        round_trip(msg, *config);
    }
});
