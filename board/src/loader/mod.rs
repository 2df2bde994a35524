//! The stage-1 loader (`/init` of the appliance's initramfs, PID 1): mounts the kernel's
//! filesystems, loads the shipped modules, brings the network up, finds the partitions,
//! chooses a slot from boot control, verifies its signed bundle into `/run`, arms the watchdog
//! and `exec`s the gateway. One console line per step, prefixed `sealgate-loader: `; every
//! failure says why. It never panics (a panic of PID 1 is a kernel panic): a slot that fails
//! falls back to the other one — refused in boot control when its bundle is bad, only
//! `SKIPPED on this boot` when the failure was local (see [`boot::SlotFailure`]) — and with
//! none left it halts, printing why, with the watchdog unarmed so the console stays readable.

pub mod boot;
pub mod modules;
pub mod net;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustix::mount::MountFlags;
use sealgate_image::bootctl::{BootControl, Slot};

use crate::appliance::{self, Watchdog};

/// Prefix of every console line.
pub const PREFIX: &str = "sealgate-loader: ";
/// Files baked into the initramfs.
pub const ETC: &str = "/etc/sealgate";
/// Where verified payloads are copied (a tmpfs).
pub const RUN_DIR: &str = "/run";
/// How long to wait for the block partitions.
pub const PARTITION_WAIT: Duration = Duration::from_secs(10);
/// The partitions the loader itself needs.
pub const BOOT_LABELS: [&str; 3] = ["bootctl", "slot_a", "slot_b"];

/// Prints one console line (errors writing the console are ignored: nothing else to tell).
pub fn say(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{PREFIX}{msg}");
    let _ = out.flush();
}

/// Prints why and halts for good (PID 1 must not exit).
pub fn halt(why: &str) -> ! {
    say(&format!("HALTED: {why}"));
    appliance::halt_forever()
}

/// The loader's `main`: never returns (it `exec`s the gateway or halts).
pub fn main() -> ! {
    std::panic::set_hook(Box::new(|info| {
        say(&format!("internal error: {info}"));
        appliance::halt_forever()
    }));
    if !rustix::process::getpid().is_init() {
        say("must run as PID 1 (the /init of the appliance's initramfs); refusing to run");
        std::process::exit(2);
    }
    say("starting");
    early_mounts();
    ensure_std_fds();
    let cmdline = appliance::cmdline();
    say(&format!("kernel command line: {cmdline}"));

    let (ok, failed) = modules::load_all(Path::new(modules::MODULES_DIR), &mut |l| say(&l));
    say(&format!("modules: {ok} loaded, {failed} failed"));

    bring_up_network(&cmdline);

    let parts = match appliance::wait_partitions(&BOOT_LABELS, PARTITION_WAIT) {
        Ok(p) => p,
        Err(e) => halt(&e.to_string()),
    };
    for (label, dev) in &parts {
        say(&format!("partition {label}: {}", dev.display()));
    }
    for label in ["sealed", "data"] {
        match appliance::find_partition(label) {
            Ok(Some(dev)) => say(&format!("partition {label}: {}", dev.display())),
            Ok(None) => say(&format!("WARNING: partition {label} not found")),
            Err(e) => say(&format!("WARNING: partition {label}: {e}")),
        }
    }

    let (secret, serial) = appliance::fw_cfg_report(Path::new(appliance::FW_CFG_DIR));
    say(&format!(
        "fw_cfg: board secret {}, serial {}",
        if secret { "present" } else { "MISSING" },
        match serial {
            Ok(s) => s,
            Err(e) => format!("unreadable ({e})"),
        }
    ));

    boot(&cmdline, &parts)
}

