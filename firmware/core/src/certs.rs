//! Certificates on the box (PRODUCT.md F-SEAL): the TLS key generated here with a CSR to send to
//! a CA, the signed certificate checked on import, an external key brought in PEM, and the facts
//! an admin sees about an installed chain.
//!
//! Pure functions over bytes: the daemon and the CLI do the sealed-store I/O (records
//! `tls/<name>/key` = PKCS#8 DER, `tls/<name>/chain` = PEM, leaf first).
//!
//! [`check_import`] runs its checks in this order and stops at the first failure, each with its
//! own [`CertError`] variant:
//!
//! 1. the chain PEM holds certificates that parse (`NoCertificate`, `BadPem`);
//! 2. chain order: each certificate's issuer is the subject of the next one (`ChainOrder`), and
//!    its signature verifies with the next one's key (`ChainSignature`) — checked before the key
//!    so that a chain given root first is reported as such, not as a key that does not match;
//! 3. the private key is usable by the TLS stack (`BadKey`, `UnsupportedKey`) and is the key of
//!    the leaf: same algorithm and public key as the leaf's SubjectPublicKeyInfo (`KeyMismatch`);
//! 4. the validity window of every certificate in the chain (`NotYetValid`, `Expired`);
//! 5. every required name is covered by the leaf's subjectAltName DNS names (or IP addresses for
//!    an address literal), wildcards per RFC 6125: `*` as the whole left-most label stands for
//!    exactly one label, under at least two more (`NameMissing`); the subject CN is not used;
//! 6. the leaf may serve TLS: if it has an extended key usage, it includes serverAuth
//!    (`NotForServer`).
//!
//! Trust in the chain's root is the remote client's business and not checked here; a leaf
//! alone, even self-signed, is accepted.
//!
//! Key material stays in [`Zeroizing`] buffers here and never appears in an error message. (The
//! copies held inside rcgen's and ring's key objects while a key is generated or checked are
//! dropped, not wiped: those crates do not offer it with the features the workspace enables.)

use std::borrow::Cow;
use std::net::IpAddr;

use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _, RsaKeyPair,
};
use rustls_pki_types::pem::{PemObject, SectionKind};
use x509_parser::asn1_rs::Oid;
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use zeroize::Zeroizing;

use crate::der::der_tlv;

/// Largest chain PEM accepted (a real chain is a few KiB).
pub const MAX_CHAIN_PEM: usize = 256 * 1024;
/// Most certificates in a chain (leaf included).
pub const MAX_CHAIN_LEN: usize = 10;
/// Largest key PEM accepted by [`external_key`] (an RSA 4096 key is about 3.3 KiB).
pub const MAX_KEY_PEM: usize = 64 * 1024;
/// RFC 5280 upper bound of a CommonName (`ub-common-name`).
const MAX_CN_LEN: usize = 64;

/// Why a key could not be generated or a key/certificate could not be imported. Each variant is
/// one check; none carries key bytes. Chain positions (`index`) count from 0 = the leaf; the
/// messages count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate chain: no CERTIFICATE block found in the PEM")]
    NoCertificate,
    #[error("certificate chain: {0}")]
    BadPem(String),
    #[error(
        "the private key does not belong to the leaf certificate (the first in the chain): \
         their public keys differ"
    )]
    KeyMismatch,
    #[error(
        "chain order: certificate {} ({subject}) is issued by \"{issuer}\", but the next \
         certificate is \"{next}\"; give the leaf first, then each issuer in turn",
        .index + 1
    )]
    ChainOrder {
        index: usize,
        subject: String,
        /// The issuer named by certificate `index`: the subject expected next.
        issuer: String,
        /// The subject of certificate `index + 1`.
        next: String,
    },
    #[error(
        "chain signature: certificate {} ({subject}) is not signed by the key of the next \
         certificate ({issuer}): {reason}",
        .index + 1
    )]
    ChainSignature {
        index: usize,
        subject: String,
        issuer: String,
        reason: String,
    },
    #[error(
        "certificate {} ({subject}) is not valid before {} (now {}; is the clock right?)",
        .index + 1, rfc3339(*.not_before), rfc3339(*.now)
    )]
    NotYetValid {
        index: usize,
        subject: String,
        not_before: u64,
        now: u64,
    },
    #[error(
        "certificate {} ({subject}) expired at {} (now {})",
        .index + 1, rfc3339(*.not_after), rfc3339(*.now)
    )]
    Expired {
        index: usize,
        subject: String,
        not_after: u64,
        now: u64,
    },
    #[error(
        "the leaf certificate does not cover the name {name}: its subjectAltNames are {}",
        list_or_none(.sans)
    )]
    NameMissing { name: String, sans: Vec<String> },
    #[error(
        "the leaf certificate is not for a TLS server: its extended key usage is {} \
         (serverAuth missing)",
        list_or_none(.usages)
    )]
    NotForServer { usages: Vec<String> },
    #[error("private key: {0}")]
    BadKey(String),
    #[error(
        "private key: {algorithm} is not supported (use ECDSA P-256 or P-384, RSA 2048-4096 \
         or Ed25519)"
    )]
    UnsupportedKey { algorithm: String },
    #[error("cannot generate key and CSR: {0}")]
    Generate(String),
}

/// A key generated on the box and its certificate signing request.
pub struct NewKey {
    /// The private key, PKCS#8 DER (sealed-store record `tls/<name>/key`).
    pub key_pkcs8_der: Zeroizing<Vec<u8>>,
    /// PKCS#10 request, PEM `CERTIFICATE REQUEST`: CN = the first name, SAN DNS = every name.
    pub csr_pem: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("key_pkcs8_der", &"(redacted)")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// What an admin sees about a chain: facts of the leaf, and the chain length.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// Leaf subject, `CN=…, O=…` in certificate order (control characters as `?`).
    pub subject: String,
    /// Leaf issuer, same form.
    pub issuer: String,
    /// The leaf's subjectAltName DNS names, then its IP addresses.
    pub sans: Vec<String>,
    /// Unix seconds (0 for a date before 1970).
    pub not_before: u64,
    pub not_after: u64,
    /// SHA-256 of the leaf DER, lower-case hex.
    pub sha256: String,
    /// Certificates in the chain, leaf included.
    pub chain_len: usize,
}

