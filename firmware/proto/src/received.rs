//! The `Received:` trace header (RFC 5321 §4.4) and RFC 5322 dates, computed without a clock.

use crate::calendar::civil_from_days;

use std::net::IpAddr;

/// Facts for one `Received:` header.
#[derive(Debug, Clone)]
pub struct ReceivedFields<'a> {
    /// Name the client gave in HELO/EHLO.
    pub helo: &'a str,
    pub client_ip: IpAddr,
    /// Our host name.
    pub by: &'a str,
    /// `SMTP`, `ESMTP`, `ESMTPS`, `ESMTPSA`.
    pub protocol: &'a str,
    /// `(version, cipher)` when the session was encrypted.
    pub tls: Option<(&'a str, &'a str)>,
    pub queue_id: &'a str,
    /// The recipient, only when there is exactly one.
    pub for_rcpt: Option<&'a str>,
    /// Seconds since the Unix epoch (UTC).
    pub unix_time: u64,
}

/// Longest HELO name copied into the header; longer names are cut.
pub const MAX_HELO_IN_HEADER: usize = 100;
/// Fold lines before they exceed this many octets (RFC 5322 §2.1.1).
const FOLD_AT: usize = 78;

/// `Received: from helo ([ip]) by host with ESMTPS (TLSv1.3 cipher) id ID for <rcpt>; date\r\n`,
/// folded to lines under 78 octets where words allow (words are never split). The HELO name
/// is client input: only letters, digits and `.-_:[]` are kept as is, other printable
/// characters become `_`, control characters are dropped, and it is cut to
/// [`MAX_HELO_IN_HEADER`]. Other fields lose control characters.
pub fn received_header(f: &ReceivedFields<'_>) -> String {
    let ip = match f.client_ip {
        IpAddr::V4(a) => format!("([{a}])"),
        IpAddr::V6(a) => format!("([IPv6:{a}])"),
    };
    let mut h = Folder::new("Received:");
    h.word("from");
    h.word(&sanitize_helo(f.helo));
    h.word(&ip);
    h.new_line();
    for w in ["by", &clean(f.by), "(Sealgate)", "with", &clean(f.protocol)] {
        h.word(w);
    }
    if let Some((version, cipher)) = f.tls {
        h.word(&format!("({} {})", clean(version), clean(cipher)));
    }
    h.new_line();
    h.word("id");
    let date = rfc5322_date(f.unix_time);
    match f.for_rcpt {
        Some(rcpt) => {
            h.word(&clean(f.queue_id));
            h.new_line();
            h.word("for");
            h.word(&format!("<{}>;", clean(rcpt)));
        }
        None => h.word(&format!("{};", clean(f.queue_id))),
    }
    h.word(&date);
    h.out.push_str("\r\n");
    h.out
}

