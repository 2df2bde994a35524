//! Fuzz target: the config parser and its semantic checks on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = sealgate_core::config::Config::from_toml(text, "fuzz") {
            // A config that passed its checks answers route lookups without panicking.
            let _ = config.route_for("example.test");
            let _ = config.is_trusted(std::net::Ipv4Addr::LOCALHOST.into());
        }
    }
});
