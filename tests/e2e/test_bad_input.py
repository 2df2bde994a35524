"""Hostile and broken clients over raw sockets: each gets its specified reply, nothing bad is
queued, and the server keeps serving others."""

import random
import re
import socket
import ssl
import time

import pytest

from clients import marker
from harness import Raw, message, send_raw_message, wait_until

LIMITS = {"max_message_bytes": 65536, "max_recipients": 5, "max_errors": 5}


@pytest.fixture
def gw(gateways):
    return gateways.simple("gw", hostname="gw.test", local_domains=["a.test"], smtp=LIMITS)


def fresh_session_works(gw, source=None) -> None:
    """A normal client still gets its message delivered."""
    mark = marker("fresh")
    r = Raw(gw.addr, source=source)
    assert r.greeting.code == 220, r.greeting
    r.expect("EHLO fresh.test", 250)
    rep = send_raw_message(r, "alice@a.test", ["bob@a.test"], message(mark, "alice@a.test", "bob@a.test"))
    assert rep.code == 250 and rep.text.startswith("250 2.0.0 Ok: queued as "), rep
    r.expect("QUIT", 221)
    r.close()
    gw.wait_message_with(mark.encode())


def accepts(gw, source=None) -> bool:
    """A new connection gets the 220 greeting."""
    r = Raw(gw.addr, source=source, greet=False)
    try:
        return r.reply().code == 220
    except (ConnectionError, OSError):
        return False
    finally:
        r.close()


def assert_code(rep, code: int, enhanced: str):
    assert rep.code == code and enhanced in rep.lines[-1], f"expected {code} {enhanced}, got {rep}"


def test_overlong_command_line(gw):
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    # 512 octets including CRLF is the limit: 510 characters pass the length check
    ok = "MAIL FROM:<" + "a" * (510 - len("MAIL FROM:<@a.test>")) + "@a.test>"
    assert len(ok) == 510
    rep = r.cmd(ok)
    assert rep.lines[-1][4:9] != "5.5.2", f"a 512-octet line was refused as too long: {rep}"
    r.expect("RSET", 250)
    long = "MAIL FROM:<" + "a" * 600 + "@a.test>"
    assert_code(r.cmd(long), 500, "5.5.2")
    r.expect("NOOP", 250)
    # a huge line without CRLF is not buffered without bound
    r.send(b"NOOP " + b"x" * (200 * 1024) + b"\r\n")
    rep = r.reply()
    assert_code(rep, 500, "5.5.2")
    # the line was dropped as it arrived and answered at its end: the session goes on (three
    # error replies at most so far, below max_errors)
    r.expect("NOOP", 250)
    r.close()
    fresh_session_works(gw)


def test_overlong_data_line(gw):
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    # 998 characters + CRLF = 1000 octets: allowed
    ok_mark = marker("line1000")
    data = message(ok_mark, "alice@a.test", "bob@a.test", extra_body="y" * 998 + "\r\n")
    assert_code(send_raw_message(r, "alice@a.test", ["bob@a.test"], data), 250, "2.0.0")
    # 1001 characters: the whole message is refused after the dot
    bad_mark = marker("line1003")
    data = message(bad_mark, "alice@a.test", "bob@a.test", extra_body="z" * 1001 + "\r\n")
    assert_code(send_raw_message(r, "alice@a.test", ["bob@a.test"], data), 500, "5.5.2")
    r.expect("NOOP", 250)
    r.expect("QUIT", 221)
    fresh_session_works(gw)
    msgs = gw.messages()
    assert any(ok_mark.encode() in m and b"y" * 998 + b"\r\n" in m for m in msgs.values())
    assert not any(bad_mark.encode() in m for m in msgs.values())


def test_oversized_message(gw):
    r = Raw(gw.addr)
    ehlo = r.expect("EHLO client.test", 250)
    assert re.search(r"^250[ -]SIZE 65536$", ehlo.text, re.M), ehlo
    assert_code(r.cmd("MAIL FROM:<alice@a.test> SIZE=70000"), 552, "5.3.4")
    r.expect("MAIL FROM:<alice@a.test> SIZE=1000", 250)
    r.expect("RCPT TO:<bob@a.test>", 250)
    r.expect("DATA", 354)
    big_mark = marker("big")
    body = message(big_mark, "alice@a.test", "bob@a.test", extra_body=("b" * 78 + "\r\n") * 900)
    assert len(body) > 70000
    r.send(body + b".\r\n")
    assert_code(r.reply(), 552, "5.3.4")
    # just below the limit is fine
    small_mark = marker("small")
    body = message(small_mark, "alice@a.test", "bob@a.test", extra_body=("s" * 78 + "\r\n") * 780)
    assert 60000 < len(body) < 65536
    assert_code(send_raw_message(r, "alice@a.test", ["bob@a.test"], body), 250, "2.0.0")
    r.expect("QUIT", 221)
    gw.wait_message_with(small_mark.encode())
    gw.wait_queue_empty()
    assert not any(big_mark.encode() in m for m in gw.messages().values())


