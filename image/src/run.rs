//! Running a built image under QEMU (`sealctl image run`): the board identity handed in through
//! fw_cfg, the forwards of QEMU's user network (host side on loopback only), and the QEMU command
//! line, built by [`qemu_argv`] without side effects so that it can be tested and printed.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::str::FromStr;

/// The guest's address on QEMU's user network.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// QEMU's user network (10.0.2.0/24) and its gateway, as the guest sees them.
pub const USER_NET: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const USER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The kernel command line of every run (the loader and sealgate read it); `--append` adds to it.
pub const KERNEL_ARGS: &str =
    "console=ttyS0 panic=1 sealgate.ip=10.0.2.15/24 sealgate.gw=10.0.2.2 sealgate.watchdog=15";
/// Guest ports of the forwards `--smtp`, `--smtps`, `--mgmt`.
pub const GUEST_SMTP_PORT: u16 = 25;
pub const GUEST_SMTPS_PORT: u16 = 465;
pub const GUEST_MGMT_PORT: u16 = 8443;
/// Guest memory unless told otherwise.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Bounds of `--memory`.
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 16 << 10;
/// The board secret created in the image directory on the first run.
pub const SECRET_FILE: &str = "board-secret";
/// Bytes of a new board secret, and the bounds of one given with `--secret-file`
/// (the board's own bounds).
pub const NEW_SECRET_LEN: usize = 32;
pub const MIN_SECRET_LEN: usize = 32;
pub const MAX_SECRET_LEN: usize = 4096;
/// Longest serial (the board's bound).
pub const MAX_SERIAL_LEN: usize = 64;
/// fw_cfg names of the board identity (the guest sees them under
/// `/sys/firmware/qemu_fw_cfg/by_name/<name>/raw`).
pub const FW_CFG_SECRET: &str = "opt/sealgate/secret";
pub const FW_CFG_SERIAL: &str = "opt/sealgate/serial";
/// The files of a built image directory that a run needs.
pub const KERNEL: &str = "vmlinuz";
pub const INITRAMFS: &str = "initramfs.cpio.gz";
pub const DISK: &str = "disk.img";
/// The QEMU executable.
pub const QEMU: &str = "qemu-system-x86_64";

/// Why a run could not be prepared or started.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{what} {addr}: the host side must be a loopback address (127.0.0.0/8)")]
    NotLoopback { what: &'static str, addr: String },
    #[error("{what} {value:?}: {reason}")]
    BadForward {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("--accel {0:?}: expected auto, kvm or tcg")]
    BadAccel(String),
    #[error("serial {0:?}: 1 to 64 characters of A-Z a-z 0-9 . _ - expected")]
    BadSerial(String),
    #[error("--memory {0}: between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB expected")]
    BadMemory(u32),
    #[error("--append {0:?}: printable ASCII expected")]
    BadAppend(String),
    #[error("path {0} is not UTF-8 (QEMU options need text)")]
    NonUtf8Path(PathBuf),
    #[error("{path}: not found; is this a directory made by `sealctl image build`?")]
    MissingImageFile { path: PathBuf },
    #[error("board secret {path}: {len} bytes, {MIN_SECRET_LEN} to {MAX_SECRET_LEN} expected")]
    BadSecret { path: PathBuf, len: u64 },
    #[error("board secret {path}: {source}")]
    Secret { path: PathBuf, source: io::Error },
    #[error("no random bytes for a new board secret")]
    Random,
    #[error("/dev/kvm cannot be opened read-write: {0} (use --accel tcg or --accel auto)")]
    NoKvm(io::Error),
    #[error("starting {QEMU}: {0} (install the qemu-system-x86 package)")]
    Spawn(io::Error),
    #[error("relay: {0}")]
    Relay(io::Error),
}

/// Which accelerator QEMU uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` opens read-write, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for Accel {
    type Err = RunError;
    fn from_str(s: &str) -> Result<Self, RunError> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(RunError::BadAccel(s.to_owned())),
        }
    }
}

