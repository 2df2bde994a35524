//! The SMTP server's TLS stream, on rustls' unbuffered API: this stream owns every buffer, so
//! an idle session holds none.
//!
//! rustls' buffered `ServerConnection` keeps a 4 KiB receive buffer for the whole life of a
//! connection; with thousands of idle sessions that buffer was a third of their memory. Here
//! the TLS bytes received (`incoming`), the TLS bytes to send (`outgoing`) and the decrypted
//! bytes not yet read (`plaintext`) are allocated while they hold something and released when
//! they are empty; a session waiting for its next command waits on the socket's readiness
//! with nothing allocated. Each buffer is bounded: `incoming` by the largest handshake message
//! rustls accepts, `outgoing` by one write's records, `plaintext` by the records of one read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use rustls::{CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Socket reads are this size (rustls' own read size).
const READ_CHUNK: usize = 4096;
/// Received TLS bytes kept unprocessed at most: a 64 KiB handshake message (rustls' limit, a
/// client certificate chain) and a record header.
const MAX_INCOMING: usize = 64 * 1024 + READ_CHUNK;
/// Plaintext taken per `poll_write` (four full records).
const MAX_WRITE: usize = 64 * 1024;

/// A server-side TLS connection over TCP.
pub struct ServerStream {
    tcp: TcpStream,
    tls: UnbufferedServerConnection,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    /// Bytes of `outgoing` already written to the socket.
    sent: usize,
    plaintext: Vec<u8>,
    /// Bytes of `plaintext` already read.
    taken: usize,
    /// The client sent `close_notify`: end of input.
    peer_closed: bool,
    /// Our `close_notify` is queued.
    close_queued: bool,
}

impl std::fmt::Debug for ServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStream")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("incoming", &self.incoming.len())
            .field("outgoing", &(self.outgoing.len() - self.sent))
            .finish_non_exhaustive()
    }
}

/// What one round of rustls' record processing left us with.
enum Step {
    /// Something changed (records decrypted, handshake data queued): look again.
    Progress,
    /// Nothing to do until more bytes arrive (application data may be sent meanwhile).
    NeedInput,
    /// Both sides sent `close_notify`.
    Closed,
    /// What was asked to be sent is encrypted into `outgoing`.
    Wrote,
}

/// What [`ServerStream::process`] encrypts once the session may send application data.
#[derive(Clone, Copy)]
enum Send<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl ServerStream {
    /// The TLS handshake over `tcp` as the server (no deadline: the caller bounds it).
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let tls = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut s = ServerStream {
            tcp,
            tls,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            plaintext: Vec::new(),
            taken: 0,
            peer_closed: false,
            close_queued: false,
        };
        std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    /// Waits until [`AsyncRead::poll_read`] has something to work on: decrypted or received
    /// bytes kept here, or the socket readable.
    pub async fn readable(&self) -> io::Result<()> {
        if self.taken < self.plaintext.len() || !self.incoming.is_empty() || self.peer_closed {
            return Ok(());
        }
        peek(&self.tcp).await
    }

