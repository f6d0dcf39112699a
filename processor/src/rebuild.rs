//! Rebuild and verify: replay the raw topics from the earliest offset into a
//! new projection version, then switch readers atomically (rebuild) or
//! compare entity by entity with the live version (verify).
//!
//! Hand-over (docs/rebuild.md has the diagram):
//! 1. allocate version N and set `building = N`; from this moment every live
//!    apply (inside the same Lua call that reads the pointer) also writes N.
//!    `building` is a lease the rebuild renews: a rebuild killed outright
//!    stops the dual-writes when it lapses;
//! 2. take the high watermarks H of every raw partition;
//! 3. replay [earliest, H) into N only; events the live processors already
//!    dual-wrote are skipped by N's idempotency markers;
//! 4. rebuild: if `building` still names N (the lease held all along), set
//!    `current = N` and remove `building` in one atomic step, then delete
//!    the old version after a grace period with SCAN + UNLINK. Verify:
//!    compare, then drop N.
//!
//! Every version that may hold keys is listed in `P{NAME}:versions` with the
//! time from which nobody needs it unless it is current; a rebuild starts by
//! deleting those that are due (left by a rebuild killed half-way or during
//! its grace period), so no version is forgotten in Redis.
//!
//! Every event with offset < H is applied by the replay, every event applied
//! live after step 1 is dual-written, and events before step 1 have offsets
//! below H: N ends with every event exactly once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use redis::AsyncCommands;
use tracing::{info, warn};

use crate::batch::{plan, BatchLimit, Filling, Record};
use crate::config::Config;
use crate::lease::{delete_if, Lease};
use crate::metrics::Metrics;
use crate::projection::spec::{ProjectionSpec, Update};
use crate::projection::store::{shard_of, Store, Target, NOT_BUILDING, SHARDS};
use crate::spans::{BatchSpans, Phase};

/// What the caller wants once the replay caught up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Switch readers to the new version.
    Switch,
    /// Compare with the live version, then drop the scratch version.
    Verify,
}

/// How a replay runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Print a progress line (done / total, rate, ETA) to stderr.
    pub progress: bool,
    /// Throttle the replay (records per second) to spare a busy Redis or
    /// broker; `None` runs as fast as they allow.
    pub max_records_per_sec: Option<u64>,
    /// How long the previous version is kept for in-flight readers after
    /// the switch (the caller deletes it then); no other rebuild deletes it
    /// before.
    pub grace: Duration,
    /// How long the `building` pointer outlives a rebuild that stopped
    /// renewing it (killed, or cut off from Redis). Live processors
    /// dual-write until it lapses; a rebuild whose lease lapsed fails.
    pub lease: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            progress: false,
            max_records_per_sec: None,
            grace: Duration::from_secs(30),
            lease: Duration::from_secs(30),
        }
    }
}

/// The outcome of a rebuild or verify.
#[derive(Debug, Default)]
pub struct Report {
    /// The version built.
    pub version: u64,
    /// The version that was current before.
    pub previous: u64,
    /// Records replayed.
    pub records: u64,
    /// How long the replay took (from the first fetch to the last write).
    pub replay_time: Duration,
    /// Entities compared (verify).
    pub compared: u64,
    /// Differences (verify): key and a description.
    pub differences: Vec<(String, String)>,
}

const LOCK_TTL_SECS: u64 = 10;

/// Replayed batches being decoded or written at once.
const IN_FLIGHT: usize = 3;

/// Records per replayed batch. An entity is written once per batch however
/// many of its events the batch holds, so bigger batches mean fewer entity
/// writes per event; IN_FLIGHT batches of ~1 KB records stay well under
/// 100 MB.
const REPLAY_BATCH: usize = 20_000;

/// Bytes of records per replayed batch: with large records a batch ends
/// here first, so IN_FLIGHT batches hold about 100 MB at most whatever the
/// records' size (20,000 records of ~1 KB are ~21 MB).
const REPLAY_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Runs a rebuild or verify of `spec`, once it holds the projection's
/// rebuild lock (an error when another rebuild, verify or prune holds it).
pub async fn run(
    config: &Config,
    store: &Store,
    spec: &ProjectionSpec,
    mode: Mode,
    metrics: &Arc<Metrics>,
    options: Options,
) -> anyhow::Result<Report> {
    let lock = Lock::acquire(store, &spec.name).await?;
    run_locked(config, store, spec, mode, metrics, options, lock).await
}

