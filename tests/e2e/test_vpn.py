"""The e-mail VPN (PRODUCT.md F-TLS-IN "VPN peers", F-TLS-OUT levels and client certificates,
docs/tls-policy.md): three gateways that only talk to each other over mutually authenticated TLS.

Gateways A, B, C listen on 127.0.0.1, 127.0.0.2, 127.0.0.3 (local domains a.test, b.test,
c.test, delivered to Maildirs). The test makes a VPN CA and one certificate per gateway
(serverAuth + clientAuth, IP SAN = the gateway's address). Each gateway:

- serves its VPN certificate on its own address (`[[tls.certificates]]` with
  `local_addresses`) and presents the same certificate as client certificate on its routes;
- carries the VPN CA (`[[tls.ca]]`) and lists the other two addresses as VPN peers of that CA
  (`[[tls.peers]]`: they relay only with a verified client certificate) and on `tls.force`
  (never plaintext either way);
- routes each other domain to that gateway: next_hop = "IP:port", tls = "verify", ca = the VPN
  CA, client_certificate = its own certificate; sends from its own address (queue.bind_address)
  so the receiver's peer list sees who it is.

Checks: mail between every ordered pair arrives (6 messages), each hop over TLS with the
server certificate verified (the sender's "delivery attempt" line: tls=TLSv1.x level=verify
cert=verified) and the client certificate accepted (the receiver's session line: tls=TLSv1.x,
client_cert="CN=<the sender's VPN name>..."); a message A routes via B to a domain that only C
holds is relayed by B because A is a VPN peer with a valid client certificate; the same through
a route of A without client_certificate is refused by B with 554 5.7.1 (B does not relay for a
VPN peer address without a certificate), which A turns into a bounce (DSN) to the sender, and
nothing reaches C.

Test submissions come from 127.0.0.9, a trusted network of all three (not a VPN peer). The
receivers' command_timeout is short, so the senders' parked connections end (and the receivers
log their session lines) within seconds. Every wait is bounded.
"""

from __future__ import annotations

import re

import pytest

from clients import marker
from harness import (
    _table,
    free_port,
    received_headers,
    submit_one,
)
from pki import Leaf, Spec, cert_sha256

IPS = {"a": "127.0.0.1", "b": "127.0.0.2", "c": "127.0.0.3"}
SUBMITTER = "127.0.0.9"
CA_NAME = "vpn-ca"


def vpn_name(g: str) -> str:
    return f"gw-{g}.vpn.test"


# the `pki` fixture (conftest.py) makes these once for the module: the VPN CA and one
# certificate per gateway (pki["a"] ... as (cert, key))
PKI = Spec(
    cas=(CA_NAME,),
    leaves={
        g: Leaf(CA_NAME, f"gw-{g}", vpn_name(g), usage="serverAuth,clientAuth", sans=(vpn_name(g), ip))
        for g, ip in IPS.items()
    },
    scope="module",
)


