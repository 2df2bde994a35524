//! Kernel modules shipped in the initramfs: uncompressed `.ko` files in one flat directory,
//! loaded with `finit_module` in the order of `load.list` (dependencies first).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

/// Where the initramfs keeps the modules and `load.list`.
pub const MODULES_DIR: &str = "/lib/modules";
/// The load order, one file name per line.
pub const LOAD_LIST: &str = "load.list";

/// The module file names of a `load.list`: one per line, blank lines and `#` comments
/// skipped; a name with a path separator or not ending in `.ko` is reported as `Err`.
pub fn parse_load_list(text: &str) -> Vec<Result<&str, String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            if l.contains('/') || l.starts_with('.') || !l.ends_with(".ko") {
                Err(format!("bad module name {l:?} in {LOAD_LIST}"))
            } else {
                Ok(l)
            }
        })
        .collect()
}

/// What loading one module did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// The kernel took it now.
    Loaded,
    /// It was already loaded (or built in): `EEXIST`.
    AlreadyLoaded,
}

/// Loads the module file at `path` (no parameters).
pub fn load_module(path: &Path) -> io::Result<Loaded> {
    let f = File::open(path)?;
    match crate::sys::finit_module(f.as_fd()) {
        Ok(()) => Ok(Loaded::Loaded),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Loaded::AlreadyLoaded),
        Err(e) => Err(e),
    }
}

/// Loads every module of `<dir>/load.list` in order, logging one line per module; a module
/// that fails is logged and skipped (what needs it fails later with its own message). Returns
/// (loaded or already loaded, failed).
pub fn load_all(dir: &Path, log: &mut dyn FnMut(String)) -> (usize, usize) {
    let list = dir.join(LOAD_LIST);
    let text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) => {
            log(format!("no module list {}: {e}", list.display()));
            return (0, 0);
        }
    };
    let (mut ok, mut failed) = (0, 0);
    for entry in parse_load_list(&text) {
        let name = match entry {
            Ok(n) => n,
            Err(e) => {
                log(e);
                failed += 1;
                continue;
            }
        };
        match load_module(&dir.join(name)) {
            Ok(Loaded::Loaded) => {
                log(format!("module {name} loaded"));
                ok += 1;
            }
            Ok(Loaded::AlreadyLoaded) => {
                log(format!("module {name} already loaded"));
                ok += 1;
            }
            Err(e) => {
                log(format!("module {name} FAILED: {e}"));
                failed += 1;
            }
        }
    }
    (ok, failed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn load_list_order_comments_and_bad_names() {
        let l = parse_load_list(
            "# deps first\nvirtio.ko\n\n  virtio_ring.ko \nvirtio_pci.ko\n../x.ko\nsub/y.ko\nz.ko.xz\n",
        );
        assert_eq!(
            l[..3],
            [Ok("virtio.ko"), Ok("virtio_ring.ko"), Ok("virtio_pci.ko")]
        );
        assert_eq!(l.len(), 6);
        assert!(l[3..].iter().all(Result::is_err));
    }

    #[test]
    fn a_missing_list_or_module_is_logged_not_fatal() {
        let d = std::env::temp_dir().join(format!("sg-modules-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let mut lines = Vec::new();
        assert_eq!(load_all(&d, &mut |l| lines.push(l)), (0, 0));
        assert!(lines[0].contains("no module list"), "{lines:?}");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(LOAD_LIST), "absent.ko\n").unwrap();
        lines.clear();
        assert_eq!(load_all(&d, &mut |l| lines.push(l)), (0, 1));
        assert!(lines[0].contains("absent.ko FAILED"), "{lines:?}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
