//! One [`Kind`] per table or object family a migration copies. Each compares the source's
//! items with the target's, copies what the target lacks and leaves the rest alone.

use super::{Kind, MigrateError, Migration, Tally};
use crate::nix::hash::HashingWriter;
use crate::server::backend::metadata::{
    now_unix, NarRecord, PinCreated, PinRecord, Presence, RetentionPolicy,
};

/// Rows read from the source per query, and narinfos published per transaction.
const PAGE: usize = 500;

pub struct Repos;

impl Kind for Repos {
    fn name(&self) -> &'static str {
        "repositories"
    }

    fn copy(&self, run: &Migration<'_>, tally: &mut Tally) -> Result<(), MigrateError> {
        let meta = &run.target.meta;
        for repo in run.source.repos()? {
            // A concurrent creation of the same name makes create_repo answer false: compare.
            if meta.create_repo(&repo)? {
                tally.copied += 1;
            } else {
                let existing = meta.repo(&repo.name)?.ok_or_else(|| {
                    MigrateError::Target(format!("repository '{}' vanished", repo.name))
                })?;
                if existing.secret_key != repo.secret_key {
                    return Err(MigrateError::Conflict(format!(
                        "a repository '{}' with another signing key: its narinfos would not verify with the source's public key; rename or delete one of them",
                        repo.name
                    )));
                }
                tally.present += 1;
            }
            run.reporter.progress(self.name(), tally);
        }
        Ok(())
    }
}

/// Retention policies, after the repositories they belong to. A target repository with a
/// policy of its own keeps it.
pub struct Policies;

impl Kind for Policies {
    fn name(&self) -> &'static str {
        "retention policies"
    }

    fn copy(&self, run: &Migration<'_>, tally: &mut Tally) -> Result<(), MigrateError> {
        let meta = &run.target.meta;
        for repo in run.source.repos()? {
            let Some(policy) = run.source.policy(&repo.name)? else {
                continue;
            };
            if policy == RetentionPolicy::default() {
                continue;
            }
            match meta.policy(&repo.name)? {
                Some(existing) if existing == RetentionPolicy::default() => {
                    meta.set_policy(&repo.name, &policy)?;
                    tally.copied += 1;
                }
                _ => tally.present += 1,
            }
            run.reporter.progress(self.name(), tally);
        }
        Ok(())
    }
}

/// Pin revisions, after the narinfos they pin, oldest first with their creation times, so
/// `keep` drops in the target what it dropped in the source. Revision numbers start again
/// at 1 in the target; a revision is recognised on a rerun by its time and paths.
pub struct Pins;

impl Kind for Pins {
    fn name(&self) -> &'static str {
        "pin revisions"
    }

    fn copy(&self, run: &Migration<'_>, tally: &mut Tally) -> Result<(), MigrateError> {
        let meta = &run.target.meta;
        let mut target_pins: Option<(String, Vec<PinRecord>)> = None;
        for pin in run.source.pins()? {
            if target_pins
                .as_ref()
                .is_none_or(|(repo, _)| *repo != pin.repo)
            {
                target_pins = Some((pin.repo.clone(), meta.pins(Some(&pin.repo))?));
            }
            let (_, existing) = target_pins.as_ref().expect("just set");
            let known = existing.iter().any(|p| {
                p.name == pin.name
                    && p.created_at == pin.created_at
                    && p.store_paths == pin.store_paths
            });
            if known {
                tally.present += 1;
                continue;
            }
            let hashes: Vec<String> = pin
                .store_paths
                .iter()
                .filter_map(|p| crate::nix::StorePath::from_absolute(p).ok())
                .map(|p| p.hash_part().to_string())
                .collect();
            match meta.create_pin(&pin.repo, &pin.name, &hashes, pin.keep, pin.created_at)? {
                PinCreated::Created { .. } => tally.copied += 1,
                PinCreated::NotPublished(missing) => tally.fail(format!(
                    "pin {}/{} revision {}: not published in the target: {}",
                    pin.repo,
                    pin.name,
                    pin.revision,
                    missing.join(", ")
                )),
            }
            run.reporter.progress(self.name(), tally);
        }
        Ok(())
    }
}

