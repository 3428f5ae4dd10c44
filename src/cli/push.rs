//! `stowix nix push`: flags, offline validation, and the mapping from outcomes to exit codes.
//!
//! ```text
//!   args ──► validate target, token, paths (offline, exit USAGE) ──► GET info (AUTH / UNREACHABLE)
//!        ──► push::run (pipeline) ──► summary ──► metrics push ──► exit SUCCESS / PARTIAL / …
//! ```

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::exit;
use crate::client::{
    self, ClientConfig, ClientError, PushClient, RateLimits, RepoUrl, RetryPolicy, Token,
};
use crate::nix::signing::PublicKey;
use crate::push::compress::{self, Compression};
use crate::push::report::{LineReporter, Reporter, TerminalReporter};
use crate::push::{
    self, closure, metrics as push_metrics, ClosureError, CompressConfig, Progress, PushConfig,
    PushError, Roots,
};

/// Uploads in flight. Small NARs are latency-bound (one request each), so a dozen or more in
/// flight keep a 100 ms link busy; large ones share the bandwidth anyway. Memory is one chunk
/// (8 MiB) per job: 128 MiB at 16, fine on any build machine from 2 to 64 cores.
const DEFAULT_JOBS: usize = 16;
/// xz preset. Measured (docs/benchmarks.md): the fastest preset that keeps the stored size
/// within 5% of `nix copy`'s preset 6 on a closure of real binaries (+4.3%, 5.2x faster on 2
/// cores); preset 1 is faster but stores more, and bytes stored are paid by every download.
const DEFAULT_XZ_LEVEL: i32 = 2;
/// How often a watcher that starts before its server asks it again.
const CONNECT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);
/// The job name under which metrics are pushed to a Prometheus push gateway.
const PUSH_GATEWAY_JOB: &str = "stowix_push";

/// A token from the command line or environment; `Debug` never shows it, and clap never
/// echoes it because it is validated after parsing, not by clap.
#[derive(Clone)]
pub struct SecretArg(String);

impl From<String> for SecretArg {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit codes: 0 success, 2 usage, 3 auth, 4 some paths or input lines failed, 5 nix, 6 server unreachable, 7 server storage full, 130 interrupted."
)]
pub struct PushArgs {
    /// Store paths to push with their closures: /nix/store/…, symlinks to them such as
    /// ./result, or paths below a store path (pushed as the whole store path).
    #[arg(value_name = "STORE_PATH", required_unless_present = "stdin")]
    pub paths: Vec<String>,

    /// Read more store paths from standard input, one per line; they are pushed as they arrive.
    #[arg(long)]
    pub stdin: bool,

    /// After the push, pin the STORE_PATH arguments under NAME as its next revision: pinned
    /// paths keep their whole closure whatever the repository's retention policy. Only a push
    /// that published every path pins.
    #[arg(long, value_name = "NAME", conflicts_with = "stdin", value_parser = parse_pin_name)]
    pub pin: Option<String>,

    /// With --pin: keep only the newest N revisions of the pin (this one included).
    #[arg(long, value_name = "N", requires = "pin", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,

    #[command(flatten)]
    pub flags: PushFlags,
}

pub(crate) fn parse_pin_name(text: &str) -> Result<String, String> {
    crate::api::check_pin_name(text).map(|()| text.to_owned())
}

/// Which repository, and the push token for it: every command that talks to the push API.
#[derive(clap::Args, Debug)]
pub struct RepoArgs {
    /// Full URL of the repository, e.g. https://cache.example.com/myrepo.
    #[arg(long, env = "STOWIX_TARGET", value_name = "URL")]
    pub target: Option<String>,

    /// API token with push scope (stx_live_…). Prefer the environment variable: arguments are
    /// visible to other users in the process list.
    #[arg(
        long,
        env = "STOWIX_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<SecretArg>,
}

