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
//!   no new greeting), or drops the connection. When the client certificate verified against
//!   an e-mail VPN peer's CA, the runtime then calls `set_relay_allowed(true)` (the relay
//!   decision itself stays here, at RCPT).
//! - After `Event::Authenticate` the machine stops processing input until the runtime answers
//!   with `auth_result` (after checking the credentials, and after any throttling delay).
//! - After `Event::CheckRecipient` the machine stops processing input until the runtime
//!   answers with `rcpt_result` (after looking the address up in the domain's directory).
//! - After `Event::Close` (output holds the last reply), the runtime flushes and closes.
//!
//! Command grammar is smtp-proto's `Request::parse`, applied to lines we frame ourselves (so
//! the 512-octet limit holds without buffering long lines); the DATA receiver is our own.
//!
//! Decisions beyond RFC 5321 and the product spec:
//! - Every 4xx/5xx reply to a client command or message counts toward `max_errors` (relay
//!   denied and `530` included); the answers to `message_stored`/`etrn_result` do not. The
//!   count survives STARTTLS.
//! - The command timer restarts with each complete command line, not with partial bytes (a
//!   trickled line cannot keep a session open); the DATA timer restarts with any data bytes.
//!   No deadline while the runtime stores or runs ETRN; during the TLS handshake the command
//!   timeout applies and expiry emits `Close` without a (plaintext) reply.
//! - Input beyond `max_buffered_input` while waiting for the runtime: `421 4.7.0`, `Close`.
//! - ETRN needs HELO/EHLO, no open transaction and `relay_allowed` (else `459 4.7.1`); only a
//!   plain domain is accepted (RFC 1985 `@`/`#` forms get `501 5.5.4`); it is passed lowercased.
//! - MAIL parameters other than `SIZE`, `BODY=7BIT|8BITMIME` and `SMTPUTF8`, and every RCPT
//!   parameter (DSN is not offered), get `555 5.5.4`. `SIZE=0` counts as no declaration.
//!   Non-ASCII addresses without `SMTPUTF8` get `553 5.6.7`; invalid UTF-8 or control
//!   characters in an address get `501`. `<postmaster>` as recipient is stored as
//!   `postmaster@<first local domain>` (refused with `550 5.1.1` when there is none), so it
//!   can never be relayed; quoted local parts keep their quotes.
//! - `DATA`, `RSET`, `QUIT`, `STARTTLS` with arguments get `501 5.5.4`; a bare CR inside a
//!   command line gets `500 5.5.2`. EHLO/HELO names must be printable ASCII.
//! - A refused message (`552 5.3.4` before `500 5.5.2` before `550 5.6.0`) ends the
//!   transaction like a stored one; the runtime discards what it drained since `MessageStart`.
//! - AUTH (RFC 4954; listeners choose with [`AuthOffer`]): advertised and accepted only under
//!   TLS (`538 5.7.11` before it, even on a forced-TLS client), after HELO/EHLO, outside a
//!   transaction, once per session (`503 5.5.1`). Its lines may be [`sasl::MAX_AUTH_LINE`]
//!   long. `535 5.7.8` counts toward `max_errors`, `454 4.7.0` does not. On a submission
//!   listener MAIL needs AUTH first (`530 5.7.0`). An authenticated session may relay; with
//!   [`SenderBinding`] its envelope sender must be its own (`553 5.7.1`; `<>` is allowed).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_proto::{
    Error as ParseError, MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME, MAIL_BY_NOTIFY,
    MAIL_BY_RETURN, MAIL_BY_TRACE, MAIL_CONPERM, MAIL_REQUIRETLS, MAIL_RET_FULL, MAIL_RET_HDRS,
    MAIL_SMTPUTF8, MailFrom, RcptTo, Request,
};

use crate::envelope::{BodyType, Envelope, domain_of};
use crate::reply::{EnhancedCode, Reply};
use crate::sasl::{self, Credentials, Exchange, Mechanism, Progress};

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
    /// Which envelope senders an authenticated client may use (`auth.sender_must_match`).
    pub sender_binding: SenderBinding,
    /// Local domains whose recipients are looked up before `250` (`[[recipients]]`, F-RCPT;
    /// lowercase): RCPT to one emits [`Event::CheckRecipient`]. `postmaster@` is never looked
    /// up (RFC 5321 §4.5.1: it must be accepted).
    pub validated_domains: Vec<String>,
}

/// Envelope senders allowed to an authenticated client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SenderBinding {
    /// Any sender.
    #[default]
    Off,
    /// Only the login itself (compared case-insensitively).
    Address,
    /// Any address in the login's domain.
    Domain,
}

/// Whether and how a listener offers AUTH (always only under TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthOffer {
    /// No AUTH: `502 5.5.1`.
    #[default]
    None,
    /// AUTH offered; mail is accepted without it as for any client.
    Offered,
    /// Submission (RFC 6409): AUTH offered and required before MAIL (`530 5.7.0`).
    Required,
}

/// TLS facts of an established session (for logs, Received header, policy).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`
    pub version: String,
    /// e.g. `TLS_AES_256_GCM_SHA384`
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
    /// AUTH on this listener.
    pub auth: AuthOffer,
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
    /// A complete AUTH exchange: check the credentials, then call `auth_result`.
    Authenticate(Credentials),
    /// RCPT to a validated local domain: look the address up, then call `rcpt_result`.
    CheckRecipient(String),
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

/// The outcome of checking AUTH credentials, as reported by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    /// `235 2.7.0`: the session is authenticated as the login.
    Accepted,
    /// `535 5.7.8`: wrong login or password.
    Rejected,
    /// `454 4.7.0`: the backend is unavailable, or the client is locked out for a while.
    Unavailable,
}

/// The outcome of a recipient lookup (F-RCPT), as reported by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptResult {
    /// `250 2.1.5`: the directory knows the address.
    Exists,
    /// `550 5.1.1`: the directory does not.
    Unknown,
    /// `451 4.4.3`: the directory cannot be asked now.
    Unavailable,
}

/// Spool space a message needs at least at `MAIL`/`DATA` when it declares no (larger) `SIZE`.
pub const MIN_SPOOL_FREE: u64 = 1 << 20;

/// Input taken into the machine per processing step while it runs (bounds `input`).
const FEED_CHUNK: usize = 16 * 1024;

/// Longest client-supplied text echoed back in a reply.
const MAX_ECHO: usize = 64;

/// Most `Received:` headers a message may carry (RFC 5321 §6.3; Postfix's `hopcount_limit`):
/// one with more is in a mail loop and refused at DATA with `554 5.4.6`.
pub const MAX_HOPS: usize = 50;

/// How long a session outside a transaction may wait for a command while the gateway is near
/// its connection cap ([`ServerSession::set_stress`]).
pub const STRESS_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands that a client on the forced-TLS list may not issue in plaintext.
const TLS_ONLY_VERBS: [&[u8]; 6] = [b"MAIL", b"RCPT", b"DATA", b"ETRN", b"AUTH", b"BDAT"];

/// Where the machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading command lines.
    Command,
    /// Reading the message text after `354`.
    Data,
    /// `MessageComplete` emitted; waiting for `message_stored`.
    AwaitStore,
    /// `Etrn` emitted; waiting for `etrn_result`.
    AwaitEtrn,
    /// `StartTls` emitted; waiting for `tls_established`.
    AwaitTls,
    /// A `334` challenge is out; the next line is the client's SASL response.
    AuthResponse,
    /// `Authenticate` emitted; waiting for `auth_result`.
    AwaitAuth,
    /// `CheckRecipient` emitted; waiting for `rcpt_result`.
    AwaitRcpt,
    /// `Close` emitted; everything is ignored.
    Closed,
}

/// Position of the DATA receiver within the current text line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum LinePos {
    /// After `CRLF` (or right after `354`).
    #[default]
    LineStart,
    /// A `.` at line start (held back: stuffing dot or terminator).
    Dot,
    /// `.` `CR` at line start (end of data if `LF` follows).
    DotCr,
    /// Inside a line.
    Mid,
    /// A `CR` inside a line (held back until we know whether `LF` follows).
    Cr,
}

/// The DATA receiver: dot-unstuffing, the `CRLF.CRLF` terminator and the text checks.
///
/// Only `CRLF . CRLF` ends the data. A bare `LF` or bare `CR` anywhere is remembered and the
/// message is refused after the terminator (SMTP smuggling defence).
///
/// Public for other runtimes that receive DATA without the whole session machine (sealctl's
/// reference sink): a fresh one (`default`) per message, fed with `ingest`; after the
/// terminator `too_big`, `line_too_long` and `bare_eol` say whether (and why) the message is
/// refused. Of `ServerLimits` only `max_text_line` and `max_message_bytes` apply.
#[derive(Debug, Default)]
pub struct DataReceiver {
    pos: LinePos,
    /// Wire octets of the current line so far, including the stuffing dot and CRLF.
    line_len: usize,
    /// Unstuffed body octets so far.
    total: u64,
    too_long: bool,
    too_big: bool,
    bare_eol: bool,
    /// A NUL octet in the text.
    nul: bool,
    /// Past the header section (its empty line seen).
    past_header: bool,
    /// Octets of the current header line seen (only the first few matter).
    header_col: usize,
    /// The current header line's first octets, lower-cased, to recognise `Received:`.
    header_start: [u8; 9],
    /// `Received:` headers in the header section.
    hops: usize,
}

impl DataReceiver {
    fn refused(&self) -> bool {
        self.too_long || self.too_big || self.bare_eol || self.nul
    }

    /// A NUL octet in the text (a next hop that drops NULs could see other line starts).
    pub fn nul(&self) -> bool {
        self.nul
    }

    /// `Received:` headers counted in the header section.
    pub fn hops(&self) -> usize {
        self.hops
    }

    /// Follows the header section, counting `Received:` lines (continuations start with
    /// white space and never match).
    fn watch_header(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.past_header {
                return;
            }
            match b {
                b'\r' => {}
                b'\n' => {
                    self.past_header = self.header_col == 0;
                    self.header_col = 0;
                }
                _ => {
                    if let Some(slot) = self.header_start.get_mut(self.header_col) {
                        *slot = b.to_ascii_lowercase();
                        if self.header_col + 1 == self.header_start.len()
                            && &self.header_start == b"received:"
                        {
                            self.hops = self.hops.saturating_add(1);
                        }
                    }
                    self.header_col = self.header_col.saturating_add(1);
                }
            }
        }
    }

    /// More than `max_message_bytes` of message text (nothing of it is kept in `body`).
    pub fn too_big(&self) -> bool {
        self.too_big
    }

    /// A text line longer than `max_text_line` octets (stuffing dot and CRLF included).
    pub fn line_too_long(&self) -> bool {
        self.too_long
    }

    /// A bare CR or LF in the text.
    pub fn bare_eol(&self) -> bool {
        self.bare_eol
    }

    /// Consumes bytes of `input`, appending the unstuffed text to `body` (cleared once the
    /// message is refused); returns how many and whether the terminator was seen. Bytes after
    /// the terminator are not consumed.
    pub fn ingest(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
        limits: &ServerLimits,
    ) -> (usize, bool) {
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            if self.pos == LinePos::Mid {
                // Fast path: copy the run up to the next CR or LF in one go.
                let rest = input.get(i..).unwrap_or_default();
                let run = rest
                    .iter()
                    .position(|&c| c == b'\r' || c == b'\n' || c == 0)
                    .unwrap_or(rest.len());
                if run > 0 {
                    self.count(run, limits);
                    self.emit(rest.get(..run).unwrap_or_default(), body, limits);
                    i += run;
                    continue;
                }
            }
            i += 1;
            self.count(1, limits);
            match (self.pos, b) {
                (LinePos::LineStart, b'.') => self.pos = LinePos::Dot,
                (LinePos::Dot, b'\r') => self.pos = LinePos::DotCr,
                (LinePos::DotCr, b'\n') => {
                    self.pos = LinePos::LineStart;
                    self.line_len = 0;
                    return (i, true);
                }
                (LinePos::Cr, b'\n') => {
                    self.emit(b"\r\n", body, limits);
                    self.pos = LinePos::LineStart;
                    self.line_len = 0;
                }
                (LinePos::DotCr | LinePos::Cr, _) => {
                    // The held-back CR is not followed by LF.
                    self.bare_eol = true;
                    self.emit(b"\r", body, limits);
                    self.inside(b, body, limits);
                }
                // After a line-start dot (stuffing, removed) or inside a line.
                (LinePos::LineStart | LinePos::Dot | LinePos::Mid, _) => {
                    self.inside(b, body, limits)
                }
            }
        }
        (i, false)
    }

    fn inside(&mut self, b: u8, body: &mut Vec<u8>, limits: &ServerLimits) {
        match b {
            b'\r' => self.pos = LinePos::Cr,
            b'\n' => {
                self.bare_eol = true;
                self.emit(b"\n", body, limits);
                self.pos = LinePos::Mid;
            }
            0 => {
                self.nul = true;
                self.pos = LinePos::Mid;
            }
            _ => {
                self.emit(&[b], body, limits);
                self.pos = LinePos::Mid;
            }
        }
    }

    fn count(&mut self, n: usize, limits: &ServerLimits) {
        self.line_len = self.line_len.saturating_add(n);
        if self.line_len > limits.max_text_line {
            self.too_long = true;
        }
    }

    fn emit(&mut self, bytes: &[u8], body: &mut Vec<u8>, limits: &ServerLimits) {
        self.watch_header(bytes);
        if !self.refused() {
            self.total = self.total.saturating_add(bytes.len() as u64);
            if self.total > limits.max_message_bytes {
                self.too_big = true;
            }
        }
        if self.refused() {
            // Nothing of a refused message is kept.
            body.clear();
        } else {
            body.extend_from_slice(bytes);
        }
    }
}

