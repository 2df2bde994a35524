//! `sealgate appliance`: the gateway as PID 1 of the appliance image, exec'ed by the stage-1
//! loader. Mounts `data` and `sealed`, provisions the baked-in trust anchors on first boot,
//! pets the watchdog, runs the health check that marks the slot successful (and raises the
//! rollback floor), reaps orphans, and reboots on request.
//!
//! Health check (F-IMAGE): the config is valid (the daemon started on it), every listener
//! accepts a TCP connection and the SMTP ones answer `220`, and the spool directory takes a
//! write + fsync. Only then is the slot marked successful (a failed boot-control write is
//! retried 5 times over 15 s; then health is `unmarked`). A failed check logs why and reboots,
//! which costs the slot one of its tries; after the last one the loader falls back.

pub mod update;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sealgate_board::appliance::{self as board, Watchdog};
use sealgate_image::bootctl::{BootControl, Slot};
use sealgate_image::version::Version;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::appliance::update::{BootDev, Installer};

/// Where the loader leaves the files it baked into the initramfs.
pub const ETC: &str = "/etc/sealgate";
/// Mount points of the `data` and `sealed` partitions.
pub const DATA_MOUNT: &str = "/data";
pub const SEALED_MOUNT: &str = "/sealed";
/// The labels the appliance needs.
pub const LABELS: [&str; 5] = ["bootctl", "slot_a", "slot_b", "sealed", "data"];

/// How long the health check waits for a listener.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// The pauses between the tries of marking the slot successful after a passed health check
/// (5 tries in all).
const MARK_BACKOFF: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// The health state after a passed health check whose slot could not be marked successful
/// (boot control not writable): the box serves, but the slot is still on trial.
pub const HEALTH_UNMARKED: &str = "unmarked";

#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("{0}")]
    Board(#[from] sealgate_board::BoardError),
    #[error("{path}: {source}")]
    Keys {
        path: PathBuf,
        source: sealgate_image::keys::KeyFileError,
    },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A fault a `test-faults` build injects, chosen by `sealgate.test_fault=` on the kernel
/// command line. Production builds have no such code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The health check fails.
    Health,
    /// Nothing pets the watchdog and the health check never runs.
    Hang,
}

/// The health state as the status API shows it: `starting`, `good` (the slot was marked
/// successful), `failed` (the health check failed) or [`HEALTH_UNMARKED`] (it passed, but boot
/// control could not be written to mark the slot successful).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Health {
    pub state: &'static str,
    pub detail: Option<String>,
}

/// Everything the daemon needs to know about the appliance it runs on.
#[derive(Debug)]
pub struct Appliance {
    pub slot: Slot,
    pub version: Version,
    pub boot: Arc<BootDev>,
    pub installer: Arc<Installer>,
    pub trust: Vec<[u8; 32]>,
    pub admin_certs: Vec<PathBuf>,
    watchdog: Option<Arc<Watchdog>>,
    /// Set once the runtime's task pets the watchdog (or a `hang` fault stops petting): the
    /// start-up thread that kept it alive through mounts and store opening then ends.
    handed_over: Arc<AtomicBool>,
    /// This boot is a trial of its slot (not yet marked successful).
    trial: bool,
    fault: Option<Fault>,
    health: Mutex<Health>,
}

