//! The client commands, `compressd jobs|models|datasets …`: talk to a server by URL and key
//! (see [`crate::client::connection`]), print for people or, with `--output json`, for scripts.
//!
//! Exit codes: 0 done (for `follow`, `create --follow`: the job succeeded), 1 an error (the server
//! refused, could not be reached, a download did not verify), 2 bad arguments,
//! [`EXIT_JOB_FAILED`] and [`EXIT_JOB_CANCELLED`] for a followed job that ended so.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::client::follow::{follow, FollowView};
use crate::client::upload::{self, DatasetOptions};
use crate::client::{download, spec, Client, Connection};
use crate::error::{Error, Result};

/// Exit status of `follow` when the job failed.
pub const EXIT_JOB_FAILED: u8 = 3;
/// Exit status of `follow` when the job was cancelled.
pub const EXIT_JOB_CANCELLED: u8 = 4;

/// Where and how a client command talks.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The compressd server [default: `server` in the client config file, else http://127.0.0.1:8080]
    #[arg(long, global = true, env = "COMPRESSD_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// API key, sent as `Authorization: Bearer KEY` [default: `api_key` in the client config file]
    #[arg(
        long,
        global = true,
        env = "COMPRESSD_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub key: Option<String>,
    /// `text` for people; `json` for scripts (events of `follow` as JSON lines)
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Output formats of the client commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Lines, tables and progress bars.
    Text,
    /// JSON on stdout (the server's records; problems too).
    Json,
}

/// `compressd jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Submit a job spec (YAML or JSON); a local path as `model` or `task.dataset` is uploaded
    /// first (relative to the spec file), a file://, s3:// or hf:// URI registered by reference.
    Create {
        /// The spec file (`.yaml`/`.yml` is read as YAML, anything else as JSON).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Then follow the job to its end; the exit status is its outcome.
        #[arg(long)]
        follow: bool,
        /// Makes retries safe: the same key and spec return the same job.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this status (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1 to 100).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one job.
    Get {
        /// The job id.
        id: Uuid,
    },
    /// Ask a queued or running job to stop.
    Cancel {
        /// The job id.
        id: Uuid,
    },
    /// Delete a finished job and its artifacts.
    Delete {
        /// The job id.
        id: Uuid,
    },
    /// Show a job's progress live until it ends (resuming if the connection drops); the exit
    /// status is its outcome.
    Follow {
        /// The job id.
        id: Uuid,
    },
    /// Download a job's artifacts (all, or those named), verified against their sha256 and
    /// resumed where an earlier download stopped.
    Download {
        /// The job id.
        id: Uuid,
        /// An artifact name, e.g. `model/model.safetensors` or `report.md`; repeatable.
        #[arg(long, value_name = "NAME")]
        artifact: Vec<String>,
        /// Folder to write into (created if missing).
        #[arg(short = 'o', long = "out", value_name = "DIR", default_value = ".")]
        out: PathBuf,
    },
}

/// `compressd models …` and `compressd datasets …`.
#[derive(Debug, Subcommand)]
pub enum InputsCommand {
    /// Register a local folder or file (uploaded) or a file://, s3:// or hf:// URI.
    Add {
        /// A local path, or a URI the server reads.
        source: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Datasets: `jsonl`, `csv` or `text` (default: from the extension).
        #[arg(long)]
        format: Option<String>,
        /// Datasets: the text column (default `text`).
        #[arg(long)]
        text_field: Option<String>,
        /// Datasets: the label column (default `label`).
        #[arg(long)]
        label_field: Option<String>,
        /// Datasets: skip bad rows instead of refusing the file.
        #[arg(long)]
        lenient: bool,
    },
}

/// A client command, parsed.
#[derive(Debug)]
pub enum ClientCommand {
    /// `jobs …`
    Jobs(JobsCommand),
    /// `models …`
    Models(InputsCommand),
    /// `datasets …`
    Datasets(InputsCommand),
}

