//! Retention end to end: policies, pins, path deletion and the collector, against the real
//! server and `stowix admin`, on the run's backend (embedded, or PostgreSQL + S3 in the
//! scale-out matrix). Time moves without sleeping: the server reads its clock from
//! `STOWIX_CLOCK_FILE` (publication and use times) and `stowix admin gc --now` collects at a
//! given moment. After every collection the invariant checker (`common::invariants`) proves
//! that what the repository still serves is whole.

mod common;

use common::{
    api_url, bearer, build_derivations, http, invariants, push_paths, Drv, LocalPath, TestServer,
};
use stowix::api;

const DAY: i64 = 86_400;
/// A fixed start, far from the real clock, so real-time stamps cannot be mistaken for ours.
const T0: i64 = 2_000_000_000;

/// A server whose clock is a file the test writes.
struct Clocked {
    server: TestServer,
    clock: tempfile::NamedTempFile,
}

impl Clocked {
    fn start(extra: &str) -> Clocked {
        let clock = tempfile::NamedTempFile::new().expect("clock file");
        std::fs::write(clock.path(), T0.to_string()).unwrap();
        let toml = format!(
            "gc_grace_secs = 60\norphan_grace_secs = 1000\nnarinfo_cache_secs = 0\n{extra}"
        );
        let server = TestServer::start_with_config_env(
            &toml,
            vec![(
                "STOWIX_CLOCK_FILE".into(),
                clock.path().display().to_string(),
            )],
        );
        Clocked { server, clock }
    }

    fn set(&self, at: i64) {
        std::fs::write(self.clock.path(), at.to_string()).unwrap();
    }

    /// `admin gc --repo REPO [--dry-run] --now AT` with the server's config, stdout.
    fn gc(&self, repo: &str, at: i64, dry_run: bool) -> String {
        let at = at.to_string();
        let mut args = vec!["gc", "--repo", repo, "--now", &at];
        if dry_run {
            args.push("--dry-run");
        }
        self.server.admin_with_config(&args)
    }
}

/// The counts of a `gc` summary line, without the verb (so a dry run compares equal).
fn summary(output: &str) -> String {
    output
        .lines()
        .next()
        .unwrap_or_default()
        .replace("would remove", "removed")
}

fn removed_paths(output: &str) -> Vec<String> {
    let mut paths: Vec<String> = output
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .map(str::to_string)
        .collect();
    paths.sort();
    paths
}

async fn status_of(url: &str) -> u16 {
    http().get(url).send().await.unwrap().status().as_u16()
}

async fn narinfo_status(repo_url: &str, path: &LocalPath) -> u16 {
    status_of(&format!("{repo_url}/{}.narinfo", path.hash)).await
}

/// The NAR URL the repository's narinfo names.
async fn nar_url(repo_url: &str, path: &LocalPath) -> String {
    let text = http()
        .get(format!("{repo_url}/{}.narinfo", path.hash))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("narinfo has a URL");
    format!("{repo_url}/{url}")
}

async fn check(repo_url: &str, key: &str, paths: &[&LocalPath]) -> Vec<String> {
    let hashes: Vec<String> = paths.iter().map(|p| p.hash.clone()).collect();
    invariants::check_served(repo_url, key, None, &hashes)
        .await
        .unwrap_or_else(|problems| panic!("the repository serves broken closures:\n{problems}"))
}

async fn pin(
    repo_url: &str,
    token: &str,
    name: &str,
    paths: &[&LocalPath],
    keep: Option<u32>,
) -> reqwest::Response {
    http()
        .post(api_url(repo_url, &format!("pins/{name}")))
        .header("Authorization", bearer(token))
        .json(&api::PinRequest {
            store_paths: paths.iter().map(|p| p.path.clone()).collect(),
            keep,
        })
        .send()
        .await
        .unwrap()
}

fn load(paths: &[String]) -> Vec<LocalPath> {
    paths.iter().map(|p| LocalPath::load(p)).collect()
}