    /// The session's TLS facts (version, suite, peer certificates).
    pub fn state(&self) -> &CommonState {
        &self.tls
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            match self.process(Send::Nothing)? {
                Step::Progress | Step::Wrote => continue,
                Step::NeedInput if !self.tls.is_handshaking() => return Poll::Ready(Ok(())),
                Step::NeedInput => {
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tls handshake eof",
                        )));
                    }
                }
                Step::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed during the handshake",
                    )));
                }
            }
        }
    }

    /// One round of rustls' record processing: handshake data goes to `outgoing`, decrypted
    /// records to `plaintext`, `send` (once rustls lets us) encrypted to `outgoing`; processed
    /// input is dropped from `incoming`.
    fn process(&mut self, send: Send<'_>) -> io::Result<Step> {
        let ServerStream {
            tls,
            incoming,
            outgoing,
            plaintext,
            peer_closed,
            ..
        } = self;
        let status = tls.process_tls_records(incoming);
        let mut discard = status.discard;
        let step = match status.state.map_err(invalid)? {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(record) = r.next_record() {
                    let record = record.map_err(invalid)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
                Step::Progress
            }
            ConnectionState::EncodeTlsData(mut e) => {
                // Asked with no room first, rustls names the size (and keeps the record).
                match e.encode(&mut []) {
                    Ok(_) => {}
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        let at = outgoing.len();
                        outgoing.resize(at + required_size, 0);
                        let n = e
                            .encode(outgoing.get_mut(at..).unwrap_or_default())
                            .map_err(invalid)?;
                        outgoing.truncate(at + n);
                    }
                    Err(other) => return Err(invalid(other)),
                }
                Step::Progress
            }
            // Encoded data is in `outgoing`, which is written out before anything else.
            ConnectionState::TransmitTlsData(t) => {
                t.done();
                Step::Progress
            }
            ConnectionState::PeerClosed => {
                *peer_closed = true;
                Step::Progress
            }
            ConnectionState::Closed => Step::Closed,
            ConnectionState::WriteTraffic(mut w) => match send {
                Send::Nothing => Step::NeedInput,
                Send::Data(data) => {
                    encrypt_into(outgoing, data.len() + data.len() / 1024 + 64, |buf| {
                        w.encrypt(data, buf)
                    })?;
                    Step::Wrote
                }
                Send::CloseNotify => {
                    encrypt_into(outgoing, 64, |buf| w.queue_close_notify(buf))?;
                    Step::Wrote
                }
            },
            ConnectionState::BlockedHandshake => Step::NeedInput,
            ConnectionState::ReadEarlyData(_) => return Err(invalid("unexpected early data")),
            _ => return Err(invalid("unknown TLS connection state")),
        };
        incoming.drain(..discard.min(incoming.len()));
        if incoming.is_empty() {
            *incoming = Vec::new();
        }
        Ok(step)
    }

    /// Encrypts `send` into `outgoing`, processing records in the way (received data is kept
    /// for the reader, handshake data queued).
    fn send(&mut self, send: Send<'_>) -> io::Result<()> {
        loop {
            match self.process(send)? {
                Step::Wrote => return Ok(()),
                Step::Progress => continue,
                Step::NeedInput => return Err(invalid("TLS session not ready for data")),
                Step::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
    }

    /// Writes `outgoing` to the socket; `Ready(Ok)` once all of it went.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let rest = self.outgoing.get(self.sent..).unwrap_or_default();
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has into `incoming` (allocated only now); the byte count, 0 at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let at = self.incoming.len();
            if at >= MAX_INCOMING {
                return Poll::Ready(Err(invalid("TLS message too large")));
            }
            self.incoming.resize(at + READ_CHUNK, 0);
            let got = self
                .tcp
                .try_read(self.incoming.get_mut(at..).unwrap_or_default());
            self.incoming.truncate(at + *got.as_ref().unwrap_or(&0));
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
            match got {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Waits until `tcp` has input (or its end), holding a single byte meanwhile: unlike
/// `readable()`, a peek clears readiness left over from earlier reads, so a wake-up means data.
pub async fn peek(tcp: &TcpStream) -> io::Result<()> {
    tcp.peek(&mut [0u8; 1]).await.map(|_| ())
}

/// Runs `encrypt` on a `room`-byte tail of `outgoing` (grown to what rustls says it needs)
/// and keeps what it wrote.
fn encrypt_into(
    outgoing: &mut Vec<u8>,
    mut room: usize,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> io::Result<()> {
    let at = outgoing.len();
    loop {
        outgoing.resize(at + room, 0);
        match encrypt(outgoing.get_mut(at..).unwrap_or_default()) {
            Ok(n) => {
                outgoing.truncate(at + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size }))
                if required_size > room =>
            {
                room = required_size;
            }
            Err(e) => {
                outgoing.truncate(at);
                return Err(invalid(e));
            }
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.taken < me.plaintext.len() {
                let rest = me.plaintext.get(me.taken..).unwrap_or_default();
                let n = rest.len().min(buf.remaining());
                buf.put_slice(rest.get(..n).unwrap_or_default());
                me.taken += n;
                if me.taken == me.plaintext.len() {
                    me.plaintext = Vec::new();
                    me.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if me.peer_closed {
                return Poll::Ready(Ok(()));
            }
            // Replies rustls owes the peer (key updates, alerts) go first.
            ready!(me.poll_send(cx))?;
            match me.process(Send::Nothing)? {
                Step::Progress | Step::Wrote => continue,
                Step::Closed => return Poll::Ready(Ok(())),
                Step::NeedInput => {
                    if ready!(me.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed connection without sending TLS close_notify",
                        )));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        // One write's records at a time: earlier ones must be out first.
        ready!(me.poll_send(cx))?;
        let n = data.len().min(MAX_WRITE);
        me.send(Send::Data(data.get(..n).unwrap_or_default()))?;
        if let Poll::Ready(Err(e)) = me.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_send(cx))?;
        Pin::new(&mut me.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.close_queued {
            me.close_queued = true;
            // Best effort: a session that cannot send any more is closed all the same.
            let _ = me.send(Send::CloseNotify);
        }
        ready!(me.poll_send(cx))?;
        Pin::new(&mut me.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn server_config() -> Arc<ServerConfig> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let sc = ServerConfig::builder_with_provider(sealgate_core::verifiers::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        Arc::new(sc)
    }

    async fn client(addr: std::net::SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
        let provider = sealgate_core::verifiers::provider();
        let cc = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                sealgate_core::verifiers::ServerCertCheck::accept_any(provider),
            ))
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cc))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    fn idle(s: &ServerStream) -> bool {
        s.incoming.capacity() == 0 && s.outgoing.capacity() == 0 && s.plaintext.capacity() == 0
    }

    #[tokio::test]
    async fn data_both_ways_in_small_reads_and_large_writes_then_close_notify() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let want = big.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = ServerStream::accept(tcp, server_config()).await.unwrap();
            assert!(!s.state().is_handshaking());
            s.write_all(b"220 hello\r\n").await.unwrap();
            s.flush().await.unwrap();
            assert!(idle(&s), "no buffer kept after a flush: {s:?}");
            // The client's 300 KB, read 7 bytes at a time.
            let mut got = Vec::new();
            let mut piece = [0u8; 7];
            while got.len() < want.len() {
                let n = s.read(&mut piece).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&piece[..n]);
            }
            assert_eq!(got, want);
            s.readable().await.unwrap();
            assert_eq!(
                s.read(&mut piece).await.unwrap(),
                0,
                "close_notify is a clean EOF"
            );
            s.write_all(&want).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let mut c = client(addr).await;
        let mut greeting = [0u8; 11];
        c.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"220 hello\r\n");
        c.write_all(&big).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, big);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_session_holds_no_buffer_and_a_silent_close_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = ServerStream::accept(tcp, server_config()).await.unwrap();
            let mut line = [0u8; 64];
            let n = s.read(&mut line).await.unwrap();
            assert_eq!(&line[..n], b"EHLO x\r\n");
            // Waiting for the next command: nothing allocated.
            let waiting = tokio::time::timeout(Duration::from_millis(50), s.readable()).await;
            assert!(waiting.is_err(), "nothing to read yet");
            assert!(idle(&s), "idle: {s:?}");
            // The close shows (an RST when the client left session tickets unread).
            let _ = s.readable().await;
            s.read(&mut line).await.unwrap_err()
        });
        let mut c = client(addr).await;
        c.write_all(b"EHLO x\r\n").await.unwrap();
        c.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        drop(c); // TCP close without close_notify
        let err = server.await.unwrap();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_client_that_is_no_tls_client_fails_the_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            ServerStream::accept(tcp, server_config()).await.map(|_| ())
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"EHLO plain\r\n\r\n\r\n\r\n").await.unwrap();
        let err = server.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    use std::time::Duration;
}
