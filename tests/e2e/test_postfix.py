"""Postfix as a real SMTP peer, both ways, over STARTTLS (a private instance from postfix.py).

- Postfix → Sealgate: a Postfix whose relay host is the Sealgate listener and whose client TLS
  level is `encrypt` hands a message over; it lands in Sealgate's Maildir, Postfix logs a
  (trusted: it has the test CA) TLS connection to Sealgate and Sealgate's session line and
  `Received:` header show TLS.
- Sealgate → Postfix with route `tls = "encrypt"` and `"may"`: the message lands in Postfix's
  Maildir and the `Received:` header Postfix adds says which TLS version and cipher were used.
- Postfix with STARTTLS switched off: a route with `tls = "encrypt"` never hands it the message
  (it stays queued, reason `4.7.4 ... did not offer STARTTLS`); `tls = "may"` delivers in
  plaintext.

Postfix listens on 127.0.0.31, Sealgate on 127.0.0.30; test clients connect from 127.0.0.1
(Sealgate's trusted network). Certificates come from a test CA (pki.py). The module is skipped
only when the `postfix` binary is absent (tests/run installs it); a Postfix that does not start
fails the test.
"""

import re

import pytest

from clients import marker
from harness import Raw, message, queue_id, received_headers, send_raw_message
from pki import Leaf, Spec
from postfix import POSTFIX, PostfixFactory, available

pytestmark = pytest.mark.skipif(
    not available(), reason=f"{POSTFIX} not installed (tests/run installs the postfix package)"
)

PF_IP = "127.0.0.31"
SG_IP = "127.0.0.30"


# the `pki` fixture (conftest.py) makes these for each test
PKI = Spec(
    cas=("test-ca",),
    leaves={
        "postfix": Leaf("test-ca", "postfix", "postfix.pf.test", usage="serverAuth",
                        sans=("postfix.pf.test", PF_IP)),
        "sealgate": Leaf("test-ca", "sealgate", "gw.test", usage="serverAuth,clientAuth",
                         sans=("gw.test", SG_IP)),
    },
)


@pytest.fixture
def postfixes(tmp_path):
    f = PostfixFactory(tmp_path)
    yield f
    f.close()
    # shown by pytest only when the test failed
    for pf in f.instances:
        log = pf.log().splitlines()
        print(f"----- {pf.name} maillog ({pf.log_path}), last {min(len(log), 80)} lines")
        print("\n".join(log[-80:]))


def sealgate(gateways, pki, routes=None, **kw):
    """Sealgate on SG_IP for a.test (Maildir), with the test CA's certificate."""
    return gateways.simple(
        "gw", ip=SG_IP, hostname="gw.test", local_domains=["a.test"],
        routes=[{"domain": "a.test", "maildir": "maildir"}] + list(routes or []),
        certificates=[{"name": "default", "cert_file": str(pki["sealgate"][0]),
                       "key_file": str(pki["sealgate"][1])}],
        **kw,
    )


def submit(addr, frm: str, to: str, mark: str) -> str:
    """One message over SMTP from 127.0.0.1; returns the server's queue id."""
    r = Raw(addr, source="127.0.0.1")
    try:
        r.expect("EHLO client.test", 250)
        rep = send_raw_message(r, frm, [to], message(mark, frm, to))
        assert rep.code == 250, rep
        r.expect("QUIT", 221)
    finally:
        r.close()
    return queue_id(rep.text)


def postfix_received(msg: bytes, pf) -> str:
    """The Received: field Postfix added (the top one)."""
    rec = received_headers(msg)
    assert rec, msg[:600]
    top = rec[0]
    assert f"by {pf.hostname} (Postfix)" in top, top
    return top


# --- Postfix → Sealgate ----------------------------------------------------------------------


def test_postfix_relays_to_sealgate_over_starttls(gateways, postfixes, pki):
    gw = sealgate(gateways, pki)
    host, port = gw.addr
    pf = postfixes(cert=pki["postfix"], relayhost=f"[{host}]:{port}", smtp_tls="encrypt",
                   smtp_ca_file=pki["ca"])
    mark = marker("pf2sg")
    pf_qid = submit(pf.addr, "alice@pf.test", "bob@a.test", mark)

    got = gw.wait_message_with(mark.encode())
    assert f"body marker {mark}" in got.decode()
    top = received_headers(got)[0]
    assert f"from {pf.hostname} ([{PF_IP}])" in top, top
    assert "by gw.test (Sealgate)" in top, top
    assert re.search(r"with ESMTPS \(TLSv1\.[23] TLS\w+\)", top), top
    # Postfix's own Received (from the submission on its listener) is below Sealgate's.
    assert any(f"by {pf.hostname} (Postfix)" in r for r in received_headers(got)[1:]), got[:800]

    # Postfix: a verified (Trusted: it has the test CA) TLS connection to Sealgate, then sent.
    pf.wait_log(rf"Trusted TLS connection established to {re.escape(host)}\[{re.escape(host)}\]"
                rf":{port}: TLSv1\.[23] with cipher")
    pf.wait_log(rf"{pf_qid}: to=<bob@a\.test>, relay={re.escape(host)}\[{re.escape(host)}\]:{port},"
                r".* dsn=2\.0\.0, status=sent \(250 2\.0\.0 ")
    # Sealgate: the session from Postfix's address was TLS and queued one message.
    line = gw.wait_log(rf"session client={re.escape(PF_IP)} .*")[0].group(0)
    assert re.search(rf'helo="?{re.escape(pf.hostname)}"? ', line), line
    assert re.search(r'tls="?TLSv1\.[23]"? cipher="?TLS\w+"? ', line), line
    assert "messages=1 " in line, line


