//! The sealed store (F-SEAL): named secret records (TLS keys, the device identity, trust
//! anchors, anti-rollback counters) encrypted under a key only this board can derive, in two
//! copies so that a power cut at any byte leaves a store that opens.
//!
//! # File format (format 1), `store.a` and `store.b`
//!
//! ```text
//! offset  size  field
//! 0       8     magic b"SGSEALST"
//! 8       2     format u16 big-endian (= 1)
//! 10      8     generation u64 big-endian
//! 18      12    nonce (random per write)
//! 30      4     length u32 big-endian = bytes after the header (ciphertext + 16-byte tag)
//! 34      len   ChaCha20-Poly1305(key, nonce, aad = bytes 0..34, plaintext = the records)
//! ```
//!
//! The plaintext is the whole record map: `count u32 BE`, then per record in strictly
//! increasing byte order of names `name_len u16 BE | name (UTF-8) | value_len u32 BE | value`.
//! Names and values are both inside the AEAD, so a record can be neither altered nor moved to
//! another name; the header is the associated data, so the generation cannot be changed either.
//! Bounds: a file is at most [`MAX_FILE`] bytes, at most [`MAX_RECORDS`] records, names at
//! most [`MAX_NAME`] bytes.
//!
//! The key is HKDF-SHA256(ikm = board secret, salt = empty, info = `"sealgate seal v1"` ||
//! serial), 32 bytes ([`sealing_key`]): a store copied to another board, or to the same board
//! under another serial, does not open.
//!
//! # Recovery rule
//!
//! [`SealedStore::open`] reads both copies and takes the valid one with the highest
//! generation (on a tie, `store.a`). No copy at all is a new empty store (generation 0); copies
//! present but none valid is [`SealError::Unopenable`] — and no store object, so nothing can be
//! committed over them. [`SealedStore::commit`] writes generation + 1 over the copy that does
//! *not* hold the current generation (in place, then truncate, then fsync; a copy that does not
//! exist yet is written to `store.X.new`, fsync'ed and renamed, and the directory fsync'ed),
//! so a torn write only ever damages the older copy. Details and the threat model:
//! `docs/sealed-store.md`.
//!
//! Key material and decrypted records are wiped from memory when dropped ([`zeroize`]); the
//! copies ring makes while it works (HKDF PRK, the AEAD key schedule) are not — an attacker
//! with root on the running box is not defended against.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

/// First bytes of every store file.
pub const MAGIC: &[u8; 8] = b"SGSEALST";
/// The format version this build writes and reads.
pub const FORMAT: u16 = 1;
/// Bytes of the header (the AEAD's associated data).
pub const HEADER_LEN: usize = 8 + 2 + 8 + 12 + 4;
/// Bytes of the Poly1305 tag at the end.
pub const TAG_LEN: usize = 16;
/// Largest store file (header, ciphertext and tag).
pub const MAX_FILE: usize = 4 << 20;
/// Most records in a store.
pub const MAX_RECORDS: usize = 1024;
/// Longest record name, in bytes.
pub const MAX_NAME: usize = 128;
/// The two copies, in the order a tie between equal generations is broken.
pub const COPIES: [&str; 2] = ["store.a", "store.b"];
/// HKDF info prefix; the serial follows it.
pub const KDF_INFO: &[u8] = b"sealgate seal v1";

/// Errors of the sealed store. File-level errors name the file; none carries key material or
/// record values.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed store {path}: cannot {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error(
        "sealed store in {dir} cannot be opened: tampered, or sealed by another board \
         ({detail}); TLS keys and trust anchors are unavailable"
    )]
    Unopenable { dir: PathBuf, detail: String },
    #[error("truncated: {len} bytes, header and tag alone need {}", HEADER_LEN + TAG_LEN)]
    Truncated { len: usize },
    #[error("bad magic: not a sealed store file")]
    BadMagic,
    #[error("unsupported format {0} (this build reads format {FORMAT})")]
    UnsupportedFormat(u16),
    #[error("length field says {header} bytes follow the header, the file has {actual}")]
    LengthMismatch { header: u64, actual: u64 },
    #[error("too large: {len} bytes, a store file holds at most {MAX_FILE}")]
    TooLarge { len: u64 },
    #[error("authentication failed: tampered, or sealed by another board")]
    Authentication,
    #[error("records malformed: {0}")]
    Malformed(&'static str),
    #[error("too many records: {count}, at most {MAX_RECORDS}")]
    TooManyRecords { count: usize },
    #[error("record name too long: {len} bytes, at most {MAX_NAME}")]
    NameTooLong { len: usize },
    #[error("generation counter exhausted")]
    GenerationExhausted,
    #[error("no random bytes for a nonce")]
    Random,
}

/// The ChaCha20-Poly1305 key of one board; wiped when dropped, never printed.
pub struct SealingKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    /// The AEAD key, built for one operation (ChaCha20 has no key schedule worth keeping).
    fn aead(&self) -> LessSafeKey {
        let key = UnboundKey::new(&CHACHA20_POLY1305, &self.bytes[..])
            .expect("a 32-byte key is valid for ChaCha20-Poly1305");
        LessSafeKey::new(key)
    }
}

struct KeyLen;
impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

/// The sealing key of a board: HKDF-SHA256(ikm = `secret`, salt = empty,
/// info = `"sealgate seal v1"` || `serial`), 32 bytes.
pub fn sealing_key(secret: &[u8], serial: &str) -> SealingKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(secret);
    let info = [KDF_INFO, serial.as_bytes()];
    let mut bytes = Zeroizing::new([0u8; 32]);
    prk.expand(&info, KeyLen)
        .and_then(|okm| okm.fill(&mut bytes[..]))
        .expect("32 bytes are within HKDF-SHA256's output limit");
    SealingKey { bytes }
}

