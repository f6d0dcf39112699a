//! The Redis side of projections.
//!
//! Key layout (prefix `P`, default `hooklog:`; `{NAME}` is a hash tag so a
//! projection's keys share one cluster slot):
//!
//! | key | what |
//! |---|---|
//! | `P{NAME}:current` | current version (absent = 1); readers follow it |
//! | `P{NAME}:building` | version a rebuild is filling (live applies dual-write) |
//! | `P{NAME}:v<N>:e:<entity key>` | entity hash: fields (JSON text), `~c:<f>` clocks (only where not `~updated`; see [`super::fold`]), `~r:<f>` ranks, `~updated`, `~rev` |
//! | `P{NAME}:v<N>:seen:<bucket start>` | set of the event ids applied in that time bucket, expiring `dedup_window_secs` after the bucket ends |
//! | `P{NAME}:v<N>:seen` | index of the live buckets (sorted set: bucket key → expiry) |
//! | `P{NAME}:v<N>:stripe:<S>` | bumped by every write of an entity of write stripe `S` (see [`STRIPES`]) |
//! | `P{NAME}:writes` | commit calls by anyone (see [`WriteCounts`]) |
//! | `P{NAME}:writes:<writer>` | commit calls by one process, expiring a day after its last |
//!
//! [`Store::apply_batch`] reads every entity a batch touches, then which of
//! the events of the entities that exist were applied (`lua/seen.lua`), folds the
//! new events per entity in memory ([`super::fold`]) and writes the entities
//! and the events' markers in one atomic step: first as a transaction that
//! runs only if nobody wrote in the entities' stripes since the read
//! (`WATCH` on the stripe counters, then `MULTI` … `EXEC`); if someone did,
//! with `lua/commit.lua`, a compare-and-set on each entity's `~rev`, where an
//! entity someone else changed meanwhile is read and folded again.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{AsyncCommands, ErrorKind, RedisError, Script};
use serde_json::Value;

use super::fold::{self, Changed, Fields};
use super::spec::Update;

const COMMIT_LUA: &str = include_str!("../../lua/commit.lua");
const SEEN_LUA: &str = include_str!("../../lua/seen.lua");
const MARKERS_LUA: &str = include_str!("../../lua/markers.lua");

/// Event ids per `seen.lua` call (its `unpack` must stay under Lua's 8,000
/// C stack slots).
const SEEN_CHUNK: usize = 4_000;

/// Marker buckets per dedup window: reads check about this many sets, and a
/// marker lives between one window and one window plus one bucket.
const BUCKETS_PER_WINDOW: u64 = 8;

/// Unix seconds now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The marker bucket for `now`: (bucket start, when the bucket expires).
fn marker_bucket(now: u64, window_secs: u64) -> (u64, u64) {
    let width = (window_secs / BUCKETS_PER_WINDOW).max(1);
    let start = now - now % width;
    (start, start + width + window_secs)
}

/// Arguments per `lua/commit.lua` call (about 20 per event), so that no
/// single call builds a huge Lua argument table. The calls of one apply
/// still run in one MULTI/EXEC, which blocks Redis for all of them, as the
/// watched transaction does (docs/operations.md, "Capacity planning").
const CHUNK_ARGS: usize = 8_000;

/// A batch is split by entity into this many shards applied concurrently,
/// so the processor folds one shard while Redis works on another. Shards
/// share no entity, so they never lose a compare-and-set to each other.
/// The live consumer runs one apply lane per shard (see `crate::consume`).
pub const SHARDS: usize = 4;

/// The entities of a projection version are spread over this many write
/// stripes by [`stripe_of`], each with a counter
/// (`P{NAME}:v<N>:stripe:<S>`) that every write of one of its entities
/// bumps in the same atomic step, so a watched apply (see
/// `Store::commit_watched`) watches a few counters instead of thousands of
/// entities. Part of the stored format: every process writing a projection
/// must use the same stripes.
pub const STRIPES: usize = 16;

/// Batches smaller than this are applied as one shard.
const MIN_SHARDED: usize = 256;

/// Read-fold-write rounds before giving up (each lost race is one round).
const MAX_ROUNDS: usize = 32;

/// A random pause before round `round` (≥ 1): up to 1, 2, 4 … 64 ms.
fn lost_race_backoff(round: usize) -> Duration {
    let ceiling_ms = 1u64 << (round - 1).min(6);
    Duration::from_micros(rand::random::<u64>() % (ceiling_ms * 1000 + 1))
}

/// Updates with their event ids, as [`Store::apply_batch`] takes them.
type Batch<'a> = Vec<(&'a Update, &'a str)>;

/// What one read found in one version of a projection.
struct VersionRead<'a> {
    /// Entity key → stored hash.
    entities: HashMap<&'a str, Fields>,
    /// Event ids already applied in this version.
    seen: HashSet<&'a str>,
}

/// One entity of one version after the fold: what to write, and whether the
/// write needs doing (it has new events).
struct Group<'a> {
    key: String,
    /// The entity's write stripe (see [`stripe_of`]).
    stripe: usize,
    version: u64,
    version_index: usize,
    expected_rev: u64,
    /// Event ids newly applied (they become markers with the write).
    markers: Vec<&'a str>,
    /// The fields to write (their values are in `state`).
    changed: Changed,
    write: bool,
    updates: Vec<usize>,
    applied: Vec<bool>,
    state: Fields,
}

impl Group<'_> {
    fn args_len(&self) -> usize {
        6 + self.markers.len() + 2 * self.changed.len()
    }
}

/// True the first time an event id is met in this version.
fn applied_here<'a>(seen: &mut HashSet<&'a str>, event_id: &'a str) -> bool {
    seen.insert(event_id)
}

/// What [`Store::read_for_fold`] read: the versions, the write counters
/// and the entities with their applied events, per projection.
type ReadForFold<'a> = (Vec<Vec<u64>>, Vec<WriteCounts>, Vec<Vec<VersionRead<'a>>>);

/// What the first round trip of [`Store::read_for_fold`] read: the
/// pointers' versions (None for a rebuild), the write counters and the
/// entities, per projection.
type EntitiesRead<'a> = (
    Option<Vec<Vec<u64>>>,
    Vec<WriteCounts>,
    Vec<Vec<VersionRead<'a>>>,
);

/// The versions a live apply writes: the current one (absent = 1), then
/// the building one if a rebuild is filling another.
fn live_versions(current: Option<u64>, building: Option<u64>) -> Vec<u64> {
    let current = current.unwrap_or(1);
    match building {
        Some(b) if b != current => vec![current, b],
        _ => vec![current],
    }
}

/// Which versions an apply writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The live path: the current version, plus the building one if any.
    Live,
    /// A rebuild: only this version.
    Version(u64),
}

