//! TLS on both listeners, end to end: real rustls clients (WebSocket over
//! TLS, HTTPS to the control API) against a gateway started with the test
//! certificates of `fixtures/tls` (see its `gen.sh`); certificate reload
//! without restart; the minimum protocol version; and what plain clients
//! get from a TLS listener.

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use switchboard_proto::origin::Payload;
use switchboard_server::{Config, Gateway, GatewayError, TlsVersion};
use switchboard_test_util::{eventually, metric_value, TestGateway, TestOrigin, WsMessage, WAIT};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A fresh directory holding `cert.pem` and `key.pem`, copies of server
/// certificate `which` ("a" or "b"), so a test can overwrite them.
struct CertDir(PathBuf);

impl CertDir {
    fn new(test: &str, which: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("switchboard-tls-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let d = Self(dir);
        d.install(which);
        d
    }

    fn cert(&self) -> PathBuf {
        self.0.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.0.join("key.pem")
    }

    fn install(&self, which: &str) {
        std::fs::copy(fixture(&format!("server-{which}.pem")), self.cert()).expect("copy cert");
        std::fs::copy(fixture(&format!("server-{which}-key.pem")), self.key()).expect("copy key");
    }

    fn configure(&self, c: &mut Config) {
        c.tls_cert = Some(self.cert());
        c.tls_key = Some(self.key());
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The DER of fixture certificate `which`.
fn der_of(which: &str) -> Vec<u8> {
    CertificateDer::from_pem_file(fixture(&format!("server-{which}.pem")))
        .expect("fixture certificate")
        .to_vec()
}

/// A client config trusting the test CA only, limited to `versions`.
fn client_config(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    client_config_with(rustls::crypto::ring::default_provider(), versions)
}

/// [`client_config`] with the cipher suites (and the rest) of `provider`.
fn client_config_with(
    provider: rustls::crypto::CryptoProvider,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(fixture("ca.pem")).expect("CA"))
        .expect("add CA");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A TLS connection to `addr` as `localhost`, with the default versions.
async fn tls_connect(addr: std::net::SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_with(addr, rustls::DEFAULT_VERSIONS).await
}

async fn tls_connect_with(
    addr: std::net::SocketAddr,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_over(TcpStream::connect(addr).await?, versions).await
}

async fn tls_over(
    tcp: TcpStream,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(
        WAIT,
        TlsConnector::from(client_config(versions)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake within WAIT")
}

/// A TLS gateway whose origin echoes every message back, set for moving
/// bytes rather than for its limits: no rate limits, room for a whole
/// stream in the outbound queue (a debug-build client reads slower than the
/// origin echoes), one event per origin request (the test origin takes
/// bodies of up to 2 MB).
async fn echoing_gateway(certs: &CertDir) -> (TestOrigin, TestGateway) {
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| b.echo = true);
    let gw = TestGateway::with_origin(&origin, |c| {
        certs.configure(c);
        c.client_byte_rate = 0;
        c.client_message_rate = 0;
        c.max_outbound_bytes = 64 << 20;
        c.origin_batch_size = 1;
    })
    .await;
    (origin, gw)
}

/// The certificate the server presented on `stream`.
fn presented(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a server certificate")
        .to_vec()
}

/// A WebSocket over TLS to the gateway's client listener; also returns the
/// certificate it was shown and the local address (how the origin names it).
async fn wss(gw: &TestGateway) -> (Wss, Vec<u8>, std::net::SocketAddr) {
    let tls = tls_connect(gw.addr)
        .await
        .expect("TLS to the client listener");
    let cert = presented(&tls);
    let local = tls.get_ref().0.local_addr().expect("local addr");
    let url = format!("wss://localhost:{}/", gw.addr.port());
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("WebSocket handshake within WAIT")
        .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status(), 101);
    (ws, cert, local)
}

/// An HTTPS client trusting the test CA.
fn https() -> reqwest::Client {
    let ca = std::fs::read(fixture("ca.pem")).expect("CA");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA pem"))
        .timeout(WAIT)
        .build()
        .expect("https client")
}

/// The node's `/metrics` text, over HTTPS.
async fn metrics(api: &reqwest::Client, gw: &TestGateway) -> String {
    api.get(control_url(gw, "/metrics"))
        .send()
        .await
        .expect("metrics over HTTPS")
        .text()
        .await
        .expect("metrics body")
}

fn control_url(gw: &TestGateway, path: &str) -> String {
    format!("https://localhost:{}{}", gw.control.port(), path)
}

/// The next text message on `ws` (a whole socket or its read half),
/// skipping pings and pongs.
async fn next_text<S, E>(ws: &mut S) -> String
where
    S: futures_util::Stream<Item = Result<WsMessage, E>> + Unpin,
    E: std::fmt::Debug,
{
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn clients_and_the_control_api_speak_tls_and_plain_peers_get_nothing_through() {
    let certs = CertDir::new("both", "a");
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| certs.configure(c)).await;

    // A client over TLS reaches the origin, and the origin reaches it back
    // through the control API over HTTPS, a large message included (it
    // crosses the pump in many TLS records).
    let (mut ws, cert, local) = wss(&gw).await;
    assert_eq!(cert, der_of("a"));
    let id = origin.id_for(local).await;
    ws.send(WsMessage::text("hello over tls"))
        .await
        .expect("send");
    let got = origin.wait_messages(&id, 1).await;
    assert_eq!(got[0].payload, Payload::Text("hello over tls".into()));

    let api = https();
    let big = "x".repeat(300_000);
    for text in ["pushed over https", big.as_str()] {
        let resp = api
            .post(control_url(&gw, &format!("/v1/connections/{id}/messages")))
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await
            .expect("HTTPS to the control API");
        assert!(resp.status().is_success(), "{}", resp.status());
        assert_eq!(next_text(&mut ws).await, text);
    }
    let health = api
        .get(control_url(&gw, "/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    // The close handshake crosses the pump both ways.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("closed within WAIT")
        {
            Some(Ok(WsMessage::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("close over TLS: {e}"),
        }
    }
    let d = origin.wait_disconnect(&id).await;
    assert_eq!((d.code, d.reason.as_str()), (1000, "bye"), "{d:?}");

    // Plain WebSocket and plain HTTP to TLS listeners: no upgrade, no answer.
    let plain = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(gw.ws_url("/")))
        .await
        .expect("plain attempt ends within WAIT");
    assert!(
        plain.is_err(),
        "a plain WebSocket must not open on a TLS listener"
    );
    let plain_api = reqwest::Client::new()
        .get(format!("http://{}/healthz", gw.control))
        .timeout(WAIT)
        .send()
        .await;
    assert!(
        plain_api.is_err() || !plain_api.as_ref().unwrap().status().is_success(),
        "plain HTTP must not reach the control API: {plain_api:?}"
    );
    eventually(WAIT, "a failed TLS handshake counted", || async {
        let text = metrics(&api, &gw).await;
        metric_value(&text, "switchboard_handshakes_total{result=\"tls_failed\"}") >= 1.0
            && metric_value(&text, "switchboard_control_tls_handshake_failures_total") >= 1.0
    })
    .await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_connections_without_a_restart() {
    let certs = CertDir::new("reload", "a");
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        certs.configure(c);
        c.tls_reload_interval = Duration::from_millis(100);
    })
    .await;
    let (mut before, cert, local) = wss(&gw).await;
    assert_eq!(cert, der_of("a"));
    let id = origin.id_for(local).await;

    // Renewal: new files in place. New handshakes get b; the open
    // connection carries on with the session it has.
    certs.install("b");
    eventually(WAIT, "new handshakes to present certificate b", || async {
        presented(&tls_connect(gw.addr).await.expect("TLS")) == der_of("b")
    })
    .await;
    let (_after, cert, _) = wss(&gw).await;
    assert_eq!(cert, der_of("b"));
    let api = https();
    let resp = api
        .post(control_url(&gw, &format!("/v1/connections/{id}/messages")))
        .json(&serde_json::json!({ "text": "still here" }))
        .send()
        .await
        .expect("control API");
    assert!(resp.status().is_success());
    assert_eq!(next_text(&mut before).await, "still here");

    // A broken pair (a half-written renewal) is not loaded: b stays.
    std::fs::write(certs.cert(), "not a certificate").expect("write");
    eventually(WAIT, "the failed reload counted", || async {
        let text = metrics(&api, &gw).await;
        metric_value(&text, "switchboard_tls_reloads_total{result=\"failed\"}") >= 1.0
    })
    .await;
    assert_eq!(
        presented(&tls_connect(gw.addr).await.expect("TLS")),
        der_of("b")
    );
    let text = metrics(&api, &gw).await;
    assert_eq!(
        metric_value(&text, "switchboard_tls_reloads_total{result=\"reloaded\"}"),
        1.0
    );
}

#[tokio::test]
async fn tls_min_version_1_3_refuses_a_tls_1_2_client() {
    let certs = CertDir::new("versions", "a");
    let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

    let default = TestGateway::start(|c| certs.configure(c)).await;
    let s = tls_connect_with(default.addr, tls12)
        .await
        .expect("TLS 1.2 by default");
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    // The session carries a WebSocket both ways over TLS 1.2 too.
    let url = format!("wss://localhost:{}/", default.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, s)
        .await
        .expect("WebSocket over TLS 1.2");
    ws.send(WsMessage::Ping(b"tls12".to_vec().into()))
        .await
        .expect("ping");
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(WsMessage::Pong(p)))) => break assert_eq!(&p[..], b"tls12"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected the pong over TLS 1.2, got {other:?}"),
        }
    }

    let strict = TestGateway::start(|c| {
        certs.configure(c);
        c.tls_min_version = TlsVersion::V1_3;
    })
    .await;
    assert!(
        tls_connect_with(strict.addr, tls12).await.is_err(),
        "a TLS 1.2-only client must be refused with tls-min-version 1.3"
    );
    let s = tls_connect(strict.addr).await.expect("TLS 1.3");
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[tokio::test]
async fn a_key_that_is_not_the_certificates_stops_startup() {
    let certs = CertDir::new("mismatch", "a");
    std::fs::copy(fixture("server-b-key.pem"), certs.key()).expect("copy");
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        control_listen: "127.0.0.1:0".parse().expect("addr"),
        tls_cert: Some(certs.cert()),
        tls_key: Some(certs.key()),
        ..Config::default()
    };
    match Gateway::bind(config).await {
        Err(GatewayError::Tls(e)) => assert!(e.to_string().contains("does not match"), "{e}"),
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("a mismatched key must stop startup"),
    }
}

#[tokio::test]
async fn an_address_over_its_handshake_rate_is_closed_before_any_tls_work() {
    let certs = CertDir::new("rate", "a");
    let gw = TestGateway::start(|c| {
        certs.configure(c);
        c.max_handshakes_per_ip = 1;
    })
    .await;
    // A burst of two, then the socket is closed before the TLS handshake.
    let _one = tls_connect(gw.addr).await.expect("first");
    let _two = tls_connect(gw.addr).await.expect("second");
    assert!(
        tls_connect(gw.addr).await.is_err(),
        "the third must be closed"
    );
    let api = https();
    let text = metrics(&api, &gw).await;
    assert_eq!(
        metric_value(
            &text,
            "switchboard_handshakes_total{result=\"too_many_handshakes\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(&text, "switchboard_handshakes_total{result=\"tls_failed\"}"),
        0.0,
        "no TLS handshake was attempted"
    );
}

/// Both directions of the pump at once, with messages larger than its
/// buffers: a client streams large messages while the origin echoes each
/// one back; every byte arrives, in order, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_cross_the_tls_pump_both_ways_at_once() {
    let certs = CertDir::new("bulk", "a");
    let (_origin, gw) = echoing_gateway(&certs).await;
    let (ws, _, _) = wss(&gw).await;
    let (mut tx, mut rx) = ws.split();
    const N: usize = 20;
    let message = |i: usize| format!("{i:04}-{}", "x".repeat(200_000 + i * 1_000));
    let sender = tokio::spawn(async move {
        for i in 0..N {
            tx.send(WsMessage::text(message(i))).await.expect("send");
        }
        tx
    });
    for i in 0..N {
        let got = next_text(&mut rx).await;
        assert!(got == message(i), "echo {i} differs ({} bytes)", got.len());
    }
    drop(sender.await.expect("sender"));
}

/// Reads `s` until the server closes it (at most `WAIT`).
async fn read_until_closed(s: &mut TlsStream<TcpStream>) -> (Vec<u8>, std::time::Instant) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return std::time::Instant::now(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .map(|t| (got, t))
    .expect("the TLS control listener closed the connection in time")
}

/// Issue 11 (3): the control listener over TLS has the same header, body
/// and idle timeouts and the same connection cap as over plain HTTP (over
/// the cap, a connection is closed before its handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_control_listener_times_out_slow_peers_and_caps_connections() {
    use tokio::io::AsyncWriteExt;
    let certs = CertDir::new("control-limits", "a");
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| {
        certs.configure(c);
        c.control_header_timeout = Duration::from_millis(300);
        c.control_body_timeout = Duration::from_millis(300);
        c.control_idle_timeout = Duration::from_millis(300);
        c.control_max_connections = 3;
    })
    .await;
    let json_answer = |got: &[u8]| {
        let text = String::from_utf8_lossy(got).to_string();
        let (head, body) = text.split_once("\r\n\r\n").expect("an answer");
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let v: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        (status, v["code"].as_str().unwrap_or_default().to_owned())
    };

    // A half-sent head: 408 request_timeout, closed.
    let mut s = tls_connect(gw.control).await.expect("TLS");
    let start = std::time::Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut s).await;
    assert_eq!(json_answer(&got), (408, "request_timeout".into()));
    assert!(closed - start < Duration::from_secs(2));

    // A body shorter than its Content-Length: 408 request_timeout, closed.
    let mut s = tls_connect(gw.control).await.expect("TLS");
    s.write_all(
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"messages\"",
    )
    .await
    .unwrap();
    let (got, _) = read_until_closed(&mut s).await;
    assert_eq!(json_answer(&got), (408, "request_timeout".into()));

    // Silent after the handshake, and idle after an answer: closed.
    let mut silent = tls_connect(gw.control).await.expect("TLS");
    let mut idle = tls_connect(gw.control).await.expect("TLS");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_until_closed(&mut idle).await;
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{got:?}"
    );
    let (got, _) = read_until_closed(&mut silent).await;
    assert!(got.is_empty());

    // Over the cap: no handshake at all (once the slots of the connections
    // closed above are free again).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| tls_connect(gw.control)))
        .await
        .into_iter()
        .map(|r| r.expect("TLS within the cap"))
        .collect();
    assert!(
        tls_connect(gw.control).await.is_err(),
        "a connection over the cap gets no handshake"
    );
    drop(held);
    let api = https();
    eventually(WAIT, "a freed control slot", || async {
        api.get(control_url(&gw, "/healthz")).send().await.is_ok()
    })
    .await;
    let text = metrics(&api, &gw).await;
    for (reason, at_least) in [
        ("header_timeout", 2.0),
        ("body_timeout", 1.0),
        ("idle_timeout", 1.0),
        ("over_capacity", 1.0),
    ] {
        let got = metric_value(
            &text,
            &format!("switchboard_control_refusals_total{{reason=\"{reason}\"}}"),
        );
        assert!(got >= at_least, "{reason}: {got}");
    }
    gw.shutdown().await;
}