impl RepoArgs {
    /// The repository URL and token, checked offline; `Err(code)` after printing the usage
    /// error (exit 2).
    pub(crate) fn check(&self) -> Result<(RepoUrl, Token), i32> {
        let Some(target) = self.target.as_deref() else {
            return Err(fail(
                exit::USAGE,
                "no repository given\nhint: pass --target URL or set STOWIX_TARGET, e.g. https://cache.example.com/myrepo",
            ));
        };
        let repo = RepoUrl::parse(target)
            .map_err(|err| fail(exit::USAGE, format!("invalid --target: {err}")))?;
        let Some(SecretArg(token_text)) = &self.token else {
            return Err(fail(
                exit::USAGE,
                "no token given\nhint: pass --token or set STOWIX_TOKEN to a token with push scope for this repository",
            ));
        };
        let token = Token::parse(token_text).map_err(|err| fail(exit::USAGE, err))?;
        Ok((repo, token))
    }
}

/// Every flag of `stowix nix push` that is not about which paths: shared with `watch-store`
/// and `watch-exec`, which push through the same pipeline.
#[derive(clap::Args, Debug)]
pub struct PushFlags {
    #[command(flatten)]
    pub repo: RepoArgs,

    /// One line per path per event: present, compressed, uploaded, published, failed.
    #[arg(long, short)]
    pub verbose: bool,

    /// Uploads in flight.
    #[arg(long, short, env = "STOWIX_JOBS", default_value_t = DEFAULT_JOBS,
          value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..=1024), |n| n as usize))]
    pub jobs: usize,

    /// How NARs are compressed: xz (the smallest files: for storage and substituters'
    /// bandwidth), zstd (~11x faster to push, ~17% larger: for a slow CPU or a fast uplink)
    /// or none.
    #[arg(long, env = "STOWIX_COMPRESSION", default_value = "xz", value_name = "METHOD",
          value_parser = clap::builder::ValueParser::new(|text: &str| text.parse::<Compression>()))]
    pub compression: Compression,

    /// The method's own level: xz 0 (fastest) to 9 (smallest) [default: 2]; zstd 1 to 19
    /// [default: 3]; none takes no level.
    #[arg(
        long,
        env = "STOWIX_COMPRESSION_LEVEL",
        value_name = "LEVEL",
        allow_negative_numbers = true
    )]
    pub compression_level: Option<i32>,

    /// Threads compressing [default: available cores].
    #[arg(long, env = "STOWIX_COMPRESSION_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub compression_threads: Option<u32>,

    /// Send every NAR in a request of its own. By default NARs of up to 256 KiB go in batches
    /// of up to 512 per request (`POST api/v1/nar-batch`), which is what makes a closure of
    /// thousands of small paths fast.
    #[arg(long, env = "STOWIX_NO_BATCH")]
    pub no_batch: bool,

    /// Upload bandwidth limit in bytes per second: 500K, 50MiB, 1G (K/M/G and KiB/MiB/GiB are
    /// powers of 1024; KB/MB/GB powers of 1000).
    #[arg(long, env = "STOWIX_MAX_UPLOAD_RATE", value_name = "RATE", value_parser = parse_size)]
    pub max_upload_rate: Option<u64>,

    /// Most requests per second to the server.
    #[arg(long, env = "STOWIX_MAX_REQUESTS_PER_SECOND", value_name = "N")]
    pub max_requests_per_second: Option<NonZeroU32>,

    /// Serve Prometheus metrics on this address while the push runs, e.g. 127.0.0.1:9464.
    #[arg(long, env = "STOWIX_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Push the final metrics to this Prometheus push gateway (job "stowix_push").
    #[arg(long, env = "STOWIX_METRICS_PUSH_GATEWAY", value_name = "URL")]
    pub metrics_push_gateway: Option<String>,

    /// No progress bar, even on a terminal: plain lines and a status line every 10 s.
    #[arg(long, env = "STOWIX_NO_PROGRESS")]
    pub no_progress: bool,

    /// How long the server may answer nothing before the push gives up (exit 6): seconds, or
    /// a duration such as 90s or 2m. Meanwhile the push pauses and resumes when the server
    /// answers again.
    #[arg(long, env = "STOWIX_RETRY_TIMEOUT", value_name = "DURATION",
          default_value = "120s", value_parser = push::failure::parse_duration)]
    pub retry_timeout: std::time::Duration,

    /// Public key (`name:base64`) of an upstream cache: paths it signed are not pushed (Nix
    /// gets them from that cache). Adds to the repository's own upstream keys (`stowix admin
    /// repo show`); repeat for several.
    #[arg(
        long = "upstream-key",
        env = "STOWIX_UPSTREAM_KEYS",
        value_delimiter = ' ',
        value_name = "KEY"
    )]
    pub upstream_keys: Vec<String>,

    /// Push every path, including those an upstream cache signed.
    #[arg(long, env = "STOWIX_NO_UPSTREAM_FILTER")]
    pub no_upstream_filter: bool,

    /// Also store the build logs of the derivations whose outputs this push publishes, when
    /// the local store has them (`nix log --store URL PATH` then shows them anywhere).
    #[arg(long, env = "STOWIX_LOGS")]
    pub logs: bool,

    /// Bytes per upload chunk (testing and tuning; capped by the server's limits).
    #[arg(long, env = push::CHUNK_SIZE_ENV, hide = true, value_parser = parse_size)]
    pub chunk_size: Option<u64>,
}

