//! The message decoder: frames in, whole messages out, every RFC 6455 rule and
//! every size limit enforced before bytes are buffered.

use super::close;
use super::deflate::{DeflateParams, InflateError, Inflater};
use super::frame::{apply_mask, parse_header, OpCode};
use bytes::{Bytes, BytesMut};

/// Most bytes reserved at once for an incomplete frame.
const RESERVE_STEP: usize = 64 << 10;

/// A complete message received from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message; the bytes are valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping with its payload (at most 125 bytes).
    Ping(Bytes),
    /// A pong with its payload.
    Pong(Bytes),
    /// A close frame: the code (absent when the payload was empty) and the UTF-8 reason.
    Close(Option<u16>, Bytes),
}

/// Why a client's bytes broke the protocol. Each maps to the close code the
/// gateway answers with ([`ProtocolError::close_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Client frames must be masked (RFC 6455 §5.1).
    #[error("client frame not masked")]
    Unmasked,
    /// RSV bits set without an extension that defines them.
    #[error("reserved bits set")]
    ReservedBits,
    /// Opcode 3–7 or 0xB–0xF.
    #[error("reserved opcode")]
    ReservedOpcode,
    /// A control frame with FIN clear.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame with a payload over 125 bytes.
    #[error("control frame too long")]
    ControlTooLong,
    /// A continuation frame with no message in progress.
    #[error("continuation without a message in progress")]
    UnexpectedContinuation,
    /// A new data message while a fragmented one is in progress.
    #[error("new message while a fragmented message is in progress")]
    ExpectedContinuation,
    /// A 64-bit length with the top bit set.
    #[error("invalid frame length")]
    InvalidLength,
    /// A close frame with a one-byte payload or a code that may not be sent.
    #[error("invalid close frame")]
    InvalidClose,
    /// A text message or close reason that is not UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// Compressed data that does not inflate.
    #[error("invalid compressed data")]
    InvalidCompressed,
    /// A message over the size limit.
    #[error("message too big")]
    MessageTooBig,
}

impl ProtocolError {
    /// The close code sent to the client for this error.
    pub fn close_code(self) -> u16 {
        match self {
            Self::InvalidUtf8 | Self::InvalidCompressed => close::INVALID_PAYLOAD,
            Self::MessageTooBig => close::MESSAGE_TOO_BIG,
            _ => close::PROTOCOL_ERROR,
        }
    }
}

/// A fragmented message being assembled. Exists only between the first and last
/// fragment, so an idle connection holds none.
#[derive(Debug)]
struct Partial {
    opcode: OpCode,
    compressed: bool,
    data: BytesMut,
    /// Bytes of `data` known to be valid UTF-8 (uncompressed text only).
    utf8_valid: usize,
}

/// Decodes client frames into messages, in the server role.
#[derive(Debug)]
pub struct Decoder {
    max_message_size: usize,
    partial: Option<Box<Partial>>,
    inflater: Option<Box<Inflater>>,
}

impl Decoder {
    /// A decoder accepting messages up to `max_message_size` bytes (after
    /// inflation), with permessage-deflate if it was negotiated.
    pub fn new(max_message_size: usize, deflate: Option<DeflateParams>) -> Self {
        Self {
            max_message_size,
            partial: None,
            inflater: deflate.map(|p| Box::new(Inflater::new(p))),
        }
    }

    /// Whether a fragmented message is in progress.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Whether it keeps nothing between messages (no fragmented message in
    /// progress, no inflater), so that a new one with the same limit would
    /// do: a holder of many idle decoders may drop such a one.
    pub fn is_stateless(&self) -> bool {
        self.partial.is_none() && self.inflater.is_none()
    }