def test_too_many_recipients(gw):
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    r.expect("MAIL FROM:<alice@a.test>", 250)
    rcpts = [f"user{i}@a.test" for i in range(5)]
    for t in rcpts:
        r.expect(f"RCPT TO:<{t}>", 250)
    assert_code(r.cmd("RCPT TO:<user5@a.test>"), 452, "4.5.3")
    assert_code(r.cmd("RCPT TO:<user6@a.test>"), 452, "4.5.3")
    r.expect("DATA", 354)
    mark = marker("rcpts")
    r.send(message(mark, "alice@a.test", "many@a.test") + b".\r\n")
    assert_code(r.reply(), 250, "2.0.0")
    r.expect("QUIT", 221)
    gw.wait_messages(5)
    gw.wait_queue_empty()
    got = gw.messages()
    delivered_to = sorted(re.search(rb"Delivered-To: (\S+)", v).group(1).decode() for v in got.values())
    assert delivered_to == sorted(rcpts)


def test_commands_out_of_order(gateways):
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"], smtp={"max_errors": 20})
    r = Raw(gw.addr)
    assert_code(r.cmd("MAIL FROM:<alice@a.test>"), 503, "5.5.1")
    r.expect("EHLO client.test", 250)
    assert_code(r.cmd("RCPT TO:<bob@a.test>"), 503, "5.5.1")
    assert_code(r.cmd("DATA"), 503, "5.5.1")
    r.expect("MAIL FROM:<alice@a.test>", 250)
    assert_code(r.cmd("MAIL FROM:<alice@a.test>"), 503, "5.5.1")
    # DATA without a recipient: RFC 5321 §3.3 allows 503 or 554 "no valid recipients"
    rep = r.cmd("DATA")
    assert rep.code in (503, 554) and "5.5.1" in rep.lines[-1], rep
    r.expect("RSET", 250)
    assert_code(r.cmd("RCPT TO:<bob@a.test>"), 503, "5.5.1")
    # RFC 5321 §4.1.4: VRFY gets 252; unknown verbs 500; NOOP 250
    assert r.cmd("VRFY bob").code == 252
    assert r.cmd("FROBNICATE now").code == 500
    r.expect("NOOP", 250)
    mark = marker("after-errors")
    assert_code(send_raw_message(r, "alice@a.test", ["bob@a.test"], message(mark, "alice@a.test", "bob@a.test")), 250, "2.0.0")
    r.expect("QUIT", 221)
    gw.wait_message_with(mark.encode())
    fresh_session_works(gw)


def test_binary_garbage(gw):
    rng = random.Random(20240601)
    r = Raw(gw.addr)
    replies = []
    closed = False
    for i in range(LIMITS["max_errors"] + 3):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(5, 300)))
        junk = junk.replace(b"\n", b"").replace(b"\r", b"")
        if i == 1:
            junk = b"\x00\x00\x00EHLO\x00x"
        if i == 2:
            junk = b"\xff\xfe\xfd" * 50
        try:
            r.send(junk + b"\r\n")
            rep = r.reply()
        except (ConnectionError, OSError):
            closed = True
            break
        replies.append(rep)
        if rep.code == 421:
            break
    assert replies, "no reply to garbage at all"
    assert replies[-1].code == 421 and "4.7.0" in replies[-1].lines[-1], replies
    errors = replies[:-1]
    assert len(errors) >= LIMITS["max_errors"] - 1, replies
    assert all(500 <= e.code < 600 for e in errors), replies
    if not closed:
        assert r.closed_by_peer(), "connection not closed after 421"
    r.close()
    fresh_session_works(gw)


def test_garbage_in_one_write(gw):
    """Random bytes (NUL included) as one big pipelined blob: errors, 421, and no crash."""
    rng = random.Random(7)
    blob = bytes(rng.randrange(256) for _ in range(20000)) + b"\x00" * 100 + b"\r\n" * 20
    r = Raw(gw.addr)
    try:
        r.send(blob)
    except OSError:
        pass  # the server may close (421) before it has read the whole blob
    codes = []
    try:
        while True:
            codes.append(r.reply().code)  # a malformed reply line fails the test here
    except ConnectionResetError:
        pass  # closed with unread input: replies still in flight may be lost
    except (socket.timeout, TimeoutError):
        pytest.fail(f"the server kept the garbage client open (replies so far: {codes})")
    except ConnectionError:
        # an orderly close: every reply arrived, the last being the 421 for too many errors
        assert codes and codes[-1] == 421, codes
    assert not any(200 <= c < 400 for c in codes), codes
    r.close()
    fresh_session_works(gw)


