//! The TOML shape of the config (PRODUCT.md §3), as the admin writes it: serde structs, no checks.
//!
//! Unknown keys are refused (`deny_unknown_fields`); levels and durations stay strings here so
//! that a bad one is reported by the checks with its key (`config key route[0].tls: …`), not as
//! a TOML syntax error.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) device: RawDevice,
    #[serde(default)]
    pub(super) smtp: RawSmtp,
    #[serde(default)]
    pub(super) queue: RawQueue,
    #[serde(default)]
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) dns: RawDns,
    #[serde(default)]
    pub(super) mgmt: RawMgmt,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
    #[serde(default)]
    pub(super) recipients: Vec<RawRecipients>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    pub(super) hostname: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSmtp {
    pub(super) listen: Option<Vec<String>>,
    pub(super) implicit_tls: Option<Vec<String>>,
    pub(super) submission: Option<Vec<String>>,
    pub(super) local_domains: Option<Vec<String>>,
    pub(super) trusted_networks: Option<Vec<String>>,
    pub(super) max_message_bytes: Option<u64>,
    pub(super) max_recipients: Option<usize>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_ip: Option<usize>,
    pub(super) max_errors: Option<u32>,
    pub(super) command_timeout: Option<String>,
    pub(super) data_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) max_queue_time: Option<String>,
    pub(super) retry_schedule: Option<Vec<String>>,
    pub(super) min_free_bytes: Option<u64>,
    pub(super) max_deliveries: Option<usize>,
    pub(super) max_connections_per_hop: Option<usize>,
    pub(super) connect_timeout: Option<String>,
    pub(super) bind_address: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) handshake_timeout: Option<String>,
    pub(super) broken_tls_ttl: Option<String>,
    pub(super) downgrade: Option<String>,
    pub(super) downgrade_window: Option<String>,
    pub(super) max_peers: Option<usize>,
    pub(super) system_roots: Option<PathBuf>,
    #[serde(default)]
    pub(super) force: Vec<String>,
    pub(super) dev_self_signed: Option<bool>,
    #[serde(default)]
    pub(super) certificates: Vec<RawCertificate>,
    #[serde(default)]
    pub(super) ca: Vec<RawCa>,
    #[serde(default)]
    pub(super) peers: Vec<RawPeer>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCa {
    pub(super) name: String,
    pub(super) pem: Option<String>,
    pub(super) file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    #[serde(default)]
    pub(super) networks: Vec<String>,
    pub(super) ca: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub(super) name: String,
    #[serde(default)]
    pub(super) local_addresses: Vec<String>,
    #[serde(default)]
    pub(super) server_names: Vec<String>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) resolver: Option<Vec<String>>,
    pub(super) dnssec: Option<bool>,
    pub(super) trust_anchor: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMgmt {
    pub(super) listen: Option<Vec<String>>,
    pub(super) certificate: Option<String>,
    pub(super) admin_certificates: Option<Vec<String>>,
    pub(super) admin_token_sha256: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) domain: String,
    pub(super) next_hop: Option<Vec<String>>,
    #[serde(default)]
    pub(super) mx: bool,
    pub(super) port: Option<u16>,
    pub(super) maildir: Option<PathBuf>,
    pub(super) tls: Option<String>,
    pub(super) ca: Option<String>,
    pub(super) fingerprints: Option<Vec<String>>,
    pub(super) client_certificate: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) sender_must_match: Option<RawBinding>,
    pub(super) cache_ttl: Option<String>,
    pub(super) fail_delay: Option<String>,
    pub(super) max_fail_delay: Option<String>,
    pub(super) lockout_after: Option<u32>,
    pub(super) lockout_time: Option<String>,
    pub(super) max_checks: Option<usize>,
    pub(super) on_listen: Option<bool>,
    #[serde(default)]
    pub(super) backend: Vec<RawBackend>,
}

/// `auth.sender_must_match`: `true`/`false` or a word (`"address"`, `"domain"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawBinding {
    Flag(bool),
    Word(String),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) name: String,
    pub(super) kind: String,
    pub(super) url: String,
    pub(super) starttls: Option<bool>,
    pub(super) ca: Option<String>,
    pub(super) tls_name: Option<String>,
    #[serde(default)]
    pub(super) domains: Vec<String>,
    pub(super) timeout: Option<String>,
    pub(super) bind_dn: Option<String>,
    pub(super) search_base: Option<String>,
    pub(super) search_filter: Option<String>,
    pub(super) service_dn: Option<String>,
    pub(super) service_password: Option<RawSecretRef>,
    pub(super) login: Option<String>,
}

/// `{ secret = "NAME" }`: a value sealed to the box in the signed blob (F-SECRETS).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecretRef {
    pub(super) secret: String,
}

/// `[[recipients]]`: recipient validation of one local domain (F-RCPT).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecipients {
    pub(super) domain: String,
    pub(super) backend: String,
    pub(super) search_base: String,
    pub(super) filter: Option<String>,
    pub(super) service_dn: Option<String>,
    pub(super) service_password: Option<RawSecretRef>,
    pub(super) on_unavailable: Option<String>,
    pub(super) positive_ttl: Option<String>,
    pub(super) negative_ttl: Option<String>,
    pub(super) max_cached: Option<usize>,
}
