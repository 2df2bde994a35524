"""A private OpenLDAP server (slapd) as a real authentication backend for the end-to-end tests.

`Slapd` writes its own `slapd.conf` (no cn=config, nothing under /etc/ldap is read except the
schema files core, cosine and inetorgperson) and an mdb database directory into a directory
under the test's temp dir, and runs `slapd -d stats -f slapd.conf -h "ldap://IP:P1/
ldaps://IP:P2/"` in the foreground (`-d` keeps it from forking; the stats log, one line per
operation, goes to `slapd.log` in that directory). It runs as the calling user (root in the
tests: every file it opens is under the 0700 temp dir).

The instance:

- listens on one 127.0.0.x address only (default 127.0.0.21), plain LDAP with StartTLS on one
  free port, LDAPS on another; TLS with a certificate from `pki.py` for `ldap.test` and the IP
  (made from a CA of its own when the caller gives none);
- holds the suffix `dc=a,dc=test`, the root DN `cn=admin,dc=a,dc=test` (`ROOT_PW`), the
  suffix entry, the `ou=people` branch and the users in `USERS` (uid, mail, userPassword stored as {SSHA}),
  among them `carl+lists`, whose DN needs RFC 4514 escaping (`uid=carl\\+lists,...`);
- lets a user bind with its password (`by anonymous auth`), never read another's.

`start()` waits until the root DN can bind over LDAPS (checking the certificate against the CA
with `ldapwhoami`), adds the entries with `ldapadd -ZZ` (StartTLS on the plain port) and waits
until `alice` can bind over LDAPS; a failure shows slapd's log. `stop()` sends SIGTERM and waits
(bounded; SIGKILL by pid after). Network rule: only 127.0.0.0/8 is ever used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness import free_port
from pki import make_ca, make_leaf

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
LDAPWHOAMI = shutil.which("ldapwhoami") or "/usr/bin/ldapwhoami"
LDAPADD = shutil.which("ldapadd") or "/usr/bin/ldapadd"
SLAPPASSWD = shutil.which("slappasswd") or "/usr/sbin/slappasswd"
MODULE_DIR = Path("/usr/lib/ldap")
SCHEMA_DIR = Path("/etc/ldap/schema")

SUFFIX = "dc=a,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root-secret-9f2c"

# uid, mail, password, the entry's DN (RFC 4514)
USERS = [
    ("alice", "alice@a.test", "alice-secret", f"uid=alice,{PEOPLE}"),
    ("bob", "bob@a.test", "bob-secret", f"uid=bob,{PEOPLE}"),
    ("carl+lists", "carl+lists@a.test", "carl-secret", f"uid=carl\\+lists,{PEOPLE}"),
]


def unavailable() -> str | None:
    """Why the tests cannot run a slapd (None if they can)."""
    for what, path in (("slapd", SLAPD), ("ldapwhoami", LDAPWHOAMI), ("ldapadd", LDAPADD),
                       ("slappasswd", SLAPPASSWD)):
        if not os.access(path, os.X_OK):
            return f"{what} not installed (tests/run installs the slapd and ldap-utils packages)"
    if not list(MODULE_DIR.glob("back_mdb*.so*")):
        return f"no back_mdb module in {MODULE_DIR}"
    for s in ("core", "cosine", "inetorgperson"):
        if not (SCHEMA_DIR / f"{s}.schema").exists():
            return f"{SCHEMA_DIR}/{s}.schema missing"
    return None


def available() -> bool:
    return unavailable() is None


def version() -> str:
    try:
        out = subprocess.run([SLAPD, "-VV"], capture_output=True, text=True, timeout=10)
        return (out.stderr or out.stdout).splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def _ldif_value(v: str) -> str:
    return v  # the test values are plain ASCII without leading/trailing specials


class Slapd:
    """One private slapd (see the module doc)."""

    def __init__(
        self,
        workdir: Path,
        name: str = "slapd",
        ip: str = "127.0.0.21",
        *,
        cert: tuple[Path, Path] | None = None,
        ca: Path | None = None,
        tls_name: str = "ldap.test",
        users=USERS,
    ):
        assert ip.startswith("127."), "loopback only"
        assert (cert is None) == (ca is None), "give cert and ca together (or neither)"
        self.name = name
        self.ip = ip
        self.port = free_port(ip)
        self.tls_port = free_port(ip)
        self.dir = workdir / name
        self.db = self.dir / "db"
        self.log_path = self.dir / "slapd.log"
        self.users = list(users)
        self.tls_name = tls_name
        self.proc: subprocess.Popen | None = None
        self.db.mkdir(parents=True, exist_ok=True)
        if cert is None:
            pki_dir = self.dir / "pki"
            pki_dir.mkdir(exist_ok=True)
            ca = make_ca(pki_dir, "ldap-ca")
            cert = make_leaf(pki_dir, "ldap-ca", "ldap", tls_name, usage="serverAuth",
                             sans=[tls_name, ip])
        self.ca_pem = Path(ca)
        self.cert = cert
        self.conf = self.dir / "slapd.conf"
        self.conf.write_text(self._conf_text())

    def _conf_text(self) -> str:
        d = self.dir
        return "\n".join([
            "# a private test instance written by tests/e2e/slapd.py",
            f"include {SCHEMA_DIR}/core.schema",
            f"include {SCHEMA_DIR}/cosine.schema",
            f"include {SCHEMA_DIR}/inetorgperson.schema",
            f"modulepath {MODULE_DIR}",
            "moduleload back_mdb",
            f"pidfile {d}/slapd.pid",
            f"argsfile {d}/slapd.args",
            f"TLSCACertificateFile {self.ca_pem}",
            f"TLSCertificateFile {self.cert[0]}",
            f"TLSCertificateKeyFile {self.cert[1]}",
            "TLSVerifyClient never",
            "",
            "database mdb",
            f'suffix "{SUFFIX}"',
            f'rootdn "{ROOT_DN}"',
            f"rootpw {ROOT_PW}",
            f"directory {self.db}",
            "maxsize 16777216",
            "index objectClass eq",
            "index uid,mail eq",
            "access to attrs=userPassword by self write by anonymous auth by * none",
            "access to * by * read",
            "",
        ])

    # --- URLs

    @property
    def ldap_url(self) -> str:
        """Plain LDAP (StartTLS) URL, `ldap://IP:PORT`."""
        return f"ldap://{self.ip}:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.ip}:{self.tls_port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.ip, self.port)

    @property
    def tls_addr(self) -> tuple[str, int]:
        return (self.ip, self.tls_port)

    def dn(self, uid: str) -> str:
        for u, _, _, dn in self.users:
            if u == uid:
                return dn
        raise KeyError(uid)

    # --- client tools

    def _env(self) -> dict:
        env = dict(os.environ)
        # no ldap.conf or ldaprc of the machine (LDAPNOINIT would drop these variables too)
        env.pop("LDAPNOINIT", None)
        env.update({"LDAPTLS_CACERT": str(self.ca_pem), "LDAPTLS_REQCERT": "demand",
                    "LDAPCONF": "/dev/null", "LDAPRC": "/dev/null"})
        return env

    def whoami(self, dn: str, password: str, url: str | None = None, starttls: bool = False,
               timeout: float = 10) -> subprocess.CompletedProcess:
        """`ldapwhoami -x` as `dn`; returncode 0 = bound, 49 = invalid credentials."""
        args = [LDAPWHOAMI, "-x", "-H", url or self.ldaps_url, "-D", dn, "-w", password,
                "-o", "nettimeout=5"]
        if starttls:
            args.append("-ZZ")
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=self._env())

    def _ldif(self) -> str:
        out = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
               "dc: a\no: Sealgate Test A\n",
               f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n"]
        for uid, mail, password, dn in self.users:
            hashed = subprocess.run([SLAPPASSWD, "-h", "{SSHA}", "-s", password],
                                    capture_output=True, text=True, timeout=10,
                                    check=True).stdout.strip()
            out.append(
                f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {_ldif_value(uid)}\n"
                f"cn: {_ldif_value(uid)}\nsn: {_ldif_value(uid)}\nmail: {mail}\n"
                f"userPassword: {hashed}\n"
            )
        return "\n".join(out)

    # --- process control

    def start(self, timeout: float = 20.0) -> "Slapd":
        assert self.proc is None, "already running"
        why = unavailable()
        if why:
            pytest.fail(why)
        urls = f"{self.ldap_url}/ {self.ldaps_url}/"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [SLAPD, "-d", "stats", "-f", str(self.conf), "-h", urls],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.dir,
                start_new_session=True,
            )
        try:
            self._wait(lambda: self.whoami(ROOT_DN, ROOT_PW).returncode == 0, timeout,
                       "the root DN to bind over LDAPS")
            # the entries, over StartTLS on the plain port (the CA checked)
            p = subprocess.run(
                [LDAPADD, "-x", "-ZZ", "-H", self.ldap_url, "-D", ROOT_DN, "-w", ROOT_PW],
                input=self._ldif(), capture_output=True, text=True, timeout=30, env=self._env(),
            )
            if p.returncode != 0:
                raise RuntimeError(f"ldapadd failed ({p.returncode}): {p.stdout}{p.stderr}")
            uid, _, password, dn = self.users[0]
            self._wait(lambda: self.whoami(dn, password).returncode == 0, timeout,
                       f"{uid} to bind over LDAPS")
        except Exception as e:  # noqa: BLE001 - stop, then fail with the log
            self.stop()
            pytest.fail(f"{self.name}: {e}\nslapd log:\n{self.log()[-3000:]}")
        return self

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited ({self.proc.returncode if self.proc else '?'})"
                                   f" while waiting for {what}")
            try:
                if cond():
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.1)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL (by pid) if it has not exited in time. Safe twice."""
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

    # --- observation

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def binds(self, dn: str | None = None) -> list[str]:
        """The BIND lines of the stats log (optionally only those for `dn`, case-insensitive)."""
        out = []
        for line in self.log().splitlines():
            if " BIND dn=" in line and (dn is None or f'dn="{dn.lower()}"' in line.lower()):
                out.append(line)
        return out
