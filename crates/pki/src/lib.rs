//! Flotilla's certificate authority.
//!
//! One ECDSA P-256 CA per installation, created on first start. It signs three kinds of
//! certificate: the server's TLS certificate (serverAuth), the server's own service clients
//! (clientAuth, CN `svc:<name>`, a name no device id can take), and device certificates from
//! CSRs made on the device, whose key never leaves it.
//!
//! What it does not do: store anything but its own key and certificate, or decide who may
//! get a certificate — the server checks the provisioning token before calling
//! [`CertificateAuthority::sign_device_csr`].
//!
//! ```no_run
//! # fn main() -> Result<(), flotilla_pki::PkiError> {
//! let ca = flotilla_pki::CertificateAuthority::load_or_create(std::path::Path::new("./data"))?;
//! let server = ca.issue_server_certificate(&["localhost".to_string()])?;
//! assert!(server.certificate_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! # Ok(()) }
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Why a PKI operation failed, by cause.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The CSR is not PEM/DER, its signature does not verify, or it carries unsupported content.
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    /// The CSR's key is not ECDSA P-256.
    #[error("CSR key must be ECDSA P-256")]
    WrongKeyType,
    #[error("CA files in {dir}: {source}")]
    Storage {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("CA files are corrupt: {0}")]
    CorruptCa(String),
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
    #[error("no CA in {0} (the server creates it on first start)")]
    NoCa(PathBuf),
    #[error("not a hex serial number: {0:?}")]
    BadSerial(String),
    #[error("certificate validity out of range")]
    BadValidity,
}

/// A certificate to list in a revocation list.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// Hex, as [`IssuedCertificate::serial_hex`].
    pub serial_hex: String,
    pub revoked_at_unix: i64,
    /// Superseded by a newer certificate, rather than withdrawn.
    pub superseded: bool,
}

/// A certificate with its serial number, as issued.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    /// Lower-case hex of the serial number, for revocation checks.
    pub serial_hex: String,
    pub not_after_unix: i64,
}

/// A key pair and certificate made here for one of our own endpoints.
pub struct KeyedCertificate {
    pub certificate_pem: String,
    pub private_key_pem: String,
}

impl std::fmt::Debug for KeyedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedCertificate").finish_non_exhaustive()
    }
}

pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    certificate_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

/// Prefix of service identities; `:` is not allowed in device ids.
pub const SERVICE_PREFIX: &str = "svc:";

/// Device certificates live this long; re-provisioning or renewal replaces them.
pub const DEVICE_VALIDITY_DAYS: i64 = 397;

/// How long the server's own client certificates live; the server renews them while running.
pub const SERVICE_VALIDITY_DAYS: i64 = 30;

