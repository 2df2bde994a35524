//! `sealctl bench smtp`: a load generator driving many concurrent SMTP
//! sessions against any server and measuring what it accepts.
//!
//! The protocol is sealgate-proto's client session machine
//! ([`ClientSession`], the one the daemon delivers with): it writes the
//! commands (pipelined when offered), parses the replies and dot-stuffs the
//! bodies. This module does the I/O, the timeouts, the TLS handshakes and
//! the counting.
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
use sealgate_proto::Reply;
use sealgate_proto::client::{
    Awaiting, ClientError, ClientEvent, ClientParams, ClientSession, StartTlsMode, Transaction,
};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::message::MessageFactory;
use crate::stats::{ErrorKind, Handshake, Report, RunInfo, Stats};
use crate::tls::{ClientResumption, TlsSetupError, dangerous_bench_client_config};

/// Longest reply line accepted, CRLF excluded (2048 with it; RFC 5321
/// §4.5.3.1.5 says 512, we allow some slack for chatty servers).
const MAX_REPLY_LINE: usize = 2046;

/// Most lines accepted in one multi-line reply (EHLO answers are the longest).
const MAX_REPLY_LINES: usize = 64;

/// Bytes read from the server at a time.
const READ_BUF: usize = 16 * 1024;

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
    #[error("{stage}: server replied {}", first_line(reply))]
    Reply { stage: &'static str, reply: Reply },
    /// A malformed reply or one the session machine did not expect.
    #[error("{stage}: {message}")]
    Protocol {
        stage: &'static str,
        message: String,
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
    /// The message exceeds the SIZE the server advertised (not sent).
    #[error("MAIL: message too large for the server (limit {0} bytes)")]
    TooLarge(u64),
}

impl SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Connect(_) => ErrorKind::Connect,
            SessionError::Tls(_) | SessionError::StartTlsNotOffered => ErrorKind::Tls,
            SessionError::Timeout(_) => ErrorKind::Timeout,
            SessionError::Reply { reply, .. } => match reply.code / 100 {
                4 => ErrorKind::Smtp4xx,
                5 => ErrorKind::Smtp5xx,
                _ => ErrorKind::Protocol,
            },
            // What a server that sees the size answers (RFC 1870: 552).
            SessionError::TooLarge(_) => ErrorKind::Smtp5xx,
            SessionError::Protocol { .. }
            | SessionError::PipelinedStartTls
            | SessionError::Closed(_) => ErrorKind::Protocol,
            SessionError::Io { .. } => ErrorKind::Io,
        }
    }

    /// A negative reply (or a message over the server's SIZE) that fails one
    /// transaction but leaves the session usable (the machine sends RSET if
    /// the transaction is still open). 421 closes the session.
    fn is_transaction_failure(&self) -> bool {
        match self {
            SessionError::Reply { reply, .. } => {
                matches!(reply.code / 100, 4 | 5) && reply.code != 421
            }
            SessionError::TooLarge(_) => true,
            _ => false,
        }
    }
}

