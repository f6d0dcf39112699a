//! The live consume loop: batch, apply to Redis, publish changelog and dead
//! letters, and only then store the batch's offsets (committed in the
//! background by librdkafka). Transient failures pause and retry the whole
//! batch (the apply is idempotent); nothing is skipped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::batch::{plan, Record};
use crate::changelog::Publisher;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::projection::spec::ProjectionSpec;
use crate::projection::store::{EntityState, Store, Target};
use crate::spans::{BatchSpans, Phase};

/// Shared health flags for `/readyz`.
#[derive(Default)]
pub struct Health {
    /// True while a dependency is down and the loop is retrying.
    pub paused: AtomicBool,
    /// True once the consumer is running.
    pub running: AtomicBool,
}

/// Creates the live group consumer.
pub fn consumer(config: &Config) -> Result<StreamConsumer, KafkaError> {
    group_consumer(config, &config.processor.group_id)
}

/// A consumer of the raw topics in group `group_id` (processors and
/// deliverers use separate groups, each reading every event).
pub fn group_consumer(config: &Config, group_id: &str) -> Result<StreamConsumer, KafkaError> {
    let kafka = &config.kafka;
    let mut cfg = kafka.base();
    cfg.set("group.id", group_id);
    // Offsets are stored only after a batch is fully applied, then committed
    // in the background: at-least-once, without a sync commit per record.
    cfg.set("enable.auto.commit", "true");
    cfg.set("enable.auto.offset.store", "false");
    cfg.set("auto.commit.interval.ms", "1000");
    // A new group starts from the beginning of the log: nothing is missed.
    cfg.set("auto.offset.reset", "earliest");
    // Brokers such as Tansu hold a fetch for the full wait: keep it short.
    cfg.set("fetch.wait.max.ms", "50");
    cfg.set("session.timeout.ms", "10000");
    // Also the rebalance timeout: how long a rebalance waits for members to
    // rejoin. Tansu 0.6.0 was seen holding a new member for over a minute
    // after another was killed -9; 30 s bounds that. The loop polls far more
    // often, except while it retries a batch through an outage, after which
    // it simply rejoins.
    cfg.set("max.poll.interval.ms", "30000");
    cfg.set("heartbeat.interval.ms", "1000");
    let consumer: StreamConsumer = kafka.finish(cfg).create()?;
    let topics = config.raw_topics();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    Ok(consumer)
}

/// Everything the loop needs.
pub struct Pipeline {
    /// Projection definitions.
    pub projections: Vec<ProjectionSpec>,
    /// Redis.
    pub store: Store,
    /// Changelog / DLQ producer.
    pub publisher: Publisher,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health flags.
    pub health: Arc<Health>,
    /// Records per batch.
    pub batch_size: usize,
    /// Max wait to fill a batch.
    pub batch_wait: Duration,
}

/// Test-only fault hook: `HOOKLOG_FAULT=crash_before_changelog` makes the
/// process exit right after its first Redis apply, before the changelog is
/// written, to prove redelivery re-emits the state.
fn crash_before_changelog() -> bool {
    std::env::var("HOOKLOG_FAULT").is_ok_and(|v| v == "crash_before_changelog")
}

impl Pipeline {
    /// Runs until `shutdown`: finishes the batch in flight, commits, returns.
    pub async fn run(
        &self,
        consumer: Arc<StreamConsumer>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.health.running.store(true, Ordering::Relaxed);
        info!(projections = self.projections.len(), "Processor consuming.");
        while let Some(batch) =
            next_batch(&consumer, self.batch_size, self.batch_wait, &shutdown).await
        {
            self.metrics.consumed(batch.len() as u64);
            if !self.process(&batch, &shutdown).await {
                break; // shutdown while retrying: leave offsets unstored
            }
            store_offsets(&consumer, &batch);
        }
        info!("Processor stopping: committing offsets.");
        commit_and_leave(consumer).await;
        Ok(())
    }

