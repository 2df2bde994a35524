//! The signed update bundle (F-IMAGE): a fixed 128-byte header, its Ed25519 signature, then the
//! payload (the static `sealgate` executable) whose length and SHA-256 the header carries.
//!
//! Byte layout: see `docs/update-bundle.md`. All integers big-endian.
//!
//! ```text
//! offset  size  field
//! 0       8     magic b"SEALGSGU"
//! 8       2     format u16 (= 1)
//! 10      2     version.major u16
//! 12      2     version.minor u16
//! 14      2     version.patch u16
//! 16      8     payload_len u64 (bytes after the signature)
//! 24      32    payload_sha256
//! 56      8     key_id (first 8 bytes of SHA-256 of the signing public key)
//! 64      8     created u64 (Unix seconds)
//! 72      32    board: 1..=32 printable ASCII bytes (0x21..=0x7e), NUL padded
//! 104     24    reserved, zero
//! 128     64    Ed25519 signature over DOMAIN || bytes 0..128
//! 192     ...   payload (payload_len bytes)
//! ```
//!
//! The box checks, in this order, each with its own [`BundleError`]: format
//! ([`parse_prefix`]: magic, format, header fields) → key known → signature → board → rollback
//! floor → payload size bound ([`Unverified::verify`]) → payload length and SHA-256 while the
//! payload streams ([`Verified::update`], [`Verified::finish`]). Nothing of a payload is trusted
//! before `finish` returns `Ok`.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use ring::digest;
use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};

use crate::keys::{key_id_hex, key_id_of};
use crate::version::Version;

/// First bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"SEALGSGU";
/// The format version this build writes and reads.
pub const FORMAT: u16 = 1;
/// Bytes of the header (fixed).
pub const HEADER_LEN: usize = 128;
/// Bytes of the Ed25519 signature after the header.
pub const SIGNATURE_LEN: usize = 64;
/// Bytes before the payload: header and signature.
pub const PREFIX_LEN: usize = HEADER_LEN + SIGNATURE_LEN;
/// The signature's domain separation prefix: signature = Ed25519(DOMAIN || header bytes).
pub const DOMAIN: &[u8] = b"sealgate update bundle v1\0";
/// Largest payload this build signs or accepts.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// The board name of the QEMU x86-64 appliance.
pub const BOARD_QEMU: &str = "qemu-x86_64";
/// Longest board name.
pub const MAX_BOARD: usize = 32;

/// Chunk size of the streamed passes over a payload.
const CHUNK: usize = 64 * 1024;

const OFF_FORMAT: usize = 8;
const OFF_VERSION: usize = 10;
const OFF_PAYLOAD_LEN: usize = 16;
const OFF_SHA256: usize = 24;
const OFF_KEY_ID: usize = 56;
const OFF_CREATED: usize = 64;
const OFF_BOARD: usize = 72;
const OFF_RESERVED: usize = OFF_BOARD + MAX_BOARD;

/// The signed header of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The release version of the payload.
    pub version: Version,
    /// The board the payload is built for (1..=32 printable ASCII bytes).
    pub board: String,
    /// Bytes of payload after the signature.
    pub payload_len: u64,
    /// SHA-256 of the payload.
    pub payload_sha256: [u8; 32],
    /// Id of the signing key ([`crate::keys::key_id`] of its public key).
    pub key_id: [u8; 8],
    /// When the bundle was signed, Unix seconds.
    pub created: u64,
}

/// Why a bundle was refused; each message starts with the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle format: truncated: {got} bytes, the bundle prefix needs {need}")]
    Truncated { got: u64, need: u64 },
    #[error("bundle format: not a Sealgate update bundle (bad magic)")]
    BadMagic,
    #[error("bundle format: unsupported format version {0} (this build reads version {FORMAT})")]
    UnsupportedFormat(u16),
    #[error("bundle format: malformed header: {0}")]
    BadHeader(&'static str),
    #[error("bundle key: signed by key {0}, which is not a trusted image key")]
    UnknownKey(String),
    #[error(
        "bundle signature: does not verify under the key it names (altered, or signed by \
         another key)"
    )]
    BadSignature,
    #[error("bundle board: the bundle is for board {bundle:?}, this board is {board:?}")]
    WrongBoard { bundle: String, board: String },
    #[error(
        "bundle version: {version} is below the rollback floor {floor} (a version at least as \
         new as the last good one is required)"
    )]
    BelowFloor { version: Version, floor: Version },
    #[error("bundle payload size: {len} bytes, more than the {max} allowed")]
    PayloadTooLarge { len: u64, max: u64 },
    #[error("bundle payload length: the header says {expected} bytes, the payload has {got}")]
    PayloadLength { expected: u64, got: u64 },
    #[error("bundle payload hash: the payload's SHA-256 differs from the signed header's")]
    PayloadHash,
    #[error("bundle i/o: {0}")]
    Io(#[from] io::Error),
}

