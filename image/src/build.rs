//! Building the appliance image (`sealctl image build`): the kernel, the initramfs (the stage-1
//! loader as `/init`, kernel modules, keys and board files), the GPT disk with boot control, a
//! signed bundle in `slot_a` and empty ext4 `sealed` and `data` file systems, and an update
//! bundle of the same build.
//!
//! Outside tools: `strip` (binutils) and `mkfs.ext4` (e2fsprogs). Each output file is written
//! under a temporary name and renamed into place when complete.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::bootctl::{BootControl, BootCtlError};
use crate::bundle::{self, BundleError};
use crate::cpio::{CpioError, CpioWriter};
use crate::gpt::{self, GptError, Partition};
use crate::keys::{self, KeyFileError};
use crate::run::{DISK, INITRAMFS, KERNEL};
use crate::version::Version;

const MIB: u64 = 1 << 20;

/// The disk's GPT partitions, in order: (label, bytes).
pub const DISK_LAYOUT: [(&str, u64); 5] = [
    ("bootctl", MIB),
    ("slot_a", 48 * MIB),
    ("slot_b", 48 * MIB),
    ("sealed", 16 * MIB),
    ("data", 256 * MIB),
];
/// The partitions formatted ext4, with their file system label equal to the partition's.
pub const EXT4_PARTITIONS: [&str; 2] = ["sealed", "data"];
/// The update bundle written beside the disk.
pub const UPDATE: &str = "update.sgu";

/// Kernel modules the appliance needs (their dependencies come from `modules.dep`).
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "failover",
    "net_failover",
    "crc32c_generic",
    "crc16",
    "mbcache",
    "jbd2",
    "ext4",
    "watchdog",
    "i6300esb",
    "qemu_fw_cfg",
];
/// The module load order in the initramfs, one file name per line.
pub const LOAD_LIST: &str = "lib/modules/load.list";
/// Largest `modules.dep` / `modules.builtin` read.
pub const MAX_MODULES_DEP: u64 = 16 << 20;
/// Largest kernel, module, key or certificate file read whole (executables are streamed).
pub const MAX_KERNEL: u64 = 64 << 20;
pub const MAX_SMALL_FILE: u64 = 64 << 10;

/// Where the kernels of the build machine are looked for when none is given.
pub const BOOT_DIR: &str = "/boot";
pub const MODULES_ROOT: &str = "/lib/modules";

