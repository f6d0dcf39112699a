//! `hooklog-processor`: consumes the raw webhook topics, applies events to
//! agent state projections in Redis exactly once per version, serves them
//! over HTTP, publishes every change to compacted changelog topics, and
//! rebuilds projections by replaying the log.
//!
//! Layout:
//! - [`config`]: `hooklog.toml` as the processor sees it;
//! - [`projection`]: definitions (`spec`) and the Redis store + Lua apply (`store`);
//! - [`batch`]: raw records → updates and dead letters (pure);
//! - [`consume`]: the live consumer-group loop;
//! - [`changelog`]: changelog and DLQ producer;
//! - [`api`]: read API, health, metrics, rebuild endpoint;
//! - [`bearer`]: the bearer keys of the admin and subscription APIs;
//! - [`rebuild`]: replay into a new version, switch or verify;
//! - [`lease`]: locks in Redis that live while renewed (one rebuild, one replay);
//! - [`replicas`]: waiting for Redis replicas before offsets are committed;
//! - [`spans`]: per-record OpenTelemetry spans of batched work;
//! - [`topics`]: topic creation through the admin API;
//! - [`metrics`]: Prometheus metrics;
//! - [`delivery`]: outbound delivery to subscribed agent services
//!   (`hooklog-processor deliver`).

pub mod api;
pub mod batch;
pub mod bearer;
pub mod changelog;
pub mod config;
pub mod consume;
pub mod delivery;
pub mod lease;
pub mod metrics;
pub mod projection;
pub mod rebuild;
pub mod replicas;
pub mod spans;
pub mod topics;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::batch::BatchLimit;
use crate::config::Config;
use crate::consume::{Health, Pipeline};
use crate::metrics::Metrics;
use crate::projection::store::{Store, RECOMMENDED_LISTPACK_VALUE};
use crate::replicas::ReplicaWait;

/// A Redis client for `[redis]`: `redis://` in the clear, `rediss://` over
/// TLS, verified against the system's CAs or `tls_ca_file`.
pub fn redis_client(redis: &config::RedisConfig) -> Result<redis::Client, redis::RedisError> {
    let Some(ca) = &redis.tls_ca_file else {
        return redis::Client::open(redis.url.as_str());
    };
    let root_cert = std::fs::read(ca).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::IoError,
            "cannot read redis.tls_ca_file",
            e.to_string(),
        ))
    })?;
    redis::Client::build_with_tls(
        redis.url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        },
    )
}

/// Why the projection store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// Redis is unreachable or failed: worth retrying.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// Redis answers but cannot hold projections (too old): retrying won't
    /// help.
    #[error("{0}")]
    Unsupported(String),
}

/// Connects the projection store as configured and checks that Redis has
/// the commands it needs.
pub async fn open_store(config: &Config) -> Result<Store, OpenStoreError> {
    let store = Store::connect_client(
        redis_client(&config.redis)?,
        &config.redis.key_prefix,
        config.processor.dedup_window_secs,
    )
    .await?;
    if let Some(why) = store.unsupported().await? {
        return Err(OpenStoreError::Unsupported(why));
    }
    let store = store.with_replica_wait(ReplicaWait::from_config(&config.redis));
    Ok(match config.redis.watched_commits {
        true => store,
        false => store.scripted_only(),
    })
}

/// Connects to Redis, retrying until it answers or `shutdown` (`None`);
/// fails at once when Redis is one Hooklog cannot use.
pub async fn connect_store(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    loop {
        match open_store(config).await {
            Ok(s) => return Ok(Some(s)),
            Err(e @ OpenStoreError::Unsupported(_)) => return Err(e.into()),
            Err(e) => {
                warn!(error = %e, "Redis unavailable; retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Warns about Redis settings that cost memory or correctness: entities
/// with long event ids kept in Redis's larger hash encoding (see
/// [`RECOMMENDED_LISTPACK_VALUE`]), and a memory limit that evicts keys
/// rather than refusing writes.
async fn check_redis_settings(store: &Store) {
    let settings = store.redis_settings().await;
    if let Some(limit) = settings.listpack_value {
        if limit < RECOMMENDED_LISTPACK_VALUE {
            warn!(
                hash_max_listpack_value = limit,
                recommended = RECOMMENDED_LISTPACK_VALUE,
                "Redis keeps a hash compact only while every value fits hash-max-listpack-value, and an entity's clocks hold an event id (16 bytes + the id, 87 for a body-hash id): entities with long ids take ~80 % more memory. Set it to 128 (docs/operations.md, \"Redis memory\")."
            );
        }
    }
    if let (Some(maxmemory @ 1..), Some(policy)) = (settings.maxmemory, settings.maxmemory_policy) {
        if policy != "noeviction" {
            warn!(
                maxmemory,
                maxmemory_policy = %policy,
                "Redis deletes keys to make room when it reaches maxmemory: it would drop entities, and dedup markers (then a redelivered event applies twice). Set maxmemory-policy noeviction: a full Redis then refuses writes, and the processor pauses until there is room (docs/operations.md)."
            );
        }
    }
}

/// Runs the live processor and its HTTP server until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let admin_keys =
        bearer::BearerKeys::resolve("processor.admin_keys", &config.processor.admin_keys)?;
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let Some(store) = connect_store(&config, &shutdown).await? else {
        return Ok(());
    };
    check_redis_settings(&store).await;
    let publisher = changelog::Publisher::new(&config.kafka)?;
    let consumer = Arc::new(consume::consumer(&config)?);

    let rebuilds = rebuild::OnRequest {
        config: config.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
    };
    let api_state = Arc::new(api::ApiState {
        projections: config.projections.iter().map(|p| p.name.clone()).collect(),
        store: store.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        admin_keys,
        rebuilds,
    });
    let stop = shutdown.clone();
    let server = axum::serve(listener, api::app(api_state))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    let server = tokio::spawn(async move { server.await });

    let lag_task = {
        let (consumer, metrics, stop) = (consumer.clone(), metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let (c, m) = (consumer.clone(), metrics.clone());
                let _ = tokio::task::spawn_blocking(move || consume::report_lag(&c, &m)).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };

    let pipeline = Pipeline {
        projections: config.projections.clone(),
        store,
        publisher: publisher.clone(),
        metrics,
        health,
        batch: BatchLimit {
            records: config.processor.batch_size,
            bytes: config.processor.batch_max_bytes,
        },
        batch_wait: Duration::from_millis(config.processor.batch_wait_ms),
    };
    Arc::new(pipeline).run(consumer, shutdown.clone()).await?;
    lag_task.abort();
    let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    info!("Processor stopped.");
    Ok(())
}

/// Builders shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use hooklog_schemas::WebhookEvent;

    /// A verified generic-scheme `fulfillment` event, as ingest stores it.
    pub fn event(
        event_id: &str,
        event_type: &str,
        body: &str,
        received_at_ms: i64,
    ) -> WebhookEvent {
        WebhookEvent {
            event_id: event_id.into(),
            source: "fulfillment".into(),
            scheme: "hmac-sha256".into(),
            event_type: event_type.into(),
            body: body.as_bytes().to_vec(),
            headers: vec![],
            provider_timestamp: None,
            received_at_ms,
            key_id: 0,
        }
    }
}
