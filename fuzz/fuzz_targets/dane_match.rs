//! Fuzz target: TLSA records in wire form (`Tlsa::from_rdata`), the DANE matcher over a
//! certificate chain (`sealgate_core::dane`), and the policy engine's precedence with the
//! records as a secure TLSA RRset.
//!
//! Input: `n` (1 byte) records, each a 2-byte length and that many RDATA bytes; the rest is the
//! chain, each certificate a 2-byte length and its bytes (fuzzed DER: mostly not certificates).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate_core::dane;
use sealgate_proto::dane::{DaneState, Tlsa};
use sealgate_proto::policy::{self, Level, RouteFacts};

fn chunk<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let [a, b, rest @ ..] = *data else { return None };
    let n = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
    let (c, r) = rest.split_at(n);
    *data = r;
    Some(c)
}

fuzz_target!(|input: &[u8]| {
    let Some((&n, mut data)) = input.split_first() else { return };
    let mut records = Vec::new();
    for _ in 0..n.min(8) {
        let Some(rdata) = chunk(&mut data) else { break };
        if let Ok(t) = Tlsa::from_rdata(rdata) {
            assert!(t.data.len() <= sealgate_proto::dane::MAX_DATA && !t.data.is_empty());
            let _ = (t.describe(), t.to_string(), t.usable());
            records.push(t);
        }
    }
    let mut chain = Vec::new();
    while chain.len() < 4 {
        let Some(c) = chunk(&mut data) else { break };
        chain.push(c);
    }
    if let Some(r) = dane::ee_match(&records, &chain) {
        assert!(r.usable() && r.usage == sealgate_proto::dane::DANE_EE);
        assert!(dane::matches(r, chain[0]));
    }
    for c in dane::ta_candidates(&records, &chain) {
        assert!(c.record.usable() && c.record.usage == sealgate_proto::dane::DANE_TA);
        if let Some(i) = c.index {
            assert_eq!(c.cert, chain[i]);
        }
    }
    let _ = dane::describe_leaf(&chain);
    for level in [Level::Dane, Level::DaneOnly] {
        let route = RouteFacts {
            dane: DaneState::Secure(records.clone()),
            ..RouteFacts::new(level, n & 1 == 1)
        };
        if let Ok((eff, _, _)) = policy::effective_level(&route) {
            assert!(eff >= Level::Encrypt, "a secure TLSA RRset never allows plaintext");
        }
    }
});
