//! Installing a signed update bundle (F-IMAGE) into the inactive slot of the appliance, and the
//! boot control partition shared with the stage-1 loader.
//!
//! The order is what makes a power cut at any instant harmless:
//! 1. the bundle's prefix (header + signature) is read and checked — key known, signature,
//!    board, version against the rollback floor, size against the slot — before a byte is
//!    written anywhere;
//! 2. boot control marks the target slot "installing" (priority 0: never booted) and is
//!    fsync'ed;
//! 3. the bundle is streamed into the slot in 64 KiB chunks while its SHA-256 is computed
//!    (never whole in memory), then the slot is fsync'ed;
//! 4. only when length and hash match does boot control give the slot 3 tries and a higher
//!    priority (fsync'ed again). The running slot is never written.
//!
//! A cut before 4 leaves the old boot control (the new slot unbootable); a cut during 4 leaves
//! one of the two boot-control copies valid (see `docs/boot-control.md`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sealgate_image::bootctl::{BootControl, BootCtlError, Slot};
use sealgate_image::bundle::{self, BundleError, Header, read_full};
use sealgate_image::version::Version;
use serde::Serialize;

/// Bytes read from the request body per write into the slot.
const CHUNK: usize = 64 * 1024;

/// Why an update was not installed. The running slot is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("updates need the appliance (this is the dev board)")]
    NotAppliance,
    #[error("another update is being installed")]
    Busy,
    #[error(
        "slot {0} is running on trial (its health check has not passed yet): the other slot is \
         the only known-good one and is not overwritten; retry once this boot is confirmed"
    )]
    RunningOnTrial(Slot),
    #[error("the rollback floor rose to {floor} while {version} was written: not activated")]
    FloorRose { version: Version, floor: Version },
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error("boot control: {0}")]
    BootCtl(#[from] BootCtlError),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("reading the bundle from the request: {0}")]
    Body(io::Error),
}

impl UpdateError {
    /// A short machine-readable name of the check that failed.
    pub fn check(&self) -> &'static str {
        match self {
            UpdateError::NotAppliance => "appliance",
            UpdateError::Busy | UpdateError::RunningOnTrial(_) => "busy",
            UpdateError::FloorRose { .. } => "rollback-floor",
            UpdateError::Bundle(b) => match b {
                BundleError::Truncated { .. } | BundleError::PayloadLength { .. } => "truncated",
                BundleError::BadMagic
                | BundleError::UnsupportedFormat(_)
                | BundleError::BadHeader(_) => "format",
                BundleError::UnknownKey(_) => "unknown-key",
                BundleError::BadSignature => "signature",
                BundleError::WrongBoard { .. } => "board",
                BundleError::BelowFloor { .. } => "rollback-floor",
                BundleError::PayloadTooLarge { .. } => "size",
                BundleError::PayloadHash => "payload-hash",
                _ => "bundle",
            },
            UpdateError::BootCtl(_) => "boot-control",
            UpdateError::Io { .. } => "io",
            UpdateError::Body(_) => "truncated",
        }
    }
}

/// The boot control partition, with one writer at a time inside this process.
#[derive(Debug)]
pub struct BootDev {
    path: PathBuf,
    lock: Mutex<()>,
}

impl BootDev {
    pub fn new(path: PathBuf) -> BootDev {
        BootDev {
            path,
            lock: Mutex::new(()),
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> UpdateError + '_ {
        move |source| UpdateError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// Reads the current boot control.
    pub fn load(&self) -> Result<BootControl, UpdateError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = File::open(&self.path).map_err(self.io("open"))?;
        Ok(BootControl::load(&mut f)?)
    }

    /// Load, change, store and fsync, under the lock; returns the stored state.
    pub fn modify(&self, f: impl FnOnce(&mut BootControl)) -> Result<BootControl, UpdateError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(self.io("open for writing"))?;
        let mut bc = BootControl::load(&mut dev)?;
        f(&mut bc);
        bc.store(&mut dev)?;
        dev.sync_all().map_err(self.io("fsync"))?;
        Ok(bc)
    }
}

/// What the last update attempt came to (shown by the status API).
#[derive(Debug, Clone, Serialize)]
pub struct LastUpdate {
    pub at: u64,
    pub ok: bool,
    pub slot: Option<Slot>,
    pub version: Option<Version>,
    pub check: Option<&'static str>,
    pub reason: Option<String>,
}

