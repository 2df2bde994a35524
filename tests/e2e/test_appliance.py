"""The appliance image under QEMU (issue 5): boot, first-contact config, STARTTLS mail through the
forwarded ports, signed updates into slot B, refused updates, rollback after a failed health
check and after a hung boot (watchdog), power cuts during an update and during mail acceptance,
and a disk booted with another board secret.

Everything crosses QEMU's user network with `restrict=on`: SMTP, SMTPS and the management port
are forwarded from 127.0.0.1, and the box's next hop 10.0.2.100:25 is forwarded to a sink
gateway on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import json
import smtplib
import ssl
import threading
import time
from pathlib import Path

import pytest

from appliance import FAULTS_BIN, GUEST_SINK, Image, Vm, kill_all, sealctl, write_secret
from harness import message, wait_until

pytestmark = pytest.mark.skipif(not FAULTS_BIN.exists(),
                                reason="needs the static build of tests/run (sealgate-test-faults)")

TOKEN = "appliance-test-admin-token-0123456789"


@pytest.fixture(autouse=True)
def _power_off_vms():
    """Every VM a test started is killed when it ends, pass or fail."""
    yield
    kill_all()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    return Image(tmp_path_factory.mktemp("appliance"))


def site_toml(seq_note: str = "") -> str:
    token_hash = hashlib.sha256(TOKEN.encode()).hexdigest()
    return f"""
# {seq_note}
[device]
hostname = "box.b.test"

[smtp]
listen = ["0.0.0.0:25"]
implicit_tls = ["0.0.0.0:465"]
local_domains = ["b.test"]
trusted_networks = []

[queue]
retry_schedule = ["1s", "2s", "5s"]

[tls]
dev_self_signed = true

[[tls.certificates]]
name = "default"

[mgmt]
listen = ["0.0.0.0:8443"]
admin_token_sha256 = ["{token_hash}"]