/// `50MiB`, `10M`, `1.5G`, `500KB`, `1000`: bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size; write e.g. 50MiB, 10M or 500000"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use K, M, G, KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    let bytes = number * multiplier as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("{text:?} must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// Put before every line this process prints itself (see [`set_line_prefix`]).
static LINE_PREFIX: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// `watch-exec` and `watch-store` prefix their own lines (`stowix: `) so they stand out from
/// the command's output and in a journal; `push` prints them bare.
pub(crate) fn set_line_prefix(prefix: &'static str) {
    let _ = LINE_PREFIX.set(prefix);
}

pub(crate) fn line_prefix() -> &'static str {
    LINE_PREFIX.get().copied().unwrap_or("")
}

/// Prints an error whose message may carry its own `hint:` lines, and returns `code`.
pub(crate) fn fail(code: i32, message: impl std::fmt::Display) -> i32 {
    eprintln!(
        "{}",
        crate::push::report::prefixed(line_prefix(), &format!("error: {message}"))
    );
    code
}

fn nix_on_path() -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let candidate = dir.join("nix");
            std::fs::metadata(&candidate).is_ok_and(|m| m.is_file())
        })
    })
}

/// The level to use, or the one-line usage error naming the flag and the valid range.
fn compression_level(method: Compression, level: Option<i32>) -> Result<i32, String> {
    let Some(range) = compress::levels(method) else {
        return match level {
            None => Ok(0),
            Some(_) => Err(
                "--compression-level: --compression none takes no level; drop the flag (or STOWIX_COMPRESSION_LEVEL)"
                    .to_owned(),
            ),
        };
    };
    let default = match method {
        Compression::Zstd => compress::ZSTD_DEFAULT_LEVEL,
        _ => DEFAULT_XZ_LEVEL,
    };
    match level {
        None => Ok(default),
        Some(level) if range.contains(&level) => Ok(level),
        Some(level) => Err(format!(
            "--compression-level {level} is out of range for {method}: use {} to {}",
            range.start(),
            range.end()
        )),
    }
}

/// What every pushing command checks before it makes a request: target, token, levels.
pub(crate) struct Prepared {
    level: i32,
    repo: RepoUrl,
    token: Token,
    /// `--upstream-key`s; the repository's own are added once it answered.
    upstream_keys: Vec<PublicKey>,
}

