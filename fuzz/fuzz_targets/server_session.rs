//! Fuzzes `ServerSession`: arbitrary client bytes in arbitrary chunks, with timeouts and runtime
//! answers interleaved, must never panic, and output, body and buffers must stay bounded.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sealgate_proto::server::{
    AuthOffer, AuthResult, ClientInfo, EtrnResult, Event, RcptResult, SenderBinding,
    ServerLimits, ServerParams, ServerSession, StoreResult, TlsInfo,
};

/// Control bytes in the chunk stream (any other value `n` feeds the next `n` bytes).
const ADVANCE_TIME: u8 = 0xFF;
const LOW_SPOOL: u8 = 0xFE;

fuzz_target!(|data: &[u8]| {
    // First byte: who the client is and which limits apply.
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let small = flags & 0x10 != 0;
    let limits = if small {
        ServerLimits {
            max_command_line: 32,
            max_text_line: 16,
            max_message_bytes: 64,
            max_recipients: 2,
            max_errors: 4,
            command_timeout: Duration::from_secs(30),
            data_timeout: Duration::from_secs(20),
            max_buffered_input: 128,
        }
    } else {
        ServerLimits::default()
    };
    let max_body = usize::try_from(limits.max_message_bytes).unwrap_or(usize::MAX);
    let params = Arc::new(ServerParams {
        hostname: "mx.fuzz.test".to_owned(),
        limits,
        local_domains: vec!["local.test".to_owned(), "checked.test".to_owned()],
        validated_domains: vec!["checked.test".to_owned()],
        sender_binding: if flags & 0x80 != 0 {
            SenderBinding::Address
        } else {
            SenderBinding::Domain
        },
    });
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 25));
    let tls = || TlsInfo {
        version: "TLSv1.3".to_owned(),
        cipher: "TLS13_AES_128_GCM_SHA256".to_owned(),
        sni: None,
        verified_client: None,
    };
    let client = ClientInfo {
        peer: addr,
        local: addr,
        relay_allowed: flags & 0x01 != 0,
        starttls_available: flags & 0x02 != 0,
        tls_required: flags & 0x04 != 0,
        implicit_tls: (flags & 0x08 != 0).then(tls),
        auth: match (flags >> 5) & 0x03 {
            0 => AuthOffer::None,
            1 => AuthOffer::Offered,
            _ => AuthOffer::Required,
        },
    };
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = ServerSession::new(params, client, now);
    check_output(&s.take_output());
    let mut answers: u32 = 0;
    let (mut total_in, mut total_out) = (0usize, 0usize);

    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let was_closed = s.is_closed();
        let fed = match op {
            ADVANCE_TIME => {
                now += Duration::from_secs(61);
                s.handle_timeout(now);
                0
            }
            LOW_SPOOL => {
                s.set_spool_free(1000);
                0
            }
            n => {
                let (piece, tail) = rest.split_at(usize::from(n).min(rest.len()));
                rest = tail;
                s.feed(piece, now);
                piece.len()
            }
        };
        // Answer every event as a runtime would, with results varying over the run.
        while let Some(event) = s.poll_event() {
            let body = s.take_body();
            assert!(body.len() <= max_body, "body beyond the size limit");
            answers = answers.wrapping_add(1);
            match event {
                Event::MessageComplete(envelope) => {
                    assert!(!envelope.rcpt_to.is_empty());
                    let result = match answers % 3 {
                        0 => StoreResult::Queued("Q1".to_owned()),
                        1 => StoreResult::NoSpace,
                        _ => StoreResult::Failed,
                    };
                    s.message_stored(result, now);
                }
                Event::Etrn(_) => {
                    let result = match answers % 3 {
                        0 => EtrnResult::Started,
                        1 => EtrnResult::NoMessages,
                        _ => EtrnResult::NotAllowed,
                    };
                    s.etrn_result(result, now);
                }
                Event::StartTls => s.tls_established(tls(), now),
                Event::Authenticate(creds) => {
                    assert!(!creds.login.is_empty() && !creds.password.is_empty());
                    let result = match answers % 3 {
                        0 => AuthResult::Accepted,
                        1 => AuthResult::Rejected,
                        _ => AuthResult::Unavailable,
                    };
                    s.auth_result(result, now);
                }
                Event::CheckRecipient(address) => {
                    assert!(address.to_ascii_lowercase().ends_with("@checked.test"));
                    let result = match answers % 3 {
                        0 => RcptResult::Exists,
                        1 => RcptResult::Unknown,
                        _ => RcptResult::Unavailable,
                    };
                    s.rcpt_result(result, now);
                }
                Event::MessageStart | Event::Close => {}
            }
        }
        assert!(s.body_len() <= max_body, "body beyond the size limit");
        let out = s.take_output();
        if was_closed {
            assert!(out.is_empty(), "output after close");
        }
        // Each input line yields at most one reply (the EHLO reply, ~150 octets for a 7-octet
        // line, is the most per input octet), so output stays proportional to input.
        total_in += fed;
        total_out += out.len();
        assert!(
            total_out <= 64 * total_in + 4096,
            "output out of proportion"
        );
        check_output(&out);
        if let Some(deadline) = s.deadline() {
            assert!(deadline >= t0);
        }
    }
});

/// Every line the server writes is `ddd[ -]text\r\n`, printable ASCII.
fn check_output(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    assert!(out.ends_with(b"\r\n"), "unterminated reply");
    for line in out.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            line.len() >= 3 && line.len() <= 512,
            "reply line length {}",
            line.len()
        );
        assert!(line.iter().take(3).all(u8::is_ascii_digit), "reply code");
        assert!(
            line.iter().all(|&b| b == b' ' || b.is_ascii_graphic()),
            "unprintable reply: {:?}",
            String::from_utf8_lossy(line)
        );
    }
}
