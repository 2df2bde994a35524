//! TLS set-up for the benchmarks: a client config that accepts any
//! certificate, and a throw-away self-signed server config for the sink.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use thiserror::Error;

/// TLS sessions remembered by the client for resumption.
pub const CLIENT_SESSION_CACHE: usize = 1024;

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The self-signed certificate could not be generated.
    #[error("generating the self-signed certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate verifier that accepts every server certificate.
///
/// DANGEROUS: it makes TLS worthless against an active attacker. It exists
/// because `sealctl bench smtp` measures servers, typically with test
/// certificates; chain and name are not checked. Handshake signatures are
/// still verified, so the client does the same cryptographic work as a real
/// one.
#[derive(Debug)]
pub struct NoCertificateVerification {
    algorithms: WebPkiSupportedAlgorithms,
}

impl NoCertificateVerification {
    /// A verifier checking handshake signatures with `provider`'s algorithms.
    pub fn new(provider: &CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for NoCertificateVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The benchmark client config: any certificate accepted
/// ([`NoCertificateVerification`]), sessions cached in memory for resumption.
pub fn dangerous_bench_client_config() -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = Arc::new(NoCertificateVerification::new(&provider));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(
        CLIENT_SESSION_CACHE,
    )));
    Ok(Arc::new(config))
}

/// A server config with a fresh in-memory self-signed ECDSA P-256
/// certificate for `names`, and stateless session tickets for resumption.
pub fn self_signed_server_config(names: &[&str]) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let certified = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_build() {
        let client = dangerous_bench_client_config().expect("client config");
        assert!(client.enable_sni);
        let server = self_signed_server_config(&["localhost"]).expect("server config");
        assert!(server.ticketer.enabled());
    }
}
