//! Waiting for Redis replicas (`redis.wait_replicas`): Redis replicates
//! asynchronously, so a write it acknowledged can be lost in a failover.
//! Where offsets are committed after a write (the apply, the delivery
//! fan-out), waiting here first means a failover loses nothing committed.

use redis::{ErrorKind, RedisError};

use crate::config::RedisConfig;

/// How many replicas must have a connection's writes, and for how long to
/// wait for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaWait {
    replicas: u32,
    timeout_ms: u64,
}

impl ReplicaWait {
    /// None when the config asks for no replica (the default).
    pub fn from_config(redis: &RedisConfig) -> Option<Self> {
        (redis.wait_replicas > 0).then_some(Self {
            replicas: redis.wait_replicas,
            timeout_ms: redis.wait_timeout_ms,
        })
    }

    /// `WAIT` on `conn`, the connection that wrote: an error (to retry)
    /// when fewer replicas than asked have its writes within the timeout.
    pub async fn wait(&self, conn: &mut impl redis::aio::ConnectionLike) -> Result<(), RedisError> {
        let acked: u32 = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(self.timeout_ms)
            .query_async(conn)
            .await?;
        if acked < self.replicas {
            return Err(RedisError::from((
                ErrorKind::TryAgain,
                "replicas did not acknowledge the write",
                format!(
                    "{acked} of {} within {} ms (redis.wait_replicas)",
                    self.replicas, self.timeout_ms
                ),
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_only_when_asked() {
        let mut redis = RedisConfig::default();
        assert_eq!(ReplicaWait::from_config(&redis), None);
        redis.wait_replicas = 2;
        redis.wait_timeout_ms = 250;
        assert_eq!(
            ReplicaWait::from_config(&redis),
            Some(ReplicaWait {
                replicas: 2,
                timeout_ms: 250
            })
        );
    }
}
