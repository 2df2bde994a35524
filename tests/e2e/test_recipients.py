"""Recipient validation (F-RCPT), LDAP search-then-bind for AUTH, and the secrets they need
sealed to the box in the signed config (F-SECRETS), against a real slapd over TLS.

One slapd for the module (slapd.py, 127.0.0.31, LDAPS and LDAP + StartTLS, certificate from
the module's test CA). Its root DN stands in for the directory's service account.

- `sealed` (127.0.0.1): provisioned with an HQ key; its config is a blob signed by `sealctl
  config sign --secret dir-pw=FILE --device-key BOX.pub`, BOX.pub being what `sealgate device
  --encryption-key` printed. Its `[[recipients]]` for a.test searches with the service account;
  its ldap backend logs users in by search-then-bind with the same account. Known recipients get
  `250 2.1.5`, unknown ones `550 5.1.1` (also `*@a.test` and `"*)(uid=*"@a.test`: the filter is
  RFC 4515-escaped, slapd's log shows no wildcard ever reached it), `postmaster@` is never
  looked up; answers are cached (slapd sees no second search); AUTH via search-then-bind gets
  `235` / `535`. The service password appears in no blob byte, no `sealctl config show`
  output, no gateway log and no file of the state directory.
- `other` box: the same blob is refused with its own error ("encrypted to another box"),
  before anything is applied; its own blob with a wrong service password starts, and a RCPT
  there is `451 4.4.3` (the directory cannot be asked), an AUTH `454 4.7.0`.
- Anonymous search (a TOML config, no secret): the same answers; a directory that is down:
  `451 4.4.3`, or `250` with `on_unavailable = "accept"`.

Skipped only when slapd is not installed (tests/run installs it). Network rule: only
127.0.0.0/8 is ever used.
"""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

import slapd as slapd_mod
from clients import marker
from harness import (
    BIN,
    SEALCTL,
    GatewayFactory,
    Raw,
    _table,
    free_port,
    insecure_context,
    make_config,
    message,
)
from pki import Leaf, Spec

_why = slapd_mod.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"slapd: {_why}")

GW_IP = "127.0.0.1"
LDAP_IP = "127.0.0.31"
SERVICE_PW = slapd_mod.ROOT_PW  # the root DN is the service account here
SECRET_NAME = "dir-pw"

PKI = Spec(
    cas=("test-ca",),
    leaves={
        "ldap": Leaf("test-ca", "ldap", "ldap.test", usage="serverAuth", sans=("ldap.test", LDAP_IP)),
    },
    scope="module",
)