/// One entity's state as served by the read API and the changelog.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityState {
    /// Projection name.
    pub projection: String,
    /// Entity key.
    pub key: String,
    /// Projection version the state comes from.
    pub version: u64,
    /// The entity's `~rev` (changes with every write; not published).
    pub rev: u64,
    /// The published JSON document: `projection`, `key`, `version`,
    /// `state` (the fields), `updated_at` (event time of the newest event
    /// applied, RFC 3339) and `last_event_id` (that event's id). Written
    /// straight from the stored hash (see [`entity_state`]).
    pub json: Vec<u8>,
}

impl EntityState {
    /// The document as a JSON value.
    pub fn document(&self) -> Value {
        serde_json::from_slice(&self.json).expect("entity_state writes JSON")
    }
}

/// What applying one update did.
#[derive(Clone, Debug)]
pub struct Applied {
    /// False when the event id was already applied in that version.
    pub applied: bool,
    /// The entity's state after the apply: on the live path only, and only
    /// for the last update of each entity in the batch (the one the
    /// changelog needs); reading and shipping every intermediate state was
    /// most of the apply's cost.
    pub state: Option<EntityState>,
    /// The projection's write counters when the entity was read.
    pub since: WriteCounts,
}

/// A projection's write counters: commit calls by anyone, and by this
/// process. `lua/commit.lua` bumps both in the same atomic step as its
/// writes, and they are always read together, this process's first. If
/// both moved by the same amount between two reads, nobody else wrote any
/// entity of the projection in between: whatever changed since the
/// first read, this process changed itself. The publish stage uses this to
/// skip re-reading each entity it published (see `crate::consume`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Commit calls by anyone.
    pub total: u64,
    /// Commit calls by this process.
    pub own: u64,
}

impl WriteCounts {
    /// From the two counters as read (absent = 0), this process's first.
    fn read(own: Option<u64>, total: Option<u64>) -> Self {
        Self {
            total: total.unwrap_or(0),
            own: own.unwrap_or(0),
        }
    }

    /// True when nobody but this process wrote between `earlier` and these
    /// counts. A counter that went back (Redis lost data; this process's
    /// counter expired) answers false.
    pub fn only_ours_since(&self, earlier: &WriteCounts) -> bool {
        self.total >= earlier.total
            && self.own >= earlier.own
            && self.total - earlier.total == self.own - earlier.own
    }
}

/// Redis access for projections.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
    window_secs: u64,
    script: Script,
    seen_script: Script,
    /// Names this process's own write counter.
    writer: String,
    /// Per projection, the versions its pointers named at the last read.
    versions_seen: Arc<Mutex<HashMap<String, Vec<u64>>>>,
    /// Opens the connections of [`Store::watch_connection`].
    client: redis::Client,
    /// Idle connections for watched applies: WATCH belongs to a
    /// connection, so each apply in flight needs one of its own.
    watch_pool: Arc<Mutex<Vec<MultiplexedConnection>>>,
    /// When to try a watched commit, and how many lost.
    watch_backoff: Arc<WatchBackoff>,
    /// Every apply goes through `lua/commit.lua` (see [`Store::scripted_only`]).
    scripted_only: bool,
}

/// When a store tries a watched commit. One loses whenever another writer
/// (a replica sharing the projection) writes in its stripes meanwhile, and
/// a loss costs the read and the fold. So after a loss the next apply uses
/// the script, after two in a row the next two, then 4, 8 … 64; a watched
/// commit that runs ends the streak. Shared by the store's applies.
#[derive(Default)]
struct WatchBackoff {
    /// Losses in a row.
    streak: AtomicU64,
    /// Applies left to do with the script before watching again.
    skip: AtomicU64,
    /// Losses in all.
    lost: AtomicU64,
}

