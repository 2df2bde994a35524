//! Benchmark bookkeeping: per-worker counters, latency percentiles, and the
//! text and JSON reports.

use std::time::Duration;

use serde_json::json;

/// What went wrong, for the error counts of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect failed (refused, unreachable, …).
    Connect,
    /// TLS handshake failed, or STARTTLS was refused or not offered.
    Tls,
    /// An operation did not finish within the per-operation timeout.
    Timeout,
    /// The server answered 4xx.
    Smtp4xx,
    /// The server answered 5xx.
    Smtp5xx,
    /// Malformed or unexpected reply, or the server closed the connection.
    Protocol,
    /// Socket error after connecting.
    Io,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Connect,
        ErrorKind::Tls,
        ErrorKind::Timeout,
        ErrorKind::Smtp4xx,
        ErrorKind::Smtp5xx,
        ErrorKind::Protocol,
        ErrorKind::Io,
    ];

    /// Name used in the reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Smtp4xx => "smtp_4xx",
            ErrorKind::Smtp5xx => "smtp_5xx",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Io => "io",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a TLS handshake went, as rustls reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// A full handshake.
    Full,
    /// A full TLS 1.3 handshake with a HelloRetryRequest round trip.
    FullWithHelloRetryRequest,
    /// A resumed handshake.
    Resumed,
}

/// Counters of one worker, merged at the end of the run.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Latency of each accepted message, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Messages answered 250 after the final dot.
    pub accepted: u64,
    /// Messages not accepted for any reason.
    pub failed: u64,
    /// Sessions that sent all their messages and QUIT without error.
    pub sessions_ok: u64,
    /// Sessions that ended with an error.
    pub sessions_failed: u64,
    /// TLS handshakes by kind: full, full with HRR, resumed.
    pub handshakes: [u64; 3],
    errors: [u64; ErrorKind::ALL.len()],
    /// The first few error messages, for the report.
    pub samples: Vec<String>,
}

/// Error messages kept per worker for the report.
const MAX_SAMPLES: usize = 3;

impl Stats {
    /// Counts one error of `kind`, keeping `message` if few are kept so far.
    pub fn error(&mut self, kind: ErrorKind, message: impl FnOnce() -> String) {
        self.errors[kind.index()] += 1;
        if self.samples.len() < MAX_SAMPLES {
            let message = message();
            if !self.samples.contains(&message) {
                self.samples.push(message);
            }
        }
    }

    /// Number of errors of `kind`.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()]
    }

    /// Counts one TLS handshake.
    pub fn handshake(&mut self, kind: Handshake) {
        let i = match kind {
            Handshake::Full => 0,
            Handshake::FullWithHelloRetryRequest => 1,
            Handshake::Resumed => 2,
        };
        self.handshakes[i] += 1;
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: Stats) {
        self.latencies_us.extend(other.latencies_us);
        self.accepted += other.accepted;
        self.failed += other.failed;
        self.sessions_ok += other.sessions_ok;
        self.sessions_failed += other.sessions_failed;
        for (a, b) in self.handshakes.iter_mut().zip(other.handshakes) {
            *a += b;
        }
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        for s in other.samples {
            if self.samples.len() < MAX_SAMPLES * 2 && !self.samples.contains(&s) {
                self.samples.push(s);
            }
        }
    }
}

/// The `p`-th percentile (0 < p ≤ 100) of ascending `sorted` by the
/// nearest-rank method; `None` for no samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// What was run, for the report header.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// Server address as given.
    pub addr: String,
    /// "plain", "starttls" or "implicit-tls".
    pub mode: &'static str,
    /// Concurrent connections.
    pub conns: u64,
    /// Messages requested.
    pub msgs: u64,
    /// Message size in bytes.
    pub size: usize,
    /// Messages per session.
    pub per_session: u64,
    /// Recipients per message.
    pub rcpts: u64,
}

/// The final report of a run.
#[derive(Debug)]
pub struct Report {
    info: RunInfo,
    stats: Stats,
    elapsed: Duration,
}

impl Report {
    /// Builds the report; sorts the latencies.
    pub fn new(info: RunInfo, mut stats: Stats, elapsed: Duration) -> Self {
        stats.latencies_us.sort_unstable();
        Self {
            info,
            stats,
            elapsed,
        }
    }

    /// Whether every requested message was accepted.
    pub fn all_accepted(&self) -> bool {
        self.stats.accepted == self.info.msgs && self.stats.failed == 0
    }

