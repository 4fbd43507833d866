//! The registered models a job's stages name besides its input model (a `distill` stage's
//! `teacher` and `student`), checked at submission like the job's `model`: a registered id of
//! the caller's tenant, the input model's tokenizer, for a teacher of a classification task the
//! dataset's labels, a student smaller than its teacher, and the layer counts the stage names.
//!
//! What the records do not tell (a model registered before its layer count was recorded, files
//! the store cannot read) is left to the engine, which checks the same when it loads the models.

use std::collections::BTreeSet;
use std::path::PathBuf;

use compressd_engine::spec::{DistillSpec, JobSpec, TaskType};
use futures::TryStreamExt;
use uuid::Uuid;

use crate::api::error::ApiError;
use crate::api::state::AppState;
use crate::auth::Caller;
use crate::store::{Dataset, Model};

/// Largest `config.json` or `tokenizer.json` read at submission.
const MAX_FILE_BYTES: usize = 32 << 20;

/// Checks every named model of `spec`, the job's `input` model and `dataset` being resolved.
///
/// # Errors
/// A 422 naming the stage's field (`/pipeline/1/teacher`), or a store error.
pub async fn check(
    state: &AppState,
    caller: &Caller,
    spec: &JobSpec,
    input: &Model,
    dataset: &Dataset,
) -> Result<(), ApiError> {
    for (index, stage) in spec.pipeline.iter().enumerate() {
        let Some(distill) = stage.get::<DistillSpec>() else {
            continue;
        };
        let at = format!("/pipeline/{index}");
        let teacher = match &distill.teacher {
            Some(id) => Some(resolve(state, caller, id, &format!("{at}/teacher")).await?),
            None => None,
        };
        let student = match &distill.student {
            Some(id) => Some(resolve(state, caller, id, &format!("{at}/student")).await?),
            None => None,
        };
        for (field, model) in [("teacher", &teacher), ("student", &student)] {
            if let Some(model) = model {
                check_tokenizer(state, input, model, &format!("{at}/{field}")).await?;
            }
        }
        if let Some(teacher) = &teacher {
            if spec.task.task_type == TaskType::TextClassification {
                check_labels(state, spec, dataset, teacher, &format!("{at}/teacher")).await?;
            }
        }
        // Without a named teacher, the input model is the best record of it at submission.
        let teacher_record = teacher.as_ref().unwrap_or(input);
        if let Some(student) = &student {
            if let (Some(ours), Some(theirs)) = (parameters(student), parameters(teacher_record)) {
                if ours >= theirs {
                    return Err(ApiError::invalid_field(
                        format!("{at}/student"),
                        format!(
                            "model {} has {ours} parameters, not fewer than the teacher's {theirs}",
                            student.id
                        ),
                    ));
                }
            }
        }
        if teacher.is_some() || student.is_some() {
            let student_layers = student.as_ref().and_then(layers);
            if let Some(teacher_layers) = layers(teacher_record) {
                if let Some((field, message)) =
                    distill.check_against_teacher(teacher_layers, student_layers)
                {
                    return Err(ApiError::invalid_field(format!("{at}/{field}"), message));
                }
            }
        }
    }
    Ok(())
}

/// The caller's registered model `id`, or a 422 at `pointer`.
async fn resolve(
    state: &AppState,
    caller: &Caller,
    id: &str,
    pointer: &str,
) -> Result<Model, ApiError> {
    let uuid = Uuid::parse_str(id).map_err(|_| {
        ApiError::invalid_field(pointer, format!("`{id}` is not a model id (a UUID)"))
    })?;
    // Another tenant's model is as unknown as one never registered.
    let model = state.store.get_model(uuid).await?;
    model
        .filter(|m| m.tenant == caller.tenant)
        .ok_or_else(|| ApiError::invalid_field(pointer, format!("model {uuid} is not registered")))
}

fn parameters(model: &Model) -> Option<u64> {
    model.metadata.get("parameters")?.as_u64()
}

