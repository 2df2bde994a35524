//! `sealctl bench sink`: the bare reference sink for benchmarks. It speaks
//! just enough SMTP to take messages and, for each one, writes the body to a
//! new file and fsyncs it before answering 250. It is not a mail server.
//!
//! The message text is received by sealgate-proto's DATA receiver (the
//! daemon's): dot-unstuffing, and only `CRLF.CRLF` ends it; a message with a
//! bare CR or LF is refused (550), one over [`MAX_MESSAGE`] too (552).

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;
use sealgate_proto::server::{DataReceiver, ServerLimits};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

/// Longest command line accepted, CRLF included.
pub const MAX_COMMAND_LINE: usize = 1024;

/// Longest message line accepted, CRLF included; longer ones end the session.
pub const MAX_DATA_LINE: usize = 64 * 1024;

/// Largest message stored; larger ones are read to the end and refused (552).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Sink settings.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Where messages are written, one file each.
    pub dir: PathBuf,
    /// TLS for STARTTLS, if offered.
    pub tls: Option<Arc<ServerConfig>>,
    /// Timeout of each read or write.
    pub timeout: Duration,
    /// Most concurrent sessions.
    pub max_conns: usize,
    /// Also fsync the directory after creating each file.
    pub sync_dir: bool,
    /// NOT DURABLE: no fsync at all (a next hop that must not be what a relay benchmark
    /// measures).
    pub no_fsync: bool,
}

/// Errors of the sink as a whole.
#[derive(Debug, Error)]
pub enum SinkError {
    /// The listening socket failed.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The message directory is not usable.
    #[error("message directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Why one session ended abnormally (logged, never fatal to the sink).
#[derive(Debug, Error)]
enum SessionError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("timeout")]
    Timeout,
    #[error("line too long")]
    LineTooLong,
    #[error("client closed the connection")]
    Closed,
    #[error("client pipelined data after STARTTLS")]
    PipelinedStartTls,
}

/// A bound sink, ready to run.
pub struct Sink {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// Connection slots (mini-redis style: acquired before accepting).
    limit: Arc<Semaphore>,
}

struct Shared {
    cfg: SinkConfig,
    /// The DATA receiver's limits: [`MAX_DATA_LINE`] and [`MAX_MESSAGE`].
    limits: ServerLimits,
    acceptor: Option<TlsAcceptor>,
    /// File name prefix unique to this sink process.
    prefix: String,
    next_file: AtomicU64,
    stored: AtomicU64,
}

impl Sink {
    /// Checks `cfg.dir` and binds `addr`.
    pub async fn bind(addr: &str, cfg: SinkConfig) -> Result<Self, SinkError> {
        let meta = std::fs::metadata(&cfg.dir).map_err(|source| SinkError::Dir {
            dir: cfg.dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SinkError::Dir {
                dir: cfg.dir.clone(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SinkError::Listen {
                addr: addr.to_owned(),
                source,
            })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            acceptor: cfg.tls.clone().map(TlsAcceptor::from),
            prefix: format!("{:x}-{}", now.as_nanos(), std::process::id()),
            next_file: AtomicU64::new(1),
            stored: AtomicU64::new(0),
            limits: ServerLimits {
                max_text_line: MAX_DATA_LINE,
                max_message_bytes: MAX_MESSAGE as u64,
                ..ServerLimits::default()
            },
            cfg,
        });
        let limit = Arc::new(Semaphore::new(shared.cfg.max_conns));
        Ok(Self {
            listener,
            shared,
            limit,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Messages stored so far.
    pub fn stored(&self) -> u64 {
        self.shared.stored.load(Ordering::Relaxed)
    }

    /// Accepts sessions until `shutdown` completes; returns messages stored.
    /// Sessions still running at shutdown are abandoned.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> u64 {
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                permit = Arc::clone(&self.limit).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break, // closed: never happens, the sink owns it
                },
            };
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    eprintln!("sealctl bench sink: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move {
                if let Err(e) = session(&shared, tcp).await {
                    eprintln!("sealctl bench sink: {peer}: {e}");
                }
                drop(permit);
            });
        }
        self.stored()
    }
}

/// What the command loop ends with.
enum End<S> {
    /// QUIT or the client went away.
    Done,
    /// STARTTLS accepted: the caller upgrades the stream.
    StartTls(S),
}

