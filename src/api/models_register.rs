//! One model registration in progress: files are streamed into `models/{id}/` in the artifact
//! store through the model inspector, then the record is committed — or everything written is
//! removed. Shared by uploads and references (`models_create.rs`).

use std::fmt::Display;

use bytes::Bytes;
use chrono::SubsecRound;
use futures::Stream;
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::api::access::check_storage_quota;
use crate::api::state::AppState;
use crate::artifacts::ingest::{ingest, Budget, PendingPrefix};
use crate::artifacts::ArtifactStore;
use crate::error::{Error, Result};
use crate::inputs::model::FileRecord;
use crate::inputs::ModelInspector;
use crate::store::Model;

/// A model whose files are being received.
pub(crate) struct ModelRegistration {
    store: ArtifactStore,
    id: Uuid,
    /// `models/{id}/`, the record's `uri`.
    prefix: String,
    pending: PendingPrefix,
    inspector: ModelInspector,
    budget: Budget,
}

impl ModelRegistration {
    /// Starts a registration with a fresh id.
    pub(crate) fn new(state: &AppState) -> Self {
        let id = state.clock.new_id();
        let prefix = format!("models/{id}/");
        Self {
            store: state.artifacts.clone(),
            id,
            pending: PendingPrefix::new(state.artifacts.clone(), prefix.clone()),
            prefix,
            inspector: ModelInspector::new(),
            budget: Budget::new("model upload", state.config.inputs.model_upload_max_bytes),
        }
    }

    /// Streams one file of the model into the store, checking it on the way.
    ///
    /// # Errors
    /// A rejection of the file, [`Error::TooLarge`], a broken source, or a store failure.
    pub(crate) async fn add_file<S, E>(&mut self, name: &str, source: S) -> Result<FileRecord>
    where
        S: Stream<Item = std::result::Result<Bytes, E>>,
        E: Display,
    {
        self.inspector.start_file(name)?;
        let key = format!("{}{name}", self.prefix);
        let inspector = &mut self.inspector;
        ingest(&self.store, &key, source, &mut self.budget, |chunk| {
            inspector.feed(chunk)
        })
        .await?;
        // Parsing a tokenizer is CPU work: keep it off the async workers.
        let mut inspector = std::mem::take(&mut self.inspector);
        let (inspector, record) = tokio::task::spawn_blocking(move || {
            let record = inspector.end_file();
            (inspector, record)
        })
        .await
        .map_err(|e| Error::BadUpload(format!("checking {name} failed: {e}")))?;
        self.inspector = inspector;
        Ok(record?)
    }

    /// Runs the whole-model checks and records the model.
    ///
    /// # Errors
    /// A rejection from the cross-file checks, or the database's error; files are removed.
    pub(crate) async fn commit(
        self,
        state: &AppState,
        tenant: &str,
        name: Option<String>,
        source: String,
        source_revision: Option<String>,
    ) -> Result<Model> {
        let Self {
            id,
            prefix,
            pending,
            inspector,
            ..
        } = self;
        let summary = match inspector.finish() {
            Ok(summary) => summary,
            Err(rejection) => {
                pending.discard().await;
                return Err(rejection.into());
            }
        };
        let name = name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| default_name(&source, &summary.files));
        if let Err(error) = check_storage_quota(state, tenant, summary.bytes).await {
            pending.discard().await;
            return Err(error);
        }
        let model = Model {
            id,
            tenant: tenant.to_owned(),
            name,
            architecture: summary.architecture.as_str().to_owned(),
            format: summary.format.as_str().to_owned(),
            uri: prefix,
            bytes: i64::try_from(summary.bytes).unwrap_or(i64::MAX),
            sha256: manifest_sha256(&summary.files),
            metadata: json!({
                "parameters": summary.parameters, "layers": summary.layers, "files": summary.files,
                "linear_modules": summary.linear_modules,
                "source": source,
                "source_revision": source_revision,
            }),
            // Both databases keep microseconds; answer with what a later GET will read back.
            created_at: state.clock.now().trunc_subsecs(6),
        };
        if let Err(error) = state.store.insert_model(&model).await {
            pending.discard().await;
            return Err(error);
        }
        pending.keep();
        tracing::info!(model.id = %model.id, architecture = %model.architecture, bytes = model.bytes, "model registered");
        Ok(model)
    }

    /// Gives up: removes every file written so far.
    pub(crate) async fn abandon(self) {
        self.pending.discard().await;
    }
}

/// One digest for the whole model: sha256 of `name sha256` lines sorted by name.
fn manifest_sha256(files: &[FileRecord]) -> String {
    let mut lines: Vec<String> = files
        .iter()
        .map(|f| format!("{} {}\n", f.name, f.sha256))
        .collect();
    lines.sort();
    hex::encode(Sha256::digest(lines.concat().as_bytes()))
}

/// A name when the client gave none: the last part of the source URI, or the weights file's stem.
fn default_name(source: &str, files: &[FileRecord]) -> String {
    let from_source = source
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty() && source != "upload");
    let from_weights = files
        .iter()
        .find(|f| f.name.ends_with(".gguf") || f.name.ends_with(".safetensors"))
        .map(|f| {
            f.name
                .rsplit_once('.')
                .map_or(f.name.as_str(), |(stem, _)| stem)
        });
    from_source.or(from_weights).unwrap_or("model").to_owned()
}
