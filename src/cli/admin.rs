//! `stowix admin`: repositories, tokens and the database schema (`db migrate`, `db status`),
//! straight on a server's backends (the same flags and factory as `stowix serve`). It runs while
//! the servers do: SQLite in WAL mode and PostgreSQL both take its writes. Servers read tokens
//! on every request, so a revocation applies at once on every replica; repository settings
//! within a second (`server::cache`).

use clap::Subcommand;

use super::exit;
use crate::nix::signing::{PublicKey, SecretKey};
use crate::server::auth::generate_token;
use crate::server::config::ServerConfig;
use crate::server::is_valid_repo_name;
use crate::server::metadata::{now_unix, MetaError, Metadata, RepoRecord, Scope};

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    #[command(flatten)]
    pub backends: super::serve::BackendArgs,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Repositories.
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The metadata database's schema.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Collect garbage now by each repository's retention policy (servers collect every
    /// gc_interval_secs); prints the paths, NARs and bytes removed.
    Gc {
        /// Only this repository.
        #[arg(long)]
        repo: Option<String>,
        /// Print what a real run would remove, removing nothing.
        #[arg(long)]
        dry_run: bool,
        /// Collect as if the time were this (Unix seconds): e.g. with --dry-run, what a
        /// collection in 30 days would remove. Default: now.
        #[arg(long, value_name = "UNIX_SECONDS")]
        now: Option<i64>,
    },
    /// Published store paths.
    Path {
        #[command(subcommand)]
        command: PathCommand,
    },
    /// Pins (created by `stowix nix push --pin` and `stowix nix pin`).
    Pin {
        #[command(subcommand)]
        command: PinCommand,
    },
    /// Copy an embedded installation (SQLite + local files in a data dir) into the backends
    /// given by --database and --storage: repositories, tokens, NARs, narinfos, listings,
    /// build logs and debuginfo links. Idempotent; rerun it after an interruption.
    Migrate(super::migrate::MigrateArgs),
    /// Run one janitor pass now (servers run one every janitor_interval_secs): abort uploads
    /// inactive past upload_expiry_hours, delete stored objects no NAR record knows once they
    /// are older than orphan_grace_secs.
    Janitor,
}