/// RFC 5322 date-time in UTC: `Thu, 26 Nov 2026 17:36:46 +0000`.
pub fn rfc5322_date(unix_time: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_time / 86_400;
    let secs = unix_time % 86_400;
    let (year, month, day) = civil_from_days(days);
    let weekday = DAYS.get((days % 7) as usize).unwrap_or(&"Thu");
    let month = MONTHS
        .get(month.saturating_sub(1) as usize)
        .unwrap_or(&"Jan");
    format!(
        "{weekday}, {day:02} {month} {year} {:02}:{:02}:{:02} +0000",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Builds a folded header from words.
struct Folder {
    out: String,
    line_len: usize,
    break_next: bool,
}

impl Folder {
    fn new(name: &str) -> Self {
        Folder {
            out: name.to_string(),
            line_len: name.len(),
            break_next: false,
        }
    }

    /// The next word starts a continuation line.
    fn new_line(&mut self) {
        self.break_next = true;
    }

    fn word(&mut self, w: &str) {
        if self.break_next || self.line_len + 1 + w.len() > FOLD_AT {
            self.out.push_str("\r\n\t");
            self.line_len = 1;
        } else {
            self.out.push(' ');
            self.line_len += 1;
        }
        self.break_next = false;
        self.out.push_str(w);
        self.line_len += w.len();
    }
}

/// Control characters (CR, LF, tabs …) removed.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

fn sanitize_helo(helo: &str) -> String {
    let s: String = helo
        .chars()
        .filter(|c| !c.is_control() && !c.is_whitespace())
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_:[]".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(MAX_HELO_IN_HEADER)
        .collect();
    if s.is_empty() { "unknown".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let cases = [
            (0, "Thu, 01 Jan 1970 00:00:00 +0000"),
            (1_798_306_606, "Sat, 26 Dec 2026 17:36:46 +0000"),
            (1_795_714_606, "Thu, 26 Nov 2026 17:36:46 +0000"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (951_868_799, "Tue, 29 Feb 2000 23:59:59 +0000"),
            (951_868_800, "Wed, 01 Mar 2000 00:00:00 +0000"),
            (1_709_164_800, "Thu, 29 Feb 2024 00:00:00 +0000"),
            (4_107_542_400, "Mon, 01 Mar 2100 00:00:00 +0000"), // 2100 is not a leap year
            (4_107_456_000, "Sun, 28 Feb 2100 00:00:00 +0000"),
            (1_704_067_199, "Sun, 31 Dec 2023 23:59:59 +0000"),
            (253_402_300_799, "Fri, 31 Dec 9999 23:59:59 +0000"),
        ];
        for (t, want) in cases {
            assert_eq!(rfc5322_date(t), want, "{t}");
        }
        let _ = rfc5322_date(u64::MAX); // no overflow
    }

    fn fields<'a>(helo: &'a str, rcpt: Option<&'a str>) -> ReceivedFields<'a> {
        ReceivedFields {
            helo,
            client_ip: IpAddr::from([127, 0, 0, 1]),
            by: "gw.example",
            protocol: "ESMTPS",
            tls: Some(("TLSv1.3", "TLS_AES_256_GCM_SHA384")),
            queue_id: "01ABC",
            for_rcpt: rcpt,
            unix_time: 1_795_714_606,
        }
    }

    #[test]
    fn headers() {
        let v6 = ReceivedFields {
            client_ip: "2001:db8::1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            tls: None,
            protocol: "ESMTP",
            ..fields("h", None)
        };
        let cases = [
            (
                fields("client.example", Some("u@example.test")),
                "Received: from client.example ([127.0.0.1])\r\n\
                 \tby gw.example (Sealgate) with ESMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384)\r\n\
                 \tid 01ABC\r\n\
                 \tfor <u@example.test>; Thu, 26 Nov 2026 17:36:46 +0000\r\n",
            ),
            (
                v6,
                "Received: from h ([IPv6:2001:db8::1])\r\n\
                 \tby gw.example (Sealgate) with ESMTP\r\n\
                 \tid 01ABC; Thu, 26 Nov 2026 17:36:46 +0000\r\n",
            ),
            (
                fields("evil\r\nX-Injected: 1 (a) \\ ;é", None),
                "Received: from evilX-Injected:1_a____ ([127.0.0.1])\r\n\
                 \tby gw.example (Sealgate) with ESMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384)\r\n\
                 \tid 01ABC; Thu, 26 Nov 2026 17:36:46 +0000\r\n",
            ),
            (
                fields("", None),
                "Received: from unknown ([127.0.0.1])\r\n\
                 \tby gw.example (Sealgate) with ESMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384)\r\n\
                 \tid 01ABC; Thu, 26 Nov 2026 17:36:46 +0000\r\n",
            ),
        ];
        for (f, want) in cases {
            assert_eq!(received_header(&f), want, "{:?}", f.helo);
        }
    }

    #[test]
    fn long_helo_is_cut_and_folded() {
        let helo = "a".repeat(500);
        let h = received_header(&fields(&helo, Some("u@example.test")));
        assert!(h.starts_with("Received: from\r\n\t"), "{h}");
        let a = "a".repeat(MAX_HELO_IN_HEADER);
        assert!(h.contains(&format!("\t{a}\r\n\t([127.0.0.1])\r\n")), "{h}");
        assert!(h.ends_with("\r\n") && !h.contains("\r\n\r\n"));
        for line in h.split("\r\n") {
            assert!(line.len() <= 998);
        }
    }
}
