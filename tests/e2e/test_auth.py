"""SMTP AUTH (F-AUTH): mail clients log in on the submission and implicit-TLS listeners, and
each login is checked by a real server over TLS whose certificate is verified.

Backends, one each for the module (started once): a private slapd (slapd.py) on 127.0.0.21
with LDAPS and LDAP + StartTLS, a private Dovecot (dovecot.py) on 127.0.0.22 with IMAPS,
IMAP + STARTTLS, POP3S and POP3 + STLS, and a second Sealgate on 127.0.0.24 (the `smtp` kind:
its own submission and implicit-TLS listeners, checking logins against the slapd). Their
certificates come from the module's test CA (`test-ca`, carried by every gateway as a
`[[tls.ca]]` file); `other-ca` makes the impostors' certificates.

- The main gateway (127.0.0.1; port-25 style, implicit-TLS and submission listeners; no trusted
  network) has one backend per kind and TLS flavour, each for its own login domain; swaks logs
  in with AUTH PLAIN and LOGIN (STARTTLS on submission, TLS on connect on implicit TLS): the
  right password gets `235` and the message is relayed to a foreign domain (a Maildir route,
  `Received: ... with ESMTPSA`), a wrong one `535 5.7.8`. Python's smtplib logs in too.
- Submission rules (no AUTH before STARTTLS: `538 5.7.11`, MAIL before AUTH `530 5.7.0`), relay
  control (unauthenticated: `554 5.7.1`), sender binding (`553 5.7.1`), the AUTH dialog
  (cancel, bad base64, unknown mechanism, second AUTH, empty password, unknown domain), an LDAP
  user whose DN needs RFC 4514 escaping.
- Backends that cannot be trusted or reached give `454 4.7.0` and never see a password: a
  closed port, a server that accepts and never answers (`timeout = "2s"`), an impostor with a
  certificate from another CA, the right server under a name its certificate does not carry,
  and men in the middle that refuse the TLS upgrade (LDAP StartTLS, IMAP STARTTLS, POP3 STLS,
  SMTP STARTTLS) — every byte the gateway sent them is recorded and searched for the password,
  its base64 forms, the login and the bind DN.
- Through plain TCP relays that record every byte, logins over LDAP StartTLS, IMAP STARTTLS,
  POP3 STLS and SMTP STARTTLS succeed, and nothing secret crosses in the clear.
- Successes are cached for `cache_ttl` (keyed on the password: a wrong one is never answered
  from the cache) and not longer; failures are throttled: 50 wrong passwords from one address
  take at least the configured delays and end locked out (`454 4.7.0`), while the same user
  still logs in from another address.
- The logs name the user (`auth accepted user=...`) and never contain a password.

Skipped only when slapd or Dovecot is not installed (tests/run installs them); a backend or a
gateway that does not start fails the tests. Network rule: only 127.0.0.0/8 is ever used.
"""

from __future__ import annotations

import base64
import re
import select
import smtplib
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import dovecot as dovecot_mod
import slapd as slapd_mod
from clients import marker
from harness import (
    BIN,
    Gateway,
    GatewayFactory,
    Raw,
    Reply,
    _table,
    free_port,
    insecure_context,
    make_config,
    message,
    received_headers,
    send_raw_message,
)
from netserver import ThreadedServer
from pki import Leaf, Spec
from tlsproxy import TlsProxy

_why = slapd_mod.unavailable() or dovecot_mod.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"authentication backends: {_why}")

GW_IP = "127.0.0.1"  # the gateways under test; clients connect from here
OTHER_CLIENT = "127.0.0.2"  # a second client address
LDAP_IP = "127.0.0.21"
MAIL_IP = "127.0.0.22"
RELAY_IP = "127.0.0.23"  # the recording relays
SMTPB_IP = "127.0.0.24"  # the Sealgate that is the `smtp` backend
TRAP_IP = "127.0.0.25"  # impostors, hanging and stripping servers

PKI = Spec(
    cas=("test-ca", "other-ca"),
    leaves={
        "ldap": Leaf("test-ca", "ldap", "ldap.test", usage="serverAuth", sans=("ldap.test", LDAP_IP)),
        "mail": Leaf("test-ca", "mail", "mail.test", usage="serverAuth", sans=("mail.test", MAIL_IP)),
        "smtpb": Leaf("test-ca", "smtpb", "smtp.test", usage="serverAuth",
                      sans=("smtp.test", SMTPB_IP)),
        "gw": Leaf("test-ca", "gw", "gw.test", usage="serverAuth", sans=("gw.test", GW_IP)),
        # an impostor: the right names, the wrong CA
        "rogue": Leaf("other-ca", "rogue", "ldap.test", usage="serverAuth",
                      sans=("ldap.test", "mail.test", TRAP_IP)),
    },
    scope="module",
)

DN_TEMPLATE = "uid={user},ou=people,dc=a,dc=test"

# every password this module sends: no gateway log may ever contain one
PASSWORDS: set[str] = {"alice-secret", "bob-secret", "carl-secret", "carol-secret", "dave-secret"}

# throttling that stays out of the way of the tests that do not measure it: wrong passwords
# are answered at once and never lock anyone out
NO_THROTTLE = {"fail_delay": "0s", "max_fail_delay": "0s", "lockout_after": 1000}


# --- small helpers ---------------------------------------------------------------------------


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def wrong(tag: str) -> str:
    pw = f"wrong-{tag}-{marker('pw')}"
    PASSWORDS.add(pw)
    return pw


def hp(addr: tuple[str, int]) -> str:
    return "%s:%d" % addr


def secret_forms(login: str, password: str, dn: str | None = None) -> list[bytes]:
    """What must never cross a network in the clear for this login: the password and its
    base64 (alone and as the SASL PLAIN message), the login and its local part, the bind DN."""
    local = login.partition("@")[0]
    out = [password.encode(), b64(password).encode(), b64(f"\0{login}\0{password}").encode(),
           b64(f"\0{local}\0{password}").encode(), login.encode(), local.encode(),
           b64(login).encode()]
    if dn:
        out.append(dn.encode())
    return out


def assert_no_secrets(data: bytes, forms: list[bytes], where: str) -> None:
    for f in forms:
        assert f not in data, f"{f!r} crossed in the clear ({where}): {data[:2000]!r}"


def assert_log_clean(gw: Gateway) -> None:
    log = gw.log()
    for pw in PASSWORDS:
        assert pw not in log, f"{gw.name}'s log contains the password {pw!r}"
        assert b64(pw) not in log, f"{gw.name}'s log contains base64 of the password {pw!r}"


