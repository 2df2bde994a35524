//! Client side of a login check against another mail server (IMAP, POP3, SMTP AUTH): fed lines, it says what to send.
//!
//! The gateway's AUTH backends `imap`, `pop3` and `smtp` check a login and password by logging
//! in to another server with SASL PLAIN (RFC 4616). This module is that dialog as a machine
//! without I/O; the runtime connects (TCP, and TLS from the first byte for `imaps://`,
//! `pop3s://`, `smtps://`), reads lines and performs the steps.
//!
//! API CONTRACT (the runtime is written against it; keep signatures):
//! - `LoginDialog::new(protocol, starttls, login, password, ehlo_name)`. `starttls == true`:
//!   the connection is plaintext and is upgraded first (`STARTTLS` / `STLS`); `false`: the
//!   runtime connected with implicit TLS. `ehlo_name` is used by SMTP only.
//! - `on_line(line)`: one line from the server, with or without its CRLF (a bare LF is
//!   accepted too). `tls_established()`: after the runtime ran the handshake asked for by
//!   [`Step::StartTls`].
//! - Both return the steps to perform in order: zero or more [`Step::Send`] (bytes to write,
//!   CRLF included), then exactly one of [`Step::Wait`] (read the next line and call
//!   `on_line`), [`Step::StartTls`] (run the TLS handshake now, then call `tls_established`)
//!   or [`Step::Done`] (the verdict; close the connection after writing the sends before it).
//!   Once done, every call returns an empty vector.
//! - [`Verdict::Unavailable`] carries a reason for logs: printable ASCII (other bytes become
//!   `?`), at most [`MAX_REASON`] characters, never the password or the encoded credentials
//!   (an echo of them by the server is replaced by `[redacted]`).
//! - Lines longer than [`MAX_LINE`] (CRLF included) are refused by the runtime; the machine
//!   also refuses them, and lines that are not UTF-8 or contain NUL, CR or LF inside, with
//!   `Unavailable`. Timeouts are the runtime's (the backend's `timeout`).
//! - Response injection: after [`Step::StartTls`] any line fed before `tls_established` ends
//!   the dialog with `Unavailable`. The runtime must feed (or itself refuse) bytes it already
//!   read past the line that produced `StartTls`; it must not carry them into the TLS session.
//!
//! Security invariant: credentials appear only in a `Send` after TLS, i.e. when
//! `starttls == false` or after `tls_established`; `Accepted` is only ever given after they
//! were sent. The password is held in a [`Zeroizing`] buffer and `Debug` does not show it
//! (nor does `Debug` of [`Step::Send`], which prints a length only). The `Send` carrying the
//! credentials is a plain `Vec<u8>`: the runtime may wipe it after writing.
//!
//! Dialogs (`C:` sent, `S:` received):
//! - IMAP (RFC 9051/3501): `S: * OK` greeting (`* PREAUTH`, `* BYE`, anything else:
//!   Unavailable); [`C: a0 STARTTLS`, `S: a0 OK` → StartTls]; `C: a1 AUTHENTICATE PLAIN`,
//!   `S: +`, `C: <base64>`; `S: a1 OK` → `C: a2 LOGOUT`, Accepted. `a1 NO` → Rejected, except
//!   with the response code `[UNAVAILABLE]`, `[SERVERBUG]`, `[LIMIT]` or `[INUSE]` (RFC 5530)
//!   → Unavailable; `a1 BAD` → Unavailable. Untagged lines in between are skipped, except
//!   `* BYE` (Unavailable).
//! - POP3 (RFC 1939, 2595, 5034): `S: +OK` greeting; [`C: STLS`, `S: +OK` → StartTls];
//!   `C: AUTH PLAIN`, `S: +` (or `+ text`), `C: <base64>`; `S: +OK` → `C: QUIT`, Accepted.
//!   `-ERR` → Rejected, except with the response code `[SYS/TEMP]`, `[SYS/PERM]`, `[IN-USE]`
//!   (RFC 3206, 2449) or `[LOGIN-DELAY]` (RFC 2449: the password may be right, the server
//!   only wants the user to wait) → Unavailable.
//! - SMTP (RFC 5321, 3207, 4954): multi-line replies are collected up to their last line;
//!   `S: 220` greeting; `C: EHLO name`, `S: 250`; [the EHLO reply must offer `STARTTLS`
//!   (else Unavailable "no STARTTLS offered"), `C: STARTTLS`, `S: 220` → StartTls, then EHLO
//!   again]; the EHLO reply under TLS must offer `AUTH` with `PLAIN` (`AUTH=PLAIN` accepted);
//!   `C: AUTH PLAIN <base64>`; `S: 235` → `C: QUIT`, Accepted. `535` → Rejected; any other
//!   reply (4xx, `534`, `504`, other 5xx, `334`) → Unavailable: a temporary failure or a
//!   configuration problem, not a wrong password.
//!
//! Decisions beyond the contract:
//! - A server refusing the mechanism before any credentials were sent (`a1 NO` or `-ERR` to
//!   `AUTHENTICATE PLAIN` / `AUTH PLAIN`, or a tagged `OK` without continuation) gives
//!   Unavailable, never Rejected or Accepted. A continuation after the credentials (the server
//!   wants more than PLAIN gives) gives Unavailable.
//! - Inputs are checked by `new`; the first call then ends the dialog without sending
//!   anything: a login that is empty or contains control characters → Unavailable; a password
//!   that is empty or contains NUL (RFC 4616 forbids both) → Rejected; for SMTP an
//!   `ehlo_name` that is empty, longer than 255 octets or not printable ASCII without spaces
//!   → Unavailable.
//! - PLAIN is sent with an empty authorization identity: base64("\0login\0password").
//! - SMTP replies of more than [`MAX_REPLY_LINES`] lines, with a malformed code or with
//!   different codes on their lines → Unavailable. No HELO fallback (AUTH needs ESMTP).
//! - `tls_established` without a pending `StartTls` → Unavailable (a runtime bug; nothing is
//!   sent).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// Longest server line, CRLF included; the runtime refuses longer lines (→ Unavailable).
pub const MAX_LINE: usize = 8192;

/// Longest [`Verdict::Unavailable`] reason, in characters.
pub const MAX_REASON: usize = 200;

