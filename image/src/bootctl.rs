//! Boot control: which slot (A or B) the stage-1 loader boots, how many trial boots a new slot
//! has left, and the rollback floor. Stored twice in the `bootctl` partition so that a torn
//! write leaves the old or the new state, never neither.
//!
//! Byte layout: see `docs/boot-control.md`. Each copy is [`COPY_LEN`] bytes, copy 0 at offset 0
//! and copy 1 at offset [`COPY_LEN`]; integers big-endian.
//!
//! ```text
//! offset  size  field
//! 0       8     magic b"SGBOOTC1"
//! 8       2     format u16 (= 1)
//! 10      8     generation u64 (copy index = generation % 2)
//! 18      4     CRC-32 (IEEE, crc32fast) of bytes 0..18 followed by bytes 22..4096
//! 22      6     floor: major, minor, patch (u16 each)
//! 28      136   slot A record
//! 164     136   slot B record
//! 300     3796  zero
//!
//! slot record (136 bytes):
//! 0       1     priority u8 (0 = never boot)
//! 1       1     tries u8 (trial boots left while not successful)
//! 2       1     successful (0 or 1)
//! 3       1     note length (0..=120)
//! 4       6     version: major, minor, patch (u16 each)
//! 10      6     zero
//! 16      120   note (UTF-8), zero padded
//! ```
//!
//! A copy is valid when its magic, format, CRC, index parity and fields are all right. The valid
//! copy with the newer generation (compared as serial numbers, so a wrap at 2^64 is harmless) is
//! the state. A store writes generation + 1 to the copy
//! index (generation + 1) % 2 — never the copy the state was read from.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::str::FromStr;

use serde::Serialize;

use crate::version::Version;

/// Bytes of one copy.
pub const COPY_LEN: usize = 4096;
/// Trial boots a newly installed slot gets.
pub const DEFAULT_TRIES: u8 = 3;
/// First bytes of a copy.
pub const MAGIC: &[u8; 8] = b"SGBOOTC1";
/// The format version this build writes and reads.
pub const FORMAT: u16 = 1;
/// Longest note of a slot, in bytes.
pub const MAX_NOTE: usize = 120;

const OFF_FORMAT: usize = 8;
const OFF_GENERATION: usize = 10;
const OFF_CRC: usize = 18;
const OFF_FLOOR: usize = 22;
const OFF_SLOTS: usize = 28;
const SLOT_LEN: usize = 136;
const OFF_ZERO: usize = OFF_SLOTS + 2 * SLOT_LEN;
const SLOT_OFF_NOTE: usize = 16;

/// One of the two system slots.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The slot's GPT partition name: `slot_a`, `slot_b`.
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "slot_a",
            Slot::B => "slot_b",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `a` or `b`.
    pub fn letter(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }

    fn index(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.letter())
    }
}

/// A string that is not a slot name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a slot (a or b): {0:?}")]
pub struct SlotParseError(pub String);

impl FromStr for Slot {
    type Err = SlotParseError;

    /// `a`, `b`, `A` or `B`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "a" | "A" => Ok(Slot::A),
            "b" | "B" => Ok(Slot::B),
            _ => Err(SlotParseError(s.chars().take(20).collect())),
        }
    }
}

/// The boot state of one slot.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize)]
pub struct SlotState {
    /// 0 = never boot; otherwise the higher boots first.
    pub priority: u8,
    /// Trial boots left while the slot has not yet been marked successful.
    pub tries: u8,
    /// The slot has booted and passed its health check.
    pub successful: bool,
    /// The version installed in the slot.
    pub version: Version,
    /// Why the slot is unbootable, or what happens to it (at most 120 bytes).
    pub note: String,
}

/// The whole boot-control state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BootControl {
    /// Incremented by each store; the copy with the highest valid generation wins.
    pub generation: u64,
    /// Slot A, slot B.
    pub slots: [SlotState; 2],
    /// The rollback floor: no slot or bundle below this version boots or installs.
    pub floor: Version,
}

/// Why boot control could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BootCtlError {
    #[error("boot control: no valid copy (copy 0: {copy0}; copy 1: {copy1})")]
    NoValidCopy {
        copy0: &'static str,
        copy1: &'static str,
    },
    #[error("boot control: {len} bytes; two copies need {}", 2 * COPY_LEN)]
    TooShort { len: usize },
    #[error("boot control i/o: {0}")]
    Io(#[from] io::Error),
}

