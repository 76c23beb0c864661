//! A private PostgreSQL for one test: `initdb` into a temp dir (trust auth, superuser
//! `edge`), `pg_ctl start` on a free loopback port with its socket in the same dir, a
//! fresh database, and `pg_ctl stop -m immediate` plus removal on drop.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then the server runs as the
//! `postgres` user (created by the Debian package) through `runuser`, and the temp dir
//! is handed to it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{free_port, wait_until};

/// The `#[ignore]` reason of tests that need this harness.
pub const NEEDS_POSTGRES: &str = "needs PostgreSQL (initdb, pg_ctl); tests/run-all installs it";

/// Database the tests' gateways write to.
pub const DATABASE: &str = "edge";
/// Superuser made by `initdb`.
pub const USER: &str = "edge";

/// A running private PostgreSQL server.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres_user: bool,
}

/// Where `initdb`, `pg_ctl` and `postgres` are: `PATH`, else the newest Debian
/// `/usr/lib/postgresql/<version>/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    });
    if on_path.is_some() {
        return on_path;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Postgres {
    /// Starts a server on a free port and creates [`DATABASE`]. Panics, saying what is
    /// missing, when PostgreSQL is not installed or does not start.
    pub fn start() -> Postgres {
        Self::start_on(free_port())
    }

    /// [`Postgres::start`] on `port` (for tests that point a gateway at it first).
    pub fn start_on(port: u16) -> Postgres {
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries (initdb, pg_ctl) not found in PATH or \
                 /usr/lib/postgresql/*/bin: install the `postgresql` package (tests/run-all \
                 does it when run as root)"
            )
        });
        let as_postgres_user = is_root();
        let dir = tempfile::Builder::new()
            .prefix("edge-pg")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        if as_postgres_user {
            let out = Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(dir.path())
                .output()
                .expect("run chown");
            check(
                &out,
                "chown the PostgreSQL temp dir to user `postgres` (does the user exist?)",
            );
        }
        let pg = Postgres {
            dir,
            bin,
            port,
            as_postgres_user,
        };
        let data = pg.data_dir();
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        check(&out, "initdb");
        // fsync off: the server is never crashed by these tests, and it makes them fast.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=100",
            pg.port,
            pg.dir.path().display()
        );
        let out = pg
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(pg.log_path())
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .output()
            .expect("run pg_ctl start");
        if !out.status.success() {
            panic!(
                "pg_ctl start failed: {}{}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                pg.log()
            );
        }
        let port = pg.port;
        let mut last_error = String::new();
        let up = wait_until(Duration::from_secs(30), || match postgres::Client::connect(
            &pg.connection_for("postgres"),
            postgres::NoTls,
        ) {
            Ok(mut c) => match c.batch_execute(&format!("CREATE DATABASE {DATABASE}")) {
                Ok(()) => true,
                Err(e) => {
                    last_error = e.to_string();
                    false
                }
            },
            Err(e) => {
                last_error = e.to_string();
                false
            }
        });
        assert!(
            up,
            "PostgreSQL on port {port} did not accept connections: {last_error}\nserver log:\n{}",
            pg.log()
        );
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A PostgreSQL tool run as the user the server runs as, from the temp dir (a
    /// working directory that user can read).
    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut c = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.current_dir(self.dir.path()).env("LC_ALL", "C");
        c
    }

    /// libpq-style connection string for `database` over TCP.
    pub fn connection_for(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname={database} connect_timeout=5",
            self.port
        )
    }

    /// Connection string of [`DATABASE`], as a gateway's `connection` key takes it.
    pub fn connection(&self) -> String {
        self.connection_for(DATABASE)
    }

    /// A client of [`DATABASE`] for assertions.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.connection(), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to the test PostgreSQL: {e}"))
    }

    /// The first column of the first row of `sql` as an i64 (`count(*)` and the like);
    /// `None` when the query fails (e.g. the table does not exist yet).
    pub fn scalar(&self, sql: &str) -> Option<i64> {
        let mut c = postgres::Client::connect(&self.connection(), postgres::NoTls).ok()?;
        let row = c.query_one(sql, &[]).ok()?;
        row.try_get::<_, i64>(0).ok()
    }
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        if Path::new(&data).join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