/// One SMTP server session.
#[derive(Debug)]
pub struct ServerSession {
    params: Arc<ServerParams>,
    client: ClientInfo,
    state: State,
    /// Unprocessed input: at most one partial command line while running, at most
    /// `max_buffered_input` while waiting.
    input: Vec<u8>,
    /// Discarding the rest of an over-long command line.
    discarding: bool,
    output: Vec<u8>,
    events: VecDeque<Event>,
    body: Vec<u8>,
    data: DataReceiver,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsInfo>,
    envelope: Option<Envelope>,
    /// Domain of the ETRN awaiting `etrn_result`.
    etrn: Option<String>,
    /// The SASL exchange in progress (AuthResponse, AwaitAuth).
    sasl: Option<Exchange>,
    /// The login being checked (AwaitAuth), then the authenticated one.
    login: Option<String>,
    /// The recipient being looked up (AwaitRcpt).
    pending_rcpt: Option<String>,
    authenticated: bool,
    errors: u32,
    spool_free: u64,
    last_activity: Instant,
    /// The gateway is near its connection cap: idle sessions get [`STRESS_COMMAND_TIMEOUT`].
    stress: bool,
}

impl ServerSession {
    pub fn new(params: Arc<ServerParams>, client: ClientInfo, now: Instant) -> Self {
        let tls = client.implicit_tls.clone();
        let mut session = ServerSession {
            params,
            client,
            state: State::Command,
            input: Vec::new(),
            discarding: false,
            output: Vec::new(),
            events: VecDeque::new(),
            body: Vec::new(),
            data: DataReceiver::default(),
            helo: None,
            esmtp: false,
            tls,
            envelope: None,
            etrn: None,
            sasl: None,
            login: None,
            pending_rcpt: None,
            authenticated: false,
            errors: 0,
            spool_free: u64::MAX,
            last_activity: now,
            stress: false,
        };
        let greeting = format!("{} ESMTP Sealgate", session.params.hostname);
        Reply::plain(220, greeting).write_to(&mut session.output);
        session
    }

    /// Appends `data` and processes it. Returns immediately if the machine is waiting.
    pub fn feed(&mut self, data: &[u8], now: Instant) {
        let mut rest = data;
        while !rest.is_empty() {
            match self.state {
                State::Closed | State::AwaitTls => return,
                State::AwaitStore | State::AwaitEtrn | State::AwaitAuth | State::AwaitRcpt => {
                    // Buffer what the client pipelined, up to the limit (never beyond).
                    let room = self
                        .params
                        .limits
                        .max_buffered_input
                        .saturating_sub(self.input.len());
                    let take = rest.len().min(room.saturating_add(1));
                    self.input
                        .extend_from_slice(rest.get(..take).unwrap_or_default());
                    break;
                }
                State::Command | State::Data | State::AuthResponse => {
                    let (chunk, tail) = rest.split_at(rest.len().min(FEED_CHUNK));
                    rest = tail;
                    self.input.extend_from_slice(chunk);
                    self.process(now);
                }
            }
        }
        self.check_buffered();
    }

