//! TLS terminated inside the connection's own task: the client's TCP socket
//! and a rustls session driven through rustls's unbuffered API, so the
//! caller owns every buffer.
//!
//! A [`TlsStream`] offers the calls a plain socket offers the connection
//! task (readiness, `try_read_buf`, `try_write`, `try_write_vectored`), over
//! plaintext. It keeps the task's promise for an idle connection: no
//! buffer is held between reads and writes, only the session (keys and
//! state). Buffers are borrowed from the per-thread pool
//! ([`super::pool`]) while bytes move, and kept only for
//!
//! - ciphertext the socket did not take yet (`out`): the stream reports it
//!   as not flushed ([`TlsStream::flushed`]), waiting for readiness adds
//!   write interest and sends it as the socket drains, and nothing new is
//!   encrypted before it is gone, so at most one write's worth waits;
//! - the start of a record whose end has not arrived (`incoming`);
//! - plaintext a caller's fixed-size buffer had no room for (`stash`),
//!   which makes the stream readable at once.
//!
//! One socket per TLS connection, no pump task, no local socket pair.

use bytes::{Buf, BufMut, BytesMut};
use parking_lot::Mutex;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;

/// Most plaintext encrypted by one write call (the ciphertext of one call
/// is what may wait for the socket).
const WRITE_CHUNK: usize = 64 << 10;

/// Room reserved per write beyond the plaintext: record headers, tags and
/// padding of up to five records (it grows if rustls asks for more).
const RECORD_OVERHEAD: usize = 5 * 64;

/// Why a TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The socket failed or closed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol (or asked for what is not offered).
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// A client's TLS connection, driven by the task that owns it.
#[derive(Debug)]
pub(crate) struct TlsStream {
    tcp: TcpStream,
    /// Locked by the owning task only (the stream is shared by reference
    /// across `.await` points, so it must be `Sync`); never contended.
    state: Mutex<State>,
}

