"""A real DNSSEC-signed world on loopback for the DANE tests: a root zone `.` signed with
ldns-keygen/ldns-signzone (ECDSA P-256, a key-signing and a zone-signing key, NSEC) and served,
with an unsigned child zone delegated from it without a DS record, by one private `nsd` on a
127.0.0.x address.

- `SignedWorld(workdir, ip)`: `add(name, type, rdata)` records of the signed root zone (names
  under any label: the root zone holds them itself, no delegation needed), `add_insecure(...)`
  those of the unsigned child zone `insecure.test`, `tamper(name, type)` marks an RRset whose
  data is changed after signing (its RRSIG then no longer verifies: bogus). `start()` signs
  and starts nsd (`nsd -d`, its own config: no chroot, no database, no user switch, no remote
  control), waiting until it answers a TLSA query; `stop()` ends it (SIGTERM, then SIGKILL).
- `trust_anchor`: the key-signing key's DNSKEY record (the `.key` file ldns-keygen wrote), the
  text a gateway's `dns.trust_anchor` takes. `resolver`: `IP:PORT` for `dns.resolver`.
- `tlsa_311(cert_pem)` etc.: TLSA data of a certificate (SHA-256 of its SPKI or of the whole
  certificate, or the certificate itself).

Skipped (by the tests) when nsd or ldnsutils is not installed (`unavailable()`); tests/run
installs both. Network rule: only 127.0.0.0/8 is ever used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from harness import free_port
from pki import der_of

NSD = shutil.which("nsd") or "/usr/sbin/nsd"
KEYGEN = shutil.which("ldns-keygen") or "/usr/bin/ldns-keygen"
SIGNZONE = shutil.which("ldns-signzone") or "/usr/bin/ldns-signzone"


def unavailable() -> str | None:
    for what, path in (("nsd", NSD), ("ldns-keygen", KEYGEN), ("ldns-signzone", SIGNZONE)):
        if not os.access(path, os.X_OK):
            return f"{what} not installed (tests/run installs the nsd and ldnsutils packages)"
    return None


def spki_der(cert_pem: Path) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a certificate, as openssl extracts it."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert_pem), "-noout", "-pubkey"],
                         capture_output=True, check=True).stdout
    return subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub,
                          capture_output=True, check=True).stdout


def tlsa(usage: int, selector: int, matching: int, cert_pem: Path) -> str:
    """The RDATA text of a TLSA record for `cert_pem` (`3 1 1 <hex>`)."""
    data = der_of(cert_pem) if selector == 0 else spki_der(cert_pem)
    if matching == 1:
        data = hashlib.sha256(data).digest()
    elif matching == 2:
        data = hashlib.sha512(data).digest()
    return f"{usage} {selector} {matching} {data.hex()}"


INSECURE_ZONE = "insecure.test."


class SignedWorld:
    def __init__(self, workdir: Path, ip: str = "127.0.0.50"):
        assert ip.startswith("127."), "loopback only"
        self.ip = ip
        self.port = free_port(ip)
        self.dir = workdir / "nsd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root: list[tuple[str, str, str]] = []
        self.insecure: list[tuple[str, str, str]] = []
        self.tampered: list[tuple[str, str]] = []
        self.proc: subprocess.Popen | None = None
        self.trust_anchor = ""

    @property
    def resolver(self) -> str:
        return f"{self.ip}:{self.port}"

    def add(self, name: str, rtype: str, rdata: str) -> None:
        self.root.append((fqdn(name), rtype, rdata))

    def add_insecure(self, name: str, rtype: str, rdata: str) -> None:
        assert fqdn(name).endswith(INSECURE_ZONE), name
        self.insecure.append((fqdn(name), rtype, rdata))

    def tamper(self, name: str, rtype: str) -> None:
        self.tampered.append((fqdn(name), rtype))

    # --- zones

    def _zone(self, apex: str, records) -> str:
        head = [
            "$TTL 300",
            f"{apex} IN SOA ns.{apex.lstrip('.') or 'root.'} hostmaster.{apex.lstrip('.') or 'root.'} 1 3600 600 86400 300",
            f"{apex} IN NS ns.{apex.lstrip('.') or 'root.'}",
            f"ns.{apex.lstrip('.') or 'root.'} IN A {self.ip}",
        ]
        return "\n".join(head + [f"{n} 300 IN {t} {d}" for n, t, d in records]) + "\n"

    def _sign_root(self) -> Path:
        d = self.dir
        for f in d.glob("K*"):
            f.unlink()
        ksk = subprocess.run([KEYGEN, "-k", "-a", "ECDSAP256SHA256", "."], cwd=d,
                             capture_output=True, text=True, check=True).stdout.strip()
        zsk = subprocess.run([KEYGEN, "-a", "ECDSAP256SHA256", "."], cwd=d,
                             capture_output=True, text=True, check=True).stdout.strip()
        self.trust_anchor = (d / f"{ksk}.key").read_text()
        delegation = [(INSECURE_ZONE, "NS", f"ns.{INSECURE_ZONE}"),
                      (f"ns.{INSECURE_ZONE}", "A", self.ip)]
        (d / "root.zone").write_text(self._zone(".", self.root + delegation))
        subprocess.run([SIGNZONE, "-o", ".", "root.zone", zsk, ksk], cwd=d, check=True,
                       capture_output=True)
        signed = d / "root.zone.signed"
        signed.write_text(self._tampered(signed.read_text()))
        return signed

    def _tampered(self, text: str) -> str:
        """Changes the last hex digit of the data of each tampered RRset (TLSA, say)."""
        out = []
        for line in text.splitlines():
            f = line.split("\t")
            if len(f) >= 5 and (f[0], f[3]) in self.tampered:
                data = f[4]
                f[4] = data[:-1] + ("e" if data[-1] == "f" else "f")
                line = "\t".join(f)
            out.append(line)
        return "\n".join(out) + "\n"

    def _conf(self, signed: Path) -> Path:
        d = self.dir
        conf = d / "nsd.conf"
        conf.write_text("\n".join([
            "server:",
            f"  ip-address: {self.ip}@{self.port}",
            '  database: ""',
            '  username: ""',
            '  chroot: ""',
            f'  zonesdir: "{d}"',
            f'  pidfile: "{d}/nsd.pid"',
            f'  xfrdfile: "{d}/xfrd.state"',
            f'  zonelistfile: "{d}/zone.list"',
            f'  logfile: "{d}/nsd.log"',
            "  server-count: 1",
            "  verbosity: 1",
            "remote-control:",
            "  control-enable: no",
            "zone:",
            '  name: "."',
            f'  zonefile: "{signed.name}"',
            "zone:",
            f'  name: "{INSECURE_ZONE}"',
            '  zonefile: "insecure.zone"',
        ]) + "\n")
        return conf

    # --- the server

    def start(self, timeout: float = 20.0) -> "SignedWorld":
        signed = self._sign_root()
        (self.dir / "insecure.zone").write_text(self._zone(INSECURE_ZONE, self.insecure))
        conf = self._conf(signed)
        self.out = open(self.dir / "nsd.out", "wb")
        self.proc = subprocess.Popen([NSD, "-d", "-c", str(conf)], stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nsd exited ({self.proc.returncode}): {self.log()}")
            if self._answers():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"nsd did not answer within {timeout} s: {self.log()}")

    def _answers(self) -> bool:
        """One UDP query for `. SOA`; True on any answer."""
        q = struct.pack(">HHHHHH", 0x5EA1, 0, 1, 0, 0, 0) + b"\x00" + struct.pack(">HH", 6, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            try:
                s.sendto(q, (self.ip, self.port))
                return s.recv(4096)[:2] == q[:2]
            except OSError:
                return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc:
            self.out.close()

    def log(self) -> str:
        parts = []
        for f in ("nsd.out", "nsd.log"):
            p = self.dir / f
            if p.exists():
                parts.append(p.read_text(errors="replace")[-4000:])
        return "\n".join(parts)


def fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."
