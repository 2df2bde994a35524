//! The gateway configuration: the TOML shape of PRODUCT.md §3, parsed, checked and typed.
//!
//! Parsing yields a [`Config`] only when every semantic check passed (routes, CIDRs, addresses,
//! certificate names); each failure names the key and the reason. Keys are documented in
//! `docs/config.md`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::cidr::Cidr;

/// A configuration error, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The TOML shape (raw), as the admin writes it.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    device: RawDevice,
    #[serde(default)]
    smtp: RawSmtp,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    mgmt: RawMgmt,
    #[serde(default)]
    route: Vec<RawRoute>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    hostname: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    listen: Option<Vec<String>>,
    implicit_tls: Option<Vec<String>>,
    local_domains: Option<Vec<String>>,
    trusted_networks: Option<Vec<String>>,
    max_message_bytes: Option<u64>,
    max_recipients: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_errors: Option<u32>,
    command_timeout: Option<String>,
    data_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    max_queue_time: Option<String>,
    retry_schedule: Option<Vec<String>>,
    min_free_bytes: Option<u64>,
    max_deliveries: Option<usize>,
    connect_timeout: Option<String>,
    bind_address: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    handshake_timeout: Option<String>,
    broken_tls_ttl: Option<String>,
    downgrade: Option<String>,
    downgrade_window: Option<String>,
    max_peers: Option<usize>,
    system_roots: Option<PathBuf>,
    #[serde(default)]
    force: Vec<String>,
    dev_self_signed: Option<bool>,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
    #[serde(default)]
    ca: Vec<RawCa>,
    #[serde(default)]
    peers: Vec<RawPeer>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCa {
    name: String,
    pem: Option<String>,
    file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    #[serde(default)]
    networks: Vec<String>,
    ca: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    name: String,
    #[serde(default)]
    local_addresses: Vec<String>,
    #[serde(default)]
    server_names: Vec<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    resolver: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMgmt {
    listen: Option<Vec<String>>,
    certificate: Option<String>,
    admin_certificates: Option<Vec<String>>,
    admin_token_sha256: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    domain: String,
    next_hop: Option<Vec<String>>,
    #[serde(default)]
    mx: bool,
    port: Option<u16>,
    maildir: Option<PathBuf>,
    tls: Option<String>,
    ca: Option<String>,
    fingerprints: Option<Vec<String>>,
    client_certificate: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The checked, typed configuration.

/// The whole checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub hostname: String,
    pub smtp: SmtpConfig,
    pub queue: QueueConfig,
    pub tls: TlsConfig,
    /// Name servers for MX lookups; empty means the system's (`/etc/resolv.conf`).
    pub dns_resolvers: Vec<SocketAddr>,
    pub routes: Vec<Route>,
    pub mgmt: MgmtConfig,
}

/// `[mgmt]`: the management API (F-MGMT; endpoints in `docs/mgmt-api.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MgmtConfig {
    /// HTTPS listeners. `None` = the board's default (`127.0.0.1:8443` on the dev board,
    /// `0.0.0.0:8443` on the appliance); empty = no management API. Fixed at start.
    pub listen: Option<Vec<SocketAddr>>,
    /// Name of the served certificate (a `[[tls.certificates]]` entry or a sealed-store name).
    pub certificate: String,
    /// SHA-256 of the DER of each pinned admin client certificate.
    pub admin_certificates: Vec<[u8; 32]>,
    /// SHA-256 of each accepted bearer token (the token's bytes as sent).
    pub admin_token_sha256: Vec<[u8; 32]>,
}

