//! Replays a subscription's history: the events of the raw topics received
//! in a time window that match it are queued as jobs, as the fan-out would
//! have queued them. A job that already exists (delivered, pending or dead
//! within `delivery.retention_secs`) is not created again, so a replay adds
//! only what the subscription never got: the events from before it was
//! created, or from while it was disabled. Dead letters are
//! [`super::queue::Queue::recover`]'s.
//!
//! One replay per subscription at a time (a lock in Redis, renewed while it
//! runs); its progress and outcome are kept in Redis for
//! `GET /api/v1/webhooks/{id}/replay`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hooklog_schemas::WebhookEvent;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::fanout::{jobs, Traced};
use super::metrics::DeliveryMetrics;
use super::queue::Queue;
use super::subscription::{rfc3339, Subscription};
use crate::batch::Record;
use crate::config::Config;
use crate::lease::Lease;

/// Matching events per enqueue (one Redis pipeline).
const CHUNK: usize = 500;

/// Records read between two progress updates of the status.
const PROGRESS_EVERY: u64 = 5_000;

/// How long the lock lives unless renewed: a killed replica frees it within.
const LOCK_TTL_SECS: u64 = 30;

/// Record timestamps are the producer's, set just after ingest received
/// the event: partitions are read from this much before `since`, and the
/// events' own receive times decide.
const CLOCK_MARGIN_MS: i64 = 60_000;

/// The events received from `since_ms` to `until_ms`, both inclusive.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Unix ms.
    pub since_ms: i64,
    /// Unix ms.
    pub until_ms: i64,
}

/// Starts replays and reports on them.
#[derive(Clone)]
pub struct Replays {
    /// Brokers and raw topics.
    pub config: Arc<Config>,
    /// Where jobs go.
    pub queue: Queue,
    /// Locks and status.
    pub conn: ConnectionManager,
    /// `redis.key_prefix`.
    pub prefix: String,
    /// `hooklog_delivery_jobs_replayed_total`.
    pub metrics: Arc<DeliveryMetrics>,
}

impl Replays {
    fn lock_key(&self, sub: &str) -> String {
        format!("{}dlv:replay-lock:{sub}", self.prefix)
    }
    fn status_key(&self, sub: &str) -> String {
        format!("{}dlv:replay:{sub}", self.prefix)
    }

