//! DNS for delivery: MX lookup (RFC 5321 §5.1: preference order, implicit MX, null MX per
//! RFC 7505) and address lookup of next-hop names, through hickory-resolver with the resolver
//! addresses from the config (never the C library's resolver).

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;

use sealgate_core::delivery::{self as decide, Source, Status};

/// The resolver could not be set up (no system configuration, bad name server).
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct ResolverError(#[from] NetError);

#[derive(Debug, Clone)]
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// Uses the given name servers, or the system's when `servers` is empty.
    pub fn new(servers: &[SocketAddr]) -> Result<Dns, ResolverError> {
        let builder = if servers.is_empty() {
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
        let resolver = builder.build()?;
        Ok(Dns { resolver })
    }

    /// Mail exchangers of `domain`, best first; the domain itself when it has no MX. A
    /// domain that does not exist or publishes a null MX is a permanent failure (`550 5.1.x`),
    /// anything else (timeout, SERVFAIL) a temporary one (`4.4.3`).
    pub async fn mx_hosts(&self, domain: &str) -> Result<Vec<String>, Status> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let answer = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                decide::mx_hosts(domain, answer)
            }
            Err(e) => classify(domain, e).map(|()| vec![domain.to_string()]),
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
