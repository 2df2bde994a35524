//! Appliance helpers shared by the stage-1 loader and `sealgate appliance`: partitions found by
//! their GPT label, ext4 mounts, the kernel command line, the hardware watchdog handed from the
//! loader to the gateway, reaping orphans as PID 1, and a synced reboot or power-off.
//!
//! The watchdog hand-over: the loader opens `/dev/watchdog` (which starts it), sets the timeout
//! (`sealgate.watchdog=` seconds, default [`DEFAULT_WATCHDOG_SECS`]), pets it once, clears
//! close-on-exec and `exec`s the gateway with the descriptor's number in
//! [`WATCHDOG_FD_ENV`]. The gateway adopts it with [`Watchdog::from_env`] and must pet it more
//! often than [`Watchdog::timeout`]. Closing the descriptor does not stop the watchdog (no
//! magic close is ever written), so a gateway that dies or hangs gets the box reset.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::io::FdFlags;
use rustix::mount::MountFlags;

use crate::BoardError;

/// Where the guest kernel's `qemu_fw_cfg` driver lists fw_cfg files by name.
pub const FW_CFG_DIR: &str = crate::DEFAULT_FW_CFG_DIR;
/// Where the kernel lists block devices (one directory each, with a `uevent` file).
pub const SYS_CLASS_BLOCK: &str = "/sys/class/block";
/// Mount point of the `data` partition.
pub const DATA_MOUNT: &str = "/data";
/// Mount point of the `sealed` partition.
pub const SEALED_MOUNT: &str = "/sealed";
/// The gateway's state directory on the appliance (inside `data`).
pub const STATE_DIR: &str = "/data/state";
/// The sealed store's directory on the appliance (inside `sealed`, not `data`).
pub const SEALED_STORE_DIR: &str = "/sealed/store";
/// The watchdog device the loader arms.
pub const WATCHDOG_DEV: &str = "/dev/watchdog";
/// Environment variable carrying the armed watchdog's descriptor number from loader to gateway.
pub const WATCHDOG_FD_ENV: &str = "SEALGATE_WATCHDOG_FD";
/// Kernel command-line key of the watchdog timeout in seconds.
pub const WATCHDOG_CMDLINE_KEY: &str = "sealgate.watchdog";
/// Watchdog timeout when the command line names none.
pub const DEFAULT_WATCHDOG_SECS: u32 = 15;

/// The device of the partition whose GPT name (the kernel's `PARTNAME`) is `label`:
/// `/dev/<DEVNAME>`, or `None` when no partition has that name. Two partitions with the same
/// name (a second disk) are an error rather than a guess.
pub fn find_partition(label: &str) -> io::Result<Option<PathBuf>> {
    find_partition_in(Path::new(SYS_CLASS_BLOCK), Path::new("/dev"), label)
}

/// [`find_partition`] over another sysfs block directory and device directory (tests).
pub fn find_partition_in(
    sys_block: &Path,
    dev_dir: &Path,
    label: &str,
) -> io::Result<Option<PathBuf>> {
    let mut found: Option<String> = None;
    for (name, devname) in partition_names(sys_block)? {
        if name != label {
            continue;
        }
        if let Some(first) = &found {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("partition label {label:?} is on both {first} and {devname}"),
            ));
        }
        found = Some(devname);
    }
    Ok(found.map(|d| dev_dir.join(d)))
}

/// Every partition below `sys_block` that has a name: `(PARTNAME, DEVNAME)` from its `uevent`.
pub fn partition_names(sys_block: &Path) -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(sys_block)? {
        let entry = entry?;
        // A device may vanish between listing and reading: skip it.
        let Ok(text) = fs::read_to_string(entry.path().join("uevent")) else {
            continue;
        };
        let (mut partname, mut devname) = (None, None);
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("PARTNAME=") {
                partname = Some(v);
            } else if let Some(v) = line.strip_prefix("DEVNAME=") {
                devname = Some(v);
            }
        }
        if let (Some(p), Some(d)) = (partname, devname)
            && !d.is_empty()
            && !d.contains("..")
        {
            out.push((p.to_string(), d.to_string()));
        }
    }
    out.sort();
    Ok(out)
}

/// Waits until every label in `labels` names a partition (polling every 100 ms), at most
/// `timeout`; the devices by label, or [`BoardError::PartitionsMissing`] naming the ones still
/// missing (and the last error seen while looking, if any).
pub fn wait_partitions(
    labels: &[&str],
    timeout: Duration,
) -> Result<BTreeMap<String, PathBuf>, BoardError> {
    wait_partitions_in(
        Path::new(SYS_CLASS_BLOCK),
        Path::new("/dev"),
        labels,
        timeout,
    )
}