impl WatchBackoff {
    /// Whether the next apply watches (else it counts down the skips).
    fn should_watch(&self) -> bool {
        self.skip
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    /// A watched commit ran, or lost.
    fn outcome(&self, ran: bool) {
        if ran {
            self.streak.store(0, Ordering::Relaxed);
        } else {
            self.lost.fetch_add(1, Ordering::Relaxed);
            let streak = self.streak.fetch_add(1, Ordering::Relaxed).min(6);
            self.skip.store(1 << streak, Ordering::Relaxed);
        }
    }
}

/// The marker bucket of an apply (see `marker_bucket`).
#[derive(Clone, Copy)]
struct MarkerBucket {
    now: u64,
    start: u64,
    expiry: u64,
}

impl MarkerBucket {
    /// The bucket's set key: `<seen index key>:<bucket start>`.
    fn key(&self, index: &str) -> String {
        format!("{index}:{}", self.start)
    }
}

impl Store {
    /// Connects (fails when Redis is unreachable; callers retry).
    /// `window_secs` is how long an applied event id is remembered
    /// (`dedup_window_secs`).
    pub async fn connect(url: &str, prefix: &str, window_secs: u64) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(10))
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        let store = Self {
            conn,
            prefix: prefix.to_owned(),
            window_secs,
            script: Script::new(COMMIT_LUA),
            seen_script: Script::new(SEEN_LUA),
            writer: format!("{:016x}", rand::random::<u64>()),
            versions_seen: Arc::default(),
            client,
            watch_pool: Arc::default(),
            watch_backoff: Arc::default(),
            scripted_only: false,
        };
        store.load_script().await?;
        Ok(store)
    }

    async fn load_script(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        self.script.prepare_invoke().load_async(&mut conn).await?;
        self.seen_script
            .prepare_invoke()
            .load_async(&mut conn)
            .await?;
        Ok(())
    }

    /// `P{NAME}`.
    fn base(&self, projection: &str) -> String {
        format!("{}{{{projection}}}", self.prefix)
    }

    /// Key of the current-version pointer.
    pub fn current_key(&self, projection: &str) -> String {
        format!("{}:current", self.base(projection))
    }

    /// Key of the building-version pointer.
    pub fn building_key(&self, projection: &str) -> String {
        format!("{}:building", self.base(projection))
    }

    /// Keys of a projection's write counters: (this process's, anyone's).
    fn write_count_keys(&self, projection: &str) -> (String, String) {
        let total = format!("{}:writes", self.base(projection));
        (format!("{total}:{}", self.writer), total)
    }

    /// Prefix of every key of one version.
    pub fn version_prefix(&self, projection: &str, version: u64) -> String {
        format!("{}:v{version}", self.base(projection))
    }

    /// Index of a version's marker buckets.
    fn seen_index(&self, projection: &str, version: u64) -> String {
        format!("{}:seen", self.version_prefix(projection, version))
    }

    /// PING.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
    }

    /// A connection for other modules (rebuild).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Applies `updates` (with their event ids) in one pipeline.
    pub async fn apply_batch(
        &self,
        updates: &[(&Update, &str)],
        target: Target,
    ) -> Result<Vec<Applied>, RedisError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        if updates.len() < MIN_SHARDED {
            return self.apply_shard(updates, target).await;
        }
        // Per shard: the updates' positions in the batch, and the updates.
        let mut shards: Vec<(Vec<usize>, Batch)> = vec![Default::default(); SHARDS];
        for (i, &(up, id)) in updates.iter().enumerate() {
            let shard = &mut shards[shard_of(&up.key)];
            shard.0.push(i);
            shard.1.push((up, id));
        }
        let results = futures::future::try_join_all(
            shards
                .iter()
                .map(|(_, shard)| self.apply_shard(shard, target)),
        )
        .await?;
        let mut out = vec![None; updates.len()];
        for ((positions, _), applied) in shards.iter().zip(results) {
            for (&i, a) in positions.iter().zip(applied) {
                out[i] = Some(a);
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.expect("every update in one shard"))
            .collect())
    }

    /// Applies updates that share no entity with any other apply running
    /// meanwhile in this process (one shard of [`shard_of`]), in one go.
    pub async fn apply_shard(
        &self,
        updates: &[(&Update, &str)],
        target: Target,
    ) -> Result<Vec<Applied>, RedisError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        match self.apply_once(updates, target).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                // Redis restarted and lost its script cache: load and retry.
                self.load_script().await?;
                self.apply_once(updates, target).await
            }
            other => other,
        }
    }

    async fn apply_once(
        &self,
        updates: &[(&Update, &str)],
        target: Target,
    ) -> Result<Vec<Applied>, RedisError> {
        let mut conn = self.conn.clone();
        let mut applied = vec![false; updates.len()];
        let mut states: Vec<Option<EntityState>> = vec![None; updates.len()];
        let mut since = vec![WriteCounts::default(); updates.len()];
        // The last update of each entity carries its state (live only).
        let mut last_of_entity = HashMap::new();
        for (i, (up, _)) in updates.iter().enumerate() {
            last_of_entity.insert((up.projection.as_str(), up.key.as_str()), i);
        }
        let mut pending: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, (up, _)) in updates.iter().enumerate() {
            match pending.iter_mut().find(|(p, _)| *p == up.projection) {
                Some((_, idx)) => idx.push(i),
                None => pending.push((&up.projection, vec![i])),
            }
        }
        // Another writer (a replica sharing entities, a rebuild switching
        // versions) can win a race; the loser re-reads and folds again.
        for round in 0..MAX_ROUNDS {
            if pending.is_empty() {
                break;
            }
            if round > 0 {
                // Writers that lost to each other back off for a random
                // while so they stop colliding in lockstep.
                tokio::time::sleep(lost_race_backoff(round)).await;
            }
            let now = unix_now();
            let (bucket, expiry) = marker_bucket(now, self.window_secs);
            // The first round reads and writes on a connection of its own,
            // watching what it reads (see `commit_watched`); a round after a
            // lost race uses the script, which tells the groups apart.
            let mut watched = match round {
                0 if self.should_watch() => Some(self.watch_connection().await?),
                _ => None,
            };
            let (versions, counts, reads) = match watched.as_mut() {
                Some(c) => {
                    self.read_for_fold(c, updates, &pending, target, true, now)
                        .await?
                }
                None => {
                    self.read_for_fold(&mut conn, updates, &pending, target, false, now)
                        .await?
                }
            };
            let mut calls = Vec::new();
            for (((projection, idx), versions), read) in pending.iter().zip(&versions).zip(reads) {
                let groups = self.fold(updates, idx, versions, read);
                let mut chunk: Vec<Group> = Vec::new();
                let mut args = 0;
                for g in groups {
                    args += g.args_len();
                    chunk.push(g);
                    if args >= CHUNK_ARGS {
                        calls.push((*projection, std::mem::take(&mut chunk)));
                        args = 0;
                    }
                }
                if !chunk.is_empty() {
                    calls.push((*projection, chunk));
                }
            }
            let marks = MarkerBucket {
                now,
                start: bucket,
                expiry,
            };
            let replies = match watched.as_mut() {
                _ if calls.is_empty() => Vec::new(),
                Some(c) => {
                    self.commit_watched(c, &calls, &pending, &versions, marks)
                        .await?
                }
                None => {
                    self.commit_scripted(&mut conn, &calls, &pending, &versions, target, marks)
                        .await?
                }
            };
            if let Some(c) = watched {
                self.watch_pool.lock().expect("lock").push(c);
            }
            let mut retry: HashMap<&str, BTreeSet<usize>> = HashMap::new();
            for ((projection, groups), reply) in calls.iter().zip(replies) {
                let read_at = counts[pending
                    .iter()
                    .position(|(p, _)| p == projection)
                    .expect("pending")];
                let flags: Vec<i64> = match reply {
                    redis::Value::Int(_) => vec![1; groups.len()],
                    other => redis::from_redis_value(&other)?,
                };
                let mut flags = flags.into_iter();
                for g in groups {
                    let lost = g.write && flags.next().unwrap_or(1) == 1;
                    if lost {
                        retry.entry(projection).or_default().extend(&g.updates);
                        continue;
                    }
                    if g.version_index == 0 {
                        for (&i, &a) in g.updates.iter().zip(&g.applied) {
                            applied[i] |= a;
                            since[i] = read_at;
                        }
                        let last = g.updates.last().copied();
                        let wanted = last.filter(|i| {
                            let up = updates[*i].0;
                            target == Target::Live
                                && last_of_entity.get(&(up.projection.as_str(), up.key.as_str()))
                                    == Some(i)
                        });
                        if let Some(i) = wanted.filter(|_| !g.state.is_empty()) {
                            let up = updates[i].0;
                            let pairs = g.state.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                            states[i] =
                                Some(entity_state(&up.projection, &up.key, g.version, pairs));
                        }
                    }
                }
            }
            pending = pending
                .into_iter()
                .filter_map(|(p, _)| {
                    retry
                        .remove(p)
                        .map(|idx| (p, idx.into_iter().collect::<Vec<_>>()))
                })
                .collect();
        }
        if !pending.is_empty() {
            return Err(RedisError::from((
                ErrorKind::TryAgain,
                "entities kept changing under the apply",
            )));
        }
        Ok(applied
            .into_iter()
            .zip(states)
            .zip(since)
            .map(|((applied, state), since)| Applied {
                applied,
                state,
                since,
            })
            .collect())
    }

    /// This store applies every batch with `lua/commit.lua`, never with a
    /// watched transaction first: for servers that speak the scripts but
    /// not `WATCH` (some proxies), and for tests of the script's path.
    pub fn scripted_only(mut self) -> Self {
        self.scripted_only = true;
        self
    }

    /// How many watched commits of this store did not run because another
    /// writer wrote in their stripes or moved their pointers meanwhile
    /// (each was then applied with `lua/commit.lua`).
    pub fn lost_watches(&self) -> u64 {
        self.watch_backoff.lost.load(Ordering::Relaxed)
    }

    /// Whether this apply tries a watched commit first.
    fn should_watch(&self) -> bool {
        !self.scripted_only && self.watch_backoff.should_watch()
    }

    /// A connection for a watched apply: an idle one, or a new one. It goes
    /// back to the pool only after a successful apply; after an error it is
    /// dropped, since its state (watched keys, a transaction half sent) is
    /// unknown. Unlike the shared connection manager it never reconnects
    /// behind the apply's back, which would lose the watch.
    async fn watch_connection(&self) -> Result<MultiplexedConnection, RedisError> {
        if let Some(c) = self.watch_pool.lock().expect("lock").pop() {
            return Ok(c);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(10));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Writes the folded groups in one MULTI/EXEC on the connection that
    /// watched the pointers and entities before reading them: Redis runs it
    /// only if none of them changed since, else runs nothing and answers
    /// nil. The same compare-and-set as `lua/commit.lua`, for the whole
    /// apply at once, without running a script over every field: in a
    /// script each argument becomes a Lua string and each write a call back
    /// into Redis, which took about half of Redis's time. Returns, per call
    /// in `calls`, what `commit.lua` would: a flag per written group (0
    /// written), or -1 for all of them when the transaction did not run.
    async fn commit_watched(
        &self,
        conn: &mut MultiplexedConnection,
        calls: &[(&str, Vec<Group<'_>>)],
        pending: &[(&str, Vec<usize>)],
        versions: &[Vec<u64>],
        marks: MarkerBucket,
    ) -> Result<Vec<redis::Value>, RedisError> {
        let written = |groups: &[Group]| groups.iter().filter(|g| g.write).count();
        if calls.iter().all(|(_, groups)| written(groups) == 0) {
            return Ok(calls
                .iter()
                .map(|_| redis::Value::Array(Vec::new()))
                .collect());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI");
        for ((projection, _), versions) in pending.iter().zip(versions) {
            let groups: Vec<&Group> = calls
                .iter()
                .filter(|(p, _)| p == projection)
                .flat_map(|(_, groups)| groups.iter().filter(|g| g.write))
                .collect();
            if groups.is_empty() {
                continue;
            }
            let mut bumped = vec![[false; STRIPES]; versions.len()];
            for g in &groups {
                let hset = pipe.cmd("HSET").arg(&g.key);
                for f in &g.changed {
                    hset.arg(f).arg(&g.state[f]);
                }
                bumped[g.version_index][g.stripe] = true;
            }
            for (vi, &v) in versions.iter().enumerate() {
                let base = self.version_prefix(projection, v);
                for stripe in (0..STRIPES).filter(|&s| bumped[vi][s]) {
                    pipe.cmd("INCR").arg(stripe_key(&base, stripe));
                }
                let ids: Vec<&str> = groups
                    .iter()
                    .filter(|g| g.version_index == vi)
                    .flat_map(|g| g.markers.iter().copied())
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let index = self.seen_index(projection, v);
                pipe.cmd("SADD").arg(marks.key(&index)).arg(ids);
                self.keep_bucket(&mut pipe, &index, marks);
            }
            let (own_writes, writes) = self.write_count_keys(projection);
            pipe.cmd("INCR").arg(writes);
            pipe.cmd("INCR").arg(&own_writes);
            pipe.cmd("EXPIRE").arg(&own_writes).arg(86400);
        }
        pipe.cmd("EXEC");
        let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
        let ran = !matches!(replies.last(), Some(redis::Value::Nil) | None);
        self.watch_backoff.outcome(ran);
        Ok(calls
            .iter()
            .map(|(_, groups)| match ran {
                true => redis::Value::Array(vec![redis::Value::Int(0); written(groups)]),
                false => redis::Value::Int(-1),
            })
            .collect())
    }

    /// Writes the folded groups with `lua/commit.lua`, one call per chunk
    /// in `calls`, each group compared and set on its own, then keeps the
    /// marker buckets with `lua/markers.lua`, all in one MULTI/EXEC.
    async fn commit_scripted(
        &self,
        conn: &mut ConnectionManager,
        calls: &[(&str, Vec<Group<'_>>)],
        pending: &[(&str, Vec<usize>)],
        versions: &[Vec<u64>],
        target: Target,
        marks: MarkerBucket,
    ) -> Result<Vec<redis::Value>, RedisError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (projection, groups) in calls {
            let version = &versions[pending
                .iter()
                .position(|(p, _)| p == projection)
                .expect("pending")];
            let (own_writes, writes) = self.write_count_keys(projection);
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(0)
                .arg(self.current_key(projection))
                .arg(self.building_key(projection))
                .arg(if target == Target::Live { "1" } else { "" })
                .arg(version[0])
                .arg(version.get(1).map(u64::to_string).unwrap_or_default())
                .arg(writes)
                .arg(own_writes)
                .arg(version.len());
            for &v in version {
                cmd.arg(marks.key(&self.seen_index(projection, v)));
                cmd.arg(stripe_prefix(&self.version_prefix(projection, v)));
            }
            for g in groups.iter().filter(|g| g.write) {
                cmd.arg(&g.key).arg(g.expected_rev).arg(g.version_index + 1);
                cmd.arg(g.stripe);
                cmd.arg(g.markers.len()).arg(&g.markers);
                cmd.arg(g.changed.len());
                for f in &g.changed {
                    cmd.arg(f).arg(&g.state[f]);
                }
            }
        }
        for ((projection, _), version) in pending.iter().zip(versions) {
            if !calls.iter().any(|(p, _)| p == projection) {
                continue;
            }
            for &v in version {
                self.keep_bucket(&mut pipe, &self.seen_index(projection, v), marks);
                pipe.ignore();
            }
        }
        pipe.query_async(conn).await
    }

    /// Adds `lua/markers.lua` for one marker bucket to a transaction.
    fn keep_bucket(&self, pipe: &mut redis::Pipeline, index: &str, marks: MarkerBucket) {
        pipe.cmd("EVAL")
            .arg(MARKERS_LUA)
            .arg(0)
            .arg(marks.key(index))
            .arg(index)
            .arg(marks.now)
            .arg(marks.expiry);
    }

    /// The versions each projection's updates go to (current first): for
    /// a live apply, the versions last seen (see [`Store::read_for_fold`]),
    /// else version 1 alone (the pointers' default).
    fn guess_versions(&self, pending: &[(&str, Vec<usize>)], target: Target) -> Vec<Vec<u64>> {
        if let Target::Version(v) = target {
            return vec![vec![v]; pending.len()];
        }
        let seen = self.versions_seen.lock().expect("lock");
        pending
            .iter()
            .map(|(p, _)| seen.get(*p).cloned().unwrap_or_else(|| vec![1]))
            .collect()
    }

    /// Two round trips. First, in one pipeline: each projection's version
    /// pointers, its write counters (whatever changed an entity after they
    /// were read moved them) and every entity the updates touch (HGETALL),
    /// in the versions the pointers last named. The pointers seldom move
    /// (a rebuild starts or switches), so this saves the round trip that
    /// would read them first; when they did move, the read is repeated in
    /// the versions they name now. Either way the entities are read after
    /// the pointers, and `lua/commit.lua` checks the pointers again when it
    /// writes.
    ///
    /// Then which of the events of the entities that exist each version has
    /// already applied (`lua/seen.lua`): applying an event writes its entity
    /// and its marker in one atomic step (`lua/commit.lua`), and an event
    /// updates one entity per projection, so a version without the entity
    /// has no marker of its events either. In a backlog most entities are
    /// new (a charge per event), and their events need no check.
    async fn read_for_fold<'a>(
        &self,
        conn: &mut impl ConnectionLike,
        updates: &[(&'a Update, &'a str)],
        pending: &[(&str, Vec<usize>)],
        target: Target,
        watch: bool,
        now: u64,
    ) -> Result<ReadForFold<'a>, RedisError> {
        let mut versions = self.guess_versions(pending, target);
        loop {
            let (pointers, counts, reads) = self
                .read_entities(conn, updates, pending, &versions, target, watch)
                .await?;
            match pointers {
                Some(pointers) if pointers != versions => {
                    let mut seen = self.versions_seen.lock().expect("lock");
                    for ((p, _), v) in pending.iter().zip(&pointers) {
                        seen.insert((*p).to_owned(), v.clone());
                    }
                    versions = pointers;
                }
                _ => {
                    let reads = self
                        .read_seen(conn, updates, pending, &versions, reads, now)
                        .await?;
                    return Ok((versions, counts, reads));
                }
            }
        }
    }

    /// The first round trip of [`Store::read_for_fold`]: the pointers (live
    /// applies only; None for a rebuild), the counters, the entities in
    /// `versions`. With `watch`, the pointers and the entities' stripe
    /// counters are watched first (see [`Store::commit_watched`]).
    async fn read_entities<'a>(
        &self,
        conn: &mut impl ConnectionLike,
        updates: &[(&'a Update, &'a str)],
        pending: &[(&str, Vec<usize>)],
        versions: &[Vec<u64>],
        target: Target,
        watch: bool,
    ) -> Result<EntitiesRead<'a>, RedisError> {
        let live = target == Target::Live;
        let mut entity_lists = Vec::new();
        let mut keys = Vec::new();
        let mut stripes = Vec::new();
        for ((projection, idx), versions) in pending.iter().zip(versions) {
            let mut entities: Vec<&str> = idx.iter().map(|&i| updates[i].0.key.as_str()).collect();
            entities.sort_unstable();
            entities.dedup();
            let mut used = [false; STRIPES];
            for e in &entities {
                used[stripe_of(e)] = true;
            }
            for &v in versions {
                let base = self.version_prefix(projection, v);
                keys.extend(entities.iter().map(|e| entity_hash_key(&base, e)));
                for stripe in (0..STRIPES).filter(|&s| used[s]) {
                    stripes.push(stripe_key(&base, stripe));
                }
            }
            entity_lists.push(entities);
        }
        let mut pipe = redis::pipe();
        if watch {
            // A connection's watched keys last until its next EXEC or
            // UNWATCH: start from none. Every write of an entity bumps its
            // stripe (watching the entities themselves costs Redis time
            // quadratic in their number), and a rebuild's switch moves
            // the pointers.
            pipe.cmd("UNWATCH").ignore();
            let watched = pipe.cmd("WATCH");
            for (projection, _) in pending.iter().filter(|_| live) {
                watched
                    .arg(self.current_key(projection))
                    .arg(self.building_key(projection));
            }
            watched.arg(&stripes).ignore();
        }
        for (projection, _) in pending {
            if live {
                pipe.get(self.current_key(projection))
                    .get(self.building_key(projection));
            }
            let (own, total) = self.write_count_keys(projection);
            pipe.get(own).get(total);
        }
        for key in &keys {
            pipe.cmd("HGETALL").arg(key);
        }
        let mut replies: std::vec::IntoIter<redis::Value> = pipe
            .query_async::<Vec<redis::Value>>(conn)
            .await?
            .into_iter();
        let mut counts = Vec::with_capacity(pending.len());
        let mut pointers = Vec::with_capacity(pending.len());
        for _ in pending {
            if live {
                let current: Option<u64> =
                    redis::from_redis_value(&replies.next().expect("reply"))?;
                let building: Option<u64> =
                    redis::from_redis_value(&replies.next().expect("reply"))?;
                pointers.push(live_versions(current, building));
            }
            let own = redis::from_redis_value(&replies.next().expect("reply"))?;
            let total = redis::from_redis_value(&replies.next().expect("reply"))?;
            counts.push(WriteCounts::read(own, total));
        }
        let mut out = Vec::with_capacity(pending.len());
        for (entities, versions) in entity_lists.into_iter().zip(versions) {
            let mut per_version = Vec::with_capacity(versions.len());
            for _ in versions {
                let mut found = HashMap::new();
                for e in &entities {
                    let fields: Fields = redis::from_redis_value(&replies.next().expect("reply"))?;
                    found.insert(*e, fields);
                }
                per_version.push(VersionRead {
                    entities: found,
                    seen: HashSet::new(),
                });
            }
            out.push(per_version);
        }
        Ok((live.then_some(pointers), counts, out))
    }

    /// The second round trip of [`Store::read_for_fold`]: which events of
    /// the entities found each version has applied.
    async fn read_seen<'a>(
        &self,
        conn: &mut impl ConnectionLike,
        updates: &[(&'a Update, &'a str)],
        pending: &[(&str, Vec<usize>)],
        versions: &[Vec<u64>],
        mut out: Vec<Vec<VersionRead<'a>>>,
        now: u64,
    ) -> Result<Vec<Vec<VersionRead<'a>>>, RedisError> {
        let mut pipe = redis::pipe();
        // (projection's position in `pending`, version's position, the ids
        // asked about).
        let mut asked = Vec::new();
        for (p, ((projection, idx), versions)) in pending.iter().zip(versions).enumerate() {
            for (vi, &v) in versions.iter().enumerate() {
                let entities = &out[p][vi].entities;
                let mut ids: Vec<&str> = idx
                    .iter()
                    .map(|&i| updates[i])
                    .filter(|(up, _)| entities.get(up.key.as_str()).is_some_and(|f| !f.is_empty()))
                    .map(|(_, id)| id)
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                ids.sort_unstable();
                ids.dedup();
                let index = self.seen_index(projection, v);
                for chunk in ids.chunks(SEEN_CHUNK) {
                    pipe.cmd("EVALSHA")
                        .arg(self.seen_script.get_hash())
                        .arg(0)
                        .arg(&index)
                        .arg(now)
                        .arg(chunk);
                }
                asked.push((p, vi, ids));
            }
        }
        if asked.is_empty() {
            return Ok(out);
        }
        let mut replies: std::vec::IntoIter<redis::Value> = pipe
            .query_async::<Vec<redis::Value>>(conn)
            .await?
            .into_iter();
        for (p, vi, ids) in asked {
            let seen = &mut out[p][vi].seen;
            for chunk in ids.chunks(SEEN_CHUNK) {
                let flags: Vec<u8> = redis::from_redis_value(&replies.next().expect("reply"))?;
                seen.extend(
                    chunk
                        .iter()
                        .zip(flags)
                        .filter(|(_, f)| *f == 1)
                        .map(|(id, _)| *id),
                );
            }
        }
        Ok(out)
    }

    /// Folds one projection's updates into its entities, per version.
    fn fold<'a>(
        &self,
        updates: &[(&'a Update, &'a str)],
        idx: &[usize],
        versions: &[u64],
        reads: Vec<VersionRead<'a>>,
    ) -> Vec<Group<'a>> {
        let mut groups = Vec::new();
        for (version_index, (read, &version)) in reads.into_iter().zip(versions).enumerate() {
            let base = self.version_prefix(&updates[idx[0]].0.projection, version);
            let mut seen = read.seen;
            let mut by_entity: Vec<(&str, Vec<usize>)> = Vec::new();
            let mut slot: HashMap<&str, usize> = HashMap::new();
            for &i in idx {
                let key = updates[i].0.key.as_str();
                match slot.get(key) {
                    Some(&s) => by_entity[s].1.push(i),
                    None => {
                        slot.insert(key, by_entity.len());
                        by_entity.push((key, vec![i]));
                    }
                }
            }
            let mut entities = read.entities;
            for (key, members) in by_entity {
                let mut fields = entities.remove(key).unwrap_or_default();
                let expected_rev = fold::rev(&fields);
                let mut changed = Changed::new();
                let mut markers = Vec::new();
                let mut group_applied = Vec::new();
                for &i in &members {
                    let (up, event_id) = updates[i];
                    // Already applied in this version, or earlier in this
                    // batch (the same event twice, or two rules of one
                    // projection matching it): applied once only.
                    let new = applied_here(&mut seen, event_id);
                    if new {
                        fold::apply(
                            &mut fields,
                            &mut changed,
                            &up.ops,
                            &clock(up.time_ms, event_id),
                        );
                        markers.push(event_id);
                    }
                    group_applied.push(new);
                }
                let write = !markers.is_empty();
                if write {
                    fields.insert(fold::REV.into(), (expected_rev + 1).to_string());
                    changed.push(fold::REV.into());
                }
                groups.push(Group {
                    key: entity_hash_key(&base, key),
                    stripe: stripe_of(key),
                    version,
                    version_index,
                    expected_rev,
                    markers,
                    changed,
                    write,
                    updates: members,
                    applied: group_applied,
                    state: fields,
                });
            }
        }
        groups
    }

    /// The current version of a projection.
    pub async fn current_version(&self, projection: &str) -> Result<u64, RedisError> {
        let mut conn = self.conn.clone();
        let v: Option<u64> = conn.get(self.current_key(projection)).await?;
        Ok(v.unwrap_or(1))
    }

    /// The building version, if a rebuild is running.
    pub async fn building_version(&self, projection: &str) -> Result<Option<u64>, RedisError> {
        let mut conn = self.conn.clone();
        conn.get(self.building_key(projection)).await
    }

    /// Reads an entity of the current version (or of `version`).
    pub async fn read(
        &self,
        projection: &str,
        key: &str,
        version: Option<u64>,
    ) -> Result<Option<EntityState>, RedisError> {
        let version = match version {
            Some(v) => v,
            None => self.current_version(projection).await?,
        };
        let mut conn = self.conn.clone();
        let flat: Vec<String> = redis::cmd("HGETALL")
            .arg(entity_hash_key(
                &self.version_prefix(projection, version),
                key,
            ))
            .query_async(&mut conn)
            .await?;
        Ok((!flat.is_empty()).then(|| entity_state(projection, key, version, pairs(&flat))))
    }
}