impl MgmtConfig {
    /// Whether the config names any admin credential (pinned certificate or token).
    pub fn has_credentials(&self) -> bool {
        !self.admin_certificates.is_empty() || !self.admin_token_sha256.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// Listeners offering STARTTLS (when a certificate exists).
    pub listen: Vec<SocketAddr>,
    /// Listeners speaking TLS from the first byte (RFC 8314).
    pub implicit_tls: Vec<SocketAddr>,
    pub local_domains: Vec<String>,
    pub trusted_networks: Vec<Cidr>,
    pub max_message_bytes: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_errors: u32,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub max_queue_time: Duration,
    /// Delay before retry n (the last entry repeats).
    pub retry_schedule: Vec<Duration>,
    /// Below this many free bytes, new mail is refused with `452 4.3.1`.
    pub min_free_bytes: u64,
    /// Concurrent delivery attempts.
    pub max_deliveries: usize,
    pub connect_timeout: Duration,
    /// Source address of outbound SMTP connections (Postfix's `smtp_bind_address`); `None`
    /// lets the kernel choose.
    pub bind_address: Option<IpAddr>,
}

/// `tls.downgrade`: the policy engine's own type.
pub use sealgate_proto::policy::Downgrade;

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub handshake_timeout: Duration,
    pub broken_tls_ttl: Duration,
    pub downgrade: Downgrade,
    /// How long after its last TLS success a `may` peer stays under downgrade protection.
    pub downgrade_window: Duration,
    /// Bound of the persisted peer table (least recently seen peers are evicted).
    pub max_peers: usize,
    /// PEM bundle of trust anchors for `verify` routes without a `ca` (read at start-up, and
    /// only if such a route exists).
    pub system_roots: PathBuf,
    pub force: Vec<Cidr>,
    /// Dev convenience: generate a self-signed certificate for a missing `default`.
    pub dev_self_signed: bool,
    pub certificates: Vec<CertificateConfig>,
    /// CA certificates carried in the config (`[[tls.ca]]`), by name.
    pub cas: Vec<CaConfig>,
    /// E-mail VPN peers (`[[tls.peers]]`): their networks must present a client certificate
    /// chaining to their CA, and may then relay.
    pub peers: Vec<PeerConfig>,
}

/// A CA certificate carried in the config.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub name: String,
    /// DER of each certificate in the PEM (at least one).
    pub certs: Vec<Vec<u8>>,
}

/// An e-mail VPN peer: client addresses and the CA their client certificates must chain to.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub networks: Vec<Cidr>,
    /// Name of a `[[tls.ca]]` entry (checked to exist).
    pub ca: String,
}

#[derive(Debug, Clone)]
pub struct CertificateConfig {
    pub name: String,
    pub local_addresses: Vec<IpAddr>,
    pub server_names: Vec<String>,
    /// PEM files (dev board); without them the key is looked up by name in the state directory.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Outbound TLS level of a route (Postfix's names): the policy engine's own type.
pub use sealgate_proto::policy::Level as TlsLevel;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainMatch {
    /// `example.com`
    Exact(String),
    /// `.example.com`: any subdomain (not the domain itself).
    Subdomains(String),
    /// `*`
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Fixed next hops, tried in order (`host:port`).
    NextHops(Vec<(String, u16)>),
    /// DNS MX of the recipient domain (RFC 5321 §5.1), on this port (25 unless configured).
    Mx(u16),
    /// Local Maildir (absolute, or relative to the state directory).
    Maildir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub domain: DomainMatch,
    pub destination: Destination,
    pub tls: TlsLevel,
    /// `verify`: name of the `[[tls.ca]]` the peer must chain to (else `tls.system_roots`).
    pub ca: Option<String>,
    /// `fingerprint`: SHA-256 of the peer's certificate or SPKI (hex, normalised lower case).
    pub fingerprints: Vec<String>,
    /// Name of a `[[tls.certificates]]` entry presented as client certificate.
    pub client_certificate: Option<String>,
}

impl Route {
    pub fn matches(&self, domain: &str) -> bool {
        match &self.domain {
            DomainMatch::Exact(d) => d == domain,
            DomainMatch::Subdomains(parent) => domain
                .strip_suffix(parent.as_str())
                .is_some_and(|head| head.ends_with('.')),
            DomainMatch::Any => true,
        }
    }

    /// Specificity for choosing the best match: exact beats `.parent` (longer first) beats `*`.
    fn rank(&self) -> (u8, usize) {
        match &self.domain {
            DomainMatch::Exact(d) => (2, d.len()),
            DomainMatch::Subdomains(d) => (1, d.len()),
            DomainMatch::Any => (0, 0),
        }
    }
}

impl Config {
    /// The route for a recipient domain (lowercase): the most specific match.
    pub fn route_for(&self, domain: &str) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.matches(domain))
            .max_by_key(|r| r.rank())
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.smtp.trusted_networks.iter().any(|c| c.contains(ip))
    }

    /// The policy engine's settings from `[tls]`.
    pub fn policy_settings(&self) -> sealgate_proto::policy::Settings {
        sealgate_proto::policy::Settings {
            broken_tls_ttl: self.tls.broken_tls_ttl.as_secs(),
            downgrade_window: self.tls.downgrade_window.as_secs(),
            downgrade: self.tls.downgrade,
        }
    }

    pub fn is_forced_tls(&self, ip: IpAddr) -> bool {
        self.tls.force.iter().any(|c| c.contains(ip))
    }

    /// The first VPN peer whose networks contain `ip`.
    pub fn peer_for(&self, ip: IpAddr) -> Option<&PeerConfig> {
        self.tls
            .peers
            .iter()
            .find(|p| p.networks.iter().any(|c| c.contains(ip)))
    }

    /// The CA carried in the config under `name`.
    pub fn ca(&self, name: &str) -> Option<&CaConfig> {
        self.tls.cas.iter().find(|c| c.name == name)
    }

    /// Parses and checks a TOML document; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        raw.check()
    }

    /// Reads and checks a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The embedded default: a demo gateway on loopback (see README).
    pub fn embedded_default() -> Config {
        match Self::from_toml(EMBEDDED_DEFAULT, "<embedded default>") {
            Ok(c) => c,
            // The embedded text is a constant checked by a unit test; failing here is a bug.
            Err(e) => panic!("embedded default config is invalid: {e}"),
        }
    }
}

