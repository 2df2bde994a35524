"""OpenSMTPD as a real SMTP peer, both ways (a private instance from opensmtpd.py, Debian's
opensmtpd 6.8.0p2 unpacked by tests/e2e/install-peers.sh).

One OpenSMTPD runs for the whole module on 127.0.0.51: it delivers `os.test` into its Maildir
and relays `a.test` to Sealgate with STARTTLS required (`smtp+tls://`), verifying Sealgate's
certificate against the test CA. Sealgate (a fresh one per test, always on the same port of
127.0.0.50 so that the module's OpenSMTPD can reach each) delivers `a.test` into its Maildir and
routes `os.test` to OpenSMTPD.

- OpenSMTPD → Sealgate over STARTTLS (OpenSMTPD as TLS client works): an 8-bit message arrives
  byte-intact; both sides log TLS.
- Sealgate → OpenSMTPD: bookworm's 6.8.0p2 offers STARTTLS but fails every handshake as a TLS
  server (an upstream bug). At `tls = "encrypt"` the message stays queued with a `4.7.5` status
  and never reaches OpenSMTPD; at `tls = "may"` Sealgate falls back to plaintext, delivers, and
  its peer table marks OpenSMTPD TLS-broken, so the next message goes plaintext at once.

Skipped only when the packages cannot be downloaded (install-peers.sh); an OpenSMTPD that does
not start fails the tests.
"""

from __future__ import annotations

import re
import time

import pytest

import opensmtpd as osmtpd
from clients import marker
from harness import Raw, _table, free_port, make_config, received_headers, wait_until
from pki import Leaf, Spec

_why = osmtpd.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"OpenSMTPD unavailable: {_why}")

SG_IP = "127.0.0.50"
OS_IP = "127.0.0.51"
SG_PORT = free_port(SG_IP)

PKI = Spec(
    cas=("test-ca",),
    leaves={
        "opensmtpd": Leaf("test-ca", "opensmtpd", "smtpd.os.test", usage="serverAuth,clientAuth",
                          sans=("smtpd.os.test", OS_IP)),
        "sealgate": Leaf("test-ca", "sealgate", "gw.test", usage="serverAuth,clientAuth",
                         sans=("gw.test", SG_IP)),
    },
    scope="module",
)


@pytest.fixture(scope="module")
def smtpd(_module_pki):
    pki = _module_pki
    o = osmtpd.OpenSMTPD("opensmtpd", OS_IP, cert=pki["opensmtpd"], ca=pki["ca"],
                         routes={"a.test": (SG_IP, SG_PORT)})
    o.start()
    yield o
    o.stop()
    log = o.log().splitlines()
    print(f"----- {o.name} log ({o.log_path}), last {min(len(log), 80)} lines")
    print("\n".join(log[-80:]))


def sealgate(gateways, pki, smtpd, level: str = "may", **kw):
    cfg = make_config(
        hostname="gw.test", listen=[f"{SG_IP}:{SG_PORT}"], local_domains=["a.test"],
        routes=[{"domain": "a.test", "maildir": "maildir"},
                {"domain": "os.test", "next_hop": [smtpd.hop], "tls": level}],
        certificates=[{"name": "default", "cert_file": str(pki["sealgate"][0]),
                       "key_file": str(pki["sealgate"][1])}],
        **kw,
    )
    cfg += _table("tls.ca", {"name": "test-ca", "pem": pki["ca"].read_text()}, array=True)
    return gateways("gw", cfg)


