//! GUID partition tables (UEFI spec, chapter 5) for the appliance disk: written by the image
//! build, read by tools and tests. The kernel names partitions by their GPT names (`PARTNAME`),
//! which is how the loader finds `bootctl`, `slot_a`, `slot_b`, `sealed` and `data`.
//!
//! What [`write`] lays out (512-byte sectors, N = disk sectors, integers little-endian):
//!
//! ```text
//! LBA 0         protective MBR: one partition, type 0xEE, LBA 1 .. min(N-1, 2^32-1), 0x55AA
//! LBA 1         primary header ("EFI PART", revision 1.0, 92 bytes, CRC-32 of the header)
//! LBA 2..33     primary entry array: 128 entries x 128 bytes
//! 2048 ...      partitions, each starting on a 1 MiB boundary
//! LBA N-33..N-2 backup entry array
//! LBA N-1       backup header
//! ```
//!
//! [`read`] checks the protective MBR, then the primary header and entries; on any failure of
//! the primary table it reads the backup (at the primary's backup LBA, or the last sector).

use std::io::{self, Read, Seek, SeekFrom, Write};

use ring::rand::{SecureRandom, SystemRandom};

/// Bytes per sector (logical block).
pub const SECTOR: u64 = 512;
/// Entries in the entry array.
pub const ENTRIES: u32 = 128;
/// Bytes per entry.
pub const ENTRY_LEN: u32 = 128;
/// Partitions start on multiples of this many bytes.
pub const ALIGN: u64 = 1 << 20;
/// Longest partition name, in UTF-16 code units.
pub const MAX_NAME: usize = 36;
/// The partition type GUID "Linux filesystem data", 0FC63DAF-8483-4772-8E79-3D69D8477DE4, in
/// its on-disk byte order.
pub const LINUX_FS_DATA: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];

const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION: u32 = 0x0001_0000;
const HEADER_SIZE: u32 = 92;
/// Sectors of the entry array (128 * 128 / 512).
const ARRAY_SECTORS: u64 = (ENTRIES as u64 * ENTRY_LEN as u64) / SECTOR;
/// Largest entry array read (entries * entry size).
const MAX_ARRAY: u64 = 1 << 20;

/// One partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The GPT name (the kernel's `PARTNAME`).
    pub name: String,
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
}

impl Partition {
    /// Byte offset of the partition on the disk.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    /// Bytes of the partition.
    #[allow(clippy::len_without_is_empty)] // a partition is never empty
    pub fn len(&self) -> u64 {
        (self.last_lba - self.first_lba + 1) * SECTOR
    }
}

