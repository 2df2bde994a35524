//! TLS set-up for the benchmarks: a client config that accepts any
//! certificate (with or without session resumption), and a throw-away
//! self-signed server config for the sink.

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, ServerConfig};
use sealgate_core::verifiers::ServerCertCheck;
use thiserror::Error;

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
/// one. Build it with [`ServerCertCheck::accept_any`].
pub type NoCertificateVerification = ServerCertCheck;

/// Whether and how the benchmark client resumes TLS sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientResumption {
    /// rustls' in-memory session store ([`Resumption::in_memory_sessions`]),
    /// shared by every connection of the run and sized for this many
    /// sessions (the number of concurrent connections): TLS 1.3 tickets, TLS
    /// 1.2 session ids and tickets, whatever the server offers. rustls keys
    /// the store by server name and keeps at most 8 TLS 1.3 tickets per name,
    /// each used once; every resumed session stores the new tickets the
    /// server sends.
    InMemory(usize),
    /// No resumption: every handshake is full ([`Resumption::disabled`]).
    Disabled,
}

/// The benchmark client config: any certificate accepted
/// ([`NoCertificateVerification`]), sessions resumed per `resumption`.
/// Build it once per run and share it, so that the sessions of one
/// connection can be resumed by the next.
pub fn dangerous_bench_client_config(
    resumption: ClientResumption,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = Arc::new(NoCertificateVerification::accept_any(provider.clone()));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = match resumption {
        // A size of 0 would remember nothing: keep at least one.
        ClientResumption::InMemory(sessions) => Resumption::in_memory_sessions(sessions.max(1)),
        ClientResumption::Disabled => Resumption::disabled(),
    };
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
    use rustls::pki_types::ServerName;

    #[test]
    fn configs_build() {
        let client =
            dangerous_bench_client_config(ClientResumption::InMemory(32)).expect("client config");
        assert!(client.enable_sni);
        let client =
            dangerous_bench_client_config(ClientResumption::Disabled).expect("client config");
        assert!(client.enable_sni);
        let server = self_signed_server_config(&["localhost"]).expect("server config");
        assert!(server.ticketer.enabled());
    }

    /// Moves every pending TLS record from `from` to `to`.
    fn transfer(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).expect("write_tls");
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).expect("read_tls");
        }
        to.process_new_packets().expect("process_new_packets");
    }

    /// One in-memory handshake, plus the tickets the server sends after it.
    fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> rustls::HandshakeKind {
        let name = ServerName::try_from("localhost").expect("name");
        let mut c = rustls::Connection::Client(
            rustls::ClientConnection::new(Arc::clone(client), name).expect("client"),
        );
        let mut s = rustls::Connection::Server(
            rustls::ServerConnection::new(Arc::clone(server)).expect("server"),
        );
        for _ in 0..10 {
            transfer(&mut c, &mut s);
            transfer(&mut s, &mut c);
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        c.handshake_kind().expect("handshake kind")
    }

    #[test]
    fn resumption_on_and_off() {
        use rustls::HandshakeKind::{Full, Resumed};
        let server = self_signed_server_config(&["localhost"]).expect("server config");
        let on = dangerous_bench_client_config(ClientResumption::InMemory(4)).expect("client");
        let kinds: Vec<_> = (0..3).map(|_| handshake(&on, &server)).collect();
        assert_eq!(kinds, [Full, Resumed, Resumed]);
        let off = dangerous_bench_client_config(ClientResumption::Disabled).expect("client");
        let kinds: Vec<_> = (0..3).map(|_| handshake(&off, &server)).collect();
        assert_eq!(kinds, [Full, Full, Full]);
    }
}
