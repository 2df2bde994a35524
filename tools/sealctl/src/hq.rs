//! `sealctl keygen` and `sealctl config {sign,verify,show}`: HQ's config-signing keys and the
//! signed config blobs (F-CONFIG) made with them. The blob format and every check live in
//! `sealgate_core::blob`, shared with the box; this module reads and writes files and reports.
//!
//! Exit status: 0 success, 1 a check failed (or a file could not be written), 2 usage or an
//! unreadable input file.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use sealgate_core::blob::{self, BlobError, Header, KeyFileError};
use sealgate_core::config::Config;
use sealgate_core::time::unix_now;
use sealgate_core::{hex, secrets};

/// Exit status: a check failed.
const EXIT_CHECK: u8 = 1;
/// Exit status: usage error or unreadable input (clap uses 2 for usage too).
const EXIT_INPUT: u8 = 2;

/// How a command failed: the message names the file and the check.
#[derive(Debug)]
enum Failure {
    /// A check failed (exit 1).
    Check(String),
    /// Usage, or an input that could not be read (exit 2).
    Input(String),
}

impl Failure {
    fn exit(self, command: &str) -> ExitCode {
        let (code, msg) = match self {
            Failure::Check(m) => (EXIT_CHECK, m),
            Failure::Input(m) => (EXIT_INPUT, m),
        };
        eprintln!("sealctl {command}: {msg}");
        ExitCode::from(code)
    }
}

