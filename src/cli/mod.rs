//! Command line: clap definitions, one file per command, and the mapping from errors to
//! exit codes. `main.rs` only calls [`run`].

pub mod admin;
pub mod exit;
mod migrate;
pub mod pin;
pub mod push;
pub mod serve;
pub mod watch;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "stowix",
    version,
    about = "Push Nix closures to a Stowix binary cache, and serve one"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Nix commands.
    Nix {
        #[command(subcommand)]
        command: NixCommand,
    },
    /// Run a repository server.
    Serve(serve::ServeArgs),
    /// Manage repositories and tokens in a server's data directory.
    Admin(admin::AdminArgs),
}

#[derive(Subcommand, Debug)]
pub enum NixCommand {
    /// Upload store paths and their complete runtime closures to a repository.
    Push(push::PushArgs),
    /// Push every store path that becomes valid in the local Nix store, until stopped.
    WatchStore(watch::WatchStoreArgs),
    /// Run a command and push every store path that becomes valid while it runs.
    WatchExec(watch::WatchExecArgs),
    /// Pin published store paths under a name, so garbage collection keeps their closures.
    Pin(pin::PinArgs),
}

/// Runs the command line and returns the process exit code.
pub fn run() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Nix {
            command: NixCommand::Push(args),
        } => push::run(args),
        Command::Nix {
            command: NixCommand::WatchStore(args),
        } => watch::run_store(args),
        Command::Nix {
            command: NixCommand::WatchExec(args),
        } => watch::run_exec(args),
        Command::Nix {
            command: NixCommand::Pin(args),
        } => pin::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Admin(args) => admin::run(args),
    }
}

/// Logs go to stderr, so stdout stays for what scripts read (keys, tokens, the listen address).
/// `RUST_LOG` overrides `default_level`.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Prints `error: MESSAGE` (and `hint: HINT`) on stderr and returns `code`.
pub fn fail(code: i32, message: &str, hint: Option<&str>) -> i32 {
    eprintln!("error: {message}");
    if let Some(hint) = hint {
        eprintln!("hint: {hint}");
    }
    code
}
