//! `POST /v1/datasets`: register a dataset by multipart upload — optional `name`, `format`
//! (`jsonl|csv|text`, else inferred from the filename), `text_field`, `label_field` and `strict`
//! parts, sent *before* the one `file` part so the file can be checked while it streams — or by
//! JSON reference (`{"uri": "file://…" | "s3://…" | "hf://datasets/…", …same options}`).

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::{Extension, Json};
use bytes::Bytes;
use chrono::SubsecRound;
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::datasets::DatasetView;
use super::models_create::{
    about_uri, body_kind, read_json, resolve_reference, text_part, BodyKind,
};
use crate::api::access::check_storage_quota;
use crate::api::error::{ApiError, Problem};
use crate::api::state::AppState;
use crate::artifacts::ingest::{ingest, Budget, PendingPrefix};
use crate::artifacts::sources::InputKind;
use crate::auth::Caller;
use crate::error::{Error, Result};
use crate::inputs::model::check_file_name;
use crate::inputs::{DatasetFormat, DatasetInspector, DatasetOptions, DatasetSummary, Rejection};
use crate::store::Dataset;

/// A registration by reference, with the same options as an upload.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetReference {
    /// Display name; defaults to the file name.
    pub name: Option<String>,
    /// One file: `file:///…` (under `allowed_file_roots`), `s3://bucket/key`, or on the Hugging
    /// Face Hub `hf://datasets/org/name[@revision][/path]` (a dataset repository; `hf://org/name/…`
    /// reads a model repository). `path` names the file, or a folder holding exactly one
    /// `.jsonl`, `.csv` or `.txt` file; without it the repository must hold exactly one.
    #[serde(default)]
    pub uri: String,
    /// `jsonl`, `csv` or `text`; inferred from the file name when absent.
    #[schema(value_type = Option<String>)]
    pub format: Option<DatasetFormat>,
    /// Field holding the text (default `text`).
    pub text_field: Option<String>,
    /// Field holding the label (default `label`).
    pub label_field: Option<String>,
    /// Refuse the file at the first bad row (default), or skip and report bad rows.
    pub strict: Option<bool>,
}

