//! Read buffers, borrowed per readable event and given back when empty.
//!
//! An idle connection holds no read buffer: its task takes one from this
//! per-thread pool when the socket is readable and returns it as soon as every
//! complete frame has been decoded. Only a connection in the middle of a frame
//! keeps its buffer until the rest arrives.

use bytes::BytesMut;
use std::cell::RefCell;

/// Size of a pooled read buffer.
pub(crate) const READ_BUF: usize = 8 << 10;

/// Buffers kept per worker thread (at most `POOL_MAX * READ_BUF` bytes idle).
/// 16 (from 128) keeps echo and fan-out throughput within noise and frees
/// memory that idle connections shared (docs/benchmarks.md).
const POOL_MAX: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Borrows an empty buffer.
pub(crate) fn take() -> BytesMut {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_BUF))
}

/// Returns a buffer. Oversized ones (grown for a large frame) are freed instead.
pub(crate) fn give(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() < READ_BUF / 2 || buf.capacity() > READ_BUF * 2 {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}
