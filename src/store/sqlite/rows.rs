//! Row mapping of the SQLite backend: ids as hyphenated text, times as fixed-width UTC text, JSON
//! as text (see the migration's header).

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::shared::StoredRow;

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

impl StoredRow for SqliteRow {
    fn text(&self, column: &str) -> Result<String> {
        Ok(self.try_get(column)?)
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>> {
        Ok(self.try_get(column)?)
    }

    fn int(&self, column: &str) -> Result<i32> {
        Ok(self.try_get(column)?)
    }

    fn big(&self, column: &str) -> Result<i64> {
        Ok(self.try_get(column)?)
    }

    fn flag(&self, column: &str) -> Result<bool> {
        Ok(self.try_get(column)?)
    }

    fn id(&self, column: &str) -> Result<Uuid> {
        uuid(self, column)
    }

    fn opt_id(&self, column: &str) -> Result<Option<Uuid>> {
        opt_uuid(self, column)
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>> {
        time(self, column)
    }

    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>> {
        opt_time(self, column)
    }

    fn json(&self, column: &str) -> Result<Value> {
        json_value(self, column)
    }

    fn opt_json<T: DeserializeOwned>(&self, column: &str) -> Result<Option<T>> {
        opt_json(self, column)
    }
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
