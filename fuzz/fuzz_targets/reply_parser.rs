//! Fuzzes `ReplyParser`: arbitrary bytes in arbitrary chunks must never panic, every reply must
//! respect the line limits, and a parsed reply must survive its own wire form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate_proto::reply::{Reply, ReplyParser};

const MAX_LINE: usize = 64;
const MAX_LINES: usize = 8;

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size for feeding (1..=64); the rest is server output.
    let Some((&c, mut rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(c % 64) + 1;
    let mut p = ReplyParser::new(MAX_LINE, MAX_LINES);
    while !rest.is_empty() {
        let (mut piece, tail) = rest.split_at(chunk.min(rest.len()));
        rest = tail;
        while !piece.is_empty() {
            let before = piece.len();
            match p.parse(&mut piece) {
                Ok(Some(reply)) => check(&reply),
                Ok(None) => assert!(piece.is_empty()),
                Err(_) => {}
            }
            assert!(piece.len() < before, "parse made no progress");
        }
    }
});

fn check(reply: &Reply) {
    assert!((200..600).contains(&reply.code));
    assert!(!reply.lines.is_empty() && reply.lines.len() <= MAX_LINES);
    // Lossy UTF-8 conversion turns one invalid byte into three.
    assert!(reply.lines.iter().all(|l| l.len() <= 3 * MAX_LINE));
    if let Some(e) = reply.enhanced {
        assert_eq!(u16::from(e.0), reply.code / 100);
    }
    let mut wire = Vec::new();
    reply.write_to(&mut wire);
    let mut input = wire.as_slice();
    let again = ReplyParser::new(usize::MAX / 2, MAX_LINES).parse(&mut input);
    assert_eq!(again, Ok(Some(reply.clone())));
    assert!(input.is_empty());
}