/// Most lines in one SMTP multi-line reply.
pub const MAX_REPLY_LINES: usize = 128;

/// Longest SMTP `EHLO` name, in octets.
const MAX_EHLO_NAME: usize = 255;

/// The protocol spoken to the backend server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Imap,
    Pop3,
    Smtp,
}

/// The outcome of a login check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The server accepted the login and password.
    Accepted,
    /// The server refused them (wrong login or password).
    Rejected,
    /// No answer about the password: server down, refusing, temporary failure, protocol or
    /// configuration problem. The reason is for logs (sanitized, at most [`MAX_REASON`]
    /// characters, never the password).
    Unavailable(String),
}

/// What the runtime does next.
#[derive(Clone, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes (CRLF included).
    Send(Vec<u8>),
    /// Run the TLS handshake now, then call [`LoginDialog::tls_established`].
    StartTls,
    /// Read another line and call [`LoginDialog::on_line`].
    Wait,
    /// The dialog is over (after writing the sends before this step).
    Done(Verdict),
}

/// `Send` shows only its length: one of them carries the credentials.
impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Send(bytes) => write!(f, "Send(<{} bytes>)", bytes.len()),
            Step::StartTls => f.write_str("StartTls"),
            Step::Wait => f.write_str("Wait"),
            Step::Done(v) => f.debug_tuple("Done").field(v).finish(),
        }
    }
}

/// Where the dialog is.
#[derive(Debug)]
enum State {
    /// Inputs refused by `new`: the first call ends with this verdict.
    Refuse(Verdict),
    Greeting,
    /// `STARTTLS` / `STLS` sent.
    StartTls,
    /// `Step::StartTls` returned; only `tls_established` may follow.
    AwaitTls,
    /// SMTP: `EHLO` sent.
    Ehlo,
    /// IMAP/POP3: `AUTHENTICATE PLAIN` / `AUTH PLAIN` sent, continuation expected.
    AuthStart,
    /// Credentials sent; the verdict is expected.
    Auth,
    Done,
}

/// The lines of an SMTP multi-line reply read so far.
#[derive(Debug, Default)]
struct Pending {
    code: Option<u16>,
    lines: Vec<String>,
}

/// A login check against an IMAP, POP3 or SMTP server (see the module documentation).
pub struct LoginDialog {
    protocol: Protocol,
    /// The connection is protected: implicit TLS (`starttls == false`) or after the upgrade.
    tls: bool,
    login: String,
    password: Zeroizing<Vec<u8>>,
    ehlo_name: String,
    state: State,
    pending: Pending,
}

impl fmt::Debug for LoginDialog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginDialog")
            .field("protocol", &self.protocol)
            .field("tls", &self.tls)
            .field("login", &self.login)
            .field("password", &"<redacted>")
            .field("ehlo_name", &self.ehlo_name)
            .field("state", &self.state)
            .field("pending_lines", &self.pending.lines.len())
            .finish()
    }
}

impl LoginDialog {
    /// `starttls`: the connection is plaintext and must be upgraded first (STARTTLS / STLS); the machine
    /// never sends credentials before `tls_established` was called in that case.
    pub fn new(
        protocol: Protocol,
        starttls: bool,
        login: &str,
        password: &[u8],
        ehlo_name: &str,
    ) -> LoginDialog {
        let state = match check_inputs(protocol, login, password, ehlo_name) {
            Some(verdict) => State::Refuse(verdict),
            None => State::Greeting,
        };
        LoginDialog {
            protocol,
            tls: !starttls,
            login: login.to_owned(),
            password: Zeroizing::new(password.to_vec()),
            ehlo_name: ehlo_name.to_owned(),
            state,
            pending: Pending::default(),
        }
    }

    /// One line from the server, without or with the trailing CRLF. May return several steps.
    pub fn on_line(&mut self, line: &[u8]) -> Vec<Step> {
        if let Some(steps) = self.finished() {
            return steps;
        }
        let text = match check_line(line) {
            Ok(text) => text,
            Err(why) => return self.fail(why),
        };
        if matches!(self.state, State::AwaitTls) {
            return self.fail("data after the STARTTLS reply (response injection)");
        }
        match self.protocol {
            Protocol::Imap => self.imap(text),
            Protocol::Pop3 => self.pop3(text),
            Protocol::Smtp => self.smtp(text),
        }
    }

    /// The TLS handshake asked for by [`Step::StartTls`] succeeded.
    pub fn tls_established(&mut self) -> Vec<Step> {
        if let Some(steps) = self.finished() {
            return steps;
        }
        if !matches!(self.state, State::AwaitTls) {
            return self.fail("TLS established without a STARTTLS step");
        }
        self.tls = true;
        match self.protocol {
            Protocol::Smtp => self.ehlo(),
            Protocol::Imap | Protocol::Pop3 => self.begin_auth(),
        }
    }

