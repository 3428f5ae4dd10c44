//! A chunk is acknowledged only once its bytes are durable.
//!
//! ```text
//!   cc: fsync/fdatasync interposer (.so) ──LD_PRELOAD──► real `stowix serve`
//!        └─ after each successful sync appends "<call> <file size> <file path>" to a log
//!   PATCH chunk ──► answer with offset N ──► the log must already hold a sync of
//!                                            uploads/<id>.part at size N
//! ```
//! A crash test (kill -9, restart, compare offsets) cannot tell a missing fsync apart, since
//! the page cache survives a killed process; watching the sync calls themselves can. The
//! interposer only observes: it calls the real function and records what it synced.
//!
//! This file holds one test, because it sets `LD_PRELOAD` for the processes it starts.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use stowix::api;

const INTERPOSER: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static void note(const char *call, int fd) {
    const char *log = getenv("STOWIX_TEST_SYNC_LOG");
    if (!log) return;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return;
    target[n] = 0;
    struct stat st;
    if (fstat(fd, &st) != 0) return;
    char line[4200];
    int len = snprintf(line, sizeof line, "%s %lld %s\n", call, (long long)st.st_size, target);
    int out = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (out < 0) return;
    if (write(out, line, len) < 0) {}
    close(out);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int r = real(fd);
    if (r == 0) note("fsync", fd);
    return r;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int r = real(fd);
    if (r == 0) note("fdatasync", fd);
    return r;
}
"#;

fn build_interposer(dir: &Path) -> std::path::PathBuf {
    let source = dir.join("sync_log.c");
    let library = dir.join("sync_log.so");
    std::fs::write(&source, INTERPOSER).unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("run cc (a C compiler is needed to build the sync interposer; Cargo's own C builds need one too)");
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    library
}

/// Sizes at which `part` was synced, in order.
fn synced_sizes(log: &Path, part: &str) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ' ');
            let (_call, size, path) = (fields.next()?, fields.next()?, fields.next()?);
            (path == part).then(|| size.parse().ok()).flatten()
        })
        .collect()
}

#[tokio::test]
async fn every_acknowledged_chunk_was_synced_to_disk_first() {
    let tools = tempfile::tempdir().unwrap();
    let library = build_interposer(tools.path());
    let log = tools.path().join("syncs.log");
    // Inherited by the server this test starts (and by nothing else: one test per file).
    std::env::set_var("LD_PRELOAD", &library);
    std::env::set_var("STOWIX_TEST_SYNC_LOG", &log);
    let server = TestServer::start();
    std::env::remove_var("LD_PRELOAD");
    let repo = unique_name("durable");
    server.create_repo(&repo, false);
    let token = server.create_token(&repo, "push");
    let url = server.repo_url(&repo);
    assert!(
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("stowix.db")),
        "the interposer saw no sync of the database: is it loaded? log: {:?}",
        std::fs::read_to_string(&log)
    );

    let path = LocalPath::load(&build_random("durable", 300 << 10));
    let (file, _) = path.xz_upload();
    let state = create_upload(&url, &token, &xz_create_upload(&path)).await;
    let part = server
        .data_dir()
        .join("uploads")
        .join(format!("{}.part", state.upload_id));
    let part = std::fs::canonicalize(part.parent().unwrap())
        .unwrap()
        .join(part.file_name().unwrap());
    let part = part.to_str().unwrap();
    let chunk = 40 << 10;
    let mut offset = 0usize;
    while offset < file.len() {
        let end = (offset + chunk).min(file.len());
        let resp = patch_chunk(
            &url,
            &token,
            &state.upload_id,
            offset as u64,
            file[offset..end].to_vec(),
        )
        .await;
        let answered: api::UploadState = parse_ok(resp, "PATCH").await;
        assert_eq!(answered.offset, end as u64);
        let synced = synced_sizes(&log, part);
        assert!(
            synced.contains(&answered.offset),
            "offset {} was acknowledged, but {part} was synced only at sizes {synced:?}",
            answered.offset
        );
        offset = end;
    }

    // A chunk that breaks off mid-way keeps its bytes, and GET reports them: synced as well.
    let state = create_upload(&url, &token, &{
        let mut create = xz_create_upload(&path);
        create.encoder = "cut".into();
        create
    })
    .await;
    patch_then_drop_connection(
        &url,
        &token,
        &state.upload_id,
        0,
        100 << 10,
        &file[..30 << 10],
    )
    .await;
    let held = settled_upload_state(&url, &token, &state.upload_id)
        .await
        .offset;
    assert!(held > 0, "nothing of the cut chunk was kept");
    let part = Path::new(part).with_file_name(format!("{}.part", state.upload_id));
    // The handler syncs right after the body breaks off; GET does not wait for it, so wait
    // for the sync here (bounded) rather than racing it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let synced = synced_sizes(&log, part.to_str().unwrap());
        if synced.contains(&held) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "GET reports {held} bytes held, but they were synced only at sizes {synced:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
