//! The signed config blob (F-CONFIG): the wire format HQ's `sealctl config sign` writes and the
//! box checks before it applies a config, the key rotation it may carry, and the Ed25519 key
//! files (PEM) HQ signs with.
//!
//! # Wire format (format 1)
//!
//! ```text
//! offset  size      field
//! 0       8         magic  b"SEALCFG\0"
//! 8       2         format u16 big-endian (= 1)
//! 10      4         body_len u32 big-endian (<= 1 MiB)
//! 14      body_len  body = postcard(Body { header: Header, config: String /* TOML text */ })
//! 14+len  64        Ed25519 signature
//! ```
//!
//! Format 2 is the same with `body = postcard(Body { header, config, secrets:
//! Vec<`[`SealedSecret`]`> })`: the secrets sealed to this box (F-SECRETS, see
//! [`crate::secrets`]). `sealctl` writes format 2 only when a blob carries secrets, so boxes
//! that predate them keep reading every blob without.
//!
//! The signature covers `b"sealgate config blob v1\0" || every byte before the signature`
//! (magic, format, length and body): the domain prefix keeps a config signature from ever
//! being valid as any other kind of message signed with the same key.
//!
//! # Checks, in the box's order (each stops at the first failure with its own error)
//!
//! 1. [`decode`]: format only — magic, format version, length bounds, no trailing bytes, the
//!    body decodes and fills exactly `body_len`, header fields well formed.
//! 2. [`Blob::verify_signature`]: the header's key id must be trusted (else
//!    [`BlobError::UnknownKey`], whatever the signature), then Ed25519 over the message above.
//! 3. [`Blob::check`]: device → sequence (greater applies; equal and byte-identical to the
//!    stored blob is [`Verdict::NoOp`]; equal but different, or lower, is refused) → time
//!    window → minimum firmware version.
//! 4. The daemon: `Config::from_toml` semantic checks → apply → only then store the sequence,
//!    the blob and [`Blob::trust_after`] (key rotation).
//!
//! Key ids are the lower-case hex of the first 8 bytes of SHA-256 of the 32-byte public key
//! ([`key_id`], [`key_id_hex`]). Key files: public keys are PEM `PUBLIC KEY`
//! (SubjectPublicKeyInfo of Ed25519), private keys PEM `PRIVATE KEY` (PKCS#8), mode 0600; they
//! live in [`sealgate_image::keys`] (image signing uses the same files) and are re-exported here.

use std::collections::BTreeMap;

use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::secrets::SealedSecret;

pub use ring::signature::Ed25519KeyPair;
// The key files moved to `sealgate_image::keys` (image signing uses them too); re-exported so
// every `blob::` path keeps working.
pub use sealgate_image::keys::{
    ED25519_SPKI_PREFIX, KeyFileError, generate_key, key_id, key_id_hex, key_id_of, parse_key_id,
    parse_private_key_pem, parse_public_key_pem, private_key_pem, public_key_of, public_key_pem,
    read_private_key, read_public_key, read_public_keys_dir, write_private_key, write_public_key,
};

/// First bytes of every blob.
pub const MAGIC: &[u8; 8] = b"SEALCFG\0";
/// The format version of a blob without secrets.
pub const FORMAT: u16 = 1;
/// The format version of a blob carrying secrets sealed to the box.
pub const FORMAT_SECRETS: u16 = 2;
/// Largest body (postcard header + TOML).
pub const MAX_BODY: usize = 1 << 20;
/// Bytes before the body: magic, format, body length.
pub const PREFIX_LEN: usize = 8 + 2 + 4;
/// Bytes of the Ed25519 signature at the end.
pub const SIGNATURE_LEN: usize = 64;
/// Largest blob: prefix, largest body, signature.
pub const MAX_BLOB: usize = PREFIX_LEN + MAX_BODY + SIGNATURE_LEN;
/// The signature's domain separation prefix.
pub const DOMAIN: &[u8] = b"sealgate config blob v1\0";
/// Most keys one blob may add, and most it may retire.
pub const MAX_KEY_CHANGES: usize = 16;
/// Longest device serial in a header.
pub const MAX_SERIAL: usize = 128;
/// Longest minimum firmware version string.
pub const MAX_VERSION: usize = 64;

/// The signed header of a config blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Id of the key that signed the blob ([`key_id`] of its public key).
    pub key_id: [u8; 8],
    /// The serial of the one box this blob is for; `None` = any box.
    pub device: Option<String>,
    /// Monotonic: a box applies only a sequence greater than the one it stored.
    pub sequence: u64,
    /// Unix seconds (UTC) before which the box refuses the blob; 0 = no lower bound.
    pub not_before: u64,
    /// Unix seconds (UTC) after which the box refuses the blob; `None` = no end.
    pub not_after: Option<u64>,
    /// Lowest firmware version (numeric, dotted: `0.2.0`) that may apply it; `""` = any.
    pub min_firmware: String,
    /// Config-signing public keys the box trusts from now on.
    pub add_keys: Vec<[u8; 32]>,
    /// Ids of config-signing keys the box stops trusting (applied after `add_keys`).
    pub retire_keys: Vec<[u8; 8]>,
}