    /// The steps of a dialog that is over or refused its inputs; `None` while it runs.
    fn finished(&mut self) -> Option<Vec<Step>> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Done => Some(Vec::new()),
            State::Refuse(verdict) => Some(vec![Step::Done(verdict)]),
            running => {
                self.state = running;
                None
            }
        }
    }

    fn finish(&mut self, verdict: Verdict) -> Vec<Step> {
        self.state = State::Done;
        vec![Step::Done(verdict)]
    }

    fn fail(&mut self, why: impl AsRef<str>) -> Vec<Step> {
        let reason = self.reason(why.as_ref());
        self.finish(Verdict::Unavailable(reason))
    }

    /// Sends `command` and CRLF, then waits in `next`.
    fn send(&mut self, command: &str, next: State) -> Vec<Step> {
        self.state = next;
        vec![
            Step::Send(format!("{command}\r\n").into_bytes()),
            Step::Wait,
        ]
    }

    /// Logged in: say goodbye and report.
    fn accept(&mut self) -> Vec<Step> {
        let bye = match self.protocol {
            Protocol::Imap => "a2 LOGOUT\r\n",
            Protocol::Pop3 | Protocol::Smtp => "QUIT\r\n",
        };
        self.state = State::Done;
        vec![
            Step::Send(bye.as_bytes().to_vec()),
            Step::Done(Verdict::Accepted),
        ]
    }

    fn await_tls(&mut self) -> Vec<Step> {
        self.state = State::AwaitTls;
        vec![Step::StartTls]
    }

    /// IMAP/POP3 after the greeting: upgrade first, or start the login under implicit TLS.
    fn upgrade_or_auth(&mut self) -> Vec<Step> {
        if self.tls {
            return self.begin_auth();
        }
        let command = match self.protocol {
            Protocol::Imap => "a0 STARTTLS",
            Protocol::Pop3 | Protocol::Smtp => "STLS",
        };
        self.send(command, State::StartTls)
    }

    /// IMAP/POP3: asks for PLAIN; the credentials follow the continuation.
    fn begin_auth(&mut self) -> Vec<Step> {
        if !self.tls {
            return self.fail("internal error: login before TLS");
        }
        let command = match self.protocol {
            Protocol::Imap => "a1 AUTHENTICATE PLAIN",
            Protocol::Pop3 | Protocol::Smtp => "AUTH PLAIN",
        };
        self.send(command, State::AuthStart)
    }

    /// The one place credentials are written: `prefix`, base64 of PLAIN, CRLF. Only under TLS.
    fn send_credentials(&mut self, prefix: &str) -> Vec<Step> {
        if !self.tls {
            return self.fail("internal error: credentials before TLS");
        }
        let b64 = self.plain_b64();
        let mut bytes = Vec::with_capacity(prefix.len() + b64.len() + 2);
        bytes.extend_from_slice(prefix.as_bytes());
        bytes.extend_from_slice(b64.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.state = State::Auth;
        vec![Step::Send(bytes), Step::Wait]
    }

    /// base64("\0login\0password") (RFC 4616, empty authorization identity).
    fn plain_b64(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(Vec::with_capacity(
            2 + self.login.len() + self.password.len(),
        ));
        raw.push(0);
        raw.extend_from_slice(self.login.as_bytes());
        raw.push(0);
        raw.extend_from_slice(&self.password);
        Zeroizing::new(STANDARD.encode(raw.as_slice()))
    }

    /// A reason for logs: printable ASCII, secrets redacted, trimmed, at most `MAX_REASON`.
    fn reason(&self, text: &str) -> String {
        let mut reason = Zeroizing::new(printable(text.as_bytes()));
        let password = Zeroizing::new(printable(&self.password));
        let b64 = self.plain_b64();
        for secret in [password.as_str(), b64.as_str()] {
            if !secret.is_empty() && reason.contains(secret) {
                reason = Zeroizing::new(reason.replace(secret, "[redacted]"));
            }
        }
        let trimmed = reason.trim_end();
        if trimmed.len() <= MAX_REASON {
            return trimmed.to_owned();
        }
        let cut = (0..=MAX_REASON - 3)
            .rev()
            .find(|&i| trimmed.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}...", trimmed.get(..cut).unwrap_or(""))
    }

    fn imap(&mut self, line: &str) -> Vec<Step> {
        if line.starts_with('+') {
            // A tag never contains '+' (RFC 9051 §9), so this is a continuation request.
            return match self.state {
                State::AuthStart => self.send_credentials(""),
                _ => self.fail(format!("unexpected continuation: {line}")),
            };
        }
        let (first, rest) = split_word(line);
        let (status, text) = split_word(rest);
        if first == "*" {
            self.imap_untagged(status, line)
        } else {
            self.imap_tagged(first, status, text, line)
        }
    }

    fn imap_untagged(&mut self, status: &str, line: &str) -> Vec<Step> {
        let greeting = matches!(self.state, State::Greeting);
        if greeting && status.eq_ignore_ascii_case("OK") {
            return self.upgrade_or_auth();
        }
        if greeting {
            return self.fail(format!("greeting refused: {line}"));
        }
        if status.eq_ignore_ascii_case("BYE") {
            return self.fail(format!("server closing: {line}"));
        }
        vec![Step::Wait]
    }

    fn imap_tagged(&mut self, tag: &str, status: &str, text: &str, line: &str) -> Vec<Step> {
        let expected = match self.state {
            State::StartTls => "a0",
            State::AuthStart | State::Auth => "a1",
            _ => "",
        };
        if expected.is_empty() || !tag.eq_ignore_ascii_case(expected) {
            return self.fail(format!("unexpected response: {line}"));
        }
        let ok = status.eq_ignore_ascii_case("OK");
        let no = status.eq_ignore_ascii_case("NO");
        match self.state {
            State::StartTls if ok => self.await_tls(),
            State::StartTls => self.fail(format!("STARTTLS refused: {line}")),
            State::AuthStart => self.fail(format!("AUTHENTICATE PLAIN refused: {line}")),
            _ if ok => self.accept(),
            _ if no && !imap_temporary(text) => self.finish(Verdict::Rejected),
            _ => self.fail(format!("login failed: {line}")),
        }
    }

    fn pop3(&mut self, line: &str) -> Vec<Step> {
        let (first, text) = split_word(line);
        let ok = first.eq_ignore_ascii_case("+OK");
        let err = first.eq_ignore_ascii_case("-ERR");
        match self.state {
            State::Greeting if ok => self.upgrade_or_auth(),
            State::StartTls if ok => self.await_tls(),
            State::AuthStart if first == "+" => self.send_credentials(""),
            State::Auth if ok => self.accept(),
            State::Auth if err && !pop3_temporary(text) => self.finish(Verdict::Rejected),
            State::Greeting => self.fail(format!("greeting refused: {line}")),
            State::StartTls => self.fail(format!("STLS refused: {line}")),
            State::AuthStart => self.fail(format!("AUTH PLAIN refused: {line}")),
            _ => self.fail(format!("login failed: {line}")),
        }
    }

    fn smtp(&mut self, line: &str) -> Vec<Step> {
        let Some((code, more, text)) = parse_smtp_line(line) else {
            return self.fail(format!("malformed reply: {line}"));
        };
        if self.pending.code.is_some_and(|c| c != code) {
            return self.fail(format!("inconsistent multi-line reply: {line}"));
        }
        if self.pending.lines.len() >= MAX_REPLY_LINES {
            return self.fail("reply has too many lines");
        }
        self.pending.code = Some(code);
        self.pending.lines.push(text.to_owned());
        if more {
            return vec![Step::Wait];
        }
        let lines = std::mem::take(&mut self.pending.lines);
        self.pending.code = None;
        self.smtp_reply(code, &lines)
    }

    fn smtp_reply(&mut self, code: u16, lines: &[String]) -> Vec<Step> {
        let shown = match lines.first().map(String::as_str) {
            None | Some("") => code.to_string(),
            Some(text) => format!("{code} {text}"),
        };
        match self.state {
            State::Greeting if code == 220 => self.ehlo(),
            State::Greeting => self.fail(format!("greeting refused: {shown}")),
            State::Ehlo if code == 250 => self.after_ehlo(lines),
            State::Ehlo => self.fail(format!("EHLO refused: {shown}")),
            State::StartTls if code == 220 => self.await_tls(),
            State::StartTls => self.fail(format!("STARTTLS refused: {shown}")),
            State::Auth if code == 235 => self.accept(),
            State::Auth if code == 535 => self.finish(Verdict::Rejected),
            _ => self.fail(format!("login failed: {shown}")),
        }
    }

    fn ehlo(&mut self) -> Vec<Step> {
        let command = format!("EHLO {}", self.ehlo_name);
        self.send(&command, State::Ehlo)
    }

    /// The EHLO reply: upgrade if still plaintext, else send the credentials.
    fn after_ehlo(&mut self, lines: &[String]) -> Vec<Step> {
        let keywords = || lines.iter().skip(1).map(|l| ehlo_keyword(l));
        if !self.tls {
            if keywords().any(|(kw, _)| kw.eq_ignore_ascii_case("STARTTLS")) {
                return self.send("STARTTLS", State::StartTls);
            }
            return self.fail("no STARTTLS offered");
        }
        let plain = keywords().any(|(kw, args)| {
            kw.eq_ignore_ascii_case("AUTH")
                && args
                    .split_ascii_whitespace()
                    .any(|m| m.eq_ignore_ascii_case("PLAIN"))
        });
        if !plain {
            return self.fail("AUTH PLAIN not offered");
        }
        self.send_credentials("AUTH PLAIN ")
    }
}