    fn rate(&self, count: u64) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 { count as f64 / secs } else { 0.0 }
    }

    fn latency_ms(&self, p: f64) -> Option<f64> {
        percentile(&self.stats.latencies_us, p).map(|us| us as f64 / 1000.0)
    }

    fn max_ms(&self) -> Option<f64> {
        self.stats.latencies_us.last().map(|&us| us as f64 / 1000.0)
    }

    /// The report as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let errors: serde_json::Map<String, serde_json::Value> = ErrorKind::ALL
            .iter()
            .map(|k| (k.name().to_owned(), json!(self.stats.errors(*k))))
            .collect();
        let s = &self.stats;
        json!({
            "addr": self.info.addr,
            "mode": self.info.mode,
            "conns": self.info.conns,
            "msgs": self.info.msgs,
            "size": self.info.size,
            "per_session": self.info.per_session,
            "rcpts": self.info.rcpts,
            "accepted": s.accepted,
            "failed": s.failed,
            "sessions_ok": s.sessions_ok,
            "sessions_failed": s.sessions_failed,
            "total_s": self.elapsed.as_secs_f64(),
            "msgs_per_s": self.rate(s.accepted),
            "sessions_per_s": self.rate(s.sessions_ok),
            "latency_ms": {
                "p50": self.latency_ms(50.0),
                "p90": self.latency_ms(90.0),
                "p99": self.latency_ms(99.0),
                "max": self.max_ms(),
            },
            "tls_handshakes": {
                "full": s.handshakes[0],
                "full_with_hrr": s.handshakes[1],
                "resumed": s.handshakes[2],
            },
            "errors": errors,
            "error_samples": s.samples,
        })
    }

    /// The report as human-readable text.
    pub fn to_text(&self) -> String {
        let s = &self.stats;
        let i = &self.info;
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let mut out = format!(
            "sealctl bench smtp {addr} ({mode}): {conns} conns, {msgs} msgs of {size} B, \
             {per} msg/session, {rcpts} rcpt/msg\n\
             accepted   {acc} / {msgs} ({failed} failed)\n\
             sessions   {sok} ok, {sfail} failed\n\
             total      {total:.3} s\n\
             throughput {mps:.1} msg/s, {sps:.1} sessions/s\n\
             latency ms p50 {p50}  p90 {p90}  p99 {p99}  max {max}\n",
            addr = i.addr,
            mode = i.mode,
            conns = i.conns,
            msgs = i.msgs,
            size = i.size,
            per = i.per_session,
            rcpts = i.rcpts,
            acc = s.accepted,
            failed = s.failed,
            sok = s.sessions_ok,
            sfail = s.sessions_failed,
            total = self.elapsed.as_secs_f64(),
            mps = self.rate(s.accepted),
            sps = self.rate(s.sessions_ok),
            p50 = ms(self.latency_ms(50.0)),
            p90 = ms(self.latency_ms(90.0)),
            p99 = ms(self.latency_ms(99.0)),
            max = ms(self.max_ms()),
        );
        if i.mode != "plain" {
            out.push_str(&format!(
                "tls        {} full, {} resumed, {} full with HelloRetryRequest\n",
                s.handshakes[0], s.handshakes[2], s.handshakes[1]
            ));
        }
        let errors: Vec<String> = ErrorKind::ALL
            .iter()
            .filter(|k| s.errors(**k) > 0)
            .map(|k| format!("{} {}", k.name(), s.errors(*k)))
            .collect();
        if errors.is_empty() {
            out.push_str("errors     none\n");
        } else {
            out.push_str(&format!("errors     {}\n", errors.join(", ")));
            for sample in &s.samples {
                out.push_str(&format!("  e.g.     {sample}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        let cases = [
            (50.0, 50),
            (90.0, 90),
            (99.0, 99),
            (100.0, 100),
            (0.1, 1),
            (0.0, 1),
        ];
        for (p, expected) in cases {
            assert_eq!(percentile(&v, p), Some(expected), "p{p}");
        }
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 51.0), Some(3));
        assert_eq!(percentile(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99.0), Some(10));
    }

    fn info() -> RunInfo {
        RunInfo {
            addr: "127.0.0.1:25".into(),
            mode: "starttls",
            conns: 2,
            msgs: 3,
            size: 100,
            per_session: 1,
            rcpts: 1,
        }
    }

    #[test]
    fn merge_and_report() {
        let mut a = Stats {
            latencies_us: vec![3000, 1000],
            accepted: 2,
            sessions_ok: 2,
            ..Stats::default()
        };
        a.handshake(Handshake::Full);
        a.handshake(Handshake::Resumed);
        let mut b = Stats {
            failed: 1,
            sessions_failed: 1,
            ..Stats::default()
        };
        b.error(ErrorKind::Smtp4xx, || "451 later".into());
        a.merge(b);
        let report = Report::new(info(), a, Duration::from_secs(1));
        assert!(!report.all_accepted());
        let j = report.to_json();
        assert_eq!(j["accepted"], 2);
        assert_eq!(j["failed"], 1);
        assert_eq!(j["errors"]["smtp_4xx"], 1);
        assert_eq!(j["errors"]["connect"], 0);
        assert_eq!(j["latency_ms"]["p50"], 1.0);
        assert_eq!(j["latency_ms"]["max"], 3.0);
        assert_eq!(j["tls_handshakes"]["resumed"], 1);
        assert_eq!(j["msgs_per_s"], 2.0);
        let text = report.to_text();
        assert!(text.contains("smtp_4xx 1"), "{text}");
        assert!(text.contains("451 later"), "{text}");
        assert!(text.contains("1 full, 1 resumed"), "{text}");
    }

    #[test]
    fn empty_report() {
        let report = Report::new(info(), Stats::default(), Duration::ZERO);
        let j = report.to_json();
        assert!(j["latency_ms"]["p50"].is_null());
        assert_eq!(j["msgs_per_s"], 0.0);
        assert!(report.to_text().contains("p50 -"));
    }
}