/// A reply as the reports show it: code and first line (with its enhanced
/// status code, if any).
fn first_line(reply: &Reply) -> String {
    let text = reply.lines.first().map_or("", String::as_str);
    match reply.enhanced {
        Some(e) if text.is_empty() => format!("{} {e}", reply.code),
        Some(e) => format!("{} {e} {text}", reply.code),
        None => format!("{} {text}", reply.code),
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

impl Ctx {
    /// Resolves the address and sets up TLS for `cfg`.
    async fn new(cfg: BenchConfig) -> Result<Self, BenchError> {
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
        Ok(Ctx {
            factory: MessageFactory::now(&cfg.from, &cfg.rcpts, cfg.size),
            unclaimed: AtomicU64::new(cfg.msgs),
            next_seq: AtomicU64::new(1),
            cfg,
            addr,
            server_name,
            tls,
            epoch: Instant::now(),
        })
    }

    /// The session machine's settings for this run.
    fn params(&self) -> ClientParams {
        ClientParams {
            helo: self.cfg.helo.clone(),
            starttls: match self.cfg.mode {
                TlsMode::StartTls => StartTlsMode::Required,
                // Implicit TLS is up before the greeting.
                TlsMode::Plain | TlsMode::Implicit => StartTlsMode::Never,
            },
            max_reply_line: MAX_REPLY_LINE,
            max_reply_lines: MAX_REPLY_LINES,
            // Never reached first: every read has its own timeout (`Conn::read_some`).
            command_timeout: self.cfg.timeout,
            data_timeout: self.cfg.timeout,
        }
    }
}

/// Runs the benchmark and returns its report.
pub async fn run(cfg: BenchConfig) -> Result<Report, BenchError> {
    let ctx = Ctx::new(cfg).await?;
    let cfg = &ctx.cfg;
    let info = RunInfo {
        addr: cfg.addr.clone(),
        mode: cfg.mode.name(),
        conns: cfg.conns,
        msgs: cfg.msgs,
        size: cfg.size,
        per_session: cfg.per_session,
        rcpts: cfg.rcpts.len() as u64,
        resumption: ctx.tls.is_some() && cfg.resume,
    };
    let sessions = cfg.msgs.div_ceil(cfg.per_session);
    let workers = cfg.conns.min(sessions);
    let ctx = Arc::new(ctx);

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
    let stream = match (&ctx.tls, ctx.cfg.mode) {
        (Some(connector), TlsMode::Implicit) => {
            Stream::Tls(Box::new(handshake(ctx, connector, tcp, stats).await?))
        }
        _ => Stream::Plain(tcp),
    };
    let mut conn = Conn::new(stream, ctx.params(), ctx.cfg.timeout);
    // Greeting, EHLO and (--starttls) STARTTLS, handshake and EHLO again.
    conn.wait_ready(ctx, stats).await?;
    transactions(ctx, &mut conn, count, t0, done, stats).await
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
async fn transactions(
    ctx: &Ctx,
    conn: &mut Conn,
    count: u64,
    t0: Instant,
    done: &mut u64,
    stats: &mut Stats,
) -> Result<(), SessionError> {
    for i in 0..count {
        // After a failed transaction the machine's RSET must be answered first.
        conn.wait_ready(ctx, stats).await?;
        let start = if i == 0 { t0 } else { Instant::now() };
        let seq = ctx.next_seq.fetch_add(1, Ordering::Relaxed);
        let message = ctx.factory.build(seq);
        let result = conn.transaction(ctx, &message).await;
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
            }
            Err(e) => {
                // The session is unusable; the caller counts the rest.
                stats.failed += 1;
                return Err(e);
            }
        }
    }
    conn.wait_ready(ctx, stats).await?;
    conn.quit().await
}

/// The outcome of one transaction from the machine's replies: every reply
/// must be the expected one; the first negative reply is the failure (later
/// ones are consequences of it). `body_sent`: `data` is the reply after the
/// final dot, else the refusal of DATA.
fn outcome(
    mail: Option<Reply>,
    rcpt: Vec<Reply>,
    data: Option<Reply>,
    body_sent: bool,
) -> Result<(), SessionError> {
    let mut failure = None;
    match mail {
        // MAIL refused: the recipients' replies are copies of it.
        Some(reply) => note(&mut failure, "MAIL", reply, 250)?,
        None => {
            for reply in rcpt {
                note(&mut failure, "RCPT", reply, 250)?;
            }
        }
    }
    let Some(data) = data else {
        // No recipient accepted, so no DATA.
        return Err(failure.unwrap_or(SessionError::Closed("RCPT")));
    };
    if body_sent {
        note(&mut failure, "end of data", data, 250)?;
    } else {
        note(&mut failure, "DATA", data, 354)?;
    }
    failure.map_or(Ok(()), Err)
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

/// The connection under the session machine.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Between STARTTLS and the end of the handshake.
    Upgrading,
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
            Stream::Upgrading => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Stream::Upgrading => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }
}

/// A client connection: the stream and the session machine driving it.
/// Every read and every write has its own timeout.
struct Conn {
    stream: Stream,
    session: ClientSession,
    buf: Vec<u8>,
    timeout: Duration,
    /// The machine's `Ready` was taken and no transaction started since.
    ready: bool,
    /// The reply awaited by the last read (names that read's errors).
    stage: &'static str,
}

