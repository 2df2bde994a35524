"""Gateway to gateway: relaying over STARTTLS, relay control, ETRN, DSNs."""

import re
import smtplib
import time
from concurrent.futures import ThreadPoolExecutor

from clients import marker, verifying_ctx
from fakepeer import FakePeer
from harness import (
    Raw,
    free_port,
    header_block,
    message,
    queue_id,
    received_headers,
    send_raw_message,
    submit_one,
    wait_until,
)


def relay_routes(next_hop: str, local=("a.test",), **extra) -> list[dict]:
    routes = [{"domain": d, "maildir": "maildir"} for d in local]
    routes.append({"domain": "*", "next_hop": [next_hop], "tls": "may", **extra})
    return routes


def test_two_gateways_relay_over_starttls(gateways):
    b = gateways.simple("b", ip="127.0.0.2", hostname="gw-b.test", local_domains=["b.test"],
                        trusted_networks=[])
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        routes=relay_routes("%s:%d" % b.addr))
    mark = marker("relay")
    long_line = "x" * 990
    body = (
        f"8-bit text: gr\u00fc\u00dfe \u2014 caf\u00e9\r\n"
        ".a line with a leading dot\r\n"
        "..two dots\r\n"
        f"{long_line}\r\n"
        "trailing spaces   \r\n"
        "\r\n"
        "end\r\n"
    )
    data = message(mark, "alice@a.test", "user@b.test").replace(b"us-ascii", b"utf-8")
    data += body.encode("utf-8")
    with smtplib.SMTP(*a.addr, local_hostname="client.test", timeout=15) as s:
        s.ehlo()
        s.starttls(context=verifying_ctx(a.cert_file, hostname_check=False))
        s.ehlo()
        code, _ = s.mail("alice@a.test", ["BODY=8BITMIME"])
        assert code == 250
        code, text = s.rcpt("user@b.test")
        assert code == 250, text
        code, text = s.data(data)
        assert code == 250, text
    qid = queue_id(text.decode())

    got = b.wait_message_with(mark.encode())
    # the client's message arrives byte for byte, below the trace fields
    assert got.endswith(data), "message altered in transit:\n%r" % got[-600:]
    trace = got[: -len(data)]
    assert trace.startswith(b"Return-Path: <alice@a.test>\r\nDelivered-To: user@b.test\r\n"), trace
    rec = received_headers(trace + b"\r\n")
    assert len(rec) == 2, rec
    b_rec, a_rec = rec
    assert "from gw-a.test ([127.0.0.1])" in b_rec and "by gw-b.test (Sealgate)" in b_rec, b_rec
    assert re.search(r"with ESMTPS \(TLSv1\.3 TLS_\w+\)", b_rec), b_rec
    assert "from client.test ([127.0.0.1])" in a_rec and "by gw-a.test (Sealgate)" in a_rec, a_rec
    assert re.search(rf"with ESMTPS \(TLSv1\.3 TLS_\w+\) id {re.escape(qid)}\b", a_rec), a_rec

    # A logged the delivery with the TLS version of the hop, and forgot the message
    line = a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@b\.test result=Delivered\(.*")
    assert "TLSv1.3" in line[0].group(0) and "127.0.0.2" in line[0].group(0), line[0].group(0)
    a.wait_log(rf"done queue_id={re.escape(qid)} ")
    a.wait_queue_empty()
    b.wait_queue_empty()
    # B logged A's session as TLS 1.3 (when it ended: A keeps idle connections, so stop A)
    assert a.stop() == 0
    b.wait_log(r'session client=127\.0\.0\.1 .*helo="?gw-a\.test"? .*tls="?TLSv1\.3')


def test_relay_connection_reuse(gateways):
    """Several messages for the same next hop: all arrive, in fewer sessions than messages."""
    b = gateways.simple("b", ip="127.0.0.2", hostname="gw-b.test", local_domains=["b.test"],
                        trusted_networks=[])
    # One delivery at a time: with parallel deliveries, messages that arrive together each
    # open a connection before any is parked, and whether one is reused depends on timing.
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        routes=relay_routes("%s:%d" % b.addr), queue={"max_deliveries": 1})
    marks = [marker(f"reuse{i}") for i in range(6)]
    r = Raw(a.addr)
    r.expect("EHLO client.test", 250)
    for m in marks:
        rep = send_raw_message(r, "alice@a.test", ["u@b.test"], message(m, "alice@a.test", "u@b.test"))
        assert rep.code == 250, rep
    r.expect("QUIT", 221)
    got = b.wait_messages(len(marks))
    for m in marks:
        assert sum(m.encode() in v for v in got.values()) == 1, m
    a.wait_queue_empty()
    # B logs a session when it ends; A keeps idle connections, so stop A to end them
    assert a.stop() == 0

    def counts():
        per_session = [int(x) for x in re.findall(r'helo="?gw-a\.test"? .*?messages=(\d+)', b.log())]
        return per_session if sum(per_session) == len(marks) else None

    per_session = wait_until(counts, 20, "B's session lines for A's connections")
    assert len(per_session) < len(marks), f"no connection reuse: {per_session}"


