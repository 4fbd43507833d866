//! A job spec file for `jobs create -f`: YAML (`.yaml`, `.yml`) or JSON, whose `model` and
//! `task.dataset` may be registered ids, `file://`/`s3://`/`hf://` URIs (registered by reference
//! first) or local paths (uploaded first; relative paths are relative to the spec file's folder).

use std::path::Path;

use serde_json::Value;
use uuid::Uuid;

use super::upload::{self, DatasetOptions};
use super::Client;
use crate::error::{Error, Result};
use compressd_engine::spec::Violation;

/// Reads a spec file as JSON; a YAML file is converted.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read, [`Error::InvalidSpec`] (at `/`) when it does not
/// parse.
pub fn read_spec_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let is_yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    let parsed: std::result::Result<Value, String> = if is_yaml {
        serde_yaml::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    };
    let spec = parsed.map_err(|message| {
        Error::InvalidSpec(vec![Violation {
            pointer: String::new(),
            message: format!(
                "{} is not valid {}: {message}",
                path.display(),
                if is_yaml { "YAML" } else { "JSON" }
            ),
        }])
    })?;
    if !spec.is_object() {
        return Err(Error::InvalidSpec(vec![Violation {
            pointer: String::new(),
            message: format!("{} must hold one object (the job spec)", path.display()),
        }]));
    }
    Ok(spec)
}

/// What a spec's input field names.
#[derive(Debug, PartialEq, Eq)]
enum InputRef<'a> {
    Id,
    Uri(&'a str),
    Path(&'a str),
}

fn classify(value: &str) -> InputRef<'_> {
    if Uuid::parse_str(value).is_ok() {
        InputRef::Id
    } else if upload::is_uri(value) {
        InputRef::Uri(value)
    } else {
        InputRef::Path(value)
    }
}

/// Replaces a local path or URI in `/model` and `/task/dataset` by the id of the model or dataset
/// it registers; `announce` is told of each registration.
///
/// # Errors
/// [`Error::InvalidSpec`] naming the field when a path does not exist; the server's refusal of the
/// input otherwise.
pub async fn register_inputs(
    client: &Client,
    spec: &mut Value,
    base_dir: &Path,
    announce: &mut dyn FnMut(&str, &Value),
) -> Result<()> {
    for pointer in ["/model", "/task/dataset"] {
        let Some(Value::String(value)) = spec.pointer(pointer) else {
            continue; // a missing or mistyped field is the server's to name
        };
        let source = match classify(value) {
            InputRef::Id => continue,
            InputRef::Uri(uri) => uri.to_owned(),
            InputRef::Path(path) => {
                let resolved = base_dir.join(path);
                if !resolved.exists() {
                    return Err(Error::InvalidSpec(vec![Violation {
                        pointer: pointer.to_owned(),
                        message: format!(
                            "`{path}` is not an id, a file://, s3:// or hf:// URI, or an existing path ({} does not exist)",
                            resolved.display()
                        ),
                    }]));
                }
                resolved.to_string_lossy().into_owned()
            }
        };
        let record = if pointer == "/model" {
            upload::add_model(client, &source, None).await?
        } else {
            upload::add_dataset(client, &source, None, &DatasetOptions::default()).await?
        };
        announce(pointer, &record);
        let id = record["id"].clone();
        if let Some(field) = spec.pointer_mut(pointer) {
            *field = id;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_uris_and_paths_are_told_apart() {
        assert_eq!(
            classify("0192f0a0-0000-7000-8000-000000000000"),
            InputRef::Id
        );
        assert_eq!(classify("hf://org/name"), InputRef::Uri("hf://org/name"));
        assert_eq!(classify("./model"), InputRef::Path("./model"));
    }

    #[test]
    fn yaml_and_json_specs_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("job.yaml");
        std::fs::write(
            &yaml,
            "name: a\npipeline:\n  - type: finetune\n    epochs: 1\n",
        )
        .unwrap();
        let json = dir.path().join("job.json");
        std::fs::write(
            &json,
            r#"{"name": "a", "pipeline": [{"type": "finetune", "epochs": 1}]}"#,
        )
        .unwrap();
        assert_eq!(
            read_spec_file(&yaml).unwrap(),
            read_spec_file(&json).unwrap()
        );
    }

    #[test]
    fn a_broken_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("job.json");
        std::fs::write(&json, "{\"name\": ").unwrap();
        let err = read_spec_file(&json).unwrap_err().to_string();
        assert!(err.contains("job.json is not valid JSON"), "{err}");
        std::fs::write(&json, "[1]").unwrap();
        let err = read_spec_file(&json).unwrap_err().to_string();
        assert!(err.contains("must hold one object"), "{err}");
    }
}