impl Conn {
    fn new(stream: Stream, params: ClientParams, timeout: Duration) -> Self {
        Conn {
            stream,
            session: ClientSession::new(params, Instant::now()),
            buf: vec![0; READ_BUF],
            timeout,
            ready: false,
            stage: Awaiting::Greeting.name(),
        }
    }

    /// Runs the session until it is idle: greeting and EHLO, STARTTLS (with
    /// the handshake), the RSET after a failed transaction.
    async fn wait_ready(&mut self, ctx: &Ctx, stats: &mut Stats) -> Result<(), SessionError> {
        while !self.ready {
            match self.next_event().await? {
                ClientEvent::Ready(_) => self.ready = true,
                ClientEvent::StartTls => self.starttls(ctx, stats).await?,
                other => return Err(self.unexpected(&other)),
            }
        }
        Ok(())
    }

    /// The handshake after the server's 220 to STARTTLS; the machine then
    /// sends EHLO again.
    async fn starttls(&mut self, ctx: &Ctx, stats: &mut Stats) -> Result<(), SessionError> {
        let stream = std::mem::replace(&mut self.stream, Stream::Upgrading);
        let (Some(connector), Stream::Plain(tcp)) = (&ctx.tls, stream) else {
            return Err(self.unexpected(&ClientEvent::StartTls));
        };
        let tls = handshake(ctx, connector, tcp, stats).await?;
        self.stream = Stream::Tls(Box::new(tls));
        self.session.tls_established(Instant::now());
        Ok(())
    }

