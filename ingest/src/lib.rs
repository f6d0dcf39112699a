//! `hooklog-ingest`: receives webhooks, verifies them, publishes them to
//! Kafka and answers 2xx only after `acks=all`.
//!
//! Layout:
//! - [`config`]: `hooklog.toml` (`[server]`, `[kafka]`, `[[source]]`), secret refs;
//! - [`verify`]: the `Verifier` trait and one module per signature scheme;
//! - [`http`]: the axum router and the webhook handler;
//! - [`error`]: `ApiError`, the HTTP status table;
//! - [`publish`]: the idempotent Kafka producer;
//! - [`metrics`]: Prometheus metrics.
//!
//! [`run`] takes a bound listener and a shutdown token, so tests can bind
//! port 0 and stop the server themselves.

pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod publish;
pub mod verify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::http::{AppState, Clock, Source};
use crate::publish::Publisher;

/// Builds the state from a validated config: resolves secrets, builds the
/// verifiers and the producer.
pub fn build_state(config: &Config, clock: Clock) -> anyhow::Result<Arc<AppState>> {
    let mut sources = HashMap::new();
    for s in &config.sources {
        let secrets = config::resolve_secrets(s)?;
        let verifier = verify::build(s, secrets)?;
        let kept_headers = verifier.kept_headers();
        sources.insert(
            s.name.clone(),
            Source {
                name: s.name.clone(),
                topic: s.topic(),
                verifier,
                kept_headers,
            },
        );
    }
    let publisher = Publisher::new(&config.kafka, config.server.publish_timeout_ms)
        .context("creating the Kafka producer")?;
    Ok(Arc::new(AppState {
        sources,
        publisher,
        metrics: metrics::Metrics::default(),
        in_flight: Semaphore::new(config.server.max_in_flight),
        in_flight_bytes: Semaphore::new(config.server.max_in_flight_bytes),
        max_body_bytes: config.server.max_body_bytes,
        retry_after_secs: config.server.retry_after_secs,
        clock,
    }))
}

/// Serves until `shutdown` is cancelled, then drains in-flight requests
/// (each gets its ack or a 503) and flushes the producer.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = build_state(&config, http::system_clock())?;
    let probe_state = state.clone();
    let probe_stop = shutdown.clone();
    // Readiness: a metadata probe every 2 s on a blocking thread.
    tokio::spawn(async move {
        loop {
            let s = probe_state.clone();
            let _ = tokio::task::spawn_blocking(move || s.publisher.probe(Duration::from_secs(2)))
                .await;
            tokio::select! {
                _ = probe_stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
    info!(addr = %listener.local_addr()?, sources = state.sources.len(), "Ingest listening.");
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let stop = shutdown.clone();
    let server = axum::serve(listener, http::app(state.clone()))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    let server = tokio::spawn(async move { server.await });
    shutdown.cancelled().await;
    info!("Shutting down: draining in-flight requests.");
    match tokio::time::timeout(grace, server).await {
        Ok(res) => res??,
        Err(_) => warn!("Drain deadline passed; exiting with requests still open."),
    }
    let publisher = state.publisher.clone();
    tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await??;
    info!("Ingest stopped.");
    Ok(())
}