impl CertificateAuthority {
    /// Loads the CA that exists in `dir`; never creates one.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let storage = |source| PkiError::Storage {
            dir: dir.to_path_buf(),
            source,
        };
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if !key_path.exists() {
            return Err(PkiError::NoCa(dir.to_path_buf()));
        }
        let key_pem = fs::read_to_string(&key_path).map_err(storage)?;
        let certificate_pem = fs::read_to_string(&cert_path).map_err(storage)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::CorruptCa(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&certificate_pem, key)
            .map_err(|e| PkiError::CorruptCa(e.to_string()))?;
        Ok(CertificateAuthority {
            issuer,
            certificate_pem,
        })
    }

    /// Loads the CA from `dir`, or creates it there (key file mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        if dir.join(CA_KEY_FILE).exists() {
            return Self::load(dir);
        }
        let storage = |source| PkiError::Storage {
            dir: dir.to_path_buf(),
            source,
        };
        let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        fs::create_dir_all(dir).map_err(storage)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name("Flotilla Device CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365 * 20);
        let certificate_pem = params.self_signed(&key)?.pem();
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(storage)?;
        fs::write(&cert_path, &certificate_pem).map_err(storage)?;
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            certificate_pem,
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// A secret every holder of this CA key derives alike, without a word between them:
    /// SHA-256 over `label` and the CA private key. Different labels give unrelated secrets,
    /// and none of them gives the key away.
    pub fn derive_secret(&self, label: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(b"flotilla derived secret\0");
        hash.update(label.as_bytes());
        hash.update(b"\0");
        hash.update(self.issuer.key().serialize_der());
        hash.finalize().into()
    }

    /// Signs a statement the server makes about its own records (audit checkpoints) with the
    /// CA key: ECDSA P-256 over SHA-256, DER. Anyone holding the CA certificate can check it.
    pub fn sign_statement(&self, statement: &[u8]) -> Result<Vec<u8>, PkiError> {
        Ok(rcgen::SigningKey::sign(self.issuer.key(), statement)?)
    }

    /// A TLS server certificate for `hosts` (DNS names or IP addresses), with a fresh key,
    /// valid 365 days.
    pub fn issue_server_certificate(&self, hosts: &[String]) -> Result<KeyedCertificate, PkiError> {
        self.issue_server_certificate_valid_for(hosts, std::time::Duration::from_secs(365 * 86_400))
    }

    /// [`CertificateAuthority::issue_server_certificate`] with a chosen life.
    pub fn issue_server_certificate_valid_for(
        &self,
        hosts: &[String],
        validity: std::time::Duration,
    ) -> Result<KeyedCertificate, PkiError> {
        let validity = Duration::try_from(validity).map_err(|_| PkiError::BadValidity)?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name = name("flotilla-server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue_keyed(params, validity)
    }

    /// A client certificate for one of the server's own MQTT clients, CN `svc:<name>`, valid
    /// [`SERVICE_VALIDITY_DAYS`].
    pub fn issue_service_certificate(&self, service: &str) -> Result<KeyedCertificate, PkiError> {
        self.issue_service_certificate_valid_for(
            service,
            std::time::Duration::from_secs(SERVICE_VALIDITY_DAYS as u64 * 86_400),
        )
    }

    /// [`CertificateAuthority::issue_service_certificate`] with a validity of the caller's
    /// choosing (the server's `--service-cert-validity`).
    pub fn issue_service_certificate_valid_for(
        &self,
        service: &str,
        validity: std::time::Duration,
    ) -> Result<KeyedCertificate, PkiError> {
        let validity = Duration::try_from(validity).map_err(|_| PkiError::BadValidity)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("{SERVICE_PREFIX}{service}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue_keyed(params, validity)
    }

    /// A short-lived client certificate with CN `device_id` and a fresh key, never recorded:
    /// for `flotilla-server broker-sync` to take over (and so close) a device's session at an
    /// external broker that takes client ids from certificates.
    pub fn issue_takeover_certificate(
        &self,
        device_id: &str,
        validity: Duration,
    ) -> Result<KeyedCertificate, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(device_id);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.issue_keyed(params, validity)
    }

    /// Signs a device's CSR. The CSR's own subject and extensions are ignored: the certificate
    /// says CN = `device_id`, clientAuth only, not a CA, valid [`DEVICE_VALIDITY_DAYS`].
    pub fn sign_device_csr(
        &self,
        csr_pem: &str,
        device_id: &str,
    ) -> Result<IssuedCertificate, PkiError> {
        self.sign_device_csr_valid_for(
            csr_pem,
            device_id,
            std::time::Duration::from_secs(DEVICE_VALIDITY_DAYS as u64 * 86_400),
        )
    }

    /// [`CertificateAuthority::sign_device_csr`] with a validity of the caller's choosing
    /// (the server's `--device-cert-validity`).
    pub fn sign_device_csr_valid_for(
        &self,
        csr_pem: &str,
        device_id: &str,
        validity: std::time::Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let validity = Duration::try_from(validity).map_err(|_| PkiError::BadValidity)?;
        // from_pem verifies the CSR's self-signature: proof the requester holds the key.
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(PkiError::WrongKeyType);
        }
        let serial = random_serial();
        let serial_hex = hex_lower(&serial.to_bytes());
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(device_id);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(serial);
        // Back-dated for a device clock a little behind, by less than an eighth of the life,
        // so a short-lived certificate's life is mostly ahead of it.
        params.not_before = now - Duration::minutes(5).min(validity / 8);
        params.not_after = now + validity;
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let cert = csr.signed_by(&self.issuer)?;
        Ok(IssuedCertificate {
            certificate_pem: cert.pem(),
            serial_hex,
            not_after_unix: (now + validity).unix_timestamp(),
        })
    }

    /// A CRL signed by this CA listing `revoked`, valid from `now` for `validity`; `number` must
    /// grow from one list to the next. A TLS server that checks CRLs (Mosquitto's `crlfile`)
    /// refuses every client once the list it holds is past its next update, so a list must be
    /// re-issued well within `validity`.
    pub fn revocation_list(
        &self,
        revoked: &[Revocation],
        now: OffsetDateTime,
        validity: Duration,
        number: u64,
    ) -> Result<String, PkiError> {
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial_bytes(&r.serial_hex)?),
                    revocation_time: OffsetDateTime::from_unix_timestamp(r.revoked_at_unix)
                        .unwrap_or(now),
                    reason_code: Some(if r.superseded {
                        RevocationReason::Superseded
                    } else {
                        RevocationReason::CessationOfOperation
                    }),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + validity,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            // The CA's own subject key identifier, whichever way it was made: a TLS stack finds
            // the CRL's issuer by it.
            key_identifier_method: subject_key_id(&self.certificate_pem)
                .map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified),
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    fn issue_keyed(
        &self,
        mut params: CertificateParams,
        validity: Duration,
    ) -> Result<KeyedCertificate, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        params.serial_number = Some(random_serial());
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + validity;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(KeyedCertificate {
            certificate_pem: cert.pem(),
            private_key_pem: key.serialize_pem(),
        })
    }
}

