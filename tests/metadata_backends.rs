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
    MetaError, Metadata, NarRecord, OpenedUpload, Presence, PublishedNarInfo, RepoRecord, Scope,
    SessionCaps, TokenRecord, UploadPart, UploadRecord,
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
