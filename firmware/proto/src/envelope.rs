//! The SMTP envelope of one message, as accepted by the server and handed to the spool.

/// The body type declared with `MAIL FROM … BODY=` (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
}

/// Sender, recipients and the parameters that travel with them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// Reverse path without angle brackets; empty for the null sender `<>`.
    pub mail_from: String,
    /// Forward paths without angle brackets, in the order accepted.
    pub rcpt_to: Vec<String>,
    pub body: BodyType,
    /// `SMTPUTF8` was given on `MAIL FROM` (RFC 6531).
    pub smtputf8: bool,
    /// `SIZE=` declared on `MAIL FROM`, if any.
    pub declared_size: Option<u64>,
}

/// The domain part of an address (`user@Example.COM` → `example.com`), lowercased.
/// `None` for an address without `@` or with an empty domain.
pub fn domain_of(address: &str) -> Option<String> {
    let (_, domain) = address.rsplit_once('@')?;
    let domain = domain.trim_end_matches('.');
    if domain.is_empty() {
        None
    } else {
        Some(domain.to_ascii_lowercase())
    }
}

/// Puts quotes back around a local part that is not a dot-atom (RFC 5321 §4.1.2):
/// `john smith@x.test` → `"john smith"@x.test`. Addresses without `@` are returned as they are.
pub fn requote(address: &str) -> String {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return address.to_string();
    };
    let atext = |c: char| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_atom = !local.is_empty()
        && local
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(atext));
    if dot_atom {
        return address.to_string();
    }
    let mut q = String::with_capacity(address.len() + 4);
    q.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push_str("\"@");
    q.push_str(domain);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        let cases = [
            ("user@Example.COM", Some("example.com")),
            ("a@b@c.test", Some("c.test")),
            ("postmaster", None),
            ("user@", None),
            ("user@host.test.", Some("host.test")),
        ];
        for (input, want) in cases {
            assert_eq!(domain_of(input).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn requoting() {
        let cases = [
            ("a.b@x.test", "a.b@x.test"),
            ("john smith@x.test", "\"john smith\"@x.test"),
            ("b@external.test@a.test", "\"b@external.test\"@a.test"),
            ("a\"b@x.test", "\"a\\\"b\"@x.test"),
            (".a@x.test", "\".a\"@x.test"),
            ("a..b@x.test", "\"a..b\"@x.test"),
            ("postmaster", "postmaster"),
        ];
        for (input, want) in cases {
            assert_eq!(requote(input), want, "{input}");
        }
    }
}
