//! The consumer-group side shared by the live pipeline and the deliverer:
//! creating a group consumer on the raw topics, reading batches, storing
//! and committing offsets, and reporting lag.

use std::sync::Arc;
use std::time::Duration;

use foldhash::{HashMap, HashMapExt};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::batch::{BatchLimit, Filling, Record};
use crate::config::Config;
use crate::metrics::Metrics;

/// A consumer in a consumer group, logging its rebalances.
pub type GroupConsumer = StreamConsumer<RebalanceLog>;

/// Logs each partition assignment and revocation at info: when a replica
/// sits idle or lag builds up, the rebalances are the first thing to read.
pub struct RebalanceLog;

impl ClientContext for RebalanceLog {}

impl ConsumerContext for RebalanceLog {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                info!(partitions = %partition_list(tpl), "Partitions assigned.");
            }
            Rebalance::Revoke(tpl) => {
                info!(partitions = %partition_list(tpl), "Partitions revoked.");
            }
            Rebalance::Error(e) => warn!(error = %e, "Rebalance failed."),
        }
    }
}

/// `topic/partition` pairs, comma-separated.
fn partition_list(tpl: &rdkafka::TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Creates the live group consumer.
pub fn consumer(config: &Config) -> Result<GroupConsumer, KafkaError> {
    group_consumer(config, &config.processor.group_id)
}

/// A consumer of the raw topics in group `group_id` (processors and
/// deliverers use separate groups, each reading every event).
pub fn group_consumer(config: &Config, group_id: &str) -> Result<GroupConsumer, KafkaError> {
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
    let consumer: GroupConsumer = kafka.finish(cfg).create_with_context(RebalanceLog)?;
    let topics = config.raw_topics();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&refs)?;
    Ok(consumer)
}

/// Waits for the next batch: the first record, then as many as arrive
/// within `wait`, until `limit` says it is full. None on shutdown.
pub async fn next_batch(
    consumer: &GroupConsumer,
    limit: BatchLimit,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Option<Vec<Record>> {
    let first = loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return None,
            m = consumer.recv() => m,
        };
        match m {
            Ok(m) => break Record::copy_of(&m, true),
            Err(e) => {
                warn!(error = %e, "Consumer error.");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut batch = Filling::new(limit, first);
    let deadline = tokio::time::Instant::now() + wait;
    while !batch.is_full() {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(Record::copy_of(&m, true)),
            Ok(Err(e)) => warn!(error = %e, "Consumer error."),
            Err(_) => break,
        }
    }
    Some(batch.into_records())
}

/// Stores the offsets of a fully handled batch (committed in the background).
pub fn store_offsets(consumer: &GroupConsumer, batch: &[Record]) {
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
pub async fn commit_and_leave(consumer: Arc<GroupConsumer>) {
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
pub fn report_lag(consumer: &GroupConsumer, metrics: &Metrics) {
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
