//! The S3 storage layer (`src/server/s3.rs`) against a real SeaweedFS: what the upload staging
//! and the janitor rely on, checked call by call, so a store that behaves differently from AWS
//! shows up here before it shows up as a failed push.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::s3::S3Server;
use futures_util::TryStreamExt as _;
use stowix::server::backend::storage::s3::{AwsKeys, S3Store, MIN_PART_BYTES};

fn keys(s3: &S3Server) -> AwsKeys {
    let env = s3.env();
    AwsKeys {
        access_key_id: env[0].1.clone(),
        secret_access_key: env[1].1.clone(),
        session_token: None,
    }
}

fn store(s3: &S3Server) -> S3Store {
    S3Store::open_with_keys(
        &s3.storage_url(),
        s3.endpoint(),
        "us-east-1",
        Some(keys(s3)),
    )
    .expect("open S3 storage")
}

async fn read_all(store: &S3Store, key: &str) -> Option<Vec<u8>> {
    let (len, stream) = store.get(key).await.expect("get")?;
    let pieces: Vec<Bytes> = stream.try_collect().await.expect("read object");
    let bytes = pieces.concat();
    assert_eq!(bytes.len() as u64, len, "the announced length");
    Some(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_parts_assemble_in_order_and_abort_drops_them() {
    let s3 = S3Server::start();
    let store = store(&s3);
    store.health().await.expect("a reachable store is healthy");

    let key = "repo/uploads/0123456789abcdef0123456789abcdef";
    let id = store.create_multipart(key).await.unwrap();
    let part = |byte: u8, len: u64| vec![Bytes::from(vec![byte; len as usize])];
    let first = store
        .put_part(key, &id, 1, part(1, MIN_PART_BYTES))
        .await
        .unwrap();
    // A part sent twice (a retried chunk) replaces the first copy.
    let second = store
        .put_part(key, &id, 2, part(9, MIN_PART_BYTES))
        .await
        .unwrap();
    let second_again = store
        .put_part(key, &id, 2, part(2, MIN_PART_BYTES))
        .await
        .unwrap();
    assert_ne!(second, second_again, "the ETag names the content");
    let last = store.put_part(key, &id, 3, part(3, 10)).await.unwrap();
    assert_eq!(
        read_all(&store, key).await,
        None,
        "nothing visible before completion"
    );
    store
        .complete_multipart(key, &id, vec![first, second_again, last])
        .await
        .unwrap();
    let body = read_all(&store, key).await.expect("the assembled object");
    assert_eq!(body.len() as u64, 2 * MIN_PART_BYTES + 10);
    assert_eq!(body[0], 1);
    assert_eq!(body[MIN_PART_BYTES as usize], 2);
    assert_eq!(body[body.len() - 1], 3);
    assert_eq!(
        store.head(key).await.unwrap(),
        Some(2 * MIN_PART_BYTES + 10)
    );

    let key2 = "repo/uploads/fedcba9876543210fedcba9876543210";
    let id2 = store.create_multipart(key2).await.unwrap();
    store
        .put_part(key2, &id2, 1, part(4, MIN_PART_BYTES))
        .await
        .unwrap();
    store.abort_multipart(key2, &id2).await.unwrap();
    assert!(
        store.put_part(key2, &id2, 2, part(5, 10)).await.is_err(),
        "an aborted upload takes no more parts"
    );
    // Aborting again (a janitor retrying) is not an error.
    store.abort_multipart(key2, &id2).await.unwrap();
    assert_eq!(store.head(key2).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn whole_files_list_presign_and_delete() {
    let s3 = S3Server::start();
    let store = store(&s3);
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::write(&small, b"small nar").unwrap();
    // Over the single-PUT size: goes up as a multipart upload of 8 MiB parts.
    let large = dir.path().join("large");
    let large_bytes: Vec<u8> = (0..(17u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&large, &large_bytes).unwrap();
    store.put_file("r/nar/small.nar", &small).await.unwrap();
    store.put_file("r/nar/large.nar", &large).await.unwrap();
    assert_eq!(
        read_all(&store, "r/nar/small.nar").await.unwrap(),
        b"small nar"
    );
    assert!(read_all(&store, "r/nar/large.nar").await.unwrap() == large_bytes);

    let mut listed = store.list("").await.unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<_> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        keys,
        ["r/nar/large.nar", "r/nar/small.nar"],
        "keys without the prefix"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(listed.iter().all(|o| (o.last_modified - now).abs() < 300));
    assert_eq!(listed[1].size, 9);

    let url = store
        .presign_get("r/nar/small.nar", Duration::from_secs(60))
        .await
        .unwrap();
    let fetched = reqwest::get(&url).await.unwrap();
    assert_eq!(fetched.status(), 200, "{url}");
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), b"small nar");
    let tampered = url.replace("small.nar", "large.nar");
    assert_eq!(
        reqwest::get(&tampered).await.unwrap().status(),
        403,
        "the signature covers the key"
    );

    store.delete("r/nar/small.nar").await.unwrap();
    store.delete("r/nar/small.nar").await.unwrap();
    assert_eq!(read_all(&store, "r/nar/small.nar").await, None);
    assert!(
        store.get("../escape").await.is_err(),
        "unsafe keys are refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_or_bucket_fail_the_health_check() {
    let s3 = S3Server::start();
    let mut wrong_secret = keys(&s3);
    wrong_secret.secret_access_key.push('x');
    let bad_key = S3Store::open_with_keys(
        &s3.storage_url(),
        s3.endpoint(),
        "us-east-1",
        Some(wrong_secret),
    )
    .unwrap();
    let err = bad_key
        .health()
        .await
        .expect_err("a wrong secret is not healthy");
    assert!(err.to_string().starts_with("S3 storage s3://"), "{err}");
    let absent = S3Store::open_with_keys(
        &format!("s3://no-such-bucket-{}", common::nonce()),
        s3.endpoint(),
        "us-east-1",
        Some(keys(&s3)),
    )
    .unwrap();
    let err = absent
        .health()
        .await
        .expect_err("an absent bucket is not healthy");
    assert!(err.to_string().contains("s3://no-such-bucket"), "{err}");
    store(&s3)
        .health()
        .await
        .expect("the right bucket and keys are healthy");
}
