//! The README's walkthrough, run as written: the `sh` block under "## Walkthrough" is taken from
//! README.md and run by bash (with `set -euo pipefail`) in a fresh folder holding `examples/` (a
//! link to the repository's), with the built `compressd` first on PATH and the data folder in a
//! temporary directory. It starts the server, submits `examples/minilm-bbc.yaml` with `--follow`,
//! downloads the model and prints its sha256 next to the listed one: they must be equal.
//!
//! `#[ignore]`d (needs `../shared`, port 8080 free, curl and jq):
//! `cargo test --release --test acceptance walkthrough:: -- --ignored --nocapture`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::acceptance_support::shared_data;

/// The first ```sh block after the `## Walkthrough` heading.
fn walkthrough_block(readme: &str) -> Result<String> {
    let section = readme
        .split("\n## Walkthrough\n")
        .nth(1)
        .context("README has no `## Walkthrough` section")?;
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .context("the walkthrough has no sh block")?;
    Ok(block.to_owned())
}

#[test]
#[ignore = "slow, needs ../shared, port 8080, curl and jq: cargo test --release --test acceptance walkthrough:: -- --ignored --nocapture"]
fn the_readme_walkthrough_runs_as_written() -> Result<()> {
    shared_data(&["models/all-MiniLM-L6-v2", "data/bbc_news/bbc_news.jsonl"])?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let block = walkthrough_block(&std::fs::read_to_string(repo.join("README.md"))?)?;
    let dir = tempfile::tempdir()?;
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work)?;
    // `examples/../../shared` resolves through the link to the shared folder beside the repository.
    std::os::unix::fs::symlink(repo.join("examples"), work.join("examples"))?;
    let bin = Path::new(env!("CARGO_BIN_EXE_compressd"))
        .parent()
        .context("the binary's folder")?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{block}"))
        .current_dir(&work)
        .env("PATH", path)
        .env("COMPRESSD_DATA_DIR", dir.path().join("data"))
        .env_remove("COMPRESSD_SERVER")
        .env_remove("COMPRESSD_API_KEY")
        .output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    if !out.status.success() {
        let log = std::fs::read_to_string(work.join("serve.log")).unwrap_or_default();
        bail!(
            "the walkthrough failed ({}); server log:\n{log}",
            out.status
        );
    }
    // `--follow` showed the job's stages and its end.
    let shown = format!("{stdout}{stderr}");
    assert!(shown.contains("quantize"), "no stage shown");
    assert!(shown.contains("succeeded"), "no outcome shown");
    // The last two lines: sha256sum of the download, then the sha256 the job lists.
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    let [.., summed, listed] = lines.as_slice() else {
        bail!("expected the two digests last:\n{stdout}");
    };
    let summed = summed.split_whitespace().next().unwrap_or_default();
    assert_eq!(summed.len(), 64, "{summed}");
    assert_eq!(
        summed,
        listed.trim(),
        "the downloaded model is the listed one"
    );
    Ok(())
}
