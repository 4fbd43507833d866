//! Spawns and supervises one job's child process.
//!
//! The child is the same binary (`compressd exec`). The runner writes the [`ExecRequest`] on its
//! stdin, reads [`ChildMessage`]s from its stdout, keeps the last lines of its stderr, stops it on
//! request (SIGTERM, then SIGKILL after a grace period) and explains how it ended. It knows nothing
//! about the database: the worker decides what each message and each ending means for the job.
//!
//! [`ExecRequest`]: super::protocol::ExecRequest

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

use super::protocol::ChildMessage;

/// Exit status of a Rust program that panicked (the runtime's default).
const PANIC_EXIT_CODE: i32 = 101;

/// How to start a child.
#[derive(Debug, Clone)]
pub struct ChildCommand {
    /// The executable (normally `std::env::current_exe()`).
    pub program: PathBuf,
    /// Its arguments (normally `exec --job <id>`).
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub envs: Vec<(OsString, OsString)>,
    /// Bytes written to its stdin before stdin is closed (the JSON request).
    pub stdin: Vec<u8>,
    /// How many of its last stderr lines to keep for the failure report.
    pub log_tail_lines: usize,
}

/// Why the worker stopped a child before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The user cancelled the job.
    Cancelled,
    /// Another worker owns the job now (heartbeat or a fenced write changed nothing).
    LeaseLost,
    /// The worker process is shutting down.
    Shutdown,
}

/// How a child that was not stopped by its worker ended without reporting a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeathCause {
    /// Killed by SIGKILL that the worker did not send while the kernel's out-of-memory killer
    /// ran (its `oom_kill` count in `/proc/vmstat` rose during the attempt). `confirmed` is
    /// false where that count cannot be read, so the kill is only most likely the OOM killer's.
    OutOfMemory {
        /// Whether the kernel's count of OOM kills rose while the child ran.
        confirmed: bool,
    },
    /// Killed by another signal.
    KilledBySignal(i32),
    /// The Rust runtime reported a panic (exit status 101).
    Panic,
    /// Exited with a non-zero status.
    ExitCode(i32),
    /// Exited with status 0 but never sent a terminal message.
    NoVerdict,
}

impl DeathCause {
    /// A stable slug for the job's error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::OutOfMemory { .. } => "child_out_of_memory",
            Self::KilledBySignal(_) => "child_killed",
            Self::Panic => "child_panicked",
            Self::ExitCode(_) => "child_exited",
            Self::NoVerdict => "child_no_verdict",
        }
    }

    /// A sentence for the job's error `message`.
    pub fn describe(&self) -> String {
        match self {
            Self::OutOfMemory { confirmed: true } => {
                "the job's process ran out of memory: the kernel's out-of-memory killer ended it"
                    .into()
            }
            Self::OutOfMemory { confirmed: false } => {
                "the job's process was killed by SIGKILL (most likely out of memory)".into()
            }
            Self::KilledBySignal(signal) if *signal == Signal::SIGKILL as i32 => {
                "the job's process was killed by SIGKILL from outside the worker (the kernel \
                 counted no out-of-memory kill meanwhile)"
                    .into()
            }
            Self::KilledBySignal(signal) => {
                format!("the job's process was killed by signal {signal}")
            }
            Self::Panic => "the job's process panicked".into(),
            Self::ExitCode(code) => format!("the job's process exited with status {code}"),
            Self::NoVerdict => "the job's process exited without reporting a result".into(),
        }
    }

    /// `oom_kills_rose`: whether the kernel counted an out-of-memory kill while the child ran
    /// (`None`: the count cannot be read here).
    fn from_status(status: ExitStatus, log_tail: &[String], oom_kills_rose: Option<bool>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (_, Some(signal)) if signal == Signal::SIGKILL as i32 => match oom_kills_rose {
                Some(true) => Self::OutOfMemory { confirmed: true },
                Some(false) => Self::KilledBySignal(signal),
                None => Self::OutOfMemory { confirmed: false },
            },
            (_, Some(signal)) => Self::KilledBySignal(signal),
            (Some(PANIC_EXIT_CODE), _) if log_tail.iter().any(|l| l.contains("panicked at")) => {
                Self::Panic
            }
            (Some(0), _) => Self::NoVerdict,
            (Some(code), _) => Self::ExitCode(code),
            (None, None) => Self::NoVerdict,
        }
    }
}

/// How a child's run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ChildOutcome {
    /// The child sent its terminal message ([`ChildMessage::Succeeded`] or `Failed`); its verdict
    /// stands whatever its exit status.
    Reported(ChildMessage),
    /// The worker stopped it.
    Stopped(StopReason),
    /// It died without a verdict.
    Died {
        /// How it died.
        cause: DeathCause,
        /// The last lines it wrote to stderr, oldest first.
        log_tail: Vec<String>,
        /// The highest resident set size seen while it ran (Linux `VmHWM`, sampled), bytes.
        peak_rss_bytes: Option<u64>,
    },
}

