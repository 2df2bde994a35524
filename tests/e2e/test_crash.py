"""Crash safety: SIGKILL while clients are sending; every message that got a 250 is delivered
after the restart (duplicates allowed, loss never)."""

import random
import subprocess
import re
import smtplib
import ssl
import threading
import uuid

from harness import BIN, Raw, free_port, make_config, message, queue_id, wait_until

THREADS = 8
PER_THREAD = 40
ROUNDS = 3


def _client(addr, rnd, t, acked, lock, attempts, killed, failures):
    """Sends up to PER_THREAD messages; records every one that got a 250 after the dot.

    Stops at the first refusal or error. Once `killed` is set that is the crash (whatever was not
    acknowledged may be lost); before it, the daemon was running normally, so the refusal or
    error goes to `failures`."""
    tls = t % 2 == 0
    i = 0

    def stop(what: str) -> None:
        if not killed.is_set():
            with lock:
                failures.append(f"round {rnd} thread {t} message {i} (tls={tls}): {what}")

    while i < PER_THREAD:
        try:
            with smtplib.SMTP(*addr, local_hostname=f"crash{t}.test", timeout=10) as s:
                s.ehlo()
                if tls:
                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                    s.starttls(context=ctx)
                    s.ehlo()
                # a few messages per session, then a new session
                for _ in range(5):
                    if i >= PER_THREAD:
                        break
                    mark = f"crash-r{rnd}-t{t}-m{i}-{uuid.uuid4().hex[:8]}"
                    i += 1
                    data = message(mark, f"sender{t}@a.test", f"rcpt{t}@a.test",
                                   extra_body=f"payload {mark}\r\n" * 20)
                    with lock:
                        attempts[0] += 1
                    code, text = s.mail(f"sender{t}@a.test")
                    if code != 250:
                        return stop(f"MAIL -> {code} {text!r}")
                    code, text = s.rcpt(f"rcpt{t}@a.test")
                    if code != 250:
                        return stop(f"RCPT -> {code} {text!r}")
                    code, text = s.data(data)
                    if code == 250:
                        with lock:
                            acked[mark] = (queue_id(text.decode()), data)
                    else:
                        return stop(f"DATA -> {code} {text!r}")
        except (smtplib.SMTPException, OSError) as e:
            return stop(f"{type(e).__name__}: {e}")


def test_sigkill_under_load_loses_nothing(gateways):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"],
                         smtp={"max_connections_per_ip": 200})
    acked: dict[str, tuple[str, bytes]] = {}
    lock = threading.Lock()
    kills = []
    failures: list[str] = []  # refusals and errors while the daemon was running
    for rnd in range(ROUNDS):
        before = len(acked)
        attempts = [0]
        killed = threading.Event()
        threshold = rng.randrange(40, 200)
        threads = [
            threading.Thread(target=_client, args=(gw.addr, rnd, t, acked, lock, attempts, killed, failures),
                             daemon=True)
            for t in range(THREADS)
        ]
        for th in threads:
            th.start()
        wait_until(
            lambda: len(acked) - before >= threshold or not any(th.is_alive() for th in threads),
            120,
            f"{threshold} acknowledged messages in round {rnd}",
            interval=0.005,
        )
        killed.set()  # before the signal: any error a client sees from here on may be the kill
        gw.kill()
        kills.append((rnd, threshold, len(acked) - before, attempts[0]))
        for th in threads:
            th.join(30)
        assert not any(th.is_alive() for th in threads), "client threads hang after the kill"
        assert not failures, f"seed={seed}: clients failed before the kill:\n" + "\n".join(failures[:20])
        assert len(acked) - before >= min(threshold, 20), f"round {rnd}: too few acks to test"
        # restart on the same state directory: the queue is recovered and delivered
        gw.start()
        gw.wait_log(r"queue recovered", count=gw.starts)

    wait_until(lambda: not gw.queue_files(), 90, "the recovered queue to be delivered")
    # A kill can only tear the tail of the log (never acknowledged); nothing else is damaged.
    assert "records after it are lost" not in gw.log(), "queue segment damaged after kill -9"

    delivered = {}
    for name, content in gw.messages().items():
        for m in set(re.findall(rb"body marker (crash-r\d+-t\d+-m\d+-[0-9a-f]+)", content)):
            delivered.setdefault(m.decode(), []).append(content)
    missing = sorted(m for m in acked if m not in delivered)
    detail = "\n".join(f"  {m} queue_id={acked[m][0]}" for m in missing[:20])
    assert not missing, (
        f"seed={seed} kills={kills}: {len(missing)} of {len(acked)} acknowledged messages lost:\n"
        f"{detail}"
    )
    # every delivered copy is complete
    for mark, (qid, data) in acked.items():
        for content in delivered[mark]:
            assert content.endswith(data), f"{mark} ({qid}) delivered damaged"
    dups = sum(len(v) - 1 for v in delivered.values())
    print(f"seed={seed} kills={kills} acked={len(acked)} delivered={len(delivered)} duplicates={dups}")
    assert gw.stop() == 0


def test_state_dir_is_locked(gateways):
    """A second daemon on the same state directory refuses to start; the first keeps working."""
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"])
    other = gw.dir / "other.toml"
    other.write_text(make_config(hostname="gw2.test", listen=[f"127.0.0.1:{free_port()}"],
                                 local_domains=["a.test"],
                                 routes=[{"domain": "a.test", "maildir": "maildir"}]))
    p = subprocess.run([str(BIN), "--config", str(other), "--state", str(gw.state)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert p.returncode != 0, "second daemon on a locked state dir did not fail"
    assert "sealgate ready" not in p.stdout, p.stdout
    assert gw.running()
    r = Raw(gw.addr)
    r.expect("EHLO client.test", 250)
    r.expect("QUIT", 221)