#[derive(Subcommand, Debug)]
pub enum PathCommand {
    /// Remove a published path now, its NAR object included (a leaked secret must not wait
    /// for garbage collection). Refuses while other published paths reference it.
    Delete {
        #[arg(long)]
        repo: String,
        /// `/nix/store/<hash>-<name>`, or the 32-character hash part.
        path: String,
        /// Also remove every published path that references it (transitively), and list them.
        #[arg(long)]
        with_dependents: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PinCommand {
    /// List the live revisions of every pin.
    List {
        #[arg(long)]
        repo: Option<String>,
    },
    /// Delete a pin (all its revisions), or one revision.
    Delete {
        #[arg(long)]
        repo: String,
        name: String,
        #[arg(long)]
        revision: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Apply pending schema migrations (servers also do at start); prints the version before
    /// and after.
    Migrate,
    /// Print the stored schema version and the one this stowix supports, changing nothing.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum RepoCommand {
    /// Create a repository with a new ed25519 signing key; prints its public key.
    Create {
        name: String,
        /// Reads need a token too.
        #[arg(long)]
        private: bool,
        /// Substituter priority announced in nix-cache-info (lower is preferred; cache.nixos.org is 40).
        #[arg(long, default_value_t = 41)]
        priority: u32,
        #[command(flatten)]
        upstream: UpstreamArgs,
    },
    /// Change a repository's settings.
    Configure {
        name: String,
        #[command(flatten)]
        upstream: UpstreamArgs,
        /// Collect paths not used for this long (`90s`, `12h`, `30d`); `none` clears it.
        #[arg(long, value_name = "DURATION")]
        retention: Option<String>,
        /// Evict least recently used paths until the kept NARs fit (`200GiB`; B, KiB, MiB,
        /// GiB, TiB); `none` clears it.
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
    },
    /// Show a repository's substituter settings and public key.
    Show {
        name: String,
        /// Base URL the server is reached at, used in the printed settings.
        #[arg(
            long,
            env = "STOWIX_PUBLIC_URL",
            default_value = "http://127.0.0.1:8380"
        )]
        url: String,
    },
    /// List repositories.
    List,
}

/// Upstream caches: clients skip pushing paths these keys signed, and the server accepts
/// references to such paths when a client proves them with the signature.
#[derive(clap::Args, Debug)]
pub struct UpstreamArgs {
    /// Public key (`name:base64`) of an upstream cache; repeat for several. Replaces the
    /// repository's list [default for new repositories: cache.nixos.org-1's key].
    #[arg(long = "upstream-key", value_name = "KEY")]
    pub upstream_keys: Vec<String>,
    /// Trust no upstream cache: every path is pushed.
    #[arg(long, conflicts_with = "upstream_keys")]
    pub no_upstream_keys: bool,
}

impl UpstreamArgs {
    /// The list these flags set, checked; `None` when they set nothing.
    fn keys(&self) -> Result<Option<Vec<String>>, (i32, String, Option<String>)> {
        if self.no_upstream_keys {
            return Ok(Some(Vec::new()));
        }
        if self.upstream_keys.is_empty() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        for text in &self.upstream_keys {
            let key = PublicKey::parse(text).map_err(|err| {
                (
                    exit::USAGE,
                    format!("--upstream-key {text:?} is not a Nix public key: {err}"),
                    Some("give it as `name:base64`, e.g. the line from the upstream's trusted-public-keys".into()),
                )
            })?;
            keys.push(key.to_text());
        }
        keys.dedup();
        Ok(Some(keys))
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token; prints it (the only time it is shown).
    Create {
        /// Repository the token is for (repeat for several).
        #[arg(long = "repo", required = true)]
        repos: Vec<String>,
        #[arg(long, value_parser = ["read", "push"])]
        scope: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (ids only; secrets are not stored).
    List,
    /// Revoke a token by id (the 26 characters after `stx_live_`), or by the whole token.
    Revoke { id: String },
}

pub fn run(args: AdminArgs) -> i32 {
    // The server layers admin reuses log the details of an internal error and return a bland
    // message (meant for HTTP clients); an administrator needs those details on stderr.
    super::init_logging("warn");
    let mut config = match args.backends.load() {
        Ok(config) => config,
        Err(message) => return super::fail(exit::USAGE, &message, None),
    };
    // One command, one connection: the readers' pool is for a server's concurrent requests.
    config.metadata_readers = 0;
    let command = match args.command {
        // Before the factory: it migrates, and status must also work on a schema too new.
        AdminCommand::Db { command } => {
            return match db(&config, command) {
                Ok(()) => exit::SUCCESS,
                Err((code, message, hint)) => super::fail(code, &message, hint.as_deref()),
            }
        }
        AdminCommand::Janitor => return janitor(config),
        AdminCommand::Gc { repo, dry_run, now } => return gc(config, repo, dry_run, now),
        AdminCommand::Path {
            command:
                PathCommand::Delete {
                    repo,
                    path,
                    with_dependents,
                },
        } => return path_delete(config, &repo, &path, with_dependents),
        AdminCommand::Migrate(args) => return super::migrate::run(&config, args),
        command => command,
    };
    let meta = match crate::server::backend::open(&config) {
        Ok(backends) => backends.meta,
        Err(message) => return super::fail(exit::FAILURE, &message, None),
    };
    let meta = meta.as_ref();
    let result = match command {
        AdminCommand::Repo { command } => repo(meta, command),
        AdminCommand::Token { command } => token(meta, command),
        AdminCommand::Pin { command } => pin(meta, command),
        AdminCommand::Db { .. }
        | AdminCommand::Janitor
        | AdminCommand::Gc { .. }
        | AdminCommand::Path { .. }
        | AdminCommand::Migrate(_) => {
            unreachable!("handled before opening the backends")
        }
    };
    match result {
        Ok(()) => exit::SUCCESS,
        Err((code, message, hint)) => super::fail(code, &message, hint.as_deref()),
    }
}

fn admin_runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| {
            super::fail(
                exit::FAILURE,
                &format!("cannot start a runtime: {err}"),
                None,
            )
        })
}

/// One janitor pass on the configured backends, with a runtime of its own (the janitor talks
/// to the bucket asynchronously).
fn janitor(config: crate::server::config::ServerConfig) -> i32 {
    let runtime = match admin_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        let state = crate::server::AppState::open(config, None)?;
        crate::server::janitor::run(&state)
            .await
            .map_err(|err| err.body.message)
    });
    match outcome {
        Ok(Some(swept)) => {
            println!(
                "janitor: {} expired uploads discarded, {} orphan objects deleted",
                swept.uploads_expired, swept.orphans_deleted
            );
            exit::SUCCESS
        }
        Ok(None) => super::fail(
            exit::FAILURE,
            "another janitor (on a running server) holds the lock",
            Some("retry in a moment; one pass at a time is the rule across replicas"),
        ),
        Err(message) => super::fail(exit::FAILURE, &message, None),
    }
}

