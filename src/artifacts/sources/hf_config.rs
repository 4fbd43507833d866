//! How `hf://` references reach the Hugging Face Hub: endpoint, cache folder, token and
//! offline mode, from the settings with the standard Hugging Face variables as fallbacks.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::settings::Settings;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How `hf://` references reach the Hub.
#[derive(Clone)]
pub struct HfConfig {
    /// Base URL of the Hub, without a trailing `/`.
    pub endpoint: String,
    /// The Hugging Face cache (`…/huggingface/hub`), shared with Python tools.
    pub cache_dir: PathBuf,
    /// Access token for private or gated repositories; `None`: the cache's `token` file, if any.
    pub token: Option<String>,
    /// Use only the cache, never the network.
    pub offline: bool,
}

impl fmt::Debug for HfConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfConfig")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("offline", &self.offline)
            .finish()
    }
}

impl HfConfig {
    /// The settings, with the standard Hugging Face variables (`HF_ENDPOINT`, `HF_HUB_CACHE`,
    /// `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`) for whatever they leave unset.
    pub fn from_settings(settings: &Settings) -> Self {
        Self::resolve(settings, |key| {
            std::env::var(key).ok().filter(|v| !v.trim().is_empty())
        })
    }

    fn resolve(settings: &Settings, env: impl Fn(&str) -> Option<String>) -> Self {
        let endpoint = settings
            .hf_endpoint
            .clone()
            .or_else(|| env("HF_ENDPOINT"))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        // The order huggingface_hub itself follows; the data dir when there is no home at all.
        let cache_dir = settings
            .hf_cache_dir
            .clone()
            .or_else(|| env("HF_HUB_CACHE").map(PathBuf::from))
            .or_else(|| env("HF_HOME").map(|home| Path::new(&home).join("hub")))
            .or_else(|| env("XDG_CACHE_HOME").map(|c| Path::new(&c).join("huggingface/hub")))
            .or_else(|| env("HOME").map(|home| Path::new(&home).join(".cache/huggingface/hub")))
            .unwrap_or_else(|| settings.data_dir.join("huggingface/hub"));
        let offline = settings.hf_offline.unwrap_or_else(|| {
            env("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
        });
        Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            cache_dir,
            token: settings.hf_token.clone().or_else(|| env("HF_TOKEN")),
            offline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::from_figment(Settings::figment(None).unwrap()).unwrap()
    }

    #[test]
    fn unset_settings_fall_back_to_the_hugging_face_variables() {
        let env = |key: &str| match key {
            "HF_ENDPOINT" => Some("http://mirror.local/".to_owned()),
            "HF_HOME" => Some("/srv/hf".to_owned()),
            "HF_TOKEN" => Some("hf_secret".to_owned()),
            "HF_HUB_OFFLINE" => Some("1".to_owned()),
            _ => None,
        };
        let config = HfConfig::resolve(&settings(), env);
        assert_eq!(config.endpoint, "http://mirror.local");
        assert_eq!(config.cache_dir, PathBuf::from("/srv/hf/hub"));
        assert_eq!(config.token.as_deref(), Some("hf_secret"));
        assert!(config.offline);
        assert!(!format!("{config:?}").contains("hf_secret"));

        let mut explicit = settings();
        explicit.hf_offline = Some(false);
        explicit.hf_cache_dir = Some(PathBuf::from("/cache"));
        let config = HfConfig::resolve(&explicit, env);
        assert!(
            !config.offline,
            "an explicit setting wins over HF_HUB_OFFLINE"
        );
        assert_eq!(config.cache_dir, PathBuf::from("/cache"));

        let bare = HfConfig::resolve(&settings(), |_| None);
        assert_eq!(bare.endpoint, DEFAULT_ENDPOINT);
        assert!(bare.cache_dir.ends_with("huggingface/hub"));
        assert!(!bare.offline);
    }
}
