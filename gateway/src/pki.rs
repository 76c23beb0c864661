//! Dev PKI behind `edge-gateway certs`: a local CA, the gateway's server certificate and
//! device client certificates, made with rcgen so mutual TLS works on the first run
//! without openssl.
//!
//! Layout of a PKI directory (see [`PkiDir`]):
//!
//! ```text
//! <dir>/ca.pem  ca.key            the CA; every device certificate hangs off it
//! <dir>/server.pem  server.key    the gateway's endpoint certificate
//! <dir>/devices/<id>.pem  <id>.key
//! ```
//!
//! This module must never overwrite a certificate or key: re-running `init` keeps what is
//! there, and issuing a device twice is refused. It is a development CA, not a production
//! one: no CRLs (revocation is [`crate::tls::RevocationList`]), no HSM, keys are plain
//! PKCS#8 PEM protected only by file mode 0600.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_agent::config::valid_device_id;
use edge_agent::model::DeviceId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Subject CN of CAs made by [`init`], followed by 8 hex digits of the key identifier.
pub const CA_COMMON_NAME: &str = "edge-collector dev CA";
/// Subject CN of server certificates made by [`init`].
pub const SERVER_COMMON_NAME: &str = "edge-gateway";
/// Names every server certificate carries, before the ones the caller adds.
pub const DEFAULT_SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];
/// Lifetime of a new CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a new server certificate.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// `not_before` is set this far in the past so a verifier whose clock is a little behind
/// the issuer's accepts a certificate made a moment ago.
pub const NOT_BEFORE_SLACK: Duration = Duration::from_secs(3600);

/// Errors of the dev PKI. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The PKI directory or its `devices/` folder could not be created.
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A certificate or key file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A new certificate or key could not be written; a partial file has been removed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file a new certificate or key would go to exists already. Nothing is
    /// overwritten: remove it by hand to re-issue.
    #[error("{path} exists already; remove it to issue a new one")]
    Exists { path: PathBuf },
    /// One half of a certificate/key pair exists without the other, so it can neither
    /// be used nor safely replaced.
    #[error("{present} exists but {missing} does not; restore it or remove {present}")]
    IncompletePair { present: PathBuf, missing: PathBuf },
    /// `init` found a server certificate but no CA: whatever issued it is gone, and a new
    /// CA would not vouch for it.
    #[error("{path} exists but there is no CA beside it; remove the server certificate and key or restore the CA")]
    OrphanServerCert { path: PathBuf },
    /// A device certificate was requested from a directory without a CA (`init` not run).
    #[error("no CA at {path}; run `edge-gateway certs` first")]
    NoCa { path: PathBuf },
    /// The CA certificate or key on disk cannot be parsed or used for signing.
    #[error("cannot use the CA at {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// `ca.key` is not the key of `ca.pem`; certificates signed with it would not verify.
    #[error("{key} is not the private key of {cert}")]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },
    /// The existing server certificate cannot be parsed to check its names.
    #[error("cannot parse the server certificate {path}: {reason}")]
    BadServerCert { path: PathBuf, reason: String },
    /// The device id breaks the rule shared with the agent: 1–128 characters of
    /// `A-Z a-z 0-9 . _ : -` (it ends up in topic names and file names).
    #[error("{id:?} is not a valid device id: use 1-128 characters of A-Z a-z 0-9 . _ : -")]
    InvalidDeviceId { id: String },
    /// A server name is neither an IP address nor a DNS name.
    #[error("{name:?} is not a valid server name: use an IP address or a DNS name")]
    InvalidServerName { name: String },
    /// The requested validity is empty, reversed, or outside what X.509 can encode.
    #[error("invalid certificate validity: {reason}")]
    InvalidValidity { reason: String },
    /// rcgen failed to generate a key or to sign a certificate.
    #[error("cannot generate the {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

/// Where the files of a PKI directory live. Paths only; nothing is checked or created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiDir {
    root: PathBuf,
}

impl PkiDir {
    /// The layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The CA certificate, the trust anchor for both the gateway and the agents.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    /// The CA private key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// The gateway's server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.pem")
    }

    /// The gateway's server private key.
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }

    /// The folder of device certificates.
    pub fn devices(&self) -> PathBuf {
        self.root.join("devices")
    }

    /// A device's certificate. `id` is a checked [`DeviceId`], so it holds no `/`.
    pub fn device_cert(&self, id: &DeviceId) -> PathBuf {
        self.devices().join(format!("{id}.pem"))
    }

    /// A device's private key.
    pub fn device_key(&self, id: &DeviceId) -> PathBuf {
        self.devices().join(format!("{id}.key"))
    }
}

