//! Row reading of the PostgreSQL backend: native uuid, timestamptz and jsonb columns.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use crate::error::Result;
use crate::store::shared::StoredRow;

impl StoredRow for PgRow {
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
        Ok(self.try_get(column)?)
    }

    fn opt_id(&self, column: &str) -> Result<Option<Uuid>> {
        Ok(self.try_get(column)?)
    }

    fn time(&self, column: &str) -> Result<DateTime<Utc>> {
        Ok(self.try_get(column)?)
    }

    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(self.try_get(column)?)
    }

    fn json(&self, column: &str) -> Result<Value> {
        Ok(self
            .try_get::<Option<Value>, _>(column)?
            .unwrap_or(Value::Null))
    }

    fn opt_json<T: DeserializeOwned>(&self, column: &str) -> Result<Option<T>> {
        Ok(self.try_get::<Option<Json<T>>, _>(column)?.map(|j| j.0))
    }
}
