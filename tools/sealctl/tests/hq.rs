//! Drives the real `sealctl` binary through HQ's config workflow: `keygen`, `config sign`,
//! `config verify`, `config show`, and each way verification or signing refuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

const SEALCTL: &str = env!("CARGO_BIN_EXE_sealctl");

const SITE: &str = r#"[device]
hostname = "gw.branch.example.test"

[smtp]
listen = ["127.0.0.1:2525"]
local_domains = ["branch.example.test"]
trusted_networks = ["10.1.0.0/16"]

[[route]]
domain = "branch.example.test"
maildir = "maildir"
"#;

/// A directory for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hq-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Runs sealctl in this directory.
    fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(SEALCTL)
            .args(args)
            .current_dir(&self.0)
            .output()
            .expect("run sealctl");
        Run(out)
    }

    fn write(&self, name: &str, data: &[u8]) {
        std::fs::write(self.path(name), data).expect("write test file");
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read test file")
    }

    /// keygen + a signed site blob `site.sgc` for DEV-0011AABB.
    fn signed_site(&self) {
        self.run(&["keygen", "--out", "hq"]).ok();
        self.write("site.toml", SITE.as_bytes());
        self.run(&[
            "config",
            "sign",
            "site.toml",
            "--key",
            "hq.key",
            "--seq",
            "5",
            "--device",
            "DEV-0011AABB",
            "-o",
            "site.sgc",
        ])
        .ok();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Run(Output);

impl Run {
    fn code(&self) -> i32 {
        self.0.status.code().expect("exit code")
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// Asserts success; returns stdout.
    fn ok(&self) -> String {
        assert_eq!(
            self.code(),
            0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout(),
            self.stderr()
        );
        self.stdout()
    }
    /// Asserts the exit code and that stderr contains every `needle`.
    fn fails(&self, code: i32, needles: &[&str]) {
        let err = self.stderr();
        assert_eq!(
            self.code(),
            code,
            "stdout:\n{}\nstderr:\n{err}",
            self.stdout()
        );
        for n in needles {
            assert!(err.contains(n), "{n:?} not in stderr:\n{err}");
        }
    }
}

fn key_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("key id "))
        .expect("key id line")
        .to_owned()
}

#[test]
fn keygen_sign_verify_show_round_trip() {
    let t = TempDir::new("round-trip");
    let out = t.run(&["keygen", "--out", "hq"]).ok();
    let id = key_id(&out);
    assert_eq!(id.len(), 16);
    assert!(out.contains("hq.key") && out.contains("hq.pub"), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p| {
            std::fs::metadata(t.path(p))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("hq.key"), 0o600);
        assert_eq!(mode("hq.key") & 0o077, 0);
    }
    let key = String::from_utf8(t.read("hq.key")).expect("PEM text");
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{key}");
    let public = String::from_utf8(t.read("hq.pub")).expect("PEM text");
    assert!(
        public.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"),
        "{public}"
    );

    t.write("site.toml", SITE.as_bytes());
    let out = t
        .run(&[
            "config",
            "sign",
            "site.toml",
            "--key",
            "hq.key",
            "--seq",
            "42",
            "--device",
            "DEV-0011AABB",
            "--not-before",
            "2026-01-01",
            "--not-after",
            "2030-06-30T12:00:00Z",
            "--min-firmware",
            "0.1.0",
            "-o",
            "site.sgc",
        ])
        .ok();
    assert!(out.contains("site.sgc") && out.contains(&id), "{out}");
    assert_eq!(&t.read("site.sgc")[..8], b"SEALCFG\0");

    let out = t
        .run(&[
            "config",
            "verify",
            "site.sgc",
            "--pub",
            "hq.pub",
            "--device",
            "DEV-0011AABB",
        ])
        .ok();
    assert!(out.contains("format ok"), "{out}");
    assert!(
        out.contains(&format!("signature ok (key {id} from hq.pub)")),
        "{out}"
    );
    assert!(out.contains("device ok"), "{out}");
    // Without --device it says the device was not checked.
    let out = t
        .run(&["config", "verify", "site.sgc", "--pub", "hq.pub"])
        .ok();
    assert!(out.contains("device not checked"), "{out}");

    let out = t.run(&["config", "show", "site.sgc"]).ok();
    for line in [
        format!("key id:       {id}"),
        "device:       DEV-0011AABB".to_owned(),
        "sequence:     42".to_owned(),
        "not before:   2026-01-01T00:00:00Z".to_owned(),
        "not after:    2030-06-30T12:00:00Z".to_owned(),
        "min firmware: 0.1.0".to_owned(),
        "add keys:     none".to_owned(),
        "retire keys:  none".to_owned(),
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} not in:\n{out}");
    }
    assert!(out.ends_with(SITE), "the TOML follows the header:\n{out}");
}

