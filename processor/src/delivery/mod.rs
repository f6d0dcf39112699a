//! Outbound delivery (`hooklog-processor deliver`): downstream agent
//! services subscribe to event types over `/api/v1/webhooks`, and every
//! verified event of a matching type is POSTed to them, signed, retried on
//! a schedule, and dead-lettered when it cannot be delivered.
//!
//! Layout, in the order an event flows:
//! - [`api`]: the subscription API, delivery log, health and metrics;
//! - [`subscription`]: subscriptions in Redis and each replica's copy;
//! - [`guard`]: the SSRF guard for callback URLs;
//! - [`fanout`]: raw topics (own consumer group) → durable jobs;
//! - [`queue`]: the Redis job queue with leases and the delivery log;
//! - [`replay`]: a subscription's history queued again on request;
//! - [`worker`]: claims due jobs per endpoint and makes the attempts;
//! - [`policy`]: what an answer means and when to retry (pure);
//! - [`sign`]: `X-Webhook-Signature` and Standard Webhooks headers;
//! - [`metrics`]: Prometheus metrics.

pub mod api;
pub mod fanout;
pub mod guard;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod replay;
pub mod sign;
pub mod subscription;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::bearer::BearerKeys;
use crate::changelog::Publisher;
use crate::config::Config;
use crate::consume::{self, Health};

/// Resolves the API keys; at least one is required.
pub fn api_keys(config: &Config) -> anyhow::Result<BearerKeys> {
    anyhow::ensure!(
        !config.delivery.api_keys.is_empty(),
        "invalid configuration: delivery.api_keys: at least one key reference (env:NAME or file:PATH) is required"
    );
    BearerKeys::resolve("delivery.api_keys", &config.delivery.api_keys)
}

/// Runs the deliverer (API + fan-out + dispatcher) until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let keys = api_keys(&config)?;
    let config = Arc::new(config);
    let settings = Arc::new(worker::Settings::from(&config.delivery));
    let Some(store) = crate::connect_store(&config, &shutdown).await? else {
        return Ok(());
    };
    let conn = store.connection();
    let prefix = &config.redis.key_prefix;
    let subs = subscription::SubscriptionStore::new(conn.clone(), prefix);
    let mut queue = queue::Queue::new(conn, prefix, config.delivery.retention_secs);
    if let Some(wait) = crate::replicas::ReplicaWait::from_config(&config.redis) {
        queue = queue.with_replica_wait(wait, store.new_connection().await?);
    }
    let cache = Arc::new(subscription::SubscriptionCache::default());
    let metrics = Arc::new(metrics::DeliveryMetrics::default());
    let health = Arc::new(Health::default());
    let wake = Arc::new(Notify::new());
    let publisher = Publisher::new(&config.kafka)?;

    let replays = replay::Replays {
        config: config.clone(),
        queue: queue.clone(),
        conn: store.connection(),
        prefix: prefix.clone(),
        metrics: metrics.clone(),
    };
    let deliverer = worker::Deliverer {
        subs: subs.clone(),
        cache: cache.clone(),
        queue: queue.clone(),
        client: worker::client(&settings).context("building the HTTP client")?,
        publisher: publisher.clone(),
        metrics: metrics.clone(),
        settings: settings.clone(),
    };
    let state = Arc::new(api::ApiState {
        subs: subs.clone(),
        cache: cache.clone(),
        queue: queue.clone(),
        deliverer: deliverer.clone(),
        sources: config.sources.iter().map(|s| s.name.clone()).collect(),
        replays,
        api_keys: keys,
        policy: settings.policy,
        rotation_grace_secs: config.delivery.rotation_grace_secs,
        metrics: metrics.clone(),
        health: health.clone(),
    });
    let stop = shutdown.clone();
    let server = axum::serve(listener, api::app(state))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    let server = tokio::spawn(async move { server.await });

    let dispatcher = {
        let (wake, stop) = (wake.clone(), shutdown.clone());
        tokio::spawn(async move { deliverer.dispatch(wake, stop).await })
    };

    let consumer = Arc::new(consume::group_consumer(&config, &config.delivery.group_id)?);
    let fanout = fanout::Fanout {
        subs,
        cache,
        queue,
        metrics,
        health,
        wake,
    };
    fanout.run(consumer, shutdown.clone()).await;
    let _ = dispatcher.await;
    let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    info!("Deliverer stopped.");
    Ok(())
}
