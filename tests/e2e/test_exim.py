"""Exim as a real SMTP peer, both ways (a private instance from exim.py, Debian's
exim4-daemon-light unpacked by tests/e2e/install-peers.sh).

One Exim runs for the whole module on 127.0.0.41. It delivers `ex.test` into its Maildir and
relays `a.test` to Sealgate over STARTTLS and `b.test` over implicit TLS (`protocol = smtps`),
verifying Sealgate's certificate against the test CA. Sealgate (a fresh one per test, always on
the same two ports of 127.0.0.40 so that the module's Exim can reach each) delivers `a.test` and
`b.test` into its Maildir and routes `ex.test` to Exim.

- Exim → Sealgate over STARTTLS and implicit TLS: an 8BITMIME message (Latin-1 bytes) and an
  SMTPUTF8 message (UTF-8 sender, header and body) arrive byte-intact; a 20 MiB message too.
- Sealgate → Exim at `encrypt` and at `verify` (test CA): an SMTPUTF8 + 8BITMIME message and
  then a plain ASCII one on the same (pooled) connection; Exim's log shows what each MAIL
  command carried and the protocol (`utf8esmtps`, then `esmtps`: no SMTPUTF8 or BODY=8BITMIME
  leaks from the first transaction into the second), and both bodies are byte-intact in Exim's
  Maildir.

Skipped only when the packages cannot be downloaded (install-peers.sh); an Exim that does not
start fails the tests.
"""

from __future__ import annotations

import re

import pytest

import exim as exim_mod
from clients import marker
from harness import Raw, _table, free_port, header_block, make_config, received_headers
from pki import Leaf, Spec

_why = exim_mod.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"Exim unavailable: {_why}")

SG_IP = "127.0.0.40"
EXIM_IP = "127.0.0.41"
SG_PORT = free_port(SG_IP)
SG_SMTPS_PORT = free_port(SG_IP)

PKI = Spec(
    cas=("test-ca",),
    leaves={
        "exim": Leaf("test-ca", "exim", "exim.ex.test", usage="serverAuth",
                     sans=("exim.ex.test", EXIM_IP)),
        "sealgate": Leaf("test-ca", "sealgate", "gw.test", usage="serverAuth,clientAuth",
                         sans=("gw.test", SG_IP)),
    },
    scope="module",
)


@pytest.fixture(scope="module")
def exim(_module_pki):
    pki = _module_pki
    e = exim_mod.Exim(
        "exim", EXIM_IP, cert=pki["exim"], ca=pki["ca"],
        routes={"a.test": (SG_IP, SG_PORT, "starttls"), "b.test": (SG_IP, SG_SMTPS_PORT, "smtps")},
    )
    e.start()
    yield e
    e.stop()
    log = e.log().splitlines()
    print(f"----- {e.name} mainlog ({e.log_path}), last {min(len(log), 80)} lines")
    print("\n".join(log[-80:]))


def sealgate(gateways, pki, exim, level: str = "encrypt"):
    route = {"domain": "ex.test", "next_hop": [exim.hop], "tls": level}
    if level == "verify":
        route["ca"] = "test-ca"
    cfg = make_config(
        hostname="gw.test", listen=[f"{SG_IP}:{SG_PORT}"], implicit_tls=[f"{SG_IP}:{SG_SMTPS_PORT}"],
        local_domains=["a.test", "b.test"],
        routes=[{"domain": "a.test", "maildir": "maildir"}, {"domain": "b.test", "maildir": "maildir"},
                route],
        certificates=[{"name": "default", "cert_file": str(pki["sealgate"][0]),
                       "key_file": str(pki["sealgate"][1])}],
    )
    cfg += _table("tls.ca", {"name": "test-ca", "pem": pki["ca"].read_text()}, array=True)
    return gateways("gw", cfg)


# --- messages ------------------------------------------------------------------------------------