@pytest.fixture
def vpn(gateways, pki):
    """The three gateways, started; returns {"a": Gateway, ...}."""
    ports = {g: free_port(ip) for g, ip in IPS.items()}
    gws = {}
    for g, ip in IPS.items():
        others = [o for o in IPS if o != g]
        routes = [{"domain": f"{g}.test", "maildir": "maildir"}]
        for o in others:
            routes.append({"domain": f"{o}.test", "next_hop": [f"{IPS[o]}:{ports[o]}"], "tls": "verify",
                           "ca": CA_NAME, "client_certificate": "vpn"})
        # the relay scenario: far.test and nocert.test live on C only; A sends them via B, with
        # and without its client certificate; B forwards them to C.
        if g == "a":
            routes.append({"domain": "far.test", "next_hop": [f"{IPS['b']}:{ports['b']}"], "tls": "verify",
                           "ca": CA_NAME, "client_certificate": "vpn"})
            routes.append({"domain": "nocert.test", "next_hop": [f"{IPS['b']}:{ports['b']}"],
                           "tls": "verify", "ca": CA_NAME})
        if g == "b":
            for dom in ("far.test", "nocert.test"):
                routes.append({"domain": dom, "next_hop": [f"{IPS['c']}:{ports['c']}"], "tls": "verify",
                               "ca": CA_NAME, "client_certificate": "vpn"})
        if g == "c":
            routes += [{"domain": "far.test", "maildir": "far"}, {"domain": "nocert.test", "maildir": "far"}]
        local = [f"{g}.test"] + (["far.test", "nocert.test"] if g == "c" else [])
        cert, key = pki[g]
        gw = gateways.simple(
            g, ip=ip, hostname=vpn_name(g), local_domains=local,
            listen=[f"{ip}:{ports[g]}"],
            trusted_networks=[f"{SUBMITTER}/32"],
            routes=routes,
            smtp={"command_timeout": "3s"},
            queue={"retry_schedule": ["1s"], "bind_address": ip},
            tls={"handshake_timeout": "5s", "force": [f"{IPS[o]}/32" for o in others]},
            certificates=[
                {"name": "default"},
                {"name": "vpn", "local_addresses": [ip], "cert_file": str(cert), "key_file": str(key)},
            ],
            start=False,
        )
        cfg = gw.config_path.read_text()
        cfg += _table("tls.ca", {"name": CA_NAME, "pem": pki["ca"].read_text()}, array=True)
        cfg += _table("tls.peers", {"networks": [f"{IPS[o]}/32" for o in others], "ca": CA_NAME}, array=True)
        gw.config_path.write_text(cfg)
        gws[g] = gw
    for gw in gws.values():
        gw.start()
    return gws


def submit(gw, frm: str, to: str, mark: str) -> str:
    """Hands `gw` a message from SUBMITTER (trusted, not a VPN peer); returns its queue id."""
    return submit_one(gw.addr, frm, to, mark, ehlo="submit.test", source=SUBMITTER)


def attempt_line(gw, qid: str) -> str:
    """The sender's successful "delivery attempt" line for `qid`."""
    rx = rf"^(?=.*\bdelivery attempt\b(?! failed))(?=.*queue_id={re.escape(qid)}\b).*$"
    return gw.wait_log(rx, timeout=15)[-1].group(0)


def remote_qid(line: str) -> str:
    m = re.search(r"result=250 2\.0\.0 Ok: queued as (\S+)", line)
    assert m, line
    return m.group(1)


def check_verified_hop(sender, receiver, s: str, qid: str, pki) -> str:
    """The hop sender→receiver for `qid` was TLS, server certificate verified, client
    certificate accepted; returns the receiver's queue id."""
    line = attempt_line(sender, qid)
    assert re.search(r"\btls=TLSv1\.[23]\b", line), line
    assert "level=verify " in line and "cert=verified " in line, line
    assert f"peer={receiver.addr[0]}:{receiver.addr[1]} " in line, line
    r = next(g for g, ip in IPS.items() if ip == receiver.addr[0])
    assert f"peer_cert={cert_sha256(pki[r][0])}" in line, line
    rq = remote_qid(line)
    sess = receiver.wait_log(
        rf"^.*\bsession client={re.escape(IPS[s])} .*queue_ids=\S*{re.escape(rq)}\b.*$", timeout=15
    )[-1].group(0)
    assert re.search(r'\btls="?TLSv1\.[23]', sess), sess
    assert f'client_cert="CN={vpn_name(s)}, O=Sealgate Test"' in sess, sess
    return rq