/// Register a dataset: upload it, or point at it.
#[utoipa::path(post, path = "/v1/datasets", tag = "datasets",
    request_body(content = DatasetReference, description = "A JSON reference, or `multipart/form-data` with optional `name`, `format`, `text_field`, `label_field`, `strict` parts followed by one `file` part"),
    responses(
        (status = 201, description = "Registered", body = DatasetView),
        (status = 400, description = "Broken upload or malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over dataset_upload_max_bytes", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "The tenant's storage quota (`tenant_max_stored_bytes`) is used up", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Neither multipart/form-data nor JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The dataset failed validation, or the reference names nothing usable (`pointer` is `/uri`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The Hugging Face Hub failed or could not be reached (`pointer` is `/uri`)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_dataset(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> std::result::Result<(StatusCode, HeaderMap, Json<DatasetView>), ApiError> {
    check_storage_quota(&state, &caller.tenant, 0).await?;
    let id = state.clock.new_id();
    let pending = PendingPrefix::new(state.artifacts.clone(), format!("datasets/{id}/"));
    let received = match body_kind(&request)? {
        BodyKind::Multipart => {
            let multipart = Multipart::from_request(request, &state)
                .await
                .map_err(|e| ApiError::bad_request("bad-upload", e.body_text()))?;
            read_upload(&state, id, multipart)
                .await
                .map_err(ApiError::from)
        }
        BodyKind::Json => {
            let reference: DatasetReference =
                read_json(request, state.config.json_body_limit_bytes).await?;
            read_reference(&state, id, reference).await
        }
    };
    let dataset = match received {
        Ok(received) => commit(&state, &caller.tenant, id, received)
            .await
            .map_err(ApiError::from),
        Err(error) => Err(error),
    };
    let dataset = match dataset {
        Ok(dataset) => dataset,
        Err(error) => {
            pending.discard().await;
            return Err(error);
        }
    };
    pending.keep();
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/datasets/{id}")) {
        headers.insert(LOCATION, location);
    }
    Ok((StatusCode::CREATED, headers, Json(dataset.into())))
}

/// A checked and stored dataset file, not yet recorded.
struct Received {
    request: DatasetReference,
    key: String,
    file_name: String,
    summary: DatasetSummary,
    /// The commit an `hf://` reference resolved to.
    source_revision: Option<String>,
}

async fn read_upload(state: &AppState, id: Uuid, mut multipart: Multipart) -> Result<Received> {
    let mut request = DatasetReference {
        uri: "upload".into(),
        ..DatasetReference::default()
    };
    let mut received = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| Error::BadUpload(e.body_text()))?
    {
        let part = field.name().unwrap_or_default().to_owned();
        if received.is_some() {
            return Err(Rejection::new(
                "invalid-upload",
                format!("part `{part}` came after the one `file` part"),
            )
            .into());
        }
        match part.as_str() {
            "file" => {
                let file_name = field.file_name().unwrap_or("dataset").to_owned();
                received = Some(store_file(state, id, &file_name, field, &request).await?);
            }
            "name" => request.name = Some(text_part(field).await?),
            "format" => request.format = Some(text_part(field).await?.parse()?),
            "text_field" => request.text_field = Some(text_part(field).await?),
            "label_field" => request.label_field = Some(text_part(field).await?),
            "strict" => request.strict = Some(parse_bool(&text_part(field).await?)?),
            other => {
                return Err(Rejection::new(
                    "invalid-upload",
                    format!("unexpected part `{other}`: send name, format, text_field, label_field, strict, then file"),
                )
                .into())
            }
        }
    }
    let (key, file_name, summary) =
        received.ok_or_else(|| Rejection::new("invalid-upload", "no `file` part was sent"))?;
    Ok(Received {
        request,
        key,
        file_name,
        summary,
        source_revision: None,
    })
}

fn parse_bool(raw: &str) -> Result<bool> {
    match raw.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(Rejection::new(
            "invalid-upload",
            format!("strict must be true or false, got `{other}`"),
        )
        .into()),
    }
}

async fn read_reference(
    state: &AppState,
    id: Uuid,
    request: DatasetReference,
) -> std::result::Result<Received, ApiError> {
    let files = resolve_reference(state, &request.uri, InputKind::Dataset)
        .await
        .map_err(about_uri)?;
    let [file] = files.as_slice() else {
        let many = Rejection::new(
            "invalid-dataset",
            format!(
                "{} holds {} files; a dataset is one file",
                request.uri,
                files.len()
            ),
        );
        return Err(about_uri(many.into()));
    };
    let limit = state.config.inputs.dataset_upload_max_bytes;
    // Refuse before downloading when the source already says the file is too large.
    if file.size.is_some_and(|bytes| bytes > limit) {
        let what = "dataset upload";
        return Err(Error::TooLarge { what, limit }.into());
    }
    let file_name = file
        .name
        .rsplit('/')
        .next()
        .unwrap_or(&file.name)
        .to_owned();
    let source_revision = file.revision().map(str::to_owned);
    let source = file.open().await.map_err(about_uri)?;
    let (key, file_name, summary) = store_file(state, id, &file_name, source, &request).await?;
    Ok(Received {
        request,
        key,
        file_name,
        summary,
        source_revision,
    })
}

/// Streams the dataset file into `datasets/{id}/` through the dataset inspector.
async fn store_file<S, E>(
    state: &AppState,
    id: Uuid,
    file_name: &str,
    source: S,
    request: &DatasetReference,
) -> Result<(String, String, DatasetSummary)>
where
    S: Stream<Item = std::result::Result<Bytes, E>>,
    E: std::fmt::Display,
{
    check_file_name(file_name)?;
    let format = request
        .format
        .or_else(|| DatasetFormat::from_file_name(file_name))
        .ok_or_else(|| {
            Rejection::new(
                "invalid-format",
                format!(
                    "cannot tell the format of `{file_name}`: send `format` (jsonl, csv or text)"
                ),
            )
        })?;
    let defaults = DatasetOptions::new(format);
    let options = DatasetOptions {
        text_field: request.text_field.clone().unwrap_or(defaults.text_field),
        label_field: request.label_field.clone().unwrap_or(defaults.label_field),
        strict: request.strict.unwrap_or(true),
        format,
    };
    let mut inspector = DatasetInspector::new(options);
    let mut budget = Budget::new(
        "dataset upload",
        state.config.inputs.dataset_upload_max_bytes,
    );
    let key = format!("datasets/{id}/{file_name}");
    ingest(&state.artifacts, &key, source, &mut budget, |chunk| {
        inspector.feed(chunk)
    })
    .await?;
    Ok((key, file_name.to_owned(), inspector.finish()?))
}

async fn commit(state: &AppState, tenant: &str, id: Uuid, received: Received) -> Result<Dataset> {
    let Received {
        request,
        key,
        file_name,
        summary,
        source_revision,
    } = received;
    let format = summary.format.as_str().to_owned();
    let defaults = DatasetOptions::new(summary.format);
    check_storage_quota(state, tenant, summary.bytes).await?;
    let dataset = Dataset {
        id,
        tenant: tenant.to_owned(),
        name: request
            .name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or(file_name),
        format,
        uri: key,
        bytes: i64::try_from(summary.bytes).unwrap_or(i64::MAX),
        sha256: summary.sha256.clone(),
        rows: i64::try_from(summary.rows).unwrap_or(i64::MAX),
        metadata: json!({
            "label_counts": summary.label_counts,
            "splits": summary.splits,
            "rejected": summary.rejected,
            "rejected_rows": summary.rejected_rows,
            "text_field": request.text_field.unwrap_or(defaults.text_field),
            "label_field": request.label_field.unwrap_or(defaults.label_field),
            "source": request.uri,
            "source_revision": source_revision,
        }),
        // Both databases keep microseconds; answer with what a later GET will read back.
        created_at: state.clock.now().trunc_subsecs(6),
    };
    state.store.insert_dataset(&dataset).await?;
    tracing::info!(dataset.id = %id, rows = dataset.rows, "dataset registered");
    Ok(dataset)
}
