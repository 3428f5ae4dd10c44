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
        AdminCommand::Db { .. } | AdminCommand::Janitor | AdminCommand::Migrate(_) => {
            unreachable!("handled before opening the backends")
        }
    };
    match result {
        Ok(()) => exit::SUCCESS,
        Err((code, message, hint)) => super::fail(code, &message, hint.as_deref()),
    }
}

/// One janitor pass on the configured backends, with a runtime of its own (the janitor talks
/// to the bucket asynchronously).
fn janitor(config: crate::server::config::ServerConfig) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return super::fail(
                exit::FAILURE,
                &format!("cannot start a runtime: {err}"),
                None,
            )
        }
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
        RepoCommand::Configure { name, upstream } => {
            require_repo(meta, &name)?;
            let Some(keys) = upstream.keys()? else {
                return Err((
                    exit::USAGE,
                    "nothing to configure".into(),
                    Some("give --upstream-key KEY (repeatable) or --no-upstream-keys".into()),
                ));
            };
            if !meta.set_upstream_keys(&name, &keys).map_err(internal)? {
                return Err((exit::USAGE, format!("no repository named '{name}'"), None));
            }
            eprintln!("repository '{name}': {} upstream key(s)", keys.len());
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