/// [`wait_partitions`] over another sysfs block directory and device directory (tests).
pub fn wait_partitions_in(
    sys_block: &Path,
    dev_dir: &Path,
    labels: &[&str],
    timeout: Duration,
) -> Result<BTreeMap<String, PathBuf>, BoardError> {
    let start = Instant::now();
    loop {
        let mut found = BTreeMap::new();
        let mut missing = Vec::new();
        let mut last_error = None;
        for &label in labels {
            match find_partition_in(sys_block, dev_dir, label) {
                Ok(Some(dev)) => {
                    found.insert(label.to_string(), dev);
                }
                Ok(None) => missing.push(label.to_string()),
                Err(e) => {
                    missing.push(label.to_string());
                    last_error = Some(e.to_string());
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        if start.elapsed() >= timeout {
            return Err(BoardError::PartitionsMissing {
                missing,
                waited: timeout,
                last_error,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mounts the ext4 filesystem on `dev` at `at` (created if missing) with
/// `noatime,nodev,nosuid,noexec`.
pub fn mount_ext4(dev: &Path, at: &Path) -> Result<(), BoardError> {
    let err = |source: io::Error| BoardError::Mount {
        what: dev.display().to_string(),
        at: at.to_path_buf(),
        source,
    };
    fs::create_dir_all(at).map_err(err)?;
    rustix::mount::mount(
        dev,
        at,
        "ext4",
        MountFlags::NOATIME | MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC,
        None,
    )
    .map_err(|e| err(e.into()))
}

/// Mounts a pseudo filesystem (`proc`, `sysfs`, `devtmpfs`, `tmpfs`) at `at` (created if
/// missing). `data` is the option string (`mode=0755`), if any.
pub(crate) fn mount_pseudo(
    fstype: &str,
    at: &Path,
    flags: MountFlags,
    data: Option<&str>,
) -> Result<(), BoardError> {
    let err = |source: io::Error| BoardError::Mount {
        what: fstype.to_string(),
        at: at.to_path_buf(),
        source,
    };
    fs::create_dir_all(at).map_err(err)?;
    let data = data.map(std::ffi::CString::new).transpose().map_err(|_| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL in mount options",
        ))
    })?;
    rustix::mount::mount(fstype, at, fstype, flags, data.as_deref()).map_err(|e| err(e.into()))
}

/// The kernel command line (`/proc/cmdline`, trimmed); empty when it cannot be read.
pub fn cmdline() -> String {
    fs::read_to_string("/proc/cmdline")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The value of `key=value` on a kernel command line (the last one when repeated, as the
/// kernel does); `Some("")` for a bare `key`. Words are separated by whitespace except inside
/// double quotes, and quotes around the value (`key="a b"`) or the whole word are removed.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    let mut result = None;
    for word in cmdline_words(cmdline) {
        let word = strip_quotes(word);
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k, strip_quotes(v)),
            None => (word, ""),
        };
        if k == key {
            result = Some(v);
        }
    }
    result
}

fn strip_quotes(s: &str) -> &str {
    let s = s.strip_prefix('"').unwrap_or(s);
    s.strip_suffix('"').unwrap_or(s)
}

/// Splits at whitespace outside double quotes.
fn cmdline_words(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        rest = rest.trim_start();
        if rest.is_empty() {
            return None;
        }
        let mut in_quotes = false;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                if c == '"' {
                    in_quotes = !in_quotes;
                }
                c.is_whitespace() && !in_quotes
            })
            .map_or(rest.len(), |(i, _)| i);
        let (word, tail) = rest.split_at(end);
        rest = tail;
        Some(word)
    })
}

/// The watchdog timeout named on `cmdline` (`sealgate.watchdog=SECONDS`, 1..=3600), else
/// [`DEFAULT_WATCHDOG_SECS`].
pub fn watchdog_secs(cmdline: &str) -> u32 {
    cmdline_value(cmdline, WATCHDOG_CMDLINE_KEY)
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|s| (1..=3600).contains(s))
        .unwrap_or(DEFAULT_WATCHDOG_SECS)
}

/// Set once the process adopted the descriptor in [`WATCHDOG_FD_ENV`] (never twice).
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// An armed hardware watchdog: unless [`Watchdog::pet`] is called more often than
/// [`Watchdog::timeout`], the board resets.
pub struct Watchdog {
    fd: OwnedFd,
    timeout: Duration,
}

