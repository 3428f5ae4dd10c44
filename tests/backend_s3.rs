//! The server on S3-compatible storage (a real SeaweedFS, see `tests/common/s3.rs`): chunked
//! uploads as S3 multipart uploads, resumed across a server crash, chunks of any size merged
//! into parts through tail objects; verification of the object
//! read back from the bucket; Nix substituting through the server and through presigned
//! redirects; and the janitor removing what no database row knows, and nothing that a push in
//! flight still needs.

mod common;
mod push_common;

use std::time::{Duration, Instant};

use common::s3::S3Server;
use common::TestServer;
use push_common::{finished, push_command};
use stowix::api;
use stowix::cli::exit;

/// S3's smallest part: the server's chunk size here, so a NAR of a few parts stays small.
const PART: u64 = 5 << 20;

/// A server whose NARs live under this test's prefix of `s3`, with 5 MiB chunks.
fn s3_server(s3: &S3Server, extra: &str) -> TestServer {
    let toml = format!("{}max_chunk_bytes = {PART}\n{extra}", s3.config_toml());
    TestServer::start_with_env(&toml, s3.env())
}

struct Repo {
    name: String,
    url: String,
    public_key: String,
    token: String,
}

fn repo(server: &TestServer, private: bool) -> Repo {
    let name = common::unique_name("s3");
    let public_key = server.create_repo(&name, private);
    let token = server.create_token(&name, "push");
    Repo {
        url: server.repo_url(&name),
        name,
        public_key,
        token,
    }
}

/// Bytes the current server process received (the counter restarts with the process).
async fn received(server: &TestServer) -> f64 {
    server
        .metric("stowix_server_upload_received_bytes_total")
        .await
}

/// The keys of a repository's objects in the bucket, split into assembled uploads and NARs
/// stored whole.
async fn objects(s3: &S3Server, repo: &str) -> (Vec<String>, Vec<String>) {
    let keys = s3.keys().await;
    let uploads = keys
        .iter()
        .filter(|k| k.starts_with(&format!("{repo}/uploads/")))
        .cloned()
        .collect();
    let nars = keys
        .iter()
        .filter(|k| k.starts_with(&format!("{repo}/nar/")))
        .cloned()
        .collect();
    (uploads, nars)
}

