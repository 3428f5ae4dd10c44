//! Every authentication and authorisation case, on every kind of push route (the push API,
//! the upload-by-id routes, and the `nix copy` PUTs), with Bearer and Basic credentials;
//! upload ids of another repository; tokens for several repositories; private repository
//! reads; tokens kept out of logs. Each case has its own server so no failure counter carries
//! over.

mod common;

use std::collections::HashMap;

use common::*;
use stowix::api::{self, codes};

/// Bytes of each setup upload the server holds: a refused PATCH or DELETE would change it.
const HELD: usize = 100;

/// A server with repository `repo` (public), `other` (public) and `private` (private), and in
/// each an unfinished upload holding [`HELD`] bytes.
struct Setup {
    server: TestServer,
    repo: String,
    other: String,
    private: String,
    path: LocalPath,
    /// The NAR the setup uploads are for.
    upload_path: LocalPath,
    /// Per repository: its unfinished upload id, and a push token that made it.
    uploads: HashMap<String, (String, String)>,
}

impl Setup {
    async fn new() -> Self {
        let server = TestServer::start();
        let repo = unique_name("auth");
        let other = unique_name("other");
        let private = unique_name("priv");
        server.create_repo(&repo, false);
        server.create_repo(&other, false);
        server.create_repo(&private, true);
        let path = LocalPath::load(&build_text("auth-path", &nonce()));
        let upload_path = LocalPath::load(&build_random("auth-upload", 4_000));
        let (file, _) = upload_path.xz_upload();
        let mut uploads = HashMap::new();
        for name in [&repo, &other, &private] {
            let token = server.create_token(name, "push");
            let url = server.repo_url(name);
            let id = create_upload(&url, &token, &xz_create_upload(&upload_path))
                .await
                .upload_id;
            patch_rest(&url, &token, &id, &file[..HELD], 0, HELD).await;
            uploads.insert(name.clone(), (id, token));
        }
        Setup {
            server,
            repo,
            other,
            private,
            path,
            upload_path,
            uploads,
        }
    }

    fn url(&self) -> String {
        self.server.repo_url(&self.repo)
    }

    /// The repository name of `repo_url`.
    fn name_of(repo_url: &str) -> &str {
        repo_url.trim_end_matches('/').rsplit('/').next().unwrap()
    }

    /// The upload id of another repository than the one of `repo_url`.
    fn foreign_upload(&self, repo_url: &str) -> &str {
        let name = Self::name_of(repo_url);
        let foreign = if name == self.other {
            &self.repo
        } else {
            &self.other
        };
        &self.uploads[foreign].0
    }

