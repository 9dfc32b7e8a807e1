//! `TestApp`: an isolated working directory (config, SQLite file or a fresh
//! PostgreSQL database, copies of the shipped rules and templates) wired to a
//! real in-process SMTP server, plus typed helpers to run the real `engaged`
//! binary against it. `PgDb`: a fresh PostgreSQL database per test.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use engaged::store::Store;
use tempfile::TempDir;

use crate::smtp_server::SmtpServer;

pub const NOW: &str = "2026-06-15T02:00:00Z";
pub const DEFAULT_OWNER: &str = "success@acme.test";
pub const WRITE_KEY: &str = "test-write-key";
pub const ADMIN_TOKEN: &str = "test-admin-token";

pub struct TestApp {
    pub dir: TempDir,
    pub smtp: SmtpServer,
    /// The app's PostgreSQL database, if it uses one instead of SQLite.
    pub pg: Option<PgDb>,
}

/// Output of one `engaged` invocation.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Copies the files of `from` and of its direct subdirectories (such as
/// `rules/tests/`); deeper levels are not copied.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        let target = to.join(entry.file_name());
        if kind.is_file() {
            std::fs::copy(entry.path(), target).unwrap();
        } else if kind.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            for sub in std::fs::read_dir(entry.path()).unwrap() {
                let sub = sub.unwrap();
                if sub.file_type().unwrap().is_file() {
                    std::fs::copy(sub.path(), target.join(sub.file_name())).unwrap();
                }
            }
        }
    }
}

impl TestApp {
    /// A fresh app with the shipped rules and templates and SMTP delivery to
    /// an in-process server.
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        copy_dir(&repo.join("rules"), &dir.path().join("rules"));
        copy_dir(&repo.join("templates"), &dir.path().join("templates"));
        let app = Self {
            dir,
            smtp: SmtpServer::start().await,
            pg: None,
        };
        app.write_config("");
        app
    }

    /// Like [`TestApp::new`], on a fresh PostgreSQL database of its own
    /// (dropped with the app). Panics when PostgreSQL is not reachable.
    pub async fn with_postgres() -> Self {
        let mut app = Self::new().await;
        app.pg = Some(PgDb::create().await);
        app.write_config("");
        app
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn db_url(&self) -> String {
        match &self.pg {
            Some(pg) => pg.url.clone(),
            None => format!("sqlite://{}", self.path("engaged.db").display()),
        }
    }

    /// Writes `engaged.toml`: SMTP to the test server, fast retries, with
    /// `extra` (TOML) merged in: its tables extend or override the base ones.
    pub fn write_config(&self, extra: &str) {
        let config = format!(
            r#"[database]
url = "{db}"

[rules]
dir = "{rules}"

[templates]
dir = "{templates}"

[mail]
from = "Acme <hello@acme.test>"
smtp_url = "{smtp}"

[delivery]
retry_base_ms = 100
retry_max_ms = 400
run_retry_window_ms = 5000
timeout_ms = 2000
lease_ms = 6000
max_attempts = 5

[escalation]
default_owner = "{owner}"

[http]
public_url = "https://engage.acme.test"
signing_secret = "test-secret"
write_key = "{write_key}"
admin_token = "{admin_token}"
"#,
            db = self.db_url(),
            rules = self.path("rules").display(),
            templates = self.path("templates").display(),
            smtp = self.smtp.url(),
            owner = DEFAULT_OWNER,
            write_key = WRITE_KEY,
            admin_token = ADMIN_TOKEN,
        );
        let mut config: toml::Table = config.parse().unwrap();
        let extra: toml::Table = extra.parse().expect("extra config is TOML");
        merge(&mut config, extra);
        std::fs::write(self.path("engaged.toml"), config.to_string()).unwrap();
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_engaged"));
        cmd.current_dir(self.dir.path())
            .arg("--config")
            .arg(self.path("engaged.toml"))
            .args(args)
            .env_remove("ENGAGED_LOG")
            .kill_on_drop(true);
        cmd
    }

    /// Runs `engaged ARGS…` to completion (at most 60 s).
    pub async fn engaged(&self, args: &[&str]) -> Run {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(args).output())
            .await
            .expect("engaged finished within 60 s")
            .expect("engaged started");
        Run::from(out)
    }

    /// `engaged run --now NOW --json`, asserting success.
    pub async fn run_at(&self, now: &str) -> serde_json::Value {
        let r = self.engaged(&["run", "--now", now, "--json"]).await;
        assert_eq!(r.code, 0, "run failed:\n{}\n{}", r.stdout, r.stderr);
        r.json()
    }

    /// Starts `engaged serve` (listening on `port`, as the config says) and
    /// waits until `/healthz` answers.
    pub async fn serve(
        &self,
        port: u16,
        cmd: &mut tokio::process::Command,
    ) -> tokio::process::Child {
        let child = cmd.spawn().expect("engaged serve started");
        let client = reqwest::Client::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_err()
        {
            assert!(std::time::Instant::now() < deadline, "serve did not start");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        child
    }

    /// The config as the daemon would load it.
    pub fn config(&self) -> engaged::config::Config {
        engaged::config::Config::load(&self.path("engaged.toml"), true).unwrap()
    }

    /// Opens the same database through the library, for assertions.
    pub async fn store(&self) -> Arc<dyn Store> {
        engaged::store::open(&self.db_url()).await.unwrap()
    }

    pub async fn import_customers(&self, csv: &str) -> Run {
        let p = self.write("customers.csv", csv);
        self.engaged(&["import", "customers", p.to_str().unwrap()])
            .await
    }

    pub async fn import_events(&self, jsonl: &str) -> Run {
        let p = self.write("events.jsonl", jsonl);
        self.engaged(&["import", "events", p.to_str().unwrap()])
            .await
    }
}