impl Accel {
    /// KVM (true) or TCG (false). `Auto` takes KVM when `/dev/kvm` opens read-write and the
    /// CPU shows hardware virtualisation (`vmx` or `svm` in /proc/cpuinfo): a KVM without it
    /// (e.g. PVM, KVM by page tables on a virtual machine without nested virtualisation) cannot
    /// boot a stock kernel and would hang. `Kvm` insists on `/dev/kvm` only.
    pub fn resolve(self) -> Result<bool, RunError> {
        match self {
            Accel::Tcg => Ok(false),
            Accel::Auto => Ok(open_kvm().is_ok()
                && fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| hardware_virt(&c))),
            Accel::Kvm => open_kvm().map(|_| true).map_err(RunError::NoKvm),
        }
    }
}

fn open_kvm() -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open("/dev/kvm")
}

/// Whether /proc/cpuinfo's first `flags` line has `vmx` (Intel VT-x) or `svm` (AMD-V).
fn hardware_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("flags")
                .and_then(|r| r.trim_start().strip_prefix(':'))
        })
        .is_some_and(|flags| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// A host address on loopback: `PORT` (127.0.0.1) or `127.x.y.z:PORT`. `what` names the option
/// in errors.
pub fn loopback_addr(what: &'static str, s: &str) -> Result<SocketAddrV4, RunError> {
    let addr = match s.parse::<u16>() {
        Ok(port) => SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        Err(_) => s.parse::<SocketAddrV4>().map_err(|_| {
            if s.parse::<std::net::SocketAddr>().is_ok() {
                RunError::NotLoopback {
                    what,
                    addr: s.to_owned(),
                }
            } else {
                RunError::BadForward {
                    what,
                    value: s.to_owned(),
                    reason: "expected PORT or 127.x.y.z:PORT",
                }
            }
        })?,
    };
    if !addr.ip().is_loopback() {
        return Err(RunError::NotLoopback {
            what,
            addr: s.to_owned(),
        });
    }
    if addr.port() == 0 {
        return Err(RunError::BadForward {
            what,
            value: s.to_owned(),
            reason: "port 0",
        });
    }
    Ok(addr)
}

/// A forward from a host loopback port to a guest port (`hostfwd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFwd {
    pub host: SocketAddrV4,
    pub guest_port: u16,
}

impl HostFwd {
    /// Checks that the host side is on loopback.
    pub fn new(what: &'static str, host: &str, guest_port: u16) -> Result<Self, RunError> {
        Ok(HostFwd {
            host: loopback_addr(what, host)?,
            guest_port,
        })
    }
}

/// A forward of guest connections to an address of the user network to a host loopback port
/// (`guestfwd`), written `GUEST_IP:PORT=HOST:PORT`, e.g. `10.0.2.100:25=127.0.0.1:2526`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestFwd {
    pub guest: SocketAddrV4,
    pub host: SocketAddrV4,
}

impl FromStr for GuestFwd {
    type Err = RunError;
    fn from_str(s: &str) -> Result<Self, RunError> {
        let bad = |reason| RunError::BadForward {
            what: "--guestfwd",
            value: s.to_owned(),
            reason,
        };
        let (guest, host) = s
            .split_once('=')
            .ok_or_else(|| bad("expected GUEST_IP:PORT=127.x.y.z:PORT"))?;
        let guest: SocketAddrV4 = guest
            .parse()
            .map_err(|_| bad("the guest side is not IPv4:PORT"))?;
        let [a, b, c, d] = guest.ip().octets();
        if [a, b, c] != [10, 0, 2] || matches!(d, 0 | 2 | 3 | 15 | 255) {
            return Err(bad(
                "the guest side must be an unused address of 10.0.2.0/24 \
                 (not .0, .2 gateway, .3 DNS, .15 the guest, .255)",
            ));
        }
        if guest.port() == 0 {
            return Err(bad("guest port 0"));
        }
        let host = loopback_addr("--guestfwd", host)?;
        Ok(GuestFwd { guest, host })
    }
}

impl fmt::Display for GuestFwd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.guest, self.host)
    }
}

