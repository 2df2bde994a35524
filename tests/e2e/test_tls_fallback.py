"""Outbound `may` toward peers with a missing or broken TLS stack (F-TLS-OUT fallback with
memory, downgrade protection) and the persisted peer table (F-PEERS, `sealctl peers`).

Gateway A (127.0.0.1) delivers b.test to a scriptable fake peer (`fakepeer.FakePeer` on
127.0.0.5) with route tls = "may", handshake_timeout = 2 s and a short broken_tls_ttl. The fake
peer records per session whether STARTTLS was issued, whether TLS completed and what mail it
got, so the tests see what A did on the wire, not only what A logs:

- a peer without STARTTLS gets the message in plaintext;
- a peer whose handshake hangs gets it in plaintext after the handshake timeout, in the same
  attempt; A remembers it as TLS-broken (peer table `tls_broken_until`), sends the next message
  in plaintext at once without a STARTTLS command, and tries STARTTLS again once the mark
  expired (the repaired peer then gets TLS);
- a peer that did TLS and then stops offering STARTTLS (stripping) is not downgraded: the
  message is deferred with 4.7.4, the peer flagged (JSON and table), no plaintext transaction,
  until `sealctl peers reset`; with downgrade = "allow" the same sequence goes plaintext;
- the peer table (and the TLS-broken memory) survives a restart of A.

Every wait is bounded; the fake peer closes each connection after DATA so that every message
travels on a fresh connection (a parked connection would hide the per-connection decisions).
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from clients import marker
from fakepeer import FakePeer
from harness import (
    SEALCTL,
    received_headers,
    submit_one,
    wait_until,
)
from pki import make_self_signed

PEER_IP = "127.0.0.5"
HANDSHAKE_TIMEOUT = 2.0


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer_cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("fakepeer-pki")
    return make_self_signed(d, "fakepeer", "fakepeer.test", sans=["fakepeer.test", PEER_IP])


@pytest.fixture
def peer(peer_cert):
    p = FakePeer(PEER_IP, cert=peer_cert[0], key=peer_cert[1], close_after_data=True)
    yield p
    p.close()
    assert not p.errors, p.errors


def gateway_a(gateways, peer: FakePeer, *, ttl: str = "6s", downgrade: str | None = None,
              retry: str = "1s"):
    tls = {"handshake_timeout": "2s", "broken_tls_ttl": ttl}
    if downgrade:
        tls["downgrade"] = downgrade
    return gateways.simple(
        "a", ip="127.0.0.1", hostname="gw-a.test", local_domains=["a.test"],
        routes=[{"domain": "a.test", "maildir": "maildir"},
                {"domain": "b.test", "next_hop": [peer.hop], "tls": "may"}],
        tls=tls, queue={"retry_schedule": [retry]},
    )


def submit(a, mark: str) -> str:
    """Hands A a message for bob@b.test; returns its queue id."""
    return submit_one(a.addr, "alice@a.test", "bob@b.test", mark)


def sealctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(SEALCTL), "peers", *args], capture_output=True, text=True,
                          timeout=30, check=check)


def peers(a) -> dict[str, dict]:
    """A's outbound peer table by IP (`sealctl peers list --json`)."""
    return {p["ip"]: p for p in a.peer_table()["peers"]}


def peer_record(a, cond=lambda r: True, what="the peer record", timeout=10.0) -> dict:
    """Waits until A's record for the fake peer exists and satisfies `cond` (the daemon writes
    peers.json about a second after a change)."""
    def get():
        r = peers(a).get(PEER_IP)
        return r if r is not None and cond(r) else None

    return wait_until(get, timeout, f"{what} in A's peer table")


def deferrals(a, qid: str) -> int:
    return len(re.findall(rf"delivery queue_id={re.escape(qid)} rcpt=bob@b\.test result=Deferred", a.log()))


def attempt_line(a, qid: str) -> str:
    rx = rf"^(?=.*\bdelivery attempt\b(?! failed))(?=.*queue_id={re.escape(qid)}\b).*$"
    return a.wait_log(rx, timeout=10)[-1].group(0)


