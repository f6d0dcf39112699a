//! Prometheus metrics of `hooklog-processor deliver` (prefix
//! `hooklog_delivery_`). Labels are bounded: outcome and reason only, never
//! a subscription id, URL or event id.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// All delivery metrics.
pub struct DeliveryMetrics {
    registry: Registry,
    consumed: Counter,
    enqueued: Counter,
    attempts: Family<OutcomeLabels, Counter>,
    dlq: Family<ReasonLabels, Counter>,
    disabled: Family<ReasonLabels, Counter>,
    pending: Gauge<i64, AtomicI64>,
    paused: Gauge<i64, AtomicI64>,
    latency: Histogram,
    no_room: Counter,
    recovered: Counter,
    replayed: Counter,
}

impl Default for DeliveryMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hooklog_delivery");
        let consumed = Counter::default();
        let enqueued = Counter::default();
        let attempts = Family::<OutcomeLabels, Counter>::default();
        let dlq = Family::<ReasonLabels, Counter>::default();
        let disabled = Family::<ReasonLabels, Counter>::default();
        let pending = Gauge::<i64, AtomicI64>::default();
        let paused = Gauge::<i64, AtomicI64>::default();
        let no_room = Counter::default();
        let recovered = Counter::default();
        let replayed = Counter::default();
        let latency = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "consumed_records",
            "Raw records read by the fan-out",
            consumed.clone(),
        );
        registry.register(
            "enqueued_jobs",
            "Delivery jobs created (one per matching subscription and event)",
            enqueued.clone(),
        );
        registry.register(
            "attempts",
            "Delivery attempts by outcome (delivered, retrying, failed, dead, disabled)",
            attempts.clone(),
        );
        registry.register(
            "dlq_records",
            "Deliveries sent to hooklog.delivery.dlq by reason",
            dlq.clone(),
        );
        registry.register(
            "subscriptions_disabled",
            "Subscriptions disabled automatically, by reason (gone, failing)",
            disabled.clone(),
        );
        registry.register(
            "pending_jobs",
            "Jobs waiting for a first attempt or a retry",
            pending.clone(),
        );
        registry.register(
            "paused",
            "1 while the fan-out waits for Redis to come back",
            paused.clone(),
        );
        registry.register(
            "attempt_duration_seconds",
            "Latency of delivery attempts",
            latency.clone(),
        );
        registry.register(
            "jobs_waiting_for_room",
            "Jobs put back unattempted because their body had no room among the bodies in flight (delivery.max_in_flight_bytes)",
            no_room.clone(),
        );
        registry.register(
            "jobs_recovered",
            "Dead-lettered jobs put back in their queue by POST /api/v1/webhooks/{id}/recover",
            recovered.clone(),
        );
        registry.register(
            "jobs_replayed",
            "Jobs created by replays (POST /api/v1/webhooks/{id}/replay)",
            replayed.clone(),
        );
        Self {
            registry,
            consumed,
            enqueued,
            attempts,
            dlq,
            disabled,
            pending,
            paused,
            latency,
            no_room,
            recovered,
            replayed,
        }
    }
}

impl DeliveryMetrics {
    /// Raw records read.
    pub fn consumed(&self, n: u64) {
        self.consumed.inc_by(n);
    }
    /// Jobs created.
    pub fn enqueued(&self, n: u64) {
        self.enqueued.inc_by(n);
    }
    /// One attempt's outcome and latency.
    pub fn attempt(&self, outcome: &'static str, secs: f64) {
        self.attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.latency.observe(secs);
    }
    /// A dead letter.
    pub fn dead_lettered(&self, reason: &'static str) {
        self.dlq.get_or_create(&ReasonLabels { reason }).inc();
    }
    /// A subscription disabled.
    pub fn disabled(&self, reason: &'static str) {
        self.disabled.get_or_create(&ReasonLabels { reason }).inc();
    }
    /// A job put back for want of room for its body.
    pub fn waited_for_room(&self) {
        self.no_room.inc();
    }
    /// Dead-lettered jobs put back in their queue.
    pub fn recovered(&self, n: u64) {
        self.recovered.inc_by(n);
    }
    /// Jobs created by a replay.
    pub fn replayed(&self, n: u64) {
        self.replayed.inc_by(n);
    }
    /// Pending jobs in all.
    pub fn set_pending(&self, n: i64) {
        self.pending.set(n);
    }
    /// Paused flag.
    pub fn set_paused(&self, paused: bool) {
        self.paused.set(i64::from(paused));
    }
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
