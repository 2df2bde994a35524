//! A writer of the "newc" cpio format (the one the Linux kernel unpacks as an initramfs):
//! directories, regular files and character device nodes, owned by root, with fixed times.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields: inode, mode,
//! uid, gid, link count, mtime, file size, device major/minor, rdev major/minor, name size
//! including its NUL, checksum 0), the name and a NUL padded to a multiple of 4, then the data
//! padded to a multiple of 4. The archive ends with the entry `TRAILER!!!`.
//!
//! The writer checks what the kernel would otherwise trip over at boot: names are relative,
//! without `.`/`..` components, unique, and every entry's parent directory was written before
//! it. Sizes are bounded by the format (4 GiB - 1 per file) and by [`MAX_ENTRIES`].

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

/// The newc magic.
pub const MAGIC: &[u8; 6] = b"070701";
/// Header length before the name.
pub const HEADER_LEN: usize = 110;
/// Longest entry name in bytes (Linux's PATH_MAX less the NUL).
pub const MAX_NAME: usize = 4095;
/// Largest file the format can describe (the size field is 8 hex digits).
pub const MAX_FILE: u64 = u32::MAX as u64;
/// Most entries in one archive (an initramfs holds a few dozen).
pub const MAX_ENTRIES: usize = 65_536;
/// The name of the end-of-archive entry.
pub const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// Why an entry was refused; nothing of a refused entry has been written.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("cpio entry name {0:?} is empty, absolute, or has an empty, `.` or `..` component")]
    BadName(String),
    #[error("cpio entry name {name:?} is {len} bytes, more than {MAX_NAME}")]
    NameTooLong { name: String, len: usize },
    #[error("cpio entry {0:?} is written twice")]
    Duplicate(String),
    #[error("cpio entry {name:?}: its directory {parent:?} was not written before it")]
    MissingParent { name: String, parent: String },
    #[error("cpio entry {name:?}: mode {mode:#o} has bits beyond the permission bits 07777")]
    BadMode { name: String, mode: u32 },
    #[error("cpio entry {name:?} is {len} bytes, more than the format's {MAX_FILE}")]
    FileTooLarge { name: String, len: u64 },
    #[error("cpio entry {name:?}: expected {expected} bytes from its reader, got {got}")]
    LengthMismatch {
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("cpio archive has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error("writing the cpio archive: {0}")]
    Io(#[from] io::Error),
}

/// Writes a newc archive to `W`, entry by entry; [`CpioWriter::finish`] writes the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    /// Next inode number (the kernel links entries with equal inode only when nlink > 1).
    ino: u32,
    /// Modification time of every entry (fixed, so that archives are reproducible).
    mtime: u32,
    /// Directories written so far ("" is the archive root).
    dirs: BTreeSet<String>,
    /// Every name written so far.
    names: BTreeSet<String>,
    /// Bytes written so far.
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// A writer whose entries all carry modification time `mtime` (seconds since 1970).
    pub fn new(out: W, mtime: u32) -> Self {
        CpioWriter {
            out,
            ino: 1,
            mtime,
            dirs: BTreeSet::from([String::new()]),
            names: BTreeSet::new(),
            written: 0,
        }
    }

    /// Bytes of archive written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// A directory with permission bits `perm` (e.g. 0o755).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.check(name, perm)?;
        self.header(name, S_IFDIR | perm, 2, 0, (0, 0))?;
        self.dirs.insert(name.to_owned());
        Ok(())
    }

    /// A regular file with permission bits `perm` and contents `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let mut reader = data;
        self.file_from(name, perm, data.len() as u64, &mut reader)
    }

    /// A regular file of exactly `len` bytes read from `data` (streamed, 64 KiB at a time).
    /// A reader that ends early or has more bytes is an error (the archive is then unusable).
    pub fn file_from<R: Read>(
        &mut self,
        name: &str,
        perm: u32,
        len: u64,
        data: &mut R,
    ) -> Result<(), CpioError> {
        self.check(name, perm)?;
        let size = u32::try_from(len).map_err(|_| CpioError::FileTooLarge {
            name: name.to_owned(),
            len,
        })?;
        self.header(name, S_IFREG | perm, 1, size, (0, 0))?;
        let mut buf = vec![0u8; 64 << 10];
        let mut left = len;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = data.read(&mut buf[..want])?;
            if n == 0 {
                return Err(CpioError::LengthMismatch {
                    name: name.to_owned(),
                    expected: len,
                    got: len - left,
                });
            }
            self.out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        if data.read(&mut buf[..1])? != 0 {
            return Err(CpioError::LengthMismatch {
                name: name.to_owned(),
                expected: len,
                got: len + 1,
            });
        }
        self.written += len;
        self.pad()
    }

    /// A character device node `major:minor` with permission bits `perm`
    /// (e.g. `dev/console`, 5:1, 0o600).
    pub fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.check(name, perm)?;
        self.header(name, S_IFCHR | perm, 1, 0, (major, minor))
    }

    /// Writes the trailer and returns the output and the archive's length. The archive is padded
    /// to a multiple of 512 bytes (as GNU cpio does), so that archives can be concatenated.
    pub fn finish(mut self) -> Result<(W, u64), CpioError> {
        self.ino = 0;
        self.header_raw(TRAILER, 0, 1, 0, (0, 0))?;
        let tail = (512 - self.written % 512) % 512;
        self.out.write_all(&vec![0u8; tail as usize])?;
        self.written += tail;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn check(&self, name: &str, perm: u32) -> Result<(), CpioError> {
        if self.names.len() >= MAX_ENTRIES {
            return Err(CpioError::TooManyEntries);
        }
        if name.len() > MAX_NAME {
            return Err(CpioError::NameTooLong {
                name: name.chars().take(64).collect(),
                len: name.len(),
            });
        }
        if name.is_empty()
            || name == TRAILER
            || name.contains('\0')
            || name
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(CpioError::BadName(name.to_owned()));
        }
        if perm & !0o7777 != 0 {
            return Err(CpioError::BadMode {
                name: name.to_owned(),
                mode: perm,
            });
        }
        if self.names.contains(name) {
            return Err(CpioError::Duplicate(name.to_owned()));
        }
        let parent = name.rsplit_once('/').map_or("", |(parent, _)| parent);
        if !self.dirs.contains(parent) {
            return Err(CpioError::MissingParent {
                name: name.to_owned(),
                parent: parent.to_owned(),
            });
        }
        Ok(())
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        self.header_raw(name, mode, nlink, size, rdev)?;
        self.names.insert(name.to_owned());
        self.ino += 1;
        Ok(())
    }

    fn header_raw(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            self.mtime,
            size,
            0, // major of the device holding the file
            0, // minor
            rdev.0,
            rdev.1,
            u32::try_from(namesize).map_err(|_| CpioError::BadName(name.to_owned()))?,
            0, // checksum (only in the "070702" variant)
        ];
        let mut head = Vec::with_capacity(HEADER_LEN + namesize + 3);
        head.extend_from_slice(MAGIC);
        for field in fields {
            head.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        head.resize(head.len().next_multiple_of(4), 0);
        self.out.write_all(&head)?;
        self.written += head.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let pad = (4 - self.written % 4) % 4;
        self.out.write_all(&[0u8; 3][..pad as usize])?;
        self.written += pad;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    /// One parsed entry: (name, mode, nlink, rdev major, rdev minor, data).
    type Entry = (String, u32, u32, u32, u32, Vec<u8>);

    /// An independent reader of newc, for the tests only.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut out = Vec::new();
        loop {
            let at = total - bytes.len();
            assert_eq!(at % 4, 0, "entry at {at} not aligned");
            assert_eq!(&bytes[..6], MAGIC, "magic at {at}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex")
            };
            let (mode, nlink, size, rmaj, rmin, namesize) =
                (field(1), field(4), field(6), field(9), field(10), field(11));
            assert_eq!((field(2), field(3), field(12)), (0, 0, 0));
            let name_end = HEADER_LEN + namesize as usize;
            assert_eq!(bytes[name_end - 1], 0, "name NUL");
            let name = String::from_utf8(bytes[HEADER_LEN..name_end - 1].to_vec()).expect("utf8");
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + size as usize;
            let data = bytes[data_start..data_end].to_vec();
            bytes = &bytes[data_end.next_multiple_of(4)..];
            if name == TRAILER {
                assert_eq!(total % 512, 0);
                assert!(bytes.iter().all(|&b| b == 0));
                return out;
            }
            out.push((name, mode, nlink, rmaj, rmin, data));
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new(), 0);
        w.dir("dev", 0o755).expect("dev");
        w.char_device("dev/console", 0o600, 5, 1).expect("console");
        w.dir("etc", 0o755).expect("etc");
        w.dir("etc/sealgate", 0o755).expect("etc/sealgate");
        w.file("etc/sealgate/board", 0o644, b"qemu-x86_64\n")
            .expect("board");
        w.file("init", 0o755, &[0x7f, b'E', b'L', b'F', 1, 2, 3])
            .expect("init");
        w.file("empty", 0o600, b"").expect("empty");
        w.finish().expect("finish").0
    }

    #[test]
    fn entries_round_trip() {
        let entries = parse(&sample());
        let summary: Vec<_> = entries
            .iter()
            .map(|(name, mode, nlink, maj, min, data)| {
                (name.as_str(), *mode, *nlink, *maj, *min, data.len())
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("dev", 0o040_755, 2, 0, 0, 0),
                ("dev/console", 0o020_600, 1, 5, 1, 0),
                ("etc", 0o040_755, 2, 0, 0, 0),
                ("etc/sealgate", 0o040_755, 2, 0, 0, 0),
                ("etc/sealgate/board", 0o100_644, 1, 0, 0, 12),
                ("init", 0o100_755, 1, 0, 0, 7),
                ("empty", 0o100_600, 1, 0, 0, 0),
            ]
        );
        assert_eq!(entries[4].5, b"qemu-x86_64\n");
    }

    #[test]
    fn header_bytes_are_exact() {
        let mut w = CpioWriter::new(Vec::new(), 0x5f5e_1000);
        w.file("a", 0o644, b"xyz").expect("a");
        let bytes = w.finish().expect("finish").0;
        let expected = concat!(
            "070701", "00000001", "000081a4", "00000000", "00000000", "00000001", "5f5e1000",
            "00000003", "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
            "a\0", // name, NUL: 112 bytes, aligned
        );
        assert_eq!(&bytes[..112], expected.as_bytes());
        assert_eq!(&bytes[112..116], b"xyz\0");
        assert_eq!(&bytes[116..122], MAGIC);
    }

    #[test]
    fn refusals() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        w.dir("d", 0o755).expect("d");
        let long = "x".repeat(MAX_NAME + 1);
        type Case<'a> = (&'a str, u32, fn(&CpioError) -> bool);
        let cases: Vec<Case> = vec![
            ("", 0o644, |e| matches!(e, CpioError::BadName(_))),
            ("/abs", 0o644, |e| matches!(e, CpioError::BadName(_))),
            ("d/../x", 0o644, |e| matches!(e, CpioError::BadName(_))),
            ("d/./x", 0o644, |e| matches!(e, CpioError::BadName(_))),
            ("d//x", 0o644, |e| matches!(e, CpioError::BadName(_))),
            ("d/", 0o644, |e| matches!(e, CpioError::BadName(_))),
            ("nul\0", 0o644, |e| matches!(e, CpioError::BadName(_))),
            (TRAILER, 0o644, |e| matches!(e, CpioError::BadName(_))),
            (&long, 0o644, |e| matches!(e, CpioError::NameTooLong { .. })),
            ("d", 0o644, |e| matches!(e, CpioError::Duplicate(_))),
            ("e/x", 0o644, |e| {
                matches!(e, CpioError::MissingParent { .. })
            }),
            ("d/x", 0o100_644, |e| matches!(e, CpioError::BadMode { .. })),
        ];
        for (name, perm, is) in cases {
            let e = w.file(name, perm, b"").expect_err(name);
            assert!(is(&e), "{name:?}: {e}");
        }
        // A refused entry wrote nothing: the archive holds "d" only.
        let entries = parse(&w.finish().expect("finish").0);
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn reader_length_must_match() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        let e = w
            .file_from("short", 0o644, 10, &mut &b"12345"[..])
            .expect_err("short");
        assert!(matches!(e, CpioError::LengthMismatch { got: 5, .. }), "{e}");
        let mut w = CpioWriter::new(Vec::new(), 0);
        let e = w
            .file_from("long", 0o644, 3, &mut &b"12345"[..])
            .expect_err("long");
        assert!(matches!(e, CpioError::LengthMismatch { .. }), "{e}");
        let mut w = CpioWriter::new(Vec::new(), 0);
        let e = w
            .file_from("huge", 0o644, MAX_FILE + 1, &mut io::empty())
            .expect_err("huge");
        assert!(matches!(e, CpioError::FileTooLarge { .. }), "{e}");
    }

    #[test]
    fn streamed_file_larger_than_the_buffer() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = CpioWriter::new(Vec::new(), 0);
        w.file_from("big", 0o644, data.len() as u64, &mut &data[..])
            .expect("big");
        let written = w.written();
        let bytes = w.finish().expect("finish").0;
        assert!(bytes.len() as u64 >= written);
        assert_eq!(parse(&bytes)[0].5, data);
    }

    fn gnu_cpio() -> Option<PathBuf> {
        let ok = Command::new("cpio")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| PathBuf::from("cpio"))
    }

    fn run_cpio(args: &[&str], input: &[u8], dir: Option<&std::path::Path>) -> String {
        let cpio = gnu_cpio().expect("cpio");
        let mut cmd = Command::new(cpio);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().expect("spawn cpio");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("feed cpio");
        let out = child.wait_with_output().expect("cpio");
        assert!(
            out.status.success(),
            "cpio {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// GNU cpio lists what we wrote with the types, modes and device numbers we meant.
    #[test]
    fn gnu_cpio_lists_the_archive() {
        if gnu_cpio().is_none() {
            eprintln!("skipped: no cpio on this machine");
            return;
        }
        let listing = run_cpio(&["-t", "-v", "--quiet", "-H", "newc"], &sample(), None);
        let lines: Vec<Vec<&str>> = listing
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let find = |name: &str| {
            lines
                .iter()
                .find(|l| l.last() == Some(&name))
                .unwrap_or_else(|| panic!("{name} not in {listing}"))
        };
        assert_eq!(find("dev")[0], "drwxr-xr-x");
        let console = find("dev/console");
        assert_eq!(console[0], "crw-------");
        assert_eq!((console[4], console[5]), ("5,", "1"), "{console:?}");
        assert_eq!(find("init")[0], "-rwxr-xr-x");
        assert_eq!(find("etc/sealgate/board")[0], "-rw-r--r--");
        assert_eq!(lines.len(), 7);
    }

    /// GNU cpio extracts files and directories with their contents and modes (no device
    /// node: making one needs root).
    #[test]
    fn gnu_cpio_extracts_the_archive() {
        use std::os::unix::fs::PermissionsExt;
        if gnu_cpio().is_none() {
            eprintln!("skipped: no cpio on this machine");
            return;
        }
        let dir = std::env::temp_dir().join(format!("sealgate-cpio-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut w = CpioWriter::new(Vec::new(), 1_700_000_000);
        w.dir("etc", 0o755).expect("etc");
        w.dir("etc/keys", 0o700).expect("keys");
        w.file("etc/keys/a.pub", 0o644, b"key a\n").expect("a");
        w.file("init", 0o755, b"#!init\n").expect("init");
        let archive = w.finish().expect("finish").0;
        run_cpio(
            &["-i", "--quiet", "-H", "newc", "--no-absolute-filenames"],
            &archive,
            Some(&dir),
        );
        let mode = |p: &str| {
            std::fs::metadata(dir.join(p))
                .expect(p)
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(
            std::fs::read(dir.join("etc/keys/a.pub")).expect("a"),
            b"key a\n"
        );
        assert_eq!(std::fs::read(dir.join("init")).expect("init"), b"#!init\n");
        assert_eq!(mode("init"), 0o755);
        assert_eq!(mode("etc/keys"), 0o700);
        assert_eq!(mode("etc/keys/a.pub"), 0o644);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
