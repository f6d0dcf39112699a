//! The Redis side of projections.
//!
//! Key layout (prefix `P`, default `hooklog:`; `{NAME}` is a hash tag so a
//! projection's keys share one cluster slot):
//!
//! | key | what |
//! |---|---|
//! | `P{NAME}:current` | current version (absent = 1); readers follow it |
//! | `P{NAME}:building` | version a rebuild is filling (live applies dual-write); a lease the rebuild renews |
//! | `P{NAME}:versions` | versions that may hold keys (sorted set: version → Unix ms from which a rebuild may delete it unless current) |
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
//!
//! Where things are: this file holds the key layout, [`Store`] and its
//! apply (sharding, the read → fold → write rounds, retries), the entity
//! reads of the API and the publish stage, and the write stripes;
//! `read.rs` the apply's reads (pointers, counters, entities, markers);
//! `commit.rs` its writes (the watched transaction, the script fallback,
//! the marker buckets); `state.rs` an entity's hash as the published JSON
//! document.

mod commit;
mod read;
mod state;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::{HashMap, HashMapExt, HashSet};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncCommands, ErrorKind, RedisError, Script};

use super::fold::{self, Changed, Fields};
use super::spec::Update;
use crate::replicas::ReplicaWait;
use commit::{marker_bucket, MarkerBucket, WatchBackoff};
use state::pairs;
pub use state::{clock, entity_state, EntityState};

const COMMIT_LUA: &str = include_str!("../../../lua/commit.lua");
const SEEN_LUA: &str = include_str!("../../../lua/seen.lua");

/// `redis_version` from `INFO server`, when the server tells.
pub async fn redis_version(conn: &mut impl redis::aio::ConnectionLike) -> Option<String> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
}

/// Unix seconds now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Arguments per `lua/commit.lua` call (about 20 per event), so that no
/// single call builds a huge Lua argument table. The calls of one apply
/// still run in one MULTI/EXEC, which blocks Redis for all of them, as the
/// watched transaction does (docs/operations.md, "Capacity planning").
const CHUNK_ARGS: usize = 8_000;

/// A connection manager to `client` with the store's timeouts and retries.
async fn manager(client: &redis::Client) -> Result<ConnectionManager, RedisError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(10))
        .set_number_of_retries(2)
        .set_max_delay(1000);
    ConnectionManager::new_with_config(client.clone(), config).await
}

/// The code of the error an apply into a rebuild's version returns once
/// that version is no longer the one being built: a failed rebuild's
/// clean-up (or an operator) removed the `building` pointer, or its lease
/// lapsed (the rebuild stopped renewing it). Its writes are
/// refused from that moment on, so nothing lands in a version being
/// deleted.
pub const NOT_BUILDING: &str = "NOTBUILDING";

/// The [`NOT_BUILDING`] error for `version` of `projection`.
fn not_building(projection: &str, version: u64) -> RedisError {
    redis::make_extension_error(
        NOT_BUILDING.to_owned(),
        Some(format!(
            "version {version} of {projection} is no longer the one being built"
        )),
    )
}

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

/// The `hash-max-listpack-value` Hooklog recommends. Redis keeps a hash in
/// its compact encoding only while every value fits; an entity's clocks
/// hold an event id (16 bytes + the id: 87 for a body-hash id), and with
/// Redis's default of 64 such entities took ~80 % more memory
/// (docs/operations.md, "Redis memory").
pub const RECOMMENDED_LISTPACK_VALUE: u64 = 128;

/// What [`Store::redis_settings`] read.
#[derive(Debug, Default)]
pub struct RedisSettings {
    /// `hash-max-listpack-value` (`hash-max-ziplist-value` before Redis 7):
    /// see [`RECOMMENDED_LISTPACK_VALUE`].
    pub listpack_value: Option<u64>,
    /// `maxmemory` in bytes (0: no limit).
    pub maxmemory: Option<u64>,
    /// `maxmemory-policy`: what Redis does when full. Anything but
    /// `noeviction` deletes keys (entities, dedup markers) to make room.
    pub maxmemory_policy: Option<String>,
}

