"""The appliance under QEMU for the end-to-end tests: building the image once, booting copies of
its disk, talking to the box through its forwarded ports (all on 127.0.0.1) and its console."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from harness import SEALCTL, free_port, wait_until

STATIC = SEALCTL.parent
FAULTS_BIN = STATIC / "sealgate-test-faults"
VERSION = "1.0.0"
GUEST_SINK = "10.0.2.100"
# Under TCG a boot takes tens of seconds; under KVM a few.
BOOT_TIMEOUT = float(os.environ.get("SEALGATE_BOOT_TIMEOUT", "180"))


def sealctl(*args, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(SEALCTL), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"sealctl {' '.join(map(str, args))} -> {p.returncode}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


class Image:
    """One `sealctl image build` output plus the HQ keys that made it."""

    def __init__(self, root: Path):
        self.root = root
        self.keys = root / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        for k in ("hq", "img", "rogue"):
            sealctl("keygen", "--out", self.keys / k)
        self.dir = root / "image"
        p = sealctl("image", "build", "--trust", self.keys / "hq.pub",
                    "--image-key", self.keys / "img.key", "--version", VERSION,
                    "--out", self.dir, timeout=600)
        self.build_output = p.stdout + p.stderr

    def bundle(self, name: str, version: str, *, binary: Path | None = None,
               key: str = "img", board: str | None = None) -> Path:
        out = self.root / f"{name}.sgu"
        args = ["image", "sign", binary or (STATIC / "sealgate"), "--key", self.keys / f"{key}.key",
                "--version", version, "-o", out]
        if board:
            args += ["--board", board]
        sealctl(*args)
        return out

    def fresh_disk(self, where: Path) -> Path:
        """A directory holding the image's kernel and initramfs and a fresh copy of its disk."""
        where.mkdir(parents=True, exist_ok=True)
        for f in ("vmlinuz", "initramfs.cpio.gz"):
            dst = where / f
            if not dst.exists():
                os.symlink(self.dir / f, dst)
        subprocess.run(["cp", "--sparse=always", str(self.dir / "disk.img"), str(where / "disk.img")],
                       check=True)
        return where


RUNNING: list["Vm"] = []


def kill_all() -> None:
    """Power off every VM still running (test teardown; also at interpreter exit)."""
    while RUNNING:
        RUNNING.pop().power_cut()


atexit.register(kill_all)


class Vm:
    """One QEMU process running an image directory, its console captured to a file."""

    def __init__(self, image_dir: Path, secret: Path, sink_port: int, append: str = ""):
        self.dir = image_dir
        self.secret = secret
        self.sink_port = sink_port
        self.append = append
        self.smtp = free_port("127.0.0.1")
        self.smtps = free_port("127.0.0.1")
        self.mgmt = free_port("127.0.0.1")
        self.console_path = image_dir / f"console-{int(time.time() * 1000)}.log"
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._text = ""

    def start(self) -> "Vm":
        args = [str(SEALCTL), "image", "run", str(self.dir), "--secret-file", str(self.secret),
                "--smtp", f"127.0.0.1:{self.smtp}", "--smtps", f"127.0.0.1:{self.smtps}",
                "--mgmt", f"127.0.0.1:{self.mgmt}",
                "--guestfwd", f"{GUEST_SINK}:25=127.0.0.1:{self.sink_port}"]
        if self.append:
            args += ["--append", self.append]
        self.console = open(self.console_path, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.append(self)
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self):
        assert self.proc and self.proc.stdout
        for raw in iter(self.proc.stdout.readline, b""):
            with self._lock:
                self._text += raw.decode("utf-8", "replace")
                if not self.console.closed:
                    self.console.write(raw)
                    self.console.flush()

    def text(self) -> str:
        with self._lock:
            return self._text

    def wait_console(self, pattern: str, timeout: float = BOOT_TIMEOUT, count: int = 1) -> list[re.Match]:
        rx = re.compile(pattern)
        def found():
            m = list(rx.finditer(self.text()))
            return m if len(m) >= count else None
        try:
            return wait_until(found, timeout=timeout, what=f"console /{pattern}/ x{count}", interval=0.2)
        except Exception as e:
            tail = "\n".join(self.text().splitlines()[-60:])
            raise AssertionError(f"{e}\n--- console tail ({self.console_path}) ---\n{tail}") from None

    def wait_healthy(self, count: int = 1, timeout: float = BOOT_TIMEOUT):
        self.wait_console(r"health check passed", timeout=timeout, count=count)

    def power_cut(self):
        """kill -9 of QEMU: the guest loses what it had not written to the disk image."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self in RUNNING:
            RUNNING.remove(self)
        with self._lock:
            if not self.console.closed:
                self.console.close()

    def stop(self):
        self.power_cut()

    # --- the management API through the real client

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.mgmt}"

    def mgmt_pin(self) -> str:
        """The management certificate's SHA-256, as the box prints it on its console."""
        m = self.wait_console(r"mgmt: certificate sha256 ([0-9a-f]{64})")
        return m[-1].group(1)

    def device(self, *args, auth: list | None = None, check=True, timeout=300) -> subprocess.CompletedProcess:
        return sealctl("device", *args, "--url", self.url, "--pin", self.mgmt_pin(), *(auth or []),
                       check=check, timeout=timeout)

    def status(self, auth: list) -> dict:
        return json.loads(self.device("status", "--json", auth=auth).stdout)


def write_secret(path: Path, seed: bytes) -> Path:
    path.write_bytes((seed * 64)[:32])
    path.chmod(0o600)
    return path
