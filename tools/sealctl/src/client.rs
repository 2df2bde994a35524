//! `sealctl bench smtp`: a minimal SMTP client driving many concurrent
//! sessions against any server and measuring what it accepts.
//!
//! Each worker task claims up to `per_session` messages, runs one session for
//! them (connect, greeting, EHLO, optional TLS, MAIL/RCPT/DATA per message,
//! QUIT) and repeats until all messages are claimed. Every network operation
//! has its own timeout; no error stops the run, it only counts.
//!
//! With TLS, every connection of the run shares one rustls client config
//! and so one session store: once a session's handshake completed and the
//! server's tickets (or TLS 1.2 session id) arrived, later sessions resume.
//! Each handshake is recorded with its kind (full or resumed, as rustls
//! reports it) and duration.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls::HandshakeKind;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::message::{MessageFactory, dot_stuff_into};
use crate::reply::{MAX_REPLY_LINE, Reply, ReplyError, ReplyParser};
use crate::stats::{ErrorKind, Handshake, Report, RunInfo, Stats};
use crate::tls::{ClientResumption, TlsSetupError, dangerous_bench_client_config};

/// How the client secures the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Plain,
    /// STARTTLS after the first EHLO.
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

impl TlsMode {
    /// Name used in the reports.
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Plain => "plain",
            TlsMode::StartTls => "starttls",
            TlsMode::Implicit => "implicit-tls",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Server address, `HOST:PORT`.
    pub addr: String,
    /// Concurrent connections.
    pub conns: u64,
    /// Messages in total.
    pub msgs: u64,
    /// Messages per session.
    pub per_session: u64,
    /// Message size in bytes.
    pub size: usize,
    /// TLS mode.
    pub mode: TlsMode,
    /// Whether TLS sessions are resumed (through one session store shared
    /// by all connections, sized for `conns`).
    pub resume: bool,
    /// Envelope sender and From address.
    pub from: String,
    /// Envelope recipients (and To addresses).
    pub rcpts: Vec<String>,
    /// Name sent as SNI (and used to key resumption); `None`: from `addr`.
    pub sni: Option<String>,
    /// EHLO argument.
    pub helo: String,
    /// Timeout of each network operation.
    pub timeout: Duration,
}

/// Errors that prevent a run from starting.
#[derive(Debug, Error)]
pub enum BenchError {
    /// `--addr` does not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The TLS server name is not a DNS name or IP address.
    #[error("invalid TLS server name {0:?} (use --sni)")]
    ServerName(String),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// A worker task panicked.
    #[error("worker task failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

impl BenchError {
    /// Whether the error comes from bad arguments (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, BenchError::Resolve { .. } | BenchError::ServerName(_))
    }
}

/// Why one session or transaction failed.
#[derive(Debug, Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("server does not offer STARTTLS")]
    StartTlsNotOffered,
    #[error("timeout while {0}")]
    Timeout(&'static str),
    #[error("{stage}: server replied {reply}")]
    Reply { stage: &'static str, reply: Reply },
    #[error("{stage}: {source}")]
    Malformed {
        stage: &'static str,
        source: ReplyError,
    },
    #[error("server sent data after its STARTTLS reply")]
    PipelinedStartTls,
    #[error("{0}: connection closed by server")]
    Closed(&'static str),
    #[error("{stage}: {source}")]
    Io {
        stage: &'static str,
        source: io::Error,
    },
}

impl SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Connect(_) => ErrorKind::Connect,
            SessionError::Tls(_) | SessionError::StartTlsNotOffered => ErrorKind::Tls,
            SessionError::Timeout(_) => ErrorKind::Timeout,
            SessionError::Reply { reply, .. } => match reply.class() {
                4 => ErrorKind::Smtp4xx,
                5 => ErrorKind::Smtp5xx,
                _ => ErrorKind::Protocol,
            },
            SessionError::Malformed { .. }
            | SessionError::PipelinedStartTls
            | SessionError::Closed(_) => ErrorKind::Protocol,
            SessionError::Io { .. } => ErrorKind::Io,
        }
    }

    /// A negative reply that fails one transaction but leaves the session
    /// usable (after RSET). 421 closes the session.
    fn is_transaction_failure(&self) -> bool {
        matches!(self, SessionError::Reply { reply, .. }
            if matches!(reply.class(), 4 | 5) && reply.code != 421)
    }
}