def test_starttls_pipelined_injection(gw):
    """CVE-2011-0411 class: plaintext after STARTTLS in the same packet is discarded."""
    inj_mark = marker("injected")
    r = Raw(gw.addr)
    ehlo = r.expect("EHLO client.test", 250)
    assert "STARTTLS" in ehlo.text
    injected = (
        b"STARTTLS\r\n"
        b"MAIL FROM:<evil@a.test>\r\n"
        b"RCPT TO:<victim@a.test>\r\n"
        b"DATA\r\n" + message(inj_mark, "evil@a.test", "victim@a.test") + b".\r\n"
    )
    r.send(injected)
    rep = r.reply()
    assert rep.code == 220, rep
    assert r.buf == b"", f"plaintext replies to injected commands: {r.buf!r}"
    r.starttls()
    assert r.sock.version() in ("TLSv1.3", "TLSv1.2")
    # reset after TLS: no EHLO yet
    assert_code(r.cmd("MAIL FROM:<alice@a.test>"), 503, "5.5.1")
    ehlo = r.cmd("EHLO client.test")
    # the first reply after the handshake must answer our EHLO, not an injected command
    assert ehlo.code == 250 and len(ehlo.lines) > 1 and "PIPELINING" in ehlo.text, ehlo
    assert "STARTTLS" not in ehlo.text
    assert_code(r.cmd("RCPT TO:<x@a.test>"), 503, "5.5.1")
    assert r.cmd("STARTTLS").code == 503
    mark = marker("legit")
    rep = send_raw_message(r, "alice@a.test", ["bob@a.test"], message(mark, "alice@a.test", "bob@a.test"))
    assert_code(rep, 250, "2.0.0")
    r.expect("QUIT", 221)
    msg = gw.wait_message_with(mark.encode())
    assert b"with ESMTPS (TLSv1.3" in msg
    gw.wait_queue_empty()
    msgs = gw.messages()
    assert len(msgs) == 1, f"something else was queued: {list(msgs)}"
    assert not any(inj_mark.encode() in m or b"victim@" in m for m in msgs.values())
    assert not re.search(r"rcpt=victim@", gw.log())


def test_bare_lf_smuggling(gw):
    """Only CRLF.CRLF ends DATA; bare LF/CR line ends make the message refused (550 5.6.0)."""
    variants = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"]
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    smuggled = []
    for i, end in enumerate(variants):
        smark = marker(f"smuggled{i}")
        smuggled.append(smark)
        r.expect("MAIL FROM:<alice@a.test>", 250)
        r.expect("RCPT TO:<bob@a.test>", 250)
        r.expect("DATA", 354)
        r.send(
            b"Subject: first\r\n\r\nhello" + end
            + b"MAIL FROM:<evil@a.test>\r\nRCPT TO:<victim@a.test>\r\nDATA\r\n"
            + b"Subject: " + smark.encode() + b"\r\n\r\nsmuggled " + smark.encode() + b"\r\n"
        )
        assert r.nothing_within(0.7), f"{end!r} ended DATA: got {r.buf!r}"
        r.send(b".\r\n")
        rep = r.reply()
        assert_code(rep, 550, "5.6.0")
    r.expect("NOOP", 250)
    r.expect("QUIT", 221)
    fresh_session_works(gw)
    gw.wait_queue_empty()
    msgs = gw.messages()
    assert len(msgs) == 1, list(msgs)
    for smark in smuggled:
        assert not any(smark.encode() in m for m in msgs.values())


def test_command_and_data_timeouts(gateways):
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"],
                         smtp={"command_timeout": "2s", "data_timeout": "2s"})
    t0 = time.monotonic()
    idle = Raw(gw.addr)
    rep = idle.reply()
    waited = time.monotonic() - t0
    assert_code(rep, 421, "4.4.2")
    assert 1.5 <= waited < 8, waited
    assert idle.closed_by_peer()

    # mid-transaction idle
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    r.expect("MAIL FROM:<alice@a.test>", 250)
    assert_code(r.reply(), 421, "4.4.2")
    assert r.closed_by_peer()

    # stalled in DATA: 421, and the partial message is not queued
    mark = marker("stalled")
    d = Raw(gw.addr)
    d.expect("EHLO client.test", 250)
    d.expect("MAIL FROM:<alice@a.test>", 250)
    d.expect("RCPT TO:<bob@a.test>", 250)
    d.expect("DATA", 354)
    d.send(message(mark, "alice@a.test", "bob@a.test"))
    assert_code(d.reply(), 421, "4.4.2")
    assert d.closed_by_peer()
    # a client that keeps talking is not cut off by the timeout
    k = Raw(gw.addr)
    k.expect("EHLO client.test", 250)
    for _ in range(4):
        time.sleep(0.8)
        k.expect("NOOP", 250)
    fresh_session_works(gw)
    assert not any(mark.encode() in m for m in gw.messages().values())
    assert gw.queue_files() == []