/// What [`BootControl::choose`] decided.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum Choice {
    /// Boot `slot`; `trial` = it is not yet successful and one of its tries was used.
    Boot { slot: Slot, trial: bool },
    /// Neither slot may boot.
    NoBootableSlot,
}

/// Shortens `note` to at most [`MAX_NOTE`] bytes at a character boundary.
fn clip_note(note: &str) -> String {
    let mut end = note.len().min(MAX_NOTE);
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note[..end].to_owned()
}

fn put_version(b: &mut [u8], v: Version) {
    b[0..2].copy_from_slice(&v.major.to_be_bytes());
    b[2..4].copy_from_slice(&v.minor.to_be_bytes());
    b[4..6].copy_from_slice(&v.patch.to_be_bytes());
}

fn get_version(b: &[u8]) -> Version {
    let u = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    Version::new(u(0), u(2), u(4))
}

/// Whether generation `a` is newer than `b`, as serial numbers (RFC 1982): the two copies'
/// generations differ by one, so this stays right even where the counter wraps at 2^64.
fn newer(a: u64, b: u64) -> bool {
    (a.wrapping_sub(b) as i64) > 0
}

fn crc_of(copy: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&copy[..OFF_CRC]);
    h.update(&copy[OFF_CRC + 4..COPY_LEN]);
    h.finalize()
}

/// Decodes one copy found at `index`; `Err` says why it is not valid.
fn decode_copy(copy: &[u8], index: usize) -> Result<BootControl, &'static str> {
    if copy.len() < COPY_LEN {
        return Err("short");
    }
    if &copy[..8] != MAGIC {
        return Err("bad magic");
    }
    if u16::from_be_bytes([copy[OFF_FORMAT], copy[OFF_FORMAT + 1]]) != FORMAT {
        return Err("unsupported format");
    }
    let stored = u32::from_be_bytes([
        copy[OFF_CRC],
        copy[OFF_CRC + 1],
        copy[OFF_CRC + 2],
        copy[OFF_CRC + 3],
    ]);
    if stored != crc_of(copy) {
        return Err("CRC mismatch");
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&copy[OFF_GENERATION..OFF_GENERATION + 8]);
    let generation = u64::from_be_bytes(g);
    if (generation % 2) as usize != index {
        return Err("generation in the wrong copy");
    }
    if copy[OFF_ZERO..COPY_LEN].iter().any(|&b| b != 0) {
        return Err("nonzero padding");
    }
    let mut slots: [SlotState; 2] = Default::default();
    for (i, slot) in slots.iter_mut().enumerate() {
        let r = &copy[OFF_SLOTS + i * SLOT_LEN..OFF_SLOTS + (i + 1) * SLOT_LEN];
        let successful = match r[2] {
            0 => false,
            1 => true,
            _ => return Err("bad successful flag"),
        };
        let note_len = usize::from(r[3]);
        if note_len > MAX_NOTE {
            return Err("note too long");
        }
        if r[10..SLOT_OFF_NOTE].iter().any(|&b| b != 0)
            || r[SLOT_OFF_NOTE + note_len..].iter().any(|&b| b != 0)
        {
            return Err("nonzero padding");
        }
        let note = std::str::from_utf8(&r[SLOT_OFF_NOTE..SLOT_OFF_NOTE + note_len])
            .map_err(|_| "note not UTF-8")?;
        *slot = SlotState {
            priority: r[0],
            tries: r[1],
            successful,
            version: get_version(&r[4..10]),
            note: note.to_owned(),
        };
    }
    Ok(BootControl {
        generation,
        slots,
        floor: get_version(&copy[OFF_FLOOR..OFF_FLOOR + 6]),
    })
}

impl BootControl {
    /// The state of a freshly built image: slot A holds `version` with priority 1 and
    /// [`DEFAULT_TRIES`] trial boots; slot B is empty; floor 0.0.0; generation 0 (the first
    /// store writes generation 1).
    pub fn new_image(version: Version) -> Self {
        BootControl {
            generation: 0,
            slots: [
                SlotState {
                    priority: 1,
                    tries: DEFAULT_TRIES,
                    successful: false,
                    version,
                    note: String::new(),
                },
                SlotState {
                    note: "empty".to_owned(),
                    ..SlotState::default()
                },
            ],
            floor: Version::default(),
        }
    }

