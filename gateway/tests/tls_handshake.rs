//! Real mutual-TLS handshakes over loopback TCP between the gateway's server config and
//! device client configs, with certificates made by the dev PKI in a temp dir.

// Test helpers outside `#[test]` fns are not covered by clippy.toml's test allowance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use edge_agent::model::DeviceId;
use edge_gateway::pki::{self, PkiDir, PkiError};
use edge_gateway::tls::{self, RevocationList, ALPN_MQTT};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Every handshake must settle well within this; failing it means a hang, not slowness.
const DEADLINE: Duration = Duration::from_secs(10);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// What the server writes after a successful handshake, so the client can tell success
/// from a refusal that arrives after its own side of the handshake (TLS 1.3).
const GREETING: &[u8] = b"hello device";

/// What the server side saw: the device id and negotiated ALPN, or the handshake error.
type ServerSide = io::Result<(DeviceId, Option<Vec<u8>>)>;

fn new_pki() -> (tempfile::TempDir, PkiDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = pki::init(tmp.path(), &[]).unwrap().dir;
    (tmp, dir)
}

fn server_config(dir: &PkiDir) -> Arc<ServerConfig> {
    tls::server_config(&dir.ca_cert(), &dir.server_cert(), &dir.server_key()).unwrap()
}

fn device_config(dir: &PkiDir, id: &str) -> Arc<ClientConfig> {
    let id = DeviceId(id.into());
    tls::client_config(&dir.ca_cert(), &dir.device_cert(&id), &dir.device_key(&id)).unwrap()
}

fn roots(ca: &Path) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One connection: the server accepts a single TLS client and reports who it is; the
/// client connects to `name` and reads until the server closes.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> (ServerSide, io::Result<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut stream = TlsAcceptor::from(server).accept(tcp).await?;
        let conn = stream.get_ref().1;
        let id = tls::peer_device_id(conn).map_err(io::Error::other)?;
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        stream.write_all(GREETING).await?;
        stream.shutdown().await?;
        Ok((id, alpn))
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut stream = TlsConnector::from(client).connect(name, tcp).await?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await?;
        Ok(got)
    };
    let (server_side, client_side) = tokio::time::timeout(DEADLINE, async {
        let client_side = client_side.await;
        (server_task.await.unwrap(), client_side)
    })
    .await
    .expect("the handshake settles before the deadline");
    (server_side, client_side)
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// The rustls error inside an io::Error from tokio-rustls.
fn rustls_error(result: ServerSide) -> rustls::Error {
    let err = result.expect_err("the server refuses the handshake");
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err:?}"))
        .clone()
}

fn client_was_refused(client: io::Result<Vec<u8>>) {
    if let Ok(got) = client {
        assert_ne!(
            got, GREETING,
            "the client must not get past a refused handshake"
        );
    }
}

#[tokio::test]
async fn a_valid_device_certificate_handshakes_and_the_server_learns_its_id() {
    let (_tmp, dir) = new_pki();
    pki::issue_device(dir.root(), "tv-42", 30 * DAY).unwrap();

    let (server, client) = handshake(
        server_config(&dir),
        device_config(&dir, "tv-42"),
        localhost(),
    )
    .await;

    let (id, alpn) = server.unwrap();
    assert_eq!(id, DeviceId("tv-42".into()));
    assert_eq!(alpn.as_deref(), Some(ALPN_MQTT));
    assert_eq!(client.unwrap(), GREETING);
}

#[tokio::test]
async fn the_server_certificate_is_valid_for_127_0_0_1() {
    let (_tmp, dir) = new_pki();
    pki::issue_device(dir.root(), "dev", DAY).unwrap();
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());

    let (server, client) = handshake(server_config(&dir), device_config(&dir, "dev"), name).await;

    assert_eq!(server.unwrap().0, DeviceId("dev".into()));
    assert_eq!(client.unwrap(), GREETING);
}

