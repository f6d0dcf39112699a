//! The axum router: `POST /webhooks/{source}`, `/healthz`, `/readyz`,
//! `/metrics`. The webhook handler answers 2xx only after the Kafka ack.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hooklog_schemas::trace::TraceParent;
use hooklog_schemas::{headers as kafka_headers, WebhookEvent};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::{debug, field, warn, Instrument, Level};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::publish::{PublishError, Publisher};
use crate::verify::{Request, Verifier};

/// A configured source, ready to serve.
pub struct Source {
    /// Route name.
    pub name: String,
    /// Raw topic.
    pub topic: String,
    /// Its verifier.
    pub verifier: Box<dyn Verifier>,
    /// Header names kept in the envelope.
    pub kept_headers: Vec<String>,
}

/// Current Unix time in seconds; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    })
}

/// Everything a handler needs.
pub struct AppState {
    /// Sources by name.
    pub sources: HashMap<String, Source>,
    /// The Kafka producer.
    pub publisher: Publisher,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Bounds requests in flight (429 beyond).
    pub in_flight: Semaphore,
    /// Bounds the bytes of the bodies in flight (429 beyond): one permit a
    /// byte, a body counted at its `Content-Length` (else at the largest
    /// allowed).
    pub in_flight_bytes: Semaphore,
    /// `server.max_body_bytes`.
    pub max_body_bytes: usize,
    /// `server.retry_after_secs`.
    pub retry_after_secs: u64,
    /// Injected clock.
    pub clock: Clock,
}

/// The receipt of an accepted webhook.
#[derive(Debug, Serialize)]
pub struct Receipt {
    /// The record key.
    pub event_id: String,
    /// Where it is stored.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Always false: ingest stores every delivery (provider retries too);
    /// deduplication happens in the processor, by event id.
    pub duplicate: bool,
}

