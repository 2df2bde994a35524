//! The management API (F-MGMT, `docs/mgmt-api.md`) as both ends see it: the paths, and the
//! request and response bodies as serde types, shared by the daemon's server and `sealctl
//! device`.

/// The API's path prefix.
pub const PREFIX: &str = "/api/v1";