impl Prepared {
    /// The usage error (exit 2) or Nix error (exit 5) as `Err(code)`, already printed.
    pub(crate) fn check(flags: &PushFlags) -> Result<Self, i32> {
        let level = compression_level(flags.compression, flags.compression_level)
            .map_err(|err| fail(exit::USAGE, err))?;
        let (repo, token) = flags.repo.check()?;
        let mut upstream_keys = Vec::new();
        for text in flags.upstream_keys.iter().filter(|t| !t.is_empty()) {
            let key = PublicKey::parse(text).map_err(|err| {
                fail(
                    exit::USAGE,
                    format!("--upstream-key {text:?} is not a Nix public key: {err}\nhint: give it as name:base64, as in trusted-public-keys"),
                )
            })?;
            upstream_keys.push(key);
        }
        Ok(Self {
            level,
            repo,
            token,
            upstream_keys,
        })
    }

    pub(crate) fn check_nix() -> Result<(), i32> {
        if nix_on_path() {
            Ok(())
        } else {
            Err(fail(exit::NIX, ClosureError::NixMissing))
        }
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            fail(
                exit::FAILURE,
                format!("cannot start the async runtime: {err}"),
            )
        })
}

pub fn run(args: PushArgs) -> i32 {
    let prepared = match Prepared::check(&args.flags) {
        Ok(prepared) => prepared,
        Err(code) => return code,
    };
    let mut roots = Vec::with_capacity(args.paths.len());
    for arg in &args.paths {
        match closure::resolve_root(arg) {
            Ok(path) => roots.push(path),
            Err(err) => return fail(exit::USAGE, err),
        }
    }
    if let Err(code) = Prepared::check_nix() {
        return code;
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(push_async(args, prepared, roots))
}

/// A connected pusher: the client, the repository's description, the shared tally and the
/// metrics recorder. One per process: `watch-store` pushes many batches through one session.
pub(crate) struct Session {
    pub client: Arc<PushClient>,
    pub info: crate::api::RepoInfo,
    pub progress: Arc<Progress>,
    pub metrics: Metrics,
    pub config: PushConfig,
    pub gateway: Option<String>,
}

impl Session {
    /// Installs metrics, builds the client and checks the token's scope with `GET info`.
    /// `Err(code)` after the error was printed (and the metrics pushed).
    /// With `wait_for_server`, a server that does not answer is asked again every
    /// [`CONNECT_RETRY`] until it does (`watch-store`: a service started before its server).
    pub(crate) async fn connect(
        flags: &PushFlags,
        prepared: Prepared,
        reporter: Arc<dyn Reporter>,
        wait_for_server: bool,
    ) -> Result<Self, i32> {
        let metrics = Metrics::install(flags.metrics_listen)
            .map_err(|err| fail(exit::USAGE, format!("cannot serve metrics: {err}")))?;
        let progress = Arc::new(Progress::new(reporter));
        let client = PushClient::new(ClientConfig {
            repo: prepared.repo.clone(),
            token: prepared.token,
            limits: RateLimits::new(flags.max_requests_per_second, flags.max_upload_rate),
            retry: RetryPolicy::from_env(),
            observer: Arc::clone(&progress) as Arc<dyn client::ClientObserver>,
        })
        .map(Arc::new)
        .map_err(|err| fail(exit::FAILURE, err))?;
        let gateway = flags.metrics_push_gateway.as_deref();

        let mut warned = false;
        let info = loop {
            match client.info().await {
                Ok(info) => break info,
                Err(err) if wait_for_server && push::failure::is_outage(&err) => {
                    if !warned {
                        progress.warn(&format!(
                            "{err}; asking again every {} s",
                            CONNECT_RETRY.as_secs()
                        ));
                        warned = true;
                    }
                    tokio::time::sleep(CONNECT_RETRY).await;
                }
                Err(err) => {
                    return Err(fail_after_metrics(
                        &metrics,
                        gateway,
                        &progress,
                        client_exit_code(&err),
                        err,
                    )
                    .await)
                }
            }
        };
        if warned {
            progress.note("the server answers");
        }
        let refusal = match info.token_scope.as_deref() {
            Some("push") => None,
            Some(scope) => Some(format!(
                "the token has {scope} scope for repository {}, but pushing needs push scope\nhint: create a token with push scope for this repository",
                info.repository
            )),
            None => Some(format!(
                "the server did not accept the token for repository {}\nhint: check the token and --target",
                info.repository
            )),
        };
        if let Some(message) = refusal {
            return Err(
                fail_after_metrics(&metrics, gateway, &progress, exit::AUTH, message).await,
            );
        }

        let mut upstream_keys = prepared.upstream_keys;
        if flags.no_upstream_filter {
            upstream_keys.clear();
        } else {
            for text in &info.upstream_keys {
                match PublicKey::parse(text) {
                    Ok(key) if !upstream_keys.contains(&key) => upstream_keys.push(key),
                    Ok(_) => {}
                    // The server checks keys when they are configured; a bad one only loses the
                    // filter for its paths, which are then pushed.
                    Err(err) => progress.warn(&format!(
                        "ignoring the repository's upstream key {text:?}: {err}"
                    )),
                }
            }
        }

        let threads = flags
            .compression_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        let config = PushConfig {
            jobs: flags.jobs,
            compression: CompressConfig {
                method: flags.compression,
                level: prepared.level,
                threads,
            },
            chunk_size: flags.chunk_size.unwrap_or(push::DEFAULT_CHUNK_SIZE),
            retry_timeout: flags.retry_timeout,
            upstream_keys,
            logs: flags.logs,
            batch_small_nars: !flags.no_batch,
        };
        Ok(Self {
            client,
            info,
            progress,
            metrics,
            config,
            gateway: flags.metrics_push_gateway.clone(),
        })
    }

    /// Pushes the final metrics to the gateway, if one was named.
    pub(crate) async fn push_metrics(&self) {
        push_metrics(&self.metrics, self.gateway.as_deref(), &self.progress).await;
    }
}

async fn push_async(args: PushArgs, prepared: Prepared, roots: Vec<crate::nix::StorePath>) -> i32 {
    let reporter: Arc<dyn Reporter> = if args.flags.no_progress || !std::io::stderr().is_terminal()
    {
        Arc::new(LineReporter::new(args.flags.verbose))
    } else {
        Arc::new(TerminalReporter::new(args.flags.verbose))
    };
    let session = match Session::connect(&args.flags, prepared, reporter, false).await {
        Ok(session) => session,
        Err(code) => return code,
    };

    let cancel = CancellationToken::new();
    {
        let (cancel, progress) = (cancel.clone(), Arc::clone(&session.progress));
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                progress.warn("interrupted: stopping; unfinished uploads stay on the server and the next run resumes them");
                cancel.cancel();
            }
        });
    }

    let roots = Roots {
        paths: roots,
        stdin: args.stdin,
        tolerant: false,
    };
    let Session {
        client,
        info,
        progress,
        metrics,
        config,
        gateway,
    } = session;
    let pin_roots: Vec<String> = roots.paths.iter().map(|p| p.to_absolute()).collect();
    let result = push::run(
        Arc::clone(&client),
        &info,
        roots,
        config,
        Arc::clone(&progress),
        cancel,
    )
    .await;
    let code = conclude(result, &progress, metrics, gateway.as_deref()).await;
    match args.pin {
        Some(name) if code == exit::SUCCESS => {
            super::pin::pin(&client, &name, pin_roots, args.keep).await
        }
        Some(name) => {
            eprintln!(
                "{}not pinned as {name}: the push did not publish every path",
                line_prefix()
            );
            code
        }
        None => code,
    }
}

