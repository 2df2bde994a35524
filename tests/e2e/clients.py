"""Drivers for real SMTP clients (swaks, openssl s_client, Python smtplib) and checks of what
they delivered."""

from __future__ import annotations

import queue
import re
import smtplib
import ssl
import subprocess
import threading
import uuid
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path

from harness import header_block, received_headers


def marker(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def swaks(addr, frm: str, to: str, mark: str, *extra: str, timeout: float = 30) -> str:
    """Runs swaks; asserts success; returns its transcript."""
    host, port = addr
    args = [
        "swaks",
        "--server", f"{host}:{port}",
        "--from", frm,
        "--to", to,
        "--helo", "swaks.test",
        "--header", f"Subject: swaks {mark}",
        "--body", f"body marker {mark}\n.leading dot line\nlast line",
        "--timeout", "15",
        *extra,
    ]
    p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"swaks failed ({p.returncode}):\n{out}"
    return out


def swaks_queue_id(transcript: str) -> str:
    ids = re.findall(r"<[-~]\s+250[ -]2\.0\.0 Ok: queued as (\S+)", transcript)
    assert len(ids) == 1, f"expected one 'queued as' in swaks transcript:\n{transcript}"
    return ids[0]


def check_delivered(
    msg: bytes,
    *,
    frm: str,
    to: str,
    mark: str | None,
    hostname: str,
    tls: bool,
    qid: str | None = None,
) -> re.Match | None:
    """Checks the trace fields we add and that the client's message is there."""
    text = msg.decode("utf-8", "replace")
    assert text.startswith(f"Return-Path: <{frm}>\r\nDelivered-To: {to}\r\n"), text[:300]
    if mark is not None:
        assert f"body marker {mark}" in text
    rec = received_headers(msg)
    assert rec, f"no Received header:\n{header_block(msg)}"
    top = rec[0]
    assert f"by {hostname} (Sealgate)" in top, top
    assert "[127.0.0.1]" in top, top
    if qid:
        assert re.search(rf"\bid {re.escape(qid)}\b", top), f"queue id {qid} not in {top}"
    if tls:
        m = re.search(r"with ESMTPS \((TLSv1\.[23]) (TLS\w+)\)", top)
        assert m, f"Received does not name ESMTPS + TLS version: {top}"
        return m
    assert re.search(r"with ESMTP\b(?!S)", top) and "TLSv" not in top, top
    return None


# --- openssl s_client ----------------------------------------------------------------------


class OpensslSession:
    """An interactive `openssl s_client` session; SMTP replies are read from its stdout."""

    def __init__(self, addr, *, starttls: bool, cafile: Path, verify_host: str, extra=()):
        host, port = addr
        args = [
            "openssl", "s_client",
            "-connect", f"{host}:{port}",
            "-ign_eof", "-nocommands",
            "-CAfile", str(cafile),
            "-verify_hostname", verify_host,
            "-servername", verify_host,
            *extra,
        ]
        if starttls:
            args += ["-starttls", "smtp"]
        self.p = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.transcript: list[str] = []

        def pump():
            for raw in self.p.stdout:
                self.lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def line(self, timeout=15.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("openssl s_client: no output;\n" + "\n".join(self.transcript))
        if line is None:
            raise AssertionError("openssl s_client ended;\n" + "\n".join(self.transcript))
        self.transcript.append(line)
        return line

    def until(self, rx: str) -> re.Match:
        while True:
            m = re.search(rx, self.line())
            if m:
                return m

    def reply(self) -> tuple[int, str]:
        """Next SMTP reply (lines of openssl's own chatter are skipped)."""
        lines = []
        while True:
            line = self.line()
            if re.match(r"^\d{3}-", line):
                lines.append(line)
            elif re.match(r"^\d{3}( |$)", line):
                lines.append(line)
                return int(line[:3]), "\n".join(lines)

    def cmd(self, s: str) -> tuple[int, str]:
        self.send(s + "\r\n")
        return self.reply()

    def send(self, s: str):
        self.p.stdin.write(s.encode())
        self.p.stdin.flush()

    def finish(self, timeout=15.0) -> int:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
            raise AssertionError("openssl s_client did not end after QUIT")
        return rc


def openssl_send(addr, *, starttls: bool, cafile: Path, verify_host: str, frm: str, to: str,
                 mark: str, extra=()) -> dict:
    """Drives a whole SMTP dialogue through openssl s_client; returns what was observed."""
    s = OpensslSession(addr, starttls=starttls, cafile=cafile, verify_host=verify_host, extra=extra)
    try:
        m = s.until(r"^New, (TLSv1(?:\.\d)?|SSLv\d), Cipher is (\S+)")
        proto, cipher = m.group(1), m.group(2)
        v = s.until(r"Verify return code: (\d+) \(([^)]*)\)")
        verify = (int(v.group(1)), v.group(2))
        if not starttls:
            code, text = s.reply()
            assert code == 220, text
        s.send("EHLO openssl.test\r\n")
        code, text = s.reply()
        # s_client 3.x echoes the last line of its own pre-TLS EHLO reply after the handshake
        # (it is not on the wire); skip it
        if re.fullmatch(r"250 [A-Z0-9-]+( \S+)?", text):
            code, text = s.reply()
        assert code == 250 and text.count("\n") > 1, text
        assert "STARTTLS" not in text, f"STARTTLS offered inside TLS: {text}"
        code, text = s.cmd(f"MAIL FROM:<{frm}>")
        assert code == 250, text
        code, text = s.cmd(f"RCPT TO:<{to}>")
        assert code == 250, text
        code, text = s.cmd("DATA")
        assert code == 354, text
        s.send(
            f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: openssl {mark}\r\n\r\n"
            f"body marker {mark}\r\n..stuffed dot\r\n.\r\n"
        )
        code, data_reply = s.reply()
        assert code == 250, data_reply
        code, text = s.cmd("QUIT")
        assert code == 221, text
        s.finish()
    finally:
        if s.p.poll() is None:
            s.p.kill()
            s.p.wait()
    return {
        "protocol": proto,
        "cipher": cipher,
        "verify": verify,
        "queue_reply": data_reply,
        "transcript": "\n".join(s.transcript),
    }


# --- smtplib ---------------------------------------------------------------------------------


def email(frm: str, to: str, mark: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = to
    m["Subject"] = f"smtplib {mark}"
    m["Message-ID"] = f"<{mark}@smtplib.test>"
    m.set_content(f"body marker {mark}\n.a line with a leading dot\n")
    return m


def verifying_ctx(cafile: Path, hostname_check: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = hostname_check
    return ctx


def smtplib_starttls(addr, frm, to, mark, cafile: Path, connect_host: str | None = None):
    """EHLO, STARTTLS (certificate verified), EHLO, send_message. Returns the TLS version."""
    host, port = addr
    ctx = verifying_ctx(cafile, hostname_check=connect_host is not None)
    with smtplib.SMTP(connect_host or host, port, local_hostname="smtplib.test", timeout=15) as s:
        code, _ = s.ehlo()
        assert code == 250
        for ext in ("starttls", "pipelining", "size", "8bitmime", "enhancedstatuscodes"):
            assert s.has_extn(ext), f"EHLO lacks {ext}: {s.esmtp_features}"
        code, text = s.starttls(context=ctx)
        assert code == 220, text
        version = s.sock.version()
        code, _ = s.ehlo()
        assert code == 250
        assert not s.has_extn("starttls"), "STARTTLS still offered after TLS"
        refused = s.send_message(email(frm, to, mark))
        assert refused == {}
    return version


def smtplib_ssl(addr, frm, to, mark, cafile: Path, connect_host: str | None = None):
    host, port = addr
    ctx = verifying_ctx(cafile, hostname_check=connect_host is not None)
    with smtplib.SMTP_SSL(connect_host or host, port, local_hostname="smtplib.test",
                          timeout=15, context=ctx) as s:
        version = s.sock.version()
        code, _ = s.ehlo()
        assert code == 250
        assert not s.has_extn("starttls")
        s.mail(frm)
        code, text = s.rcpt(to)
        assert code == 250, text
        code, text = s.data(email(frm, to, mark).as_bytes(policy=email_policy.SMTP))
        assert code == 250, text
    return version, text.decode()
