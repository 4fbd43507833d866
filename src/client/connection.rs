//! Which server a client command talks to, and with which key: `--server` / `--key`, else
//! `COMPRESSD_SERVER` / `COMPRESSD_API_KEY` (clap reads both), else the client config file, else
//! `http://127.0.0.1:8080` without a key.
//!
//! The config file is TOML with `server` and `api_key`, at `COMPRESSD_CLIENT_CONFIG`, else
//! `$XDG_CONFIG_HOME/compressd/client.toml`, else `~/.config/compressd/client.toml`; a missing file
//! is no error.

use std::fmt;
use std::path::PathBuf;

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The server used when nothing names one: `compressd serve`'s default address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Variable naming the client config file.
pub const CONFIG_VAR: &str = "COMPRESSD_CLIENT_CONFIG";

/// A server and the key to show it.
#[derive(Clone)]
pub struct Connection {
    /// Base URL, e.g. `http://127.0.0.1:8080` or `https://compressd.example/`.
    pub server: url::Url,
    /// Sent as `Authorization: Bearer <key>` on every request.
    pub api_key: Option<String>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The client config file's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Option<String>,
    api_key: Option<String>,
}

impl Connection {
    /// Resolves the connection from the flags (already merged with their variables by clap) and
    /// the config file.
    ///
    /// # Errors
    /// [`Error::Config`] when the config file is malformed or the URL is not `http(s)://`.
    pub fn resolve(server: Option<String>, api_key: Option<String>) -> Result<Self> {
        let file = match config_path() {
            Some(path) if path.is_file() => Figment::from(Toml::file(&path))
                .extract::<ClientFile>()
                .map_err(|e| Error::Config {
                    setting: format!("client config {}", path.display()),
                    message: e.to_string(),
                })?,
            _ => ClientFile::default(),
        };
        let server = server
            .filter(|s| !s.trim().is_empty())
            .or(file.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let parsed = url::Url::parse(server.trim())
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
            .ok_or_else(|| {
                invalid(
                    "server",
                    &format!("`{server}` is not an http:// or https:// URL"),
                )
            })?;
        let api_key = api_key
            .filter(|k| !k.trim().is_empty())
            .or(file.api_key)
            .map(|k| k.trim().to_owned());
        Ok(Self {
            server: parsed,
            api_key,
        })
    }
}

/// Where the client config file is looked for.
fn config_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CONFIG_VAR) {
        return Some(PathBuf::from(path));
    }
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(config_home.join("compressd").join("client.toml"))
}

/// An [`Error::Config`] for a client option.
pub(crate) fn invalid(option: &str, message: &str) -> Error {
    let var = match option {
        "server" => "COMPRESSD_SERVER",
        _ => "COMPRESSD_API_KEY",
    };
    Error::Config {
        setting: format!("--{option} ({var})"),
        message: message.into(),
    }
}
