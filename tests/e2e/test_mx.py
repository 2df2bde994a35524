"""Delivery by DNS MX (route `mx = true`) against a stub authoritative DNS server.

Layout (all on 127.0.0.0/8):
  * the DNS stub (dnsstub.py) on 127.0.0.53, a free port, UDP and TCP;
  * gateway A on 127.0.0.1: local domain a.test (Maildir), everything else `mx = true` on port P,
    `[dns] resolver` = the stub;
  * gateway B on 127.0.0.4:P, the MX sink: local domains *.test of the tests (Maildir).
"""

from __future__ import annotations

import re
import time

import pytest

from clients import marker
from dnsstub import DnsStub
from harness import (
    Raw,
    free_port,
    header_block,
    message,
    port_is_free,
    queue_id,
    received_headers,
    send_raw_message,
    wait_until,
)

STUB_IP = "127.0.0.53"
SINK_IP = "127.0.0.4"
DEAD_IP = "127.0.0.5"
SINK_DOMAINS = ["mx.test", "mx2.test", "implicit.test"]


@pytest.fixture
def dns():
    """`dns(records)` starts a stub serving the zone `test`; all are stopped afterwards."""
    stubs: list[DnsStub] = []

    def make(records: dict, **kw) -> DnsStub:
        s = DnsStub(records, ip=STUB_IP, **kw).start()
        stubs.append(s)
        return s

    yield make
    for s in stubs:
        s.stop()


def sink(gateways, port: int):
    return gateways.simple("b", ip=SINK_IP, hostname="gw-b.test", local_domains=SINK_DOMAINS,
                           trusted_networks=[], listen=[f"{SINK_IP}:{port}"])


def mx_gateway(gateways, resolver: str, port: int, **queue):
    q = {"retry_schedule": ["1s"], "connect_timeout": "2s"}
    q.update(queue)
    return gateways.simple(
        "a", hostname="gw-a.test", local_domains=["a.test"],
        routes=[{"domain": "a.test", "maildir": "maildir"},
                {"domain": "*", "mx": True, "port": port, "tls": "may"}],
        dns={"resolver": [resolver]}, queue=q)


def submit(gw, rcpts: list[str], tag: str, frm: str = "alice@a.test") -> tuple[str, str, bytes]:
    """Sends one message as a trusted client; returns (queue id, marker, data)."""
    mark = marker(tag)
    data = message(mark, frm, rcpts[0])
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, frm, rcpts, data)
    assert rep.code == 250, rep
    r.expect("QUIT", 221)
    return queue_id(rep.text), mark, data


def dsns(gw) -> list[bytes]:
    return [v for v in gw.messages().values() if v.startswith(b"Return-Path: <>")]


def check_dsn(dsn: bytes, *, sender: str, failed: str, status: str, mark: str) -> str:
    text = dsn.decode("utf-8", "replace")
    head = header_block(dsn)
    assert text.startswith(f"Return-Path: <>\r\nDelivered-To: {sender}\r\n"), text[:300]
    assert re.search(r"(?im)^Content-Type:\s*multipart/report;[\s\S]*?report-type=\"?delivery-status",
                     head), head
    assert re.search(r"(?im)^From:.*MAILER-DAEMON@gw-a\.test", head), head
    assert re.search(r"(?im)^Content-Type:\s*message/delivery-status", text), text
    assert re.search(rf"(?im)^Final-Recipient:\s*rfc822;\s*{re.escape(failed)}\s*$", text), text
    assert re.search(r"(?im)^Action:\s*failed\s*$", text), text
    assert re.search(rf"(?im)^Status:\s*{re.escape(status)}\s*$", text), text
    assert mark in text, "DSN does not include the original message's headers"
    return text


# ---------------------------------------------------------------------------------------------


