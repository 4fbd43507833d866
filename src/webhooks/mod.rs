//! Signed webhooks (Standard Webhooks): the signing scheme, the delivery loop and its metrics.
//!
//! A job's events become outbox rows in the database, in the transaction that records them (see
//! `crate::store::Webhook`). [`delivery::run`] claims due rows with a lease, posts each one signed
//! with its webhook's secret, and records the attempt; a failed attempt is retried with
//! exponential backoff until the budget is spent. A loop that dies mid-delivery loses nothing:
//! its rows are due again when their lease passes, and the `webhook-id` stays the same.

pub mod delivery;
pub mod metrics;
pub mod signing;

pub use delivery::DeliveryConfig;
pub use metrics::WebhookMetrics;
