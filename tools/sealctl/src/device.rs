//! `sealctl device`: the client of a box's management API (F-MGMT, `docs/mgmt-api.md`) over
//! HTTPS — status, config and update pushes, reboot, peer reset, the queue.
//!
//! The box's certificate is checked, always: by the SHA-256 of its DER (`--pin`, for the
//! self-signed certificate a box makes for itself) or by a CA (`--ca`, chain and name). The
//! admin is authenticated by a client certificate (`--cert`/`--key`) or a bearer token read
//! from a file (`--token-file`); neither is ever printed. An update bundle is streamed from its
//! file, never read whole.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use clap::{Args, Subcommand};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sealgate_api as api;
use sealgate_core::verifiers::ServerCertCheck;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

/// Exit status for usage errors.
const EXIT_USAGE: u8 = 2;
/// Largest response body read.
const MAX_RESPONSE: usize = 16 << 20;
/// Bytes per chunk of a streamed upload.
const CHUNK: usize = 64 * 1024;
/// Largest config blob sent (the box refuses more anyway).
const MAX_CONFIG: u64 = 2 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: DeviceCommand,
}

/// How to reach and trust the box, and who we are.
#[derive(Debug, Args)]
struct ConnArgs {
    /// The box's management API: https://HOST[:PORT] (port 8443 by default)
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// Trust the box's certificate by the SHA-256 of its DER (64 hex digits, ':' allowed)
    #[arg(long, global = true, value_name = "SHA256")]
    pin: Option<String>,
    /// Trust the box's certificate by this CA (PEM); its name is checked too
    #[arg(long, global = true, value_name = "CA.pem")]
    ca: Option<PathBuf>,
    /// The name the box's certificate must carry with --ca (default: the host of --url)
    #[arg(long, global = true, value_name = "NAME")]
    server_name: Option<String>,
    /// Admin client certificate (PEM, with --key)
    #[arg(long, global = true, value_name = "CERT.pem")]
    cert: Option<PathBuf>,
    /// The admin client certificate's private key (PEM)
    #[arg(long, global = true, value_name = "KEY.pem")]
    key: Option<PathBuf>,
    /// A file holding the admin bearer token (surrounding whitespace ignored)
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Give up after this many seconds
    #[arg(long, global = true, default_value_t = 600)]
    timeout: u64,
    /// Print the box's JSON answer instead of a summary
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Version, slots, config sequence and key, certificates, queue counts, peer table (JSON)
    Status,
    /// The box's encryption key (64 hex digits), to seal secrets to it: `sealctl device
    /// encryption-key > BOX.pub`, then `sealctl config sign --device-key BOX.pub`
    EncryptionKey,
    /// Push a signed config blob (`sealctl config sign`); the box verifies and applies it
    /// exactly like a SIGHUP, or says which check refused it
    PushConfig {
        /// The blob
        file: PathBuf,
    },
    /// Stream a signed update bundle into the box's inactive slot (appliance only)
    PushUpdate {
        /// The bundle
        file: PathBuf,
        /// Reboot into it once installed
        #[arg(long)]
        reboot: bool,
    },
    /// Reboot the box (appliance only)
    Reboot,
    /// Sync and power the box off (appliance only)
    Poweroff,
    /// Forget a peer's TLS history (IP address or host name)
    PeerReset {
        /// An IP address or a host name
        peer: String,
    },
    /// The mail queue: list (default), release (deliver now) or delete a message
    Queue {
        #[command(subcommand)]
        command: Option<QueueCommand>,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// List queued messages and each recipient's status
    List,
    /// Attempt delivery of a message now
    Release {
        /// Queue id
        id: String,
    },
    /// Delete a message from the queue (no DSN is sent)
    Delete {
        /// Queue id
        id: String,
    },
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Tls(String),
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("no answer within {0} s")]
    Timeout(u64),
    #[error("HTTP {status}: {error}{}", check.as_ref().map(|c| format!(" (check: {c})")).unwrap_or_default())]
    Refused {
        status: StatusCode,
        error: String,
        check: Option<String>,
        body: Value,
    },
}

