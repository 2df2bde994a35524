//! `[[route]]`: domain match, destination, outbound TLS level and its settings.
//!
//! Per route, in this order: the domain (and that no earlier route has it), the destination,
//! the level, `ca`, `fingerprints`, that a maildir route has no TLS settings, and
//! `client_certificate`.

use super::raw::RawRoute;
use super::values::{domain_name, fingerprints, host_port};
use super::{
    CaConfig, CertificateConfig, ConfigError, Destination, DomainMatch, Route, TlsConfig, TlsLevel,
    invalid,
};

/// The levels by their config names (`TlsLevel::name`), in the order the error lists them.
const LEVELS: [TlsLevel; 7] = [
    TlsLevel::None,
    TlsLevel::May,
    TlsLevel::Encrypt,
    TlsLevel::Verify,
    TlsLevel::Fingerprint,
    TlsLevel::Dane,
    TlsLevel::DaneOnly,
];

/// Routes may name the CAs and certificates of `tls`; the DANE levels need a validating
/// resolver (`dnssec`).
pub(super) fn check(
    raw: &[RawRoute],
    tls: &TlsConfig,
    dnssec: bool,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes: Vec<Route> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = format!("route[{i}]");
        let domain = domain(&key, &r.domain)?;
        let dane = matches!(r.tls.as_deref(), Some("dane" | "dane-only"));
        if dane && !dnssec {
            return Err(invalid(
                format!("{key}.tls"),
                "dane needs a validating resolver: set dnssec = true in [dns]",
            ));
        }
        if routes.iter().any(|x| x.domain == domain) {
            return Err(invalid(
                format!("{key}.domain"),
                format!("{:?} has two routes", r.domain),
            ));
        }
        routes.push(route(&key, r, domain, tls)?);
    }
    Ok(routes)
}

/// The rest of one route, once its domain is known to be new.
fn route(
    key: &str,
    r: &RawRoute,
    domain: DomainMatch,
    tls: &TlsConfig,
) -> Result<Route, ConfigError> {
    let destination = destination(key, r)?;
    let level = level(key, r.tls.as_deref())?;
    if let Some(ca) = &r.ca {
        check_ca(key, ca, level, &tls.cas)?;
    }
    let fingerprints = pinned(key, r.fingerprints.as_deref(), level)?;
    if matches!(destination, Destination::Maildir(_))
        && (r.tls.is_some() || r.client_certificate.is_some())
    {
        return Err(invalid(
            format!("{key}.tls"),
            "a maildir route has no TLS settings",
        ));
    }
    if let Some(cc) = &r.client_certificate {
        check_client_certificate(key, cc, &tls.certificates)?;
    }
    Ok(Route {
        domain,
        destination,
        tls: level,
        ca: r.ca.clone(),
        fingerprints,
        client_certificate: r.client_certificate.clone(),
    })
}

/// `*`, `.parent` (any subdomain) or an exact domain.
fn domain(key: &str, d: &str) -> Result<DomainMatch, ConfigError> {
    let key = format!("{key}.domain");
    Ok(match d.trim() {
        "*" => DomainMatch::Any,
        d => match d.strip_prefix('.') {
            Some(parent) => DomainMatch::Subdomains(domain_name(&key, parent)?),
            None => DomainMatch::Exact(domain_name(&key, d)?),
        },
    })
}

/// Exactly one of `next_hop` (not empty), `mx = true` (with an optional `port`), `maildir`.
fn destination(key: &str, r: &RawRoute) -> Result<Destination, ConfigError> {
    let kinds =
        usize::from(r.next_hop.is_some()) + usize::from(r.mx) + usize::from(r.maildir.is_some());
    if kinds != 1 {
        return Err(invalid(
            key,
            "give exactly one of next_hop, mx = true, maildir",
        ));
    }
    if r.port.is_some() && !r.mx {
        return Err(invalid(
            format!("{key}.port"),
            "only with mx = true (next hops carry their own port)",
        ));
    }
    Ok(if let Some(hops) = &r.next_hop {
        let hop_key = format!("{key}.next_hop");
        if hops.is_empty() {
            return Err(invalid(hop_key, "is empty"));
        }
        Destination::NextHops(
            hops.iter()
                .map(|h| host_port(&hop_key, h))
                .collect::<Result<Vec<_>, _>>()?,
        )
    } else if r.mx {
        Destination::Mx(r.port.unwrap_or(25))
    } else {
        Destination::Maildir(r.maildir.clone().unwrap_or_default())
    })
}

/// `tls`: a level by its config name, `may` when absent.
fn level(key: &str, v: Option<&str>) -> Result<TlsLevel, ConfigError> {
    let name = v.unwrap_or("may");
    LEVELS
        .into_iter()
        .find(|l| l.name() == name)
        .ok_or_else(|| {
            invalid(
                format!("{key}.tls"),
                format!("{name:?}: use none, may, encrypt, verify, fingerprint, dane or dane-only"),
            )
        })
}

/// `ca`: only at `verify`, and the name of a `[[tls.ca]]` entry.
fn check_ca(key: &str, ca: &str, level: TlsLevel, cas: &[CaConfig]) -> Result<(), ConfigError> {
    if level != TlsLevel::Verify {
        return Err(invalid(format!("{key}.ca"), "only with tls = \"verify\""));
    }
    if !cas.iter().any(|c| c.name == ca) {
        return Err(invalid(
            format!("{key}.ca"),
            format!("{ca:?} is not in tls.ca"),
        ));
    }
    Ok(())
}

/// `fingerprints`: well-formed, required at `fingerprint` and refused at any other level.
fn pinned(key: &str, v: Option<&[String]>, level: TlsLevel) -> Result<Vec<String>, ConfigError> {
    let key = format!("{key}.fingerprints");
    let fingerprints = fingerprints(&key, v)?;
    match (level, fingerprints.is_empty()) {
        (TlsLevel::Fingerprint, true) => Err(invalid(
            key,
            "tls = \"fingerprint\" needs at least one pinned SHA-256 fingerprint",
        )),
        (TlsLevel::Fingerprint, false) | (_, true) => Ok(fingerprints),
        (_, false) => Err(invalid(key, "only with tls = \"fingerprint\"")),
    }
}

/// `client_certificate`: the name of a `[[tls.certificates]]` entry.
fn check_client_certificate(
    key: &str,
    cc: &str,
    certificates: &[CertificateConfig],
) -> Result<(), ConfigError> {
    if !certificates.iter().any(|c| c.name == cc) {
        return Err(invalid(
            format!("{key}.client_certificate"),
            format!("{cc:?} is not in tls.certificates"),
        ));
    }
    Ok(())
}
