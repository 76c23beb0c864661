//! TLS of the gateway's device endpoint: the rustls server configuration that requires a
//! client certificate from our CA, the device identity taken from that certificate, and
//! the list of revoked device ids. Also the matching client configuration for agents and
//! tests.
//!
//! Nothing here touches a socket: the endpoint drives the handshake with tokio-rustls
//! (under its own timeout, in the connection's task), then calls [`peer_device_id`] and
//! [`RevocationList::is_revoked`] before it reads a single MQTT byte. The device id is
//! derived only from a certificate rustls has already verified; never from anything the
//! client sends afterwards.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use edge_agent::config::valid_device_id;
use edge_agent::model::DeviceId;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// The ALPN protocol id for MQTT over TLS. The server offers it but does not require it:
/// a client that sends no ALPN extension is served too.
pub const ALPN_MQTT: &[u8] = b"mqtt";

/// Protocol versions offered on both sides. TLS 1.2 stays for older device stacks.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Errors while building a TLS configuration from PEM files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be opened or read, holds malformed PEM, or (for a key file)
    /// holds no private key.
    #[error("cannot load {path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("{path} holds no certificate")]
    NoCertificates { path: PathBuf },
    /// A certificate in the CA file is not usable as a trust anchor.
    #[error("{path} is not a usable CA certificate: {source}")]
    BadCaCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built from the CA file.
    #[error("cannot verify client certificates with {path}: {source}")]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: VerifierBuilderError,
    },
    /// The certificate and key do not belong together, or the key type is unsupported.
    #[error("cannot use certificate {cert} with key {key}: {source}")]
    CertificateKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The crypto provider rejected the protocol versions; a build configuration bug.
    #[error("TLS protocol versions not supported by the crypto provider: {0}")]
    Protocol(#[source] rustls::Error),
}

/// Why a verified peer certificate does not give a device id.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The connection has no peer certificate: the handshake has not finished, or the
    /// configuration did not require client authentication.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The certificate is not DER X.509 (or has bytes after it).
    #[error("the peer certificate cannot be parsed: {reason}")]
    Malformed { reason: String },
    /// The subject has no common name (CN) attribute.
    #[error("the peer certificate's subject has no common name")]
    NoCommonName,
    /// The subject has more than one CN, so which one names the device is ambiguous.
    #[error("the peer certificate's subject has more than one common name")]
    MultipleCommonNames,
    /// The CN is not a UTF8/Printable/IA5/Numeric string, or not valid UTF-8.
    #[error("the peer certificate's common name is not text")]
    CommonNameNotText,
    /// The CN breaks the device id rule shared with the agent (1–128 characters of
    /// `A-Z a-z 0-9 . _ : -`), e.g. it is empty or holds an MQTT wildcard.
    #[error("the peer certificate's common name {cn:?} is not a valid device id")]
    InvalidDeviceId { cn: String },
}

/// Errors while loading a revocation list.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// The file could not be read (a missing file is an error: a typo in its path must not
    /// let revoked devices back in).
    #[error("cannot read the revocation list {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A line is not a valid device id; the whole file is refused.
    #[error("{path}:{line}: {entry:?} is not a valid device id")]
    InvalidEntry {
        path: PathBuf,
        line: usize,
        entry: String,
    },
}

/// Server side of the device endpoint: presents `server_cert` (+ key) and requires every
/// client to present a certificate that chains to the CA in `ca_cert`, is currently
/// valid and allows client authentication. TLS 1.3 and 1.2; ALPN `mqtt` offered, not
/// required.
pub fn server_config(
    ca_cert: &Path,
    server_cert: &Path,
    server_key: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let roots = root_store(ca_cert)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|source| TlsError::ClientVerifier {
            path: ca_cert.to_owned(),
            source,
        })?;
    let chain = load_certs(server_cert)?;
    let key = load_key(server_key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Protocol)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::CertificateKey {
            cert: server_cert.to_owned(),
            key: server_key.to_owned(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_MQTT.to_vec()];
    Ok(Arc::new(config))
}

