//! The Sealgate gateway daemon: the runtime layer that owns tokio, sockets, rustls I/O and
//! files, around the I/O-free protocol machines of `sealgate-proto` and the decisions and
//! formats of `sealgate-core`.
//!
//! [`service`] is the composition root (start-up, listeners, shutdown); [`control`] owns
//! applying a config (SIGHUP, the management API), so neither `service` nor `mgmt` imports the
//! other.

pub mod appliance;
pub mod auth;
pub mod conn;
pub mod control;
pub mod delivery;
pub mod live;
pub mod mgmt;
pub mod peers;
pub mod service;
pub mod smtp;
pub mod spool;
pub mod tls;
