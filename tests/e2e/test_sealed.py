"""The sealed store from outside (F-SEAL): a tampered store, or a data disk moved to another
board (another board secret), is refused with a clear error — the gateway stays up, TLS is off
(its keys are in the store: fail closed), and the queue is intact.
"""

import shutil

from clients import marker
from harness import Raw, free_port, message, send_raw_message


def queued_gateway(gateways):
    closed = free_port("127.0.0.1")
    gw = gateways.simple("gw", hostname="gw.test", local_domains=["a.test"],
                         routes=[{"domain": "a.test", "maildir": "maildir"},
                                 {"domain": "*", "next_hop": [f"127.0.0.1:{closed}"]}],
                         queue={"retry_schedule": ["1h"]})
    r = Raw(gw.addr)
    assert "STARTTLS" in r.cmd("EHLO client.test").text
    mark = marker("sealed")
    rep = send_raw_message(r, "alice@a.test", ["far@b.test"], message(mark, "alice@a.test", "far@b.test"))
    assert rep.code == 250, rep
    r.expect("QUIT", 221)
    gw.stop()
    return gw


def assert_refused_but_alive(gw):
    gw.start()
    gw.wait_log(r"the sealed store cannot be opened")
    r = Raw(gw.addr)
    ehlo = r.cmd("EHLO client.test")
    assert ehlo.code == 250 and "STARTTLS" not in ehlo.text, ehlo
    r.expect("QUIT", 221)
    assert len(gw.queue_list()) == 1, "the queue must survive"
    assert gw.running()


def test_tampered_store_turns_tls_off_and_keeps_the_queue(gateways):
    gw = queued_gateway(gateways)
    for copy in (gw.state / "sealed").glob("store.*"):
        data = bytearray(copy.read_bytes())
        data[len(data) // 2] ^= 0x40
        copy.write_bytes(bytes(data))
    assert_refused_but_alive(gw)
    assert "PRIVATE KEY" not in gw.log() and "BEGIN" not in gw.log()


def test_store_on_another_board_is_refused(gateways, tmp_path):
    gw = queued_gateway(gateways)
    # Another board: the same disk contents, another board secret.
    secret = gw.state.parent / (gw.state.name + ".board-secret")
    assert secret.is_file() and (secret.stat().st_mode & 0o777) == 0o400
    moved = tmp_path / "other-board-secret"
    shutil.move(secret, moved)
    assert_refused_but_alive(gw)
    assert secret.is_file(), "the other board made its own secret"
    assert secret.read_bytes() != moved.read_bytes()
