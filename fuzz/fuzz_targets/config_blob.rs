//! Fuzz target: the signed config blob decoder (`sealgate_core::blob::decode`), and on every blob it
//! accepts, the signature check against one fixed trusted key, the box's checks in several
//! contexts, key rotation, and re-signing.
#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sealgate_core::blob::{self, BlobError, Context, Ed25519KeyPair, Verdict};

/// The trusted key's seed; `seeds/config_blob/` holds blobs signed with it (and some not).
const SEED: [u8; 32] = [0x5e; 32];

static KEY: LazyLock<Ed25519KeyPair> =
    LazyLock::new(|| Ed25519KeyPair::from_seed_unchecked(&SEED).expect("fixed seed"));

fuzz_target!(|data: &[u8]| {
    let Ok(b) = blob::decode(data) else {
        return;
    };
    assert_eq!(b.bytes(), data);
    assert!(b.body_len() <= blob::MAX_BODY);
    let key = &*KEY;
    let id = blob::key_id_of(key);
    let trusted = BTreeMap::from([(id, blob::public_key_of(key))]);
    let h = b.header();

    match b.verify_signature(&trusted) {
        Ok(()) => assert_eq!(h.key_id, id),
        Err(BlobError::UnknownKey(_)) => assert_ne!(h.key_id, id),
        Err(BlobError::BadSignature) => assert_eq!(h.key_id, id),
        Err(e) => panic!("unexpected signature error {e}"),
    }

    // Re-signing the decoded header and config gives a blob that decodes to the same and
    // verifies when it names the key.
    let again = blob::sign(h.clone(), b.config_toml(), key);
    let b2 = blob::decode(&again).expect("a re-signed blob decodes");
    assert_eq!(b2.header(), h);
    assert_eq!(b2.config_toml(), b.config_toml());
    if h.key_id == id {
        b2.verify_signature(&trusted).expect("a re-signed blob verifies");
    }

    let serial = h.device.as_deref().unwrap_or("DEV-0011AABB");
    for (stored_sequence, now, firmware) in [
        (None, 0, "0.1.0"),
        (Some(h.sequence), u64::MAX, env!("CARGO_PKG_VERSION")),
        (h.sequence.checked_sub(1), h.not_before, "999.0"),
        (h.sequence.checked_add(1), 1_795_731_096, "garbage"),
    ] {
        for serial in [serial, "OTHER-SERIAL"] {
            let ctx = Context {
                serial,
                stored_sequence,
                stored_blob: None,
                now,
                firmware,
            };
            let _ = b.check(&ctx);
        }
    }
    // The very bytes already applied are a no-op, whatever the time or firmware.
    let ctx = Context {
        serial,
        stored_sequence: Some(h.sequence),
        stored_blob: Some(data),
        now: u64::MAX,
        firmware: "0",
    };
    assert_eq!(b.check(&ctx), Ok(Verdict::NoOp));

    if let Ok(after) = b.trust_after(&trusted) {
        assert!(!after.is_empty());
        for k in &h.add_keys {
            assert!(after.contains_key(&blob::key_id(k)));
        }
        for r in &h.retire_keys {
            assert!(!after.contains_key(r));
        }
    } else {
        assert!(h.retire_keys.contains(&id));
    }
    let _ = blob::format_utc(h.not_before);
});