/// Sockets of this process that are Unix-domain sockets (a TLS pump's
/// local socket pair would be two of them per connection).
fn unix_sockets_held() -> usize {
    let unix = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    let inodes: std::collections::HashSet<&str> = unix
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(6))
        .collect();
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .filter(|ino| inodes.contains(ino.as_str()))
        .count()
}

/// Established TCP sockets whose local address is `addr` and whose remote
/// one is among `peers` (the gateway's end of these clients' connections;
/// a listener port reused from an earlier test may still have that test's
/// sockets).
fn established_on(addr: std::net::SocketAddr, peers: &[std::net::SocketAddr]) -> usize {
    // /proc/net/tcp writes an IPv4 address as a little-endian word.
    let hex = |a: &std::net::SocketAddr| {
        let std::net::IpAddr::V4(ip) = a.ip() else {
            panic!("IPv4 addresses only");
        };
        format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port())
    };
    let local = hex(&addr);
    let peers: Vec<String> = peers.iter().map(hex).collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && peers.iter().any(|p| p == f[2]) && f[3] == "01"
        })
        .count()
}

/// Issue 17 (1): TLS is terminated in the connection's own task, so a TLS
/// connection costs the gateway its TCP socket and nothing else: no local
/// socket pair, no second task. Twenty connections hold twenty sockets
/// (and every one of them works); closed, they hold none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_holds_one_socket_in_the_gateway() {
    const N: usize = 20;
    let certs = CertDir::new("one-socket", "a");
    let origin = TestOrigin::start(None).await;
    origin.behavior(|b| b.echo = true);
    let gw = TestGateway::with_origin(&origin, |c| certs.configure(c)).await;
    let unix_before = unix_sockets_held();
    let (mut clients, mut peers) = (Vec::new(), Vec::new());
    for _ in 0..N {
        let (ws, _, local) = wss(&gw).await;
        clients.push(ws);
        peers.push(local);
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(WsMessage::text(format!("hello {i}")))
            .await
            .expect("send");
        assert_eq!(next_text(ws).await, format!("hello {i}"));
    }
    assert_eq!(established_on(gw.addr, &peers), N, "one TCP socket each");
    let unix_now = unix_sockets_held();
    assert!(
        unix_now < unix_before + N,
        "TLS connections hold local sockets: {unix_before} before, {unix_now} with {N} open"
    );
    for mut ws in clients {
        ws.close(None).await.expect("close");
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    }
    // Generous: closing 20 handshakes on a loaded machine can take a while.
    eventually(WAIT * 4, "every socket closed", || async {
        established_on(gw.addr, &peers) == 0
    })
    .await;
}