impl Config {
    /// What an appliance runs on before its first signed config: SMTP on every address (no
    /// local domains, no trusted networks: every recipient is refused, nothing relays), TLS with
    /// a self-signed certificate made in the sealed store, and the management API, so that HQ
    /// can push the first signed config.
    pub fn appliance_default(serial: &str) -> Config {
        let host: String = serial
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let text = APPLIANCE_DEFAULT.replace("@HOST@", &format!("{host}.sealgate.invalid"));
        match Self::from_toml(&text, "<appliance default>") {
            Ok(c) => c,
            // A constant checked by a unit test (the serial only contributes [a-z0-9-]).
            Err(e) => panic!("appliance default config is invalid: {e}"),
        }
    }
}

/// The appliance's configuration before its first signed config (`@HOST@` from the serial).
pub const APPLIANCE_DEFAULT: &str = r#"
[device]
hostname = "@HOST@"

[smtp]
listen = ["0.0.0.0:25"]
implicit_tls = ["0.0.0.0:465"]
local_domains = []
trusted_networks = []

[tls]
dev_self_signed = true

[[tls.certificates]]
name = "default"
"#;

/// The configuration `sealgate` runs on when given none.
pub const EMBEDDED_DEFAULT: &str = r#"
[device]
hostname = "localhost"

[smtp]
listen = ["127.0.0.1:2525"]
implicit_tls = ["127.0.0.1:4465"]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.0/8"]

[tls]
dev_self_signed = true

[[tls.certificates]]
name = "default"

[[route]]
domain = "example.test"
maildir = "maildir"
"#;

// ---------------------------------------------------------------------------------------------
// Checks.

/// Parses `30s`, `5m`, `3h`, `3d`, `250ms` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => return Some(Duration::from_millis(n)),
        "" | "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

fn duration(key: &str, v: Option<&String>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s).ok_or_else(|| {
            invalid(
                key,
                format!("{s:?} is not a duration (use e.g. 30s, 5m, 3h, 3d)"),
            )
        }),
    }
}

fn socket_addrs(key: &str, v: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    v.iter()
        .map(|s| {
            s.parse()
                .map_err(|_| invalid(key, format!("{s:?} is not an IP:port address")))
        })
        .collect()
}

/// Pinned SHA-256 fingerprints: 64 hex digits each (`:` and whitespace allowed), stored as lower
/// case hex; at most 64 of them.
fn fingerprints(key: &str, v: Option<&[String]>) -> Result<Vec<String>, ConfigError> {
    let v = v.unwrap_or(&[]);
    if v.len() > 64 {
        return Err(invalid(key, "at most 64 fingerprints"));
    }
    v.iter()
        .map(|f| {
            let hex: String = f
                .chars()
                .filter(|c| *c != ':' && !c.is_whitespace())
                .map(|c| c.to_ascii_lowercase())
                .collect();
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(hex)
            } else {
                Err(invalid(
                    key,
                    format!("{f:?} is not a SHA-256 fingerprint (64 hex digits)"),
                ))
            }
        })
        .collect()
}

fn cidrs(key: &str, v: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    v.iter()
        .map(|s| s.parse().map_err(|e| invalid(key, format!("{s:?}: {e}"))))
        .collect()
}

fn domain_name(key: &str, s: &str) -> Result<String, ConfigError> {
    let d = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(d)
    } else {
        Err(invalid(key, format!("{s:?} is not a domain name")))
    }
}