def eightbit_message(mark: str, frm: str, to: str) -> bytes:
    head = (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: 8bit {mark}\r\nMessage-ID: <{mark}@sealgate-tests>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode()
    return head + (f"body marker {mark}\r\n".encode()
                   + "Grüße aus Genève — ÅÄÖ åäö — 🐍\r\n".encode()
                   + b"latin-1: caf\xe9 \xa7 \xff\r\n..dot-led\r\n")


def submit(addr, frm: str, to: str, data: bytes, params: str = "") -> str:
    r = Raw(addr, source="127.0.0.1", timeout=30)
    try:
        r.expect("EHLO client.test", 250)
        r.expect(f"MAIL FROM:<{frm}>{(' ' + params) if params else ''}", 250)
        r.expect(f"RCPT TO:<{to}>", 250)
        r.expect("DATA", 354)
        r.send(re.sub(rb"(?m)^\.", b"..", data) + b".\r\n")
        rep = r.reply()
        assert rep.code == 250, rep
        r.expect("QUIT", 221)
    finally:
        r.close()
    # Sealgate: "queued as ID"; OpenSMTPD: "2.0.0 MSGID Message accepted for delivery"
    m = re.search(r"queued as (\S+)", rep.text) or re.search(r"2\.0\.0 (\w+) Message accepted", rep.text)
    assert m, rep.text
    return m.group(1)


def body_of(msg: bytes) -> bytes:
    """The body after the header block, with LF line ends (OpenSMTPD's Maildir files are LF)."""
    msg = msg.replace(b"\r\n", b"\n")
    return msg.split(b"\n\n", 1)[1]


# --- OpenSMTPD → Sealgate ------------------------------------------------------------------------


def test_opensmtpd_relays_to_sealgate_over_starttls(gateways, _module_pki, smtpd):
    gw = sealgate(gateways, _module_pki, smtpd)
    mark = marker("os2sg")
    sent = eightbit_message(mark, "alice@os.test", "bob@a.test")
    msgid = submit(smtpd.addr, "alice@os.test", "bob@a.test", sent, "BODY=8BITMIME")

    got = gw.wait_message_with(mark.encode())
    assert got.split(b"\r\n\r\n", 1)[1] == sent.split(b"\r\n\r\n", 1)[1]  # byte-intact (CRLF)
    assert sent.split(b"\r\n\r\n", 1)[0] in got, got[:1200]
    rec = received_headers(got)
    assert "by gw.test (Sealgate)" in rec[0], rec
    assert f"from {smtpd.hostname} ([{OS_IP}])" in rec[0], rec
    assert re.search(r"with ESMTPS \(TLSv1\.[23] TLS\w+\)", rec[0]), rec
    assert f"by {smtpd.hostname} (OpenSMTPD)" in rec[1], rec

    # Sealgate queued it from OpenSMTPD's address (its session line comes only when OpenSMTPD
    # closes the connection, which it keeps open for 10 s; the Received header above already
    # says TLS).
    gw.wait_log(rf"queued queue_id=\S+ client={re.escape(OS_IP)} from=alice@os\.test rcpts=1 ")
    # OpenSMTPD: TLS to Sealgate (certificate verified against the test CA), then delivered.
    m = smtpd.wait_log(rf"^(\w+) mta delivery evpid={msgid}\w* from=<alice@os\.test> "
                       rf"to=<bob@a\.test> .*relay=\"{re.escape(SG_IP)} .* result=\"Ok\" "
                       r'stat="250 2\.0\.0 Ok: queued as \w+"')
    session = m.group(1)
    log = smtpd.log()
    assert re.search(rf"^{session} mta connecting address=smtp\+tls://{re.escape(SG_IP)}:{SG_PORT} ", log, re.M), log
    assert re.search(rf"^{session} mta tls ciphers=TLSv1\.[23]:", log, re.M), log
    assert re.search(rf'^{session} mta server-cert-check result="success"', log, re.M), log


# --- Sealgate → OpenSMTPD ------------------------------------------------------------------------


def test_encrypt_to_opensmtpd_defers_on_its_broken_tls(gateways, _module_pki, smtpd):
    gw = sealgate(gateways, _module_pki, smtpd, "encrypt", queue={"retry_schedule": ["1h"]},
                  tls={"handshake_timeout": "5s"})
    mark = marker("sg2os-encrypt")
    before = len(smtpd.log())
    qid = submit(gw.addr, "alice@a.test", "bob@os.test", eightbit_message(mark, "alice@a.test", "bob@os.test"))

    gw.wait_log(rf"delivery queue_id={qid} rcpt=bob@os\.test result=Deferred")
    rcpt = gw.queue_list()[qid]["recipients"][0]
    assert rcpt["status"] == "pending", rcpt
    assert re.match(r"4\.7\.\d ", rcpt["detail"]), rcpt
    assert OS_IP in rcpt["detail"], rcpt
    assert "handshake" in rcpt["detail"].lower(), rcpt
    # Sealgate did reach OpenSMTPD (STARTTLS was offered), but no message was handed over.
    new = smtpd.log()[before:]
    assert re.search(r"smtp disconnected reason=\"io-error: .*SSL", new), new
    assert "smtp message msgid" not in new and "smtp envelope" not in new, new
    assert not any(mark.encode() in m for m in smtpd.messages().values())


def test_may_to_opensmtpd_falls_back_to_plaintext_with_memory(gateways, _module_pki, smtpd):
    gw = sealgate(gateways, _module_pki, smtpd, "may", tls={"handshake_timeout": "5s"})
    m1, m2 = marker("sg2os-may1"), marker("sg2os-may2")
    sent1 = eightbit_message(m1, "alice@a.test", "bob@os.test")
    q1 = submit(gw.addr, "alice@a.test", "bob@os.test", sent1)
    before = len(smtpd.log())
    got1 = smtpd.wait_message_with(m1.encode())
    assert body_of(got1) == body_of(sent1)
    top = received_headers(got1.replace(b"\n", b"\r\n"))[0]
    assert f"by {smtpd.hostname} (OpenSMTPD) with ESMTP id" in top, top
    assert "TLS" not in top, top
    gw.wait_queue_empty(timeout=20)
    line = gw.wait_log(rf"delivery attempt queue_id={q1} .*")[0].group(0)
    assert re.search(r'tls="?none"? ', line) and "level=may" in line, line
    assert f"peer={smtpd.hop}" in line, line
    gw.wait_log(rf"TLS fallback peer={re.escape(smtpd.hop)} .*reconnecting to {re.escape(OS_IP)} in "
                r"plaintext: the TLS handshake failed .*remembered as TLS-broken until ")
    assert re.search(r"smtp disconnected reason=\"io-error: .*SSL", smtpd.log()[before:]), smtpd.log()[before:]

    # The peer table remembers OpenSMTPD as TLS-broken.
    def record():
        r = {p["ip"]: p for p in gw.peer_table()["peers"]}.get(OS_IP)
        return r if r and r.get("tls_broken_until") else None

    rec = wait_until(record, 10, "a TLS-broken mark for OpenSMTPD in the peer table")
    assert rec["tls_broken_until"] > time.time() + 3600, rec
    assert rec["starttls_offered"] is True, rec
    assert rec["last_tls"] is None, rec

    # So the next message goes plaintext without trying STARTTLS again.
    before = len(smtpd.log())
    q2 = submit(gw.addr, "alice@a.test", "bob@os.test", eightbit_message(m2, "alice@a.test", "bob@os.test"))
    smtpd.wait_message_with(m2.encode())
    gw.wait_queue_empty(timeout=20)
    line = gw.wait_log(rf"delivery attempt queue_id={q2} .*")[0].group(0)
    assert re.search(r'tls="?none"? ', line) and "level=may" in line, line
    assert len(re.findall(r" TLS fallback peer=", gw.log())) == 1, gw.log()[-2000:]
    new = smtpd.log()[before:]
    assert "io-error" not in new and "smtp message msgid" in new, new