struct State {
    conn: UnbufferedServerConnection,
    /// Ciphertext read but not yet a whole record.
    incoming: Option<BytesMut>,
    /// Ciphertext made but not yet taken by the socket.
    out: Option<BytesMut>,
    /// Plaintext decrypted that the reader had no room for.
    stash: Option<BytesMut>,
    /// The peer sent `close_notify`: reads return end of stream.
    peer_closed: bool,
    /// The session failed: every call fails.
    failed: bool,
    /// `close_notify` is queued: nothing more is encrypted.
    sent_close: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("incoming", &self.incoming.as_ref().map(|b| b.len()))
            .field("out", &self.out.as_ref().map(|b| b.len()))
            .field("stash", &self.stash.as_ref().map(|b| b.len()))
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

fn tls_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Runs the server side of a TLS handshake on `tcp` (the caller bounds
    /// it in time). Application data the client sent right behind its
    /// `Finished` is kept for the first read.
    pub(crate) async fn accept(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
    ) -> Result<Self, HandshakeError> {
        let mut state = State {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: None,
            out: None,
            stash: None,
            peer_closed: false,
            failed: false,
            sent_close: false,
        };
        let mut incoming = super::pool::take();
        let mut out = BytesMut::new();
        loop {
            let UnbufferedStatus { discard, state: s } =
                state.conn.process_tls_records(&mut incoming);
            let mut done = false;
            let mut read_more = false;
            let mut transmit = false;
            match s? {
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, &mut out)?,
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    transmit = true;
                }
                ConnectionState::BlockedHandshake => read_more = true,
                ConnectionState::WriteTraffic(_) | ConnectionState::ReadTraffic(_) => done = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
                }
                _ => return Err(rustls::Error::General("unexpected TLS state".into()).into()),
            }
            incoming.advance(discard);
            if transmit {
                write_all(&tcp, &out).await?;
                out.clear();
            }
            if done {
                break;
            }
            if read_more {
                read_some(&tcp, &mut incoming).await?;
            }
        }
        // Records already here (the client's first request, a ticket
        // request) are decrypted now, into the stash.
        state.incoming = Some(incoming);
        let mut stash = BytesMut::new();
        state.process(&mut stash)?;
        state.stash = (!stash.is_empty()).then_some(stash);
        state.settle_incoming();
        if !out.is_empty() {
            state.out = Some(out);
        }
        Ok(Self {
            tcp,
            state: Mutex::new(state),
        })
    }

    /// The client's TCP socket.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether every byte written has been taken by the socket.
    pub(crate) fn flushed(&self) -> bool {
        self.state.lock().out.is_none()
    }

    /// Readiness known without asking the socket: plaintext is stashed
    /// (or the peer has closed) and `interest` is readable.
    ///
    /// Waiting for readiness is split in three steps ([`Self::ready_now`],
    /// [`Self::interest`], [`Self::seen`]) around the socket's own wait, so
    /// that the connection task's future (what every idle connection costs)
    /// holds the same state for a TLS stream as for a plain socket.
    pub(crate) fn ready_now(&self, interest: Interest) -> Option<Ready> {
        let s = self.state.lock();
        ((s.stash.is_some() || s.peer_closed) && interest.is_readable()).then_some(Ready::READABLE)
    }

    /// What to wait on the socket for: `interest`, and writability while
    /// ciphertext waits for the socket (whatever `interest` is).
    pub(crate) fn interest(&self, interest: Interest) -> Interest {
        if self.state.lock().out.is_some() {
            interest | Interest::WRITABLE
        } else {
            interest
        }
    }

    /// After the socket reported `ready`: sends waiting ciphertext if it
    /// can, then says what of `interest` is ready (`None`: nothing yet,
    /// wait again). Write readiness is reported only once nothing waits.
    pub(crate) fn seen(&self, interest: Interest, ready: Ready) -> io::Result<Option<Ready>> {
        if ready.is_writable() {
            match self.flush_out() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let flushed = self.flushed();
        let mut seen = Ready::EMPTY;
        if interest.is_readable() {
            if ready.is_readable() {
                seen |= Ready::READABLE;
            }
            if ready.is_read_closed() {
                seen |= Ready::READ_CLOSED;
            }
        }
        if interest.is_writable() && flushed {
            if ready.is_writable() {
                seen |= Ready::WRITABLE;
            }
            if ready.is_write_closed() {
                seen |= Ready::WRITE_CLOSED;
            }
        }
        if ready.is_error() {
            seen |= Ready::ERROR;
        }
        Ok((!seen.is_empty()).then_some(seen))
    }

    /// Polls for read readiness: at once with plaintext stashed (or the
    /// peer closed), else the socket's.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ready_now(Interest::READABLE).is_some() {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }

    /// Polls for write readiness: sends waiting ciphertext as the socket
    /// takes it, ready once none is left.
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.tcp.poll_write_ready(cx))?;
            match self.flush_out() {
                Ok(()) => return Poll::Ready(Ok(())),
                // Readiness was cleared: the next poll registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads the plaintext that is there without waiting: `WouldBlock` when
    /// the socket has nothing (more) and no whole record is buffered, `0`
    /// at the end of the stream.
    pub(crate) fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        let mut s = self.state.lock();
        s.check()?;
        loop {
            if let Some(stash) = s.stash.as_mut() {
                let n = stash.len().min(buf.remaining_mut());
                if n == 0 {
                    return Ok(0);
                }
                buf.put_slice(&stash[..n]);
                stash.advance(n);
                if stash.is_empty() {
                    s.stash = None;
                }
                return Ok(n);
            }
            if s.peer_closed {
                return Ok(0);
            }
            let incoming = s.incoming.get_or_insert_with(super::pool::take);
            if incoming.capacity() - incoming.len() < 1024 {
                incoming.reserve(super::pool::READ_BUF);
            }
            let read = self.tcp.try_read_buf(incoming);
            match read {
                Ok(0) => {
                    // The socket closed without close_notify: the end all the same.
                    s.settle_incoming();
                    s.peer_closed = true;
                    return Ok(0);
                }
                Ok(_) => {}
                Err(e) => {
                    s.settle_incoming();
                    return Err(e);
                }
            }
            let mut plain = super::pool::take();
            let processed = s.process(&mut plain);
            s.settle_incoming();
            if let Err(e) = processed {
                s.failed = true;
                return Err(e);
            }
            // Handshake messages the session answers (a key update).
            if s.out.is_some() {
                let _ = s.send_out(&self.tcp);
            }
            if plain.is_empty() {
                super::pool::give(plain);
                continue;
            }
            let n = plain.len().min(buf.remaining_mut());
            buf.put_slice(&plain[..n]);
            plain.advance(n);
            if plain.is_empty() {
                super::pool::give(plain);
            } else {
                s.stash = Some(plain);
            }
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// Encrypts and writes what fits without waiting; `WouldBlock` while
    /// ciphertext of an earlier write is still waiting for the socket.
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[IoSlice::new(buf)])
    }

    /// As [`Self::try_write`], for several buffers (encrypted together, up
    /// to [`WRITE_CHUNK`] bytes a call).
    pub(crate) fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut s = self.state.lock();
        s.check()?;
        if s.out.is_some() {
            s.send_out(&self.tcp)?;
            if s.out.is_some() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let taken = match bufs.iter().find(|b| !b.is_empty()) {
            // One buffer, or the first is big enough: no gathering copy.
            Some(first) if first.len() >= WRITE_CHUNK.min(total) => {
                let n = first.len().min(WRITE_CHUNK);
                s.encrypt(&first[..n])?;
                n
            }
            _ => {
                let mut plain = super::pool::take();
                for b in bufs {
                    let room = WRITE_CHUNK - plain.len();
                    if room == 0 {
                        break;
                    }
                    plain.extend_from_slice(&b[..b.len().min(room)]);
                }
                let n = plain.len();
                let encrypted = s.encrypt(&plain);
                super::pool::give(plain);
                encrypted?;
                n
            }
        };
        match s.send_out(&self.tcp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(taken)
    }

    /// Sends waiting ciphertext; `WouldBlock` if some is left.
    fn flush_out(&self) -> io::Result<()> {
        self.state.lock().send_out(&self.tcp)
    }

    /// Sends `close_notify` after what is waiting, as far as the socket
    /// takes it now.
    pub(crate) fn try_close_notify(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        s.check()?;
        if !s.sent_close {
            s.close_notify()?;
        }
        s.send_out(&self.tcp)
    }

    /// `AsyncRead` for the handshake's HTTP reader.
    pub(crate) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.state.lock().stash.is_none() {
                if let Err(e) = self.poll_pending_out(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            let unfilled = buf.initialize_unfilled();
            match self.try_read_buf(&mut &mut unfilled[..]) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.tcp.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// `AsyncWrite::poll_write`.
    pub(crate) fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.tcp.poll_write_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// `AsyncWrite::poll_flush`: every byte written is in the socket.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.flush_out() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.tcp.poll_write_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// `AsyncWrite::poll_shutdown`: `close_notify`, then the TCP write side.
    pub(crate) fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut s = self.state.lock();
            if !s.failed && !s.sent_close {
                s.close_notify()?;
            }
        }
        std::task::ready!(self.poll_flush(cx))?;
        Poll::Ready(socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write))
    }

    /// Sends waiting ciphertext without blocking on it; registers for write
    /// readiness when some is left (a reader waiting on the socket would
    /// otherwise leave it waiting).
    fn poll_pending_out(&self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            match self.flush_out() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match self.tcp.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => return Ok(()),
                    }
                }
                other => return other,
            }
        }
    }
}

