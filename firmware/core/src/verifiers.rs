//! The rustls certificate verifiers of the gateway and its tools, which keep rustls' handshake
//! signature checks and judge the certificate by a check of their own: [`OfferClientAuth`]
//! (servers: ask for a client certificate, judge it after the handshake) and
//! [`ServerCertCheck`] (clients: accept any certificate to judge after the handshake, or one
//! matching a pin). No I/O.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The crypto provider of every TLS config: rustls' ring provider, TLS 1.2 and 1.3 with AEAD
/// suites only, AES-128-GCM preferred. All of ring's suites stay offered; AES-128-GCM comes
/// first because its SHA-256 runs on the CPU's SHA instructions where the SHA-384 of
/// AES-256-GCM runs in software (5% of a relay's CPU, measured), at a security level that
/// matches the X25519 and P-256 key exchange anyway.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| suite_rank(s.suite()));
    Arc::new(p)
}

/// Preference of a cipher suite in [`provider`]: lower first; unknown suites keep their
/// order behind the known ones (the sort is stable).
fn suite_rank(s: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as C;
    match s {
        C::TLS13_AES_128_GCM_SHA256 => 0,
        C::TLS13_AES_256_GCM_SHA384 => 1,
        C::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 3,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 4,
        _ => 5,
    }
}

/// The handshake signature checks every verifier of ours keeps, whatever it decides about the
/// certificate itself: the peer must prove possession of the certificate's key.
#[derive(Debug)]
struct HandshakeSignatures(Arc<CryptoProvider>);

/// The handshake-signature methods of a rustls verifier, the same in a
/// [`ClientCertVerifier`] and a [`ServerCertVerifier`]: expands, inside either impl for a type
/// with a `signatures: HandshakeSignatures` field, to `verify_tls12_signature`,
/// `verify_tls13_signature` (each calling the `rustls::crypto` function of its name) and
/// `supported_verify_schemes`, all with the provider's algorithms.
macro_rules! handshake_signature_methods {
    () => {
        handshake_signature_methods!(verify_tls12_signature);
        handshake_signature_methods!(verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.signatures
                .0
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
    ($verify:ident) => {
        fn $verify(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &self.signatures.0.signature_verification_algorithms;
            rustls::crypto::$verify(message, cert, dss, algorithms)
        }
    };
}

/// Asks every client for a certificate (optional), hinting `hints` (the peers' CAs; none for
/// the management API). Any certificate is accepted in the handshake as long as the client
/// proves possession of its key; the certificate is judged after the handshake: per peer
/// (`sealgate::tls::ServerTls::check_client`), or by its pin per request (the management API).
#[derive(Debug)]
pub struct OfferClientAuth {
    hints: Vec<rustls::DistinguishedName>,
    signatures: HandshakeSignatures,
}

impl OfferClientAuth {
    /// Hinting `hints`, checking handshake signatures with [`provider`]'s algorithms.
    pub fn new(hints: Vec<rustls::DistinguishedName>) -> Self {
        Self {
            hints,
            signatures: HandshakeSignatures(provider()),
        }
    }
}

impl ClientCertVerifier for OfferClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    handshake_signature_methods!();
}

/// How [`ServerCertCheck`] judges the server's end-entity certificate.
type EndEntityCheck = dyn Fn(&CertificateDer<'_>) -> Result<(), rustls::Error> + Send + Sync;

/// A server certificate verifier that checks the handshake signatures as always (the server
/// must prove possession of its certificate's key) and judges the certificate by a check of
/// the caller's alone: chain, name and OCSP response are not looked at.
///
/// [`ServerCertCheck::accept_any`] accepts every certificate, for callers that judge it after
/// the handshake or not at all; [`ServerCertCheck::new`] takes the check, e.g. a pin.
pub struct ServerCertCheck {
    signatures: HandshakeSignatures,
    check: Box<EndEntityCheck>,
}

impl ServerCertCheck {
    /// Accepts the end-entity certificate when `check` returns `Ok`; its error fails the
    /// handshake. Handshake signatures are checked with `provider`'s algorithms.
    pub fn new(
        provider: Arc<CryptoProvider>,
        check: impl Fn(&CertificateDer<'_>) -> Result<(), rustls::Error> + Send + Sync + 'static,
    ) -> Self {
        Self {
            signatures: HandshakeSignatures(provider),
            check: Box::new(check),
        }
    }

    /// Accepts every certificate (DANGEROUS unless it is judged after the handshake);
    /// handshake signatures are still checked with `provider`'s algorithms.
    pub fn accept_any(provider: Arc<CryptoProvider>) -> Self {
        Self::new(provider, |_| Ok(()))
    }
}

impl std::fmt::Debug for ServerCertCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertCheck")
            .field("signatures", &self.signatures)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ServerCertCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        (self.check)(end_entity).map(|()| ServerCertVerified::assertion())
    }

    handshake_signature_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite as C;

    #[test]
    fn aes_128_gcm_is_preferred_and_every_suite_is_still_offered() {
        let ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let ring = rustls::crypto::ring::default_provider();
        assert_eq!(ours.len(), ring.cipher_suites.len(), "nothing dropped");
        assert_eq!(ours[0], C::TLS13_AES_128_GCM_SHA256);
        assert_eq!(ours[1], C::TLS13_AES_256_GCM_SHA384);
        let pos = |c| ours.iter().position(|s| *s == c).unwrap();
        assert!(
            pos(C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
                < pos(C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
        );
    }
}