/// Commands the store uses that older Redis lacks: (name, the probe's
/// arguments after its key, the Redis version that added it). The probes
/// only read, or write nothing to a key that does not exist.
const NEWER_COMMANDS: &[(&str, &[&str], &str)] = &[
    ("SMISMEMBER", &["x"], "6.2"),               // lua/seen.lua
    ("ZADD GT", &["XX", "GT", "0", "x"], "6.2"), // lua/markers.lua
];

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

/// Which versions an apply writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The live path: the current version, plus the building one if any.
    Live,
    /// A rebuild: only this version.
    Version(u64),
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
    /// Replicas each apply waits for (see [`Store::with_replica_wait`]).
    replica_wait: Option<ReplicaWait>,
}

impl Store {
    /// Connects (fails when Redis is unreachable; callers retry).
    /// `window_secs` is how long an applied event id is remembered
    /// (`dedup_window_secs`).
    pub async fn connect(url: &str, prefix: &str, window_secs: u64) -> Result<Self, RedisError> {
        Self::connect_client(redis::Client::open(url)?, prefix, window_secs).await
    }

    /// [`Store::connect`] with a client made elsewhere (TLS with a CA of
    /// one's own: see `crate::redis_client`).
    pub async fn connect_client(
        client: redis::Client,
        prefix: &str,
        window_secs: u64,
    ) -> Result<Self, RedisError> {
        let conn = manager(&client).await?;
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
            replica_wait: None,
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
    pub fn base(&self, projection: &str) -> String {
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

    /// Key of the list of versions that may hold keys (sorted set: version
    /// → Unix ms from which it may be deleted unless current; see
    /// `rebuild`).
    pub fn versions_key(&self, projection: &str) -> String {
        format!("{}:versions", self.base(projection))
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

    /// Why this Redis cannot hold projections, if it cannot: a command the
    /// store needs that it does not know (or refuses), e.g. `SMISMEMBER` on
    /// Redis before 6.2, whose scripts would otherwise fail at the first
    /// batch and retry forever. Probed on a key nobody writes, writing
    /// nothing. Errors when Redis does not answer, or answers that it cannot
    /// now (full, loading): worth retrying.
    pub async fn unsupported(&self) -> Result<Option<String>, RedisError> {
        let mut conn = self.conn.clone();
        for &(command, args, since) in NEWER_COMMANDS {
            let name = command.split(' ').next().unwrap_or(command);
            let probe = redis::cmd(name)
                .arg(format!("{}probe", self.prefix))
                .arg(args)
                .query_async::<redis::Value>(&mut conn)
                .await;
            // An old Redis answers `ERR unknown command` (SMISMEMBER) or
            // `ERR` about the arguments (GT); other answers are a moment's
            // (`OOM` when full, `LOADING`, `BUSY`) or not about the command.
            let refused = match probe {
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ResponseError => e,
                Err(e) => return Err(e),
            };
            let server = redis_version(&mut conn.clone())
                .await
                .map(|v| format!(" {v}"))
                .unwrap_or_default();
            let why = refused.detail().unwrap_or(refused.category()).trim();
            return Ok(Some(format!(
                "Redis{server} refused {command} ({why}): Hooklog's projections need Redis {since} or later (or a compatible server with {command})"
            )));
        }
        Ok(None)
    }

    /// The Redis settings Hooklog has advice about, as far as Redis tells:
    /// managed services may refuse `CONFIG` (then all None).
    pub async fn redis_settings(&self) -> RedisSettings {
        let mut conn = self.conn.clone();
        let replies: Result<(Vec<String>, Vec<String>), RedisError> = redis::pipe()
            .cmd("CONFIG")
            .arg("GET")
            .arg("hash-max-*-value")
            .cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory*")
            .query_async(&mut conn)
            .await;
        let Ok((listpack, memory)) = replies else {
            return RedisSettings::default();
        };
        let value = |name: &str| {
            memory
                .chunks_exact(2)
                .find(|p| p[0] == name)
                .map(|p| p[1].clone())
        };
        RedisSettings {
            listpack_value: listpack
                .chunks_exact(2)
                .filter_map(|p| p[1].parse().ok())
                .min(),
            maxmemory: value("maxmemory").and_then(|v| v.parse().ok()),
            maxmemory_policy: value("maxmemory-policy"),
        }
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

    /// A connection manager of its own, not shared with the store's reads
    /// (the delivery fan-out's writes and their `WAIT`).
    pub async fn new_connection(&self) -> Result<ConnectionManager, RedisError> {
        manager(&self.client).await
    }

    /// Applies `updates` (with their event ids) in one pipeline.
    pub async fn apply_batch(
        &self,
        updates: &[(&Update, &str)],
        target: Target,
    ) -> Result<Vec<Applied>, RedisError> {
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
            // lost race uses the script, which tells the groups apart. A
            // script's writes that wait for replicas get a connection of
            // their own too: `WAIT` holds up every later command on its
            // connection, and the read API's reads share `conn`.
            let watch = round == 0 && self.should_watch();
            let mut own = match watch || self.replica_wait.is_some() {
                true => Some(self.watch_connection().await?),
                false => None,
            };
            let (versions, counts, reads) = match own.as_mut() {
                Some(c) => {
                    self.read_for_fold(c, updates, &pending, target, watch, now)
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
            let replies = match own.as_mut() {
                _ if calls.is_empty() => Vec::new(),
                Some(c) if watch => {
                    self.commit_watched(c, &calls, &pending, &versions, marks)
                        .await?
                }
                Some(c) => {
                    self.commit_scripted(c, &calls, &pending, &versions, target, marks)
                        .await?
                }
                None => {
                    self.commit_scripted(&mut conn, &calls, &pending, &versions, target, marks)
                        .await?
                }
            };
            if let Some(wait) = self.replica_wait.filter(|_| !calls.is_empty()) {
                // On the connection that wrote (always our own here).
                wait.wait(own.as_mut().expect("a connection of its own"))
                    .await?;
            }
            let scripted = !watch;
            if let Some(c) = own {
                self.watch_pool.lock().expect("lock").push(c);
            }
            let mut retry: HashMap<&str, BTreeSet<usize>> = HashMap::new();
            for ((projection, groups), reply) in calls.iter().zip(replies) {
                let read_at = counts[pending
                    .iter()
                    .position(|(p, _)| p == projection)
                    .expect("pending")];
                let flags: Vec<i64> = match reply {
                    redis::Value::Int(_) => match target {
                        // The script refused a rebuild's write: its version
                        // is no longer being built (a lost watch is a race).
                        Target::Version(v) if scripted => return Err(not_building(projection, v)),
                        _ => vec![1; groups.len()],
                    },
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

    /// Every apply that wrote waits until replicas have its writes (see
    /// [`ReplicaWait`]), and fails if they do not in time: its batch is
    /// then retried (idempotently) and its offsets wait, so a failover to
    /// one of those replicas loses no applied update.
    pub fn with_replica_wait(mut self, wait: Option<ReplicaWait>) -> Self {
        self.replica_wait = wait;
        self
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
        let mut states = self.read_in_version(projection, &[key], version).await?;
        Ok(states.pop().flatten())
    }

    /// Several entities of one version, in one round trip (None: absent).
    pub async fn read_in_version(
        &self,
        projection: &str,
        keys: &[&str],
        version: u64,
    ) -> Result<Vec<Option<EntityState>>, RedisError> {
        let prefix = self.version_prefix(projection, version);
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HGETALL").arg(entity_hash_key(&prefix, key));
        }
        let mut conn = self.conn.clone();
        let flats: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
        Ok(keys
            .iter()
            .zip(flats)
            .map(|(key, flat)| {
                (!flat.is_empty()).then(|| entity_state(projection, key, version, pairs(&flat)))
            })
            .collect())
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
    fn lost_race_backoff_grows_and_is_capped() {
        for _ in 0..100 {
            assert!(lost_race_backoff(1) <= Duration::from_millis(1));
            assert!(lost_race_backoff(3) <= Duration::from_millis(4));
            assert!(lost_race_backoff(15) <= Duration::from_millis(64));
        }
        let spread: HashSet<_> = (0..50).map(|_| lost_race_backoff(7)).collect();
        assert!(spread.len() > 1, "jittered, not lockstep");
    }
}
