"""Outbound TLS policy as far as it is wired: the forced list and `encrypt` never go plaintext."""

import pytest

from clients import marker
from harness import Raw, message, queue_id, send_raw_message, wait_until


def plaintext_sink(gateways):
    """A next hop that offers no STARTTLS (no certificate installed)."""
    return gateways.simple("b", ip="127.0.0.2", hostname="gw-b.test", local_domains=["b.test"],
                           trusted_networks=[], certificates=[],
                           tls={"dev_self_signed": False})


@pytest.mark.parametrize("case", ["forced-list", "route-encrypt"])
def test_required_tls_is_never_downgraded(gateways, case):
    b = plaintext_sink(gateways)
    hop = "%s:%d" % b.addr
    route = {"domain": "*", "next_hop": [hop], "tls": "encrypt" if case == "route-encrypt" else "may"}
    tls = {"force": ["127.0.0.2/32"]} if case == "forced-list" else {}
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        routes=[{"domain": "a.test", "maildir": "maildir"}, route],
                        queue={"retry_schedule": ["1h"]}, tls=tls)
    mark = marker("forced")
    r = Raw(a.addr)
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, "alice@a.test", ["bob@b.test"], message(mark, "alice@a.test", "bob@b.test"))
    assert rep.code == 250, rep
    qid = queue_id(rep.text)
    r.expect("QUIT", 221)

    a.wait_log(rf"delivery queue_id={qid} rcpt=bob@b.test result=Deferred")
    entry = a.queue_list()[qid]
    detail = entry["recipients"][0]["detail"]
    assert entry["recipients"][0]["status"] == "pending"
    assert "did not offer STARTTLS" in detail, detail
    assert "127.0.0.2" in detail, detail
    if case == "forced-list":
        assert "forced list" in detail, detail
    else:
        assert "encrypt" in detail, detail
    # Not one byte of the message reached the plaintext hop.
    assert not b.messages()
    assert "queued queue_id" not in b.log()


def test_may_delivers_in_plaintext_when_not_forced(gateways):
    b = plaintext_sink(gateways)
    a = gateways.simple("a", hostname="gw-a.test", local_domains=["a.test"],
                        routes=[{"domain": "a.test", "maildir": "maildir"},
                                {"domain": "*", "next_hop": ["%s:%d" % b.addr], "tls": "may"}])
    mark = marker("may")
    r = Raw(a.addr)
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, "alice@a.test", ["bob@b.test"], message(mark, "alice@a.test", "bob@b.test"))
    assert rep.code == 250, rep
    got = b.wait_message_with(mark.encode())
    assert b"with ESMTP " in got or b"with ESMTP\r\n" in got, got[:400]
    wait_until(lambda: not a.queue_files(), 20, "A's queue to empty")
