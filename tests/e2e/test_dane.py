"""DANE for MX delivery (F-STS, RFC 7672) against a real DNSSEC-signed world on loopback.

The world (nsd.py, started once for the module): a root zone `.` signed with ldns-signzone and
served by a private nsd on 127.0.0.50 (its key-signing key is the sending gateway's
`dns.trust_anchor`), holding the MX, A and TLSA records below, and the unsigned child zone
`insecure.test` delegated without a DS record. The sending gateway (127.0.0.1) has
`[dns] dnssec = true` and one `mx = true, port = P, tls = "dane"` route per test domain
(`dane-only` for one); the MX hosts are Sealgates on 127.0.0.4x:P with certificates from the
module's test CA (which the sender does not trust: only DANE can authenticate them).

- `ee.test` → mx1 (TLSA 3 1 1 of its key): delivered, the log says `auth=dane`, and so does
  the peer table's last TLS record (`sealctl peers list --json`).
- `ta.test` → mx2, serving leaf + CA (TLSA 2 1 1 of the CA's key; the leaf must chain to it and
  carry the MX name): delivered with `auth=dane`.
- `wrong.test` → mx3, whose TLSA names another key: deferred `4.7.5`, nothing delivered.
- `mitm.test` → a TLS-intercepting proxy (a certificate from another CA) in front of mx1, the
  TLSA being mx1's: deferred `4.7.5`; the proxy decrypts no mail.
- `bogus.test` → mx1 under a name whose TLSA RRset was changed after signing: deferred (the
  lookup does not validate), nothing delivered.
- `insecure.test` (unsigned) and `notlsa.test` (signed, no TLSA): delivered as `may` (TLS
  without authentication, `auth=none`).
- `only.test` (`dane-only`) → the unsigned zone's MX host: deferred `4.7.5`.

Skipped only when nsd or ldnsutils is not installed (tests/run installs them). Network rule:
only 127.0.0.0/8 is ever used.
"""

from __future__ import annotations

import re

import pytest

import nsd as nsd_mod
from clients import marker
from harness import GatewayFactory, Raw, free_port, message, port_is_free, send_raw_message, wait_until
from pki import Leaf, Spec
from tlsproxy import TlsProxy

_why = nsd_mod.unavailable()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"DNSSEC world: {_why}")

NSD_IP = "127.0.0.50"
HOSTS = {  # MX host → its address
    "mx1.dane.test": "127.0.0.41",
    "mx2.dane.test": "127.0.0.42",
    "mx3.dane.test": "127.0.0.43",
    "mitm.dane.test": "127.0.0.45",  # the proxy
    "mx1.bogus.test": "127.0.0.41",
    "mx6.dane.test": "127.0.0.44",
}
INSECURE_MX = ("mx.insecure.test", "127.0.0.44")
DOMAINS = {  # recipient domain → (MX host, route level)
    "ee.test": ("mx1.dane.test", "dane"),
    "ta.test": ("mx2.dane.test", "dane"),
    "wrong.test": ("mx3.dane.test", "dane"),
    "mitm.test": ("mitm.dane.test", "dane"),
    "bogus.test": ("mx1.bogus.test", "dane"),
    "notlsa.test": ("mx6.dane.test", "dane"),
    "insecure.test": (INSECURE_MX[0], "dane"),
    "only.test": (INSECURE_MX[0], "dane-only"),
}

PKI = Spec(
    cas=("test-ca", "other-ca"),
    leaves={
        "mx1": Leaf("test-ca", "mx1", "mx1.dane.test", usage="serverAuth"),
        "mx2": Leaf("test-ca", "mx2", "mx2.dane.test", usage="serverAuth"),
        "mx3": Leaf("test-ca", "mx3", "mx3.dane.test", usage="serverAuth"),
        "other": Leaf("test-ca", "other", "mx3.dane.test", usage="serverAuth"),
        "mitm": Leaf("other-ca", "mitm", "mx1.dane.test", usage="serverAuth"),
        "plain": Leaf("test-ca", "plain", "mx.insecure.test", usage="serverAuth"),
    },
    scope="module",
)


