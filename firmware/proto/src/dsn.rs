//! Delivery status notifications (RFC 3464 in a multipart/report, RFC 6522), built as bytes.
//!
//! The DSN is 7-bit: text from remote servers, addresses and the returned header section have
//! control characters removed and non-ASCII characters replaced by `?`; long field values are
//! folded and cut so that every line stays within 998 octets.

use std::fmt::Write as _;

use crate::received::rfc5322_date;

/// What happened to one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
}

#[derive(Debug, Clone)]
pub struct RecipientStatus {
    pub recipient: String,
    pub action: Action,
    /// Enhanced status, e.g. `5.1.1`.
    pub status: String,
    /// The remote server's reply, or our own explanation.
    pub diagnostic: String,
    /// The server that gave it, if any.
    pub remote_mta: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DsnParams<'a> {
    /// Our host name (Reporting-MTA, From: MAILER-DAEMON@…).
    pub reporting_mta: &'a str,
    /// The original sender: the DSN goes to this address.
    pub to: &'a str,
    pub queue_id: &'a str,
    /// Unix seconds when the original arrived, and now.
    pub arrival_time: u64,
    pub now: u64,
    pub recipients: &'a [RecipientStatus],
    /// Header section of the original message (returned as text/rfc822-headers).
    pub original_headers: &'a [u8],
    /// Unique Message-ID for the DSN itself (without brackets).
    pub message_id: &'a str,
}

/// Longest field value (diagnostic, address) copied into the DSN; longer ones are cut.
pub const MAX_FIELD: usize = 900;
/// Longest line of the returned header section before it is broken.
const MAX_LINE: usize = 998;

