//! One conformance suite for every metadata backend: each test below is written once against
//! `&dyn Metadata` and run on the embedded SQLite backend and on the real PostgreSQL server,
//! both opened through the same factory `stowix serve` uses.
//!
//! ```text
//!   conformance!(test, …) ─► sqlite::test   ─► Backend::sqlite()   (temp dir, sqlite:///…)
//!                         └► postgres::test ─► Backend::postgres() (TestDatabase, postgres://…)
//!                                                   │
//!                               backend::open(&ServerConfig) ─► Arc<dyn Metadata>
//! ```
//!
//! Tests that only make sense with a server (a connection killed under the pool, replicas
//! migrating at once) are at the end, PostgreSQL only.

mod pg_support;

use std::sync::{Arc, Barrier};
use std::thread;

use pg_support::TestDatabase;
use stowix::server::backend;
use stowix::server::backend::metadata::{
    MetaError, Metadata, NarRecord, OpenedUpload, PathDeletion, PinCreated, Presence, PublishState,
    PublishedNarInfo, RepoRecord, RetentionPolicy, Scope, SessionCaps, TokenRecord, UploadPart,
    UploadRecord,
};
use stowix::server::config::ServerConfig;

/// A backend under test and the means to open it again, as a second replica would.
struct Backend {
    meta: Arc<dyn Metadata>,
    config: ServerConfig,
    kind: Kind,
    _dir: tempfile::TempDir,
}

enum Kind {
    Sqlite(std::path::PathBuf),
    Postgres(TestDatabase),
}

/// Settings naming `database`, with a data dir of their own.
fn config_for(dir: &tempfile::TempDir, database: String) -> ServerConfig {
    ServerConfig {
        data_dir: dir.path().to_path_buf(),
        database: Some(database),
        ..ServerConfig::default()
    }
}

impl Backend {
    fn sqlite() -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stowix.db");
        let config = config_for(&dir, format!("sqlite://{}", path.display()));
        let meta = open(&config).expect("open the SQLite backend");
        Backend {
            meta,
            config,
            kind: Kind::Sqlite(path),
            _dir: dir,
        }
    }

    fn postgres() -> Backend {
        let db = TestDatabase::create();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config_for(&dir, db.url().to_string());
        let meta = open(&config).expect("open the PostgreSQL backend");
        Backend {
            meta,
            config,
            kind: Kind::Postgres(db),
            _dir: dir,
        }
    }

    /// A second, independent handle on the same database.
    fn reopen(&self) -> Result<Arc<dyn Metadata>, MetaError> {
        open(&self.config)
    }

    /// Writes `version` where the backend keeps its schema version, as a newer binary would.
    fn set_schema_version(&self, version: i64) {
        match &self.kind {
            Kind::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).expect("open the SQLite file");
                conn.pragma_update(None, "user_version", version)
                    .expect("set user_version");
            }
            Kind::Postgres(db) => {
                db.sql(&format!(
                    "UPDATE stowix_schema_version SET version = {version}"
                ));
            }
        }
    }
}

fn open(config: &ServerConfig) -> Result<Arc<dyn Metadata>, MetaError> {
    backend::open_metadata(config)
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&super::Backend::sqlite()); } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(&super::Backend::postgres()); } )*
        }
    };
}

conformance!(
    repositories_and_tokens,
    nars_presence_and_store_paths,
    publish_is_idempotent_and_first_wins,
    upload_sessions_are_unique_per_nar_and_capped,
    concurrent_opens_of_one_nar_get_one_session,
    concurrent_opens_never_exceed_the_caps,
    upload_parts_append_only_at_the_recorded_offset,
    a_tail_is_replaced_only_where_it_was_read,
    concurrent_part_appends_at_one_offset_admit_one,
    upload_lifecycle,
    object_intents_and_known_keys,
    singleton_is_exclusive_across_handles,
    a_newer_schema_is_refused,
    retention_policy_and_usage,
    publication_checks_references_and_nars_in_its_transaction,
    collection_keeps_roots_closures_and_pins_and_sweeps_referrers_first,
    a_publication_during_a_collection_keeps_what_it_references,
    last_use_only_rises,
    unreferenced_nars_wait_for_their_grace,
    path_deletion_refuses_dependents_unless_asked,
    pins_number_revisions_and_keep_the_last,
    max_size_evicts_least_recently_used_closures,
);

fn repo(name: &str, private: bool, priority: u32) -> RepoRecord {
    RepoRecord {
        name: name.into(),
        private,
        secret_key: format!("{name}-1:c2VjcmV0"),
        priority,
        upstream_keys: vec![format!("up-{name}-1:a2V5"), "cache.nixos.org-1:b2s=".into()],
    }
}

fn token(id: &str, repos: &[&str], created_at: i64) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        secret_sha256: [id.len() as u8; 32],
        scope: Scope::Push,
        repos: repos.iter().map(|r| r.to_string()).collect(),
        description: format!("token {id}"),
        created_at,
        revoked_at: None,
    }
}

fn nar(url: &str, nar_hash: &str) -> NarRecord {
    NarRecord {
        url: url.into(),
        compression: "xz".into(),
        nar_hash: nar_hash.into(),
        nar_size: 5_000_000_000,
        file_hash: format!("sha256:file-{url}"),
        file_size: 4_000_000_000,
        object_key: format!("objects/{url}"),
    }
}

fn narinfo(hash: &str, text: &str) -> PublishedNarInfo {
    PublishedNarInfo {
        hash: hash.into(),
        store_path: format!("/nix/store/{hash}-x"),
        nar_hash: format!("sha256:{hash}"),
        text: text.into(),
    }
}

fn upload(id: &str, repo: &str, nar_hash: &str) -> UploadRecord {
    UploadRecord {
        id: id.into(),
        repo: repo.into(),
        nar_hash: nar_hash.into(),
        nar_size: 1 << 33,
        compression: "xz".into(),
        encoder: "stowix-1".into(),
        created_at: 1_000,
        staging_id: None,
        updated_at: 1_000,
    }
}

fn part(number: u32, size: u64) -> UploadPart {
    UploadPart {
        number,
        size,
        etag: format!("etag-{number}"),
    }
}

const CAPS: SessionCaps = SessionCaps {
    per_token: 2,
    per_repo: 3,
};

