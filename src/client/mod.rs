//! The HTTP client behind `compressd jobs|models|datasets …`: one [`Client`] per command, talking
//! to a server by URL with an optional API key (`Authorization: Bearer`).
//!
//! A server's error answer becomes [`Error::ServerProblem`] carrying its RFC 9457 body, so the
//! command can show the field it names; a server that cannot be reached is [`Error::Unreachable`].

pub mod connection;
pub mod download;
pub mod follow;
pub mod spec;
pub mod upload;

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;

pub use connection::Connection;

use crate::error::{Error, Result};

/// Time to open a TCP connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time limit of a plain API call; uploads, downloads and event streams have none.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A connection to one compressd server.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: url::Url,
}

impl Client {
    /// A client for `connection`.
    ///
    /// # Errors
    /// [`Error::Config`] when the server URL or key cannot be used.
    pub fn new(connection: &Connection) -> Result<Self> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &connection.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| connection::invalid("key", "must be visible ASCII"))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("compressd-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| connection::invalid("server", &e.to_string()))?;
        Ok(Self {
            http,
            base: connection.server.clone(),
        })
    }

    /// The server's base URL.
    pub fn base(&self) -> &url::Url {
        &self.base
    }

    /// A request to `path` (`/v1/…`) on the server, without a time limit.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = format!("{}{path}", self.base.as_str().trim_end_matches('/'));
        self.http.request(method, url)
    }

    /// Sends a request; a transport failure is [`Error::Unreachable`], an error status
    /// [`Error::ServerProblem`].
    ///
    /// # Errors
    /// As above.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(problem(response).await)
        }
    }

    /// A JSON API call with the plain-call time limit; `body` is sent as JSON when given.
    ///
    /// # Errors
    /// As [`Self::send`], and [`Error::Unreachable`] when the answer is not JSON.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut request = self.request(method, path).timeout(CALL_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = self.send(request).await?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        response.json().await.map_err(|e| self.unreachable(&e))
    }

    /// An [`Error::Unreachable`] for a transport failure, with its causes.
    pub fn unreachable(&self, error: &reqwest::Error) -> Error {
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Error::Unreachable {
            url: self.base.to_string(),
            message,
        }
    }
}

/// The server's error answer as [`Error::ServerProblem`]; a body that is not problem+json is kept
/// as its text.
async fn problem(response: Response) -> Error {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or_else(
        |_| serde_json::json!({ "status": status, "title": "Error", "detail": text.trim() }),
    );
    Error::ServerProblem { status, body }
}
