//! Prometheus metrics of ingest, one helper per event. Labels are bounded:
//! source (configured names only), scheme, status, reason, key id.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    source: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    source: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    source: String,
    key_id: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

/// All ingest metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    verify_failures: Family<FailureLabels, Counter>,
    verifications: Family<KeyLabels, Counter>,
    publish_seconds: Family<SourceLabels, Histogram>,
    publish_errors: Family<SourceLabels, Counter>,
    in_flight: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hooklog_ingest");
        let requests = Family::<RequestLabels, Counter>::default();
        let verify_failures = Family::<FailureLabels, Counter>::default();
        let verifications = Family::<KeyLabels, Counter>::default();
        let publish_seconds = Family::<SourceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        let publish_errors = Family::<SourceLabels, Counter>::default();
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "requests",
            "HTTP webhook requests by source and status",
            requests.clone(),
        );
        registry.register(
            "verification_failures",
            "Rejected signatures by source and reason",
            verify_failures.clone(),
        );
        registry.register(
            "verifications",
            "Verified requests by source and verifying key id (secret index)",
            verifications.clone(),
        );
        registry.register(
            "publish_duration_seconds",
            "Time from publish to broker ack (acks=all)",
            publish_seconds.clone(),
        );
        registry.register(
            "publish_errors",
            "Publishes that failed or timed out (answered 503)",
            publish_errors.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Webhook requests being handled",
            in_flight.clone(),
        );
        Self {
            registry,
            requests,
            verify_failures,
            verifications,
            publish_seconds,
            publish_errors,
            in_flight,
        }
    }
}

impl Metrics {
    /// A finished webhook request.
    pub fn request(&self, source: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                source: source.into(),
                status,
            })
            .inc();
    }

    /// A rejected signature.
    pub fn verify_failed(&self, source: &str, reason: &'static str) {
        self.verify_failures
            .get_or_create(&FailureLabels {
                source: source.into(),
                reason,
            })
            .inc();
    }

    /// A verified signature and which key verified it.
    pub fn verified(&self, source: &str, key_id: usize) {
        self.verifications
            .get_or_create(&KeyLabels {
                source: source.into(),
                key_id: key_id as u32,
            })
            .inc();
    }

    /// A publish finished (acked) after `secs`.
    pub fn published(&self, source: &str, secs: f64) {
        self.publish_seconds
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .observe(secs);
    }

    /// A publish failed.
    pub fn publish_failed(&self, source: &str) {
        self.publish_errors
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .inc();
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge<i64, AtomicI64> {
        &self.in_flight
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
