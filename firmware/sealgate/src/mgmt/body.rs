//! Request bodies, bounded: read whole up to a limit, drained when refused, or streamed into a
//! blocking reader (the installer) through a small channel; every chunk within
//! [`BODY_IDLE_TIMEOUT`].

use std::io::{self, Read};

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use tokio::sync::mpsc;

use super::error::{ApiError, too_large};
use super::{BODY_IDLE_TIMEOUT, DRAIN_BYTES, DRAIN_TIMEOUT};

/// The body's `Content-Length`, if it has one.
pub(super) fn content_length(body: &Body) -> Option<u64> {
    body.size_hint().exact()
}

/// The whole body, at most `max` bytes, each chunk within the idle timeout.
pub(super) async fn read_body(mut body: Body, max: usize) -> Result<Vec<u8>, ApiError> {
    if content_length(&body).is_some_and(|n| n > max as u64) {
        return Err(too_large(max as u64));
    }
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return Err(body_timeout()),
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) => return Err(body_error(&e)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > max {
                        return Err(too_large(max as u64));
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Reads and drops what a client sends of a body we will not use, within bounds.
pub(super) async fn drain(mut body: Body) {
    if content_length(&body).is_some_and(|n| n > DRAIN_BYTES) {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

fn body_timeout() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        format!(
            "request body: nothing received for {} s",
            BODY_IDLE_TIMEOUT.as_secs()
        ),
    )
}

fn body_error(e: &axum::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "body",
        format!("request body: {e}"),
    )
}

/// Feeds the body into `tx` chunk by chunk (the channel's bound is the backpressure); an error
/// or a body over `max` reaches the reader as an I/O error. Stops when the reader is gone.
pub(super) async fn pump(mut body: Body, tx: mpsc::Sender<io::Result<Bytes>>, max: u64) {
    let mut total = 0u64;
    loop {
        let item = match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                body_timeout().error,
            )),
            Ok(None) => return,
            Ok(Some(Err(e))) => Err(io::Error::other(body_error(&e).error)),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => {
                    total += d.len() as u64;
                    if total > max {
                        Err(io::Error::other(too_large(max).error))
                    } else {
                        Ok(d)
                    }
                }
                Err(_) => continue,
            },
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// A blocking `Read` over the chunks [`pump`] sends (used inside `spawn_blocking`).
#[derive(Debug)]
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> ChannelReader {
        ChannelReader {
            rx,
            chunk: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => self.chunk = b,
            }
        }
        let n = buf.len().min(self.chunk.len());
        let head = self.chunk.split_to(n);
        buf[..n].copy_from_slice(&head);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_reader_streams_and_reports_errors() {
        let (tx, rx) = mpsc::channel(2);
        let t = std::thread::spawn(move || {
            let mut r = ChannelReader::new(rx);
            let mut out = Vec::new();
            let res = r.read_to_end(&mut out);
            (out, res.map_err(|e| e.to_string()))
        });
        tx.blocking_send(Ok(Bytes::from_static(b"abc"))).unwrap();
        tx.blocking_send(Ok(Bytes::from_static(b"defg"))).unwrap();
        tx.blocking_send(Err(io::Error::other("cut"))).unwrap();
        let (out, res) = t.join().unwrap();
        assert_eq!(out, b"abcdefg");
        assert_eq!(res, Err("cut".into()));
        let (tx, rx) = mpsc::channel(2);
        tx.blocking_send(Ok(Bytes::from_static(b"xy"))).unwrap();
        drop(tx);
        let mut r = ChannelReader::new(rx);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"xy");
    }

    #[tokio::test]
    async fn bodies_are_bounded() {
        let b = read_body(Body::from(vec![1u8; 10]), 10).await.unwrap();
        assert_eq!(b.len(), 10);
        let e = read_body(Body::from(vec![1u8; 11]), 10).await.unwrap_err();
        assert_eq!((e.status, e.check), (StatusCode::PAYLOAD_TOO_LARGE, "size"));
        let (tx, mut rx) = mpsc::channel(4);
        pump(Body::from(vec![1u8; 11]), tx, 10).await;
        assert!(rx.recv().await.unwrap().is_err(), "over the bound");
    }
}