/// [`run`] under a lock the caller took (the HTTP endpoint takes it
/// before it answers, so that a 202 means the rebuild really started).
pub async fn run_locked(
    config: &Config,
    store: &Store,
    spec: &ProjectionSpec,
    mode: Mode,
    metrics: &Arc<Metrics>,
    options: Options,
    lock: Lock,
) -> anyhow::Result<Report> {
    let name = spec.name.as_str();
    let mut conn = store.connection();
    remove_orphans(store, name).await?;
    let previous = store.current_version(name).await?;
    let counter = format!("{}:version_counter", store.base(name));
    let _: bool = conn.set_nx(&counter, previous).await?;
    let version: u64 = conn.incr(&counter, 1).await?;
    let lease_ms = options.lease.as_millis().max(1) as u64;
    let _: () = redis::pipe()
        .atomic()
        .zadd(store.versions_key(name), version, 0)
        .cmd("SET")
        .arg(store.building_key(name))
        .arg(version)
        .arg("PX")
        .arg(lease_ms)
        .query_async(&mut conn)
        .await?;
    info!(
        projection = name,
        version,
        previous,
        ?mode,
        "Rebuild started; live applies now dual-write."
    );

    let lease_renewal = tokio::spawn(renew_lease(
        store.clone(),
        name.to_owned(),
        version,
        options.lease,
    ));
    let replay_started = Instant::now();
    let result = replay(config, store, spec, version, metrics, options).await;
    let mut report = Report {
        version,
        previous,
        replay_time: replay_started.elapsed(),
        ..Default::default()
    };
    let finished = match result {
        Ok(records) => {
            report.records = records;
            match mode {
                Mode::Switch => {
                    let deletable_at = chrono::Utc::now().timestamp_millis() as u64
                        + options.grace.as_millis() as u64;
                    // An error here leaves it unknown whether the switch
                    // happened: keep the version (the next rebuild removes
                    // it if it is not current) and report.
                    let switch = switch(store, name, version, previous, deletable_at).await;
                    match switch {
                        Ok(true) => {
                            info!(
                                projection = name,
                                version, "Switched readers to the rebuilt version."
                            );
                            Ok(())
                        }
                        Ok(false) => Err(lapsed(name, version)),
                        Err(e) => {
                            lease_renewal.abort();
                            lock.release().await;
                            return Err(anyhow::Error::new(e).context(format!(
                                "switching readers of {name} to version {version}"
                            )));
                        }
                    }
                }
                Mode::Verify => {
                    let cmp = compare(store, name, previous, version).await;
                    match stop_building(store, name, version).await {
                        // Live applies stopped dual-writing at some point
                        // of the comparison: its differences mean nothing.
                        Ok(false) => Err(lapsed(name, version)),
                        Ok(true) => cmp.map(|(compared, diffs)| {
                            report.compared = compared;
                            report.differences = diffs;
                        }),
                        Err(e) => Err(e),
                    }
                }
            }
        }
        Err(e) => Err(e),
    };
    let outcome = match finished {
        Ok(()) if mode == Mode::Verify => delete_version(store, name, version).await.map(|_| ()),
        Ok(()) => Ok(()),
        Err(e) => {
            // Leave things as they were: live applies stop dual-writing,
            // and the partial version's memory is freed (deletes are
            // allowed on a full Redis).
            warn!(projection = name, version, error = %e, "Rebuild failed; removing its partial version.");
            // The replay's batches were aborted, but one already sent to
            // Redis may still land. Once `building` no longer names the
            // version, Redis refuses every write into it (the apply checks
            // the pointer atomically with its write), so the scan below
            // finds every key the version will ever have.
            let cleanup = async {
                stop_building(store, name, version).await?;
                delete_version(store, name, version).await
            };
            match cleanup.await {
                Ok(_) => Err(e.context(format!(
                    "rebuild of {name} failed; its partial version {version} was deleted and readers stay on version {previous}"
                ))),
                Err(c) => Err(e.context(format!(
                    "rebuild of {name} failed, and removing its partial version {version} failed too ({c}); the next rebuild removes it"
                ))),
            }
        }
    };
    lease_renewal.abort();
    lock.release().await;
    outcome.map(|_| report)
}