def mail_commands(s) -> list[str]:
    return [c for c in s.commands if c.upper().startswith(("MAIL", "RCPT", "DATA"))]


# --- no STARTTLS at all --------------------------------------------------------------------------


def test_may_without_starttls_goes_plaintext(gateways, peer):
    peer.set(offer_starttls=False)
    a = gateway_a(gateways, peer)
    mark = marker("no-starttls")
    qid = submit(a, mark)
    msg, s = peer.wait_message(mark, timeout=15)
    a.wait_queue_empty(15)
    assert not s.starttls and not s.tls and not msg.tls, s
    assert msg.mail_from == "alice@a.test" and msg.rcpts == ["bob@b.test"], msg
    assert deferrals(a, qid) == 0
    line = attempt_line(a, qid)
    assert "tls=none" in line and "level=may" in line, line
    rec = peer_record(a, lambda r: r["counts"]["plaintext"] >= 1, "a plaintext count")
    assert rec["starttls_offered"] is False, rec
    assert rec["last_tls"] is None and rec["tls_broken_until"] is None, rec
    assert rec["downgrade_flagged"] is None, rec
    assert rec["name"] == PEER_IP, rec


# --- STARTTLS offered, then refused: fallback like a failed handshake ------------------------------


def test_refused_starttls_falls_back_and_is_remembered(gateways, peer):
    peer.set(handshake="refuse")
    a = gateway_a(gateways, peer, retry="1h")
    mark = marker("refused")
    qid = submit(a, mark)
    # Delivered within the same attempt (the retry is an hour away), in plaintext.
    msg, s = peer.wait_message(mark, timeout=15)
    a.wait_queue_empty(15)
    assert not msg.tls, msg
    assert deferrals(a, qid) == 0
    a.wait_log(r"TLS fallback.*STARTTLS refused: 454 4\.7\.0", timeout=10)
    rec = peer_record(a, lambda r: r["tls_broken_until"] is not None, "a TLS-broken mark")
    assert rec["starttls_offered"] is True, rec


# --- a handshake that hangs: fallback with memory --------------------------------------------------


def test_hanging_handshake_falls_back_and_is_remembered(gateways, peer):
    peer.set(handshake="hang")
    # one retry an hour: a delivery within seconds can only be the same attempt
    a = gateway_a(gateways, peer, ttl="6s", retry="1h")

    # 1. STARTTLS, the handshake hangs, A gives up after handshake_timeout and reconnects in
    #    plaintext within the same attempt
    m1 = marker("hang-1")
    t0 = time.monotonic()
    qid1 = submit(a, m1)
    msg, s = peer.wait_message(m1, timeout=15)
    took = time.monotonic() - t0
    a.wait_queue_empty(10)
    assert not s.starttls and not msg.tls, s
    assert took >= HANDSHAKE_TIMEOUT - 0.2, f"delivered after {took:.1f}s, before the handshake timeout"
    assert took < HANDSHAKE_TIMEOUT + 6, f"delivered only after {took:.1f}s"
    assert deferrals(a, qid1) == 0, "the fallback was not within the same attempt"
    hung = [x for x in peer.sessions() if x.handshake == "hang"]
    assert len(hung) == 1, peer.sessions()
    assert hung[0].hang_bytes > 0, "no ClientHello reached the hanging peer"
    assert not mail_commands(hung[0]), hung[0].commands
    assert hung[0].hang_seconds >= HANDSHAKE_TIMEOUT - 0.3, hung[0]
    assert hung[0].n < s.n, (hung, s)
    a.wait_log(r"TLS fallback")
    rec = peer_record(a, lambda r: r["tls_broken_until"], "tls_broken_until")
    now = time.time()
    until = rec["tls_broken_until"]
    assert now < until <= now + 6 + 2, (now, rec)
    assert rec["starttls_offered"] is True and rec["last_tls"] is None, rec
    assert rec["downgrade_flagged"] is None, rec
    assert rec["counts"]["failures"] >= 1 and rec["counts"]["plaintext"] >= 1, rec

    # 2. while remembered: plaintext directly, no STARTTLS command, no waiting
    n_before = len(peer.sessions())
    m2 = marker("hang-2")
    t1 = time.monotonic()
    submit(a, m2)
    msg2, s2 = peer.wait_message(m2, timeout=10)
    took2 = time.monotonic() - t1
    assert time.time() < until, "test too slow: the TLS-broken mark expired before message 2"
    assert took2 < HANDSHAKE_TIMEOUT, f"message 2 took {took2:.1f}s: did A wait for a handshake?"
    assert not s2.starttls and not msg2.tls, s2
    later = peer.sessions()[n_before:]
    assert later and not [x for x in later if x.starttls], [(x.n, x.commands) for x in later]
    assert "STARTTLS" not in [c.upper() for c in s2.commands], s2.commands

    # 3. after the TTL: STARTTLS again; the peer has been repaired meanwhile and gets TLS
    peer.set(handshake="ok")
    wait_until(lambda: time.time() > until + 1, 15, "the TLS-broken mark to expire")
    m3 = marker("hang-3")
    qid3 = submit(a, m3)
    msg3, s3 = peer.wait_message(m3, timeout=15)
    assert s3.starttls and s3.tls and msg3.tls, s3
    line = attempt_line(a, qid3)
    assert "tls=TLSv1." in line and "level=may" in line, line
    rec = peer_record(a, lambda r: r["last_tls"], "last_tls after the probe")
    assert rec["last_tls"]["version"].startswith("TLSv1."), rec
    assert not rec["tls_broken_until"] or rec["tls_broken_until"] <= time.time(), rec


