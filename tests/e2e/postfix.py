"""A private Postfix instance as a real SMTP peer for the end-to-end tests.

`Postfix` writes its own `main.cf` and `master.cf` into a config directory under the test's
temp dir and runs `postfix -c DIR start`; its queue directory, data directory, log file
(`maillog_file`) and the Maildir it delivers into are under the same directory. The system
Postfix (`/etc/postfix`, `/var/spool/postfix`) is never changed or started; only the package's
`postfix-files` list is read by `postfix start`.

The instance:

- has exactly one `inet` service, on `IP:PORT` (one 127.0.0.x address, a free port), IPv4 only;
  `start()` checks that the master listens on nothing else. Its SMTP client binds to the same
  address (`smtp_bind_address`). `inet_interfaces` is `127.0.0.1`, not IP: Postfix refuses
  (`fatal: parameter inet_interfaces: no local interface found for 127.0.0.31`) an address
  that is not configured on an interface, and `lo` carries only 127.0.0.1 (the rest of
  127.0.0.0/8 is merely routed to it); no service listens on the `inet_interfaces` default;
- never looks anything up in DNS (`smtp_dns_support_level = disabled`, `smtp_host_lookup =
  native`, no peer-name lookups); the relay host is given as `[IP]:port`;
- offers STARTTLS (unless `smtpd_tls="none"`) with a certificate from `pki.py`, writes the TLS
  details into its `Received:` header (`smtpd_tls_received_header = yes`) and logs TLS
  connections both ways (`*_tls_loglevel = 1`);
- delivers every recipient of its `virtual_mailbox_domains` into one Maildir (`mail/maildir/`)
  with virtual(8) as the unprivileged user `nobody` (virtual(8) never delivers as root);
- relays other domains only for `mynetworks` (default 127.0.0.1), to `relayhost` if given.

Paths and permissions: pytest's temp dirs are 0700 root, so the unprivileged Postfix users
(`postfix`, `nobody`) cannot reach an absolute path under them. Postfix daemons, though, run
with the queue directory as current directory (they `chdir` there as root), so the two paths
an unprivileged process opens are given relative to it: `data_directory = ../data` and
`virtual_mailbox_base = /proc/self/cwd/../mail` (virtual(8) insists on an absolute path;
`/proc/self/cwd` is one that starts at the process's current directory). No permission of any
directory outside the instance is changed.

`stop()` does what `postfix stop` does (SIGTERM to the master, which stops its children), polling
every 50 ms instead of every second, and kills the master and its children by pid if it has not
exited in time (bounded). Postfix commands print their errors only to a terminal (or to
the log service, which is not running before start), so `postfix start` runs with a pty as
stdout/stderr and a failed start shows why. Network rule: only 127.0.0.0/8 is ever used.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import free_port, maildir_messages, wait_until

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"


def available() -> bool:
    """True if the Postfix binaries are installed."""
    return os.access(POSTFIX, os.X_OK) and os.access(POSTCONF, os.X_OK)


def version() -> str:
    try:
        return subprocess.run([POSTCONF, "-d", "-h", "mail_version"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# The services of Debian's master.cf (Postfix 3.x) that a relay + virtual delivery instance
# uses, chroot off everywhere; the one `inet` service is written in front of them.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _run_pty(args: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """Runs a Postfix command with a pty as stdout/stderr; returns (status, output)."""
    master_fd, slave_fd = os.openpty()
    try:
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd,
                             env=env, start_new_session=True)
    finally:
        os.close(slave_fd)
    chunks: list[bytes] = []

    def reader():
        while True:
            try:
                d = os.read(master_fd, 4096)
            except OSError:  # EIO once every holder of the slave side closed it
                return
            if not d:
                return
            chunks.append(d)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        rc = None
    t.join(2.0)  # a daemon started by the command may hold the slave side: do not wait for it
    os.close(master_fd)
    out = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    if rc is None:
        raise subprocess.TimeoutExpired(args, timeout, output=out)
    return rc, out


def _alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (the master is a daemon: init reaps it, and
    init may take its time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _listening_sockets(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses in LISTEN state whose socket process `pid` holds."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m:
                inodes.add(m.group(1))
    except OSError:
        return set()
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
            if v6:
                ip = hexip  # any IPv6 listener is wrong anyway; show it raw
            else:
                ip = socket.inet_ntoa(bytes.fromhex(hexip)[::-1])
            out.add((ip, int(hexport, 16)))
    return out


class Postfix:
    """One private Postfix instance (see the module doc)."""

    def __init__(
        self,
        workdir: Path,
        name: str = "postfix",
        ip: str = "127.0.0.31",
        *,
        hostname: str = "postfix.pf.test",
        domains=("pf.test",),
        cert: tuple[Path, Path] | None = None,
        smtpd_tls: str = "may",
        relayhost: str | None = None,
        smtp_tls: str = "none",
        smtp_ca_file: Path | None = None,
        mynetworks: str = "127.0.0.1/32",
        extra: dict[str, str] | None = None,
    ):
        assert ip.startswith("127."), "loopback only"
        assert smtpd_tls == "none" or cert is not None, "STARTTLS needs a certificate"
        if relayhost is not None:
            assert re.fullmatch(r"\[127\.\d+\.\d+\.\d+\]:\d+", relayhost), relayhost
        self.name = name
        self.ip = ip
        self.port = free_port(ip)
        self.hostname = hostname
        self.dir = workdir / name
        self.conf = self.dir / "etc"
        self.queue_dir = self.dir / "spool"
        self.data_dir = self.dir / "data"
        self.mail_base = self.dir / "mail"
        self.log_path = self.dir / "maillog"
        self.master_pid: int | None = None
        self.started = False
        for d in (self.conf, self.queue_dir, self.data_dir, self.mail_base):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.dir, self.queue_dir, self.mail_base):
            d.chmod(0o755)  # searched by the unprivileged users (relative to the queue dir)
        owner = pwd.getpwnam("postfix")
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, grp.getgrgid(nobody.pw_gid).gr_gid
        os.chown(self.mail_base, self.uid, self.gid)

        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            # relative to the queue directory, see the module doc
            "data_directory": "../data",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "myhostname": hostname,
            "mydomain": hostname.partition(".")[2] or hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": mynetworks,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_bind_address": ip,
            "relayhost": relayhost or "",
            # delivery: every recipient of `domains` into one Maildir, as nobody
            "virtual_mailbox_domains": ", ".join(domains),
            "virtual_mailbox_base": "/proc/self/cwd/../mail",
            "virtual_mailbox_maps": "static:maildir/",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "virtual_minimum_uid": str(min(self.uid, 100)),
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 no local delivery here",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            # no DNS, ever
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtp_address_preference": "ipv4",
            # STARTTLS as a server
            "smtpd_tls_security_level": smtpd_tls,
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_session_cache_database": "",
            # as a client
            "smtp_tls_security_level": smtp_tls,
            "smtp_tls_loglevel": "1",
            "smtp_tls_CAfile": str(smtp_ca_file) if smtp_ca_file else "",
            "smtp_tls_CApath": "",
            "smtp_tls_session_cache_database": "",
            # a test never waits for Postfix's back-off or tarpit
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "smtpd_error_sleep_time": "0s",
            "smtpd_client_connection_rate_limit": "0",
            "in_flow_delay": "0s",
        }
        if cert is not None:
            params["smtpd_tls_cert_file"] = str(cert[0])
            params["smtpd_tls_key_file"] = str(cert[1])
        params.update(extra or {})
        self.params = params
        (self.conf / "main.cf").write_text(
            "# a private test instance written by tests/e2e/postfix.py\n"
            + "".join(f"{k} = {v}\n" for k, v in params.items())
        )
        (self.conf / "master.cf").write_text(
            f"{ip}:{self.port} inet n - n - - smtpd\n" + _MASTER_CF
        )

    # --- process control

    def _postfix(self, command: str, timeout: float = 30) -> tuple[int, str]:
        env = dict(os.environ, MAIL_CONFIG=str(self.conf))
        return _run_pty([POSTFIX, "-c", str(self.conf), command], env, timeout)

    def _master(self) -> int | None:
        """The pid of this instance's master process, if it is running."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
            if Path(f"/proc/{pid}/comm").read_text().strip() != "master":
                return None
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def start(self, timeout: float = 20.0) -> "Postfix":
        assert not self.started, "already started"
        if not available():
            pytest.fail(f"{POSTFIX} not installed (tests/run installs the postfix package)")
        self.started = True
        try:
            rc, out = self._postfix("start", timeout)
        except subprocess.TimeoutExpired as e:
            rc, out = None, f"timed out after {timeout}s\n{e.output}"
        if rc != 0:
            self.stop()
            pytest.fail(f"{self.name}: `postfix -c {self.conf} start` failed ({rc}):\n{out}\n"
                        f"maillog:\n{self.log()[-3000:]}")
        self.master_pid = wait_until(self._master, timeout, f"{self.name}'s master to run")
        want = {(self.ip, self.port)}
        socks = wait_until(lambda: _listening_sockets(self.master_pid) or None, timeout,
                           f"{self.name} to listen on {self.ip}:{self.port}")
        if socks != want:
            self.stop()
            pytest.fail(f"{self.name}: master listens on {sorted(socks)}, expected {sorted(want)}")
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stops the instance as `postfix stop` does (SIGTERM to the master, which takes its
        children down), but polls every 50 ms instead of every second; if the master is still
        there after `timeout`, KILLs its children and it (by pid). Safe to call twice."""
        if not self.started:
            return
        self.started = False
        pid = self._master()
        if pid is None:  # never came up (or already gone): let Postfix clean up what it can
            try:
                self._postfix("stop", timeout)
            except subprocess.TimeoutExpired:
                pass
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for c in [int(x) for x in children] + [pid]:
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- observation

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def hop(self) -> str:
        """`IP:PORT`, as a Sealgate route's next hop."""
        return f"{self.ip}:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match:
        rx = re.compile(pattern, re.M)
        return wait_until(lambda: rx.search(self.log()), timeout,
                          f"{self.name} maillog line /{pattern}/")

    def messages(self) -> dict[str, bytes]:
        """Delivered messages (Maildir `new/`): file name → content."""
        return maildir_messages(self.mail_base / "maildir")

    def wait_message_with(self, marker: bytes, timeout: float = 20.0) -> bytes:
        def find():
            for v in self.messages().values():
                if marker in v:
                    return v
            return None

        return wait_until(find, timeout, f"a message with {marker!r} in {self.name}'s Maildir")


class PostfixFactory:
    """Creates instances for one test and stops them all at teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.instances: list[Postfix] = []

    def __call__(self, name: str = "postfix", start: bool = True, **kw) -> Postfix:
        pf = Postfix(self.workdir, name, **kw)
        self.instances.append(pf)
        if start:
            pf.start()
        return pf

    def close(self) -> None:
        for pf in self.instances:
            pf.stop()