    /// Decodes the next message from the front of `buf`, consuming its frames.
    ///
    /// `Ok(None)` means `buf` holds no complete message yet; bytes of an
    /// incomplete frame stay in `buf`, which is grown by at most 64 KiB per
    /// call towards the frame's size.
    /// After an error the connection must be closed with
    /// [`ProtocolError::close_code`].
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        loop {
            let Some(h) = parse_header(buf).map_err(|_| ProtocolError::InvalidLength)? else {
                return Ok(None);
            };
            let opcode = h.opcode.ok_or(ProtocolError::ReservedOpcode)?;
            let mask = h.mask.ok_or(ProtocolError::Unmasked)?;
            if h.rsv23 {
                return Err(ProtocolError::ReservedBits);
            }
            // RSV1 means "compressed", only on the first frame of a data message.
            let first_data = matches!(opcode, OpCode::Text | OpCode::Binary);
            if h.rsv1 && !(first_data && self.inflater.is_some()) {
                return Err(ProtocolError::ReservedBits);
            }
            if opcode.is_control() {
                if !h.fin {
                    return Err(ProtocolError::FragmentedControl);
                }
                if h.payload_len > 125 {
                    return Err(ProtocolError::ControlTooLong);
                }
            } else {
                match (&self.partial, opcode) {
                    (None, OpCode::Continuation) => {
                        return Err(ProtocolError::UnexpectedContinuation)
                    }
                    (Some(_), OpCode::Text | OpCode::Binary) => {
                        return Err(ProtocolError::ExpectedContinuation)
                    }
                    _ => {}
                }
                let so_far = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
                if so_far + h.payload_len > self.max_message_size as u64 {
                    return Err(ProtocolError::MessageTooBig);
                }
            }
            let total = h.header_len + h.payload_len as usize;
            if buf.len() < total {
                // Grow with the bytes that arrive, not with what the header
                // announces: a header alone does not get a large allocation.
                buf.reserve((total - buf.len()).min(RESERVE_STEP));
                return Ok(None);
            }
            let mut payload = buf.split_to(total);
            let _ = payload.split_to(h.header_len);
            apply_mask(&mut payload, mask, 0);

            match opcode {
                OpCode::Ping => return Ok(Some(Message::Ping(payload.freeze()))),
                OpCode::Pong => return Ok(Some(Message::Pong(payload.freeze()))),
                OpCode::Close => return decode_close(payload.freeze()).map(Some),
                OpCode::Text | OpCode::Binary if h.fin && !h.rsv1 => {
                    let data = payload.freeze();
                    return Ok(Some(if opcode == OpCode::Text {
                        std::str::from_utf8(&data).map_err(|_| ProtocolError::InvalidUtf8)?;
                        Message::Text(data)
                    } else {
                        Message::Binary(data)
                    }));
                }
                OpCode::Text | OpCode::Binary => {
                    self.partial = Some(Box::new(Partial {
                        opcode,
                        compressed: h.rsv1,
                        data: payload,
                        utf8_valid: 0,
                    }));
                }
                OpCode::Continuation => {
                    let p = self.partial.as_mut().expect("checked above");
                    if p.data.is_empty() {
                        p.data = payload;
                    } else {
                        p.data.extend_from_slice(&payload);
                    }
                }
            }
            let p = self.partial.as_mut().expect("a data frame was just stored");
            if p.opcode == OpCode::Text && !p.compressed {
                // Fail fast on invalid UTF-8 without waiting for the last fragment.
                p.utf8_valid = check_utf8_prefix(&p.data, p.utf8_valid, h.fin)?;
            }
            if h.fin {
                let p = self.partial.take().expect("present");
                return self.finish(*p).map(Some);
            }
        }
    }

    fn finish(&mut self, p: Partial) -> Result<Message, ProtocolError> {
        let data = if p.compressed {
            let inflater = self.inflater.as_mut().ok_or(ProtocolError::ReservedBits)?;
            let out = inflater
                .inflate(&p.data, self.max_message_size)
                .map_err(|e| match e {
                    InflateError::Corrupt => ProtocolError::InvalidCompressed,
                    InflateError::TooLarge => ProtocolError::MessageTooBig,
                })?;
            Bytes::from(out)
        } else {
            p.data.freeze()
        };
        Ok(match p.opcode {
            OpCode::Text => {
                if p.compressed {
                    std::str::from_utf8(&data).map_err(|_| ProtocolError::InvalidUtf8)?;
                }
                Message::Text(data)
            }
            _ => Message::Binary(data),
        })
    }
}