/// What the box learns from the blob's check: apply it, or it is the blob already applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A newer config: run the semantic checks and apply it.
    Apply,
    /// Same sequence and the very bytes already applied: nothing to do.
    NoOp,
}

/// What [`Blob::check`] compares the blob against.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// This box's serial.
    pub serial: &'a str,
    /// Sequence of the last applied blob (`counter/config_seq`); `None` = none applied yet.
    pub stored_sequence: Option<u64>,
    /// The bytes of the last applied blob (`config/current`).
    pub stored_blob: Option<&'a [u8]>,
    /// Unix seconds now.
    pub now: u64,
    /// This firmware's version (`env!("CARGO_PKG_VERSION")`).
    pub firmware: &'a str,
}

/// Why a blob was refused. Each message starts with the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("format: truncated: the data ends before the blob does")]
    Truncated,
    #[error("format: not a Sealgate config blob (bad magic)")]
    BadMagic,
    #[error(
        "format: unsupported format version {0} (this build reads versions {FORMAT} and {FORMAT_SECRETS})"
    )]
    UnsupportedFormat(u16),
    #[error("format: body larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("format: {0} trailing bytes after the signature")]
    TrailingBytes(usize),
    #[error("format: the length field says {declared} body bytes but the body ends after {used}")]
    LengthMismatch { declared: usize, used: usize },
    #[error("format: malformed body: {0}")]
    Malformed(String),
    #[error("signature: signed by key {0}, which is not trusted")]
    UnknownKey(String),
    #[error("signature: does not verify (altered, or not signed by the key it names)")]
    BadSignature,
    #[error("device: the blob is for device {blob}, this device is {this}")]
    WrongDevice { blob: String, this: String },
    #[error("sequence: the blob's sequence {blob} is lower than the stored {stored} (replayed)")]
    Replayed { blob: u64, stored: u64 },
    #[error(
        "sequence: the blob has the stored sequence {0} but different content (a new config \
         needs a higher sequence)"
    )]
    SameSequenceDifferentContent(u64),
    #[error("time window: not valid before {}, now is {}", format_utc(*.not_before), format_utc(*.now))]
    NotYetValid { not_before: u64, now: u64 },
    #[error("time window: expired at {}, now is {}", format_utc(*.not_after), format_utc(*.now))]
    Expired { not_after: u64, now: u64 },
    #[error("firmware: the blob needs firmware {need} or later, this is {have}")]
    NeedsFirmware { need: String, have: String },
    #[error("key rotation: the blob would retire the last trusted config-signing key")]
    LastKeyRetired,
}

/// A decoded blob: its bytes and what they say. Decoding checked the format only; see
/// [`Blob::verify_signature`] and [`Blob::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    bytes: Vec<u8>,
    header: Header,
    config: String,
    secrets: Vec<SealedSecret>,
}

#[derive(Serialize)]
struct BodyRef<'a> {
    header: &'a Header,
    config: &'a str,
}

#[derive(Serialize)]
struct BodyRef2<'a> {
    header: &'a Header,
    config: &'a str,
    secrets: &'a [SealedSecret],
}

#[derive(Deserialize)]
struct Body {
    header: Header,
    config: String,
}

#[derive(Deserialize)]
struct Body2 {
    header: Header,
    config: String,
    secrets: Vec<SealedSecret>,
}

/// Signs `header` and `config_toml` into a blob. The header is taken as given: its `key_id`
/// should be [`key_id_of`]`(key)` (or the box refuses the blob as signed by another key).
/// A body over [`MAX_BODY`] yields a blob [`decode`] refuses (`TooLarge`); callers that take
/// outside input decode their result.
pub fn sign(header: Header, config_toml: &str, key: &Ed25519KeyPair) -> Vec<u8> {
    let body = BodyRef {
        header: &header,
        config: config_toml,
    };
    // Serializing plain structs of integers, strings and byte arrays into a Vec cannot fail.
    let body = postcard::to_stdvec(&body).unwrap_or_default();
    sign_body(FORMAT, &body, key)
}

/// [`sign`] with secrets sealed to the box ([`crate::secrets::seal`]): format 2, or format 1
/// when there are none.
pub fn sign_with_secrets(
    header: Header,
    config_toml: &str,
    secrets: &[SealedSecret],
    key: &Ed25519KeyPair,
) -> Vec<u8> {
    if secrets.is_empty() {
        return sign(header, config_toml, key);
    }
    let body = BodyRef2 {
        header: &header,
        config: config_toml,
        secrets,
    };
    let body = postcard::to_stdvec(&body).unwrap_or_default();
    sign_body(FORMAT_SECRETS, &body, key)
}

