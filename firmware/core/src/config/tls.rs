//! `[tls]`: policy settings, `[[tls.certificates]]`, `[[tls.ca]]` and `[[tls.peers]]`.
//!
//! Checked in this order: `downgrade`, certificates, CAs, peers (which name CAs), then the
//! durations, `max_peers` and `force`.

use std::path::PathBuf;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::raw::{RawCa, RawCertificate, RawPeer, RawTls};
use super::values::{
    Range, TIMEOUT, cidrs, days, domain_names, duration_in, ip_addr, name, unique,
};
use super::{CaConfig, CertificateConfig, ConfigError, Downgrade, PeerConfig, TlsConfig, invalid};

pub(super) fn check(t: &RawTls) -> Result<TlsConfig, ConfigError> {
    let downgrade = downgrade(t.downgrade.as_deref())?;
    let certificates = certificates(&t.certificates)?;
    let cas = cas(&t.ca)?;
    let peers = peers(&t.peers, &cas)?;
    Ok(TlsConfig {
        handshake_timeout: duration_in(
            "tls.handshake_timeout",
            t.handshake_timeout.as_deref(),
            Duration::from_secs(30),
            TIMEOUT,
        )?,
        broken_tls_ttl: duration_in(
            "tls.broken_tls_ttl",
            t.broken_tls_ttl.as_deref(),
            days(3),
            Range {
                min: Duration::ZERO,
                max: days(365),
            },
        )?,
        downgrade,
        downgrade_window: duration_in(
            "tls.downgrade_window",
            t.downgrade_window.as_deref(),
            days(30),
            Range {
                min: Duration::ZERO,
                max: days(3650),
            },
        )?,
        max_peers: match t.max_peers.unwrap_or(10_000) {
            n @ 1..=1_000_000 => n,
            _ => return Err(invalid("tls.max_peers", "must be 1 to 1000000")),
        },
        system_roots: t
            .system_roots
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt")),
        force: cidrs("tls.force", &t.force)?,
        dev_self_signed: t.dev_self_signed.unwrap_or(false),
        certificates,
        cas,
        peers,
    })
}

/// `tls.downgrade`: `refuse` (default) or `allow`.
fn downgrade(v: Option<&str>) -> Result<Downgrade, ConfigError> {
    match v.unwrap_or("refuse") {
        "refuse" => Ok(Downgrade::Refuse),
        "allow" => Ok(Downgrade::Allow),
        other => Err(invalid(
            "tls.downgrade",
            format!("{other:?}: use \"refuse\" or \"allow\""),
        )),
    }
}

/// `[[tls.certificates]]`: valid unique names, key and certificate files together or not at all.
fn certificates(raw: &[RawCertificate]) -> Result<Vec<CertificateConfig>, ConfigError> {
    let mut out: Vec<CertificateConfig> = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let key = format!("tls.certificates[{i}]");
        name(format!("{key}.name"), &c.name)?;
        unique(
            format!("{key}.name"),
            &c.name,
            out.iter().map(|x| x.name.as_str()),
        )?;
        if c.cert_file.is_some() != c.key_file.is_some() {
            return Err(invalid(key, "cert_file and key_file go together"));
        }
        let addresses_key = format!("{key}.local_addresses");
        let local_addresses = c
            .local_addresses
            .iter()
            .map(|s| ip_addr(&addresses_key, s))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(CertificateConfig {
            name: c.name.clone(),
            local_addresses,
            server_names: domain_names(&format!("{key}.server_names"), &c.server_names)?,
            cert_file: c.cert_file.clone(),
            key_file: c.key_file.clone(),
        });
    }
    Ok(out)
}

/// `[[tls.ca]]`: each entry has a valid unique name and exactly one of `pem`, `file`, holding
/// at least one parseable CERTIFICATE block (and nothing unparseable).
fn cas(raw: &[RawCa]) -> Result<Vec<CaConfig>, ConfigError> {
    let mut out: Vec<CaConfig> = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let key = format!("tls.ca[{i}]");
        name(format!("{key}.name"), &c.name)?;
        unique(
            format!("{key}.name"),
            &c.name,
            out.iter().map(|x| x.name.as_str()),
        )?;
        let (pem, pem_key) = ca_source(&key, c)?;
        out.push(CaConfig {
            name: c.name.clone(),
            certs: ca_certs(&pem_key, &pem)?,
        });
    }
    Ok(out)
}

/// The PEM text of a `[[tls.ca]]` entry and the key it came from (`….pem` or `….file`).
fn ca_source(key: &str, c: &RawCa) -> Result<(Vec<u8>, String), ConfigError> {
    match (&c.pem, &c.file) {
        (Some(p), None) => Ok((p.clone().into_bytes(), format!("{key}.pem"))),
        (None, Some(f)) => {
            let k = format!("{key}.file");
            let bytes = std::fs::read(f)
                .map_err(|e| invalid(&k, format!("cannot read {}: {e}", f.display())))?;
            Ok((bytes, k))
        }
        _ => Err(invalid(key, "give exactly one of pem, file")),
    }
}

/// The DER of each CERTIFICATE block in `pem`: at least one, each a usable trust anchor.
fn ca_certs(key: &str, pem: &[u8]) -> Result<Vec<Vec<u8>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .map(|r| r.map(|d| d.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(key, "no CERTIFICATE block"));
    }
    if !certs.iter().all(|der| webpki_anchor_ok(der)) {
        return Err(invalid(key, "not a usable X.509 CA certificate"));
    }
    Ok(certs)
}

/// Whether `der` can serve as a trust anchor (parses as an X.509 certificate).
fn webpki_anchor_ok(der: &[u8]) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der.to_vec())).is_ok()
}

/// `[[tls.peers]]`: at least one network each, and a CA named in `[[tls.ca]]`.
fn peers(raw: &[RawPeer], cas: &[CaConfig]) -> Result<Vec<PeerConfig>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, p)| {
            let key = format!("tls.peers[{i}]");
            if p.networks.is_empty() {
                return Err(invalid(format!("{key}.networks"), "is empty"));
            }
            let networks = cidrs(&format!("{key}.networks"), &p.networks)?;
            if !cas.iter().any(|c| c.name == p.ca) {
                return Err(invalid(
                    format!("{key}.ca"),
                    format!("{:?} is not in tls.ca", p.ca),
                ));
            }
            Ok(PeerConfig {
                networks,
                ca: p.ca.clone(),
            })
        })
        .collect()
}