/// Validates `data[from..]` as UTF-8; an incomplete sequence at the end is
/// allowed unless `last`. Returns how far the data is known valid.
fn check_utf8_prefix(data: &[u8], from: usize, last: bool) -> Result<usize, ProtocolError> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        Err(e) if e.error_len().is_none() && !last => Ok(from + e.valid_up_to()),
        Err(_) => Err(ProtocolError::InvalidUtf8),
    }
}

fn decode_close(payload: Bytes) -> Result<Message, ProtocolError> {
    match payload.len() {
        0 => Ok(Message::Close(None, Bytes::new())),
        1 => Err(ProtocolError::InvalidClose),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close::is_valid_received(code) {
                return Err(ProtocolError::InvalidClose);
            }
            let reason = payload.slice(2..);
            std::str::from_utf8(&reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Message::Close(Some(code), reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::deflate::deflate_message;

    /// Builds a masked client frame.
    fn client_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | (if rsv1 { 0x40 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        apply_mask(&mut p, mask, 0);
        out.extend_from_slice(&p);
        out
    }

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = vec![];
        while let Some(m) = d.decode(&mut buf)? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn single_frames() {
        let mut d = Decoder::new(1024, None);
        let mut bytes = client_frame(true, false, 1, b"hello");
        bytes.extend(client_frame(true, false, 2, &[1, 2, 3]));
        bytes.extend(client_frame(true, false, 9, b"p"));
        bytes.extend(client_frame(true, false, 8, &[0x03, 0xe8, b'o', b'k']));
        let msgs = decode_all(&mut d, &bytes).unwrap();
        assert_eq!(
            msgs,
            vec![
                Message::Text(Bytes::from_static(b"hello")),
                Message::Binary(Bytes::from_static(&[1, 2, 3])),
                Message::Ping(Bytes::from_static(b"p")),
                Message::Close(Some(1000), Bytes::from_static(b"ok")),
            ]
        );
    }

    /// Stateless between whole messages, not in the middle of a fragmented
    /// one, and never with an inflater.
    #[test]
    fn a_decoder_is_stateless_between_messages_without_deflate() {
        let mut d = Decoder::new(1024, None);
        assert!(d.is_stateless());
        let mut buf = BytesMut::from(&client_frame(false, false, 1, b"hel")[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert!(!d.is_stateless());
        buf.extend_from_slice(&client_frame(true, false, 0, b"lo"));
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Message::Text(Bytes::from_static(b"hello")))
        );
        assert!(d.is_stateless());
        assert!(!Decoder::new(1024, Some(DeflateParams::default())).is_stateless());
    }

    #[test]
    fn byte_at_a_time() {
        let mut d = Decoder::new(1 << 20, None);
        let mut bytes = client_frame(false, false, 1, "héllo ".as_bytes());
        bytes.extend(client_frame(true, false, 9, b""));
        bytes.extend(client_frame(true, false, 0, &vec![b'x'; 70_000]));
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for b in bytes {
            buf.extend_from_slice(&[b]);
            while let Some(m) = d.decode(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], Message::Ping(Bytes::new()));
        match &got[1] {
            Message::Text(t) => assert_eq!(t.len(), "héllo ".len() + 70_000),
            other => panic!("{other:?}"),
        }
        assert!(buf.is_empty());
        assert!(!d.in_message());
    }

    #[test]
    fn errors_map_to_close_codes() {
        let cases: Vec<(Vec<u8>, ProtocolError, u16)> = vec![
            (vec![0x81, 0x00], ProtocolError::Unmasked, 1002),
            (
                client_frame(true, false, 3, b""),
                ProtocolError::ReservedOpcode,
                1002,
            ),
            (
                client_frame(true, true, 1, b"a"),
                ProtocolError::ReservedBits,
                1002,
            ),
            (
                client_frame(false, false, 9, b""),
                ProtocolError::FragmentedControl,
                1002,
            ),
            (
                client_frame(true, false, 9, &[0; 126]),
                ProtocolError::ControlTooLong,
                1002,
            ),
            (
                client_frame(true, false, 0, b"a"),
                ProtocolError::UnexpectedContinuation,
                1002,
            ),
            (
                client_frame(true, false, 1, &[0xff]),
                ProtocolError::InvalidUtf8,
                1007,
            ),
            (
                client_frame(true, false, 8, &[3]),
                ProtocolError::InvalidClose,
                1002,
            ),
            (
                client_frame(true, false, 8, &[0x03, 0xed]),
                ProtocolError::InvalidClose,
                1002,
            ),
            (
                client_frame(true, false, 8, &[0x03, 0xe8, 0xff]),
                ProtocolError::InvalidUtf8,
                1007,
            ),
            (
                client_frame(true, false, 2, &[0; 2000]),
                ProtocolError::MessageTooBig,
                1009,
            ),
        ];
        for (bytes, err, code) in cases {
            let mut d = Decoder::new(1024, None);
            assert_eq!(decode_all(&mut d, &bytes), Err(err));
            assert_eq!(err.close_code(), code);
        }
        let mut d = Decoder::new(1024, None);
        let mut b = client_frame(false, false, 1, b"a");
        b.extend(client_frame(true, false, 1, b"b"));
        assert_eq!(
            decode_all(&mut d, &b),
            Err(ProtocolError::ExpectedContinuation)
        );
    }

    #[test]
    fn too_big_is_detected_from_the_header_alone() {
        let mut d = Decoder::new(1000, None);
        let frame = client_frame(true, false, 2, &[0; 5000]);
        let mut buf = BytesMut::from(&frame[..14]);
        assert_eq!(d.decode(&mut buf), Err(ProtocolError::MessageTooBig));
        // Across fragments too.
        let mut d = Decoder::new(1000, None);
        let mut b = client_frame(false, false, 2, &[0; 600]);
        b.extend(client_frame(true, false, 0, &[0; 600]));
        assert_eq!(decode_all(&mut d, &b), Err(ProtocolError::MessageTooBig));
    }

    #[test]
    fn invalid_utf8_fails_before_the_last_fragment() {
        let mut d = Decoder::new(1024, None);
        let b = client_frame(false, false, 1, &[b'a', 0xc0, 0x80]);
        assert_eq!(decode_all(&mut d, &b), Err(ProtocolError::InvalidUtf8));
        // A code point split across fragments is fine.
        let mut d = Decoder::new(1024, None);
        let e = "é".as_bytes();
        let mut b = client_frame(false, false, 1, &e[..1]);
        b.extend(client_frame(true, false, 0, &e[1..]));
        assert_eq!(
            decode_all(&mut d, &b).unwrap(),
            vec![Message::Text(Bytes::from("é"))]
        );
    }

    #[test]
    fn compressed_messages() {
        let params = DeflateParams {
            client_no_context_takeover: true,
            ..Default::default()
        };
        let mut d = Decoder::new(1 << 16, Some(params));
        let text = "compress me ".repeat(100);
        let z = deflate_message(text.as_bytes());
        let (a, b) = z.split_at(z.len() / 2);
        let mut bytes = client_frame(false, true, 1, a);
        bytes.extend(client_frame(true, false, 0, b));
        bytes.extend(client_frame(true, false, 1, b"plain"));
        let msgs = decode_all(&mut d, &bytes).unwrap();
        assert_eq!(
            msgs,
            vec![
                Message::Text(Bytes::from(text)),
                Message::Text(Bytes::from("plain"))
            ]
        );
        // RSV1 on a continuation frame is an error.
        let mut b = client_frame(false, true, 1, a);
        b.extend(client_frame(true, true, 0, b"x"));
        assert_eq!(decode_all(&mut d, &b), Err(ProtocolError::ReservedBits));
        // Inflating past the limit.
        let mut d = Decoder::new(100, Some(params));
        let z = deflate_message(&[b'a'; 10_000]);
        assert_eq!(
            decode_all(&mut d, &client_frame(true, true, 2, &z)),
            Err(ProtocolError::MessageTooBig)
        );
    }
}