fn layers(model: &Model) -> Option<usize> {
    model.metadata.get("layers")?.as_u64().map(|l| l as usize)
}

/// The sha256 of a model's file as recorded at registration.
fn file_sha256<'a>(model: &'a Model, name: &str) -> Option<&'a str> {
    model
        .metadata
        .get("files")?
        .as_array()?
        .iter()
        .find(|f| f.get("name").and_then(|n| n.as_str()) == Some(name))?
        .get("sha256")?
        .as_str()
}

/// The data is tokenized once, with the input model's tokenizer: a named model must read the
/// same tokens as the same ids. Identical files pass at once; others are compared by vocabulary.
async fn check_tokenizer(
    state: &AppState,
    input: &Model,
    named: &Model,
    pointer: &str,
) -> Result<(), ApiError> {
    const NAME: &str = "tokenizer.json";
    if let (Some(a), Some(b)) = (file_sha256(input, NAME), file_sha256(named, NAME)) {
        if a == b {
            return Ok(());
        }
    }
    let (Some(ours), Some(theirs)) = (
        read_file(state, input, NAME).await,
        read_file(state, named, NAME).await,
    ) else {
        return Ok(());
    };
    let vocabulary = |bytes: &[u8]| {
        tokenizers::Tokenizer::from_bytes(bytes)
            .ok()
            .map(|t| t.get_vocab(true))
    };
    if vocabulary(&ours) != vocabulary(&theirs) {
        return Err(ApiError::invalid_field(
            pointer,
            format!(
                "model {} has another tokenizer than the job's model {}: the data is tokenized \
                 once, for teacher and student alike",
                named.id, input.id
            ),
        ));
    }
    Ok(())
}

/// A teacher of a classification task must predict the dataset's classes (its `id2label`).
async fn check_labels(
    state: &AppState,
    spec: &JobSpec,
    dataset: &Dataset,
    teacher: &Model,
    pointer: &str,
) -> Result<(), ApiError> {
    // The dataset's recorded label counts are for its own label field.
    let recorded_field = dataset.metadata.get("label_field").and_then(|f| f.as_str());
    if recorded_field.is_some() && recorded_field != spec.task.label_field.as_deref() {
        return Ok(());
    }
    let Some(counts) = dataset
        .metadata
        .get("label_counts")
        .and_then(|c| c.as_object())
    else {
        return Ok(());
    };
    let wanted: BTreeSet<&str> = counts.keys().map(String::as_str).collect();
    let Some(config) = read_file(state, teacher, "config.json")
        .await
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
    else {
        return Ok(());
    };
    let labels: BTreeSet<&str> = config
        .get("id2label")
        .and_then(|m| m.as_object())
        .map(|m| m.values().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if labels != wanted {
        return Err(ApiError::invalid_field(
            pointer,
            format!(
                "model {} predicts the labels {labels:?}, not the dataset's {wanted:?}",
                teacher.id
            ),
        ));
    }
    Ok(())
}

/// A small file of a registered model, `None` when it cannot be read (the engine then decides).
async fn read_file(state: &AppState, model: &Model, name: &str) -> Option<Vec<u8>> {
    if let Some(folder) = local_folder(&model.uri) {
        let bytes = tokio::fs::read(folder.join(name)).await.ok()?;
        return (bytes.len() <= MAX_FILE_BYTES).then_some(bytes);
    }
    let key = format!("{}/{name}", model.uri.trim_end_matches('/'));
    let mut stream = state.artifacts.read(&key, None).await.ok()?;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.try_next().await.ok()? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_FILE_BYTES {
            return None;
        }
    }
    Some(bytes)
}

/// The folder of a model recorded as a `file://` URL or an absolute path (older rows).
fn local_folder(uri: &str) -> Option<PathBuf> {
    if let Ok(url) = url::Url::parse(uri) {
        return (url.scheme() == "file")
            .then(|| url.to_file_path().ok())
            .flatten();
    }
    let path = PathBuf::from(uri);
    path.is_absolute().then_some(path)
}