#[test]
fn key_rotation_is_shown() {
    let t = TempDir::new("rotation");
    let old = key_id(&t.run(&["keygen", "--out", "old"]).ok());
    let new = key_id(&t.run(&["keygen", "--out", "new"]).ok());
    t.write("site.toml", SITE.as_bytes());
    t.run(&[
        "config",
        "sign",
        "site.toml",
        "--key",
        "old.key",
        "--seq",
        "2",
        "--add-key",
        "new.pub",
        "--retire-key",
        &old,
        "-o",
        "rot.sgc",
    ])
    .ok();
    let out = t.run(&["config", "show", "rot.sgc"]).ok();
    assert!(out.contains(&format!("add keys:     {new}")), "{out}");
    assert!(out.contains(&format!("retire keys:  {old}")), "{out}");
    assert!(out.contains("device:       any"), "{out}");
    // The retire key may also be given as a public key file.
    t.run(&[
        "config",
        "sign",
        "site.toml",
        "--key",
        "new.key",
        "--seq",
        "3",
        "--retire-key",
        "old.pub",
        "-o",
        "rot2.sgc",
    ])
    .ok();
    let out = t.run(&["config", "show", "rot2.sgc"]).ok();
    assert!(out.contains(&format!("retire keys:  {old}")), "{out}");
    // Adding and retiring the same key is refused.
    t.run(&[
        "config",
        "sign",
        "site.toml",
        "--key",
        "old.key",
        "--seq",
        "4",
        "--add-key",
        "new.pub",
        "--retire-key",
        "new.pub",
        "-o",
        "bad.sgc",
    ])
    .fails(1, &["site.toml", "both added and retired"]);
}

#[test]
fn verify_with_the_wrong_key() {
    let t = TempDir::new("wrong-key");
    t.signed_site();
    let other = key_id(&t.run(&["keygen", "--out", "other"]).ok());
    t.run(&["config", "verify", "site.sgc", "--pub", "other.pub"])
        .fails(
            1,
            &["site.sgc: signature: signed by key", "not trusted", &other],
        );
    // With the right key among several, it verifies.
    t.run(&[
        "config",
        "verify",
        "site.sgc",
        "--pub",
        "other.pub",
        "--pub",
        "hq.pub",
    ])
    .ok();
}

#[test]
fn verify_an_altered_blob() {
    let t = TempDir::new("altered");
    t.signed_site();
    let mut bytes = t.read("site.sgc");
    let at = bytes.len() - 64 - 5; // inside the TOML text
    bytes[at] ^= 0x20;
    t.write("altered.sgc", &bytes);
    t.run(&["config", "verify", "altered.sgc", "--pub", "hq.pub"])
        .fails(1, &["altered.sgc: signature: does not verify"]);
}

#[test]
fn verify_for_another_device() {
    let t = TempDir::new("device");
    t.signed_site();
    t.run(&[
        "config",
        "verify",
        "site.sgc",
        "--pub",
        "hq.pub",
        "--device",
        "DEV-99999999",
    ])
    .fails(
        1,
        &["site.sgc: device: the blob is for device DEV-0011AABB, this device is DEV-99999999"],
    );
}