/// Everything a run needs, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    /// The image directory (vmlinuz, initramfs.cpio.gz, disk.img).
    pub dir: PathBuf,
    /// The board secret handed to the guest by fw_cfg.
    pub secret_file: PathBuf,
    /// The board serial handed to the guest by fw_cfg.
    pub serial: String,
    pub hostfwd: Vec<HostFwd>,
    pub guestfwd: Vec<GuestFwd>,
    /// The command QEMU starts for each guest connection of a [`GuestFwd`], with the host
    /// address as its last argument (e.g. `sealctl image relay`, see [`relay`]).
    pub relay: Vec<String>,
    /// KVM (true) or TCG.
    pub kvm: bool,
    /// Added to [`KERNEL_ARGS`].
    pub append: Option<String>,
    pub memory_mib: u32,
}

/// A serial QEMU and the board accept as is.
pub fn check_serial(serial: &str) -> Result<(), RunError> {
    let ok = !serial.is_empty()
        && serial.len() <= MAX_SERIAL_LEN
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RunError::BadSerial(serial.to_owned()))
    }
}

/// The default serial of a board secret: `QEMU-` and the first 4 bytes of its SHA-256 in hex.
pub fn serial_of(secret: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret);
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    format!("QEMU-{hex}")
}

/// The board identity of a run: the secret file given (checked), or `DIR/board-secret`
/// (created 0600 with [`NEW_SECRET_LEN`] random bytes on the first run); the serial given, or
/// [`serial_of`] the secret.
pub fn board_identity(
    dir: &Path,
    secret_file: Option<&Path>,
    serial: Option<&str>,
) -> Result<(PathBuf, String), RunError> {
    let path = match secret_file {
        Some(path) => path.to_path_buf(),
        None => {
            let path = dir.join(SECRET_FILE);
            create_secret(&path)?;
            path
        }
    };
    let secret_err = |source| RunError::Secret {
        path: path.clone(),
        source,
    };
    let mut secret = Vec::new();
    File::open(&path)
        .map_err(secret_err)?
        .take(MAX_SECRET_LEN as u64 + 1)
        .read_to_end(&mut secret)
        .map_err(secret_err)?;
    if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&secret.len()) {
        return Err(RunError::BadSecret {
            path,
            len: secret.len() as u64,
        });
    }
    let serial = match serial {
        Some(s) => {
            check_serial(s)?;
            s.to_owned()
        }
        None => serial_of(&secret),
    };
    Ok((path, serial))
}

/// Creates `path` with fresh random bytes unless it exists (never overwrites).
fn create_secret(path: &Path) -> Result<(), RunError> {
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(source) => {
            return Err(RunError::Secret {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut secret = [0u8; NEW_SECRET_LEN];
    let filled = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret);
    let written = filled.map_err(|_| RunError::Random).and_then(|()| {
        file.write_all(&secret)
            .and_then(|()| file.sync_all())
            .map_err(|source| RunError::Secret {
                path: path.to_path_buf(),
                source,
            })
    });
    if written.is_err() {
        // No half-written secret is left behind to be taken for a real one later.
        let _ = fs::remove_file(path);
    }
    written
}

/// Checks that `dir` holds the files of a built image (kernel, initramfs, disk).
pub fn check_image_dir(dir: &Path) -> Result<(), RunError> {
    for name in [KERNEL, INITRAMFS, DISK] {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(RunError::MissingImageFile { path });
        }
    }
    Ok(())
}

/// The QEMU command line of a run (argv[0] is [`QEMU`]). Checks that the image files exist and
/// that every forward's host side is on loopback; starts nothing.
pub fn qemu_argv(spec: &RunSpec) -> Result<Vec<OsString>, RunError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
        return Err(RunError::BadMemory(spec.memory_mib));
    }
    check_serial(&spec.serial)?;
    check_image_dir(&spec.dir)?;
    let file = |name: &str| qemu_path(&spec.dir.join(name));
    let (kernel, initrd, disk) = (file(KERNEL)?, file(INITRAMFS)?, file(DISK)?);
    let secret = qemu_path(&spec.secret_file)?;
    let netdev = qemu_netdev(spec)?;
    let cmdline = kernel_cmdline(spec)?;

    let (accel, cpu) = if spec.kvm {
        ("kvm", "host")
    } else {
        ("tcg", "max")
    };
    let args: Vec<String> = vec![
        QEMU.into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-kernel".into(),
        kernel,
        "-initrd".into(),
        initrd,
        "-append".into(),
        cmdline,
        "-drive".into(),
        format!("file={disk},format=raw,if=none,id=disk0,cache=writeback"),
        "-device".into(),
        "virtio-blk-pci,drive=disk0".into(),
        "-netdev".into(),
        netdev,
        "-device".into(),
        "virtio-net-pci,netdev=net0".into(),
        "-fw_cfg".into(),
        format!("name={FW_CFG_SECRET},file={secret}"),
        "-fw_cfg".into(),
        format!("name={FW_CFG_SERIAL},string={}", spec.serial),
        "-device".into(),
        "i6300esb".into(),
        "-action".into(),
        "watchdog=reset".into(),
    ];
    Ok(args.into_iter().map(OsString::from).collect())
}

