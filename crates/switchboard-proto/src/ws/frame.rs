//! Frame headers: parsing (client → server, masked) and encoding (server → client, unmasked).

use bytes::{BufMut, Bytes, BytesMut};

/// A frame opcode (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// Continuation of a fragmented message.
    Continuation,
    /// First frame of a text message.
    Text,
    /// First frame of a binary message.
    Binary,
    /// Close control frame.
    Close,
    /// Ping control frame.
    Ping,
    /// Pong control frame.
    Pong,
}

impl OpCode {
    /// Decodes the low nibble of the first header byte; `None` for reserved opcodes.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// The opcode's wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Whether this is a control opcode (close, ping, pong).
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// RSV1: the "compressed" bit of permessage-deflate.
    pub rsv1: bool,
    /// RSV2 or RSV3 set (always a protocol error here: no extension uses them).
    pub rsv23: bool,
    /// The opcode, `None` if reserved.
    pub opcode: Option<OpCode>,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub payload_len: u64,
    /// Length of the header itself, in bytes.
    pub header_len: usize,
}

/// Error parsing a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A 64-bit length with the most significant bit set, or a length not in
    /// its minimal encoding is fine per RFC; only the MSB is an error.
    #[error("invalid 64-bit payload length")]
    InvalidLength,
}

/// Parses a frame header from the front of `buf`. `Ok(None)` means more bytes
/// are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, HeaderError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(HeaderError::InvalidLength);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        rsv23: b0 & 0x30 != 0,
        opcode: OpCode::from_u8(b0 & 0x0F),
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// XORs `data` with the masking key, starting at key position `offset % 4`.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut key = [0u8; 4];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[(offset + i) % 4];
    }
    // Word at a time: the compiler vectorises this loop.
    let word = u32::from_ne_bytes(key);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i];
    }
}

/// Writes an unmasked server frame header into `dst`.
pub fn write_header(dst: &mut BytesMut, fin: bool, rsv1: bool, opcode: OpCode, len: usize) {
    let b0 = (if fin { 0x80 } else { 0 }) | (if rsv1 { 0x40 } else { 0 }) | opcode.as_u8();
    dst.put_u8(b0);
    if len < 126 {
        dst.put_u8(len as u8);
    } else if len <= usize::from(u16::MAX) {
        dst.put_u8(126);
        dst.put_u16(len as u16);
    } else {
        dst.put_u8(127);
        dst.put_u64(len as u64);
    }
}

/// Encodes a complete, unfragmented server frame. The result is shared as-is by
/// every recipient of the same message.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    encode_frame_with(opcode, false, payload)
}

/// Like [`encode_frame`], with RSV1 (the permessage-deflate bit) as given.
pub fn encode_frame_with(opcode: OpCode, rsv1: bool, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    write_header(&mut buf, true, rsv1, opcode, payload.len());
    buf.extend_from_slice(payload);
    buf.freeze()
}

/// Encodes a frame as a client sends it, masked with `mask` (RFC 6455
/// §5.3). For clients, load generators and tests: the gateway's own frames
/// are never masked.
pub fn encode_client_frame(fin: bool, opcode: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(payload.len() + 14);
    write_header(&mut buf, fin, false, opcode, payload.len());
    buf[1] |= 0x80;
    buf.extend_from_slice(&mask);
    let start = buf.len();
    buf.extend_from_slice(payload);
    apply_mask(&mut buf[start..], mask, 0);
    buf.to_vec()
}

/// Encodes a close frame with a code and a reason (truncated to fit the 125-byte
/// control frame limit on a character boundary).
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(OpCode::Close, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_lengths() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
            let payload = vec![7u8; len];
            let f = encode_frame(OpCode::Binary, &payload);
            let h = parse_header(&f).unwrap().unwrap();
            assert_eq!(h.payload_len as usize, len);
            assert_eq!(h.header_len + len, f.len());
            assert!(h.fin && h.mask.is_none());
            assert_eq!(h.opcode, Some(OpCode::Binary));
        }
    }

    #[test]
    fn partial_header_needs_more() {
        let f = encode_frame(OpCode::Text, &[1u8; 300]);
        for cut in 0..4 {
            assert_eq!(parse_header(&f[..cut]).unwrap(), None);
        }
    }

    #[test]
    fn mask_is_involution_at_any_offset() {
        let orig: Vec<u8> = (0..=255u8).collect();
        for off in 0..4 {
            let mut d = orig.clone();
            apply_mask(&mut d, [1, 2, 3, 4], off);
            assert_ne!(d, orig);
            // Byte-by-byte reference.
            for (i, b) in d.iter().enumerate() {
                assert_eq!(*b, orig[i] ^ [1, 2, 3, 4][(off + i) % 4]);
            }
            apply_mask(&mut d, [1, 2, 3, 4], off);
            assert_eq!(d, orig);
        }
    }

    #[test]
    fn close_reason_truncated_on_char_boundary() {
        let reason = "é".repeat(100);
        let f = encode_close(1000, &reason);
        let h = parse_header(&f).unwrap().unwrap();
        assert!(h.payload_len <= 125);
        assert!(std::str::from_utf8(&f[h.header_len + 2..]).is_ok());
    }
}
