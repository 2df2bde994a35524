//! Secrets in the signed config, encrypted to one box (F-SECRETS): HPKE (RFC 9180) base mode,
//! single shot, with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305.
//!
//! Each box makes an X25519 key pair in its sealed store ([`ENCRYPTION`]); `sealgate device`
//! shows the public half. HQ's `sealctl config sign --secret NAME=FILE --device-key BOX.pub`
//! seals each secret to that public key: a fresh ephemeral key per secret, `info` =
//! [`INFO`], the secret's name as AAD (a ciphertext cannot be moved to another name). The
//! blob carries only [`SealedSecret`]s; whoever intercepts it, or another box, learns nothing.
//!
//! The construction, byte by byte (`||` concatenates; I2OSP(n, w) is n big-endian in w bytes):
//!
//! ```text
//! suite_kem  = "KEM"  || I2OSP(0x0020, 2)
//! suite_hpke = "HPKE" || I2OSP(0x0020, 2) || I2OSP(0x0001, 2) || I2OSP(0x0003, 2)
//! LabeledExtract(suite, salt, label, ikm)   = HMAC-SHA256(salt, "HPKE-v1" || suite || label || ikm)
//! LabeledExpand(suite, prk, label, info, L) = HKDF-Expand-SHA256(prk,
//!                                     I2OSP(L, 2) || "HPKE-v1" || suite || label || info, L)
//! sender:    skE random, enc = X25519(skE, 9);  dh = X25519(skE, pkR)
//! recipient: dh = X25519(skR, enc)   (an all-zero dh is refused: a non-contributory point)
//! eae_prk       = LabeledExtract(suite_kem, "", "eae_prk", dh)
//! shared_secret = LabeledExpand(suite_kem, eae_prk, "shared_secret", enc || pkR, 32)
//! ctx   = 0x00 || LabeledExtract(suite_hpke, "", "psk_id_hash", "")
//!              || LabeledExtract(suite_hpke, "", "info_hash", info)
//! secret     = LabeledExtract(suite_hpke, shared_secret, "secret", "")
//! key        = LabeledExpand(suite_hpke, secret, "key", ctx, 32)
//! base_nonce = LabeledExpand(suite_hpke, secret, "base_nonce", ctx, 12)
//! ciphertext = ChaCha20-Poly1305(key, nonce = base_nonce, aad = name, plaintext)
//! ```
//!
//! The unit tests check it against RFC 9180 appendix A.2.1 (the same suite).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::hmac;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Sealed-store record: this box's X25519 encryption key (32 secret bytes), made on the box.
pub const ENCRYPTION: &str = "device/encryption";
/// Sealed-store record prefix of the secrets a blob brought (`secret/NAME`).
pub const STORED: &str = "secret/";
/// HPKE `info` of every config secret.
pub const INFO: &[u8] = b"sealgate config secret v1";
/// Most secrets one blob may carry.
pub const MAX_SECRETS: usize = 32;
/// Longest secret (bytes of plaintext).
pub const MAX_SECRET_LEN: usize = 4096;
/// Longest secret name.
pub const MAX_NAME: usize = 64;

const SUITE_KEM: &[u8] = b"KEM\x00\x20";
const SUITE_HPKE: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x03";

/// One secret as the blob carries it: readable only with the box's private key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// What the config calls it (`{ secret = "NAME" }`); also the AEAD's associated data.
    pub name: String,
    /// First 8 bytes of SHA-256 of the X25519 public key it was sealed to.
    pub key_id: [u8; 8],
    /// The sender's ephemeral public key.
    pub enc: [u8; 32],
    /// ChaCha20-Poly1305 of the secret, tag included.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("name", &self.name)
            .field("key_id", &crate::hex::encode(&self.key_id))
            .field("len", &self.ciphertext.len())
            .finish()
    }
}

/// A secret's plaintext in memory: wiped when dropped, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> SecretValue {
        SecretValue(Zeroizing::new(bytes))
    }

    /// The plaintext, for the one place that sends it (a bind, a login).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue(<{} bytes>)", self.0.len())
    }
}

/// Why a secret could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "secret {name:?}: encrypted to another box (key {blob}); this box's encryption key is \
         {this} (`sealgate device` shows it)"
    )]
    OtherBox {
        name: String,
        blob: String,
        this: String,
    },
    #[error("secret {0:?}: does not decrypt (altered, or sealed under another name)")]
    Undecryptable(String),
    #[error("secret {0:?}: the sender's key is not a valid X25519 point")]
    BadPoint(String),
    #[error("this box has no encryption key yet (start it once to make one)")]
    NoKey,
    #[error("secret name {0:?}: 1 to {MAX_NAME} of A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("secret {0:?} appears twice")]
    Duplicate(String),
    #[error("{0} secrets: at most {MAX_SECRETS}")]
    TooMany(usize),
    #[error("secret {0:?}: longer than {MAX_SECRET_LEN} bytes")]
    TooLong(String),
    #[error("randomness: the system's random source failed")]
    Random,
}

