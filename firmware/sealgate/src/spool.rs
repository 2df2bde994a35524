//! The durable queue: a message is acknowledged only once it and its envelope are on stable
//! storage, and every later state change is atomic.
//!
//! Layout under the state directory:
//! - `queue/tmp/ID`   a message being received (never acknowledged; removed at start-up)
//! - `queue/ID`       a committed message: `[message bytes][envelope trailer][tail]`
//! - `queue/ID.st`    its delivery state (attempts, next attempt, per-recipient results),
//!   replaced atomically by write-new + fsync + rename
//!
//! Commit of a message: write `tmp/ID`, `fdatasync`, rename to `queue/ID`, fsync `queue/`.
//! Directory fsyncs of concurrent sessions are shared (group commit, [`DirSync`]).
//! The tail is 16 bytes: body length (u64 LE), trailer length (u32 LE), magic `SGQ1`.
//!
//! Architecture invariant: a `250` is sent only after [`Spool::commit`] returned `Ok`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sealgate_proto::{BodyType, Envelope};
use tokio::sync::{mpsc, oneshot};

const MAGIC: &[u8; 4] = b"SGQ1";
const TAIL_LEN: usize = 16;
/// Bodies up to this size stay in memory until commit; larger ones spill to `tmp/`.
const SPILL_BYTES: usize = 512 * 1024;
/// Largest envelope trailer accepted when reading (100k recipients of 256 octets fit).
const MAX_TRAILER: u32 = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("queue file {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: &'static str },
    #[error("not enough free space in the spool")]
    NoSpace,
    #[error("envelope address contains a control character")]
    BadAddress,
    #[error("spool worker is gone")]
    Gone,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Delivery status of one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptStatus {
    Pending,
    Delivered(String),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub address: String,
    pub status: RcptStatus,
    /// The last temporary failure, for logs, queue listings and delay DSNs.
    pub last_error: Option<String>,
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

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Shares one directory fsync among every commit that is waiting for one (group commit).
#[derive(Debug, Clone)]
struct DirSync {
    tx: mpsc::UnboundedSender<oneshot::Sender<Result<(), Arc<io::Error>>>>,
}

impl DirSync {
    fn start(dir: PathBuf) -> DirSync {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), Arc<io::Error>>>>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiters = vec![first];
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let d = dir.clone();
                let res = tokio::task::spawn_blocking(move || File::open(&d)?.sync_all())
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
                    .map_err(Arc::new);
                for w in waiters {
                    let _ = w.send(res.clone());
                }
            }
        });
        DirSync { tx }
    }

    async fn sync(&self, dir: &Path) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| SpoolError::Gone)?;
        rx.await
            .map_err(|_| SpoolError::Gone)?
            .map_err(|e| SpoolError::Io {
                path: dir.to_path_buf(),
                source: io::Error::new(e.kind(), e.to_string()),
            })
    }
}

/// The queue directory and its writers.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    tmp: PathBuf,
    dirsync: DirSync,
    seq: AtomicU64,
    min_free: u64,
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
        // An abandoned message (client gone mid-DATA, refused, or failed commit).
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn create_new(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))
}

fn check_addr(a: &str) -> Result<(), SpoolError> {
    if a.bytes().any(|b| b < 0x20 || b == 0x7f) || a.len() > 1024 {
        Err(SpoolError::BadAddress)
    } else {
        Ok(())
    }
}