impl Store {
    /// The current version of each projection among `entities`.
    async fn current_versions(
        &self,
        conn: &mut ConnectionManager,
        entities: &[(&str, &str)],
    ) -> Result<CurrentVersions, RedisError> {
        let mut projections: Vec<&str> = entities.iter().map(|(p, _)| *p).collect();
        projections.sort_unstable();
        projections.dedup();
        let mut pipe = redis::pipe();
        for p in &projections {
            pipe.get(self.current_key(p));
        }
        let versions: Vec<Option<u64>> = pipe.query_async(conn).await?;
        Ok(CurrentVersions(
            projections
                .into_iter()
                .zip(versions)
                .map(|(p, v)| {
                    let v = v.unwrap_or(1);
                    (p.to_owned(), v, self.version_prefix(p, v))
                })
                .collect(),
        ))
    }

    /// For each (projection, counts when read): its current version if
    /// nobody but this process wrote to it since, else None. One round trip.
    pub async fn written_only_by_us_since(
        &self,
        since: &[(&str, WriteCounts)],
    ) -> Result<Vec<Option<u64>>, RedisError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for (projection, _) in since {
            let (own, total) = self.write_count_keys(projection);
            pipe.get(own).get(total).get(self.current_key(projection));
        }
        let raw: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
        Ok(since
            .iter()
            .zip(raw.chunks(3))
            .map(|((_, earlier), now)| {
                WriteCounts::read(now[0], now[1])
                    .only_ours_since(earlier)
                    .then(|| now[2].unwrap_or(1))
            })
            .collect())
    }

    /// The current (version, `~rev`) of many entities in two round trips:
    /// enough to tell whether a published state is still the latest.
    pub async fn revisions(
        &self,
        entities: &[(&str, &str)],
    ) -> Result<Vec<(u64, u64)>, RedisError> {
        let mut conn = self.conn.clone();
        let current = self.current_versions(&mut conn, entities).await?;
        let mut pipe = redis::pipe();
        for (p, k) in entities {
            pipe.hget(entity_hash_key(current.prefix(p), k), fold::REV);
        }
        let revs: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
        Ok(entities
            .iter()
            .zip(revs)
            .map(|((p, _), rev)| (current.version(p), rev.unwrap_or(0)))
            .collect())
    }

    /// Reads the current state of many entities in two round trips.
    pub async fn read_many(
        &self,
        entities: &[(&str, &str)],
    ) -> Result<Vec<Option<EntityState>>, RedisError> {
        let mut conn = self.conn.clone();
        let current = self.current_versions(&mut conn, entities).await?;
        let mut pipe = redis::pipe();
        for (p, k) in entities {
            pipe.cmd("HGETALL")
                .arg(entity_hash_key(current.prefix(p), k));
        }
        let flats: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
        Ok(entities
            .iter()
            .zip(flats)
            .map(|((p, k), flat)| {
                (!flat.is_empty()).then(|| entity_state(p, k, current.version(p), pairs(&flat)))
            })
            .collect())
    }
}

