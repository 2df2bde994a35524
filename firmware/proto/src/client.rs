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
//!
//! Decisions beyond the contract:
//! - A transaction without a body (MAIL refused, or no recipient accepted) is answered with
//!   `TransactionDone`, then `RSET` is sent and `Ready` follows its `250`.
//! - If a pipelined `DATA` gets `354` although no recipient was accepted, the machine reports
//!   `TransactionDone` (so per-recipient replies are not lost) and then `Failed(Unexpected)`
//!   instead of sending an empty message (RFC 2920 would send a lone dot).
//! - A `421` (service closing) during a transaction or to `RSET` ends the session with
//!   `Failed(Closing)`; to the final dot it first completes the transaction.
//! - `SIZE` without a number (or `SIZE 0`) means "no fixed limit": `caps.size == Some(0)`.
//! - `BODY=8BITMIME` is sent only when offered; an 8-bit message to a server without 8BITMIME
//!   is sent as is (no downgrade). Control characters are removed from addresses.
//! - The body's line ends are normalised to CRLF (bare CR or LF), then dot-stuffed: no
//!   end-of-data sequence can be smuggled in.
//! - No deadline while the runtime runs the TLS handshake or prepares the body.
//! - `handle_eof` (extra) reports the server closing the connection.
//! - `awaiting` and `last_reply` (extra, for error messages): which reply is due, and the last
//!   reply received with the command it answered (e.g. the reply behind `Failed(BadReply)`).

use std::time::{Duration, Instant};

use crate::reply::{Reply, ReplyError, ReplyParser};

/// Whether to use STARTTLS on this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// The command (or greeting) whose reply the session is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Mail,
    Rcpt,
    /// The `354` (or refusal) to `DATA`.
    Data,
    /// The final reply after the body's dot.
    DataEnd,
    Rset,
    Quit,
}

impl Awaiting {
    /// A short name for messages: `greeting`, `EHLO`, `HELO`, `STARTTLS`, `MAIL`, `RCPT`,
    /// `DATA`, `end of data`, `RSET`, `QUIT`.
    pub fn name(self) -> &'static str {
        match self {
            Awaiting::Greeting => "greeting",
            Awaiting::Ehlo => "EHLO",
            Awaiting::Helo => "HELO",
            Awaiting::StartTls => "STARTTLS",
            Awaiting::Mail => "MAIL",
            Awaiting::Rcpt => "RCPT",
            Awaiting::Data => "DATA",
            Awaiting::DataEnd => "end of data",
            Awaiting::Rset => "RSET",
            Awaiting::Quit => "QUIT",
        }
    }
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
    /// `421`: the server is closing the session (RFC 5321 §3.8).
    #[error("server is closing the session: {0}")]
    Closing(Reply),
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

impl From<ReplyError> for ClientError {
    fn from(e: ReplyError) -> Self {
        match e {
            ReplyError::LineTooLong => ClientError::ReplyTooLong("line length"),
            ReplyError::TooManyLines => ClientError::ReplyTooLong("line count"),
            ReplyError::BadCode | ReplyError::InconsistentCode => {
                ClientError::BadReply(e.to_string())
            }
        }
    }
}

/// Where the session is; each state says which reply (if any) is due.
#[derive(Debug)]
enum State {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    /// `StartTls` emitted; the runtime runs the handshake. Any input now is injection.
    Handshake,
    Ready,
    /// MAIL/RCPT/DATA replies due.
    Envelope(Pending),
    /// `SendBody` emitted; waiting for `send_body`.
    Body(Pending),
    /// The final reply after the dot is due.
    DataEnd(Pending),
    Rset,
    Quit,
    Done,
}

/// A transaction in progress.
#[derive(Debug)]
struct Pending {
    tx: Transaction,
    pipelined: bool,
    mail: Option<Reply>,
    rcpt: Vec<Reply>,
}

impl Pending {
    fn mail_ok(&self) -> bool {
        self.mail.as_ref().is_some_and(is_success)
    }
    fn any_rcpt_ok(&self) -> bool {
        self.mail_ok() && self.rcpt.iter().any(is_success)
    }
    /// The result; if MAIL failed, every recipient gets its reply.
    fn done(self, data: Option<Reply>) -> ClientEvent {
        match self.mail {
            Some(m) if !is_success(&m) => ClientEvent::TransactionDone {
                rcpt: vec![m.clone(); self.tx.rcpt_to.len()],
                mail: Some(m),
                data: None,
            },
            _ => ClientEvent::TransactionDone {
                rcpt: self.rcpt,
                mail: None,
                data,
            },
        }
    }
}

fn is_success(r: &Reply) -> bool {
    r.code / 100 == 2
}

/// One SMTP client session.
#[derive(Debug)]
pub struct ClientSession {
    params: ClientParams,
    parser: ReplyParser,
    state: State,
    tls: bool,
    caps: Option<Capabilities>,
    out: Vec<u8>,
    events: std::collections::VecDeque<ClientEvent>,
    deadline: Option<Instant>,
    /// The last complete reply and what was awaited when it arrived.
    last: Option<(Option<Awaiting>, Reply)>,
    /// Dot-stuffing state of a body sent in pieces.
    stuffer: DotStuffer,
}

impl ClientSession {
    pub fn new(params: ClientParams, now: Instant) -> Self {
        ClientSession {
            parser: ReplyParser::new(params.max_reply_line, params.max_reply_lines),
            deadline: Some(now + params.command_timeout),
            params,
            state: State::Greeting,
            tls: false,
            caps: None,
            out: Vec::new(),
            events: Default::default(),
            last: None,
            stuffer: DotStuffer::default(),
        }
    }

