//! `sealctl image {build,sign,run}`: the appliance image (F-IMAGE) built from Debian's kernel, the
//! static stage-1 loader and the static `sealgate`; signed update bundles; the image under QEMU.
//! The work is in `sealgate_image::{build, bundle, run}`; this module reads arguments and reports.
//!
//! Exit status: 0 success, 1 the build, signature or run failed, 2 usage.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use sealgate_image::build::{self, BuildSpec, human};
use sealgate_image::bundle;
use sealgate_image::keys;
use sealgate_image::run::{self, Accel, GuestFwd, HostFwd, RunSpec};
use sealgate_image::version::Version;

/// Exit status: usage (clap uses 2 too).
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the appliance image: kernel, initramfs, GPT disk and an update bundle
    ///
    /// Writes into --out: vmlinuz (the kernel), initramfs.cpio.gz (the stage-1 loader as
    /// /init, kernel modules, board files and keys), disk.img (sparse GPT disk: bootctl,
    /// slot_a holding a bundle of --sealgate signed with --image-key, slot_b empty, sealed and
    /// data formatted ext4) and update.sgu (a bundle of the same sealgate for `sealctl device
    /// push-update`). Existing files there are replaced (a used disk.img loses its state).
    ///
    /// Without --kernel, the newest /boot/vmlinuz-* of this machine and its /lib/modules are
    /// used (Debian: apt-get install linux-image-amd64). --sealgate and --loader default to
    /// `sealgate` and `sealgate-loader` beside this sealctl; both must be static executables
    /// (RUSTFLAGS="-C target-feature=+crt-static" cargo build --release
    /// --target x86_64-unknown-linux-gnu) and are stripped into the image. Needs `strip`
    /// (binutils) and `mkfs.ext4` (e2fsprogs).
    ///
    /// Exit status: 0 built, 1 failed (the message names the file and the check), 2 usage.
    #[command(verbatim_doc_comment)]
    Build(BuildArgs),
    /// Sign an executable into an update bundle
    ///
    /// The bundle holds a header (version, board, payload length and SHA-256), an Ed25519
    /// signature by --key, and the payload: the executable stripped (`strip --strip-all` of a
    /// copy; --no-strip signs it verbatim). The box installs it only if the key is one of its
    /// image keys, the board matches and the version is not below its rollback floor.
    ///
    /// Exit status: 0 signed, 1 failed, 2 usage.
    #[command(verbatim_doc_comment)]
    Sign(SignArgs),
    /// Run a built image under QEMU in the foreground, the serial console on this terminal
    ///
    /// The guest gets QEMU's user network in restricted mode: it reaches nothing but the
    /// forwards given here, and every host side is a loopback address. The board identity
    /// comes in through fw_cfg: the secret file (default DIR/board-secret, created 0600 with
    /// 32 random bytes on the first run) and the serial (default QEMU- and 8 hex digits of the
    /// secret's SHA-256). A watchdog (i6300esb) resets the guest if the appliance stops
    /// petting it. Quit with Ctrl-C.
    ///
    /// Exit status: QEMU's, 1 if it could not be started, 2 usage.
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Started by QEMU for each guest connection of a --guestfwd of `image run`: copies
    /// standard input and output to and from a TCP connection to ADDR (loopback only).
    /// Prints nothing (its standard error is the guest's connection).
    #[command(hide = true)]
    Relay {
        #[arg(value_name = "ADDR")]
        addr: String,
    },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Kernel image (default: the newest /boot/vmlinuz-*)
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The kernel's module tree (default: /lib/modules/<the kernel's release>)
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
    /// HQ config-signing public key the box trusts (repeatable)
    #[arg(long, value_name = "HQ.pub", required = true)]
    trust: Vec<PathBuf>,
    /// Image-signing private key: signs the bundles; the box trusts its public key for updates
    #[arg(long, value_name = "K.key")]
    image_key: PathBuf,
    /// Admin client certificate (PEM) baked into the image (repeatable)
    #[arg(long, value_name = "C.pem")]
    admin_cert: Vec<PathBuf>,
    /// The static sealgate executable (default: `sealgate` beside sealctl)
    #[arg(long, value_name = "BIN")]
    sealgate: Option<PathBuf>,
    /// The static stage-1 loader (default: `sealgate-loader` beside sealctl)
    #[arg(long, value_name = "BIN")]
    loader: Option<PathBuf>,
    /// Version of the image
    #[arg(long, value_name = "V", value_parser = version, default_value = env!("CARGO_PKG_VERSION"))]
    version: Version,
    /// Version of update.sgu (default: --version)
    #[arg(long, value_name = "V", value_parser = version)]
    update_version: Option<Version>,
    /// Board the image and bundles are for
    #[arg(long, value_name = "BOARD", default_value = bundle::BOARD_QEMU)]
    board: String,
    /// Output directory (created if missing)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The executable to sign (static, stripped)
    #[arg(value_name = "BINARY")]
    binary: PathBuf,
    /// Image-signing private key
    #[arg(long, value_name = "K.key")]
    key: PathBuf,
    /// Version of the bundle
    #[arg(long, value_name = "V", value_parser = version)]
    version: Version,
    /// Board the bundle is for
    #[arg(long, value_name = "BOARD", default_value = bundle::BOARD_QEMU)]
    board: String,
    /// Sign the executable as it is, without stripping it
    #[arg(long)]
    no_strip: bool,
    /// Sign any file verbatim, not only a static x86-64 executable (for tests of the box's
    /// checks)
    #[arg(long)]
    unchecked_payload: bool,
    /// The bundle to write
    #[arg(short, long, value_name = "OUT.sgu")]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The image directory made by `sealctl image build`
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Board secret file (32 to 4096 bytes; default: DIR/board-secret, created on first run)
    #[arg(long, value_name = "F")]
    secret_file: Option<PathBuf>,
    /// Board serial (default: QEMU- and 8 hex digits of SHA-256 of the secret)
    #[arg(long, value_name = "S")]
    serial: Option<String>,
    /// Forward this host address (PORT or 127.x.y.z:PORT) to the guest's SMTP port 25
    #[arg(long, value_name = "ADDR")]
    smtp: Option<String>,
    /// Forward this host address to the guest's SMTPS port 465
    #[arg(long, value_name = "ADDR")]
    smtps: Option<String>,
    /// Forward this host address to the guest's management API port 8443
    #[arg(long, value_name = "ADDR")]
    mgmt: Option<String>,
    /// Forward guest connections to GUEST:PORT (in 10.0.2.0/24) to a host loopback address,
    /// e.g. 10.0.2.100:25=127.0.0.1:2526 (repeatable)
    #[arg(long, value_name = "GUEST=HOST", value_parser = guest_fwd)]
    guestfwd: Vec<GuestFwd>,
    /// Accelerator: auto (kvm when /dev/kvm opens read-write and the CPU has vmx or svm,
    /// else tcg), kvm, or tcg
    #[arg(long, value_name = "auto|kvm|tcg", default_value = "auto", value_parser = accel)]
    accel: Accel,
    /// Extra kernel command-line arguments (e.g. sealgate.test_fault=hang)
    #[arg(long, value_name = "EXTRA")]
    append: Option<String>,
    /// Guest memory in MiB
    #[arg(long, value_name = "MiB", default_value_t = run::DEFAULT_MEMORY_MIB)]
    memory: u32,
    /// Print the QEMU command line instead of running it
    #[arg(long)]
    print_command: bool,
}