/// Projections with their current version and that version's key prefix.
struct CurrentVersions(Vec<(String, u64, String)>);

impl CurrentVersions {
    fn get(&self, projection: &str) -> &(String, u64, String) {
        self.0
            .iter()
            .find(|(p, _, _)| p == projection)
            .expect("every projection asked about was read")
    }

    fn version(&self, projection: &str) -> u64 {
        self.get(projection).1
    }

    fn prefix(&self, projection: &str) -> &str {
        &self.get(projection).2
    }
}

/// `<version prefix>:e:<entity key>`: the key of an entity's hash.
fn entity_hash_key(version_prefix: &str, key: &str) -> String {
    let mut k = String::with_capacity(version_prefix.len() + 3 + key.len());
    k.push_str(version_prefix);
    k.push_str(":e:");
    k.push_str(key);
    k
}

/// The write stripe of an entity key, below [`STRIPES`]: FNV-1a of the
/// key, which every build and process computes alike (the standard
/// library's hasher promises no such thing).
pub fn stripe_of(key: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % STRIPES as u64) as usize
}

/// The shard of an entity, below [`SHARDS`]: its stripe's, so that two
/// shards (two apply lanes) never share a stripe and never make each
/// other's watched commits lose.
pub fn shard_of(key: &str) -> usize {
    stripe_of(key) % SHARDS
}