fn sign_body(format: u16, body: &[u8], key: &Ed25519KeyPair) -> Vec<u8> {
    let body_len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len() + SIGNATURE_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&format.to_be_bytes());
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(body);
    let signature = key.sign(&signed_message(&out));
    out.extend_from_slice(signature.as_ref());
    out
}

fn signed_message(signed_part: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(DOMAIN.len() + signed_part.len());
    msg.extend_from_slice(DOMAIN);
    msg.extend_from_slice(signed_part);
    msg
}

/// Checks the format of `bytes` and decodes the header and config text. Checks nothing a key
/// or the box's state is needed for.
pub fn decode(bytes: &[u8]) -> Result<Blob, BlobError> {
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(BlobError::BadMagic);
    }
    let Some(format) = bytes.get(8..10) else {
        return Err(BlobError::Truncated);
    };
    let format = u16::from_be_bytes([format[0], format[1]]);
    if format != FORMAT && format != FORMAT_SECRETS {
        return Err(BlobError::UnsupportedFormat(format));
    }
    let Some(len) = bytes.get(10..PREFIX_LEN) else {
        return Err(BlobError::Truncated);
    };
    let declared = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if declared > MAX_BODY {
        return Err(BlobError::TooLarge);
    }
    let total = PREFIX_LEN + declared + SIGNATURE_LEN;
    if bytes.len() < total {
        return Err(BlobError::Truncated);
    }
    if bytes.len() > total {
        return Err(BlobError::TrailingBytes(bytes.len() - total));
    }
    let body = &bytes[PREFIX_LEN..PREFIX_LEN + declared];
    let malformed = |e: postcard::Error| BlobError::Malformed(format!("body does not decode: {e}"));
    let (body, rest) = if format == FORMAT {
        let (b, rest) = postcard::take_from_bytes::<Body>(body).map_err(malformed)?;
        (
            Body2 {
                header: b.header,
                config: b.config,
                secrets: Vec::new(),
            },
            rest,
        )
    } else {
        postcard::take_from_bytes::<Body2>(body).map_err(malformed)?
    };
    if !rest.is_empty() {
        return Err(BlobError::LengthMismatch {
            declared,
            used: declared - rest.len(),
        });
    }
    check_header(&body.header).map_err(BlobError::Malformed)?;
    crate::secrets::check_all(&body.secrets)
        .map_err(|e| BlobError::Malformed(format!("secrets: {e}")))?;
    Ok(Blob {
        bytes: bytes.to_vec(),
        header: body.header,
        config: body.config,
        secrets: body.secrets,
    })
}

/// Well-formedness of header fields (not their meaning for this box).
fn check_header(h: &Header) -> Result<(), String> {
    if let Some(device) = &h.device
        && (device.is_empty()
            || device.len() > MAX_SERIAL
            || device.chars().any(|c| c.is_control() || c.is_whitespace()))
    {
        return Err(format!(
            "device serial {device:?}: must be 1 to {MAX_SERIAL} bytes without spaces or controls"
        ));
    }
    if let Some(not_after) = h.not_after
        && not_after < h.not_before
    {
        return Err(format!(
            "not_after {} is before not_before {}",
            format_utc(not_after),
            format_utc(h.not_before)
        ));
    }
    if !h.min_firmware.is_empty() && parse_version(&h.min_firmware).is_none() {
        return Err(format!(
            "min_firmware {:?}: not a dotted numeric version like 0.2.0",
            h.min_firmware
        ));
    }
    if h.add_keys.len() > MAX_KEY_CHANGES || h.retire_keys.len() > MAX_KEY_CHANGES {
        return Err(format!(
            "{} keys added and {} retired: at most {MAX_KEY_CHANGES} each",
            h.add_keys.len(),
            h.retire_keys.len()
        ));
    }
    for added in &h.add_keys {
        let id = key_id(added);
        if h.retire_keys.contains(&id) {
            return Err(format!("key {} is both added and retired", key_id_hex(&id)));
        }
    }
    Ok(())
}

impl Blob {
    /// The signed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The config, as the TOML text HQ wrote.
    pub fn config_toml(&self) -> &str {
        &self.config
    }

    /// The secrets sealed to the box (empty in format 1).
    pub fn secrets(&self) -> &[SealedSecret] {
        &self.secrets
    }

    /// The blob's bytes as decoded (what the box stores as `config/current`).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Length of the body (postcard header + config).
    pub fn body_len(&self) -> usize {
        self.bytes.len() - PREFIX_LEN - SIGNATURE_LEN
    }