def test_connection_flood_per_ip(gateways):
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"],
                         smtp={"max_connections_per_ip": 3})
    held = [Raw(gw.addr) for _ in range(3)]
    for h in held:
        assert h.greeting.code == 220
    extra = Raw(gw.addr, greet=False)
    assert_code(extra.reply(), 421, "4.7.0")
    assert extra.closed_by_peer()
    # another client address is not affected by 127.0.0.1's cap
    fresh_session_works(gw, source="127.0.0.9")
    # the three held sessions still work
    for i, h in enumerate(held):
        h.expect(f"EHLO held{i}.test", 250)
    mark = marker("held")
    assert_code(send_raw_message(held[0], "alice@a.test", ["bob@a.test"], message(mark, "alice@a.test", "bob@a.test")), 250, "2.0.0")
    gw.wait_message_with(mark.encode())
    for h in held:
        h.expect("QUIT", 221)
        h.close()

    # once they are gone, new connections are accepted again (the slot release may lag a bit)
    wait_until(lambda: accepts(gw), 10, "a new connection to be accepted after the flood")
    conns = [Raw(gw.addr) for _ in range(3)]
    assert all(c.greeting.code == 220 for c in conns)
    for c in conns:
        c.close()


def test_connection_flood_global(gateways):
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"],
                         smtp={"max_connections": 4, "max_connections_per_ip": 50})
    held = [Raw(gw.addr, source=f"127.0.0.{10 + i}") for i in range(4)]
    assert all(h.greeting.code == 220 for h in held)
    extra = Raw(gw.addr, source="127.0.0.20", greet=False)
    assert_code(extra.reply(), 421, "4.7.0")
    assert extra.closed_by_peer()
    held[0].expect("QUIT", 221)
    held[0].close()
    wait_until(lambda: accepts(gw, source="127.0.0.20"), 10, "a slot to free up")
    for h in held[1:]:
        h.expect("NOOP", 250)
        h.close()
    fresh_session_works(gw)


def test_tls_handshake_garbage(gateways):
    """Garbage instead of a TLS ClientHello on the implicit port and after STARTTLS."""
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"], implicit=True)
    s = socket.create_connection(gw.tls_addr, timeout=10)
    s.sendall(b"EHLO not-tls\r\n" + bytes(range(256)) * 4)
    s.settimeout(10)
    got = b""
    try:
        while True:
            d = s.recv(4096)
            if not d:
                break
            got += d
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail("implicit-TLS listener kept a non-TLS client open")
    s.close()
    assert b"220" not in got and b"250" not in got, f"SMTP spoken before TLS: {got!r}"
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    assert r.cmd("STARTTLS").code == 220
    r.send(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 100)
    assert r.closed_by_peer()
    # TLS still works for others, on both listeners
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(gw.tls_addr, timeout=10) as raw:
        with ctx.wrap_socket(raw) as t:
            assert t.recv(512).startswith(b"220 ")
    fresh_session_works(gw)


def test_spool_full_refuses_before_data(gateways):
    """Below min_free_bytes the box says 452 4.3.1 before accepting anything."""
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"],
                         queue={"min_free_bytes": 1 << 60})
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    rep = r.cmd("MAIL FROM:<alice@a.test>")
    if rep.code == 250:
        r.expect("RCPT TO:<bob@a.test>", 250)
        rep = r.cmd("DATA")
    assert_code(rep, 452, "4.3.1")
    r.expect("QUIT", 221)
    assert gw.queue_files() == []


def test_no_certificate_no_starttls(gateways):
    """Encryption is off until a certificate is present: no STARTTLS, no implicit listener."""
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"], implicit=True,
                         certificates=[], tls={"dev_self_signed": False})
    assert gw.smtps == [], gw.ready_line
    r = Raw(gw.addr)
    ehlo = r.expect("EHLO client.test", 250)
    assert "STARTTLS" not in ehlo.text
    rep = r.cmd("STARTTLS")
    assert 400 <= rep.code < 600, rep
    mark = marker("nocert")
    rep = send_raw_message(r, "alice@a.test", ["bob@a.test"], message(mark, "alice@a.test", "bob@a.test"))
    assert_code(rep, 250, "2.0.0")
    r.expect("QUIT", 221)
    msg = gw.wait_message_with(mark.encode())
    assert re.search(rb"with ESMTP\b(?!S)", msg)
    assert not (gw.state / "certs" / "default.crt.pem").exists()