/// proc, sysfs, devtmpfs and /run; a failure is printed (a later step names what it breaks).
fn early_mounts() {
    let nsx = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    for (fstype, at, flags, data) in [
        ("proc", "/proc", nsx, None),
        ("sysfs", "/sys", nsx, None),
        (
            "devtmpfs",
            "/dev",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            RUN_DIR,
            MountFlags::NOSUID | MountFlags::NODEV,
            Some("mode=0755"),
        ),
    ] {
        match appliance::mount_pseudo(fstype, Path::new(at), flags, data) {
            Ok(()) => say(&format!("mounted {fstype} at {at}")),
            Err(e) => say(&format!("WARNING: {e}")),
        }
    }
}

/// Makes sure descriptors 0-2 are open (on the console, else /dev/null), so the watchdog
/// descriptor is never one of them and the gateway has somewhere to write.
fn ensure_std_fds() {
    for _ in 0..3 {
        if (0..3).all(|fd| Path::new(&format!("/proc/self/fd/{fd}")).exists()) {
            return;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .or_else(|_| OpenOptions::new().read(true).write(true).open("/dev/null"));
        let Ok(f) = f else { return };
        let fd = OwnedFd::from(f);
        if fd.as_raw_fd() > 2 {
            return;
        }
        // The standard descriptors must survive the exec.
        let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty());
        let _ = fd.into_raw_fd();
    }
}

fn bring_up_network(cmdline: &str) {
    match net::loopback_up() {
        Ok(()) => say("lo up"),
        Err(e) => say(&format!("WARNING: {e}")),
    }
    let cfg = match net::config_from_cmdline(cmdline) {
        Ok(Some(c)) => c,
        Ok(None) => {
            say(&format!(
                "no sealgate.ip on the command line: {} left unconfigured",
                net::IFACE
            ));
            return;
        }
        Err(e) => {
            say(&format!("WARNING: {e}; {} left unconfigured", net::IFACE));
            return;
        }
    };
    if !net::wait_interface(net::IFACE, Duration::from_secs(5)) {
        say(&format!("WARNING: no {} interface", net::IFACE));
        return;
    }
    match net::configure(net::IFACE, &cfg) {
        Ok(()) => say(&format!(
            "{} up: {}/{}{}",
            net::IFACE,
            cfg.addr,
            cfg.prefix,
            cfg.gateway
                .map(|g| format!(", default route via {g}"))
                .unwrap_or_default()
        )),
        Err(e) => say(&format!("WARNING: {e}")),
    }
}

/// Boot control, slot choice, verification, watchdog, exec — never returns.
fn boot(cmdline: &str, parts: &std::collections::BTreeMap<String, PathBuf>) -> ! {
    let etc = Path::new(ETC);
    let board = read_board(etc);
    let keys = read_image_keys(etc, &board);
    let trust = boot::Trust {
        keys: &keys,
        board: &board,
        max_payload: sealgate_image::bundle::MAX_PAYLOAD,
    };
    let (mut ctl_dev, mut ctl) = open_boot_control(parts);
    let slot_devs = [
        parts.get("slot_a").map(PathBuf::as_path),
        parts.get("slot_b").map(PathBuf::as_path),
    ];
    let mut watchdog: Option<Watchdog> = None;
    // Slots that failed locally on this boot: never chosen again before the next one.
    let mut skipped = boot::Skipped::default();
    loop {
        let Some(staged) = boot::choose_and_stage(
            &mut ctl_dev,
            &mut ctl,
            &mut skipped,
            slot_devs,
            &trust,
            Path::new(RUN_DIR),
            &mut |l| say(&l),
        ) else {
            give_up(watchdog.take())
        };
        if watchdog.is_none() {
            watchdog = arm_watchdog(cmdline);
        }
        let failure = exec_staged(&staged, watchdog.as_ref());
        boot::fail(
            &mut ctl_dev,
            &mut ctl,
            &mut skipped,
            staged.slot,
            staged.trial,
            &failure,
            &mut |l| say(&l),
        );
    }
}

