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
//! `times` matching requests (or a fraction of them), so a test says exactly what breaks. Each
//! rule counts its own faults ([`FaultProxy::faults_of`]), so a test with several rules can
//! assert that every one of them fired. Every random choice comes from a seed printed when the
//! proxy starts; `STOWIX_FAULT_SEED=<seed>` replays it.
//!
//! The proxy also logs the upload protocol as it passes ([`FaultProxy::events`]): each `PATCH`
//! with the offset it starts at and the bytes it delivered, and each answer carrying an
//! `Upload-Offset`, so a test can check that the client always resumes where the server said.
//!
//! Why a TCP relay in front: an HTTP server cannot break a connection without answering (axum
//! sends the status line before it sees a body error, so a "cut" would look like a `200` with a
//! truncated body). The relay owns the client's socket, so a cut is a real reset with no answer
//! head at all, which is what a client sees when a proxy or the network dies mid-request.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
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
    /// Apply to exactly `k` of every `n` matching requests, at positions drawn from the seed:
    /// unlike a probability, a run with at least `n` matching requests cannot miss the fault.
    pub fraction: Option<(u64, u64)>,
    /// Let this many matching requests through before the rule starts applying.
    pub skip: u64,
    /// Only requests whose `Upload-Offset` header is a multiple of this, and only the first
    /// one at each offset: the first attempt of each chunk, when this is the chunk size.
    pub offset_multiple_of: Option<u64>,
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
            fraction: None,
            skip: 0,
            offset_multiple_of: None,
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
    pub fn fraction(mut self, k: u64, n: u64) -> Self {
        assert!(k <= n && n > 0, "fraction {k} of {n}");
        self.fraction = Some((k, n));
        self
    }
    pub fn skip(mut self, skip: u64) -> Self {
        self.skip = skip;
        self
    }
    pub fn on_offset_multiple_of(mut self, n: u64) -> Self {
        self.offset_multiple_of = Some(n);
        self
    }
}

/// A rule in force, with its own counters and random stream (seeded from the proxy's seed
/// and the rule's position, so one rule's choices do not depend on how often another drew).
struct ActiveRule {
    rule: Rule,
    /// Matching requests seen (including skipped ones and ones the coin spared).
    matched: u64,
    /// Requests the rule was applied to (what `times` limits).
    used: u64,
    /// Faults that really happened (a cut of a body shorter than the cut point is none).
    injected: u64,
    rng: StdRng,
    /// The current block of a `fraction` rule: true where the fault applies.
    deck: Vec<bool>,
    /// Offsets an `offset_multiple_of` rule has seen.
    offsets_seen: HashSet<u64>,
}

