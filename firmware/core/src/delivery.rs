//! Pure delivery decisions: the typed status of a delivery attempt for one recipient (reply
//! code, enhanced code, text, and where it came from), recipients grouped by route, MX answers
//! into the hosts to try, and the retry and expiry schedule. The daemon's delivery driver feeds
//! these with what it saw and does the I/O.

use std::fmt;
use std::time::Duration;

use sealgate_proto::Reply;

use crate::config::{Config, Destination, Route};

/// An RFC 3463 enhanced status code, `class.subject.detail` (the protocol crate's type).
pub use sealgate_proto::reply::EnhancedCode as Enhanced;

/// `2.x.y`, `4.x.y` or `5.x.y` with 1–3 digit subject and detail.
pub fn parse_enhanced(s: &str) -> Option<Enhanced> {
    let mut p = s.split('.');
    let (Some(c), Some(sub), Some(det), None) = (p.next(), p.next(), p.next(), p.next()) else {
        return None;
    };
    let num = |x: &str| {
        (!x.is_empty() && x.len() <= 3 && x.bytes().all(|b| b.is_ascii_digit()))
            .then(|| x.parse::<u16>().ok())
            .flatten()
    };
    let class = match c {
        "2" => 2,
        "4" => 4,
        "5" => 5,
        _ => return None,
    };
    Some(Enhanced(class, num(sub)?, num(det)?))
}

/// Where a status came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The next hop's reply.
    Remote,
    /// A DNS lookup (no MX, no address, resolver failure).
    Dns,
    /// The outbound TLS policy (STARTTLS missing, handshake or certificate refused).
    TlsPolicy,
    /// The connection (refused, timed out, closed, malformed replies).
    Connection,
    /// The box itself (no route, Maildir, the queue's own limits and expiry).
    Local,
}

impl Source {
    /// The word stored in the queue and shown in listings.
    pub fn name(self) -> &'static str {
        match self {
            Source::Remote => "remote",
            Source::Dns => "dns",
            Source::TlsPolicy => "tls-policy",
            Source::Connection => "connection",
            Source::Local => "local",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        [
            Source::Remote,
            Source::Dns,
            Source::TlsPolicy,
            Source::Connection,
            Source::Local,
        ]
        .into_iter()
        .find(|x| x.name() == s)
    }
}

/// Success, a temporary failure (retry) or a permanent one (bounce).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Success,
    Transient,
    Permanent,
}

/// The status of one delivery attempt for one recipient: shown as `[code ]enhanced text`, the
/// form logs, queue listings and DSNs carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The SMTP reply code, when there is one (a remote reply, or a local decision that is
    /// reported like one: `550 5.4.4 No route`).
    pub code: Option<u16>,
    /// The enhanced code; every local status has one, a remote reply may lack it.
    pub enhanced: Option<Enhanced>,
    pub text: String,
    pub source: Source,
}

impl Status {
    pub fn new(source: Source, enhanced: Enhanced, text: impl Into<String>) -> Self {
        Self {
            code: None,
            enhanced: Some(enhanced),
            text: text.into(),
            source,
        }
    }

    /// The same with an SMTP reply code in front.
    pub fn with_code(mut self, code: u16) -> Self {
        self.code = Some(code);
        self
    }

    /// A transient local status `4.x.y text` from its parts.
    pub fn transient(source: Source, subject: u16, detail: u16, text: impl Into<String>) -> Self {
        Self::new(source, Enhanced(4, subject, detail), text)
    }

    /// A permanent status `5.x.y text` from its parts, reported with code `550`.
    pub fn permanent(source: Source, subject: u16, detail: u16, text: impl Into<String>) -> Self {
        Self::new(source, Enhanced(5, subject, detail), text).with_code(550)
    }

    /// Parses the displayed form `[code ][enhanced ]text` (at least one of the two codes). For
    /// policy deferrals (`4.7.4 …`) and queues written before statuses were typed.
    pub fn parse(source: Source, s: &str) -> Option<Self> {
        let mut rest = s.trim_start();
        let mut code = None;
        if let Some((w, r)) = rest.split_once(' ').or(Some((rest, "")))
            && w.len() == 3
            && let Ok(c) = w.parse::<u16>()
            && (200..600).contains(&c)
        {
            code = Some(c);
            rest = r;
        }
        let (w, r) = rest.split_once(' ').unwrap_or((rest, ""));
        let (enhanced, text) = match (parse_enhanced(w), code) {
            (Some(e), _) => (Some(e), r),
            (None, Some(_)) => (None, rest),
            (None, None) => return None,
        };
        Some(Self {
            code,
            enhanced,
            text: text.to_string(),
            source,
        })
    }

