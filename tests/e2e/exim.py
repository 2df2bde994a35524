"""A private Exim (Debian's exim4-daemon-light, unpacked by tests/e2e/install-peers.sh) as a
real SMTP peer for the end-to-end tests.

`Exim` writes its own configuration (`exim4 -C FILE`; nothing under /etc/exim4 is read) into an
instance directory `target/peers/run/NAME` (see peers.py) with its spool, logs, TLS files and
the Maildir it delivers into, and runs the daemon in the foreground (`-bdf`, queue runs every
second). The instance:

- listens on exactly one address, `IP.PORT` (a 127.0.0.x address, a free port), and its SMTP
  client binds to the same address (`interface`); `exim_path` is the unpacked binary (Exim
  re-executes itself for deliveries);
- never looks anything up in DNS (no host lookups, no ident; routes name IP addresses);
- offers STARTTLS with a certificate from pki.py, SMTPUTF8 and 8BITMIME, to every client;
  accepts every recipient from 127.0.0.0/8;
- delivers `domains` (default `ex.test`) into one Maildir (`mail/maildir`, CRLF line ends so
  the files hold the bytes as sent) as the Debian-exim user (Exim never delivers as root);
- relays the domains in `routes` to a next hop each: `{domain: (ip, port, "starttls" |
  "smtps")}`, with TLS required and the certificate verified against `ca` (the test CA);
- logs (`log/mainlog`) every MAIL command as received (`MAIL <command>` from the MAIL ACL),
  each message's protocol and SMTPUTF8 flag (`DATA P=... utf8=... tls=...` from the DATA ACL),
  the client's port (`+incoming_port`: messages of one connection share it), and TLS details.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import peers
from harness import free_port, maildir_messages, port_is_free, wait_until

EXIM = "usr/sbin/exim4"
USER = "Debian-exim"


def unavailable() -> str | None:
    return peers.unavailable([EXIM], [USER])


def binary() -> Path:
    return peers.PEER_ROOT / EXIM


class Exim:
    def __init__(self, name: str = "exim", ip: str = "127.0.0.41", *,
                 hostname: str = "exim.ex.test", domains=("ex.test",),
                 cert: tuple[Path, Path], ca: Path | None = None,
                 routes: dict[str, tuple[str, int, str]] | None = None):
        assert ip.startswith("127."), "loopback only"
        self.name, self.ip, self.hostname = name, ip, hostname
        self.port = free_port(ip)
        self.dir = peers.instance_dir(name)
        self.proc: subprocess.Popen | None = None
        u = pwd.getpwnam(USER)
        tls = self.dir / "tls"
        for sub in ("spool", "log", "mail", "tls"):
            (self.dir / sub).mkdir()
        # Readable by Debian-exim (deliveries, the TLS client) and by root (the daemon).
        shutil.copy(cert[0], tls / "server.pem")
        shutil.copy(cert[1], tls / "server.key")
        if ca is not None:
            shutil.copy(ca, tls / "ca.pem")
        for p in [self.dir / s for s in ("spool", "log", "mail", "tls")] + list(tls.iterdir()):
            shutil.chown(p, u.pw_uid, u.pw_gid)
        (tls / "server.key").chmod(0o600)
        self.log_path = self.dir / "log" / "mainlog"
        self.maildir = self.dir / "mail" / "maildir"
        self.conf = self.dir / "exim.conf"

        routers, transports = [], []
        for i, (dom, (hip, hport, mode)) in enumerate((routes or {}).items()):
            assert hip.startswith("127.") and mode in ("starttls", "smtps")
            routers.append(f"""
route{i}:
  driver = manualroute
  domains = {dom}
  route_list = * {hip}
  transport = remote{i}
  self = send
""")
            verify = (f"  tls_verify_certificates = {tls / 'ca.pem'}\n  tls_verify_hosts = *\n"
                      if ca is not None else "")
            transports.append(f"""