/// Shared, read-only state of a run.
struct Ctx {
    cfg: BenchConfig,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Option<TlsConnector>,
    factory: MessageFactory,
    /// Start of the run; handshake start times are offsets from it.
    epoch: Instant,
    /// Messages not yet claimed by a worker.
    unclaimed: AtomicU64,
    /// Next message sequence number.
    next_seq: AtomicU64,
}

/// Runs the benchmark and returns its report.
pub async fn run(cfg: BenchConfig) -> Result<Report, BenchError> {
    let addr = tokio::net::lookup_host(&cfg.addr)
        .await
        .and_then(|mut addrs| {
            addrs
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
        })
        .map_err(|source| BenchError::Resolve {
            addr: cfg.addr.clone(),
            source,
        })?;
    let name = cfg.sni.clone().unwrap_or_else(|| host_of(&cfg.addr));
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| BenchError::ServerName(name))?;
    let tls = match cfg.mode {
        TlsMode::Plain => None,
        TlsMode::StartTls | TlsMode::Implicit => {
            let resumption = if cfg.resume {
                ClientResumption::InMemory(usize::try_from(cfg.conns).unwrap_or(usize::MAX))
            } else {
                ClientResumption::Disabled
            };
            // One config for the whole run: its session store is shared.
            let config: Arc<ClientConfig> = dangerous_bench_client_config(resumption)?;
            Some(TlsConnector::from(config))
        }
    };
    let factory = MessageFactory::now(&cfg.from, &cfg.rcpts, cfg.size);
    let info = RunInfo {
        addr: cfg.addr.clone(),
        mode: cfg.mode.name(),
        conns: cfg.conns,
        msgs: cfg.msgs,
        size: cfg.size,
        per_session: cfg.per_session,
        rcpts: cfg.rcpts.len() as u64,
        resumption: tls.is_some() && cfg.resume,
    };
    let sessions = cfg.msgs.div_ceil(cfg.per_session);
    let workers = cfg.conns.min(sessions);
    let ctx = Arc::new(Ctx {
        unclaimed: AtomicU64::new(cfg.msgs),
        next_seq: AtomicU64::new(1),
        cfg,
        addr,
        server_name,
        tls,
        factory,
        epoch: Instant::now(),
    });

    let start = ctx.epoch;
    let mut set = JoinSet::new();
    for _ in 0..workers {
        set.spawn(worker(Arc::clone(&ctx)));
    }
    let mut stats = Stats::default();
    while let Some(result) = set.join_next().await {
        stats.merge(result?);
    }
    Ok(Report::new(info, stats, start.elapsed()))
}

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

async fn worker(ctx: Arc<Ctx>) -> Stats {
    let mut stats = Stats::default();
    let k = ctx.cfg.per_session;
    while let Ok(before) =
        ctx.unclaimed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left > 0).then(|| left - left.min(k))
            })
    {
        let count = before.min(k);
        let mut done = 0;
        match session(&ctx, count, &mut done, &mut stats).await {
            Ok(()) => stats.sessions_ok += 1,
            Err(e) => {
                stats.sessions_failed += 1;
                stats.failed += count - done;
                stats.error(e.kind(), || e.to_string());
            }
        }
    }
    stats
}

