//! A TCP connection that may be upgraded to TLS in place (STARTTLS), for both directions.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Plain TCP, or TLS over it (server or client side).
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    ServerTls(Box<crate::tls::stream::ServerStream>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Transient state while a STARTTLS handshake owns the socket.
    Upgrading,
}

impl Conn {
    /// Takes the plain socket out for a handshake; `None` if already TLS.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Conn::Upgrading) {
            Conn::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    /// Waits until a read would not block (data, end of input or an error), holding no
    /// buffer meanwhile. Client-side TLS is always "readable": its reads wait themselves.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => crate::tls::stream::peek(s).await,
            Conn::ServerTls(s) => s.readable().await,
            Conn::ClientTls(_) | Conn::Upgrading => Ok(()),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::ServerTls(_) | Conn::ClientTls(_))
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Upgrading => Poll::Ready(Ok(())),
        }
    }
}
