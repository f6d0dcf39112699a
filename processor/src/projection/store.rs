//! The Redis side of projections.
//!
//! Key layout (prefix `P`, default `hooklog:`; `{NAME}` is a hash tag so a
//! projection's keys share one cluster slot):
//!
//! | key | what |
//! |---|---|
//! | `P{NAME}:current` | current version (absent = 1); readers follow it |
//! | `P{NAME}:building` | version a rebuild is filling (live applies dual-write) |
//! | `P{NAME}:v<N>:e:<entity key>` | entity hash: fields (JSON text), `~c:<f>` clocks, `~r:<f>` ranks, `~updated` |
//! | `P{NAME}:v<N>:seen:<event id>` | idempotency marker, TTL `dedup_window_secs` |
//!
//! [`Store::apply_batch`] sends one `EVALSHA` of `lua/apply.lua` per chunk
//! of up to [`CHUNK`] updates of one projection, all in one pipeline: "seen?
//! if not, apply and mark" stays atomic per event, an entity touched by many
//! events of a chunk is read and written once, and a batch is one round trip.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, ErrorKind, RedisError, Script};
use serde::Serialize;
use serde_json::Value;

use super::spec::Update;

const APPLY_LUA: &str = include_str!("../../lua/apply.lua");

/// Updates per script call. A call blocks Redis while it runs; 500 updates
/// take a few milliseconds, short enough for the read API.
const CHUNK: usize = 500;

/// One update as the apply script reads it.
#[derive(Serialize)]
struct ScriptUpdate<'a> {
    /// Event id.
    i: &'a str,
    /// Entity key.
    e: &'a str,
    /// Clock (see [`clock`]).
    c: String,
    /// 1: return the entity's state after the chunk.
    s: u8,
    /// Operations.
    o: &'a [super::spec::Op],
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
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntityState {
    /// Projection name.
    pub projection: String,
    /// Entity key.
    pub key: String,
    /// Projection version the state comes from.
    pub version: u64,
    /// The fields.
    pub state: BTreeMap<String, Value>,
    /// Event time of the newest event applied (RFC 3339).
    pub updated_at: Option<String>,
    /// Id of that event.
    pub last_event_id: Option<String>,
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
}

/// Redis access for projections.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
    ttl_secs: u64,
    script: Script,
}