impl ActiveRule {
    fn new(rule: Rule, seed: u64, index: usize) -> Self {
        ActiveRule {
            rule,
            matched: 0,
            used: 0,
            injected: 0,
            rng: StdRng::seed_from_u64(
                seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            deck: Vec::new(),
            offsets_seen: HashSet::new(),
        }
    }

    /// Draws whether this matching request gets the fault.
    fn draw(&mut self) -> bool {
        if let Some((k, n)) = self.rule.fraction {
            if self.deck.is_empty() {
                let mut deck: Vec<bool> = (0..n).map(|i| i < k).collect();
                deck.shuffle(&mut self.rng);
                // Drawn from the end: reverse so the block is dealt in the shuffled order.
                deck.reverse();
                self.deck = deck;
            }
            return self.deck.pop().expect("refilled above");
        }
        self.rule.probability >= 1.0 || self.rng.gen::<f64>() < self.rule.probability
    }
}

/// What the proxy saw of the upload protocol, in order.
#[derive(Clone, Debug)]
pub enum Event {
    /// A `PATCH` of upload `id` declaring `offset`; `delivered` body bytes reached the server,
    /// and `cut` says whether the proxy cut the body (the client then got no answer).
    Patch {
        id: String,
        offset: u64,
        delivered: u64,
        cut: bool,
    },
    /// An answer the client received that names the offset the server holds for upload `id`.
    Offset { id: String, offset: u64 },
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
    seed: u64,
    rules: Mutex<Vec<ActiveRule>>,
    conn_rule: Mutex<Option<(ConnRule, u64)>>,
    /// Relayed connections by the local address of their socket to the HTTP proxy (which is
    /// the peer address the proxy sees).
    kills: Mutex<HashMap<SocketAddr, Kill>>,
    faults_injected: AtomicU64,
    /// Connections reset by the connection rule.
    connection_faults: AtomicU64,
    requests: AtomicU64,
    connections: AtomicU64,
    events: Mutex<Vec<Event>>,
}

pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: put the repository name after it.
    pub url: String,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`) on its own runtime, with the seed
    /// from `STOWIX_FAULT_SEED` or a random one (printed either way).
    pub fn start(upstream: &str, rules: Vec<Rule>) -> FaultProxy {
        let seed = match std::env::var("STOWIX_FAULT_SEED") {
            Ok(text) => text
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("STOWIX_FAULT_SEED={text:?} is not a u64")),
            Err(_) => rand::random(),
        };
        eprintln!("fault proxy seed: {seed} (replay with STOWIX_FAULT_SEED={seed})");
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
            seed,
            rules: Mutex::new(activate(rules, seed)),
            conn_rule: Mutex::new(None),
            kills: Mutex::new(HashMap::new()),
            faults_injected: AtomicU64::new(0),
            connection_faults: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            events: Mutex::new(Vec::new()),
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
        *self.shared.rules.lock().unwrap() = activate(rules, self.shared.seed);
    }

    /// The seed of every random choice of this proxy.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// Faults rule number `index` (in the order given) really injected.
    pub fn faults_of(&self, index: usize) -> u64 {
        self.shared.rules.lock().unwrap()[index].injected
    }

    /// Connections the connection rule reset.
    pub fn connection_faults(&self) -> u64 {
        self.shared.connection_faults.load(Ordering::SeqCst)
    }

    /// The upload protocol as it passed, in order.
    pub fn events(&self) -> Vec<Event> {
        self.shared.events.lock().unwrap().clone()
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

fn activate(rules: Vec<Rule>, seed: u64) -> Vec<ActiveRule> {
    rules
        .into_iter()
        .enumerate()
        .map(|(index, rule)| ActiveRule::new(rule, seed, index))
        .collect()
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
                shared.connection_faults.fetch_add(1, Ordering::SeqCst);
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

/// The rule (by index) that applies to this request, if any.
fn pick_fault(
    shared: &Shared,
    method: &str,
    path: &str,
    upload_offset: Option<u64>,
) -> Option<(usize, Fault)> {
    let mut rules = shared.rules.lock().unwrap();
    for (index, active) in rules.iter_mut().enumerate() {
        let rule = &active.rule;
        let offset_matches = match (rule.offset_multiple_of, upload_offset) {
            (None, _) => true,
            (Some(n), Some(offset)) => offset % n == 0 && !active.offsets_seen.contains(&offset),
            (Some(_), None) => false,
        };
        let matches = (rule.method.is_empty() || rule.method.eq_ignore_ascii_case(method))
            && path.contains(&rule.path_filter)
            && (rule.except_path.is_empty() || !path.contains(&rule.except_path))
            && offset_matches
            && active.used < rule.times;
        if !matches {
            continue;
        }
        if let Some(offset) = upload_offset.filter(|_| rule.offset_multiple_of.is_some()) {
            active.offsets_seen.insert(offset);
        }
        active.matched += 1;
        if active.matched <= active.rule.skip {
            continue;
        }
        if active.draw() {
            active.used += 1;
            active.injected += 1;
            shared.faults_injected.fetch_add(1, Ordering::SeqCst);
            return Some((index, active.rule.fault.clone()));
        }
    }
    None
}

/// The upload id in a path `.../api/v1/uploads/<id>[/complete][?...]`.
fn upload_id_in(path: &str) -> Option<String> {
    let rest = path.split("/api/v1/uploads/").nth(1)?;
    let id = rest.split(['/', '?']).next()?;
    (!id.is_empty()).then(|| id.to_string())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
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
    let upload_offset = header_u64(request.headers(), "upload-offset");
    let picked = pick_fault(&shared, method.as_str(), &path, upload_offset);
    let rule_index = picked.as_ref().map(|(index, _)| *index);
    let fault = picked.map(|(_, fault)| fault);
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
    let declared_length = header_u64(request.headers(), "content-length");
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
        if let Some(index) = rule_index {
            shared.rules.lock().unwrap()[index].injected -= 1;
        }
    }
    if method == axum::http::Method::PATCH {
        if let (Some(id), Some(offset)) = (upload_id_in(&path), upload_offset) {
            shared.events.lock().unwrap().push(Event::Patch {
                id,
                offset,
                delivered: pieces
                    .iter()
                    .map(|p| p.as_ref().map_or(0, |b| b.len() as u64))
                    .sum(),
                cut,
            });
        }
    }
    if cut {
        let delivered: Vec<u8> = pieces
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .flat_map(|b| b.iter().copied())
            .collect();
        send_cut_request(
            &shared,
            &method,
            &path,
            &headers,
            declared_length,
            &delivered,
        )
        .await;
        // The server got the first bytes, then the end of its connection, and answered; only
        // now the client's connection is reset, with no answer head at all.
        kill_connection(&shared, peer).await;
        return (StatusCode::BAD_GATEWAY, "injected cut (never delivered)").into_response();
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
    if path.contains("/api/v1/uploads") {
        // Upload states and errors are small JSON: read whole to learn the offset the server
        // names (the `Upload-Offset` header, or `offset` of a 409) and the id of a new upload.
        let body = match upstream.bytes().await {
            Ok(body) => body,
            Err(err) => {
                return (
                    StatusCode::BAD_GATEWAY,
                    format!("proxy: upstream body failed: {err}"),
                )
                    .into_response()
            }
        };
        let json = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
        let offset = header_u64(&headers, "upload-offset").or_else(|| json["offset"].as_u64());
        let id = json["upload_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .or_else(|| upload_id_in(&path));
        if let (Some(id), Some(offset)) = (id, offset) {
            shared
                .events
                .lock()
                .unwrap()
                .push(Event::Offset { id, offset });
        }
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        return response;
    }
    let mut response = Response::new(Body::from_stream(upstream.bytes_stream()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Sends `method path` upstream on a connection of its own, announcing `declared_length` body
/// bytes but sending only `delivered`, then closes the sending side and waits for the answer.
/// A clean close (FIN) rather than an aborted request (which may reset the connection and make
/// the server's kernel drop bytes it had not read yet): the server reads every delivered byte
/// before it sees the body end early, so the test knows exactly what it received.
async fn send_cut_request(
    shared: &Shared,
    method: &axum::http::Method,
    path: &str,
    headers: &HeaderMap,
    declared_length: Option<u64>,
    delivered: &[u8],
) {
    let addr = shared.upstream.trim_start_matches("http://");
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return;
    };
    let length = declared_length.unwrap_or(delivered.len() as u64 + 1);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {length}\r\n"
    );
    for (name, value) in headers {
        if let Ok(value) = value.to_str() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).await.is_err()
        || stream.write_all(delivered).await.is_err()
        || stream.shutdown().await.is_err()
    {
        return;
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer)).await;
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