async fn conclude(
    result: Result<(), PushError>,
    progress: &Progress,
    metrics: Metrics,
    gateway: Option<&str>,
) -> i32 {
    let summary = progress.finish();
    push_metrics(&metrics, gateway, progress).await;
    match result {
        Ok(()) if summary.failed > 0 || summary.rejected_lines > 0 => {
            let mut what = Vec::new();
            if summary.failed > 0 {
                what.push(format!(
                    "{} of {} paths failed",
                    summary.failed, summary.closure_paths
                ));
            }
            if summary.rejected_lines > 0 {
                what.push(format!(
                    "{} input {} rejected",
                    summary.rejected_lines,
                    if summary.rejected_lines == 1 {
                        "line was"
                    } else {
                        "lines were"
                    }
                ));
            }
            fail(
                exit::PARTIAL,
                format!(
                    "{} (see above); the others were published",
                    what.join(" and ")
                ),
            )
        }
        Ok(()) => exit::SUCCESS,
        Err(PushError::Cancelled) => exit::INTERRUPTED,
        Err(PushError::Closure(err)) => fail(
            if err.is_usage() {
                exit::USAGE
            } else {
                exit::NIX
            },
            err,
        ),
        Err(PushError::Fatal(failure)) => fail(failure.exit_code(), failure),
        Err(err @ PushError::Internal(_)) => fail(exit::FAILURE, err),
    }
}