type AdminResult = Result<(), (i32, String, Option<String>)>;

fn db(config: &ServerConfig, command: DbCommand) -> AdminResult {
    let database = crate::server::backend::database_label(config);
    // The error names the database already (path, or host:port/db).
    let failed = |err: MetaError| (exit::FAILURE, err.to_string(), None);
    match command {
        DbCommand::Status => {
            let status = crate::server::backend::schema_status(config).map_err(failed)?;
            let state = match status.stored.cmp(&status.supported) {
                std::cmp::Ordering::Equal => "up to date",
                std::cmp::Ordering::Less => {
                    "behind: `stowix admin db migrate` (or starting a server) migrates it"
                }
                std::cmp::Ordering::Greater => {
                    "newer than this stowix: upgrade stowix before using it"
                }
            };
            println!("database:       {database}");
            println!(
                "schema version: {} (this stowix supports {}): {state}",
                status.stored, status.supported
            );
            Ok(())
        }
        DbCommand::Migrate => {
            let (before, after) = crate::server::backend::migrate(config).map_err(failed)?;
            println!("database:       {database}");
            println!("schema version: {before} -> {after}");
            Ok(())
        }
    }
}

fn internal(err: impl std::fmt::Display) -> (i32, String, Option<String>) {
    (exit::FAILURE, format!("metadata database: {err}"), None)
}

fn require_repo(
    meta: &dyn Metadata,
    name: &str,
) -> Result<RepoRecord, (i32, String, Option<String>)> {
    meta.repo(name).map_err(internal)?.ok_or_else(|| {
        (
            exit::USAGE,
            format!("no repository named '{name}'"),
            Some("`stowix admin repo list` shows the repositories".into()),
        )
    })
}

