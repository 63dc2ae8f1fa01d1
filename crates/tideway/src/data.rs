//! The data directory and what every command needs from it: opening the SQLite store, the
//! wall clock (core takes time as a parameter) and minting REST API keys.
//!
//! The server and the admin CLI open the same file; SQLite in WAL mode with a busy timeout lets
//! a `tideway keys create` run beside a live `tideway serve`.
//!
//! The data directory holds user profiles, key hashes, Currents bearer tokens, the Heap webhook
//! secret and partner API keys: it is created 0700 and every file in it is 0600 (the store
//! creates and tightens its own files; this module does the rest).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tideway_core::clock::Millis;
use tideway_core::ids::WorkspaceId;
use tideway_core::keys::{ApiKey, IpAllowlist, PermissionSet, Secret};
use tideway_core::store::{NewApiKey, Store};
use tideway_store::postgres::{ConnectError, PgStore};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use crate::config::{Database, Resolved, database_path, redact_url};

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

/// Creates the data directory if needed, mode 0700: it holds user data, keys and secrets.
fn create_dir(data_dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create the data directory {} (check its parent's permissions or pass --data-dir)", data_dir.display()))
}

/// The permission bits of `data_dir` if users other than its owner may enter or list it (a
/// directory made before Tideway created it 0700, or by hand).
fn open_to_others(data_dir: &Path) -> anyhow::Result<Option<u32>> {
    let mode = std::fs::metadata(data_dir)
        .with_context(|| format!("cannot inspect the data directory {}", data_dir.display()))?
        .permissions()
        .mode()
        & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Opens (creating if needed) `<data_dir>/tideway.sqlite`, creating the directory too (mode
/// 0700). The store makes its files 0600, tightening any left looser.
pub fn open(data_dir: &Path, options: SqliteOptions) -> anyhow::Result<SqliteStore> {
    create_dir(data_dir)?;
    let path = database_path(data_dir);
    SqliteStore::open(&path, options)
        .with_context(|| format!("cannot open the database {}", path.display()))
}

/// Opens the database the settings name as the whole store contract: the data directory's
/// SQLite file (created with its directory when `create`, else it must exist), or the
/// PostgreSQL database of `--database-url` (migrated on open, several nodes may do so at once;
/// when not `create`, it must have Tideway's tables already).
pub async fn open_store(settings: &Resolved, create: bool) -> anyhow::Result<Arc<dyn Store>> {
    match &settings.database {
        Database::Sqlite => {
            let store = if create {
                open(&settings.data_dir, settings.sqlite_options())?
            } else {
                open_existing(&settings.data_dir, settings.sqlite_options())?
            };
            Ok(Arc::new(store))
        }
        Database::Postgres(url) => {
            let opened = if create {
                PgStore::open_with(url, settings.pg_options()).await
            } else {
                PgStore::open_existing(url, settings.pg_options()).await
            };
            if let Err(ConnectError::NoSchema) = opened {
                anyhow::bail!(
                    "no Tideway database at {db}: it has no Tideway tables; start a node once with \
                     `tideway serve --database-url {db}` (or create a workspace with `tideway \
                     workspaces create NAME --database-url {db}`), or pass the right --database-url",
                    db = redact_url(url)
                );
            }
            let store = opened.with_context(|| {
                format!(
                    "cannot use the PostgreSQL database {}; check that the server is running \
                         and that the user may create tables there, or fix --database-url",
                    redact_url(url)
                )
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// Takes `<data-dir>/serve.lock` for as long as the returned file lives: one `tideway serve`
/// per data directory, since the server's writer holds recent profiles in memory as the truth
/// (the admin CLI needs no lock: it only writes keys and workspaces, and replays the profile
/// log, which is harmless). The OS drops the lock when the process ends, however it ends.
///
/// Serving is also when a data directory that other users can enter is reported (a warning
/// that says how to fix it): the directory is the owner's choice, so it is not changed here.
pub fn lock_for_serving(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    create_dir(data_dir)?;
    if let Some(mode) = open_to_others(data_dir)? {
        tracing::warn!(
            data_dir = %data_dir.display(),
            mode = format!("{mode:o}"),
            "the data directory can be entered by other users, and it holds user data, keys and secrets; run `chmod 700 {}`",
            data_dir.display()
        );
    }
    let path = data_dir.join("serve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // `mode` applies only to a new file; one an older version made keeps its bits unless set.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict the permissions of {}", path.display()))?;
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
             right --data-dir (a node on PostgreSQL is named by --database-url, not its data directory)",
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

    use std::sync::{Arc, Mutex};

    /// A log writer into memory.
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_file_in_the_data_directory_is_private() {
        use tideway_core::store::prelude::*;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let _lock = lock_for_serving(&dir).unwrap();
        let store = open(&dir, SqliteOptions::default()).unwrap();
        let workspace = store.create_workspace("w", now()).await.unwrap();
        let (secret, key) = mint_key(
            workspace.id,
            "k",
            PermissionSet::all(),
            IpAllowlist::default(),
            now(),
        );
        store.create_api_key(key).await.unwrap();
        write_secret_file(&crate::config::initial_key_path(&dir), &secret).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            assert_eq!(mode(&entry.path()), 0o600, "{name}");
            names.push(name);
        }
        names.sort();
        assert_eq!(
            names,
            [
                "initial-admin-key",
                "serve.lock",
                "tideway.sqlite",
                "tideway.sqlite-shm",
                "tideway.sqlite-wal"
            ]
        );
    }

    #[test]
    fn a_lock_file_left_readable_is_tightened_and_an_open_directory_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let lock = dir.path().join("serve.lock");
        std::fs::write(&lock, "").unwrap();
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(open_to_others(dir.path()).unwrap(), Some(0o755));
        // What `serve` logs, captured.
        let logged = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&logged);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&sink)))
            .finish();
        let held = tracing::subscriber::with_default(subscriber, || lock_for_serving(dir.path()));
        let _held = held.unwrap();
        let logged = String::from_utf8(logged.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("WARN"), "{logged}");
        assert!(
            logged.contains(&format!("chmod 700 {}", dir.path().display())),
            "{logged}"
        );
        assert_eq!(mode(&lock), 0o600);
        // The directory is reported, not changed: it is its owner's to set.
        assert_eq!(mode(dir.path()), 0o755);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(open_to_others(dir.path()).unwrap(), None);
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
