//! Test support (feature `testing`, for the test suites of this and the other crates; never in
//! a release build): a PostgreSQL database of one test's own ([`TestDb`]), and the store a test
//! suite runs against ([`TestStore`]), chosen by `TIDEWAY_TEST_BACKEND`.
//!
//! A [`TestDb`] lives on the server named by `TIDEWAY_TEST_DATABASE_URL` (`scripts/test` starts
//! one), or else on a private cluster this process starts in a temp dir if the PostgreSQL
//! binaries are installed — a PostgreSQL test never passes by not running. Panics are the
//! point here: a fixture that cannot be set up fails the test that asked for it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tideway_core::store::Store;
use tokio_postgres::{Client, NoTls};

use crate::postgres::{PgPool, PgStore, connect};
use crate::sqlite::{SqliteOptions, SqliteStore};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

// --- a server and a fresh database per test -----------------------------------------------------

/// A PostgreSQL cluster of this test's own, in a temp dir, stopped on drop.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    as_postgres: bool,
    url: String,
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        let initdb = Path::new(PG_BIN).join("initdb");
        assert!(
            initdb.exists(),
            "TIDEWAY_TEST_DATABASE_URL is not set and {} is missing: run scripts/test (it starts \
             a throwaway PostgreSQL), or install postgresql-15, or point \
             TIDEWAY_TEST_DATABASE_URL at a server where the user may create databases",
            initdb.display()
        );
        let root = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout)
            .unwrap()
            .trim()
            == "0";
        let dir = tempfile::tempdir().unwrap();
        if root {
            // initdb refuses to run as root; the cluster belongs to the `postgres` user.
            run(Command::new("chown").arg("postgres").arg(dir.path()));
        }
        let data = dir.path().join("data");
        let mut cluster = PrivateCluster {
            dir,
            as_postgres: root,
            url: String::new(),
        };
        run(cluster.pg(&initdb).arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]));
        // PostgreSQL cannot listen on port 0: take a free port and retry if another process
        // takes it between our probe and the server's bind.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                cluster.dir.path().display()
            );
            let started = cluster
                .pg(&Path::new(PG_BIN).join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(cluster.dir.path().join("log"))
                .args(["-w", "-o", &options, "start"])
                .output()
                .unwrap();
            if started.status.success() {
                cluster.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                return cluster;
            }
        }
        panic!(
            "PostgreSQL did not start; see {}",
            cluster.dir.path().join("log").display()
        );
    }

    /// `program`, run as the cluster's owner.
    fn pg(&self, program: &Path) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self
            .pg(&Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A database of one test's own, dropped (with any connection still open) on drop.
pub struct TestDb {
    server_url: String,
    name: String,
    pub url: String,
    // Declared last: the database is dropped before its private cluster stops.
    _cluster: Option<PrivateCluster>,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let (server_url, cluster) = match std::env::var("TIDEWAY_TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => (url, None),
            _ => {
                let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
                    .await
                    .unwrap();
                (cluster.url.clone(), Some(cluster))
            }
        };
        let name = format!("tideway_test_{}", uuid::Uuid::new_v4().simple());
        let admin = admin(&server_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let (base, _) = server_url
            .rsplit_once('/')
            .expect("TIDEWAY_TEST_DATABASE_URL ends in /DATABASE");
        TestDb {
            url: format!("{base}/{name}"),
            server_url,
            name,
            _cluster: cluster,
        }
    }

    pub async fn pool(&self) -> PgPool {
        connect(&self.url).await.unwrap()
    }

    /// The database's name (for `ALTER DATABASE`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A plain connection outside any pool, for holding locks and reading the catalog.
    pub async fn client(&self) -> Client {
        admin(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on: drop the database
        // from a thread with a runtime of its own.
        let (url, name) = (self.server_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    admin(&url)
                        .await
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) && !std::thread::panicking() {
            panic!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

pub async fn admin(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

impl TestDb {
    /// A migrated [`PgStore`] on this database.
    pub async fn store(&self) -> PgStore {
        PgStore::open(&self.url)
            .await
            .expect("open the PostgreSQL store")
    }
}

/// Which backend `TIDEWAY_TEST_BACKEND` asks the integration tests to run on: `sqlite` (the
/// default) or `postgres`. `scripts/test` runs the server's suite once with each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn from_env() -> Backend {
        match std::env::var("TIDEWAY_TEST_BACKEND").as_deref() {
            Ok("postgres") => Backend::Postgres,
            Ok("sqlite") | Ok("") | Err(_) => Backend::Sqlite,
            Ok(other) => panic!("TIDEWAY_TEST_BACKEND={other}: use sqlite or postgres"),
        }
    }
}

/// A store of one test's own on the chosen backend, with what keeps it alive (a temp dir or a
/// database dropped at the end).
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub backend: Backend,
    _keep: Keep,
}

/// Held only to be dropped with the store: the directory is removed, the database dropped.
enum Keep {
    Dir { _dir: tempfile::TempDir },
    Db(TestDb),
}

impl TestStore {
    /// A fresh store on the backend `TIDEWAY_TEST_BACKEND` names.
    pub async fn from_env() -> TestStore {
        TestStore::on(Backend::from_env()).await
    }

    /// A fresh store on `backend`.
    pub async fn on(backend: Backend) -> TestStore {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store =
                    SqliteStore::open(&dir.path().join("tideway.sqlite"), SqliteOptions::default())
                        .expect("open the SQLite store");
                TestStore {
                    store: Arc::new(store),
                    backend,
                    _keep: Keep::Dir { _dir: dir },
                }
            }
            Backend::Postgres => {
                let db = TestDb::create().await;
                let store = db.store().await;
                TestStore {
                    store: Arc::new(store),
                    backend,
                    _keep: Keep::Db(db),
                }
            }
        }
    }

    /// The PostgreSQL database under the store, if that is the backend.
    pub fn database(&self) -> Option<&TestDb> {
        match &self._keep {
            Keep::Db(db) => Some(db),
            Keep::Dir { .. } => None,
        }
    }
}
