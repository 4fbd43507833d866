//! Starting and stopping the HTTP server.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::metrics::Metrics;
use crate::api::{self, ApiConfig, AppState};
use crate::artifacts::ArtifactStore;
use crate::clock::SystemClock;
use crate::error::{Error, Result};
use crate::settings::Settings;
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
    Ok(AppState {
        store,
        artifacts: ArtifactStore::from_settings(settings)?,
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        config: ApiConfig::from_settings(settings),
    })
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