/// Runs a client command and prints its result or error; returns the exit status.
pub async fn run(command: ClientCommand, args: ServerArgs) -> u8 {
    let json = args.output == OutputFormat::Json;
    let outcome = match Connection::resolve(args.server, args.key).and_then(|c| Client::new(&c)) {
        Ok(client) => dispatch(&client, command, json).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(status) => status,
        Err(error) => {
            report(&error, json);
            1
        }
    }
}

async fn dispatch(client: &Client, command: ClientCommand, json: bool) -> Result<u8> {
    match command {
        ClientCommand::Jobs(command) => jobs(client, command, json).await,
        ClientCommand::Models(InputsCommand::Add { source, name, .. }) => {
            let model = upload::add_model(client, &source, name.as_deref()).await?;
            print_record(&model, json, "model");
            Ok(0)
        }
        ClientCommand::Datasets(InputsCommand::Add {
            source,
            name,
            format,
            text_field,
            label_field,
            lenient,
        }) => {
            let options = DatasetOptions {
                format,
                text_field,
                label_field,
                strict: lenient.then_some(false),
            };
            let dataset = upload::add_dataset(client, &source, name.as_deref(), &options).await?;
            print_record(&dataset, json, "dataset");
            Ok(0)
        }
    }
}

async fn jobs(client: &Client, command: JobsCommand, json: bool) -> Result<u8> {
    match command {
        JobsCommand::Create {
            file,
            follow: then_follow,
            idempotency_key,
        } => create(client, &file, then_follow, idempotency_key, json).await,
        JobsCommand::List { status, limit } => {
            let mut path = format!("/v1/jobs?limit={limit}");
            if let Some(status) = status {
                path.push_str(&format!("&status={status}"));
            }
            let page = client.call(Method::GET, &path, None).await?;
            if json {
                println!("{page}");
            } else {
                print_job_table(&page["jobs"]);
            }
            Ok(0)
        }
        JobsCommand::Get { id } => {
            let job = client
                .call(Method::GET, &format!("/v1/jobs/{id}"), None)
                .await?;
            print_job(&job, json);
            Ok(0)
        }
        JobsCommand::Cancel { id } => {
            let job = client
                .call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None)
                .await?;
            print_job(&job, json);
            Ok(0)
        }
        JobsCommand::Delete { id } => {
            client
                .call(Method::DELETE, &format!("/v1/jobs/{id}"), None)
                .await?;
            if json {
                println!("{}", json!({ "id": id, "deleted": true }));
            } else {
                println!("deleted job {id}");
            }
            Ok(0)
        }
        JobsCommand::Follow { id } => follow_to_end(client, id, json).await,
        JobsCommand::Download { id, artifact, out } => {
            download_all(client, id, &artifact, &out, json).await
        }
    }
}

