"""A private OpenSMTPD (Debian's opensmtpd 6.8.0p2, unpacked by tests/e2e/install-peers.sh)
as a real SMTP peer for the end-to-end tests.

OpenSMTPD's spool (`/var/spool/smtpd`), control socket (`/var/run/smtpd.sock`) and the chroot
of its unprivileged processes (`/var/lib/opensmtpd/empty`) are compiled in. So `smtpd` runs in
a mount namespace of its own (`unshare -m`, private propagation) in which private directories of
the instance (`target/peers/run/NAME`, see peers.py) are bind-mounted over those three places;
the system's directories are only mount points (install-peers.sh makes them if missing) and
nothing outside the namespace sees the instance. The helpers of `/usr/libexec/opensmtpd` are
the unpacked root's: the `mda` command names `mail.maildir` there, and the compiled-in wrapper
`/usr/libexec/opensmtpd/mail.mda` is the unpacked one bind-mounted over that (empty) mount
point.

The instance (`smtpd -d`: foreground, log on stderr → `NAME/smtpd.log`):

- listens on exactly one address, `IP` port `PORT` (127.0.0.x), offering STARTTLS with a
  certificate from pki.py (Debian's 6.8.0p2 fails every handshake as a TLS server: an upstream
  bug, which the tests use); its client binds to the same address (`src`);
- delivers `domains` (default `os.test`) into one Maildir (`mail/maildir`) with the unpacked
  `mail.maildir` as the user `nobody`;
- relays each domain in `routes` to `smtp+tls://IP:PORT` (STARTTLS required; the certificate is
  verified against `ca`, the test CA, when given);
- never uses DNS for any of that (IP next hops).
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

SMTPD = "usr/sbin/smtpd"
MAILDIR_HELPER = "usr/libexec/opensmtpd/mail.maildir"
USERS = ["opensmtpd", "opensmtpq"]
MOUNTS = {"spool": "/var/spool/smtpd", "empty": "/var/lib/opensmtpd/empty", "run": "/var/run",
          str(peers.PEER_ROOT / "usr/libexec/opensmtpd"): "/usr/libexec/opensmtpd"}


def unavailable() -> str | None:
    why = peers.unavailable([SMTPD, MAILDIR_HELPER], USERS)
    if why is None and not shutil.which("unshare"):
        why = "unshare (util-linux) missing"
    return why


class OpenSMTPD:
    def __init__(self, name: str = "opensmtpd", ip: str = "127.0.0.51", *,
                 hostname: str = "smtpd.os.test", domains=("os.test",),
                 cert: tuple[Path, Path], ca: Path | None = None,
                 routes: dict[str, tuple[str, int]] | None = None):
        assert ip.startswith("127."), "loopback only"
        self.name, self.ip, self.hostname = name, ip, hostname
        self.port = free_port(ip)
        self.dir = peers.instance_dir(name)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "smtpd.log"
        self.maildir = self.dir / "mail" / "maildir"
        tls = self.dir / "tls"
        for sub in ("spool", "empty", "run", "mail", "tls"):
            (self.dir / sub).mkdir()
        (self.dir / "spool").chmod(0o711)
        nobody = pwd.getpwnam("nobody")
        os.chown(self.dir / "mail", nobody.pw_uid, nobody.pw_gid)
        shutil.copy(cert[0], tls / "server.pem")
        shutil.copy(cert[1], tls / "server.key")
        (tls / "server.key").chmod(0o600)
        if ca is not None:
            shutil.copy(ca, tls / "ca.pem")
        helper = peers.PEER_ROOT / MAILDIR_HELPER
        lines = [
            "# a private test instance written by tests/e2e/opensmtpd.py",
            f'pki {hostname} cert "{tls / "server.pem"}"',
            f'pki {hostname} key "{tls / "server.key"}"',
        ]
        if ca is not None:
            lines.append(f'ca {hostname} cert "{tls / "ca.pem"}"')
        lines += [
            f"listen on {ip} port {self.port} tls pki {hostname} hostname {hostname}",
            # every recipient of `domains` is the system user nobody (virtual), who delivers
            "table virt { " + ", ".join(f'"@{d}" = "nobody"' for d in domains) + " }",
            f'action "local" mda "{helper} {self.maildir}" virtual <virt> user nobody',
        ]
        matches = [f'match from any for domain {{ {", ".join(domains)} }} action "local"']
        for i, (dom, (hip, hport)) in enumerate((routes or {}).items()):
            assert hip.startswith("127.")
            verify = "tls" if ca is not None else "tls no-verify"
            lines.append(f'action "relay{i}" relay host "smtp+tls://{hip}:{hport}" {verify} '
                         f'src {ip} helo {hostname}' + (f" pki {hostname}" if ca else ""))
            matches.append(f'match from any for domain "{dom}" action "relay{i}"')
        self.conf = self.dir / "smtpd.conf"
        self.conf.write_text("\n".join(lines + matches) + "\n")

    def start(self, timeout: float = 20.0) -> "OpenSMTPD":
        binds = " && ".join(f'mount --bind "{self.dir / k}" "{v}"' for k, v in MOUNTS.items())
        # (a key that is an absolute path stays itself: self.dir / "/abs" is "/abs")
        script = f'{binds} && exec "{peers.PEER_ROOT / SMTPD}" -d -f "{self.conf}"'
        for v in MOUNTS.values():
            if not os.path.isdir(v):
                os.makedirs(v, exist_ok=True)  # a mount point only
        check = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                script.replace(" -d -f ", " -n -f ")],
                               capture_output=True, text=True, timeout=30, env=peers.env())
        if check.returncode != 0:
            pytest.fail(f"{self.name}: `smtpd -n -f {self.conf}` failed:\n{check.stdout}{check.stderr}")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=peers.env(), cwd=self.dir, start_new_session=True)
        log.close()

        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name}: smtpd exited ({self.proc.returncode}):\n{self.log()}")
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

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match:
        rx = re.compile(pattern, re.M)
        return wait_until(lambda: rx.search(self.log()), timeout, f"{self.name} log line /{pattern}/")

    def messages(self) -> dict[str, bytes]:
        return maildir_messages(self.maildir)

    def wait_message_with(self, marker: bytes, timeout: float = 20.0) -> bytes:
        def find():
            for v in self.messages().values():
                if marker in v:
                    return v
            return None

        return wait_until(find, timeout, f"a message with {marker!r} in {self.name}'s Maildir")
