//! Accepting and holding HTTP connections within fixed bounds, so that clients which connect
//! and never finish a request cannot take the server's descriptors or memory.
//!
//! ```text
//!   accept ──► open < cap? ──yes──► connection task (hyper http1, head timeout, buffer bound)
//!                 │ no                    │ request in service: active
//!                 ▼                       │ between requests / before the first head: idle
//!   evict the connection idle longest ◄───┘ (graceful: a request in flight still finishes)
//!   none idle: close the new connection at once
//! ```
//! * Every connection must send a complete request head within the head timeout of opening
//!   or of its previous response, so a stalled head and an idle keep-alive both end there.
//! * Bytes of an unfinished head are bounded by hyper's read buffer (`max_header_bytes`).
//! * The cap comes from the descriptor limit minus a reserve for files, the database and
//!   uploads, so `accept` does not meet EMFILE; if it does anyway (another process in the
//!   limit's scope), the loop backs off instead of spinning.
//! * Under the cap, an attacker's idle connections are the first evicted: a client that sends
//!   its request right after connecting (a health check, Nix) gets through.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

/// How a listener holds its connections.
#[derive(Clone, Debug)]
pub struct ConnLimits {
    pub head_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

/// Descriptors kept free besides connections: standard streams, the listeners, the runtime's
/// epoll and event descriptors, logs, and a margin.
const BASE_RESERVE: u64 = 64;

/// The connection cap for a process whose descriptor limit is `nofile`: the limit minus the
/// base reserve, two descriptors per upload slot (the staged file and its move into storage)
/// and four per database connection (database, WAL, shared memory, a margin). `None` when the
/// limit leaves fewer than 16 connections.
pub fn connection_cap(nofile: u64, upload_slots: usize, db_connections: usize) -> Option<usize> {
    let reserve = BASE_RESERVE + 2 * upload_slots as u64 + 4 * db_connections as u64;
    // Up to an eighth more may be open for a moment while evicted connections close.
    let cap = nofile.saturating_sub(reserve) / 9 * 8;
    (cap >= 16).then_some(cap.min(1 << 20) as usize)
}

/// The process's soft descriptor limit.
pub fn descriptor_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// One open connection, as the eviction queue sees it.
struct ConnShared {
    /// Requests in service plus response bodies still being sent.
    active: AtomicUsize,
    /// Bumped each time the connection goes idle: a queue entry with an older value is stale.
    idle_round: AtomicU64,
    evicted: AtomicBool,
    evict: Notify,
}

/// Open connections and, oldest first, those idle (waiting for a request head).
#[derive(Default)]
struct Registry {
    /// Connections counted against the cap: open ones not yet asked to close.
    counted: AtomicUsize,
    /// Sockets open, evicted ones included until they have closed.
    live: AtomicUsize,
    idle: Mutex<VecDeque<(Weak<ConnShared>, u64)>>,
    all_closed: Notify,
}

impl Registry {
    fn went_idle(&self, conn: &Arc<ConnShared>) {
        let round = conn.idle_round.fetch_add(1, Ordering::AcqRel) + 1;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.push_back((Arc::downgrade(conn), round));
        // Entries of connections that went busy or closed are skipped lazily; dropping them
        // once they outnumber open connections keeps the queue's size proportional to those.
        let open = self.live.load(Ordering::Relaxed);
        if idle.len() > 2 * open + 64 {
            idle.retain(|(weak, round)| {
                weak.upgrade().is_some_and(|conn| {
                    conn.idle_round.load(Ordering::Acquire) == *round
                        && conn.active.load(Ordering::Acquire) == 0
                })
            });
        }
    }

    /// Asks the connection idle longest to close; false when none is idle.
    fn evict_oldest_idle(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((weak, round)) = idle.pop_front() {
            let Some(conn) = weak.upgrade() else { continue };
            if conn.idle_round.load(Ordering::Acquire) != round
                || conn.active.load(Ordering::Acquire) != 0
                || conn.evicted.swap(true, Ordering::AcqRel)
            {
                continue;
            }
            // It closes within a poll: its place is free for the connection that evicted it.
            self.counted.fetch_sub(1, Ordering::AcqRel);
            conn.evict.notify_one();
            ::metrics::counter!(super::metrics::CONNECTIONS_EVICTED_TOTAL).increment(1);
            return true;
        }
        false
    }
}

/// Marks its connection active from a request's arrival until the end of its response body.
struct ActiveGuard {
    conn: Arc<ConnShared>,
    registry: Arc<Registry>,
}

impl ActiveGuard {
    fn new(conn: &Arc<ConnShared>, registry: &Arc<Registry>) -> Self {
        conn.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard {
            conn: Arc::clone(conn),
            registry: Arc::clone(registry),
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.registry.went_idle(&self.conn);
        }
    }
}

/// A response body that keeps its connection marked active until it is sent (or dropped).
struct GuardedBody {
    inner: Body,
    _guard: ActiveGuard,
}

impl HttpBody for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Errors of `accept` that say the process or system is out of descriptors or memory: retrying
/// at once would spin.
fn is_resource_exhaustion(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Serves `app` on `listener` until `stop` turns true, then closes idle connections, lets
/// requests in flight finish and returns when every connection has closed (the caller bounds
/// that wait with its grace period).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) {
    let registry = Arc::new(Registry::default());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let builder = Arc::new(builder);
    // Evicted connections close within a poll of their task; this bounds how many sockets
    // may be open while a burst of new connections evicts old ones faster than that.
    let hard_cap = limits.max_connections + limits.max_connections / 8 + 1;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) if is_resource_exhaustion(&err) => {
                tracing::warn!("cannot accept connections: {err}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            // The peer gave up between SYN and accept, and the like: nothing to do.
            Err(err) => {
                tracing::debug!("accept failed: {err}");
                continue;
            }
        };
        if registry.counted.load(Ordering::Acquire) >= limits.max_connections
            && !registry.evict_oldest_idle()
        {
            ::metrics::counter!(super::metrics::CONNECTIONS_REFUSED_TOTAL).increment(1);
            drop(stream);
            continue;
        }
        // Give evicted connections a moment to close rather than go over the descriptor
        // budget; if they do not (one had just started a request), the new one is closed.
        let mut waited = 0;
        while registry.live.load(Ordering::Acquire) >= hard_cap && waited < 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            waited += 1;
        }
        if registry.live.load(Ordering::Acquire) >= hard_cap {
            ::metrics::counter!(super::metrics::CONNECTIONS_REFUSED_TOTAL).increment(1);
            drop(stream);
            continue;
        }
        registry.counted.fetch_add(1, Ordering::AcqRel);
        registry.live.fetch_add(1, Ordering::AcqRel);
        ::metrics::gauge!(super::metrics::CONNECTIONS_OPEN).increment(1.0);
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            app.clone(),
            Arc::clone(&builder),
            Arc::clone(&registry),
            stop.clone(),
        ));
    }
    drop(listener);
    loop {
        let closed = registry.all_closed.notified();
        if registry.live.load(Ordering::Acquire) == 0 {
            break;
        }
        closed.await;
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    builder: Arc<hyper::server::conn::http1::Builder>,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) {
    let shared = Arc::new(ConnShared {
        active: AtomicUsize::new(0),
        idle_round: AtomicU64::new(0),
        evicted: AtomicBool::new(false),
        evict: Notify::new(),
    });
    registry.went_idle(&shared);
    let router = TowerToHyperService::new(app);
    let service = {
        let shared = Arc::clone(&shared);
        let registry = Arc::clone(&registry);
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let guard = ActiveGuard::new(&shared, &registry);
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = hyper::service::Service::call(&router, request);
            async move {
                let response = match response.await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|inner| GuardedBody {
                    inner,
                    _guard: guard,
                }))
            }
        })
    };
    let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, "connection ended: {err}");
                }
                break;
            }
            _ = shared.evict.notified(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = stop.wait_for(|stop| *stop), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    if !shared.evicted.swap(true, Ordering::AcqRel) {
        registry.counted.fetch_sub(1, Ordering::AcqRel);
    }
    ::metrics::gauge!(super::metrics::CONNECTIONS_OPEN).decrement(1.0);
    if registry.live.fetch_sub(1, Ordering::AcqRel) == 1 {
        registry.all_closed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_a_reserve_below_the_descriptor_limit() {
        let cap = connection_cap(1024, 64, 5).unwrap();
        let budget = 1024 - 64 - 128 - 20;
        assert_eq!(cap, budget / 9 * 8);
        // With the overshoot allowed while evicted connections close, still within budget.
        assert!(cap + cap / 8 < budget);
        assert!(connection_cap(100, 64, 5).is_none());
        assert_eq!(connection_cap(u64::MAX, 64, 5), Some(1 << 20));
    }
}
