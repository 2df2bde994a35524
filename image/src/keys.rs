//! Ed25519 key files (PEM) and key ids: the keys HQ signs config blobs with and the keys an
//! image build signs update bundles with.
//!
//! Key ids are the lower-case hex of the first 8 bytes of SHA-256 of the 32-byte public key
//! ([`key_id`], [`key_id_hex`]). Public keys are PEM `PUBLIC KEY` (SubjectPublicKeyInfo of
//! Ed25519), private keys PEM `PRIVATE KEY` (PKCS#8, v1 or v2), mode 0600.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ring::digest;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use rustls_pki_types::pem::{self, PemObject};
use zeroize::{Zeroize, Zeroizing};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
pub const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Most `*.pub` files [`read_public_keys_dir`] reads from one directory.
pub const MAX_KEYS_IN_DIR: usize = 256;

/// The key id of a public key: the first 8 bytes of its SHA-256.
pub fn key_id(public_key: &[u8; 32]) -> [u8; 8] {
    let d = digest::digest(&digest::SHA256, public_key);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d.as_ref()[..8]);
    id
}

/// A key id in its written form: 16 lower-case hex digits.
pub fn key_id_hex(id: &[u8; 8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a written key id (16 hex digits, either case).
pub fn parse_key_id(s: &str) -> Option<[u8; 8]> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 8];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// The 32-byte public key of a key pair.
pub fn public_key_of(key: &Ed25519KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(key.public_key().as_ref());
    out
}

/// The key id of a key pair's public key.
pub fn key_id_of(key: &Ed25519KeyPair) -> [u8; 8] {
    key_id(&public_key_of(key))
}

/// An error reading or writing a key file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: cannot write: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("{path}: no PEM \"{label}\" block: {reason}")]
    NotPem {
        path: PathBuf,
        label: &'static str,
        reason: String,
    },
    #[error(
        "{path}: not an Ed25519 public key (a {len}-byte SubjectPublicKeyInfo; Ed25519's is 44 \
         bytes)"
    )]
    NotEd25519Public { path: PathBuf, len: usize },
    #[error("{path}: not a usable Ed25519 private key (PKCS#8): {reason}")]
    BadPrivateKey { path: PathBuf, reason: String },
    #[error(
        "{path}: private key file is accessible to group or others (mode {mode:o}); chmod 600 it"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("generating a key: the system random source failed")]
    Random,
}

/// Largest key file read.
const MAX_KEY_FILE: u64 = 64 * 1024;

fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut data = Zeroizing::new(Vec::new());
    file.take(MAX_KEY_FILE)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    Ok(data)
}

fn pem_reason(e: pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => "none found".to_owned(),
        other => other.to_string(),
    }
}

/// Parses a PEM `PUBLIC KEY` (Ed25519 SubjectPublicKeyInfo); `path` names the source in errors.
pub fn parse_public_key_pem(pem: &[u8], path: &Path) -> Result<[u8; 32], KeyFileError> {
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem).map_err(|e| KeyFileError::NotPem {
        path: path.to_path_buf(),
        label: "PUBLIC KEY",
        reason: pem_reason(e),
    })?;
    let der: &[u8] = spki.as_ref();
    match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
        Some(key) if key.len() == 32 => {
            let mut out = [0u8; 32];
            out.copy_from_slice(key);
            Ok(out)
        }
        _ => Err(KeyFileError::NotEd25519Public {
            path: path.to_path_buf(),
            len: der.len(),
        }),
    }
}

/// Reads an Ed25519 public key file (PEM `PUBLIC KEY`).
pub fn read_public_key(path: &Path) -> Result<[u8; 32], KeyFileError> {
    let data = read_key_file(path)?;
    parse_public_key_pem(&data, path)
}

/// Parses a PEM `PRIVATE KEY` (Ed25519 PKCS#8, v1 or v2); `path` names the source in errors.
pub fn parse_private_key_pem(pem: &[u8], path: &Path) -> Result<Ed25519KeyPair, KeyFileError> {
    let mut der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| KeyFileError::NotPem {
        path: path.to_path_buf(),
        label: "PRIVATE KEY",
        reason: pem_reason(e),
    })?;
    let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()).map_err(|e| {
        KeyFileError::BadPrivateKey {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    });
    der.zeroize();
    key
}

