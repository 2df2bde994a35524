"""Attacks on the STARTTLS upgrade between two gateways, through an attacker in the middle
(F-TLS-OUT, F-TLS-IN injection discard, threat model: "a network attacker between gateways
reads, strips STARTTLS, injects commands or responses, impersonates a peer").

Scenario: gateway A (sender, 127.0.0.1) → proxy `tlsproxy.TlsProxy` (127.0.0.4, the next hop A
sees) → gateway B (127.0.0.2, local domain b.test, Maildir). B's certificate comes from a test
VPN CA and names both 127.0.0.2 and 127.0.0.4; A's route for b.test requires TLS (`verify`
against that CA, `fingerprint` pinned to B's certificate, or `encrypt`).

Each attack must leave no byte of the message in plaintext on the wire (the proxy records every
plaintext byte in both directions), must not deliver the message anywhere, and must leave a
specific reason in A's queue entry (4.7.4 for a stripped STARTTLS; 4.7.5 for a broken handshake
or a certificate from another CA; response injection for bytes after the 220 to STARTTLS).
When the proxy is then switched to `pass` the retry delivers the message exactly once over TLS,
so the deferral was the policy's doing and not a broken setup. Command injection toward B must
be discarded by B: the message is delivered over TLS and nothing from the injected MAIL is ever
accepted. A control case shows the mitm really relays when the level does not check
certificates (`encrypt`), so the refusals under `verify` and `fingerprint` are the certificate
checks at work.

Downgrade protection (`may`): once A has completed TLS with the hop, the strip and break attacks
are refused (deferred, the peer flagged in the persisted peer table, read with `sealctl peers
list`); the flag keeps holding the mail after the attacker stops, until `sealctl peers reset`;
then TLS again. A control with downgrade = "allow" shows the strip really yields plaintext.

Timing: A retries after 1 s; every wait is bounded.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from clients import marker
from harness import (
    SEALCTL,
    Gateway,
    _table,
    received_headers,
    submit_one,
    wait_until,
)
from pki import Leaf, Spec, cert_sha256
from tlsproxy import TlsProxy

B_IP = "127.0.0.2"
PROXY_IP = "127.0.0.4"
EVIL = b"evil@x.test"


# --- fixtures ----------------------------------------------------------------------------------


_NAMES = ("gw-b.vpn.test", B_IP, PROXY_IP)
# the `pki` fixture (conftest.py) makes these once for the module; pki["ca"] is the VPN CA
PKI = Spec(
    cas=("vpn-ca", "other-ca"),
    leaves={
        "b": Leaf("vpn-ca", "gw-b", "gw-b.vpn.test", usage="serverAuth,clientAuth", sans=_NAMES),
        # the impostor: same names, another CA
        "mitm": Leaf("other-ca", "mitm", "gw-b.vpn.test", usage="serverAuth,clientAuth", sans=_NAMES),
    },
    scope="module",
)


@pytest.fixture
def b(gateways, pki):
    """Gateway B: the receiving end, with its VPN-CA certificate, relaying for nobody."""
    cert, key = pki["b"]
    return gateways.simple(
        "b", ip=B_IP, hostname="gw-b.vpn.test", local_domains=["b.test"], trusted_networks=[],
        certificates=[{"name": "default", "cert_file": str(cert), "key_file": str(key)}],
        tls={"dev_self_signed": False},
    )


@pytest.fixture
def proxy(b, pki):
    p = TlsProxy((PROXY_IP, 0), b.addr, mode="pass", mitm_cert=pki["mitm"][0], mitm_key=pki["mitm"][1])
    yield p
    p.close()
    assert not p.errors, p.errors


def sender(gateways, pki, proxy, level: str, tls: dict | None = None, **route) -> Gateway:
    """Gateway A with the b.test route through the proxy at `level`."""
    r = {"domain": "b.test", "next_hop": [proxy.hop], "tls": level}
    if level == "verify":
        r["ca"] = "vpn-ca"
    r.update(route)
    a = gateways.simple(
        "a", ip="127.0.0.1", hostname="gw-a.test", local_domains=["a.test"],
        routes=[{"domain": "a.test", "maildir": "maildir"}, r],
        tls={"handshake_timeout": "2s", **(tls or {})}, queue={"retry_schedule": ["1s"]}, start=False,
    )
    cfg = a.config_path.read_text()
    cfg += _table("tls.ca", {"name": "vpn-ca", "pem": pki["ca"].read_text()}, array=True)
    a.config_path.write_text(cfg)
    return a.start()


# --- helpers -----------------------------------------------------------------------------------


def submit(a, mark: str) -> str:
    """Hands A a message for bob@b.test; returns its queue id."""
    return submit_one(a.addr, "alice@a.test", "bob@b.test", mark)


def deferred_detail(a, qid: str) -> str:
    """A's first deferral of `qid` (to bob@b.test): the reason in its queue entry."""
    return a.deferred_detail(qid, "bob@b.test", timeout=15)


