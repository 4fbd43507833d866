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