fn encode_trailer(m: &QueuedMessage) -> Vec<u8> {
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

impl Spool {
    /// Opens (creating) `dir`, removes unacknowledged leftovers and returns the queue content.
    pub fn open(dir: &Path, min_free: u64) -> Result<(Spool, Vec<QueuedMessage>), SpoolError> {
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            let _ = fs::remove_file(e.path());
        }
        let mut messages = Vec::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if path.is_dir() {
                continue;
            }
            if let Some(stem) = name.strip_suffix(".st") {
                if !dir.join(stem).exists() {
                    let _ = fs::remove_file(&path); // finished message whose state outlived it
                }
                continue;
            }
            if name.ends_with(".damaged") {
                continue;
            }
            if name.contains('.') {
                let _ = fs::remove_file(&path); // a state file being written when we stopped
                continue;
            }
            match read_queued(dir, &name) {
                Ok(m) => messages.push(m),
                Err(e) => {
                    // Keep the evidence, out of the way; never deliver half a message.
                    tracing::error!(error = %e, "queue file damaged, moved aside");
                    let _ = fs::rename(&path, dir.join(format!("{name}.damaged")));
                }
            }
        }
        messages.sort_by(|a, b| a.id.cmp(&b.id));
        let spool = Spool {
            dirsync: DirSync::start(dir.to_path_buf()),
            dir: dir.to_path_buf(),
            tmp,
            seq: AtomicU64::new(0),
            min_free,
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
        let mut data = std::mem::take(&mut sink.mem);
        let trailer = encode_trailer(&msg);
        data.extend_from_slice(&trailer);
        data.extend_from_slice(&sink.len.to_le_bytes());
        data.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        data.extend_from_slice(MAGIC);
        let file = sink.file.take();
        let tmp_path = sink.path.clone();
        let final_path = self.dir.join(&sink.id);
        tokio::task::spawn_blocking(move || {
            let mut f = match file {
                Some(f) => f,
                None => create_new(&tmp_path)?,
            };
            let res = f
                .write_all(&data)
                .and_then(|_| f.sync_data())
                .and_then(|_| fs::rename(&tmp_path, &final_path));
            if let Err(e) = res {
                let _ = fs::remove_file(&tmp_path);
                return Err(if e.kind() == io::ErrorKind::StorageFull {
                    SpoolError::NoSpace
                } else {
                    SpoolError::Io {
                        path: tmp_path,
                        source: e,
                    }
                });
            }
            Ok(())
        })
        .await
        .map_err(|_| SpoolError::Gone)??;
        self.dirsync.sync(&self.dir).await?;
        Ok(msg)
    }

    /// The message bytes (headers + body) of a queued message.
    pub async fn read_message(&self, id: &str) -> Result<Vec<u8>, SpoolError> {
        let path = self.dir.join(id);
        tokio::task::spawn_blocking(move || {
            let mut f = File::open(&path).map_err(io_err(&path))?;
            let (body_len, _) = read_tail(&mut f, &path)?;
            let mut buf = vec![0; usize::try_from(body_len).map_err(|_| damaged(&path, "size"))?];
            f.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
            f.read_exact(&mut buf).map_err(io_err(&path))?;
            Ok(buf)
        })
        .await
        .map_err(|_| SpoolError::Gone)?
    }

    /// Atomically replaces the message's delivery state.
    pub async fn save_state(&self, m: &QueuedMessage) -> Result<(), SpoolError> {
        let mut s = format!("SGS1\nattempts {}\nnext {}\n", m.attempts, m.next_attempt);
        for (i, r) in m.recipients.iter().enumerate() {
            let (kind, text) = match &r.status {
                RcptStatus::Pending => match &r.last_error {
                    Some(e) => ("deferred", e.as_str()),
                    None => continue,
                },
                RcptStatus::Delivered(t) => ("delivered", t.as_str()),
                RcptStatus::Failed(t) => ("failed", t.as_str()),
            };
            let text: String = text.chars().filter(|c| !c.is_control()).take(900).collect();
            s.push_str(&format!("{i} {kind} {text}\n"));
        }
        let path = self.dir.join(format!("{}.st", m.id));
        let tmp = self.dir.join(format!("{}.st.new", m.id));
        tokio::task::spawn_blocking(move || {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(s.as_bytes())
                .and_then(|_| f.sync_data())
                .and_then(|_| fs::rename(&tmp, &path))
                .map_err(io_err(&path))
        })
        .await
        .map_err(|_| SpoolError::Gone)??;
        self.dirsync.sync(&self.dir).await
    }

    /// Removes a finished message (every recipient delivered or failed for good).
    pub async fn remove(&self, id: &str) -> Result<(), SpoolError> {
        let msg = self.dir.join(id);
        let st = self.dir.join(format!("{id}.st"));
        tokio::task::spawn_blocking(move || {
            fs::remove_file(&msg).map_err(io_err(&msg))?;
            let _ = fs::remove_file(&st);
            Ok::<_, SpoolError>(())
        })
        .await
        .map_err(|_| SpoolError::Gone)??;
        self.dirsync.sync(&self.dir).await
    }
}

fn damaged(path: &Path, reason: &'static str) -> SpoolError {
    SpoolError::Damaged {
        path: path.to_path_buf(),
        reason,
    }
}