    /// Bytes to send to the client, in order. Empties the buffer.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Unstuffed body bytes received so far for the current message.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Takes the body bytes received so far (the runtime spills large bodies to disk).
    pub fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }

    pub fn message_stored(&mut self, result: StoreResult, now: Instant) {
        if self.state != State::AwaitStore {
            return;
        }
        self.state = State::Command;
        self.envelope = None;
        self.body.clear();
        self.last_activity = now;
        match result {
            StoreResult::Queued(id) => {
                let id: String = sanitize(id.as_bytes());
                self.reply(250, (2, 0, 0), format!("Ok: queued as {id}"));
            }
            StoreResult::NoSpace => {
                self.reply(452, (4, 3, 1), "Insufficient system storage");
            }
            StoreResult::Failed => {
                self.reply(451, (4, 3, 0), "Error: queue file write error");
            }
        }
        self.process(now);
    }

    pub fn etrn_result(&mut self, result: EtrnResult, now: Instant) {
        if self.state != State::AwaitEtrn {
            return;
        }
        self.state = State::Command;
        self.last_activity = now;
        let node = self.etrn.take().unwrap_or_default();
        match result {
            EtrnResult::Started => {
                self.reply(250, (2, 0, 0), format!("Queuing for node {node} started"));
            }
            EtrnResult::NoMessages => {
                self.reply(
                    458,
                    (4, 0, 0),
                    format!("Unable to queue messages for node {node}"),
                );
            }
            EtrnResult::NotAllowed => {
                self.reply(459, (4, 0, 0), format!("Node {node} not allowed"));
            }
        }
        self.process(now);
    }

    pub fn tls_established(&mut self, info: TlsInfo, now: Instant) {
        if self.state != State::AwaitTls {
            return;
        }
        // RFC 3207 §4.2: forget everything learned from the client before TLS.
        self.state = State::Command;
        self.tls = Some(info);
        self.helo = None;
        self.esmtp = false;
        self.envelope = None;
        self.etrn = None;
        self.sasl = None;
        self.login = None;
        self.authenticated = false;
        self.input.clear();
        self.discarding = false;
        self.body.clear();
        self.data = DataReceiver::default();
        self.last_activity = now;
    }

    /// Grants (or withdraws) the right to relay to any domain and to use ETRN, replacing
    /// `ClientInfo::relay_allowed`. The runtime grants it after TLS to an e-mail VPN peer whose
    /// client certificate verified against the peer's CA; only effective while TLS is up.
    pub fn set_relay_allowed(&mut self, allowed: bool) {
        self.client.relay_allowed = allowed && self.tls.is_some();
    }

    /// The runtime's verdict on the credentials of `Event::Authenticate`.
    pub fn auth_result(&mut self, result: AuthResult, now: Instant) {
        if self.state != State::AwaitAuth {
            return;
        }
        self.state = State::Command;
        self.sasl = None;
        self.last_activity = now;
        match result {
            AuthResult::Accepted => {
                self.authenticated = true;
                self.reply(235, (2, 7, 0), "Authentication successful");
            }
            AuthResult::Rejected => {
                self.login = None;
                self.fail(535, (5, 7, 8), "Authentication credentials invalid");
            }
            AuthResult::Unavailable => {
                self.login = None;
                self.reply(454, (4, 7, 0), "Temporary authentication failure");
            }
        }
        self.process(now);
    }

    /// The runtime's verdict on the address of `Event::CheckRecipient`.
    pub fn rcpt_result(&mut self, result: RcptResult, now: Instant) {
        if self.state != State::AwaitRcpt {
            return;
        }
        self.state = State::Command;
        self.last_activity = now;
        let Some(address) = self.pending_rcpt.take() else {
            return;
        };
        match (result, self.envelope.as_mut()) {
            (RcptResult::Exists, Some(envelope)) => {
                envelope.rcpt_to.push(address);
                self.reply(250, (2, 1, 5), "Ok");
            }
            (RcptResult::Exists, None) => self.fail(503, (5, 5, 1), "Error: need MAIL command"),
            (RcptResult::Unknown, _) => {
                let shown = sanitize(address.as_bytes());
                self.fail(
                    550,
                    (5, 1, 1),
                    format!("<{shown}>: Recipient address rejected: User unknown"),
                );
            }
            (RcptResult::Unavailable, _) => self.fail(
                451,
                (4, 4, 3),
                "Recipient address lookup failed: directory unavailable, try again later",
            ),
        }
        self.process(now);
    }

    /// The login this session authenticated as, if it did.
    pub fn authenticated(&self) -> Option<&str> {
        self.login.as_deref().filter(|_| self.authenticated)
    }

    /// Relaying to any domain: a trusted network, a VPN peer, or an authenticated client.
    fn relay_allowed(&self) -> bool {
        self.client.relay_allowed || self.authenticated
    }

    /// Free spool bytes as last measured; below what a message needs, MAIL/DATA get `452 4.3.1`.
    pub fn set_spool_free(&mut self, bytes: u64) {
        self.spool_free = bytes;
    }

    /// Under stress (the runtime says the gateway is near its connection cap), a session
    /// waiting for a command outside a transaction may idle only [`STRESS_COMMAND_TIMEOUT`]:
    /// idle and slow clients make room sooner for the ones that send mail (Postfix's stress
    /// mode does the same).
    pub fn set_stress(&mut self, on: bool) {
        self.stress = on;
    }

    /// When `handle_timeout` must be called if no input arrives first.
    pub fn deadline(&self) -> Option<Instant> {
        let limits = &self.params.limits;
        let timeout = match self.state {
            State::Command if self.stress && self.envelope.is_none() => {
                limits.command_timeout.min(STRESS_COMMAND_TIMEOUT)
            }
            State::Command | State::AwaitTls | State::AuthResponse => limits.command_timeout,
            State::Data => limits.data_timeout,
            State::AwaitStore
            | State::AwaitEtrn
            | State::AwaitAuth
            | State::AwaitRcpt
            | State::Closed => return None,
        };
        // An unrepresentable deadline is no deadline.
        self.last_activity.checked_add(timeout)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.deadline() else {
            return;
        };
        if now < deadline {
            return;
        }
        if self.state != State::AwaitTls {
            // During the handshake a plaintext reply would only corrupt the TLS stream.
            self.reply(421, (4, 4, 2), self.host_text("Error: timeout exceeded"));
        }
        self.close();
    }

    /// False while an event awaits the runtime's answer, during STARTTLS, or once closed.
    pub fn wants_input(&self) -> bool {
        matches!(
            self.state,
            State::Command | State::Data | State::AuthResponse
        )
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The HELO/EHLO name given, if any.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// The `with` of the `Received:` field: `SMTP`, `ESMTP`, `ESMTPS`, `ESMTPSA` (TLS and
    /// AUTH), or for a transaction with SMTPUTF8 `UTF8SMTP` / `UTF8SMTPS` / `UTF8SMTPSA`
    /// (RFC 3848, RFC 6531 §3.7.3). AUTH happens only under TLS.
    pub fn protocol(&self) -> &'static str {
        let utf8 = self.envelope.as_ref().is_some_and(|e| e.smtputf8);
        match (utf8, self.tls.is_some(), self.authenticated, self.esmtp) {
            (true, true, true, _) => "UTF8SMTPSA",
            (true, true, false, _) => "UTF8SMTPS",
            (true, false, _, _) => "UTF8SMTP",
            (false, true, true, _) => "ESMTPSA",
            (false, true, false, _) => "ESMTPS",
            (false, false, _, true) => "ESMTP",
            (false, false, _, false) => "SMTP",
        }
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    // ---- processing -------------------------------------------------------------------------

    /// Processes buffered input until it is used up or the machine has to wait.
    fn process(&mut self, now: Instant) {
        let mut input = std::mem::take(&mut self.input);
        let mut pos = 0;
        while let Some(rest) = input.get(pos..).filter(|r| !r.is_empty()) {
            match self.state {
                State::Command | State::AuthResponse => {
                    let Some(used) = self.command_step(rest, now) else {
                        break;
                    };
                    pos += used;
                }
                State::Data => {
                    let params = Arc::clone(&self.params);
                    let (used, done) = self.data.ingest(rest, &mut self.body, &params.limits);
                    pos += used;
                    self.last_activity = now;
                    if done {
                        self.end_of_data();
                    }
                }
                State::AwaitStore
                | State::AwaitEtrn
                | State::AwaitAuth
                | State::AwaitRcpt
                | State::AwaitTls
                | State::Closed => break,
            }
        }
        match self.state {
            // STARTTLS: whatever followed it in plaintext is dropped (CVE-2011-0411).
            State::AwaitTls | State::Closed => input.clear(),
            _ => {
                input.drain(..pos.min(input.len()));
            }
        }
        self.input = input;
    }

    /// While the machine waits, at most `max_buffered_input` octets may be pending.
    fn check_buffered(&mut self) {
        let waiting = matches!(
            self.state,
            State::AwaitStore | State::AwaitEtrn | State::AwaitAuth | State::AwaitRcpt
        );
        if waiting && self.input.len() > self.params.limits.max_buffered_input {
            self.reply(
                421,
                (4, 7, 0),
                self.host_text("Error: too much pipelined input"),
            );
            self.close();
        }
    }

    /// Frames and runs at most one command line from `rest`; returns the bytes used, or
    /// `None` when a complete line has not arrived yet.
    fn command_step(&mut self, rest: &[u8], now: Instant) -> Option<usize> {
        if self.discarding {
            return match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.discarding = false;
                    self.last_activity = now;
                    self.fail(500, (5, 5, 2), "Error: line too long");
                    Some(i + 1)
                }
                None => Some(rest.len()),
            };
        }
        let auth_line = self.state == State::AuthResponse
            || rest
                .get(..5)
                .is_some_and(|verb| verb.eq_ignore_ascii_case(b"AUTH "));
        let max = if auth_line {
            sasl::MAX_AUTH_LINE
        } else {
            self.params.limits.max_command_line
        };
        let window = rest.get(..max.min(rest.len())).unwrap_or_default();
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = rest.get(..=i).unwrap_or_default();
                self.last_activity = now;
                if self.state == State::AuthResponse {
                    self.auth_response(line);
                } else {
                    self.command(line, now);
                }
                Some(i + 1)
            }
            None if rest.len() >= max => {
                // Longer than allowed: drop it as it arrives, answer at its end.
                self.discarding = true;
                Some(window.len())
            }
            None => None,
        }
    }

    /// Runs one command line (`raw` ends with LF, maybe CR LF).
    fn command(&mut self, raw: &[u8], now: Instant) {
        let text = raw.strip_suffix(b"\n").unwrap_or(raw);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.contains(&b'\r') {
            // The grammar parser skips CRs; we do not let a bare CR hide inside a command.
            self.fail(500, (5, 5, 2), "Error: bare CR in command");
            return;
        }
        let trimmed = text.trim_ascii();
        if trimmed.is_empty() {
            self.fail(500, (5, 5, 2), "Error: bad syntax");
            return;
        }
        let verb_len = trimmed
            .iter()
            .position(|b| b.is_ascii_whitespace())
            .unwrap_or(trimmed.len());
        let (verb, args) = trimmed.split_at(verb_len);
        let has_args = !args.trim_ascii().is_empty();
        let verb = verb.to_ascii_uppercase();
        if self.refuse_out_of_order(&verb) {
            return;
        }
        if verb == b"AUTH" {
            // Parsed here: its arguments are credentials, never echoed, never smtp-proto's.
            self.auth_command(args);
            return;
        }

        let request = match Request::parse(&mut raw.iter()) {
            Ok(request) => request,
            Err(err) => {
                self.parse_error(err);
                return;
            }
        };
        self.dispatch(request, raw, has_args, now);
    }

    /// Refuses (and answers) `verb` (upper case) when TLS is required first or the session is
    /// not at a point where it may come; `true` if refused. Sequence errors come before syntax
    /// errors: the client learns the real problem.
    fn refuse_out_of_order(&mut self, verb: &[u8]) -> bool {
        if verb == b"AUTH" && self.client.auth != AuthOffer::None && self.tls.is_none() {
            self.fail(
                538,
                (5, 7, 11),
                "Encryption required for requested authentication mechanism",
            );
            return true;
        }
        if self.client.tls_required && self.tls.is_none() && TLS_ONLY_VERBS.contains(&verb) {
            self.fail(530, (5, 7, 0), "Must issue a STARTTLS command first");
            return true;
        }
        match verb {
            b"MAIL" | b"RCPT" | b"DATA" if self.helo.is_none() => {
                self.fail(503, (5, 5, 1), "Error: send HELO/EHLO first");
                true
            }
            b"MAIL" if self.envelope.is_some() => {
                self.fail(503, (5, 5, 1), "Error: nested MAIL command");
                true
            }
            b"MAIL" if self.client.auth == AuthOffer::Required && !self.authenticated => {
                self.fail(530, (5, 7, 0), "Authentication required");
                true
            }
            b"RCPT" | b"DATA" if self.envelope.is_none() => {
                self.fail(503, (5, 5, 1), "Error: need MAIL command");
                true
            }
            _ => false,
        }
    }

    /// Runs a parsed command (`raw`, its line; `has_args`: text after the verb).
    fn dispatch(
        &mut self,
        request: Request<Cow<'_, str>>,
        raw: &[u8],
        has_args: bool,
        now: Instant,
    ) {
        match request {
            Request::Ehlo { host } => self.hello(&host, true),
            Request::Helo { host } => self.hello(&host, false),
            Request::Mail { from } => self.mail(&from, raw),
            Request::Rcpt { to } => self.rcpt(&to, raw),
            Request::Data if has_args => self.fail(501, (5, 5, 4), "Syntax: DATA"),
            Request::Data => self.data_command(),
            Request::Rset if has_args => self.fail(501, (5, 5, 4), "Syntax: RSET"),
            Request::Rset => {
                self.envelope = None;
                self.reply(250, (2, 0, 0), "Ok");
            }
            Request::Noop { .. } => self.reply(250, (2, 0, 0), "Ok"),
            Request::Vrfy { .. } => self.reply(
                252,
                (2, 5, 2),
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Help { .. } => self.reply(
                214,
                (2, 0, 0),
                "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP ETRN STARTTLS",
            ),
            Request::Etrn { name } => self.etrn(&name),
            Request::StartTls => self.starttls(has_args, now),
            Request::Quit if has_args => self.fail(501, (5, 5, 4), "Syntax: QUIT"),
            Request::Quit => {
                self.reply(221, (2, 0, 0), self.host_text("Bye"));
                self.close();
            }
            // AUTH never gets here (see `command`).
            Request::Lhlo { .. }
            | Request::Auth { .. }
            | Request::Expn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Bdat { .. } => self.fail(502, (5, 5, 1), "Error: command not implemented"),
        }
    }

    fn parse_error(&mut self, err: ParseError) {
        match err {
            ParseError::UnknownCommand => {
                self.fail(500, (5, 5, 1), "Error: command not recognized")
            }
            ParseError::InvalidSenderAddress => {
                self.fail(501, (5, 1, 7), "Bad sender address syntax")
            }
            ParseError::InvalidRecipientAddress => {
                self.fail(501, (5, 1, 3), "Bad recipient address syntax")
            }
            ParseError::SyntaxError { syntax } => {
                self.fail(501, (5, 5, 4), format!("Syntax: {syntax}"))
            }
            ParseError::InvalidParameter { param } => {
                self.fail(501, (5, 5, 4), format!("Invalid {param} parameter value"))
            }
            ParseError::UnsupportedParameter { param } => {
                let param = sanitize(param.as_bytes());
                self.fail(555, (5, 5, 4), format!("Unsupported parameter {param}"))
            }
            ParseError::NeedsMoreData { .. }
            | ParseError::ResponseTooLong
            | ParseError::InvalidResponse { .. } => self.fail(501, (5, 5, 4), "Error: bad syntax"),
        }
    }

    fn hello(&mut self, host: &str, esmtp: bool) {
        if !host.bytes().all(|b| b.is_ascii_graphic()) {
            self.fail(501, (5, 5, 4), "Invalid HELO/EHLO hostname");
            return;
        }
        self.helo = Some(host.to_owned());
        self.esmtp = esmtp;
        self.envelope = None;
        let name = self.params.hostname.clone();
        if !esmtp {
            Reply::plain(250, name).write_to(&mut self.output);
            return;
        }
        let mut lines = vec![
            name,
            "PIPELINING".to_owned(),
            format!("SIZE {}", self.params.limits.max_message_bytes),
            "ETRN".to_owned(),
        ];
        if self.client.starttls_available && self.tls.is_none() {
            lines.push("STARTTLS".to_owned());
        }
        if self.client.auth != AuthOffer::None && self.tls.is_some() && !self.authenticated {
            lines.push(format!("AUTH {}", sasl::ADVERTISED));
        }
        lines.extend(["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"].map(str::to_owned));
        Reply {
            code: 250,
            enhanced: None,
            lines,
        }
        .write_to(&mut self.output);
    }

    fn mail(&mut self, from: &MailFrom<Cow<'_, str>>, raw: &[u8]) {
        if let Some(param) = unsupported_mail_param(from) {
            self.fail(555, (5, 5, 4), format!("Unsupported parameter {param}"));
            return;
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if from.address.is_empty() && !raw_path(raw).is_some_and(<[u8]>::is_empty) {
            // smtp-proto maps `<postmaster>` to the empty path; as a sender it is no address.
            self.fail(501, (5, 1, 7), "Bad sender address syntax");
            return;
        }
        if let Err((code, enhanced, text)) = check_address(&from.address, smtputf8, (5, 1, 7)) {
            self.fail(code, enhanced, text);
            return;
        }
        if !self.sender_allowed(&from.address) {
            let login = sanitize(self.login.as_deref().unwrap_or_default().as_bytes());
            self.fail(
                553,
                (5, 7, 1),
                format!("Sender address rejected: not owned by user {login}"),
            );
            return;
        }
        let size = from.size as u64;
        if size > self.params.limits.max_message_bytes {
            self.fail(
                552,
                (5, 3, 4),
                "Message size exceeds fixed maximum message size",
            );
            return;
        }
        if self.spool_free < size.max(MIN_SPOOL_FREE) {
            self.fail(452, (4, 3, 1), "Insufficient system storage");
            return;
        }
        self.envelope = Some(Envelope {
            // smtp-proto strips the quotes of a quoted local part; put them back, so that what
            // was inside them (`"x> RET=FULL"@…`) never becomes parameters on the way out.
            mail_from: crate::envelope::requote(&from.address),
            rcpt_to: Vec::new(),
            body: if from.flags & MAIL_BODY_8BITMIME != 0 {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8,
            // smtp-proto reports an absent SIZE as 0; `SIZE=0` tells us nothing either.
            declared_size: (size > 0).then_some(size),
        });
        self.reply(250, (2, 1, 0), "Ok");
    }

    fn rcpt(&mut self, to: &RcptTo<Cow<'_, str>>, raw: &[u8]) {
        if to.flags != 0 || to.orcpt.is_some() || to.rrvs != 0 {
            self.fail(555, (5, 5, 4), "Unsupported parameter (DSN is not offered)");
            return;
        }
        let smtputf8 = self.envelope.as_ref().is_some_and(|e| e.smtputf8);
        let address = if to.address.is_empty() {
            // smtp-proto maps both `<>` and `<postmaster>` to the empty path.
            if raw_path(raw).is_some_and(|p| p.eq_ignore_ascii_case(b"postmaster")) {
                // RFC 5321 §4.1.1.3: the bare `postmaster` is ours. It is stored under our
                // first local domain so that routing can never send it to another host.
                match self.params.local_domains.first() {
                    Some(d) => format!("postmaster@{d}"),
                    None => {
                        self.fail(550, (5, 1, 1), "No local postmaster on this gateway");
                        return;
                    }
                }
            } else {
                self.fail(501, (5, 1, 3), "Bad recipient address syntax");
                return;
            }
        } else {
            // smtp-proto strips the quotes of a quoted local part; put them back.
            crate::envelope::requote(&to.address)
        };
        if let Err((code, enhanced, text)) = check_address(&address, smtputf8, (5, 1, 3)) {
            self.fail(code, enhanced, text);
            return;
        }
        let Some(domain) = domain_of(&address) else {
            self.fail(501, (5, 1, 3), "Bad recipient address syntax");
            return;
        };
        let local = self
            .params
            .local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&domain));
        if !local && !self.relay_allowed() {
            self.fail(554, (5, 7, 1), "Relay access denied");
            return;
        }
        let max = self.params.limits.max_recipients;
        let lookup = local && self.needs_lookup(&address, &domain);
        let Some(envelope) = self.envelope.as_mut() else {
            self.fail(503, (5, 5, 1), "Error: need MAIL command");
            return;
        };
        if envelope.rcpt_to.contains(&address) {
            self.reply(250, (2, 1, 5), "Ok");
        } else if envelope.rcpt_to.len() >= max {
            self.fail(452, (4, 5, 3), "Too many recipients");
        } else if lookup {
            self.pending_rcpt = Some(address.clone());
            self.state = State::AwaitRcpt;
            self.events.push_back(Event::CheckRecipient(address));
        } else {
            envelope.rcpt_to.push(address);
            self.reply(250, (2, 1, 5), "Ok");
        }
    }

    /// A local recipient of a validated domain, other than its postmaster.
    fn needs_lookup(&self, address: &str, domain: &str) -> bool {
        let postmaster = address
            .rsplit_once('@')
            .is_some_and(|(l, _)| l.eq_ignore_ascii_case("postmaster"));
        !postmaster
            && self
                .params
                .validated_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
    }

    fn data_command(&mut self) {
        let Some(envelope) = self.envelope.as_ref() else {
            self.fail(503, (5, 5, 1), "Error: need MAIL command");
            return;
        };
        if envelope.rcpt_to.is_empty() {
            self.fail(554, (5, 5, 1), "Error: no valid recipients");
            return;
        }
        let need = envelope.declared_size.unwrap_or(0).max(MIN_SPOOL_FREE);
        if self.spool_free < need {
            self.fail(452, (4, 3, 1), "Insufficient system storage");
            return;
        }
        Reply::plain(354, "End data with <CR><LF>.<CR><LF>").write_to(&mut self.output);
        self.state = State::Data;
        self.data = DataReceiver::default();
        self.body.clear();
        self.events.push_back(Event::MessageStart);
    }

    fn end_of_data(&mut self) {
        let data = std::mem::take(&mut self.data);
        self.state = State::Command;
        let envelope = self.envelope.take();
        if data.too_big {
            self.body.clear();
            self.fail(552, (5, 3, 4), "Error: message too big");
        } else if data.too_long {
            self.body.clear();
            self.fail(500, (5, 5, 2), "Error: line too long");
        } else if data.bare_eol {
            self.body.clear();
            self.fail(
                550,
                (5, 6, 0),
                "Error: bare CR or LF in message text (use CRLF line endings)",
            );
        } else if data.nul {
            self.body.clear();
            self.fail(550, (5, 6, 0), "Error: NUL octet in message text");
        } else if data.hops > MAX_HOPS {
            self.body.clear();
            self.fail(
                554,
                (5, 4, 6),
                format!(
                    "Too many hops ({} Received: headers; mail loop?)",
                    data.hops
                ),
            );
        } else if let Some(envelope) = envelope {
            self.envelope = Some(envelope.clone());
            self.state = State::AwaitStore;
            self.events.push_back(Event::MessageComplete(envelope));
        } else {
            self.body.clear();
            self.reply(451, (4, 3, 0), "Error: no transaction");
        }
    }

    fn etrn(&mut self, name: &str) {
        if !is_domain(name) {
            self.fail(501, (5, 5, 4), "Syntax: ETRN domain");
            return;
        }
        if self.helo.is_none() {
            self.fail(503, (5, 5, 1), "Error: send HELO/EHLO first");
            return;
        }
        if self.envelope.is_some() {
            self.fail(503, (5, 5, 1), "Error: MAIL transaction in progress");
            return;
        }
        if !self.relay_allowed() {
            self.fail(459, (4, 7, 1), "Client not authorized to use ETRN");
            return;
        }
        let domain = name.trim_end_matches('.').to_ascii_lowercase();
        self.etrn = Some(domain.clone());
        self.state = State::AwaitEtrn;
        self.events.push_back(Event::Etrn(domain));
    }

    /// `AUTH mechanism [initial-response]` (`args`: what follows the verb).
    fn auth_command(&mut self, args: &[u8]) {
        let text = std::str::from_utf8(args).unwrap_or("\u{fffd}").trim_ascii();
        let mut words = text.split_ascii_whitespace();
        let (Some(name), initial, None) = (words.next(), words.next(), words.next()) else {
            self.fail(501, (5, 5, 4), "Syntax: AUTH mechanism [initial-response]");
            return;
        };
        if self.client.auth == AuthOffer::None {
            self.fail(502, (5, 5, 1), "Error: command not implemented");
        } else if self.helo.is_none() {
            self.fail(503, (5, 5, 1), "Error: send HELO/EHLO first");
        } else if self.authenticated {
            self.fail(503, (5, 5, 1), "Error: already authenticated");
        } else if self.envelope.is_some() {
            self.fail(503, (5, 5, 1), "Error: MAIL transaction in progress");
        } else if let Some(mechanism) = Mechanism::parse(name) {
            let step = Exchange::start(mechanism, initial).map(|(exchange, progress)| {
                self.sasl = Some(exchange);
                progress
            });
            self.auth_progress(step);
        } else {
            self.fail(504, (5, 5, 4), "Unrecognized authentication type");
        }
    }

    /// A client line answering a `334` challenge.
    fn auth_response(&mut self, raw: &[u8]) {
        let text = raw.strip_suffix(b"\n").unwrap_or(raw);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let line = std::str::from_utf8(text).unwrap_or("\u{fffd}");
        let step = match self.sasl.as_mut() {
            Some(exchange) => exchange.respond(line),
            None => Err(sasl::SaslError::Malformed),
        };
        self.auth_progress(step);
    }

    fn auth_progress(&mut self, step: Result<Progress, sasl::SaslError>) {
        match step {
            Ok(Progress::Challenge(challenge)) => {
                self.state = State::AuthResponse;
                Reply::plain(334, challenge).write_to(&mut self.output);
            }
            Ok(Progress::Done(credentials)) => {
                self.state = State::AwaitAuth;
                self.login = Some(credentials.login.clone());
                self.events.push_back(Event::Authenticate(credentials));
            }
            Err(err) => {
                self.state = State::Command;
                self.sasl = None;
                let enhanced = match err {
                    sasl::SaslError::Cancelled => (5, 0, 0),
                    _ => (5, 5, 2),
                };
                self.fail(501, enhanced, err.to_string());
            }
        }
    }

    /// Sender binding: whether an authenticated client may use `sender` (`<>` always).
    fn sender_allowed(&self, sender: &str) -> bool {
        let Some(login) = self.authenticated() else {
            return true;
        };
        if sender.is_empty() {
            return true;
        }
        match self.params.sender_binding {
            SenderBinding::Off => true,
            SenderBinding::Address => sender.eq_ignore_ascii_case(login),
            SenderBinding::Domain => match (domain_of(sender), domain_of(login)) {
                (Some(a), Some(b)) => a.eq_ignore_ascii_case(&b),
                _ => false,
            },
        }
    }

    fn starttls(&mut self, has_args: bool, now: Instant) {
        if self.tls.is_some() {
            self.fail(503, (5, 5, 1), "Error: TLS already active");
        } else if !self.client.starttls_available {
            self.fail(502, (5, 5, 1), "Error: command not implemented");
        } else if has_args {
            self.fail(501, (5, 5, 4), "Syntax: STARTTLS");
        } else {
            self.reply(220, (2, 0, 0), "Ready to start TLS");
            self.state = State::AwaitTls;
            self.last_activity = now;
            self.events.push_back(Event::StartTls);
        }
    }

    // ---- replies ----------------------------------------------------------------------------

    fn reply(
        &mut self,
        code: u16,
        (class, subject, detail): (u8, u16, u16),
        text: impl Into<String>,
    ) {
        Reply::new(code, EnhancedCode(class, subject, detail), text).write_to(&mut self.output);
    }

    /// An error reply to a client command; too many of them end the session.
    fn fail(&mut self, code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) {
        self.reply(code, enhanced, text);
        self.errors = self.errors.saturating_add(1);
        if self.errors >= self.params.limits.max_errors && self.state != State::Closed {
            self.reply(421, (4, 7, 0), self.host_text("Error: too many errors"));
            self.close();
        }
    }

    fn host_text(&self, text: &str) -> String {
        format!("{} {text}", self.params.hostname)
    }

    fn close(&mut self) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.input.clear();
            self.body.clear();
            self.events.push_back(Event::Close);
        }
    }
}