/// Why a GPT could not be read or written; each names the check.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("GPT: bad protective MBR: {0}")]
    BadMbr(&'static str),
    #[error("GPT {which} header: bad signature or revision")]
    BadSignature { which: &'static str },
    #[error("GPT {which} header: bad header size {size}")]
    BadHeaderSize { which: &'static str, size: u32 },
    #[error("GPT {which} header: header CRC mismatch")]
    HeaderCrc { which: &'static str },
    #[error("GPT {which} header: {0}", .what)]
    BadHeader {
        which: &'static str,
        what: &'static str,
    },
    #[error("GPT {which} entries: entries CRC mismatch")]
    EntriesCrc { which: &'static str },
    #[error("GPT partition {index}: {what}")]
    BadEntry { index: u32, what: &'static str },
    #[error("GPT partition {index}: name is not valid UTF-16 or has characters after its end")]
    BadName { index: u32 },
    #[error("GPT: partitions {a:?} and {b:?} overlap")]
    Overlap { a: String, b: String },
    #[error("GPT: both tables are unusable: primary: {primary}; backup: {backup}")]
    BothInvalid {
        primary: Box<GptError>,
        backup: Box<GptError>,
    },
    #[error("GPT layout: partition name {0:?} is empty, too long (36 UTF-16 units) or has NUL")]
    BadPartitionName(String),
    #[error("GPT layout: partition {0:?} has size 0")]
    EmptyPartition(String),
    #[error("GPT layout: partition name {0:?} used twice")]
    DuplicateName(String),
    #[error("GPT layout: more than {ENTRIES} partitions")]
    TooManyPartitions,
    #[error("GPT layout: disk of {disk_len} bytes is too small (needs {need})")]
    DiskTooSmall { disk_len: u64, need: u64 },
    #[error("GPT layout: disk length {0} is not a multiple of {SECTOR}")]
    UnalignedDisk(u64),
    #[error("GPT: the system random source failed")]
    Random,
    #[error("GPT i/o: {0}")]
    Io(#[from] io::Error),
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Checks a layout name and returns its UTF-16 units.
fn name_units(name: &str) -> Result<Vec<u16>, GptError> {
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.is_empty() || units.len() > MAX_NAME || units.contains(&0) {
        return Err(GptError::BadPartitionName(name.chars().take(80).collect()));
    }
    Ok(units)
}

/// A random (version 4) GUID in on-disk byte order.
fn random_guid(rng: &SystemRandom) -> Result<[u8; 16], GptError> {
    let mut g = [0u8; 16];
    rng.fill(&mut g).map_err(|_| GptError::Random)?;
    g[7] = (g[7] & 0x0f) | 0x40; // time_hi_and_version (little-endian): version 4
    g[8] = (g[8] & 0x3f) | 0x80; // clock_seq_hi: RFC 4122 variant
    Ok(g)
}

#[allow(clippy::too_many_arguments)]
fn header_bytes(
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: &[u8; 16],
    entries_lba: u64,
    entries_crc: u32,
) -> [u8; SECTOR as usize] {
    let mut h = [0u8; SECTOR as usize];
    h[0..8].copy_from_slice(SIGNATURE);
    h[8..12].copy_from_slice(&REVISION.to_le_bytes());
    h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    // 16..20 header CRC, 20..24 reserved
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    h[40..48].copy_from_slice(&first_usable.to_le_bytes());
    h[48..56].copy_from_slice(&last_usable.to_le_bytes());
    h[56..72].copy_from_slice(disk_guid);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
    h[84..88].copy_from_slice(&ENTRY_LEN.to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes a fresh GPT for a disk of `disk_len` bytes with the partitions `parts` (name, size in
/// bytes; sizes are rounded up to whole sectors), in order, each on a 1 MiB boundary: protective
/// MBR, primary and backup headers and entry arrays. Type "Linux filesystem data", random unique
/// GUIDs. Returns the partitions as laid out. Only the table sectors are written.
pub fn write<D: Write + Seek>(
    dev: &mut D,
    disk_len: u64,
    parts: &[(&str, u64)],
) -> Result<Vec<Partition>, GptError> {
    if !disk_len.is_multiple_of(SECTOR) {
        return Err(GptError::UnalignedDisk(disk_len));
    }
    if parts.len() > ENTRIES as usize {
        return Err(GptError::TooManyPartitions);
    }
    let sectors = disk_len / SECTOR;
    let first_usable = 2 + ARRAY_SECTORS;
    let min_sectors = 2 * (1 + ARRAY_SECTORS) + 1 + ALIGN / SECTOR;
    let Some(last_usable) = sectors
        .checked_sub(2 + ARRAY_SECTORS)
        .filter(|_| sectors >= min_sectors)
    else {
        return Err(GptError::DiskTooSmall {
            disk_len,
            need: min_sectors * SECTOR,
        });
    };
    let (layout, names) = lay_out(disk_len, parts, last_usable)?;

    let rng = SystemRandom::new();
    let array = entry_array(&layout, &names, &rng)?;
    let entries_crc = crc32fast::hash(&array);
    let disk_guid = random_guid(&rng)?;
    let backup_lba = sectors - 1;
    let backup_array_lba = backup_lba - ARRAY_SECTORS;

    let mbr = protective_mbr(sectors);
    let primary = header_bytes(
        1,
        backup_lba,
        first_usable,
        last_usable,
        &disk_guid,
        2,
        entries_crc,
    );
    let backup = header_bytes(
        backup_lba,
        1,
        first_usable,
        last_usable,
        &disk_guid,
        backup_array_lba,
        entries_crc,
    );
    dev.seek(SeekFrom::Start(0))?;
    dev.write_all(&mbr)?;
    dev.write_all(&primary)?;
    dev.write_all(&array)?;
    dev.seek(SeekFrom::Start(backup_array_lba * SECTOR))?;
    dev.write_all(&array)?;
    dev.write_all(&backup)?;
    dev.flush()?;
    Ok(layout)
}

/// Places `parts` in order, each on a 1 MiB boundary, ending by `last_usable`; returns the
/// partitions and their names as UTF-16 units.
fn lay_out(
    disk_len: u64,
    parts: &[(&str, u64)],
    last_usable: u64,
) -> Result<(Vec<Partition>, Vec<Vec<u16>>), GptError> {
    let align = ALIGN / SECTOR;
    let mut layout = Vec::with_capacity(parts.len());
    let mut names = Vec::with_capacity(parts.len());
    let mut next = align; // LBA 2048
    for &(name, bytes) in parts {
        let units = name_units(name)?;
        if layout.iter().any(|p: &Partition| p.name == name) {
            return Err(GptError::DuplicateName(name.to_owned()));
        }
        if bytes == 0 {
            return Err(GptError::EmptyPartition(name.to_owned()));
        }
        let first = next;
        let too_small = || GptError::DiskTooSmall {
            disk_len,
            need: u64::MAX,
        };
        let last = first
            .checked_add(bytes.div_ceil(SECTOR) - 1)
            .ok_or_else(too_small)?;
        if last > last_usable {
            // The disk length that would have fit: this partition's end plus the backup table.
            let need = (last + 1 + 1 + ARRAY_SECTORS).saturating_mul(SECTOR);
            return Err(GptError::DiskTooSmall { disk_len, need });
        }
        layout.push(Partition {
            name: name.to_owned(),
            first_lba: first,
            last_lba: last,
        });
        names.push(units);
        next = (last + 1).div_ceil(align).saturating_mul(align);
    }
    Ok((layout, names))
}

/// The partition entry array for `layout` (names as UTF-16 `names`), with random unique GUIDs.
fn entry_array(
    layout: &[Partition],
    names: &[Vec<u16>],
    rng: &SystemRandom,
) -> Result<Vec<u8>, GptError> {
    let mut array = vec![0u8; (ENTRIES * ENTRY_LEN) as usize];
    for (i, (p, units)) in layout.iter().zip(names).enumerate() {
        let e = &mut array[i * ENTRY_LEN as usize..(i + 1) * ENTRY_LEN as usize];
        e[0..16].copy_from_slice(&LINUX_FS_DATA);
        e[16..32].copy_from_slice(&random_guid(rng)?);
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        // 48..56 attributes: none
        for (j, u) in units.iter().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
        }
    }
    Ok(array)
}

/// The protective MBR for a disk of `sectors` sectors: one partition of type 0xEE from LBA 1.
fn protective_mbr(sectors: u64) -> [u8; SECTOR as usize] {
    let mut mbr = [0u8; SECTOR as usize];
    let pe = &mut mbr[446..462];
    pe[0] = 0; // not bootable
    pe[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    pe[4] = 0xee;
    pe[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    pe[8..12].copy_from_slice(&1u32.to_le_bytes());
    let size = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    pe[12..16].copy_from_slice(&size.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    mbr
}

fn read_at<D: Read + Seek>(dev: &mut D, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    dev.seek(SeekFrom::Start(offset))?;
    dev.read_exact(buf)
}

/// Checks the protective MBR in LBA 0.
fn check_mbr(mbr: &[u8]) -> Result<(), GptError> {
    if mbr[510..512] != [0x55, 0xaa] {
        return Err(GptError::BadMbr("no 0x55AA boot signature"));
    }
    let protective = (0..4).any(|i| mbr[446 + 16 * i + 4] == 0xee);
    if !protective {
        return Err(GptError::BadMbr("no partition of type 0xEE"));
    }
    Ok(())
}

/// Reads the table whose header is at `lba` (`which` = "primary" or "backup").
fn read_table<D: Read + Seek>(
    dev: &mut D,
    lba: u64,
    sectors: u64,
    which: &'static str,
) -> Result<Vec<Partition>, GptError> {
    let header = read_header(dev, lba, sectors, which)?;
    let bad = |what| GptError::BadHeader { which, what };
    let array_len = u64::from(header.count) * u64::from(header.entry_len);
    if array_len > MAX_ARRAY {
        return Err(bad("entry array larger than 1 MiB"));
    }
    let array_sectors = array_len.div_ceil(SECTOR);
    if header.entries_lba < 1
        || header
            .entries_lba
            .checked_add(array_sectors)
            .is_none_or(|end| end > sectors)
    {
        return Err(bad("entry array outside the disk"));
    }
    let mut array = vec![0u8; array_len as usize];
    read_at(dev, header.entries_lba * SECTOR, &mut array)?;
    if crc32fast::hash(&array) != header.entries_crc {
        return Err(GptError::EntriesCrc { which });
    }
    let mut parts: Vec<Partition> = Vec::new();
    for index in 0..header.count {
        let at = (index * header.entry_len) as usize..((index + 1) * header.entry_len) as usize;
        let Some(part) = parse_entry(&array[at], index, &header)? else {
            continue; // unused
        };
        if let Some(o) = parts
            .iter()
            .find(|p| p.first_lba <= part.last_lba && part.first_lba <= p.last_lba)
        {
            return Err(GptError::Overlap {
                a: o.name.clone(),
                b: part.name,
            });
        }
        parts.push(part);
    }
    Ok(parts)
}

/// The fields of a checked GPT header that locate and bound its entries.
struct Header {
    first_usable: u64,
    last_usable: u64,
    entries_lba: u64,
    count: u32,
    entry_len: u32,
    entries_crc: u32,
}

/// Reads and checks the header at `lba` (signature, revision, size, CRC, own LBA, usable
/// range, entry size).
fn read_header<D: Read + Seek>(
    dev: &mut D,
    lba: u64,
    sectors: u64,
    which: &'static str,
) -> Result<Header, GptError> {
    let bad = |what| GptError::BadHeader { which, what };
    if lba == 0 || lba >= sectors {
        return Err(bad("header LBA outside the disk"));
    }
    let mut h = [0u8; SECTOR as usize];
    read_at(dev, lba * SECTOR, &mut h)?;
    if &h[0..8] != SIGNATURE || le_u32(&h, 8) != REVISION {
        return Err(GptError::BadSignature { which });
    }
    let size = le_u32(&h, 12);
    if !(HEADER_SIZE..=SECTOR as u32).contains(&size) {
        return Err(GptError::BadHeaderSize { which, size });
    }
    let stored_crc = le_u32(&h, 16);
    let mut c = h;
    c[16..20].fill(0);
    if crc32fast::hash(&c[..size as usize]) != stored_crc {
        return Err(GptError::HeaderCrc { which });
    }
    if le_u64(&h, 24) != lba {
        return Err(bad("its own LBA field is not where it was found"));
    }
    let first_usable = le_u64(&h, 40);
    let last_usable = le_u64(&h, 48);
    if first_usable > last_usable || last_usable >= sectors {
        return Err(bad("usable range outside the disk"));
    }
    let entries_lba = le_u64(&h, 72);
    let count = le_u32(&h, 80);
    let entry_len = le_u32(&h, 84);
    if entry_len < 128 || !entry_len.is_multiple_of(8) {
        return Err(bad("entry size not a multiple of 8 of at least 128"));
    }
    Ok(Header {
        first_usable,
        last_usable,
        entries_lba,
        count,
        entry_len,
        entries_crc: le_u32(&h, 88),
    })
}

/// Parses entry `index` (`e`, `header.entry_len` bytes): `None` if unused, else the partition,
/// which must lie within the usable sectors and have a valid UTF-16 name.
fn parse_entry(e: &[u8], index: u32, header: &Header) -> Result<Option<Partition>, GptError> {
    if e[0..16].iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let first_lba = le_u64(e, 32);
    let last_lba = le_u64(e, 40);
    if first_lba > last_lba {
        return Err(GptError::BadEntry {
            index,
            what: "ends before it starts",
        });
    }
    if first_lba < header.first_usable || last_lba > header.last_usable {
        return Err(GptError::BadEntry {
            index,
            what: "outside the usable sectors",
        });
    }
    let units: Vec<u16> = e[56..128]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    if units[end..].iter().any(|&u| u != 0) {
        return Err(GptError::BadName { index });
    }
    let name = String::from_utf16(&units[..end]).map_err(|_| GptError::BadName { index })?;
    Ok(Some(Partition {
        name,
        first_lba,
        last_lba,
    }))
}

/// Reads the partitions (in entry order) of the GPT on `dev`: the protective MBR must be valid;
/// the primary table is used if it is intact, else the backup.
pub fn read<D: Read + Seek>(dev: &mut D) -> Result<Vec<Partition>, GptError> {
    let disk_len = dev.seek(SeekFrom::End(0))?;
    let sectors = disk_len / SECTOR;
    if sectors < 3 {
        return Err(GptError::BadMbr("disk shorter than 3 sectors"));
    }
    let mut mbr = [0u8; SECTOR as usize];
    read_at(dev, 0, &mut mbr)?;
    check_mbr(&mbr)?;
    let primary = match read_table(dev, 1, sectors, "primary") {
        Ok(parts) => return Ok(parts),
        Err(GptError::Io(e)) => return Err(GptError::Io(e)),
        Err(e) => e,
    };
    // The primary's alternate LBA if its header is intact, else the last sector.
    let mut h = [0u8; SECTOR as usize];
    read_at(dev, SECTOR, &mut h)?;
    let mut backup_lba = sectors - 1;
    let size = le_u32(&h, 12);
    if &h[0..8] == SIGNATURE && (HEADER_SIZE..=SECTOR as u32).contains(&size) {
        let stored = le_u32(&h, 16);
        h[16..20].fill(0);
        if crc32fast::hash(&h[..size as usize]) == stored {
            backup_lba = le_u64(&h, 32);
        }
    }
    match read_table(dev, backup_lba, sectors, "backup") {
        Ok(parts) => Ok(parts),
        Err(GptError::Io(e)) => Err(GptError::Io(e)),
        Err(backup) => Err(GptError::BothInvalid {
            primary: Box::new(primary),
            backup: Box::new(backup),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Cursor;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn layout() -> Vec<(&'static str, u64)> {
        vec![
            ("bootctl", MIB),
            ("slot_a", 3 * MIB),
            ("slot_b", 3 * MIB),
            ("sealed", MIB + 1),
            ("data", 2 * MIB),
        ]
    }

    fn disk() -> (Cursor<Vec<u8>>, Vec<Partition>) {
        let len = 16 * MIB;
        let mut dev = Cursor::new(vec![0u8; len as usize]);
        let parts = write(&mut dev, len, &layout()).unwrap();
        (dev, parts)
    }

    #[test]
    fn write_read_round_trip() {
        let (mut dev, parts) = disk();
        let names: Vec<_> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bootctl", "slot_a", "slot_b", "sealed", "data"]);
        for p in &parts {
            assert_eq!(p.offset() % ALIGN, 0, "{p:?}");
        }
        assert_eq!(parts[0].first_lba, 2048);
        assert_eq!(parts[0].len(), MIB);
        assert_eq!(parts[1].offset(), 2 * MIB);
        assert_eq!(parts[3].len(), MIB + SECTOR); // rounded up to a sector
        assert_eq!(parts[4].offset(), 10 * MIB); // sealed rounded up to the next MiB
        assert_eq!(read(&mut dev).unwrap(), parts);
        let b = dev.get_ref();
        assert_eq!(&b[510..512], &[0x55, 0xaa]);
        assert_eq!(b[446 + 4], 0xee);
        assert_eq!(&b[512..520], b"EFI PART");
        assert_eq!(&b[b.len() - 512..b.len() - 504], b"EFI PART");
        // Entry 0: type, a v4 unique GUID, name in UTF-16LE.
        let e = &b[1024..1152];
        assert_eq!(&e[0..16], &LINUX_FS_DATA);
        assert_eq!(e[23] >> 4, 4);
        assert_eq!(&e[56..64], &[b'b', 0, b'o', 0, b'o', 0, b't', 0]);
        // Unique GUIDs differ.
        assert_ne!(&b[1024 + 16..1024 + 32], &b[1152 + 16..1152 + 32]);
        // Both headers carry the same disk GUID and entries CRC.
        let n = b.len();
        assert_eq!(&b[512 + 56..512 + 72], &b[n - 512 + 56..n - 512 + 72]);
        assert_eq!(&b[512 + 88..512 + 92], &b[n - 512 + 88..n - 512 + 92]);
    }

    #[test]
    fn corrupted_primary_falls_back_to_backup() {
        let (dev, parts) = disk();
        // Header CRC: a byte of the primary header.
        let mut b = dev.get_ref().clone();
        b[512 + 40] ^= 1;
        assert_eq!(read(&mut Cursor::new(b)).unwrap(), parts);
        // Entries CRC: a byte of the primary entry array.
        let mut b = dev.get_ref().clone();
        b[1024 + 60] ^= 1;
        assert_eq!(read(&mut Cursor::new(b)).unwrap(), parts);
        // Primary header wiped.
        let mut b = dev.get_ref().clone();
        b[512..1024].fill(0);
        assert_eq!(read(&mut Cursor::new(b)).unwrap(), parts);
    }

    #[test]
    fn crc_errors_named() {
        let (dev, _) = disk();
        let n = dev.get_ref().len();
        let mut b = dev.get_ref().clone();
        b[512 + 40] ^= 1;
        b[n - 512 + 40] ^= 1;
        let e = read(&mut Cursor::new(b)).unwrap_err();
        match &e {
            GptError::BothInvalid { primary, backup } => {
                assert!(matches!(
                    **primary,
                    GptError::HeaderCrc { which: "primary" }
                ));
                assert!(matches!(**backup, GptError::HeaderCrc { which: "backup" }));
            }
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("primary header: header CRC mismatch"), "{msg}");
        assert!(msg.contains("backup header: header CRC mismatch"), "{msg}");
        let mut b = dev.get_ref().clone();
        b[1024 + 60] ^= 1;
        b[n - 512 - 16384 + 60] ^= 1;
        let e = read(&mut Cursor::new(b)).unwrap_err().to_string();
        assert!(e.contains("primary entries: entries CRC mismatch"), "{e}");
        assert!(e.contains("backup entries: entries CRC mismatch"), "{e}");
    }

    #[test]
    fn bad_mbr() {
        let (dev, _) = disk();
        let mut b = dev.get_ref().clone();
        b[511] = 0;
        let e = read(&mut Cursor::new(b)).unwrap_err();
        assert!(matches!(e, GptError::BadMbr(_)), "{e}");
        assert!(e.to_string().contains("bad protective MBR"), "{e}");
        let mut b = dev.get_ref().clone();
        b[446 + 4] = 0x83;
        assert!(matches!(
            read(&mut Cursor::new(b)),
            Err(GptError::BadMbr("no partition of type 0xEE"))
        ));
        assert!(matches!(
            read(&mut Cursor::new(vec![0u8; 100])),
            Err(GptError::BadMbr(_))
        ));
    }

    /// Rewrites entry `i` of both arrays and fixes every CRC, so only the entry check fails.
    fn patch_entry(b: &mut [u8], i: usize, f: impl Fn(&mut [u8])) {
        let n = b.len();
        for (hdr, arr) in [(512, 1024), (n - 512, n - 512 - 16384)] {
            f(&mut b[arr + 128 * i..arr + 128 * (i + 1)]);
            let crc = crc32fast::hash(&b[arr..arr + 16384]);
            b[hdr + 88..hdr + 92].copy_from_slice(&crc.to_le_bytes());
            b[hdr + 16..hdr + 20].fill(0);
            let crc = crc32fast::hash(&b[hdr..hdr + 92]);
            b[hdr + 16..hdr + 20].copy_from_slice(&crc.to_le_bytes());
        }
    }

    fn both_fail(b: Vec<u8>) -> GptError {
        match read(&mut Cursor::new(b)).unwrap_err() {
            GptError::BothInvalid { primary, .. } => *primary,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn entry_checks_named() {
        let (dev, _) = disk();
        let mut b = dev.get_ref().clone();
        // slot_a starts inside bootctl.
        patch_entry(&mut b, 1, |e| {
            e[32..40].copy_from_slice(&3000u64.to_le_bytes())
        });
        let e = both_fail(b);
        assert!(
            matches!(&e, GptError::Overlap { a, b } if a == "bootctl" && b == "slot_a"),
            "{e}"
        );
        assert!(e.to_string().contains("overlap"));
        let mut b = dev.get_ref().clone();
        patch_entry(&mut b, 0, |e| {
            e[56..58].copy_from_slice(&0xd800u16.to_le_bytes())
        });
        assert!(matches!(both_fail(b), GptError::BadName { index: 0 }));
        let mut b = dev.get_ref().clone();
        patch_entry(&mut b, 0, |e| e[100] = b'x');
        assert!(matches!(both_fail(b), GptError::BadName { index: 0 }));
        let mut b = dev.get_ref().clone();
        patch_entry(&mut b, 2, |e| {
            e[40..48].copy_from_slice(&1u64.to_le_bytes())
        });
        assert!(matches!(both_fail(b), GptError::BadEntry { index: 2, .. }));
        let mut b = dev.get_ref().clone();
        patch_entry(&mut b, 2, |e| {
            e[40..48].copy_from_slice(&u64::MAX.to_le_bytes())
        });
        assert!(matches!(
            both_fail(b),
            GptError::BadEntry {
                index: 2,
                what: "outside the usable sectors"
            }
        ));
    }

    #[test]
    fn layout_refusals() {
        let mut dev = Cursor::new(Vec::new());
        let mut w = |len, parts: &[(&str, u64)]| write(&mut dev, len, parts).unwrap_err();
        assert!(matches!(w(16 * MIB + 1, &[]), GptError::UnalignedDisk(_)));
        assert!(matches!(w(MIB, &[]), GptError::DiskTooSmall { .. }));
        let e = w(4 * MIB, &[("a", 3 * MIB)]);
        assert!(
            matches!(e, GptError::DiskTooSmall { need, .. } if need == 4 * MIB + 33 * SECTOR),
            "{e}"
        );
        assert!(matches!(
            w(16 * MIB, &[("", 1)]),
            GptError::BadPartitionName(_)
        ));
        assert!(matches!(
            w(16 * MIB, &[(&"x".repeat(37), 1)]),
            GptError::BadPartitionName(_)
        ));
        assert!(matches!(
            w(16 * MIB, &[("a\0", 1)]),
            GptError::BadPartitionName(_)
        ));
        assert!(matches!(
            w(16 * MIB, &[("a", 0)]),
            GptError::EmptyPartition(_)
        ));
        assert!(matches!(
            w(16 * MIB, &[("a", 1), ("a", 1)]),
            GptError::DuplicateName(_)
        ));
        let many: Vec<(&str, u64)> = (0..129).map(|_| ("p", 1)).collect();
        assert!(matches!(w(16 * MIB, &many), GptError::TooManyPartitions));
        assert!(matches!(
            w(16 * MIB, &[("a", u64::MAX)]),
            GptError::DiskTooSmall { .. }
        ));
        // 36 UTF-16 units and non-ASCII names fit.
        let mut dev = Cursor::new(Vec::new());
        let name = "é".repeat(36);
        let parts = write(&mut dev, 8 * MIB, &[(&name, 1)]).unwrap();
        assert_eq!(read(&mut dev).unwrap(), parts);
        assert_eq!(parts[0].name, name);
    }

    #[test]
    fn sparse_write_extends_the_file() {
        let mut dev = Cursor::new(Vec::new());
        let parts = write(&mut dev, 8 * MIB, &[("a", MIB)]).unwrap();
        assert_eq!(dev.get_ref().len() as u64, 8 * MIB);
        assert_eq!(read(&mut dev).unwrap(), parts);
    }
}
