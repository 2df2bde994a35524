//! TLS material and rustls configurations: server certificates chosen by local address, then
//! SNI, then the default; the delivery client's configuration.
//!
//! Only TLS 1.2 and 1.3 with AEAD suites (rustls' ring provider defaults); session tickets on.
//! Until the sealed store lands, certificates come from PEM files named in the config or, on
//! the dev board with `tls.dev_self_signed`, a generated self-signed ECDSA P-256 certificate
//! under `STATE/certs/NAME.{crt,key}.pem` (key file mode 0600).
//!
//! E-mail VPN peers (`[[tls.peers]]`): when any are configured, every server config asks for a
//! client certificate (optional, hinting the peers' CA names). The handshake itself accepts any
//! client certificate whose handshake signature is valid; the chain is checked afterwards by
//! [`ServerTls::check_client`] against the CA of the peer whose networks hold the client
//! address, and only that CA. So an ordinary MTA that happens to present some certificate is
//! not refused, and a certificate from one peer's CA is worth nothing from another peer's
//! network.

pub mod client;
pub mod stream;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use sealgate_core::cidr::Cidr;
use sealgate_core::config::Config;
use sealgate_core::sealed::SealedStore;
use sealgate_core::verifiers::{OfferClientAuth, provider};
use sealgate_core::x509::subject_of;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate {name}: cannot read {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate {name}: {path}: {reason}")]
    Pem {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("certificate {name}: private key unusable: {reason}")]
    Key { name: String, reason: String },
    #[error("certificate {name}: cannot generate self-signed certificate: {reason}")]
    Generate { name: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls.ca {name}: {reason}")]
    Ca { name: String, reason: String },
    #[error("client certificate {name}: {reason}")]
    ClientCertificate { name: String, reason: String },
}

/// Server TLS for all listeners: one rustls config per local address with its own certificate,
/// plus the default.
#[derive(Debug)]
pub struct ServerTls {
    default: Arc<ServerConfig>,
    by_local: HashMap<IpAddr, Arc<ServerConfig>>,
    /// `[[tls.peers]]` in config order, each with a verifier for its CA alone.
    peers: Vec<PeerVerifier>,
    /// Every loaded certificate by name (routes present them as client certificates).
    keys: HashMap<String, Arc<CertifiedKey>>,
}

#[derive(Debug)]
struct PeerVerifier {
    networks: Vec<Cidr>,
    ca: String,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// What the client certificate of a session is worth (see [`ServerTls::check_client`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCheck {
    /// The client address is in no peer's networks: the certificate (if any) grants nothing.
    NotPeer,
    /// A peer address that presented no certificate.
    NoCertificate,
    /// A peer address whose certificate chains to that peer's CA: the subject (`CN=…, O=…`).
    Verified(String),
    /// A peer address whose certificate does not verify against that peer's CA.
    Rejected(String),
}

/// Per-peer verifiers, and the verifier that offers client authentication (none without peers).
type PeerVerifiers = (Vec<PeerVerifier>, Option<Arc<dyn ClientCertVerifier>>);

/// Builds one verifier per peer from the CA named in the config, and the union of the peers'
/// CAs for the hints sent in the CertificateRequest.
fn peer_verifiers(config: &Config) -> Result<PeerVerifiers, TlsError> {
    let ca_err = |name: &str, reason: String| TlsError::Ca {
        name: name.into(),
        reason,
    };
    let roots_of = |name: &str| -> Result<rustls::RootCertStore, TlsError> {
        let ca = config
            .ca(name)
            .ok_or_else(|| ca_err(name, "not configured".into()))?;
        let mut roots = rustls::RootCertStore::empty();
        for der in &ca.certs {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| ca_err(name, e.to_string()))?;
        }
        Ok(roots)
    };
    let mut peers = Vec::new();
    let mut union = rustls::RootCertStore::empty();
    for p in &config.tls.peers {
        let roots = roots_of(&p.ca)?;
        union.roots.extend(roots.roots.iter().cloned());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| ca_err(&p.ca, e.to_string()))?;
        peers.push(PeerVerifier {
            networks: p.networks.clone(),
            ca: p.ca.clone(),
            verifier,
        });
    }
    if peers.is_empty() {
        return Ok((peers, None));
    }
    let hints = WebPkiClientVerifier::builder_with_provider(Arc::new(union), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ca_err("(peers)", e.to_string()))?
        .root_hint_subjects()
        .to_vec();
    let offer: Arc<dyn ClientCertVerifier> = Arc::new(OfferClientAuth::new(hints));
    Ok((peers, Some(offer)))
}