async fn session(shared: &Shared, tcp: TcpStream) -> Result<(), SessionError> {
    tcp.set_nodelay(true)?;
    match commands(shared, tcp, false).await? {
        End::Done => Ok(()),
        End::StartTls(tcp) => {
            let Some(acceptor) = &shared.acceptor else {
                return Ok(());
            };
            let tls = timeout(shared.cfg.timeout, acceptor.accept(tcp))
                .await
                .map_err(|_| SessionError::Timeout)??;
            match commands(shared, tls, true).await? {
                End::Done | End::StartTls(_) => Ok(()),
            }
        }
    }
}

/// Envelope state: only what is needed to refuse out-of-order commands.
#[derive(Debug, Default)]
struct Envelope {
    mail: bool,
    rcpts: usize,
}

/// What a command line asks of the command loop, its reply queued.
enum Step {
    /// Next command.
    Next,
    /// `354` queued: the message text follows.
    Data,
    /// `221` queued: close.
    Quit,
    /// `220` to STARTTLS queued: upgrade.
    StartTls,
}

/// The command loop. Replies are collected and written when no more
/// pipelined input is buffered (RFC 2920).
async fn commands<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: S,
    tls_active: bool,
) -> Result<End<S>, SessionError> {
    let cfg = &shared.cfg;
    let mut io = BufReader::new(stream);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut line: Vec<u8> = Vec::with_capacity(MAX_COMMAND_LINE);
    let mut body: Vec<u8> = Vec::new();
    let mut env = Envelope::default();
    let offer_tls = shared.acceptor.is_some() && !tls_active;
    if !tls_active {
        out.extend_from_slice(b"220 sealctl-sink ESMTP benchmark reference sink\r\n");
    }
    loop {
        if io.buffer().is_empty() && !out.is_empty() {
            write_all(&mut io, &out, cfg.timeout).await?;
            out.clear();
        }
        if !read_line(&mut io, &mut line, MAX_COMMAND_LINE, cfg.timeout).await? {
            return Ok(End::Done);
        }
        match command(&line, &mut env, offer_tls, &mut out) {
            Step::Next => {}
            Step::Data => {
                write_all(&mut io, &out, cfg.timeout).await?;
                out.clear();
                env = Envelope::default();
                message(shared, &mut io, &mut body, &mut out).await?;
            }
            Step::Quit => {
                write_all(&mut io, &out, cfg.timeout).await?;
                let _ = timeout(cfg.timeout, io.get_mut().shutdown()).await;
                return Ok(End::Done);
            }
            Step::StartTls => {
                // Commands sent before the handshake must not be carried over.
                if !io.buffer().is_empty() {
                    return Err(SessionError::PipelinedStartTls);
                }
                write_all(&mut io, &out, cfg.timeout).await?;
                return Ok(End::StartTls(io.into_inner()));
            }
        }
    }
}

/// Queues the reply to one command line (with its line end) in `out`.
fn command(line: &[u8], env: &mut Envelope, offer_tls: bool, out: &mut Vec<u8>) -> Step {
    let verb_end = line
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(line.len());
    let verb = line
        .get(..verb_end)
        .unwrap_or_default()
        .to_ascii_uppercase();
    match &verb[..] {
        b"EHLO" => {
            *env = Envelope::default();
            out.extend_from_slice(b"250-sealctl-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n");
            if offer_tls {
                out.extend_from_slice(b"250-STARTTLS\r\n");
            }
            out.extend_from_slice(format!("250 SIZE {MAX_MESSAGE}\r\n").as_bytes());
        }
        b"HELO" => {
            *env = Envelope::default();
            out.extend_from_slice(b"250 sealctl-sink\r\n");
        }
        b"MAIL" => {
            *env = Envelope {
                mail: true,
                rcpts: 0,
            };
            out.extend_from_slice(b"250 2.1.0 OK\r\n");
        }
        b"RCPT" if env.mail => {
            env.rcpts += 1;
            out.extend_from_slice(b"250 2.1.5 OK\r\n");
        }
        b"RCPT" => out.extend_from_slice(b"503 5.5.1 MAIL first\r\n"),
        b"DATA" if env.rcpts > 0 => {
            out.extend_from_slice(b"354 end with <CRLF>.<CRLF>\r\n");
            return Step::Data;
        }
        b"DATA" => out.extend_from_slice(b"503 5.5.1 RCPT first\r\n"),
        b"RSET" => {
            *env = Envelope::default();
            out.extend_from_slice(b"250 2.0.0 OK\r\n");
        }
        b"NOOP" => out.extend_from_slice(b"250 2.0.0 OK\r\n"),
        b"QUIT" => {
            out.extend_from_slice(b"221 2.0.0 bye\r\n");
            return Step::Quit;
        }
        b"STARTTLS" if offer_tls => {
            out.extend_from_slice(b"220 2.0.0 go ahead\r\n");
            return Step::StartTls;
        }
        _ => out.extend_from_slice(b"502 5.5.2 not implemented\r\n"),
    }
    Step::Next
}

