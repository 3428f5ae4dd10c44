//! The embedded default storage: files under `<data dir>/store`, named by their keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{is_safe_key, Listed, ObjectReader, Storage};
use crate::server::staging::{ChunkStaging, LocalStaging};

pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(LocalStorage { root })
    }

    fn path_of(&self, key: &str) -> std::io::Result<PathBuf> {
        if !is_safe_key(key) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unsafe storage key {key:?}"),
            ));
        }
        Ok(self.root.join(key))
    }
}

impl LocalStorage {
    /// Writes the object under `key` through `fill` into a temporary file beside it, synced
    /// and renamed, so the name appears only for whole bytes.
    async fn write_beside(
        &self,
        key: &str,
        fill: impl FnOnce(&mut tempfile::NamedTempFile) -> std::io::Result<()> + Send + 'static,
    ) -> std::io::Result<()> {
        let target = self.path_of(key)?;
        tokio::task::spawn_blocking(move || {
            let dir = target.parent().expect("keys have a directory part");
            std::fs::create_dir_all(dir)?;
            let mut staged = tempfile::NamedTempFile::new_in(dir)?;
            fill(&mut staged)?;
            staged.as_file().sync_all()?;
            staged.persist(&target).map_err(|err| err.error)?;
            std::fs::File::open(dir)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

#[async_trait]
impl Storage for LocalStorage {
    async fn put_file(&self, key: &str, staged: &Path) -> std::io::Result<()> {
        let target = self.path_of(key)?;
        let staged = staged.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let dir = target.parent().expect("keys have a directory part");
            std::fs::create_dir_all(dir)?;
            // Data reaches the disk before the name does, so a crash after the rename cannot
            // expose a file whose blocks were never written.
            std::fs::File::open(&staged)?.sync_all()?;
            std::fs::rename(&staged, &target)?;
            std::fs::File::open(dir)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    async fn delete(&self, key: &str) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path_of(key)?).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    async fn put_bytes(&self, key: &str, bytes: bytes::Bytes) -> std::io::Result<()> {
        self.write_beside(key, move |staged| std::io::Write::write_all(staged, &bytes))
            .await
    }

    async fn put_many(&self, objects: Vec<(String, bytes::Bytes)>) -> Vec<std::io::Result<()>> {
        let objects: Vec<_> = objects
            .into_iter()
            .map(|(key, bytes)| (self.path_of(&key), bytes))
            .collect();
        let root = self.root.clone();
        let count = objects.len();
        tokio::task::spawn_blocking(move || write_many(&root, objects))
            .await
            .unwrap_or_else(|err| {
                let err = std::io::Error::other(err);
                (0..count).map(|_| Err(copy_of(&err))).collect()
            })
    }

    async fn put_copy(&self, key: &str, source: &Path) -> std::io::Result<()> {
        let source = source.to_path_buf();
        self.write_beside(key, move |staged| {
            std::io::copy(&mut std::fs::File::open(&source)?, staged).map(drop)
        })
        .await
    }

    async fn size(&self, key: &str) -> std::io::Result<Option<u64>> {
        match tokio::fs::metadata(self.path_of(key)?).await {
            Ok(meta) => Ok(Some(meta.len())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn get(&self, key: &str) -> std::io::Result<Option<(u64, ObjectReader)>> {
        let path = self.path_of(key)?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => {
                let len = file.metadata().await?.len();
                Ok(Some((len, Box::pin(file))))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn list(&self, _prefix: &str) -> std::io::Result<Option<Vec<Listed>>> {
        Ok(None)
    }

    async fn presign_get(&self, _key: &str, _expires: Duration) -> std::io::Result<Option<String>> {
        Ok(None)
    }

    async fn health(&self) -> std::io::Result<()> {
        tokio::fs::metadata(&self.root).await.map(|_| ())
    }

    fn chunk_staging(&self) -> Arc<dyn ChunkStaging> {
        Arc::new(LocalStaging)
    }
}

/// Writes each object beside its target, then makes the whole batch durable with one flush of
/// the filesystem (`syncfs`) instead of one `fsync` per file, renames each into place, and
/// syncs each directory touched once: the data reaches the disk before any name does, as with
/// `put_bytes`, for a fraction of the flushes.
fn write_many(
    root: &Path,
    objects: Vec<(std::io::Result<PathBuf>, bytes::Bytes)>,
) -> Vec<std::io::Result<()>> {
    use std::collections::BTreeSet;
    use std::io::Write;
    let staged: Vec<std::io::Result<(PathBuf, tempfile::NamedTempFile)>> = objects
        .into_iter()
        .map(|(target, bytes)| {
            let target = target?;
            let dir = target.parent().expect("keys have a directory part");
            std::fs::create_dir_all(dir)?;
            let mut file = tempfile::NamedTempFile::new_in(dir)?;
            file.write_all(&bytes)?;
            Ok((target, file))
        })
        .collect();
    if let Err(err) = sync_filesystem(root) {
        return staged.into_iter().map(|_| Err(copy_of(&err))).collect();
    }
    let renamed: Vec<std::io::Result<PathBuf>> = staged
        .into_iter()
        .map(|entry| {
            let (target, file) = entry?;
            file.persist(&target).map_err(|err| err.error)?;
            Ok(target
                .parent()
                .expect("keys have a directory part")
                .to_path_buf())
        })
        .collect();
    let dirs: BTreeSet<&PathBuf> = renamed.iter().flatten().collect();
    // A rename that may not survive a crash is not stored.
    let dir_failures: Vec<(&PathBuf, std::io::Error)> = dirs
        .into_iter()
        .filter_map(|dir| {
            let synced = std::fs::File::open(dir).and_then(|d| d.sync_all());
            synced.err().map(|err| (dir, err))
        })
        .collect();
    renamed
        .iter()
        .map(|result| match result {
            Err(err) => Err(copy_of(err)),
            Ok(dir) => match dir_failures.iter().find(|(failed, _)| *failed == dir) {
                Some((_, err)) => Err(std::io::Error::new(
                    err.kind(),
                    format!("syncing {}: {err}", dir.display()),
                )),
                None => Ok(()),
            },
        })
        .collect()
}

/// One error answers several objects: `io::Error` is not `Clone`.
fn copy_of(err: &std::io::Error) -> std::io::Error {
    std::io::Error::new(err.kind(), err.to_string())
}

/// Flushes every dirty page of the filesystem holding `path` to its disk, and reports the
/// filesystem's write-back errors since the last flush (Linux 5.8+).
fn sync_filesystem(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(path)?;
    // SAFETY: `dir` is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_root() {
        assert!(is_safe_key("cache/nar/0abc.nar.xz"));
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "a//b",
            "a/./b",
            "a/b c",
            "a\\b",
            "a/%2e%2e",
        ] {
            assert!(!is_safe_key(bad), "{bad:?} must be refused");
        }
    }

    #[tokio::test]
    async fn put_is_visible_whole_and_get_of_absent_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().join("store")).unwrap();
        assert!(storage.get("r/nar/x.nar").await.unwrap().is_none());
        let staged = dir.path().join("staged");
        std::fs::write(&staged, b"hello").unwrap();
        storage.put_file("r/nar/x.nar", &staged).await.unwrap();
        assert!(!staged.exists());
        let (len, mut reader) = storage.get("r/nar/x.nar").await.unwrap().unwrap();
        assert_eq!(len, 5);
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut body)
            .await
            .unwrap();
        assert_eq!(body, b"hello");
        assert!(storage.get("r/nar/x.nar").await.unwrap().is_some());
    }
}
