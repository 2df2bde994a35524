//! The `Received:` trace header (RFC 5321 §4.4) and RFC 5322 dates, computed without a clock.

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

/// `Received: from helo ([ip]) by host with ESMTPS (TLSv1.3 cipher) id ID for <rcpt>; date\r\n`,
/// folded to lines under 78 octets.
pub fn received_header(f: &ReceivedFields<'_>) -> String {
    let _ = f;
    todo!()
}

/// RFC 5322 date-time in UTC: `Thu, 26 Nov 2026 17:36:46 +0000`.
pub fn rfc5322_date(unix_time: u64) -> String {
    let _ = unix_time;
    todo!()
}