/// Receives one message after the `354`, stores it and queues the reply.
async fn message<R: AsyncRead + Unpin>(
    shared: &Shared,
    io: &mut BufReader<R>,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), SessionError> {
    match read_data(io, body, &shared.limits, shared.cfg.timeout).await? {
        DataEnd::TooBig => out.extend_from_slice(b"552 5.3.4 message too big\r\n"),
        DataEnd::BareEol => {
            out.extend_from_slice(b"550 5.6.0 bare CR or LF, or NUL, in message text\r\n");
        }
        DataEnd::Complete => {
            let (result, returned) = store(shared, std::mem::take(body)).await;
            *body = returned;
            match result {
                Ok(()) => out.extend_from_slice(b"250 2.0.0 stored\r\n"),
                Err(e) => {
                    eprintln!("sealctl bench sink: storing a message: {e}");
                    out.extend_from_slice(b"451 4.3.0 cannot store\r\n");
                }
            }
        }
    }
    Ok(())
}

/// Reads one line of at most `max` bytes into `line`; `false` at EOF.
async fn read_line<R: AsyncRead + Unpin>(
    io: &mut BufReader<R>,
    line: &mut Vec<u8>,
    max: usize,
    limit: Duration,
) -> Result<bool, SessionError> {
    line.clear();
    let n = timeout(limit, io.take(max as u64).read_until(b'\n', line))
        .await
        .map_err(|_| SessionError::Timeout)??;
    if n == 0 {
        return Ok(false);
    }
    if !line.ends_with(b"\n") {
        return Err(if n >= max {
            SessionError::LineTooLong
        } else {
            SessionError::Closed
        });
    }
    Ok(true)
}

/// How the message text ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataEnd {
    /// Complete and un-stuffed in `body`.
    Complete,
    /// Longer than [`MAX_MESSAGE`] (read to the end and discarded).
    TooBig,
    /// A bare CR or LF in it (read to the end and discarded).
    BareEol,
}

/// Reads the message text up to the final dot into `body`, un-stuffed, with
/// sealgate-proto's DATA receiver. A line longer than [`MAX_DATA_LINE`] ends
/// the session; what follows the final dot stays in `io`.
async fn read_data<R: AsyncRead + Unpin>(
    io: &mut BufReader<R>,
    body: &mut Vec<u8>,
    limits: &ServerLimits,
    limit: Duration,
) -> Result<DataEnd, SessionError> {
    body.clear();
    let mut receiver = DataReceiver::default();
    loop {
        let input = timeout(limit, io.fill_buf())
            .await
            .map_err(|_| SessionError::Timeout)??;
        if input.is_empty() {
            return Err(SessionError::Closed);
        }
        let (used, done) = receiver.ingest(input, body, limits);
        io.consume(used);
        if receiver.line_too_long() {
            return Err(SessionError::LineTooLong);
        }
        if done {
            return Ok(if receiver.too_big() {
                DataEnd::TooBig
            } else if receiver.bare_eol() || receiver.nul() {
                DataEnd::BareEol
            } else {
                DataEnd::Complete
            });
        }
    }
}

async fn write_all<W: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<W>,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), SessionError> {
    let stream = io.get_mut();
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    timeout(limit, write)
        .await
        .map_err(|_| SessionError::Timeout)?
        .map_err(SessionError::from)
}

/// Writes `body` to a new file and fsyncs it (and the directory if asked);
/// hands the buffer back for reuse.
async fn store(shared: &Shared, body: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
    let n = shared.next_file.fetch_add(1, Ordering::Relaxed);
    let path = shared.cfg.dir.join(format!("{}-{n:08}.eml", shared.prefix));
    let dir = shared.cfg.dir.clone();
    let sync = match (shared.cfg.no_fsync, shared.cfg.sync_dir) {
        (true, _) => Sync::Nothing,
        (false, false) => Sync::File,
        (false, true) => Sync::FileAndDir,
    };
    let joined = tokio::task::spawn_blocking(move || {
        let result = write_durably(&path, &dir, &body, sync);
        (result, body)
    })
    .await;
    match joined {
        Ok((result, body)) => {
            if result.is_ok() {
                shared.stored.fetch_add(1, Ordering::Relaxed);
            }
            (result, body)
        }
        Err(e) => (Err(io::Error::other(e)), Vec::new()),
    }
}