    /// A next hop's reply, naming the peer (`… (from mx.b.test [127.0.0.2:25] (TLSv1.3 …))`).
    pub fn from_reply(r: &Reply, peer: &str) -> Self {
        let text = r.lines.join("; ");
        Self {
            code: Some(r.code),
            enhanced: r.enhanced,
            text: if text.is_empty() {
                format!("(from {peer})")
            } else {
                format!("{text} (from {peer})")
            },
            source: Source::Remote,
        }
    }

    pub fn class(&self) -> Class {
        let class = self.enhanced.map_or(0, |e| u16::from(e.0));
        match self.code.map_or(class, |c| c / 100) {
            2 => Class::Success,
            5 => Class::Permanent,
            _ => Class::Transient,
        }
    }

    /// The permanent status of a recipient given up at `max_queue_time` after `attempts`,
    /// whose last transient error was `last`: that error's code made permanent (`4.7.4` TLS
    /// required but not offered → `5.7.4`), so the DSN says what kept the message, else
    /// `5.4.7` (delivery time expired).
    pub fn expired(last: Option<&Status>, attempts: u32) -> Self {
        let enhanced = match last.and_then(|s| s.enhanced) {
            Some(Enhanced(4, subject, detail)) => Enhanced(5, subject, detail),
            _ => Enhanced(5, 4, 7),
        };
        let why = last.map_or_else(|| "no attempt succeeded".to_string(), Status::to_string);
        Self::new(
            Source::Local,
            enhanced,
            format!(
                "gave up after {attempts} attempts over the maximum queue time; last error: {why}"
            ),
        )
    }

    /// The queue's stored form: `source [code ]enhanced text`, control characters dropped and
    /// the text bounded.
    pub fn encode(&self) -> String {
        let shown: String = self
            .to_string()
            .chars()
            .filter(|c| !c.is_control())
            .take(900)
            .collect();
        format!("{} {shown}", self.source.name())
    }

    /// The stored form back; a line without a known source word is a queue written before
    /// statuses were typed (then the source is guessed from the reply code).
    pub fn decode(s: &str) -> Option<Self> {
        if let Some((w, rest)) = s.split_once(' ')
            && let Some(source) = Source::from_name(w)
        {
            return Self::parse(source, rest);
        }
        let legacy = Self::parse(Source::Local, s)?;
        Some(Self {
            source: if legacy.code.is_some() {
                Source::Remote
            } else {
                Source::Local
            },
            ..legacy
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::with_capacity(3);
        if let Some(c) = self.code {
            parts.push(c.to_string());
        }
        if let Some(e) = self.enhanced {
            parts.push(e.to_string());
        }
        if !self.text.is_empty() {
            parts.push(self.text.clone());
        }
        f.write_str(&parts.join(" "))
    }
}

/// The result of one delivery attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(Status),
    Failed(Status),
    Deferred(Status),
}

impl Outcome {
    /// By the status's class.
    pub fn of(status: Status) -> Self {
        match status.class() {
            Class::Success => Outcome::Delivered(status),
            Class::Permanent => Outcome::Failed(status),
            Class::Transient => Outcome::Deferred(status),
        }
    }

    pub fn status(&self) -> &Status {
        match self {
            Outcome::Delivered(s) | Outcome::Failed(s) | Outcome::Deferred(s) => s,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, s) = match self {
            Outcome::Delivered(s) => ("Delivered", s),
            Outcome::Failed(s) => ("Failed", s),
            Outcome::Deferred(s) => ("Deferred", s),
        };
        write!(f, "{word}({s})")
    }
}

/// The replies of one transaction: to MAIL when it was refused (then no RCPT was sent), to
/// each RCPT in order, and to the end of DATA when any recipient was accepted.
#[derive(Debug, Clone, Copy)]
pub struct Replies<'a> {
    pub mail: Option<&'a Reply>,
    pub rcpt: &'a [Reply],
    pub data: Option<&'a Reply>,
}

/// Each of `n` recipients' outcome from the replies of its transaction, naming the peer: a
/// refused MAIL or RCPT counts for the recipient, else the reply to DATA; no DATA reply at
/// all (connection lost) defers.
pub fn outcomes(replies: &Replies<'_>, n: usize, peer: &str) -> Vec<Outcome> {
    (0..n)
        .map(|k| {
            let r = replies.mail.or(replies.rcpt.get(k));
            match (r, replies.data) {
                (Some(r), _) if !r.is_positive() => Outcome::of(Status::from_reply(r, peer)),
                (_, Some(d)) => Outcome::of(Status::from_reply(d, peer)),
                (_, None) => Outcome::Deferred(Status::transient(
                    Source::Connection,
                    4,
                    2,
                    "no reply to DATA",
                )),
            }
        })
        .collect()
}

