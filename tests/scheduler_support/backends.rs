//! Fresh, migrated stores for each test; Postgres comes from the shared throwaway-cluster harness.

use std::path::Path;
use std::sync::Arc;

use compressd::store::{PgStore, SqliteStore, Store};

use super::SharedStore;

use crate::common::pg;

/// A migrated SQLite store in `dir`.
pub async fn sqlite(dir: &Path) -> SharedStore {
    let store = SqliteStore::open_file(&dir.join("compressd.db"), 8)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Arc::new(store)
}

/// The URL of a fresh, empty Postgres database.
pub async fn postgres_url() -> String {
    pg::fresh_database_url().await
}

/// A migrated Postgres store on the database at `url` (a second call on the same URL gives a
/// second store, with its own connections and notification listener, like another process).
pub async fn postgres_at(url: &str) -> SharedStore {
    let store = PgStore::connect(url, 20).await.unwrap();
    store.migrate().await.unwrap();
    Arc::new(store)
}

/// A migrated Postgres store on a fresh database.
pub async fn postgres() -> SharedStore {
    postgres_at(&postgres_url().await).await
}
