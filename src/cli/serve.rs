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
    /// Directory for NARs, unfinished uploads and the metadata database
    /// [default: $XDG_DATA_HOME/stowix, or `data_dir` in the config file].
    #[arg(long, env = "STOWIX_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file; `--print-config` shows a commented template.
    #[arg(long, env = "STOWIX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the commented configuration template with the defaults, and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(args: ServeArgs) -> i32 {
    if args.print_config {
        print!("{CONFIG_TEMPLATE}");
        return exit::SUCCESS;
    }
    super::init_logging("info");
    let mut config = match &args.config {
        Some(path) => match ServerConfig::load(path) {
            Ok(config) => config,
            Err(message) => {
                return super::fail(
                    exit::USAGE,
                    &message,
                    Some("run `stowix serve --print-config` for a valid template"),
                )
            }
        },
        None => ServerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
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