impl From<KeyFileError> for Failure {
    fn from(e: KeyFileError) -> Self {
        match e {
            KeyFileError::Exists { .. } | KeyFileError::Write { .. } | KeyFileError::Random => {
                Failure::Check(e.to_string())
            }
            _ => Failure::Input(e.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments.

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Writes PREFIX.key (the private key: PEM PKCS#8, mode 0600; keep it offline) and
    /// PREFIX.pub (the public key: PEM SubjectPublicKeyInfo, for the boxes and for verify).
    /// Existing files are never overwritten.
    #[arg(long, value_name = "PREFIX")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a site TOML config and sign it into a blob for the box
    ///
    /// The TOML must pass the box's own config checks (the same code) first; a config that
    /// does not is refused, naming the key and the check. Dates (--not-before, --not-after)
    /// are YYYY-MM-DD (00:00:00 UTC of that day) or YYYY-MM-DDTHH:MM:SSZ, in UTC.
    ///
    /// Exit status: 0 signed, 1 refused (config check, size), 2 usage or unreadable input.
    #[command(verbatim_doc_comment)]
    Sign(SignArgs),
    /// Check a blob's format, its signature by one of the given keys, and optionally its device
    ///
    /// Prints each check it made. The sequence, time window and firmware version depend on
    /// the box and are checked there; verify prints them for information.
    ///
    /// Exit status: 0 every check passed, 1 a check failed, 2 usage or unreadable input.
    #[command(verbatim_doc_comment)]
    Verify(VerifyArgs),
    /// Print a blob's header (key id, device, sequence, dates, firmware, key changes) and its
    /// config, without verifying the signature
    ///
    /// Exit status: 0 shown, 1 not a well-formed blob, 2 usage or unreadable input.
    #[command(verbatim_doc_comment)]
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The site config (TOML, as in docs/config.md)
    #[arg(value_name = "SITE.toml")]
    config: PathBuf,
    /// The HQ private key to sign with (from `sealctl keygen`)
    #[arg(long, value_name = "K.key")]
    key: PathBuf,
    /// Sequence number; the box applies only a sequence greater than the last one it applied
    #[arg(long, value_name = "N")]
    seq: u64,
    /// Bind the blob to the box with this serial (default: any box)
    #[arg(long, value_name = "SERIAL", value_parser = serial)]
    device: Option<String>,
    /// The box refuses the blob before this time (default: no lower bound)
    #[arg(long, value_name = "DATE", value_parser = date)]
    not_before: Option<u64>,
    /// The box refuses the blob after this time (default: no end)
    #[arg(long, value_name = "DATE", value_parser = date)]
    not_after: Option<u64>,
    /// Lowest firmware version allowed to apply it, dotted numeric (default: any)
    #[arg(long, value_name = "VERSION", value_parser = version)]
    min_firmware: Option<String>,
    /// Key rotation: the box trusts this public key from now on (repeatable)
    #[arg(long, value_name = "P.pub")]
    add_key: Vec<PathBuf>,
    /// Key rotation: the box stops trusting this key, given as its public key file or its
    /// 16-hex-digit key id (repeatable; applied after --add-key; one key always remains)
    #[arg(long, value_name = "P.pub|KEYID")]
    retire_key: Vec<String>,
    /// Where to write the blob (replaced atomically if it exists)
    #[arg(short = 'o', long = "out", value_name = "SITE.sgc")]
    out: PathBuf,
    /// A secret the config names as `{ secret = "NAME" }`, read from FILE (one trailing
    /// newline dropped) and encrypted to the box of --device-key (repeatable)
    #[arg(long = "secret", value_name = "NAME=FILE", value_parser = secret_arg)]
    secrets: Vec<(String, PathBuf)>,
    /// The box's encryption key, as `sealgate device --encryption-key` prints it (64 hex
    /// digits); needed with --secret
    #[arg(long, value_name = "BOX.pub")]
    device_key: Option<PathBuf>,
    /// Sign even if the config fails the box's checks (for tests only: the box will refuse
    /// to apply such a config)
    #[arg(long)]
    dangerous_skip_config_check: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The blob
    #[arg(value_name = "SITE.sgc")]
    blob: PathBuf,
    /// A trusted public key (repeatable); the blob must be signed by one of them
    #[arg(long = "pub", value_name = "P.pub", required = true)]
    public_keys: Vec<PathBuf>,
    /// Also check that the blob is valid for the box with this serial
    #[arg(long, value_name = "SERIAL", value_parser = serial)]
    device: Option<String>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The blob
    #[arg(value_name = "SITE.sgc")]
    blob: PathBuf,
}

fn secret_arg(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use NAME=FILE"))?;
    secrets::check_name(name).map_err(|e| e.to_string())?;
    if file.is_empty() {
        return Err(format!("{s:?}: no file after ="));
    }
    Ok((name.to_owned(), PathBuf::from(file)))
}

/// The box's X25519 public key from its file (64 hex digits, surrounding space ignored).
fn read_device_key(path: &Path) -> Result<[u8; 32], Failure> {
    let data = read_bounded(path, 1024)?;
    let text = String::from_utf8_lossy(&data);
    hex::decode(text.trim())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            Failure::Input(format!(
                "{}: not a box encryption key (64 hex digits, from `sealgate device --encryption-key`)",
                path.display()
            ))
        })
}

/// Each `--secret` read and sealed to the box; the config's references reported.
fn seal_secrets(
    a: &SignArgs,
    config: Option<&Config>,
) -> Result<Vec<secrets::SealedSecret>, Failure> {
    if a.secrets.is_empty() {
        if a.device_key.is_some() {
            return Err(Failure::Input("--device-key is only for --secret".into()));
        }
        return Ok(Vec::new());
    }
    let Some(key_file) = &a.device_key else {
        return Err(Failure::Input(
            "--secret needs --device-key BOX.pub (the box it is encrypted to)".into(),
        ));
    };
    let box_key = read_device_key(key_file)?;
    let mut out = Vec::new();
    for (name, file) in &a.secrets {
        if out.iter().any(|s: &secrets::SealedSecret| &s.name == name) {
            return Err(Failure::Input(format!("--secret {name} given twice")));
        }
        let mut value = zeroize::Zeroizing::new(read_bounded(file, secrets::MAX_SECRET_LEN + 2)?);
        for end in ["\r\n", "\n"] {
            if value.ends_with(end.as_bytes()) {
                let keep = value.len() - end.len();
                value.truncate(keep);
                break;
            }
        }
        let sealed = secrets::seal(&box_key, name, &value)
            .map_err(|e| Failure::Input(format!("{}: {e}", file.display())))?;
        if let Some(c) = config
            && !c.secret_refs().iter().any(|r| &r.name == name)
        {
            eprintln!("sealctl config sign: warning: the config names no secret {name:?}");
        }
        out.push(sealed);
    }
    if let Some(c) = config {
        for r in c.secret_refs() {
            if !out.iter().any(|s| s.name == r.name) {
                eprintln!(
                    "sealctl config sign: note: {} names secret {:?}, which this blob does not \
                     carry: the box must hold it from an earlier blob",
                    r.key, r.name
                );
            }
        }
    }
    Ok(out)
}

fn serial(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > blob::MAX_SERIAL
        || s.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "a serial is 1 to {} bytes without spaces or control characters",
            blob::MAX_SERIAL
        ));
    }
    Ok(s.to_owned())
}