impl Appliance {
    /// Finds the partitions, mounts `data` and `sealed`, reads the baked-in keys.
    pub fn prepare(slot: Slot, version: Version) -> Result<Appliance, ApplianceError> {
        // Take the watchdog over from the loader and pet it before anything slow.
        let watchdog = Watchdog::from_env().map(Arc::new);
        let handed_over = Arc::new(AtomicBool::new(false));
        if let Some(w) = &watchdog {
            let (w, done) = (w.clone(), handed_over.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Acquire) {
                    let _ = w.pet();
                    std::thread::sleep(Duration::from_secs(2));
                }
            });
        }
        if let Some(w) = &watchdog
            && let Err(e) = w.pet()
        {
            println!("sealgate: cannot pet the watchdog: {e}");
        }
        let parts = board::wait_partitions(&LABELS, Duration::from_secs(10))?;
        let dev = |l: &str| parts.get(l).cloned().unwrap_or_default();
        for (label, at) in [("data", DATA_MOUNT), ("sealed", SEALED_MOUNT)] {
            board::mount_ext4(&dev(label), Path::new(at))?;
            println!("sealgate: mounted {label} at {at}");
        }
        let etc = Path::new(ETC);
        let keys_dir = etc.join("image-keys");
        let keys = sealgate_image::keys::read_public_keys_dir(&keys_dir).map_err(|source| {
            ApplianceError::Keys {
                path: keys_dir.clone(),
                source,
            }
        })?;
        let trust_dir = etc.join("trust");
        let trust: Vec<[u8; 32]> = sealgate_image::keys::read_public_keys_dir(&trust_dir)
            .map_err(|source| ApplianceError::Keys {
                path: trust_dir.clone(),
                source,
            })?
            .into_values()
            .collect();
        let board_name = std::fs::read_to_string(etc.join("board"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| sealgate_image::bundle::BOARD_QEMU.to_string());
        let admin_certs = list_dir(&etc.join("admin"));
        let boot = Arc::new(BootDev::new(dev("bootctl")));
        let trial = boot
            .load()
            .map(|bc| !bc.slot(slot).successful)
            .unwrap_or(true);
        let installer = Arc::new(Installer::new(
            boot.clone(),
            [dev("slot_a"), dev("slot_b")],
            slot,
            version,
            board_name,
            keys,
        ));
        Ok(Appliance {
            slot,
            version,
            boot,
            installer,
            trust,
            admin_certs,
            watchdog,
            handed_over,
            trial,
            fault: fault_from_cmdline(),
            health: Mutex::new(Health {
                state: "starting",
                detail: None,
            }),
        })
    }

    /// The health state for the status API.
    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_health(&self, state: &'static str, detail: Option<String>) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Health { state, detail };
    }

    /// Pets the watchdog from the runtime (so a wedged runtime is reset) unless a `hang` fault
    /// is injected.
    pub fn spawn_watchdog(self: &Arc<Self>) {
        self.handed_over.store(true, Ordering::Release);
        if self.fault == Some(Fault::Hang) {
            println!("sealgate: TEST FAULT hang: not petting the watchdog");
            return;
        }
        let Some(wd) = &self.watchdog else {
            tracing::warn!("no watchdog handed over by the loader");
            return;
        };
        let period = (wd.timeout() / 3).max(Duration::from_secs(1));
        let me = self.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(period);
            loop {
                t.tick().await;
                if let Some(wd) = &me.watchdog
                    && let Err(e) = wd.pet()
                {
                    tracing::error!(error = %e, "cannot pet the watchdog");
                }
            }
        });
    }

    /// Reaps orphaned children (we are PID 1).
    pub fn spawn_reaper(&self) {
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut chld) = signal(SignalKind::child()) else {
                return;
            };
            while chld.recv().await.is_some() {
                board::reap_children();
            }
        });
    }

    /// After the listeners are up: checks health and marks the slot successful. A failed
    /// check of a trial boot reboots (the slot loses a try, and after the last one the loader
    /// falls back); on a slot already confirmed it only reports, so that the box stays
    /// reachable for a fixed config. `problems` are start-up failures that fail the check.
    pub fn spawn_health_check(
        self: &Arc<Self>,
        smtp: Vec<SocketAddr>,
        others: Vec<SocketAddr>,
        spool_dir: PathBuf,
        problems: Vec<String>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            if me.fault == Some(Fault::Hang) {
                println!("sealgate: TEST FAULT hang: the health check never runs");
                return;
            }
            let checked = if problems.is_empty() {
                me.health_check(&smtp, &others, spool_dir).await
            } else {
                Err(problems.join("; "))
            };
            match checked {
                Ok(()) => {
                    let me2 = me.clone();
                    let health = tokio::task::spawn_blocking(move || {
                        let slot = me2.slot;
                        let write = || me2.boot.modify(|bc| bc.mark_successful(slot));
                        mark_successful(slot, write, std::thread::sleep)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "marking the slot successful did not finish");
                        Health {
                            state: HEALTH_UNMARKED,
                            detail: Some(format!("marking the slot successful: {e}")),
                        }
                    });
                    me.set_health(health.state, health.detail);
                }
                Err(why) if me.trial => {
                    me.set_health("failed", Some(why.clone()));
                    println!(
                        "sealgate: HEALTH CHECK FAILED: {why}; rebooting (this slot loses a try)"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    reboot_now();
                }
                Err(why) => {
                    me.set_health("failed", Some(why.clone()));
                    println!(
                        "sealgate: HEALTH CHECK FAILED on a confirmed slot: {why}; staying up so \
                         that it can be managed"
                    );
                }
            }
        });
    }

    async fn health_check(
        &self,
        smtp: &[SocketAddr],
        others: &[SocketAddr],
        spool_dir: PathBuf,
    ) -> Result<(), String> {
        if self.fault == Some(Fault::Health) {
            return Err("TEST FAULT health injected".into());
        }
        for addr in smtp {
            let a = loopback_for(*addr);
            let greet = tokio::time::timeout(HEALTH_TIMEOUT, async {
                let mut s = tokio::net::TcpStream::connect(a).await?;
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(buf)
            })
            .await;
            match greet {
                Ok(Ok(b)) if &b[..3] == b"220" => {}
                Ok(Ok(b)) => {
                    return Err(format!(
                        "SMTP listener {a} greets with {:?}",
                        String::from_utf8_lossy(&b)
                    ));
                }
                Ok(Err(e)) => return Err(format!("SMTP listener {a}: {e}")),
                Err(_) => return Err(format!("SMTP listener {a}: no greeting")),
            }
        }
        for addr in others {
            let a = loopback_for(*addr);
            match tokio::time::timeout(HEALTH_TIMEOUT, tokio::net::TcpStream::connect(a)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("listener {a}: {e}")),
                Err(_) => return Err(format!("listener {a}: connect timed out")),
            }
        }
        tokio::task::spawn_blocking(move || spool_probe(&spool_dir))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Answers now, reboots shortly after (so the API reply goes out first).
    pub fn schedule_reboot(&self) {
        tokio::spawn(async {
            println!("sealgate: reboot requested");
            tokio::time::sleep(Duration::from_millis(500)).await;
            reboot_now();
        });
    }

    /// Answers now, syncs and powers off shortly after.
    pub fn schedule_poweroff(&self) {
        tokio::spawn(async {
            println!("sealgate: poweroff requested");
            tokio::time::sleep(Duration::from_millis(500)).await;
            board::sync_and_poweroff();
        });
    }
}