/// Whether `init` made a certificate/key pair or found it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairState {
    /// Generated and written by this call.
    Created,
    /// Already on disk and left untouched.
    Kept,
}

/// What [`init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOutcome {
    /// The directory's file layout.
    pub dir: PkiDir,
    /// What happened to `ca.pem`/`ca.key`.
    pub ca: PairState,
    /// What happened to `server.pem`/`server.key`.
    pub server: PairState,
    /// Requested server names that a kept server certificate does not carry. Clients
    /// connecting by these names will fail hostname verification until the server
    /// certificate is removed and `init` runs again. Always empty when created.
    pub missing_server_names: Vec<String>,
}

/// A device certificate written by [`issue_device`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFiles {
    /// The device id, also the certificate's subject CN.
    pub device_id: DeviceId,
    /// `devices/<id>.pem`.
    pub cert: PathBuf,
    /// `devices/<id>.key`, mode 0600.
    pub key: PathBuf,
    /// End of the certificate's validity.
    pub not_after: SystemTime,
}

/// Makes the CA and the server certificate in `dir` unless they exist.
///
/// The server certificate names `localhost`, `127.0.0.1` and `server_names` (IP addresses
/// become IP SANs, anything else a DNS SAN). Existing pairs are kept as they are; a kept
/// server certificate that lacks a requested name is reported in
/// [`InitOutcome::missing_server_names`], not replaced.
pub fn init(dir: &Path, server_names: &[String]) -> Result<InitOutcome, PkiError> {
    let names = server_names_with_defaults(server_names)?;
    let layout = PkiDir::new(dir);
    create_dir(layout.root())?;
    let now = OffsetDateTime::now_utc();

    let ca_exists = pair_exists(&layout.ca_cert(), &layout.ca_key())?;
    let server_exists = pair_exists(&layout.server_cert(), &layout.server_key())?;
    if !ca_exists && server_exists {
        return Err(PkiError::OrphanServerCert {
            path: layout.server_cert(),
        });
    }

    let ca_state = if ca_exists {
        PairState::Kept
    } else {
        let key = generate_key("CA key")?;
        let mut params = CertificateParams::default();
        // Two dev CAs with one name would make verifiers pick the wrong anchor and report
        // a bad signature instead of an unknown issuer; a key-derived suffix tells them
        // (and their operators) apart.
        let key_id: String = params
            .key_identifier(&key)
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        params.distinguished_name = common_name(&format!("{CA_COMMON_NAME} {key_id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, now, CA_VALIDITY)?;
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "CA certificate".into(),
                source,
            })?;
        write_pair(&layout.ca_cert(), &cert.pem(), &layout.ca_key(), &key)?;
        PairState::Created
    };

    let (server_state, missing_server_names) = if server_exists {
        let missing = missing_names(&layout.server_cert(), &names)?;
        (PairState::Kept, missing)
    } else {
        let ca = load_ca(&layout)?;
        let key = generate_key("server key")?;
        let mut params = CertificateParams::new(names).map_err(|source| PkiError::Generate {
            what: "server certificate".into(),
            source,
        })?;
        params.distinguished_name = common_name(SERVER_COMMON_NAME);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, now, SERVER_VALIDITY)?;
        let cert = params
            .signed_by(&key, &ca)
            .map_err(|source| PkiError::Generate {
                what: "server certificate".into(),
                source,
            })?;
        write_pair(
            &layout.server_cert(),
            &cert.pem(),
            &layout.server_key(),
            &key,
        )?;
        (PairState::Created, Vec::new())
    };

    Ok(InitOutcome {
        dir: layout,
        ca: ca_state,
        server: server_state,
        missing_server_names,
    })
}