fn repo(meta: &dyn Metadata, command: RepoCommand) -> AdminResult {
    match command {
        RepoCommand::Create {
            name,
            private,
            priority,
            upstream,
        } => {
            if !is_valid_repo_name(&name) {
                return Err((
                    exit::USAGE,
                    format!("'{name}' is not a valid repository name"),
                    Some("use 1-63 of a-z, 0-9, '-' and '_', starting with a letter or digit (not metrics, healthz, api, nar, nix-cache-info)".into()),
                ));
            }
            let upstream_keys = upstream
                .keys()?
                .unwrap_or_else(|| vec![crate::api::NIXOS_CACHE_KEY.to_string()]);
            let key = SecretKey::generate(&name);
            let record = RepoRecord {
                name: name.clone(),
                private,
                secret_key: key.to_text(),
                priority,
                upstream_keys,
            };
            if !meta.create_repo(&record).map_err(internal)? {
                return Err((
                    exit::USAGE,
                    format!("repository '{name}' already exists"),
                    Some(format!("`stowix admin repo show {name}` prints its key")),
                ));
            }
            println!("{}", key.public_key().to_text());
            Ok(())
        }
        RepoCommand::Show { name, url } => {
            let repo = require_repo(meta, &name)?;
            let key = SecretKey::parse(&repo.secret_key).map_err(internal)?;
            let public = key.public_key().to_text();
            let url = format!("{}/{}", url.trim_end_matches('/'), repo.name);
            println!("repository:        {}", repo.name);
            println!(
                "visibility:        {}",
                if repo.private {
                    "private (reads need a token)"
                } else {
                    "public"
                }
            );
            println!("public key:        {public}");
            if repo.upstream_keys.is_empty() {
                println!("upstream keys:     none (every path is pushed)");
            }
            for key in &repo.upstream_keys {
                println!("upstream key:      {key}");
            }
            let policy = meta
                .policy(&repo.name)
                .map_err(internal)?
                .unwrap_or_default();
            let usage = meta.usage(&repo.name).map_err(internal)?;
            println!("retention:         {}", describe_policy(&policy));
            println!("paths:             {}", usage.paths);
            println!(
                "stored:            {} in {} NARs",
                format_size(usage.bytes),
                usage.nars
            );
            println!();
            println!("# nix.conf");
            println!("extra-substituters = {url}");
            println!("extra-trusted-public-keys = {public}");
            if repo.private {
                println!();
                println!("# netrc (netrc-file = /etc/nix/netrc), with a read token as password");
                let host = url::Url::parse(&url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default();
                println!("machine {host} login stowix password <token>");
            }
            Ok(())
        }
        RepoCommand::Configure {
            name,
            upstream,
            retention,
            max_size,
        } => {
            require_repo(meta, &name)?;
            let keys = upstream.keys()?;
            let retention = retention
                .map(|text| {
                    parse_setting(
                        &text,
                        "--retention",
                        parse_duration,
                        "give a duration such as 90s, 45m, 12h or 30d, or none",
                    )
                })
                .transpose()?;
            let max_size = max_size
                .map(|text| {
                    parse_setting(
                        &text,
                        "--max-size",
                        parse_size,
                        "give a size such as 500MiB, 200GiB or 2TiB (B, KiB, MiB, GiB, TiB), or none",
                    )
                })
                .transpose()?;
            if keys.is_none() && retention.is_none() && max_size.is_none() {
                return Err((
                    exit::USAGE,
                    "nothing to configure".into(),
                    Some("give --upstream-key KEY (repeatable), --no-upstream-keys, --retention DURATION or --max-size SIZE".into()),
                ));
            }
            if let Some(keys) = keys {
                if !meta.set_upstream_keys(&name, &keys).map_err(internal)? {
                    return Err((exit::USAGE, format!("no repository named '{name}'"), None));
                }
                eprintln!("repository '{name}': {} upstream key(s)", keys.len());
            }
            if retention.is_some() || max_size.is_some() {
                let mut policy = meta.policy(&name).map_err(internal)?.unwrap_or_default();
                if let Some(retention) = retention {
                    policy.retention_secs = retention;
                }
                if let Some(max_size) = max_size {
                    policy.max_size_bytes = max_size;
                }
                if !meta.set_policy(&name, &policy).map_err(internal)? {
                    return Err((exit::USAGE, format!("no repository named '{name}'"), None));
                }
                eprintln!("repository '{name}': {}", describe_policy(&policy));
            }
            Ok(())
        }
        RepoCommand::List => {
            for repo in meta.repos().map_err(internal)? {
                let public = SecretKey::parse(&repo.secret_key)
                    .map(|k| k.public_key().to_text())
                    .map_err(internal)?;
                println!(
                    "{}\t{}\t{public}",
                    repo.name,
                    if repo.private { "private" } else { "public" }
                );
            }
            Ok(())
        }
    }
}

fn token(meta: &dyn Metadata, command: TokenCommand) -> AdminResult {
    match command {
        TokenCommand::Create {
            repos,
            scope,
            description,
        } => {
            for name in &repos {
                require_repo(meta, name)?;
            }
            let scope = Scope::parse(&scope).expect("clap restricts the values");
            let (record, text) = generate_token(scope, repos, description);
            meta.create_token(&record).map_err(internal)?;
            println!("{text}");
            Ok(())
        }
        TokenCommand::List => {
            println!("ID\tSCOPE\tREPOSITORIES\tSTATUS\tDESCRIPTION");
            for token in meta.tokens().map_err(internal)? {
                let status = if token.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{}\t{}\t{}\t{status}\t{}",
                    token.id,
                    token.scope.as_str(),
                    token.repos.join(","),
                    token.description
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            // Accept the whole token too, but never echo it back.
            let id = crate::server::auth::parse_token(&id)
                .map(|t| t.id.to_string())
                .unwrap_or(id);
            if meta.revoke_token(&id, now_unix()).map_err(internal)? {
                eprintln!("revoked token {id}");
                Ok(())
            } else {
                Err((
                    exit::USAGE,
                    format!("no token with id '{id}'"),
                    Some("`stowix admin token list` shows the ids".into()),
                ))
            }
        }
    }
}

/// `none` clears a setting; anything else goes through `parse`.
fn parse_setting(
    text: &str,
    flag: &str,
    parse: fn(&str) -> Option<u64>,
    hint: &str,
) -> Result<Option<u64>, (i32, String, Option<String>)> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match parse(text) {
        Some(value) => Ok(Some(value)),
        None => Err((
            exit::USAGE,
            format!("{flag} {text:?} is not valid"),
            Some(hint.into()),
        )),
    }
}

/// `90s`, `45m`, `12h`, `30d`, `2w` → seconds; zero and overflow are refused.
pub fn parse_duration(text: &str) -> Option<u64> {
    parse_units(
        text,
        &[
            ("s", 1),
            ("m", 60),
            ("h", 3600),
            ("d", 86_400),
            ("w", 7 * 86_400),
        ],
    )
}

/// `200GiB`, `500MiB`, `1024B` → bytes (binary units); zero and overflow are refused.
pub fn parse_size(text: &str) -> Option<u64> {
    parse_units(
        text,
        &[
            ("B", 1),
            ("KiB", 1 << 10),
            ("MiB", 1 << 20),
            ("GiB", 1 << 30),
            ("TiB", 1 << 40),
        ],
    )
}

/// A whole number followed by one of `units` (its name and scale), strictly: no bare
/// number, no other unit, no zero, no overflow.
fn parse_units(text: &str, units: &[(&str, u64)]) -> Option<u64> {
    let text = text.trim();
    let unit_at = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(unit_at);
    let number: u64 = number.parse().ok()?;
    let (_, scale) = units.iter().find(|(name, _)| *name == unit)?;
    number.checked_mul(*scale).filter(|&value| value > 0)
}

fn format_duration(secs: u64) -> String {
    for (unit, scale) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs % scale == 0 {
            return format!("{}{unit}", secs / scale);
        }
    }
    format!("{secs}s")
}