#[tokio::test(flavor = "multi_thread")]
async fn push_resumes_after_a_server_crash_and_nix_substitutes_from_the_bucket() {
    common::require_nix();
    let s3 = S3Server::start();
    let mut server = s3_server(&s3, "");
    let repo = repo(&server, false);
    // Random bytes do not compress: the xz file is ~13 MiB, three parts of 5 MiB.
    let mut built = common::build_derivations(&[
        common::Drv::new("big", "/usr/bin/head -c 13631488 /dev/urandom > $out"),
        common::Drv::new("needs-big", "echo $dep0 > $out").deps(&[0]),
    ]);
    let top = built.pop().unwrap();
    let big = built.pop().unwrap();

    // 2 MiB/s: the big NAR takes ~7 s, so the crash lands after its first part.
    let mut first = push_command(
        &repo.url,
        Some(&repo.token),
        &["--max-upload-rate", "2MiB", &top],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received(&server).await < (PART + (1 << 20)) as f64 {
        assert!(Instant::now() < deadline, "the upload never started");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the push ended before the server could be killed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();
    first.kill().unwrap();
    first.wait().unwrap();
    server.restart();
    let url = server.repo_url(&repo.name);
    assert_eq!(
        common::get_narinfo(&url, common::hash_part(&big)).await.0,
        404,
        "nothing of the interrupted NAR may be published"
    );

    let rerun = finished(
        push_command(&url, Some(&repo.token), &["--verbose", &top])
            .output()
            .unwrap(),
    );
    rerun.assert_code(exit::SUCCESS);
    let (status, narinfo) = common::get_narinfo(&url, common::hash_part(&big)).await;
    assert_eq!(status, 200, "{}", rerun.stderr);
    let file_size: u64 = common::narinfo_field(&narinfo, "FileSize")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        file_size > 2 * PART,
        "the NAR must span more than two parts: {file_size} bytes"
    );
    // The part stored before the crash was not sent again.
    let resent = received(&server).await;
    assert!(
        resent <= (file_size - PART) as f64 + 1024.0,
        "the re-run sent {resent} bytes of a {file_size}-byte NAR whose first part was stored\n{}",
        rerun.stderr
    );
    // The narinfo names the NAR by its file hash; its bytes are the assembled upload object.
    let url_field = common::narinfo_field(&narinfo, "URL").unwrap();
    assert!(url_field.starts_with("nar/") && url_field.ends_with(".nar.xz"));
    let (uploads, nars) = objects(&s3, &repo.name).await;
    assert_eq!(uploads.len(), 1, "one assembled upload: {uploads:?}");
    assert_eq!(nars.len(), 1, "the small NAR is stored whole: {nars:?}");

    common::nix_copy_from(&url, &repo.public_key, &[top], None)
        .unwrap_or_else(|e| panic!("nix copy --from through the server failed: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_hash_mismatch_is_refused_and_leaves_nothing_behind() {
    common::require_nix();
    let s3 = S3Server::start();
    let server = s3_server(&s3, "");
    let repo = repo(&server, false);
    let path = common::LocalPath::load(&common::build_random("mismatch", 11 << 20));
    let (file, params) = path.xz_upload();
    let state =
        common::create_upload(&repo.url, &repo.token, &common::xz_create_upload(&path)).await;
    common::patch_rest(
        &repo.url,
        &repo.token,
        &state.upload_id,
        &file,
        0,
        PART as usize,
    )
    .await;
    let wrong = common::sha256_nix32(b"not the file");
    let resp = common::complete_upload(
        &repo.url,
        &repo.token,
        &state.upload_id,
        &api::CompleteUpload {
            file_hash: wrong,
            file_size: params.file_size,
        },
    )
    .await;
    let (status, error) = common::api_error(resp).await;
    assert_eq!(status, 422);
    assert_eq!(
        error.code,
        api::codes::FILE_HASH_MISMATCH,
        "{}",
        error.message
    );

    let presence = common::presence(&repo.url, &repo.token, &[&path]).await;
    assert_eq!(
        presence.missing,
        vec![path.hash.clone()],
        "no NAR may be recorded"
    );
    assert_eq!(
        common::get_upload_raw(&repo.url, &repo.token, &state.upload_id)
            .await
            .status(),
        404,
        "the refused upload is discarded"
    );
    assert_eq!(
        s3.keys().await,
        Vec::<String>::new(),
        "the assembled object is deleted"
    );

    // The same bytes with the right hash go through.
    let state =
        common::create_upload(&repo.url, &repo.token, &common::xz_create_upload(&path)).await;
    common::patch_rest(
        &repo.url,
        &repo.token,
        &state.upload_id,
        &file,
        0,
        PART as usize,
    )
    .await;
    let resp = common::complete_upload(
        &repo.url,
        &repo.token,
        &state.upload_id,
        &api::CompleteUpload {
            file_hash: params.file_hash.clone(),
            file_size: params.file_size,
        },
    )
    .await;
    let stored: api::NarStored = common::parse_ok(resp, "complete").await;
    assert_eq!(stored.file_size, params.file_size);
}

/// The tail objects in the bucket (bytes waiting to become an S3 part).
async fn tails(s3: &S3Server) -> Vec<String> {
    s3.keys()
        .await
        .into_iter()
        .filter(|k| k.contains(".tail-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_of_any_size_merge_into_parts_and_the_janitor_keeps_only_the_current_tail() {
    common::require_nix();
    let s3 = S3Server::start();
    // A grace of zero: a superseded tail is garbage as soon as the janitor looks.
    let server = s3_server(&s3, "orphan_grace_secs = 0\n");
    let repo = repo(&server, false);
    let built = common::build_random("merge", 12 << 20);
    let path = common::LocalPath::load(&built);
    let (file, params) = path.xz_upload();
    let state =
        common::create_upload(&repo.url, &repo.token, &common::xz_create_upload(&path)).await;
    let db = rusqlite::Connection::open(server.data_dir().join("stowix.db")).unwrap();
    let sizes = [
        1 << 20,
        300 << 10,
        3 << 20,
        2 << 20,
        64 << 10,
        PART as usize,
    ];
    let mut offset = 0usize;
    let mut planted = None;
    for size in sizes.iter().cycle() {
        if offset == file.len() {
            break;
        }
        let end = (offset + size).min(file.len());
        let resp = common::patch_chunk(
            &repo.url,
            &repo.token,
            &state.upload_id,
            offset as u64,
            file[offset..end].to_vec(),
        )
        .await;
        let answer: api::UploadState = common::parse_ok(resp, "PATCH").await;
        assert_eq!(answer.offset, end as u64, "every chunk is taken whole");
        offset = end;
        let parts: Vec<(u64, String)> = db
            .prepare("SELECT size, etag FROM upload_parts WHERE upload_id = ?1 ORDER BY number")
            .unwrap()
            .query_map([&state.upload_id], |row| {
                Ok((row.get::<_, i64>(0)? as u64, row.get(1)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(parts.iter().map(|p| p.0).sum::<u64>(), offset as u64);
        let (last, whole) = parts.split_last().unwrap();
        assert!(
            whole.iter().all(|(size, _)| *size >= PART),
            "every part but the last is at least 5 MiB: {parts:?}"
        );
        let current = tails(&s3).await;
        if last.0 < PART {
            assert_eq!(current.len(), 1, "one tail waits: {current:?}");
            assert!(last.1.ends_with(&current[0]), "{parts:?} {current:?}");
        } else {
            assert_eq!(current, Vec::<String>::new(), "no tail at a part boundary");
        }
        // Midway, a superseded tail such as a replica killed before deleting it leaves: the
        // janitor deletes it and keeps the upload's current tail.
        if planted.is_none() && offset > 6 << 20 && last.0 < PART {
            let stale = format!(
                "{}/uploads/{}.tail-00000000deadbeef",
                repo.name, state.upload_id
            );
            let client = s3.client();
            let stale_path = object_store::path::Path::from(format!("{}/{stale}", s3.prefix()));
            object_store::ObjectStoreExt::put(&*client, &stale_path, vec![7u8; 10].into())
                .await
                .unwrap();
            // Object ages are whole seconds: let this one be older than a grace of zero.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            server.admin_with_config(&["janitor"]);
            assert_eq!(tails(&s3).await, current, "only the stale tail is deleted");
            planted = Some(stale);
        }
    }
    assert!(planted.is_some(), "the janitor ran while a tail waited");
    let resp = common::complete_upload(
        &repo.url,
        &repo.token,
        &state.upload_id,
        &api::CompleteUpload {
            file_hash: params.file_hash.clone(),
            file_size: params.file_size,
        },
    )
    .await;
    let stored: api::NarStored = common::parse_ok(resp, "complete").await;
    assert_eq!(stored.file_size, file.len() as u64);
    assert_eq!(
        tails(&s3).await,
        Vec::<String>::new(),
        "completion deletes the tail"
    );
    let intents: i64 = db
        .query_row("SELECT COUNT(*) FROM object_intents", [], |row| row.get(0))
        .unwrap();
    assert_eq!(intents, 0, "every intent is settled");
    // The push finds the NAR stored and only publishes it; Nix substitutes it, signed.
    let pushed = push_common::push_with(&repo.url, Some(&repo.token), &[&built], &[]);
    pushed.assert_code(exit::SUCCESS);
    common::nix_copy_from(&repo.url, &repo.public_key, &[built], None)
        .unwrap_or_else(|e| panic!("nix copy --from of the merged upload failed: {e}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn presigned_redirects_serve_nars_and_private_repositories_still_need_a_token() {
    common::require_nix();
    let s3 = S3Server::start();
    let server = s3_server(&s3, "s3_presign_secs = 300\n");
    let public = repo(&server, false);
    let private = repo(&server, true);
    let path = common::build_text("presigned", &common::nonce());
    for repo in [&public, &private] {
        let pushed = push_common::push_with(&repo.url, Some(&repo.token), &[&path], &[]);
        pushed.assert_code(exit::SUCCESS);
    }
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (_, narinfo) = common::get_narinfo(&public.url, common::hash_part(&path)).await;
    let nar_url = format!(
        "{}/{}",
        public.url,
        common::narinfo_field(&narinfo, "URL").unwrap()
    );
    let resp = no_redirects.get(&nar_url).send().await.unwrap();
    assert_eq!(resp.status(), 307, "a NAR GET redirects to the bucket");
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(s3.endpoint()) && location.contains("X-Amz-Signature="),
        "{location}"
    );
    let bytes = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        common::sha256_nix32(&bytes),
        common::narinfo_field(&narinfo, "FileHash").unwrap(),
        "the presigned URL serves the NAR's bytes"
    );

    // A private repository answers like an absent one without a token: no URL leaks.
    let private_nar = format!(
        "{}/{}",
        private.url,
        common::narinfo_field(&narinfo, "URL").unwrap()
    );
    let resp = no_redirects.get(&private_nar).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().get("location").is_none());
    let resp = no_redirects
        .get(&private_nar)
        .header("Authorization", common::bearer(&private.token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 307);

    // Nix follows the redirect and checks the signature and hashes.
    common::nix_copy_from(&public.url, &public.public_key, &[path], None)
        .unwrap_or_else(|e| panic!("nix copy --from with redirects failed: {e}"));
    assert!(
        server
            .metric("stowix_server_storage_seconds_count{op=\"presign\"}")
            .await
            >= 2.0,
        "presigning is timed per operation"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_turns_unready_when_the_bucket_is_unreachable() {
    // A store of its own even when STOWIX_TEST_S3_ENDPOINT names one: this one gets stopped.
    let mut s3 = S3Server::start_local();
    let server = s3_server(&s3, "");
    let healthz = format!("{}/healthz", server.url());
    let resp = reqwest::get(&healthz).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok\n");
    let errors_before = server
        .metric("stowix_server_storage_errors_total{op=\"health\"}")
        .await;

    s3.stop();
    let resp = reqwest::get(&healthz).await.unwrap();
    assert_eq!(
        resp.status(),
        503,
        "a replica without its bucket is not ready"
    );
    let reason = resp.text().await.unwrap();
    assert!(
        reason.starts_with("storage: S3 storage s3://") && reason.lines().count() == 1,
        "one line naming the storage: {reason:?}"
    );
    assert!(
        !reason.contains("stowix-test-secret"),
        "no credential in the answer: {reason}"
    );
    let errors_after = server
        .metric("stowix_server_storage_errors_total{op=\"health\"}")
        .await;
    assert!(
        errors_after > errors_before,
        "the failed probe is counted ({errors_before} -> {errors_after})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_janitor_removes_orphan_objects_and_abandoned_multipart_uploads() {
    use object_store::multipart::MultipartStore as _;
    use object_store::ObjectStoreExt as _;
    common::require_nix();
    let s3 = S3Server::start();
    // Expiry and grace of zero: everything abandoned is old enough at once.
    let server = s3_server(&s3, "upload_expiry_hours = 0\norphan_grace_secs = 0\n");
    let repo = repo(&server, false);
    // Stored through `nix copy --to` (PUT nar/, then the narinfo): a NAR under its file hash.
    let kept = common::build_text("kept", &common::nonce());
    common::nix_copy_to(&repo.url, &repo.token, std::slice::from_ref(&kept))
        .unwrap_or_else(|e| panic!("nix copy --to the S3-backed repository failed: {e}"));

    // An object no database row knows, as a crash between a put and its row would leave.
    let client = s3.client();
    let orphan =
        object_store::path::Path::from(format!("{}/{}/nar/orphan.nar.xz", s3.prefix(), repo.name));
    client.put(&orphan, vec![1u8; 100].into()).await.unwrap();
    // An upload abandoned after one part.
    let path = common::LocalPath::load(&common::build_random("abandoned", 6 << 20));
    let (file, _) = path.xz_upload();
    let state =
        common::create_upload(&repo.url, &repo.token, &common::xz_create_upload(&path)).await;
    let resp = common::patch_chunk(
        &repo.url,
        &repo.token,
        &state.upload_id,
        0,
        file[..PART as usize].to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // ... and a short chunk after it, which waits as a tail object.
    let resp = common::patch_chunk(
        &repo.url,
        &repo.token,
        &state.upload_id,
        PART,
        file[PART as usize..(PART + (1 << 20)) as usize].to_vec(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(tails(&s3).await.len(), 1, "the short chunk waits as a tail");
    let staging_id: String = rusqlite::Connection::open(server.data_dir().join("stowix.db"))
        .unwrap()
        .query_row(
            "SELECT staging_id FROM uploads WHERE id = ?1",
            [&state.upload_id],
            |row| row.get(0),
        )
        .expect("the upload's multipart id is recorded");
    let before = s3.keys().await;
    assert!(
        before.iter().any(|k| k.ends_with("/nar/orphan.nar.xz")),
        "{before:?}"
    );
    // Activity is recorded in whole seconds: let this one end, so an expiry of zero covers it.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    server.admin_with_config(&["janitor"]);
    let after = s3.keys().await;
    assert!(
        !after.iter().any(|k| k.ends_with("/nar/orphan.nar.xz")),
        "the orphan is deleted: {after:?}"
    );
    assert!(
        !after.iter().any(|k| k.contains(".tail-")),
        "the abandoned upload's tail is deleted: {after:?}"
    );
    assert_eq!(
        common::get_upload_raw(&repo.url, &repo.token, &state.upload_id)
            .await
            .status(),
        404,
        "the abandoned upload is gone"
    );
    // S3 refuses parts for an aborted multipart upload.
    let upload_path = object_store::path::Path::from(format!(
        "{}/{}/uploads/{}",
        s3.prefix(),
        repo.name,
        state.upload_id
    ));
    let late = client
        .put_part(&upload_path, &staging_id, 1, vec![0u8; 16].into())
        .await;
    assert!(late.is_err(), "the multipart upload was aborted");
    assert!(
        after
            .iter()
            .any(|k| k.starts_with(&format!("{}/nar/", repo.name))),
        "the stored NAR survives: {after:?}"
    );
    assert!(
        after
            .iter()
            .any(|k| k.starts_with(&format!("{}/listing/", repo.name))),
        "the NAR's listing is not the janitor's to delete: {after:?}"
    );
    // What is published survives, and still substitutes.
    let (_, narinfo) = common::get_narinfo(&repo.url, common::hash_part(&kept)).await;
    assert!(narinfo.contains("URL: nar/"), "{narinfo}");
    common::nix_copy_from(&repo.url, &repo.public_key, &[kept], None)
        .unwrap_or_else(|e| panic!("nix copy --from after the janitor failed: {e}"));
}

/// The janitor running every second, with a grace of 2 s, while three pushes of chunked NARs
/// run for longer than that: 1 MiB chunks at 256 KiB/s, so each upload's current tail object
/// (4 MiB NARs stay under S3's 5 MiB part minimum) is older than the grace at every pass. The
/// janitor must take nothing an upload in flight still needs: every push ends 0, the passes
/// are logged, and real Nix substitutes every closure from the bucket, signatures required.
#[tokio::test(flavor = "multi_thread")]
async fn the_janitor_running_every_second_leaves_concurrent_pushes_whole() {
    common::require_nix();
    let s3 = S3Server::start();
    let server = s3_server(&s3, "janitor_interval_secs = 1\norphan_grace_secs = 2\n");
    let repo = repo(&server, false);
    let roots: Vec<String> = (0..3)
        .map(|i| {
            common::build_derivations(&[
                common::Drv::new(&format!("janitor-lib-{i}"), "echo lib > $out"),
                common::Drv::new(
                    &format!("janitor-app-{i}"),
                    "{ echo $dep0; /usr/bin/head -c 4194304 /dev/urandom; } > $out",
                )
                .deps(&[0]),
            ])
            .remove(1)
        })
        .collect();
    let pushes: Vec<_> = roots
        .iter()
        .map(|root| {
            let mut cmd = push_command(
                &repo.url,
                Some(&repo.token),
                &["--max-upload-rate", "256KiB", root.as_str()],
            );
            cmd.env("STOWIX_CHUNK_SIZE", "1048576");
            cmd.spawn_output()
        })
        .collect();
    for (root, push) in roots.iter().zip(pushes) {
        let pushed = finished(push.join().expect("push thread"));
        assert_eq!(pushed.code, exit::SUCCESS, "{root}:\n{}", pushed.stderr);
    }
    let passes = server.log_text().matches("janitor pass done").count();
    assert!(
        passes >= 3,
        "the janitor ran {passes} times during the pushes"
    );
    common::nix_copy_from(&repo.url, &repo.public_key, &roots, None)
        .unwrap_or_else(|e| panic!("nix copy --from after the janitor ran: {e}"));
}

/// Runs a command to completion on a thread of its own, so several run at once.
trait SpawnOutput {
    fn spawn_output(self) -> std::thread::JoinHandle<std::process::Output>;
}

impl SpawnOutput for std::process::Command {
    fn spawn_output(mut self) -> std::thread::JoinHandle<std::process::Output> {
        std::thread::spawn(move || self.output().expect("run stowix nix push"))
    }
}