/// Issues a client certificate for `device_id`, valid from now for `validity`.
///
/// The certificate's subject CN is the device id and its extended key usage is client
/// authentication; it is signed by the CA in `dir`, which must exist ([`init`]).
pub fn issue_device(
    dir: &Path,
    device_id: &str,
    validity: Duration,
) -> Result<DeviceFiles, PkiError> {
    let now = SystemTime::now();
    let not_before = now.checked_sub(NOT_BEFORE_SLACK).unwrap_or(UNIX_EPOCH);
    let not_after = now
        .checked_add(validity)
        .ok_or_else(|| PkiError::InvalidValidity {
            reason: format!("{validity:?} from now is beyond the end of time"),
        })?;
    issue_device_with(dir, device_id, not_before, not_after)
}

/// Issues a client certificate for `device_id` valid exactly from `not_before` to
/// `not_after`. Either may be in the past: an already expired certificate is useful to
/// test that the gateway refuses it.
pub fn issue_device_with(
    dir: &Path,
    device_id: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<DeviceFiles, PkiError> {
    if !valid_device_id(device_id) {
        return Err(PkiError::InvalidDeviceId {
            id: device_id.to_owned(),
        });
    }
    let id = DeviceId(device_id.to_owned());
    if not_after <= not_before {
        return Err(PkiError::InvalidValidity {
            reason: "not_after must be later than not_before".into(),
        });
    }

    let layout = PkiDir::new(dir);
    let (cert_path, key_path) = (layout.device_cert(&id), layout.device_key(&id));
    for path in [&cert_path, &key_path] {
        if exists(path)? {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    let ca = load_ca(&layout)?;

    let key = generate_key("device key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(device_id);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = to_x509_time(not_before)?;
    params.not_after = to_x509_time(not_after)?;
    let cert = params
        .signed_by(&key, &ca)
        .map_err(|source| PkiError::Generate {
            what: format!("certificate for device {id}"),
            source,
        })?;

    create_dir(&layout.devices())?;
    write_pair(&cert_path, &cert.pem(), &key_path, &key)?;
    Ok(DeviceFiles {
        device_id: id,
        cert: cert_path,
        key: key_path,
        not_after,
    })
}

/// `localhost`, `127.0.0.1`, then the caller's names, each once, each checked.
fn server_names_with_defaults(extra: &[String]) -> Result<Vec<String>, PkiError> {
    let mut names: Vec<String> = DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect();
    for name in extra {
        if !valid_server_name(name) {
            return Err(PkiError::InvalidServerName { name: name.clone() });
        }
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    Ok(names)
}

/// An IP address, or a DNS name (wildcards allowed) within the RFC 1035 length limit.
fn valid_server_name(name: &str) -> bool {
    name.parse::<IpAddr>().is_ok()
        || (!name.is_empty()
            && name.len() <= 253
            && !name.starts_with('.')
            && !name.ends_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '*')))
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn generate_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|source| PkiError::Generate {
        what: what.into(),
        source,
    })
}

fn set_validity(
    params: &mut CertificateParams,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(), PkiError> {
    let span = |d: Duration| {
        time::Duration::try_from(d).map_err(|_| PkiError::InvalidValidity {
            reason: format!("{d:?} is too long"),
        })
    };
    params.not_before = now - span(NOT_BEFORE_SLACK)?;
    params.not_after =
        now.checked_add(span(validity)?)
            .ok_or_else(|| PkiError::InvalidValidity {
                reason: format!("{validity:?} from now is beyond the end of time"),
            })?;
    Ok(())
}

/// Whole seconds, within the years X.509 can encode (the `time` crate's default range,
/// up to 9999, is a subset of GeneralizedTime's).
fn to_x509_time(t: SystemTime) -> Result<OffsetDateTime, PkiError> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(before) => i64::try_from(before.duration().as_secs()).ok().map(|s| -s),
    };
    secs.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| PkiError::InvalidValidity {
            reason: format!("{t:?} cannot be written in a certificate"),
        })
}

/// The CA of `layout`, checked to be a parseable certificate whose key is `ca.key`.
fn load_ca(layout: &PkiDir) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let (cert_path, key_path) = (layout.ca_cert(), layout.ca_key());
    if !pair_exists(&cert_path, &key_path)? {
        return Err(PkiError::NoCa { path: cert_path });
    }
    let bad = |path: &Path, reason: String| PkiError::BadCa {
        path: path.to_owned(),
        reason,
    };
    let key_pem = read_to_string(&key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
    let cert_der = read_cert_der(&cert_path).map_err(|reason| bad(&cert_path, reason))?;
    let (_, cert) =
        X509Certificate::from_der(&cert_der).map_err(|e| bad(&cert_path, e.to_string()))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(PkiError::CaKeyMismatch {
            cert: cert_path,
            key: key_path,
        });
    }
    Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| bad(&cert_path, e.to_string()))
}