/// Generates an ECDSA P-256 key and a CSR for `names` (DNS names, the box's own first; a
/// wildcard `*.` left-most label is allowed). Names are lower-cased and duplicates dropped.
pub fn generate(names: &[String]) -> Result<NewKey, CertError> {
    let names = csr_names(names)?;
    let Some(cn) = names.first() else {
        return Err(CertError::Generate(
            "no name given: the CSR needs at least the box's DNS name".into(),
        ));
    };
    if cn.len() > MAX_CN_LEN {
        return Err(CertError::Generate(format!(
            "{cn} is longer than {MAX_CN_LEN} characters, the limit for a certificate's \
             CommonName; put a shorter name first"
        )));
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CertError::Generate(format!("key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|n| {
            rcgen::string::Ia5String::try_from(n.as_str())
                .map(rcgen::SanType::DnsName)
                .map_err(|e| CertError::Generate(format!("{n}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| CertError::Generate(format!("CSR: {e}")))?;
    Ok(NewKey {
        key_pkcs8_der: Zeroizing::new(key.serialize_der()),
        csr_pem,
    })
}

/// Checks a key (PKCS#8 DER) and its chain (PEM, leaf first) before they are installed to serve
/// `names` at Unix time `now`; the checks and their order are in the module doc.
pub fn check_import(
    key_pkcs8_der: &[u8],
    chain_pem: &[u8],
    names: &[String],
    now: u64,
) -> Result<CertInfo, CertError> {
    let ders = pem_chain(chain_pem)?;
    let chain = parse_chain(&ders)?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate);
    };
    check_links(&chain)?;

    let key = load_key(key_pkcs8_der)?;
    let leaf_key = spki_key(leaf.public_key().raw);
    if leaf_key.as_ref() != Some(&key) {
        return Err(CertError::KeyMismatch);
    }

    let now_i = i64::try_from(now).unwrap_or(i64::MAX);
    for (index, cert) in chain.iter().enumerate() {
        let validity = cert.validity();
        if now_i < validity.not_before.timestamp() {
            return Err(CertError::NotYetValid {
                index,
                subject: name_text(cert.subject()),
                not_before: unix(validity.not_before.timestamp()),
                now,
            });
        }
        if now_i > validity.not_after.timestamp() {
            return Err(CertError::Expired {
                index,
                subject: name_text(cert.subject()),
                not_after: unix(validity.not_after.timestamp()),
                now,
            });
        }
    }

    let sans = leaf_sans(leaf)?;
    for name in names {
        if !sans.covers(name) {
            return Err(CertError::NameMissing {
                name: clean(name),
                sans: sans.list(),
            });
        }
    }

    let eku = leaf
        .extended_key_usage()
        .map_err(|e| CertError::BadPem(format!("leaf certificate: extended key usage: {e}")))?;
    if let Some(eku) = eku
        && !eku.value.server_auth
    {
        let eku = eku.value;
        let mut usages: Vec<String> = [
            (eku.any, "anyExtendedKeyUsage"),
            (eku.client_auth, "clientAuth"),
            (eku.code_signing, "codeSigning"),
            (eku.email_protection, "emailProtection"),
            (eku.time_stamping, "timeStamping"),
            (eku.ocsp_signing, "OCSPSigning"),
        ]
        .into_iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| name.to_string())
        .collect();
        usages.extend(eku.other.iter().map(|oid| oid.to_id_string()));
        return Err(CertError::NotForServer { usages });
    }

    cert_info(&ders, &chain, sans)
}

/// Converts an externally made private key (PEM `PRIVATE KEY` = PKCS#8, `EC PRIVATE KEY` = SEC1,
/// `RSA PRIVATE KEY` = PKCS#1) to PKCS#8 DER, after checking that the TLS stack can use it.
pub fn external_key(key_pem: &[u8]) -> Result<Zeroizing<Vec<u8>>, CertError> {
    if key_pem.len() > MAX_KEY_PEM {
        return Err(CertError::BadKey(format!(
            "the key PEM is larger than {} KiB",
            MAX_KEY_PEM / 1024
        )));
    }
    if contains(key_pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || contains(key_pem, b"Proc-Type: 4,ENCRYPTED")
    {
        return Err(CertError::BadKey(
            "the key is encrypted; decrypt it first (openssl pkey -in KEY -out PLAIN)".into(),
        ));
    }
    let mut found: Option<(SectionKind, Zeroizing<Vec<u8>>)> = None;
    let mut certificates = false;
    for item in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(key_pem) {
        let (kind, der) = item.map_err(|e| CertError::BadKey(format!("PEM: {e}")))?;
        let der = Zeroizing::new(der);
        match kind {
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey => {
                if found.is_some() {
                    return Err(CertError::BadKey(
                        "the PEM holds more than one private key; give exactly one".into(),
                    ));
                }
                found = Some((kind, der));
            }
            SectionKind::Certificate => certificates = true,
            _ => {}
        }
    }
    let Some((kind, der)) = found else {
        return Err(CertError::BadKey(if certificates {
            "the PEM holds certificates but no private key".into()
        } else {
            "no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block in the PEM".into()
        }));
    };
    let pkcs8 = match kind {
        SectionKind::EcPrivateKey => sec1_to_pkcs8(&der)?,
        SectionKind::RsaPrivateKey => pkcs8_wrap(RSA_ALGORITHM_ID, &der),
        _ => der,
    };
    load_key(&pkcs8)?;
    Ok(pkcs8)
}

/// The facts of a chain (PEM, leaf first), without judging it.
pub fn info(chain_pem: &[u8]) -> Result<CertInfo, CertError> {
    let ders = pem_chain(chain_pem)?;
    let chain = parse_chain(&ders)?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate);
    };
    let sans = leaf_sans(leaf)?;
    cert_info(&ders, &chain, sans)
}

/// Whether the subjectAltName DNS name `san` covers the host name `name` (RFC 6125; ASCII case
/// and one trailing dot ignored): equal, or `san` is `*.` + a suffix of at least two labels and
/// `name` is exactly one non-empty label + `.` + that suffix.
pub fn san_covers(san: &str, name: &str) -> bool {
    let san = san.strip_suffix('.').unwrap_or(san).to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() {
        return false;
    }
    if san == name {
        return true;
    }
    let Some(suffix) = san.strip_prefix("*.") else {
        return false;
    };
    if suffix.contains('*') || suffix.split('.').count() < 2 || suffix.split('.').any(str::is_empty)
    {
        return false;
    }
    match name.split_once('.') {
        Some((first, rest)) => !first.is_empty() && !first.contains('*') && rest == suffix,
        None => false,
    }
}

/// Unix seconds as RFC 3339 UTC, `2026-01-31T12:00:00Z`.
pub fn rfc3339(secs: u64) -> String {
    sealgate_proto::calendar::rfc3339(secs)
}

// ---------------------------------------------------------------------------------------------
// Names

/// The names of a CSR: checked as DNS names, lower-cased, duplicates dropped (order kept).
fn csr_names(names: &[String]) -> Result<Vec<String>, CertError> {
    let mut out: Vec<String> = Vec::new();
    for name in names {
        check_dns_name(name)
            .map_err(|why| CertError::Generate(format!("name \"{}\": {why}", clean(name))))?;
        let name = name.to_ascii_lowercase();
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

/// A host name (LDH labels of 1 to 63 characters, at most 253 in all, no trailing dot),
/// optionally with `*` as the whole left-most label.
fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err("an IP address, not a DNS name".into());
    }
    if name.len() > 253 {
        return Err("longer than 253 characters".into());
    }
    if name.ends_with('.') {
        return Err("give it without the trailing dot".into());
    }
    let labels: Vec<&str> = name.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if *label == "*" && i == 0 {
            if labels.len() < 3 {
                return Err("a wildcard needs at least two labels after `*.`".into());
            }
            continue;
        }
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1 to 63 characters".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(
                "only letters, digits, `-` and dots (an IDN in its xn-- form); `*` only as the \
                 whole first label"
                    .into(),
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label cannot start or end with `-`".into());
        }
    }
    Ok(())
}