/// The counter of a version's write stripe: every write of one of the
/// stripe's entities bumps it in the same atomic step.
fn stripe_key(version_prefix: &str, stripe: usize) -> String {
    format!("{}{stripe}", stripe_prefix(version_prefix))
}

/// What a version's stripe counter keys start with.
fn stripe_prefix(version_prefix: &str) -> String {
    format!("{version_prefix}:stripe:")
}

/// `<15-digit ms>|<event id>`: compares like `(time, id)`.
pub fn clock(time_ms: i64, event_id: &str) -> String {
    format!("{:015}|{event_id}", time_ms.max(0))
}

/// The (field, value) pairs of a flat `HGETALL` reply.
fn pairs(flat: &[String]) -> impl Iterator<Item = (&str, &str)> {
    flat.chunks_exact(2).map(|p| (p[0].as_str(), p[1].as_str()))
}

/// Builds an [`EntityState`] from an entity hash's (field, value) pairs.
///
/// The fields hold JSON text (the processor writes it with serde_json), and
/// the document copies that text as it is, in field-name order: parsing each
/// value into a `Value` and writing it out again was a sixth of the live
/// processor's time. A value that is not JSON (written by someone else) is
/// published as a JSON string.
pub fn entity_state<'a>(
    projection: &str,
    key: &str,
    version: u64,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> EntityState {
    let mut fields: Vec<(&str, &str)> = Vec::new();
    let mut updated = None;
    let mut rev = 0;
    for (f, v) in pairs {
        if f == "~updated" {
            updated = Some(v);
        } else if f == fold::REV {
            rev = v.parse().unwrap_or(0);
        } else if !f.starts_with('~') {
            fields.push((f, v));
        }
    }
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let (updated_at, last_event_id) = match updated.and_then(|u| u.split_once('|')) {
        Some((ms, id)) => {
            let at = ms
                .parse::<i64>()
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            (at, Some(id))
        }
        None => (None, None),
    };
    let size: usize = fields.iter().map(|(f, v)| f.len() + v.len() + 4).sum();
    let mut json = Vec::with_capacity(size + projection.len() + key.len() + 160);
    json.extend_from_slice(b"{\"projection\":");
    json_string(&mut json, projection);
    json.extend_from_slice(b",\"key\":");
    json_string(&mut json, key);
    json.extend_from_slice(format!(",\"version\":{version},\"state\":{{").as_bytes());
    for (i, (f, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json_string(&mut json, f);
        json.push(b':');
        match serde_json::from_str::<&serde_json::value::RawValue>(v) {
            Ok(raw) => json.extend_from_slice(raw.get().as_bytes()),
            Err(_) => json_string(&mut json, v),
        }
    }
    json.extend_from_slice(b"},\"updated_at\":");
    json_option(&mut json, updated_at.as_deref());
    json.extend_from_slice(b",\"last_event_id\":");
    json_option(&mut json, last_event_id);
    json.push(b'}');
    EntityState {
        projection: projection.into(),
        key: key.into(),
        version,
        rev,
        json,
    }
}

/// Appends `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("a string serializes into a Vec");
}