fn version(s: &str) -> Result<Version, String> {
    s.parse::<Version>().map_err(|e| e.to_string())
}

fn guest_fwd(s: &str) -> Result<GuestFwd, String> {
    s.parse().map_err(|e: run::RunError| e.to_string())
}

fn accel(s: &str) -> Result<Accel, String> {
    s.parse().map_err(|e: run::RunError| e.to_string())
}

pub fn run(cmd: ImageCommand) -> ExitCode {
    match cmd {
        ImageCommand::Build(args) => image_build(args),
        ImageCommand::Sign(args) => image_sign(args),
        ImageCommand::Run(args) => image_run(args),
        ImageCommand::Relay { addr } => match run::relay(&addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        },
    }
}

fn fail(command: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("sealctl image {command}: {msg}");
    ExitCode::FAILURE
}

/// Seconds since 1970 for bundle headers and initramfs times: `$SOURCE_DATE_EPOCH` if set
/// (reproducible builds), else now.
fn created() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
}

/// `name` in the directory of this sealctl executable.
fn beside_sealctl(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join(name))
}

/// The module tree of `kernel`: /lib/modules/<release>, the release read from the kernel's
/// header, else from a `vmlinuz-<release>` file name.
fn modules_of(kernel: &Path) -> Option<PathBuf> {
    let mut head = Vec::new();
    File::open(kernel)
        .ok()?
        .take(64 << 10)
        .read_to_end(&mut head)
        .ok()?;
    let release = build::kernel_release(&head).or_else(|| {
        kernel
            .file_name()?
            .to_str()?
            .strip_prefix("vmlinuz-")
            .map(str::to_owned)
    })?;
    Some(Path::new(build::MODULES_ROOT).join(release))
}

