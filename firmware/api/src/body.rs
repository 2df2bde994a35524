//! The JSON bodies of the management API's answers, field for field as `docs/mgmt-api.md`
//! shows them. Every answer, success or refusal, is one of these.

use serde::{Deserialize, Serialize};

/// Every refusal: the reason and the short machine-readable name of the check that failed
/// (`auth`, `route`, `sequence`, …; the table in `docs/mgmt-api.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub check: String,
}

/// Which board the daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Board {
    Dev,
    Appliance,
}

/// Whether the sealed store opened at start, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedStoreState {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /api/v1/health`: what anyone reaching the port may know, answered from memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub serial: String,
    pub board: Board,
    /// `A` or `B`; `null` on the dev board.
    pub running_slot: Option<String>,
    /// `starting`, `good`, `failed` or `unmarked`; `null` on the dev board.
    pub health: Option<String>,
    pub sealed_store: SealedStoreState,
    /// `sealed`, or `throwaway (sealed store unavailable)`.
    pub mgmt_certificate: String,
    pub rss_bytes: Option<u64>,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub board: Board,
    pub serial: String,
    pub hostname: String,
    /// Unix seconds.
    pub now: u64,
    pub uptime_seconds: u64,
    pub rss_bytes: Option<u64>,
    /// `null` on the dev board; on the appliance the installer's view (`running_slot`,
    /// `running_version`, `board`, `boot_control`, `last_update`) and `health`. Its shape is
    /// the daemon's appliance module's (boot control as `sealgate-image` records it), embedded
    /// as it is.
    pub slot: Option<serde_json::Value>,
    pub sealed_store: SealedStoreState,
    pub config: ConfigState,
    pub certificates: Vec<Certificate>,
    pub queue: QueueCounts,
    /// The peer table: the very shape of `STATE/peers.json` (`sealgate_core::peers::PeerFile`),
    /// embedded as it is.
    pub peers: serde_json::Value,
    pub mgmt: MgmtState,
}

/// The signed configuration in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// `false`: the sealed store did not open, no blob can be verified.
    pub sealed_store: bool,
    /// The stored sequence of the last applied blob (`null` before the first).
    pub sequence: Option<u64>,
    /// The id of the key that signed it (16 hex digits).
    pub key_id: Option<String>,
    /// The trusted config-signing key ids.
    pub trusted_keys: Vec<String>,
    /// The box's X25519 public key (64 hex digits) that `sealctl config sign --device-key`
    /// seals secrets to (`docs/secrets.md`); `null` before the sealed store made it.
    #[serde(default)]
    pub encryption_key: Option<String>,
}

/// Where a certificate chain is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    /// In the sealed store (`tls/NAME/chain`).
    Sealed,
    /// A `cert_file` of the config.
    File,
}

/// One certificate chain the box holds: its facts, or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub name: String,
    pub source: CertSource,
    /// Named in `[[tls.certificates]]` (absent when a `cert_file` could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured: Option<bool>,
    /// Served by the management API (absent when a `cert_file` could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mgmt: Option<bool>,
    /// The leaf's facts, when the chain parses.
    #[serde(flatten)]
    pub facts: Option<CertFacts>,
    /// Why the chain could not be read or parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The facts of a chain's leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertFacts {
    pub subject: String,
    pub issuer: String,
    /// subjectAltName DNS names, then IP addresses.
    pub sans: Vec<String>,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
    /// `not_after` in RFC 3339.
    pub expires: String,
    pub expired: bool,
    /// SHA-256 of the leaf DER, lower-case hex.
    pub sha256: String,
    pub chain_len: u64,
}

/// Queue counts in the status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    pub messages: u64,
    /// Recipients neither delivered nor failed.
    pub recipients_pending: u64,
    /// Messages that had an attempt.
    pub deferred: u64,
    /// Attempts running now.
    pub in_flight: u64,
}

/// Who may use the API, in numbers (no credential itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MgmtState {
    /// The name of the certificate the API serves.
    pub certificate: String,
    /// Pinned admin certificates: configured and baked into the image.
    pub pinned_certificates: u64,
    /// Accepted bearer token hashes.
    pub tokens: u64,
    /// The dev board's token file is accepted (nothing else is configured).
    pub dev_token: bool,
    /// No credential at all: only a signed config push is accepted.
    pub first_contact: bool,
}

/// `PUT /api/v1/config` accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPushed {
    /// `false`: the very blob was already applied; nothing was done.
    pub applied: bool,
    pub sequence: u64,
    pub key_id: String,
    pub result: String,
}

/// A bundle's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What an update installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// `A` or `B`.
    pub slot: String,
    pub version: Version,
}

/// `PUT /api/v1/update` accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateInstalled {
    pub installed: Installed,
    /// The box reboots into it now (`?reboot=1`).
    pub rebooting: bool,
}

