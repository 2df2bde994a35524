//! From the TOML shape to the typed [`Config`]: the sections in the order their errors are
//! reported (the first failing check wins), and the two one-key sections `[device]` and `[dns]`.

use std::net::{IpAddr, SocketAddr};

use super::raw::{RawConfig, RawDevice, RawDns};
use super::values::domain_name;
use super::{Config, ConfigError, auth, invalid, mgmt, queue, routes, smtp, tls};

impl RawConfig {
    /// Checks every section; `[mgmt]` needs the SMTP listeners, routes the TLS names.
    pub(super) fn check(self) -> Result<Config, ConfigError> {
        let hostname = check_device(&self.device)?;
        let smtp = smtp::check(&self.smtp)?;
        let queue = queue::check(&self.queue)?;
        let tls = tls::check(&self.tls)?;
        let dns_resolvers = check_dns(&self.dns)?;
        let mgmt = mgmt::check(&self.mgmt, &smtp)?;
        let routes = routes::check(&self.route, &tls)?;
        let auth = auth::check(&self.auth, &smtp, &tls.cas, &self.recipients)?;
        let recipients = auth::recipients(&self.recipients, &smtp, &auth)?;
        Ok(Config {
            hostname,
            smtp,
            queue,
            tls,
            dns_resolvers,
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

/// `[dns]`: name servers as `IP` (port 53) or `IP:port`; none given means the system's.
fn check_dns(d: &RawDns) -> Result<Vec<SocketAddr>, ConfigError> {
    d.resolver
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| invalid("dns.resolver", format!("{s:?} is not an IP[:port]")))
        })
        .collect()
}