fn image_build(args: BuildArgs) -> ExitCode {
    let (kernel, modules_dir) = match (args.kernel, args.modules) {
        (Some(kernel), Some(modules)) => (kernel, modules),
        (Some(kernel), None) => match modules_of(&kernel) {
            Some(modules) => (kernel, modules),
            None => {
                return fail(
                    "build",
                    format!(
                        "cannot tell the release of kernel {}: give --modules DIR",
                        kernel.display()
                    ),
                );
            }
        },
        (None, modules) => match build::default_kernel().or_else(|e| match e {
            build::BuildError::NoKernel => {
                install_debian_kernel()?;
                build::default_kernel()
            }
            other => Err(other),
        }) {
            Ok((kernel, default_modules)) => (kernel, modules.unwrap_or(default_modules)),
            Err(e) => return fail("build", e),
        },
    };
    let executable = |given: Option<PathBuf>, name: &str| {
        given.or_else(|| beside_sealctl(name)).ok_or_else(|| {
            format!("cannot locate sealctl's own directory to find {name}: give its path")
        })
    };
    let (sealgate, loader) = match (
        executable(args.sealgate, "sealgate"),
        executable(args.loader, "sealgate-loader"),
    ) {
        (Ok(s), Ok(l)) => (s, l),
        (Err(e), _) | (_, Err(e)) => return fail("build", e),
    };
    let spec = BuildSpec {
        kernel,
        modules_dir,
        trust: args.trust,
        image_key: args.image_key,
        admin_certs: args.admin_cert,
        sealgate,
        loader,
        version: args.version,
        update_version: args.update_version.unwrap_or(args.version),
        board: args.board,
        created: created(),
        out: args.out,
    };
    println!(
        "building the {} image {} into {}",
        spec.board,
        spec.version,
        spec.out.display()
    );
    let report = match build::build(&spec, &mut |line| println!("  {line}")) {
        Ok(report) => report,
        Err(e) => return fail("build", e),
    };
    println!(
        "sizes: sealgate {} (stripped), loader {}, initramfs {} (without the kernel; kernel {}), \
         disk {} (allocated {})",
        human(report.sealgate_bytes),
        human(report.loader_bytes),
        human(report.initramfs_bytes),
        human(report.kernel_bytes),
        human(report.disk_bytes),
        human(report.disk_allocated),
    );
    println!("run it: sealctl image run {}", spec.out.display());
    ExitCode::SUCCESS
}

