//! `stowix nix watch-store` and `stowix nix watch-exec`: push while building.
//!
//! ```text
//!   flags (every push flag) ──► Prepared::check ──► open the Nix database, take the mark
//!        ──► Session::connect (metrics, client, GET info: AUTH / UNREACHABLE)
//!        ──► push::watch::run (batches through the push pipeline) ◄── signals / the command
//!        ──► summary ──► metrics push ──► exit
//! ```
//! watch-store: runs until SIGTERM/SIGINT, then publishes what it has seen and exits 0; a
//! second signal stops at once (exit 130). watch-exec: takes the mark, starts COMMAND with
//! the terminal's stdin/stdout/stderr untouched, drains once it exits, and exits with its
//! status (or the push's failure code when COMMAND succeeded). Every line Stowix prints
//! itself starts with `stowix: `.

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use super::exit;
use super::push::{fail, runtime, set_line_prefix, Prepared, PushFlags, Session};
use crate::push::report::{LineReporter, Reporter};
use crate::push::watch::{self, store_db, Control, OutagePolicy, Scanner, Tracker};
use crate::push::PushError;

const PREFIX: &str = "stowix: ";

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Pushes every store path that becomes valid in the local Nix store (built, substituted, added or imported) after it starts, with its closure, until SIGTERM or SIGINT; then publishes what it has seen and exits 0 (a second signal stops at once, exit 130; unfinished uploads resume on the next start). Reads the Nix database ($NIX_STATE_DIR/db/db.sqlite, default /nix/var/nix/db/db.sqlite), so it needs read access to it.\n\nExit codes: 0 stopped by a signal after publishing, 2 usage, 3 auth, 5 nix, 6 not a Stowix server or repository gone, 130 stopped by a second signal."
)]
pub struct WatchStoreArgs {
    /// Push only paths that become valid after the start (the default). `--since-start=false`
    /// also pushes every path already valid when it starts (a first fill of a new repository;
    /// presence answers skip what the repository has).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub since_start: bool,

    #[command(flatten)]
    pub flags: PushFlags,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Runs COMMAND and pushes every store path that becomes valid while it runs, with its closure; when COMMAND exits, waits until those are published. COMMAND's output passes through untouched; Stowix's own lines start with \"stowix: \".\n\nExit codes: COMMAND's exit status (128 + N when a signal N killed it); when COMMAND succeeded: 0 if every path was published, else the push's code: 3 auth, 4 some paths failed, 5 nix, 6 server unreachable, 7 server storage full, 130 interrupted."
)]
pub struct WatchExecArgs {
    #[command(flatten)]
    pub flags: PushFlags,

    /// The command to run, after `--`, e.g. `-- nix-build release.nix`.
    #[arg(value_name = "COMMAND", required = true, trailing_var_arg = true, allow_hyphen_values = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// What both commands set up before watching.
struct Started {
    session: Session,
    tracker: Arc<Tracker>,
    scanner: Scanner,
}

/// Offline checks, the database and its mark (before anything can become valid unseen), and
/// the runtime the connection will run on. `Err(code)` after the error was printed.
fn prepare(
    flags: &PushFlags,
    since_start: bool,
) -> Result<(tokio::runtime::Runtime, Prepared, Scanner), i32> {
    set_line_prefix(PREFIX);
    let prepared = Prepared::check(flags)?;
    Prepared::check_nix()?;
    let db = store_db::StoreDb::open(&store_db::default_path()).map_err(|e| fail(exit::NIX, e))?;
    let scanner = if since_start {
        Scanner::start_now(db).map_err(|e| fail(exit::NIX, e))?
    } else {
        Scanner::start_at(db, 0)
    };
    Ok((runtime()?, prepared, scanner))
}

/// `wait_for_server`: see [`Session::connect`]; the mark is already taken, so nothing that
/// becomes valid meanwhile is missed.
async fn start(
    flags: &PushFlags,
    prepared: Prepared,
    scanner: Scanner,
    wait_for_server: bool,
) -> Result<Started, i32> {
    let reporter: Arc<dyn Reporter> = Arc::new(LineReporter::with_prefix(flags.verbose, PREFIX));
    let session = Session::connect(flags, prepared, reporter, wait_for_server).await?;
    crate::push::metrics::register_watch_zeros();
    let tracker = Tracker::new();
    session
        .progress
        .follow(Arc::clone(&tracker) as Arc<dyn crate::push::progress::Follower>);
    Ok(Started {
        session,
        tracker,
        scanner,
    })
}

/// The exit code of a watcher's result (`None` for success).
fn push_code(result: &Result<(), PushError>, given_up: u64) -> Option<(i32, String)> {
    match result {
        Ok(()) if given_up > 0 => Some((
            exit::PARTIAL,
            format!("{given_up} paths could not be published (see above); the others were"),
        )),
        Ok(()) => None,
        Err(PushError::Cancelled) => Some((
            exit::INTERRUPTED,
            "stopped at once; unfinished uploads stay on the server and the next run resumes them"
                .to_owned(),
        )),
        Err(PushError::Closure(err)) => Some((
            if err.is_usage() {
                exit::USAGE
            } else {
                exit::NIX
            },
            err.to_string(),
        )),
        Err(PushError::Fatal(failure)) => Some((failure.exit_code(), failure.to_string())),
        Err(err @ PushError::Internal(_)) => Some((exit::FAILURE, err.to_string())),
    }
}

/// First SIGTERM/SIGINT: `on_first`, and drain if `drain_on_first`; second: cancel.
fn handle_signals(
    control: &Control,
    progress: Arc<crate::push::Progress>,
    drain_on_first: bool,
    on_first: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let control = control.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if drain_on_first {
            progress
                .warn("stopping: publishing the paths already seen; a second signal stops at once");
            control.drain.cancel();
        } else {
            progress.warn("passing the signal on to the command; its paths are published when it ends; a second signal stops pushing at once");
        }
        on_first();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        progress.warn(
            "stopping at once; unfinished uploads stay on the server and the next run resumes them",
        );
        control.cancel.cancel();
    });
    Ok(())
}