    /// One MAIL/RCPT/DATA transaction for `message` (CRLF lines, not yet
    /// dot-stuffed); the session must be ready.
    async fn transaction(&mut self, ctx: &Ctx, message: &[u8]) -> Result<(), SessionError> {
        let tx = Transaction {
            mail_from: ctx.cfg.from.clone(),
            rcpt_to: ctx.cfg.rcpts.clone(),
            size: message.len() as u64,
            eightbit: false,
            smtputf8: false,
        };
        self.session
            .send_transaction(tx, Instant::now())
            .map_err(|e| match e {
                ClientError::TooLarge(limit) => SessionError::TooLarge(limit),
                e => SessionError::Protocol {
                    stage: "MAIL",
                    message: e.to_string(),
                },
            })?;
        self.ready = false;
        let mut body_sent = false;
        loop {
            match self.next_event().await? {
                ClientEvent::SendBody => {
                    // The machine dot-stuffs it and appends the final dot.
                    self.session.send_body(message, Instant::now());
                    body_sent = true;
                }
                ClientEvent::TransactionDone { rcpt, mail, data } => {
                    return outcome(mail, rcpt, data, body_sent);
                }
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// QUIT; anything but a 221 to it is an error.
    async fn quit(&mut self) -> Result<(), SessionError> {
        self.session.quit(Instant::now());
        loop {
            self.flush().await?;
            if let Some((Some(Awaiting::Quit), reply)) = self.session.last_reply() {
                if reply.code == 221 {
                    return Ok(());
                }
                return Err(SessionError::Reply {
                    stage: Awaiting::Quit.name(),
                    reply: reply.clone(),
                });
            }
            if let Some(ClientEvent::Failed(e)) = self.session.poll_event() {
                return Err(self.failure(e));
            }
            self.read_some().await?;
        }
    }

    /// The machine's next event, writing what it queued and reading replies
    /// as needed. `Failed` comes back as the error.
    async fn next_event(&mut self) -> Result<ClientEvent, SessionError> {
        loop {
            match self.session.poll_event() {
                Some(ClientEvent::Failed(e)) => {
                    // Best effort: e.g. the QUIT queued when STARTTLS is missing.
                    let _ = self.flush().await;
                    return Err(self.failure(e));
                }
                Some(event) => {
                    self.flush().await?;
                    return Ok(event);
                }
                None => {
                    self.flush().await?;
                    self.read_some().await?;
                }
            }
        }
    }

    /// One read from the server, fed to the machine.
    async fn read_some(&mut self) -> Result<(), SessionError> {
        let stage = self.session.awaiting().map_or("reading", Awaiting::name);
        self.stage = stage;
        let read = timeout(self.timeout, self.stream.read(&mut self.buf)).await;
        let now = Instant::now();
        match read {
            Err(_) => {
                self.session.handle_timeout(now);
                Err(SessionError::Timeout(stage))
            }
            Ok(Err(source)) => Err(SessionError::Io { stage, source }),
            Ok(Ok(0)) => {
                self.session.handle_eof();
                Err(SessionError::Closed(stage))
            }
            Ok(Ok(n)) => {
                self.session
                    .feed(self.buf.get(..n).unwrap_or_default(), now);
                Ok(())
            }
        }
    }

    /// Writes what the machine queued (commands, or a stuffed body).
    async fn flush(&mut self) -> Result<(), SessionError> {
        let out = self.session.take_output();
        if out.is_empty() {
            return Ok(());
        }
        let stage = self.sending();
        timeout(self.timeout, self.stream.write_all(&out))
            .await
            .map_err(|_| SessionError::Timeout(stage))?
            .map_err(|source| SessionError::Io { stage, source })
    }

    /// What is being written, named by the reply it asks for.
    fn sending(&self) -> &'static str {
        let pipelining = self.session.capabilities().is_some_and(|c| c.pipelining);
        match self.session.awaiting() {
            Some(Awaiting::Ehlo) => "sending EHLO",
            Some(Awaiting::Helo) => "sending HELO",
            Some(Awaiting::StartTls) => "sending STARTTLS",
            Some(Awaiting::Mail) if pipelining => "sending envelope",
            Some(Awaiting::Mail) => "sending MAIL",
            Some(Awaiting::Rcpt) => "sending RCPT",
            Some(Awaiting::Data) => "sending DATA",
            Some(Awaiting::DataEnd) => "sending message",
            Some(Awaiting::Rset) => "sending RSET",
            // Nothing due after the QUIT that ends a failed session.
            Some(Awaiting::Quit) | None => "sending QUIT",
            Some(Awaiting::Greeting) => "sending",
        }
    }

    /// The session error for the machine's `Failed`.
    fn failure(&self, e: ClientError) -> SessionError {
        let last = self.session.last_reply();
        // What the last reply answered; for errors without one, the last read.
        let answered = last.and_then(|(a, _)| a).map_or(self.stage, Awaiting::name);
        let refused = |stage, reply| SessionError::Reply { stage, reply };
        match e {
            ClientError::Greeting(r) => refused(Awaiting::Greeting.name(), r),
            ClientError::Helo(r) => refused(answered, r),
            ClientError::StartTlsRefused(r) => refused(Awaiting::StartTls.name(), r),
            ClientError::TlsNotOffered => SessionError::StartTlsNotOffered,
            ClientError::ResponseInjection => SessionError::PipelinedStartTls,
            ClientError::Timeout => SessionError::Timeout(self.stage),
            ClientError::TooLarge(limit) => SessionError::TooLarge(limit),
            ClientError::Closing(r) => refused(answered, r),
            // A reply the machine refused (421, a positive reply out of turn).
            ClientError::BadReply(text) => match last {
                Some((_, r)) if r.one_line() == text => refused(answered, r.clone()),
                _ => SessionError::Protocol {
                    stage: self.stage,
                    message: ClientError::BadReply(text).to_string(),
                },
            },
            e @ (ClientError::ReplyTooLong(_)
            | ClientError::Unexpected
            | ClientError::NoSmtpUtf8) => SessionError::Protocol {
                stage: self.stage,
                message: e.to_string(),
            },
        }
    }

    /// An event that cannot happen in this state.
    fn unexpected(&self, event: &ClientEvent) -> SessionError {
        let what = match event {
            ClientEvent::StartTls => "STARTTLS",
            ClientEvent::Ready(_) => "ready",
            ClientEvent::SendBody => "send body",
            ClientEvent::TransactionDone { .. } => "transaction done",
            ClientEvent::Failed(_) => "failed",
            ClientEvent::Closed => "closed",
        };
        SessionError::Protocol {
            stage: self.stage,
            message: format!("unexpected session event ({what})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Sink, SinkConfig};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    fn reply(code: u16) -> Reply {
        Reply::plain(code, "x")
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
    fn outcomes() {
        let ok = || Some(reply(250));
        assert!(outcome(None, vec![reply(250), reply(251)], ok(), true).is_ok());
        let cases = [
            // (mail, rcpt, data, body sent, error)
            (
                Some(reply(550)),
                vec![reply(550)],
                None,
                false,
                "MAIL: server replied 550 x",
            ),
            (
                None,
                vec![reply(250), reply(450)],
                ok(),
                true,
                "RCPT: server replied 450 x",
            ),
            (
                None,
                vec![reply(550)],
                None,
                false,
                "RCPT: server replied 550 x",
            ),
            (
                None,
                vec![reply(250)],
                Some(reply(554)),
                false,
                "DATA: server replied 554 x",
            ),
            (
                None,
                vec![reply(250)],
                Some(reply(452)),
                true,
                "end of data: server replied 452 x",
            ),
            (
                None,
                vec![reply(252)],
                ok(),
                true,
                "RCPT: server replied 252 x",
            ),
        ];
        for (mail, rcpt, data, body, want) in cases {
            let got = outcome(mail, rcpt, data, body).map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_owned()));
        }
    }

    #[test]
    fn error_kinds_and_texts() {
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
        assert!(SessionError::TooLarge(10).is_transaction_failure());
        use sealgate_proto::reply::EnhancedCode;
        let texts = [
            (
                Reply::new(550, EnhancedCode(5, 1, 1), "no such user"),
                "550 5.1.1 no such user",
            ),
            (Reply::new(250, EnhancedCode(2, 0, 0), ""), "250 2.0.0"),
            (Reply::plain(354, ""), "354 "),
            (
                Reply {
                    code: 250,
                    enhanced: None,
                    lines: vec!["mx.test".into(), "PIPELINING".into()],
                },
                "250 mx.test",
            ),
        ];
        for (reply, want) in texts {
            assert_eq!(first_line(&reply), want);
        }
    }

    fn bench_config(addr: &str, mode: TlsMode, msgs: u64) -> BenchConfig {
        BenchConfig {
            addr: addr.to_owned(),
            conns: 2,
            msgs,
            per_session: 2,
            size: 1500,
            mode,
            resume: true,
            from: "bench@sealctl.invalid".into(),
            rcpts: vec!["r@example.test".into(), "r+2@example.test".into()],
            sni: Some("localhost".into()),
            helo: "sealctl.invalid".into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Lines that start with dots: stuffed by the machine, unstuffed by the sink.
    const DOTTY: &[u8] =
        b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmid.dle\r\n. x\r\n...\r\nend\r\n";

    /// One connection with hand-made messages, then a whole run, into an
    /// in-process sink (plain and STARTTLS); the files hold the messages.
    #[tokio::test]
    async fn messages_arrive_intact() {
        for (tls, mode) in [(false, TlsMode::Plain), (true, TlsMode::StartTls)] {
            let dir = std::env::temp_dir()
                .join(format!("sealctl-client-test-{}-{tls}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            let cfg = SinkConfig {
                dir: dir.clone(),
                tls: tls.then(|| {
                    crate::tls::self_signed_server_config(&["localhost"]).expect("certificate")
                }),
                timeout: Duration::from_secs(10),
                max_conns: 8,
                sync_dir: false,
                no_fsync: false,
            };
            let sink = Sink::bind("127.0.0.1:0", cfg).await.expect("bind");
            let addr = sink.local_addr().expect("address").to_string();
            let client = async {
                let ctx = Ctx::new(bench_config(&addr, mode, 5)).await.expect("ctx");
                let mut stats = Stats::default();
                let tcp = TcpStream::connect(ctx.addr).await.expect("connect");
                let mut conn = Conn::new(Stream::Plain(tcp), ctx.params(), ctx.cfg.timeout);
                for message in [DOTTY, b"no final line end"] {
                    conn.wait_ready(&ctx, &mut stats).await.expect("ready");
                    conn.transaction(&ctx, message).await.expect("accepted");
                }
                conn.wait_ready(&ctx, &mut stats).await.expect("ready");
                conn.quit().await.expect("quit");
                assert_eq!(stats.handshakes.len(), usize::from(tls));
                run(bench_config(&addr, mode, 5)).await.expect("run")
            };
            let report = tokio::select! {
                _ = sink.run(std::future::pending()) => panic!("sink stopped"),
                report = client => report,
            };
            let json = report.to_json();
            assert_eq!(
                (json["accepted"].as_u64(), json["failed"].as_u64()),
                (Some(5), Some(0))
            );
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .expect("read dir")
                .map(|e| e.expect("entry").path())
                .collect();
            files.sort();
            let stored: Vec<Vec<u8>> = files
                .iter()
                .map(|p| std::fs::read(p).expect("read"))
                .collect();
            assert_eq!(stored.len(), 7);
            assert_eq!(stored.first().map(Vec::as_slice), Some(DOTTY));
            assert_eq!(
                stored.get(1).map(Vec::as_slice),
                Some(&b"no final line end\r\n"[..])
            );
            assert!(stored.iter().skip(2).all(|m| m.len() == 1500));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// A one-connection server answering each command line by `answer`.
    async fn fake_server(listener: TcpListener, answer: fn(&str) -> &'static str) {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let mut io = BufReader::new(tcp);
        let mut line = String::new();
        let mut data = false;
        let mut out = String::from("220 fake\r\n");
        loop {
            if !out.is_empty() && io.get_mut().write_all(out.as_bytes()).await.is_err() {
                return;
            }
            out.clear();
            line.clear();
            if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            if data {
                data = line != ".\r\n";
                if !data {
                    out.push_str(answer("."));
                }
                continue;
            }
            let reply = answer(line.trim_end());
            data = reply.starts_with("354");
            out.push_str(reply);
        }
    }

    /// Runs 2 messages in one session against `answer`; the JSON report.
    async fn against(answer: fn(&str) -> &'static str) -> serde_json::Value {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let server = tokio::spawn(fake_server(listener, answer));
        let cfg = BenchConfig {
            conns: 1,
            ..bench_config(&addr, TlsMode::Plain, 2)
        };
        let report = run(cfg).await.expect("run");
        server.abort();
        report.to_json()
    }

    fn base(line: &str) -> &'static str {
        match line.split(' ').next().unwrap_or("") {
            "EHLO" => "250-fake\r\n250-PIPELINING\r\n250 SIZE 100000\r\n",
            "DATA" => "354 go\r\n",
            "QUIT" => "221 bye\r\n",
            _ => "250 2.0.0 ok\r\n",
        }
    }

    #[tokio::test]
    async fn failures_are_counted_by_reply() {
        let json = against(base).await;
        assert_eq!(json["accepted"], 2);
        // One recipient refused: each transaction fails, the session goes on.
        let json = against(|line| match line {
            "RCPT TO:<r+2@example.test>" => "550 5.1.1 no such user\r\n",
            _ => base(line),
        })
        .await;
        assert_eq!(
            (json["accepted"].as_u64(), json["failed"].as_u64()),
            (Some(0), Some(2))
        );
        assert_eq!(json["errors"]["smtp_5xx"], 2);
        assert_eq!(json["sessions_ok"], 1);
        assert_eq!(
            json["error_samples"][0],
            "RCPT: server replied 550 5.1.1 no such user"
        );
        // 421 ends the session: both messages fail, one error.
        let json = against(|line| match line {
            l if l.starts_with("MAIL") => "421 4.3.2 shutting down\r\n",
            _ => base(line),
        })
        .await;
        assert_eq!(
            (json["failed"].as_u64(), json["sessions_failed"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(json["errors"]["smtp_4xx"], 1);
        assert_eq!(
            json["error_samples"][0],
            "MAIL: server replied 421 4.3.2 shutting down"
        );
        // The server's SIZE is respected: the message is not sent.
        let json = against(|line| match line.split(' ').next() {
            Some("EHLO") => "250-fake\r\n250 SIZE 1000\r\n",
            _ => base(line),
        })
        .await;
        assert_eq!(json["errors"]["smtp_5xx"], 2);
        assert_eq!(
            json["error_samples"][0],
            "MAIL: message too large for the server (limit 1000 bytes)"
        );
        // A bad reply line.
        let json = against(|line| match line.split(' ').next() {
            Some("EHLO") => "250 fake\r\n",
            Some("MAIL") => "hello\r\n",
            _ => base(line),
        })
        .await;
        assert_eq!(json["errors"]["protocol"], 1);
        assert_eq!(
            json["error_samples"][0],
            "MAIL: malformed reply from server: reply line does not start with a valid code"
        );
    }
}