fn image_sign(args: SignArgs) -> ExitCode {
    if args.board.is_empty() || args.board.len() > 32 || !args.board.is_ascii() {
        eprintln!("sealctl image sign: --board must be 1 to 32 ASCII characters");
        return ExitCode::from(EXIT_USAGE);
    }
    if !args.unchecked_payload
        && let Err(e) = build::check_static_elf(&args.binary)
    {
        return fail("sign", format!("{e} (--unchecked-payload signs it anyway)"));
    }
    let key = match keys::read_private_key(&args.key) {
        Ok(key) => key,
        Err(e) => return fail("sign", e),
    };
    let key_id = keys::key_id_hex(&keys::key_id_of(&key));
    let beside_out = |suffix: &str| {
        let mut name = args.out.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        args.out.with_file_name(name)
    };
    let tmp = beside_out(".tmp");
    let stripped = beside_out(".payload.tmp");
    let (payload_path, mut payload) = match open_payload(&args, &stripped) {
        Ok(opened) => opened,
        Err(code) => return code,
    };
    match write_bundle(&args, &key, &mut payload, &tmp) {
        Ok(header) => {
            let size = fs::metadata(&args.out).map_or(0, |m| m.len());
            println!(
                "signed {}{} ({}) as version {} for {} with key {key_id}: {} ({})",
                args.binary.display(),
                if payload_path == args.binary {
                    ""
                } else {
                    " stripped"
                },
                human(header.payload_len),
                header.version,
                header.board,
                args.out.display(),
                human(size)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            fail("sign", e)
        }
    }
}

/// The payload to sign, opened: the binary itself, or (unless unchecked or `--no-strip`) a
/// stripped copy at `stripped`, removed again once open. Returns its path and the open file;
/// `Err` is the exit code of a reported failure.
fn open_payload(args: &SignArgs, stripped: &Path) -> Result<(PathBuf, File), ExitCode> {
    let payload_path = if args.unchecked_payload || args.no_strip {
        args.binary.clone()
    } else {
        if let Err(e) = build::strip_static(&args.binary, stripped) {
            let _ = fs::remove_file(stripped);
            return Err(fail("sign", e));
        }
        stripped.to_path_buf()
    };
    let opened = File::open(&payload_path);
    let _ = fs::remove_file(stripped); // the open file stays readable
    match opened {
        Ok(f) => Ok((payload_path, f)),
        Err(e) => Err(fail("sign", format!("{}: {e}", payload_path.display()))),
    }
}

/// Signs `payload` into `tmp`, synced, then renamed to `--out`; returns the bundle's header or
/// the error's text (`tmp` is left for the caller to remove).
fn write_bundle(
    args: &SignArgs,
    key: &ring::signature::Ed25519KeyPair,
    payload: &mut File,
    tmp: &Path,
) -> Result<bundle::Header, String> {
    File::create(tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))
        .and_then(|file| {
            let mut out = BufWriter::new(file);
            let header = bundle::sign(payload, args.version, &args.board, key, created(), &mut out)
                .map_err(|e| e.to_string())?;
            let file = out
                .into_inner()
                .map_err(|e| format!("{}: {}", tmp.display(), e.error()))?;
            file.sync_all()
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            fs::rename(tmp, &args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
            Ok(header)
        })
}

fn image_run(args: RunArgs) -> ExitCode {
    let usage = |e: run::RunError| {
        eprintln!("sealctl image run: {e}");
        ExitCode::from(EXIT_USAGE)
    };
    let hostfwd = match host_forwards(&args) {
        Ok(hostfwd) => hostfwd,
        Err(e) => return usage(e),
    };
    if let Err(e) = run::check_image_dir(&args.dir) {
        return fail("run", e);
    }
    let kvm = match args.accel.resolve() {
        Ok(kvm) => kvm,
        Err(e) => return fail("run", e),
    };
    let (secret_file, serial) = match run_identity(&args) {
        Ok(identity) => identity,
        Err(code) => return code,
    };
    let relay = match std::env::current_exe() {
        Ok(exe) => vec![
            exe.to_string_lossy().into_owned(),
            "image".into(),
            "relay".into(),
        ],
        Err(e) => {
            return fail(
                "run",
                format!("cannot find sealctl itself for --guestfwd: {e}"),
            );
        }
    };
    let spec = RunSpec {
        relay,
        dir: args.dir,
        secret_file,
        serial,
        hostfwd,
        guestfwd: args.guestfwd,
        kvm,
        append: args.append,
        memory_mib: args.memory,
    };
    let argv: Vec<OsString> = match run::qemu_argv(&spec) {
        Ok(argv) => argv,
        Err(e @ run::RunError::MissingImageFile { .. }) => return fail("run", e),
        Err(e) => return usage(e),
    };
    if args.print_command {
        println!("{}", run::shell_line(&argv));
        return ExitCode::SUCCESS;
    }
    run_qemu(&spec, &argv)
}

/// The host forwards of `--smtp`, `--smtps` and `--mgmt`, in that order.
fn host_forwards(args: &RunArgs) -> Result<Vec<HostFwd>, run::RunError> {
    let mut hostfwd = Vec::new();
    for (what, value, port) in [
        ("--smtp", &args.smtp, run::GUEST_SMTP_PORT),
        ("--smtps", &args.smtps, run::GUEST_SMTPS_PORT),
        ("--mgmt", &args.mgmt, run::GUEST_MGMT_PORT),
    ] {
        if let Some(value) = value {
            hostfwd.push(HostFwd::new(what, value, port)?);
        }
    }
    Ok(hostfwd)
}

/// The board's secret file and serial. With `--print-command` nothing is created (the serial
/// is derived from an existing secret, else a placeholder); `Err` is the exit code of a
/// reported failure.
fn run_identity(args: &RunArgs) -> Result<(PathBuf, String), ExitCode> {
    if args.print_command {
        // Printing starts nothing and creates nothing.
        let secret = args
            .secret_file
            .clone()
            .unwrap_or_else(|| args.dir.join(run::SECRET_FILE));
        let serial = args
            .serial
            .clone()
            .or_else(|| fs::read(&secret).ok().map(|s| run::serial_of(&s)))
            .unwrap_or_else(|| "QEMU-00000000".to_owned());
        Ok((secret, serial))
    } else {
        run::board_identity(
            &args.dir,
            args.secret_file.as_deref(),
            args.serial.as_deref(),
        )
        .map_err(|e| fail("run", e))
    }
}

/// Runs QEMU with `argv` in the foreground (announcing the board); QEMU's failure status
/// becomes the exit code.
fn run_qemu(spec: &RunSpec, argv: &[OsString]) -> ExitCode {
    eprintln!(
        "sealctl image run: board {} ({}), {}; Ctrl-C quits",
        spec.serial,
        spec.secret_file.display(),
        if spec.kvm { "KVM" } else { "TCG (no KVM)" }
    );
    match run::run(argv) {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("sealctl image run: QEMU exited: {status}");
            ExitCode::from(status.code().map_or(1, |c| u8::try_from(c).unwrap_or(1)))
        }
        Err(e) => fail("run", e),
    }
}

