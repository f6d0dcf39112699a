//! The live consume loop, in overlapping stages: fetch and plan batches;
//! apply them to Redis in one lane per shard of the entities; then publish
//! the changelog and dead letters, and only then store the batch's offsets
//! (committed in the background by librdkafka). Transient failures pause
//! the loop that met them and retry its work (the apply is idempotent);
//! nothing is skipped.

mod group;
mod health;
mod unpublished;

pub use group::{
    commit_and_leave, consumer, group_consumer, next_batch, report_lag, store_offsets,
    GroupConsumer, RebalanceLog,
};
pub use health::{Health, Paused};

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::batch::{plan, BatchLimit, Plan, Record};
use crate::changelog::Publisher;
use crate::metrics::Metrics;
use crate::projection::spec::ProjectionSpec;
use crate::projection::store::{
    shard_of, Applied, EntityState, Store, Target, WriteCounts, SHARDS,
};
use crate::spans::{BatchSpans, Phase};
use unpublished::{EntityId, Unpublished};

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
    /// When a batch is full (records, bytes).
    pub batch: BatchLimit,
    /// Max wait to fill a batch.
    pub batch_wait: Duration,
}

/// Test-only fault hook: `HOOKLOG_FAULT=crash_before_changelog` makes the
/// process exit right after its first Redis apply, before the changelog is
/// written, to prove redelivery re-emits the state.
fn crash_before_changelog() -> bool {
    std::env::var("HOOKLOG_FAULT").is_ok_and(|v| v == "crash_before_changelog")
}

/// Batches each apply lane may have queued: enough to keep every lane
/// busy while the others catch up, few enough to bound the memory.
const LANE_QUEUE: usize = 2;

/// A planned batch, waiting in the collector for its apply lanes.
struct PlannedBatch {
    batch: Vec<Record>,
    plan: Arc<Plan>,
    /// Every entity the batch updates, as registered in [`Unpublished`].
    entities: Vec<EntityId>,
    spans: BatchSpans,
    /// The records' `hooklog.apply` spans: they end when every lane is done.
    apply_spans: Vec<tracing::Span>,
    started: Instant,
}

/// One apply lane's part of a batch: the positions in `plan.updates` of
/// the updates whose entities fall in its shard.
struct LaneJob {
    plan: Arc<Plan>,
    positions: Vec<usize>,
}

/// What a lane did with a job (positions and their results), or None when
/// it stopped on shutdown while retrying.
type LaneResult = Option<(Vec<usize>, Vec<Applied>)>;

/// One projection's apply results in a batch.
struct Tally {
    /// The write counters at the earliest read.
    since: WriteCounts,
    applied: u64,
    duplicates: u64,
}

impl Tally {
    fn new(since: WriteCounts) -> Self {
        Self {
            since,
            applied: 0,
            duplicates: 0,
        }
    }

    fn add(&mut self, res: &Applied) {
        if res.since.total < self.since.total {
            self.since = res.since;
        }
        if res.applied {
            self.applied += 1;
        } else {
            self.duplicates += 1;
        }
    }
}

/// A batch applied to Redis, on its way to the publish stage.
struct AppliedBatch {
    batch: Vec<Record>,
    plan: Arc<Plan>,
    /// Every entity the batch updates, as registered in [`Unpublished`].
    entities: Vec<EntityId>,
    /// The state of each entity the batch changed (its last update's), with
    /// the `traceparent` for its changelog record.
    states: Vec<(EntityState, Option<Vec<u8>>)>,
    /// Per projection, its write counters at the batch's earliest read.
    since: Vec<(String, WriteCounts)>,
    /// The records' `hooklog.changelog` spans: they end with the publish.
    changelog_spans: Vec<tracing::Span>,
    started: Instant,
}

