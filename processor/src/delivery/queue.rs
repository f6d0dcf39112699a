//! The durable delivery queue in Redis. The fan-out writes one job per
//! (subscription, event) and only then commits the Kafka offset; workers
//! claim due jobs with a lease, so a deliverer killed mid-attempt leaves
//! the job to be claimed again when the lease runs out (at-least-once,
//! same `webhook-id`). Keys under `<prefix>dlv:`:
//!
//! - `evt:<source>/<event id>`: body, type and id of the event;
//! - `job:<sub>:<source>/<event id>`: attempt count and state, kept for
//!   `retention_secs` so a redelivered event id is not delivered twice;
//! - `due:<sub>`: sorted set of the subscription's jobs by due time;
//! - `dead:<sub>`: sorted set of its dead-lettered jobs by when they were
//!   given up (the last `retention_secs`), for recovery;
//! - `log:<sub>`: the latest attempts, for the deliveries endpoint.

use redis::aio::ConnectionManager;
use redis::{ErrorKind, RedisError, Script};
use serde::{Deserialize, Serialize};

use crate::replicas::ReplicaWait;

/// Creates the job unless it exists (a redelivered event).
const ENQUEUE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'attempt', 0, 'state', 'pending')
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[3], 'body', ARGV[4], 'event_type', ARGV[5], 'event_id', ARGV[6], 'traceparent', ARGV[7])
end
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
";

/// Takes up to `ARGV[3]` due jobs and pushes their due time to the lease end.
const CLAIM: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
";

/// Puts one dead-lettered job back in its queue, due `ARGV[2]`, with its
/// attempts from zero: 1 done, 0 when its event expired, 2 when it is no
/// longer dead (delivered, or already back in the queue).
const RECOVER: &str = r"
redis.call('ZREM', KEYS[4], ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'delivered' or state == 'pending' then return 2 end
if not state or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'attempt', 0, 'state', 'pending')
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
";

/// What a recovery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Recovered {
    /// Jobs back in the queue.
    pub requeued: u64,
    /// Dead letters whose event body had expired: only on the DLQ topic now.
    pub expired: u64,
}

/// The event a job delivers.
#[derive(Debug, Clone)]
pub struct QueuedEvent {
    /// Provider event id (`webhook-id`).
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// Raw body bytes.
    pub body: Vec<u8>,
    /// W3C context of the raw record ("" when none).
    pub traceparent: String,
}

/// A job to create: subscription id and the event.
pub struct NewJob<'a> {
    /// Subscription.
    pub subscription: &'a str,
    /// `<source>/<event id>`.
    pub member: String,
    /// Event id.
    pub event_id: &'a str,
    /// Event type.
    pub event_type: &'a str,
    /// Raw body.
    pub body: &'a [u8],
    /// W3C context of the raw record.
    pub traceparent: Option<&'a str>,
}

/// One line of the delivery log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptLog {
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// delivered | retrying | failed | dead | disabled.
    pub outcome: String,
    /// HTTP status, when the receiver answered.
    pub status_code: Option<u16>,
    /// Error class when it did not (timeout, connect, blocked_address…).
    pub error: Option<String>,
    /// Attempt latency.
    pub latency_ms: u64,
    /// RFC 3339 time of the attempt.
    pub at: String,
    /// RFC 3339 time of the next attempt, when retrying.
    pub next_retry_at: Option<String>,
}

/// Redis access for jobs.
#[derive(Clone)]
pub struct Queue {
    conn: ConnectionManager,
    prefix: String,
    retention_secs: u64,
    enqueue: Script,
    claim: Script,
    recover: Script,
    /// Replicas new jobs wait for before the fan-out commits their offsets.
    replica_wait: Option<ReplicaWait>,
    /// The connection new jobs are written on: `conn`, or one of their own
    /// when they wait for replicas (`WAIT` holds up every later command on
    /// its connection, and the API's reads share `conn`).
    writes: ConnectionManager,
}

impl Queue {
    /// `prefix` is `redis.key_prefix`.
    pub fn new(conn: ConnectionManager, prefix: &str, retention_secs: u64) -> Self {
        Self {
            writes: conn.clone(),
            conn,
            prefix: format!("{prefix}dlv:"),
            retention_secs,
            enqueue: Script::new(ENQUEUE),
            claim: Script::new(CLAIM),
            recover: Script::new(RECOVER),
            replica_wait: None,
        }
    }

    /// New jobs wait until replicas have them (see [`ReplicaWait`]): the
    /// fan-out commits their events' offsets right after, and a failover
    /// that lost a job would lose its deliveries. They are written, and
    /// waited for, on `writes`, a connection no reader shares.
    pub fn with_replica_wait(mut self, wait: ReplicaWait, writes: ConnectionManager) -> Self {
        self.replica_wait = Some(wait);
        self.writes = writes;
        self
    }