/// Rebuilds started by a running processor (`POST
/// /v1/projections/{name}/rebuild`), in the background.
pub struct OnRequest {
    /// The processor's configuration.
    pub config: Arc<Config>,
    /// Redis.
    pub store: Store,
    /// The processor's metrics (rebuild progress).
    pub metrics: Arc<Metrics>,
}

impl OnRequest {
    /// Starts a rebuild of `name` in the background once it holds the
    /// projection's lock; false while a rebuild, verify or prune of it runs
    /// anywhere. The previous version is deleted after the default grace.
    pub async fn start(&self, name: &str) -> anyhow::Result<bool> {
        let spec = self
            .config
            .projection(name)
            .ok_or_else(|| anyhow::anyhow!("no projection {name}"))?
            .clone();
        let Some(lock) = Lock::try_acquire(&self.store, name).await? else {
            return Ok(false);
        };
        let (config, store, metrics) = (
            self.config.clone(),
            self.store.clone(),
            self.metrics.clone(),
        );
        tokio::spawn(async move {
            let name = spec.name.clone();
            let options = Options::default();
            let mode = Mode::Switch;
            match run_locked(&config, &store, &spec, mode, &metrics, options, lock).await {
                Ok(r) => {
                    info!(projection = %name, version = r.version, records = r.records, "Rebuild finished.");
                    tokio::time::sleep(options.grace).await;
                    if let Err(e) = delete_version(&store, &name, r.previous).await {
                        warn!(error = %e, "Old version not deleted.");
                    }
                }
                Err(e) => tracing::error!(projection = %name, error = %e, "Rebuild failed."),
            }
        });
        Ok(true)
    }
}

/// `P{NAME}:rebuild_lock`: one rebuild, verify or prune of a projection at
/// a time, a [`Lease`] of `LOCK_TTL_SECS` (a killed holder frees it within).
pub struct Lock(Lease);

impl Lock {
    async fn acquire(store: &Store, projection: &str) -> anyhow::Result<Lock> {
        match Self::try_acquire(store, projection).await? {
            Some(lock) => Ok(lock),
            None => anyhow::bail!(
                "a rebuild, verify or prune of {projection} is already running (lock {}:rebuild_lock)",
                store.base(projection)
            ),
        }
    }

    /// The lock, or `None` while another process (or task) holds it.
    pub async fn try_acquire(store: &Store, projection: &str) -> anyhow::Result<Option<Lock>> {
        let key = format!("{}:rebuild_lock", store.base(projection));
        let ttl = Duration::from_secs(LOCK_TTL_SECS);
        Ok(Lease::try_acquire(store.connection(), key, ttl)
            .await?
            .map(Lock))
    }

    async fn release(self) {
        self.0.release().await;
    }
}

/// Deletes what interrupted rebuilds left of `projection` (see
/// `remove_orphans`) without starting one, under the rebuild lock.
/// Returns the versions deleted.
pub async fn prune(store: &Store, projection: &str) -> anyhow::Result<Vec<u64>> {
    let lock = Lock::acquire(store, projection).await?;
    let removed = remove_orphans(store, projection).await;
    lock.release().await;
    removed
}

/// The error of a rebuild whose `building` pointer stopped naming its
/// version before it finished.
fn lapsed(projection: &str, version: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "the `building` pointer of {projection} no longer names version {version} (its lease lapsed, or it was removed or replaced): live applies may have stopped dual-writing into it, so it cannot be trusted"
    )
}

/// Renews the `building` lease until aborted, every third of the lease
/// (each renewal touches a key live applies watch, so one of their watched
/// writes per renewal falls back to `lua/commit.lua`). Stops once
/// `building` names another version or none: the rebuild's next write, or
/// its switch, then fails.
async fn renew_lease(store: Store, projection: String, version: u64, lease: Duration) {
    let renew = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
    );
    let building = store.building_key(&projection);
    let mut conn = store.connection();
    loop {
        tokio::time::sleep(lease / 3).await;
        let renewed: Result<i64, _> = renew
            .key(&building)
            .arg(version)
            .arg(lease.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await;
        match renewed {
            Ok(0) => {
                warn!(
                    projection,
                    version,
                    "The `building` pointer no longer names this rebuild's version; the rebuild will fail."
                );
                return;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(projection, version, error = %e, "Could not renew the rebuild's lease; retrying.")
            }
        }
    }
}