/// The `-netdev` value: user networking with the run's host and guest forwards, whose host
/// sides must be on loopback.
fn qemu_netdev(spec: &RunSpec) -> Result<String, RunError> {
    let mut netdev = format!("user,id=net0,restrict=on,net={USER_NET}/24,host={USER_GATEWAY}");
    for fwd in &spec.hostfwd {
        if !fwd.host.ip().is_loopback() {
            return Err(RunError::NotLoopback {
                what: "hostfwd",
                addr: fwd.host.to_string(),
            });
        }
        netdev += &format!(
            ",hostfwd=tcp:{}:{}-{GUEST_IP}:{}",
            fwd.host.ip(),
            fwd.host.port(),
            fwd.guest_port
        );
    }
    for fwd in &spec.guestfwd {
        if !fwd.host.ip().is_loopback() {
            return Err(RunError::NotLoopback {
                what: "guestfwd",
                addr: fwd.host.to_string(),
            });
        }
        // `cmd:` starts the relay for each connection (`tcp:` would be one connection made
        // when QEMU starts, shared by all guest connections).
        let mut cmd: Vec<String> = spec.relay.iter().map(|a| glib_quote(a)).collect();
        cmd.push(fwd.host.to_string());
        netdev += &format!(
            ",guestfwd=tcp:{}-cmd:{}",
            fwd.guest,
            cmd.join(" ").replace(',', ",,")
        );
    }
    Ok(netdev)
}

/// The kernel command line: [`KERNEL_ARGS`] and the run's printable `append`, if any.
fn kernel_cmdline(spec: &RunSpec) -> Result<String, RunError> {
    let mut cmdline = KERNEL_ARGS.to_owned();
    if let Some(extra) = spec.append.as_deref().filter(|s| !s.trim().is_empty()) {
        if !extra.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(RunError::BadAppend(extra.to_owned()));
        }
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    Ok(cmdline)
}

/// A path as a QEMU option value: UTF-8, commas doubled (QEMU's escape).
fn qemu_path(path: &Path) -> Result<String, RunError> {
    let s = path
        .to_str()
        .ok_or_else(|| RunError::NonUtf8Path(path.to_path_buf()))?;
    Ok(s.replace(',', ",,"))
}