impl fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watchdog")
            .field("fd", &self.fd.as_raw_fd())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Watchdog {
    /// Opens `dev` (which starts the watchdog), sets its timeout to `seconds` (the driver may
    /// round it) and pets it once. The descriptor is close-on-exec until
    /// [`Watchdog::into_inheritable_fd`].
    pub fn arm(dev: &Path, seconds: u32) -> io::Result<Watchdog> {
        let file = fs::OpenOptions::new().write(true).open(dev)?;
        let fd = OwnedFd::from(file);
        let actual = crate::sys::watchdog_set_timeout(fd.as_fd(), seconds)?;
        crate::sys::watchdog_keepalive(fd.as_fd())?;
        Ok(Watchdog {
            fd,
            timeout: Duration::from_secs(u64::from(actual)),
        })
    }

    /// The watchdog the loader handed over in [`WATCHDOG_FD_ENV`], or `None` when there is
    /// none or it is unusable (see [`Watchdog::try_from_env`] for why).
    pub fn from_env() -> Option<Watchdog> {
        match Self::try_from_env() {
            Ok(w) => w,
            Err(e) => {
                eprintln!("sealgate: {WATCHDOG_FD_ENV}: {e}");
                None
            }
        }
    }

    /// [`Watchdog::from_env`] with the reason on failure. `Ok(None)` when the variable is not
    /// set or the descriptor was already adopted by this process; an error when it is not an
    /// open character device ([`Watchdog::adopt`] leaves it alone). The adopted descriptor is made
    /// close-on-exec, so the gateway's own children never inherit it.
    pub fn try_from_env() -> io::Result<Option<Watchdog>> {
        let Some(v) = std::env::var_os(WATCHDOG_FD_ENV) else {
            return Ok(None);
        };
        let raw: RawFd = v
            .to_str()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not a descriptor number: {v:?}"),
                )
            })?;
        Self::adopt(raw)
    }

    /// Adopts the inherited descriptor `raw` (at most once per process: `Ok(None)` after
    /// that). A descriptor that is not open, or not a character device (a watchdog device
    /// is one; a file, pipe or socket is not), is refused with the reason and left as it was
    /// — open, not owned, so nothing of whoever holds it is closed.
    fn adopt(raw: RawFd) -> io::Result<Option<Watchdog>> {
        if ADOPTED.swap(true, Ordering::SeqCst) {
            return Ok(None);
        }
        let accept = |fd: BorrowedFd<'_>| {
            ensure_char_device(fd)
                .map_err(|e| io::Error::new(e.kind(), format!("descriptor {raw} refused: {e}")))
        };
        let fd = match crate::sys::adopt_inherited_fd(raw, accept) {
            Ok(fd) => fd,
            Err(e) => {
                ADOPTED.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        rustix::io::fcntl_setfd(&fd, FdFlags::CLOEXEC)?;
        let secs = match crate::sys::watchdog_get_timeout(fd.as_fd()) {
            Ok(s) if s > 0 => s,
            _ => watchdog_secs(&cmdline()),
        };
        Ok(Some(Watchdog {
            fd,
            timeout: Duration::from_secs(u64::from(secs)),
        }))
    }

    /// Restarts the countdown (`WDIOC_KEEPALIVE`).
    pub fn pet(&self) -> io::Result<()> {
        crate::sys::watchdog_keepalive(self.fd.as_fd())
    }

    /// The timeout the driver runs with.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Clears close-on-exec: the descriptor number to hand to the program about to be
    /// `exec`ed (in [`WATCHDOG_FD_ENV`]). This process keeps owning it (if the `exec` fails).
    pub fn inherit_on_exec(&self) -> io::Result<RawFd> {
        rustix::io::fcntl_setfd(&self.fd, FdFlags::empty())?;
        Ok(self.fd.as_raw_fd())
    }

    /// Stops the watchdog: the magic close (`V`, then close). Drivers built with `nowayout`
    /// ignore it and reset the board anyway.
    pub fn disarm(self) -> io::Result<()> {
        let mut f = fs::File::from(self.fd);
        io::Write::write_all(&mut f, b"V")
    }
}

/// `Ok` when `fd` is a character device (what a watchdog is); otherwise the error names what
/// it is instead.
fn ensure_char_device(fd: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::fs::FileType;
    let st = rustix::fs::fstat(fd)?;
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::CharacterDevice => return Ok(()),
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Fifo => "a pipe",
        FileType::Socket => "a socket",
        FileType::BlockDevice => "a block device",
        FileType::Symlink => "a symbolic link",
        FileType::Unknown => "of an unknown type",
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a character device (it is {kind}), so not a watchdog"),
    ))
}