/// No kernel was given and none is installed: install Debian's `linux-image-amd64` (F-IMAGE:
/// the image is built from it), saying so first. Needs root and apt-get.
fn install_debian_kernel() -> Result<(), build::BuildError> {
    eprintln!("no kernel in /boot: installing linux-image-amd64 with apt-get");
    let run = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .status()
    };
    let ok = run(&["update", "-qq"]).is_ok_and(|s| s.success())
        && run(&[
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "linux-image-amd64",
        ])
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        eprintln!(
            "apt-get could not install linux-image-amd64 (root and Debian's registry needed)"
        );
        Err(build::BuildError::NoKernel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        image: ImageCommand,
    }

    fn parse(args: &[&str]) -> Result<ImageCommand, clap::Error> {
        let mut argv = vec!["image"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.image)
    }

    #[test]
    fn build_arguments() {
        let Ok(ImageCommand::Build(args)) = parse(&[
            "build",
            "--trust",
            "hq.pub",
            "--trust",
            "hq2.pub",
            "--image-key",
            "img.key",
            "--out",
            "out",
            "--version",
            "1.2.3",
        ]) else {
            panic!("build rejected");
        };
        assert_eq!(args.trust.len(), 2);
        assert_eq!(args.version.to_string(), "1.2.3");
        assert!(args.update_version.is_none());
        assert_eq!(args.board, "qemu-x86_64");
        // --trust and --image-key are required; a version must be a version.
        assert!(parse(&["build", "--image-key", "k", "--out", "o"]).is_err());
        assert!(parse(&["build", "--trust", "t", "--out", "o"]).is_err());
        assert!(
            parse(&[
                "build",
                "--trust",
                "t",
                "--image-key",
                "k",
                "--out",
                "o",
                "--version",
                "one"
            ])
            .is_err()
        );
    }

    #[test]
    fn run_arguments() {
        let Ok(ImageCommand::Run(args)) = parse(&[
            "run",
            "dir",
            "--smtp",
            "127.0.0.1:2525",
            "--guestfwd",
            "10.0.2.100:25=127.0.0.1:2526",
            "--accel",
            "tcg",
        ]) else {
            panic!("run rejected");
        };
        assert_eq!(args.accel, Accel::Tcg);
        assert_eq!(args.guestfwd.len(), 1);
        assert_eq!(args.memory, run::DEFAULT_MEMORY_MIB);
        assert!(parse(&["run", "dir", "--guestfwd", "10.0.2.100:25=10.0.0.1:25"]).is_err());
        assert!(parse(&["run", "dir", "--accel", "hvf"]).is_err());
    }

    #[test]
    fn sign_arguments() {
        assert!(
            parse(&[
                "sign",
                "bin",
                "--key",
                "k",
                "--version",
                "1.0.0",
                "-o",
                "x.sgu"
            ])
            .is_ok()
        );
        assert!(parse(&["sign", "bin", "--key", "k", "-o", "x.sgu"]).is_err());
    }
}
