//! The Sealgate gateway daemon.
fn main() {}
