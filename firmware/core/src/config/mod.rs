//! The gateway configuration: the TOML shape of PRODUCT.md §3, parsed, checked and typed.
//!
//! Parsing yields a [`Config`] only when every semantic check passed (routes, CIDRs, addresses,
//! certificate names); each failure names the key and the reason. Keys are documented in
//! `docs/config.md`.
//!
//! Layout: `raw.rs` holds the serde shapes; one checking function per section turns them into
//! the typed structs below (`check.rs` for `[device]`, `[dns]` and the order of the sections,
//! then `smtp.rs`, `queue.rs`, `tls.rs`, `mgmt.rs`, `routes.rs`); `values.rs` holds the value
//! checks they share (durations, addresses, CIDRs, names, fingerprints).

mod auth;
mod check;
mod mgmt;
mod queue;
mod raw;
mod routes;
mod smtp;
#[cfg(test)]
mod tests;
mod tls;
mod values;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::cidr::Cidr;
use raw::RawConfig;

pub use values::parse_duration;

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

/// The whole checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub hostname: String,
    pub smtp: SmtpConfig,
    pub queue: QueueConfig,
    pub tls: TlsConfig,
    pub dns: DnsConfig,
    pub routes: Vec<Route>,
    pub mgmt: MgmtConfig,
    pub auth: AuthConfig,
    pub recipients: Vec<RecipientCheck>,
}

/// `[dns]`: how delivery resolves names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers for MX lookups; empty means the system's (`/etc/resolv.conf`).
    pub resolvers: Vec<SocketAddr>,
    /// Validate DNSSEC in process (F-STS: DANE needs it).
    pub dnssec: bool,
    /// DNSKEY records (zone-file text) trusted instead of the IANA root keys; checked to parse.
    pub trust_anchor: Option<String>,
}

/// `[auth]` (F-AUTH; `docs/auth.md`): how mail clients log in and how logins are checked.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub sender_binding: SenderBinding,
    /// Successful logins remembered this long (zero: not at all).
    pub cache_ttl: Duration,
    /// The answer to the n-th failure in a row waits `fail_delay * 2^(n-1)`, at most
    /// `max_fail_delay`.
    pub fail_delay: Duration,
    pub max_fail_delay: Duration,
    /// Failures of one client address (or one user) before a lockout of `lockout_time`.
    pub lockout_after: u32,
    pub lockout_time: Duration,
    /// Backend checks in flight at once.
    pub max_checks: usize,
    /// Offer AUTH (under TLS) on the `smtp.listen` listeners too.
    pub on_listen: bool,
    pub backends: Vec<AuthBackend>,
}

impl AuthConfig {
    /// The backend checking logins of `domain` (lower case).
    pub fn backend_for(&self, domain: &str) -> Option<&AuthBackend> {
        self.backends
            .iter()
            .find(|b| b.domains.iter().any(|d| d == domain))
    }
}

/// `auth.sender_must_match`: the session machine's own type.
pub use sealgate_proto::server::SenderBinding;

/// A server that checks the logins of some domains (`[[auth.backend]]`).
#[derive(Debug, Clone)]
pub struct AuthBackend {
    pub name: String,
    pub kind: BackendKind,
    pub tls: BackendTls,
    pub host: String,
    pub port: u16,
    /// `[[tls.ca]]` the server's certificate must chain to; `None`: `tls.system_roots`.
    pub ca: Option<String>,
    /// The name the server's certificate must carry.
    pub tls_name: String,
    pub domains: Vec<String>,
    /// Connection, TLS and dialog of one check.
    pub timeout: Duration,
    /// `ldap`: the DN bound as, a template of `{user}`, `{address}`, `{domain}`.
    pub bind_dn: Option<String>,
    /// `ldap` without `bind_dn`: search-then-bind (the user's DN found by a search).
    pub search: Option<LdapSearch>,
    /// `imap`, `pop3`, `smtp`: the user name sent, a template (default `{address}`).
    pub login: String,
}

/// An LDAP search: where, for what (a filter template whose values are RFC 4515-escaped),
/// and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdapSearch {
    pub base: String,
    pub filter: String,
    /// The service account bound as before searching; `None`: anonymously.
    pub service: Option<ServiceAccount>,
}

/// A directory account of the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub dn: String,
    pub password: SecretRef,
}

/// `{ secret = "NAME" }`: the value is a secret sealed to this box (F-SECRETS), found in the
/// sealed store under `secret/NAME` once a blob brought it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    /// The config key that names it (for errors).
    pub key: String,
}

/// `[[recipients]]`: the recipients of one local domain looked up before `250` (F-RCPT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientCheck {
    pub domain: String,
    /// The `ldap` `[[auth.backend]]` whose server, TLS and timeout are used.
    pub backend: String,
    pub search: LdapSearch,
    /// A directory that cannot be asked: `451 4.4.3` (false, the default) or accept.
    pub accept_when_unavailable: bool,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    /// Answers remembered at most.
    pub max_cached: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Ldap,
    Imap,
    Pop3,
    Smtp,
}

/// How a backend connection gets its TLS; there is no plaintext kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendTls {
    /// TLS from the first byte (ldaps, imaps, pop3s, smtps).
    Implicit,
    /// StartTLS / STARTTLS / STLS before anything else is said.
    StartTls,
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
    /// Submission listeners (RFC 6409): STARTTLS, then AUTH, before MAIL.
    pub submission: Vec<SocketAddr>,
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
    /// Connections open at once to one next-hop address, busy or parked for reuse
    /// (Postfix's `default_destination_concurrency_limit`).
    pub max_connections_per_hop: usize,
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

    /// Every `{ secret = … }` the config refers to.
    pub fn secret_refs(&self) -> Vec<&SecretRef> {
        let backends = self.auth.backends.iter().filter_map(|b| b.search.as_ref());
        let recipients = self.recipients.iter().map(|r| &r.search);
        backends
            .chain(recipients)
            .filter_map(|s| s.service.as_ref().map(|a| &a.password))
            .collect()
    }

    /// The recipient check of a local domain (lower case), if it has one.
    pub fn recipient_check(&self, domain: &str) -> Option<&RecipientCheck> {
        self.recipients.iter().find(|r| r.domain == domain)
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