# --- Sealgate → Postfix ----------------------------------------------------------------------


@pytest.mark.parametrize("level", ["encrypt", "may"])
def test_sealgate_delivers_to_postfix_over_starttls(gateways, postfixes, pki, level):
    pf = postfixes(cert=pki["postfix"])
    gw = sealgate(gateways, pki, routes=[{"domain": "pf.test", "next_hop": [pf.hop], "tls": level}])
    mark = marker(f"sg2pf-{level}")
    qid = submit(gw.addr, "alice@a.test", "bob@pf.test", mark)

    got = pf.wait_message_with(mark.encode())
    text = got.decode()
    assert f"body marker {mark}" in text
    assert "Delivered-To: bob@pf.test" in text, text[:600]
    top = postfix_received(got, pf)
    assert "from gw.test (" in top, top
    assert re.search(r"\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)", top), top
    assert "with ESMTPS id" in top, top
    # Sealgate's Received (the client's submission) is next.
    assert "by gw.test (Sealgate)" in received_headers(got)[1], received_headers(got)

    pf.wait_log(r"Anonymous TLS connection established from \S+\[127\.\d+\.\d+\.\d+\]: TLSv1\.[23]")
    line = gw.wait_log(rf"delivery attempt queue_id={qid} .*")[0].group(0)
    assert f"peer={pf.hop}" in line, line
    assert re.search(r'tls="?TLSv1\.[23]"? ', line), line
    assert f"level={level}" in line, line
    gw.wait_queue_empty(timeout=20)


# --- Postfix without STARTTLS ----------------------------------------------------------------


def test_encrypt_never_hands_the_message_to_postfix_without_starttls(gateways, postfixes, pki):
    pf = postfixes(smtpd_tls="none")
    gw = sealgate(gateways, pki, queue={"retry_schedule": ["1h"]},
                  routes=[{"domain": "pf.test", "next_hop": [pf.hop], "tls": "encrypt"}])
    mark = marker("sg2pf-notls")
    qid = submit(gw.addr, "alice@a.test", "bob@pf.test", mark)

    gw.wait_log(rf"delivery queue_id={qid} rcpt=bob@pf\.test result=Deferred")
    entry = gw.queue_list()[qid]
    rcpt = entry["recipients"][0]
    assert rcpt["status"] == "pending", entry
    assert "4.7.4" in rcpt["detail"], rcpt
    assert "did not offer STARTTLS" in rcpt["detail"], rcpt
    assert PF_IP in rcpt["detail"], rcpt
    # Sealgate did talk to Postfix (EHLO), but no transaction began and nothing arrived.
    m = pf.wait_log(r"disconnect from \S+\[127\.\d+\.\d+\.\d+\] .*")
    assert "ehlo=1" in m.group(0), m.group(0)
    assert "mail=" not in m.group(0) and "starttls=" not in m.group(0), m.group(0)
    assert "message-id=" not in pf.log()
    assert not pf.messages()


def test_may_delivers_to_postfix_without_starttls_in_plaintext(gateways, postfixes, pki):
    pf = postfixes(smtpd_tls="none")
    gw = sealgate(gateways, pki, routes=[{"domain": "pf.test", "next_hop": [pf.hop], "tls": "may"}])
    mark = marker("sg2pf-plain")
    qid = submit(gw.addr, "alice@a.test", "bob@pf.test", mark)

    got = pf.wait_message_with(mark.encode())
    top = postfix_received(got, pf)
    assert "with ESMTP id" in top, top
    assert "using TLS" not in top, top
    line = gw.wait_log(rf"delivery attempt queue_id={qid} .*")[0].group(0)
    assert re.search(r'tls="?none"? ', line), line
    assert "level=may" in line, line
    gw.wait_queue_empty(timeout=20)