/// Which recipients of a message travel together: one group per route, and per recipient
/// domain for MX routes (each domain has its own MX hosts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupKey {
    /// An MX route, for this recipient domain.
    Mx(String),
    /// Any other route, by its index in the config's route list.
    Route(usize),
    /// No route matches (or the recipient has no domain): never relayed.
    NoRoute,
}

/// Recipients (indexes into the message's list) that share a route.
#[derive(Debug, Clone)]
pub struct Group {
    pub key: GroupKey,
    pub route: Option<Route>,
    pub recipients: Vec<usize>,
}

impl Group {
    /// The recipient domain the MX lookup is for (empty for other routes).
    pub fn mx_domain(&self) -> &str {
        match &self.key {
            GroupKey::Mx(d) => d,
            _ => "",
        }
    }
}

/// Groups pending recipients `(index, address)` by the route of their domain, in order of
/// first appearance.
pub fn group_by_route<'a>(
    config: &Config,
    recipients: impl IntoIterator<Item = (usize, &'a str)>,
) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, address) in recipients {
        let domain = sealgate_proto::envelope::domain_of(address);
        let found = domain.as_deref().and_then(|d| {
            config
                .route_for(d)
                .and_then(|r| config.routes.iter().position(|x| std::ptr::eq(x, r)))
        });
        let (key, route) = match found.and_then(|n| config.routes.get(n).map(|r| (n, r))) {
            Some((_, r)) if matches!(r.destination, Destination::Mx(_)) => {
                (GroupKey::Mx(domain.unwrap_or_default()), Some(r.clone()))
            }
            Some((n, r)) => (GroupKey::Route(n), Some(r.clone())),
            None => (GroupKey::NoRoute, None),
        };
        match groups.iter_mut().find(|g| g.key == key) {
            Some(g) => g.recipients.push(i),
            None => groups.push(Group {
                key,
                route,
                recipients: vec![i],
            }),
        }
    }
    groups
}

/// The status of recipients no route matches.
pub fn no_route() -> Status {
    Status::permanent(Source::Local, 4, 4, "No route to this domain")
}

/// An MX answer `(preference, exchange)` into the hosts to try, best first (RFC 5321 §5.1):
/// a single `.` is a null MX (RFC 7505: the domain takes no mail), no usable record means
/// the domain itself (implicit MX). Names lose their trailing dot.
pub fn mx_hosts(domain: &str, mut answer: Vec<(u16, String)>) -> Result<Vec<String>, Status> {
    let null = |h: &str| h == "." || h.is_empty();
    if answer.len() == 1 && answer.first().is_some_and(|(_, h)| null(h)) {
        return Err(Status::permanent(
            Source::Dns,
            1,
            10,
            format!("{domain} does not accept mail (null MX, RFC 7505)"),
        ));
    }
    answer.retain(|(_, h)| !null(h));
    answer.sort_by_key(|(p, _)| *p);
    if answer.is_empty() {
        return Ok(vec![domain.to_string()]);
    }
    Ok(answer
        .into_iter()
        .map(|(_, h)| h.trim_end_matches('.').to_string())
        .collect())
}

/// Whether a message that arrived at `arrival` has been queued for `max_queue_time` at `now`
/// (saturating: a huge `max_queue_time` means never).
pub fn is_expired(arrival: u64, max_queue_time: Duration, now: u64) -> bool {
    now >= arrival.saturating_add(max_queue_time.as_secs())
}

