//! The delivery client's TLS: rustls client configurations (one per client certificate a route
//! presents, each with its own per-peer session cache) and the certificate facts the policy
//! engine judges (`sealgate_proto::policy::CertFacts`).
//!
//! The handshake itself accepts any server certificate whose handshake signature is valid (the
//! peer must prove possession of the certificate's key); what the certificate is worth is
//! decided after the handshake, before any mail is sent, by [`ClientTls::facts`] and the policy
//! engine: chain to the route's pinned CA (or the system roots) and host name for `verify`,
//! SHA-256 of certificate or SPKI for `fingerprint`, nothing for `may` and `encrypt` (recorded
//! only). One verifier that records, one place that judges: the same facts go to logs, the peer
//! table and the decision. A resumed session carries the chain of the session it resumes
//! (rustls keeps it with the ticket), so it is judged the same way.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, SignatureScheme};
use sealgate_core::dane;
use sealgate_proto::policy::{CertFacts, DaneMatch, Level, Tlsa};

use crate::tls::{ServerTls, TlsError};
use sealgate_core::config::Config;
use sealgate_core::verifiers::{ServerCertCheck, provider};
use sealgate_core::x509::{sha256_hex, spki_of};

/// Sessions remembered per client configuration (rustls keys them by server name).
const SESSION_CACHE: usize = 1024;

/// The delivery client's TLS material.
#[derive(Debug)]
pub struct ClientTls {
    /// No client certificate.
    anonymous: Arc<ClientConfig>,
    /// Per `[[tls.certificates]]` name that some route presents.
    with_cert: HashMap<String, Arc<ClientConfig>>,
    /// Per `[[tls.ca]]` name that some `verify` route pins.
    cas: HashMap<String, Arc<WebPkiServerVerifier>>,
    /// `tls.system_roots`, loaded only when a `verify` route has no `ca`.
    system: Option<Arc<WebPkiServerVerifier>>,
    /// Per `[[auth.backend]]` name: a configuration that verifies the chain and the backend's
    /// `tls_name` during the handshake (nothing is said before it verified).
    backends: HashMap<String, Arc<ClientConfig>>,
}

/// How a certificate was judged, for the delivery log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertCheck {
    /// `verify`: chain and name checked.
    Verified,
    /// `fingerprint`: matched a pin.
    Pinned,
    /// `dane`: matched a secure TLSA record.
    Dane,
    /// `may`, `encrypt`: recorded only.
    Unchecked,
}

impl CertCheck {
    pub fn of(level: Level) -> CertCheck {
        match level {
            Level::Verify => CertCheck::Verified,
            Level::Fingerprint => CertCheck::Pinned,
            Level::Dane | Level::DaneOnly => CertCheck::Dane,
            Level::None | Level::May | Level::Encrypt => CertCheck::Unchecked,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CertCheck::Verified => "verified",
            CertCheck::Pinned => "pinned",
            CertCheck::Dane => "dane",
            CertCheck::Unchecked => "unchecked",
        }
    }
}

impl ClientTls {
    /// Builds the configurations the routes need. A route's client certificate must be loaded
    /// (`server` holds every certificate by name); a `verify` route without `ca` needs the
    /// system roots file.
    pub fn load(config: &Config, server: Option<&ServerTls>) -> Result<ClientTls, TlsError> {
        let mut with_cert = HashMap::new();
        let mut cas = HashMap::new();
        let mut system = None;
        for route in &config.routes {
            if let Some(name) = &route.client_certificate
                && !with_cert.contains_key(name)
            {
                let key = server.and_then(|s| s.certified_key(name)).ok_or_else(|| {
                    TlsError::ClientCertificate {
                        name: name.clone(),
                        reason: "no certificate is installed under this name".into(),
                    }
                })?;
                with_cert.insert(name.clone(), build(Some(key))?);
            }
            if route.tls != Level::Verify {
                continue;
            }
            match &route.ca {
                Some(name) if !cas.contains_key(name) => {
                    let ca = config.ca(name).ok_or_else(|| TlsError::Ca {
                        name: name.clone(),
                        reason: "not configured".into(),
                    })?;
                    let ders = ca.certs.iter().map(|d| CertificateDer::from(d.clone()));
                    cas.insert(name.clone(), verifier(name, ders.collect())?);
                }
                Some(_) => {}
                None if system.is_none() => {
                    system = Some(system_roots(&config.tls.system_roots)?);
                }
                None => {}
            }
        }
        let backends = backend_configs(config, &mut cas, &mut system)?;
        Ok(ClientTls {
            anonymous: build(None)?,
            with_cert,
            cas,
            system,
            backends,
        })
    }

    /// The configuration for the AUTH backend `name`.
    pub fn backend(&self, name: &str) -> Option<Arc<ClientConfig>> {
        self.backends.get(name).cloned()
    }

