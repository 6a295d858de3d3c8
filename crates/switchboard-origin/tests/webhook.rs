//! `Verifier` against requests a real gateway signed: a tiny axum origin
//! records the raw headers and body of every request from a gateway run
//! with `--origin-secret`, and answers with `Answer` (echoing messages),
//! which the gateway must accept.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use futures_util::SinkExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard_origin::webhook::{
    parse_batch, Answer, Event, Payload, Reply, Verifier, WebhookError, SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
};
use switchboard_test_util::*;

const SECRET: &str = "webhook-secret-0f9a";

type Recorded = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// Records the request as received, then echoes every text message.
async fn record(
    State(seen): State<Recorded>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    seen.lock().unwrap().push((headers, body.clone()));
    let answer = match parse_batch(&body) {
        Ok(batch) => Answer::replies(batch.events.iter().filter_map(|e| match e {
            Event::Message(m) => Some(Reply {
                connection_id: m.connection_id.clone(),
                payload: m.payload.clone(),
            }),
            _ => None,
        })),
        Err(e) => Answer::reject(e.status(), e.to_string()),
    };
    (
        axum::http::StatusCode::from_u16(answer.status()).unwrap(),
        [("content-type", "application/json")],
        answer.body(),
    )
}

async fn recording_origin() -> (String, Recorded) {
    let seen: Recorded = Arc::default();
    let app = Router::new()
        .route("/hook", post(record))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_what_the_gateway_signed_and_refuses_tampering() {
    let (url, seen) = recording_origin().await;
    let gw = TestGateway::start(|c| {
        c.origin = Some(url);
        c.origin_secret = Some(SECRET.into());
    })
    .await;
    let mut ws = connect(&gw.ws_url("/hooked?room=1")).await;
    ws.send(WsMessage::text("signed hello")).await.unwrap();
    // The gateway took our `Answer` (the echo is its `replies`).
    assert_eq!(next_msg(&mut ws).await, WsMessage::text("signed hello"));

    let requests = seen.lock().unwrap().clone();
    assert!(requests.len() >= 2, "connect and message: {requests:?}");
    let verifier = Verifier::new(SECRET);
    let mut saw = (false, false);
    for (headers, body) in &requests {
        // As received: valid, by the header map and by the two strings.
        verifier.verify_headers(headers, body).unwrap();
        let ts = headers[TIMESTAMP_HEADER].to_str().unwrap();
        let sig = headers[SIGNATURE_HEADER].to_str().unwrap();
        verifier.verify(ts, sig, body).unwrap();
        let signed_at: u64 = ts.parse().unwrap();
        assert!(signed_at.abs_diff(now()) <= 5, "signed just now: {ts}");

        let batch = verifier.events(headers, body).unwrap();
        assert!(batch.unknown.is_empty());
        for e in &batch.events {
            match e {
                Event::Connect(c) => {
                    assert_eq!((c.path.as_str(), c.query.as_str()), ("/hooked", "room=1"));
                    assert_eq!(batch.connect(), Some(c));
                    saw.0 = true;
                }
                Event::Message(m) => {
                    assert_eq!(m.payload, Payload::Text("signed hello".into()));
                    saw.1 = true;
                }
                _ => {}
            }
        }

        // Tampered body: one byte changed, or a byte added.
        let mut changed = body.to_vec();
        let last = changed.len() - 2;
        changed[last] ^= 0x01;
        assert!(matches!(
            verifier.verify_headers(headers, &changed),
            Err(WebhookError::Mismatch)
        ));
        let mut longer = body.to_vec();
        longer.push(b' ');
        assert!(matches!(
            verifier.verify(ts, sig, &longer),
            Err(WebhookError::Mismatch)
        ));
        assert!(matches!(
            verifier.events(headers, &longer),
            Err(WebhookError::Mismatch)
        ));

        // Wrong secret.
        let e = Verifier::new("not-the-secret")
            .verify_headers(headers, body)
            .unwrap_err();
        assert!(matches!(e, WebhookError::Mismatch));
        assert_eq!(e.status(), 401);

        // Old: the same request replayed past the tolerance; or with a
        // tighter tolerance; or stamped in the future.
        assert!(matches!(
            verifier.verify_headers_at(headers, body, signed_at + 301),
            Err(WebhookError::Stale { timestamp, tolerance_secs: 300, .. }) if timestamp == signed_at
        ));
        verifier
            .verify_headers_at(headers, body, signed_at + 300)
            .unwrap();
        let strict = Verifier::new(SECRET).with_tolerance(Duration::from_secs(10));
        assert!(matches!(
            strict.verify_headers_at(headers, body, signed_at + 11),
            Err(WebhookError::Stale { .. })
        ));
        assert!(matches!(
            verifier.verify_headers_at(headers, body, signed_at - 301),
            Err(WebhookError::Stale { .. })
        ));
        // An old timestamp swapped into the header, signature kept.
        let mut old = headers.clone();
        old.insert(
            TIMESTAMP_HEADER,
            (signed_at - 600).to_string().parse().unwrap(),
        );
        assert!(matches!(
            verifier.verify_headers(&old, body),
            Err(WebhookError::Stale { .. })
        ));
        let mut shifted = headers.clone();
        shifted.insert(
            TIMESTAMP_HEADER,
            (signed_at - 1).to_string().parse().unwrap(),
        );
        assert!(matches!(
            verifier.verify_headers(&shifted, body),
            Err(WebhookError::Mismatch)
        ));
        // No signature at all.
        let mut unsigned = headers.clone();
        unsigned.remove(SIGNATURE_HEADER);
        assert!(matches!(
            verifier.verify_headers(&unsigned, body),
            Err(WebhookError::MissingHeader(SIGNATURE_HEADER))
        ));
    }
    assert_eq!(saw, (true, true), "a connect and a message were verified");
    drop(ws);
    gw.shutdown().await;
}
