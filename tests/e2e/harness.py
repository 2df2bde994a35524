"""The end-to-end harness: real `sealgate` processes on loopback.

`Gateway` writes a TOML config into a per-test directory, starts the release binary, waits for
its ready line, exposes its state directory, log and Maildir, and stops it (SIGTERM) or kills it
(SIGKILL).  `Raw` is a small line-oriented SMTP client for the bad-input tests.

Network rule: only 127.0.0.0/8 is ever used.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
def _default_bin() -> Path:
    """The newest of the static build (tests/run) and a plain `cargo build --release`."""
    found = [p for p in (ROOT / "target" / "x86_64-unknown-linux-gnu" / "release" / "sealgate",
                         ROOT / "target" / "release" / "sealgate") if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else ROOT / "target" / "release" / "sealgate"


BIN = Path(os.environ.get("SEALGATE_BIN") or _default_bin())
SEALCTL = BIN.parent / "sealctl"

READY_RE = re.compile(r"^sealgate ready: (?P<listeners>.*?) state=(?P<state>\S+)\s*$")


# ---------------------------------------------------------------------------------------------
# small helpers


def maildir_messages(maildir: Path) -> dict[str, bytes]:
    """The delivered messages of a Maildir (`new/`): file name → content."""
    d = maildir / "new"
    out = {}
    if d.is_dir():
        for f in sorted(d.iterdir()):
            try:
                out[f.name] = f.read_bytes()
            except FileNotFoundError:
                pass
    return out


def wait_until(cond, timeout=20.0, what="condition", interval=0.05):
    """Polls `cond()` until it returns something truthy; returns that value or fails."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


