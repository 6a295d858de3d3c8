//! permessage-deflate (RFC 7692), checked on raw bytes (tungstenite 0.26 has
//! no deflate support): negotiated only when enabled, compressed client
//! messages reach the origin inflated, large server messages go out
//! compressed.

use switchboard_proto::origin::{ClosedBy, Payload};
use switchboard_proto::ws::deflate::{deflate_message, DeflateParams, Inflater};
use switchboard_test_util::*;

const OFFER: (&str, &str) = (
    "Sec-WebSocket-Extensions",
    "permessage-deflate; client_max_window_bits",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiated_when_enabled() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.permessage_deflate = true).await;
    let mut raw = RawWs::connect(gw.addr, "/", &[OFFER]).await;
    let ext = raw
        .response
        .header("sec-websocket-extensions")
        .expect("extension accepted")
        .to_owned();
    assert!(ext.starts_with("permessage-deflate"), "{ext}");
    assert!(ext.contains("server_no_context_takeover"), "{ext}");
    let id = origin.id_for(raw.local_addr).await;
    assert!(gw.connection(&id).await.unwrap().compression);

    // A compressed client message arrives at the origin inflated.
    let text = "compress me please ".repeat(40);
    raw.send_frame(true, true, OP_TEXT, &deflate_message(text.as_bytes()), true)
        .await;
    // Uncompressed messages are still fine.
    raw.send_text("plain").await;
    let m = origin.wait_messages(&id, 2).await;
    assert_eq!(m[0].payload, Payload::Text(text.clone()));
    assert_eq!(m[1].payload, Payload::Text("plain".into()));

    // A large message from the origin goes out compressed; a small one does not.
    let big = "abcdefgh".repeat(200);
    assert_eq!(gw.push_text(&id, &big).await, 200);
    assert_eq!(gw.push_text(&id, "tiny").await, 200);
    let f = raw.next_frame(WAIT).await.expect("frame");
    assert_eq!((f.opcode, f.rsv1), (OP_TEXT, true));
    assert!(f.payload.len() < big.len() / 4, "{} bytes", f.payload.len());
    let mut inflater = Inflater::new(DeflateParams {
        client_no_context_takeover: true,
        ..Default::default()
    });
    assert_eq!(
        inflater
            .inflate(&f.payload, 1 << 20)
            .expect("valid deflate"),
        big.as_bytes()
    );
    let f = raw.next_frame(WAIT).await.expect("frame");
    assert_eq!(
        (f.opcode, f.rsv1, f.payload.as_slice()),
        (OP_TEXT, false, &b"tiny"[..])
    );

    // An offer limiting the server window is accepted and the limit echoed;
    // the gateway's compressor (32 KiB window) then stays off for that client.
    let mut small = RawWs::connect(
        gw.addr,
        "/",
        &[(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; server_max_window_bits=10, permessage-deflate",
        )],
    )
    .await;
    let ext = small
        .response
        .header("sec-websocket-extensions")
        .expect("first offer taken");
    assert!(ext.contains("server_max_window_bits=10"), "{ext}");
    let small_id = origin.id_for(small.local_addr).await;
    assert_eq!(gw.push_text(&small_id, &big).await, 200);
    let f = small.next_frame(WAIT).await.expect("frame");
    assert_eq!(
        (f.opcode, f.rsv1, f.payload.as_slice()),
        (OP_TEXT, false, big.as_bytes())
    );
    // An offer the gateway cannot honour (window out of range) is declined.
    let only_bad = RawWs::connect(
        gw.addr,
        "/",
        &[(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; server_max_window_bits=7",
        )],
    )
    .await;
    assert_eq!(only_bad.response.header("sec-websocket-extensions"), None);
    drop((raw, small, only_bad));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_negotiated_when_disabled() {
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| c.permessage_deflate = false).await;
    let mut raw = RawWs::connect(gw.addr, "/", &[OFFER]).await;
    assert_eq!(raw.response.header("sec-websocket-extensions"), None);
    let id = origin.id_for(raw.local_addr).await;
    assert!(!gw.connection(&id).await.unwrap().compression);
    // Large messages go out plain.
    let big = "abcdefgh".repeat(200);
    assert_eq!(gw.push_text(&id, &big).await, 200);
    let f = raw.next_frame(WAIT).await.expect("frame");
    assert_eq!((f.rsv1, f.payload.as_slice()), (false, big.as_bytes()));
    // A compressed frame is then a protocol error.
    raw.send_frame(true, true, OP_TEXT, &deflate_message(b"sneaky"), true)
        .await;
    let (code, _, _) = raw.expect_close(WAIT).await;
    assert_eq!(code, 1002);
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.closed_by), (1002, ClosedBy::Gateway));
    gw.shutdown().await;
}
