//! Sealgate's core: the decisions and formats of the gateway that need no tokio and no sockets
//! — the config, CIDRs, the signed config blob and its verification against the box, the sealed
//! store, certificate import checks, the queue's record format, the peer table file, typed
//! delivery status and the retry schedule. The daemon (`sealgate`), `sealctl` and the fuzzers
//! share it.

pub mod auth;
pub mod blob;
pub mod certs;
pub mod cidr;
pub mod config;
pub mod dane;
pub mod delivery;
pub mod der;
pub mod hex;
pub mod peers;
pub mod queue_list;
pub mod sealed;
pub mod secrets;
pub mod site;
pub mod spool;
pub mod time;
pub mod verifiers;
pub mod x509;