fn read_tail(f: &mut File, path: &Path) -> Result<(u64, u32), SpoolError> {
    let len = f.metadata().map_err(io_err(path))?.len();
    if len < TAIL_LEN as u64 {
        return Err(damaged(path, "shorter than its tail"));
    }
    let mut tail = [0u8; TAIL_LEN];
    f.seek(SeekFrom::End(-(TAIL_LEN as i64)))
        .map_err(io_err(path))?;
    f.read_exact(&mut tail).map_err(io_err(path))?;
    let (body, rest) = tail.split_at(8);
    let (tlen, magic) = rest.split_at(4);
    if magic != MAGIC {
        return Err(damaged(path, "bad magic"));
    }
    let body_len = u64::from_le_bytes(body.try_into().map_err(|_| damaged(path, "tail"))?);
    let trailer_len = u32::from_le_bytes(tlen.try_into().map_err(|_| damaged(path, "tail"))?);
    if trailer_len > MAX_TRAILER || body_len + u64::from(trailer_len) + TAIL_LEN as u64 != len {
        return Err(damaged(path, "lengths do not add up"));
    }
    Ok((body_len, trailer_len))
}

fn read_queued(dir: &Path, id: &str) -> Result<QueuedMessage, SpoolError> {
    let path = dir.join(id);
    let mut f = File::open(&path).map_err(io_err(&path))?;
    let (body_len, trailer_len) = read_tail(&mut f, &path)?;
    let mut trailer = vec![0u8; trailer_len as usize];
    f.seek(SeekFrom::Start(body_len)).map_err(io_err(&path))?;
    f.read_exact(&mut trailer).map_err(io_err(&path))?;
    let text = String::from_utf8(trailer).map_err(|_| damaged(&path, "trailer not UTF-8"))?;
    let mut m = QueuedMessage {
        id: id.to_string(),
        mail_from: String::new(),
        recipients: Vec::new(),
        body_type: BodyType::SevenBit,
        smtputf8: false,
        arrival: 0,
        size: body_len,
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
            "arrival" => m.arrival = v.parse().map_err(|_| damaged(&path, "arrival"))?,
            "body" => {
                m.body_type = if v == "8bitmime" {
                    BodyType::EightBitMime
                } else {
                    BodyType::SevenBit
                }
            }
            "smtputf8" => m.smtputf8 = v == "1",
            _ => return Err(damaged(&path, "unknown trailer field")),
        }
    }
    if !have_from || m.recipients.is_empty() {
        return Err(damaged(&path, "trailer lacks sender or recipients"));
    }
    m.next_attempt = m.arrival;
    let st = dir.join(format!("{id}.st"));
    match fs::read_to_string(&st) {
        Ok(s) => apply_state(&mut m, &s).map_err(|r| damaged(&st, r))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&st)(e)),
    }
    Ok(m)
}

fn apply_state(m: &mut QueuedMessage, s: &str) -> Result<(), &'static str> {
    let mut lines = s.lines();
    if lines.next() != Some("SGS1") {
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
                match kind {
                    "delivered" => r.status = RcptStatus::Delivered(text.into()),
                    "failed" => r.status = RcptStatus::Failed(text.into()),
                    "deferred" => r.last_error = Some(text.into()),
                    _ => return Err("recipient state"),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        m.recipients[0].status = RcptStatus::Delivered("250 ok".into());
        m.recipients[1].last_error = Some("451 later".into());
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
        assert!(Spool::open(&dir, 0).unwrap().1.is_empty());
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

        let mut abandoned = spool.begin(Vec::new());
        abandoned.append(vec![b'y'; SPILL_BYTES + 1]).await.unwrap();
        assert!(dir.join("tmp").join(abandoned.id()).exists());
        drop(abandoned);
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn damaged_files_are_set_aside_and_leftovers_cleaned() {
        let dir = tempdir("dmg");
        fs::create_dir_all(dir.join("tmp")).unwrap();
        fs::write(dir.join("tmp").join("HALF"), b"partial").unwrap();
        fs::write(dir.join("BROKEN"), b"no tail here at all").unwrap();
        let (_s, msgs) = Spool::open(&dir, 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(msgs.is_empty());
        assert!(dir.join("BROKEN.damaged").exists());
        assert!(!dir.join("tmp").join("HALF").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