/// The leaf's subjectAltNames that name hosts.
struct Sans {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl Sans {
    fn covers(&self, name: &str) -> bool {
        match name.parse::<IpAddr>() {
            Ok(ip) => self.ips.contains(&ip),
            Err(_) => self.dns.iter().any(|san| san_covers(san, name)),
        }
    }

    fn list(&self) -> Vec<String> {
        self.dns
            .iter()
            .cloned()
            .chain(self.ips.iter().map(IpAddr::to_string))
            .collect()
    }
}

fn leaf_sans(leaf: &X509Certificate<'_>) -> Result<Sans, CertError> {
    let ext = leaf
        .subject_alternative_name()
        .map_err(|e| CertError::BadPem(format!("leaf certificate: subjectAltName: {e}")))?;
    let mut sans = Sans {
        dns: Vec::new(),
        ips: Vec::new(),
    };
    for general in ext.iter().flat_map(|e| e.value.general_names.iter()) {
        match general {
            GeneralName::DNSName(dns) => sans.dns.push(clean(dns)),
            GeneralName::IPAddress(bytes) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                    sans.ips.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                    sans.ips.push(IpAddr::from(v6));
                }
            }
            _ => {}
        }
    }
    Ok(sans)
}

// ---------------------------------------------------------------------------------------------
// Chain

/// The DER of every CERTIFICATE block, in order. A private key mixed into the chain is refused
/// (it must not end up in the chain record); other blocks are ignored.
fn pem_chain(chain_pem: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    if chain_pem.len() > MAX_CHAIN_PEM {
        return Err(CertError::BadPem(format!(
            "the PEM is larger than {} KiB",
            MAX_CHAIN_PEM / 1024
        )));
    }
    let mut ders = Vec::new();
    for item in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(chain_pem) {
        let (kind, der) = item.map_err(|e| CertError::BadPem(e.to_string()))?;
        match kind {
            SectionKind::Certificate => {
                if ders.len() == MAX_CHAIN_LEN {
                    return Err(CertError::BadPem(format!(
                        "more than {MAX_CHAIN_LEN} certificates"
                    )));
                }
                ders.push(der);
            }
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey => {
                drop(Zeroizing::new(der));
                return Err(CertError::BadPem(
                    "the chain PEM contains a private key; give the key separately".into(),
                ));
            }
            _ => {}
        }
    }
    if ders.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(ders)
}

fn parse_chain(ders: &[Vec<u8>]) -> Result<Vec<X509Certificate<'_>>, CertError> {
    ders.iter()
        .enumerate()
        .map(|(i, der)| match X509Certificate::from_der(der) {
            Ok((rest, _)) if !rest.is_empty() => Err(CertError::BadPem(format!(
                "certificate {}: {} bytes after the certificate's DER",
                i + 1,
                rest.len()
            ))),
            Ok((_, cert)) => Ok(cert),
            Err(e) => Err(CertError::BadPem(format!(
                "certificate {}: not a valid X.509 certificate: {e}",
                i + 1
            ))),
        })
        .collect()
}

