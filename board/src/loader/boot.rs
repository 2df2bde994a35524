//! Choosing and staging the slot to boot: boot control read from the `bootctl` partition, the
//! chosen slot's bundle verified while its payload is copied out, and the fallback to the other
//! slot. Plain file I/O, so the whole decision runs on a host with temporary files standing in
//! for the partitions.
//!
//! A slot that fails is handled by why ([`SlotFailure`]): a bad bundle (signature, key, board,
//! floor, format, length, hash; a payload the kernel cannot execute) is refused — marked
//! unbootable in boot control with the reason. A local failure (staging into `/run`, reading
//! the slot's partition, recording the boot try, `exec`) only skips the slot on this boot
//! ([`Skipped`]): boot control keeps it bootable and gets back the try this boot used.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sealgate_image::bootctl::{BootControl, BootCtlError, Choice, Slot};
use sealgate_image::bundle::{self, BundleError, Header};
use sealgate_image::version::Version;

/// Longest note kept in boot control (the format's bound).
const NOTE_MAX: usize = 120;
/// More rounds than two slots can need; a bound against a boot control that keeps choosing a
/// slot just refused.
const MAX_ROUNDS: usize = 4;

/// What a bundle must satisfy besides the floor recorded in boot control.
#[derive(Debug, Clone, Copy)]
pub struct Trust<'a> {
    /// Image-signing public keys by key id.
    pub keys: &'a BTreeMap<[u8; 8], [u8; 32]>,
    /// This board's name (`/etc/sealgate/board`).
    pub board: &'a str,
    /// Largest payload accepted.
    pub max_payload: u64,
}

/// Why a chosen slot did not boot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotFailure {
    /// The slot itself is bad (its bundle failed verification, its partition is missing, its
    /// payload is not an executable): refused, marked unbootable in boot control.
    #[error("{0}")]
    BadBundle(String),
    /// Something on this box failed on this boot (I/O staging into `/run` or reading the
    /// slot's partition, writing boot control, `exec`): the slot is skipped on this boot only.
    #[error("{0}")]
    Local(String),
}

/// The slots skipped on this boot after a local failure: never chosen again before the next
/// boot, whatever boot control says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped([bool; 2]);

impl Skipped {
    fn index(slot: Slot) -> usize {
        match slot {
            Slot::A => 0,
            Slot::B => 1,
        }
    }

    /// Slot `slot` is not chosen again on this boot.
    pub fn insert(&mut self, slot: Slot) {
        self.0[Self::index(slot)] = true;
    }

    /// Whether `slot` was skipped on this boot.
    pub fn contains(&self, slot: Slot) -> bool {
        self.0[Self::index(slot)]
    }
}

/// A verified payload ready to be executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub slot: Slot,
    /// The version in the verified bundle header.
    pub version: Version,
    /// A trial boot (the slot has not yet been marked successful).
    pub trial: bool,
    /// The payload, mode 0500.
    pub program: PathBuf,
}

impl Staged {
    /// The arguments after the program: `appliance --slot <a|b> --version <V>`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "appliance".to_string(),
            "--slot".to_string(),
            self.slot.letter().to_string(),
            "--version".to_string(),
            self.version.to_string(),
        ]
    }
}

