"""Inbound TLS policy (F-TLS-IN): the forced inbound list, certificates per local address and
SNI, and e-mail VPN peers that must present a client certificate from their CA to relay.

Certificates and CAs are made by the test with the openssl CLI. A client certificate from the
wrong CA does not break the handshake (ordinary MTAs may present any certificate); it just
grants nothing: such a session gets `554 5.7.1` for non-local recipients, like no certificate.
"""

import re
import ssl
import subprocess
from pathlib import Path

from clients import marker
from pki import Leaf, Spec, der_of, make_self_signed
from harness import (
    Raw,
    _table,
    free_port,
    insecure_context,
    message,
    queue_id,
    send_raw_message,
)


# the `pki` fixture (conftest.py) makes these for each test; pki["ca"] is the VPN CA
PKI = Spec(
    cas=("vpn-ca", "other-ca"),
    leaves={
        "peer": Leaf("vpn-ca", "peer", "gw-b.vpn.test"),
        "stranger": Leaf("other-ca", "stranger", "gw-x.evil.test"),
    },
)


def client_ctx(cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = insecure_context()
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


# --- sessions --------------------------------------------------------------------------------


def ehlo_tls(addr, source: str, cert=None, server_hostname=None) -> Raw:
    """Connects from `source`, EHLO, STARTTLS (presenting `cert`), EHLO again."""
    r = Raw(addr, source=source)
    r.expect("EHLO client.test", 250)
    r.expect("STARTTLS", 220)
    r.starttls(client_ctx(cert), server_hostname=server_hostname)
    r.expect("EHLO client.test", 250)
    return r


def rcpt_codes(r: Raw, rcpts: list[str]) -> list[str]:
    """MAIL, then each RCPT; returns each RCPT reply (code and enhanced code); RSET after."""
    r.expect("MAIL FROM:<alice@peer.test>", 250)
    out = []
    for to in rcpts:
        rep = r.cmd(f"RCPT TO:<{to}>")
        out.append(" ".join(rep.text.split()[:2]))
    r.expect("RSET", 250)
    return out


# --- VPN peers -------------------------------------------------------------------------------


def vpn_gateway(gateways, pki, *, trusted=(), implicit=False, ip="127.0.0.1"):
    """A gateway for a.test whose `*` route points at a closed port (mail to other domains
    stays queued), with 127.0.0.7 as a VPN peer pinned to the test VPN CA."""
    closed = free_port("127.0.0.1")
    gw = gateways.simple(
        "vpn", ip=ip, hostname="gw-a.test", local_domains=["a.test"], implicit=implicit,
        trusted_networks=list(trusted),
        routes=[
            {"domain": "a.test", "maildir": "maildir"},
            {"domain": "*", "next_hop": [f"127.0.0.1:{closed}"], "tls": "may"},
        ],
        start=False,
    )
    cfg = gw.config_path.read_text()
    cfg += _table("tls.ca", {"name": "company-vpn-ca", "pem": pki["ca"].read_text()}, array=True)
    cfg += _table("tls.peers", {"networks": ["127.0.0.7/32"], "ca": "company-vpn-ca"}, array=True)
    gw.config_path.write_text(cfg)
    return gw.start()


def test_vpn_peer_with_certificate_relays(gateways, pki):
    gw = vpn_gateway(gateways, pki)
    r = ehlo_tls(gw.addr, "127.0.0.7", pki["peer"])
    assert rcpt_codes(r, ["bob@remote.test", "carol@a.test"]) == ["250 2.1.5", "250 2.1.5"]
    mark = marker("vpn")
    rep = send_raw_message(r, "alice@peer.test", ["bob@remote.test"],
                           message(mark, "alice@peer.test", "bob@remote.test"))
    assert rep.code == 250, rep.text
    qid = queue_id(rep.text)
    r.expect("QUIT", 221)
    r.close()
    # queued for the (unreachable) external next hop, not delivered locally
    gw.wait_log(rf"queued queue_id={re.escape(qid)} client=127\.0\.0\.7 ")
    assert qid in gw.queue_files(), "message not in the queue"
    line = gw.wait_log(r"session client=127\.0\.0\.7 .*")[0].group(0)
    assert "CN=gw-b.vpn.test, O=Sealgate Test" in line, line
    assert qid in line, line


def test_vpn_peer_without_certificate_may_not_relay(gateways, pki):
    gw = vpn_gateway(gateways, pki)
    # over TLS without a client certificate
    r = ehlo_tls(gw.addr, "127.0.0.7")
    assert rcpt_codes(r, ["bob@remote.test", "carol@a.test"]) == ["554 5.7.1", "250 2.1.5"]
    r.expect("QUIT", 221)
    r.close()
    # in plaintext
    r = Raw(gw.addr, source="127.0.0.7")
    r.expect("EHLO client.test", 250)
    assert rcpt_codes(r, ["bob@remote.test", "carol@a.test"]) == ["554 5.7.1", "250 2.1.5"]
    r.close()
    gw.wait_log(r"VPN peer address without a client certificate: no relay")


def test_vpn_peer_with_certificate_from_another_ca_may_not_relay(gateways, pki):
    gw = vpn_gateway(gateways, pki)
    # decision: the handshake succeeds (the certificate is not trusted, it grants nothing)
    r = ehlo_tls(gw.addr, "127.0.0.7", pki["stranger"])
    assert rcpt_codes(r, ["bob@remote.test", "carol@a.test"]) == ["554 5.7.1", "250 2.1.5"]
    r.expect("QUIT", 221)
    r.close()
    gw.wait_log(r"client certificate rejected: no relay")
    line = gw.wait_log(r"session client=127\.0\.0\.7 .*")[0].group(0)
    assert "client_cert=-" in line or 'client_cert="-"' in line, line


def test_vpn_certificate_from_another_address_grants_nothing(gateways, pki):
    gw = vpn_gateway(gateways, pki)
    r = ehlo_tls(gw.addr, "127.0.0.8", pki["peer"])
    assert rcpt_codes(r, ["bob@remote.test", "carol@a.test"]) == ["554 5.7.1", "250 2.1.5"]
    r.close()


def test_vpn_peer_over_implicit_tls(gateways, pki):
    gw = vpn_gateway(gateways, pki, implicit=True)
    for cert, want in [(pki["peer"], "250 2.1.5"), (None, "554 5.7.1")]:
        r = Raw(gw.tls_addr, source="127.0.0.7", greet=False)
        r.starttls(client_ctx(cert))
        assert r.reply().code == 220
        r.expect("EHLO client.test", 250)
        assert rcpt_codes(r, ["bob@remote.test"]) == [want]
        r.close()


def test_vpn_peer_network_overrides_trusted_networks(gateways, pki):
    gw = vpn_gateway(gateways, pki, trusted=["127.0.0.0/24"])
    r = Raw(gw.addr, source="127.0.0.7")
    r.expect("EHLO client.test", 250)
    assert rcpt_codes(r, ["bob@remote.test"]) == ["554 5.7.1"]
    r.close()
    r = Raw(gw.addr, source="127.0.0.9")
    r.expect("EHLO client.test", 250)
    assert rcpt_codes(r, ["bob@remote.test"]) == ["250 2.1.5"]
    r.close()
    r = ehlo_tls(gw.addr, "127.0.0.7", pki["peer"])
    assert rcpt_codes(r, ["bob@remote.test"]) == ["250 2.1.5"]
    r.close()


# --- forced inbound --------------------------------------------------------------------------


def test_forced_inbound_needs_starttls(gateways):
    gw = gateways.simple("forced", local_domains=["a.test"], trusted_networks=[],
                         tls={"force": ["127.0.0.5/32"]})
    mark = marker("forced")
    r = Raw(gw.addr, source="127.0.0.5")
    r.expect("EHLO client.test", 250)
    rep = r.cmd("MAIL FROM:<alice@x.test>")
    assert rep.text.startswith("530 5.7.0"), rep.text
    assert r.cmd("RCPT TO:<bob@a.test>").code == 530
    r.expect("STARTTLS", 220)
    r.starttls()
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, "alice@x.test", ["bob@a.test"], message(mark, "alice@x.test", "bob@a.test"))
    assert rep.code == 250, rep.text
    r.close()
    gw.wait_message_with(mark.encode())

    # a client not on the list may still talk plaintext
    mark2 = marker("plain")
    r = Raw(gw.addr, source="127.0.0.6")
    r.expect("EHLO client.test", 250)
    rep = send_raw_message(r, "alice@x.test", ["bob@a.test"], message(mark2, "alice@x.test", "bob@a.test"))
    assert rep.code == 250, rep.text
    r.close()
    gw.wait_message_with(mark2.encode())