impl Header {
    /// The 128 header bytes. The board must already be valid ([`check_board`]).
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[OFF_FORMAT..OFF_FORMAT + 2].copy_from_slice(&FORMAT.to_be_bytes());
        h[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&self.version.major.to_be_bytes());
        h[OFF_VERSION + 2..OFF_VERSION + 4].copy_from_slice(&self.version.minor.to_be_bytes());
        h[OFF_VERSION + 4..OFF_VERSION + 6].copy_from_slice(&self.version.patch.to_be_bytes());
        h[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 8].copy_from_slice(&self.payload_len.to_be_bytes());
        h[OFF_SHA256..OFF_SHA256 + 32].copy_from_slice(&self.payload_sha256);
        h[OFF_KEY_ID..OFF_KEY_ID + 8].copy_from_slice(&self.key_id);
        h[OFF_CREATED..OFF_CREATED + 8].copy_from_slice(&self.created.to_be_bytes());
        let board = self.board.as_bytes();
        let n = board.len().min(MAX_BOARD);
        h[OFF_BOARD..OFF_BOARD + n].copy_from_slice(&board[..n]);
        h
    }

    /// Decodes the 128 header bytes (format checks only).
    fn decode(h: &[u8; HEADER_LEN]) -> Result<Header, BundleError> {
        if &h[..8] != MAGIC {
            return Err(BundleError::BadMagic);
        }
        let format = be_u16(h, OFF_FORMAT);
        if format != FORMAT {
            return Err(BundleError::UnsupportedFormat(format));
        }
        let board_field = &h[OFF_BOARD..OFF_RESERVED];
        let board_len = board_field
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(MAX_BOARD);
        if board_field[board_len..].iter().any(|&b| b != 0) {
            return Err(BundleError::BadHeader("board: bytes after its NUL padding"));
        }
        let board = std::str::from_utf8(&board_field[..board_len])
            .map_err(|_| BundleError::BadHeader("board: not ASCII"))?;
        check_board(board)?;
        if h[OFF_RESERVED..].iter().any(|&b| b != 0) {
            return Err(BundleError::BadHeader("reserved bytes are not zero"));
        }
        let mut payload_sha256 = [0u8; 32];
        payload_sha256.copy_from_slice(&h[OFF_SHA256..OFF_SHA256 + 32]);
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&h[OFF_KEY_ID..OFF_KEY_ID + 8]);
        Ok(Header {
            version: Version::new(
                be_u16(h, OFF_VERSION),
                be_u16(h, OFF_VERSION + 2),
                be_u16(h, OFF_VERSION + 4),
            ),
            board: board.to_owned(),
            payload_len: be_u64(h, OFF_PAYLOAD_LEN),
            payload_sha256,
            key_id,
            created: be_u64(h, OFF_CREATED),
        })
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    x.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(x)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// A board name is 1..=32 printable ASCII bytes (no space, no NUL).
pub fn check_board(board: &str) -> Result<(), BundleError> {
    if board.is_empty() {
        return Err(BundleError::BadHeader("board: empty"));
    }
    if board.len() > MAX_BOARD {
        return Err(BundleError::BadHeader("board: longer than 32 bytes"));
    }
    if !board.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BundleError::BadHeader("board: not printable ASCII"));
    }
    Ok(())
}

fn signed_message(header: &[u8; HEADER_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + HEADER_LEN);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(header);
    m
}

