//! Prometheus metrics (`GET /metrics`), text exposition format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::OutboxCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    pub runs: Counter,
    pub evaluations: Counter,
    pub rule_errors: Counter,
    pub planned: Family<KindLabel, Counter>,
    pub sent: Family<KindLabel, Counter>,
    pub failed: Family<KindLabel, Counter>,
    pub dead: Family<KindLabel, Counter>,
    pub suppressed: Family<KindLabel, Counter>,
    pub outbox: Family<StatusLabel, Gauge>,
    pub delivery_seconds: Histogram,
    pub ingested: Family<KindLabel, Counter>,
    pub ingest_rejected: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("engaged");
        let m = Self {
            runs: Counter::default(),
            evaluations: Counter::default(),
            rule_errors: Counter::default(),
            planned: Family::default(),
            sent: Family::default(),
            failed: Family::default(),
            dead: Family::default(),
            suppressed: Family::default(),
            outbox: Family::default(),
            delivery_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            ingested: Family::default(),
            ingest_rejected: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("runs", "Evaluation runs completed", m.runs.clone());
        registry.register(
            "evaluations",
            "Customer-rule evaluations",
            m.evaluations.clone(),
        );
        registry.register(
            "rule_errors",
            "Rule evaluations that failed",
            m.rule_errors.clone(),
        );
        registry.register(
            "actions_planned",
            "Actions planned (new, after dedup) by kind",
            m.planned.clone(),
        );
        registry.register("actions_sent", "Actions delivered by kind", m.sent.clone());
        registry.register(
            "actions_failed",
            "Actions failed permanently by kind",
            m.failed.clone(),
        );
        registry.register(
            "actions_dead",
            "Actions given up after retries by kind",
            m.dead.clone(),
        );
        registry.register(
            "actions_suppressed",
            "Actions not sent to suppressed addresses",
            m.suppressed.clone(),
        );
        registry.register("outbox_depth", "Outbox rows by status", m.outbox.clone());
        registry.register(
            "delivery_latency_seconds",
            "Time to deliver one action (render and send)",
            m.delivery_seconds.clone(),
        );
        registry.register(
            "ingested_messages",
            "Messages ingested over HTTP by type",
            m.ingested.clone(),
        );
        registry.register(
            "ingest_rejected_messages",
            "Messages rejected by HTTP ingestion",
            m.ingest_rejected.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn kind(kind: &str) -> KindLabel {
        KindLabel {
            kind: kind.to_owned(),
        }
    }

    pub fn set_outbox(&self, c: &OutboxCounts) {
        for (status, n) in [
            ("pending", c.pending),
            ("sending", c.sending),
            ("sent", c.sent),
            ("failed", c.failed),
            ("dead", c.dead),
        ] {
            self.outbox
                .get_or_create(&StatusLabel {
                    status: status.into(),
                })
                .set(n as i64);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
