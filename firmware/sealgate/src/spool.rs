//! The durable queue: a message is acknowledged only once it and its envelope are on stable
//! storage, and every later state change is atomic.
//!
//! The queue is a log of records in segment files `queue/NNNNNNNNNNNN.seg`, appended by one
//! writer thread. Each batch of records (every commit, state change and removal that arrived
//! while the previous batch was being synced) is written with one `write` and made durable
//! with one `fdatasync` before any of its callers is answered: group commit across sessions.
//! (A batch of nothing but removals of delivered messages is not synced on its own: see
//! [`Spool::remove_delivered`].)
//! Messages larger than 512 KiB are spilled to `queue/tmp/ID` while they arrive (never
//! acknowledged; removed at start-up) and copied into the log when committed.
//!
//! Record: 16-byte header — magic `SGR1`, kind (1 message, 2 state, 3 done), 3 zero bytes,
//! payload length (u32 LE), CRC-32 of kind byte + payload (u32 LE) — then the payload:
//! id length (u8), id, head length (u32 LE), head, body. A message's head is its envelope
//! (`from`, `rcpt`, `arrival`, `body`, `smtputf8` lines), its body the message bytes; a state's
//! head is the delivery state (`SGS1`, `attempts`, `next`, per-recipient lines), which replaces
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

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use sealgate_core::spool::*;
pub use sealgate_core::spool::{
    QueuedMessage, RcptStatus, Recipient, SpoolError, check_segment, scan, unix_now,
};
use sealgate_proto::Envelope;

/// Largest record copied forward by compaction (it is read whole).
const COMPACT_MAX_RECORD: usize = 1024 * 1024;
/// Pieces in which spilled bodies are copied into the log and messages are read for delivery.
pub const COPY_CHUNK: usize = 256 * 1024;
use tokio::sync::oneshot;

fn create_new(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))
}

/// Read handles of segments, shared by readers and the writer (which drops deleted ones).
type Handles = Arc<Mutex<HashMap<u64, Arc<File>>>>;

/// One record to append.
#[derive(Debug)]
struct Record {
    kind: u8,
    id: String,
    head: Vec<u8>,
    body: Vec<u8>,
    /// Spilled body start (copied in before `body`).
    spill: Option<PathBuf>,
}

#[derive(Debug)]
struct Job {
    record: Record,
    /// Whether the record must be on stable storage before the reply (`false` only for the
    /// removal of a delivered message: it rides along with the next batch's `fdatasync`).
    sync: bool,
    reply: oneshot::Sender<Result<(), SpoolError>>,
}

/// The queue directory and its writer.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    tmp: PathBuf,
    seq: AtomicU64,
    min_free: u64,
    index: Arc<Mutex<Index>>,
    handles: Handles,
    writer: Mutex<mpsc::Sender<Job>>,
}

/// Body bytes of a message being received: in memory, spilled to `tmp/ID` past a threshold.
#[derive(Debug)]
pub struct BodySink {
    id: String,
    path: PathBuf,
    mem: Vec<u8>,
    file: Option<File>,
    len: u64,
}

impl BodySink {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes; writes to the spill file (off the async threads) once large.
    pub async fn append(&mut self, bytes: Vec<u8>) -> Result<(), SpoolError> {
        self.len += bytes.len() as u64;
        if self.file.is_none() && self.mem.len() + bytes.len() <= SPILL_BYTES {
            self.mem.extend_from_slice(&bytes);
            return Ok(());
        }
        let mut file = match self.file.take() {
            Some(f) => f,
            None => create_new(&self.path)?,
        };
        let mut chunk = std::mem::take(&mut self.mem);
        chunk.extend_from_slice(&bytes);
        let path = self.path.clone();
        let file = tokio::task::spawn_blocking(move || {
            file.write_all(&chunk).map_err(io_err(&path))?;
            Ok::<_, SpoolError>(file)
        })
        .await
        .map_err(|_| SpoolError::Gone)??;
        self.file = Some(file);
        Ok(())
    }
}