def b_queued(b) -> int:
    """How many messages B has accepted so far (its "queued" log lines)."""
    return len(re.findall(r"\bqueued queue_id=", b.log()))


def assert_not_leaked(proxy: TlsProxy, a, b, mark: str, b_before: int = 0) -> None:
    """No message byte crossed in plaintext (nor decrypted by a mitm), nothing delivered:
    B accepted no message beyond the `b_before` it had before the attack."""
    m = mark.encode()
    assert m not in proxy.plaintext(), "the message crossed the wire in plaintext"
    assert m not in proxy.wire(), "the message marker is visible on the wire"
    assert m not in proxy.decrypted(), "the mitm got the message"
    assert b"MAIL FROM:<alice@a.test>" not in proxy.plaintext("c2s"), "A began a transaction in plaintext"
    assert not [v for v in b.messages().values() if m in v], "delivered to B under attack"
    assert b_queued(b) == b_before, "B accepted a message under attack"
    assert not a.messages(), "A delivered something locally"
    assert "DSN queued" not in a.log(), "A bounced the message"


CERT_CHECK = {"verify": "verified", "fingerprint": "pinned", "encrypt": "unchecked", "may": "unchecked"}


def pass_delivers(proxy: TlsProxy, a, b, mark: str, qid: str, level: str) -> bytes:
    """Switches the proxy to `pass`; the retry delivers the message once, over TLS."""
    proxy.switch("pass")
    got = b.wait_message_with(mark.encode(), timeout=15)
    a.wait_queue_empty(15)
    assert len([v for v in b.messages().values() if mark.encode() in v]) == 1, "delivered more than once"
    assert b"with ESMTPS (TLSv1." in got, got[:600]
    line = attempt_line(a, qid)
    assert "tls=TLSv1." in line and f"level={level} " in line and f"cert={CERT_CHECK[level]} " in line, line
    assert mark.encode() not in proxy.plaintext(), "the message crossed the wire in plaintext"
    assert mark.encode() not in proxy.wire()
    assert proxy.connections("pass"), "the retry did not go through the proxy"
    return got


def session_with(proxy: TlsProxy, mode: str, event: str) -> dict:
    for s in proxy.connections(mode):
        if event in s["events"]:
            return s
    pytest.fail(f"no {mode} session with {event!r}: {proxy.connections()}")


def recorded(s: dict, kind: str, direction: str) -> bytes:
    return b"".join(x for (k, d, x) in s["records"] if k == kind and d == direction)


def attempt_line(a, qid: str) -> str:
    """A's "delivery attempt" log line for `qid` (the successful one)."""
    rx = rf"^(?=.*\bdelivery attempt\b(?! failed))(?=.*queue_id={re.escape(qid)}\b).*$"
    return a.wait_log(rx, timeout=10)[-1].group(0)


def attacked(proxy: TlsProxy, mode: str, event: str) -> None:
    """The attack really happened on at least one connection."""
    evs = [e for s in proxy.connections(mode) for e in s["events"]]
    assert any(event in e for e in evs), f"no {event!r} in the proxy's {mode} sessions: {proxy.connections()}"


# --- strip, break, response injection ----------------------------------------------------------


@pytest.mark.parametrize(
    "mode,level,event,want",
    [
        ("strip", "verify", "strip: STARTTLS removed",
         ["4.7.4", PROXY_IP, "level verify by the route", "did not offer STARTTLS"]),
        ("strip", "encrypt", "strip: STARTTLS removed",
         ["4.7.4", PROXY_IP, "TLS required by policy", "level encrypt by the route", "did not offer STARTTLS"]),
        ("break", "verify", "break: server handshake bytes corrupted",
         ["4.7.5", PROXY_IP, "level verify by the route", "handshake"]),
        ("inject-response", "verify", "inject-response",
         [PROXY_IP, "response injection"]),
    ],
    ids=["strip-verify", "strip-encrypt", "break-verify", "inject-response-verify"],
)
def test_attack_defers_then_pass_delivers(gateways, pki, b, proxy, mode, level, event, want):
    proxy.mode = mode
    a = sender(gateways, pki, proxy, level)
    mark = marker(mode)
    qid = submit(a, mark)
    detail = deferred_detail(a, qid)
    for w in want:
        assert w in detail, f"{w!r} not in A's reason {detail!r}"
    attacked(proxy, mode, event)
    assert_not_leaked(proxy, a, b, mark)
    if mode == "inject-response":
        # A aborted at once: not even a TLS ClientHello after the 220 and the injected line
        s = session_with(proxy, mode, "inject-response")
        assert recorded(s, "plain", "s2c").endswith(b"\r\n250 2.0.0 injected\r\n"), recorded(s, "plain", "s2c")
        c2s = recorded(s, "wire", "c2s")
        assert c2s.endswith(b"STARTTLS\r\n") or c2s.endswith(b"STARTTLS\r\nQUIT\r\n"), c2s[-200:]
    pass_delivers(proxy, a, b, mark, qid, level)