def common_port() -> int:
    """A port free on every MX address."""
    ips = set(HOSTS.values()) | {INSECURE_MX[1]}
    for _ in range(50):
        p = free_port(NSD_IP)
        if all(port_is_free(ip, p) for ip in ips):
            return p
    raise RuntimeError("no port free on all MX addresses")


def make_world(pki, workdir) -> nsd_mod.SignedWorld:
    """The signed world of the module doc, started (also used by tools/bench/dane)."""
    port = common_port()
    w = nsd_mod.SignedWorld(workdir, ip=NSD_IP)
    for dom, (mx, _) in DOMAINS.items():
        (w.add_insecure if dom == "insecure.test" else w.add)(dom, "MX", f"10 {mx}.")
    for host, ip in HOSTS.items():
        w.add(host, "A", ip)
    w.add(f"_{port}._tcp.mx1.dane.test", "TLSA", nsd_mod.tlsa(3, 1, 1, pki["mx1"][0]))
    w.add(f"_{port}._tcp.mx2.dane.test", "TLSA", nsd_mod.tlsa(2, 1, 1, pki["ca"]))
    w.add(f"_{port}._tcp.mx3.dane.test", "TLSA", nsd_mod.tlsa(3, 1, 1, pki["other"][0]))
    w.add(f"_{port}._tcp.mitm.dane.test", "TLSA", nsd_mod.tlsa(3, 1, 1, pki["mx1"][0]))
    w.add(f"_{port}._tcp.mx1.bogus.test", "TLSA", nsd_mod.tlsa(3, 1, 1, pki["mx1"][0]))
    w.tamper(f"_{port}._tcp.mx1.bogus.test", "TLSA")
    w.add_insecure(INSECURE_MX[0], "A", INSECURE_MX[1])
    w.add_insecure(f"_{port}._tcp.{INSECURE_MX[0]}", "TLSA",
                   nsd_mod.tlsa(3, 1, 1, pki["plain"][0]))
    w.port_mx = port
    return w.start()


@pytest.fixture(scope="module")
def world(_module_pki, tmp_path_factory):
    w = make_world(_module_pki, tmp_path_factory.mktemp("dane-dns"))
    yield w
    w.stop()


@pytest.fixture(scope="module")
def module_gateways(tmp_path_factory):
    f = GatewayFactory(tmp_path_factory.mktemp("dane-gateways"))
    yield f
    problems = f.close()
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture(autouse=True)
def _logs(request, module_gateways):
    request.node._sealgate = module_gateways
    yield


def receiver(factory, pki, name: str, ip: str, port: int, cert: str, chain=None):
    """An MX host: a Sealgate on ip:port with `cert` (leaf, or `chain` PEM: leaf + CA)
    delivering every test domain into its Maildir."""
    cert_file = chain or pki[cert][0]
    return factory.simple(
        name, ip=ip, hostname=f"{name}.test", local_domains=list(DOMAINS),
        trusted_networks=[], listen=[f"{ip}:{port}"],
        certificates=[{"name": "default", "cert_file": str(cert_file),
                       "key_file": str(pki[cert][1])}])


def make_net(world, factory, pki, workdir):
    """The MX hosts, the intercepting proxy and the sender: (sender, receivers, proxy)."""
    port = world.port_mx
    chain = workdir / "mx2-chain.pem"
    chain.write_text(pki["mx2"][0].read_text() + pki["ca"].read_text())
    rx = {
        "mx1": receiver(factory, pki, "mx1", "127.0.0.41", port, "mx1"),
        "mx2": receiver(factory, pki, "mx2", "127.0.0.42", port, "mx2", chain=chain),
        "mx3": receiver(factory, pki, "mx3", "127.0.0.43", port, "mx3"),
        "plain": receiver(factory, pki, "plain", "127.0.0.44", port, "plain"),
    }
    proxy = TlsProxy(("127.0.0.45", port), rx["mx1"].addr, mode="mitm",
                     mitm_cert=pki["mitm"][0], mitm_key=pki["mitm"][1])
    routes = [{"domain": "a.test", "maildir": "maildir"}]
    routes += [{"domain": d, "mx": True, "port": port, "tls": level}
               for d, (_, level) in DOMAINS.items()]
    sender = factory.simple(
        "sender", hostname="sender.test", local_domains=["a.test"], routes=routes,
        dns={"resolver": [world.resolver], "dnssec": True, "trust_anchor": world.trust_anchor},
        queue={"retry_schedule": ["1h"], "connect_timeout": "3s"})
    return sender, rx, proxy