#[test]
fn verify_a_truncated_file() {
    let t = TempDir::new("truncated");
    t.signed_site();
    let bytes = t.read("site.sgc");
    let total = bytes.len();
    t.write("short.sgc", &bytes[..total - 1]);
    t.run(&["config", "verify", "short.sgc", "--pub", "hq.pub"])
        .fails(
            1,
            &[
                "short.sgc: format: truncated",
                &format!("the file has {} of {total} bytes", total - 1),
            ],
        );
    t.write("tiny.sgc", &bytes[..5]);
    t.run(&["config", "verify", "tiny.sgc", "--pub", "hq.pub"])
        .fails(1, &["tiny.sgc: format: truncated", "the file has 5 bytes"]);
    t.write("empty.sgc", b"");
    t.run(&["config", "show", "empty.sgc"])
        .fails(1, &["empty.sgc: format: truncated"]);
    let mut long = bytes.clone();
    long.extend_from_slice(b"extra");
    t.write("long.sgc", &long);
    t.run(&["config", "verify", "long.sgc", "--pub", "hq.pub"])
        .fails(
            1,
            &["long.sgc: format: 5 trailing bytes after the signature"],
        );
}

#[test]
fn verify_random_bytes() {
    let t = TempDir::new("random");
    t.signed_site();
    // Fixed pseudo-random bytes (xorshift), so a failure reproduces.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    t.write("random.sgc", &random);
    t.run(&["config", "verify", "random.sgc", "--pub", "hq.pub"])
        .fails(
            1,
            &["random.sgc: format: not a Sealgate config blob (bad magic)"],
        );
    t.run(&["config", "show", "random.sgc"])
        .fails(1, &["random.sgc: format: not a Sealgate config blob"]);
    // The TOML itself is not a blob either.
    t.run(&["config", "verify", "site.toml", "--pub", "hq.pub"])
        .fails(1, &["site.toml: format: not a Sealgate config blob"]);
    // Right magic, future format.
    let mut future = t.read("site.sgc");
    future[9] = 9;
    t.write("future.sgc", &future);
    t.run(&["config", "show", "future.sgc"])
        .fails(1, &["future.sgc: format: unsupported format version 9"]);
}

#[test]
fn unreadable_inputs_exit_2() {
    let t = TempDir::new("unreadable");
    t.signed_site();
    t.run(&["config", "verify", "missing.sgc", "--pub", "hq.pub"])
        .fails(2, &["missing.sgc: cannot read"]);
    t.run(&["config", "verify", "site.sgc", "--pub", "missing.pub"])
        .fails(2, &["missing.pub: cannot read"]);
    // A private key where a public one belongs, and the other way round.
    t.run(&["config", "verify", "site.sgc", "--pub", "hq.key"])
        .fails(2, &["hq.key", "no PEM \"PUBLIC KEY\" block"]);
    t.run(&[
        "config",
        "sign",
        "site.toml",
        "--key",
        "hq.pub",
        "--seq",
        "1",
        "-o",
        "x.sgc",
    ])
    .fails(2, &["hq.pub", "no PEM \"PRIVATE KEY\" block"]);
    t.run(&[
        "config",
        "sign",
        "missing.toml",
        "--key",
        "hq.key",
        "--seq",
        "1",
        "-o",
        "x.sgc",
    ])
    .fails(2, &["missing.toml: cannot read"]);
    t.write("latin1.toml", b"# caf\xe9\n");
    t.run(&[
        "config",
        "sign",
        "latin1.toml",
        "--key",
        "hq.key",
        "--seq",
        "1",
        "-o",
        "x.sgc",
    ])
    .fails(2, &["latin1.toml: not UTF-8"]);
    // Usage errors.
    t.run(&["config", "verify", "site.sgc"])
        .fails(2, &["--pub"]);
    t.run(&[
        "config",
        "sign",
        "site.toml",
        "--key",
        "hq.key",
        "--seq",
        "1",
        "--not-after",
        "2026-02-30",
        "-o",
        "x.sgc",
    ])
    .fails(2, &["--not-after", "YYYY-MM-DD"]);
    t.run(&[
        "config",
        "sign",
        "site.toml",
        "--key",
        "hq.key",
        "--seq",
        "1",
        "--not-before",
        "2027-01-01",
        "--not-after",
        "2026-01-01",
        "-o",
        "x.sgc",
    ])
    .fails(
        2,
        &["--not-after 2026-01-01T00:00:00Z is before --not-before"],
    );
    assert!(!t.path("x.sgc").exists());
}