/// One session for `count` messages; `done` counts messages finished
/// (accepted or failed) so the caller can fail the rest on error.
async fn session(
    ctx: &Ctx,
    count: u64,
    done: &mut u64,
    stats: &mut Stats,
) -> Result<(), SessionError> {
    let t0 = Instant::now();
    let tcp = timeout(ctx.cfg.timeout, TcpStream::connect(ctx.addr))
        .await
        .map_err(|_| SessionError::Timeout("connecting"))?
        .map_err(SessionError::Connect)?;
    // Latency matters more than segment count for a benchmark; commands and
    // bodies are written in whole batches anyway.
    tcp.set_nodelay(true).map_err(|source| SessionError::Io {
        stage: "connect",
        source,
    })?;
    match (&ctx.tls, ctx.cfg.mode) {
        (Some(connector), TlsMode::Implicit) => {
            let tls = handshake(ctx, connector, tcp, stats).await?;
            let mut conn = Conn::new(tls, ctx.cfg.timeout);
            conn.expect(220, "greeting").await?;
            let ehlo = conn.ehlo(&ctx.cfg.helo).await?;
            transactions(ctx, &mut conn, &ehlo, count, t0, done, stats).await
        }
        (Some(connector), TlsMode::StartTls) => {
            let mut conn = Conn::new(tcp, ctx.cfg.timeout);
            conn.expect(220, "greeting").await?;
            let ehlo = conn.ehlo(&ctx.cfg.helo).await?;
            if !ehlo.has_extension("STARTTLS") {
                return Err(SessionError::StartTlsNotOffered);
            }
            conn.send(b"STARTTLS\r\n", "sending STARTTLS").await?;
            conn.expect(220, "STARTTLS").await?;
            // Anything already buffered was sent before TLS: never carry it over.
            if !conn.io.buffer().is_empty() {
                return Err(SessionError::PipelinedStartTls);
            }
            let tls = handshake(ctx, connector, conn.io.into_inner(), stats).await?;
            let mut conn = Conn::new(tls, ctx.cfg.timeout);
            let ehlo = conn.ehlo(&ctx.cfg.helo).await?;
            transactions(ctx, &mut conn, &ehlo, count, t0, done, stats).await
        }
        _ => {
            let mut conn = Conn::new(tcp, ctx.cfg.timeout);
            conn.expect(220, "greeting").await?;
            let ehlo = conn.ehlo(&ctx.cfg.helo).await?;
            transactions(ctx, &mut conn, &ehlo, count, t0, done, stats).await
        }
    }
}

/// The TLS handshake on `tcp`. Records its kind and its duration, from the
/// start of the handshake (the ClientHello is the first thing written) until
/// the client side is complete (for TLS 1.3: the server's Finished verified
/// and the client's Finished written).
async fn handshake(
    ctx: &Ctx,
    connector: &TlsConnector,
    tcp: TcpStream,
    stats: &mut Stats,
) -> Result<TlsStream<TcpStream>, SessionError> {
    let started = Instant::now();
    let tls = timeout(
        ctx.cfg.timeout,
        connector.connect(ctx.server_name.clone(), tcp),
    )
    .await
    .map_err(|_| SessionError::Timeout("TLS handshake"))?
    .map_err(SessionError::Tls)?;
    let duration = started.elapsed();
    let kind = match tls.get_ref().1.handshake_kind() {
        Some(HandshakeKind::Full) => Some(Handshake::Full),
        Some(HandshakeKind::FullWithHelloRetryRequest) => {
            Some(Handshake::FullWithHelloRetryRequest)
        }
        Some(HandshakeKind::Resumed) => Some(Handshake::Resumed),
        // Not reached: the handshake is complete here.
        None => None,
    };
    if let Some(kind) = kind {
        stats.handshake(kind, started.duration_since(ctx.epoch), duration);
    }
    Ok(tls)
}