@pytest.fixture(scope="module")
def net(world, module_gateways, _module_pki, tmp_path_factory):
    sender, rx, proxy = make_net(world, module_gateways, _module_pki,
                                 tmp_path_factory.mktemp("dane-chain"))
    yield sender, rx, proxy
    proxy.close()


def submit(gw, rcpt: str, tag: str) -> tuple[str, str]:
    mark = marker(tag)
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, "alice@a.test", [rcpt], message(mark, "alice@a.test", rcpt))
    assert rep.code == 250, rep
    r.expect("QUIT", 221)
    return re.search(r"queued as (\S+)", rep.text).group(1), mark


def attempt_line(gw, qid: str) -> str:
    """The delivery log line of `qid`'s (first) attempt."""
    ms = gw.wait_log(rf"^.*delivery attempt.*queue_id={re.escape(qid)}.*$|"
                     rf"^.*queue_id={re.escape(qid)}.*delivery attempt.*$")
    return ms[0].group(0)


def last_tls_auth(gw, host: str) -> str:
    """`auth` of the peer table's last TLS record for `host` (the table is written shortly
    after the delivery)."""
    def auth():
        for p in gw.peer_table()["peers"]:
            if p["name"] == host and p.get("last_tls"):
                return p["last_tls"].get("auth")
        return None
    return wait_until(auth, 20, f"{host} in the peer table")


def test_dane_ee_and_ta_deliver_authenticated(net):
    sender, rx, _ = net
    for dom, box in (("ee.test", "mx1"), ("ta.test", "mx2")):
        qid, mark = submit(sender, f"bob@{dom}", f"dane-{box}")
        rx[box].wait_message_with(mark.encode())
        line = attempt_line(sender, qid)
        assert "auth=dane" in line and "level=dane" in line, line
        assert "tls=TLSv1." in line, line
    # the peer table (sealctl peers list, the status API) says how each peer was authenticated
    for host in ("mx1.dane.test", "mx2.dane.test"):
        assert last_tls_auth(sender, host) == "dane"


def test_wrong_certificate_and_mitm_defer_and_deliver_nothing(net):
    sender, rx, proxy = net
    for dom, box in (("wrong.test", "mx3"), ("mitm.test", "mx1")):
        qid, mark = submit(sender, f"bob@{dom}", f"dane-{dom}")
        err = sender.deferred_detail(qid, f"bob@{dom}")
        assert "4.7.5" in err and "matches none of the 1 usable TLSA records" in err, err
        assert not any(mark.encode() in m for m in rx[box].messages().values())
    assert b"DATA" not in proxy.decrypted("c2s"), "the MITM read a transaction"


def test_bogus_tlsa_defers(net):
    sender, rx, _ = net
    qid, mark = submit(sender, "bob@bogus.test", "dane-bogus")
    err = sender.deferred_detail(qid, "bob@bogus.test")
    assert "4.7.5" in err and "TLSA lookup failed" in err, err
    assert not any(mark.encode() in m for m in rx["mx1"].messages().values())


def test_insecure_and_no_tlsa_deliver_as_may(net):
    sender, rx, _ = net
    for dom in ("insecure.test", "notlsa.test"):
        qid, mark = submit(sender, f"bob@{dom}", f"dane-{dom}")
        rx["plain"].wait_message_with(mark.encode())
        line = attempt_line(sender, qid)
        assert "level=may" in line and "auth=none" in line and "tls=TLSv1." in line, line
    assert last_tls_auth(sender, "mx.insecure.test") == "none"


def test_dane_only_without_secure_tlsa_defers(net):
    sender, rx, _ = net
    qid, mark = submit(sender, "bob@only.test", "dane-only")
    err = sender.deferred_detail(qid, "bob@only.test")
    assert "4.7.5" in err and "dane-only, but" in err, err
    assert not any(mark.encode() in m for m in rx["plain"].messages().values())