#[tokio::test]
async fn alpn_is_optional_and_tls_1_2_is_served() {
    let (_tmp, dir) = new_pki();
    pki::issue_device(dir.root(), "old-stack", DAY).unwrap();
    let id = DeviceId("old-stack".into());
    let chain = CertificateDer::pem_file_iter(dir.device_cert(&id))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.device_key(&id)).unwrap();
    let client = ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots(&dir.ca_cert()))
        .with_client_auth_cert(chain, key)
        .unwrap();
    assert!(client.alpn_protocols.is_empty());

    let (server, client) = handshake(server_config(&dir), Arc::new(client), localhost()).await;

    let (got, alpn) = server.unwrap();
    assert_eq!(got, id);
    assert_eq!(alpn, None);
    assert_eq!(client.unwrap(), GREETING);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let (_tmp, dir) = new_pki();
    let client = ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&dir.ca_cert()))
        .with_no_client_auth();

    let (server, client) = handshake(server_config(&dir), Arc::new(client), localhost()).await;

    assert_eq!(rustls_error(server), rustls::Error::NoCertificatesPresented);
    client_was_refused(client);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let (_tmp, dir) = new_pki();
    let (_other_tmp, other) = new_pki();
    pki::issue_device(other.root(), "intruder", DAY).unwrap();
    // Trusts our server (so the client side is not what fails) but holds a device
    // certificate signed by the other CA.
    let id = DeviceId("intruder".into());
    let client = tls::client_config(
        &dir.ca_cert(),
        &other.device_cert(&id),
        &other.device_key(&id),
    )
    .unwrap();

    let (server, client) = handshake(server_config(&dir), client, localhost()).await;

    let err = rustls_error(server);
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{err:?}"
    );
    client_was_refused(client);
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let (_tmp, dir) = new_pki();
    let now = SystemTime::now();
    pki::issue_device_with(dir.root(), "lapsed", now - 30 * DAY, now - DAY).unwrap();

    let (server, client) = handshake(
        server_config(&dir),
        device_config(&dir, "lapsed"),
        localhost(),
    )
    .await;

    let err = rustls_error(server);
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
    client_was_refused(client);
}

#[tokio::test]
async fn a_server_certificate_cannot_log_in_as_a_device() {
    let (_tmp, dir) = new_pki();
    // Signed by the right CA, but for server authentication only.
    let client = tls::client_config(&dir.ca_cert(), &dir.server_cert(), &dir.server_key()).unwrap();

    let (server, client) = handshake(server_config(&dir), client, localhost()).await;

    let err = rustls_error(server);
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )
        ),
        "{err:?}"
    );
    client_was_refused(client);
}

#[tokio::test]
async fn a_revoked_device_is_detected_after_the_handshake_and_reload_lifts_it() {
    let (tmp, dir) = new_pki();
    pki::issue_device(dir.root(), "stolen-7", DAY).unwrap();
    let list_path = tmp.path().join("revoked.txt");
    std::fs::write(&list_path, "# stolen from the shop window\nstolen-7\n").unwrap();
    let revoked = RevocationList::load(&list_path).unwrap();

    let (server, client) = handshake(
        server_config(&dir),
        device_config(&dir, "stolen-7"),
        localhost(),
    )
    .await;

    // The handshake itself succeeds (the certificate is valid); the endpoint refuses
    // the device by consulting the list with the id from the certificate.
    let (id, _) = server.unwrap();
    client.unwrap();
    assert!(revoked.is_revoked(&id));
    assert!(!revoked.is_revoked(&DeviceId("tv-42".into())));

    std::fs::write(&list_path, "# found again\n").unwrap();
    assert_eq!(revoked.reload().unwrap(), 0);
    assert!(!revoked.is_revoked(&id));
}

#[test]
fn issue_device_refuses_an_id_with_mqtt_wildcards() {
    let (_tmp, dir) = new_pki();
    let err = pki::issue_device(dir.root(), "a/+", DAY).unwrap_err();
    assert!(
        matches!(&err, PkiError::InvalidDeviceId { id } if id == "a/+"),
        "{err}"
    );
    assert!(!dir.devices().join("a").exists());
}