/// Bytes of the plaintext encoding of `records`.
fn plaintext_len(records: &BTreeMap<String, Vec<u8>>) -> usize {
    records.iter().fold(4usize, |n, (k, v)| {
        n.saturating_add(2 + k.len() + 4).saturating_add(v.len())
    })
}

/// Bytes of the store file [`seal`] makes of `records`.
pub fn sealed_len(records: &BTreeMap<String, Vec<u8>>) -> usize {
    HEADER_LEN
        .saturating_add(plaintext_len(records))
        .saturating_add(TAG_LEN)
}

/// Checks `records` against the store's bounds (count, name lengths, file size), as
/// [`SealedStore::commit`] does before it writes.
pub fn check_bounds(records: &BTreeMap<String, Vec<u8>>) -> Result<(), SealError> {
    if records.len() > MAX_RECORDS {
        return Err(SealError::TooManyRecords {
            count: records.len(),
        });
    }
    if let Some(k) = records.keys().find(|k| k.len() > MAX_NAME) {
        return Err(SealError::NameTooLong { len: k.len() });
    }
    let len = sealed_len(records);
    if len > MAX_FILE {
        return Err(SealError::TooLarge { len: len as u64 });
    }
    Ok(())
}

fn header(generation: u64, nonce: &[u8; 12], body_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&FORMAT.to_be_bytes());
    h[10..18].copy_from_slice(&generation.to_be_bytes());
    h[18..30].copy_from_slice(nonce);
    // Out of range only beyond the bounds, and then `unseal` refuses the result.
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    h[30..34].copy_from_slice(&len.to_be_bytes());
    h
}

/// Seals `records` as generation `generation` with `nonce` (never reuse one under a key: the
/// store draws a random one per write). Pure and deterministic. Records outside the bounds
/// ([`check_bounds`]) give bytes that [`unseal`] refuses.
pub fn seal(
    key: &SealingKey,
    generation: u64,
    nonce: [u8; 12],
    records: &BTreeMap<String, Vec<u8>>,
) -> Vec<u8> {
    let plain_len = plaintext_len(records);
    // Exact capacity: the plaintext is written once and encrypted in place, never reallocated
    // (no stray copy of it left in freed memory).
    let mut out = Vec::with_capacity(sealed_len(records));
    out.extend_from_slice(&header(
        generation,
        &nonce,
        plain_len.saturating_add(TAG_LEN),
    ));
    let count = u32::try_from(records.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in records {
        let n = u16::try_from(name.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        let v = u32::try_from(value.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&v.to_be_bytes());
        out.extend_from_slice(value);
    }
    encrypt(key, nonce, out)
}

/// Encrypts `out[HEADER_LEN..]` in place with `out[..HEADER_LEN]` as associated data and
/// appends the tag.
fn encrypt(key: &SealingKey, nonce: [u8; 12], mut out: Vec<u8>) -> Vec<u8> {
    let split = HEADER_LEN.min(out.len());
    let (head, body) = out.split_at_mut(split);
    let sealed = key.aead().seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&*head),
        body,
    );
    match sealed {
        Ok(tag) => {
            out.extend_from_slice(tag.as_ref());
            out
        }
        // Only for inputs of hundreds of GiB; nothing that `unseal` would accept.
        Err(_) => {
            out.zeroize();
            Vec::new()
        }
    }
}

/// Seals arbitrary `plaintext` bytes as a store file: for the fuzz target, which feeds the
/// record decoder behind the AEAD through [`unseal`]. [`seal`] is the way to make a store.
#[doc(hidden)]
pub fn seal_plaintext(
    key: &SealingKey,
    generation: u64,
    nonce: [u8; 12],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&header(generation, &nonce, plaintext.len() + TAG_LEN));
    out.extend_from_slice(plaintext);
    encrypt(key, nonce, out)
}

/// Opens one store file: bounds and header, then the AEAD, then the records.
/// Returns the generation and the records.
pub fn unseal(
    key: &SealingKey,
    bytes: &[u8],
) -> Result<(u64, BTreeMap<String, Vec<u8>>), SealError> {
    if bytes.len() > MAX_FILE {
        return Err(SealError::TooLarge {
            len: bytes.len() as u64,
        });
    }
    if bytes.len() < HEADER_LEN + TAG_LEN {
        return Err(SealError::Truncated { len: bytes.len() });
    }
    let (head, body) = bytes.split_at(HEADER_LEN);
    if &head[..8] != MAGIC {
        return Err(SealError::BadMagic);
    }
    let format = u16::from_be_bytes([head[8], head[9]]);
    if format != FORMAT {
        return Err(SealError::UnsupportedFormat(format));
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&head[10..18]);
    let generation = u64::from_be_bytes(g);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&head[18..30]);
    let len = u32::from_be_bytes([head[30], head[31], head[32], head[33]]);
    if len as usize != body.len() {
        return Err(SealError::LengthMismatch {
            header: u64::from(len),
            actual: body.len() as u64,
        });
    }
    let mut buf = Zeroizing::new(body.to_vec());
    let plain = key
        .aead()
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(head),
            &mut buf[..],
        )
        .map_err(|_| SealError::Authentication)?;
    let records = decode_records(plain)?;
    Ok((generation, records))
}

