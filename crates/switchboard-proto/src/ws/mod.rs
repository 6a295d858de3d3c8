//! The WebSocket protocol (RFC 6455, RFC 7692) in the server role, sans-IO.
//!
//! The decoder works on a caller-owned `BytesMut`, so a connection that is idle
//! holds no buffer at all: the caller borrows one when the socket is readable
//! and gives it back when the decoder has consumed every complete frame.
//! Server frames are never masked, so an encoded frame is the same bytes for
//! every recipient and is shared as [`bytes::Bytes`].

pub mod close;
pub mod decoder;
pub mod deflate;
pub mod frame;
pub mod handshake;

pub use close::CloseCode;
pub use decoder::{Decoder, Message, ProtocolError};
pub use frame::{encode_frame, OpCode};
