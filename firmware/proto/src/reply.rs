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