/// Unix seconds of the next attempt after `attempts` attempts: the schedule's step for that
/// attempt (its last step once past the end; 5 minutes for an empty schedule), at least one
/// second, saturating.
pub fn next_attempt(schedule: &[Duration], attempts: u32, now: u64) -> u64 {
    let n = usize::try_from(attempts.max(1) - 1).unwrap_or(usize::MAX);
    let step = schedule
        .get(n)
        .or(schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(300));
    now.saturating_add(step.as_secs().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_parse_display_and_classify() {
        type Row<'a> = (&'a str, Option<u16>, Option<&'a str>, &'a str, Class);
        let table: &[Row] = &[
            (
                "550 5.1.1 no such user",
                Some(550),
                Some("5.1.1"),
                "no such user",
                Class::Permanent,
            ),
            (
                "250 2.0.0 ok (from mx)",
                Some(250),
                Some("2.0.0"),
                "ok (from mx)",
                Class::Success,
            ),
            (
                "451 try later",
                Some(451),
                None,
                "try later",
                Class::Transient,
            ),
            ("554 5.7.1", Some(554), Some("5.7.1"), "", Class::Permanent),
            (
                "4.7.4 did not offer STARTTLS",
                None,
                Some("4.7.4"),
                "did not offer STARTTLS",
                Class::Transient,
            ),
            (
                "5.1.10 null MX",
                None,
                Some("5.1.10"),
                "null MX",
                Class::Permanent,
            ),
            ("4.4.1", None, Some("4.4.1"), "", Class::Transient),
        ];
        for &(text, code, enh, rest, class) in table {
            let s = Status::parse(Source::Remote, text).expect(text);
            let e = s.enhanced.map(|e| e.to_string());
            assert_eq!(
                (s.code, e.as_deref(), s.text.as_str()),
                (code, enh, rest),
                "{text}"
            );
            assert_eq!(s.class(), class, "{text}");
            assert_eq!(s.to_string(), text, "{text}");
        }
        for bad in [
            "",
            "hello",
            "6.1.1 x",
            "4.x.1 y",
            "4.1 z",
            "4.1.1.1 w",
            "999 x",
        ] {
            assert_eq!(Status::parse(Source::Local, bad), None, "{bad}");
        }
    }

    #[test]
    fn stored_form_round_trips_and_reads_untyped_queues() {
        let s = Status::transient(Source::TlsPolicy, 7, 4, "peer 127.0.0.2\r\n did not offer");
        let back = Status::decode(&s.encode()).expect("decode");
        assert_eq!(back.source, Source::TlsPolicy);
        assert_eq!(back.to_string(), "4.7.4 peer 127.0.0.2 did not offer");
        let legacy = Status::decode("550 5.1.1 unknown (from mx.b.test)").expect("legacy");
        assert_eq!((legacy.source, legacy.code), (Source::Remote, Some(550)));
        let legacy = Status::decode("4.4.2 127.0.0.1:25: connection closed").expect("legacy");
        assert_eq!((legacy.source, legacy.code), (Source::Local, None));
        assert_eq!(Status::decode("garbage"), None);
    }

    #[test]
    fn expiry_keeps_the_class_of_the_last_error() {
        let table: &[(Option<&str>, &str)] = &[
            (Some("4.7.4 127.0.0.2: did not offer STARTTLS"), "5.7.4"),
            (Some("451 4.3.0 try later"), "5.3.0"),
            (Some("451 busy"), "5.4.7"),
            (None, "5.4.7"),
        ];
        for &(last, want) in table {
            let last = last.map(|t| Status::parse(Source::Remote, t).expect(t));
            let s = Status::expired(last.as_ref(), 7);
            assert_eq!(
                s.enhanced.map(|e| e.to_string()).as_deref(),
                Some(want),
                "{last:?}"
            );
            assert_eq!(s.class(), Class::Permanent);
            assert!(s.text.contains("gave up after 7 attempts"), "{s}");
        }
    }

    #[test]
    fn outcome_by_class_and_its_log_form() {
        let o = Outcome::of(Status::parse(Source::Remote, "550 5.1.1 no").expect("s"));
        assert!(matches!(o, Outcome::Failed(_)));
        assert_eq!(o.to_string(), "Failed(550 5.1.1 no)");
        let o = Outcome::of(Status::parse(Source::Remote, "250 2.0.0 ok").expect("s"));
        assert!(matches!(o, Outcome::Delivered(_)));
        let o = Outcome::of(Status::transient(Source::Dns, 4, 3, "SERVFAIL"));
        assert_eq!(o.to_string(), "Deferred(4.4.3 SERVFAIL)");
    }

    #[test]
    fn mx_answers() {
        let mx = |v: &[(u16, &str)]| v.iter().map(|(p, h)| (*p, h.to_string())).collect();
        assert_eq!(
            mx_hosts("b.test", mx(&[(20, "mx2.b.test."), (10, "mx1.b.test.")])),
            Ok(vec!["mx1.b.test".to_string(), "mx2.b.test".to_string()])
        );
        assert_eq!(mx_hosts("b.test", mx(&[])), Ok(vec!["b.test".to_string()]));
        let null = mx_hosts("b.test", mx(&[(0, ".")])).expect_err("null MX");
        assert_eq!(
            null.to_string(),
            "550 5.1.10 b.test does not accept mail (null MX, RFC 7505)"
        );
        assert_eq!(
            mx_hosts("b.test", mx(&[(0, "."), (10, "mx.b.test")])),
            Ok(vec!["mx.b.test".to_string()])
        );
    }

    #[test]
    fn retry_schedule_and_expiry_saturate() {
        let s = [Duration::from_secs(60), Duration::from_secs(300)];
        let table: &[(&[Duration], u32, u64, u64)] = &[
            (&s, 0, 1000, 1060),
            (&s, 1, 1000, 1060),
            (&s, 2, 1000, 1300),
            (&s, 9, 1000, 1300),
            (&[], 1, 1000, 1300),
            (&[Duration::ZERO], 1, 1000, 1001),
            (&[Duration::MAX], 1, 1000, u64::MAX),
            (&s, u32::MAX, u64::MAX, u64::MAX),
        ];
        for &(sched, attempts, now, want) in table {
            assert_eq!(
                next_attempt(sched, attempts, now),
                want,
                "{sched:?} {attempts} {now}"
            );
        }
        assert!(!is_expired(1000, Duration::MAX, u64::MAX - 1));
        assert!(is_expired(1000, Duration::from_secs(10), 1010));
        assert!(!is_expired(1000, Duration::from_secs(10), 1009));
    }

    #[test]
    fn transaction_replies_into_outcomes() {
        let ok = Reply::new(250, Enhanced(2, 1, 5), "ok");
        let unknown = Reply::new(550, Enhanced(5, 1, 1), "unknown");
        let busy = Reply::new(451, Enhanced(4, 3, 0), "busy");
        let queued = Reply::new(250, Enhanced(2, 0, 0), "queued as X");
        let words = |v: Vec<Outcome>| v.iter().map(Outcome::to_string).collect::<Vec<_>>();
        let rcpt = [ok.clone(), unknown.clone(), busy.clone()];
        let all = Replies {
            mail: None,
            rcpt: &rcpt,
            data: Some(&queued),
        };
        assert_eq!(
            words(outcomes(&all, 3, "mx")),
            [
                "Delivered(250 2.0.0 queued as X (from mx))",
                "Failed(550 5.1.1 unknown (from mx))",
                "Deferred(451 4.3.0 busy (from mx))",
            ]
        );
        let refused = Replies {
            mail: Some(&busy),
            rcpt: &[],
            data: None,
        };
        assert_eq!(
            words(outcomes(&refused, 2, "mx")),
            ["Deferred(451 4.3.0 busy (from mx))"; 2]
        );
        let lost = Replies {
            mail: None,
            rcpt: &rcpt[..1],
            data: None,
        };
        assert_eq!(
            words(outcomes(&lost, 1, "mx")),
            ["Deferred(4.4.2 no reply to DATA)"]
        );
        let rejected = Replies {
            mail: None,
            rcpt: &rcpt[..1],
            data: Some(&unknown),
        };
        assert_eq!(
            words(outcomes(&rejected, 1, "mx")),
            ["Failed(550 5.1.1 unknown (from mx))"]
        );
    }

    fn config(routes: &str) -> Config {
        Config::from_toml(
            &format!(
                "[smtp]\nlisten = [\"127.0.0.1:2525\"]\nlocal_domains = [\"a.test\"]\n{routes}"
            ),
            "test",
        )
        .expect("config")
    }

    #[test]
    fn recipients_group_by_route_and_mx_domain() {
        let c = config(
            "[[route]]\ndomain = \"a.test\"\nmaildir = \"md\"\n\
             [[route]]\ndomain = \".hq.test\"\nnext_hop = [\"127.0.0.2:25\"]\n\
             [[route]]\ndomain = \"*\"\nmx = true\n",
        );
        let rcpts = [
            "x@a.test",
            "y@b.test",
            "z@gw.hq.test",
            "w@a.test",
            "v@c.test",
            "u@b.test",
            "nodomain",
            "t@hq.test",
        ];
        let groups = group_by_route(&c, rcpts.iter().enumerate().map(|(i, a)| (i, *a)));
        let got: Vec<(GroupKey, Vec<usize>)> = groups
            .iter()
            .map(|g| (g.key.clone(), g.recipients.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (GroupKey::Route(0), vec![0, 3]),
                (GroupKey::Mx("b.test".into()), vec![1, 5]),
                (GroupKey::Route(1), vec![2]),
                (GroupKey::Mx("c.test".into()), vec![4]),
                (GroupKey::NoRoute, vec![6]),
                (GroupKey::Mx("hq.test".into()), vec![7]),
            ]
        );
        assert_eq!(groups.get(1).map(Group::mx_domain), Some("b.test"));
        assert!(
            groups
                .iter()
                .all(|g| (g.key == GroupKey::NoRoute) == g.route.is_none())
        );
    }
}