def test_burst_to_one_next_hop_stays_within_max_connections_per_hop(gateways):
    """Twelve messages arriving at once for one next hop: at most `max_connections_per_hop`
    (here 2) connections are ever opened to it; the other deliveries wait for a parked one
    and reuse it (the log's conn_use counts up), and every message arrives once."""
    peer = FakePeer("127.0.0.6", idle_timeout=60.0)
    try:
        a = gateways.simple(
            "a", hostname="gw-a.test", local_domains=["a.test"],
            routes=[{"domain": "b.test", "next_hop": [peer.hop], "tls": "none"}],
            queue={"max_deliveries": 16, "max_connections_per_hop": 2})
        marks = [marker(f"burst{i}") for i in range(12)]
        with ThreadPoolExecutor(len(marks)) as pool:
            list(pool.map(lambda m: submit_one(a.addr, "alice@a.test", "u@b.test", m), marks))
        for m in marks:
            peer.wait_message(m)
        a.wait_queue_empty()
        for m in marks:
            assert len(peer.with_marker(m)) == 1, m
        sessions = peer.sessions()
        assert 1 <= len(sessions) <= 2, [(s.n, len(s.messages)) for s in sessions]
        uses = [int(u) for u in re.findall(r"delivery attempt .*? conn_use=(\d+)", a.log())]
        assert len(uses) == len(marks) and max(uses) >= len(marks) // 2, uses
    finally:
        peer.close()
    assert not peer.errors, peer.errors


def test_open_relay_refused(gateways):
    closed = free_port("127.0.0.3")
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"],
                         trusted_networks=["127.0.0.1/32"],
                         routes=relay_routes(f"127.0.0.3:{closed}"),
                         queue={"retry_schedule": ["1h"]})
    # untrusted client (bound to 127.0.0.9)
    r = Raw(gw.addr, source="127.0.0.9")
    assert r.sock.getsockname()[0] == "127.0.0.9"
    r.expect("EHLO outsider.test", 250)
    r.expect("MAIL FROM:<spammer@evil.test>", 250)
    for rcpt in [
        "victim@external.test",
        "victim@EXTERNAL.test",
        "victim@sub.a.test",
        "victim@a.test.evil.test",
        "@a.test:victim@external.test",
    ]:
        rep = r.cmd(f"RCPT TO:<{rcpt}>")
        assert rep.code >= 500, f"untrusted RCPT {rcpt} -> {rep}"
        if "@" in rcpt and not rcpt.startswith("@"):
            assert rep.code == 554 and "5.7.1" in rep.text, f"{rcpt} -> {rep}"
    # local domain from anyone (case-insensitive)
    r.expect("RCPT TO:<bob@A.TEST>", 250)
    r.expect("DATA", 354)
    mark = marker("outsider")
    r.send(message(mark, "spammer@evil.test", "bob@a.test") + b".\r\n")
    rep = r.reply()
    assert rep.code == 250, rep
    r.expect("QUIT", 221)
    msg = gw.wait_message_with(mark.encode())
    assert b"Delivered-To: bob@" in msg and b"[127.0.0.9]" in msg
    gw.wait_queue_empty()

    # trusted client: the same external recipient is accepted
    t = Raw(gw.addr)
    t.expect("EHLO insider.test", 250)
    t.expect("MAIL FROM:<alice@a.test>", 250)
    t.expect("RCPT TO:<victim@external.test>", 250)
    t.expect("RSET", 250)
    t.expect("QUIT", 221)
    # nothing for external.test ever reached the queue
    assert gw.queue_files() == []


