//! Board support: where state lives on this board, its identity, its secret, and storage facts.
//!
//! A board gives the daemon four things ([`Board`]): a serial number (what config blobs and
//! updates are bound to), a locked state directory, a **board secret** of at least 32 bytes
//! that never lies inside the state directory it protects, and the directory of the sealed
//! store (`<state>/sealed`; the store itself is `sealgate::sealed`).
//!
//! - [`DevBoard`]: the development board. The secret is a file *beside* the state directory
//!   (`<state>.board-secret`, or the path in `SEALGATE_BOARD_SECRET`), created on first open
//!   with 32 random bytes and mode 0400, and refused when it is short or group/other
//!   accessible. Its serial is `DEV-` and the first 4 bytes of SHA-256(secret) in upper-case hex,
//!   so two dev boards differ.
//! - [`QemuBoard`]: the virtual appliance. QEMU hands secret and serial in through `fw_cfg`
//!   (`-fw_cfg name=opt/sealgate/secret,file=…` and `…/serial`), which the guest's `qemu_fw_cfg`
//!   driver shows as files under `/sys/firmware/qemu_fw_cfg/by_name`.
//! - Real hardware (TPM/OTP) will be a third implementation of the same trait.
//!
//! Every board holds the state directory's exclusive lock ([`StateLock`]) for its life, so
//! only one daemon (or one offline `sealctl`) writes a state directory at a time.
//!
//! [`appliance`] has the helpers of the appliance image (partitions by label, mounts, the
//! watchdog, reboot) and [`loader`] the stage-1 loader that boots a verified slot.

pub mod appliance;
pub mod loader;
mod sys;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Environment variable naming the dev board's secret file (overrides `<state>.board-secret`).
pub const SECRET_ENV: &str = "SEALGATE_BOARD_SECRET";
/// Fewest bytes a board secret may have.
pub const MIN_SECRET_LEN: usize = 32;
/// Most bytes a board secret may have (a bound on what is read, nothing more).
pub const MAX_SECRET_LEN: usize = 4096;
/// Bytes of a new dev board secret.
pub const NEW_SECRET_LEN: usize = 32;
/// Longest serial number accepted from a board.
pub const MAX_SERIAL_LEN: usize = 64;
/// Where the guest kernel's `qemu_fw_cfg` driver lists fw_cfg files by name.
pub const DEFAULT_FW_CFG_DIR: &str = "/sys/firmware/qemu_fw_cfg/by_name";
/// fw_cfg file (below the fw_cfg directory) holding the QEMU board's secret.
pub const FW_CFG_SECRET: &str = "opt/sealgate/secret/raw";
/// fw_cfg file (below the fw_cfg directory) holding the QEMU board's serial.
pub const FW_CFG_SERIAL: &str = "opt/sealgate/serial/raw";

/// Errors of board support, each naming the path and what failed.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("cannot create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open lock file {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("another sealgate already runs with state directory {0} (lock held)")]
    Busy(PathBuf),
    #[error(
        "state directory {0} has no parent directory to hold its board secret beside it; \
         set {SECRET_ENV} to the secret file's path"
    )]
    NoSecretPath(PathBuf),
    #[error("board secret {path}: cannot {op}: {source}")]
    SecretIo {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("board secret {path}: not a regular file")]
    SecretNotFile { path: PathBuf },
    #[error(
        "board secret {path}: mode {mode:04o} lets group or others access it; \
         it must be readable by its owner only (0400)"
    )]
    SecretPermissions { path: PathBuf, mode: u32 },
    #[error("board secret {path}: {len} bytes, at least {MIN_SECRET_LEN} required")]
    SecretTooShort { path: PathBuf, len: usize },
    #[error("board secret {path}: longer than {MAX_SECRET_LEN} bytes")]
    SecretTooLong { path: PathBuf },
    #[error("board serial {path}: cannot read: {source}")]
    SerialIo { path: PathBuf, source: io::Error },
    #[error("board serial {path}: {reason}")]
    BadSerial { path: PathBuf, reason: &'static str },
    #[error(
        "partitions {} not found within {} s{}",
        missing.join(", "),
        waited.as_secs_f32(),
        last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    PartitionsMissing {
        missing: Vec<String>,
        waited: std::time::Duration,
        last_error: Option<String>,
    },
    #[error("cannot mount {what} at {at}: {source}")]
    Mount {
        what: String,
        at: PathBuf,
        source: io::Error,
    },
}