def test_failing_handshake_falls_back_in_the_same_attempt(gateways, peer):
    """The other broken stack: the handshake fails at once (garbage instead of a ServerHello)."""
    peer.set(handshake="fail")
    a = gateway_a(gateways, peer, ttl="1h", retry="1h")
    mark = marker("fail")
    qid = submit(a, mark)
    msg, s = peer.wait_message(mark, timeout=10)
    a.wait_queue_empty(10)
    assert not s.starttls and not msg.tls, s
    assert deferrals(a, qid) == 0
    failed = [x for x in peer.sessions() if x.handshake == "fail"]
    assert len(failed) == 1 and not mail_commands(failed[0]), peer.sessions()
    rec = peer_record(a, lambda r: r["tls_broken_until"], "tls_broken_until")
    assert rec["tls_broken_until"] > time.time() + 3000, rec


# --- downgrade protection ---------------------------------------------------------------------------


def first_over_tls(a, peer) -> dict:
    """Message 1 goes over TLS; returns the peer record once it shows last_tls."""
    m1 = marker("tls-first")
    submit(a, m1)
    msg, s = peer.wait_message(m1, timeout=15)
    assert s.starttls and s.tls and msg.tls, s
    a.wait_queue_empty(10)
    return peer_record(a, lambda r: r["last_tls"], "last_tls")


