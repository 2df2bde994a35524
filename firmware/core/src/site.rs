//! The box's site configuration as HQ signs it (F-CONFIG): provisioning of the trust anchors,
//! verification of a config blob in the spec's order against the sealed store, and recording
//! an applied blob (anti-rollback sequence, the blob itself, key rotation) only after it was
//! applied.
//!
//! Order, stopping at the first failure with its own error and changing nothing: format →
//! signature by a trusted key → device → sequence (greater, or equal and identical = no-op) →
//! time window → firmware version → semantic checks of the TOML → key rotation leaves a key →
//! the blob's secrets open with this box's key and every `{ secret = … }` the config names is
//! there (F-SECRETS) → (the caller applies) → [`record_applied`] raises the stored sequence and
//! keeps the secrets in the store.

use std::collections::BTreeMap;

use crate::blob::{self, Blob, BlobError, Verdict};
use crate::config::{Config, ConfigError};
use crate::sealed::{SealError, SealedStore};
use crate::secrets::{self, SecretError, SecretValue};

/// Sealed-store record: sequence of the last applied blob (u64 little-endian).
pub const SEQUENCE: &str = "counter/config_seq";
/// Sealed-store record: the bytes of the last applied blob.
pub const CURRENT: &str = "config/current";
/// Sealed-store record prefix of trusted config-signing keys (`trust/config/<keyid>`).
pub const TRUST: &str = "trust/config/";

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("{0}")]
    Blob(#[from] BlobError),
    #[error("semantic check: {0}")]
    Config(#[from] ConfigError),
    #[error("sealed store: {0}")]
    Seal(#[from] SealError),
    #[error(
        "this box is not provisioned: no config-signing key is trusted yet (run `sealgate \
         provision --trust KEY.pub` once)"
    )]
    NotProvisioned,
    #[error(
        "this box is already provisioned ({0} trusted key(s)); keys change only by a signed \
         config blob (add_keys / retire_keys)"
    )]
    AlreadyProvisioned(usize),
    #[error("provision: give at least one key")]
    NoKeys,
    #[error("secrets: {0}")]
    Secret(#[from] SecretError),
    #[error(
        "secrets: config key {key} names secret {name:?}, which neither this blob nor the box's \
         sealed store holds (sign with `sealctl config sign --secret {name}=FILE --device-key BOX.pub`)"
    )]
    MissingSecret { key: String, name: String },
}

/// Sealed-store record: the device identity key (Ed25519 PKCS#8), made on the box.
pub const IDENTITY: &str = "device/identity";

/// Makes the device identity key on first start (staged; the caller commits). Returns whether
/// one was made.
pub fn ensure_identity(store: &mut SealedStore) -> Result<bool, blob::KeyFileError> {
    if store.get(IDENTITY).is_some() {
        return Ok(false);
    }
    let key = blob::generate_key()?;
    store.put(IDENTITY, key.to_vec());
    Ok(true)
}

/// Makes the box's X25519 encryption key (F-SECRETS) on first start (staged; the caller
/// commits). Returns whether one was made.
pub fn ensure_encryption_key(store: &mut SealedStore) -> Result<bool, SecretError> {
    if store.get(secrets::ENCRYPTION).is_some() {
        return Ok(false);
    }
    let key = secrets::generate()?;
    store.put(secrets::ENCRYPTION, key.to_vec());
    Ok(true)
}

/// The box's encryption key (private), if made.
fn encryption_key(store: &SealedStore) -> Option<zeroize::Zeroizing<[u8; 32]>> {
    let bytes: [u8; 32] = store.get(secrets::ENCRYPTION)?.try_into().ok()?;
    Some(zeroize::Zeroizing::new(bytes))
}

/// The public half of the box's encryption key, if made (what HQ seals secrets to).
pub fn encryption_public(store: &SealedStore) -> Option<[u8; 32]> {
    encryption_key(store).map(|k| secrets::public_of(&k))
}