fn repositories_and_tokens(b: &Backend) {
    let m = &*b.meta;
    assert!(m.create_repo(&repo("zeta", false, 40)).unwrap());
    assert!(m.create_repo(&repo("Alpha", true, 10)).unwrap());
    assert!(
        !m.create_repo(&repo("zeta", true, 1)).unwrap(),
        "a second repository of one name"
    );
    let zeta = m.repo("zeta").unwrap().expect("zeta exists");
    assert!(!zeta.private, "the first creation stays");
    assert_eq!(zeta.priority, 40);
    assert_eq!(zeta.secret_key, "zeta-1:c2VjcmV0");
    assert_eq!(
        zeta.upstream_keys,
        ["up-zeta-1:a2V5", "cache.nixos.org-1:b2s="],
        "in order"
    );
    assert!(m.repo("nope").unwrap().is_none());
    assert!(m.set_upstream_keys("zeta", &[]).unwrap());
    assert!(m.repo("zeta").unwrap().unwrap().upstream_keys.is_empty());
    assert!(m
        .set_upstream_keys("Alpha", &["k-1:eA==".to_string()])
        .unwrap());
    assert_eq!(m.repos().unwrap()[0].upstream_keys, ["k-1:eA=="]);
    assert!(!m.set_upstream_keys("nope", &[]).unwrap());
    let names: Vec<String> = m.repos().unwrap().into_iter().map(|r| r.name).collect();
    // Byte order, whatever the database's locale: "A" < "z".
    assert_eq!(names, ["Alpha", "zeta"]);

    m.create_token(&token("t2", &["zeta", "Alpha"], 20))
        .unwrap();
    m.create_token(&token("t1", &[], 10)).unwrap();
    assert!(
        m.create_token(&token("t1", &["zeta"], 30)).is_err(),
        "a token id is unique"
    );
    let t2 = m.token("t2").unwrap().expect("t2 exists");
    assert_eq!(t2.repos, ["Alpha", "zeta"]);
    assert_eq!(t2.secret_sha256, [2u8; 32]);
    assert_eq!(t2.scope, Scope::Push);
    assert_eq!(t2.description, "token t2");
    assert_eq!((t2.created_at, t2.revoked_at), (20, None));
    assert!(m.token("t1").unwrap().unwrap().repos.is_empty());
    assert!(m.token("t3").unwrap().is_none());
    let ids: Vec<String> = m.tokens().unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(ids, ["t1", "t2"], "oldest first");

    assert!(m.revoke_token("t2", 500).unwrap());
    assert!(m.revoke_token("t2", 900).unwrap());
    assert_eq!(
        m.token("t2").unwrap().unwrap().revoked_at,
        Some(500),
        "a second revocation does not move the time"
    );
    assert!(!m.revoke_token("t3", 500).unwrap());
    assert_eq!(m.token("t1").unwrap().unwrap().revoked_at, None);
}

fn nars_presence_and_store_paths(b: &Backend) {
    let m = &*b.meta;
    assert!(m
        .insert_nar("r", &nar("nar/a.nar.xz", "sha256:na"))
        .unwrap());
    assert!(!m
        .insert_nar("r", &nar("nar/a.nar.xz", "sha256:other"))
        .unwrap());
    // A batch in one transaction: what is new, in order; of two with one URL, only the first.
    assert_eq!(
        m.insert_nars(
            "r",
            &[
                nar("nar/b1.nar.xz", "sha256:b1"),
                nar("nar/a.nar.xz", "sha256:na"),
                nar("nar/b2.nar.xz", "sha256:b2"),
                nar("nar/b1.nar.xz", "sha256:b1"),
            ]
        )
        .unwrap(),
        [true, false, true, false]
    );
    assert!(m.insert_nars("r", &[]).unwrap().is_empty());
    assert_eq!(
        m.nar_by_url("r", "nar/b2.nar.xz").unwrap(),
        Some(nar("nar/b2.nar.xz", "sha256:b2"))
    );
    let stored = m.nar_by_url("r", "nar/a.nar.xz").unwrap().unwrap();
    assert_eq!(
        stored,
        nar("nar/a.nar.xz", "sha256:na"),
        "sizes above 4 GiB survive"
    );
    assert_eq!(m.nar_by_hash("r", "sha256:na").unwrap(), Some(stored));
    assert!(m.nar_by_hash("other", "sha256:na").unwrap().is_none());
    assert!(m.nar_by_url("r", "nar/b.nar.xz").unwrap().is_none());

    assert_eq!(m.publish("r", &[narinfo("p1", "one")]).unwrap(), vec![true]);
    let queries: Vec<(String, String)> = [
        ("p1", "sha256:zz"),
        ("p2", "sha256:na"),
        ("p3", "sha256:nb"),
    ]
    .iter()
    .map(|(h, n)| (h.to_string(), n.to_string()))
    .collect();
    assert_eq!(
        m.presence("r", &queries).unwrap(),
        [Presence::Published, Presence::NarStored, Presence::Missing]
    );
    assert_eq!(
        m.presence("elsewhere", &queries).unwrap(),
        [Presence::Missing; 3],
        "presence is per repository"
    );
    assert!(m.presence("r", &[]).unwrap().is_empty());
    // A batch as large as the server allows, in order.
    let many: Vec<(String, String)> = (0..20_000)
        .map(|i| (format!("h{i}"), format!("sha256:{i}")))
        .chain(std::iter::once(("p1".to_string(), String::new())))
        .collect();
    let answers = m.presence("r", &many).unwrap();
    assert_eq!(answers.len(), 20_001);
    assert_eq!(answers[20_000], Presence::Published);
    assert!(answers[..20_000].iter().all(|p| *p == Presence::Missing));

    assert_eq!(
        m.published_store_paths("r", &["p9".into(), "p1".into()])
            .unwrap(),
        [None, Some("/nix/store/p1-x".to_string())]
    );
    assert_eq!(m.narinfo("r", "p1").unwrap().as_deref(), Some("one"));
    assert!(m.narinfo("r", "p2").unwrap().is_none());
}

fn publish_is_idempotent_and_first_wins(b: &Backend) {
    let m = &*b.meta;
    let batch = [narinfo("a", "first a"), narinfo("b", "first b")];
    assert_eq!(m.publish("r", &batch).unwrap(), [true, true]);
    assert_eq!(m.publish("r", &batch).unwrap(), [false, false]);
    assert_eq!(
        m.publish("r", &[narinfo("a", "second a"), narinfo("c", "c")])
            .unwrap(),
        [false, true]
    );
    assert_eq!(m.narinfo("r", "a").unwrap().as_deref(), Some("first a"));
    assert_eq!(
        m.publish("r", &[narinfo("d", "d1"), narinfo("d", "d2")])
            .unwrap(),
        [true, false],
        "a hash twice in one batch publishes once"
    );
    assert_eq!(m.narinfo("r", "d").unwrap().as_deref(), Some("d1"));
    assert_eq!(m.publish("other", &[narinfo("a", "x")]).unwrap(), [true]);
    assert!(m.publish("r", &[]).unwrap().is_empty());
}

