//! `stowix nix push` against a hostile server: answers without end, huge answers, messages full
//! of terminal escape sequences, upload ids that would redirect the next request. The server is
//! a raw HTTP/1.1 listener written here (nothing in between to tidy its answers); the client is
//! the real binary, whose peak memory is read from `/proc/<pid>/status` (VmHWM) while it runs.

mod common;
mod push_common;

use std::io::Read as _;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stowix::cli::exit;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "stx_live_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLmnopqrstuv12";
/// The client's peak RSS must stay under this. A healthy run peaks at a few tens of MiB; an
/// unbounded read of an endless answer passes it within a second on loopback.
const RSS_LIMIT_KIB: u64 = 200 * 1024;
/// Longest a run may take before the test kills it and fails.
const RUN_DEADLINE: Duration = Duration::from_secs(90);
/// What a hostile server puts into every text: a title change, a screen clear, a bell, a C1 CSI,
/// DEL, and a newline that tries to forge a hint line.
const ESCAPES: &str = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31mred\u{7f}\nhint: run rm -rf /";

/// One request as the hostile server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
}

enum Answer {
    /// A complete answer with a Content-Length.
    Full {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// `prefix`, then filler without end (chunked, or with a huge declared Content-Length).
    Endless {
        status: u16,
        prefix: Vec<u8>,
        chunked: bool,
    },
    /// Never read the request body, never answer: a server (or proxy) that stopped reading.
    StopReading,
}

fn json(status: u16, value: serde_json::Value) -> Answer {
    Answer::Full {
        status,
        content_type: "application/json",
        body: serde_json::to_vec(&value).unwrap(),
    }
}

fn info_ok() -> Answer {
    json(
        200,
        serde_json::json!({
            "repository": "main",
            "public_key": "main-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "private": false,
            "token_scope": "push",
            "limits": {
                "max_chunk_bytes": 67108864u64,
                "max_single_upload_bytes": 67108864u64,
                "max_presence_batch": 20000,
                "max_publish_batch": 5000
            }
        }),
    )
}

type Script = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

/// A raw HTTP/1.1 server on loopback: one request per connection, answered by `script`.
struct HostileServer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HostileServer {
    fn start(script: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        {
            let seen = Arc::clone(&seen);
            let _context = runtime.enter();
            let listener = TcpListener::from_std(std_listener).unwrap();
            runtime.spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve(stream, Arc::clone(&script), Arc::clone(&seen)));
                }
            });
        }
        HostileServer {
            url: format!("http://{addr}/main"),
            seen,
            runtime: Some(runtime),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn serve(mut stream: TcpStream, script: Script, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let request = Seen {
        method: first.next().unwrap_or_default().to_owned(),
        path: first.next().unwrap_or_default().to_owned(),
    };
    let mut length = 0usize;
    let mut chunked = false;
    for line in lines {
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    seen.lock().unwrap().push(request.clone());
    let answer = script(&request);
    if let Answer::StopReading = answer {
        tokio::time::sleep(Duration::from_secs(600)).await;
        return;
    }
    // The scripts answer by route alone; the body is read only so the client can finish
    // sending it.
    if chunked {
        read_chunked(&mut stream).await;
    } else {
        let mut body = vec![0u8; length];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
    }
    let _ = write_answer(&mut stream, answer).await;
}

async fn read_chunked(stream: &mut TcpStream) {
    loop {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if stream.read_exact(&mut byte).await.is_err() {
                return;
            }
            line.push(byte[0]);
        }
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16).unwrap_or_default();
        let mut chunk = vec![0u8; size + 2];
        if stream.read_exact(&mut chunk).await.is_err() || size == 0 {
            return;
        }
    }
}

