//! A throwaway PostgreSQL cluster for tests, started once per test binary.
//!
//! `COMPRESSD_TEST_DATABASE_URL` (an admin URL of an existing server) skips the cluster. Otherwise
//! `initdb` and `pg_ctl` (from PATH or `/usr/lib/postgresql/*/bin`) make a cluster in a temp dir on
//! a free 127.0.0.1 port; as root they run as the `postgres` user through `runuser`, since
//! PostgreSQL refuses to run as root. A watcher process stops the cluster and removes the folder
//! when the test binary exits. Each test gets its own fresh database.

#![allow(dead_code)] // the benches that include this file use only part of it

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use sqlx::{Connection, Executor, PgConnection};

/// Environment variable naming an existing server to use instead of a throwaway cluster.
pub const TEST_DATABASE_URL: &str = "COMPRESSD_TEST_DATABASE_URL";

static ADMIN_URL: OnceLock<String> = OnceLock::new();

/// The URL of a new, empty database on the test server.
///
/// # Panics
/// When no server can be started: the tests need one and say how to provide it.
pub async fn fresh_database_url() -> String {
    let admin = ADMIN_URL.get_or_init(|| match std::env::var(TEST_DATABASE_URL) {
        Ok(url) if !url.is_empty() => url,
        _ => start_cluster().unwrap_or_else(|e| {
            panic!("cannot start a throwaway PostgreSQL ({e}); install the server (apt-get install postgresql) or set {TEST_DATABASE_URL}")
        }),
    });
    create_database(admin).await
}

async fn create_database(admin: &str) -> String {
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(admin)
        .await
        .expect("connect to the test server");
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create a test database");
    let mut url = url::Url::parse(admin).expect("admin URL parses");
    url.set_path(&name);
    url.to_string()
}

fn start_cluster() -> Result<String, String> {
    Cluster::start().map(|cluster| cluster.admin_url)
}

/// A PostgreSQL cluster of this test binary's own, stopped and removed when the binary exits.
///
/// Most tests share one through [`fresh_database_url`]; a fault test that restarts the server
/// starts a private one with [`Cluster::start`] so that the other tests running beside it are
/// not disturbed.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub admin_url: String,
    as_root: bool,
    pg_ctl: PathBuf,
    data: PathBuf,
    log: PathBuf,
    options: String,
}

impl Cluster {
    /// Creates and starts a fresh cluster on a free port.
    ///
    /// # Errors
    /// When the server binaries are missing or the cluster does not start.
    pub fn start() -> Result<Self, String> {
        let as_root = is_root();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("compressd-test-pg-{}-{stamp}", std::process::id()));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        if as_root {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir))?;
        }
        let initdb = pg_binary("initdb")?;
        let pg_ctl = pg_binary("pg_ctl")?;
        run(postgres_user(as_root, &initdb).arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]))?;
        let port = free_port()?;
        // Durability is pointless for a throwaway cluster; turning it off makes tests much faster.
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            dir.display()
        );
        let cluster = Self {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            as_root,
            log: dir.join("postgres.log"),
            pg_ctl,
            data,
            options,
        };
        cluster.pg_ctl("start")?;
        stop_at_exit(as_root, &cluster.pg_ctl, &cluster.data, &dir)?;
        Ok(cluster)
    }

    /// Restarts the server as an operator would (`pg_ctl restart -m fast`): every open connection
    /// is cut, and the server is back, on the same port, when this returns.
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl("restart")
    }

    /// The URL of a new, empty database on this cluster.
    pub async fn fresh_database_url(&self) -> String {
        create_database(&self.admin_url).await
    }

    fn pg_ctl(&self, action: &str) -> Result<(), String> {
        let mut command = postgres_user(self.as_root, &self.pg_ctl);
        command
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-o", &self.options]);
        if action == "restart" {
            command.args(["-m", "fast"]);
        }
        command.arg(action);
        run(&mut command).map_err(|error| {
            let log_text = std::fs::read_to_string(&self.log).unwrap_or_default();
            format!("{error}; server log:\n{log_text}")
        })
    }
}

/// A watcher that waits for this process to end, then stops the cluster and removes its folder.
fn stop_at_exit(as_root: bool, pg_ctl: &Path, data: &Path, dir: &Path) -> Result<(), String> {
    let runas = if as_root {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {runas}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        pg_ctl = pg_ctl.display(),
        data = data.display(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("spawn the cluster watcher: {e}"))
}

fn postgres_user(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// A PostgreSQL server binary from PATH, else from Debian's versioned folder (newest first).
fn pg_binary(name: &str) -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name));
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join(name))
        .collect();
    debian.sort();
    debian.reverse();
    on_path
        .chain(debian)
        .find(|path| path.is_file())
        .ok_or_else(|| format!("`{name}` not found on PATH or in /usr/lib/postgresql"))
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}