fn upload_sessions_are_unique_per_nar_and_capped(b: &Backend) {
    let m = &*b.meta;
    let created = match m.open_upload(&upload("a", "r", "n1"), "t", CAPS).unwrap() {
        OpenedUpload::Created(row) => row,
        other => panic!("{other:?}"),
    };
    assert_eq!((created.id.as_str(), created.updated_at), ("a", 1_000));
    match m.open_upload(&upload("b", "r", "n1"), "u", CAPS).unwrap() {
        OpenedUpload::Existing(existing) => assert_eq!(existing.id, "a"),
        other => panic!("{other:?}"),
    }
    // Another compression of the same NAR is another session.
    let mut zstd = upload("z", "r", "n1");
    zstd.compression = "zstd".into();
    assert!(matches!(
        m.open_upload(&zstd, "t", CAPS).unwrap(),
        OpenedUpload::Created(_)
    ));
    assert!(matches!(
        m.open_upload(&upload("e", "r", "n3"), "t", CAPS).unwrap(),
        OpenedUpload::TokenFull
    ));
    assert!(matches!(
        m.open_upload(&upload("f", "r", "n3"), "u", CAPS).unwrap(),
        OpenedUpload::Created(_)
    ));
    assert!(matches!(
        m.open_upload(&upload("g", "r", "n4"), "u", CAPS).unwrap(),
        OpenedUpload::RepoFull
    ));
    // The caps count open sessions: finishing one makes room.
    m.delete_upload("a").unwrap();
    assert!(matches!(
        m.open_upload(&upload("h", "r", "n4"), "t", CAPS).unwrap(),
        OpenedUpload::Created(_)
    ));
    assert!(m.upload("e").unwrap().is_none());
}