pub struct Tokens;

impl Kind for Tokens {
    fn name(&self) -> &'static str {
        "tokens"
    }

    fn copy(&self, run: &Migration<'_>, tally: &mut Tally) -> Result<(), MigrateError> {
        let meta = &run.target.meta;
        for token in run.source.tokens()? {
            match meta.token(&token.id)? {
                None => {
                    // Revocation included: a revoked token never exists unrevoked in the target.
                    meta.create_token(&token)?;
                    tally.copied += 1;
                }
                Some(existing) if existing.secret_sha256 != token.secret_sha256 => {
                    return Err(MigrateError::Conflict(format!(
                        "a token with id {} but another secret; revoke or delete one of them",
                        token.id
                    )));
                }
                Some(existing) => {
                    // A revocation made in the source after an earlier run still applies.
                    match (token.revoked_at, existing.revoked_at) {
                        (Some(at), None) => {
                            meta.revoke_token(&token.id, at)?;
                            tally.copied += 1;
                        }
                        _ => tally.present += 1,
                    }
                }
            }
            run.reporter.progress(self.name(), tally);
        }
        Ok(())
    }
}

pub struct Nars;

impl Kind for Nars {
    fn name(&self) -> &'static str {
        "NARs"
    }

    fn copy(&self, run: &Migration<'_>, tally: &mut Tally) -> Result<(), MigrateError> {
        let mut after = None;
        loop {
            let page = run.source.nars_after(after.as_ref(), PAGE)?;
            let Some((repo, last)) = page.last() else {
                return Ok(());
            };
            after = Some((repo.clone(), last.url.clone()));
            for (repo, nar) in &page {
                copy_nar(run, repo, nar, tally)?;
                run.reporter.progress(self.name(), tally);
            }
        }
    }
}

/// Copies one NAR (object, then row) unless the target has its row. Returns whether the
/// target now has it; false when the source's file is missing or damaged (counted as failed).
fn copy_nar(
    run: &Migration<'_>,
    repo: &str,
    nar: &NarRecord,
    tally: &mut Tally,
) -> Result<bool, MigrateError> {
    let meta = &run.target.meta;
    if let Some(existing) = meta.nar_by_url(repo, &nar.url)? {
        if existing.file_hash != nar.file_hash {
            return Err(MigrateError::Conflict(format!(
                "NAR {repo}/{} with another FileHash ({} there, {} here)",
                nar.url, existing.file_hash, nar.file_hash
            )));
        }
        // A run killed between the row and clearing its intent left the intent behind.
        meta.clear_object_intent(&existing.object_key)?;
        tally.present += 1;
        return Ok(true);
    }
    let key = nar.object_key.as_str();
    let path = match run.source.object_path(key) {
        Ok(path) => path,
        Err(why) => {
            tally.fail(format!("NAR {repo}/{}: {why}", nar.url));
            return Ok(false);
        }
    };
    // Before any byte: the janitor then knows the key whatever happens next. A rerun refreshes
    // the intent, restarting the grace period, so an object found whole below is not swept
    // between this check and its row.
    meta.record_object_intent(key, now_unix())?;
    if run.target.size(key)? != Some(nar.file_size) {
        if let Err(why) = check_file(&path, nar) {
            meta.clear_object_intent(key)?;
            tally.fail(format!("NAR {repo}/{}: {why}", nar.url));
            return Ok(false);
        }
        run.target.put_checked(key, &path, nar.file_size)?;
        tally.bytes += nar.file_size;
    }
    meta.insert_nar(repo, nar)?;
    meta.clear_object_intent(key)?;
    tally.copied += 1;
    Ok(true)
}

/// The source file is what its row says (FileSize, FileHash): a damaged or truncated file is
/// never copied. One streamed read (the upload reads it again: local disk is the cheap side).
fn check_file(path: &std::path::Path, nar: &NarRecord) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => format!("{} is missing from the source", path.display()),
        _ => format!("{}: {err}", path.display()),
    })?;
    let mut hashing = HashingWriter::new(std::io::sink());
    std::io::copy(&mut file, &mut hashing).map_err(|err| format!("{}: {err}", path.display()))?;
    let (_, hash, size) = hashing.finish();
    let hash = hash.to_typed_nix32();
    if size != nar.file_size || hash != nar.file_hash {
        return Err(format!(
            "{} is {size} bytes with hash {hash}, its row says {} bytes with {}",
            path.display(),
            nar.file_size,
            nar.file_hash
        ));
    }
    Ok(())
}