# --- certificates per local address and SNI --------------------------------------------------


def s_client_cert(addr, servername: str | None = None) -> bytes:
    """The server certificate (DER) as shown by `openssl s_client -starttls smtp -showcerts`."""
    args = ["openssl", "s_client", "-starttls", "smtp", "-connect", "%s:%d" % addr, "-showcerts"]
    if servername:
        args += ["-servername", servername]
    p = subprocess.run(args, input=b"QUIT\r\n", capture_output=True, timeout=30)
    out = p.stdout.decode("utf-8", "replace")
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
    assert m, out + p.stderr.decode("utf-8", "replace")
    return ssl.PEM_cert_to_DER_cert(m.group(0))


def test_certificate_per_local_address_and_sni(gateways, tmp_path):
    d = tmp_path / "certs"
    d.mkdir()
    one = make_self_signed(d, "one", "one.a.test")
    two = make_self_signed(d, "two", "two.a.test")
    vpn = make_self_signed(d, "vpn", "vpn.a.test")
    p1, p2 = free_port("127.0.0.1"), free_port("127.0.0.2")
    gw = gateways.simple(
        "multi", listen=[f"127.0.0.1:{p1}", f"127.0.0.2:{p2}"], local_domains=["a.test"],
        certificates=[
            {"name": "default", "cert_file": str(one[0]), "key_file": str(one[1])},
            {"name": "second", "local_addresses": ["127.0.0.2"],
             "cert_file": str(two[0]), "key_file": str(two[1])},
            {"name": "vpn", "server_names": ["vpn.a.test"],
             "cert_file": str(vpn[0]), "key_file": str(vpn[1])},
        ],
    )
    a1, a2 = ("127.0.0.1", p1), ("127.0.0.2", p2)
    # openssl s_client: the local address picks the certificate
    assert s_client_cert(a1) == der_of(one[0])
    assert s_client_cert(a2) == der_of(two[0])
    # SNI picks a third one (on the address without its own certificate)
    assert s_client_cert(a1, "vpn.a.test") == der_of(vpn[0])
    assert s_client_cert(a1, "unknown.a.test") == der_of(one[0])

    # the same through Python's ssl
    def peer_der(addr, sni=None) -> bytes:
        r = Raw(addr)
        r.expect("EHLO client.test", 250)
        r.expect("STARTTLS", 220)
        r.starttls(server_hostname=sni)
        der = r.sock.getpeercert(binary_form=True)
        r.close()
        return der

    assert peer_der(a1) == der_of(one[0])
    assert peer_der(a2) == der_of(two[0])
    assert peer_der(a1, "vpn.a.test") == der_of(vpn[0])
    assert gw.running()
