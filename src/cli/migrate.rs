//! `stowix admin migrate --from-data-dir DIR`: the command line of `server::migrate`, its
//! progress lines (stderr) and its summary (stdout), and the mapping from its errors to exit
//! codes.

use std::cell::Cell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::exit;
use crate::server::config::ServerConfig;
use crate::server::migrate::{self, MigrateError, Reporter, Summary, Tally};

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Data dir of the embedded installation to copy from (its stowix.db and store/). It is
    /// only read; its server may run, but what it stores after the copy is not copied.
    #[arg(long, value_name = "DIR")]
    pub from_data_dir: PathBuf,
}

pub fn run(config: &ServerConfig, args: MigrateArgs) -> i32 {
    let mut config = config.clone();
    // One command, one connection.
    config.metadata_readers = 0;
    let (source, target) = match migrate::prepare(&config, &args.from_data_dir) {
        Ok(opened) => opened,
        Err(err) => return failed(&err),
    };
    eprintln!(
        "migrating {} into {}",
        source.data_dir.display(),
        target.label
    );
    let reporter = Lines::default();
    match migrate::run(&source, &target, &reporter) {
        Ok(summary) => {
            print_summary(&summary);
            if summary.failed() > 0 {
                exit::PARTIAL
            } else {
                exit::SUCCESS
            }
        }
        Err(err) => failed(&err),
    }
}

fn failed(err: &MigrateError) -> i32 {
    let (code, hint) = match err {
        MigrateError::Usage(_) => (exit::USAGE, None),
        MigrateError::NoSource { .. } => (
            exit::NO_SOURCE,
            Some("--from-data-dir names the embedded server's --data-dir (the directory holding stowix.db and store/)".to_string()),
        ),
        MigrateError::NotEmbedded { .. } => (
            exit::NOT_EMBEDDED,
            Some("--from-data-dir names the embedded server's --data-dir (the directory holding stowix.db and store/)".to_string()),
        ),
        MigrateError::SourceSchema {
            dir,
            found,
            supported,
        } => (
            exit::NOT_EMBEDDED,
            Some(if found > supported {
                "upgrade this stowix to the version that last ran on the source".to_string()
            } else {
                format!(
                    "run `stowix admin --data-dir {} db migrate` first (or start its server once)",
                    dir.display()
                )
            }),
        ),
        MigrateError::SameAsTarget(_) => (
            exit::SAME_AS_TARGET,
            Some("give the new backends as --database and --storage".to_string()),
        ),
        MigrateError::Unreachable(_) => (
            exit::UNREACHABLE,
            Some("check --database, --storage, --s3-endpoint and the AWS_* credentials; nothing was copied past this point, rerun when it answers".to_string()),
        ),
        MigrateError::Conflict(_) => (exit::CONFLICT, None),
        MigrateError::Source(_) | MigrateError::Target(_) => (
            exit::FAILURE,
            Some("what was copied stays; rerun to go on from there".to_string()),
        ),
    };
    super::fail(code, &err.to_string(), hint.as_deref())
}

/// Progress as plain lines on stderr: one a second while a kind is being copied, and one when
/// it is done: readable in a terminal and in a log alike.
struct Lines {
    /// The last line printed (or the start): the next waits [`PROGRESS_EVERY`] from here.
    last: Cell<Instant>,
}

impl Default for Lines {
    fn default() -> Self {
        Lines {
            last: Cell::new(Instant::now()),
        }
    }
}

/// How often a progress line may be printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Reporter for Lines {
    fn progress(&self, kind: &str, tally: &Tally) {
        let now = Instant::now();
        if now.duration_since(self.last.get()) < PROGRESS_EVERY {
            return;
        }
        self.last.set(now);
        eprintln!("  {kind}: {} ...", counts(tally));
    }

    fn done(&self, kind: &str, tally: &Tally) {
        self.last.set(Instant::now());
        eprintln!("  {kind}: {}", counts(tally));
    }
}

fn counts(tally: &Tally) -> String {
    let mut text = format!("{} copied", tally.copied);
    if tally.bytes > 0 {
        text.push_str(&format!(" ({})", indicatif::HumanBytes(tally.bytes)));
    }
    text.push_str(&format!(", {} already there", tally.present));
    if tally.failed > 0 {
        text.push_str(&format!(", {} failed", tally.failed));
    }
    text
}

fn print_summary(summary: &Summary) {
    for (kind, tally) in &summary.kinds {
        println!("{kind:<16} {}", counts(tally));
    }
    let bytes: u64 = summary.kinds.iter().map(|(_, t)| t.bytes).sum();
    if summary.copied() == 0 && summary.failed() == 0 {
        println!("nothing to copy: the target already holds everything");
    } else {
        println!(
            "copied {} items, {} of objects",
            summary.copied(),
            indicatif::HumanBytes(bytes)
        );
    }
    if summary.unfinished_uploads > 0 {
        println!(
            "not migrated: {} unfinished chunked upload(s); their clients push those paths again",
            summary.unfinished_uploads
        );
    }
    for (kind, tally) in &summary.kinds {
        for failure in &tally.failures {
            println!("failed ({kind}): {failure}");
        }
        let unlisted = tally.failed - tally.failures.len() as u64;
        if unlisted > 0 {
            println!("failed ({kind}): {unlisted} more");
        }
    }
}