/// Sends `count` messages, then QUIT.
async fn transactions<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    ehlo: &Reply,
    count: u64,
    t0: Instant,
    done: &mut u64,
    stats: &mut Stats,
) -> Result<(), SessionError> {
    let pipelining = ehlo.has_extension("PIPELINING");
    let mut body = Vec::with_capacity(ctx.cfg.size + 64);
    for i in 0..count {
        let start = if i == 0 { t0 } else { Instant::now() };
        let seq = ctx.next_seq.fetch_add(1, Ordering::Relaxed);
        body.clear();
        dot_stuff_into(&ctx.factory.build(seq), &mut body);
        let result = transaction(ctx, conn, pipelining, &body).await;
        *done += 1;
        match result {
            Ok(()) => {
                stats.accepted += 1;
                let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.latencies_us.push(us);
            }
            Err(e) if e.is_transaction_failure() => {
                stats.failed += 1;
                stats.error(e.kind(), || e.to_string());
                conn.send(b"RSET\r\n", "sending RSET").await?;
                conn.expect(250, "RSET").await?;
            }
            Err(e) => {
                // The session is unusable; the caller counts the rest.
                stats.failed += 1;
                return Err(e);
            }
        }
    }
    conn.send(b"QUIT\r\n", "sending QUIT").await?;
    conn.expect(221, "QUIT").await?;
    Ok(())
}

/// One MAIL/RCPT/DATA transaction; `body` is dot-stuffed with its final dot.
async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    pipelining: bool,
    body: &[u8],
) -> Result<(), SessionError> {
    let mail = format!("MAIL FROM:<{}>\r\n", ctx.cfg.from);
    let rcpts: Vec<String> = ctx
        .cfg
        .rcpts
        .iter()
        .map(|r| format!("RCPT TO:<{r}>\r\n"))
        .collect();
    // The first negative reply; later ones are consequences of it.
    let mut failure: Option<SessionError> = None;
    let data = if pipelining {
        let mut batch = String::with_capacity(mail.len() + 64 * rcpts.len() + 6);
        batch.push_str(&mail);
        rcpts.iter().for_each(|r| batch.push_str(r));
        batch.push_str("DATA\r\n");
        conn.send(batch.as_bytes(), "sending envelope").await?;
        let reply = conn.read_reply("MAIL").await?;
        note(&mut failure, "MAIL", reply, 250)?;
        for _ in &rcpts {
            let reply = conn.read_reply("RCPT").await?;
            note(&mut failure, "RCPT", reply, 250)?;
        }
        conn.read_reply("DATA").await?
    } else {
        conn.send(mail.as_bytes(), "sending MAIL").await?;
        let reply = conn.read_reply("MAIL").await?;
        note(&mut failure, "MAIL", reply, 250)?;
        if let Some(e) = failure {
            return Err(e);
        }
        let mut accepted = 0;
        for rcpt in &rcpts {
            conn.send(rcpt.as_bytes(), "sending RCPT").await?;
            let reply = conn.read_reply("RCPT").await?;
            if reply.code == 250 || reply.code == 251 {
                accepted += 1;
            }
            note(&mut failure, "RCPT", reply, 250)?;
        }
        if accepted == 0 {
            return Err(failure.unwrap_or(SessionError::Closed("RCPT")));
        }
        conn.send(b"DATA\r\n", "sending DATA").await?;
        conn.read_reply("DATA").await?
    };
    match data.code {
        354 => {
            conn.send(body, "sending message").await?;
            let reply = conn.read_reply("end of data").await?;
            note(&mut failure, "end of data", reply, 250)?;
            failure.map_or(Ok(()), Err)
        }
        _ => {
            note(&mut failure, "DATA", data, 354)?;
            Err(failure.unwrap_or(SessionError::Closed("DATA")))
        }
    }
}

/// Records a negative reply as the transaction's failure (keeping the first
/// one); a positive reply other than `expected` is a protocol error. 251 is
/// accepted where 250 is expected.
fn note(
    failure: &mut Option<SessionError>,
    stage: &'static str,
    reply: Reply,
    expected: u16,
) -> Result<(), SessionError> {
    let ok = reply.code == expected || (expected == 250 && reply.code == 251);
    if ok {
        return Ok(());
    }
    if !reply.is_positive() {
        failure.get_or_insert(SessionError::Reply { stage, reply });
        return Ok(());
    }
    Err(SessionError::Reply { stage, reply })
}