/// Makes `version` current if `building` still names it, and marks
/// `previous` deletable from `deletable_at` (Unix ms), in one atomic step.
/// False when `building` names another version or none.
pub async fn switch(
    store: &Store,
    projection: &str,
    version: u64,
    previous: u64,
    deletable_at: u64,
) -> Result<bool, redis::RedisError> {
    let script = redis::Script::new(
        "if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
         redis.call('SET', KEYS[1], ARGV[1])
         redis.call('DEL', KEYS[2])
         redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
         return 1",
    );
    let switched: i64 = script
        .key(store.current_key(projection))
        .key(store.building_key(projection))
        .key(store.versions_key(projection))
        .arg(version)
        .arg(previous)
        .arg(deletable_at)
        .invoke_async(&mut store.connection())
        .await?;
    Ok(switched == 1)
}

/// Deletes the versions of `projection` nobody reads or fills: the partial
/// version of a rebuild killed half-way (its `building` pointer, if it has
/// not lapsed yet, is removed: the caller holds the rebuild lock), and the
/// versions listed in `P{NAME}:versions` that are due and not current (a
/// rebuild killed during its grace period left its previous version).
async fn remove_orphans(store: &Store, projection: &str) -> anyhow::Result<Vec<u64>> {
    let mut conn = store.connection();
    let mut removed = Vec::new();
    if let Some(stale) = store.building_version(projection).await? {
        warn!(
            projection,
            version = stale,
            "Removing the partial version of an interrupted rebuild."
        );
        let _: () = conn.del(store.building_key(projection)).await?;
        delete_version(store, projection, stale).await?;
        removed.push(stale);
    }
    let current = store.current_version(projection).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let due: Vec<u64> = conn
        .zrangebyscore(store.versions_key(projection), "-inf", now)
        .await?;
    for version in due.into_iter().filter(|&v| v != current) {
        warn!(
            projection,
            version, "Removing a version no reader follows (left by an interrupted rebuild)."
        );
        delete_version(store, projection, version).await?;
        removed.push(version);
    }
    Ok(removed)
}

/// Removes the `building` pointer of `projection` if it still names
/// `version` (an operator may have cleared it, its lease lapsed, or another
/// rebuild took over): from then on live applies stop dual-writing into
/// `version`, and Redis refuses any write into it. True when it still
/// named `version`.
async fn stop_building(store: &Store, projection: &str, version: u64) -> anyhow::Result<bool> {
    let (key, version) = (store.building_key(projection), version.to_string());
    Ok(delete_if(&mut store.connection(), &key, &version).await?)
}

/// Calls `each` with every batch of keys matching `pattern`, using SCAN
/// (never KEYS, which would block Redis on a large keyspace).
async fn scan_batches<F, Fut>(store: &Store, pattern: &str, mut each: F) -> anyhow::Result<()>
where
    F: FnMut(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut conn = store.connection();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            each(keys).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Deletes every key of one version, in SCAN batches with UNLINK, then
/// strikes it from the projection's list of versions.
pub async fn delete_version(store: &Store, projection: &str, version: u64) -> anyhow::Result<u64> {
    let pattern = format!("{}:*", store.version_prefix(projection, version));
    let mut deleted = 0;
    scan_batches(store, &pattern, |keys| {
        deleted += keys.len() as u64;
        let mut conn = store.connection();
        async move {
            let _: () = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
            Ok(())
        }
    })
    .await?;
    let _: () = store
        .connection()
        .zrem(store.versions_key(projection), version)
        .await?;
    Ok(deleted)
}

/// Entity keys of one version.
async fn entity_keys(
    store: &Store,
    projection: &str,
    version: u64,
) -> anyhow::Result<BTreeSet<String>> {
    let prefix = format!("{}:e:", store.version_prefix(projection, version));
    let mut out = BTreeSet::new();
    scan_batches(store, &format!("{prefix}*"), |keys| {
        out.extend(
            keys.into_iter()
                .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned)),
        );
        async { Ok(()) }
    })
    .await?;
    Ok(out)
}