/// `POST /api/v1/reboot` accepted (`202`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebooting {
    pub rebooting: bool,
}

/// `POST /api/v1/poweroff` accepted (`202`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoweringOff {
    pub powering_off: bool,
}

/// `POST /api/v1/peers/{peer}/reset` done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReset {
    pub peer: String,
    /// Peer records reset.
    pub reset: u64,
}

/// `GET /api/v1/queue`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueList {
    /// Messages in the queue (more than listed when `truncated`).
    pub count: u64,
    pub truncated: bool,
    pub messages: Vec<QueueMessage>,
}

/// One queued message, as `sealgate queue list --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMessage {
    pub id: String,
    /// The envelope sender; empty for the null sender `<>`.
    pub from: String,
    pub size: u64,
    /// Unix seconds.
    pub arrival: u64,
    pub attempts: u32,
    /// Unix seconds.
    pub next_attempt: u64,
    pub recipients: Vec<QueueRecipient>,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecipient {
    pub address: String,
    pub status: RcptState,
    /// The last error (pending) or the final reply.
    pub detail: Option<String>,
    /// Where `detail` came from: `remote`, `dns`, `tls-policy`, `connection`, `local`.
    pub source: Option<String>,
}

/// Where a recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    Pending,
    Delivered,
    Failed,
}

impl RcptState {
    /// The wire name: `pending`, `delivered`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            RcptState::Pending => "pending",
            RcptState::Delivered => "delivered",
            RcptState::Failed => "failed",
        }
    }
}

/// `POST /api/v1/queue/{id}/release` done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReleased {
    pub released: bool,
    pub message: QueueMessage,
}

/// `DELETE /api/v1/queue/{id}` done: the message as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueDeleted {
    pub deleted: bool,
    pub message: QueueMessage,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn certificates_with_facts_or_an_error() {
        let facts = CertFacts {
            subject: "CN=x".into(),
            issuer: "CN=x".into(),
            sans: vec!["gw.test".into()],
            not_before: 1,
            not_after: 2,
            expires: "1970-01-01T00:00:02Z".into(),
            expired: true,
            sha256: "ab".into(),
            chain_len: 1,
        };
        let ok = Certificate {
            name: "default".into(),
            source: CertSource::Sealed,
            configured: Some(true),
            mgmt: Some(false),
            facts: Some(facts),
            error: None,
        };
        let v = serde_json::to_value(&ok).unwrap();
        assert_eq!(
            v,
            json!({"name": "default", "source": "sealed", "configured": true, "mgmt": false,
                   "subject": "CN=x", "issuer": "CN=x", "sans": ["gw.test"], "not_before": 1,
                   "not_after": 2, "expires": "1970-01-01T00:00:02Z", "expired": true,
                   "sha256": "ab", "chain_len": 1})
        );
        assert_eq!(serde_json::from_value::<Certificate>(v).unwrap(), ok);
        let unread = Certificate {
            name: "f".into(),
            source: CertSource::File,
            configured: None,
            mgmt: None,
            facts: None,
            error: Some("f.pem: gone".into()),
        };
        let v = serde_json::to_value(&unread).unwrap();
        assert_eq!(
            v,
            json!({"name": "f", "source": "file", "error": "f.pem: gone"})
        );
        assert_eq!(serde_json::from_value::<Certificate>(v).unwrap(), unread);
    }

    #[test]
    fn wire_names() {
        let m = QueueMessage {
            id: "X".into(),
            from: String::new(),
            size: 3,
            arrival: 4,
            attempts: 1,
            next_attempt: 5,
            recipients: vec![QueueRecipient {
                address: "a@b".into(),
                status: RcptState::Pending,
                detail: None,
                source: None,
            }],
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"id": "X", "from": "", "size": 3, "arrival": 4, "attempts": 1,
                   "next_attempt": 5,
                   "recipients": [{"address": "a@b", "status": "pending", "detail": null,
                                   "source": null}]})
        );
        let h = Health {
            serial: "S".into(),
            board: Board::Dev,
            running_slot: None,
            health: None,
            sealed_store: SealedStoreState {
                ok: true,
                error: None,
            },
            mgmt_certificate: "sealed".into(),
            rss_bytes: Some(7),
        };
        assert_eq!(
            serde_json::to_value(&h).unwrap(),
            json!({"serial": "S", "board": "dev", "running_slot": null, "health": null,
                   "sealed_store": {"ok": true}, "mgmt_certificate": "sealed", "rss_bytes": 7})
        );
        let e: ErrorBody = serde_json::from_str(r#"{"error": "no"}"#).unwrap();
        assert_eq!((e.error.as_str(), e.check.as_str()), ("no", ""));
        let v = Version {
            major: 1,
            minor: 2,
            patch: 0,
        };
        assert_eq!(v.to_string(), "1.2.0");
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"major":1,"minor":2,"patch":0}"#
        );
    }
}
