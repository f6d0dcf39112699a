//! The processor's HTTP server: the read API, health, metrics and the
//! rebuild admin endpoint (bearer `processor.admin_keys`; off without them,
//! so whoever may read projections cannot start a replay of the log).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::bearer::{unauthorized, BearerKeys};
use crate::consume::Health;
use crate::metrics::Metrics;
use crate::projection::store::Store;
use crate::rebuild::OnRequest;

/// Shared state of the HTTP handlers.
pub struct ApiState {
    /// Projection names, in config order.
    pub projections: Vec<String>,
    /// Redis.
    pub store: Store,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health flags.
    pub health: Arc<Health>,
    /// Keys of the admin endpoints; none: they are off.
    pub admin_keys: BearerKeys,
    /// Starts rebuilds in the background (admin endpoint).
    pub rebuilds: OnRequest,
}

/// A JSON error answer `{"error": code, "message": …}` (both HTTP servers).
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

/// Builds the router.
pub fn app(state: Arc<ApiState>) -> Router {
    let router = Router::new()
        .route("/v1/projections", get(list))
        .route("/v1/projections/{projection}/{key}", get(read))
        .route("/v1/projections/{projection}/rebuild", post(rebuild))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    with_json_fallbacks(router)
}

/// JSON 404 and 405 answers for unknown routes (both HTTP servers).
pub fn with_json_fallbacks(router: Router) -> Router {
    router
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed",
            )
        })
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "not found") })
}

async fn list(State(s): State<Arc<ApiState>>) -> Response {
    let mut out = Vec::new();
    for name in &s.projections {
        let (current, building) = match (
            s.store.current_version(name).await,
            s.store.building_version(name).await,
        ) {
            (Ok(c), Ok(b)) => (c, b),
            _ => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "redis_unavailable",
                    "redis is unavailable",
                )
            }
        };
        out.push(json!({"name": name, "version": current, "building_version": building}));
    }
    Json(json!({"projections": out})).into_response()
}

/// An entity's state, with a strong `ETag` (its version and `~rev`, which
/// every write changes): a reader polling with `If-None-Match` gets `304`
/// and no body until the entity changes.
async fn read(
    State(s): State<Arc<ApiState>>,
    Path((projection, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !s.projections.contains(&projection) {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_projection",
            "no such projection",
        );
    }
    match s.store.read(&projection, &key, None).await {
        Ok(Some(state)) => {
            let etag = format!("\"{}.{}\"", state.version, state.rev);
            let cached = headers
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|tag| {
                    let tag = tag.trim();
                    tag == "*" || tag.trim_start_matches("W/") == etag
                });
            let tags = [
                (header::ETAG, etag),
                (header::CACHE_CONTROL, "no-cache".to_owned()),
            ];
            if cached {
                (StatusCode::NOT_MODIFIED, tags).into_response()
            } else {
                let json = [(header::CONTENT_TYPE, "application/json".to_owned())];
                (tags, json, state.json).into_response()
            }
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_key",
            "no state for this key",
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            "redis is unavailable",
        ),
    }
}

async fn rebuild(
    State(s): State<Arc<ApiState>>,
    Path(projection): Path<String>,
    headers: HeaderMap,
) -> Response {
    if s.admin_keys.is_empty() {
        return error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "the admin endpoints are off: set processor.admin_keys, or run `hooklog-processor rebuild`",
        );
    }
    if !s.admin_keys.accept(&headers) {
        return unauthorized();
    }
    if !s.projections.contains(&projection) {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_projection",
            "no such projection",
        );
    }
    match s.rebuilds.start(&projection).await {
        Ok(true) => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "started", "projection": projection})),
        )
            .into_response(),
        Ok(false) => error(
            StatusCode::CONFLICT,
            "rebuild_running",
            "a rebuild, verify or prune of this projection is already running",
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            "redis is unavailable",
        ),
    }
}

async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
    readiness(&s.health, s.store.ping().await.is_ok())
}

/// `/readyz` of both HTTP servers: 200 when Redis answers and the consumer
/// has started, else 503; the body says which, and whether a loop is
/// paused. A pause (Kafka down, Redis full) stops the apply, not the
/// reads: the read API and the subscription API still answer from Redis,
/// so the pod stays in its Service rather than every replica leaving it at
/// once; `hooklog_processor_paused` and its alert report the stall.
pub fn readiness(health: &Health, redis_ok: bool) -> Response {
    let paused = health.is_paused();
    let running = health.running.load(Ordering::Relaxed);
    let body = json!({"redis": redis_ok, "consumer_running": running, "paused": paused});
    if redis_ok && running {
        Json(body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    prometheus(s.metrics.render())
}

/// A Prometheus text exposition answer (both HTTP servers).
pub fn prometheus(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_while_redis_answers_and_the_consumer_runs_even_when_paused() {
        let health = Health::default();
        assert_eq!(
            readiness(&health, true).status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "not started"
        );
        health.running.store(true, Ordering::Relaxed);
        assert_eq!(readiness(&health, true).status(), StatusCode::OK);
        let paused = health.pause();
        assert_eq!(
            readiness(&health, true).status(),
            StatusCode::OK,
            "a paused apply still serves reads"
        );
        assert_eq!(
            readiness(&health, false).status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis does not answer"
        );
        drop(paused);
    }
}
