//! The Sealgate gateway daemon: the runtime layer that owns tokio, sockets, rustls I/O and
//! files, around the I/O-free protocol machines of `sealgate-proto` and the decisions and
//! formats of `sealgate-core`.

pub mod appliance;
pub mod conn;
pub mod daemon;
pub mod delivery;
pub mod dns;
pub mod live;
pub mod maildir;
pub mod mgmt;
pub mod peers;
pub mod smtpd;
pub mod spool;
pub mod tls;
pub mod tls_client;
pub mod update;