/// The secrets `config` names, from `fresh` (a blob just verified) or else the store; a
/// missing one is [`SiteError::MissingSecret`] naming the key.
pub fn resolve_secrets(
    store: Option<&SealedStore>,
    config: &Config,
    fresh: &BTreeMap<String, SecretValue>,
) -> Result<BTreeMap<String, SecretValue>, SiteError> {
    let mut out = BTreeMap::new();
    for r in config.secret_refs() {
        let value = fresh.get(&r.name).cloned().or_else(|| {
            store
                .and_then(|s| s.get(&format!("{}{}", secrets::STORED, r.name)))
                .map(|v| SecretValue::new(v.to_vec()))
        });
        match value {
            Some(v) => out.insert(r.name.clone(), v),
            None => {
                return Err(SiteError::MissingSecret {
                    key: r.key.clone(),
                    name: r.name.clone(),
                });
            }
        };
    }
    Ok(out)
}

/// Opens every secret of `blob` with the box's key.
fn open_secrets(
    store: &SealedStore,
    blob: &Blob,
) -> Result<BTreeMap<String, SecretValue>, SiteError> {
    if blob.secrets().is_empty() {
        return Ok(BTreeMap::new());
    }
    let key = encryption_key(store).ok_or(SecretError::NoKey)?;
    blob.secrets()
        .iter()
        .map(|s| {
            Ok((
                s.name.clone(),
                SecretValue::new(secrets::open(&key, s)?.to_vec()),
            ))
        })
        .collect()
}

/// The device identity's public key, if made.
pub fn identity_public(store: &SealedStore) -> Option<[u8; 32]> {
    let pair = blob::Ed25519KeyPair::from_pkcs8_maybe_unchecked(store.get(IDENTITY)?).ok()?;
    Some(blob::public_key_of(&pair))
}

/// The trusted config-signing keys in the store.
pub fn trusted(store: &SealedStore) -> BTreeMap<[u8; 8], [u8; 32]> {
    store
        .names()
        .into_iter()
        .filter(|n| n.starts_with(TRUST))
        .filter_map(|n| {
            let key: [u8; 32] = store.get(&n)?.try_into().ok()?;
            Some((blob::key_id(&key), key))
        })
        .collect()
}