async fn create(
    client: &Client,
    file: &Path,
    then_follow: bool,
    idempotency_key: Option<String>,
    json: bool,
) -> Result<u8> {
    let mut job_spec = spec::read_spec_file(file)?;
    let base_dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    spec::register_inputs(client, &mut job_spec, base_dir, &mut |pointer, record| {
        if !json {
            eprintln!(
                "registered {} {} for {pointer}",
                if pointer == "/model" {
                    "model"
                } else {
                    "dataset"
                },
                record["id"].as_str().unwrap_or_default()
            );
        }
    })
    .await?;
    let mut request = client
        .request(Method::POST, "/v1/jobs")
        .timeout(crate::client::CALL_TIMEOUT)
        .json(&job_spec);
    if let Some(key) = idempotency_key {
        request = request.header("idempotency-key", key);
    }
    let response = client.send(request).await?;
    let job: Value = response.json().await.map_err(|e| client.unreachable(&e))?;
    if json {
        println!("{job}");
    } else {
        println!(
            "job {} ({}) {}",
            job["id"].as_str().unwrap_or_default(),
            job["name"].as_str().unwrap_or_default(),
            job["status"].as_str().unwrap_or_default()
        );
    }
    if !then_follow {
        return Ok(0);
    }
    let id = job["id"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .ok_or_else(|| Error::Corrupt(format!("the server's job has no id: {job}")))?;
    follow_to_end(client, id, json).await
}

/// Follows a job to its end; the exit status is its outcome.
async fn follow_to_end(client: &Client, id: Uuid, json: bool) -> Result<u8> {
    let mut view = FollowView::new(json);
    let job = follow(client, id, 0, &mut view).await?;
    print_job(&job, json);
    Ok(match job["status"].as_str() {
        Some("succeeded") => 0,
        Some("cancelled") => EXIT_JOB_CANCELLED,
        _ => EXIT_JOB_FAILED,
    })
}

async fn download_all(
    client: &Client,
    id: Uuid,
    names: &[String],
    out: &Path,
    json: bool,
) -> Result<u8> {
    let artifacts = download::list(client, id, names).await?;
    let total: u64 = artifacts
        .iter()
        .map(|a| u64::try_from(a.bytes).unwrap_or_default())
        .sum();
    let bar = if json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{bar:40.cyan/blue} {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let mut done = Vec::new();
    for artifact in &artifacts {
        bar.set_message(artifact.name.clone());
        let file = download::download(client, id, artifact, out, &|n| bar.inc(n)).await?;
        if !json {
            bar.println(format!(
                "{}  {} bytes  sha256 {} verified{}",
                file.path.display(),
                file.bytes,
                file.sha256,
                if file.resumed_from > 0 {
                    format!(" (resumed at byte {})", file.resumed_from)
                } else {
                    String::new()
                }
            ));
        }
        done.push(file);
    }
    bar.finish_and_clear();
    if json {
        println!("{}", json!({ "job": id, "downloaded": done }));
    }
    Ok(0)
}

fn print_record(record: &Value, json: bool, kind: &str) {
    if json {
        println!("{record}");
        return;
    }
    let text = |key: &str| record[key].as_str().unwrap_or_default().to_owned();
    println!("registered {kind} {} ({})", text("id"), text("name"));
}

fn print_job(job: &Value, json: bool) {
    if json {
        println!("{job}");
        return;
    }
    let text = |key: &str| job[key].as_str().unwrap_or_default().to_owned();
    println!("job {} ({}): {}", text("id"), text("name"), text("status"));
    if let Some(fraction) = job["progress"]["fraction"].as_f64() {
        if text("status") == "running" {
            println!("  progress {:.0}%", fraction * 100.0);
        }
    }
    let result = &job["result"];
    if !result.is_null() {
        println!("  acceptance met: {}", result["acceptance_met"]);
        for (label, metrics) in result["metrics"].as_object().into_iter().flatten() {
            println!("  {label}: {metrics}");
        }
    }
    if let Some(message) = job["error"]["message"].as_str() {
        println!("  error: {message}");
    }
}

fn print_job_table(jobs: &Value) {
    println!("{:<36}  {:<10}  {:<25}  NAME", "ID", "STATUS", "CREATED");
    for job in jobs.as_array().into_iter().flatten() {
        let text = |key: &str| job[key].as_str().unwrap_or_default().to_owned();
        println!(
            "{:<36}  {:<10}  {:<25}  {}",
            text("id"),
            text("status"),
            text("created_at"),
            text("name")
        );
    }
}

/// Prints a client error: the problem's fields one per line for people; with `--output json`
/// also the server's problem body on stdout.
fn report(error: &Error, json: bool) {
    eprintln!("compressd: {error}");
    match error {
        Error::ServerProblem { body, .. } => {
            for field in body["errors"].as_array().into_iter().flatten() {
                eprintln!(
                    "  {}: {}",
                    field["pointer"].as_str().unwrap_or("/"),
                    field["detail"].as_str().unwrap_or_default()
                );
            }
            if json {
                println!("{body}");
            }
        }
        Error::InvalidSpec(violations) => {
            for violation in violations {
                eprintln!("  {}: {}", violation.pointer, violation.message);
            }
        }
        _ => {}
    }
}
