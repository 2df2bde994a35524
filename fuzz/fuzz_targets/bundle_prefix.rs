//! Fuzz target: the update bundle reader (`sealgate_image::bundle`): `parse_prefix` on arbitrary
//! bytes, then verification under one fixed trusted key (the seeds are signed with it), the
//! streamed payload checks, and `verify_stream` over the same bytes; both paths must agree.
#![no_main]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use ring::signature::Ed25519KeyPair;
use sealgate_image::Version;
use sealgate_image::bundle::{self, BundleError, PREFIX_LEN};
use sealgate_image::keys;

/// The trusted key's seed; `seeds/bundle_prefix/` holds bundles signed with it (and some not).
const SEED: [u8; 32] = [0x1b; 32];

static KEY: LazyLock<Ed25519KeyPair> =
    LazyLock::new(|| Ed25519KeyPair::from_seed_unchecked(&SEED).expect("fixed seed"));

fuzz_target!(|data: &[u8]| {
    let key = &*KEY;
    let trusted = BTreeMap::from([(keys::key_id_of(key), keys::public_key_of(key))]);
    let floor = Version::new(0, 1, 0);
    let max = 1 << 20;

    let mut out = Vec::new();
    let streamed = bundle::verify_stream(
        &mut Cursor::new(data),
        &trusted,
        bundle::BOARD_QEMU,
        floor,
        max,
        &mut out,
    );

    let parsed = match bundle::parse_prefix(data) {
        Ok(u) => u,
        Err(e) => {
            assert_eq!(
                std::mem::discriminant(&e),
                std::mem::discriminant(streamed.as_ref().expect_err("parse failed, stream not"))
            );
            return;
        }
    };
    let h = parsed.header().clone();
    assert!(!h.board.is_empty() && h.board.len() <= bundle::MAX_BOARD);
    let mut v = match parsed.verify(&trusted, bundle::BOARD_QEMU, floor, max) {
        Ok(v) => v,
        Err(e) => {
            match &e {
                BundleError::UnknownKey(_) => assert_ne!(h.key_id, keys::key_id_of(key)),
                BundleError::BadSignature
                | BundleError::WrongBoard { .. }
                | BundleError::BelowFloor { .. }
                | BundleError::PayloadTooLarge { .. } => {}
                other => panic!("unexpected verify error {other}"),
            }
            assert!(streamed.is_err());
            return;
        }
    };
    // Verified: the header is signed by the trusted key, for this board, at or above the floor.
    assert_eq!(h.board, bundle::BOARD_QEMU);
    assert!(h.version >= floor && h.payload_len <= max);
    // Feed the payload in uneven chunks; more than payload_len is refused chunk by chunk.
    let payload = &data[PREFIX_LEN..];
    let mut fed = 0usize;
    let mut step = 1usize;
    let mut refused = false;
    while fed < payload.len() {
        let end = (fed + step).min(payload.len());
        match v.update(&payload[fed..end]) {
            Ok(()) => fed = end,
            Err(BundleError::PayloadLength { .. }) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected update error {e}"),
        }
        step = step * 3 + 1;
    }
    assert_eq!(v.received(), fed as u64);
    let finished = v.finish();
    match &streamed {
        Ok(sh) => {
            // The stream reads exactly payload_len bytes, whatever follows.
            assert_eq!(sh, &h);
            assert_eq!(out.as_slice(), &payload[..h.payload_len as usize]);
            assert!(refused || finished.is_ok());
        }
        Err(_) => assert!(finished.is_err()),
    }
    if refused {
        assert!(payload.len() as u64 > h.payload_len);
    }
    if let Ok(fh) = finished {
        assert_eq!(fh, h);
        assert!(streamed.is_ok());
        let payload = &payload[..h.payload_len as usize];
        // Re-signing the payload gives a bundle with the same header fields.
        let mut again = Vec::new();
        let h2 = bundle::sign(
            &mut Cursor::new(payload),
            h.version,
            &h.board,
            key,
            h.created,
            &mut again,
        )
        .expect("re-sign");
        assert_eq!(h2, h);
        // Deterministic Ed25519 and a canonical header: the very same bytes.
        assert_eq!(&again[..], &data[..PREFIX_LEN + h.payload_len as usize]);
    }
});