impl Drop for BodySink {
    fn drop(&mut self) {
        // An abandoned message (client gone mid-DATA, refused) or a committed one's spill.
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Spool {
    /// Opens (creating) `dir`, removes unacknowledged leftovers, starts the writer and returns
    /// the queue content.
    pub fn open(dir: &Path, min_free: u64) -> Result<(Spool, Vec<QueuedMessage>), SpoolError> {
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            let _ = fs::remove_file(e.path());
        }
        let (messages, mut index) = recover(dir)?;
        // Always append to a fresh segment: a torn tail of the last one stays behind it.
        let active = index.seg_live.keys().next_back().map_or(1, |n| n + 1);
        let path = seg_path(dir, active);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        index.seg_live.insert(active, 0);
        index.active = active;
        let index = Arc::new(Mutex::new(index));
        let handles: Handles = Arc::default();
        let (tx, rx) = mpsc::channel::<Job>();
        let mut w = Writer {
            dir: dir.to_path_buf(),
            file,
            size: 0,
            index: index.clone(),
            handles: handles.clone(),
        };
        w.delete_dead_segments();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || w.run(rx))
            .map_err(io_err(dir))?;
        let spool = Spool {
            dir: dir.to_path_buf(),
            tmp,
            seq: AtomicU64::new(0),
            min_free,
            index,
            handles,
            writer: Mutex::new(tx),
        };
        Ok((spool, messages))
    }

    /// Free bytes above the reserve, for the SMTP machine's `452 4.3.1` check.
    pub fn free_bytes(&self) -> u64 {
        sealgate_board::free_bytes(&self.dir)
            .map(|f| f.saturating_sub(self.min_free))
            .unwrap_or(0)
    }

    /// A fresh queue id: time-ordered, unique within this process and across restarts.
    pub fn new_id(&self) -> String {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let n = self.seq.fetch_add(1, Ordering::Relaxed) & 0xfffff;
        format!("{micros:013X}{n:05X}")
    }

    pub fn begin(&self, first: Vec<u8>) -> BodySink {
        let id = self.new_id();
        BodySink {
            path: self.tmp.join(&id),
            len: first.len() as u64,
            mem: first,
            file: None,
            id,
        }
    }

    async fn append(&self, record: Record) -> Result<(), SpoolError> {
        self.append_with(record, true).await
    }

