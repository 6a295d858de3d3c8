//! The opening handshake as `switchboard-server` runs it (`read_head` and
//! `decide` in its `handshake.rs`): the request head is parsed from a buffer
//! that grows read by read, then validated as an upgrade, and the 101 answer is
//! built from what the client asked for.
//!
//! Input: the bytes a client sends before its first frame.
//!
//! Checks: no panic; a head that parses whole is not rejected when it arrives
//! in pieces (the gateway parses after every read); whatever the client put in
//! its headers, the 101 answer is one well-formed HTTP response head.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_proto::native;
use switchboard_proto::ws::handshake::{self as hs, HeadError};

fuzz_target!(|data: &[u8]| {
    let (req, len) = match hs::parse_request(data) {
        Ok(Some(done)) => done,
        Ok(None) | Err(HeadError::Malformed | HeadError::TooManyHeaders) => return,
    };
    assert!(len > 0 && len <= data.len());
    assert_eq!(
        hs::parse_request(&data[..len]),
        Ok(Some((req.clone(), len)))
    );
    // The same head cut short, as after an earlier read: incomplete, not bad.
    for cut in [len / 2, len - 1, len.saturating_sub(2)] {
        let got = hs::parse_request(&data[..cut]);
        assert_eq!(got, Ok(None), "prefix of {cut} of a {len}-byte head");
    }
    let Ok(upgrade) = hs::validate_upgrade(&req) else {
        return;
    };
    assert_eq!(hs::accept_key(&upgrade.key).len(), 28);
    if let Some(d) = upgrade.deflate {
        assert!(d
            .server_max_window_bits
            .is_none_or(|b| (8..=15).contains(&b)));
    }
    // Like `decide`: the first offered protocol the gateway speaks (here: the
    // native one or, standing in for a configured raw one, the client's first).
    let protocol = upgrade
        .protocols
        .iter()
        .find(|p| *p == native::SUBPROTOCOL)
        .or(upgrade.protocols.first());
    let ext = upgrade.deflate.map(|d| d.response_header());
    let answer =
        hs::switching_protocols(&upgrade.key, protocol.map(String::as_str), ext.as_deref());
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&answer) {
        Ok(httparse::Status::Complete(n)) => {
            assert_eq!(n, answer.len(), "bytes after the 101 head")
        }
        other => panic!("the 101 answer does not parse: {other:?}"),
    }
    assert_eq!(resp.code, Some(101));
    let expected = 3 + usize::from(protocol.is_some()) + usize::from(ext.is_some());
    assert_eq!(
        resp.headers.len(),
        expected,
        "header injected into the 101 answer"
    );
});
