//! The OpenAPI 3.1 contract, generated from the handlers' annotations.
//!
//! The job spec's schema is not annotated here: it is generated from the engine's Rust types and
//! its stage registry ([`Registry::job_spec_schema`]) and merged in as the `JobSpec` component
//! (with its parts beside it), the body of `POST /v1/jobs` and the `spec` of a job view.
//!
//! `openapi.yaml` at the repository root is this document; a test fails when they differ
//! (regenerate with `cargo run -- openapi > openapi.yaml`).

use axum::Json;
use compressd_engine::spec::Registry;
use serde_yaml::{Mapping, Value};
use utoipa::OpenApi;

#[cfg(test)]
mod noop_stage;
mod security;

use security::AccessDoc;
#[cfg(test)]
mod tests;

use super::artifacts::{ArtifactList, ArtifactView};
use super::audit::{AuditEntryView, AuditList};
use super::datasets::{DatasetList, DatasetView};
use super::datasets_create::DatasetReference;
use super::error::{FieldError, Problem};
use super::events::EventList;
use super::health::Health;
use super::jobs::list::JobList;
use super::jobs::JobView;
use super::models::{ModelList, ModelView};
use super::models_create::ModelReference;
use super::webhooks::{
    AttemptView, CreatedWebhook, DeliveryList, DeliveryView, NewWebhookRequest, WebhookList,
    WebhookView,
};
use crate::events::EventView;
use crate::store::{JobError, JobProgress, JobResult, JobStatus};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "compressd", description = "Compress transformer models: fine-tune, prune, quantize, distill. \
        Every /v1 route takes an API key (`Authorization: Bearer <key>`) once the server has keys; each \
        tenant sees only its own jobs, models, datasets and artifacts (another tenant's answer 404). \
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
        super::audit::list_audit,
        super::webhooks::create_webhook,
        super::webhooks::list_webhooks,
        super::webhooks::delete_webhook,
        super::webhooks::webhook_deliveries,
        super::webhooks::job_webhook_deliveries,
        super::health::healthz,
        super::health::readyz,
        super::metrics::metrics,
        super::ui::ui_index,
        super::ui::ui_asset,
        openapi_json,
    ),
    components(schemas(ModelView, ModelList, ModelReference, DatasetView, DatasetList, DatasetReference, ArtifactView, ArtifactList,
        JobView, JobList, JobStatus, JobProgress, JobResult, JobError, Problem, FieldError, Health, EventList, EventView,
        AuditList, AuditEntryView, NewWebhookRequest, WebhookView, CreatedWebhook, WebhookList,
        DeliveryView, AttemptView, DeliveryList)),
    modifiers(&AccessDoc),
    tags((name = "jobs", description = "Compression jobs"),
        (name = "models", description = "Registered models (upload or reference)"),
        (name = "datasets", description = "Registered datasets (upload or reference)"),
        (name = "artifacts", description = "What jobs produce, and downloads"),
        (name = "audit", description = "State-changing requests, for keys with the admin scope"),
        (name = "webhooks", description = "Signed notices of job events (Standard Webhooks), and their delivery logs"), (name = "operations", description = "Probes, metrics, contract")),
)]
pub struct ApiDoc;

/// Where the job spec schema's parts go in the document.
const SCHEMAS_PATH: &str = "/components/schemas";

/// The job spec's component name.
const JOB_SPEC: &str = "JobSpec";

/// The document, with the job spec schema of the engine's stage registry.
pub fn document() -> serde_json::Value {
    document_for(Registry::standard())
}

/// The document with the job spec schema of `registry` (a registry with an extra stage shows it).
pub fn document_for(registry: &Registry) -> serde_json::Value {
    // YAML values keep key order, JSON ones here do not; either serializes to the same JSON.
    serde_json::to_value(ordered_document(registry)).unwrap_or_default()
}