impl Pipeline {
    /// Runs until `shutdown`: finishes the batches in flight, commits,
    /// returns.
    ///
    /// Three stages overlap. This loop fetches and plans batches. The apply
    /// runs in [`SHARDS`] lanes, one per shard of the entities: each lane
    /// applies its part of each batch in batch order, so an entity's updates
    /// stay in order while one lane folds and another waits for Redis, and a
    /// lane need not wait for the others to finish a batch before starting
    /// its part of the next. A collector joins each batch's lane results in
    /// batch order and hands the batch to the publish stage, which stores
    /// its offsets only once its changelog and dead letters are
    /// acknowledged, so a crash anywhere leaves the unpublished batches
    /// uncommitted (their redelivery applies nothing twice and re-emits the
    /// current states).
    pub async fn run(
        self: Arc<Self>,
        consumer: Arc<GroupConsumer>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.health.running.store(true, Ordering::Relaxed);
        info!(projections = self.projections.len(), "Processor consuming.");
        let unpublished = Arc::new(Unpublished::default());
        let (applied_tx, mut applied_rx) = mpsc::channel::<AppliedBatch>(1);
        let publish_stage = {
            let (this, consumer, shutdown, unpublished) = (
                self.clone(),
                consumer.clone(),
                shutdown.clone(),
                unpublished.clone(),
            );
            tokio::spawn(async move {
                while let Some(applied) = applied_rx.recv().await {
                    if !this.publish(&applied, &unpublished, &shutdown).await {
                        break; // shutdown while retrying: leave offsets unstored
                    }
                    store_offsets(&consumer, &applied.batch);
                    drop(applied.changelog_spans); // the changelog phase ends
                }
            })
        };
        let mut lanes = Vec::with_capacity(SHARDS);
        let mut lane_results = Vec::with_capacity(SHARDS);
        for _ in 0..SHARDS {
            let (job_tx, job_rx) = mpsc::channel::<LaneJob>(LANE_QUEUE);
            let (result_tx, result_rx) = mpsc::channel::<LaneResult>(LANE_QUEUE);
            tokio::spawn(self.clone().lane(job_rx, result_tx, shutdown.clone()));
            lanes.push(job_tx);
            lane_results.push(result_rx);
        }
        let (planned_tx, planned_rx) = mpsc::channel::<PlannedBatch>(LANE_QUEUE);
        let collect_stage = tokio::spawn(self.clone().collect(
            planned_rx,
            lane_results,
            applied_tx,
            unpublished.clone(),
        ));
        'batches: while let Some(batch) =
            next_batch(&consumer, self.batch, self.batch_wait, &shutdown).await
        {
            self.metrics.consumed(batch.len() as u64);
            let (planned, jobs) = self.plan_batch(batch, &unpublished);
            if planned_tx.send(planned).await.is_err() {
                break; // the collector stopped on shutdown
            }
            for (lane, job) in lanes.iter().zip(jobs) {
                if lane.send(job).await.is_err() {
                    break 'batches; // a lane stopped on shutdown
                }
            }
        }
        drop((lanes, planned_tx));
        for (name, stage) in [("Collect", collect_stage), ("Publish", publish_stage)] {
            if let Err(e) = stage.await {
                warn!(stage = name, error = %e, "Stage failed.");
            }
        }
        info!("Processor stopping: committing offsets.");
        commit_and_leave(consumer).await;
        Ok(())
    }

