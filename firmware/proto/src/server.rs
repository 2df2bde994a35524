//! The SMTP server session machine (RFC 5321 + PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES,
//! STARTTLS, ETRN, SMTPUTF8): fed bytes and a clock, it emits reply bytes and [`Event`]s.
//!
//! API CONTRACT (the runtime is written against it; keep signatures):
//! - `new` queues the `220` greeting.
//! - `feed` appends input and processes as much as possible; replies accumulate in the output
//!   buffer (`take_output`), events in a queue (`poll_event`).
//! - After `Event::MessageComplete`, `Event::Etrn` the machine stops processing input until the
//!   runtime answers with `message_stored` / `etrn_result`; then it continues with buffered input.
//! - After `Event::StartTls` (the `220` reply is in the output), all buffered input is discarded;
//!   the runtime flushes output, runs the handshake and calls `tls_established` (session reset,
//!   no new greeting), or drops the connection.
//! - After `Event::Close` (output holds the last reply), the runtime flushes and closes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::envelope::Envelope;

/// Bounds for one session. Defaults follow RFC 5321 §4.5.3 and §4.5.3.2.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Longest command line including CRLF (RFC 5321: 512). Longer → `500 5.5.2`.
    pub max_command_line: usize,
    /// Longest text line in DATA including CRLF (RFC 5321: 1000). Longer → message refused `500 5.5.2`.
    pub max_text_line: usize,
    /// Largest message body accepted (SIZE). Larger → `552 5.3.4`.
    pub max_message_bytes: u64,
    /// Recipients per message. More → `452 4.5.3`.
    pub max_recipients: usize,
    /// Errors (4xx/5xx replies to bad commands) before `421 4.7.0` and disconnect.
    pub max_errors: u32,
    /// Waiting for a command (RFC 5321 §4.5.3.2: 5 minutes).
    pub command_timeout: Duration,
    /// Waiting for the next DATA chunk (RFC 5321: 3 minutes per block).
    pub data_timeout: Duration,
    /// Most unprocessed input buffered while the machine waits (pipelined commands).
    pub max_buffered_input: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_command_line: 512,
            max_text_line: 1000,
            max_message_bytes: 52_428_800,
            max_recipients: 100,
            max_errors: 10,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_buffered_input: 64 * 1024,
        }
    }
}

/// What is fixed for every session of a listener (shared, cheap to clone).
#[derive(Debug, Clone)]
pub struct ServerParams {
    /// Our host name for the greeting, EHLO reply and Received header.
    pub hostname: String,
    pub limits: ServerLimits,
    /// Domains we accept mail for from anyone (lowercase, exact match).
    pub local_domains: Vec<String>,
}

/// TLS facts of an established session (for logs, Received header, policy).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`
    pub cipher: String,
    pub sni: Option<String>,
    /// Subject of a client certificate that verified against a pinned CA, if any.
    pub verified_client: Option<String>,
}

/// Facts about this connection that the runtime decided from the addresses and the config.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Client is in `trusted_networks` (may relay to any domain, may use ETRN).
    pub relay_allowed: bool,
    /// STARTTLS may be advertised (a certificate is installed).
    pub starttls_available: bool,
    /// Client is on a forced-TLS list: MAIL/RCPT/DATA/ETRN/AUTH before TLS get `530 5.7.0`.
    pub tls_required: bool,
    /// Set when the connection arrived on an implicit-TLS listener (TLS already up).
    pub implicit_tls: Option<TlsInfo>,
}

impl ClientInfo {
    pub fn ip(&self) -> IpAddr {
        self.peer.ip()
    }
}

/// What the runtime must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `220 Ready to start TLS` is in the output; buffered input has been discarded.
    StartTls,
    /// `354` is queued; body bytes follow (`body_len` / `take_body`).
    MessageStart,
    /// The final dot arrived for a message that passed every check. Drain `take_body`, store
    /// durably, then call `message_stored`.
    MessageComplete(Envelope),
    /// `ETRN domain` from an allowed client; answer with `etrn_result`.
    Etrn(String),
    /// The session is over (QUIT, too many errors, timeout, protocol violation).
    Close,
}

/// The outcome of storing a message, as reported by the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreResult {
    /// On stable storage under this queue id → `250 2.0.0 Ok: queued as ID`.
    Queued(String),
    /// Storage full → `452 4.3.1`.
    NoSpace,
    /// Any other local failure → `451 4.3.0`.
    Failed,
}

/// The outcome of an ETRN request (RFC 1985).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtrnResult {
    /// `250 2.0.0 Queuing for node started`
    Started,
    /// `458 4.0.0 Unable to queue messages for node` (nothing queued or not allowed now)
    NoMessages,
    /// `459 4.0.0 Node not allowed` (domain not served)
    NotAllowed,
}

/// One SMTP server session.
#[derive(Debug)]
pub struct ServerSession {
    _params: Arc<ServerParams>,
}

impl ServerSession {
    pub fn new(params: Arc<ServerParams>, client: ClientInfo, now: Instant) -> Self {
        let _ = (client, now);
        todo!("server session")
    }
    /// Appends `data` and processes it. Returns immediately if the machine is waiting.
    pub fn feed(&mut self, data: &[u8], now: Instant) {
        let _ = (data, now);
        todo!()
    }
    /// Bytes to send to the client, in order. Empties the buffer.
    pub fn take_output(&mut self) -> Vec<u8> {
        todo!()
    }
    pub fn has_output(&self) -> bool {
        todo!()
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        todo!()
    }
    /// Unstuffed body bytes received so far for the current message.
    pub fn body_len(&self) -> usize {
        todo!()
    }
    /// Takes the body bytes received so far (the runtime spills large bodies to disk).
    pub fn take_body(&mut self) -> Vec<u8> {
        todo!()
    }
    pub fn message_stored(&mut self, result: StoreResult, now: Instant) {
        let _ = (result, now);
        todo!()
    }
    pub fn etrn_result(&mut self, result: EtrnResult, now: Instant) {
        let _ = (result, now);
        todo!()
    }
    pub fn tls_established(&mut self, info: TlsInfo, now: Instant) {
        let _ = (info, now);
        todo!()
    }
    /// Free spool bytes as last measured; below what a message needs, MAIL/DATA get `452 4.3.1`.
    pub fn set_spool_free(&mut self, bytes: u64) {
        let _ = bytes;
        todo!()
    }
    /// When `handle_timeout` must be called if no input arrives first.
    pub fn deadline(&self) -> Option<Instant> {
        todo!()
    }
    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }
    /// False while an event awaits the runtime's answer, during STARTTLS, or once closed.
    pub fn wants_input(&self) -> bool {
        todo!()
    }
    pub fn is_closed(&self) -> bool {
        todo!()
    }
    /// The HELO/EHLO name given, if any.
    pub fn helo(&self) -> Option<&str> {
        todo!()
    }
    /// `SMTP`, `ESMTP`, `ESMTPS` or `ESMTPSA`, for the Received header.
    pub fn protocol(&self) -> &'static str {
        todo!()
    }
    pub fn tls(&self) -> Option<&TlsInfo> {
        todo!()
    }
}
