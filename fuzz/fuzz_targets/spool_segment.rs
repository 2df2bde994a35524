//! Fuzz target: queue segment bytes parsed as recovery parses them (records, envelopes, states).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let c = sealgate_core::spool::check_segment(data);
    assert!(c.messages <= c.records);
    if let Some((offset, _)) = c.torn {
        assert!(offset as usize <= data.len());
    }
});
