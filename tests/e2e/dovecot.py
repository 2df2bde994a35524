"""A private Dovecot (IMAP and POP3) as a real authentication backend for the end-to-end tests.

`Dovecot` writes its own `dovecot.conf` (nothing under /etc/dovecot is read) and runs
`dovecot -F -c FILE` in the foreground as root; its log (`log_path`, every process) is
`dovecot.log` beside the config in the test's temp dir.

The instance:

- listens on one 127.0.0.x address only (default 127.0.0.22), on four free ports: IMAP with
  STARTTLS, IMAPS, POP3 with STLS, POP3S (`protocols = imap pop3`; `start()` checks that the
  master listens on exactly these); TLS with a certificate from `pki.py` for `mail.test` and
  the IP (from a CA of its own when the caller gives none); `ssl = required`: no login before
  TLS, on any port;
- authenticates `auth_mechanisms = plain login` against a passwd-file with the users of
  `USERS` (`carol@b.test`, and `dave`, a bare local part for backends with `login = "{user}"`);
  a failed login is answered at once (`auth_failure_delay = 0` and no anvil auth penalty, so a
  test's wrong passwords do not wait Dovecot's default 2 s, growing to 15 s per address);
- gives every user a Maildir (userdb static, as `nobody`).

Paths and permissions: pytest's temp dirs are 0700 root, and Dovecot's unprivileged processes
(the auth process as `dovecot`, the login processes as `dovenull`, the mail processes as the
mail user) cannot reach a path under them. So the run-time part (base_dir with the sockets,
state_dir, the passwd-file, the Maildirs) lives in a directory of its own made with
`mkdtemp` under /tmp (0755, the passwd-file 0640 root:dovecot, the Maildirs nobody's) and is
removed by `stop()`. No permission of any other directory is changed. Short socket paths are a
bonus (the unix socket path limit is 108 bytes).

`stop()` sends SIGTERM to the master (which stops its children, `shutdown_clients = yes`) and
waits, bounded, SIGKILL by pid after. Network rule: only 127.0.0.0/8 is ever used.
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import free_port
from pki import make_ca, make_leaf

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
LIBEXEC = Path("/usr/lib/dovecot")

# login as sent to the server, password
USERS = [
    ("carol@b.test", "carol-secret"),
    ("dave", "dave-secret"),
]


def unavailable() -> str | None:
    """Why the tests cannot run a Dovecot (None if they can)."""
    if not os.access(DOVECOT, os.X_OK):
        return "dovecot not installed (tests/run installs dovecot-core, -imapd, -pop3d)"
    for b in ("imap", "imap-login", "pop3", "pop3-login", "auth"):
        if not os.access(LIBEXEC / b, os.X_OK):
            return f"{LIBEXEC / b} missing (tests/run installs dovecot-imapd and dovecot-pop3d)"
    for user in ("dovecot", "dovenull", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no user {user!r} (the dovecot-core package makes dovecot and dovenull)"
    return None


def available() -> bool:
    return unavailable() is None


def version() -> str:
    try:
        return subprocess.run([DOVECOT, "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """The TCP addresses in LISTEN state whose sockets processes `pids` hold."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if m:
                inodes.add(m.group(1))
    out = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "0A" or f[9] not in inodes:
                continue
            hexip, _, hexport = f[1].partition(":")
            ip = hexip if v6 else socket.inet_ntoa(bytes.fromhex(hexip)[::-1])
            out.add((ip, int(hexport, 16)))
    return out


def _children(pid: int) -> set[int]:
    out = {pid}
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out |= _children(int(k))
    return out


