//! What a connection may cost the relay before it has earned more: two
//! wrappers around its socket.
//!
//! - [`BeforeHello`]: a WebSocket client that has not yet said who it is
//!   can make the relay read (and buffer) at most [`HELLO_BYTES`]. The frame
//!   limit, 1.4 MB by default, is for envelopes, which only an authenticated
//!   session sends; without this bound every unauthenticated connection
//!   could hold a frame that large until the hello timeout.
//! - [`StallLimit`]: a write that makes no progress for its limit (a client
//!   that stopped reading an HTTP answer, a `/sync` page of megabytes say)
//!   fails, and the connection with it, instead of holding its buffers for as
//!   long as the client keeps its window shut.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::metrics::Metrics;

/// Bytes read from a WebSocket connection until its hello is accepted: a
/// hello frame takes a few hundred.
pub const HELLO_BYTES: usize = 16 * 1024;

/// A connection that reads at most [`HELLO_BYTES`] until [`BeforeHello::lift`].
pub struct BeforeHello<S> {
    inner: S,
    /// What it may still read; `None` once lifted.
    left: Option<usize>,
}

impl<S> BeforeHello<S> {
    /// `inner`, read up to [`HELLO_BYTES`] for now.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            left: Some(HELLO_BYTES),
        }
    }

    /// The hello was accepted: reads are no longer counted.
    pub fn lift(&mut self) {
        self.left = None;
    }

    /// Whether reading stopped at [`HELLO_BYTES`].
    pub fn exhausted(&self) -> bool {
        self.left == Some(0)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for BeforeHello<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(left) = this.left else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if left == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {HELLO_BYTES} bytes before the hello was accepted"),
            )));
        }
        // Read into a bounded chunk, then copy: once per connection.
        let mut chunk = [0u8; 4096];
        let want = left.min(buf.remaining()).min(chunk.len());
        let mut bounded = ReadBuf::new(&mut chunk[..want]);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut bounded))?;
        let read = bounded.filled();
        buf.put_slice(read);
        this.left = Some(left - read.len());
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BeforeHello<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connection whose writes fail once one has made no progress for
/// `limit`, counted as a `slow_reader` breach.
pub struct StallLimit<S> {
    inner: S,
    limit: Duration,
    metrics: Arc<Metrics>,
    /// Running while a write, flush or shutdown waits for the peer.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StallLimit<S> {
    /// `inner`, whose stalled writes fail after `limit` and count in `metrics`.
    pub fn new(inner: S, limit: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            limit,
            metrics,
            stalled: None,
        }
    }

    /// `step`'s outcome; a step still pending past the limit is an error.
    fn watch<T>(&mut self, cx: &mut Context<'_>, step: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if step.is_ready() {
            self.stalled = None;
            return step;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        self.stalled = None;
        self.metrics.breach("slow_reader");
        tracing::debug!(
            limit_secs = limit.as_secs(),
            "connection closed: its peer read nothing"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the peer read nothing for {} s; closing its connection",
                limit.as_secs()
            ),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallLimit<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallLimit<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let step = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, step)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let step = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, step)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let step = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, step)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let step = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, step)
    }
}
