//! Fuzzes the SASL exchange (`sealgate_proto::sasl`): arbitrary response lines must never
//! panic, and credentials that come out respect the RFC 4616 bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate_proto::sasl::{Exchange, MAX_IDENTITY, MAX_PASSWORD, Mechanism, Progress};

fuzz_target!(|data: &[u8]| {
    // First byte: mechanism and whether the first line is an initial response; then lines.
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mechanism = if flags & 1 == 0 {
        Mechanism::Plain
    } else {
        Mechanism::Login
    };
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let initial = if flags & 2 != 0 { lines.next() } else { None };
    let Ok((mut exchange, mut progress)) = Exchange::start(mechanism, initial) else {
        return;
    };
    loop {
        match progress {
            Progress::Done(creds) => {
                assert!(!creds.login.is_empty() && creds.login.len() <= MAX_IDENTITY);
                let pw = creds.password.expose();
                assert!(!pw.is_empty() && pw.len() <= MAX_PASSWORD && !pw.contains(&0));
                assert!(!creds.login.chars().any(char::is_control));
                return;
            }
            Progress::Challenge(_) => {
                let Some(line) = lines.next() else {
                    return;
                };
                match exchange.respond(line) {
                    Ok(p) => progress = p,
                    Err(_) => return,
                }
            }
        }
    }
});