def test_etrn(gateways):
    sink_port = free_port("127.0.0.3")
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        trusted_networks=["127.0.0.1/32"],
                        routes=[{"domain": "a.test", "maildir": "maildir"},
                                {"domain": "c.test", "next_hop": [f"127.0.0.3:{sink_port}"],
                                 "tls": "may"}],
                        queue={"retry_schedule": ["1h"]})
    mark = marker("etrn")
    r = Raw(a.addr)
    ehlo = r.expect("EHLO client.test", 250)
    assert "ETRN" in ehlo.text
    rep = send_raw_message(r, "alice@a.test", ["user@c.test"], message(mark, "alice@a.test", "user@c.test"))
    assert rep.code == 250, rep
    qid = queue_id(rep.text)
    r.expect("QUIT", 221)
    # the first attempt fails (nobody listens), the next one is an hour away
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@c\.test result=Deferred")
    assert qid in a.queue_files()

    c = gateways.simple("c", ip="127.0.0.3", hostname="gw-c.test", local_domains=["c.test"],
                        trusted_networks=[], listen=[f"127.0.0.3:{sink_port}"])

    # ETRN from an untrusted address is refused and triggers nothing
    u = Raw(a.addr, source="127.0.0.9")
    u.expect("EHLO outsider.test", 250)
    rep = u.cmd("ETRN c.test")
    assert rep.code >= 400, f"untrusted ETRN accepted: {rep}"
    u.expect("QUIT", 221)
    time.sleep(1.5)  # negative check: give a wrongly triggered run the time to show
    assert c.messages() == {}, "untrusted ETRN triggered a delivery"

    t = Raw(a.addr)
    t.expect("EHLO client.test", 250)
    rep = t.cmd("ETRN nothing-queued.test")
    assert rep.code in (458, 459), f"ETRN for a domain without mail: {rep}"
    t0 = time.monotonic()
    rep = t.cmd("ETRN c.test")
    assert rep.code == 250, rep
    t.expect("QUIT", 221)
    got = c.wait_message_with(mark.encode(), timeout=20)
    assert time.monotonic() - t0 < 20
    assert got.endswith(message(mark, "alice@a.test", "user@c.test"))
    a.wait_queue_empty()


def _dsn_checks(dsn: bytes, sender: str, failed: str, hostname: str, mark: str):
    text = dsn.decode("utf-8", "replace")
    head = header_block(dsn)
    assert text.startswith(f"Return-Path: <>\r\nDelivered-To: {sender}\r\n"), text[:300]
    assert re.search(r"(?im)^Content-Type:\s*multipart/report;[\s\S]*?report-type=\"?delivery-status", head), head
    assert re.search(rf"(?im)^From:.*MAILER-DAEMON@{re.escape(hostname)}", head), head
    assert re.search(rf"(?im)^To:.*{re.escape(sender)}", head), head
    assert re.search(r"(?im)^Content-Type:\s*message/delivery-status", text), text
    assert re.search(rf"(?im)^Final-Recipient:\s*rfc822;\s*{re.escape(failed)}\s*$", text), text
    assert re.search(r"(?im)^Action:\s*failed\s*$", text), text
    assert re.search(r"(?im)^Status:\s*5\.7\.1\s*$", text), text
    assert re.search(r"(?im)^Diagnostic-Code:\s*smtp;\s*554\b", text), text
    assert mark in text, "DSN does not include the original message's headers"
    for line in dsn.split(b"\r\n"):
        assert len(line) <= 998


