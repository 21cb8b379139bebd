//! The HTTP server: our own accept loop around hyper's HTTP/1.1 connections, for plain HTTP and
//! HTTPS alike, because `axum::serve` can bound neither connections nor time.
//!
//! - A connection's clock: one that sends nothing (at open, or between keep-alive requests) is
//!   closed after the idle timeout; one whose request headers have started is closed if they
//!   are not complete within the header timeout; a response the client stops reading is cut
//!   after the idle timeout of no progress. A request body must arrive whole within the body
//!   timeout, else the answer is 408 and the connection closes.
//! - At most `max_connections` connections. A new one beyond it takes the place of the
//!   connection idle the longest (no request in progress), as nginx does with keep-alive
//!   connections; when none is idle, it goes to a small reserve that answers `/healthz` and
//!   `/readyz` only (503 with `Connection: close` otherwise), and beyond the reserve it is
//!   closed at once.
//! - hyper's buffers are bounded per connection ([`MAX_BUF_SIZE`], [`MAX_HEADER_SIZE`], hyper's
//!   100 headers), so memory is bounded by the number of connections.
//! - Errors of `accept` (out of file descriptors, …) neither stop nor spin the loop.
//! - On shutdown it stops accepting, lets in-flight requests finish, and returns once every
//!   connection is closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Method, Request, Response};
use axum::response::IntoResponse as _;
use axum::{BoxError, Router};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::api::ApiError;

/// Largest request head (request line and headers); beyond it hyper answers 431.
pub const MAX_HEADER_SIZE: usize = 32 * 1024;
/// Largest read or write buffer of one connection (hyper's default is about 400 KiB).
pub const MAX_BUF_SIZE: usize = 64 * 1024;
/// Connections beyond `max_connections` that may still ask for `/healthz` and `/readyz`.
pub const HEALTH_RESERVE: usize = 16;
/// Longest a reserve connection may wait for, or take to send, its one request.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(5);
/// File descriptors kept for everything but incoming connections: the database, calls to
/// Meta and Supabase, the certificate and log files.
pub const OTHER_FILES: u64 = 128;
/// Pause after `accept` fails for want of resources (file descriptors, memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connection limits and timeouts (`HTTP_*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From a request's first byte to the end of its headers (`HTTP_HEADER_TIMEOUT_MS`).
    pub header_timeout: Duration,
    /// A connection without a request in progress, or a response not read (`HTTP_IDLE_TIMEOUT_MS`).
    pub idle_timeout: Duration,
    /// From a request's headers to the end of its body (`HTTP_BODY_TIMEOUT_MS`).
    pub body_timeout: Duration,
    /// Connections served at once (`HTTP_MAX_CONNECTIONS`).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

impl Limits {
    /// The limits of a reserve connection: one request, sent promptly.
    fn reserve(self) -> Self {
        Self {
            header_timeout: self.header_timeout.min(RESERVE_TIMEOUT),
            idle_timeout: self.idle_timeout.min(RESERVE_TIMEOUT),
            body_timeout: self.body_timeout.min(RESERVE_TIMEOUT),
            ..self
        }
    }
}

