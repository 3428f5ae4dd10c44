//! `stowix serve`: run a repository server.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::exit;
use crate::server::config::{ServerConfig, CONFIG_TEMPLATE};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8380, or `listen` in the config file].
    #[arg(long, env = "STOWIX_LISTEN")]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub backends: BackendArgs,
    /// Print the commented configuration template with the defaults, and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Where the server's state lives: the same flags for `serve` and `admin`, so both open the
/// same backends. Each overrides its key in the config file.
#[derive(clap::Args, Debug)]
pub struct BackendArgs {
    /// TOML configuration file; `stowix serve --print-config` shows a commented template.
    #[arg(long, global = true, env = "STOWIX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for NARs, unfinished uploads and the metadata database
    /// [default: $XDG_DATA_HOME/stowix, or `data_dir` in the config file].
    #[arg(long, global = true, env = "STOWIX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Metadata database: sqlite:///abs/path.db or postgres://user@host:5432/db
    /// [default: <data-dir>/stowix.db].
    #[arg(
        long,
        global = true,
        env = "STOWIX_DATABASE_URL",
        hide_env_values = true
    )]
    pub database: Option<String>,
    /// NAR storage: file:///abs/dir or s3://bucket[/prefix] [default: <data-dir>/store].
    /// S3 credentials come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN.
    #[arg(long, global = true, env = "STOWIX_STORAGE_URL")]
    pub storage: Option<String>,
    /// Endpoint of a self-hosted S3-compatible store, e.g. http://127.0.0.1:8333 [default: AWS].
    #[arg(long, global = true, env = "STOWIX_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: us-east-1].
    #[arg(long, global = true, env = "STOWIX_S3_REGION")]
    pub s3_region: Option<String>,
}

impl BackendArgs {
    /// The config file (or the defaults) with these flags applied; the error is ready to print.
    pub fn load(&self) -> Result<ServerConfig, String> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::load(path)?,
            None => ServerConfig::default(),
        };
        if let Some(data_dir) = &self.data_dir {
            config.data_dir = data_dir.clone();
        }
        if let Some(database) = &self.database {
            config.database = Some(database.clone());
        }
        if let Some(storage) = &self.storage {
            config.storage = Some(storage.clone());
        }
        if let Some(endpoint) = &self.s3_endpoint {
            // An empty value (from an env file) means AWS, as an unset one does.
            config.s3_endpoint = Some(endpoint.clone()).filter(|e| !e.is_empty());
        }
        if let Some(region) = &self.s3_region {
            config.s3_region = region.clone();
        }
        Ok(config)
    }
}

pub fn run(args: ServeArgs) -> i32 {
    if args.print_config {
        print!("{CONFIG_TEMPLATE}");
        return exit::SUCCESS;
    }
    super::init_logging("info");
    let mut config = match args.backends.load() {
        Ok(config) => config,
        Err(message) => {
            return super::fail(
                exit::USAGE,
                &message,
                Some("run `stowix serve --print-config` for a valid template"),
            )
        }
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            return super::fail(
                exit::FAILURE,
                &format!("cannot start the async runtime: {err}"),
                None,
            )
        }
    };
    match runtime.block_on(crate::server::serve(config)) {
        Ok(()) => exit::SUCCESS,
        Err(message) => super::fail(exit::FAILURE, &message, None),
    }
}
