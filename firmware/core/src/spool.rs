//! The queue on disk (F-SPOOL): the record format of the log, recovery by scanning the
//! segments, and the messages' delivery state. The daemon's writer thread (group commit)
//! and async API are `sealgate::spool`; this half has no tokio and is read by `sealgate
//! queue list` and the fuzzer as well.
//!
//! storage, and every later state change is atomic.
//!
//! The queue is a log of records in segment files `queue/NNNNNNNNNNNN.seg`, appended by one
//! writer thread. Each batch of records (every commit, state change and removal that arrived
//! while the previous batch was being synced) is written with one `write` and made durable
//! with one `fdatasync` before any of its callers is answered: group commit across sessions.
//! Messages larger than 512 KiB are spilled to `queue/tmp/ID` while they arrive (never
//! acknowledged; removed at start-up) and copied into the log when committed.
//!
//! Record: 16-byte header — magic `SGR1`, kind (1 message, 2 state, 3 done), 3 zero bytes,
//! payload length (u32 LE), CRC-32 of kind byte + payload (u32 LE) — then the payload:
//! id length (u8), id, head length (u32 LE), head, body. A message's head is its envelope
//! (`from`, `rcpt`, `arrival`, `body`, `smtputf8` lines), its body the message bytes; a state's
//! head is the delivery state (`SGS2`, `attempts`, `next`, per-recipient lines `INDEX KIND SOURCE
//! STATUS`; `SGS1` without the source is still read), which replaces
//! earlier ones; `done` has neither.
//!
//! Recovery reads the segments in order and stops a segment at the first record that fails its
//! checks (a torn tail after a crash: never acknowledged). Segments are deleted oldest first
//! once no live message is in them; a few long-lived messages pinning an old segment are
//! copied forward (with their state) so that it can go.
//!
//! Architecture invariant: a `250` is sent only after [`Spool::commit`] returned `Ok`, i.e.
//! after the `fdatasync` of the segment holding the message (and of the directory for a new
//! segment).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sealgate_proto::BodyType;

use crate::delivery::{Source, Status};

pub use crate::time::unix_now;

pub const MAGIC: &[u8; 4] = b"SGR1";
pub const HDR: usize = 16;
pub const KIND_MESSAGE: u8 = 1;
pub const KIND_STATE: u8 = 2;
pub const KIND_DONE: u8 = 3;
/// Bodies up to this size stay in memory until commit; larger ones spill to `tmp/`.
pub const SPILL_BYTES: usize = 512 * 1024;
/// A new segment is started once the active one is this large.
pub const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Most bytes gathered into one batch before it is written.
pub const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Largest record accepted when reading (a 4 GiB message plus its envelope).
pub const MAX_RECORD: u32 = u32::MAX - 1;
/// An old segment pinned by at most this many live messages is compacted.
pub const COMPACT_LIVE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("queue segment {path} is damaged at offset {offset}: {reason}")]
    Damaged {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
    #[error("not enough free space in the spool")]
    NoSpace,
    #[error("envelope address contains a control character")]
    BadAddress,
    #[error("spool worker is gone")]
    Gone,
}

pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Delivery status of one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptStatus {
    Pending,
    Delivered(Status),
    Failed(Status),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub address: String,
    pub status: RcptStatus,
    /// The last temporary failure, for logs, queue listings and delay DSNs.
    pub last_error: Option<Status>,
}

/// A committed message and its delivery state (the body stays on disk).
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub id: String,
    pub mail_from: String,
    pub recipients: Vec<Recipient>,
    pub body_type: BodyType,
    pub smtputf8: bool,
    /// Unix seconds of acceptance.
    pub arrival: u64,
    /// Bytes of the message (headers + body).
    pub size: u64,
    pub attempts: u32,
    /// Unix seconds of the next attempt.
    pub next_attempt: u64,
}

impl QueuedMessage {
    pub fn pending(&self) -> impl Iterator<Item = (usize, &Recipient)> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status == RcptStatus::Pending)
    }

    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }
}