/// Marks `slot` successful through `write` (boot control loaded, changed, stored and
/// fsync'ed), retrying a failed write after each pause of [`MARK_BACKOFF`] (waited with
/// `sleep`): 5 tries over 15 s. Returns the health to report: `good`, or [`HEALTH_UNMARKED`]
/// with the last error when every try failed — logged as an error; the slot then stays on
/// trial in boot control, so its next boot uses one of its tries. Never panics.
fn mark_successful<E: std::fmt::Display>(
    slot: Slot,
    mut write: impl FnMut() -> Result<BootControl, E>,
    mut sleep: impl FnMut(Duration),
) -> Health {
    let tries = MARK_BACKOFF.len() + 1;
    let mut pauses = MARK_BACKOFF.iter();
    let mut attempt = 1;
    loop {
        let e = match write() {
            Ok(bc) => {
                println!(
                    "sealgate: health check passed; slot {} marked successful, rollback floor {}",
                    slot.letter(),
                    bc.floor
                );
                return Health {
                    state: "good",
                    detail: None,
                };
            }
            Err(e) => e,
        };
        let Some(&pause) = pauses.next() else {
            println!(
                "sealgate: ERROR: health check passed but slot {} NOT marked successful: boot \
                 control not written after {tries} tries: {e}; health {HEALTH_UNMARKED}",
                slot.letter()
            );
            tracing::error!(slot = %slot.letter(), tries, error = %e,
                "slot not marked successful: boot control cannot be written");
            return Health {
                state: HEALTH_UNMARKED,
                detail: Some(format!("boot control not written after {tries} tries: {e}")),
            };
        };
        println!(
            "sealgate: cannot mark slot {} successful in boot control (try {attempt} of \
             {tries}): {e}; retrying in {} s",
            slot.letter(),
            pause.as_secs()
        );
        sleep(pause);
        attempt += 1;
    }
}