/// Makes a device key pair and a CSR for it, as a device does on first boot. The subject is
/// informational only; the CA overrides it.
pub fn device_key_and_csr(device_id: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = csr_for_key(&key, device_id)?;
    Ok((key.serialize_pem(), csr))
}

/// A CSR for an existing PEM key (a device keeps its key across re-provisioning).
pub fn csr_for_key_pem(key_pem: &str, device_id: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadCsr(e.to_string()))?;
    csr_for_key(&key, device_id)
}

fn csr_for_key(key: &KeyPair, device_id: &str) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(device_id);
    Ok(params.serialize_request(key)?.pem()?)
}

/// The serial number and CN of a PEM certificate.
pub fn certificate_identity(cert_pem: &str) -> Option<(String, String)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    certificate_identity_der(&pem.contents)
}

/// The SubjectPublicKeyInfo (DER) of a PEM certificate: what a signature by its key is
/// checked against.
pub fn certificate_public_key_der(cert_pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.public_key().raw.to_vec())
}

/// A PEM certificate's validity, `(not_before, not_after)` in Unix seconds.
pub fn certificate_validity(cert_pem: &str) -> Option<(i64, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The serial number and CN of a DER certificate (as a TLS peer presents it).
pub fn certificate_identity_der(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some((hex_lower(cert.raw_serial()), cn))
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Flotilla");
    dn
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER without a leading zero byte
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Serial numbers as brokers print them: lower-case hex without leading zeros.
fn hex_lower(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    normalize_serial(&hex)
}

/// The subject key identifier a PEM certificate carries, if any.
fn subject_key_id(pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        })
}

/// The big-endian bytes of a hex serial.
fn serial_bytes(hex: &str) -> Result<Vec<u8>, PkiError> {
    let bad = || PkiError::BadSerial(hex.chars().take(80).collect());
    let digits = normalize_serial(hex);
    if digits.len() > 40 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    // rcgen writes these as a positive INTEGER (adding the sign byte itself).
    (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).map_err(|_| bad()))
        .collect()
}

/// Normalises a hex serial (any case, optional leading zeros or colons) for comparison.
pub fn normalize_serial(hex: &str) -> String {
    let s: String = hex
        .chars()
        .filter(|c| *c != ':')
        .flat_map(char::to_lowercase)
        .collect();
    let trimmed = s.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents)
}

