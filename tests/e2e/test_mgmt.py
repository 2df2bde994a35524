"""The management API (F-MGMT) on the dev board, driven by its real client `sealctl device` and
by Python's urllib/ssl: HTTPS with the box's own certificate (pinned by SHA-256, or as CA),
authentication (none → 401, the dev token, a configured token, a pinned admin client
certificate and the refusal of an unpinned one), the status JSON, config pushes that go through
the signed-config checks and hot apply (the sequence rises; a replayed, forged or foreign blob
is refused with the check that failed and changes nothing), peer reset, queue list / release /
delete on held mail, and 501 for updates and reboot off the appliance.

Addresses: gateway 127.0.0.40 (API on its own port), next hop 127.0.0.41, dead hop 127.0.0.42.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import urllib.error
import urllib.request

import pytest

from clients import marker
from harness import BIN, SEALCTL, free_port, make_config, submit_one, wait_until
from pki import cert_sha256, make_ca, make_leaf

IP = "127.0.0.40"
HOP_IP = "127.0.0.41"
DEAD_IP = "127.0.0.42"


# --- helpers ---------------------------------------------------------------------------------------


def mgmt_toml(listen: str, **keys) -> str:
    lines = [f'listen = ["{listen}"]']
    for k, v in keys.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n[mgmt]\n" + "\n".join(lines) + "\n"


def gateway_config(api: str, hostname: str = "gw.test", routes=None, queue=None,
                   smtp: str | None = None, **mgmt) -> str:
    return make_config(
        hostname=hostname,
        listen=[smtp or f"{IP}:{free_port(IP)}"],
        local_domains=["a.test"],
        routes=routes if routes is not None else [{"domain": "a.test", "maildir": "maildir"}],
        queue=queue,
    ) + mgmt_toml(api, **mgmt)


def start(gateways, name="gw", **kw):
    api = f"{IP}:{free_port(IP)}"
    gw = gateways(name, gateway_config(api, **kw))
    assert f"sealgate mgmt: https://{api}" in gw.stdout_lines, gw.stdout_lines
    gw.api = api
    gw.url = f"https://{api}"
    gw.pin = cert_sha256(gw.cert_file)
    return gw


def device(gw, *args, token=None, cert=None, ok=True, pin=None) -> subprocess.CompletedProcess:
    """`sealctl device ARGS --url … --pin …` with the given credentials."""
    cmd = [str(SEALCTL), "device", *map(str, args), "--url", gw.url, "--pin", pin or gw.pin]
    if token:
        cmd += ["--token-file", str(token)]
    if cert:
        cmd += ["--cert", str(cert[0]), "--key", str(cert[1])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if ok and p.returncode != 0:
        pytest.fail(f"{cmd} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def status(gw, **kw) -> dict:
    return json.loads(device(gw, "status", **kw).stdout)


def ctx(gw, cert=None) -> ssl.SSLContext:
    """A Python TLS context trusting exactly the box's self-signed certificate."""
    c = ssl.create_default_context(cafile=str(gw.cert_file))
    c.check_hostname = False  # the certificate names gw.test; we connect to an IP
    if cert:
        c.load_cert_chain(str(cert[0]), str(cert[1]))
    return c


def raw_head(gw, head: str, token: str) -> tuple[int, dict | None]:
    """Sends a request head (and no body) over TLS; returns the answer's status and JSON (if
    it has a body)."""
    host, port = gw.api.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as tcp:
        with ctx(gw).wrap_socket(tcp) as t:
            t.sendall((head + f"Authorization: Bearer {token}\r\n\r\n").encode())
            data = b""
            while chunk := t.recv(65536):
                data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body) if body else None


def http(gw, method: str, path: str, *, token: str | None = None, cert=None,
         data: bytes | None = None) -> tuple[int, dict]:
    """One request with urllib; returns (status, JSON body) for success and errors alike."""
    req = urllib.request.Request(gw.url + path, method=method, data=data)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx(gw, cert), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --- authentication and status ---------------------------------------------------------------