_used_ports: set[tuple[str, int]] = set()


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port that is free on `ip` right now (and not handed out before in this run)."""
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if (ip, port) not in _used_ports:
            _used_ports.add((ip, port))
            return port
    raise RuntimeError("no free port")


def port_is_free(ip: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def _table(name: str, d: dict, array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return head + "\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in d.items()) + "\n"


def make_config(
    *,
    hostname: str,
    listen: list[str],
    implicit_tls: list[str] = (),
    local_domains: list[str] = (),
    trusted_networks: list[str] = ("127.0.0.1/32",),
    routes: list[dict] = (),
    smtp: dict | None = None,
    queue: dict | None = None,
    tls: dict | None = None,
    certificates: list[dict] | None = None,
    dns: dict | None = None,
) -> str:
    s = {
        "listen": list(listen),
        "local_domains": list(local_domains),
        "trusted_networks": list(trusted_networks),
    }
    if implicit_tls:
        s["implicit_tls"] = list(implicit_tls)
    s.update(smtp or {})
    q = {"retry_schedule": ["1s", "2s"], "min_free_bytes": 1 << 20}
    q.update(queue or {})
    t = {"dev_self_signed": True}
    t.update(tls or {})
    out = _table("device", {"hostname": hostname})
    out += _table("smtp", s)
    out += _table("queue", q)
    out += _table("tls", t)
    for c in [{"name": "default"}] if certificates is None else certificates:
        out += _table("tls.certificates", c, array=True)
    if dns:
        out += _table("dns", dns)
    for r in routes:
        out += _table("route", r, array=True)
    return out


# ---------------------------------------------------------------------------------------------
# the daemon


class Gateway:
    """One sealgate process with its own config file, state directory and log."""

    def __init__(self, workdir: Path, name: str, config: str | None):
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self.dir / "state"
        self.config_text = config
        self.config_path = None
        if config is not None:
            self.config_path = self.dir / "sealgate.toml"
            self.config_path.write_text(config)
        self.log_path = self.dir / "stderr.log"
        self.stdout_lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.smtp: list[tuple[str, int]] = []
        self.smtps: list[tuple[str, int]] = []
        self.submission: list[tuple[str, int]] = []
        self.ready_line = ""
        self.starts = 0

    # --- process control

    def start(self, timeout: float = 20.0) -> "Gateway":
        assert self.proc is None, "already running"
        if not BIN.exists():
            pytest.fail(f"{BIN} missing: run `cargo build --release` first")
        args = [str(BIN)]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        args += ["--state", str(self.state)]
        env = dict(os.environ)
        env.setdefault("SEALGATE_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        with open(self.log_path, "ab") as log:
            log.write(f"----- start #{self.starts + 1}: {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.dir,
                env=env,
            )
        self.starts += 1
        ready = threading.Event()
        proc = self.proc
        lines = self.stdout_lines

        def pump():
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append(line)
                if READY_RE.match(line):
                    ready.set()
            ready.set()  # EOF: let the waiter notice the exit

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or proc.poll() is not None:
            rc = proc.poll()
            self.kill()
            pytest.fail(
                f"{self.name}: no ready line within {timeout}s (exit status {rc});"
                f" stdout={self.stdout_lines!r}\nlog:\n{self.log()[-4000:]}"
            )
        line = next(l for l in reversed(self.stdout_lines) if READY_RE.match(l))
        self.ready_line = line
        m = READY_RE.match(line)
        self.smtp, self.smtps, self.submission = [], [], []
        lists = {"smtp": self.smtp, "smtps": self.smtps, "submission": self.submission}
        for item in m.group("listeners").split():
            kind, _, addr = item.partition("=")
            host, _, port = addr.rpartition(":")
            lists[kind].append((host, int(port)))
        self.ready_state = m.group("state")
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc is None:
            return None
        p, self.proc = self.proc, None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc is None:
            return
        p, self.proc = self.proc, None
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()

    # --- observation

    @property
    def addr(self) -> tuple[str, int]:
        return self.smtp[0]

    @property
    def tls_addr(self) -> tuple[str, int]:
        return self.smtps[0]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> list[re.Match]:
        rx = re.compile(pattern, re.M)

        def found():
            ms = list(rx.finditer(self.log()))
            return ms if len(ms) >= count else None

        return wait_until(found, timeout, f"{self.name} log line /{pattern}/ (x{count})")

    @property
    def cert_file(self) -> Path:
        return self.state / "certs" / "default.crt.pem"

    def maildir(self, sub: str = "maildir") -> Path:
        return self.state / sub

    def messages(self, sub: str = "maildir") -> dict[str, bytes]:
        """Delivered messages (Maildir `new/`): file name → content."""
        return maildir_messages(self.maildir(sub))

    def wait_messages(self, n: int, sub: str = "maildir", timeout: float = 20.0) -> dict[str, bytes]:
        return wait_until(
            lambda: (lambda m: m if len(m) >= n else None)(self.messages(sub)),
            timeout,
            f"{n} message(s) in {self.name}'s Maildir {sub}",
        )

    def wait_message_with(self, marker: bytes, sub: str = "maildir", timeout: float = 20.0) -> bytes:
        def find():
            for v in self.messages(sub).values():
                if marker in v:
                    return v
            return None

        return wait_until(find, timeout, f"a message with {marker!r} in {self.name}'s {sub}")

    def queue_list(self) -> dict[str, dict]:
        """Queued messages by id, as `sealgate queue list --json` reports them."""
        if not (self.state / "queue").is_dir():
            return {}
        out = subprocess.run([str(BIN), "--state", str(self.state), "queue", "list", "--json"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return {m["id"]: m for m in json.loads(out)}

    def deferred_detail(self, qid: str, rcpt: str, timeout: float = 30.0) -> str:
        """Waits for the first deferral of `rcpt` of `qid`; returns the reason in its queue
        entry (a temporary failure, given in the log too)."""
        self.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt={re.escape(rcpt)} result=Deferred",
                      timeout=timeout)

        def detail():
            e = self.queue_list().get(qid)
            assert e is not None, f"{qid} left {self.name}'s queue while it should be deferred"
            rc = e["recipients"][0]
            assert rc["status"] == "pending", e
            return rc["detail"]

        d = wait_until(detail, 10, f"a reason in {self.name}'s queue entry {qid}")
        assert d.startswith("4."), f"not a temporary failure: {d!r}"
        assert d in self.log(), f"{self.name}'s log does not give the reason {d!r}"
        return d

    def peer_table(self) -> dict:
        """The peer table as `sealctl peers list --json` prints it (`peers`, `clients`)."""
        out = subprocess.run([str(SEALCTL), "peers", "list", "--state", str(self.state), "--json"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return json.loads(out)

    def queue_files(self) -> list[str]:
        """Queue ids of the messages still queued."""
        return sorted(self.queue_list())

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        wait_until(lambda: not self.queue_files(), timeout, f"{self.name}'s queue to empty")


class GatewayFactory:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.gateways: list[Gateway] = []

    def __call__(self, name: str = "gw", config: str | None = None, start: bool = True) -> Gateway:
        gw = Gateway(self.workdir, name, config)
        self.gateways.append(gw)
        if start:
            gw.start()
        return gw

    def simple(
        self,
        name: str = "gw",
        ip: str = "127.0.0.1",
        *,
        hostname: str | None = None,
        local_domains=("a.test",),
        implicit: bool = False,
        routes: list[dict] | None = None,
        start: bool = True,
        **kw,
    ) -> Gateway:
        """A gateway on `ip` with free ports and a Maildir route for each local domain."""
        listen = kw.pop("listen", None) or [f"{ip}:{free_port(ip)}"]
        implicit_tls = [f"{ip}:{free_port(ip)}"] if implicit else []
        if routes is None:
            routes = [{"domain": d, "maildir": "maildir"} for d in local_domains]
        cfg = make_config(
            hostname=hostname or f"{name}.test",
            listen=listen,
            implicit_tls=implicit_tls,
            local_domains=list(local_domains),
            routes=routes,
            **kw,
        )
        return self(name, cfg, start=start)

    def close(self) -> list[str]:
        """Stops every daemon; returns problems seen (unexpected exits, panics)."""
        problems = []
        for gw in self.gateways:
            if gw.proc is not None and gw.proc.poll() is not None:
                problems.append(f"{gw.name}: daemon exited on its own with status {gw.proc.returncode}")
            try:
                gw.stop()
            except Exception:  # noqa: BLE001 - teardown must reach every process
                gw.kill()
            if "panicked at" in gw.log():
                problems.append(f"{gw.name}: a thread panicked (see {gw.log_path})")
        return problems


# ---------------------------------------------------------------------------------------------
# a raw SMTP client


class Reply:
    def __init__(self, lines: list[str]):
        self.lines = lines
        self.code = int(lines[-1][:3])
        self.text = "\n".join(lines)

    def __repr__(self):
        return f"Reply({self.text!r})"

    def has(self, prefix: str) -> bool:
        return self.text.startswith(prefix)


class Raw:
    """Line-oriented SMTP over a socket; reads replies exactly, never guesses."""

    def __init__(self, addr, source: str | None = None, timeout: float = 10.0, greet: bool = True):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect(tuple(addr))
        self.buf = b""
        self.greeting = self.reply() if greet else None

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed (pending {self.buf!r})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> Reply:
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            assert re.match(r"^\d{3}[ -]", line) or re.match(r"^\d{3}$", line), f"not a reply line: {line!r}"
            lines.append(line)
            if len(line) == 3 or line[3] == " ":
                return Reply(lines)

    def cmd(self, line: str | bytes) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def expect(self, line, code: int) -> Reply:
        r = self.cmd(line)
        assert r.code == code, f"{line!r} -> {r.text!r}, expected {code}"
        return r

    def nothing_within(self, seconds: float) -> bool:
        """True if the server sends nothing (and keeps the connection) for `seconds`."""
        if self.buf:
            return False
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return True
        finally:
            self.sock.settimeout(10.0)
        self.buf += data
        return False

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """Reads to EOF (discarding); True if the server closed the connection in time."""
        self.sock.settimeout(timeout)
        try:
            while True:
                d = self.sock.recv(65536)
                if not d:
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except (ConnectionResetError, ssl.SSLError):
            return True

    def starttls(self, ctx: ssl.SSLContext | None = None, server_hostname: str | None = None):
        if ctx is None:
            ctx = insecure_context()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        self.buf = b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def insecure_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verifying_context(cert_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cert_file))
    return ctx


def message(marker: str, frm: str, to: str, subject: str = "test", extra_body: str = "") -> bytes:
    """A small RFC 5322 message with CRLF line ends carrying `marker` in header and body."""
    lines = [
        f"From: <{frm}>",
        f"To: <{to}>",
        f"Subject: {subject} {marker}",
        f"Message-ID: <{marker}@sealgate-tests>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"body marker {marker}",
    ]
    body = "\r\n".join(lines) + "\r\n"
    if extra_body:
        body += extra_body
    return body.encode()


def send_raw_message(r: Raw, frm: str, rcpts: list[str], data: bytes) -> Reply:
    """MAIL/RCPT/DATA on an open session (after EHLO); returns the reply to the final dot."""
    r.expect(f"MAIL FROM:<{frm}>", 250)
    for t in rcpts:
        r.expect(f"RCPT TO:<{t}>", 250)
    r.expect("DATA", 354)
    stuffed = re.sub(rb"(?m)^\.", b"..", data)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    r.send(stuffed + b".\r\n")
    return r.reply()


def queue_id(reply_text: str) -> str:
    m = re.search(r"queued as (\S+)", reply_text)
    assert m, f"no queue id in {reply_text!r}"
    return m.group(1)


def submit_one(addr, frm: str, to: str, mark: str, *, ehlo: str = "client.a.test",
               source: str | None = None) -> str:
    """EHLO, one message from `frm` to `to` carrying `mark`, QUIT; returns its queue id."""
    r = Raw(addr, source=source)
    try:
        r.expect(f"EHLO {ehlo}", 250)
        rep = send_raw_message(r, frm, [to], message(mark, frm, to))
        assert rep.code == 250, rep.text
        r.expect("QUIT", 221)
    finally:
        r.close()
    return queue_id(rep.text)



def received_headers(msg: bytes) -> list[str]:
    """The Received: header fields of a message (unfolded), top first."""
    head = msg.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    fields = re.split(r"\n(?![ \t])", head)
    return [re.sub(r"\s+", " ", f) for f in fields if f.lower().startswith("received:")]


def header_block(msg: bytes) -> str:
    return msg.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