class Dovecot:
    """One private Dovecot (see the module doc)."""

    def __init__(
        self,
        workdir: Path,
        name: str = "dovecot",
        ip: str = "127.0.0.22",
        *,
        cert: tuple[Path, Path] | None = None,
        ca: Path | None = None,
        tls_name: str = "mail.test",
        users=USERS,
    ):
        assert ip.startswith("127."), "loopback only"
        assert (cert is None) == (ca is None), "give cert and ca together (or neither)"
        self.name = name
        self.ip = ip
        self.ports = {k: free_port(ip) for k in ("imap", "imaps", "pop3", "pop3s")}
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "dovecot.conf"
        self.log_path = self.dir / "dovecot.log"
        self.users = list(users)
        self.tls_name = tls_name
        self.proc: subprocess.Popen | None = None
        self.run_dir: Path | None = None
        if cert is None:
            pki_dir = self.dir / "pki"
            pki_dir.mkdir(exist_ok=True)
            ca = make_ca(pki_dir, "mail-ca")
            cert = make_leaf(pki_dir, "mail-ca", "mail", tls_name, usage="serverAuth",
                             sans=[tls_name, ip])
        self.ca_pem = Path(ca)
        self.cert = cert

    # --- addresses

    @property
    def imap(self) -> tuple[str, int]:
        """IMAP with STARTTLS."""
        return (self.ip, self.ports["imap"])

    @property
    def imaps(self) -> tuple[str, int]:
        return (self.ip, self.ports["imaps"])

    @property
    def pop3(self) -> tuple[str, int]:
        """POP3 with STLS."""
        return (self.ip, self.ports["pop3"])

    @property
    def pop3s(self) -> tuple[str, int]:
        return (self.ip, self.ports["pop3s"])

    def url(self, kind: str) -> str:
        """`imap://IP:PORT`, `imaps://…`, `pop3://…`, `pop3s://…`."""
        return f"{kind}://{self.ip}:{self.ports[kind]}"

    # --- config

    def _conf_text(self, run: Path) -> str:
        nobody = pwd.getpwnam("nobody")
        ip = self.ip
        p = self.ports
        return f"""\
# a private test instance written by tests/e2e/dovecot.py
instance_name = sealgate-test-{self.name}-{p['imap']}
base_dir = {run}/run
state_dir = {run}/state
log_path = {self.log_path}
info_log_path = {self.log_path}
debug_log_path = {self.log_path}
protocols = imap pop3
listen = {ip}
shutdown_clients = yes
default_internal_user = dovecot
default_login_user = dovenull

ssl = required
ssl_cert = <{self.cert[0]}
ssl_key = <{self.cert[1]}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_verbose = yes
auth_failure_delay = 0
auth_cache_size = 0

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {run}/users
}}
userdb {{
  driver = static
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={run}/mail/%u
}}
first_valid_uid = {nobody.pw_uid}
first_valid_gid = {nobody.pw_gid}
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
namespace inbox {{
  inbox = yes
}}

# no growing penalty for an address's failed logins (Dovecot's anvil, up to 15 s): the
# gateway is the only client and its own throttling is what the tests measure
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {ip}
    port = {p['imap']}
  }}
  inet_listener imaps {{
    address = {ip}
    port = {p['imaps']}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {ip}
    port = {p['pop3']}
  }}
  inet_listener pop3s {{
    address = {ip}
    port = {p['pop3s']}
    ssl = yes
  }}
}}
"""

    # --- process control

    def start(self, timeout: float = 20.0) -> "Dovecot":
        assert self.proc is None, "already running"
        why = unavailable()
        if why:
            pytest.fail(why)
        run = Path(tempfile.mkdtemp(prefix="sealgate-dovecot-", dir="/tmp"))
        self.run_dir = run
        run.chmod(0o755)
        nobody = pwd.getpwnam("nobody")
        mail = run / "mail"
        mail.mkdir()
        os.chown(mail, nobody.pw_uid, nobody.pw_gid)
        mail.chmod(0o700)
        users = run / "users"
        users.write_text("".join(f"{u}:{{PLAIN}}{pw}::::::\n" for u, pw in self.users))
        os.chown(users, 0, grp.getgrnam("dovecot").gr_gid)
        users.chmod(0o640)
        self.conf.write_text(self._conf_text(run))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.dir,
                start_new_session=True,
            )
        want = {self.imap, self.imaps, self.pop3, self.pop3s}
        deadline = time.monotonic() + timeout
        socks: set = set()
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                pytest.fail(f"{self.name}: dovecot exited ({rc})\nlog:\n{self.log()[-3000:]}")
            socks = _listening(_children(self.proc.pid))
            if want <= socks:
                break
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name}: not listening on {sorted(want)} after {timeout}s"
                            f" (listens on {sorted(socks)})\nlog:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        if socks != want:
            self.stop()
            pytest.fail(f"{self.name}: listens on {sorted(socks)}, expected {sorted(want)}")
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the master and wait; SIGKILL (by pid) to it and its children if it has
        not exited in time; removes the run-time directory. Safe twice."""
        rc = None
        if self.proc is not None:
            p, self.proc = self.proc, None
            if p.poll() is None:
                pids = _children(p.pid)
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    p.wait()
            rc = p.returncode
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        return rc

    # --- observation

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts this server's CA (checks the name too)."""
        return ssl.create_default_context(cafile=str(self.ca_pem))

    def check_imap(self, user: str, password: str, starttls: bool = False) -> bool:
        """Logs in with Python's imaplib (IMAPS, or IMAP + STARTTLS); True if accepted."""
        ctx = self.client_context()
        if starttls:
            c = imaplib.IMAP4(self.ip, self.ports["imap"], timeout=10)
            c.starttls(ssl_context=ctx)
        else:
            c = imaplib.IMAP4_SSL(self.ip, self.ports["imaps"], ssl_context=ctx, timeout=10)
        try:
            c.login(user, password)
            c.logout()
            return True
        except imaplib.IMAP4.error:
            return False
        finally:
            try:
                c.shutdown()
            except OSError:
                pass

    def check_pop3(self, user: str, password: str, starttls: bool = False) -> bool:
        """Logs in with Python's poplib (POP3S, or POP3 + STLS); True if accepted."""
        ctx = self.client_context()
        if starttls:
            c = poplib.POP3(self.ip, self.ports["pop3"], timeout=10)
            c.stls(context=ctx)
        else:
            c = poplib.POP3_SSL(self.ip, self.ports["pop3s"], context=ctx, timeout=10)
        try:
            c.user(user)
            c.pass_(password)
            c.quit()
            return True
        except poplib.error_proto:
            return False
        finally:
            try:
                c.close()
            except OSError:
                pass
