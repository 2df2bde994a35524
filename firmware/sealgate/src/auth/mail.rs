//! The `imap`, `pop3` and `smtp` backends: the login tried on another mail server, over
//! implicit TLS or after STARTTLS / STLS; the dialog is `sealgate_proto::authclient`'s.

use std::collections::VecDeque;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use sealgate_core::auth::expand_template;
use sealgate_core::config::{AuthBackend, BackendKind, BackendTls};
use sealgate_proto::authclient::{LoginDialog, MAX_LINE, Protocol, Step, Verdict};
use sealgate_proto::sasl::Password;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::Answer;

/// The connection to the backend, plaintext only until STARTTLS.
enum Link {
    Plain(BufReader<TcpStream>),
    Tls(Box<BufReader<TlsStream<TcpStream>>>),
}

pub(super) async fn check(
    b: &AuthBackend,
    tls: Arc<ClientConfig>,
    user: &str,
    login: &str,
    domain: &str,
    password: &Password,
    ehlo: &str,
) -> Answer {
    match dialog(b, tls, user, login, domain, password, ehlo).await {
        Ok(Verdict::Accepted) => Answer::Accepted,
        Ok(Verdict::Rejected) => Answer::Rejected("the server refused the login"),
        Ok(Verdict::Unavailable(reason)) => Answer::Unavailable(reason),
        Err(reason) => Answer::Unavailable(reason),
    }
}

async fn dialog(
    b: &AuthBackend,
    tls: Arc<ClientConfig>,
    user: &str,
    login: &str,
    domain: &str,
    password: &Password,
    ehlo: &str,
) -> Result<Verdict, String> {
    let protocol = match b.kind {
        BackendKind::Imap => Protocol::Imap,
        BackendKind::Pop3 => Protocol::Pop3,
        BackendKind::Smtp | BackendKind::Ldap => Protocol::Smtp,
    };
    let name = ServerName::try_from(b.tls_name.clone()).map_err(|e| e.to_string())?;
    let connector = TlsConnector::from(tls);
    let tcp = TcpStream::connect((b.host.as_str(), b.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut link = match b.tls {
        BackendTls::Implicit => Link::Tls(Box::new(BufReader::new(
            connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?,
        ))),
        BackendTls::StartTls => Link::Plain(BufReader::new(tcp)),
    };
    let sent_as = expand_template(&b.login, user, login, domain, str::to_owned);
    let mut machine = LoginDialog::new(
        protocol,
        b.tls == BackendTls::StartTls,
        &sent_as,
        password.expose(),
        ehlo,
    );
    let mut steps = VecDeque::new();
    loop {
        if steps.is_empty() {
            let line = link.read_line().await?;
            steps.extend(machine.on_line(&line));
        }
        while let Some(step) = steps.pop_front() {
            match step {
                Step::Send(bytes) => link.write(&bytes).await?,
                Step::StartTls => {
                    link = link.upgrade(&connector, name.clone()).await?;
                    steps.extend(machine.tls_established());
                }
                Step::Wait => {}
                Step::Done(verdict) => return Ok(verdict),
            }
        }
    }
}

impl Link {
    /// One line of at most `MAX_LINE` octets (CRLF included).
    async fn read_line(&mut self) -> Result<Vec<u8>, String> {
        let mut line = Vec::new();
        let n = match self {
            Link::Plain(r) => read_bounded(r, &mut line).await,
            Link::Tls(r) => read_bounded(r.as_mut(), &mut line).await,
        }
        .map_err(|e| format!("read: {e}"))?;
        match n {
            0 => Err("connection closed by the server".into()),
            _ if !line.ends_with(b"\n") => Err("line too long".into()),
            _ => Ok(line),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let r = match self {
            Link::Plain(r) => r.get_mut().write_all(bytes).await,
            Link::Tls(r) => {
                let s = r.get_mut();
                match s.write_all(bytes).await {
                    Ok(()) => s.flush().await,
                    Err(e) => Err(e),
                }
            }
        };
        r.map_err(|e| format!("write: {e}"))
    }

    /// STARTTLS accepted: the handshake. Bytes that came after the server's answer would be
    /// read as if protected (response injection): refused.
    async fn upgrade(
        self,
        connector: &TlsConnector,
        name: ServerName<'static>,
    ) -> Result<Link, String> {
        let Link::Plain(reader) = self else {
            return Err("STARTTLS inside TLS".into());
        };
        if !reader.buffer().is_empty() {
            return Err("the server sent data after its STARTTLS answer".into());
        }
        let tls = connector
            .connect(name, reader.into_inner())
            .await
            .map_err(|e| format!("TLS after STARTTLS: {e}"))?;
        Ok(Link::Tls(Box::new(BufReader::new(tls))))
    }
}

/// `read_until` LF, but never more than `MAX_LINE` octets.
async fn read_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut limited = tokio::io::AsyncReadExt::take(r, MAX_LINE as u64);
    limited.read_until(b'\n', line).await
}