    /// How long jobs and events are kept (`delivery.retention_secs`).
    pub fn retention_secs(&self) -> u64 {
        self.retention_secs
    }

    fn job_key(&self, sub: &str, member: &str) -> String {
        format!("{}job:{sub}:{member}", self.prefix)
    }
    fn due_key(&self, sub: &str) -> String {
        format!("{}due:{sub}", self.prefix)
    }
    fn evt_key(&self, member: &str) -> String {
        format!("{}evt:{member}", self.prefix)
    }
    fn log_key(&self, sub: &str) -> String {
        format!("{}log:{sub}", self.prefix)
    }
    fn dead_key(&self, sub: &str) -> String {
        format!("{}dead:{sub}", self.prefix)
    }

    /// Creates the jobs in one pipeline; returns how many were new.
    pub async fn enqueue(&self, jobs: &[NewJob<'_>], now_ms: i64) -> Result<u64, RedisError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let created = match self.enqueue_once(jobs, now_ms).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                let mut conn = self.conn.clone();
                self.enqueue.prepare_invoke().load_async(&mut conn).await?;
                self.enqueue_once(jobs, now_ms).await
            }
            other => other,
        }?;
        Ok(created)
    }

    async fn enqueue_once(&self, jobs: &[NewJob<'_>], now_ms: i64) -> Result<u64, RedisError> {
        let mut pipe = redis::pipe();
        for j in jobs {
            pipe.cmd("EVALSHA")
                .arg(self.enqueue.get_hash())
                .arg(3)
                .arg(self.job_key(j.subscription, &j.member))
                .arg(self.due_key(j.subscription))
                .arg(self.evt_key(&j.member))
                .arg(&j.member)
                .arg(now_ms)
                .arg(self.retention_secs)
                .arg(j.body)
                .arg(j.event_type)
                .arg(j.event_id)
                .arg(j.traceparent.unwrap_or(""));
        }
        // The wait for replicas goes in the same pipeline: a connection
        // manager may reconnect between two requests, and a `WAIT` on a
        // new connection would cover none of the writes.
        if let Some(wait) = self.replica_wait {
            pipe.add_command(wait.command());
        }
        let mut conn = self.writes.clone();
        let mut replies: Vec<u64> = pipe.query_async(&mut conn).await?;
        if let Some(wait) = self.replica_wait {
            let acked = replies.pop().unwrap_or_default();
            wait.check(acked as u32)?;
        }
        Ok(replies.iter().sum())
    }

    /// Claims up to `n` due jobs of `sub` until `lease_until_ms`.
    pub async fn claim(
        &self,
        sub: &str,
        now_ms: i64,
        lease_until_ms: i64,
        n: usize,
    ) -> Result<Vec<String>, RedisError> {
        let mut conn = self.conn.clone();
        self.claim
            .key(self.due_key(sub))
            .arg(now_ms)
            .arg(lease_until_ms)
            .arg(n)
            .invoke_async(&mut conn)
            .await
    }

    /// The event of a job and the attempts made so far; None when the
    /// event expired (retention shorter than the schedule).
    pub async fn load(
        &self,
        sub: &str,
        member: &str,
    ) -> Result<Option<(QueuedEvent, u32)>, RedisError> {
        let mut conn = self.conn.clone();
        type Row = (
            Option<Vec<u8>>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let ((body, event_type, event_id, traceparent), attempt): (Row, Option<u32>) =
            redis::pipe()
                .cmd("HMGET")
                .arg(self.evt_key(member))
                .arg(&["body", "event_type", "event_id", "traceparent"])
                .hget(self.job_key(sub, member), "attempt")
                .query_async(&mut conn)
                .await?;
        Ok(match (body, event_type, event_id) {
            (Some(body), Some(event_type), Some(event_id)) => Some((
                QueuedEvent {
                    event_id,
                    event_type,
                    body,
                    traceparent: traceparent.unwrap_or_default(),
                },
                attempt.unwrap_or(0),
            )),
            _ => None,
        })
    }

    /// The size of a job's event body (0 when the event expired).
    pub async fn body_len(&self, member: &str) -> Result<usize, RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("HSTRLEN")
            .arg(self.evt_key(member))
            .arg("body")
            .query_async(&mut conn)
            .await
    }

    /// Puts a claimed job back, due at `due_ms`, its attempts unchanged.
    pub async fn postpone(&self, sub: &str, member: &str, due_ms: i64) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("ZADD")
            .arg(self.due_key(sub))
            .arg("XX")
            .arg(due_ms)
            .arg(member)
            .query_async(&mut conn)
            .await
    }

    /// Schedules the next attempt.
    pub async fn retry_at(
        &self,
        sub: &str,
        member: &str,
        attempts: u32,
        due_ms: i64,
    ) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset(self.job_key(sub, member), "attempt", attempts)
            .ignore()
            .zadd(self.due_key(sub), member, due_ms)
            .ignore()
            .query_async(&mut conn)
            .await
    }

    /// Ends a job in a final state (delivered, failed, dead, disabled);
    /// every state but delivered is a dead letter, remembered for
    /// [`Queue::recover`].
    pub async fn finish(
        &self,
        sub: &str,
        member: &str,
        attempts: u32,
        state: &str,
    ) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                self.job_key(sub, member),
                &[
                    ("attempt", attempts.to_string()),
                    ("state", state.to_owned()),
                ],
            )
            .ignore()
            .zrem(self.due_key(sub), member)
            .ignore();
        if state != "delivered" {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let dead = self.dead_key(sub);
            let retention_ms = (self.retention_secs as i64).saturating_mul(1000);
            pipe.zadd(&dead, member, now_ms)
                .ignore()
                .zrembyscore(&dead, "-inf", now_ms - retention_ms)
                .ignore()
                .expire(&dead, self.retention_secs as i64)
                .ignore();
        }
        pipe.query_async(&mut conn).await
    }

    /// Puts the jobs of `sub` given up from `since_ms` until `now_ms` back
    /// in its queue, due now, their attempts from zero (the full retry
    /// schedule again, the same `webhook-id`). Their events must still be
    /// kept (`retention_secs`); the others are counted as expired.
    pub async fn recover(
        &self,
        sub: &str,
        since_ms: i64,
        now_ms: i64,
    ) -> Result<Recovered, RedisError> {
        const CHUNK: usize = 500;
        let mut conn = self.conn.clone();
        self.recover.prepare_invoke().load_async(&mut conn).await?;
        let (dead, due) = (self.dead_key(sub), self.due_key(sub));
        let mut out = Recovered::default();
        loop {
            // Each chunk leaves the set, so the loop ends; jobs given up
            // after `now_ms` (a recovered one failing again) are not taken.
            let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(&dead)
                .arg(since_ms)
                .arg(now_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(CHUNK)
                .query_async(&mut conn)
                .await?;
            if members.is_empty() {
                return Ok(out);
            }
            let mut pipe = redis::pipe();
            for m in &members {
                pipe.cmd("EVALSHA")
                    .arg(self.recover.get_hash())
                    .arg(4)
                    .arg(self.job_key(sub, m))
                    .arg(self.evt_key(m))
                    .arg(&due)
                    .arg(&dead)
                    .arg(m)
                    .arg(now_ms)
                    .arg(self.retention_secs);
            }
            let replies: Vec<i64> = pipe.query_async(&mut conn).await?;
            out.requeued += replies.iter().filter(|r| **r == 1).count() as u64;
            out.expired += replies.iter().filter(|r| **r == 0).count() as u64;
        }
    }

    /// Appends to the delivery log (latest 100 kept).
    pub async fn log(&self, sub: &str, entry: &AttemptLog) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let key = self.log_key(sub);
        redis::pipe()
            .lpush(&key, serde_json::to_string(entry).expect("log serializes"))
            .ignore()
            .ltrim(&key, 0, 99)
            .ignore()
            .expire(&key, self.retention_secs as i64)
            .ignore()
            .query_async(&mut conn)
            .await
    }

    /// The latest attempts, newest first.
    pub async fn recent(&self, sub: &str, limit: usize) -> Result<Vec<AttemptLog>, RedisError> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(self.log_key(sub))
            .arg(0)
            .arg(limit.saturating_sub(1))
            .query_async(&mut conn)
            .await?;
        Ok(raw
            .iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect())
    }

    /// Jobs waiting (due or scheduled) for `sub`.
    pub async fn pending(&self, sub: &str) -> Result<u64, RedisError> {
        let mut conn = self.conn.clone();
        redis::cmd("ZCARD")
            .arg(self.due_key(sub))
            .query_async(&mut conn)
            .await
    }

    /// Forgets a deleted subscription's queue, dead letters and log.
    pub async fn drop_subscription(&self, sub: &str) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .del(self.due_key(sub))
            .ignore()
            .del(self.dead_key(sub))
            .ignore()
            .del(self.log_key(sub))
            .ignore()
            .query_async(&mut conn)
            .await
    }
}