impl Drop for TlsStream {
    /// What is still waiting, and `close_notify`, go out if the socket takes
    /// them at once (a plain socket's unsent bytes go the same way).
    fn drop(&mut self) {
        let _ = self.try_close_notify();
    }
}

impl State {
    fn check(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS session failed",
            ));
        }
        Ok(())
    }

    /// Hands an empty read buffer back to the pool.
    fn settle_incoming(&mut self) {
        if self.incoming.as_ref().is_some_and(|b| b.is_empty()) {
            if let Some(b) = self.incoming.take() {
                super::pool::give(b);
            }
        }
    }

    /// Handles every whole record in `incoming`: application data into
    /// `plain`, what the session answers (handshake messages, alerts) into
    /// `out`.
    fn process(&mut self, plain: &mut BytesMut) -> io::Result<()> {
        let Some(mut incoming) = self.incoming.take() else {
            return Ok(());
        };
        let result = self.process_in(&mut incoming, plain);
        self.incoming = Some(incoming);
        result
    }

    fn process_in(&mut self, incoming: &mut BytesMut, plain: &mut BytesMut) -> io::Result<()> {
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(incoming);
            let mut more = true;
            match state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        plain.extend_from_slice(record.map_err(tls_error)?.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, self.out.get_or_insert_with(super::pool::take))?;
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    more = false;
                }
                // Nothing whole is left to read.
                ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => {
                    more = false
                }
                _ => return Err(tls_error("unexpected TLS state")),
            }
            incoming.advance(discard);
            if !more {
                return Ok(());
            }
        }
    }

    /// Encrypts `data` onto `out`.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        if self.sent_close {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.with_writer(data.len() + RECORD_OVERHEAD, |w, room| {
            w.encrypt(data, room)
        })
    }

    /// Queues `close_notify` onto `out`.
    fn close_notify(&mut self) -> io::Result<()> {
        self.sent_close = true;
        self.with_writer(RECORD_OVERHEAD, |w, room| w.queue_close_notify(room))
    }

    /// Reaches the session's writing state (encoding what it has to send
    /// first) and runs `write` with `room` bytes free at the end of `out`.
    fn with_writer(
        &mut self,
        room: usize,
        mut write: impl FnMut(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
    ) -> io::Result<()> {
        let mut incoming = self.incoming.take().unwrap_or_default();
        let result = self.with_writer_in(&mut incoming, room, &mut write);
        self.incoming = (!incoming.is_empty() || incoming.capacity() > 0).then_some(incoming);
        self.settle_incoming();
        result
    }

    fn with_writer_in(
        &mut self,
        incoming: &mut BytesMut,
        mut room: usize,
        write: &mut impl FnMut(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
    ) -> io::Result<()> {
        let mut stash = BytesMut::new();
        let result = loop {
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(incoming);
            let mut written = false;
            match state.map_err(tls_error)? {
                ConnectionState::WriteTraffic(mut w) => {
                    let out = self.out.get_or_insert_with(super::pool::take);
                    let start = out.len();
                    out.resize(start + room, 0);
                    match write(&mut w, &mut out[start..]) {
                        Ok(n) => {
                            out.truncate(start + n);
                            written = true;
                        }
                        Err(EncryptError::InsufficientSize(need)) => {
                            out.truncate(start);
                            room = need.required_size;
                        }
                        Err(e) => {
                            out.truncate(start);
                            break Err(tls_error(e.to_string()));
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, self.out.get_or_insert_with(super::pool::take))?;
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                // Data that came with a handshake message; read later.
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        stash.extend_from_slice(record.map_err(tls_error)?.payload);
                    }
                }
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => break Err(io::ErrorKind::BrokenPipe.into()),
                _ => break Err(tls_error("the TLS session cannot send")),
            }
            incoming.advance(discard);
            if written {
                break Ok(());
            }
        };
        if !stash.is_empty() {
            match self.stash.as_mut() {
                Some(s) => s.extend_from_slice(&stash),
                None => self.stash = Some(stash),
            }
        }
        if self.out.as_ref().is_some_and(|o| o.is_empty()) {
            if let Some(o) = self.out.take() {
                super::pool::give(o);
            }
        }
        result
    }

    /// Writes waiting ciphertext; `WouldBlock` if the socket did not take
    /// it all. An emptied buffer goes back to the pool.
    fn send_out(&mut self, tcp: &TcpStream) -> io::Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        while !out.is_empty() {
            match tcp.try_write(out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => out.advance(n),
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        self.failed = true;
                    }
                    return Err(e);
                }
            }
        }
        if let Some(o) = self.out.take() {
            super::pool::give(o);
        }
        Ok(())
    }
}

