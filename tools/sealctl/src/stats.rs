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

impl Handshake {
    /// Every kind, in report order.
    pub const ALL: [Handshake; 3] = [
        Handshake::Full,
        Handshake::FullWithHelloRetryRequest,
        Handshake::Resumed,
    ];

    /// Name used in the reports.
    pub fn name(self) -> &'static str {
        match self {
            Handshake::Full => "full",
            Handshake::FullWithHelloRetryRequest => "full_with_hrr",
            Handshake::Resumed => "resumed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One completed TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeSample {
    /// Full or resumed.
    pub kind: Handshake,
    /// When it started, in microseconds since the start of the run.
    pub start_us: u64,
    /// How long it took, in microseconds: from writing the ClientHello until
    /// rustls reported the handshake complete on the client side.
    pub duration_us: u64,
}

impl HandshakeSample {
    /// End of the sample's interval; at least 1 µs after its start so that
    /// every handshake takes some wall time.
    fn end_us(&self) -> u64 {
        self.start_us.saturating_add(self.duration_us.max(1))
    }
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
    /// Every completed TLS handshake.
    pub handshakes: Vec<HandshakeSample>,
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

    /// Records one completed TLS handshake of `kind` that started `start`
    /// after the start of the run and took `duration`.
    pub fn handshake(&mut self, kind: Handshake, start: Duration, duration: Duration) {
        self.handshakes.push(HandshakeSample {
            kind,
            start_us: micros(start),
            duration_us: micros(duration),
        });
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: Stats) {
        self.latencies_us.extend(other.latencies_us);
        self.accepted += other.accepted;
        self.failed += other.failed;
        self.sessions_ok += other.sessions_ok;
        self.sessions_failed += other.sessions_failed;
        self.handshakes.extend(other.handshakes);
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

/// `d` in whole microseconds, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Total length of the union of the intervals `[start, end)` (any order,
/// empty ones allowed): the time covered by at least one of them.
pub fn union_len(intervals: &mut [(u64, u64)]) -> u64 {
    intervals.sort_unstable();
    let mut total = 0u64;
    // The merged interval being grown, if any.
    let mut current: Option<(u64, u64)> = None;
    for &(start, end) in intervals.iter() {
        if end <= start {
            continue;
        }
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                total = total.saturating_add(e - s);
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    if let Some((s, e)) = current {
        total = total.saturating_add(e - s);
    }
    total
}

/// The TLS handshakes of one kind (or of all kinds), summarized.
///
/// Handshakes/s of a kind is `count / busy`, where `busy` is the wall time
/// during which at least one handshake of that kind was in flight (the
/// union of their intervals, so overlapping handshakes are not counted
/// twice, and time spent on SMTP or on handshakes of the other kind is not
/// counted at all). It is the rate at which that kind completed while the
/// client was doing it; a measured rate under this load, not the server's
/// capacity unless the server is saturated. With many connections some
/// handshake is nearly always in flight, so the rate tends to count / total
/// time and follows the session rate; a burst of full handshakes at the
/// start of a run (when the session store is still empty) gets its own
/// short window. In a run mixing kinds, the per-kind windows overlap and
/// share the load: compare the all-kinds rate of a run with resumption to
/// the full rate of a `--no-resume` run, and the per-kind latencies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HandshakeSummary {
    /// Handshakes of this kind.
    pub count: u64,
    /// Their durations in microseconds, ascending.
    durations_us: Vec<u64>,
    /// Wall time in which at least one of them was in flight.
    pub busy: Duration,
}

impl HandshakeSummary {
    /// Summarizes the `samples` of `kind`.
    pub fn of(samples: &[HandshakeSample], kind: Handshake) -> Self {
        Self::of_samples(samples.iter().filter(|h| h.kind == kind))
    }

    /// Summarizes all `samples`, whatever their kind.
    pub fn all(samples: &[HandshakeSample]) -> Self {
        Self::of_samples(samples.iter())
    }

    fn of_samples<'a>(samples: impl Iterator<Item = &'a HandshakeSample> + Clone) -> Self {
        let mut durations_us: Vec<u64> = samples.clone().map(|h| h.duration_us).collect();
        durations_us.sort_unstable();
        let mut intervals: Vec<(u64, u64)> = samples.map(|h| (h.start_us, h.end_us())).collect();
        Self {
            count: durations_us.len() as u64,
            durations_us,
            busy: Duration::from_micros(union_len(&mut intervals)),
        }
    }

    /// The `p`-th percentile of the handshake duration in milliseconds.
    pub fn latency_ms(&self, p: f64) -> Option<f64> {
        percentile(&self.durations_us, p).map(|us| us as f64 / 1000.0)
    }

    /// Handshakes per second of busy time (see the type); `None` without
    /// handshakes.
    pub fn per_s(&self) -> Option<f64> {
        let secs = self.busy.as_secs_f64();
        (self.count > 0 && secs > 0.0).then(|| self.count as f64 / secs)
    }
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
    /// Whether the TLS client offered session resumption (false in plain
    /// mode and with `--no-resume`).
    pub resumption: bool,
}

/// The final report of a run.
#[derive(Debug)]
pub struct Report {
    info: RunInfo,
    stats: Stats,
    elapsed: Duration,
    /// Per handshake kind, in [`Handshake::ALL`] order.
    handshakes: [HandshakeSummary; 3],
    /// All handshakes, whatever their kind.
    all_handshakes: HandshakeSummary,
}

impl Report {
    /// Builds the report; sorts the latencies and summarizes the handshakes.
    pub fn new(info: RunInfo, mut stats: Stats, elapsed: Duration) -> Self {
        stats.latencies_us.sort_unstable();
        let handshakes = Handshake::ALL.map(|k| HandshakeSummary::of(&stats.handshakes, k));
        let all_handshakes = HandshakeSummary::all(&stats.handshakes);
        stats.handshakes = Vec::new();
        Self {
            info,
            stats,
            elapsed,
            handshakes,
            all_handshakes,
        }
    }

