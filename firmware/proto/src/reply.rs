//! SMTP replies: the typed value (code, enhanced status code, text lines), its wire form, and a
//! bounded incremental parser for replies received from a server.

use std::fmt;

/// An enhanced status code (RFC 3463): `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    /// Text lines, without code, enhanced code or CRLF. At least one (possibly empty) line.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A one-line reply without an enhanced status code (greeting, EHLO).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Appends the wire form (`250-…\r\n` … `250 …\r\n`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let sep = if i + 1 == n { ' ' } else { '-' };
            let line = match self.enhanced {
                Some(e) => format!("{}{}{} {}\r\n", self.code, sep, e, text),
                None if text.is_empty() => format!("{}{}\r\n", self.code, sep),
                None => format!("{}{}{}\r\n", self.code, sep, text),
            };
            out.extend_from_slice(line.as_bytes());
        }
    }

    /// The reply on one line, for logs and DSNs: `550 5.1.1 text; more text`.
    pub fn one_line(&self) -> String {
        let mut s = self.code.to_string();
        if let Some(e) = self.enhanced {
            s.push(' ');
            s.push_str(&e.to_string());
        }
        let text = self.lines.join("; ");
        if !text.is_empty() {
            s.push(' ');
            s.push_str(&text);
        }
        s
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// Why a server's reply could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line too long")]
    LineTooLong,
    #[error("too many lines in one reply")]
    TooManyLines,
    #[error("reply line does not start with a valid code")]
    BadCode,
    #[error("multi-line reply changes its code")]
    InconsistentCode,
}

/// A bounded incremental parser for server replies (RFC 5321 §4.2): fed bytes, it returns one
/// complete, possibly multi-line reply at a time. CRLF and bare LF both end a line; text is
/// converted lossily to UTF-8. An enhanced status code (RFC 2034) is recognised only when its
/// class equals the reply's first digit. Memory is bounded by `max_line` bytes of the partial
/// line plus `max_lines` lines. After an error the parser starts afresh.
#[derive(Debug, Clone)]
pub struct ReplyParser {
    max_line: usize,
    max_lines: usize,
    /// The current partial line (at most `max_line` bytes plus a CR).
    line: Vec<u8>,
    code: Option<u16>,
    enhanced: Option<EnhancedCode>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// `max_line`: longest line without its line end; `max_lines`: most lines in one reply.
    pub fn new(max_line: usize, max_lines: usize) -> Self {
        ReplyParser {
            max_line,
            max_lines,
            line: Vec::new(),
            code: None,
            enhanced: None,
            lines: Vec::new(),
        }
    }

    /// True if no partial reply is buffered.
    pub fn is_idle(&self) -> bool {
        self.line.is_empty() && self.lines.is_empty()
    }

    /// Consumes bytes from the front of `input`. `Some(reply)` once a reply is complete (the
    /// bytes after it stay in `input`); `None` when all of `input` was consumed without one.
    pub fn parse(&mut self, input: &mut &[u8]) -> Result<Option<Reply>, ReplyError> {
        let result = self.parse_inner(input);
        if result.is_err() {
            *self = ReplyParser::new(self.max_line, self.max_lines);
        }
        result
    }

    fn parse_inner(&mut self, input: &mut &[u8]) -> Result<Option<Reply>, ReplyError> {
        loop {
            let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                self.line.extend_from_slice(input);
                *input = &[];
                if self.line.len() > self.max_line.saturating_add(1) {
                    return Err(ReplyError::LineTooLong);
                }
                return Ok(None);
            };
            let (head, rest) = input.split_at(nl);
            *input = rest.get(1..).unwrap_or_default();
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(head);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > self.max_line {
                return Err(ReplyError::LineTooLong);
            }
            if let Some(reply) = self.line_done(&line)? {
                return Ok(Some(reply));
            }
        }
    }

    /// Handles one complete line (without line end); returns the reply if it was the last line.
    fn line_done(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        let (code, last, text) = split_line(line)?;
        if self.code.is_some_and(|c| c != code) {
            return Err(ReplyError::InconsistentCode);
        }
        if self.lines.len() >= self.max_lines {
            return Err(ReplyError::TooManyLines);
        }
        let text = String::from_utf8_lossy(text);
        // The first line decides whether this reply carries enhanced codes.
        let first = self.lines.is_empty();
        let parsed = (first || self.enhanced.is_some())
            .then(|| split_enhanced(code, &text))
            .flatten();
        let (enhanced, text) = match parsed {
            Some((e, t)) => (Some(e), t.to_string()),
            None => (None, text.into_owned()),
        };
        if first {
            self.enhanced = enhanced;
        }
        self.code = Some(code);
        self.lines.push(text);
        if !last {
            return Ok(None);
        }
        self.code = None;
        Ok(Some(Reply {
            code,
            enhanced: self.enhanced.take(),
            lines: std::mem::take(&mut self.lines),
        }))
    }
}

/// `250-text` → (250, false, "text"); `250 text` or `250` → last line.
fn split_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let (digits, rest) = match line {
        [a @ b'2'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', rest @ ..] => ([*a, *b, *c], rest),
        _ => return Err(ReplyError::BadCode),
    };
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match rest {
        [] => Ok((code, true, rest)),
        [b' ', text @ ..] => Ok((code, true, text)),
        [b'-', text @ ..] => Ok((code, false, text)),
        _ => Err(ReplyError::BadCode),
    }
}

