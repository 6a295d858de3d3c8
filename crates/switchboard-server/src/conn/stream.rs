//! The byte stream of one client connection: a TCP socket, or (behind TLS)
//! the gateway's end of a local socket pair whose other end the TLS pump
//! (`tls`) holds.
//!
//! The connection task is written against readiness and non-blocking
//! `try_*` calls, so that an idle connection holds no buffer; both kinds of
//! socket offer exactly those calls, and this enum forwards them.

use bytes::BufMut;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf, Ready};
use tokio::net::{TcpStream, UnixStream};

/// A client connection's stream, as the handshake and the connection task see it.
#[derive(Debug)]
pub(crate) enum ClientStream {
    /// Plain TCP: the client's own socket.
    Tcp(TcpStream),
    /// TLS: plaintext to and from the pump that terminates TLS.
    Tls(UnixStream),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            ClientStream::Tcp($s) => $e,
            ClientStream::Tls($s) => $e,
        }
    };
}

impl ClientStream {
    /// Waits until the stream is ready for `interest`.
    pub(crate) async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        each!(self, s => s.ready(interest).await)
    }

    /// Waits until the stream is readable.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        each!(self, s => s.readable().await)
    }

    /// Polls for read readiness (or the read side closed); only the task
    /// polling it is woken.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read_ready(cx))
    }

    /// Polls for write readiness; only the task polling it is woken.
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_write_ready(cx))
    }

    /// Reads what is there without waiting (`WouldBlock` if nothing).
    pub(crate) fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        each!(self, s => s.try_read_buf(buf))
    }

    /// Writes what fits without waiting.
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        each!(self, s => s.try_write(buf))
    }

    /// Writes what fits of several buffers without waiting.
    pub(crate) fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        each!(self, s => s.try_write_vectored(bufs))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}
