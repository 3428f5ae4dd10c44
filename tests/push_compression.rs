//! `--compression xz|zstd|none` and `--compression-level` end to end: the real binary pushes
//! to a real server, the narinfos and files say what was chosen, real `nix copy --from`
//! substitutes the result with signatures required, and a killed zstd push resumes (which
//! needs the encoder to regenerate identical bytes, whatever the number of threads).

mod common;
mod push_common;

use std::time::{Duration, Instant};

use push_common::{finished, push_command, push_with, Fixture};
use stowix::cli::exit;

/// Fetches the narinfo and NAR file of every path in `closure` and checks both against the
/// local store: the narinfo's `Compression` and file suffix, and that the file decodes
/// (`decode`) to exactly the NAR `nix-store --dump` writes.
async fn assert_stored_as(
    repo_url: &str,
    closure: &[String],
    compression: &str,
    suffix: &str,
    decode: fn(&[u8]) -> Vec<u8>,
) {
    for path in closure {
        let (status, narinfo) = common::get_narinfo(repo_url, common::hash_part(path)).await;
        assert_eq!(status, 200, "narinfo of {path}: {narinfo}");
        assert_eq!(
            common::narinfo_field(&narinfo, "Compression"),
            Some(compression),
            "{narinfo}"
        );
        let url = common::narinfo_field(&narinfo, "URL").unwrap();
        assert!(url.ends_with(suffix), "{narinfo}");
        let response = common::http()
            .get(format!("{repo_url}/{url}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "GET {url}");
        let file = response.bytes().await.unwrap();
        assert_eq!(
            common::narinfo_field(&narinfo, "FileSize"),
            Some(file.len().to_string().as_str())
        );
        let nar = common::nix_store_dump(std::path::Path::new(path));
        assert!(
            decode(&file) == nar,
            "{path}: the {compression} file is not its NAR"
        );
    }
}

fn unzstd(file: &[u8]) -> Vec<u8> {
    // Also checks the frame's content checksum.
    zstd::stream::decode_all(file).expect("a valid zstd file")
}

fn plain(file: &[u8]) -> Vec<u8> {
    file.to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_and_none_are_stored_as_such_and_substitute_with_signatures() {
    let fx = Fixture::new();
    let closure = common::realistic_closure();
    let root = closure.last().unwrap().clone();
    let all = common::closure_of(std::slice::from_ref(&root));

    fx.push(&["--compression", "zstd", &root])
        .assert_code(exit::SUCCESS);
    assert_stored_as(&fx.url, &all, "zstd", ".nar.zst", unzstd).await;
    fx.substitute(std::slice::from_ref(&root));

    // `none` from the environment, into a second repository.
    let other = common::unique_name("none");
    let other_key = fx.server.create_repo(&other, false);
    let other_token = fx.server.create_token(&other, "push");
    let other_url = fx.server.repo_url(&other);
    push_with(
        &other_url,
        Some(&other_token),
        &[&root],
        &[("STOWIX_COMPRESSION", "none")],
    )
    .assert_code(exit::SUCCESS);
    assert_stored_as(&other_url, &all, "none", ".nar", plain).await;
    common::nix_copy_from(&other_url, &other_key, std::slice::from_ref(&root), None)
        .unwrap_or_else(|e| panic!("nix copy --from the uncompressed repository: {e}"));
}

/// zstd NARs on every encoder plan through the chunked, resumable upload: one compressed whole
/// (under 1 MiB), one streamed, and one large enough for the multithreaded encoder.
#[tokio::test(flavor = "multi_thread")]
async fn zstd_nars_larger_than_the_chunk_size_go_up_in_chunks() {
    let fx = Fixture::new();
    let built = common::build_derivations(&[
        common::Drv::new("whole", "/usr/bin/head -c 716800 /dev/urandom > $out"),
        common::Drv::new("stream", "/usr/bin/head -c 1572864 /dev/urandom > $out"),
        // Level 1 works in 2 MiB jobs: 5 MiB of text (compressible) spans three.
        common::Drv::new(
            "multi",
            "/usr/bin/seq 1 700000 | /usr/bin/head -c 5242880 > $out",
        ),
        common::Drv::new("top", "echo $dep0 $dep1 $dep2 > $out").deps(&[0, 1, 2]),
    ]);
    let top = built[3].clone();
    push_with(
        &fx.url,
        Some(&fx.token),
        &["--compression", "zstd", "--compression-level", "1", &top],
        &[("STOWIX_CHUNK_SIZE", "65536")],
    )
    .assert_code(exit::SUCCESS);
    let patches = fx
        .server
        .metric("stowix_server_http_requests_total{route=\"/{repo}/api/v1/uploads/{id}\"}")
        .await;
    assert!(patches >= 30.0, "PATCH count {patches}");
    assert_stored_as(&fx.url, &built, "zstd", ".nar.zst", unzstd).await;
    fx.substitute(&[top]);
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_zstd_push_resumes_with_other_thread_counts() {
    const CHUNK: u64 = 256 * 1024;
    let fx = Fixture::new();
    // 8 MiB of the host's programs at level 1: the multithreaded plan (2 MiB jobs), ~3 MiB
    // compressed, a dozen chunks. Real code, so how the NAR is cut into jobs shows in the
    // output (random bytes would give the same raw blocks whatever the cut).
    let mut built = common::build_derivations(&[
        common::Drv::new(
            "big",
            "/bin/cat /usr/bin/* 2>/dev/null | /usr/bin/head -c 8388608 > $out",
        ),
        common::Drv::new("needs-big", "echo $dep0 > $out").deps(&[0]),
    ]);
    let top = built.pop().unwrap();
    let big = built.pop().unwrap();
    let chunk = CHUNK.to_string();
    let zstd = ["--compression", "zstd", "--compression-level", "1"];

    let mut args = zstd.to_vec();
    args.extend([
        "--compression-threads",
        "2",
        "--max-upload-rate",
        "512KiB",
        &top,
    ]);
    let mut child = push_command(&fx.url, Some(&fx.token), &args)
        .env("STOWIX_CHUNK_SIZE", &chunk)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fx.received_bytes().await < 3.0 * CHUNK as f64 {
        assert!(Instant::now() < deadline, "the upload never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the push ended before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = fx.received_bytes().await;
    assert_eq!(
        common::get_narinfo(&fx.url, common::hash_part(&big))
            .await
            .0,
        404,
        "the kill interrupted nothing"
    );

    // One thread now: the multithreaded encoder's bytes must not depend on it.
    let mut args = zstd.to_vec();
    args.extend(["--compression-threads", "1", "--verbose", &top]);
    let mut cmd = push_command(&fx.url, Some(&fx.token), &args);
    cmd.env("STOWIX_CHUNK_SIZE", &chunk);
    let rerun = finished(cmd.output().unwrap());
    rerun.assert_code(exit::SUCCESS);
    let after = fx.received_bytes().await;

    let (_, narinfo) = common::get_narinfo(&fx.url, common::hash_part(&big)).await;
    let file_size: f64 = common::narinfo_field(&narinfo, "FileSize")
        .unwrap()
        .parse()
        .unwrap();
    println!(
        "received {before} bytes before the kill, {after} in all, for a {file_size}-byte file"
    );
    assert!(
        after - before < file_size - 2.0 * CHUNK as f64,
        "the re-run started over (first run: {before} bytes, in all {after}, file {file_size})\n{}",
        rerun.stderr
    );
    assert!(
        after <= file_size + 4096.0 + CHUNK as f64,
        "received {after} bytes in total for a {file_size}-byte file\n{}",
        rerun.stderr
    );
    assert_stored_as(&fx.url, &[big], "zstd", ".nar.zst", unzstd).await;
    fx.substitute(&[top]);
}

/// Each method's levels, checked before anything else: exit 2 and one line naming the flag and
/// the valid range.
#[test]
fn out_of_range_levels_and_unknown_methods_are_usage_errors() {
    let cases: [(&[&str], &str); 6] = [
        (&["--compression-level", "10"], "0 to 9"),
        (
            &["--compression", "zstd", "--compression-level", "20"],
            "1 to 19",
        ),
        (
            &["--compression", "zstd", "--compression-level", "0"],
            "1 to 19",
        ),
        (
            &["--compression", "zstd", "--compression-level", "-3"],
            "1 to 19",
        ),
        (
            &["--compression", "none", "--compression-level", "3"],
            "takes no level",
        ),
        (&["--compression", "lz4"], "xz, zstd or none"),
    ];
    for (args, expected) in cases {
        let mut all = args.to_vec();
        all.push("/nix/store/00000000000000000000000000000000-x");
        let pushed = finished(
            push_command("http://127.0.0.1:9/repo", Some("stx_live_x"), &all)
                .output()
                .unwrap(),
        );
        assert_eq!(pushed.code, exit::USAGE, "{args:?}: {}", pushed.stderr);
        assert!(
            pushed.stderr.contains(expected) && pushed.stderr.contains("--compression"),
            "{args:?}: {}",
            pushed.stderr
        );
        if args.len() > 2 || args[0] == "--compression-level" {
            assert_eq!(pushed.stderr.trim().lines().count(), 1, "{}", pushed.stderr);
        }
    }
    // The environment variable is checked the same way.
    let pushed = finished(
        push_command(
            "http://127.0.0.1:9/repo",
            Some("stx_live_x"),
            &["/nix/store/00000000000000000000000000000000-x"],
        )
        .env("STOWIX_COMPRESSION", "zstd")
        .env("STOWIX_COMPRESSION_LEVEL", "22")
        .output()
        .unwrap(),
    );
    assert_eq!(pushed.code, exit::USAGE, "{}", pushed.stderr);
    assert!(pushed.stderr.contains("1 to 19"), "{}", pushed.stderr);
}
