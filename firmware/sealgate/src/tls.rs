//! TLS material and rustls configurations: server certificates chosen by local address, then
//! SNI, then the default; the delivery client's configuration.
//!
//! Only TLS 1.2 and 1.3 with AEAD suites (rustls' ring provider defaults); session tickets on.
//! Until the sealed store lands, certificates come from PEM files named in the config or, on
//! the dev board with `tls.dev_self_signed`, a generated self-signed ECDSA P-256 certificate
//! under `STATE/certs/NAME.{crt,key}.pem` (key file mode 0600).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, ServerConfig, SignatureScheme};

use crate::config::Config;

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
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server TLS for all listeners: one rustls config per local address with its own certificate,
/// plus the default.
#[derive(Debug)]
pub struct ServerTls {
    default: Arc<ServerConfig>,
    by_local: HashMap<IpAddr, Arc<ServerConfig>>,
}

impl ServerTls {
    /// `None` when no certificate is installed: then STARTTLS is not offered and implicit-TLS
    /// listeners refuse connections (encryption is off until a certificate is present).
    pub fn load(config: &Config, state_dir: &Path) -> Result<Option<ServerTls>, TlsError> {
        let mut keys: HashMap<String, Arc<CertifiedKey>> = HashMap::new();
        for c in &config.tls.certificates {
            let (cert_path, key_path) = match (&c.cert_file, &c.key_file) {
                (Some(cf), Some(kf)) => (cf.clone(), kf.clone()),
                _ => {
                    let dir = state_dir.join("certs");
                    let cp = dir.join(format!("{}.crt.pem", c.name));
                    let kp = dir.join(format!("{}.key.pem", c.name));
                    if !cp.exists() && config.tls.dev_self_signed && c.name == "default" {
                        generate_self_signed(&c.name, &config.hostname, &cp, &kp)?;
                        tracing::warn!(
                            cert = %cp.display(),
                            "generated a self-signed development certificate for {}",
                            config.hostname
                        );
                    }
                    if !cp.exists() {
                        tracing::warn!(name = %c.name, "no certificate installed under this name");
                        continue;
                    }
                    (cp, kp)
                }
            };
            keys.insert(
                c.name.clone(),
                load_certified_key(&c.name, &cert_path, &key_path)?,
            );
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
        let ticketer = rustls::crypto::ring::Ticketer::new()?;
        let build = |fallback: Arc<CertifiedKey>| -> Result<Arc<ServerConfig>, TlsError> {
            let mut sc = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Resolver {
                    by_name: by_name.clone(),
                    fallback,
                }));
            sc.ticketer = ticketer.clone();
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
        }))
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

fn generate_self_signed(name: &str, host: &str, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let gen_err = |reason: String| TlsError::Generate {
        name: name.into(),
        reason,
    };
    let ck = rcgen::generate_simple_self_signed(vec![host.to_string()])
        .map_err(|e| gen_err(e.to_string()))?;
    let dir = cert.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| gen_err(e.to_string()))?;
    let write = |p: &Path, data: &str, mode: u32| -> std::io::Result<()> {
        let tmp = p.with_extension("tmp");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, p)
    };
    // Key first: a certificate file without its key is never left behind.
    write(key, &ck.signing_key.serialize_pem(), 0o600).map_err(|e| gen_err(e.to_string()))?;
    write(cert, &ck.cert.pem(), 0o644).map_err(|e| gen_err(e.to_string()))?;
    Ok(())
}

/// The delivery client's TLS configuration for levels that do not check the certificate
/// (`may`, `encrypt`): the handshake is still authenticated by the peer's key, the identity is
/// only recorded. Per-peer session resumption via rustls' client session cache.
pub fn client_config_unverified() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let mut cc = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RecordOnlyVerifier { provider }))
        .with_no_client_auth();
    cc.resumption = rustls::client::Resumption::in_memory_sessions(1024);
    Ok(Arc::new(cc))
}

/// Accepts any certificate (opportunistic TLS) but still checks the handshake signatures.
#[derive(Debug)]
struct RecordOnlyVerifier {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RecordOnlyVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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
pub fn suite_name(s: Option<rustls::SupportedCipherSuite>) -> String {
    s.and_then(|s| s.suite().as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}
