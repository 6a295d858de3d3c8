//! Micro-benchmark of channel fan-out's encode-and-queue step: one
//! publication is serialized as its native `message` push and encoded into
//! a frame once, then the same `Bytes` is queued on every subscriber's
//! outbound queue.
//!
//! The queue is a model of the gateway's per-connection outbound queue
//! (crate-private in `switchboard-server`, `conn` `Conn::push`): a
//! `parking_lot::Mutex` around a `VecDeque<Bytes>` with a byte count and a
//! bound, and a `tokio::sync::Notify` woken when the queue was empty. What is
//! measured is the cost per subscriber of sharing one encoded frame: a lock,
//! a reference-count increment, a push and a wake-up.
//!
//! `cargo bench -p switchboard-proto --bench fanout`

#![allow(missing_docs)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use switchboard_proto::native::Push;
use switchboard_proto::origin::Payload;
use switchboard_proto::ws::{encode_frame, OpCode};
use tokio::sync::Notify;

/// The gateway's default `max-outbound-bytes`.
const MAX_OUTBOUND: usize = 1 << 20;

/// A model of one connection's outbound queue.
#[derive(Default)]
struct Outbound {
    queue: Mutex<(VecDeque<Bytes>, usize)>,
    notify: Notify,
}

impl Outbound {
    /// Queues a frame under the byte bound; wakes the writer if it was idle.
    fn push(&self, frame: Bytes) -> bool {
        let mut q = self.queue.lock();
        if q.1 > 0 && q.1 + frame.len() > MAX_OUTBOUND {
            return false;
        }
        let was_empty = q.0.is_empty();
        q.1 += frame.len();
        q.0.push_back(frame);
        drop(q);
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Empties the queue (what the writer task does after its `writev`).
    fn clear(&self) {
        let mut q = self.queue.lock();
        q.0.clear();
        q.1 = 0;
    }
}

/// Encodes one publication once and queues it on every connection.
fn publish(conns: &[Outbound], offset: u64, text: &str) -> usize {
    let push = Push::Message {
        channel: "bench:fanout".into(),
        offset,
        epoch: "e1".into(),
        data: Payload::Text(text.into()),
    };
    let json = serde_json::to_vec(&push).expect("pushes serialize");
    let frame = encode_frame(OpCode::Text, &json);
    conns.iter().filter(|c| c.push(frame.clone())).count()
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode and queue");
    let text = "x".repeat(64);
    for n in [1_000usize, 19_000] {
        let conns: Vec<Outbound> = (0..n).map(|_| Outbound::default()).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n} subscribers, 64 B"), |b| {
            // Only the publication is timed; the queues are emptied between
            // iterations, as the writer tasks would.
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for i in 0..iters {
                    let t = Instant::now();
                    assert_eq!(publish(&conns, i, &text), n);
                    spent += t.elapsed();
                    conns.iter().for_each(Outbound::clear);
                }
                spent
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
