//! `POST /v1/models`: register a model by multipart upload (parts `file`, repeatable, and an
//! optional `name`) or by JSON reference (`{"name": …, "uri": "file://…" | "s3://…" | "hf://…"}`).
//! Nothing is answered before the files are checked; a refused model leaves no files behind.

use axum::extract::multipart::Field;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::{Extension, Json};
use futures::StreamExt;
use serde::Deserialize;

use super::models::ModelView;
use super::models_register::ModelRegistration;
use crate::api::access::check_storage_quota;
use crate::api::error::{ApiError, Problem};
use crate::api::state::AppState;
use crate::artifacts::sources::{self, InputKind, SourceConfig, SourceFile};
use crate::auth::Caller;
use crate::error::{Error, Result};
use crate::inputs::Rejection;

/// Longest value of a plain-text multipart part (`name`, `format`, …).
const MAX_TEXT_PART: usize = 1024;

/// A registration by reference.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelReference {
    /// Display name; defaults to the last part of the URI.
    pub name: Option<String>,
    /// Where the model folder is: `file:///…` (under `allowed_file_roots`), `s3://bucket/folder/`,
    /// or `hf://org/name[@revision][/path]` on the Hugging Face Hub (revision default `main`;
    /// `path` a sub-folder or one `.gguf` file). From a Hub repository only the weights
    /// (`*.safetensors` with their index, or the one `.gguf`) and the config and tokenizer files
    /// beside them are downloaded.
    pub uri: String,
}

/// Register a model: upload its files, or point at them.
#[utoipa::path(post, path = "/v1/models", tag = "models",
    request_body(content = ModelReference, description = "A JSON reference, or `multipart/form-data` with `file` parts (each filename its path in the model folder) and an optional `name` part"),
    responses(
        (status = 201, description = "Registered", body = ModelView),
        (status = 400, description = "Broken upload or malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over model_upload_max_bytes", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "The tenant's storage quota (`tenant_max_stored_bytes`) is used up", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Neither multipart/form-data nor JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The model failed validation, or the reference names nothing usable (`pointer` is `/uri`)", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The Hugging Face Hub failed or could not be reached (`pointer` is `/uri`)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_model(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> std::result::Result<(StatusCode, HeaderMap, Json<ModelView>), ApiError> {
    check_storage_quota(&state, &caller.tenant, 0).await?;
    let mut registration = ModelRegistration::new(&state);
    let received = match body_kind(&request)? {
        BodyKind::Multipart => {
            let multipart = Multipart::from_request(request, &state)
                .await
                .map_err(|e| ApiError::bad_request("bad-upload", e.body_text()))?;
            read_upload(&mut registration, multipart)
                .await
                .map(|name| (name, "upload".to_owned(), None))
                .map_err(ApiError::from)
        }
        BodyKind::Json => {
            let reference: ModelReference =
                read_json(request, state.config.json_body_limit_bytes).await?;
            let name = reference.name.or_else(|| hf_name(&reference.uri));
            read_reference(&state, &mut registration, &reference.uri)
                .await
                .map(|revision| (name, reference.uri, revision))
        }
    };
    let model = match received {
        Ok((name, source, revision)) => {
            registration
                .commit(&state, &caller.tenant, name, source, revision)
                .await?
        }
        Err(error) => {
            registration.abandon().await;
            return Err(error);
        }
    };
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/models/{}", model.id)) {
        headers.insert(LOCATION, location);
    }
    Ok((StatusCode::CREATED, headers, Json(model.into())))
}

/// The two request shapes a registration accepts.
pub(crate) enum BodyKind {
    Multipart,
    Json,
}

/// Tells uploads from references by `Content-Type`.
///
/// # Errors
/// 415 for any other content type.
pub(crate) fn body_kind(request: &Request) -> std::result::Result<BodyKind, ApiError> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "multipart/form-data" => Ok(BodyKind::Multipart),
        "application/json" => Ok(BodyKind::Json),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!("expected multipart/form-data or application/json, got `{content_type}`"),
        )),
    }
}