    pub fn feed(&mut self, mut data: &[u8], now: Instant) {
        while !data.is_empty() {
            match self.state {
                State::Done => return,
                State::Handshake => return self.fail(ClientError::ResponseInjection),
                _ => {}
            }
            match self.parser.parse(&mut data) {
                Ok(Some(reply)) => self.on_reply(reply, !data.is_empty(), now),
                Ok(None) => {}
                Err(e) => self.fail(e.into()),
            }
        }
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    pub fn tls_established(&mut self, now: Instant) {
        if matches!(self.state, State::Handshake) {
            self.tls = true;
            self.caps = None;
            self.ehlo(now);
        }
    }

    /// Starts a transaction; only valid after `Ready` (else `Err(Unexpected)`).
    pub fn send_transaction(&mut self, tx: Transaction, now: Instant) -> Result<(), ClientError> {
        let (State::Ready, Some(caps)) = (&self.state, &self.caps) else {
            return Err(ClientError::Unexpected);
        };
        if let Some(limit) = caps.size.filter(|&l| l > 0 && tx.size > l) {
            return Err(ClientError::TooLarge(limit));
        }
        if tx.smtputf8 && !caps.smtputf8 {
            return Err(ClientError::NoSmtpUtf8);
        }
        let mut mail = format!("MAIL FROM:<{}>", clean(&tx.mail_from));
        if caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", tx.size));
        }
        if tx.eightbit && caps.eightbitmime {
            mail.push_str(" BODY=8BITMIME");
        }
        if tx.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        let pipelined = caps.pipelining;
        self.command(&mail, now);
        if pipelined {
            for r in &tx.rcpt_to {
                self.command(&format!("RCPT TO:<{}>", clean(r)), now);
            }
            if !tx.rcpt_to.is_empty() {
                self.command("DATA", now);
            }
        }
        self.state = State::Envelope(Pending {
            tx,
            pipelined,
            mail: None,
            rcpt: Vec::new(),
        });
        Ok(())
    }

    /// The whole message (header + body, CRLF line ends), after `SendBody`.
    pub fn send_body(&mut self, message: &[u8], now: Instant) {
        self.send_body_piece(message, true, now);
    }

    /// The message in pieces after `SendBody`, in order, `last` on the final one (which may be
    /// empty): each piece is dot-stuffed as it comes (line ends normalised across pieces too),
    /// and the terminator follows the last. The runtime takes the output after each piece, so
    /// no more than one piece is ever buffered here.
    pub fn send_body_piece(&mut self, piece: &[u8], last: bool, now: Instant) {
        if !matches!(self.state, State::Body(_)) {
            return; // no body due: ignored
        }
        self.stuffer.push(piece, &mut self.out);
        if !last {
            return;
        }
        self.stuffer.finish(&mut self.out);
        if let State::Body(p) = std::mem::replace(&mut self.state, State::Done) {
            self.deadline = Some(now + self.params.data_timeout);
            self.state = State::DataEnd(p);
        }
    }

    /// Sends `QUIT` (the session then ends with `Closed`).
    pub fn quit(&mut self, now: Instant) {
        if !matches!(self.state, State::Done | State::Quit) {
            self.command("QUIT", now);
            self.state = State::Quit;
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) {
            match self.state {
                State::Quit => self.close(),
                _ => self.fail(ClientError::Timeout),
            }
        }
    }