/// The stored sequence, if a blob was ever applied.
pub fn stored_sequence(store: &SealedStore) -> Option<u64> {
    let bytes: [u8; 8] = store.get(SEQUENCE)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Installs the first trust anchors (staged; the caller commits). Refused once any exists.
pub fn provision(store: &mut SealedStore, keys: &[[u8; 32]]) -> Result<(), SiteError> {
    let have = trusted(store).len();
    if have > 0 {
        return Err(SiteError::AlreadyProvisioned(have));
    }
    if keys.is_empty() {
        return Err(SiteError::NoKeys);
    }
    for k in keys {
        store.put(
            &format!("{TRUST}{}", blob::key_id_hex(&blob::key_id(k))),
            k.to_vec(),
        );
    }
    Ok(())
}

/// Whether `bytes` look like a config blob (rather than TOML).
pub fn is_blob(bytes: &[u8]) -> bool {
    bytes.starts_with(blob::MAGIC)
}

/// A blob that passed every check, ready to apply.
#[derive(Debug)]
pub struct Checked {
    pub blob: Blob,
    pub config: Config,
    pub verdict: Verdict,
    /// The trusted keys once it is applied.
    pub trust_after: BTreeMap<[u8; 8], [u8; 32]>,
    /// The blob's secrets, opened.
    pub secrets: BTreeMap<String, SecretValue>,
}

/// Verifies `bytes` in the spec's order against the store; changes nothing.
pub fn verify(
    store: &SealedStore,
    bytes: &[u8],
    serial: &str,
    now: u64,
    origin: &str,
) -> Result<Checked, SiteError> {
    let blob = blob::decode(bytes)?;
    let trusted = trusted(store);
    if trusted.is_empty() {
        return Err(SiteError::NotProvisioned);
    }
    blob.verify_signature(&trusted)?;
    let verdict = blob.check(&blob::Context {
        serial,
        stored_sequence: stored_sequence(store),
        stored_blob: store.get(CURRENT),
        now,
        firmware: env!("CARGO_PKG_VERSION"),
    })?;
    let config = Config::from_toml(blob.config_toml(), origin)?;
    let trust_after = blob.trust_after(&trusted)?;
    let secrets = open_secrets(store, &blob)?;
    resolve_secrets(Some(store), &config, &secrets)?;
    Ok(Checked {
        blob,
        config,
        verdict,
        trust_after,
        secrets,
    })
}

/// After the blob's config was applied: raise the sequence, keep the blob, rotate keys
/// (staged; the caller commits).
pub fn record_applied(store: &mut SealedStore, checked: &Checked) {
    store.put(
        SEQUENCE,
        checked.blob.header().sequence.to_le_bytes().to_vec(),
    );
    store.put(CURRENT, checked.blob.bytes().to_vec());
    for (id, _) in trusted(store) {
        if !checked.trust_after.contains_key(&id) {
            store.remove(&format!("{TRUST}{}", blob::key_id_hex(&id)));
        }
    }
    for (id, key) in &checked.trust_after {
        store.put(&format!("{TRUST}{}", blob::key_id_hex(id)), key.to_vec());
    }
    // Secrets: the blob's replace the stored ones; a stored one neither brought again nor
    // named by the config is gone (a retired password does not linger in the store).
    let named: Vec<&str> = checked
        .config
        .secret_refs()
        .into_iter()
        .map(|r| r.name.as_str())
        .collect();
    for n in store.names() {
        if let Some(name) = n.strip_prefix(secrets::STORED)
            && !checked.secrets.contains_key(name)
            && !named.contains(&name)
        {
            store.remove(&n);
        }
    }
    for (name, value) in &checked.secrets {
        store.put(
            &format!("{}{name}", secrets::STORED),
            value.expose().to_vec(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{Ed25519KeyPair, Header};

    const TOML: &str = "[smtp]\nlisten = [\"127.0.0.1:2525\"]\n";

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn header(k: &Ed25519KeyPair, seq: u64) -> Header {
        Header {
            key_id: blob::key_id_of(k),
            device: None,
            sequence: seq,
            not_before: 0,
            not_after: None,
            min_firmware: String::new(),
            add_keys: Vec::new(),
            retire_keys: Vec::new(),
        }
    }

    fn store(tag: &str) -> (SealedStore, std::path::PathBuf) {
        let d = std::env::temp_dir().join(format!("sealgate-site-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        (SealedStore::open(&d, &[7; 32], "DEV-TEST").unwrap(), d)
    }

    #[test]
    fn provision_verify_apply_and_refuse_replays() {
        let (mut s, d) = store("flow");
        let hq = key(1);
        let b1 = blob::sign(header(&hq, 1), TOML, &hq);
        assert!(matches!(
            verify(&s, &b1, "DEV-TEST", 100, "t"),
            Err(SiteError::NotProvisioned)
        ));
        assert!(identity_public(&s).is_none());
        assert!(ensure_identity(&mut s).unwrap());
        assert!(!ensure_identity(&mut s).unwrap());
        let id = identity_public(&s).unwrap();
        provision(&mut s, &[blob::public_key_of(&hq)]).unwrap();
        assert!(matches!(
            provision(&mut s, &[blob::public_key_of(&key(2))]),
            Err(SiteError::AlreadyProvisioned(1))
        ));
        let c = verify(&s, &b1, "DEV-TEST", 100, "t").unwrap();
        assert_eq!(c.verdict, Verdict::Apply);
        record_applied(&mut s, &c);
        s.commit().unwrap();
        assert_eq!(stored_sequence(&s), Some(1));
        assert_eq!(
            identity_public(&s),
            Some(id),
            "the identity survives commits"
        );
        // the same blob again: no-op; an older one: replay
        assert_eq!(
            verify(&s, &b1, "DEV-TEST", 100, "t").unwrap().verdict,
            Verdict::NoOp
        );
        let b0 = blob::sign(header(&hq, 0), TOML, &hq);
        assert!(matches!(
            verify(&s, &b0, "DEV-TEST", 100, "t"),
            Err(SiteError::Blob(BlobError::Replayed { .. }))
        ));
        // a semantically bad config with a good signature
        let bad = blob::sign(header(&hq, 2), "[smtp]\nlisten = [\"nowhere\"]\n", &hq);
        assert!(matches!(
            verify(&s, &bad, "DEV-TEST", 100, "t"),
            Err(SiteError::Config(_))
        ));
        // rotation: the new key replaces the old one once applied
        let next = key(3);
        let mut h = header(&hq, 2);
        h.add_keys = vec![blob::public_key_of(&next)];
        h.retire_keys = vec![blob::key_id_of(&hq)];
        let b2 = blob::sign(h, TOML, &hq);
        let c = verify(&s, &b2, "DEV-TEST", 100, "t").unwrap();
        record_applied(&mut s, &c);
        s.commit().unwrap();
        let t = trusted(&s);
        assert_eq!(t.len(), 1);
        assert!(t.contains_key(&blob::key_id_of(&next)));
        let b3 = blob::sign(header(&hq, 3), TOML, &hq);
        assert!(matches!(
            verify(&s, &b3, "DEV-TEST", 100, "t"),
            Err(SiteError::Blob(BlobError::UnknownKey(_)))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    const WITH_SECRET: &str = r#"
[smtp]
listen = ["127.0.0.1:2525"]
local_domains = ["corp.test"]

[[auth.backend]]
name = "dir"
kind = "ldap"
url = "ldaps://127.0.0.1:636"

[[recipients]]
domain = "corp.test"
backend = "dir"
search_base = "dc=corp,dc=test"
service_dn = "cn=gw,dc=corp,dc=test"
service_password = { secret = "dir-pw" }
"#;

    #[test]
    fn secrets_open_on_their_box_only_and_are_kept_until_unused() {
        let (mut a, da) = store("sec-a");
        let (mut b, db) = store("sec-b");
        let hq = key(1);
        for s in [&mut a, &mut b] {
            provision(s, &[blob::public_key_of(&hq)]).unwrap();
            assert!(ensure_encryption_key(s).unwrap());
            assert!(!ensure_encryption_key(s).unwrap());
        }
        let pk_a = encryption_public(&a).unwrap();
        assert_ne!(Some(pk_a), encryption_public(&b));
        let sealed = secrets::seal(&pk_a, "dir-pw", b"gw-pass").unwrap();
        let b1 = blob::sign_with_secrets(header(&hq, 1), WITH_SECRET, &[sealed], &hq);
        // another box: its own error, naming both key ids
        match verify(&b, &b1, "DEV-TEST", 100, "t") {
            Err(SiteError::Secret(SecretError::OtherBox { name, .. })) => {
                assert_eq!(name, "dir-pw")
            }
            other => panic!("{other:?}"),
        }
        // the config names a secret the blob does not carry and the store does not hold
        let bare = blob::sign(header(&hq, 1), WITH_SECRET, &hq);
        match verify(&a, &bare, "DEV-TEST", 100, "t") {
            Err(SiteError::MissingSecret { key, name }) => {
                assert_eq!(key, "recipients[0].service_password");
                assert_eq!(name, "dir-pw");
            }
            other => panic!("{other:?}"),
        }
        let c = verify(&a, &b1, "DEV-TEST", 100, "t").unwrap();
        assert_eq!(c.secrets["dir-pw"].expose(), b"gw-pass");
        assert!(!format!("{c:?}").contains("gw-pass"));
        record_applied(&mut a, &c);
        a.commit().unwrap();
        assert_eq!(a.get("secret/dir-pw"), Some(&b"gw-pass"[..]));
        // a later blob without the secret keeps using the stored one
        let b2 = blob::sign(header(&hq, 2), WITH_SECRET, &hq);
        let c = verify(&a, &b2, "DEV-TEST", 100, "t").unwrap();
        let resolved = resolve_secrets(Some(&a), &c.config, &c.secrets).unwrap();
        assert_eq!(resolved["dir-pw"].expose(), b"gw-pass");
        record_applied(&mut a, &c);
        a.commit().unwrap();
        assert!(a.get("secret/dir-pw").is_some());
        // one whose config no longer names it: the stored secret is removed
        let b3 = blob::sign(header(&hq, 3), TOML, &hq);
        let c = verify(&a, &b3, "DEV-TEST", 100, "t").unwrap();
        record_applied(&mut a, &c);
        a.commit().unwrap();
        assert!(a.get("secret/dir-pw").is_none());
        std::fs::remove_dir_all(&da).unwrap();
        let _ = std::fs::remove_dir_all(&db);
    }
}