impl ServerTls {
    /// `None` when no certificate is installed: then STARTTLS is not offered and implicit-TLS
    /// listeners refuse connections (encryption is off until a certificate is present).
    pub fn load(
        config: &Config,
        store: Option<&SealedStore>,
    ) -> Result<Option<ServerTls>, TlsError> {
        let mut keys: HashMap<String, Arc<CertifiedKey>> = HashMap::new();
        for c in &config.tls.certificates {
            let ck = match (&c.cert_file, &c.key_file) {
                (Some(cf), Some(kf)) => load_certified_key(&c.name, cf, kf)?,
                _ => {
                    let stored = store.and_then(|s| {
                        Some((s.get(&key_record(&c.name))?, s.get(&chain_record(&c.name))?))
                    });
                    let Some((key, chain)) = stored else {
                        tracing::warn!(name = %c.name, "no certificate installed under this name");
                        continue;
                    };
                    sealed_certified_key(&c.name, key, chain)?
                }
            };
            keys.insert(c.name.clone(), ck);
        }
        let default_key = match keys.get("default").or_else(|| keys.values().next()) {
            Some(k) => k.clone(),
            None => return Ok(None),
        };
        let mut by_name = HashMap::new();
        for c in &config.tls.certificates {
            if let Some(k) = keys.get(&c.name) {
                for n in &c.server_names {
                    by_name.insert(n.clone(), k.clone());
                }
            }
        }
        let by_name = Arc::new(by_name);
        let (peers, offer) = peer_verifiers(config)?;
        let ticketer = rustls::crypto::ring::Ticketer::new()?;
        let build = |fallback: Arc<CertifiedKey>| -> Result<Arc<ServerConfig>, TlsError> {
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?;
            let builder = match &offer {
                Some(v) => builder.with_client_cert_verifier(v.clone()),
                None => builder.with_no_client_auth(),
            };
            let mut sc = builder.with_cert_resolver(Arc::new(Resolver {
                by_name: by_name.clone(),
                fallback,
            }));
            sc.ticketer = ticketer.clone();
            // Our suite order (AES-128-GCM first, see `provider`), not the client's.
            sc.ignore_client_order = true;
            sc.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
            Ok(Arc::new(sc))
        };
        let mut by_local = HashMap::new();
        for c in &config.tls.certificates {
            if let Some(k) = keys.get(&c.name) {
                for ip in &c.local_addresses {
                    by_local.insert(*ip, build(k.clone())?);
                }
            }
        }
        Ok(Some(ServerTls {
            default: build(default_key)?,
            by_local,
            peers,
            keys,
        }))
    }

    /// Checks the client certificate chain of a session from `ip` against the CA of the first
    /// peer whose networks contain `ip` (and only that CA).
    pub fn check_client(&self, ip: IpAddr, certs: Option<&[CertificateDer<'_>]>) -> ClientCheck {
        let Some(peer) = self
            .peers
            .iter()
            .find(|p| p.networks.iter().any(|c| c.contains(ip)))
        else {
            return ClientCheck::NotPeer;
        };
        let Some((end_entity, intermediates)) = certs.and_then(|c| c.split_first()) else {
            return ClientCheck::NoCertificate;
        };
        match peer
            .verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
        {
            Ok(_) => ClientCheck::Verified(
                subject_of(end_entity).unwrap_or_else(|| "(unparsed subject)".into()),
            ),
            Err(e) => ClientCheck::Rejected(format!("not valid for tls.ca {}: {e}", peer.ca)),
        }
    }

    /// The certificate and key loaded under `name` (`[[tls.certificates]]`).
    pub fn certified_key(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.keys.get(name).cloned()
    }

    /// The configuration for a connection that arrived on `local`.
    pub fn for_local(&self, local: IpAddr) -> Arc<ServerConfig> {
        self.by_local.get(&local).unwrap_or(&self.default).clone()
    }
}

#[derive(Debug)]
struct Resolver {
    by_name: Arc<HashMap<String, Arc<CertifiedKey>>>,
    fallback: Arc<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .or(Some(&self.fallback))
            .cloned()
    }
}