    /// The server closed the connection: `Closed` while quitting, else `Failed`.
    pub fn handle_eof(&mut self) {
        match self.state {
            State::Done => {}
            State::Quit => self.close(),
            _ => self.fail(ClientError::BadReply(
                "connection closed by the server".into(),
            )),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn capabilities(&self) -> Option<&Capabilities> {
        self.caps.as_ref()
    }

    /// The reply due now; `None` while none is (idle, body or TLS handshake pending, over).
    pub fn awaiting(&self) -> Option<Awaiting> {
        match &self.state {
            State::Greeting => Some(Awaiting::Greeting),
            State::Ehlo => Some(Awaiting::Ehlo),
            State::Helo => Some(Awaiting::Helo),
            State::StartTls => Some(Awaiting::StartTls),
            State::Envelope(p) if p.mail.is_none() => Some(Awaiting::Mail),
            State::Envelope(p) if p.rcpt.len() < p.tx.rcpt_to.len() => Some(Awaiting::Rcpt),
            State::Envelope(_) => Some(Awaiting::Data),
            State::DataEnd(_) => Some(Awaiting::DataEnd),
            State::Rset => Some(Awaiting::Rset),
            State::Quit => Some(Awaiting::Quit),
            State::Handshake | State::Ready | State::Body(_) | State::Done => None,
        }
    }

    /// The last complete reply from the server, with what it answered (`None`: it was not
    /// due). Kept until the next reply; names the reply behind a `Failed(BadReply)`.
    pub fn last_reply(&self) -> Option<(Option<Awaiting>, &Reply)> {
        self.last.as_ref().map(|(awaited, reply)| (*awaited, reply))
    }

    fn command(&mut self, line: &str, now: Instant) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.deadline = Some(now + self.params.command_timeout);
    }

    fn ehlo(&mut self, now: Instant) {
        let helo = format!("EHLO {}", clean(&self.params.helo));
        self.command(&helo, now);
        self.state = State::Ehlo;
    }

    fn fail(&mut self, e: ClientError) {
        self.state = State::Done;
        self.deadline = None;
        self.events.push_back(ClientEvent::Failed(e));
    }

    fn close(&mut self) {
        self.state = State::Done;
        self.deadline = None;
        self.events.push_back(ClientEvent::Closed);
    }

    fn ready(&mut self) {
        self.state = State::Ready;
        self.deadline = None;
        let caps = self.caps.clone().unwrap_or_default();
        self.events.push_back(ClientEvent::Ready(caps));
    }

    /// One complete reply; `more` says whether further bytes followed it in this feed.
    fn on_reply(&mut self, reply: Reply, more: bool, now: Instant) {
        self.last = Some((self.awaiting(), reply.clone()));
        let bad = |r: &Reply| ClientError::BadReply(r.one_line());
        match std::mem::replace(&mut self.state, State::Done) {
            State::Greeting if reply.code == 220 => self.ehlo(now),
            State::Greeting => self.fail(ClientError::Greeting(reply)),
            State::Ehlo if reply.code == 250 => self.caps_known(parse_caps(&reply), now),
            State::Ehlo if reply.is_permanent() => {
                let helo = format!("HELO {}", clean(&self.params.helo));
                self.command(&helo, now);
                self.state = State::Helo;
            }
            State::Helo if reply.code == 250 => self.caps_known(Capabilities::default(), now),
            State::Ehlo | State::Helo => self.fail(ClientError::Helo(reply)),
            State::StartTls if reply.code != 220 => self.fail(ClientError::StartTlsRefused(reply)),
            State::StartTls if more || !self.parser.is_idle() => {
                self.fail(ClientError::ResponseInjection)
            }
            State::StartTls => {
                self.state = State::Handshake;
                self.deadline = None;
                self.events.push_back(ClientEvent::StartTls);
            }
            State::Envelope(p) => self.envelope_reply(p, reply, now),
            State::DataEnd(p) => {
                let closing = reply.code == 421;
                if !matches!(reply.code / 100, 2 | 4 | 5) {
                    return self.fail(bad(&reply));
                }
                self.events.push_back(p.done(Some(reply.clone())));
                if closing {
                    self.fail(ClientError::Closing(reply));
                } else {
                    self.ready();
                }
            }
            State::Rset if is_success(&reply) => self.ready(),
            State::Rset if reply.code == 421 => self.fail(ClientError::Closing(reply)),
            State::Rset => self.fail(bad(&reply)),
            State::Quit if reply.code == 221 => self.close(),
            State::Quit => self.state = State::Quit,
            State::Ready | State::Body(_) | State::Handshake | State::Done => {
                self.fail(ClientError::Unexpected)
            }
        }
    }

    /// EHLO/HELO answered: STARTTLS if wanted and possible, else `Ready`.
    fn caps_known(&mut self, caps: Capabilities, now: Instant) {
        let offered = caps.starttls;
        self.caps = Some(caps);
        match self.params.starttls {
            _ if self.tls => self.ready(),
            StartTlsMode::Required if !offered => {
                // Say goodbye politely; the caller defers without waiting for the reply.
                self.command("QUIT", now);
                self.fail(ClientError::TlsNotOffered);
            }
            StartTlsMode::Required | StartTlsMode::IfOffered if offered => {
                self.command("STARTTLS", now);
                self.state = State::StartTls;
            }
            _ => self.ready(),
        }
    }

    /// A reply to MAIL, RCPT or DATA (in that order).
    fn envelope_reply(&mut self, mut p: Pending, reply: Reply, now: Instant) {
        if reply.code == 421 {
            return self.fail(ClientError::Closing(reply));
        }
        let n = p.tx.rcpt_to.len();
        if p.mail.is_none() {
            p.mail = Some(reply);
            if !p.pipelined
                && p.mail_ok()
                && let Some(r) = p.tx.rcpt_to.first()
            {
                let cmd = format!("RCPT TO:<{}>", clean(r));
                self.command(&cmd, now);
            }
        } else if p.rcpt.len() < n {
            p.rcpt.push(reply);
            if !p.pipelined {
                match p.tx.rcpt_to.get(p.rcpt.len()) {
                    Some(r) => {
                        let cmd = format!("RCPT TO:<{}>", clean(r));
                        self.command(&cmd, now);
                    }
                    None if p.any_rcpt_ok() => self.command("DATA", now),
                    None => {}
                }
            }
        } else if reply.code == 354 && p.any_rcpt_ok() {
            self.deadline = None;
            self.state = State::Body(p);
            self.stuffer = DotStuffer::default();
            self.events.push_back(ClientEvent::SendBody);
            return;
        } else if reply.code == 354 {
            // Pipelined DATA accepted with nobody to deliver to: report, then abort.
            self.events.push_back(p.done(None));
            return self.fail(ClientError::Unexpected);
        } else if reply.code / 100 == 2 || reply.code / 100 == 3 {
            return self.fail(ClientError::BadReply(reply.one_line()));
        } else {
            // DATA refused: with accepted recipients that is the transaction's outcome.
            let data = p.any_rcpt_ok().then_some(reply);
            return self.finish_without_body(p, data, now);
        }
        // Are more replies due? Pipelined: MAIL, every RCPT and DATA (if sent) are answered.
        let due = if p.pipelined {
            n > 0 && (p.mail.is_none() || p.rcpt.len() <= n)
        } else if !p.mail_ok() {
            false
        } else {
            p.rcpt.len() < n || p.any_rcpt_ok()
        };
        if due {
            self.deadline = Some(now + self.params.command_timeout);
            self.state = State::Envelope(p);
        } else {
            self.finish_without_body(p, None, now);
        }
    }

    fn finish_without_body(&mut self, p: Pending, data: Option<Reply>, now: Instant) {
        self.events.push_back(p.done(data));
        self.command("RSET", now);
        self.state = State::Rset;
    }
}

/// Capabilities from an EHLO reply (first line is the greeting).
fn parse_caps(reply: &Reply) -> Capabilities {
    let mut caps = Capabilities {
        esmtp: true,
        ..Capabilities::default()
    };
    for line in reply.lines.iter().skip(1) {
        let mut words = line.split_ascii_whitespace();
        let keyword = words.next().unwrap_or("").to_ascii_uppercase();
        match keyword.as_str() {
            "STARTTLS" => caps.starttls = true,
            "PIPELINING" => caps.pipelining = true,
            "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
            "8BITMIME" => caps.eightbitmime = true,
            "SMTPUTF8" => caps.smtputf8 = true,
            "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
            _ => {}
        }
    }
    caps
}

/// Text for a command line: control characters (CR, LF, …) removed.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// DATA content in pieces: line ends normalised to CRLF (bare CR or LF; a CR LF split between
/// pieces stays one line end), lines starting with `.` dot-stuffed; `finish` ensures a final
/// CRLF and appends the terminating `.\r\n`.
#[derive(Debug, Clone, Copy)]
struct DotStuffer {
    line_start: bool,
    /// The last octet was a CR (already written as CRLF): an LF next is its pair.
    after_cr: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self {
            line_start: true,
            after_cr: false,
        }
    }
}