/// Builds the router.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/webhooks/{source}", post(receive))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound })
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.publisher.is_reachable() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "kafka_unreachable"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn receive(
    State(state): State<Arc<AppState>>,
    Path(source_name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(source) = state.sources.get(&source_name) else {
        debug!(source = %source_name, "Unknown source.");
        return ApiError::UnknownSource.into_response();
    };
    // The request span exists only where something reads it: exported
    // traces, and debug logs (whose "Event stored." line carries it). At the
    // default info level no line is logged inside a successful request, yet
    // formatting the span's fields as JSON cost ~10 % of ingest's
    // throughput (bench/limits.md, round 12); warnings carry their own
    // fields instead.
    let span = if hooklog_schemas::telemetry::enabled() || tracing::enabled!(Level::DEBUG) {
        tracing::info_span!(
            "webhook",
            source = %source.name,
            scheme = source.verifier.scheme(),
            event_id = field::Empty,
            event_type = field::Empty,
            trace_id = field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    // Continue the caller's trace (when traces are exported).
    hooklog_schemas::telemetry::set_parent(&span, |k| headers.get(k).and_then(|v| v.to_str().ok()));
    let result = handle(&state, source, &headers, body)
        .instrument(span)
        .await;
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    state.metrics.request(&source.name, status);
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Records the event's id, type and trace id on the request span in one
/// call: the JSON log layer parses and re-serializes a span's fields on
/// every `record`, so one call instead of three saves two round trips
/// through serde_json per request.
fn record_identity(span: &tracing::Span, event_id: &str, event_type: &str, trace_id: &str) {
    let Some(meta) = span.metadata() else {
        return; // the span is disabled
    };
    let fields = meta.fields();
    let (Some(id), Some(ty), Some(trace)) = (
        fields.field("event_id"),
        fields.field("event_type"),
        fields.field("trace_id"),
    ) else {
        return;
    };
    span.record_all(&fields.value_set(&[
        (&id, Some(&event_id as &dyn field::Value)),
        (&ty, Some(&event_type as &dyn field::Value)),
        (&trace, Some(&trace_id as &dyn field::Value)),
    ]));
}

async fn handle(
    state: &AppState,
    source: &Source,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let retry_after_secs = state.retry_after_secs;
    let _permit = state.in_flight.try_acquire().map_err(|_| {
        warn!(source = %source.name, reason = "in_flight_limit", "Request refused.");
        ApiError::TooManyRequests { retry_after_secs }
    })?;
    state.metrics.in_flight().inc();
    let _gauge = scopeguard(|| {
        state.metrics.in_flight().dec();
    });

    let room = body_room(headers, state.max_body_bytes)?;
    let _room = state.in_flight_bytes.try_acquire_many(room).map_err(|_| {
        warn!(source = %source.name, reason = "in_flight_bytes_limit", bytes = room, "Request refused.");
        ApiError::TooManyRequests { retry_after_secs }
    })?;
    let body = read_body(body, state.max_body_bytes).await?;
    let received_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let verified = source
        .verifier
        .verify(&Request {
            headers,
            body: &body,
            now: (state.clock)(),
        })
        .inspect_err(|e| {
            state.metrics.verify_failed(&source.name, e.reason());
            warn!(
                source = %source.name,
                scheme = source.verifier.scheme(),
                reason = e.reason(),
                error = %e,
                "Signature rejected."
            );
        })?;
    state.metrics.verified(&source.name, verified.key_id);

    if let Some(challenge) = verified.challenge {
        debug!("Slack URL verification answered.");
        return Ok(Json(serde_json::json!({"challenge": challenge})).into_response());
    }

    let span = tracing::Span::current();
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    // The exported span's own context, or (export off) a child of the
    // caller's context, or a new trace: the record always carries one.
    let trace = hooklog_schemas::telemetry::context_of(&span).unwrap_or_else(|| {
        incoming
            .as_ref()
            .map(TraceParent::child)
            .unwrap_or_else(TraceParent::new_root)
    });
    record_identity(
        &span,
        &verified.event_id,
        &verified.event_type,
        &trace.trace_id,
    );

    let event = WebhookEvent {
        event_id: verified.event_id,
        source: source.name.clone(),
        scheme: source.verifier.scheme().to_owned(),
        event_type: verified.event_type,
        body: body.to_vec(),
        headers: source
            .kept_headers
            .iter()
            .filter_map(|name| {
                headers
                    .get(name.as_str())
                    .map(|v| (name.clone(), v.as_bytes().to_vec()))
            })
            .collect(),
        provider_timestamp: verified.timestamp,
        received_at_ms,
        key_id: verified.key_id as i32,
    };
    let traceparent = trace.header_value();
    let mut record_headers: Vec<(&str, &[u8])> = vec![
        (kafka_headers::TRACEPARENT, traceparent.as_bytes()),
        (kafka_headers::SOURCE, source.name.as_bytes()),
        (kafka_headers::EVENT_TYPE, event.event_type.as_bytes()),
    ];
    if incoming.is_some() {
        if let Some(state_header) = headers.get("tracestate") {
            record_headers.push((kafka_headers::TRACESTATE, state_header.as_bytes()));
        }
    }

    let started = Instant::now();
    let ack = state
        .publisher
        .publish(
            &source.topic,
            &event.event_id,
            &event.encode(),
            &record_headers,
        )
        .await
        .map_err(|e| {
            state.metrics.publish_failed(&source.name);
            warn!(
                source = %source.name,
                event_id = %event.event_id,
                trace_id = %trace.trace_id,
                error = %e,
                topic = %source.topic,
                "Publish failed; answering 503."
            );
            match e {
                PublishError::QueueFull => ApiError::TooManyRequests { retry_after_secs },
                _ => ApiError::Unavailable { retry_after_secs },
            }
        })?;
    state
        .metrics
        .published(&source.name, started.elapsed().as_secs_f64());
    debug!(
        partition = ack.partition,
        offset = ack.offset,
        "Event stored."
    );
    Ok(Json(Receipt {
        event_id: event.event_id,
        topic: source.topic.clone(),
        partition: ack.partition,
        offset: ack.offset,
        duplicate: false,
    })
    .into_response())
}

/// Reads the body, enforcing the limit while streaming (a lying or absent
/// Content-Length cannot get past it).
/// The room a request's body takes among the bodies in flight: its
/// `Content-Length` (HTTP/1 and HTTP/2 both hold a body to it), else `limit`,
/// the most it may be. A declared length over `limit` is refused at once.
fn body_room(headers: &HeaderMap, limit: usize) -> Result<u32, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let room = match declared {
        Some(n) if n > limit as u64 => return Err(ApiError::BodyTooLarge { limit }),
        Some(n) => n,
        None => limit as u64,
    };
    // The configuration keeps `limit` below 4 GiB.
    Ok(u32::try_from(room).unwrap_or(u32::MAX))
}

/// Reads the body, refusing it once it passes `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::BodyTooLarge { limit })
        }
        Err(_) => Err(ApiError::BodyRead),
    }
}

/// Runs `f` on drop.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