fn load_certified_key(name: &str, cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |p: &Path| {
        fs::read(p).map_err(|source| TlsError::Read {
            name: name.into(),
            path: p.into(),
            source,
        })
    };
    let pem_err = |p: &Path, reason: String| TlsError::Pem {
        name: name.into(),
        path: p.into(),
        reason,
    };
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(cert, "no CERTIFICATE block".into()));
    }
    let key_pem = read(key)?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key, e.to_string()))?;
    let ck = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| TlsError::Key {
        name: name.into(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(ck))
}

/// Sealed-store record of certificate `name`'s private key (PKCS#8 DER).
pub fn key_record(name: &str) -> String {
    format!("tls/{name}/key")
}

/// Sealed-store record of certificate `name`'s chain (PEM, leaf first).
pub fn chain_record(name: &str) -> String {
    format!("tls/{name}/chain")
}

/// Certificate `name` with its key from the sealed store, if installed and usable (the
/// management API serves one outside `[[tls.certificates]]`).
pub(crate) fn sealed_key(store: &SealedStore, name: &str) -> Option<Arc<CertifiedKey>> {
    let key = store.get(&key_record(name))?;
    let chain = store.get(&chain_record(name))?;
    sealed_certified_key(name, key, chain).ok()
}

/// A certificate and key from the sealed store.
pub(crate) fn sealed_certified_key(
    name: &str,
    key: &[u8],
    chain_pem: &[u8],
) -> Result<Arc<CertifiedKey>, TlsError> {
    let path = PathBuf::from(format!("(sealed store) {}", chain_record(name)));
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            name: name.into(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            name: name.into(),
            path,
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key_der = PrivateKeyDer::Pkcs8(key.to_vec().into());
    let ck = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| TlsError::Key {
        name: name.into(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(ck))
}

/// Dev board convenience (`tls.dev_self_signed`): a self-signed ECDSA P-256 certificate for the
/// host name, made on the box into the sealed store as `default` when no `default` exists
/// (staged; the caller commits). Returns whether one was made.
pub fn ensure_dev_certificate(config: &Config, store: &mut SealedStore) -> Result<bool, TlsError> {
    let wanted = config.tls.dev_self_signed
        && config
            .tls
            .certificates
            .iter()
            .any(|c| c.name == "default" && c.cert_file.is_none());
    if !wanted || store.get(&chain_record("default")).is_some() {
        return Ok(false);
    }
    let ck = rcgen::generate_simple_self_signed(vec![config.hostname.clone()]).map_err(|e| {
        TlsError::Generate {
            name: "default".into(),
            reason: e.to_string(),
        }
    })?;
    store.put(&key_record("default"), ck.signing_key.serialize_der());
    store.put(&chain_record("default"), ck.cert.pem().into_bytes());
    Ok(true)
}

/// Writes the public chain of every certificate in the store to `STATE/certs/NAME.crt.pem`
/// (for admins and clients that pin it; private keys never leave the store).
pub fn export_chains(store: &SealedStore, state_dir: &Path) {
    let dir = state_dir.join("certs");
    for name in store.names() {
        let Some(cert) = name
            .strip_prefix("tls/")
            .and_then(|n| n.strip_suffix("/chain"))
        else {
            continue;
        };
        let Some(chain) = store.get(&name) else {
            continue;
        };
        let path = dir.join(format!("{cert}.crt.pem"));
        if fs::read(&path).is_ok_and(|old| old == chain) {
            continue;
        }
        let tmp = path.with_extension("tmp");
        let written = fs::create_dir_all(&dir)
            .and_then(|()| {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o644)
                    .open(&tmp)?;
                f.write_all(chain)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot export a certificate chain");
        }
    }
}

/// `TLSv1.3` style name of a negotiated version.
pub fn version_name(v: Option<rustls::ProtocolVersion>) -> String {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
        Some(other) => format!("{other:?}"),
        None => "unknown".into(),
    }
}

/// Name of a negotiated cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
/// The IANA name of a negotiated suite (`TLS_AES_256_GCM_SHA384`,
/// `TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384`), as other MTAs log it.
pub fn suite_name(s: Option<rustls::SupportedCipherSuite>) -> String {
    s.and_then(|s| s.suite().as_str())
        .map(|n| match n.strip_prefix("TLS13_") {
            Some(rest) => format!("TLS_{rest}"),
            None => n.to_string(),
        })
        .unwrap_or_else(|| "unknown".into())
}