def eightbit_message(mark: str, frm: str, to: str) -> bytes:
    """8BITMIME: Latin-1 bytes (not UTF-8) in the body, ASCII headers, CRLF."""
    head = (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: 8bit {mark}\r\nMessage-ID: <{mark}@sealgate-tests>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode()
    body = (f"body marker {mark}\r\n".encode()
            + b"caf\xe9 cr\xe8me br\xfbl\xe9e, \xe0 la fa\xe7on de Gen\xe8ve \xa7 \xff\xfe\r\n"
            + b"...a line starting with dots\r\n.\r\n \xb0\xb1\xb2 all high bytes: "
            + bytes(range(0x80, 0x100)) + b"\r\n")
    return head + body


def utf8_message(mark: str, frm: str, to: str) -> bytes:
    """SMTPUTF8: UTF-8 in the From header, the Subject and the body (8-bit, not encoded)."""
    text = (f"From: Jürgen Müller <{frm}>\r\nTo: <{to}>\r\nSubject: Grüße ✉ {mark}\r\n"
            f"Message-ID: <{mark}@sealgate-tests>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            f"body marker {mark}\r\nΓειά σου κόσμε — こんにちは世界 — 🐍📬 — ÅÄÖ åäö\r\n"
            ".dot-led line\r\n")
    return text.encode()


def ascii_message(mark: str, frm: str, to: str) -> bytes:
    return (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: plain {mark}\r\nMessage-ID: <{mark}@sealgate-tests>\r\n"
            f"\r\nbody marker {mark}\r\nonly ASCII here\r\n").encode()


def big_message(mark: str, frm: str, to: str, size: int = 20 << 20) -> bytes:
    head = (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: big {mark}\r\nMessage-ID: <{mark}@sealgate-tests>\r\n"
            f"\r\nbody marker {mark}\r\n").encode()
    lines = []
    n = len(head)
    i = 0
    while n < size:
        line = f"{i:08d} " + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_"
        lines.append(line[: 76].encode() + b"\r\n")
        n += 78
        i += 1
    return head + b"".join(lines) + f"end marker {mark}\r\n".encode()


def body_of(msg: bytes) -> bytes:
    """Everything after the header block (CRLF files)."""
    return msg.split(b"\r\n\r\n", 1)[1]


def headers_of(msg: bytes) -> bytes:
    return msg.split(b"\r\n\r\n", 1)[0]


def submit(addr, frm: str, to: str, data: bytes, params: str = "", source: str = "127.0.0.1") -> str:
    """One message with MAIL parameters `params`; returns the server's queue id."""
    r = Raw(addr, source=source, timeout=60)
    try:
        r.expect("EHLO client.test", 250)
        r.expect(f"MAIL FROM:<{frm}>{(' ' + params) if params else ''}".encode(), 250)
        r.expect(f"RCPT TO:<{to}>".encode(), 250)
        r.expect("DATA", 354)
        stuffed = re.sub(rb"(?m)^\.", b"..", data)
        r.send(stuffed + b".\r\n")
        rep = r.reply()
        assert rep.code == 250, rep
        r.expect("QUIT", 221)
    finally:
        r.close()
    m = re.search(r"(?:queued as |id=)(\S+)", rep.text)
    assert m, rep.text
    return m.group(1)


# --- Exim → Sealgate -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
def test_exim_relays_8bit_and_utf8_to_sealgate(gateways, _module_pki, exim, mode):
    gw = sealgate(gateways, _module_pki, exim)
    dom = "a.test" if mode == "starttls" else "b.test"
    port = SG_PORT if mode == "starttls" else SG_SMTPS_PORT
    m8, mu = marker(f"ex2sg-8bit-{mode}"), marker(f"ex2sg-utf8-{mode}")
    sent8 = eightbit_message(m8, "alice@ex.test", f"bob@{dom}")
    sentu = utf8_message(mu, "jürgen@ex.test", f"bob@{dom}")
    id8 = submit(exim.addr, "alice@ex.test", f"bob@{dom}", sent8, "BODY=8BITMIME")
    idu = submit(exim.addr, "jürgen@ex.test", f"bob@{dom}", sentu, "SMTPUTF8 BODY=8BITMIME")

    got8 = gw.wait_message_with(m8.encode())
    gotu = gw.wait_message_with(mu.encode())
    assert body_of(got8) == body_of(sent8)
    assert body_of(gotu) == body_of(sentu)
    # The original header fields are there, byte for byte (Exim and Sealgate only prepend).
    assert headers_of(sent8) in headers_of(got8), got8[:1200]
    assert headers_of(sentu) in headers_of(gotu), gotu[:1200]
    # RFC 6531 §3.7.3: the SMTPUTF8 transaction is received "with UTF8SMTPS".
    for got, proto in ((got8, "ESMTPS"), (gotu, "UTF8SMTPS")):
        rec = received_headers(got)
        assert "by gw.test (Sealgate)" in rec[0], rec
        assert f"from {exim.hostname} ([{EXIM_IP}])" in rec[0], rec
        assert re.search(rf"with {proto} \(TLSv1\.[23] TLS\w+\)", rec[0]), rec
        assert f"by {exim.hostname} with " in rec[1], rec
    # The UTF-8 sender got through, which Sealgate takes only with SMTPUTF8 (553 5.6.7 else).
    gw.wait_log(r"queued queue_id=\S+ client=127\.0\.0\.41 from=jürgen@ex\.test rcpts=1 ")

    # Exim: delivered both over verified TLS to Sealgate's port.
    for qid in (id8, idu):
        line = exim.wait_log(rf"^.* {qid} => bob@{re.escape(dom)} .*$")[0].group(0)
        assert f"[{SG_IP}]:{port}" in line, line
        assert re.search(r" X=TLS1\.[23]:", line), line
        assert " CV=yes" in line, line
        assert 'C="250 ' in line, line
    # Sealgate: the session from Exim's address was TLS (implicit for smtps).
    line = gw.wait_log(rf"session client={re.escape(EXIM_IP)} .*")[0].group(0)
    assert re.search(r'tls="?TLSv1\.[23]"? ', line), line
    assert f"helo={exim.hostname} " in line or f'helo="{exim.hostname}"' in line, line


def test_exim_relays_20_mib_to_sealgate(gateways, _module_pki, exim):
    gw = sealgate(gateways, _module_pki, exim)
    mark = marker("ex2sg-big")
    sent = big_message(mark, "alice@ex.test", "bob@a.test")
    assert len(sent) >= 20 << 20
    qid = submit(exim.addr, "alice@ex.test", "bob@a.test", sent)
    got = gw.wait_message_with(f"end marker {mark}".encode(), timeout=60)
    assert len(body_of(got)) == len(body_of(sent))
    assert body_of(got) == body_of(sent)
    line = exim.wait_log(rf"^.* {qid} => bob@a\.test .*$", timeout=30)[0].group(0)
    assert " X=TLS1." in line and f"[{SG_IP}]:{SG_PORT}" in line, line


# --- Sealgate → Exim -----------------------------------------------------------------------------


def exim_lines_for(exim, mark: str) -> dict[str, str]:
    """Exim's log lines for the message carrying `mark`: its MAIL command (the one logged just
    before its DATA line), the DATA line and the `<=` line."""
    lines = exim.log().splitlines()
    out = {}
    for i, line in enumerate(lines):
        if f"id=<{mark}@sealgate-tests>" in line and " DATA P=" in line:
            out["data"] = line
            qid = line.split()[2]
            out["mail"] = next(l for l in reversed(lines[:i]) if " MAIL MAIL FROM:" in l)
            out["arrival"] = next(l for l in lines[i:] if f" {qid} <= " in l)
            out["qid"] = qid
    return out


@pytest.mark.parametrize("level", ["encrypt", "verify"])
def test_sealgate_delivers_to_exim_pooled(gateways, _module_pki, exim, level):
    """Three messages, each submitted once the one before is delivered, so that all travel on
    one connection (parked after each transaction): plain ASCII, SMTPUTF8 + 8BITMIME, plain
    ASCII again."""
    gw = sealgate(gateways, _module_pki, exim, level)
    m1, mu, m2 = (marker(f"sg2ex-{k}-{level}") for k in ("ascii1", "utf8", "ascii2"))
    sent = {
        m1: ("alice@a.test", ascii_message(m1, "alice@a.test", "carol@ex.test"), ""),
        mu: ("jürgen@a.test", utf8_message(mu, "jürgen@a.test", "carol@ex.test"),
             "SMTPUTF8 BODY=8BITMIME"),
        m2: ("alice@a.test", ascii_message(m2, "alice@a.test", "carol@ex.test"), ""),
    }
    got, qids = {}, {}
    for mark, (frm, data, params) in sent.items():
        qids[mark] = submit(gw.addr, frm, "carol@ex.test", data, params)
        got[mark] = exim.wait_message_with(mark.encode())
        gw.wait_queue_empty(timeout=20)

    # Byte-intact at Exim's side (its Maildir files are CRLF, as sent).
    for mark, (_, data, _) in sent.items():
        assert body_of(got[mark]) == body_of(data), mark
        assert headers_of(data) in headers_of(got[mark]), got[mark][:1200]

    exim.wait_log(rf" <= .* id={re.escape(m2)}@sealgate-tests ")
    l1, lu, l2 = (exim_lines_for(exim, m) for m in (m1, mu, m2))
    assert l1 and lu and l2, exim.log()[-3000:]
    # What each MAIL command carried, as Exim received it.
    assert "SMTPUTF8" in lu["mail"] and "BODY=8BITMIME" in lu["mail"], lu["mail"]
    # (Exim's logwrite escapes non-ASCII bytes in octal: ü is \\303\\274)
    assert r"MAIL FROM:<j\303\274rgen@a.test>" in lu["mail"], lu["mail"]
    for ls in (l1, l2):
        assert "MAIL FROM:<alice@a.test>" in ls["mail"], ls["mail"]
        assert "SMTPUTF8" not in ls["mail"] and "BODY=8BITMIME" not in ls["mail"], ls["mail"]
        assert " utf8=no " in ls["data"], ls["data"]
    # M8S= is the BODY= Exim recorded (0 none, 8 8BITMIME).
    assert " M8S=0 " in l1["arrival"], l1["arrival"]
    assert " utf8=yes " in lu["data"] and " M8S=8 " in lu["arrival"], lu
    # The protocol: esmtps for the plain message on the fresh connection, utf8esmtps for the
    # SMTPUTF8 one. (Exim 4.96 keeps the utf8 prefix of $received_protocol for the rest of a
    # connection once a transaction used SMTPUTF8, even when the next MAIL has no SMTPUTF8 and
    # $message_smtputf8 is false — checked against Exim directly, no Sealgate involved — so
    # the second plain message's P= says utf8esmtps; likewise its M8S= keeps the 8 of the
    # BODY=8BITMIME before. Its MAIL line and utf8=no are what count.)
    assert " P=esmtps " in l1["data"] and " P=esmtps " in l1["arrival"], l1
    assert " P=utf8esmtps " in lu["data"] and " P=utf8esmtps " in lu["arrival"], lu
    assert re.search(r" P=(utf8)?esmtps ", l2["arrival"]), l2
    for ls in (l1, lu, l2):
        assert re.search(r" tls=TLS1\.[23] ", ls["data"]), ls["data"]
        assert re.search(r" X=TLS1\.[23]:", ls["arrival"]), ls["arrival"]
    # One connection: the same client port on all three arrivals.
    ports = {re.search(r"\[127\.0\.0\.\d+\]:(\d+) I=", ls["arrival"]).group(1)
             for ls in (l1, lu, l2)}
    assert len(ports) == 1, (l1["arrival"], lu["arrival"], l2["arrival"])

    # Sealgate: all delivered at the route's level over TLS.
    for qid in qids.values():
        line = gw.wait_log(rf"delivery attempt queue_id={qid} .*")[0].group(0)
        assert f"peer={exim.hop}" in line and f"level={level}" in line, line
        assert re.search(r'tls="?TLSv1\.[23]"? ', line), line
    # Exim's Received header says TLS; the UTF-8 one was received with utf8esmtps.
    assert re.search(r"with esmtps\s+\(TLS1\.[23]\)", header_block(got[m1])), header_block(got[m1])
    assert re.search(r"with utf8esmtps\s+\(TLS1\.[23]\)", header_block(got[mu])), header_block(got[mu])
