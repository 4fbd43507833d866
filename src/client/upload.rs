//! `models add` and `datasets add`: register a local folder or file by streaming upload, or a
//! `file://`, `s3://` or `hf://` URI by reference. A local model folder sends the same files an
//! `hf://` reference would bring (weights, config, tokenizer; never PyTorch or ONNX copies).

use std::path::{Path, PathBuf};

use reqwest::multipart::{Form, Part};
use reqwest::{Body, Method};
use serde_json::{json, Value};

use super::Client;
use crate::artifacts::sources::{self, InputKind, RepoFile};
use crate::error::{Error, Result};

/// Deepest folder level of a local model folder that is listed (a model folder is flat; this
/// only bounds a mistaken `models add /`).
const MAX_DEPTH: usize = 3;

/// Dataset registration options (multipart parts, or fields of a JSON reference).
#[derive(Debug, Default, Clone)]
pub struct DatasetOptions {
    /// `jsonl`, `csv` or `text`; else from the file extension.
    pub format: Option<String>,
    /// The text column.
    pub text_field: Option<String>,
    /// The label column.
    pub label_field: Option<String>,
    /// `false` skips bad rows instead of refusing the file.
    pub strict: Option<bool>,
}

/// Whether `source` is a URI the server resolves itself rather than a local path.
pub fn is_uri(source: &str) -> bool {
    ["file://", "s3://", "hf://"]
        .iter()
        .any(|scheme| source.starts_with(scheme))
}

/// Registers a model from a local folder (or `.gguf` file) or a URI; returns the server's record.
///
/// # Errors
/// [`Error::Io`] for an unreadable path, [`Error::Rejected`] when the folder holds no model, and
/// the server's answer ([`Error::ServerProblem`]) when it refuses the model.
pub async fn add_model(client: &Client, source: &str, name: Option<&str>) -> Result<Value> {
    if is_uri(source) {
        let body = json!({ "uri": source, "name": name });
        return client.call(Method::POST, "/v1/models", Some(&body)).await;
    }
    let path = Path::new(source);
    let files = model_files(path)?;
    let mut form = Form::new();
    if let Some(name) = name {
        form = form.text("name", name.to_owned());
    }
    for (file_name, file_path) in files {
        form = form.part("file", file_part(&file_path, &file_name).await?);
    }
    upload(client, "/v1/models", form).await
}

/// Registers a dataset from a local file or a URI; returns the server's record.
///
/// # Errors
/// As [`add_model`].
pub async fn add_dataset(
    client: &Client,
    source: &str,
    name: Option<&str>,
    options: &DatasetOptions,
) -> Result<Value> {
    if is_uri(source) {
        let mut body = json!({ "uri": source, "name": name });
        for (key, value) in option_pairs(options) {
            body[key] = if key == "strict" {
                Value::Bool(value == "true")
            } else {
                Value::String(value)
            };
        }
        return client.call(Method::POST, "/v1/datasets", Some(&body)).await;
    }
    let path = Path::new(source);
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| not_found(path))?
        .to_owned();
    // The server reads options before the file part.
    let mut form = Form::new();
    if let Some(name) = name {
        form = form.text("name", name.to_owned());
    }
    for (key, value) in option_pairs(options) {
        form = form.text(key, value);
    }
    form = form.part("file", file_part(path, &file_name).await?);
    upload(client, "/v1/datasets", form).await
}

fn option_pairs(options: &DatasetOptions) -> Vec<(&'static str, String)> {
    [
        ("format", options.format.clone()),
        ("text_field", options.text_field.clone()),
        ("label_field", options.label_field.clone()),
        ("strict", options.strict.map(|s| s.to_string())),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.map(|v| (key, v)))
    .collect()
}

async fn upload(client: &Client, path: &str, form: Form) -> Result<Value> {
    let response = client
        .send(client.request(Method::POST, path).multipart(form))
        .await?;
    response.json().await.map_err(|e| client.unreachable(&e))
}

/// A streamed file part: the file is never held in memory.
async fn file_part(path: &Path, file_name: &str) -> Result<Part> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io(path, e))?;
    let len = file.metadata().await.map_err(|e| Error::io(path, e))?.len();
    let body = Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
    Ok(Part::stream_with_length(body, len).file_name(file_name.to_owned()))
}

/// The files of a local model to upload, as (name in the model folder, local path).
fn model_files(path: &Path) -> Result<Vec<(String, PathBuf)>> {
    let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let (folder, chosen) = if metadata.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let folder = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
        (folder, name)
    };
    let mut listing = Vec::new();
    list_files(&folder, "", 0, &mut listing)?;
    let shown = path.display().to_string();
    let selected = sources::select(&listing, chosen.as_deref(), InputKind::Model, &shown)?;
    Ok(selected
        .into_iter()
        .map(|file| (file.name, folder.join(&file.path)))
        .collect())
}

fn list_files(folder: &Path, prefix: &str, depth: usize, out: &mut Vec<RepoFile>) -> Result<()> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let path = entry.path();
        let relative = format!("{prefix}{name}");
        // Follows symlinks, as a Hugging Face cache snapshot is made of them.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        if metadata.is_dir() && depth < MAX_DEPTH && !name.starts_with('.') {
            list_files(&path, &format!("{relative}/"), depth + 1, out)?;
        } else if metadata.is_file() {
            out.push(RepoFile {
                path: relative,
                size: Some(metadata.len()),
            });
        }
    }
    Ok(())
}

fn not_found(path: &Path) -> Error {
    Error::io(
        path,
        std::io::Error::new(std::io::ErrorKind::NotFound, "not a file"),
    )
}