/// Why `new`'s inputs cannot be used, as the verdict of the first call.
fn check_inputs(protocol: Protocol, login: &str, password: &[u8], ehlo: &str) -> Option<Verdict> {
    let unavailable = |why: &str| Some(Verdict::Unavailable(why.to_owned()));
    if login.is_empty() {
        return unavailable("login is empty");
    }
    if login.chars().any(char::is_control) {
        return unavailable("login contains control characters");
    }
    if password.is_empty() || password.contains(&0) {
        return Some(Verdict::Rejected);
    }
    let ehlo_ok = !ehlo.is_empty()
        && ehlo.len() <= MAX_EHLO_NAME
        && ehlo.bytes().all(|b| b.is_ascii_graphic());
    if protocol == Protocol::Smtp && !ehlo_ok {
        return unavailable("EHLO name invalid");
    }
    None
}

/// The line without its line end, if acceptable.
fn check_line(line: &[u8]) -> Result<&str, &'static str> {
    let content = line
        .strip_suffix(b"\r\n")
        .or_else(|| line.strip_suffix(b"\n"))
        .unwrap_or(line);
    if content.len() > MAX_LINE - 2 {
        return Err("line too long");
    }
    if content.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
        return Err("NUL, CR or LF inside a line");
    }
    std::str::from_utf8(content).map_err(|_| "line is not UTF-8")
}