    /// Sends every push route of `repo_url` with `authorization` (None: no header) and
    /// returns (route, status, body) for each. The upload-by-id routes are sent for the
    /// repository's own unfinished upload and for another repository's.
    async fn push_routes(
        &self,
        repo_url: &str,
        authorization: Option<&str>,
    ) -> Vec<(&'static str, u16, String)> {
        let (file, params) = self.path.xz_upload();
        let narinfo = format!(
            "StorePath: {}\nURL: nar/{}.nar.xz\nCompression: xz\nFileHash: {}\nFileSize: {}\n\
             NarHash: {}\nNarSize: {}\nReferences: \n",
            self.path.path,
            params.file_hash.trim_start_matches("sha256:"),
            params.file_hash,
            params.file_size,
            self.path.nar_hash,
            self.path.nar_size()
        );
        let client = http();
        let mut reqs: Vec<(&'static str, reqwest::RequestBuilder)> = vec![
            (
                "POST presence",
                client
                    .post(api_url(repo_url, "presence"))
                    .json(&api::PresenceRequest {
                        paths: vec![self.path.presence_query()],
                    }),
            ),
            (
                "POST nars",
                client
                    .post(api_url(repo_url, "nars"))
                    .query(&params)
                    .body(file.clone()),
            ),
            (
                "POST uploads",
                client
                    .post(api_url(repo_url, "uploads"))
                    .json(&xz_create_upload(&self.path)),
            ),
            (
                "POST narinfos",
                client
                    .post(api_url(repo_url, "narinfos"))
                    .json(&api::PublishRequest {
                        narinfos: vec![self.path.publish_entry()],
                        upstream: vec![],
                    }),
            ),
            (
                "PUT nar",
                client
                    .put(format!(
                        "{repo_url}/nar/{}.nar.xz",
                        params.file_hash.trim_start_matches("sha256:")
                    ))
                    .header("Content-Type", "application/x-nix-nar")
                    .body(file.clone()),
            ),
            (
                "PUT narinfo",
                client
                    .put(format!("{repo_url}/{}.narinfo", self.path.hash))
                    .header("Content-Type", "text/x-nix-narinfo")
                    .body(narinfo),
            ),
        ];
        let (upload_file, upload_params) = self.upload_path.xz_upload();
        let own = self.uploads[Self::name_of(repo_url)].0.as_str();
        let foreign = self.foreign_upload(repo_url);
        let complete = api::CompleteUpload {
            file_hash: upload_params.file_hash.clone(),
            file_size: upload_params.file_size,
        };
        for (id, [get, patch, complete_name, delete]) in [
            (
                own,
                [
                    "GET uploads/{id}",
                    "PATCH uploads/{id}",
                    "POST uploads/{id}/complete",
                    "DELETE uploads/{id}",
                ],
            ),
            (
                foreign,
                [
                    "GET uploads/{another repository's id}",
                    "PATCH uploads/{another repository's id}",
                    "POST uploads/{another repository's id}/complete",
                    "DELETE uploads/{another repository's id}",
                ],
            ),
        ] {
            let at = api_url(repo_url, &format!("uploads/{id}"));
            reqs.push((get, client.get(&at)));
            reqs.push((
                patch,
                client
                    .patch(&at)
                    .header(api::UPLOAD_OFFSET_HEADER, HELD.to_string())
                    .header("Content-Type", "application/octet-stream")
                    .body(upload_file[HELD..2 * HELD].to_vec()),
            ));
            reqs.push((
                complete_name,
                client.post(format!("{at}/complete")).json(&complete),
            ));
            reqs.push((delete, client.delete(&at)));
        }
        let mut out = Vec::new();
        for (route, mut req) in reqs {
            if let Some(value) = authorization {
                req = req.header("Authorization", value);
            }
            let resp = req.send().await.expect(route);
            let status = resp.status().as_u16();
            out.push((route, status, resp.text().await.unwrap_or_default()));
        }
        out
    }

    /// Asserts every push route of `repo` answers `status` with error `code`, and that the
    /// path was neither stored nor published.
    async fn assert_push_refused(&self, authorization: Option<&str>, status: u16, code: &str) {
        self.assert_refused_at(&self.url(), authorization, status, code, &[])
            .await;
    }

    /// Like [`Setup::assert_push_refused`] for the routes that change the repository: the
    /// presence query is a read (a public repository answers it without a token, and a read
    /// token may ask it), so it is left out for the cases that only deny writing.
    async fn assert_write_refused(&self, authorization: Option<&str>, status: u16, code: &str) {
        self.assert_refused_at(&self.url(), authorization, status, code, &["POST presence"])
            .await;
    }