/// The id of an X25519 public key: first 8 bytes of its SHA-256.
pub fn key_id(public: &[u8; 32]) -> [u8; 8] {
    let d = ring::digest::digest(&ring::digest::SHA256, public);
    let mut id = [0; 8];
    id.copy_from_slice(&d.as_ref()[..8]);
    id
}

/// A fresh X25519 private key (32 random bytes).
pub fn generate() -> Result<Zeroizing<[u8; 32]>, SecretError> {
    let mut sk = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), sk.as_mut())
        .map_err(|_| SecretError::Random)?;
    Ok(sk)
}

/// The public half of an X25519 private key.
pub fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// Checks a secret name: 1–[`MAX_NAME`] of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), SecretError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SecretError::BadName(name.to_owned()))
    }
}

/// Checks the bounds of a blob's secrets: count, names, uniqueness, lengths.
pub fn check_all(secrets: &[SealedSecret]) -> Result<(), SecretError> {
    if secrets.len() > MAX_SECRETS {
        return Err(SecretError::TooMany(secrets.len()));
    }
    for (i, s) in secrets.iter().enumerate() {
        check_name(&s.name)?;
        if secrets[..i].iter().any(|e| e.name == s.name) {
            return Err(SecretError::Duplicate(s.name.clone()));
        }
        if s.ciphertext.len() > MAX_SECRET_LEN + 16 {
            return Err(SecretError::TooLong(s.name.clone()));
        }
    }
    Ok(())
}

/// Seals `plaintext` under `name` to the box whose X25519 public key is `recipient`.
pub fn seal(
    recipient: &[u8; 32],
    name: &str,
    plaintext: &[u8],
) -> Result<SealedSecret, SecretError> {
    let ephemeral = generate()?;
    seal_with(recipient, &ephemeral, name, plaintext)
}

/// [`seal`] with a given ephemeral key (the test vectors fix it).
fn seal_with(
    recipient: &[u8; 32],
    ephemeral: &[u8; 32],
    name: &str,
    plaintext: &[u8],
) -> Result<SealedSecret, SecretError> {
    check_name(name)?;
    if plaintext.len() > MAX_SECRET_LEN {
        return Err(SecretError::TooLong(name.to_owned()));
    }
    let sk = StaticSecret::from(*ephemeral);
    let enc = PublicKey::from(&sk).to_bytes();
    let dh = sk.diffie_hellman(&PublicKey::from(*recipient));
    if !dh.was_contributory() {
        return Err(SecretError::BadPoint(name.to_owned()));
    }
    let shared = shared_secret(dh.as_bytes(), &enc, recipient);
    let (key, nonce) = key_schedule(&shared, INFO);
    let mut ciphertext = plaintext.to_vec();
    key.seal_in_place_append_tag(nonce, Aad::from(name.as_bytes()), &mut ciphertext)
        .map_err(|_| SecretError::Undecryptable(name.to_owned()))?;
    Ok(SealedSecret {
        name: name.to_owned(),
        key_id: key_id(recipient),
        enc,
        ciphertext,
    })
}

/// Opens a sealed secret with this box's private key.
pub fn open(secret_key: &[u8; 32], s: &SealedSecret) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    let public = public_of(secret_key);
    let this = key_id(&public);
    if s.key_id != this {
        return Err(SecretError::OtherBox {
            name: s.name.clone(),
            blob: crate::hex::encode(&s.key_id),
            this: crate::hex::encode(&this),
        });
    }
    let dh = StaticSecret::from(*secret_key).diffie_hellman(&PublicKey::from(s.enc));
    if !dh.was_contributory() {
        return Err(SecretError::BadPoint(s.name.clone()));
    }
    let shared = shared_secret(dh.as_bytes(), &s.enc, &public);
    let (key, nonce) = key_schedule(&shared, INFO);
    let mut buf = Zeroizing::new(s.ciphertext.clone());
    let len = key
        .open_in_place(nonce, Aad::from(s.name.as_bytes()), &mut buf)
        .map_err(|_| SecretError::Undecryptable(s.name.clone()))?
        .len();
    buf.truncate(len);
    Ok(buf)
}

fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> hmac::Tag {
    // HKDF-Extract(salt, IKM) is HMAC(salt, IKM); an empty salt is HashLen zero bytes, which
    // HMAC pads to the same key as the empty one.
    let key = hmac::Key::new(hmac::HMAC_SHA256, salt);
    let mut ctx = hmac::Context::with_key(&key);
    for part in [b"HPKE-v1".as_slice(), suite, label, ikm] {
        ctx.update(part);
    }
    ctx.sign()
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn labeled_expand<const L: usize>(
    suite: &[u8],
    prk: &[u8],
    label: &[u8],
    info: &[u8],
) -> Zeroizing<[u8; L]> {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, prk);
    // L is 12 or 32 here, far below the 2-byte length field's and HKDF's (255 × 32) limits.
    let l = (L as u16).to_be_bytes();
    let parts: [&[u8]; 5] = [&l, b"HPKE-v1", suite, label, info];
    let mut out = Zeroizing::new([0u8; L]);
    if let Ok(okm) = prk.expand(&parts, Len(L)) {
        // fill cannot fail: the output has exactly the length asked for
        let _ = okm.fill(out.as_mut());
    }
    out
}

