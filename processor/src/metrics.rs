//! Prometheus metrics of the processor, one helper per event. Labels are
//! bounded: projection, topic, partition, reason, outcome.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabels {
    projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

/// All processor metrics.
pub struct Metrics {
    registry: Registry,
    consumed: Counter,
    applied: Family<ProjectionLabels, Counter>,
    duplicates: Family<ProjectionLabels, Counter>,
    skipped: Counter,
    dlq: Family<ReasonLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    lag: Family<PartitionLabels, Gauge<i64, AtomicI64>>,
    paused: Gauge<i64, AtomicI64>,
    batch_seconds: Histogram,
    lost_watches: Counter,
    rebuild_records: Family<ProjectionLabels, Gauge<i64, AtomicI64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hooklog_processor");
        let m = Self {
            consumed: Counter::default(),
            applied: Family::default(),
            duplicates: Family::default(),
            skipped: Counter::default(),
            dlq: Family::default(),
            retries: Family::default(),
            lag: Family::default(),
            paused: Gauge::default(),
            batch_seconds: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            lost_watches: Counter::default(),
            rebuild_records: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "consumed_records",
            "Raw records consumed",
            m.consumed.clone(),
        );
        registry.register(
            "applied_events",
            "Events applied to a projection (first time)",
            m.applied.clone(),
        );
        registry.register(
            "duplicate_events",
            "Events skipped as already applied (by event id)",
            m.duplicates.clone(),
        );
        registry.register(
            "unmatched_events",
            "Events no projection rule matches (skipped, not DLQ'd)",
            m.skipped.clone(),
        );
        registry.register(
            "dlq_records",
            "Records sent to hooklog.dlq by reason",
            m.dlq.clone(),
        );
        registry.register(
            "transient_retries",
            "Batch retries after a transient failure, by dependency",
            m.retries.clone(),
        );
        registry.register(
            "consumer_lag_records",
            "High watermark minus position per partition",
            m.lag.clone(),
        );
        registry.register(
            "paused",
            "1 while the processor waits for Redis or Kafka to come back",
            m.paused.clone(),
        );
        registry.register(
            "apply_batch_duration_seconds",
            "Time from a batch's plan and Redis apply to its last changelog and DLQ ack (batches overlap: while one waits for acks, the next is applied)",
            m.batch_seconds.clone(),
        );
        registry.register(
            "lost_watched_commits",
            "Watched Redis transactions that did not run because another writer wrote in their stripes meanwhile; each batch shard was then written with the commit script",
            m.lost_watches.clone(),
        );
        registry.register(
            "rebuild_records_done",
            "Records replayed by the running rebuild",
            m.rebuild_records.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Records consumed.
    pub fn consumed(&self, n: u64) {
        self.consumed.inc_by(n);
    }
    /// A batch's apply results for one projection: updates applied for the
    /// first time, and duplicates.
    pub fn applied(&self, projection: &str, applied: u64, duplicates: u64) {
        let l = ProjectionLabels {
            projection: projection.into(),
        };
        if applied > 0 {
            self.applied.get_or_create(&l).inc_by(applied);
        }
        if duplicates > 0 {
            self.duplicates.get_or_create(&l).inc_by(duplicates);
        }
    }
    /// Events matching no projection.
    pub fn unmatched(&self, n: u64) {
        self.skipped.inc_by(n);
    }
    /// A record dead-lettered.
    pub fn dead_lettered(&self, reason: &'static str) {
        self.dlq.get_or_create(&ReasonLabels { reason }).inc();
    }
    /// A transient failure; `dependency` is `redis` or `kafka`.
    pub fn retry(&self, dependency: &'static str) {
        self.retries
            .get_or_create(&ReasonLabels { reason: dependency })
            .inc();
    }
    /// Paused flag.
    pub fn set_paused(&self, paused: bool) {
        self.paused.set(i64::from(paused));
    }
    /// Lag of one partition.
    pub fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lag
            .get_or_create(&PartitionLabels {
                topic: topic.into(),
                partition,
            })
            .set(lag);
    }
    /// A batch took `secs`.
    pub fn batch(&self, secs: f64) {
        self.batch_seconds.observe(secs);
    }
    /// The live store's lost watches so far (`Store::lost_watches`).
    pub fn lost_watches(&self, total: u64) {
        let counted = self.lost_watches.get();
        if total > counted {
            self.lost_watches.inc_by(total - counted);
        }
    }
    /// Rebuild progress.
    pub fn rebuild_progress(&self, projection: &str, done: i64) {
        self.rebuild_records
            .get_or_create(&ProjectionLabels {
                projection: projection.into(),
            })
            .set(done);
    }
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_watches_count_the_stores_running_total_once() {
        let m = Metrics::default();
        m.lost_watches(0);
        m.lost_watches(3);
        m.lost_watches(3);
        m.lost_watches(5);
        let text = m.render();
        assert!(
            text.contains("hooklog_processor_lost_watched_commits_total 5"),
            "{text}"
        );
    }
}