/// The soft and hard limits on open files after raising the soft one to the hard one
/// (`None` where the platform has no such limit or it cannot be read).
pub fn raise_open_files_limit() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        let (before, hard) = match rlimit::Resource::NOFILE.get() {
            Ok(limits) => limits,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the open-files limit");
                return None;
            }
        };
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(soft) => {
                tracing::info!(
                    soft = soft,
                    hard = hard,
                    raised_from = before,
                    "open-files limit (RLIMIT_NOFILE)"
                );
                Some((soft, hard))
            }
            Err(err) => {
                tracing::warn!(error = %err, soft = before, hard = hard, "cannot raise the open-files limit");
                Some((before, hard))
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// `max_connections`, lowered (with a warning) when the open-files limit `soft` cannot hold
/// that many connections, the health reserve and [`OTHER_FILES`].
pub fn fit_connections(max_connections: usize, soft: Option<u64>) -> usize {
    let Some(soft) = soft else {
        return max_connections;
    };
    let room = soft.saturating_sub(OTHER_FILES + HEALTH_RESERVE as u64);
    let room = usize::try_from(room).unwrap_or(usize::MAX).max(1);
    if max_connections > room {
        tracing::warn!(
            configured = max_connections,
            serving = room,
            open_files_limit = soft,
            "HTTP_MAX_CONNECTIONS does not fit the open-files limit; serving fewer connections (raise the hard limit, e.g. LimitNOFILE= or ulimit -n)"
        );
        room
    } else {
        max_connections
    }
}

/// Where TLS connections get the certificate being served (it changes on reload).
pub type Acceptor = Arc<dyn Fn() -> tokio_rustls::TlsAcceptor + Send + Sync>;

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown` is cancelled, then
/// stops accepting and waits for in-flight requests. Handlers see the peer as
/// `ConnectInfo<SocketAddr>`.
///
/// # Errors
/// None today: accept errors are logged and retried; the signature leaves room.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Acceptor>,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let regular = Arc::new(Slots::new(limits.max_connections));
    let reserve = Arc::new(Slots::new(HEALTH_RESERVE));
    let connections = TaskTracker::new();
    let secure = tls.is_some();
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                failing = false;
                accepted
            }
            // The peer gave up before we took the connection: nothing to do.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                if !failing {
                    tracing::error!(error = %err, "cannot accept connections; retrying");
                    failing = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let clock = Arc::new(Clock::new());
        let (slot, health_only) = match regular.admit(&clock) {
            Some(slot) => (slot, false),
            None => match reserve.admit(&clock) {
                Some(slot) => (slot, true),
                // Closed at once: the descriptor is free again.
                None => continue,
            },
        };
        if regular.note_full(health_only) {
            tracing::warn!(
                max_connections = limits.max_connections,
                "connection limit reached: new connections only answer /healthz and /readyz until some close (HTTP_MAX_CONNECTIONS)"
            );
        }
        let limits = if health_only {
            limits.reserve()
        } else {
            limits
        };
        let connection = Connection {
            peer,
            router: router.clone(),
            limits,
            health_only,
            secure,
            clock,
            evicted: slot.evicted.clone(),
            shutdown: shutdown.clone(),
        };
        let tls = tls.clone();
        connections.spawn(async move {
            // Held until the connection closes.
            let _slot = slot;
            connection.run(stream, tls).await;
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors of one connection that `accept` reports; the listener is fine.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One accepted connection and what it needs.
struct Connection {
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    /// A reserve connection: health endpoints only, one request.
    health_only: bool,
    /// Served over TLS (its own answers carry HSTS too).
    secure: bool,
    clock: Arc<Clock>,
    /// Cancelled when a newer connection takes this one's place while it is idle.
    evicted: CancellationToken,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, stream: TcpStream, tls: Option<Acceptor>) {
        // Responses are written whole; no reason to wait for more.
        let _ = stream.set_nodelay(true);
        match tls {
            None => self.serve(stream).await,
            Some(tls) => {
                let handshake =
                    tokio::time::timeout(self.limits.header_timeout, tls().accept(stream));
                let stream = tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    () = self.evicted.cancelled() => return,
                    done = handshake => match done {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    },
                };
                self.serve(stream).await;
            }
        }
    }

    /// HTTP/1.1 on `io`, with the clock watching it.
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            peer,
            router,
            limits,
            health_only,
            secure,
            clock,
            evicted,
            shutdown,
        } = self;
        let io = TokioIo::new(Clocked {
            io,
            clock: clock.clone(),
        });
        let handler = Handler {
            peer,
            router,
            body_timeout: limits.body_timeout,
            health_only,
            secure,
            clock: clock.clone(),
        };
        let service = hyper::service::service_fn(move |request| handler.clone().handle(request));
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            // The clock below does this, starting at the first byte rather than at the wait.
            .header_read_timeout(None)
            .keep_alive(!health_only)
            .max_buf_size(MAX_BUF_SIZE)
            .max_header_size(MAX_HEADER_SIZE);
        let connection = builder.serve_connection(io, service);
        let mut connection = std::pin::pin!(connection);
        let mut draining = false;
        loop {
            let deadline = clock.deadline(&limits);
            let expiry = async move {
                match deadline {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(err) = served {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                    return;
                }
                () = expiry => {
                    if let Some((at, reason)) = clock.deadline(&limits) {
                        if at <= Instant::now() {
                            tracing::debug!(reason, "connection closed");
                            return;
                        }
                    }
                }
                () = clock.changed.notified() => {}
                () = evicted.cancelled() => {
                    tracing::debug!("idle connection closed to make room for a new one");
                    return;
                }
                () = shutdown.cancelled(), if !draining => {
                    // Idle connections close now, busy ones after their response.
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What a connection's requests go through.
#[derive(Clone)]
struct Handler {
    peer: SocketAddr,
    router: Router,
    body_timeout: Duration,
    health_only: bool,
    secure: bool,
    clock: Arc<Clock>,
}

impl Handler {
    async fn handle(self, mut request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let ends = RequestEnd::begin(self.clock.clone());
        if self.health_only && !is_health_check(&request) {
            let refused = self.own_answer(ApiError::Overloaded.into_response());
            return Ok(refused.map(|body| ends.attach(body)));
        }
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let timed_out = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + self.body_timeout;
        let request = request.map(|body| {
            Body::new(BodyDeadline {
                body,
                deadline,
                sleep: None,
                timed_out: timed_out.clone(),
            })
        });
        let response = match self.router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let response = if timed_out.load(Ordering::Relaxed) {
            let mut answer = self.own_answer(
                ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} ms (HTTP_BODY_TIMEOUT_MS)",
                    self.body_timeout.as_millis()
                ))
                .into_response(),
            );
            if let Some(id) = response.headers().get("x-request-id") {
                answer.headers_mut().insert("x-request-id", id.clone());
            }
            answer
        } else {
            response
        };
        Ok(response.map(|body| ends.attach(body)))
    }

    /// An answer of the server's own: the connection closes after it.
    fn own_answer(&self, mut response: Response<Body>) -> Response<Body> {
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        if self.secure {
            headers.insert(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static(crate::tls::HSTS),
            );
        }
        response
    }
}

fn is_health_check(request: &Request<Incoming>) -> bool {
    matches!(*request.method(), Method::GET | Method::HEAD)
        && matches!(request.uri().path(), "/healthz" | "/readyz")
}

/// Where a connection is in its life, for its deadlines.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in progress and no byte of the next one, since then.
    Waiting(Instant),
    /// A request's first bytes arrived then; its headers are not complete.
    Head(Instant),
    /// A request is being handled or its response written.
    Busy,
}

#[derive(Debug)]
struct ClockState {
    phase: Phase,
    /// Since when writing has been blocked (the client does not read).
    write_blocked: Option<Instant>,
}

/// A connection's clock: the reads and writes of [`Clocked`] and the requests of [`Handler`]
/// move it; the connection's task waits for its deadline.
#[derive(Debug)]
struct Clock {
    state: Mutex<ClockState>,
    /// Told when a deadline may have moved earlier.
    changed: Notify,
}

impl Clock {
    fn new() -> Self {
        Self {
            state: Mutex::new(ClockState {
                phase: Phase::Waiting(Instant::now()),
                write_blocked: None,
            }),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the connection is to be closed, and why; `None` while a request is handled.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        let state = self.state();
        let phase = match state.phase {
            Phase::Waiting(since) => Some((since + limits.idle_timeout, "idle")),
            Phase::Head(since) => Some((since + limits.header_timeout, "request headers too slow")),
            Phase::Busy => None,
        };
        let write = state
            .write_blocked
            .map(|since| (since + limits.idle_timeout, "response not read"));
        match (phase, write) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Since when the connection has been idle, if it is.
    fn idle_since(&self) -> Option<Instant> {
        let state = self.state();
        match (state.phase, state.write_blocked) {
            (Phase::Waiting(since), None) => Some(since),
            _ => None,
        }
    }

    fn bytes_read(&self) {
        let mut state = self.state();
        if let Phase::Waiting(_) = state.phase {
            state.phase = Phase::Head(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    fn write(&self, blocked: bool) {
        let mut state = self.state();
        match (blocked, state.write_blocked) {
            (true, None) => {
                state.write_blocked = Some(Instant::now());
                drop(state);
                self.changed.notify_one();
            }
            (false, Some(_)) => state.write_blocked = None,
            _ => {}
        }
    }

    fn request_began(&self) {
        self.state().phase = Phase::Busy;
    }

    fn request_ended(&self) {
        self.state().phase = Phase::Waiting(Instant::now());
        self.changed.notify_one();
    }
}

/// Marks the end of a request (its response written, or given up) when dropped.
struct RequestEnd(Arc<Clock>);

impl RequestEnd {
    fn begin(clock: Arc<Clock>) -> Self {
        clock.request_began();
        Self(clock)
    }

    /// The response body, which hyper drops once it is written.
    fn attach(self, body: Body) -> Body {
        Body::new(EndsRequest { body, _end: self })
    }
}

impl Drop for RequestEnd {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that ends its request when dropped.
struct EndsRequest {
    body: Body,
    _end: RequestEnd,
}

impl http_body::Body for EndsRequest {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The request body, which must arrive whole by `deadline`.
struct BodyDeadline {
    body: Incoming,
    deadline: Instant,
    /// Made when the body is first waited for (most requests never wait).
    sleep: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

/// The request body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl http_body::Body for BodyDeadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from))),
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.timed_out.store(true, Ordering::Relaxed);
                        Poll::Ready(Some(Err(BodyTimedOut.into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's bytes, telling its clock when a request starts and when writes block.
struct Clocked<I> {
    io: I,
    clock: Arc<Clock>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Clocked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Clocked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.clock.write(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.clock.write(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.clock.write(polled.is_pending());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A bounded set of open connections; when full, the one idle the longest makes room.
struct Slots {
    capacity: usize,
    open: Mutex<HashMap<u64, (Arc<Clock>, CancellationToken)>>,
    next_id: AtomicU64,
    /// Set while new connections find no room (for one warning per episode).
    full: AtomicBool,
}

/// A place in [`Slots`], given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    evicted: CancellationToken,
}

impl Slots {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    fn open(&self) -> MutexGuard<'_, HashMap<u64, (Arc<Clock>, CancellationToken)>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a connection with `clock`: a free one, or that of the connection idle the
    /// longest (which is told to close); `None` when every connection is busy.
    fn admit(self: &Arc<Self>, clock: &Arc<Clock>) -> Option<Slot> {
        let mut open = self.open();
        if open.len() >= self.capacity {
            let idlest = open
                .iter()
                .filter_map(|(id, (clock, _))| Some((clock.idle_since()?, *id)))
                .min()
                .map(|(_, id)| id)?;
            if let Some((_, evicted)) = open.remove(&idlest) {
                evicted.cancel();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        open.insert(id, (clock.clone(), evicted.clone()));
        Some(Slot {
            slots: self.clone(),
            id,
            evicted,
        })
    }

    /// Records whether new connections found no room; true when that just began.
    fn note_full(&self, full: bool) -> bool {
        self.full.swap(full, Ordering::Relaxed) != full && full
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_keeps_room_for_other_files_and_the_health_reserve() {
        assert_eq!(fit_connections(1024, None), 1024);
        assert_eq!(fit_connections(1024, Some(1_048_576)), 1024);
        assert_eq!(
            fit_connections(1024, Some(1024)),
            1024 - OTHER_FILES as usize - HEALTH_RESERVE
        );
        assert_eq!(fit_connections(1024, Some(10)), 1);
    }

    #[tokio::test]
    async fn a_full_set_makes_room_by_closing_the_connection_idle_the_longest() {
        let slots = Arc::new(Slots::new(2));
        let (a, b, c) = (
            Arc::new(Clock::new()),
            Arc::new(Clock::new()),
            Arc::new(Clock::new()),
        );
        let first = slots.admit(&a).expect("room");
        let second = slots.admit(&b).expect("room");
        // Both busy: no room.
        a.request_began();
        b.request_began();
        assert!(slots.admit(&c).is_none());
        // The first goes idle, then the second: the first has been idle longer.
        a.request_ended();
        b.request_ended();
        let third = slots.admit(&c).expect("the idlest makes room");
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled());
        drop(first);
        assert_eq!(slots.open().len(), 2);
        drop((second, third));
        assert!(slots.open().is_empty());
    }

    #[test]
    fn a_connection_is_busy_from_its_request_to_the_end_of_its_response() {
        let limits = Limits::default();
        let clock = Clock::new();
        let (_, reason) = clock.deadline(&limits).expect("idle");
        assert_eq!(reason, "idle");
        clock.bytes_read();
        let (_, reason) = clock.deadline(&limits).expect("reading headers");
        assert_eq!(reason, "request headers too slow");
        assert!(clock.idle_since().is_none());
        clock.request_began();
        assert!(clock.deadline(&limits).is_none());
        clock.write(true);
        let (_, reason) = clock.deadline(&limits).expect("blocked");
        assert_eq!(reason, "response not read");
        clock.write(false);
        clock.request_ended();
        assert!(clock.idle_since().is_some());
    }
}