/// A bounded reader over the decrypted plaintext.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SealError> {
        if self.0.len() < n {
            return Err(SealError::Malformed(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self, what: &'static str) -> Result<usize, SealError> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u32(&mut self, what: &'static str) -> Result<usize, SealError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

fn decode_records(plain: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, SealError> {
    let mut c = Cursor(plain);
    let count = c.u32("record count cut short")?;
    if count > MAX_RECORDS {
        return Err(SealError::TooManyRecords { count });
    }
    // Wiped on the way out if a later record is refused.
    let mut records = Records::default();
    let mut last: Option<&[u8]> = None;
    for _ in 0..count {
        let name_len = c.u16("record cut short in a name length")?;
        if name_len > MAX_NAME {
            return Err(SealError::NameTooLong { len: name_len });
        }
        let name = c.take(name_len, "record cut short in a name")?;
        if last.is_some_and(|l| l >= name) {
            return Err(SealError::Malformed(
                "record names not in strictly increasing order",
            ));
        }
        last = Some(name);
        let name =
            std::str::from_utf8(name).map_err(|_| SealError::Malformed("record name not UTF-8"))?;
        let value_len = c.u32("record cut short in a value length")?;
        let value = c.take(value_len, "record cut short in a value")?;
        records.0.insert(name.to_string(), value.to_vec());
    }
    if !c.0.is_empty() {
        return Err(SealError::Malformed("bytes after the last record"));
    }
    Ok(std::mem::take(&mut records.0))
}

/// The records held in memory; their values are wiped when replaced, removed or dropped.
#[derive(Default)]
struct Records(BTreeMap<String, Vec<u8>>);

impl Drop for Records {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            v.zeroize();
        }
    }
}

/// What reading one copy found.
enum CopyRead {
    Absent,
    TooLarge(u64),
    Bytes(Zeroizing<Vec<u8>>),
}

fn read_copy(path: &Path) -> io::Result<CopyRead> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(CopyRead::Absent),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len > MAX_FILE as u64 {
        return Ok(CopyRead::TooLarge(len));
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(len as usize));
    file.take(MAX_FILE as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > MAX_FILE {
        return Ok(CopyRead::TooLarge(buf.len() as u64));
    }
    Ok(CopyRead::Bytes(buf))
}

/// The sealed store of one board: records in memory, changes staged until [`commit`].
///
/// [`commit`]: SealedStore::commit
pub struct SealedStore {
    dir: PathBuf,
    key: SealingKey,
    records: Records,
    generation: u64,
    /// Index into [`COPIES`] of the copy holding `generation` (none before the first commit).
    current: Option<usize>,
    refused: Vec<String>,
}

impl fmt::Debug for SealedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedStore")
            .field("dir", &self.dir)
            .field("generation", &self.generation)
            .field("records", &self.records.0.len())
            .finish_non_exhaustive()
    }
}

impl SealedStore {
    /// Opens the store in `dir` with the key of (`secret`, `serial`): the valid copy with the
    /// highest generation; a new empty store (generation 0) when neither copy exists;
    /// [`SealError::Unopenable`] when copies exist but none is valid; [`SealError::Io`] when
    /// none is valid and one could not be read. Reads only; a failed open changes nothing.
    pub fn open(dir: &Path, secret: &[u8], serial: &str) -> Result<SealedStore, SealError> {
        let key = sealing_key(secret, serial);
        let mut best: Option<(usize, u64, Records)> = None;
        let mut refused = Vec::new();
        let mut io_error = None;
        for (i, name) in COPIES.iter().enumerate() {
            let path = dir.join(name);
            let bytes = match read_copy(&path) {
                Ok(CopyRead::Absent) => continue,
                Ok(CopyRead::TooLarge(len)) => {
                    refused.push(format!("{name}: {}", SealError::TooLarge { len }));
                    continue;
                }
                Ok(CopyRead::Bytes(b)) => b,
                Err(source) => {
                    refused.push(format!("{name}: cannot read: {source}"));
                    io_error.get_or_insert(SealError::Io {
                        path,
                        op: "read",
                        source,
                    });
                    continue;
                }
            };
            match unseal(&key, &bytes) {
                Ok((generation, records)) => {
                    // Wrapped at once: a copy not chosen is wiped too.
                    let records = Records(records);
                    if best.as_ref().is_none_or(|(_, g, _)| generation > *g) {
                        best = Some((i, generation, records));
                    }
                }
                Err(e) => refused.push(format!("{name}: {e}")),
            }
        }
        let (current, generation, records) = match best {
            Some((i, g, r)) => (Some(i), g, r),
            None => {
                if let Some(e) = io_error {
                    return Err(e);
                }
                if !refused.is_empty() {
                    return Err(SealError::Unopenable {
                        dir: dir.to_path_buf(),
                        detail: refused.join("; "),
                    });
                }
                (None, 0, Records::default())
            }
        };
        Ok(SealedStore {
            dir: dir.to_path_buf(),
            key,
            records,
            generation,
            current,
            refused,
        })
    }

