//! Fuzzes `LoginDialog` (`sealgate_proto::authclient`): arbitrary server lines must never
//! panic, and no credential byte is ever sent before TLS is up.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use sealgate_proto::authclient::{LoginDialog, Protocol, Step, Verdict};

const LOGIN: &str = "alice@a.test";
const PASSWORD: &[u8] = b"fuzz-secret";

fuzz_target!(|data: &[u8]| {
    // First byte: protocol, STARTTLS or not, and when the runtime reports TLS up.
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let protocol = match flags % 3 {
        0 => Protocol::Imap,
        1 => Protocol::Pop3,
        _ => Protocol::Smtp,
    };
    let starttls = flags & 0x04 != 0;
    let mut d = LoginDialog::new(protocol, starttls, LOGIN, PASSWORD, "gw.fuzz.test");
    let secret = STANDARD.encode([b"\0", LOGIN.as_bytes(), b"\0", PASSWORD].concat());
    let mut tls = !starttls;
    let mut pending_tls = false;
    for line in rest.split(|&b| b == b'\n') {
        let steps = if pending_tls && flags & 0x08 != 0 {
            pending_tls = false;
            tls = true;
            d.tls_established()
        } else {
            d.on_line(line)
        };
        for step in steps {
            match step {
                Step::Send(bytes) if !tls => {
                    let text = String::from_utf8_lossy(&bytes);
                    assert!(!text.contains(&secret), "credentials before TLS");
                    assert!(!bytes.windows(PASSWORD.len()).any(|w| w == PASSWORD));
                }
                Step::StartTls => pending_tls = true,
                Step::Done(Verdict::Accepted) => assert!(tls, "accepted before TLS"),
                Step::Done(Verdict::Unavailable(reason)) => assert!(reason.len() <= 203),
                _ => {}
            }
        }
    }
});
