//! Fuzz target: the peer table file (`STATE/peers.json`) parser, and what the policy engine
//! does with the records it yields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate_proto::policy::{self, Level, RouteFacts, Settings};

fuzz_target!(|data: &[u8]| {
    if let Ok((table, _clients)) = sealgate_core::peers::parse(data, 64) {
        assert!(table.len() <= 64);
        let settings = Settings::default();
        for (key, record) in table.iter() {
            // Every record, however odd its times, plans without panicking.
            for level in [Level::May, Level::Encrypt] {
                let _ = policy::plan(&RouteFacts::new(level, false), key, record, u64::MAX, &settings);
                let _ = policy::plan(&RouteFacts::new(level, true), key, record, 0, &settings);
            }
        }
    }
});
