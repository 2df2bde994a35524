"""Real SMTP clients (swaks, openssl s_client, Python smtplib) against the real daemon: the
embedded default and configured instances. Every message is checked in the Maildir."""

import os
import re
import shlex
import subprocess

import pytest

from clients import (
    check_delivered,
    marker,
    openssl_send,
    smtplib_ssl,
    smtplib_starttls,
    swaks,
    swaks_queue_id,
)
from harness import port_is_free, queue_id, wait_until

FROM = "alice@a.test"
TO = "bob@a.test"


@pytest.fixture
def gw(gateways):
    """A configured gateway on 127.0.0.1: STARTTLS listener + implicit TLS, local a.test."""
    return gateways.simple("gw", implicit=True, hostname="gw.test")


def test_embedded_default(gateways):
    """`sealgate --state DIR`: ready line, self-signed cert for localhost, the printed swaks
    command works, and every client kind delivers into DIR/maildir."""
    wait_until(
        lambda: port_is_free("127.0.0.1", 2525) and port_is_free("127.0.0.1", 4465),
        30,
        "127.0.0.1:2525 and :4465 to be free (the embedded default's fixed ports)",
    )
    gw = gateways("default", None)
    state = os.path.realpath(gw.state)
    assert gw.ready_line == f"sealgate ready: smtp=127.0.0.1:2525 smtps=127.0.0.1:4465 state={state}"
    try_lines = wait_until(lambda: [l for l in gw.stdout_lines if l.startswith("try: ")], 10,
                           "the 'try:' line after the ready line")
    assert try_lines and "swaks" in try_lines[0] and "2525" in try_lines[0], gw.stdout_lines
    # the dev certificate is made on the box: its key lives only in the sealed store, its
    # public chain is exported for clients that pin it
    assert gw.cert_file.is_file()
    assert not list((gw.state / "certs").glob("*.key*")), "a private key on the data disk"
    assert (gw.state / "sealed" / "store.a").is_file()
    sealed = (gw.state / "sealed" / "store.a").read_bytes()
    assert b"PRIVATE" not in sealed and b"BEGIN" not in sealed, "the sealed store is not encrypted"
    pem = gw.cert_file.read_text()
    assert "BEGIN CERTIFICATE" in pem
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(gw.cert_file)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "DNS:localhost" in text and "id-ecPublicKey" in text and "P-256" in text, text

    # 1. exactly the command the daemon printed
    cmd = shlex.split(try_lines[0][len("try: "):])
    p = subprocess.run(cmd + ["--timeout", "15"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    qid = swaks_queue_id(p.stdout)
    msgs = gw.wait_messages(1)
    (only,) = msgs.values()
    rec = check_delivered(only, frm="you@example.test", to="postmaster@example.test", mark=None,
                          hostname="localhost", tls=True, qid=qid)
    assert rec.group(1) in ("TLSv1.3", "TLSv1.2")

    # 2. swaks STARTTLS, implicit TLS, pipelining, plain
    cases = [
        ("starttls", gw.addr, ["-tls"], True),
        ("implicit", gw.tls_addr, ["--tlsc"], True),
        ("pipeline", gw.addr, ["--pipeline", "-tls"], True),
        ("plain", gw.addr, [], False),
    ]
    for tag, addr, flags, tls in cases:
        mark = marker(f"default-{tag}")
        out = swaks(addr, "you@example.test", "postmaster@example.test", mark, *flags)
        qid = swaks_queue_id(out)
        msg = gw.wait_message_with(mark.encode())
        check_delivered(msg, frm="you@example.test", to="postmaster@example.test", mark=mark,
                        hostname="localhost", tls=tls, qid=qid)

    # 3. smtplib with full certificate verification against the generated cert (name localhost)
    mark = marker("default-smtplib")
    version = smtplib_starttls(gw.addr, "you@example.test", "postmaster@example.test", mark,
                               gw.cert_file, connect_host="localhost")
    assert version in ("TLSv1.3", "TLSv1.2")
    msg = gw.wait_message_with(mark.encode())
    check_delivered(msg, frm="you@example.test", to="postmaster@example.test", mark=mark,
                    hostname="localhost", tls=True)

    mark = marker("default-smtps")
    version, reply = smtplib_ssl(gw.tls_addr, "you@example.test", "postmaster@example.test",
                                 mark, gw.cert_file, connect_host="localhost")
    msg = gw.wait_message_with(mark.encode())
    check_delivered(msg, frm="you@example.test", to="postmaster@example.test", mark=mark,
                    hostname="localhost", tls=True, qid=queue_id(reply))

    # 4. openssl s_client -starttls smtp, verifying the chain and the name localhost
    mark = marker("default-openssl")
    o = openssl_send(gw.addr, starttls=True, cafile=gw.cert_file, verify_host="localhost",
                     frm="you@example.test", to="postmaster@example.test", mark=mark)
    assert o["verify"] == (0, "ok"), o["transcript"]
    assert o["protocol"] in ("TLSv1.3", "TLSv1.2"), o["transcript"]
    msg = gw.wait_message_with(mark.encode())
    check_delivered(msg, frm="you@example.test", to="postmaster@example.test", mark=mark,
                    hostname="localhost", tls=True, qid=queue_id(o["queue_reply"]))
    gw.wait_queue_empty()
    assert gw.stop() == 0, "SIGTERM should end the daemon cleanly"


@pytest.mark.parametrize(
    "mode,flags,tls",
    [
        ("plain", [], False),
        ("starttls", ["-tls"], True),
        ("implicit", ["--tlsc"], True),
        ("pipelining", ["--pipeline"], False),
        ("pipelining-starttls", ["--pipeline", "-tls"], True),
    ],
)
def test_swaks(gw, mode, flags, tls):
    mark = marker(f"swaks-{mode}")
    addr = gw.tls_addr if mode == "implicit" else gw.addr
    out = swaks(addr, FROM, TO, mark, *flags)
    if tls:
        assert re.search(r"TLS started with cipher TLSv1\.[23]:", out), out
    if "pipelining" in mode:
        assert "PIPELINING" in out, out
        # swaks sends MAIL, RCPT and DATA in one write only when it runs in pipelining mode
        assert re.search(r"[-~]> MAIL FROM.*\n\s*[-~]> RCPT TO.*\n\s*[-~]> DATA", out), out
    qid = swaks_queue_id(out)
    msg = gw.wait_message_with(mark.encode())
    m = check_delivered(msg, frm=FROM, to=TO, mark=mark, hostname="gw.test", tls=tls, qid=qid)
    # dot-stuffing survived the round trip: swaks sent "..leading dot line"
    assert b"\r\n.leading dot line\r\n" in msg, msg
    if tls:
        assert m.group(1) == "TLSv1.3"
    # the session log line names the client, TLS and the queue id
    line = gw.wait_log(rf"session client=127\.0\.0\.1 .*queue_ids=\S*{re.escape(qid)}")[0].group(0)
    if tls:
        assert re.search(r"tls=\"?TLSv1\.3\"? cipher=\"?TLS_", line), line
    gw.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt={re.escape(TO)} result=Delivered")
    gw.wait_queue_empty()


def test_openssl_s_client_starttls(gw):
    mark = marker("openssl")
    o = openssl_send(gw.addr, starttls=True, cafile=gw.cert_file, verify_host="gw.test",
                     frm=FROM, to=TO, mark=mark)
    assert o["verify"] == (0, "ok"), o["transcript"]
    assert o["protocol"] == "TLSv1.3", o["transcript"]
    qid = queue_id(o["queue_reply"])
    msg = gw.wait_message_with(mark.encode())
    check_delivered(msg, frm=FROM, to=TO, mark=mark, hostname="gw.test", tls=True, qid=qid)
    assert b"\r\n.stuffed dot\r\n" in msg


def test_openssl_s_client_tls12_implicit(gw):
    """TLS 1.2 is still spoken (AEAD suites only); implicit TLS port."""
    mark = marker("openssl12")
    o = openssl_send(gw.tls_addr, starttls=False, cafile=gw.cert_file, verify_host="gw.test",
                     frm=FROM, to=TO, mark=mark, extra=["-tls1_2"])
    assert o["protocol"] == "TLSv1.2", o["transcript"]
    assert re.search(r"GCM|CHACHA20", o["cipher"]), o["cipher"]
    assert o["verify"] == (0, "ok"), o["transcript"]
    msg = gw.wait_message_with(mark.encode())
    m = check_delivered(msg, frm=FROM, to=TO, mark=mark, hostname="gw.test", tls=True,
                        qid=queue_id(o["queue_reply"]))
    assert m.group(1) == "TLSv1.2"


def test_openssl_refuses_wrong_name(gw):
    """The generated certificate names the configured hostname, not anything else."""
    p = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", "%s:%d" % gw.addr,
         "-CAfile", str(gw.cert_file), "-verify_hostname", "other.test", "-brief"],
        input="", capture_output=True, text=True, timeout=30,
    )
    out = p.stdout + p.stderr
    assert re.search(r"[Vv]erif\w* (error|return code).*(mismatch|62)", out), out


def test_smtplib_starttls_send_message(gw):
    mark = marker("smtplib")
    version = smtplib_starttls(gw.addr, FROM, TO, mark, gw.cert_file)
    assert version == "TLSv1.3"
    msg = gw.wait_message_with(mark.encode())
    check_delivered(msg, frm=FROM, to=TO, mark=mark, hostname="gw.test", tls=True)
    assert b"\r\n.a line with a leading dot\r\n" in msg


def test_smtplib_ssl(gw):
    mark = marker("smtps")
    version, reply = smtplib_ssl(gw.tls_addr, FROM, TO, mark, gw.cert_file)
    assert version == "TLSv1.3"
    msg = gw.wait_message_with(mark.encode())
    check_delivered(msg, frm=FROM, to=TO, mark=mark, hostname="gw.test", tls=True,
                    qid=queue_id(reply))