    /// Runs `attempt` until it succeeds, marked as paused and with a
    /// growing backoff in between; None if shutdown came first.
    async fn until_ok<T, F, Fut>(&self, shutdown: &CancellationToken, mut attempt: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, (&'static str, String)>>,
    {
        let mut backoff = Duration::from_millis(100);
        let mut paused = None;
        let value = loop {
            match attempt().await {
                Ok(v) => break v,
                Err((dependency, e)) => {
                    self.metrics.retry(dependency);
                    paused.get_or_insert_with(|| self.health.pause());
                    self.metrics.set_paused(true);
                    warn!(dependency, error = %e, backoff_ms = backoff.as_millis() as u64, "Transient failure; retrying batch.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        if let Some(paused) = paused {
            drop(paused);
            self.metrics.set_paused(self.health.is_paused());
            if !self.health.is_paused() {
                info!("Dependencies back; resumed.");
            }
        }
        Some(value)
    }

    /// Plans a batch, registers the entities it updates and splits its
    /// updates into one job per apply lane.
    fn plan_batch(
        &self,
        batch: Vec<Record>,
        unpublished: &Unpublished,
    ) -> (PlannedBatch, Vec<LaneJob>) {
        let started = Instant::now();
        let plan = Arc::new(plan(self.projections.iter(), &batch));
        self.metrics.unmatched(plan.unmatched as u64);
        // Registered before the apply: an earlier batch's changelog check
        // then leaves these entities to this batch as soon as it may write
        // them (this batch publishes every entity it updates, duplicates
        // too, after the earlier batch).
        let mut distinct = HashSet::new();
        let mut positions = vec![Vec::new(); SHARDS];
        let mut entities: Vec<EntityId> = Vec::new();
        for (i, (u, _, _)) in plan.updates.iter().enumerate() {
            positions[shard_of(&u.key)].push(i);
            if distinct.insert((u.projection.as_str(), u.key.as_str())) {
                entities.push((u.projection.clone(), u.key.clone()));
            }
        }
        drop(distinct);
        unpublished.add(&entities);
        let spans = BatchSpans::live(&batch);
        let apply_spans = spans.phase(Phase::Apply);
        let jobs = positions
            .into_iter()
            .map(|positions| LaneJob {
                plan: plan.clone(),
                positions,
            })
            .collect();
        let planned = PlannedBatch {
            batch,
            plan,
            entities,
            spans,
            apply_spans,
            started,
        };
        (planned, jobs)
    }

    /// One apply lane: applies its part of each batch, in batch order,
    /// retrying until it succeeds; stops on shutdown while retrying.
    async fn lane(
        self: Arc<Self>,
        mut jobs: mpsc::Receiver<LaneJob>,
        results: mpsc::Sender<LaneResult>,
        shutdown: CancellationToken,
    ) {
        while let Some(job) = jobs.recv().await {
            let refs: Vec<_> = job
                .positions
                .iter()
                .map(|&i| {
                    let (u, id, _) = &job.plan.updates[i];
                    (u, id.as_str())
                })
                .collect();
            let applied = self
                .until_ok(&shutdown, || async {
                    self.store
                        .apply_shard(&refs, Target::Live)
                        .await
                        .map_err(|e| ("redis", e.to_string()))
                })
                .await;
            drop(refs);
            let stop = applied.is_none();
            let result = applied.map(|applied| (job.positions, applied));
            if results.send(result).await.is_err() || stop {
                return;
            }
        }
    }

    /// Joins each batch's lane results, in batch order, into the states
    /// its changelog publishes, and hands it to the publish stage.
    async fn collect(
        self: Arc<Self>,
        mut planned: mpsc::Receiver<PlannedBatch>,
        mut lanes: Vec<mpsc::Receiver<LaneResult>>,
        applied_tx: mpsc::Sender<AppliedBatch>,
        unpublished: Arc<Unpublished>,
    ) {
        while let Some(p) = planned.recv().await {
            let mut results: Vec<Option<Applied>> = vec![None; p.plan.updates.len()];
            for lane in &mut lanes {
                let Some(Some((positions, applied))) = lane.recv().await else {
                    unpublished.remove(&p.entities);
                    return; // shutdown while retrying
                };
                for (i, a) in positions.into_iter().zip(applied) {
                    results[i] = Some(a);
                }
            }
            let applied = self.states(p, results);
            if applied_tx.send(applied).await.is_err() {
                return; // the publish stage stopped on shutdown
            }
        }
    }

    /// One changelog record per entity per batch: its state after the
    /// batch (apply results come back in order, so the last one wins).
    /// Compaction keeps only the latest per key anyway, and this divides
    /// the changelog writes by the events per entity per batch.
    fn states(&self, p: PlannedBatch, results: Vec<Option<Applied>>) -> AppliedBatch {
        drop(p.apply_spans);
        let changelog_spans = p.spans.phase(Phase::Changelog);
        let mut states = Vec::with_capacity(results.len());
        // Per projection: its write counters at the batch's earliest read,
        // and its applied and duplicate updates (added to the metrics once
        // per batch, not with a label lookup and its allocation per update).
        let mut tallies: Vec<(&str, Tally)> = Vec::new();
        let mut slot: HashMap<(&str, &str), usize> = HashMap::new();
        for (res, (up, _, idx)) in results.into_iter().zip(&p.plan.updates) {
            let res = res.expect("every update is in one lane");
            let i = match tallies.iter().position(|(p, _)| *p == up.projection) {
                Some(i) => i,
                None => {
                    tallies.push((&up.projection, Tally::new(res.since)));
                    tallies.len() - 1
                }
            };
            tallies[i].1.add(&res);
            let Some(state) = res.state else {
                continue; // a later update of the same entity carries it
            };
            // Duplicates re-emit the current state too: if a previous run
            // died between apply and changelog, this is the delivery.
            let traceparent = p.spans.traceparent(&changelog_spans, &p.batch, *idx);
            match slot.get(&(up.projection.as_str(), up.key.as_str())) {
                Some(&i) => states[i] = (state, traceparent),
                None => {
                    slot.insert((&up.projection, &up.key), states.len());
                    states.push((state, traceparent));
                }
            }
        }
        drop(slot);
        let mut since = Vec::with_capacity(tallies.len());
        for (projection, t) in tallies {
            self.metrics.applied(projection, t.applied, t.duplicates);
            since.push((projection.to_owned(), t.since));
        }
        self.metrics.lost_watches(self.store.lost_watches());
        AppliedBatch {
            entities: p.entities,
            batch: p.batch,
            plan: p.plan,
            states,
            since,
            changelog_spans,
            started: p.started,
        }
    }

    /// Publishes an applied batch's changelog records and dead letters,
    /// retrying until they are acknowledged; false if shutdown came first.
    async fn publish(
        &self,
        applied: &AppliedBatch,
        unpublished: &Unpublished,
        shutdown: &CancellationToken,
    ) -> bool {
        if !applied.states.is_empty() && crash_before_changelog() {
            warn!("Fault hook: exiting between apply and changelog.");
            std::process::exit(86);
        }
        let published = self
            .until_ok(shutdown, || async {
                self.publish_states(applied, unpublished).await?;
                self.dead_letters(applied).await
            })
            .await;
        unpublished.remove(&applied.entities);
        if published.is_none() {
            return false;
        }
        // Count DLQ metrics once, after success.
        for (_, reason, _) in &applied.plan.poison {
            self.metrics.dead_lettered(reason);
        }
        self.metrics.batch(applied.started.elapsed().as_secs_f64());
        true
    }

    async fn dead_letters(&self, applied: &AppliedBatch) -> Result<(), (&'static str, String)> {
        let (batch, poison) = (&applied.batch, &applied.plan.poison);
        if poison.is_empty() {
            return Ok(());
        }
        let dead: Vec<_> = poison
            .iter()
            .map(|(i, _, detail)| (&batch[*i], detail.as_str()))
            .collect();
        self.publisher
            .dead_letters(&dead)
            .await
            .map_err(|e| ("kafka", e.to_string()))?;
        for (i, reason, detail) in poison {
            let r = &batch[*i];
            let event_id = r.key.as_deref().map(String::from_utf8_lossy);
            let trace_id = r
                .header(hooklog_schemas::headers::TRACEPARENT)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(hooklog_schemas::trace::TraceParent::parse)
                .map(|t| t.trace_id);
            warn!(topic = %r.topic, partition = r.partition, offset = r.offset, event_id = event_id.as_deref().unwrap_or(""), trace_id = trace_id.as_deref().unwrap_or(""), reason, detail, "Record dead-lettered.");
        }
        Ok(())
    }

    /// Publishes states, then makes sure the last changelog record of each
    /// entity is its current state. Processors that share an entity (its
    /// events are spread over partitions by event id) can publish out of
    /// order: A applies S1, B applies S2 and publishes S2, then A publishes
    /// S1. So after the acks each publisher re-reads its entities and
    /// publishes again whatever changed meanwhile; the last publisher to
    /// check always sees the final state. An entity a later batch of this
    /// process already changed is left to that batch, which publishes and
    /// checks after this one. A crash before the check leaves the batch
    /// uncommitted, and its redelivery re-emits the current state.
    ///
    /// Mostly nobody else writes: a single processor, or a projection only
    /// one replica's events reach. So the write counters are checked first
    /// (one round trip); only the projections someone else wrote to since
    /// the batch read them are checked entity by entity.
    async fn publish_states(
        &self,
        applied: &AppliedBatch,
        unpublished: &Unpublished,
    ) -> Result<(), (&'static str, String)> {
        let mut changed = self
            .publish_and_check(&applied.states, &applied.since, unpublished)
            .await?;
        for _ in 1..10 {
            if changed.is_empty() {
                break;
            }
            // Read after the batch's counters: checked entity by entity.
            changed = self.publish_and_check(&changed, &[], unpublished).await?;
        }
        Ok(())
    }

    /// Publishes `states`; returns the current states of the entities that
    /// changed since and that no later batch of this process will publish.
    /// `since`: write counters when the states were read, per projection.
    async fn publish_and_check(
        &self,
        states: &[(EntityState, Option<Vec<u8>>)],
        since: &[(String, WriteCounts)],
        unpublished: &Unpublished,
    ) -> Result<Vec<(EntityState, Option<Vec<u8>>)>, (&'static str, String)> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        self.publisher
            .states(states)
            .await
            .map_err(|e| ("kafka", e.to_string()))?;
        // In a projection nobody else wrote to since, whatever changed was
        // changed by this process's later batches, which publish it.
        let quiet = if since.is_empty() {
            Vec::new()
        } else {
            let since: Vec<_> = since.iter().map(|(p, c)| (p.as_str(), *c)).collect();
            self.store
                .written_only_by_us_since(&since)
                .await
                .map_err(|e| ("redis", e.to_string()))?
        };
        let is_quiet = |s: &EntityState| {
            since
                .iter()
                .zip(&quiet)
                .any(|((p, _), current)| *p == s.projection && *current == Some(s.version))
        };
        let to_check: Vec<_> = states.iter().filter(|(s, _)| !is_quiet(s)).collect();
        if to_check.is_empty() {
            return Ok(Vec::new());
        }
        // Cheap check first (version and `~rev`), full reads only for the
        // entities that changed since.
        let revs = self
            .store
            .revisions(&entity_keys(to_check.iter().copied()))
            .await
            .map_err(|e| ("redis", e.to_string()))?;
        let moved: Vec<_> = to_check
            .into_iter()
            .zip(revs)
            .filter(|((s, _), now)| (s.version, s.rev) != *now)
            .map(|(state, _)| state)
            .filter(|(s, _)| !unpublished.later_batch_has(s))
            .collect();
        if moved.is_empty() {
            return Ok(Vec::new());
        }
        let now = self
            .store
            .read_many(&entity_keys(moved.iter().copied()))
            .await
            .map_err(|e| ("redis", e.to_string()))?;
        Ok(moved
            .into_iter()
            .zip(now)
            .filter_map(|((published, tp), current)| {
                current.filter(|c| c != published).map(|c| (c, tp.clone()))
            })
            .collect())
    }
}

/// The (projection, key) of each state, as the store's reads take them.
fn entity_keys<'a>(
    states: impl IntoIterator<Item = &'a (EntityState, Option<Vec<u8>>)>,
) -> Vec<(&'a str, &'a str)> {
    states
        .into_iter()
        .map(|(s, _)| (s.projection.as_str(), s.key.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_keeps_the_earliest_read_and_counts_duplicates_apart() {
        let at = |total, own| WriteCounts { total, own };
        let result = |applied, since| Applied {
            applied,
            state: None,
            since,
        };
        let mut t = Tally::new(at(10, 4));
        t.add(&result(true, at(10, 4)));
        t.add(&result(true, at(7, 2))); // another lane read earlier
        t.add(&result(false, at(12, 5)));
        assert_eq!(t.since, at(7, 2));
        assert_eq!((t.applied, t.duplicates), (2, 1));
    }
}