    /// The signature: the key named in the header must be in `trusted` (key id → public key),
    /// else `UnknownKey` whatever the signature; then Ed25519 over the domain-separated message.
    pub fn verify_signature(&self, trusted: &BTreeMap<[u8; 8], [u8; 32]>) -> Result<(), BlobError> {
        let Some(public) = trusted.get(&self.header.key_id) else {
            return Err(BlobError::UnknownKey(key_id_hex(&self.header.key_id)));
        };
        let split = self.bytes.len() - SIGNATURE_LEN;
        let (signed, signature) = self.bytes.split_at(split);
        UnparsedPublicKey::new(&ED25519, public)
            .verify(&signed_message(signed), signature)
            .map_err(|_| BlobError::BadSignature)
    }

    /// The device check alone: a blob for another serial is refused (one for any device is
    /// not).
    pub fn check_device(&self, serial: &str) -> Result<(), BlobError> {
        match &self.header.device {
            Some(device) if device != serial => Err(BlobError::WrongDevice {
                blob: device.clone(),
                this: serial.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// The box's checks after the signature, in order: device → sequence → time window →
    /// firmware version. Equal sequence and the identical bytes already applied is
    /// [`Verdict::NoOp`] (the later checks are not made: nothing changes).
    pub fn check(&self, ctx: &Context) -> Result<Verdict, BlobError> {
        self.check_device(ctx.serial)?;
        let h = &self.header;
        if let Some(stored) = ctx.stored_sequence {
            if h.sequence < stored {
                return Err(BlobError::Replayed {
                    blob: h.sequence,
                    stored,
                });
            }
            if h.sequence == stored {
                return if ctx.stored_blob == Some(self.bytes.as_slice()) {
                    Ok(Verdict::NoOp)
                } else {
                    Err(BlobError::SameSequenceDifferentContent(stored))
                };
            }
        }
        if ctx.now < h.not_before {
            return Err(BlobError::NotYetValid {
                not_before: h.not_before,
                now: ctx.now,
            });
        }
        if let Some(not_after) = h.not_after
            && ctx.now > not_after
        {
            return Err(BlobError::Expired {
                not_after,
                now: ctx.now,
            });
        }
        if !firmware_suffices(&h.min_firmware, ctx.firmware) {
            return Err(BlobError::NeedsFirmware {
                need: h.min_firmware.clone(),
                have: ctx.firmware.to_owned(),
            });
        }
        Ok(Verdict::Apply)
    }

    /// The trusted config-signing keys once this blob is applied: `trusted` plus `add_keys`,
    /// minus `retire_keys` (ids not trusted are ignored). At least one key must remain.
    pub fn trust_after(
        &self,
        trusted: &BTreeMap<[u8; 8], [u8; 32]>,
    ) -> Result<BTreeMap<[u8; 8], [u8; 32]>, BlobError> {
        let mut after = trusted.clone();
        for key in &self.header.add_keys {
            after.insert(key_id(key), *key);
        }
        for id in &self.header.retire_keys {
            after.remove(id);
        }
        if after.is_empty() {
            return Err(BlobError::LastKeyRetired);
        }
        Ok(after)
    }
}

/// A dotted numeric version (`1`, `0.2`, `0.2.10`) as its components without trailing zeros,
/// so that `0.2` and `0.2.0` compare equal. `None` if not of that form.
pub fn parse_version(s: &str) -> Option<Vec<u64>> {
    if s.len() > MAX_VERSION {
        return None;
    }
    let mut parts = s
        .split('.')
        .map(|p| {
            if p.is_empty() || p.len() > 18 || !p.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                p.parse::<u64>().ok()
            }
        })
        .collect::<Option<Vec<u64>>>()?;
    while parts.last() == Some(&0) {
        parts.pop();
    }
    Some(parts)
}

/// Whether firmware `have` (a crate version; a `-pre` or `+build` suffix is ignored) is at
/// least `need` (`""` = any). An unreadable `have` never suffices.
pub fn firmware_suffices(need: &str, have: &str) -> bool {
    if need.is_empty() {
        return true;
    }
    let have = have.split(['-', '+']).next().unwrap_or("");
    match (parse_version(need), parse_version(have)) {
        (Some(need), Some(have)) => have >= need,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Dates (UTC, Unix seconds).

/// Unix seconds as RFC 3339 UTC: `2026-11-26T22:11:36Z`.
pub fn format_utc(secs: u64) -> String {
    sealgate_proto::calendar::rfc3339(secs)
}

/// Parses `YYYY-MM-DD` (00:00:00 UTC of that day) or `YYYY-MM-DDTHH:MM:SSZ` into Unix seconds.
/// Years 1970 to 9999; the date must exist; no leap seconds, no other offsets than `Z`.
pub fn parse_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 10 && b.len() != 20 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            part.iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')),
        )
    };
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if year < 1970 || !(1..=12).contains(&month) {
        return None;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day == 0 || day > month_days {
        return None;
    }
    let mut secs = 0u64;
    if b.len() == 20 {
        if b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z' {
            return None;
        }
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if h > 23 || mi > 59 || se > 59 {
            return None;
        }
        secs = u64::from(h) * 3600 + u64::from(mi) * 60 + u64::from(se);
    }
    let days = sealgate_proto::calendar::days_from_civil(year.into(), month.into(), day.into())?;
    Some(days * 86_400 + secs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn header(key: &Ed25519KeyPair) -> Header {
        Header {
            key_id: key_id_of(key),
            device: Some("DEV-0000ABCD".into()),
            sequence: 7,
            not_before: 1_000,
            not_after: Some(2_000),
            min_firmware: "0.1.0".into(),
            add_keys: vec![],
            retire_keys: vec![],
        }
    }

    const TOML: &str = "[smtp]\nlisten = [\"127.0.0.1:25\"]\n";

    fn trusted(keys: &[&Ed25519KeyPair]) -> BTreeMap<[u8; 8], [u8; 32]> {
        keys.iter()
            .map(|k| (key_id_of(k), public_key_of(k)))
            .collect()
    }

    fn ctx<'a>() -> Context<'a> {
        Context {
            serial: "DEV-0000ABCD",
            stored_sequence: Some(6),
            stored_blob: None,
            now: 1_500,
            firmware: "0.1.0",
        }
    }

    /// Re-frames a body (postcard bytes) as a signed blob.
    fn frame(body: &[u8], key: &Ed25519KeyPair) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        let sig = key.sign(&signed_message(&out));
        out.extend_from_slice(sig.as_ref());
        out
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        let bytes = sign(header(&k), TOML, &k);
        let blob = decode(&bytes).unwrap();
        assert_eq!(blob.header(), &header(&k));
        assert_eq!(blob.config_toml(), TOML);
        assert_eq!(blob.bytes(), &bytes[..]);
        assert_eq!(blob.body_len(), bytes.len() - PREFIX_LEN - SIGNATURE_LEN);
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(&bytes[8..10], &[0, 1]);
        blob.verify_signature(&trusted(&[&k])).unwrap();
        assert_eq!(blob.check(&ctx()), Ok(Verdict::Apply));
    }

    #[test]
    fn signature_is_over_the_domain_separated_message() {
        let k = key(1);
        let bytes = sign(header(&k), TOML, &k);
        let (signed, sig) = bytes.split_at(bytes.len() - 64);
        let mut msg = b"sealgate config blob v1\0".to_vec();
        msg.extend_from_slice(signed);
        UnparsedPublicKey::new(&ED25519, public_key_of(&k))
            .verify(&msg, sig)
            .unwrap();
        // Not over the bare bytes.
        assert!(
            UnparsedPublicKey::new(&ED25519, public_key_of(&k))
                .verify(signed, sig)
                .is_err()
        );
    }

    #[test]
    fn truncated_at_every_length() {
        let k = key(1);
        let bytes = sign(header(&k), TOML, &k);
        for n in 0..bytes.len() {
            assert_eq!(decode(&bytes[..n]), Err(BlobError::Truncated), "length {n}");
        }
    }

    #[test]
    fn format_2_carries_secrets_and_format_1_stays_without() {
        let k = key(1);
        let pk = crate::secrets::public_of(&[9; 32]);
        let sealed = crate::secrets::seal(&pk, "ldap-gateway", b"s3cret").unwrap();
        let two = sign_with_secrets(header(&k), TOML, std::slice::from_ref(&sealed), &k);
        assert_eq!(two[8..10], FORMAT_SECRETS.to_be_bytes());
        let b = decode(&two).unwrap();
        assert_eq!(b.secrets(), std::slice::from_ref(&sealed));
        assert_eq!(b.config_toml(), TOML);
        b.verify_signature(&trusted(&[&k])).unwrap();
        assert!(two.windows(6).all(|w| w != b"s3cret"));
        let one = sign_with_secrets(header(&k), TOML, &[], &k);
        assert_eq!(one, sign(header(&k), TOML, &k));
        assert!(decode(&one).unwrap().secrets().is_empty());
        let dup = sign_with_secrets(header(&k), TOML, &[sealed.clone(), sealed], &k);
        assert!(matches!(decode(&dup), Err(BlobError::Malformed(m)) if m.contains("twice")));
    }

    #[test]
    fn format_errors() {
        let k = key(1);
        let bytes = sign(header(&k), TOML, &k);
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(BlobError::BadMagic));
        assert_eq!(decode(b"SEALX"), Err(BlobError::BadMagic));
        assert_eq!(decode(b"#!toml\n[smtp]"), Err(BlobError::BadMagic));
        let mut bad = bytes.clone();
        bad[9] = 3;
        assert_eq!(decode(&bad), Err(BlobError::UnsupportedFormat(3)));
        assert_eq!(decode(&bad[..10]), Err(BlobError::UnsupportedFormat(3)));
        // a format-1 body read as format 2 lacks its secrets
        let mut bad = bytes.clone();
        bad[9] = 2;
        assert!(matches!(decode(&bad), Err(BlobError::Malformed(_))));
        let mut bad = bytes.clone();
        bad[10..14].copy_from_slice(&((MAX_BODY as u32) + 1).to_be_bytes());
        assert_eq!(decode(&bad), Err(BlobError::TooLarge));
        assert_eq!(decode(&bad[..14]), Err(BlobError::TooLarge));
        let huge_config = "#".repeat(MAX_BODY);
        assert_eq!(
            decode(&sign(header(&k), &huge_config, &k)),
            Err(BlobError::TooLarge)
        );
        let mut bad = bytes.clone();
        bad.extend_from_slice(b"xyz");
        assert_eq!(decode(&bad), Err(BlobError::TrailingBytes(3)));
        // A body shorter than its declared length: the signature region moves, so frame it.
        let mut body = postcard::to_stdvec(&BodyRef {
            header: &header(&k),
            config: TOML,
        })
        .unwrap();
        let used = body.len();
        body.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode(&frame(&body, &k)),
            Err(BlobError::LengthMismatch {
                declared: used + 2,
                used
            })
        );
        // Bytes that are no postcard body.
        let garbage = frame(&[0xff; 40], &k);
        assert!(matches!(decode(&garbage), Err(BlobError::Malformed(_))));
        let cut = frame(&body[..used / 2], &k);
        assert!(matches!(decode(&cut), Err(BlobError::Malformed(_))));
        // The largest body is accepted as far as length goes.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&FORMAT.to_be_bytes());
        huge.extend_from_slice(&(MAX_BODY as u32).to_be_bytes());
        huge.resize(MAX_BLOB, 0);
        // (All zeros is a valid empty body followed by padding.)
        assert!(matches!(
            decode(&huge),
            Err(BlobError::LengthMismatch {
                declared: MAX_BODY,
                ..
            })
        ));
    }