/// The last lines of a child's stderr, bounded.
#[derive(Debug)]
struct LogTail {
    lines: VecDeque<String>,
    capacity: usize,
}

impl LogTail {
    fn push(&mut self, line: String) {
        if self.lines.len() == self.capacity {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

/// A running child process.
#[derive(Debug)]
pub struct RunningChild {
    child: Child,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    log_tail: Arc<Mutex<LogTail>>,
    stderr_task: JoinHandle<()>,
    peak_rss: Arc<AtomicU64>,
    rss_task: JoinHandle<()>,
    /// The kernel's count of out-of-memory kills when the child started.
    oom_kills_at_start: Option<u64>,
    verdict: Option<ChildMessage>,
}

impl RunningChild {
    /// Starts the child and hands it its request.
    ///
    /// # Errors
    /// When the program cannot be started or its stdin cannot be written.
    pub async fn spawn(command: &ChildCommand) -> std::io::Result<Self> {
        let oom_kills_at_start = oom_kill_count().await;
        let mut child = Command::new(&command.program)
            .args(&command.args)
            .envs(command.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A worker task that is dropped (worker shutdown, panic) must not leave the child running.
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("child has no stdin"))?;
        // A child that exits before reading its request closes the pipe; that is not a spawn
        // failure: its exit status and stderr, collected below, say what happened.
        match stdin.write_all(&command.stdin).await {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
            _ => {}
        }
        drop(stdin);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("child has no stdout"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| std::io::Error::other("child has no stderr"))?;
        let log_tail = Arc::new(Mutex::new(LogTail {
            lines: VecDeque::new(),
            capacity: command.log_tail_lines.max(1),
        }));
        // In the caller's span (the job's attempt), so each forwarded line carries the job id.
        let stderr_task = tokio::spawn(tracing::Instrument::in_current_span(keep_tail(
            BufReader::new(stderr).lines(),
            Arc::clone(&log_tail),
        )));
        let peak_rss = Arc::new(AtomicU64::new(0));
        let rss_task = tokio::spawn(sample_peak_rss(child.id(), Arc::clone(&peak_rss)));
        Ok(Self {
            child,
            stdout: Some(BufReader::new(stdout).lines()),
            log_tail,
            stderr_task,
            peak_rss,
            rss_task,
            oom_kills_at_start,
            verdict: None,
        })
    }

    /// The OS process id, while the child runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The next message from the child, or `None` once its stdout is closed (it exited, or
    /// is about to). Cancel-safe, so it can sit in a `select!` beside the stop signal.
    pub async fn next_message(&mut self) -> Option<ChildMessage> {
        let lines = self.stdout.as_mut()?;
        loop {
            match lines.next_line().await {
                Ok(Some(line)) if line.trim().is_empty() => continue,
                Ok(Some(line)) => {
                    let message = ChildMessage::parse_line(&line);
                    if message.is_terminal() && self.verdict.is_none() {
                        self.verdict = Some(message.clone());
                    }
                    return Some(message);
                }
                // A read error on a pipe means the child is gone; treat it like end of output.
                Ok(None) | Err(_) => {
                    self.stdout = None;
                    return None;
                }
            }
        }
    }

    /// Waits for the child to exit on its own (call after [`Self::next_message`] returned `None`)
    /// and says how it ended.
    ///
    /// # Errors
    /// When waiting on the process fails.
    pub async fn finish(mut self) -> std::io::Result<ChildOutcome> {
        let status = self.child.wait().await?;
        self.rss_task.abort();
        let log_tail = self.collect_tail().await;
        let peak = self.peak_rss.load(Ordering::Relaxed);
        let oom_kills_rose = match (self.oom_kills_at_start, oom_kill_count().await) {
            (Some(before), Some(after)) => Some(after > before),
            _ => None,
        };
        Ok(match self.verdict.take() {
            Some(verdict) => ChildOutcome::Reported(verdict),
            None => ChildOutcome::Died {
                cause: DeathCause::from_status(status, &log_tail, oom_kills_rose),
                log_tail,
                peak_rss_bytes: (peak > 0).then_some(peak),
            },
        })
    }

    /// Stops the child: SIGTERM, then SIGKILL if it has not exited after `grace`.
    ///
    /// # Errors
    /// When waiting on the process fails.
    pub async fn stop(
        mut self,
        reason: StopReason,
        grace: Duration,
    ) -> std::io::Result<ChildOutcome> {
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            // The child is ours and not yet reaped, so its pid cannot have been reused. A failure
            // means it already exited, which the wait below observes.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_s = grace.as_secs_f64(),
                "child ignored SIGTERM; sending SIGKILL"
            );
            self.child.kill().await?;
        }
        self.stderr_task.abort();
        self.rss_task.abort();
        Ok(ChildOutcome::Stopped(reason))
    }

    async fn collect_tail(&mut self) -> Vec<String> {
        // stderr reaches EOF when the child exits; give the reader a moment to drain it.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.stderr_task).await;
        let tail = self
            .log_tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tail.lines.iter().cloned().collect()
    }
}

/// How often the child's peak resident set size is read.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Keeps `peak` at the child's `VmHWM` (the kernel's own high-water mark of its resident set)
/// until its `/proc` entry is gone. The kernel keeps the true peak, so a sample taken shortly
/// before an out-of-memory kill is close to the size it was killed at; a process that grows
/// within the last interval is reported at its last sample.
async fn sample_peak_rss(pid: Option<u32>, peak: Arc<AtomicU64>) {
    let Some(pid) = pid else { return };
    let path = format!("/proc/{pid}/status");
    loop {
        match tokio::fs::read_to_string(&path).await {
            Ok(status) => match high_water_mark(&status) {
                Some(bytes) => {
                    peak.fetch_max(bytes, Ordering::Relaxed);
                }
                // A zombie has no memory lines: it is gone.
                None => return,
            },
            Err(_) => return,
        }
        tokio::time::sleep(RSS_SAMPLE_INTERVAL).await;
    }
}

/// The kernel's count of processes its out-of-memory killer has killed since boot (the
/// `oom_kill` line of `/proc/vmstat`, Linux 4.13 and later), whether for the whole machine or a
/// memory cgroup's limit. It is machine-wide: a rise while a child ran that the worker did not
/// kill is taken as the child's own out-of-memory kill.
async fn oom_kill_count() -> Option<u64> {
    let vmstat = tokio::fs::read_to_string("/proc/vmstat").await.ok()?;
    vmstat
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
}

/// The `VmHWM:   1234 kB` line of `/proc/<pid>/status`, in bytes.
fn high_water_mark(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Writes a line of the child's stderr to the worker's log, in the job's span. The child logs
/// with the worker's settings (it inherits them), so its own filter already chose what it
/// writes; a JSON record (`log_format = "json"`) is written again as one flat record with the
/// child's level, message and target, anything else (text format, a panic) as it is.
fn forward_child_line(line: &str) {
    let record = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .filter(|r| r["level"].is_string() && r["fields"].is_object());
    let Some(mut record) = record else {
        tracing::info!(target: "job.child", "{line}");
        return;
    };
    let message = record["fields"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let Some(fields) = record["fields"].as_object_mut() {
        fields.remove("message");
    }
    let fields = &record["fields"];
    let target = record["target"].as_str().unwrap_or_default();
    match record["level"].as_str().unwrap_or_default() {
        "ERROR" => {
            tracing::error!(target: "job.child", child_target = target, %fields, "{message}")
        }
        "WARN" => tracing::warn!(target: "job.child", child_target = target, %fields, "{message}"),
        "INFO" => tracing::info!(target: "job.child", child_target = target, %fields, "{message}"),
        "DEBUG" => {
            tracing::debug!(target: "job.child", child_target = target, %fields, "{message}")
        }
        _ => tracing::trace!(target: "job.child", child_target = target, %fields, "{message}"),
    }
}

async fn keep_tail(
    mut lines: Lines<BufReader<tokio::process::ChildStderr>>,
    tail: Arc<Mutex<LogTail>>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        forward_child_line(&line);
        tail.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> ChildCommand {
        ChildCommand {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            envs: Vec::new(),
            stdin: b"{\"hello\":1}".to_vec(),
            log_tail_lines: 3,
        }
    }

    /// Reads every message, then waits for the end.
    async fn run_to_end(script: &str) -> (Vec<ChildMessage>, ChildOutcome) {
        let mut child = RunningChild::spawn(&shell(script)).await.unwrap();
        let mut messages = Vec::new();
        while let Some(message) = child.next_message().await {
            messages.push(message);
        }
        (messages, child.finish().await.unwrap())
    }

    #[tokio::test]
    async fn messages_and_the_verdict_come_through_and_stdin_is_delivered() {
        // The request comes back as a plain line, which is kept as a log message.
        let script = r#"read request; echo "$request"
echo '{"type":"progress","fraction":0.5}'
echo '{"type":"succeeded","result":{"metrics":{}}}'"#;
        let (messages, outcome) = run_to_end(script).await;
        assert_eq!(
            messages[0],
            ChildMessage::Log {
                level: "info".into(),
                message: "{\"hello\":1}".into()
            }
        );
        assert_eq!(
            messages[1],
            ChildMessage::Progress {
                fraction: 0.5,
                eta_seconds: None,
                message: None
            }
        );
        assert_eq!(
            outcome,
            ChildOutcome::Reported(ChildMessage::Succeeded {
                result: serde_json::json!({"metrics": {}}),
                outputs: Vec::new(),
            })
        );
    }

    #[tokio::test]
    async fn a_non_zero_exit_keeps_only_the_last_stderr_lines() {
        let (_, outcome) = run_to_end("for i in 1 2 3 4 5; do echo line$i >&2; done; exit 3").await;
        let expected_tail = vec!["line3".to_owned(), "line4".to_owned(), "line5".to_owned()];
        // The peak is left out: a shell that exits at once may be gone before the first sample.
        let ChildOutcome::Died {
            cause, log_tail, ..
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!((cause, log_tail), (DeathCause::ExitCode(3), expected_tail));
    }

    #[tokio::test]
    async fn a_panic_an_unexpected_sigkill_and_a_silent_exit_are_told_apart() {
        let (_, panic) =
            run_to_end("echo \"thread 'main' panicked at src/x.rs:1:1\" >&2; exit 101").await;
        assert!(
            matches!(
                panic,
                ChildOutcome::Died {
                    cause: DeathCause::Panic,
                    ..
                }
            ),
            "{panic:?}"
        );
        // A SIGKILL from outside with no out-of-memory kill counted is not called one.
        let (_, killed) = run_to_end("kill -9 $$").await;
        let ChildOutcome::Died { cause, .. } = killed else {
            panic!("{killed:?}");
        };
        assert_eq!(cause, DeathCause::KilledBySignal(9));
        assert_eq!(cause.code(), "child_killed");
        assert!(cause.describe().contains("outside the worker"));
        let (_, silent) = run_to_end("exit 0").await;
        assert!(
            matches!(
                silent,
                ChildOutcome::Died {
                    cause: DeathCause::NoVerdict,
                    ..
                }
            ),
            "{silent:?}"
        );
    }

    #[tokio::test]
    async fn stop_sends_sigterm_then_sigkill_after_the_grace_period() {
        // The shell ignores SIGTERM, so only the SIGKILL after the grace period ends it.
        let child = RunningChild::spawn(&shell(
            "trap '' TERM; echo ready >&2; while true; do sleep 0.05; done",
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let outcome = child
            .stop(StopReason::Cancelled, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(outcome, ChildOutcome::Stopped(StopReason::Cancelled));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_child_that_honours_sigterm_stops_at_once() {
        let child = RunningChild::spawn(&shell("sleep 30")).await.unwrap();
        let started = std::time::Instant::now();
        let outcome = child
            .stop(StopReason::LeaseLost, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(outcome, ChildOutcome::Stopped(StopReason::LeaseLost));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_child_killed_from_outside_reports_its_peak_resident_size() {
        // SIGKILL, not from the worker, after growing to ~200 MiB (and held a moment, so a
        // sample sees it). A real out-of-memory kill is tested in `tests/worker/oom.rs`.
        let script = "exec python3 -c 'import os, signal, time; b = bytearray(200 << 20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(0.5); os.kill(os.getpid(), signal.SIGKILL)'";
        let (_, outcome) = run_to_end(script).await;
        let ChildOutcome::Died {
            cause,
            peak_rss_bytes,
            ..
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!(cause, DeathCause::KilledBySignal(9));
        let peak = peak_rss_bytes.expect("a sampled peak");
        assert!(peak >= 200 << 20, "peak {peak} bytes");
    }

    #[test]
    fn a_sigkill_is_out_of_memory_only_when_the_kernel_counted_an_oom_kill() {
        use std::os::unix::process::ExitStatusExt;
        let sigkill = ExitStatus::from_raw(Signal::SIGKILL as i32);
        assert_eq!(
            DeathCause::from_status(sigkill, &[], Some(true)),
            DeathCause::OutOfMemory { confirmed: true }
        );
        assert_eq!(
            DeathCause::from_status(sigkill, &[], Some(false)),
            DeathCause::KilledBySignal(9)
        );
        assert_eq!(
            DeathCause::from_status(sigkill, &[], None),
            DeathCause::OutOfMemory { confirmed: false }
        );
        let sigsegv = ExitStatus::from_raw(Signal::SIGSEGV as i32);
        assert_eq!(
            DeathCause::from_status(sigsegv, &[], Some(true)),
            DeathCause::KilledBySignal(11)
        );
    }

    #[test]
    fn the_high_water_mark_is_read_from_proc_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(high_water_mark(status), Some(2048 * 1024));
        assert_eq!(high_water_mark("Name:\tzombie\nState:\tZ\n"), None);
    }
}
