//! DNS for delivery: MX lookup (RFC 5321 §5.1: preference order, implicit MX, null MX per
//! RFC 7505) and address lookup of next-hop names, through hickory-resolver with the resolver
//! addresses from the config (never the C library's resolver).

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DnsFailure {
    /// The domain does not exist (NXDOMAIN) or publishes a null MX: a permanent failure.
    #[error("{0}")]
    Permanent(String),
    /// Anything else (timeout, SERVFAIL): try again later.
    #[error("{0}")]
    Temporary(String),
}

#[derive(Debug, Clone)]
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// Uses the given name servers, or the system's when `servers` is empty.
    pub fn new(servers: &[SocketAddr]) -> Result<Dns, String> {
        let builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| e.to_string())?
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
        let resolver = builder.build().map_err(|e| e.to_string())?;
        Ok(Dns { resolver })
    }

    /// Mail exchangers of `domain`, best first; the domain itself when it has no MX.
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<String>, DnsFailure> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                if mx.len() == 1 && mx.first().is_some_and(|(_, h)| h == "." || h.is_empty()) {
                    return Err(DnsFailure::Permanent(format!(
                        "5.1.10 {domain} does not accept mail (null MX, RFC 7505)"
                    )));
                }
                mx.retain(|(_, h)| h != "." && !h.is_empty());
                mx.sort_by_key(|(p, _)| *p);
                if mx.is_empty() {
                    return Ok(vec![domain.to_string()]);
                }
                Ok(mx
                    .into_iter()
                    .map(|(_, h)| h.trim_end_matches('.').to_string())
                    .collect())
            }
            Err(e) => classify(domain, e).map(|()| vec![domain.to_string()]),
        }
    }

    /// Addresses of a host name (an IP literal resolves to itself).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) => match classify(host, e) {
                Ok(()) => Err(DnsFailure::Permanent(format!(
                    "5.4.4 host {host} has no address"
                ))),
                Err(f) => Err(f),
            },
        }
    }
}

/// `Ok(())` for "exists but has no records of that type" (then implicit MX applies).
fn classify(name: &str, e: NetError) -> Result<(), DnsFailure> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => {
            if nr.response_code == ResponseCode::NXDomain {
                Err(DnsFailure::Permanent(format!(
                    "5.1.2 domain {name} does not exist"
                )))
            } else {
                Ok(())
            }
        }
        other => Err(DnsFailure::Temporary(format!(
            "4.4.3 DNS lookup of {name} failed: {other}"
        ))),
    }
}