    /// The value of record `name` (staged changes included).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.records.0.get(name).map(Vec::as_slice)
    }

    /// The record names, sorted (staged changes included).
    pub fn names(&self) -> Vec<String> {
        self.records.0.keys().cloned().collect()
    }

    /// Sets record `name`; staged until [`SealedStore::commit`]. Bounds are checked there.
    pub fn put(&mut self, name: &str, value: Vec<u8>) {
        if let Some(mut old) = self.records.0.insert(name.to_string(), value) {
            old.zeroize();
        }
    }

    /// Removes record `name` (false when there is none); staged until [`SealedStore::commit`].
    pub fn remove(&mut self, name: &str) -> bool {
        match self.records.0.remove(name) {
            Some(mut old) => {
                old.zeroize();
                true
            }
            None => false,
        }
    }

    /// Writes the records as generation + 1 over the copy not holding the current generation
    /// and fsyncs it (and the directory when a file was created). Durable when it returns Ok.
    /// On error the generation stays, the staged records stay, and the current copy is intact.
    pub fn commit(&mut self) -> Result<(), SealError> {
        check_bounds(&self.records.0)?;
        let next = self
            .generation
            .checked_add(1)
            .ok_or(SealError::GenerationExhausted)?;
        let mut nonce = [0u8; 12];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let bytes = seal(&self.key, next, nonce, &self.records.0);
        let target = match self.current {
            Some(0) => 1,
            _ => 0,
        };
        self.ensure_dir()?;
        self.write_copy(COPIES[target], &bytes)?;
        self.generation = next;
        self.current = Some(target);
        Ok(())
    }

    /// The generation of the records last opened or committed (0: never committed).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The directory holding the copies.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Copies that were present at open but not used, with the reason (e.g. a write torn by a
    /// power cut, or tampering): worth a log line. Empty when both copies were fine or absent.
    pub fn refused(&self) -> &[String] {
        &self.refused
    }

    fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SealError + 'a {
        move |source| SealError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    /// Creates the store directory (0700) when missing, fsyncing its parent.
    fn ensure_dir(&self) -> Result<(), SealError> {
        let dir = &self.dir;
        if dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(dir).map_err(Self::io(dir, "create directory"))?;
        fs::set_permissions(dir, Permissions::from_mode(0o700))
            .map_err(Self::io(dir, "chmod 0700"))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(Self::io(parent, "fsync the parent directory of"))?;
        }
        Ok(())
    }

    /// Writes `bytes` as copy `name`: in place over an existing regular file (write from
    /// offset 0, truncate to length, fsync); otherwise through `name.new` and a rename, with the
    /// directory fsync'ed, so a new copy never appears half written.
    fn write_copy(&self, name: &str, bytes: &[u8]) -> Result<(), SealError> {
        let path = self.dir.join(name);
        let in_place = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
        if in_place {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(Self::io(&path, "open for writing"))?;
            f.write_all_at(bytes, 0).map_err(Self::io(&path, "write"))?;
            f.set_len(bytes.len() as u64)
                .map_err(Self::io(&path, "truncate"))?;
            f.sync_all().map_err(Self::io(&path, "fsync"))?;
            return Ok(());
        }
        let tmp = self.dir.join(format!("{name}.new"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Self::io(&tmp, "create"))?;
        f.write_all(bytes).map_err(Self::io(&tmp, "write"))?;
        f.sync_all().map_err(Self::io(&tmp, "fsync"))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(Self::io(&path, "rename into place"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(&self.dir, "fsync directory"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const SECRET: [u8; 32] = [0x42; 32];
    const SERIAL: &str = "DEV-0BADF00D";

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Tmp {
            static N: AtomicU32 = AtomicU32::new(0);
            let d = std::env::temp_dir().join(format!(
                "sg-sealed-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Tmp(d)
        }
        fn sealed(&self) -> PathBuf {
            self.0.join("sealed")
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn recs(items: &[(&str, &[u8])]) -> BTreeMap<String, Vec<u8>> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    fn open(dir: &Path) -> Result<SealedStore, SealError> {
        SealedStore::open(dir, &SECRET, SERIAL)
    }

    fn contents(s: &SealedStore) -> BTreeMap<String, Vec<u8>> {
        s.names()
            .into_iter()
            .map(|n| {
                let v = s.get(&n).unwrap().to_vec();
                (n, v)
            })
            .collect()
    }

    /// A store in `dir` whose records are exactly `r`, committed once more.
    fn commit_exactly(dir: &Path, r: &BTreeMap<String, Vec<u8>>) -> SealedStore {
        let mut s = open(dir).unwrap();
        for n in s.names() {
            s.remove(&n);
        }
        for (k, v) in r {
            s.put(k, v.clone());
        }
        s.commit().unwrap();
        s
    }

    fn r1() -> BTreeMap<String, Vec<u8>> {
        recs(&[
            ("tls/default/key", &[1u8; 121]),
            ("tls/default/chain", b"-----BEGIN CERTIFICATE-----\nAAAA\n"),
            ("counter/config_seq", &7u64.to_le_bytes()),
        ])
    }
    fn r2() -> BTreeMap<String, Vec<u8>> {
        recs(&[
            ("tls/default/key", &[2u8; 121]),
            ("tls/default/chain", b"-----BEGIN CERTIFICATE-----\nBBBB\n"),
            ("counter/config_seq", &8u64.to_le_bytes()),
            ("device/identity", &[3u8; 83]),
        ])
    }

    #[test]
    fn seal_unseal_round_trip_and_header_layout() {
        let key = sealing_key(&SECRET, SERIAL);
        let nonce = [9u8; 12];
        for r in [
            BTreeMap::new(),
            r1(),
            r2(),
            recs(&[("", b""), ("x", &[0; 0])]),
        ] {
            let bytes = seal(&key, 77, nonce, &r);
            assert_eq!(bytes.len(), sealed_len(&r));
            assert_eq!(&bytes[..8], MAGIC);
            assert_eq!(&bytes[8..10], &[0, 1]);
            assert_eq!(&bytes[10..18], &77u64.to_be_bytes());
            assert_eq!(&bytes[18..30], &nonce);
            let len = u32::from_be_bytes(bytes[30..34].try_into().unwrap());
            assert_eq!(len as usize, bytes.len() - HEADER_LEN);
            assert_eq!(seal(&key, 77, nonce, &r), bytes, "deterministic");
            let (g, back) = unseal(&key, &bytes).unwrap();
            assert_eq!((g, &back), (77, &r));
            // Encrypted: no value appears in the clear.
            if let Some(v) = r.get("tls/default/key") {
                assert!(!bytes.windows(v.len()).any(|w| w == &v[..]));
            }
            assert!(!bytes.windows(7).any(|w| w == b"tls/def"));
        }
    }

    /// The vector in docs/sealed-store.md, made by an independent implementation (Python,
    /// `cryptography`: HKDF-SHA256 and ChaCha20Poly1305) from the documented format.
    #[test]
    fn known_answer_from_an_independent_implementation() {
        let key = sealing_key(&[0u8; 32], "DEV-00000000");
        assert_eq!(
            crate::hex::encode(&key.bytes[..]),
            "bb799426221aa26d4581415d09e42691b4dca7512faf202922d76c99eac7d649"
        );
        let file = crate::hex::decode(concat!(
            "53475345414c53540001000000000000000111111111111111111111111100000044",
            "f213d43b1d2aefe6e0c7861dc5b7712a7af92717af66d78414d972429713c930fc79e8",
            "da25a408983fba443ed733d2d090bf4d3b5affed6f034cf7358ef0c3ede93f7ef0",
        ))
        .unwrap();
        let r = recs(&[
            ("counter/config_seq", &1u64.to_le_bytes()),
            ("tls/a/key", b"k"),
        ]);
        assert_eq!(unseal(&key, &file).unwrap(), (1, r.clone()));
        assert_eq!(seal(&key, 1, [0x11; 12], &r), file);
    }

    #[test]
    fn key_is_rfc5869_hkdf_of_secret_and_serial() {
        use ring::hmac;
        // RFC 5869 by hand: PRK = HMAC(salt = 32 zero bytes, ikm); OKM = HMAC(PRK, info || 1).
        let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &[0u8; 32]), &SECRET);
        let mut info = KDF_INFO.to_vec();
        info.extend_from_slice(SERIAL.as_bytes());
        info.push(1);
        let okm = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &info);
        assert_eq!(&sealing_key(&SECRET, SERIAL).bytes[..], okm.as_ref());
        assert_ne!(
            sealing_key(&SECRET, SERIAL).bytes[..],
            sealing_key(&SECRET, "DEV-0BADF00E").bytes[..]
        );
        assert_eq!(
            format!("{:?}", sealing_key(&SECRET, SERIAL)),
            "SealingKey(..)"
        );
    }

    #[test]
    fn store_round_trip_with_staging() {
        let t = Tmp::new("rt");
        let dir = t.sealed();
        let mut s = open(&dir).unwrap();
        assert_eq!((s.generation(), s.names().len()), (0, 0));
        assert!(!dir.exists(), "open only reads");
        s.put("tls/b/key", b"bkey".to_vec());
        s.put("tls/a/key", b"akey".to_vec());
        s.put("tls/a/key", b"akey2".to_vec());
        assert_eq!(s.get("tls/a/key"), Some(&b"akey2"[..]));
        assert_eq!(s.names(), ["tls/a/key", "tls/b/key"]);
        // Staged only: a second opener sees nothing yet.
        assert_eq!(open(&dir).unwrap().names().len(), 0);
        s.commit().unwrap();
        assert_eq!(s.generation(), 1);
        let o = open(&dir).unwrap();
        assert_eq!(o.generation(), 1);
        assert_eq!(contents(&o), contents(&s));
        assert!(o.refused().is_empty());
        assert!(s.remove("tls/b/key"));
        assert!(!s.remove("tls/b/key"));
        s.commit().unwrap();
        let o = open(&dir).unwrap();
        assert_eq!(
            (o.generation(), o.names()),
            (2, vec!["tls/a/key".to_string()])
        );
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.clone()), 0o700);
        assert_eq!(mode(dir.join("store.a")), 0o600);
        assert_eq!(mode(dir.join("store.b")), 0o600);
        assert!(!format!("{o:?}").contains("akey"));
    }

    #[test]
    fn generation_is_monotonic_and_copies_alternate() {
        let t = Tmp::new("gen");
        let dir = t.sealed();
        let key = sealing_key(&SECRET, SERIAL);
        let gen_of = |name: &str| unseal(&key, &fs::read(dir.join(name)).unwrap()).unwrap().0;
        let mut s = open(&dir).unwrap();
        for g in 1..=7u64 {
            s.put("counter/config_seq", g.to_le_bytes().to_vec());
            s.commit().unwrap();
            assert_eq!(s.generation(), g);
            let (newer, older) = if g % 2 == 1 {
                ("store.a", "store.b")
            } else {
                ("store.b", "store.a")
            };
            assert_eq!(gen_of(newer), g);
            if g > 1 {
                assert_eq!(gen_of(older), g - 1);
            }
            // Reopening continues from there, and writes over the older copy next.
            if g == 4 {
                s = open(&dir).unwrap();
                assert_eq!(s.generation(), 4);
            }
            assert_eq!(
                open(&dir).unwrap().get("counter/config_seq"),
                Some(&g.to_le_bytes()[..])
            );
        }
        assert!(!dir.join("store.a.new").exists() && !dir.join("store.b.new").exists());
    }

    /// Two copies, `store.a` newest (generation 3, records r1), `store.b` older (2, r2).
    fn two_copies(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        commit_exactly(dir, &r2());
        commit_exactly(dir, &r2());
        commit_exactly(dir, &r1());
        let s = open(dir).unwrap();
        assert_eq!((s.generation(), contents(&s)), (3, r1()));
        (
            fs::read(dir.join("store.a")).unwrap(),
            fs::read(dir.join("store.b")).unwrap(),
        )
    }

    #[test]
    fn a_tampered_byte_at_every_offset_refuses_that_copy_only() {
        let t = Tmp::new("tamper");
        let dir = t.sealed();
        let (a, b) = two_copies(&dir);
        let key = sealing_key(&SECRET, SERIAL);
        for (name, bytes, other_gen, other) in [("store.a", &a, 2, r2()), ("store.b", &b, 3, r1())]
        {
            for i in 0..bytes.len() {
                for flip in [0x01u8, 0x80, 0xFF] {
                    let mut bad = bytes.clone();
                    bad[i] ^= flip;
                    assert!(unseal(&key, &bad).is_err(), "{name} offset {i}");
                    fs::write(dir.join(name), &bad).unwrap();
                    let s = open(&dir).unwrap();
                    assert_eq!(s.generation(), other_gen, "{name} offset {i}");
                    assert_eq!(contents(&s), other, "{name} offset {i}");
                    assert!(s.refused()[0].starts_with(name), "{:?}", s.refused());
                }
            }
            fs::write(dir.join(name), bytes).unwrap();
        }
        // Truncated to every length, or extended: refused the same way.
        for n in 0..a.len() {
            fs::write(dir.join("store.a"), &a[..n]).unwrap();
            assert_eq!(open(&dir).unwrap().generation(), 2, "length {n}");
        }
        let mut longer = a.clone();
        longer.push(0);
        fs::write(dir.join("store.a"), &longer).unwrap();
        assert_eq!(open(&dir).unwrap().generation(), 2);
    }

    #[test]
    fn a_single_tampered_copy_is_unopenable_and_left_alone() {
        let t = Tmp::new("tamper1");
        let dir = t.sealed();
        commit_exactly(&dir, &r1());
        let a = fs::read(dir.join("store.a")).unwrap();
        for i in 0..a.len() {
            let mut bad = a.clone();
            bad[i] ^= 0x20;
            fs::write(dir.join("store.a"), &bad).unwrap();
            let e = open(&dir).unwrap_err();
            assert!(matches!(e, SealError::Unopenable { .. }), "offset {i}: {e}");
            // No store object: nothing can be committed over it, and the file is untouched.
            assert_eq!(fs::read(dir.join("store.a")).unwrap(), bad);
            assert!(!dir.join("store.b").exists());
        }
        let e = open(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&dir.display().to_string()) && e.contains("store.a"),
            "{e}"
        );
        assert!(e.contains("tampered, or sealed by another board"), "{e}");
    }

    #[test]
    fn a_store_moved_to_another_board_is_unopenable() {
        let t = Tmp::new("foreign");
        let dir = t.sealed();
        two_copies(&dir);
        let mut other_secret = SECRET;
        other_secret[31] ^= 1;
        for (secret, serial) in [(&other_secret, SERIAL), (&SECRET, "DEV-0BADF00E")] {
            let e = SealedStore::open(&dir, secret, serial).unwrap_err();
            assert!(matches!(e, SealError::Unopenable { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("store.a") && msg.contains("store.b"), "{msg}");
            assert!(msg.contains("authentication failed"), "{msg}");
            // Nothing secret in the message: no key, no secret, no record value.
            let key = sealing_key(secret, serial);
            assert!(
                !msg.contains(&crate::hex::encode(&key.bytes[..]))
                    && !msg.contains(&crate::hex::encode(secret))
            );
            assert!(!msg.contains("BEGIN CERTIFICATE"));
        }
        assert_eq!(open(&dir).unwrap().generation(), 3);
    }

    /// Power cut during the update from generation 3 to 4, at every byte: the older copy
    /// (`store.b`) holds a prefix of the new bytes, alone, followed by its old tail, or followed
    /// by zeros.
    fn power_cut_at_every_offset(new: BTreeMap<String, Vec<u8>>) {
        let t = Tmp::new("cut");
        let dir = t.sealed();
        let (a, b) = two_copies(&dir); // store.b (generation 2) is the older copy
        // What the commit writes over store.b: run it in a copy of the directory.
        let done = t.0.join("done");
        fs::create_dir_all(&done).unwrap();
        for n in COPIES {
            fs::copy(dir.join(n), done.join(n)).unwrap();
        }
        let s = commit_exactly(&done, &new);
        assert_eq!(s.generation(), 4);
        let new_b = fs::read(done.join("store.b")).unwrap();
        assert_eq!(
            fs::read(done.join("store.a")).unwrap(),
            fs::read(dir.join("store.a")).unwrap()
        );
        for k in 0..=new_b.len() {
            for (tail, zeros) in [(false, false), (true, false), (false, true)] {
                let mut torn = new_b[..k].to_vec();
                if tail && k < b.len() {
                    torn.extend_from_slice(&b[k..]);
                }
                if zeros {
                    // The size grew but the data blocks never made it to the disk.
                    torn.resize(new_b.len().max(b.len()), 0);
                }
                fs::write(dir.join("store.b"), &torn).unwrap();
                let s = open(&dir).unwrap();
                let whole = torn == new_b;
                match s.generation() {
                    3 => assert_eq!(contents(&s), r1(), "offset {k} tail {tail} zeros {zeros}"),
                    4 => assert_eq!(contents(&s), new, "offset {k} tail {tail} zeros {zeros}"),
                    g => panic!("generation {g} at offset {k} tail {tail}"),
                }
                assert_eq!(
                    s.generation() == 4,
                    whole,
                    "offset {k} tail {tail} zeros {zeros}"
                );
                // Every few offsets: the next commit from here works and lands on top.
                if k % 61 == 0 && tail {
                    let mut s = s;
                    let g = s.generation();
                    s.put("probe", vec![1]);
                    s.commit().unwrap();
                    let o = open(&dir).unwrap();
                    assert_eq!((o.generation(), o.get("probe")), (g + 1, Some(&[1u8][..])));
                    // Back to the state before the update (store.b is rewritten next round).
                    fs::write(dir.join("store.a"), &a).unwrap();
                }
            }
        }
    }

    #[test]
    fn power_cut_at_every_offset_of_a_growing_update() {
        let mut new = r2();
        new.insert("config/current".into(), vec![0x5a; 300]);
        power_cut_at_every_offset(new);
    }

    #[test]
    fn power_cut_at_every_offset_of_a_shrinking_update() {
        power_cut_at_every_offset(recs(&[("counter/image_floor", &3u64.to_le_bytes())]));
    }

    #[test]
    fn power_cut_while_a_copy_is_first_created() {
        let t = Tmp::new("create");
        let dir = t.sealed();
        // The first commit creates store.a through store.a.new: a torn temporary is ignored.
        let key = sealing_key(&SECRET, SERIAL);
        let first = seal(&key, 1, [5; 12], &r1());
        fs::create_dir_all(&dir).unwrap();
        for k in 0..=first.len() {
            fs::write(dir.join("store.a.new"), &first[..k]).unwrap();
            let s = open(&dir).unwrap();
            assert_eq!((s.generation(), s.names().len()), (0, 0), "offset {k}");
        }
        let mut s = open(&dir).unwrap();
        s.put("a", vec![1]);
        s.commit().unwrap();
        assert!(!dir.join("store.a.new").exists());
        // The second creates store.b the same way.
        let second = seal(&key, 2, [6; 12], &r2());
        for k in 0..=second.len() {
            fs::write(dir.join("store.b.new"), &second[..k]).unwrap();
            let s = open(&dir).unwrap();
            assert_eq!((s.generation(), s.names()), (1, vec!["a".to_string()]));
        }
        s.commit().unwrap();
        assert_eq!(open(&dir).unwrap().generation(), 2);
    }

    #[test]
    fn bounds_are_refused_with_their_own_errors() {
        let t = Tmp::new("bounds");
        let dir = t.sealed();
        let mut s = open(&dir).unwrap();
        s.put("keep", b"v".to_vec());
        s.commit().unwrap();

        for i in 1..MAX_RECORDS {
            s.put(&format!("r/{i:04}"), vec![]);
        }
        s.commit().unwrap(); // exactly MAX_RECORDS
        assert_eq!(s.names().len(), MAX_RECORDS);
        s.put("one/too/many", vec![]);
        assert!(matches!(
            s.commit(),
            Err(SealError::TooManyRecords { count }) if count == MAX_RECORDS + 1
        ));
        assert_eq!(s.generation(), 2);
        for i in 1..MAX_RECORDS {
            s.remove(&format!("r/{i:04}"));
        }
        s.remove("one/too/many");

        s.put(&"n".repeat(MAX_NAME), vec![]);
        s.put(&"n".repeat(MAX_NAME + 1), vec![]);
        assert!(matches!(
            s.commit(),
            Err(SealError::NameTooLong { len }) if len == MAX_NAME + 1
        ));
        s.remove(&"n".repeat(MAX_NAME + 1));
        s.commit().unwrap();

        s.put("big", vec![0; MAX_FILE]);
        assert!(matches!(s.commit(), Err(SealError::TooLarge { .. })));
        assert_eq!(s.generation(), 3, "a refused commit does not count");
        let o = open(&dir).unwrap();
        assert_eq!(o.generation(), 3);
        assert!(o.get("big").is_none());
        let fits = MAX_FILE - sealed_len(&contents(&o)) - (2 + 3 + 4);
        s.put("big", vec![0; fits]);
        s.commit().unwrap();
        assert_eq!(
            fs::metadata(dir.join("store.b")).unwrap().len(),
            MAX_FILE as u64
        );
        assert_eq!(open(&dir).unwrap().get("big").map(<[u8]>::len), Some(fits));

        // Oversized input to unseal, and an oversized copy on disk.
        let key = sealing_key(&SECRET, SERIAL);
        assert!(matches!(
            unseal(&key, &vec![0; MAX_FILE + 1]),
            Err(SealError::TooLarge { .. })
        ));
        // store.a holds generation 3, the older copy; store.b generation 4.
        fs::write(dir.join("store.a"), vec![0u8; MAX_FILE + 1]).unwrap();
        let o = open(&dir).unwrap();
        assert_eq!(o.generation(), 4);
        assert!(o.refused()[0].contains("too large"), "{:?}", o.refused());
        fs::remove_file(dir.join("store.b")).unwrap();
        let e = open(&dir).unwrap_err();
        assert!(matches!(e, SealError::Unopenable { .. }), "{e}");
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn unseal_checks_each_field_with_its_own_error() {
        let key = sealing_key(&SECRET, SERIAL);
        let good = seal(&key, 5, [1; 12], &r1());
        assert!(matches!(
            unseal(&key, &good[..49]),
            Err(SealError::Truncated { len: 49 })
        ));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(unseal(&key, &b), Err(SealError::BadMagic)));
        let mut b = good.clone();
        b[9] = 2;
        assert!(matches!(
            unseal(&key, &b),
            Err(SealError::UnsupportedFormat(2))
        ));
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(
            unseal(&key, &b),
            Err(SealError::LengthMismatch { .. })
        ));
        let mut b = good.clone();
        b[12] ^= 1; // the generation is authenticated
        assert!(matches!(unseal(&key, &b), Err(SealError::Authentication)));

        // Behind the AEAD, the record decoder's bounds and canonical form.
        let p = |plain: &[u8]| unseal(&key, &seal_plaintext(&key, 1, [0; 12], plain));
        let rec = |name: &[u8], value: &[u8]| {
            let mut v = (name.len() as u16).to_be_bytes().to_vec();
            v.extend_from_slice(name);
            v.extend_from_slice(&(value.len() as u32).to_be_bytes());
            v.extend_from_slice(value);
            v
        };
        let with = |count: u32, recs: &[Vec<u8>]| {
            let mut v = count.to_be_bytes().to_vec();
            recs.iter().for_each(|r| v.extend_from_slice(r));
            v
        };
        assert_eq!(p(&with(0, &[])).unwrap(), (1, BTreeMap::new()));
        assert_eq!(
            p(&with(2, &[rec(b"a", b"1"), rec(b"b", b"")])).unwrap().1,
            recs(&[("a", b"1"), ("b", b"")])
        );
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "record count cut short"),
            (with(1, &[]), "name length"),
            (with(1, &[rec(b"a", b"1")[..2].to_vec()]), "in a name"),
            (with(1, &[rec(b"a", b"12")[..6].to_vec()]), "value length"),
            (with(1, &[rec(b"a", b"12")[..8].to_vec()]), "in a value"),
            (with(2, &[rec(b"b", b""), rec(b"a", b"")]), "increasing"),
            (with(2, &[rec(b"a", b""), rec(b"a", b"")]), "increasing"),
            (with(1, &[rec(b"\xff", b"")]), "UTF-8"),
            (with(1, &[rec(b"a", b""), vec![0]]), "after the last"),
        ];
        for (plain, what) in cases {
            match p(&plain) {
                Err(SealError::Malformed(m)) => assert!(m.contains(what), "{m} / {what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(matches!(
            p(&with(MAX_RECORDS as u32 + 1, &[])),
            Err(SealError::TooManyRecords { count }) if count == MAX_RECORDS + 1
        ));
        assert!(matches!(
            p(&with(1, &[rec(&[b'n'; MAX_NAME + 1], b"")])),
            Err(SealError::NameTooLong { len }) if len == MAX_NAME + 1
        ));
    }

    #[test]
    fn deleting_or_damaging_copies_follows_the_recovery_rule() {
        let t = Tmp::new("recover");
        let dir = t.sealed();
        let (a, _b) = two_copies(&dir);
        // Newest copy gone: the older one opens (a disk-level rollback the store cannot see).
        fs::remove_file(dir.join("store.a")).unwrap();
        let mut s = open(&dir).unwrap();
        assert_eq!((s.generation(), contents(&s)), (2, r2()));
        // Its next commit recreates store.a with generation 3.
        s.commit().unwrap();
        assert_eq!(s.generation(), 3);
        assert_eq!(open(&dir).unwrap().generation(), 3);
        // Equal generations in both copies (a restored file): store.a wins the tie.
        fs::write(dir.join("store.b"), &a).unwrap();
        assert_eq!(open(&dir).unwrap().generation(), 3);
        // Both gone: a new empty store.
        for n in COPIES {
            fs::remove_file(dir.join(n)).unwrap();
        }
        assert_eq!(open(&dir).unwrap().generation(), 0);
        // A copy replaced by a symlink is replaced, never written through.
        let victim = t.0.join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let mut s = open(&dir).unwrap();
        s.commit().unwrap(); // store.a, generation 1
        std::os::unix::fs::symlink(&victim, dir.join("store.b")).unwrap();
        let mut s = open(&dir).unwrap();
        assert_eq!(s.refused().len(), 1);
        s.commit().unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert!(fs::symlink_metadata(dir.join("store.b")).unwrap().is_file());
        assert_eq!(open(&dir).unwrap().generation(), 2);
    }

    #[test]
    fn an_unreadable_copy_is_an_io_error_naming_it_unless_the_other_opens() {
        let t = Tmp::new("io");
        let dir = t.sealed();
        commit_exactly(&dir, &r1());
        // A directory where store.b should be: unreadable, but store.a opens.
        fs::create_dir(dir.join("store.b")).unwrap();
        let s = open(&dir).unwrap();
        assert_eq!(s.generation(), 1);
        assert!(
            s.refused()[0].starts_with("store.b: cannot read"),
            "{:?}",
            s.refused()
        );
        fs::remove_file(dir.join("store.a")).unwrap();
        let e = open(&dir).unwrap_err();
        assert!(
            matches!(e, SealError::Io { ref path, .. } if path.ends_with("store.b")),
            "{e}"
        );
    }
}