    #[test]
    fn header_field_checks() {
        let k = key(1);
        let malformed = |h: Header, what: &str| {
            let bytes = sign(h, TOML, &k);
            match decode(&bytes) {
                Err(BlobError::Malformed(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{what}: {other:?}"),
            }
        };
        malformed(
            Header {
                device: Some(String::new()),
                ..header(&k)
            },
            "device serial",
        );
        malformed(
            Header {
                device: Some("DEV 1".into()),
                ..header(&k)
            },
            "device serial",
        );
        malformed(
            Header {
                not_after: Some(999),
                ..header(&k)
            },
            "not_after",
        );
        malformed(
            Header {
                min_firmware: "1.x".into(),
                ..header(&k)
            },
            "min_firmware",
        );
        malformed(
            Header {
                add_keys: vec![[9; 32]; MAX_KEY_CHANGES + 1],
                ..header(&k)
            },
            "at most",
        );
        malformed(
            Header {
                add_keys: vec![[9; 32]],
                retire_keys: vec![key_id(&[9; 32])],
                ..header(&k)
            },
            "both added and retired",
        );
        // Any device, no end, any firmware: fine.
        let bytes = sign(
            Header {
                device: None,
                not_after: None,
                min_firmware: String::new(),
                ..header(&k)
            },
            TOML,
            &k,
        );
        decode(&bytes).unwrap();
    }

    #[test]
    fn signature_errors() {
        let k = key(1);
        let other = key(2);
        let bytes = sign(header(&k), TOML, &k);
        let blob = decode(&bytes).unwrap();
        assert_eq!(
            blob.verify_signature(&trusted(&[&other])),
            Err(BlobError::UnknownKey(key_id_hex(&key_id_of(&k))))
        );
        let e = blob.verify_signature(&BTreeMap::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "signature: signed by key {}, which is not trusted",
                key_id_hex(&key_id_of(&k))
            )
        );
        // Signed by another key that claims k's id.
        let forged = decode(&sign(header(&k), TOML, &other)).unwrap();
        assert_eq!(
            forged.verify_signature(&trusted(&[&k, &other])),
            Err(BlobError::BadSignature)
        );
        // Every single-bit flip of the signed part or the signature is caught (by some check).
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            if let Ok(blob) = decode(&bad) {
                assert!(blob.verify_signature(&trusted(&[&k])).is_err(), "byte {i}");
            }
        }
        // Config text altered after signing.
        let mut bad = bytes.clone();
        let at = bad.len() - 64 - 3;
        bad[at] = b'X';
        let blob = decode(&bad).unwrap();
        assert_eq!(
            blob.verify_signature(&trusted(&[&k])),
            Err(BlobError::BadSignature)
        );
    }

