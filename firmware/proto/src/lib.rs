//! Sealgate's SMTP protocol logic, free of I/O: fed bytes and a clock, it emits bytes and events.
//!
//! Architecture invariant: nothing in this crate opens a socket or a file, spawns a task or
//! reads the system clock. The runtime layer (`firmware/sealgate`) owns all of that; this crate
//! is what unit tests and fuzzers drive directly.

pub mod authclient;
pub mod calendar;
pub mod client;
pub mod dane;
pub mod dsn;
pub mod envelope;
pub mod mta_sts;
pub mod policy;
pub mod received;
pub mod reply;
pub mod sasl;
pub mod server;

pub use envelope::{BodyType, Envelope};
pub use reply::Reply;