@dataclass
class AuthGateway:
    """A gateway and its three listeners (the harness's ready-line parser knows only smtp=
    and smtps=, so the addresses are kept from the config)."""

    gw: Gateway
    listen: tuple[str, int]  # port-25 style
    implicit: tuple[str, int]  # implicit TLS (465 style)
    submission: tuple[str, int]  # 587 style

    def log(self) -> str:
        return self.gw.log()


def ca_table(pki) -> str:
    return _table("tls.ca", {"name": "test-ca", "file": str(pki["ca"])}, array=True)


def auth_gateway(factory, name: str, pki, backends: list[dict], *, auth: dict | None = None,
                 ip: str = GW_IP, hostname: str = "gw.test", cert: str = "gw",
                 start: bool = True) -> AuthGateway:
    """A gateway with a port-25 style, an implicit-TLS and a submission listener on `ip`, no
    trusted network, `local.test` delivered into Maildir `local` and the foreign `remote.test`
    routed to Maildir `maildir` (only an authenticated client may relay there), the test CA,
    and `[auth]` = sender binding + no throttling + no cache, updated with `auth`."""
    listen, implicit, sub = [(ip, free_port(ip)) for _ in range(3)]
    cfg = make_config(
        hostname=hostname, listen=[hp(listen)], implicit_tls=[hp(implicit)],
        local_domains=["local.test"], trusted_networks=[],
        routes=[{"domain": "local.test", "maildir": "local"},
                {"domain": "remote.test", "maildir": "maildir"}],
        smtp={"submission": [hp(sub)]},
        certificates=[{"name": "default", "cert_file": str(pki[cert][0]),
                       "key_file": str(pki[cert][1])}],
    )
    cfg += ca_table(pki)
    a = {"sender_must_match": True, "cache_ttl": "0s", **NO_THROTTLE}
    a.update(auth or {})
    cfg += _table("auth", a)
    for b in backends:
        cfg += _table("auth.backend", b, array=True)
    return AuthGateway(factory(name, cfg, start=start), listen, implicit, sub)


def ldap_backend(name: str, url: str, domains: list[str], **kw) -> dict:
    b = {"name": name, "kind": "ldap", "url": url, "ca": "test-ca", "tls_name": "ldap.test",
         "domains": domains, "bind_dn": DN_TEMPLATE}
    b.update(kw)
    return b


def backend(name: str, kind: str, url: str, domains: list[str], **kw) -> dict:
    b = {"name": name, "kind": kind, "url": url, "ca": "test-ca", "domains": domains}
    b.update(kw)
    return b


# --- SMTP sessions ---------------------------------------------------------------------------


def session(addr, tls: str = "starttls", source: str = GW_IP, timeout: float = 30.0) -> Raw:
    """A session after EHLO under TLS: `starttls` (EHLO, STARTTLS, EHLO) or `implicit` (TLS
    from the first byte). The last EHLO reply is `r.ehlo`."""
    if tls == "implicit":
        r = Raw(addr, source=source, greet=False, timeout=timeout)
        r.starttls(insecure_context())
        r.greeting = r.reply()
        assert r.greeting.code == 220, r.greeting
    else:
        r = Raw(addr, source=source, timeout=timeout)
        r.expect("EHLO client.test", 250)
        r.expect("STARTTLS", 220)
        r.starttls(insecure_context())
    r.ehlo = r.expect("EHLO client.test", 250)
    return r


def auth_plain(r: Raw, login: str, password: str, initial: bool = True) -> Reply:
    blob = b64(f"\0{login}\0{password}")
    if initial:
        return r.cmd(f"AUTH PLAIN {blob}")
    rep = r.cmd("AUTH PLAIN")
    if rep.code != 334:
        return rep
    assert rep.text.rstrip() == "334", rep
    return r.cmd(blob)


def auth_login(r: Raw, login: str, password: str) -> Reply:
    rep = r.cmd("AUTH LOGIN")
    if rep.code != 334:
        return rep
    assert rep.text == "334 VXNlcm5hbWU6", rep
    rep = r.cmd(b64(login))
    if rep.code != 334:
        return rep
    assert rep.text == "334 UGFzc3dvcmQ6", rep
    return r.cmd(b64(password))


def login_once(addr, login: str, password: str, *, tls: str = "starttls", mech: str = "PLAIN",
               source: str = GW_IP) -> Reply:
    """One session: TLS, EHLO, AUTH; returns the AUTH reply."""
    r = session(addr, tls, source=source)
    try:
        return (auth_plain if mech == "PLAIN" else auth_login)(r, login, password)
    finally:
        r.close()


def has(rep: Reply, prefix: str) -> bool:
    return rep.text.startswith(prefix)


def ehlo_keywords(rep: Reply) -> list[str]:
    return [l[4:].strip().upper() for l in rep.lines[1:]]


def swaks_auth(addr, login: str, password: str, mech: str, tls: str, mark: str,
               frm: str | None = None, to: str = "rcpt@remote.test",
               source: str = GW_IP) -> tuple[int, str]:
    """swaks with AUTH `mech`, `-tls` (STARTTLS) or `--tlsc` (TLS on connect); returns (exit
    status, transcript)."""
    args = [
        "swaks", "--server", hp(addr), "--local-interface", source,
        "--from", frm or login, "--to", to, "--helo", "client.test",
        "--auth", mech, "--auth-user", login, "--auth-password", password,
        "--header", f"Subject: auth {mark}", "--body", f"body marker {mark}",
        "--timeout", "30",
        "-tls" if tls == "starttls" else "--tlsc",
    ]
    p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
    return p.returncode, p.stdout + p.stderr


def reply_in(transcript: str, code: str) -> bool:
    """True if swaks received a reply starting with `code` (e.g. "235 2.7.0")."""
    return re.search(rf"^\s*<[-~]\*?\s+{re.escape(code)}\b", transcript, re.M) is not None


def top_received(msg: bytes) -> str:
    rec = received_headers(msg)
    assert rec, msg[:500]
    return rec[0]


# --- recording servers -----------------------------------------------------------------------


