//! The delivery loop: claim due outbox rows, post each one signed, record the attempt.
//!
//! Runs in every `compressd serve` process; replicas share the outbox safely because a claim is a
//! lease (see [`crate::store::Store::claim_webhook_deliveries`]). Delivery is at least once: a
//! loop that dies after the receiver answered but before the attempt was recorded delivers again
//! later, with the same `webhook-id`, so receivers deduplicate on it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::metrics::{Outcome, WebhookMetrics};
use super::signing::sign;
use crate::error::Result;
use crate::net_guard::UrlPolicy;
use crate::settings::Settings;
use crate::store::{DeliveryAttempt, DeliveryNext, Store, WebhookDelivery};

/// Longest wait between two attempts of one delivery, however many failed.
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(3600);

/// How often an idle loop looks for due deliveries.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Deliveries one loop posts at once.
const BATCH: u32 = 16;

/// How deliveries are made.
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// Attempts before a delivery is given up (`webhook_max_attempts`).
    pub max_attempts: i32,
    /// Wait after the first failed attempt, doubled after each further one (`webhook_retry_base_ms`).
    pub retry_base: Duration,
    /// Time limit of one attempt, connect to last byte (`webhook_timeout_secs`).
    pub timeout: Duration,
    /// How often an idle loop looks for due deliveries.
    pub poll_interval: Duration,
    /// How long a claim holds a delivery: a whole attempt with room to record it. A delivery
    /// whose loop died is due again this long after it was claimed.
    pub lease: Duration,
    /// Which targets may be reached (`allowed_private_networks`), checked again at each attempt
    /// so a name that now resolves to a private address is refused.
    pub policy: UrlPolicy,
}

impl DeliveryConfig {
    /// The webhook part of the settings.
    pub fn from_settings(settings: &Settings) -> Self {
        let timeout = Duration::from_secs(settings.webhook_timeout_secs.max(1));
        Self {
            max_attempts: i32::try_from(settings.webhook_max_attempts.max(1)).unwrap_or(i32::MAX),
            retry_base: Duration::from_millis(settings.webhook_retry_base_ms),
            timeout,
            poll_interval: POLL_INTERVAL,
            lease: timeout * 2 + Duration::from_secs(5),
            policy: UrlPolicy::new(&settings.allowed_private_networks),
        }
    }

    /// The wait after failed attempt number `attempt` (1 for the first): `retry_base` doubled
    /// per earlier failure, at most an hour.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let doublings = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(0)
            .min(20);
        self.retry_base
            .saturating_mul(1 << doublings)
            .min(MAX_RETRY_INTERVAL)
    }
}

/// Delivers until `shutdown`: claims due deliveries, posts them, and sleeps when there are none.
pub async fn run(
    store: Arc<dyn Store>,
    config: DeliveryConfig,
    metrics: WebhookMetrics,
    shutdown: CancellationToken,
) {
    let owner = format!("webhooks-{}", Uuid::new_v4());
    tracing::info!(%owner, "webhook delivery loop started");
    loop {
        let claimed = match deliver_due(&*store, &config, &metrics, &owner).await {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "could not claim webhook deliveries");
                0
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        if claimed == 0 {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(config.poll_interval) => {}
            }
        }
    }
}

/// Claims one batch of due deliveries for `owner` and makes an attempt at each, concurrently.
/// Returns how many were claimed.
///
/// # Errors
/// When claiming fails; a failed attempt is recorded, not returned.
pub async fn deliver_due(
    store: &dyn Store,
    config: &DeliveryConfig,
    metrics: &WebhookMetrics,
    owner: &str,
) -> Result<usize> {
    let claimed = store
        .claim_webhook_deliveries(owner, config.lease, BATCH)
        .await?;
    join_all(
        claimed
            .iter()
            .map(|delivery| attempt(store, config, metrics, delivery)),
    )
    .await;
    Ok(claimed.len())
}

/// Posts one claimed delivery and records how it went.
async fn attempt(
    store: &dyn Store,
    config: &DeliveryConfig,
    metrics: &WebhookMetrics,
    delivery: &WebhookDelivery,
) {
    let started_at = Utc::now();
    let answer = post(config, delivery).await;
    let finished_at = Utc::now();
    let (status_code, error) = match answer {
        Ok(code) if (200..300).contains(&code) => (Some(i32::from(code)), None),
        Ok(code) => (
            Some(i32::from(code)),
            Some(format!("the target answered HTTP {code}")),
        ),
        Err(error) => (None, Some(error)),
    };
    let (next, outcome) = match &error {
        None => (DeliveryNext::Delivered, Outcome::Succeeded),
        Some(_) if delivery.attempts >= config.max_attempts => {
            (DeliveryNext::GiveUp, Outcome::Failed)
        }
        Some(_) => {
            let wait = chrono::Duration::from_std(config.backoff(delivery.attempts))
                .unwrap_or(chrono::Duration::MAX);
            (DeliveryNext::RetryAt(finished_at + wait), Outcome::Retried)
        }
    };
    let record = DeliveryAttempt {
        delivery_id: delivery.id,
        attempt: delivery.attempts,
        started_at,
        finished_at,
        status_code,
        error: error.clone(),
    };
    let span = tracing::info_span!("webhook.delivery", delivery_id = delivery.id,
        job_id = %delivery.job_id, event = %delivery.event_type, attempt = delivery.attempts);
    let _entered = span.enter();
    match store.record_webhook_attempt(delivery, &record, next).await {
        Ok(true) => {
            metrics.record(outcome);
            match (&error, next) {
                (None, _) => tracing::info!(status_code, "webhook delivered"),
                (Some(error), DeliveryNext::GiveUp) => {
                    tracing::warn!(%error, "webhook delivery failed for good")
                }
                (Some(error), _) => tracing::info!(%error, "webhook delivery failed; will retry"),
            }
        }
        Ok(false) => tracing::warn!("webhook delivery lease lost; another loop has it"),
        Err(error) => tracing::warn!(%error, "could not record a webhook attempt"),
    }
}

/// Posts the delivery signed; the status code of any answer, or why none came.
async fn post(config: &DeliveryConfig, delivery: &WebhookDelivery) -> Result<u16, String> {
    let addresses = config
        .policy
        .check_url(&delivery.url)
        .await
        .map_err(|e| e.to_string())?;
    let url = Url::parse(&delivery.url).map_err(|e| e.to_string())?;
    let mut client = reqwest::Client::builder()
        .timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("compressd-webhooks/", env!("CARGO_PKG_VERSION")));
    if let Some(url::Host::Domain(host)) = url.host() {
        // Connect to the addresses the policy checked, not to a fresh (rebindable) DNS answer.
        client = client.resolve_to_addrs(host, &addresses);
    }
    let client = client.build().map_err(|e| error_chain(&e))?;
    let message_id = delivery.message_id();
    let timestamp = Utc::now().timestamp();
    let signature = sign(&delivery.secret, &message_id, timestamp, &delivery.body)
        .map_err(|e| e.to_string())?;
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &message_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(delivery.body.clone())
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    Ok(response.status().as_u16())
}

/// An error with its causes, e.g. "error sending request: connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let config = DeliveryConfig {
            max_attempts: 10,
            retry_base: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
            poll_interval: POLL_INTERVAL,
            lease: Duration::from_secs(25),
            policy: UrlPolicy::default(),
        };
        assert_eq!(config.backoff(1), Duration::from_secs(10));
        assert_eq!(config.backoff(2), Duration::from_secs(20));
        assert_eq!(config.backoff(4), Duration::from_secs(80));
        assert_eq!(config.backoff(30), MAX_RETRY_INTERVAL);
    }
}
