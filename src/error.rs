//! The one error type of the compressd service crate.
//!
//! Store backends, settings and the CLI return it; the API turns it into problem+json in exactly one
//! place (`api::error`).

use std::path::PathBuf;

use compressd_engine::spec::Violation;

/// Everything that can go wrong in the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is missing, malformed or out of range.
    #[error("invalid setting `{setting}`: {message}")]
    Config {
        /// The setting, with its environment variable.
        setting: String,
        /// What is wrong with it.
        message: String,
    },

    /// A row looked up by id does not exist.
    #[error("{kind} {id} not found")]
    NotFound {
        /// `job`, `model`, `dataset`.
        kind: &'static str,
        /// The id asked for.
        id: String,
    },

    /// The job is in a state the action cannot start from (cancel a finished job, delete a running one).
    #[error("job {id} is {status}: cannot {action}")]
    JobState {
        /// The job.
        id: uuid::Uuid,
        /// Its current status.
        status: String,
        /// What was asked.
        action: &'static str,
    },

    /// An `Idempotency-Key` was reused with a different request body.
    #[error("idempotency key `{key}` was already used with a different request")]
    IdempotencyConflict {
        /// The reused key.
        key: String,
    },

    /// A row cannot be removed or written because of other rows (a model used by a running job,
    /// a duplicate name).
    #[error("{0}")]
    Conflict(String),

    /// A job spec failed validation; every problem carries its JSON pointer.
    #[error("invalid job spec: {}", .0.first().map(|v| format!("{}: {}", v.pointer, v.message)).unwrap_or_default())]
    InvalidSpec(Vec<Violation>),

    /// A command-line or request value is malformed (a scope, a tenant name); the message says
    /// which and why.
    #[error("{0}")]
    Invalid(String),

    /// A tenant quota is used up (`tenant_max_active_jobs`: 429, `tenant_max_stored_bytes`: 507).
    #[error("quota `{quota}` is {limit}; this tenant would use {used}")]
    Quota {
        /// The setting that sets the quota.
        quota: &'static str,
        /// Its value.
        limit: u64,
        /// The use the request would bring the tenant to.
        used: u64,
    },

    /// A pipeline stage has no engine yet.
    #[error("{0}")]
    NotImplemented(String),

    /// The compression engine failed while running a pipeline.
    #[error("engine: {0}")]
    Engine(#[from] compressd_engine::error::EngineError),

    /// A worker's write was refused because the job is no longer its attempt: the lease expired
    /// and the job was reclaimed, or it was cancelled and settled. The worker must stop at once.
    #[error("job {job_id} attempt {attempt}: lease lost")]
    LeaseLost {
        /// The job.
        job_id: uuid::Uuid,
        /// The attempt whose lease was lost.
        attempt: i32,
    },

    /// A stored row cannot be read back (a bad enum string, malformed JSON).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),

    /// An uploaded or referenced model or dataset failed validation (a 422 naming the problem).
    #[error("{0}")]
    Rejected(#[from] crate::inputs::Rejection),

    /// A request body went past its size limit.
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// What was too large (`model upload`, `dataset upload`).
        what: &'static str,
        /// The limit in bytes.
        limit: u64,
    },

    /// A remote source of a referenced input (the Hugging Face Hub) failed or could not be
    /// reached; the message says which and is safe to show.
    #[error("{0}")]
    Upstream(String),

    /// The client's request body broke off or was not well-formed multipart.
    #[error("the upload could not be read: {0}")]
    BadUpload(String),

    /// The command-line client could not talk to the server (not running, wrong URL, the
    /// connection dropped).
    #[error("cannot reach the compressd server at {url}: {message}")]
    Unreachable {
        /// The server's URL.
        url: String,
        /// What failed, with its causes.
        message: String,
    },

    /// The server refused a client request; `body` is its problem+json answer.
    #[error("{}", problem_summary(*.status, .body))]
    ServerProblem {
        /// The HTTP status.
        status: u16,
        /// The RFC 9457 problem (or `{status, title, detail}` made from a non-JSON answer).
        body: serde_json::Value,
    },

    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),

    /// Migrations could not be applied.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// The artifact store failed.
    #[error("artifact storage error")]
    ObjectStore(#[from] object_store::Error),

    /// A local file or folder could not be read or written.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// `422 The job spec is invalid: /pipeline/0/epochs: must be …`, from a problem body.
fn problem_summary(status: u16, body: &serde_json::Value) -> String {
    let text = |key: &str| body.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    let mut summary = format!("the server answered {status}");
    if !text("title").is_empty() {
        summary.push_str(&format!(" ({})", text("title")));
    }
    if !text("detail").is_empty() {
        summary.push_str(&format!(": {}", text("detail")));
    }
    summary
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