/// Printable ASCII kept, every other byte `?`.
fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b == b' ' || b.is_ascii_graphic() {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

/// The first space-separated word and the rest.
fn split_word(s: &str) -> (&str, &str) {
    s.split_once(' ').unwrap_or((s, ""))
}

/// The response code in `[CODE ...]` at the start of a response text, if any.
fn response_code(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('[')?;
    let end = inner.find([']', ' ']).unwrap_or(inner.len());
    inner.get(..end)
}

/// IMAP `NO` codes that say nothing about the password (RFC 5530).
fn imap_temporary(text: &str) -> bool {
    response_code(text).is_some_and(|code| {
        ["UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE"]
            .iter()
            .any(|c| code.eq_ignore_ascii_case(c))
    })
}

/// POP3 `-ERR` codes that say nothing about the password (RFC 3206, 2449).
fn pop3_temporary(text: &str) -> bool {
    response_code(text).is_some_and(|code| {
        let (top, _) = code.split_once('/').unwrap_or((code, ""));
        ["SYS", "IN-USE", "LOGIN-DELAY"]
            .iter()
            .any(|c| top.eq_ignore_ascii_case(c))
    })
}

/// An SMTP reply line: code, "more lines follow", text.
fn parse_smtp_line(line: &str) -> Option<(u16, bool, &str)> {
    let digits = line.get(..3)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code = digits.parse().ok()?;
    match line.as_bytes().get(3) {
        None => Some((code, false, "")),
        Some(b' ') => Some((code, false, line.get(4..)?)),
        Some(b'-') => Some((code, true, line.get(4..)?)),
        Some(_) => None,
    }
}

/// An EHLO line's keyword and its parameters (`AUTH PLAIN` or the old `AUTH=PLAIN`).
fn ehlo_keyword(line: &str) -> (&str, &str) {
    line.split_once([' ', '=']).unwrap_or((line, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGIN: &str = "user@a.test";
    const PASSWORD: &[u8] = b"s3cret-Pass";

    fn b64() -> String {
        STANDARD.encode(b"\0user@a.test\0s3cret-Pass")
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Panics if `bytes` carry a secret.
    fn assert_no_secret(bytes: &[u8], ctx: &str) {
        let b64 = b64();
        assert!(!contains(bytes, PASSWORD), "{ctx}: password in {bytes:?}");
        assert!(
            !contains(bytes, b64.as_bytes()),
            "{ctx}: credentials in {bytes:?}"
        );
        assert!(
            !contains(bytes, b"\0user@a.test\0"),
            "{ctx}: PLAIN in {bytes:?}"
        );
    }

    /// The shape every call's result has: sends, then one of Wait/StartTls/Done; empty once done.
    fn assert_shape(steps: &[Step], was_done: bool, ctx: &str) {
        if was_done {
            assert!(steps.is_empty(), "{ctx}: steps after Done: {steps:?}");
            return;
        }
        let Some((last, sends)) = steps.split_last() else {
            panic!("{ctx}: no steps");
        };
        assert!(!matches!(last, Step::Send(_)), "{ctx}: ends with a send");
        assert!(
            sends.iter().all(|s| matches!(s, Step::Send(_))),
            "{ctx}: {steps:?}"
        );
    }

    fn render(step: &Step) -> Option<String> {
        match step {
            Step::Send(bytes) => {
                let text = String::from_utf8_lossy(bytes);
                let line = text.strip_suffix("\r\n").expect("sends end with CRLF");
                assert!(!line.contains(['\r', '\n']), "one line per send: {text:?}");
                Some(format!("C: {}", line.replace(&b64(), "{PLAIN}")))
            }
            Step::StartTls => Some("STARTTLS".into()),
            Step::Wait => None,
            Step::Done(Verdict::Accepted) => Some("DONE accepted".into()),
            Step::Done(Verdict::Rejected) => Some("DONE rejected".into()),
            Step::Done(Verdict::Unavailable(why)) => Some(format!("DONE unavailable: {why}")),
        }
    }

    /// Runs a transcript: `S: line` is fed (with `crlf` appended), `TLS` calls
    /// `tls_established`; every other item is an expected output, in order (`C: command`,
    /// `STARTTLS`, `DONE ...`). Checks that nothing secret is sent before TLS.
    fn run(name: &str, protocol: Protocol, starttls: bool, transcript: &[&str], crlf: &str) {
        let mut d = LoginDialog::new(protocol, starttls, LOGIN, PASSWORD, "gw.test");
        let (mut got, mut tls, mut done) = (Vec::new(), !starttls, false);
        for item in transcript {
            let ctx = format!("{name} at {item:?}");
            let steps = if let Some(line) = item.strip_prefix("S: ") {
                d.on_line(format!("{line}{crlf}").as_bytes())
            } else if *item == "TLS" {
                tls = true;
                d.tls_established()
            } else {
                continue;
            };
            got.push(item.to_string());
            assert_shape(&steps, done, &ctx);
            for step in &steps {
                match step {
                    Step::Send(bytes) if !tls => assert_no_secret(bytes, &ctx),
                    Step::Done(Verdict::Accepted) => assert!(tls, "{ctx}: accepted before TLS"),
                    Step::Done(Verdict::Unavailable(why)) => {
                        assert_no_secret(why.as_bytes(), &ctx);
                        assert!(why.len() <= MAX_REASON, "{ctx}: {why}");
                    }
                    _ => {}
                }
                done |= matches!(step, Step::Done(_));
                got.extend(render(step));
            }
        }
        assert_eq!(got, transcript, "{name} (line end {crlf:?})");
        assert!(done, "{name}: not done at the end");
        assert!(d.on_line(b"+OK").is_empty() && d.tls_established().is_empty());
    }

    fn run_all(protocol: Protocol, cases: &[(&str, bool, Vec<&str>)]) {
        for (name, starttls, transcript) in cases {
            for crlf in ["", "\r\n", "\n"] {
                run(name, protocol, *starttls, transcript, crlf);
            }
        }
    }

    fn with<'a>(start: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
        start.iter().chain(rest).copied().collect()
    }

    #[test]
    fn imap_transcripts() {
        let tls = [
            "S: * OK [CAPABILITY IMAP4rev1 STARTTLS] ready",
            "C: a0 STARTTLS",
        ];
        let up = with(&tls, &["S: a0 OK begin TLS", "STARTTLS", "TLS"]);
        let up = with(&up, &["C: a1 AUTHENTICATE PLAIN"]);
        let implicit = ["S: * OK ready", "C: a1 AUTHENTICATE PLAIN"];
        let creds = with(&implicit, &["S: + ", "C: {PLAIN}"]);
        let mut cases = vec![
            (
                "implicit ok",
                false,
                with(
                    &creds,
                    &["S: a1 OK logged in", "C: a2 LOGOUT", "DONE accepted"],
                ),
            ),
            (
                "starttls ok, untagged lines skipped",
                true,
                with(
                    &up,
                    &[
                        "S: * CAPABILITY IMAP4rev1 AUTH=PLAIN",
                        "S: +",
                        "C: {PLAIN}",
                        "S: * CAPABILITY IMAP4rev1",
                        "S: a1 OK [CAPABILITY IMAP4rev1] done",
                        "C: a2 LOGOUT",
                        "DONE accepted",
                    ],
                ),
            ),
            (
                "untagged before STARTTLS OK",
                true,
                with(
                    &tls,
                    &[
                        "S: * CAPABILITY IMAP4rev1",
                        "S: a0 OK go",
                        "STARTTLS",
                        "TLS",
                        "C: a1 AUTHENTICATE PLAIN",
                        "S: a1 NO x",
                        "DONE unavailable: AUTHENTICATE PLAIN refused: a1 NO x",
                    ],
                ),
            ),
            (
                "wrong password",
                false,
                with(
                    &creds,
                    &["S: a1 NO [AUTHENTICATIONFAILED] bad", "DONE rejected"],
                ),
            ),
            (
                "wrong password, no code",
                false,
                with(&creds, &["S: a1 no go away", "DONE rejected"]),
            ),
            (
                "BAD",
                false,
                with(
                    &creds,
                    &[
                        "S: a1 BAD what",
                        "DONE unavailable: login failed: a1 BAD what",
                    ],
                ),
            ),
            (
                "BYE during login",
                false,
                with(
                    &creds,
                    &[
                        "S: * BYE later",
                        "DONE unavailable: server closing: * BYE later",
                    ],
                ),
            ),
            (
                "continuation after credentials",
                false,
                with(
                    &creds,
                    &[
                        "S: + more",
                        "DONE unavailable: unexpected continuation: + more",
                    ],
                ),
            ),
            (
                "wrong tag",
                false,
                with(
                    &creds,
                    &["S: a7 OK", "DONE unavailable: unexpected response: a7 OK"],
                ),
            ),
            (
                "greeting BYE",
                true,
                vec![
                    "S: * BYE busy",
                    "DONE unavailable: greeting refused: * BYE busy",
                ],
            ),
            (
                "greeting PREAUTH",
                false,
                vec![
                    "S: * PREAUTH hi",
                    "DONE unavailable: greeting refused: * PREAUTH hi",
                ],
            ),
            (
                "greeting garbage",
                false,
                vec!["S: hello", "DONE unavailable: unexpected response: hello"],
            ),
            (
                "continuation as greeting",
                true,
                vec!["S: + hi", "DONE unavailable: unexpected continuation: + hi"],
            ),
            (
                "STARTTLS NO",
                true,
                with(
                    &tls,
                    &[
                        "S: a0 NO nope",
                        "DONE unavailable: STARTTLS refused: a0 NO nope",
                    ],
                ),
            ),
            (
                "STARTTLS BAD",
                true,
                with(
                    &tls,
                    &[
                        "S: a0 BAD nope",
                        "DONE unavailable: STARTTLS refused: a0 BAD nope",
                    ],
                ),
            ),
            (
                "continuation before STARTTLS OK",
                true,
                with(
                    &tls,
                    &[
                        "S: + send it",
                        "DONE unavailable: unexpected continuation: + send it",
                    ],
                ),
            ),
            (
                "a1 before STARTTLS OK",
                true,
                with(
                    &tls,
                    &["S: a1 OK", "DONE unavailable: unexpected response: a1 OK"],
                ),
            ),
            (
                "injection after STARTTLS OK",
                true,
                with(
                    &tls,
                    &[
                        "S: a0 OK",
                        "STARTTLS",
                        "S: + ",
                        "DONE unavailable: data after the STARTTLS reply (response injection)",
                    ],
                ),
            ),
            (
                "mechanism refused",
                false,
                with(
                    &implicit,
                    &[
                        "S: a1 NO [CANNOT] no PLAIN",
                        "DONE unavailable: AUTHENTICATE PLAIN refused: a1 NO [CANNOT] no PLAIN",
                    ],
                ),
            ),
            (
                "OK without credentials",
                false,
                with(
                    &implicit,
                    &[
                        "S: a1 OK sure",
                        "DONE unavailable: AUTHENTICATE PLAIN refused: a1 OK sure",
                    ],
                ),
            ),
        ];
        for code in ["UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE", "inuse"] {
            let no: &'static str = format!("S: a1 NO [{code}] try later").leak();
            let why: &'static str =
                format!("DONE unavailable: login failed: a1 NO [{code}] try later").leak();
            cases.push(("temporary NO", false, with(&creds, &[no, why])));
        }
        run_all(Protocol::Imap, &cases);
    }

    #[test]
    fn pop3_transcripts() {
        let tls = ["S: +OK POP3 ready <1.2@mx>", "C: STLS"];
        let up = with(
            &tls,
            &["S: +OK begin TLS", "STARTTLS", "TLS", "C: AUTH PLAIN"],
        );
        let implicit = ["S: +OK ready", "C: AUTH PLAIN"];
        let creds = with(&implicit, &["S: + ", "C: {PLAIN}"]);
        let mut cases = vec![
            (
                "implicit ok",
                false,
                with(
                    &creds,
                    &["S: +OK maildrop locked", "C: QUIT", "DONE accepted"],
                ),
            ),
            (
                "starttls ok, bare +",
                true,
                with(
                    &up,
                    &["S: +", "C: {PLAIN}", "S: +OK", "C: QUIT", "DONE accepted"],
                ),
            ),
            (
                "wrong password",
                false,
                with(&creds, &["S: -ERR [AUTH] invalid", "DONE rejected"]),
            ),
            (
                "wrong password, no code",
                false,
                with(&creds, &["S: -ERR no", "DONE rejected"]),
            ),
            (
                "greeting -ERR",
                true,
                vec![
                    "S: -ERR busy",
                    "DONE unavailable: greeting refused: -ERR busy",
                ],
            ),
            (
                "greeting garbage",
                false,
                vec![
                    "S: * OK imap",
                    "DONE unavailable: greeting refused: * OK imap",
                ],
            ),
            (
                "STLS refused",
                true,
                with(
                    &tls,
                    &[
                        "S: -ERR no TLS",
                        "DONE unavailable: STLS refused: -ERR no TLS",
                    ],
                ),
            ),
            (
                "continuation before STLS OK",
                true,
                with(&tls, &["S: + go", "DONE unavailable: STLS refused: + go"]),
            ),
            (
                "injection after STLS OK",
                true,
                with(
                    &tls,
                    &[
                        "S: +OK",
                        "STARTTLS",
                        "S: + ",
                        "DONE unavailable: data after the STARTTLS reply (response injection)",
                    ],
                ),
            ),
            (
                "mechanism refused",
                false,
                with(
                    &implicit,
                    &[
                        "S: -ERR unknown",
                        "DONE unavailable: AUTH PLAIN refused: -ERR unknown",
                    ],
                ),
            ),
            (
                "+OK without credentials",
                false,
                with(
                    &implicit,
                    &["S: +OK", "DONE unavailable: AUTH PLAIN refused: +OK"],
                ),
            ),
            (
                "continuation after credentials",
                false,
                with(
                    &creds,
                    &["S: + more", "DONE unavailable: login failed: + more"],
                ),
            ),
        ];
        for code in ["SYS/TEMP", "SYS/PERM", "IN-USE", "LOGIN-DELAY", "sys/temp"] {
            let err: &'static str = format!("S: -ERR [{code}] later").leak();
            let why: &'static str =
                format!("DONE unavailable: login failed: -ERR [{code}] later").leak();
            cases.push(("temporary -ERR", false, with(&creds, &[err, why])));
        }
        run_all(Protocol::Pop3, &cases);
    }

    #[test]
    fn smtp_transcripts() {
        let greet = ["S: 220-mx.test ESMTP", "S: 220 welcome", "C: EHLO gw.test"];
        let tls = with(
            &greet,
            &[
                "S: 250-mx.test",
                "S: 250-PIPELINING",
                "S: 250 STARTTLS",
                "C: STARTTLS",
            ],
        );
        let up = with(
            &tls,
            &["S: 220 go ahead", "STARTTLS", "TLS", "C: EHLO gw.test"],
        );
        let creds = with(
            &greet,
            &[
                "S: 250-mx.test",
                "S: 250 AUTH LOGIN PLAIN",
                "C: AUTH PLAIN {PLAIN}",
            ],
        );
        let cases = vec![
            (
                "implicit ok",
                false,
                with(&creds, &["S: 235 2.7.0 ok", "C: QUIT", "DONE accepted"]),
            ),
            (
                "starttls ok",
                true,
                with(
                    &up,
                    &[
                        "S: 250-mx.test",
                        "S: 250-AUTH=PLAIN",
                        "S: 250 SIZE",
                        "C: AUTH PLAIN {PLAIN}",
                        "S: 235",
                        "C: QUIT",
                        "DONE accepted",
                    ],
                ),
            ),
            (
                "wrong password",
                false,
                with(&creds, &["S: 535 5.7.8 no", "DONE rejected"]),
            ),
            (
                "temporary",
                false,
                with(
                    &creds,
                    &[
                        "S: 454 4.7.0 later",
                        "DONE unavailable: login failed: 454 4.7.0 later",
                    ],
                ),
            ),
            (
                "mechanism",
                false,
                with(
                    &creds,
                    &[
                        "S: 504 5.5.4 no",
                        "DONE unavailable: login failed: 504 5.5.4 no",
                    ],
                ),
            ),
            (
                "too weak",
                false,
                with(
                    &creds,
                    &[
                        "S: 534 5.7.9 weak",
                        "DONE unavailable: login failed: 534 5.7.9 weak",
                    ],
                ),
            ),
            (
                "challenge",
                false,
                with(&creds, &["S: 334 ", "DONE unavailable: login failed: 334"]),
            ),
            (
                "closing",
                false,
                with(
                    &creds,
                    &["S: 421 bye", "DONE unavailable: login failed: 421 bye"],
                ),
            ),
            (
                "greeting refused",
                true,
                vec![
                    "S: 554 go away",
                    "DONE unavailable: greeting refused: 554 go away",
                ],
            ),
            (
                "greeting garbage",
                false,
                vec!["S: * OK", "DONE unavailable: malformed reply: * OK"],
            ),
            (
                "EHLO refused",
                false,
                with(
                    &greet,
                    &["S: 502 no", "DONE unavailable: EHLO refused: 502 no"],
                ),
            ),
            (
                "no STARTTLS offered",
                true,
                with(
                    &greet,
                    &[
                        "S: 250-mx.test",
                        "S: 250 AUTH PLAIN",
                        "DONE unavailable: no STARTTLS offered",
                    ],
                ),
            ),
            (
                "STARTTLS refused",
                true,
                with(
                    &tls,
                    &[
                        "S: 454 4.7.0 no TLS",
                        "DONE unavailable: STARTTLS refused: 454 4.7.0 no TLS",
                    ],
                ),
            ),
            (
                "continuation before STARTTLS done",
                true,
                with(
                    &tls,
                    &["S: 334 ", "DONE unavailable: STARTTLS refused: 334"],
                ),
            ),
            (
                "injection after 220",
                true,
                with(
                    &tls,
                    &[
                        "S: 220 go",
                        "STARTTLS",
                        "S: 250 AUTH PLAIN",
                        "DONE unavailable: data after the STARTTLS reply (response injection)",
                    ],
                ),
            ),
            (
                "no AUTH PLAIN",
                false,
                with(
                    &greet,
                    &[
                        "S: 250-mx.test",
                        "S: 250 AUTH LOGIN CRAM-MD5",
                        "DONE unavailable: AUTH PLAIN not offered",
                    ],
                ),
            ),
            (
                "no AUTH after STARTTLS",
                true,
                with(
                    &up,
                    &["S: 250 mx.test", "DONE unavailable: AUTH PLAIN not offered"],
                ),
            ),
            (
                "bare code line",
                false,
                with(
                    &greet,
                    &[
                        "S: 250-mx.test",
                        "S: 250-AUTH PLAIN",
                        "S: 250",
                        "C: AUTH PLAIN {PLAIN}",
                        "S: 535",
                        "DONE rejected",
                    ],
                ),
            ),
            (
                "mixed codes",
                false,
                with(
                    &greet,
                    &[
                        "S: 250-mx.test",
                        "S: 251 x",
                        "DONE unavailable: inconsistent multi-line reply: 251 x",
                    ],
                ),
            ),
            (
                "bad separator",
                false,
                vec!["S: 220+x", "DONE unavailable: malformed reply: 220+x"],
            ),
        ];
        run_all(Protocol::Smtp, &cases);
    }

    /// Every server line of the transcripts and more, in pseudo-random orders, with
    /// `tls_established` sometimes called: no byte sent before that call carries a secret,
    /// and no `Accepted` comes before it.
    #[test]
    fn nothing_secret_is_sent_before_tls() {
        const POOL: &[&str] = &[
            "* OK ready",
            "* PREAUTH hi",
            "* BYE",
            "* CAPABILITY STARTTLS AUTH=PLAIN",
            "+ ",
            "+",
            "a0 OK go",
            "a1 OK done",
            "a0 NO",
            "a1 NO [UNAVAILABLE]",
            "a2 OK",
            "+OK",
            "+OK go",
            "-ERR",
            "-ERR [SYS/TEMP]",
            "220 ready",
            "220-ready",
            "250-mx",
            "250 mx",
            "250 AUTH PLAIN",
            "250-STARTTLS",
            "250 STARTTLS",
            "250-AUTH PLAIN LOGIN",
            "235 ok",
            "334 ",
            "535 no",
            "454 later",
            "TLS",
        ];
        let mut x: u64 = 0x5ea1_9a7e;
        let mut next = |n: usize| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            usize::try_from(x >> 33).unwrap_or(0) % n
        };
        for protocol in [Protocol::Imap, Protocol::Pop3, Protocol::Smtp] {
            for run in 0..4000 {
                let mut d = LoginDialog::new(protocol, true, LOGIN, PASSWORD, "gw.test");
                let mut sent_before_tls = Vec::new();
                for _ in 0..(1 + next(14)) {
                    let item = POOL.get(next(POOL.len())).copied().unwrap_or("");
                    if item == "TLS" && next(3) == 0 {
                        break; // From here on the connection is protected.
                    }
                    for step in d.on_line(item.as_bytes()) {
                        let ctx = format!("{protocol:?} run {run}");
                        assert_ne!(step, Step::Done(Verdict::Accepted), "{ctx}");
                        if let Step::Send(bytes) = step {
                            sent_before_tls.extend(bytes);
                        }
                    }
                }
                assert_no_secret(&sent_before_tls, &format!("{protocol:?} run {run}"));
            }
        }
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut d = LoginDialog::new(Protocol::Smtp, false, LOGIN, PASSWORD, "gw.test");
        let mut shown = format!("{d:?}");
        for line in ["220 mx", "250-mx", "250 AUTH PLAIN"] {
            let steps = d.on_line(line.as_bytes());
            shown.push_str(&format!("{d:?} {steps:?}"));
        }
        assert!(
            shown.contains("<redacted>") && shown.contains("Send(<"),
            "{shown}"
        );
        assert_no_secret(shown.as_bytes(), "debug");
    }

    #[test]
    fn inputs_are_checked_before_anything_is_sent() {
        let cases: [(&str, &[u8], &str, Verdict); 7] = [
            (
                "u\r\nx@a.test",
                PASSWORD,
                "gw",
                Verdict::Unavailable("login contains control characters".into()),
            ),
            (
                "u\0@a.test",
                PASSWORD,
                "gw",
                Verdict::Unavailable("login contains control characters".into()),
            ),
            (
                "",
                PASSWORD,
                "gw",
                Verdict::Unavailable("login is empty".into()),
            ),
            (LOGIN, b"pa\0ss", "gw", Verdict::Rejected),
            (LOGIN, b"", "gw", Verdict::Rejected),
            (
                LOGIN,
                PASSWORD,
                "gw\r\nRCPT",
                Verdict::Unavailable("EHLO name invalid".into()),
            ),
            (
                LOGIN,
                PASSWORD,
                "",
                Verdict::Unavailable("EHLO name invalid".into()),
            ),
        ];
        for (login, password, ehlo, want) in cases {
            for tls_first in [false, true] {
                let mut d = LoginDialog::new(Protocol::Smtp, false, login, password, ehlo);
                let steps = if tls_first {
                    d.tls_established()
                } else {
                    d.on_line(b"220 mx")
                };
                assert_eq!(steps, vec![Step::Done(want.clone())], "{login:?} {ehlo:?}");
                assert!(d.on_line(b"220 mx").is_empty());
            }
        }
        // The EHLO name matters to SMTP only; a password may hold CR, LF and non-UTF-8.
        let mut d = LoginDialog::new(Protocol::Imap, false, LOGIN, b"p\r\n\xff", "");
        assert_eq!(
            d.on_line(b"* OK").first().map(render),
            Some(Some("C: a1 AUTHENTICATE PLAIN".into()))
        );
    }

    #[test]
    fn bad_lines_end_the_dialog() {
        let fits = format!("* OK {}", "x".repeat(MAX_LINE - 7));
        let long = format!("{fits}x");
        let cases: [(Vec<u8>, Option<&str>); 6] = [
            (fits.clone().into_bytes(), None),
            (format!("{fits}\r\n").into_bytes(), None),
            (long.clone().into_bytes(), Some("line too long")),
            (format!("{long}\r\n").into_bytes(), Some("line too long")),
            (b"* OK \xff\xfe".to_vec(), Some("line is not UTF-8")),
            (b"* OK a\0b".to_vec(), Some("NUL, CR or LF inside a line")),
        ];
        for (line, want) in cases {
            let mut d = LoginDialog::new(Protocol::Imap, false, LOGIN, PASSWORD, "gw.test");
            let steps = d.on_line(&line);
            match want {
                None => assert_eq!(steps.last(), Some(&Step::Wait)),
                Some(why) => assert_eq!(steps, vec![Step::Done(Verdict::Unavailable(why.into()))]),
            }
        }
        let mut d = LoginDialog::new(Protocol::Pop3, false, LOGIN, PASSWORD, "gw.test");
        assert_eq!(d.on_line(b"+OK a\rb").len(), 1);
    }

    #[test]
    fn tls_established_out_of_turn_sends_nothing() {
        for protocol in [Protocol::Imap, Protocol::Pop3, Protocol::Smtp] {
            let mut d = LoginDialog::new(protocol, true, LOGIN, PASSWORD, "gw.test");
            let want = Verdict::Unavailable("TLS established without a STARTTLS step".into());
            assert_eq!(d.tls_established(), vec![Step::Done(want)]);
            assert!(d.on_line(b"+OK").is_empty());
        }
    }

    #[test]
    fn reasons_are_redacted_cleaned_and_bounded() {
        let mut d = LoginDialog::new(Protocol::Imap, false, LOGIN, PASSWORD, "gw.test");
        d.on_line(b"* OK");
        d.on_line(b"+");
        let echo = format!("a1 NO [UNAVAILABLE] s3cret-Pass {} \x07 caf\u{e9}", b64());
        let want = "login failed: a1 NO [UNAVAILABLE] [redacted] [redacted] ? caf??";
        assert_eq!(
            d.on_line(echo.as_bytes()),
            vec![Step::Done(Verdict::Unavailable(want.into()))]
        );

        let mut d = LoginDialog::new(Protocol::Smtp, false, LOGIN, PASSWORD, "gw.test");
        let steps = d.on_line(format!("554 {}", "y".repeat(1000)).as_bytes());
        let Some(Step::Done(Verdict::Unavailable(why))) = steps.first() else {
            panic!("{steps:?}");
        };
        assert_eq!(why.len(), MAX_REASON);
        assert!(
            why.starts_with("greeting refused: 554 yyy") && why.ends_with("y..."),
            "{why}"
        );
    }

    #[test]
    fn smtp_reply_line_count_is_bounded() {
        let mut d = LoginDialog::new(Protocol::Smtp, false, LOGIN, PASSWORD, "gw.test");
        for _ in 0..MAX_REPLY_LINES {
            assert_eq!(d.on_line(b"220-hello"), vec![Step::Wait]);
        }
        let want = Verdict::Unavailable("reply has too many lines".into());
        assert_eq!(d.on_line(b"220-hello"), vec![Step::Done(want)]);
    }
}