/// Boot control from the `bootctl` device. With no valid copy (a blank or corrupt partition)
/// logs it loudly and starts over from `BootControl::new_image(0.0.0)`: slot A on trial with
/// fresh tries, B empty. A device that cannot be read is retried; starting over then would
/// overwrite a good copy and lose the rollback floor, so after the retries this halts.
pub fn load_boot_control(dev: &mut File, log: &mut dyn FnMut(String)) -> BootControl {
    let mut attempt = 0;
    loop {
        match BootControl::load(dev) {
            Ok(c) => return c,
            Err(BootCtlError::Io(e)) if attempt < 5 => {
                attempt += 1;
                log(format!("boot control read error ({e}); retry {attempt}"));
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(BootCtlError::Io(e)) => {
                log(format!(
                    "HALT: boot control cannot be read ({e}); not starting over (that would \
                     lose the rollback floor)"
                ));
                crate::appliance::halt_forever();
            }
            Err(e) => {
                log(format!(
                    "WARNING: boot control unusable ({e}); starting over: slot A on trial, slot B empty, floor 0.0.0"
                ));
                return BootControl::new_image(Version::default());
            }
        }
    }
}

/// Writes boot control to its device and fsyncs it.
pub fn store(dev: &mut File, ctl: &mut BootControl) -> Result<(), String> {
    ctl.store(dev).map_err(|e| e.to_string())?;
    dev.sync_all().map_err(|e| format!("fsync: {e}"))
}

/// One line describing a slot's state.
pub fn describe(ctl: &BootControl, s: Slot) -> String {
    let st = ctl.slot(s);
    let mut d = format!(
        "slot {}: version {}, priority {}, tries {}, {}",
        s.letter(),
        st.version,
        st.priority,
        st.tries,
        if st.successful {
            "successful"
        } else {
            "not successful"
        }
    );
    if !st.note.is_empty() {
        d.push_str(&format!(", note: {}", st.note));
    }
    d
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Records that `slot` cannot boot and why, and stores boot control (a failed store is logged:
/// the slot is still skipped on this boot).
pub fn refuse(
    ctl_dev: &mut File,
    ctl: &mut BootControl,
    slot: Slot,
    reason: &str,
    log: &mut dyn FnMut(String),
) {
    log(format!("slot {} REFUSED: {reason}", slot.letter()));
    ctl.mark_unbootable(slot, truncate(reason, NOTE_MAX));
    if let Err(e) = store(ctl_dev, ctl) {
        log(format!(
            "WARNING: cannot record the refusal in boot control: {e}"
        ));
    }
}

/// Skips `slot` on this boot after a local failure: it is added to `skipped` and boot control
/// is left bootable. With `give_back_try` (a trial whose try was recorded) the try is returned
/// and boot control stored again (a failed store is logged: the slot then lost one try).
pub fn skip(
    ctl_dev: &mut File,
    ctl: &mut BootControl,
    skipped: &mut Skipped,
    slot: Slot,
    give_back_try: bool,
    reason: &str,
    log: &mut dyn FnMut(String),
) {
    log(format!(
        "slot {} SKIPPED on this boot: {reason}",
        slot.letter()
    ));
    skipped.insert(slot);
    if give_back_try {
        let st = ctl.slot_mut(slot);
        st.tries = st.tries.saturating_add(1);
        if let Err(e) = store(ctl_dev, ctl) {
            log(format!(
                "WARNING: cannot give slot {} its try back in boot control: {e}",
                slot.letter()
            ));
        }
    }
}

/// Acts on `failure` of `slot` (booted as a `trial` or not): a bad bundle is refused
/// ([`refuse`]), a local failure skips the slot on this boot ([`skip`], its try given back).
pub fn fail(
    ctl_dev: &mut File,
    ctl: &mut BootControl,
    skipped: &mut Skipped,
    slot: Slot,
    trial: bool,
    failure: &SlotFailure,
    log: &mut dyn FnMut(String),
) {
    match failure {
        SlotFailure::BadBundle(reason) => refuse(ctl_dev, ctl, slot, reason, log),
        SlotFailure::Local(reason) => skip(ctl_dev, ctl, skipped, slot, trial, reason, log),
    }
}

/// What a failed `exec` of the staged `program` means: a payload the kernel cannot execute
/// (`ENOEXEC`, `EINVAL`, `ELIBBAD`, or `ENOENT` while the file exists: a missing ELF
/// interpreter, or glibc's `/bin/sh` fallback for a non-ELF file) is a bad bundle; anything
/// else (memory, permissions, a vanished file) is local.
pub fn exec_failure(program: &Path, err: &io::Error) -> SlotFailure {
    use rustix::io::Errno;
    let reason = format!("cannot execute {}: {err}", program.display());
    let bad = match Errno::from_io_error(err) {
        Some(Errno::NOEXEC | Errno::INVAL | Errno::LIBBAD) => true,
        Some(Errno::NOENT) => program.is_file(),
        _ => false,
    };
    if bad {
        SlotFailure::BadBundle(reason)
    } else {
        SlotFailure::Local(reason)
    }
}

/// Chooses a slot not in `skipped`, records the try, verifies the slot's bundle while copying
/// its payload to `<run_dir>/sealgate-<a|b>`, and falls back to the other slot when that fails
/// ([`fail`]: a bad bundle is refused, a local failure skips the slot on this boot).
/// `slot_devs` are the devices of slots A and B (`None`: partition not found). `None` when no
/// slot can boot (logged with both slots' state).
///
/// A trial boot whose try cannot be recorded is skipped on this boot: booting it anyway could
/// loop forever on a bad image instead of falling back.
pub fn choose_and_stage(
    ctl_dev: &mut File,
    ctl: &mut BootControl,
    skipped: &mut Skipped,
    slot_devs: [Option<&Path>; 2],
    trust: &Trust<'_>,
    run_dir: &Path,
    log: &mut dyn FnMut(String),
) -> Option<Staged> {
    for _ in 0..MAX_ROUNDS {
        let (slot, trial) = choose(ctl, skipped, log)?;
        if let Err(e) = record_try(ctl_dev, ctl, trial, log) {
            // Nothing reached the disk: the try is given back in memory only.
            let st = ctl.slot_mut(slot);
            st.tries = st.tries.saturating_add(1);
            let reason = format!("cannot record the boot try: {e}");
            skip(ctl_dev, ctl, skipped, slot, false, &reason, log);
            continue;
        }
        let dev = match slot {
            Slot::A => slot_devs[0],
            Slot::B => slot_devs[1],
        };
        let Some(dev) = dev else {
            refuse(
                ctl_dev,
                ctl,
                slot,
                &format!("partition {} not found", slot.label()),
                log,
            );
            continue;
        };
        let program = run_dir.join(format!("sealgate-{}", slot.letter()));
        let floor = ctl.floor;
        match stage(dev, trust, floor, &program) {
            Ok(h) => return Some(staged(ctl_dev, ctl, slot, trial, &h, program, log)),
            Err(failure) => fail(ctl_dev, ctl, skipped, slot, trial, &failure, log),
        }
    }
    log("NO BOOTABLE SLOT: boot control keeps choosing refused slots".to_string());
    None
}

/// [`BootControl::choose`] among the slots not in `skipped`; a skipped slot is left exactly as
/// it is (not chosen, no try used).
pub fn choose_excluding(ctl: &mut BootControl, skipped: &Skipped) -> Choice {
    let mut view = ctl.clone();
    for s in Slot::ALL {
        if skipped.contains(s) {
            view.slot_mut(s).priority = 0;
        }
    }
    let choice = view.choose();
    for s in Slot::ALL {
        if !skipped.contains(s) {
            *ctl.slot_mut(s) = view.slot(s).clone();
        }
    }
    choice
}

/// Boot control's choice among the slots not skipped (slot, trial boot?), logged; `None` when
/// no slot is left (logged with both slots' state).
fn choose(
    ctl: &mut BootControl,
    skipped: &Skipped,
    log: &mut dyn FnMut(String),
) -> Option<(Slot, bool)> {
    let (slot, trial) = match choose_excluding(ctl, skipped) {
        Choice::Boot { slot, trial } => (slot, trial),
        Choice::NoBootableSlot => {
            let state = |s: Slot| {
                let mut d = describe(ctl, s);
                if skipped.contains(s) {
                    d.push_str(" (SKIPPED on this boot)");
                }
                d
            };
            log(format!(
                "NO BOOTABLE SLOT (floor {}): {}; {}",
                ctl.floor,
                state(Slot::A),
                state(Slot::B)
            ));
            return None;
        }
    };
    let st = ctl.slot(slot);
    log(format!(
        "slot {} chosen: version {}, {}",
        slot.letter(),
        st.version,
        if trial {
            format!("trial boot, {} tries left after this one", st.tries)
        } else {
            "known good".to_string()
        }
    ));
    Some((slot, trial))
}

/// Stores boot control after a choice (recording the try). An error when a trial boot's try
/// cannot be recorded (the slot is then skipped); for a known good slot a failure is logged.
fn record_try(
    ctl_dev: &mut File,
    ctl: &mut BootControl,
    trial: bool,
    log: &mut dyn FnMut(String),
) -> Result<(), String> {
    match store(ctl_dev, ctl) {
        Err(e) if trial => Err(e),
        Err(e) => {
            log(format!("WARNING: cannot write boot control: {e}"));
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Logs the verified bundle `h` staged as `program` and, if boot control disagrees about the
/// slot's version, records the bundle's (a failed store is logged); returns what was staged.
fn staged(
    ctl_dev: &mut File,
    ctl: &mut BootControl,
    slot: Slot,
    trial: bool,
    h: &Header,
    program: PathBuf,
    log: &mut dyn FnMut(String),
) -> Staged {
    log(format!(
        "slot {} verified: version {}, board {}, key {}, {} bytes -> {}",
        slot.letter(),
        h.version,
        h.board,
        sealgate_image::keys::key_id_hex(&h.key_id),
        h.payload_len,
        program.display()
    ));
    if ctl.slot(slot).version != h.version {
        log(format!(
            "boot control said version {} for slot {}, the bundle says {}: recording the bundle's",
            ctl.slot(slot).version,
            slot.letter(),
            h.version
        ));
        ctl.slot_mut(slot).version = h.version;
        if let Err(e) = store(ctl_dev, ctl) {
            log(format!("WARNING: cannot write boot control: {e}"));
        }
    }
    Staged {
        slot,
        version: h.version,
        trial,
        program,
    }
}

/// A writer that remembers a failed write, so that a bundle I/O error names its side.
struct Tracked<W> {
    inner: W,
    failed: bool,
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|_| self.failed = true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

/// Verifies the bundle on `dev` (floor `floor`) while copying its payload to `program`
/// (created anew, mode 0500); on any failure `program` is removed and the failure returned:
/// [`SlotFailure::BadBundle`] when verification failed, [`SlotFailure::Local`] when the
/// partition could not be opened or read or `program` not created or written.
pub fn stage(
    dev: &Path,
    trust: &Trust<'_>,
    floor: Version,
    program: &Path,
) -> Result<Header, SlotFailure> {
    let local = SlotFailure::Local;
    let input =
        File::open(dev).map_err(|e| local(format!("cannot open {}: {e}", dev.display())))?;
    match fs::remove_file(program) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(local(format!(
                "cannot remove old {}: {e}",
                program.display()
            )));
        }
    }
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o500)
        .open(program)
        .map_err(|e| local(format!("cannot create {}: {e}", program.display())))?;
    let mut r = BufReader::with_capacity(64 << 10, input);
    let mut w = Tracked {
        inner: BufWriter::with_capacity(64 << 10, out),
        failed: false,
    };
    let result = bundle::verify_stream(
        &mut r,
        trust.keys,
        trust.board,
        floor,
        trust.max_payload,
        &mut w,
    )
    .and_then(|h| {
        w.flush()?;
        Ok(h)
    })
    .map_err(|e| match e {
        BundleError::Io(e) if w.failed => local(format!("cannot write {}: {e}", program.display())),
        BundleError::Io(e) => local(format!("cannot read {}: {e}", dev.display())),
        e => SlotFailure::BadBundle(e.to_string()),
    });
    drop(w);
    if result.is_err() {
        let _ = fs::remove_file(program);
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use ring::signature::Ed25519KeyPair;
    use sealgate_image::bootctl::COPY_LEN;
    use sealgate_image::keys;
    use std::io::Cursor;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    const BOARD: &str = bundle::BOARD_QEMU;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    /// The state the loader keeps through one boot.
    struct OneBoot {
        dev: File,
        ctl: BootControl,
        skipped: Skipped,
    }

    /// A temporary directory with a bootctl "partition", two slot "partitions", a run dir and
    /// a signing key; removed on drop.
    struct Rig {
        dir: PathBuf,
        key: Ed25519KeyPair,
        keys: BTreeMap<[u8; 8], [u8; 32]>,
        lines: Vec<String>,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn new_key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_pkcs8(&keys::generate_key().unwrap()).unwrap()
    }

    impl Rig {
        fn new(tag: &str) -> Rig {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "sg-loader-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("run")).unwrap();
            let key = new_key();
            let public = keys::public_key_of(&key);
            let keys = BTreeMap::from([(keys::key_id(&public), public)]);
            Rig {
                dir,
                key,
                keys,
                lines: Vec::new(),
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.join(name)
        }

        fn payload(version: Version) -> Vec<u8> {
            format!("\x7fELF sealgate {version}")
                .into_bytes()
                .repeat(5000)
        }

        /// Writes a bundle of `version` signed by `key` (default: the trusted one) to the slot
        /// "partition" `name`, followed by zeros like the rest of a partition.
        fn write_slot(
            &self,
            name: &str,
            version: Version,
            board: &str,
            key: Option<&Ed25519KeyPair>,
        ) -> Vec<u8> {
            let payload = Self::payload(version);
            let mut out = Vec::new();
            bundle::sign(
                &mut Cursor::new(&payload),
                version,
                board,
                key.unwrap_or(&self.key),
                1_700_000_000,
                &mut out,
            )
            .unwrap();
            out.extend_from_slice(&[0u8; 4096]);
            fs::write(self.path(name), &out).unwrap();
            payload
        }

        fn write_ctl(&self, ctl: &mut BootControl) {
            let p = self.path("bootctl");
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .unwrap();
            f.set_len(2 * COPY_LEN as u64).unwrap();
            store(&mut f, ctl).unwrap();
        }

        fn read_ctl(&self) -> BootControl {
            BootControl::load(&mut File::open(self.path("bootctl")).unwrap()).unwrap()
        }

        fn run(&mut self, slots: [Option<&str>; 2]) -> Option<Staged> {
            let mut dev = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path("bootctl"))
                .unwrap();
            self.run_with(&mut dev, slots)
        }

        fn run_with(&mut self, dev: &mut File, slots: [Option<&str>; 2]) -> Option<Staged> {
            let ctl = load_boot_control(dev, &mut |l| self.lines.push(l));
            let mut boot = OneBoot {
                dev: dev.try_clone().unwrap(),
                ctl,
                skipped: Skipped::default(),
            };
            self.stage_in(&mut boot, slots)
        }

        /// A new boot: boot control loaded, nothing skipped yet.
        fn begin(&mut self) -> OneBoot {
            let mut dev = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path("bootctl"))
                .unwrap();
            let ctl = load_boot_control(&mut dev, &mut |l| self.lines.push(l));
            OneBoot {
                dev,
                ctl,
                skipped: Skipped::default(),
            }
        }

        /// One round of `boot` (the loader's loop) within the boot `b`.
        fn stage_in(&mut self, b: &mut OneBoot, slots: [Option<&str>; 2]) -> Option<Staged> {
            let a = slots[0].map(|n| self.path(n));
            let bb = slots[1].map(|n| self.path(n));
            let trust = Trust {
                keys: &self.keys,
                board: BOARD,
                max_payload: bundle::MAX_PAYLOAD,
            };
            let run = self.dir.join("run");
            let mut lines = Vec::new();
            let r = choose_and_stage(
                &mut b.dev,
                &mut b.ctl,
                &mut b.skipped,
                [a.as_deref(), bb.as_deref()],
                &trust,
                &run,
                &mut |l| lines.push(l),
            );
            self.lines.extend(lines);
            r
        }

        /// The staged program of boot `b` failed (as its `exec` would).
        fn fail_in(&mut self, b: &mut OneBoot, staged: &Staged, failure: &SlotFailure) {
            let mut lines = Vec::new();
            fail(
                &mut b.dev,
                &mut b.ctl,
                &mut b.skipped,
                staged.slot,
                staged.trial,
                failure,
                &mut |l| lines.push(l),
            );
            self.lines.extend(lines);
        }

        fn log(&self) -> String {
            self.lines.join("\n")
        }
    }

    #[test]
    fn a_good_slot_a_is_verified_staged_and_its_try_recorded() {
        let mut rig = Rig::new("good");
        let payload = rig.write_slot("slot_a", v("1.2.3"), BOARD, None);
        rig.write_ctl(&mut BootControl::new_image(v("1.2.3")));
        let staged = rig.run([Some("slot_a"), Some("slot_b")]).unwrap();
        assert_eq!(staged.slot, Slot::A);
        assert_eq!(staged.version, v("1.2.3"));
        assert!(staged.trial);
        assert_eq!(staged.program, rig.path("run/sealgate-a"));
        assert_eq!(
            staged.args(),
            ["appliance", "--slot", "a", "--version", "1.2.3"]
        );
        assert_eq!(fs::read(&staged.program).unwrap(), payload);
        let mode = fs::metadata(&staged.program).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o500);
        // The try is on disk before the payload runs.
        let ctl = rig.read_ctl();
        assert_eq!(
            ctl.slot(Slot::A).tries,
            sealgate_image::bootctl::DEFAULT_TRIES - 1
        );
        assert!(rig.log().contains("slot a chosen"), "{}", rig.log());
        assert!(rig.log().contains("slot a verified"), "{}", rig.log());

        // A known-good slot boots without using a try.
        let mut ctl = rig.read_ctl();
        ctl.mark_successful(Slot::A);
        rig.write_ctl(&mut ctl);
        let staged = rig.run([Some("slot_a"), None]).unwrap();
        assert!(!staged.trial);
        assert_eq!(rig.read_ctl().slot(Slot::A), ctl.slot(Slot::A));
    }

    #[test]
    fn a_bad_signature_in_b_falls_back_to_a_and_b_is_marked_with_the_reason() {
        let mut rig = Rig::new("badsig");
        rig.write_slot("slot_a", v("1.0.0"), BOARD, None);
        let mut ctl = BootControl::new_image(v("1.0.0"));
        ctl.mark_successful(Slot::A);
        ctl.install_begin(Slot::B);
        ctl.install_commit(Slot::B, v("1.1.0"));
        rig.write_ctl(&mut ctl);
        // B: a valid bundle with one signature bit flipped.
        rig.write_slot("slot_b", v("1.1.0"), BOARD, None);
        let mut b = fs::read(rig.path("slot_b")).unwrap();
        b[bundle::HEADER_LEN + 10] ^= 0x01;
        fs::write(rig.path("slot_b"), &b).unwrap();

        let staged = rig.run([Some("slot_a"), Some("slot_b")]).unwrap();
        assert_eq!(staged.slot, Slot::A);
        assert!(!staged.trial);
        assert!(
            !rig.path("run/sealgate-b").exists(),
            "a refused payload is removed"
        );
        let ctl = rig.read_ctl();
        let b = ctl.slot(Slot::B);
        assert_eq!((b.priority, b.tries, b.successful), (0, 0, false));
        assert!(b.note.contains("signature"), "{}", b.note);
        assert!(rig.log().contains("slot b REFUSED"), "{}", rig.log());

        // An unknown signing key is refused too, naming it.
        let mut rig = Rig::new("unknownkey");
        let other = new_key();
        rig.write_slot("slot_a", v("1.0.0"), BOARD, Some(&other));
        rig.write_ctl(&mut BootControl::new_image(v("1.0.0")));
        assert!(rig.run([Some("slot_a"), Some("slot_b")]).is_none());
        let note = rig.read_ctl().slot(Slot::A).note.clone();
        let id = keys::key_id_hex(&keys::key_id_of(&other));
        assert!(note.contains(&id) || note.contains("key"), "{note}");
        assert!(rig.log().contains("NO BOOTABLE SLOT"), "{}", rig.log());
    }

    #[test]
    fn a_trial_slot_out_of_tries_falls_back_then_nothing_is_left() {
        let mut rig = Rig::new("tries");
        good_a_trial_b(&rig);
        // Each boot of B uses a try (the gateway never marks it successful).
        for _ in 0..sealgate_image::bootctl::DEFAULT_TRIES {
            assert_eq!(
                rig.run([Some("slot_a"), Some("slot_b")]).unwrap().slot,
                Slot::B
            );
        }
        assert_eq!(rig.read_ctl().slot(Slot::B).tries, 0);
        assert_eq!(
            rig.run([Some("slot_a"), Some("slot_b")]).unwrap().slot,
            Slot::A
        );

        // A never-successful slot A with no tries left and an empty B: nothing boots.
        let mut rig = Rig::new("tries2");
        rig.write_slot("slot_a", v("1.0.0"), BOARD, None);
        rig.write_ctl(&mut BootControl::new_image(v("1.0.0")));
        for _ in 0..sealgate_image::bootctl::DEFAULT_TRIES {
            assert!(rig.run([Some("slot_a"), None]).is_some());
        }
        assert!(rig.run([Some("slot_a"), None]).is_none());
        assert!(rig.log().contains("NO BOOTABLE SLOT"), "{}", rig.log());
        assert!(rig.log().contains("tries 0"), "{}", rig.log());
    }

    #[test]
    fn a_bundle_below_the_floor_is_refused_even_if_boot_control_says_otherwise() {
        let mut rig = Rig::new("floor");
        // Slot A holds 1.0.0 but boot control believes 2.0.0, with the floor at 2.0.0: the
        // bundle's own version is checked against the floor.
        rig.write_slot("slot_a", v("1.0.0"), BOARD, None);
        let mut ctl = BootControl::new_image(v("2.0.0"));
        ctl.mark_successful(Slot::A);
        assert_eq!(ctl.floor, v("2.0.0"));
        rig.write_ctl(&mut ctl);
        assert!(rig.run([Some("slot_a"), Some("slot_b")]).is_none());
        let a = rig.read_ctl().slot(Slot::A).clone();
        assert_eq!(a.priority, 0);
        assert!(
            a.note.contains("1.0.0") && a.note.contains("2.0.0"),
            "{}",
            a.note
        );

        // A slot recorded below the floor is not even chosen.
        let mut rig = Rig::new("floor2");
        rig.write_slot("slot_a", v("1.0.0"), BOARD, None);
        let mut ctl = BootControl::new_image(v("1.0.0"));
        ctl.floor = v("1.5.0");
        rig.write_ctl(&mut ctl);
        assert!(rig.run([Some("slot_a"), None]).is_none());
        assert!(!rig.log().contains("slot a chosen"), "{}", rig.log());
    }

    #[test]
    fn wrong_board_truncated_or_missing_slots_are_refused() {
        let mut rig = Rig::new("board");
        rig.write_slot("slot_a", v("1.0.0"), "other-board", None);
        rig.write_ctl(&mut BootControl::new_image(v("1.0.0")));
        assert!(rig.run([Some("slot_a"), None]).is_none());
        assert!(rig.read_ctl().slot(Slot::A).note.contains("other-board"));

        let mut rig = Rig::new("trunc");
        rig.write_slot("slot_a", v("1.0.0"), BOARD, None);
        let a = fs::read(rig.path("slot_a")).unwrap();
        fs::write(rig.path("slot_a"), &a[..bundle::PREFIX_LEN + 1000]).unwrap();
        rig.write_ctl(&mut BootControl::new_image(v("1.0.0")));
        assert!(rig.run([Some("slot_a"), None]).is_none());
        assert!(!rig.path("run/sealgate-a").exists());
        assert!(rig.log().contains("slot a REFUSED"), "{}", rig.log());

        // The partition itself is missing.
        let mut rig = Rig::new("nodev");
        rig.write_ctl(&mut BootControl::new_image(v("1.0.0")));
        assert!(rig.run([None, None]).is_none());
        assert!(
            rig.read_ctl()
                .slot(Slot::A)
                .note
                .contains("slot_a not found")
        );
    }

    #[test]
    fn a_blank_boot_control_starts_over_loudly_from_slot_a() {
        let mut rig = Rig::new("blank");
        let payload = rig.write_slot("slot_a", v("0.4.0"), BOARD, None);
        fs::write(rig.path("bootctl"), vec![0u8; 2 * COPY_LEN]).unwrap();
        let staged = rig.run([Some("slot_a"), Some("slot_b")]).unwrap();
        assert_eq!(
            (staged.slot, staged.version, staged.trial),
            (Slot::A, v("0.4.0"), true)
        );
        assert_eq!(fs::read(&staged.program).unwrap(), payload);
        assert!(
            rig.log().contains("WARNING: boot control unusable"),
            "{}",
            rig.log()
        );
        // Written back, with the bundle's version recorded.
        let ctl = rig.read_ctl();
        assert_eq!(ctl.slot(Slot::A).version, v("0.4.0"));
        assert_eq!(
            ctl.slot(Slot::A).tries,
            sealgate_image::bootctl::DEFAULT_TRIES - 1
        );
    }

    #[test]
    fn a_trial_whose_try_cannot_be_recorded_is_not_booted() {
        let mut rig = Rig::new("readonly");
        rig.write_slot("slot_a", v("1.0.0"), BOARD, None);
        rig.write_ctl(&mut BootControl::new_image(v("1.0.0")));
        let mut ro = File::open(rig.path("bootctl")).unwrap();
        assert!(rig.run_with(&mut ro, [Some("slot_a"), None]).is_none());
        assert!(
            rig.log()
                .contains("slot a SKIPPED on this boot: cannot record the boot try"),
            "{}",
            rig.log()
        );
        // Skipped, not refused: A keeps its tries and stays bootable.
        let a = rig.read_ctl().slot(Slot::A).clone();
        assert_eq!(
            (a.priority, a.tries),
            (1, sealgate_image::bootctl::DEFAULT_TRIES)
        );

        // A known-good slot still boots from a read-only boot control.
        let mut ctl = rig.read_ctl();
        ctl.mark_successful(Slot::A);
        rig.write_ctl(&mut ctl);
        let mut ro = File::open(rig.path("bootctl")).unwrap();
        assert_eq!(
            rig.run_with(&mut ro, [Some("slot_a"), None]).unwrap().slot,
            Slot::A
        );
    }

    /// Slot A known good (1.0.0), slot B freshly installed (1.1.0, on trial, preferred).
    fn good_a_trial_b(rig: &Rig) -> BootControl {
        rig.write_slot("slot_a", v("1.0.0"), BOARD, None);
        rig.write_slot("slot_b", v("1.1.0"), BOARD, None);
        let mut ctl = BootControl::new_image(v("1.0.0"));
        ctl.mark_successful(Slot::A);
        ctl.install_begin(Slot::B);
        ctl.install_commit(Slot::B, v("1.1.0"));
        rig.write_ctl(&mut ctl);
        ctl
    }

    #[test]
    fn a_local_staging_failure_skips_the_slot_on_this_boot_and_keeps_its_tries() {
        let mut rig = Rig::new("local");
        let before = good_a_trial_b(&rig);
        // /run/sealgate-b cannot be replaced (a non-empty directory stands in its way).
        fs::create_dir_all(rig.path("run/sealgate-b/x")).unwrap();
        let staged = rig.run([Some("slot_a"), Some("slot_b")]).unwrap();
        assert_eq!((staged.slot, staged.trial), (Slot::A, false));
        assert!(
            rig.log()
                .contains("slot b SKIPPED on this boot: cannot remove old"),
            "{}",
            rig.log()
        );
        assert!(!rig.log().contains("REFUSED"), "{}", rig.log());
        // Boot control is unchanged for B: still bootable, its try given back.
        let after = rig.read_ctl();
        assert_eq!(after.slot(Slot::B), before.slot(Slot::B));
        assert!(after.bootable(Slot::B));

        // The next boot, with /run usable again, boots B on trial.
        fs::remove_dir_all(rig.path("run/sealgate-b")).unwrap();
        let staged = rig.run([Some("slot_a"), Some("slot_b")]).unwrap();
        assert_eq!((staged.slot, staged.trial), (Slot::B, true));
        assert_eq!(
            rig.read_ctl().slot(Slot::B).tries,
            sealgate_image::bootctl::DEFAULT_TRIES - 1
        );
    }

    #[test]
    fn with_every_slot_skipped_nothing_boots_and_boot_control_is_kept() {
        let mut rig = Rig::new("allskipped");
        rig.write_slot("slot_a", v("1.0.0"), BOARD, None);
        let mut before = BootControl::new_image(v("1.0.0"));
        rig.write_ctl(&mut before);
        fs::remove_dir_all(rig.path("run")).unwrap();
        fs::write(rig.path("run"), b"not a directory").unwrap();
        assert!(rig.run([Some("slot_a"), None]).is_none());
        let log = rig.log();
        assert!(log.contains("slot a SKIPPED on this boot: cannot"), "{log}");
        assert!(log.contains("NO BOOTABLE SLOT"), "{log}");
        assert!(log.contains("(SKIPPED on this boot)"), "{log}");
        assert_eq!(rig.read_ctl().slot(Slot::A), before.slot(Slot::A));
    }

    #[test]
    fn an_exec_failure_skips_when_local_and_refuses_when_the_payload_is_bad() {
        let mut rig = Rig::new("exec");
        let before = good_a_trial_b(&rig);
        // A local exec failure of B: the loop falls back to A in the same boot, B untouched.
        let mut boot = rig.begin();
        let staged = rig
            .stage_in(&mut boot, [Some("slot_a"), Some("slot_b")])
            .unwrap();
        assert_eq!((staged.slot, staged.trial), (Slot::B, true));
        let enomem = io::Error::from_raw_os_error(rustix::io::Errno::NOMEM.raw_os_error());
        let failure = exec_failure(&staged.program, &enomem);
        assert!(matches!(failure, SlotFailure::Local(_)), "{failure:?}");
        rig.fail_in(&mut boot, &staged, &failure);
        assert!(boot.skipped.contains(Slot::B));
        let next = rig
            .stage_in(&mut boot, [Some("slot_a"), Some("slot_b")])
            .unwrap();
        assert_eq!((next.slot, next.trial), (Slot::A, false));
        assert_eq!(rig.read_ctl().slot(Slot::B), before.slot(Slot::B));
        // Once A failed locally too, nothing is left on this boot.
        rig.fail_in(&mut boot, &next, &failure);
        assert!(
            rig.stage_in(&mut boot, [Some("slot_a"), Some("slot_b")])
                .is_none()
        );
        assert_eq!(rig.read_ctl().slot(Slot::A), before.slot(Slot::A));

        // A payload the kernel cannot execute: B is refused, with the reason.
        let mut boot = rig.begin();
        let staged = rig
            .stage_in(&mut boot, [Some("slot_a"), Some("slot_b")])
            .unwrap();
        assert_eq!(staged.slot, Slot::B);
        let enoexec = io::Error::from_raw_os_error(rustix::io::Errno::NOEXEC.raw_os_error());
        let failure = exec_failure(&staged.program, &enoexec);
        assert!(matches!(failure, SlotFailure::BadBundle(_)), "{failure:?}");
        rig.fail_in(&mut boot, &staged, &failure);
        let b = rig.read_ctl().slot(Slot::B).clone();
        assert_eq!((b.priority, b.tries, b.successful), (0, 0, false));
        assert!(b.note.contains("cannot execute"), "{}", b.note);
        assert!(rig.log().contains("slot b REFUSED"), "{}", rig.log());
    }

    #[test]
    fn exec_errors_are_classified() {
        use rustix::io::Errno;
        let dir = Rig::new("execclass");
        let program = dir.path("prog");
        let err = |e: Errno| io::Error::from_raw_os_error(e.raw_os_error());
        // A missing file is local; ENOENT for a file that exists is a missing interpreter.
        assert!(matches!(
            exec_failure(&program, &err(Errno::NOENT)),
            SlotFailure::Local(_)
        ));
        fs::write(&program, b"#!/nonexistent\n").unwrap();
        assert!(matches!(
            exec_failure(&program, &err(Errno::NOENT)),
            SlotFailure::BadBundle(_)
        ));
        for e in [Errno::NOEXEC, Errno::INVAL, Errno::LIBBAD] {
            assert!(matches!(
                exec_failure(&program, &err(e)),
                SlotFailure::BadBundle(_)
            ));
        }
        for e in [Errno::NOMEM, Errno::ACCESS, Errno::TXTBSY, Errno::IO] {
            assert!(matches!(
                exec_failure(&program, &err(e)),
                SlotFailure::Local(_)
            ));
        }
        let f = exec_failure(&program, &err(Errno::NOMEM));
        assert!(f.to_string().starts_with("cannot execute"), "{f}");
    }

    #[test]
    fn a_skipped_slot_is_never_chosen_and_keeps_its_tries() {
        let mut ctl = BootControl::new_image(v("1.0.0"));
        ctl.install_commit(Slot::B, v("1.1.0"));
        let mut skipped = Skipped::default();
        skipped.insert(Slot::B);
        let b_before = ctl.slot(Slot::B).clone();
        assert_eq!(
            choose_excluding(&mut ctl, &skipped),
            Choice::Boot {
                slot: Slot::A,
                trial: true
            }
        );
        assert_eq!(ctl.slot(Slot::B), &b_before);
        skipped.insert(Slot::A);
        assert_eq!(choose_excluding(&mut ctl, &skipped), Choice::NoBootableSlot);
        assert_eq!(
            ctl.slot(Slot::A).tries,
            sealgate_image::bootctl::DEFAULT_TRIES - 1
        );
    }

    #[test]
    fn long_notes_are_cut_at_a_character_boundary() {
        let s = "é".repeat(100);
        let t = truncate(&s, NOTE_MAX);
        assert!(t.len() <= NOTE_MAX && t.len() >= NOTE_MAX - 1);
        assert_eq!(truncate("short", NOTE_MAX), "short");
    }
}
