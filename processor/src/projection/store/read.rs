//! The apply's reads: the version pointers, the write counters and the
//! entities in one round trip (watched for a watched commit), then which
//! of their events each version has already applied.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use redis::aio::ConnectionLike;
use redis::RedisError;

use super::{
    entity_hash_key, not_building, stripe_key, stripe_of, Store, Target, VersionRead, WriteCounts,
    STRIPES,
};
use crate::projection::fold::Fields;
use crate::projection::spec::Update;

/// Event ids per `seen.lua` call (its `unpack` must stay under Lua's 8,000
/// C stack slots).
const SEEN_CHUNK: usize = 4_000;

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

impl Store {
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
    pub(super) async fn read_for_fold<'a>(
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
    /// counters are watched first (see [`Store::commit_watched`]). A
    /// rebuild's apply reads (and watches) `building` and fails with
    /// [`super::NOT_BUILDING`] when it no longer names its version.
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
            for (projection, _) in pending {
                if live {
                    watched.arg(self.current_key(projection));
                }
                watched.arg(self.building_key(projection));
            }
            watched.arg(&stripes).ignore();
        }
        for (projection, _) in pending {
            if live {
                pipe.get(self.current_key(projection));
            }
            pipe.get(self.building_key(projection));
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
        for ((projection, _), versions) in pending.iter().zip(versions) {
            let mut pointer =
                || redis::from_redis_value::<Option<u64>>(&replies.next().expect("reply"));
            if live {
                let (current, building) = (pointer()?, pointer()?);
                pointers.push(live_versions(current, building));
            } else if pointer()? != Some(versions[0]) {
                // A rebuild writes only while its version is being built
                // (`lua/commit.lua` checks again when it writes).
                return Err(not_building(projection, versions[0]));
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
}