fn date(s: &str) -> Result<u64, String> {
    blob::parse_utc(s).ok_or_else(|| {
        "expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC, an existing date, year 1970-9999)"
            .to_owned()
    })
}

fn version(s: &str) -> Result<String, String> {
    match blob::parse_version(s) {
        Some(_) => Ok(s.to_owned()),
        None => Err("expected a dotted numeric version like 0.2.0".to_owned()),
    }
}

// ---------------------------------------------------------------------------------------------
// Commands.

/// `sealctl keygen`.
pub fn keygen(args: KeygenArgs) -> ExitCode {
    match run_keygen(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit("keygen"),
    }
}

/// `sealctl config ...`.
pub fn config(cmd: ConfigCommand) -> ExitCode {
    let (name, result) = match cmd {
        ConfigCommand::Sign(a) => ("config sign", run_sign(&a)),
        ConfigCommand::Verify(a) => ("config verify", run_verify(&a)),
        ConfigCommand::Show(a) => ("config show", run_show(&a)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(name),
    }
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(prefix.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

fn run_keygen(args: &KeygenArgs) -> Result<(), Failure> {
    let key_path = with_suffix(&args.out, ".key");
    let pub_path = with_suffix(&args.out, ".pub");
    for p in [&key_path, &pub_path] {
        if fs::symlink_metadata(p).is_ok() {
            return Err(KeyFileError::Exists { path: p.clone() }.into());
        }
    }
    let pkcs8 = blob::generate_key()?;
    let pair = blob::Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|e| Failure::Check(format!("the generated key does not load: {e}")))?;
    let public = blob::public_key_of(&pair);
    blob::write_private_key(&key_path, &pkcs8)?;
    if let Err(e) = blob::write_public_key(&pub_path, &public) {
        let _ = fs::remove_file(&key_path);
        return Err(e.into());
    }
    println!(
        "key id {}\nwrote {} (private key, mode 0600: keep it offline)\nwrote {} (public key)",
        blob::key_id_hex(&blob::key_id(&public)),
        key_path.display(),
        pub_path.display()
    );
    Ok(())
}

/// Reads at most `max` bytes (one more tells the caller it is too long).
fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, Failure> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut data))
        .map_err(|e| Failure::Input(format!("{}: cannot read: {e}", path.display())))?;
    Ok(data)
}

/// Reads and decodes a blob file: unreadable is an input error, malformed a failed check.
fn read_blob(path: &Path) -> Result<blob::Blob, Failure> {
    let data = read_bounded(path, blob::MAX_BLOB)?;
    if data.len() > blob::MAX_BLOB {
        return Err(Failure::Check(format!(
            "{}: format: larger than any blob ({} bytes at most)",
            path.display(),
            blob::MAX_BLOB
        )));
    }
    blob::decode(&data).map_err(|e| {
        let extra = match (&e, data.get(10..blob::PREFIX_LEN)) {
            (BlobError::Truncated, Some(len)) => {
                let body = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                format!(
                    " (the file has {} of {} bytes)",
                    data.len(),
                    blob::PREFIX_LEN + body + blob::SIGNATURE_LEN
                )
            }
            (BlobError::Truncated, None) => format!(" (the file has {} bytes)", data.len()),
            _ => String::new(),
        };
        Failure::Check(format!("{}: {e}{extra}", path.display()))
    })
}

fn keys_changes(h: &Header) -> (String, String) {
    let add = h
        .add_keys
        .iter()
        .map(|k| blob::key_id_hex(&blob::key_id(k)))
        .collect::<Vec<_>>();
    let retire = h
        .retire_keys
        .iter()
        .map(blob::key_id_hex)
        .collect::<Vec<_>>();
    let join = |v: Vec<String>| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    (join(add), join(retire))
}