/// Appends `s` as a JSON string, or `null`.
fn json_option(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_counts_tell_whether_anyone_else_wrote() {
        let at = |total, own| WriteCounts { total, own };
        let read = at(100, 40);
        assert!(at(100, 40).only_ours_since(&read), "nobody wrote");
        assert!(at(103, 43).only_ours_since(&read), "only we did");
        assert!(!at(104, 43).only_ours_since(&read), "someone else did once");
        assert!(!at(101, 40).only_ours_since(&read));
        // Counters that went back: Redis lost data, or ours expired.
        assert!(!at(99, 40).only_ours_since(&read));
        assert!(!at(103, 2).only_ours_since(&read));
        assert_eq!(WriteCounts::read(None, None), at(0, 0));
    }

    #[test]
    fn stripes_are_pinned_and_each_belongs_to_one_shard() {
        // Part of the stored format: processes of different builds must
        // agree on every entity's stripe, so its values are pinned (FNV-1a
        // 64 of "" is 0xcbf29ce484222325, of "a" 0xaf63dc4c8601ec8c).
        assert_eq!(stripe_of(""), (0xcbf2_9ce4_8422_2325_u64 % 16) as usize);
        assert_eq!(stripe_of("a"), (0xaf63_dc4c_8601_ec8c_u64 % 16) as usize);
        let keys: Vec<String> = (0..2000).map(|i| format!("cus_{i}")).collect();
        let mut per_stripe = [0usize; STRIPES];
        for k in &keys {
            per_stripe[stripe_of(k)] += 1;
            assert_eq!(shard_of(k), stripe_of(k) % SHARDS);
        }
        assert!(
            per_stripe.iter().all(|&n| n > 2000 / STRIPES / 2),
            "spread: {per_stripe:?}"
        );
    }

    #[test]
    fn watched_commits_back_off_after_losses_in_a_row() {
        let b = WatchBackoff::default();
        let skipped_after = |b: &WatchBackoff| {
            let mut n = 0;
            while !b.should_watch() {
                n += 1;
            }
            n
        };
        assert!(b.should_watch(), "watch until something is lost");
        b.outcome(false);
        assert_eq!(skipped_after(&b), 1);
        b.outcome(false);
        assert_eq!(skipped_after(&b), 2);
        for _ in 0..10 {
            b.outcome(false);
        }
        assert_eq!(skipped_after(&b), 64, "capped");
        b.outcome(true);
        b.outcome(false);
        assert_eq!(skipped_after(&b), 1, "a commit that ran ends the streak");
        assert_eq!(b.lost.load(Ordering::Relaxed), 13);
    }

    #[test]
    fn lost_race_backoff_grows_and_is_capped() {
        for _ in 0..100 {
            assert!(lost_race_backoff(1) <= Duration::from_millis(1));
            assert!(lost_race_backoff(3) <= Duration::from_millis(4));
            assert!(lost_race_backoff(15) <= Duration::from_millis(64));
        }
        let spread: HashSet<_> = (0..50).map(|_| lost_race_backoff(7)).collect();
        assert!(spread.len() > 1, "jittered, not lockstep");
    }

    #[test]
    fn a_marker_lives_one_window_and_at_most_one_bucket_more() {
        let window = 30 * 86_400;
        for now in [1_764_000_000, 1_764_000_001, 1_764_323_999, 1_764_324_000] {
            let (start, expiry) = marker_bucket(now, window);
            assert!(start <= now && now - start < window / BUCKETS_PER_WINDOW);
            assert!(expiry >= now + window);
            assert!(expiry <= now + window + window / BUCKETS_PER_WINDOW);
        }
        // Times in one bucket share it; the next bucket starts a width later.
        assert_eq!(marker_bucket(1000, 80).0, marker_bucket(1009, 80).0);
        assert_eq!(marker_bucket(1010, 80).0, 1010);
        // A tiny window still gets one-second buckets.
        assert_eq!(marker_bucket(1234, 3), (1234, 1238));
    }

    #[test]
    fn clocks_order_by_time_then_id() {
        assert!(clock(2, "a") > clock(1, "z"));
        assert!(clock(1, "b") > clock(1, "a"));
        assert!(clock(10, "a") > clock(9, "a"));
    }

    #[test]
    fn builds_state_from_flat_reply() {
        let flat = [
            "carrier",
            "\"FedEx\"",
            "~c:carrier",
            "x",
            "total",
            "12.5",
            "~updated",
            "001740830400000|e1",
        ];
        let flat: Vec<String> = flat.iter().map(|s| s.to_string()).collect();
        let s = entity_state("orders", "ORD-1", 3, pairs(&flat));
        assert_eq!(
            s.document(),
            serde_json::json!({
                "projection": "orders",
                "key": "ORD-1",
                "version": 3,
                "state": {"carrier": "FedEx", "total": 12.5},
                "updated_at": "2025-03-01T12:00:00.000Z",
                "last_event_id": "e1",
            })
        );
        assert_eq!(s.rev, 0);
        // Fields in name order, numbers as written.
        let text = String::from_utf8(s.json).unwrap();
        assert!(
            text.contains(r#""state":{"carrier":"FedEx","total":12.5}"#),
            "{text}"
        );
    }

    /// The document as the processor built it before it copied field text:
    /// every value parsed into a `Value`, text that is not JSON a string.
    fn document_via_values(projection: &str, key: &str, version: u64, flat: &[String]) -> Value {
        let mut state = serde_json::Map::new();
        for (f, v) in pairs(flat).filter(|(f, _)| !f.starts_with('~')) {
            let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
            state.insert(f.to_owned(), value);
        }
        let s = entity_state(projection, key, version, pairs(flat));
        let d = s.document();
        serde_json::json!({
            "projection": projection, "key": key, "version": version, "state": state,
            "updated_at": d["updated_at"], "last_event_id": d["last_event_id"],
        })
    }

    #[test]
    fn copied_field_text_reads_as_the_parsed_values_would() {
        let values = [
            r#""plain""#,
            r#""quote \" and \\ and \u00e9 and é""#,
            "12345678901234567890123456789.000001",
            "-0.5e-3",
            "true",
            "null",
            r#"{"b":[1,{"c":null}],"a":"x"}"#,
            "[]",
            "not json",
            "",
            " 7 ",
            "{\"unterminated\"",
        ];
        for (i, v) in values.iter().enumerate() {
            let flat: Vec<String> = [
                ("z_last", "1"),
                (&format!("f{i}") as &str, v),
                ("~rev", "4"),
                ("~r:f", "2"),
                ("a \"first\"", "\"k\""),
                ("~updated", "000000000000005|evt \"1\""),
            ]
            .iter()
            .flat_map(|(f, v)| [f.to_string(), v.to_string()])
            .collect();
            let s = entity_state("p\"q", "key/\u{1}", 9, pairs(&flat));
            assert_eq!(s.rev, 4);
            assert_eq!(
                s.document(),
                document_via_values("p\"q", "key/\u{1}", 9, &flat),
                "{v}"
            );
            assert_eq!(s.document()["last_event_id"], "evt \"1\"");
            assert_eq!(s.document()["updated_at"], "1970-01-01T00:00:00.005Z");
        }
    }

    #[test]
    fn a_state_without_clock_has_null_times() {
        let flat = vec!["n".to_string(), "1".to_string()];
        let d = entity_state("p", "k", 1, pairs(&flat)).document();
        assert_eq!(d["updated_at"], Value::Null);
        assert_eq!(d["last_event_id"], Value::Null);
        assert_eq!(d["state"], serde_json::json!({"n": 1}));
    }
}