fn host_port(key: &str, s: &str) -> Result<(String, u16), ConfigError> {
    let bad = || invalid(key, format!("{s:?} is not host:port"));
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<IpAddr>().is_ok() {
        return Ok((host.to_string(), port));
    }
    Ok((domain_name(key, host)?, port))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `[[tls.ca]]`: each entry has a valid unique name and exactly one of `pem`, `file`, holding
/// at least one parseable CERTIFICATE block (and nothing unparseable).
fn check_cas(raw: &[RawCa]) -> Result<Vec<CaConfig>, ConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut out: Vec<CaConfig> = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let key = format!("tls.ca[{i}]");
        if !valid_name(&c.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?}: use letters, digits, '-' and '_'", c.name),
            ));
        }
        if out.iter().any(|x| x.name == c.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("{:?} is listed twice", c.name),
            ));
        }
        let (pem, pem_key) = match (&c.pem, &c.file) {
            (Some(p), None) => (p.clone().into_bytes(), format!("{key}.pem")),
            (None, Some(f)) => {
                let k = format!("{key}.file");
                let bytes = std::fs::read(f)
                    .map_err(|e| invalid(&k, format!("cannot read {}: {e}", f.display())))?;
                (bytes, k)
            }
            _ => return Err(invalid(key, "give exactly one of pem, file")),
        };
        let certs = CertificateDer::pem_slice_iter(&pem)
            .map(|r| r.map(|d| d.as_ref().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&pem_key, format!("bad PEM: {e}")))?;
        if certs.is_empty() {
            return Err(invalid(&pem_key, "no CERTIFICATE block"));
        }
        for der in &certs {
            let anchor = webpki_anchor_ok(der);
            if !anchor {
                return Err(invalid(&pem_key, "not a usable X.509 CA certificate"));
            }
        }
        out.push(CaConfig {
            name: c.name.clone(),
            certs,
        });
    }
    Ok(out)
}

/// Whether `der` can serve as a trust anchor (parses as an X.509 certificate).
fn webpki_anchor_ok(der: &[u8]) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(der.to_vec()))
        .is_ok()
}