/// `1.50 GiB (1610612736 B)`: readable, and exact for scripts.
fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    format!("{} ({bytes} B)", indicatif::HumanBytes(bytes))
}

fn describe_policy(policy: &crate::server::metadata::RetentionPolicy) -> String {
    let age = match policy.retention_secs {
        Some(secs) => format!("paths unused for {} are collected", format_duration(secs)),
        None => "no age limit".into(),
    };
    let size = match policy.max_size_bytes {
        Some(bytes) => format!("max size {}", format_size(bytes)),
        None => "no size limit".into(),
    };
    format!("{age}; {size}")
}

/// One collection on the configured backends (the same engine as `serve`'s schedule).
fn gc(config: ServerConfig, repo: Option<String>, dry_run: bool, now: Option<i64>) -> i32 {
    let runtime = match admin_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(async {
        let state = crate::server::AppState::open(config, None).map_err(|m| (exit::FAILURE, m))?;
        if let Some(name) = &repo {
            let lookup = name.clone();
            if state
                .db(move |meta| meta.repo(&lookup))
                .await
                .map_err(|err| (exit::FAILURE, err.body.message))?
                .is_none()
            {
                return Err((exit::USAGE, format!("no repository named '{name}'")));
            }
        }
        let options = crate::server::gc::GcOptions {
            repo,
            dry_run,
            now: now.unwrap_or_else(crate::server::gc::now),
            grace_secs: state.config.gc_grace_secs,
            orphan_grace_secs: state.config.orphan_grace_secs,
        };
        crate::server::gc::run(&state, &options)
            .await
            .map_err(|err| (exit::FAILURE, err.body.message))
    });
    match outcome {
        Ok(Some(done)) => {
            let verb = if dry_run { "would remove" } else { "removed" };
            for r in &done {
                println!(
                    "{}: {verb} {} paths; {} NARs marked unreferenced; {verb} {} NARs, {} bytes; kept {} paths ({} bytes); policy: {}{}",
                    r.repo,
                    r.paths_removed,
                    r.nars_marked,
                    r.nars_deleted,
                    r.bytes_freed,
                    r.kept_paths,
                    r.kept_bytes,
                    describe_policy(&r.policy),
                    if r.over_max_size { " (over max size: pins and the grace period keep more)" } else { "" }
                );
                for path in &r.removed {
                    println!("  {path}");
                }
                let unlisted = r.paths_removed.saturating_sub(r.removed.len() as u64);
                if unlisted > 0 {
                    println!("  ... and {unlisted} more");
                }
            }
            exit::SUCCESS
        }
        Ok(None) => super::fail(
            exit::FAILURE,
            "another collection (on a running server) holds the lock",
            Some("retry in a moment; one collection at a time is the rule across replicas"),
        ),
        Err((code, message)) => super::fail(code, &message, None),
    }
}

/// The hash part of `/nix/store/<hash>-<name>` or of a bare hash part.
fn hash_part_of(text: &str) -> Option<String> {
    let text = text.trim();
    let hash = match crate::nix::StorePath::from_absolute(text) {
        Ok(path) => path.hash_part().to_string(),
        Err(_) => text.to_string(),
    };
    crate::nix::store_path::is_valid_hash_part(&hash).then_some(hash)
}

