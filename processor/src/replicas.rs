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
        let acked: u32 = self.command().query_async(conn).await?;
        self.check(acked)
    }

    /// The `WAIT` command, for callers that send it last in the pipeline
    /// that wrote: one request on one connection, so no reconnect can come
    /// between the writes and the wait (it would then cover nothing).
    pub fn command(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.replicas).arg(self.timeout_ms);
        cmd
    }

    /// `WAIT`'s reply: an error (to retry) when fewer replicas than asked
    /// acknowledged.
    pub fn check(&self, acked: u32) -> Result<(), RedisError> {
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

    #[test]
    fn fewer_replicas_than_asked_is_an_error_to_retry() {
        let wait = ReplicaWait {
            replicas: 2,
            timeout_ms: 250,
        };
        assert!(wait.check(2).is_ok() && wait.check(3).is_ok());
        let e = wait.check(1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TryAgain);
        assert!(e.to_string().contains("1 of 2 within 250 ms"), "{e}");
    }
}