pub fn check_addr(a: &str) -> Result<(), SpoolError> {
    if a.bytes().any(|b| b < 0x20 || b == 0x7f) || a.len() > 1024 {
        Err(SpoolError::BadAddress)
    } else {
        Ok(())
    }
}

pub fn encode_trailer(m: &QueuedMessage) -> Vec<u8> {
    let mut t = String::new();
    t.push_str(&format!("from {}\n", m.mail_from));
    for r in &m.recipients {
        t.push_str(&format!("rcpt {}\n", r.address));
    }
    t.push_str(&format!("arrival {}\n", m.arrival));
    let body = match m.body_type {
        BodyType::SevenBit => "7bit",
        BodyType::EightBitMime => "8bitmime",
    };
    t.push_str(&format!("body {body}\nsmtputf8 {}\n", u8::from(m.smtputf8)));
    t.into_bytes()
}

/// Where a live message is.
#[derive(Debug, Clone)]
pub struct Loc {
    pub seg: u64,
    /// Offset of the record header.
    pub rec: u64,
    /// Record length including header.
    pub rec_len: u64,
    pub body_off: u64,
    pub body_len: u64,
    /// The latest state record's head, carried along when the message is copied forward.
    pub state: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct Index {
    pub live: HashMap<String, Loc>,
    /// Live messages per segment (every existing segment has an entry).
    pub seg_live: BTreeMap<u64, usize>,
    pub active: u64,
}

impl Index {
    pub fn add(&mut self, id: &str, loc: Loc) {
        *self.seg_live.entry(loc.seg).or_insert(0) += 1;
        if let Some(old) = self.live.insert(id.to_string(), loc)
            && let Some(n) = self.seg_live.get_mut(&old.seg)
        {
            *n = n.saturating_sub(1);
        }
    }

    pub fn done(&mut self, id: &str) {
        if let Some(old) = self.live.remove(id)
            && let Some(n) = self.seg_live.get_mut(&old.seg)
        {
            *n = n.saturating_sub(1);
        }
    }
}

pub fn seg_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:012}.seg"))
}

pub fn segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut segs = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok())
        {
            segs.push(n);
        }
    }
    segs.sort_unstable();
    Ok(segs)
}

pub fn encode_state(m: &QueuedMessage) -> Vec<u8> {
    let mut s = format!("SGS2\nattempts {}\nnext {}\n", m.attempts, m.next_attempt);
    for (i, r) in m.recipients.iter().enumerate() {
        let (kind, status) = match &r.status {
            RcptStatus::Pending => match &r.last_error {
                Some(e) => ("deferred", e),
                None => continue,
            },
            RcptStatus::Delivered(t) => ("delivered", t),
            RcptStatus::Failed(t) => ("failed", t),
        };
        s.push_str(&format!("{i} {kind} {}\n", status.encode()));
    }
    s.into_bytes()
}

pub fn parse_envelope(id: &str, head: &[u8], size: u64) -> Result<QueuedMessage, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "envelope not UTF-8")?;
    let mut m = QueuedMessage {
        id: id.to_string(),
        mail_from: String::new(),
        recipients: Vec::new(),
        body_type: BodyType::SevenBit,
        smtputf8: false,
        arrival: 0,
        size,
        attempts: 0,
        next_attempt: 0,
    };
    let mut have_from = false;
    for line in text.lines() {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        match k {
            "from" => {
                m.mail_from = v.to_string();
                have_from = true;
            }
            "rcpt" => m.recipients.push(Recipient {
                address: v.to_string(),
                status: RcptStatus::Pending,
                last_error: None,
            }),
            "arrival" => m.arrival = v.parse().map_err(|_| "arrival")?,
            "body" => {
                m.body_type = if v == "8bitmime" {
                    BodyType::EightBitMime
                } else {
                    BodyType::SevenBit
                }
            }
            "smtputf8" => m.smtputf8 = v == "1",
            _ => return Err("unknown envelope field"),
        }
    }
    if !have_from || m.recipients.is_empty() {
        return Err("envelope lacks sender or recipients");
    }
    m.next_attempt = m.arrival;
    Ok(m)
}

