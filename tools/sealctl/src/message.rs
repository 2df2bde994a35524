//! Test message generation: a realistic RFC 5322 header and a filler body of
//! exactly the requested size (dot-stuffing is the session machine's, see
//! `sealgate_proto::client`).

use std::time::{SystemTime, UNIX_EPOCH};

use sealgate_proto::received::rfc5322_date;

/// Longest body line, CRLF excluded (RFC 5322 §2.1.1 recommends at most 78).
pub const MAX_BODY_LINE: usize = 76;

/// Filler text for bodies; contains no '.', so no body line needs stuffing.
const FILLER: &[u8] = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod \
tempor incididunt ut labore et dolore magna aliqua; Ut enim ad minim veniam, quis nostrud \
exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat 0123456789 ";

/// Builds the messages of one benchmark run.
#[derive(Debug, Clone)]
pub struct MessageFactory {
    from: String,
    to: Vec<String>,
    size: usize,
    run_tag: String,
    date: String,
}

impl MessageFactory {
    /// A factory for messages of `size` bytes (header, blank line and body,
    /// CRLF line ends, before dot-stuffing) from `from` to `to`.
    ///
    /// `run_tag` makes Message-IDs unique across runs; `date` is the value of
    /// the Date header (see [`rfc5322_date`]).
    pub fn new(from: &str, to: &[String], size: usize, run_tag: &str, date: &str) -> Self {
        Self {
            from: from.to_owned(),
            to: to.to_vec(),
            size,
            run_tag: run_tag.to_owned(),
            date: date.to_owned(),
        }
    }

    /// A factory with a run tag and Date taken from the clock and process id.
    pub fn now(from: &str, to: &[String], size: usize) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let tag = format!("{:x}.{:x}", now.as_nanos(), std::process::id());
        Self::new(from, to, size, &tag, &rfc5322_date(now.as_secs()))
    }

    /// The Message-ID (without angle brackets) of message number `seq`.
    pub fn message_id(&self, seq: u64) -> String {
        format!("{}.{seq}@sealctl.invalid", self.run_tag)
    }

    /// Message number `seq`: exactly `size` bytes, unless the header alone is
    /// longer, in which case the message is the header and an empty body.
    pub fn build(&self, seq: u64) -> Vec<u8> {
        let mut header = self.header(seq, "");
        // A body needs at least one CRLF, so one spare byte goes to the Subject.
        if self.size.checked_sub(header.len() + 2) == Some(1) {
            header = self.header(seq, ".");
        }
        let mut out = Vec::with_capacity(self.size.max(header.len() + 2));
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(b"\r\n");
        let body = self.size.saturating_sub(out.len());
        filler_body(body, &mut out);
        out
    }

    fn header(&self, seq: u64, subject_pad: &str) -> String {
        let mut to = String::new();
        for (i, rcpt) in self.to.iter().enumerate() {
            if i > 0 {
                // One recipient per line keeps header lines short.
                to.push_str(",\r\n ");
            }
            to.push('<');
            to.push_str(rcpt);
            to.push('>');
        }
        format!(
            "From: sealctl bench <{from}>\r\n\
             To: {to}\r\n\
             Subject: sealctl bench message {seq}{subject_pad}\r\n\
             Date: {date}\r\n\
             Message-ID: <{id}>\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\
             Content-Transfer-Encoding: 7bit\r\n",
            from = self.from,
            date = self.date,
            id = self.message_id(seq),
        )
    }
}

/// Appends exactly `len` bytes of CRLF-terminated filler lines of at most
/// [`MAX_BODY_LINE`] characters; `len` must not be 1 (nothing is appended then).
fn filler_body(len: usize, out: &mut Vec<u8>) {
    let full = MAX_BODY_LINE + 2;
    let mut left = len;
    let mut line_no = 0usize;
    while left >= 2 {
        // Never leave a single byte: it could not hold a CRLF.
        let take = if left == full + 1 {
            full - 1
        } else {
            left.min(full)
        };
        let text = take - 2;
        let start = (line_no * 7) % FILLER.len();
        out.extend(FILLER.iter().cycle().skip(start).take(text));
        out.extend_from_slice(b"\r\n");
        left -= take;
        line_no += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factory(size: usize, rcpts: usize) -> MessageFactory {
        let to: Vec<String> = (0..rcpts).map(|i| format!("r{i}@example.test")).collect();
        MessageFactory::new(
            "a@b.test",
            &to,
            size,
            "tag",
            "Thu, 01 Jan 1970 00:00:00 +0000",
        )
    }

    fn check_lines(msg: &[u8]) {
        assert!(msg.ends_with(b"\r\n"));
        for line in msg.split(|&b| b == b'\n') {
            if line.is_empty() {
                continue; // after the final LF
            }
            assert!(line.ends_with(b"\r"), "bare LF in {line:?}");
            assert!(line.len() - 1 <= 78, "line too long: {}", line.len() - 1);
            assert!(!line.contains(&b'\r') || line.iter().filter(|&&b| b == b'\r').count() == 1);
            assert!(line.iter().all(|b| b.is_ascii()));
        }
    }

    #[test]
    fn exact_sizes_and_line_lengths() {
        let base = factory(0, 1).build(1).len();
        for size in (base..base + 400).chain([4096, 65_536, 1 << 20]) {
            for rcpts in [1, 3] {
                let msg = factory(size, rcpts).build(12_345);
                if size >= factory(0, rcpts).build(12_345).len() {
                    assert_eq!(msg.len(), size, "size {size} rcpts {rcpts}");
                }
                check_lines(&msg);
            }
        }
    }

    #[test]
    fn small_size_gives_header_only() {
        let msg = factory(10, 1).build(1);
        assert!(msg.ends_with(b"\r\n\r\n"));
        check_lines(&msg);
    }

    #[test]
    fn message_ids_unique_and_header_realistic() {
        let f = factory(4096, 2);
        let a = String::from_utf8(f.build(1)).expect("ascii");
        let b = String::from_utf8(f.build(2)).expect("ascii");
        assert!(a.contains("Message-ID: <tag.1@sealctl.invalid>\r\n"));
        assert!(b.contains("Message-ID: <tag.2@sealctl.invalid>\r\n"));
        assert!(a.starts_with(
            "From: sealctl bench <a@b.test>\r\nTo: <r0@example.test>,\r\n <r1@example.test>\r\n"
        ));
        assert!(a.contains("\r\n\r\n"));
        assert_ne!(f.message_id(1), f.message_id(2));
    }
}
