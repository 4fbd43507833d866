//! A real `compressd serve` (API and worker in one process) as a child on a free port, for the
//! tests that drive it from outside: the CLI client, the dashboard, the generated Python client.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// The server child, killed on drop; its data folder is the caller's.
pub(crate) struct Served {
    child: Child,
    pub(crate) url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `compressd` with `data_dir` and JSON logs, no `RUST_LOG` from the test's environment.
pub(crate) fn compressd(data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_compressd"));
    command
        .env_remove("RUST_LOG")
        .env("COMPRESSD_DATA_DIR", data_dir)
        .env("COMPRESSD_LOG_FORMAT", "json");
    command
}

/// Makes a read-write key in `data_dir`'s database; with a key stored, `serve` requires keys.
pub(crate) fn create_key(data_dir: &Path) -> String {
    let out = compressd(data_dir)
        .args([
            "keys",
            "create",
            "--tenant",
            "default",
            "--scopes",
            "read,write",
        ])
        .output()
        .expect("run compressd keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Starts `compressd serve` on `data_dir` and waits for the address it logs.
pub(crate) fn serve(data_dir: &Path) -> Served {
    let mut child = compressd(data_dir)
        .arg("serve")
        .env("COMPRESSD_LISTEN", "127.0.0.1:0")
        .env("COMPRESSD_WORKER_POLL_INTERVAL_SECS", "0.2")
        .env("COMPRESSD_ORPHAN_SWEEP_INTERVAL_SECS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start compressd serve");
    // Read the bound address from the log, then keep draining it so the server never blocks.
    let stderr = child.stderr.take().unwrap();
    let (found, address) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(log) = serde_json::from_str::<Value>(&line) {
                if log["fields"]["message"] == "listening" {
                    let _ = found.send(log["fields"]["address"].as_str().unwrap_or("").to_owned());
                }
            }
        }
    });
    let address = address
        .recv_timeout(Duration::from_secs(60))
        .expect("the server logs its address");
    Served {
        child,
        url: format!("http://{address}"),
    }
}