/// Where and why a segment stopped being readable.
pub type Torn = (u64, &'static str);

/// One record read back from a segment.
pub struct Scanned {
    pub kind: u8,
    pub id: String,
    pub head: Vec<u8>,
    pub rec: u64,
    pub rec_len: u64,
    pub body_off: u64,
    pub body_len: u64,
}

/// Reads a segment's records in order, stopping at the first that fails a check.
/// Returns the records and, if the segment did not end cleanly, the reason.
pub fn scan_segment(path: &Path) -> Result<(Vec<Scanned>, Option<Torn>), SpoolError> {
    let f = io::BufReader::with_capacity(256 * 1024, File::open(path).map_err(io_err(path))?);
    let file_len = f.get_ref().metadata().map_err(io_err(path))?.len();
    Ok(scan_records(f, file_len))
}

/// What a segment's bytes hold, for checks and the fuzzer: records read, messages whose
/// envelope parses, and where and why reading stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentCheck {
    pub records: usize,
    pub messages: usize,
    pub torn: Option<Torn>,
}

/// Parses segment bytes the way recovery does (records, envelopes, delivery states).
pub fn check_segment(bytes: &[u8]) -> SegmentCheck {
    let (records, torn) = scan_records(bytes, bytes.len() as u64);
    let mut messages = 0;
    for r in &records {
        match r.kind {
            KIND_MESSAGE => {
                if let Ok(mut m) = parse_envelope(&r.id, &r.head, r.body_len) {
                    messages += 1;
                    let _ = apply_state(&mut m, "SGS1\nattempts 1\n");
                }
            }
            KIND_STATE => {
                let mut m = QueuedMessage {
                    id: r.id.clone(),
                    mail_from: String::new(),
                    recipients: Vec::new(),
                    body_type: BodyType::SevenBit,
                    smtputf8: false,
                    arrival: 0,
                    size: 0,
                    attempts: 0,
                    next_attempt: 0,
                };
                let _ = apply_state(&mut m, &String::from_utf8_lossy(&r.head));
            }
            _ => {}
        }
    }
    SegmentCheck {
        records: records.len(),
        messages,
        torn,
    }
}