def test_mx_delivery(gateways, dns):
    port = free_port(SINK_IP)
    stub = dns({"mx.test": [("MX", 10, "mx1.mx.test")],
                "mx1.mx.test": [("A", SINK_IP)]})
    b = sink(gateways, port)
    a = mx_gateway(gateways, stub.address, port)
    qid, mark, data = submit(a, ["user@mx.test"], "mx")

    got = b.wait_message_with(mark.encode())
    assert got.endswith(data), "message altered in transit"
    trace = got[: -len(data)]
    assert trace.startswith(b"Return-Path: <alice@a.test>\r\nDelivered-To: user@mx.test\r\n"), trace
    b_rec = received_headers(trace + b"\r\n")[0]
    assert "from gw-a.test ([127.0.0.1])" in b_rec and "by gw-b.test (Sealgate)" in b_rec, b_rec
    assert re.search(r"with ESMTPS \(TLSv1\.[23] ", b_rec), b_rec

    att = a.wait_log(rf"queue_id={re.escape(qid)} peer={re.escape(SINK_IP)}:{port} .*"
                     r"host=\"?mx1\.mx\.test\"? .*tls=TLSv1\.[23] .*")[0].group(0)
    assert "accepted=1" in att, att
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@mx\.test result=Delivered\(")
    a.wait_log(rf"done queue_id={re.escape(qid)} attempts=1\b")
    a.wait_queue_empty()
    assert dsns(a) == []
    # the gateway asked our server, for the MX first and then for the exchange's address
    assert stub.asked("mx.test", "MX"), stub.queries
    assert stub.asked("mx1.mx.test", "A"), stub.queries


def test_mx_preference_and_fallback(gateways, dns):
    port = free_port(SINK_IP)
    assert port_is_free(DEAD_IP, port)
    # listed worst first: the gateway must sort by preference, not keep the answer's order
    stub = dns({"mx2.test": [("MX", 20, "live.mx2.test"), ("MX", 10, "dead.mx2.test")],
                "dead.mx2.test": [("A", DEAD_IP)],
                "live.mx2.test": [("A", SINK_IP)]})
    b = sink(gateways, port)
    a = mx_gateway(gateways, stub.address, port)
    qid, mark, _ = submit(a, ["user@mx2.test"], "mxpref")

    got = b.wait_message_with(mark.encode())
    assert b"Delivered-To: user@mx2.test\r\n" in got
    failed = a.wait_log(rf"queue_id={re.escape(qid)} peer={re.escape(DEAD_IP)}:{port} .*next hop failed"
                        rf"|next hop failed.*queue_id={re.escape(qid)} peer={re.escape(DEAD_IP)}:{port}")
    ok = a.wait_log(rf"queue_id={re.escape(qid)} peer={re.escape(SINK_IP)}:{port} .*"
                    r"host=\"?live\.mx2\.test\"?")
    assert failed[0].start() < ok[0].start(), "the preferred (dead) MX was not tried first"
    # both exchanges were tried in the first attempt, not over a retry
    a.wait_log(rf"done queue_id={re.escape(qid)} attempts=1\b")
    assert stub.asked("dead.mx2.test", "A") and stub.asked("live.mx2.test", "A"), stub.queries
    a.wait_queue_empty()
    assert dsns(a) == []


def test_implicit_mx(gateways, dns):
    port = free_port(SINK_IP)
    stub = dns({"implicit.test": [("A", SINK_IP)]})
    b = sink(gateways, port)
    a = mx_gateway(gateways, stub.address, port)
    qid, mark, _ = submit(a, ["user@implicit.test"], "implicit")

    got = b.wait_message_with(mark.encode())
    assert b"Delivered-To: user@implicit.test\r\n" in got
    a.wait_log(rf"queue_id={re.escape(qid)} peer={re.escape(SINK_IP)}:{port} .*"
               r"host=\"?implicit\.test\"?")
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@implicit\.test result=Delivered\(")
    a.wait_queue_empty()
    assert stub.asked("implicit.test", "MX") and stub.asked("implicit.test", "A"), stub.queries
    assert dsns(a) == []


def test_null_mx_bounces_at_once(gateways, dns):
    port = free_port(SINK_IP)
    # an address for the domain itself too: a gateway that ignored the null MX and fell back
    # to implicit MX would deliver to B
    stub = dns({"nullmx.test": [("MX", 0, "."), ("A", SINK_IP)]})
    b = gateways.simple("b", ip=SINK_IP, hostname="gw-b.test", local_domains=["nullmx.test"],
                        trusted_networks=[], listen=[f"{SINK_IP}:{port}"])
    a = mx_gateway(gateways, stub.address, port)
    t0 = time.monotonic()
    qid, mark, _ = submit(a, ["user@nullmx.test"], "nullmx")

    line = a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@nullmx\.test result=.*")[0].group(0)
    assert "result=Failed(" in line and "5.1.10" in line, line
    a.wait_log(rf"done queue_id={re.escape(qid)} attempts=1\b")
    (dsn,) = wait_until(lambda: dsns(a), 20, "the DSN in A's Maildir")
    assert time.monotonic() - t0 < 10, "not bounced at once"
    text = check_dsn(dsn, sender="alice@a.test", failed="user@nullmx.test", status="5.1.10", mark=mark)
    assert re.search(r"(?i)null MX", text), text
    assert "next hop failed" not in a.log()
    assert not re.search(rf"queue_id={re.escape(qid)} peer=", a.log()), "connected to someone"
    a.wait_queue_empty()
    assert b.messages() == {}
    assert not stub.asked("nullmx.test", "A"), stub.queries


def test_nxdomain_bounces(gateways, dns):
    port = free_port(SINK_IP)
    stub = dns({"mx.test": [("MX", 10, "mx1.mx.test")], "mx1.mx.test": [("A", SINK_IP)]})
    b = sink(gateways, port)
    a = mx_gateway(gateways, stub.address, port)
    qid, mark, _ = submit(a, ["user@nowhere.test"], "nxdomain")

    line = a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@nowhere\.test result=.*")[0].group(0)
    assert "result=Failed(" in line and "5.1.2" in line, line
    a.wait_log(rf"done queue_id={re.escape(qid)} attempts=1\b")
    (dsn,) = wait_until(lambda: dsns(a), 20, "the DSN in A's Maildir")
    text = check_dsn(dsn, sender="alice@a.test", failed="user@nowhere.test", status="5.1.2", mark=mark)
    assert "nowhere.test" in text.split("message/delivery-status", 1)[1]
    assert stub.asked("nowhere.test", "MX"), stub.queries
    a.wait_queue_empty()
    assert b.messages() == {}


def test_mixed_recipients_split_per_domain(gateways, dns):
    """One message to a deliverable and a non-existent domain: one delivered, one bounced."""
    port = free_port(SINK_IP)
    stub = dns({"mx.test": [("MX", 10, "mx1.mx.test")], "mx1.mx.test": [("A", SINK_IP)]})
    b = sink(gateways, port)
    a = mx_gateway(gateways, stub.address, port)
    qid, mark, _ = submit(a, ["user@mx.test", "ghost@nowhere.test"], "mixed")

    got = b.wait_message_with(mark.encode())
    assert b"Delivered-To: user@mx.test\r\n" in got
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@mx\.test result=Delivered\(")
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=ghost@nowhere\.test result=Failed\(.*5\.1\.2")
    (dsn,) = wait_until(lambda: dsns(a), 20, "the DSN in A's Maildir")
    text = check_dsn(dsn, sender="alice@a.test", failed="ghost@nowhere.test", status="5.1.2", mark=mark)
    status_part = text.split("message/delivery-status", 1)[1].split("\r\n--", 1)[0]
    assert "user@mx.test" not in status_part, "the delivered recipient is listed as failed"
    a.wait_queue_empty()
    assert len(b.messages()) == 1


def test_dns_down_defers(gateways):
    port = free_port(SINK_IP)
    # a resolver address where nothing listens (neither UDP nor TCP)
    dead_dns = free_port(STUB_IP)
    b = sink(gateways, port)
    a = mx_gateway(gateways, f"{STUB_IP}:{dead_dns}", port, retry_schedule=["1h"])
    t0 = time.monotonic()
    qid, mark, _ = submit(a, ["user@mx.test"], "dnsdown")

    line = a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@mx\.test result=.*",
                      timeout=60)[0].group(0)
    took = time.monotonic() - t0
    assert "result=Deferred(" in line, line
    assert re.search(r"(?i)dns", line), line
    assert "4.4.3" in line, line
    (m,) = wait_until(lambda: [m for m in a.queue_list().values()
                                   if m["id"] == qid and m["attempts"] >= 1],
                      20, "the message's state after the first attempt")
    (r,) = m["recipients"]
    assert r["address"] == "user@mx.test" and r["status"] == "pending", m
    assert r["detail"] and re.search(r"(?i)dns", r["detail"]), m
    assert qid in a.queue_files()
    assert f"done queue_id={qid}" not in a.log()
    assert dsns(a) == [] and b.messages() == {}
    print(f"first attempt with the DNS server down took {took:.1f}s")


def test_truncated_answer_retried_over_tcp(gateways, dns):
    """An MX set too large for a 512-octet UDP answer: the gateway must follow TC=1 to TCP."""
    port = free_port(SINK_IP)
    many = [("MX", 50 + i, f"backup-{i:02d}-with-a-rather-long-label-to-fill-the-answer.mx.test")
            for i in range(12)]
    stub = dns({"mx.test": many + [("MX", 5, "mx1.mx.test")],
                "mx1.mx.test": [("A", SINK_IP)]})
    b = sink(gateways, port)
    a = mx_gateway(gateways, stub.address, port)
    qid, mark, _ = submit(a, ["user@mx.test"], "tcp")

    got = b.wait_message_with(mark.encode())
    assert b"Delivered-To: user@mx.test\r\n" in got
    a.wait_log(rf"queue_id={re.escape(qid)} peer={re.escape(SINK_IP)}:{port} .*host=\"?mx1\.mx\.test\"?")
    assert ("udp", "mx.test", "MX") in stub.queries, stub.queries
    assert ("tcp", "mx.test", "MX") in stub.queries, stub.queries
    # the backups were never needed
    assert not any(q[1].startswith("backup-") for q in stub.queries), stub.queries
    a.wait_queue_empty()


def test_servfail_defers_without_implicit_mx(gateways, dns):
    """SERVFAIL for the MX query is a temporary failure: no fallback to the domain's address."""
    port = free_port(SINK_IP)
    # the domain's own address leads to B: a gateway that took SERVFAIL for "no MX" and applied
    # implicit MX would deliver there
    stub = dns({"mx.test": [("MX", 10, "mx1.mx.test"), ("A", SINK_IP)],
                "mx1.mx.test": [("A", SINK_IP)]})
    stub.fail("mx.test", "MX")
    b = sink(gateways, port)
    a = mx_gateway(gateways, stub.address, port, retry_schedule=["1h"])
    qid, mark, _ = submit(a, ["user@mx.test"], "servfail")

    line = a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@mx\.test result=.*",
                      timeout=60)[0].group(0)
    assert "result=Deferred(" in line and "4.4.3" in line, line
    assert not re.search(rf"queue_id={re.escape(qid)} peer=", a.log()), "connected to a next hop"
    assert not stub.asked("mx.test", "A"), "implicit MX applied after SERVFAIL"
    (m,) = wait_until(lambda: [m for m in a.queue_list().values()
                                   if m["id"] == qid and m["attempts"] >= 1],
                      20, "the message's state after the first attempt")
    assert m["recipients"][0]["status"] == "pending", m
    assert dsns(a) == [] and b.messages() == {}


def test_implicit_mx_without_address_bounces(gateways, dns):
    """RFC 5321 §5.1: a domain with neither MX nor address records is an error, not a retry."""
    port = free_port(SINK_IP)
    stub = dns({"noaddr.test": [("TXT", "v=spf1 -all")]})  # exists (NODATA for MX, A, AAAA)
    b = sink(gateways, port)
    a = mx_gateway(gateways, stub.address, port, retry_schedule=["1h"])
    qid, mark, _ = submit(a, ["user@noaddr.test"], "noaddr")

    line = a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=user@noaddr\.test result=.*")[0].group(0)
    assert stub.asked("noaddr.test", "MX") and stub.asked("noaddr.test", "A"), stub.queries
    assert "result=Failed(" in line and "5.4.4" in line, line
    (dsn,) = wait_until(lambda: dsns(a), 20, "the DSN in A's Maildir")
    check_dsn(dsn, sender="alice@a.test", failed="user@noaddr.test", status="5.4.4", mark=mark)
    a.wait_queue_empty()
    assert b.messages() == {}


def test_dnsstub_survives_garbage(dns):
    """The stub itself: garbage gets FORMERR or silence, and it keeps answering."""
    import random
    import socket
    import struct

    from dnsstub import encode_name

    stub = dns({"mx.test": [("MX", 10, "mx1.mx.test")]})
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    try:
        for junk in [b"", b"\x00" * 11, random.Random(1).randbytes(300),
                     struct.pack("!6H", 7, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x0f\x00\x01",
                     struct.pack("!6H", 7, 0, 1, 0, 0, 0) + b"\x3fabc"]:
            u.sendto(junk, (stub.ip, stub.port))
        t = socket.create_connection((stub.ip, stub.port), timeout=2)
        t.sendall(b"\x00\x30" + random.Random(2).randbytes(48))
        t.close()
        q = struct.pack("!6H", 0xBEEF, 0x0100, 1, 0, 0, 0) + encode_name("MX.test") + struct.pack("!HH", 15, 1)
        u.sendto(q, (stub.ip, stub.port))
        while True:
            resp = u.recv(4096)
            if resp[:2] == b"\xbe\xef":
                break
            assert resp[3] & 0x0F in (1, 3, 4, 5), resp  # junk: FORMERR, NXDOMAIN, NOTIMP, REFUSED
        ident, flags, qd, an, ns, ar = struct.unpack("!6H", resp[:12])
        assert flags & 0x8000 and flags & 0x0400 and flags & 0x0F == 0 and qd == 1 and an == 1, resp
        assert b"\x03mx1\x02mx\x04test\x00" in resp
    finally:
        u.close()