impl DotStuffer {
    fn push(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        out.reserve(piece.len() + piece.len() / 64 + 5);
        for &b in piece {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            if self.line_start && b == b'.' {
                out.push(b'.');
            }
            self.line_start = false;
            match b {
                b'\r' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                    self.after_cr = true;
                }
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                }
                _ => out.push(b),
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of a scripted session.
    #[derive(Debug, Clone)]
    enum Step {
        /// Server sends these bytes.
        S(&'static str),
        /// The client must have written exactly this since the last `C`.
        C(&'static str),
        /// The next event must be this.
        E(ClientEvent),
        /// No event pending.
        NoEvent,
        Tls,
        Send(Transaction, Result<(), ClientError>),
        Body(&'static [u8]),
        Quit,
        /// Virtual time passes; then `handle_timeout`.
        Wait(u64),
    }
    use Step::*;

    const EHLO_FULL: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n\
        250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n";

    fn tx(rcpt: &[&str]) -> Transaction {
        Transaction {
            mail_from: "s@a.test".into(),
            rcpt_to: rcpt.iter().map(|r| r.to_string()).collect(),
            size: 10,
            eightbit: false,
            smtputf8: false,
        }
    }

    fn reply(s: &str) -> Reply {
        let mut p = ReplyParser::new(512, 16);
        let line = format!("{s}\r\n");
        let mut input = line.as_bytes();
        match p.parse(&mut input) {
            Ok(Some(r)) => r,
            other => panic!("bad test reply {s:?}: {other:?}"),
        }
    }

    fn done(rcpt: &[&str], mail: Option<&str>, data: Option<&str>) -> Step {
        E(ClientEvent::TransactionDone {
            rcpt: rcpt.iter().map(|r| reply(r)).collect(),
            mail: mail.map(reply),
            data: data.map(reply),
        })
    }

    fn plain_caps() -> Capabilities {
        Capabilities {
            esmtp: true,
            ..Capabilities::default()
        }
    }

    fn full_caps() -> Capabilities {
        Capabilities {
            esmtp: true,
            starttls: true,
            pipelining: true,
            size: Some(1000),
            eightbitmime: true,
            smtputf8: true,
            enhanced_status_codes: true,
        }
    }

    fn params(starttls: StartTlsMode) -> ClientParams {
        ClientParams {
            helo: "gw.test".into(),
            starttls,
            ..ClientParams::default()
        }
    }

    /// Runs a script; server bytes are fed whole, or one byte at a time if `bytewise`.
    fn run(name: &str, mode: StartTlsMode, steps: &[Step], bytewise: bool) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut c = ClientSession::new(params(mode), now);
        let mut out = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let ctx = format!("{name} step {i} {step:?} bytewise={bytewise}");
            match step {
                S(s) if bytewise => s.as_bytes().iter().for_each(|b| c.feed(&[*b], now)),
                S(s) => c.feed(s.as_bytes(), now),
                C(want) => {
                    out.extend(c.take_output());
                    assert_eq!(String::from_utf8_lossy(&out), *want, "{ctx}");
                    out.clear();
                }
                E(want) => assert_eq!(c.poll_event().as_ref(), Some(want), "{ctx}"),
                NoEvent => assert_eq!(c.poll_event(), None, "{ctx}"),
                Tls => c.tls_established(now),
                Send(t, want) => assert_eq!(&c.send_transaction(t.clone(), now), want, "{ctx}"),
                Body(m) => c.send_body(m, now),
                Quit => c.quit(now),
                Wait(secs) => {
                    now += Duration::from_secs(*secs);
                    c.handle_timeout(now);
                }
            }
            out.extend(c.take_output());
        }
        assert_eq!(c.poll_event(), None, "{name}: events left over");
        assert!(
            out.is_empty(),
            "{name}: output left over: {:?}",
            String::from_utf8_lossy(&out)
        );
    }

    fn fail(e: ClientError) -> Step {
        E(ClientEvent::Failed(e))
    }

    /// (name, STARTTLS mode, script, also run byte-at-a-time)
    fn cases() -> Vec<(&'static str, StartTlsMode, Vec<Step>, bool)> {
        use StartTlsMode::*;
        let greet = || vec![C(""), S("220 mx.test ESMTP\r\n"), C("EHLO gw.test\r\n")];
        let ready_plain = || {
            let mut v = greet();
            v.extend([
                S("250-mx.test\r\n250 SIZE\r\n"),
                E(ClientEvent::Ready(Capabilities {
                    size: Some(0),
                    ..plain_caps()
                })),
            ]);
            v
        };
        let ready_full = || {
            let mut v = greet();
            v.extend([S(EHLO_FULL), E(ClientEvent::Ready(full_caps()))]);
            v
        };
        let with = |mut v: Vec<Step>, more: Vec<Step>| {
            v.extend(more);
            v
        };
        vec![
            (
                "greeting refused",
                IfOffered,
                vec![
                    S("554 5.7.1 go away\r\n"),
                    fail(ClientError::Greeting(reply("554 5.7.1 go away"))),
                    NoEvent,
                ],
                true,
            ),
            (
                "multi-line greeting, EHLO→HELO fallback",
                Required,
                vec![
                    S("220-mx.test\r\n220 hello\r\n"),
                    C("EHLO gw.test\r\n"),
                    S("502 5.5.1 what\r\n"),
                    C("HELO gw.test\r\n"),
                    S("250 mx.test\r\n"),
                    fail(ClientError::TlsNotOffered),
                    C("QUIT\r\n"),
                ],
                true,
            ),
            (
                "HELO fallback, plaintext ok",
                IfOffered,
                with(
                    greet(),
                    vec![
                        S("500 no\r\n"),
                        C("HELO gw.test\r\n"),
                        S("250 mx.test\r\n"),
                        E(ClientEvent::Ready(Capabilities::default())),
                    ],
                ),
                true,
            ),
            (
                "EHLO 4xx fails",
                IfOffered,
                with(
                    greet(),
                    vec![
                        S("421 4.3.2 busy\r\n"),
                        fail(ClientError::Helo(reply("421 4.3.2 busy"))),
                    ],
                ),
                true,
            ),
            (
                "required, not offered",
                Required,
                with(
                    greet(),
                    vec![
                        S("250-mx.test\r\n250 PIPELINING\r\n"),
                        fail(ClientError::TlsNotOffered),
                        C("QUIT\r\n"),
                    ],
                ),
                true,
            ),
            (
                "never: STARTTLS not used",
                Never,
                with(
                    greet(),
                    vec![S(EHLO_FULL), E(ClientEvent::Ready(full_caps()))],
                ),
                true,
            ),
            (
                "STARTTLS path",
                IfOffered,
                with(
                    greet(),
                    vec![
                        S(EHLO_FULL),
                        C("STARTTLS\r\n"),
                        S("220 2.0.0 go ahead\r\n"),
                        E(ClientEvent::StartTls),
                        NoEvent,
                        Tls,
                        C("EHLO gw.test\r\n"),
                        S("250-mx.test\r\n250 PIPELINING\r\n"),
                        E(ClientEvent::Ready(Capabilities {
                            pipelining: true,
                            ..plain_caps()
                        })),
                        Quit,
                        C("QUIT\r\n"),
                        S("221 2.0.0 bye\r\n"),
                        E(ClientEvent::Closed),
                    ],
                ),
                true,
            ),
            (
                "STARTTLS refused",
                Required,
                with(
                    greet(),
                    vec![
                        S(EHLO_FULL),
                        C("STARTTLS\r\n"),
                        S("454 4.7.0 no TLS today\r\n"),
                        fail(ClientError::StartTlsRefused(reply(
                            "454 4.7.0 no TLS today",
                        ))),
                    ],
                ),
                true,
            ),
            (
                "response injection in one read",
                Required,
                with(
                    greet(),
                    vec![
                        S(EHLO_FULL),
                        C("STARTTLS\r\n"),
                        S("220 ready\r\n250 fake\r\n"),
                        fail(ClientError::ResponseInjection),
                        Tls,
                    ],
                ),
                false,
            ),
            (
                "response injection in a later read",
                Required,
                with(
                    greet(),
                    vec![
                        S(EHLO_FULL),
                        C("STARTTLS\r\n"),
                        S("220 ready\r\n"),
                        E(ClientEvent::StartTls),
                        S("2"),
                        fail(ClientError::ResponseInjection),
                    ],
                ),
                true,
            ),
            (
                "pipelined, one recipient rejected",
                Never,
                with(
                    ready_full(),
                    vec![
                        Send(tx(&["a@b.test", "x@b.test"]), Ok(())),
                        C(
                            "MAIL FROM:<s@a.test> SIZE=10\r\nRCPT TO:<a@b.test>\r\nRCPT TO:<x@b.test>\r\nDATA\r\n",
                        ),
                        S("250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n354 go\r\n"),
                        E(ClientEvent::SendBody),
                        Body(b"Subject: x\r\n\r\n.hidden\r\nline\r\n"),
                        C("Subject: x\r\n\r\n..hidden\r\nline\r\n.\r\n"),
                        S("250 2.0.0 queued as 1\r\n"),
                        done(
                            &["250 2.1.5 ok", "550 5.1.1 unknown"],
                            None,
                            Some("250 2.0.0 queued as 1"),
                        ),
                        E(ClientEvent::Ready(full_caps())),
                    ],
                ),
                true,
            ),
            (
                "pipelined, all rejected, DATA refused, RSET",
                Never,
                with(
                    ready_full(),
                    vec![
                        Send(tx(&["a@b.test", "x@b.test"]), Ok(())),
                        C(
                            "MAIL FROM:<s@a.test> SIZE=10\r\nRCPT TO:<a@b.test>\r\nRCPT TO:<x@b.test>\r\nDATA\r\n",
                        ),
                        S("250 ok\r\n550 no\r\n450 later\r\n"),
                        NoEvent,
                        S("554 5.5.1 no valid recipients\r\n"),
                        done(&["550 no", "450 later"], None, None),
                        C("RSET\r\n"),
                        NoEvent,
                        S("250 ok\r\n"),
                        E(ClientEvent::Ready(full_caps())),
                    ],
                ),
                true,
            ),
            (
                "pipelined, all rejected, DATA 354 anyway",
                Never,
                with(
                    ready_full(),
                    vec![
                        Send(tx(&["x@b.test"]), Ok(())),
                        C("MAIL FROM:<s@a.test> SIZE=10\r\nRCPT TO:<x@b.test>\r\nDATA\r\n"),
                        S("250 ok\r\n550 no\r\n354 go\r\n"),
                        done(&["550 no"], None, None),
                        fail(ClientError::Unexpected),
                    ],
                ),
                true,
            ),
            (
                "pipelined, MAIL rejected",
                Never,
                with(
                    ready_full(),
                    vec![
                        Send(tx(&["a@b.test", "c@b.test"]), Ok(())),
                        C(
                            "MAIL FROM:<s@a.test> SIZE=10\r\nRCPT TO:<a@b.test>\r\nRCPT TO:<c@b.test>\r\nDATA\r\n",
                        ),
                        S(
                            "553 5.1.8 bad sender\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n554 5.5.1 no\r\n",
                        ),
                        done(
                            &["553 5.1.8 bad sender", "553 5.1.8 bad sender"],
                            Some("553 5.1.8 bad sender"),
                            None,
                        ),
                        C("RSET\r\n"),
                        S("250 ok\r\n"),
                        E(ClientEvent::Ready(full_caps())),
                    ],
                ),
                true,
            ),
            (
                "not pipelined: one command at a time",
                IfOffered,
                with(
                    ready_plain(),
                    vec![
                        Send(
                            Transaction {
                                eightbit: true,
                                ..tx(&["a@b.test", "x@b.test"])
                            },
                            Ok(()),
                        ),
                        C("MAIL FROM:<s@a.test> SIZE=10\r\n"),
                        S("250 ok\r\n"),
                        C("RCPT TO:<a@b.test>\r\n"),
                        S("550 no\r\n"),
                        C("RCPT TO:<x@b.test>\r\n"),
                        S("251 forwarded\r\n"),
                        C("DATA\r\n"),
                        S("354 go\r\n"),
                        E(ClientEvent::SendBody),
                        Body(b".\r\n..\r\nno final newline"),
                        C("..\r\n...\r\nno final newline\r\n.\r\n"),
                        S("452 4.3.1 full\r\n"),
                        done(&["550 no", "251 forwarded"], None, Some("452 4.3.1 full")),
                        E(ClientEvent::Ready(Capabilities {
                            size: Some(0),
                            ..plain_caps()
                        })),
                    ],
                ),
                true,
            ),
            (
                "not pipelined: MAIL rejected",
                Never,
                with(
                    ready_plain(),
                    vec![
                        Send(tx(&["a@b.test"]), Ok(())),
                        C("MAIL FROM:<s@a.test> SIZE=10\r\n"),
                        S("451 4.3.0 try later\r\n"),
                        done(&["451 4.3.0 try later"], Some("451 4.3.0 try later"), None),
                        C("RSET\r\n"),
                        S("250 ok\r\n"),
                        E(ClientEvent::Ready(Capabilities {
                            size: Some(0),
                            ..plain_caps()
                        })),
                    ],
                ),
                true,
            ),
            (
                "not pipelined: all rejected, no DATA",
                Never,
                with(
                    ready_plain(),
                    vec![
                        Send(tx(&["a@b.test"]), Ok(())),
                        C("MAIL FROM:<s@a.test> SIZE=10\r\n"),
                        S("250 ok\r\n"),
                        C("RCPT TO:<a@b.test>\r\n"),
                        S("550 no\r\n"),
                        done(&["550 no"], None, None),
                        C("RSET\r\n"),
                        S("250 ok\r\n"),
                        E(ClientEvent::Ready(Capabilities {
                            size: Some(0),
                            ..plain_caps()
                        })),
                    ],
                ),
                true,
            ),
            (
                "connection reuse, params, smuggling defence",
                Never,
                with(
                    ready_full(),
                    vec![
                        Send(
                            Transaction {
                                size: 1001,
                                ..tx(&["a@b.test"])
                            },
                            Err(ClientError::TooLarge(1000)),
                        ),
                        Send(
                            Transaction {
                                eightbit: true,
                                smtputf8: true,
                                ..tx(&["a@b.test"])
                            },
                            Ok(()),
                        ),
                        C(
                            "MAIL FROM:<s@a.test> SIZE=10 BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<a@b.test>\r\nDATA\r\n",
                        ),
                        S("250 ok\r\n250 ok\r\n354 go\r\n"),
                        E(ClientEvent::SendBody),
                        Body(b"a\n.\nb\r.\r\n"),
                        C("a\r\n..\r\nb\r\n..\r\n.\r\n"),
                        S("250 one\r\n"),
                        done(&["250 ok"], None, Some("250 one")),
                        E(ClientEvent::Ready(full_caps())),
                        Send(
                            Transaction {
                                mail_from: String::new(),
                                ..tx(&["c@d.test\r\nRSET"])
                            },
                            Ok(()),
                        ),
                        C("MAIL FROM:<> SIZE=10\r\nRCPT TO:<c@d.testRSET>\r\nDATA\r\n"),
                        S("250 ok\r\n250 ok\r\n354 go\r\n"),
                        E(ClientEvent::SendBody),
                        Body(b""),
                        C(".\r\n"),
                        S("250 two\r\n"),
                        done(&["250 ok"], None, Some("250 two")),
                        E(ClientEvent::Ready(full_caps())),
                        Quit,
                        C("QUIT\r\n"),
                        S("221 bye\r\n"),
                        E(ClientEvent::Closed),
                    ],
                ),
                true,
            ),
            (
                "no SMTPUTF8, send before Ready",
                Never,
                vec![
                    Send(tx(&["a@b.test"]), Err(ClientError::Unexpected)),
                    C(""),
                    S("220 hi\r\n"),
                    C("EHLO gw.test\r\n"),
                    S("250 mx.test\r\n"),
                    E(ClientEvent::Ready(plain_caps())),
                    Send(
                        Transaction {
                            smtputf8: true,
                            ..tx(&["a@b.test"])
                        },
                        Err(ClientError::NoSmtpUtf8),
                    ),
                ],
                true,
            ),
            (
                "421 to DATA end closes after reporting",
                Never,
                with(
                    ready_full(),
                    vec![
                        Send(tx(&["a@b.test"]), Ok(())),
                        C("MAIL FROM:<s@a.test> SIZE=10\r\nRCPT TO:<a@b.test>\r\nDATA\r\n"),
                        S("250 ok\r\n250 ok\r\n354 go\r\n"),
                        E(ClientEvent::SendBody),
                        Body(b"x\r\n"),
                        C("x\r\n.\r\n"),
                        S("421 4.4.2 timeout\r\n"),
                        done(&["250 ok"], None, Some("421 4.4.2 timeout")),
                        fail(ClientError::Closing(reply("421 4.4.2 timeout"))),
                    ],
                ),
                true,
            ),
            (
                "unsolicited reply while idle, bad reply",
                Never,
                with(
                    ready_full(),
                    vec![
                        S("421 4.4.2 idle too long\r\n"),
                        fail(ClientError::Unexpected),
                        S("garbage\r\n"),
                    ],
                ),
                true,
            ),
            (
                "malformed reply",
                Never,
                vec![
                    S("hello\r\n"),
                    fail(ClientError::BadReply(
                        "reply line does not start with a valid code".into(),
                    )),
                ],
                true,
            ),
            (
                "timeouts: greeting",
                Never,
                vec![Wait(299), NoEvent, Wait(1), fail(ClientError::Timeout)],
                true,
            ),
            (
                "timeouts: data timeout after the body",
                Never,
                with(
                    ready_full(),
                    vec![
                        Wait(10_000), // idle: no deadline
                        NoEvent,
                        Send(tx(&["a@b.test"]), Ok(())),
                        C("MAIL FROM:<s@a.test> SIZE=10\r\nRCPT TO:<a@b.test>\r\nDATA\r\n"),
                        S("250 ok\r\n250 ok\r\n354 go\r\n"),
                        E(ClientEvent::SendBody),
                        Body(b"x\r\n"),
                        C("x\r\n.\r\n"),
                        Wait(599),
                        NoEvent,
                        Wait(1),
                        fail(ClientError::Timeout),
                    ],
                ),
                true,
            ),
            (
                "quit: timeout closes",
                Never,
                with(
                    ready_full(),
                    vec![Quit, C("QUIT\r\n"), Wait(300), E(ClientEvent::Closed)],
                ),
                true,
            ),
        ]
    }

    #[test]
    fn scripted_sessions() {
        for (name, mode, steps, bytewise) in cases() {
            run(name, mode, &steps, false);
            if bytewise {
                run(name, mode, &steps, true);
            }
        }
    }

    /// A body sent in pieces, split at every position, goes out exactly as sent whole.
    #[test]
    fn body_in_pieces_equals_body_whole() {
        let t0 = Instant::now();
        let ready = |c: &mut ClientSession| {
            c.feed(b"220 hi\r\n", t0);
            c.feed(EHLO_FULL.as_bytes(), t0);
            while c.poll_event().is_some() {}
            let _ = c.take_output();
            assert_eq!(c.send_transaction(tx(&["a@b.test"]), t0), Ok(()));
            c.feed(b"250 ok\r\n250 ok\r\n354 go\r\n", t0);
            assert_eq!(c.poll_event(), Some(ClientEvent::SendBody));
            let _ = c.take_output();
        };
        for body in [
            &b".a\r\n.\r\nb\rc\nd\r\n\r\n..e"[..],
            b"",
            b"\r\n",
            b".",
            b"x\r",
        ] {
            let mut whole = ClientSession::new(params(StartTlsMode::Never), t0);
            ready(&mut whole);
            whole.send_body(body, t0);
            let want = whole.take_output();
            for a in 0..=body.len() {
                for b in a..=body.len() {
                    let mut c = ClientSession::new(params(StartTlsMode::Never), t0);
                    ready(&mut c);
                    let mut got = Vec::new();
                    for (piece, last) in [
                        (&body[..a], false),
                        (&body[a..b], false),
                        (&body[b..], true),
                    ] {
                        c.send_body_piece(piece, last, t0);
                        got.extend(c.take_output());
                    }
                    assert_eq!(got, want, "{body:?} split at {a} {b}");
                }
            }
        }
    }

    /// Two transactions on one connection, in every order of plain / 8BITMIME / SMTPUTF8 /
    /// SIZE: each MAIL carries its own parameters and nothing of the one before.
    #[test]
    fn every_mail_carries_only_its_own_parameters() {
        let kinds: [(&str, bool, bool, u64, &str); 4] = [
            (
                "plain",
                false,
                false,
                10,
                "MAIL FROM:<s@a.test> SIZE=10\r\n",
            ),
            (
                "8bit",
                true,
                false,
                10,
                "MAIL FROM:<s@a.test> SIZE=10 BODY=8BITMIME\r\n",
            ),
            (
                "utf8",
                false,
                true,
                10,
                "MAIL FROM:<s@a.test> SIZE=10 SMTPUTF8\r\n",
            ),
            (
                "size",
                false,
                false,
                999,
                "MAIL FROM:<s@a.test> SIZE=999\r\n",
            ),
        ];
        let t0 = Instant::now();
        for first in &kinds {
            for second in &kinds {
                let mut c = ClientSession::new(params(StartTlsMode::Never), t0);
                c.feed(b"220 hi\r\n", t0);
                c.feed(EHLO_FULL.as_bytes(), t0);
                while c.poll_event().is_some() {}
                let _ = c.take_output();
                for k in [first, second] {
                    let t = Transaction {
                        eightbit: k.1,
                        smtputf8: k.2,
                        size: k.3,
                        ..tx(&["a@b.test"])
                    };
                    assert_eq!(c.send_transaction(t, t0), Ok(()), "{} {}", first.0, k.0);
                    let out = String::from_utf8(c.take_output()).unwrap_or_default();
                    let mail = out.split_inclusive("\r\n").next().unwrap_or_default();
                    assert_eq!(mail, k.4, "{} then {}", first.0, second.0);
                    c.feed(b"250 ok\r\n250 ok\r\n354 go\r\n", t0);
                    assert_eq!(c.poll_event(), Some(ClientEvent::SendBody));
                    c.send_body(b"x\r\n", t0);
                    c.feed(b"250 queued\r\n", t0);
                    while let Some(e) = c.poll_event() {
                        if matches!(e, ClientEvent::Ready(_)) {
                            break;
                        }
                    }
                    let _ = c.take_output();
                }
            }
        }
    }

    #[test]
    fn deadlines() {
        let t0 = Instant::now();
        let mut c = ClientSession::new(params(StartTlsMode::Never), t0);
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(300)));
        c.feed(b"220 hi\r\n250 mx\r\n", t0);
        assert_eq!(c.deadline(), None);
        assert_eq!(c.capabilities(), Some(&plain_caps()));
        assert!(!c.is_tls());
        c.handle_eof();
        assert_eq!(c.poll_event(), Some(ClientEvent::Ready(plain_caps())));
        assert!(matches!(
            c.poll_event(),
            Some(ClientEvent::Failed(ClientError::BadReply(_)))
        ));
    }