/// The first unsupported `MAIL FROM` parameter smtp-proto recognised, if any.
fn unsupported_mail_param(from: &MailFrom<Cow<'_, str>>) -> Option<&'static str> {
    let flags = from.flags;
    let checks = [
        (flags & MAIL_BODY_BINARYMIME != 0, "BODY=BINARYMIME"),
        (flags & (MAIL_RET_FULL | MAIL_RET_HDRS) != 0, "RET"),
        (flags & MAIL_REQUIRETLS != 0, "REQUIRETLS"),
        (flags & MAIL_CONPERM != 0, "CONPERM"),
        (
            flags & (MAIL_BY_NOTIFY | MAIL_BY_RETURN | MAIL_BY_TRACE) != 0 || from.by != 0,
            "BY",
        ),
        (from.trans_id.is_some(), "TRANSID"),
        (from.env_id.is_some(), "ENVID"),
        (from.solicit.is_some(), "SOLICIT"),
        (from.mtrk.is_some(), "MTRK"),
        (from.auth.is_some(), "AUTH"),
        (from.hold_for != 0, "HOLDFOR"),
        (from.hold_until != 0, "HOLDUNTIL"),
        (from.mt_priority != 0, "MT-PRIORITY"),
        (
            flags & !(MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_SMTPUTF8) != 0,
            "(unknown)",
        ),
    ];
    checks.iter().find(|(bad, _)| *bad).map(|(_, name)| *name)
}

/// A negative reply: code, enhanced code, text.
type Refusal = (u16, (u8, u16, u16), &'static str);

/// Checks an address the grammar accepted: valid UTF-8, no control characters, non-ASCII
/// only with `SMTPUTF8` (RFC 6531 §3.5: `553 5.6.7`).
fn check_address(address: &str, smtputf8: bool, syntax: (u8, u16, u16)) -> Result<(), Refusal> {
    if address.contains(char::REPLACEMENT_CHARACTER) || address.chars().any(char::is_control) {
        return Err((501, syntax, "Bad address syntax"));
    }
    if !address.is_ascii() && !smtputf8 {
        return Err((553, (5, 6, 7), "Non-ASCII address requires SMTPUTF8"));
    }
    Ok(())
}

/// The raw bytes between the first `<` and the next `>` of a command line.
fn raw_path(raw: &[u8]) -> Option<&[u8]> {
    let start = raw.iter().position(|&b| b == b'<')? + 1;
    let rest = raw.get(start..)?;
    let end = rest.iter().position(|&b| b == b'>')?;
    rest.get(..end)
}

/// A plain domain name (letters, digits, `-`, `.`; RFC 1985 `@`/`#` forms are not offered).
fn is_domain(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Client text made safe to echo: printable ASCII only, bounded.
fn sanitize(text: &[u8]) -> String {
    text.iter()
        .take(MAX_ECHO)
        .map(|&b| {
            if b.is_ascii_graphic() {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    const HOST: &str = "mx.local.test";

    fn params() -> Arc<ServerParams> {
        Arc::new(ServerParams {
            hostname: HOST.to_owned(),
            limits: ServerLimits {
                max_command_line: 512,
                max_text_line: 1000,
                max_message_bytes: 10_000,
                max_recipients: 3,
                max_errors: 10,
                command_timeout: Duration::from_secs(300),
                data_timeout: Duration::from_secs(180),
                max_buffered_input: 4096,
            },
            local_domains: vec!["local.test".to_owned(), "checked.test".to_owned()],
            sender_binding: SenderBinding::Address,
            validated_domains: vec!["checked.test".to_owned()],
        })
    }

    /// Who connects.
    #[derive(Debug, Clone, Copy)]
    enum Peer {
        /// Internet host: no relay, STARTTLS offered.
        Stranger,
        /// In trusted_networks: may relay and ETRN.
        Trusted,
        /// On the forced-TLS list.
        Forced,
        /// No certificate installed: STARTTLS not offered.
        NoCert,
        /// Arrived on an implicit-TLS listener.
        Implicit,
        /// A submission listener: STARTTLS, then AUTH, before MAIL.
        Submission,
        /// A port-25 listener that offers AUTH (under TLS).
        AuthOffered,
    }

    fn client(peer: Peer) -> ClientInfo {
        let addr = |last| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, last), 25));
        ClientInfo {
            peer: addr(9),
            local: addr(1),
            relay_allowed: matches!(peer, Peer::Trusted),
            starttls_available: !matches!(peer, Peer::NoCert),
            tls_required: matches!(peer, Peer::Forced | Peer::Submission),
            implicit_tls: matches!(peer, Peer::Implicit).then(tls_info),
            auth: match peer {
                Peer::Submission => AuthOffer::Required,
                Peer::AuthOffered | Peer::Implicit => AuthOffer::Offered,
                _ => AuthOffer::None,
            },
        }
    }

    fn tls_info() -> TlsInfo {
        TlsInfo {
            version: "TLSv1.3".to_owned(),
            cipher: "TLS_AES_256_GCM_SHA384".to_owned(),
            sni: None,
            verified_client: None,
        }
    }

    /// One thing the client or the runtime does.
    #[derive(Debug, Clone)]
    enum Act {
        Send(Vec<u8>),
        Store(StoreResult),
        Etrn(EtrnResult),
        Tls,
        /// The runtime grants or withdraws relay (VPN peer certificate checked).
        Relay(bool),
        Spool(u64),
        /// Virtual time moves to t0 + secs; `handle_timeout` is called.
        At(u64),
        /// The runtime's verdict on the credentials.
        Auth(AuthResult),
        /// The runtime's verdict on a recipient.
        Rcpt(RcptResult),
    }

    fn send(s: &str) -> Act {
        Act::Send(s.as_bytes().to_vec())
    }

    fn name(event: &Event) -> &'static str {
        match event {
            Event::StartTls => "StartTls",
            Event::MessageStart => "MessageStart",
            Event::MessageComplete(_) => "MessageComplete",
            Event::Etrn(_) => "Etrn",
            Event::Authenticate(_) => "Authenticate",
            Event::CheckRecipient(_) => "CheckRecipient",
            Event::Close => "Close",
        }
    }

    /// The last line of each reply in `out` (`250-…` continuation lines skipped).
    fn finals(out: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(out)
            .split("\r\n")
            .filter(|l| !l.is_empty() && l.as_bytes().get(3) != Some(&b'-'))
            .map(str::to_owned)
            .collect()
    }

    struct Harness {
        s: ServerSession,
        t0: Instant,
        now: Instant,
    }

    impl Harness {
        fn new(peer: Peer) -> Self {
            let t0 = Instant::now();
            let mut s = ServerSession::new(params(), client(peer), t0);
            let greeting = finals(&s.take_output());
            assert_eq!(greeting, vec![format!("220 {HOST} ESMTP Sealgate")]);
            Harness { s, t0, now: t0 }
        }

        /// Does `act`; returns the final reply lines written and the events raised.
        fn act(&mut self, act: &Act) -> (Vec<String>, Vec<&'static str>) {
            match act {
                Act::Send(bytes) => self.s.feed(bytes, self.now),
                Act::Store(r) => self.s.message_stored(r.clone(), self.now),
                Act::Etrn(r) => self.s.etrn_result(*r, self.now),
                Act::Tls => self.s.tls_established(tls_info(), self.now),
                Act::Relay(r) => self.s.set_relay_allowed(*r),
                Act::Spool(b) => self.s.set_spool_free(*b),
                Act::Auth(r) => self.s.auth_result(*r, self.now),
                Act::Rcpt(r) => self.s.rcpt_result(*r, self.now),
                Act::At(secs) => {
                    self.now = self.t0 + Duration::from_secs(*secs);
                    self.s.handle_timeout(self.now);
                }
            }
            let events = std::iter::from_fn(|| self.s.poll_event())
                .map(|e| name(&e))
                .collect();
            (finals(&self.s.take_output()), events)
        }
    }

    type Step = (Act, &'static [&'static str], &'static [&'static str]);

    fn run(case: &str, peer: Peer, steps: &[Step]) {
        let mut h = Harness::new(peer);
        for (i, (act, want_replies, want_events)) in steps.iter().enumerate() {
            let (replies, events) = h.act(act);
            let ok = replies.len() == want_replies.len()
                && replies
                    .iter()
                    .zip(want_replies.iter())
                    .all(|(r, w)| r.starts_with(w));
            assert!(
                ok,
                "{case}: step {i} {act:?}: replies {replies:?}, want {want_replies:?}"
            );
            assert_eq!(&events, want_events, "{case}: step {i} {act:?}: events");
        }
    }

    fn ehlo() -> Step {
        (send("EHLO client.test\r\n"), &["250 "], &[])
    }

    fn mail() -> Step {
        (
            send("MAIL FROM:<alice@remote.test>\r\n"),
            &["250 2.1.0"],
            &[],
        )
    }

    fn rcpt() -> Step {
        (send("RCPT TO:<bob@local.test>\r\n"), &["250 2.1.5"], &[])
    }

    fn data() -> Step {
        (send("DATA\r\n"), &["354 "], &["MessageStart"])
    }

    #[test]
    fn sessions() {
        use Peer::*;
        let cases: Vec<(&str, Peer, Vec<Step>)> = vec![
            (
                "happy path",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (
                        send("Subject: x\r\n\r\nhi\r\n.\r\n"),
                        &[],
                        &["MessageComplete"],
                    ),
                    (
                        Act::Store(StoreResult::Queued("Q1".into())),
                        &["250 2.0.0 Ok: queued as Q1"],
                        &[],
                    ),
                    (send("QUIT\r\n"), &["221 2.0.0"], &["Close"]),
                    (send("NOOP\r\n"), &[], &[]),
                ],
            ),
            (
                "HELO session",
                Stranger,
                vec![
                    (send("HELO client.test\r\n"), &["250 mx.local.test"], &[]),
                    mail(),
                    rcpt(),
                ],
            ),
            (
                "relay denied to strangers, allowed to trusted",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    (
                        send("RCPT TO:<x@other.test>\r\n"),
                        &["554 5.7.1 Relay access denied"],
                        &[],
                    ),
                    (send("RCPT TO:<x@LOCAL.Test>\r\n"), &["250 2.1.5"], &[]),
                    (send("RCPT TO:<x@local.test.evil>\r\n"), &["554 5.7.1"], &[]),
                    (
                        send("RCPT TO:<@local.test:x@other.test>\r\n"),
                        &["554 5.7.1"],
                        &[],
                    ),
                    (
                        send("RCPT TO:<\"x@local.test\"@other.test>\r\n"),
                        &["554 5.7.1"],
                        &[],
                    ),
                ],
            ),
            (
                "relay granted after TLS (VPN peer), never before",
                Stranger,
                vec![
                    (Act::Relay(true), &[], &[]),
                    ehlo(),
                    mail(),
                    (send("RCPT TO:<x@other.test>\r\n"), &["554 5.7.1"], &[]),
                    (send("ETRN other.test\r\n"), &["503 5.5.1"], &[]),
                    (send("RSET\r\n"), &["250 2.0.0"], &[]),
                    (send("STARTTLS\r\n"), &["220 2.0.0"], &["StartTls"]),
                    (Act::Tls, &[], &[]),
                    ehlo(),
                    mail(),
                    (send("RCPT TO:<x@other.test>\r\n"), &["554 5.7.1"], &[]),
                    (Act::Relay(true), &[], &[]),
                    (send("RCPT TO:<x@other.test>\r\n"), &["250 2.1.5"], &[]),
                    (Act::Relay(false), &[], &[]),
                    (send("RCPT TO:<y@other.test>\r\n"), &["554 5.7.1"], &[]),
                    rcpt(),
                ],
            ),
            (
                "trusted may relay",
                Trusted,
                vec![
                    ehlo(),
                    mail(),
                    (send("RCPT TO:<x@other.test>\r\n"), &["250 2.1.5"], &[]),
                ],
            ),
            (
                "addresses without domain",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    (send("RCPT TO:<Postmaster>\r\n"), &["250 2.1.5"], &[]),
                    (send("RCPT TO:<>\r\n"), &["501 5.1.3"], &[]),
                    (send("RCPT TO:<user>\r\n"), &["501 5.1.3"], &[]),
                    (send("RCPT TO:<user@>\r\n"), &["501 5.1.3"], &[]),
                    (send("RCPT TO:bob@local.test\r\n"), &["501 5.5.4"], &[]),
                ],
            ),
            (
                "senders",
                Stranger,
                vec![
                    ehlo(),
                    (send("MAIL FROM:<postmaster>\r\n"), &["501 5.1.7"], &[]),
                    (send("MAIL FROM:<a b@x.test>\r\n"), &["501 5.1.7"], &[]),
                    (send("MAIL FROM:<>\r\n"), &["250 2.1.0"], &[]),
                ],
            ),
            (
                "command order",
                Stranger,
                vec![
                    (send("MAIL FROM:<a@remote.test>\r\n"), &["503 5.5.1"], &[]),
                    (send("RCPT TO:<b@local.test>\r\n"), &["503 5.5.1"], &[]),
                    (send("DATA\r\n"), &["503 5.5.1"], &[]),
                    ehlo(),
                    (send("RCPT TO:<b@local.test>\r\n"), &["503 5.5.1"], &[]),
                    (send("DATA\r\n"), &["503 5.5.1"], &[]),
                    mail(),
                    (send("MAIL FROM:<a@remote.test>\r\n"), &["503 5.5.1"], &[]),
                ],
            ),
            (
                "DATA without recipients, RSET and EHLO reset the transaction",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    (send("DATA\r\n"), &["554 5.5.1"], &[]),
                    (send("RSET\r\n"), &["250 2.0.0"], &[]),
                    (send("RCPT TO:<b@local.test>\r\n"), &["503 5.5.1"], &[]),
                    mail(),
                    ehlo(),
                    (send("RCPT TO:<b@local.test>\r\n"), &["503 5.5.1"], &[]),
                ],
            ),
            (
                "MAIL parameters",
                Stranger,
                vec![
                    ehlo(),
                    (
                        send("MAIL FROM:<a@r.test> SIZE=10001\r\n"),
                        &["552 5.3.4"],
                        &[],
                    ),
                    (
                        send("MAIL FROM:<a@r.test> BODY=BINARYMIME\r\n"),
                        &["555 5.5.4"],
                        &[],
                    ),
                    (
                        send("MAIL FROM:<a@r.test> FOO=bar\r\n"),
                        &["555 5.5.4"],
                        &[],
                    ),
                    (
                        send("MAIL FROM:<a@r.test> RET=FULL\r\n"),
                        &["555 5.5.4"],
                        &[],
                    ),
                    (
                        send("MAIL FROM:<a@r.test> BODY=9BIT\r\n"),
                        &["501 5.5.4"],
                        &[],
                    ),
                    (send("MAIL FROM:<a@r.test> SIZE=x\r\n"), &["501 5.5.4"], &[]),
                    (
                        send("MAIL FROM:<a@r.test> SIZE=9000 BODY=8BITMIME SMTPUTF8\r\n"),
                        &["250 2.1.0"],
                        &[],
                    ),
                    (
                        send("RCPT TO:<b@local.test> NOTIFY=NEVER\r\n"),
                        &["555 5.5.4"],
                        &[],
                    ),
                ],
            ),
            (
                "non-ASCII addresses need SMTPUTF8",
                Stranger,
                vec![
                    ehlo(),
                    (
                        send("MAIL FROM:<j\u{fc}rg@r.test>\r\n"),
                        &["553 5.6.7"],
                        &[],
                    ),
                    (
                        send("MAIL FROM:<j\u{fc}rg@r.test> SMTPUTF8\r\n"),
                        &["250 2.1.0"],
                        &[],
                    ),
                    (
                        send("RCPT TO:<m\u{fc}ller@local.test>\r\n"),
                        &["250 2.1.5"],
                        &[],
                    ),
                ],
            ),
            (
                "too many recipients (duplicates not counted)",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    (send("RCPT TO:<a@local.test>\r\n"), &["250 2.1.5"], &[]),
                    (send("RCPT TO:<a@local.test>\r\n"), &["250 2.1.5"], &[]),
                    (send("RCPT TO:<b@local.test>\r\n"), &["250 2.1.5"], &[]),
                    (send("RCPT TO:<c@local.test>\r\n"), &["250 2.1.5"], &[]),
                    (
                        send("RCPT TO:<d@local.test>\r\n"),
                        &["452 4.5.3 Too many recipients"],
                        &[],
                    ),
                ],
            ),
            (
                "forced TLS",
                Forced,
                vec![
                    ehlo(),
                    (
                        send("MAIL FROM:<a@r.test>\r\n"),
                        &["530 5.7.0 Must issue a STARTTLS command first"],
                        &[],
                    ),
                    (send("RCPT TO:<b@local.test>\r\n"), &["530 5.7.0"], &[]),
                    (send("DATA\r\n"), &["530 5.7.0"], &[]),
                    (send("ETRN local.test\r\n"), &["530 5.7.0"], &[]),
                    (send("NOOP\r\n"), &["250 2.0.0"], &[]),
                    (send("STARTTLS\r\n"), &["220 2.0.0"], &["StartTls"]),
                    (Act::Tls, &[], &[]),
                    ehlo(),
                    mail(),
                    rcpt(),
                ],
            ),
            (
                "forced TLS: AUTH",
                Forced,
                vec![
                    ehlo(),
                    (send("AUTH PLAIN AGFAAGI=\r\n"), &["530 5.7.0"], &[]),
                ],
            ),
            (
                "STARTTLS injection: pipelined plaintext is discarded",
                Stranger,
                vec![
                    (
                        send("EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<a@b.test>\r\n"),
                        &["250 ", "220 2.0.0 Ready to start TLS"],
                        &["StartTls"],
                    ),
                    (send("RCPT TO:<b@local.test>\r\n"), &[], &[]),
                    (Act::Tls, &[], &[]),
                    (send("MAIL FROM:<a@b.test>\r\n"), &["503 5.5.1"], &[]),
                    (send("RCPT TO:<b@local.test>\r\n"), &["503 5.5.1"], &[]),
                    ehlo(),
                    (send("STARTTLS\r\n"), &["503 5.5.1"], &[]),
                    mail(),
                ],
            ),
            (
                "STARTTLS variants",
                Stranger,
                vec![
                    (send("STARTTLS now\r\n"), &["501 5.5.4"], &[]),
                    (send("STARTTLS\r\n"), &["220 2.0.0"], &["StartTls"]),
                ],
            ),
            (
                "STARTTLS without certificate",
                NoCert,
                vec![(send("STARTTLS\r\n"), &["502 5.5.1"], &[])],
            ),
            (
                "STARTTLS on implicit TLS",
                Implicit,
                vec![(send("STARTTLS\r\n"), &["503 5.5.1"], &[])],
            ),
            (
                "command line length",
                Stranger,
                vec![
                    (Act::Send(long_noop(512)), &["250 2.0.0"], &[]),
                    (Act::Send(long_noop(513)), &["500 5.5.2"], &[]),
                    (Act::Send(long_noop(100_000)), &["500 5.5.2"], &[]),
                    (Act::Send(b"NOOP xxxxx".repeat(60)), &[], &[]),
                    (send("\r\nNOOP\r\n"), &["500 5.5.2", "250 2.0.0"], &[]),
                ],
            ),
            (
                "text line length",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (Act::Send(text_line(1000)), &[], &[]),
                    (send(".\r\n"), &[], &["MessageComplete"]),
                    (
                        Act::Store(StoreResult::Queued("Q".into())),
                        &["250 2.0.0"],
                        &[],
                    ),
                    mail(),
                    rcpt(),
                    data(),
                    (Act::Send(text_line(1001)), &[], &[]),
                    (send("more\r\n.\r\n"), &["500 5.5.2"], &[]),
                    (send("RCPT TO:<b@local.test>\r\n"), &["503 5.5.1"], &[]),
                ],
            ),
            (
                "message size",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (Act::Send(text_line(1000).repeat(10)), &[], &[]),
                    (send(".\r\n"), &[], &["MessageComplete"]),
                    (
                        Act::Store(StoreResult::Queued("Q".into())),
                        &["250 2.0.0"],
                        &[],
                    ),
                    mail(),
                    rcpt(),
                    data(),
                    (Act::Send(text_line(1000).repeat(10)), &[], &[]),
                    (send("z\r\n.\r\n"), &["552 5.3.4"], &[]),
                    mail(),
                ],
            ),
            (
                "too many errors",
                Stranger,
                vec![
                    (
                        send("FOO\r\nBAR\r\nBAZ\r\n\r\n"),
                        &["500 5.5.1", "500 5.5.1", "500 5.5.1", "500 5.5.2"],
                        &[],
                    ),
                    (send("A\r\nB\r\nC\r\nD\r\nE\r\n"), &["500 5.5.1"; 5], &[]),
                    (
                        send("QUUX\r\nNOOP\r\n"),
                        &["500 5.5.1", "421 4.7.0"],
                        &["Close"],
                    ),
                    (send("NOOP\r\n"), &[], &[]),
                    (Act::At(10_000), &[], &[]),
                ],
            ),
            (
                "spool space",
                Stranger,
                vec![
                    ehlo(),
                    (Act::Spool(MIN_SPOOL_FREE - 1), &[], &[]),
                    (send("MAIL FROM:<a@r.test>\r\n"), &["452 4.3.1"], &[]),
                    (Act::Spool(MIN_SPOOL_FREE), &[], &[]),
                    mail(),
                    rcpt(),
                    (Act::Spool(1000), &[], &[]),
                    (send("DATA\r\n"), &["452 4.3.1"], &[]),
                    (Act::Spool(u64::MAX), &[], &[]),
                    data(),
                ],
            ),
            (
                "store failures reset the transaction",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (send(".\r\n"), &[], &["MessageComplete"]),
                    (Act::Store(StoreResult::NoSpace), &["452 4.3.1"], &[]),
                    (send("RCPT TO:<b@local.test>\r\n"), &["503 5.5.1"], &[]),
                    mail(),
                    rcpt(),
                    data(),
                    (send(".\r\n"), &[], &["MessageComplete"]),
                    (Act::Store(StoreResult::Failed), &["451 4.3.0"], &[]),
                    (Act::Store(StoreResult::Failed), &[], &[]),
                ],
            ),
            (
                "ETRN from a trusted client",
                Trusted,
                vec![
                    (send("ETRN local.test\r\n"), &["503 5.5.1"], &[]),
                    ehlo(),
                    (send("ETRN\r\n"), &["501 5.5.4"], &[]),
                    (send("ETRN #queue\r\n"), &["501 5.5.4"], &[]),
                    (send("ETRN bad..domain\r\n"), &["501 5.5.4"], &[]),
                    (send("ETRN Local.Test\r\nNOOP\r\n"), &[], &["Etrn"]),
                    (
                        Act::Etrn(EtrnResult::Started),
                        &["250 2.0.0 Queuing for node local.test started", "250 2.0.0"],
                        &[],
                    ),
                    (send("ETRN other.test\r\n"), &[], &["Etrn"]),
                    (Act::Etrn(EtrnResult::NoMessages), &["458 4.0.0"], &[]),
                    (send("ETRN other.test\r\n"), &[], &["Etrn"]),
                    (Act::Etrn(EtrnResult::NotAllowed), &["459 4.0.0"], &[]),
                    mail(),
                    (send("ETRN local.test\r\n"), &["503 5.5.1"], &[]),
                ],
            ),
            (
                "ETRN from a stranger",
                Stranger,
                vec![ehlo(), (send("ETRN local.test\r\n"), &["459 4.7.1"], &[])],
            ),
            (
                "pipelining in one feed",
                Stranger,
                vec![
                    (
                        send(
                            "EHLO c.test\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<b@local.test>\r\n\
                             RCPT TO:<c@other.test>\r\nDATA\r\n",
                        ),
                        &["250 ", "250 2.1.0", "250 2.1.5", "554 5.7.1", "354 "],
                        &["MessageStart"],
                    ),
                    (
                        send("hi\r\n.\r\nMAIL FROM:<a@r.test>\r\nQUIT\r\n"),
                        &[],
                        &["MessageComplete"],
                    ),
                    (
                        Act::Store(StoreResult::Queued("Q7".into())),
                        &["250 2.0.0 Ok: queued as Q7", "250 2.1.0", "221 2.0.0"],
                        &["Close"],
                    ),
                ],
            ),
            (
                "pipelined input beyond the buffer while waiting",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (send(".\r\n"), &[], &["MessageComplete"]),
                    (Act::Send(b"NOOP\r\n".repeat(600)), &[], &[]),
                    (
                        Act::Send(b"NOOP\r\n".repeat(200)),
                        &["421 4.7.0"],
                        &["Close"],
                    ),
                    (Act::Store(StoreResult::Queued("Q".into())), &[], &[]),
                ],
            ),
            (
                "pipelined input beyond the buffer in the same feed as the dot",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (
                        Act::Send([&b".\r\n"[..], &b"NOOP\r\n".repeat(700)].concat()),
                        &["421 4.7.0"],
                        &["MessageComplete", "Close"],
                    ),
                ],
            ),
            (
                "command timeout",
                Stranger,
                vec![
                    ehlo(),
                    (Act::At(200), &[], &[]),
                    (send("NOOP\r\n"), &["250 2.0.0"], &[]),
                    (send("NOO"), &[], &[]),
                    (Act::At(499), &[], &[]),
                    (
                        Act::At(500),
                        &["421 4.4.2 mx.local.test Error: timeout exceeded"],
                        &["Close"],
                    ),
                    (Act::At(900), &[], &[]),
                ],
            ),
            (
                "data timeout",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (Act::At(100), &[], &[]),
                    (send("line\r\n"), &[], &[]),
                    (Act::At(279), &[], &[]),
                    (Act::At(280), &["421 4.4.2"], &["Close"]),
                ],
            ),
            (
                "no timeout while the runtime stores",
                Stranger,
                vec![
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (send(".\r\n"), &[], &["MessageComplete"]),
                    (Act::At(10_000), &[], &[]),
                ],
            ),
            (
                "other commands",
                Stranger,
                vec![
                    (send("NOOP\r\n"), &["250 2.0.0"], &[]),
                    (send("noop\n"), &["250 2.0.0"], &[]),
                    (send("VRFY bob\r\n"), &["252 2.5.2"], &[]),
                    (send("HELP\r\n"), &["214 2.0.0"], &[]),
                    (send("RSET\r\n"), &["250 2.0.0"], &[]),
                    (send("EXPN staff\r\n"), &["502 5.5.1"], &[]),
                    (send("NO\rOP\r\n"), &["500 5.5.2"], &[]),
                ],
            ),
            (
                "syntax errors",
                Stranger,
                vec![
                    (send("RSET now\r\n"), &["501 5.5.4"], &[]),
                    (send("EHLO\r\n"), &["501 5.5.4"], &[]),
                    (send("EHLO a\x01b\r\n"), &["501 5.5.4"], &[]),
                    ehlo(),
                    mail(),
                    rcpt(),
                    (send("DATA now\r\n"), &["501 5.5.4"], &[]),
                ],
            ),
            (
                "QUIT with pipelined rest",
                Stranger,
                vec![
                    (send("QUIT\r\nNOOP\r\n"), &["221 2.0.0"], &["Close"]),
                    (send("NOOP\r\n"), &[], &[]),
                ],
            ),
        ];
        for (case, peer, steps) in &cases {
            run(case, *peer, steps);
        }
    }

    /// `NOOP` padded to exactly `len` octets including CRLF.
    fn long_noop(len: usize) -> Vec<u8> {
        let mut line = b"NOOP ".to_vec();
        line.resize(len - 2, b'x');
        line.extend_from_slice(b"\r\n");
        line
    }

    /// A text line of exactly `len` octets including CRLF.
    fn text_line(len: usize) -> Vec<u8> {
        let mut line = vec![b'y'; len - 2];
        line.extend_from_slice(b"\r\n");
        line
    }

    /// Sequences that must not end DATA; the final CRLF.CRLF then refuses the message.
    #[test]
    fn smuggling() {
        let tricks: [&[u8]; 8] = [
            b"a\n.\nMAIL FROM:<x@evil.test>\r\n",
            b"a\r.\rMAIL FROM:<x@evil.test>\r\n",
            b"a\n.\r\nMAIL FROM:<x@evil.test>\r\n",
            b"a\r\n.\nMAIL FROM:<x@evil.test>\r\n",
            b"a\r\n.\rMAIL FROM:<x@evil.test>\r\n",
            b"a\r.\r\nMAIL FROM:<x@evil.test>\r\n",
            b"bare\nline feed\r\n",
            b"bare\rcarriage return\r\n",
        ];
        for trick in tricks {
            let case = String::from_utf8_lossy(trick).escape_debug().to_string();
            run(
                &case,
                Peer::Stranger,
                &[
                    ehlo(),
                    mail(),
                    rcpt(),
                    data(),
                    (Act::Send(trick.to_vec()), &[], &[]),
                    (send("RSET\r\n"), &[], &[]),
                    (send(".\r\n"), &["550 5.6.0"], &[]),
                    (send("RCPT TO:<b@local.test>\r\n"), &["503 5.5.1"], &[]),
                ],
            );
        }
    }

    #[test]
    fn message_body_and_envelope() {
        let mut h = Harness::new(Peer::Stranger);
        h.act(&send(
            "EHLO c.test\r\nMAIL FROM:<a@r.test> BODY=8BITMIME SIZE=500\r\n\
             RCPT TO:<b@local.test>\r\nRCPT TO:<postmaster>\r\nDATA\r\n",
        ));
        assert!(!h.s.wants_input() || h.s.body_len() == 0);
        h.s.feed(b"..leading dot\r\n", h.now);
        assert_eq!(h.s.take_body(), b".leading dot\r\n");
        h.s.feed(b"\r\nmiddle\r\n...\r\n\r\n.", h.now);
        assert_eq!(h.s.body_len(), b"\r\nmiddle\r\n..\r\n\r\n".len());
        assert!(h.s.wants_input());
        h.s.feed(b"\r\n", h.now);
        assert_eq!(h.s.take_body(), b"\r\nmiddle\r\n..\r\n\r\n");
        let events: Vec<Event> = std::iter::from_fn(|| h.s.poll_event()).collect();
        let want = Envelope {
            mail_from: "a@r.test".into(),
            rcpt_to: vec!["b@local.test".into(), "postmaster@local.test".into()],
            body: BodyType::EightBitMime,
            smtputf8: false,
            declared_size: Some(500),
        };
        assert_eq!(events, vec![Event::MessageComplete(want)]);
        assert!(!h.s.wants_input());
        assert_eq!(h.s.deadline(), None);
        h.s.message_stored(StoreResult::Queued("A".into()), h.now);
        assert!(h.s.wants_input());

        // An empty message.
        h.act(&send(
            "MAIL FROM:<>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n.\r\n",
        ));
        assert_eq!(h.s.take_body(), b"");
    }

    #[test]
    fn ehlo_advertisement_and_protocol() {
        let mut h = Harness::new(Peer::Stranger);
        assert_eq!(h.s.protocol(), "SMTP");
        h.s.feed(b"EHLO c.test\r\n", h.now);
        let out = String::from_utf8(h.s.take_output()).unwrap_or_default();
        assert_eq!(
            out,
            "250-mx.local.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-ETRN\r\n\
             250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
        );
        assert_eq!(h.s.protocol(), "ESMTP");
        assert_eq!(h.s.helo(), Some("c.test"));
        h.s.feed(b"STARTTLS\r\n", h.now);
        assert!(!h.s.wants_input());
        assert_eq!(h.s.tls(), None);
        h.s.tls_established(tls_info(), h.now);
        assert_eq!(h.s.helo(), None);
        assert_eq!(h.s.tls(), Some(&tls_info()));
        assert_eq!(h.s.protocol(), "ESMTPS");
        h.s.take_output();
        h.s.feed(b"EHLO c.test\r\n", h.now);
        let out = String::from_utf8(h.s.take_output()).unwrap_or_default();
        assert!(
            out.starts_with("250-mx.local.test\r\n") && !out.contains("STARTTLS"),
            "{out}"
        );
        // A transaction with SMTPUTF8 is received "with UTF8SMTPS"; the next one without it
        // is ESMTPS again.
        h.s.feed(b"MAIL FROM:<j\xc3\xbcrgen@c.test> SMTPUTF8\r\n", h.now);
        assert!(String::from_utf8_lossy(&h.s.take_output()).starts_with("250"));
        assert_eq!(h.s.protocol(), "UTF8SMTPS");
        h.s.feed(b"RSET\r\nMAIL FROM:<a@c.test>\r\n", h.now);
        h.s.take_output();
        assert_eq!(h.s.protocol(), "ESMTPS");

        let mut h = Harness::new(Peer::NoCert);
        h.s.feed(b"HELO c.test\r\n", h.now);
        assert_eq!(h.s.protocol(), "SMTP");
        h.s.feed(b"EHLO c.test\r\n", h.now);
        assert!(!String::from_utf8_lossy(&h.s.take_output()).contains("STARTTLS"));
        h.s.feed(b"MAIL FROM:<a@c.test> SMTPUTF8\r\n", h.now);
        assert_eq!(h.s.protocol(), "UTF8SMTP");

        let h = Harness::new(Peer::Implicit);
        assert_eq!(h.s.protocol(), "ESMTPS");
    }

    /// Runs a whole transcript, answering every event, feeding it in chunks of `chunk`.
    fn transcript(input: &[u8], chunk: usize) -> (Vec<u8>, Vec<Event>, Vec<u8>) {
        let t0 = Instant::now();
        let mut s = ServerSession::new(params(), client(Peer::Trusted), t0);
        let (mut out, mut events, mut body) = (Vec::new(), Vec::new(), Vec::new());
        // Body bytes drained for the current message, as a runtime spills them.
        let mut pending = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            s.feed(piece, t0);
            while let Some(event) = s.poll_event() {
                if event == Event::MessageStart {
                    pending.clear();
                }
                pending.extend(s.take_body());
                match &event {
                    Event::MessageComplete(_) => {
                        body.append(&mut pending);
                        s.message_stored(StoreResult::Queued("Q".into()), t0)
                    }
                    Event::Etrn(_) => s.etrn_result(EtrnResult::Started, t0),
                    Event::StartTls => s.tls_established(tls_info(), t0),
                    Event::Authenticate(_) => s.auth_result(AuthResult::Rejected, t0),
                    Event::CheckRecipient(_) => s.rcpt_result(RcptResult::Exists, t0),
                    Event::MessageStart | Event::Close => {}
                }
                events.push(event);
            }
            pending.extend(s.take_body());
            out.extend(s.take_output());
        }
        (out, events, body)
    }

    /// Final replies to one message with `text` as its DATA.
    fn data_reply(text: &str) -> String {
        let input = format!(
            "EHLO c.test\r\nMAIL FROM:<a@r.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n{text}.\r\n"
        );
        let (out, _, _) = transcript(input.as_bytes(), 7);
        finals(&out).last().cloned().unwrap_or_default()
    }

    #[test]
    fn stress_shortens_idle_timeouts_outside_transactions() {
        let mut h = Harness::new(Peer::Stranger);
        let t0 = h.now;
        let idle = t0 + Duration::from_secs(300);
        assert_eq!(h.s.deadline(), Some(idle));
        h.s.set_stress(true);
        assert_eq!(h.s.deadline(), Some(t0 + STRESS_COMMAND_TIMEOUT));
        h.act(&send("EHLO c.test\r\nMAIL FROM:<a@r.test>\r\n"));
        // Inside a transaction the full timeout holds.
        assert_eq!(h.s.deadline(), Some(h.now + Duration::from_secs(300)));
        h.s.set_stress(false);
        h.act(&send("RSET\r\n"));
        assert_eq!(h.s.deadline(), Some(h.now + Duration::from_secs(300)));
    }

    #[test]
    fn nul_octets_are_refused_like_bare_line_ends() {
        for text in [
            "hello\r\n\x00.\r\nMAIL FROM:<x@evil.test>\r\n",
            "a\x00b\r\n",
            "\x00\r\n",
        ] {
            assert!(
                data_reply(text).starts_with("550 5.6.0"),
                "{text:?}: {}",
                data_reply(text)
            );
        }
        assert!(
            data_reply("clean\r\n").starts_with("250"),
            "{}",
            data_reply("clean\r\n")
        );
    }

    #[test]
    fn too_many_hops_is_a_loop() {
        let headers = |n: usize| "Received: from x by y\r\n\tfolded; date\r\n".repeat(n);
        let table = [
            (
                format!("{}Subject: s\r\n\r\nbody\r\n", headers(MAX_HOPS)),
                "250",
            ),
            (
                format!("{}Subject: s\r\n\r\nbody\r\n", headers(MAX_HOPS + 1)),
                "554 5.4.6",
            ),
            (
                format!("RECEIVED: a\r\n{}\r\n", headers(MAX_HOPS)),
                "554 5.4.6",
            ),
            // Only the header section counts: the same lines in the body are text.
            (
                format!("Subject: s\r\n\r\n{}", headers(MAX_HOPS + 5)),
                "250",
            ),
        ];
        for (text, want) in table {
            let got = data_reply(&text);
            assert!(got.starts_with(want), "{want}: {got}");
        }
    }

    #[test]
    fn quoted_senders_keep_their_quotes() {
        let cases = [
            ("<\"john smith\"@r.test>", "\"john smith\"@r.test"),
            (
                "<\"x> RET=FULL AUTH=<ceo@corp.test> ENVID=\"@evil.test>",
                "\"x> RET=FULL AUTH=<ceo@corp.test> ENVID=\"@evil.test",
            ),
            ("<plain.user@r.test>", "plain.user@r.test"),
        ];
        for (path, want) in cases {
            let input = format!(
                "EHLO c.test\r\nMAIL FROM:{path}\r\nRCPT TO:<b@local.test>\r\nDATA\r\nx\r\n.\r\n"
            );
            let (_, events, _) = transcript(input.as_bytes(), input.len());
            let from: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    Event::MessageComplete(env) => Some(env.mail_from.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(from, vec![want], "{path}");
        }
    }

    /// `AUTH PLAIN` for alice@local.test / pw, as an initial response.
    const PLAIN_IR: &str = "AGFsaWNlQGxvY2FsLnRlc3QAcHc=";

    fn starttls() -> [Step; 2] {
        [
            (send("STARTTLS\r\n"), &["220 2.0.0"], &["StartTls"]),
            (Act::Tls, &[], &[]),
        ]
    }

    fn auth_ok() -> [Step; 2] {
        [
            (
                send(&format!("AUTH PLAIN {PLAIN_IR}\r\n")),
                &[],
                &["Authenticate"],
            ),
            (Act::Auth(AuthResult::Accepted), &["235 2.7.0"], &[]),
        ]
    }

    #[test]
    fn recipient_validation() {
        let mail: Step = (send("MAIL FROM:<a@remote.test>\r\n"), &["250 2.1.0"], &[]);
        let ask = |rcpt: &str| -> Step {
            (
                Act::Send(format!("RCPT TO:<{rcpt}>\r\n").into_bytes()),
                &[],
                &["CheckRecipient"],
            )
        };
        let cases: Vec<(&str, Vec<Step>)> = vec![
            (
                "known, unknown, directory down; DATA carries the known one only",
                vec![
                    ehlo(),
                    mail.clone(),
                    ask("bob@checked.test"),
                    (Act::Rcpt(RcptResult::Exists), &["250 2.1.5"], &[]),
                    ask("nobody@checked.test"),
                    (
                        Act::Rcpt(RcptResult::Unknown),
                        &["550 5.1.1 <nobody@checked.test>"],
                        &[],
                    ),
                    ask("carol@CHECKED.test"),
                    (Act::Rcpt(RcptResult::Unavailable), &["451 4.4.3"], &[]),
                    (send("DATA\r\n"), &["354"], &["MessageStart"]),
                    (send("x\r\n.\r\n"), &[], &["MessageComplete"]),
                ],
            ),
            (
                "postmaster, a duplicate and unvalidated domains are not looked up",
                vec![
                    ehlo(),
                    mail.clone(),
                    (
                        send("RCPT TO:<Postmaster@checked.test>\r\n"),
                        &["250 2.1.5"],
                        &[],
                    ),
                    (send("RCPT TO:<x@local.test>\r\n"), &["250 2.1.5"], &[]),
                    ask("bob@checked.test"),
                    (Act::Rcpt(RcptResult::Exists), &["250 2.1.5"], &[]),
                    (send("RCPT TO:<bob@checked.test>\r\n"), &["250 2.1.5"], &[]),
                    (send("RCPT TO:<y@checked.test>\r\n"), &["452 4.5.3"], &[]),
                ],
            ),
            (
                "pipelined commands wait for the lookup, in order",
                vec![
                    ehlo(),
                    (
                        send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@checked.test>\r\nDATA\r\n"),
                        &["250 2.1.0"],
                        &["CheckRecipient"],
                    ),
                    (
                        Act::Rcpt(RcptResult::Unknown),
                        &["550 5.1.1", "554 5.5.1"],
                        &[],
                    ),
                ],
            ),
            (
                "a lookup answer with nothing asked changes nothing",
                vec![
                    ehlo(),
                    (Act::Rcpt(RcptResult::Exists), &[], &[]),
                    (send("RCPT TO:<bob@checked.test>\r\n"), &["503 5.5.1"], &[]),
                ],
            ),
            (
                "a relay stranger to another domain is refused before any lookup",
                vec![
                    ehlo(),
                    mail,
                    (send("RCPT TO:<bob@else.test>\r\n"), &["554 5.7.1"], &[]),
                ],
            ),
        ];
        for (case, steps) in cases {
            run(case, Peer::Stranger, &steps);
        }
    }

    #[test]
    fn auth_sessions() {
        let foreign_rcpt: Step = (send("RCPT TO:<x@remote.test>\r\n"), &["250 2.1.5"], &[]);
        let own_mail: Step = (
            send("MAIL FROM:<alice@local.test>\r\n"),
            &["250 2.1.0"],
            &[],
        );
        let cases: Vec<(&str, Peer, Vec<Step>)> = vec![
            (
                "submission: AUTH before STARTTLS is 538",
                Peer::Submission,
                vec![
                    ehlo(),
                    (
                        send(&format!("AUTH PLAIN {PLAIN_IR}\r\n")),
                        &["538 5.7.11"],
                        &[],
                    ),
                    (
                        send("MAIL FROM:<alice@local.test>\r\n"),
                        &["530 5.7.0 Must issue"],
                        &[],
                    ),
                ],
            ),
            ("submission: MAIL before AUTH is 530", Peer::Submission, {
                let mut v = vec![ehlo()];
                v.extend(starttls());
                v.extend([
                    ehlo(),
                    (
                        send("MAIL FROM:<alice@local.test>\r\n"),
                        &["530 5.7.0 Authentication required"][..],
                        &[][..],
                    ),
                ]);
                v
            }),
            (
                "submission: authenticated, relays, sender bound",
                Peer::Submission,
                {
                    let mut v = vec![ehlo()];
                    v.extend(starttls());
                    v.push(ehlo());
                    v.extend(auth_ok());
                    v.extend([
                        (
                            send("MAIL FROM:<mallory@local.test>\r\n"),
                            &["553 5.7.1"][..],
                            &[][..],
                        ),
                        (
                            send("MAIL FROM:<ALICE@Local.Test>\r\n"),
                            &["250 2.1.0"],
                            &[],
                        ),
                        foreign_rcpt.clone(),
                        (send("RSET\r\n"), &["250 2.0.0"], &[]),
                        (send("MAIL FROM:<>\r\n"), &["250 2.1.0"], &[]),
                        (send("RSET\r\n"), &["250 2.0.0"], &[]),
                        (
                            send(&format!("AUTH PLAIN {PLAIN_IR}\r\n")),
                            &["503 5.5.1"],
                            &[],
                        ),
                    ]);
                    v
                },
            ),
            (
                "LOGIN with challenges; wrong password",
                Peer::Implicit,
                vec![
                    ehlo(),
                    (send("AUTH LOGIN\r\n"), &["334 VXNlcm5hbWU6"], &[]),
                    (
                        send("YWxpY2VAbG9jYWwudGVzdA==\r\n"),
                        &["334 UGFzc3dvcmQ6"],
                        &[],
                    ),
                    (send("cHc=\r\n"), &[], &["Authenticate"]),
                    (Act::Auth(AuthResult::Rejected), &["535 5.7.8"], &[]),
                    own_mail.clone(),
                    (send("RCPT TO:<x@remote.test>\r\n"), &["554 5.7.1"], &[]),
                ],
            ),
            (
                "PLAIN with an empty challenge; backend down",
                Peer::Implicit,
                vec![
                    ehlo(),
                    (send("AUTH plain\r\n"), &["334"], &[]),
                    (send(&format!("{PLAIN_IR}\r\n")), &[], &["Authenticate"]),
                    (Act::Auth(AuthResult::Unavailable), &["454 4.7.0"], &[]),
                    (send("AUTH PLAIN\r\n"), &["334"], &[]),
                    (send("*\r\n"), &["501 5.0.0"], &[]),
                    (send("AUTH PLAIN !!!\r\n"), &["501 5.5.2"], &[]),
                    (send("AUTH CRAM-MD5\r\n"), &["504 5.5.4"], &[]),
                    (send("AUTH\r\n"), &["501 5.5.4"], &[]),
                ],
            ),
            (
                "port 25 with AUTH: strangers still deliver locally",
                Peer::AuthOffered,
                vec![
                    ehlo(),
                    (send("AUTH LOGIN\r\n"), &["538 5.7.11"], &[]),
                    mail(),
                    rcpt(),
                    (send("RSET\r\n"), &["250 2.0.0"], &[]),
                ],
            ),
            (
                "AUTH needs EHLO and no transaction",
                Peer::Implicit,
                vec![
                    (
                        send(&format!("AUTH PLAIN {PLAIN_IR}\r\n")),
                        &["503 5.5.1"],
                        &[],
                    ),
                    ehlo(),
                    mail(),
                    (
                        send(&format!("AUTH PLAIN {PLAIN_IR}\r\n")),
                        &["503 5.5.1"],
                        &[],
                    ),
                ],
            ),
            ("no AUTH on a listener without it", Peer::Stranger, {
                let mut v = vec![ehlo()];
                v.extend(starttls());
                v.extend([
                    ehlo(),
                    (
                        send(&format!("AUTH PLAIN {PLAIN_IR}\r\n")),
                        &["502 5.5.1"][..],
                        &[][..],
                    ),
                ]);
                v
            }),
            (
                "pipelined input waits for the verdict",
                Peer::Implicit,
                vec![
                    ehlo(),
                    (
                        send(&format!(
                            "AUTH PLAIN {PLAIN_IR}\r\nMAIL FROM:<alice@local.test>\r\n"
                        )),
                        &[],
                        &["Authenticate"],
                    ),
                    (
                        Act::Auth(AuthResult::Accepted),
                        &["235 2.7.0", "250 2.1.0"],
                        &[],
                    ),
                    foreign_rcpt,
                ],
            ),
        ];
        for (case, peer, steps) in cases {
            run(case, peer, &steps);
        }
    }

    #[test]
    fn auth_is_advertised_only_under_tls_and_marks_received() {
        let ehlo_lines = |h: &mut Harness| {
            h.s.feed(b"EHLO c.test\r\n", h.now);
            String::from_utf8_lossy(&h.s.take_output()).into_owned()
        };
        let mut h = Harness::new(Peer::Submission);
        assert!(!ehlo_lines(&mut h).contains("AUTH"));
        h.s.feed(b"STARTTLS\r\n", h.now);
        assert_eq!(h.s.poll_event(), Some(Event::StartTls));
        h.s.tls_established(tls_info(), h.now);
        assert!(ehlo_lines(&mut h).contains("250-AUTH PLAIN LOGIN\r\n"));
        h.s.feed(format!("AUTH PLAIN {PLAIN_IR}\r\n").as_bytes(), h.now);
        let Some(Event::Authenticate(creds)) = h.s.poll_event() else {
            panic!("no Authenticate event");
        };
        assert_eq!(creds.login, "alice@local.test");
        assert_eq!(creds.password.expose(), b"pw");
        h.s.auth_result(AuthResult::Accepted, h.now);
        assert_eq!(h.s.authenticated(), Some("alice@local.test"));
        assert_eq!(h.s.protocol(), "ESMTPSA");
        assert!(!ehlo_lines(&mut h).contains("AUTH"), "not offered again");
        // Without TLS nothing is offered on a listener that offers AUTH.
        let mut h = Harness::new(Peer::AuthOffered);
        assert!(!ehlo_lines(&mut h).contains("AUTH"));
    }

    #[test]
    fn a_long_auth_line_is_allowed_up_to_its_own_limit() {
        let mut h = Harness::new(Peer::Implicit);
        h.s.feed(b"EHLO c.test\r\n", h.now);
        h.s.take_output();
        // 2000 octets: beyond the 512 of a command line, within RFC 4954's 12288.
        let long = format!("AUTH PLAIN {}\r\n", "A".repeat(2000));
        h.s.feed(long.as_bytes(), h.now);
        let out = finals(&h.s.take_output());
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(
            out.first().is_some_and(|l| l.starts_with("501 5.5.2")),
            "{out:?}"
        );
        let too_long = format!("AUTH PLAIN {}\r\n", "A".repeat(sasl::MAX_AUTH_LINE));
        h.s.feed(too_long.as_bytes(), h.now);
        let out = finals(&h.s.take_output());
        assert!(
            out.first().is_some_and(|l| l.starts_with("500 5.5.2")),
            "{out:?}"
        );
    }

    #[test]
    fn every_transaction_starts_with_fresh_parameters() {
        let mail = |params: &str| {
            format!("MAIL FROM:<a@r.test>{params}\r\nRCPT TO:<b@local.test>\r\nDATA\r\nx\r\n.\r\n")
        };
        let kinds = [
            ("", BodyType::SevenBit, false, None),
            (" BODY=8BITMIME", BodyType::EightBitMime, false, None),
            (" SMTPUTF8", BodyType::SevenBit, true, None),
            (" SIZE=300", BodyType::SevenBit, false, Some(300)),
        ];
        for first in &kinds {
            for second in &kinds {
                let input = format!("EHLO c.test\r\n{}{}QUIT\r\n", mail(first.0), mail(second.0));
                let (_, events, _) = transcript(input.as_bytes(), input.len());
                let got: Vec<_> = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::MessageComplete(env) => {
                            Some((env.body, env.smtputf8, env.declared_size))
                        }
                        _ => None,
                    })
                    .collect();
                let want = |k: &(&str, BodyType, bool, Option<u64>)| (k.1, k.2, k.3);
                assert_eq!(
                    got,
                    vec![want(first), want(second)],
                    "{:?} then {:?}",
                    first.0,
                    second.0
                );
            }
        }
    }

    #[test]
    fn byte_at_a_time_equals_one_shot() {
        let session = b"EHLO c.test\r\nMAIL FROM:<a@r.test> SIZE=100\r\nRCPT TO:<b@local.test>\r\n\
            RCPT TO:<c@far.test>\r\nDATA\r\nSubject: t\r\n\r\n..dots\r\nline\r\n.\r\n\
            ETRN local.test\r\nBOGUS\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n\
            smuggle\n.\nx\r\n.\r\nNOOP\r\nQUIT\r\nNOOP\r\n";
        let whole = transcript(session, session.len());
        assert_eq!(finals(&whole.0).len(), 16, "{:?}", finals(&whole.0));
        for chunk in [1, 2, 3, 7, 64] {
            let got = transcript(session, chunk);
            assert_eq!(
                String::from_utf8_lossy(&got.0),
                String::from_utf8_lossy(&whole.0),
                "chunk {chunk}"
            );
            assert_eq!(got, whole, "chunk {chunk}");
        }
        assert!(finals(&whole.0).iter().any(|l| l.starts_with("550 5.6.0")));
        assert_eq!(whole.2, b"Subject: t\r\n\r\n.dots\r\nline\r\n");
    }

    #[test]
    fn binary_garbage() {
        let mut garbage = Vec::new();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            // xorshift: deterministic noise with every byte value.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            garbage.push(x.to_le_bytes()[0]);
        }
        for chunk in [1, 13, 4096, garbage.len()] {
            let (out, events, body) = transcript(&garbage, chunk);
            assert!(body.is_empty());
            assert_eq!(events.last(), Some(&Event::Close));
            for line in finals(&out) {
                let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                assert!((200..600).contains(&code), "{line}");
            }
        }
    }

    #[test]
    fn nothing_after_close() {
        let mut h = Harness::new(Peer::Stranger);
        h.act(&send("QUIT\r\n"));
        assert!(h.s.is_closed() && !h.s.wants_input());
        assert_eq!(h.s.deadline(), None);
        h.s.feed(b"EHLO x\r\n", h.now);
        h.s.message_stored(StoreResult::Failed, h.now);
        h.s.etrn_result(EtrnResult::Started, h.now);
        h.s.tls_established(tls_info(), h.now);
        assert!(!h.s.has_output() && h.s.poll_event().is_none() && h.s.tls().is_none());
    }

    #[test]
    fn handshake_timeout_closes_silently() {
        let mut h = Harness::new(Peer::Stranger);
        h.act(&send("STARTTLS\r\n"));
        assert!(h.act(&Act::At(299)).1.is_empty());
        let (replies, events) = h.act(&Act::At(300));
        assert!(replies.is_empty());
        assert_eq!(events, vec!["Close"]);
    }

    /// The DATA receiver on its own (as sealctl's sink uses it): whole and byte by byte.
    #[test]
    fn data_receiver_alone() {
        let limits = ServerLimits {
            max_text_line: 10,
            max_message_bytes: 20,
            ..ServerLimits::default()
        };
        // (input, consumed, done, body, too_big, line_too_long, bare_eol)
        type Case = (&'static [u8], usize, bool, &'static [u8], bool, bool, bool);
        let cases: &[Case] = &[
            (
                b"a\r\n.\r\nQUIT\r\n",
                6,
                true,
                b"a\r\n",
                false,
                false,
                false,
            ),
            (
                b"..a\r\n.b\r\n...\r\n.\r\n",
                17,
                true,
                b".a\r\nb\r\n..\r\n",
                false,
                false,
                false,
            ),
            (b".\r\n", 3, true, b"", false, false, false),
            (b"a\r\n.", 4, false, b"a\r\n", false, false, false),
            (b"x\n.\n.\r\n", 7, false, b"", false, false, true),
            (b"x\n\r\n.\r\n", 7, true, b"", false, false, true),
            (b"0123456789\r\n.\r\n", 15, true, b"", false, true, false),
            (
                b"01234567\r\n01234567\r\n0\r\n.\r\n",
                26,
                true,
                b"",
                true,
                false,
                false,
            ),
        ];
        for &(input, used, done, body, big, long, bare) in cases {
            for chunk in [input.len(), 1] {
                let mut r = DataReceiver::default();
                let mut out = Vec::new();
                let (mut total, mut end) = (0, false);
                for piece in input.chunks(chunk) {
                    let (n, d) = r.ingest(piece, &mut out, &limits);
                    total += n;
                    if d {
                        end = true;
                        break;
                    }
                }
                let got = (
                    total,
                    end,
                    &out[..],
                    r.too_big(),
                    r.line_too_long(),
                    r.bare_eol(),
                );
                let want = (used, done, body, big, long, bare);
                assert_eq!(
                    got,
                    want,
                    "{:?} chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }
}
