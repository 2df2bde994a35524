//! sealctl: Sealgate's host CLI.
fn main() {}
