//! Webhook metrics: deliveries by outcome and the outbox depth.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What became of one delivery attempt.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answered.
    Succeeded,
    /// It failed and will be tried again.
    Retried,
    /// It failed and the budget is spent: given up.
    Failed,
}

impl Outcome {
    fn label(self) -> OutcomeLabels {
        let outcome = match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retried => "retried",
            Outcome::Failed => "failed",
        };
        OutcomeLabels { outcome }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Cheap to clone (shared cells): the delivery loop counts, `/metrics` sets the depth.
#[derive(Clone, Debug, Default)]
pub struct WebhookMetrics {
    deliveries: Family<OutcomeLabels, Counter>,
    outbox_depth: Gauge,
}

impl WebhookMetrics {
    /// Registers every metric (the registry adds the `compressd_` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome: succeeded, retried (failed, tried again), failed (given up)",
            self.deliveries.clone(),
        );
        // Every outcome is exported from the start (as 0), so rates have a series to start from.
        for outcome in [Outcome::Succeeded, Outcome::Retried, Outcome::Failed] {
            let _created = self.deliveries.get_or_create(&outcome.label());
        }
        registry.register(
            "webhook_outbox_depth",
            "Webhook deliveries not yet delivered nor given up",
            self.outbox_depth.clone(),
        );
    }

    /// Counts one attempt.
    pub fn record(&self, outcome: Outcome) {
        self.deliveries.get_or_create(&outcome.label()).inc();
    }

    /// Attempts counted with `outcome` so far.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.deliveries.get_or_create(&outcome.label()).get()
    }

    /// Sets the outbox depth (read from the database at scrape time, the same on every replica).
    pub fn set_outbox_depth(&self, pending: i64) {
        self.outbox_depth.set(pending);
    }
}
