"""A scriptable SMTP server for outbound TLS policy tests: the next hop a gateway delivers to.

The outbound fallback and downgrade rules (F-TLS-OUT) depend on how the *peer* behaves: whether
it offers STARTTLS, and whether its TLS handshake completes, hangs or breaks. A real gateway
cannot be made to hang in the middle of a handshake, so the tests use this small server instead.
It accepts every transaction with 250 and records, per session, what the client did:

- ``starttls``: the client issued STARTTLS (the server answered 220);
- ``tls``: the TLS handshake completed (``tls_version``), or ``tls_error`` why not;
- ``commands``: every command line received (plaintext and inside TLS);
- ``messages``: each accepted transaction (envelope + unstuffed data, and whether over TLS).

Knobs, read when they matter (changeable at run time with ``set()``):

- ``offer_starttls`` (bool): list STARTTLS in the EHLO reply (and accept the command);
- ``handshake``: what happens after ``220`` to STARTTLS —
  ``"ok"`` a normal TLS server handshake with ``cert``/``key``;
  ``"hang"`` never answer the ClientHello: read and discard whatever the client sends until it
  gives up and closes (bounded by ``hang_limit``);
  ``"fail"`` wait for the ClientHello, answer with bytes that are not TLS, close;
  ``"refuse"`` answer STARTTLS with ``454 4.7.0`` (offered, then refused) and go on in plaintext;
- ``close_after_data`` (bool): close the connection right after the 250 to DATA, so a sender
  cannot park and reuse it (each message then shows up as its own session).

Bounds: one thread per connection, at most ``max_sessions`` at once; every read polls with a
short timeout and ends at ``idle_timeout``; lines are capped at 64 KiB and messages at
``max_message``. ``set(..., cut=True)`` and ``cut()`` end the open sessions (a sender's parked
connection would otherwise keep the old behaviour); ``close()`` stops everything and joins the
threads. It binds only inside 127.0.0.0/8. The listener, the accept loop and the thread per
connection are netserver.ThreadedServer's.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from netserver import ThreadedServer

HANDSHAKES = ("ok", "hang", "fail", "refuse")
LINE_CAP = 64 << 10
POLL = 0.2


@dataclass
class Message:
    session: int
    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool


@dataclass
class Session:
    n: int
    client: tuple[str, int]
    started: float
    offer_starttls: bool = False  # knob values when the EHLO reply was sent
    handshake: str | None = None  # the handshake mode applied after STARTTLS
    helo: str | None = None
    starttls: bool = False
    tls: bool = False
    tls_version: str | None = None
    tls_error: str | None = None
    hang_seconds: float | None = None  # how long the client waited in a hung handshake
    hang_bytes: int = 0  # what it sent meanwhile (its ClientHello)
    commands: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    ended: float | None = None
    end: str | None = None

    def copy(self) -> "Session":
        s = Session(**{k: v for k, v in self.__dict__.items()})
        s.commands = list(self.commands)
        s.messages = list(self.messages)
        return s


class _End(Exception):
    """The session is over."""


class FakePeer(ThreadedServer):
    """`FakePeer("127.0.0.5", cert=..., key=...)`; `.hop` is "127.0.0.5:PORT"."""

    kind = "fakepeer"

    def __init__(
        self,
        ip: str = "127.0.0.5",
        port: int = 0,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        hostname: str = "fakepeer.test",
        offer_starttls: bool = True,
        handshake: str = "ok",
        close_after_data: bool = False,
        idle_timeout: float = 30.0,
        handshake_limit: float = 10.0,
        hang_limit: float = 30.0,
        max_sessions: int = 32,
        max_message: int = 10 << 20,
    ):
        assert handshake in HANDSHAKES, handshake
        self.hostname = hostname
        self.offer_starttls = offer_starttls
        self.handshake = handshake
        self.close_after_data = close_after_data
        self.idle_timeout = idle_timeout
        self.handshake_limit = handshake_limit
        self.hang_limit = hang_limit
        self.max_message = max_message
        self._ctx: ssl.SSLContext | None = None
        if cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(cert), str(key))
            self._ctx = ctx
        self._sessions: list[Session] = []
        self._live: dict[int, threading.Event] = {}  # session n -> cut signal
        super().__init__(ip, port, max_sessions=max_sessions, poll=POLL)
        self.start()

    # --- control

    def set(self, *, cut: bool = True, **knobs) -> None:
        """Changes knobs (offer_starttls, handshake, close_after_data); with `cut`, ends the
        open sessions so the next delivery meets the new behaviour on a fresh connection."""
        for k, v in knobs.items():
            if k not in ("offer_starttls", "handshake", "close_after_data"):
                raise AttributeError(k)
            if k == "handshake":
                assert v in HANDSHAKES, v
            setattr(self, k, v)
        if cut:
            self.cut()

    def cut(self) -> None:
        """Ends every open session (the threads notice within POLL seconds)."""
        with self._lock:
            for ev in self._live.values():
                ev.set()

    # --- observation

    def sessions(self) -> list[Session]:
        with self._lock:
            return [s.copy() for s in self._sessions]

    def messages(self) -> list[Message]:
        with self._lock:
            return [m for s in self._sessions for m in s.messages]

    def with_marker(self, marker: str | bytes) -> list[tuple[Message, Session]]:
        """Accepted messages whose data holds `marker`, each with (a copy of) its session."""
        m = marker.encode() if isinstance(marker, str) else marker
        return [(msg, s) for s in self.sessions() for msg in s.messages if m in msg.data]

    def wait_message(self, marker: str | bytes, timeout: float = 20.0) -> tuple[Message, Session]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.with_marker(marker)
            if got:
                return got[0]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"fake peer {self.hop}: no message with {marker!r} within {timeout:.0f}s;"
                    f" sessions: {self.sessions()}"
                )
            time.sleep(0.05)

    def wait_sessions(self, pred, count: int = 1, timeout: float = 20.0) -> list[Session]:
        """Waits until at least `count` sessions satisfy `pred` (e.g. ended hung handshakes)."""
        deadline = time.monotonic() + timeout
        while True:
            got = [s for s in self.sessions() if pred(s)]
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"fake peer {self.hop}: {len(got)}/{count} matching sessions after"
                    f" {timeout:.0f}s: {self.sessions()}"
                )
            time.sleep(0.05)

    # --- ThreadedServer

    def interrupt(self) -> None:
        self.cut()
        super().interrupt()

    def handle(self, conn: socket.socket, peer: tuple[str, int]):
        with self._lock:
            s = Session(n=len(self._sessions) + 1, client=peer, started=time.time())
            self._sessions.append(s)
            cut = threading.Event()
            self._live[s.n] = cut
        return _Conn(self, conn, s, cut).run


class _Conn:
    """One connection, driven by its own thread."""

    def __init__(self, peer: FakePeer, sock: socket.socket, s: Session, cut: threading.Event):
        self.p = peer
        self.sock: socket.socket = sock
        self.s = s
        self.cut = cut
        self.buf = b""
        self.last = time.monotonic()
        sock.settimeout(POLL)

    def run(self) -> None:
        end = "closed"
        try:
            self.session()
        except _End as e:
            end = str(e) or "closed"
        except (OSError, ssl.SSLError) as e:
            end = f"io error: {e}"
        except Exception as e:  # noqa: BLE001 - a bug in the fake peer itself
            end = f"internal error: {e!r}"
            with self.p._lock:
                self.p.errors.append(f"session {self.s.n}: {e!r}")
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            with self.p._lock:
                self.s.ended = time.time()
                self.s.end = end
                self.p._live.pop(self.s.n, None)

    # --- I/O

    def _check(self) -> None:
        if self.cut.is_set() or self.p.stopping:
            raise _End("cut")

    def _recv(self) -> bytes:
        while True:
            self._check()
            try:
                d = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                if time.monotonic() - self.last > self.p.idle_timeout:
                    self.send(b"421 4.4.2 idle timeout\r\n")
                    raise _End("idle timeout")
                continue
            except ssl.SSLWantReadError:
                continue
            if not d:
                raise _End("eof")
            self.last = time.monotonic()
            return d

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > LINE_CAP:
                raise _End("line too long")
            self.buf += self._recv()
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, text: str) -> None:
        self.send(text.encode() + b"\r\n")

    # --- SMTP

    def session(self) -> None:
        p, s = self.p, self.s
        self.reply(f"220 {p.hostname} ESMTP fakepeer")
        mail_from: str | None = None
        rcpts: list[str] = []
        while True:
            raw = self.line()
            cmd = raw.decode("utf-8", "replace")
            with p._lock:
                s.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            arg = cmd[len(verb):].strip()
            if verb == "EHLO":
                s.helo = arg
                mail_from, rcpts = None, []
                offer = p.offer_starttls and not s.tls and p._ctx is not None
                if not s.tls:
                    s.offer_starttls = offer
                caps = [p.hostname, "PIPELINING", "8BITMIME", f"SIZE {p.max_message}", "ENHANCEDSTATUSCODES"]
                if offer:
                    caps.append("STARTTLS")
                self.send(
                    b"".join(
                        f"250{' ' if i == len(caps) - 1 else '-'}{c}\r\n".encode() for i, c in enumerate(caps)
                    )
                )
            elif verb == "HELO":
                s.helo = arg
                mail_from, rcpts = None, []
                self.reply(f"250 {p.hostname}")
            elif verb == "STARTTLS":
                if s.tls or not (p.offer_starttls and p._ctx is not None) or p.handshake == "refuse":
                    s.handshake = p.handshake
                    self.reply("454 4.7.0 TLS not available")
                    continue
                s.starttls = True
                s.handshake = p.handshake
                self.buf = b""  # a correct server discards what came before the handshake
                self.reply("220 2.0.0 Ready to start TLS")
                self.starttls(s.handshake)
                mail_from, rcpts = None, []
            elif verb == "MAIL":
                mail_from = _path(arg, "FROM:")
                rcpts = []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                if mail_from is None:
                    self.reply("503 5.5.1 MAIL first")
                    continue
                rcpts.append(_path(arg, "TO:"))
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self.reply("503 5.5.1 RCPT first")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data, too_big = self.data()
                if too_big:
                    self.reply("552 5.3.4 Message too big")
                else:
                    with p._lock:
                        s.messages.append(Message(s.n, mail_from, list(rcpts), data, s.tls))
                    self.reply(f"250 2.0.0 Ok: queued as fakepeer-{s.n}-{len(s.messages)}")
                mail_from, rcpts = None, []
                if p.close_after_data:
                    raise _End("closed after DATA")
            elif verb == "RSET":
                mail_from, rcpts = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                raise _End("quit")
            else:
                self.reply("502 5.5.2 Command not recognized")

    def data(self) -> tuple[bytes, bool]:
        out: list[bytes] = []
        size = 0
        while True:
            line = self.line()
            if line == b".":
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line) + 2
            if size <= self.p.max_message:
                out.append(line + b"\r\n")
        return b"".join(out), size > self.p.max_message

    def starttls(self, mode: str) -> None:
        p, s = self.p, self.s
        if mode == "hang":
            # Read the ClientHello (and whatever else) and never answer, until the client
            # closes; the client's handshake timeout is what ends this.
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < p.hang_limit:
                    self._check()
                    try:
                        d = self.sock.recv(65536)
                    except (socket.timeout, TimeoutError):
                        continue
                    if not d:
                        break
                    s.hang_bytes += len(d)
            finally:
                s.hang_seconds = time.monotonic() - t0
            raise _End("hang: client gave up" if time.monotonic() - t0 < p.hang_limit else "hang: limit")
        if mode == "fail":
            # Wait for the ClientHello first (bytes before it would be a response injection, a
            # different failure), then answer with something that is not TLS.
            t0 = time.monotonic()
            while True:
                self._check()
                try:
                    d = self.sock.recv(65536)
                except (socket.timeout, TimeoutError):
                    if time.monotonic() - t0 > p.handshake_limit:
                        raise _End("fail: no ClientHello")
                    continue
                if not d:
                    raise _End("fail: client closed first")
                break
            self.send(b"this is not a TLS ServerHello\r\n" * 4)
            s.tls_error = "fail mode: sent garbage"
            raise _End("fail: garbage sent")
        # "ok"
        tls = p._ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        t0 = time.monotonic()
        while True:
            self._check()
            try:
                tls.do_handshake()
                break
            except (socket.timeout, TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                if time.monotonic() - t0 > p.handshake_limit:
                    s.tls_error = "handshake timeout"
                    raise _End("tls handshake timeout")
            except (ssl.SSLError, OSError) as e:
                s.tls_error = str(e)
                raise _End(f"tls handshake failed: {e}")
        with p._lock:
            s.tls = True
            s.tls_version = tls.version()
        self.last = time.monotonic()


def _path(arg: str, prefix: str) -> str:
    """The address in `FROM:<a@b> SIZE=..`."""
    a = arg[len(prefix):] if arg.upper().startswith(prefix) else arg
    a = a.strip()
    if a.startswith("<"):
        return a[1 : a.find(">")] if ">" in a else a[1:]
    return a.split(" ", 1)[0]
