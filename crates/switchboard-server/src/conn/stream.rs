//! The byte stream of one client connection: a TCP socket, or a TCP socket
//! with the TLS session the connection's task drives itself ([`TlsStream`]).
//!
//! The connection task is written against readiness and non-blocking
//! `try_*` calls, so that an idle connection holds no buffer; both kinds of
//! stream offer exactly those calls, and this enum forwards them.

use super::tls::TlsStream;
use bytes::{BufMut, BytesMut};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf, Ready};
use tokio::net::TcpStream;

/// A client connection's stream, as the handshake and the connection task see it.
#[derive(Debug)]
pub(crate) enum ClientStream {
    /// Plain TCP: the client's own socket.
    Tcp(TcpStream),
    /// TLS, terminated in the connection's task (boxed: the session's
    /// keys and buffers' slots are large beside a socket).
    Tls(Box<TlsStream>),
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
    /// The client's TCP socket.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Tcp(s) => s,
            ClientStream::Tls(s) => s.tcp(),
        }
    }

    /// The connection's heartbeat: gives back what the stream keeps only
    /// while busy (a TLS session's expanded keys; [`TlsStream::rest`]).
    pub(crate) fn rest(&self) {
        if let ClientStream::Tls(s) = self {
            s.rest();
        }
    }

    /// Whether everything written has reached the socket (a TLS stream may
    /// hold ciphertext the socket has not taken yet; a plain one never
    /// holds anything).
    pub(crate) fn flushed(&self) -> bool {
        match self {
            ClientStream::Tcp(_) => true,
            ClientStream::Tls(s) => s.flushed(),
        }
    }

    /// Waits until the stream is ready for `interest`. Behind TLS,
    /// ciphertext waiting for the socket is sent on the way, and write
    /// readiness is reported once it is gone (see [`TlsStream::seen`]).
    pub(crate) async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        loop {
            let (tcp, want) = match self {
                ClientStream::Tcp(s) => (s, interest),
                ClientStream::Tls(s) => {
                    if let Some(ready) = s.ready_now(interest) {
                        return Ok(ready);
                    }
                    (s.tcp(), s.interest(interest))
                }
            };
            let ready = tcp.ready(want).await?;
            match self {
                ClientStream::Tcp(_) => return Ok(ready),
                ClientStream::Tls(s) => {
                    if let Some(ready) = s.seen(interest, ready)? {
                        return Ok(ready);
                    }
                }
            }
        }
    }

    /// Waits until the stream is readable.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.ready(Interest::READABLE).await.map(|_| ())
    }

    /// Polls for read readiness (or the read side closed); only the task
    /// polling it is woken. Behind TLS, plaintext already decrypted is
    /// ready at once.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read_ready(cx))
    }

    /// Polls for write readiness; only the task polling it is woken.
    /// Behind TLS, ciphertext waiting for the socket is sent first, and the
    /// stream is ready once none is left.
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_write_ready(cx))
    }

    /// Reads what is there without waiting (`WouldBlock` if nothing).
    pub(crate) fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        each!(self, s => s.try_read_buf(buf))
    }

    /// [`ClientStream::try_read_buf`] into a `BytesMut`, for a reader that
    /// reads until `WouldBlock`. On a plain socket, a read that leaves room
    /// in `buf` emptied the socket's receive queue: the next call returns
    /// `WouldBlock` without a system call, until the poller reports more
    /// (tokio's `poll_read` does this; its `try_read_buf` does not). Each
    /// message read then costs one `recvfrom` instead of two.
    pub(crate) fn try_read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            ClientStream::Tcp(s) => {
                // No waker is needed: a caller that gets `WouldBlock` waits
                // with `readable` or `poll_read_ready`, which set their own.
                // Outside the task's cooperative budget, as `try_read_buf`
                // is: `Pending` then means only "nothing to read", never
                // "budget spent" (which `readable` would not wait out).
                let mut cx = Context::from_waker(Waker::noop());
                let read = tokio::task::unconstrained(std::future::poll_fn(|cx| {
                    Poll::Ready(tokio_util::io::poll_read_buf(
                        Pin::new(&mut *s),
                        cx,
                        &mut *buf,
                    ))
                }));
                match std::pin::pin!(read).poll(&mut cx) {
                    Poll::Ready(Poll::Ready(r)) => r,
                    Poll::Ready(Poll::Pending) | Poll::Pending => {
                        Err(io::ErrorKind::WouldBlock.into())
                    }
                }
            }
            ClientStream::Tls(s) => s.try_read_buf(buf),
        }
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
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => s.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => s.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => s.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => s.poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A connected pair of sockets: the gateway's end (ready to write) and
    /// the client's. The connection tests use it too.
    pub(in crate::conn) async fn pair() -> (ClientStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.writable().await.unwrap();
        (ClientStream::Tcp(server), client)
    }

    /// After a read that emptied the socket, data that comes later is
    /// still reported and read: skipping the read that would only say
    /// `WouldBlock` loses no wake-up.
    #[tokio::test]
    async fn data_after_a_short_read_is_still_read() {
        let (mut stream, mut client) = pair().await;
        let mut buf = BytesMut::with_capacity(1024);
        for part in [&b"abc"[..], b"defg", b"h"] {
            client.write_all(part).await.unwrap();
            let n = loop {
                tokio::time::timeout(Duration::from_secs(5), stream.readable())
                    .await
                    .expect("reported readable")
                    .unwrap();
                match stream.try_read_some(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(n, part.len());
            let e = stream.try_read_some(&mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
        assert_eq!(&buf[..], b"abcdefgh");
        drop(client);
        stream.readable().await.unwrap();
        assert_eq!(stream.try_read_some(&mut buf).unwrap(), 0, "then the end");
    }

    /// A task that spent its cooperative budget still reads what is
    /// there: `WouldBlock` means only "nothing to read", so a caller that
    /// then waits with `readable` (which the budget does not stop) cannot
    /// go round without end.
    #[tokio::test]
    async fn a_spent_budget_does_not_stop_a_read() {
        let (mut stream, mut client) = pair().await;
        client.write_all(b"abc").await.unwrap();
        stream.readable().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        let mut buf = BytesMut::with_capacity(1024);
        let read = std::future::poll_fn(|cx| {
            // Each message received spends a unit of the task's budget.
            while rx.poll_recv(cx).is_ready() {}
            assert!(!tokio::task::coop::has_budget_remaining());
            Poll::Ready(stream.try_read_some(&mut buf))
        })
        .await;
        assert_eq!(read.unwrap(), 3);
    }
}