/// Client side, for agents and tests: trusts only the CA in `ca_cert` for the server and
/// authenticates with the device certificate and key. Offers ALPN `mqtt`.
pub fn client_config(
    ca_cert: &Path,
    device_cert: &Path,
    device_key: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = root_store(ca_cert)?;
    let chain = load_certs(device_cert)?;
    let key = load_key(device_key)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Protocol)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsError::CertificateKey {
            cert: device_cert.to_owned(),
            key: device_key.to_owned(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_MQTT.to_vec()];
    Ok(Arc::new(config))
}

/// The device id of the peer of a finished handshake: the CN of its (verified) end-entity
/// certificate. Pass the `ServerConnection` from `tokio_rustls::server::TlsStream::get_ref`.
pub fn peer_device_id(conn: &CommonState) -> Result<DeviceId, IdentityError> {
    let cert = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(IdentityError::NoPeerCertificate)?;
    device_id_from_cert(cert)
}

/// The device id named by a certificate: its single subject CN, which must pass the same
/// charset rule as the agent's configured device id. Does not verify the certificate;
/// call it only on one rustls has verified.
pub fn device_id_from_cert(cert: &CertificateDer<'_>) -> Result<DeviceId, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(cert).map_err(|e| IdentityError::Malformed {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(IdentityError::Malformed {
            reason: format!("{} bytes after the certificate", rest.len()),
        });
    }
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next().ok_or(IdentityError::NoCommonName)?;
    if cns.next().is_some() {
        return Err(IdentityError::MultipleCommonNames);
    }
    let cn = cn.as_str().map_err(|_| IdentityError::CommonNameNotText)?;
    if !valid_device_id(cn) {
        return Err(IdentityError::InvalidDeviceId { cn: cn.to_owned() });
    }
    Ok(DeviceId(cn.to_owned()))
}

/// Device ids the endpoint refuses after the handshake, loaded from a text file and
/// reloadable while connections are served (share it in an `Arc`).
///
/// File format: one device id per line; `#` starts a comment (`#` cannot appear in a
/// device id, so a comment may follow an id on its line); blank lines and surrounding
/// whitespace are ignored. One invalid line refuses the whole file, so a typo is reported
/// instead of silently not revoking someone.
pub struct RevocationList {
    /// `None` for [`RevocationList::empty`]: nothing to load, nothing revoked.
    path: Option<PathBuf>,
    /// Replaced whole on reload; readers never see half a file.
    ids: RwLock<Arc<HashSet<String>>>,
}

impl RevocationList {
    /// A list that revokes nobody and has no file, for gateways configured without one.
    pub fn empty() -> Self {
        Self {
            path: None,
            ids: RwLock::new(Arc::new(HashSet::new())),
        }
    }

    /// Loads the list from `path`.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, RevocationError> {
        let path = path.into();
        let ids = read_list(&path)?;
        Ok(Self {
            path: Some(path),
            ids: RwLock::new(Arc::new(ids)),
        })
    }

    /// Re-reads the file and swaps the new set in. On error the previous set stays in
    /// force and the error is returned for the caller to log. Returns the number of ids
    /// now revoked.
    pub fn reload(&self) -> Result<usize, RevocationError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let ids = Arc::new(read_list(path)?);
        let len = ids.len();
        *self.ids.write().unwrap_or_else(PoisonError::into_inner) = ids;
        Ok(len)
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &DeviceId) -> bool {
        self.snapshot().contains(&id.0)
    }

    /// How many ids are revoked.
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// Whether nobody is revoked.
    pub fn is_empty(&self) -> bool {
        self.snapshot().is_empty()
    }

    /// The file the list is loaded from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The current set. A poisoned lock still holds a whole set (writers only swap an
    /// `Arc`), so it is safe to read through.
    fn snapshot(&self) -> Arc<HashSet<String>> {
        self.ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationList")
            .field("path", &self.path)
            .field("revoked", &self.len())
            .finish()
    }
}

