//! Fuzz target: the MTA-STS parsers (`sealgate_proto::mta_sts`): the input as a policy file and
//! as TXT records (split at NUL); an accepted policy is bounded, its patterns match the hosts
//! they name, and written back in the RFC's form it parses to the same policy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate_proto::mta_sts::{MAX_MAX_AGE, MAX_MX_PATTERNS, Mode, Policy, select_txt};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Policy::parse(data) {
        assert!(p.max_age <= MAX_MAX_AGE && p.mx.len() <= MAX_MX_PATTERNS);
        assert!(p.mode == Mode::None || !p.mx.is_empty());
        let mut text = format!("version: STSv1\r\nmode: {}\r\nmax_age: {}\r\n", p.mode, p.max_age);
        for m in &p.mx {
            text.push_str(&format!("mx: {m}\r\n"));
            let host = m.strip_prefix("*.").map(|r| format!("x.{r}")).unwrap_or_else(|| m.clone());
            assert!(p.mx_matches(&host), "{m} does not match {host}");
        }
        assert_eq!(Policy::parse(text.as_bytes()).as_ref(), Ok(&p));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(Some(t)) = select_txt(s.split('\0')) {
            assert!(!t.id.is_empty() && t.id.len() <= 32);
        }
    }
});