    /// Processes one batch until it succeeds; false if shutdown came first.
    async fn process(&self, batch: &[Record], shutdown: &CancellationToken) -> bool {
        let started = Instant::now();
        let plan = plan(self.projections.iter(), batch);
        for _ in 0..plan.unmatched {
            self.metrics.unmatched();
        }
        let spans = BatchSpans::live(batch);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_process(batch, &plan, &spans).await {
                Ok(()) => break,
                Err((dependency, e)) => {
                    self.metrics.retry(dependency);
                    self.metrics.set_paused(true);
                    self.health.paused.store(true, Ordering::Relaxed);
                    warn!(dependency, error = %e, backoff_ms = backoff.as_millis() as u64, "Transient failure; retrying batch.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if self.health.paused.swap(false, Ordering::Relaxed) {
            info!("Dependencies back; resumed.");
            self.metrics.set_paused(false);
        }
        self.metrics.batch(started.elapsed().as_secs_f64());
        true
    }

    async fn try_process(
        &self,
        batch: &[Record],
        plan: &crate::batch::Plan,
        spans: &BatchSpans,
    ) -> Result<(), (&'static str, String)> {
        let refs: Vec<_> = plan
            .updates
            .iter()
            .map(|(u, id, _)| (u, id.as_str()))
            .collect();
        let apply_spans = spans.phase(Phase::Apply);
        let results = self
            .store
            .apply_batch(&refs, Target::Live)
            .await
            .map_err(|e| ("redis", e.to_string()))?;
        drop(apply_spans);
        let changelog_spans = spans.phase(Phase::Changelog);
        if !results.is_empty() && crash_before_changelog() {
            warn!("Fault hook: exiting between apply and changelog.");
            std::process::exit(86);
        }
        // One changelog record per entity per batch: its state after the
        // batch (apply results come back in order, so the last one wins).
        // Compaction keeps only the latest per key anyway, and this divides
        // the changelog writes by the events per entity per batch.
        let mut states = Vec::with_capacity(results.len());
        let mut slot: HashMap<(String, String), usize> = HashMap::new();
        for (res, (up, _, idx)) in results.into_iter().zip(&plan.updates) {
            self.metrics.applied(&up.projection, res.applied);
            let Some(state) = res.state else {
                continue; // a later update of the same entity carries it
            };
            // Duplicates re-emit the current state too: if a previous run
            // died between apply and changelog, this is the delivery.
            let traceparent = spans.traceparent(&changelog_spans, batch, *idx);
            let key = (state.projection.clone(), state.key.clone());
            match slot.get(&key) {
                Some(&i) => states[i] = (state, traceparent),
                None => {
                    slot.insert(key, states.len());
                    states.push((state, traceparent));
                }
            }
        }
        self.publish_states(states).await?;
        drop(changelog_spans);
        if !plan.poison.is_empty() {
            let dead: Vec<_> = plan
                .poison
                .iter()
                .map(|(i, _, detail)| (&batch[*i], detail.as_str()))
                .collect();
            self.publisher
                .dead_letters(&dead)
                .await
                .map_err(|e| ("kafka", e.to_string()))?;
            for (i, reason, detail) in &plan.poison {
                let r = &batch[*i];
                let event_id = r.key.as_deref().map(String::from_utf8_lossy);
                let trace_id = r
                    .header(hooklog_schemas::headers::TRACEPARENT)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(hooklog_schemas::trace::TraceParent::parse)
                    .map(|t| t.trace_id);
                warn!(topic = %r.topic, partition = r.partition, offset = r.offset, event_id = event_id.as_deref().unwrap_or(""), trace_id = trace_id.as_deref().unwrap_or(""), reason, detail, "Record dead-lettered.");
            }
        }
        // Count DLQ metrics once, after success.
        for (_, reason, _) in &plan.poison {
            self.metrics.dead_lettered(reason);
        }
        Ok(())
    }
}

impl Pipeline {
    /// Publishes states, then makes sure the last changelog record of each
    /// entity is its current state. Processors that share an entity (its
    /// events are spread over partitions by event id) can publish out of
    /// order: A applies S1, B applies S2 and publishes S2, then A publishes
    /// S1. So after the acks each publisher re-reads its entities and
    /// publishes again whatever changed meanwhile; the last publisher to
    /// check always sees the final state. A crash before the check leaves
    /// the batch uncommitted, and its redelivery re-emits the current state.
    async fn publish_states(
        &self,
        mut states: Vec<(EntityState, Option<Vec<u8>>)>,
    ) -> Result<(), (&'static str, String)> {
        for _ in 0..10 {
            if states.is_empty() {
                return Ok(());
            }
            self.publisher
                .states(&states)
                .await
                .map_err(|e| ("kafka", e.to_string()))?;
            // Cheap check first (version and `~rev`), full reads only for
            // the entities that changed since.
            let keys: Vec<(&str, &str)> = states
                .iter()
                .map(|(s, _)| (s.projection.as_str(), s.key.as_str()))
                .collect();
            let revs = self
                .store
                .revisions(&keys)
                .await
                .map_err(|e| ("redis", e.to_string()))?;
            let moved: Vec<_> = states
                .into_iter()
                .zip(revs)
                .filter(|((s, _), now)| (s.version, s.rev) != *now)
                .map(|(state, _)| state)
                .collect();
            if moved.is_empty() {
                return Ok(());
            }
            let keys: Vec<(&str, &str)> = moved
                .iter()
                .map(|(s, _)| (s.projection.as_str(), s.key.as_str()))
                .collect();
            let now = self
                .store
                .read_many(&keys)
                .await
                .map_err(|e| ("redis", e.to_string()))?;
            states = moved
                .into_iter()
                .zip(now)
                .filter_map(|((published, tp), current)| {
                    current.filter(|c| *c != published).map(|c| (c, tp))
                })
                .collect();
        }
        Ok(())
    }
}

/// Waits for the next batch: the first record, then as many as arrive
/// within `wait`, up to `size`. None on shutdown.
pub async fn next_batch(
    consumer: &StreamConsumer,
    size: usize,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Option<Vec<Record>> {
    let first = loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = consumer.recv() => m,
        };
        match m {
            Ok(m) => break Record::copy_of(&m),
            Err(e) => {
                warn!(error = %e, "Consumer error.");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut batch: Vec<Record> = vec![first];
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < size {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(Record::copy_of(&m)),
            Ok(Err(e)) => warn!(error = %e, "Consumer error."),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Stores the offsets of a fully handled batch (committed in the background).
pub fn store_offsets(consumer: &StreamConsumer, batch: &[Record]) {
    let mut last: HashMap<(&str, i32), i64> = HashMap::new();
    for r in batch {
        let e = last
            .entry((r.topic.as_str(), r.partition))
            .or_insert(r.offset);
        *e = (*e).max(r.offset);
    }
    for ((topic, partition), offset) in last {
        // Fails only if the partition was revoked meanwhile; its new
        // owner re-reads the batch, and handling is idempotent.
        if let Err(e) = consumer.store_offset(topic, partition, offset) {
            debug!(topic, partition, error = %e, "Offset not stored.");
        }
    }
}

/// Commits stored offsets and leaves the group, bounded: with the broker
/// gone a sync commit would wait for its socket timeout. Uncommitted
/// records are only handled again, idempotently.
pub async fn commit_and_leave(consumer: Arc<StreamConsumer>) {
    let commit = tokio::task::spawn_blocking(move || {
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored yet is also reported as an error.
            debug!(error = %e, "Final commit.");
        }
        consumer.unsubscribe();
    });
    if tokio::time::timeout(Duration::from_secs(5), commit)
        .await
        .is_err()
    {
        warn!("Final offset commit timed out; the next owner handles those records again, idempotently.");
    }
}

/// Updates the lag gauges (blocking: asks the broker for watermarks).
pub fn report_lag(consumer: &StreamConsumer, metrics: &Metrics) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for el in positions.elements() {
        if let Ok((_, high)) =
            consumer.fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(2))
        {
            let pos = el.offset().to_raw().unwrap_or(0).max(0);
            metrics.lag(el.topic(), el.partition(), (high - pos).max(0));
        }
    }
}
