//! The scale-out backends going away under a push, with real components: a PostgreSQL of this
//! test's own restarted mid-push, and a SeaweedFS of this test's own stopped for 20 s mid-push.
//! Either way the push rides the outage out (the server answers 503 with Retry-After, and
//! `GET api/v1/info`, which the client probes while it pauses, answers 503 until both
//! backends answer again), and real Nix then substitutes the closure with signatures.
//!
//! ```text
//!   stowix nix push --max-upload-rate ──► stowix serve ──┬─► PostgreSQL (private, port P)  restart
//!        pauses on 503, probes info, resumes             └─► SeaweedFS (private, port S)    stop 20 s
//! ```
//! These tests start their own services whatever `STOWIX_TEST_BACKEND` says: they stop them,
//! and the machine's shared PostgreSQL on 5432 must never be restarted (other tests use it).

mod common;
mod push_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::s3::S3Server;
use common::TestServer;
use push_common::{finished, push_command};
use stowix::cli::exit;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of this test's own (`initdb` into a temporary directory, trust
/// authentication, loopback on a free port), stopped and deleted on drop.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> Self {
        let initdb = Path::new(PG_BIN).join("initdb");
        assert!(
            initdb.exists(),
            "{} is missing: run scripts/install-prerequisites.sh (Debian's postgresql)",
            initdb.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("stowix-pg-")
            .tempdir()
            .expect("create PostgreSQL temp dir");
        // PostgreSQL refuses to run as root: the cluster belongs to `postgres` then.
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres {}", dir.path().display());
        }
        let data = dir.path().join("data");
        let out = as_postgres(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = PrivatePostgres {
            dir,
            port: common::backends::free_port(),
        };
        pg.pg_ctl_start();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl_start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let out = as_postgres(&Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-o", &options, "-w", "-t", "30", "start"])
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Stops the server the way an administrator's restart does (`-m fast`: every session
    /// is terminated).
    fn stop(&self) {
        let out = as_postgres(&Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .output()
            .expect("run pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program`, as the `postgres` user when this process is root.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

struct Setup {
    server: TestServer,
    url: String,
    token: String,
    public_key: String,
}

fn serve(database_url: &str, s3: &S3Server) -> Setup {
    // The database through the environment, so `stowix admin` (repositories, tokens) uses it too.
    let mut env = s3.env();
    env.push(("STOWIX_DATABASE_URL".into(), database_url.into()));
    let server = TestServer::start_with_env(&s3.config_toml(), env);
    let repo = common::unique_name("outage");
    let public_key = server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    Setup {
        url: server.repo_url(&repo),
        server,
        token,
        public_key,
    }
}

/// A closure of three 6 MiB random files (incompressible) and a path using them: at 2 MiB/s
/// the push is mid-flight for several seconds.
fn closure() -> String {
    let mut drvs = Vec::new();
    for i in 0..3 {
        drvs.push(common::Drv::new(
            &format!("outage-{i}"),
            "/usr/bin/head -c 6291456 /dev/urandom > $out",
        ));
    }
    drvs.push(common::Drv::new("outage-top", "echo $dep0 $dep1 $dep2 > $out").deps(&[0, 1, 2]));
    common::build_derivations(&drvs).pop().unwrap()
}

/// Starts the push and waits until the server received `bytes` of it.
async fn push_until(setup: &Setup, top: &str, bytes: f64) -> std::process::Child {
    let mut child = push_command(
        &setup.url,
        Some(&setup.token),
        &["--max-upload-rate", "2MiB", top],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while setup
        .server
        .metric("stowix_server_upload_received_bytes_total")
        .await
        < bytes
    {
        assert!(Instant::now() < deadline, "the upload never started");
        if child.try_wait().unwrap().is_some() {
            let pushed = finished(child.wait_with_output().unwrap());
            panic!("the push ended before the outage:\n{}", pushed.stderr);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restarted_mid_push_is_ridden_out() {
    common::require_nix();
    let pg = PrivatePostgres::start();
    let s3 = S3Server::start();
    let setup = serve(&pg.url(), &s3);
    let top = closure();
    let child = push_until(&setup, &top, (4 << 20) as f64).await;

    // Down for 3 s, as a restart with a checkpoint is: the pool's connections all die.
    pg.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.pg_ctl_start();

    let pushed = finished(child.wait_with_output().unwrap());
    pushed.assert_code(exit::SUCCESS);
    assert!(
        pushed.stderr.contains("pausing the push"),
        "the push never noticed the restart:\n{}",
        pushed.stderr
    );
    let errors = setup
        .server
        .metric("stowix_server_database_errors_total")
        .await;
    assert!(errors > 0.0, "no database call failed during the restart");
    common::nix_copy_from(&setup.url, &setup.public_key, &[top], None)
        .unwrap_or_else(|e| panic!("nix copy --from after the restart failed: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_unreachable_for_20_s_mid_push_is_ridden_out() {
    common::require_nix();
    let database = common::backends::TestDatabase::create();
    // A store of this test's own: it is stopped (SIGKILL, so connections are refused as for a
    // store restarting or partitioned away) and started again on the same ports and data.
    let mut s3 = S3Server::start_local();
    let setup = serve(database.url(), &s3);
    let top = closure();
    let child = push_until(&setup, &top, (4 << 20) as f64).await;

    s3.stop();
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    s3.restart();
    let outage = stopped.elapsed();

    let pushed = finished(child.wait_with_output().unwrap());
    pushed.assert_code(exit::SUCCESS);
    assert!(
        pushed.stderr.contains("pausing the push") && pushed.stderr.contains("resuming"),
        "the push never paused for the {outage:?} outage:\n{}",
        pushed.stderr
    );
    let errors = setup
        .server
        .metric("stowix_server_storage_errors_total")
        .await;
    assert!(
        errors > 0.0,
        "no object-store call failed during the outage"
    );
    common::nix_copy_from(&setup.url, &setup.public_key, &[top], None)
        .unwrap_or_else(|e| panic!("nix copy --from after the outage failed: {e}"));
}