/// A run that ends before the pipeline starts (the repository refused the token, say) still
/// pushes its metrics, so a dashboard sees every failed job, not only those that got going.
async fn fail_after_metrics(
    metrics: &Metrics,
    gateway: Option<&str>,
    progress: &Progress,
    code: i32,
    message: impl std::fmt::Display,
) -> i32 {
    push_metrics(metrics, gateway, progress).await;
    fail(code, message)
}

/// The final values, PUT to the push gateway when one was named; a gateway that is down costs
/// a warning, never the push's own exit code.
async fn push_metrics(metrics: &Metrics, gateway: Option<&str>, progress: &Progress) {
    if let Some(gateway) = gateway {
        if let Err(err) = metrics.push(gateway).await {
            progress.warn(&format!("cannot push metrics to {gateway}: {err}"));
        }
    }
}

pub(crate) fn client_exit_code(err: &ClientError) -> i32 {
    match err {
        ClientError::Auth { .. } => exit::AUTH,
        ClientError::Unreachable { .. } | ClientError::NotStowix { .. } => exit::UNREACHABLE,
        _ => exit::FAILURE,
    }
}

/// The Prometheus recorder, when `--metrics-listen` or `--metrics-push-gateway` asked for one.
/// Installed only here, in the binary's command path: library code never installs a global
/// recorder.
pub(crate) struct Metrics {
    handle: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Metrics {
    fn install(listen: Option<SocketAddr>) -> Result<Self, String> {
        let builder = push_metrics::builder().map_err(|e| e.to_string())?;
        let recorder = match listen {
            Some(addr) => {
                let (recorder, exporter) = builder
                    .with_http_listener(addr)
                    .build()
                    .map_err(|e| e.to_string())?;
                tokio::spawn(exporter);
                recorder
            }
            None => builder.build_recorder(),
        };
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
        push_metrics::describe();
        push_metrics::register_zeros();
        Ok(Self {
            handle: Some(handle),
        })
    }

    /// PUT the text exposition to `<gateway>/metrics/job/stowix_push` (the exporter's own push
    /// loop never pushes at exit, which is the one push that matters for a short-lived job).
    async fn push(&self, gateway: &str) -> Result<(), String> {
        let Some(handle) = &self.handle else {
            return Ok(());
        };
        let url = format!(
            "{}/metrics/job/{PUSH_GATEWAY_JOB}",
            gateway.trim_end_matches('/')
        );
        let response = reqwest::Client::new()
            .put(&url)
            .header(reqwest::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(handle.render())
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| client::error::describe_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("50MiB"), Ok(50 << 20));
        assert_eq!(parse_size("50M"), Ok(50 << 20));
        assert_eq!(parse_size("10mb"), Ok(10_000_000));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert!(parse_size("fast").is_err());
        assert!(parse_size("10XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn debug_of_the_arguments_never_shows_the_token() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Wrapper {
            #[command(flatten)]
            args: PushArgs,
        }
        let secret = "stx_live_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLmnopqrstuv12";
        let parsed = Wrapper::try_parse_from([
            "push",
            "--target",
            "http://h/r",
            "--token",
            secret,
            "/nix/store/x",
        ])
        .unwrap();
        assert!(!format!("{parsed:?}").contains("ABCDEFGHIJKL"));
    }
}
