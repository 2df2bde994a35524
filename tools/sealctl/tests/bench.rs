//! Drives the real `sealctl` binary: `bench sink` on loopback, and
//! `bench smtp` against it, plain and with STARTTLS.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

const SEALCTL: &str = env!("CARGO_BIN_EXE_sealctl");

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "sealctl-test-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running sink, killed on drop.
struct SinkProcess {
    child: Child,
    addr: String,
}

impl SinkProcess {
    fn start(dir: &Path, tls: bool) -> Self {
        let mut cmd = Command::new(SEALCTL);
        cmd.args(["bench", "sink", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if tls {
            cmd.arg("--tls-self-signed");
        }
        let mut child = cmd.spawn().expect("start sink");
        let stdout = child.stdout.take().expect("sink stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read sink address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        assert!(addr.starts_with("127."), "{addr}");
        Self { child, addr }
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bench(addr: &str, extra: &[&str]) -> std::process::Output {
    Command::new(SEALCTL)
        .args(["bench", "smtp", "--addr", addr])
        .args([
            "--conns",
            "4",
            "--msgs",
            "40",
            "--size",
            "2000",
            "--timeout",
            "10",
        ])
        .args(extra)
        .output()
        .expect("run bench smtp")
}

/// Every file in `dir` is one message of `size` bytes with a unique
/// Message-ID; returns how many there are.
fn check_messages(dir: &Path, size: usize) -> usize {
    let mut ids = std::collections::HashSet::new();
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        let content = std::fs::read(&path).expect("read message");
        assert_eq!(content.len(), size, "{}", path.display());
        let text = String::from_utf8(content).expect("ascii message");
        assert!(text.starts_with("From: "), "{text}");
        assert!(text.ends_with("\r\n"));
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .expect("Message-ID header")
            .to_owned();
        assert!(ids.insert(id), "duplicate Message-ID");
        count += 1;
    }
    count
}

#[test]
fn plain_text_report() {
    let dir = TempDir::new("plain");
    let sink = SinkProcess::start(&dir.0, false);
    let out = bench(&sink.addr, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("accepted   40 / 40 (0 failed)"), "{stdout}");
    assert!(stdout.contains("errors     none"), "{stdout}");
    assert_eq!(check_messages(&dir.0, 2000), 40);
}

#[test]
fn starttls_json_report() {
    let dir = TempDir::new("starttls");
    let sink = SinkProcess::start(&dir.0, true);
    let out = bench(&sink.addr, &["--starttls", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["accepted"], 40);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["mode"], "starttls");
    let tls = &report["tls_handshakes"];
    let handshakes = ["full", "full_with_hrr", "resumed"]
        .iter()
        .map(|k| tls[k].as_u64().expect("handshake count"))
        .sum::<u64>();
    assert_eq!(handshakes, 40);
    assert!(report["latency_ms"]["p99"].as_f64().is_some());
    assert_eq!(check_messages(&dir.0, 2000), 40);
}

#[test]
fn failures_exit_1_and_usage_errors_exit_2() {
    let dir = TempDir::new("fail");
    // Plain sink: STARTTLS is not offered, so every session fails (tls).
    let sink = SinkProcess::start(&dir.0, false);
    let out = bench(&sink.addr, &["--starttls", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["failed"], 40);
    assert_eq!(report["errors"]["tls"], 40);
    assert_eq!(check_messages(&dir.0, 2000), 0);

    let out = bench(&sink.addr, &["--conns", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = bench(&sink.addr, &["--starttls", "--implicit-tls"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn connection_reuse_text_report() {
    let dir = TempDir::new("reuse");
    let sink = SinkProcess::start(&dir.0, true);
    let out = bench(
        &sink.addr,
        &["--starttls", "--per-session", "4", "--rcpts", "3"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!(
            "sealctl bench smtp {} (starttls): 4 conns, 40 msgs of 2000 B, 4 msg/session, \
             3 rcpt/msg\n",
            sink.addr
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("accepted   40 / 40 (0 failed)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("sessions   10 ok, 0 failed\n"), "{stdout}");
    assert!(stdout.contains("tls        resumption on: "), "{stdout}");
    assert!(stdout.contains("errors     none"), "{stdout}");
    assert_eq!(check_messages(&dir.0, 2000), 40);
}
