"""Strangers holding connections cannot keep a legitimate client out for long, and cannot grow
the daemon's memory: past three quarters of `max_connections` the gateway is under stress and
sessions idling outside a transaction get 10 s instead of `command_timeout` (5 min).

Every client here is on 127.0.0.0/8; the flood comes from many 127.0.x.y source addresses."""

import resource
import socket
import time
from pathlib import Path

from harness import submit_one, wait_until


def raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def hold(addr, n: int, first_net: int = 10) -> tuple[list[socket.socket], int, int]:
    """Opens `n` connections from 127.<first_net + k/200>.<k%200+1>; returns them with how many
    were greeted with 220 and how many refused (421)."""
    held, greeted, refused = [], 0, 0
    for k in range(n):
        src = f"127.{first_net + k // 200}.{k % 200 + 1}.1"
        s = socket.socket()
        s.settimeout(10)
        s.bind((src, 0))
        s.connect(addr)
        reply = s.recv(256)
        if reply.startswith(b"220"):
            greeted += 1
        elif reply.startswith(b"421"):
            refused += 1
        held.append(s)
    return held, greeted, refused


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.5)
    try:
        data = s.recv(256)
    except (socket.timeout, TimeoutError):
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"421")


def sent_one(mark: str, addr=None) -> bool:
    """One message from 127.0.0.1 (trusted, not one of the flood's addresses); False when the
    gateway is still full."""
    try:
        return bool(submit_one(addr, "x@remote.test", "user@a.test", mark))
    except (OSError, AssertionError):  # refused while full: try again
        return False


def test_idle_sessions_make_room_under_stress(gateways):
    gw = gateways.simple("gw", local_domains=["a.test"], trusted_networks=["127.0.0.1/32"],
                         smtp={"max_connections": 40, "command_timeout": "5m"})
    held, greeted, refused = hold(gw.addr, 40)
    try:
        assert (greeted, refused) == (40, 0)
        # Full: a newcomer is refused at once, with the reason.
        with socket.create_connection(gw.addr, timeout=10, source_address=("127.0.0.99", 0)) as s:
            assert s.recv(256).startswith(b"421 4.7.0"), "a full gateway must say so"
        gw.wait_log(r"connection stress: .*stress=true", timeout=10)
        # Within the stress timeout (10 s, not 5 min) idle strangers are let go, until the
        # gateway is out of stress; a client that sends mail is then served.
        wait_until(lambda: sent_one("flood-1", gw.addr), timeout=30, interval=0.5,
                   what="a sender served after the stress timeout")
        let_go = sum(closed_by_server(s) for s in held)
        assert let_go >= 10, f"only {let_go} idle sessions were let go under stress"
        gw.wait_messages(1)
    finally:
        for s in held:
            s.close()


def test_ten_thousand_connections_neither_starve_a_sender_nor_grow_memory(gateways):
    raise_fd_limit(12_000)
    gw = gateways.simple("gw", local_domains=["a.test"], trusted_networks=["127.0.0.1/32"])
    before = rss(gw.proc.pid)
    held, greeted, refused = hold(gw.addr, 10_000)
    try:
        # The caps hold: at most 1000 sessions, 50 per address; the rest were told 421.
        assert greeted <= 1000 and greeted + refused == 10_000, (greeted, refused)
        during = rss(gw.proc.pid)
        assert during - before < 64 * 2**20, f"RSS grew by {(during - before) / 2**20:.1f} MiB"
        # A sender from another address gets through once the idle strangers are let go.
        wait_until(lambda: sent_one("flood-2", gw.addr), timeout=60, interval=0.5,
                   what="a sender served during the flood")
        gw.wait_messages(1)
        print(f"{greeted} greeted, {refused} refused; RSS {before / 2**20:.1f} -> "
              f"{during / 2**20:.1f} MiB")
    finally:
        for s in held:
            s.close()