/// Syncs and reboots (blocking). As PID 1 this never returns.
pub fn reboot_now() {
    board::sync_and_reboot();
}

fn loopback_for(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// Writes, fsyncs and removes a probe file in the spool directory.
fn spool_probe(dir: &Path) -> Result<(), String> {
    use std::io::Write;
    let p = dir.join(".health-probe");
    let r = (|| {
        let mut f = std::fs::File::create(&p)?;
        f.write_all(b"sealgate health probe\n")?;
        f.sync_all()?;
        std::fs::remove_file(&p)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    r.map_err(|e| format!("spool {} not writable: {e}", dir.display()))
}

fn list_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(feature = "test-faults")]
fn fault_from_cmdline() -> Option<Fault> {
    let cmdline = board::cmdline();
    let f = match board::cmdline_value(&cmdline, "sealgate.test_fault") {
        Some("health") => Some(Fault::Health),
        Some("hang") => Some(Fault::Hang),
        _ => None,
    };
    if let Some(f) = f {
        println!("sealgate: THIS IS A TEST-FAULTS BUILD: injecting {f:?}");
    }
    f
}

#[cfg(not(feature = "test-faults"))]
fn fault_from_cmdline() -> Option<Fault> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A boot-control writer that fails `fails` times, then stores; counts its calls.
    fn flaky(fails: usize, calls: &mut usize) -> impl FnMut() -> Result<BootControl, String> + '_ {
        move || {
            *calls += 1;
            if *calls <= fails {
                Err(format!("write error {calls}"))
            } else {
                let mut bc = BootControl::new_image(Version::new(1, 2, 3));
                bc.mark_successful(Slot::A);
                Ok(bc)
            }
        }
    }

    #[test]
    fn marking_the_slot_is_retried_with_backoff_then_reported_unmarked() {
        let secs = |v: &[Duration]| v.iter().map(Duration::as_secs).collect::<Vec<_>>();
        // Succeeds at once: no pause.
        let (mut calls, mut slept) = (0, Vec::new());
        let h = mark_successful(Slot::A, flaky(0, &mut calls), |d| slept.push(d));
        assert_eq!((h.state, h.detail), ("good", None));
        assert_eq!((calls, slept.len()), (1, 0));

        // Fails 3 times, then succeeds on the 4th try after 1, 2 and 4 s.
        let (mut calls, mut slept) = (0, Vec::new());
        let h = mark_successful(Slot::A, flaky(3, &mut calls), |d| slept.push(d));
        assert_eq!(h.state, "good");
        assert_eq!(calls, 4);
        assert_eq!(secs(&slept), [1, 2, 4]);

        // Succeeds on the 5th and last try.
        let (mut calls, mut slept) = (0, Vec::new());
        let h = mark_successful(Slot::B, flaky(4, &mut calls), |d| slept.push(d));
        assert_eq!((h.state, calls), ("good", 5));
        assert_eq!(secs(&slept), [1, 2, 4, 8]);

        // Never succeeds: 5 tries, 1 + 2 + 4 + 8 s, then unmarked with the last error.
        let (mut calls, mut slept) = (0, Vec::new());
        let h = mark_successful(Slot::B, flaky(usize::MAX, &mut calls), |d| slept.push(d));
        assert_eq!(h.state, HEALTH_UNMARKED);
        assert_eq!(calls, 5);
        assert_eq!(secs(&slept), [1, 2, 4, 8]);
        let detail = h.detail.unwrap_or_default();
        assert!(detail.contains("write error 5"), "{detail}");
        assert!(detail.contains("5 tries"), "{detail}");
    }
}