    async fn assert_refused_at(
        &self,
        repo_url: &str,
        authorization: Option<&str>,
        status: u16,
        code: &str,
        skip: &[&str],
    ) {
        let mut failures = Vec::new();
        for (route, got, body) in self.push_routes(repo_url, authorization).await {
            if skip.contains(&route) {
                assert!(
                    (200..300).contains(&got),
                    "{route} with {authorization:?}: {got} {body}"
                );
                continue;
            }
            let err = serde_json::from_str::<api::ApiError>(&body).ok();
            if got != status || err.as_ref().map(|e| e.code.as_str()) != Some(code) {
                failures.push(format!(
                    "{route}: expected {status} {code}, got {got} {body:?}"
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "authorization {authorization:?}:\n{}",
            failures.join("\n")
        );
        let (_, token) = &self.uploads[Self::name_of(repo_url)];
        let got = http()
            .get(format!("{repo_url}/{}.narinfo", self.path.hash))
            .header("Authorization", bearer(token))
            .send()
            .await
            .expect("GET narinfo")
            .status();
        assert_eq!(got, 404, "narinfo published despite refused credentials");
        assert!(
            !self.server.stores_file_with(&self.path.xz_upload().0),
            "NAR stored despite refused credentials"
        );
        self.assert_uploads_untouched().await;
        self.assert_no_secret_in_log();
    }

    /// Every setup upload still exists and holds exactly [`HELD`] bytes.
    async fn assert_uploads_untouched(&self) {
        for (name, (id, token)) in &self.uploads {
            let state = get_upload(&self.server.repo_url(name), token, id).await;
            assert_eq!(
                state.offset, HELD as u64,
                "upload {id} of {name} was changed by refused requests: {state:?}"
            );
        }
    }

    /// No token secret used against this server appears in its log.
    fn assert_no_secret_in_log(&self) {
        let log = self.server.log_text();
        assert!(
            !log.contains("stx_live_"),
            "a token appears in the server log:\n{log}"
        );
    }
}

/// A well-formed token with the id of `token` and another secret.
fn with_wrong_secret(token: &str) -> String {
    let id = token_id(token).unwrap();
    let secret = &token[token.len() - 24..];
    let wrong: String = secret
        .chars()
        .map(|c| if c == 'A' { 'B' } else { 'A' })
        .collect();
    format!("stx_live_{id}_{wrong}")
}

#[tokio::test]
async fn push_without_token_is_401_missing_token() {
    let s = Setup::new().await;
    s.assert_write_refused(None, 401, codes::MISSING_TOKEN)
        .await;
    // A private repository answers nothing, not even presence, without a token: it looks
    // absent, so its name cannot be confirmed.
    let private = s.server.repo_url(&s.private);
    s.assert_refused_at(&private, None, 404, codes::NO_SUCH_REPOSITORY, &[])
        .await;
}

#[tokio::test]
async fn push_with_malformed_token_is_401_malformed_token() {
    let s = Setup::new().await;
    for auth in [
        bearer("garbage"),
        bearer("stx_live_short_secret"),
        basic("not-a-token"),
    ] {
        s.assert_push_refused(Some(&auth), 401, codes::MALFORMED_TOKEN)
            .await;
    }
}

#[tokio::test]
async fn push_with_wrong_secret_or_unknown_id_is_401_invalid_token() {
    let s = Setup::new().await;
    let token = s.server.create_token(&s.repo, "push");
    let wrong = with_wrong_secret(&token);
    s.assert_push_refused(Some(&bearer(&wrong)), 401, codes::INVALID_TOKEN)
        .await;
    s.assert_push_refused(Some(&basic(&wrong)), 401, codes::INVALID_TOKEN)
        .await;
    let unknown = "stx_live_0123456789abcdefghijklmnop_0123456789ABCDEFGHIJKLMN";
    assert!(token_id(unknown).is_some());
    s.assert_push_refused(Some(&bearer(unknown)), 401, codes::INVALID_TOKEN)
        .await;
    // The right token still works afterwards.
    let pres = presence(&s.url(), &token, &[&s.path]).await;
    assert_eq!(pres.missing, vec![s.path.hash.clone()]);
}

#[tokio::test]
async fn push_with_revoked_token_is_401_revoked_token() {
    let s = Setup::new().await;
    let token = s.server.create_token(&s.repo, "push");
    let id = token_id(&token).unwrap().to_string();
    // Works before revocation.
    presence(&s.url(), &token, &[&s.path]).await;
    let list = s.server.admin(&["token", "list"]);
    let line = list
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("token {id} not in `token list`:\n{list}"));
    assert!(line.contains(&s.repo), "{line}");
    assert!(line.contains("push"), "{line}");
    assert!(!line.contains("revoked"), "{line}");
    assert!(
        !list.contains(&token[token.len() - 24..]),
        "token list shows a secret"
    );

    s.server.admin(&["token", "revoke", &id]);
    let list = s.server.admin(&["token", "list"]);
    let line = list.lines().find(|l| l.contains(&id)).unwrap();
    assert!(line.contains("revoked"), "revoked token listed as {line:?}");

    s.assert_push_refused(Some(&bearer(&token)), 401, codes::REVOKED_TOKEN)
        .await;
    s.assert_push_refused(Some(&basic(&token)), 401, codes::REVOKED_TOKEN)
        .await;
}

#[tokio::test]
async fn push_with_read_token_is_403_insufficient_scope() {
    let s = Setup::new().await;
    let token = s.server.create_token(&s.repo, "read");
    let info = repo_info(&s.url(), &token).await;
    assert_eq!(info.token_scope.as_deref(), Some("read"), "{info:?}");
    assert_eq!(info.repository, s.repo);
    s.assert_write_refused(Some(&bearer(&token)), 403, codes::INSUFFICIENT_SCOPE)
        .await;
    s.assert_write_refused(Some(&basic(&token)), 403, codes::INSUFFICIENT_SCOPE)
        .await;
}

#[tokio::test]
async fn push_with_token_of_another_repository_is_403_wrong_repository() {
    let s = Setup::new().await;
    let token = s.server.create_token(&s.other, "push");
    s.assert_push_refused(Some(&bearer(&token)), 403, codes::WRONG_REPOSITORY)
        .await;
    s.assert_push_refused(Some(&basic(&token)), 403, codes::WRONG_REPOSITORY)
        .await;
    // That token does push to its own repository.
    let other_url = s.server.repo_url(&s.other);
    push_paths(&other_url, &token, &[&s.path]).await;
}

#[tokio::test]
async fn push_with_basic_auth_works() {
    let s = Setup::new().await;
    let token = s.server.create_token(&s.repo, "push");
    let info = repo_info(&s.url(), &token).await;
    assert_eq!(info.token_scope.as_deref(), Some("push"));
    let results = s.push_routes(&s.url(), Some(&basic(&token))).await;
    // Presence answers, the single upload stores the NAR.
    assert_eq!(results[0].1, 200, "{:?}", results[0]);
    assert!(
        (200..300).contains(&results[1].1),
        "POST nars with Basic: {:?}",
        results[1]
    );
    s.assert_no_secret_in_log();
}

#[tokio::test]
async fn private_repository_reads_need_a_token_of_that_repository() {
    let s = Setup::new().await;
    let url = s.server.repo_url(&s.private);
    let push = s.server.create_token(&s.private, "push");
    let read = s.server.create_token(&s.private, "read");
    let revoked = s.server.create_token(&s.private, "read");
    s.server
        .admin(&["token", "revoke", token_id(&revoked).unwrap()]);
    let foreign = s.server.create_token(&s.repo, "read");
    push_paths(&url, &push, &[&s.path]).await;
    let (_, params) = s.path.xz_upload();
    let targets = [
        "nix-cache-info".to_string(),
        format!("{}.narinfo", s.path.hash),
        format!(
            "nar/{}.nar.xz",
            params.file_hash.trim_start_matches("sha256:")
        ),
    ];

    let cases: Vec<(String, Option<String>, u16, Option<&str>)> = vec![
        // Without access, a private repository answers as an absent one.
        (
            "no token".into(),
            None,
            404,
            Some(codes::NO_SUCH_REPOSITORY),
        ),
        ("read Bearer".into(), Some(bearer(&read)), 200, None),
        ("read Basic".into(), Some(basic(&read)), 200, None),
        ("push Bearer".into(), Some(bearer(&push)), 200, None),
        ("push Basic".into(), Some(basic(&push)), 200, None),
        (
            "malformed".into(),
            Some(bearer("nope")),
            401,
            Some(codes::MALFORMED_TOKEN),
        ),
        (
            "wrong secret".into(),
            Some(basic(&with_wrong_secret(&read))),
            401,
            Some(codes::INVALID_TOKEN),
        ),
        (
            "revoked".into(),
            Some(bearer(&revoked)),
            401,
            Some(codes::REVOKED_TOKEN),
        ),
        (
            "another repository's token".into(),
            Some(bearer(&foreign)),
            404,
            Some(codes::NO_SUCH_REPOSITORY),
        ),
    ];
    let mut failures = Vec::new();
    for (what, auth, status, code) in &cases {
        for target in &targets {
            for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
                let mut req = http().request(method.clone(), format!("{url}/{target}"));
                if let Some(auth) = auth {
                    req = req.header("Authorization", auth);
                }
                let resp = req.send().await.unwrap();
                let got = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                let code_ok = match (code, method == reqwest::Method::GET) {
                    (Some(code), true) => serde_json::from_str::<api::ApiError>(&body)
                        .map(|e| e.code == *code)
                        .unwrap_or(false),
                    _ => true,
                };
                if got != *status || !code_ok {
                    failures.push(format!(
                        "{what}: {method} {target}: expected {status} {code:?}, got {got} {body:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A public repository needs nothing to read.
    let public = s.url();
    let resp = http()
        .get(format!("{public}/nix-cache-info"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.assert_no_secret_in_log();
}

/// Tokens created while the server runs work at once: admin and server share the data dir.
#[tokio::test]
async fn tokens_and_repositories_created_while_serving_work_immediately() {
    let s = Setup::new().await;
    let fresh_repo = unique_name("late");
    let key = s.server.create_repo(&fresh_repo, false);
    let token = s.server.create_token(&fresh_repo, "push");
    let url = s.server.repo_url(&fresh_repo);
    let info = repo_info(&url, &token).await;
    assert_eq!(info.public_key, key);
    assert!(!info.private);
    let show = s.server.admin(&["repo", "show", &fresh_repo]);
    assert!(show.contains(&key), "repo show lacks the key:\n{show}");
    assert!(show.contains(&url) || show.contains(&fresh_repo), "{show}");
    let list = s.server.admin(&["repo", "list"]);
    for name in [&s.repo, &s.other, &s.private, &fresh_repo] {
        assert!(
            list.contains(name.as_str()),
            "repo list lacks {name}:\n{list}"
        );
    }
    push_paths(&url, &token, &[&s.path]).await;
}

/// An upload id names an upload of one repository: through another repository's URL, with
/// that repository's valid push token, it is not found, and the upload is left alone.
#[tokio::test]
async fn upload_ids_of_another_repository_are_not_found() {
    let mut s = Setup::new().await;
    let token = s.uploads[&s.repo].1.clone();
    for auth in [bearer(&token), basic(&token)] {
        let results = s.push_routes(&s.url(), Some(&auth)).await;
        let mut failures = Vec::new();
        for (route, got, body) in &results {
            if !route.contains("another repository's id") {
                continue;
            }
            let code = serde_json::from_str::<api::ApiError>(body)
                .ok()
                .map(|e| e.code);
            if *got != 404 || code.as_deref() != Some(codes::NOT_FOUND) {
                failures.push(format!(
                    "{route}: expected 404 not_found, got {got} {body:?}"
                ));
            }
        }
        assert!(failures.is_empty(), "{auth}:\n{}", failures.join("\n"));
        // The own upload's routes did work (the last one deleted it): the token was good.
        let own: Vec<_> = results
            .iter()
            .filter(|(route, ..)| route.contains("{id}"))
            .map(|(route, got, _)| (*route, *got))
            .collect();
        assert_eq!(
            own,
            vec![
                ("GET uploads/{id}", 200),
                ("PATCH uploads/{id}", 200),
                ("POST uploads/{id}/complete", 409),
                ("DELETE uploads/{id}", 204),
            ],
            "{results:#?}"
        );
        // Recreate the own upload for the next round.
        let url = s.url();
        let (file, _) = s.upload_path.xz_upload();
        let id = create_upload(&url, &token, &xz_create_upload(&s.upload_path))
            .await
            .upload_id;
        assert_ne!(id, s.uploads[&s.repo].0, "a deleted upload came back");
        patch_rest(&url, &token, &id, &file[..HELD], 0, HELD).await;
        s.uploads.get_mut(&s.repo).unwrap().0 = id;
        // The other repositories' uploads were not touched by any of it.
        s.assert_uploads_untouched().await;
    }
}

/// A token made for several repositories pushes to and reads each of them, and is refused on
/// every route of any other; a second token on another repository works independently, and
/// revoking one leaves the other working.
#[tokio::test]
async fn tokens_for_several_repositories_work_on_those_and_nowhere_else() {
    let s = Setup::new().await;
    let both = s
        .server
        .admin(&[
            "token", "create", "--repo", &s.repo, "--repo", &s.private, "--scope", "push",
        ])
        .trim()
        .to_string();
    assert!(token_id(&both).is_some(), "token create printed {both:?}");
    let single = s.server.create_token(&s.other, "push");
    let list = s.server.admin(&["token", "list"]);
    let line = list
        .lines()
        .find(|l| l.contains(token_id(&both).unwrap()))
        .unwrap_or_else(|| panic!("token not listed:\n{list}"));
    assert!(
        line.contains(&s.repo) && line.contains(&s.private),
        "{line}"
    );

    // Each token is refused on every route of the repository it is not for, and in either
    // direction: repo/private tokens on `other`, the `other` token on repo and private.
    for auth in [bearer(&both), basic(&both)] {
        s.assert_refused_at(
            &s.server.repo_url(&s.other),
            Some(&auth),
            403,
            codes::WRONG_REPOSITORY,
            &[],
        )
        .await;
    }
    // On a private repository, a token for other repositories gets the answer of an absent
    // repository, so it cannot learn the name exists.
    for (name, status, code) in [
        (&s.repo, 403, codes::WRONG_REPOSITORY),
        (&s.private, 404, codes::NO_SUCH_REPOSITORY),
    ] {
        for auth in [bearer(&single), basic(&single)] {
            s.assert_refused_at(&s.server.repo_url(name), Some(&auth), status, code, &[])
                .await;
        }
    }

    // Each pushes where it may: a path of its own to each of its repositories.
    let pushed: Vec<LocalPath> = (0..3)
        .map(|i| LocalPath::load(&build_text(&format!("multi-{i}"), &nonce())))
        .collect();
    push_paths(&s.server.repo_url(&s.repo), &both, &[&pushed[0]]).await;
    push_paths(&s.server.repo_url(&s.private), &both, &[&pushed[1]]).await;
    push_paths(&s.server.repo_url(&s.other), &single, &[&pushed[2]]).await;
    // The private repository is read with a token made for it, never with one for another.
    let private = s.server.repo_url(&s.private);
    for (token, status) in [(&both, 200), (&single, 404)] {
        let resp = http()
            .get(format!("{private}/{}.narinfo", pushed[1].hash))
            .header("Authorization", bearer(token))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "private read");
    }

    // Revoking one leaves the other working on all of its repositories.
    s.server
        .admin(&["token", "revoke", token_id(&single).unwrap()]);
    s.assert_refused_at(
        &s.server.repo_url(&s.other),
        Some(&bearer(&single)),
        401,
        codes::REVOKED_TOKEN,
        &[],
    )
    .await;
    for name in [&s.repo, &s.private] {
        let info = repo_info(&s.server.repo_url(name), &both).await;
        assert_eq!(&info.repository, name);
        assert_eq!(info.token_scope.as_deref(), Some("push"));
    }
    let extra = LocalPath::load(&build_text("multi-late", &nonce()));
    push_paths(&s.server.repo_url(&s.repo), &both, &[&extra]).await;
}
