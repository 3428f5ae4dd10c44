//! `stowix nix pin NAME STORE_PATH...` and the pin step of `stowix nix push --pin`: one
//! `POST api/v1/pins/NAME` that makes the published paths the pin's next revision, so garbage
//! collection keeps their closures (docs/retention.md).
//!
//! ```text
//!   args ──► validate name, target, token, paths (offline, exit USAGE)
//!        ──► POST pins/NAME ──► "pinned … as NAME revision N" ──► exit SUCCESS / NOT_PUBLISHED / …
//! ```

use std::sync::Arc;

use super::exit;
use super::push::{client_exit_code, fail, line_prefix, parse_pin_name, runtime, RepoArgs};
use crate::api::{codes, PinRequest};
use crate::client::{self, ClientConfig, ClientError, PushClient, RateLimits};
use crate::nix::StorePath;
use crate::push::report::LineReporter;
use crate::push::{closure, Progress};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit codes: 0 pinned, 2 usage, 3 auth, 6 server unreachable, 9 a path is not published in the repository."
)]
pub struct PinArgs {
    /// The pin: letters, digits and . _ + - (e.g. release-2026.12).
    #[arg(value_name = "NAME", value_parser = parse_pin_name)]
    pub name: String,

    /// Store paths the repository has published (/nix/store/…, or symlinks such as ./result):
    /// together they are the pin's new revision.
    #[arg(value_name = "STORE_PATH", required = true)]
    pub paths: Vec<String>,

    /// Keep only the newest N revisions of the pin (this one included).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,

    #[command(flatten)]
    pub repo: RepoArgs,
}

/// The store path an argument names. Unlike a push, a pin needs no local copy: a store path
/// given as text is taken as it is, and only other arguments (`./result`) are resolved.
fn pin_root(arg: &str) -> Result<StorePath, String> {
    if let Ok(path) = StorePath::from_absolute(arg.trim_end_matches('/')) {
        return Ok(path);
    }
    closure::resolve_root(arg).map_err(|err| err.to_string())
}

pub fn run(args: PinArgs) -> i32 {
    let (repo, token) = match args.repo.check() {
        Ok(checked) => checked,
        Err(code) => return code,
    };
    let mut roots = Vec::with_capacity(args.paths.len());
    for arg in &args.paths {
        match pin_root(arg) {
            Ok(path) => roots.push(path.to_absolute()),
            Err(err) => return fail(exit::USAGE, err),
        }
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        // Retries are reported like a push's.
        let progress = Arc::new(Progress::new(Arc::new(LineReporter::new(false))));
        let client = match PushClient::new(ClientConfig {
            repo,
            token,
            limits: RateLimits::new(None, None),
            retry: client::RetryPolicy::from_env(),
            observer: progress as Arc<dyn client::ClientObserver>,
        }) {
            Ok(client) => client,
            Err(err) => return fail(exit::FAILURE, err),
        };
        pin(&client, &args.name, roots, args.keep).await
    })
}

/// Pins `roots` (absolute store paths) under `name`; prints the outcome and returns the exit
/// code.
pub(crate) async fn pin(
    client: &PushClient,
    name: &str,
    roots: Vec<String>,
    keep: Option<u32>,
) -> i32 {
    let request = PinRequest {
        store_paths: roots,
        keep,
    };
    match client.pin(name, &request).await {
        Ok(answer) => {
            let created = &answer.created;
            let paths = created.store_paths.len();
            eprintln!(
                "{}pinned {paths} {} as {} revision {}{}",
                line_prefix(),
                if paths == 1 { "path" } else { "paths" },
                created.name,
                created.revision,
                match answer.dropped_revisions.as_slice() {
                    [] => String::new(),
                    dropped => format!(
                        "; dropped revision{} {}",
                        if dropped.len() == 1 { "" } else { "s" },
                        dropped
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            );
            exit::SUCCESS
        }
        Err(ClientError::Api { ref api, .. }) if api.code == codes::NOT_PUBLISHED => fail(
            exit::NOT_PUBLISHED,
            format!(
                "cannot pin {name}: {}\nhint: push the path first (stowix nix push --pin {name} PATH does both)",
                api.message
            ),
        ),
        Err(err) => fail(client_exit_code(&err), format!("cannot pin {name}: {err}")),
    }
}