/// Requested names (already defaulted and checked) that the server certificate at `path`
/// does not list as a SAN.
fn missing_names(path: &Path, wanted: &[String]) -> Result<Vec<String>, PkiError> {
    let bad = |reason: String| PkiError::BadServerCert {
        path: path.to_owned(),
        reason,
    };
    let der = read_cert_der(path).map_err(bad)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| bad(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let has = |name: &str| {
        let ip = name.parse::<IpAddr>().ok();
        sans.iter().any(|san| match san {
            GeneralName::DNSName(dns) => dns.eq_ignore_ascii_case(name),
            GeneralName::IPAddress(bytes) => ip.is_some() && ip_from_bytes(bytes) == ip,
            _ => false,
        })
    };
    Ok(wanted.iter().filter(|n| !has(n)).cloned().collect())
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The first certificate of a PEM file, as DER. Errors are reasons; callers add the path.
fn read_cert_der(path: &Path) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_file(path).map_err(|e| e.to_string())
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Both files present: true; neither: false; one alone: an error naming both.
fn pair_exists(cert: &Path, key: &Path) -> Result<bool, PkiError> {
    match (exists(cert)?, exists(key)?) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(PkiError::IncompletePair {
            present: cert.to_owned(),
            missing: key.to_owned(),
        }),
        (false, true) => Err(PkiError::IncompletePair {
            present: key.to_owned(),
            missing: cert.to_owned(),
        }),
    }
}

fn create_dir(path: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path).map_err(|source| PkiError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Writes the key first (0600), then the certificate (0644). If the certificate cannot be
/// written the key is removed again, so a failure leaves neither half behind.
fn write_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key: &KeyPair,
) -> Result<(), PkiError> {
    write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(cert_path, cert_pem.as_bytes(), 0o644) {
        let _ = fs::remove_file(key_path);
        return Err(e);
    }
    Ok(())
}

/// Creates `path` (never replacing an existing file) with `mode` from the start, so a
/// key is never readable by others even for an instant, and syncs it.
///
/// A crash between create and sync can leave a truncated file; the next run reports it
/// as unparseable, naming the path, rather than silently replacing it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_owned(),
            }
        } else {
            PkiError::Write {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if let Err(source) = written {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(PkiError::Write {
            path: path.to_owned(),
            source,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn parse_pem(path: &Path) -> Vec<u8> {
        CertificateDer::from_pem_file(path).unwrap().to_vec()
    }

    #[test]
    fn init_creates_a_ca_and_a_server_certificate_for_localhost_and_extra_names() {
        let tmp = tempfile::tempdir().unwrap();
        let out = init(tmp.path(), &["gw.example".into(), "10.1.2.3".into()]).unwrap();
        assert_eq!(out.ca, PairState::Created);
        assert_eq!(out.server, PairState::Created);
        assert!(out.missing_server_names.is_empty());

        let der = parse_pem(&out.dir.server_cert());
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(b) => ip_from_bytes(b).unwrap().to_string(),
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect();
        assert_eq!(names, ["localhost", "127.0.0.1", "gw.example", "10.1.2.3"]);
        let ca_der = parse_pem(&out.dir.ca_cert());
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert!(ca.is_ca());
        assert_eq!(cert.issuer(), ca.subject());
    }

    #[test]
    fn init_twice_keeps_the_ca_and_reports_names_the_kept_server_cert_lacks() {
        let tmp = tempfile::tempdir().unwrap();
        let first = init(tmp.path(), &[]).unwrap();
        let ca_before = fs::read(first.dir.ca_cert()).unwrap();
        let key_before = fs::read(first.dir.ca_key()).unwrap();
        let server_before = fs::read(first.dir.server_cert()).unwrap();

        let again = init(tmp.path(), &["new.example".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(again.ca, PairState::Kept);
        assert_eq!(again.server, PairState::Kept);
        assert_eq!(again.missing_server_names, ["new.example"]);
        assert_eq!(fs::read(again.dir.ca_cert()).unwrap(), ca_before);
        assert_eq!(fs::read(again.dir.ca_key()).unwrap(), key_before);
        assert_eq!(fs::read(again.dir.server_cert()).unwrap(), server_before);
    }

    #[test]
    fn init_with_a_server_cert_but_no_ca_refuses_to_make_a_new_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let out = init(tmp.path(), &[]).unwrap();
        fs::remove_file(out.dir.ca_cert()).unwrap();
        let err = init(tmp.path(), &[]).unwrap_err();
        assert!(
            matches!(err, PkiError::IncompletePair { ref missing, .. } if *missing == out.dir.ca_cert()),
            "{err}"
        );
        fs::remove_file(out.dir.ca_key()).unwrap();
        let err = init(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::OrphanServerCert { .. }), "{err}");
    }

    #[test]
    fn init_rejects_a_server_name_that_is_not_a_host_name() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in ["", "has space", "a/b", "é.example", ".leading"] {
            let err = init(tmp.path(), &[bad.into()]).unwrap_err();
            assert!(matches!(err, PkiError::InvalidServerName { .. }), "{bad}");
        }
        assert!(!tmp.path().join("ca.pem").exists());
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_readable_by_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let out = init(tmp.path(), &[]).unwrap();
        let dev = issue_device(tmp.path(), "dev-1", DAY).unwrap();
        for key in [out.dir.ca_key(), out.dir.server_key(), dev.key] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }

    #[test]
    fn device_certificate_has_the_id_as_cn_and_client_auth_usage() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), &[]).unwrap();
        let dev = issue_device(tmp.path(), "tv-42.living:room_1", 30 * DAY).unwrap();
        assert_eq!(dev.device_id, DeviceId("tv-42.living:room_1".into()));
        assert_eq!(dev.cert, tmp.path().join("devices/tv-42.living:room_1.pem"));

        let der = parse_pem(&dev.cert);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(cn, ["tv-42.living:room_1"]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
    }

    #[test]
    fn issue_device_refuses_ids_that_could_not_be_topic_segments() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), &[]).unwrap();
        let long = "x".repeat(129);
        for bad in ["a/+", "", "a#", "a+b", "a/b", "sp ace", long.as_str()] {
            let err = issue_device(tmp.path(), bad, DAY).unwrap_err();
            assert!(matches!(err, PkiError::InvalidDeviceId { .. }), "{bad:?}");
        }
        issue_device(tmp.path(), &"x".repeat(128), DAY).unwrap();
    }

    #[test]
    fn issuing_the_same_device_twice_is_refused_and_keeps_the_first_key() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), &[]).unwrap();
        let first = issue_device(tmp.path(), "dev", DAY).unwrap();
        let key = fs::read(&first.key).unwrap();
        let err = issue_device(tmp.path(), "dev", DAY).unwrap_err();
        assert!(matches!(err, PkiError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&first.key).unwrap(), key);
    }

    #[test]
    fn issue_device_without_a_ca_says_to_run_init() {
        let tmp = tempfile::tempdir().unwrap();
        let err = issue_device(tmp.path(), "dev", DAY).unwrap_err();
        assert!(matches!(err, PkiError::NoCa { .. }), "{err}");
    }

    #[test]
    fn a_ca_key_that_does_not_match_the_ca_cert_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let out = init(tmp.path(), &[]).unwrap();
        init(other.path(), &[]).unwrap();
        fs::remove_file(out.dir.ca_key()).unwrap();
        fs::copy(other.path().join("ca.key"), out.dir.ca_key()).unwrap();
        let err = issue_device(tmp.path(), "dev", DAY).unwrap_err();
        assert!(matches!(err, PkiError::CaKeyMismatch { .. }), "{err}");
    }

    #[test]
    fn an_already_expired_certificate_can_be_issued_but_not_a_reversed_one() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), &[]).unwrap();
        let now = SystemTime::now();
        let dev = issue_device_with(tmp.path(), "old", now - 3 * DAY, now - DAY).unwrap();
        let der = parse_pem(&dev.cert);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.validity().is_valid());

        let err = issue_device_with(tmp.path(), "rev", now, now - DAY).unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity { .. }), "{err}");
    }

    #[test]
    fn a_validity_past_year_9999_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path(), &[]).unwrap();
        let err = issue_device(tmp.path(), "dev", Duration::from_secs(u64::MAX)).unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity { .. }), "{err}");
        let err = issue_device(tmp.path(), "dev", 9000 * 365 * DAY).unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity { .. }), "{err}");
    }
}
