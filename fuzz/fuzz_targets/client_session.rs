//! Fuzzes `ClientSession`: arbitrary server bytes in arbitrary chunks, with the runtime's side
//! played sensibly (handshake, two transactions, body, QUIT, timeouts). Must never panic, and
//! the session must keep its contract (nothing after the end, one reply per recipient).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sealgate_proto::client::{ClientEvent, ClientParams, ClientSession, StartTlsMode, Transaction};

fuzz_target!(|data: &[u8]| {
    // Byte 0: STARTTLS mode and chunk size; then control byte + chunk, repeated.
    let Some((&c, mut rest)) = data.split_first() else {
        return;
    };
    let mode = match c % 3 {
        0 => StartTlsMode::Never,
        1 => StartTlsMode::IfOffered,
        _ => StartTlsMode::Required,
    };
    let params = ClientParams {
        helo: "gw.test".into(),
        starttls: mode,
        max_reply_line: 128,
        max_reply_lines: 16,
        ..ClientParams::default()
    };
    let mut now = Instant::now();
    let mut s = ClientSession::new(params, now);
    let tx = Transaction {
        mail_from: "s@a.test".into(),
        rcpt_to: vec!["a@b.test".into(), "c@b.test".into()],
        size: 100,
        eightbit: c & 0x10 != 0,
        smtputf8: c & 0x20 != 0,
    };
    let mut transactions = 0;
    let mut ended = false;
    while let Some((&ctl, tail)) = rest.split_first() {
        let n = usize::from(ctl & 0x3f).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        if ctl & 0x40 != 0 {
            now += Duration::from_secs(if ctl & 0x80 != 0 { 700 } else { 1 });
            s.handle_timeout(now);
        }
        s.feed(chunk, now);
        let out = s.take_output();
        assert!(out.len() <= 4096, "unexpected output size");
        while let Some(ev) = s.poll_event() {
            assert!(!ended, "event after the end: {ev:?}");
            match ev {
                ClientEvent::StartTls => s.tls_established(now),
                ClientEvent::Ready(_) if transactions < 2 => {
                    transactions += 1;
                    let _ = s.send_transaction(tx.clone(), now);
                }
                ClientEvent::Ready(_) => s.quit(now),
                ClientEvent::SendBody => s.send_body(b"Subject: x\r\n\r\n.dot\r\nbody", now),
                ClientEvent::TransactionDone { rcpt, mail, data } => {
                    assert_eq!(rcpt.len(), tx.rcpt_to.len());
                    assert!(mail.is_none() || data.is_none());
                }
                ClientEvent::Failed(_) | ClientEvent::Closed => ended = true,
            }
        }
        if ended {
            assert!(s.deadline().is_none());
            assert!(s.take_output().is_empty());
        }
    }
    s.handle_eof();
});
