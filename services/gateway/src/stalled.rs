//! A connection whose client stops reading. hyper has no write timeout: a
//! response it cannot write waits as long as the client keeps the socket
//! open, and with it the handler (a stream's record of its completion
//! waits on the chunk it cannot send). [`WriteDeadline`] fails a write that
//! has made no progress for its limit, so hyper drops the connection and
//! everything waiting on it learns the client is gone.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// `inner`, whose writes fail with `TimedOut` once one has waited `limit`
/// without the client taking a byte.
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Running while a write (or flush) is waiting on the client.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// What a write that returned `poll` becomes: progress clears the
    /// clock, waiting starts it (or finds it run out).
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let clock = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match clock.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_its_limit_and_one_read_is_not_cut() {
        // A pipe whose reader never reads: the writer fills it, then waits.
        let (reader, writer) = tokio::io::duplex(1024);
        let mut w = WriteDeadline::new(writer, Duration::from_millis(200));
        let started = std::time::Instant::now();
        let err = w.write_all(&[7u8; 64 * 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(reader);

        // A reader that keeps taking bytes, slower than the limit in all
        // but never idle that long: the write completes.
        let (mut reader, writer) = tokio::io::duplex(1024);
        let mut w = WriteDeadline::new(writer, Duration::from_millis(200));
        let drain = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 512];
            let mut total = 0;
            while total < 8 * 1024 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                total += reader.read(&mut buf).await.unwrap();
            }
            total
        });
        w.write_all(&[7u8; 8 * 1024]).await.unwrap();
        assert_eq!(drain.await.unwrap(), 8 * 1024);
    }
}