fn run_sign(a: &SignArgs) -> Result<(), Failure> {
    let path = a.config.display().to_string();
    let data = read_bounded(&a.config, blob::MAX_BODY)?;
    if data.len() > blob::MAX_BODY {
        return Err(Failure::Check(format!(
            "{path}: too large: a config blob body holds at most {} bytes",
            blob::MAX_BODY
        )));
    }
    let text = String::from_utf8(data)
        .map_err(|e| Failure::Input(format!("{path}: not UTF-8 text: {e}")))?;
    if let (Some(nb), Some(na)) = (a.not_before, a.not_after)
        && na < nb
    {
        return Err(Failure::Input(format!(
            "--not-after {} is before --not-before {}",
            blob::format_utc(na),
            blob::format_utc(nb)
        )));
    }
    let checked = if a.dangerous_skip_config_check {
        eprintln!(
            "sealctl config sign: WARNING: --dangerous-skip-config-check: {path} was NOT checked; \
             a box refuses to apply a config that fails its checks"
        );
        None
    } else {
        Some(
            Config::from_toml(&text, &path).map_err(|e| {
                Failure::Check(format!("{path}: config check failed, not signed: {e}"))
            })?,
        )
    };
    let sealed = seal_secrets(a, checked.as_ref())?;
    let key = blob::read_private_key(&a.key)?;
    let key_id = blob::key_id_of(&key);
    let mut add_keys = Vec::new();
    for p in &a.add_key {
        add_keys.push(blob::read_public_key(p)?);
    }
    let mut retire_keys = Vec::new();
    for r in &a.retire_key {
        let id = match blob::parse_key_id(r) {
            Some(id) => id,
            None => blob::key_id(&blob::read_public_key(Path::new(r))?),
        };
        retire_keys.push(id);
    }
    let header = Header {
        key_id,
        device: a.device.clone(),
        sequence: a.seq,
        not_before: a.not_before.unwrap_or(0),
        not_after: a.not_after,
        min_firmware: a.min_firmware.clone().unwrap_or_default(),
        add_keys,
        retire_keys,
    };
    let bytes = blob::sign_with_secrets(header, &text, &sealed, &key);
    // The box's own format and signature checks on what we are about to hand out.
    let signed = blob::decode(&bytes)
        .map_err(|e| Failure::Check(format!("{path}: cannot be signed into a blob: {e}")))?;
    let trusted = BTreeMap::from([(key_id, blob::public_key_of(&key))]);
    signed
        .verify_signature(&trusted)
        .map_err(|e| Failure::Check(format!("{path}: the new blob does not verify: {e}")))?;
    let h = signed.header();
    if h.retire_keys.contains(&key_id) && h.add_keys.is_empty() {
        eprintln!(
            "sealctl config sign: warning: this blob retires its own signing key {} and adds \
             none; a box that trusts no other key will refuse it",
            blob::key_id_hex(&key_id)
        );
    }
    write_atomic(&a.out, &bytes)
        .map_err(|e| Failure::Check(format!("{}: cannot write: {e}", a.out.display())))?;
    let (add, retire) = keys_changes(h);
    println!(
        "signed {path} into {} ({} bytes): key {}, sequence {}, device {}, valid {} to {}, \
         min firmware {}, add keys {add}, retire keys {retire}, secrets {}",
        a.out.display(),
        bytes.len(),
        blob::key_id_hex(&key_id),
        h.sequence,
        h.device.as_deref().unwrap_or("any"),
        not_before_text(h.not_before),
        not_after_text(h.not_after),
        min_firmware_text(&h.min_firmware),
        secrets_text(signed.secrets()),
    );
    Ok(())
}