/// Flushes every filesystem, remounts the `ext4` mounts read-only (best effort), and reboots.
/// If the kernel refuses (not PID 1 / not privileged), prints why and exits with status 1 —
/// as PID 1 that is a kernel panic, which with `panic=1` reboots too.
pub fn sync_and_reboot() -> ! {
    quiesce();
    let e = rustix::system::reboot(rustix::system::RebootCommand::Restart);
    eprintln!("sealgate: reboot failed: {e:?}");
    std::process::exit(1)
}

/// Like [`sync_and_reboot`] but powers off. If the kernel refuses, prints why; PID 1 then
/// sleeps forever (a halted box), any other process exits with status 1.
pub fn sync_and_poweroff() -> ! {
    quiesce();
    let e = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    eprintln!("sealgate: power-off failed: {e:?}");
    if rustix::process::getpid().is_init() {
        halt_forever()
    }
    std::process::exit(1)
}

/// Sleeps forever (PID 1 must never exit); children are still reaped.
pub fn halt_forever() -> ! {
    loop {
        reap_children();
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// sync, remount every ext4 mount read-only (so its journal is clean), sync.
fn quiesce() {
    rustix::fs::sync();
    if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
        for line in mounts.lines() {
            let mut f = line.split_whitespace();
            let (Some(_src), Some(at), Some(fstype)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if fstype == "ext4" {
                let at = unescape_mount_path(at);
                let _ = rustix::mount::mount_remount(
                    Path::new(&at),
                    MountFlags::RDONLY
                        | MountFlags::NOATIME
                        | MountFlags::NODEV
                        | MountFlags::NOSUID,
                    "",
                );
            }
        }
    }
    rustix::fs::sync();
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = s.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Raises the soft limit on open files to the hard limit (a gateway holds a socket per
/// session: the default soft limit of 1024 would cap it below `smtp.max_connections`).
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim).ok()?;
    }
    lim.current
}

/// Reaps every exited child without blocking (`waitpid(-1, WNOHANG)` until none is left).
pub fn reap_children() {
    while let Ok(Some(_)) = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG) {}
}