/// What a stored message is synced with before its `250`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    Nothing,
    File,
    FileAndDir,
}

fn write_durably(path: &Path, dir: &Path, body: &[u8], sync: Sync) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(body)?;
    if sync != Sync::Nothing {
        file.sync_all()?;
    }
    if sync == Sync::FileAndDir {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn data(input: &[u8]) -> Result<(DataEnd, Vec<u8>, Vec<u8>), SessionError> {
        let mut io = BufReader::new(input);
        let mut body = Vec::new();
        let limits = ServerLimits {
            max_text_line: MAX_DATA_LINE,
            max_message_bytes: 16,
            ..ServerLimits::default()
        };
        let end = read_data(&mut io, &mut body, &limits, Duration::from_secs(1)).await?;
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await?;
        Ok((end, body, rest))
    }

    #[tokio::test]
    async fn data_is_unstuffed_up_to_the_dot() {
        // (input, end, body, what stays buffered)
        type Case = (&'static [u8], DataEnd, &'static [u8], &'static [u8]);
        let cases: &[Case] = &[
            (b"a\r\n.\r\n", DataEnd::Complete, b"a\r\n", b""),
            (
                b"..a\r\nb.\r\n.\r\nQUIT\r\n",
                DataEnd::Complete,
                b".a\r\nb.\r\n",
                b"QUIT\r\n",
            ),
            (b".\r\n", DataEnd::Complete, b"", b""),
            (b"x\n\r\n.\r\nRSET\r\n", DataEnd::BareEol, b"", b"RSET\r\n"),
            (
                b"0123456789\r\n0123456789\r\n.\r\n",
                DataEnd::TooBig,
                b"",
                b"",
            ),
        ];
        for (input, end, body, rest) in cases {
            let got = data(input).await.expect("complete message");
            assert_eq!(got, (*end, body.to_vec(), rest.to_vec()));
        }
    }

    #[tokio::test]
    async fn data_errors() {
        assert!(matches!(data(b"a\r\n").await, Err(SessionError::Closed)));
        assert!(matches!(data(b"a\r\n.").await, Err(SessionError::Closed)));
        // A bare LF does not end the data.
        assert!(matches!(data(b"a\n.\n").await, Err(SessionError::Closed)));
        let long = vec![b'a'; MAX_DATA_LINE + 1];
        assert!(matches!(data(&long).await, Err(SessionError::LineTooLong)));
        let mut ok = vec![b'a'; MAX_DATA_LINE - 2];
        ok.extend_from_slice(b"\r\n.\r\n");
        // (Too big for the test's 16-byte limit, but the line is not too long.)
        assert!(matches!(data(&ok).await, Ok((DataEnd::TooBig, _, _))));
    }

    #[test]
    fn commands_in_order() {
        let mut env = Envelope::default();
        let mut out = Vec::new();
        let steps = [
            (&b"EHLO x\r\n"[..], true),
            (b"RCPT TO:<a@b>\r\n", false),
            (b"DATA\r\n", false),
            (b"mail from:<a@b>\r\n", false),
            (b"RCPT TO:<a@b>\r\n", false),
            (b"STARTTLS\r\n", false),
            (b"DATA\r\n", false),
        ];
        let mut kinds = Vec::new();
        for (line, tls) in steps {
            kinds.push(match command(line, &mut env, tls, &mut out) {
                Step::Next => "next",
                Step::Data => "data",
                Step::Quit => "quit",
                Step::StartTls => "starttls",
            });
        }
        assert_eq!(
            kinds,
            ["next", "next", "next", "next", "next", "next", "data"]
        );
        let want = format!(
            "250-sealctl-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-STARTTLS\r\n\
             250 SIZE {MAX_MESSAGE}\r\n503 5.5.1 MAIL first\r\n503 5.5.1 RCPT first\r\n\
             250 2.1.0 OK\r\n250 2.1.5 OK\r\n502 5.5.2 not implemented\r\n\
             354 end with <CRLF>.<CRLF>\r\n"
        );
        assert_eq!(String::from_utf8_lossy(&out), want);
        assert!(matches!(
            command(b"QUIT\r\n", &mut env, false, &mut out),
            Step::Quit
        ));
        assert!(matches!(
            command(b"starttls\r\n", &mut env, true, &mut out),
            Step::StartTls
        ));
    }
}