def test_downgrade_refused_until_reset(gateways, peer):
    a = gateway_a(gateways, peer)
    rec = first_over_tls(a, peer)
    assert rec["last_tls"]["version"].startswith("TLSv1."), rec
    assert rec["starttls_offered"] is True and rec["downgrade_flagged"] is None, rec

    # the peer (or an attacker stripping it) stops offering STARTTLS
    peer.set(offer_starttls=False)
    n_before = len(peer.sessions())
    mark = marker("stripped")
    qid = submit(a, mark)
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=bob@b\.test result=Deferred", timeout=15)
    entry = a.queue_list()[qid]
    rc = entry["recipients"][0]
    assert rc["status"] == "pending", entry
    detail = rc["detail"]
    assert detail.startswith("4.7.4"), detail
    assert PEER_IP in detail, detail
    assert "stripping" in detail or "downgrade" in detail, detail
    assert "flagged" in detail, detail

    rec = peer_record(a, lambda r: r["downgrade_flagged"], "downgrade_flagged")
    flag = rec["downgrade_flagged"]
    assert flag["at"] and flag["reason"], flag
    assert "STARTTLS" in flag["reason"], flag
    assert rec["last_tls"], "the flag must not erase the TLS history"
    table = sealctl("list", "--state", str(a.state)).stdout
    row = [l for l in table.splitlines() if l.startswith(PEER_IP)]
    assert len(row) == 1, table
    assert "did not offer STARTTLS" in row[0] or "stripping" in row[0], row[0]

    # A keeps retrying (every second) and keeps refusing; nothing went out in plaintext
    n = deferrals(a, qid)
    wait_until(lambda: deferrals(a, qid) >= n + 2, 15, "two more deferrals")
    assert not peer.with_marker(mark), "delivered in plaintext despite the downgrade flag"
    for x in peer.sessions()[n_before:]:
        assert not mail_commands(x), f"a transaction in plaintext to a flagged peer: {x.commands}"
    assert qid in a.queue_list()

    # the admin resets the peer (while A runs): the next retry goes plaintext
    r = sealctl("reset", "--state", str(a.state), PEER_IP)
    assert "reset" in r.stdout, r.stdout + r.stderr
    msg, s = peer.wait_message(mark, timeout=15)
    assert not s.starttls and not msg.tls, s
    a.wait_queue_empty(10)
    assert len(peer.with_marker(mark)) == 1
    rec = peer_record(a, lambda r: r["downgrade_flagged"] is None and r["counts"]["plaintext"] >= 1,
                      "the reset record")
    assert rec["last_tls"] is None, rec


def test_downgrade_allowed_delivers_plaintext(gateways, peer):
    """Control: with downgrade = "allow" the same sequence goes plaintext at once."""
    a = gateway_a(gateways, peer, downgrade="allow")
    first_over_tls(a, peer)
    peer.set(offer_starttls=False)
    mark = marker("allowed")
    t0 = time.monotonic()
    qid = submit(a, mark)
    msg, s = peer.wait_message(mark, timeout=10)
    assert time.monotonic() - t0 < 5
    assert not s.starttls and not msg.tls, s
    a.wait_queue_empty(10)
    assert deferrals(a, qid) == 0
    rec = peer_record(a, lambda r: r["starttls_offered"] is False, "starttls_offered = false")
    assert rec["downgrade_flagged"] is None, rec
    assert " with ESMTP " in received_headers(msg.data)[0] + " ", received_headers(msg.data)


# --- persistence ------------------------------------------------------------------------------------


def test_peer_table_survives_restart(gateways, peer):
    peer.set(handshake="hang")
    a = gateway_a(gateways, peer, ttl="120s", retry="1h")
    m1 = marker("persist-1")
    submit(a, m1)
    peer.wait_message(m1, timeout=15)
    a.wait_queue_empty(10)
    live = peer_record(a, lambda r: r["tls_broken_until"], "tls_broken_until")

    assert a.stop() == 0
    before = peers(a)[PEER_IP]
    assert before["tls_broken_until"] == live["tls_broken_until"], (live, before)
    assert before["starttls_offered"] is True and before["counts"]["failures"] >= 1, before
    a.start()
    after = peers(a)[PEER_IP]
    assert after == before, (before, after)

    # and the memory still acts: plaintext at once, no STARTTLS
    n_before = len(peer.sessions())
    m2 = marker("persist-2")
    t0 = time.monotonic()
    submit(a, m2)
    msg, s = peer.wait_message(m2, timeout=10)
    assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT
    assert not s.starttls and not msg.tls, s
    assert not [x for x in peer.sessions()[n_before:] if x.starttls]
    a.wait_queue_empty(10)
    # stopped again: the file holds the record with the new count
    assert a.stop() == 0
    final = peers(a)[PEER_IP]
    assert final["tls_broken_until"] == before["tls_broken_until"], final
    assert final["counts"]["plaintext"] > before["counts"]["plaintext"], (before, final)