def run(*args, ok=True, stdin=None) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60,
                       input=stdin)
    if ok and p.returncode != 0:
        pytest.fail(f"{args} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def hp(addr) -> str:
    return "%s:%d" % addr


@pytest.fixture(scope="module")
def directory(_module_pki, tmp_path_factory):
    s = slapd_mod.Slapd(tmp_path_factory.mktemp("rcpt-slapd"), ip=LDAP_IP,
                        cert=_module_pki["ldap"], ca=_module_pki["ca"])
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def module_gateways(tmp_path_factory):
    f = GatewayFactory(tmp_path_factory.mktemp("rcpt-gateways"))
    yield f
    problems = f.close()
    if problems:
        pytest.fail("; ".join(problems))


def gateway_config(pki, directory, *, listen, submission=None, recipients: dict,
                   backend: dict | None = None, url: str | None = None) -> str:
    """a.test delivered to Maildir `local`; one ldap backend `dir` on the slapd (LDAPS unless
    `url`); `[[recipients]]` for a.test with `recipients` on top of the search base."""
    smtp = {"submission": [hp(submission)]} if submission else {}
    cfg = make_config(hostname="gw.test", listen=[hp(listen)], local_domains=["a.test"],
                      trusted_networks=[], routes=[{"domain": "a.test", "maildir": "local"}],
                      smtp=smtp)
    cfg += _table("tls.ca", {"name": "test-ca", "file": str(pki["ca"])}, array=True)
    cfg += _table("auth", {"fail_delay": "0s", "max_fail_delay": "0s", "cache_ttl": "0s"})
    b = {"name": "dir", "kind": "ldap", "url": url or directory.ldaps_url, "ca": "test-ca",
         "tls_name": "ldap.test", "timeout": "3s"}
    b.update(backend or {})
    cfg += _table("auth.backend", b, array=True)
    r = {"domain": "a.test", "backend": "dir", "search_base": slapd_mod.SUFFIX}
    r.update(recipients)
    cfg += _table("recipients", r, array=True)
    return cfg


SERVICE = {"service_dn": slapd_mod.ROOT_DN, "service_password": "@SECRET@"}


def with_secret_ref(cfg: str) -> str:
    # the harness's TOML writer knows no inline tables
    return cfg.replace('service_password = "@SECRET@"', f'service_password = {{ secret = "{SECRET_NAME}" }}')


class Box:
    """A provisioned gateway (not started) and what HQ needs to sign for it."""

    def __init__(self, factory, name: str, hq: Path, cfg: str):
        self.gw = factory(name, cfg, start=False)
        run(BIN, "--state", self.gw.state, "provision", "--trust", hq.with_suffix(".pub"))
        self.pub = self.gw.dir / "box.pub"
        out = run(BIN, "--state", self.gw.state, "device", "--encryption-key").stdout
        assert re.fullmatch(r"[0-9a-f]{64}\n", out), out
        self.pub.write_text(out)
        self.hq = hq

    def sign(self, text: str, seq: int, secret: str | None, out: Path | None = None,
             device_key: Path | None = None) -> Path:
        src = self.gw.dir / f"site-{seq}.toml"
        src.write_text(text)
        out = out or self.gw.dir / f"site-{seq}.sgc"
        args = [SEALCTL, "config", "sign", src, "--key", self.hq.with_suffix(".key"),
                "--seq", seq, "-o", out]
        if secret is not None:
            f = self.gw.dir / "dir-pw.txt"
            f.write_text(secret + "\n")
            args += ["--secret", f"{SECRET_NAME}={f}", "--device-key", device_key or self.pub]
        signed = run(*args)
        assert f"secrets {SECRET_NAME} (sealed to box key" in signed.stdout or secret is None, signed.stdout
        return out


@pytest.fixture(scope="module")
def hq(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rcpt-hq")
    run(SEALCTL, "keygen", "--out", d / "hq")
    return d / "hq"


def service_account_config(pki, directory):
    """A config whose recipients and search-then-bind logins use the service account (its
    password a sealed secret); with its listener and submission addresses."""
    listen, sub = (GW_IP, free_port(GW_IP)), (GW_IP, free_port(GW_IP))
    backend = {"domains": ["a.test"], "search_base": slapd_mod.PEOPLE,
               "search_filter": "(uid={user})", **SERVICE}
    cfg = with_secret_ref(gateway_config(pki, directory, listen=listen, submission=sub,
                                         recipients=dict(SERVICE), backend=backend))
    return cfg, listen, sub


@pytest.fixture(scope="module")
def sealed(module_gateways, _module_pki, directory, hq):
    """The box whose service password came sealed in its blob: recipients and AUTH
    (search-then-bind) both use the service account."""
    cfg, listen, sub = service_account_config(_module_pki, directory)
    box = Box(module_gateways, "sealed", hq, cfg)
    box.blob = box.sign(cfg, 1, SERVICE_PW)
    box.gw.config_path = box.blob
    box.gw.start()
    box.gw.wait_log(r"signed configuration applied")
    box.listen, box.submission = listen, sub
    return box


def rcpt_replies(addr, rcpts: list[str]) -> list[str]:
    r = Raw(addr)
    try:
        r.expect("EHLO client.test", 250)
        r.expect("MAIL FROM:<sender@remote.test>", 250)
        return [r.cmd(f"RCPT TO:<{a}>").text for a in rcpts]
    finally:
        r.close()


def searches(directory) -> list[str]:
    return [l for l in directory.log().splitlines() if " SRCH base=" in l]


def test_known_unknown_and_escaped_recipients(sealed, directory):
    before = len(searches(directory))
    service_binds = len(directory.binds(slapd_mod.ROOT_DN))
    got = rcpt_replies(sealed.listen, ["alice@a.test", "nobody@a.test", "*@a.test",
                                       '"*)(uid=*"@a.test', "Postmaster@a.test", "BOB@A.TEST"])
    assert got[0].startswith("250 2.1.5"), got
    assert got[1].startswith("550 5.1.1") and "nobody@a.test" in got[1], got
    assert got[2].startswith("550 5.1.1"), got  # not a wildcard: nobody's address is "*"
    assert got[3].startswith("550 5.1.1"), got  # not filter syntax
    assert got[4].startswith("250 2.1.5"), got  # postmaster: accepted, never looked up
    assert got[5].startswith("250 2.1.5"), got  # case-insensitive, as the directory matches
    new = searches(directory)[before:]
    assert len(new) == 5, new
    filters = " ".join(new)
    assert 'filter="(mail=*' not in filters and "(uid=*" not in filters, new
    assert "postmaster" not in filters.lower(), new
    # the service account bound before each search
    assert len(directory.binds(slapd_mod.ROOT_DN)) >= service_binds + 5, directory.log()[-2000:]
    log = sealed.gw.log()
    assert re.search(r"recipient looked up.*rcpt=nobody@a\.test.*exists=false", log), log[-3000:]


def test_answers_are_cached(sealed, directory):
    first = rcpt_replies(sealed.listen, ["bob@a.test", "ghost@a.test"])
    n = len(searches(directory))
    again = rcpt_replies(sealed.listen, ["bob@a.test", "ghost@a.test"])
    assert [x[:9] for x in first] == [x[:9] for x in again] == ["250 2.1.5", "550 5.1.1"], (first, again)
    assert len(searches(directory)) == n, "the second answers came from the cache"


def test_mail_to_a_known_recipient_is_delivered_and_the_unknown_one_refused(sealed):
    mark = marker("rcpt")
    r = Raw(sealed.listen)
    r.expect("EHLO client.test", 250)
    r.expect("MAIL FROM:<sender@remote.test>", 250)
    r.expect("RCPT TO:<nobody2@a.test>", 550)
    r.expect("RCPT TO:<alice@a.test>", 250)
    r.expect("DATA", 354)
    r.send(message(mark, "sender@remote.test", "alice@a.test").rstrip(b"\r\n") + b"\r\n.\r\n")
    rep = r.reply()
    assert rep.code == 250, rep
    r.close()
    msg = sealed.gw.wait_message_with(mark.encode(), sub="local")
    assert b"alice@a.test" in msg


def auth(addr, login: str, password: str) -> str:
    r = Raw(addr)
    try:
        r.expect("EHLO client.test", 250)
        r.expect("STARTTLS", 220)
        r.starttls(insecure_context())
        r.expect("EHLO client.test", 250)
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        return r.cmd(f"AUTH PLAIN {blob}").text
    finally:
        r.close()


def test_search_then_bind_logins(sealed, directory):
    alice_binds = len(directory.binds(directory.dn("alice")))
    assert auth(sealed.submission, "alice@a.test", "alice-secret").startswith("235 2.7.0")
    assert auth(sealed.submission, "alice@a.test", "wrong-pw-7c1").startswith("535 5.7.8")
    assert auth(sealed.submission, "nobody@a.test", "whatever-3d").startswith("535 5.7.8")
    # the user's own DN was found by the search and bound as
    # (slapd logs a successful bind on two lines, a refused one on one)
    assert len(directory.binds(directory.dn("alice"))) == alice_binds + 3, directory.log()[-2000:]
    assert re.search(r"auth refused user=nobody@a\.test.*no directory entry", sealed.gw.log())


def test_the_service_password_is_nowhere_in_the_clear(sealed):
    assert SERVICE_PW.encode() not in sealed.blob.read_bytes()
    shown = run(SEALCTL, "config", "show", sealed.blob).stdout
    assert SERVICE_PW not in shown and f"secrets:      {SECRET_NAME} (sealed to box key" in shown, shown
    assert "format 2" in shown, shown
    assert SERVICE_PW not in sealed.gw.log()
    for f in Path(sealed.gw.state).rglob("*"):
        if f.is_file():
            assert SERVICE_PW.encode() not in f.read_bytes(), f
    info = run(BIN, "--state", sealed.gw.state, "device", ok=False)
    # the gateway runs: `device` refuses or shows; either way no secret
    assert SERVICE_PW not in info.stdout + info.stderr


def test_another_box_refuses_the_blob_and_a_wrong_service_password_tempfails(
        module_gateways, _module_pki, directory, hq, sealed):
    cfg, listen, sub = service_account_config(_module_pki, directory)
    other = Box(module_gateways, "other", hq, cfg)
    # the sealed box's blob (any device): its secret opens on that box only
    p = subprocess.run([str(BIN), "--config", str(sealed.blob), "--state", str(other.gw.state)],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode != 0
    assert re.search(r"secret \"dir-pw\": encrypted to another box", p.stderr), p.stderr[-2000:]
    info = run(BIN, "--state", other.gw.state, "device").stdout
    assert "config sequence: none" in info, info
    # signed for this box, but with the wrong service password: the directory refuses the
    # service bind, so nothing can be looked up
    other.gw.config_path = other.sign(cfg, 1, "not-the-service-password")
    other.gw.start()
    got = rcpt_replies(listen, ["alice@a.test"])
    assert got[0].startswith("451 4.4.3"), got
    assert auth(sub, "alice@a.test", "alice-secret").startswith("454 4.7.0")
    assert re.search(r"recipient lookup unavailable.*service account bind result 49", other.gw.log())


def test_anonymous_search_and_a_directory_that_is_down(module_gateways, _module_pki, directory):
    listen = (GW_IP, free_port(GW_IP))
    cfg = gateway_config(_module_pki, directory, listen=listen, recipients={},
                         url=directory.ldap_url, backend={"starttls": True})
    module_gateways("anon", cfg)
    got = rcpt_replies(listen, ["alice@a.test", "nobody@a.test"])
    assert got[0].startswith("250 2.1.5") and got[1].startswith("550 5.1.1"), got

    down = f"ldaps://{LDAP_IP}:{free_port(LDAP_IP)}"
    for name, extra, want in (("down", {}, "451 4.4.3"),
                              ("down-accept", {"on_unavailable": "accept"}, "250 2.1.5")):
        listen = (GW_IP, free_port(GW_IP))
        cfg = gateway_config(_module_pki, directory, listen=listen, recipients=extra, url=down)
        gw = module_gateways(name, cfg)
        got = rcpt_replies(listen, ["alice@a.test"])
        assert got[0].startswith(want), (name, got)
        assert re.search(r"recipient lookup unavailable.*accepted=%s" % ("true" if extra else "false"),
                         gw.log()), gw.log()[-2000:]
