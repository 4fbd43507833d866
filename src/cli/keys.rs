//! `compressd keys create|list|revoke`: API keys in the configured database.
//!
//! The key is printed once, on stdout, by `create`; only its hash is stored, so a lost key is
//! revoked and replaced, never recovered.

use std::io::Write;

use clap::Subcommand;

use crate::auth;
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::settings::Settings;
use crate::store::access::{scopes_from_text, scopes_to_text};
use crate::store::{self, ApiKey};

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it (once; only its hash is stored).
    Create {
        /// The tenant the key acts for (a-z, 0-9, _ and -).
        #[arg(long)]
        tenant: String,
        /// Comma-separated: read, write, admin (admin covers read and write).
        #[arg(long, default_value = "read,write")]
        scopes: String,
    },
    /// List every key: id, tenant, scopes, made, revoked.
    List,
    /// Revoke a key by id; it is refused from its next request on, on every replica.
    Revoke {
        /// The key's id (`keys list`; the part after `cpd_` of the key).
        id: String,
    },
}

/// Runs a `keys` subcommand against the configured database (migrating it first when
/// `migrate_on_start` is set, as `serve` would).
///
/// # Errors
/// [`Error::Invalid`] for a bad tenant or scope; database errors; [`Error::NotFound`] for an
/// unknown key id.
pub async fn run(command: KeysCommand, settings: &Settings) -> Result<()> {
    let store = store::connect(settings).await?;
    if settings.migrate_on_start {
        store.migrate().await?;
    }
    let clock = SystemClock;
    let mut out = std::io::stdout().lock();
    match command {
        KeysCommand::Create { tenant, scopes } => {
            let scopes = scopes_from_text(&scopes)?;
            let made = auth::generate_key(&mut rand::rngs::OsRng, &tenant, scopes, clock.now())?;
            store.insert_api_key(&made.key).await?;
            writeln!(out, "{}", made.token).map_err(stdout_error)?;
            eprintln!(
                "API key {} for tenant `{}` ({}); store it now: it is not shown again",
                made.key.id,
                made.key.tenant,
                scopes_to_text(&made.key.scopes)
            );
        }
        KeysCommand::List => {
            writeln!(
                out,
                "{:<12}  {:<20}  {:<16}  {:<20}  revoked",
                "id", "tenant", "scopes", "created"
            )
            .map_err(stdout_error)?;
            for key in store.list_api_keys().await? {
                writeln!(out, "{}", list_line(&key)).map_err(stdout_error)?;
            }
        }
        KeysCommand::Revoke { id } => {
            let key = store.revoke_api_key(&id, clock.now()).await?;
            eprintln!("API key {} of tenant `{}` revoked", key.id, key.tenant);
        }
    }
    Ok(())
}

fn list_line(key: &ApiKey) -> String {
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    format!(
        "{:<12}  {:<20}  {:<16}  {:<20}  {}",
        key.id,
        key.tenant,
        scopes_to_text(&key.scopes),
        time(key.created_at),
        key.revoked_at.map_or_else(|| "-".to_owned(), time)
    )
}

fn stdout_error(error: std::io::Error) -> Error {
    Error::io("stdout", error)
}
