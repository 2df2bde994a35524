//! SMTP reply parsing for the load generator: bounded, line by line, no I/O.
//!
//! A reply is one or more lines `NNN-text` ending with a line `NNN text` (or a
//! bare `NNN`). [`ReplyParser`] is fed one line at a time and yields a
//! [`Reply`] when the last line arrives; it refuses lines that are not replies,
//! codes that change inside a multi-line reply, and replies longer than
//! [`MAX_REPLY_LINES`] lines.

use thiserror::Error;

/// Longest reply line accepted, CRLF included (RFC 5321 §4.5.3.1.5 says 512;
/// we allow some slack for chatty servers).
pub const MAX_REPLY_LINE: usize = 2048;

/// Most lines accepted in one multi-line reply (EHLO answers are the longest).
pub const MAX_REPLY_LINES: usize = 64;

/// Why a reply could not be parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// The line does not start with three digits followed by ' ', '-' or CRLF.
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    /// A continuation line carries a different code than the first line.
    #[error("reply code changed from {first} to {next} inside one reply")]
    CodeChanged {
        /// Code of the first line.
        first: u16,
        /// Code of the offending line.
        next: u16,
    },
    /// More than [`MAX_REPLY_LINES`] lines.
    #[error("reply has more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
    /// A line longer than [`MAX_REPLY_LINE`] bytes or without its line end.
    #[error("reply line longer than {MAX_REPLY_LINE} bytes or cut off")]
    LineTooLong,
}

/// A complete SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code, 200..=599 (1xx is refused as malformed).
    pub code: u16,
    /// The text of each line, without code, separator and line end.
    pub lines: Vec<String>,
}

impl Reply {
    /// Reply class: 2, 3, 4 or 5.
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// Whether the reply is a positive completion or intermediate reply.
    pub fn is_positive(&self) -> bool {
        matches!(self.class(), 2 | 3)
    }

    /// Whether an EHLO reply advertises `keyword` (case-insensitive), i.e. a
    /// line after the first starts with it as a whole word.
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.lines.iter().skip(1).any(|line| {
            line.split_ascii_whitespace()
                .next()
                .is_some_and(|word| word.eq_ignore_ascii_case(keyword))
        })
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.code,
            self.lines.first().map(String::as_str).unwrap_or("")
        )
    }
}

/// One parsed reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine<'a> {
    /// The reply code.
    pub code: u16,
    /// Whether this is the last line of the reply (separator ' ' or none).
    pub last: bool,
    /// The text after the separator, line end removed.
    pub text: &'a str,
}

/// Parses one reply line (with or without its CRLF / LF).
pub fn parse_line(line: &[u8]) -> Result<ReplyLine<'_>, ReplyError> {
    let malformed = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
    let body = line
        .strip_suffix(b"\n")
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .unwrap_or(line);
    let (digits, rest) = match body {
        [a, b, c, rest @ ..] => ([*a, *b, *c], rest),
        _ => return Err(malformed()),
    };
    if !(b'2'..=b'5').contains(&digits[0])
        || !digits[1].is_ascii_digit()
        || !digits[2].is_ascii_digit()
    {
        return Err(malformed());
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let (last, text) = match rest {
        [] => (true, &[][..]),
        [b' ', text @ ..] => (true, text),
        [b'-', text @ ..] => (false, text),
        _ => return Err(malformed()),
    };
    // Reply text is ASCII by the RFC; accept UTF-8 (SMTPUTF8) and refuse the rest.
    let text = std::str::from_utf8(text).map_err(|_| malformed())?;
    Ok(ReplyLine { code, last, text })
}

/// Accumulates reply lines into a [`Reply`].
#[derive(Debug, Default)]
pub struct ReplyParser {
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// A parser waiting for the first line of a reply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one line; returns the reply when `line` was its last line.
    pub fn feed(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        if line.len() > MAX_REPLY_LINE {
            return Err(ReplyError::LineTooLong);
        }
        let parsed = parse_line(line)?;
        match self.code {
            Some(first) if first != parsed.code => {
                return Err(ReplyError::CodeChanged {
                    first,
                    next: parsed.code,
                });
            }
            _ => self.code = Some(parsed.code),
        }
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        self.lines.push(parsed.text.to_owned());
        if parsed.last {
            let lines = std::mem::take(&mut self.lines);
            self.code = None;
            Ok(Some(Reply {
                code: parsed.code,
                lines,
            }))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_line_table() {
        let ok: &[(&[u8], u16, bool, &str)] = &[
            (b"250 OK\r\n", 250, true, "OK"),
            (b"250-PIPELINING\r\n", 250, false, "PIPELINING"),
            (b"354\r\n", 354, true, ""),
            (b"221 bye\n", 221, true, "bye"),
            (b"554 5.7.1 no", 554, true, "5.7.1 no"),
            (b"421 \r\n", 421, true, ""),
        ];
        for (input, code, last, text) in ok {
            let line = parse_line(input).expect("valid line");
            assert_eq!((line.code, line.last, line.text), (*code, *last, *text));
        }
        let bad: &[&[u8]] = &[
            b"",
            b"25\r\n",
            b"2a0 x\r\n",
            b"150 x\r\n",
            b"650 x\r\n",
            b"250_x\r\n",
            b"250\xff\r\n",
            b"250 \xff\r\n",
            b"HTTP/1.1 400\r\n",
        ];
        for input in bad {
            assert!(
                matches!(parse_line(input), Err(ReplyError::Malformed(_))),
                "{input:?}"
            );
        }
    }

    #[test]
    fn multiline_reply() {
        let mut p = ReplyParser::new();
        assert_eq!(p.feed(b"250-mx.example hi\r\n"), Ok(None));
        assert_eq!(p.feed(b"250-pipelining\r\n"), Ok(None));
        assert_eq!(p.feed(b"250-SIZE 1000\r\n"), Ok(None));
        let reply = p.feed(b"250 STARTTLS\r\n").expect("ok").expect("done");
        assert_eq!(reply.code, 250);
        assert_eq!(reply.lines.len(), 4);
        assert!(reply.has_extension("PIPELINING"));
        assert!(reply.has_extension("starttls"));
        assert!(reply.has_extension("size"));
        assert!(!reply.has_extension("mx.example"));
        assert!(!reply.has_extension("8BITMIME"));
        // The parser is reusable for the next reply.
        let next = p.feed(b"221 bye\r\n").expect("ok").expect("done");
        assert_eq!(next.to_string(), "221 bye");
        assert_eq!(next.class(), 2);
    }

    #[test]
    fn code_change_refused() {
        let mut p = ReplyParser::new();
        assert_eq!(p.feed(b"250-a\r\n"), Ok(None));
        assert_eq!(
            p.feed(b"251 b\r\n"),
            Err(ReplyError::CodeChanged {
                first: 250,
                next: 251
            })
        );
    }

    #[test]
    fn limits() {
        let mut p = ReplyParser::new();
        for _ in 0..MAX_REPLY_LINES {
            assert_eq!(p.feed(b"250-x\r\n"), Ok(None));
        }
        assert_eq!(p.feed(b"250 x\r\n"), Err(ReplyError::TooManyLines));
        let long = vec![b'a'; MAX_REPLY_LINE + 1];
        assert_eq!(ReplyParser::new().feed(&long), Err(ReplyError::LineTooLong));
    }
}