/// The whole DSN message (headers + multipart body), CRLF line ends, lines ≤ 998 octets.
pub fn build(p: &DsnParams<'_>) -> Vec<u8> {
    let any_failed = p.recipients.iter().any(|r| r.action == Action::Failed);
    let host = ascii(p.reporting_mta);
    let headers = returned_headers(p.original_headers);
    let text = explanation(p, &host, any_failed);
    let status = delivery_status(p, &host);
    let boundary = boundary(p, &[&headers, text.as_bytes(), status.as_bytes()]);

    let mut m = String::new();
    field(
        &mut m,
        "From",
        &format!("Mail Delivery System <MAILER-DAEMON@{host}>"),
    );
    field(&mut m, "To", &format!("<{}>", ascii(p.to)));
    let subject = if any_failed {
        "Undelivered Mail Returned to Sender"
    } else {
        "Delayed Mail (still being retried)"
    };
    field(&mut m, "Subject", subject);
    field(&mut m, "Date", &rfc5322_date(p.now));
    field(&mut m, "Message-ID", &format!("<{}>", ascii(p.message_id)));
    field(&mut m, "MIME-Version", "1.0");
    field(
        &mut m,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    field(&mut m, "Auto-Submitted", "auto-replied");
    m.push_str("\r\nThis is a MIME-encapsulated message.\r\n");
    let _ = write!(m, "\r\n--{boundary}\r\n");
    m.push_str("Content-Type: text/plain; charset=us-ascii\r\n");
    m.push_str("Content-Description: Notification\r\n\r\n");
    m.push_str(&text);
    let _ = write!(m, "\r\n--{boundary}\r\n");
    m.push_str("Content-Type: message/delivery-status\r\n");
    m.push_str("Content-Description: Delivery report\r\n\r\n");
    m.push_str(&status);
    let _ = write!(m, "\r\n--{boundary}\r\n");
    m.push_str("Content-Type: text/rfc822-headers\r\n");
    m.push_str("Content-Description: Undelivered Message Headers\r\n\r\n");
    let mut out = m.into_bytes();
    out.extend_from_slice(&headers);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The header section of a message: everything up to and including the first empty line,
/// bounded to `max` bytes (cut after the last complete line that fits, if there is one).
pub fn header_section(message: &[u8], max: usize) -> &[u8] {
    let mut end = message.len();
    let mut pos = 0;
    while let Some(nl) = message
        .get(pos..)
        .and_then(|m| m.iter().position(|&b| b == b'\n'))
    {
        let line = message.get(pos..pos + nl).unwrap_or_default();
        pos += nl + 1;
        if line.is_empty() || line == b"\r" {
            end = pos;
            break;
        }
    }
    if end > max {
        let head = message.get(..max).unwrap_or(message);
        end = match head.iter().rposition(|&b| b == b'\n') {
            Some(nl) => nl + 1,
            None => max,
        };
    }
    message.get(..end).unwrap_or(message)
}

/// The human-readable part.
fn explanation(p: &DsnParams<'_>, host: &str, any_failed: bool) -> String {
    let mut t = format!("This is the mail system at host {host}.\r\n\r\n");
    t.push_str(if any_failed {
        "I'm sorry to have to inform you that your message could not\r\n\
         be delivered to one or more recipients.\r\n"
    } else {
        "Your message could not be delivered yet to one or more recipients.\r\n\
         Delivery will be retried; no action is required from you.\r\n"
    });
    let _ = write!(t, "Queue ID: {}\r\n", ascii(p.queue_id));
    for r in p.recipients {
        let what = match r.action {
            Action::Failed => "delivery failed",
            Action::Delayed => "delivery delayed",
        };
        let by = match &r.remote_mta {
            Some(mta) => format!("; {} said:", ascii(mta)),
            None => ":".into(),
        };
        t.push_str("\r\n");
        wrap(
            &mut t,
            "",
            &format!("<{}>: {what}{by}", ascii(&r.recipient)),
        );
        wrap(&mut t, "    ", &ascii(&r.diagnostic));
    }
    t
}

/// The machine-readable part (RFC 3464 §2.2 and §2.3).
fn delivery_status(p: &DsnParams<'_>, host: &str) -> String {
    let mut s = String::new();
    field(&mut s, "Reporting-MTA", &format!("dns; {host}"));
    field(&mut s, "X-Queue-ID", &ascii(p.queue_id));
    field(&mut s, "Arrival-Date", &rfc5322_date(p.arrival_time));
    for r in p.recipients {
        s.push_str("\r\n");
        field(
            &mut s,
            "Final-Recipient",
            &format!("rfc822; {}", ascii(&r.recipient)),
        );
        let action = match r.action {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        };
        field(&mut s, "Action", action);
        field(&mut s, "Status", &ascii(&r.status));
        if let Some(mta) = &r.remote_mta {
            field(&mut s, "Remote-MTA", &format!("dns; {}", ascii(mta)));
        }
        field(
            &mut s,
            "Diagnostic-Code",
            &format!("smtp; {}", ascii(&r.diagnostic)),
        );
        field(&mut s, "Last-Attempt-Date", &rfc5322_date(p.now));
    }
    s
}

/// A boundary that occurs in none of the parts.
fn boundary(p: &DsnParams<'_>, parts: &[&[u8]]) -> String {
    let id: String = p
        .queue_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    let mut n = 0u64;
    loop {
        let b = format!("=_sealgate_{id}_{}_{n}", p.now);
        if !parts.iter().any(|part| contains(part, b.as_bytes())) {
            return b;
        }
        n += 1;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `Name: value\r\n`, folded at spaces before 78 octets where possible.
fn field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    let mut len = name.len() + 1;
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        if len + 1 + word.len() > 78 && len > name.len() + 1 {
            out.push_str("\r\n");
            len = 0;
        }
        out.push(' ');
        out.push_str(word);
        len += 1 + word.len();
    }
    out.push_str("\r\n");
}

/// Text wrapped at spaces to about 76 columns, each line indented.
fn wrap(out: &mut String, indent: &str, text: &str) {
    let mut len = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if len > 0 && len + 1 + word.len() > 76 {
            out.push_str("\r\n");
            len = 0;
        }
        if len == 0 {
            out.push_str(indent);
            len = indent.len();
        } else {
            out.push(' ');
            len += 1;
        }
        out.push_str(word);
        len += word.len();
    }
    if len > 0 {
        out.push_str("\r\n");
    }
}

/// One-line 7-bit text: control characters become spaces, non-ASCII `?`, cut to [`MAX_FIELD`].
fn ascii(s: &str) -> String {
    s.chars()
        .take(MAX_FIELD)
        .map(|c| match c {
            c if c.is_control() => ' ',
            c if !c.is_ascii() => '?',
            c => c,
        })
        .collect()
}

/// The original header section as 7-bit CRLF lines of at most 998 octets (longer lines are
/// broken into continuation lines), NULs dropped, non-ASCII bytes as `?`.
fn returned_headers(headers: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers.len() + 2);
    let mut line_len = 0;
    let mut bytes = headers.iter().peekable();
    while let Some(&b) = bytes.next() {
        match b {
            b'\r' | b'\n' => {
                if b == b'\r' {
                    bytes.next_if_eq(&&b'\n');
                }
                out.extend_from_slice(b"\r\n");
                line_len = 0;
                continue;
            }
            0 => continue,
            _ if line_len >= MAX_LINE - 1 => {
                out.extend_from_slice(b"\r\n ");
                line_len = 1;
            }
            _ => {}
        }
        out.push(if b.is_ascii() { b } else { b'?' });
        line_len += 1;
    }
    if line_len > 0 {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(
        addr: &str,
        action: Action,
        status: &str,
        diag: &str,
        mta: Option<&str>,
    ) -> RecipientStatus {
        RecipientStatus {
            recipient: addr.into(),
            action,
            status: status.into(),
            diagnostic: diag.into(),
            remote_mta: mta.map(String::from),
        }
    }

    fn params<'a>(recipients: &'a [RecipientStatus], headers: &'a [u8]) -> DsnParams<'a> {
        DsnParams {
            reporting_mta: "gw.example",
            to: "sender@a.test",
            queue_id: "01ABC",
            arrival_time: 1_795_714_606,
            now: 1_795_800_000,
            recipients,
            original_headers: headers,
            message_id: "dsn.01ABC@gw.example",
        }
    }

    type Fields = Vec<(String, String)>;

    /// Splits a message at its first empty line into (header fields, body).
    fn split(msg: &str) -> (Fields, &str) {
        let (head, body) = msg.split_once("\r\n\r\n").unwrap_or((msg, ""));
        let mut fields: Fields = Vec::new();
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    last.1.push_str(line);
                }
            } else if let Some((n, v)) = line.split_once(':') {
                fields.push((n.to_string(), v.trim().to_string()));
            }
        }
        (fields, body)
    }

    fn get<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Parses a DSN: top-level fields and the three parts (fields, body).
    fn parse(dsn: &[u8]) -> (Fields, Vec<(Fields, String)>) {
        let text = std::str::from_utf8(dsn).unwrap_or_default();
        assert!(dsn.is_ascii());
        for line in text.split_terminator("\r\n") {
            assert!(
                line.len() <= 998 && !line.contains(['\r', '\n']),
                "{line:?}"
            );
        }
        assert!(text.ends_with("\r\n"));
        let (fields, body) = split(text);
        let ct = get(&fields, "Content-Type").join("");
        assert!(
            ct.starts_with("multipart/report; report-type=delivery-status;"),
            "{ct}"
        );
        let boundary = ct
            .split("boundary=\"")
            .nth(1)
            .and_then(|b| b.strip_suffix('"'));
        let boundary = boundary.unwrap_or_default();
        assert!(!boundary.is_empty() && boundary.len() <= 70);
        let delim = format!("\r\n--{boundary}");
        assert_eq!(body.matches(&delim).count(), 4, "3 parts + close");
        let close = format!("{delim}--\r\n");
        assert!(body.ends_with(&close));
        let parts = body
            .strip_suffix(&close)
            .unwrap_or_default()
            .split(&delim)
            .skip(1)
            .map(|p| {
                let (f, b) = split(p.strip_prefix("\r\n").unwrap_or(p));
                (f, b.to_string())
            })
            .collect();
        (fields, parts)
    }

    #[test]
    fn structure() {
        let recipients = [
            rcpt(
                "u@b.test",
                Action::Failed,
                "5.1.1",
                "550 5.1.1 <u@b.test>: no such user",
                Some("mx.b.test"),
            ),
            rcpt(
                "v@c.test",
                Action::Delayed,
                "4.4.1",
                "connection refused",
                None,
            ),
        ];
        let headers = b"From: s@a.test\r\nSubject: hi\r\n\r\n";
        let dsn = build(&params(&recipients, headers));
        let (fields, parts) = parse(&dsn);
        let cases = [
            ("From", "Mail Delivery System <MAILER-DAEMON@gw.example>"),
            ("To", "<sender@a.test>"),
            ("Subject", "Undelivered Mail Returned to Sender"),
            ("Date", "Fri, 27 Nov 2026 17:20:00 +0000"),
            ("Message-ID", "<dsn.01ABC@gw.example>"),
            ("MIME-Version", "1.0"),
            ("Auto-Submitted", "auto-replied"),
        ];
        for (name, want) in cases {
            assert_eq!(get(&fields, name), [want], "{name}");
        }
        let [(f1, text), (f2, status), (f3, orig)] = &parts[..] else {
            panic!("want 3 parts, got {}", parts.len());
        };
        assert_eq!(get(f1, "Content-Type"), ["text/plain; charset=us-ascii"]);
        assert!(text.contains("<u@b.test>: delivery failed; mx.b.test said:\r\n    550 5.1.1"));
        assert!(text.contains("<v@c.test>: delivery delayed:\r\n    connection refused\r\n"));
        assert_eq!(get(f2, "Content-Type"), ["message/delivery-status"]);
        let mut groups = status
            .split("\r\n\r\n")
            .map(|g| split(&format!("{g}\r\n\r\n")).0);
        let msg = groups.next().unwrap_or_default();
        assert_eq!(get(&msg, "Reporting-MTA"), ["dns; gw.example"]);
        assert_eq!(
            get(&msg, "Arrival-Date"),
            ["Thu, 26 Nov 2026 17:36:46 +0000"]
        );
        let want = [
            [
                ("Final-Recipient", "rfc822; u@b.test"),
                ("Action", "failed"),
                ("Status", "5.1.1"),
                ("Remote-MTA", "dns; mx.b.test"),
                (
                    "Diagnostic-Code",
                    "smtp; 550 5.1.1 <u@b.test>: no such user",
                ),
            ],
            [
                ("Final-Recipient", "rfc822; v@c.test"),
                ("Action", "delayed"),
                ("Status", "4.4.1"),
                ("Remote-MTA", ""),
                ("Diagnostic-Code", "smtp; connection refused"),
            ],
        ];
        for (want, got) in want.iter().zip(groups.by_ref()) {
            for (name, value) in want {
                let v: &[&str] = if value.is_empty() { &[] } else { &[value] };
                assert_eq!(get(&got, name), v, "{name}");
            }
        }
        assert!(groups.next().is_none());
        assert_eq!(get(f3, "Content-Type"), ["text/rfc822-headers"]);
        assert!(orig.starts_with("From: s@a.test\r\nSubject: hi\r\n"));
    }

    #[test]
    fn hostile_input() {
        let long = "x".repeat(5000);
        let diag = format!("550 {long} \r\nInjected: yes é");
        let recipients = [rcpt(
            &format!("u@b.test\r\nBcc: x{long}"),
            Action::Delayed,
            "4.0.0",
            &diag,
            Some(&long),
        )];
        // The original headers contain the first boundary we would pick, a long line, 8-bit.
        let headers =
            format!("X: --=_sealgate_01ABC_1795800000_0\nLong: {long}\r\nUtf: \u{e9}\0\r\n");
        let dsn = build(&params(&recipients, headers.as_bytes()));
        let (fields, parts) = parse(&dsn);
        assert_eq!(
            get(&fields, "Subject"),
            ["Delayed Mail (still being retried)"]
        );
        assert!(get(&fields, "Content-Type")[0].contains("_1795800000_1\""));
        assert_eq!(parts.len(), 3);
        let text = String::from_utf8_lossy(&dsn);
        assert!(!text.contains("\r\nBcc:") && !text.contains("\r\nInjected:"));
        assert!(parts[2].1.contains("Utf: ??\r\n"));
    }

    #[test]
    fn header_sections() {
        let cases: [(&[u8], usize, &[u8]); 7] = [
            (
                b"A: 1\r\nB: 2\r\n\r\nbody\r\n",
                100,
                b"A: 1\r\nB: 2\r\n\r\n",
            ),
            (b"A: 1\nB: 2\n\nbody\n", 100, b"A: 1\nB: 2\n\n"),
            (b"\r\nbody", 100, b"\r\n"),
            (b"A: 1\r\nB: 2", 100, b"A: 1\r\nB: 2"),
            (b"A: 1\r\nB: 2\r\n\r\nbody", 10, b"A: 1\r\n"),
            (b"A: 12345678", 5, b"A: 12"),
            (b"", 5, b""),
        ];
        for (msg, max, want) in cases {
            assert_eq!(
                header_section(msg, max),
                want,
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
    }
}