/// lib ← app (app references lib), old (independent), fresh (independent).
fn fixture() -> Vec<LocalPath> {
    load(&build_derivations(&[
        Drv::new("lib", "echo lib > $out"),
        Drv::new("app", "echo $dep0 > $out").deps(&[0]),
        Drv::new("old", "echo old > $out"),
        Drv::new("fresh", "echo fresh > $out"),
    ]))
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_by_age_keeps_pins_and_closures_and_nars_outlive_their_narinfos() {
    let c = Clocked::start("");
    let key = c.server.create_repo("keep", false);
    let token = c.server.create_token("keep", "push");
    let url = c.server.repo_url("keep");
    let p = fixture();
    let (lib, app, old, fresh) = (&p[0], &p[1], &p[2], &p[3]);

    c.set(T0);
    push_paths(&url, &token, &[lib, app, old]).await;
    let resp = pin(&url, &token, "release", &[app], None).await;
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );
    c.set(T0 + 20 * DAY);
    push_paths(&url, &token, &[fresh]).await;
    let old_nar = nar_url(&url, old).await;

    // Without a policy nothing is collected.
    let out = c.gc("keep", T0 + 30 * DAY, false);
    assert!(summary(&out).contains("removed 0 paths"), "{out}");

    let bad = c
        .server
        .admin_output(&["repo", "configure", "keep", "--retention", "30 days"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"30 days\""));
    c.server
        .admin(&["repo", "configure", "keep", "--retention", "15d"]);
    let shown = c.server.admin(&["repo", "show", "keep"]);
    assert!(
        shown.contains("paths unused for 15d are collected"),
        "{shown}"
    );
    assert!(shown.contains("paths:             4"), "{shown}");

    // At T0+30d: old (30 days unused) goes; app is pinned and keeps lib; fresh is 10 days old.
    let dry = c.gc("keep", T0 + 30 * DAY, true);
    let real = c.gc("keep", T0 + 30 * DAY, false);
    assert_eq!(
        summary(&dry),
        summary(&real),
        "dry run:\n{dry}\nreal run:\n{real}"
    );
    assert_eq!(removed_paths(&real), vec![old.path.clone()], "{real}");
    assert_eq!(
        removed_paths(&dry),
        removed_paths(&real),
        "the dry run lists what goes"
    );
    assert!(
        summary(&real).contains("removed 1 paths; 1 NARs marked"),
        "{real}"
    );
    assert_eq!(narinfo_status(&url, old).await, 404);
    let served = check(&url, &key, &[lib, app, old, fresh]).await;
    assert_eq!(served.len(), 3);

    // Its NAR stays through orphan_grace_secs (a substituter that just read the narinfo still
    // gets it), and goes after.
    assert_eq!(status_of(&old_nar).await, 200);
    let out = c.gc("keep", T0 + 30 * DAY + 999, false);
    assert!(summary(&out).contains("removed 0 NARs"), "{out}");
    assert_eq!(status_of(&old_nar).await, 200);
    let dry = c.gc("keep", T0 + 30 * DAY + 1001, true);
    let out = c.gc("keep", T0 + 30 * DAY + 1001, false);
    assert_eq!(summary(&dry), summary(&out));
    assert!(summary(&out).contains("removed 1 NARs"), "{out}");
    assert_eq!(status_of(&old_nar).await, 404);
    check(&url, &key, &[lib, app, old, fresh]).await;

    // Pushing the collected path again publishes it again.
    c.set(T0 + 31 * DAY);
    push_paths(&url, &token, &[old]).await;
    assert_eq!(narinfo_status(&url, old).await, 200);
    check(&url, &key, &[lib, app, old, fresh]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_size_evicts_the_least_recently_used_first() {
    let c = Clocked::start("last_use_flush_secs = 1\n");
    let key = c.server.create_repo("lru", false);
    let token = c.server.create_token("lru", "push");
    let url = c.server.repo_url("lru");
    let p = load(&build_derivations(&[
        Drv::new("one", "echo one > $out"),
        Drv::new("two", "echo two > $out"),
        Drv::new("three", "echo three > $out"),
    ]));
    let mut sizes = Vec::new();
    for (i, path) in p.iter().enumerate() {
        c.set(T0 + 100 * i as i64);
        push_paths(&url, &token, &[path]).await;
        sizes.push(path.xz_upload().1.file_size);
    }
    // "one" is the oldest publication but is downloaded last: "two" is least recently used.
    c.set(T0 + 1000);
    let flushes = c
        .server
        .metric("stowix_server_last_use_flushes_total")
        .await;
    assert_eq!(status_of(&nar_url(&url, &p[0]).await).await, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Flushes that wrote something: the only use so far is that download.
    while c
        .server
        .metric("stowix_server_last_use_flushes_total")
        .await
        < flushes + 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no last-use flush within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let fits = sizes[0] + sizes[2];
    c.server.admin(&[
        "repo",
        "configure",
        "lru",
        "--max-size",
        &format!("{fits}B"),
    ]);
    let dry = c.gc("lru", T0 + 2000, true);
    let real = c.gc("lru", T0 + 2000, false);
    assert_eq!(summary(&dry), summary(&real), "{dry}\n{real}");
    assert_eq!(
        removed_paths(&real),
        vec![p[1].path.clone()],
        "{dry}\n{real}"
    );
    // The checker downloads every NAR, which are uses too: stamp them before every last use
    // so far, where they change nothing.
    c.set(T0 + 50);
    check(&url, &key, &[&p[0], &p[1], &p[2]]).await;
    // One byte less: "three" (used at T0+200) goes next, "one" (T0+1000) stays.
    c.server.admin(&[
        "repo",
        "configure",
        "lru",
        "--max-size",
        &format!("{}B", fits - 1),
    ]);
    let real = c.gc("lru", T0 + 2000, false);
    assert_eq!(removed_paths(&real), vec![p[2].path.clone()], "{real}");
    assert_eq!(narinfo_status(&url, &p[0]).await, 200);
    check(&url, &key, &[&p[0], &p[1], &p[2]]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn path_delete_refuses_while_referenced_and_removes_dependents_with_the_flag() {
    let c = Clocked::start("");
    let key = c.server.create_repo("del", false);
    let token = c.server.create_token("del", "push");
    let url = c.server.repo_url("del");
    let p = fixture();
    let (lib, app, old) = (&p[0], &p[1], &p[2]);
    push_paths(&url, &token, &[lib, app, old]).await;
    let lib_nar = nar_url(&url, lib).await;

    let refused = c
        .server
        .admin_output(&["path", "delete", "--repo", "del", &lib.path]);
    assert_eq!(refused.status.code(), Some(8));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains(&app.path), "{stderr}");
    assert_eq!(narinfo_status(&url, lib).await, 200);

    let bad = c
        .server
        .admin_output(&["path", "delete", "--repo", "del", "not-a-path"]);
    assert_eq!(bad.status.code(), Some(2));

    // A path nothing references goes at once, by hash part, NAR object included.
    let old_nar = nar_url(&url, old).await;
    c.server
        .admin(&["path", "delete", "--repo", "del", &old.hash]);
    assert_eq!(narinfo_status(&url, old).await, 404);
    assert_eq!(status_of(&old_nar).await, 404);

    let out = c.server.admin(&[
        "path",
        "delete",
        "--repo",
        "del",
        &lib.path,
        "--with-dependents",
    ]);
    assert!(out.contains(&lib.path) && out.contains(&app.path), "{out}");
    assert_eq!(narinfo_status(&url, lib).await, 404);
    assert_eq!(narinfo_status(&url, app).await, 404);
    assert_eq!(status_of(&lib_nar).await, 404);
    let served = check(&url, &key, &[lib, app, old]).await;
    assert!(served.is_empty(), "still served: {served:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pins_keep_their_last_revisions_and_nix_copy_substitutes_the_pinned_closure() {
    let c = Clocked::start("");
    let key = c.server.create_repo("pins", false);
    let token = c.server.create_token("pins", "push");
    let read = c.server.create_token("pins", "read");
    let url = c.server.repo_url("pins");
    let p = fixture();
    let (lib, app, old, fresh) = (&p[0], &p[1], &p[2], &p[3]);
    push_paths(&url, &token, &[lib, app, old, fresh]).await;

    // Not published: refused, naming it.
    let other = load(&build_derivations(&[Drv::new(
        "other",
        "echo other > $out",
    )]));
    let resp = pin(&url, &token, "rel", &[&other[0]], None).await;
    assert_eq!(resp.status().as_u16(), 422);
    let err: api::ApiError = resp.json().await.unwrap();
    assert_eq!(err.code, api::codes::NOT_PUBLISHED);
    assert!(err.message.contains(&other[0].path), "{}", err.message);
    // A read token cannot pin.
    assert_eq!(
        pin(&url, &read, "rel", &[app], None)
            .await
            .status()
            .as_u16(),
        403
    );

    for (i, paths) in [vec![old], vec![fresh], vec![app]].iter().enumerate() {
        let resp = pin(&url, &token, "rel", paths, Some(2)).await;
        assert_eq!(resp.status().as_u16(), 200);
        let answer: api::PinResponse = resp.json().await.unwrap();
        assert_eq!(answer.created.revision, i as u64 + 1);
        assert_eq!(answer.created.keep, Some(2));
        let dropped: Vec<u64> = if i == 2 { vec![1] } else { vec![] };
        assert_eq!(answer.dropped_revisions, dropped);
    }
    let list: api::PinList = http()
        .get(api_url(&url, "pins"))
        .header("Authorization", bearer(&read))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let revisions: Vec<(u64, Vec<String>)> = list
        .pins
        .iter()
        .map(|r| (r.revision, r.store_paths.clone()))
        .collect();
    assert_eq!(
        revisions,
        vec![(2, vec![fresh.path.clone()]), (3, vec![app.path.clone()])]
    );
    let listed = c.server.admin(&["pin", "list", "--repo", "pins"]);
    assert_eq!(listed.lines().count(), 3, "{listed}");

    // Everything unpinned goes: old (revision 1 was dropped) and nothing else.
    c.server
        .admin(&["repo", "configure", "pins", "--retention", "1d"]);
    let out = c.gc("pins", T0 + 100 * DAY, false);
    assert_eq!(removed_paths(&out), vec![old.path.clone()], "{out}");
    // Dropping revision 2 frees fresh; the remaining pin keeps app and lib.
    c.server
        .admin(&["pin", "delete", "--repo", "pins", "rel", "--revision", "2"]);
    let out = c.gc("pins", T0 + 100 * DAY, false);
    assert_eq!(removed_paths(&out), vec![fresh.path.clone()], "{out}");
    let served = check(&url, &key, &[lib, app, old, fresh]).await;
    assert_eq!(served, {
        let mut s = vec![lib.hash.clone(), app.hash.clone()];
        s.sort();
        s
    });
    common::nix_copy_from(&url, &key, std::slice::from_ref(&app.path), None)
        .unwrap_or_else(|e| panic!("nix copy of the pinned closure: {e}"));

    let missing = c
        .server
        .admin_output(&["pin", "delete", "--repo", "pins", "nope"]);
    assert_eq!(missing.status.code(), Some(2));
    c.server.admin(&["pin", "delete", "--repo", "pins", "rel"]);
    let out = c.gc("pins", T0 + 100 * DAY, false);
    let mut both = vec![app.path.clone(), lib.path.clone()];
    both.sort();
    assert_eq!(removed_paths(&out), both, "{out}");
    let served = check(&url, &key, &[lib, app, old, fresh]).await;
    assert!(served.is_empty(), "still served: {served:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_collects_on_its_schedule_and_counts_it() {
    let c = Clocked::start("gc_interval_secs = 1\n");
    let key = c.server.create_repo("sched", false);
    let token = c.server.create_token("sched", "push");
    let url = c.server.repo_url("sched");
    let p = fixture();
    push_paths(&url, &token, &[&p[0], &p[1], &p[2]]).await;
    c.server
        .admin(&["repo", "configure", "sched", "--retention", "1d"]);
    c.set(T0 + 10 * DAY);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c
        .server
        .metric("stowix_server_gc_paths_removed_total")
        .await
        < 3.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no collection within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(c.server.metric("stowix_server_gc_runs_total").await >= 1.0);
    assert_eq!(
        c.server
            .metric("stowix_server_repository_paths{repository=\"sched\"}")
            .await,
        0.0
    );
    // The NARs stay through orphan_grace_secs, so the bytes are still stored.
    let stored: u64 = p[..3].iter().map(|x| x.xz_upload().1.file_size).sum();
    assert_eq!(
        c.server
            .metric("stowix_server_repository_bytes{repository=\"sched\"}")
            .await,
        stored as f64
    );
    let text = c.server.metrics_text().await;
    assert!(
        text.contains("stowix_server_gc_duration_seconds_count"),
        "{text}"
    );
    for path in &p[..3] {
        assert_eq!(narinfo_status(&url, path).await, 404);
    }
    let served = check(&url, &key, &[&p[0], &p[1], &p[2]]).await;
    assert!(served.is_empty(), "still served: {served:?}");
}
