//! Row mapping of the SQLite backend: ids as hyphenated text, times as fixed-width UTC text, JSON
//! as text (see the migration's header).

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{Artifact, Dataset, Job, JobEvent, Model};

/// The stored time format: fixed width, so text order is time order.
const TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// A time as stored.
pub(crate) fn to_text(time: DateTime<Utc>) -> String {
    time.format(TIME_FORMAT).to_string()
}

pub(crate) fn parse_time(text: &str) -> Result<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, TIME_FORMAT)
        .map(|t| t.and_utc())
        .map_err(|e| Error::Corrupt(format!("stored time `{text}`: {e}")))
}

pub(crate) fn time(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>> {
    parse_time(&row.try_get::<String, _>(column)?)
}

pub(crate) fn opt_time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>> {
    row.try_get::<Option<String>, _>(column)?
        .as_deref()
        .map(parse_time)
        .transpose()
}

pub(crate) fn parse_uuid(text: &str) -> Result<Uuid> {
    Uuid::parse_str(text).map_err(|e| Error::Corrupt(format!("stored id `{text}`: {e}")))
}

pub(crate) fn uuid(row: &SqliteRow, column: &str) -> Result<Uuid> {
    parse_uuid(&row.try_get::<String, _>(column)?)
}

pub(crate) fn opt_uuid(row: &SqliteRow, column: &str) -> Result<Option<Uuid>> {
    row.try_get::<Option<String>, _>(column)?
        .as_deref()
        .map(parse_uuid)
        .transpose()
}

pub(crate) fn json_text(value: &impl serde::Serialize) -> String {
    // Serializing plain data (Value, derive-Serialize structs) cannot fail.
    serde_json::to_string(value).expect("JSON-serializable value")
}

pub(crate) fn opt_json<T: DeserializeOwned>(row: &SqliteRow, column: &str) -> Result<Option<T>> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| Error::Corrupt(format!("stored {column}: {e}")))
    })
    .transpose()
}

pub(crate) fn json_value(row: &SqliteRow, column: &str) -> Result<Value> {
    Ok(opt_json(row, column)?.unwrap_or(Value::Null))
}

pub(crate) fn job_from_row(row: &SqliteRow) -> Result<Job> {
    Ok(Job {
        id: uuid(row, "id")?,
        name: row.try_get("name")?,
        status: row.try_get::<String, _>("status")?.parse()?,
        spec: json_value(row, "spec")?,
        model_id: opt_uuid(row, "model_id")?,
        dataset_id: opt_uuid(row, "dataset_id")?,
        priority: row.try_get("priority")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        run_after: time(row, "run_after")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: opt_time(row, "lease_expires_at")?,
        cancel_requested: row.try_get("cancel_requested")?,
        idempotency_key: row.try_get("idempotency_key")?,
        progress: opt_json(row, "progress")?,
        result: opt_json(row, "result")?,
        error: opt_json(row, "error")?,
        created_at: time(row, "created_at")?,
        started_at: opt_time(row, "started_at")?,
        finished_at: opt_time(row, "finished_at")?,
        updated_at: time(row, "updated_at")?,
    })
}

pub(crate) fn model_from_row(row: &SqliteRow) -> Result<Model> {
    Ok(Model {
        id: uuid(row, "id")?,
        name: row.try_get("name")?,
        architecture: row.try_get("architecture")?,
        format: row.try_get("format")?,
        uri: row.try_get("uri")?,
        bytes: row.try_get("bytes")?,
        sha256: row.try_get("sha256")?,
        metadata: json_value(row, "metadata")?,
        created_at: time(row, "created_at")?,
    })
}

pub(crate) fn dataset_from_row(row: &SqliteRow) -> Result<Dataset> {
    Ok(Dataset {
        id: uuid(row, "id")?,
        name: row.try_get("name")?,
        format: row.try_get("format")?,
        uri: row.try_get("uri")?,
        bytes: row.try_get("bytes")?,
        sha256: row.try_get("sha256")?,
        rows: row.try_get("rows")?,
        metadata: json_value(row, "metadata")?,
        created_at: time(row, "created_at")?,
    })
}

pub(crate) fn artifact_from_row(row: &SqliteRow) -> Result<Artifact> {
    Ok(Artifact {
        job_id: uuid(row, "job_id")?,
        attempt: row.try_get("attempt")?,
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        format: row.try_get("format")?,
        bytes: row.try_get("bytes")?,
        sha256: row.try_get("sha256")?,
        uri: row.try_get("uri")?,
        created_at: time(row, "created_at")?,
    })
}

pub(crate) fn event_from_row(row: &SqliteRow) -> Result<JobEvent> {
    Ok(JobEvent {
        seq: row.try_get("seq")?,
        job_id: uuid(row, "job_id")?,
        attempt: row.try_get("attempt")?,
        event_type: row.try_get("type")?,
        payload: json_value(row, "payload")?,
        created_at: time(row, "created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn stored_times_sort_as_text_like_times() {
        let early = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 9).unwrap();
        let later = early + chrono::Duration::milliseconds(500);
        assert!(to_text(early) < to_text(later));
        assert_eq!(parse_time(&to_text(later)).unwrap(), later);
    }
}