    /// The configuration presenting `client_certificate` (or none).
    pub fn config(&self, client_certificate: Option<&str>) -> Arc<ClientConfig> {
        client_certificate
            .and_then(|n| self.with_cert.get(n))
            .unwrap_or(&self.anonymous)
            .clone()
    }

    /// What the peer's certificate chain is worth: chain and name checked only for `verify`
    /// (against `ca`, else the system roots), matched against `tlsa` only for `dane`,
    /// fingerprints always.
    pub fn facts(
        &self,
        level: Level,
        ca: Option<&str>,
        tlsa: &[Tlsa],
        host: &str,
        chain: &[CertificateDer<'_>],
    ) -> (CertFacts, Option<String>) {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            let none = CertFacts {
                chain_verified: false,
                name_matches: false,
                fingerprint_sha256: String::new(),
                spki_sha256: String::new(),
                dane: DaneMatch::NoMatch("the server sent no certificate".into()),
            };
            return (none, Some("the server sent no certificate".into()));
        };
        let mut facts = CertFacts {
            chain_verified: false,
            name_matches: false,
            fingerprint_sha256: sha256_hex(end_entity),
            spki_sha256: spki_of(end_entity).map(sha256_hex).unwrap_or_default(),
            dane: DaneMatch::NotChecked,
        };
        if level == Level::Dane {
            facts.dane = dane_match(tlsa, host, chain);
            return (facts, None);
        }
        if level != Level::Verify {
            return (facts, None);
        }
        let verifier = match ca {
            Some(name) => self.cas.get(name),
            None => self.system.as_ref(),
        };
        let Some(verifier) = verifier else {
            return (facts, Some("no trust anchors loaded for this route".into()));
        };
        let Ok(name) = ServerName::try_from(host.to_string()) else {
            return (facts, Some(format!("{host:?} is not a valid server name")));
        };
        let result =
            verifier.verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now());
        let detail = match result {
            Ok(_) => {
                facts.chain_verified = true;
                facts.name_matches = true;
                None
            }
            // webpki checks the chain first, the name last: a name error means the chain is
            // good.
            Err(rustls::Error::InvalidCertificate(
                e @ (CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }),
            )) => {
                facts.chain_verified = true;
                Some(format!("{e:?}"))
            }
            Err(e) => {
                facts.name_matches = ParsedCertificate::try_from(end_entity)
                    .and_then(|c| rustls::client::verify_server_name(&c, &name))
                    .is_ok();
                Some(e.to_string())
            }
        };
        (facts, detail)
    }
}

/// The chain against the usable TLSA records (RFC 7672 §3.1): DANE-EE matches the leaf, with
/// no name or date check; DANE-TA matches a certificate the leaf must chain to (webpki, with
/// that certificate as the one trust anchor: signatures, dates, key usage) and the leaf must be
/// valid for `host`, the MX host name.
fn dane_match(tlsa: &[Tlsa], host: &str, chain: &[CertificateDer<'_>]) -> DaneMatch {
    let ders: Vec<&[u8]> = chain.iter().map(|c| c.as_ref()).collect();
    if let Some(r) = dane::ee_match(tlsa, &ders) {
        return DaneMatch::Matched(r.clone());
    }
    let mut why = Vec::new();
    for c in dane::ta_candidates(tlsa, &ders) {
        match ta_verify(&c.cert, host, chain) {
            Ok(()) => return DaneMatch::Matched(c.record.clone()),
            Err(e) => why.push(format!("{} matched, but {e}", c.record.describe())),
        }
    }
    if why.is_empty() {
        why.push(dane::describe_leaf(&ders));
    }
    DaneMatch::NoMatch(why.join("; "))
}

/// The leaf chains to `anchor` and is valid for `host`.
fn ta_verify(anchor: &[u8], host: &str, chain: &[CertificateDer<'_>]) -> Result<(), String> {
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(anchor.to_vec()))
        .map_err(|e| format!("the anchor is not usable: {e}"))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| e.to_string())?;
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| format!("{host:?} is not a name"))?;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("the chain does not verify to it for {host}: {e}"))
}

fn build(client_cert: Option<Arc<CertifiedKey>>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        // Any certificate passes the handshake (signatures checked); it is judged afterwards
        // ([`ClientTls::facts`]).
        .with_custom_certificate_verifier(Arc::new(ServerCertCheck::accept_any(provider)));
    let mut cc = match client_cert {
        Some(key) => builder.with_client_cert_resolver(Arc::new(OneClientCert(key))),
        None => builder.with_no_client_auth(),
    };
    cc.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE);
    Ok(Arc::new(cc))
}

