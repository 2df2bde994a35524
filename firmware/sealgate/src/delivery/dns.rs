//! DNS for delivery: MX lookup (RFC 5321 §5.1: preference order, implicit MX, null MX per
//! RFC 7505), address lookup of next-hop names and, with `[dns] dnssec = true`, TLSA lookup
//! for DANE (RFC 7672) — through hickory-resolver with the resolver addresses from the config
//! (never the C library's resolver), validating DNSSEC in process from the configured trust
//! anchor (the IANA root keys by default).

use std::net::IpAddr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};

use sealgate_core::config::DnsConfig;
use sealgate_core::delivery::{self as decide, Source, Status};
use sealgate_proto::dane::{DaneState, MAX_RECORDS, Tlsa};

/// The resolver could not be set up (no system configuration, bad name server, a trust
/// anchor that does not parse).
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("DNS resolver: {0}")]
    Net(#[from] NetError),
    #[error("dns.trust_anchor: {0}")]
    TrustAnchor(String),
}

#[derive(Debug, Clone)]
pub struct Dns {
    resolver: TokioResolver,
    /// DNSSEC is validated (`[dns] dnssec`).
    dnssec: bool,
}

/// The MX hosts of a domain, best first, and whether the MX RRset was DNSSEC-validated (DANE
/// applies to its hosts only then, RFC 7672 §2.2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHosts {
    pub hosts: Vec<String>,
    pub secure: bool,
}

impl Dns {
    /// Uses the given name servers, or the system's when there are none; validates DNSSEC
    /// when `dnssec` is on.
    pub fn new(config: &DnsConfig) -> Result<Dns, ResolverError> {
        let servers = &config.resolvers;
        let mut builder = if servers.is_empty() {
            TokioResolver::builder_tokio()?
        } else {
            let ns = servers
                .iter()
                .map(|s| {
                    let mut c = NameServerConfig::udp_and_tcp(s.ip());
                    for conn in &mut c.connections {
                        conn.port = s.port();
                    }
                    c
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(ns),
                Default::default(),
            )
        };
        if config.dnssec {
            builder.options_mut().validate = true;
            // A trust anchor given as a path in the options is ignored by hickory 0.26 (it
            // silently keeps the built-in root keys); given here, it is used.
            if let Some(text) = &config.trust_anchor {
                let anchors = text
                    .parse::<TrustAnchors>()
                    .map_err(|e| ResolverError::TrustAnchor(e.to_string()))?;
                builder = builder.with_trust_anchor(Arc::new(anchors));
            }
        }
        let resolver = builder.build()?;
        Ok(Dns {
            resolver,
            dnssec: config.dnssec,
        })
    }

    /// Mail exchangers of `domain`, best first; the domain itself when it has no MX (then not
    /// `secure`: only a validated MX RRset is). A domain that does not exist or publishes a
    /// null MX is a permanent failure (`550 5.1.x`), anything else (timeout, SERVFAIL, a
    /// bogus answer) a temporary one (`4.4.3`).
    pub async fn mx_hosts(&self, domain: &str) -> Result<MxHosts, Status> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let records: Vec<_> = lookup
                    .answers()
                    .iter()
                    .filter(|r| matches!(r.data, RData::MX(_)))
                    .collect();
                let secure = self.dnssec
                    && !records.is_empty()
                    && records.iter().all(|r| r.proof.is_secure());
                let answer = records
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                let hosts = decide::mx_hosts(domain, answer)?;
                Ok(MxHosts { hosts, secure })
            }
            Err(e) => classify(domain, e).map(|()| MxHosts {
                hosts: vec![domain.to_string()],
                secure: false,
            }),
        }
    }

    /// The TLSA records of `_PORT._tcp.HOST` as DANE needs them (RFC 7672 §2.2): secure
    /// records; insecure (an unsigned zone, or no records at all); or failed (bogus, SERVFAIL,
    /// timeout), when this host must not be used now.
    pub async fn tlsa(&self, host: &str, port: u16) -> DaneState {
        if !self.dnssec {
            return DaneState::Insecure("DNSSEC validation is off".into());
        }
        let owner = format!("_{port}._tcp.{}.", host.trim_end_matches('.'));
        match self.resolver.lookup(owner.as_str(), RecordType::TLSA).await {
            Ok(lookup) => {
                let records: Vec<_> = lookup
                    .answers()
                    .iter()
                    .filter(|r| matches!(r.data, RData::TLSA(_)))
                    .take(MAX_RECORDS)
                    .collect();
                if records.is_empty() {
                    return DaneState::Insecure(format!("{owner} has no TLSA records"));
                }
                match records.iter().map(|r| r.proof).min().unwrap_or_default() {
                    Proof::Secure => DaneState::Secure(
                        records
                            .iter()
                            .filter_map(|r| match &r.data {
                                RData::TLSA(t) => Some(Tlsa {
                                    usage: t.cert_usage.into(),
                                    selector: t.selector.into(),
                                    matching: t.matching.into(),
                                    data: t.cert_data.clone(),
                                }),
                                _ => None,
                            })
                            .collect(),
                    ),
                    Proof::Insecure => {
                        DaneState::Insecure(format!("the zone of {owner} is not DNSSEC-signed"))
                    }
                    other => DaneState::Failed(format!("the TLSA records of {owner} are {other}")),
                }
            }
            Err(e) => tlsa_error(&owner, e),
        }
    }

    /// Addresses of a host name (an IP literal resolves to itself).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, Status> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) => match classify(host, e) {
                Ok(()) => Err(Status::permanent(
                    Source::Dns,
                    4,
                    4,
                    format!("host {host} has no address"),
                )),
                Err(f) => Err(f),
            },
        }
    }
}

/// `Ok(())` for "exists but has no records of that type" (then implicit MX applies).
fn classify(name: &str, e: NetError) -> Result<(), Status> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => {
            if nr.response_code == ResponseCode::NXDomain {
                Err(Status::permanent(
                    Source::Dns,
                    1,
                    2,
                    format!("domain {name} does not exist"),
                ))
            } else {
                Ok(())
            }
        }
        other => Err(Status::transient(
            Source::Dns,
            4,
            3,
            format!("DNS lookup of {name} failed: {other}"),
        )),
    }
}

/// A TLSA lookup that returned no records: none exist (validated or in an unsigned zone: both
/// mean "no DANE", RFC 7672 §2.2), or the answer could not be had or validated.
fn tlsa_error(owner: &str, e: NetError) -> DaneState {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if matches!(
                nr.response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            ) =>
        {
            DaneState::Insecure(format!("{owner} has no TLSA records"))
        }
        NetError::Dns(DnsError::Nsec { proof, .. }) if proof.is_insecure() => {
            DaneState::Insecure(format!("{owner} has no TLSA records (unsigned zone)"))
        }
        other => DaneState::Failed(format!("TLSA lookup of {owner}: {other}")),
    }
}