/// Reads a JSON body within the JSON size limit (upload routes lift axum's default limit).
///
/// # Errors
/// 413 over the limit, 400 for malformed JSON, 422 for unknown or missing fields.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request,
    limit: usize,
) -> std::result::Result<T, ApiError> {
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| ApiError::body_too_large(limit))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::malformed_json(e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let pointer = if path == "." {
            String::new()
        } else {
            format!("/{}", path.replace('.', "/"))
        };
        ApiError::invalid_request(pointer, e.inner().to_string())
    })
}

async fn read_upload(
    registration: &mut ModelRegistration,
    mut multipart: Multipart,
) -> Result<Option<String>> {
    let mut name = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| Error::BadUpload(e.body_text()))?
    {
        match field.name().unwrap_or_default() {
            "file" => {
                let file_name = field.file_name().map(str::to_owned).ok_or_else(|| {
                    Rejection::new(
                        "invalid-upload",
                        "every `file` part needs a filename (its path in the model folder)",
                    )
                })?;
                registration.add_file(&file_name, field).await?;
            }
            "name" => name = Some(text_part(field).await?),
            other => {
                return Err(Rejection::new(
                    "invalid-upload",
                    format!("unexpected part `{other}`: send `file` parts and an optional `name`"),
                )
                .into())
            }
        }
    }
    Ok(name)
}

/// The text of a small multipart part.
///
/// # Errors
/// A rejection when it is longer than [`MAX_TEXT_PART`] bytes or not UTF-8.
pub(crate) async fn text_part(mut field: Field<'_>) -> Result<String> {
    let part = field.name().unwrap_or_default().to_owned();
    let mut bytes = Vec::new();
    while let Some(chunk) = field.next().await {
        let chunk = chunk.map_err(|e| Error::BadUpload(e.body_text()))?;
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_TEXT_PART {
            return Err(Rejection::new(
                "invalid-upload",
                format!("part `{part}` is longer than {MAX_TEXT_PART} bytes"),
            )
            .into());
        }
    }
    String::from_utf8(bytes)
        .map_err(|_| Rejection::new("invalid-upload", format!("part `{part}` is not UTF-8")).into())
}

async fn read_reference(
    state: &AppState,
    registration: &mut ModelRegistration,
    uri: &str,
) -> std::result::Result<Option<String>, ApiError> {
    let files = resolve_reference(state, uri, InputKind::Model)
        .await
        .map_err(about_uri)?;
    let limit = state.config.inputs.model_upload_max_bytes;
    // Refuse before downloading when the source already says the model is too large.
    if files.iter().filter_map(|f| f.size).sum::<u64>() > limit {
        let what = "model upload";
        return Err(Error::TooLarge { what, limit }.into());
    }
    let revision = files.iter().find_map(|f| f.revision()).map(str::to_owned);
    for file in files {
        let stream = file.open().await.map_err(about_uri)?;
        registration.add_file(&file.name, stream).await?;
    }
    Ok(revision)
}

/// The default name of an `hf://` model: the repository's name without `@revision` (other
/// sources take the last part of their URI when the record is committed).
fn hf_name(uri: &str) -> Option<String> {
    let reference = sources::hf::parse(uri).ok()?;
    Some(reference.default_name())
}

/// The files a reference `uri` brings as a `kind` input.
///
/// # Errors
/// As [`sources::parse_reference`] and [`sources::list_files`].
pub(crate) async fn resolve_reference(
    state: &AppState,
    uri: &str,
    kind: InputKind,
) -> Result<Vec<SourceFile>> {
    let inputs = &state.config.inputs;
    let reference = sources::parse_reference(uri, &inputs.allowed_file_roots)?;
    sources::check_outside_artifacts(uri, &reference, &inputs.store)?;
    let config = SourceConfig {
        allowed_roots: &inputs.allowed_file_roots,
        store: &inputs.store,
        hf: &inputs.hf,
    };
    sources::list_files(&reference, &config, kind).await
}

/// An error in reaching what a reference names, pointing at the request's `uri` field (an
/// internal error keeps its generic answer).
pub(crate) fn about_uri(error: Error) -> ApiError {
    let error = ApiError::from(error);
    let status = error.status();
    if status.is_client_error() || status == StatusCode::BAD_GATEWAY {
        error.at_pointer("/uri")
    } else {
        error
    }
}