/// Reads an Ed25519 private key file (PEM `PRIVATE KEY`); refuses one that group or others may
/// access.
/// (The mode is judged after parsing, so that a wrong kind of file is reported as such.)
pub fn read_private_key(path: &Path) -> Result<Ed25519KeyPair, KeyFileError> {
    let data = read_key_file(path)?;
    let key = parse_private_key_pem(&data, path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(key)
}

/// A new Ed25519 key as PKCS#8 DER (v2, as ring generates it).
pub fn generate_key() -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let doc =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyFileError::Random)?;
    Ok(Zeroizing::new(doc.as_ref().to_vec()))
}

/// The PEM `PUBLIC KEY` text of an Ed25519 public key.
pub fn public_key_pem(public_key: &[u8; 32]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(public_key);
    pem_encode("PUBLIC KEY", &der)
}

/// The PEM `PRIVATE KEY` text of a PKCS#8 DER key.
pub fn private_key_pem(pkcs8_der: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(pem_encode("PRIVATE KEY", pkcs8_der))
}

/// Writes a new file with `mode` (never replacing one), synced to disk.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeyFileError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyFileError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            KeyFileError::Write {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyFileError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes a new private key file (PEM `PRIVATE KEY`, mode 0600); an existing file is refused.
pub fn write_private_key(path: &Path, pkcs8_der: &[u8]) -> Result<(), KeyFileError> {
    write_new(path, private_key_pem(pkcs8_der).as_bytes(), 0o600)
}

