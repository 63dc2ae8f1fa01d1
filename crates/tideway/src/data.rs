//! The data directory and what every command needs from it: opening the SQLite store, the
//! wall clock (core takes time as a parameter) and minting REST API keys.
//!
//! The server and the admin CLI open the same file; SQLite in WAL mode with a busy timeout lets
//! a `tideway keys create` run beside a live `tideway serve`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tideway_core::clock::Millis;
use tideway_core::ids::WorkspaceId;
use tideway_core::keys::{ApiKey, IpAllowlist, PermissionSet, Secret};
use tideway_core::store::NewApiKey;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use crate::config::database_path;

/// Now, from the system clock.
pub fn now() -> Millis {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Millis(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

/// Whether the data directory already holds a database.
pub fn exists(data_dir: &Path) -> bool {
    database_path(data_dir).is_file()
}

/// Opens (creating if needed) `<data_dir>/tideway.sqlite`, creating the directory too (mode
/// 0700: it holds user data and key hashes).
pub fn open(data_dir: &Path, options: SqliteOptions) -> anyhow::Result<SqliteStore> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create the data directory {} (check its parent's permissions or pass --data-dir)", data_dir.display()))?;
    let path = database_path(data_dir);
    SqliteStore::open(&path, options)
        .with_context(|| format!("cannot open the database {}", path.display()))
}

/// Takes `<data-dir>/serve.lock` for as long as the returned file lives: one `tideway serve`
/// per data directory, since the server's writer holds recent profiles in memory as the truth
/// (the admin CLI needs no lock: it only writes keys and workspaces, and replays the profile
/// log, which is harmless). The OS drops the lock when the process ends, however it ends.
pub fn lock_for_serving(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create the data directory {} (check its parent's permissions or pass --data-dir)", data_dir.display()))?;
    let path = data_dir.join("serve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `tideway serve` is running on {}; stop it first, or pass another --data-dir",
            data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Opens the database of an existing data directory; a missing one is an error that says how
/// to make one (admin commands must not scatter empty databases around on a typo).
pub fn open_existing(data_dir: &Path, options: SqliteOptions) -> anyhow::Result<SqliteStore> {
    if !exists(data_dir) {
        anyhow::bail!(
            "no Tideway database at {db}; start the server once with `tideway serve --data-dir {dir}` \
             (or create a workspace with `tideway workspaces create NAME --data-dir {dir}`), or pass the \
             right --data-dir",
            db = database_path(data_dir).display(),
            dir = data_dir.display(),
        );
    }
    open(data_dir, options)
}

/// A fresh REST key: the secret (a hyphenated UUID v4, the shape of Braze's keys) and what the
/// store keeps of it (its hash and visible prefix, never the secret).
pub fn mint_key(
    workspace: WorkspaceId,
    name: &str,
    permissions: PermissionSet,
    allow: IpAllowlist,
    now: Millis,
) -> (Secret, NewApiKey) {
    let secret = Secret::new(uuid::Uuid::new_v4().hyphenated().to_string());
    let key = NewApiKey {
        workspace,
        name: name.to_owned(),
        prefix: secret.expose()[..ApiKey::PREFIX_LEN].to_owned(),
        hash: secret.hash(),
        permissions,
        allow,
        created_at: now,
    };
    (secret, key)
}

/// Writes a secret to a file only its owner can read (mode 0600), replacing any old one.
pub fn write_secret_file(path: &Path, secret: &Secret) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // `mode` applies only to a new file; an existing one keeps its bits unless we set them.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict the permissions of {}", path.display()))?;
    writeln!(file, "{}", secret.expose())
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_look_like_braze_keys_and_keep_only_a_hash() {
        let (secret, key) = mint_key(
            WorkspaceId(1),
            "k",
            PermissionSet::all(),
            IpAllowlist::default(),
            Millis(0),
        );
        let s = secret.expose();
        assert_eq!(s.len(), 36);
        assert!(uuid::Uuid::parse_str(s).is_ok());
        assert_eq!(key.prefix, &s[..8]);
        assert!(key.hash.matches(&Secret::new(s.to_owned()).hash()));
    }

    #[test]
    fn secret_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret_file(&path, &Secret::new("abc".into())).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abc\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