/// One verifying configuration per AUTH backend, sharing the CA verifiers with the routes.
fn backend_configs(
    config: &Config,
    cas: &mut HashMap<String, Arc<WebPkiServerVerifier>>,
    system: &mut Option<Arc<WebPkiServerVerifier>>,
) -> Result<HashMap<String, Arc<ClientConfig>>, TlsError> {
    let mut out = HashMap::new();
    for b in &config.auth.backends {
        let inner = match &b.ca {
            Some(name) => match cas.get(name) {
                Some(v) => v.clone(),
                None => {
                    let ca = config.ca(name).ok_or_else(|| TlsError::Ca {
                        name: name.clone(),
                        reason: "not configured".into(),
                    })?;
                    let ders = ca.certs.iter().map(|d| CertificateDer::from(d.clone()));
                    let v = verifier(name, ders.collect())?;
                    cas.insert(name.clone(), v.clone());
                    v
                }
            },
            None => match system {
                Some(v) => v.clone(),
                None => system
                    .insert(system_roots(&config.tls.system_roots)?)
                    .clone(),
            },
        };
        let name = ServerName::try_from(b.tls_name.clone()).map_err(|e| TlsError::Ca {
            name: format!("auth.backend {} tls_name", b.name),
            reason: e.to_string(),
        })?;
        let cc = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
            .with_no_client_auth();
        out.insert(b.name.clone(), Arc::new(cc));
    }
    Ok(out)
}

/// Verifies the chain and a fixed name (`tls_name`), whatever host name the connection was
/// opened with: a backend reached by address is still checked by its certificate name.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn verifier(
    name: &str,
    certs: Vec<CertificateDer<'static>>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let err = |reason: String| TlsError::Ca {
        name: name.into(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in certs {
        roots.add(der).map_err(|e| err(e.to_string()))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| err(e.to_string()))
}

/// The system trust store: a PEM bundle; certificates that do not parse as trust anchors are
/// skipped (bundles carry odd ones), but an empty result is an error.
fn system_roots(path: &Path) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let name = format!("tls.system_roots {}", path.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Ca {
            name: name.clone(),
            reason: e.to_string(),
        })?
        .filter_map(Result::ok)
        .collect();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::Ca {
            name,
            reason: "no usable CA certificate".into(),
        });
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Ca {
            name,
            reason: e.to_string(),
        })
}

/// Presents one certificate to every server that asks.
#[derive(Debug)]
struct OneClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for OneClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0
            .key
            .choose_scheme(sigschemes)
            .is_some()
            .then(|| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_and_leaf(names: &[&str]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        (
            ca.der().to_vec(),
            leaf.der().to_vec(),
            rcgen::PublicKeyData::subject_public_key_info(&leaf_key),
        )
    }

    fn client_tls_with(ca: Vec<u8>) -> ClientTls {
        ClientTls {
            anonymous: build(None).unwrap(),
            with_cert: HashMap::new(),
            cas: HashMap::from([(
                "vpn".to_string(),
                verifier("vpn", vec![CertificateDer::from(ca)]).unwrap(),
            )]),
            system: None,
            backends: HashMap::new(),
        }
    }

    #[test]
    fn facts_for_verify_and_fingerprints() {
        let (ca, leaf, spki) = ca_and_leaf(&["gw2.vpn.test", "127.0.0.2"]);
        let (other_ca, _, _) = ca_and_leaf(&["x.test"]);
        let chain = [CertificateDer::from(leaf.clone())];
        let tls = client_tls_with(ca);
        let (f, why) = tls.facts(Level::Verify, Some("vpn"), &[], "gw2.vpn.test", &chain);
        assert!(f.chain_verified && f.name_matches, "{why:?}");
        assert_eq!(f.fingerprint_sha256, sha256_hex(&leaf));
        assert_eq!(f.spki_sha256, sha256_hex(&spki));
        let (f, _) = tls.facts(Level::Verify, Some("vpn"), &[], "127.0.0.2", &chain);
        assert!(f.chain_verified && f.name_matches);
        let (f, why) = tls.facts(Level::Verify, Some("vpn"), &[], "other.test", &chain);
        assert!(f.chain_verified && !f.name_matches, "{why:?}");
        assert!(why.is_some());
        let tls = client_tls_with(other_ca);
        let (f, why) = tls.facts(Level::Verify, Some("vpn"), &[], "gw2.vpn.test", &chain);
        assert!(!f.chain_verified && f.name_matches, "{why:?}");
        // `encrypt`: hashes only, nothing judged
        let (f, why) = tls.facts(Level::Encrypt, None, &[], "gw2.vpn.test", &chain);
        assert!(!f.chain_verified && why.is_none());
        assert_eq!(f.spki_sha256, sha256_hex(&spki));
        // no chain at all
        let (f, why) = tls.facts(Level::Verify, Some("vpn"), &[], "gw2.vpn.test", &[]);
        assert!(!f.chain_verified && why.is_some());
    }

    #[test]
    fn spki_of_garbage_is_none() {
        assert_eq!(spki_of(b""), None);
        assert_eq!(spki_of(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }
}