    #[test]
    fn unknown_key_is_reported_before_a_bad_signature() {
        let k = key(1);
        let mut bytes = sign(header(&k), TOML, &k);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let blob = decode(&bytes).unwrap();
        assert!(matches!(
            blob.verify_signature(&trusted(&[&key(2)])),
            Err(BlobError::UnknownKey(_))
        ));
        assert_eq!(
            blob.verify_signature(&trusted(&[&k])),
            Err(BlobError::BadSignature)
        );
    }

    #[test]
    fn check_errors() {
        let k = key(1);
        let bytes = sign(header(&k), TOML, &k);
        let blob = decode(&bytes).unwrap();
        assert_eq!(
            blob.check(&Context {
                serial: "DEV-FFFF0000",
                ..ctx()
            }),
            Err(BlobError::WrongDevice {
                blob: "DEV-0000ABCD".into(),
                this: "DEV-FFFF0000".into()
            })
        );
        assert_eq!(
            blob.check(&Context {
                stored_sequence: Some(8),
                ..ctx()
            }),
            Err(BlobError::Replayed { blob: 7, stored: 8 })
        );
        assert_eq!(
            blob.check(&Context {
                stored_sequence: Some(7),
                ..ctx()
            }),
            Err(BlobError::SameSequenceDifferentContent(7))
        );
        let other_bytes = sign(header(&k), "# other\n", &k);
        assert_eq!(
            blob.check(&Context {
                stored_sequence: Some(7),
                stored_blob: Some(&other_bytes),
                ..ctx()
            }),
            Err(BlobError::SameSequenceDifferentContent(7))
        );
        assert_eq!(
            blob.check(&Context {
                stored_sequence: Some(7),
                stored_blob: Some(&bytes),
                ..ctx()
            }),
            Ok(Verdict::NoOp)
        );
        assert_eq!(
            blob.check(&Context {
                stored_sequence: None,
                ..ctx()
            }),
            Ok(Verdict::Apply)
        );
        assert_eq!(
            blob.check(&Context { now: 999, ..ctx() }),
            Err(BlobError::NotYetValid {
                not_before: 1_000,
                now: 999
            })
        );
        assert_eq!(
            blob.check(&Context {
                now: 1_000,
                ..ctx()
            }),
            Ok(Verdict::Apply)
        );
        assert_eq!(
            blob.check(&Context {
                now: 2_000,
                ..ctx()
            }),
            Ok(Verdict::Apply)
        );
        assert_eq!(
            blob.check(&Context {
                now: 2_001,
                ..ctx()
            }),
            Err(BlobError::Expired {
                not_after: 2_000,
                now: 2_001
            })
        );
        assert_eq!(
            blob.check(&Context {
                firmware: "0.0.9",
                ..ctx()
            }),
            Err(BlobError::NeedsFirmware {
                need: "0.1.0".into(),
                have: "0.0.9".into()
            })
        );
        assert_eq!(
            blob.check(&Context {
                firmware: "0.1",
                ..ctx()
            }),
            Ok(Verdict::Apply)
        );
        // Any device.
        let any = decode(&sign(
            Header {
                device: None,
                ..header(&k)
            },
            TOML,
            &k,
        ))
        .unwrap();
        assert_eq!(
            any.check(&Context {
                serial: "ANY-THING",
                ..ctx()
            }),
            Ok(Verdict::Apply)
        );
    }