pub fn run_store(args: WatchStoreArgs) -> i32 {
    let (runtime, prepared, scanner) = match prepare(&args.flags, args.since_start) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let Started {
            session,
            tracker,
            scanner,
        } = match start(&args.flags, prepared, scanner, true).await {
            Ok(started) => started,
            Err(code) => return code,
        };
        let control = Control::new(OutagePolicy::Wait);
        if let Err(err) = handle_signals(&control, Arc::clone(&session.progress), true, || {}) {
            return fail(exit::FAILURE, format!("cannot handle signals: {err}"));
        }
        session.progress.note(&format!(
            "watching the Nix store (paths registered after #{}) for {}",
            scanner.mark(),
            session.info.repository
        ));
        let result = watch::run(
            Arc::clone(&session.client),
            &session.info,
            session.config.clone(),
            Arc::clone(&session.progress),
            Arc::clone(&tracker),
            scanner,
            control,
        )
        .await;
        session.progress.finish();
        session.push_metrics().await;
        // A drained watcher exits 0 even if some paths were given up: they were reported, and
        // a service manager must not read a clean stop as a crash.
        match push_code(&result, 0) {
            None => exit::SUCCESS,
            Some((code, message)) => fail(code, message),
        }
    })
}

pub fn run_exec(args: WatchExecArgs) -> i32 {
    let (runtime, prepared, scanner) = match prepare(&args.flags, true) {
        Ok(ready) => ready,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let Started {
            session,
            tracker,
            scanner,
        } = match start(&args.flags, prepared, scanner, false).await {
            Ok(started) => started,
            Err(code) => return code,
        };
        let (program, rest) = args.command.split_first().expect("clap requires COMMAND");
        let mut child = match tokio::process::Command::new(program).args(rest).spawn() {
            Ok(child) => child,
            Err(err) => {
                return fail(
                    if err.kind() == std::io::ErrorKind::NotFound {
                        127
                    } else {
                        126
                    },
                    format!("cannot run {program:?}: {err}"),
                )
            }
        };
        let child_pid = child.id();
        let control = Control::new(OutagePolicy::GiveUpWhenDraining);
        // SIGINT from a terminal reaches the command through its process group already; a
        // SIGTERM (a CI job being cancelled) is sent to this process only, so it is passed on.
        let forward = move || {
            if let Some(pid) = child_pid {
                // SAFETY: kill(2) on the pid of a child this process spawned and has not reaped
                // (it is reaped only after this runs or never); no memory is involved.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        };
        if let Err(err) = handle_signals(&control, Arc::clone(&session.progress), false, forward) {
            return fail(exit::FAILURE, format!("cannot handle signals: {err}"));
        }
        let watcher = tokio::spawn({
            let (client, info, config) = (
                Arc::clone(&session.client),
                session.info.clone(),
                session.config.clone(),
            );
            let (progress, tracker, control) = (
                Arc::clone(&session.progress),
                Arc::clone(&tracker),
                control.clone(),
            );
            async move {
                watch::run(
                    client,
                    &info,
                    config,
                    progress,
                    tracker,
                    scanner,
                    control,
                )
                .await
            }
        });
        let status = child.wait().await;
        let waiting = tracker.waiting();
        if waiting > 0 {
            session.progress.note(&format!(
                "the command ended; publishing the {waiting} paths it left"
            ));
        }
        control.drain.cancel();
        let result = match watcher.await {
            Ok(result) => result,
            Err(err) => Err(PushError::Internal(format!("the watcher failed: {err}"))),
        };
        session.progress.finish();
        session.push_metrics().await;
        let command_code = match status {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt as _;
                status
                    .code()
                    .or_else(|| status.signal().map(|signal| 128 + signal))
                    .unwrap_or(exit::FAILURE)
            }
            Err(err) => fail(exit::FAILURE, format!("cannot wait for {program:?}: {err}")),
        };
        match push_code(&result, tracker.given_up()) {
            None => command_code,
            Some((code, message)) => {
                let printed = fail(code, message);
                if command_code == exit::SUCCESS {
                    printed
                } else {
                    command_code
                }
            }
        }
    })
}