    async fn append_with(&self, record: Record, sync: bool) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .lock()
            .map_err(|_| SpoolError::Gone)?
            .send(Job {
                record,
                sync,
                reply,
            })
            .map_err(|_| SpoolError::Gone)?;
        rx.await.map_err(|_| SpoolError::Gone)?
    }

    /// Makes the message durable. Only after `Ok` may the client be told `250`.
    pub async fn commit(
        &self,
        mut sink: BodySink,
        envelope: &Envelope,
    ) -> Result<QueuedMessage, SpoolError> {
        check_addr(&envelope.mail_from)?;
        for r in &envelope.rcpt_to {
            check_addr(r)?;
        }
        let now = unix_now();
        let msg = QueuedMessage {
            id: sink.id.clone(),
            mail_from: envelope.mail_from.clone(),
            recipients: envelope
                .rcpt_to
                .iter()
                .map(|a| Recipient {
                    address: a.clone(),
                    status: RcptStatus::Pending,
                    last_error: None,
                })
                .collect(),
            body_type: envelope.body,
            smtputf8: envelope.smtputf8,
            arrival: now,
            size: sink.len,
            attempts: 0,
            next_attempt: now,
        };
        if let Some(f) = sink.file.as_mut() {
            let path = sink.path.clone();
            f.flush().map_err(io_err(&path))?;
        }
        let record = Record {
            kind: KIND_MESSAGE,
            id: msg.id.clone(),
            head: encode_trailer(&msg),
            body: std::mem::take(&mut sink.mem),
            spill: sink.file.is_some().then(|| sink.path.clone()),
        };
        self.append(record).await?;
        Ok(msg)
    }

    /// A reader of a queued message's bytes (headers + body), in pieces.
    pub fn open_message(&self, id: &str) -> Result<MessageReader, SpoolError> {
        let loc = self
            .index
            .lock()
            .map_err(|_| SpoolError::Gone)?
            .live
            .get(id)
            .cloned()
            .ok_or_else(|| SpoolError::Io {
                path: self.dir.join(id),
                source: io::Error::new(io::ErrorKind::NotFound, "not in the queue"),
            })?;
        let path = seg_path(&self.dir, loc.seg);
        let file = {
            let mut h = self.handles.lock().map_err(|_| SpoolError::Gone)?;
            match h.get(&loc.seg) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(File::open(&path).map_err(io_err(&path))?);
                    h.insert(loc.seg, f.clone());
                    f
                }
            }
        };
        Ok(MessageReader {
            file,
            path,
            pos: loc.body_off,
            end: loc.body_off + loc.body_len,
            len: loc.body_len,
        })
    }

    /// At most the first `max` bytes of a queued message (a DSN's copy of the headers).
    pub async fn read_head(&self, id: &str, max: usize) -> Result<Vec<u8>, SpoolError> {
        let mut reader = self.open_message(id)?;
        let mut out = Vec::new();
        while out.len() < max {
            match reader.next_chunk((max - out.len()).min(COPY_CHUNK)).await? {
                Some(piece) => out.extend_from_slice(&piece),
                None => break,
            }
        }
        Ok(out)
    }

    /// The whole message bytes (tests; delivery reads in pieces).
    pub async fn read_message(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        self.read_head(id, usize::MAX).await
    }

    /// Durably replaces the message's delivery state.
    pub async fn save_state(&self, m: &QueuedMessage) -> Result<(), SpoolError> {
        self.append(Record {
            kind: KIND_STATE,
            id: m.id.clone(),
            head: encode_state(m),
            body: Vec::new(),
            spill: None,
        })
        .await
    }

    /// Durably removes a finished message (every recipient delivered or failed for good).
    pub async fn remove(&self, id: &str) -> Result<(), SpoolError> {
        self.append_with(done_record(id), true).await
    }

    /// Removes a message every recipient of which was delivered, without waiting for stable
    /// storage: the record is written at once and made durable by the next batch's
    /// `fdatasync` (or the kernel's writeback). A power cut before that brings the message back
    /// and it is delivered once more — at-least-once, as when Postfix's unlink of a delivered
    /// queue file is lost — for one `fdatasync` less per delivered message.
    pub async fn remove_delivered(&self, id: &str) -> Result<(), SpoolError> {
        self.append_with(done_record(id), false).await
    }
}

/// Pieces up to this size are read on the async thread itself (see [`MessageReader::next_chunk`]).
const INLINE_READ: usize = 16 * 1024;

/// The record that ends message `id`.
fn done_record(id: &str) -> Record {
    Record {
        kind: KIND_DONE,
        id: id.to_string(),
        head: Vec::new(),
        body: Vec::new(),
        spill: None,
    }
}

/// A queued message's bytes, read in pieces off the async threads. It keeps its segment open,
/// so a segment deleted or compacted meanwhile is still readable.
#[derive(Debug)]
pub struct MessageReader {
    file: Arc<File>,
    path: PathBuf,
    pos: u64,
    end: u64,
    len: u64,
}

impl MessageReader {
    /// Bytes of the message.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the rest of the message into `w` in [`COPY_CHUNK`] pieces, blocking (for use off
    /// the async threads); returns the bytes copied.
    pub fn copy_to(&mut self, w: &mut impl Write) -> io::Result<u64> {
        let mut chunk = vec![0u8; COPY_CHUNK];
        let start = self.pos;
        while self.pos < self.end {
            let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
            let piece = chunk.get_mut(..left.min(COPY_CHUNK)).unwrap_or_default();
            self.file.read_exact_at(piece, self.pos)?;
            w.write_all(piece)?;
            self.pos += piece.len() as u64;
        }
        Ok(self.pos - start)
    }

