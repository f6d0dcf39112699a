//! A lock in Redis that lives while its holder renews it: one rebuild,
//! verify or prune of a projection, or one replay of a subscription, at a
//! time across every replica and the CLI. A holder that is killed stops
//! renewing, so the lock frees itself within its time to live.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisError};

/// A held lock; [`Lease::release`] frees it at once.
pub struct Lease {
    conn: ConnectionManager,
    key: String,
    token: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes `key` for `ttl`, renewed every third of it while held; `None`
    /// while someone else holds it.
    pub async fn try_acquire(
        conn: ConnectionManager,
        key: String,
        ttl: Duration,
    ) -> Result<Option<Lease>, RedisError> {
        let token = format!(
            "{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        let ttl_secs = ttl.as_secs().max(1);
        let locked: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("EX")
            .arg(ttl_secs)
            .query_async(&mut conn.clone())
            .await?;
        if locked.is_none() {
            return Ok(None);
        }
        let renewal = tokio::spawn({
            let (mut conn, key) = (conn.clone(), key.clone());
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(ttl_secs) / 3).await;
                    let _: Result<(), _> = conn.expire(&key, ttl_secs as i64).await;
                }
            }
        });
        Ok(Some(Lease {
            conn,
            key,
            token,
            renewal,
        }))
    }

    /// Stops renewing and deletes the lock if it is still this one's.
    pub async fn release(mut self) {
        self.renewal.abort();
        let _ = delete_if(&mut self.conn, &self.key, &self.token).await;
    }
}

/// A lease dropped without [`Lease::release`] (an early error) stops being
/// renewed and expires on its own.
impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// Deletes `key` if it holds `value`, in one atomic step; true if it did.
pub async fn delete_if(
    conn: &mut ConnectionManager,
    key: &str,
    value: &str,
) -> Result<bool, RedisError> {
    let script = redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end return 0",
    );
    let deleted: i64 = script.key(key).arg(value).invoke_async(conn).await?;
    Ok(deleted == 1)
}