/// What the daemon needs from the board it runs on.
pub trait Board: Send + Sync {
    /// Serial number that config blobs and updates are bound to.
    fn serial(&self) -> &str;
    /// Root of the writable state (spool, peer table, generated certificates).
    fn state_dir(&self) -> &Path;
    /// The board secret (at least [`MIN_SECRET_LEN`] bytes), loaded when the board was opened.
    /// Never stored inside [`Board::state_dir`]; never log it.
    fn secret(&self) -> &[u8];
    /// Directory of the sealed store: `<state_dir>/sealed`.
    fn sealed_dir(&self) -> PathBuf {
        self.state_dir().join("sealed")
    }
}

/// The exclusive lock on a state directory, held until dropped.
#[derive(Debug)]
pub struct StateLock {
    root: PathBuf,
    _file: File,
}

impl StateLock {
    /// Creates `root` if needed and takes its exclusive lock (`<root>/lock`);
    /// [`BoardError::Busy`] when another process holds it.
    pub fn acquire(root: &Path) -> Result<Self, BoardError> {
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
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| BoardError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(BoardError::Busy(root)),
            Err(fs::TryLockError::Error(source)) => {
                return Err(BoardError::Lock {
                    path: lock_path,
                    source,
                });
            }
        }
        Ok(StateLock { root, _file: file })
    }

    /// The state directory (canonical path).
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The development board: a state directory on the host, locked against a second daemon, and
/// a secret file beside it.
pub struct DevBoard {
    lock: StateLock,
    serial: String,
    secret: Zeroizing<Vec<u8>>,
    secret_path: PathBuf,
}

impl fmt::Debug for DevBoard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevBoard")
            .field("root", &self.lock.root)
            .field("serial", &self.serial)
            .field("secret_path", &self.secret_path)
            .finish_non_exhaustive()
    }
}

impl DevBoard {
    /// Creates `root` if needed, takes its exclusive lock for the life of the board, and loads
    /// (on first open: creates) the board secret from `$SEALGATE_BOARD_SECRET` or
    /// `<root>.board-secret`.
    pub fn open(root: &Path) -> Result<Self, BoardError> {
        let lock = StateLock::acquire(root)?;
        let path = secret_path(lock.root(), std::env::var_os(SECRET_ENV).as_deref())?;
        Self::with_lock(lock, path)
    }

    /// [`DevBoard::open`] with the secret file given explicitly (tests, tools).
    pub fn open_with_secret(root: &Path, secret_file: &Path) -> Result<Self, BoardError> {
        let lock = StateLock::acquire(root)?;
        Self::with_lock(lock, secret_file.to_path_buf())
    }

    /// Only the state directory's lock, without touching the secret: for tools that edit
    /// plain state (the peer table) while no daemon runs.
    pub fn lock_only(root: &Path) -> Result<StateLock, BoardError> {
        StateLock::acquire(root)
    }

    fn with_lock(lock: StateLock, secret_path: PathBuf) -> Result<Self, BoardError> {
        let secret = load_or_create_dev_secret(&secret_path)?;
        Ok(DevBoard {
            serial: dev_serial(&secret),
            lock,
            secret,
            secret_path,
        })
    }

    /// The file the secret was loaded from.
    pub fn secret_path(&self) -> &Path {
        &self.secret_path
    }
}

impl Board for DevBoard {
    fn serial(&self) -> &str {
        &self.serial
    }
    fn state_dir(&self) -> &Path {
        self.lock.root()
    }
    fn secret(&self) -> &[u8] {
        &self.secret
    }
}

/// The dev board's secret file for state directory `root`: `env` (the value of
/// `SEALGATE_BOARD_SECRET`) when set and not empty, else `<root>.board-secret` beside `root`.
pub fn secret_path(root: &Path, env: Option<&OsStr>) -> Result<PathBuf, BoardError> {
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let (Some(parent), Some(name)) = (root.parent(), root.file_name()) else {
        return Err(BoardError::NoSecretPath(root.to_path_buf()));
    };
    let mut file = OsString::from(name);
    file.push(".board-secret");
    Ok(parent.join(file))
}

/// The dev board's serial: `DEV-` + the first 4 bytes of SHA-256(secret), upper-case hex.
pub fn dev_serial(secret: &[u8]) -> String {
    let d = digest::digest(&digest::SHA256, secret);
    let mut s = String::from("DEV-");
    for b in &d.as_ref()[..4] {
        s.push_str(&format!("{b:02X}"));
    }
    s
}