/// Reads records from `f` (holding `file_len` bytes) until the end or the first bad record.
pub fn scan_records(mut f: impl Read, file_len: u64) -> (Vec<Scanned>, Option<Torn>) {
    let mut out = Vec::new();
    let mut off = 0u64;
    let mut payload = Vec::new();
    loop {
        if off == file_len {
            return (out, None);
        }
        let mut hdr = [0u8; HDR];
        if file_len - off < HDR as u64 || f.read_exact(&mut hdr).is_err() {
            return (out, Some((off, "truncated record header")));
        }
        let field = |a: usize| {
            hdr.get(a..a + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        };
        let (kind, len, crc) = (hdr[4], field(8), field(12));
        if &hdr[..4] != MAGIC || !(KIND_MESSAGE..=KIND_DONE).contains(&kind) || len > MAX_RECORD {
            return (out, Some((off, "bad record header")));
        }
        if file_len - off - (HDR as u64) < u64::from(len) {
            return (out, Some((off, "truncated record")));
        }
        payload.clear();
        payload.resize(len as usize, 0);
        if f.read_exact(&mut payload).is_err() {
            return (out, Some((off, "unreadable record")));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&[kind]);
        h.update(&payload);
        if h.finalize() != crc {
            return (out, Some((off, "checksum mismatch")));
        }
        let Some((id, head, body_at)) = split_payload(&payload) else {
            return (out, Some((off, "malformed payload")));
        };
        let rec_len = HDR as u64 + u64::from(len);
        out.push(Scanned {
            kind,
            id,
            head: head.to_vec(),
            rec: off,
            rec_len,
            body_off: off + HDR as u64 + body_at as u64,
            body_len: u64::from(len) - body_at as u64,
        });
        off += rec_len;
    }
}

/// `(id, head, offset of the body in the payload)`.
pub fn split_payload(p: &[u8]) -> Option<(String, &[u8], usize)> {
    let (&idlen, rest) = p.split_first()?;
    let id = rest.get(..idlen as usize)?;
    let id = std::str::from_utf8(id).ok()?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let at = 1 + idlen as usize;
    let hl = u32::from_le_bytes(p.get(at..at + 4)?.try_into().ok()?) as usize;
    let head = p.get(at + 4..at + 4 + hl)?;
    Some((id.to_string(), head, at + 4 + hl))
}

/// The live messages of a queue directory, read without taking it over: recovery at start-up
/// and `sealgate queue list` share this.
pub fn scan(dir: &Path) -> Result<Vec<QueuedMessage>, SpoolError> {
    Ok(recover(dir)?.0)
}

/// Scans every segment: live messages (with their latest state) and the index.
pub fn recover(dir: &Path) -> Result<(Vec<QueuedMessage>, Index), SpoolError> {
    let mut index = Index::default();
    let mut msgs: HashMap<String, QueuedMessage> = HashMap::new();
    let mut states: HashMap<String, Vec<u8>> = HashMap::new();
    let segs = segments(dir)?;
    let last = segs.last().copied();
    for seg in segs {
        let path = seg_path(dir, seg);
        index.seg_live.entry(seg).or_insert(0);
        let (records, torn) = match scan_segment(&path) {
            Ok(scanned) => scanned,
            // a running daemon removes a segment only when nothing in it is live: a reader
            // beside it (`sealgate queue list`) that lost the race has nothing to miss
            Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some((offset, reason)) = torn {
            let e = SpoolError::Damaged {
                path: path.clone(),
                offset,
                reason,
            };
            if Some(seg) == last {
                tracing::warn!(error = %e, "queue log ends in a torn record (crash); ignored");
            } else {
                tracing::error!(error = %e, "queue segment damaged; records after it are lost");
            }
        }
        for r in records {
            match r.kind {
                KIND_MESSAGE => match parse_envelope(&r.id, &r.head, r.body_len) {
                    Ok(m) => {
                        msgs.insert(r.id.clone(), m);
                        let state = states.get(&r.id).cloned();
                        index.add(
                            &r.id,
                            Loc {
                                seg,
                                rec: r.rec,
                                rec_len: r.rec_len,
                                body_off: r.body_off,
                                body_len: r.body_len,
                                state,
                            },
                        );
                    }
                    Err(reason) => {
                        tracing::error!(queue_id = %r.id, segment = seg, reason, "bad envelope; message skipped");
                    }
                },
                KIND_STATE => {
                    if let Some(loc) = index.live.get_mut(&r.id) {
                        loc.state = Some(r.head.clone());
                    }
                    states.insert(r.id, r.head);
                }
                _ => {
                    index.done(&r.id);
                    msgs.remove(&r.id);
                    states.remove(&r.id);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (id, mut m) in msgs {
        if !index.live.contains_key(&id) {
            continue;
        }
        if let Some(st) = states.get(&id) {
            let text = String::from_utf8_lossy(st);
            if let Err(reason) = apply_state(&mut m, &text) {
                tracing::error!(queue_id = %id, reason, "bad delivery state ignored");
            }
        }
        out.push(m);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((out, index))
}

/// One record to encode: its kind, the message id, the head, and the body in parts (a spilled
/// start read back from `tmp/`, then what stayed in memory).
#[derive(Debug, Clone, Copy)]
pub struct RecordParts<'a> {
    pub kind: u8,
    pub id: &'a str,
    pub head: &'a [u8],
    pub body: &'a [&'a [u8]],
}

/// Appends one record to `buf`; returns (body offset within the record, record length).
pub fn encode(buf: &mut Vec<u8>, r: RecordParts<'_>) -> (u64, u64) {
    let body_len: usize = r.body.iter().map(|p| p.len()).sum();
    let mut prefix = RecordPrefix::new(r.kind, r.id, r.head, body_len as u64);
    for part in r.body {
        prefix.hash_body(part);
    }
    let body_off = prefix.len();
    let start = buf.len();
    buf.extend_from_slice(&prefix.finish());
    for part in r.body {
        buf.extend_from_slice(part);
    }
    (body_off, (buf.len() - start) as u64)
}

/// A record up to its body, for records written in pieces (a spilled message is copied from
/// its file, never held whole): the caller hashes the body first ([`RecordPrefix::hash_body`],
/// in order), then writes [`RecordPrefix::finish`] and the body.
#[derive(Debug, Clone)]
pub struct RecordPrefix {
    bytes: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl RecordPrefix {
    /// Header (magic, kind, payload length), id and head of a record with `body_len` bytes of
    /// body. The payload length saturates at the format's limit (such a record fails its
    /// checks when read: a message that large is refused before, by `max_message_bytes`).
    pub fn new(kind: u8, id: &str, head: &[u8], body_len: u64) -> Self {
        let idb = id.as_bytes();
        let idb = idb.get(..idb.len().min(255)).unwrap_or(idb);
        let payload = (1 + idb.len() + 4 + head.len()) as u64 + body_len;
        let payload = u32::try_from(payload).unwrap_or(u32::MAX);
        let mut bytes = Vec::with_capacity(HDR + 5 + idb.len() + head.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&[kind, 0, 0, 0]);
        bytes.extend_from_slice(&payload.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]); // CRC, filled in by `finish`
        bytes.push(idb.len() as u8);
        bytes.extend_from_slice(idb);
        bytes.extend_from_slice(&(head.len() as u32).to_le_bytes());
        bytes.extend_from_slice(head);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        crc.update(bytes.get(HDR..).unwrap_or_default());
        Self { bytes, crc }
    }

    /// The next piece of the body, for the checksum.
    pub fn hash_body(&mut self, piece: &[u8]) {
        self.crc.update(piece);
    }

    /// Offset of the body in the record (the prefix's length).
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The prefix with the checksum over everything hashed.
    pub fn finish(self) -> Vec<u8> {
        let mut bytes = self.bytes;
        let crc = self.crc.finalize().to_le_bytes();
        if let Some(slot) = bytes.get_mut(12..16) {
            slot.copy_from_slice(&crc);
        }
        bytes
    }
}

pub fn apply_state(m: &mut QueuedMessage, s: &str) -> Result<(), &'static str> {
    let mut lines = s.lines();
    // SGS1: statuses as displayed text (before they were typed); SGS2: with their source.
    if !matches!(lines.next(), Some("SGS1" | "SGS2")) {
        return Err("bad state magic");
    }
    for line in lines {
        let (k, rest) = line.split_once(' ').ok_or("bad state line")?;
        match k {
            "attempts" => m.attempts = rest.parse().map_err(|_| "attempts")?,
            "next" => m.next_attempt = rest.parse().map_err(|_| "next")?,
            idx => {
                let i: usize = idx.parse().map_err(|_| "recipient index")?;
                let (kind, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let r = m
                    .recipients
                    .get_mut(i)
                    .ok_or("recipient index out of range")?;
                let status = Status::decode(text).unwrap_or_else(|| Status {
                    code: None,
                    enhanced: None,
                    text: text.to_string(),
                    source: Source::Local,
                });
                match kind {
                    "delivered" => r.status = RcptStatus::Delivered(status),
                    "failed" => r.status = RcptStatus::Failed(status),
                    "deferred" => r.last_error = Some(status),
                    _ => return Err("recipient state"),
                }
            }
        }
    }
    Ok(())
}
