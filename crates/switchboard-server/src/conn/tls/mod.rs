//! TLS terminated inside the connection's own task: rustls runs the
//! handshake through its unbuffered API (the caller owns every buffer), then
//! hands the traffic keys over and the connection protects its records
//! itself ([`record`]), so an established session keeps its keys and
//! nothing of rustls's session but its key schedule.
//!
//! A [`TlsStream`] offers the calls a plain socket offers the connection
//! task (readiness, `try_read_buf`, `try_write`, `try_write_vectored`), over
//! plaintext. It keeps the task's promise for an idle connection: no
//! buffer is held between reads and writes, only the record layer (keys and
//! sequence numbers). Buffers are borrowed from the per-thread pool
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

mod record;

use bytes::{Buf, BufMut, BytesMut};
use parking_lot::Mutex;
use record::{alert, Fatal, Opened, RecordLayer};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::ServerConfig;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;

/// Most plaintext encrypted by one write call (the ciphertext of one call
/// is what may wait for the socket).
const WRITE_CHUNK: usize = 64 << 10;

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
    records: RecordLayer,
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
        let mut conn = UnbufferedServerConnection::new(config)?;
        let mut incoming = super::pool::take();
        let mut out = BytesMut::new();
        // rustls is given whole records while the handshake lasts, one at a
        // time (more only while a handshake message spans them), and
        // nothing after it: every record behind the client's `Finished`
        // (its first request, a key update) is the record layer's, so
        // rustls's state is complete when it hands the keys over.
        let mut span = 1;
        loop {
            let handshaking = conn.is_handshaking();
            let (end, whole) = if handshaking {
                records_end(&incoming, span)
            } else {
                (0, true)
            };
            let UnbufferedStatus { discard, state: s } =
                conn.process_tls_records(&mut incoming[..end]);
            let mut done = false;
            let mut read_more = false;
            let mut transmit = false;
            let mut writable = false;
            match s? {
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, &mut out)?,
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    transmit = true;
                }
                ConnectionState::BlockedHandshake => read_more = true,
                ConnectionState::WriteTraffic(_) if !handshaking => done = true,
                ConnectionState::WriteTraffic(_) => writable = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
                }
                _ => return Err(rustls::Error::General("unexpected TLS state".into()).into()),
            }
            // Writable while the handshake lasts (a server that may send
            // before the client's `Finished`): wait for the client's next
            // record. Writable once it is over: the handshake's last record
            // was read; once more round, for what rustls sends after it
            // (tickets).
            read_more |= writable && conn.is_handshaking();
            incoming.advance(discard);
            if discard > 0 {
                span = 1;
            }
            if transmit {
                write_all(&tcp, &out).await?;
                out.clear();
            }
            if done {
                break;
            }
            if read_more {
                if discard == 0 && whole {
                    // A message spans records: give rustls the next one too.
                    span += 1;
                }
                if !records_end(&incoming, span).1 {
                    read_some(&tcp, &mut incoming).await?;
                }
            }
        }
        let (secrets, schedule) = conn.dangerous_into_kernel_connection()?;
        let records = RecordLayer::new(secrets, schedule)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut state = State {
            records,
            incoming: Some(incoming),
            out: (!out.is_empty()).then_some(out),
            stash: None,
            peer_closed: false,
            failed: false,
            sent_close: false,
        };
        // Records already here (the client's first request) are opened
        // now, into the stash.
        let mut stash = BytesMut::new();
        if let Err(e) = state.process(&mut stash) {
            // The alert the session owes, if the socket takes it.
            let _ = state.send_out(&tcp);
            return Err(e.into());
        }
        state.stash = (!stash.is_empty()).then_some(stash);
        state.settle_incoming();
        Ok(Self {
            tcp,
            state: Mutex::new(state),
        })
    }

    /// The client's TCP socket.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The connection's heartbeat: a direction used in at most one read or
    /// write since the last rest gives its expanded key back, so an idle
    /// session keeps only its keys' bytes ([`record`]).
    pub(crate) fn rest(&self) {
        self.state.lock().records.rest();
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
                // The alert the session owes goes out if the socket takes it.
                let _ = s.send_out(&self.tcp);
                super::pool::give(plain);
                return Err(e);
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
        let tcp = &self.tcp;
        let s = self.state.get_mut();
        if !s.failed && !s.sent_close {
            let _ = s.close_notify();
        }
        // A failed session's alert goes out the same way.
        let _ = s.send_out(tcp);
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

    /// Opens every whole record in `incoming`: application data into
    /// `plain`. A session that fails queues the alert it owes and fails
    /// every call.
    fn process(&mut self, plain: &mut BytesMut) -> io::Result<()> {
        let Some(mut incoming) = self.incoming.take() else {
            return Ok(());
        };
        let opened = self.records.open(&mut incoming, plain);
        self.incoming = Some(incoming);
        match opened {
            Ok(Opened::More) => Ok(()),
            Ok(Opened::PeerClosed) => {
                self.peer_closed = true;
                Ok(())
            }
            Err(fatal) => {
                let e = self.fail(fatal);
                self.settle_out();
                Err(e)
            }
        }
    }

    /// Encrypts `data` onto `out`.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        if self.sent_close {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut out = self.out.take().unwrap_or_else(super::pool::take);
        let sealed = self.records.seal_data(data, &mut out);
        self.out = Some(out);
        let result = sealed.map_err(|fatal| self.fail(fatal));
        self.settle_out();
        result
    }

    /// Queues `close_notify` onto `out`.
    fn close_notify(&mut self) -> io::Result<()> {
        self.sent_close = true;
        let mut out = self.out.take().unwrap_or_else(super::pool::take);
        let sealed = self.records.seal_alert(alert::CLOSE_NOTIFY, &mut out);
        self.out = Some(out);
        let result = sealed.map_err(|fatal| self.fail(fatal));
        self.settle_out();
        result
    }

    /// Ends the session: queues the alert it owes (the caller's next
    /// write of `out`, or the stream's drop, sends it) and fails every
    /// later call.
    fn fail(&mut self, fatal: Fatal) -> io::Error {
        if let (Some(description), false) = (fatal.alert, self.failed || self.sent_close) {
            let out = self.out.get_or_insert_with(super::pool::take);
            let _ = self.records.seal_alert(description, out);
            self.sent_close = true;
        }
        self.failed = true;
        tls_error(fatal)
    }

    /// Hands an empty write buffer back to the pool.
    fn settle_out(&mut self) {
        if self.out.as_ref().is_some_and(|o| o.is_empty()) {
            if let Some(o) = self.out.take() {
                super::pool::give(o);
            }
        }
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

/// Where the first `n` whole records in `buf` end, and whether there are
/// `n`; with none whole, the end of `buf` (rustls then asks for more).
fn records_end(buf: &[u8], n: usize) -> (usize, bool) {
    let mut end = 0;
    for _ in 0..n {
        match record::record_len(&buf[end..]) {
            Some(len) if end + len <= buf.len() => end += len,
            _ => return (if end == 0 { buf.len() } else { end }, false),
        }
    }
    (end, true)
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
    /// box (the record layer inline: the two directions' key bytes, IVs
    /// and sequence numbers, no expanded key and no buffer), and on TLS 1.3
    /// rustls's key schedule (docs/benchmarks.md, "TLS connections"). The
    /// box must fit jemalloc's 320-byte class.
    #[test]
    fn the_idle_tls_state_is_the_record_layer_and_nothing_more() {
        let size = std::mem::size_of::<super::TlsStream>();
        let records = std::mem::size_of::<super::RecordLayer>();
        let key = std::mem::size_of::<ring::aead::LessSafeKey>();
        let schedule = std::mem::size_of::<
            rustls::kernel::KernelConnection<rustls::server::ServerConnectionData>,
        >();
        eprintln!(
            "TlsStream: {size} bytes, of which the record layer {records}; \
             an expanded key {key}; the key schedule {schedule}"
        );
        assert!(size <= 320, "TlsStream is {size} bytes");
    }

    use super::TlsStream;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::SupportedProtocolVersion;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Client = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    /// A server config (the test certificate, keys handed over) and a
    /// client config trusting the test CA, both limited to `version`.
    fn pair_configs(
        version: &'static SupportedProtocolVersion,
    ) -> (rustls::ServerConfig, rustls::ClientConfig) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_file_iter(fixture("server-a.pem"))
            .expect("certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate");
        let key = PrivateKeyDer::from_pem_file(fixture("server-a-key.pem")).expect("key");
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(fixture("ca.pem")).expect("CA"))
            .expect("CA");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, client)
    }

    /// A gateway's TLS session and a rustls client's, over loopback TCP.
    async fn pair(version: &'static SupportedProtocolVersion) -> (TlsStream, Client) {
        let (server, client) = pair_configs(version);
        let (listener, addr) = listen().await;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (server, client) = tokio::join!(
            async {
                let (tcp, _) = listener.accept().await.expect("accept");
                TlsStream::accept(tcp, Arc::new(server)).await
            },
            async {
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let name = ServerName::try_from("localhost").expect("name");
                connector.connect(name, tcp).await
            }
        );
        (
            server.expect("server handshake"),
            client.expect("client handshake"),
        )
    }

    async fn send(stream: &TlsStream, data: &[u8]) -> std::io::Result<()> {
        let n = std::future::poll_fn(|cx| stream.poll_write(cx, data)).await?;
        assert_eq!(n, data.len());
        std::future::poll_fn(|cx| stream.poll_flush(cx)).await
    }

    #[tokio::test]
    async fn a_tls_1_3_sending_key_is_replaced_before_its_limit() {
        let (server, mut client) = pair(&rustls::version::TLS13).await;
        server.state.lock().records.set_limit(2);
        let mut sent = Vec::new();
        for i in 0..7 {
            let message = format!("message {i};");
            send(&server, message.as_bytes()).await.expect("write");
            sent.extend_from_slice(message.as_bytes());
            assert!(server.state.lock().records.sent_under_key() <= 2);
        }
        // The client follows each KeyUpdate and reads every record.
        let mut read = vec![0; sent.len()];
        client.read_exact(&mut read).await.expect("read");
        assert_eq!(read, sent);
        // And what it sends after is read with its unchanged key.
        client.write_all(b"still here").await.expect("client write");
        let mut buf = bytes::BytesMut::new();
        while buf.len() < 10 {
            server.tcp().readable().await.expect("readable");
            match server.try_read_buf(&mut buf) {
                Ok(n) => assert!(n > 0, "end of stream"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(&buf[..], b"still here");
    }

    #[tokio::test]
    async fn a_tls_1_2_session_ends_with_close_notify_at_its_limit() {
        let (server, mut client) = pair(&rustls::version::TLS12).await;
        let limit = server.state.lock().records.sent_under_key() + 2;
        server.state.lock().records.set_limit(limit);
        send(&server, b"one;").await.expect("first write");
        send(&server, b"two;").await.expect("second write");
        let refused = send(&server, b"three;").await.expect_err("past the limit");
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData);
        drop(server);
        let mut read = Vec::new();
        client
            .read_to_end(&mut read)
            .await
            .expect("a clean end: close_notify");
        assert_eq!(read, b"one;two;");
    }

    /// Raw bytes written under the client's session: the gateway answers
    /// with `alert` and fails the session.
    async fn refused_with(version: &'static SupportedProtocolVersion, raw: &[u8], alert: &str) {
        let (server, mut client) = pair(version).await;
        client.get_mut().0.write_all(raw).await.expect("raw write");
        let mut buf = bytes::BytesMut::new();
        let failed = loop {
            server.tcp().readable().await.expect("readable");
            match server.try_read_buf(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => break other,
            }
        };
        let error = failed.expect_err("the session fails");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert!(server.try_read_buf(&mut buf).is_err(), "and stays failed");
        let mut read = Vec::new();
        let seen = client.read_to_end(&mut read).await.expect_err("an alert");
        assert!(
            format!("{seen:?}").contains(alert),
            "expected {alert}, got {seen:?}"
        );
    }

    #[tokio::test]
    async fn records_the_protocol_does_not_allow_fail_the_session_with_their_alert() {
        let forged = [[23, 3, 3, 0, 24].as_slice(), &[0x5a; 24]].concat();
        refused_with(&rustls::version::TLS13, &forged, "BadRecordMac").await;
        refused_with(&rustls::version::TLS12, &forged, "BadRecordMac").await;
        let too_long = [23, 3, 3, 0x41, 0x01];
        refused_with(&rustls::version::TLS13, &too_long, "RecordOverflow").await;
        let unprotected_alert = [21, 3, 3, 0, 2, 2, 40];
        refused_with(
            &rustls::version::TLS13,
            &unprotected_alert,
            "UnexpectedMessage",
        )
        .await;
    }

    #[tokio::test]
    async fn a_direction_keeps_its_key_expanded_only_while_busy() {
        let (server, mut client) = pair(&rustls::version::TLS13).await;
        let expanded = || server.state.lock().records.expanded();
        // The handshake's last records were sealed in one call.
        server.rest();
        assert_eq!(expanded(), (false, false), "idle: key bytes only");
        send(&server, b"one;").await.expect("write");
        assert_eq!(
            expanded(),
            (false, false),
            "one write: expanded for it alone"
        );
        send(&server, b"two;").await.expect("write");
        assert_eq!(expanded(), (true, false), "a second write: kept");
        server.rest();
        assert_eq!(expanded(), (true, false), "busy since the last rest: kept");
        server.rest();
        assert_eq!(
            expanded(),
            (false, false),
            "quiet since the last rest: given back"
        );
        let mut read = [0; 8];
        client.read_exact(&mut read).await.expect("read");
        assert_eq!(&read, b"one;two;");
    }

    /// A blocking rustls client on its own thread, driven record by record
    /// (what tokio-rustls cannot do: write a key update behind `Finished`).
    struct RawClient {
        sock: std::net::TcpStream,
        conn: rustls::ClientConnection,
    }

    impl RawClient {
        fn connect(addr: std::net::SocketAddr) -> Self {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(fixture("ca.pem")).expect("CA"))
                .expect("CA");
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = ServerName::try_from("localhost").expect("name");
            let sock = std::net::TcpStream::connect(addr).expect("connect");
            let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
            Self { sock, conn }
        }

        /// Runs the handshake up to the client's `Finished`, queued, not sent.
        fn handshake_until_finished(&mut self) {
            while self.conn.is_handshaking() {
                self.flush();
                self.conn.read_tls(&mut self.sock).expect("read");
                self.conn.process_new_packets().expect("handshake");
            }
        }

        /// Sends all that is queued in one write.
        fn flush(&mut self) {
            let mut tls = Vec::new();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut tls).expect("write_tls");
            }
            std::io::Write::write_all(&mut self.sock, &tls).expect("write");
        }

        /// Reads until `want` has come (or the session fails).
        fn read_until(&mut self, want: &[u8]) -> Result<(), rustls::Error> {
            let mut got = Vec::new();
            while !got.ends_with(want) {
                if self.conn.read_tls(&mut self.sock).expect("read") == 0 {
                    return Err(rustls::Error::General("end of stream".into()));
                }
                self.conn.process_new_packets()?;
                let mut buf = [0; 64];
                match std::io::Read::read(&mut self.conn.reader(), &mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("reader: {e}"),
                }
            }
            Ok(())
        }
    }

    async fn listen() -> (tokio::net::TcpListener, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    async fn accepted(listener: &tokio::net::TcpListener) -> TlsStream {
        let (tcp, _) = listener.accept().await.expect("accept");
        let (server, _) = pair_configs(&rustls::version::TLS13);
        TlsStream::accept(tcp, Arc::new(server))
            .await
            .expect("server handshake")
    }

    async fn read_some(server: &TlsStream) -> std::io::Result<bytes::BytesMut> {
        let mut buf = bytes::BytesMut::new();
        loop {
            server.tcp().readable().await?;
            match server.try_read_buf(&mut buf) {
                Ok(_) => return Ok(buf),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    #[tokio::test]
    async fn a_key_update_asked_for_right_behind_finished_is_answered() {
        let (listener, addr) = listen().await;
        let client = std::thread::spawn(move || {
            let mut c = RawClient::connect(addr);
            c.handshake_until_finished();
            // Finished and the key update request in one segment.
            c.conn.refresh_traffic_keys().expect("key update");
            c.flush();
            c.read_until(b"hello")
        });
        let server = accepted(&listener).await;
        send(&server, b"hello").await.expect("write");
        let read = tokio::task::spawn_blocking(move || client.join().expect("client"))
            .await
            .expect("join");
        assert_eq!(read, Ok(()), "the client follows the gateway's new key");
    }

    #[tokio::test]
    async fn key_updates_are_answered_once_and_a_run_of_records_without_data_fails() {
        let (listener, addr) = listen().await;
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let client = std::thread::spawn(move || {
            let mut c = RawClient::connect(addr);
            c.handshake_until_finished();
            c.flush();
            for _ in 0..20 {
                c.conn.refresh_traffic_keys().expect("key update");
                c.flush();
            }
            std::io::Write::write_all(&mut c.conn.writer(), b"ping").expect("ping");
            c.flush();
            let pong = c.read_until(b"pong");
            wait.recv().expect("go");
            for _ in 0..40 {
                c.conn.refresh_traffic_keys().expect("key update");
                c.flush();
            }
            (pong, c.read_until(b"never"))
        });
        let server = accepted(&listener).await;
        let mut got = bytes::BytesMut::new();
        while got.len() < 4 {
            got.extend_from_slice(&read_some(&server).await.expect("read"));
        }
        assert_eq!(&got[..], b"ping");
        assert!(server.flushed(), "no answer queued before data is sent");
        send(&server, b"pong").await.expect("write");
        go.send(()).expect("go");
        let failed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match read_some(&server).await {
                    Ok(buf) => assert!(buf.is_empty(), "no data came"),
                    Err(e) => break e,
                }
            }
        })
        .await
        .expect("the session fails within 10 s");
        assert_eq!(failed.kind(), std::io::ErrorKind::InvalidData, "{failed}");
        drop(server);
        let (pong, after) = tokio::task::spawn_blocking(move || client.join().expect("client"))
            .await
            .expect("join");
        assert_eq!(pong, Ok(()), "one key update answers twenty requests");
        let alert = format!("{after:?}");
        assert!(alert.contains("UnexpectedMessage"), "{alert}");
    }
}