/// What the fw_cfg directory offers: whether the board secret is present (never its bytes) and
/// the serial or why it cannot be read.
pub fn fw_cfg_report(fw_cfg_dir: &Path) -> (bool, Result<String, BoardError>) {
    let secret = fw_cfg_dir.join(crate::FW_CFG_SECRET).is_file();
    (
        secret,
        crate::read_serial(&fw_cfg_dir.join(crate::FW_CFG_SERIAL)),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cmdline_values() {
        let c = "console=ttyS0 panic=1 sealgate.ip=10.0.2.15/24 sealgate.gw=10.0.2.2 \
                 sealgate.watchdog=15 quiet x=\"a b\" \"y=c d\" sealgate.watchdog=20";
        assert_eq!(cmdline_value(c, "sealgate.ip"), Some("10.0.2.15/24"));
        assert_eq!(cmdline_value(c, "sealgate.gw"), Some("10.0.2.2"));
        assert_eq!(cmdline_value(c, "sealgate.watchdog"), Some("20"));
        assert_eq!(cmdline_value(c, "quiet"), Some(""));
        assert_eq!(cmdline_value(c, "x"), Some("a b"));
        assert_eq!(cmdline_value(c, "y"), Some("c d"));
        assert_eq!(cmdline_value(c, "sealgate"), None);
        assert_eq!(cmdline_value(c, "sealgate.test_fault"), None);
        assert_eq!(cmdline_value("", "a"), None);
        assert_eq!(cmdline_value("  a=1\n", "a"), Some("1"));
        assert_eq!(cmdline_value("a==1", "a"), Some("=1"));
    }

    #[test]
    fn a_watchdog_descriptor_that_is_no_character_device_is_refused() {
        let p = std::env::temp_dir().join(format!("sg-wd-file-{}", std::process::id()));
        let file = fs::File::create(&p).unwrap();
        let e = Watchdog::adopt(file.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("regular file"), "{e}");
        assert!(e.to_string().contains("not a character device"), "{e}");
        // Left open and still the file's: writing through it works.
        io::Write::write_all(&mut &file, b"still open").unwrap();
        let _ = fs::remove_file(&p);

        let (reader, writer) = io::pipe().unwrap();
        let e = Watchdog::adopt(reader.as_raw_fd()).unwrap_err();
        assert!(e.to_string().contains("a pipe"), "{e}");
        io::Write::write_all(&mut &writer, b"x").unwrap();

        // Not adopted: a later attempt is checked again rather than answered `None`.
        assert!(Watchdog::adopt(file.as_raw_fd()).is_err());
        // /dev/null is a character device: it passes the check.
        let null = fs::File::open("/dev/null").unwrap();
        assert!(ensure_char_device(null.as_fd()).is_ok());
    }

    #[test]
    fn watchdog_timeout_from_cmdline() {
        assert_eq!(watchdog_secs("sealgate.watchdog=30"), 30);
        assert_eq!(watchdog_secs("x=1"), DEFAULT_WATCHDOG_SECS);
        for bad in ["0", "-1", "abc", "100000", ""] {
            assert_eq!(
                watchdog_secs(&format!("sealgate.watchdog={bad}")),
                DEFAULT_WATCHDOG_SECS
            );
        }
    }

    fn fake_sysfs(tag: &str, parts: &[(&str, Option<&str>)]) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sg-appliance-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("vda")).unwrap();
        fs::write(
            d.join("vda/uevent"),
            "MAJOR=253\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        )
        .unwrap();
        for (dev, name) in parts {
            fs::create_dir_all(d.join(dev)).unwrap();
            let mut s = format!("MAJOR=253\nMINOR=1\nDEVNAME={dev}\nDEVTYPE=partition\nPARTN=1\n");
            if let Some(n) = name {
                s.push_str(&format!("PARTNAME={n}\n"));
            }
            fs::write(d.join(dev).join("uevent"), s).unwrap();
        }
        // A device without uevent is skipped.
        fs::create_dir_all(d.join("loop0")).unwrap();
        d
    }

    #[test]
    fn partitions_are_found_by_partname() {
        let d = fake_sysfs(
            "find",
            &[
                ("vda1", Some("bootctl")),
                ("vda2", Some("slot_a")),
                ("vda3", Some("slot_b")),
                ("vda4", None),
            ],
        );
        let dev = Path::new("/dev");
        assert_eq!(
            find_partition_in(&d, dev, "slot_a").unwrap(),
            Some(PathBuf::from("/dev/vda2"))
        );
        assert_eq!(find_partition_in(&d, dev, "data").unwrap(), None);
        let m = wait_partitions_in(&d, dev, &["bootctl", "slot_b"], Duration::ZERO).unwrap();
        assert_eq!(m["bootctl"], Path::new("/dev/vda1"));
        assert_eq!(m["slot_b"], Path::new("/dev/vda3"));
        let e = wait_partitions_in(
            &d,
            dev,
            &["bootctl", "data", "sealed"],
            Duration::from_millis(150),
        )
        .unwrap_err();
        match &e {
            BoardError::PartitionsMissing { missing, .. } => {
                assert_eq!(missing, &["data", "sealed"])
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("data"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_label_on_two_partitions_is_an_error() {
        let d = fake_sysfs("dup", &[("vda2", Some("slot_a")), ("vdb2", Some("slot_a"))]);
        let e = find_partition_in(&d, Path::new("/dev"), "slot_a").unwrap_err();
        assert!(
            e.to_string().contains("vda2") && e.to_string().contains("vdb2"),
            "{e}"
        );
        let e = wait_partitions_in(&d, Path::new("/dev"), &["slot_a"], Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/data"), "/data");
        assert_eq!(unescape_mount_path("/x\\"), "/x\\");
        assert_eq!(unescape_mount_path("/x\\04"), "/x\\04");
    }

    #[test]
    fn fw_cfg_report_never_reads_the_secret() {
        let d = std::env::temp_dir().join(format!("sg-appliance-fw-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let (present, serial) = fw_cfg_report(&d);
        assert!(!present);
        assert!(serial.is_err());
        for (rel, c) in [
            (crate::FW_CFG_SECRET, &b"x"[..]),
            (crate::FW_CFG_SERIAL, b"SG-7\n"),
        ] {
            let p = d.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, c).unwrap();
        }
        let (present, serial) = fw_cfg_report(&d);
        assert!(present);
        assert_eq!(serial.unwrap(), "SG-7");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn no_watchdog_in_the_environment_is_none() {
        if std::env::var_os(WATCHDOG_FD_ENV).is_none() {
            assert!(Watchdog::from_env().is_none());
        }
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, getrlimit};
        let hard = getrlimit(Resource::Nofile).maximum;
        assert_eq!(raise_nofile_limit(), hard);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
    }
}