/// Reads until `buf` is full or the reader ends; returns the bytes read (a short count means
/// the end of the input, e.g. a truncated bundle).
pub fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Signs `payload` (from its current position to its end) into a bundle written to `out`:
/// header, signature, payload. Two passes over the payload, streamed in 64 KiB chunks: the first
/// hashes and measures it, the second copies it (and re-hashes it, so a payload that changed
/// between the passes is an error rather than a bundle that never verifies).
pub fn sign<R: Read + Seek, W: Write>(
    payload: &mut R,
    version: Version,
    board: &str,
    key: &Ed25519KeyPair,
    created: u64,
    out: &mut W,
) -> Result<Header, BundleError> {
    check_board(board)?;
    let start = payload.stream_position()?;
    let (payload_len, payload_sha256) = hash_stream(payload, MAX_PAYLOAD)?;
    let header = Header {
        version,
        board: board.to_owned(),
        payload_len,
        payload_sha256,
        key_id: key_id_of(key),
        created,
    };
    let bytes = header.encode();
    let signature = key.sign(&signed_message(&bytes));
    out.write_all(&bytes)?;
    out.write_all(signature.as_ref())?;
    payload.seek(SeekFrom::Start(start))?;
    let mut check = Verified {
        header: header.clone(),
        hash: digest::Context::new(&digest::SHA256),
        got: 0,
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_full(payload, &mut buf)?;
        if n == 0 {
            break;
        }
        check.update(&buf[..n])?;
        out.write_all(&buf[..n])?;
    }
    check.finish()?;
    out.flush()?;
    Ok(header)
}

/// Length and SHA-256 of the rest of `r`; more than `max` bytes is [`BundleError::PayloadTooLarge`].
fn hash_stream<R: Read + ?Sized>(r: &mut R, max: u64) -> Result<(u64, [u8; 32]), BundleError> {
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut len = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_full(r, &mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        if len > max {
            return Err(BundleError::PayloadTooLarge { len, max });
        }
        hash.update(&buf[..n]);
    }
    let mut sha = [0u8; 32];
    sha.copy_from_slice(hash.finish().as_ref());
    Ok((len, sha))
}

/// A bundle prefix whose format is valid but whose signature is not yet checked.
#[derive(Debug, Clone)]
pub struct Unverified {
    header: Header,
    header_bytes: [u8; HEADER_LEN],
    signature: [u8; SIGNATURE_LEN],
}

/// Decodes the first [`PREFIX_LEN`] bytes of `bytes` (header and signature); the bytes after
/// them (the payload) are ignored. Format checks only: nothing in the result is trusted yet.
pub fn parse_prefix(bytes: &[u8]) -> Result<Unverified, BundleError> {
    let magic_part = bytes.len().min(MAGIC.len());
    if bytes[..magic_part] != MAGIC[..magic_part] {
        return Err(BundleError::BadMagic);
    }
    let (Some(h), Some(s)) = (bytes.get(..HEADER_LEN), bytes.get(HEADER_LEN..PREFIX_LEN)) else {
        return Err(BundleError::Truncated {
            got: bytes.len() as u64,
            need: PREFIX_LEN as u64,
        });
    };
    let mut header_bytes = [0u8; HEADER_LEN];
    header_bytes.copy_from_slice(h);
    let mut signature = [0u8; SIGNATURE_LEN];
    signature.copy_from_slice(s);
    Ok(Unverified {
        header: Header::decode(&header_bytes)?,
        header_bytes,
        signature,
    })
}

impl Unverified {
    /// The header as parsed (not yet trusted).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Checks, in order: the key is trusted → the signature verifies → the bundle is for
    /// `board` → its version is at least `floor` → its payload is at most `max_payload` bytes.
    /// On success the payload can be streamed through the returned [`Verified`].
    pub fn verify(
        self,
        trusted: &BTreeMap<[u8; 8], [u8; 32]>,
        board: &str,
        floor: Version,
        max_payload: u64,
    ) -> Result<Verified, BundleError> {
        let h = &self.header;
        let Some(public) = trusted.get(&h.key_id) else {
            return Err(BundleError::UnknownKey(key_id_hex(&h.key_id)));
        };
        UnparsedPublicKey::new(&ED25519, public)
            .verify(&signed_message(&self.header_bytes), &self.signature)
            .map_err(|_| BundleError::BadSignature)?;
        if h.board != board {
            return Err(BundleError::WrongBoard {
                bundle: h.board.clone(),
                board: board.to_owned(),
            });
        }
        if h.version < floor {
            return Err(BundleError::BelowFloor {
                version: h.version,
                floor,
            });
        }
        if h.payload_len > max_payload {
            return Err(BundleError::PayloadTooLarge {
                len: h.payload_len,
                max: max_payload,
            });
        }
        Ok(Verified {
            header: self.header,
            hash: digest::Context::new(&digest::SHA256),
            got: 0,
        })
    }
}