def test_dsn_on_permanent_failure(gateways):
    b = gateways.simple("b", ip="127.0.0.2", hostname="gw-b.test", local_domains=["b.test"],
                        trusted_networks=[])
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        routes=relay_routes("%s:%d" % b.addr))
    mark = marker("bounce")
    r = Raw(a.addr)
    r.expect("EHLO client.test", 250)
    rcpts = ["user@elsewhere.test", "carol@a.test"]
    rep = send_raw_message(r, "alice@a.test", rcpts, message(mark, "alice@a.test", rcpts[0]))
    assert rep.code == 250, rep
    qid = queue_id(rep.text)

    # null sender: the failure is final, and no DSN is made
    mark0 = marker("nullsender")
    rep = send_raw_message(r, "", ["user2@elsewhere.test"], message(mark0, "", "user2@elsewhere.test"))
    assert rep.code == 250, rep
    qid0 = queue_id(rep.text)
    r.expect("QUIT", 221)

    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@elsewhere\.test result=Failed\(.*554")
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=carol@a\.test result=Delivered")
    a.wait_log(rf"delivery queue_id={re.escape(qid0)} rcpt=user2@elsewhere\.test result=Failed\(.*554")
    a.wait_log(rf"done queue_id={re.escape(qid0)} ")

    def dsns():
        return [v for v in a.messages().values() if v.startswith(b"Return-Path: <>")]

    (dsn,) = wait_until(dsns, 20, "the DSN in A's Maildir")
    _dsn_checks(dsn, "alice@a.test", "user@elsewhere.test", "gw-a.test", mark)
    assert b"carol@a.test" not in dsn.split(b"message/delivery-status", 1)[1].split(b"\r\n--", 1)[0], \
        "the delivered recipient is listed in the delivery-status part"
    # the local recipient got the original
    orig = a.wait_message_with(mark.encode())
    assert orig.startswith(b"Return-Path: <alice@a.test>\r\nDelivered-To: carol@a.test\r\n")
    a.wait_queue_empty()
    # no DSN for the null sender, nothing at B
    assert len(dsns()) == 1
    assert not any(mark0.encode() in v for v in a.messages().values())
    assert not re.search(rf"DSN queued.*original={re.escape(qid0)}", a.log())
    assert b.messages() == {}


def test_dsn_after_max_queue_time(gateways):
    closed = free_port("127.0.0.3")
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        routes=relay_routes(f"127.0.0.3:{closed}"),
                        queue={"retry_schedule": ["1s"], "max_queue_time": "3s",
                               "connect_timeout": "2s"})
    mark = marker("expire")
    r = Raw(a.addr)
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, "alice@a.test", ["late@far.test"], message(mark, "alice@a.test", "late@far.test"))
    assert rep.code == 250, rep
    qid = queue_id(rep.text)
    r.expect("QUIT", 221)
    t0 = time.monotonic()
    dsn = wait_until(
        lambda: next((v for v in a.messages().values() if v.startswith(b"Return-Path: <>")), None),
        30, "the expiry DSN")
    assert time.monotonic() - t0 >= 2.0, "bounced before max_queue_time"
    text = dsn.decode("utf-8", "replace")
    assert re.search(r"(?im)^Final-Recipient:\s*rfc822;\s*late@far\.test\s*$", text), text
    assert re.search(r"(?im)^Action:\s*failed\s*$", text), text
    # the last error (connection refused, 4.4.1) made permanent: what kept the message
    assert re.search(r"(?im)^Status:\s*5\.4\.1\s*$", text), text
    assert re.search(r"(?ims)^Diagnostic-Code:.*?gave up after.*?last\s+error:\s+4\.4\.1\s", text), text
    assert mark in text
    a.wait_log(rf"done queue_id={re.escape(qid)} ")
    a.wait_queue_empty()