/// Entities read per round trip when comparing two versions.
const COMPARE_CHUNK: usize = 1_000;

/// Compares two versions entity by entity, a chunk of entities per round
/// trip. The differences are re-checked once after a short pause, since
/// live applies may land between the two reads.
pub async fn compare(
    store: &Store,
    projection: &str,
    live: u64,
    scratch: u64,
) -> anyhow::Result<(u64, Vec<(String, String)>)> {
    let mut keys = entity_keys(store, projection, live).await?;
    keys.extend(entity_keys(store, projection, scratch).await?);
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut suspects = Vec::new();
    for chunk in keys.chunks(COMPARE_CHUNK) {
        let found = differences(store, projection, chunk, live, scratch).await?;
        suspects.extend(found.into_iter().map(|(key, _)| key));
    }
    let mut diffs = Vec::new();
    if !suspects.is_empty() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let suspects: Vec<&str> = suspects.iter().map(String::as_str).collect();
        for chunk in suspects.chunks(COMPARE_CHUNK) {
            diffs.extend(differences(store, projection, chunk, live, scratch).await?);
        }
    }
    Ok((keys.len() as u64, diffs))
}

/// The entities among `keys` whose documents differ between the two
/// versions, each with both documents.
async fn differences(
    store: &Store,
    projection: &str,
    keys: &[&str],
    live: u64,
    scratch: u64,
) -> anyhow::Result<Vec<(String, String)>> {
    let a = store.read_in_version(projection, keys, live).await?;
    let b = store.read_in_version(projection, keys, scratch).await?;
    // The same document apart from the version it comes from.
    let strip = |s: Option<crate::projection::store::EntityState>| {
        s.map(|s| {
            let mut d = s.document();
            d.as_object_mut().map(|o| o.remove("version"));
            d
        })
    };
    let show = |x: &Option<_>| serde_json::to_string(x).unwrap_or_default();
    Ok(keys
        .iter()
        .zip(a.into_iter().zip(b))
        .filter_map(|(key, (a, b))| {
            let (a, b) = (strip(a), strip(b));
            (a != b).then(|| {
                (
                    key.to_string(),
                    format!("live={} rebuilt={}", show(&a), show(&b)),
                )
            })
        })
        .collect())
}

/// The next record of a replay read up to fixed targets: an error once none
/// came for 30 s while `behind` partitions have not reached theirs.
pub(crate) async fn next_replayed(
    consumer: &StreamConsumer,
    behind: usize,
) -> anyhow::Result<rdkafka::message::BorrowedMessage<'_>> {
    tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .map_err(|_| anyhow::anyhow!("no records for 30 s while {behind} partitions are behind"))?
        .map_err(Into::into)
}

