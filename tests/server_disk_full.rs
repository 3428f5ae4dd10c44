//! A server whose disk fills up answers `507 insufficient_storage`, and `stowix nix push`
//! treats that as fatal for the run (issue 9: "disk full on the server"): it stops at once,
//! says so once and exits 7; once space is freed, the re-run completes.
//!
//! The full disk is real: a 2 MiB tmpfs mounted over the server's staging directories
//! (`<data>/tmp` for single-request uploads, `<data>/uploads` for chunked ones) after it has
//! started, so every staged byte past 2 MiB fails with ENOSPC inside the real server.

mod common;
mod push_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use push_common::Fixture;
use stowix::cli::exit;

/// tmpfs mounts over existing directories, lazily unmounted on drop (the server may still
/// hold a file open there), which brings the original directories back.
struct Tmpfs {
    mounted: Vec<PathBuf>,
}

impl Tmpfs {
    fn over(dirs: &[PathBuf], size: &str) -> Self {
        let mut mounted = Vec::new();
        for dir in dirs {
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir)
                .status()
                .expect("run mount");
            assert!(
                status.success(),
                "cannot mount a tmpfs over {}: this test needs root (it runs as root in CI) to \
                 give the server a disk that really fills up",
                dir.display()
            );
            mounted.push(dir.clone());
        }
        Tmpfs { mounted }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for dir in self.mounted.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&dir).status();
        }
    }
}

fn staging_dirs(data: &Path) -> Vec<PathBuf> {
    vec![data.join("tmp"), data.join("uploads")]
}

fn error_lines(stderr: &str) -> usize {
    stderr.lines().filter(|l| l.starts_with("error:")).count()
}

#[test]
fn a_full_disk_stops_the_push_with_exit_7_and_the_rerun_completes() {
    let fx = Fixture::new();
    // Incompressible, so each compressed NAR is ~3 MiB, over what the 2 MiB tmpfs holds.
    let paths: Vec<String> = (0..3)
        .map(|i| common::build_random(&format!("full-{i}"), 3 << 20))
        .collect();
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();

    for (case, chunk_size) in [("single request", None), ("chunked", Some("1048576"))] {
        let full = Tmpfs::over(&staging_dirs(fx.server.data_dir()), "2m");
        let mut envs = vec![("STOWIX_RETRY_BASE_DELAY_MS", "1")];
        if let Some(size) = chunk_size {
            envs.push(("STOWIX_CHUNK_SIZE", size));
        }
        // Bounded: a push that cannot stop must fail the test, not hang the suite.
        let run = push_common::push_within(
            &fx.url,
            Some(&fx.token),
            &args,
            &envs,
            Duration::from_secs(60),
        );
        assert_eq!(
            run.code,
            exit::SERVER_FULL,
            "{case}: a full server disk must end the run with exit 7\n{}",
            run.stderr
        );
        assert_eq!(
            error_lines(&run.stderr),
            1,
            "{case}: one error line\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("storage is full"),
            "{case}: the error names the cause\n{}",
            run.stderr
        );
        let log = fx.server.log_text();
        assert!(
            log.contains("storage full"),
            "{case}: the server logs the full disk\n{log}"
        );
        drop(full);
    }

    // Space freed: the same command now pushes everything, and Nix substitutes it.
    let rerun = push_common::push_with(&fx.url, Some(&fx.token), &args, &[]);
    assert_eq!(rerun.code, exit::SUCCESS, "{}", rerun.stderr);
    fx.substitute(&paths);
}