/// Each certificate is issued by the next: names, then signature.
fn check_links(chain: &[X509Certificate<'_>]) -> Result<(), CertError> {
    for (index, pair) in chain.windows(2).enumerate() {
        let [cert, next] = pair else { continue };
        if !same_name(cert.issuer(), next.subject()) {
            return Err(CertError::ChainOrder {
                index,
                subject: name_text(cert.subject()),
                issuer: name_text(cert.issuer()),
                next: name_text(next.subject()),
            });
        }
        if let Err(e) = cert.verify_signature(Some(next.public_key())) {
            let reason = match e {
                X509Error::SignatureVerificationError => "the signature does not verify".into(),
                X509Error::SignatureUnsupportedAlgorithm => {
                    "signature algorithm or issuer key type not supported".into()
                }
                other => other.to_string(),
            };
            return Err(CertError::ChainSignature {
                index,
                subject: name_text(cert.subject()),
                issuer: name_text(next.subject()),
                reason,
            });
        }
    }
    Ok(())
}

/// Name equality: the same DER, or (for the same name in another string type or case) the same
/// text ignoring ASCII case.
fn same_name(a: &x509_parser::x509::X509Name<'_>, b: &x509_parser::x509::X509Name<'_>) -> bool {
    a.as_raw() == b.as_raw() || name_text(a).eq_ignore_ascii_case(&name_text(b))
}

fn cert_info(
    ders: &[Vec<u8>],
    chain: &[X509Certificate<'_>],
    sans: Sans,
) -> Result<CertInfo, CertError> {
    let (Some(der), Some(leaf)) = (ders.first(), chain.first()) else {
        return Err(CertError::NoCertificate);
    };
    let validity = leaf.validity();
    Ok(CertInfo {
        subject: name_text(leaf.subject()),
        issuer: name_text(leaf.issuer()),
        sans: sans.list(),
        not_before: unix(validity.not_before.timestamp()),
        not_after: unix(validity.not_after.timestamp()),
        sha256: crate::x509::sha256_hex(der),
        chain_len: chain.len(),
    })
}

fn name_text(name: &x509_parser::x509::X509Name<'_>) -> String {
    clean(&name.to_string())
}

// ---------------------------------------------------------------------------------------------
// Keys

/// A public key as the TLS stack sees it: algorithm and the SubjectPublicKey bits (EC point,
/// PKCS#1 RSAPublicKey, Ed25519 32 bytes).
#[derive(Debug, PartialEq, Eq)]
struct PublicKey {
    alg: KeyAlg,
    raw: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyAlg {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_SECP256K1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x0a];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_ED448: &[u8] = &[0x2b, 0x65, 0x71];
const OID_X25519: &[u8] = &[0x2b, 0x65, 0x6e];
const OID_X448: &[u8] = &[0x2b, 0x65, 0x6f];
const OID_DSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x01];
const OID_RSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];

/// AlgorithmIdentifier { rsaEncryption, NULL }.
const RSA_ALGORITHM_ID: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;

/// The algorithm of an AlgorithmIdentifier's content (OID, parameters), or the name of the
/// unsupported one.
fn key_alg(alg_id: &[u8]) -> Result<KeyAlg, CertError> {
    let unsupported = |algorithm: String| CertError::UnsupportedKey { algorithm };
    let Some((TAG_OID, oid, params)) = der_tlv(alg_id) else {
        return Err(CertError::BadKey("malformed algorithm identifier".into()));
    };
    match oid {
        OID_RSA => Ok(KeyAlg::Rsa),
        OID_ED25519 => Ok(KeyAlg::Ed25519),
        OID_EC_PUBLIC_KEY => match der_tlv(params) {
            Some((TAG_OID, OID_P256, _)) => Ok(KeyAlg::EcP256),
            Some((TAG_OID, OID_P384, _)) => Ok(KeyAlg::EcP384),
            Some((TAG_OID, OID_P521, _)) => Err(unsupported("ECDSA P-521".into())),
            Some((TAG_OID, OID_SECP256K1, _)) => Err(unsupported("ECDSA secp256k1".into())),
            Some((TAG_OID, curve, _)) => {
                Err(unsupported(format!("ECDSA on curve {}", oid_text(curve))))
            }
            _ => Err(unsupported("EC without a named curve".into())),
        },
        OID_ED448 => Err(unsupported("Ed448".into())),
        OID_X25519 | OID_X448 => Err(unsupported(format!(
            "{} (a key-agreement key, it cannot sign)",
            if oid == OID_X25519 { "X25519" } else { "X448" }
        ))),
        OID_DSA => Err(unsupported("DSA".into())),
        OID_RSA_PSS => Err(unsupported("an RSASSA-PSS-only RSA key".into())),
        other => Err(unsupported(format!("algorithm {}", oid_text(other)))),
    }
}

/// Parses a PKCS#8 private key the way the TLS stack (rustls with ring) will, and derives its
/// public key.
fn load_key(pkcs8: &[u8]) -> Result<PublicKey, CertError> {
    let not_pkcs8 = || CertError::BadKey("not a PKCS#8 private key (DER)".into());
    let (TAG_SEQUENCE, body, _) = der_tlv(pkcs8).ok_or_else(not_pkcs8)? else {
        return Err(not_pkcs8());
    };
    let (TAG_INTEGER, _, rest) = der_tlv(body).ok_or_else(not_pkcs8)? else {
        return Err(not_pkcs8());
    };
    let (TAG_SEQUENCE, alg_id, _) = der_tlv(rest).ok_or_else(not_pkcs8)? else {
        return Err(not_pkcs8());
    };
    let alg = key_alg(alg_id)?;
    let rejected = |what: &str, e: ring::error::KeyRejected| {
        CertError::BadKey(format!("{what} key rejected: {e}"))
    };
    let raw = match alg {
        KeyAlg::Rsa => RsaKeyPair::from_pkcs8(pkcs8)
            .map_err(|e| rejected("RSA", e))?
            .public_key()
            .as_ref()
            .to_vec(),
        KeyAlg::EcP256 | KeyAlg::EcP384 => {
            let (signing, name) = if alg == KeyAlg::EcP256 {
                (&ECDSA_P256_SHA256_ASN1_SIGNING, "ECDSA P-256")
            } else {
                (&ECDSA_P384_SHA384_ASN1_SIGNING, "ECDSA P-384")
            };
            EcdsaKeyPair::from_pkcs8(signing, pkcs8, &ring::rand::SystemRandom::new())
                .map_err(|e| rejected(name, e))?
                .public_key()
                .as_ref()
                .to_vec()
        }
        KeyAlg::Ed25519 => Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| rejected("Ed25519", e))?
            .public_key()
            .as_ref()
            .to_vec(),
    };
    Ok(PublicKey { alg, raw })
}

/// The public key of a SubjectPublicKeyInfo (`None` if malformed or of an unsupported type).
fn spki_key(spki: &[u8]) -> Option<PublicKey> {
    let (TAG_SEQUENCE, body, _) = der_tlv(spki)? else {
        return None;
    };
    let (TAG_SEQUENCE, alg_id, rest) = der_tlv(body)? else {
        return None;
    };
    let (TAG_BIT_STRING, bits, _) = der_tlv(rest)? else {
        return None;
    };
    let (&0, raw) = bits.split_first()? else {
        return None;
    };
    Some(PublicKey {
        alg: key_alg(alg_id).ok()?,
        raw: raw.to_vec(),
    })
}

/// SEC1 ECPrivateKey (RFC 5915) → PKCS#8 with the curve from its parameters, or from the length
/// of the private key when they are absent.
fn sec1_to_pkcs8(sec1: &[u8]) -> Result<Zeroizing<Vec<u8>>, CertError> {
    let bad = || CertError::BadKey("EC PRIVATE KEY: not a SEC1 ECPrivateKey".into());
    let (TAG_SEQUENCE, body, _) = der_tlv(sec1).ok_or_else(bad)? else {
        return Err(bad());
    };
    let (TAG_INTEGER, _, rest) = der_tlv(body).ok_or_else(bad)? else {
        return Err(bad());
    };
    let (TAG_OCTET_STRING, private, mut rest) = der_tlv(rest).ok_or_else(bad)? else {
        return Err(bad());
    };
    let mut curve = None;
    while let Some((tag, content, next)) = der_tlv(rest) {
        if tag == 0xa0 {
            curve = Some(content);
        }
        rest = next;
    }
    let curve_tlv: Vec<u8> = match curve {
        Some(tlv) => tlv.to_vec(),
        None => match private.len() {
            32 => der_encode(TAG_OID, OID_P256),
            48 => der_encode(TAG_OID, OID_P384),
            66 => der_encode(TAG_OID, OID_P521),
            n => {
                return Err(CertError::BadKey(format!(
                    "EC PRIVATE KEY without curve parameters and a {n}-byte private key"
                )));
            }
        },
    };
    let mut alg_id = der_encode(TAG_OID, OID_EC_PUBLIC_KEY);
    alg_id.extend_from_slice(&curve_tlv);
    let alg_id = der_encode(TAG_SEQUENCE, &alg_id);
    Ok(pkcs8_wrap(&alg_id, sec1))
}

