//! Micro-benchmarks of the frame decoder: masked client frames of several
//! sizes, whole and fragmented, decoded from one buffer into messages (the
//! gateway's read path without the socket).
//!
//! `cargo bench -p switchboard-proto --bench decoder`

#![allow(missing_docs)]

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use switchboard_proto::ws::frame::{encode_client_frame, OpCode};
use switchboard_proto::ws::{Decoder, Message};

/// The largest message the benchmarks let through (the gateway's default).
const MAX_MESSAGE: usize = 1 << 20;

/// A masked client frame, as a browser sends it.
fn client_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    encode_client_frame(fin, opcode, payload, [0x12, 0x34, 0x56, 0x78])
}

/// Decodes every message of `wire`; returns how many there were.
fn decode_all(wire: &mut BytesMut) -> usize {
    let mut d = Decoder::new(MAX_MESSAGE, None);
    let mut n = 0;
    while let Some(m) = d.decode(wire).expect("valid frames") {
        black_box(&m);
        n += usize::from(matches!(m, Message::Text(_) | Message::Binary(_)));
    }
    n
}

fn decoder(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    // 100 text messages per buffer, as a read of a busy socket finds them.
    for size in [16usize, 64, 1024, 16 << 10] {
        let text = "x".repeat(size);
        let wire: Vec<u8> = (0..100)
            .flat_map(|_| client_frame(true, OpCode::Text, text.as_bytes()))
            .collect();
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("100 text x {size} B"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |w| assert_eq!(decode_all(w), 100),
                BatchSize::SmallInput,
            )
        });
    }
    // One 64 KiB binary message in 16 fragments.
    let part = vec![7u8; 4096];
    let wire: Vec<u8> = (0..16)
        .flat_map(|i| {
            client_frame(
                i == 15,
                if i == 0 {
                    OpCode::Binary
                } else {
                    OpCode::Continuation
                },
                &part,
            )
        })
        .collect();
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("64 KiB binary in 16 fragments", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&wire[..]),
            |w| assert_eq!(decode_all(w), 1),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, decoder);
criterion_main!(benches);