/// The session answers what the client's TLS stack sends mid-stream: a
/// client that updates its traffic keys (asking the gateway to update its
/// own) keeps exchanging messages both ways, large and small, and a client
/// that stops reading while the gateway writes gets every byte, in order,
/// once it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_updates_and_a_stalled_reader_leave_the_tls_stream_intact() {
    let certs = CertDir::new("key-update", "a");
    let (_origin, gw) = echoing_gateway(&certs).await;
    // A small receive window: the gateway's writes soon stop fitting.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 << 10).expect("SO_RCVBUF");
    let tcp = socket.connect(gw.addr).await.expect("connect");
    let tls = tls_over(tcp, rustls::DEFAULT_VERSIONS).await.expect("TLS");
    let url = format!("wss://localhost:{}/", gw.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket over TLS");
    for i in 0..12 {
        if i % 4 == 3 {
            ws.get_mut()
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
        }
        let text = format!("{i}-{}", "k".repeat(i * 3_000));
        ws.send(WsMessage::text(text.clone())).await.expect("send");
        assert_eq!(next_text(&mut ws).await, text, "echo {i}");
    }
    // Stalled: the echoes pile up in the socket buffers and in the
    // gateway's queue (and as ciphertext the socket has not taken).
    const N: usize = 160;
    let message = |i: usize| format!("{i:03}-{}", "s".repeat(100_000));
    for i in 0..N {
        ws.send(WsMessage::text(message(i))).await.expect("send");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..N {
        assert!(next_text(&mut ws).await == message(i), "stalled echo {i}");
    }
}

/// Every cipher suite the gateway offers (ring's, TLS 1.3 and 1.2 with the
/// ECDSA test certificate) carries WebSocket messages both ways, small and
/// spanning several records, once the connection protects its own records.
#[tokio::test]
async fn every_offered_cipher_suite_carries_messages_both_ways() {
    let certs = CertDir::new("suites", "a");
    let (_origin, gw) = echoing_gateway(&certs).await;
    let mut tried = Vec::new();
    for suite in rustls::crypto::ring::DEFAULT_CIPHER_SUITES {
        let version = suite.version();
        let ecdsa = match suite {
            rustls::SupportedCipherSuite::Tls12(s) => s
                .sign
                .contains(&rustls::SignatureScheme::ECDSA_NISTP256_SHA256),
            rustls::SupportedCipherSuite::Tls13(_) => true,
        };
        if !ecdsa {
            continue;
        }
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![*suite],
            ..rustls::crypto::ring::default_provider()
        };
        let config = client_config_with(provider, &[version]);
        let tcp = TcpStream::connect(gw.addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let tls = tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
            .await
            .expect("TLS handshake within WAIT")
            .unwrap_or_else(|e| panic!("{:?}: {e}", suite.suite()));
        assert_eq!(tls.get_ref().1.negotiated_cipher_suite(), Some(*suite));
        let url = format!("wss://localhost:{}/", gw.addr.port());
        let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("WebSocket over TLS");
        for size in [5, 40_000] {
            let text = format!("{:?}-{}", suite.suite(), "x".repeat(size));
            ws.send(WsMessage::text(text.clone())).await.expect("send");
            assert_eq!(next_text(&mut ws).await, text, "{:?}", suite.suite());
        }
        ws.close(None).await.expect("close");
        tried.push(suite.suite());
    }
    assert_eq!(tried.len(), 6, "suites tried: {tried:?}");
}

/// A record that does not authenticate ends the session: the client is
/// sent the `bad_record_mac` alert, and the origin's `disconnect` says why.
#[tokio::test]
async fn a_forged_record_ends_the_connection_with_an_alert_and_a_reason() {
    use tokio::io::AsyncWriteExt;
    let certs = CertDir::new("forged", "a");
    let origin = TestOrigin::start(None).await;
    let gw = TestGateway::with_origin(&origin, |c| certs.configure(c)).await;
    let (mut ws, _, local) = wss(&gw).await;
    let id = origin.id_for(local).await;
    // Written on the session's TCP socket: an application-data record
    // whose tag is not the key's.
    let forged = [[23, 3, 3, 0, 40].as_slice(), &[0x5a; 40]].concat();
    ws.get_mut()
        .get_mut()
        .0
        .write_all(&forged)
        .await
        .expect("raw write");
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Err(e))) => assert!(format!("{e:?}").contains("BadRecordMac"), "{e:?}"),
        other => panic!("expected the bad_record_mac alert, got {other:?}"),
    }
    let d = origin.wait_disconnect(&id).await;
    assert_eq!(
        (d.code, d.reason.as_str(), d.closed_by),
        (
            1006,
            "TLS: a record did not authenticate",
            switchboard_proto::origin::ClosedBy::Network
        )
    );
}