/// PrivateKeyInfo { version 0, `alg_id` (a whole AlgorithmIdentifier), OCTET STRING `key` },
/// written straight into one wiped buffer of the right size.
fn pkcs8_wrap(alg_id: &[u8], key: &[u8]) -> Zeroizing<Vec<u8>> {
    const VERSION: &[u8] = &[TAG_INTEGER, 0x01, 0x00];
    let octets_len = 1 + len_len(key.len()) + key.len();
    let body_len = VERSION.len() + alg_id.len() + octets_len;
    let mut out = Zeroizing::new(Vec::with_capacity(1 + len_len(body_len) + body_len));
    out.push(TAG_SEQUENCE);
    push_len(&mut out, body_len);
    out.extend_from_slice(VERSION);
    out.extend_from_slice(alg_id);
    out.push(TAG_OCTET_STRING);
    push_len(&mut out, key.len());
    out.extend_from_slice(key);
    out
}

/// One DER TLV (non-secret content).
fn der_encode(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + len_len(content.len()) + content.len());
    out.push(tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn len_len(len: usize) -> usize {
    if len < 0x80 {
        1
    } else {
        1 + (usize::BITS - len.leading_zeros()).div_ceil(8) as usize
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

// ---------------------------------------------------------------------------------------------
// Text

fn oid_text(content: &[u8]) -> String {
    Oid::new(Cow::Borrowed(content)).to_id_string()
}

/// Text from a certificate, safe for a log line: control characters become `?`.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

fn unix(timestamp: i64) -> u64 {
    u64::try_from(timestamp).unwrap_or(0)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, PKCS_ECDSA_P256_SHA256, date_time_ymd,
    };
    use rustls_pki_types::CertificateSigningRequestDer;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::ParsedExtension;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn ts(year: i32, month: u8, day: u8) -> u64 {
        u64::try_from(date_time_ymd(year, month, day).unix_timestamp()).unwrap()
    }

    /// "Now" in the tests: inside every default validity window.
    fn now() -> u64 {
        ts(2026, 1, 1)
    }

    fn pem(der: &[u8]) -> String {
        const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut text = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    text.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    text.push('=');
                }
            }
        }
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in text.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }

    fn relabel(pem: &str, label: &str) -> String {
        pem.replace("CERTIFICATE", label)
    }

    /// A test CA (root when `parent` is `None`).
    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        cert: Certificate,
    }

    impl Ca {
        fn new(cn: &str, parent: Option<&Ca>) -> Ca {
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, cn);
            params
                .distinguished_name
                .push(DnType::OrganizationName, "Sealgate Test");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2040, 1, 1);
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let cert = match parent {
                None => params.self_signed(&key).unwrap(),
                Some(p) => params
                    .signed_by(&key, &Issuer::from_params(&p.params, &p.key))
                    .unwrap(),
            };
            Ca { params, key, cert }
        }
    }

    /// The public key of a CSR, for the test CA to certify.
    struct CsrKey(Vec<u8>);

    impl rcgen::PublicKeyData for CsrKey {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }

        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &PKCS_ECDSA_P256_SHA256
        }
    }

    /// What the tests read back from a CSR (its signature verified).
    struct Csr {
        cn: String,
        sans: Vec<String>,
        key: Vec<u8>,
    }

    fn read_csr(csr_pem: &str) -> Csr {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
        let (rest, csr) = X509CertificationRequest::from_der(&der).unwrap();
        assert!(rest.is_empty());
        csr.verify_signature().unwrap();
        let info = &csr.certification_request_info;
        let cn = info
            .subject
            .iter_common_name()
            .map(|a| a.as_str().unwrap().to_string())
            .collect::<Vec<_>>();
        assert_eq!(cn.len(), 1);
        let mut sans = Vec::new();
        for ext in csr.requested_extensions().unwrap() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for g in &san.general_names {
                    if let GeneralName::DNSName(d) = g {
                        sans.push(d.to_string());
                    }
                }
            }
        }
        Csr {
            cn: cn[0].clone(),
            sans,
            key: info.subject_pki.subject_public_key.data.to_vec(),
        }
    }

    /// Options of a certificate the test CA issues for a CSR.
    struct Issue {
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
        eku: Vec<ExtendedKeyUsagePurpose>,
        sans: Option<Vec<String>>,
    }

    impl Default for Issue {
        fn default() -> Self {
            Issue {
                not_before: (2025, 1, 1),
                not_after: (2027, 1, 1),
                eku: Vec::new(),
                sans: None,
            }
        }
    }

    /// The CA's side: the CSR's subject, names and key into a certificate signed by `ca`.
    fn sign_csr(csr_pem: &str, ca: &Ca, opts: Issue) -> Certificate {
        let csr = read_csr(csr_pem);
        let mut params = CertificateParams::new(opts.sans.unwrap_or(csr.sans)).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, csr.cn.as_str());
        let (y, m, d) = opts.not_before;
        params.not_before = date_time_ymd(y, m, d);
        let (y, m, d) = opts.not_after;
        params.not_after = date_time_ymd(y, m, d);
        params.extended_key_usages = opts.eku;
        params
            .signed_by(&CsrKey(csr.key), &Issuer::from_params(&ca.params, &ca.key))
            .unwrap()
    }

    /// Root → intermediate → leaf for `hosts` from a key generated on the box.
    struct Pki {
        root: Ca,
        inter: Ca,
        key: NewKey,
        leaf: Certificate,
    }

    impl Pki {
        fn new(hosts: &[&str], opts: Issue) -> Pki {
            let root = Ca::new("Test Root", None);
            let inter = Ca::new("Test Intermediate", Some(&root));
            let key = generate(&names(hosts)).unwrap();
            let leaf = sign_csr(&key.csr_pem, &inter, opts);
            Pki {
                root,
                inter,
                key,
                leaf,
            }
        }

        fn chain(&self) -> String {
            self.leaf.pem() + &self.inter.cert.pem()
        }

        fn check(&self, chain: &str, hosts: &[&str], now: u64) -> Result<CertInfo, CertError> {
            check_import(
                &self.key.key_pkcs8_der,
                chain.as_bytes(),
                &names(hosts),
                now,
            )
        }
    }

    #[test]
    fn generate_makes_a_csr_with_cn_and_sans_for_the_key() {
        let new = generate(&names(&[
            "MX.Example.test",
            "smtp.example.test",
            "mx.example.test",
        ]))
        .unwrap();
        assert!(
            new.csr_pem
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        );
        let csr = read_csr(&new.csr_pem);
        assert_eq!(csr.cn, "mx.example.test");
        assert_eq!(csr.sans, ["mx.example.test", "smtp.example.test"]);
        let key = load_key(&new.key_pkcs8_der).unwrap();
        assert_eq!(key.alg, KeyAlg::EcP256);
        assert_eq!(key.raw, csr.key);
        assert!(!format!("{new:?}").contains(&crate::hex::encode(&new.key_pkcs8_der)));
        // Each call makes a new key.
        let other = generate(&names(&["mx.example.test"])).unwrap();
        assert_ne!(*other.key_pkcs8_der, *new.key_pkcs8_der);
        // A wildcard is a name too.
        let wild = generate(&names(&["*.example.test"])).unwrap();
        assert_eq!(read_csr(&wild.csr_pem).sans, ["*.example.test"]);
    }

    #[test]
    fn generate_refuses_bad_names() {
        let long_label = "a".repeat(64);
        let long_cn = format!("{}.{}.example.test", "a".repeat(40), "b".repeat(30));
        for bad in [
            vec![],
            vec![""],
            vec!["mx example.test"],
            vec!["mx.example.test."],
            vec!["192.0.2.1"],
            vec!["-mx.example.test"],
            vec!["mx.*.example.test"],
            vec!["*.test"],
            vec!["mx..example.test"],
            vec!["mx.example.test", "bad\nname"],
            vec![long_label.as_str()],
            vec![long_cn.as_str()],
        ] {
            match generate(&names(&bad)) {
                Err(CertError::Generate(why)) => assert!(!why.contains('\n'), "{why}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // A long name is fine after a short first one (CN).
        generate(&names(&["mx.example.test", &long_cn])).unwrap();
    }

    #[test]
    fn import_of_the_signed_csr() {
        let pki = Pki::new(&["mx.example.test", "smtp.example.test"], Issue::default());
        let info = pki
            .check(
                &pki.chain(),
                &["mx.example.test", "SMTP.example.test."],
                now(),
            )
            .unwrap();
        assert_eq!(info.subject, "CN=mx.example.test");
        assert_eq!(info.issuer, "CN=Test Intermediate, O=Sealgate Test");
        assert_eq!(info.sans, ["mx.example.test", "smtp.example.test"]);
        assert_eq!(info.chain_len, 2);
        // With the root as well; and the leaf alone.
        let full = pki.chain() + &pki.root.cert.pem();
        assert_eq!(
            pki.check(&full, &["mx.example.test"], now())
                .unwrap()
                .chain_len,
            3
        );
        pki.check(&pki.leaf.pem(), &["mx.example.test"], now())
            .unwrap();
        // The window's edges are inside it.
        pki.check(&pki.chain(), &[], ts(2025, 1, 1)).unwrap();
        pki.check(&pki.chain(), &[], ts(2027, 1, 1)).unwrap();
    }

    #[test]
    fn import_refuses_a_certificate_for_another_key() {
        let pki = Pki::new(&["mx.example.test"], Issue::default());
        let other = generate(&names(&["mx.example.test"])).unwrap();
        let err = check_import(
            &other.key_pkcs8_der,
            pki.chain().as_bytes(),
            &names(&["mx.example.test"]),
            now(),
        )
        .unwrap_err();
        assert_eq!(err, CertError::KeyMismatch);
        // An Ed25519 key does not match an ECDSA leaf either.
        let ed = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let err = check_import(ed.as_ref(), pki.chain().as_bytes(), &[], now()).unwrap_err();
        assert_eq!(err, CertError::KeyMismatch);
        // Garbage is not a key.
        let err = check_import(b"not a key", pki.chain().as_bytes(), &[], now()).unwrap_err();
        assert!(matches!(err, CertError::BadKey(_)), "{err:?}");
    }

    #[test]
    fn import_refuses_expired_and_not_yet_valid() {
        let pki = Pki::new(&["mx.example.test"], Issue::default());
        let err = pki
            .check(&pki.chain(), &["mx.example.test"], ts(2027, 1, 1) + 1)
            .unwrap_err();
        assert_eq!(
            err,
            CertError::Expired {
                index: 0,
                subject: "CN=mx.example.test".into(),
                not_after: ts(2027, 1, 1),
                now: ts(2027, 1, 1) + 1,
            }
        );
        assert_eq!(
            err.to_string(),
            "certificate 1 (CN=mx.example.test) expired at 2027-01-01T00:00:00Z \
             (now 2027-01-01T00:00:01Z)"
        );
        let err = pki
            .check(&pki.chain(), &["mx.example.test"], ts(2024, 12, 31))
            .unwrap_err();
        assert!(
            matches!(&err, CertError::NotYetValid { index: 0, not_before, .. }
                if *not_before == ts(2025, 1, 1)),
            "{err:?}"
        );
        assert!(err.to_string().contains("2025-01-01T00:00:00Z"), "{err}");

        // An intermediate out of its window counts too.
        let pki = Pki::new(
            &["mx.example.test"],
            Issue {
                not_after: (2045, 1, 1),
                ..Issue::default()
            },
        );
        let err = pki
            .check(&pki.chain(), &["mx.example.test"], ts(2041, 1, 1))
            .unwrap_err();
        assert!(
            matches!(&err, CertError::Expired { index: 1, subject, .. }
                if subject == "CN=Test Intermediate, O=Sealgate Test"),
            "{err:?}"
        );
    }

    #[test]
    fn import_refuses_names_the_leaf_does_not_cover() {
        let pki = Pki::new(&["mx.example.test"], Issue::default());
        let err = pki
            .check(
                &pki.chain(),
                &["mx.example.test", "other.example.test"],
                now(),
            )
            .unwrap_err();
        assert_eq!(
            err,
            CertError::NameMissing {
                name: "other.example.test".into(),
                sans: names(&["mx.example.test"]),
            }
        );
        // The CN alone does not count.
        let pki = Pki::new(
            &["mx.example.test"],
            Issue {
                sans: Some(Vec::new()),
                ..Issue::default()
            },
        );
        let err = pki
            .check(&pki.chain(), &["mx.example.test"], now())
            .unwrap_err();
        assert!(err.to_string().ends_with("are (none)"), "{err}");
        // An address literal against IP SANs.
        let pki = Pki::new(
            &["mx.example.test"],
            Issue {
                sans: Some(names(&["mx.example.test", "192.0.2.25"])),
                ..Issue::default()
            },
        );
        let info = pki
            .check(&pki.chain(), &["192.0.2.25", "mx.example.test"], now())
            .unwrap();
        assert_eq!(info.sans, ["mx.example.test", "192.0.2.25"]);
        assert!(matches!(
            pki.check(&pki.chain(), &["192.0.2.26"], now()),
            Err(CertError::NameMissing { .. })
        ));
    }

    #[test]
    fn wildcards_cover_exactly_one_label() {
        let pki = Pki::new(&["*.example.test"], Issue::default());
        pki.check(&pki.chain(), &["a.example.test", "B.Example.Test"], now())
            .unwrap();
        for name in ["a.b.example.test", "example.test", ".example.test"] {
            assert!(
                matches!(
                    pki.check(&pki.chain(), &[name], now()),
                    Err(CertError::NameMissing { .. })
                ),
                "{name}"
            );
        }
        assert!(san_covers("*.example.test", "a.example.test"));
        assert!(san_covers("*.example.test.", "A.EXAMPLE.TEST"));
        assert!(!san_covers("*.example.test", "a.b.example.test"));
        assert!(!san_covers("*.example.test", "example.test"));
        assert!(!san_covers("*.example.test", "*.example.test.x"));
        assert!(!san_covers("*.test", "a.test"));
        assert!(!san_covers("a*.example.test", "ab.example.test"));
        assert!(!san_covers("*.*.example.test", "a.b.example.test"));
        assert!(san_covers("mx.example.test", "MX.example.test."));
        assert!(!san_covers("mx.example.test", ""));
    }

    #[test]
    fn import_refuses_a_chain_out_of_order() {
        let pki = Pki::new(&["mx.example.test"], Issue::default());
        let reversed = pki.inter.cert.pem() + &pki.leaf.pem();
        let err = pki
            .check(&reversed, &["mx.example.test"], now())
            .unwrap_err();
        assert_eq!(
            err,
            CertError::ChainOrder {
                index: 0,
                subject: "CN=Test Intermediate, O=Sealgate Test".into(),
                issuer: "CN=Test Root, O=Sealgate Test".into(),
                next: "CN=mx.example.test".into(),
            }
        );
        let root_in_between = pki.leaf.pem() + &pki.root.cert.pem() + &pki.inter.cert.pem();
        let err = pki
            .check(&root_in_between, &["mx.example.test"], now())
            .unwrap_err();
        assert!(
            matches!(&err, CertError::ChainOrder { index: 0, issuer, next, .. }
                if issuer.starts_with("CN=Test Intermediate") && next.starts_with("CN=Test Root")),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("chain order: certificate 1"),
            "{err}"
        );
    }

    #[test]
    fn import_refuses_a_broken_chain_signature() {
        let pki = Pki::new(&["mx.example.test"], Issue::default());
        // An intermediate of the same name but another key: the leaf's signature fails.
        let impostor = Ca::new("Test Intermediate", Some(&pki.root));
        let chain = pki.leaf.pem() + &impostor.cert.pem();
        let err = pki.check(&chain, &["mx.example.test"], now()).unwrap_err();
        assert!(
            matches!(&err, CertError::ChainSignature { index: 0, .. }),
            "{err:?}"
        );
        // The intermediate's own signature (by the root) damaged.
        let mut der = pki.inter.cert.der().to_vec();
        *der.last_mut().unwrap() ^= 0x01;
        let chain = pki.leaf.pem() + &pem(&der) + &pki.root.cert.pem();
        let err = pki.check(&chain, &["mx.example.test"], now()).unwrap_err();
        assert_eq!(
            err,
            CertError::ChainSignature {
                index: 1,
                subject: "CN=Test Intermediate, O=Sealgate Test".into(),
                issuer: "CN=Test Root, O=Sealgate Test".into(),
                reason: "the signature does not verify".into(),
            }
        );
    }

    #[test]
    fn import_refuses_a_leaf_not_for_servers() {
        let client_only = Pki::new(
            &["mx.example.test"],
            Issue {
                eku: vec![ExtendedKeyUsagePurpose::ClientAuth],
                ..Issue::default()
            },
        );
        let err = client_only
            .check(&client_only.chain(), &["mx.example.test"], now())
            .unwrap_err();
        assert_eq!(
            err,
            CertError::NotForServer {
                usages: names(&["clientAuth"])
            }
        );
        let both = Pki::new(
            &["mx.example.test"],
            Issue {
                eku: vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
                ..Issue::default()
            },
        );
        both.check(&both.chain(), &["mx.example.test"], now())
            .unwrap();
    }

    #[test]
    fn import_refuses_bad_pem() {
        let pki = Pki::new(&["mx.example.test"], Issue::default());
        let check = |chain: &[u8]| {
            check_import(
                &pki.key.key_pkcs8_der,
                chain,
                &names(&["mx.example.test"]),
                now(),
            )
        };
        assert_eq!(check(b""), Err(CertError::NoCertificate));
        assert_eq!(check(b"hello"), Err(CertError::NoCertificate));
        assert!(matches!(
            check(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
            Err(CertError::BadPem(_))
        ));
        assert!(matches!(
            check(b"-----BEGIN CERTIFICATE-----\nAAAA\n"),
            Err(CertError::BadPem(_))
        ));
        assert!(matches!(check(pem(b"\x30\x03\x02\x01\x00").as_bytes()),
            Err(CertError::BadPem(why)) if why.starts_with("certificate 1:")));
        let mut der = pki.leaf.der().to_vec();
        der.push(0);
        assert!(matches!(check(pem(&der).as_bytes()),
            Err(CertError::BadPem(why)) if why.contains("after the certificate")));
        let key_pem = relabel(&pem(&pki.key.key_pkcs8_der), "PRIVATE KEY");
        let err = check((pki.chain() + &key_pem).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("contains a private key"), "{err}");
        let long = pki.leaf.pem().repeat(MAX_CHAIN_LEN + 1);
        assert!(matches!(check(long.as_bytes()), Err(CertError::BadPem(_))));
        assert!(matches!(
            info(&vec![b'a'; MAX_CHAIN_PEM + 1]),
            Err(CertError::BadPem(_))
        ));
    }

    #[test]
    fn external_key_takes_pkcs8_and_sec1() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pkcs8 = key.serialize_der();
        let public = load_key(&pkcs8).unwrap();
        // PKCS#8 as is.
        assert_eq!(
            *external_key(key.serialize_pem().as_bytes()).unwrap(),
            pkcs8
        );
        // SEC1, as OpenSSL writes it (curve parameters and public key inside)...
        let (_, body, _) = der_tlv(&pkcs8).unwrap();
        let (_, _, rest) = der_tlv(body).unwrap();
        let (_, _, rest) = der_tlv(rest).unwrap();
        let (TAG_OCTET_STRING, ring_sec1, _) = der_tlv(rest).unwrap() else {
            panic!("PKCS#8 layout")
        };
        let (_, sec1_body, _) = der_tlv(ring_sec1).unwrap();
        let (_, _, rest) = der_tlv(sec1_body).unwrap();
        let (_, private, public_field) = der_tlv(rest).unwrap();
        let mut openssl_body = der_encode(TAG_INTEGER, &[1]);
        openssl_body.extend(der_encode(TAG_OCTET_STRING, private));
        openssl_body.extend(der_encode(0xa0, &der_encode(TAG_OID, OID_P256)));
        openssl_body.extend_from_slice(public_field);
        let openssl_sec1 = der_encode(TAG_SEQUENCE, &openssl_body);
        // ...and without the curve parameters.
        for sec1 in [openssl_sec1.as_slice(), ring_sec1] {
            let converted = external_key(relabel(&pem(sec1), "EC PRIVATE KEY").as_bytes()).unwrap();
            assert_eq!(load_key(&converted).unwrap(), public);
        }
        // Ed25519 in PKCS#8 too; text around the block is ignored.
        let ed = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let ed_pem = format!("key:\n{}", relabel(&pem(ed.as_ref()), "PRIVATE KEY"));
        assert_eq!(*external_key(ed_pem.as_bytes()).unwrap(), ed.as_ref());
    }

    #[test]
    fn external_key_refuses_what_it_cannot_use() {
        let bad_key = |pem: &[u8]| match external_key(pem) {
            Err(CertError::BadKey(why)) => why,
            other => panic!("{other:?}"),
        };
        bad_key(b"");
        bad_key(b"garbage");
        bad_key(b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n");
        let why = bad_key(relabel(&pem(b"\x30\x03\x02\x01\x00"), "PRIVATE KEY").as_bytes());
        assert!(why.contains("PKCS#8"), "{why}");
        bad_key(relabel(&pem(b"\x30\x03\x02\x01\x00"), "EC PRIVATE KEY").as_bytes());
        bad_key(relabel(&pem(b"\x30\x03\x02\x01\x00"), "RSA PRIVATE KEY").as_bytes());
        let why = bad_key(relabel(&pem(b"\x30\x00"), "ENCRYPTED PRIVATE KEY").as_bytes());
        assert!(why.contains("encrypted"), "{why}");
        let why = bad_key(pem(b"\x30\x00").as_bytes());
        assert!(why.contains("no private key"), "{why}");
        let two = KeyPair::generate().unwrap().serialize_pem().repeat(2);
        assert!(bad_key(two.as_bytes()).contains("more than one"));

        // A well-formed key of a kind the TLS stack cannot use.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let alg_id = der_encode(
            TAG_SEQUENCE,
            &[
                der_encode(TAG_OID, OID_EC_PUBLIC_KEY),
                der_encode(TAG_OID, OID_P521),
            ]
            .concat(),
        );
        let pkcs8 = pkcs8_wrap(&alg_id, b"\x30\x00");
        assert_eq!(
            external_key(relabel(&pem(&pkcs8), "PRIVATE KEY").as_bytes()),
            Err(CertError::UnsupportedKey {
                algorithm: "ECDSA P-521".into()
            })
        );
        let ed448 = pkcs8_wrap(
            &der_encode(TAG_SEQUENCE, &der_encode(TAG_OID, OID_ED448)),
            b"",
        );
        assert_eq!(
            external_key(relabel(&pem(&ed448), "PRIVATE KEY").as_bytes()),
            Err(CertError::UnsupportedKey {
                algorithm: "Ed448".into()
            })
        );
        let dsa = pkcs8_wrap(
            &der_encode(TAG_SEQUENCE, &der_encode(TAG_OID, OID_DSA)),
            b"",
        );
        let err = check_import(&dsa, b"", &[], 0).unwrap_err();
        assert_eq!(err, CertError::NoCertificate);
        assert!(
            load_key(&dsa)
                .unwrap_err()
                .to_string()
                .contains("DSA is not supported")
        );
        // A P-256 key whose bytes are damaged: named, without key bytes in the message.
        let mut broken = key.serialize_der();
        let last = broken.len() - 1;
        broken[last] ^= 0xff;
        let why = bad_key(relabel(&pem(&broken), "PRIVATE KEY").as_bytes());
        assert!(why.starts_with("ECDSA P-256 key rejected"), "{why}");
        assert!(
            !why.contains(&crate::hex::encode(&broken[last - 4..])),
            "{why}"
        );
    }

    #[test]
    fn info_reports_the_leaf() {
        let pki = Pki::new(&["mx.example.test", "smtp.example.test"], Issue::default());
        let got = info((pki.chain() + &pki.root.cert.pem()).as_bytes()).unwrap();
        assert_eq!(
            got,
            CertInfo {
                subject: "CN=mx.example.test".into(),
                issuer: "CN=Test Intermediate, O=Sealgate Test".into(),
                sans: names(&["mx.example.test", "smtp.example.test"]),
                not_before: ts(2025, 1, 1),
                not_after: ts(2027, 1, 1),
                sha256: crate::x509::sha256_hex(pki.leaf.der()),
                chain_len: 3,
            }
        );
        assert_eq!(got.sha256.len(), 64);
        // info judges nothing: an expired chain out of order still reports its first certificate.
        let odd = info((pki.inter.cert.pem() + &pki.leaf.pem()).as_bytes()).unwrap();
        assert_eq!(odd.subject, "CN=Test Intermediate, O=Sealgate Test");
        assert!(odd.sans.is_empty());
        assert_eq!(info(b""), Err(CertError::NoCertificate));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(ts(2027, 1, 1) - 1), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        let _ = rfc3339(u64::MAX);
    }

    #[test]
    fn der_lengths_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 65_535, 65_536] {
            let content = vec![0u8; len];
            let tlv = der_encode(TAG_OCTET_STRING, &content);
            assert_eq!(tlv.len(), 1 + len_len(len) + len);
            let (tag, got, rest) = der_tlv(&tlv).unwrap();
            assert_eq!((tag, got.len(), rest.len()), (TAG_OCTET_STRING, len, 0));
        }
    }
}
