"""Memory stays bounded whatever the mail: 16 clients send 30 MiB each at once over STARTTLS
through a relay route to a next hop (STARTTLS too), and the daemon's peak RSS stays within the
budget (PRODUCT.md §5: 64 MiB). Messages stream from the spool; none is ever held whole.

A memory bound is a functional property, so this test asserts it; it measures no time."""

import hashlib
import smtplib
import subprocess
import threading
from pathlib import Path

from clients import verifying_ctx
from harness import SEALCTL, free_port, wait_until

CLIENTS = 16
SIZE = 30 * 1024 * 1024
BUDGET = 64 * 1024 * 1024


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def big_message(n: int) -> bytes:
    """A distinct 30 MiB message: headers, then lines of printable text (a leading dot now and
    then, so dot-stuffing is exercised on the way out)."""
    head = (
        f"From: sender{n}@a.test\r\nTo: rcpt{n}@far.test\r\nSubject: big {n}\r\n"
        f"Message-ID: <big{n}@a.test>\r\n\r\n"
    ).encode()
    line = (f".{n:02d}" + "x" * 73 + "\r\n").encode()
    body = line * ((SIZE - len(head)) // len(line))
    return head + body


def send(addr, cafile, n: int, errors: list):
    try:
        with smtplib.SMTP(*addr, local_hostname="client.test", timeout=120) as s:
            s.starttls(context=verifying_ctx(cafile, hostname_check=False))
            s.ehlo()
            s.sendmail(f"sender{n}@a.test", [f"rcpt{n}@far.test"], big_message(n))
    except Exception as e:  # noqa: BLE001 - reported by the test thread
        errors.append(f"client {n}: {e!r}")


def test_sixteen_30_mib_messages_through_the_relay_stay_within_the_memory_budget(gateways, tmp_path):
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    sink_addr = ("127.0.0.2", free_port("127.0.0.2"))
    sink = subprocess.Popen(
        [str(SEALCTL), "bench", "sink", "--listen", "%s:%d" % sink_addr, "--dir", str(sink_dir),
         "--tls-self-signed"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        a = gateways.simple(
            "a", hostname="gw-a.test", local_domains=["a.test"],
            routes=[{"domain": "*", "next_hop": ["%s:%d" % sink_addr], "tls": "encrypt"}],
            smtp={"max_message_bytes": 40 * 1024 * 1024, "max_connections_per_ip": 64},
        )
        errors: list[str] = []
        threads = [threading.Thread(target=send, args=(a.addr, a.cert_file, n, errors))
                   for n in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        wait_until(lambda: len(list(sink_dir.iterdir())) >= CLIENTS, timeout=300,
                   what=f"{CLIENTS} messages at the next hop")
        a.wait_queue_empty(timeout=60)
        peak = peak_rss(a.proc.pid)
        # Every message arrived whole (the sink stores the DATA as received, unstuffed).
        want = {hashlib.sha256(big_message(n)).hexdigest() for n in range(CLIENTS)}
        got = set()
        for f in sink_dir.iterdir():
            data = f.read_bytes()
            at = data.find(b"From: sender")
            got.add(hashlib.sha256(data[at:]).hexdigest())
        assert got == want, "messages altered or missing at the next hop"
        assert peak <= BUDGET, f"peak RSS {peak / 2**20:.1f} MiB over the {BUDGET / 2**20:.0f} MiB budget"
        print(f"peak RSS {peak / 2**20:.1f} MiB for {CLIENTS} x {SIZE // 2**20} MiB")
    finally:
        sink.terminate()
        sink.wait(timeout=10)