/// The document as YAML, as stored in `openapi.yaml`.
pub fn yaml() -> String {
    // The document is plain data; serializing it cannot fail.
    let yaml = serde_yaml::to_string(&ordered_document(Registry::standard()))
        .expect("OpenAPI document serializes");
    yaml.lines()
        .map(quote_sexagesimal)
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Quotes a plain scalar such as `2:4` (the 2:4 pruning pattern) at the end of a line: YAML 1.2
/// (serde_yaml) reads it as a string, but YAML 1.1 readers (PyYAML, SnakeYAML) read a base-60
/// integer.
fn quote_sexagesimal(line: &str) -> String {
    let Some((head, value)) = line.rsplit_once(' ') else {
        return line.to_owned();
    };
    let numeric_parts = value
        .split(':')
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if value.contains(':') && numeric_parts && (head.ends_with(':') || head.ends_with('-')) {
        format!("{head} '{value}'")
    } else {
        line.to_owned()
    }
}

/// The annotated document in utoipa's key order, with the job spec schema merged in.
fn ordered_document(registry: &Registry) -> Value {
    let mut document = serde_yaml::to_value(ApiDoc::openapi()).unwrap_or_default();
    let mut spec = registry.job_spec_schema(SCHEMAS_PATH);
    let parts = spec
        .as_object_mut()
        .and_then(|root| {
            root.remove("$schema");
            root.remove("components")
        })
        .and_then(|mut components| components.get_mut("schemas").map(serde_json::Value::take))
        .unwrap_or_default();
    let schemas = entry(entry(&mut document, "components"), "schemas");
    if let (Value::Mapping(schemas), serde_json::Value::Object(parts)) = (schemas, parts) {
        for (name, schema) in parts {
            schemas.insert(Value::from(name), yaml_of(schema));
        }
        schemas.insert(Value::from(JOB_SPEC), yaml_of(spec));
    }
    let reference = format!("#{SCHEMAS_PATH}/{JOB_SPEC}");
    let body = [
        "paths",
        "/v1/jobs",
        "post",
        "requestBody",
        "content",
        "application/json",
    ];
    if let Some(body) = walk(&mut document, &body) {
        body["schema"] = yaml_of(serde_json::json!({ "$ref": reference }));
    }
    if let Some(view) = walk(
        &mut document,
        &["components", "schemas", "JobView", "properties"],
    ) {
        view["spec"] = yaml_of(serde_json::json!({
            "$ref": reference,
            "description": "The spec as accepted, with every default filled in."
        }));
    }
    add_links(&mut document);
    add_webhook_links(&mut document);
    document
}

/// Links from a created webhook to its delete and delivery log, and from a created job to its
/// webhook deliveries.
fn add_webhook_links(document: &mut Value) {
    let link = |operation: &str, description: &str| {
        yaml_of(serde_json::json!({
            "operationId": operation,
            "parameters": { "id": "$response.body#/id" },
            "description": description,
        }))
    };
    let path = ["paths", "/v1/webhooks", "post", "responses", "201"];
    if let Some(response) = walk(document, &path) {
        let links = entry(response, "links");
        links["DeleteWebhook"] = link("delete_webhook", "Stop sending to this webhook");
        links["WebhookDeliveries"] = link("webhook_deliveries", "The webhook's delivery log");
    }
    for status in ["201", "200"] {
        let path = ["paths", "/v1/jobs", "post", "responses", status];
        if let Some(response) = walk(document, &path) {
            entry(response, "links")["JobWebhookDeliveries"] =
                link("job_webhook_deliveries", "The job's webhook delivery log");
        }
    }
}

/// OpenAPI links from a created job, model or dataset to the operations on it, so generated
/// clients and tools (Schemathesis' stateful phase) can follow them. Added here rather than with
/// utoipa's `links(...)`, which writes `operation_id` where OpenAPI says `operationId`.
fn add_links(document: &mut Value) {
    let link = |operation: &str, description: &str| {
        serde_json::json!({
            "operationId": operation,
            "parameters": { "id": "$response.body#/id" },
            "description": description,
        })
    };
    let created = [
        (
            "/v1/jobs",
            serde_json::json!({
                "GetJob": link("get_job", "The job, with its progress and result"),
                "CancelJob": link("cancel_job", "Ask the job to stop"),
                "DeleteJob": link("delete_job", "Remove the finished job and its artifacts"),
                "JobEvents": link("job_events", "Follow the job's events"),
            }),
        ),
        (
            "/v1/models",
            serde_json::json!({
                "GetModel": link("get_model", "The registered model"),
                "DeleteModel": link("delete_model", "Remove the model and its files"),
            }),
        ),
        (
            "/v1/datasets",
            serde_json::json!({
                "GetDataset": link("get_dataset", "The registered dataset"),
                "DeleteDataset": link("delete_dataset", "Remove the dataset and its file"),
            }),
        ),
    ];
    for (route, links) in created {
        let links = yaml_of(links);
        for status in ["201", "200"] {
            let path = ["paths", route, "post", "responses", status];
            if let Some(response) = walk(document, &path) {
                response["links"] = links.clone();
            }
        }
    }
}

/// The mapping under `key` in `value`, made (and `value` made a mapping) where missing.
fn entry<'a>(value: &'a mut Value, key: &str) -> &'a mut Value {
    if !value.is_mapping() {
        *value = Value::Mapping(Mapping::new());
    }
    match value {
        Value::Mapping(map) => map
            .entry(Value::from(key))
            .or_insert_with(|| Value::Mapping(Mapping::new())),
        other => other,
    }
}

/// The mapping at `path`, if every step exists and is a mapping.
fn walk<'a>(value: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    let mut at = value;
    for key in path {
        at = at.get_mut(*key)?;
    }
    at.is_mapping().then_some(at)
}

fn yaml_of(json: serde_json::Value) -> Value {
    serde_yaml::to_value(json).unwrap_or_default()
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
pub async fn openapi_json() -> Json<serde_json::Value> {
    // Built once: the document is a function of the code, and building it walks every schema.
    static DOCUMENT: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(document);
    Json(DOCUMENT.clone())
}