#[test]
fn private_key_readable_by_others_is_refused() {
    let t = TempDir::new("loose-key");
    t.signed_site();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(t.path("hq.key"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        t.run(&[
            "config",
            "sign",
            "site.toml",
            "--key",
            "hq.key",
            "--seq",
            "6",
            "-o",
            "x.sgc",
        ])
        .fails(2, &["hq.key", "accessible to group or others", "chmod 600"]);
    }
}

#[test]
fn sign_refuses_a_bad_config() {
    let t = TempDir::new("bad-config");
    t.run(&["keygen", "--out", "hq"]).ok();
    t.write("nolisten.toml", b"[smtp]\nlisten = []\n");
    t.run(&[
        "config",
        "sign",
        "nolisten.toml",
        "--key",
        "hq.key",
        "--seq",
        "1",
        "-o",
        "bad.sgc",
    ])
    .fails(
        1,
        &[
            "nolisten.toml: config check failed, not signed",
            "config key smtp.listen",
        ],
    );
    assert!(!t.path("bad.sgc").exists());
    t.write(
        "badcidr.toml",
        SITE.replace("10.1.0.0/16", "10.1.0.0/33").as_bytes(),
    );
    t.run(&[
        "config",
        "sign",
        "badcidr.toml",
        "--key",
        "hq.key",
        "--seq",
        "1",
        "-o",
        "bad.sgc",
    ])
    .fails(1, &["badcidr.toml", "smtp.trusted_networks"]);
    // Larger than a blob can hold, whether the file or the body with its header.
    let mut big = SITE.to_owned();
    big.push_str(&"#".repeat(1 << 20));
    t.write("big.toml", big.as_bytes());
    t.run(&[
        "config", "sign", "big.toml", "--key", "hq.key", "--seq", "1", "-o", "bad.sgc",
    ])
    .fails(1, &["big.toml: too large"]);
    t.write("big.toml", &big.as_bytes()[..(1 << 20) - 8]);
    t.run(&[
        "config", "sign", "big.toml", "--key", "hq.key", "--seq", "1", "-o", "bad.sgc",
    ])
    .fails(
        1,
        &["big.toml: cannot be signed into a blob: format: body larger than"],
    );
    t.write("syntax.toml", b"[smtp\n");
    t.run(&[
        "config",
        "sign",
        "syntax.toml",
        "--key",
        "hq.key",
        "--seq",
        "1",
        "-o",
        "bad.sgc",
    ])
    .fails(1, &["syntax.toml: config check failed"]);
    assert!(!t.path("bad.sgc").exists());
    // The dangerous flag signs it anyway, loudly; the blob itself is well formed.
    let run = t.run(&[
        "config",
        "sign",
        "nolisten.toml",
        "--key",
        "hq.key",
        "--seq",
        "1",
        "--dangerous-skip-config-check",
        "-o",
        "bad.sgc",
    ]);
    run.ok();
    assert!(run.stderr().contains("WARNING"), "{}", run.stderr());
    t.run(&["config", "verify", "bad.sgc", "--pub", "hq.pub"])
        .ok();
}

#[test]
fn keygen_refuses_to_overwrite() {
    let t = TempDir::new("overwrite");
    t.run(&["keygen", "--out", "hq"]).ok();
    let key = t.read("hq.key");
    let public = t.read("hq.pub");
    t.run(&["keygen", "--out", "hq"])
        .fails(1, &["hq.key: already exists; refusing to overwrite it"]);
    assert_eq!(t.read("hq.key"), key);
    assert_eq!(t.read("hq.pub"), public);
    // Only the public half present: still refused, and no private key written.
    std::fs::remove_file(t.path("hq.key")).expect("rm");
    t.run(&["keygen", "--out", "hq"])
        .fails(1, &["hq.pub: already exists"]);
    assert!(!t.path("hq.key").exists());
}

#[test]
fn every_command_has_help() {
    let t = TempDir::new("help");
    for args in [
        &["keygen", "--help"][..],
        &["config", "--help"],
        &["config", "sign", "--help"],
        &["config", "verify", "--help"],
        &["config", "show", "--help"],
    ] {
        let out = t.run(args).ok();
        assert!(out.contains("Usage: sealctl"), "{args:?}:\n{out}");
        if args.len() == 3 || args[0] == "keygen" {
            assert!(out.contains("Exit status"), "{args:?}:\n{out}");
        }
    }
}