/// Writes a new public key file (PEM `PUBLIC KEY`, mode 0644); an existing file is refused.
pub fn write_public_key(path: &Path, public_key: &[u8; 32]) -> Result<(), KeyFileError> {
    write_new(path, public_key_pem(public_key).as_bytes(), 0o644)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= n {
                b64.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|&b| char::from(b)));
        out.push('\n');
    }
    b64.zeroize();
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Reads every `*.pub` file (PEM `PUBLIC KEY`) in `dir` into a map key id → public key; a
/// missing directory is an empty map. Other files are ignored; one unreadable or malformed
/// `.pub` file is an error naming it (a trust directory is not silently half-read).
pub fn read_public_keys_dir(dir: &Path) -> Result<BTreeMap<[u8; 8], [u8; 32]>, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(read_err(e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(read_err)?.path();
        if path.extension().is_some_and(|e| e == "pub") {
            if paths.len() == MAX_KEYS_IN_DIR {
                return Err(read_err(io::Error::other(format!(
                    "more than {MAX_KEYS_IN_DIR} .pub files"
                ))));
            }
            paths.push(path);
        }
    }
    paths.sort();
    let mut keys = BTreeMap::new();
    for path in paths {
        let key = read_public_key(&path)?;
        keys.insert(key_id(&key), key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    /// A P-256 key pair (openssl genpkey -algorithm EC): PEM, but not Ed25519.
    const P256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGCH9yE6cq0/t3fSDcqg7egJAtkhQ
PFGidlQ4Za5Rx7XqSGwjFScnc7K2hQ+aYkgbSG/5Hhvj4SSP47YgzW6Lgg==
-----END PUBLIC KEY-----
";
    const P256_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSpdgVVLW5xy9ujO1
oVL3/5GzE7stQVSDqpxR/Nf/MkuhRANCAAQYIf3ITpyrT+3d9INyqDt6AkC2SFA8
UaJ2VDhlrlHHtepIbCMVJydzsraFD5piSBtIb/keG+PhJI/jtiDNbouC
-----END PRIVATE KEY-----
";

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sealgate-image-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn key_ids() {
        let pk = [7u8; 32];
        let id = key_id(&pk);
        let d = digest::digest(&digest::SHA256, &pk);
        assert_eq!(&id[..], &d.as_ref()[..8]);
        let hex = key_id_hex(&id);
        assert_eq!(hex.len(), 16);
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(parse_key_id(&hex), Some(id));
        assert_eq!(parse_key_id(&hex.to_uppercase()), Some(id));
        assert_eq!(parse_key_id("0123"), None);
        assert_eq!(parse_key_id("0123456789abcdeg"), None);
        assert_eq!(parse_key_id("é123456789abcde"), None);
    }

    #[test]
    fn pem_round_trip_and_errors() {
        let dir = temp_dir("pem");
        let pkcs8 = generate_key().unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        let pk = public_key_of(&pair);
        let (kp, pp) = (dir.join("k.key"), dir.join("k.pub"));
        write_private_key(&kp, &pkcs8).unwrap();
        write_public_key(&pp, &pk).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&kp).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(read_public_key(&pp).unwrap(), pk);
        assert_eq!(public_key_of(&read_private_key(&kp).unwrap()), pk);
        let text = std::fs::read_to_string(&pp).unwrap();
        assert!(text.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"));
        // Refuses to overwrite.
        assert!(matches!(
            write_public_key(&pp, &pk),
            Err(KeyFileError::Exists { .. })
        ));
        assert!(matches!(
            write_private_key(&kp, &pkcs8),
            Err(KeyFileError::Exists { .. })
        ));
        // Wrong kinds of file, each naming it.
        let e = read_public_key(&kp).unwrap_err();
        assert!(
            matches!(
                e,
                KeyFileError::NotPem {
                    label: "PUBLIC KEY",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("k.key"), "{e}");
        assert!(matches!(
            read_private_key(&pp),
            Err(KeyFileError::NotPem {
                label: "PRIVATE KEY",
                ..
            })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let loose = dir.join("loose.key");
            write_private_key(&loose, &pkcs8).unwrap();
            std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o640)).unwrap();
            let e = read_private_key(&loose).unwrap_err();
            assert!(
                matches!(e, KeyFileError::Permissions { mode: 0o640, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("loose.key"), "{e}");
        }
        assert!(matches!(
            read_public_key(&dir.join("missing.pub")),
            Err(KeyFileError::Read { .. })
        ));
        let e = write_public_key(&dir.join("no-such-dir/k.pub"), &pk).unwrap_err();
        assert!(matches!(e, KeyFileError::Write { .. }), "{e}");
        assert!(e.to_string().contains("no-such-dir/k.pub"), "{e}");
        // A P-256 public key is PEM but not Ed25519.
        assert!(matches!(
            parse_public_key_pem(P256_PUBLIC.as_bytes(), &pp),
            Err(KeyFileError::NotEd25519Public { len: 91, .. })
        ));
        assert!(matches!(
            parse_private_key_pem(P256_PRIVATE.as_bytes(), &kp),
            Err(KeyFileError::BadPrivateKey { .. })
        ));
        // A PKCS#8 v1 key (as `openssl genpkey -algorithm ed25519` writes) is accepted.
        let mut v1 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        v1.extend_from_slice(&[5u8; 32]);
        let pair = parse_private_key_pem(private_key_pem(&v1).as_bytes(), &kp).unwrap();
        assert_eq!(public_key_of(&pair), public_key_of(&key(5)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pem_encoding_matches_base64() {
        for (der, b64) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
        ] {
            let pem = pem_encode("X", der);
            assert_eq!(
                pem,
                format!(
                    "-----BEGIN X-----\n{}-----END X-----\n",
                    if b64.is_empty() {
                        String::new()
                    } else {
                        format!("{b64}\n")
                    }
                )
            );
        }
        // 64 characters per line.
        let pem = pem_encode("PRIVATE KEY", &[0u8; 100]);
        assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
    }

    #[test]
    fn public_keys_dir() {
        let dir = temp_dir("dir");
        assert!(
            read_public_keys_dir(&dir.join("missing"))
                .unwrap()
                .is_empty()
        );
        assert!(read_public_keys_dir(&dir).unwrap().is_empty());
        let (a, b) = (public_key_of(&key(1)), public_key_of(&key(2)));
        write_public_key(&dir.join("a.pub"), &a).unwrap();
        write_public_key(&dir.join("b.pub"), &b).unwrap();
        std::fs::write(dir.join("README"), "not a key").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let keys = read_public_keys_dir(&dir).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.get(&key_id(&a)), Some(&a));
        assert_eq!(keys.get(&key_id(&b)), Some(&b));
        std::fs::write(dir.join("c.pub"), P256_PUBLIC).unwrap();
        let e = read_public_keys_dir(&dir).unwrap_err();
        assert!(matches!(e, KeyFileError::NotEd25519Public { .. }), "{e}");
        assert!(e.to_string().contains("c.pub"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