class Relay(ThreadedServer):
    """A plain TCP relay in front of a real server that records every byte the client sends
    (`client_bytes()`). With `enabled = False` it closes new connections at once (the backend
    looks down; the real server keeps running for the other tests)."""

    kind = "relay"

    def __init__(self, upstream: tuple[str, int], ip: str = RELAY_IP):
        self.upstream = upstream
        self.enabled = True
        self.c2s: list[bytes] = []
        self.sessions = 0
        super().__init__(ip, 0, max_sessions=32, poll=0.1)
        self.start()

    def handle(self, conn, peer):
        if not self.enabled:
            return None
        with self._lock:
            self.sessions += 1
        return lambda: self._splice(conn)

    def _splice(self, c: socket.socket) -> None:
        s = socket.create_connection(self.upstream, timeout=10, source_address=(self.addr[0], 0))
        self.track(s)
        try:
            deadline = time.monotonic() + 60
            while not self.stopping and time.monotonic() < deadline:
                r, _, _ = select.select([c, s], [], [], 0.1)
                for sock in r:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is c:
                        with self._lock:
                            self.c2s.append(data)
                        s.sendall(data)
                    else:
                        c.sendall(data)
        except OSError:
            return
        finally:
            s.close()
            self.untrack(s)

    def client_bytes(self) -> bytes:
        with self._lock:
            return b"".join(self.c2s)

    def reset(self) -> None:
        with self._lock:
            self.c2s.clear()
            self.sessions = 0


def _ber_len(buf: bytes, i: int) -> tuple[int, int] | None:
    """(length, offset of the content) of the BER length at `buf[i]`, None if incomplete."""
    if i >= len(buf):
        return None
    first = buf[i]
    if first < 0x80:
        return first, i + 1
    n = first & 0x7F
    if i + 1 + n > len(buf):
        return None
    return int.from_bytes(buf[i + 1:i + 1 + n], "big"), i + 1 + n


def _ldap_message(buf: bytes) -> tuple[bytes, int, bytes, bytes] | None:
    """(message id bytes, protocol op tag, the message, rest of the buffer) of the first
    complete LDAP message in `buf`, None if there is none yet."""
    if not buf or buf[0] != 0x30:
        return None
    ln = _ber_len(buf, 1)
    if ln is None or ln[1] + ln[0] > len(buf):
        return None
    body, rest = buf[ln[1]:ln[1] + ln[0]], buf[ln[1] + ln[0]:]
    idl = _ber_len(body, 1)
    if body[:1] != b"\x02" or idl is None:
        return None
    msgid = body[idl[1]:idl[1] + idl[0]]
    op = body[idl[1] + idl[0]]
    return msgid, op, buf[:ln[1] + ln[0]], rest


def _ldap_result(msgid: bytes, op_tag: int, code: int) -> bytes:
    """An LDAPResult response (resultCode `code`, empty matchedDN and message)."""
    res = bytes([0x0A, 0x01, code, 0x04, 0x00, 0x04, 0x00])
    body = bytes([0x02, len(msgid)]) + msgid + bytes([op_tag, len(res)]) + res
    return bytes([0x30, len(body)]) + body


STARTTLS_OID = b"1.3.6.1.4.1.1466.20037"