    #[test]
    fn check_order() {
        let k = key(1);
        let blob = decode(&sign(header(&k), TOML, &k)).unwrap();
        // Every check fails at once: the device is reported.
        let all_bad = Context {
            serial: "DEV-FFFF0000",
            stored_sequence: Some(9),
            stored_blob: None,
            now: 5_000,
            firmware: "0.0.1",
        };
        assert!(matches!(
            blob.check(&all_bad),
            Err(BlobError::WrongDevice { .. })
        ));
        let mut c = Context {
            serial: "DEV-0000ABCD",
            ..all_bad
        };
        assert!(matches!(blob.check(&c), Err(BlobError::Replayed { .. })));
        c.stored_sequence = Some(7);
        assert!(matches!(
            blob.check(&c),
            Err(BlobError::SameSequenceDifferentContent(7))
        ));
        c.stored_sequence = Some(1);
        assert!(matches!(blob.check(&c), Err(BlobError::Expired { .. })));
        c.now = 1;
        assert!(matches!(blob.check(&c), Err(BlobError::NotYetValid { .. })));
        c.now = 1_500;
        assert!(matches!(
            blob.check(&c),
            Err(BlobError::NeedsFirmware { .. })
        ));
        c.firmware = env!("CARGO_PKG_VERSION");
        assert_eq!(blob.check(&c), Ok(Verdict::Apply));
    }