/// Encodes a handshake record onto `out`, growing it as rustls asks.
fn encode(
    e: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    out: &mut BytesMut,
) -> io::Result<()> {
    let mut room = 1024;
    loop {
        let start = out.len();
        out.resize(start + room, 0);
        match e.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(need)) => {
                out.truncate(start);
                room = need.required_size;
            }
            Err(err) => {
                out.truncate(start);
                return Err(tls_error(err.to_string()));
            }
        }
    }
}

/// Writes all of `data` (during the handshake).
async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what the socket has, waiting for some (during the handshake).
async fn read_some(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<()> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(super::pool::READ_BUF);
    }
    loop {
        tcp.readable().await?;
        match tcp.try_read_buf(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    /// What an idle TLS connection holds beside a plain one's state: this
    /// box (the rustls session inline, no buffers), plus the session's keys
    /// and state on the heap (docs/benchmarks.md, "TLS connections").
    #[test]
    fn the_idle_tls_state_is_the_session_and_nothing_more() {
        let size = std::mem::size_of::<super::TlsStream>();
        let session = std::mem::size_of::<rustls::server::UnbufferedServerConnection>();
        eprintln!("TlsStream: {size} bytes, of which the rustls session {session}");
        assert!(size <= session + 160, "TlsStream is {size} bytes");
    }
}
