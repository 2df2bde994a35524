//! From the TOML shape to the typed [`Config`]: the sections in the order their errors are
//! reported (the first failing check wins), and the two one-key sections `[device]` and `[dns]`.

use std::net::{IpAddr, SocketAddr};

use super::raw::{RawConfig, RawDevice, RawDns};
use super::values::domain_name;
use super::{Config, ConfigError, DnsConfig, auth, invalid, mgmt, queue, routes, smtp, tls};

impl RawConfig {
    /// Checks every section; `[mgmt]` needs the SMTP listeners, routes the TLS names.
    pub(super) fn check(self) -> Result<Config, ConfigError> {
        let hostname = check_device(&self.device)?;
        let smtp = smtp::check(&self.smtp)?;
        let queue = queue::check(&self.queue)?;
        let tls = tls::check(&self.tls)?;
        let dns = check_dns(&self.dns)?;
        let mgmt = mgmt::check(&self.mgmt, &smtp)?;
        let routes = routes::check(&self.route, &tls, dns.dnssec)?;
        let auth = auth::check(&self.auth, &smtp, &tls.cas, &self.recipients)?;
        let recipients = auth::recipients(&self.recipients, &smtp, &auth)?;
        Ok(Config {
            hostname,
            smtp,
            queue,
            tls,
            dns,
            routes,
            mgmt,
            auth,
            recipients,
        })
    }
}

/// `[device]`: the host name (default `localhost`).
fn check_device(d: &RawDevice) -> Result<String, ConfigError> {
    domain_name(
        "device.hostname",
        d.hostname.as_deref().unwrap_or("localhost"),
    )
}

/// Longest `dns.trust_anchor` text.
const MAX_TRUST_ANCHOR: usize = 16 * 1024;

/// `[dns]`: name servers as `IP` (port 53) or `IP:port` (none given means the system's);
/// `dnssec`; a `trust_anchor` (only with `dnssec`) that parses as DNSKEY records and has a key.
fn check_dns(d: &RawDns) -> Result<DnsConfig, ConfigError> {
    let resolvers = d
        .resolver
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| invalid("dns.resolver", format!("{s:?} is not an IP[:port]")))
        })
        .collect::<Result<_, _>>()?;
    let dnssec = d.dnssec.unwrap_or(false);
    if let Some(text) = &d.trust_anchor {
        check_trust_anchor(text, dnssec)?;
    }
    Ok(DnsConfig {
        resolvers,
        dnssec,
        trust_anchor: d.trust_anchor.clone(),
    })
}

fn check_trust_anchor(text: &str, dnssec: bool) -> Result<(), ConfigError> {
    let key = "dns.trust_anchor";
    if !dnssec {
        return Err(invalid(key, "only with dnssec = true"));
    }
    if text.len() > MAX_TRUST_ANCHOR {
        return Err(invalid(key, format!("over {MAX_TRUST_ANCHOR} bytes")));
    }
    let anchors = text
        .parse::<hickory_proto::dnssec::TrustAnchors>()
        .map_err(|e| invalid(key, format!("not DNSKEY records in zone-file form: {e}")))?;
    // The parser files keys of other names apart; the root's must be there.
    if anchors.is_empty() {
        return Err(invalid(
            key,
            "holds no DNSKEY record of the root zone (\".\")",
        ));
    }
    Ok(())
}