fn path_delete(config: ServerConfig, repo: &str, path: &str, with_dependents: bool) -> i32 {
    let Some(hash) = hash_part_of(path) else {
        return super::fail(
            exit::USAGE,
            &format!("{path:?} is neither a store path nor a hash part"),
            Some("give /nix/store/<hash>-<name> or the 32-character hash"),
        );
    };
    let runtime = match admin_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let repo = repo.to_string();
    let outcome = runtime.block_on(async {
        let state = crate::server::AppState::open(config, None)
            .map_err(|m| (exit::FAILURE, m, None::<String>))?;
        let failed =
            |err: crate::server::error::ServerError| (exit::FAILURE, err.body.message, None);
        let (name, lookup) = (repo.clone(), hash.clone());
        let (found, published) = state
            .db(move |meta| {
                Ok((
                    meta.repo(&name)?,
                    meta.published_store_paths(&name, &[lookup])?,
                ))
            })
            .await
            .map_err(failed)?;
        if found.is_none() {
            return Err((exit::USAGE, format!("no repository named '{repo}'"), None));
        }
        if published.first().cloned().flatten().is_none() {
            return Err((
                exit::USAGE,
                format!("repository '{repo}' publishes no path with hash {hash}"),
                None,
            ));
        }
        let name = repo.clone();
        let deletion = state
            .db(move |meta| meta.delete_paths(&name, &[hash], with_dependents))
            .await
            .map_err(failed)?;
        match deletion {
            crate::server::metadata::PathDeletion::Refused { dependents } => Err((
                exit::REFUSED,
                format!(
                    "{} published path(s) reference it: {}",
                    dependents.len(),
                    dependents.join(", ")
                ),
                Some("delete those first, or add --with-dependents to delete them too".into()),
            )),
            crate::server::metadata::PathDeletion::Deleted { paths, nars } => {
                for nar in &nars {
                    // The row is gone; a failed object delete is an orphan the janitor's bucket
                    // listing (S3) finds, so say so rather than fail the command.
                    if let Err(err) = state.storage.delete(&nar.object_key).await {
                        eprintln!("warning: could not delete object {}: {err}", nar.object_key);
                    }
                }
                for path in &paths {
                    println!("deleted {}", path.store_path);
                }
                println!("deleted {} NAR(s)", nars.len());
                Ok(())
            }
        }
    });
    match outcome {
        Ok(()) => exit::SUCCESS,
        Err((code, message, hint)) => super::fail(code, &message, hint.as_deref()),
    }
}

fn pin(meta: &dyn Metadata, command: PinCommand) -> AdminResult {
    match command {
        PinCommand::List { repo } => {
            if let Some(name) = &repo {
                require_repo(meta, name)?;
            }
            println!("REPOSITORY\tPIN\tREVISION\tCREATED\tKEEP\tPATHS");
            for pin in meta.pins(repo.as_deref()).map_err(internal)? {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    pin.repo,
                    pin.name,
                    pin.revision,
                    pin.created_at,
                    pin.keep.map_or("all".to_string(), |k| k.to_string()),
                    pin.store_paths.join(" ")
                );
            }
            Ok(())
        }
        PinCommand::Delete {
            repo,
            name,
            revision,
        } => {
            require_repo(meta, &repo)?;
            let removed = meta.delete_pin(&repo, &name, revision).map_err(internal)?;
            if removed == 0 {
                return Err((
                    exit::USAGE,
                    match revision {
                        Some(r) => {
                            format!("pin '{name}' of repository '{repo}' has no revision {r}")
                        }
                        None => format!("repository '{repo}' has no pin named '{name}'"),
                    },
                    Some(format!(
                        "`stowix admin pin list --repo {repo}` shows the pins"
                    )),
                ));
            }
            eprintln!("deleted {removed} revision(s) of pin '{name}'");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_their_units_only() {
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("12h"), Some(43_200));
        assert_eq!(parse_duration("30d"), Some(2_592_000));
        for bad in ["30", "d", "0d", "3x", "-1d", "1.5d", ""] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_size("200GiB"), Some(200 << 30));
        assert_eq!(parse_size("1B"), Some(1));
        assert_eq!(parse_size("2TiB"), Some(2 << 40));
        for bad in ["200", "200GB", "0MiB", "99999999999TiB", "GiB"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(format_duration(2_592_000), "30d");
        assert_eq!(format_duration(90), "90s");
    }
}