fn shared_secret(dh: &[u8; 32], enc: &[u8; 32], pk_r: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let eae_prk = labeled_extract(SUITE_KEM, b"", b"eae_prk", dh);
    let mut kem_context = [0u8; 64];
    kem_context[..32].copy_from_slice(enc);
    kem_context[32..].copy_from_slice(pk_r);
    labeled_expand::<32>(SUITE_KEM, eae_prk.as_ref(), b"shared_secret", &kem_context)
}

fn key_schedule(shared: &[u8; 32], info: &[u8]) -> (LessSafeKey, Nonce) {
    let psk_id_hash = labeled_extract(SUITE_HPKE, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(SUITE_HPKE, b"", b"info_hash", info);
    let mut ctx = Vec::with_capacity(65);
    ctx.push(0u8);
    ctx.extend_from_slice(psk_id_hash.as_ref());
    ctx.extend_from_slice(info_hash.as_ref());
    let secret = labeled_extract(SUITE_HPKE, shared, b"secret", b"");
    let key = labeled_expand::<32>(SUITE_HPKE, secret.as_ref(), b"key", &ctx);
    let nonce = labeled_expand::<12>(SUITE_HPKE, secret.as_ref(), b"base_nonce", &ctx);
    // A 32-byte key is exactly what ChaCha20-Poly1305 takes.
    let key = UnboundKey::new(&aead::CHACHA20_POLY1305, key.as_ref())
        .map(LessSafeKey::new)
        .unwrap_or_else(|_| unreachable!("32-byte ChaCha20-Poly1305 key"));
    (key, Nonce::assume_unique_for_key(*nonce))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hex;

    fn h<const N: usize>(s: &str) -> [u8; N] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    // RFC 9180 A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, base mode.
    const SK_E: &str = "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600";
    const PK_E: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
    const SK_R: &str = "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
    const PK_R: &str = "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
    const INFO_A21: &str = "4f6465206f6e2061204772656369616e2055726e";

    #[test]
    fn rfc9180_a21_key_schedule_and_first_message() {
        let sk_e: [u8; 32] = h(SK_E);
        let pk_r: [u8; 32] = h(PK_R);
        assert_eq!(public_of(&sk_e), h::<32>(PK_E));
        assert_eq!(public_of(&h(SK_R)), pk_r);
        let dh = StaticSecret::from(sk_e).diffie_hellman(&PublicKey::from(pk_r));
        let shared = shared_secret(dh.as_bytes(), &h(PK_E), &pk_r);
        assert_eq!(
            *shared,
            h::<32>("0bbe78490412b4bbea4812666f7916932b828bba79942424abb65244930d69a7")
        );
        let (key, nonce) = key_schedule(&shared, &hex::decode(INFO_A21).unwrap());
        assert_eq!(nonce.as_ref(), &h::<12>("5c4d98150661b848853b547f"));
        let mut m =
            hex::decode("4265617574792069732074727574682c20747275746820626561757479").unwrap();
        key.seal_in_place_append_tag(
            nonce,
            Aad::from(hex::decode("436f756e742d30").unwrap()),
            &mut m,
        )
        .unwrap();
        assert_eq!(
            hex::encode(&m),
            "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"
        );
    }

    #[test]
    fn seal_open_round_trip_and_refusals() {
        let box_a = generate().unwrap();
        let box_b = generate().unwrap();
        let s = seal(&public_of(&box_a), "ldap-gateway", b"hunter2").unwrap();
        assert_eq!(&**open(&box_a, &s).unwrap(), b"hunter2");
        assert!(matches!(
            open(&box_b, &s),
            Err(SecretError::OtherBox { .. })
        ));
        let mut renamed = s.clone();
        renamed.name = "other".into();
        assert_eq!(
            open(&box_a, &renamed),
            Err(SecretError::Undecryptable("other".into()))
        );
        let mut flipped = s.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(matches!(
            open(&box_a, &flipped),
            Err(SecretError::Undecryptable(_))
        ));
        let mut zero = s.clone();
        zero.enc = [0; 32];
        assert!(matches!(open(&box_a, &zero), Err(SecretError::BadPoint(_))));
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.ciphertext.windows(7).all(|w| w != b"hunter2"));
        let again = seal(&public_of(&box_a), "ldap-gateway", b"hunter2").unwrap();
        assert_ne!(again.enc, s.enc, "a fresh ephemeral key each time");
    }

    #[test]
    fn bounds() {
        let pk = public_of(&generate().unwrap());
        assert!(seal(&pk, "", b"x").is_err());
        assert!(seal(&pk, "a b", b"x").is_err());
        assert!(seal(&pk, &"n".repeat(65), b"x").is_err());
        assert!(seal(&pk, "ok", &[0; MAX_SECRET_LEN + 1]).is_err());
        let one = seal(&pk, "a", b"x").unwrap();
        assert_eq!(
            check_all(&[one.clone(), one.clone()]),
            Err(SecretError::Duplicate("a".into()))
        );
        assert!(check_all(&vec![one; MAX_SECRETS + 1]).is_err());
    }
}