/// Watermarks, retried: a busy broker may time out once or twice.
pub(crate) fn watermarks(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
) -> anyhow::Result<(i64, i64)> {
    let mut attempt = 0;
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(e) if attempt < 5 => {
                attempt += 1;
                warn!(topic, partition, error = %e, attempt, "Watermark request failed; retrying.");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Replays every raw partition from the earliest offset up to the high
/// watermark taken now, into `version` only. Returns records replayed.
async fn replay(
    config: &Config,
    store: &Store,
    spec: &ProjectionSpec,
    version: u64,
    metrics: &Arc<Metrics>,
    options: Options,
) -> anyhow::Result<u64> {
    let mut cfg = config.kafka.base();
    cfg.set(
        "group.id",
        format!("hooklog-rebuild-{}-{version}", spec.name),
    );
    cfg.set("enable.auto.commit", "false");
    // Short broker waits: bounded by throughput, not latency (Tansu holds
    // every fetch for the full wait). librdkafka's default fetch sizes.
    cfg.set("fetch.wait.max.ms", "10");
    let consumer: StreamConsumer = config.kafka.finish(cfg).create()?;
    let md = consumer.fetch_metadata(None, Duration::from_secs(30))?;
    let mut targets: HashMap<(String, i32), i64> = HashMap::new();
    // The same high watermarks by topic, kept to the end: progress counts
    // only the records below them (records produced during the replay are
    // applied too, but are not part of the total).
    let mut highs = Highs::new();
    let mut tpl = TopicPartitionList::new();
    let mut total: i64 = 0;
    for topic in config.raw_topics_of(spec) {
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            anyhow::bail!("raw topic {topic} does not exist");
        };
        for p in t.partitions() {
            let (low, high) = watermarks(&consumer, &topic, p.id())?;
            if high > low {
                total += high - low;
                targets.insert((topic.clone(), p.id()), high);
                highs.entry(topic.clone()).or_default().push((p.id(), high));
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
            }
        }
    }
    if targets.is_empty() {
        return Ok(0);
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut done: u64 = 0;
    let mut below_high: u64 = 0;
    let limit = BatchLimit {
        records: options
            .max_records_per_sec
            .map_or(REPLAY_BATCH, |r| (r as usize / 10).clamp(1, REPLAY_BATCH)),
        bytes: REPLAY_BATCH_BYTES,
    };
    let mut in_flight = InFlight::default();
    let write_turns: WriteTurns = Arc::new(std::array::from_fn(|_| Default::default()));
    while !targets.is_empty() {
        let first = next_replayed(&consumer, targets.len()).await?;
        // Headers only feed the replay's trace links.
        let with_headers = hooklog_schemas::telemetry::enabled();
        let mut batch = Filling::new(limit, Record::copy_of(&first, with_headers));
        while !batch.is_full() {
            match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                Ok(Ok(m)) => batch.push(Record::copy_of(&m, with_headers)),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
        let batch = batch.into_records();
        // Decode and map this batch on a worker while the next ones are
        // fetched (up to IN_FLIGHT batches). Their Redis writes take turns
        // per shard of the entities: concurrent writes of two batches would
        // share entities (every batch touches most customers, say) and lose
        // compare-and-set races to each other (measured here, 13 of 31
        // batches were written twice), while a shard done with one batch
        // starts on the next without waiting for the other shards.
        while in_flight.0.len() >= IN_FLIGHT {
            in_flight.0.pop_front().expect("in flight").await??;
        }
        let mut positions: HashMap<(&str, i32), i64> = HashMap::new();
        for r in &batch {
            let last = positions.entry((&r.topic, r.partition)).or_insert(r.offset);
            *last = (*last).max(r.offset);
        }
        let positions: Vec<((String, i32), i64)> = positions
            .into_iter()
            .map(|((topic, partition), offset)| ((topic.to_owned(), partition), offset))
            .collect();
        done += batch.len() as u64;
        below_high += count_below(&highs, &batch);
        let (job_store, job_spec, turns) = (store.clone(), spec.clone(), write_turns.clone());
        in_flight.0.push_back(tokio::spawn(async move {
            apply_replayed(&job_store, &job_spec, version, &batch, &turns).await
        }));
        for (key, offset) in positions {
            if targets.get(&key).is_some_and(|high| offset + 1 >= *high) {
                targets.remove(&key);
            }
        }
        metrics.rebuild_progress(&spec.name, below_high as i64);
        if let Some(rate) = options.max_records_per_sec.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if options.progress
            && (last_print.elapsed() >= Duration::from_secs(1) || targets.is_empty())
        {
            last_print = Instant::now();
            eprintln!(
                "{}",
                progress_line(
                    &spec.name,
                    version,
                    below_high,
                    total as u64,
                    started.elapsed()
                )
            );
        }
    }
    while let Some(job) = in_flight.0.pop_front() {
        job.await??;
    }
    Ok(done)
}

/// High watermarks per topic: (partition, high).
type Highs = HashMap<String, Vec<(i32, i64)>>;

/// How many of `batch`'s records lie below their partition's high watermark.
fn count_below(highs: &Highs, batch: &[Record]) -> u64 {
    batch
        .iter()
        .filter(|r| {
            highs.get(r.topic.as_str()).is_some_and(|ps| {
                ps.iter()
                    .any(|&(p, high)| p == r.partition && r.offset < high)
            })
        })
        .count() as u64
}

/// The progress line printed about once a second: records replayed out of
/// those the replay set out to read (below the high watermarks at its start).
fn progress_line(
    projection: &str,
    version: u64,
    done: u64,
    total: u64,
    elapsed: Duration,
) -> String {
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    let left = total.saturating_sub(done) as f64;
    format!(
        "rebuild {projection} v{version}: {done}/{total} records ({:.0}%), {rate:.0} rec/s, ETA {:.0}s",
        100.0 * done as f64 / total.max(1) as f64,
        left / rate.max(1.0)
    )
}

/// The replayed batches being decoded or written; any still running when
/// the replay stops early (an error) are aborted, so nothing writes into a
/// version being deleted.
#[derive(Default)]
struct InFlight(std::collections::VecDeque<tokio::task::JoinHandle<anyhow::Result<()>>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        for job in &self.0 {
            job.abort();
        }
    }
}

/// Applies one replayed batch into `version`, retrying Redis until it
/// works, except when Redis is full: the rebuild is what fills it (it holds
/// a second copy of the projection while it runs), and waiting would stall
/// the live processors' writes with it.
async fn apply_replayed(
    store: &Store,
    spec: &ProjectionSpec,
    version: u64,
    batch: &[Record],
    turns: &WriteTurns,
) -> anyhow::Result<()> {
    let plan = plan(std::iter::once(spec), batch);
    let mut shards: Vec<Vec<(&Update, &str)>> = vec![Vec::new(); SHARDS];
    for (u, id, _) in &plan.updates {
        shards[shard_of(&u.key)].push((u, id.as_str()));
    }
    let replay_spans = BatchSpans::replay(batch, &spec.name);
    let apply_spans = replay_spans.phase(Phase::Apply);
    futures::future::try_join_all(
        shards
            .iter()
            .zip(turns.iter())
            .map(|(updates, turn)| apply_replayed_shard(store, version, updates, turn)),
    )
    .await?;
    drop((apply_spans, replay_spans));
    Ok(())
}

/// One write turn per shard of the entities (see [`shard_of`]).
type WriteTurns = Arc<[tokio::sync::Mutex<()>; SHARDS]>;

/// Writes one shard of a replayed batch in its turn, retrying through
/// Redis errors except a full Redis or a lost `building` pointer.
async fn apply_replayed_shard(
    store: &Store,
    version: u64,
    updates: &[(&Update, &str)],
    turn: &tokio::sync::Mutex<()>,
) -> anyhow::Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let _turn = turn.lock().await;
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = store.apply_shard(updates, Target::Version(version)).await {
        if e.code() == Some("OOM") {
            return Err(RedisFull.into());
        }
        if e.code() == Some(NOT_BUILDING) {
            anyhow::bail!(
                "{} (its `building` pointer lapsed, or was removed or changed while it ran); stopping",
                e.detail().unwrap_or(NOT_BUILDING)
            );
        }
        warn!(error = %e, "Redis failed during rebuild; retrying.");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    Ok(())
}

/// Redis reached `maxmemory` during a replay.
#[derive(Debug, thiserror::Error)]
#[error("Redis is full (maxmemory): a rebuild holds a second copy of the projection while it runs; give Redis that much room and run it again (docs/rebuild.md, \"Room in Redis\")")]
struct RedisFull;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, partition: i32, offset: i64) -> Record {
        Record {
            topic: topic.into(),
            partition,
            offset,
            key: None,
            payload: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn progress_counts_only_records_below_the_starting_high_watermarks() {
        let mut highs = Highs::new();
        highs.insert("raw.stripe".into(), vec![(0, 10), (1, 3)]);
        let batch = [
            record("raw.stripe", 0, 8),
            record("raw.stripe", 0, 9),
            record("raw.stripe", 0, 10), // produced during the replay
            record("raw.stripe", 1, 2),
            record("raw.stripe", 1, 3), // produced during the replay
            record("raw.stripe", 2, 0), // a partition added since
            record("raw.orders", 0, 0), // not a replayed topic
        ];
        assert_eq!(count_below(&highs, &batch), 3);
    }

    #[test]
    fn the_progress_line_shows_count_rate_and_eta() {
        let line = progress_line("customers", 2, 5_000, 10_000, Duration::from_secs(2));
        assert_eq!(
            line,
            "rebuild customers v2: 5000/10000 records (50%), 2500 rec/s, ETA 2s"
        );
        let done = progress_line("customers", 2, 10_000, 10_000, Duration::from_secs(4));
        assert!(done.contains("10000/10000 records (100%)"), "{done}");
        assert!(done.ends_with("ETA 0s"), "{done}");
    }
}