pub struct Narinfos;

impl Kind for Narinfos {
    fn name(&self) -> &'static str {
        "narinfos"
    }

    fn copy(&self, run: &Migration<'_>, tally: &mut Tally) -> Result<(), MigrateError> {
        let meta = &run.target.meta;
        // Bytes of NARs a running source stored after the NAR pass, copied here before their
        // narinfos.
        let mut late_bytes = 0;
        for repo in run.source.repos()? {
            let repo = repo.name;
            let mut after = String::new();
            loop {
                let page = run.source.narinfos_after(&repo, &after, PAGE)?;
                let Some(last) = page.last() else { break };
                after = last.hash.clone();
                let queries: Vec<(String, String)> = page
                    .iter()
                    .map(|info| (info.hash.clone(), info.nar_hash.clone()))
                    .collect();
                let presence = meta.presence(&repo, &queries)?;
                let mut publish = Vec::new();
                for (info, presence) in page.into_iter().zip(presence) {
                    match presence {
                        Presence::Published => tally.present += 1,
                        Presence::NarStored => publish.push(info),
                        Presence::Missing => {
                            // The NAR pass counted this NAR's own failure already, if it had
                            // one: here it only explains the narinfo's.
                            let mut attempt = Tally::default();
                            let copied = match run.source.nar_by_hash(&repo, &info.nar_hash)? {
                                Some(nar) => copy_nar(run, &repo, &nar, &mut attempt)?,
                                None => false,
                            };
                            late_bytes += attempt.bytes;
                            if copied {
                                publish.push(info);
                            } else {
                                let why = attempt
                                    .failures
                                    .pop()
                                    .unwrap_or_else(|| "not in the source".into());
                                tally.fail(format!(
                                    "narinfo {repo}/{}.narinfo not published: its NAR {}: {why}",
                                    info.hash, info.nar_hash
                                ));
                            }
                        }
                    }
                }
                for newly in meta.publish(&repo, &publish)? {
                    if newly {
                        tally.copied += 1;
                    } else {
                        tally.present += 1;
                    }
                }
                run.reporter.progress(self.name(), tally);
            }
        }
        tally.bytes += late_bytes;
        Ok(())
    }
}

/// Objects without rows, found as files under `store/<repo>/<dir>/`: the same key in the
/// target. The janitor never sweeps these, so they need no intents; each is written whole or
/// not at all, so one found in the target is complete and left alone.
pub struct Objects {
    name: &'static str,
    dir: &'static str,
}

impl Objects {
    /// `<repo>/listing/<nix32 NarHash>.ls` (`upload::listing_key`).
    pub const LISTINGS: Objects = Objects {
        name: "listings",
        dir: "listing",
    };
    /// `<repo>/log/<encoding>/<drv>` (`routes_files::log_key`).
    pub const LOGS: Objects = Objects {
        name: "build logs",
        dir: "log",
    };
    /// `<repo>/debuginfo/<build id>`.
    pub const DEBUGINFO: Objects = Objects {
        name: "debuginfo links",
        dir: "debuginfo",
    };
}

impl Kind for Objects {
    fn name(&self) -> &'static str {
        self.name
    }

    fn copy(&self, run: &Migration<'_>, tally: &mut Tally) -> Result<(), MigrateError> {
        for repo in run.source.repos()? {
            for (key, path, size) in run.source.object_files(&repo.name, self.dir)? {
                if run.target.size(&key)?.is_some() {
                    tally.present += 1;
                } else {
                    run.target.put_checked(&key, &path, size)?;
                    tally.copied += 1;
                    tally.bytes += size;
                }
                run.reporter.progress(self.name(), tally);
            }
        }
        Ok(())
    }
}
