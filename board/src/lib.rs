//! Board support: where state lives on this board, its identity, and storage facts.
//!
//! The dev board (used by the embedded default and the tests) keeps everything under one
//! state directory. The sealed store, the board secret and the QEMU board come later; they
//! plug in behind [`Board`].

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// Errors of board support, each naming the path and what failed.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open lock file {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("another sealgate already runs with state directory {0} (lock held)")]
    Busy(PathBuf),
}

/// What the daemon needs from the board it runs on.
pub trait Board: Send + Sync {
    /// Serial number that config blobs and updates are bound to.
    fn serial(&self) -> &str;
    /// Root of the writable state (spool, peer table, generated certificates).
    fn state_dir(&self) -> &Path;
}

/// The development board: a state directory on the host, locked against a second daemon.
#[derive(Debug)]
pub struct DevBoard {
    root: PathBuf,
    serial: String,
    _lock: File,
}

impl DevBoard {
    /// Creates `root` if needed and takes its exclusive lock for the life of the process.
    pub fn open(root: &Path) -> Result<Self, BoardError> {
        fs::create_dir_all(root).map_err(|source| BoardError::CreateDir {
            path: root.to_path_buf(),
            source,
        })?;
        let root = root
            .canonicalize()
            .map_err(|source| BoardError::CreateDir {
                path: root.to_path_buf(),
                source,
            })?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| BoardError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(BoardError::Busy(root)),
            Err(fs::TryLockError::Error(source)) => {
                return Err(BoardError::Lock {
                    path: lock_path,
                    source,
                });
            }
        }
        Ok(DevBoard {
            root,
            serial: "DEV-0000".into(),
            _lock: lock,
        })
    }
}

impl Board for DevBoard {
    fn serial(&self) -> &str {
        &self.serial
    }
    fn state_dir(&self) -> &Path {
        &self.root
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_while_first_holds_the_lock() {
        let dir = std::env::temp_dir().join(format!("sg-board-{}", std::process::id()));
        let first = DevBoard::open(&dir).expect("first open");
        assert!(matches!(DevBoard::open(&dir), Err(BoardError::Busy(_))));
        drop(first);
        assert!(DevBoard::open(&dir).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn free_bytes_of_tmp_is_positive() {
        assert!(free_bytes(&std::env::temp_dir()).expect("statvfs") > 0);
    }
}