impl RawConfig {
    fn check(self) -> Result<Config, ConfigError> {
        let hostname = domain_name(
            "device.hostname",
            self.device.hostname.as_deref().unwrap_or("localhost"),
        )?;

        let s = &self.smtp;
        let listen = socket_addrs("smtp.listen", s.listen.as_deref().unwrap_or(&[]))?;
        let implicit_tls = socket_addrs(
            "smtp.implicit_tls",
            s.implicit_tls.as_deref().unwrap_or(&[]),
        )?;
        if listen.is_empty() && implicit_tls.is_empty() {
            return Err(invalid(
                "smtp.listen",
                "no listener: give smtp.listen or smtp.implicit_tls",
            ));
        }
        let local_domains = s
            .local_domains
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .map(|d| domain_name("smtp.local_domains", d))
            .collect::<Result<Vec<_>, _>>()?;
        let trusted_networks = cidrs(
            "smtp.trusted_networks",
            s.trusted_networks.as_deref().unwrap_or(&[]),
        )?;
        let max_message_bytes = s.max_message_bytes.unwrap_or(52_428_800);
        if !(1024..=1 << 32).contains(&max_message_bytes) {
            return Err(invalid(
                "smtp.max_message_bytes",
                "must be between 1024 and 4294967296",
            ));
        }
        let max_recipients = s.max_recipients.unwrap_or(100);
        if !(1..=100_000).contains(&max_recipients) {
            return Err(invalid(
                "smtp.max_recipients",
                "must be between 1 and 100000",
            ));
        }
        let max_connections = s.max_connections.unwrap_or(1000);
        let max_connections_per_ip = s.max_connections_per_ip.unwrap_or(50);
        if !(1..=1_000_000).contains(&max_connections) || max_connections_per_ip == 0 {
            return Err(invalid(
                "smtp.max_connections",
                "must be between 1 and 1000000 (and max_connections_per_ip at least 1)",
            ));
        }
        let smtp = SmtpConfig {
            listen,
            implicit_tls,
            local_domains,
            trusted_networks,
            max_message_bytes,
            max_recipients,
            max_connections,
            max_connections_per_ip,
            max_errors: s.max_errors.unwrap_or(10).max(1),
            command_timeout: duration(
                "smtp.command_timeout",
                s.command_timeout.as_ref(),
                Duration::from_secs(300),
            )?,
            data_timeout: duration(
                "smtp.data_timeout",
                s.data_timeout.as_ref(),
                Duration::from_secs(180),
            )?,
        };

        let q = &self.queue;
        let retry_schedule = match &q.retry_schedule {
            None => ["1m", "5m", "15m", "30m", "1h", "2h", "4h"]
                .iter()
                .filter_map(|s| parse_duration(s))
                .collect(),
            Some(list) => list
                .iter()
                .map(|s| duration("queue.retry_schedule", Some(s), Duration::ZERO))
                .collect::<Result<Vec<_>, _>>()?,
        };
        if retry_schedule.is_empty() {
            return Err(invalid("queue.retry_schedule", "needs at least one delay"));
        }
        let queue = QueueConfig {
            max_queue_time: duration(
                "queue.max_queue_time",
                q.max_queue_time.as_ref(),
                Duration::from_secs(5 * 86_400),
            )?,
            retry_schedule,
            min_free_bytes: q.min_free_bytes.unwrap_or(64 * 1024 * 1024),
            max_deliveries: q.max_deliveries.unwrap_or(64).clamp(1, 4096),
            connect_timeout: duration(
                "queue.connect_timeout",
                q.connect_timeout.as_ref(),
                Duration::from_secs(30),
            )?,
            bind_address: q
                .bind_address
                .as_deref()
                .map(|a| {
                    a.parse::<IpAddr>().map_err(|_| {
                        invalid("queue.bind_address", format!("{a:?} is not an IP address"))
                    })
                })
                .transpose()?,
        };

        let t = &self.tls;
        let downgrade = match t.downgrade.as_deref().unwrap_or("refuse") {
            "refuse" => Downgrade::Refuse,
            "allow" => Downgrade::Allow,
            other => {
                return Err(invalid(
                    "tls.downgrade",
                    format!("{other:?}: use \"refuse\" or \"allow\""),
                ));
            }
        };
        let mut certificates = Vec::new();
        for (i, c) in t.certificates.iter().enumerate() {
            let key = format!("tls.certificates[{i}]");
            if c.name.is_empty()
                || !c
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?}: use letters, digits, '-' and '_'", c.name),
                ));
            }
            if certificates
                .iter()
                .any(|x: &CertificateConfig| x.name == c.name)
            {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?} is listed twice", c.name),
                ));
            }
            if c.cert_file.is_some() != c.key_file.is_some() {
                return Err(invalid(key, "cert_file and key_file go together"));
            }
            let local_addresses = c
                .local_addresses
                .iter()
                .map(|s| {
                    s.parse::<IpAddr>().map_err(|_| {
                        invalid(
                            format!("{key}.local_addresses"),
                            format!("{s:?} is not an IP address"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let server_names = c
                .server_names
                .iter()
                .map(|s| domain_name(&format!("{key}.server_names"), s))
                .collect::<Result<Vec<_>, _>>()?;
            certificates.push(CertificateConfig {
                name: c.name.clone(),
                local_addresses,
                server_names,
                cert_file: c.cert_file.clone(),
                key_file: c.key_file.clone(),
            });
        }
        let cas = check_cas(&t.ca)?;
        let mut peers = Vec::new();
        for (i, p) in t.peers.iter().enumerate() {
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
            peers.push(PeerConfig {
                networks,
                ca: p.ca.clone(),
            });
        }
        let tls = TlsConfig {
            handshake_timeout: duration(
                "tls.handshake_timeout",
                t.handshake_timeout.as_ref(),
                Duration::from_secs(30),
            )?,
            broken_tls_ttl: duration(
                "tls.broken_tls_ttl",
                t.broken_tls_ttl.as_ref(),
                Duration::from_secs(3 * 86_400),
            )?,
            downgrade,
            downgrade_window: duration(
                "tls.downgrade_window",
                t.downgrade_window.as_ref(),
                Duration::from_secs(30 * 86_400),
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
            certificates: Vec::new(),
            cas,
            peers,
        };

        let dns_resolvers = match &self.dns.resolver {
            None => Vec::new(),
            Some(list) => list
                .iter()
                .map(|s| {
                    s.parse::<SocketAddr>()
                        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                        .map_err(|_| invalid("dns.resolver", format!("{s:?} is not an IP[:port]")))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };

        let mgmt = self.mgmt.check(&smtp)?;

        let tls_cas = &tls.cas;
        let mut routes = Vec::new();
        for (i, r) in self.route.iter().enumerate() {
            let key = format!("route[{i}]");
            let domain = match r.domain.trim() {
                "*" => DomainMatch::Any,
                d if d.starts_with('.') => {
                    DomainMatch::Subdomains(domain_name(&format!("{key}.domain"), &d[1..])?)
                }
                d => DomainMatch::Exact(domain_name(&format!("{key}.domain"), d)?),
            };
            if routes.iter().any(|x: &Route| x.domain == domain) {
                return Err(invalid(
                    format!("{key}.domain"),
                    format!("{:?} has two routes", r.domain),
                ));
            }
            let kinds = usize::from(r.next_hop.is_some())
                + usize::from(r.mx)
                + usize::from(r.maildir.is_some());
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
            let destination = if let Some(hops) = &r.next_hop {
                if hops.is_empty() {
                    return Err(invalid(format!("{key}.next_hop"), "is empty"));
                }
                Destination::NextHops(
                    hops.iter()
                        .map(|h| host_port(&format!("{key}.next_hop"), h))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            } else if r.mx {
                Destination::Mx(r.port.unwrap_or(25))
            } else {
                Destination::Maildir(r.maildir.clone().unwrap_or_default())
            };
            let tls = match r.tls.as_deref().unwrap_or("may") {
                "none" => TlsLevel::None,
                "may" => TlsLevel::May,
                "encrypt" => TlsLevel::Encrypt,
                "verify" => TlsLevel::Verify,
                "fingerprint" => TlsLevel::Fingerprint,
                other => {
                    return Err(invalid(
                        format!("{key}.tls"),
                        format!("{other:?}: use none, may, encrypt, verify or fingerprint"),
                    ));
                }
            };
            if let Some(ca) = &r.ca {
                if tls != TlsLevel::Verify {
                    return Err(invalid(format!("{key}.ca"), "only with tls = \"verify\""));
                }
                if !tls_cas.iter().any(|c: &CaConfig| &c.name == ca) {
                    return Err(invalid(
                        format!("{key}.ca"),
                        format!("{ca:?} is not in tls.ca"),
                    ));
                }
            }
            let fingerprints =
                fingerprints(&format!("{key}.fingerprints"), r.fingerprints.as_deref())?;
            match (tls, fingerprints.is_empty()) {
                (TlsLevel::Fingerprint, true) => {
                    return Err(invalid(
                        format!("{key}.fingerprints"),
                        "tls = \"fingerprint\" needs at least one pinned SHA-256 fingerprint",
                    ));
                }
                (TlsLevel::Fingerprint, false) | (_, true) => {}
                (_, false) => {
                    return Err(invalid(
                        format!("{key}.fingerprints"),
                        "only with tls = \"fingerprint\"",
                    ));
                }
            }
            if matches!(destination, Destination::Maildir(_))
                && (r.tls.is_some() || r.client_certificate.is_some())
            {
                return Err(invalid(
                    format!("{key}.tls"),
                    "a maildir route has no TLS settings",
                ));
            }
            if let Some(cc) = &r.client_certificate
                && !certificates
                    .iter()
                    .any(|c: &CertificateConfig| &c.name == cc)
            {
                return Err(invalid(
                    format!("{key}.client_certificate"),
                    format!("{cc:?} is not in tls.certificates"),
                ));
            }
            routes.push(Route {
                domain,
                destination,
                tls,
                ca: r.ca.clone(),
                fingerprints,
                client_certificate: r.client_certificate.clone(),
            });
        }

        let tls = TlsConfig {
            certificates,
            ..tls
        };
        Ok(Config {
            hostname,
            smtp,
            queue,
            tls,
            dns_resolvers,
            routes,
            mgmt,
        })
    }
}

/// Lists of SHA-256 values (see [`fingerprints`]) as bytes.
fn sha256_list(key: &str, v: Option<&[String]>) -> Result<Vec<[u8; 32]>, ConfigError> {
    fingerprints(key, v)?
        .iter()
        .map(|hex| {
            let mut out = [0u8; 32];
            for (i, b) in out.iter_mut().enumerate() {
                *b = hex
                    .get(2 * i..2 * i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| invalid(key, format!("{hex:?} is not 64 hex digits")))?;
            }
            Ok(out)
        })
        .collect()
}

impl RawMgmt {
    fn check(&self, smtp: &SmtpConfig) -> Result<MgmtConfig, ConfigError> {
        let listen = match &self.listen {
            None => None,
            Some(v) => {
                let addrs = socket_addrs("mgmt.listen", v)?;
                if let Some(a) = addrs
                    .iter()
                    .find(|a| smtp.listen.contains(a) || smtp.implicit_tls.contains(a))
                {
                    return Err(invalid(
                        "mgmt.listen",
                        format!("{a} is also an SMTP listener"),
                    ));
                }
                Some(addrs)
            }
        };
        let certificate = self.certificate.as_deref().unwrap_or("default");
        if !valid_name(certificate) {
            return Err(invalid(
                "mgmt.certificate",
                format!("{certificate:?}: use letters, digits, '-' and '_'"),
            ));
        }
        Ok(MgmtConfig {
            listen,
            certificate: certificate.to_string(),
            admin_certificates: sha256_list(
                "mgmt.admin_certificates",
                self.admin_certificates.as_deref(),
            )?,
            admin_token_sha256: sha256_list(
                "mgmt.admin_token_sha256",
                self.admin_token_sha256.as_deref(),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default();
        assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert!(c.is_trusted("127.0.0.9".parse().unwrap()));
        assert!(!c.is_trusted("10.0.0.1".parse().unwrap()));
        assert!(c.route_for("example.test").is_some());
        assert!(c.route_for("other.test").is_none());
    }

    #[test]
    fn appliance_default_is_valid_and_relays_nothing() {
        let c = Config::appliance_default("QEMU-0A1B2C3D");
        assert_eq!(c.hostname, "qemu-0a1b2c3d.sealgate.invalid");
        assert_eq!(c.smtp.listen, vec!["0.0.0.0:25".parse().unwrap()]);
        assert!(!c.is_trusted("127.0.0.1".parse().unwrap()));
        assert!(c.route_for("example.test").is_none());
        let odd = Config::appliance_default("a b/c\"d");
        assert_eq!(odd.hostname, "a-b-c-d.sealgate.invalid");
    }

    #[test]
    fn durations() {
        let cases = [
            ("30s", Some(30_000)),
            ("5m", Some(300_000)),
            ("3d", Some(259_200_000)),
            ("250ms", Some(250)),
            ("10", Some(10_000)),
            ("5x", None),
            ("", None),
            ("m", None),
        ];
        for (s, ms) in cases {
            assert_eq!(parse_duration(s).map(|d| d.as_millis() as u64), ms, "{s}");
        }
    }

    #[test]
    fn route_specificity() {
        let c = Config::from_toml(
            r#"
            [smtp]
            listen = ["127.0.0.1:25"]
            [[route]]
            domain = "*"
            next_hop = ["127.0.0.2:25"]
            [[route]]
            domain = ".example.com"
            next_hop = ["127.0.0.3:25"]
            [[route]]
            domain = "a.example.com"
            maildir = "/tmp/m"
            "#,
            "t",
        )
        .unwrap();
        let hop = |d: &str| c.route_for(d).map(|r| r.destination.clone());
        assert_eq!(
            hop("a.example.com"),
            Some(Destination::Maildir("/tmp/m".into()))
        );
        assert_eq!(
            hop("b.example.com"),
            Some(Destination::NextHops(vec![("127.0.0.3".into(), 25)]))
        );
        assert_eq!(
            hop("example.com"),
            Some(Destination::NextHops(vec![("127.0.0.2".into(), 25)]))
        );
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("[smtp]\nlisten = [\"nope\"]", "smtp.listen"),
            (
                "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"10.0.0.0/33\"]",
                "smtp.trusted_networks",
            ),
            ("[smtp]\nlisten = []", "smtp.listen"),
            (
                "[smtp]\nlisten = [\"127.0.0.1:25\"]\n[tls]\nhandshake_timeout = \"soon\"",
                "tls.handshake_timeout",
            ),
            (
                "[smtp]\nlisten = [\"127.0.0.1:25\"]\n[[route]]\ndomain = \"x.test\"\nmx = true\nmaildir = \"m\"",
                "route[0]",
            ),
            (
                "[smtp]\nlisten = [\"127.0.0.1:25\"]\n[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"sometimes\"",
                "route[0].tls",
            ),
            (
                "[smtp]\nlisten = [\"127.0.0.1:25\"]\n[[route]]\ndomain = \"x.test\"\nmx = true\nclient_certificate = \"vpn\"",
                "route[0].client_certificate",
            ),
        ];
        for (text, key) in cases {
            match Config::from_toml(text, "t") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected error on {key}, got {other:?}"),
            }
        }
        assert!(matches!(
            Config::from_toml("[smtp]\nlisten = [\"127.0.0.1:25\"]\nbogus = 1", "t"),
            Err(ConfigError::Syntax { .. })
        ));
    }

    #[test]
    fn mgmt_section() {
        let base = "[smtp]\nlisten = [\"127.0.0.1:25\"]\n";
        let c = Config::from_toml(base, "t").unwrap();
        assert_eq!(c.mgmt.listen, None, "board default");
        assert_eq!(c.mgmt.certificate, "default");
        assert!(!c.mgmt.has_credentials());
        let pin = "AB:".repeat(31) + "AB";
        let text = format!(
            "{base}[mgmt]\nlisten = [\"127.0.0.2:8443\"]\ncertificate = \"admin\"\n\
             admin_certificates = [\"{pin}\"]\nadmin_token_sha256 = [\"{}\"]\n",
            "0f".repeat(32)
        );
        let c = Config::from_toml(&text, "t").unwrap();
        assert_eq!(c.mgmt.listen, Some(vec!["127.0.0.2:8443".parse().unwrap()]));
        assert_eq!(c.mgmt.certificate, "admin");
        assert_eq!(c.mgmt.admin_certificates, vec![[0xab; 32]]);
        assert_eq!(c.mgmt.admin_token_sha256, vec![[0x0f; 32]]);
        assert!(c.mgmt.has_credentials());
        let off = Config::from_toml(&format!("{base}[mgmt]\nlisten = []\n"), "t").unwrap();
        assert_eq!(off.mgmt.listen, Some(vec![]));
        for (extra, key) in [
            ("listen = [\"127.0.0.1:25\"]", "mgmt.listen"),
            ("listen = [\"here\"]", "mgmt.listen"),
            ("certificate = \"a/b\"", "mgmt.certificate"),
            ("admin_certificates = [\"abc\"]", "mgmt.admin_certificates"),
            (
                "admin_token_sha256 = [\"secret\"]",
                "mgmt.admin_token_sha256",
            ),
        ] {
            match Config::from_toml(&format!("{base}[mgmt]\n{extra}\n"), "t") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{extra}"),
                other => panic!("{extra}: expected error on {key}, got {other:?}"),
            }
        }
    }

    fn ca_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["ca.test".to_string()])
            .expect("cert")
            .cert
            .pem()
    }

    #[test]
    fn vpn_peers_and_cas() {
        let pem = ca_pem();
        let dir = std::env::temp_dir().join(format!("sealgate-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ca.pem");
        std::fs::write(&file, &pem).unwrap();
        let text = format!(
            r#"
            [smtp]
            listen = ["127.0.0.1:25"]
            [[tls.ca]]
            name = "company-vpn-ca"
            pem = """{pem}"""
            [[tls.ca]]
            name = "other"
            file = "{}"
            [[tls.peers]]
            networks = ["198.51.100.0/24", "127.0.0.7"]
            ca = "company-vpn-ca"
            [[tls.peers]]
            networks = ["10.0.0.0/8"]
            ca = "other"
            "#,
            file.display()
        );
        let c = Config::from_toml(&text, "t").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.tls.cas.len(), 2);
        assert_eq!(c.ca("company-vpn-ca").map(|a| a.certs.len()), Some(1));
        assert_eq!(c.ca("other").map(|a| a.certs.len()), Some(1));
        let peer = |ip: &str| c.peer_for(ip.parse().unwrap()).map(|p| p.ca.as_str());
        assert_eq!(peer("198.51.100.9"), Some("company-vpn-ca"));
        assert_eq!(peer("127.0.0.7"), Some("company-vpn-ca"));
        assert_eq!(peer("10.1.2.3"), Some("other"));
        assert_eq!(peer("127.0.0.8"), None);
    }

    #[test]
    fn bad_vpn_configs_name_the_key() {
        let pem = ca_pem();
        let head = "[smtp]\nlisten = [\"127.0.0.1:25\"]\n";
        let ca = format!("[[tls.ca]]\nname = \"vpn\"\npem = \"\"\"{pem}\"\"\"\n");
        let cases = [
            (
                format!("{head}{ca}[[tls.peers]]\nnetworks = [\"10.0.0.0/8\"]\nca = \"nope\"\n"),
                "tls.peers[0].ca",
            ),
            (
                format!("{head}{ca}[[tls.peers]]\nnetworks = [\"10.0.0.1/8\"]\nca = \"vpn\"\n"),
                "tls.peers[0].networks",
            ),
            (
                format!("{head}{ca}[[tls.peers]]\nnetworks = []\nca = \"vpn\"\n"),
                "tls.peers[0].networks",
            ),
            (
                format!("{head}[[tls.ca]]\nname = \"vpn\"\npem = \"not a pem\"\n"),
                "tls.ca[0].pem",
            ),
            (
                format!(
                    "{head}[[tls.ca]]\nname = \"vpn\"\npem = \"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\\n\"\n"
                ),
                "tls.ca[0].pem",
            ),
            (
                format!("{head}[[tls.ca]]\nname = \"vpn\"\nfile = \"/nonexistent/ca.pem\"\n"),
                "tls.ca[0].file",
            ),
            (format!("{head}[[tls.ca]]\nname = \"vpn\"\n"), "tls.ca[0]"),
            (
                format!("{head}[[tls.ca]]\nname = \"bad name\"\npem = \"\"\"{pem}\"\"\"\n"),
                "tls.ca[0].name",
            ),
            (format!("{head}{ca}{ca}"), "tls.ca[1].name"),
        ];
        for (text, key) in cases {
            match Config::from_toml(&text, "t") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected error on {key}, got {other:?}"),
            }
        }
    }
}