/// A bundle whose header is signed by a trusted key; its payload is checked as it streams.
#[derive(Clone)]
pub struct Verified {
    header: Header,
    hash: digest::Context,
    got: u64,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("header", &self.header)
            .field("got", &self.got)
            .finish_non_exhaustive()
    }
}

impl Verified {
    /// The signed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Payload bytes seen so far.
    pub fn received(&self) -> u64 {
        self.got
    }

    /// Feeds the next payload bytes; more than the header's `payload_len` in total is
    /// [`BundleError::PayloadLength`] (and nothing of `chunk` is counted).
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), BundleError> {
        let got = self.got.saturating_add(chunk.len() as u64);
        if got > self.header.payload_len {
            return Err(BundleError::PayloadLength {
                expected: self.header.payload_len,
                got,
            });
        }
        self.hash.update(chunk);
        self.got = got;
        Ok(())
    }

    /// Ends the payload: its length must be the header's and its SHA-256 the signed one.
    pub fn finish(self) -> Result<Header, BundleError> {
        if self.got != self.header.payload_len {
            return Err(BundleError::PayloadLength {
                expected: self.header.payload_len,
                got: self.got,
            });
        }
        if self.hash.finish().as_ref() != self.header.payload_sha256 {
            return Err(BundleError::PayloadHash);
        }
        Ok(self.header)
    }
}