/// `2.1.5 text` → (2.1.5, "text") if the class matches the reply code's first digit.
fn split_enhanced(code: u16, text: &str) -> Option<(EnhancedCode, &str)> {
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = word.split('.');
    let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || class.len() != 1 {
        return None;
    }
    let number = |s: &str, max: usize| -> Option<u16> {
        if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let class = number(class, 1)?;
    if class != code / 100 {
        return None;
    }
    let e = EnhancedCode(
        u8::try_from(class).ok()?,
        number(subject, 3)?,
        number(detail, 3)?,
    );
    Some((e, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, enhanced: Option<(u8, u16, u16)>, lines: &[&str]) -> Reply {
        Reply {
            code,
            enhanced: enhanced.map(|(a, b, c)| EnhancedCode(a, b, c)),
            lines: lines.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Parses all replies in `input`, fed whole and byte by byte; both must agree.
    fn parse_all(input: &[u8]) -> (Vec<Reply>, Option<ReplyError>) {
        let run = |chunk: usize| {
            let mut p = ReplyParser::new(64, 4);
            let mut out = Vec::new();
            for mut piece in input.chunks(chunk.max(1)) {
                while !piece.is_empty() {
                    match p.parse(&mut piece) {
                        Ok(Some(reply)) => out.push(reply),
                        Ok(None) => assert!(piece.is_empty()),
                        Err(e) => return (out, Some(e)),
                    }
                }
            }
            (out, None)
        };
        let whole = run(input.len());
        assert_eq!(whole, run(1), "byte-at-a-time differs");
        whole
    }

    #[test]
    fn replies() {
        type E = Option<(u8, u16, u16)>;
        type Want = &'static [(u16, E, &'static [&'static str])];
        let cases: &[(&[u8], Want)] = &[
            (b"220 mx.test ESMTP\r\n", &[(220, None, &["mx.test ESMTP"])]),
            (b"250\r\n", &[(250, None, &[""])]),
            (b"250 \r\n", &[(250, None, &[""])]),
            (b"250 2.1.0 Ok\r\n", &[(250, Some((2, 1, 0)), &["Ok"])]),
            (b"250 2.1.0\r\n", &[(250, Some((2, 1, 0)), &[""])]),
            // class must match the first digit, x.y.z shape only
            (b"550 2.1.0 odd\r\n", &[(550, None, &["2.1.0 odd"])]),
            (b"250 2.1 x\r\n", &[(250, None, &["2.1 x"])]),
            (b"250 2.1.0.1 x\r\n", &[(250, None, &["2.1.0.1 x"])]),
            (b"250 2.1234.0 x\r\n", &[(250, None, &["2.1234.0 x"])]),
            (
                b"550 5.1.1 <u@x>: no\n",
                &[(550, Some((5, 1, 1)), &["<u@x>: no"])],
            ),
            (
                b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                &[(250, None, &["mx.test", "PIPELINING", "8BITMIME"])],
            ),
            (
                b"451-4.3.0 first\r\n451 4.3.0 second\r\n250 ok\r\n",
                &[
                    (451, Some((4, 3, 0)), &["first", "second"]),
                    (250, None, &["ok"]),
                ],
            ),
            (
                b"451-4.3.0 a\r\n451 b\r\n",
                &[(451, Some((4, 3, 0)), &["a", "b"])],
            ),
            (
                b"451-a\r\n451 4.3.0 b\r\n",
                &[(451, None, &["a", "4.3.0 b"])],
            ),
            (
                b"250 caf\xc3\xa9 \xff\r\n",
                &[(250, None, &["caf\u{e9} \u{fffd}"])],
            ),
        ];
        for (input, want) in cases {
            let want: Vec<Reply> = want.iter().map(|(c, e, l)| r(*c, *e, l)).collect();
            assert_eq!(
                parse_all(input),
                (want, None),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn errors() {
        let long = [b"250 ".as_slice(), &[b'x'; 61], b"\r\n"].concat();
        let ok = [b"250 ".as_slice(), &[b'x'; 60], b"\r\n"].concat();
        let cases: &[(&[u8], usize, Option<ReplyError>)] = &[
            (&ok, 1, None),
            (&long, 0, Some(ReplyError::LineTooLong)),
            (&long[..66], 0, Some(ReplyError::LineTooLong)),
            (b"25 x\r\n", 0, Some(ReplyError::BadCode)),
            (b"650 x\r\n", 0, Some(ReplyError::BadCode)),
            (b"250x\r\n", 0, Some(ReplyError::BadCode)),
            (b"\r\n", 0, Some(ReplyError::BadCode)),
            (b"250-a\r\n251 b\r\n", 0, Some(ReplyError::InconsistentCode)),
            (b"250-a\n250-b\n250-c\n250 d\n", 1, None),
            (
                b"250-a\n250-b\n250-c\n250-d\n250 e\n",
                0,
                Some(ReplyError::TooManyLines),
            ),
            (b"250 a\n250-b", 1, None),
        ];
        for (input, n, err) in cases {
            let (replies, e) = parse_all(input);
            assert_eq!(
                (replies.len(), e),
                (*n, *err),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn round_trip() {
        for reply in [
            Reply::new(550, EnhancedCode(5, 1, 1), "no such user"),
            Reply::plain(220, "mx.test ESMTP"),
            r(250, None, &["mx.test", "SIZE 1000", "STARTTLS"]),
            r(451, Some((4, 7, 1)), &["a", "b"]),
        ] {
            let mut wire = Vec::new();
            reply.write_to(&mut wire);
            assert_eq!(parse_all(&wire), (vec![reply], None));
        }
    }

    #[test]
    fn rest_stays_in_input() {
        let mut p = ReplyParser::new(64, 4);
        let mut input: &[u8] = b"220 ready\r\n250 fake\r\n";
        let reply = p.parse(&mut input);
        assert_eq!(reply, Ok(Some(Reply::plain(220, "ready"))));
        assert_eq!(input, b"250 fake\r\n");
        assert!(p.is_idle());
    }
}
