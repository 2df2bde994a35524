//! Fuzz target: the GPT reader (`sealgate_image::gpt::read`) on a 4 MiB disk whose first 34
//! sectors (MBR, primary header and entries) are the input's first bytes and whose last 33
//! sectors (backup entries and header) are the rest; everything between reads as zeros. Every
//! table it accepts must describe non-overlapping partitions inside the disk.
#![no_main]

use std::io::{self, Read, Seek, SeekFrom};

use libfuzzer_sys::fuzz_target;
use sealgate_image::gpt::{self, SECTOR};

const DISK: u64 = 4 << 20;
const HEAD: usize = 34 * SECTOR as usize;
const TAIL: usize = 33 * SECTOR as usize;

/// A sparse read-only disk: `head` at 0, `tail` ending at `DISK`, zeros elsewhere.
struct Sparse<'a> {
    head: &'a [u8],
    tail: &'a [u8],
    pos: u64,
}

impl Read for Sparse<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= DISK {
            return Ok(0);
        }
        let n = buf.len().min((DISK - self.pos) as usize);
        let tail_start = DISK - self.tail.len() as u64;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let p = self.pos + i as u64;
            *b = if (p as usize) < self.head.len() {
                self.head[p as usize]
            } else if p >= tail_start {
                self.tail[(p - tail_start) as usize]
            } else {
                0
            };
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Sparse<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => DISK
                .checked_add_signed(d)
                .ok_or(io::ErrorKind::InvalidInput)?,
            SeekFrom::Current(d) => self
                .pos
                .checked_add_signed(d)
                .ok_or(io::ErrorKind::InvalidInput)?,
        };
        Ok(self.pos)
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.len().min(HEAD);
    let (head, rest) = data.split_at(split);
    let tail = &rest[..rest.len().min(TAIL)];
    let mut dev = Sparse { head, tail, pos: 0 };
    let Ok(parts) = gpt::read(&mut dev) else {
        return;
    };
    let sectors = DISK / SECTOR;
    for (i, p) in parts.iter().enumerate() {
        assert!(p.first_lba <= p.last_lba && p.last_lba < sectors);
        assert!(p.offset() + p.len() <= DISK);
        assert!(p.name.encode_utf16().count() <= gpt::MAX_NAME);
        for q in &parts[..i] {
            assert!(
                q.last_lba < p.first_lba || p.last_lba < q.first_lba,
                "overlap"
            );
        }
    }
});
