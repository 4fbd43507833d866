//! The `compressd` binary as a user runs it.

use std::process::{Command, Output};

fn compressd(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_compressd"));
    command.args(args).env_remove("RUST_LOG");
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().expect("run compressd")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn version_and_help() {
    let version = compressd(&["--version"], &[]);
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("compressd {}", env!("CARGO_PKG_VERSION"))
    );
    for sub in ["serve", "worker", "migrate", "run", "openapi"] {
        let help = compressd(&[sub, "--help"], &[]);
        assert!(help.status.success(), "{sub} --help: {}", stderr(&help));
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("Usage: compressd"),
            "{sub}"
        );
    }
}

#[test]
fn a_bad_setting_stops_the_process_naming_it() {
    let out = compressd(&["migrate"], &[("COMPRESSD_LISTEN", "not-an-address")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("listen (COMPRESSD_LISTEN)"),
        "{}",
        stderr(&out)
    );
    let out = compressd(&["migrate"], &[("COMPRESSD_DATABASE_URL", "mysql://db/x")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("COMPRESSD_DATABASE_URL"),
        "{}",
        stderr(&out)
    );
}

/// `keys create`, `keys list` and `keys revoke` against the embedded database: the key is printed
/// once and never listed; the list shows the revocation.
#[test]
fn keys_are_created_listed_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [("COMPRESSD_DATA_DIR", data.to_str().unwrap())];
    let made = compressd(
        &[
            "keys",
            "create",
            "--tenant",
            "team-a",
            "--scopes",
            "read,write",
        ],
        &env,
    );
    assert!(made.status.success(), "{}", stderr(&made));
    let token = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let id = token
        .strip_prefix("cpd_")
        .and_then(|rest| rest.split('_').next())
        .expect("a cpd_<id>_<secret> key")
        .to_owned();

    let listed = compressd(&["keys", "list"], &env);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let list = String::from_utf8(listed.stdout).unwrap();
    let line = list.lines().find(|l| l.starts_with(&id)).expect(&list);
    assert!(
        line.contains("team-a") && line.contains("read,write"),
        "{line}"
    );
    assert!(line.trim_end().ends_with('-'), "not revoked yet: {line}");
    assert!(!list.contains(&token), "the secret is never listed");

    let revoked = compressd(&["keys", "revoke", &id], &env);
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let list = String::from_utf8(compressd(&["keys", "list"], &env).stdout).unwrap();
    let line = list.lines().find(|l| l.starts_with(&id)).expect(&list);
    assert!(!line.trim_end().ends_with('-'), "revoked: {line}");

    let unknown = compressd(&["keys", "revoke", "nosuchkey"], &env);
    assert!(!unknown.status.success());
}

#[test]
fn migrate_creates_the_embedded_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = compressd(
        &["migrate"],
        &[("COMPRESSD_DATA_DIR", data.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(data.join("compressd.db").is_file());
}

#[test]
fn the_effective_configuration_is_logged_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/x.db", dir.path().display());
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"{}\"\n", dir.path().display()),
    )
    .unwrap();
    let out = compressd(
        &["--config", config.to_str().unwrap(), "migrate"],
        &[("COMPRESSD_DATABASE_URL", &db)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("effective configuration"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&db),
        "the URL has no password, so it is shown whole"
    );
}

fn write_spec(dir: &std::path::Path, spec: serde_json::Value) -> String {
    let path = dir.join("spec.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

fn local_spec(dir: &std::path::Path) -> serde_json::Value {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let dataset = dir.join("data.jsonl");
    std::fs::write(&dataset, "{\"text\": \"a\", \"label\": \"x\"}\n").unwrap();
    serde_json::json!({
        "name": "local",
        "model": model,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [{"type": "finetune", "epochs": 1}]
    })
}

#[test]
fn run_rejects_an_invalid_spec_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = local_spec(dir.path());
    spec["pipeline"][0]["epochs"] = serde_json::json!(0);
    spec["model"] = serde_json::json!("/does/not/exist");
    let out = compressd(
        &[
            "run",
            &write_spec(dir.path(), spec),
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/pipeline/0/epochs"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_checks_local_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = local_spec(dir.path());
    spec["model"] = serde_json::json!("/does/not/exist");
    let out = compressd(
        &[
            "run",
            &write_spec(dir.path(), spec),
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/model: `/does/not/exist` does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_dry_run_writes_the_normalized_spec() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = local_spec(dir.path());
    spec["dry_run"] = serde_json::json!(true);
    let out_dir = dir.path().join("out");
    let out = compressd(
        &[
            "run",
            &write_spec(dir.path(), spec),
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("spec.json")).unwrap()).unwrap();
    assert_eq!(written["seed"], 42);
    assert_eq!(written["pipeline"][0]["batch_size"], 16);
}

/// `compressd run` drives the engine end to end on the real MiniLM and BBC News (tiny caps so it
/// takes seconds): a fine-tune then int8 quantization, with a report and a smaller final model.
#[test]
#[ignore = "needs ../shared: cargo test --test api cli::run_compresses_minilm_end_to_end -- --ignored"]
fn run_compresses_minilm_end_to_end() {
    let shared = std::env::var_os("COMPRESSD_SHARED")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let model = shared.join("models/all-MiniLM-L6-v2");
    let dataset = shared.join("data/bbc_news/bbc_news.jsonl");
    assert!(
        model.exists() && dataset.exists(),
        "{} or {} is missing (set COMPRESSD_SHARED)",
        model.display(),
        dataset.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        serde_json::json!({
            "name": "smoke",
            "model": model,
            "task": {"type": "text_classification", "dataset": dataset, "max_length": 32,
                     "max_train_samples": 64, "max_eval_samples": 32},
            "pipeline": [{"type": "finetune", "epochs": 1, "learning_rate": 5e-5, "head_learning_rate": 1e-3},
                         {"type": "quantize", "scheme": "int8"}],
            "acceptance": {"metric": "accuracy", "max_drop": 0.5}
        }),
    );
    let out = dir.path().join("out");
    let output = compressd(&["run", &spec, "--out", out.to_str().unwrap()], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(log.contains("\"event\":\"stage_started\""), "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert!(out.join("report.md").exists());
    assert!(out.join("final").is_dir() && out.join("best").is_dir());
    let text = report.to_string();
    assert!(text.contains("1-quantize"), "{text}");
}

/// Every documented setting, set through its `COMPRESSD_*` variable in the form people type, is
/// read back from the configuration the process logs at start (issue 18: list settings stopped the
/// process, and no `COMPRESSD_S3_*` variable took effect).
#[test]
fn every_setting_is_taken_from_its_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let db = format!("sqlite://{}/env.db", dir.path().display());
    let data_str = data.to_str().unwrap().to_owned();
    // (key, value as typed, how the logged configuration shows it)
    let table: Vec<(&str, &str, String)> = vec![
        (
            "listen",
            "127.0.0.1:18089",
            "listen: 127.0.0.1:18089".into(),
        ),
        ("data_dir", &data_str, format!("data_dir: {data_str:?}")),
        ("database_url", &db, format!("database_url: Some({db:?})")),
        (
            "database_max_connections",
            "3",
            "database_max_connections: 3".into(),
        ),
        (
            "migrate_on_start",
            "false",
            "migrate_on_start: false".into(),
        ),
        (
            "artifacts_url",
            "s3://bucket/prefix",
            "artifacts_url: Some(\"s3://bucket/prefix\")".into(),
        ),
        (
            "request_timeout_secs",
            "31",
            "request_timeout_secs: 31".into(),
        ),
        (
            "json_body_limit_bytes",
            "2048",
            "json_body_limit_bytes: 2048".into(),
        ),
        (
            "cors_allowed_origins",
            "https://a.example, https://b.example",
            "cors_allowed_origins: [\"https://a.example\", \"https://b.example\"]".into(),
        ),
        ("shutdown_grace_secs", "7", "shutdown_grace_secs: 7".into()),
        (
            "log",
            "info,compressd=debug",
            "log: \"info,compressd=debug\"".into(),
        ),
        ("log_format", "json", "log_format: Json".into()),
        ("worker_concurrency", "2", "worker_concurrency: 2".into()),
        (
            "worker_heartbeat_secs",
            "3.5",
            "worker_heartbeat_secs: 3.5".into(),
        ),
        (
            "worker_lease_secs",
            "70.5",
            "worker_lease_secs: 70.5".into(),
        ),
        (
            "worker_poll_interval_secs",
            "1.5",
            "worker_poll_interval_secs: 1.5".into(),
        ),
        (
            "worker_stop_grace_secs",
            "4.5",
            "worker_stop_grace_secs: 4.5".into(),
        ),
        (
            "worker_retry_backoff_secs",
            "6.5",
            "worker_retry_backoff_secs: 6.5".into(),
        ),
        (
            "events_stream_buffer",
            "65",
            "events_stream_buffer: 65".into(),
        ),
        (
            "events_slow_client_timeout_secs",
            "11.5",
            "events_slow_client_timeout_secs: 11.5".into(),
        ),
        (
            "events_keepalive_secs",
            "16.5",
            "events_keepalive_secs: 16.5".into(),
        ),
        (
            "s3_endpoint",
            "http://s3.test:9000",
            "s3_endpoint: Some(\"http://s3.test:9000\")".into(),
        ),
        (
            "s3_region",
            "eu-west-3",
            "s3_region: Some(\"eu-west-3\")".into(),
        ),
        (
            "s3_access_key_id",
            "AKIDTEST",
            "s3_access_key_id: Some(\"AKIDTEST\")".into(),
        ),
        (
            "s3_secret_access_key",
            "s3cr3t-value",
            "s3_secret_access_key: Some(\"***\")".into(),
        ),
        ("s3_allow_http", "true", "s3_allow_http: true".into()),
        (
            "upload_part_size_bytes",
            "6291456",
            "upload_part_size_bytes: 6291456".into(),
        ),
        (
            "upload_max_inflight_parts",
            "3",
            "upload_max_inflight_parts: 3".into(),
        ),
        (
            "model_upload_max_bytes",
            "1000000",
            "model_upload_max_bytes: 1000000".into(),
        ),
        (
            "dataset_upload_max_bytes",
            "2000000",
            "dataset_upload_max_bytes: 2000000".into(),
        ),
        (
            "allowed_file_roots",
            "/data/models:/srv/models,/opt/more",
            "allowed_file_roots: [\"/data/models\", \"/srv/models\", \"/opt/more\"]".into(),
        ),
        (
            "redirect_downloads",
            "true",
            "redirect_downloads: true".into(),
        ),
        ("presign_ttl_secs", "600", "presign_ttl_secs: 600".into()),
        (
            "orphan_sweep_age_secs",
            "100",
            "orphan_sweep_age_secs: 100".into(),
        ),
        (
            "orphan_sweep_interval_secs",
            "0",
            "orphan_sweep_interval_secs: 0".into(),
        ),
        ("hf_offline", "true", "hf_offline: Some(true)".into()),
        (
            "hf_endpoint",
            "https://hf.mirror.test",
            "hf_endpoint: Some(\"https://hf.mirror.test\")".into(),
        ),
        (
            "hf_cache_dir",
            "/tmp/hf-cache",
            "hf_cache_dir: Some(\"/tmp/hf-cache\")".into(),
        ),
        ("hf_token", "hf_s3cr3t", "hf_token: Some(\"***\")".into()),
        ("auth", "none", "auth: None".into()),
        (
            "rate_limit_per_key_per_sec",
            "11",
            "rate_limit_per_key_per_sec: 11".into(),
        ),
        ("rate_limit_burst", "12", "rate_limit_burst: 12".into()),
        (
            "tenant_max_active_jobs",
            "13",
            "tenant_max_active_jobs: 13".into(),
        ),
        (
            "tenant_max_stored_bytes",
            "14",
            "tenant_max_stored_bytes: 14".into(),
        ),
        (
            "allowed_private_networks",
            "10.1.0.0/16, minio.internal",
            "allowed_private_networks: [\"10.1.0.0/16\", \"minio.internal\"]".into(),
        ),
        (
            "webhook_max_attempts",
            "4",
            "webhook_max_attempts: 4".into(),
        ),
        (
            "webhook_retry_base_ms",
            "250",
            "webhook_retry_base_ms: 250".into(),
        ),
        (
            "webhook_timeout_secs",
            "7",
            "webhook_timeout_secs: 7".into(),
        ),
        (
            "mlflow_tracking_uri",
            "http://mlflow.internal:5000",
            "mlflow_tracking_uri: Some(\"http://mlflow.internal:5000\")".into(),
        ),
        (
            "mlflow_experiment",
            "team-a",
            "mlflow_experiment: \"team-a\"".into(),
        ),
    ];
    let mut documented = compressd::settings::Settings::keys();
    documented.sort_unstable();
    let mut covered: Vec<&str> = table.iter().map(|(key, ..)| *key).collect();
    covered.sort_unstable();
    assert_eq!(
        covered, documented,
        "the table must cover every documented setting"
    );

    let vars: Vec<(String, &str)> = table
        .iter()
        .map(|(key, value, _)| (format!("COMPRESSD_{}", key.to_uppercase()), *value))
        .collect();
    let envs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let out = compressd(&["migrate"], &envs);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    // log_format=json took effect: the configuration is a field of a JSON log line.
    let shown = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["fields"]["message"] == "effective configuration")
        .and_then(|line| line["fields"]["settings"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no JSON 'effective configuration' line in {log}"));
    for (key, _, expected) in &table {
        assert!(
            shown.contains(expected.as_str()),
            "{key}: `{expected}` not in {shown}"
        );
    }
    assert!(!shown.contains("s3cr3t"), "secrets are redacted: {shown}");
}

#[test]
fn a_bad_list_setting_names_its_variable() {
    let out = compressd(
        &["migrate"],
        &[("COMPRESSD_CORS_ALLOWED_ORIGINS", "ftp://x")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("COMPRESSD_CORS_ALLOWED_ORIGINS"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn serve_help_lists_every_settings_variable() {
    let help = compressd(&["serve", "--help"], &[]);
    let text = String::from_utf8_lossy(&help.stdout);
    for key in compressd::settings::Settings::keys() {
        let var = format!("COMPRESSD_{}", key.to_uppercase());
        assert!(text.contains(&var), "{var} missing from {text}");
    }
}
