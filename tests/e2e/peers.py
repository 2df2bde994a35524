"""Where the unpacked Exim and OpenSMTPD live (tests/e2e/install-peers.sh), shared by exim.py
and opensmtpd.py.

The packages are not installed (they conflict with postfix): their .debs are unpacked into
`target/peers/root`, and the binaries run from there with `LD_LIBRARY_PATH` pointing at the
libraries unpacked beside them. Instance directories live under `target/peers/run/NAME`, not
under pytest's temp dir: that is 0700 root, and the peers' unprivileged users (Debian-exim,
opensmtpd) must reach their spool, log and Maildir. An instance's directory is wiped when it
starts and kept afterwards for a look after a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from harness import ROOT

PEERS = ROOT / "target" / "peers"
PEER_ROOT = PEERS / "root"
LIBDIR = PEER_ROOT / "usr" / "lib" / "x86_64-linux-gnu"
INSTALL = ROOT / "tests" / "e2e" / "install-peers.sh"


def env() -> dict:
    e = dict(os.environ)
    e["LD_LIBRARY_PATH"] = str(LIBDIR) + (":" + e["LD_LIBRARY_PATH"] if e.get("LD_LIBRARY_PATH") else "")
    return e


def unavailable(binaries: list[str], users: list[str]) -> str | None:
    """Why the peer cannot run (None if it can). Runs install-peers.sh once if something is
    missing (quick when all is there), so the module also works outside tests/run."""
    def why():
        for b in binaries:
            if not os.access(PEER_ROOT / b, os.X_OK):
                return f"{PEER_ROOT / b} missing"
        for u in users:
            try:
                pwd.getpwnam(u)
            except KeyError:
                return f"system user {u} missing"
        return None

    if why() is None:
        return None
    if INSTALL.exists():
        subprocess.run([str(INSTALL)], capture_output=True, timeout=600)
    reason = why()
    if reason and (PEERS / "unavailable").exists():
        reason += ": " + (PEERS / "unavailable").read_text().strip()
    return reason


def instance_dir(name: str) -> Path:
    d = PEERS / "run" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for p in (PEERS / "run", d):
        p.chmod(0o755)
    return d
