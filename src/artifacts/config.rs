//! How the artifact store is configured: the URL, S3 connection settings, and multipart sizes.

use std::fmt;
use std::path::PathBuf;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::ClientOptions;

use crate::error::{Error, Result};
use crate::settings::Settings;

/// Longest one S3 request (a part upload, the completion of a large object) may take.
const S3_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// S3's smallest part (except the last); smaller settings are refused.
pub const MIN_PART_SIZE: usize = 5 << 20;

/// Connection settings for `s3://` stores; unset fields fall back to `AWS_*` variables.
#[derive(Clone, Default)]
pub struct S3Config {
    /// Endpoint URL of an S3-compatible server (`http://127.0.0.1:9000`); unset means AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow `http://` endpoints (local S3 servers).
    pub allow_http: bool,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// How to open the artifact store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `artifacts_url`; `None` means `default_dir`.
    pub url: Option<String>,
    /// Folder used when `url` is unset.
    pub default_dir: PathBuf,
    pub s3: S3Config,
    /// Bytes per multipart part. 64 MiB keeps S3's 10,000-part limit past 600 GiB.
    pub part_size_bytes: usize,
    /// Parts uploading at once; memory per upload is about (this + 1) × part size.
    pub max_inflight_parts: usize,
}

impl StoreConfig {
    /// The store configuration within the service settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            url: settings.artifacts_url.clone(),
            default_dir: settings.default_artifacts_dir(),
            s3: S3Config {
                endpoint: settings.s3_endpoint.clone(),
                region: settings.s3_region.clone(),
                access_key_id: settings.s3_access_key_id.clone(),
                secret_access_key: settings.s3_secret_access_key.clone(),
                allow_http: settings.s3_allow_http,
            },
            part_size_bytes: settings.upload_part_size_bytes,
            max_inflight_parts: settings.upload_max_inflight_parts,
        }
    }

    /// Refuses URLs and sizes the store cannot work with.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting.
    pub fn check(&self) -> Result<()> {
        if self.part_size_bytes < MIN_PART_SIZE {
            return Err(Error::Config {
                setting: "upload_part_size_bytes (COMPRESSD_UPLOAD_PART_SIZE_BYTES)".into(),
                message: format!("must be at least {MIN_PART_SIZE} (S3's minimum part size)"),
            });
        }
        match self.url.as_deref() {
            None | Some("memory://") => Ok(()),
            Some(url) if url.starts_with("file://") => file_url_path(url).map(|_| ()),
            Some(url) if url.starts_with("s3://") => Ok(()),
            Some(other) => Err(url_error(format!(
                "'{other}' is not file:///path, s3://bucket/prefix or memory://"
            ))),
        }
    }
}

fn url_error(message: impl Into<String>) -> Error {
    Error::Config {
        setting: "artifacts_url (COMPRESSD_ARTIFACTS_URL)".into(),
        message: message.into(),
    }
}

/// The folder a `file:///…` URL names.
pub(super) fn file_url_path(url: &str) -> Result<PathBuf> {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.to_file_path().ok())
        .ok_or_else(|| url_error(format!("'{url}' is not a file:///absolute/path URL")))
}

/// Builds the S3 client for `s3://bucket[/prefix]`: settings first, `AWS_*` variables for the rest.
pub(super) fn open_s3(url: &str, s3: &S3Config) -> Result<(AmazonS3, Path, String)> {
    let rest = url.trim_start_matches("s3://");
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(url_error("an s3:// URL must name a bucket"));
    }
    // object_store's 30 s request timeout fails a 64 MiB part below ~2.2 MB/s, and a local S3
    // server assembling a multi-gigabyte object takes longer than that to complete it.
    let client = ClientOptions::new()
        .with_allow_http(s3.allow_http)
        .with_timeout(S3_REQUEST_TIMEOUT);
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(client);
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &s3.region {
        builder = builder.with_region(region);
    }
    if let Some(key) = &s3.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &s3.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    let client = builder
        .build()
        .map_err(|e| url_error(format!("cannot configure S3: {e}")))?;
    let root = prefix
        .split('/')
        .filter(|p| !p.is_empty())
        .fold(Path::default(), |p, c| p.child(c));
    Ok((client, root, bucket.to_owned()))
}