# --- command injection toward B ----------------------------------------------------------------


def test_injected_command_after_starttls_is_discarded_by_b(gateways, pki, b, proxy):
    proxy.mode = "inject-command"
    a = sender(gateways, pki, proxy, "verify")
    mark = marker("inject-command")
    qid = submit(a, mark)
    got = b.wait_message_with(mark.encode(), timeout=15)
    a.wait_queue_empty(15)
    attacked(proxy, "inject-command", "inject-command")
    # delivered once, over TLS, as A sent it
    msgs = b.messages()
    assert len([v for v in msgs.values() if mark.encode() in v]) == 1
    assert b"with ESMTPS (TLSv1." in got, got[:600]
    assert b"Return-Path: <alice@a.test>\r\n" in got and EVIL not in got, got[:600]
    assert not [v for v in msgs.values() if EVIL in v], "a message from the injected MAIL"
    line = attempt_line(a, qid)
    assert "tls=TLSv1." in line and "cert=verified" in line, line
    # the injected command did cross in plaintext (the attack happened) ...
    s = session_with(proxy, "inject-command", "inject-command")
    plain = {d: recorded(s, "plain", d) for d in ("c2s", "s2c")}
    assert plain["c2s"].endswith(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n"), plain["c2s"][-200:]
    # ... and B answered it with nothing in plaintext: its last plaintext reply is the 220
    assert re.search(rb"(^|\r\n)220 [^\r\n]*\r\n\Z", plain["s2c"]), plain["s2c"][-300:]
    assert mark.encode() not in proxy.plaintext()
    # B accepted nothing from the injected MAIL: one queued message, from alice
    blog = b.log()
    queued = re.findall(r"^.*\bqueued queue_id=.*$", blog, re.M)
    assert len(queued) == 1 and "from=alice@a.test" in queued[0], queued
    assert "evil@x.test" not in blog, [l for l in blog.splitlines() if "evil" in l]


# --- impersonation -----------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["verify", "fingerprint"])
def test_mitm_with_another_ca_is_refused(gateways, pki, b, proxy, level):
    proxy.mode = "mitm"
    route = {"fingerprints": [cert_sha256(pki["b"][0])]} if level == "fingerprint" else {}
    a = sender(gateways, pki, proxy, level, **route)
    mark = marker("mitm")
    qid = submit(a, mark)
    detail = deferred_detail(a, qid)
    assert "4.7.5" in detail and PROXY_IP in detail, detail
    assert f"level {level} by the route" in detail, detail
    if level == "verify":
        assert "does not chain to a trusted CA" in detail, detail
    else:
        # the reason names what was seen: the impostor's certificate, not B's
        assert cert_sha256(pki["mitm"][0]) in detail.lower(), detail
        assert "pinned" in detail, detail
        assert cert_sha256(pki["b"][0]) not in detail.lower(), detail
    attacked(proxy, "mitm", "mitm: STARTTLS answered by the proxy")
    # A completed the handshake with the impostor, judged its certificate, sent no mail
    dec = proxy.decrypted("c2s")
    assert b"MAIL FROM" not in dec.upper(), dec
    assert_not_leaked(proxy, a, b, mark)
    pass_delivers(proxy, a, b, mark, qid, level)


def test_mitm_control_encrypt_does_not_check_certificates(gateways, pki, b, proxy):
    """Control: the mitm is a working attack; `encrypt` (no certificate check) goes through it,
    encrypted on both legs but readable by the proxy. This shows the refusals above come from
    the certificate checks."""
    proxy.mode = "mitm"
    a = sender(gateways, pki, proxy, "encrypt")
    mark = marker("mitm-encrypt")
    qid = submit(a, mark)
    got = b.wait_message_with(mark.encode(), timeout=15)
    a.wait_queue_empty(15)
    assert b"with ESMTPS (TLSv1." in got, got[:600]
    assert mark.encode() in proxy.decrypted("c2s"), "the mitm did not relay the message"
    assert mark.encode() not in proxy.plaintext(), "mitm relayed in plaintext"
    assert mark.encode() not in proxy.wire()
    line = attempt_line(a, qid)
    assert "level=encrypt" in line and "cert=unchecked" in line, line
    assert cert_sha256(pki["mitm"][0]) in line, line


# --- downgrade protection (`may`) against the same attacks -------------------------------------

def peers(a) -> dict[str, dict]:
    return {p["ip"]: p for p in a.peer_table()["peers"]}


@pytest.mark.parametrize(
    "mode,downgrade,want",
    [
        ("strip", "refuse", ["4.7.4", PROXY_IP, "did not offer STARTTLS", "downgrade = refuse", "flagged"]),
        ("break", "refuse", ["4.7.5", PROXY_IP, "handshake failed", "possible downgrade attack", "flagged"]),
        ("strip", "allow", None),
    ],
    ids=["strip-refuse", "break-refuse", "strip-allow-control"],
)
def test_may_peer_that_did_tls_is_not_downgraded(gateways, pki, b, proxy, mode, downgrade, want):
    """A `may` route, a peer that completed TLS before: the strip or break attack is refused
    and flags the peer (persisted), passing traffic stays refused until `sealctl peers reset`,
    then TLS again. With downgrade = "allow" the same attack goes plaintext (control: the attack
    is real, and what protects is the downgrade rule)."""
    a = sender(gateways, pki, proxy, "may", tls={"downgrade": downgrade})
    first = marker("may-tls")
    submit(a, first)
    b.wait_message_with(first.encode(), timeout=15)
    a.wait_queue_empty(15)
    assert first.encode() not in proxy.plaintext()
    wait_until(lambda: (peers(a).get(PROXY_IP) or {}).get("last_tls"), 10, "A's peer table to record the TLS")

    proxy.switch(mode)
    before = b_queued(b)
    mark = marker(f"may-{mode}")
    if want is None:
        # control: allowed downgrade, the attacker reads the message
        submit(a, mark)
        got = b.wait_message_with(mark.encode(), timeout=15)
        a.wait_queue_empty(15)
        top = received_headers(got)[0]
        assert " with ESMTP " in top + " " and "ESMTPS" not in top, top
        assert mark.encode() in proxy.plaintext("c2s"), "the control did not go plaintext"
        attacked(proxy, mode, "strip: STARTTLS removed")
        return
    qid = submit(a, mark)
    detail = deferred_detail(a, qid)
    for w in want:
        assert w in detail, f"{w!r} not in A's reason {detail!r}"
    attacked(proxy, mode, "strip: STARTTLS removed" if mode == "strip" else "break: server handshake")
    assert_not_leaked(proxy, a, b, mark, before)
    flag = wait_until(lambda: (peers(a).get(PROXY_IP) or {}).get("downgrade_flagged"), 10,
                      "the downgrade flag in A's peer table")
    assert flag.get("reason"), flag

    # the attacker steps back; the flag still holds the mail until the admin resets the peer
    proxy.switch("pass")
    n = len(a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=bob@b.test result=Deferred"))
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=bob@b.test result=Deferred", count=n + 1, timeout=15)
    assert "flagged" in a.queue_list()[qid]["recipients"][0]["detail"]
    assert_not_leaked(proxy, a, b, mark, before)
    subprocess.run([str(SEALCTL), "peers", "reset", "--state", str(a.state), PROXY_IP],
                   capture_output=True, text=True, timeout=30, check=True)
    pass_delivers(proxy, a, b, mark, qid, "may")


def test_proxy_strip_keeps_the_reply_well_formed():
    """The tool itself: the stripped EHLO reply is still one valid multi-line reply."""
    from tlsproxy import _strip_starttls

    assert _strip_starttls(b"250-gw\r\n250-PIPELINING\r\n250 STARTTLS\r\n") == b"250-gw\r\n250 PIPELINING\r\n"
    assert _strip_starttls(b"250-gw\r\n250-STARTTLS\r\n250 8BITMIME\r\n") == b"250-gw\r\n250 8BITMIME\r\n"
    assert _strip_starttls(b"250-gw\r\n250 SIZE 100\r\n") == b"250-gw\r\n250 SIZE 100\r\n"