/// The board name from `<etc>/board` (trimmed); halts if it is missing or empty.
fn read_board(etc: &Path) -> String {
    match std::fs::read_to_string(etc.join("board")) {
        Ok(b) if !b.trim().is_empty() => b.trim().to_string(),
        Ok(_) => halt(&format!("{} is empty", etc.join("board").display())),
        Err(e) => halt(&format!("cannot read {}: {e}", etc.join("board").display())),
    }
}

/// The image keys of `<etc>/image-keys` by key id, logged with `board`; halts if they cannot
/// be read.
fn read_image_keys(etc: &Path, board: &str) -> std::collections::BTreeMap<[u8; 8], [u8; 32]> {
    let keys_dir = etc.join("image-keys");
    let keys = match sealgate_image::keys::read_public_keys_dir(&keys_dir) {
        Ok(k) => k,
        Err(e) => halt(&format!("image keys {}: {e}", keys_dir.display())),
    };
    let ids: Vec<String> = keys.keys().map(sealgate_image::keys::key_id_hex).collect();
    say(&format!(
        "board {board}; image keys: {}",
        if ids.is_empty() {
            format!("NONE in {} (no bundle can verify)", keys_dir.display())
        } else {
            ids.join(", ")
        }
    ));
    keys
}

/// Opens the bootctl partition and loads boot control (logging its state); halts if the
/// partition is missing or cannot be opened.
fn open_boot_control(
    parts: &std::collections::BTreeMap<String, PathBuf>,
) -> (std::fs::File, BootControl) {
    let Some(ctl_path) = parts.get("bootctl") else {
        halt("partition bootctl not found")
    };
    let mut ctl_dev = match OpenOptions::new().read(true).write(true).open(ctl_path) {
        Ok(f) => f,
        Err(e) => halt(&format!("cannot open {}: {e}", ctl_path.display())),
    };
    let ctl = boot::load_boot_control(&mut ctl_dev, &mut |l| say(&l));
    say(&format!(
        "boot control generation {}, floor {}; {}; {}",
        ctl.generation,
        ctl.floor,
        boot::describe(&ctl, Slot::A),
        boot::describe(&ctl, Slot::B)
    ));
    (ctl_dev, ctl)
}

/// No slot can boot: disarms the watchdog, if armed, and halts.
fn give_up(watchdog: Option<Watchdog>) -> ! {
    if let Some(w) = watchdog {
        match w.disarm() {
            Ok(()) => say("watchdog disarmed"),
            Err(e) => say(&format!(
                "WARNING: cannot disarm the watchdog ({e}); the board will reset"
            )),
        }
    }
    halt("no slot can boot; the reasons are above")
}

/// Executes the staged program, handing it the watchdog (if armed, petted first); returns
/// only when the exec fails, with what that means for the slot ([`boot::exec_failure`]).
fn exec_staged(staged: &boot::Staged, watchdog: Option<&Watchdog>) -> boot::SlotFailure {
    let mut cmd = Command::new(&staged.program);
    cmd.args(staged.args());
    if let Some(w) = watchdog {
        match w.pet().and_then(|()| w.inherit_on_exec()) {
            Ok(fd) => {
                cmd.env(appliance::WATCHDOG_FD_ENV, fd.to_string());
            }
            Err(e) => say(&format!(
                "WARNING: cannot hand the watchdog over ({e}); it will reset the board"
            )),
        }
    }
    say(&format!(
        "exec {} {}",
        staged.program.display(),
        staged.args().join(" ")
    ));
    let err = cmd.exec();
    boot::exec_failure(&staged.program, &err)
}

fn arm_watchdog(cmdline: &str) -> Option<Watchdog> {
    let secs = appliance::watchdog_secs(cmdline);
    match Watchdog::arm(Path::new(appliance::WATCHDOG_DEV), secs) {
        Ok(w) => {
            say(&format!("watchdog armed: {} s", w.timeout().as_secs()));
            Some(w)
        }
        Err(e) => {
            say(&format!(
                "WARNING: no watchdog ({}: {e}); booting without one",
                appliance::WATCHDOG_DEV
            ));
            None
        }
    }
}