impl Store {
    /// Connects (fails when Redis is unreachable; callers retry).
    pub async fn connect(url: &str, prefix: &str, ttl_secs: u64) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(10))
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let script = Script::new(APPLY_LUA);
        let store = Self {
            conn,
            prefix: prefix.to_owned(),
            ttl_secs,
            script,
        };
        store.load_script().await?;
        Ok(store)
    }

    async fn load_script(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        self.script.prepare_invoke().load_async(&mut conn).await?;
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

    /// Prefix of every key of one version.
    pub fn version_prefix(&self, projection: &str, version: u64) -> String {
        format!("{}:v{version}", self.base(projection))
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
        let version_arg = match target {
            Target::Live => String::new(),
            Target::Version(v) => v.to_string(),
        };
        let mut last_of_entity = HashMap::new();
        for (i, (up, _)) in updates.iter().enumerate() {
            last_of_entity.insert((up.projection.as_str(), up.key.as_str()), i);
        }
        // Each projection's updates, in order, cut into chunks: one script
        // call per chunk, every call in one pipeline.
        let mut by_projection: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, (up, _)) in updates.iter().enumerate() {
            match by_projection.iter_mut().find(|(p, _)| *p == up.projection) {
                Some((_, idx)) => idx.push(i),
                None => by_projection.push((&up.projection, vec![i])),
            }
        }
        let chunks: Vec<(&str, &[usize])> = by_projection
            .iter()
            .flat_map(|(p, idx)| idx.chunks(CHUNK).map(move |c| (*p, c)))
            .collect();
        let mut pipe = redis::pipe();
        for (projection, chunk) in &chunks {
            let items: Vec<ScriptUpdate> = chunk
                .iter()
                .map(|&i| {
                    let (up, event_id) = updates[i];
                    let want_state = target == Target::Live
                        && last_of_entity.get(&(up.projection.as_str(), up.key.as_str()))
                            == Some(&i);
                    ScriptUpdate {
                        i: event_id,
                        e: &up.key,
                        c: clock(up.time_ms, event_id),
                        s: u8::from(want_state),
                        o: &up.ops,
                    }
                })
                .collect();
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(2)
                .arg(self.current_key(projection))
                .arg(self.building_key(projection))
                .arg(format!("{}:v", self.base(projection)))
                .arg(self.ttl_secs)
                .arg(&version_arg)
                .arg(serde_json::to_string(&items).expect("updates serialize"));
        }
        let mut conn = self.conn.clone();
        let raw: Vec<(String, Vec<i64>, Vec<Vec<String>>)> = pipe.query_async(&mut conn).await?;
        let mut out: Vec<Option<Applied>> = vec![None; updates.len()];
        for ((_, chunk), (version, applied, states)) in chunks.iter().zip(raw) {
            let version = version.parse().unwrap_or(1);
            let mut states = states.into_iter();
            for (&i, applied) in chunk.iter().zip(applied) {
                let up = updates[i].0;
                let wanted = target == Target::Live
                    && last_of_entity.get(&(up.projection.as_str(), up.key.as_str())) == Some(&i);
                let state = wanted
                    .then(|| states.next())
                    .flatten()
                    .filter(|flat| !flat.is_empty())
                    .map(|flat| entity_state(&up.projection, &up.key, version, flat));
                out[i] = Some(Applied {
                    applied: applied == 1,
                    state,
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.expect("every update is in one chunk"))
            .collect())
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
            .arg(format!(
                "{}:e:{key}",
                self.version_prefix(projection, version)
            ))
            .query_async(&mut conn)
            .await?;
        Ok((!flat.is_empty()).then(|| entity_state(projection, key, version, flat)))
    }
}

impl Store {
    /// Reads the current state of many entities in two round trips.
    pub async fn read_many(
        &self,
        entities: &[(&str, &str)],
    ) -> Result<Vec<Option<EntityState>>, RedisError> {
        let mut projections: Vec<&str> = entities.iter().map(|(p, _)| *p).collect();
        projections.sort_unstable();
        projections.dedup();
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for p in &projections {
            pipe.get(self.current_key(p));
        }
        let versions: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
        let version_of = |p: &str| {
            let i = projections.iter().position(|x| *x == p).expect("listed");
            versions[i].unwrap_or(1)
        };
        let mut pipe = redis::pipe();
        for (p, k) in entities {
            pipe.cmd("HGETALL")
                .arg(format!("{}:e:{k}", self.version_prefix(p, version_of(p))));
        }
        let flats: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
        Ok(entities
            .iter()
            .zip(flats)
            .map(|((p, k), flat)| {
                (!flat.is_empty()).then(|| entity_state(p, k, version_of(p), flat))
            })
            .collect())
    }
}

/// `<15-digit ms>|<event id>`: compares like `(time, id)`.
pub fn clock(time_ms: i64, event_id: &str) -> String {
    format!("{:015}|{event_id}", time_ms.max(0))
}

/// Builds an [`EntityState`] from a flat `HGETALL` reply.
pub fn entity_state(projection: &str, key: &str, version: u64, flat: Vec<String>) -> EntityState {
    let mut state = BTreeMap::new();
    let mut updated = None;
    let mut it = flat.into_iter();
    while let (Some(f), Some(v)) = (it.next(), it.next()) {
        if f == "~updated" {
            updated = Some(v);
        } else if !f.starts_with('~') {
            let value = serde_json::from_str(&v).unwrap_or(Value::String(v));
            state.insert(f, value);
        }
    }
    let (updated_at, last_event_id) = match updated.as_deref().and_then(|u| u.split_once('|')) {
        Some((ms, id)) => {
            let at = ms
                .parse::<i64>()
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            (at, Some(id.to_owned()))
        }
        None => (None, None),
    };
    EntityState {
        projection: projection.into(),
        key: key.into(),
        version,
        state,
        updated_at,
        last_event_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let s = entity_state(
            "orders",
            "ORD-1",
            3,
            flat.iter().map(|s| s.to_string()).collect(),
        );
        assert_eq!(s.state.len(), 2);
        assert_eq!(s.state["carrier"], Value::String("FedEx".into()));
        assert_eq!(s.state["total"].to_string(), "12.5");
        assert_eq!(s.updated_at.as_deref(), Some("2025-03-01T12:00:00.000Z"));
        assert_eq!(s.last_event_id.as_deref(), Some("e1"));
    }
}