fn secret_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> BoardError + 'a {
    move |source| BoardError::SecretIo {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Loads the dev secret at `path`, creating it first when absent.
fn load_or_create_dev_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, BoardError> {
    match File::open(path) {
        Ok(f) => read_dev_secret(path, f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_dev_secret(path)?;
            let f = File::open(path).map_err(secret_err(path, "open"))?;
            read_dev_secret(path, f)
        }
        Err(e) => Err(secret_err(path, "open")(e)),
    }
}

/// Checks type and mode of an opened dev secret (of the open file, not the name), then reads it.
fn read_dev_secret(path: &Path, file: File) -> Result<Zeroizing<Vec<u8>>, BoardError> {
    let meta = file.metadata().map_err(secret_err(path, "stat"))?;
    if !meta.is_file() {
        return Err(BoardError::SecretNotFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(BoardError::SecretPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    read_secret(path, file)
}

/// Reads at most [`MAX_SECRET_LEN`] bytes and checks the length bounds.
fn read_secret(path: &Path, file: File) -> Result<Zeroizing<Vec<u8>>, BoardError> {
    // Capacity for the bound + 1 up front, so reading never reallocates (and never leaves a
    // copy of the secret behind in freed memory).
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_SECRET_LEN + 1));
    file.take(MAX_SECRET_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(secret_err(path, "read"))?;
    if buf.len() > MAX_SECRET_LEN {
        return Err(BoardError::SecretTooLong {
            path: path.to_path_buf(),
        });
    }
    if buf.len() < MIN_SECRET_LEN {
        return Err(BoardError::SecretTooShort {
            path: path.to_path_buf(),
            len: buf.len(),
        });
    }
    Ok(buf)
}

/// Creates a new dev secret at `path`: a temporary file beside it (mode 0600), 32 random
/// bytes, fsync, mode 0400, then linked into place only if `path` still does not exist (two
/// boards sharing one secret file through `SEALGATE_BOARD_SECRET` agree on one secret), and the
/// directory fsync'ed.
fn create_dev_secret(path: &Path) -> Result<(), BoardError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(BoardError::SecretNotFile {
            path: path.to_path_buf(),
        });
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    // Unique per process and call: boards opened by several threads must not share it.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut tmp_name = OsString::from(name);
    tmp_name.push(format!(
        ".new-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(secret_err(&tmp, "remove stale temporary file")(e)),
    }
    let mut secret = Zeroizing::new([0u8; NEW_SECRET_LEN]);
    SystemRandom::new()
        .fill(&mut secret[..])
        .map_err(|_| secret_err(path, "get random bytes")(io::Error::other("no randomness")))?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(secret_err(&tmp, "create"))?;
        f.write_all(&secret[..])
            .map_err(secret_err(&tmp, "write"))?;
        f.sync_all().map_err(secret_err(&tmp, "fsync"))?;
        f.set_permissions(Permissions::from_mode(0o400))
            .map_err(secret_err(&tmp, "chmod 0400"))?;
        f.sync_all().map_err(secret_err(&tmp, "fsync"))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            // Another board created it meanwhile: use theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(secret_err(path, "create (link into place)")(e)),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(secret_err(dir, "fsync the directory of"))
}

/// The virtual appliance board: secret and serial from QEMU's fw_cfg, state directory locked
/// like the dev board's.
pub struct QemuBoard {
    lock: StateLock,
    serial: String,
    secret: Zeroizing<Vec<u8>>,
    /// Where the sealed store lives when not `<state>/sealed` (the appliance: its own partition).
    sealed_dir: Option<PathBuf>,
}

impl fmt::Debug for QemuBoard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuBoard")
            .field("root", &self.lock.root)
            .field("serial", &self.serial)
            .field("sealed_dir", &self.sealed_dir)
            .finish_non_exhaustive()
    }
}

impl QemuBoard {
    /// Takes the lock of `root` (created if needed), then reads the secret from
    /// `<fw_cfg_dir>/opt/sealgate/secret/raw` and the serial from
    /// `<fw_cfg_dir>/opt/sealgate/serial/raw` (trailing whitespace and NULs ignored; printable
    /// ASCII, at most [`MAX_SERIAL_LEN`] bytes). `fw_cfg_dir` is normally
    /// [`DEFAULT_FW_CFG_DIR`].
    pub fn open(root: &Path, fw_cfg_dir: &Path) -> Result<Self, BoardError> {
        let lock = StateLock::acquire(root)?;
        let secret_path = fw_cfg_dir.join(FW_CFG_SECRET);
        let file = File::open(&secret_path).map_err(secret_err(&secret_path, "open"))?;
        let secret = read_secret(&secret_path, file)?;
        let serial = read_serial(&fw_cfg_dir.join(FW_CFG_SERIAL))?;
        Ok(QemuBoard {
            lock,
            serial,
            secret,
            sealed_dir: None,
        })
    }

    /// The board as the appliance image lays it out: state in
    /// [`appliance::STATE_DIR`] (`/data/state`, on the `data` partition), the sealed store in
    /// [`appliance::SEALED_STORE_DIR`] (`/sealed/store`, on the `sealed` partition), secret and
    /// serial from [`appliance::FW_CFG_DIR`]. Both partitions must be mounted first.
    pub fn appliance() -> Result<Self, BoardError> {
        Self::open_with_sealed_dir(
            Path::new(appliance::STATE_DIR),
            Path::new(appliance::FW_CFG_DIR),
            Path::new(appliance::SEALED_STORE_DIR),
        )
    }

    /// [`QemuBoard::open`] with the sealed store in `sealed_dir` instead of `<root>/sealed`.
    pub fn open_with_sealed_dir(
        root: &Path,
        fw_cfg_dir: &Path,
        sealed_dir: &Path,
    ) -> Result<Self, BoardError> {
        let mut board = Self::open(root, fw_cfg_dir)?;
        board.sealed_dir = Some(sealed_dir.to_path_buf());
        Ok(board)
    }
}

impl Board for QemuBoard {
    fn serial(&self) -> &str {
        &self.serial
    }
    fn state_dir(&self) -> &Path {
        self.lock.root()
    }
    fn secret(&self) -> &[u8] {
        &self.secret
    }
    fn sealed_dir(&self) -> PathBuf {
        match &self.sealed_dir {
            Some(d) => d.clone(),
            None => self.state_dir().join("sealed"),
        }
    }
}

fn read_serial(path: &Path) -> Result<String, BoardError> {
    let io_err = |source| BoardError::SerialIo {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason| BoardError::BadSerial {
        path: path.to_path_buf(),
        reason,
    };
    let mut raw = Vec::new();
    File::open(path)
        .map_err(io_err)?
        .take(4 * MAX_SERIAL_LEN as u64)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    let end = raw
        .iter()
        .rposition(|b| !matches!(b, 0 | b' ' | b'\t' | b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    let s = &raw[..end];
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > MAX_SERIAL_LEN {
        return Err(bad("longer than 64 bytes"));
    }
    if !s.iter().all(|b| b.is_ascii_graphic()) {
        return Err(bad("not printable ASCII without spaces"));
    }
    String::from_utf8(s.to_vec()).map_err(|_| bad("not printable ASCII without spaces"))
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A fresh directory under the system temp dir, removed with its siblings' secrets on drop.
    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Tmp {
            static N: AtomicU32 = AtomicU32::new(0);
            let d = std::env::temp_dir().join(format!(
                "sg-board-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Tmp(d)
        }
        fn path(&self, p: &str) -> PathBuf {
            self.0.join(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write_mode(path: &Path, bytes: &[u8], mode: u32) {
        fs::write(path, bytes).unwrap();
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn second_open_is_refused_while_first_holds_the_lock() {
        let t = Tmp::new("lock");
        let (dir, secret) = (t.path("var"), t.path("secret"));
        let first = DevBoard::open_with_secret(&dir, &secret).expect("first open");
        assert!(matches!(
            DevBoard::open_with_secret(&dir, &secret),
            Err(BoardError::Busy(_))
        ));
        assert!(matches!(
            DevBoard::lock_only(&dir),
            Err(BoardError::Busy(_))
        ));
        drop(first);
        assert!(DevBoard::open_with_secret(&dir, &secret).is_ok());
    }

    #[test]
    fn open_creates_the_secret_beside_the_state_dir_with_mode_0400() {
        let t = Tmp::new("create");
        let dir = t.path("var");
        let board = DevBoard::open(&dir).unwrap();
        if std::env::var_os(SECRET_ENV).is_none() {
            assert_eq!(
                board.secret_path(),
                t.0.canonicalize().unwrap().join("var.board-secret")
            );
        }
        let meta = fs::metadata(board.secret_path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        assert_eq!(meta.len(), NEW_SECRET_LEN as u64);
        assert_eq!(board.secret().len(), NEW_SECRET_LEN);
        assert_ne!(board.secret(), &[0u8; NEW_SECRET_LEN][..]);
        assert_eq!(board.sealed_dir(), board.state_dir().join("sealed"));
        // Nothing of the secret inside the state directory it protects.
        for e in fs::read_dir(board.state_dir()).unwrap() {
            let e = e.unwrap();
            assert_ne!(fs::read(e.path()).unwrap_or_default(), board.secret());
        }
        // The temporary file is gone; the same secret and serial come back on the next open.
        let names: Vec<_> = fs::read_dir(&t.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".new-")), "{names:?}");
        let (secret, serial) = (board.secret().to_vec(), board.serial().to_string());
        drop(board);
        let again = DevBoard::open(&dir).unwrap();
        assert_eq!(again.secret(), &secret[..]);
        assert_eq!(again.serial(), serial);
    }

    #[test]
    fn secret_path_is_the_env_value_or_a_sibling() {
        let root = Path::new("/srv/box/var");
        assert_eq!(
            secret_path(root, None).unwrap(),
            Path::new("/srv/box/var.board-secret")
        );
        assert_eq!(
            secret_path(root, Some(OsStr::new(""))).unwrap(),
            Path::new("/srv/box/var.board-secret")
        );
        assert_eq!(
            secret_path(root, Some(OsStr::new("/etc/sg/secret"))).unwrap(),
            Path::new("/etc/sg/secret")
        );
        assert!(matches!(
            secret_path(Path::new("/"), None),
            Err(BoardError::NoSecretPath(_))
        ));
    }

    #[test]
    fn serial_is_derived_from_the_secret() {
        let t = Tmp::new("serial");
        let s1 = t.path("s1");
        let s2 = t.path("s2");
        write_mode(&s1, &[1u8; 32], 0o400);
        write_mode(&s2, &[2u8; 32], 0o400);
        let b1 = DevBoard::open_with_secret(&t.path("v1"), &s1).unwrap();
        let b2 = DevBoard::open_with_secret(&t.path("v2"), &s2).unwrap();
        let d = digest::digest(&digest::SHA256, &[1u8; 32]);
        let hex: String = d.as_ref()[..4].iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(b1.serial(), format!("DEV-{hex}"));
        assert_eq!(b1.serial().len(), 12);
        assert_ne!(b1.serial(), b2.serial());
        assert_eq!(b1.secret(), &[1u8; 32][..]);
    }

    #[test]
    fn short_long_or_shared_secrets_are_refused_naming_the_file() {
        let t = Tmp::new("refuse");
        let p = t.path("secret");
        write_mode(&p, &[7u8; 31], 0o400);
        let e = DevBoard::open_with_secret(&t.path("v"), &p).unwrap_err();
        assert!(
            matches!(e, BoardError::SecretTooShort { len: 31, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");

        fs::remove_file(&p).unwrap();
        write_mode(&p, &vec![7u8; MAX_SECRET_LEN + 1], 0o400);
        let e = DevBoard::open_with_secret(&t.path("v"), &p).unwrap_err();
        assert!(matches!(e, BoardError::SecretTooLong { .. }), "{e}");

        for mode in [0o440, 0o404, 0o640, 0o620, 0o402] {
            fs::remove_file(&p).unwrap();
            write_mode(&p, &[7u8; 32], mode);
            let e = DevBoard::open_with_secret(&t.path("v"), &p).unwrap_err();
            assert!(
                matches!(e, BoardError::SecretPermissions { mode: m, .. } if m == mode),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        }
        // 0600 (owner read-write) is accepted as well as 0400.
        fs::remove_file(&p).unwrap();
        write_mode(&p, &[7u8; 32], 0o600);
        drop(DevBoard::open_with_secret(&t.path("v"), &p).unwrap());

        let d = t.path("a-dir");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, Permissions::from_mode(0o700)).unwrap();
        let e = DevBoard::open_with_secret(&t.path("v"), &d).unwrap_err();
        assert!(matches!(e, BoardError::SecretNotFile { .. }), "{e}");

        // A refused secret releases the lock again.
        assert!(DevBoard::lock_only(&t.path("v")).is_ok());
    }

    #[test]
    fn lock_only_leaves_the_secret_alone() {
        let t = Tmp::new("lockonly");
        let lock = DevBoard::lock_only(&t.path("v")).unwrap();
        assert_eq!(lock.root(), t.0.canonicalize().unwrap().join("v"));
        assert!(!t.path("v.board-secret").exists());
    }

    #[test]
    fn boards_sharing_one_secret_file_agree_on_it() {
        let t = Tmp::new("shared");
        let secret = t.path("shared-secret");
        let roots: Vec<PathBuf> = (0..6).map(|i| t.path(&format!("v{i}"))).collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = roots
                .iter()
                .map(|r| {
                    let secret = &secret;
                    s.spawn(move || {
                        DevBoard::open_with_secret(r, secret)
                            .unwrap()
                            .secret()
                            .to_vec()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let t = Tmp::new("debug");
        let p = t.path("s");
        write_mode(&p, &[0xAB; 32], 0o400);
        let b = DevBoard::open_with_secret(&t.path("v"), &p).unwrap();
        let d = format!("{b:?}");
        assert!(
            !d.contains("171") && !d.to_lowercase().contains("ab, "),
            "{d}"
        );
    }

    fn fw_cfg(t: &Tmp, secret: Option<&[u8]>, serial: Option<&[u8]>) -> PathBuf {
        let fw = t.path("fw_cfg");
        for (rel, content) in [(FW_CFG_SECRET, secret), (FW_CFG_SERIAL, serial)] {
            let p = fw.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            let _ = fs::remove_file(&p);
            if let Some(c) = content {
                fs::write(&p, c).unwrap();
            }
        }
        fw
    }

    #[test]
    fn qemu_board_reads_secret_and_serial_from_fw_cfg() {
        let t = Tmp::new("qemu");
        let fw = fw_cfg(&t, Some(&[9u8; 48]), Some(b"SG-QEMU-0042\n"));
        let b = QemuBoard::open(&t.path("v"), &fw).unwrap();
        assert_eq!(b.secret(), &[9u8; 48][..]);
        assert_eq!(b.serial(), "SG-QEMU-0042");
        assert_eq!(b.sealed_dir(), b.state_dir().join("sealed"));
        assert!(!format!("{b:?}").contains("9, 9"));
        // Same lock semantics as the dev board.
        assert!(matches!(
            QemuBoard::open(&t.path("v"), &fw),
            Err(BoardError::Busy(_))
        ));
        assert!(matches!(
            DevBoard::lock_only(&t.path("v")),
            Err(BoardError::Busy(_))
        ));
        drop(b);
        // Trailing NULs are ignored too.
        let fw = fw_cfg(&t, Some(&[9u8; 32]), Some(b"SG-1\0\0"));
        assert_eq!(QemuBoard::open(&t.path("v"), &fw).unwrap().serial(), "SG-1");
        // The appliance layout keeps the sealed store out of the state directory.
        let b =
            QemuBoard::open_with_sealed_dir(&t.path("v"), &fw, &t.path("sealed/store")).unwrap();
        assert_eq!(b.sealed_dir(), t.path("sealed/store"));
        assert_eq!(b.state_dir(), t.0.canonicalize().unwrap().join("v"));
    }

    #[test]
    fn qemu_board_refuses_missing_or_bad_fw_cfg_files_naming_them() {
        let t = Tmp::new("qemubad");
        let v = t.path("v");

        let fw = fw_cfg(&t, None, Some(b"SG-1"));
        let e = QemuBoard::open(&v, &fw).unwrap_err();
        assert!(matches!(e, BoardError::SecretIo { op: "open", .. }), "{e}");
        assert!(e.to_string().contains(FW_CFG_SECRET), "{e}");

        let fw = fw_cfg(&t, Some(&[1u8; 16]), Some(b"SG-1"));
        let e = QemuBoard::open(&v, &fw).unwrap_err();
        assert!(
            matches!(e, BoardError::SecretTooShort { len: 16, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(FW_CFG_SECRET), "{e}");

        let fw = fw_cfg(&t, Some(&[1u8; 32]), None);
        let e = QemuBoard::open(&v, &fw).unwrap_err();
        assert!(matches!(e, BoardError::SerialIo { .. }), "{e}");
        assert!(e.to_string().contains(FW_CFG_SERIAL), "{e}");

        let long = vec![b'A'; MAX_SERIAL_LEN + 1];
        for serial in [&b"\n"[..], b"SG 1", b"SG-\xC3\xA9", &long] {
            let fw = fw_cfg(&t, Some(&[1u8; 32]), Some(serial));
            let e = QemuBoard::open(&v, &fw).unwrap_err();
            assert!(matches!(e, BoardError::BadSerial { .. }), "{serial:?}: {e}");
            assert!(e.to_string().contains(FW_CFG_SERIAL), "{e}");
        }
    }

    #[test]
    fn free_bytes_of_tmp_is_positive() {
        assert!(free_bytes(&std::env::temp_dir()).expect("statvfs") > 0);
    }
}
