//! Fuzz target: the sealed store reader (`sealgate_core::sealed::unseal`) with one fixed key. The
//! first byte picks what the rest is: even — a store file as read from disk (header checks,
//! bounds, the AEAD); odd — the plaintext behind a valid tag (`seal_plaintext` with the fixed
//! key), so the record decoder and its bounds are reached too. Whatever `unseal` accepts must
//! be within the bounds and re-seal to exactly the same bytes (one encoding per record map).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sealgate_core::sealed::{self, SealError, SealingKey};

/// The fixed board; `seeds/sealed_store/` holds files sealed under its key.
const SECRET: [u8; 32] = [0x5e; 32];
const SERIAL: &str = "FUZZ-0001";

static KEY: LazyLock<SealingKey> = LazyLock::new(|| sealed::sealing_key(&SECRET, SERIAL));

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = &*KEY;
    if mode & 1 == 0 {
        check(key, rest, false);
    } else {
        let generation = u64::from(mode >> 1) << 56 | rest.len() as u64;
        let file = sealed::seal_plaintext(key, generation, [mode; 12], rest);
        let got = check(key, &file, true);
        if let Some(g) = got {
            assert_eq!(g, generation);
        }
    }
});

/// Unseals `file`; `authentic`: it was sealed with the key just now, so only the records can
/// be refused. Returns the generation when it opened.
fn check(key: &SealingKey, file: &[u8], authentic: bool) -> Option<u64> {
    match sealed::unseal(key, file) {
        Ok((generation, records)) => {
            assert!(records.len() <= sealed::MAX_RECORDS);
            assert!(records.keys().all(|k| k.len() <= sealed::MAX_NAME));
            assert!(sealed::check_bounds(&records).is_ok());
            assert_eq!(sealed::sealed_len(&records), file.len());
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&file[18..30]);
            assert_eq!(sealed::seal(key, generation, nonce, &records), file);
            Some(generation)
        }
        Err(e) => {
            let _ = e.to_string();
            match e {
                SealError::Malformed(_)
                | SealError::TooManyRecords { .. }
                | SealError::NameTooLong { .. } => {}
                SealError::TooLarge { .. } => assert!(file.len() > sealed::MAX_FILE),
                SealError::Truncated { .. }
                | SealError::BadMagic
                | SealError::UnsupportedFormat(_)
                | SealError::LengthMismatch { .. }
                | SealError::Authentication => {
                    assert!(!authentic, "a file just sealed failed a header check: {e}")
                }
                other => panic!("unseal cannot fail with {other}"),
            }
            None
        }
    }
}