    /// The summary of the handshakes of `kind`.
    pub fn handshakes(&self, kind: Handshake) -> &HandshakeSummary {
        &self.handshakes[kind.index()]
    }

    /// `tls_handshakes`: the counts per kind at the top (summing to the
    /// handshakes done), then latency, busy time and rate per kind and for
    /// "all".
    fn handshakes_json(&self) -> serde_json::Value {
        let by_kind = |f: &dyn Fn(&HandshakeSummary) -> serde_json::Value| {
            let mut map: serde_json::Map<String, serde_json::Value> = Handshake::ALL
                .iter()
                .map(|k| (k.name().to_owned(), f(self.handshakes(*k))))
                .collect();
            map.insert("all".into(), f(&self.all_handshakes));
            map
        };
        let mut out: serde_json::Map<String, serde_json::Value> = Handshake::ALL
            .iter()
            .map(|k| (k.name().to_owned(), json!(self.handshakes(*k).count)))
            .collect();
        out.insert("resumption".into(), json!(self.info.resumption));
        out.insert(
            "latency_ms".into(),
            json!(by_kind(&|h| json!({
                "p50": h.latency_ms(50.0),
                "p99": h.latency_ms(99.0),
                "max": h.latency_ms(100.0),
            }))),
        );
        out.insert(
            "busy_s".into(),
            json!(by_kind(&|h| json!(h.busy.as_secs_f64()))),
        );
        out.insert("per_s".into(), json!(by_kind(&|h| json!(h.per_s()))));
        serde_json::Value::Object(out)
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
            "tls_handshakes": self.handshakes_json(),
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
            let full = self.handshakes(Handshake::Full);
            let hrr = self.handshakes(Handshake::FullWithHelloRetryRequest);
            let resumed = self.handshakes(Handshake::Resumed);
            out.push_str(&format!(
                "tls        resumption {}: {} full, {} resumed, {} full with HelloRetryRequest\n",
                if i.resumption { "on" } else { "off" },
                full.count,
                resumed.count,
                hrr.count,
            ));
            let kinds_seen = [full, hrr, resumed].iter().filter(|h| h.count > 0).count();
            let rows = [
                ("full", full, true),
                ("full+hrr", hrr, hrr.count > 0),
                ("resumed", resumed, true),
                ("all", &self.all_handshakes, kinds_seen > 1),
            ];
            for (label, h, _) in rows.into_iter().filter(|row| row.2) {
                let rate = h
                    .per_s()
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"));
                out.push_str(&format!(
                    "handshake  {label:<8} {count:>7}  p50 {p50} ms  p99 {p99} ms  \
                     {rate} handshakes/s over {busy:.3} s in flight\n",
                    count = h.count,
                    p50 = ms(h.latency_ms(50.0)),
                    p99 = ms(h.latency_ms(99.0)),
                    busy = h.busy.as_secs_f64(),
                ));
            }
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
            resumption: true,
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn merge_and_report() {
        let mut a = Stats {
            latencies_us: vec![3000, 1000],
            accepted: 2,
            sessions_ok: 2,
            ..Stats::default()
        };
        a.handshake(Handshake::Full, ms(0), ms(20));
        a.handshake(Handshake::Resumed, ms(30), ms(5));
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
        assert_eq!(j["tls_handshakes"]["full"], 1);
        assert_eq!(j["tls_handshakes"]["full_with_hrr"], 0);
        assert_eq!(j["tls_handshakes"]["resumption"], true);
        assert_eq!(j["tls_handshakes"]["latency_ms"]["full"]["p50"], 20.0);
        assert_eq!(j["tls_handshakes"]["latency_ms"]["resumed"]["p99"], 5.0);
        assert!(j["tls_handshakes"]["latency_ms"]["full_with_hrr"]["p50"].is_null());
        assert_eq!(j["tls_handshakes"]["per_s"]["full"], 50.0);
        assert_eq!(j["tls_handshakes"]["per_s"]["resumed"], 200.0);
        assert!(j["tls_handshakes"]["per_s"]["full_with_hrr"].is_null());
        // All kinds: 2 handshakes in 0..20 and 30..35 ms.
        assert_eq!(j["tls_handshakes"]["per_s"]["all"], 80.0);
        assert_eq!(j["tls_handshakes"]["busy_s"]["all"], 0.025);
        assert_eq!(j["tls_handshakes"]["latency_ms"]["all"]["p99"], 20.0);
        assert!(j["tls_handshakes"].get("all").is_none());
        assert_eq!(j["msgs_per_s"], 2.0);
        let text = report.to_text();
        assert!(text.contains("smtp_4xx 1"), "{text}");
        assert!(text.contains("451 later"), "{text}");
        assert!(text.contains("resumption on: 1 full, 1 resumed"), "{text}");
        assert!(
            text.contains("handshake  full           1  p50 20.00 ms  p99 20.00 ms  50.0"),
            "{text}"
        );
        assert!(
            text.contains("handshake  resumed        1  p50 5.00 ms"),
            "{text}"
        );
        assert!(!text.contains("full+hrr"), "{text}");
        assert!(
            text.contains("handshake  all            2  p50 5.00 ms"),
            "{text}"
        );
    }

    #[test]
    fn union_of_intervals() {
        assert_eq!(union_len(&mut []), 0);
        assert_eq!(union_len(&mut [(5, 5), (7, 3)]), 0);
        assert_eq!(union_len(&mut [(0, 10)]), 10);
        // Overlapping, nested, touching and disjoint, out of order.
        let mut v = [(20, 30), (0, 10), (5, 15), (6, 7), (15, 16), (40, 41)];
        assert_eq!(union_len(&mut v), 16 + 10 + 1);
        assert_eq!(union_len(&mut [(0, u64::MAX), (1, 2)]), u64::MAX);
    }

    #[test]
    fn handshake_summary_per_kind() {
        let mut stats = Stats::default();
        // Three concurrent full handshakes in the first 10 ms...
        stats.handshake(Handshake::Full, ms(0), ms(10));
        stats.handshake(Handshake::Full, ms(1), ms(8));
        stats.handshake(Handshake::Full, ms(2), ms(6));
        // ...then resumed ones, two of them overlapping, with a gap.
        stats.handshake(Handshake::Resumed, ms(100), ms(2));
        stats.handshake(Handshake::Resumed, ms(101), ms(2));
        stats.handshake(Handshake::Resumed, ms(200), ms(1));
        stats.handshake(Handshake::Resumed, ms(300), Duration::ZERO);
        let full = HandshakeSummary::of(&stats.handshakes, Handshake::Full);
        assert_eq!(full.count, 3);
        assert_eq!(full.busy, ms(10));
        assert_eq!(full.per_s(), Some(300.0));
        assert_eq!(full.latency_ms(50.0), Some(8.0));
        assert_eq!(full.latency_ms(99.0), Some(10.0));
        let resumed = HandshakeSummary::of(&stats.handshakes, Handshake::Resumed);
        assert_eq!(resumed.count, 4);
        // 100..103, 200..201 and 1 µs for the zero-length one.
        assert_eq!(resumed.busy, Duration::from_micros(4001));
        // Durations 0, 1, 2, 2 ms.
        assert_eq!(resumed.latency_ms(50.0), Some(1.0));
        assert_eq!(resumed.latency_ms(99.0), Some(2.0));
        assert_eq!(resumed.latency_ms(0.0), Some(0.0));
        let hrr = HandshakeSummary::of(&stats.handshakes, Handshake::FullWithHelloRetryRequest);
        assert_eq!(hrr, HandshakeSummary::default());
        assert_eq!(hrr.per_s(), None);
        assert_eq!(hrr.latency_ms(50.0), None);
        let all = HandshakeSummary::all(&stats.handshakes);
        assert_eq!(all.count, 7);
        assert_eq!(all.busy, ms(14) + Duration::from_micros(1));
        assert_eq!(all.latency_ms(100.0), Some(10.0));
    }

    #[test]
    fn handshakes_merge_across_workers() {
        let mut a = Stats::default();
        a.handshake(Handshake::Full, ms(0), ms(4));
        let mut b = Stats::default();
        b.handshake(Handshake::Full, ms(2), ms(4));
        b.handshake(Handshake::FullWithHelloRetryRequest, ms(3), ms(9));
        a.merge(b);
        let report = Report::new(info(), a, ms(100));
        assert_eq!(report.handshakes(Handshake::Full).count, 2);
        assert_eq!(report.handshakes(Handshake::Full).busy, ms(6));
        assert_eq!(
            report
                .handshakes(Handshake::FullWithHelloRetryRequest)
                .count,
            1
        );
        let text = report.to_text();
        assert!(text.contains("handshake  full+hrr       1"), "{text}");
        assert_eq!(report.to_json()["tls_handshakes"]["full_with_hrr"], 1);
    }

    #[test]
    fn resumption_off_and_plain() {
        let mut off = info();
        off.resumption = false;
        let mut stats = Stats::default();
        stats.handshake(Handshake::Full, ms(0), ms(1));
        let report = Report::new(off, stats, ms(1));
        let text = report.to_text();
        assert!(text.contains("resumption off: 1 full, 0 resumed"), "{text}");
        assert!(!text.contains("handshake  all"), "{text}");
        assert_eq!(report.all_handshakes.count, 1);
        assert_eq!(report.to_json()["tls_handshakes"]["resumption"], false);
        let mut plain = info();
        plain.mode = "plain";
        plain.resumption = false;
        let text = Report::new(plain, Stats::default(), ms(1)).to_text();
        assert!(!text.contains("handshake"), "{text}");
        assert!(!text.contains("tls "), "{text}");
    }

    #[test]
    fn micros_saturates() {
        assert_eq!(micros(Duration::from_micros(1500)), 1500);
        assert_eq!(micros(Duration::MAX), u64::MAX);
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