def test_untrusted_bare_postmaster_is_not_relayed(gateways):
    """RFC 5321 §4.1.1.3: the bare `<postmaster>` is the receiving gateway's own, so A accepts
    it even from an untrusted client, stores it as postmaster@<its first local domain> and
    delivers it locally; the `*` route never sends it to B."""
    b = gateways.simple("b", ip="127.0.0.2", hostname="gw-b.test", local_domains=["b.test"],
                        trusted_networks=["127.0.0.0/8"])
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        routes=relay_routes("%s:%d" % b.addr))
    r = Raw(a.addr, source="127.0.0.9")
    r.expect("EHLO outsider.test", 250)
    r.expect("MAIL FROM:<spammer@evil.test>", 250)
    rep = r.cmd("RCPT TO:<postmaster>")
    assert rep.code == 250 and "2.1.5" in rep.lines[-1], rep
    # the same client is refused relaying to another domain (the postmaster is not a way out)
    rep = r.cmd("RCPT TO:<postmaster@b.test>")
    assert rep.code == 554 and "5.7.1" in rep.lines[-1], rep
    r.expect("DATA", 354)
    mark = marker("postmaster")
    r.send(message(mark, "spammer@evil.test", "postmaster") + b".\r\n")
    rep = r.reply()
    assert rep.code == 250, rep
    qid = queue_id(rep.text)
    r.expect("QUIT", 221)
    a.wait_log(rf"done queue_id={re.escape(qid)} ")
    lines = re.findall(rf"^.*\bdelivery queue_id={re.escape(qid)} .*$", a.log(), re.M)
    assert len(lines) == 1, lines
    assert "rcpt=postmaster@a.test" in lines[0] and "result=Delivered" in lines[0], lines[0]
    assert "127.0.0.2" not in lines[0], f"relayed for an untrusted client to the next hop: {lines[0]}"
    got = a.wait_message_with(mark.encode())
    assert got.startswith(b"Return-Path: <spammer@evil.test>\r\nDelivered-To: postmaster@a.test\r\n"), got[:300]
    assert not [v for v in b.messages().values() if mark.encode() in v], "B got the message"
    assert "queued queue_id=" not in b.log(), "B accepted a message"


def test_quoted_local_part_relayed_intact(gateways):
    b = gateways.simple("b", ip="127.0.0.2", hostname="gw-b.test", local_domains=["b.test"],
                        trusted_networks=[])
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        routes=relay_routes("%s:%d" % b.addr))
    mark = marker("quoted")
    r = Raw(a.addr)
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, "alice@a.test", ['"john smith"@b.test'],
                           message(mark, "alice@a.test", "john@b.test"))
    assert rep.code == 250, rep
    qid = queue_id(rep.text)
    r.expect("QUIT", 221)
    a.wait_log(rf"done queue_id={re.escape(qid)} ")
    line = re.search(rf"delivery queue_id={re.escape(qid)} .*", a.log()).group(0)
    assert "result=Delivered" in line, line
    got = b.wait_message_with(mark.encode())
    assert b'Delivered-To: "john smith"@b.test\r\n' in got


def test_outbound_connections_leave_from_bind_address(gateways):
    """`queue.bind_address`: the next hop sees the configured source address (what its
    forced-TLS and VPN peer lists match), not whatever the kernel picks."""
    b = gateways.simple("b", ip="127.0.0.2", hostname="gw-b.test", local_domains=["b.test"],
                        trusted_networks=[])
    a = gateways.simple("a", ip="127.0.0.1", hostname="gw-a.test", local_domains=["a.test"],
                        routes=relay_routes("%s:%d" % b.addr),
                        queue={"bind_address": "127.0.0.6"})
    mark = marker("bind")
    r = Raw(a.addr)
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, "alice@a.test", ["user@b.test"], message(mark, "alice@a.test", "user@b.test"))
    assert rep.code == 250, rep
    got = b.wait_message_with(mark.encode())
    b_rec = received_headers(got)[0]
    assert "from gw-a.test ([127.0.0.6])" in b_rec, b_rec
