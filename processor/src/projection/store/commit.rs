//! The apply's writes: the watched transaction that writes a whole apply
//! if nobody wrote in its stripes since the read, the `lua/commit.lua`
//! fallback that compares and sets entity by entity, the back-off between
//! them, and the marker buckets both keep with `lua/markers.lua`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::RedisError;

use super::{stripe_key, stripe_prefix, Group, Store, Target, STRIPES};

const MARKERS_LUA: &str = include_str!("../../../lua/markers.lua");

/// Marker buckets per dedup window: reads check about this many sets, and a
/// marker lives between one window and one window plus one bucket.
const BUCKETS_PER_WINDOW: u64 = 8;

/// The marker bucket for `now`: (bucket start, when the bucket expires).
pub(super) fn marker_bucket(now: u64, window_secs: u64) -> (u64, u64) {
    let width = (window_secs / BUCKETS_PER_WINDOW).max(1);
    let start = now - now % width;
    (start, start + width + window_secs)
}

/// When a store tries a watched commit. One loses whenever another writer
/// (a replica sharing the projection) writes in its stripes meanwhile, and
/// a loss costs the read and the fold. So after a loss the next apply uses
/// the script, after two in a row the next two, then 4, 8 … 64; a watched
/// commit that runs ends the streak. Shared by the store's applies.
#[derive(Default)]
pub(super) struct WatchBackoff {
    /// Losses in a row.
    streak: AtomicU64,
    /// Applies left to do with the script before watching again.
    skip: AtomicU64,
    /// Losses in all.
    pub(super) lost: AtomicU64,
}

impl WatchBackoff {
    /// Whether the next apply watches (else it counts down the skips).
    pub(super) fn should_watch(&self) -> bool {
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
pub(super) struct MarkerBucket {
    pub(super) now: u64,
    pub(super) start: u64,
    pub(super) expiry: u64,
}

impl MarkerBucket {
    /// The bucket's set key: `<seen index key>:<bucket start>`.
    fn key(&self, index: &str) -> String {
        format!("{index}:{}", self.start)
    }
}

impl Store {
    /// A connection of an apply's own (a watched apply, or one that waits
    /// for replicas): an idle one, or a new one. It goes back to the pool
    /// only after a successful apply; after an error it is dropped, since
    /// its state (watched keys, a transaction half sent) is unknown. Unlike
    /// the shared connection manager it never reconnects behind the apply's
    /// back, which would lose the watch (or the writes `WAIT` is for).
    pub(super) async fn watch_connection(&self) -> Result<MultiplexedConnection, RedisError> {
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
    pub(super) async fn commit_watched(
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
    pub(super) async fn commit_scripted(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