/// A free local port for a subprocess daemon.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends SIGTERM to a child process.
pub fn terminate(child: &tokio::process::Child) {
    let pid = child.id().expect("the child is running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A Segment `track` line.
pub fn track(user: &str, event: &str, at: &str, props: serde_json::Value) -> String {
    serde_json::json!({
        "type": "track", "userId": user, "event": event, "properties": props,
        "timestamp": at, "messageId": format!("{user}-{event}-{at}"),
    })
    .to_string()
}

/// Deep-merges `extra` into `base` (tables merge, other values replace).
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The PostgreSQL server tests create their databases on:
/// `ENGAGED_TEST_POSTGRES_URL`, else the local service CI runs with.
pub fn postgres_server_url() -> String {
    std::env::var("ENGAGED_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh PostgreSQL database for one test (`engaged_t_<pid>_<random>`),
/// so tests run in parallel without seeing each other's rows. Dropped, with
/// any connections still open to it, when this value is.
pub struct PgDb {
    /// The database's URL, for `engaged::store::open` or a config file.
    pub url: String,
    name: String,
    server: String,
}

impl PgDb {
    /// Creates the database; panics naming the server when PostgreSQL is
    /// unreachable (these tests never skip).
    pub async fn create() -> Self {
        use sqlx::Connection as _;
        let server = postgres_server_url();
        let shown = engaged::config::redact_url(&server);
        let mut conn = sqlx::PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {shown}: {e}\n\
                 The PostgreSQL tests need a server; start it, or set \
                 ENGAGED_TEST_POSTGRES_URL to one where this user may CREATE DATABASE."
                )
            });
        let name = format!(
            "engaged_t_{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("creating database {name} on {shown}: {e}"));
        let _ = conn.close().await;
        let mut url = url::Url::parse(&server).expect("ENGAGED_TEST_POSTGRES_URL is a URL");
        url.set_path(&name);
        Self {
            url: url.to_string(),
            name,
            server,
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime (or while a panic unwinds), where
        // blocking on async work is not allowed: a thread with its own runtime.
        let server = self.server.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            use sqlx::Connection as _;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&server).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}
