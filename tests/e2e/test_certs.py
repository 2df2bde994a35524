"""Keys made on the box and certificates imported into its sealed store (F-SEAL): `sealgate keys
generate` writes a CSR (CN/SAN = the box's name) while the key stays sealed; a test CA signs it
with the openssl CLI; `sealgate certs import` checks and installs it; the gateway serves it on
STARTTLS. Importing a certificate for another key, an expired one, or one whose names miss the
box's name, is refused with the reason and changes nothing.
"""

import subprocess
import time

import pytest

from harness import BIN
from pki import _openssl, der_of, make_ca, make_leaf
from test_reload import served_cert


def sealgate(gw, *args, ok=True):
    p = subprocess.run([str(BIN), "--state", str(gw.state), *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    if ok and p.returncode != 0:
        pytest.fail(f"sealgate {args}: {p.returncode} {p.stdout}{p.stderr}")
    return p


def test_csr_flow_end_to_end(gateways, tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "ca")
    gw = gateways.simple("gw", hostname="mail.a.test", local_domains=["a.test"], start=False,
                         certificates=[{"name": "mail"}], tls={"dev_self_signed": False})
    csr = tmp_path / "mail.csr"
    sealgate(gw, "keys", "generate", "--name", "mail", "--dns", "mail.a.test", "--csr", csr)
    text = _openssl("req", "-in", str(csr), "-noout", "-text", cwd=tmp_path).decode()
    assert "CN = mail.a.test" in text and "DNS:mail.a.test" in text, text
    assert not list(gw.state.rglob("*.key")), "the key must stay in the sealed store"

    # a certificate for another key: refused, nothing installed
    other, _ = make_leaf(d, "ca", "other", "mail.a.test", usage="serverAuth")
    p = sealgate(gw, "certs", "import", "--name", "mail", other, "--chain", d / "ca.pem", ok=False)
    assert p.returncode == 1 and "does not belong to the leaf certificate" in p.stderr, p.stderr
    assert "no certificates" in sealgate(gw, "certs", "list").stdout

    # the CA signs the box's CSR, but for the wrong name: refused
    (d / "wrong.ext").write_text("subjectAltName=DNS:www.a.test\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "30", "-extfile", "wrong.ext", "-out", "wrong.pem", cwd=d)
    p = sealgate(gw, "certs", "import", "--name", "mail", d / "wrong.pem", "--chain", d / "ca.pem", ok=False)
    assert p.returncode == 1 and "does not cover the name mail.a.test" in p.stderr, p.stderr

    # the right names, but valid for an instant only (openssl -days 0): expired by import time
    (d / "mail.ext").write_text("subjectAltName=DNS:mail.a.test\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "0", "-extfile", "mail.ext", "-out", "instant.pem", cwd=d)
    time.sleep(1.5)
    p = sealgate(gw, "certs", "import", "--name", "mail", d / "instant.pem", "--chain", d / "ca.pem", ok=False)
    assert p.returncode == 1 and "expired at" in p.stderr, p.stderr
    assert "no certificates" in sealgate(gw, "certs", "list").stdout

    # the right one: installed, listed, served
    _openssl("x509", "-req", "-in", str(csr), "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "30", "-extfile", "mail.ext", "-out", "mail.pem", cwd=d)
    out = sealgate(gw, "certs", "import", "--name", "mail", d / "mail.pem", "--chain", d / "ca.pem").stdout
    assert "imported mail: CN=mail.a.test" in out, out
    listing = sealgate(gw, "certs", "list").stdout
    assert "mail: CN=mail.a.test" in listing and "SAN mail.a.test" in listing, listing
    gw.start()
    assert served_cert(gw.addr) == der_of(d / "mail.pem")
    assert (gw.state / "certs" / "mail.crt.pem").is_file()
    # while the gateway runs, the store belongs to it
    p = sealgate(gw, "certs", "list", ok=False)
    assert p.returncode == 1 and "lock held" in p.stderr, p.stderr