    #[test]
    fn reply_limits() {
        let mut c = ClientSession::new(
            ClientParams {
                max_reply_line: 10,
                ..params(StartTlsMode::Never)
            },
            Instant::now(),
        );
        c.feed(b"220 this line is long\r\n", Instant::now());
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Failed(ClientError::ReplyTooLong(
                "line length"
            )))
        );
    }

    #[test]
    fn awaiting_and_last_reply() {
        let t0 = Instant::now();
        let mut c = ClientSession::new(params(StartTlsMode::Never), t0);
        let mut seen = vec![c.awaiting()];
        assert_eq!(c.last_reply(), None);
        // One reply at a time, noting what is due after each.
        fn feed(c: &mut ClientSession, seen: &mut Vec<Option<Awaiting>>, s: &str) {
            c.feed(s.as_bytes(), Instant::now());
            seen.push(c.awaiting());
        }
        feed(&mut c, &mut seen, "220 hi\r\n");
        feed(&mut c, &mut seen, "250-mx.test\r\n250 PIPELINING\r\n");
        assert_eq!(
            c.send_transaction(tx(&["a@b.test", "c@d.test"]), t0),
            Ok(())
        );
        seen.push(c.awaiting());
        feed(&mut c, &mut seen, "250 ok\r\n");
        feed(&mut c, &mut seen, "250 ok\r\n");
        feed(&mut c, &mut seen, "250 ok\r\n");
        feed(&mut c, &mut seen, "354 go\r\n");
        c.send_body(b"x\r\n", t0);
        seen.push(c.awaiting());
        feed(&mut c, &mut seen, "250 queued\r\n");
        assert_eq!(
            c.last_reply(),
            Some((Some(Awaiting::DataEnd), &reply("250 queued")))
        );
        assert_eq!(c.send_transaction(tx(&["a@b.test"]), t0), Ok(()));
        feed(&mut c, &mut seen, "250 ok\r\n421 4.3.2 shutting down\r\n");
        use Awaiting::*;
        let want = [
            Some(Greeting),
            Some(Ehlo),
            None, // Ready
            Some(Mail),
            Some(Rcpt),
            Some(Rcpt),
            Some(Data),
            None, // SendBody: the runtime prepares the body
            Some(DataEnd),
            None, // Ready again
            None, // over
        ];
        assert_eq!(seen, want);
        // The 421 to RCPT ends the session; last_reply names it and what it answered.
        assert_eq!(
            c.last_reply(),
            Some((Some(Rcpt), &reply("421 4.3.2 shutting down")))
        );
        let events: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
        assert_eq!(
            events.last(),
            Some(&ClientEvent::Failed(ClientError::Closing(reply(
                "421 4.3.2 shutting down"
            ))))
        );
        assert_eq!(Rcpt.name(), "RCPT");
        assert_eq!(DataEnd.name(), "end of data");
        // A reply nobody waited for.
        let mut idle = ClientSession::new(params(StartTlsMode::Never), t0);
        idle.feed(b"220 hi\r\n250 mx\r\n250 extra\r\n", t0);
        assert_eq!(idle.last_reply(), Some((None, &reply("250 extra"))));
        assert_eq!(idle.awaiting(), None);
    }
}