class Trap(ThreadedServer):
    """A backend that must never get a password, on TRAP_IP. Records every byte the gateway
    sends (`client_bytes()`: in plaintext, or decrypted once TLS is up) and what happened
    (`events`). Modes:

    - ``hang``: accepts and never answers;
    - ``tls``: a TLS server with `cert` (an impostor: the gateway must abort the handshake;
      with TLS 1.3 the server's side of the handshake completes before the client has checked
      the certificate, so what counts is that nothing is ever decrypted); after a handshake it
      sends `greeting` and records the decrypted bytes;
    - ``strip-ldap``: answers the StartTLS extended operation with protocolError, binds with
      invalidCredentials; ``strip-imap``: a greeting without STARTTLS, `BAD` to STARTTLS;
      ``strip-pop3``: no STLS in CAPA, `-ERR` to STLS — a man in the middle that refuses the
      upgrade, so that a gateway that carried on would log in in the clear.
    """

    kind = "trap"

    def __init__(self, mode: str, *, cert: tuple[Path, Path] | None = None,
                 greeting: bytes = b""):
        assert mode in ("hang", "tls", "strip-ldap", "strip-imap", "strip-pop3"), mode
        self.mode = mode
        self.cert = cert
        self.greeting = greeting
        self.data: list[bytes] = []
        self.events: list[str] = []
        super().__init__(TRAP_IP, 0, max_sessions=16, poll=0.1)
        self.start()

    @property
    def port(self) -> int:
        return self.addr[1]

    def client_bytes(self) -> bytes:
        with self._lock:
            return b"".join(self.data)

    def reset(self) -> None:
        with self._lock:
            self.data.clear()
            self.events.clear()

    def _event(self, what: str) -> None:
        with self._lock:
            self.events.append(what)

    def handle(self, conn, peer):
        return lambda: self._session(conn)

    def _recv(self, sock) -> bytes:
        """Bytes from the client (recorded); b"" at EOF, at close() or after 30 s."""
        sock.settimeout(0.2)
        deadline = time.monotonic() + 30
        while not self.stopping and time.monotonic() < deadline:
            try:
                d = sock.recv(65536)
            except (socket.timeout, TimeoutError, ssl.SSLWantReadError):
                continue
            except (OSError, ssl.SSLError):
                return b""
            if d:
                with self._lock:
                    self.data.append(d)
            return d
        return b""

    def _session(self, c: socket.socket) -> None:
        self._event("connect")
        if self.mode == "hang":
            while self._recv(c):
                pass
        elif self.mode == "tls":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
            c.settimeout(10)
            try:
                t = ctx.wrap_socket(c, server_side=True)
            except (ssl.SSLError, OSError) as e:
                self._event(f"handshake failed: {e}")
                return
            self._event("handshake done")
            if self.greeting:
                t.sendall(self.greeting)
            while self._recv(t):
                pass
        elif self.mode == "strip-ldap":
            buf = b""
            while True:
                d = self._recv(c)
                if not d:
                    return
                buf += d
                while (m := _ldap_message(buf)) is not None:
                    msgid, op, msg, buf = m
                    if op == 0x77 and STARTTLS_OID in msg:  # ExtendedRequest: StartTLS
                        self._event("StartTLS refused")
                        c.sendall(_ldap_result(msgid, 0x78, 2))  # protocolError
                    elif op == 0x60:  # BindRequest in the clear
                        self._event("plaintext bind")
                        c.sendall(_ldap_result(msgid, 0x61, 49))
                    elif op == 0x42:  # UnbindRequest
                        return
                    else:
                        c.sendall(_ldap_result(msgid, 0x78, 2))
        elif self.mode == "strip-imap":
            c.sendall(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN] trap ready\r\n")
            buf = b""
            while True:
                d = self._recv(c)
                if not d:
                    return
                buf += d
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    tag, _, rest = line.strip().partition(b" ")
                    cmd = rest.split(b" ")[0].upper()
                    if cmd == b"CAPABILITY":
                        c.sendall(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN\r\n"
                                  + tag + b" OK done\r\n")
                    elif cmd == b"STARTTLS":
                        self._event("STARTTLS refused")
                        c.sendall(tag + b" BAD STARTTLS not here\r\n")
                    elif cmd == b"LOGOUT":
                        c.sendall(b"* BYE\r\n" + tag + b" OK bye\r\n")
                        return
                    else:
                        self._event(f"plaintext {cmd!r}")
                        c.sendall(tag + b" NO no\r\n")
        elif self.mode == "strip-pop3":
            c.sendall(b"+OK trap ready\r\n")
            buf = b""
            while True:
                d = self._recv(c)
                if not d:
                    return
                buf += d
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    cmd = line.strip().split(b" ")[0].upper()
                    if cmd == b"CAPA":
                        c.sendall(b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n")
                    elif cmd == b"STLS":
                        self._event("STLS refused")
                        c.sendall(b"-ERR STLS not here\r\n")
                    elif cmd == b"QUIT":
                        c.sendall(b"+OK bye\r\n")
                        return
                    else:
                        self._event(f"plaintext {cmd!r}")
                        c.sendall(b"-ERR no\r\n")


# --- module fixtures -------------------------------------------------------------------------


class _Reports:
    """What conftest's report hook reads (`.gateways`): the logs of the module's and the
    test's own gateways are attached to a failed test."""

    def __init__(self, *factories: GatewayFactory):
        self.factories = factories

    @property
    def gateways(self) -> list[Gateway]:
        return [g for f in self.factories for g in f.gateways]


@pytest.fixture(scope="module")
def module_gateways(tmp_path_factory):
    f = GatewayFactory(tmp_path_factory.mktemp("auth-gateways"))
    yield f
    problems = f.close()
    for gw in f.gateways:
        assert_log_clean(gw)
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def gateways(tmp_path, request, module_gateways):
    """conftest's fixture, but a failed test shows the module's gateways' logs too."""
    f = GatewayFactory(tmp_path)
    request.node._sealgate = _Reports(f, module_gateways)
    yield f
    problems = f.close()
    for gw in f.gateways:
        assert_log_clean(gw)
    if problems:
        pytest.fail("; ".join(problems))


@dataclass
class Backends:
    slapd: slapd_mod.Slapd
    dovecot: dovecot_mod.Dovecot


@pytest.fixture(scope="module")
def backends(_module_pki, tmp_path_factory):
    pki = _module_pki
    d = tmp_path_factory.mktemp("auth-backends")
    s = slapd_mod.Slapd(d, ip=LDAP_IP, cert=pki["ldap"], ca=pki["ca"])
    dv = dovecot_mod.Dovecot(d, ip=MAIL_IP, cert=pki["mail"], ca=pki["ca"])
    try:
        s.start()
        dv.start()
        yield Backends(s, dv)
    finally:
        dv.stop()
        s.stop()


@pytest.fixture(autouse=True)
def _backend_logs(request, module_gateways, backends):
    """Attaches the module gateways' logs to a failed test and prints the backends' log tails
    (pytest shows them for a failed test only)."""
    request.node._sealgate = _Reports(module_gateways)
    yield
    for name, text in (("slapd", backends.slapd.log()), ("dovecot", backends.dovecot.log())):
        lines = text.splitlines()
        print(f"----- {name} log, last {min(len(lines), 40)} lines")
        print("\n".join(lines[-40:]))


@pytest.fixture(scope="module")
def smtpb(module_gateways, _module_pki, backends):
    return smtp_backend_gateway(module_gateways, _module_pki, backends.slapd)


# backend name on the main gateway -> (login, password)
KINDS = {
    "ldaps": ("alice@a.test", "alice-secret"),
    "ldap-starttls": ("alice@a2.test", "alice-secret"),
    "imaps": ("carol@b.test", "carol-secret"),
    "imap-starttls": ("dave@b2.test", "dave-secret"),
    "pop3s": ("dave@p.test", "dave-secret"),
    "pop3-stls": ("dave@p2.test", "dave-secret"),
    "smtps": ("alice@s.test", "alice-secret"),
    "smtp-starttls": ("alice@s2.test", "alice-secret"),
}


def main_backends(s: slapd_mod.Slapd, dv: dovecot_mod.Dovecot, smtpb: AuthGateway) -> list[dict]:
    """One backend per kind and TLS flavour (KINDS), plus `by-ip` (LDAPS without tls_name: the
    certificate is checked for the URL's IP address). tools/bench/auth measures the same."""
    return [
        ldap_backend("ldaps", s.ldaps_url, ["a.test"]),
        ldap_backend("ldap-starttls", s.ldap_url, ["a2.test"], starttls=True),
        backend("imaps", "imap", dv.url("imaps"), ["b.test"], tls_name="mail.test"),
        backend("imap-starttls", "imap", dv.url("imap"), ["b2.test"], starttls=True,
                tls_name="mail.test", login="{user}"),
        backend("pop3s", "pop3", dv.url("pop3s"), ["p.test"], tls_name="mail.test",
                login="{user}"),
        backend("pop3-stls", "pop3", dv.url("pop3"), ["p2.test"], starttls=True,
                tls_name="mail.test", login="{user}"),
        backend("smtps", "smtp", f"smtps://{hp(smtpb.implicit)}", ["s.test"],
                tls_name="smtp.test"),
        backend("smtp-starttls", "smtp", f"smtp://{hp(smtpb.submission)}", ["s2.test"],
                starttls=True, tls_name="smtp.test"),
        {"name": "by-ip", "kind": "ldap", "url": s.ldaps_url, "ca": "test-ca",
         "domains": ["ip.test"], "bind_dn": DN_TEMPLATE},
    ]


def smtp_backend_gateway(factory, pki, s: slapd_mod.Slapd) -> AuthGateway:
    """The `smtp` backend: a Sealgate on SMTPB_IP (certificate for smtp.test) whose own
    backend for s.test and s2.test is the slapd over LDAPS."""
    return auth_gateway(factory, "smtp-backend", pki,
                        [ldap_backend("dir", s.ldaps_url, ["s.test", "s2.test"])],
                        ip=SMTPB_IP, hostname="smtp.test", cert="smtpb")


@pytest.fixture(scope="module")
def main(module_gateways, _module_pki, backends, smtpb):
    """The gateway under test (main_backends)."""
    return auth_gateway(module_gateways, "main", _module_pki,
                        main_backends(backends.slapd, backends.dovecot, smtpb))


# --- every kind of backend -------------------------------------------------------------------


@pytest.mark.parametrize("mech,listener", [("PLAIN", "submission"), ("LOGIN", "implicit")])
@pytest.mark.parametrize("kind", list(KINDS))
def test_login_accepted_and_relayed(main, kind, mech, listener):
    login, password = KINDS[kind]
    mark = marker(f"{kind}-{mech}")
    addr = main.submission if listener == "submission" else main.implicit
    rc, out = swaks_auth(addr, login, password, mech,
                         "starttls" if listener == "submission" else "implicit", mark)
    assert reply_in(out, "235 2.7.0"), out
    assert rc == 0, out
    msg = main.gw.wait_message_with(mark.encode())
    top = top_received(msg)
    assert re.search(r"\bwith ESMTPSA\b", top), top
    assert password not in msg.decode("utf-8", "replace")
    main.gw.wait_log(rf"auth accepted user={re.escape(login)} backend={re.escape(kind)} "
                     rf"client=127\.0\.0\.1")


@pytest.mark.parametrize("mech,listener", [("LOGIN", "submission"), ("PLAIN", "implicit")])
@pytest.mark.parametrize("kind", list(KINDS))
def test_wrong_password_refused(main, kind, mech, listener):
    login, _ = KINDS[kind]
    mark = marker(f"{kind}-bad")
    addr = main.submission if listener == "submission" else main.implicit
    rc, out = swaks_auth(addr, login, wrong(kind), mech,
                         "starttls" if listener == "submission" else "implicit", mark)
    assert reply_in(out, "535 5.7.8"), out
    assert rc != 0, out
    assert not reply_in(out, "235"), out
    main.gw.wait_log(rf"auth refused user={re.escape(login)} backend={re.escape(kind)} ")
    assert not any(mark.encode() in m for m in main.gw.messages().values())


def test_smtplib_login_plain_and_login(main, _module_pki):
    """Python's smtplib, verifying the gateway's certificate: STARTTLS + PLAIN on submission,
    implicit TLS + LOGIN; a wrong password raises SMTPAuthenticationError 535."""
    ctx = ssl.create_default_context(cafile=str(_module_pki["ca"]))
    mark = marker("smtplib")
    with smtplib.SMTP(*main.submission, local_hostname="client.test", timeout=30,
                      source_address=(GW_IP, 0)) as s:
        s.starttls(context=ctx)  # checks the IP SAN 127.0.0.1
        s.ehlo("client.test")
        assert "PLAIN" in s.esmtp_features.get("auth", "").upper().split()
        s.login("alice@a.test", "alice-secret")  # smtplib picks PLAIN
        s.sendmail("alice@a.test", ["rcpt@remote.test"],
                   message(mark, "alice@a.test", "rcpt@remote.test"))
    assert "with ESMTPSA" in top_received(main.gw.wait_message_with(mark.encode()))

    with smtplib.SMTP_SSL(*main.implicit, local_hostname="client.test", timeout=30,
                          context=ctx, source_address=(GW_IP, 0)) as s:
        s.ehlo("client.test")
        s.user, s.password = "carol@b.test", "carol-secret"
        code, text = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235, text
    with smtplib.SMTP_SSL(*main.implicit, local_hostname="client.test", timeout=30,
                          context=ctx, source_address=(GW_IP, 0)) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("alice@a.test", wrong("smtplib"))
        assert e.value.smtp_code == 535


def test_tls_name_defaults_to_the_url_host(main):
    """`by-ip` has no tls_name: the slapd certificate is checked for 127.0.0.21 (an IP SAN)."""
    assert has(login_once(main.submission, "alice@ip.test", "alice-secret"), "235 2.7.0")


def test_ldap_dn_is_escaped(main, backends):
    """The local part `carl+lists` becomes `uid=carl\\+lists,...` (RFC 4514): the bind
    succeeds; unescaped, `+` would make a multi-valued RDN that names nobody."""
    assert has(login_once(main.submission, "carl+lists@a.test", "carl-secret"), "235 2.7.0")
    binds = [l for l in backends.slapd.log().splitlines()
             if " BIND dn=" in l and "carl" in l.lower()]
    assert binds, "the gateway never bound as carl+lists"
    assert any(re.search(r'dn="uid=carl(\\\+|\\2B)lists,ou=people,dc=a,dc=test"', l, re.I)
               for l in binds), binds


# --- listeners, ordering, relay --------------------------------------------------------------


def test_submission_needs_starttls_then_auth(main):
    r = Raw(main.submission, source=GW_IP)
    try:
        kw = ehlo_keywords(r.expect("EHLO client.test", 250))
        assert "STARTTLS" in kw, kw
        assert not any(k.startswith("AUTH") for k in kw), f"AUTH offered before TLS: {kw}"
        rep = r.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice@a.test' + chr(0) + 'alice-secret')}")
        assert has(rep, "538 5.7.11"), rep
        rep = r.cmd("MAIL FROM:<alice@a.test>")
        assert has(rep, "530 5.7.0"), rep
        r.expect("STARTTLS", 220)
        r.starttls(insecure_context())
        kw = ehlo_keywords(r.expect("EHLO client.test", 250))
        auth = [k for k in kw if k.startswith("AUTH")]
        assert auth and set(auth[0].split()[1:]) == {"PLAIN", "LOGIN"}, kw
        rep = r.cmd("MAIL FROM:<alice@a.test>")
        assert has(rep, "530 5.7.0"), rep
        assert "authentication required" in rep.text.lower(), rep
        assert has(auth_plain(r, "alice@a.test", "alice-secret"), "235 2.7.0")
        r.expect("MAIL FROM:<alice@a.test>", 250)
        r.expect("RCPT TO:<rcpt@remote.test>", 250)
        r.expect("QUIT", 221)
    finally:
        r.close()


def test_implicit_tls_offers_auth_and_port_25_does_not(main):
    r = session(main.implicit, "implicit")
    auth = [k for k in ehlo_keywords(r.ehlo) if k.startswith("AUTH")]
    assert auth and set(auth[0].split()[1:]) == {"PLAIN", "LOGIN"}, r.ehlo
    r.close()
    # smtp.listen without auth.on_listen: no AUTH, in plaintext or under TLS
    r = Raw(main.listen, source=GW_IP)
    try:
        kw = ehlo_keywords(r.expect("EHLO client.test", 250))
        assert not any(k.startswith("AUTH") for k in kw), kw
        assert has(r.cmd(f"AUTH PLAIN {b64(chr(0) + 'a@a.test' + chr(0) + 'x')}"), "502 5.5.1")
        r.expect("STARTTLS", 220)
        r.starttls(insecure_context())
        kw = ehlo_keywords(r.expect("EHLO client.test", 250))
        assert not any(k.startswith("AUTH") for k in kw), kw
        assert has(auth_plain(r, "alice@a.test", "alice-secret"), "502 5.5.1")
    finally:
        r.close()


def test_only_authenticated_clients_relay(main):
    """From the same address: unauthenticated, a foreign domain is refused (port 25 and
    implicit TLS) while local mail is taken; after AUTH the foreign domain is relayed."""
    for addr, tls in ((main.listen, "starttls"), (main.implicit, "implicit")):
        r = session(addr, tls)
        try:
            r.expect("MAIL FROM:<someone@elsewhere.test>", 250)
            rep = r.cmd("RCPT TO:<rcpt@remote.test>")
            assert has(rep, "554 5.7.1"), rep
            r.expect("RCPT TO:<user@local.test>", 250)
            r.expect("RSET", 250)
        finally:
            r.close()
    mark = marker("relay")
    r = session(main.implicit, "implicit")
    try:
        assert has(auth_plain(r, "bob@a.test", "bob-secret"), "235 2.7.0")
        rep = send_raw_message(r, "bob@a.test", ["rcpt@remote.test"],
                               message(mark, "bob@a.test", "rcpt@remote.test"))
        assert rep.code == 250, rep
        r.expect("QUIT", 221)
    finally:
        r.close()
    top = top_received(main.gw.wait_message_with(mark.encode()))
    assert re.search(r"\bwith ESMTPSA\b", top), top


def test_sender_must_match_the_login(main):
    r = session(main.submission)
    try:
        assert has(auth_login(r, "alice@a.test", "alice-secret"), "235 2.7.0")
        rep = r.cmd("MAIL FROM:<bob@a.test>")
        assert has(rep, "553 5.7.1"), rep
        rep = r.cmd("MAIL FROM:<alice@elsewhere.test>")
        assert has(rep, "553 5.7.1"), rep
        r.expect("MAIL FROM:<Alice@A.Test>", 250)  # case-insensitive
        r.expect("RSET", 250)
        r.expect("MAIL FROM:<>", 250)  # the null sender is always allowed
        r.expect("RSET", 250)
        r.expect("MAIL FROM:<alice@a.test>", 250)
        r.expect("RCPT TO:<rcpt@remote.test>", 250)
    finally:
        r.close()


def test_sender_in_the_login_domain(gateways, _module_pki, backends):
    ag = auth_gateway(gateways, "domain-binding", _module_pki,
                      [ldap_backend("dir", backends.slapd.ldaps_url, ["a.test"])],
                      auth={"sender_must_match": "domain"})
    r = session(ag.submission)
    try:
        assert has(auth_plain(r, "alice@a.test", "alice-secret"), "235 2.7.0")
        r.expect("MAIL FROM:<bob@a.test>", 250)
        r.expect("RSET", 250)
        rep = r.cmd("MAIL FROM:<alice@b.test>")
        assert has(rep, "553 5.7.1"), rep
    finally:
        r.close()


def test_auth_on_listen(gateways, _module_pki, backends):
    """auth.on_listen = true: the port-25 style listener offers AUTH under TLS only."""
    ag = auth_gateway(gateways, "on-listen", _module_pki,
                      [ldap_backend("dir", backends.slapd.ldaps_url, ["a.test"])],
                      auth={"on_listen": True})
    r = Raw(ag.listen, source=GW_IP)
    try:
        kw = ehlo_keywords(r.expect("EHLO client.test", 250))
        assert not any(k.startswith("AUTH") for k in kw), kw
        assert has(r.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice@a.test' + chr(0) + 'alice-secret')}"),
                   "538 5.7.11")
        r.expect("STARTTLS", 220)
        r.starttls(insecure_context())
        kw = ehlo_keywords(r.expect("EHLO client.test", 250))
        assert any(k.startswith("AUTH") for k in kw), kw
        assert has(auth_plain(r, "alice@a.test", "alice-secret"), "235 2.7.0")
        r.expect("MAIL FROM:<alice@a.test>", 250)
        r.expect("RCPT TO:<rcpt@remote.test>", 250)
    finally:
        r.close()


def test_auth_dialog_errors(main):
    """Cancel, bad base64, unknown mechanism; then a login still works in the same session."""
    r = session(main.submission)
    try:
        assert has(r.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6")
        assert has(r.cmd("*"), "501 5.0.0")
        assert has(r.cmd("AUTH PLAIN ###not-base64###"), "501 5.5.2")
        assert has(r.cmd("AUTH PLAIN"), "334")
        assert has(r.cmd("*"), "501 5.0.0")
        assert has(r.cmd("AUTH CRAM-MD5"), "504 5.5.4")
        assert has(auth_login(r, "alice@a.test", "alice-secret"), "235 2.7.0")
    finally:
        r.close()


def test_auth_refusals_and_retry(main, backends):
    r = session(main.submission)
    try:
        # a login without a domain, a domain without a backend: refused
        assert has(auth_plain(r, "alice", "alice-secret"), "535 5.7.8")
        assert has(auth_plain(r, "alice@unknown.test", "alice-secret"), "535 5.7.8")
        # an empty password is not PLAIN (RFC 4616: passwd = 1*SAFE): refused without a bind
        before = len(backends.slapd.binds())
        assert has(auth_plain(r, "alice@a.test", ""), "501 5.5.2")
        time.sleep(0.3)
        assert len(backends.slapd.binds()) == before, "an empty password reached the directory"
        # a wrong password, then the right one in the same session (PLAIN without initial
        # response: 334, then the response)
        assert has(auth_plain(r, "alice@a.test", wrong("dialog")), "535 5.7.8")
        assert has(auth_plain(r, "alice@a.test", "alice-secret", initial=False), "235 2.7.0")
        # once per session
        assert has(auth_plain(r, "alice@a.test", "alice-secret"), "503 5.5.1")
    finally:
        r.close()


# --- backends that cannot be reached or trusted ----------------------------------------------


@dataclass
class Broken:
    ag: AuthGateway
    traps: dict
    closed_port: int


# case -> (login domain, trap key or None)
BROKEN = {
    "down": ("down.test", None),
    "hang-ldaps": ("hang.test", "hang"),
    "hang-imap": ("hang2.test", "hang"),
    "impostor-ldaps": ("impostor.test", "impostor-ldaps"),
    "impostor-imaps": ("impostor2.test", "impostor-imaps"),
    "wrong-name": ("wrongname.test", None),
    "strip-ldap": ("strip.test", "strip-ldap"),
    "strip-imap": ("strip2.test", "strip-imap"),
    "strip-pop3": ("strip3.test", "strip-pop3"),
    "strip-smtp": ("strip4.test", "strip-smtp"),
}


@pytest.fixture(scope="module")
def broken(module_gateways, _module_pki, backends, smtpb):
    pki = _module_pki
    traps = {
        "hang": Trap("hang"),
        "impostor-ldaps": Trap("tls", cert=pki["rogue"]),
        "impostor-imaps": Trap("tls", cert=pki["rogue"],
                               greeting=b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n"),
        "strip-ldap": Trap("strip-ldap"),
        "strip-imap": Trap("strip-imap"),
        "strip-pop3": Trap("strip-pop3"),
        "strip-smtp": TlsProxy((TRAP_IP, 0), smtpb.submission, mode="strip"),
    }
    closed = free_port(TRAP_IP)
    t = {k: v.addr[1] for k, v in traps.items()}
    to = {"timeout": "2s"}
    try:
        ag = auth_gateway(module_gateways, "broken", pki, [
            backend("down", "imap", f"imaps://{TRAP_IP}:{closed}", ["down.test"],
                    tls_name="mail.test", **to),
            ldap_backend("hang-ldaps", f"ldaps://{TRAP_IP}:{t['hang']}", ["hang.test"], **to),
            backend("hang-imap", "imap", f"imap://{TRAP_IP}:{t['hang']}", ["hang2.test"],
                    starttls=True, tls_name="mail.test", **to),
            ldap_backend("impostor-ldaps", f"ldaps://{TRAP_IP}:{t['impostor-ldaps']}",
                         ["impostor.test"], **to),
            backend("impostor-imaps", "imap", f"imaps://{TRAP_IP}:{t['impostor-imaps']}",
                    ["impostor2.test"], tls_name="mail.test", **to),
            ldap_backend("wrong-name", backends.slapd.ldaps_url, ["wrongname.test"],
                         tls_name="directory.test", **to),
            ldap_backend("strip-ldap", f"ldap://{TRAP_IP}:{t['strip-ldap']}", ["strip.test"],
                         starttls=True, **to),
            backend("strip-imap", "imap", f"imap://{TRAP_IP}:{t['strip-imap']}",
                    ["strip2.test"], starttls=True, tls_name="mail.test", **to),
            backend("strip-pop3", "pop3", f"pop3://{TRAP_IP}:{t['strip-pop3']}",
                    ["strip3.test"], starttls=True, tls_name="mail.test", **to),
            backend("strip-smtp", "smtp", f"smtp://{TRAP_IP}:{t['strip-smtp']}",
                    ["strip4.test"], starttls=True, tls_name="smtp.test", **to),
        ])
        yield Broken(ag, traps, closed)
    finally:
        for tr in traps.values():
            tr.close()


@pytest.mark.parametrize("case", list(BROKEN))
def test_unavailable_backend_is_a_temporary_failure(broken, backends, case):
    domain, trap_key = BROKEN[case]
    login, password = f"alice@{domain}", "alice-secret"
    trap = broken.traps.get(trap_key) if trap_key else None
    if trap is not None:
        trap.reset()
    binds_before = len(backends.slapd.binds())
    mech = "LOGIN" if case.endswith(("imap", "smtp")) else "PLAIN"
    t0 = time.monotonic()
    rep = login_once(broken.ag.submission, login, password, mech=mech)
    elapsed = time.monotonic() - t0
    assert has(rep, "454 4.7.0"), rep
    broken.ag.gw.wait_log(rf"auth unavailable user={re.escape(login)} backend={re.escape(case)} "
                          rf"client=127\.0\.0\.1 reason=")
    forms = secret_forms(login, password, dn="uid=alice,ou=people")
    if case.startswith("hang"):
        assert elapsed >= 1.5, f"answered after {elapsed:.2f}s, before the 2 s backend timeout"
        assert "connect" in trap.events, trap.events
        assert_no_secrets(trap.client_bytes(), forms, case)
    elif case.startswith("impostor"):
        # the gateway reached the impostor and gave up in the handshake: the impostor never
        # decrypted a byte of it
        assert "connect" in trap.events, trap.events
        assert trap.client_bytes() == b"", trap.client_bytes()
    elif case == "wrong-name":
        time.sleep(0.3)
        assert len(backends.slapd.binds()) == binds_before, "bound despite the wrong name"
    elif case == "strip-smtp":
        # the proxy hid STARTTLS from the EHLO reply: the gateway stops there, before AUTH
        sent = trap.plaintext("c2s")
        assert sent.upper().startswith(b"EHLO"), sent
        assert b"AUTH" not in sent.upper(), sent
        broken.ag.gw.wait_log(r"auth unavailable user=\S+ backend=strip-smtp .*no STARTTLS offered")
        assert_no_secrets(trap.wire("c2s"), forms, case)
    elif case.startswith("strip"):
        assert any("refused" in e for e in trap.events), trap.events
        assert not any(e.startswith("plaintext") for e in trap.events), trap.events
        assert_no_secrets(trap.client_bytes(), forms, case)


# --- nothing in the clear through a recording relay ------------------------------------------


THROUGH = {
    # backend -> (login, password, what the gateway sends to upgrade, the bind DN)
    "ldap": ("alice@a.test", "alice-secret", STARTTLS_OID, "uid=alice,ou=people"),
    "imap": ("carol@b.test", "carol-secret", b"STARTTLS", None),
    "pop3": ("dave@p.test", "dave-secret", b"STLS", None),
    "smtp": ("alice@s.test", "alice-secret", b"STARTTLS", None),
}


@dataclass
class Through:
    ag: AuthGateway
    relays: dict


@pytest.fixture(scope="module")
def through(module_gateways, _module_pki, backends, smtpb):
    s, dv = backends.slapd, backends.dovecot
    relays = {
        "ldap": Relay(s.addr),
        "imap": Relay(dv.imap),
        "pop3": Relay(dv.pop3),
        "smtp": TlsProxy((RELAY_IP, 0), smtpb.submission, mode="pass"),
    }
    r = {k: hp(v.addr) for k, v in relays.items()}
    try:
        ag = auth_gateway(module_gateways, "through", _module_pki, [
            ldap_backend("ldap", f"ldap://{r['ldap']}", ["a.test"], starttls=True),
            backend("imap", "imap", f"imap://{r['imap']}", ["b.test"], starttls=True,
                    tls_name="mail.test"),
            backend("pop3", "pop3", f"pop3://{r['pop3']}", ["p.test"], starttls=True,
                    tls_name="mail.test", login="{user}"),
            backend("smtp", "smtp", f"smtp://{r['smtp']}", ["s.test"], starttls=True,
                    tls_name="smtp.test"),
        ])
        yield Through(ag, relays)
    finally:
        for rl in relays.values():
            rl.close()


@pytest.mark.parametrize("kind", list(THROUGH))
def test_nothing_secret_in_the_clear(through, kind):
    login, password, upgrade, dn = THROUGH[kind]
    relay = through.relays[kind]
    relay.reset()
    rep = login_once(through.ag.submission, login, password)
    assert has(rep, "235 2.7.0"), rep
    through.ag.gw.wait_log(rf"auth accepted user={re.escape(login)} backend={kind} ")
    sent = relay.wire("c2s") if isinstance(relay, TlsProxy) else relay.client_bytes()
    assert upgrade in sent, f"no {upgrade!r} from the gateway: {sent[:300]!r}"
    assert_no_secrets(sent, secret_forms(login, password, dn), f"relay {kind}")
    if isinstance(relay, TlsProxy):
        assert b"AUTH" not in relay.plaintext("c2s").upper()
        assert not relay.errors, relay.errors


# --- cache and throttling --------------------------------------------------------------------


def test_success_cache(gateways, _module_pki, backends):
    """cache_ttl = "3s": with the directory unreachable, the cached login still gets 235, a
    wrong password or another user 454 (never the cache), and after the TTL the login 454."""
    relay = Relay(backends.slapd.tls_addr)
    try:
        ag = auth_gateway(gateways, "cache", _module_pki, [
            ldap_backend("dir", f"ldaps://{hp(relay.addr)}", ["a.test"])],
            auth={"cache_ttl": "3s"})
        assert has(login_once(ag.submission, "alice@a.test", "alice-secret"), "235 2.7.0")
        t_ok = time.monotonic()
        ag.gw.wait_log(r"auth accepted user=alice@a\.test backend=dir ")
        relay.enabled = False
        assert has(login_once(ag.submission, "alice@a.test", "alice-secret", mech="LOGIN"),
                   "235 2.7.0")
        ag.gw.wait_log(r"auth cached user=alice@a\.test client=127\.0\.0\.1")
        assert has(login_once(ag.submission, "alice@a.test", wrong("cache")), "454 4.7.0")
        assert has(login_once(ag.submission, "bob@a.test", "bob-secret"), "454 4.7.0")
        time.sleep(max(0.0, t_ok + 3.5 - time.monotonic()))
        assert has(login_once(ag.submission, "alice@a.test", "alice-secret"), "454 4.7.0")
    finally:
        relay.close()


def test_brute_force_is_slowed_then_locked_out(gateways, _module_pki, backends):
    """fail_delay 200ms doubling to max_fail_delay 1s, lockout after 5: 50 wrong passwords
    from 127.0.0.1 take at least 0.2+0.4+0.8+1+1 s and end with 454 4.7.0; the right password
    from 127.0.0.1 is locked out too; the same user from 127.0.0.2 still logs in."""
    ag = auth_gateway(gateways, "brute", _module_pki,
                      [ldap_backend("dir", backends.slapd.ldaps_url, ["a.test"])],
                      auth={"fail_delay": "200ms", "max_fail_delay": "1s", "lockout_after": 5,
                            "lockout_time": "60s", "cache_ttl": "5m"})
    bob_dn = backends.slapd.dn("bob")
    binds_before = len(backends.slapd.binds(bob_dn))
    guesses = [wrong(f"brute{i}") for i in range(50)]
    replies: list[Reply] = []
    r = None
    t0 = time.monotonic()
    try:
        for i, pw in enumerate(guesses):
            for _attempt in range(2):
                if r is None:
                    r = session(ag.submission)
                try:
                    rep = (auth_plain if i % 2 else auth_login)(r, "bob@a.test", pw)
                    break
                except OSError:  # ConnectionError too
                    # closed after too many errors: go on in a new session
                    r.close()
                    r = None
            else:
                pytest.fail(f"guess {i}: no AUTH reply in two sessions")
            replies.append(rep)
            if rep.code == 421:
                r.close()
                r = None
        elapsed = time.monotonic() - t0
    finally:
        if r is not None:
            r.close()
    codes = [" ".join(x.text.split()[:2]) for x in replies]
    assert codes[0] == "535 5.7.8", codes
    assert set(codes) <= {"535 5.7.8", "454 4.7.0"}, codes
    assert codes[-1] == "454 4.7.0", codes
    assert elapsed >= 0.2 + 0.4 + 0.8 + 1.0 + 1.0, f"50 guesses in {elapsed:.2f}s"
    ag.gw.wait_log(r"auth locked user=bob@a\.test client=127\.0\.0\.1")
    # locked out: the directory was asked a few times, not 50
    assert len(backends.slapd.binds(bob_dn)) - binds_before <= 10, "the lockout did not stop binds"
    # the right password from the locked address: still locked
    assert has(login_once(ag.submission, "bob@a.test", "bob-secret"), "454 4.7.0")
    # the same user from another address
    rep = login_once(ag.submission, "bob@a.test", "bob-secret", source=OTHER_CLIENT)
    assert has(rep, "235 2.7.0"), rep


# --- config ----------------------------------------------------------------------------------


def test_plaintext_backend_is_a_config_error(tmp_path, _module_pki, backends):
    """ldap:// without starttls = true would send passwords in the clear: refused at start."""
    if not BIN.exists():
        pytest.fail(f"{BIN} missing: run `cargo build --release` first")
    cfg = make_config(hostname="gw.test", listen=[f"{GW_IP}:{free_port(GW_IP)}"],
                      local_domains=["local.test"], trusted_networks=[],
                      routes=[{"domain": "local.test", "maildir": "local"}],
                      smtp={"submission": [f"{GW_IP}:{free_port(GW_IP)}"]})
    cfg += ca_table(_module_pki)
    cfg += _table("auth.backend", {"name": "dir", "kind": "ldap", "url": backends.slapd.ldap_url,
                                   "ca": "test-ca", "domains": ["a.test"],
                                   "bind_dn": DN_TEMPLATE}, array=True)
    path = tmp_path / "sealgate.toml"
    path.write_text(cfg)
    p = subprocess.run([str(BIN), "--config", str(path), "--state", str(tmp_path / "state")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0, p
    assert "starttls" in (p.stdout + p.stderr).lower(), p.stderr
    assert "sealgate ready" not in p.stdout


# --- logs ------------------------------------------------------------------------------------


def test_logs_name_the_user_never_the_password(main):
    """Runs after the login tests: the main gateway logged alice's accepted login, and no
    gateway of the module ever logged a password (checked again at module teardown)."""
    if "auth accepted user=alice@a.test" not in main.log():
        assert has(login_once(main.submission, "alice@a.test", "alice-secret"), "235 2.7.0")
    main.gw.wait_log(r"auth accepted user=alice@a\.test backend=ldaps client=127\.0\.0\.1")
    assert_log_clean(main.gw)
