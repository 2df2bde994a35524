"""The threaded TCP server under the tests' scripted peers (fakepeer.FakePeer, tlsproxy.TlsProxy).

`ThreadedServer` binds a listener inside 127.0.0.0/8, runs an accept loop on its own thread and
one thread per accepted connection (at most `max_sessions` at once; more, and clients that are
not on a loopback address, are closed at once). A subclass sets up its own state, calls
`super().__init__(...)`, then `start()`, and implements `handle(conn, peer)`: it returns the
function the connection's thread runs, or None to refuse the connection.

The server keeps the sockets it is told about (every accepted one, and what a subclass adds with
`track`): `shutdown_connections()` ends them all at once (`switch`/`cut` style), and `close()`
stops accepting, interrupts every session (`interrupt()`, which subclasses may extend), joins
every thread within a bound, closes what is left and raises if a thread is still running.
`errors` collects bugs in the server itself (exceptions a session did not handle).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Callable


def loopback(ip: str) -> str:
    """`ip` if it is an IPv4 address inside 127.0.0.0/8; ValueError otherwise."""
    a = ipaddress.ip_address(ip)
    if a.version != 4 or not a.is_loopback:
        raise ValueError(f"{ip}: the e2e test servers bind and connect only inside 127.0.0.0/8")
    return ip


class ThreadedServer:
    """A listener on `(ip, port)` (port 0: any free one) with a thread per connection."""

    #: prefix of thread names and of messages
    kind = "server"

    def __init__(self, ip: str, port: int = 0, *, max_sessions: int = 32, poll: float = 0.2,
                 backlog: int = 16):
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._accepted = 0
        self.errors: list[str] = []  # unexpected exceptions in the server itself
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._lsock.bind((loopback(ip), int(port)))
            self._lsock.listen(backlog)
            self._lsock.settimeout(poll)
        except BaseException:
            self._lsock.close()
            raise
        self.addr: tuple[str, int] = self._lsock.getsockname()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.kind}-accept-{self.addr[1]}", daemon=True
        )

    def start(self) -> None:
        """Starts accepting (call once the subclass's state is ready)."""
        self._accept_thread.start()

    # --- for subclasses

    def handle(self, conn: socket.socket, peer: tuple[str, int]) -> Callable[[], None] | None:
        """The body of the thread for connection `conn` from `peer`, or None to refuse it.
        Runs on the accept thread; the body runs on the connection's own thread, which closes
        `conn` when the body returns."""
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def track(self, sock: socket.socket) -> None:
        """Another socket of a session (e.g. a proxy's upstream leg) that stop/cut must end."""
        with self._lock:
            self._socks.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def shutdown_connections(self) -> None:
        """Shuts down (both ways) every tracked socket: their sessions see EOF or an error."""
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def interrupt(self) -> None:
        """Ends every running session (close() calls it once nothing new is accepted)."""
        self.shutdown_connections()

    # --- observation

    @property
    def hop(self) -> str:
        """The server as a next hop: "127.0.0.x:PORT"."""
        return "%s:%d" % self.addr

    # --- life cycle

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._lsock.close()
        except OSError:
            pass
        if self._accept_thread.is_alive():
            self._accept_thread.join(timeout)
        self.interrupt()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            _close(s)
        alive = [t.name for t in threads if t.is_alive()]
        if alive or self._accept_thread.is_alive():
            raise RuntimeError(f"{self.kind} threads still running after close(): {alive}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- internals

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                c, peer = self._lsock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                busy = len(self._threads) >= self.max_sessions
            if busy or self._stop.is_set() or not ipaddress.ip_address(peer[0]).is_loopback:
                _close(c)
                continue
            try:
                body = self.handle(c, peer)
            except Exception as e:  # noqa: BLE001 - a bug in the server must show up in the test
                with self._lock:
                    self.errors.append(f"handle({peer}): {e!r}")
                body = None
            if body is None:
                _close(c)
                continue
            with self._lock:
                self._accepted += 1
                self._socks.add(c)
                t = threading.Thread(
                    target=self._run, args=(body, c, peer),
                    name=f"{self.kind}-{self.addr[1]}-{self._accepted}", daemon=True,
                )
                self._threads.append(t)
            t.start()

    def _run(self, body: Callable[[], None], conn: socket.socket, peer) -> None:
        try:
            body()
        except Exception as e:  # noqa: BLE001 - a bug in the server must show up in the test
            with self._lock:
                self.errors.append(f"session from {peer}: {e!r}")
        finally:
            _close(conn)
            self.untrack(conn)


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass
