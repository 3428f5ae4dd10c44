//! A fault-injecting proxy for the tests: sits between `stowix nix push` and `stowix serve` on
//! loopback and breaks traffic in the ways real networks, proxies and storage front-ends do.
//!
//! ```text
//!   stowix nix push ──► TCP relay (127.0.0.1:0) ──► HTTP proxy (axum) ──► stowix serve
//!                          │ per connection:           │ per request: consult the rules, count, then
//!                          ├─ relay untouched          ├─ forward untouched
//!                          ├─ reset (RST) after N      ├─ answer 429/503 (± Retry-After) or 500 itself
//!                          │  client bytes             ├─ forward, then stall the answer
//!                          └─ killed on the HTTP       ├─ forward only the first N body bytes, then cut
//!                             proxy's request ◄────────┤  the client's connection (no answer at all)
//!                                                      └─ forward, but answer 500 (work done, answer lost)
//! ```
//! Request rules apply to requests whose path contains `path_filter` (empty: all), for the first
//! `times` matching requests (or a fraction of them), so a test says exactly what breaks.
//!
//! Why a TCP relay in front: an HTTP server cannot break a connection without answering (axum
//! sends the status line before it sees a body error, so a "cut" would look like a `200` with a
//! truncated body). The relay owns the client's socket, so a cut is a real reset with no answer
//! head at all, which is what a client sees when a proxy or the network dies mid-request.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status without forwarding, with an optional `Retry-After` (seconds).
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Forward the request, then hold the answer back this long before sending it.
    Stall(Duration),
    /// Forward only the first `bytes` of the request body to the server (which keeps what it
    /// received), then reset the client's connection without any answer.
    CutBodyAfter { bytes: u64 },
    /// Forward the request and let the server act on it, but answer 500 instead.
    LoseAnswer,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub fault: Fault,
    /// Only requests whose path (and query) contains this.
    pub path_filter: String,
    /// Never requests whose path contains this (empty: no exception).
    pub except_path: String,
    /// Only requests with this method (empty: any).
    pub method: String,
    /// Apply to at most this many matching requests.
    pub times: u64,
    /// Apply to each matching request with this probability (1.0: always).
    pub probability: f64,
}

impl Rule {
    pub fn new(fault: Fault) -> Self {
        Rule {
            fault,
            path_filter: String::new(),
            except_path: String::new(),
            method: String::new(),
            times: u64::MAX,
            probability: 1.0,
        }
    }
    pub fn on_path(mut self, filter: &str) -> Self {
        self.path_filter = filter.to_string();
        self
    }
    pub fn except_path(mut self, filter: &str) -> Self {
        self.except_path = filter.to_string();
        self
    }
    pub fn on_method(mut self, method: &str) -> Self {
        self.method = method.to_string();
        self
    }
    pub fn times(mut self, times: u64) -> Self {
        self.times = times;
        self
    }
    pub fn probability(mut self, probability: f64) -> Self {
        self.probability = probability;
        self
    }
}

/// A fault of whole TCP connections, applied by the relay.
#[derive(Clone, Debug)]
pub struct ConnRule {
    /// Reset (RST) the connection once the client has sent this many bytes on it; the bytes
    /// up to the limit are delivered.
    pub reset_after_bytes: u64,
    /// Apply to at most this many connections (counted from when the rule was set).
    pub times: u64,
}

/// The kill switch of one relayed connection: the HTTP proxy sends an acknowledgement channel,
/// the relay resets both sides and then acknowledges.
type Kill = oneshot::Sender<oneshot::Sender<()>>;

struct Shared {
    upstream: String,
    client: reqwest::Client,
    rules: Mutex<Vec<(Rule, u64)>>,
    conn_rule: Mutex<Option<(ConnRule, u64)>>,
    /// Relayed connections by the local address of their socket to the HTTP proxy (which is
    /// the peer address the proxy sees).
    kills: Mutex<HashMap<SocketAddr, Kill>>,
    faults_injected: AtomicU64,
    requests: AtomicU64,
    connections: AtomicU64,
}

pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: put the repository name after it.
    pub url: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`) on its own runtime.
    pub fn start(upstream: &str, rules: Vec<Rule>) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("proxy client"),
            rules: Mutex::new(rules.into_iter().map(|r| (r, 0)).collect()),
            conn_rule: Mutex::new(None),
            kills: Mutex::new(HashMap::new()),
            faults_injected: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        // Bound with std and handed over, so a test may start the proxy from async code.
        let bind = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            listener
        };
        let (http_listener, front) = {
            let _context = runtime.enter();
            (
                TcpListener::from_std(bind()).expect("proxy listener"),
                TcpListener::from_std(bind()).expect("relay listener"),
            )
        };
        let http_addr = http_listener.local_addr().unwrap();
        let front_addr = front.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&shared));
        runtime.spawn(async move {
            let _ = axum::serve(
                http_listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        let relay_shared = Arc::clone(&shared);
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = front.accept().await else {
                    continue;
                };
                let shared = Arc::clone(&relay_shared);
                tokio::spawn(relay(client, http_addr, shared));
            }
        });
        FaultProxy {
            url: format!("http://{front_addr}"),
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn set_rules(&self, rules: Vec<Rule>) {
        *self.shared.rules.lock().unwrap() = rules.into_iter().map(|r| (r, 0)).collect();
    }

    /// Resets the next `times` new connections after `bytes` client bytes each.
    pub fn reset_connections_after(&self, bytes: u64, times: u64) {
        *self.shared.conn_rule.lock().unwrap() = Some((
            ConnRule {
                reset_after_bytes: bytes,
                times,
            },
            0,
        ));
    }

    /// How many requests or connections got a fault so far: a test asserts this is > 0, so it
    /// cannot pass without the fault having happened.
    pub fn faults_injected(&self) -> u64 {
        self.shared.faults_injected.load(Ordering::SeqCst)
    }

    /// Requests that reached the HTTP proxy.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted by the relay.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Copies one client connection to the HTTP proxy and back, until either side closes, the
/// connection rule resets it, or the HTTP proxy kills it.
async fn relay(client: TcpStream, http_addr: SocketAddr, shared: Arc<Shared>) {
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let Ok(upstream) = TcpStream::connect(http_addr).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let limit = {
        let mut rule = shared.conn_rule.lock().unwrap();
        match rule.as_mut() {
            Some((rule, used)) if *used < rule.times => {
                *used += 1;
                Some(rule.reset_after_bytes)
            }
            _ => None,
        }
    };
    let local = upstream.local_addr().expect("relay socket address");
    let (kill_tx, kill_rx) = oneshot::channel::<oneshot::Sender<()>>();
    shared.kills.lock().unwrap().insert(local, kill_tx);

    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let to_server = async {
        let mut sent = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = upstream_write.shutdown().await;
                    // The answer may still be on its way: let the other direction finish.
                    std::future::pending::<()>().await;
                    return false;
                }
                Ok(n) => n,
            };
            if let Some(limit) = limit {
                if sent + n as u64 >= limit {
                    let keep = (limit - sent) as usize;
                    let _ = upstream_write.write_all(&buf[..keep]).await;
                    return true;
                }
            }
            sent += n as u64;
            if upstream_write.write_all(&buf[..n]).await.is_err() {
                return false;
            }
        }
    };
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match upstream_read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = client_write.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let mut ack = None;
    tokio::select! {
        reset = to_server => {
            if reset {
                shared.faults_injected.fetch_add(1, Ordering::SeqCst);
            }
        }
        () = to_client => {}
        killed = kill_rx => { ack = killed.ok(); }
    }
    shared.kills.lock().unwrap().remove(&local);
    // Reset, not a clean close: the client must see a broken connection, never an answer.
    let client = client_read.reunite(client_write).expect("same socket");
    let _ = client.set_zero_linger();
    drop(client);
    let upstream = upstream_read.reunite(upstream_write).expect("same socket");
    let _ = upstream.set_zero_linger();
    drop(upstream);
    if let Some(ack) = ack {
        let _ = ack.send(());
    }
}

fn pick_fault(shared: &Shared, method: &str, path: &str) -> Option<Fault> {
    let mut rules = shared.rules.lock().unwrap();
    for (rule, used) in rules.iter_mut() {
        let matches = (rule.method.is_empty() || rule.method.eq_ignore_ascii_case(method))
            && path.contains(&rule.path_filter)
            && (rule.except_path.is_empty() || !path.contains(&rule.except_path))
            && *used < rule.times;
        if matches && rand::random::<f64>() < rule.probability {
            *used += 1;
            shared.faults_injected.fetch_add(1, Ordering::SeqCst);
            return Some(rule.fault.clone());
        }
    }
    None
}

/// Resets the client connection that carried the request from `peer`, and waits until it is
/// gone so nothing this handler returns can reach the client.
async fn kill_connection(shared: &Shared, peer: SocketAddr) {
    let kill = shared.kills.lock().unwrap().remove(&peer);
    if let Some(kill) = kill {
        let (ack_tx, ack_rx) = oneshot::channel();
        if kill.send(ack_tx).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), ack_rx).await;
        }
    }
}

async fn forward(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let fault = pick_fault(&shared, method.as_str(), &path);
    if let Some(Fault::Status {
        status,
        retry_after,
    }) = &fault
    {
        let mut response = (
            StatusCode::from_u16(*status).unwrap(),
            format!("injected {status}"),
        )
            .into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(*seconds));
        }
        return response;
    }
    let headers = copy_headers(request.headers());
    let limit = match &fault {
        Some(Fault::CutBodyAfter { bytes }) => Some(*bytes),
        _ => None,
    };
    // The (possibly cut) body is collected before forwarding: bodies in these tests are at most
    // a few MiB (tests set a small chunk size), and collecting keeps the cut exact.
    let mut body_stream = request.into_body().into_data_stream();
    let mut pieces: Vec<Result<bytes::Bytes, std::io::Error>> = Vec::new();
    let mut sent = 0u64;
    let mut cut = false;
    while let Some(piece) = body_stream.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(err) => {
                pieces.push(Err(std::io::Error::other(err.to_string())));
                break;
            }
        };
        if let Some(limit) = limit {
            if sent + piece.len() as u64 > limit {
                let keep = (limit - sent) as usize;
                pieces.push(Ok(piece.slice(..keep)));
                pieces.push(Err(std::io::Error::other("injected cut")));
                cut = true;
                break;
            }
        }
        sent += piece.len() as u64;
        pieces.push(Ok(piece));
    }
    if limit.is_some() && !cut {
        // The body was shorter than the cut point: this request passes untouched (the rule
        // still counted it, so say so in the count of injected faults).
        shared.faults_injected.fetch_sub(1, Ordering::SeqCst);
    }
    let upstream_body = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
    let url = format!("{}{}", shared.upstream, path);
    let upstream = shared
        .client
        .request(method, url)
        .headers(headers)
        .body(upstream_body)
        .send()
        .await;
    if cut {
        // The server got the first bytes and a broken body; the client gets a reset and no
        // answer head at all.
        kill_connection(&shared, peer).await;
        return (StatusCode::BAD_GATEWAY, "injected cut (never delivered)").into_response();
    }
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(err) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("proxy: upstream failed: {err}"),
            )
                .into_response()
        }
    };
    match fault {
        Some(Fault::Stall(duration)) => tokio::time::sleep(duration).await,
        Some(Fault::LoseAnswer) => {
            let _ = upstream.bytes().await;
            return (StatusCode::INTERNAL_SERVER_ERROR, "injected: answer lost").into_response();
        }
        _ => {}
    }
    let status = upstream.status();
    let headers = copy_headers(upstream.headers());
    let mut response = Response::new(Body::from_stream(upstream.bytes_stream()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn copy_headers(from: &HeaderMap) -> HeaderMap {
    let mut to = HeaderMap::new();
    for (name, value) in from {
        // Hop-by-hop headers and the length are the transport's business on each side.
        if matches!(
            name.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "host"
        ) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
    to
}