/// Reads a bundle from `r` (prefix, then exactly `payload_len` payload bytes; whatever follows,
/// such as the rest of a slot partition, is not read), verifies it and copies the payload to
/// `out`. On any error the caller must discard what was written to `out`.
pub fn verify_stream<R: Read, W: Write>(
    r: &mut R,
    trusted: &BTreeMap<[u8; 8], [u8; 32]>,
    board: &str,
    floor: Version,
    max_payload: u64,
    out: &mut W,
) -> Result<Header, BundleError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let n = read_full(r, &mut prefix)?;
    let mut v = parse_prefix(&prefix[..n])?.verify(trusted, board, floor, max_payload)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let left = v.header.payload_len - v.got;
        if left == 0 {
            break;
        }
        let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let n = read_full(r, &mut buf[..want])?;
        if n == 0 {
            break; // short: finish reports the length
        }
        v.update(&buf[..n])?;
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    v.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Cursor;

    use super::*;
    use crate::keys::public_key_of;

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn trusted(keys: &[&Ed25519KeyPair]) -> BTreeMap<[u8; 8], [u8; 32]> {
        keys.iter()
            .map(|k| (key_id_of(k), public_key_of(k)))
            .collect()
    }

    const V: Version = Version::new(1, 2, 3);

    fn bundle(payload: &[u8], key: &Ed25519KeyPair) -> Vec<u8> {
        let mut out = Vec::new();
        sign(
            &mut Cursor::new(payload),
            V,
            BOARD_QEMU,
            key,
            1_700_000_000,
            &mut out,
        )
        .unwrap();
        out
    }

    fn verify_all(b: &[u8], keys: &BTreeMap<[u8; 8], [u8; 32]>) -> Result<Vec<u8>, BundleError> {
        let mut out = Vec::new();
        verify_stream(
            &mut Cursor::new(b),
            keys,
            BOARD_QEMU,
            Version::default(),
            MAX_PAYLOAD,
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        for len in [0usize, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let b = bundle(&payload, &k);
            assert_eq!(b.len(), PREFIX_LEN + len);
            assert_eq!(&b[PREFIX_LEN..], &payload[..]);
            let u = parse_prefix(&b).unwrap();
            let h = u.header().clone();
            assert_eq!(h.version, V);
            assert_eq!(h.board, BOARD_QEMU);
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(h.key_id, key_id_of(&k));
            assert_eq!(h.created, 1_700_000_000);
            assert_eq!(
                h.payload_sha256,
                digest::digest(&digest::SHA256, &payload).as_ref()
            );
            assert_eq!(verify_all(&b, &trusted(&[&k])).unwrap(), payload);
            // Trailing bytes after the payload (the rest of a slot partition) are not read.
            let mut slot = b.clone();
            slot.extend_from_slice(&[0xff; 1000]);
            assert_eq!(verify_all(&slot, &trusted(&[&k])).unwrap(), payload);
        }
    }

    #[test]
    fn header_layout() {
        let k = key(1);
        let b = bundle(b"abc", &k);
        assert_eq!(&b[..8], b"SEALGSGU");
        assert_eq!(&b[8..10], &[0, 1]);
        assert_eq!(&b[10..16], &[0, 1, 0, 2, 0, 3]);
        assert_eq!(&b[16..24], &3u64.to_be_bytes());
        assert_eq!(&b[24..56], digest::digest(&digest::SHA256, b"abc").as_ref());
        assert_eq!(&b[56..64], &key_id_of(&k));
        assert_eq!(&b[64..72], &1_700_000_000u64.to_be_bytes());
        assert_eq!(&b[72..83], b"qemu-x86_64");
        assert!(b[83..128].iter().all(|&x| x == 0));
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(&b[..128]);
        UnparsedPublicKey::new(&ED25519, public_key_of(&k))
            .verify(&msg, &b[128..192])
            .unwrap();
        assert_eq!(&b[192..], b"abc");
    }

    /// Re-signs a modified header with `k` so only the intended check fails.
    fn resign(b: &mut [u8], k: &Ed25519KeyPair) {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&b[..HEADER_LEN]);
        let sig = k.sign(&signed_message(&h));
        b[HEADER_LEN..PREFIX_LEN].copy_from_slice(sig.as_ref());
    }

    #[test]
    fn format_refusals() {
        let k = key(1);
        let b = bundle(b"payload", &k);
        for n in 0..PREFIX_LEN {
            match parse_prefix(&b[..n]) {
                Err(BundleError::Truncated { got, need }) => {
                    assert_eq!((got, need), (n as u64, PREFIX_LEN as u64))
                }
                other => panic!("{n}: {other:?}"),
            }
        }
        let mut x = b.clone();
        x[0] = b'X';
        assert!(matches!(parse_prefix(&x), Err(BundleError::BadMagic)));
        assert!(matches!(
            parse_prefix(b"SEALCFG\0"),
            Err(BundleError::BadMagic)
        ));
        let mut x = b.clone();
        x[9] = 2;
        let e = parse_prefix(&x).unwrap_err();
        assert!(matches!(e, BundleError::UnsupportedFormat(2)), "{e}");
        assert!(e.to_string().starts_with("bundle format:"), "{e}");
        let bad_header = |f: &dyn Fn(&mut Vec<u8>), what: &str| {
            let mut x = b.clone();
            f(&mut x);
            match parse_prefix(&x) {
                Err(BundleError::BadHeader(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{what}: {other:?}"),
            }
        };
        bad_header(&|x| x[72..104].fill(0), "empty");
        bad_header(&|x| x[80] = b' ', "printable");
        bad_header(&|x| x[72] = 0xc3, "ASCII");
        bad_header(&|x| x[100] = b'x', "padding");
        bad_header(&|x| x[127] = 1, "reserved");
        // A 32-byte board (no padding at all) is fine.
        let mut x = b.clone();
        x[72..104].fill(b'b');
        resign(&mut x, &k);
        assert_eq!(parse_prefix(&x).unwrap().header().board, "b".repeat(32));
    }

    #[test]
    fn verify_refusals_in_order() {
        let k = key(1);
        let other = key(2);
        let t = trusted(&[&k]);
        let b = bundle(b"payload", &k);
        let v = |b: &[u8], t: &BTreeMap<_, _>, board: &str, floor: Version, max: u64| {
            parse_prefix(b).unwrap().verify(t, board, floor, max)
        };
        assert!(v(&b, &t, BOARD_QEMU, V, 7).is_ok());

        // Unknown key, whatever else is wrong.
        let e = v(&b, &trusted(&[&other]), "other", Version::new(9, 0, 0), 0).unwrap_err();
        match &e {
            BundleError::UnknownKey(id) => assert_eq!(id, &key_id_hex(&key_id_of(&k))),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("bundle key:"), "{e}");
        // Bad signature: a header byte altered, or the signature, or signed by another key.
        let mut x = b.clone();
        x[65] ^= 1; // created
        let e = v(&x, &t, "other", Version::new(9, 0, 0), 0).unwrap_err();
        assert!(matches!(e, BundleError::BadSignature), "{e}");
        assert!(e.to_string().starts_with("bundle signature:"), "{e}");
        let mut x = b.clone();
        x[150] ^= 1;
        assert!(matches!(
            v(&x, &t, BOARD_QEMU, V, 7),
            Err(BundleError::BadSignature)
        ));
        let mut x = b.clone();
        resign(&mut x, &other); // names k, signed by other
        assert!(matches!(
            v(&x, &t, BOARD_QEMU, V, 7),
            Err(BundleError::BadSignature)
        ));
        // Wrong board, before the floor and the size.
        let e = v(&b, &t, "rpi4", Version::new(9, 0, 0), 0).unwrap_err();
        match &e {
            BundleError::WrongBoard { bundle, board } => {
                assert_eq!((bundle.as_str(), board.as_str()), (BOARD_QEMU, "rpi4"))
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("bundle board:"), "{e}");
        // Below the floor, before the size.
        let e = v(&b, &t, BOARD_QEMU, Version::new(1, 2, 4), 0).unwrap_err();
        assert!(
            matches!(e, BundleError::BelowFloor { version: V, floor } if floor == Version::new(1, 2, 4)),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("1.2.3 is below the rollback floor 1.2.4"),
            "{e}"
        );
        // Payload too large.
        let e = v(&b, &t, BOARD_QEMU, V, 6).unwrap_err();
        assert!(
            matches!(e, BundleError::PayloadTooLarge { len: 7, max: 6 }),
            "{e}"
        );
        assert!(e.to_string().starts_with("bundle payload size:"), "{e}");
    }

    #[test]
    fn payload_refusals() {
        let k = key(1);
        let t = trusted(&[&k]);
        let b = bundle(b"0123456789", &k);
        // Short.
        let e = verify_all(&b[..b.len() - 1], &t).unwrap_err();
        assert!(
            matches!(
                e,
                BundleError::PayloadLength {
                    expected: 10,
                    got: 9
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("bundle payload length:"), "{e}");
        // Long, through the streaming API.
        let mut v = parse_prefix(&b)
            .unwrap()
            .verify(&t, BOARD_QEMU, V, MAX_PAYLOAD)
            .unwrap();
        v.update(b"01234").unwrap();
        v.update(b"").unwrap();
        let e = v.update(b"567890").unwrap_err();
        assert!(
            matches!(
                e,
                BundleError::PayloadLength {
                    expected: 10,
                    got: 11
                }
            ),
            "{e}"
        );
        assert_eq!(v.received(), 5);
        v.update(b"56789").unwrap();
        assert_eq!(v.finish().unwrap().payload_len, 10);
        // Bad hash.
        let mut x = b.clone();
        x[PREFIX_LEN + 3] ^= 0x20;
        let e = verify_all(&x, &t).unwrap_err();
        assert!(matches!(e, BundleError::PayloadHash), "{e}");
        assert!(e.to_string().starts_with("bundle payload hash:"), "{e}");
        // Finish before the end.
        let mut v = parse_prefix(&b)
            .unwrap()
            .verify(&t, BOARD_QEMU, V, MAX_PAYLOAD)
            .unwrap();
        v.update(b"0").unwrap();
        assert!(matches!(
            v.finish(),
            Err(BundleError::PayloadLength {
                expected: 10,
                got: 1
            })
        ));
    }

    #[test]
    fn sign_refusals() {
        let k = key(1);
        let mut out = Vec::new();
        for board in ["", "a b", &"x".repeat(33), "qemu\0"] {
            let e = sign(&mut Cursor::new(b"p"), V, board, &k, 0, &mut out).unwrap_err();
            assert!(matches!(e, BundleError::BadHeader(_)), "{board:?}: {e}");
        }
        assert!(out.is_empty());
        // A payload over MAX_PAYLOAD, without holding it in memory.
        struct Zeros(u64);
        impl Read for Zeros {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(usize::try_from(self.0).unwrap_or(usize::MAX));
                buf[..n].fill(0);
                self.0 -= n as u64;
                Ok(n)
            }
        }
        impl Seek for Zeros {
            fn seek(&mut self, _: SeekFrom) -> io::Result<u64> {
                Ok(0)
            }
        }
        let e = sign(&mut Zeros(MAX_PAYLOAD + 1), V, BOARD_QEMU, &k, 0, &mut out).unwrap_err();
        assert!(matches!(e, BundleError::PayloadTooLarge { .. }), "{e}");
        assert!(out.is_empty());
        // Signing from the middle of a stream signs the rest.
        let mut c = Cursor::new(b"skipPAYLOAD".to_vec());
        c.set_position(4);
        let h = sign(&mut c, V, BOARD_QEMU, &k, 0, &mut out).unwrap();
        assert_eq!(h.payload_len, 7);
        assert_eq!(verify_all(&out, &trusted(&[&k])).unwrap(), b"PAYLOAD");
    }
}
