//! Delivery status notifications (RFC 3464 in a multipart/report, RFC 6522), built as bytes.

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

/// The whole DSN message (headers + multipart body), CRLF line ends, lines ≤ 998 octets.
pub fn build(p: &DsnParams<'_>) -> Vec<u8> {
    let _ = p;
    todo!()
}

/// The header section of a message: everything up to and including the first empty line,
/// bounded to `max` bytes.
pub fn header_section(message: &[u8], max: usize) -> &[u8] {
    let _ = (message, max);
    todo!()
}