    /// Starts replaying `window` to `sub` in the background; false while a
    /// replay of `sub` runs (on any replica).
    pub async fn start(&self, sub: Subscription, window: Window) -> anyhow::Result<bool> {
        let ttl = Duration::from_secs(LOCK_TTL_SECS);
        let Some(lease) =
            Lease::try_acquire(self.conn.clone(), self.lock_key(&sub.id), ttl).await?
        else {
            return Ok(false);
        };
        let mut conn = self.conn.clone();
        let status = self.status_key(&sub.id);
        let _: () = redis::pipe()
            .atomic()
            .del(&status)
            .ignore()
            .hset_multiple(
                &status,
                &[
                    ("state", "running".to_owned()),
                    ("since", rfc3339(window.since_ms)),
                    ("until", rfc3339(window.until_ms)),
                    ("started_at", rfc3339(now_ms())),
                    ("scanned", "0".to_owned()),
                    ("queued", "0".to_owned()),
                ],
            )
            .ignore()
            .expire(&status, self.queue.retention_secs() as i64)
            .ignore()
            .query_async(&mut conn)
            .await?;
        info!(subscription = %sub.id, since = %rfc3339(window.since_ms), until = %rfc3339(window.until_ms), "Replay started.");
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.run(&sub, window).await;
            let mut fields = vec![("finished_at", rfc3339(now_ms()))];
            match &outcome {
                Ok(()) => {
                    fields.push(("state", "done".to_owned()));
                    info!(subscription = %sub.id, "Replay finished.");
                }
                Err(e) => {
                    fields.push(("state", "failed".to_owned()));
                    fields.push(("error", e.to_string()));
                    warn!(subscription = %sub.id, error = %e, "Replay failed.");
                }
            }
            let mut conn = this.conn.clone();
            let _: Result<(), _> = conn.hset_multiple(this.status_key(&sub.id), &fields).await;
            lease.release().await;
        });
        Ok(true)
    }

    /// The latest replay of `sub`, if one was started within the retention.
    /// A replay still marked running whose lock is gone was cut off (its
    /// replica stopped): `interrupted`.
    pub async fn status(&self, sub: &str) -> Result<Option<Value>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let (mut h, locked): (HashMap<String, String>, bool) = redis::pipe()
            .hgetall(self.status_key(sub))
            .exists(self.lock_key(sub))
            .query_async(&mut conn)
            .await?;
        if h.is_empty() {
            return Ok(None);
        }
        if h.get("state").map(String::as_str) == Some("running") && !locked {
            h.insert("state".into(), "interrupted".into());
            h.insert(
                "error".into(),
                "the replica running it stopped; replay again (what it queued is skipped)".into(),
            );
        }
        let count = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Ok(Some(json!({
            "id": sub,
            "state": h.get("state"),
            "since": h.get("since"),
            "until": h.get("until"),
            "started_at": h.get("started_at"),
            "finished_at": h.get("finished_at"),
            "scanned": count("scanned"),
            "queued": count("queued"),
            "error": h.get("error"),
        })))
    }

    /// Reads every raw partition from about `since` up to the high
    /// watermark taken now and queues the matching events.
    async fn run(&self, sub: &Subscription, window: Window) -> anyhow::Result<()> {
        let kafka = &self.config.kafka;
        let mut cfg = kafka.base();
        cfg.set("group.id", format!("hooklog-replay-{}", sub.id));
        cfg.set("enable.auto.commit", "false");
        // Bounded by throughput, not latency (Tansu holds every fetch for
        // the full wait).
        cfg.set("fetch.wait.max.ms", "10");
        let consumer: StreamConsumer = kafka.finish(cfg).create()?;
        let consumer = Arc::new(consumer);
        let (targets, tpl) = {
            let consumer = consumer.clone();
            let topics = self.config.raw_topics();
            tokio::task::spawn_blocking(move || starting_points(&consumer, &topics, window))
                .await??
        };
        let mut targets = targets;
        if targets.is_empty() {
            return Ok(());
        }
        consumer.assign(&tpl)?;
        // The subscription as it would match events created at `since`.
        let mut matching = sub.clone();
        matching.created_at_ms = window.since_ms;
        matching.disabled = None;
        let matching = [matching];
        let (mut scanned, mut queued) = (0u64, 0u64);
        let mut events: Vec<Traced> = Vec::new();
        while !targets.is_empty() {
            let m = crate::rebuild::next_replayed(&consumer, targets.len()).await?;
            let r = Record::copy_of(&m, true);
            let key = (r.topic.clone(), r.partition);
            if targets.get(&key).is_some_and(|high| r.offset + 1 >= *high) {
                targets.remove(&key);
            }
            scanned += 1;
            // Undecodable records are the processor's to dead-letter.
            let event = r
                .payload
                .as_deref()
                .and_then(|p| WebhookEvent::decode(p).ok());
            if let Some(event) = event.filter(|e| e.received_at_ms <= window.until_ms) {
                let tp = r
                    .header(hooklog_schemas::headers::TRACEPARENT)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                events.push((event, tp));
            }
            if events.len() >= CHUNK || scanned % PROGRESS_EVERY == 0 {
                queued += self.enqueue(&matching, &events).await?;
                events.clear();
                self.progress(&sub.id, scanned, queued).await;
            }
        }
        queued += self.enqueue(&matching, &events).await?;
        self.progress(&sub.id, scanned, queued).await;
        Ok(())
    }

    async fn enqueue(&self, subs: &[Subscription], events: &[Traced]) -> anyhow::Result<u64> {
        let jobs = jobs(subs, events);
        if jobs.is_empty() {
            return Ok(0);
        }
        let n = self.queue.enqueue(&jobs, now_ms()).await?;
        self.metrics.replayed(n);
        Ok(n)
    }

    async fn progress(&self, sub: &str, scanned: u64, queued: u64) {
        let mut conn = self.conn.clone();
        let _: Result<(), _> = conn
            .hset_multiple(
                self.status_key(sub),
                &[("scanned", scanned), ("queued", queued)],
            )
            .await;
    }
}

/// Partitions to read (to their high watermark now) and where each starts:
/// the first record stamped at `since` less the clock margin.
type Targets = HashMap<(String, i32), i64>;

fn starting_points(
    consumer: &StreamConsumer,
    topics: &[String],
    window: Window,
) -> anyhow::Result<(Targets, TopicPartitionList)> {
    let md = consumer.fetch_metadata(None, Duration::from_secs(30))?;
    let mut by_time = TopicPartitionList::new();
    let mut highs: Targets = HashMap::new();
    for topic in topics {
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            anyhow::bail!("raw topic {topic} does not exist");
        };
        for p in t.partitions() {
            let (low, high) = crate::rebuild::watermarks(consumer, topic, p.id())?;
            if high > low {
                highs.insert((topic.clone(), p.id()), high);
                by_time.add_partition_offset(
                    topic,
                    p.id(),
                    // librdkafka reads negative values as logical
                    // offsets (END, BEGINNING, tail): never pass one.
                    Offset::Offset((window.since_ms - CLOCK_MARGIN_MS).max(0)),
                )?;
            }
        }
    }
    let mut targets = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    if highs.is_empty() {
        return Ok((targets, tpl));
    }
    let starts = consumer.offsets_for_times(by_time, Duration::from_secs(30))?;
    for e in starts.elements() {
        let key = (e.topic().to_owned(), e.partition());
        let high = highs[&key];
        let start = match e.offset() {
            Offset::Offset(o) if o < high => Offset::Offset(o),
            // No record stamped that late, or one past what is there now.
            Offset::End | Offset::Offset(_) => continue,
            _ => Offset::Beginning,
        };
        tpl.add_partition_offset(e.topic(), e.partition(), start)?;
        targets.insert(key, high);
    }
    Ok((targets, tpl))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
