//! Local delivery into Maildirs: `tmp/NAME` written and fdatasync'ed, renamed into `new/`, and
//! `new/` fsync'ed — one directory fsync shared by every delivery waiting for it (group commit).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), Arc<io::Error>>>;

/// Shares one fsync of a directory among all callers waiting for one.
#[derive(Debug, Clone)]
struct DirSync {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl DirSync {
    fn start(dir: PathBuf) -> DirSync {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
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

    async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .map_err(|_| io::Error::other("directory sync task is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("directory sync task is gone"))?
            .map_err(|e| io::Error::new(e.kind(), e.to_string()))
    }
}

/// The Maildirs this daemon delivers into.
#[derive(Debug, Default)]
pub struct Maildirs {
    /// Maildirs whose `tmp/`, `new/`, `cur/` are known to exist.
    prepared: Mutex<HashSet<PathBuf>>,
    syncs: Mutex<HashMap<PathBuf, DirSync>>,
}

impl Maildirs {
    /// Delivers a message as `NAME` into the Maildir `dir`, its bytes written by `content`
    /// (off the async threads, in pieces: nothing needs the message whole); durable when it
    /// returns `Ok`.
    pub async fn deliver<F>(&self, dir: &Path, name: String, content: F) -> io::Result<()>
    where
        F: FnOnce(&mut File) -> io::Result<()> + Send + 'static,
    {
        let prepared = self.prepared.lock().is_ok_and(|p| p.contains(dir));
        let d = dir.to_path_buf();
        let res = tokio::task::spawn_blocking(move || write(&d, &name, content, !prepared))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        if let Ok(mut p) = self.prepared.lock() {
            // Forget the directory on failure: it may have been removed under us.
            if res.is_ok() {
                p.insert(dir.to_path_buf());
            } else {
                p.remove(dir);
            }
        }
        res?;
        let sync = {
            let mut syncs = self
                .syncs
                .lock()
                .map_err(|_| io::Error::other("maildir lock poisoned"))?;
            syncs
                .entry(dir.to_path_buf())
                .or_insert_with(|| DirSync::start(dir.join("new")))
                .clone()
        };
        sync.sync().await
    }
}

fn write(
    dir: &Path,
    name: &str,
    content: impl FnOnce(&mut File) -> io::Result<()>,
    prepare: bool,
) -> io::Result<()> {
    if prepare {
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(dir.join(sub))?;
        }
    }
    let tmp = dir.join("tmp").join(name);
    let mut f = File::create(&tmp)?;
    if let Err(e) = content(&mut f).and_then(|()| f.sync_data()) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, dir.join("new").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn delivers_and_recreates_a_removed_maildir() {
        let dir = std::env::temp_dir().join(format!("sg-maildir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let m = Maildirs::default();
        m.deliver(&dir, "one".into(), |f| f.write_all(b"hello"))
            .await
            .unwrap();
        assert_eq!(fs::read(dir.join("new/one")).unwrap(), b"hello");
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            m.deliver(&dir, "two".into(), |f| f.write_all(b"x"))
                .await
                .is_err()
        );
        m.deliver(&dir, "three".into(), |f| f.write_all(b"y"))
            .await
            .unwrap();
        assert_eq!(fs::read(dir.join("new/three")).unwrap(), b"y");
        let _ = fs::remove_dir_all(&dir);
    }
}