/// An installed update, waiting for a reboot.
#[derive(Debug, Clone, Serialize)]
pub struct InstallOutcome {
    pub slot: Slot,
    pub version: Version,
}

/// Installs bundles into the slot the box is not running from.
#[derive(Debug)]
pub struct Installer {
    boot: std::sync::Arc<BootDev>,
    slots: [PathBuf; 2],
    running: Slot,
    version: Version,
    board: String,
    keys: BTreeMap<[u8; 8], [u8; 32]>,
    busy: Mutex<()>,
    last: Mutex<Option<LastUpdate>>,
}

impl Installer {
    pub fn new(
        boot: std::sync::Arc<BootDev>,
        slots: [PathBuf; 2],
        running: Slot,
        version: Version,
        board: String,
        keys: BTreeMap<[u8; 8], [u8; 32]>,
    ) -> Installer {
        Installer {
            boot,
            slots,
            running,
            version,
            board,
            keys,
            busy: Mutex::new(()),
            last: Mutex::new(None),
        }
    }

    fn slot_path(&self, s: Slot) -> &Path {
        match s {
            Slot::A => &self.slots[0],
            Slot::B => &self.slots[1],
        }
    }

    /// Blocking (call from `spawn_blocking`): reads a bundle from `body`, checks its prefix
    /// before writing a byte, streams it into the inactive slot, fsyncs, and switches boot
    /// control to the new slot with 3 tries. The outcome is also kept for the status API.
    pub fn install(&self, body: &mut dyn Read) -> Result<InstallOutcome, UpdateError> {
        let Ok(_busy) = self.busy.try_lock() else {
            return Err(UpdateError::Busy);
        };
        let result = self.install_locked(body);
        let last = match &result {
            Ok(o) => LastUpdate {
                at: crate::spool::unix_now(),
                ok: true,
                slot: Some(o.slot),
                version: Some(o.version),
                check: None,
                reason: None,
            },
            Err(e) => LastUpdate {
                at: crate::spool::unix_now(),
                ok: false,
                slot: None,
                version: None,
                check: Some(e.check()),
                reason: Some(e.to_string()),
            },
        };
        match &result {
            Ok(o) => {
                tracing::info!(slot = ?o.slot, version = %o.version, "update installed; active after a reboot")
            }
            Err(e) => {
                tracing::error!(error = %e, check = e.check(), "update refused; the running slot is unchanged")
            }
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(last);
        result
    }

    fn install_locked(&self, body: &mut dyn Read) -> Result<InstallOutcome, UpdateError> {
        let mut prefix = vec![0u8; bundle::PREFIX_LEN];
        let got = read_full(body, &mut prefix).map_err(UpdateError::Body)?;
        if got < prefix.len() {
            return Err(BundleError::Truncated {
                got: got as u64,
                need: bundle::PREFIX_LEN as u64,
            }
            .into());
        }
        let target = self.running.other();
        let path = self.slot_path(target).to_path_buf();
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| UpdateError::Io { path, op, source }
        };
        let mut dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("open the inactive slot"))?;
        let capacity = dev.seek(SeekFrom::End(0)).map_err(io("size"))?;
        let room = capacity.saturating_sub(bundle::PREFIX_LEN as u64);
        let bc = self.boot.load()?;
        if !bc.slot(self.running).successful {
            return Err(UpdateError::RunningOnTrial(self.running));
        }
        let floor = bc.floor;
        let mut verified = bundle::parse_prefix(&prefix)?.verify(
            &self.keys,
            &self.board,
            floor,
            room.min(bundle::MAX_PAYLOAD),
        )?;
        let version = verified.header().version;
        tracing::info!(slot = ?target, %version, bytes = verified.header().payload_len, "update bundle accepted; writing the inactive slot");
        self.boot.modify(|bc| bc.install_begin(target))?;
        let written: Result<Header, UpdateError> = (|| {
            dev.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
            dev.write_all(&prefix).map_err(io("write"))?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = read_full(body, &mut buf).map_err(UpdateError::Body)?;
                if n == 0 {
                    break;
                }
                verified.update(&buf[..n])?;
                dev.write_all(&buf[..n]).map_err(io("write"))?;
            }
            dev.sync_all().map_err(io("fsync"))?;
            Ok(verified.finish()?)
        })();
        match written {
            Ok(h) => {
                // The floor may have risen meanwhile (a health check of this boot): a slot
                // below it would never boot, so it is not activated.
                let mut rose = None;
                self.boot.modify(|bc| {
                    if h.version < bc.floor {
                        rose = Some(bc.floor);
                        bc.mark_unbootable(target, "install: below the rollback floor");
                    } else {
                        bc.install_commit(target, h.version);
                    }
                })?;
                if let Some(floor) = rose {
                    return Err(UpdateError::FloorRose {
                        version: h.version,
                        floor,
                    });
                }
                Ok(InstallOutcome {
                    slot: target,
                    version: h.version,
                })
            }
            Err(e) => {
                let note = format!("install failed: {e}");
                let _ = self.boot.modify(|bc| bc.mark_unbootable(target, &note));
                Err(e)
            }
        }
    }

    /// Running slot and version, both slots, the rollback floor, and the last update attempt.
    pub fn status(&self) -> serde_json::Value {
        let boot = match self.boot.load() {
            Ok(bc) => serde_json::to_value(&bc).unwrap_or(serde_json::Value::Null),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        serde_json::json!({
            "running_slot": self.running,
            "running_version": self.version.to_string(),
            "board": self.board,
            "boot_control": boot,
            "last_update": last,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Cursor;
    use std::sync::Arc;

    use ring::signature::Ed25519KeyPair;
    use sealgate_image::keys::{generate_key, key_id_of, public_key_of};

    use super::*;

    const SLOT_LEN: u64 = 1 << 20;

    struct Rig {
        dir: PathBuf,
        key: Ed25519KeyPair,
        installer: Installer,
        boot: Arc<BootDev>,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_pkcs8(&generate_key().unwrap()).unwrap()
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn rig(tag: &str) -> Rig {
        let dir =
            std::env::temp_dir().join(format!("sealgate-update-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bootctl = dir.join("bootctl");
        let mut f = File::create(&bootctl).unwrap();
        f.set_len(8192).unwrap();
        let mut bc = BootControl::new_image(v("1.0.0"));
        bc.mark_successful(Slot::A);
        bc.store(&mut f).unwrap();
        let slots = [dir.join("slot_a"), dir.join("slot_b")];
        for s in &slots {
            std::fs::write(s, b"").unwrap();
            File::options()
                .write(true)
                .open(s)
                .unwrap()
                .set_len(SLOT_LEN)
                .unwrap();
        }
        std::fs::write(&slots[0], b"the running slot").unwrap();
        let key = key();
        let keys = BTreeMap::from([(key_id_of(&key), public_key_of(&key))]);
        let boot = Arc::new(BootDev::new(bootctl));
        let installer = Installer::new(
            boot.clone(),
            slots,
            Slot::A,
            v("1.0.0"),
            bundle::BOARD_QEMU.into(),
            keys,
        );
        Rig {
            dir,
            key,
            installer,
            boot,
        }
    }

    fn bundle_of(key: &Ed25519KeyPair, version: &str, board: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        bundle::sign(
            &mut Cursor::new(payload),
            v(version),
            board,
            key,
            1,
            &mut out,
        )
        .unwrap();
        out
    }

    fn payload() -> Vec<u8> {
        (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_good_bundle_lands_in_the_other_slot_with_three_tries() {
        let r = rig("good");
        let b = bundle_of(&r.key, "1.1.0", bundle::BOARD_QEMU, &payload());
        let out = r.installer.install(&mut Cursor::new(&b)).unwrap();
        assert_eq!((out.slot, out.version), (Slot::B, v("1.1.0")));
        let written = std::fs::read(r.dir.join("slot_b")).unwrap();
        assert_eq!(&written[..b.len()], &b[..]);
        let bc = r.boot.load().unwrap();
        let s = bc.slot(Slot::B);
        assert_eq!(
            (s.priority, s.tries, s.successful, s.version),
            (2, 3, false, v("1.1.0"))
        );
        assert!(bc.slot(Slot::A).successful);
        assert_eq!(
            &std::fs::read(r.dir.join("slot_a")).unwrap()[..16],
            b"the running slot"
        );
        let st = r.installer.status();
        assert_eq!(st["last_update"]["ok"], true);
        assert_eq!(st["running_slot"], "A");
    }

    fn refused(r: &Rig, bytes: &[u8], check: &str) -> BootControl {
        let before = r.boot.load().unwrap();
        let e = r.installer.install(&mut Cursor::new(bytes)).unwrap_err();
        assert_eq!(e.check(), check, "{e}");
        let st = r.installer.status();
        assert_eq!(st["last_update"]["ok"], false);
        assert_eq!(st["last_update"]["check"], check);
        assert_eq!(st["last_update"]["reason"], e.to_string());
        let after = r.boot.load().unwrap();
        assert_eq!(
            after.slot(Slot::A),
            before.slot(Slot::A),
            "running slot untouched"
        );
        assert_eq!(
            &std::fs::read(r.dir.join("slot_a")).unwrap()[..16],
            b"the running slot"
        );
        after
    }

    #[test]
    fn refusals_before_a_byte_is_written_leave_boot_control_alone() {
        let r = rig("refuse");
        let p = payload();
        let mut bad_sig = bundle_of(&r.key, "1.1.0", bundle::BOARD_QEMU, &p);
        bad_sig[bundle::HEADER_LEN + 3] ^= 1;
        let other = key();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (bad_sig, "signature"),
            (
                bundle_of(&other, "1.1.0", bundle::BOARD_QEMU, &p),
                "unknown-key",
            ),
            (bundle_of(&r.key, "1.1.0", "rpi4-arm64", &p), "board"),
            (b"SEALGSGU".to_vec(), "truncated"),
            (vec![0x42; 4096], "format"),
        ];
        for (bytes, check) in cases {
            let before = r.boot.load().unwrap();
            let after = refused(&r, &bytes, check);
            assert_eq!(after, before, "{check}: boot control unchanged");
            assert!(
                std::fs::read(r.dir.join("slot_b"))
                    .unwrap()
                    .iter()
                    .all(|&b| b == 0)
            );
        }
    }

    #[test]
    fn no_update_while_the_running_slot_is_on_trial() {
        let r = rig("trial");
        r.boot
            .modify(|bc| {
                let a = bc.slot_mut(Slot::A);
                a.successful = false;
                a.tries = 2;
            })
            .unwrap();
        let b = bundle_of(&r.key, "1.1.0", bundle::BOARD_QEMU, &payload());
        let e = r.installer.install(&mut Cursor::new(&b)).unwrap_err();
        assert!(matches!(e, UpdateError::RunningOnTrial(Slot::A)), "{e}");
        assert_eq!(r.boot.load().unwrap().slot(Slot::B).note, "empty");
    }

    #[test]
    fn below_the_floor_and_too_big_are_refused() {
        let r = rig("floor");
        r.boot.modify(|bc| bc.floor = v("1.0.0")).unwrap();
        refused(
            &r,
            &bundle_of(&r.key, "0.9.9", bundle::BOARD_QEMU, b"old"),
            "rollback-floor",
        );
        let big = vec![1u8; SLOT_LEN as usize];
        refused(
            &r,
            &bundle_of(&r.key, "1.1.0", bundle::BOARD_QEMU, &big),
            "size",
        );
    }

    #[test]
    fn a_truncated_or_corrupted_payload_leaves_the_new_slot_unbootable_with_the_reason() {
        let r = rig("cut");
        let b = bundle_of(&r.key, "1.1.0", bundle::BOARD_QEMU, &payload());
        let after = refused(&r, &b[..b.len() - 1000], "truncated");
        let s = after.slot(Slot::B);
        assert_eq!((s.priority, s.tries, s.successful), (0, 0, false));
        assert!(s.note.contains("install failed"), "{}", s.note);
        let mut flipped = b.clone();
        let n = flipped.len();
        flipped[n - 5] ^= 0x10;
        refused(&r, &flipped, "payload-hash");
        // A later good bundle still installs.
        r.installer.install(&mut Cursor::new(&b)).unwrap();
        assert_eq!(r.boot.load().unwrap().slot(Slot::B).tries, 3);
    }
}