fn read_list(path: &Path) -> Result<HashSet<String>, RevocationError> {
    let text = fs::read_to_string(path).map_err(|source| RevocationError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_list(&text, path)
}

fn parse_list(text: &str, path: &Path) -> Result<HashSet<String>, RevocationError> {
    let mut ids = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        if !valid_device_id(entry) {
            return Err(RevocationError::InvalidEntry {
                path: path.to_owned(),
                line: index + 1,
                entry: entry.to_owned(),
            });
        }
        ids.insert(entry.to_owned());
    }
    Ok(ids)
}

/// ring: pure Rust + asm, no C toolchain or cmake needed on small boxes (aws-lc needs both).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(ca_cert: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_cert)? {
        roots
            .add(cert)
            .map_err(|source| TlsError::BadCaCertificate {
                path: ca_cert.to_owned(),
                source,
            })?;
    }
    Ok(Arc::new(roots))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, DnValue, KeyPair};

    fn cert_with_subject(entries: &[(DnType, DnValue)]) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (ty, value) in entries {
            params.distinguished_name.push(ty.clone(), value.clone());
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn cn(value: &str) -> (DnType, DnValue) {
        (DnType::CommonName, DnValue::Utf8String(value.into()))
    }

    #[test]
    fn device_id_is_the_certificate_common_name() {
        let cert = cert_with_subject(&[(DnType::OrganizationName, "Acme".into()), cn("tv-1")]);
        assert_eq!(device_id_from_cert(&cert).unwrap(), DeviceId("tv-1".into()));
        let printable = cert_with_subject(&[(
            DnType::CommonName,
            DnValue::PrintableString("kiosk.7".try_into().unwrap()),
        )]);
        assert_eq!(
            device_id_from_cert(&printable).unwrap(),
            DeviceId("kiosk.7".into())
        );
    }

    #[test]
    fn a_certificate_without_common_name_has_no_device_id() {
        let cert = cert_with_subject(&[(DnType::OrganizationName, "Acme".into())]);
        assert!(matches!(
            device_id_from_cert(&cert),
            Err(IdentityError::NoCommonName)
        ));
    }

    #[test]
    fn a_certificate_with_two_common_names_is_ambiguous() {
        // rcgen keeps one value per attribute type, so make an O and turn its OID
        // (2.5.4.10) into the CN OID (2.5.4.3). The signature breaks, which does not
        // matter here: the id is read only from certificates rustls already verified.
        let cert = cert_with_subject(&[cn("a"), (DnType::OrganizationName, "b".into())]);
        let (o_oid, cn_oid) = ([6, 3, 0x55, 4, 10], [6, 3, 0x55, 4, 3]);
        let mut der = cert.to_vec();
        for i in 0..der.len() - o_oid.len() {
            if der[i..i + o_oid.len()] == o_oid {
                der[i..i + o_oid.len()].copy_from_slice(&cn_oid);
            }
        }
        let cert = CertificateDer::from(der);
        assert!(matches!(
            device_id_from_cert(&cert),
            Err(IdentityError::MultipleCommonNames)
        ));
    }

    #[test]
    fn common_names_that_break_the_device_id_rule_are_rejected() {
        let long = "x".repeat(129);
        for bad in ["", "a/+", "dev#1", "two words", "ünicode", long.as_str()] {
            let cert = cert_with_subject(&[cn(bad)]);
            let err = device_id_from_cert(&cert).unwrap_err();
            assert!(
                matches!(&err, IdentityError::InvalidDeviceId { cn } if cn == bad),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn a_common_name_that_is_not_a_string_is_rejected() {
        let cert = cert_with_subject(&[(
            DnType::CommonName,
            DnValue::BmpString(rcgen::string::BmpString::try_from("dev").unwrap()),
        )]);
        assert!(matches!(
            device_id_from_cert(&cert),
            Err(IdentityError::CommonNameNotText)
        ));
    }

    #[test]
    fn bytes_that_are_not_a_certificate_are_malformed() {
        for bytes in [&b""[..], b"\x30\x03abc", b"not der at all"] {
            let err = device_id_from_cert(&CertificateDer::from(bytes.to_vec())).unwrap_err();
            assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
        }
        let mut trailing = cert_with_subject(&[cn("dev")]).to_vec();
        trailing.push(0);
        let err = device_id_from_cert(&CertificateDer::from(trailing)).unwrap_err();
        assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
    }

    #[test]
    fn revocation_list_ignores_comments_blank_lines_and_whitespace() {
        let text = "# revoked devices\n\n  tv-1  \nkiosk:2 # stolen 2024-05\n\t# old: tv-0\n";
        let ids = parse_list(text, Path::new("revoked.txt")).unwrap();
        let mut ids: Vec<_> = ids.into_iter().collect();
        ids.sort();
        assert_eq!(ids, ["kiosk:2", "tv-1"]);
    }

    #[test]
    fn a_revocation_line_that_is_not_a_device_id_refuses_the_file_naming_the_line() {
        let err = parse_list("ok-1\nbad/id\n", Path::new("revoked.txt")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "revoked.txt:2: \"bad/id\" is not a valid device id"
        );
    }

    #[test]
    fn a_failed_reload_keeps_the_previous_list() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("revoked.txt");
        fs::write(&path, "tv-1\n").unwrap();
        let list = RevocationList::load(&path).unwrap();
        assert!(list.is_revoked(&DeviceId("tv-1".into())));

        fs::write(&path, "tv-1\nbad+\n").unwrap();
        assert!(matches!(
            list.reload(),
            Err(RevocationError::InvalidEntry { line: 2, .. })
        ));
        assert!(list.is_revoked(&DeviceId("tv-1".into())));

        fs::remove_file(&path).unwrap();
        assert!(matches!(list.reload(), Err(RevocationError::Read { .. })));
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn a_missing_revocation_file_is_an_error_not_an_empty_list() {
        let tmp = tempfile::tempdir().unwrap();
        let err = RevocationList::load(tmp.path().join("nope.txt")).unwrap_err();
        assert!(matches!(err, RevocationError::Read { .. }), "{err}");
    }

    #[test]
    fn the_empty_revocation_list_revokes_nobody_and_reloads_to_nothing() {
        let list = RevocationList::empty();
        assert!(!list.is_revoked(&DeviceId("tv-1".into())));
        assert_eq!(list.reload().unwrap(), 0);
        assert!(list.is_empty());
    }

    #[test]
    fn server_config_names_the_file_it_cannot_load() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing.pem");
        let err = server_config(&missing, &missing, &missing).unwrap_err();
        assert!(
            matches!(&err, TlsError::Pem { path, .. } if *path == missing),
            "{err}"
        );
        let empty = tmp.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = server_config(&empty, &missing, &missing).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err}");
    }

    #[test]
    fn a_server_key_that_does_not_match_the_certificate_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = crate::pki::init(tmp.path(), &[]).unwrap().dir;
        let err = server_config(&pki.ca_cert(), &pki.server_cert(), &pki.ca_key()).unwrap_err();
        assert!(matches!(err, TlsError::CertificateKey { .. }), "{err}");
        assert!(server_config(&pki.ca_cert(), &pki.server_cert(), &pki.server_key()).is_ok());
    }

    #[test]
    fn a_key_file_without_a_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = crate::pki::init(tmp.path(), &[]).unwrap().dir;
        let err = client_config(&pki.ca_cert(), &pki.server_cert(), &pki.ca_cert()).unwrap_err();
        assert!(
            matches!(
                &err,
                TlsError::Pem {
                    source: pem::Error::NoItemsFound,
                    ..
                }
            ),
            "{err}"
        );
    }
}
