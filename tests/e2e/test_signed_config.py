"""The signed config blob end to end (F-CONFIG): `sealctl keygen` → write TOML → `sealctl config
sign` → `sealgate provision --trust` → the box runs on the blob; a blob with a higher sequence
hot-applies on SIGHUP while a session is open and the next connection gets the new certificate.

Then every refusal, each with its own error in the log, and nothing changed: the running config
(the served certificate) and the stored sequence (`sealgate device` after the stop) stay.
"""

import os
import re
import signal
import subprocess

import pytest

from clients import marker
from harness import BIN, SEALCTL, Raw, message, send_raw_message
from pki import der_of, make_self_signed
from test_reload import served_cert


def run(*args, ok=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if ok and p.returncode != 0:
        pytest.fail(f"{args} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def device(gw) -> dict:
    out = run(BIN, "--state", gw.state, "device").stdout
    return dict(line.split(": ", 1) for line in out.strip().splitlines())


@pytest.fixture
def site(gateways, tmp_path):
    """A provisioned gateway (not started), its TOML, HQ keys and two certificates."""
    hq = tmp_path / "hq"
    hq.mkdir()
    run(SEALCTL, "keygen", "--out", hq / "hq")
    run(SEALCTL, "keygen", "--out", hq / "rogue")
    d = tmp_path / "pki"
    d.mkdir()
    certs = [make_self_signed(d, n, f"gw-{n}.test") for n in ("a", "b")]
    gw = gateways.simple(
        "gw", hostname="gw.test", local_domains=["a.test"], start=False,
        certificates=[{"name": "default", "cert_file": str(certs[0][0]),
                       "key_file": str(certs[0][1])}],
    )
    toml = gw.config_path.read_text()
    assert device(gw)["trusted config keys"].startswith("none")
    out = run(BIN, "--state", gw.state, "provision", "--trust", hq / "hq.pub").stdout
    assert "provisioned DEV-" in out
    serial = device(gw)["serial"]
    assert re.fullmatch(r"DEV-[0-9A-F]{8}", serial)
    blob = tmp_path / "site.sgc"

    def sign(text, seq, *extra, key="hq", out=blob, device=serial):
        src = tmp_path / f"site-{seq}.toml"
        src.write_text(text)
        args = [SEALCTL, "config", "sign", src, "--key", hq / f"{key}.key", "--seq", seq, "-o", out]
        if device:
            args += ["--device", device]
        run(*args, *extra)
        return out

    with_b = toml.replace(str(certs[0][0]), str(certs[1][0])).replace(str(certs[0][1]), str(certs[1][1]))
    return {"gw": gw, "toml": toml, "toml_b": with_b, "sign": sign, "blob": blob,
            "certs": certs, "serial": serial, "dir": tmp_path}


def test_signed_config_round_trip_and_hot_apply(site):
    gw, sign = site["gw"], site["sign"]
    cert_a, cert_b = site["certs"][0][0], site["certs"][1][0]
    gw.config_path = sign(site["toml"], 1)
    gw.start()
    gw.wait_log(r"signed configuration applied")
    assert served_cert(gw.addr) == der_of(cert_a)

    old = Raw(gw.addr)
    old.expect("EHLO client.test", 250)
    sign(site["toml_b"], 2)
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_log(r"configuration reloaded and applied.*signed config")
    assert served_cert(gw.addr) == der_of(cert_b)
    mark = marker("signed")
    rep = send_raw_message(old, "alice@a.test", ["bob@a.test"], message(mark, "alice@a.test", "bob@a.test"))
    assert rep.code == 250, rep
    old.expect("QUIT", 221)
    gw.wait_message_with(mark.encode())

    # the same blob again: a no-op, not an error
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_log(r"already applied")
    gw.stop()
    info = device(gw)
    assert info["config sequence"] == "2"
    # the device identity key was made on the box at first start and stays
    assert re.match(r"[0-9a-f]{64} \(Ed25519", info["identity"]), info
    # restart without --config: the box runs on its last applied blob (certificate B)
    gw.config_path = None
    gw.start()
    assert served_cert(gw.addr) == der_of(cert_b)


def test_every_bad_blob_is_refused_and_changes_nothing(site):
    gw, sign, blob, d = site["gw"], site["sign"], site["blob"], site["dir"]
    cert_a = site["certs"][0][0]
    gw.config_path = sign(site["toml"], 5)
    gw.start()
    assert served_cert(gw.addr) == der_of(cert_a)
    good = blob.read_bytes()

    def refused(data: bytes, pattern: str):
        rx = r"configuration NOT applied; the running one stays.*"
        n = len(re.findall(rx, gw.log()))
        blob.write_bytes(data)
        gw.proc.send_signal(signal.SIGHUP)
        lines = gw.wait_log(rx, count=n + 1)
        assert re.search(pattern, lines[n].group(0)), (pattern, lines[n].group(0))
        assert gw.running()
        assert served_cert(gw.addr) == der_of(cert_a), pattern

    b = site["toml_b"]
    tampered = bytearray(good)
    tampered[-1] ^= 1
    refused(bytes(tampered), r"signature: does not verify")
    refused(sign(b, 6, key="rogue", out=d / "x.sgc").read_bytes(), r"signature: signed by key [0-9a-f]+, which is not trusted")
    refused(sign(b, 6, out=d / "x.sgc", device="DEV-00000000").read_bytes(), r"device: the blob is for device DEV-00000000")
    refused(sign(b, 4, out=d / "x.sgc").read_bytes(), r"sequence: the blob's sequence 4 is lower than the stored 5")
    refused(sign(b, 5, out=d / "x.sgc").read_bytes(), r"sequence: the blob has the stored sequence 5 but different content")
    refused(sign(b, 6, "--not-after", "2020-01-01", out=d / "x.sgc").read_bytes(), r"time window: expired")
    refused(sign(b, 6, "--not-before", "2099-01-01", out=d / "x.sgc").read_bytes(), r"time window: not valid before")
    refused(sign(b, 6, "--min-firmware", "99.0", out=d / "x.sgc").read_bytes(), r"firmware: the blob needs firmware 99\.0")
    refused(good[: len(good) // 2], r"format: truncated")
    # random bytes where the blob was: not a blob, so read as (dev board) TOML, and refused
    refused(os.urandom(300), r"config file .*site\.sgc: TOML parse error")
    bad_cidr = b.replace('trusted_networks = ["127.0.0.1/32"]', 'trusted_networks = ["127.0.0.1/33"]')
    refused(sign(bad_cidr, 6, "--dangerous-skip-config-check", out=d / "x.sgc").read_bytes(),
            r"semantic check: .*smtp\.trusted_networks")
    unknown_cert = b.replace('name = "default"', 'name = "nosuch"') + '\n[[route]]\ndomain = "x.test"\nnext_hop = ["127.0.0.1:25"]\nclient_certificate = "default"\n'
    refused(sign(unknown_cert, 6, "--dangerous-skip-config-check", out=d / "x.sgc").read_bytes(),
            r"semantic check: .*client_certificate")
    gw.stop()
    assert device(gw)["config sequence"] == "5"


def test_unprovisioned_box_refuses_a_blob(gateways, tmp_path):
    run(SEALCTL, "keygen", "--out", tmp_path / "hq")
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"], start=False)
    src = tmp_path / "site.toml"
    src.write_text(gw.config_path.read_text())
    run(SEALCTL, "config", "sign", src, "--key", tmp_path / "hq.key", "--seq", 1, "-o", tmp_path / "site.sgc")
    p = run(BIN, "--config", tmp_path / "site.sgc", "--state", gw.state, ok=False)
    assert p.returncode != 0
    assert "not provisioned" in p.stderr, p.stderr
