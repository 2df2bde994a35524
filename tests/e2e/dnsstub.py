"""A tiny authoritative DNS server for the end-to-end tests (standard library only).

`DnsStub` serves a fixed set of records over UDP and TCP on a 127.0.0.0/8 address:

    stub = DnsStub({
        "mx.test":     [("MX", 10, "mx1.mx.test")],
        "mx1.mx.test": [("A", "127.0.0.4")],
        "null.test":   [("MX", 0, ".")],            # null MX (RFC 7505)
    }, zones=["test"]).start()
    ...
    stub.stop()

Answers are authoritative (AA).  For a name inside one of `zones`:
  * records of the queried type            -> NOERROR with the answers,
  * the name exists but not with that type -> NOERROR, empty answer, the zone's SOA in authority
                                              (NODATA, RFC 2308),
  * the name does not exist                -> NXDOMAIN with the SOA in authority.
A name is taken to exist when it has records or is the zone apex or has a descendant with
records (an "empty non-terminal").  Names outside every zone get REFUSED.

Only class IN and opcode QUERY are served (NOTIMP otherwise); a query that cannot be parsed gets
FORMERR when its header is readable and is dropped otherwise.  Names in queries must not be
compressed (FORMERR); answers compress owner names that equal the question name.  Every query is
recorded in `stub.queries` as `(proto, qname, qtype)`, with qtype as a mnemonic when known.
`stub.fail(name, qtype, rcode)` makes the server answer that question with a bare error code
(SERVFAIL by default).  UDP answers longer than 512 octets are truncated (TC, question only),
so a client has to retry over TCP.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28,
         "OPT": 41, "ANY": 255}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
CLASS_IN = 1

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

MAX_UDP = 512
MAX_TCP_CONNECTIONS = 16
TTL = 30


class FormatError(Exception):
    pass


def _norm(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    return name


def encode_name(name: str) -> bytes:
    """Uncompressed wire form of `name` ("." or "" is the root)."""
    name = name.rstrip(".")
    out = b""
    if name:
        for label in name.split("."):
            raw = label.encode("ascii")
            if not 0 < len(raw) < 64:
                raise ValueError(f"bad label in {name!r}")
            out += bytes([len(raw)]) + raw
    out += b"\x00"
    if len(out) > 255:
        raise ValueError(f"name too long: {name!r}")
    return out


def parse_name(buf: bytes, off: int) -> tuple[str, int]:
    """An uncompressed name at `off`: (dotted lower-case name, offset after it)."""
    labels = []
    total = 0
    while True:
        if off >= len(buf):
            raise FormatError("name runs past the end")
        n = buf[off]
        off += 1
        if n == 0:
            break
        if n & 0xC0:
            raise FormatError("compressed or extended label in a query")
        if off + n > len(buf):
            raise FormatError("label runs past the end")
        total += n + 1
        if total > 254:
            raise FormatError("name too long")
        labels.append(buf[off:off + n].decode("latin-1"))
        off += n
    return ".".join(labels).lower(), off


def _rdata(rtype: str, rec: tuple) -> bytes:
    if rtype == "A":
        return ipaddress.IPv4Address(rec[1]).packed
    if rtype == "AAAA":
        return ipaddress.IPv6Address(rec[1]).packed
    if rtype == "MX":
        return struct.pack("!H", int(rec[1])) + encode_name(rec[2])
    if rtype in ("CNAME", "NS", "PTR"):
        return encode_name(rec[1])
    if rtype == "TXT":
        out = b""
        for s in rec[1:]:
            raw = s.encode()
            for i in range(0, max(len(raw), 1), 255):
                chunk = raw[i:i + 255]
                out += bytes([len(chunk)]) + chunk
        return out
    raise ValueError(f"unsupported record type {rtype}")


class DnsStub:
    def __init__(self, records: dict | None = None, zones=("test",), ip: str = "127.0.0.53",
                 port: int | None = None, ttl: int = TTL):
        self.ip = ip
        self.port = port
        self.ttl = ttl
        self.zones = [_norm(z) for z in zones]
        self._lock = threading.Lock()
        self.records: dict[str, list[tuple]] = {}
        for name, recs in (records or {}).items():
            for r in recs:
                self.add(name, *r)
        self.queries: list[tuple[str, str, str]] = []
        self.failures: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._tcp_slots = threading.BoundedSemaphore(MAX_TCP_CONNECTIONS)

    # --- records

    def add(self, name: str, rtype: str, *value) -> None:
        rtype = rtype.upper()
        rec = (rtype, *value)
        _rdata(rtype, rec)  # validate now, not at query time
        with self._lock:
            self.records.setdefault(_norm(name), []).append(rec)

    def fail(self, name: str, qtype: str, rcode: int = SERVFAIL) -> None:
        """Answers queries for (`name`, `qtype`) with `rcode` (e.g. SERVFAIL) and nothing else."""
        with self._lock:
            self.failures[(_norm(name), qtype.upper())] = rcode

    @property
    def address(self) -> str:
        """`IP:port` as the gateway's `[dns] resolver` wants it."""
        return f"{self.ip}:{self.port}"

    def asked(self, qname: str, qtype: str | None = None) -> bool:
        qname = _norm(qname)
        with self._lock:
            return any(q[1] == qname and (qtype is None or q[2] == qtype) for q in self.queries)

    # --- lifecycle

    def start(self) -> "DnsStub":
        self._udp, self._tcp = self._bind()
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _bind(self):
        for _ in range(50):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                u.bind((self.ip, self.port or 0))
                port = u.getsockname()[1]
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((self.ip, port))
                t.listen(16)
            except OSError:
                u.close()
                t.close()
                if self.port:
                    raise
                continue
            self.port = port
            u.settimeout(0.2)
            t.settimeout(0.2)
            return u, t
        raise RuntimeError("no port free for both UDP and TCP")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- transports

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._udp.recvfrom(4096)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            try:
                resp = self.handle(data, "udp")
                if resp is None:
                    continue
                if len(resp) > MAX_UDP:
                    resp = self._truncated(resp)
                self._udp.sendto(resp, peer)
            except Exception:  # noqa: BLE001 - never let one datagram kill the server
                continue

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if not self._tcp_slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5.0)
            while not self._stop.is_set():
                head = self._recv_exact(conn, 2)
                if head is None:
                    return
                (n,) = struct.unpack("!H", head)
                data = self._recv_exact(conn, n)
                if data is None:
                    return
                resp = self.handle(data, "tcp")
                if resp is None:
                    return
                conn.sendall(struct.pack("!H", len(resp)) + resp)
        except Exception:  # noqa: BLE001
            return
        finally:
            conn.close()
            self._tcp_slots.release()

    @staticmethod
    def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    @staticmethod
    def _truncated(resp: bytes) -> bytes:
        """Header and question only, with TC set."""
        ident, flags, qd = struct.unpack("!HHH", resp[:6])
        _, off = parse_name(resp, 12)
        return struct.pack("!HHHHHH", ident, flags | 0x0200, qd, 0, 0, 0) + resp[12:off + 4]

    # --- the server proper

    def handle(self, data: bytes, proto: str = "udp") -> bytes | None:
        """The response to one query message, or None to stay silent."""
        if len(data) < 12:
            return None
        ident, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", data[:12])
        if flags & 0x8000:
            return None  # a response: never answer those
        opcode = (flags >> 11) & 0xF
        rd = flags & 0x0100
        if opcode != 0:
            return self._header(ident, rd, NOTIMP, opcode=opcode)
        if qd != 1:
            return self._header(ident, rd, FORMERR)
        try:
            qname, off = parse_name(data, 12)
            if off + 4 > len(data):
                raise FormatError("short question")
            qtype, qclass = struct.unpack("!HH", data[off:off + 4])
        except FormatError:
            return self._header(ident, rd, FORMERR)
        question = data[12:off + 4]
        with self._lock:
            self.queries.append((proto, qname, TYPE_NAMES.get(qtype, str(qtype))))
        if qclass != CLASS_IN:
            return self._header(ident, rd, NOTIMP, question)
        with self._lock:
            forced = self.failures.get((qname, TYPE_NAMES.get(qtype, str(qtype))))
        if forced is not None:
            return self._header(ident, rd, forced, question)
        rcode, answers, authority = self._lookup(qname, qtype)
        # answers: owner is always the question name -> pointer to offset 12
        body = b""
        for rtype, rdata in answers:
            body += struct.pack("!HHHIH", 0xC00C, TYPES[rtype], CLASS_IN, self.ttl, len(rdata)) + rdata
        for owner, rtype, rdata in authority:
            body += encode_name(owner) + struct.pack("!HHIH", TYPES[rtype], CLASS_IN, self.ttl,
                                                     len(rdata)) + rdata
        return self._header(ident, rd, rcode, question, len(answers), len(authority)) + body

    @staticmethod
    def _header(ident, rd, rcode, question=b"", an=0, ns=0, opcode=0) -> bytes:
        flags = 0x8000 | (opcode << 11) | 0x0400 | rd | rcode  # QR, AA
        return struct.pack("!HHHHHH", ident, flags, 1 if question else 0, an, ns, 0) + question

    def _zone_of(self, name: str) -> str | None:
        best = None
        for z in self.zones:
            if name == z or name.endswith("." + z) or z == "":
                if best is None or len(z) > len(best):
                    best = z
        return best

    def _soa(self, zone: str) -> tuple[str, str, bytes]:
        mname = encode_name("ns." + zone if zone else "ns")
        rname = encode_name("hostmaster." + zone if zone else "hostmaster")
        rdata = mname + rname + struct.pack("!IIIII", 1, 3600, 600, 86400, self.ttl)
        return (zone or ".", "SOA", rdata)

    def _lookup(self, qname: str, qtype: int):
        zone = self._zone_of(qname)
        if zone is None:
            return REFUSED, [], []
        with self._lock:
            recs = list(self.records.get(qname, []))
            exists = bool(recs) or qname == zone or any(
                n.endswith("." + qname) for n in self.records)
        if not exists:
            return NXDOMAIN, [], [self._soa(zone)]
        answers = [(r[0], _rdata(r[0], r)) for r in recs
                   if qtype == TYPES["ANY"] or TYPES[r[0]] == qtype]
        if qname == zone and qtype in (TYPES["SOA"], TYPES["ANY"]):
            answers.append(("SOA", self._soa(zone)[2]))
        if not answers:
            return NOERROR, [], [self._soa(zone)]
        return NOERROR, answers, []