pub fn run(args: DeviceArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sealctl device: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.conn.json;
    match runtime.block_on(device(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let (true, Error::Refused { body, .. }) = (json, &e) {
                println!("{}", pretty(body));
            }
            eprintln!("sealctl device: {e}");
            match e {
                Error::Usage(_) => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

async fn device(args: DeviceArgs) -> Result<(), Error> {
    let client = Client::new(&args.conn)?;
    let secs = args.conn.timeout;
    let out = Out {
        json: args.conn.json,
    };
    tokio::time::timeout(
        Duration::from_secs(secs),
        command(&client, &args.command, out),
    )
    .await
    .unwrap_or(Err(Error::Timeout(secs)))
}

/// How answers are printed: the box's JSON (`--json`) or a summary.
#[derive(Debug, Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// The answer's JSON with `--json`, else the summary `text` makes of its body.
    fn print<T: DeserializeOwned>(
        self,
        a: &Answer,
        text: impl FnOnce(T) -> String,
    ) -> Result<(), Error> {
        if self.json {
            println!("{}", pretty(&a.json));
        } else {
            println!("{}", text(a.body()?));
        }
        Ok(())
    }
}

async fn command(client: &Client, command: &DeviceCommand, out: Out) -> Result<(), Error> {
    match command {
        DeviceCommand::Status => {
            let a = client.call(Method::GET, api::STATUS, None).await?;
            println!("{}", pretty(&a.json));
            Ok(())
        }
        DeviceCommand::EncryptionKey => {
            let a = client.call(Method::GET, api::STATUS, None).await?;
            let status: api::Status = a.body()?;
            match status.config.encryption_key {
                Some(k) => {
                    println!("{k}");
                    Ok(())
                }
                None => Err(Error::Usage(
                    "the box has no encryption key (its sealed store did not open)".into(),
                )),
            }
        }
        DeviceCommand::PushConfig { file } => {
            let blob = read_small(file, MAX_CONFIG).await?;
            let a = client
                .call(Method::PUT, api::CONFIG, Some(Upload::Bytes(blob)))
                .await?;
            out.print(&a, |c: api::ConfigPushed| {
                if c.applied {
                    format!(
                        "config applied: sequence {}, signed by key {}",
                        c.sequence, c.key_id
                    )
                } else {
                    format!(
                        "config already applied: sequence {}; nothing to do",
                        c.sequence
                    )
                }
            })
        }
        DeviceCommand::PushUpdate { file, reboot } => push_update(client, file, *reboot, out).await,
        DeviceCommand::Reboot => {
            let a = client.call(Method::POST, api::REBOOT, None).await?;
            out.print(&a, |_: api::Rebooting| "the box is rebooting".into())
        }
        DeviceCommand::Poweroff => {
            let a = client.call(Method::POST, api::POWEROFF, None).await?;
            out.print(&a, |_: api::PoweringOff| "the box is powering off".into())
        }
        DeviceCommand::PeerReset { peer } => {
            let path = api::fill(api::PEER_RESET, &encode_segment(peer));
            let a = client.call(Method::POST, &path, None).await?;
            out.print(&a, |r: api::PeerReset| {
                format!("reset {} peer record(s) matching {peer}", r.reset)
            })
        }
        DeviceCommand::Queue { command } => queue(client, command.as_ref(), out).await,
    }
}

async fn push_update(client: &Client, file: &Path, reboot: bool, out: Out) -> Result<(), Error> {
    let path = if reboot {
        format!("{}?{}", api::UPDATE, api::UPDATE_REBOOT)
    } else {
        api::UPDATE.to_string()
    };
    let upload = Upload::file(file).await?;
    let a = client.call(Method::PUT, &path, Some(upload)).await?;
    out.print(&a, |u: api::UpdateInstalled| {
        // As the JSON shows them: the version as its object, the slot quoted.
        let version = serde_json::to_string(&u.installed.version).unwrap_or_default();
        let slot = serde_json::to_string(&u.installed.slot).unwrap_or_default();
        format!(
            "installed version {version} into slot {slot}; {}",
            if reboot {
                "the box reboots into it now"
            } else {
                "active after a reboot"
            }
        )
    })
}

async fn queue(client: &Client, command: Option<&QueueCommand>, out: Out) -> Result<(), Error> {
    match command {
        None | Some(QueueCommand::List) => {
            let a = client.call(Method::GET, api::QUEUE, None).await?;
            if out.json {
                println!("{}", pretty(&a.json));
            } else {
                print!("{}", queue_table(&a.body()?));
            }
            Ok(())
        }
        Some(QueueCommand::Release { id }) => {
            let path = api::fill(api::QUEUE_RELEASE, &encode_segment(id));
            let a = client.call(Method::POST, &path, None).await?;
            out.print(&a, |_: api::QueueReleased| {
                format!("released {id}: delivery is attempted now")
            })
        }
        Some(QueueCommand::Delete { id }) => {
            let path = api::fill(api::QUEUE_MESSAGE, &encode_segment(id));
            let a = client.call(Method::DELETE, &path, None).await?;
            out.print(&a, |_: api::QueueDeleted| {
                format!("deleted {id} from the queue")
            })
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// The queue listing for people.
fn queue_table(list: &api::QueueList) -> String {
    let mut s = String::new();
    for m in &list.messages {
        let from = if m.from.is_empty() { "<>" } else { &m.from };
        s.push_str(&format!(
            "{}  {} B  attempts {}  next {}  from {}\n",
            m.id, m.size, m.attempts, m.next_attempt, from
        ));
        for r in &m.recipients {
            s.push_str(&format!("    {:<9} {}", r.status.as_str(), r.address));
            if let Some(d) = &r.detail {
                s.push_str(&format!("  ({d})"));
            }
            s.push('\n');
        }
    }
    s.push_str(&format!("{} message(s) queued", list.count));
    if list.truncated {
        s.push_str(" (listing truncated)");
    }
    s.push('\n');
    s
}

/// Percent-encodes a path segment (everything but unreserved characters and ':').
fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn read_small(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let file_err = |source| Error::File {
        path: path.to_path_buf(),
        source,
    };
    let len = tokio::fs::metadata(path).await.map_err(file_err)?.len();
    if len > max {
        return Err(Error::Usage(format!(
            "{}: {len} bytes; a config blob has at most {max}",
            path.display()
        )));
    }
    tokio::fs::read(path).await.map_err(file_err)
}

// ---------------------------------------------------------------------------------------------
// The connection

/// A request body: small and whole, or a file streamed in chunks.
enum Upload {
    Bytes(Vec<u8>),
    File { path: PathBuf, len: u64 },
}

impl Upload {
    async fn file(path: &Path) -> Result<Upload, Error> {
        let len = tokio::fs::metadata(path)
            .await
            .map_err(|source| Error::File {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(Upload::File {
            path: path.to_path_buf(),
            len,
        })
    }
}

/// A body fed by a task reading the file (`CHUNK` bytes at a time, two chunks in flight).
struct StreamBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    len: u64,
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

fn stream_file(path: PathBuf, len: u64) -> StreamBody {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            match f.read(&mut buf).await {
                Ok(0) => {
                    if sent != len {
                        let _ = tx
                            .send(Err(io::Error::other(format!(
                                "{}: changed while being sent",
                                path.display()
                            ))))
                            .await;
                    }
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    sent += n as u64;
                    if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    StreamBody { rx, len }
}

struct Client {
    host: String,
    port: u16,
    authority: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    token: Option<String>,
}

impl Client {
    fn new(a: &ConnArgs) -> Result<Client, Error> {
        let url = a
            .url
            .as_deref()
            .ok_or_else(|| Error::Usage("give --url https://HOST:PORT".into()))?;
        let (host, port) = parse_url(url)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let name = a.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| Error::Usage(format!("{name:?} is not a server name")))?;
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(server_check(a, provider)?);
        let mut config = match (&a.cert, &a.key) {
            (Some(cert), Some(key)) => {
                let (chain, key_der) = client_identity(cert, key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| Error::Tls(format!("client certificate: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(Error::Usage("--cert and --key go together".into())),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let token = a.token_file.as_deref().map(read_token).transpose()?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Client {
            host,
            port,
            authority,
            server_name,
            tls: TlsConnector::from(Arc::new(config)),
            token,
        })
    }

    /// One request on a fresh connection; `Ok` is a 2xx answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Upload>,
    ) -> Result<Answer, Error> {
        let mut sender = self.connect().await?;
        let (body, len): (BoxBody<Bytes, io::Error>, u64) = match body {
            None => (empty(), 0),
            Some(Upload::Bytes(b)) => {
                let n = b.len() as u64;
                (Full::new(Bytes::from(b)).map_err(|e| match e {}).boxed(), n)
            }
            Some(Upload::File { path, len }) => (stream_file(path, len).boxed(), len),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        if len > 0 || body_method(req.method_ref()) {
            req = req
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, len);
        }
        if let Some(t) = &self.token {
            let v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| Error::Usage("the token is not a valid header value".into()))?;
            req = req.header(header::AUTHORIZATION, v);
        }
        let req = req.body(body).map_err(|e| Error::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| Error::Http(format!("reading the answer: {e}")))?
            .to_bytes();
        Answer::of(status, &bytes)
    }

    /// TCP, TLS and the HTTP/1.1 handshake with the box.
    async fn connect(&self) -> Result<SendRequest<BoxBody<Bytes, io::Error>>, Error> {
        let connect_err = |reason: String| Error::Connect {
            addr: self.authority.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| connect_err("timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| Error::Tls(format!("TLS with {}: {e}", self.authority)))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Error::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

/// A 2xx answer: its JSON, printed as it is with `--json`, or read as its `sealgate-api` type.
#[derive(Debug)]
struct Answer {
    json: Value,
}

impl Answer {
    /// The answer to `status`: `Ok` for 2xx, else the refusal with the box's reason and check.
    fn of(status: StatusCode, bytes: &[u8]) -> Result<Answer, Error> {
        let json: Value = serde_json::from_slice(bytes).map_err(|e| {
            Error::Http(format!(
                "HTTP {status}: the answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        })?;
        if status.is_success() {
            return Ok(Answer { json });
        }
        let e = api::ErrorBody::deserialize(&json).unwrap_or(api::ErrorBody {
            error: String::new(),
            check: String::new(),
        });
        Err(Error::Refused {
            status,
            error: if e.error.is_empty() {
                "(no reason given)".into()
            } else {
                e.error
            },
            check: Some(e.check).filter(|c| !c.is_empty()),
            body: json,
        })
    }

    /// The body as the endpoint's type.
    fn body<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.json)
            .map_err(|e| Error::Http(format!("the box's answer is not as expected: {e}")))
    }
}

/// How the box's certificate is checked: `--pin` or `--ca` (exactly one).
fn server_check(
    a: &ConnArgs,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, Error> {
    match (&a.pin, &a.ca) {
        (Some(pin), None) => Ok(Arc::new(pinned_server(parse_pin(pin)?, provider))),
        (None, Some(ca)) => {
            let pem = std::fs::read(ca).map_err(|source| Error::File {
                path: ca.clone(),
                source,
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
                roots
                    .add(c)
                    .map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(Error::Tls(format!("{}: no CA certificate", ca.display())));
            }
            let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Tls(e.to_string()))?;
            Ok(v)
        }
        _ => Err(Error::Usage(
            "how is the box's certificate to be checked? give --pin SHA256 or --ca CA.pem \
             (one of them)"
                .into(),
        )),
    }
}

/// The admin client certificate chain and its key (`--cert`, `--key`).
fn client_identity(
    cert: &PathBuf,
    key: &PathBuf,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| Error::File {
            path: p.clone(),
            source,
        })
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Tls(format!("{}: no certificate", cert.display())));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| Error::Tls(format!("{}: {e}", key.display())))?;
    Ok((chain, key_der))
}

/// The bearer token in `path` (surrounding whitespace ignored): one word of printable ASCII.
fn read_token(path: &Path) -> Result<String, Error> {
    let t = std::fs::read_to_string(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })?;
    let t = t.trim().to_string();
    if t.is_empty() || t.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(Error::Usage(format!(
            "{}: the token must be one word of printable ASCII",
            path.display()
        )));
    }
    Ok(t)
}

fn body_method(m: Option<&Method>) -> bool {
    matches!(m, Some(&Method::PUT) | Some(&Method::POST))
}

fn empty() -> BoxBody<Bytes, io::Error> {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

/// `https://HOST[:PORT][/]` → (host, port); IPv6 in brackets.
fn parse_url(url: &str) -> Result<(String, u16), Error> {
    let bad = |why: &str| Error::Usage(format!("--url {url:?}: {why}"));
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("must start with https://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(bad("give only the scheme, host and port"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None => 8443,
        Some(p) => p.parse().map_err(|_| bad("bad port"))?,
    };
    Ok((host, port))
}

/// 64 hex digits (':' and whitespace ignored) → 32 bytes.
fn parse_pin(s: &str) -> Result<[u8; 32], Error> {
    let hex: Vec<u8> = s
        .bytes()
        .filter(|b| *b != b':' && !b.is_ascii_whitespace())
        .collect();
    let bad = || Error::Usage(format!("--pin {s:?}: give the SHA-256 as 64 hex digits"));
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Accepts exactly the server certificate whose SHA-256 is `pin` (handshake signatures are
/// checked as always; the name is not, the pin says it all).
fn pinned_server(pin: [u8; 32], provider: Arc<CryptoProvider>) -> ServerCertCheck {
    ServerCertCheck::new(provider, move |end_entity| {
        let got = ring::digest::digest(&ring::digest::SHA256, end_entity);
        if got.as_ref() == pin {
            Ok(())
        } else {
            let hex: String = got.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            Err(rustls::Error::General(format!(
                "the box's certificate (SHA-256 {hex}) is not the pinned one"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let ok = [
            ("https://127.0.0.1:8443", ("127.0.0.1", 8443)),
            ("https://box.example/", ("box.example", 8443)),
            ("https://[::1]:9443", ("::1", 9443)),
        ];
        for (u, (h, p)) in ok {
            let (host, port) = parse_url(u).unwrap();
            assert_eq!((host.as_str(), port), (h, p), "{u}");
        }
        for u in [
            "http://x:1",
            "https://",
            "https://x:port",
            "https://x:1/api",
            "https://u@x",
        ] {
            assert!(parse_url(u).is_err(), "{u}");
        }
    }

    #[test]
    fn pins_and_segments() {
        let p = parse_pin(&format!("{}ab", "Ab:".repeat(31))).unwrap();
        assert_eq!(p, [0xab; 32]);
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
        assert_eq!(encode_segment("127.0.0.1"), "127.0.0.1");
        assert_eq!(encode_segment("::1"), "::1");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn answers_and_refusals() {
        let a = Answer::of(StatusCode::OK, br#"{"peer": "p", "reset": 2}"#).unwrap();
        let r: api::PeerReset = a.body().unwrap();
        assert_eq!(r.reset, 2);
        assert!(a.body::<api::QueueList>().is_err());
        let e = Answer::of(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"error": "sequence: replayed", "check": "sequence"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "HTTP 422 Unprocessable Entity: sequence: replayed (check: sequence)"
        );
        let e = Answer::of(StatusCode::NOT_FOUND, b"{}").unwrap_err();
        assert_eq!(e.to_string(), "HTTP 404 Not Found: (no reason given)");
        assert!(Answer::of(StatusCode::OK, b"<html>").is_err());
    }

    #[test]
    fn the_queue_for_people() {
        let list: api::QueueList = serde_json::from_str(
            r#"{"count": 1, "truncated": true, "messages": [
                {"id": "X1", "from": "", "size": 412, "arrival": 1, "attempts": 1,
                 "next_attempt": 5, "recipients": [
                    {"address": "c@c.test", "status": "pending", "detail": "4.4.1 refused",
                     "source": "connection"},
                    {"address": "d@d.test", "status": "delivered", "detail": null,
                     "source": null}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            queue_table(&list),
            "X1  412 B  attempts 1  next 5  from <>\n    pending   c@c.test  (4.4.1 refused)\n    \
             delivered d@d.test\n1 message(s) queued (listing truncated)\n"
        );
    }
}
