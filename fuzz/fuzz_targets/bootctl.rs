//! Fuzz target: boot control (`sealgate_image::bootctl`): `decode` of two arbitrary copies, then a
//! sequence of operations (choose, mark, install, store) driven by the bytes after them, checking
//! after each store that decoding gives back the state, that a torn store leaves the old or the
//! new state, and that the floor never falls.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate_image::Version;
use sealgate_image::bootctl::{BootControl, COPY_LEN, Choice, Slot};

fuzz_target!(|data: &[u8]| {
    let len = data.len().min(2 * COPY_LEN);
    let mut disk = vec![0u8; 2 * COPY_LEN];
    disk[..len].copy_from_slice(&data[..len]);
    let ops = &data[len..];
    let mut bc = match BootControl::decode(&disk) {
        Ok(bc) => bc,
        Err(_) => {
            if ops.is_empty() {
                return;
            }
            BootControl::new_image(Version::new(1, 0, 0))
        }
    };
    for op in ops.chunks(3) {
        let slot = if op[0] & 0x80 == 0 { Slot::A } else { Slot::B };
        let arg = |i: usize| op.get(i).copied().unwrap_or(0);
        let floor = bc.floor;
        match op[0] & 0x0f {
            0 => match bc.choose() {
                Choice::Boot { slot, trial } => {
                    let st = bc.slot(slot);
                    assert!(st.priority > 0 && st.version >= bc.floor);
                    assert_eq!(trial, !st.successful);
                    let other = bc.slot(slot.other());
                    assert!(!bc.bootable(slot.other()) || other.priority <= st.priority);
                }
                Choice::NoBootableSlot => {
                    assert!(!bc.bootable(Slot::A) && !bc.bootable(Slot::B))
                }
            },
            1 => bc.mark_successful(slot),
            2 => bc.mark_unbootable(slot, &"é".repeat(usize::from(arg(1)))),
            3 => bc.install_begin(slot),
            4 => {
                let v = Version::new(u16::from(arg(1)), u16::from(arg(2)), 0);
                bc.install_commit(slot, v);
                let (p, o) = (bc.slot(slot).priority, bc.slot(slot.other()).priority);
                assert!(p > o && p >= 2);
            }
            5 => bc.slot_mut(slot).priority = arg(1),
            _ => {
                // Store, torn after `arg` * 16 bytes, then completed.
                let before = BootControl::decode(&disk).ok();
                let mut next = bc.clone();
                let (off, copy) = next.encode_next();
                let off = off as usize;
                let torn = (usize::from(arg(1)) * 16).min(COPY_LEN);
                let mut t = disk.clone();
                t[off..off + torn].copy_from_slice(&copy[..torn]);
                let got = BootControl::decode(&t).ok();
                assert!(
                    got == before || got.as_ref() == Some(&next),
                    "torn at {torn}"
                );
                disk[off..off + COPY_LEN].copy_from_slice(&copy);
                bc = next;
                let back = BootControl::decode(&disk).expect("a stored copy decodes");
                assert_eq!(back, bc);
            }
        }
        assert!(bc.floor >= floor, "floor fell");
        for s in [Slot::A, Slot::B] {
            assert!(bc.slot(s).note.len() <= 120);
        }
    }
});