/// A client connection: buffered reads of bounded reply lines, whole writes.
struct Conn<S> {
    io: BufReader<S>,
    line: Vec<u8>,
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        Self {
            io: BufReader::new(stream),
            line: Vec::with_capacity(256),
            timeout,
        }
    }

    async fn send(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), SessionError> {
        let stream = self.io.get_mut();
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        timeout(self.timeout, write)
            .await
            .map_err(|_| SessionError::Timeout(stage))?
            .map_err(|source| SessionError::Io { stage, source })
    }

    async fn read_reply(&mut self, stage: &'static str) -> Result<Reply, SessionError> {
        timeout(self.timeout, self.read_reply_inner(stage))
            .await
            .map_err(|_| SessionError::Timeout(stage))?
    }

    async fn read_reply_inner(&mut self, stage: &'static str) -> Result<Reply, SessionError> {
        let mut parser = ReplyParser::new();
        loop {
            self.line.clear();
            let limit = MAX_REPLY_LINE as u64 + 1;
            let n = (&mut self.io)
                .take(limit)
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|source| SessionError::Io { stage, source })?;
            if n == 0 {
                return Err(SessionError::Closed(stage));
            }
            if !self.line.ends_with(b"\n") {
                if n as u64 >= limit {
                    return Err(SessionError::Malformed {
                        stage,
                        source: ReplyError::LineTooLong,
                    });
                }
                return Err(SessionError::Closed(stage));
            }
            match parser.feed(&self.line) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(source) => return Err(SessionError::Malformed { stage, source }),
            }
        }
    }

    /// Reads a reply and requires `code`.
    async fn expect(&mut self, code: u16, stage: &'static str) -> Result<Reply, SessionError> {
        let reply = self.read_reply(stage).await?;
        if reply.code == code {
            Ok(reply)
        } else {
            Err(SessionError::Reply { stage, reply })
        }
    }

    async fn ehlo(&mut self, helo: &str) -> Result<Reply, SessionError> {
        self.send(format!("EHLO {helo}\r\n").as_bytes(), "sending EHLO")
            .await?;
        self.expect(250, "EHLO").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16) -> Reply {
        Reply {
            code,
            lines: vec!["x".into()],
        }
    }

    #[test]
    fn host_of_addr() {
        assert_eq!(host_of("127.0.0.1:25"), "127.0.0.1");
        assert_eq!(host_of("[::1]:25"), "::1");
        assert_eq!(host_of("mx.example.test:587"), "mx.example.test");
    }

    #[test]
    fn note_keeps_first_failure() {
        let mut failure = None;
        assert!(note(&mut failure, "MAIL", reply(250), 250).is_ok());
        assert!(note(&mut failure, "RCPT", reply(251), 250).is_ok());
        assert!(failure.is_none());
        assert!(note(&mut failure, "RCPT", reply(450), 250).is_ok());
        assert!(note(&mut failure, "DATA", reply(554), 354).is_ok());
        let e = failure.expect("failure kept");
        assert_eq!(e.kind(), ErrorKind::Smtp4xx);
        assert!(e.is_transaction_failure());
        assert!(note(&mut None, "DATA", reply(250), 354).is_err());
    }

    #[test]
    fn error_kinds() {
        let closing = SessionError::Reply {
            stage: "MAIL",
            reply: reply(421),
        };
        assert!(!closing.is_transaction_failure());
        assert_eq!(closing.kind(), ErrorKind::Smtp4xx);
        let odd = SessionError::Reply {
            stage: "greeting",
            reply: reply(250),
        };
        assert_eq!(odd.kind(), ErrorKind::Protocol);
        assert!(!odd.is_transaction_failure());
        assert_eq!(SessionError::Timeout("x").kind(), ErrorKind::Timeout);
        assert_eq!(SessionError::StartTlsNotOffered.kind(), ErrorKind::Tls);
    }
}