async fn write_answer(stream: &mut TcpStream, answer: Answer) -> std::io::Result<()> {
    match answer {
        Answer::Full {
            status,
            content_type,
            body,
        } => {
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&body).await?;
            stream.shutdown().await
        }
        Answer::StopReading => Ok(()),
        Answer::Endless {
            status,
            prefix,
            chunked,
        } => {
            let framing = if chunked {
                "transfer-encoding: chunked".to_owned()
            } else {
                format!("content-length: {}", 1u64 << 40)
            };
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{framing}\r\nconnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            let filler = vec![b'a'; 64 * 1024];
            let mut first = Some(prefix);
            // Until the client hangs up: the write fails then.
            loop {
                let piece = first.take().unwrap_or_else(|| filler.clone());
                if chunked {
                    stream
                        .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await?;
                    stream.write_all(&piece).await?;
                    stream.write_all(b"\r\n").await?;
                } else {
                    stream.write_all(&piece).await?;
                }
            }
        }
    }
}

/// A finished push with its peak memory.
#[derive(Debug)]
struct Run {
    code: i32,
    stderr: String,
    peak_rss_kib: u64,
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs `stowix nix push` against `url`, watching its peak RSS; kills it (and fails) if it
/// grows past [`RSS_LIMIT_KIB`] or outlives [`RUN_DEADLINE`].
fn push_watched(url: &str, args: &[&str]) -> Run {
    push_watched_with(url, args, &[])
}

fn push_watched_with(url: &str, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let stderr_file = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = push_common::push_command(url, Some(TOKEN), args);
    cmd.envs(envs.iter().copied());
    cmd.stdout(Stdio::null())
        .stderr(stderr_file.reopen().unwrap());
    let mut child: Child = cmd.spawn().expect("run stowix nix push");
    let pid = child.id();
    let started = Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if peak > RSS_LIMIT_KIB || started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            let mut stderr = String::new();
            let _ = stderr_file.reopen().unwrap().read_to_string(&mut stderr);
            panic!(
                "the client reached a peak RSS of {peak} KiB after {:?} (limit {RSS_LIMIT_KIB} KiB, \
                 deadline {RUN_DEADLINE:?}); killed. stderr:\n{stderr}",
                started.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = Vec::new();
    stderr_file
        .reopen()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        peak_rss_kib: peak,
    }
}

fn assert_no_raw_controls(run: &Run) {
    for (i, c) in run.stderr.char_indices() {
        assert!(
            c == '\n' || !c.is_control(),
            "raw control character {c:?} at byte {i} of stderr:\n{:?}",
            run.stderr
        );
    }
    assert!(
        !run.stderr.contains("\nhint: run rm"),
        "a server message forged a line:\n{}",
        run.stderr
    );
}

fn store_path() -> String {
    common::build_text("hostile", &common::nonce())
}

#[test]
fn endless_and_huge_answers_are_refused_with_bounded_memory() {
    let path = store_path();
    // An error body without end (chunked) to the first request.
    let endless_error = HostileServer::start(|_| Answer::Endless {
        status: 500,
        prefix: br#"{"code":"internal","message":""#.to_vec(),
        chunked: true,
    });
    // A success answer declaring a terabyte, to a later request (presence).
    let huge_presence = HostileServer::start(|seen| {
        if seen.path.ends_with("/info") {
            info_ok()
        } else {
            Answer::Endless {
                status: 200,
                prefix: br#"{"missing":[""#.to_vec(),
                chunked: false,
            }
        }
    });
    // The same answer chunked, so no length warns the client in advance.
    let endless_presence = HostileServer::start(|seen| {
        if seen.path.ends_with("/info") {
            info_ok()
        } else {
            Answer::Endless {
                status: 200,
                prefix: br#"{"missing":[""#.to_vec(),
                chunked: true,
            }
        }
    });
    for (server, endpoint) in [
        (&endless_error, "info"),
        (&huge_presence, "presence"),
        (&endless_presence, "presence"),
    ] {
        let run = push_watched(&server.url, &[&path]);
        println!(
            "{endpoint}: exit {}, peak RSS {} KiB",
            run.code, run.peak_rss_kib
        );
        assert_eq!(run.code, exit::UNREACHABLE, "{endpoint}: {}", run.stderr);
        assert!(
            run.stderr
                .contains(&format!("the server's answer to {endpoint} exceeded")),
            "{endpoint}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("is not a Stowix repository"),
            "{}",
            run.stderr
        );
        assert_no_raw_controls(&run);
        assert!(run.peak_rss_kib > 0, "VmHWM was never read");
        assert!(run.peak_rss_kib < RSS_LIMIT_KIB, "{run:?}");
    }
}

#[test]
fn server_messages_reach_the_terminal_escaped() {
    let path = store_path();
    let hash = common::hash_part(&path).to_owned();

    // 401 on the first request: the auth error prints code and message.
    let auth = HostileServer::start(|_| {
        json(
            401,
            serde_json::json!({"code": format!("invalid_token{ESCAPES}"), "message": ESCAPES}),
        )
    });
    let run = push_watched(&auth.url, &[&path]);
    assert_eq!(run.code, exit::AUTH, "{}", run.stderr);
    assert!(run.stderr.contains("\\u{1b}]0;pwned"), "{}", run.stderr);
    assert_no_raw_controls(&run);

    // A repository name and scope with escapes, printed by the scope check.
    let scope = HostileServer::start(|_| {
        let Answer::Full { body, .. } = info_ok() else {
            unreachable!()
        };
        let mut info: serde_json::Value = serde_json::from_slice(&body).unwrap();
        info["repository"] = ESCAPES.into();
        info["token_scope"] = format!("read{ESCAPES}").into();
        json(200, info)
    });
    let run = push_watched(&scope.url, &[&path]);
    assert_eq!(run.code, exit::AUTH, "{}", run.stderr);
    assert!(run.stderr.contains("\\u{9b}31mred"), "{}", run.stderr);
    assert_no_raw_controls(&run);

    // A non-JSON error body (a "proxy page") full of escapes, on a 503 repeated until the
    // info request gives up.
    let page = HostileServer::start(|_| Answer::Full {
        status: 503,
        content_type: "text/html",
        body: format!("<h1>{ESCAPES}</h1>").into_bytes(),
    });
    let run = push_watched(&page.url, &[&path]);
    assert_eq!(run.code, exit::UNREACHABLE, "{}", run.stderr);
    assert!(run.stderr.contains("\\u{1b}[2J"), "{}", run.stderr);
    assert_no_raw_controls(&run);

    // A publication rejection, printed per path.
    let rejection = HostileServer::start(move |seen| {
        if seen.path.ends_with("/info") {
            info_ok()
        } else if seen.path.ends_with("/presence") {
            json(
                200,
                serde_json::json!({"missing": [], "nar_stored": [hash]}),
            )
        } else {
            json(
                200,
                serde_json::json!({
                    "published": [],
                    "already_published": [],
                    "rejected": [{"hash": hash, "code": format!("nar_not_stored{ESCAPES}"), "message": ESCAPES}]
                }),
            )
        }
    });
    let run = push_watched(&rejection.url, &[&path]);
    assert_eq!(run.code, exit::PARTIAL, "{}", run.stderr);
    assert!(run.stderr.contains("\\u{7f}"), "{}", run.stderr);
    assert_no_raw_controls(&run);
}

#[test]
fn upload_ids_that_are_not_stowix_ids_never_reach_a_url() {
    // Big enough for a chunked upload at this chunk size, so the id would go into PATCH URLs.
    let path = common::build_random("hostile-id", 200 * 1024);
    let hash = common::hash_part(&path).to_owned();
    for hostile in ["../../x", "a?b", "0123456789abcdef0123456789abcde/"] {
        let hash = hash.clone();
        let server = HostileServer::start(move |seen| {
            if seen.path.ends_with("/info") {
                info_ok()
            } else if seen.path.ends_with("/presence") {
                json(
                    200,
                    serde_json::json!({"missing": [hash], "nar_stored": []}),
                )
            } else if seen.method == "POST" && seen.path.ends_with("/api/v1/uploads") {
                json(
                    201,
                    serde_json::json!({"upload_id": hostile, "offset": 0, "already_stored": false}),
                )
            } else {
                json(
                    404,
                    serde_json::json!({"code": "not_found", "message": "no such route"}),
                )
            }
        });
        let run = push_watched(&server.url, &[&path, "--chunk-size", "65536"]);
        // Whether a protocol error stops the whole run or only this path is the failure
        // policy's call; it is never a success, and the id never becomes a URL.
        assert!(
            run.code == exit::PARTIAL,
            "{hostile}: exit {}\n{}",
            run.code,
            run.stderr
        );
        assert!(
            run.stderr.contains("is not a Stowix upload id"),
            "{hostile}: {}",
            run.stderr
        );
        let seen = server.seen();
        let allowed = [
            "/main/api/v1/info",
            "/main/api/v1/presence",
            "/main/api/v1/uploads",
        ];
        for request in &seen {
            assert!(
                allowed.contains(&request.path.as_str()),
                "{hostile}: the client requested {} {}; all: {seen:?}",
                request.method,
                request.path
            );
        }
        assert!(
            seen.iter().any(|r| r.path == "/main/api/v1/uploads"),
            "{hostile}: the upload was never created: {seen:?}"
        );
    }
}

#[test]
fn an_unreadable_answer_to_presence_fails_its_paths_with_the_answer_escaped() {
    // A presence answer that is not the JSON the protocol defines fails the paths it was for
    // (the failure policy: only credentials, a vanished repository or server, and a server that
    // is not Stowix end the run), and the answer it quotes reaches the terminal escaped.
    let path = store_path();
    let server = HostileServer::start(|seen| {
        if seen.path.ends_with("/info") {
            info_ok()
        } else {
            Answer::Full {
                status: 200,
                content_type: "application/json",
                body: format!("[\"{ESCAPES}\"]").into_bytes(),
            }
        }
    });
    let run = push_watched(&server.url, &[&path]);
    assert_eq!(run.code, exit::PARTIAL, "{}", run.stderr);
    assert!(
        run.stderr.contains("presence answer could not be read"),
        "{}",
        run.stderr
    );
    assert_no_raw_controls(&run);
}

#[test]
fn an_unexpected_answer_to_info_is_an_internal_failure() {
    // Exit 1 is for what the client cannot make sense of: a repository that answers `info`
    // with a well-formed error the protocol never gives there (not 401/403/404/5xx).
    let path = store_path();
    let server = HostileServer::start(|_| {
        json(
            409,
            serde_json::json!({"code": "offset_mismatch", "message": format!("odd {ESCAPES}")}),
        )
    });
    let run = push_watched(&server.url, &[&path]);
    assert_eq!(run.code, exit::FAILURE, "{}", run.stderr);
    assert!(run.stderr.contains("409"), "{}", run.stderr);
    assert_no_raw_controls(&run);
}

#[test]
fn an_upload_body_the_server_stops_reading_is_abandoned_by_the_watchdog() {
    // 16 MiB of incompressible bytes in one request: far more than loopback socket buffers
    // hold, so the body stops moving once the server stops reading.
    let path = common::build_random("unread", 16 << 20);
    let hash = common::hash_part(&path).to_owned();
    let uploads = Arc::new(Mutex::new(0u32));
    let counter = Arc::clone(&uploads);
    let server = HostileServer::start(move |seen| {
        if seen.path.ends_with("/info") {
            info_ok()
        } else if seen.path.ends_with("/presence") {
            json(
                200,
                serde_json::json!({"missing": [hash], "nar_stored": []}),
            )
        } else if seen.path.contains("/api/v1/nars") {
            let mut count = counter.lock().unwrap();
            *count += 1;
            if *count == 1 {
                Answer::StopReading
            } else {
                // The retry is refused for good, which ends the test quickly.
                json(
                    422,
                    serde_json::json!({"code": "bad_request", "message": "refused"}),
                )
            }
        } else {
            json(
                404,
                serde_json::json!({"code": "not_found", "message": "no"}),
            )
        }
    });
    let run = push_watched_with(
        &server.url,
        &["--chunk-size", "33554432", &path],
        &[("STOWIX_STALL_TIMEOUT_SECS", "2")],
    );
    let stderr = &run.stderr;
    assert_eq!(*uploads.lock().unwrap(), 2, "no second attempt:\n{stderr}");
    assert!(
        stderr.contains("upload stalled: no progress for 2 s"),
        "{stderr}"
    );
    assert_eq!(run.code, exit::PARTIAL, "{stderr}");
}