    /// The state of slot `s`.
    pub fn slot(&self, s: Slot) -> &SlotState {
        &self.slots[s.index()]
    }

    /// The state of slot `s`, to change.
    pub fn slot_mut(&mut self, s: Slot) -> &mut SlotState {
        &mut self.slots[s.index()]
    }

    /// Decodes the two copies (the first `2 * COPY_LEN` bytes of `two_copies`): the valid copy
    /// with the higher generation.
    pub fn decode(two_copies: &[u8]) -> Result<BootControl, BootCtlError> {
        let (Some(c0), Some(c1)) = (
            two_copies.get(..COPY_LEN),
            two_copies.get(COPY_LEN..2 * COPY_LEN),
        ) else {
            return Err(BootCtlError::TooShort {
                len: two_copies.len(),
            });
        };
        match (decode_copy(c0, 0), decode_copy(c1, 1)) {
            (Ok(a), Ok(b)) => Ok(if newer(b.generation, a.generation) {
                b
            } else {
                a
            }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(copy0), Err(copy1)) => Err(BootCtlError::NoValidCopy { copy0, copy1 }),
        }
    }

    /// Encodes this state as generation `generation`: (byte offset of its copy, the copy).
    fn encode_as(&self, generation: u64) -> (u64, [u8; COPY_LEN]) {
        let mut c = [0u8; COPY_LEN];
        c[..8].copy_from_slice(MAGIC);
        c[OFF_FORMAT..OFF_FORMAT + 2].copy_from_slice(&FORMAT.to_be_bytes());
        c[OFF_GENERATION..OFF_GENERATION + 8].copy_from_slice(&generation.to_be_bytes());
        put_version(&mut c[OFF_FLOOR..OFF_FLOOR + 6], self.floor);
        for (i, s) in self.slots.iter().enumerate() {
            let r = &mut c[OFF_SLOTS + i * SLOT_LEN..OFF_SLOTS + (i + 1) * SLOT_LEN];
            let note = clip_note(&s.note);
            r[0] = s.priority;
            r[1] = s.tries;
            r[2] = u8::from(s.successful);
            r[3] = note.len() as u8; // <= MAX_NOTE
            put_version(&mut r[4..10], s.version);
            r[SLOT_OFF_NOTE..SLOT_OFF_NOTE + note.len()].copy_from_slice(note.as_bytes());
        }
        let crc = crc_of(&c);
        c[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        let offset = (generation % 2) * COPY_LEN as u64;
        (offset, c)
    }

    /// Increments the generation and encodes the state: (byte offset of the copy to write,
    /// the copy). Notes longer than [`MAX_NOTE`] bytes are shortened.
    pub fn encode_next(&mut self) -> (u64, [u8; COPY_LEN]) {
        self.generation = self.generation.wrapping_add(1);
        self.encode_as(self.generation)
    }

    /// Reads both copies from the start of `dev`.
    pub fn load<D: Read + Seek>(dev: &mut D) -> Result<BootControl, BootCtlError> {
        dev.seek(SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 2 * COPY_LEN];
        let mut n = 0;
        while n < buf.len() {
            match dev.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Self::decode(&buf[..n])
    }

    /// Writes the next generation to its copy (the one not holding the current state) and
    /// flushes; the caller fsyncs. The generation advances only when the write succeeded, so a
    /// retry after an error writes the same copy again.
    pub fn store<D: Write + Seek>(&mut self, dev: &mut D) -> Result<(), BootCtlError> {
        let generation = self.generation.wrapping_add(1);
        let (offset, copy) = self.encode_as(generation);
        dev.seek(SeekFrom::Start(offset))?;
        dev.write_all(&copy)?;
        dev.flush()?;
        self.generation = generation;
        Ok(())
    }

    /// Whether slot `s` may boot: priority > 0, successful or tries left, version >= floor.
    pub fn bootable(&self, s: Slot) -> bool {
        let st = self.slot(s);
        st.priority > 0 && (st.successful || st.tries > 0) && st.version >= self.floor
    }

    /// Picks the bootable slot with the highest priority (tie: A). A not-yet-successful slot
    /// has one try used here (`trial = true`); the caller stores before booting it. A slot
    /// whose tries ran out without success is given priority 0 and a note saying so.
    pub fn choose(&mut self) -> Choice {
        for s in Slot::ALL {
            let st = self.slot_mut(s);
            if st.priority > 0 && !st.successful && st.tries == 0 {
                st.priority = 0;
                st.note = format!("{DEFAULT_TRIES} trial boots without a successful health check");
            }
        }
        let pick = match (self.bootable(Slot::A), self.bootable(Slot::B)) {
            (true, true) => {
                if self.slot(Slot::B).priority > self.slot(Slot::A).priority {
                    Slot::B
                } else {
                    Slot::A
                }
            }
            (true, false) => Slot::A,
            (false, true) => Slot::B,
            (false, false) => return Choice::NoBootableSlot,
        };
        let st = self.slot_mut(pick);
        let trial = !st.successful;
        if trial {
            st.tries -= 1; // bootable and not successful: tries > 0
        }
        Choice::Boot { slot: pick, trial }
    }

    /// Slot `s` must not boot: priority 0, no tries, not successful, `note` says why.
    pub fn mark_unbootable(&mut self, s: Slot, note: &str) {
        let st = self.slot_mut(s);
        st.priority = 0;
        st.tries = 0;
        st.successful = false;
        st.note = clip_note(note);
    }

    /// Slot `s` booted and passed its health check: successful, no tries needed, note cleared;
    /// the floor rises to its version (never falls).
    pub fn mark_successful(&mut self, s: Slot) {
        let st = self.slot_mut(s);
        st.successful = true;
        st.tries = 0;
        st.note.clear();
        let v = st.version;
        self.floor = self.floor.max(v);
    }

    /// An install into slot `s` begins: it must not boot until [`BootControl::install_commit`].
    pub fn install_begin(&mut self, s: Slot) {
        let st = self.slot_mut(s);
        st.priority = 0;
        st.tries = 0;
        st.successful = false;
        st.note = "installing".to_owned();
    }

    /// Slot `s` now holds version `v`: it boots next, on trial ([`DEFAULT_TRIES`] tries), with
    /// priority one above the other slot's (at least 2). The other slot keeps its priority —
    /// except at 255, when it becomes 1 (and `s` 2) so the order still holds.
    pub fn install_commit(&mut self, s: Slot, v: Version) {
        let other = self.slot(s.other()).priority;
        let priority = if other == u8::MAX {
            self.slot_mut(s.other()).priority = 1;
            2
        } else {
            (other + 1).max(2)
        };
        let st = self.slot_mut(s);
        st.priority = priority;
        st.tries = DEFAULT_TRIES;
        st.successful = false;
        st.version = v;
        st.note.clear();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Cursor;

    use super::*;

    const V1: Version = Version::new(1, 0, 0);
    const V2: Version = Version::new(2, 0, 0);

    fn stored(bc: &mut BootControl) -> Cursor<Vec<u8>> {
        let mut dev = Cursor::new(vec![0u8; 2 * COPY_LEN]);
        bc.store(&mut dev).unwrap();
        dev
    }

    #[test]
    fn slot_names() {
        assert_eq!(Slot::A.label(), "slot_a");
        assert_eq!(Slot::B.label(), "slot_b");
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.letter(), 'b');
        for (s, slot) in [
            ("a", Slot::A),
            ("A", Slot::A),
            ("b", Slot::B),
            ("B", Slot::B),
        ] {
            assert_eq!(s.parse::<Slot>().unwrap(), slot);
        }
        for s in ["", "c", "ab", "slot_a", " a"] {
            assert!(s.parse::<Slot>().is_err(), "{s}");
        }
        assert_eq!(serde_json::to_string(&Slot::A).unwrap(), "\"A\"");
    }

    #[test]
    fn round_trip_and_layout() {
        let mut bc = BootControl::new_image(V1);
        bc.slot_mut(Slot::B).note = "é".repeat(70); // 140 bytes: clipped to 120 on a boundary
        bc.floor = Version::new(0, 9, 1);
        let mut dev = stored(&mut bc);
        assert_eq!(bc.generation, 1);
        let b = dev.get_ref();
        assert!(
            b[..COPY_LEN].iter().all(|&x| x == 0),
            "generation 1 is copy 1"
        );
        let c = &b[COPY_LEN..];
        assert_eq!(&c[..8], b"SGBOOTC1");
        assert_eq!(&c[8..10], &[0, 1]);
        assert_eq!(&c[10..18], &1u64.to_be_bytes());
        assert_eq!(&c[22..28], &[0, 0, 0, 9, 0, 1]);
        assert_eq!(&c[28..38], &[1, 3, 0, 0, 0, 1, 0, 0, 0, 0]);
        let mut h = crc32fast::Hasher::new();
        h.update(&c[..18]);
        h.update(&c[22..]);
        assert_eq!(&c[18..22], &h.finalize().to_be_bytes());
        let back = BootControl::load(&mut dev).unwrap();
        assert_eq!(back.slot(Slot::A), bc.slot(Slot::A));
        assert_eq!(back.slot(Slot::B).note, "é".repeat(60));
        assert_eq!(back.floor, bc.floor);
        assert_eq!(back.generation, 1);
        // The next store goes to copy 0; both are then valid and the newer wins.
        let mut next = back.clone();
        next.mark_successful(Slot::A);
        next.store(&mut dev).unwrap();
        assert_eq!(next.generation, 2);
        let again = BootControl::load(&mut dev).unwrap();
        assert_eq!(again, next);
        assert!(again.slot(Slot::A).successful);
        assert_eq!(again.floor, V1);
    }

    #[test]
    fn encode_next_targets_the_other_copy() {
        let mut bc = BootControl::new_image(V1);
        for g in 1..6u64 {
            let (off, copy) = bc.encode_next();
            assert_eq!(bc.generation, g);
            assert_eq!(off, (g % 2) * COPY_LEN as u64);
            let mut two = vec![0u8; 2 * COPY_LEN];
            let o = off as usize;
            two[o..o + COPY_LEN].copy_from_slice(&copy);
            assert_eq!(BootControl::decode(&two).unwrap(), bc);
        }
    }

    #[test]
    fn no_valid_copy_and_short() {
        let e = BootControl::decode(&[0u8; 2 * COPY_LEN]).unwrap_err();
        assert!(
            matches!(
                e,
                BootCtlError::NoValidCopy {
                    copy0: "bad magic",
                    copy1: "bad magic"
                }
            ),
            "{e}"
        );
        let e = BootControl::decode(&[0u8; 2 * COPY_LEN - 1]).unwrap_err();
        assert!(matches!(e, BootCtlError::TooShort { len: 8191 }), "{e}");
        assert!(matches!(
            BootControl::load(&mut Cursor::new(vec![0u8; 100])),
            Err(BootCtlError::TooShort { len: 100 })
        ));
        // A flipped bit anywhere in the only copy makes it invalid, naming the CRC (or magic,
        // format, parity as checked first).
        let mut bc = BootControl::new_image(V1);
        let dev = stored(&mut bc);
        for i in (COPY_LEN..2 * COPY_LEN).step_by(7) {
            let mut b = dev.get_ref().clone();
            b[i] ^= 0x10;
            assert!(BootControl::decode(&b).is_err(), "byte {i}");
        }
        let mut b = dev.get_ref().clone();
        b[COPY_LEN + 100] ^= 1;
        assert!(matches!(
            BootControl::decode(&b),
            Err(BootCtlError::NoValidCopy {
                copy1: "CRC mismatch",
                ..
            })
        ));
        // A valid copy in the wrong place (copy 1's bytes at copy 0) is refused.
        let mut b = vec![0u8; 2 * COPY_LEN];
        b.copy_within(0..0, 0);
        b[..COPY_LEN].copy_from_slice(&dev.get_ref()[COPY_LEN..]);
        assert!(matches!(
            BootControl::decode(&b),
            Err(BootCtlError::NoValidCopy {
                copy0: "generation in the wrong copy",
                ..
            })
        ));
    }

    /// A store interrupted after any number of bytes leaves the old or the new state.
    #[test]
    fn torn_write_at_every_offset() {
        let mut bc = BootControl::new_image(V1);
        let mut dev = stored(&mut bc); // gen 1 in copy 1
        bc.mark_successful(Slot::A);
        bc.store(&mut dev).unwrap(); // gen 2 in copy 0; copy 1 still holds gen 1
        let old = BootControl::load(&mut dev).unwrap();
        assert_eq!(old.generation, 2);
        for stale in [false, true] {
            let mut new = old.clone();
            new.install_begin(Slot::B);
            let (off, copy) = new.clone().encode_next();
            let mut expected_new = new.clone();
            expected_new.generation += 1;
            for k in 0..=COPY_LEN {
                let mut b = dev.get_ref().clone();
                let o = off as usize;
                if stale {
                    // What the torn sector held before: garbage rather than an older copy.
                    b[o..o + COPY_LEN].fill(0xa5);
                }
                b[o..o + k].copy_from_slice(&copy[..k]);
                let got = BootControl::decode(&b).unwrap();
                if b[o..o + COPY_LEN] == copy[..] {
                    // Complete (the rest already held the same bytes).
                    assert_eq!(got, expected_new, "torn at {k}");
                } else {
                    assert_eq!(got, old, "torn at {k}");
                }
                if k == COPY_LEN {
                    assert_eq!(got, expected_new);
                }
            }
        }
    }

    #[test]
    fn generation_wraps() {
        let mut bc = BootControl::new_image(V1);
        bc.generation = u64::MAX - 2;
        let mut dev = Cursor::new(vec![0u8; 2 * COPY_LEN]);
        for _ in 0..4 {
            bc.mark_unbootable(Slot::B, &format!("gen {}", bc.generation));
            bc.store(&mut dev).unwrap();
            assert_eq!(BootControl::load(&mut dev).unwrap(), bc);
        }
        assert_eq!(bc.generation, 1);
    }

    #[test]
    fn failed_store_retries_the_same_copy() {
        struct Failing;
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl Seek for Failing {
            fn seek(&mut self, _: SeekFrom) -> io::Result<u64> {
                Ok(0)
            }
        }
        let mut bc = BootControl::new_image(V1);
        assert!(matches!(bc.store(&mut Failing), Err(BootCtlError::Io(_))));
        assert_eq!(bc.generation, 0);
    }

    #[test]
    fn new_image_first_boots_a_on_trial() {
        let mut bc = BootControl::new_image(V1);
        assert_eq!(bc.slot(Slot::B).priority, 0);
        assert!(!bc.bootable(Slot::B));
        assert_eq!(
            bc.choose(),
            Choice::Boot {
                slot: Slot::A,
                trial: true
            }
        );
        assert_eq!(bc.slot(Slot::A).tries, 2);
        bc.mark_successful(Slot::A);
        assert_eq!(bc.floor, V1);
        for _ in 0..5 {
            assert_eq!(
                bc.choose(),
                Choice::Boot {
                    slot: Slot::A,
                    trial: false
                }
            );
        }
        assert_eq!(bc.slot(Slot::A).tries, 0);
    }

    /// An update that never becomes healthy: three trial boots of B, then back to A.
    #[test]
    fn three_failed_tries_fall_back_to_the_other_slot() {
        let mut bc = BootControl::new_image(V1);
        bc.choose();
        bc.mark_successful(Slot::A);
        bc.install_begin(Slot::B);
        assert_eq!(bc.slot(Slot::B).note, "installing");
        assert!(!bc.bootable(Slot::B));
        assert_eq!(
            bc.choose(),
            Choice::Boot {
                slot: Slot::A,
                trial: false
            }
        );
        bc.install_commit(Slot::B, V2);
        assert_eq!(bc.slot(Slot::B).priority, 2);
        assert_eq!(bc.slot(Slot::A).priority, 1);
        let mut dev = stored(&mut bc);
        for left in [2u8, 1, 0] {
            // Each boot: load, choose, store, boot (and the health check never passes).
            let mut bc = BootControl::load(&mut dev).unwrap();
            assert_eq!(
                bc.choose(),
                Choice::Boot {
                    slot: Slot::B,
                    trial: true
                }
            );
            assert_eq!(bc.slot(Slot::B).tries, left);
            bc.store(&mut dev).unwrap();
        }
        let mut bc = BootControl::load(&mut dev).unwrap();
        assert_eq!(
            bc.choose(),
            Choice::Boot {
                slot: Slot::A,
                trial: false
            }
        );
        assert_eq!(bc.slot(Slot::B).priority, 0);
        assert!(
            bc.slot(Slot::B).note.contains("trial boots"),
            "{:?}",
            bc.slot(Slot::B)
        );
        assert_eq!(bc.floor, V1);
    }

    #[test]
    fn successful_update_raises_the_floor() {
        let mut bc = BootControl::new_image(V1);
        bc.choose();
        bc.mark_successful(Slot::A);
        bc.install_begin(Slot::B);
        bc.install_commit(Slot::B, V2);
        assert_eq!(
            bc.choose(),
            Choice::Boot {
                slot: Slot::B,
                trial: true
            }
        );
        bc.mark_successful(Slot::B);
        assert_eq!(bc.floor, V2);
        // A (1.0.0) is now below the floor: not bootable even though successful.
        assert!(!bc.bootable(Slot::A));
        bc.mark_unbootable(Slot::B, "bundle signature: does not verify");
        assert_eq!(bc.choose(), Choice::NoBootableSlot);
        assert_eq!(bc.slot(Slot::B).tries, 0);
        // The floor never falls.
        bc.slot_mut(Slot::A).version = Version::new(3, 0, 0);
        bc.slot_mut(Slot::A).priority = 1;
        bc.mark_successful(Slot::A);
        bc.slot_mut(Slot::B).version = V1;
        bc.mark_successful(Slot::B);
        assert_eq!(bc.floor, Version::new(3, 0, 0));
    }

    #[test]
    fn choose_priorities_and_ties() {
        let mut bc = BootControl::new_image(V1);
        for s in Slot::ALL {
            *bc.slot_mut(s) = SlotState {
                priority: 5,
                successful: true,
                version: V1,
                ..SlotState::default()
            };
        }
        assert_eq!(
            bc.choose(),
            Choice::Boot {
                slot: Slot::A,
                trial: false
            }
        );
        bc.slot_mut(Slot::B).priority = 6;
        assert_eq!(
            bc.choose(),
            Choice::Boot {
                slot: Slot::B,
                trial: false
            }
        );
        bc.slot_mut(Slot::B).priority = 0;
        assert_eq!(
            bc.choose(),
            Choice::Boot {
                slot: Slot::A,
                trial: false
            }
        );
        bc.mark_unbootable(Slot::A, &"x".repeat(500));
        assert_eq!(bc.slot(Slot::A).note.len(), MAX_NOTE);
        assert_eq!(bc.choose(), Choice::NoBootableSlot);
    }

    #[test]
    fn install_commit_priorities() {
        let mut bc = BootControl::new_image(V1);
        bc.install_commit(Slot::B, V2);
        assert_eq!(
            (bc.slot(Slot::A).priority, bc.slot(Slot::B).priority),
            (1, 2)
        );
        bc.install_commit(Slot::A, Version::new(3, 0, 0));
        assert_eq!(
            (bc.slot(Slot::A).priority, bc.slot(Slot::B).priority),
            (3, 2)
        );
        bc.slot_mut(Slot::A).priority = 0;
        bc.install_commit(Slot::B, V2);
        assert_eq!(bc.slot(Slot::B).priority, 2);
        bc.slot_mut(Slot::A).priority = 254;
        bc.install_commit(Slot::B, V2);
        assert_eq!(bc.slot(Slot::B).priority, 255);
        bc.install_commit(Slot::A, V2);
        assert_eq!(
            (bc.slot(Slot::A).priority, bc.slot(Slot::B).priority),
            (2, 1)
        );
        assert_eq!(bc.slot(Slot::A).tries, DEFAULT_TRIES);
    }

    #[test]
    fn serializes_for_status() {
        let bc = BootControl::new_image(V1);
        let j = serde_json::to_value(&bc).unwrap();
        assert_eq!(j["slots"][0]["priority"], 1);
        assert_eq!(j["slots"][1]["note"], "empty");
        assert_eq!(j["floor"]["major"], 0);
    }
}
