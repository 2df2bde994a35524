"""Hot apply of a new configuration (F-CONFIG: "a new config applies without restart and without
dropping sessions; certificates reload with it"), through the dev board's path: the TOML file
re-read on SIGHUP.

A session opened before the reload keeps working to its end on the old snapshot; the next
connection is served the new certificate; a broken config on reload changes nothing (the old
certificate is still served, the error is logged) and the process stays up.
"""

import signal
import ssl
import subprocess

from clients import marker
from harness import Raw, message, send_raw_message
from pki import der_of, make_self_signed


def served_cert(addr) -> bytes:
    """The server certificate (DER) seen by `openssl s_client -starttls smtp`."""
    p = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", "%s:%d" % addr],
        input=b"QUIT\r\n", capture_output=True, timeout=30,
    )
    pem = p.stdout.decode("latin-1")
    start = pem.index("-----BEGIN CERTIFICATE-----")
    end = pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(pem[start:end])


def test_sighup_applies_new_certificate_and_keeps_open_sessions(gateways, tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    cert_a, key_a = make_self_signed(d, "a", "gw-a.test")
    cert_b, key_b = make_self_signed(d, "b", "gw-b.test")
    gw = gateways.simple(
        "gw", hostname="gw.test", local_domains=["a.test"],
        certificates=[{"name": "default", "cert_file": str(cert_a), "key_file": str(key_a)}],
    )
    assert served_cert(gw.addr) == der_of(cert_a)

    # A session that is open across the reload.
    old = Raw(gw.addr)
    old.expect("EHLO client.test", 250)

    gw.config_path.write_text(
        gw.config_path.read_text().replace(str(cert_a), str(cert_b)).replace(str(key_a), str(key_b))
    )
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_log(r"configuration reloaded and applied")
    assert served_cert(gw.addr) == der_of(cert_b), "the next connection gets the new certificate"

    # The old session finishes its transaction.
    mark = marker("reload")
    rep = send_raw_message(old, "alice@a.test", ["bob@a.test"], message(mark, "alice@a.test", "bob@a.test"))
    assert rep.code == 250, rep
    old.expect("QUIT", 221)
    gw.wait_message_with(mark.encode())

    # A broken config: refused, logged, nothing changes, the process lives on.
    good = gw.config_path.read_text()
    gw.config_path.write_text(good.replace('trusted_networks = ["127.0.0.1/32"]',
                                           'trusted_networks = ["127.0.0.1/33"]'))
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_log(r"configuration NOT applied; the running one stays.*smtp\.trusted_networks")
    assert gw.running()
    assert served_cert(gw.addr) == der_of(cert_b)

    # A config naming a certificate that cannot be loaded: refused the same way.
    gw.config_path.write_text(good.replace(str(key_b), str(d / "missing.key")))
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_log(r"configuration NOT applied; the running one stays.*missing\.key")
    assert served_cert(gw.addr) == der_of(cert_b)
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    r.expect("QUIT", 221)