def test_dev_board_401_dev_token_status_and_501(gateways):
    gw = start(gateways)
    token_file = gw.state / "mgmt-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64

    # no credentials: 401 with the reason, for every endpoint
    for method, path in [("GET", "/api/v1/status"), ("GET", "/api/v1/queue"),
                         ("POST", "/api/v1/reboot"), ("PUT", "/api/v1/config")]:
        code, body = http(gw, method, path, data=b"" if method != "GET" else None)
        assert code == 401, (path, body)
        assert body["check"] == "auth" and "authentication required" in body["error"], body
    p = device(gw, "status", ok=False)
    assert p.returncode == 1 and "HTTP 401" in p.stderr and "check: auth" in p.stderr, p.stderr
    code, body = http(gw, "GET", "/api/v1/status", token="not-the-token")
    assert (code, body["error"]) == (401, "the bearer token is not accepted")

    # the dev token (dev board, nothing configured)
    s = status(gw, token=token_file)
    assert s["version"] and s["board"] == "dev" and s["slot"] is None
    assert s["serial"].startswith("DEV-") and s["hostname"] == "gw.test"
    assert s["config"] == {"sealed_store": True, "sequence": None, "key_id": None,
                           "trusted_keys": [], "encryption_key": s["config"]["encryption_key"]}
    # the box's encryption key (F-SECRETS), so HQ can seal secrets to it without a console
    remote_key = device(gw, "encryption-key", token=token_file).stdout
    assert re.fullmatch(r"[0-9a-f]{64}\n", remote_key) and remote_key.strip() == s["config"][
        "encryption_key"], remote_key
    (cert,) = [c for c in s["certificates"] if c["name"] == "default"]
    assert cert["sha256"] == gw.pin and cert["sans"] == ["gw.test"] and cert["mgmt"] is True
    assert cert["not_after"] > s["now"] and cert["expires"].endswith("Z") and not cert["expired"]
    assert set(cert) >= {"subject", "issuer", "not_before", "chain_len", "source"}
    assert s["queue"] == {"messages": 0, "recipients_pending": 0, "deferred": 0, "in_flight": 0}
    assert s["peers"]["format"] == 1 and s["peers"]["peers"] == []
    assert s["mgmt"]["dev_token"] is True and s["mgmt"]["first_contact"] is False
    code, body = http(gw, "GET", "/api/v1/status", token=token)
    assert code == 200 and body["serial"] == s["serial"]

    # the box's certificate is checked by the client: a wrong pin, or a CA without the name
    p = device(gw, "status", token=token_file, pin="00" * 32, ok=False)
    assert p.returncode == 1 and "is not the pinned one" in p.stderr, p.stderr
    p = subprocess.run([str(SEALCTL), "device", "status", "--url", gw.url, "--ca", str(gw.cert_file),
                        "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "not valid for name" in p.stderr, p.stderr
    p = subprocess.run([str(SEALCTL), "device", "status", "--url", gw.url, "--ca", str(gw.cert_file),
                        "--server-name", "gw.test", "--token-file", str(token_file)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([str(SEALCTL), "device", "status", "--url", gw.url], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--pin" in p.stderr, p.stderr

    # updates and reboots need the appliance
    bundle = gw.dir / "bundle.bin"
    bundle.write_bytes(os.urandom(4096))
    p = device(gw, "push-update", bundle, token=token_file, ok=False)
    assert p.returncode == 1, p.stderr
    assert "HTTP 501" in p.stderr and "updates need the appliance" in p.stderr, p.stderr
    code, body = http(gw, "PUT", "/api/v1/update", token=token, data=b"x" * 100)
    assert (code, body) == (501, {"error": "updates need the appliance", "check": "appliance"})
    p = device(gw, "reboot", token=token_file, ok=False)
    assert "HTTP 501" in p.stderr and "reboot needs the appliance" in p.stderr, p.stderr

    # errors are specific JSON
    code, body = http(gw, "GET", "/api/v1/nothing", token=token)
    assert code == 404 and body["check"] == "route"
    code, body = http(gw, "DELETE", "/api/v1/status", token=token)
    assert code == 405 and body["check"] == "method"
    code, body = raw_head(gw, f"PUT /api/v1/config HTTP/1.1\r\nHost: {gw.api}\r\n"
                                  "Content-Length: 5000000\r\n", token)
    assert code == 413 and body["check"] == "size", body
    code, body = raw_head(gw, f"GET /api/v1/status HTTP/1.1\r\nHost: {gw.api}\r\n"
                                  + "X-Filler: " + "y" * 20000 + "\r\n", token)
    assert code == 431, body
    assert gw.running()

    # the encryption key the API gave is the one the box's own console shows (the sealed
    # store is the daemon's while it runs)
    gw.stop()
    local_key = subprocess.run([str(BIN), "--state", str(gw.state), "device", "--encryption-key"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
    assert local_key == remote_key
    assert token not in gw.log(), "the token must never be logged"


@pytest.fixture
def admins(tmp_path):
    d = tmp_path / "admins"
    d.mkdir()
    make_ca(d, "adminca")
    return {
        "pinned": make_leaf(d, "adminca", "admin", "admin.test"),
        "other": make_leaf(d, "adminca", "intruder", "intruder.test"),
    }


def test_pinned_client_certificate_and_configured_token(gateways, admins):
    token = "s3cret-admin-token"
    gw = start(gateways, admin_certificates=[cert_sha256(admins["pinned"][0])],
               admin_token_sha256=[hashlib.sha256(token.encode()).hexdigest()])
    # the pinned certificate, with sealctl and with Python
    s = status(gw, cert=admins["pinned"])
    assert s["mgmt"] == {"certificate": "default", "pinned_certificates": 1, "tokens": 1,
                         "dev_token": False, "first_contact": False}
    code, body = http(gw, "GET", "/api/v1/queue", cert=admins["pinned"])
    assert code == 200 and body["count"] == 0
    # another certificate, from the same CA, is refused by its fingerprint
    code, body = http(gw, "GET", "/api/v1/status", cert=admins["other"])
    assert code == 401, body
    assert f"client certificate {cert_sha256(admins['other'][0])} is not a pinned" in body["error"]
    p = device(gw, "status", cert=admins["other"], ok=False)
    assert p.returncode == 1 and "not a pinned admin certificate" in p.stderr, p.stderr
    # the configured token works; the dev token does not once credentials are configured
    code, body = http(gw, "GET", "/api/v1/status", token=token)
    assert code == 200 and body["hostname"] == "gw.test"
    token_file = gw.dir / "admin-token"
    token_file.write_text(token + "\n")
    assert status(gw, token=token_file)["serial"] == body["serial"]
    p = device(gw, "status", token=gw.state / "mgmt-token", ok=False)
    assert "the bearer token is not accepted" in p.stderr, p.stderr
    code, _ = http(gw, "GET", "/api/v1/status")
    assert code == 401
    assert token not in gw.log()


# --- config push -------------------------------------------------------------------------------


def run(*args) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        pytest.fail(f"{args} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def test_push_config_applies_and_refusals_change_nothing(gateways, admins, tmp_path):
    hq = tmp_path / "hq"
    hq.mkdir()
    run(SEALCTL, "keygen", "--out", hq / "hq")
    run(SEALCTL, "keygen", "--out", hq / "rogue")
    api, smtp = f"{IP}:{free_port(IP)}", f"{IP}:{free_port(IP)}"
    gw = gateways("gw", gateway_config(api, smtp=smtp), start=False)
    run(BIN, "--state", gw.state, "provision", "--trust", hq / "hq.pub")
    gw.start()
    gw.url, gw.pin = f"https://{api}", cert_sha256(gw.cert_file)
    dev_token = gw.state / "mgmt-token"
    serial = status(gw, token=dev_token)["serial"]
    pin = cert_sha256(admins["pinned"][0])

    def blob(seq, hostname, key="hq", device_serial=None):
        src = tmp_path / f"site-{seq}-{hostname}.toml"
        src.write_text(gateway_config(api, hostname=hostname, smtp=smtp, admin_certificates=[pin]))
        out = tmp_path / f"site-{seq}-{hostname}-{key}.sgc"
        run(SEALCTL, "config", "sign", src, "--key", hq / f"{key}.key", "--seq", seq,
            "--device", device_serial or serial, "-o", out)
        return out

    # first push with the dev token: applied at once (hot), sequence 1, HQ's key id
    b1 = blob(1, "one.test")
    p = device(gw, "push-config", b1, token=dev_token)
    assert "config applied: sequence 1" in p.stdout, p.stdout
    # the blob pinned an admin certificate: the dev token is no longer accepted
    p = device(gw, "status", token=dev_token, ok=False)
    assert "not accepted" in p.stderr
    admin = admins["pinned"]
    s = status(gw, cert=admin)
    assert s["hostname"] == "one.test"
    assert s["config"]["sequence"] == 1 and s["config"]["key_id"] in s["config"]["trusted_keys"]
    key_id = s["config"]["key_id"]

    # the same blob again: a no-op
    p = device(gw, "push-config", b1, cert=admin)
    assert "already applied" in p.stdout, p.stdout
    # a newer one, with Python: applied
    code, body = http(gw, "PUT", "/api/v1/config", cert=admin, data=blob(2, "two.test").read_bytes())
    assert code == 200 and body == {"applied": True, "sequence": 2, "key_id": key_id,
                                    "result": "signed config applied; stored sequence raised"}
    assert status(gw, cert=admin)["hostname"] == "two.test"

    # refusals: the reason and the check, and nothing changes
    forged = bytearray(blob(3, "forged.test").read_bytes())
    forged[-1] ^= 1
    cases = [
        (b1.read_bytes(), "sequence", "sequence: the blob's sequence 1 is lower than the stored 2"),
        (bytes(forged), "signature", "signature: does not verify"),
        (blob(3, "rogue.test", key="rogue").read_bytes(), "signature", "which is not trusted"),
        (blob(3, "other.test", device_serial="DEV-00000000").read_bytes(), "device",
         "device: the blob is for device DEV-00000000"),
        (b"random bytes", "format", "format: not a Sealgate config blob"),
    ]
    for data, check, reason in cases:
        code, body = http(gw, "PUT", "/api/v1/config", cert=admin, data=data)
        assert code == 422 and body["check"] == check and reason in body["error"], body
        s = status(gw, cert=admin)
        assert (s["hostname"], s["config"]["sequence"]) == ("two.test", 2), (check, s["config"])
    f = tmp_path / "replayed.sgc"
    f.write_bytes(b1.read_bytes())
    p = device(gw, "push-config", f, cert=admin, ok=False)
    assert p.returncode == 1 and "HTTP 422" in p.stderr and "check: sequence" in p.stderr, p.stderr
    assert "lower than the stored 2" in p.stderr
    # each refusal is logged like a SIGHUP refusal
    assert gw.log().count("pushed configuration NOT applied") == len(cases) + 1
    gw.stop()
    out = run(BIN, "--state", gw.state, "device").stdout
    assert "config sequence: 2" in out, out


# --- queue and peers -----------------------------------------------------------------------------


def test_queue_release_delete_and_peer_reset(gateways):
    hop_port, dead_port = free_port(HOP_IP), free_port(DEAD_IP)
    gw = start(
        gateways,
        routes=[
            {"domain": "a.test", "maildir": "maildir"},
            {"domain": "b.test", "next_hop": [f"{HOP_IP}:{hop_port}"]},
            {"domain": "c.test", "next_hop": [f"{DEAD_IP}:{dead_port}"]},
        ],
        queue={"retry_schedule": ["1h"]},
    )
    token_file = gw.state / "mgmt-token"
    token = token_file.read_text().strip()
    held_b, held_c = marker("held-b"), marker("held-c")
    id_b = submit_one(gw.addr, "alice@a.test", "bob@b.test", held_b)
    id_c = submit_one(gw.addr, "alice@a.test", "carol@c.test", held_c)

    # both are held: the next hops are down and the next retry is an hour away
    def held():
        code, body = http(gw, "GET", "/api/v1/queue", token=token)
        assert code == 200
        ms = {m["id"]: m for m in body["messages"]}
        return ms if all(ms.get(i, {}).get("attempts", 0) >= 1 for i in (id_b, id_c)) else None
    ms = wait_until(held, 20, "two deferred messages")
    for i, rcpt in ((id_b, "bob@b.test"), (id_c, "carol@c.test")):
        (r,) = ms[i]["recipients"]
        assert r["address"] == rcpt and r["status"] == "pending" and r["detail"], ms[i]
        assert ms[i]["next_attempt"] > ms[i]["arrival"] + 3000
    s = status(gw, token=token_file)
    assert s["queue"]["messages"] == 2 and s["queue"]["deferred"] == 2
    assert s["queue"]["recipients_pending"] == 2
    table = device(gw, "queue", token=token_file).stdout
    assert id_b in table and id_c in table and "2 message(s) queued" in table, table

    # the next hop comes up; release = deliver now, not in an hour
    hop = gateways.simple("hop", ip=HOP_IP, hostname="hop.test", local_domains=["b.test"],
                          listen=[f"{HOP_IP}:{hop_port}"])
    p = device(gw, "queue", "release", id_b, token=token_file)
    assert f"released {id_b}" in p.stdout
    hop.wait_message_with(held_b.encode(), timeout=20)
    wait_until(lambda: id_b not in gw.queue_files(), 20, "the released message to leave the queue")

    # delete: gone from the API's list and from the spool itself, without a DSN
    code, body = http(gw, "DELETE", f"/api/v1/queue/{id_c}", token=token)
    assert code == 200 and body["deleted"] is True and body["message"]["id"] == id_c, body
    assert id_c not in gw.queue_files()
    code, body = http(gw, "GET", "/api/v1/queue", token=token)
    assert body["count"] == 0, body
    for method, path in [("DELETE", f"/api/v1/queue/{id_c}"),
                         ("POST", f"/api/v1/queue/{id_c}/release")]:
        code, body = http(gw, method, path, token=token, data=b"" if method == "POST" else None)
        assert code == 404 and body["check"] == "queue-id", body
    p = device(gw, "queue", "delete", id_c, token=token_file, ok=False)
    assert p.returncode == 1 and "no such message" in p.stderr, p.stderr
    assert "DSN queued" not in gw.log()

    # the delivery to the hop did TLS: its peer record, then a reset through the API
    peers = {p["ip"]: p for p in status(gw, token=token_file)["peers"]["peers"]}
    assert peers[HOP_IP]["last_tls"] is not None, peers
    p = device(gw, "peer-reset", HOP_IP, token=token_file)
    assert f"reset 1 peer record(s) matching {HOP_IP}" in p.stdout, p.stdout
    peers = {p["ip"]: p for p in status(gw, token=token_file)["peers"]["peers"]}
    assert peers[HOP_IP]["last_tls"] is None, peers
    on_disk = {p["ip"]: p for p in gw.peer_table()["peers"]}
    assert on_disk[HOP_IP]["last_tls"] is None, "the reset is written out before the reply"
    p = device(gw, "peer-reset", "nobody.test", token=token_file, ok=False)
    assert p.returncode == 1 and "no peer matches nobody.test" in p.stderr, p.stderr


def test_strangers_holding_hundreds_of_connections_cannot_starve_the_admin(gateways, admins):
    """400 idle strangers from 40 other addresses (half of them after a TLS handshake, half
    without one) hold every connection they get: at most 8 per address, 320 in all, more than
    the box's 256, so the oldest strangers' are closed to make room; the admins — with a pinned
    certificate and with a token — are served on their first try."""
    token = "flood-admin-token"
    gw = start(gateways, admin_certificates=[cert_sha256(admins["pinned"][0])],
               admin_token_sha256=[hashlib.sha256(token.encode()).hexdigest()])
    host, port = gw.api.rsplit(":", 1)
    held = []
    # 10 from one address first (2 over its bound), then 400 from 40 addresses.
    sources = ["127.2.1.1"] * 10 + [f"127.2.0.{1 + k % 40}" for k in range(400)]
    for k, src in enumerate(sources):
        tcp = socket.socket()
        tcp.settimeout(5)
        tcp.bind((src, 0))
        try:
            tcp.connect((host, int(port)))
            if k % 2:
                tcp = ctx(gw).wrap_socket(tcp)
        except OSError:  # closed at once: no slot for it
            tcp.close()
            continue
        held.append(tcp)
    try:
        gw.wait_log(r"management API: too many connections from this address", timeout=10)
        gw.wait_log(r"management API: all connections taken; the oldest stranger's closed", timeout=10)
        s = status(gw, cert=admins["pinned"])
        assert s["mgmt"]["pinned_certificates"] == 1
        tokfile = gw.state / "admin-token"
        tokfile.write_text(token)
        assert status(gw, token=tokfile)["mgmt"]["tokens"] == 1
    finally:
        for c in held:
            c.close()