    /// The next at most `max` bytes; `None` at the end.
    pub async fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, SpoolError> {
        let left = self.end.saturating_sub(self.pos);
        if left == 0 {
            return Ok(None);
        }
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(max.max(1));
        if n <= INLINE_READ {
            // A small piece of a message written moments ago comes from the page cache: one
            // `pread` here is cheaper than the two thread hand-overs of a blocking task.
            let mut buf = vec![0; n];
            self.file
                .read_exact_at(&mut buf, self.pos)
                .map_err(io_err(&self.path))?;
            self.pos += n as u64;
            return Ok(Some(buf));
        }
        let (file, path, at) = (self.file.clone(), self.path.clone(), self.pos);
        let piece = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; n];
            file.read_exact_at(&mut buf, at).map_err(io_err(&path))?;
            Ok::<_, SpoolError>(buf)
        })
        .await
        .map_err(|_| SpoolError::Gone)??;
        self.pos += n as u64;
        Ok(Some(piece))
    }
}

/// Reads `f` to its end in `chunk`-sized pieces, handing each to `each`; returns the bytes read.
fn copy_file(
    f: &mut File,
    chunk: &mut [u8],
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = match f.read(chunk) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        each(chunk.get(..n).unwrap_or_default())?;
        total += n as u64;
    }
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    file: File,
    size: u64,
    index: Arc<Mutex<Index>>,
    handles: Handles,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            let mut bytes = 0usize;
            while bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(j) => {
                        bytes += j.record.body.len() + j.record.head.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            let result = self.write_batch(&jobs);
            for j in jobs {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(SpoolError::Io {
                        path: seg_path(&self.dir, self.active()),
                        source: io::Error::new(e.kind(), e.to_string()),
                    }),
                };
                if r.is_ok()
                    && let Some(p) = &j.record.spill
                {
                    let _ = fs::remove_file(p);
                }
                let _ = j.reply.send(r);
            }
        }
    }

    fn active(&self) -> u64 {
        self.index.lock().map(|i| i.active).unwrap_or(0)
    }

    fn write_batch(&mut self, jobs: &[Job]) -> io::Result<()> {
        if self.size >= SEGMENT_BYTES {
            self.rotate()?;
        }
        let seg = self.active();
        match self.write_records(jobs, seg) {
            Ok((placed, compacted)) => {
                self.place(jobs, placed, compacted);
                self.delete_dead_segments();
                Ok(())
            }
            Err(e) => {
                // Whatever part of the batch reached the file is a torn tail: start afresh.
                self.size = SEGMENT_BYTES;
                Err(e)
            }
        }
    }

    /// Appends the batch's records (spilled bodies copied from their files in pieces, the
    /// rest gathered into one write) and syncs the segment; returns where the messages are.
    #[allow(clippy::type_complexity)]
    fn write_records(
        &mut self,
        jobs: &[Job],
        seg: u64,
    ) -> io::Result<(Vec<(usize, Option<Loc>)>, Vec<(String, Loc)>)> {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut placed: Vec<(usize, Option<Loc>)> = Vec::with_capacity(jobs.len());
        for (i, j) in jobs.iter().enumerate() {
            let r = &j.record;
            let (rec, body_off, rec_len) = match &r.spill {
                Some(spill) => {
                    // Write what was gathered, then stream the spilled record behind it.
                    self.file.write_all(&buf)?;
                    self.size += buf.len() as u64;
                    buf.clear();
                    let rec = self.size;
                    let (body_off, rec_len) = self.copy_spilled(r, spill)?;
                    self.size += rec_len;
                    (rec, body_off, rec_len)
                }
                None => {
                    let rec = self.size + buf.len() as u64;
                    let parts = RecordParts {
                        kind: r.kind,
                        id: &r.id,
                        head: &r.head,
                        body: &[&r.body],
                    };
                    let (body_off, rec_len) = encode(&mut buf, parts);
                    (rec, body_off, rec_len)
                }
            };
            let loc = (r.kind == KIND_MESSAGE).then(|| Loc {
                seg,
                rec,
                rec_len,
                body_off: rec + body_off,
                body_len: rec_len - body_off,
                state: None,
            });
            placed.push((i, loc));
        }
        let compacted = self.compact_into(&mut buf, seg);
        self.file.write_all(&buf)?;
        if jobs.iter().any(|j| j.sync) || !compacted.is_empty() {
            self.file.sync_data()?;
        }
        self.size += buf.len() as u64;
        Ok((placed, compacted))
    }

    /// Writes a record whose body starts in a spill file: the file is read twice in
    /// [`COPY_CHUNK`] pieces (checksum, then copy), so a large message is never held whole.
    /// Returns (body offset in the record, record length).
    fn copy_spilled(&mut self, r: &Record, spill: &Path) -> io::Result<(u64, u64)> {
        let mut f = File::open(spill)?;
        let spilled = f.metadata()?.len();
        let body_len = spilled + r.body.len() as u64;
        let mut prefix = RecordPrefix::new(r.kind, &r.id, &r.head, body_len);
        let mut chunk = vec![0u8; COPY_CHUNK];
        let hashed = copy_file(&mut f, &mut chunk, |piece| {
            prefix.hash_body(piece);
            Ok(())
        })?;
        prefix.hash_body(&r.body);
        let body_off = prefix.len();
        self.file.write_all(&prefix.finish())?;
        f.seek(io::SeekFrom::Start(0))?;
        let file = &mut self.file;
        let copied = copy_file(&mut f, &mut chunk, |piece| file.write_all(piece))?;
        if copied != spilled || hashed != spilled {
            return Err(io::Error::other("spill file changed while it was copied"));
        }
        self.file.write_all(&r.body)?;
        Ok((body_off, body_off + body_len))
    }

    /// Records where the batch's messages are, once it is durable.
    fn place(
        &mut self,
        jobs: &[Job],
        placed: Vec<(usize, Option<Loc>)>,
        compacted: Vec<(String, Loc)>,
    ) {
        if let Ok(mut index) = self.index.lock() {
            for (id, loc) in compacted {
                index.add(&id, loc);
            }
            for (i, loc) in placed {
                let Some(j) = jobs.get(i) else { continue };
                let id = &j.record.id;
                match (j.record.kind, loc) {
                    (KIND_MESSAGE, Some(loc)) => index.add(id, loc),
                    (KIND_STATE, _) => {
                        if let Some(l) = index.live.get_mut(id) {
                            l.state = Some(j.record.head.clone());
                        }
                    }
                    _ => index.done(id),
                }
            }
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        let next = self.active() + 1;
        let path = seg_path(&self.dir, next);
        self.file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        File::open(&self.dir)?.sync_all()?;
        self.size = 0;
        if let Ok(mut i) = self.index.lock() {
            i.active = next;
            i.seg_live.insert(next, 0);
        }
        Ok(())
    }

    /// Copies the few live messages of the oldest segment forward when it pins the log.
    fn compact_into(&self, buf: &mut Vec<u8>, seg: u64) -> Vec<(String, Loc)> {
        let Ok(index) = self.index.lock() else {
            return Vec::new();
        };
        let Some((&oldest, &live)) = index.seg_live.iter().next() else {
            return Vec::new();
        };
        if oldest == index.active || index.seg_live.len() < 4 || live == 0 || live > COMPACT_LIVE {
            return Vec::new();
        }
        let movers: Vec<(String, Loc)> = index
            .live
            .iter()
            .filter(|(_, l)| l.seg == oldest)
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        drop(index);
        let Ok(old) = File::open(seg_path(&self.dir, oldest)) else {
            return Vec::new();
        };
        let mut moved = Vec::new();
        for (id, l) in movers {
            // A large message is left where it is (its segment waits for it): copying it
            // forward would hold it whole in memory.
            let Some(len) = usize::try_from(l.rec_len)
                .ok()
                .filter(|&n| n <= COMPACT_MAX_RECORD)
            else {
                continue;
            };
            let mut rec = vec![0u8; len];
            if old.read_exact_at(&mut rec, l.rec).is_err() {
                continue;
            }
            let at = self.size + buf.len() as u64;
            buf.extend_from_slice(&rec);
            let mut loc = Loc {
                seg,
                rec: at,
                rec_len: l.rec_len,
                body_off: at + (l.body_off - l.rec),
                body_len: l.body_len,
                state: l.state.clone(),
            };
            if let Some(st) = &l.state {
                encode(
                    buf,
                    RecordParts {
                        kind: KIND_STATE,
                        id: &id,
                        head: st,
                        body: &[],
                    },
                );
            }
            loc.state = l.state;
            moved.push((id, loc));
        }
        if !moved.is_empty() {
            tracing::info!(
                segment = oldest,
                messages = moved.len(),
                "queue segment compacted"
            );
        }
        moved
    }

    /// Deletes segments oldest first while they hold no live message (never the active one).
    fn delete_dead_segments(&mut self) {
        let mut deleted = false;
        loop {
            let victim = {
                let Ok(mut index) = self.index.lock() else {
                    return;
                };
                match index.seg_live.iter().next() {
                    Some((&seg, &0)) if seg != index.active => {
                        index.seg_live.remove(&seg);
                        seg
                    }
                    _ => break,
                }
            };
            if let Ok(mut h) = self.handles.lock() {
                h.remove(&victim);
            }
            let _ = fs::remove_file(seg_path(&self.dir, victim));
            deleted = true;
        }
        if deleted {
            let _ = File::open(&self.dir).and_then(|d| d.sync_all());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealgate_core::delivery::{Source, Status};

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sg-spool-{tag}-{}-{}",
            std::process::id(),
            unix_now()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn env(rcpts: &[&str]) -> Envelope {
        Envelope {
            mail_from: "a@b.test".into(),
            rcpt_to: rcpts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_removal_of_a_delivered_message_is_written_and_synced_by_the_next_commit() {
        let dir = tempdir("lazy");
        let (spool, _) = Spool::open(&dir, 0).unwrap();
        let a = spool
            .commit(spool.begin(b"a\r\n".to_vec()), &env(&["x@y.test"]))
            .await
            .unwrap();
        spool.remove_delivered(&a.id).await.unwrap();
        let b = spool
            .commit(spool.begin(b"b\r\n".to_vec()), &env(&["x@y.test"]))
            .await
            .unwrap();
        drop(spool);
        let (_spool, msgs) = Spool::open(&dir, 0).unwrap();
        let ids: Vec<_> = msgs.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, [b.id.as_str()], "a is gone, b is kept");
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn commit_recover_state_remove() {
        let dir = tempdir("crr");
        let (spool, msgs) = Spool::open(&dir, 0).unwrap();
        assert!(msgs.is_empty());
        let mut sink = spool.begin(b"Received: x\r\n".to_vec());
        sink.append(b"Subject: hi\r\n\r\nbody\r\n".to_vec())
            .await
            .unwrap();
        let mut m = spool
            .commit(sink, &env(&["x@y.test", "z@y.test"]))
            .await
            .unwrap();
        let status = |t: &str| Status::parse(Source::Remote, t).unwrap();
        m.recipients[0].status = RcptStatus::Delivered(status("250 2.0.0 ok"));
        m.recipients[1].last_error = Some(status("451 later"));
        m.attempts = 1;
        m.next_attempt = 42;
        spool.save_state(&m).await.unwrap();
        drop(spool);

        let (spool, msgs) = Spool::open(&dir, 0).unwrap();
        assert_eq!(msgs.len(), 1);
        let r = &msgs[0];
        assert_eq!(r.id, m.id);
        assert_eq!(r.recipients, m.recipients);
        assert_eq!((r.attempts, r.next_attempt), (1, 42));
        let body = spool.read_message(&r.id).await.unwrap();
        assert_eq!(body, b"Received: x\r\nSubject: hi\r\n\r\nbody\r\n");
        spool.remove(&r.id).await.unwrap();
        drop(spool);
        let (_spool, msgs) = Spool::open(&dir, 0).unwrap();
        assert!(msgs.is_empty());
        // Only the fresh active segment is left: finished segments were deleted.
        assert_eq!(segments(&dir).unwrap().len(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn large_bodies_spill_and_uncommitted_ones_vanish() {
        let dir = tempdir("spill");
        let (spool, _) = Spool::open(&dir, 0).unwrap();
        let big = vec![b'x'; SPILL_BYTES + 10];
        let mut sink = spool.begin(Vec::new());
        sink.append(big.clone()).await.unwrap();
        sink.append(b"tail".to_vec()).await.unwrap();
        let m = spool.commit(sink, &env(&["x@y.test"])).await.unwrap();
        let mut want = big;
        want.extend_from_slice(b"tail");
        assert_eq!(spool.read_message(&m.id).await.unwrap(), want);
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);

        let mut abandoned = spool.begin(Vec::new());
        abandoned.append(vec![b'y'; SPILL_BYTES + 1]).await.unwrap();
        assert!(dir.join("tmp").join(abandoned.id()).exists());
        drop(abandoned);
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A crash can cut the log anywhere: every prefix of the segment recovers exactly the
    /// records that are complete in it, and never anything damaged.
    #[tokio::test]
    async fn every_torn_tail_recovers_a_prefix() {
        let dir = tempdir("torn");
        let (spool, _) = Spool::open(&dir, 0).unwrap();
        let mut ids = Vec::new();
        for i in 0..3 {
            let mut s = spool.begin(Vec::new());
            s.append(format!("Subject: {i}\r\n\r\nbody {i}\r\n").into_bytes())
                .await
                .unwrap();
            ids.push(spool.commit(s, &env(&["x@y.test"])).await.unwrap().id);
        }
        spool.remove(&ids[1]).await.unwrap();
        drop(spool);
        let seg = *segments(&dir).unwrap().last().unwrap();
        let full = fs::read(seg_path(&dir, seg)).unwrap();
        let cut_dir = tempdir("torn-cut");
        fs::create_dir_all(&cut_dir).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for cut in 0..=full.len() {
            fs::write(seg_path(&cut_dir, 1), &full[..cut]).unwrap();
            let got: Vec<String> = scan(&cut_dir).unwrap().into_iter().map(|m| m.id).collect();
            // Messages appear in order; the second disappears once its `done` is complete.
            assert!(got.iter().all(|id| ids.contains(id)), "cut {cut}: {got:?}");
            seen.insert(got);
        }
        let want: Vec<String> = vec![ids[0].clone(), ids[2].clone()];
        assert!(seen.contains(&want), "{seen:?}");
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&cut_dir);
    }

    #[tokio::test]
    async fn flipped_byte_is_detected() {
        let dir = tempdir("flip");
        let (spool, _) = Spool::open(&dir, 0).unwrap();
        let mut s = spool.begin(Vec::new());
        s.append(b"Subject: x\r\n\r\nbody\r\n".to_vec())
            .await
            .unwrap();
        spool.commit(s, &env(&["x@y.test"])).await.unwrap();
        drop(spool);
        let seg = *segments(&dir).unwrap().last().unwrap();
        let path = seg_path(&dir, seg);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        assert!(scan(&dir).unwrap().is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn long_lived_messages_are_compacted_forward() {
        let dir = tempdir("compact");
        let (spool, _) = Spool::open(&dir, 0).unwrap();
        let mut s = spool.begin(Vec::new());
        s.append(b"Subject: keep\r\n\r\nkeep\r\n".to_vec())
            .await
            .unwrap();
        let keep = spool.commit(s, &env(&["x@y.test"])).await.unwrap();
        let mut st = keep.clone();
        st.attempts = 7;
        spool.save_state(&st).await.unwrap();
        // Fill several segments with messages that finish at once.
        let chunk = vec![b'z'; 1024 * 1024];
        for _ in 0..(SEGMENT_BYTES / (1024 * 1024) * 5) {
            let mut s = spool.begin(Vec::new());
            s.append(chunk.clone()).await.unwrap();
            let m = spool.commit(s, &env(&["x@y.test"])).await.unwrap();
            spool.remove(&m.id).await.unwrap();
        }
        let segs = segments(&dir).unwrap();
        assert!(segs.len() <= 4, "old segments were not reclaimed: {segs:?}");
        assert_eq!(
            spool.read_message(&keep.id).await.unwrap(),
            b"Subject: keep\r\n\r\nkeep\r\n"
        );
        drop(spool);
        let msgs = scan(&dir).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            (msgs[0].id.as_str(), msgs[0].attempts),
            (keep.id.as_str(), 7)
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