/// Runs `work(i)` on `n` threads released at once, and returns the results in thread order.
fn race<T: Send + 'static>(n: usize, work: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(n));
    let work = Arc::new(work);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let work = Arc::clone(&work);
            thread::spawn(move || {
                barrier.wait();
                work(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn concurrent_opens_of_one_nar_get_one_session(b: &Backend) {
    let m = Arc::clone(&b.meta);
    let caps = SessionCaps {
        per_token: 100,
        per_repo: 100,
    };
    let results = race(8, move |i| {
        m.open_upload(
            &upload(&format!("s{i}"), "r", "same"),
            &format!("t{i}"),
            caps,
        )
        .unwrap()
    });
    let created: Vec<&UploadRecord> = results
        .iter()
        .filter_map(|r| match r {
            OpenedUpload::Created(row) => Some(row),
            _ => None,
        })
        .collect();
    assert_eq!(created.len(), 1, "{results:?}");
    for result in &results {
        match result {
            OpenedUpload::Created(row) | OpenedUpload::Existing(row) => {
                assert_eq!(row.id, created[0].id, "{results:?}")
            }
            other => panic!("{other:?}"),
        }
    }
}

fn concurrent_opens_never_exceed_the_caps(b: &Backend) {
    let caps = SessionCaps {
        per_token: 3,
        per_repo: 5,
    };
    // One token racing for its cap.
    let m = Arc::clone(&b.meta);
    let results = race(8, move |i| {
        m.open_upload(&upload(&format!("a{i}"), "r", &format!("n{i}")), "t", caps)
            .unwrap()
    });
    let created = results
        .iter()
        .filter(|r| matches!(r, OpenedUpload::Created(_)))
        .count();
    let full = results
        .iter()
        .filter(|r| matches!(r, OpenedUpload::TokenFull))
        .count();
    assert_eq!((created, full), (3, 5), "{results:?}");
    // Many tokens racing for the repository's remaining two.
    let m = Arc::clone(&b.meta);
    let results = race(8, move |i| {
        m.open_upload(
            &upload(&format!("b{i}"), "r", &format!("m{i}")),
            &format!("u{i}"),
            caps,
        )
        .unwrap()
    });
    let created = results
        .iter()
        .filter(|r| matches!(r, OpenedUpload::Created(_)))
        .count();
    let full = results
        .iter()
        .filter(|r| matches!(r, OpenedUpload::RepoFull))
        .count();
    assert_eq!((created, full), (2, 6), "{results:?}");
}

fn upload_parts_append_only_at_the_recorded_offset(b: &Backend) {
    let m = &*b.meta;
    m.open_upload(&upload("u", "r", "n"), "t", CAPS).unwrap();
    assert!(m.upload_parts("u").unwrap().is_empty());
    assert!(m.add_upload_part("u", 0, &part(1, 5 << 20), 2_000).unwrap());
    assert!(
        !m.add_upload_part("u", 0, &part(2, 5 << 20), 2_001).unwrap(),
        "offset 0 is taken"
    );
    assert!(!m.add_upload_part("u", 7, &part(2, 1), 2_002).unwrap());
    assert!(m.add_upload_part("u", 5 << 20, &part(2, 3), 2_003).unwrap());
    assert_eq!(m.upload_parts("u").unwrap(), [part(1, 5 << 20), part(2, 3)]);
    assert_eq!(m.upload("u").unwrap().unwrap().updated_at, 2_003);
    assert!(
        !m.add_upload_part("missing", 0, &part(1, 1), 1).unwrap(),
        "no session, no part"
    );
}

fn a_tail_is_replaced_only_where_it_was_read(b: &Backend) {
    let m = &*b.meta;
    m.open_upload(&upload("u", "r", "n"), "t", CAPS).unwrap();
    let tail = |size, key: &str| UploadPart {
        number: 2,
        size,
        etag: format!("tail:r/uploads/u.tail-{key}"),
    };
    assert!(m.add_upload_part("u", 0, &part(1, 5 << 20), 1_000).unwrap());
    let first = tail(100, "a");
    assert!(m.add_upload_part("u", 5 << 20, &first, 1_001).unwrap());
    assert_eq!(
        m.upload_parts("u").unwrap()[1].tail_key(),
        Some("r/uploads/u.tail-a")
    );
    let held = (5 << 20) + 100;
    // A longer tail replaces the one it was read from, at the offset the parts add up to.
    let second = tail(300, "b");
    assert!(!m
        .replace_last_upload_part("u", held - 1, &first, &second, 1_002)
        .unwrap());
    assert!(m
        .replace_last_upload_part("u", held, &first, &second, 1_002)
        .unwrap());
    assert_eq!(m.upload("u").unwrap().unwrap().updated_at, 1_002);
    // A racer that read the first tail loses, whatever it brings.
    assert!(
        !m.replace_last_upload_part("u", held, &first, &part(2, 6 << 20), 1_003)
            .unwrap(),
        "the first tail is gone"
    );
    // At the right offset and count too, a stale tail (same size, another object) loses: the
    // compare-and-set is on the tail's identity, not only on the sizes.
    assert!(
        !m.replace_last_upload_part(
            "u",
            (5 << 20) + 300,
            &tail(300, "a"),
            &part(2, 6 << 20),
            1_003
        )
        .unwrap(),
        "a tail other than the current one"
    );
    // The tail becomes a whole part; the number stays, the offset grows.
    assert!(m
        .replace_last_upload_part("u", (5 << 20) + 300, &second, &part(2, 6 << 20), 1_004)
        .unwrap());
    assert_eq!(
        m.upload_parts("u").unwrap(),
        [part(1, 5 << 20), part(2, 6 << 20)]
    );
    // Only the last part can be replaced, and never by another number.
    assert!(!m
        .replace_last_upload_part("u", 11 << 20, &part(1, 5 << 20), &part(1, 1), 1_005)
        .unwrap());
    assert!(!m
        .replace_last_upload_part("u", 11 << 20, &part(2, 6 << 20), &part(3, 1), 1_005)
        .unwrap());
}

fn concurrent_part_appends_at_one_offset_admit_one(b: &Backend) {
    b.meta
        .open_upload(&upload("u", "r", "n"), "t", CAPS)
        .unwrap();
    let mut offset = 0u64;
    for number in 1..=3u32 {
        // Replicas that all read the same offset (as clients retrying one chunk would) and
        // each try to append their part there.
        let m = Arc::clone(&b.meta);
        let results = race(6, move |i| {
            let mut p = part(number, 1000 + i as u64);
            p.etag = format!("replica-{i}");
            m.add_upload_part("u", offset, &p, 3_000).unwrap()
        });
        assert_eq!(
            results.iter().filter(|won| **won).count(),
            1,
            "part {number}: {results:?}"
        );
        let winner = results.iter().position(|won| *won).unwrap();
        let parts = b.meta.upload_parts("u").unwrap();
        assert_eq!(parts.len(), number as usize);
        let last = parts.last().unwrap();
        assert_eq!(
            (last.size, last.etag.as_str()),
            (1000 + winner as u64, format!("replica-{winner}").as_str())
        );
        offset += last.size;
    }
    // Appends in a row from threads that each learn the offset afresh, as a resumed upload
    // moving between replicas does: every part lands once, in order, with no gap.
    let m = Arc::clone(&b.meta);
    let appended = race(4, move |_| {
        let mut won = 0;
        for _ in 0..200 {
            let parts = m.upload_parts("u").unwrap();
            if parts.len() >= 20 {
                break;
            }
            let total: u64 = parts.iter().map(|p| p.size).sum();
            let number = parts.len() as u32 + 1;
            if m.add_upload_part("u", total, &part(number, 10), 4_000)
                .unwrap()
            {
                won += 1;
            }
        }
        won
    });
    let parts = b.meta.upload_parts("u").unwrap();
    assert_eq!(appended.iter().sum::<usize>(), parts.len() - 3);
    assert!(parts.len() >= 20, "{} parts", parts.len());
    let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
    assert_eq!(numbers, (1..=parts.len() as u32).collect::<Vec<_>>());
}

fn upload_lifecycle(b: &Backend) {
    let m = &*b.meta;
    m.open_upload(&upload("old", "r", "n1"), "t", CAPS).unwrap();
    let mut fresh = upload("new", "r", "n2");
    fresh.created_at = 5_000;
    fresh.updated_at = 5_000;
    m.open_upload(&fresh, "t", CAPS).unwrap();
    m.set_upload_staging_id("old", "multipart-123").unwrap();
    let old = m.upload("old").unwrap().unwrap();
    assert_eq!(old.staging_id.as_deref(), Some("multipart-123"));
    assert_eq!(m.upload("new").unwrap().unwrap().staging_id, None);

    let inactive: Vec<String> = m
        .uploads_inactive_since(2_000)
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(inactive, ["old"]);
    // Activity, not age, is what keeps a session.
    m.touch_upload("old", 6_000).unwrap();
    assert!(m.uploads_inactive_since(2_000).unwrap().is_empty());
    assert_eq!(m.upload("old").unwrap().unwrap().created_at, 1_000);
    assert_eq!(m.uploads_inactive_since(5_500).unwrap().len(), 1);

    assert!(m.add_upload_part("old", 0, &part(1, 10), 6_001).unwrap());
    m.delete_upload("old").unwrap();
    assert!(m.upload("old").unwrap().is_none());
    assert!(
        m.upload_parts("old").unwrap().is_empty(),
        "parts go with it"
    );
    // A new session may reuse the id space without inheriting parts.
    m.open_upload(&upload("old", "r", "n3"), "t", CAPS).unwrap();
    assert!(m.upload_parts("old").unwrap().is_empty());
    m.delete_upload("never-existed").unwrap();
}

fn object_intents_and_known_keys(b: &Backend) {
    let m = &*b.meta;
    m.record_object_intent("k/old", 100).unwrap();
    m.record_object_intent("k/new", 900).unwrap();
    m.record_object_intent("k/mid", 500).unwrap();
    assert_eq!(
        m.object_intents_before(1_000, 10).unwrap(),
        ["k/old", "k/mid", "k/new"]
    );
    assert_eq!(
        m.object_intents_before(1_000, 2).unwrap(),
        ["k/old", "k/mid"]
    );
    assert_eq!(m.object_intents_before(500, 10).unwrap(), ["k/old"]);
    // Recording again (a retried write) restarts the grace period.
    m.record_object_intent("k/old", 950).unwrap();
    assert_eq!(m.object_intents_before(600, 10).unwrap(), ["k/mid"]);
    m.clear_object_intent("k/mid").unwrap();
    m.clear_object_intent("k/none").unwrap();
    assert!(m.object_intents_before(600, 10).unwrap().is_empty());

    // A batch upload's intents: in one call, a key twice (one NAR sent twice in a batch).
    let batch: Vec<String> = ["b/1", "b/2", "b/1"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    m.record_object_intents(&batch, 300).unwrap();
    assert_eq!(m.object_intents_before(600, 10).unwrap(), ["b/1", "b/2"]);
    m.clear_object_intents(&batch).unwrap();
    assert!(m.object_intents_before(600, 10).unwrap().is_empty());
    m.record_object_intents(&[], 300).unwrap();
    m.clear_object_intents(&[]).unwrap();

    m.insert_nar("r", &nar("nar/x.nar.xz", "sha256:x")).unwrap();
    let keys: Vec<String> = [
        "objects/nar/x.nar.xz",
        "objects/nar/y.nar.xz",
        "r/nar/x.nar.xz",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    assert_eq!(m.known_object_keys(&keys).unwrap(), [true, false, false]);
    assert!(m.known_object_keys(&[]).unwrap().is_empty());
}

fn singleton_is_exclusive_across_handles(b: &Backend) {
    let other = b.reopen().expect("a second handle");
    let held = b
        .meta
        .try_singleton("janitor")
        .unwrap()
        .expect("free at first");
    assert!(
        other.try_singleton("janitor").unwrap().is_none(),
        "a second holder through another handle"
    );
    assert!(b.meta.try_singleton("janitor").unwrap().is_none());
    let unrelated = other.try_singleton("something else").unwrap();
    assert!(unrelated.is_some(), "names are independent");
    drop(held);
    let taken = other
        .try_singleton("janitor")
        .unwrap()
        .expect("free again once dropped");
    // From many threads at once, exactly one wins.
    drop(taken);
    let handles: Vec<Arc<dyn Metadata>> = (0..4)
        .map(|i| {
            if i % 2 == 0 {
                Arc::clone(&b.meta)
            } else {
                Arc::clone(&other)
            }
        })
        .collect();
    let handles = Arc::new(handles);
    let barrier = Arc::new(Barrier::new(4));
    let joined: Vec<_> = (0..4)
        .map(|i| {
            let handles = Arc::clone(&handles);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let guard = handles[i].try_singleton("race").unwrap();
                let won = guard.is_some();
                // Everyone has tried before anyone lets go.
                barrier.wait();
                drop(guard);
                won
            })
        })
        .collect();
    let winners = joined
        .into_iter()
        .filter(|_| true)
        .map(|h| h.join().unwrap())
        .filter(|won| *won)
        .count();
    assert_eq!(winners, 1);
}

fn a_newer_schema_is_refused(b: &Backend) {
    let version = b.meta.schema_version().unwrap();
    assert!(version >= 3, "schema version {version}");
    // Opening again is idempotent.
    assert_eq!(b.reopen().unwrap().schema_version().unwrap(), version);
    b.set_schema_version(999);
    match b.reopen() {
        Err(MetaError::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (999, version));
        }
        Err(other) => panic!("expected SchemaTooNew, got {other}"),
        Ok(_) => panic!("a database at schema version 999 was opened"),
    }
    let message = MetaError::SchemaTooNew {
        found: 999,
        supported: version,
    }
    .to_string();
    assert!(
        message.contains("999") && message.contains(&version.to_string()),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only.

/// No exempt references.
fn none() -> std::collections::HashSet<String> {
    std::collections::HashSet::new()
}

/// A 32-character hash part made of `c`.
fn h(c: char) -> String {
    std::iter::repeat_n(c, 32).collect()
}

/// A published narinfo of `h(c)` naming the NAR `nar/<h(c)>.nar.xz` and referencing `refs`.
fn path(c: char, refs: &[char]) -> PublishedNarInfo {
    let hash = h(c);
    let references: Vec<String> = refs.iter().map(|r| format!("{}-{r}", h(*r))).collect();
    PublishedNarInfo {
        hash: hash.clone(),
        store_path: format!("/nix/store/{hash}-{c}"),
        nar_hash: format!("sha256:{hash}"),
        text: format!(
            "StorePath: /nix/store/{hash}-{c}\nURL: nar/{hash}.nar.xz\nReferences: {}\n",
            references.join(" ")
        ),
    }
}

/// Stores the NAR `path(c, ..)` names, `size` bytes.
fn store_nar(m: &dyn Metadata, repo: &str, c: char, size: u64) {
    let mut record = nar(&format!("nar/{}.nar.xz", h(c)), &format!("sha256:{}", h(c)));
    record.file_size = size;
    assert!(m.insert_nar(repo, &record).unwrap());
}

/// Stores the NARs and publishes `paths` at `at`, each newly.
fn publish_at(m: &dyn Metadata, repo: &str, paths: &[(char, &[char])], at: i64) {
    for (c, _) in paths {
        store_nar(m, repo, *c, 100);
    }
    let infos: Vec<PublishedNarInfo> = paths.iter().map(|(c, r)| path(*c, r)).collect();
    let states = m.publish_checked(repo, &infos, &none(), at).unwrap();
    assert!(states.iter().all(|s| *s == PublishState::New), "{states:?}");
}

fn published(m: &dyn Metadata, repo: &str, chars: &[char]) -> Vec<bool> {
    let hashes: Vec<String> = chars.iter().map(|c| h(*c)).collect();
    m.published_store_paths(repo, &hashes)
        .unwrap()
        .into_iter()
        .map(|p| p.is_some())
        .collect()
}

/// Runs a whole collection of `repo` with every path last used before `cutoff` out of the
/// roots; returns the removed hash parts' first characters, sorted.
fn collect(m: &dyn Metadata, repo: &str, cutoff: i64, now: i64) -> String {
    let mut session = m.gc_session(repo).unwrap();
    session.mark(cutoff).unwrap();
    session.dead().unwrap();
    let mut removed = Vec::new();
    loop {
        let swept = session.sweep(2, now).unwrap();
        if swept.paths.is_empty() {
            break;
        }
        removed.extend(
            swept
                .paths
                .into_iter()
                .map(|p| p.hash.chars().next().unwrap()),
        );
    }
    removed.sort();
    removed.into_iter().collect()
}

fn retention_policy_and_usage(b: &Backend) {
    let m = &*b.meta;
    m.create_repo(&repo("r", false, 40)).unwrap();
    assert_eq!(m.policy("r").unwrap(), Some(RetentionPolicy::default()));
    assert_eq!(m.policy("absent").unwrap(), None);
    let policy = RetentionPolicy {
        retention_secs: Some(30 * 86_400),
        max_size_bytes: Some(200 << 30),
    };
    assert!(m.set_policy("r", &policy).unwrap());
    assert!(!m.set_policy("absent", &policy).unwrap());
    assert_eq!(b.reopen().unwrap().policy("r").unwrap(), Some(policy));
    publish_at(m, "r", &[('a', &[]), ('b', &['a'])], 10);
    store_nar(m, "r", 'u', 7);
    let usage = m.usage("r").unwrap();
    assert_eq!((usage.paths, usage.nars, usage.bytes), (2, 3, 207));
}

fn publication_checks_references_and_nars_in_its_transaction(b: &Backend) {
    let m = &*b.meta;
    store_nar(m, "r", 'a', 1);
    store_nar(m, "r", 'b', 1);
    // b references a, which is neither published nor in the batch.
    assert_eq!(
        m.publish_checked("r", &[path('b', &['a', 'b'])], &none(), 1)
            .unwrap(),
        vec![PublishState::MissingReferences(vec![h('a')])]
    );
    // In one batch, in any order, they go together; a NAR not stored refuses its path and,
    // transitively, what references it.
    assert_eq!(
        m.publish_checked(
            "r",
            &[path('c', &['b']), path('b', &['a']), path('a', &[])],
            &none(),
            1
        )
        .unwrap(),
        vec![
            PublishState::NarGone(format!("nar/{}.nar.xz", h('c'))),
            PublishState::New,
            PublishState::New
        ]
    );
    store_nar(m, "r", 'd', 1);
    assert_eq!(
        m.publish_checked("r", &[path('d', &['c']), path('a', &[])], &none(), 1)
            .unwrap(),
        vec![
            PublishState::MissingReferences(vec![h('c')]),
            PublishState::Already
        ]
    );
    // A reference a trusted upstream serves (proven by the publication) is exempt.
    store_nar(m, "r", 'f', 1);
    let upstream: std::collections::HashSet<String> = [h('u')].into_iter().collect();
    assert_eq!(
        m.publish_checked("r", &[path('f', &['u', 'a'])], &upstream, 1)
            .unwrap(),
        vec![PublishState::New]
    );
    // The default `publish` reports the same as booleans.
    store_nar(m, "r", 'e', 1);
    assert_eq!(
        m.publish("r", &[path('e', &['a', 'b'])]).unwrap(),
        vec![true]
    );
}

fn collection_keeps_roots_closures_and_pins_and_sweeps_referrers_first(b: &Backend) {
    let m = &*b.meta;
    // c -> b -> a (old), d (old), e (new), p (old, pinned) -> q (old).
    publish_at(
        m,
        "r",
        &[
            ('a', &[]),
            ('b', &['a']),
            ('c', &['b']),
            ('d', &[]),
            ('q', &[]),
            ('p', &['q']),
        ],
        100,
    );
    publish_at(m, "r", &[('e', &[])], 300);
    m.touch_paths("r", &[(h('c'), 250)]).unwrap();
    assert!(matches!(
        m.create_pin("r", "rel", &[h('p')], None, 100).unwrap(),
        PinCreated::Created { .. }
    ));
    {
        let mut session = m.gc_session("r").unwrap();
        assert_eq!(session.oldest_use().unwrap(), Some(100));
        let live = session.mark(200).unwrap();
        // c (used at 250) keeps b and a; e is new; p is pinned and keeps q.
        assert_eq!((live.paths, live.bytes), (6, 600));
        let dead = session.dead().unwrap();
        assert_eq!((dead.paths, dead.nars, dead.bytes), (1, 1, 100));
        assert_eq!(session.mark(260).unwrap().paths, 3);
        let dead = session.dead().unwrap();
        assert_eq!(dead.paths, 4);
        // Batches of one: c goes before b, b before a; d any time.
        let mut order = Vec::new();
        loop {
            let swept = session.sweep(1, 999).unwrap();
            if swept.paths.is_empty() {
                break;
            }
            assert_eq!(swept.nars_orphaned, 1);
            order.push(swept.paths[0].hash.chars().next().unwrap());
        }
        let position = |c| order.iter().position(|x| *x == c).unwrap();
        assert!(
            position('c') < position('b') && position('b') < position('a'),
            "{order:?}"
        );
        assert_eq!(order.len(), 4);
    }
    assert_eq!(
        published(m, "r", &['a', 'b', 'c', 'd', 'e', 'p', 'q']),
        [false, false, false, false, true, true, true]
    );
    assert_eq!(m.usage("r").unwrap().paths, 3);
    // Their NARs are marked, not deleted.
    assert_eq!(m.usage("r").unwrap().nars, 7);
    assert_eq!(m.collectible_nars("r", 999).unwrap(), (0, 0));
    assert_eq!(m.collectible_nars("r", 1000).unwrap(), (4, 400));
}

fn a_publication_during_a_collection_keeps_what_it_references(b: &Backend) {
    let m = &*b.meta;
    // b -> a, both old: candidates. Then x, published after the mark, references b.
    publish_at(m, "r", &[('a', &[]), ('b', &['a'])], 100);
    let mut session = m.gc_session("r").unwrap();
    session.mark(200).unwrap();
    assert_eq!(session.dead().unwrap().paths, 2);
    publish_at(m, "r", &[('x', &['b'])], 300);
    assert!(session.sweep(10, 400).unwrap().paths.is_empty());
    drop(session);
    assert_eq!(published(m, "r", &['a', 'b', 'x']), [true, true, true]);
    // And the other way round: once b is gone, a publication referencing it is refused.
    let PathDeletion::Deleted { paths, .. } = m.delete_paths("r", &[h('b')], true).unwrap() else {
        panic!("a deletion with its dependents is never refused");
    };
    let mut deleted: Vec<String> = paths.into_iter().map(|p| p.hash).collect();
    deleted.sort();
    let mut expected = vec![h('b'), h('x')];
    expected.sort();
    assert_eq!(deleted, expected, "b and x, which references it");
    store_nar(m, "r", 'y', 1);
    assert_eq!(
        m.publish_checked("r", &[path('y', &['b'])], &none(), 500)
            .unwrap(),
        vec![PublishState::MissingReferences(vec![h('b')])]
    );
}

fn last_use_only_rises(b: &Backend) {
    let m = &*b.meta;
    publish_at(m, "r", &[('a', &[]), ('b', &[])], 100);
    m.touch_paths("r", &[(h('a'), 500), (h('a'), 300), (h('z'), 900)])
        .unwrap();
    m.touch_nars("r", &[(format!("nar/{}.nar.xz", h('b')), 400)])
        .unwrap();
    m.touch_paths("r", &[(h('b'), 50)]).unwrap();
    assert_eq!(collect(m, "r", 401, 1000), "b");
    assert_eq!(collect(m, "r", 501, 1000), "a");
}

fn unreferenced_nars_wait_for_their_grace(b: &Backend) {
    let m = &*b.meta;
    publish_at(m, "r", &[('a', &[])], 100);
    store_nar(m, "r", 'u', 5);
    // Created just now (real clock): not older than `created_before` yet.
    assert_eq!(m.mark_unpublished_nars("r", 0, 10, false).unwrap(), 0);
    let later = stowix::server::metadata::now_unix() + 10;
    assert_eq!(m.mark_unpublished_nars("r", later, 1000, true).unwrap(), 1);
    assert_eq!(m.collectible_nars("r", 2000).unwrap(), (0, 0));
    assert_eq!(m.mark_unpublished_nars("r", later, 1000, false).unwrap(), 1);
    assert_eq!(m.collectible_nars("r", 1000).unwrap(), (0, 0));
    assert_eq!(m.collectible_nars("r", 1001).unwrap(), (1, 5));
    // Publishing a path naming a marked NAR revives it.
    store_nar(m, "r", 'v', 6);
    assert_eq!(m.mark_unpublished_nars("r", later, 1000, false).unwrap(), 1);
    publish_at_existing(m, "r", 'v');
    let taken = m.take_collectible_nars("r", 5000, 10).unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].url, format!("nar/{}.nar.xz", h('u')));
    assert!(m.nar_by_url("r", &taken[0].url).unwrap().is_none());
    assert!(m.take_collectible_nars("r", 5000, 10).unwrap().is_empty());
    assert_eq!(m.usage("r").unwrap().nars, 2);
}

fn publish_at_existing(m: &dyn Metadata, repo: &str, c: char) {
    assert_eq!(
        m.publish_checked(repo, &[path(c, &[])], &none(), 1)
            .unwrap(),
        vec![PublishState::New]
    );
}

fn path_deletion_refuses_dependents_unless_asked(b: &Backend) {
    let m = &*b.meta;
    publish_at(
        m,
        "r",
        &[('a', &[]), ('b', &['a']), ('c', &['b']), ('d', &[])],
        100,
    );
    match m.delete_paths("r", &[h('a')], false).unwrap() {
        PathDeletion::Refused { mut dependents } => {
            dependents.sort();
            assert_eq!(
                dependents,
                vec![
                    format!("/nix/store/{}-b", h('b')),
                    format!("/nix/store/{}-c", h('c'))
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(published(m, "r", &['a', 'b', 'c']), [true, true, true]);
    match m.delete_paths("r", &[h('d')], false).unwrap() {
        PathDeletion::Deleted { paths, nars } => {
            assert_eq!(paths.len(), 1);
            assert_eq!(nars.len(), 1);
            assert_eq!(nars[0].url, format!("nar/{}.nar.xz", h('d')));
        }
        other => panic!("{other:?}"),
    }
    match m.delete_paths("r", &[h('a')], true).unwrap() {
        PathDeletion::Deleted { paths, nars } => {
            assert_eq!(paths.len(), 3);
            assert_eq!(nars.len(), 3);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.usage("r").unwrap().paths, 0);
    assert_eq!(m.usage("r").unwrap().nars, 0);
}

fn max_size_evicts_least_recently_used_closures(b: &Backend) {
    use stowix::server::gc::{collect_repo, GcOptions};
    let m = &*b.meta;
    m.create_repo(&repo("r", false, 40)).unwrap();
    // Three paths of 100 bytes each, used at 1000, 1100 and 1200; then the first at 5000.
    for (i, c) in ['a', 'b', 'c'].into_iter().enumerate() {
        publish_at(m, "r", &[(c, &[])], 1000 + 100 * i as i64);
    }
    m.touch_nars("r", &[(format!("nar/{}.nar.xz", h('a')), 5000)])
        .unwrap();
    let run = |max: u64, dry_run: bool| {
        m.set_policy(
            "r",
            &RetentionPolicy {
                retention_secs: None,
                max_size_bytes: Some(max),
            },
        )
        .unwrap();
        let options = GcOptions {
            repo: Some("r".into()),
            dry_run,
            now: 10_000,
            grace_secs: 60,
            orphan_grace_secs: 1000,
        };
        collect_repo(m, "r", &options, |_| {}).unwrap()
    };
    let dry = run(200, true);
    assert_eq!(
        (dry.paths_removed, dry.kept_paths, dry.kept_bytes),
        (1, 2, 200)
    );
    let real = run(200, false);
    assert_eq!(real.removed, vec![format!("/nix/store/{}-b", h('b'))]);
    assert_eq!(
        (real.paths_removed, real.kept_paths, real.kept_bytes),
        (1, 2, 200)
    );
    let real = run(199, false);
    assert_eq!(real.removed, vec![format!("/nix/store/{}-c", h('c'))]);
    assert_eq!((real.kept_paths, real.kept_bytes), (1, 100));
}

fn pins_number_revisions_and_keep_the_last(b: &Backend) {
    let m = &*b.meta;
    publish_at(m, "r", &[('a', &[]), ('b', &[]), ('c', &[])], 100);
    assert_eq!(
        m.create_pin("r", "rel", &[h('a'), h('z')], None, 1)
            .unwrap(),
        PinCreated::NotPublished(vec![h('z')])
    );
    for (i, c) in ['a', 'b', 'c'].into_iter().enumerate() {
        let keep = if i == 2 { Some(2) } else { None };
        match m
            .create_pin("r", "rel", &[h(c)], keep, 10 + i as i64)
            .unwrap()
        {
            PinCreated::Created { pin, dropped } => {
                assert_eq!(pin.revision, i as u64 + 1);
                assert_eq!(pin.store_paths, vec![format!("/nix/store/{}-{c}", h(c))]);
                assert_eq!(dropped, if i == 2 { vec![1] } else { vec![] });
            }
            other => panic!("{other:?}"),
        }
    }
    m.create_pin("r", "other", &[h('a')], None, 20).unwrap();
    let pins = m.pins(Some("r")).unwrap();
    let listed: Vec<(&str, u64, Option<u32>)> = pins
        .iter()
        .map(|p| (p.name.as_str(), p.revision, p.keep))
        .collect();
    assert_eq!(
        listed,
        vec![("other", 1, None), ("rel", 2, Some(2)), ("rel", 3, Some(2))]
    );
    assert_eq!(m.pins(None).unwrap().len(), 3);
    assert!(m.pins(Some("s")).unwrap().is_empty());
    // A new revision without keep keeps the pin's setting.
    match m.create_pin("r", "rel", &[h('a')], None, 30).unwrap() {
        PinCreated::Created { pin, dropped } => {
            assert_eq!((pin.revision, pin.keep), (4, Some(2)));
            assert_eq!(dropped, vec![2]);
        }
        other => panic!("{other:?}"),
    }
    // Revision 2 (b) was dropped: b goes; c (revision 3) and a (4, and "other") stay.
    assert_eq!(collect(m, "r", 1000, 1000), "b");
    assert_eq!(m.delete_pin("r", "rel", Some(3)).unwrap(), 1);
    assert_eq!(m.delete_pin("r", "rel", Some(3)).unwrap(), 0);
    assert_eq!(collect(m, "r", 1000, 1000), "c");
    assert_eq!(m.delete_pin("r", "rel", None).unwrap(), 1);
    assert_eq!(m.delete_pin("r", "other", None).unwrap(), 1);
    assert!(m.pins(None).unwrap().is_empty());
    assert_eq!(collect(m, "r", 1000, 1000), "a");
}

#[test]
fn postgres_recovers_from_lost_connections() {
    let b = Backend::postgres();
    let Kind::Postgres(db) = &b.kind else {
        unreachable!()
    };
    b.meta.create_repo(&repo("r", false, 40)).unwrap();
    // Fill the pool with several idle connections.
    let m = Arc::clone(&b.meta);
    race(4, move |_| m.repos().unwrap().len());
    assert!(
        db.terminate_connections() >= 1,
        "no connection to terminate"
    );
    // The first call may notice the loss (Unavailable) or already be on a new connection.
    match b.meta.create_repo(&repo("s", false, 40)) {
        Ok(created) => assert!(created),
        Err(MetaError::Unavailable(message)) => {
            assert!(message.contains("PostgreSQL"), "{message}")
        }
        Err(other) => panic!("expected Unavailable after the connection was lost, got {other}"),
    }
    // Reads are retried on a fresh connection, and so all succeed.
    assert!(b.meta.repo("r").unwrap().is_some());
    assert!(b.meta.create_repo(&repo("t", false, 40)).unwrap());
    b.meta.ping().unwrap();
    assert!(db.terminate_connections() >= 1);
    for _ in 0..5 {
        b.meta.repos().unwrap();
    }
}

#[test]
fn postgres_replicas_starting_together_migrate_once() {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(config_for(&dir, db.url().to_string()));
    let opened = race(4, move |_| {
        open(&config).map(|m| m.schema_version().unwrap())
    });
    for result in opened {
        assert_eq!(
            result.unwrap(),
            stowix::server::backend::metadata::postgres::SCHEMA_VERSION
        );
    }
    assert_eq!(
        db.sql("SELECT count(*)::text FROM stowix_schema_version"),
        [Some("1".to_string())]
    );
}

#[test]
fn postgres_unreachable_is_unavailable_with_the_address() {
    let port = {
        // A port nothing listens on: bound, then released.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(
        &dir,
        format!("postgres://stowix:hunter2@127.0.0.1:{port}/stowix?connect_timeout=2"),
    );
    match open(&config) {
        Err(MetaError::Unavailable(message)) => {
            assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
        Err(other) => panic!("expected Unavailable, got {other}"),
        Ok(_) => panic!("connected to a port nothing listens on"),
    }
}

#[test]
fn postgres_missing_database_is_a_configuration_error() {
    pg_support::require_postgres();
    let mut url = url::Url::parse(&pg_support::admin_url()).unwrap();
    url.set_path("/stowix_no_such_database");
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(&dir, url.to_string());
    match open(&config) {
        Err(MetaError::Other(message)) => {
            assert!(message.contains("stowix_no_such_database"), "{message}")
        }
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("opened a database that does not exist"),
    }
}

/// Whether every stowix connection to `db` is encrypted, and how many there are.
fn stowix_connections_ssl(db: &TestDatabase) -> (usize, bool) {
    let rows = db.sql(&format!(
        "SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.datname = '{}' AND a.application_name = 'stowix'",
        db.name()
    ));
    let all = rows.iter().all(|ssl| ssl.as_deref() == Some("true"));
    (rows.len(), all)
}

#[test]
fn postgres_sslmode_require_encrypts_and_disable_does_not() {
    let db = TestDatabase::create();
    let ssl = db.sql("SHOW ssl");
    assert_eq!(
        ssl,
        [Some("on".to_string())],
        "the test server has TLS off; Debian's cluster has it on (snakeoil certificate): \
         set ssl = on in postgresql.conf"
    );
    let dir = tempfile::tempdir().unwrap();
    let encrypted = open(&config_for(&dir, format!("{}?sslmode=require", db.url()))).unwrap();
    encrypted.repos().unwrap();
    let (count, all_ssl) = stowix_connections_ssl(&db);
    assert!(
        count >= 1 && all_ssl,
        "{count} connections, all TLS: {all_ssl}"
    );
    drop(encrypted);

    let plain = open(&config_for(&dir, format!("{}?sslmode=disable", db.url()))).unwrap();
    plain.repos().unwrap();
    let rows = db.sql(&format!(
        "SELECT count(*)::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.datname = '{}' AND a.application_name = 'stowix' AND NOT s.ssl",
        db.name()
    ));
    assert_ne!(
        rows,
        [Some("0".to_string())],
        "sslmode=disable still used TLS"
    );
}

#[test]
fn postgres_verify_full_refuses_a_certificate_it_cannot_verify() {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    // The server's self-signed certificate is not among the public roots.
    match open(&config_for(
        &dir,
        format!("{}?sslmode=verify-full", db.url()),
    )) {
        Err(MetaError::Other(message)) => {
            assert!(
                message.contains("TLS") && message.contains("sslrootcert"),
                "{message}"
            );
        }
        Err(other) => panic!("expected a TLS settings error, got {other}"),
        Ok(_) => panic!("verify-full accepted an unverifiable certificate"),
    }
    let missing = format!(
        "{}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        db.url()
    );
    match open(&config_for(&dir, missing)) {
        Err(MetaError::Other(message)) => {
            assert!(message.contains("/nonexistent/ca.pem"), "{message}")
        }
        Err(other) => panic!("expected a settings error naming the file, got {other}"),
        Ok(_) => panic!("opened with a CA file that does not exist"),
    }
}

#[test]
fn postgres_disk_full_is_reported_as_full_without_sql() {
    let b = Backend::postgres();
    let Kind::Postgres(db) = &b.kind else {
        unreachable!()
    };
    // PostgreSQL's own SQLSTATE for a full disk, raised where an insert would extend the table.
    db.sql(
        "CREATE FUNCTION stowix_test_full() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           RAISE EXCEPTION 'could not extend file \"base/1/2\": No space left on device'
             USING ERRCODE = '53100';
         END $$;
         CREATE TRIGGER stowix_test_full BEFORE INSERT ON narinfos
           FOR EACH ROW EXECUTE FUNCTION stowix_test_full();",
    );
    match b.meta.publish("r", &[narinfo("a", "a")]) {
        Err(MetaError::Full(message)) => {
            assert!(message.contains("No space left on device"), "{message}");
            assert!(!message.contains("INSERT"), "SQL text in {message}");
        }
        Err(other) => panic!("expected Full, got {other}"),
        Ok(_) => panic!("published through a full disk"),
    }
    db.sql("DROP TRIGGER stowix_test_full ON narinfos");
    assert_eq!(
        b.meta.publish("r", &[narinfo("a", "a")]).unwrap(),
        [true],
        "the connection is usable once space is back"
    );
}