/// Writes a secret file readable only by its owner (0600 on Unix), replacing any old one.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let _ = fs::remove_file(path);
    write_private(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_with_a_private_key_file_and_reloaded_after() {
        let dir = tempfile_dir();
        let ca = CertificateAuthority::load_or_create(&dir).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.join(CA_KEY_FILE)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let again = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!(ca.certificate_pem(), again.certificate_pem());
    }

    #[test]
    fn a_derived_secret_is_the_same_for_every_holder_of_the_key_and_only_for_them() {
        let dir = tempfile_dir();
        let ca = CertificateAuthority::load_or_create(&dir).unwrap();
        let again = CertificateAuthority::load_or_create(&dir).unwrap();
        let other = CertificateAuthority::load_or_create(&tempfile_dir()).unwrap();
        assert_eq!(ca.derive_secret("a"), again.derive_secret("a"));
        assert_ne!(ca.derive_secret("a"), ca.derive_secret("b"));
        assert_ne!(ca.derive_secret("a"), other.derive_secret("a"));
    }

    #[test]
    fn device_certificate_ignores_csr_subject_and_is_client_only() {
        let ca = CertificateAuthority::load_or_create(&tempfile_dir()).unwrap();
        let (_key, csr) = device_key_and_csr("evil-admin").unwrap();
        let issued = ca.sign_device_csr(&csr, "dev-7").unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "dev-7");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        assert_eq!(
            certificate_identity(&issued.certificate_pem).unwrap(),
            (issued.serial_hex.clone(), "dev-7".into())
        );
    }

    #[test]
    fn tampered_csr_is_refused() {
        let ca = CertificateAuthority::load_or_create(&tempfile_dir()).unwrap();
        let (_key, csr) = device_key_and_csr("dev").unwrap();
        let der = x509_parser::pem::parse_x509_pem(csr.as_bytes())
            .unwrap()
            .1
            .contents;
        let mut bad = der.clone();
        let n = bad.len();
        bad[n - 5] ^= 0x55;
        let bad_pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            b64(&bad)
        );
        assert!(matches!(
            ca.sign_device_csr(&bad_pem, "dev"),
            Err(PkiError::BadCsr(_))
        ));
        assert!(matches!(
            ca.sign_device_csr("not a csr", "dev"),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn a_revocation_list_names_exactly_the_revoked_serials_and_when_it_lapses() {
        let dir = tempfile_dir();
        assert!(matches!(
            CertificateAuthority::load(&dir),
            Err(PkiError::NoCa(_))
        ));
        CertificateAuthority::load_or_create(&dir).unwrap();
        let ca = CertificateAuthority::load(&dir).unwrap();
        let issued: Vec<IssuedCertificate> = (0..3)
            .map(|k| {
                let (_key, csr) = device_key_and_csr("d").unwrap();
                ca.sign_device_csr(&csr, &format!("dev-{k}")).unwrap()
            })
            .collect();
        let revoked: Vec<Revocation> = issued[..2]
            .iter()
            .enumerate()
            .map(|(k, c)| Revocation {
                serial_hex: c.serial_hex.clone(),
                revoked_at_unix: 1_790_000_000,
                superseded: k == 0,
            })
            .collect();
        let now = OffsetDateTime::now_utc();
        let pem = ca
            .revocation_list(&revoked, now, Duration::days(7), 42)
            .unwrap();
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let listed: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| normalize_serial(&r.raw_serial_as_string()))
            .collect();
        assert_eq!(
            listed,
            vec![issued[0].serial_hex.clone(), issued[1].serial_hex.clone()]
        );
        // The same serial as the certificate itself carries, as a TLS stack compares them.
        let (_, cert_pem) =
            x509_parser::pem::parse_x509_pem(issued[1].certificate_pem.as_bytes()).unwrap();
        let cert = cert_pem.parse_x509().unwrap();
        assert_eq!(
            crl.iter_revoked_certificates().nth(1).unwrap().serial(),
            &cert.tbs_certificate.serial
        );
        assert_eq!(crl.issuer(), cert.issuer());
        let (_, ca_pem) =
            x509_parser::pem::parse_x509_pem(ca.certificate_pem().as_bytes()).unwrap();
        let ca_cert = ca_pem.parse_x509().unwrap();
        crl.verify_signature(ca_cert.public_key()).unwrap();
        let aki = crl
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        assert_eq!(aki, subject_key_id(ca.certificate_pem()));
        assert!(aki.is_some());
        let lapses = crl.next_update().unwrap().timestamp();
        assert!((lapses - (now + Duration::days(7)).unix_timestamp()).abs() <= 1);
        assert!(matches!(
            ca.revocation_list(
                &[Revocation {
                    serial_hex: "zz".into(),
                    revoked_at_unix: 0,
                    superseded: false
                }],
                now,
                Duration::days(7),
                43
            ),
            Err(PkiError::BadSerial(_))
        ));
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flotilla-pki-test-{}", rand::random::<u64>()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn b64(bytes: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
