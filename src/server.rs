//! Starting and stopping the HTTP server.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::access::AuthMode;
use crate::api::metrics::Metrics;
use crate::api::{self, ApiConfig, AppState};
use crate::artifacts::ArtifactStore;
use crate::clock::SystemClock;
use crate::error::{Error, Result};
use crate::settings::{AuthSetting, Settings};
use crate::store;

/// Connects the store (migrating it when configured) and the artifact store.
///
/// # Errors
/// Database, migration or artifact-folder failures.
pub async fn build_state(settings: &Settings) -> Result<AppState> {
    let store = store::connect(settings).await?;
    if settings.migrate_on_start {
        store.migrate().await?;
    }
    let mut config = ApiConfig::from_settings(settings);
    if settings.auth == AuthSetting::Auto {
        let keys = store.list_api_keys().await?;
        if keys.iter().any(|k| k.revoked_at.is_none()) {
            config.access.mode = AuthMode::Keys;
        }
    }
    Ok(AppState {
        store,
        artifacts: ArtifactStore::from_settings(settings)?,
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        config,
    })
}

/// Where the API listens: `listen`, except that a server without keys under `auth = "auto"`
/// listens on loopback only (same port) so an unauthenticated API is never exposed by accident.
/// Says at start which it is; `auth = "none"` off loopback is a warning.
pub fn listen_address(settings: &Settings, mode: AuthMode) -> SocketAddr {
    let listen = settings.listen;
    match (mode, settings.auth) {
        (AuthMode::Keys, _) => {
            tracing::info!(%listen, "API keys required on /v1 (Authorization: Bearer)");
            listen
        }
        (AuthMode::Open, AuthSetting::None) => {
            if !listen.ip().is_loopback() {
                tracing::warn!(%listen, "auth = \"none\": anyone who reaches this address can use every tenant's API");
            }
            listen
        }
        (AuthMode::Open, _) => {
            let loopback = if listen.is_ipv6() {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            } else {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            };
            let address = SocketAddr::new(
                if listen.ip().is_loopback() {
                    listen.ip()
                } else {
                    loopback
                },
                listen.port(),
            );
            tracing::warn!(%address, configured = %listen,
                "no API keys: the API has no auth and listens on loopback only; \
                 make a key with `compressd keys create` (then restart) or set auth = \"none\"");
            address
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes, then lets in-flight requests finish
/// for at most `grace`. Tests pass a port-0 listener and their own shutdown future.
///
/// # Errors
/// [`Error::Io`] when accepting connections fails.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()> {
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("listener", e))?;
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stopping_tx.send(());
    };
    let server = axum::serve(listener, api::router(state)).with_graceful_shutdown(signal);
    tracing::info!(%address, "listening");
    let deadline = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result.map_err(|e| Error::io(address.to_string(), e)),
        () = deadline => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; dropping in-flight requests");
            Ok(())
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn settings(listen: &str, auth: &str) -> Settings {
        let figment = Settings::figment(None)
            .expect("defaults")
            .merge(Serialized::default("listen", listen))
            .merge(Serialized::default("auth", auth));
        Settings::from_figment(figment).expect("settings")
    }

    #[test]
    fn without_keys_the_api_listens_on_loopback_unless_auth_is_none() {
        let address = |listen: &str, auth: &str, mode: AuthMode| {
            listen_address(&settings(listen, auth), mode).to_string()
        };
        // No keys under `auto`: loopback only, on the configured port, IPv4 or IPv6 alike.
        assert_eq!(
            address("0.0.0.0:8080", "auto", AuthMode::Open),
            "127.0.0.1:8080"
        );
        assert_eq!(
            address("10.1.2.3:9000", "auto", AuthMode::Open),
            "127.0.0.1:9000"
        );
        assert_eq!(address("[::]:8080", "auto", AuthMode::Open), "[::1]:8080");
        assert_eq!(
            address("127.0.0.1:8080", "auto", AuthMode::Open),
            "127.0.0.1:8080"
        );
        // Keys in the database, or `auth = "none"` said explicitly: where configured.
        assert_eq!(
            address("0.0.0.0:8080", "auto", AuthMode::Keys),
            "0.0.0.0:8080"
        );
        assert_eq!(
            address("0.0.0.0:8080", "keys", AuthMode::Keys),
            "0.0.0.0:8080"
        );
        assert_eq!(
            address("0.0.0.0:8080", "none", AuthMode::Open),
            "0.0.0.0:8080"
        );
    }
}
