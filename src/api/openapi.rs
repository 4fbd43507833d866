//! The OpenAPI 3.1 contract, generated from the handlers' annotations.
//!
//! `openapi.yaml` at the repository root is this document; a test fails when they differ
//! (regenerate with `cargo run -- openapi > openapi.yaml`).

use axum::Json;
use utoipa::OpenApi;

use super::artifacts::{ArtifactList, ArtifactView};
use super::datasets::{DatasetList, DatasetView};
use super::datasets_create::DatasetReference;
use super::error::{FieldError, Problem};
use super::events::EventList;
use super::health::Health;
use super::jobs::list::JobList;
use super::jobs::JobView;
use super::models::{ModelList, ModelView};
use super::models_create::ModelReference;
use crate::events::EventView;
use crate::store::{JobError, JobProgress, JobResult, JobStatus};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "compressd", description = "Compress transformer models: fine-tune, prune, quantize, distill. \
        Errors are RFC 9457 problem+json documents whose `type` is `urn:compressd:problem:<slug>` and whose \
        `pointer` names the offending request field."),
    paths(
        super::jobs::create::create_job,
        super::jobs::list::list_jobs,
        super::jobs::manage::get_job,
        super::jobs::manage::cancel_job,
        super::jobs::manage::delete_job,
        super::events::job_events,
        super::models_create::create_model,
        super::models::list_models,
        super::models::get_model,
        super::models::delete_model,
        super::datasets_create::create_dataset,
        super::datasets::list_datasets,
        super::datasets::get_dataset,
        super::datasets::delete_dataset,
        super::artifacts::list_artifacts,
        super::artifacts::download_artifact,
        super::health::healthz,
        super::health::readyz,
        super::metrics::metrics,
        openapi_json,
    ),
    components(schemas(ModelView, ModelList, ModelReference, DatasetView, DatasetList, DatasetReference, ArtifactView, ArtifactList,
        JobView, JobList, JobStatus, JobProgress, JobResult, JobError, Problem, FieldError, Health, EventList, EventView)),
    tags((name = "jobs", description = "Compression jobs"),
        (name = "models", description = "Registered models (upload or reference)"),
        (name = "datasets", description = "Registered datasets (upload or reference)"),
        (name = "artifacts", description = "What jobs produce, and downloads"), (name = "operations", description = "Probes, metrics, contract")),
)]
pub struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as YAML, as stored in `openapi.yaml`.
pub fn yaml() -> String {
    // The document is plain data; serializing it cannot fail.
    serde_yaml::to_string(&document()).expect("OpenAPI document serializes")
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
