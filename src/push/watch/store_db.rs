//! The local Nix database's `ValidPaths` table, read-only: the watchers' source of truth for
//! "which store paths became valid, in which order".
//!
//! ```text
//!   /nix/var/nix/db/db.sqlite (read-only, busy timeout)
//!      SELECT id, path FROM ValidPaths WHERE id > high-water ORDER BY id LIMIT n
//!      └─► (id, StorePath) rows; the caller keeps the largest id as its new high-water mark
//! ```
//! `id` is an `AUTOINCREMENT` key and SQLite has one writer at a time, so rows commit in id
//! order and an id is never reused: everything with an id above the mark is new, whatever
//! wrote it (a build, a substitution, `nix-store --add`, `--import`, `nix copy --to` the local
//! store). A path that was collected and comes back gets a new id, so it is seen again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::nix::StorePath;

/// How long a query waits for Nix's write lock: Nix holds it for the length of one
/// registration transaction, milliseconds, but a `nix-collect-garbage` can hold it longer.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where Nix keeps its database: `$NIX_STATE_DIR/db/db.sqlite`, `/nix/var/nix` by default
/// (the variable Nix itself honours).
pub fn default_path() -> PathBuf {
    let state = std::env::var_os("NIX_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/nix/var/nix"));
    state.join("db").join("db.sqlite")
}

pub struct StoreDb {
    connection: Connection,
    path: PathBuf,
}

/// One row of `ValidPaths`; `path` is `None` for a path outside `/nix/store` (a store with
/// another prefix), which this client cannot push: the row still moves the mark.
pub struct ValidPath {
    pub id: i64,
    pub path: Option<StorePath>,
}

impl StoreDb {
    /// Opens the database read-only; the error names the file and what to do.
    pub fn open(path: &Path) -> Result<Self, String> {
        let describe = |err: rusqlite::Error| {
            format!(
                "cannot read the Nix database {}: {err}\nhint: run as a user that can read {} (on a multi-user install: root, or the nix-daemon's user), or set NIX_STATE_DIR",
                path.display(),
                path.parent().unwrap_or(path).display()
            )
        };
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(describe)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(describe)?;
        let db = Self {
            connection,
            path: path.to_path_buf(),
        };
        // Fail now, not on the first poll, when the file is not a Nix database.
        db.high_water().map_err(|err| {
            format!(
                "{} is not a readable Nix database: {err}\nhint: point NIX_STATE_DIR at the Nix state directory",
                path.display()
            )
        })?;
        Ok(db)
    }

    /// The largest id so far (0 for an empty store).
    pub fn high_water(&self) -> Result<i64, String> {
        self.connection
            .query_row("SELECT COALESCE(MAX(id), 0) FROM ValidPaths", [], |row| {
                row.get(0)
            })
            .map_err(|err| self.describe(err))
    }

    /// Up to `limit` rows with an id above `after`, in id order.
    pub fn since(&self, after: i64, limit: usize) -> Result<Vec<ValidPath>, String> {
        let mut statement = self
            .connection
            .prepare_cached("SELECT id, path FROM ValidPaths WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(|err| self.describe(err))?;
        let rows = statement
            .query_map(rusqlite::params![after, limit as i64], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(|err| self.describe(err))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, text) = row.map_err(|err| self.describe(err))?;
            out.push(ValidPath {
                id,
                path: StorePath::from_absolute(&text).ok(),
            });
        }
        Ok(out)
    }

    fn describe(&self, err: rusqlite::Error) -> String {
        format!("reading the Nix database {}: {err}", self.path.display())
    }
}