remote{i}:
  driver = smtp
  port = {hport}
  interface = {ip}
  helo_data = {hostname}
  allow_localhost
  hosts_require_tls = *
{verify}{'  protocol = smtps' if mode == 'smtps' else ''}
""")
        self.conf.write_text(f"""\
# a private test instance written by tests/e2e/exim.py
exim_path = {binary()}
spool_directory = {self.dir / 'spool'}
log_file_path = {self.dir / 'log'}/%slog
pid_file_path = {self.dir / 'exim.pid'}
primary_hostname = {hostname}
qualify_domain = {domains[0]}
local_interfaces = <; {ip}.{self.port}
never_users = root
host_lookup =
rfc1413_hosts =
rfc1413_query_timeout = 0s
keep_environment = LD_LIBRARY_PATH
domainlist local_domains = {' : '.join(domains)}
tls_certificate = {tls / 'server.pem'}
tls_privatekey = {tls / 'server.key'}
tls_advertise_hosts = *
smtputf8_advertise_hosts = *
accept_8bitmime = true
message_size_limit = 60M
smtp_accept_max = 50
smtp_accept_queue_per_connection = 0
timeout_frozen_after = 5m
ignore_bounce_errors_after = 0s
log_selector = +smtp_connection +incoming_port +incoming_interface +tls_cipher \\
  +tls_certificate_verified +received_recipients +8bitmime +smtp_confirmation \\
  +outgoing_port -host_lookup_failed
acl_smtp_mail = acl_mail
acl_smtp_rcpt = acl_rcpt
acl_smtp_data = acl_data

begin acl
acl_mail:
  warn logwrite = MAIL $smtp_command
  accept
acl_rcpt:
  accept hosts = <; 127.0.0.0/8
  deny message = relay not permitted
acl_data:
  warn logwrite = DATA P=$received_protocol utf8=${{if bool{{$message_smtputf8}}{{yes}}{{no}}}} tls=${{if def:tls_in_ver{{$tls_in_ver}}{{none}}}} id=$h_message-id:
  accept

begin routers
{''.join(routers)}
local:
  driver = accept
  domains = +local_domains
  transport = maildir

begin transports
maildir:
  driver = appendfile
  directory = {self.maildir}
  maildir_format
  create_directory
  directory_mode = 0755
  mode = 0644
  use_crlf
  user = {USER}
  group = {USER}
{''.join(transports)}
begin retry
* * F,1h,1s

begin rewrite
""")

    # --- process control

    def _exim(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(binary()), "-C", str(self.conf), *args], capture_output=True,
                              text=True, timeout=timeout, env=peers.env())

    def start(self, timeout: float = 20.0) -> "Exim":
        check = self._exim("-bV")
        if check.returncode != 0:
            pytest.fail(f"{self.name}: `exim -C {self.conf} -bV` failed:\n{check.stdout}{check.stderr}")
        err = open(self.dir / "stderr.log", "wb")
        self.proc = subprocess.Popen([str(binary()), "-C", str(self.conf), "-bdf", "-q1s"],
                                     stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     env=peers.env(), cwd=self.dir, start_new_session=True)
        err.close()

        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name}: exim exited ({self.proc.returncode}):\n"
                            f"{(self.dir / 'stderr.log').read_text(errors='replace')}\n{self.log()}")
            return not port_is_free(self.ip, self.port)

        wait_until(up, timeout, f"{self.name} to listen on {self.ip}:{self.port}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        p, self.proc = self.proc, None
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # --- observation

    @property
    def hop(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip, self.port)

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

        return wait_until(found, timeout, f"{self.name} mainlog line /{pattern}/ (x{count})")

    def messages(self) -> dict[str, bytes]:
        return maildir_messages(self.maildir)

    def wait_message_with(self, marker: bytes, timeout: float = 20.0) -> bytes:
        def find():
            for v in self.messages().values():
                if marker in v:
                    return v
            return None

        return wait_until(find, timeout, f"a message with {marker!r} in {self.name}'s Maildir")