/// The secrets' names and the box key they are sealed to; never their values.
fn secrets_text(s: &[secrets::SealedSecret]) -> String {
    if s.is_empty() {
        return "none".to_owned();
    }
    s.iter()
        .map(|s| format!("{} (sealed to box key {})", s.name, hex::encode(&s.key_id)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn not_before_text(t: u64) -> String {
    if t == 0 {
        "any time".to_owned()
    } else {
        blob::format_utc(t)
    }
}

fn not_after_text(t: Option<u64>) -> String {
    t.map_or_else(|| "no end".to_owned(), blob::format_utc)
}

fn min_firmware_text(v: &str) -> &str {
    if v.is_empty() { "any" } else { v }
}

/// Writes `bytes` to a temporary sibling, syncs it and renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn run_verify(a: &VerifyArgs) -> Result<(), Failure> {
    let path = a.blob.display().to_string();
    let mut trusted = BTreeMap::new();
    let mut names = BTreeMap::new();
    for p in &a.public_keys {
        let key = blob::read_public_key(p)?;
        let id = blob::key_id(&key);
        trusted.insert(id, key);
        names.insert(id, p.display().to_string());
    }
    let b = read_blob(&a.blob)?;
    let h = b.header();
    println!(
        "{path}: format ok (format {}, {} bytes, body {} bytes)",
        blob::FORMAT,
        b.bytes().len(),
        b.body_len()
    );
    b.verify_signature(&trusted).map_err(|e| {
        let extra = match e {
            BlobError::UnknownKey(_) => format!(
                " (trusted here: {})",
                names
                    .iter()
                    .map(|(id, p)| format!("{} from {p}", blob::key_id_hex(id)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => String::new(),
        };
        Failure::Check(format!("{path}: {e}{extra}"))
    })?;
    println!(
        "{path}: signature ok (key {} from {})",
        blob::key_id_hex(&h.key_id),
        names.get(&h.key_id).map_or("?", String::as_str)
    );
    let target = h.device.as_deref().unwrap_or("any device");
    match &a.device {
        Some(serial) => {
            b.check_device(serial)
                .map_err(|e| Failure::Check(format!("{path}: {e}")))?;
            println!("{path}: device ok ({serial}; the blob is for {target})");
        }
        None => println!("{path}: device not checked (no --device; the blob is for {target})"),
    }
    let (add, retire) = keys_changes(h);
    println!(
        "{path}: checked by the box, not here: sequence {} (must exceed the box's), valid {} to \
         {}, min firmware {}; key changes: add {add}, retire {retire}",
        h.sequence,
        not_before_text(h.not_before),
        not_after_text(h.not_after),
        min_firmware_text(&h.min_firmware),
    );
    let now = unix_now();
    if now < h.not_before || h.not_after.is_some_and(|na| now > na) {
        println!(
            "{path}: note: now ({}) is outside the blob's time window",
            blob::format_utc(now)
        );
    }
    Ok(())
}

/// Text from an unverified blob, safe for a terminal: control characters other than newline
/// and tab are escaped.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

fn run_show(a: &ShowArgs) -> Result<(), Failure> {
    let b = read_blob(&a.blob)?;
    let h = b.header();
    let (add, retire) = keys_changes(h);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "file:         {} ({} bytes, format {})",
        a.blob.display(),
        b.bytes().len(),
        if b.secrets().is_empty() {
            blob::FORMAT
        } else {
            blob::FORMAT_SECRETS
        }
    );
    let _ = writeln!(out, "key id:       {}", blob::key_id_hex(&h.key_id));
    let _ = writeln!(
        out,
        "device:       {}",
        h.device.as_deref().unwrap_or("any")
    );
    let _ = writeln!(out, "sequence:     {}", h.sequence);
    let _ = writeln!(
        out,
        "not before:   {}",
        if h.not_before == 0 {
            "none".to_owned()
        } else {
            blob::format_utc(h.not_before)
        }
    );
    let _ = writeln!(
        out,
        "not after:    {}",
        h.not_after
            .map_or_else(|| "none".to_owned(), blob::format_utc)
    );
    let _ = writeln!(out, "min firmware: {}", min_firmware_text(&h.min_firmware));
    let _ = writeln!(out, "add keys:     {add}");
    let _ = writeln!(out, "retire keys:  {retire}");
    let _ = writeln!(out, "secrets:      {}", secrets_text(b.secrets()));
    let _ = writeln!(
        out,
        "signature:    not verified by show (use sealctl config verify --pub)"
    );
    let toml = b.config_toml();
    let _ = writeln!(out, "config:       {} bytes of TOML follow", toml.len());
    let _ = writeln!(out);
    out.push_str(&printable(toml));
    if !toml.is_empty() && !toml.ends_with('\n') {
        out.push('\n');
    }
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::Check(format!("writing to standard output: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_parsers() {
        assert_eq!(date("2026-01-02"), Ok(1_767_312_000));
        assert_eq!(date("2026-01-02T03:04:05Z"), Ok(1_767_323_045));
        assert!(date("2026-02-30").is_err());
        assert!(date("2026-01-02T03:04:05").is_err());
        assert!(serial("DEV-0011AABB").is_ok());
        assert!(serial("").is_err());
        assert!(serial("DEV 1").is_err());
        assert!(serial("DEV\u{1b}[2J").is_err());
        assert!(version("0.2.0").is_ok());
        assert!(version("0.2.0-rc1").is_err());
        assert!(version("").is_err());
    }

    #[test]
    fn suffixes_and_escapes() {
        assert_eq!(
            with_suffix(Path::new("dir/hq"), ".key"),
            Path::new("dir/hq.key")
        );
        assert_eq!(
            printable("a\tb\nc\u{1b}[2J\r"),
            "a\tb\nc\\u{001b}[2J\\u{000d}"
        );
    }
}
