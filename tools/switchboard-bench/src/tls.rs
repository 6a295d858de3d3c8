//! TLS for the `idle` scenario: the options that put the spawned gateway
//! behind TLS (`wss://` and an `https://` control API), and the client side
//! the workers and the coordinator use to reach it (rustls, ring provider).
//!
//! Every client handshake is a full one: session resumption is off, as for
//! clients arriving for the first time (or after a gateway restart, which
//! loses the gateway's session cache).

use clap::Args;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The test certificate of the server crate (for `localhost` and 127.0.0.1,
/// signed by [`FIXTURE_CA`]); paths relative to the workspace root.
const FIXTURE_CERT: &str = "crates/switchboard-server/tests/fixtures/tls/server-a.pem";
/// The key of [`FIXTURE_CERT`].
const FIXTURE_KEY: &str = "crates/switchboard-server/tests/fixtures/tls/server-a-key.pem";
/// The test CA that signed [`FIXTURE_CERT`].
const FIXTURE_CA: &str = "crates/switchboard-server/tests/fixtures/tls/ca.pem";

/// TLS options of a scenario.
#[derive(Debug, Clone, Args)]
pub(crate) struct TlsOpts {
    /// Speak TLS: the spawned gateway gets --tls-cert and --tls-key (both of
    /// its listeners then speak TLS), the clients connect to wss:// and the
    /// control API is read over https://. With --url, give a wss:// URL.
    #[arg(long)]
    pub(crate) tls: bool,

    /// Certificate chain (PEM) of the spawned gateway.
    #[arg(long, default_value = FIXTURE_CERT, value_name = "FILE", requires = "tls")]
    pub(crate) tls_cert: PathBuf,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, default_value = FIXTURE_KEY, value_name = "FILE", requires = "tls")]
    pub(crate) tls_key: PathBuf,

    /// CA certificate(s) (PEM) the clients trust.
    #[arg(long, default_value = FIXTURE_CA, value_name = "FILE", requires = "tls")]
    pub(crate) tls_ca: PathBuf,

    /// Name the gateway's certificate is checked against (SNI too).
    #[arg(
        long,
        default_value = "localhost",
        value_name = "NAME",
        requires = "tls"
    )]
    pub(crate) tls_server_name: String,
}

impl TlsOpts {
    /// The client side, `None` without `--tls`.
    pub(crate) fn client(&self) -> Result<Option<TlsClient>, String> {
        self.tls
            .then(|| TlsClient::load(&self.tls_ca, &self.tls_server_name))
            .transpose()
    }

    /// The `switchboard serve` arguments that turn TLS on (absolute paths),
    /// empty without `--tls`.
    pub(crate) fn serve_args(&self) -> Result<Vec<String>, String> {
        if !self.tls {
            return Ok(Vec::new());
        }
        Ok(vec![
            "--tls-cert".into(),
            absolute(&self.tls_cert)?,
            "--tls-key".into(),
            absolute(&self.tls_key)?,
        ])
    }

    /// The hidden `worker` arguments that make its clients speak TLS, empty
    /// without `--tls`.
    pub(crate) fn worker_args(&self) -> Result<Vec<String>, String> {
        if !self.tls {
            return Ok(Vec::new());
        }
        Ok(vec![
            "--tls-ca".into(),
            absolute(&self.tls_ca)?,
            "--tls-server-name".into(),
            self.tls_server_name.clone(),
        ])
    }
}

/// `path` made absolute (children may run elsewhere); fails if it does not exist.
fn absolute(path: &Path) -> Result<String, String> {
    std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .map_err(|e| {
            format!(
                "{}: {e} (the default TLS files are relative to the workspace root)",
                path.display()
            )
        })
}

/// A TLS client: the roots it trusts and the name it checks, shared by all
/// connections of a process.
#[derive(Debug, Clone)]
pub(crate) struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// Trusts the certificates of the PEM file `ca` and checks the server's
    /// certificate against `server_name`; offers ALPN `http/1.1`, no
    /// session resumption.
    pub(crate) fn load(ca: &Path, server_name: &str) -> Result<Self, String> {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|items| items.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("{}: no usable CA certificate", ca.display()));
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS client: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = Resumption::disabled();
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| format!("TLS server name {server_name:?}: {e}"))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The TLS handshake over a connected socket (the caller bounds it).
    pub(crate) async fn connect<S>(&self, tcp: S) -> std::io::Result<TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
    }

    /// A blocking TLS stream over a connected socket; the handshake happens
    /// at the first read or write (bounded by the socket's timeouts).
    pub(crate) fn connect_blocking(
        &self,
        tcp: std::net::TcpStream,
    ) -> Result<StreamOwned<ClientConnection, std::net::TcpStream>, String> {
        let conn = ClientConnection::new(self.config.clone(), self.server_name.clone())
            .map_err(|e| format!("TLS client: {e}"))?;
        Ok(StreamOwned::new(conn, tcp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixtures are found from the crate's folder, whatever the test's
    /// working directory.
    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
    }

    #[test]
    fn loads_the_fixture_ca_and_refuses_bad_input() {
        assert!(TlsClient::load(&fixture(FIXTURE_CA), "localhost").is_ok());
        assert!(TlsClient::load(&fixture(FIXTURE_CA), "not a name!").is_err());
        assert!(TlsClient::load(&fixture("no/such/ca.pem"), "localhost").is_err());
        // A key file holds no certificate.
        assert!(TlsClient::load(&fixture(FIXTURE_KEY), "localhost").is_err());
    }

    /// A full round trip against a rustls server holding the fixture
    /// certificate, through the async and the blocking client.
    #[test]
    fn handshakes_with_the_fixture_certificate() {
        let client = TlsClient::load(&fixture(FIXTURE_CA), "localhost").unwrap();
        let certs = CertificateDer::pem_file_iter(fixture(FIXTURE_CERT))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(fixture(FIXTURE_KEY)).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // Two connections: the async client's, then the blocking one's.
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut s = acceptor.accept(tcp).await.unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await.unwrap();
                s.write_all(&b).await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut s = client.connect(tcp).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut b = Vec::new();
            s.read_to_end(&mut b).await.unwrap();
            assert_eq!(b, b"ping");
        });
        use std::io::{Read, Write};
        let mut s = client
            .connect_blocking(std::net::TcpStream::connect(addr).unwrap())
            .unwrap();
        s.write_all(b"pong").unwrap();
        let mut b = Vec::new();
        s.read_to_end(&mut b).unwrap();
        assert_eq!(b, b"pong");
    }
}
