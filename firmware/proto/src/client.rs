//! The SMTP client session machine used for delivery: greeting, EHLO (HELO fallback),
//! STARTTLS, pipelined MAIL/RCPT/DATA with per-recipient results, connection reuse, QUIT.
//!
//! API CONTRACT (the runtime is written against it; keep signatures):
//! - `new` waits for the greeting. `feed` appends server bytes; commands go to `take_output`.
//! - `ClientEvent::StartTls`: the server said `220` to STARTTLS and *no byte followed it*
//!   (bytes after that `220` are response injection → `ClientEvent::Failed`). The runtime runs
//!   the handshake and calls `tls_established`; the machine then sends EHLO again.
//! - `ClientEvent::Ready(caps)`: idle; `send_transaction` may be called (again, for reuse).
//! - `ClientEvent::SendBody`: `354` arrived; the runtime calls `send_body` with the raw message
//!   (CRLF lines; the machine dot-stuffs and appends `.\r\n`).
//! - `ClientEvent::TransactionDone` carries per-recipient replies and the DATA reply; the
//!   machine is `Ready` again afterwards (a fresh `Ready` event follows).
//! - `ClientEvent::Failed` / `Closed`: the session is over.

use std::time::{Duration, Instant};

use crate::reply::Reply;

/// Whether to use STARTTLS on this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTlsMode {
    /// Never send STARTTLS.
    Never,
    /// Use it when the server offers it; otherwise go on in plaintext.
    IfOffered,
    /// Use it; if not offered, fail with `ClientError::TlsNotOffered`.
    Required,
}

#[derive(Debug, Clone)]
pub struct ClientParams {
    /// Name sent with EHLO/HELO.
    pub helo: String,
    pub starttls: StartTlsMode,
    /// Longest reply line accepted (bounded parsing).
    pub max_reply_line: usize,
    /// Most lines in one multi-line reply.
    pub max_reply_lines: usize,
    /// Greeting and command replies (RFC 5321 §4.5.3.2: 5 minutes; MAIL 5, RCPT 5).
    pub command_timeout: Duration,
    /// Final reply after the dot (RFC 5321: 10 minutes).
    pub data_timeout: Duration,
}

impl Default for ClientParams {
    fn default() -> Self {
        ClientParams {
            helo: "localhost".into(),
            starttls: StartTlsMode::IfOffered,
            max_reply_line: 2048,
            max_reply_lines: 128,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
        }
    }
}

/// What the server advertised in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub esmtp: bool,
    pub starttls: bool,
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub enhanced_status_codes: bool,
}

/// A transaction to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub size: u64,
    pub eightbit: bool,
    pub smtputf8: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    StartTls,
    Ready(Capabilities),
    SendBody,
    TransactionDone {
        /// One reply per recipient, in `rcpt_to` order.
        rcpt: Vec<Reply>,
        /// The MAIL reply if it failed (then `rcpt` are copies of it), else `None`.
        mail: Option<Reply>,
        /// The final reply after the body; `None` if no recipient was accepted.
        data: Option<Reply>,
    },
    Failed(ClientError),
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("server greeting refused: {0}")]
    Greeting(Reply),
    #[error("EHLO and HELO refused: {0}")]
    Helo(Reply),
    #[error("TLS required but the server did not offer STARTTLS")]
    TlsNotOffered,
    #[error("STARTTLS refused: {0}")]
    StartTlsRefused(Reply),
    #[error("server sent data after its 220 to STARTTLS (response injection)")]
    ResponseInjection,
    #[error("malformed reply from server: {0}")]
    BadReply(String),
    #[error("reply exceeds limits ({0})")]
    ReplyTooLong(&'static str),
    #[error("server replied when no reply was due")]
    Unexpected,
    #[error("timeout waiting for the server")]
    Timeout,
    #[error("message too large for the server (limit {0} bytes)")]
    TooLarge(u64),
    #[error("server requires SMTPUTF8 support it does not offer")]
    NoSmtpUtf8,
}

/// One SMTP client session.
#[derive(Debug)]
pub struct ClientSession {
    _params: ClientParams,
}

impl ClientSession {
    pub fn new(params: ClientParams, now: Instant) -> Self {
        let _ = (params, now);
        todo!("client session")
    }
    pub fn feed(&mut self, data: &[u8], now: Instant) {
        let _ = (data, now);
        todo!()
    }
    pub fn take_output(&mut self) -> Vec<u8> {
        todo!()
    }
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        todo!()
    }
    pub fn tls_established(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }
    /// Starts a transaction; only valid after `Ready`.
    pub fn send_transaction(&mut self, tx: Transaction, now: Instant) -> Result<(), ClientError> {
        let _ = (tx, now);
        todo!()
    }
    /// The whole message (header + body, CRLF line ends), after `SendBody`.
    pub fn send_body(&mut self, message: &[u8], now: Instant) {
        let _ = (message, now);
        todo!()
    }
    /// Sends `QUIT` (the session then ends with `Closed`).
    pub fn quit(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }
    pub fn deadline(&self) -> Option<Instant> {
        todo!()
    }
    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }
    pub fn is_tls(&self) -> bool {
        todo!()
    }
    pub fn capabilities(&self) -> Option<&Capabilities> {
        todo!()
    }
}
