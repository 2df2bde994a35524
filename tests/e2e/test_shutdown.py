"""SIGTERM: idle sessions are told 421 at once; a message inside DATA may finish and is kept."""

import signal

from clients import marker
from harness import Raw, message, queue_id, wait_until


def test_sigterm_closes_idle_sessions_and_lets_data_finish(gateways):
    gw = gateways.simple("a", local_domains=["a.test"])
    idle = Raw(gw.addr)
    idle.expect("EHLO idle.test", 250)
    busy = Raw(gw.addr)
    busy.expect("EHLO busy.test", 250)
    busy.expect("MAIL FROM:<s@a.test>", 250)
    busy.expect("RCPT TO:<u@a.test>", 250)
    busy.expect("DATA", 354)
    mark = marker("shutdown")
    data = message(mark, "s@a.test", "u@a.test")
    busy.send(data[:40])  # inside DATA when the signal arrives

    gw.proc.send_signal(signal.SIGTERM)
    rep = idle.reply()
    assert rep.code == 421 and "4.3.2" in rep.text, rep
    assert idle.closed_by_peer()

    busy.send(data[40:] + b".\r\n")
    rep = busy.reply()
    assert rep.code == 250, rep
    qid = queue_id(rep.text)
    # With its transaction done the session is idle, so it is closed too.
    rep = busy.reply()
    assert rep.code == 421 and "4.3.2" in rep.text, rep
    wait_until(lambda: gw.proc.poll() is not None, 15, "the daemon to exit after its sessions")
    assert gw.proc.returncode == 0
    assert "result=closed by shutdown" in gw.log()

    # The acknowledged message survives the stop and is delivered after the restart.
    gw.proc = None
    gw.start()
    got = gw.wait_message_with(mark.encode())
    assert qid.encode() in got