/// Why a build failed; each names the file or tool and the check.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "no kernel in {BOOT_DIR} (vmlinuz-*): install one with `apt-get install linux-image-amd64` \
         or give --kernel and --modules"
    )]
    NoKernel,
    #[error(
        "no modules for kernel {release} ({dir}/modules.dep missing): give --modules DIR \
         (normally /lib/modules/<release>)"
    )]
    NoModules { release: String, dir: PathBuf },
    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("modules.dep line {line}: {reason}")]
    ModulesDep { line: usize, reason: &'static str },
    #[error("kernel module {0} is neither in modules.dep nor built in")]
    ModuleMissing(String),
    #[error("kernel modules depend on each other in a cycle through {0}")]
    ModuleCycle(String),
    #[error(
        "kernel module {0} is compressed in a format this build does not read \
         (plain .ko and .ko.gz are read)"
    )]
    CompressedModule(String),
    #[error("two kernel modules have the file name {0}")]
    DuplicateModule(String),
    #[error(
        "{path} is dynamically linked (it has an ELF interpreter): build it static with \
         RUSTFLAGS=\"-C target-feature=+crt-static\" --target x86_64-unknown-linux-gnu"
    )]
    NotStatic { path: PathBuf },
    #[error("{tool} not found (install {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{tool} failed on {path}: {output}")]
    ToolFailed {
        tool: &'static str,
        path: PathBuf,
        output: String,
    },
    #[error(
        "{path} is {len} bytes; with its bundle prefix it does not fit the {slot} bytes of a slot"
    )]
    PayloadTooLarge { path: PathBuf, len: u64, slot: u64 },
    #[error("partition {0} missing from the written partition table")]
    NoPartition(&'static str),
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("initramfs: {0}")]
    Cpio(#[from] CpioError),
    #[error("disk partition table: {0}")]
    Gpt(#[from] GptError),
    #[error("bundle: {0}")]
    Bundle(#[from] BundleError),
    #[error("boot control: {0}")]
    BootCtl(#[from] BootCtlError),
}

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildSpec {
    /// The kernel image (bzImage).
    pub kernel: PathBuf,
    /// The kernel's module tree (`/lib/modules/<release>`, with `modules.dep`).
    pub modules_dir: PathBuf,
    /// HQ config trust anchors (public keys), baked into `/etc/sealgate/trust`.
    pub trust: Vec<PathBuf>,
    /// The image-signing private key: signs both bundles; its public key goes to
    /// `/etc/sealgate/image-keys`.
    pub image_key: PathBuf,
    /// Admin client certificates (PEM) baked into `/etc/sealgate/admin`.
    pub admin_certs: Vec<PathBuf>,
    /// The static `sealgate` executable (stripped into the bundles).
    pub sealgate: PathBuf,
    /// The static stage-1 loader (stripped into the initramfs as `/init`).
    pub loader: PathBuf,
    /// The version of the image (slot A and boot control).
    pub version: Version,
    /// The version of `update.sgu`.
    pub update_version: Version,
    /// The board the bundles are for.
    pub board: String,
    /// Creation time of bundles and initramfs entries (seconds since 1970).
    pub created: u64,
    /// The output directory (created if missing).
    pub out: PathBuf,
}

/// What a build wrote.
#[derive(Clone, Debug, Default)]
pub struct BuildReport {
    pub kernel_release: Option<String>,
    pub kernel_bytes: u64,
    /// Module file names in load order.
    pub modules: Vec<String>,
    pub modules_bytes: u64,
    pub sealgate_bytes: u64,
    pub loader_bytes: u64,
    /// The initramfs before and after gzip (without the kernel).
    pub initramfs_cpio_bytes: u64,
    pub initramfs_bytes: u64,
    /// The disk's apparent size and the bytes allocated to it (it is sparse).
    pub disk_bytes: u64,
    pub disk_allocated: u64,
    pub partitions: Vec<Partition>,
    pub slot_bundle_bytes: u64,
    pub update_bytes: u64,
    /// Hex id of the image-signing key.
    pub image_key_id: String,
}

/// Human-readable size: "12.3 MiB", "512 B".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Builds the image into `spec.out`, reporting one line per step to `progress`.
pub fn build(spec: &BuildSpec, progress: &mut dyn FnMut(&str)) -> Result<BuildReport, BuildError> {
    let mut report = BuildReport::default();
    let mut step = |what: &str, detail: String| progress(&format!("{what:<10} {detail}"));
    fs::create_dir_all(&spec.out).map_err(write_err(&spec.out))?;
    let work = spec.out.join(".build");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(write_err(&work))?;
    let result = build_in(spec, &work, &mut report, &mut step);
    let _ = fs::remove_dir_all(&work);
    result.map(|()| report)
}

fn build_in(
    spec: &BuildSpec,
    work: &Path,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<(), BuildError> {
    // Inputs first: a wrong key or a dynamic executable fails before anything is written.
    check_static_elf(&spec.sealgate)?;
    check_static_elf(&spec.loader)?;
    let keys = read_keys(spec, report, step)?;
    write_kernel(spec, report, step)?;
    let modules = read_modules(spec, report, step)?;
    let (sealgate, loader) = strip_executables(spec, work, report, step)?;
    write_image_initramfs(spec, &loader, &modules, &keys, report, step)?;

    // Disk.
    let disk_out = spec.out.join(DISK);
    write_disk(
        spec,
        work,
        &disk_out,
        &sealgate,
        &keys.image_key,
        report,
        step,
    )?;

    write_update(spec, &sealgate, &keys.image_key, report, step)
}

/// The keys and certificates a build reads: the image signing key and what goes into the
/// initramfs.
struct BuildKeys {
    image_key: ring::signature::Ed25519KeyPair,
    image_public: [u8; 32],
    trust: BTreeMap<[u8; 8], [u8; 32]>,
    admin: BTreeMap<String, Vec<u8>>,
}

/// Reads the image key, the trust anchors and the admin certificates; reports the "keys" step.
fn read_keys(
    spec: &BuildSpec,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<BuildKeys, BuildError> {
    let image_key = keys::read_private_key(&spec.image_key)?;
    let image_public = keys::public_key_of(&image_key);
    report.image_key_id = keys::key_id_hex(&keys::key_id(&image_public));
    let mut trust = BTreeMap::new();
    for path in &spec.trust {
        let public = keys::read_public_key(path)?;
        trust.insert(keys::key_id(&public), public);
    }
    let mut admin = BTreeMap::new();
    for path in &spec.admin_certs {
        let (name, pem) = admin_certificate(path)?;
        if admin.insert(name.clone(), pem).is_some() {
            return Err(BuildError::Input {
                path: path.clone(),
                reason: format!("a second admin certificate named {name}"),
            });
        }
    }
    step(
        "keys",
        format!(
            "image key {}, {} trust anchor(s), {} admin certificate(s)",
            report.image_key_id,
            trust.len(),
            admin.len()
        ),
    );
    Ok(BuildKeys {
        image_key,
        image_public,
        trust,
        admin,
    })
}

/// Copies the kernel to the output; reports the "kernel" step and warns when the modules
/// directory looks like another release's.
fn write_kernel(
    spec: &BuildSpec,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<(), BuildError> {
    let kernel = read_limited(&spec.kernel, MAX_KERNEL)?;
    report.kernel_release = kernel_release(&kernel);
    report.kernel_bytes = kernel.len() as u64;
    let kernel_out = spec.out.join(KERNEL);
    write_atomic(&kernel_out, &kernel)?;
    step(
        "kernel",
        format!(
            "{} ({}) -> {}  {}",
            spec.kernel.display(),
            report
                .kernel_release
                .as_deref()
                .unwrap_or("release unknown"),
            kernel_out.display(),
            human(report.kernel_bytes)
        ),
    );
    if let (Some(release), Some(dir)) = (
        report.kernel_release.as_deref(),
        spec.modules_dir.file_name().and_then(|n| n.to_str()),
    ) && release != dir
    {
        step(
            "warning",
            format!(
                "the modules in {} may not be for kernel {release}",
                spec.modules_dir.display()
            ),
        );
    }
    Ok(())
}

/// Reads the modules the image needs (`MODULES` and what they depend on) in load order;
/// reports the "modules" step.
fn read_modules(
    spec: &BuildSpec,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<Vec<(String, Vec<u8>)>, BuildError> {
    let dep_path = spec.modules_dir.join("modules.dep");
    let dep = String::from_utf8_lossy(&read_limited(&dep_path, MAX_MODULES_DEP)?).into_owned();
    let builtin_path = spec.modules_dir.join("modules.builtin");
    let builtin = match read_limited(&builtin_path, MAX_MODULES_DEP) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(BuildError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            String::new()
        }
        Err(e) => return Err(e),
    };
    let closure = module_closure(&dep, &builtin, MODULES)?;
    let mut modules = Vec::with_capacity(closure.len());
    let mut seen = BTreeSet::new();
    for rel in &closure {
        let path = spec.modules_dir.join(rel);
        let (name, bytes) = read_module(&path)?;
        if !seen.insert(name.clone()) {
            return Err(BuildError::DuplicateModule(name));
        }
        report.modules_bytes += bytes.len() as u64;
        modules.push((name, bytes));
    }
    report.modules = modules.iter().map(|(name, _)| name.clone()).collect();
    step(
        "modules",
        format!(
            "{} from {}  {}: {}",
            modules.len(),
            spec.modules_dir.display(),
            human(report.modules_bytes),
            report.modules.join(" ")
        ),
    );
    Ok(modules)
}

/// Strips sealgate and the loader into `work` (sealgate must fit a slot with its bundle
/// prefix); returns their paths (sealgate, loader).
fn strip_executables(
    spec: &BuildSpec,
    work: &Path,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<(PathBuf, PathBuf), BuildError> {
    let sealgate = work.join("sealgate");
    report.sealgate_bytes = strip_static(&spec.sealgate, &sealgate)?;
    step(
        "sealgate",
        format!(
            "{} stripped  {}",
            spec.sealgate.display(),
            human(report.sealgate_bytes)
        ),
    );
    let slot = DISK_LAYOUT[1].1;
    if report.sealgate_bytes + bundle::PREFIX_LEN as u64 > slot {
        return Err(BuildError::PayloadTooLarge {
            path: spec.sealgate.clone(),
            len: report.sealgate_bytes,
            slot,
        });
    }
    let loader = work.join("sealgate-loader");
    report.loader_bytes = strip_static(&spec.loader, &loader)?;
    step(
        "loader",
        format!(
            "{} stripped  {}",
            spec.loader.display(),
            human(report.loader_bytes)
        ),
    );
    Ok((sealgate, loader))
}

/// Writes the initramfs (loader, modules, board, keys, admin certificates) to the output;
/// reports the "initramfs" step.
fn write_image_initramfs(
    spec: &BuildSpec,
    loader: &Path,
    modules: &[(String, Vec<u8>)],
    keys: &BuildKeys,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<(), BuildError> {
    let contents = Initramfs {
        loader,
        modules,
        board: &spec.board,
        version: spec.version,
        image_keys: &BTreeMap::from([(keys::key_id(&keys.image_public), keys.image_public)]),
        trust: &keys.trust,
        admin: &keys.admin,
        mtime: u32::try_from(spec.created).unwrap_or(u32::MAX),
    };
    let initramfs_out = spec.out.join(INITRAMFS);
    let (cpio_bytes, gz_bytes) = write_initramfs_file(&initramfs_out, &contents)?;
    report.initramfs_cpio_bytes = cpio_bytes;
    report.initramfs_bytes = gz_bytes;
    step(
        "initramfs",
        format!(
            "{}  {} (cpio {}, without the kernel)",
            initramfs_out.display(),
            human(gz_bytes),
            human(cpio_bytes)
        ),
    );
    Ok(())
}

/// Signs the update bundle (sealgate as `spec.update_version`) into the output; reports the
/// "update" step.
fn write_update(
    spec: &BuildSpec,
    sealgate: &Path,
    image_key: &ring::signature::Ed25519KeyPair,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<(), BuildError> {
    let update_out = spec.out.join(UPDATE);
    let tmp = temp_name(&update_out);
    let mut payload = File::open(sealgate).map_err(read_err(sealgate))?;
    let mut out = BufWriter::new(File::create(&tmp).map_err(write_err(&tmp))?);
    bundle::sign(
        &mut payload,
        spec.update_version,
        &spec.board,
        image_key,
        spec.created,
        &mut out,
    )?;
    let file = out.into_inner().map_err(|e| BuildError::Write {
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(write_err(&tmp))?;
    fs::rename(&tmp, &update_out).map_err(write_err(&update_out))?;
    report.update_bytes = file_len(&update_out)?;
    step(
        "update",
        format!(
            "{}  version {} for {}  {}",
            update_out.display(),
            spec.update_version,
            spec.board,
            human(report.update_bytes)
        ),
    );
    Ok(())
}

/// The disk: GPT, boot control, slot A's bundle, empty ext4 file systems; sparse.
fn write_disk(
    spec: &BuildSpec,
    work: &Path,
    disk_out: &Path,
    sealgate: &Path,
    image_key: &ring::signature::Ed25519KeyPair,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<(), BuildError> {
    let tmp = temp_name(disk_out);
    let werr = write_err(&tmp);
    // 1 MiB before the first partition (MBR, GPT, alignment), 1 MiB after the last (backup GPT).
    let disk_len = DISK_LAYOUT.iter().map(|(_, len)| len).sum::<u64>() + 2 * MIB;
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(&werr)?;
    disk.set_len(disk_len).map_err(&werr)?;
    let partitions = gpt::write(&mut disk, disk_len, &DISK_LAYOUT)?;
    let part = |label: &'static str| {
        partitions
            .iter()
            .find(|p| p.name == label)
            .cloned()
            .ok_or(BuildError::NoPartition(label))
    };

    let mut control = BootControl::new_image(spec.version);
    control.store(&mut PartitionIo::new(&mut disk, &part("bootctl")?))?;
    let mut payload = File::open(sealgate).map_err(read_err(sealgate))?;
    write_slot_a(
        spec,
        &mut disk,
        &part("slot_a")?,
        &mut payload,
        image_key,
        report,
        step,
    )?;
    for label in EXT4_PARTITIONS {
        let p = part(label)?;
        let fs_image = work.join(format!("{label}.ext4"));
        mkfs_ext4(&fs_image, label, p.len())?;
        let mut src = File::open(&fs_image).map_err(read_err(&fs_image))?;
        copy_sparse(&mut src, &mut PartitionIo::new(&mut disk, &p)).map_err(&werr)?;
        let _ = fs::remove_file(&fs_image);
    }
    disk.sync_all().map_err(&werr)?;
    drop(disk);
    fs::rename(&tmp, disk_out).map_err(write_err(disk_out))?;
    finish_disk(disk_out, partitions, report, step)
}

/// Signs sealgate (as `spec.version`) into slot A of the disk; reports the "slot_a" step.
fn write_slot_a(
    spec: &BuildSpec,
    disk: &mut File,
    slot_a: &Partition,
    payload: &mut File,
    image_key: &ring::signature::Ed25519KeyPair,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<(), BuildError> {
    let mut slot_io = PartitionIo::new(disk, slot_a);
    bundle::sign(
        payload,
        spec.version,
        &spec.board,
        image_key,
        spec.created,
        &mut slot_io,
    )?;
    report.slot_bundle_bytes = slot_io.high_water();
    step(
        "slot_a",
        format!(
            "bundle version {} for {} signed by {}  {}",
            spec.version,
            spec.board,
            report.image_key_id,
            human(report.slot_bundle_bytes)
        ),
    );
    Ok(())
}

/// Records the written disk's size, allocation and partitions; reports the "disk" step.
fn finish_disk(
    disk_out: &Path,
    partitions: Vec<Partition>,
    report: &mut BuildReport,
    step: &mut dyn FnMut(&str, String),
) -> Result<(), BuildError> {
    let meta = fs::metadata(disk_out).map_err(read_err(disk_out))?;
    report.disk_bytes = meta.len();
    report.disk_allocated = meta.blocks() * 512;
    report.partitions = partitions;
    let layout: Vec<String> = report
        .partitions
        .iter()
        .map(|p| format!("{} {}", p.name, human(p.len())))
        .collect();
    step(
        "disk",
        format!(
            "{}  {} (allocated {}): {}",
            disk_out.display(),
            human(report.disk_bytes),
            human(report.disk_allocated),
            layout.join(", ")
        ),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Kernel and modules.

/// The newest kernel of the build machine: `/boot/vmlinuz-<release>` with the highest release
/// (compared number by number), and `/lib/modules/<release>`.
pub fn default_kernel() -> Result<(PathBuf, PathBuf), BuildError> {
    default_kernel_in(Path::new(BOOT_DIR), Path::new(MODULES_ROOT))
}

fn default_kernel_in(boot: &Path, modules_root: &Path) -> Result<(PathBuf, PathBuf), BuildError> {
    let entries = match fs::read_dir(boot) {
        Ok(entries) => entries,
        Err(_) => return Err(BuildError::NoKernel),
    };
    let release = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
        .max_by(|a, b| release_cmp(a, b))
        .ok_or(BuildError::NoKernel)?;
    let modules = modules_root.join(&release);
    if !modules.join("modules.dep").is_file() {
        return Err(BuildError::NoModules {
            release,
            dir: modules,
        });
    }
    Ok((boot.join(format!("vmlinuz-{release}")), modules))
}

/// Compares kernel releases with runs of digits as numbers ("6.1.0-10" > "6.1.0-9").
pub fn release_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// The release string of an x86 bzImage (from the setup header's `kernel_version` pointer).
pub fn kernel_release(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]) as usize;
    if ptr == 0 {
        return None;
    }
    let text = image.get(ptr + 0x200..)?;
    let end = text.iter().take(256).position(|&b| b == 0 || b == b' ')?;
    let release = std::str::from_utf8(&text[..end]).ok()?;
    (!release.is_empty() && release.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| release.to_owned())
}

/// A module's name as the kernel sees it: the file name without `.ko[.*]`, `-` read as `_`.
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split_once(".ko").map_or(file, |(name, _)| name)
}

fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The modules to load for `wanted`, dependencies first, as paths relative to the module tree
/// (as `modules.dep` writes them). Modules built into the kernel (`modules.builtin`) are left
/// out; a wanted module that is in neither file is an error.
pub fn module_closure(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
) -> Result<Vec<String>, BuildError> {
    let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut by_name: BTreeMap<String, &str> = BTreeMap::new();
    for (i, line) in modules_dep.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (module, rest) = line.split_once(':').ok_or(BuildError::ModulesDep {
            line: i + 1,
            reason: "no ':'",
        })?;
        if module.is_empty() || module.starts_with('/') || module.split('/').any(|c| c == "..") {
            return Err(BuildError::ModulesDep {
                line: i + 1,
                reason: "module path empty, absolute or with '..'",
            });
        }
        deps.insert(module, rest.split_whitespace().collect());
        by_name.insert(normalise(module_name(module)), module);
    }
    let builtin: BTreeSet<String> = modules_builtin
        .lines()
        .map(|l| normalise(module_name(l.trim())))
        .collect();

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for want in wanted {
        let want = normalise(want);
        match by_name.get(&want) {
            Some(path) => visit(path, &deps, &mut done, &mut Vec::new(), &mut order)?,
            None if builtin.contains(&want) => {}
            None => return Err(BuildError::ModuleMissing(want)),
        }
    }
    Ok(order)
}

/// Depth-first: dependencies (in `modules.dep`'s load order, last listed first) before the module.
fn visit<'a>(
    module: &'a str,
    deps: &BTreeMap<&'a str, Vec<&'a str>>,
    done: &mut BTreeSet<&'a str>,
    stack: &mut Vec<&'a str>,
    order: &mut Vec<String>,
) -> Result<(), BuildError> {
    if done.contains(module) {
        return Ok(());
    }
    if stack.contains(&module) {
        return Err(BuildError::ModuleCycle(module_name(module).to_owned()));
    }
    let Some(needs) = deps.get(module) else {
        return Err(BuildError::ModuleMissing(module_name(module).to_owned()));
    };
    stack.push(module);
    for dep in needs.iter().rev() {
        visit(dep, deps, done, stack, order)?;
    }
    stack.pop();
    done.insert(module);
    order.push(module.to_owned());
    Ok(())
}

/// A module file as `<name>.ko` and its uncompressed bytes (`.ko` as is, `.ko.gz` inflated).
fn read_module(path: &Path) -> Result<(String, Vec<u8>), BuildError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    let name = format!("{}.ko", module_name(&file_name));
    let raw = read_limited(path, MAX_KERNEL)?;
    let bytes = if file_name.ends_with(".ko") {
        raw
    } else if file_name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        GzDecoder::new(&raw[..])
            .take(MAX_KERNEL + 1)
            .read_to_end(&mut out)
            .map_err(read_err(path))?;
        if out.len() as u64 > MAX_KERNEL {
            return Err(input(path, "inflates to more than 64 MiB"));
        }
        out
    } else {
        return Err(BuildError::CompressedModule(path.display().to_string()));
    };
    if !bytes.starts_with(b"\x7fELF") {
        return Err(input(path, "not an ELF kernel module"));
    }
    Ok((name, bytes))
}

// ---------------------------------------------------------------------------------------------
// Executables.

/// Copies `src` stripped to `dst` (`strip --strip-all`) after checking it is a static x86-64
/// ELF executable; returns the stripped size.
pub fn strip_static(src: &Path, dst: &Path) -> Result<u64, BuildError> {
    check_static_elf(src)?;
    let strip = find_tool("strip", &[]).ok_or(BuildError::ToolMissing {
        tool: "strip",
        package: "binutils",
    })?;
    let out = Command::new(strip)
        .arg("--strip-all")
        .arg("-o")
        .arg(dst)
        .arg(src)
        .output()
        .map_err(read_err(src))?;
    if !out.status.success() {
        return Err(BuildError::ToolFailed {
            tool: "strip",
            path: src.to_path_buf(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    file_len(dst)
}

/// Checks that `path` is an x86-64 ELF executable without an interpreter (statically linked).
pub fn check_static_elf(path: &Path) -> Result<(), BuildError> {
    const PT_INTERP: u32 = 3;
    let mut file = File::open(path).map_err(read_err(path))?;
    let mut head = [0u8; 64];
    file.read_exact(&mut head)
        .map_err(|_| input(path, "not an ELF executable (too short)"))?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err(input(path, "not a 64-bit little-endian ELF file"));
    }
    let u16_at = |at: usize| u16::from_le_bytes([head[at], head[at + 1]]);
    let e_type = u16_at(16);
    if u16_at(18) != 62 {
        return Err(input(path, "not an x86-64 executable"));
    }
    if e_type != 2 && e_type != 3 {
        return Err(input(
            path,
            "not an executable (ELF type is not EXEC or DYN)",
        ));
    }
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&head[32..40]);
    let (phoff, phentsize, phnum) = (u64::from_le_bytes(phoff), u16_at(54), u16_at(56));
    if phentsize != 56 || phnum == 0 || phnum > 256 {
        return Err(input(path, "ELF program headers malformed"));
    }
    let mut table = vec![0u8; 56 * phnum as usize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|_| input(path, "ELF program headers beyond the end of the file"))?;
    let interp = table
        .chunks_exact(56)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP);
    if interp {
        return Err(BuildError::NotStatic {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Initramfs.

/// What goes into the initramfs besides the fixed directories.
#[derive(Debug)]
pub struct Initramfs<'a> {
    /// The stage-1 loader, `/init`.
    pub loader: &'a Path,
    /// Modules (`<name>.ko`, bytes) in load order.
    pub modules: &'a [(String, Vec<u8>)],
    pub board: &'a str,
    pub version: Version,
    /// Public keys by key id.
    pub image_keys: &'a BTreeMap<[u8; 8], [u8; 32]>,
    pub trust: &'a BTreeMap<[u8; 8], [u8; 32]>,
    /// Admin certificates: file name → PEM.
    pub admin: &'a BTreeMap<String, Vec<u8>>,
    pub mtime: u32,
}

/// Writes the initramfs (gzip-compressed newc cpio) to `path`; returns (cpio bytes, gz bytes).
pub fn write_initramfs_file(
    path: &Path,
    contents: &Initramfs<'_>,
) -> Result<(u64, u64), BuildError> {
    let tmp = temp_name(path);
    let file = File::create(&tmp).map_err(write_err(&tmp))?;
    let gz = GzEncoder::new(BufWriter::new(file), Compression::best());
    let (gz, cpio_bytes) = write_initramfs(gz, contents)?;
    let file = gz
        .finish()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(write_err(&tmp))?;
    file.sync_all().map_err(write_err(&tmp))?;
    fs::rename(&tmp, path).map_err(write_err(path))?;
    Ok((cpio_bytes, file_len(path)?))
}

/// Writes the initramfs archive (uncompressed) to `out`; returns `out` and the archive's size.
pub fn write_initramfs<W: Write>(out: W, c: &Initramfs<'_>) -> Result<(W, u64), BuildError> {
    let mut w = CpioWriter::new(out, c.mtime);
    w.dir("dev", 0o755)?;
    w.char_device("dev/console", 0o600, 5, 1)?;
    for dir in ["proc", "sys"] {
        w.dir(dir, 0o555)?;
    }
    w.dir("run", 0o755)?;
    w.dir("data", 0o755)?;
    w.dir("sealed", 0o700)?;
    w.dir("lib", 0o755)?;
    w.dir("lib/modules", 0o755)?;
    let mut list = String::new();
    for (name, bytes) in c.modules {
        w.file(&format!("lib/modules/{name}"), 0o644, bytes)?;
        list.push_str(name);
        list.push('\n');
    }
    w.file(LOAD_LIST, 0o644, list.as_bytes())?;
    w.dir("etc", 0o755)?;
    w.dir("etc/sealgate", 0o755)?;
    w.file(
        "etc/sealgate/board",
        0o644,
        format!("{}\n", c.board).as_bytes(),
    )?;
    w.file(
        "etc/sealgate/version",
        0o644,
        format!("{}\n", c.version).as_bytes(),
    )?;
    for (dir, set) in [("image-keys", c.image_keys), ("trust", c.trust)] {
        w.dir(&format!("etc/sealgate/{dir}"), 0o755)?;
        for (id, public) in set {
            w.file(
                &format!("etc/sealgate/{dir}/{}.pub", keys::key_id_hex(id)),
                0o644,
                keys::public_key_pem(public).as_bytes(),
            )?;
        }
    }
    w.dir("etc/sealgate/admin", 0o755)?;
    for (name, pem) in c.admin {
        w.file(&format!("etc/sealgate/admin/{name}"), 0o644, pem)?;
    }
    let len = file_len(c.loader)?;
    let mut loader = File::open(c.loader).map_err(read_err(c.loader))?;
    w.file_from("init", 0o755, len, &mut loader)?;
    Ok(w.finish()?)
}

/// An admin certificate file: its initramfs name (`<stem>.pem`) and its bytes, checked to hold
/// exactly one PEM certificate.
fn admin_certificate(path: &Path) -> Result<(String, Vec<u8>), BuildError> {
    let pem = read_limited(path, MAX_SMALL_FILE)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs.as_slice() {
        [Ok(_)] => {}
        [] => return Err(input(path, "no PEM certificate in it")),
        [Err(e)] => return Err(input(path, &format!("not a PEM certificate: {e}"))),
        _ => {
            return Err(input(
                path,
                "more than one certificate in it (one per file)",
            ));
        }
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                && !s.starts_with('.')
        })
        .ok_or_else(|| input(path, "file name must be of A-Z a-z 0-9 . _ -"))?;
    Ok((format!("{stem}.pem"), pem))
}

// ---------------------------------------------------------------------------------------------
// ext4 and the partition writer.

/// Formats a new file of `len` bytes at `path` as ext4 labelled `label`, owned by root.
fn mkfs_ext4(path: &Path, label: &str, len: u64) -> Result<(), BuildError> {
    let mkfs = find_tool("mkfs.ext4", &["/usr/sbin", "/sbin"]).ok_or(BuildError::ToolMissing {
        tool: "mkfs.ext4",
        package: "e2fsprogs",
    })?;
    let file = File::create(path).map_err(write_err(path))?;
    file.set_len(len).map_err(write_err(path))?;
    drop(file);
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-L", label, "-b", "4096", "-I", "256"])
        .args(["-E", "root_owner=0:0,nodiscard"])
        .arg(path)
        .output()
        .map_err(write_err(path))?;
    if !out.status.success() {
        return Err(BuildError::ToolFailed {
            tool: "mkfs.ext4",
            path: path.to_path_buf(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Copies `src` to `dst` from the start, seeking over all-zero blocks (the destination is a
/// fresh sparse file, so they read back as zeros).
fn copy_sparse<R: Read, W: Write + Seek>(src: &mut R, dst: &mut W) -> io::Result<u64> {
    const BLOCK: usize = 64 << 10;
    let mut buf = vec![0u8; BLOCK];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            match src.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(filled as i64))?;
        } else {
            dst.write_all(&buf[..filled])?;
        }
        total += filled as u64;
        if filled < BLOCK {
            break;
        }
    }
    Ok(total)
}

/// Reads, writes and seeks inside one partition of a disk file; a write past the partition's
/// end fails.
#[derive(Debug)]
pub struct PartitionIo<'a> {
    disk: &'a mut File,
    start: u64,
    len: u64,
    pos: u64,
    high_water: u64,
}

impl<'a> PartitionIo<'a> {
    pub fn new(disk: &'a mut File, part: &Partition) -> Self {
        PartitionIo {
            disk,
            start: part.offset(),
            len: part.len(),
            pos: 0,
            high_water: 0,
        }
    }

    /// The highest offset written so far.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }
}

impl Write for PartitionIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.len.saturating_sub(self.pos);
        if room == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write beyond the end of the partition",
            ));
        }
        let n = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        self.disk.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.disk.write(&buf[..n])?;
        self.pos += n as u64;
        self.high_water = self.high_water.max(self.pos);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.disk.flush()
    }
}

impl Read for PartitionIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.len.saturating_sub(self.pos);
        let n = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.disk.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.disk.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PartitionIo<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        match target {
            Some(n) if n <= self.len => {
                self.pos = n;
                Ok(n)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the partition",
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files.

fn read_err(path: &Path) -> impl Fn(io::Error) -> BuildError + '_ {
    move |source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn write_err(path: &Path) -> impl Fn(io::Error) -> BuildError + '_ {
    move |source| BuildError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn input(path: &Path, reason: &str) -> BuildError {
    BuildError::Input {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    }
}

fn file_len(path: &Path) -> Result<u64, BuildError> {
    Ok(fs::metadata(path).map_err(read_err(path))?.len())
}

/// Reads a whole file of at most `max` bytes.
fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, BuildError> {
    let mut out = Vec::new();
    File::open(path)
        .map_err(read_err(path))?
        .take(max + 1)
        .read_to_end(&mut out)
        .map_err(read_err(path))?;
    if out.len() as u64 > max {
        return Err(input(path, &format!("larger than {}", human(max))));
    }
    Ok(out)
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let tmp = temp_name(path);
    let mut file = File::create(&tmp).map_err(write_err(&tmp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(write_err(&tmp))?;
    fs::rename(&tmp, path).map_err(write_err(path))
}

/// `tool` on `$PATH`, else in one of `extra` directories.
fn find_tool(tool: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE_DEP: &str = "\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/watchdog/i6300esb.ko.xz: kernel/drivers/watchdog/watchdog.ko
kernel/drivers/watchdog/watchdog.ko:
kernel/crypto/crc32c-generic.ko:
";

    fn names(order: &[String]) -> Vec<&str> {
        order.iter().map(|p| module_name(p)).collect()
    }

    /// Every module comes after all of its dependencies.
    fn assert_topological(order: &[String]) {
        for line in FAKE_DEP.lines() {
            let (module, deps) = line.split_once(':').expect("line");
            let Some(at) = order.iter().position(|m| m == module) else {
                continue;
            };
            for dep in deps.split_whitespace() {
                let dep_at = order.iter().position(|m| m == dep).expect(dep);
                assert!(dep_at < at, "{dep} after {module}");
            }
        }
    }

    #[test]
    fn closure_puts_dependencies_first() {
        let order = module_closure(FAKE_DEP, "", &["ext4", "virtio_net"]).expect("closure");
        assert_eq!(
            names(&order),
            [
                "jbd2",
                "mbcache",
                "crc16",
                "ext4",
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        assert_topological(&order);
        // Asking for a dependency again, or first, changes nothing about validity; no repeats.
        let order = module_closure(FAKE_DEP, "", &["failover", "virtio_net", "net_failover"])
            .expect("closure");
        assert_eq!(
            names(&order),
            [
                "failover",
                "virtio_ring",
                "virtio",
                "net_failover",
                "virtio_net"
            ]
        );
        assert_topological(&order);
    }

    #[test]
    fn closure_names_builtins_and_missing() {
        // A dash in the file name is an underscore in the module name.
        let order = module_closure(FAKE_DEP, "", &["crc32c_generic"]).expect("crc32c");
        assert_eq!(order, ["kernel/crypto/crc32c-generic.ko"]);
        // Built in: nothing to load.
        let builtin = "kernel/drivers/firmware/qemu_fw_cfg.ko\n";
        let order = module_closure(FAKE_DEP, builtin, &["qemu_fw_cfg"]).expect("builtin");
        assert!(order.is_empty());
        assert!(matches!(
            module_closure(FAKE_DEP, "", &["qemu_fw_cfg"]),
            Err(BuildError::ModuleMissing(name)) if name == "qemu_fw_cfg"
        ));
        // Compressed modules are found (and refused later when read, unless .gz).
        let order = module_closure(FAKE_DEP, "", &["i6300esb"]).expect("i6300esb");
        assert_eq!(names(&order), ["watchdog", "i6300esb"]);
        // A dependency not listed itself.
        assert!(matches!(
            module_closure("a.ko: b.ko\n", "", &["a"]),
            Err(BuildError::ModuleMissing(name)) if name == "b"
        ));
        assert!(matches!(
            module_closure("a.ko: b.ko\nb.ko: a.ko\n", "", &["a"]),
            Err(BuildError::ModuleCycle(_))
        ));
        assert!(matches!(
            module_closure("a.ko b.ko\n", "", &["a"]),
            Err(BuildError::ModulesDep { line: 1, .. })
        ));
        assert!(matches!(
            module_closure("../a.ko:\n", "", &["a"]),
            Err(BuildError::ModulesDep { line: 1, .. })
        ));
    }

    /// The real module tree of the build machine, when there is one.
    #[test]
    fn closure_of_this_machines_kernel() {
        let Ok((_, dir)) = default_kernel() else {
            eprintln!("skipped: no kernel installed");
            return;
        };
        let dep = fs::read_to_string(dir.join("modules.dep")).expect("modules.dep");
        let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let order = module_closure(&dep, &builtin, MODULES).expect("closure");
        let names = names(&order);
        for m in ["virtio_blk", "virtio_net", "ext4", "i6300esb"] {
            assert!(
                names.contains(&m) || builtin.contains(m),
                "{m} in {names:?}"
            );
        }
    }

    #[test]
    fn release_order() {
        let mut releases = vec![
            "6.1.0-9-amd64",
            "6.1.0-56-amd64",
            "5.10.0-30-amd64",
            "6.10.1-1-amd64",
            "6.1.0-56-cloud-amd64",
        ];
        releases.sort_by(|a, b| release_cmp(a, b));
        assert_eq!(
            releases,
            [
                "5.10.0-30-amd64",
                "6.1.0-9-amd64",
                "6.1.0-56-amd64",
                "6.1.0-56-cloud-amd64",
                "6.10.1-1-amd64"
            ]
        );
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sealgate-build-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn newest_kernel_is_chosen() {
        let dir = temp_dir("kernels");
        let (boot, mods) = (dir.join("boot"), dir.join("modules"));
        assert!(matches!(
            default_kernel_in(&boot, &mods),
            Err(BuildError::NoKernel)
        ));
        fs::create_dir_all(&boot).expect("boot");
        assert!(matches!(
            default_kernel_in(&boot, &mods),
            Err(BuildError::NoKernel)
        ));
        for r in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
            fs::write(boot.join(format!("vmlinuz-{r}")), b"k").expect("kernel");
        }
        fs::write(boot.join("config-6.1.0-99-amd64"), b"c").expect("config");
        assert!(matches!(
            default_kernel_in(&boot, &mods),
            Err(BuildError::NoModules { release, .. }) if release == "6.1.0-10-amd64"
        ));
        fs::create_dir_all(mods.join("6.1.0-10-amd64")).expect("mods");
        fs::write(mods.join("6.1.0-10-amd64/modules.dep"), b"").expect("dep");
        let (kernel, modules) = default_kernel_in(&boot, &mods).expect("kernel");
        assert_eq!(kernel, boot.join("vmlinuz-6.1.0-10-amd64"));
        assert_eq!(modules, mods.join("6.1.0-10-amd64"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn release_from_bzimage_header() {
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x0300u16.to_le_bytes());
        let text = b"6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        image[0x500..0x500 + text.len()].copy_from_slice(text);
        assert_eq!(kernel_release(&image).as_deref(), Some("6.1.0-56-amd64"));
        image[0x202] = b'X';
        assert_eq!(kernel_release(&image), None);
        assert_eq!(kernel_release(b"short"), None);
        if let Ok((kernel, dir)) = default_kernel() {
            let bytes = fs::read(&kernel).expect("kernel");
            assert_eq!(
                kernel_release(&bytes).as_deref(),
                dir.file_name().and_then(|n| n.to_str())
            );
        }
    }

    #[test]
    fn static_elf_check() {
        let dir = temp_dir("elf");
        let elf = |interp: bool| {
            let mut b = vec![0u8; 64 + 2 * 56];
            b[..4].copy_from_slice(b"\x7fELF");
            b[4] = 2;
            b[5] = 1;
            b[16] = 3; // ET_DYN (static-pie)
            b[18] = 62; // x86-64
            b[32] = 64; // e_phoff
            b[54] = 56; // e_phentsize
            b[56] = 2; // e_phnum
            b[64] = 1; // PT_LOAD
            b[64 + 56] = if interp { 3 } else { 6 }; // PT_INTERP or PT_PHDR
            b
        };
        let path = dir.join("bin");
        fs::write(&path, elf(false)).expect("write");
        check_static_elf(&path).expect("static");
        fs::write(&path, elf(true)).expect("write");
        assert!(matches!(
            check_static_elf(&path),
            Err(BuildError::NotStatic { .. })
        ));
        fs::write(&path, b"#!/bin/sh\n").expect("write");
        assert!(matches!(
            check_static_elf(&path),
            Err(BuildError::Input { .. })
        ));
        let mut arm = elf(false);
        arm[18] = 183;
        fs::write(&path, arm).expect("write");
        assert!(matches!(
            check_static_elf(&path),
            Err(BuildError::Input { .. })
        ));
        // A dynamically linked executable of this machine.
        if Path::new("/bin/sh").exists() {
            assert!(check_static_elf(Path::new("/bin/sh")).is_err());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sparse_copy_skips_zeros() {
        let dir = temp_dir("sparse");
        let mut data = vec![0u8; 300 << 10];
        data[5] = 1;
        data[200 << 10] = 2;
        let len = data.len();
        let path = dir.join("disk");
        let mut disk = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("disk");
        disk.set_len(4 * MIB).expect("len");
        let part = Partition {
            name: "p".into(),
            first_lba: 2048,
            last_lba: 2048 + 1024 - 1,
        };
        let mut io = PartitionIo::new(&mut disk, &part);
        assert_eq!(
            copy_sparse(&mut &data[..], &mut io).expect("copy"),
            len as u64
        );
        io.seek(SeekFrom::Start(0)).expect("seek");
        let mut back = vec![0u8; len];
        io.read_exact(&mut back).expect("read");
        assert_eq!(back, data);
        // Bounded: nothing is written past the partition.
        io.seek(SeekFrom::End(-1)).expect("seek end");
        assert!(io.write_all(b"xy").is_err());
        assert!(io.seek(SeekFrom::End(1)).is_err());
        let meta = fs::metadata(&path).expect("meta");
        assert!(
            meta.blocks() * 512 < 256 << 10,
            "not sparse: {}",
            meta.blocks()
        );
        let _ = fs::remove_dir_all(&dir);
    }

    fn test_key() -> ring::signature::Ed25519KeyPair {
        let pkcs8 = keys::generate_key().expect("key");
        ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).expect("pkcs8")
    }

    fn test_spec(out: &Path) -> BuildSpec {
        BuildSpec {
            kernel: PathBuf::new(),
            modules_dir: PathBuf::new(),
            trust: Vec::new(),
            image_key: PathBuf::new(),
            admin_certs: Vec::new(),
            sealgate: PathBuf::new(),
            loader: PathBuf::new(),
            version: "1.2.3".parse().expect("version"),
            update_version: "1.2.4".parse().expect("version"),
            board: bundle::BOARD_QEMU.into(),
            created: 1_700_000_000,
            out: out.to_path_buf(),
        }
    }

    /// The initramfs holds the contract's paths with the contract's types and modes.
    #[test]
    fn initramfs_layout() {
        let dir = temp_dir("initramfs");
        let loader = dir.join("loader");
        fs::write(&loader, b"\x7fELF loader").expect("loader");
        let key = test_key();
        let public = keys::public_key_of(&key);
        let id = keys::key_id(&public);
        let modules = vec![
            ("virtio_ring.ko".to_owned(), b"\x7fELF ring".to_vec()),
            ("virtio.ko".to_owned(), b"\x7fELF virtio".to_vec()),
        ];
        let admin = BTreeMap::from([("admin.pem".to_owned(), b"PEM".to_vec())]);
        let contents = Initramfs {
            loader: &loader,
            modules: &modules,
            board: "qemu-x86_64",
            version: "1.2.3".parse().expect("version"),
            image_keys: &BTreeMap::from([(id, public)]),
            trust: &BTreeMap::from([(id, public)]),
            admin: &admin,
            mtime: 0,
        };
        let (archive, len) = write_initramfs(Vec::new(), &contents).expect("initramfs");
        assert_eq!(archive.len() as u64, len);
        // Read back with the newc layout: name → (mode, rdev, data).
        let mut entries = BTreeMap::new();
        let mut at = 0;
        loop {
            let field = |i: usize| {
                let s =
                    std::str::from_utf8(&archive[at + 6 + 8 * i..at + 14 + 8 * i]).expect("hex");
                usize::from_str_radix(s, 16).expect("hex")
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name = std::str::from_utf8(&archive[at + 110..at + 110 + namesize - 1])
                .expect("name")
                .to_owned();
            let data_at = (at + 110 + namesize).next_multiple_of(4);
            if name == crate::cpio::TRAILER {
                break;
            }
            let data = archive[data_at..data_at + size].to_vec();
            entries.insert(name, (mode, (rmaj, rmin), data));
            at = (data_at + size).next_multiple_of(4);
        }
        let hex = keys::key_id_hex(&id);
        let expect: &[(&str, usize)] = &[
            ("init", 0o100_755),
            ("dev", 0o040_755),
            ("dev/console", 0o020_600),
            ("proc", 0o040_555),
            ("sys", 0o040_555),
            ("run", 0o040_755),
            ("data", 0o040_755),
            ("sealed", 0o040_700),
            ("lib/modules/virtio.ko", 0o100_644),
            ("lib/modules/load.list", 0o100_644),
            ("etc/sealgate/board", 0o100_644),
            ("etc/sealgate/version", 0o100_644),
            (&format!("etc/sealgate/image-keys/{hex}.pub"), 0o100_644),
            (&format!("etc/sealgate/trust/{hex}.pub"), 0o100_644),
            ("etc/sealgate/admin/admin.pem", 0o100_644),
        ];
        for (name, mode) in expect {
            let entry = entries
                .get(*name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(entry.0, *mode, "{name}");
        }
        assert_eq!(entries["dev/console"].1, (5, 1));
        assert_eq!(entries["init"].2, b"\x7fELF loader");
        assert_eq!(
            entries["lib/modules/load.list"].2,
            b"virtio_ring.ko\nvirtio.ko\n"
        );
        assert_eq!(entries["etc/sealgate/board"].2, b"qemu-x86_64\n");
        assert_eq!(entries["etc/sealgate/version"].2, b"1.2.3\n");
        let pem = &entries[&format!("etc/sealgate/trust/{hex}.pub")].2;
        assert_eq!(
            keys::parse_public_key_pem(pem, Path::new("trust")).expect("pem"),
            public
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// The disk: GPT with the layout, boot control of a new image, slot A's bundle verifying
    /// under the image key, ext4 with labels; sparse.
    #[test]
    fn disk_layout() {
        if find_tool("mkfs.ext4", &["/usr/sbin", "/sbin"]).is_none() {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let dir = temp_dir("disk");
        let payload = dir.join("payload");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        fs::write(&payload, &bytes).expect("payload");
        let key = test_key();
        let spec = test_spec(&dir);
        let mut report = BuildReport::default();
        let disk = dir.join("disk.img");
        write_disk(
            &spec,
            &dir,
            &disk,
            &payload,
            &key,
            &mut report,
            &mut |_, _| {},
        )
        .expect("disk");
        let mut file = File::open(&disk).expect("disk");
        let parts = gpt::read(&mut file).expect("gpt");
        let layout: Vec<(&str, u64)> = parts.iter().map(|p| (p.name.as_str(), p.len())).collect();
        assert_eq!(layout, DISK_LAYOUT);
        assert_eq!(parts, report.partitions);
        let part = |name: &str| parts.iter().find(|p| p.name == name).expect(name).clone();
        let mut at = |p: &Partition| {
            let mut buf = vec![0u8; usize::try_from(p.len()).expect("len")];
            file.seek(SeekFrom::Start(p.offset())).expect("seek");
            file.read_exact(&mut buf).expect("read");
            buf
        };
        let control = BootControl::decode(&at(&part("bootctl"))).expect("bootctl");
        let mut expected = BootControl::new_image(spec.version);
        expected.generation = control.generation;
        assert_eq!(control, expected);
        let public = keys::public_key_of(&key);
        let trusted = BTreeMap::from([(keys::key_id(&public), public)]);
        let mut out = Vec::new();
        let header = bundle::verify_stream(
            &mut &at(&part("slot_a"))[..],
            &trusted,
            bundle::BOARD_QEMU,
            spec.version,
            bundle::MAX_PAYLOAD,
            &mut out,
        )
        .expect("slot_a bundle");
        assert_eq!(out, bytes);
        assert_eq!(header.version, spec.version);
        assert!(at(&part("slot_b")).iter().all(|&b| b == 0));
        for label in EXT4_PARTITIONS {
            let fs = at(&part(label));
            // ext4 superblock at 1024: magic 0xEF53 at 56, volume name at 120.
            assert_eq!(&fs[1024 + 56..1024 + 58], &[0x53, 0xef], "{label} magic");
            assert_eq!(&fs[1024 + 120..1024 + 120 + label.len()], label.as_bytes());
        }
        assert!(
            report.disk_allocated < report.disk_bytes / 8,
            "not sparse: {} of {}",
            report.disk_allocated,
            report.disk_bytes
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(48 * MIB), "48.0 MiB");
    }
}