/// One argument for QEMU's (GLib's) command parser of `guestfwd=…-cmd:`: as is when plain,
/// else single-quoted.
fn glib_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=+@%".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The argv as one shell-quoted line (for `--print-command`).
pub fn shell_line(argv: &[OsString]) -> String {
    argv.iter()
        .map(|arg| {
            let arg = arg.to_string_lossy();
            let plain = !arg.is_empty()
                && arg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,+@%".contains(&b));
            if plain {
                arg.into_owned()
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs QEMU in the foreground with the terminal as the guest's serial console, until it exits.
pub fn run(argv: &[OsString]) -> Result<ExitStatus, RunError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| RunError::Spawn(io::Error::other("empty command line")))?;
    Command::new(program)
        .args(args)
        .status()
        .map_err(RunError::Spawn)
}

/// Relays one guest connection of a [`GuestFwd`]: QEMU starts the relay with the connection as
/// its standard input and output (and error: so nothing is ever printed), and the relay copies
/// it to and from a new TCP connection to `host` (loopback only). Returns when the host side
/// closes; the guest side's end of input half-closes the host side.
pub fn relay(host: &str) -> Result<(), RunError> {
    let addr = loopback_addr("relay", host)?;
    let stream = std::net::TcpStream::connect(addr).map_err(RunError::Relay)?;
    let mut upstream = stream.try_clone().map_err(RunError::Relay)?;
    std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    let mut downstream = stream;
    // Not `io::stdout()`: it is line-buffered, and TLS records carry no newlines, so a handshake
    // would sit in the buffer. A File on a duplicate of fd 1 writes through.
    use std::os::fd::AsFd;
    let mut out = fs::File::from(
        io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(RunError::Relay)?,
    );
    let copied = io::copy(&mut downstream, &mut out).and_then(|_| out.flush());
    copied.map_err(RunError::Relay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sealgate-run-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn image_dir(name: &str) -> PathBuf {
        let dir = temp_dir(name);
        for f in [KERNEL, INITRAMFS, DISK] {
            fs::write(dir.join(f), b"x").expect("image file");
        }
        dir
    }

    fn spec(dir: &Path) -> RunSpec {
        RunSpec {
            dir: dir.to_path_buf(),
            secret_file: dir.join(SECRET_FILE),
            serial: "QEMU-0A1B2C3D".into(),
            hostfwd: vec![
                HostFwd::new("--smtp", "127.0.0.1:2525", GUEST_SMTP_PORT).expect("smtp"),
                HostFwd::new("--mgmt", "8443", GUEST_MGMT_PORT).expect("mgmt"),
            ],
            guestfwd: vec!["10.0.2.100:25=127.0.0.1:2526".parse().expect("guestfwd")],
            relay: vec![
                "/opt/seal ctl,1/sealctl".into(),
                "image".into(),
                "relay".into(),
            ],
            kvm: true,
            append: Some("sealgate.test_fault=hang".into()),
            memory_mib: DEFAULT_MEMORY_MIB,
        }
    }

    fn strings(argv: &[OsString]) -> Vec<String> {
        argv.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value following `flag` (each flag given once).
    fn value<'a>(argv: &'a [String], flag: &str) -> &'a str {
        let at = argv.iter().position(|a| a == flag).expect(flag);
        &argv[at + 1]
    }

    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn argv_of_a_run() {
        let dir = image_dir("argv");
        let d = dir.display();
        let argv = strings(&qemu_argv(&spec(&dir)).expect("argv"));
        assert_eq!(argv[0], QEMU);
        for flag in ["-nodefaults", "-no-user-config"] {
            assert!(argv.iter().any(|a| a == flag), "{flag}");
        }
        assert_eq!(value(&argv, "-machine"), "q35");
        assert_eq!(value(&argv, "-accel"), "kvm");
        assert_eq!(value(&argv, "-cpu"), "host");
        assert_eq!(value(&argv, "-m"), "512");
        assert_eq!(value(&argv, "-display"), "none");
        assert_eq!(value(&argv, "-serial"), "stdio");
        assert_eq!(value(&argv, "-kernel"), format!("{d}/vmlinuz"));
        assert_eq!(value(&argv, "-initrd"), format!("{d}/initramfs.cpio.gz"));
        assert_eq!(
            value(&argv, "-append"),
            "console=ttyS0 panic=1 sealgate.ip=10.0.2.15/24 sealgate.gw=10.0.2.2 \
             sealgate.watchdog=15 sealgate.test_fault=hang"
        );
        assert_eq!(
            value(&argv, "-drive"),
            format!("file={d}/disk.img,format=raw,if=none,id=disk0,cache=writeback")
        );
        assert_eq!(
            values(&argv, "-device"),
            [
                "virtio-blk-pci,drive=disk0",
                "virtio-net-pci,netdev=net0",
                "i6300esb"
            ]
        );
        assert_eq!(
            value(&argv, "-netdev"),
            "user,id=net0,restrict=on,net=10.0.2.0/24,host=10.0.2.2,\
             hostfwd=tcp:127.0.0.1:2525-10.0.2.15:25,\
             hostfwd=tcp:127.0.0.1:8443-10.0.2.15:8443,\
             guestfwd=tcp:10.0.2.100:25-cmd:'/opt/seal ctl,,1/sealctl' image relay 127.0.0.1:2526"
        );
        assert_eq!(
            values(&argv, "-fw_cfg"),
            [
                format!("name=opt/sealgate/secret,file={d}/board-secret"),
                "name=opt/sealgate/serial,string=QEMU-0A1B2C3D".to_owned(),
            ]
        );
        assert_eq!(value(&argv, "-action"), "watchdog=reset");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn argv_variants() {
        let dir = image_dir("variants");
        let mut s = spec(&dir);
        s.kvm = false;
        s.append = None;
        s.hostfwd.clear();
        s.guestfwd.clear();
        s.memory_mib = 256;
        s.secret_file = dir.join("a,b");
        let argv = strings(&qemu_argv(&s).expect("argv"));
        assert_eq!(value(&argv, "-accel"), "tcg");
        assert_eq!(value(&argv, "-cpu"), "max");
        assert_eq!(value(&argv, "-m"), "256");
        assert_eq!(value(&argv, "-append"), KERNEL_ARGS);
        assert_eq!(
            value(&argv, "-netdev"),
            "user,id=net0,restrict=on,net=10.0.2.0/24,host=10.0.2.2"
        );
        // QEMU's escape of a comma in a path is a double comma.
        assert_eq!(
            values(&argv, "-fw_cfg")[0],
            format!("name=opt/sealgate/secret,file={}/a,,b", dir.display())
        );
        // Refusals.
        let mut bad = spec(&dir);
        bad.hostfwd.push(HostFwd {
            host: "10.1.1.1:25".parse().expect("addr"),
            guest_port: 25,
        });
        assert!(matches!(qemu_argv(&bad), Err(RunError::NotLoopback { .. })));
        let mut bad = spec(&dir);
        bad.guestfwd[0].host = "192.168.1.1:25".parse().expect("addr");
        assert!(matches!(qemu_argv(&bad), Err(RunError::NotLoopback { .. })));
        let mut bad = spec(&dir);
        bad.serial = "A,B".into();
        assert!(matches!(qemu_argv(&bad), Err(RunError::BadSerial(_))));
        let mut bad = spec(&dir);
        bad.append = Some("x\ny".into());
        assert!(matches!(qemu_argv(&bad), Err(RunError::BadAppend(_))));
        let mut bad = spec(&dir);
        bad.memory_mib = 64;
        assert!(matches!(qemu_argv(&bad), Err(RunError::BadMemory(64))));
        fs::remove_file(dir.join(DISK)).expect("rm disk");
        assert!(matches!(
            qemu_argv(&spec(&dir)),
            Err(RunError::MissingImageFile { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_addresses_are_loopback_only() {
        let table: &[(&str, Option<&str>)] = &[
            ("2525", Some("127.0.0.1:2525")),
            ("127.0.0.1:25", Some("127.0.0.1:25")),
            ("127.3.4.5:8443", Some("127.3.4.5:8443")),
            ("0.0.0.0:25", None),
            ("10.0.2.2:25", None),
            ("192.168.1.1:25", None),
            ("[::1]:25", None),
            ("localhost:25", None),
            ("127.0.0.1", None),
            ("127.0.0.1:0", None),
            ("0", None),
            ("", None),
        ];
        for (input, want) in table {
            let got = loopback_addr("--smtp", input).ok().map(|a| a.to_string());
            assert_eq!(got.as_deref(), *want, "{input}");
        }
        assert!(matches!(
            loopback_addr("--smtp", "8.8.8.8:25"),
            Err(RunError::NotLoopback { .. })
        ));
        assert!(matches!(
            loopback_addr("--smtp", "[::1]:25"),
            Err(RunError::NotLoopback { .. })
        ));
    }

    #[test]
    fn guest_forwards() {
        let table: &[(&str, bool)] = &[
            ("10.0.2.100:25=127.0.0.1:2526", true),
            ("10.0.2.100:25=2526", true),
            ("10.0.2.4:443=127.0.0.2:4443", true),
            ("10.0.2.100:25=10.0.0.1:25", false),
            ("10.0.2.100:25=0.0.0.0:25", false),
            ("10.0.2.100:25=[::1]:25", false),
            ("10.0.3.100:25=127.0.0.1:25", false),
            ("10.0.2.2:25=127.0.0.1:25", false),
            ("10.0.2.15:25=127.0.0.1:25", false),
            ("10.0.2.100:0=127.0.0.1:25", false),
            ("10.0.2.100=127.0.0.1:25", false),
            ("10.0.2.100:25", false),
            ("", false),
        ];
        for (input, ok) in table {
            assert_eq!(input.parse::<GuestFwd>().is_ok(), *ok, "{input}");
        }
        let fwd: GuestFwd = "10.0.2.100:25=2526".parse().expect("fwd");
        assert_eq!(fwd.to_string(), "10.0.2.100:25=127.0.0.1:2526");
    }

    #[test]
    fn accel_names() {
        assert_eq!("auto".parse::<Accel>().ok(), Some(Accel::Auto));
        assert_eq!("kvm".parse::<Accel>().ok(), Some(Accel::Kvm));
        assert_eq!("tcg".parse::<Accel>().ok(), Some(Accel::Tcg));
        assert!("hvf".parse::<Accel>().is_err());
        assert_eq!(Accel::Tcg.resolve().ok(), Some(false));
        let cpu = |flags: &str| format!("processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: x\n");
        assert!(hardware_virt(&cpu("fpu vme vmx sse")));
        assert!(hardware_virt(&cpu("fpu svm")));
        assert!(!hardware_virt(&cpu("fpu hypervisor vmx_ept")));
        assert!(!hardware_virt("vmx"));
    }

    #[test]
    fn identity_secret_created_once_and_serial_derived() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("identity");
        let (path, serial) = board_identity(&dir, None, None).expect("identity");
        assert_eq!(path, dir.join(SECRET_FILE));
        let secret = fs::read(&path).expect("secret");
        assert_eq!(secret.len(), NEW_SECRET_LEN);
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(serial, serial_of(&secret));
        assert!(
            serial.starts_with("QEMU-") && serial.len() == 13,
            "{serial}"
        );
        // The second run keeps the secret and so the serial.
        let (_, again) = board_identity(&dir, None, None).expect("again");
        assert_eq!(again, serial);
        assert_eq!(fs::read(&path).expect("secret"), secret);
        // Given serial, given secret file.
        let (_, given) = board_identity(&dir, None, Some("BOX-1")).expect("given");
        assert_eq!(given, "BOX-1");
        assert!(board_identity(&dir, None, Some("a b")).is_err());
        let short = dir.join("short");
        fs::write(&short, [1u8; 16]).expect("short");
        assert!(matches!(
            board_identity(&dir, Some(&short), None),
            Err(RunError::BadSecret { len: 16, .. })
        ));
        assert!(matches!(
            board_identity(&dir, Some(&dir.join("missing")), None),
            Err(RunError::Secret { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn serial_of_known_secret() {
        // SHA-256 of 32 zero bytes begins 66 68 7a ad.
        assert_eq!(serial_of(&[0u8; 32]), "QEMU-66687AAD");
    }

    #[test]
    fn shell_quoting() {
        let argv: Vec<OsString> = ["qemu", "-append", "a b", "it's", "x=1,y"]
            .into_iter()
            .map(OsString::from)
            .collect();
        assert_eq!(shell_line(&argv), r"qemu -append 'a b' 'it'\''s' x=1,y");
    }
}