    #[test]
    fn decode_before_signature_before_check() {
        // A blob by an unknown key, for another device, replayed: the box's first failing step
        // is the signature; a truncated copy of it fails at the format.
        let k = key(1);
        let bytes = sign(header(&k), TOML, &k);
        assert_eq!(decode(&bytes[..bytes.len() - 1]), Err(BlobError::Truncated));
        let blob = decode(&bytes).unwrap();
        let err = blob.verify_signature(&trusted(&[&key(2)])).and_then(|()| {
            blob.check(&Context {
                serial: "OTHER",
                stored_sequence: Some(100),
                ..ctx()
            })
            .map(|_| ())
        });
        assert!(matches!(err, Err(BlobError::UnknownKey(_))));
    }

    #[test]
    fn key_rotation() {
        let old = key(1);
        let new = key(2);
        let h = Header {
            add_keys: vec![public_key_of(&new)],
            retire_keys: vec![key_id_of(&old)],
            ..header(&old)
        };
        let blob = decode(&sign(h, TOML, &old)).unwrap();
        let before = trusted(&[&old]);
        blob.verify_signature(&before).unwrap();
        let after = blob.trust_after(&before).unwrap();
        assert_eq!(after, trusted(&[&new]));
        // The next blob must be signed by the new key.
        let next = decode(&sign(header(&old), TOML, &old)).unwrap();
        assert!(matches!(
            next.verify_signature(&after),
            Err(BlobError::UnknownKey(_))
        ));
        // Retiring the only key without a replacement is refused.
        let h = Header {
            retire_keys: vec![key_id_of(&old)],
            ..header(&old)
        };
        let blob = decode(&sign(h, TOML, &old)).unwrap();
        assert_eq!(blob.trust_after(&before), Err(BlobError::LastKeyRetired));
        // ... but fine while another stays; unknown ids are ignored.
        let h = Header {
            retire_keys: vec![key_id_of(&old), [0xaa; 8]],
            ..header(&old)
        };
        let blob = decode(&sign(h, TOML, &old)).unwrap();
        assert_eq!(
            blob.trust_after(&trusted(&[&old, &new])).unwrap(),
            trusted(&[&new])
        );
        // No changes: the same set.
        let blob = decode(&sign(header(&old), TOML, &old)).unwrap();
        assert_eq!(blob.trust_after(&before).unwrap(), before);
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("0.1.0"), Some(vec![0, 1]));
        assert_eq!(parse_version("0"), Some(vec![]));
        assert_eq!(parse_version("10.2"), Some(vec![10, 2]));
        for bad in ["", ".", "1.", ".1", "1..2", "v1", "1.2-rc1", "+1", "1 .2"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
        assert!(firmware_suffices("", "garbage"));
        assert!(firmware_suffices("0.1.0", "0.1.0"));
        assert!(firmware_suffices("0.1", "0.1.0"));
        assert!(firmware_suffices("0.1.0", "0.10.0"));
        assert!(firmware_suffices("0.9.0", "0.10.0"));
        assert!(!firmware_suffices("0.10.0", "0.9.0"));
        assert!(!firmware_suffices("1.0.0", "0.99.99"));
        assert!(firmware_suffices("0.2.0", "0.2.0-rc1"));
        assert!(!firmware_suffices("0.2.0", "unknown"));
        assert!(firmware_suffices("0.1.0", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn dates() {
        assert_eq!(parse_utc("1970-01-01"), Some(0));
        assert_eq!(parse_utc("1970-01-01T00:00:01Z"), Some(1));
        assert_eq!(parse_utc("2026-11-26T22:11:36Z"), Some(1_795_731_096));
        assert_eq!(parse_utc("2000-02-29"), Some(951_782_400));
        assert_eq!(parse_utc("2024-02-29T23:59:59Z"), Some(1_709_251_199));
        assert_eq!(parse_utc("9999-12-31T23:59:59Z"), Some(253_402_300_799));
        for bad in [
            "",
            "2026-1-01",
            "2026-13-01",
            "2026-00-10",
            "2026-02-29",
            "1900-02-29",
            "2026-04-31",
            "2026-01-00",
            "1969-12-31",
            "2026-01-01T24:00:00Z",
            "2026-01-01T23:60:00Z",
            "2026-01-01T23:59:60Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+01:00",
            "2026-01-01 00:00:00Z",
            "2026/01/01",
            "+026-01-01",
            "2026-01-01T00:00:00z",
            "２０２６-01-01",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_795_731_096), "2026-11-26T22:11:36Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        // Round trip over a range of days, and no panic at the extremes.
        for day in (0..3_000_000u64).step_by(997) {
            let t = day * 86_400 + day % 86_400;
            if t <= 253_402_300_799 {
                assert_eq!(parse_utc(&format_utc(t)), Some(t));
            }
        }
        assert!(!format_utc(u64::MAX).is_empty());
    }
}