[[route]]
domain = "b.test"
next_hop = ["{GUEST_SINK}:25"]
tls = "may"
"""


class Box:
    """A booted appliance with its sink, configured by a signed blob pushed at first contact."""

    def __init__(self, image: Image, tmp: Path, gateways, *, secret_seed: bytes = b"board-1",
                 append: str = "", disk: Path | None = None, sink=None):
        self.image = image
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.sink = sink or gateways.simple("sink", local_domains=("b.test",))
        self.dir = disk or image.fresh_disk(tmp / "box")
        self.secret = write_secret(tmp / f"secret-{secret_seed.decode()}", secret_seed)
        self.token = tmp / "token"
        self.token.write_text(TOKEN)
        self.append = append
        self.vm: Vm | None = None

    @property
    def auth(self) -> list:
        return ["--token-file", self.token]

    def boot(self, healthy: bool = True) -> Vm:
        self.vm = Vm(self.dir, self.secret, self.sink.addr[1], self.append).start()
        if healthy:
            self.vm.wait_healthy()
        return self.vm

    def configure(self, seq: int = 1):
        toml = self.tmp / f"site{seq}.toml"
        toml.write_text(site_toml(f"sequence {seq}"))
        blob = self.tmp / f"site{seq}.sgc"
        sealctl("config", "sign", toml, "--key", self.image.keys / "hq.key", "--seq", seq, "-o", blob)
        out = self.vm.device("push-config", blob, auth=[] if seq == 1 else self.auth)
        return out

    def status(self) -> dict:
        return self.vm.status(self.auth)

    def send(self, mark: str, *, tls: bool = True) -> None:
        with smtplib.SMTP("127.0.0.1", self.vm.smtp, timeout=60) as s:
            s.ehlo("client.a.test")
            if tls:
                s.starttls(context=ssl._create_unverified_context())
                s.ehlo("client.a.test")
            s.sendmail("alice@a.test", ["bob@b.test"], message(mark, "alice@a.test", "bob@b.test"))

    def served_certificate(self) -> bytes:
        with smtplib.SMTP("127.0.0.1", self.vm.smtp, timeout=60) as s:
            s.ehlo("client.a.test")
            s.starttls(context=ssl._create_unverified_context())
            return s.sock.getpeercert(binary_form=True)


def test_boot_first_contact_config_and_starttls_mail_through_the_sealed_keys(image, tmp_path, gateways):
    box = Box(image, tmp_path, gateways)
    vm = box.boot()
    text = vm.text()
    for step in ("sealgate-loader: ", "slot a", "provisioned 1 trusted config-signing key"):
        assert step in text, step
    # Before a config, nothing but PUT /config is open to an unauthenticated client.
    denied = vm.device("status", "--json", check=False)
    assert denied.returncode != 0 and "401" in (denied.stdout + denied.stderr)
    box.configure(1)
    st = box.status()
    assert st["config"]["sequence"] == 1
    assert st["slot"]["running_slot"] == "A"
    assert st["slot"]["running_version"] == "1.0.0"
    box.send("first-mail-over-starttls")
    box.sink.wait_message_with(b"first-mail-over-starttls", timeout=60)
    # The certificate served on STARTTLS is the one held in the sealed store, as the API lists it.
    fp = hashlib.sha256(box.served_certificate()).hexdigest()
    listed = json.dumps(st["certificates"]).replace(":", "").lower()
    assert fp in listed, (fp, st["certificates"])
    assert all(c.get("source") == "sealed" for c in st["certificates"]), st["certificates"]
    # Power off through the API: the box syncs and QEMU exits on its own.
    vm.device("poweroff", auth=box.auth)
    vm.proc.wait(timeout=120)
    assert "poweroff requested" in vm.text()


def test_signed_update_boots_slot_b_and_mail_still_flows(image, tmp_path, gateways):
    box = Box(image, tmp_path, gateways)
    vm = box.boot()
    box.configure(1)
    sgu = image.bundle("v110", "1.1.0")
    out = vm.device("push-update", sgu, "--reboot", auth=box.auth)
    assert "B" in out.stdout or "b" in out.stdout
    vm.wait_console(r"slot b", count=1)
    vm.wait_healthy(count=2)
    st = box.status()
    assert st["slot"]["running_slot"] == "B"
    assert st["slot"]["running_version"] == "1.1.0"
    bc = st["slot"]["boot_control"]
    assert bc["floor"] == "1.1.0" or bc["floor"] == {"major": 1, "minor": 1, "patch": 0}
    box.send("mail-after-update")
    box.sink.wait_message_with(b"mail-after-update", timeout=60)


@pytest.mark.parametrize("case", ["signature", "unknown-key", "board", "older", "truncated"])
def test_refused_updates_leave_the_running_slot(image, tmp_path, gateways, case):
    box = Box(image, tmp_path, gateways)
    vm = box.boot()
    box.configure(1)
    if case == "signature":
        sgu = image.bundle("good", "1.2.0")
        b = bytearray(sgu.read_bytes())
        b[128 + 10] ^= 0x55  # inside the Ed25519 signature
        sgu.write_bytes(bytes(b))
    elif case == "unknown-key":
        sgu = image.bundle("rogue", "1.2.0", key="rogue")
    elif case == "board":
        sgu = image.bundle("otherboard", "1.2.0", board="rpi4-arm64")
    elif case == "older":
        sgu = image.bundle("old", "0.9.0")
    else:
        sgu = image.bundle("cut", "1.2.0")
        b = sgu.read_bytes()
        sgu.write_bytes(b[: len(b) // 2])
    out = vm.device("push-update", sgu, auth=box.auth, check=False)
    assert out.returncode != 0, out.stdout
    st = box.status()
    last = st["slot"]["last_update"]
    assert last["ok"] is False
    expected = {"signature": "signature", "unknown-key": "unknown-key", "board": "board",
                "older": "rollback-floor", "truncated": "truncated"}[case]
    assert last["check"] == expected, last
    assert last["reason"] in out.stdout + out.stderr or expected in out.stdout + out.stderr
    assert st["slot"]["running_slot"] == "A"
    # Slot B is not bootable: a reboot comes back on A.
    vm.device("reboot", auth=box.auth)
    vm.wait_healthy(count=2)
    assert box.status()["slot"]["running_slot"] == "A"


def _rollback(image, tmp_path, gateways, fault: str):
    box = Box(image, tmp_path, gateways, append=f"sealgate.test_fault={fault} sealgate.watchdog=6")
    vm = box.boot()
    box.configure(1)
    sgu = image.bundle("faulty", "1.3.0", binary=FAULTS_BIN)
    vm.device("push-update", sgu, "--reboot", auth=box.auth)
    # Three tries of slot B, each ending in a reboot (health check) or a watchdog reset (hang),
    # then the loader falls back to A by itself.
    vm.wait_console(r"TEST FAULT", count=3)
    vm.wait_healthy(count=2)
    st = box.status()
    assert st["slot"]["running_slot"] == "A"
    b = st["slot"]["boot_control"]["slots"][1]
    assert b["priority"] == 0 and not b["successful"], b
    box.send(f"mail-after-{fault}-rollback")
    box.sink.wait_message_with(f"mail-after-{fault}-rollback".encode(), timeout=60)
    return vm


def test_failed_health_check_rolls_back_after_three_tries(image, tmp_path, gateways):
    vm = _rollback(image, tmp_path, gateways, "health")
    assert "HEALTH CHECK FAILED" in vm.text()


def test_hung_boot_is_reset_by_the_watchdog_and_rolls_back(image, tmp_path, gateways):
    vm = _rollback(image, tmp_path, gateways, "hang")
    assert "not petting the watchdog" in vm.text()


def get_health(vm: Vm) -> dict:
    c = http.client.HTTPSConnection("127.0.0.1", vm.mgmt, context=ssl._create_unverified_context(),
                                    timeout=60)
    try:
        c.request("GET", "/api/v1/health")
        r = c.getresponse()
        assert r.status == 200, r.status
        return json.loads(r.read())
    finally:
        c.close()


def _slow_put(port: int, body: bytes, cut_after: int, started: threading.Event):
    """PUT /api/v1/update that sends `cut_after` bytes and then stalls (the VM is killed)."""
    ctx = ssl._create_unverified_context()
    c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=120)
    try:
        c.putrequest("PUT", "/api/v1/update")
        c.putheader("Authorization", f"Bearer {TOKEN}")
        c.putheader("Content-Length", str(len(body)))
        c.endheaders()
        sent = 0
        while sent < cut_after:
            c.send(body[sent:sent + 65536])
            sent += 65536
        started.set()
        time.sleep(120)
    except OSError:
        started.set()
    finally:
        c.close()


def test_power_cut_during_update_write_boots_a_valid_slot(image, tmp_path, gateways):
    box = Box(image, tmp_path, gateways)
    vm = box.boot()
    box.configure(1)
    body = image.bundle("v140", "1.4.0").read_bytes()
    started = threading.Event()
    t = threading.Thread(target=_slow_put, args=(vm.mgmt, body, len(body) // 2, started), daemon=True)
    t.start()
    assert started.wait(120)
    vm.wait_console(r"writing the inactive slot|update bundle accepted", timeout=60)
    vm.power_cut()
    vm = box.boot()
    st = box.status()
    assert st["slot"]["running_slot"] == "A"
    box.send("mail-after-cut-update")
    box.sink.wait_message_with(b"mail-after-cut-update", timeout=60)


def test_power_cut_during_mail_acceptance_loses_no_acknowledged_message(image, tmp_path, gateways):
    box = Box(image, tmp_path, gateways)
    vm = box.boot()
    box.configure(1)
    # Hold delivery: the sink is down while messages are accepted, so they sit in the queue.
    box.sink.stop()
    acked: list[str] = []
    stop = threading.Event()

    def pump():
        i = 0
        while not stop.is_set():
            mark = f"cut-mail-{i:04d}"
            try:
                box.send(mark, tls=False)
                acked.append(mark)
            except (OSError, smtplib.SMTPException):
                return
            i += 1

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    wait_until(lambda: len(acked) >= 15, timeout=120, what="15 acknowledged messages")
    vm.power_cut()
    stop.set()
    t.join(30)
    n = len(acked)
    box.sink.start()
    box.boot()
    got = wait_until(lambda: (lambda m: m if all(any(a.encode() in v for v in m.values()) for a in acked) else None)(
        box.sink.messages()), timeout=180, what=f"all {n} acknowledged messages at the sink")
    assert len(got) >= n


def test_disk_booted_with_another_board_secret_refuses_the_sealed_store(image, tmp_path, gateways):
    box = Box(image, tmp_path, gateways)
    vm = box.boot()
    box.configure(1)
    original = hashlib.sha256(box.served_certificate()).hexdigest()
    vm.power_cut()
    other = Box(image, tmp_path / "other", gateways, secret_seed=b"board-2", disk=box.dir,
                sink=box.sink)
    vm2 = other.boot(healthy=False)
    vm2.wait_console(r"THE SEALED STORE CANNOT BE OPENED")
    # The API still answers, on a throwaway certificate, and says why.
    vm2.wait_console(r"mgmt: certificate sha256 [0-9a-f]{64} \(throwaway\)")
    health = get_health(vm2)
    assert health["sealed_store"]["ok"] is False and health["sealed_store"]["error"], health
    assert health["mgmt_certificate"].startswith("throwaway"), health
    # No TLS with the sealed keys: STARTTLS is not offered, and the implicit TLS port is closed.
    with smtplib.SMTP("127.0.0.1", vm2.smtp, timeout=60) as s:
        s.ehlo("client.a.test")
        assert not s.has_extn("starttls")
    assert vm2.mgmt_pin() != original