def test_mail_between_every_pair(vpn, pki):
    sent = {}
    for s in IPS:
        for r in IPS:
            if s != r:
                mark = marker(f"vpn-{s}{r}")
                sent[(s, r)] = (mark, submit(vpn[s], f"alice@{s}.test", f"bob@{r}.test", mark))
    for (s, r), (mark, qid) in sent.items():
        got = vpn[r].wait_message_with(mark.encode(), timeout=20)
        top = received_headers(got)[0]
        assert "with ESMTPS (TLSv1." in top, top
        assert vpn_name(s) in top, top
        check_verified_hop(vpn[s], vpn[r], s, qid, pki)
    for gw in vpn.values():
        gw.wait_queue_empty(15)
        assert len(gw.messages()) == 2, f"{gw.name}: {list(gw.messages())}"
        assert "result=Deferred" not in gw.log(), gw.name
    # the receivers saw each sender as a verified VPN peer (nothing refused)
    for gw in vpn.values():
        assert "client certificate rejected" not in gw.log(), gw.name
        assert "VPN peer address without a client certificate" not in gw.log(), gw.name
    # the peer tables (written at shutdown): each gateway lists the other two as inbound clients
    # verified as VPN peers, and as outbound peers with TLS
    for gw in vpn.values():
        assert gw.stop() == 0, gw.name
    for g, gw in vpn.items():
        table = gw.peer_table()
        clients = {c["ip"]: c for c in table.get("clients", [])}
        out = {p["ip"]: p for p in table["peers"]}
        for o in IPS:
            if o == g:
                continue
            c = clients.get(IPS[o])
            assert c and c["vpn_peer"] == f"CN={vpn_name(o)}, O=Sealgate Test", (g, o, c)
            assert c["last_tls"] and c["last_tls"]["fingerprint"] == cert_sha256(pki[o][0]), (g, o, c)
            p = out.get(IPS[o])
            assert p and p["last_tls"] and p["last_tls"]["fingerprint"] == cert_sha256(pki[o][0]), (g, o, p)
            assert p["counts"]["plaintext"] == 0 and p["downgrade_flagged"] is None, (g, o, p)


def test_relay_through_a_vpn_peer(vpn, pki):
    a, b, c = vpn["a"], vpn["b"], vpn["c"]
    mark = marker("vpn-relay")
    qid = submit(a, "alice@a.test", "carol@far.test", mark)
    got = c.wait_message_with(mark.encode(), sub="far", timeout=20)
    rx = received_headers(got)
    # C's Received (from B), then B's (from A): both over TLS
    assert len(rx) >= 2, rx
    assert vpn_name("b") in rx[0] and "with ESMTPS (TLSv1." in rx[0], rx[0]
    assert vpn_name("a") in rx[1] and "with ESMTPS (TLSv1." in rx[1], rx[1]
    bq = check_verified_hop(a, b, "a", qid, pki)
    check_verified_hop(b, c, "b", bq, pki)
    a.wait_queue_empty(15)
    b.wait_queue_empty(15)


def test_relay_without_client_certificate_is_refused(vpn, pki):
    a, b, c = vpn["a"], vpn["b"], vpn["c"]
    # first a session with the certificate (so a cached TLS session with it exists) ...
    ok = marker("vpn-relay-ok")
    submit(a, "alice@a.test", "carol@far.test", ok)
    c.wait_message_with(ok.encode(), sub="far", timeout=20)
    # ... then the route of A without client_certificate
    mark = marker("vpn-nocert")
    qid = submit(a, "alice@a.test", "dave@nocert.test", mark)
    # B refuses the recipient: 554 5.7.1, a permanent failure; A bounces at once to alice
    a.wait_log(rf"delivery queue_id={re.escape(qid)} rcpt=dave@nocert\.test result=Failed", timeout=15)
    dsn = a.wait_message_with(b"dave@nocert.test", timeout=15)
    assert b"5.7.1" in dsn, dsn[:2000]
    assert re.search(rb"(?i)relay access denied", dsn), dsn[:2000]
    a.wait_queue_empty(15)
    # the session was TLS (verify) but presented no client certificate; B says why it refused
    b.wait_log(r"client=127\.0\.0\.1\b.*VPN peer address without a client certificate: no relay"
               r"|VPN peer address without a client certificate: no relay.*client=127\.0\.0\.1\b", timeout=10)
    sess = b.wait_log(r'^.*\bsession client=127\.0\.0\.1 .*client_cert="-".*$', timeout=15)[-1].group(0)
    assert re.search(r'\btls="?TLSv1\.[23]', sess), sess
    # nothing reached C, B queued nothing for it
    assert not [v for v in c.messages("far").values() if mark.encode() in v]
    assert mark not in b.log() and not [m for m in b.queue_list().values()
                                        if any(r["address"] == "dave@nocert.test" for r in m["recipients"])]
