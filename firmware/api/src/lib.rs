//! The management API (F-MGMT, `docs/mgmt-api.md`) as both ends see it: the paths, and the
//! request and response bodies as serde types, shared by the daemon's server and `sealctl
//! device`.
//!
//! The daemon serializes these types and `sealctl` deserializes them, so a field renamed here
//! is renamed on the wire for both. Request bodies are raw bytes (a signed config blob, an
//! update bundle) and have no type.

pub mod body;

pub use body::{
    Board, CertFacts, CertSource, Certificate, ConfigPushed, ConfigState, ErrorBody, Health,
    Installed, MgmtState, PeerReset, PoweringOff, QueueCounts, QueueDeleted, QueueList,
    QueueMessage, QueueRecipient, QueueReleased, RcptState, Rebooting, SealedStoreState, Status,
    UpdateInstalled, Version,
};

/// The API's path prefix.
pub const PREFIX: &str = "/api/v1";

/// `GET`: identity and health, unauthenticated ([`Health`]).
pub const HEALTH: &str = "/api/v1/health";
/// `GET`: everything about the box ([`Status`]).
pub const STATUS: &str = "/api/v1/status";
/// `PUT` a signed config blob ([`ConfigPushed`]).
pub const CONFIG: &str = "/api/v1/config";
/// `PUT` an update bundle, `?reboot=1` to reboot into it ([`UpdateInstalled`]).
pub const UPDATE: &str = "/api/v1/update";
/// The one query [`UPDATE`] understands besides `reboot=0`.
pub const UPDATE_REBOOT: &str = "reboot=1";
/// `POST`: reboot ([`Rebooting`]).
pub const REBOOT: &str = "/api/v1/reboot";
/// `POST`: power off ([`PoweringOff`]).
pub const POWEROFF: &str = "/api/v1/poweroff";
/// `POST`: forget a peer's TLS history ([`PeerReset`]); `{peer}` is an IP address or a host
/// name. The templates use the router's `{name}` syntax; [`fill`] makes a path of one.
pub const PEER_RESET: &str = "/api/v1/peers/{peer}/reset";
/// `GET`: the mail queue ([`QueueList`]).
pub const QUEUE: &str = "/api/v1/queue";
/// `POST`: deliver a queued message now ([`QueueReleased`]).
pub const QUEUE_RELEASE: &str = "/api/v1/queue/{id}/release";
/// `DELETE`: remove a queued message ([`QueueDeleted`]).
pub const QUEUE_MESSAGE: &str = "/api/v1/queue/{id}";

/// Longest peer (IP address or host name) in a path, after percent-decoding.
pub const MAX_PEER: usize = 255;
/// Longest queue id in a path, after percent-decoding.
pub const MAX_QUEUE_ID: usize = 64;

/// A path template with its one `{…}` parameter replaced by `segment` (already
/// percent-encoded by the caller).
pub fn fill(template: &str, segment: &str) -> String {
    match (template.find('{'), template.find('}')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}{segment}{}", &template[..open], &template[close + 1..])
        }
        _ => template.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_share_the_prefix_and_fill() {
        for p in [
            HEALTH,
            STATUS,
            CONFIG,
            UPDATE,
            REBOOT,
            POWEROFF,
            PEER_RESET,
            QUEUE,
            QUEUE_RELEASE,
            QUEUE_MESSAGE,
        ] {
            assert!(
                p.starts_with(PREFIX) && p[PREFIX.len()..].starts_with('/'),
                "{p}"
            );
        }
        assert_eq!(fill(PEER_RESET, "%3A%3A1"), "/api/v1/peers/%3A%3A1/reset");
        assert_eq!(fill(QUEUE_RELEASE, "X1"), "/api/v1/queue/X1/release");
        assert_eq!(fill(QUEUE_MESSAGE, "X1"), "/api/v1/queue/X1");
        assert_eq!(fill(STATUS, "x"), STATUS);
    }
}
