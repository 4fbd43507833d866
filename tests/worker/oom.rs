//! A job's process killed by the kernel's out-of-memory killer: the attempt is reported as out of
//! memory with its sampled peak resident size, and retried by the job's policy until
//! `max_attempts`, then failed once.
//!
//! The worker's `executable` is a shell script standing in for `compressd exec`: it moves itself
//! into a memory cgroup limited to 160 MiB, holds about 80 MiB for a moment (so the worker's
//! sampler sees it), then asks for 400 MiB more, and the kernel kills it. Making the cgroup needs
//! root and a writable cgroup file system (v1 `memory` or v2 with the memory controller), as on
//! the CI machines; elsewhere the test fails saying so.

use crate::scheduler_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compressd::scheduler::{SchedulerMetrics, WorkerSettings};
use compressd::store::JobStatus;
use scheduler_support::{all_events, dry_run_spec, local_artifacts, queue_job, seed_inputs};
use tokio_util::sync::CancellationToken;

const LIMIT_BYTES: u64 = 160 << 20;

/// A memory cgroup of its own, removed when dropped (once its processes are gone).
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// Tries cgroup v1's `memory` hierarchy, then a v2 hierarchy with the memory controller.
    fn create(name: &str, limit: u64) -> Self {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.limit_in_bytes").exists() {
            let dir = v1.join(name);
            std::fs::create_dir_all(&dir).expect("a v1 memory cgroup can be made (root needed)");
            std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
            // Where swap is accounted, the limit covers it too, so the kill is not put off.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                std::fs::write(memsw, limit.to_string()).unwrap();
            }
            return Self { dir };
        }
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let root = Path::new(root);
            let controllers =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                // Best effort: already on where a manager enabled it.
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
                let dir = root.join(name);
                std::fs::create_dir_all(&dir).expect("a v2 cgroup can be made (root needed)");
                std::fs::write(dir.join("memory.max"), limit.to_string()).unwrap();
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                return Self { dir };
            }
        }
        panic!("no writable memory cgroup hierarchy under /sys/fs/cgroup: this test needs one");
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_memory_kill_is_reported_with_its_peak_and_retried_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "oom"), 0, 2).await;

    let cgroup = MemoryCgroup::create(
        &format!("compressd-oom-test-{}", std::process::id()),
        LIMIT_BYTES,
    );
    let script = dir.path().join("grows-until-killed.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\ncat >/dev/null\necho $$ > {procs}\n\
             exec python3 -c 'import time; held = b\"x\" * (80 << 20); time.sleep(1); more = b\"y\" * (400 << 20); print(\"not killed\")'\n",
            procs = cgroup.procs().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut settings = WorkerSettings::with_defaults(dir.path()).unwrap();
    settings.executable = script;
    settings.poll_interval = Duration::from_millis(100);
    settings.retry_backoff = Duration::ZERO;
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(compressd::scheduler::run(
        Arc::clone(&store),
        local_artifacts(dir.path()),
        settings,
        SchedulerMetrics::default(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let job = store.get_job(job.id).await.unwrap().unwrap();
        if job.status.is_finished() {
            break job;
        }
        assert!(Instant::now() < deadline, "still {:?}", job.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    shutdown.cancel();
    worker.await.unwrap();

    // Retried once by the policy (max_attempts 2), then failed for good.
    assert_eq!((ended.status, ended.attempt), (JobStatus::Failed, 2));
    let error = ended.error.expect("a reason");
    assert_eq!(error.code, "child_out_of_memory", "{error:?}");
    assert!(
        error.message.contains("out-of-memory killer ended it"),
        "the kernel's own count confirms it: {}",
        error.message
    );
    // The peak is the child's own: it held about 80 MiB and was killed near the 160 MiB limit
    // (its resident set also counts shared library pages the limit does not, hence the margin).
    let peak: f64 = error
        .message
        .split("peak resident memory ")
        .nth(1)
        .and_then(|rest| rest.split(" MiB").next())
        .and_then(|mib| mib.parse().ok())
        .unwrap_or_else(|| panic!("no peak in {}", error.message));
    assert!(
        (75.0..=256.0).contains(&peak),
        "peak {peak} MiB: {}",
        error.message
    );
    let events = all_events(&*store, ended.id).await;
    let attempts: Vec<i32> = events
        .iter()
        .filter(|e| e.event_type == "status" && e.payload["status"] == "running")
        .map(|e| e.attempt)
        .collect();
    assert_eq!(attempts, [1, 2], "{events:?}");
    assert_eq!(scheduler_support::terminal_count(&events), 1);
}
